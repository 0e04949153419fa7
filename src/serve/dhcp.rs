//! DHCP (RFC 2131/2132) and PXE (RFC 4578) boot decisions and the DHCP socket loop.
//!
//! Implements:
//! - RFC 2131 (DHCP) server behaviour: DISCOVER→OFFER, REQUEST (selecting, init-reboot, renewing, rebinding)
//!   →ACK/NAK, RELEASE, DECLINE, INFORM; replies through the relay (`giaddr`), unicast to `ciaddr`, else broadcast.
//! - RFC 2132 options: 1 mask, 3 router, 6 DNS, 12 hostname, 15 domain, 51 lease, 54 server id, 58/59 T1/T2,
//!   60 vendor class, 66 TFTP server, 67 boot file. Option 55 (what the client asks for) is honoured loosely:
//!   every reply carries that whole set.
//! - RFC 4578 (PXE options 93 client architecture, 97 machine id) and the PXE 2.1 specification's proxyDHCP:
//!   answers PXE clients on port 67 without an address and on port 4011 (`respond_proxy`), with option 43
//!   `PXE_DISCOVERY_CONTROL` = 8 (boot the file named here, skip boot server discovery).
//! - UEFI HTTP boot (vendor class `HTTPClient`, arch 16/19): the boot file is a URL.
//! - RFC 3046: the relay agent information option (82) is echoed byte for byte.
//! - iPXE (user class `iPXE` or option 175 present) gets `http://SERVER/ipxe/<mac>`, a concrete script URL, so
//!   iPXE never chain-loads itself.
//!
//! Left out: DHCPv6 and PXE over IPv6, failover (one server per subnet; replicas pull bundles, not leases),
//! BOOTP-only clients (no DHCP message type), PXE boot menus and multicast discovery, option overload (52),
//! client identifier (61) as the lease key (leases are keyed by the Ethernet address), conflict detection by
//! ping before offering, and unicasting to a client with no address (replies go to the broadcast address).
//!
//! [`respond`] and [`respond_proxy`] are pure decisions on packet bytes; [`serve`] is the socket loop.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use dhcproto::v4::{DhcpOption, Flags, HType, Message, MessageType, Opcode, OptionCode, UnknownOption};
use dhcproto::{Decodable, Encodable};
use serde::Serialize;
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use super::state::{format_mac, Lease, State};

/// DHCP server port.
pub const DHCP_SERVER_PORT: u16 = 67;
/// DHCP client port.
pub const DHCP_CLIENT_PORT: u16 = 68;
/// PXE boot server (proxyDHCP) port.
pub const PXE_PORT: u16 = 4011;
/// How long an offered address stays set aside for the client it was offered to.
pub const OFFER_HOLD_SECS: u64 = 60;
/// How long an address a client declined (found in use) is not offered.
pub const DECLINE_HOLD_SECS: u64 = 600;

const MAGIC_COOKIE: [u8; 4] = [99, 130, 83, 99];
/// Options kiln reads from requests; every other option is dropped before decoding.
const READ_OPTIONS: [u8; 10] = [12, 50, 53, 54, 60, 61, 77, 93, 97, 175];
const OPT_RELAY_AGENT_INFO: u8 = 82;
const OPT_IPXE_ENCAP: u8 = 175;
/// Option 43 for PXE firmware: sub-option 6 (PXE_DISCOVERY_CONTROL) = 8, then the end marker.
const PXE_VENDOR_OPTIONS: [u8; 4] = [6, 1, 8, 255];

/// Requests dropped because they were not well-formed DHCP (counted for metrics; each is logged at debug level).
pub static MALFORMED_REQUESTS: AtomicU64 = AtomicU64::new(0);

/// What kind of DHCP service this server gives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DhcpMode {
    /// Authoritative for the subnet: addresses and boot information.
    Full,
    /// Boot information only, next to the site's DHCP server.
    Proxy,
    /// No DHCP at all (the caller opens no socket; [`respond`] answers nothing).
    Off,
}

impl std::fmt::Display for DhcpMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DhcpMode::Full => "full",
            DhcpMode::Proxy => "proxy",
            DhcpMode::Off => "off",
        })
    }
}

impl FromStr for DhcpMode {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "full" => Ok(DhcpMode::Full),
            "proxy" => Ok(DhcpMode::Proxy),
            "off" => Ok(DhcpMode::Off),
            _ => bail!("invalid DHCP mode {s:?}: expected full, proxy or off"),
        }
    }
}

/// What to do with machines that are not in the node list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum UnknownPolicy {
    /// Do not answer them and do not record them.
    Ignore,
    /// Record them as discovered; give them an address from the pool (full mode) but no boot file.
    Record,
    /// Record them and boot them like nodes (their iPXE script is the HTTP server's business).
    Boot,
}

/// An IPv4 network: an address and a prefix length, e.g. `10.4.0.1/24`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subnet {
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

impl Subnet {
    pub fn new(addr: Ipv4Addr, prefix: u8) -> Result<Subnet> {
        if prefix > 32 {
            bail!("invalid prefix length /{prefix}: at most 32");
        }
        Ok(Subnet { addr, prefix })
    }

    pub fn mask(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.mask_bits())
    }

    pub fn network(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) & self.mask_bits())
    }

    pub fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) | !self.mask_bits())
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask_bits() == u32::from(self.addr) & self.mask_bits()
    }

    fn mask_bits(&self) -> u32 {
        u32::MAX.checked_shl(32 - u32::from(self.prefix.min(32))).unwrap_or(0)
    }
}

impl FromStr for Subnet {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        let (addr, prefix) =
            s.split_once('/').with_context(|| format!("invalid address {s:?}: expected 10.4.0.1/24"))?;
        let addr = addr.parse().with_context(|| format!("invalid address {s:?}: expected 10.4.0.1/24"))?;
        let prefix = prefix.parse().with_context(|| format!("invalid prefix length in {s:?}: expected 0 to 32"))?;
        Subnet::new(addr, prefix)
    }
}

/// An inclusive range of addresses handed to machines without a reservation, e.g. `10.4.0.100-10.4.0.199`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pool {
    pub start: Ipv4Addr,
    pub end: Ipv4Addr,
}

impl Pool {
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        (self.start..=self.end).contains(&ip)
    }

    fn addresses(&self) -> impl Iterator<Item = Ipv4Addr> {
        (u32::from(self.start)..=u32::from(self.end)).map(Ipv4Addr::from)
    }
}

impl FromStr for Pool {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        let bad = || format!("invalid pool {s:?}: expected FIRST-LAST, e.g. 10.4.0.100-10.4.0.199");
        let (start, end) = s.split_once('-').with_context(bad)?;
        let start: Ipv4Addr = start.trim().parse().with_context(bad)?;
        let end: Ipv4Addr = end.trim().parse().with_context(bad)?;
        if start > end {
            bail!("invalid pool {s:?}: the first address is after the last");
        }
        Ok(Pool { start, end })
    }
}

/// A node's fixed address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    pub ip: Ipv4Addr,
    /// Sent as option 12.
    pub hostname: Option<String>,
}

/// A subnet reached through a DHCP relay (matched by the relay's `giaddr`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayNetwork {
    pub subnet: Subnet,
    pub router: Option<Ipv4Addr>,
    pub pool: Option<Pool>,
}

/// iPXE binaries per client architecture, as names the TFTP server serves (and the HTTP server serves under the
/// same path, for UEFI HTTP boot). `None`: that architecture gets no boot file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BootFiles {
    /// Legacy BIOS PXE (arch 0), e.g. `undionly.kpxe`.
    pub bios: Option<String>,
    /// x86_64 UEFI (arch 7, 9; 16 over HTTP), e.g. `snponly.efi`.
    pub efi_x64: Option<String>,
    /// arm64 UEFI (arch 11; 19 over HTTP), e.g. `arm64/snponly.efi`.
    pub efi_arm64: Option<String>,
}

/// Everything the DHCP decisions depend on. Built from the recipe; replaced whole on reload.
#[derive(Debug, Clone)]
pub struct DhcpContext {
    pub mode: DhcpMode,
    /// The server's own address: server identifier, `siaddr`, TFTP server.
    pub server_ip: Ipv4Addr,
    /// The server's subnet (its address with the prefix, e.g. 10.4.0.1/24).
    pub subnet: Subnet,
    pub router: Option<Ipv4Addr>,
    pub dns: Vec<Ipv4Addr>,
    pub domain: Option<String>,
    pub lease_secs: u32,
    /// Node MAC → fixed address and hostname.
    pub reservations: HashMap<[u8; 6], Reservation>,
    /// Addresses for machines without a reservation on the server's subnet.
    pub pool: Option<Pool>,
    /// Other subnets, served through relays.
    pub relay_networks: Vec<RelayNetwork>,
    pub boot_files: BootFiles,
    /// Base of URLs to the HTTP server, e.g. `http://10.4.0.1` or `http://10.4.0.1:8080` (no trailing slash).
    pub http_base: String,
    pub unknown: UnknownPolicy,
    /// MACs of every node in the node list (with or without a reservation).
    pub known: HashSet<[u8; 6]>,
}

