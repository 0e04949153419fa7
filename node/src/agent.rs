//! `kiln-node agent`: the node's status agent. Every heartbeat interval it tells kiln serve how the node is
//! (uptime, load, memory, kernel, the image it booted) with one HTTP request, and says goodbye when the node
//! shuts down.
//!
//! kiln's init shim starts it in the background just before it execs the image's init, which inherits it (systemd
//! and busybox init both leave processes they did not start alone until shutdown, then send every process
//! SIGTERM). Everything it needs comes from the node's overlay (`/etc/kiln/node.env`, written by kiln serve):
//!
//! - `KILN_SERVER_URL` (`http://10.4.0.1` or `http://10.4.0.1:8080`: an address, never a name: a static binary
//!   does not look names up), `KILN_MAC` (the node's MAC, which names it to the server);
//! - `KILN_HEARTBEAT` (seconds, 30 when missing; the server's answer to each heartbeat may change it) and
//!   `KILN_IMAGE_DIGEST` (the image the node was given).
//!
//! It reads `/proc` only, writes nothing on the node, and logs a few lines (start, first report, trouble, stop)
//! to `--log` (the shim gives `/dev/kmsg`, so they land in the kernel log and on the console) or stderr.
//! `kiln.agent=off` on the kernel command line keeps it from running.
//!
//! The request is `POST /heartbeat/<mac>` with a small JSON object:
//!
//! ```text
//! {"event":"up","uptime":42.17,"load":[0.08,0.02,0.01],"mem_total":1021112320,"mem_available":901312512,
//!  "kernel":"6.1.0-28-amd64","image":"sha256:…","boot_id":"…","agent":"0.1.0"}
//! ```
//!
//! `event` is `up`, or `stop` for the last one, sent on SIGTERM, SIGINT or SIGHUP.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::ExitCode;
use std::time::Duration;

/// Where kiln serve's overlay puts the node's settings.
const NODE_ENV: &str = "/etc/kiln/node.env";
/// The interval when neither node.env nor the server says otherwise.
const DEFAULT_HEARTBEAT: u64 = 30;
/// Longest wait between attempts while the server cannot be reached (the network may come up any moment).
const RETRY: u64 = 5;
/// How long one heartbeat may take, connecting included.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// The goodbye is sent while the machine shuts down: it gets less.
const STOP_TIMEOUT: Duration = Duration::from_secs(2);
/// Most bytes of an answer read (the server sends a few dozen).
const MAX_ANSWER: u64 = 4096;

/// What the agent was told: the command line, over node.env.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub server: SocketAddr,
    /// `host[:port]` as the URL gave it, for the Host header.
    pub host: String,
    pub mac: String,
    pub heartbeat: u64,
    pub image: String,
}

/// `kiln-node agent [--env FILE] [--url URL] [--once] [--log FILE]`.
pub fn main(args: &[String]) -> ExitCode {
    let mut env_file = NODE_ENV.to_string();
    let (mut url, mut once, mut log_file) = (None, false, None);
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--env" => env_file = it.next().cloned().unwrap_or_default(),
            "--url" => url = it.next().cloned(),
            "--log" => log_file = it.next().cloned(),
            "--once" => once = true,
            other => {
                eprintln!(
                    "kiln-node agent: unknown argument {other:?}; usage: kiln-node agent [--env FILE] [--url URL] \
                     [--once] [--log FILE]"
                );
                return ExitCode::from(2);
            }
        }
    }
    let log = Log::open(log_file.as_deref());
    if std::fs::read_to_string("/proc/cmdline").is_ok_and(|c| c.split_whitespace().any(|a| a == "kiln.agent=off")) {
        log.line("kiln.agent=off on the kernel command line: not reporting");
        return ExitCode::SUCCESS;
    }
    let text = match std::fs::read_to_string(&env_file) {
        Ok(t) => t,
        Err(e) => {
            // A machine booted without an overlay (an unknown machine given an image) has nothing to report to.
            log.line(&format!("reading {env_file}: {e}: not reporting"));
            return if once { ExitCode::FAILURE } else { ExitCode::SUCCESS };
        }
    };
    let config = match Config::from_env(&parse_env(&text), url.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            log.line(&format!("{env_file}: {e}: not reporting"));
            return ExitCode::FAILURE;
        }
    };
    if once {
        return match send(&config, "up", REQUEST_TIMEOUT) {
            Ok(answer) => {
                log.line(&format!("heartbeat accepted by {} (interval {} s)", config.host, answer.heartbeat));
                ExitCode::SUCCESS
            }
            Err(e) => {
                log.line(&format!("heartbeat to {}: {e}", config.host));
                ExitCode::FAILURE
            }
        };
    }
    run(config, &log)
}

