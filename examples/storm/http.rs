//! HTTP/1.1 as iPXE uses it (RFC 9112): GET on a kept-alive connection from the client's own address, the body's
//! length checked against `Content-Length` (and its sha256 against the digest a `/blob/sha256/<hex>` URL names, when
//! asked), plus the iPXE script parser that finds the `kernel` and `initrd` URLs.
//! Left out: chunked bodies, redirects, TLS, names (URLs carry an IPv4 address, as the servers write them).

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

const MAX_HEAD: usize = 16 * 1024;
/// Largest body kept in memory (scripts); larger ones are only counted and hashed.
const MAX_KEPT: u64 = 1 << 20;
/// Read size for bodies: enough to keep syscalls few, small enough for thousands of downloads at once.
const CHUNK: usize = 64 * 1024;

/// An `http://IPv4[:port]/path` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Url {
    pub addr: SocketAddrV4,
    pub path: String,
}

impl Url {
    pub fn parse(s: &str) -> Result<Url, String> {
        let rest = s.strip_prefix("http://").ok_or_else(|| format!("{s:?} is not an http:// URL"))?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) => (h, p.parse::<u16>().map_err(|_| format!("{s:?}: port {p:?} is not a number"))?),
            None => (authority, 80),
        };
        let ip: Ipv4Addr = host.parse().map_err(|_| format!("{s:?}: host {host:?} is not an IPv4 address"))?;
        Ok(Url { addr: SocketAddrV4::new(ip, port), path: path.to_string() })
    }

    /// The sha256 a `/blob/sha256/<hex>` path names.
    pub fn digest(&self) -> Option<&str> {
        let hex = self.path.strip_prefix("/blob/sha256/")?;
        (hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit())).then_some(hex)
    }
}

/// What a `kernel`/`initrd` script asks iPXE to fetch.
#[derive(Debug, PartialEq, Eq)]
pub struct Script {
    pub kernel: String,
    pub initrds: Vec<String>,
}

/// Finds the kernel and initrd URLs of an iPXE script: `kernel [opts] URL args…`, `initrd [--name N] URL`
/// (`imgexec`/`chain` and `module`/`imgfetch` are their aliases). Options with a value: `--name`/`-n`,
/// `--timeout`/`-t`; flags: `--autofree`/`-a`, `--replace`/`-r`.
pub fn parse_script(text: &str) -> Result<Script, String> {
    if !text.starts_with("#!ipxe") {
        return Err(format!("not an iPXE script: {:?}", text.chars().take(60).collect::<String>()));
    }
    let mut kernel = None;
    let mut initrds = Vec::new();
    for line in text.lines().map(str::trim) {
        let mut words = line.split_whitespace();
        let Some(cmd) = words.next() else { continue };
        let is_kernel = matches!(cmd, "kernel" | "chain" | "imgexec");
        let is_initrd = matches!(cmd, "initrd" | "module" | "imgfetch");
        if !is_kernel && !is_initrd {
            continue;
        }
        let mut url = None;
        while let Some(w) = words.next() {
            match w {
                "--name" | "-n" | "--timeout" | "-t" => {
                    words.next();
                }
                w if w.starts_with('-') => {}
                w => {
                    url = Some(w.to_string());
                    break;
                }
            }
        }
        let url = url.ok_or_else(|| format!("{cmd} without a URL: {line:?}"))?;
        if is_kernel {
            if kernel.is_some() {
                return Err(format!("a second kernel line: {line:?}"));
            }
            kernel = Some(url);
        } else {
            initrds.push(url);
        }
    }
    let first_echo = text.lines().find_map(|l| l.trim().strip_prefix("echo ")).unwrap_or("");
    let kernel = kernel.ok_or_else(|| format!("the script boots no kernel (it says {first_echo:?})"))?;
    Ok(Script { kernel, initrds })
}

