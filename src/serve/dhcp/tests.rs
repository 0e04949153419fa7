//! Decisions tested on packet bytes, and the socket loop on loopback.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use dhcproto::v4::{DhcpOption, Message, MessageType, Opcode, OptionCode, UnknownOption};
use dhcproto::{Decodable, Encodable};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch};

use super::decide::MALFORMED_REQUESTS;
use super::*;
use crate::net::{Mac, Pool, Subnet};
use crate::recipe::{DhcpMode, UnknownPolicy};
use crate::serve::firmware::BootFiles;
use crate::serve::state::{Lease, State};

const SERVER: Ipv4Addr = Ipv4Addr::new(10, 4, 0, 1);
const NODE: Mac = Mac([0x52, 0x54, 0, 0xaa, 0xbb, 0x42]);
const OTHER_NODE: Mac = Mac([0x52, 0x54, 0, 0xaa, 0xbb, 0x43]);
const STRANGER: Mac = Mac([0x52, 0x54, 0, 0x99, 0x99, 0x01]);
const STRANGER_2: Mac = Mac([0x52, 0x54, 0, 0x99, 0x99, 0x02]);
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
    ctx.boot_files = BootFiles::from_paths(
        Some("/srv/undionly.kpxe".into()),
        Some("/srv/snponly.efi".into()),
        Some("/srv/arm64/snponly.efi".into()),
    );
    ctx
}

fn request(kind: MessageType, mac: Mac, opts: Vec<DhcpOption>) -> Message {
    let z = Ipv4Addr::UNSPECIFIED;
    let mut msg = Message::new_with_id(0x1234_5678, z, z, z, z, &mac.0);
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
    assert_eq!(offer.chaddr(), &NODE.0);
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
    let by_175 =
        [pxe(EFI, 7), vec![DhcpOption::Unknown(UnknownOption::new(OptionCode::from(175), vec![19, 1, 1, 23, 1, 1]))]]
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
    assert_eq!(reply.unknown, Some(UnknownClient { mac: STRANGER, arch: Some(0), vendor_class: Some(BIOS.into()) }));
    let (offer, _) = sent(Some(reply));
    // 10.4.0.100 is reserved for another node.
    assert_eq!(offer.yiaddr(), Ipv4Addr::new(10, 4, 0, 101));
    assert_eq!(bootfile(&offer), None, "record: an address but no boot file");

    ctx.unknown = UnknownPolicy::Boot("compute".into());
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
    let third = Mac([0x52, 0x54, 0, 0x99, 0x99, 0x03]);
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
    let third = Mac([0x52, 0x54, 0, 0x99, 0x99, 0x03]);
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
fn proxy_mode_notes_the_address_a_node_takes_from_the_sites_server() {
    let ctx = context(DhcpMode::Proxy);
    let mut book = MemoryLeases::default();
    let taken = vec![DhcpOption::RequestedIpAddress([10, 4, 0, 57].into())];
    let reply = run(&ctx, &mut book, &request(MessageType::Request, NODE, taken.clone())).unwrap();
    assert_eq!((reply.packet, reply.event, reply.observed), (None, None, Some((NODE, [10, 4, 0, 57].into()))));
    // Only nodes of the recipe are noted: the server's memory of them is bounded by the node list.
    assert_eq!(run(&ctx, &mut book, &request(MessageType::Request, STRANGER, taken)), None);
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
        ctx.unknown = UnknownPolicy::Boot("compute".into());
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
    let (events_tx, mut events_rx) = mpsc::channel(64);
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