fn run(mut config: Config, log: &Log) -> ExitCode {
    let signals = match signals::Blocked::termination() {
        Ok(s) => s,
        Err(e) => {
            log.line(&format!("cannot wait for signals ({e}): not reporting"));
            return ExitCode::FAILURE;
        }
    };
    log.line(&format!("reporting to {} every {} s as {}", config.host, config.heartbeat, config.mac));
    let (mut reported, mut failures) = (false, 0u64);
    loop {
        let wait = match send(&config, "up", REQUEST_TIMEOUT) {
            Ok(answer) => {
                if !reported || failures > 0 {
                    log.line(&format!("heartbeat accepted by {}", config.host));
                }
                if answer.heartbeat != config.heartbeat {
                    log.line(&format!("the server asks for a heartbeat every {} s", answer.heartbeat));
                    config.heartbeat = answer.heartbeat;
                }
                (reported, failures) = (true, 0);
                config.heartbeat
            }
            Err(e) => {
                failures += 1;
                // The first failure, then one line every 20 (the network may simply not be up yet).
                if failures == 1 || failures % 20 == 0 {
                    log.line(&format!("heartbeat to {} failed ({failures} in a row): {e}", config.host));
                }
                if e.refused {
                    config.heartbeat
                } else {
                    config.heartbeat.min(RETRY)
                }
            }
        };
        if let Some(signal) = signals.wait(Duration::from_secs(wait.max(1))) {
            let said = match send(&config, "stop", STOP_TIMEOUT) {
                Ok(_) => "said goodbye",
                Err(_) => "could not say goodbye",
            };
            log.line(&format!("signal {signal}: {said}, stopping"));
            return ExitCode::SUCCESS;
        }
    }
}

/// Reads `KEY='value'` lines, as kiln writes node.env (shell syntax, single-quoted values).
pub fn parse_env(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|line| {
            let line = line.trim();
            if line.starts_with('#') {
                return None;
            }
            let (key, value) = line.split_once('=')?;
            let value = value.trim();
            let value = value.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')).unwrap_or(value);
            Some((key.trim().to_string(), value.to_string()))
        })
        .collect()
}

impl Config {
    /// The agent's settings from node.env's variables; `url` overrides `KILN_SERVER_URL`.
    pub fn from_env(vars: &[(String, String)], url: Option<&str>) -> Result<Config, String> {
        let get = |key: &str| vars.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v.as_str()).unwrap_or("");
        let url = url.unwrap_or(get("KILN_SERVER_URL"));
        if url.is_empty() {
            return Err("no KILN_SERVER_URL (an overlay from an older kiln serve?)".into());
        }
        let (server, host) = parse_url(url)?;
        let mac = get("KILN_MAC").to_ascii_lowercase();
        if mac.len() != 17 || !mac.split(':').all(|b| b.len() == 2 && b.bytes().all(|c| c.is_ascii_hexdigit())) {
            return Err(format!("KILN_MAC={mac:?} is not a MAC address"));
        }
        let heartbeat = match get("KILN_HEARTBEAT") {
            "" => DEFAULT_HEARTBEAT,
            s => s.parse::<u64>().ok().filter(|n| *n > 0).ok_or(format!("KILN_HEARTBEAT={s:?} is not seconds"))?,
        };
        Ok(Config { server, host, mac, heartbeat, image: get("KILN_IMAGE_DIGEST").to_string() })
    }
}

/// `http://ADDRESS[:PORT][/]` → the socket address and the Host header.
fn parse_url(url: &str) -> Result<(SocketAddr, String), String> {
    let rest = url.strip_prefix("http://").ok_or(format!("{url:?}: only http:// URLs are supported"))?;
    let host = rest.trim_end_matches('/');
    if host.contains('/') {
        return Err(format!("{url:?}: a server URL has no path"));
    }
    let addr = host
        .parse::<SocketAddr>()
        .or_else(|_| host.parse::<std::net::IpAddr>().map(|ip| SocketAddr::new(ip, 80)))
        .or_else(|_| {
            // [v6] without a port
            host.strip_prefix('[')
                .and_then(|h| h.strip_suffix(']'))
                .and_then(|h| h.parse::<std::net::Ipv6Addr>().ok())
                .map(|ip| SocketAddr::new(ip.into(), 80))
                .ok_or(())
        })
        .map_err(|_| format!("{url:?}: the server must be given by address (the agent looks no names up)"))?;
    Ok((addr, host.to_string()))
}

