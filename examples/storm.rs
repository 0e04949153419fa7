//! storm: a boot-storm load generator. N simulated PXE clients, each with its own MAC, do what BIOS firmware and
//! then iPXE do against a boot server, all starting within a ramp of R seconds (a rack powering on):
//!
//! 1. DHCP DISCOVER/REQUEST as a PXE ROM (option 93 = 0, vendor class `PXEClient:Arch:00000:UNDI:002001`),
//!    retransmitting after 4, 8, 16, 32 s;
//! 2. TFTP of the boot file the ACK names, `blksize 1468`, lock-step, size checked against `tsize`;
//! 3. DHCP again as iPXE (user class `iPXE`, option 175), which must answer with an `http://` boot file;
//! 4. HTTP GET of that script, then of its `kernel` and every `initrd`, each length checked against
//!    Content-Length and, for `/blob/sha256/<hex>` URLs, the sha256 (for every `--digest-every`th client).
//!
//! Optionally hostile traffic runs alongside (unacknowledged TFTP requests, slow HTTP clients, garbage datagrams).
//! It prints, for the server it ran against: clients booted and failed by phase, the time until all booted, p50/p99
//! boot times, and the server's CPU seconds and peak RSS read from /proc. Every wait is bounded: firmware-like
//! retries per phase and an overall deadline, after which clients still booting count as failed in their phase.
//!
//! It runs in the clients' network namespace, where the server's pool range is local (`ip route add local
//! POOL dev IF`), so each client can use the address it was leased: scripts/bench/storm.sh sets that up.
//!
//!   storm --interface veth-c --server 10.5.0.1 --clients 1000 --ramp 10 --label kiln --server-pid 1234

#[path = "storm/dhcp.rs"]
mod dhcp;
#[path = "storm/hostile.rs"]
mod hostile;
#[path = "storm/http.rs"]
mod http;
#[path = "storm/procstat.rs"]
mod procstat;
#[path = "storm/tftp.rs"]
mod tftp;

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Parser;
use tokio::time::Instant;

/// Longest a TFTP transfer may take in all (firmware retries bound it sooner when the server is silent).
const TFTP_PHASE: Duration = Duration::from_secs(120);
/// How long a TCP connection may take to open (SYN retransmissions included), as iPXE allows.
const CONNECT: Duration = Duration::from_secs(30);

#[derive(Parser, Debug)]
#[command(about = "Simulated PXE clients booting at once against a boot server (DHCP, TFTP, DHCP as iPXE, HTTP)")]
struct Args {
    /// Simulated clients.
    #[arg(long, default_value_t = 100)]
    clients: usize,
    /// Seconds within which every client starts, evenly spaced (0: all at once).
    #[arg(long, default_value_t = 10.0)]
    ramp: f64,
    /// The clients' interface; DHCP broadcasts leave by it.
    #[arg(long)]
    interface: String,
    /// The server's address (hostile traffic goes there; clients go where DHCP sends them).
    #[arg(long)]
    server: Ipv4Addr,
    /// Seconds after the first client starts when everything stops; clients still booting fail in their phase.
    #[arg(long, default_value_t = 600)]
    deadline: u64,
    /// Give clients consecutive MACs (the index in the low bytes) instead of scattered ones.
    #[arg(long)]
    sequential_macs: bool,
    /// Check the sha256 of `/blob/sha256/<hex>` downloads for every Nth client (1: every download, 0: none).
    #[arg(long, default_value_t = 1)]
    digest_every: usize,
    /// TFTP block size asked for.
    #[arg(long, default_value_t = 1468)]
    blksize: u16,
    /// TFTP port of the server.
    #[arg(long, default_value_t = 69)]
    tftp_port: u16,
    /// DHCP port of the server.
    #[arg(long, default_value_t = 67)]
    dhcp_port: u16,
    /// Seconds the PXE ROM waits for an answer before sending again (one send per value).
    #[arg(long, default_value = "4,8,16,32", value_delimiter = ',')]
    pxe_waits: Vec<u64>,
    /// Seconds iPXE waits for a DHCP answer before sending again (one send per value).
    #[arg(long, default_value = "1,2,4,8", value_delimiter = ',')]
    ipxe_waits: Vec<u64>,
    /// Seconds an HTTP response may stall before the download is given up.
    #[arg(long, default_value_t = 60)]
    http_idle: u64,
    /// Send hostile traffic from this address (local in the clients' namespace) alongside the clients.
    #[arg(long)]
    hostile_from: Option<Ipv4Addr>,
    /// Hostile: TFTP read requests asking `timeout 255`, never acknowledged, each from its own port.
    #[arg(long, default_value_t = 2000)]
    hostile_tftp: usize,
    /// Hostile: slow HTTP clients trickling header bytes.
    #[arg(long, default_value_t = 500)]
    hostile_http: usize,
    /// Hostile: garbage datagrams per second to each of the DHCP and TFTP ports.
    #[arg(long, default_value_t = 200)]
    garbage_pps: u32,
    /// Hostile: seconds the hostile traffic runs before the first client starts.
    #[arg(long, default_value_t = 5)]
    hostile_lead: u64,
    /// Hostile: the server's HTTP port.
    #[arg(long, default_value_t = 80)]
    http_port: u16,
    /// Hostile: the file the TFTP requests ask for.
    #[arg(long, default_value = "undionly.kpxe")]
    hostile_file: String,
    /// A server process to measure (CPU, peak RSS, threads, open files) with its descendants; repeatable.
    #[arg(long = "server-pid")]
    server_pids: Vec<u32>,
    /// The server's name in the report.
    #[arg(long, default_value = "server")]
    label: String,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// A line printed with the report (what the server serves, how it was set up).
    #[arg(long, default_value = "")]
    note: String,
}

