#!/usr/bin/env bash
# package-deb.sh — builds kiln's Debian package with dpkg-deb: kiln, kiln-node (the static binary kiln puts on
# nodes, in /usr/lib/kiln), kiln-serve.service, the user it runs as (sysusers.d) and the store's skeleton
# (tmpfiles.d), a man page per command, bash/zsh/fish completions.
#
#   scripts/package-deb.sh                      # release builds of both (cargo, scripts/build-node.sh)
#   scripts/package-deb.sh --binary PATH --node PATH   # package binaries built already (the tests do)
#   scripts/package-deb.sh --out DIR            # where the .deb goes (default: target/debian)
#
# Prints the .deb's path as its last line. Man pages and completions come from the binary itself
# (`kiln man`, `kiln completions`), so they always match it. Reproducible: the same binary and sources give
# the same bytes; every time stamp is SOURCE_DATE_EPOCH, else the last commit's time.
# Needs dpkg-deb, gzip, and dpkg-shlibdeps (dpkg-dev) for the library dependencies.
set -euo pipefail

log() { printf 'package-deb: %s\n' "$*" >&2; }
die() {
	log "error: $*"
	exit 1
}

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
BINARY=""
NODE="${KILN_NODE:-}"
OUT="$REPO/target/debian"
REVISION=1

while (($#)); do
	case "$1" in
	--binary)
		BINARY=${2:?--binary needs a path}
		shift 2
		;;
	--node)
		NODE=${2:?--node needs a path}
		shift 2
		;;
	--out)
		OUT=${2:?--out needs a directory}
		shift 2
		;;
	--revision)
		REVISION=${2:?--revision needs a number}
		shift 2
		;;
	-h | --help)
		sed -n '2,13p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
		exit 0
		;;
	*) die "unknown argument $1 (see --help)" ;;
	esac
done

for tool in dpkg-deb dpkg-shlibdeps gzip md5sum; do
	command -v "$tool" >/dev/null || die "$tool not found: apt-get install dpkg-dev (scripts/setup.sh installs it)"
done

if [[ -z "$BINARY" ]]; then
	log "cargo build --release --locked"
	(cd "$REPO" && cargo build --release --locked)
	BINARY="$REPO/target/release/kiln"
fi
[[ -x "$BINARY" ]] || die "$BINARY is not an executable file"
if [[ -z "$NODE" ]]; then
	log "scripts/build-node.sh (release)"
	NODE=$("$REPO/scripts/build-node.sh" | tail -n 1)
fi
[[ -x "$NODE" ]] || die "$NODE (kiln-node) is not an executable file"
# It runs on nodes whatever their C library: it must not need one.
if ldd "$NODE" 2>&1 | grep -q '=>'; then
	die "$NODE is not a static executable: build it with scripts/build-node.sh"
fi

# The [package] version of Cargo.toml (the first `version =` line, which is the package's).
VERSION=$(sed -n 's/^version = "\([^"]*\)"$/\1/p' "$REPO/Cargo.toml" | head -n 1)
[[ -n "$VERSION" ]] || die "no version = \"...\" line in $REPO/Cargo.toml"
BIN_VERSION=$("$BINARY" --version | awk '{print $2}')
[[ "$BIN_VERSION" == "$VERSION" ]] || die "$BINARY says it is $BIN_VERSION, Cargo.toml says $VERSION: rebuild it"
ARCH=$(dpkg --print-architecture)
if [[ -z "${SOURCE_DATE_EPOCH:-}" ]]; then
	SOURCE_DATE_EPOCH=$(git -C "$REPO" log -1 --format=%ct 2>/dev/null) ||
		die "not a git checkout: set SOURCE_DATE_EPOCH (seconds since 1970) for the package's time stamps"
fi
export SOURCE_DATE_EPOCH
MAINTAINER="${DEBFULLNAME:-kiln developers} <${DEBEMAIL:-kiln@localhost}>"
DEB="$OUT/kiln_${VERSION}-${REVISION}_${ARCH}.deb"

STAGE=$(mktemp -d "${TMPDIR:-/tmp}/kiln-deb.XXXXXX")
trap 'rm -rf "$STAGE"' EXIT
ROOT="$STAGE/root"
mkdir -p "$ROOT/DEBIAN"

# Debian ships binaries without debug sections; symbol names stay for backtraces.
install -D -m 0755 "$BINARY" "$ROOT/usr/bin/kiln"
install -D -m 0755 "$NODE" "$ROOT/usr/lib/kiln/kiln-node"
if command -v strip >/dev/null; then
	strip --strip-debug "$ROOT/usr/bin/kiln" "$ROOT/usr/lib/kiln/kiln-node"
fi
KILN="$ROOT/usr/bin/kiln"

