//! The boot server's HTTP side: a small HTTP/1.1 server (RFC 9110/9112) for four routes.
//!
//! - `GET /ipxe/{mac}[?arch=ARCH]`: the machine's iPXE script (its node's bundle, or the unknown-machine
//!   answer);
//! - `GET /blob/sha256/{hex}`: a bundle file by digest, with single ranges (`bytes=a-b`, `a-`,
//!   `-n`), a strong ETag (the digest), `If-None-Match`, `Cache-Control: immutable`, and the body
//!   sent with `sendfile(2)`, so file bytes never pass through user space;
//! - `GET /overlay/{mac}`: the node's overlay;
//! - `GET /loader/{mac}?step=…&detail=…`: a two-stage loader's report of a step ([`super::loader`]), from the
//!   machine's own address only;
//! - `GET /healthz`;
//! - `GET /{boot file}` (`/snponly.efi`, `/arm64/snponly.efi`, `/undionly.kpxe`): the firmware files,
//!   for UEFI HTTP boot clients;
//! - `POST /heartbeat/{mac}`: a node's status agent reporting ([`super::heartbeat`]), the one route
//!   with a request body (`Content-Length`, at most `heartbeat_max_body` bytes);
//! - `GET /metrics`: Prometheus metrics ([`super::metrics`]); `GET /`: the status page
//!   ([`super::page`]).
//!
//! `HEAD` works on every `GET` route; keep-alive is supported. Left out: multi-range requests (the
//! whole file is sent instead, as RFC 9110 allows), chunked request bodies, TLS, HTTP/2.
//! Nothing is read from disk by request path: blobs are looked up by digest in the site's table.

use std::net::IpAddr;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};

mod request;
mod routes;

pub use request::{parse_range, parse_request, percent_decode, Request, Unsatisfiable};
pub(super) use routes::is_node_address;
use routes::{is_node_script, route, route_label};

use crate::net::Mac;
use crate::serve::limits::{Limit, Limits};
use crate::serve::site::Site;
use crate::serve::state::State;
use crate::serve::status::Tracker;

/// Something a machine did, for the boot log. Blob downloads name no MAC: the server attributes them by the
/// client's address (the machine that last asked for its script or overlay from there, or its lease).
#[derive(Debug, Clone)]
pub struct HttpEvent {
    pub mac: Option<Mac>,
    pub client: IpAddr,
    pub kind: &'static str,
    pub detail: String,
}

const MAX_HEAD: usize = 16 * 1024;
/// Most bytes one `sendfile(2)` call may send before the connection yields to the others.
const SENDFILE_CHUNK: usize = 2 << 20;

/// What one client may hold of the HTTP server, and for how long. Read from the site for every connection, so a
/// reload changes them for new connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpLimits {
    /// Connections open at once; beyond it the server stops accepting (clients wait in the kernel's backlog)
    /// until one closes. By default, 4,096.
    pub max_connections: usize,
    /// How long a client may take to send a whole request head once it starts one (slow clients trickling
    /// header bytes are cut off). By default, 10 s.
    pub header_timeout: Duration,
    /// How long a response may make no progress (a client that stops reading). By default, 30 s.
    pub write_timeout: Duration,
    /// How long a kept-alive connection may wait for its next request. By default, 60 s.
    pub idle_timeout: Duration,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            max_connections: 4096,
            header_timeout: Duration::from_secs(10),
            write_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(60),
        }
    }
}

/// What every connection shares: the newest site, the state (to know who holds a lease), the boot log's queue,
/// the limits' counters, the nodes' status and the agent that goes out with every overlay.
#[derive(Clone)]
pub struct Shared {
    pub site: watch::Receiver<Arc<Site>>,
    pub state: Option<Arc<State>>,
    /// Boot events for the log; a bounded queue (a full one drops the event, counted as `event_queue`).
    pub events: Option<mpsc::Sender<HttpEvent>>,
    pub limits: Limits,
    /// What the server heard of its nodes; `None`: heartbeats are refused and the page shows no status.
    pub status: Option<Arc<Tracker>>,
    /// The agent, appended to the overlay of every node whose image is for its architecture
    /// ([`super::heartbeat::agent_archive`]).
    pub agent: Option<Arc<super::heartbeat::Agent>>,
}