/// A download's result.
pub struct Got {
    pub len: u64,
    /// The body, when asked for and small.
    pub body: Option<Vec<u8>>,
    /// Whether the sha256 of the body was compared with the URL's digest (and matched).
    pub digest_checked: bool,
}

/// One client's HTTP connection (kept alive between requests, as iPXE does).
pub struct Client {
    local: Ipv4Addr,
    conn: Option<(SocketAddrV4, TcpStream)>,
    connect_timeout: Duration,
    /// Longest wait for the next bytes of a response.
    idle: Duration,
}

impl Client {
    pub fn new(local: Ipv4Addr, connect_timeout: Duration, idle: Duration) -> Client {
        Client { local, conn: None, connect_timeout, idle }
    }

    async fn connect(&self, to: SocketAddrV4) -> Result<TcpStream, String> {
        let socket = TcpSocket::new_v4().map_err(|e| format!("creating a TCP socket: {e}"))?;
        socket.bind(SocketAddr::from((self.local, 0))).map_err(|e| format!("binding {}: {e}", self.local))?;
        match tokio::time::timeout(self.connect_timeout, socket.connect(SocketAddr::V4(to))).await {
            Err(_) => Err(format!("connecting to {to}: no answer in {}s", self.connect_timeout.as_secs())),
            Ok(Err(e)) => Err(format!("connecting to {to}: {e}")),
            Ok(Ok(s)) => {
                let _ = s.set_nodelay(true);
                Ok(s)
            }
        }
    }

    /// GETs `url`, keeping the body if `keep` (up to 1 MiB) and checking its sha256 if `hash` and the URL names one.
    pub async fn get(&mut self, url: &Url, keep: bool, hash: bool) -> Result<Got, String> {
        // A kept-alive connection the server closed meanwhile fails before any byte of the answer: retry once, fresh.
        let reused = matches!(&self.conn, Some((a, _)) if *a == url.addr);
        match self.try_get(url, keep, hash).await {
            Err((false, e)) if reused => {
                self.conn = None;
                self.try_get(url, keep, hash)
                    .await
                    .map_err(|(_, e2)| format!("{e2} (after {e} on a reused connection)"))
            }
            r => r.map_err(|(_, e)| e),
        }
    }

