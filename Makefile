# fleet — GitOps for agent-sandbox VMs.
#   make run     install what is missing, start libvirtd, build, build the guest image,
#                apply fleet/ (the committed example fleet) and print its status
#   make test    lint, then every test (real libvirt tests need libvirtd: make libvirtd)
#   make bench   plan, observe and daemon benchmarks (needs libvirtd)
SHELL := /bin/bash
CARGO ?= cargo
# Where cargo builds (CI shares one target directory between the checkout and its clone).
TARGET_DIR := $(or $(CARGO_TARGET_DIR),target)
IMAGE_DIR := build/image
DEB_PACKAGES := libvirt-daemon-system libvirt-clients libvirt-dev qemu-system-x86 qemu-utils pkg-config \
                linux-image-cloud-amd64 busybox-static cpio kmod file git chromium genisoimage cloud-init age \
                python3-venv dnsmasq-base nftables iptables iproute2 openssh-client openssh-server man-db systemd adduser tmux
# Every command fleet, its image builder and its tests run, checked after installing: one
# package can remove another's command (a newer qemu-utils gave way to qemu-system-x86's).
DEB_COMMANDS := libvirtd virtlogd virsh qemu-system-x86_64 qemu-img genisoimage busybox cpio \
                depmod file git chromium cloud-init age age-keygen python3 pkg-config \
                dnsmasq nft iptables ip ssh ssh-agent ssh-add sshd promtool man systemd-analyze adduser tmux

.PHONY: all build deps promtool dist-extras install uninstall deb test-package libvirtd agent image image-debian image-agent install-example fakepve run test test-agent lint unit bench bench-agent bench-fresh fuzz crash-test crash-test-proxmox clean

all: build

build:
	$(CARGO) build --release

# `make install` (PREFIX=/usr/local, DESTDIR for staging): the fleet binary, its shell
# completions and man pages (generated from the binary's own CLI definition), the systemd
# unit (pointed at the installed binary) and the README. As root without DESTDIR it also
# creates the `fleet` system user the unit runs as. The bench and crash-test tools are not
# installed. `make deb` builds the same as a Debian package (cargo-deb).
PREFIX ?= /usr/local
BINDIR ?= $(PREFIX)/bin
DATADIR ?= $(PREFIX)/share
UNITDIR ?= $(if $(filter /usr,$(PREFIX)),/lib/systemd/system,/etc/systemd/system)
DIST := build/dist
FLEET_BIN := $(TARGET_DIR)/release/fleet