install -D -m 0644 "$REPO/dist/kiln-serve.service" "$ROOT/lib/systemd/system/kiln-serve.service"
install -D -m 0644 "$REPO/dist/kiln.sysusers" "$ROOT/usr/lib/sysusers.d/kiln.conf"
install -D -m 0644 "$REPO/dist/kiln.tmpfiles" "$ROOT/usr/lib/tmpfiles.d/kiln.conf"
install -d -m 0755 "$ROOT/etc/kiln"

mkdir -p "$STAGE/man" "$ROOT/usr/share/man/man1"
"$KILN" man --out-dir "$STAGE/man" >/dev/null
for page in "$STAGE"/man/*.1; do
	gzip -9 -n -c "$page" >"$ROOT/usr/share/man/man1/$(basename "$page").gz"
done
install -d "$ROOT/usr/share/bash-completion/completions" "$ROOT/usr/share/zsh/vendor-completions" \
	"$ROOT/usr/share/fish/vendor_completions.d"
"$KILN" completions bash >"$ROOT/usr/share/bash-completion/completions/kiln"
"$KILN" completions zsh >"$ROOT/usr/share/zsh/vendor-completions/_kiln"
"$KILN" completions fish >"$ROOT/usr/share/fish/vendor_completions.d/kiln.fish"

DOC="$ROOT/usr/share/doc/kiln"
install -d "$DOC"
install -m 0644 "$REPO/dist/copyright" "$DOC/copyright"
install -m 0644 "$REPO/docs/install.md" "$DOC/install.md"
install -m 0644 "$REPO/README.md" "$DOC/README.md"
{
	printf 'kiln (%s-%s) unstable; urgency=medium\n\n' "$VERSION" "$REVISION"
	printf '  * Built from the kiln sources; see /usr/share/doc/kiln/README.md.\n\n'
	printf ' -- %s  %s\n' "$MAINTAINER" "$(date -u -R -d "@$SOURCE_DATE_EPOCH")"
} | gzip -9 -n >"$DOC/changelog.Debian.gz"

# Library dependencies, as dpkg-shlibdeps finds them (it wants to run beside a debian/control).
mkdir -p "$STAGE/shlibs/debian"
printf 'Source: kiln\n\nPackage: kiln\nArchitecture: any\n' >"$STAGE/shlibs/debian/control"
SHLIBS=$(cd "$STAGE/shlibs" && dpkg-shlibdeps -O "$KILN" 2>/dev/null | sed -n 's/^shlibs:Depends=//p')
[[ -n "$SHLIBS" ]] || die "dpkg-shlibdeps found no library dependencies for $KILN"

for script in postinst prerm postrm; do
	install -m 0755 "$REPO/dist/debian/$script" "$ROOT/DEBIAN/$script"
done

# One time stamp and fixed modes, so the archive depends only on the contents.
find "$ROOT" -path "$ROOT/DEBIAN" -prune -o -type d -exec chmod 0755 {} +
find "$ROOT" -path "$ROOT/DEBIAN" -prune -o -type f ! -path "$ROOT/usr/bin/kiln" ! -path "$ROOT/usr/lib/kiln/kiln-node" \
	-exec chmod 0644 {} +
(cd "$ROOT" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | LC_ALL=C sort -z |
	xargs -0 md5sum >DEBIAN/md5sums)
chmod 0644 "$ROOT/DEBIAN/md5sums"
INSTALLED_KB=$(du -sk --apparent-size --exclude=DEBIAN "$ROOT" | cut -f1)

cat >"$ROOT/DEBIAN/control" <<EOF
Package: kiln
Version: ${VERSION}-${REVISION}
Architecture: ${ARCH}
Maintainer: ${MAINTAINER}
Installed-Size: ${INSTALLED_KB}
Depends: ${SHLIBS}, passwd
Recommends: skopeo
Suggests: busybox-static, xorriso, isolinux, syslinux-common, systemd-boot-efi, dosfstools, mtools, binutils, gcc, make, perl, liblzma-dev
Section: admin
Priority: optional
Description: stateless bare-metal provisioning: boot bundles, iPXE, boot server
 kiln turns OCI images into reproducible boot bundles (kernel, initramfs,
 image) in a content-addressed store, builds custom iPXE binaries, and serves
 PXE-booting nodes that run from RAM with DHCP, TFTP and HTTP in one process
 (kiln-serve.service). It also packs the boot server into a bootable ISO.
 .
 skopeo is needed for docker:// sources; the suggested packages are needed
 by kiln appliance (ISO) and kiln build-ipxe.
EOF
chmod 0644 "$ROOT/DEBIAN/control"
find "$ROOT" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +

mkdir -p "$OUT"
dpkg-deb --root-owner-group -Zxz --build "$ROOT" "$DEB" >/dev/null
log "$(du -h "$DEB" | cut -f1) $DEB"
printf '%s\n' "$DEB"
