#!/usr/bin/env bash
# setup.sh — install every Debian package that kiln's tests and benchmarks
# need (OCI tooling, compressors, QEMU + firmware, debootstrap, fixtures
# toolchain, BMC emulators), and sushy-tools from PyPI in a venv. Idempotent: only
# missing packages are installed, and `apt-get update` runs at most once, only when
# something must be installed or dpkg has just learnt the arm64 architecture (the
# arm64 fixtures download Debian's arm64 kernel and busybox-static packages;
# nothing arm64 is installed).
# Must run as root (or via sudo) on Debian 12 (bookworm).
set -euo pipefail

# Keep this list in one place; add packages here.
PACKAGES=(
	skopeo
	umoci
	cpio
	zstd
	pigz
	gzip
	qemu-system-x86
	qemu-system-arm
	qemu-efi-aarch64
	ovmf
	seabios
	ipxe-qemu
	debootstrap
	busybox-static
	docker-registry
	nix-bin
	time
	curl
	ca-certificates
	xz-utils
	iproute2
	python3
	gcc
	make
	perl
	liblzma-dev
	gcc-aarch64-linux-gnu
	binutils-aarch64-linux-gnu
	mtools
	bc
	ipxe
	dnsmasq-base
	squashfs-tools
	nginx-light
	tftpd-hpa
	iptables
	procps
	atftp
	git
	xorriso
	isolinux
	syslinux-common
	dosfstools
	systemd-boot-efi
	binutils
	diffoscope-minimal
	fdisk
	e2fsprogs
	ipmitool
	openipmi
	python3-venv
	openssl
	# packaging tests: dpkg-shlibdeps, man, completions, the unit under systemd-nspawn
	dpkg-dev
	man-db
	zsh
	fish
	systemd-container
	# node status tests: promtool and a Prometheus server, headless Chromium, ping
	prometheus
	chromium
	iputils-ping
)

# sushy-tools (PyPI) is the Redfish BMC emulator the power tests drive (its fake driver needs no libvirt). It
# lives in a venv under ~/.cache/kiln (tests/power.rs looks there), pinned, so reruns change nothing.
SUSHY_VERSION=2.2.0
SUSHY_VENV="${KILN_SUSHY_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/kiln/sushy-venv}"
install_sushy_tools() {
	# grep reads everything (no -q): an early exit would kill pip with SIGPIPE and fail the pipeline.
	if "$SUSHY_VENV/bin/pip" show sushy-tools 2>/dev/null | grep -x "Version: $SUSHY_VERSION" >/dev/null; then
		echo "setup: sushy-tools $SUSHY_VERSION already in $SUSHY_VENV"
		return
	fi
	echo "setup: installing sushy-tools $SUSHY_VERSION into $SUSHY_VENV"
	local python=/usr/bin/python3
	[[ -x $python ]] || python=python3
	"$python" -m venv "$SUSHY_VENV"
	"$SUSHY_VENV/bin/pip" install --quiet --disable-pip-version-check "sushy-tools==$SUSHY_VERSION"
}

is_installed() {
	local status
	status=$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null || true)
	[[ "$status" == "install ok installed" ]]
}

SUDO=()
if ((EUID != 0)); then
	SUDO=(sudo)
fi

update=0
if ! dpkg --print-foreign-architectures | grep -qx arm64; then
	echo "setup: adding the arm64 architecture to dpkg (for the arm64 fixtures' packages)"
	"${SUDO[@]}" dpkg --add-architecture arm64
	update=1
fi

missing=()
for pkg in "${PACKAGES[@]}"; do
	if ! is_installed "$pkg"; then
		missing+=("$pkg")
	fi
done

if ((${#missing[@]} == 0)); then
	if ((update)); then
		"${SUDO[@]}" apt-get update
	fi
	echo "setup: all ${#PACKAGES[@]} packages already installed"
	install_sushy_tools
	exit 0
fi

echo "setup: installing: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
"${SUDO[@]}" apt-get update
"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive \
	apt-get install -y --no-install-recommends "${missing[@]}"
install_sushy_tools
echo "setup: done"
