#!/usr/bin/env bash
# kiln's main job, end to end, on a fresh Debian/Ubuntu machine (as root):
#   1. installs what it needs (scripts/setup.sh) and builds kiln;
#   2. makes a real Debian image on the spot (debootstrap + Debian's kernel, as an OCI layout);
#   3. builds a boot bundle from it with `kiln build` (twice: the second answers from the store);
#   4. boots the bundle in QEMU (TCG) until the image's own /sbin/init prints its marker;
#   5. builds an appliance ISO (the Debian image runs kiln serve; a tiny node image is carried),
#      boots it in QEMU, and PXE-boots a diskless node VM from it over a private QEMU link;
#   6. prints where everything is.
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

say "building the appliance ISO (kiln serve on the Debian image, carrying a tiny node image)"
TINY=$(scripts/fixtures/tiny.sh | tail -n1)
SITE=/var/tmp/kiln-demo/site
mkdir -p "$SITE"
cat >"$SITE/kiln.toml" <<TOML
source_date_epoch = 1700000000

[image.appliance]
from = "oci:$OCI:latest"
cmdline = "console=tty0 console=ttyS0,115200"

[image.tiny]
from = "oci:$TINY/oci:latest"

[server]
address = "10.213.9.1/24"
dhcp = "full"

[node.n1]
mac = "52:54:00:09:00:01"
image = "tiny"
ipv4 = "10.213.9.11"

[appliance]
image = "appliance"
TOML
ISO_JSON=$(cd "$SITE" && "$KILN" appliance --store "$STORE" --out "$SITE/site.iso" --json)
echo "$ISO_JSON"

say "booting the appliance (VM A), then a diskless node (VM B) on a private link to it"
ALOG=$(mktemp /tmp/kiln-demo-appliance.XXXXXX)
BLOG=$(mktemp /tmp/kiln-demo-node.XXXXXX)
PORT=$((20000 + RANDOM % 20000))
timeout 900 qemu-system-x86_64 -accel tcg -cpu max -m 3072 -smp 2 -machine pc -nodefaults -no-user-config \
	-display none -no-reboot -serial "file:$ALOG" -netdev "socket,id=n0,listen=127.0.0.1:$PORT" \
	-device virtio-net-pci,netdev=n0,romfile= -drive "file=$SITE/site.iso,format=raw,media=cdrom,readonly=on" &
vm_a=$!
trap 'kill $vm_a ${vm_b:-} 2>/dev/null || true' EXIT
for _ in $(seq 1200); do
	grep -q 'kiln serve: 10.213.9.1/24' "$ALOG" 2>/dev/null && break
	kill -0 $vm_a 2>/dev/null || break
	sleep 0.5
done
grep -a -E '^kiln (appliance|serve):' "$ALOG" | head -n 4
timeout 600 qemu-system-x86_64 -accel tcg -cpu max -m 1024 -machine pc -nodefaults -no-user-config \
	-display none -no-reboot -serial "file:$BLOG" -netdev "socket,id=n0,connect=127.0.0.1:$PORT" \
	-device virtio-net-pci,netdev=n0,mac=52:54:00:09:00:01,bootindex=1 &
vm_b=$!
for _ in $(seq 1200); do
	grep -q KILN-TINY-BOOTED "$BLOG" 2>/dev/null && break
	kill -0 $vm_b 2>/dev/null || break
	sleep 0.5
done
kill $vm_a $vm_b 2>/dev/null || true
if grep -q KILN-TINY-BOOTED "$BLOG"; then
	grep -a -E 'n1 ' "$ALOG" | head -n 6
	echo "the diskless node booted from the appliance"
else
	tail -n 20 "$BLOG"
	echo "the node did not boot from the appliance; logs: $ALOG $BLOG" >&2
	exit 1
fi

say "where everything is"
echo "appliance ISO:   $SITE/site.iso"
echo "appliance log:   $ALOG"
echo "node log:        $BLOG"
echo "kiln binary:     $KILN"
echo "source image:    $OCI"
echo "store:           $STORE"
echo "bundle:          $BUNDLE"
echo "console log:     $LOG"
"$KILN" store ls --store "$STORE"
