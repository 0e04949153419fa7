//! The loader's HTTP/1.1 client (RFC 9110/9112, `Connection: close`): the image download, resumed with
//! `Range` after a broken connection and hashed as it streams, and the step reports to kiln serve.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use sha2::{Digest as _, Sha256};

use super::config::Url;

/// Connections tried without a byte of progress before a download gives up.
const MAX_STALLS: u32 = 8;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a download did not give the expected image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FetchError {
    /// All bytes arrived and hash to `got`, not to what the manifest says.
    Mismatch { got: String },
    /// The server has another number of bytes than the manifest says.
    Size { got: u64 },
    /// The server could not be reached or kept failing.
    Other(String),
}

/// A response's status and the headers the loader uses.
struct Head {
    status: u16,
    length: Option<u64>,
    /// `Content-Range: bytes START-END/TOTAL`.
    range: Option<(u64, u64)>,
}

fn get(url: &Url, from: u64, query: &str, timeout: Duration) -> Result<(Head, BufReader<TcpStream>), String> {
    let addr = SocketAddr::from((url.host, url.port));
    let mut s = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT).map_err(|e| format!("connecting to {addr}: {e}"))?;
    s.set_read_timeout(Some(timeout)).map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(timeout)).map_err(|e| e.to_string())?;
    let range = if from > 0 { format!("Range: bytes={from}-\r\n") } else { String::new() };
    let req = format!(
        "GET {}{query} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: kiln-loader/{}\r\n{range}Connection: close\r\n\r\n",
        url.path,
        env!("CARGO_PKG_VERSION")
    );
    s.write_all(req.as_bytes()).map_err(|e| format!("sending the request to {addr}: {e}"))?;
    let mut r = BufReader::with_capacity(1 << 20, s);
    let mut line = String::new();
    r.read_line(&mut line).map_err(|e| format!("reading the answer of {addr}: {e}"))?;
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("{addr} answered {:?}, not HTTP", line.trim()))?;
    let mut head = Head { status, length: None, range: None };
    let mut total = line.len();
    loop {
        line.clear();
        let n = r.read_line(&mut line).map_err(|e| format!("reading the answer of {addr}: {e}"))?;
        total += n;
        if n == 0 || total > 16 * 1024 {
            return Err(format!("{addr} sent a truncated or oversized answer head"));
        }
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        let Some((k, v)) = l.split_once(':') else { continue };
        let v = v.trim();
        if k.eq_ignore_ascii_case("content-length") {
            head.length = v.parse().ok();
        } else if k.eq_ignore_ascii_case("content-range") {
            // bytes START-END/TOTAL
            let rest = v.strip_prefix("bytes ").unwrap_or(v);
            if let Some((span, total)) = rest.split_once('/') {
                let start = span.split('-').next().and_then(|a| a.parse().ok());
                if let (Some(start), Ok(total)) = (start, total.parse()) {
                    head.range = Some((start, total));
                }
            }
        }
    }
    Ok((head, r))
}

/// What a finished download took.
#[derive(Debug)]
pub struct Fetched {
    pub bytes: u64,
    pub secs: f64,
}

/// Downloads `size` bytes from `url` into `out` at `base`, resuming where a broken connection stopped, and
/// checks their sha256 against `expected` (hex) as they stream. `progress` is called with the bytes so far.
pub fn fetch(
    url: &Url,
    size: u64,
    expected: &str,
    out: &std::fs::File,
    base: u64,
    progress: &mut dyn FnMut(u64),
) -> Result<Fetched, FetchError> {
    let started = Instant::now();
    let mut hasher = Sha256::new();
    let mut got = 0u64;
    let mut stalls = 0;
    let mut last_error = String::new();
    let mut buf = vec![0u8; 1 << 20];
    while got < size {
        if stalls >= MAX_STALLS {
            return Err(FetchError::Other(format!("{url}: {stalls} tries without progress; last: {last_error}")));
        }
        if stalls > 0 {
            println!("kiln-loader: {last_error}; trying again from byte {got}");
            std::thread::sleep(Duration::from_secs(1 << stalls.min(3)));
        }
        let before = got;
        let (head, mut body) = match get(url, got, "", READ_TIMEOUT) {
            Ok(r) => r,
            Err(e) => {
                last_error = e;
                stalls += 1;
                continue;
            }
        };
        let total = match head.status {
            200 => {
                if got > 0 {
                    // The server ignored the range: start over.
                    got = 0;
                    hasher = Sha256::new();
                }
                head.length
            }
            206 => match head.range {
                Some((start, total)) if start == got => Some(total),
                _ => {
                    last_error = format!("{url}: a partial answer for another range than bytes={got}-");
                    stalls += 1;
                    continue;
                }
            },
            416 => return Err(FetchError::Size { got }),
            s => {
                last_error = format!("{url}: HTTP {s}");
                stalls += 1;
                continue;
            }
        };
        if let Some(total) = total.filter(|&t| t != size) {
            return Err(FetchError::Size { got: total });
        }
        loop {
            let want = buf.len().min((size - got) as usize);
            if want == 0 {
                break;
            }
            let n = match body.read(&mut buf[..want]) {
                Ok(0) => {
                    last_error = format!("{url}: the connection closed after byte {got} of {size}");
                    break;
                }
                Ok(n) => n,
                Err(e) => {
                    last_error = format!("{url}: {e} after byte {got} of {size}");
                    break;
                }
            };
            if let Err(e) = out.write_all_at(&buf[..n], base + got) {
                return Err(FetchError::Other(format!("writing the image at byte {got}: {e}")));
            }
            hasher.update(&buf[..n]);
            got += n as u64;
            progress(got);
        }
        stalls = if got > before { 0 } else { stalls + 1 };
        if got < size && stalls == 0 {
            // Progress, then a break: resume at once.
            println!("kiln-loader: {last_error}; resuming");
        }
    }
    let digest: String = hasher.finalize().iter().map(|b| format!("{b:02x}")).collect();
    if digest != expected {
        return Err(FetchError::Mismatch { got: digest });
    }
    Ok(Fetched { bytes: got, secs: started.elapsed().as_secs_f64() })
}

