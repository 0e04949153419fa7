//! `kiln serve`: starts DHCP, TFTP and HTTP over one site, reloads it on SIGHUP, stops on
//! SIGTERM/SIGINT, and keeps the boot log ([`super::bootlog`]).
//!
//! A reload is read and checked off the serving threads (re-hashing every bundle takes seconds); the running
//! configuration stays until the new one is complete. A reload that would change what the server listens on
//! (ports, DHCP mode, interface) is refused with "restart needed": the listeners are bound once, at start.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::sync::{mpsc, watch};

use super::bootlog::{BootLog, Recorder, EVENT_QUEUE, LOG_LINES_PER_SECOND};
use super::http::{self, HttpEvent};
use super::limits::Limits;
use super::site::Site;
use super::state::State;
use super::status::{Live, Tracker};
use super::tftp::{TftpConfig, TftpEvent, TftpFiles};
use crate::recipe::{DhcpMode, LoadedRecipe};
use crate::store::Store;

/// What `kiln serve` was asked on the command line (overrides of the recipe's `[server]`).
#[derive(Debug, Clone, Default)]
pub struct ServeOptions {
    pub recipe: PathBuf,
    pub store_root: PathBuf,
    pub dhcp: Option<DhcpMode>,
    pub interface: Option<String>,
    pub http_port: Option<u16>,
    pub tftp_port: Option<u16>,
    pub dhcp_port: Option<u16>,
    pub state_dir: Option<PathBuf>,
}

/// How often a limit that keeps being hit is reported.
const REPORT_EVERY: Duration = Duration::from_secs(10);

fn load(opts: &ServeOptions, store: &Store) -> Result<Site> {
    let mut loaded = LoadedRecipe::load(&opts.recipe)?;
    if let Some(server) = loaded.recipe.server.as_mut() {
        if opts.dhcp.is_some() {
            server.dhcp = opts.dhcp;
        }
        if opts.interface.is_some() {
            server.interface = opts.interface.clone();
        }
        if opts.http_port.is_some() {
            server.http_port = opts.http_port;
        }
        if opts.tftp_port.is_some() {
            server.tftp_port = opts.tftp_port;
        }
        if opts.dhcp_port.is_some() {
            server.dhcp_port = opts.dhcp_port;
        }
    }
    crate::build::site::pull_for_serve(&loaded, store);
    Site::load(&loaded, store)
}

fn tftp_config(site: &Site) -> TftpConfig {
    let mut files = TftpFiles::default();
    for file in site.boot_files.iter() {
        files.named.insert(file.name.clone(), file.path.clone());
    }
    let d = TftpConfig::default();
    let server = &site.server;
    TftpConfig {
        files,
        max_transfers: server.tftp_max_transfers.unwrap_or(d.max_transfers),
        max_per_client: server.tftp_max_per_client.unwrap_or(d.max_per_client),
        max_timeout: server.tftp_max_timeout.map(Duration::from_secs).unwrap_or(d.max_timeout),
        stall_limit: server.tftp_stall_limit.map(Duration::from_secs).unwrap_or(d.stall_limit),
        ..d
    }
}

/// What the server listens on: bound once, so a reload may not change it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Listeners {
    http_port: u16,
    tftp_port: u16,
    dhcp_port: u16,
    dhcp: DhcpMode,
    interface: Option<String>,
}

impl Listeners {
    fn of(site: &Site) -> Listeners {
        Listeners {
            http_port: site.http_port,
            tftp_port: site.server.tftp_port.unwrap_or(69),
            dhcp_port: site.server.dhcp_port.unwrap_or(67),
            dhcp: site.dhcp_mode(),
            interface: site.server.interface.clone(),
        }
    }

    /// What `new` changes, as `key OLD → NEW` phrases.
    fn changes(&self, new: &Listeners) -> Vec<String> {
        let mut out = Vec::new();
        let mut note = |key: &str, old: String, new: String| {
            if old != new {
                out.push(format!("{key} {old} → {new}"));
            }
        };
        note("http_port", self.http_port.to_string(), new.http_port.to_string());
        note("tftp_port", self.tftp_port.to_string(), new.tftp_port.to_string());
        note("dhcp_port", self.dhcp_port.to_string(), new.dhcp_port.to_string());
        note("dhcp", self.dhcp.to_string(), new.dhcp.to_string());
        let iface = |i: &Option<String>| i.clone().unwrap_or_else(|| "(all)".into());
        note("interface", iface(&self.interface), iface(&new.interface));
        out
    }
}

/// Raises the open-file limit to what the system allows (the default 1,024 is less than the connections and
/// transfers kiln serve holds in a boot storm), and says so when that is less than the configured limits need.
fn raise_open_files(site: &Site) {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let need = site.http_limits.max_connections as u64 + 2 * tftp_config(site).max_transfers as u64 + 256;
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) => {
            if soft < hard {
                if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                    eprintln!("kiln serve: warning: cannot raise the open-file limit from {soft} to {hard}: {e}");
                }
            }
            if hard < need {
                eprintln!(
                    "kiln serve: warning: the open-file limit is {hard}, less than the {need} the configured limits \
                     may need (http_max_connections + 2 × tftp_max_transfers + 256): raise it (LimitNOFILE= in \
                     the systemd unit, ulimit -n) or lower those limits"
                );
            }
        }
        Err(e) => eprintln!("kiln serve: warning: cannot read the open-file limit: {e}"),
    }
}

