//! The DHCP socket loop: receives on port 67 (and 4011 in proxy mode), asks [`super::decide`], sends replies
//! and notes what happened in the state.

use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use anyhow::{Context, Result};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use super::context::DhcpContext;
use super::decide::{respond, respond_proxy, DhcpEvent, Reply};
use crate::serve::state::State;
use crate::util::unix_now;

/// Serves DHCP until `shutdown` completes: port `port` (67) and, if given, the PXE port `proxy_port` (4011), on
/// `interface` if given (SO_BINDTODEVICE) else every interface. Leases, discovered machines and boot events go to
/// `state`; each exchange is also sent to `events`. The context is read anew for every packet, so sending a new
/// one on the watch channel (reload) takes effect at once.
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
    events: Option<mpsc::UnboundedSender<DhcpEvent>>,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    let main = bind(interface.as_deref(), port)?;
    let proxy = proxy_port.map(|p| bind(interface.as_deref(), p)).transpose()?;
    info!(
        port,
        proxy_port,
        interface = interface.as_deref().unwrap_or("*"),
        leases = state.leases().map(|l| l.len()).unwrap_or(0),
        "DHCP server listening"
    );
    tokio::pin!(shutdown);
    let mut buf = vec![0u8; 4096];
    let mut proxy_buf = vec![0u8; 4096];
    loop {
        let (received, on_proxy) = tokio::select! {
            () = &mut shutdown => break,
            r = main.recv_from(&mut buf) => (r.map(|(n, from)| (buf[..n].to_vec(), from)), false),
            r = recv_optional(proxy.as_ref(), &mut proxy_buf) => {
                (r.map(|(n, from)| (proxy_buf[..n].to_vec(), from)), true)
            }
        };
        let (packet, from) = match received {
            Ok(got) => got,
            Err(e) => {
                warn!("receiving a DHCP packet: {e}");
                continue;
            }
        };
        let SocketAddr::V4(from) = from else { continue };
        let context = ctx.borrow().clone();
        let state = state.clone();
        let decided = tokio::task::spawn_blocking(move || {
            let now = unix_now();
            let reply = if on_proxy {
                respond_proxy(&packet, &context, from)
            } else {
                let mut book: &State = &state;
                respond(&packet, &context, &mut book, now)
            };
            if let Some(reply) = &reply {
                note(&state, reply, now);
            }
            reply
        })
        .await;
        let reply = match decided {
            Ok(Some(reply)) => reply,
            Ok(None) => continue,
            Err(e) => {
                warn!("deciding a DHCP reply: {e}");
                continue;
            }
        };
        if let Some(out) = &reply.packet {
            let socket = if on_proxy { proxy.as_ref().unwrap_or(&main) } else { &main };
            if let Err(e) = socket.send_to(&out.bytes, SocketAddr::V4(out.to)).await {
                warn!(to = %out.to, "sending a DHCP reply: {e}");
            }
        }
        if let (Some(tx), Some(event)) = (&events, reply.event) {
            let _ = tx.send(event);
        }
    }
    info!("DHCP server stopped");
    Ok(())
}

/// Records what a reply says happened: discovered machines and boot events.
fn note(state: &State, reply: &Reply, now: u64) {
    if let Some(u) = &reply.unknown {
        if let Err(e) = state.record_discovered(u.mac, u.arch, u.vendor_class.clone(), now) {
            warn!("{e:#}");
        }
    }
    if let Some(event) = &reply.event {
        if let Err(e) = state.record_event(event.mac, event.kind.as_str(), &event.detail(), now) {
            warn!("{e:#}");
        }
    }
}

async fn recv_optional(socket: Option<&UdpSocket>, buf: &mut [u8]) -> std::io::Result<(usize, SocketAddr)> {
    match socket {
        Some(socket) => socket.recv_from(buf).await,
        None => std::future::pending().await,
    }
}

/// A UDP socket on 0.0.0.0:`port` that may send broadcasts, bound to `interface` if given.
fn bind(interface: Option<&str>, port: u16) -> Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).context("creating a UDP socket")?;
    socket.set_reuse_address(true).context("setting SO_REUSEADDR")?;
    socket.set_broadcast(true).context("setting SO_BROADCAST")?;
    if let Some(interface) = interface {
        socket.bind_device(Some(interface.as_bytes())).with_context(|| {
            format!(
                "binding the DHCP socket to interface {interface:?} (does it exist? this needs root or CAP_NET_RAW)"
            )
        })?;
    }
    socket.set_nonblocking(true)?;
    let addr = SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
    socket.bind(&addr.into()).with_context(|| {
        format!("binding UDP port {port} (ports below 1024 need root or CAP_NET_BIND_SERVICE; is another DHCP server running?)")
    })?;
    UdpSocket::from_std(socket.into()).context("registering the DHCP socket with tokio")
}