/// The phases of a boot, in order; a client that fails is counted in the phase it was in.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Phase {
    Dhcp = 0,
    Tftp = 1,
    IpxeDhcp = 2,
    Script = 3,
    Files = 4,
}

const PHASES: [Phase; 5] = [Phase::Dhcp, Phase::Tftp, Phase::IpxeDhcp, Phase::Script, Phase::Files];

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Phase::Dhcp => "dhcp",
            Phase::Tftp => "tftp",
            Phase::IpxeDhcp => "ipxe-dhcp",
            Phase::Script => "script",
            Phase::Files => "kernel/initrds",
        }
    }
    fn from_u8(v: u8) -> Phase {
        PHASES.get(usize::from(v)).copied().unwrap_or(Phase::Files)
    }
}

/// Totals the clients add to as they go.
#[derive(Default)]
struct Counters {
    dhcp_sends: AtomicU64,
    dhcp_exchanges: AtomicU64,
    dhcp_naks: AtomicU64,
    tftp_retransmits: AtomicU64,
    tftp_unchecked: AtomicU64,
    blob_downloads: AtomicU64,
    digests_checked: AtomicU64,
}

struct Ctx {
    args: Args,
    hub: Arc<dhcp::Hub>,
    salt: u32,
    pxe_waits: Vec<Duration>,
    ipxe_waits: Vec<Duration>,
    counters: Counters,
}

/// One client's end: seconds since the first client's start.
struct Outcome {
    start: f64,
    end: f64,
    /// How long each phase the client completed took.
    phases: [Option<f64>; 5],
    /// Bytes received by TFTP and HTTP.
    tftp_bytes: u64,
    http_bytes: u64,
    failed: Option<(Phase, String)>,
}

/// Client `i`'s MAC: locally administered, unicast, 24 bits of index (at most 16 million clients). Scattered by
/// default: a bijection of the index, so MACs stay unique but are not consecutive (a site's machines come from
/// different batches); `sequential` puts the index itself in the low bytes.
fn mac(i: usize, sequential: bool) -> [u8; 6] {
    let mut x = i as u32 & 0xff_ffff;
    if !sequential {
        // Each step is invertible on 24 bits: odd multiplications and xor-shifts.
        x = x.wrapping_mul(0x9e_3779) & 0xff_ffff;
        x ^= x >> 12;
        x = x.wrapping_mul(0x5b_d1e9 | 1) & 0xff_ffff;
        x ^= x >> 11;
    }
    [0x02, 0x4b, 0x53, (x >> 16) as u8, (x >> 8) as u8, x as u8]
}

