//! DHCP and proxyDHCP decisions: which reply (if any) a request gets, which address and which boot file.
//! Pure functions of the request bytes, the context, the lease book and the time.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::atomic::{AtomicU64, Ordering};

use dhcproto::v4::{Flags, MessageType};
use serde::Serialize;
use tracing::{debug, info, warn};

use super::context::{DhcpContext, Network};
use super::leases::LeaseBook;
use super::packet::{add_boot, add_network, destination, encode, reply_to, ClientInfo, Request};
use super::{DECLINE_HOLD_SECS, DHCP_CLIENT_PORT, DHCP_SERVER_PORT, OFFER_HOLD_SECS};
use crate::net::Mac;
use crate::recipe::{DhcpMode, UnknownPolicy};
use crate::serve::state::Lease;

/// Requests dropped because they were not well-formed DHCP (counted for metrics; each is logged at debug level).
pub static MALFORMED_REQUESTS: AtomicU64 = AtomicU64::new(0);

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

/// The boot file for a client, or `None` (not a network-boot client, or an architecture kiln has no binary for).
pub fn boot_file(ctx: &DhcpContext, client: &ClientInfo, mac: Mac) -> Option<BootFile> {
    let base = ctx.http_base.trim_end_matches('/');
    if client.ipxe {
        return Some(BootFile { kind: BootKind::IpxeScript, name: format!("{base}/ipxe/{}", mac) });
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
            info!(mac = %mac, arch = ?other, vendor = ?client.vendor_class,
                "no boot file for this client architecture");
            return None;
        }
    };
    let Some(file) = file else {
        info!(mac = %mac, arch = ?client.arch, "no boot file configured for this architecture");
        return None;
    };
    let name = match kind {
        BootKind::Http => format!("{base}/{}", file.name.trim_start_matches('/')),
        _ => file.name.clone(),
    };
    Some(BootFile { kind, name })
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
    pub mac: Mac,
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
    pub mac: Mac,
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
    /// In proxy mode: a node asked the site's DHCP server for this address (its DHCPREQUEST is broadcast), so
    /// the node is there; the server lets that address fetch the node's overlay.
    pub observed: Option<(Mac, Ipv4Addr)>,
}

/// Decides the answer to one DHCP request received on port 67. `None`: nothing to send and nothing to note
/// (malformed, not for us, or from an unknown machine under `unknown = "ignore"`).
pub fn respond(req: &[u8], ctx: &DhcpContext, leases: &mut dyn LeaseBook, now: u64) -> Option<Reply> {
    let request = parse_or_count(req)?;
    match ctx.mode {
        DhcpMode::Off => None,
        DhcpMode::Proxy => proxy_offer(&request, ctx).or_else(|| proxy_observe(&request, ctx)),
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
    Some(Reply { observed: None, packet: encode(&msg, to), unknown: None, event: Some(event) })
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
    if !(known || ctx.unknown.boots()) {
        return None;
    }
    boot_file(ctx, &request.client, request.mac)
}

/// proxyDHCP: a node's DHCPREQUEST to the site's server names the address it takes (option 50, or `ciaddr`
/// when renewing). Nothing is sent; the address is noted for the node.
fn proxy_observe(request: &Request, ctx: &DhcpContext) -> Option<Reply> {
    if request.kind != MessageType::Request || !ctx.is_known(request.mac) {
        return None;
    }
    let ciaddr = request.msg.ciaddr();
    let ip = request.requested_ip.or((!ciaddr.is_unspecified()).then_some(ciaddr))?;
    Some(Reply { observed: Some((request.mac, ip)), packet: None, unknown: None, event: None })
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
        return unknown.map(|u| Reply { observed: None, packet: None, unknown: Some(u), event: None });
    };
    let mut msg = reply_to(request, MessageType::Offer, ctx);
    add_boot(&mut msg, request, ctx, &boot, true);
    let event = DhcpEvent { mac: request.mac, kind: DhcpEventKind::ProxyOffer, ip: None, boot_file: Some(boot), known };
    Some(Reply { observed: None, packet: encode(&msg, destination(request)), unknown, event: Some(event) })
}

