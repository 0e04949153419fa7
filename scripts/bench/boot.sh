#!/usr/bin/env bash
# Benchmark: booting a node from kiln serve, the initrd way and the two-stage way, for the realistic Debian
# image (scripts/fixtures/debian.sh, ~530 MB unpacked) and a ~2 GB one (scripts/fixtures/debian-2g.sh).
#
# For each image, one QEMU machine at a time (TCG, SeaBIOS + Debian's iPXE ROM, virtio NIC, MEM MiB of RAM)
# PXE-boots from kiln serve in a network namespace:
#   initrd          kernel + initramfs + image + overlay loaded by iPXE, unpacked by the kernel
#   two-stage RAM   kernel + loader + overlay; the loader fetches the squashfs into RAM and mounts it
#   two-stage disk  the same with disk = "/dev/vda": the first boot installs, the second reuses the disk
# and the image's init (replaced through the node's overlay by one that prints /proc/meminfo) reports.
#
# Figures per boot: seconds from QEMU start to the image's init, QEMU's peak RSS (every page the guest
# touched, the node's peak memory, plus QEMU's own ~100 MB), and what the guest uses when its init starts
# (MemTotal - MemAvailable). Median of RUNS boots (default 1; TCG boots take minutes).
#
#   scripts/bench/boot.sh                  # IMAGES="debian" or MEM=8192 to change
set -euo pipefail
cd "$(dirname "$0")/../.."

RUNS=${RUNS:-1}
IMAGES=${IMAGES:-"debian debian-2g"}
MODES=${MODES:-"initrd two-stage-ram two-stage-disk"}
KEEP=${KEEP:-0}
MEM=${MEM:-6144}
NS=kiln-bench-boot-$$
SUBNET=10.213.11