impl Shared {
    pub(super) fn event(&self, event: HttpEvent) {
        if let Some(tx) = &self.events {
            if tx.try_send(event).is_err() {
                self.limits.limit("event_queue", tx.max_capacity() as u64, "boot events not logged").refuse();
            }
        }
    }
}

enum Body {
    Bytes(Arc<Vec<u8>>),
    /// Two byte strings sent one after the other: a node's overlay and the agent's archive.
    Pair(Arc<Vec<u8>>, Arc<Vec<u8>>),
    File {
        path: std::path::PathBuf,
        start: u64,
        len: u64,
    },
    None,
}

struct Response {
    status: u16,
    reason: &'static str,
    headers: Vec<(&'static str, String)>,
    body: Body,
    len: u64,
    /// For the boot log: the blob's label when the body is a blob.
    blob: Option<String>,
}

impl Response {
    fn with_type(status: u16, reason: &'static str, content_type: &'static str, body: Vec<u8>) -> Self {
        Response {
            blob: None,
            status,
            reason,
            headers: vec![("Content-Type", content_type.into()), ("Cache-Control", "no-store".into())],
            len: body.len() as u64,
            body: Body::Bytes(Arc::new(body)),
        }
    }

    fn text(status: u16, reason: &'static str, text: String) -> Self {
        let len = text.len() as u64;
        Response {
            blob: None,
            status,
            reason,
            headers: vec![("Content-Type", "text/plain; charset=utf-8".into())],
            body: Body::Bytes(Arc::new(text.into_bytes())),
            len,
        }
    }
}

async fn write_head(stream: &mut TcpStream, r: &Response, keep_alive: bool) -> std::io::Result<()> {
    let mut head = format!("HTTP/1.1 {} {}\r\nServer: kiln\r\nContent-Length: {}\r\n", r.status, r.reason, r.len);
    for (k, v) in &r.headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str(if keep_alive { "Connection: keep-alive\r\n\r\n" } else { "Connection: close\r\n\r\n" });
    stream.write_all(head.as_bytes()).await
}

/// Sends `len` bytes of `file` from `start` with sendfile(2), waiting for the socket as needed, at most
/// `write_timeout` each time.
async fn send_file(
    stream: &TcpStream,
    file: &std::fs::File,
    start: u64,
    len: u64,
    write_timeout: Duration,
) -> std::io::Result<()> {
    let mut offset = start as i64;
    let end = start + len;
    while (offset as u64) < end {
        let want = ((end - offset as u64) as usize).min(SENDFILE_CHUNK);
        tokio::time::timeout(write_timeout, stream.writable())
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "the client stopped reading"))??;
        let sent = stream.try_io(Interest::WRITABLE, || {
            nix::sys::sendfile::sendfile(stream.as_fd(), file.as_fd(), Some(&mut offset), want)
                .map_err(std::io::Error::from)
        });
        match sent {
            Ok(0) => {
                return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "file shrank while being sent"))
            }
            // Let the other connections on this worker have their turn (nginx's sendfile_max_chunk).
            Ok(_) => tokio::task::yield_now().await,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Whether two client addresses are the same machine's (an IPv4 address seen through an IPv6 socket is).
pub(super) fn same_address(a: IpAddr, b: IpAddr) -> bool {
    canonical(a) == canonical(b)
}

/// An IPv4 client seen through an IPv6 socket is still an IPv4 client.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