/// Full (authoritative) mode.
fn full(request: &Request, ctx: &DhcpContext, book: &mut dyn LeaseBook, now: u64) -> Option<Reply> {
    let mac = request.mac;
    let known = ctx.is_known(mac);
    if !known && ctx.unknown == UnknownPolicy::Ignore {
        debug!(mac = %mac, "ignoring an unknown machine");
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
            warn!(mac = %mac, "not answering: {e:#}");
            None
        }
    };
    match request.kind {
        MessageType::Discover => {
            let Some(ip) = choose_address(ctx, net, mac, &*book, now) else {
                warn!(mac = %mac, subnet = %net.subnet.network(), "no address to offer");
                return unknown.map(|u| Reply { observed: None, packet: None, unknown: Some(u), event: None });
            };
            // Hold the address for this client (without shortening a lease it already has on it).
            let expires = match book.lease_of(mac) {
                Some(old) if old.ip == ip => old.expires.max(now + OFFER_HOLD_SECS),
                _ => now + OFFER_HOLD_SECS,
            };
            if let Err(e) = book.hold(Lease { mac, ip, expires, hostname: lease_name }) {
                warn!(mac = %mac, "not answering: {e:#}");
                return None;
            }
            let mut msg = reply_to(request, MessageType::Offer, ctx);
            msg.set_yiaddr(ip);
            add_network(&mut msg, ctx, net, hostname.as_deref(), true);
            if let Some(boot) = &boot {
                add_boot(&mut msg, request, ctx, boot, false);
            }
            info!(mac = %mac, %ip, boot = ?boot.as_ref().map(|b| &b.name), "DHCPOFFER");
            Some(Reply {
                observed: None,
                packet: encode(&msg, destination(request)),
                unknown,
                event: event(DhcpEventKind::Offer, Some(ip), boot),
            })
        }
        MessageType::Request => {
            if request.server_id.is_some_and(|id| id != ctx.server_ip) {
                debug!(mac = %mac, "client chose another DHCP server");
                return None;
            }
            let ciaddr = request.msg.ciaddr();
            let requested = request.requested_ip.or((!ciaddr.is_unspecified()).then_some(ciaddr))?;
            // Authoritative only for clients we give addresses to: a client we have nothing for is left alone.
            let expected = choose_address(ctx, net, mac, &*book, now)?;
            if requested != expected {
                info!(mac = %mac, %requested, %expected, "DHCPNAK");
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
                    observed: None,
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
            info!(mac = %mac, ip = %expected, boot = ?boot.as_ref().map(|b| &b.name), "DHCPACK");
            Some(Reply {
                observed: None,
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
            info!(mac = %mac, %ip, "DHCPRELEASE");
            Some(Reply {
                observed: None,
                packet: None,
                unknown: None,
                event: event(DhcpEventKind::Release, Some(ip), None),
            })
        }
        MessageType::Decline => {
            let ip = request.requested_ip?;
            let lease = book.lease_of(mac).filter(|l| l.ip == ip)?;
            warn!(mac = %mac, %ip, "DHCPDECLINE: the address is in use by another machine");
            if let Err(e) = book.decline(ip, now + DECLINE_HOLD_SECS, now) {
                warn!("{e:#}");
            }
            persist(book, Lease { expires: now, ..lease })?;
            Some(Reply {
                observed: None,
                packet: None,
                unknown: None,
                event: event(DhcpEventKind::Decline, Some(ip), None),
            })
        }
        MessageType::Inform => {
            let mut msg = reply_to(request, MessageType::Ack, ctx);
            msg.set_ciaddr(request.msg.ciaddr());
            add_network(&mut msg, ctx, net, hostname.as_deref(), false);
            if let Some(boot) = &boot {
                add_boot(&mut msg, request, ctx, boot, false);
            }
            Some(Reply {
                observed: None,
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
fn choose_address(ctx: &DhcpContext, net: Network<'_>, mac: Mac, book: &dyn LeaseBook, now: u64) -> Option<Ipv4Addr> {
    let held_by_other = |ip: Ipv4Addr| book.lease_on(ip).is_some_and(|l| l.mac != mac && l.active(now));
    if let Some(reservation) = ctx.reservations.get(&mac) {
        let ip = reservation.ip;
        if net.subnet.contains(ip) {
            if held_by_other(ip) {
                warn!(mac = %mac, %ip, "the reserved address is leased to another machine");
                return None;
            }
            if book.is_declined(ip, now) {
                warn!(mac = %mac, %ip, "the reserved address was declined (in use?)");
                return None;
            }
            return Some(ip);
        }
        debug!(mac = %mac, %ip, subnet = %net.subnet.network(), "reservation is on another subnet");
    }
    if !ctx.is_known(mac) && ctx.unknown == UnknownPolicy::Ignore {
        return None;
    }
    let pool = net.pool?;
    let usable = |ip: Ipv4Addr| {
        pool.contains(ip)
            && net.subnet.contains(ip)
            && (net.subnet.prefix >= 31 || (ip != net.subnet.network() && ip != net.subnet.broadcast()))
            && ip != ctx.server_ip
            && Some(ip) != net.router
            && ctx.reserved_for(ip).is_none_or(|holder| holder == mac)
            && !book.is_declined(ip, now)
            && !held_by_other(ip)
    };
    if let Some(previous) = book.lease_of(mac).map(|l| l.ip).filter(|ip| usable(*ip)) {
        return Some(previous);
    }
    // An address never leased, lowest first.
    let mut from = pool.start;
    while let Some(fresh) = book.first_unrecorded(pool, from) {
        if usable(fresh) {
            return Some(fresh);
        }
        match u32::from(fresh).checked_add(1) {
            Some(next) if Ipv4Addr::from(next) <= pool.end => from = Ipv4Addr::from(next),
            _ => break,
        }
    }
    // Else one whose lease expired.
    pool.addresses().find(|ip| usable(*ip))
}
