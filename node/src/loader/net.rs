//! The node's network before its image is there: the interface with the node's MAC, an 802.1Q VLAN on it when
//! the node has one, an address (static from the command line, else DHCP, [`super::dhcp`]) and a default
//! route, configured over rtnetlink (RFC 3549; the messages of `linux/rtnetlink.h`).

use std::fs;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use nix::sys::socket::{self, AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType};

use super::{Context, Result};

const RTM_NEWLINK: u16 = 16;
const RTM_NEWADDR: u16 = 20;
const RTM_NEWROUTE: u16 = 24;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;
const IFF_UP: u32 = 0x1;
const IFLA_IFNAME: u16 = 3;
const IFLA_LINK: u16 = 5;
const IFLA_LINKINFO: u16 = 18;
const IFLA_INFO_KIND: u16 = 1;
const IFLA_INFO_DATA: u16 = 2;
const IFLA_VLAN_ID: u16 = 1;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const IFA_BROADCAST: u16 = 4;
const RTA_OIF: u16 = 4;
const RTA_GATEWAY: u16 = 5;
const AF_INET: u8 = 2;

/// The interface whose MAC is `mac` (lowercase), if the kernel has it.
pub fn interface_with_mac(mac: &str) -> Option<String> {
    for e in fs::read_dir("/sys/class/net").ok()?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        // A VLAN interface shares its parent's MAC: only hardware (a `device` link) counts.
        if !e.path().join("device").exists() {
            continue;
        }
        if fs::read_to_string(e.path().join("address")).map(|a| a.trim() == mac).unwrap_or(false) {
            return Some(name);
        }
    }
    None
}

/// The interface's index.
pub fn ifindex(name: &str) -> Result<u32> {
    let p = format!("/sys/class/net/{name}/ifindex");
    fs::read_to_string(&p).ctx(|| format!("reading {p}"))?.trim().parse().map_err(|e| format!("{p}: {e}"))
}

