//! A fast TFTP read client for `scripts/bench/serve.sh` (RFC 1350, 2347-2349, 7440): one file, the options asked
//! for, and one JSON line like scripts/bench/tftp-client.py's (bytes, sha256, secs, duplicate and out-of-order
//! DATA packets). The bytes are kept in memory and hashed once the last block is in, so `secs` (request sent to
//! last block received) times the transfer, not the client's hashing. Python cannot take DATA packets as fast as a server sends a
//! window of them, so the benchmark measures servers with this client, the same one for every server.
//!
//!   cargo run --release --example tftp_get -- 127.0.0.1 6969 big.bin --blksize 1468 --windowsize 16

use std::net::{SocketAddr, ToSocketAddrs, UdpSocket};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

const RRQ: u16 = 1;
const DATA: u16 = 3;
const ACK: u16 = 4;
const ERROR: u16 = 5;
const OACK: u16 = 6;

struct Args {
    server: SocketAddr,
    name: String,
    blksize: Option<u16>,
    windowsize: Option<u16>,
    timeout: Duration,
    retries: u32,
}

fn parse_args() -> Result<Args, String> {
    let usage = "usage: tftp_get HOST PORT FILE [--blksize N] [--windowsize N] [--client-timeout SECS] [--retries N]";
    let mut rest: Vec<String> = std::env::args().skip(1).collect();
    let mut flag = |name: &str| -> Result<Option<String>, String> {
        match rest.iter().position(|a| a == name) {
            None => Ok(None),
            Some(i) if i + 1 < rest.len() => {
                let v = rest.remove(i + 1);
                rest.remove(i);
                Ok(Some(v))
            }
            Some(_) => Err(format!("{name} needs a value\n{usage}")),
        }
    };
    let number = |v: Option<String>, name: &str| -> Result<Option<u64>, String> {
        v.map(|v| v.parse::<u64>().map_err(|_| format!("{name} {v:?} is not a number"))).transpose()
    };
    let blksize = number(flag("--blksize")?, "--blksize")?;
    let windowsize = number(flag("--windowsize")?, "--windowsize")?;
    let timeout = number(flag("--client-timeout")?, "--client-timeout")?.unwrap_or(2);
    let retries = number(flag("--retries")?, "--retries")?.unwrap_or(5);
    let [host, port, name]: [String; 3] = rest.try_into().map_err(|_| usage.to_string())?;
    let server = (host.as_str(), port.parse::<u16>().map_err(|_| format!("port {port:?} is not a number"))?)
        .to_socket_addrs()
        .map_err(|e| format!("{host}: {e}"))?
        .next()
        .ok_or_else(|| format!("{host}: no address"))?;
    let small = |v: Option<u64>, name: &str| -> Result<Option<u16>, String> {
        v.map(|v| u16::try_from(v).map_err(|_| format!("{name} {v} is too large"))).transpose()
    };
    Ok(Args {
        server,
        name,
        blksize: small(blksize, "--blksize")?,
        windowsize: small(windowsize, "--windowsize")?,
        timeout: Duration::from_secs(timeout),
        retries: retries as u32,
    })
}

#[derive(Default)]
struct Outcome {
    ok: bool,
    bytes: u64,
    duplicates: u64,
    out_of_order: u64,
    error: Option<String>,
}

fn ack(socket: &UdpSocket, to: SocketAddr, block: u16) -> std::io::Result<()> {
    let mut packet = [0u8; 4];
    packet[..2].copy_from_slice(&ACK.to_be_bytes());
    packet[2..].copy_from_slice(&block.to_be_bytes());
    socket.send_to(&packet, to).map(drop)
}

