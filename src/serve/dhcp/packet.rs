//! DHCP packets on the wire: requests decoded and checked (every option length validated before dhcproto
//! sees it), and replies built (the header copied from the request, network and boot options, destination).

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddrV4};

use dhcproto::v4::{DhcpOption, HType, Message, MessageType, Opcode, OptionCode, UnknownOption};
use dhcproto::{Decodable, Encodable};
use tracing::warn;

use super::context::{DhcpContext, Network};
use super::decide::{BootFile, BootKind, Outgoing, UnknownClient};
use super::{DHCP_CLIENT_PORT, DHCP_SERVER_PORT};
use crate::net::Mac;

const MAGIC_COOKIE: [u8; 4] = [99, 130, 83, 99];
/// Options kiln reads from requests; every other option is dropped before decoding.
const READ_OPTIONS: [u8; 10] = [12, 50, 53, 54, 60, 61, 77, 93, 97, 175];
const OPT_RELAY_AGENT_INFO: u8 = 82;
const OPT_IPXE_ENCAP: u8 = 175;
/// Option 43 for PXE firmware: sub-option 6 (PXE_DISCOVERY_CONTROL) = 8, then the end marker.
const PXE_VENDOR_OPTIONS: [u8; 4] = [6, 1, 8, 255];

/// What a request says about the client that matters for booting it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientInfo {
    /// Option 93 (RFC 4578), else the `Arch:NNNNN` part of a PXE vendor class.
    pub arch: Option<u16>,
    /// Option 60.
    pub vendor_class: Option<String>,
    /// Option 77 is `iPXE`, or option 175 is present.
    pub ipxe: bool,
}

impl ClientInfo {
    /// PXE firmware (vendor class `PXEClient…`).
    pub fn is_pxe(&self) -> bool {
        self.vendor_class.as_deref().is_some_and(|v| v.starts_with("PXEClient"))
    }

    /// UEFI HTTP boot firmware (vendor class `HTTPClient…`).
    pub fn is_http(&self) -> bool {
        self.vendor_class.as_deref().is_some_and(|v| v.starts_with("HTTPClient"))
    }

    /// Whether the client asks to be booted at all.
    pub fn wants_boot(&self) -> bool {
        self.is_pxe() || self.is_http() || self.ipxe
    }
}

/// A request that passed validation.
pub(super) struct Request {
    pub(super) msg: Message,
    pub(super) kind: MessageType,
    pub(super) mac: Mac,
    pub(super) client: ClientInfo,
    /// Option 82 as received (code and length excluded), echoed in replies.
    pub(super) relay_info: Option<Vec<u8>>,
    /// Option 97 as received.
    pub(super) machine_id: Option<Vec<u8>>,
    pub(super) requested_ip: Option<Ipv4Addr>,
    pub(super) server_id: Option<Ipv4Addr>,
    /// Option 12: the name the client calls itself (kept in its lease record, never sent back).
    pub(super) hostname: Option<String>,
}

