#!/usr/bin/env bash
# Benchmark: turning the realistic Debian image (scripts/fixtures/debian.sh) into a boot image,
# with kiln and with the pipeline a Warewulf user runs today, side by side in one run:
#
#   kiln build --from oci:DIR:latest                       (zstd -3, and gzip -6)
#   kiln build --boot two-stage                            (the squashfs image, zstd -3)
#   umoci unpack + find | sort | cpio -o -H newc --reproducible | zstd -T0 -3
#   umoci unpack + find | sort | cpio -o -H newc --reproducible | pigz -6
#
# and the same image squashed into one layer (scripts/fixtures/debian-single.sh, what
# `podman build --squash` or umoci give), which kiln writes while the layer streams:
#
#   kiln build (zstd -3), the same with KILN_NO_STREAM=1 (the layer read whole before the image is
#   written, as kiln did before streaming), kiln build --boot two-stage, the umoci pipeline, and
#   `zstd -T0 -3` alone on the finished cpio (the floor: compressing what kiln must compress, with
#   nothing to read or merge)
#
# Every run starts from an empty store / empty unpack directory, with the page cache warm
# (the layout is read once before timing). Prints wall time, peak RSS, output size and ratios;
# each figure is the median of RUNS runs (default 3).
#
#   scripts/bench/build.sh            # RUNS=5 scripts/bench/build.sh for more
set -euo pipefail
cd "$(dirname "$0")/../.."

