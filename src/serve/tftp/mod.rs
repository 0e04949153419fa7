//! A read-only TFTP server for iPXE binaries and other small boot files.
//!
//! Implements RFC 1350 (TFTP revision 2) for reads only, with option negotiation from RFC 2347 (OACK), RFC 2348
//! (`blksize`), RFC 2349 (`timeout`, `tsize`) and RFC 7440 (`windowsize`). Block numbers roll over from 65535 to 0,
//! as tftp-hpa, curl and iPXE expect, so files larger than 32 MiB at 512-byte blocks transfer whole.
//!
//! Left out on purpose:
//! - writes: a WRQ is answered with ERROR 2 ("kiln's TFTP server is read-only");
//! - `netascii` conversion: netascii requests get the file's bytes unchanged, as if `octet` had been asked for
//!   (boot files are binaries; every firmware asks for octet anyway), and `tsize` reports that byte count;
//! - `mail` mode (obsolete; ERROR 4), multicast TFTP (RFC 2090) and tftp-hpa's `utimeout` (ignored like any
//!   unknown option);
//! - duplicate read requests are not merged: each one starts a transfer from its own port, and the client ends
//!   the one it does not want with ERROR 5, as RFC 1350 describes.
//!
//! The listening loop (async) only parses requests; each read runs on a thread of its own (tokio's blocking pool)
//! with its own ephemeral UDP socket, bound to the address the request was sent to: a blocking `recv` answers an
//! ACK with the next block without a trip through the async reactor, which lock-step clients feel on every block. Files are served from [`TftpFiles`]: exact names first, then an
//! optional root directory that requests cannot leave (`..`, absolute paths and symlinks pointing outside are
//! refused). Packet encoding, option negotiation and name checks are pure functions, tested on bytes.

use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::io::{IoSlice, IoSliceMut};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

/// Block size without a `blksize` option (RFC 1350).
pub const DEFAULT_BLKSIZE: u16 = 512;
/// Smallest `blksize` a client may ask for (RFC 2348).
pub const MIN_BLKSIZE: u16 = 8;
/// Largest `blksize` RFC 2348 allows: a 65535-byte UDP datagram minus IP, UDP and TFTP headers.
pub const MAX_BLKSIZE: u16 = 65464;
/// Message of the ERROR 2 that answers every write request.
pub const READ_ONLY_MESSAGE: &str = "kiln's TFTP server is read-only";

/// How long [`serve`] waits, once shut down, for running transfers to tell their clients and stop.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// Retransmission backoff doubles up to this many times the negotiated timeout, and at most to [`MAX_BACKOFF`].
const BACKOFF_FACTOR: u32 = 8;
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// Read-ahead of each transfer's file, so a small `blksize` does not cost one blocking read per block.
const READ_BUFFER: usize = 256 * 1024;

/// Files a TFTP server may send: nothing outside these is ever read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TftpFiles {
    /// Exact request names (without a leading `/`) mapped to the files sent for them, e.g.
    /// `"snponly.efi" → /var/lib/kiln/store/…/snponly.efi`. Looked up first; the path may be anywhere.
    pub named: BTreeMap<String, PathBuf>,
    /// A directory whose regular files are served under their relative names, symlinks resolved but never leaving
    /// it. By default, none: only `named` files are served.
    pub root: Option<PathBuf>,
}

/// What the server serves and how it negotiates. Swapped at runtime through the `watch` channel given to
/// [`serve`]: new requests see the new value, running transfers keep the one they started with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TftpConfig {
    pub files: TftpFiles,
    /// Largest `blksize` granted; a client asking for less gets what it asked for. Kept within 8..=65464.
    /// By default, 65464 (the RFC 2348 maximum).
    pub max_blksize: u16,
    /// Largest `windowsize` granted (blocks sent before waiting for an ACK). By default, 64.
    pub max_window: u16,
    /// Retransmission timeout when the client does not negotiate one; doubled on each retry. By default, 1 s.
    pub timeout: Duration,
    /// Retransmissions without progress before a transfer is abandoned. By default, 5.
    pub retries: u32,
    /// Send each window with UDP segmentation offload where the kernel allows it (else `sendmmsg`). By default,
    /// true; kiln turns it off by itself the first time the kernel refuses it.
    pub segmentation_offload: bool,
}

