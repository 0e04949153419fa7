//! The DHCP socket loop: receives on port 67 (and 4011 in proxy mode), asks [`super::decide`], sends replies
//! and notes what happened in the state.
//!
//! It runs on a thread of its own, never behind file transfers or the async runtime: in a boot storm, DHCP is
//! the first thing every machine needs. Requests are taken in batches (what the sockets hold, up to
//! [`BATCH`]); each is decided at once against the in-memory lease book, the leases the batch acknowledged are
//! written in one durable transaction, and only then do its replies leave. Offers are held in memory only
//! (RFC 2131 asks nothing durable of them), so a DISCOVER costs no disk write at all.

use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use super::context::DhcpContext;
use super::decide::{respond, respond_proxy, DhcpEvent, DhcpEventKind, Reply};
use super::leases::BatchBook;
use crate::serve::metrics;
use crate::serve::state::{Record, State};
use crate::util::unix_now;

/// Most requests decided together (and acknowledged with one disk sync).
pub const BATCH: usize = 256;
/// How often the loop looks at its stop flag when no packet arrives.
const STOP_POLL: Duration = Duration::from_millis(100);

/// Serves DHCP until `shutdown` completes: port `port` (67) and, if given, the PXE port `proxy_port` (4011), on
/// `interface` if given (SO_BINDTODEVICE) else every interface. Leases, discovered machines and boot events go to
/// `state`; each exchange is also offered to `events` (a bounded queue: when it is full the event is not queued,
/// the boot log in `state` has it anyway). The context is read anew for every batch, so sending a new one on the
/// watch channel (reload) takes effect at once.
///
/// Give `interface` whenever the machine has more than one network: replies to clients without an address go to
/// 255.255.255.255, which without SO_BINDTODEVICE leaves by whatever interface the routing table picks (or fails
/// with "network unreachable" when there is no default route).
pub async fn serve(
    ctx: watch::Receiver<Arc<DhcpContext>>,
    state: Arc<State>,
    interface: Option<String>,
    port: u16,
    proxy_port: Option<u16>,
    events: Option<mpsc::Sender<DhcpEvent>>,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    let sockets = Sockets::bind(interface.as_deref(), port, proxy_port)?;
    serve_on(sockets, ctx, state, events, shutdown).await
}

/// The DHCP sockets, bound: port 67 (or another) and, in proxy mode, the PXE port.
pub struct Sockets {
    main: UdpSocket,
    proxy: Option<UdpSocket>,
    interface: Option<String>,
    port: u16,
    proxy_port: Option<u16>,
}

impl Sockets {
    /// Binds the sockets [`serve`] would, so a caller learns at once that a port is taken.
    pub fn bind(interface: Option<&str>, port: u16, proxy_port: Option<u16>) -> Result<Sockets> {
        let main = bind(interface, port)?;
        let proxy = proxy_port.map(|p| bind(interface, p)).transpose()?;
        Ok(Sockets { main, proxy, interface: interface.map(str::to_string), port, proxy_port })
    }
}

/// [`serve`] on sockets bound beforehand.
pub async fn serve_on(
    sockets: Sockets,
    ctx: watch::Receiver<Arc<DhcpContext>>,
    state: Arc<State>,
    events: Option<mpsc::Sender<DhcpEvent>>,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    let Sockets { main, proxy, interface, port, proxy_port } = sockets;
    info!(
        port,
        proxy_port,
        interface = interface.as_deref().unwrap_or("*"),
        leases = state.leases().map(|l| l.len()).unwrap_or(0),
        "DHCP server listening"
    );
    let stop = Arc::new(AtomicBool::new(false));
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    let worker = Worker { main, proxy, ctx, state, events, stop: stop.clone() };
    std::thread::Builder::new()
        .name("kiln-dhcp".into())
        .spawn(move || {
            worker.run();
            let _ = done_tx.send(());
        })
        .context("starting the DHCP thread")?;
    shutdown.await;
    stop.store(true, Ordering::Relaxed);
    let _ = done_rx.await;
    info!("DHCP server stopped");
    Ok(())
}

struct Worker {
    main: UdpSocket,
    proxy: Option<UdpSocket>,
    ctx: watch::Receiver<Arc<DhcpContext>>,
    state: Arc<State>,
    events: Option<mpsc::Sender<DhcpEvent>>,
    stop: Arc<AtomicBool>,
}

/// One request taken off a socket.
struct Received {
    packet: Vec<u8>,
    from: std::net::SocketAddrV4,
    on_proxy: bool,
}

impl Worker {
    fn run(self) {
        let mut buf = vec![0u8; 4096];
        while !self.stop.load(Ordering::Relaxed) {
            if !self.wait_readable() {
                continue;
            }
            let batch = self.drain(&mut buf);
            if !batch.is_empty() {
                self.handle(batch);
            }
        }
    }

    /// Waits until a socket has a packet (true) or the stop poll interval passes (false).
    fn wait_readable(&self) -> bool {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        let mut fds = vec![PollFd::new(self.main.as_fd(), PollFlags::POLLIN)];
        if let Some(p) = &self.proxy {
            fds.push(PollFd::new(p.as_fd(), PollFlags::POLLIN));
        }
        match poll(&mut fds, PollTimeout::from(STOP_POLL.as_millis() as u16)) {
            Ok(n) => n > 0,
            Err(nix::errno::Errno::EINTR) => false,
            Err(e) => {
                warn!("waiting for DHCP packets: {e}");
                std::thread::sleep(STOP_POLL);
                false
            }
        }
    }

