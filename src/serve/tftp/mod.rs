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
//! The listening loop (async, `listener.rs`) only parses requests; each read runs on a thread of its own
//! (`transfer.rs`; not tokio's blocking pool, which the rest of the server shares) with its own ephemeral UDP
//! socket, bound to the address the request was sent to: a blocking `recv` answers an ACK with the next block
//! without a trip through the async reactor, which lock-step clients feel on every block. Files are served from
//! [`TftpFiles`]: exact names first, then an optional root directory that requests cannot leave (`..`, absolute
//! paths and symlinks pointing outside are refused). Packet encoding (`packet.rs`), option negotiation and name
//! checks (`negotiate.rs`) are pure functions, tested on bytes.
//!
//! Against boot storms and hostile clients, every transfer is bounded:
//! - at most [`TftpConfig::max_transfers`] run at once (512 by default), and [`TftpConfig::max_per_client`] per
//!   client address (8), so one host cannot take the server's threads, sockets and file handles. A request over a
//!   limit is dropped without an answer and counted (`kiln serve: limit tftp_max_per_client (8) hit: …`, at most
//!   one line per limit every 10 s; see [`crate::serve::limits`]). Not ERROR 0 "busy": PXE ROMs commonly take an
//!   ERROR as final and go on to the next boot device, while a request with no answer is retransmitted, as after
//!   a lost packet, and gets in once a place is free. An unanswered request also gives a forged source address
//!   nothing to reflect;
//! - a client's `timeout` option is granted only up to [`TftpConfig::max_timeout`] (10 s; RFC 2349 allows 255,
//!   and backoff multiplies it), and a transfer without progress for [`TftpConfig::stall_limit`] (30 s) is
//!   abandoned whatever its retries, so a client that stops answering frees its place within tens of seconds;
//! - outcomes go to a bounded event queue; when it is full they are dropped and counted (`tftp_events`).

mod admission;
mod listener;
mod negotiate;
mod packet;
mod transfer;

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch};

pub use negotiate::{granted_timeout, negotiate, sanitize_name, Negotiated, OpenedFile, Refusal};
pub use packet::{ErrorCode, Mode, Packet, PacketError, Request};

use crate::serve::limits::Limits;

/// Block size without a `blksize` option (RFC 1350).
pub const DEFAULT_BLKSIZE: u16 = 512;
/// Smallest `blksize` a client may ask for (RFC 2348).
pub const MIN_BLKSIZE: u16 = 8;
/// Largest `blksize` RFC 2348 allows: a 65535-byte UDP datagram minus IP, UDP and TFTP headers.
pub const MAX_BLKSIZE: u16 = 65464;
/// Message of the ERROR 2 that answers every write request.
pub const READ_ONLY_MESSAGE: &str = "kiln's TFTP server is read-only";

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
    /// Transfers running at once, all clients together; a read request beyond it is dropped unanswered and counted
    /// under the limit `tftp_max_transfers`. By default, 512.
    pub max_transfers: usize,
    /// Transfers running at once for one client address; a read request beyond it is dropped unanswered and
    /// counted under the limit `tftp_max_per_client`. By default, 8.
    pub max_per_client: usize,
    /// Largest `timeout` option granted (RFC 2349 allows up to 255 s); a client asking for more is left without
    /// the option and gets the server's `timeout`. By default, 10 s.
    pub max_timeout: Duration,
    /// How long a transfer may go without progress (the OACK or new blocks acknowledged) before it is abandoned,
    /// whatever its timeout and retries. By default, 30 s.
    pub stall_limit: Duration,
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
            max_transfers: 512,
            max_per_client: 8,
            max_timeout: Duration::from_secs(10),
            stall_limit: Duration::from_secs(30),
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

/// Serves read requests arriving on `socket` until `shutdown` completes.
///
/// Each request takes the config current in `config` when it arrives. `events`, if given, receives one
/// [`TftpEvent`] per transfer outcome; it is bounded, and events that find it full are dropped and counted under
/// the limit `tftp_events`. Requests refused by `max_transfers` and `max_per_client` are counted in `limits` too
/// (`tftp_max_transfers`, `tftp_max_per_client`), which the caller reports (see [`Limits::report_every`]).
/// `shutdown` is any future, e.g. `token.cancelled_owned()` or
/// `async move { let _ = rx.wait_for(|stop| *stop).await; }`; once it completes, running transfers send their
/// clients ERROR 0 and stop (within 5 s), then `serve` returns.
///
/// `socket` may be bound to a wildcard address: transfer sockets then bind to the address each request was
/// sent to (learnt with IP_PKTINFO / IPV6_RECVPKTINFO), so multi-homed hosts answer from the right one.
pub async fn serve(
    socket: UdpSocket,
    config: watch::Receiver<Arc<TftpConfig>>,
    events: Option<mpsc::Sender<TftpEvent>>,
    limits: Limits,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    listener::Listener::new(socket)?.run(config, events, limits, shutdown).await
}
