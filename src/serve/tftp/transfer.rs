//! One read transfer, from refusal or OACK to the last ACK: its own UDP socket and its own thread, windows of DATA
//! sent with UDP segmentation offload (or `sendmmsg`), retransmission with backoff, and the limits on how long a
//! transfer may go without progress.

use std::collections::VecDeque;
use std::io::IoSlice;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::sync::mpsc::{self, error::TrySendError};
use tracing::{debug, info, warn};

use super::admission::Permit;
use super::listener::canonical;
use super::negotiate::{negotiate, Negotiated};
use super::packet::{data_header, ErrorCode, Mode, Packet};
use super::{TftpConfig, TftpEvent};
use crate::serve::limits::Limit;

/// Retransmission backoff doubles up to this many times the negotiated timeout, and at most to [`MAX_BACKOFF`].
const BACKOFF_FACTOR: u32 = 8;
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// Read-ahead of each transfer's file, so a small `blksize` does not cost one blocking read per block.
const READ_BUFFER: usize = 256 * 1024;

/// What a transfer waits for next.
enum Incoming {
    Ack(u16),
    ClientError(ErrorCode, String),
    Timeout,
    Stopped,
}

/// Why a transfer ended early.
enum Ending {
    /// Worth a `Failed` event and a warning.
    Failed(String),
    /// The client ended the transfer after the OACK (usually a `tsize` probe): not a failure.
    Probe(String),
}

/// Where transfers report their outcomes: a bounded queue, so a boot log that falls behind costs dropped events
/// (counted under the `tftp_events` limit), never unbounded memory.
#[derive(Debug, Clone)]
pub(super) struct EventSink {
    pub(super) queue: mpsc::Sender<TftpEvent>,
    pub(super) dropped: Arc<Limit>,
}

impl EventSink {
    fn emit(&self, event: TftpEvent) {
        match self.queue.try_send(event) {
            Ok(()) | Err(TrySendError::Closed(_)) => {}
            Err(TrySendError::Full(_)) => self.dropped.refuse(),
        }
    }
}

/// A read request, owned so its transfer's thread can keep it.
#[derive(Debug, Clone)]
pub(super) struct OwnedRequest {
    pub(super) filename: String,
    pub(super) mode: Mode,
    pub(super) options: Vec<(String, String)>,
}

/// One read request, from refusal or OACK to the last ACK, on its own socket and its own thread: a blocking
/// `recv` wakes as soon as the client's ACK arrives, which is what lock-step transfers (every PXE ROM) wait on.
pub(super) struct Transfer {
    client: SocketAddr,
    /// Where the request was sent, port 0: the transfer socket binds there.
    local: SocketAddr,
    request: OwnedRequest,
    config: Arc<TftpConfig>,
    events: Option<EventSink>,
    stop: Arc<AtomicBool>,
    /// When the client last moved the transfer on (the request, then each ACK that acknowledged new blocks).
    progress_at: Instant,
}

/// How often a waiting transfer looks at the stop flag.
const STOP_POLL: Duration = Duration::from_millis(100);
/// Whether UDP segmentation offload works here; cleared the first time the kernel refuses it.
static GSO: AtomicBool = AtomicBool::new(true);
/// Linux's limit on segments per GSO send (UDP_MAX_SEGMENTS).
const GSO_MAX_SEGMENTS: usize = 64;
/// Bytes per GSO send: the payload of one (unsegmented) UDP datagram must fit an IP packet.
const GSO_MAX_BYTES: usize = 65_000;
/// Stack of a transfer's thread. A transfer keeps its buffers on the heap; the default 2 MiB per thread would only
/// reserve address space, up to a gigabyte of it at 512 transfers.
const TRANSFER_STACK: usize = 512 * 1024;

impl Transfer {
    pub(super) fn new(
        client: SocketAddr,
        local: SocketAddr,
        request: OwnedRequest,
        config: Arc<TftpConfig>,
        events: Option<EventSink>,
        stop: Arc<AtomicBool>,
    ) -> Transfer {
        Transfer { client, local, request, config, events, stop, progress_at: Instant::now() }
    }