fn uuid(i: usize) -> [u8; 16] {
    let mut u = [0x4bu8; 16];
    u[12..].copy_from_slice(&(i as u32).to_be_bytes());
    u
}

/// Transaction ids unique per client and exchange within a run, different between runs.
fn xid(salt: u32, i: usize, exchange: u32) -> u32 {
    salt ^ (((i as u32) << 1) | exchange)
}

/// What a client did so far: when each phase ended, bytes received.
#[derive(Default)]
struct Progress {
    done: [Option<Instant>; 5],
    tftp_bytes: u64,
    http_bytes: u64,
}

/// Boots client `i`, noting in `phase` where it is and in `p` what it did.
async fn boot(ctx: &Ctx, i: usize, phase: &AtomicU8, p: &mut Progress) -> Result<(), String> {
    let a = &ctx.args;
    let c = &ctx.counters;
    let client = dhcp::Client { mac: mac(i, a.sequential_macs), uuid: uuid(i) };

    phase.store(Phase::Dhcp as u8, Ordering::Relaxed);
    let lease = client.exchange(&ctx.hub, xid(ctx.salt, i, 0), dhcp::Firmware::Pxe, &ctx.pxe_waits).await?;
    c.dhcp_sends.fetch_add(u64::from(lease.sends), Ordering::Relaxed);
    c.dhcp_exchanges.fetch_add(1, Ordering::Relaxed);
    c.dhcp_naks.fetch_add(u64::from(lease.naks), Ordering::Relaxed);
    p.done[Phase::Dhcp as usize] = Some(Instant::now());
    if lease.boot_file.contains("://") {
        return Err(format!("a BIOS PXE ROM was offered {:?}, which it cannot fetch", lease.boot_file));
    }

    phase.store(Phase::Tftp as u8, Ordering::Relaxed);
    let server = SocketAddrV4::new(lease.next_server, a.tftp_port);
    let fetched = tokio::time::timeout(TFTP_PHASE, tftp::fetch(lease.ip, server, &lease.boot_file, a.blksize))
        .await
        .map_err(|_| format!("transfer not done after {}s", TFTP_PHASE.as_secs()))??;
    p.tftp_bytes = fetched.bytes;
    c.tftp_retransmits.fetch_add(u64::from(fetched.retransmits), Ordering::Relaxed);
    if fetched.tsize.is_none() {
        c.tftp_unchecked.fetch_add(1, Ordering::Relaxed);
    }
    p.done[Phase::Tftp as usize] = Some(Instant::now());

    phase.store(Phase::IpxeDhcp as u8, Ordering::Relaxed);
    let lease = client.exchange(&ctx.hub, xid(ctx.salt, i, 1), dhcp::Firmware::Ipxe, &ctx.ipxe_waits).await?;
    c.dhcp_sends.fetch_add(u64::from(lease.sends), Ordering::Relaxed);
    c.dhcp_exchanges.fetch_add(1, Ordering::Relaxed);
    c.dhcp_naks.fetch_add(u64::from(lease.naks), Ordering::Relaxed);
    p.done[Phase::IpxeDhcp as usize] = Some(Instant::now());
    if !lease.boot_file.starts_with("http://") {
        return Err(format!("iPXE was offered {:?}, not an http:// script (a chain-loading loop)", lease.boot_file));
    }

    phase.store(Phase::Script as u8, Ordering::Relaxed);
    let mut web = http::Client::new(lease.ip, CONNECT, Duration::from_secs(a.http_idle));
    let url = http::Url::parse(&lease.boot_file)?;
    let got = web.get(&url, true, false).await?;
    p.http_bytes += got.len;
    let text = String::from_utf8(got.body.unwrap_or_default()).map_err(|_| "the script is not UTF-8".to_string())?;
    let script = http::parse_script(&text)?;
    p.done[Phase::Script as usize] = Some(Instant::now());

    phase.store(Phase::Files as u8, Ordering::Relaxed);
    let check = a.digest_every > 0 && i.is_multiple_of(a.digest_every);
    for link in std::iter::once(&script.kernel).chain(&script.initrds) {
        let url = http::Url::parse(link)?;
        let got = web.get(&url, false, check).await.map_err(|e| format!("{}: {e}", url.path))?;
        p.http_bytes += got.len;
        if url.digest().is_some() {
            c.blob_downloads.fetch_add(1, Ordering::Relaxed);
        }
        if got.digest_checked {
            c.digests_checked.fetch_add(1, Ordering::Relaxed);
        }
    }
    p.done[Phase::Files as usize] = Some(Instant::now());
    Ok(())
}

