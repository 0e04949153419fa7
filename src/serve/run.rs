//! `kiln serve`: starts DHCP, TFTP and HTTP over one site, reloads it on SIGHUP, stops on
//! SIGTERM/SIGINT, and keeps the boot log.

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result};
use tokio::sync::{mpsc, watch};

use super::http::HttpEvent;
use super::site::Site;
use super::state::State;
use super::tftp::{TftpConfig, TftpEvent, TftpFiles};
use crate::net::Mac;
use crate::recipe::{DhcpMode, LoadedRecipe};
use crate::store::Store;
use crate::util::unix_now as now;

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
    Site::load(&loaded, store)
}

fn tftp_config(site: &Site) -> TftpConfig {
    let mut files = TftpFiles::default();
    for file in site.boot_files.iter() {
        files.named.insert(file.name.clone(), file.path.clone());
    }
    TftpConfig { files, ..TftpConfig::default() }
}

/// Runs the server until SIGTERM or SIGINT.
pub fn run(opts: ServeOptions) -> Result<ExitCode> {
    let store = Store::open(&opts.store_root)?;
    let site = load(&opts, &store)?;
    let state_dir = super::state_dir(opts.state_dir.as_deref(), Some(&site.server), &opts.store_root);
    crate::util::mkdir_p(&state_dir)?;
    let state = Arc::new(State::open(&state_dir)?);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(crate::util::thread_count().clamp(2, 8))
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(serve(opts, store, site, state, state_dir))
}

