//! A DHCP client (RFC 2131) for nodes without a static address: DISCOVER, OFFER, REQUEST, ACK on one
//! interface, from a UDP socket bound to it with the broadcast flag set, so servers answer by broadcast before
//! the interface has an address. Bounded: a few rounds with growing waits, then an error naming what was heard.

use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use nix::sys::socket::{self, sockopt, AddressFamily, SockFlag, SockType, SockaddrIn};

use super::{Context, Result};

const MAGIC: [u8; 4] = [99, 130, 83, 99];
const DISCOVER: u8 = 1;
const OFFER: u8 = 2;
const REQUEST: u8 = 3;
const ACK: u8 = 5;
const NAK: u8 = 6;

/// What the server gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub ip: Ipv4Addr,
    pub prefix: u8,
    pub router: Option<Ipv4Addr>,
    pub server: Ipv4Addr,
}

fn parse_mac(mac: &str) -> Result<[u8; 6]> {
    let mut out = [0u8; 6];
    let parts: Vec<&str> = mac.split(':').collect();
    if parts.len() != 6 {
        return Err(format!("{mac} is not a MAC address"));
    }
    for (o, p) in out.iter_mut().zip(parts) {
        *o = u8::from_str_radix(p, 16).map_err(|_| format!("{mac} is not a MAC address"))?;
    }
    Ok(out)
}

/// A BOOTREQUEST of `kind`, broadcast flag set.
pub fn request(kind: u8, xid: u32, mac: &[u8; 6], requested: Option<(Ipv4Addr, Ipv4Addr)>) -> Vec<u8> {
    let mut p = vec![0u8; 236];
    p[0] = 1; // BOOTREQUEST
    p[1] = 1; // Ethernet
    p[2] = 6;
    p[4..8].copy_from_slice(&xid.to_be_bytes());
    p[10..12].copy_from_slice(&0x8000u16.to_be_bytes());
    p[28..34].copy_from_slice(mac);
    p.extend_from_slice(&MAGIC);
    p.extend_from_slice(&[53, 1, kind]);
    let mut client_id = vec![61, 7, 1];
    client_id.extend_from_slice(mac);
    p.extend_from_slice(&client_id);
    if let Some((ip, server)) = requested {
        p.extend_from_slice(&[50, 4]);
        p.extend_from_slice(&ip.octets());
        p.extend_from_slice(&[54, 4]);
        p.extend_from_slice(&server.octets());
    }
    p.extend_from_slice(&[55, 3, 1, 3, 54]); // subnet mask, router, server id
    p.extend_from_slice(&[60, 11]);
    p.extend_from_slice(b"kiln-loader");
    p.push(255);
    p
}

/// A reply to `xid` for `mac`: (message type, offered address, options that matter).
pub fn parse_reply(p: &[u8], xid: u32, mac: &[u8; 6]) -> Option<(u8, Lease)> {
    if p.len() < 240 || p[0] != 2 || p[4..8] != xid.to_be_bytes() || &p[28..34] != mac || p[236..240] != MAGIC {
        return None;
    }
    let yiaddr = Ipv4Addr::new(p[16], p[17], p[18], p[19]);
    let (mut kind, mut mask, mut router, mut server) = (0u8, None, None, None);
    let mut i = 240;
    while i < p.len() {
        let code = p[i];
        if code == 255 {
            break;
        }
        if code == 0 {
            i += 1;
            continue;
        }
        let len = *p.get(i + 1)? as usize;
        let v = p.get(i + 2..i + 2 + len)?;
        let addr = |v: &[u8]| (v.len() >= 4).then(|| Ipv4Addr::new(v[0], v[1], v[2], v[3]));
        match code {
            53 if len == 1 => kind = v[0],
            1 => mask = addr(v),
            3 => router = addr(v),
            54 => server = addr(v),
            _ => {}
        }
        i += 2 + len;
    }
    let prefix = mask.map(|m| u32::from(m).leading_ones() as u8).unwrap_or(24);
    Some((kind, Lease { ip: yiaddr, prefix, router, server: server.unwrap_or(Ipv4Addr::UNSPECIFIED) }))
}