impl Default for TftpConfig {
    fn default() -> Self {
        TftpConfig {
            files: TftpFiles::default(),
            max_blksize: MAX_BLKSIZE,
            max_window: 64,
            timeout: Duration::from_secs(1),
            retries: 5,
            segmentation_offload: true,
        }
    }
}

/// What happened to a read request, for the boot server's event log. A refused request is `Failed` without a
/// `Started`; a client that only asked for options (a `tsize` probe) and then ended the transfer gets no event.
#[derive(Debug, Clone, PartialEq)]
pub enum TftpEvent {
    Started { client: SocketAddr, file: String, size: u64 },
    Finished { client: SocketAddr, file: String, bytes: u64, secs: f64 },
    Failed { client: SocketAddr, file: String, error: String },
}

/// TFTP error codes (RFC 1350 section 5, RFC 2347 for 8).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    NotDefined,
    FileNotFound,
    AccessViolation,
    DiskFull,
    IllegalOperation,
    UnknownTransferId,
    FileExists,
    NoSuchUser,
    OptionRefused,
    Other(u16),
}

impl From<u16> for ErrorCode {
    fn from(code: u16) -> Self {
        match code {
            0 => ErrorCode::NotDefined,
            1 => ErrorCode::FileNotFound,
            2 => ErrorCode::AccessViolation,
            3 => ErrorCode::DiskFull,
            4 => ErrorCode::IllegalOperation,
            5 => ErrorCode::UnknownTransferId,
            6 => ErrorCode::FileExists,
            7 => ErrorCode::NoSuchUser,
            8 => ErrorCode::OptionRefused,
            other => ErrorCode::Other(other),
        }
    }
}

impl From<ErrorCode> for u16 {
    fn from(code: ErrorCode) -> u16 {
        match code {
            ErrorCode::NotDefined => 0,
            ErrorCode::FileNotFound => 1,
            ErrorCode::AccessViolation => 2,
            ErrorCode::DiskFull => 3,
            ErrorCode::IllegalOperation => 4,
            ErrorCode::UnknownTransferId => 5,
            ErrorCode::FileExists => 6,
            ErrorCode::NoSuchUser => 7,
            ErrorCode::OptionRefused => 8,
            ErrorCode::Other(other) => other,
        }
    }
}

/// Transfer mode of a request. `Netascii` is served as octet bytes (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Netascii,
    Octet,
    Mail,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Netascii => "netascii",
            Mode::Octet => "octet",
            Mode::Mail => "mail",
        }
    }
}

/// A read or write request: file name, mode and RFC 2347 options in the order the client sent them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request<'a> {
    pub filename: &'a str,
    pub mode: Mode,
    pub options: Vec<(&'a str, &'a str)>,
}

/// One TFTP packet, borrowing from the datagram it was parsed from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet<'a> {
    Read(Request<'a>),
    Write(Request<'a>),
    Data {
        block: u16,
        data: &'a [u8],
    },
    Ack {
        block: u16,
    },
    /// The message is cut at its first invalid UTF-8 byte rather than refused: an error ends a transfer either way.
    Error {
        code: ErrorCode,
        message: &'a str,
    },
    Oack {
        options: Vec<(&'a str, &'a str)>,
    },
}

/// Why a datagram is not a TFTP packet.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    #[error("packet of {0} bytes is too short")]
    TooShort(usize),
    #[error("unknown opcode {0}")]
    UnknownOpcode(u16),
    #[error("the {0} is not terminated by a NUL byte")]
    Unterminated(&'static str),
    #[error("the {0} is not valid UTF-8")]
    NotUtf8(&'static str),
    #[error("unknown transfer mode {0:?}")]
    UnknownMode(String),
}

const OP_RRQ: u16 = 1;
const OP_WRQ: u16 = 2;
const OP_DATA: u16 = 3;
const OP_ACK: u16 = 4;
const OP_ERROR: u16 = 5;
const OP_OACK: u16 = 6;

/// Splits a NUL-terminated UTF-8 string off the front of `bytes`.
fn take_str<'a>(bytes: &'a [u8], field: &'static str) -> Result<(&'a str, &'a [u8]), PacketError> {
    let end = bytes.iter().position(|&b| b == 0).ok_or(PacketError::Unterminated(field))?;
    let text = std::str::from_utf8(&bytes[..end]).map_err(|_| PacketError::NotUtf8(field))?;
    Ok((text, &bytes[end + 1..]))
}

/// Option pairs up to the end of the packet. Lenient, as firmware is: parsing stops quietly at NUL padding, at an
/// unterminated or non-UTF-8 string, or at a name without a value.
fn parse_options(mut rest: &[u8]) -> Vec<(&str, &str)> {
    let mut options = Vec::new();
    while rest.first().is_some_and(|&b| b != 0) {
        let Ok((name, after_name)) = take_str(rest, "option name") else { break };
        let Ok((value, after_value)) = take_str(after_name, "option value") else { break };
        options.push((name, value));
        rest = after_value;
    }
    options
}

fn parse_request(body: &[u8]) -> Result<Request<'_>, PacketError> {
    let (filename, rest) = take_str(body, "file name")?;
    let (mode, rest) = take_str(rest, "mode")?;
    let mode = match mode.to_ascii_lowercase().as_str() {
        "octet" => Mode::Octet,
        "netascii" => Mode::Netascii,
        "mail" => Mode::Mail,
        _ => return Err(PacketError::UnknownMode(mode.to_string())),
    };
    Ok(Request { filename, mode, options: parse_options(rest) })
}

