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

use super::limits::{Limit, Limits};
use super::site::Site;
use super::state::State;
use super::status::Tracker;
use crate::net::Mac;
use crate::recipe::UnknownPolicy;

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

/// A parsed request: only what the routes need.
#[derive(Debug, PartialEq, Eq)]
pub struct Request {
    pub head_only: bool,
    /// A `POST` (only `/heartbeat/{mac}` takes one).
    pub post: bool,
    pub path: String,
    pub range: Option<String>,
    pub if_none_match: Option<String>,
    pub keep_alive: bool,
    /// The body's length (`Content-Length`); the body itself is read after the head, into `body`.
    pub body_len: u64,
    pub body: Vec<u8>,
}

/// Parses a request head; `Ok(None)` means more bytes are needed.
pub fn parse_request(buf: &[u8]) -> Result<Option<(Request, usize)>, &'static str> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    let n = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err("malformed request"),
    };
    let (head_only, post) = match req.method {
        Some("GET") => (false, false),
        Some("HEAD") => (true, false),
        Some("POST") => (false, true),
        _ => return Err("method not allowed"),
    };
    let path = req.path.ok_or("malformed request")?.to_string();
    let mut keep_alive = req.version == Some(1);
    let (mut range, mut inm) = (None, None);
    let mut body_len = None;
    for h in req.headers.iter() {
        let v = std::str::from_utf8(h.value).unwrap_or("").trim().to_string();
        if h.name.eq_ignore_ascii_case("range") {
            range = Some(v);
        } else if h.name.eq_ignore_ascii_case("if-none-match") {
            inm = Some(v);
        } else if h.name.eq_ignore_ascii_case("connection") {
            if v.eq_ignore_ascii_case("close") {
                keep_alive = false;
            } else if v.eq_ignore_ascii_case("keep-alive") {
                keep_alive = true;
            }
        } else if h.name.eq_ignore_ascii_case("content-length") {
            let len = v.parse::<u64>().map_err(|_| "malformed request")?;
            if body_len.is_some_and(|l| l != len) {
                return Err("malformed request");
            }
            body_len = Some(len);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err("chunked request bodies are not accepted");
        }
    }
    let body_len = body_len.unwrap_or(0);
    if body_len > 0 && !post {
        return Err("request bodies are not accepted");
    }
    if post && req.headers.iter().all(|h| !h.name.eq_ignore_ascii_case("content-length")) {
        return Err("a POST needs Content-Length");
    }
    let req = Request { head_only, post, path, range, if_none_match: inm, keep_alive, body_len, body: Vec::new() };
    Ok(Some((req, n)))
}

/// A `Range` header that cannot be satisfied (answered with 416).
#[derive(Debug, PartialEq, Eq)]
pub struct Unsatisfiable;

