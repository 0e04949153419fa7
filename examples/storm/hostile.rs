//! Hostile traffic sent alongside the booting clients, from one address: TFTP read requests asking `timeout 255`
//! that are never acknowledged (each from its own source port, the sockets kept open so the server sees no ICMP
//! error), slow HTTP clients that trickle header bytes and never finish a request (reconnecting when dropped), and
//! garbage datagrams to the DHCP and TFTP ports. Everything stops when the generator says so.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, UdpSocket};
use tokio::sync::watch;

/// How often a slow client sends its next header byte: under common header timeouts' per-read reset, far from
/// finishing a request.
const TRICKLE: Duration = Duration::from_secs(5);
/// Reconnections per slow client at most (one a second at most): bounded even against a server that drops at once.
const MAX_RECONNECTS: u32 = 10_000;

pub struct Config {
    pub from: Ipv4Addr,
    pub server: Ipv4Addr,
    pub tftp_port: u16,
    pub dhcp_port: u16,
    pub http_port: u16,
    pub boot_file: String,
    pub tftp_requests: usize,
    pub slow_http: usize,
    /// Garbage datagrams per second, to each of the DHCP and TFTP ports.
    pub garbage_pps: u32,
}

#[derive(Default)]
pub struct Stats {
    pub tftp_requests_sent: AtomicU64,
    pub tftp_errors: AtomicU64,
    pub slow_connects: AtomicU64,
    pub slow_open: AtomicI64,
    pub slow_peak_open: AtomicI64,
    /// Slow connections the server closed (or that failed) before the run ended.
    pub slow_dropped: AtomicU64,
    pub slow_connect_failures: AtomicU64,
    pub garbage_sent: AtomicU64,
}

/// A small deterministic generator for garbage (xorshift64*): the same bytes every run.
struct Noise(u64);