/// Peaks of the server's threads and open files, sampled once a second while the clients run.
#[derive(Default)]
struct Peaks {
    threads: u64,
    open_files: u64,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("storm: starting the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(run(args)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("storm: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// Runs the storm; `Ok(true)` when every client booted.
async fn run(args: Args) -> Result<bool> {
    if args.clients == 0 || args.clients > 1 << 24 {
        bail!("--clients must be 1 to 16777216");
    }
    if args.pxe_waits.is_empty() || args.ipxe_waits.is_empty() {
        bail!("--pxe-waits and --ipxe-waits need at least one value");
    }
    if !(0.0..=3600.0).contains(&args.ramp) {
        bail!("--ramp must be 0 to 3600 seconds");
    }
    let hostile = args.hostile_from.is_some();
    // A client holds one socket at a time (TFTP, then its HTTP connection).
    let need = args.clients as u64 + if hostile { (args.hostile_tftp + args.hostile_http) as u64 } else { 0 } + 64;
    match procstat::open_files_limit() {
        Some(limit) if limit < need => eprintln!(
            "storm: warning: the open-files limit is {limit}, this run may need {need} (raise it with ulimit -n); \
             clients past it fail with \"Too many open files\""
        ),
        Some(_) => {}
        None => eprintln!("storm: warning: could not read the open-files limit from /proc/self/limits"),
    }
    let hub = dhcp::Hub::bind(&args.interface, args.dhcp_port)?;
    tokio::spawn(hub.clone().run());
    let salt =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(7) | 1;
    let secs = |v: &[u64]| v.iter().map(|s| Duration::from_secs(*s)).collect::<Vec<_>>();
    let ctx = Arc::new(Ctx {
        pxe_waits: secs(&args.pxe_waits),
        ipxe_waits: secs(&args.ipxe_waits),
        hub,
        salt,
        counters: Counters::default(),
        args,
    });
    let a = &ctx.args;

    let load_start = load_average();
    let server_start = procstat::read(&a.server_pids);
    let server_net = a.server_pids.first().map(u32::to_string);
    let udp_start = (server_net.as_deref().and_then(procstat::udp_drops), procstat::udp_drops("self"));
    if !a.server_pids.is_empty() && server_start.processes == 0 {
        bail!("no process {:?} to measure", a.server_pids);
    }
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let hostile_stats = Arc::new(hostile::Stats::default());
    let mut hostile_task = None;
    if let Some(from) = a.hostile_from {
        let cfg = Arc::new(hostile::Config {
            from,
            server: a.server,
            tftp_port: a.tftp_port,
            dhcp_port: a.dhcp_port,
            http_port: a.http_port,
            boot_file: a.hostile_file.clone(),
            tftp_requests: a.hostile_tftp,
            slow_http: a.hostile_http,
            garbage_pps: a.garbage_pps,
        });
        hostile_task = Some(tokio::spawn(hostile::run(cfg, hostile_stats.clone(), stop_rx.clone())));
    }
    let peaks = Arc::new(Mutex::new(Peaks::default()));
    let sampler = {
        let (pids, peaks, mut stop) = (a.server_pids.clone(), peaks.clone(), stop_rx.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stop.wait_for(|s| *s) => return,
                }
                let pids = pids.clone();
                let Ok(r) = tokio::task::spawn_blocking(move || procstat::read(&pids)).await else { return };
                let mut p = peaks.lock().unwrap_or_else(|e| e.into_inner());
                p.threads = p.threads.max(r.threads);
                p.open_files = p.open_files.max(r.open_files);
            }
        })
    };

    let lead = if hostile { Duration::from_secs(a.hostile_lead) } else { Duration::from_millis(100) };
    let t0 = Instant::now() + lead;
    let deadline = t0 + Duration::from_secs(a.deadline);
    let n = a.clients;
    eprintln!(
        "storm: {} clients against {} ({}), ramp {}s, deadline {}s{}",
        n,
        a.label,
        a.server,
        a.ramp,
        a.deadline,
        if hostile { ", hostile traffic on" } else { "" }
    );
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let ctx = ctx.clone();
        let start = t0 + Duration::from_secs_f64(ctx.args.ramp * i as f64 / n as f64);
        tasks.push(tokio::spawn(async move {
            let phase = AtomicU8::new(Phase::Dhcp as u8);
            let mut progress = Progress::default();
            let result = tokio::time::timeout_at(deadline, async {
                tokio::time::sleep_until(start).await;
                boot(&ctx, i, &phase, &mut progress).await
            })
            .await;
            let mut phases = [None; 5];
            let mut from = start;
            for (k, end) in progress.done.iter().enumerate() {
                if let Some(end) = *end {
                    phases[k] = Some(end.saturating_duration_since(from).as_secs_f64());
                    from = end;
                }
            }
            let end = Instant::now();
            let since = |t: Instant| t.saturating_duration_since(t0).as_secs_f64();
            let failed = match result {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some((Phase::from_u8(phase.load(Ordering::Relaxed)), e)),
                Err(_) => Some((
                    Phase::from_u8(phase.load(Ordering::Relaxed)),
                    format!("still in this phase at the deadline ({}s)", ctx.args.deadline),
                )),
            };
            Outcome {
                start: since(start),
                end: since(end),
                phases,
                tftp_bytes: progress.tftp_bytes,
                http_bytes: progress.http_bytes,
                failed,
            }
        }));
    }
    let mut outcomes = Vec::with_capacity(n);
    for t in tasks {
        outcomes.push(t.await.context("a client task panicked")?);
    }
    let server_end = procstat::read(&a.server_pids);
    let udp_end = (server_net.as_deref().and_then(procstat::udp_drops), procstat::udp_drops("self"));
    let _ = stop_tx.send(true);
    if let Some(t) = hostile_task {
        let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
    }
    let _ = sampler.await;
    let peaks = std::mem::take(&mut *peaks.lock().unwrap_or_else(|e| e.into_inner()));
    let mut report =
        Report::new(&ctx, &outcomes, &server_start, &server_end, peaks, hostile.then_some(&*hostile_stats));
    report.load = (load_start, load_average());
    let dropped = |a: Option<(u64, u64)>, b: Option<(u64, u64)>| Some(b?.1.saturating_sub(a?.1));
    report.udp_drops = (dropped(udp_start.0, udp_end.0), dropped(udp_start.1, udp_end.1));
    if let Some(path) = &a.json {
        std::fs::write(path, report.json().to_string() + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
    }
    {
        use std::io::Write;
        std::io::stdout().write_all(report.render().as_bytes()).context("writing the report to stdout")?;
    }
    Ok(report.booted == n)
}