async fn serve(
    opts: ServeOptions,
    store: Store,
    site: Site,
    state: Arc<State>,
    state_dir: PathBuf,
) -> Result<ExitCode> {
    use tokio::signal::unix::{signal, SignalKind};
    let http_port = site.http_port;
    let tftp_port = site.server.tftp_port.unwrap_or(69);
    let bind = Ipv4Addr::UNSPECIFIED;
    let http = tokio::net::TcpListener::bind(SocketAddr::from((bind, http_port)))
        .await
        .with_context(|| format!("listening for HTTP on port {http_port}"))?;
    let tftp = tokio::net::UdpSocket::bind(SocketAddr::from((bind, tftp_port)))
        .await
        .with_context(|| format!("listening for TFTP on port {tftp_port}"))?;
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

    let (site_tx, site_rx) = watch::channel(Arc::new(site));
    let (tftp_tx, tftp_rx) = watch::channel(Arc::new(tftp_config(&site_rx.borrow())));
    let (stop_tx, stop_rx) = watch::channel(false);
    let (http_ev_tx, mut http_ev) = mpsc::unbounded_channel::<HttpEvent>();
    let (tftp_ev_tx, mut tftp_ev) = mpsc::channel::<TftpEvent>(1024);
    let limits = super::limits::Limits::default();

    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(super::http::serve(http, site_rx.clone(), Some(http_ev_tx), stop_rx.clone()));
    let mut tftp_stop = stop_rx.clone();
    tasks.spawn(super::tftp::serve(tftp, tftp_rx, Some(tftp_ev_tx), limits.clone(), async move {
        let _ = tftp_stop.wait_for(|s| *s).await;
    }));
    let mut limits_stop = stop_rx.clone();
    tasks.spawn(async move {
        let stop = async move {
            let _ = limits_stop.wait_for(|s| *s).await;
        };
        limits.report_every(std::time::Duration::from_secs(10), |line| eprintln!("{line}"), stop).await;
        Ok(())
    });
    if let Some(listener) = control {
        tasks.spawn(super::control::serve(listener, state.clone(), stop_rx.clone()));
    }
    let mut dhcp_ev = super::dhcp_glue::start(&mut tasks, &site_rx, state.clone(), stop_rx.clone())?;

    let mut hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut booted: BTreeSet<Mac> = BTreeSet::new();
    let mut peers = Peers::default();
    let result = loop {
        tokio::select! {
            _ = hup.recv() => {
                match load(&opts, &store) {
                    Ok(site) => {
                        let _ = tftp_tx.send(Arc::new(tftp_config(&site)));
                        println!("kiln serve: reloaded {} ({} nodes, {} images)", opts.recipe.display(), site.nodes.len(), site.bundles.len());
                        let _ = site_tx.send(Arc::new(site));
                    }
                    Err(e) => eprintln!("kiln serve: reload failed, keeping the running configuration: {e:#}"),
                }
            }
            _ = term.recv() => break Ok(ExitCode::SUCCESS),
            _ = int.recv() => break Ok(ExitCode::SUCCESS),
            Some(ev) = http_ev.recv() => {
                let Some(mac) = ev.mac.or_else(|| peers.mac_of(ev.client, &site_rx.borrow(), &state)) else {
                    println!("{} {} (no machine known at this address) {} {}", stamp(), ev.client, ev.kind, ev.detail);
                    continue;
                };
                if ev.mac.is_some() {
                    peers.learn(ev.client, mac);
                }
                let name = record(&state, &site_rx.borrow(), mac, ev.kind, &ev.detail);
                if ev.kind == "script" {
                    if name.is_none() {
                        let _ = state.record_discovered(mac, None, Some("iPXE".into()), now());
                    }
                    booted.insert(mac);
                }
                println!("{} {} {} {} {} (nodes booted: {})", stamp(), mac, name.as_deref().unwrap_or("unknown"), ev.kind, ev.detail, booted.len());
            }
            Some(ev) = tftp_ev.recv() => {
                let (client, detail) = match &ev {
                    TftpEvent::Finished { client, file, bytes, secs } => (client, format!("{file} {bytes} bytes in {secs:.1}s")),
                    TftpEvent::Failed { client, file, error } => (client, format!("{file} failed: {error}")),
                    TftpEvent::Started { .. } => continue,
                };
                match peers.mac_of(client.ip(), &site_rx.borrow(), &state) {
                    Some(mac) => {
                        let name = record(&state, &site_rx.borrow(), mac, "tftp", &detail);
                        println!("{} {} {} tftp {detail}", stamp(), mac, name.as_deref().unwrap_or("unknown"));
                    }
                    None => println!("{} tftp {client} {detail}", stamp()),
                }
            }
            Some(ev) = async { match dhcp_ev.as_mut() { Some(rx) => rx.recv().await, None => std::future::pending().await } } => {
                let name = site_rx.borrow().node(ev.mac).map(|n| n.name.clone());
                println!("{} {} {} {} {}", stamp(), ev.mac, name.as_deref().unwrap_or("unknown"), ev.kind.as_str(), ev.detail());
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
    let _ =
        tokio::time::timeout(std::time::Duration::from_secs(6), async { while tasks.join_next().await.is_some() {} })
            .await;
    if socket.exists() {
        let _ = std::fs::remove_file(&socket);
    }
    println!("kiln serve: stopped");
    result
}

/// Records a boot event of `mac` in the state (a failure is logged, not fatal); returns the node's name.
fn record(state: &State, site: &Site, mac: Mac, kind: &str, detail: &str) -> Option<String> {
    if let Err(e) = state.record_event(mac, kind, detail, now()) {
        tracing::warn!("recording a boot event: {e:#}");
    }
    site.node(mac).map(|n| n.name.clone())
}

/// Which machine is at which address, for attributing requests that name no MAC (blob downloads, TFTP).
#[derive(Default)]
struct Peers {
    /// Learned from requests that name a MAC (`/ipxe/{mac}`, `/overlay/{mac}`) from that address.
    seen: HashMap<IpAddr, Mac>,
}

impl Peers {
    /// Bound on remembered addresses (a /16 worth); beyond it the map starts afresh.
    const MAX: usize = 65_536;

    fn learn(&mut self, ip: IpAddr, mac: Mac) {
        let ip = Self::canonical(ip);
        if self.seen.len() >= Self::MAX && !self.seen.contains_key(&ip) {
            self.seen.clear();
        }
        self.seen.insert(ip, mac);
    }

    fn canonical(ip: IpAddr) -> IpAddr {
        match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        }
    }

    /// The machine at `ip`: the last one that named itself from there, else the holder of its DHCP lease, else the
    /// node with that fixed address.
    fn mac_of(&self, ip: IpAddr, site: &Site, state: &State) -> Option<Mac> {
        let ip = Self::canonical(ip);
        if let Some(mac) = self.seen.get(&ip) {
            return Some(*mac);
        }
        let IpAddr::V4(v4) = ip else { return None };
        if let Some(lease) = state.lease_on(v4) {
            return Some(lease.mac);
        }
        site.nodes.iter().find(|n| n.ipv4 == Some(v4)).map(|n| n.mac)
    }
}

fn stamp() -> String {
    let secs = now();
    format!("{:02}:{:02}:{:02}", (secs / 3600) % 24, (secs / 60) % 60, secs % 60)
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
