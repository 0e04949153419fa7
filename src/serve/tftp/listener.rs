//! The listening socket: receives datagrams (learning the local address each was sent to), answers what needs no
//! transfer (writes, garbage), and starts a transfer for each read request admitted under the limits.

use std::future::Future;
use std::io::IoSliceMut;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use super::admission::{Admission, Full};
use super::packet::{ErrorCode, Packet};
use super::transfer::{EventSink, OwnedRequest, Transfer};
use super::{TftpConfig, TftpEvent, READ_ONLY_MESSAGE};
use crate::serve::limits::Limits;

/// How long [`Listener::run`] waits, once shut down, for running transfers to tell their clients and stop.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// At most one warning per this interval when the system refuses transfer threads.
const SPAWN_WARNING_INTERVAL: Duration = Duration::from_secs(10);

/// The listening socket.
pub(super) struct Listener {
    socket: UdpSocket,
    local: SocketAddr,
    /// Bound to a wildcard address: ask the kernel which address each datagram was sent to.
    pktinfo: bool,
}

impl Listener {
    pub(super) fn new(socket: UdpSocket) -> anyhow::Result<Listener> {
        let local = socket.local_addr().context("reading the TFTP socket's address")?;
        let pktinfo = local.ip().is_unspecified();
        if pktinfo {
            use nix::sys::socket::{setsockopt, sockopt};
            match local {
                SocketAddr::V4(_) => setsockopt(&socket, sockopt::Ipv4PacketInfo, &true),
                SocketAddr::V6(_) => setsockopt(&socket, sockopt::Ipv6RecvPacketInfo, &true),
            }
            .with_context(|| format!("enabling packet info on the TFTP socket {local}"))?;
        }
        Ok(Listener { socket, local, pktinfo })
    }