/// Runs the server until SIGTERM or SIGINT.
pub fn run(opts: ServeOptions) -> Result<ExitCode> {
    let store = Store::open(&opts.store_root)?;
    let site = load(&opts, &store)?;
    raise_open_files(&site);
    let state_dir = super::state_dir(opts.state_dir.as_deref(), Some(&site.server), &opts.store_root);
    crate::util::mkdir_p(&state_dir)?;
    let state = Arc::new(State::open(&state_dir)?);
    state.set_limits(site.state_limits);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(crate::util::thread_count().clamp(2, 8))
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(serve(opts, Arc::new(store), site, state, state_dir))
}

async fn serve(
    opts: ServeOptions,
    store: Arc<Store>,
    site: Site,
    state: Arc<State>,
    state_dir: PathBuf,
) -> Result<ExitCode> {
    use tokio::signal::unix::{signal, SignalKind};
    // Before anything listens: a client that sees the server up may signal it at once.
    let mut hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let listeners = Listeners::of(&site);
    let bind = Ipv4Addr::UNSPECIFIED;
    let http = tokio::net::TcpListener::bind(SocketAddr::from((bind, listeners.http_port)))
        .await
        .with_context(|| format!("listening for HTTP on port {}", listeners.http_port))?;
    let tftp = tokio::net::UdpSocket::bind(SocketAddr::from((bind, listeners.tftp_port)))
        .await
        .with_context(|| format!("listening for TFTP on port {}", listeners.tftp_port))?;
    announce(&site, http.local_addr()?.port(), tftp.local_addr()?.port());
    let summary = state.summary()?;
    println!(
        "kiln serve: state {}: {} leases, {} discovered machines, {} boot events",
        state_dir.display(),
        summary.leases,
        summary.discovered,
        summary.events
    );
    let socket = state_dir.join(super::control::SOCKET);
    let control = super::control::bind(&socket);
    super::metrics::started(crate::util::unix_now());
    // Clients that connect meanwhile wait in the listeners' backlogs.
    let agent = load_agent();

    let limits = Limits::default();
    let queue = site.server.event_queue.unwrap_or(EVENT_QUEUE).max(1);
    let recorder = Recorder::start(state.clone(), queue, limits.clone()).context("starting the boot log writer")?;
    // What was heard of the nodes before a restart, and no trace of nodes gone from the recipe.
    state.forget_heartbeats(|mac| site.node(mac).is_some())?;
    let seen = super::status::seen_in(&state, site.nodes.iter().map(|n| n.mac))?;
    let tracker = Arc::new(Tracker::new(seen, Some(recorder.clone())));
    let mut bootlog = BootLog::new(recorder, limits.clone());
    bootlog.set_lines_per_second(site.server.log_lines_per_second.unwrap_or(LOG_LINES_PER_SECOND));
    bootlog.track(tracker.clone());

    let (site_tx, site_rx) = watch::channel(Arc::new(site));
    let (tftp_tx, tftp_rx) = watch::channel(Arc::new(tftp_config(&site_rx.borrow())));
    let (stop_tx, stop_rx) = watch::channel(false);
    let (http_ev_tx, mut http_ev) = mpsc::channel::<HttpEvent>(queue);
    let (tftp_ev_tx, mut tftp_ev) = mpsc::channel::<TftpEvent>(queue);

    let mut tasks = tokio::task::JoinSet::new();
    let shared = http::Shared {
        site: site_rx.clone(),
        state: Some(state.clone()),
        events: Some(http_ev_tx),
        limits: limits.clone(),
        status: Some(tracker.clone()),
        agent,
    };
    tasks.spawn(http::serve(http, shared, stop_rx.clone()));
    let mut tftp_stop = stop_rx.clone();
    tasks.spawn(super::tftp::serve(tftp, tftp_rx, Some(tftp_ev_tx), limits.clone(), async move {
        let _ = tftp_stop.wait_for(|s| *s).await;
    }));
    let mut limits_stop = stop_rx.clone();
    let reported = limits.clone();
    tasks.spawn(async move {
        let stop = async move {
            let _ = limits_stop.wait_for(|s| *s).await;
        };
        reported.report_every(REPORT_EVERY, |line| eprintln!("{line}"), stop).await;
        Ok(())
    });
    if let Some(listener) = control {
        let live = Live { tracker: tracker.clone(), site: site_rx.clone() };
        tasks.spawn(super::control::serve(listener, state.clone(), Some(live), stop_rx.clone()));
    }
    let mut dhcp_ev = super::dhcp_glue::start(&mut tasks, &site_rx, state.clone(), queue, stop_rx.clone())?;
    // systemd (Type=notify): READY=1 now that every server is started, STOPPING=1 once shutdown begins.
    tasks.spawn(crate::util::notify::ready_until_stopped(stop_rx.clone()));

    // One reload at a time; a SIGHUP during one asks for another once it is done.
    let (reload_tx, mut reload_rx) = mpsc::channel::<Result<Site>>(1);
    let (mut reloading, mut again) = (false, false);
    let result = loop {
        tokio::select! {
            _ = hup.recv() => {
                if reloading {
                    again = true;
                } else {
                    reloading = true;
                    spawn_reload(&opts, &store, &reload_tx);
                }
            }
            Some(loaded) = reload_rx.recv() => {
                reloading = false;
                match loaded {
                    Ok(site) => {
                        let changes = listeners.changes(&Listeners::of(&site));
                        if changes.is_empty() {
                            let _ = tftp_tx.send(Arc::new(tftp_config(&site)));
                            state.set_limits(site.state_limits);
                            bootlog.set_lines_per_second(site.server.log_lines_per_second.unwrap_or(LOG_LINES_PER_SECOND));
                            println!("kiln serve: reloaded {} ({} nodes, {} images)", opts.recipe.display(), site.nodes.len(), site.bundles.len());
                            tracker.retain(|mac| site.node(mac).is_some());
                            let _ = site_tx.send(Arc::new(site));
                        } else {
                            eprintln!(
                                "kiln serve: reload refused, restart needed: {} changes what the server listens on ({}); \
                                 the running configuration stays",
                                opts.recipe.display(),
                                changes.join(", ")
                            );
                        }
                    }
                    Err(e) => eprintln!("kiln serve: reload failed, keeping the running configuration: {e:#}"),
                }
                if again {
                    again = false;
                    reloading = true;
                    spawn_reload(&opts, &store, &reload_tx);
                }
            }
            _ = term.recv() => break Ok(ExitCode::SUCCESS),
            _ = int.recv() => break Ok(ExitCode::SUCCESS),
            Some(ev) = http_ev.recv() => bootlog.http(ev, &site_rx.borrow(), &state),
            Some(ev) = tftp_ev.recv() => bootlog.tftp(ev, &site_rx.borrow(), &state),
            Some(ev) = async { match dhcp_ev.as_mut() { Some(rx) => rx.recv().await, None => std::future::pending().await } } => {
                bootlog.dhcp(ev, &site_rx.borrow());
            }
            Some(done) = tasks.join_next() => {
                match done {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => break Err(e),
                    Err(e) => break Err(anyhow::anyhow!("a server task failed: {e}")),
                }
            }
        }
    };
    let _ = stop_tx.send(true);
    // Tasks that follow reloads end when nothing more can come.
    drop((site_tx, tftp_tx));
    let _ = tokio::time::timeout(Duration::from_secs(6), async { while tasks.join_next().await.is_some() {} }).await;
    if socket.exists() {
        let _ = std::fs::remove_file(&socket);
    }
    println!("kiln serve: stopped");
    result
}