struct Report {
    label: String,
    note: String,
    clients: usize,
    ramp: f64,
    deadline: u64,
    booted: usize,
    failed: BTreeMap<Phase, usize>,
    /// Most common failures first: (phase, count, one message).
    reasons: Vec<(Phase, usize, String)>,
    /// Seconds from the first client's start to the last boot, when every client booted.
    all_booted: Option<f64>,
    last_boot: Option<f64>,
    p50: Option<f64>,
    p99: Option<f64>,
    max: Option<f64>,
    /// p50 and p99 of each phase's duration over the clients that completed it.
    phase_pct: Vec<(Phase, Option<f64>, Option<f64>)>,
    server_cpu: f64,
    server_hwm_mib: f64,
    server_processes: usize,
    peaks: Peaks,
    own_cpu: f64,
    own_hwm_mib: f64,
    dhcp_retransmits: u64,
    dhcp_naks: u64,
    tftp_retransmits: u64,
    tftp_unchecked: u64,
    tftp_per_client: f64,
    http_per_client: f64,
    blob_downloads: u64,
    digests_checked: u64,
    stray_dhcp: u64,
    hostile: Option<serde_json::Value>,
    /// /proc/loadavg's 1-minute figure when the run started and when it ended.
    load: (f64, f64),
    /// UDP datagrams dropped for a full socket receive buffer during the run: in the server's namespace, in the
    /// clients' (where a count above zero means the generator could not keep up).
    udp_drops: (Option<u64>, Option<u64>),
}