/// How the node is, from `/proc`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Health {
    pub uptime: f64,
    pub load: [f64; 3],
    pub mem_total: u64,
    pub mem_available: u64,
    pub kernel: String,
    pub boot_id: String,
}

impl Health {
    pub fn read() -> Health {
        let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
        let uptime = read("/proc/uptime").split_whitespace().next().and_then(|u| u.parse().ok()).unwrap_or(0.0);
        let loadavg = read("/proc/loadavg");
        let mut load = [0.0; 3];
        for (slot, value) in load.iter_mut().zip(loadavg.split_whitespace()) {
            *slot = value.parse().unwrap_or(0.0);
        }
        let (mem_total, mem_available) = meminfo(&read("/proc/meminfo"));
        Health {
            uptime,
            load,
            mem_total,
            mem_available,
            kernel: read("/proc/sys/kernel/osrelease").trim().to_string(),
            boot_id: read("/proc/sys/kernel/random/boot_id").trim().to_string(),
        }
    }
}

/// (MemTotal, MemAvailable) in bytes from /proc/meminfo's text (kB values).
pub fn meminfo(text: &str) -> (u64, u64) {
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.trim_start_matches(':').split_whitespace().next())
            .and_then(|kb| kb.parse::<u64>().ok())
            .map(|kb| kb * 1024)
    };
    let total = field("MemTotal").unwrap_or(0);
    // Kernels before 3.14 have no MemAvailable: free memory is the nearest thing.
    let available = field("MemAvailable").or_else(|| field("MemFree")).unwrap_or(0);
    (total, available)
}

/// The heartbeat's body.
pub fn body(event: &str, health: &Health, image: &str) -> String {
    format!(
        "{{\"event\":{},\"uptime\":{:.2},\"load\":[{:.2},{:.2},{:.2}],\"mem_total\":{},\"mem_available\":{},\"kernel\":{},\"image\":{},\"boot_id\":{},\"agent\":{}}}",
        json_string(event),
        finite(health.uptime),
        finite(health.load[0]),
        finite(health.load[1]),
        finite(health.load[2]),
        health.mem_total,
        health.mem_available,
        json_string(&health.kernel),
        json_string(image),
        json_string(&health.boot_id),
        json_string(env!("CARGO_PKG_VERSION")),
    )
}

fn finite(x: f64) -> f64 {
    if x.is_finite() && x >= 0.0 {
        x
    } else {
        0.0
    }
}

fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// What the server answered to a heartbeat it accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// The interval the server wants.
    pub heartbeat: u64,
}

/// Why a heartbeat did not go through.
#[derive(Debug)]
pub struct SendError {
    message: String,
    /// The server answered and said no (a 4xx or 5xx): trying again at once would be refused again.
    refused: bool,
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

fn send(config: &Config, event: &str, timeout: Duration) -> Result<Answer, SendError> {
    let failed = |message: String| SendError { message, refused: false };
    let body = body(event, &Health::read(), &config.image);
    let request = format!(
        "POST /heartbeat/{} HTTP/1.1\r\nHost: {}\r\nUser-Agent: kiln-node/{}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        config.mac,
        config.host,
        env!("CARGO_PKG_VERSION"),
        body.len()
    );
    let mut stream =
        TcpStream::connect_timeout(&config.server, timeout).map_err(|e| failed(format!("connecting: {e}")))?;
    stream
        .set_read_timeout(Some(timeout))
        .and_then(|_| stream.set_write_timeout(Some(timeout)))
        .map_err(|e| failed(e.to_string()))?;
    stream.write_all(request.as_bytes()).map_err(|e| failed(format!("sending: {e}")))?;
    let mut answer = Vec::new();
    stream.take(MAX_ANSWER).read_to_end(&mut answer).map_err(|e| failed(format!("reading the answer: {e}")))?;
    parse_answer(&answer, config.heartbeat)
}

/// Reads the server's answer: the status, and the interval from a body like `{"heartbeat":30}`.
fn parse_answer(answer: &[u8], current: u64) -> Result<Answer, SendError> {
    let text = String::from_utf8_lossy(answer);
    let status_line = text.lines().next().unwrap_or("");
    let status = status_line.split_whitespace().nth(1).and_then(|s| s.parse::<u16>().ok());
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.trim()).unwrap_or("");
    match status {
        Some(200..=299) => {
            let heartbeat = body
                .split_once("\"heartbeat\":")
                .and_then(|(_, rest)| rest.trim_start().split(|c: char| !c.is_ascii_digit()).next())
                .and_then(|n| n.parse::<u64>().ok())
                .filter(|n| *n > 0)
                .unwrap_or(current);
            Ok(Answer { heartbeat })
        }
        Some(code) => Err(SendError { message: format!("the server answered {code}: {body}"), refused: true }),
        None => Err(SendError { message: format!("not an HTTP answer: {status_line:?}"), refused: false }),
    }
}