scripts/setup.sh >/dev/null
cargo build --release --quiet
KILN=$PWD/target/release/kiln
KILN_NODE=$(scripts/build-node.sh)
export KILN_NODE
WORK=$(mktemp -d /var/tmp/kiln-boot-bench.XXXXXX)
SERVE_PID=
cleanup() {
	[[ -n $SERVE_PID ]] && kill "$SERVE_PID" 2>/dev/null && wait "$SERVE_PID" 2>/dev/null
	ip netns del "$NS" 2>/dev/null || true
	if [[ $KEEP == 1 ]]; then echo "boot.sh: work dir kept: $WORK" >&2; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

# One QEMU guest at a time on this machine (other jobs boot theirs too): wait for the others, bounded.
wait_qemu_free() {
	for _ in $(seq 120); do
		pgrep -f qemu-system >/dev/null || return 0
		sleep 10
	done
	echo "boot.sh: another QEMU kept running for 20 minutes; giving up" >&2
	exit 1
}

ip netns add "$NS"
ip -n "$NS" link set lo up
ip -n "$NS" link add br0 type bridge
ip -n "$NS" addr add "$SUBNET.1/24" dev br0
ip -n "$NS" link set br0 up
ip -n "$NS" tuntap add dev tap0 mode tap
ip -n "$NS" link set tap0 master br0
ip -n "$NS" link set tap0 up

# The init the benchmark boots into: the image's own would do, but this one says how much memory is in use.
mkdir -p "$WORK/overlay/usr/sbin"
cat >"$WORK/overlay/usr/sbin/init" <<'INIT'
#!/bin/sh
PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc 2>/dev/null
[ -c /dev/console ] && exec </dev/console >/dev/console 2>&1
echo "KILN-MEM $(grep -E '^(MemTotal|MemAvailable):' /proc/meminfo | tr -s ' ' | tr '\n' ' ')"
echo KILN-BENCH-BOOTED
echo 1 >/proc/sys/kernel/sysrq
echo o >/proc/sysrq-trigger
sleep 60
INIT
chmod 755 "$WORK/overlay/usr/sbin/init"

RESULTS=$WORK/results
: >"$RESULTS"

# boot IMAGE MODE MAC [DISK]: one boot; appends "IMAGE MODE secs peak_mib used_mib" to $RESULTS.
boot() {
	local image=$1 mode=$2 mac=$3 disk=${4:-}
	local console=$WORK/console-$image-$mode-$RANDOM.log
	local sercon=$WORK/sercon
	printf '\xf8\x03' >"$sercon"
	local args=(-accel tcg -cpu max -m "$MEM" -machine pc -nodefaults -no-user-config -display none -no-reboot
		-serial "file:$console" -fw_cfg "name=etc/sercon-port,file=$sercon"
		-netdev tap,id=n0,ifname=tap0,script=no,downscript=no -device "virtio-net-pci,netdev=n0,mac=$mac,bootindex=1")
	if [[ -n $disk ]]; then
		args+=(-drive "file=$disk,format=raw,if=none,id=d0" -device virtio-blk-pci,drive=d0,bootindex=9)
	fi
	wait_qemu_free
	local start
	start=$(date +%s.%N)
	ip netns exec "$NS" qemu-system-x86_64 "${args[@]}" >/dev/null 2>"$WORK/qemu.err" &
	local qpid=$!
	# VmHWM is the process's high-water mark: the most the guest ever had touched. Read while QEMU runs (the
	# init powers the guest off as soon as it has reported, and an exited process has no VmHWM).
	local peak=0 hwm
	while ! grep -q KILN-BENCH-BOOTED "$console" 2>/dev/null; do
		hwm=$(awk '/^VmHWM:/ {print $2}' "/proc/$qpid/status" 2>/dev/null || true)
		[[ -n $hwm ]] && peak=$hwm
		if ! kill -0 "$qpid" 2>/dev/null; then
			if grep -qa "Initramfs unpacking failed" "$console"; then
				echo "boot.sh: $image, $mode: the kernel could not unpack the initrd in $MEM MiB ($(grep -ao \
					'Initramfs unpacking failed.*' "$console" | head -n1)): it went on with part of the image and" \
					"without the overlay; give the guest more memory (MEM=...)" >&2
			fi
			echo "boot.sh: QEMU ended before the init reported ($image, $mode); console:" >&2
			tail -n 40 "$console" >&2
			exit 1
		fi
		if (($(echo "$(date +%s.%N) - $start > 1800" | bc))); then
			echo "boot.sh: no init after 30 minutes ($image, $mode); console:" >&2
			tail -n 40 "$console" >&2
			kill "$qpid"
			exit 1
		fi
		sleep 0.1
	done
	local secs
	secs=$(echo "$(date +%s.%N) - $start" | bc)
	hwm=$(awk '/^VmHWM:/ {print $2}' "/proc/$qpid/status" 2>/dev/null || true)
	[[ -n $hwm ]] && peak=$hwm
	kill "$qpid" 2>/dev/null || true
	wait "$qpid" 2>/dev/null || true
	local used
	used=$(grep -a KILN-MEM "$console" | awk '{for (i = 1; i < NF; i++) {if ($i == "MemTotal:") t = $(i+1); if ($i == "MemAvailable:") a = $(i+1)}} END {print int((t - a) / 1024)}')
	printf '%s %s %.1f %d %d\n' "$image" "$mode" "$secs" "$((peak / 1024))" "$used" | tee -a "$RESULTS"
}

for image in $IMAGES; do
	fix=$(scripts/fixtures/"$image".sh | tail -n1)
	dir=$WORK/$image
	mkdir -p "$dir"
	cat >"$dir/kiln.toml" <<EOF
source_date_epoch = 1700000000

[image.$image]
from = "oci:$fix/oci:latest"
cmdline = "console=ttyS0 panic=-1"
overlay = "$WORK/overlay"

[server]
address = "$SUBNET.1/24"
interface = "br0"
dhcp = "full"

[server.boot_files]
bios = "/usr/lib/ipxe/undionly.kpxe"

[node.initrd]
mac = "52:54:00:be:00:01"
image = "$image"
ipv4 = "$SUBNET.11"

[node.ram]
mac = "52:54:00:be:00:02"
image = "$image"
ipv4 = "$SUBNET.12"
boot = "two-stage"

[node.disk]
mac = "52:54:00:be:00:03"
image = "$image"
ipv4 = "$SUBNET.13"
boot = "two-stage"
disk = "/dev/vda"
EOF
	"$KILN" build --quiet -f "$dir/kiln.toml" --store "$dir/store" >/dev/null
	ip netns exec "$NS" "$KILN" serve -f "$dir/kiln.toml" --store "$dir/store" >"$dir/serve.log" 2>&1 &
	SERVE_PID=$!
	for _ in $(seq 300); do
		ip netns exec "$NS" curl -sf -m 2 "http://$SUBNET.1/healthz" >/dev/null && break
		sleep 0.2
	done
	for _ in $(seq "$RUNS"); do
		[[ " $MODES " == *" initrd "* ]] && boot "$image" initrd 52:54:00:be:00:01
		[[ " $MODES " == *" two-stage-ram "* ]] && boot "$image" two-stage-ram 52:54:00:be:00:02
		if [[ " $MODES " == *" two-stage-disk "* ]]; then
			rm -f "$dir/disk.raw"
			truncate -s 4G "$dir/disk.raw"
			boot "$image" two-stage-disk-install 52:54:00:be:00:03 "$dir/disk.raw"
			boot "$image" two-stage-disk-reuse 52:54:00:be:00:03 "$dir/disk.raw"
		fi
	done
	kill "$SERVE_PID"
	wait "$SERVE_PID" 2>/dev/null || true
	SERVE_PID=
	image_size=$(stat -c %s "$(readlink -f "$dir/store/roots/image-$image")/image")
	squash_size=$(stat -c %s "$(readlink -f "$dir/store/roots/image-$image.two-stage")/image")
	printf '%s: image %d MiB (initrd, cpio.zst), %d MiB (two-stage, squashfs)\n' "$image" \
		"$((image_size >> 20))" "$((squash_size >> 20))" >>"$WORK/sizes"
	rm -rf "$dir/store" "$dir/disk.raw"
done

median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
printf '\n%d boot(s) each, %s MiB guest RAM, TCG on %s cores, load average %s\n' "$RUNS" "$MEM" "$(nproc)" \
	"$(cut -d' ' -f1-3 /proc/loadavg)"
cat "$WORK/sizes"
printf '%-10s %-24s %12s %14s %16s\n' image boot "s to init" "QEMU peak MiB" "used at init MiB"
for image in $IMAGES; do
	for mode in initrd two-stage-ram two-stage-disk-install two-stage-disk-reuse; do
		sel() { awk -v i="$image" -v m="$mode" -v c="$1" '$1 == i && $2 == m {print $c}' "$RESULTS" | median; }
		printf '%-10s %-24s %12s %14s %16s\n' "$image" "$mode" "$(sel 3)" "$(sel 4)" "$(sel 5)"
	done
done