fn get(args: &Args, received: &mut Vec<u8>) -> std::io::Result<Outcome> {
    let any: SocketAddr = if args.server.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse().expect("an address");
    let socket = UdpSocket::bind(any)?;
    socket.set_read_timeout(Some(args.timeout))?;
    nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::RcvBuf, &(4 << 20))?;
    let mut request = RRQ.to_be_bytes().to_vec();
    let mut push = |s: &str| {
        request.extend_from_slice(s.as_bytes());
        request.push(0);
    };
    push(&args.name);
    push("octet");
    if let Some(b) = args.blksize {
        push("blksize");
        push(&b.to_string());
    }
    if let Some(w) = args.windowsize {
        push("windowsize");
        push(&w.to_string());
    }
    socket.send_to(&request, args.server)?;

    let mut out = Outcome::default();
    let (mut blksize, mut window) = (512usize, 1usize);
    let mut server: Option<SocketAddr> = None;
    let mut expected: u16 = 1; // next block wanted (wire numbering, wraps)
    let mut in_window = 0usize;
    let mut last_ack: Option<u16> = None;
    let mut tries = 0;
    let mut buf = vec![0u8; 65536];
    loop {
        let (len, from) = match socket.recv_from(&mut buf) {
            Ok(r) => r,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                tries += 1;
                if tries > args.retries {
                    out.error = Some(format!("timed out waiting for block {expected}"));
                    return Ok(out);
                }
                match (server, last_ack) {
                    (Some(s), Some(b)) => ack(&socket, s, b)?,
                    _ => drop(socket.send_to(&request, args.server)?),
                }
                continue;
            }
            Err(e) => return Err(e),
        };
        let server = *server.get_or_insert(from);
        if from != server || len < 4 {
            continue;
        }
        tries = 0;
        let opcode = u16::from_be_bytes([buf[0], buf[1]]);
        let number = u16::from_be_bytes([buf[2], buf[3]]);
        match opcode {
            ERROR => {
                let message = buf[4..len].split(|&b| b == 0).next().unwrap_or_default();
                out.error = Some(format!("ERROR {number}: {}", String::from_utf8_lossy(message)));
                return Ok(out);
            }
            OACK => {
                let strings: Vec<String> =
                    buf[2..len].split(|&b| b == 0).map(|s| String::from_utf8_lossy(s).to_lowercase()).collect();
                for pair in strings.chunks(2) {
                    if let [name, value] = pair {
                        match name.as_str() {
                            "blksize" => blksize = value.parse().unwrap_or(512),
                            "windowsize" => window = value.parse().unwrap_or(1),
                            _ => {}
                        }
                    }
                }
                last_ack = Some(0);
                ack(&socket, server, 0)?;
            }
            DATA if number == expected => {
                let data = &buf[4..len];
                received.extend_from_slice(data);
                out.bytes += data.len() as u64;
                expected = expected.wrapping_add(1);
                in_window += 1;
                if data.len() < blksize {
                    ack(&socket, server, number)?;
                    out.ok = true;
                    return Ok(out);
                }
                if in_window >= window {
                    last_ack = Some(number);
                    ack(&socket, server, number)?;
                    in_window = 0;
                }
            }
            DATA => {
                // A resent block or a gap: tell the server the last block held in order (RFC 7440).
                if expected.wrapping_sub(number) < 0x8000 {
                    out.duplicates += 1;
                } else {
                    out.out_of_order += 1;
                }
                let have = expected.wrapping_sub(1);
                last_ack = Some(have);
                ack(&socket, server, have)?;
                in_window = 0;
            }
            other => {
                out.error = Some(format!("unexpected opcode {other}"));
                return Ok(out);
            }
        }
    }
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("tftp_get: {e}");
            return ExitCode::from(2);
        }
    };
    let mut received = Vec::with_capacity(64 << 20);
    let start = Instant::now();
    let out = match get(&args, &mut received) {
        Ok(out) => out,
        Err(e) => Outcome { error: Some(e.to_string()), ..Outcome::default() },
    };
    let secs = start.elapsed().as_secs_f64();
    let digest = Sha256::digest(&received);
    let json = serde_json::json!({
        "ok": out.ok,
        "bytes": out.bytes,
        "sha256": hex::encode(digest),
        "secs": secs,
        "duplicates": out.duplicates,
        "out_of_order": out.out_of_order,
        "error": out.error,
    });
    println!("{json}");
    if out.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