/// A byte range of a `size`-byte file: `Ok(None)` = whole file.
pub fn parse_range(header: &str, size: u64) -> Result<Option<(u64, u64)>, Unsatisfiable> {
    let Some(spec) = header.strip_prefix("bytes=") else { return Ok(None) };
    if spec.contains(',') {
        return Ok(None);
    }
    let (a, b) = spec.split_once('-').ok_or(Unsatisfiable)?;
    let (a, b) = (a.trim(), b.trim());
    let range = if a.is_empty() {
        let n: u64 = b.parse().map_err(|_| Unsatisfiable)?;
        if n == 0 || size == 0 {
            return Err(Unsatisfiable);
        }
        (size.saturating_sub(n), size - 1)
    } else {
        let start: u64 = a.parse().map_err(|_| Unsatisfiable)?;
        let end: u64 = if b.is_empty() {
            size.saturating_sub(1)
        } else {
            b.parse::<u64>().map_err(|_| Unsatisfiable)?.min(size.saturating_sub(1))
        };
        if start >= size || end < start {
            return Err(Unsatisfiable);
        }
        (start, end)
    };
    Ok(Some(range))
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

/// Decodes `%XX` escapes (iPXE escapes the colons of a MAC in a URL path). Malformed escapes
/// are kept as they are; the routes then refuse the path.
pub fn percent_decode(path: &str) -> String {
    let b = path.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("zz"), 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn route(site: &Site, req: &Request, client: IpAddr, shared: &Shared) -> Response {
    let decoded = percent_decode(req.path.split('?').next().unwrap_or(""));
    let path = decoded.as_str();
    let event = |mac: Mac, kind: &'static str, detail: String| {
        shared.event(HttpEvent { mac: Some(mac), client, kind, detail });
    };
    if let Some(mac) = path.strip_prefix("/heartbeat/") {
        if !req.post {
            let mut r = Response::text(405, "Method Not Allowed", "heartbeats are POSTed\n".into());
            r.headers.push(("Allow", "POST".into()));
            return r;
        }
        let answer = super::heartbeat::handle(site, shared, mac, client, &req.body);
        let ctype = if answer.status == 200 { "application/json" } else { "text/plain; charset=utf-8" };
        let mut r = Response::with_type(answer.status, answer.reason, ctype, answer.body.into_bytes());
        if let Some(secs) = answer.retry_after {
            r.headers.push(("Retry-After", secs.to_string()));
        }
        return r;
    }
    if req.post {
        let mut r = Response::text(405, "Method Not Allowed", "only heartbeats are POSTed\n".into());
        r.headers.push(("Allow", "GET, HEAD".into()));
        return r;
    }
    if path == "/healthz" {
        return Response::text(200, "OK", "ok\n".into());
    }
    if path == "/metrics" {
        let text = super::metrics::render(site, shared.status.as_deref(), &shared.limits, shared.state.as_deref());
        return Response::with_type(200, "OK", "text/plain; version=0.0.4; charset=utf-8", text.into_bytes());
    }
    if path == "/" {
        return status_page(site, shared);
    }
    if let Some(m) = path.strip_prefix("/ipxe/") {
        let Ok(mac) = m.parse::<Mac>() else {
            return Response::text(400, "Bad Request", format!("{m:?} is not a MAC address\n"));
        };
        // `?arch=`: the architecture the machine's iPXE reported, when its script asked it to.
        let firmware = req.path.split_once('?').and_then(|(_, q)| q.split('&').find_map(|kv| kv.strip_prefix("arch=")));
        let script = site.script(mac, firmware.map(percent_decode).as_deref());
        // `unknown = "ignore"`: a machine outside the node list leaves no trace.
        if site.node(mac).is_some() || site.server.unknown != UnknownPolicy::Ignore {
            match &script.mismatch {
                Some(problem) => event(mac, "arch-mismatch", problem.clone()),
                None => {
                    event(mac, "script", site.node(mac).map(|n| n.name.clone()).unwrap_or_else(|| "unknown".into()))
                }
            }
        }
        let mut r = Response::text(200, "OK", script.text);
        r.headers.push(("Cache-Control", "no-store".into()));
        return r;
    }
    if let Some(m) = path.strip_prefix("/overlay/") {
        let Ok(mac) = m.parse::<Mac>() else {
            return Response::text(400, "Bad Request", format!("{m:?} is not a MAC address\n"));
        };
        if site.node(mac).is_some() && !overlay_allowed(site, shared.state.as_deref(), mac, client) {
            return Response::text(
                403,
                "Forbidden",
                format!(
                    "the overlay of {mac} is served only to that node's address (its reservation or lease); \
                     {client} is neither (set [server] overlay_allow for relayed or NATed sites)\n"
                ),
            );
        }
        return match site.overlays.get(&mac) {
            Some(bytes) => {
                event(mac, "overlay", format!("{} bytes", bytes.len()));
                if let Some(status) = &shared.status {
                    status.overlay_served(mac, canonical(client));
                }
                let runs = |arch: &str| {
                    site.node(mac).and_then(|n| site.bundles.get(&n.image)).is_some_and(|b| b.arch == arch)
                };
                let (body, len) = match shared.agent.as_ref().filter(|a| runs(a.arch)) {
                    Some(agent) => {
                        (Body::Pair(bytes.clone(), agent.archive.clone()), bytes.len() + agent.archive.len())
                    }
                    None => (Body::Bytes(bytes.clone()), bytes.len()),
                };
                Response {
                    blob: None,
                    status: 200,
                    reason: "OK",
                    headers: vec![
                        ("Content-Type", "application/octet-stream".into()),
                        ("Cache-Control", "no-store".into()),
                    ],
                    len: len as u64,
                    body,
                }
            }
            None => Response::text(404, "Not Found", format!("{mac} is not a known node\n")),
        };
    }
    if let Some(m) = path.strip_prefix("/loader/") {
        let Ok(mac) = m.parse::<Mac>() else {
            return Response::text(400, "Bad Request", format!("{m:?} is not a MAC address\n"));
        };
        if !overlay_allowed(site, shared.state.as_deref(), mac, client) {
            return Response::text(403, "Forbidden", format!("{client} is not the address of {mac}\n"));
        }
        return match super::loader::parse_report(req.path.split_once('?').map(|(_, q)| q).unwrap_or("")) {
            Ok(detail) => {
                event(mac, "loader", detail);
                Response::text(200, "OK", "ok\n".into())
            }
            Err(why) => Response::text(400, "Bad Request", format!("{why}\n")),
        };
    }
    if let Some(hex) = path.strip_prefix("/blob/sha256/") {
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
            return Response::text(400, "Bad Request", "a blob is named by 64 lowercase hex digits\n".into());
        }
        let Some(blob) = site.blobs.get(hex) else {
            return Response::text(404, "Not Found", format!("no blob sha256:{hex} here\n"));
        };
        let etag = format!("\"sha256:{hex}\"");
        let common = vec![
            ("ETag", etag.clone()),
            ("Cache-Control", "public, max-age=31536000, immutable".to_string()),
            ("Accept-Ranges", "bytes".to_string()),
            ("Content-Type", "application/octet-stream".to_string()),
        ];
        if req.if_none_match.as_deref().is_some_and(|v| v == "*" || v.split(',').any(|t| t.trim() == etag)) {
            return Response {
                status: 304,
                reason: "Not Modified",
                headers: common,
                body: Body::None,
                len: 0,
                blob: None,
            };
        }
        let range = match req.range.as_deref().map(|r| parse_range(r, blob.size)) {
            None | Some(Ok(None)) => None,
            Some(Ok(Some(r))) => Some(r),
            Some(Err(Unsatisfiable)) => {
                let mut r = Response::text(416, "Range Not Satisfiable", "range not satisfiable\n".into());
                r.headers.push(("Content-Range", format!("bytes */{}", blob.size)));
                return r;
            }
        };
        let mut headers = common;
        let (status, reason, start, len) = match range {
            Some((a, b)) => {
                headers.push(("Content-Range", format!("bytes {a}-{b}/{}", blob.size)));
                (206, "Partial Content", a, b - a + 1)
            }
            None => (200, "OK", 0, blob.size),
        };
        return Response {
            status,
            reason,
            headers,
            body: Body::File { path: blob.path.clone(), start, len },
            len,
            blob: Some(blob.label.clone()),
        };
    }
    // Firmware files, for UEFI HTTP boot (DHCP gives such clients http://SERVER/<name>).
    let wanted = path.trim_start_matches('/');
    if let Some(file) = site.boot_files.by_name(wanted) {
        let file = &file.path;
        return match std::fs::metadata(file) {
            Ok(m) => Response {
                blob: None,
                status: 200,
                reason: "OK",
                headers: vec![("Content-Type", "application/octet-stream".into())],
                len: m.len(),
                body: Body::File { path: file.clone(), start: 0, len: m.len() },
            },
            Err(e) => Response::text(500, "Internal Server Error", format!("{wanted}: {e}\n")),
        };
    }
    Response::text(404, "Not Found", "not found\n".into())
}