RUNS=${RUNS:-3}
scripts/setup.sh >/dev/null
cargo build --release --quiet
KILN=$PWD/target/release/kiln
KILN_NODE=$(scripts/build-node.sh)
export KILN_NODE
FIX=$(scripts/fixtures/debian.sh | tail -n1)
OCI=$FIX/oci
ONE=$(scripts/fixtures/debian-single.sh | tail -n1)/oci
WORK=$(mktemp -d /var/tmp/kiln-bench.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
cat "$OCI"/blobs/sha256/* "$ONE"/blobs/sha256/* >/dev/null # warm the page cache for everyone alike

# run NAME OUTPUT-FILE COMMAND...: times one run, appends "secs kib bytes" to $WORK/NAME.
run() {
	local name=$1 out=$2
	shift 2
	/usr/bin/time -f '%e %M' -o "$WORK/time" "$@" >/dev/null
	echo "$(cat "$WORK/time") $(stat -c %s "$out")" >>"$WORK/$name"
}

median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
col() { cut -d' ' -f"$2" "$WORK/$1" | median; }

# kiln_run NAME IMAGE-OCI EXTRA-ARGS...: one kiln build into an empty store, its image copied out.
kiln_run() {
	local name=$1 oci=$2
	shift 2
	rm -rf "$WORK/store"
	run "$name" "$WORK/$name.out" bash -c "
		p=\$('$KILN' build --quiet --store '$WORK/store' --from 'oci:$oci:latest' --name bench $*)
		cp --reflink=auto \"\$p/image\" '$WORK/$name.out'"
	rm -rf "$WORK/store"
}

# pipe_run NAME IMAGE-OCI COMPRESSOR: umoci unpack, then find | sort | cpio | COMPRESSOR.
pipe_run() {
	local name=$1 oci=$2 comp=$3
	rm -rf "$WORK/unpack"
	run "$name" "$WORK/$name.out" bash -c "
		umoci unpack --image '$oci:latest' '$WORK/unpack' >/dev/null 2>&1
		cd '$WORK/unpack/rootfs' && find . | LC_ALL=C sort | cpio -o -H newc --reproducible --quiet | $comp >'$WORK/$name.out'"
	rm -rf "$WORK/unpack"
}

for i in $(seq "$RUNS"); do
	kiln_run kiln-zstd "$OCI" --level 3
	kiln_run kiln-gzip "$OCI" --compression gzip --level 6
	kiln_run kiln-2s "$OCI" --level 3 --boot two-stage
	pipe_run pipe-zstd "$OCI" "zstd -T0 -3 -q"
	pipe_run pipe-pigz "$OCI" "pigz -6"
	kiln_run one-kiln-zstd "$ONE" --level 3
	KILN_NO_STREAM=1 kiln_run one-kiln-whole "$ONE" --level 3
	kiln_run one-kiln-2s "$ONE" --level 3 --boot two-stage
	pipe_run one-pipe-zstd "$ONE" "zstd -T0 -3 -q"
	zstd -dc "$WORK/one-kiln-zstd.out" >"$WORK/one.cpio"
	run one-zstd-alone "$WORK/one-zstd-alone.out" zstd -T0 -3 -q -f "$WORK/one.cpio" -o "$WORK/one-zstd-alone.out"
	rm -f "$WORK/one.cpio"
done

printf '\nimage: %s (%s entries, 2 layers) and %s (1 layer), %d runs, %s cores, load average before: %s\n' \
	"$OCI" "$(zstd -dc "$WORK/kiln-zstd.out" | cpio -t --quiet | wc -l)" "$ONE" "$RUNS" "$(nproc)" \
	"$(cut -d' ' -f1-3 /proc/loadavg)"
printf '%-44s %9s %12s %12s\n' "pipeline" "wall s" "peak MiB" "output MiB"
for n in kiln-zstd pipe-zstd kiln-gzip pipe-pigz kiln-2s one-kiln-zstd one-kiln-whole one-pipe-zstd one-zstd-alone \
	one-kiln-2s; do
	case $n in
	kiln-zstd) label="kiln build (zstd -3)" ;;
	pipe-zstd) label="umoci+cpio+zstd -T0 -3" ;;
	kiln-gzip) label="kiln build (gzip -6)" ;;
	pipe-pigz) label="umoci+cpio+pigz -6" ;;
	kiln-2s) label="kiln build --boot two-stage (squashfs)" ;;
	one-kiln-zstd) label="1 layer: kiln build (zstd -3)" ;;
	one-kiln-whole) label="1 layer: kiln, layer read whole first" ;;
	one-pipe-zstd) label="1 layer: umoci+cpio+zstd -T0 -3" ;;
	one-zstd-alone) label="1 layer: zstd -T0 -3 of the finished cpio" ;;
	one-kiln-2s) label="1 layer: kiln build --boot two-stage" ;;
	esac
	printf '%-44s %9.2f %12.1f %12.1f\n' "$label" "$(col $n 1)" "$(echo "$(col $n 2) / 1024" | bc -l)" \
		"$(echo "$(col $n 3) / 1048576" | bc -l)"
done
ratio() { echo "scale=2; $1 / $2" | bc -l; }
echo
echo "speed-up, zstd:          $(ratio "$(col pipe-zstd 1)" "$(col kiln-zstd 1)")x   (pipeline time / kiln time)"
echo "speed-up, gzip:          $(ratio "$(col pipe-pigz 1)" "$(col kiln-gzip 1)")x   (pigz pipeline time / kiln gzip time)"
echo "speed-up, 1 layer:       $(ratio "$(col one-pipe-zstd 1)" "$(col one-kiln-zstd 1)")x   (target: at least 4x)"
echo "streaming, 1 layer:      $(ratio "$(col one-kiln-whole 1)" "$(col one-kiln-zstd 1)")x   (layer read whole first, as before / streamed)"
echo "1 layer vs zstd alone:   $(ratio "$(col one-kiln-zstd 1)" "$(col one-zstd-alone 1)")x   (kiln time / zstd time; target: at most 1.5x)"
echo "two-stage vs initrd:     $(ratio "$(col kiln-2s 1)" "$(col kiln-zstd 1)")x (2 layers), $(ratio "$(col one-kiln-2s 1)" "$(col one-kiln-zstd 1)")x (1 layer)   (time)"
echo "size, zstd:              $(ratio "$(col kiln-zstd 3)" "$(col pipe-zstd 3)")   (kiln output / pipeline output)"
echo "size, gzip:              $(ratio "$(col kiln-gzip 3)" "$(col pipe-pigz 3)")   (kiln output / pigz output)"
echo "size, two-stage:         $(ratio "$(col kiln-2s 3)" "$(col kiln-zstd 3)")   (squashfs / cpio.zst)"
echo "kiln peak memory:        $(echo "$(col kiln-zstd 2) / 1024" | bc) MiB, 1 layer $(echo "$(col one-kiln-zstd 2) / 1024" | bc) MiB, two-stage $(echo "$(col one-kiln-2s 2) / 1024" | bc) MiB (target: under 256 MiB)"
