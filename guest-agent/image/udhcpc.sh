#!/bin/sh
# busybox udhcpc's event script for the micro image: set the leased address and route.
case "$1" in
  bound|renew)
    ip -4 addr flush dev "$interface"
    ip -4 addr add "$ip/${mask:-24}" dev "$interface"
    for r in $router; do ip -4 route replace default via "$r" dev "$interface"; break; done
    ;;
  deconfig)
    ip -4 addr flush dev "$interface"
    ;;
esac
exit 0
