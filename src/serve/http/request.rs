//! Reading a request: the head's parser, byte ranges, percent-decoding. Pure functions, no I/O.

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