/// Waits (bounded) for the link to have a carrier; says so when it does not, and carries on (DHCP or the
/// download will say more).
pub fn wait_carrier(name: &str, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    let p = format!("/sys/class/net/{name}/carrier");
    loop {
        if fs::read_to_string(&p).map(|c| c.trim() == "1").unwrap_or(false) {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// An rtnetlink socket with requests that wait for the kernel's answer.
pub struct Netlink {
    fd: OwnedFd,
    seq: u32,
}

fn attr(buf: &mut Vec<u8>, ty: u16, data: &[u8]) {
    let len = 4 + data.len();
    buf.extend_from_slice(&(len as u16).to_ne_bytes());
    buf.extend_from_slice(&ty.to_ne_bytes());
    buf.extend_from_slice(data);
    while !buf.len().is_multiple_of(4) {
        buf.push(0);
    }
}

impl Netlink {
    pub fn open() -> Result<Netlink> {
        let fd =
            socket::socket(AddressFamily::Netlink, SockType::Raw, SockFlag::SOCK_CLOEXEC, SockProtocol::NetlinkRoute)
                .ctx(|| "opening a netlink socket".into())?;
        socket::bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 0)).ctx(|| "binding the netlink socket".into())?;
        let timeout = nix::sys::time::TimeVal::new(5, 0);
        socket::setsockopt(&fd, socket::sockopt::ReceiveTimeout, &timeout)
            .ctx(|| "setting a netlink timeout".into())?;
        Ok(Netlink { fd, seq: 0 })
    }

    /// Sends one request and waits for its acknowledgement.
    fn request(&mut self, ty: u16, flags: u16, body: &[u8], what: &str) -> Result<()> {
        self.seq += 1;
        let mut msg = Vec::with_capacity(16 + body.len());
        msg.extend_from_slice(&((16 + body.len()) as u32).to_ne_bytes());
        msg.extend_from_slice(&ty.to_ne_bytes());
        msg.extend_from_slice(&(flags | NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
        msg.extend_from_slice(&self.seq.to_ne_bytes());
        msg.extend_from_slice(&0u32.to_ne_bytes());
        msg.extend_from_slice(body);
        socket::sendto(self.fd.as_raw_fd(), &msg, &NetlinkAddr::new(0, 0), MsgFlags::empty())
            .ctx(|| format!("{what}: sending the netlink request"))?;
        let mut buf = vec![0u8; 8192];
        for _ in 0..16 {
            let n = socket::recv(self.fd.as_raw_fd(), &mut buf, MsgFlags::empty())
                .ctx(|| format!("{what}: waiting for the kernel's answer"))?;
            let mut off = 0;
            while off + 16 <= n {
                let len = u32::from_ne_bytes(buf[off..off + 4].try_into().expect("4 bytes")) as usize;
                let mtype = u16::from_ne_bytes([buf[off + 4], buf[off + 5]]);
                let seq = u32::from_ne_bytes(buf[off + 8..off + 12].try_into().expect("4 bytes"));
                if len < 16 {
                    break;
                }
                if mtype == NLMSG_ERROR && seq == self.seq && off + 20 <= n {
                    let err = i32::from_ne_bytes(buf[off + 16..off + 20].try_into().expect("4 bytes"));
                    return if err == 0 {
                        Ok(())
                    } else {
                        Err(format!("{what}: {}", nix::errno::Errno::from_raw(-err)))
                    };
                }
                off += len.next_multiple_of(4);
            }
        }
        Err(format!("{what}: the kernel did not answer"))
    }

    fn ifinfo(index: u32, flags: u32, change: u32) -> Vec<u8> {
        let mut b = vec![0u8, 0];
        b.extend_from_slice(&0u16.to_ne_bytes());
        b.extend_from_slice(&(index as i32).to_ne_bytes());
        b.extend_from_slice(&flags.to_ne_bytes());
        b.extend_from_slice(&change.to_ne_bytes());
        b
    }

    pub fn link_up(&mut self, name: &str) -> Result<()> {
        let body = Self::ifinfo(ifindex(name)?, IFF_UP, IFF_UP);
        self.request(RTM_NEWLINK, 0, &body, &format!("bringing {name} up"))
    }

    /// Creates `PARENT.VLAN` on `parent`; returns its name.
    pub fn add_vlan(&mut self, parent: &str, vlan: u16) -> Result<String> {
        let name = format!("{parent}.{vlan}");
        let mut body = Self::ifinfo(0, 0, 0);
        attr(&mut body, IFLA_LINK, &ifindex(parent)?.to_ne_bytes());
        let mut ifname = name.clone().into_bytes();
        ifname.push(0);
        attr(&mut body, IFLA_IFNAME, &ifname);
        let mut data = Vec::new();
        attr(&mut data, IFLA_VLAN_ID, &vlan.to_ne_bytes());
        let mut info = Vec::new();
        attr(&mut info, IFLA_INFO_KIND, b"vlan\0");
        attr(&mut info, IFLA_INFO_DATA, &data);
        attr(&mut body, IFLA_LINKINFO, &info);
        self.request(RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL, &body, &format!("creating VLAN {vlan} on {parent}"))?;
        Ok(name)
    }

    pub fn add_address(&mut self, name: &str, ip: Ipv4Addr, prefix: u8) -> Result<()> {
        let mut body = vec![AF_INET, prefix, 0, 0];
        body.extend_from_slice(&ifindex(name)?.to_ne_bytes());
        attr(&mut body, IFA_LOCAL, &ip.octets());
        attr(&mut body, IFA_ADDRESS, &ip.octets());
        let mask = if prefix == 0 { 0 } else { u32::MAX << (32 - prefix as u32) };
        let bcast = Ipv4Addr::from(u32::from(ip) | !mask);
        attr(&mut body, IFA_BROADCAST, &bcast.octets());
        self.request(RTM_NEWADDR, NLM_F_CREATE | NLM_F_EXCL, &body, &format!("adding {ip}/{prefix} to {name}"))
    }

    pub fn add_default_route(&mut self, name: &str, gateway: Ipv4Addr) -> Result<()> {
        // rtmsg: family, dst_len, src_len, tos, table (main), protocol (boot), scope (universe), type (unicast).
        let mut body = vec![AF_INET, 0, 0, 0, 254, 3, 0, 1];
        body.extend_from_slice(&0u32.to_ne_bytes());
        attr(&mut body, RTA_GATEWAY, &gateway.octets());
        attr(&mut body, RTA_OIF, &ifindex(name)?.to_ne_bytes());
        self.request(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_EXCL, &body, &format!("adding a default route via {gateway}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_are_padded_to_four_bytes() {
        let mut b = Vec::new();
        attr(&mut b, IFLA_INFO_KIND, b"vlan\0");
        assert_eq!(b.len(), 12);
        assert_eq!(u16::from_ne_bytes([b[0], b[1]]), 9);
        assert_eq!(&b[4..9], b"vlan\0");
    }
}
