#!/usr/bin/env bash
# Builds fleet's "micro" guest image from Debian packages: the cloud kernel plus a small
# initramfs (busybox-static, the virtio modules, an /init that reports readiness on the
# serial console, and fleet-agent when FLEET_AGENT_BIN names a static build of it).
# Boots to userspace in about 2 s under QEMU TCG.
#
# Usage: [FLEET_AGENT_BIN=path] build-micro.sh OUT_DIR
#        (needs linux-image-cloud-amd64, busybox-static, cpio, kmod)
set -euo pipefail

out=${1:?usage: build-micro.sh OUT_DIR}
here=$(cd "$(dirname "$0")" && pwd)

kver=$(ls /lib/modules | grep -- '-cloud-amd64$' | sort -V | tail -n 1 || true)
if [ -z "$kver" ] || [ ! -f "/boot/vmlinuz-$kver" ]; then
  echo "build-micro: no Debian cloud kernel found; install linux-image-cloud-amd64" >&2
  exit 1
fi
busybox=$(command -v busybox || true)
if [ -z "$busybox" ] || ! file -L "$busybox" 2>/dev/null | grep -q 'statically linked'; then
  [ -x /bin/busybox ] && busybox=/bin/busybox
fi
[ -x "$busybox" ] || { echo "build-micro: busybox-static is not installed" >&2; exit 1; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
root="$work/root"
mkdir -p "$root"/{bin,sbin,dev,proc,sys,run,tmp,etc,lib/modules,usr/bin,usr/sbin,var/log}
cp "$busybox" "$root/bin/busybox"
for applet in sh mount umount mkdir cat echo sleep poweroff reboot insmod ls ln uname acpid findfs \
              hostname ip ifconfig ps kill date head tail grep sed tr cut mknod seq dmesg sync \
              udhcpc nc timeout printf wc dd setsid stty mke2fs; do
  ln -sf busybox "$root/bin/$applet"
done

# virtio modules in dependency order (the cloud kernel builds them as modules).
# failover, net_failover and virtio_net give VMs with `network: full` their NIC (isolated
# VMs have none, and the module finds nothing).
modules="virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci failover net_failover virtio_net virtio_console virtio_blk cdrom isofs evdev button"
for m in $modules; do
  src=$(modinfo -k "$kver" -n "$m")
  case "$src" in
    *.ko) cp "$src" "$root/lib/modules/$m.ko" ;;
    *.ko.xz) xz -dc "$src" > "$root/lib/modules/$m.ko" ;;
    *.ko.zst) zstd -qdc "$src" > "$root/lib/modules/$m.ko" ;;
    *) echo "build-micro: module $m not found for $kver" >&2; exit 1 ;;
  esac
done
echo "$modules" > "$root/lib/modules/order"

# git, for task checkouts: a run's commits go back to the host as a bundle. The host's
# binary with the libraries it links and their loader (the image has no C library of its
# own otherwise).
mkdir -p "$root/usr/bin"
cp /usr/bin/git "$root/usr/bin/git"
for lib in $(ldd /usr/bin/git | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}'); do
  mkdir -p "$root$(dirname "$lib")"
  cp -L "$lib" "$root$lib"
done

if [ -x "${FLEET_AGENT_BIN:-}" ]; then
  cp "$FLEET_AGENT_BIN" "$root/usr/bin/fleet-agent"
fi

install -m 0755 "$here/init" "$root/init"
install -m 0755 "$here/udhcpc.sh" "$root/etc/udhcpc.sh"
# busybox acpid runs /etc/acpi/PWRF/00000080 when the ACPI power button is pressed, which is
# how libvirt asks for a graceful shutdown.
mkdir -p "$root/etc/acpi/PWRF"
echo 'PWRF PWRF/00000080' > "$root/etc/acpid.conf"
printf '#!/bin/sh\necho "fleet-guest: power button, shutting down" > /dev/console\nsync\npoweroff -f\n' > "$root/etc/acpi/PWRF/00000080"
chmod 0755 "$root/etc/acpi/PWRF/00000080"

mkdir -p "$out"
cp "/boot/vmlinuz-$kver" "$out/vmlinuz"
(cd "$root" && find . -print0 | cpio --null -o -H newc --quiet) | gzip -9 > "$out/initrd.img.tmp"
mv "$out/initrd.img.tmp" "$out/initrd.img"
chmod 0644 "$out/vmlinuz" "$out/initrd.img"
echo "build-micro: $out/vmlinuz ($kver) and $out/initrd.img ($(du -h "$out/initrd.img" | cut -f1))"