    /// Takes what the sockets hold, up to [`BATCH`] requests.
    fn drain(&self, buf: &mut [u8]) -> Vec<Received> {
        let mut batch = Vec::new();
        let sockets = std::iter::once((&self.main, false)).chain(self.proxy.as_ref().map(|p| (p, true)));
        for (socket, on_proxy) in sockets {
            while batch.len() < BATCH {
                match socket.recv_from(buf) {
                    Ok((n, SocketAddr::V4(from))) => batch.push(Received { packet: buf[..n].to_vec(), from, on_proxy }),
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        warn!("receiving a DHCP packet: {e}");
                        break;
                    }
                }
            }
        }
        batch
    }

    fn send(&self, reply: &Reply, on_proxy: bool) {
        if let Some(out) = &reply.packet {
            let socket = if on_proxy { self.proxy.as_ref().unwrap_or(&self.main) } else { &self.main };
            if let Err(e) = socket.send_to(&out.bytes, SocketAddr::V4(out.to)) {
                metrics::error(metrics::ErrorKind::DhcpSend);
                warn!(to = %out.to, "sending a DHCP reply: {e}");
            }
        }
    }

    fn handle(&self, batch: Vec<Received>) {
        let context = self.ctx.borrow().clone();
        let now = unix_now();
        let mut book = BatchBook { state: &self.state, staged: Vec::new() };
        let mut replies: Vec<(Reply, bool)> = Vec::with_capacity(batch.len());
        for r in &batch {
            let reply = if r.on_proxy {
                respond_proxy(&r.packet, &context, r.from)
            } else {
                respond(&r.packet, &context, &mut book, now)
            };
            match reply {
                Some(reply) => replies.push((reply, r.on_proxy)),
                None => metrics::dhcp_ignored(&r.packet),
            }
        }
        // Offers, NAKs and proxy answers need nothing on disk: they leave at once. Acknowledgements wait for
        // their leases to be written (one sync for the batch), and are dropped if that fails: the clients ask
        // again.
        let is_ack = |r: &Reply| r.event.as_ref().is_some_and(|e| e.kind == DhcpEventKind::Ack);
        for (reply, on_proxy) in replies.iter().filter(|(r, _)| !is_ack(r)) {
            self.send(reply, *on_proxy);
        }
        let committed = match self.state.commit_leases(&book.staged) {
            Ok(()) => true,
            Err(e) => {
                warn!("not acknowledging {} lease(s): {e:#}", book.staged.len());
                metrics::error(metrics::ErrorKind::LeaseWrite);
                false
            }
        };
        let mut records = Vec::new();
        for (reply, on_proxy) in replies {
            if is_ack(&reply) {
                if !committed {
                    metrics::dhcp_failed(1);
                    continue;
                }
                self.send(&reply, on_proxy);
            }
            match (&reply.event, &reply.observed) {
                (Some(event), _) => metrics::dhcp_answered(event.kind),
                // proxyDHCP: a node's REQUEST to the site's server, its address noted.
                (None, Some(_)) => metrics::dhcp_observed(),
                // A machine that is not a node, recorded but left unanswered (no address for it).
                (None, None) => metrics::dhcp_unanswered_discover(),
            }
            if let Some((mac, ip)) = reply.observed {
                self.state.observe(mac, ip, now + u64::from(context.lease_secs));
            }
            if let Some(u) = reply.unknown {
                records.push(Record::Discovered { mac: u.mac, arch: u.arch, vendor_class: u.vendor_class, time: now });
            }
            if let Some(event) = reply.event {
                records.push(Record::Event {
                    mac: event.mac,
                    kind: event.kind.as_str().to_string(),
                    detail: event.detail(),
                    time: now,
                });
                if let Some(tx) = &self.events {
                    // A full queue means the log is behind: the event is in the state anyway.
                    let _ = tx.try_send(event);
                }
            }
        }
        if let Err(e) = self.state.record(&records) {
            warn!("{e:#}");
        }
    }
}

/// A UDP socket on 0.0.0.0:`port` that may send broadcasts, bound to `interface` if given.
fn bind(interface: Option<&str>, port: u16) -> Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).context("creating a UDP socket")?;
    socket.set_reuse_address(true).context("setting SO_REUSEADDR")?;
    socket.set_broadcast(true).context("setting SO_BROADCAST")?;
    // A storm arrives in bursts: room for a few thousand requests while a batch is decided.
    let _ = socket.set_recv_buffer_size(4 << 20);
    if let Some(interface) = interface {
        socket.bind_device(Some(interface.as_bytes())).with_context(|| {
            format!(
                "binding the DHCP socket to interface {interface:?} (does it exist? kernels before 5.7 also need \
                 CAP_NET_RAW for this)"
            )
        })?;
    }
    socket.set_nonblocking(true)?;
    let addr = SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
    socket.bind(&addr.into()).with_context(|| {
        format!("binding UDP port {port} (ports below 1024 need root or CAP_NET_BIND_SERVICE; is another DHCP server running?)")
    })?;
    Ok(socket.into())
}