/// The agent's initrd segment that goes out with every overlay, packed once from `kiln-node`; without it the
/// server still serves, and says what nodes will lack.
fn load_agent() -> Option<Arc<super::heartbeat::Agent>> {
    let packed = crate::util::node_binary().and_then(|path| Ok((super::heartbeat::agent_archive(&path)?, path)));
    match packed {
        Ok((agent, path)) => {
            println!(
                "kiln serve: node agent {} ({}, {} with the overlay of every {} node)",
                path.display(),
                agent.arch,
                crate::util::human_size(agent.archive.len() as u64),
                agent.arch
            );
            Some(Arc::new(agent))
        }
        Err(e) => {
            eprintln!(
                "kiln serve: warning: no node agent for the nodes ({e:#}); kiln node status will show them booting, \
                 never up"
            );
            None
        }
    }
}

/// Reads the recipe and checks every bundle on a blocking thread; the result arrives on `done`.
fn spawn_reload(opts: &ServeOptions, store: &Arc<Store>, done: &mpsc::Sender<Result<Site>>) {
    let (opts, store, done) = (opts.clone(), store.clone(), done.clone());
    tokio::task::spawn_blocking(move || {
        let _ = done.blocking_send(load(&opts, &store));
    });
}

/// The firmware files served, e.g. `undionly.kpxe, snponly.efi`, or what to do when there are none.
fn firmware_list(site: &Site) -> String {
    let names: Vec<&str> = site.boot_files.iter().map(|f| f.name.as_str()).collect();
    if names.is_empty() {
        "none (machines whose firmware runs iPXE already boot; for others set [server] ipxe or [server.boot_files])"
            .to_string()
    } else {
        names.join(", ")
    }
}

fn announce(site: &Site, http_port: u16, tftp_port: u16) {
    println!(
        "kiln serve: {}/{} on {}, DHCP {}, HTTP port {http_port}, TFTP port {tftp_port}",
        site.address,
        site.prefix,
        site.server.interface.as_deref().unwrap_or("all interfaces"),
        site.dhcp_mode(),
    );
    println!(
        "kiln serve: {} nodes, images: {}; firmware files: {}",
        site.nodes.len(),
        site.bundles.keys().cloned().collect::<Vec<_>>().join(", "),
        firmware_list(site)
    );
}
