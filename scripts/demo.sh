#!/usr/bin/env bash
# kiln's main job, end to end, on a fresh Debian/Ubuntu machine (as root):
#   1. installs what it needs (scripts/setup.sh) and builds kiln;
#   2. makes a real Debian image on the spot (debootstrap + Debian's kernel, as an OCI layout);
#   3. builds a boot bundle from it with `kiln build` (twice: the second answers from the store);
#   4. boots the bundle in QEMU (TCG) until the image's own /sbin/init prints its marker;
#   5. prints where everything is.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '\n== %s\n' "$*"; }

say "installing what the demo needs"
scripts/setup.sh
say "building kiln"
cargo build --release --quiet
KILN=$PWD/target/release/kiln

say "making a Debian image (debootstrap --variant=minbase, cached after the first run)"
FIX=$(scripts/fixtures/debian.sh | tail -n1)
OCI=$FIX/oci
STORE=${KILN_STORE:-/var/tmp/kiln-demo/store}
mkdir -p "$STORE"

say "kiln build --from oci:$OCI:latest --name debian"
BUNDLE=$("$KILN" build --store "$STORE" --from "oci:$OCI:latest" --name debian \
	--cmdline "console=ttyS0 panic=-1")
start=$(date +%s.%N)
again=$("$KILN" build --quiet --store "$STORE" --from "oci:$OCI:latest" --name debian \
	--cmdline "console=ttyS0 panic=-1")
printf 'second build (same inputs, from the store): %.2fs, same path: %s\n' \
	"$(echo "$(date +%s.%N) - $start" | bc)" "$([ "$again" = "$BUNDLE" ] && echo yes || echo NO)"
ls -l "$BUNDLE"

say "booting the bundle in QEMU (TCG; about 20-60 s)"
LOG=$(mktemp /tmp/kiln-demo-console.XXXXXX)
cat "$BUNDLE/initramfs" "$BUNDLE/image" >"$LOG.initrd"
timeout 300 qemu-system-x86_64 -accel tcg -cpu max -machine pc -m 3072 -nodefaults -no-user-config \
	-display none -no-reboot -serial "file:$LOG" -kernel "$BUNDLE/kernel" -initrd "$LOG.initrd" \
	-append "console=ttyS0 panic=-1" &
qemu=$!
for _ in $(seq 600); do
	grep -q KILN-DEBIAN-BOOTED "$LOG" 2>/dev/null && break
	kill -0 $qemu 2>/dev/null || break
	sleep 0.5
done
kill $qemu 2>/dev/null || true
wait $qemu 2>/dev/null || true
rm -f "$LOG.initrd"
if grep -q KILN-DEBIAN-BOOTED "$LOG"; then
	grep -a -E 'kiln: starting|KILN-DEBIAN-BOOTED' -A1 "$LOG" | head -n 5
	echo "the node reached the image's own /sbin/init"
else
	tail -n 30 "$LOG"
	echo "the node did not boot; console log: $LOG" >&2
	exit 1
fi

say "where everything is"
echo "kiln binary:     $KILN"
echo "source image:    $OCI"
echo "store:           $STORE"
echo "bundle:          $BUNDLE"
echo "console log:     $LOG"
"$KILN" store ls --store "$STORE"
