#!/usr/bin/env bash
# Benchmark: a boot storm. Many simulated PXE clients (examples/storm.rs) boot at once against `kiln serve` and,
# in the same run with the same clients, against dnsmasq (DHCP + TFTP) + nginx (HTTP) serving the same files:
# DHCP as a BIOS PXE ROM, TFTP of undionly.kpxe (blksize 1468, lock-step), DHCP as iPXE, HTTP of the script, the
# kernel and the initrds, every size checked (and sha256 of every blob download unless DIGEST_EVERY says otherwise).
#
# Scenarios (each prints a table with kiln / other for the time until all booted):
#   plain    N clients for each N in NS (default 1000 5000 10000)
#   loss     FAULT_N clients (default 1000) with 5% loss of what the clients send (netem on their veth; where
#            the kernel has no netem, iptables' statistic match drops the same share where it arrives)
#   hostile  FAULT_N clients with hostile traffic alongside: 2,000 TFTP requests asking `timeout 255` never
#            acknowledged (one address, many ports), 500 slow HTTP clients trickling header bytes, garbage
#            datagrams to ports 67 and 69 (200/s each)
#
# Network: two namespaces joined by a veth pair. Server: 10.5.0.1/16 on veth-s. Clients: veth-c holds 10.5.255.254/16
# and, by `ip route add local 10.5.64.0/18 dev veth-c`, every address of the pool range, so each client uses the
# address it was leased (servers see 10,000 distinct clients). The server reaches the pool through 10.5.255.254
# (a route, not 10,000 ARP entries: the neighbour table's gc_thresh3 = 1024 is global and cannot be raised per
# namespace). Hostile traffic comes from 10.5.200.1. Both servers hand out the same pool, 10.5.64.1-10.5.127.254.
#
# Payload (PAYLOAD): `small` (default) is a bundle built from a directory holding a 2 MiB stand-in kernel and
# 2 MiB of random data, compression none: 6.3 MB per client (the image holds the kernel again, as a real image
# holds /boot), so 10,000 clients move 63 GB over the veth; `tiny` is the tiny fixture's real bundle (Debian
# kernel 8.2 MB + image 9.4 MB): 17.7 MB per client, 177 GB for 10,000, too much for 2 cores in one sitting.
# kiln serves unknown machines (`unknown = "boot:storm"`, no [node.*] tables, no overlay); dnsmasq tags iPXE by
# its user class and nginx serves kiln's unknown-machine script for all at /ipxe/boot, and the bundle's files at
# the same /blob/sha256/<hex> paths, so clients do identical work against both.
#
# Env: NS, FAULT_N, SCENARIOS (plain loss hostile), SERVERS (kiln dnsmasq; add kiln-ram for kiln with its state
# database on tmpfs, which shows what its durable lease writes cost), RAMP (seconds within which all clients start,
# default 10), PAYLOAD (small|tiny), DEADLINE (seconds per run, default 900), DIGEST_EVERY (sha256 of blob
# downloads for every Nth client: 1 = all (default), 0 = none), DNSMASQ_PING=1 (keep dnsmasq's ping check; the
# clients never answer pings), SEQUENTIAL_MACS=1 (consecutive MACs instead of scattered ones), KEEP=1 keeps the work
# dir with every log, KILN_SERVER_EXTRA lines added to kiln's [server] table (e.g. "tftp_max_transfers = 4096").
# Needs root (namespaces, ports 67/69/80 in them). Everything it starts is stopped and every namespace removed on
# exit. Work dir under /var/tmp (kiln's state database is on disk there, as on a real server).
#
#   scripts/bench/storm.sh
#   NS="1000" SCENARIOS="plain loss hostile" scripts/bench/storm.sh
set -euo pipefail
cd "$(dirname "$0")/../.."