/// `text` with everything but unreserved characters percent-encoded (RFC 3986).
pub fn encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Tells kiln serve about a step (`GET EVENTS?step=…&detail=…`); returns why it could not.
pub fn report(events: &Url, step: &str, detail: &str) -> Result<(), String> {
    let query = format!("?step={}&detail={}", encode(step), encode(detail));
    let (head, _) = get(events, 0, &query, Duration::from_secs(3))?;
    if head.status != 200 {
        return Err(format!("{events}: HTTP {}", head.status));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn encoding_keeps_unreserved_characters() {
        assert_eq!(encode("image 12 bytes in 1.5s"), "image%2012%20bytes%20in%201.5s");
        assert_eq!(encode("a&b=c/d"), "a%26b%3Dc%2Fd");
    }

    /// A server that sends `parts` of `data` over successive connections, each cut after its part, answering
    /// ranges as asked.
    fn flaky_server(data: Vec<u8>, cuts: Vec<usize>) -> Url {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for (i, conn) in l.incoming().enumerate() {
                let mut s = conn.unwrap();
                let mut head = [0u8; 4096];
                let n = s.read(&mut head).unwrap();
                let text = String::from_utf8_lossy(&head[..n]).to_string();
                let from: usize = text
                    .lines()
                    .find_map(|l| l.strip_prefix("Range: bytes="))
                    .and_then(|r| r.trim_end_matches('-').parse().ok())
                    .unwrap_or(0);
                let end = cuts.get(i).copied().unwrap_or(data.len()).max(from);
                let status = if from > 0 {
                    format!("206 Partial Content\r\nContent-Range: bytes {from}-{}/{}", data.len() - 1, data.len())
                } else {
                    "200 OK".to_string()
                };
                let _ = write!(s, "HTTP/1.1 {status}\r\nContent-Length: {}\r\n\r\n", data.len() - from);
                let _ = s.write_all(&data[from..end]);
            }
        });
        Url { host: "127.0.0.1".parse().unwrap(), port, path: "/blob".into() }
    }

    fn sha(data: &[u8]) -> String {
        Sha256::digest(data).iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn downloads_resume_after_broken_connections_and_are_verified() {
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let url = flaky_server(data.clone(), vec![1_000_000, 1_000_000, 2_500_000]);
        let dir = std::env::temp_dir().join(format!("kiln-loader-test-{}", std::process::id()));
        let out = std::fs::File::create(&dir).unwrap();
        let f = fetch(&url, data.len() as u64, &sha(&data), &out, 0, &mut |_| {}).unwrap();
        assert_eq!(f.bytes, data.len() as u64);
        assert_eq!(std::fs::read(&dir).unwrap(), data);
        // The same bytes against another digest: refused, naming what came.
        let url = flaky_server(data.clone(), vec![]);
        let err = fetch(&url, data.len() as u64, &"0".repeat(64), &out, 0, &mut |_| {}).unwrap_err();
        assert_eq!(err, FetchError::Mismatch { got: sha(&data) });
        // A server with fewer bytes than the manifest says.
        let url = flaky_server(data[..1000].to_vec(), vec![]);
        let err = fetch(&url, data.len() as u64, &sha(&data), &out, 0, &mut |_| {}).unwrap_err();
        assert_eq!(err, FetchError::Size { got: 1000 });
        let _ = std::fs::remove_file(&dir);
    }
}