fn push_str(out: &mut Vec<u8>, text: &str) {
    out.extend_from_slice(text.as_bytes());
    out.push(0);
}

impl<'a> Packet<'a> {
    /// Parses one datagram. Never panics, whatever the bytes.
    pub fn parse(bytes: &'a [u8]) -> Result<Packet<'a>, PacketError> {
        if bytes.len() < 2 {
            return Err(PacketError::TooShort(bytes.len()));
        }
        let opcode = u16::from_be_bytes([bytes[0], bytes[1]]);
        let body = &bytes[2..];
        let block = || match body {
            [hi, lo, ..] => Ok(u16::from_be_bytes([*hi, *lo])),
            _ => Err(PacketError::TooShort(bytes.len())),
        };
        match opcode {
            OP_RRQ => Ok(Packet::Read(parse_request(body)?)),
            OP_WRQ => Ok(Packet::Write(parse_request(body)?)),
            OP_DATA => Ok(Packet::Data { block: block()?, data: &body[2..] }),
            // Some clients pad ACKs; the bytes after the block number mean nothing.
            OP_ACK => Ok(Packet::Ack { block: block()? }),
            OP_ERROR => {
                let code = ErrorCode::from(block()?);
                let text = &body[2..];
                let text = &text[..text.iter().position(|&b| b == 0).unwrap_or(text.len())];
                let message = match std::str::from_utf8(text) {
                    Ok(message) => message,
                    Err(e) => std::str::from_utf8(&text[..e.valid_up_to()]).unwrap_or_default(),
                };
                Ok(Packet::Error { code, message })
            }
            OP_OACK => Ok(Packet::Oack { options: parse_options(body) }),
            other => Err(PacketError::UnknownOpcode(other)),
        }
    }

    /// Appends the packet's wire form to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        match self {
            Packet::Read(request) | Packet::Write(request) => {
                let opcode = if matches!(self, Packet::Read(_)) { OP_RRQ } else { OP_WRQ };
                out.extend_from_slice(&opcode.to_be_bytes());
                push_str(out, request.filename);
                push_str(out, request.mode.name());
                for (name, value) in &request.options {
                    push_str(out, name);
                    push_str(out, value);
                }
            }
            Packet::Data { block, data } => {
                out.extend_from_slice(&data_header(*block));
                out.extend_from_slice(data);
            }
            Packet::Ack { block } => {
                out.extend_from_slice(&OP_ACK.to_be_bytes());
                out.extend_from_slice(&block.to_be_bytes());
            }
            Packet::Error { code, message } => {
                out.extend_from_slice(&OP_ERROR.to_be_bytes());
                out.extend_from_slice(&u16::from(*code).to_be_bytes());
                // A NUL inside the message would end it early on the client; drop it.
                out.extend(message.bytes().filter(|&b| b != 0));
                out.push(0);
            }
            Packet::Oack { options } => {
                out.extend_from_slice(&OP_OACK.to_be_bytes());
                for (name, value) in options {
                    push_str(out, name);
                    push_str(out, value);
                }
            }
        }
    }

    /// The packet's wire form.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode_into(&mut out);
        out
    }
}

/// The four bytes in front of a DATA block's payload.
fn data_header(block: u16) -> [u8; 4] {
    let [hi, lo] = block.to_be_bytes();
    [0, OP_DATA as u8, hi, lo]
}