impl Request {
    pub(super) fn parse(bytes: &[u8]) -> Result<Request, &'static str> {
        if bytes.len() < 240 {
            return Err("shorter than a BOOTP header and the DHCP magic cookie");
        }
        if bytes[0] != 1 {
            return Err("not a BOOTREQUEST");
        }
        if bytes[236..240] != MAGIC_COOKIE {
            return Err("no DHCP magic cookie");
        }
        let options = scan_options(&bytes[240..])?;
        // dhcproto only sees the options kiln reads, with lengths checked here: its decoders for some other
        // options assert on the length (a panic on hostile input).
        for (code, len) in [(53, 1), (50, 4), (54, 4)] {
            if options.get(&code).is_some_and(|v| v.len() != len) {
                return Err("an option has the wrong length");
            }
        }
        if options.get(&93).is_some_and(|v| v.len() < 2 || v.len() % 2 != 0) {
            return Err("option 93 has the wrong length");
        }
        let mut clean = bytes[..240].to_vec();
        for (code, value) in &options {
            if READ_OPTIONS.contains(code) {
                for chunk in value.chunks(255) {
                    clean.push(*code);
                    clean.push(chunk.len() as u8);
                    clean.extend_from_slice(chunk);
                }
                if value.is_empty() {
                    clean.extend_from_slice(&[*code, 0]);
                }
            }
        }
        clean.push(255);
        let msg = Message::from_bytes(&clean).map_err(|_| "undecodable header")?;
        if msg.opcode() != Opcode::BootRequest {
            return Err("not a BOOTREQUEST");
        }
        if msg.htype() != HType::Eth || msg.hlen() != 6 {
            return Err("not an Ethernet client");
        }
        let kind = match msg.opts().msg_type() {
            Some(MessageType::Unknown(_)) | None => return Err("no DHCP message type"),
            Some(kind) => kind,
        };
        let mut mac = [0u8; 6];
        mac.copy_from_slice(&msg.chaddr()[..6]);
        let opts = msg.opts();
        let vendor_class = match opts.get(OptionCode::ClassIdentifier) {
            Some(DhcpOption::ClassIdentifier(v)) => Some(String::from_utf8_lossy(v).into_owned()),
            _ => None,
        };
        let arch = match opts.get(OptionCode::ClientSystemArchitecture) {
            Some(DhcpOption::ClientSystemArchitecture(a)) => Some(a.0),
            _ => vendor_class.as_deref().and_then(arch_from_vendor_class),
        };
        let ipxe = matches!(opts.get(OptionCode::UserClass),
            Some(DhcpOption::UserClass(u)) if u.as_slice() == b"iPXE" || u.as_slice() == b"\x04iPXE")
            || options.contains_key(&OPT_IPXE_ENCAP);
        let machine_id = match opts.get(OptionCode::ClientMachineIdentifier) {
            Some(DhcpOption::ClientMachineIdentifier(id)) => Some(id.clone()),
            _ => None,
        };
        let requested_ip = match opts.get(OptionCode::RequestedIpAddress) {
            Some(DhcpOption::RequestedIpAddress(ip)) => Some(*ip),
            _ => None,
        };
        let server_id = match opts.get(OptionCode::ServerIdentifier) {
            Some(DhcpOption::ServerIdentifier(ip)) => Some(*ip),
            _ => None,
        };
        let hostname = match opts.get(OptionCode::Hostname) {
            Some(DhcpOption::Hostname(name)) if !name.is_empty() => Some(name.clone()),
            _ => None,
        };
        Ok(Request {
            hostname,
            kind,
            mac: Mac(mac),
            client: ClientInfo { arch, vendor_class, ipxe },
            relay_info: options.get(&OPT_RELAY_AGENT_INFO).cloned(),
            machine_id,
            requested_ip,
            server_id,
            msg,
        })
    }

    pub(super) fn unknown_client(&self) -> UnknownClient {
        UnknownClient { mac: self.mac, arch: self.client.arch, vendor_class: self.client.vendor_class.clone() }
    }
}

/// Walks the options area: every option must fit; repeated codes are concatenated (RFC 3396).
fn scan_options(mut area: &[u8]) -> Result<BTreeMap<u8, Vec<u8>>, &'static str> {
    let mut options: BTreeMap<u8, Vec<u8>> = BTreeMap::new();
    loop {
        match area {
            [] | [255, ..] => return Ok(options),
            [0, rest @ ..] => area = rest,
            [code, len, rest @ ..] if rest.len() >= usize::from(*len) => {
                let (value, rest) = rest.split_at(usize::from(*len));
                options.entry(*code).or_default().extend_from_slice(value);
                area = rest;
            }
            _ => return Err("an option runs past the end of the packet"),
        }
    }
}

/// `PXEClient:Arch:00007:UNDI:003016` → 7.
fn arch_from_vendor_class(vendor: &str) -> Option<u16> {
    let rest = vendor.split_once(":Arch:")?.1;
    rest.get(..5)?.parse().ok()
}