impl Report {
    fn new(
        ctx: &Ctx,
        outcomes: &[Outcome],
        start: &procstat::Reading,
        end: &procstat::Reading,
        peaks: Peaks,
        hostile: Option<&hostile::Stats>,
    ) -> Report {
        let times: Vec<f64> = outcomes.iter().filter(|o| o.failed.is_none()).map(|o| o.end - o.start).collect();
        let times = sorted(times);
        let phase_pct = PHASES
            .iter()
            .map(|p| {
                let d = sorted(outcomes.iter().filter_map(|o| o.phases[*p as usize]).collect());
                (*p, percentile(&d, 0.5), percentile(&d, 0.99))
            })
            .collect();
        let booted = times.len();
        let last_boot = outcomes.iter().filter(|o| o.failed.is_none()).map(|o| o.end).max_by(f64::total_cmp);
        let mut failed = BTreeMap::new();
        let mut groups: BTreeMap<(Phase, String), (usize, String)> = BTreeMap::new();
        for (phase, why) in outcomes.iter().filter_map(|o| o.failed.as_ref()) {
            *failed.entry(*phase).or_insert(0) += 1;
            // Group messages that differ only in numbers (addresses, byte counts, blocks).
            let shape: String = why.chars().map(|c| if c.is_ascii_digit() { '#' } else { c }).collect();
            groups.entry((*phase, shape)).or_insert((0, why.clone())).0 += 1;
        }
        let mut reasons: Vec<(Phase, usize, String)> =
            groups.into_iter().map(|((p, _), (n, why))| (p, n, why)).collect();
        reasons.sort_by_key(|r| std::cmp::Reverse(r.1));
        let c = &ctx.counters;
        let sends = c.dhcp_sends.load(Ordering::Relaxed);
        let exchanges = c.dhcp_exchanges.load(Ordering::Relaxed);
        let naks = c.dhcp_naks.load(Ordering::Relaxed);
        let (own_cpu, own_hwm) = procstat::own();
        let per = |bytes: fn(&Outcome) -> u64| {
            let b: Vec<u64> = outcomes.iter().filter(|o| o.failed.is_none()).map(bytes).collect();
            if b.is_empty() {
                0.0
            } else {
                b.iter().sum::<u64>() as f64 / b.len() as f64
            }
        };
        let hostile = hostile.map(|h| {
            serde_json::json!({
                "tftp_requests_sent": h.tftp_requests_sent.load(Ordering::Relaxed),
                "tftp_send_errors": h.tftp_errors.load(Ordering::Relaxed),
                "slow_http_connects": h.slow_connects.load(Ordering::Relaxed),
                "slow_http_peak_open": h.slow_peak_open.load(Ordering::Relaxed),
                "slow_http_dropped_by_server": h.slow_dropped.load(Ordering::Relaxed),
                "slow_http_connect_failures": h.slow_connect_failures.load(Ordering::Relaxed),
                "garbage_datagrams": h.garbage_sent.load(Ordering::Relaxed),
            })
        });
        Report {
            label: ctx.args.label.clone(),
            note: ctx.args.note.clone(),
            clients: outcomes.len(),
            ramp: ctx.args.ramp,
            deadline: ctx.args.deadline,
            booted,
            failed,
            reasons,
            all_booted: (booted == outcomes.len()).then_some(last_boot).flatten(),
            last_boot,
            p50: percentile(&times, 0.5),
            p99: percentile(&times, 0.99),
            max: times.last().copied(),
            phase_pct,
            server_cpu: procstat::cpu_secs(start, end),
            server_hwm_mib: end.hwm_kib as f64 / 1024.0,
            server_processes: end.processes,
            peaks,
            own_cpu,
            own_hwm_mib: own_hwm as f64 / 1024.0,
            // Every exchange, and every restart after a NAK, sends one DISCOVER and one REQUEST at least.
            dhcp_retransmits: sends.saturating_sub(2 * (exchanges + naks)),
            dhcp_naks: naks,
            tftp_retransmits: c.tftp_retransmits.load(Ordering::Relaxed),
            tftp_unchecked: c.tftp_unchecked.load(Ordering::Relaxed),
            tftp_per_client: per(|o| o.tftp_bytes),
            http_per_client: per(|o| o.http_bytes),
            blob_downloads: c.blob_downloads.load(Ordering::Relaxed),
            digests_checked: c.digests_checked.load(Ordering::Relaxed),
            stray_dhcp: ctx.hub.stray.load(Ordering::Relaxed),
            hostile,
            load: (f64::NAN, f64::NAN),
            udp_drops: (None, None),
        }
    }