/// The outcome of option negotiation for one read request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    /// Payload bytes per DATA packet.
    pub blksize: u16,
    /// DATA packets sent before waiting for an ACK.
    pub window: u16,
    /// First retransmission timeout.
    pub timeout: Duration,
    /// The options accepted, as the OACK carries them (names spelled as the client spelled them). Empty when the
    /// client sent no option the server accepts: then no OACK is sent and DATA block 1 answers the request.
    pub oack: Vec<(String, String)>,
}

/// Decides blksize, windowsize, timeout and tsize for a request (RFC 2347/2348/2349/7440).
///
/// Option names are case-insensitive and the first of duplicates wins. `blksize` (8..=65464; larger values are
/// treated as 65464) is granted up to `config.max_blksize`; `windowsize` (1..=65535) up to `config.max_window`;
/// `timeout` (1..=255 seconds) is accepted as asked; `tsize` is answered with `file_size`, whatever the client
/// sent. Invalid values and unknown options are ignored, so they are absent from the OACK.
pub fn negotiate(options: &[(&str, &str)], file_size: u64, config: &TftpConfig) -> Negotiated {
    let mut negotiated = Negotiated { blksize: DEFAULT_BLKSIZE, window: 1, timeout: config.timeout, oack: Vec::new() };
    let mut seen: Vec<String> = Vec::new();
    for (name, value) in options {
        let key = name.to_ascii_lowercase();
        if seen.contains(&key) {
            continue;
        }
        seen.push(key.clone());
        let number = value.trim().parse::<u64>().ok();
        let granted = match (key.as_str(), number) {
            ("blksize", Some(asked)) if asked >= u64::from(MIN_BLKSIZE) => {
                let max = config.max_blksize.clamp(MIN_BLKSIZE, MAX_BLKSIZE);
                negotiated.blksize = asked.min(u64::from(max)) as u16;
                negotiated.blksize.to_string()
            }
            ("windowsize", Some(asked @ 1..=65535)) => {
                negotiated.window = asked.min(u64::from(config.max_window.max(1))) as u16;
                negotiated.window.to_string()
            }
            ("timeout", Some(asked @ 1..=255)) => {
                negotiated.timeout = Duration::from_secs(asked);
                asked.to_string()
            }
            ("tsize", Some(_)) => file_size.to_string(),
            _ => continue,
        };
        negotiated.oack.push((name.to_string(), granted));
    }
    negotiated
}

/// Why a requested name is not served. The message is sent to the client in the ERROR packet.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// ERROR 2: the name tries to leave the served files.
    #[error("access violation: {0}")]
    AccessViolation(String),
    /// ERROR 1.
    #[error("file not found: {0}")]
    NotFound(String),
    /// ERROR 0: the file exists but could not be opened.
    #[error("cannot read {0}")]
    Unreadable(String),
}

impl Refusal {
    fn code(&self) -> ErrorCode {
        match self {
            Refusal::AccessViolation(_) => ErrorCode::AccessViolation,
            Refusal::NotFound(_) => ErrorCode::FileNotFound,
            Refusal::Unreadable(_) => ErrorCode::NotDefined,
        }
    }
}

/// Checks a requested name and returns it relative to the served set: one leading `/` is stripped (clients
/// differ in sending it); a NUL byte, a `..` component (between `/` or `\` separators, as Windows-style clients
/// send) or a path still absolute after stripping is refused.
pub fn sanitize_name(requested: &str) -> Result<&str, Refusal> {
    let name = requested.strip_prefix('/').unwrap_or(requested);
    if name.contains('\0') {
        return Err(Refusal::AccessViolation(format!("{requested:?} contains a NUL byte")));
    }
    if name.starts_with('/') || Path::new(name).is_absolute() {
        return Err(Refusal::AccessViolation(format!("{requested:?} is an absolute path")));
    }
    if name.split(['/', '\\']).any(|component| component == "..") {
        return Err(Refusal::AccessViolation(format!("{requested:?} contains a '..' component")));
    }
    Ok(name)
}

/// A file opened for a transfer.
#[derive(Debug)]
pub struct OpenedFile {
    pub file: std::fs::File,
    pub size: u64,
    /// Where the file was found (after symlinks, for files under the root).
    pub path: PathBuf,
}