fn socket_on(ifname: &str) -> Result<UdpSocket> {
    let fd = socket::socket(AddressFamily::Inet, SockType::Datagram, SockFlag::SOCK_CLOEXEC, None)
        .ctx(|| "opening a DHCP socket".into())?;
    socket::setsockopt(&fd, sockopt::ReuseAddr, &true).ctx(|| "SO_REUSEADDR".into())?;
    socket::setsockopt(&fd, sockopt::Broadcast, &true).ctx(|| "SO_BROADCAST".into())?;
    socket::setsockopt(&fd, sockopt::BindToDevice, &std::ffi::OsString::from(ifname))
        .ctx(|| format!("binding the DHCP socket to {ifname}"))?;
    socket::bind(fd.as_raw_fd(), &SockaddrIn::new(0, 0, 0, 0, 68)).ctx(|| "binding port 68".into())?;
    Ok(UdpSocket::from(fd))
}

/// Asks for an address on `ifname` for `mac`; at most `rounds` DISCOVERs, waiting 2, 4, 4, … seconds each.
pub fn lease(ifname: &str, mac: &str, rounds: u32) -> Result<Lease> {
    let mac = parse_mac(mac)?;
    let sock = socket_on(ifname)?;
    let to = SocketAddrV4::new(Ipv4Addr::BROADCAST, 67);
    let xid = random_u32().unwrap_or_else(|| u32::from_be_bytes([mac[2], mac[3], mac[4], mac[5]]));
    let mut heard = Vec::new();
    let mut buf = vec![0u8; 1500];
    for round in 0..rounds {
        let wait = Duration::from_secs(if round == 0 { 2 } else { 4 });
        sock.send_to(&request(DISCOVER, xid, &mac, None), to).ctx(|| format!("sending DHCPDISCOVER on {ifname}"))?;
        let Some(offer) = receive(&sock, &mut buf, xid, &mac, &[OFFER], wait, &mut heard) else { continue };
        sock.send_to(&request(REQUEST, xid, &mac, Some((offer.ip, offer.server))), to)
            .ctx(|| format!("sending DHCPREQUEST on {ifname}"))?;
        match receive(&sock, &mut buf, xid, &mac, &[ACK, NAK], wait, &mut heard) {
            Some(ack) if ack.ip == offer.ip => return Ok(ack),
            _ => continue,
        }
    }
    let heard = if heard.is_empty() { "no answer".to_string() } else { heard.join(", ") };
    Err(format!("DHCP on {ifname}: no address after {rounds} tries ({heard})"))
}

fn random_u32() -> Option<u32> {
    use std::io::Read;
    let mut b = [0u8; 4];
    std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut b)).ok()?;
    Some(u32::from_ne_bytes(b))
}

fn receive(
    sock: &UdpSocket,
    buf: &mut [u8],
    xid: u32,
    mac: &[u8; 6],
    kinds: &[u8],
    wait: Duration,
    heard: &mut Vec<String>,
) -> Option<Lease> {
    let deadline = Instant::now() + wait;
    loop {
        let left = deadline.checked_duration_since(Instant::now())?;
        sock.set_read_timeout(Some(left.max(Duration::from_millis(1)))).ok()?;
        let Ok((n, from)) = sock.recv_from(buf) else { return None };
        let Some((kind, lease)) = parse_reply(&buf[..n], xid, mac) else { continue };
        if kind == NAK {
            heard.push(format!("a NAK from {from}"));
            return None;
        }
        if kinds.contains(&kind) {
            return Some(lease);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_replies_round_trip() {
        let mac = parse_mac("52:54:00:aa:bb:42").unwrap();
        let req = request(DISCOVER, 7, &mac, None);
        assert_eq!(&req[236..240], &MAGIC);
        assert_eq!(req[10], 0x80, "broadcast flag");
        // Turn the request into a reply the way a server would.
        let mut reply = req.clone();
        reply[0] = 2;
        reply[16..20].copy_from_slice(&[10, 4, 0, 42]);
        reply.truncate(240);
        reply.extend_from_slice(&[53, 1, OFFER, 1, 4, 255, 255, 255, 0, 3, 4, 10, 4, 0, 254, 54, 4, 10, 4, 0, 1, 255]);
        let (kind, lease) = parse_reply(&reply, 7, &mac).unwrap();
        assert_eq!(kind, OFFER);
        assert_eq!(lease.ip, Ipv4Addr::new(10, 4, 0, 42));
        assert_eq!((lease.prefix, lease.router), (24, Some(Ipv4Addr::new(10, 4, 0, 254))));
        assert_eq!(lease.server, Ipv4Addr::new(10, 4, 0, 1));
        assert!(parse_reply(&reply, 8, &mac).is_none(), "another transaction");
        assert!(parse_reply(&reply[..100], 7, &mac).is_none());
    }
}