NS=${NS:-"1000 5000 10000"}
FAULT_N=${FAULT_N:-1000}
SCENARIOS=${SCENARIOS:-"plain loss hostile"}
SERVERS=${SERVERS:-"kiln dnsmasq"}
RAMP=${RAMP:-10}
PAYLOAD=${PAYLOAD:-small}
DEADLINE=${DEADLINE:-900}
DIGEST_EVERY=${DIGEST_EVERY:-1}
KEEP=${KEEP:-0}
DNSMASQ_PING=${DNSMASQ_PING:-0}
SEQUENTIAL_MACS=${SEQUENTIAL_MACS:-0}
KILN_SERVER_EXTRA=${KILN_SERVER_EXTRA:-}
PING=(--no-ping)
[[ $DNSMASQ_PING == 1 ]] && PING=()
BIOS_FILE=/usr/lib/ipxe/undionly.kpxe
SERVER_IP=10.5.0.1
CLIENT_IP=10.5.255.254
HOSTILE_IP=10.5.200.1
POOL_NET=10.5.64.0/18
POOL_FIRST=10.5.64.1
POOL_LAST=10.5.127.254
# Open files for the servers and the generator (the generator needs ~2 per client + the hostile sockets).
NOFILE=${NOFILE:-65536}

fail() {
	echo "storm.sh: $*" >&2
	exit 1
}
((EUID == 0)) || fail "needs root (network namespaces, ports 67/69/80)"
case $PAYLOAD in small | tiny) ;; *) fail "PAYLOAD must be small or tiny, not $PAYLOAD" ;; esac
for s in $SCENARIOS; do case $s in plain | loss | hostile) ;; *) fail "unknown scenario $s (plain, loss, hostile)" ;; esac done
for s in $SERVERS; do case $s in kiln | kiln-ram | dnsmasq) ;; *) fail "unknown server $s (kiln, kiln-ram, dnsmasq)" ;; esac done

scripts/setup.sh >/dev/null
[[ -f $BIOS_FILE ]] || fail "$BIOS_FILE is missing (Debian package ipxe; scripts/setup.sh installs it)"
timeout 1800 cargo build --release --quiet --bin kiln --example storm
KILN=$PWD/target/release/kiln
STORM=$PWD/target/release/examples/storm

# The generator inherits this shell's limit. Without CAP_SYS_RESOURCE (containers) the hard limit is the ceiling.
HARD=$(ulimit -Hn)
if [[ $HARD != unlimited ]] && ((HARD < NOFILE)) && ! ulimit -Hn "$NOFILE" 2>/dev/null; then
	echo "storm.sh: warning: cannot raise the open-files limit to $NOFILE (no CAP_SYS_RESOURCE?); using the hard limit $HARD for the servers and the generator" >&2
	NOFILE=$HARD
fi
ulimit -n "$NOFILE" || fail "cannot set the open-files limit to $NOFILE"