impl TftpFiles {
    /// Resolves and opens a requested name (blocking): [`sanitize_name`], then the `named` map, then the root
    /// directory, whose canonical path the file's canonical path must stay inside. Only regular files are served.
    pub fn open(&self, requested: &str) -> Result<OpenedFile, Refusal> {
        let name = sanitize_name(requested)?;
        if let Some(path) = self.named.get(name) {
            return open_regular(path, requested);
        }
        let not_found = || Refusal::NotFound(format!("{requested:?} is not served"));
        let Some(root) = &self.root else { return Err(not_found()) };
        if name.is_empty() {
            return Err(not_found());
        }
        let root = root.canonicalize().map_err(|e| {
            warn!("TFTP root {} is unusable: {e}", root.display());
            not_found()
        })?;
        let path = match root.join(name).canonicalize() {
            Ok(path) => path,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(not_found()),
            Err(e) => return Err(Refusal::Unreadable(format!("{requested:?}: {e}"))),
        };
        if !path.starts_with(&root) {
            return Err(Refusal::AccessViolation(format!("{requested:?} resolves outside the TFTP root")));
        }
        open_regular(&path, requested)
    }
}

/// Opens `path` and checks, on the open file, that it is a regular file.
fn open_regular(path: &Path, requested: &str) -> Result<OpenedFile, Refusal> {
    let file = std::fs::File::open(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => Refusal::NotFound(format!("{requested:?} is not served")),
        _ => Refusal::Unreadable(format!("{requested:?}: {e}")),
    })?;
    let metadata = file.metadata().map_err(|e| Refusal::Unreadable(format!("{requested:?}: {e}")))?;
    if !metadata.is_file() {
        return Err(Refusal::NotFound(format!("{requested:?} is not a regular file")));
    }
    Ok(OpenedFile { file, size: metadata.len(), path: path.to_path_buf() })
}

/// Serves read requests arriving on `socket` until `shutdown` completes.
///
/// Each request takes the config current in `config` when it arrives. `events`, if given, receives one
/// [`TftpEvent`] per transfer outcome. `shutdown` is any future, e.g. `token.cancelled_owned()` or
/// `async move { let _ = rx.wait_for(|stop| *stop).await; }`; once it completes, running transfers send their
/// clients ERROR 0 and stop (within 5 s), then `serve` returns.
///
/// `socket` may be bound to a wildcard address: transfer sockets then bind to the address each request was
/// sent to (learnt with IP_PKTINFO / IPV6_RECVPKTINFO), so multi-homed hosts answer from the right one.
pub async fn serve(
    socket: UdpSocket,
    config: watch::Receiver<Arc<TftpConfig>>,
    events: Option<mpsc::UnboundedSender<TftpEvent>>,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let listener = Listener::new(socket)?;
    info!("TFTP server listening on {}", listener.local);
    let stop = Arc::new(AtomicBool::new(false));
    let mut transfers = JoinSet::new();
    let mut buf = vec![0u8; 65536];
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            Some(joined) = transfers.join_next(), if !transfers.is_empty() => {
                if let Err(e) = joined {
                    warn!("TFTP transfer task ended abnormally: {e}");
                }
            }
            received = listener.recv(&mut buf) => {
                let (len, client, local) = match received {
                    Ok(received) => received,
                    Err(e) => {
                        warn!("receiving on the TFTP socket {}: {e}", listener.local);
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                };
                if let Some(request) = listener.dispatch(&buf[..len], client).await {
                    let transfer = Transfer {
                        client,
                        local,
                        request,
                        config: config.borrow().clone(),
                        events: events.clone(),
                        stop: stop.clone(),
                    };
                    transfers.spawn_blocking(move || transfer.run());
                }
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    let running = transfers.len();
    if running > 0 {
        info!("TFTP server stopping; ending {running} transfer(s)");
    }
    let drain = async { while transfers.join_next().await.is_some() {} };
    if tokio::time::timeout(SHUTDOWN_GRACE, drain).await.is_err() {
        transfers.abort_all();
    }
    Ok(())
}

/// A read request, owned so its transfer task can keep it.
#[derive(Debug, Clone)]
struct OwnedRequest {
    filename: String,
    mode: Mode,
    options: Vec<(String, String)>,
}

/// The listening socket.
struct Listener {
    socket: UdpSocket,
    local: SocketAddr,
    /// Bound to a wildcard address: ask the kernel which address each datagram was sent to.
    pktinfo: bool,
}

impl Listener {
    fn new(socket: UdpSocket) -> anyhow::Result<Listener> {
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
fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), v6.port()),
            None => addr,
        },
        SocketAddr::V4(_) => addr,
    }
}

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

