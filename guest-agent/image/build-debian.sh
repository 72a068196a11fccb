#!/usr/bin/env bash
# Builds fleet's "debian" guest image: a Debian 12 root filesystem (systemd, Debian's
# cloud-init, the cloud kernel, sudo, OpenSSH for loadout users' keys, fleet-agent as a
# systemd service) as a qcow2 base disk,
# plus the kernel and initramfs to boot it directly. Real cloud-init runs the VM's whole seed
# (packages, write_files, runcmd, users); slower to build (a few minutes) and to boot (tens of
# seconds under TCG) than the micro image.
#
# Usage: FLEET_AGENT_BIN=path build-debian.sh OUT_DIR
#        (needs mmdebstrap, e2fsprogs, qemu-utils and a reachable Debian mirror; run as root)
#
# With FLEET_AGENT_CLIS="@anthropic-ai/claude-code@X @openai/codex@Y" (make image-agent) it is
# the agent image: git, curl, ripgrep and Node.js from Debian, and those npm packages, pinned,
# installed with the build host's npm under /opt/fleet-agents with their commands on PATH.
#
# Use it from fleet.yaml:
#   images:
#     - name: debian
#       disk: build/image-debian/debian.qcow2
#       kernel: build/image-debian/vmlinuz
#       initrd: build/image-debian/initrd.img
#       cmdline: root=/dev/vda rw
set -euo pipefail

out=${1:?usage: build-debian.sh OUT_DIR}
agent=${FLEET_AGENT_BIN:?build-debian: set FLEET_AGENT_BIN to a static fleet-agent (make agent)}
size=${FLEET_DEBIAN_DISK_SIZE:-2G}
clis=${FLEET_AGENT_CLIS:-}
extra=""
if [ -n "$clis" ]; then
  command -v npm >/dev/null || { echo "build-debian: npm is not installed (the agent CLIs come from the npm registry)" >&2; exit 1; }
  extra=",git,curl,ripgrep,nodejs,less"
fi
for tool in mmdebstrap mke2fs qemu-img; do
  command -v "$tool" >/dev/null || { echo "build-debian: $tool is not installed" >&2; exit 1; }
done

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
root="$work/root"

# --variant=apt: essential packages plus apt; recommends off keeps the image small.
mmdebstrap --variant=apt --aptopt='APT::Install-Recommends "false"' \
  --include="systemd-sysv,udev,cloud-init,linux-image-cloud-amd64,initramfs-tools,sudo,ca-certificates,procps,iproute2,openssh-server,e2fsprogs$extra" \
  bookworm "$root"

install -m 0755 "$agent" "$root/usr/local/bin/fleet-agent"

if [ -n "$clis" ]; then
  # Exact versions only: an image is rebuilt to change what agents run, never by chance.
  for pkg in $clis; do
    case "$pkg" in
      @*/*@[0-9]*|[a-z]*@[0-9]*) ;;
      *) echo "build-debian: $pkg is not pinned to a version (name@X.Y.Z)" >&2; exit 1 ;;
    esac
  done
  # Their install scripts run (Claude Code's puts its native binary in place): they are the
  # pinned versions the host's administrator chose, in the image's own tree.
  # shellcheck disable=SC2086 # one word per package
  npm install --prefix "$root/opt/fleet-agents" --no-audit --no-fund --no-update-notifier $clis
  for bin in "$root"/opt/fleet-agents/node_modules/.bin/*; do
    ln -sf "/opt/fleet-agents/node_modules/.bin/$(basename "$bin")" "$root/usr/local/bin/$(basename "$bin")"
  done
  # The commands must run, not just be there (the CLIs ship native binaries per platform).
  for bin in "$root"/opt/fleet-agents/node_modules/.bin/*; do
    if ! version=$("$bin" --version 2>&1); then
      echo "build-debian: $(basename "$bin") does not run: $version" >&2
      exit 1
    fi
    echo "build-debian: $(basename "$bin") $(echo "$version" | head -n 1)"
  done
fi
cat > "$root/etc/systemd/system/fleet-agent.service" <<'EOF'
[Unit]
Description=fleet guest agent (virtio-serial port org.fleet.agent.0)
After=systemd-udev-settle.service local-fs.target

[Service]
ExecStart=/usr/local/bin/fleet-agent
Restart=always
RestartSec=1

[Install]
WantedBy=multi-user.target
EOF
ln -sf /etc/systemd/system/fleet-agent.service \
  "$root/etc/systemd/system/multi-user.target.wants/fleet-agent.service"

# Only the NoCloud seed fleet attaches: cloud-init must not probe cloud metadata services
# over the network (fleet VMs never talk to anything but the host).
# The image has no locale data beyond C.UTF-8.
cat > "$root/etc/cloud/cloud.cfg.d/90-fleet.cfg" <<'EOF'
datasource_list: [NoCloud, None]
locale: C.UTF-8
EOF
echo '/dev/vda / ext4 defaults,errors=remount-ro 0 1' > "$root/etc/fstab"
echo 'debian' > "$root/etc/hostname"
# The console is the serial port libvirt logs (console.log), so boot progress is visible.
ln -sf /lib/systemd/system/serial-getty@.service \
  "$root/etc/systemd/system/getty.target.wants/serial-getty@ttyS0.service"

mkdir -p "$out"
kernel=$(ls "$root"/boot/vmlinuz-* | sort -V | tail -n 1)
initrd=$(ls "$root"/boot/initrd.img-* | sort -V | tail -n 1)
cp "$kernel" "$out/vmlinuz"
cp "$initrd" "$out/initrd.img"

# An ext4 filesystem filled from the directory (no loop device, no mount), then qcow2.
rm -f "$work/root.raw"
mke2fs -q -t ext4 -L fleet-root -d "$root" "$work/root.raw" "$size"
qemu-img convert -f raw -O qcow2 "$work/root.raw" "$out/debian.qcow2.tmp"
mv "$out/debian.qcow2.tmp" "$out/debian.qcow2"
echo "build-debian: $out/debian.qcow2 ($(du -h "$out/debian.qcow2" | cut -f1)), vmlinuz, initrd.img"