impl DhcpContext {
    /// A context with no nodes, no pool and no boot files: lease one hour, unknown machines recorded,
    /// HTTP on port 80 of `server`. Its subnet is `server`'s.
    pub fn new(mode: DhcpMode, server: Subnet) -> DhcpContext {
        DhcpContext {
            mode,
            server_ip: server.addr,
            subnet: server,
            router: None,
            dns: Vec::new(),
            domain: None,
            lease_secs: 3600,
            reservations: HashMap::new(),
            pool: None,
            relay_networks: Vec::new(),
            boot_files: BootFiles::default(),
            http_base: format!("http://{}", server.addr),
            unknown: UnknownPolicy::Record,
            known: HashSet::new(),
        }
    }

    fn is_known(&self, mac: [u8; 6]) -> bool {
        self.known.contains(&mac) || self.reservations.contains_key(&mac)
    }

    /// The network a request belongs to: the relay's, else the one holding the client's address, else ours.
    fn network_for(&self, giaddr: Ipv4Addr, ciaddr: Ipv4Addr) -> Network<'_> {
        let own = Network { subnet: self.subnet, router: self.router, pool: self.pool.as_ref() };
        let probe = if !giaddr.is_unspecified() { giaddr } else { ciaddr };
        if probe.is_unspecified() || self.subnet.contains(probe) {
            return own;
        }
        self.relay_networks
            .iter()
            .find(|n| n.subnet.contains(probe))
            .map(|n| Network { subnet: n.subnet, router: n.router, pool: n.pool.as_ref() })
            .unwrap_or(own)
    }
}

#[derive(Debug, Clone, Copy)]
struct Network<'a> {
    subnet: Subnet,
    router: Option<Ipv4Addr>,
    pool: Option<&'a Pool>,
}

/// How a client will fetch its boot file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum BootKind {
    /// A file name on the TFTP server (PXE firmware).
    Tftp,
    /// A URL to an EFI binary (UEFI HTTP boot).
    Http,
    /// A URL to the node's iPXE script (the client already runs iPXE).
    IpxeScript,
}

/// The boot file chosen for a client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BootFile {
    pub kind: BootKind,
    /// TFTP file name or URL.
    pub name: String,
}

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

/// The boot file for a client, or `None` (not a network-boot client, or an architecture kiln has no binary for).
pub fn boot_file(ctx: &DhcpContext, client: &ClientInfo, mac: [u8; 6]) -> Option<BootFile> {
    let base = ctx.http_base.trim_end_matches('/');
    if client.ipxe {
        return Some(BootFile { kind: BootKind::IpxeScript, name: format!("{base}/ipxe/{}", format_mac(mac)) });
    }
    if !client.wants_boot() {
        return None;
    }
    let files = &ctx.boot_files;
    let (kind, file) = match client.arch {
        Some(0) if !client.is_http() => (BootKind::Tftp, &files.bios),
        Some(7 | 9) if !client.is_http() => (BootKind::Tftp, &files.efi_x64),
        Some(11) if !client.is_http() => (BootKind::Tftp, &files.efi_arm64),
        Some(16) => (BootKind::Http, &files.efi_x64),
        Some(19) => (BootKind::Http, &files.efi_arm64),
        other => {
            info!(mac = %format_mac(mac), arch = ?other, vendor = ?client.vendor_class,
                "no boot file for this client architecture");
            return None;
        }
    };
    let Some(file) = file else {
        info!(mac = %format_mac(mac), arch = ?client.arch, "no boot file configured for this architecture");
        return None;
    };
    let name = match kind {
        BootKind::Http => format!("{base}/{}", file.trim_start_matches('/')),
        _ => file.clone(),
    };
    Some(BootFile { kind, name })
}

/// The client-side state of leases, as the decisions see it. [`State`] (through `&State`) keeps it on disk;
/// [`MemoryLeases`] in memory.
pub trait LeaseBook {
    /// The lease recorded for `mac`, possibly expired.
    fn lease_of(&self, mac: [u8; 6]) -> Option<Lease>;
    /// The lease recorded on `ip`, possibly expired.
    fn lease_on(&self, ip: Ipv4Addr) -> Option<Lease>;
    /// Records `lease`, replacing the MAC's previous one and any other lease on the same address.
    fn put(&mut self, lease: Lease) -> Result<()>;
    /// Sets `ip` aside until `until` (a client found it in use).
    fn decline(&mut self, ip: Ipv4Addr, until: u64, now: u64) -> Result<()>;
    fn is_declined(&self, ip: Ipv4Addr, now: u64) -> bool;
}

impl LeaseBook for &State {
    fn lease_of(&self, mac: [u8; 6]) -> Option<Lease> {
        self.lease(mac).ok().flatten()
    }
    fn lease_on(&self, ip: Ipv4Addr) -> Option<Lease> {
        State::lease_on(self, ip)
    }
    fn put(&mut self, lease: Lease) -> Result<()> {
        self.put_lease(&lease)
    }
    fn decline(&mut self, ip: Ipv4Addr, until: u64, now: u64) -> Result<()> {
        State::decline(self, ip, until, now)
    }
    fn is_declined(&self, ip: Ipv4Addr, now: u64) -> bool {
        State::is_declined(self, ip, now)
    }
}

/// Leases in memory only (tests, dry runs).
#[derive(Debug, Clone, Default)]
pub struct MemoryLeases {
    pub leases: HashMap<[u8; 6], Lease>,
    pub declined: HashMap<Ipv4Addr, u64>,
}

impl LeaseBook for MemoryLeases {
    fn lease_of(&self, mac: [u8; 6]) -> Option<Lease> {
        self.leases.get(&mac).cloned()
    }
    fn lease_on(&self, ip: Ipv4Addr) -> Option<Lease> {
        self.leases.values().find(|l| l.ip == ip).cloned()
    }
    fn put(&mut self, lease: Lease) -> Result<()> {
        self.leases.retain(|mac, l| l.ip != lease.ip || *mac == lease.mac);
        self.leases.insert(lease.mac, lease);
        Ok(())
    }
    fn decline(&mut self, ip: Ipv4Addr, until: u64, _now: u64) -> Result<()> {
        self.declined.insert(ip, until);
        Ok(())
    }
    fn is_declined(&self, ip: Ipv4Addr, now: u64) -> bool {
        self.declined.get(&ip).is_some_and(|until| *until > now)
    }
}

/// What happened, for the caller's log, boot event history and live views.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DhcpEventKind {
    Offer,
    Ack,
    Nak,
    Release,
    Decline,
    Inform,
    ProxyOffer,
    ProxyAck,
}

impl DhcpEventKind {
    /// The event kind as recorded in the boot event history, e.g. `dhcp-ack`.
    pub fn as_str(self) -> &'static str {
        match self {
            DhcpEventKind::Offer => "dhcp-offer",
            DhcpEventKind::Ack => "dhcp-ack",
            DhcpEventKind::Nak => "dhcp-nak",
            DhcpEventKind::Release => "dhcp-release",
            DhcpEventKind::Decline => "dhcp-decline",
            DhcpEventKind::Inform => "dhcp-inform",
            DhcpEventKind::ProxyOffer => "proxydhcp-offer",
            DhcpEventKind::ProxyAck => "proxydhcp-ack",
        }
    }
}

/// One DHCP exchange step with one machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DhcpEvent {
    #[serde(with = "super::state::mac_text")]
    pub mac: [u8; 6],
    pub kind: DhcpEventKind,
    /// The address offered, acknowledged, released or declined.
    pub ip: Option<Ipv4Addr>,
    pub boot_file: Option<BootFile>,
    /// In the node list.
    pub known: bool,
}

impl DhcpEvent {
    /// One line for the boot event history: `10.4.0.11 undionly.kpxe`.
    pub fn detail(&self) -> String {
        let mut parts = Vec::new();
        if let Some(ip) = self.ip {
            parts.push(ip.to_string());
        }
        if let Some(boot) = &self.boot_file {
            parts.push(boot.name.clone());
        }
        if !self.known {
            parts.push("(unknown machine)".into());
        }
        parts.join(" ")
    }
}

/// A machine not in the node list asked for boot service (under `unknown = "record"` or `"boot"`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UnknownClient {
    #[serde(with = "super::state::mac_text")]
    pub mac: [u8; 6],
    pub arch: Option<u16>,
    pub vendor_class: Option<String>,
}

