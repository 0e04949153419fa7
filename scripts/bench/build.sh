#!/usr/bin/env bash
# Benchmark: turning the realistic Debian image (scripts/fixtures/debian.sh) into a boot image,
# with kiln and with the pipeline a Warewulf user runs today, side by side in one run:
#
#   kiln build --from oci:DIR:latest                       (zstd -3, and gzip -6)
#   umoci unpack + find | sort | cpio -o -H newc --reproducible | zstd -T0 -3
#   umoci unpack + find | sort | cpio -o -H newc --reproducible | pigz -6
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
FIX=$(scripts/fixtures/debian.sh | tail -n1)
OCI=$FIX/oci
WORK=$(mktemp -d /var/tmp/kiln-bench.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
cat "$OCI"/blobs/sha256/* >/dev/null # warm the page cache for everyone alike

# run NAME OUTPUT-FILE COMMAND...: times one run, appends "secs kib bytes" to $WORK/NAME.
run() {
	local name=$1 out=$2
	shift 2
	/usr/bin/time -f '%e %M' -o "$WORK/time" "$@" >/dev/null
	echo "$(cat "$WORK/time") $(stat -c %s "$out")" >>"$WORK/$name"
}

median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
col() { cut -d' ' -f"$2" "$WORK/$1" | median; }

for i in $(seq "$RUNS"); do
	rm -rf "$WORK/store" "$WORK/unpack" "$WORK"/*.out
	run kiln-zstd "$WORK/kiln-zstd.out" bash -c "
		p=\$('$KILN' build --quiet --store '$WORK/store' --from 'oci:$OCI:latest' --name bench --level 3)
		cp --reflink=auto \"\$p/image\" '$WORK/kiln-zstd.out'"
	rm -rf "$WORK/store"
	run kiln-gzip "$WORK/kiln-gzip.out" bash -c "
		p=\$('$KILN' build --quiet --store '$WORK/store' --from 'oci:$OCI:latest' --name bench --compression gzip --level 6)
		cp --reflink=auto \"\$p/image\" '$WORK/kiln-gzip.out'"
	rm -rf "$WORK/store"
	run pipe-zstd "$WORK/pipe-zstd.out" bash -c "
		umoci unpack --image '$OCI:latest' '$WORK/unpack' >/dev/null 2>&1
		cd '$WORK/unpack/rootfs' && find . | LC_ALL=C sort | cpio -o -H newc --reproducible --quiet | zstd -T0 -3 -q >'$WORK/pipe-zstd.out'"
	rm -rf "$WORK/unpack"
	run pipe-pigz "$WORK/pipe-pigz.out" bash -c "
		umoci unpack --image '$OCI:latest' '$WORK/unpack' >/dev/null 2>&1
		cd '$WORK/unpack/rootfs' && find . | LC_ALL=C sort | cpio -o -H newc --reproducible --quiet | pigz -6 >'$WORK/pipe-pigz.out'"
	rm -rf "$WORK/unpack"
done

printf '\nimage: %s (%s entries), %d runs, %s cores\n' "$OCI" \
	"$(zstd -dc "$WORK/kiln-zstd.out" | cpio -t --quiet | wc -l)" "$RUNS" "$(nproc)"
printf '%-34s %9s %12s %12s\n' "pipeline" "wall s" "peak MiB" "output MiB"
for n in kiln-zstd pipe-zstd kiln-gzip pipe-pigz; do
	label=$n
	case $n in
	kiln-zstd) label="kiln build (zstd -3)" ;;
	pipe-zstd) label="umoci+cpio+zstd -T0 -3" ;;
	kiln-gzip) label="kiln build (gzip -6)" ;;
	pipe-pigz) label="umoci+cpio+pigz -6" ;;
	esac
	printf '%-34s %9.2f %12.1f %12.1f\n' "$label" "$(col $n 1)" "$(echo "$(col $n 2) / 1024" | bc -l)" \
		"$(echo "$(col $n 3) / 1048576" | bc -l)"
done
ratio() { echo "scale=2; $1 / $2" | bc -l; }
echo
echo "speed-up, zstd: $(ratio "$(col pipe-zstd 1)" "$(col kiln-zstd 1)")x   (pipeline time / kiln time)"
echo "speed-up, gzip: $(ratio "$(col pipe-pigz 1)" "$(col kiln-gzip 1)")x   (pigz pipeline time / kiln gzip time)"
echo "size, zstd:     $(ratio "$(col kiln-zstd 3)" "$(col pipe-zstd 3)")   (kiln output / pipeline output)"
echo "size, gzip:     $(ratio "$(col kiln-gzip 3)" "$(col pipe-pigz 3)")   (kiln output / pigz output)"
echo "kiln peak memory: $(echo "$(col kiln-zstd 2) / 1024" | bc) MiB (target: under 256 MiB)"
