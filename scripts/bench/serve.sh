#!/usr/bin/env bash
# Benchmark: how fast `kiln serve` hands out boot files, against the servers a site runs today,
# side by side in one run, everything on 127.0.0.1:
#
#   HTTP  a 1 GiB blob (the `image` of a bundle built with compression = "none" from a directory
#         holding a fake kernel and 1 GiB of random bytes), fetched whole by 1, 8 and 64 concurrent
#         clients (one `curl -s -o /dev/null` process each), from kiln (/blob/sha256/HEX) and from
#         nginx (sendfile on; tcp_nopush on; 2 workers; access_log off) serving the very same file.
#         Figure: aggregate throughput = total bytes / wall time from the first curl started to
#         the last one finished. Target: kiln >= nginx.
#   TFTP  a 30 MiB file served as the BIOS boot file (undionly.kpxe), fetched with blksize 1468
#         from kiln and from tftpd-hpa (in.tftpd -L -B 1468), and from kiln with windowsize 16 too
#         (tftpd-hpa has no windowsize). Same client for all: examples/tftp_get.rs (Rust; the Python
#         client of the tests cannot take a window of packets as fast as a server sends them, which
#         capped every windowed figure at the client's speed).
#         Target: kiln with windowsize 16 >= 5x tftpd-hpa.
#
# Every byte count is checked (HTTP 200 and 1 GiB per client; the blob's sha256 once per server
# against the bundle manifest; the sha256 of every TFTP transfer). The page cache is warm: the
# files are read once before timing. Each figure is the median of RUNS runs (default 3); in each
# run the servers take turns, kiln first. Every command is bounded by `timeout`; servers and the
# temporary directory (under /var/tmp, ~2.1 GiB) are removed on exit. Needs root (installs
# packages with scripts/setup.sh) and free loopback ports 18080, 18081, 16969, 16970 (override
# with KILN_HTTP, NGINX_HTTP, KILN_TFTP, HPA_TFTP).
#
#   scripts/bench/serve.sh            # RUNS=5 scripts/bench/serve.sh for more
set -euo pipefail
cd "$(dirname "$0")/../.."

RUNS=${RUNS:-3}
CLIENTS=${CLIENTS-"1 8 64"}
KILN_HTTP=${KILN_HTTP:-18080}
NGINX_HTTP=${NGINX_HTTP:-18081}
KILN_TFTP=${KILN_TFTP:-16969}
HPA_TFTP=${HPA_TFTP:-16970}
HTTP_TIMEOUT=${HTTP_TIMEOUT:-600} # seconds for one round of concurrent downloads
TFTP_TIMEOUT=${TFTP_TIMEOUT:-120} # seconds for one TFTP transfer

scripts/setup.sh >/dev/null
timeout 1800 cargo build --release --quiet --bin kiln --example tftp_get
KILN=$PWD/target/release/kiln
TFTP_CLIENT=$PWD/target/release/examples/tftp_get

WORK=$(mktemp -d /var/tmp/kiln-bench-serve.XXXXXX)
PIDS=()
cleanup() {
	local p
	for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
	for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
	rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
fail() {
	echo "serve.sh: $*" >&2
	exit 1
}

for port in "$KILN_HTTP" "$NGINX_HTTP"; do
	! ss -Htln "sport = :$port" | grep -q . || fail "TCP port $port is in use"
done
for port in "$KILN_TFTP" "$HPA_TFTP"; do
	! ss -Huln "sport = :$port" | grep -q . || fail "UDP port $port is in use"
done

# --- fixtures -----------------------------------------------------------------------------------
chmod 755 "$WORK" # nginx workers and in.tftpd run as nobody
mkdir -p "$WORK/rootfs/boot" "$WORK/rootfs/data" "$WORK/tftp" "$WORK/www/blob/sha256" "$WORK/nginx"
# A fake bzImage: 4 KiB of zeros with the "HdrS" magic at 0x202, enough for kernel = "auto".
head -c 4096 /dev/zero >"$WORK/rootfs/boot/vmlinuz-1.0"
printf 'HdrS' | dd of="$WORK/rootfs/boot/vmlinuz-1.0" bs=1 seek=$((0x202)) conv=notrunc status=none
head -c 1G /dev/urandom >"$WORK/rootfs/data/random.bin"
head -c 30M /dev/urandom >"$WORK/tftp/undionly.kpxe"
chmod 644 "$WORK/tftp/undionly.kpxe"
TFTP_SHA=$(sha256sum "$WORK/tftp/undionly.kpxe" | cut -d' ' -f1)
TFTP_SIZE=$(stat -c %s "$WORK/tftp/undionly.kpxe")

cat >"$WORK/kiln.toml" <<EOF
source_date_epoch = 1700000000

[image.bench]
from = "dir:$WORK/rootfs"
kernel = "auto"
compression = "none"

[server]
address = "127.0.0.1/8"
dhcp = "off"
unknown = "boot:bench"

[server.boot_files]
bios = "$WORK/tftp/undionly.kpxe"
EOF
BUNDLE=$(timeout 600 "$KILN" build --quiet -f "$WORK/kiln.toml" --store "$WORK/store" | tail -n1)
rm -f "$WORK/rootfs/data/random.bin" # the bundle's image holds it now
BLOB=$BUNDLE/image
HEX=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["files"]["image"]["sha256"])' \
	"$BUNDLE/manifest.json")