    /// The report for people, one line per figure.
    fn render(&self) -> String {
        let mut out = String::new();
        macro_rules! say {
            ($($arg:tt)*) => {{
                out.push_str(&format!($($arg)*));
                out.push('\n');
            }};
        }
        let secs = |v: Option<f64>| v.map(|v| format!("{v:.2} s")).unwrap_or_else(|| "-".into());
        say!("== {}: {} clients, ramp {} s, deadline {} s", self.label, self.clients, self.ramp, self.deadline);
        if !self.note.is_empty() {
            say!("   {}", self.note);
        }
        say!("booted             {} / {}", self.booted, self.clients);
        let failed: Vec<String> =
            PHASES.iter().map(|p| format!("{} {}", p.name(), self.failed.get(p).copied().unwrap_or(0))).collect();
        say!("failed by phase    {}", failed.join(", "));
        match self.all_booted {
            Some(t) => say!("all booted after   {t:.2} s (first client's start to last boot)"),
            None => say!("all booted after   - (not all booted; last boot at {})", secs(self.last_boot)),
        }
        say!("boot time          p50 {}, p99 {}, max {}", secs(self.p50), secs(self.p99), secs(self.max));
        let phases: Vec<String> = self
            .phase_pct
            .iter()
            .map(|(p, a, b)| format!("{} {}/{}", p.name(), secs(*a).trim_end_matches(" s"), secs(*b)))
            .collect();
        say!("phase p50/p99      {}", phases.join(", "));
        say!(
            "per booted client  TFTP {:.0} bytes{}, HTTP {:.2} MB; sha256 checked on {} of {} blob downloads",
            self.tftp_per_client,
            if self.tftp_unchecked > 0 { format!(" ({} without tsize)", self.tftp_unchecked) } else { String::new() },
            self.http_per_client / 1e6,
            self.digests_checked,
            self.blob_downloads
        );
        say!(
            "retransmissions    DHCP {}, TFTP {}; DHCP NAKs {}; DHCP replies nobody waited for: {}",
            self.dhcp_retransmits,
            self.tftp_retransmits,
            self.dhcp_naks,
            self.stray_dhcp
        );
        say!(
            "server             CPU {:.1} s, peak RSS {:.1} MiB (VmHWM summed over {} processes); peak {} threads, \
             {} open files",
            self.server_cpu,
            self.server_hwm_mib,
            self.server_processes,
            self.peaks.threads,
            self.peaks.open_files
        );
        say!("generator          CPU {:.1} s, peak RSS {:.1} MiB", self.own_cpu, self.own_hwm_mib);
        let n = |v: Option<u64>| v.map(|v| v.to_string()).unwrap_or_else(|| "-".into());
        say!(
            "UDP drops          {} in the server's namespace, {} in the clients' (receive buffers full){}",
            n(self.udp_drops.0),
            n(self.udp_drops.1),
            if self.hostile.is_some() {
                "; the clients' count includes the hostile TFTP sockets, which never read"
            } else {
                ""
            }
        );
        say!("load average       {:.2} at the start, {:.2} at the end", self.load.0, self.load.1);
        if let Some(h) = &self.hostile {
            say!(
                "hostile            {} TFTP requests never acknowledged; slow HTTP: {} open at peak, {} connects, {} \
                 closed by the server; {} garbage datagrams",
                h["tftp_requests_sent"],
                h["slow_http_peak_open"],
                h["slow_http_connects"],
                h["slow_http_dropped_by_server"],
                h["garbage_datagrams"]
            );
        }
        for (phase, count, why) in self.reasons.iter().take(6) {
            say!("failure            {count} x {}, e.g. {why}", phase.name());
        }
        out
    }