async fn write_head(stream: &mut TcpStream, r: &Response, keep_alive: bool) -> std::io::Result<()> {
    let mut head = format!("HTTP/1.1 {} {}\r\nServer: kiln\r\nContent-Length: {}\r\n", r.status, r.reason, r.len);
    for (k, v) in &r.headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str(if keep_alive { "Connection: keep-alive\r\n\r\n" } else { "Connection: close\r\n\r\n" });
    stream.write_all(head.as_bytes()).await
}

/// Whether a `/ipxe/{mac}` path names a node (its script boots it).
fn is_node_script(site: &Site, path: &str) -> bool {
    let path = percent_decode(path.split('?').next().unwrap_or(""));
    path.strip_prefix("/ipxe/").and_then(|m| m.parse::<Mac>().ok()).is_some_and(|mac| site.node(mac).is_some())
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

/// Whether `client` may have the overlay of node `mac`: it is the node's reserved address, the address leased to
/// it (or, in proxy mode, the address it was seen requesting from the site's DHCP server), or inside
/// `[server] overlay_allow`. Overlays carry hosts files, keys and the admin's templates (sites put
/// secrets there), and MACs are easy to guess.
fn overlay_allowed(site: &Site, state: Option<&State>, mac: Mac, client: IpAddr) -> bool {
    let in_allowed =
        matches!(canonical(client), IpAddr::V4(v4) if site.overlay_allow.iter().any(|net| net.contains(v4)));
    in_allowed || is_node_address(site, state, mac, client)
}

/// Whether `client` is node `mac`'s own address: its reservation, or the address leased to it.
pub(super) fn is_node_address(site: &Site, state: Option<&State>, mac: Mac, client: IpAddr) -> bool {
    let IpAddr::V4(v4) = canonical(client) else { return false };
    if site.node(mac).and_then(|n| n.ipv4) == Some(v4) {
        return true;
    }
    state.and_then(|s| s.address_of(mac, crate::util::unix_now())) == Some(v4)
}

/// The status page, from the server's view of its nodes and the latest boot events.
fn status_page(site: &Site, shared: &Shared) -> Response {
    let now = crate::util::unix_now();
    let state = shared.state.as_deref();
    let rows = match &shared.status {
        Some(tracker) => tracker.status(site, state, false).unwrap_or_default(),
        None => super::status::nodes_status(&site.nodes, &Default::default(), |_| None, now, 30),
    };
    let events = state.and_then(|s| s.events(None, super::page::EVENTS_SHOWN).ok()).unwrap_or_default();
    let html = super::page::render(site, &rows, &events, &shared.limits.snapshot(), now);
    Response::with_type(200, "OK", "text/html; charset=utf-8", html.into_bytes())
}

/// The route a path takes, as a metrics label.
fn route_label(site: &Site, path: &str) -> &'static str {
    let path = path.split('?').next().unwrap_or("");
    let prefixes = [("/ipxe/", "ipxe"), ("/blob/", "blob"), ("/overlay/", "overlay"), ("/heartbeat/", "heartbeat")];
    if let Some((_, label)) = prefixes.iter().find(|(p, _)| path.starts_with(p)) {
        return label;
    }
    match path {
        "/metrics" => "metrics",
        "/" => "status",
        "/healthz" => "healthz",
        p if site.boot_files.by_name(p.trim_start_matches('/')).is_some() => "boot_file",
        _ => "other",
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_and_refuse_what_they_should() {
        let raw = b"GET /ipxe/52:54:00:00:00:01 HTTP/1.1\r\nHost: x\r\nRange: bytes=0-9\r\n\r\nrest";
        let (r, n) = parse_request(raw).unwrap().unwrap();
        assert_eq!(r.path, "/ipxe/52:54:00:00:00:01");
        assert_eq!(r.range.as_deref(), Some("bytes=0-9"));
        assert!(r.keep_alive && !r.head_only);
        assert_eq!(n, raw.len() - 4, "the head ends before the next request's bytes");
        assert!(parse_request(b"GET / HTTP/1.1\r\nHost").unwrap().is_none());
        assert_eq!(parse_request(b"PUT / HTTP/1.1\r\n\r\n").unwrap_err(), "method not allowed");
        assert_eq!(parse_request(b"POST / HTTP/1.1\r\n\r\n").unwrap_err(), "a POST needs Content-Length");
        let (r, _) = parse_request(b"POST /heartbeat/x HTTP/1.1\r\nContent-Length: 12\r\n\r\n").unwrap().unwrap();
        assert!(r.post && r.body_len == 12);
        assert!(parse_request(b"GET / HTTP/1.1\r\nContent-Length: 3\r\n\r\n").is_err());
        assert!(parse_request(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n").is_err());
        assert!(parse_request(b"POST / HTTP/1.1\r\nContent-Length: x\r\n\r\n").is_err());
        assert!(parse_request(b"\x00\x01garbage\r\n\r\n").is_err());
        let (r, _) = parse_request(b"HEAD /healthz HTTP/1.0\r\n\r\n").unwrap().unwrap();
        assert!(r.head_only && !r.keep_alive);
    }

    #[test]
    fn paths_are_percent_decoded() {
        assert_eq!(percent_decode("/ipxe/52%3A54%3a00"), "/ipxe/52:54:00");
        assert_eq!(percent_decode("/a%2"), "/a%2");
        assert_eq!(percent_decode("/a%zz"), "/a%zz");
        assert_eq!(percent_decode("/blob/%2e%2e/x"), "/blob/../x");
    }

    #[test]
    fn ranges() {
        assert_eq!(parse_range("bytes=0-9", 100), Ok(Some((0, 9))));
        assert_eq!(parse_range("bytes=90-", 100), Ok(Some((90, 99))));
        assert_eq!(parse_range("bytes=-10", 100), Ok(Some((90, 99))));
        assert_eq!(parse_range("bytes=50-1000", 100), Ok(Some((50, 99))));
        assert_eq!(parse_range("bytes=100-", 100), Err(Unsatisfiable));
        assert_eq!(parse_range("bytes=0-1,5-6", 100), Ok(None));
        assert_eq!(parse_range("bytes=x-1", 100), Err(Unsatisfiable));
    }
}