BLOB_SIZE=$(stat -c %s "$BLOB")
ln -s "$BLOB" "$WORK/www/blob/sha256/$HEX"

cat >"$WORK/nginx/nginx.conf" <<EOF
worker_processes 2;
daemon off;
pid $WORK/nginx/nginx.pid;
error_log $WORK/nginx/error.log;
events { worker_connections 1024; }
http {
	sendfile on;
	tcp_nopush on;
	access_log off;
	default_type application/octet-stream;
	client_body_temp_path $WORK/nginx/body;
	server {
		listen 127.0.0.1:$NGINX_HTTP;
		root $WORK/www;
	}
}
EOF

# --- servers ------------------------------------------------------------------------------------
"$KILN" serve -f "$WORK/kiln.toml" --store "$WORK/store" --state-dir "$WORK/state" \
	--http-port "$KILN_HTTP" --tftp-port "$KILN_TFTP" --dhcp off >"$WORK/kiln.log" 2>&1 &
PIDS+=($!)
nginx -c "$WORK/nginx/nginx.conf" >"$WORK/nginx/stdout.log" 2>&1 &
PIDS+=($!)
in.tftpd -L -4 -a "127.0.0.1:$HPA_TFTP" -B 1468 -s "$WORK/tftp" >"$WORK/tftpd.log" 2>&1 &
PIDS+=($!)

KILN_URL=http://127.0.0.1:$KILN_HTTP/blob/sha256/$HEX
NGINX_URL=http://127.0.0.1:$NGINX_HTTP/blob/sha256/$HEX
for i in $(seq 100); do
	if curl -sf -o /dev/null "http://127.0.0.1:$KILN_HTTP/healthz" &&
		curl -sf -o /dev/null -I "$NGINX_URL" && ss -Huln "sport = :$HPA_TFTP" | grep -q .; then
		break
	fi
	((i < 100)) || fail "servers did not start; kiln: $(cat "$WORK/kiln.log"); nginx: $(cat "$WORK/nginx/error.log" 2>/dev/null)"
	sleep 0.1
done

# Right bytes from both HTTP servers, and a warm page cache for everyone alike.
for url in "$KILN_URL" "$NGINX_URL"; do
	got=$(timeout 120 curl -sf "$url" | sha256sum | cut -d' ' -f1)
	[[ $got == "$HEX" ]] || fail "$url: sha256 $got, expected $HEX"
done
cat "$WORK/tftp/undionly.kpxe" >/dev/null

LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)

# --- measurements -------------------------------------------------------------------------------
# http NAME URL N: N concurrent whole downloads; appends MiB/s to $WORK/NAME-N.
http() {
	local name=$1 url=$2 n=$3 i pids=() start end bad=0
	rm -f "$WORK"/curl.*
	start=$(date +%s.%N)
	for i in $(seq "$n"); do
		timeout "$HTTP_TIMEOUT" curl -s -o /dev/null -w '%{http_code} %{size_download}\n' "$url" >"$WORK/curl.$i" &
		pids+=($!)
	done
	for i in "${pids[@]}"; do wait "$i" || bad=1; done
	end=$(date +%s.%N)
	((bad == 0)) || fail "$name, $n clients: a curl failed or timed out: $(cat "$WORK"/curl.* | sort | uniq -c)"
	for i in $(seq "$n"); do
		[[ $(cat "$WORK/curl.$i") == "200 $BLOB_SIZE" ]] ||
			fail "$name, $n clients: client $i got '$(cat "$WORK/curl.$i")', expected '200 $BLOB_SIZE'"
	done
	echo "$n * $BLOB_SIZE / ($end - $start) / 1048576" | bc -l >>"$WORK/$name-$n"
}