    fn json(&self) -> serde_json::Value {
        let failed: serde_json::Map<String, serde_json::Value> =
            PHASES.iter().map(|p| (p.name().to_string(), self.failed.get(p).copied().unwrap_or(0).into())).collect();
        let reasons: Vec<serde_json::Value> = self
            .reasons
            .iter()
            .map(|(p, n, why)| serde_json::json!({"phase": p.name(), "count": n, "example": why}))
            .collect();
        serde_json::json!({
            "label": self.label,
            "note": self.note,
            "clients": self.clients,
            "ramp_secs": self.ramp,
            "deadline_secs": self.deadline,
            "booted": self.booted,
            "failed": failed,
            "failures": reasons,
            "all_booted_secs": self.all_booted,
            "last_boot_secs": self.last_boot,
            "boot_p50_secs": self.p50,
            "boot_p99_secs": self.p99,
            "boot_max_secs": self.max,
            "server_cpu_secs": self.server_cpu,
            "server_peak_rss_mib": self.server_hwm_mib,
            "server_processes": self.server_processes,
            "server_peak_threads": self.peaks.threads,
            "server_peak_open_files": self.peaks.open_files,
            "generator_cpu_secs": self.own_cpu,
            "generator_peak_rss_mib": self.own_hwm_mib,
            "dhcp_retransmits": self.dhcp_retransmits,
            "dhcp_naks": self.dhcp_naks,
            "phase_p50_secs": self.phase_pct.iter().map(|(p, a, _)| (p.name().to_string(), (*a).into())).collect::<serde_json::Map<_, _>>(),
            "phase_p99_secs": self.phase_pct.iter().map(|(p, _, b)| (p.name().to_string(), (*b).into())).collect::<serde_json::Map<_, _>>(),
            "tftp_retransmits": self.tftp_retransmits,
            "tftp_without_tsize": self.tftp_unchecked,
            "tftp_bytes_per_client": self.tftp_per_client,
            "http_bytes_per_client": self.http_per_client,
            "blob_downloads": self.blob_downloads,
            "digests_checked": self.digests_checked,
            "stray_dhcp_replies": self.stray_dhcp,
            "hostile": self.hostile,
            "load_average_start": self.load.0,
            "load_average_end": self.load.1,
            "server_udp_rcvbuf_drops": self.udp_drops.0,
            "client_udp_rcvbuf_drops": self.udp_drops.1,
        })
    }
}

/// The 1-minute load average: the machine's other work shows in the figures.
fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|t| t.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN)
}

fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(f64::total_cmp);
    v
}

/// The nearest-rank percentile `q` (0..1] of sorted values.
fn percentile(sorted: &[f64], q: f64) -> Option<f64> {
    (!sorted.is_empty()).then(|| sorted[((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_are_unique_and_unicast() {
        for sequential in [false, true] {
            let macs: std::collections::HashSet<[u8; 6]> = (0..100_000).map(|i| mac(i, sequential)).collect();
            assert_eq!(macs.len(), 100_000);
            assert!(macs.iter().all(|m| m[0] & 1 == 0 && m[0] & 2 == 2));
        }
        assert_eq!(mac(258, true), [0x02, 0x4b, 0x53, 0, 1, 2]);
    }

    #[test]
    fn percentiles_by_nearest_rank() {
        let v = sorted((1..=100).map(f64::from).collect());
        assert_eq!(percentile(&v, 0.5), Some(50.0));
        assert_eq!(percentile(&v, 0.99), Some(99.0));
        assert_eq!(percentile(&[3.0], 0.99), Some(3.0));
        assert_eq!(percentile(&[], 0.5), None);
    }
}