async fn connection(mut stream: TcpStream, client: IpAddr, shared: Shared) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(4096);
    loop {
        let limits = shared.site.borrow().http_limits;
        // The first byte of a request may take the idle time; the rest of its head must follow quickly.
        let mut head_deadline: Option<tokio::time::Instant> = None;
        let (req, used) = loop {
            match parse_request(&buf) {
                Ok(Some(r)) => break r,
                Ok(None) if buf.len() >= MAX_HEAD => {
                    let r = Response::text(431, "Request Header Fields Too Large", "request head too large\n".into());
                    return reply(&mut stream, r, false, limits.write_timeout).await;
                }
                Ok(None) => {}
                Err(why) => {
                    let status = if why == "method not allowed" { 405 } else { 400 };
                    let reason = if status == 405 { "Method Not Allowed" } else { "Bad Request" };
                    return reply(
                        &mut stream,
                        Response::text(status, reason, format!("{why}\n")),
                        false,
                        limits.write_timeout,
                    )
                    .await;
                }
            }
            let mut chunk = [0u8; 4096];
            let deadline = match head_deadline {
                Some(d) => d,
                None if buf.is_empty() => tokio::time::Instant::now() + limits.idle_timeout,
                None => *head_deadline.insert(tokio::time::Instant::now() + limits.header_timeout),
            };
            let n = match tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
                Ok(r) => r?,
                Err(_) => {
                    if !buf.is_empty() || head_deadline.is_some() {
                        shared
                            .limits
                            .limit("http_header_timeout", limits.header_timeout.as_secs(), "slow clients cut off")
                            .refuse();
                    }
                    return Ok(());
                }
            };
            if n == 0 {
                return Ok(());
            }
            if head_deadline.is_none() {
                head_deadline = Some(tokio::time::Instant::now() + limits.header_timeout);
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        buf.drain(..used);
        let mut req = req;
        let snapshot = shared.site.borrow().clone();
        if req.body_len > 0 {
            let max = super::heartbeat::Settings::of(&snapshot.server).max_body;
            if req.body_len > max as u64 {
                shared.limits.limit("heartbeat_max_body", max as u64, "heartbeats refused (body too large)").refuse();
                let r = Response::text(413, "Content Too Large", format!("a request body may have {max} bytes\n"));
                super::metrics::http_response(route_label(&snapshot, &req.path), 413, r.len, None);
                return reply(&mut stream, r, false, limits.write_timeout).await;
            }
            let deadline = tokio::time::Instant::now() + limits.header_timeout;
            while (buf.len() as u64) < req.body_len {
                let mut chunk = [0u8; 4096];
                let n = match tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
                    Ok(r) => r?,
                    Err(_) => {
                        shared
                            .limits
                            .limit("http_header_timeout", limits.header_timeout.as_secs(), "slow clients cut off")
                            .refuse();
                        return Ok(());
                    }
                };
                if n == 0 {
                    return Ok(());
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            req.body = buf.drain(..req.body_len as usize).collect();
        }
        let mut resp = route(&snapshot, &req, client, &shared);
        tracing::debug!(path = %req.path, status = resp.status, "http");
        if req.head_only {
            resp.body = Body::None;
        }
        let logged = match (&resp.blob, &resp.body) {
            (Some(label), Body::File { len, .. }) => Some((label.clone(), *len)),
            _ => None,
        };
        let started = std::time::Instant::now();
        let label = route_label(&snapshot, &req.path);
        let (status, body_bytes, file) = (resp.status, resp.len, matches!(resp.body, Body::File { .. }));
        if label == "ipxe" && status == 200 && !req.head_only && is_node_script(&snapshot, &req.path) {
            super::metrics::boot_started();
        }
        let sent = reply(&mut stream, resp, req.keep_alive, limits.write_timeout).await;
        let delivered = if sent.is_ok() && !req.head_only { body_bytes } else { 0 };
        super::metrics::http_response(label, status, delivered, file.then_some(sent.is_ok()));
        if let Some((label, len)) = logged {
            let secs = started.elapsed().as_secs_f64();
            let detail = match &sent {
                Ok(()) => format!("{label} {len} bytes in {secs:.1}s"),
                Err(e) => format!("{label} failed after {secs:.1}s: {e}"),
            };
            shared.event(HttpEvent { mac: None, client, kind: "blob", detail });
        }
        sent?;
        if !req.keep_alive {
            return Ok(());
        }
    }
}

/// Sends a response. A file is opened before the status line goes out, so a file that cannot be read gets a 500,
/// not a 200 with a short body; a client that stops reading for `write_timeout` is cut off.
async fn reply(stream: &mut TcpStream, r: Response, keep_alive: bool, write_timeout: Duration) -> std::io::Result<()> {
    let file = match &r.body {
        Body::File { path, .. } => match std::fs::File::open(path) {
            Ok(f) => Some(f),
            Err(e) => {
                super::metrics::error(super::metrics::ErrorKind::HttpFile);
                tracing::warn!("http: opening {}: {e}", path.display());
                let failed = Response::text(500, "Internal Server Error", "the file cannot be read\n".into());
                return Box::pin(reply(stream, failed, false, write_timeout)).await;
            }
        },
        _ => None,
    };
    let timed_out = || std::io::Error::new(std::io::ErrorKind::TimedOut, "the client stopped reading");
    tokio::time::timeout(write_timeout, write_head(stream, &r, keep_alive)).await.map_err(|_| timed_out())??;
    match (&r.body, file) {
        (Body::Bytes(b), _) => {
            tokio::time::timeout(write_timeout, stream.write_all(b)).await.map_err(|_| timed_out())??
        }
        (Body::Pair(a, b), _) => {
            for part in [a, b] {
                tokio::time::timeout(write_timeout, stream.write_all(part)).await.map_err(|_| timed_out())??
            }
        }
        (Body::File { start, len, .. }, Some(file)) => send_file(stream, &file, *start, *len, write_timeout).await?,
        _ => {}
    }
    Ok(())
}

/// Accepts connections until `shutdown` turns true; each connection sees the newest site. At most
/// [`HttpLimits::max_connections`] are open at once: beyond that the server stops accepting until one closes
/// (the kernel's backlog holds the waiting clients), and says so once per interval.
pub async fn serve(listener: TcpListener, shared: Shared, mut shutdown: watch::Receiver<bool>) -> Result<()> {
    let open = Arc::new(tokio::sync::Semaphore::new(0));
    let mut granted = 0usize;
    let at_cap: Arc<Limit> = shared.limits.limit("http_max_connections", 0, "connections kept waiting");
    loop {
        // Follow the configured cap: add permits when it grows; when it shrinks, keep the extra ones out of use.
        let max = shared.site.borrow().http_limits.max_connections.max(1);
        at_cap.set_value(max as u64);
        if max > granted {
            open.add_permits(max - granted);
            granted = max;
        } else if max < granted {
            if let Ok(extra) = open.clone().try_acquire_many_owned((granted - max) as u32) {
                extra.forget();
                granted = max;
            }
        }
        let permit = match open.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                at_cap.refuse();
                tokio::select! {
                    p = open.clone().acquire_owned() => match p {
                        Ok(p) => p,
                        Err(_) => return Ok(()),
                    },
                    _ = shutdown.changed() => {
                        if *shutdown.borrow() {
                            return Ok(());
                        }
                        continue;
                    }
                }
            }
        };
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // EMFILE and friends: say it, back off, try again.
                        tracing::warn!("http accept: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let shared = shared.clone();
                tokio::spawn(async move {
                    let _permit = permit;
                    if let Err(e) = connection(stream, peer.ip(), shared).await {
                        tracing::debug!("http {peer}: {e}");
                    }
                });
            }
            _ = shutdown.changed() => {
                if *shutdown.borrow() {
                    return Ok(());
                }
            }
        }
    }
}