    /// `Err((true, _))` once some of the response arrived.
    async fn try_get(&mut self, url: &Url, keep: bool, hash: bool) -> Result<Got, (bool, String)> {
        if !matches!(&self.conn, Some((a, _)) if *a == url.addr) {
            let stream = self.connect(url.addr).await.map_err(|e| (true, e))?;
            self.conn = Some((url.addr, stream));
        }
        let Some((_, stream)) = self.conn.as_mut() else { return Err((true, "no connection".into())) };
        let request = format!(
            "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: iPXE/1.21.1 (storm)\r\nConnection: keep-alive\r\n\r\n",
            url.path, url.addr
        );
        stream.write_all(request.as_bytes()).await.map_err(|e| (false, format!("sending the request: {e}")))?;
        let idle = self.idle;
        let mut head = Vec::with_capacity(1024);
        let mut chunk = vec![0u8; 4096];
        let end = loop {
            let n = match tokio::time::timeout(idle, stream.read(&mut chunk)).await {
                Err(_) => return Err((true, format!("no response head within {}s", idle.as_secs()))),
                Ok(Err(e)) => return Err((!head.is_empty(), format!("reading the response: {e}"))),
                Ok(Ok(n)) => n,
            };
            if n == 0 {
                return Err((!head.is_empty(), "connection closed before the response head".into()));
            }
            head.extend_from_slice(&chunk[..n]);
            if let Some(i) = head.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            if head.len() > MAX_HEAD {
                return Err((true, "response head over 16 KiB".into()));
            }
        };
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut resp = httparse::Response::new(&mut headers);
        resp.parse(&head[..end]).map_err(|e| (true, format!("parsing the response head: {e}")))?;
        let status = resp.code.unwrap_or(0);
        let header = |name: &str| {
            resp.headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case(name))
                .map(|h| String::from_utf8_lossy(h.value).trim().to_string())
        };
        let length = header("content-length");
        let close = header("connection").is_some_and(|v| v.eq_ignore_ascii_case("close"));
        if header("transfer-encoding").is_some() {
            return Err((true, "chunked responses are not supported here".into()));
        }
        let len: u64 = length
            .as_deref()
            .ok_or((true, format!("HTTP {status} without Content-Length")))?
            .parse()
            .map_err(|_| (true, format!("Content-Length {length:?} is not a number")))?;
        if status != 200 {
            self.conn = None;
            return Err((true, format!("HTTP {status} for {}", url.path)));
        }
        let want_digest = if hash { url.digest().map(str::to_string) } else { None };
        let mut hasher = want_digest.as_ref().map(|_| Sha256::new());
        let mut body = (keep && len <= MAX_KEPT).then(|| Vec::with_capacity(len as usize));
        let mut received = 0u64;
        let mut take = |bytes: &[u8], received: &mut u64| {
            *received += bytes.len() as u64;
            if let Some(h) = hasher.as_mut() {
                h.update(bytes);
            }
            if let Some(b) = body.as_mut() {
                b.extend_from_slice(bytes);
            }
        };
        let early = &head[end..];
        if early.len() as u64 > len {
            return Err((true, format!("{} bytes after a body of {len}", early.len() as u64 - len)));
        }
        take(early, &mut received);
        let mut buf = vec![0u8; CHUNK];
        while received < len {
            let room = ((len - received) as usize).min(CHUNK);
            let n = match tokio::time::timeout(idle, stream.read(&mut buf[..room])).await {
                Err(_) => return Err((true, format!("stalled at {received} of {len} bytes for {}s", idle.as_secs()))),
                Ok(Err(e)) => return Err((true, format!("after {received} of {len} bytes: {e}"))),
                Ok(Ok(0)) => return Err((true, format!("connection closed after {received} of {len} bytes"))),
                Ok(Ok(n)) => n,
            };
            take(&buf[..n], &mut received);
        }
        if close {
            self.conn = None;
        }
        let mut digest_checked = false;
        if let (Some(want), Some(h)) = (want_digest, hasher) {
            let got = hex::encode(h.finalize());
            if got != want {
                return Err((true, format!("sha256 {got}, the URL names {want}")));
            }
            digest_checked = true;
        }
        Ok(Got { len: received, body, digest_checked })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let u = Url::parse("http://10.5.0.1/ipxe/52:54:00:00:00:01").unwrap();
        assert_eq!(u.addr, "10.5.0.1:80".parse().unwrap());
        assert_eq!(u.path, "/ipxe/52:54:00:00:00:01");
        assert_eq!(Url::parse("http://10.5.0.1:8080").unwrap().path, "/");
        assert!(Url::parse("https://10.5.0.1/").is_err());
        assert!(Url::parse("http://boot.example/").is_err());
        let hex = "ab".repeat(32);
        assert_eq!(Url::parse(&format!("http://1.2.3.4/blob/sha256/{hex}")).unwrap().digest(), Some(hex.as_str()));
    }

    #[test]
    fn scripts() {
        let s = "#!ipxe\necho kiln: booting\nkernel http://1.2.3.4/blob/sha256/k initrd=initramfs quiet\n\
                 initrd --name initramfs http://1.2.3.4/blob/sha256/i\ninitrd -n image http://1.2.3.4/b\nboot\n";
        let p = parse_script(s).unwrap();
        assert_eq!(p.kernel, "http://1.2.3.4/blob/sha256/k");
        assert_eq!(p.initrds, vec!["http://1.2.3.4/blob/sha256/i", "http://1.2.3.4/b"]);
        let wait = "#!ipxe\necho kiln: not a known node\nsleep 30\nreboot\n";
        assert!(parse_script(wait).unwrap_err().contains("not a known node"));
        assert!(parse_script("<html>").is_err());
    }
}