/// Where the agent's few lines go: a file opened once (the kernel log), else stderr. Each line is one `write`,
/// which the kernel log needs (every write to /dev/kmsg is one record).
struct Log {
    file: Option<std::fs::File>,
    kmsg: bool,
}

impl Log {
    fn open(path: Option<&str>) -> Log {
        let file = path.and_then(|p| std::fs::OpenOptions::new().append(true).open(p).ok());
        Log { kmsg: path.is_some_and(|p| p.ends_with("kmsg")) && file.is_some(), file }
    }

    fn line(&self, text: &str) {
        // <5>: notice, shown on the console unless the kernel was told `quiet`.
        let line = format!("{}kiln-node agent: {text}\n", if self.kmsg { "<5>" } else { "" });
        match &self.file {
            Some(file) => {
                let _ = (&*file).write_all(line.as_bytes());
            }
            None => {
                let _ = std::io::stderr().lock().write_all(line.as_bytes());
            }
        }
    }
}

/// Waiting for SIGTERM, SIGINT or SIGHUP or a timeout, whichever comes first, in one system call: the signals are
/// blocked and taken with `sigtimedwait(2)`, so there is no handler and no polling.
mod signals {
    use std::time::Duration;

    const SIGHUP: i32 = 1;
    const SIGINT: i32 = 2;
    const SIGTERM: i32 = 15;
    const SIG_BLOCK: i32 = 0;
    const EINTR: i32 = 4;
    const EAGAIN: i32 = 11;

    /// glibc's `sigset_t` (1,024 bits on every Linux architecture).
    #[repr(C)]
    struct SigSet([u64; 16]);

    #[repr(C)]
    struct Timespec {
        tv_sec: i64,
        tv_nsec: i64,
    }

    // std links the C library; these are its POSIX signal functions. Signal masks and sigtimedwait have no safe
    // wrapper in std, and the agent keeps its dependencies at none.
    #[allow(unsafe_code)]
    extern "C" {
        fn sigemptyset(set: *mut SigSet) -> i32;
        fn sigaddset(set: *mut SigSet, signal: i32) -> i32;
        fn sigprocmask(how: i32, set: *const SigSet, old: *mut SigSet) -> i32;
        fn sigtimedwait(set: *const SigSet, info: *mut u8, timeout: *const Timespec) -> i32;
    }

    /// The termination signals, blocked for this (single-threaded) process so they wait to be taken.
    pub struct Blocked(SigSet);

    impl Blocked {
        #[allow(unsafe_code)]
        pub fn termination() -> std::io::Result<Blocked> {
            let mut set = SigSet([0; 16]);
            // SAFETY: `set` is a live, properly sized sigset_t; the calls only write into it and the mask.
            let ok = unsafe {
                sigemptyset(&mut set) == 0
                    && [SIGHUP, SIGINT, SIGTERM].iter().all(|s| sigaddset(&mut set, *s) == 0)
                    && sigprocmask(SIG_BLOCK, &set, std::ptr::null_mut()) == 0
            };
            if ok {
                Ok(Blocked(set))
            } else {
                Err(std::io::Error::last_os_error())
            }
        }