WORK=$(mktemp -d /var/tmp/kiln-bench-storm.XXXXXX)
RAM=/dev/shm/$(basename "$WORK")
chmod 755 "$WORK" # nginx workers and dnsmasq's TFTP run as nobody
PIDS=()
NSES=()
cleanup() {
	local p n
	for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
	for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
	for n in "${NSES[@]}"; do ip netns del "$n" 2>/dev/null || true; done
	rm -rf "$RAM"
	if [[ $KEEP == 1 ]]; then echo "storm.sh: logs kept in $WORK" >&2; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- the bundle, the same files for both servers --------------------------------------------------------------
mkdir -p "$WORK/rootfs/boot" "$WORK/www/blob/sha256" "$WORK/www/ipxe" "$WORK/tftp"
if [[ $PAYLOAD == small ]]; then
	# A stand-in kernel: random bytes with the bzImage "HdrS" magic at 0x202, enough for kernel = "auto".
	head -c 2M /dev/urandom >"$WORK/rootfs/boot/vmlinuz-1.0"
	printf 'HdrS' | dd of="$WORK/rootfs/boot/vmlinuz-1.0" bs=1 seek=$((0x202)) conv=notrunc status=none
	mkdir -p "$WORK/rootfs/data"
	head -c 2M /dev/urandom >"$WORK/rootfs/data/random.bin"
	FROM="dir:$WORK/rootfs"
	COMPRESSION=none
else
	TINY=$(bash scripts/fixtures/tiny.sh | tail -n1)
	FROM="oci:$TINY/oci:latest"
	COMPRESSION=zstd
fi
cat >"$WORK/kiln.toml" <<EOF
source_date_epoch = 1700000000

[image.storm]
from = "$FROM"
kernel = "auto"
cmdline = "console=ttyS0 quiet"
compression = "$COMPRESSION"

[server]
interface = "veth-s"
address = "$SERVER_IP/16"
dhcp = "full"
pool = "$POOL_FIRST-$POOL_LAST"
unknown = "boot:storm"
lease_time = 3600
$KILN_SERVER_EXTRA

[server.boot_files]
bios = "$BIOS_FILE"
EOF
BUNDLE=$(timeout 600 "$KILN" build --quiet -f "$WORK/kiln.toml" --store "$WORK/store" | tail -n1)
[[ -f $BUNDLE/manifest.json ]] || fail "kiln build printed $BUNDLE, which holds no manifest.json"
PER_CLIENT=0
for f in kernel initramfs image; do
	ln -s "$BUNDLE/$f" "$WORK/www/blob/sha256/$(sha256sum "$BUNDLE/$f" | cut -d' ' -f1)"
	PER_CLIENT=$((PER_CLIENT + $(stat -c %s "$BUNDLE/$f")))
done
chmod -R a+rX "$WORK/store"
cp "$BIOS_FILE" "$WORK/tftp/undionly.kpxe"
chmod 644 "$WORK/tftp/undionly.kpxe"
cat "$BUNDLE"/kernel "$BUNDLE"/initramfs "$BUNDLE"/image "$WORK/tftp/undionly.kpxe" >/dev/null # warm page cache

# --- network --------------------------------------------------------------------------------------------------
# net NAME: fresh namespaces NAME-s (server) and NAME-c (clients) joined by veth-s/veth-c.
net() {
	local s=$1-s c=$1-c
	ip netns del "$s" 2>/dev/null || true
	ip netns del "$c" 2>/dev/null || true
	ip netns add "$s"
	NSES+=("$s")
	ip netns add "$c"
	NSES+=("$c")
	ip -n "$s" link set lo up
	ip -n "$c" link set lo up
	ip -n "$s" link add veth-s type veth peer name veth-c netns "$c"
	ip -n "$s" addr add "$SERVER_IP/16" dev veth-s
	ip -n "$c" addr add "$CLIENT_IP/16" dev veth-c
	ip -n "$c" addr add "$HOSTILE_IP/16" dev veth-c
	ip -n "$s" link set veth-s up
	ip -n "$c" link set veth-c up
	ip -n "$c" route add local "$POOL_NET" dev veth-c
	ip -n "$s" route add "$POOL_NET" via "$CLIENT_IP" dev veth-s
	ip netns exec "$s" sysctl -qw net.core.somaxconn=65535 net.ipv4.tcp_max_syn_backlog=65535
	ip netns exec "$c" sysctl -qw net.ipv4.ip_local_port_range="1024 65535" net.ipv4.icmp_echo_ignore_all=1
}

# The script nginx serves: exactly what kiln answers an unknown machine.
script_from_kiln() {
	net "kiln-storm-$$-script"
	local ns=kiln-storm-$$-script-s
	prlimit --nofile="$NOFILE:$NOFILE" ip netns exec "$ns" "$KILN" serve -f "$WORK/kiln.toml" --store "$WORK/store" \
		--state-dir "$WORK/script-state" --dhcp off >"$WORK/script-kiln.log" 2>&1 &
	local pid=$!
	PIDS+=("$pid")
	local i
	for i in $(seq 100); do
		ip netns exec "$ns" curl -sf -o "$WORK/www/ipxe/boot" "http://$SERVER_IP/ipxe/02:00:00:00:00:01" && break
		((i < 100)) || fail "kiln serve did not answer: $(cat "$WORK/script-kiln.log")"
		sleep 0.1
	done
	kill "$pid"
	wait "$pid" 2>/dev/null || true
	ip netns del "$ns"
	ip netns del kiln-storm-$$-script-c
	grep -q '^kernel http://' "$WORK/www/ipxe/boot" || fail "kiln's script has no kernel line: $(cat "$WORK/www/ipxe/boot")"
}
script_from_kiln

# --- servers --------------------------------------------------------------------------------------------------
# wait_ready NS LOG PID URL-PATH: DHCP on 67, TFTP on 69 and HTTP answering PATH on 80 inside NS.
wait_ready() {
	local ns=$1 log=$2 pid=$3 path=$4 i
	for i in $(seq 150); do
		if ip netns exec "$ns" ss -Hlun 'sport = :67' | grep -q . && ip netns exec "$ns" ss -Hlun 'sport = :69' | grep -q . &&
			ip netns exec "$ns" curl -sf -o /dev/null "http://$SERVER_IP$path"; then
			return 0
		fi
		kill -0 "$pid" 2>/dev/null || fail "the server exited: $(tail -20 "$log")"
		((i < 150)) || fail "the server did not start in 15 s: $(tail -20 "$log")"
		sleep 0.1
	done
}

# start_kiln RUN NS STATE-DIR: sets SERVER_PIDS to what to measure.
start_kiln() {
	local run=$1 ns=$2 state=$3
	prlimit --nofile="$NOFILE:$NOFILE" ip netns exec "$ns" "$KILN" serve -f "$WORK/kiln.toml" --store "$WORK/store" \
		--state-dir "$state" >"$run/kiln.log" 2>&1 &
	PIDS+=($!)
	wait_ready "$ns" "$run/kiln.log" $! /healthz
	SERVER_PIDS="--server-pid $!"
}

start_dnsmasq() {
	local run=$1 ns=$2 n=$3
	mkdir -p "$run/nginx"
	cat >"$run/nginx/nginx.conf" <<EOF
worker_processes auto;
worker_rlimit_nofile $NOFILE;
daemon off;
pid $run/nginx/nginx.pid;
error_log $run/nginx/error.log;
events { worker_connections $((n + 4096)); }
http {
	sendfile on;
	tcp_nopush on;
	access_log $run/nginx/access.log combined buffer=64k flush=1s;
	default_type application/octet-stream;
	client_body_temp_path $run/nginx/body;
	server {
		listen $SERVER_IP:80;
		root $WORK/www;
		location /ipxe/ { default_type text/plain; }
	}
}
EOF
	prlimit --nofile="$NOFILE:$NOFILE" ip netns exec "$ns" nginx -c "$run/nginx/nginx.conf" >"$run/nginx/stdout.log" 2>&1 &
	PIDS+=($!)
	local nginx=$!
	# --keep-in-foreground, not --no-daemon (a debug mode that also logs everything to stderr). --no-ping: kiln does no
	# conflict detection either (DNSMASQ_PING=1 keeps dnsmasq's ping check). tftp-max (default 50) raised so that the
	# cap is not the limit; leases sized for the run; --user=root only so that it can write its log in the work dir.
	prlimit --nofile="$NOFILE:$NOFILE" ip netns exec "$ns" dnsmasq --keep-in-foreground --conf-file=/dev/null --port=0 \
		--interface=veth-s --bind-interfaces --dhcp-authoritative "${PING[@]}" \
		--dhcp-range="$POOL_FIRST,$POOL_LAST,255.255.0.0,1h" --dhcp-lease-max=$((n + 1000)) \
		--dhcp-leasefile="$run/dnsmasq.leases" \
		--dhcp-userclass=set:ipxe,iPXE --dhcp-boot=tag:!ipxe,undionly.kpxe \
		--dhcp-boot="tag:ipxe,http://$SERVER_IP/ipxe/boot" \
		--enable-tftp --tftp-root="$WORK/tftp" --tftp-max=20000 \
		--log-facility="$run/dnsmasq.log" --pid-file="$run/dnsmasq.pid" --user=root >"$run/dnsmasq.out" 2>&1 &
	PIDS+=($!)
	local dnsmasq=$!
	wait_ready "$ns" "$run/dnsmasq.out" "$dnsmasq" /ipxe/boot
	SERVER_PIDS="--server-pid $dnsmasq --server-pid $nginx"
}

# --- runs -----------------------------------------------------------------------------------------------------
# one SCENARIO N SERVER: a fresh network, the server, the storm; results in $WORK/SCENARIO-N-SERVER.json.
one() {
	local scenario=$1 n=$2 server=$3
	local tag=$scenario-$n-$server
	local run=$WORK/$tag name=kiln-storm-$$-$scenario-$server
	mkdir -p "$run"
	net "$name"
	local s=$name-s c=$name-c extra=()
	local how=""
	if [[ $scenario == loss ]]; then
		# 5% of what the clients send is lost. netem on the clients' veth where the kernel has it; else the same
		# loss made by iptables' statistic match where the packets arrive (a drop on the clients' own output would
		# fail their sendto() with EPERM instead of vanishing like a lost frame).
		if ip netns exec "$c" tc qdisc add dev veth-c root netem loss 5% limit 100000 2>/dev/null; then
			how="netem loss 5% on veth-c (clients to server)"
		else
			ip netns exec "$s" iptables -t raw -A PREROUTING -i veth-s -m statistic --mode random \
				--probability 0.05 -j DROP || fail "neither netem nor iptables' statistic match is available for the loss scenario"
			how="5% of packets from the clients dropped at veth-s (iptables statistic; this kernel has no netem)"
		fi
	fi
	if [[ $scenario == hostile ]]; then
		extra=(--hostile-from "$HOSTILE_IP")
	fi
	if [[ $SEQUENTIAL_MACS == 1 ]]; then
		extra+=(--sequential-macs)
	fi
	local label
	case $server in
	kiln)
		start_kiln "$run" "$s" "$run/state"
		label=kiln
		;;
	kiln-ram)
		# The same with the state database on tmpfs: what kiln's durable lease writes cost.
		mkdir -p "$RAM"
		start_kiln "$run" "$s" "$RAM/$tag"
		label="kiln, state in RAM"
		;;
	dnsmasq)
		start_dnsmasq "$run" "$s" "$n"
		label=dnsmasq+nginx
		;;
	esac
	echo "--- $scenario, $n clients, $label" >&2
	# In the background and waited for, so that a signal to this script ends the run at once (trap, cleanup).
	# shellcheck disable=SC2086 # SERVER_PIDS is a list of flags
	timeout $((DEADLINE + 120)) ip netns exec "$c" "$STORM" --interface veth-c --server "$SERVER_IP" --clients "$n" \
		--ramp "$RAMP" --deadline "$DEADLINE" --digest-every "$DIGEST_EVERY" --label "$label" \
		--note "payload $PAYLOAD: $PER_CLIENT bytes of kernel+initrds per client; scenario $scenario${how:+: $how}" \
		$SERVER_PIDS "${extra[@]}" --json "$run/result.json" >"$run/report.txt" &
	PIDS+=($!)
	wait $! || true
	cat "$run/report.txt" >&2
	[[ -s $run/result.json ]] || fail "$tag: the generator wrote no result (see above)"
	cp "$run/result.json" "$WORK/$tag.json"
	local p
	for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
	for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
	PIDS=()
	ip netns del "$s"
	ip netns del "$c"
}

