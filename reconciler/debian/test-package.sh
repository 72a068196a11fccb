#!/usr/bin/env bash
# The packaged fleet, checked on this machine as root (`make test-package` builds the .deb
# first): `make install` into a staging root; the .deb's contents and dependencies; the
# unit accepted by systemd-analyze; dpkg -i; the installed binary serving a fleet without
# systemd (ready, then SIGTERM); dpkg --purge leaving no file of the package behind (the
# fleet user stays, as Debian's system users do; the script removes it only if it made it).
set -euo pipefail
cd "$(dirname "$0")/../.."
target="${CARGO_TARGET_DIR:-target}"
fail() { echo "test-package: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || fail "run as root (it installs and removes the package)"
if dpkg -s fleet >/dev/null 2>&1; then fail "a fleet package is already installed; remove it first"; fi
had_user=""
getent passwd fleet >/dev/null && had_user=yes
work="$(mktemp -d)"
chmod 0755 "$work"
serve_pid=""
cleanup() {
    [ -n "$serve_pid" ] && kill "$serve_pid" 2>/dev/null || true
    dpkg --purge fleet >/dev/null 2>&1 || true
    [ -n "$had_user" ] || userdel fleet >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT

echo "== make install DESTDIR=… PREFIX=/usr/local"
make --no-print-directory install DESTDIR="$work/stage" PREFIX=/usr/local >/dev/null
for f in usr/local/bin/fleet usr/local/share/bash-completion/completions/fleet \
         usr/local/share/zsh/site-functions/_fleet usr/local/share/fish/vendor_completions.d/fleet.fish \
         usr/local/share/man/man1/fleet.1.gz usr/local/share/man/man1/fleet-plan.1.gz \
         etc/systemd/system/fleet.service usr/local/share/doc/fleet/README.md; do
    [ -e "$work/stage/$f" ] || fail "make install did not install /$f"
done
grep -q '^ExecStart=/usr/local/bin/fleet serve' "$work/stage/etc/systemd/system/fleet.service" \
    || fail "the installed unit does not start /usr/local/bin/fleet"
if find "$work/stage" -name 'fleet-bench*' -o -name 'fleet-crash*' | grep -q .; then
    fail "make install installed a bench or crash-test tool"
fi

deb="$(ls -t "$target"/debian/fleet_*.deb | head -1)"
echo "== $deb"
contents="$(dpkg-deb -c "$deb")"
for f in ./usr/bin/fleet ./lib/systemd/system/fleet.service ./usr/share/bash-completion/completions/fleet \
         ./usr/share/man/man1/fleet.1.gz ./usr/share/doc/fleet/copyright ./usr/share/doc/fleet/README.md; do
    grep -qF " $f" <<<"$contents" || fail "the package lacks $f"
done
if grep -qE 'fleet-(bench|crash)' <<<"$contents"; then fail "the package holds a bench or crash-test tool"; fi
depends="$(dpkg-deb -f "$deb" Depends)"
grep -q 'libvirt0' <<<"$depends" || fail "Depends lacks libvirt0: $depends"

echo "== dpkg -i"
dpkg -i "$deb" >/dev/null
[ -x /usr/bin/fleet ] || fail "/usr/bin/fleet is not installed"
/usr/bin/fleet --version
getent passwd fleet >/dev/null || fail "the package made no fleet user"
if getent group libvirt >/dev/null; then
    id -nG fleet | grep -qw libvirt || fail "the fleet user is not in the libvirt group"
fi
grep -q '^ExecStart=/usr/bin/fleet serve' /lib/systemd/system/fleet.service || fail "the unit does not start /usr/bin/fleet"
# Its WorkingDirectory must exist for the check: a scratch one stands in for /srv/fleet.
sed "s|/srv/fleet|$work|g" /lib/systemd/system/fleet.service > "$work/fleet.service"
systemd-analyze verify --man=no "$work/fleet.service" || fail "systemd-analyze verify refuses the unit"
man -w fleet-plan >/dev/null || fail "man cannot find fleet-plan(1)"

echo "== the installed binary serves a fleet (no systemd)"
repo="$work/repo"
mkdir -p "$repo/fleet" "$work/host"
git -C "$repo" init -q -b main
cat > "$repo/fleet/fleet.yaml" <<'YAML'
apiVersion: fleet/v1
kind: Fleet
metadata: {name: packagetest}
spec:
  providers:
    - {name: local, type: libvirt, domainType: qemu}
YAML
git -C "$repo" add -A
git -C "$repo" -c user.name=t -c user.email=t@localhost commit -qm "an empty fleet"
cat > "$work/host/host.yaml" <<YAML
apiVersion: fleet/v1
kind: Host
spec:
  providers:
    - {name: local, type: libvirt, uri: 'test:///default', storageDir: '$repo/.fleet/storage'}
  imageRoot: '$work'
YAML
chmod 0644 "$work/host/host.yaml"
FLEET_HOST_CONFIG="$work/host/host.yaml" /usr/bin/fleet -C "$repo" serve --listen 127.0.0.1:0 \
    2> "$work/serve.log" &
serve_pid=$!
ready=""
for _ in $(seq 1 100); do
    port="$(sed -n 's|.*status page on http://127.0.0.1:\([0-9]*\)/.*|\1|p' "$work/serve.log")"
    if [ -n "$port" ] && python3 -c 'import sys, urllib.request
sys.exit(urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/readyz", timeout=2).status != 200)' "$port" 2>/dev/null; then
        ready=yes; break
    fi
    sleep 0.2
done
[ -n "$ready" ] || fail "fleet serve did not become ready: $(cat "$work/serve.log")"
kill -TERM "$serve_pid"
wait "$serve_pid" || fail "fleet serve did not exit 0 on SIGTERM: $(cat "$work/serve.log")"
serve_pid=""

echo "== dpkg --purge"
files="$(dpkg -L fleet | while read -r f; do [ -d "$f" ] || echo "$f"; done)"
dpkg --purge fleet >/dev/null
left=""
for f in $files; do [ -e "$f" ] && left="$left $f"; done
[ -z "$left" ] || fail "files left after dpkg --purge:$left"
echo "test-package: ok"