/// An encoded reply and where it goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    pub bytes: Vec<u8>,
    pub to: SocketAddrV4,
}

/// The outcome of one request: maybe a packet to send, and what to note.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// `None` when the request only changes state (RELEASE, DECLINE) or only needs noting (an unknown machine
    /// recorded but not answered).
    pub packet: Option<Outgoing>,
    /// Set on a DISCOVER from a machine that is not in the node list: the caller records it.
    pub unknown: Option<UnknownClient>,
    pub event: Option<DhcpEvent>,
}

/// A request that passed validation.
struct Request {
    msg: Message,
    kind: MessageType,
    mac: [u8; 6],
    client: ClientInfo,
    /// Option 82 as received (code and length excluded), echoed in replies.
    relay_info: Option<Vec<u8>>,
    /// Option 97 as received.
    machine_id: Option<Vec<u8>>,
    requested_ip: Option<Ipv4Addr>,
    server_id: Option<Ipv4Addr>,
    /// Option 12: the name the client calls itself (kept in its lease record, never sent back).
    hostname: Option<String>,
}

impl Request {
    fn parse(bytes: &[u8]) -> Result<Request, &'static str> {
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
            mac,
            client: ClientInfo { arch, vendor_class, ipxe },
            relay_info: options.get(&OPT_RELAY_AGENT_INFO).cloned(),
            machine_id,
            requested_ip,
            server_id,
            msg,
        })
    }

    fn unknown_client(&self) -> UnknownClient {
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

/// Decides the answer to one DHCP request received on port 67. `None`: nothing to send and nothing to note
/// (malformed, not for us, or from an unknown machine under `unknown = "ignore"`).
pub fn respond(req: &[u8], ctx: &DhcpContext, leases: &mut dyn LeaseBook, now: u64) -> Option<Reply> {
    let request = parse_or_count(req)?;
    match ctx.mode {
        DhcpMode::Off => None,
        DhcpMode::Proxy => proxy_offer(&request, ctx),
        DhcpMode::Full => full(&request, ctx, leases, now),
    }
}

/// Decides the answer to a request received on the PXE port (4011): a DHCPREQUEST or DHCPINFORM from a PXE
/// client gets a DHCPACK with boot information and no address, sent back to `from` (where it came from).
pub fn respond_proxy(req: &[u8], ctx: &DhcpContext, from: SocketAddrV4) -> Option<Reply> {
    let request = parse_or_count(req)?;
    if ctx.mode == DhcpMode::Off || !matches!(request.kind, MessageType::Request | MessageType::Inform) {
        return None;
    }
    let known = ctx.is_known(request.mac);
    let boot = boot_for(&request, ctx, known)?;
    let mut msg = reply_to(&request, MessageType::Ack, ctx);
    msg.set_ciaddr(request.msg.ciaddr());
    add_boot(&mut msg, &request, ctx, &boot, true);
    let to = if from.ip().is_unspecified() { SocketAddrV4::new(Ipv4Addr::BROADCAST, DHCP_CLIENT_PORT) } else { from };
    let event = DhcpEvent { mac: request.mac, kind: DhcpEventKind::ProxyAck, ip: None, boot_file: Some(boot), known };
    Some(Reply { packet: encode(&msg, to), unknown: None, event: Some(event) })
}

fn parse_or_count(req: &[u8]) -> Option<Request> {
    match Request::parse(req) {
        Ok(request) => Some(request),
        Err(why) => {
            MALFORMED_REQUESTS.fetch_add(1, Ordering::Relaxed);
            debug!(len = req.len(), "dropping a malformed DHCP request: {why}");
            None
        }
    }
}

/// The boot file for this request, if the client is to be booted.
fn boot_for(request: &Request, ctx: &DhcpContext, known: bool) -> Option<BootFile> {
    if !(known || ctx.unknown == UnknownPolicy::Boot) {
        return None;
    }
    boot_file(ctx, &request.client, request.mac)
}

/// proxyDHCP on port 67: a PXE client's DISCOVER gets boot information without an address.
fn proxy_offer(request: &Request, ctx: &DhcpContext) -> Option<Reply> {
    if request.kind != MessageType::Discover || !(request.client.is_pxe() || request.client.is_http()) {
        return None;
    }
    let known = ctx.is_known(request.mac);
    if !known && ctx.unknown == UnknownPolicy::Ignore {
        return None;
    }
    let unknown = (!known).then(|| request.unknown_client());
    let Some(boot) = boot_for(request, ctx, known) else {
        return unknown.map(|u| Reply { packet: None, unknown: Some(u), event: None });
    };
    let mut msg = reply_to(request, MessageType::Offer, ctx);
    add_boot(&mut msg, request, ctx, &boot, true);
    let event = DhcpEvent { mac: request.mac, kind: DhcpEventKind::ProxyOffer, ip: None, boot_file: Some(boot), known };
    Some(Reply { packet: encode(&msg, destination(request)), unknown, event: Some(event) })
}

/// Full (authoritative) mode.
fn full(request: &Request, ctx: &DhcpContext, book: &mut dyn LeaseBook, now: u64) -> Option<Reply> {
    let mac = request.mac;
    let known = ctx.is_known(mac);
    if !known && ctx.unknown == UnknownPolicy::Ignore {
        debug!(mac = %format_mac(mac), "ignoring an unknown machine");
        return None;
    }
    let unknown = (!known && request.kind == MessageType::Discover).then(|| request.unknown_client());
    let net = ctx.network_for(request.msg.giaddr(), request.msg.ciaddr());
    let hostname = ctx.reservations.get(&mac).and_then(|r| r.hostname.clone());
    let lease_name = hostname.clone().or_else(|| request.hostname.clone());
    let boot = boot_for(request, ctx, known);
    let event = |kind, ip, boot_file| Some(DhcpEvent { mac, kind, ip, boot_file, known });
    let persist = |book: &mut dyn LeaseBook, lease: Lease| match book.put(lease) {
        Ok(()) => Some(()),
        Err(e) => {
            warn!(mac = %format_mac(mac), "not answering: {e:#}");
            None
        }
    };
    match request.kind {
        MessageType::Discover => {
            let Some(ip) = choose_address(ctx, net, mac, &*book, now) else {
                warn!(mac = %format_mac(mac), subnet = %net.subnet.network(), "no address to offer");
                return unknown.map(|u| Reply { packet: None, unknown: Some(u), event: None });
            };
            // Hold the address for this client (without shortening a lease it already has on it).
            let expires = match book.lease_of(mac) {
                Some(old) if old.ip == ip => old.expires.max(now + OFFER_HOLD_SECS),
                _ => now + OFFER_HOLD_SECS,
            };
            persist(book, Lease { mac, ip, expires, hostname: lease_name })?;
            let mut msg = reply_to(request, MessageType::Offer, ctx);
            msg.set_yiaddr(ip);
            add_network(&mut msg, ctx, net, hostname.as_deref(), true);
            if let Some(boot) = &boot {
                add_boot(&mut msg, request, ctx, boot, false);
            }
            info!(mac = %format_mac(mac), %ip, boot = ?boot.as_ref().map(|b| &b.name), "DHCPOFFER");
            Some(Reply {
                packet: encode(&msg, destination(request)),
                unknown,
                event: event(DhcpEventKind::Offer, Some(ip), boot),
            })
        }
        MessageType::Request => {
            if request.server_id.is_some_and(|id| id != ctx.server_ip) {
                debug!(mac = %format_mac(mac), "client chose another DHCP server");
                return None;
            }
            let ciaddr = request.msg.ciaddr();
            let requested = request.requested_ip.or((!ciaddr.is_unspecified()).then_some(ciaddr))?;
            // Authoritative only for clients we give addresses to: a client we have nothing for is left alone.
            let expected = choose_address(ctx, net, mac, &*book, now)?;
            if requested != expected {
                info!(mac = %format_mac(mac), %requested, %expected, "DHCPNAK");
                let mut msg = reply_to(request, MessageType::Nak, ctx);
                if !request.msg.giaddr().is_unspecified() {
                    msg.set_flags(Flags::default().set_broadcast());
                }
                let to = if request.msg.giaddr().is_unspecified() {
                    SocketAddrV4::new(Ipv4Addr::BROADCAST, DHCP_CLIENT_PORT)
                } else {
                    SocketAddrV4::new(request.msg.giaddr(), DHCP_SERVER_PORT)
                };
                return Some(Reply {
                    packet: encode(&msg, to),
                    unknown: None,
                    event: event(DhcpEventKind::Nak, Some(requested), None),
                });
            }
            let expires = now + u64::from(ctx.lease_secs);
            persist(book, Lease { mac, ip: expected, expires, hostname: lease_name })?;
            let mut msg = reply_to(request, MessageType::Ack, ctx);
            msg.set_ciaddr(ciaddr);
            msg.set_yiaddr(expected);
            add_network(&mut msg, ctx, net, hostname.as_deref(), true);
            if let Some(boot) = &boot {
                add_boot(&mut msg, request, ctx, boot, false);
            }
            info!(mac = %format_mac(mac), ip = %expected, boot = ?boot.as_ref().map(|b| &b.name), "DHCPACK");
            Some(Reply {
                packet: encode(&msg, destination(request)),
                unknown: None,
                event: event(DhcpEventKind::Ack, Some(expected), boot),
            })
        }
        MessageType::Release => {
            let ip = request.msg.ciaddr();
            let lease = book.lease_of(mac).filter(|l| l.ip == ip && l.active(now))?;
            // Keep the record, expired: the machine gets the same address back if it is still free.
            persist(book, Lease { expires: now, ..lease })?;
            info!(mac = %format_mac(mac), %ip, "DHCPRELEASE");
            Some(Reply { packet: None, unknown: None, event: event(DhcpEventKind::Release, Some(ip), None) })
        }
        MessageType::Decline => {
            let ip = request.requested_ip?;
            let lease = book.lease_of(mac).filter(|l| l.ip == ip)?;
            warn!(mac = %format_mac(mac), %ip, "DHCPDECLINE: the address is in use by another machine");
            if let Err(e) = book.decline(ip, now + DECLINE_HOLD_SECS, now) {
                warn!("{e:#}");
            }
            persist(book, Lease { expires: now, ..lease })?;
            Some(Reply { packet: None, unknown: None, event: event(DhcpEventKind::Decline, Some(ip), None) })
        }
        MessageType::Inform => {
            let mut msg = reply_to(request, MessageType::Ack, ctx);
            msg.set_ciaddr(request.msg.ciaddr());
            add_network(&mut msg, ctx, net, hostname.as_deref(), false);
            if let Some(boot) = &boot {
                add_boot(&mut msg, request, ctx, boot, false);
            }
            Some(Reply {
                packet: encode(&msg, destination(request)),
                unknown: None,
                event: event(DhcpEventKind::Inform, None, boot),
            })
        }
        _ => None,
    }
}

/// The address `mac` gets on `net`: its reservation; else from the pool its previous address, a never-used
/// one, or one whose lease expired. Never an address leased to, or reserved for, another machine.
fn choose_address(
    ctx: &DhcpContext,
    net: Network<'_>,
    mac: [u8; 6],
    book: &dyn LeaseBook,
    now: u64,
) -> Option<Ipv4Addr> {
    let held_by_other = |ip: Ipv4Addr| book.lease_on(ip).is_some_and(|l| l.mac != mac && l.active(now));
    if let Some(reservation) = ctx.reservations.get(&mac) {
        let ip = reservation.ip;
        if net.subnet.contains(ip) {
            if held_by_other(ip) {
                warn!(mac = %format_mac(mac), %ip, "the reserved address is leased to another machine");
                return None;
            }
            if book.is_declined(ip, now) {
                warn!(mac = %format_mac(mac), %ip, "the reserved address was declined (in use?)");
                return None;
            }
            return Some(ip);
        }
        debug!(mac = %format_mac(mac), %ip, subnet = %net.subnet.network(), "reservation is on another subnet");
    }
    if !ctx.is_known(mac) && ctx.unknown == UnknownPolicy::Ignore {
        return None;
    }
    let pool = net.pool?;
    let reserved: HashSet<Ipv4Addr> = ctx.reservations.iter().filter(|(m, _)| **m != mac).map(|(_, r)| r.ip).collect();
    let usable = |ip: Ipv4Addr| {
        pool.contains(ip)
            && net.subnet.contains(ip)
            && (net.subnet.prefix >= 31 || (ip != net.subnet.network() && ip != net.subnet.broadcast()))
            && ip != ctx.server_ip
            && Some(ip) != net.router
            && !reserved.contains(&ip)
            && !book.is_declined(ip, now)
            && !held_by_other(ip)
    };
    if let Some(previous) = book.lease_of(mac).map(|l| l.ip).filter(|ip| usable(*ip)) {
        return Some(previous);
    }
    if let Some(fresh) = pool.addresses().find(|ip| usable(*ip) && book.lease_on(*ip).is_none()) {
        return Some(fresh);
    }
    pool.addresses().find(|ip| usable(*ip))
}

/// The reply skeleton: header copied from the request, message type, server identifier, option 82 echoed.
fn reply_to(request: &Request, kind: MessageType, ctx: &DhcpContext) -> Message {
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
fn add_network(msg: &mut Message, ctx: &DhcpContext, net: Network<'_>, hostname: Option<&str>, lease: bool) {
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
fn add_boot(msg: &mut Message, request: &Request, ctx: &DhcpContext, boot: &BootFile, proxy: bool) {
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
fn destination(request: &Request) -> SocketAddrV4 {
    let (giaddr, ciaddr) = (request.msg.giaddr(), request.msg.ciaddr());
    if !giaddr.is_unspecified() {
        SocketAddrV4::new(giaddr, DHCP_SERVER_PORT)
    } else if !ciaddr.is_unspecified() {
        SocketAddrV4::new(ciaddr, DHCP_CLIENT_PORT)
    } else {
        SocketAddrV4::new(Ipv4Addr::BROADCAST, DHCP_CLIENT_PORT)
    }
}

fn encode(msg: &Message, to: SocketAddrV4) -> Option<Outgoing> {
    match msg.to_vec() {
        Ok(bytes) => Some(Outgoing { bytes, to }),
        Err(e) => {
            warn!("encoding a DHCP reply: {e}");
            None
        }
    }
}

/// Serves DHCP until `shutdown` completes: port `port` (67) and, if given, the PXE port `proxy_port` (4011), on
/// `interface` if given (SO_BINDTODEVICE) else every interface. Leases, discovered machines and boot events go to
/// `state`; each exchange is also sent to `events`. The context is read anew for every packet, so sending a new
/// one on the watch channel (reload) takes effect at once.
///
/// Give `interface` whenever the machine has more than one network: replies to clients without an address go to
/// 255.255.255.255, which without SO_BINDTODEVICE leaves by whatever interface the routing table picks (or fails
/// with "network unreachable" when there is no default route).
pub async fn serve(
    ctx: watch::Receiver<Arc<DhcpContext>>,
    state: Arc<State>,
    interface: Option<String>,
    port: u16,
    proxy_port: Option<u16>,
    events: Option<mpsc::UnboundedSender<DhcpEvent>>,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    let main = bind(interface.as_deref(), port)?;
    let proxy = proxy_port.map(|p| bind(interface.as_deref(), p)).transpose()?;
    info!(
        port,
        proxy_port,
        interface = interface.as_deref().unwrap_or("*"),
        leases = state.leases().map(|l| l.len()).unwrap_or(0),
        "DHCP server listening"
    );
    tokio::pin!(shutdown);
    let mut buf = vec![0u8; 4096];
    let mut proxy_buf = vec![0u8; 4096];
    loop {
        let (received, on_proxy) = tokio::select! {
            () = &mut shutdown => break,
            r = main.recv_from(&mut buf) => (r.map(|(n, from)| (buf[..n].to_vec(), from)), false),
            r = recv_optional(proxy.as_ref(), &mut proxy_buf) => {
                (r.map(|(n, from)| (proxy_buf[..n].to_vec(), from)), true)
            }
        };
        let (packet, from) = match received {
            Ok(got) => got,
            Err(e) => {
                warn!("receiving a DHCP packet: {e}");
                continue;
            }
        };
        let SocketAddr::V4(from) = from else { continue };
        let context = ctx.borrow().clone();
        let state = state.clone();
        let decided = tokio::task::spawn_blocking(move || {
            let now = unix_now();
            let reply = if on_proxy {
                respond_proxy(&packet, &context, from)
            } else {
                let mut book: &State = &state;
                respond(&packet, &context, &mut book, now)
            };
            if let Some(reply) = &reply {
                note(&state, reply, now);
            }
            reply
        })
        .await;
        let reply = match decided {
            Ok(Some(reply)) => reply,
            Ok(None) => continue,
            Err(e) => {
                warn!("deciding a DHCP reply: {e}");
                continue;
            }
        };
        if let Some(out) = &reply.packet {
            let socket = if on_proxy { proxy.as_ref().unwrap_or(&main) } else { &main };
            if let Err(e) = socket.send_to(&out.bytes, SocketAddr::V4(out.to)).await {
                warn!(to = %out.to, "sending a DHCP reply: {e}");
            }
        }
        if let (Some(tx), Some(event)) = (&events, reply.event) {
            let _ = tx.send(event);
        }
    }
    info!("DHCP server stopped");
    Ok(())
}

/// Records what a reply says happened: discovered machines and boot events.
fn note(state: &State, reply: &Reply, now: u64) {
    if let Some(u) = &reply.unknown {
        if let Err(e) = state.record_discovered(u.mac, u.arch, u.vendor_class.clone(), now) {
            warn!("{e:#}");
        }
    }
    if let Some(event) = &reply.event {
        if let Err(e) = state.record_event(event.mac, event.kind.as_str(), &event.detail(), now) {
            warn!("{e:#}");
        }
    }
}

async fn recv_optional(socket: Option<&UdpSocket>, buf: &mut [u8]) -> std::io::Result<(usize, SocketAddr)> {
    match socket {
        Some(socket) => socket.recv_from(buf).await,
        None => std::future::pending().await,
    }
}

/// A UDP socket on 0.0.0.0:`port` that may send broadcasts, bound to `interface` if given.
fn bind(interface: Option<&str>, port: u16) -> Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).context("creating a UDP socket")?;
    socket.set_reuse_address(true).context("setting SO_REUSEADDR")?;
    socket.set_broadcast(true).context("setting SO_BROADCAST")?;
    if let Some(interface) = interface {
        socket.bind_device(Some(interface.as_bytes())).with_context(|| {
            format!(
                "binding the DHCP socket to interface {interface:?} (does it exist? this needs root or CAP_NET_RAW)"
            )
        })?;
    }
    socket.set_nonblocking(true)?;
    let addr = SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
    socket.bind(&addr.into()).with_context(|| {
        format!("binding UDP port {port} (ports below 1024 need root or CAP_NET_BIND_SERVICE; is another DHCP server running?)")
    })?;
    UdpSocket::from_std(socket.into()).context("registering the DHCP socket with tokio")
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SERVER: Ipv4Addr = Ipv4Addr::new(10, 4, 0, 1);
    const NODE: [u8; 6] = [0x52, 0x54, 0, 0xaa, 0xbb, 0x42];
    const OTHER_NODE: [u8; 6] = [0x52, 0x54, 0, 0xaa, 0xbb, 0x43];
    const STRANGER: [u8; 6] = [0x52, 0x54, 0, 0x99, 0x99, 0x01];
    const STRANGER_2: [u8; 6] = [0x52, 0x54, 0, 0x99, 0x99, 0x02];
    const NOW: u64 = 1_700_000_000;
    const BIOS: &str = "PXEClient:Arch:00000:UNDI:002001";
    const EFI: &str = "PXEClient:Arch:00007:UNDI:003016";

    fn context(mode: DhcpMode) -> DhcpContext {
        let mut ctx = DhcpContext::new(mode, "10.4.0.1/24".parse().unwrap());
        ctx.router = Some(SERVER);
        ctx.dns = vec![Ipv4Addr::new(10, 4, 0, 2)];
        ctx.domain = Some("cluster.example".into());
        ctx.lease_secs = 7200;
        ctx.reservations.insert(NODE, Reservation { ip: [10, 4, 0, 11].into(), hostname: Some("n001".into()) });
        ctx.reservations.insert(OTHER_NODE, Reservation { ip: [10, 4, 0, 100].into(), hostname: None });
        ctx.known.extend([NODE, OTHER_NODE]);
        ctx.pool = Some("10.4.0.100-10.4.0.102".parse().unwrap());
        ctx.boot_files = BootFiles {
            bios: Some("undionly.kpxe".into()),
            efi_x64: Some("snponly.efi".into()),
            efi_arm64: Some("arm64/snponly.efi".into()),
        };
        ctx
    }

    fn request(kind: MessageType, mac: [u8; 6], opts: Vec<DhcpOption>) -> Message {
        let z = Ipv4Addr::UNSPECIFIED;
        let mut msg = Message::new_with_id(0x1234_5678, z, z, z, z, &mac);
        msg.opts_mut().insert(DhcpOption::MessageType(kind));
        for opt in opts {
            msg.opts_mut().insert(opt);
        }
        msg
    }

    fn pxe(vendor: &str, arch: u16) -> Vec<DhcpOption> {
        vec![
            DhcpOption::ClassIdentifier(vendor.as_bytes().to_vec()),
            DhcpOption::ClientSystemArchitecture(dhcproto::v4::Architecture(arch)),
            DhcpOption::ClientMachineIdentifier(vec![0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]),
        ]
    }

    fn run(ctx: &DhcpContext, book: &mut MemoryLeases, msg: &Message) -> Option<Reply> {
        respond(&msg.to_vec().unwrap(), ctx, book, NOW)
    }

    /// The decoded packet of a reply that must have one, and where it goes.
    fn sent(reply: Option<Reply>) -> (Message, SocketAddrV4) {
        let out = reply.expect("a reply").packet.expect("a packet");
        (Message::from_bytes(&out.bytes).unwrap(), out.to)
    }

    fn opt(msg: &Message, code: OptionCode) -> Option<&DhcpOption> {
        msg.opts().get(code)
    }

    fn file(msg: &Message) -> Option<String> {
        msg.fname().map(|f| String::from_utf8_lossy(f).trim_end_matches('\0').to_owned())
    }

    fn bootfile(msg: &Message) -> Option<String> {
        match opt(msg, OptionCode::BootfileName) {
            Some(DhcpOption::BootfileName(b)) => Some(String::from_utf8(b.clone()).unwrap()),
            _ => None,
        }
    }

    fn broadcast68() -> SocketAddrV4 {
        SocketAddrV4::new(Ipv4Addr::BROADCAST, 68)
    }

    #[test]
    fn known_node_gets_its_reservation_and_every_option() {
        let ctx = context(DhcpMode::Full);
        let mut book = MemoryLeases::default();
        let (offer, to) = sent(run(&ctx, &mut book, &request(MessageType::Discover, NODE, vec![])));
        assert_eq!(to, broadcast68());
        assert_eq!(offer.opcode(), Opcode::BootReply);
        assert_eq!(offer.xid(), 0x1234_5678);
        assert_eq!(offer.chaddr(), &NODE);
        assert_eq!(offer.opts().msg_type(), Some(MessageType::Offer));
        assert_eq!(offer.yiaddr(), Ipv4Addr::new(10, 4, 0, 11));
        assert_eq!(opt(&offer, OptionCode::SubnetMask), Some(&DhcpOption::SubnetMask([255, 255, 255, 0].into())));
        assert_eq!(opt(&offer, OptionCode::Router), Some(&DhcpOption::Router(vec![SERVER])));
        assert_eq!(opt(&offer, OptionCode::DomainNameServer), Some(&DhcpOption::DomainNameServer(ctx.dns.clone())));
        assert_eq!(opt(&offer, OptionCode::DomainName), Some(&DhcpOption::DomainName("cluster.example".into())));
        assert_eq!(opt(&offer, OptionCode::Hostname), Some(&DhcpOption::Hostname("n001".into())));
        assert_eq!(opt(&offer, OptionCode::ServerIdentifier), Some(&DhcpOption::ServerIdentifier(SERVER)));
        assert_eq!(opt(&offer, OptionCode::AddressLeaseTime), Some(&DhcpOption::AddressLeaseTime(7200)));
        assert_eq!(opt(&offer, OptionCode::Renewal), Some(&DhcpOption::Renewal(3600)));
        assert_eq!(opt(&offer, OptionCode::Rebinding), Some(&DhcpOption::Rebinding(6300)));
        // Not a PXE client: no boot information.
        assert_eq!(bootfile(&offer), None);
        assert_eq!(file(&offer), None);

        let req = request(
            MessageType::Request,
            NODE,
            vec![DhcpOption::ServerIdentifier(SERVER), DhcpOption::RequestedIpAddress([10, 4, 0, 11].into())],
        );
        let reply = run(&ctx, &mut book, &req);
        assert_eq!(reply.as_ref().unwrap().event.as_ref().unwrap().kind, DhcpEventKind::Ack);
        let (ack, to) = sent(reply);
        assert_eq!(to, broadcast68());
        assert_eq!(ack.opts().msg_type(), Some(MessageType::Ack));
        assert_eq!(ack.yiaddr(), Ipv4Addr::new(10, 4, 0, 11));
        let lease = book.lease_of(NODE).unwrap();
        assert_eq!((lease.ip, lease.expires, lease.hostname.as_deref()), (ack.yiaddr(), NOW + 7200, Some("n001")));
    }

    #[test]
    fn wrong_address_is_nakked_and_other_servers_are_left_alone() {
        let ctx = context(DhcpMode::Full);
        let mut book = MemoryLeases::default();
        // INIT-REBOOT with an address from another network.
        let req = request(MessageType::Request, NODE, vec![DhcpOption::RequestedIpAddress([192, 168, 1, 5].into())]);
        let (nak, to) = sent(run(&ctx, &mut book, &req));
        assert_eq!(nak.opts().msg_type(), Some(MessageType::Nak));
        assert_eq!(nak.yiaddr(), Ipv4Addr::UNSPECIFIED);
        assert_eq!(to, broadcast68());
        // SELECTING another server's offer.
        let req = request(
            MessageType::Request,
            NODE,
            vec![
                DhcpOption::ServerIdentifier([10, 4, 0, 254].into()),
                DhcpOption::RequestedIpAddress([10, 4, 0, 11].into()),
            ],
        );
        assert_eq!(run(&ctx, &mut book, &req), None);
        assert!(book.leases.is_empty());
    }

    #[test]
    fn renewal_is_unicast_to_the_client() {
        let ctx = context(DhcpMode::Full);
        let mut book = MemoryLeases::default();
        let mut req = request(MessageType::Request, NODE, vec![]);
        req.set_ciaddr([10, 4, 0, 11]);
        let (ack, to) = sent(run(&ctx, &mut book, &req));
        assert_eq!(ack.opts().msg_type(), Some(MessageType::Ack));
        assert_eq!(ack.ciaddr(), Ipv4Addr::new(10, 4, 0, 11));
        assert_eq!(to, SocketAddrV4::new([10, 4, 0, 11].into(), 68));
    }

    #[test]
    fn boot_file_by_architecture() {
        let ctx = context(DhcpMode::Full);
        let cases: [(&str, u16, Option<&str>, Option<&str>); 7] = [
            (BIOS, 0, Some("undionly.kpxe"), Some("PXEClient")),
            (EFI, 7, Some("snponly.efi"), Some("PXEClient")),
            ("PXEClient:Arch:00009:UNDI:003016", 9, Some("snponly.efi"), Some("PXEClient")),
            ("PXEClient:Arch:00011:UNDI:003016", 11, Some("arm64/snponly.efi"), Some("PXEClient")),
            ("HTTPClient:Arch:00016:UNDI:003001", 16, Some("http://10.4.0.1/snponly.efi"), Some("HTTPClient")),
            ("HTTPClient:Arch:00019:UNDI:003001", 19, Some("http://10.4.0.1/arm64/snponly.efi"), Some("HTTPClient")),
            ("PXEClient:Arch:00006:UNDI:003016", 6, None, None),
        ];
        for (vendor, arch, want, class) in cases {
            let mut book = MemoryLeases::default();
            let (offer, _) = sent(run(&ctx, &mut book, &request(MessageType::Discover, NODE, pxe(vendor, arch))));
            assert_eq!(bootfile(&offer).as_deref(), want, "arch {arch}");
            assert_eq!(file(&offer).as_deref(), want, "arch {arch}");
            let got_class = match opt(&offer, OptionCode::ClassIdentifier) {
                Some(DhcpOption::ClassIdentifier(c)) => Some(String::from_utf8(c.clone()).unwrap()),
                _ => None,
            };
            assert_eq!(got_class.as_deref(), class, "arch {arch}");
            if want.is_some() {
                assert_eq!(offer.siaddr(), SERVER);
                assert_eq!(
                    opt(&offer, OptionCode::TFTPServerName),
                    Some(&DhcpOption::TFTPServerName(b"10.4.0.1".to_vec()))
                );
                assert_eq!(opt(&offer, OptionCode::ClientMachineIdentifier), pxe(vendor, arch).get(2));
            }
            let pxe_options = opt(&offer, OptionCode::VendorExtensions);
            if class == Some("PXEClient") {
                assert_eq!(pxe_options, Some(&DhcpOption::VendorExtensions(vec![6, 1, 8, 255])), "arch {arch}");
            } else {
                assert_eq!(pxe_options, None, "arch {arch}");
            }
        }
    }

    #[test]
    fn arch_comes_from_the_vendor_class_when_option_93_is_missing() {
        let ctx = context(DhcpMode::Full);
        let opts = vec![DhcpOption::ClassIdentifier(EFI.as_bytes().to_vec())];
        let (offer, _) = sent(run(&ctx, &mut MemoryLeases::default(), &request(MessageType::Discover, NODE, opts)));
        assert_eq!(bootfile(&offer).as_deref(), Some("snponly.efi"));
    }

    #[test]
    fn ipxe_gets_its_script_with_the_concrete_mac() {
        let mut ctx = context(DhcpMode::Full);
        ctx.http_base = "http://10.4.0.1:8080/".into();
        let want = "http://10.4.0.1:8080/ipxe/52:54:00:aa:bb:42";
        let by_user_class = [pxe(BIOS, 0), vec![DhcpOption::UserClass(b"iPXE".to_vec())]].concat();
        let by_175 = [
            pxe(EFI, 7),
            vec![DhcpOption::Unknown(UnknownOption::new(OptionCode::from(175), vec![19, 1, 1, 23, 1, 1]))],
        ]
        .concat();
        for opts in [by_user_class, by_175] {
            let (offer, _) = sent(run(&ctx, &mut MemoryLeases::default(), &request(MessageType::Discover, NODE, opts)));
            assert_eq!(bootfile(&offer).as_deref(), Some(want));
            assert_eq!(file(&offer).as_deref(), Some(want));
            // Full mode: iPXE needs neither PXEClient nor option 43.
            assert_eq!(opt(&offer, OptionCode::VendorExtensions), None);
        }
    }

    #[test]
    fn unknown_machines_follow_the_policy() {
        let mut ctx = context(DhcpMode::Full);
        let discover = request(MessageType::Discover, STRANGER, pxe(BIOS, 0));

        ctx.unknown = UnknownPolicy::Ignore;
        assert_eq!(run(&ctx, &mut MemoryLeases::default(), &discover), None);

        ctx.unknown = UnknownPolicy::Record;
        let reply = run(&ctx, &mut MemoryLeases::default(), &discover).unwrap();
        assert_eq!(
            reply.unknown,
            Some(UnknownClient { mac: STRANGER, arch: Some(0), vendor_class: Some(BIOS.into()) })
        );
        let (offer, _) = sent(Some(reply));
        // 10.4.0.100 is reserved for another node.
        assert_eq!(offer.yiaddr(), Ipv4Addr::new(10, 4, 0, 101));
        assert_eq!(bootfile(&offer), None, "record: an address but no boot file");

        ctx.unknown = UnknownPolicy::Boot;
        let (offer, _) = sent(run(&ctx, &mut MemoryLeases::default(), &discover));
        assert_eq!(bootfile(&offer).as_deref(), Some("undionly.kpxe"));

        // Without a pool: noted, not answered.
        ctx.pool = None;
        let reply = run(&ctx, &mut MemoryLeases::default(), &discover).unwrap();
        assert_eq!(reply.packet, None);
        assert_eq!(reply.unknown.unwrap().mac, STRANGER);
    }

    #[test]
    fn pool_never_gives_an_address_held_by_another_and_prefers_the_previous_one() {
        let ctx = context(DhcpMode::Full);
        let mut book = MemoryLeases::default();
        // STRANGER_2 holds .101 actively; STRANGER had .102 once (expired).
        book.put(Lease { mac: STRANGER_2, ip: [10, 4, 0, 101].into(), expires: NOW + 100, hostname: None }).unwrap();
        book.put(Lease { mac: STRANGER, ip: [10, 4, 0, 102].into(), expires: NOW - 100, hostname: None }).unwrap();
        let (offer, _) = sent(run(&ctx, &mut book, &request(MessageType::Discover, STRANGER, vec![])));
        assert_eq!(offer.yiaddr(), Ipv4Addr::new(10, 4, 0, 102));
        // Pool exhausted (.100 reserved, .101 and .102 held): nothing for a third machine.
        let third = [0x52, 0x54, 0, 0x99, 0x99, 0x03];
        let reply = run(&ctx, &mut book, &request(MessageType::Discover, third, vec![])).unwrap();
        assert_eq!(reply.packet, None);
        // A REQUEST for an address held by another gets a NAK.
        let req = request(MessageType::Request, third, vec![DhcpOption::RequestedIpAddress([10, 4, 0, 101].into())]);
        assert_eq!(run(&ctx, &mut book, &req), None, "nothing to give: not ours to NAK");
        let req = request(MessageType::Request, STRANGER, vec![DhcpOption::RequestedIpAddress([10, 4, 0, 101].into())]);
        assert_eq!(sent(run(&ctx, &mut book, &req)).0.opts().msg_type(), Some(MessageType::Nak));
    }

    #[test]
    fn an_expired_address_is_reused_only_when_no_fresh_one_is_left() {
        let mut ctx = context(DhcpMode::Full);
        ctx.pool = Some("10.4.0.101-10.4.0.102".parse().unwrap());
        let mut book = MemoryLeases::default();
        book.put(Lease { mac: STRANGER_2, ip: [10, 4, 0, 101].into(), expires: NOW - 1, hostname: None }).unwrap();
        let (offer, _) = sent(run(&ctx, &mut book, &request(MessageType::Discover, STRANGER, vec![])));
        assert_eq!(offer.yiaddr(), Ipv4Addr::new(10, 4, 0, 102));
        let third = [0x52, 0x54, 0, 0x99, 0x99, 0x03];
        let (offer, _) = sent(run(&ctx, &mut book, &request(MessageType::Discover, third, vec![])));
        assert_eq!(offer.yiaddr(), Ipv4Addr::new(10, 4, 0, 101));
        assert_eq!(book.lease_of(STRANGER_2), None, "one address, one holder");
    }

    #[test]
    fn release_frees_and_decline_sets_aside() {
        let mut ctx = context(DhcpMode::Full);
        ctx.pool = Some("10.4.0.101-10.4.0.101".parse().unwrap());
        let mut book = MemoryLeases::default();
        let req = request(MessageType::Request, STRANGER, vec![DhcpOption::RequestedIpAddress([10, 4, 0, 101].into())]);
        assert_eq!(sent(run(&ctx, &mut book, &req)).0.opts().msg_type(), Some(MessageType::Ack));
        let reply = run(&ctx, &mut book, &request(MessageType::Discover, STRANGER_2, vec![])).unwrap();
        assert_eq!(reply.packet, None, "the only address is leased");

        let mut release = request(MessageType::Release, STRANGER, vec![DhcpOption::ServerIdentifier(SERVER)]);
        release.set_ciaddr([10, 4, 0, 101]);
        let reply = run(&ctx, &mut book, &release).unwrap();
        assert_eq!((reply.packet, reply.event.unwrap().kind), (None, DhcpEventKind::Release));
        let (offer, _) = sent(run(&ctx, &mut book, &request(MessageType::Discover, STRANGER_2, vec![])));
        assert_eq!(offer.yiaddr(), Ipv4Addr::new(10, 4, 0, 101));

        let decline =
            request(MessageType::Decline, STRANGER_2, vec![DhcpOption::RequestedIpAddress([10, 4, 0, 101].into())]);
        let reply = run(&ctx, &mut book, &decline).unwrap();
        assert_eq!(reply.event.unwrap().kind, DhcpEventKind::Decline);
        assert!(book.is_declined([10, 4, 0, 101].into(), NOW + 1));
        let reply = run(&ctx, &mut book, &request(MessageType::Discover, STRANGER, vec![])).unwrap();
        assert_eq!(reply.packet, None, "a declined address is not offered");
    }

    #[test]
    fn the_clients_own_hostname_is_kept_in_its_lease_but_not_sent_back() {
        let ctx = context(DhcpMode::Full);
        let mut book = MemoryLeases::default();
        let opts = vec![DhcpOption::Hostname("stray".into())];
        let (offer, _) = sent(run(&ctx, &mut book, &request(MessageType::Discover, STRANGER, opts)));
        assert_eq!(opt(&offer, OptionCode::Hostname), None);
        assert_eq!(book.lease_of(STRANGER).unwrap().hostname.as_deref(), Some("stray"));
        let opts = vec![DhcpOption::Hostname("renamed".into())];
        let (offer, _) = sent(run(&ctx, &mut book, &request(MessageType::Discover, NODE, opts)));
        assert_eq!(opt(&offer, OptionCode::Hostname), Some(&DhcpOption::Hostname("n001".into())));
        assert_eq!(book.lease_of(NODE).unwrap().hostname.as_deref(), Some("n001"));
    }

    #[test]
    fn inform_gets_options_without_an_address() {
        let ctx = context(DhcpMode::Full);
        let mut req = request(MessageType::Inform, NODE, vec![]);
        req.set_ciaddr([10, 4, 0, 11]);
        let (ack, to) = sent(run(&ctx, &mut MemoryLeases::default(), &req));
        assert_eq!(ack.opts().msg_type(), Some(MessageType::Ack));
        assert_eq!(ack.yiaddr(), Ipv4Addr::UNSPECIFIED);
        assert_eq!(opt(&ack, OptionCode::AddressLeaseTime), None);
        assert!(opt(&ack, OptionCode::SubnetMask).is_some());
        assert_eq!(to, SocketAddrV4::new([10, 4, 0, 11].into(), 68));
    }

    #[test]
    fn relayed_requests_go_back_through_the_relay_with_option_82() {
        let mut ctx = context(DhcpMode::Full);
        ctx.relay_networks.push(RelayNetwork {
            subnet: "10.9.0.0/24".parse().unwrap(),
            router: Some([10, 9, 0, 1].into()),
            pool: Some("10.9.0.50-10.9.0.60".parse().unwrap()),
        });
        let mut msg = request(MessageType::Discover, STRANGER, vec![]);
        msg.set_giaddr([10, 9, 0, 1]);
        let mut bytes = msg.to_vec().unwrap();
        // Option 82 with a circuit id and an unusual sub-option, inserted before the end marker.
        let relay = [82, 9, 1, 3, b'e', b't', b'h', 200, 2, 0xde, 0xad];
        let end = bytes.len() - 1;
        assert_eq!(bytes[end], 255);
        bytes.splice(end..end, relay);
        let reply = respond(&bytes, &ctx, &mut MemoryLeases::default(), NOW).unwrap();
        let out = reply.packet.unwrap();
        assert_eq!(out.to, SocketAddrV4::new([10, 9, 0, 1].into(), 67));
        assert!(out.bytes.windows(relay.len()).any(|w| w == relay), "option 82 echoed byte for byte");
        let offer = Message::from_bytes(&out.bytes).unwrap();
        assert_eq!(offer.giaddr(), Ipv4Addr::new(10, 9, 0, 1));
        assert_eq!(offer.yiaddr(), Ipv4Addr::new(10, 9, 0, 50));
        assert_eq!(opt(&offer, OptionCode::Router), Some(&DhcpOption::Router(vec![[10, 9, 0, 1].into()])));

        // A relay on a network we do not know: the server's own subnet.
        let mut msg = request(MessageType::Discover, STRANGER, vec![]);
        msg.set_giaddr([172, 16, 0, 1]);
        let (offer, to) = sent(run(&ctx, &mut MemoryLeases::default(), &msg));
        assert_eq!(to, SocketAddrV4::new([172, 16, 0, 1].into(), 67));
        assert!(ctx.subnet.contains(offer.yiaddr()));
    }

    #[test]
    fn proxy_mode_answers_pxe_clients_with_boot_information_only() {
        let ctx = context(DhcpMode::Proxy);
        let mut book = MemoryLeases::default();
        let (offer, to) = sent(run(&ctx, &mut book, &request(MessageType::Discover, NODE, pxe(BIOS, 0))));
        assert_eq!(to, broadcast68());
        assert_eq!(offer.opts().msg_type(), Some(MessageType::Offer));
        assert_eq!(offer.yiaddr(), Ipv4Addr::UNSPECIFIED);
        assert_eq!(offer.siaddr(), SERVER);
        assert_eq!(file(&offer).as_deref(), Some("undionly.kpxe"));
        assert_eq!(opt(&offer, OptionCode::ClassIdentifier), Some(&DhcpOption::ClassIdentifier(b"PXEClient".to_vec())));
        assert_eq!(opt(&offer, OptionCode::VendorExtensions), Some(&DhcpOption::VendorExtensions(vec![6, 1, 8, 255])));
        assert_eq!(opt(&offer, OptionCode::ClientMachineIdentifier), pxe(BIOS, 0).get(2));
        assert_eq!(opt(&offer, OptionCode::AddressLeaseTime), None);
        assert_eq!(opt(&offer, OptionCode::SubnetMask), None);
        assert!(book.leases.is_empty());

        // Not PXE: not ours. REQUESTs on port 67 belong to the site's DHCP server.
        assert_eq!(run(&ctx, &mut book, &request(MessageType::Discover, NODE, vec![])), None);
        let req = request(MessageType::Request, NODE, pxe(BIOS, 0));
        assert_eq!(run(&ctx, &mut book, &req), None);

        // iPXE through a proxy still needs PXEClient to take the offer.
        let opts = [pxe(BIOS, 0), vec![DhcpOption::UserClass(b"iPXE".to_vec())]].concat();
        let (offer, _) = sent(run(&ctx, &mut book, &request(MessageType::Discover, NODE, opts)));
        assert_eq!(bootfile(&offer).as_deref(), Some("http://10.4.0.1/ipxe/52:54:00:aa:bb:42"));
        assert_eq!(opt(&offer, OptionCode::ClassIdentifier), Some(&DhcpOption::ClassIdentifier(b"PXEClient".to_vec())));

        // Unknown machine under "record": noted, not answered.
        let reply = run(&ctx, &mut book, &request(MessageType::Discover, STRANGER, pxe(BIOS, 0))).unwrap();
        assert_eq!(reply.packet, None);
        assert!(reply.unknown.is_some());
    }

    #[test]
    fn pxe_port_acks_with_the_same_boot_information() {
        let ctx = context(DhcpMode::Proxy);
        let mut req = request(MessageType::Request, NODE, pxe(EFI, 7));
        req.set_ciaddr([10, 4, 0, 77]);
        let from = SocketAddrV4::new([10, 4, 0, 77].into(), 68);
        let reply = respond_proxy(&req.to_vec().unwrap(), &ctx, from).unwrap();
        assert_eq!(reply.event.as_ref().unwrap().kind, DhcpEventKind::ProxyAck);
        let (ack, to) = sent(Some(reply));
        assert_eq!(to, from);
        assert_eq!(ack.opts().msg_type(), Some(MessageType::Ack));
        assert_eq!(ack.yiaddr(), Ipv4Addr::UNSPECIFIED);
        assert_eq!(ack.ciaddr(), Ipv4Addr::new(10, 4, 0, 77));
        assert_eq!(file(&ack).as_deref(), Some("snponly.efi"));
        assert_eq!(opt(&ack, OptionCode::VendorExtensions), Some(&DhcpOption::VendorExtensions(vec![6, 1, 8, 255])));
        // A DISCOVER on port 4011 is not a thing.
        let discover = request(MessageType::Discover, NODE, pxe(EFI, 7));
        assert_eq!(respond_proxy(&discover.to_vec().unwrap(), &ctx, from), None);
    }

    #[test]
    fn off_answers_nothing() {
        let ctx = context(DhcpMode::Off);
        assert_eq!(run(&ctx, &mut MemoryLeases::default(), &request(MessageType::Discover, NODE, pxe(BIOS, 0))), None);
    }

    #[test]
    fn malformed_requests_are_dropped() {
        let ctx = context(DhcpMode::Full);
        let good = request(MessageType::Discover, NODE, pxe(BIOS, 0)).to_vec().unwrap();
        let before = MALFORMED_REQUESTS.load(Ordering::Relaxed);
        let mut cases: Vec<Vec<u8>> = vec![Vec::new(), good[..100].to_vec(), good[..239].to_vec()];
        let mut reply_op = good.clone();
        reply_op[0] = 2;
        cases.push(reply_op);
        let mut no_cookie = good.clone();
        no_cookie[236] = 0;
        cases.push(no_cookie);
        let mut long_option = good[..240].to_vec();
        long_option.extend_from_slice(&[53, 1, 1, 60, 200, b'P']);
        cases.push(long_option);
        let mut bad_type_len = good[..240].to_vec();
        bad_type_len.extend_from_slice(&[53, 2, 1, 1, 255]);
        cases.push(bad_type_len);
        let mut no_type = good[..240].to_vec();
        no_type.push(255);
        cases.push(no_type);
        let mut token_ring = good.clone();
        token_ring[1] = 6;
        cases.push(token_ring);
        // Options whose dhcproto decoders assert on the length (94, 80, 81, 151) must not panic.
        let mut odd = good[..240].to_vec();
        odd.extend_from_slice(&[53, 1, 1, 94, 1, 1, 80, 2, 0, 0, 81, 0, 151, 0, 152, 1, 0, 93, 2, 0, 0, 255]);
        let reply = respond(&odd, &ctx, &mut MemoryLeases::default(), NOW);
        assert!(reply.is_some(), "unusual options are skipped, the request is still served");
        for (i, case) in cases.iter().enumerate() {
            assert_eq!(respond(case, &ctx, &mut MemoryLeases::default(), NOW), None, "case {i}");
        }
        assert!(MALFORMED_REQUESTS.load(Ordering::Relaxed) >= before + cases.len() as u64);
    }

    /// xorshift64*: a fixed-seed generator, so a failure reproduces.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    #[test]
    fn random_and_mutated_bytes_never_panic() {
        let mut rng = Rng(0x6b69_6c6e_6468_6370);
        for mode in [DhcpMode::Full, DhcpMode::Proxy] {
            let mut ctx = context(mode);
            ctx.unknown = UnknownPolicy::Boot;
            let mut book = MemoryLeases::default();
            let seeds: Vec<Vec<u8>> = [
                request(MessageType::Discover, NODE, pxe(BIOS, 0)),
                request(
                    MessageType::Request,
                    STRANGER,
                    [pxe(EFI, 7), vec![DhcpOption::UserClass(b"iPXE".to_vec())]].concat(),
                ),
                request(MessageType::Decline, STRANGER, vec![DhcpOption::RequestedIpAddress([10, 4, 0, 101].into())]),
                request(MessageType::Inform, NODE, pxe("HTTPClient:Arch:00016", 16)),
            ]
            .iter()
            .map(|m| m.to_vec().unwrap())
            .collect();
            for _ in 0..3000 {
                let len = rng.below(600);
                let noise: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
                respond(&noise, &ctx, &mut book, NOW);
                // Mutate a valid request: flip bytes in the options area, then truncate.
                let mut packet = seeds[rng.below(seeds.len())].clone();
                for _ in 0..=rng.below(8) {
                    let at = 236 + rng.below(packet.len() - 236);
                    packet[at] = rng.next() as u8;
                }
                packet.truncate(rng.below(packet.len() + 1).max(200));
                respond(&packet, &ctx, &mut book, NOW);
                respond_proxy(&packet, &ctx, SocketAddrV4::new([10, 4, 0, 9].into(), 68));
            }
        }
    }

    #[test]
    fn subnet_and_pool_parse() {
        let s: Subnet = "10.4.0.1/24".parse().unwrap();
        assert_eq!(
            (s.mask(), s.network(), s.broadcast()),
            ([255, 255, 255, 0].into(), [10, 4, 0, 0].into(), [10, 4, 0, 255].into())
        );
        assert!(s.contains([10, 4, 0, 200].into()) && !s.contains([10, 4, 1, 1].into()));
        let all: Subnet = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains([1, 2, 3, 4].into()));
        assert!("10.4.0.1/33".parse::<Subnet>().is_err());
        assert!("10.4.0.1".parse::<Subnet>().is_err());
        assert!("10.4.0.9-10.4.0.1".parse::<Pool>().is_err());
        assert_eq!("full".parse::<DhcpMode>().unwrap(), DhcpMode::Full);
    }

    /// The socket loop on loopback: a proxy REQUEST to the PXE port comes back to its sender.
    #[tokio::test]
    async fn serve_answers_on_the_pxe_port_and_stops() {
        let free_port = || std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let (port, pxe_port) = (free_port(), free_port());
        let dir = tempfile::tempdir().unwrap();
        let state = Arc::new(State::open(dir.path()).unwrap());
        let (_ctx_tx, ctx_rx) = watch::channel(Arc::new(context(DhcpMode::Proxy)));
        let (events_tx, mut events_rx) = mpsc::unbounded_channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(ctx_rx, state.clone(), None, port, Some(pxe_port), Some(events_tx), async {
            let _ = stop_rx.await;
        }));
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let req = request(MessageType::Request, NODE, pxe(BIOS, 0)).to_vec().unwrap();
        let mut buf = [0u8; 1500];
        let mut got = None;
        for _ in 0..50 {
            client.send_to(&req, ("127.0.0.1", pxe_port)).await.unwrap();
            if let Ok(Ok((n, _))) =
                tokio::time::timeout(std::time::Duration::from_millis(100), client.recv_from(&mut buf)).await
            {
                got = Some(Message::from_bytes(&buf[..n]).unwrap());
                break;
            }
        }
        let ack = got.expect("an answer on the PXE port");
        assert_eq!(file(&ack).as_deref(), Some("undionly.kpxe"));
        let event = tokio::time::timeout(std::time::Duration::from_secs(5), events_rx.recv()).await.unwrap().unwrap();
        assert_eq!(event.kind, DhcpEventKind::ProxyAck);
        stop_tx.send(()).unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(5), server).await.unwrap().unwrap().unwrap();
        assert_eq!(state.events(Some(NODE), 10).unwrap()[0].kind, "proxydhcp-ack");
    }
}