    /// The listening loop of [`super::serve`]: reads requests, admits them under the limits, starts a transfer for
    /// each one admitted; once `shutdown` completes, stops the transfers and waits for them (at most 5 s).
    pub(super) async fn run(
        self,
        config: watch::Receiver<Arc<TftpConfig>>,
        events: Option<mpsc::Sender<TftpEvent>>,
        limits: Limits,
        shutdown: impl Future<Output = ()> + Send,
    ) -> anyhow::Result<()> {
        info!("TFTP server listening on {}", self.local);
        let current = config.borrow().clone();
        let total_limit = limits.limit("tftp_max_transfers", current.max_transfers as u64, "requests refused");
        let client_limit = limits.limit("tftp_max_per_client", current.max_per_client as u64, "requests refused");
        let events = events.map(|queue| EventSink {
            dropped: limits.limit("tftp_events", queue.max_capacity() as u64, "boot events dropped"),
            queue,
        });
        let admission = Arc::new(Admission::default());
        let stop = Arc::new(AtomicBool::new(false));
        let mut spawn_warned: Option<Instant> = None;
        let mut buf = vec![0u8; 65536];
        tokio::pin!(shutdown);
        loop {
            let received = tokio::select! {
                _ = &mut shutdown => break,
                received = self.recv(&mut buf) => received,
            };
            let (len, client, local) = match received {
                Ok(received) => received,
                Err(e) => {
                    warn!("receiving on the TFTP socket {}: {e}", self.local);
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            let Some(request) = self.dispatch(&buf[..len], client).await else { continue };
            let config = config.borrow().clone();
            total_limit.set_value(config.max_transfers as u64);
            client_limit.set_value(config.max_per_client as u64);
            // Over a limit, the request is dropped without an answer: the client retransmits it, as for a lost
            // packet, while an ERROR makes many PXE ROMs give up and boot the next device (see the module doc).
            let permit = match admission.try_admit(client.ip(), config.max_transfers, config.max_per_client) {
                Ok(permit) => permit,
                Err(full) => {
                    let limit = if full == Full::Client { &client_limit } else { &total_limit };
                    limit.refuse();
                    debug!(%client, file = request.filename, "TFTP request dropped: {} reached", limit.name());
                    continue;
                }
            };
            let transfer = Transfer::new(client, local, request, config, events.clone(), stop.clone());
            if let Err(e) = transfer.spawn(permit) {
                // The system refuses threads (memory, RLIMIT_NPROC): like a limit, said once in a while.
                if spawn_warned.is_none_or(|at| at.elapsed() >= SPAWN_WARNING_INTERVAL) {
                    warn!(%client, "TFTP request dropped: starting a transfer thread: {e}");
                    spawn_warned = Some(Instant::now());
                }
            }
        }
        stop.store(true, Ordering::Relaxed);
        let running = admission.running();
        if running > 0 {
            info!("TFTP server stopping; ending {running} transfer(s)");
        }
        if tokio::time::timeout(SHUTDOWN_GRACE, admission.idle()).await.is_err() {
            warn!("TFTP server stopped with {} transfer(s) still ending", admission.running());
        }
        Ok(())
    }

    /// Receives one datagram: its length, its sender, and the local address it was sent to (port 0), which is
    /// where the transfer socket binds.
    async fn recv(&self, buf: &mut [u8]) -> std::io::Result<(usize, SocketAddr, SocketAddr)> {
        if !self.pktinfo {
            let (len, from) = self.socket.recv_from(buf).await?;
            return Ok((len, canonical(from), canonical(SocketAddr::new(self.local.ip(), 0))));
        }
        use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags, SockaddrLike, SockaddrStorage};
        let fd = self.socket.as_raw_fd();
        self.socket
            .async_io(tokio::io::Interest::READABLE, || {
                let mut iov = [IoSliceMut::new(&mut *buf)];
                let mut control = nix::cmsg_space!(nix::libc::in6_pktinfo);
                let msg = recvmsg::<SockaddrStorage>(fd, &mut iov, Some(&mut control), MsgFlags::empty())?;
                let mut local = None;
                for cmsg in msg.cmsgs()? {
                    match cmsg {
                        ControlMessageOwned::Ipv4PacketInfo(info) => {
                            let ip = Ipv4Addr::from(u32::from_be(info.ipi_spec_dst.s_addr));
                            local = Some(SocketAddr::new(IpAddr::V4(ip), 0));
                        }
                        ControlMessageOwned::Ipv6PacketInfo(info) => {
                            let ip = Ipv6Addr::from(info.ipi6_addr.s6_addr);
                            // Binding a link-local address needs its interface.
                            let scope = if ip.is_unicast_link_local() { info.ipi6_ifindex } else { 0 };
                            local = Some(canonical(SocketAddr::V6(SocketAddrV6::new(ip, 0, 0, scope))));
                        }
                        _ => {}
                    }
                }
                let from = msg.address.as_ref().and_then(storage_to_socket_addr).ok_or_else(|| {
                    std::io::Error::other(format!(
                        "datagram without a usable sender address (family {:?})",
                        msg.address.as_ref().and_then(|a| a.family())
                    ))
                })?;
                Ok((msg.bytes, from, local.unwrap_or_else(|| canonical(SocketAddr::new(self.local.ip(), 0)))))
            })
            .await
    }

    /// Answers what the listening socket can answer itself; returns read requests, which need a transfer.
    async fn dispatch(&self, datagram: &[u8], client: SocketAddr) -> Option<OwnedRequest> {
        let reply = match Packet::parse(datagram) {
            Ok(Packet::Read(request)) => {
                return Some(OwnedRequest {
                    filename: request.filename.to_string(),
                    mode: request.mode,
                    options: request.options.iter().map(|(n, v)| (n.to_string(), v.to_string())).collect(),
                })
            }
            Ok(Packet::Write(request)) => {
                info!(%client, file = request.filename, "TFTP write request refused: read-only server");
                (ErrorCode::AccessViolation, READ_ONLY_MESSAGE.to_string())
            }
            Ok(Packet::Error { code, message }) => {
                debug!(%client, "TFTP error packet on the listening port ignored: {code:?} {message:?}");
                return None;
            }
            Ok(other) => {
                debug!(%client, "unexpected TFTP packet on the listening port: {other:?}");
                (ErrorCode::IllegalOperation, "only read requests are accepted on this port".to_string())
            }
            Err(e) => {
                debug!(%client, "malformed TFTP packet ({} bytes): {e}", datagram.len());
                (ErrorCode::IllegalOperation, format!("malformed packet: {e}"))
            }
        };
        let packet = Packet::Error { code: reply.0, message: &reply.1 }.encode();
        if let Err(e) = self.socket.send_to(&packet, client).await {
            debug!(%client, "sending a TFTP error: {e}");
        }
        None
    }
}

fn storage_to_socket_addr(storage: &nix::sys::socket::SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = storage.as_sockaddr_in() {
        return Some(SocketAddr::V4((*v4).into()));
    }
    storage.as_sockaddr_in6().map(|v6| canonical(SocketAddr::V6((*v6).into())))
}

/// IPv4-mapped IPv6 addresses (from a dual-stack socket) as plain IPv4, so a transfer socket can be IPv4.
pub(super) fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), v6.port()),
            None => addr,
        },
        SocketAddr::V4(_) => addr,
    }
}