        /// Waits up to `timeout`; returns the signal that arrived, if one did.
        #[allow(unsafe_code)]
        pub fn wait(&self, timeout: Duration) -> Option<i32> {
            let deadline = std::time::Instant::now() + timeout;
            loop {
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                let ts = Timespec { tv_sec: left.as_secs() as i64, tv_nsec: left.subsec_nanos() as i64 };
                // SAFETY: the set and timespec outlive the call; a null info pointer is allowed.
                let got = unsafe { sigtimedwait(&self.0, std::ptr::null_mut(), &ts) };
                if got > 0 {
                    return Some(got);
                }
                // EINTR (another signal's handler ran) with time left: wait on; EAGAIN: the time is up.
                let errno = std::io::Error::last_os_error().raw_os_error();
                if errno == Some(EINTR) && !left.is_zero() {
                    continue;
                }
                debug_assert!(matches!(errno, Some(EAGAIN) | Some(EINTR)), "sigtimedwait: {errno:?}");
                return None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_env_gives_the_settings() {
        let env = "KILN_NODE='n042'\nKILN_MAC='52:54:00:AA:BB:42'\nKILN_SERVER='10.4.0.1'\n\
                   KILN_SERVER_URL='http://10.4.0.1:8080'\nKILN_HEARTBEAT='2'\nKILN_IMAGE_DIGEST='sha256:ab'\n";
        let c = Config::from_env(&parse_env(env), None).unwrap();
        assert_eq!(c.server, "10.4.0.1:8080".parse().unwrap());
        assert_eq!(
            (c.host.as_str(), c.mac.as_str(), c.heartbeat, c.image.as_str()),
            ("10.4.0.1:8080", "52:54:00:aa:bb:42", 2, "sha256:ab")
        );
        let c = Config::from_env(&parse_env(env), Some("http://127.0.0.1/")).unwrap();
        assert_eq!(c.server, "127.0.0.1:80".parse().unwrap());
        assert!(Config::from_env(&parse_env("KILN_MAC='52:54:00:aa:bb:42'\n"), None)
            .unwrap_err()
            .contains("KILN_SERVER_URL"));
        let named = Config::from_env(&parse_env(env), Some("http://kiln.example")).unwrap_err();
        assert!(named.contains("by address"), "{named}");
        let bad = "KILN_MAC='x'\nKILN_SERVER_URL='http://10.0.0.1'\n";
        assert!(Config::from_env(&parse_env(bad), None).unwrap_err().contains("not a MAC"));
        let zero = "KILN_MAC='52:54:00:aa:bb:42'\nKILN_SERVER_URL='http://10.0.0.1'\nKILN_HEARTBEAT='0'\n";
        assert!(Config::from_env(&parse_env(zero), None).unwrap_err().contains("KILN_HEARTBEAT"));
    }

    #[test]
    fn memory_comes_from_meminfo() {
        let text = "MemTotal:        1000 kB\nMemFree:          100 kB\nMemAvailable:     600 kB\n";
        assert_eq!(meminfo(text), (1000 * 1024, 600 * 1024));
        assert_eq!(meminfo("MemTotal: 8 kB\nMemFree: 2 kB\n"), (8192, 2048));
        assert_eq!(meminfo(""), (0, 0));
    }

    #[test]
    fn the_body_is_json_with_strings_escaped() {
        let h = Health {
            uptime: 12.345,
            load: [0.5, f64::NAN, 1.0],
            mem_total: 10,
            mem_available: 4,
            kernel: "6.1\"x\n".into(),
            boot_id: "b".into(),
        };
        assert_eq!(
            body("up", &h, "sha256:ab"),
            format!(
                "{{\"event\":\"up\",\"uptime\":12.35,\"load\":[0.50,0.00,1.00],\"mem_total\":10,\"mem_available\":4,\"kernel\":\"6.1\\\"x\\u000a\",\"image\":\"sha256:ab\",\"boot_id\":\"b\",\"agent\":\"{}\"}}",
                env!("CARGO_PKG_VERSION")
            )
        );
    }

    #[test]
    fn answers_give_the_interval_or_say_why_not() {
        let ok = b"HTTP/1.1 200 OK\r\nContent-Length: 16\r\n\r\n{\"heartbeat\":7}\n";
        assert_eq!(parse_answer(ok, 30).unwrap(), Answer { heartbeat: 7 });
        assert_eq!(parse_answer(b"HTTP/1.1 204 No Content\r\n\r\n", 30).unwrap(), Answer { heartbeat: 30 });
        let refused = parse_answer(b"HTTP/1.1 403 Forbidden\r\n\r\nnot your address\n", 30).unwrap_err();
        assert!(refused.refused && refused.message.contains("403") && refused.message.contains("not your address"));
        assert!(!parse_answer(b"garbage", 30).unwrap_err().refused);
    }

    #[test]
    fn a_timeout_passes_without_a_signal() {
        let blocked = signals::Blocked::termination().unwrap();
        let start = std::time::Instant::now();
        assert_eq!(blocked.wait(Duration::from_millis(50)), None);
        assert!(start.elapsed() >= Duration::from_millis(45));
    }
}