impl Noise {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// Starts every kind of hostile traffic asked for; returns when `stop` turns true.
pub async fn run(cfg: Arc<Config>, stats: Arc<Stats>, stop: watch::Receiver<bool>) {
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(tftp_flood(cfg.clone(), stats.clone(), stop.clone()));
    for i in 0..cfg.slow_http {
        tasks.spawn(slow_client(cfg.clone(), stats.clone(), stop.clone(), i));
    }
    if cfg.garbage_pps > 0 {
        tasks.spawn(garbage(cfg.clone(), stats.clone(), stop.clone()));
    }
    while tasks.join_next().await.is_some() {}
}

async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

async fn tftp_flood(cfg: Arc<Config>, stats: Arc<Stats>, mut stop: watch::Receiver<bool>) {
    let mut request = 1u16.to_be_bytes().to_vec();
    for s in [cfg.boot_file.as_str(), "octet", "timeout", "255", "blksize", "1468", "tsize", "0"] {
        request.extend_from_slice(s.as_bytes());
        request.push(0);
    }
    let to = SocketAddrV4::new(cfg.server, cfg.tftp_port);
    let mut held = Vec::with_capacity(cfg.tftp_requests);
    for _ in 0..cfg.tftp_requests {
        let sent = async {
            let s = UdpSocket::bind(SocketAddr::from((cfg.from, 0))).await?;
            s.send_to(&request, to).await?;
            std::io::Result::Ok(s)
        };
        match sent.await {
            Ok(s) => {
                held.push(s);
                stats.tftp_requests_sent.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => {
                stats.tftp_errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    // Held open and never read: the server's DATA packets pile up unacknowledged.
    stopped(&mut stop).await;
    drop(held);
}

async fn slow_client(cfg: Arc<Config>, stats: Arc<Stats>, mut stop: watch::Receiver<bool>, i: usize) {
    let to = SocketAddr::from((cfg.server, cfg.http_port));
    let head =
        format!("GET /ipxe/02:00:00:00:{:02x}:{:02x} HTTP/1.1\r\nHost: {}\r\n", (i >> 8) & 0xff, i & 0xff, cfg.server);
    let trickle = b"X-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n";
    for _ in 0..MAX_RECONNECTS {
        if *stop.borrow() {
            return;
        }
        let connected = async {
            let socket = TcpSocket::new_v4()?;
            socket.bind(SocketAddr::from((cfg.from, 0)))?;
            tokio::time::timeout(Duration::from_secs(10), socket.connect(to))
                .await
                .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))?
        };
        let mut stream = tokio::select! {
            c = connected => match c {
                Ok(s) => s,
                Err(_) => {
                    stats.slow_connect_failures.fetch_add(1, Ordering::Relaxed);
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                        _ = stopped(&mut stop) => return,
                    }
                }
            },
            _ = stopped(&mut stop) => return,
        };
        stats.slow_connects.fetch_add(1, Ordering::Relaxed);
        let open = stats.slow_open.fetch_add(1, Ordering::Relaxed) + 1;
        stats.slow_peak_open.fetch_max(open, Ordering::Relaxed);
        let mut sent = 0usize;
        let mut sink = [0u8; 512];
        let dropped = loop {
            // The request line goes out at once (the server accepts the connection as a request); then a byte a tick.
            let piece: &[u8] = if sent == 0 { head.as_bytes() } else { &trickle[(sent - 1) % trickle.len()..][..1] };
            if stream.write_all(piece).await.is_err() {
                break true;
            }
            sent += 1;
            tokio::select! {
                r = stream.read(&mut sink) => match r {
                    // Any answer (a 408, a 400) or a close ends this connection; the client comes back.
                    Ok(_) | Err(_) => break true,
                },
                _ = tokio::time::sleep(TRICKLE) => {}
                _ = stopped(&mut stop) => break false,
            }
        };
        stats.slow_open.fetch_sub(1, Ordering::Relaxed);
        if !dropped {
            return;
        }
        stats.slow_dropped.fetch_add(1, Ordering::Relaxed);
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = stopped(&mut stop) => return,
        }
    }
}

async fn garbage(cfg: Arc<Config>, stats: Arc<Stats>, mut stop: watch::Receiver<bool>) {
    let Ok(socket) = UdpSocket::bind(SocketAddr::from((cfg.from, 0))).await else { return };
    let dhcp = SocketAddr::from((cfg.server, cfg.dhcp_port));
    let tftp = SocketAddr::from((cfg.server, cfg.tftp_port));
    let mut noise = Noise(0x9e37_79b9_7f4a_7c15);
    let ticks_per_sec = 50u32;
    let per_tick = cfg.garbage_pps.div_ceil(ticks_per_sec);
    let mut tick = tokio::time::interval(Duration::from_secs(1) / ticks_per_sec);
    let mut n = 0u64;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stopped(&mut stop) => return,
        }
        for _ in 0..per_tick {
            n += 1;
            let (d, t) = (dhcp_garbage(&mut noise, n), tftp_garbage(&mut noise, n));
            for (bytes, to) in [(d, dhcp), (t, tftp)] {
                if socket.send_to(&bytes, to).await.is_ok() {
                    stats.garbage_sent.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
}

/// Random bytes, or a BOOTREQUEST header with the magic cookie followed by random (malformed) options.
fn dhcp_garbage(noise: &mut Noise, n: u64) -> Vec<u8> {
    let len = 1 + (noise.next() % 600) as usize;
    if n.is_multiple_of(2) {
        return noise.bytes(len);
    }
    let mut p = vec![0u8; 236];
    p[0] = 1;
    p[1] = 1;
    p[2] = 6;
    p[4..8].copy_from_slice(&noise.bytes(4));
    p[28..34].copy_from_slice(&noise.bytes(6));
    p.extend_from_slice(&[99, 130, 83, 99]);
    p.extend(noise.bytes(len.min(300)));
    p
}

/// Random bytes, or a TFTP packet of a random opcode whose fields are cut short, unterminated or nonsense.
fn tftp_garbage(noise: &mut Noise, n: u64) -> Vec<u8> {
    match n % 4 {
        0 => {
            let len = 1 + (noise.next() % 600) as usize;
            noise.bytes(len)
        }
        1 => {
            let mut p = vec![0, 1];
            p.extend_from_slice(b"../../../../etc/shadow\0octet\0blksize\0-1\0tsize");
            p
        }
        2 => {
            let mut p = vec![0, (noise.next() % 10) as u8];
            let len = (noise.next() % 40) as usize;
            p.extend(noise.bytes(len));
            p
        }
        _ => {
            let mut p = vec![0, 1];
            p.extend(std::iter::repeat_n(b'A', 700));
            p
        }
    }
}