    /// Runs the transfer on a thread of its own, which holds `permit` (its place under the limits) until it ends.
    /// Threads are not pooled: starting one costs microseconds, a transfer lasts from milliseconds to seconds, and
    /// the admission limits bound how many exist at once.
    pub(super) fn spawn(self, permit: Permit) -> std::io::Result<()> {
        std::thread::Builder::new().name("kiln-tftp".to_string()).stack_size(TRANSFER_STACK).spawn(move || {
            let _permit = permit;
            self.run();
        })?;
        Ok(())
    }

    fn run(mut self) {
        let client = self.client;
        let file = self.request.filename.clone();
        let socket = match self.bind() {
            Ok(socket) => socket,
            Err(e) => {
                let error = format!("{e:#}");
                warn!(%client, file, "TFTP transfer not started: {error}");
                self.emit(TftpEvent::Failed { client, file, error });
                return;
            }
        };
        let start = Instant::now();
        match self.send_file(&socket) {
            Ok(bytes) => {
                let secs = start.elapsed().as_secs_f64();
                let rate = bytes as f64 / secs.max(1e-6) / 1e6;
                info!(%client, file, bytes, "TFTP transfer finished in {secs:.3} s ({rate:.1} MB/s)");
                crate::serve::metrics::tftp_transfer(true, bytes);
                self.emit(TftpEvent::Finished { client, file, bytes, secs });
            }
            Err(Ending::Probe(reason)) => debug!(%client, file, "TFTP client ended after the OACK: {reason}"),
            Err(Ending::Failed(error)) => {
                crate::serve::metrics::tftp_transfer(false, 0);
                warn!(%client, file, "TFTP transfer failed: {error}");
                self.emit(TftpEvent::Failed { client, file, error });
            }
        }
    }

    fn emit(&self, event: TftpEvent) {
        if let Some(events) = &self.events {
            events.emit(event);
        }
    }

    /// When the transfer is abandoned if the client does not move it on: `stall_limit` after its last progress.
    fn give_up_at(&self) -> Instant {
        self.progress_at + self.config.stall_limit
    }

    /// The retransmission deadline `timeout` from now, kept within the stall limit.
    fn deadline(&self, timeout: Duration) -> Instant {
        (Instant::now() + timeout).min(self.give_up_at())
    }

    fn stalled(&self) -> bool {
        Instant::now() >= self.give_up_at()
    }