/// The reply skeleton: header copied from the request, message type, server identifier, option 82 echoed.
pub(super) fn reply_to(request: &Request, kind: MessageType, ctx: &DhcpContext) -> Message {
    let req = &request.msg;
    let mut msg = Message::new_with_id(
        req.xid(),
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        req.giaddr(),
        req.chaddr(),
    );
    msg.set_opcode(Opcode::BootReply).set_htype(req.htype()).set_flags(req.flags());
    let opts = msg.opts_mut();
    opts.insert(DhcpOption::MessageType(kind));
    opts.insert(DhcpOption::ServerIdentifier(ctx.server_ip));
    if let Some(info) = &request.relay_info {
        opts.insert(DhcpOption::Unknown(UnknownOption::new(OptionCode::from(OPT_RELAY_AGENT_INFO), info.clone())));
    }
    msg
}

/// Address configuration: mask, router, DNS, domain, hostname, and (unless INFORM) lease times.
pub(super) fn add_network(msg: &mut Message, ctx: &DhcpContext, net: Network<'_>, hostname: Option<&str>, lease: bool) {
    let opts = msg.opts_mut();
    opts.insert(DhcpOption::SubnetMask(net.subnet.mask()));
    if let Some(router) = net.router {
        opts.insert(DhcpOption::Router(vec![router]));
    }
    if !ctx.dns.is_empty() {
        opts.insert(DhcpOption::DomainNameServer(ctx.dns.clone()));
    }
    if let Some(domain) = &ctx.domain {
        opts.insert(DhcpOption::DomainName(domain.clone()));
    }
    if let Some(hostname) = hostname {
        opts.insert(DhcpOption::Hostname(hostname.to_owned()));
    }
    if lease {
        opts.insert(DhcpOption::AddressLeaseTime(ctx.lease_secs));
        opts.insert(DhcpOption::Renewal(ctx.lease_secs / 2));
        opts.insert(DhcpOption::Rebinding((u64::from(ctx.lease_secs) * 7 / 8) as u32));
    }
}

/// Boot information: `siaddr`, `file`, options 66/67, and what PXE or HTTP boot firmware needs (60, 43, 97).
pub(super) fn add_boot(msg: &mut Message, request: &Request, ctx: &DhcpContext, boot: &BootFile, proxy: bool) {
    msg.set_siaddr(ctx.server_ip);
    if boot.name.len() < 128 {
        msg.set_fname_str(&boot.name);
    }
    let opts = msg.opts_mut();
    opts.insert(DhcpOption::TFTPServerName(ctx.server_ip.to_string().into_bytes()));
    opts.insert(DhcpOption::BootfileName(boot.name.clone().into_bytes()));
    if boot.kind == BootKind::Http {
        opts.insert(DhcpOption::ClassIdentifier(b"HTTPClient".to_vec()));
    } else if request.client.is_pxe() && (proxy || !request.client.ipxe) {
        // A proxy offer is only taken by firmware (iPXE included) when it says PXEClient.
        opts.insert(DhcpOption::ClassIdentifier(b"PXEClient".to_vec()));
        if !request.client.ipxe {
            opts.insert(DhcpOption::VendorExtensions(PXE_VENDOR_OPTIONS.to_vec()));
        }
    }
    if let Some(id) = &request.machine_id {
        opts.insert(DhcpOption::ClientMachineIdentifier(id.clone()));
    }
}

/// RFC 2131 4.1: through the relay; else to the client's address; else broadcast.
pub(super) fn destination(request: &Request) -> SocketAddrV4 {
    let (giaddr, ciaddr) = (request.msg.giaddr(), request.msg.ciaddr());
    if !giaddr.is_unspecified() {
        SocketAddrV4::new(giaddr, DHCP_SERVER_PORT)
    } else if !ciaddr.is_unspecified() {
        SocketAddrV4::new(ciaddr, DHCP_CLIENT_PORT)
    } else {
        SocketAddrV4::new(Ipv4Addr::BROADCAST, DHCP_CLIENT_PORT)
    }
}

pub(super) fn encode(msg: &Message, to: SocketAddrV4) -> Option<Outgoing> {
    match msg.to_vec() {
        Ok(bytes) => Some(Outgoing { bytes, to }),
        Err(e) => {
            warn!("encoding a DHCP reply: {e}");
            None
        }
    }
}