/// One read request, from refusal or OACK to the last ACK, on its own socket and its own thread: a blocking
/// `recv` wakes as soon as the client's ACK arrives, which is what lock-step transfers (every PXE ROM) wait on.
struct Transfer {
    client: SocketAddr,
    /// Where the request was sent, port 0: the transfer socket binds there.
    local: SocketAddr,
    request: OwnedRequest,
    config: Arc<TftpConfig>,
    events: Option<mpsc::UnboundedSender<TftpEvent>>,
    stop: Arc<AtomicBool>,
}

/// How often a waiting transfer looks at the stop flag.
const STOP_POLL: Duration = Duration::from_millis(100);
/// Whether UDP segmentation offload works here; cleared the first time the kernel refuses it.
static GSO: AtomicBool = AtomicBool::new(true);
/// Linux's limit on segments per GSO send (UDP_MAX_SEGMENTS).
const GSO_MAX_SEGMENTS: usize = 64;
/// Bytes per GSO send: the payload of one (unsegmented) UDP datagram must fit an IP packet.
const GSO_MAX_BYTES: usize = 65_000;

impl Transfer {
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
                self.emit(TftpEvent::Finished { client, file, bytes, secs });
            }
            Err(Ending::Probe(reason)) => debug!(%client, file, "TFTP client ended after the OACK: {reason}"),
            Err(Ending::Failed(error)) => {
                warn!(%client, file, "TFTP transfer failed: {error}");
                self.emit(TftpEvent::Failed { client, file, error });
            }
        }
    }

    fn emit(&self, event: TftpEvent) {
        if let Some(events) = &self.events {
            let _ = events.send(event);
        }
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
            let deadline = Instant::now() + timeout;
            loop {
                match self.next(socket, buf, deadline) {
                    Incoming::Ack(0) => return Ok(()),
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
        let mut deadline = Instant::now() + timeout;
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
                    deadline = Instant::now() + timeout;
                }
                Incoming::Timeout => {
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
                    deadline = Instant::now() + timeout;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> TftpConfig {
        TftpConfig { max_blksize: 1468, max_window: 16, ..TftpConfig::default() }
    }

    fn rrq(name: &str, options: &[(&str, &str)]) -> Vec<u8> {
        Packet::Read(Request { filename: name, mode: Mode::Octet, options: options.to_vec() }).encode()
    }

    #[test]
    fn parses_a_read_request_with_options() {
        let bytes = b"\x00\x01snponly.efi\x00OCTET\x00blksize\x001468\x00tsize\x000\x00";
        let packet = Packet::parse(bytes).unwrap();
        assert_eq!(
            packet,
            Packet::Read(Request {
                filename: "snponly.efi",
                mode: Mode::Octet,
                options: vec![("blksize", "1468"), ("tsize", "0")],
            })
        );
    }

    #[test]
    fn request_round_trips() {
        let bytes = rrq("a/b.efi", &[("windowsize", "16")]);
        assert_eq!(bytes, b"\x00\x01a/b.efi\x00octet\x00windowsize\x0016\x00");
        let Packet::Read(request) = Packet::parse(&bytes).unwrap() else { panic!("not a read request") };
        assert_eq!(request.options, vec![("windowsize", "16")]);
    }

    #[test]
    fn tolerates_padding_and_incomplete_options() {
        let padded = b"\x00\x01f\x00netascii\x00tsize\x000\x00\x00\x00\x00";
        let Packet::Read(request) = Packet::parse(padded).unwrap() else { panic!() };
        assert_eq!(request.mode, Mode::Netascii);
        assert_eq!(request.options, vec![("tsize", "0")]);
        let dangling = b"\x00\x01f\x00octet\x00blksize\x00";
        let Packet::Read(request) = Packet::parse(dangling).unwrap() else { panic!() };
        assert!(request.options.is_empty());
    }

    #[test]
    fn write_request_and_other_packets() {
        assert!(matches!(Packet::parse(b"\x00\x02up\x00octet\x00"), Ok(Packet::Write(_))));
        assert_eq!(Packet::parse(b"\x00\x04\x12\x34"), Ok(Packet::Ack { block: 0x1234 }));
        assert_eq!(Packet::parse(b"\x00\x04\x00\x07pad"), Ok(Packet::Ack { block: 7 }));
        assert_eq!(Packet::parse(b"\x00\x03\x00\x01abc"), Ok(Packet::Data { block: 1, data: b"abc" }));
        assert_eq!(
            Packet::parse(b"\x00\x05\x00\x08refused\x00"),
            Ok(Packet::Error { code: ErrorCode::OptionRefused, message: "refused" })
        );
        assert_eq!(
            Packet::parse(b"\x00\x05\x00\x00bad\xffbytes"),
            Ok(Packet::Error { code: ErrorCode::NotDefined, message: "bad" })
        );
        assert_eq!(
            Packet::parse(b"\x00\x06blksize\x00512\x00"),
            Ok(Packet::Oack { options: vec![("blksize", "512")] })
        );
    }

    #[test]
    fn encodes_exact_bytes() {
        assert_eq!(Packet::Ack { block: 65535 }.encode(), b"\x00\x04\xff\xff");
        assert_eq!(Packet::Data { block: 2, data: b"xy" }.encode(), b"\x00\x03\x00\x02xy");
        assert_eq!(
            Packet::Error { code: ErrorCode::AccessViolation, message: READ_ONLY_MESSAGE }.encode(),
            b"\x00\x05\x00\x02kiln's TFTP server is read-only\x00"
        );
        assert_eq!(Packet::Error { code: ErrorCode::Other(99), message: "a\0b" }.encode(), b"\x00\x05\x00\x63ab\x00");
        assert_eq!(
            Packet::Oack { options: vec![("tsize", "123"), ("blksize", "1468")] }.encode(),
            b"\x00\x06tsize\x00123\x00blksize\x001468\x00"
        );
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert_eq!(Packet::parse(b""), Err(PacketError::TooShort(0)));
        assert_eq!(Packet::parse(b"\x01"), Err(PacketError::TooShort(1)));
        assert_eq!(Packet::parse(b"\x00\x04\x01"), Err(PacketError::TooShort(3)));
        assert_eq!(Packet::parse(b"\x00\x03"), Err(PacketError::TooShort(2)));
        assert_eq!(Packet::parse(b"\x00\x09xx"), Err(PacketError::UnknownOpcode(9)));
        assert_eq!(Packet::parse(b"\x00\x01name"), Err(PacketError::Unterminated("file name")));
        assert_eq!(Packet::parse(b"\x00\x01name\x00octet"), Err(PacketError::Unterminated("mode")));
        assert_eq!(Packet::parse(b"\x00\x01\xff\x00octet\x00"), Err(PacketError::NotUtf8("file name")));
        assert_eq!(Packet::parse(b"\x00\x01f\x00binary\x00"), Err(PacketError::UnknownMode("binary".into())));
        // Every prefix of a valid request, and a spread of byte patterns, parse or fail cleanly.
        let valid = rrq("snponly.efi", &[("blksize", "1468"), ("tsize", "0")]);
        for end in 0..valid.len() {
            let _ = Packet::parse(&valid[..end]);
        }
        let mut seed: u32 = 1;
        for _ in 0..5000 {
            let len = (seed % 40) as usize;
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    seed = seed.wrapping_mul(1103515245).wrapping_add(12345);
                    (seed >> 16) as u8 % 8
                })
                .collect();
            let _ = Packet::parse(&bytes);
        }
    }

    #[test]
    fn no_options_no_oack() {
        let negotiated = negotiate(&[], 1000, &config());
        assert_eq!(negotiated, Negotiated { blksize: 512, window: 1, timeout: Duration::from_secs(1), oack: vec![] });
    }

    #[test]
    fn blksize_is_clamped_to_the_configured_maximum() {
        let config = config();
        assert_eq!(negotiate(&[("blksize", "65464")], 0, &config).blksize, 1468);
        assert_eq!(negotiate(&[("blksize", "1024")], 0, &config).oack, vec![("blksize".into(), "1024".into())]);
        assert_eq!(negotiate(&[("blksize", "99999")], 0, &config).blksize, 1468);
        let big = TftpConfig::default();
        assert_eq!(negotiate(&[("blksize", "8192")], 0, &big).blksize, 8192);
        assert_eq!(negotiate(&[("blksize", "70000")], 0, &big).blksize, MAX_BLKSIZE);
        // Below the RFC minimum, or not a number: ignored, so not acknowledged.
        assert_eq!(negotiate(&[("blksize", "7")], 0, &config).oack, vec![]);
        assert_eq!(negotiate(&[("blksize", "big")], 0, &config).blksize, 512);
    }

    #[test]
    fn tsize_reports_the_file_size() {
        let negotiated = negotiate(&[("TSize", "0"), ("blksize", "1428")], 31337, &config());
        assert_eq!(negotiated.oack, vec![("TSize".into(), "31337".into()), ("blksize".into(), "1428".into())]);
    }

    #[test]
    fn windowsize_and_timeout() {
        let config = config();
        let negotiated = negotiate(&[("windowsize", "64"), ("timeout", "3")], 0, &config);
        assert_eq!((negotiated.window, negotiated.timeout), (16, Duration::from_secs(3)));
        assert_eq!(negotiated.oack, vec![("windowsize".into(), "16".into()), ("timeout".into(), "3".into())]);
        assert_eq!(negotiate(&[("windowsize", "4")], 0, &config).window, 4);
        for invalid in ["0", "65536", "-1", ""] {
            assert_eq!(negotiate(&[("windowsize", invalid)], 0, &config).oack, vec![], "windowsize {invalid:?}");
        }
        for invalid in ["0", "256"] {
            assert_eq!(negotiate(&[("timeout", invalid)], 0, &config).oack, vec![], "timeout {invalid:?}");
        }
    }

    #[test]
    fn unknown_and_duplicate_options() {
        let negotiated =
            negotiate(&[("multicast", ""), ("utimeout", "500"), ("blksize", "1000"), ("BLKSIZE", "9")], 0, &config());
        assert_eq!(negotiated.oack, vec![("blksize".into(), "1000".into())]);
        assert_eq!(negotiated.blksize, 1000);
    }

    #[test]
    fn sanitizes_names() {
        assert_eq!(sanitize_name("/snponly.efi"), Ok("snponly.efi"));
        assert_eq!(sanitize_name("efi/grubx64.efi"), Ok("efi/grubx64.efi"));
        // Only one leading slash: /etc/passwd becomes a name under the root, never the host's file.
        assert_eq!(sanitize_name("/etc/passwd"), Ok("etc/passwd"));
        for bad in ["../../etc/shadow", "a/../../b", "/..", "..", "x\\..\\y", "//etc/passwd", "a\0b"] {
            assert!(matches!(sanitize_name(bad), Err(Refusal::AccessViolation(_))), "{bad:?} accepted");
        }
        // Dots that are not a whole component are fine.
        assert_eq!(sanitize_name("a..b/.hidden"), Ok("a..b/.hidden"));
    }

    #[test]
    fn files_stay_inside_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir_all(root.join("sub")).unwrap();
        std::fs::write(root.join("sub/ok.bin"), b"inside").unwrap();
        std::fs::write(dir.path().join("secret"), b"outside").unwrap();
        std::os::unix::fs::symlink(dir.path().join("secret"), root.join("escape")).unwrap();
        std::os::unix::fs::symlink(dir.path(), root.join("up")).unwrap();
        std::os::unix::fs::symlink("sub/ok.bin", root.join("alias")).unwrap();
        std::fs::write(dir.path().join("mapped"), b"mapped").unwrap();
        let files = TftpFiles {
            named: BTreeMap::from([("boot.efi".to_string(), dir.path().join("mapped"))]),
            root: Some(root.clone()),
        };
        let read = |name: &str| files.open(name).map(|opened| std::fs::read(opened.path).unwrap());
        assert_eq!(read("/boot.efi").unwrap(), b"mapped");
        assert_eq!(read("sub/ok.bin").unwrap(), b"inside");
        assert_eq!(read("/alias").unwrap(), b"inside");
        assert_eq!(files.open("sub/ok.bin").unwrap().size, 6);
        assert!(matches!(read("escape"), Err(Refusal::AccessViolation(_))));
        assert!(matches!(read("up/secret"), Err(Refusal::AccessViolation(_))));
        assert!(matches!(read("../secret"), Err(Refusal::AccessViolation(_))));
        assert!(matches!(read("sub"), Err(Refusal::NotFound(_))));
        assert!(matches!(read(""), Err(Refusal::NotFound(_))));
        assert!(matches!(read("missing"), Err(Refusal::NotFound(_))));
        assert!(matches!(read("/etc/passwd"), Err(Refusal::NotFound(_))));
        let no_root = TftpFiles { root: None, ..files.clone() };
        assert!(matches!(no_root.open("sub/ok.bin"), Err(Refusal::NotFound(_))));
    }
}