dist-extras:
	$(CARGO) build --release -p fleet
	rm -rf $(DIST) && mkdir -p $(DIST)/completions $(DIST)/man
	$(FLEET_BIN) completion bash > $(DIST)/completions/fleet
	$(FLEET_BIN) completion zsh > $(DIST)/completions/_fleet
	$(FLEET_BIN) completion fish > $(DIST)/completions/fleet.fish
	$(FLEET_BIN) man $(DIST)/man
	gzip -9n $(DIST)/man/*.1
	sed -e 's|/usr/local/bin/fleet|$(BINDIR)/fleet|' -e 's|/usr/share/doc/fleet|$(DATADIR)/doc/fleet|' \
	  docs/fleet.service > $(DIST)/fleet.service

install: dist-extras
	install -D -m 0755 $(FLEET_BIN) $(DESTDIR)$(BINDIR)/fleet
	install -D -m 0644 $(DIST)/completions/fleet $(DESTDIR)$(DATADIR)/bash-completion/completions/fleet
	install -D -m 0644 $(DIST)/completions/_fleet $(DESTDIR)$(DATADIR)/zsh/site-functions/_fleet
	install -D -m 0644 $(DIST)/completions/fleet.fish $(DESTDIR)$(DATADIR)/fish/vendor_completions.d/fleet.fish
	install -d $(DESTDIR)$(DATADIR)/man/man1
	install -m 0644 $(DIST)/man/*.1.gz $(DESTDIR)$(DATADIR)/man/man1/
	install -D -m 0644 $(DIST)/fleet.service $(DESTDIR)$(UNITDIR)/fleet.service
	install -D -m 0644 README.md $(DESTDIR)$(DATADIR)/doc/fleet/README.md
	@if [ -z "$(DESTDIR)" ] && [ "$$(id -u)" = 0 ] && ! getent passwd fleet >/dev/null; then \
	  useradd --system --user-group --home-dir /nonexistent --no-create-home --shell /usr/sbin/nologin fleet && \
	  echo "created the system user fleet"; fi
	@if [ -z "$(DESTDIR)" ] && [ "$$(id -u)" = 0 ] && getent group libvirt >/dev/null; then usermod -a -G libvirt fleet; fi

uninstall:
	rm -f $(DESTDIR)$(BINDIR)/fleet $(DESTDIR)$(DATADIR)/bash-completion/completions/fleet \
	  $(DESTDIR)$(DATADIR)/zsh/site-functions/_fleet $(DESTDIR)$(DATADIR)/fish/vendor_completions.d/fleet.fish \
	  $(DESTDIR)$(DATADIR)/man/man1/fleet.1.gz $(DESTDIR)$(DATADIR)/man/man1/fleet-*.1.gz \
	  $(DESTDIR)$(UNITDIR)/fleet.service $(DESTDIR)$(DATADIR)/doc/fleet/README.md
	-rmdir $(DESTDIR)$(DATADIR)/doc/fleet 2>/dev/null

# The Debian package, in target/debian/. cargo-deb is installed (with cargo) when missing.
deb:
	@command -v cargo-deb >/dev/null || $(CARGO) install --locked cargo-deb
	$(MAKE) --no-print-directory dist-extras PREFIX=/usr
	$(CARGO) deb -p fleet --no-build

# The package on this machine: make install into a staging root, the .deb built, checked
# (lintian-free essentials: files, unit, user), installed, started without systemd, and
# removed leaving nothing behind.
test-package: deb
	reconciler/debian/test-package.sh

# Installs the Debian packages fleet and its tests need, when one is missing, then checks that
# every command they provide is really there. qemu-utils is pinned to qemu-system-x86's
# version: a newer qemu-utils (from backports) breaks qemu-system-common, and apt would rather
# remove it than pick matching versions.
deps:
	@missing=$$(for p in $(DEB_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	absent=$$(for c in $(DEB_COMMANDS); do command -v $$c >/dev/null || echo $$c; done); \
	if [ -n "$$missing$$absent" ]; then \
	  echo "installing:" $$missing $$absent; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get update -qq || exit 1; \
	  qemu=$$(apt-cache policy qemu-system-x86 | awk '/Candidate:/ {print $$2}'); \
	  pkgs=$$(echo $(DEB_PACKAGES) | sed "s/qemu-system-x86/qemu-system-x86=$$qemu/; s/qemu-utils/qemu-utils=$$qemu/"); \
	  apt-get install -y -qq --no-install-recommends --allow-downgrades $$pkgs || exit 1; \
	fi
	@command -v promtool >/dev/null || $(MAKE) --no-print-directory promtool
	@absent=$$(for c in $(DEB_COMMANDS); do command -v $$c >/dev/null || echo $$c; done); \
	if [ -n "$$absent" ]; then \
	  echo "make deps: still missing after installing:" $$absent >&2; \
	  echo "  reinstall the package that provides each (apt-get install --reinstall PACKAGE)" >&2; \
	  exit 1; \
	fi

# promtool (the metrics and alert-rule checker the tests run), taken out of Debian's
# prometheus package: installing the package would also install and start a Prometheus.
promtool:
	@tmp=$$(mktemp -d) && chmod 0755 $$tmp && cd $$tmp && \
	  { apt-get download prometheus >/dev/null 2>&1 || { apt-get update -qq && apt-get download prometheus; }; } && \
	  dpkg-deb --fsys-tarfile prometheus_*.deb | tar -xO ./usr/bin/promtool > /usr/local/bin/promtool && \
	  chmod 0755 /usr/local/bin/promtool && cd / && rm -rf $$tmp
	@promtool --version | head -1

# Starts virtlogd and libvirtd when they are not running (no systemd needed).
libvirtd:
	@pgrep -x virtlogd >/dev/null || virtlogd -d
	@pgrep -x libvirtd >/dev/null || libvirtd -d
	@for i in $$(seq 1 50); do virsh -c qemu:///system version >/dev/null 2>&1 && exit 0; sleep 0.2; done; \
	  echo "libvirtd did not answer on qemu:///system" >&2; exit 1

# The guest agent, linked statically (the micro image has no C library).
AGENT_BIN := $(TARGET_DIR)/x86_64-unknown-linux-gnu/release/fleet-agent
agent:
	RUSTFLAGS="-C target-feature=+crt-static" $(CARGO) build --release -p fleet-agent --target x86_64-unknown-linux-gnu
	mkdir -p build && strip -o build/fleet-agent $(AGENT_BIN)

image: agent
	FLEET_AGENT_BIN=$(CURDIR)/build/fleet-agent guest-agent/image/build-micro.sh $(IMAGE_DIR)

# A full Debian 12 image (systemd, Debian's cloud-init, fleet-agent as a service) where real
# cloud-init runs the whole seed; slower to build and boot than the micro image. Needs root
# and a Debian mirror. Use it as an image with disk, kernel, initrd and cmdline: root=/dev/vda rw.
image-debian: agent
	@command -v mmdebstrap >/dev/null || (export DEBIAN_FRONTEND=noninteractive; apt-get update -qq && apt-get install -y -qq --no-install-recommends mmdebstrap e2fsprogs qemu-utils)
	FLEET_AGENT_BIN=$(CURDIR)/build/fleet-agent guest-agent/image/build-debian.sh build/image-debian

# The agent image: image-debian plus git, curl, ripgrep, Node.js and the real agent CLIs
# from the npm registry, pinned (bump these to change what agents run). About 1.2 GB.
CLAUDE_CODE_VERSION ?= 2.1.332
CODEX_VERSION ?= 0.171.0
image-agent: agent
	@command -v mmdebstrap >/dev/null || (export DEBIAN_FRONTEND=noninteractive; apt-get update -qq && apt-get install -y -qq --no-install-recommends mmdebstrap e2fsprogs qemu-utils)
	@command -v npm >/dev/null || (export DEBIAN_FRONTEND=noninteractive; apt-get update -qq && apt-get install -y -qq --no-install-recommends npm)
	FLEET_AGENT_BIN=$(CURDIR)/build/fleet-agent FLEET_DEBIAN_DISK_SIZE=4G \
	  FLEET_AGENT_CLIS="@anthropic-ai/claude-code@$(CLAUDE_CODE_VERSION) @openai/codex@$(CODEX_VERSION)" \
	  guest-agent/image/build-debian.sh build/image-agent

# The example's host: the micro image under the host's image root, and the example host
# configuration as /etc/fleet/host.yaml unless the host already has one (it is the host
# administrator's file; an existing one is never overwritten).
HOST_CONFIG ?= /etc/fleet/host.yaml
IMAGE_ROOT := /var/lib/fleet/images
install-example: image
	install -d -m 0755 $(IMAGE_ROOT)/micro
	install -m 0644 $(IMAGE_DIR)/vmlinuz $(IMAGE_DIR)/initrd.img $(IMAGE_ROOT)/micro/
	@if [ -e $(HOST_CONFIG) ]; then echo "keeping the existing $(HOST_CONFIG)"; \
	  else install -D -m 0644 docs/host.example.yaml $(HOST_CONFIG) && echo "installed $(HOST_CONFIG)"; fi

run: deps libvirtd build install-example
	FLEET_HOST_CONFIG=$(HOST_CONFIG) $(TARGET_DIR)/release/fleet apply --auto-approve
	FLEET_HOST_CONFIG=$(HOST_CONFIG) $(TARGET_DIR)/release/fleet status
	@# Each guest says so on its serial console once it reaches userspace (seconds under TCG).
	@for i in $$(seq 1 60); do \
	  n=$$(cat /var/lib/fleet/storage/example/*/console.log 2>/dev/null | grep -c 'userspace reached'); \
	  [ "$$n" -ge 3 ] && break; sleep 1; \
	done; grep -h 'userspace reached' /var/lib/fleet/storage/example/*/console.log || true

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

unit:
	$(CARGO) test --workspace --lib

test: lint image fakepve
	FLEET_TEST_LIBVIRT=$${FLEET_TEST_LIBVIRT:-1} FLEET_TEST_PROXMOX=$${FLEET_TEST_PROXMOX:-1} \
	  $(CARGO) test --workspace

# The real coding agent end to end: Claude Code from the agent image, in a VM under TCG,
# against a scripted model API on loopback (`make test` skips it without the image).
test-agent: image-agent libvirtd
	FLEET_TEST_LIBVIRT=1 FLEET_TEST_AGENT=1 $(CARGO) test -p fleet --test it real_agent

# Where a real agent's time goes: commit to dispatch, dispatch to its first API request,
# its exit to the pushed branch (the real Claude Code in a VM booted from the agent image).
bench-agent: image-agent libvirtd
	FLEET_TEST_LIBVIRT=1 FLEET_TEST_AGENT=1 $(CARGO) test -p fleet --test it real_agent::bench -- --ignored --nocapture

# A fresh run's commit-to-success with a warm member ready and with none, side by side.
bench-fresh: image libvirtd
	FLEET_TEST_LIBVIRT=1 $(CARGO) test -p fleet --test it fresh::bench -- --ignored --nocapture

# fakepve (PyPI), the fake Proxmox VE API the Proxmox tests run against, in a venv.
FAKEPVE_VENV := target/fakepve-venv
FAKEPVE_VERSION := 0.5.0
fakepve:
	@if ! $(FAKEPVE_VENV)/bin/python -c 'import fakepve, cryptography' 2>/dev/null; then \
	  python3 -m venv $(FAKEPVE_VENV) && \
	  $(FAKEPVE_VENV)/bin/pip install -q 'fakepve[crypto]==$(FAKEPVE_VERSION)'; \
	fi

# SIGKILL fleet (or libvirtd) at random points of applies over 20 VMs, and of applies that
# move workspaces between VMs; recover, and count duplicates (VMs, or workspaces attached
# twice), orphans, workspaces lost and converged trials. CI runs 10; run 100 or more before
# a release.
TRIALS ?= 10
crash-test: image libvirtd
	$(CARGO) build -p fleet -p fleet-tools --bins
	$(TARGET_DIR)/debug/fleet-crash --trials $(TRIALS)

# The same on the fake Proxmox cluster: SIGKILL fleet apply mid-apply, recover, check for
# duplicates, orphaned snippets, locks left and convergence.
crash-test-proxmox: image fakepve
	FLEET_TEST_PROXMOX=1 FLEET_CRASH_TRIALS=$(TRIALS) $(CARGO) test -p fleet --test it \
	  proxmox::a_killed_apply_on_proxmox_leaves_no_duplicate_and_no_orphan -- --nocapture

# Generated hostile input for the loader and the answer checks, far longer than the 256
# cases per property that `make test` runs.
FUZZ_CASES ?= 20000
fuzz:
	FLEET_FUZZ_CASES=$(FUZZ_CASES) $(CARGO) test --release -p fleet --test it fuzz

bench: image libvirtd
	$(CARGO) build --release -p fleet -p fleet-tools
	$(TARGET_DIR)/release/fleet-bench --libvirt --daemon --egress --results --source --upload --two-hosts

clean:
	rm -rf build target .fleet
