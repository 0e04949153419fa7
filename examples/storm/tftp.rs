//! A TFTP read as PXE firmware does it (RFC 1350, options of RFC 2347/2348/2349): one read request asking `blksize`
//! and `tsize`, lock-step ACKs (stock ROMs ask no `windowsize`), retransmission on silence, and the size received
//! checked against `tsize`. Left out: windowsize, netascii, the separate `tsize` probe some ROMs make first.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::time::Instant;

const RRQ: u16 = 1;
const DATA: u16 = 3;
const ACK: u16 = 4;
const ERROR: u16 = 5;
const OACK: u16 = 6;
/// First wait for an answer; doubled on each retransmission up to `MAX_WAIT`.
const FIRST_WAIT: Duration = Duration::from_secs(1);
const MAX_WAIT: Duration = Duration::from_secs(4);
/// Sends of one packet (request or ACK) without an answer before the transfer is given up.
const TRIES: u32 = 6;

/// A finished transfer.
#[derive(Debug)]
pub struct Fetched {
    pub bytes: u64,
    /// The size the server announced, when it answered the `tsize` option; `bytes` equals it.
    pub tsize: Option<u64>,
    pub retransmits: u32,
}

/// A read request for `file` in octet mode with `blksize` and `tsize`.
pub fn read_request(file: &str, blksize: u16) -> Vec<u8> {
    let mut p = RRQ.to_be_bytes().to_vec();
    for s in [file, "octet", "blksize", &blksize.to_string(), "tsize", "0"] {
        p.extend_from_slice(s.as_bytes());
        p.push(0);
    }
    p
}

fn ack(block: u16) -> [u8; 4] {
    let mut p = [0u8; 4];
    p[..2].copy_from_slice(&ACK.to_be_bytes());
    p[2..].copy_from_slice(&block.to_be_bytes());
    p
}

/// `(name, value)` pairs of an OACK body.
fn options(body: &[u8]) -> Vec<(String, String)> {
    let fields: Vec<String> =
        body.split(|b| *b == 0).map(|f| String::from_utf8_lossy(f).to_ascii_lowercase()).collect();
    fields.chunks(2).filter(|c| c.len() == 2 && !c[0].is_empty()).map(|c| (c[0].clone(), c[1].clone())).collect()
}

/// Reads `file` from `server` with a socket bound to `local` (the client's leased address).
pub async fn fetch(local: Ipv4Addr, server: SocketAddrV4, file: &str, blksize: u16) -> Result<Fetched, String> {
    let socket = UdpSocket::bind(SocketAddr::from((local, 0))).await.map_err(|e| format!("binding {local}: {e}"))?;
    let mut last: Vec<u8> = read_request(file, blksize);
    let mut to = SocketAddr::V4(server);
    let mut peer: Option<SocketAddr> = None;
    // Without an OACK the server ignored the options: RFC 1350's 512-byte blocks, no size to check.
    let mut block_size = 512usize;
    let mut tsize = None;
    let mut expect: u16 = 1;
    let mut bytes = 0u64;
    let (mut tries, mut wait, mut retransmits) = (1u32, FIRST_WAIT, 0u32);
    socket.send_to(&last, to).await.map_err(|e| format!("sending the read request: {e}"))?;
    let mut buf = vec![0u8; usize::from(blksize).max(512) + 4];
    loop {
        let got = tokio::time::timeout_at(Instant::now() + wait, socket.recv_from(&mut buf)).await;
        let (n, from) = match got {
            Err(_) => {
                if tries >= TRIES {
                    let what = if peer.is_none() { "the read request".to_string() } else { format!("block {expect}") };
                    return Err(format!("no answer to {what} after {tries} tries ({bytes} bytes in)"));
                }
                socket.send_to(&last, to).await.map_err(|e| format!("retransmitting: {e}"))?;
                tries += 1;
                retransmits += 1;
                wait = (wait * 2).min(MAX_WAIT);
                continue;
            }
            Ok(Err(e)) => return Err(format!("receiving: {e}")),
            Ok(Ok(got)) => got,
        };
        if from.ip() != *server.ip() || peer.is_some_and(|p| p != from) || n < 4 {
            continue;
        }
        let opcode = u16::from_be_bytes([buf[0], buf[1]]);
        let number = u16::from_be_bytes([buf[2], buf[3]]);
        match opcode {
            OACK if peer.is_none() => {
                for (name, value) in options(&buf[2..n]) {
                    match name.as_str() {
                        "blksize" => block_size = value.parse().map_err(|_| format!("OACK blksize {value:?}"))?,
                        "tsize" => tsize = Some(value.parse().map_err(|_| format!("OACK tsize {value:?}"))?),
                        _ => {}
                    }
                }
                if block_size > usize::from(blksize) || block_size < 8 {
                    return Err(format!("the server chose blksize {block_size} after {blksize} was asked"));
                }
                peer = Some(from);
                to = from;
                last = ack(0).to_vec();
            }
            DATA => {
                if peer.is_none() {
                    peer = Some(from);
                    to = from;
                }
                let len = n - 4;
                if number == expect {
                    if len > block_size {
                        return Err(format!("block {number} holds {len} bytes, more than blksize {block_size}"));
                    }
                    bytes += len as u64;
                    last = ack(number).to_vec();
                    socket.send_to(&last, to).await.map_err(|e| format!("sending ACK {number}: {e}"))?;
                    if len < block_size {
                        if let Some(t) = tsize {
                            if t != bytes {
                                return Err(format!("received {bytes} bytes, tsize said {t}"));
                            }
                        }
                        return Ok(Fetched { bytes, tsize, retransmits });
                    }
                    expect = expect.wrapping_add(1);
                    (tries, wait) = (1, FIRST_WAIT);
                    continue;
                }
                if number == expect.wrapping_sub(1) {
                    // Our ACK was lost: say it again (the server waits for it in lock-step).
                    socket.send_to(&last, to).await.map_err(|e| format!("resending ACK {number}: {e}"))?;
                }
                continue;
            }
            ERROR => {
                let msg = String::from_utf8_lossy(&buf[4..n]).trim_end_matches('\0').to_string();
                return Err(format!("TFTP error {number}: {msg}"));
            }
            _ => continue,
        }
        socket.send_to(&last, to).await.map_err(|e| format!("sending: {e}"))?;
        (tries, wait) = (1, FIRST_WAIT);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_and_options() {
        let r = read_request("undionly.kpxe", 1468);
        assert_eq!(&r[..2], &[0, 1]);
        assert!(r.ends_with(b"blksize\x001468\x00tsize\x000\x00"));
        assert_eq!(
            options(b"blksize\x001468\x00TSIZE\x0074213\x00"),
            vec![("blksize".into(), "1468".into()), ("tsize".into(), "74213".into())]
        );
    }
}