    fn bind(&self) -> anyhow::Result<std::net::UdpSocket> {
        let local = match (self.local, self.client) {
            (SocketAddr::V4(_), SocketAddr::V4(_)) | (SocketAddr::V6(_), SocketAddr::V6(_)) => self.local,
            (_, SocketAddr::V4(_)) => SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), 0),
            (_, SocketAddr::V6(_)) => SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), 0),
        };
        let socket =
            std::net::UdpSocket::bind(local).with_context(|| format!("binding a TFTP transfer socket on {local}"))?;
        socket.set_read_timeout(Some(STOP_POLL)).context("setting the TFTP transfer socket's timeout")?;
        Ok(socket)
    }

    fn send_error(&self, socket: &std::net::UdpSocket, code: ErrorCode, message: &str) {
        let packet = Packet::Error { code, message }.encode();
        if let Err(e) = socket.send_to(&packet, self.client) {
            debug!(client = %self.client, "sending a TFTP error: {e}");
        }
    }

    fn send(&self, socket: &std::net::UdpSocket, packet: &[u8]) -> Result<(), Ending> {
        loop {
            match socket.send_to(packet, self.client) {
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Ending::Failed(format!("sending: {e}"))),
            }
        }
    }

    /// Sends `packets` (DATA packets in block order) with as few system calls as the kernel allows, so a window
    /// leaves in one go and the client wakes once per window rather than once per block: UDP segmentation
    /// offload (one `sendmsg(2)` of up to 64 KiB that the kernel cuts into DATA packets; only the file's last block
    /// may be shorter, which is what GSO requires) where the route supports it, else `sendmmsg(2)`.
    fn send_batch<'p>(
        &self,
        socket: &std::net::UdpSocket,
        packets: impl Iterator<Item = &'p Vec<u8>>,
    ) -> Result<(), Ending> {
        use nix::sys::socket::{sendmmsg, sendmsg, ControlMessage, MsgFlags, MultiHeaders, SockaddrStorage};
        let all: Vec<[IoSlice<'_>; 1]> = packets.map(|p| [IoSlice::new(p)]).collect();
        let to = SockaddrStorage::from(self.client);
        let mut rest = &all[..];
        let segment = all.first().map_or(0, |p| p[0].len());
        let uniform = all.iter().rev().skip(1).all(|p| p[0].len() == segment);
        while rest.len() > 1
            && uniform
            && segment > 0
            && self.config.segmentation_offload
            && GSO.load(Ordering::Relaxed)
        {
            let group = rest.len().min(GSO_MAX_SEGMENTS).min(GSO_MAX_BYTES / segment);
            if group < 2 {
                break;
            }
            let iov: Vec<IoSlice<'_>> = rest[..group].iter().map(|p| p[0]).collect();
            let size = segment as u16;
            match sendmsg(
                socket.as_raw_fd(),
                &iov,
                &[ControlMessage::UdpGsoSegments(&size)],
                MsgFlags::empty(),
                Some(&to),
            ) {
                Ok(_) => rest = &rest[group..],
                Err(nix::errno::Errno::EINTR) => {}
                Err(e) => {
                    // No segmentation offload on this route (EIO: the device has no checksum offload; EINVAL or
                    // ENOPROTOOPT: an old kernel): sendmmsg from now on.
                    debug!(client = %self.client, "UDP GSO unavailable ({e}); sending windows with sendmmsg");
                    GSO.store(false, Ordering::Relaxed);
                }
            }
        }
        while !rest.is_empty() {
            let addrs = vec![Some(to); rest.len()];
            let mut headers = MultiHeaders::<SockaddrStorage>::preallocate(rest.len(), None);
            let none: [ControlMessage<'_>; 0] = [];
            match sendmmsg(socket.as_raw_fd(), &mut headers, rest, &addrs, none, MsgFlags::empty()) {
                // A blocking sendmmsg sends at least one message or fails.
                Ok(sent) => rest = &rest[sent.count().clamp(1, rest.len())..],
                Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(Ending::Failed(format!("sending: {e}"))),
            }
        }
        Ok(())
    }

    /// Waits until `deadline` for an ACK or ERROR from the client, answering strangers with ERROR 5 and skipping
    /// anything else the client sends.
    fn next(&mut self, socket: &std::net::UdpSocket, buf: &mut [u8], deadline: Instant) -> Incoming {
        loop {
            if self.stop.load(Ordering::Relaxed) {
                return Incoming::Stopped;
            }
            if Instant::now() >= deadline {
                return Incoming::Timeout;
            }
            let (len, from) = match socket.recv_from(buf) {
                Ok(received) => received,
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // Left to the retransmission timer, without spinning on a socket that keeps failing.
                    debug!(client = %self.client, "receiving on a TFTP transfer socket: {e}");
                    std::thread::sleep(deadline.saturating_duration_since(Instant::now()).min(STOP_POLL));
                    continue;
                }
            };
            if canonical(from) != self.client {
                debug!(client = %self.client, "TFTP packet from unknown transfer ID {from}");
                let packet = Packet::Error { code: ErrorCode::UnknownTransferId, message: "unknown transfer ID" };
                let _ = socket.send_to(&packet.encode(), from);
                continue;
            }
            match Packet::parse(&buf[..len]) {
                Ok(Packet::Ack { block }) => return Incoming::Ack(block),
                Ok(Packet::Error { code, message }) => return Incoming::ClientError(code, message.to_string()),
                other => debug!(client = %self.client, "ignoring TFTP packet during a read: {other:?}"),
            }
        }
    }

    /// Sends the requested file; returns the bytes the client acknowledged.
    fn send_file(&mut self, socket: &std::net::UdpSocket) -> Result<u64, Ending> {
        let client = self.client;
        let name = self.request.filename.clone();
        if self.request.mode == Mode::Mail {
            self.send_error(socket, ErrorCode::IllegalOperation, "mail mode is not supported");
            return Err(Ending::Failed("mail mode requested".to_string()));
        }
        let opened = match self.config.files.open(&name) {
            Ok(opened) => opened,
            Err(refusal) => {
                warn!(%client, file = name, "TFTP request refused: {refusal}");
                self.send_error(socket, refusal.code(), &refusal.to_string());
                return Err(Ending::Failed(refusal.to_string()));
            }
        };
        let options: Vec<(&str, &str)> = self.request.options.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
        let negotiated = negotiate(&options, opened.size, &self.config);
        debug!(%client, file = name, path = %opened.path.display(), ?negotiated, "TFTP read request");
        // Only ACKs and ERRORs matter here; anything longer is cut short harmlessly.
        let mut buf = vec![0u8; 2048];
        if !negotiated.oack.is_empty() {
            self.send_oack(socket, &mut buf, &negotiated)?;
        }
        self.emit(TftpEvent::Started { client, file: name, size: opened.size });
        let reader = std::io::BufReader::with_capacity(READ_BUFFER, opened.file);
        self.send_blocks(socket, &mut buf, reader, &negotiated)
    }

    fn backoff(&self, timeout: Duration, base: Duration) -> Duration {
        let cap = (base * BACKOFF_FACTOR).min(MAX_BACKOFF).max(base);
        (timeout * 2).min(cap)
    }

    /// Sends the OACK until the client acknowledges it with ACK 0.
    fn send_oack(
        &mut self,
        socket: &std::net::UdpSocket,
        buf: &mut [u8],
        negotiated: &Negotiated,
    ) -> Result<(), Ending> {
        let options = negotiated.oack.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
        let oack = Packet::Oack { options }.encode();
        let mut timeout = negotiated.timeout;
        for attempt in 0..=self.config.retries {
            if attempt > 0 {
                debug!(client = %self.client, "resending the OACK (attempt {attempt})");
            }
            self.send(socket, &oack)?;
            let deadline = self.deadline(timeout);
            loop {
                match self.next(socket, buf, deadline) {
                    Incoming::Ack(0) => {
                        self.progress_at = Instant::now();
                        return Ok(());
                    }
                    Incoming::Ack(_) => continue,
                    Incoming::ClientError(code, message) => {
                        return Err(Ending::Probe(format!("ERROR {} {message:?}", u16::from(code))))
                    }
                    Incoming::Stopped => {
                        self.send_error(socket, ErrorCode::NotDefined, "server is shutting down");
                        return Err(Ending::Failed("server shut down".to_string()));
                    }
                    Incoming::Timeout => break,
                }
            }
            if self.stalled() {
                return Err(Ending::Failed(format!(
                    "no ACK for the OACK in {} s; client gone?",
                    self.config.stall_limit.as_secs_f64()
                )));
            }
            timeout = self.backoff(timeout, negotiated.timeout);
        }
        Err(Ending::Failed(format!("no ACK for the OACK after {} retries", self.config.retries)))
    }

    /// The data phase: windows of DATA blocks, slid by ACKs, resent on timeouts.
    fn send_blocks(
        &mut self,
        socket: &std::net::UdpSocket,
        buf: &mut [u8],
        mut reader: std::io::BufReader<std::fs::File>,
        negotiated: &Negotiated,
    ) -> Result<u64, Ending> {
        let blksize = usize::from(negotiated.blksize);
        let window = usize::from(negotiated.window);
        // Blocks are numbered from 1 without wrapping here; the wire carries the low 16 bits.
        let mut base: u64 = 1; // first unacknowledged block, the front of `in_flight`
        let mut next: u64 = 1; // next block to read
        let mut in_flight: VecDeque<Vec<u8>> = VecDeque::with_capacity(window);
        let mut spare: Vec<Vec<u8>> = Vec::new();
        let mut read_all = false;
        let mut acked_bytes: u64 = 0;
        let mut timeout = negotiated.timeout;
        let mut failures = 0;
        let mut deadline = self.deadline(timeout);
        loop {
            let unsent = in_flight.len();
            while in_flight.len() < window && !read_all {
                let mut packet = spare.pop().unwrap_or_else(|| Vec::with_capacity(4 + blksize));
                packet.clear();
                packet.extend_from_slice(&data_header(next as u16));
                packet.resize(4 + blksize, 0);
                let len = match read_block(&mut reader, &mut packet[4..]) {
                    Ok(len) => len,
                    Err(e) => {
                        self.send_error(socket, ErrorCode::NotDefined, "reading the file failed");
                        return Err(Ending::Failed(format!("reading block {next}: {e}")));
                    }
                };
                packet.truncate(4 + len);
                read_all = len < blksize;
                in_flight.push_back(packet);
                next += 1;
            }
            if in_flight.len() > unsent {
                self.send_batch(socket, in_flight.iter().skip(unsent))?;
            }
            match self.next(socket, buf, deadline) {
                Incoming::Ack(block) => {
                    // How far past the last acknowledged block this ACK reaches; 0 or beyond what was sent means
                    // a duplicate or stale ACK, which must not trigger a resend (Sorcerer's Apprentice).
                    let advance = u64::from(block.wrapping_sub((base - 1) as u16));
                    if advance == 0 || advance > in_flight.len() as u64 {
                        continue;
                    }
                    for packet in in_flight.drain(..advance as usize) {
                        acked_bytes += (packet.len() - 4) as u64;
                        spare.push(packet);
                    }
                    base += advance;
                    if in_flight.is_empty() && read_all {
                        return Ok(acked_bytes);
                    }
                    // An ACK inside the window means the client missed the block after it: go on from there.
                    if !in_flight.is_empty() {
                        self.send_batch(socket, in_flight.iter())?;
                    }
                    failures = 0;
                    timeout = negotiated.timeout;
                    self.progress_at = Instant::now();
                    deadline = self.deadline(timeout);
                }
                Incoming::Timeout => {
                    if self.stalled() {
                        return Err(Ending::Failed(format!(
                            "no ACK for block {base} in {} s; client gone?",
                            self.config.stall_limit.as_secs_f64()
                        )));
                    }
                    failures += 1;
                    if failures > self.config.retries {
                        return Err(Ending::Failed(format!(
                            "no ACK for block {base} after {} retries; client gone?",
                            self.config.retries
                        )));
                    }
                    timeout = self.backoff(timeout, negotiated.timeout);
                    debug!(client = %self.client, "timeout: resending blocks {base}..{next} (retry {failures})");
                    self.send_batch(socket, in_flight.iter())?;
                    deadline = self.deadline(timeout);
                }
                Incoming::ClientError(code, message) => {
                    return Err(Ending::Failed(format!(
                        "client sent ERROR {} {message:?} at block {base}",
                        u16::from(code)
                    )));
                }
                Incoming::Stopped => {
                    self.send_error(socket, ErrorCode::NotDefined, "server is shutting down");
                    return Err(Ending::Failed("server shut down".to_string()));
                }
            }
        }
    }
}

/// Fills `buf` from `reader` unless the file ends first; returns the bytes read.
fn read_block(reader: &mut impl std::io::Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        let read = match reader.read(&mut buf[filled..]) {
            Ok(read) => read,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if read == 0 {
            break;
        }
        filled += read;
    }
    Ok(filled)
}