table() {
	local scenario=$1 n=$2
	python3 - "$scenario" "$n" "$WORK/$scenario-$n-kiln.json" "$WORK/$scenario-$n-dnsmasq.json" \
		"$WORK/$scenario-$n-kiln-ram.json" <<'EOF'
import json, os, sys
scenario, n, kpath, opath, rpath = sys.argv[1:6]
load = lambda p: json.load(open(p)) if os.path.exists(p) else None
k, o, ram = load(kpath), load(opath), load(rpath)
def cell(r, key, fmt="{:.2f}"):
    if r is None: return "-"
    v = r.get(key)
    return "-" if v is None else fmt.format(v)
def failed(r):
    if r is None: return "-"
    return " / ".join(str(r["failed"][p]) for p in ["dhcp", "tftp", "ipxe-dhcp", "script", "kernel/initrds"])
def phases(r, key):
    if r is None: return "-"
    v = [r[key].get(p) for p in ["dhcp", "tftp", "ipxe-dhcp", "script", "kernel/initrds"]]
    return " / ".join("-" if x is None else "{:.2f}".format(x) for x in v)
def ratio(key):
    if not k or not o or k.get(key) is None or o.get(key) in (None, 0): return "-"
    return "{:.2f}".format(k[key] / o[key])
print()
title = {"plain": "", "loss": ", 5% loss on the clients' side", "hostile": ", hostile traffic alongside"}[scenario]
print(f"### {n} clients{title}")
print()
extra = [ram] if ram else []
print("| | kiln | dnsmasq + nginx | kiln / other |" + (" kiln, state in RAM |" if ram else ""))
print("| --- | ---: | ---: | ---: |" + (" ---: |" if ram else ""))
rows = [
    ("booted", lambda r: f"{r['booted']} / {r['clients']}" if r else "-", None),
    ("failed: dhcp / tftp / ipxe-dhcp / script / kernel+initrds", failed, None),
    ("time until all booted, s", lambda r: cell(r, "all_booted_secs"), "all_booted_secs"),
    ("last boot, s", lambda r: cell(r, "last_boot_secs"), "last_boot_secs"),
    ("boot time p50, s", lambda r: cell(r, "boot_p50_secs"), "boot_p50_secs"),
    ("boot time p99, s", lambda r: cell(r, "boot_p99_secs"), "boot_p99_secs"),
    ("phase p50, s: dhcp / tftp / ipxe-dhcp / script / kernel+initrds", lambda r: phases(r, "phase_p50_secs"), None),
    ("phase p99, s", lambda r: phases(r, "phase_p99_secs"), None),
    ("server CPU, s", lambda r: cell(r, "server_cpu_secs"), "server_cpu_secs"),
    ("server peak RSS, MiB", lambda r: cell(r, "server_peak_rss_mib"), "server_peak_rss_mib"),
    ("server peak threads / open files", lambda r: f"{r['server_peak_threads']} / {r['server_peak_open_files']}" if r else "-", None),
    ("DHCP retransmissions / NAKs, TFTP retransmissions", lambda r: f"{r['dhcp_retransmits']} / {r['dhcp_naks']}, {r['tftp_retransmits']}" if r else "-", None),
    ("UDP drops (receive buffer full): server / clients", lambda r: f"{r['server_udp_rcvbuf_drops']} / {r['client_udp_rcvbuf_drops']}" if r else "-", None),
    ("generator CPU, s", lambda r: cell(r, "generator_cpu_secs"), None),
    ("load average at start / end", lambda r: f"{r['load_average_start']:.1f} / {r['load_average_end']:.1f}" if r else "-", None),
]
for name, f, key in rows:
    print(f"| {name} | {f(k)} | {f(o)} | {ratio(key) if key else ''} |" + "".join(f" {f(r)} |" for r in extra))
for r in (k, o, *extra):
    if r and r["failures"]:
        print()
        print(f"{r['label']} failures (most common first):")
        for x in r["failures"][:5]:
            print(f"- {x['count']} x {x['phase']}, e.g. {x['example']}")
for r in (k, o, *extra):
    if r and r.get("hostile"):
        h = r["hostile"]
        print(f"{r['label']}: slow HTTP clients {h['slow_http_peak_open']} open at peak, "
              f"{h['slow_http_dropped_by_server']} closed by the server; {h['tftp_requests_sent']} TFTP floods; "
              f"{h['garbage_datagrams']} garbage datagrams")
digests = [f"{r['label']} {r['digests_checked']}/{r['blob_downloads']}" for r in (k, o, *extra) if r]
print(f"sha256 checked on blob downloads: {', '.join(digests)}")
EOF
}

STARTED=$(date +%s)
printf '## Boot storm: %s cores (%s), %s GiB RAM, kernel %s; ramp %s s; payload %s (%s bytes per client)\n' \
	"$(nproc)" "$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')" \
	"$(awk '/MemTotal/ {printf "%d", $2/1048576}' /proc/meminfo)" "$(uname -r)" "$RAMP" "$PAYLOAD" "$PER_CLIENT"
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
# Each scenario's table is printed as soon as its runs are done.
for scenario in $SCENARIOS; do
	if [[ $scenario == plain ]]; then ns=$NS; else ns=$FAULT_N; fi
	for n in $ns; do
		for server in $SERVERS; do one "$scenario" "$n" "$server"; done
		table "$scenario" "$n"
	done
done
echo
echo "$(($(date +%s) - STARTED)) s in all; load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