# tftp NAME PORT CLIENT-OPTIONS...: one transfer of undionly.kpxe; appends MiB/s to $WORK/NAME.
tftp() {
	local name=$1 port=$2 out
	shift 2
	out=$(timeout "$TFTP_TIMEOUT" "$TFTP_CLIENT" 127.0.0.1 "$port" undionly.kpxe "$@") ||
		fail "$name: transfer failed: $out"
	python3 - "$out" "$TFTP_SIZE" "$TFTP_SHA" "$name" >>"$WORK/$name" <<'EOF'
import json, sys
r, size, sha, name = json.loads(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
if not r["ok"] or r["bytes"] != size or r["sha256"] != sha:
    sys.exit(f"serve.sh: {name}: wrong transfer: {sys.argv[1]}")
print(r["bytes"] / r["secs"] / 1048576)
EOF
	echo "$out" >>"$WORK/$name.json"
}

for run in $(seq "$RUNS"); do
	echo "run $run/$RUNS" >&2
	for n in $CLIENTS; do
		http kiln "$KILN_URL" "$n"
		http nginx "$NGINX_URL" "$n"
	done
	tftp kiln-tftp "$KILN_TFTP" --blksize 1468
	tftp kiln-tftp-ws16 "$KILN_TFTP" --blksize 1468 --windowsize 16
	tftp hpa-tftp "$HPA_TFTP" --blksize 1468
done

# --- report -------------------------------------------------------------------------------------
median() { sort -g "$1" | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
range() { sort -g "$1" | awk -v f="$2" 'NR==1 {lo=$1} {hi=$1} END {printf f "-" f, lo, hi}'; }
ratio() { printf '%.2f' "$(echo "$1 / $2" | bc -l)"; }

printf '\n%s cores (%s), loopback, %d runs (median, min-max); HTTP blob %d bytes, TFTP file %d bytes\n' \
	"$(nproc)" "$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')" "$RUNS" \
	"$BLOB_SIZE" "$TFTP_SIZE"
echo "load average before: $LOAD_BEFORE; after: $(cut -d' ' -f1-3 /proc/loadavg)"
printf '\n%-24s %20s %20s %13s\n' "HTTP, 1 GiB blob" "kiln MiB/s" "nginx MiB/s" "kiln / nginx"
for n in $CLIENTS; do
	k=$(median "$WORK/kiln-$n")
	g=$(median "$WORK/nginx-$n")
	printf '%-24s %6.0f %13s %6.0f %13s %13s\n' "$n concurrent client(s)" "$k" "($(range "$WORK/kiln-$n" %.0f))" \
		"$g" "($(range "$WORK/nginx-$n" %.0f))" "$(ratio "$k" "$g")"
done
hpa=$(median "$WORK/hpa-tftp")
printf '\n%-30s %20s %12s\n' "TFTP, 30 MiB, blksize 1468" "MiB/s" "/ tftpd-hpa"
for n in hpa-tftp kiln-tftp kiln-tftp-ws16; do
	case $n in
	hpa-tftp) label="tftpd-hpa" ;;
	kiln-tftp) label="kiln" ;;
	kiln-tftp-ws16) label="kiln, windowsize 16" ;;
	esac
	v=$(median "$WORK/$n")
	printf '%-30s %6.1f %13s %12s\n' "$label" "$v" "($(range "$WORK/$n" %.1f))" "$(ratio "$v" "$hpa")"
done
ws=$(python3 -c 'import json,sys; r=[json.loads(l) for l in open(sys.argv[1])]; print(sum(x["duplicates"]+x["out_of_order"] for x in r))' \
	"$WORK/kiln-tftp-ws16.json")
echo "kiln windowsize 16: $ws duplicate or out-of-order DATA packets over $RUNS transfers"
echo
echo "HTTP target: kiln >= nginx; TFTP target: kiln windowsize 16 >= 5x tftpd-hpa"
if grep -qi 'error\|panic\|failed' "$WORK/kiln.log"; then
	echo "kiln serve log has errors:"
	grep -i 'error\|panic\|failed' "$WORK/kiln.log" | head -20
fi
