//! The simulated clients' DHCP side: one socket on port 68 for every client (a server answers a client that has no
//! address yet by broadcast), replies handed to the waiting client by transaction id, and the
//! DISCOVER → OFFER → REQUEST → ACK exchange (RFC 2131) as PXE firmware and as iPXE do it: option 93 (RFC 4578,
//! arch 0 = BIOS), 94, 97, the PXE vendor class, and for iPXE the user class `iPXE` (option 77) and option 175.
//!
//! Each exchange retransmits on silence with the waits it is given (4, 8, 16, 32 s for a PXE ROM, as the PXE 2.1
//! specification has it; 1, 2, 4, 8 s for iPXE) and gives up after the last one, as firmware does.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use dhcproto::v4::{Architecture, DhcpOption, Flags, HType, Message, MessageType, Opcode, OptionCode, UnknownOption};
use dhcproto::{Decodable, Encodable};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::time::Instant;

const CLIENT_PORT: u16 = 68;
/// What a BIOS PXE ROM (UNDI 2.1) says it is; iPXE's undionly.kpxe says the same.
pub const PXE_VENDOR_CLASS: &str = "PXEClient:Arch:00000:UNDI:002001";
/// iPXE's encapsulated options (175): feature flags for HTTP (19), bzImage (24), PXE (16) and DNS (17), as iPXE
/// sends them; servers only look for the option's presence.
const IPXE_FEATURES: [u8; 12] = [19, 1, 1, 24, 1, 1, 16, 1, 2, 17, 1, 1];
/// Times an exchange starts again after a NAK before the client gives up.
const MAX_RESTARTS: u32 = 3;
/// Replies kept per waiting exchange; more are dropped (a client only ever needs one at a time).
const QUEUE: usize = 8;

/// Who is asking: the PXE ROM, or the iPXE it loaded (same MAC, same architecture, different classes).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Firmware {
    Pxe,
    Ipxe,
}

/// The shared client socket and the exchanges waiting for replies.
pub struct Hub {
    socket: UdpSocket,
    server_port: u16,
    waiting: Mutex<HashMap<u32, mpsc::Sender<Vec<u8>>>>,
    /// Replies that no exchange was waiting for (late answers to an exchange that gave up, or another client's).
    pub stray: AtomicU64,
}

impl Hub {
    /// Binds 0.0.0.0:68 on `interface` (broadcasts leave by it; there is no default route in the clients' namespace).
    pub fn bind(interface: &str, server_port: u16) -> Result<Arc<Hub>> {
        use socket2::{Domain, Protocol, Socket, Type};
        let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).context("creating a UDP socket")?;
        socket.set_reuse_address(true).context("setting SO_REUSEADDR")?;
        socket.set_broadcast(true).context("setting SO_BROADCAST")?;
        socket
            .bind_device(Some(interface.as_bytes()))
            .with_context(|| format!("binding the DHCP client socket to {interface:?} (does it exist here?)"))?;
        // A storm's replies arrive in bursts; the kernel caps this at net.core.rmem_max.
        let _ = socket.set_recv_buffer_size(16 << 20);
        socket.set_nonblocking(true)?;
        let addr = SocketAddr::from((Ipv4Addr::UNSPECIFIED, CLIENT_PORT));
        socket.bind(&addr.into()).context("binding UDP port 68 (is a DHCP client running in this namespace?)")?;
        let socket = UdpSocket::from_std(socket.into()).context("registering the DHCP socket")?;
        Ok(Arc::new(Hub { socket, server_port, waiting: Mutex::new(HashMap::new()), stray: AtomicU64::new(0) }))
    }

    /// Hands every reply to the exchange waiting for its transaction id. Runs until the generator drops it.
    pub async fn run(self: Arc<Self>) {
        let mut buf = vec![0u8; 4096];
        loop {
            let n = match self.socket.recv_from(&mut buf).await {
                Ok((n, _)) => n,
                Err(_) => {
                    tokio::task::yield_now().await;
                    continue;
                }
            };
            // op = BOOTREPLY and a whole fixed header, else it is nobody's.
            if n < 240 || buf[0] != 2 {
                self.stray.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let xid = u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]);
            let waiter = self.waiting.lock().unwrap_or_else(|e| e.into_inner()).get(&xid).cloned();
            match waiter {
                Some(tx) => {
                    let _ = tx.try_send(buf[..n].to_vec());
                }
                None => {
                    self.stray.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    fn register(&self, xid: u32) -> Waiter<'_> {
        let (tx, rx) = mpsc::channel(QUEUE);
        self.waiting.lock().unwrap_or_else(|e| e.into_inner()).insert(xid, tx);
        Waiter { hub: self, xid, rx }
    }

    async fn broadcast(&self, msg: &Message) -> Result<(), String> {
        let bytes = msg.to_vec().map_err(|e| format!("encoding a DHCP message: {e}"))?;
        let to = SocketAddrV4::new(Ipv4Addr::BROADCAST, self.server_port);
        self.socket.send_to(&bytes, to).await.map(drop).map_err(|e| format!("sending a DHCP message: {e}"))
    }
}

/// An exchange waiting for replies; unregisters itself when dropped.
struct Waiter<'a> {
    hub: &'a Hub,
    xid: u32,
    rx: mpsc::Receiver<Vec<u8>>,
}

impl Waiter<'_> {
    async fn next(&mut self, until: Instant) -> Option<Vec<u8>> {
        tokio::time::timeout_at(until, self.rx.recv()).await.ok().flatten()
    }
}

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        self.hub.waiting.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.xid);
    }
}

/// What an exchange ended with.
#[derive(Debug, Clone)]
pub struct Lease {
    pub ip: Ipv4Addr,
    /// Where the boot file is: `siaddr`, else option 66, else the server identifier.
    pub next_server: Ipv4Addr,
    pub boot_file: String,
    /// DISCOVERs and REQUESTs sent (more than 2 means retransmissions or restarts).
    pub sends: u32,
    /// NAKs that made the exchange start again.
    pub naks: u32,
}

/// One client's identity on the wire.
pub struct Client {
    pub mac: [u8; 6],
    /// The SMBIOS UUID sent as option 97.
    pub uuid: [u8; 16],
}

impl Client {
    fn message(&self, xid: u32, kind: MessageType, fw: Firmware, secs: u16) -> Message {
        let zero = Ipv4Addr::UNSPECIFIED;
        let mut msg = Message::new_with_id(xid, zero, zero, zero, zero, &self.mac);
        msg.set_opcode(Opcode::BootRequest).set_htype(HType::Eth).set_secs(secs);
        // PXE ROMs and iPXE both ask for broadcast replies: they cannot take unicast before they have an address.
        msg.set_flags(Flags::default().set_broadcast());
        let opts = msg.opts_mut();
        opts.insert(DhcpOption::MessageType(kind));
        opts.insert(DhcpOption::MaxMessageSize(if fw == Firmware::Pxe { 1260 } else { 1472 }));
        let wanted: Vec<OptionCode> =
            [1u8, 3, 6, 12, 15, 17, 26, 28, 43, 54, 60, 66, 67, 119, 128, 129, 130, 131, 132, 133, 134, 135, 175]
                .into_iter()
                .map(OptionCode::from)
                .collect();
        opts.insert(DhcpOption::ParameterRequestList(wanted));
        opts.insert(DhcpOption::ClientSystemArchitecture(Architecture::X86_Bios));
        opts.insert(DhcpOption::ClientNetworkInterface(1, 2, 1));
        let mut machine = vec![0u8];
        machine.extend_from_slice(&self.uuid);
        opts.insert(DhcpOption::ClientMachineIdentifier(machine));
        opts.insert(DhcpOption::ClassIdentifier(PXE_VENDOR_CLASS.as_bytes().to_vec()));
        if fw == Firmware::Ipxe {
            let mut id = vec![1u8];
            id.extend_from_slice(&self.mac);
            opts.insert(DhcpOption::ClientIdentifier(id));
            opts.insert(DhcpOption::UserClass(b"iPXE".to_vec()));
            opts.insert(DhcpOption::Unknown(UnknownOption::new(OptionCode::from(175), IPXE_FEATURES.to_vec())));
        }
        msg
    }

    /// A reply to this client of the wanted type, or `None` for anything else.
    fn decode(&self, bytes: &[u8], wanted: &[MessageType]) -> Option<Message> {
        let msg = Message::decode(&mut dhcproto::Decoder::new(bytes)).ok()?;
        if msg.opcode() != Opcode::BootReply || msg.chaddr().get(..6) != Some(&self.mac[..]) {
            return None;
        }
        let kind = msg.opts().msg_type()?;
        wanted.contains(&kind).then_some(msg)
    }

    /// DISCOVER until an OFFER with an address and a boot file comes, then REQUEST it until ACK, each step with
    /// `waits` (one send per wait); after a NAK the whole exchange starts again (RFC 2131 3.1), at most
    /// `MAX_RESTARTS` times. `xid` must be unique among the exchanges running at once.
    pub async fn exchange(&self, hub: &Hub, xid: u32, fw: Firmware, waits: &[Duration]) -> Result<Lease, String> {
        let mut waiter = hub.register(xid);
        let started = Instant::now();
        let mut sends = 0u32;
        let mut naks = 0u32;
        loop {
            match self.attempt(hub, &mut waiter, started, fw, waits, &mut sends).await? {
                Ok(mut lease) => {
                    lease.sends = sends;
                    lease.naks = naks;
                    return Ok(lease);
                }
                Err(_) if naks < MAX_RESTARTS => naks += 1,
                Err(ip) => return Err(format!("DHCPNAK for {ip}, {} times", naks + 1)),
            }
        }
    }

    /// One DISCOVER..ACK round: `Ok(Err(ip))` when the server said NAK to `ip`.
    async fn attempt(
        &self,
        hub: &Hub,
        waiter: &mut Waiter<'_>,
        started: Instant,
        fw: Firmware,
        waits: &[Duration],
        sends: &mut u32,
    ) -> Result<Result<Lease, Ipv4Addr>, String> {
        let xid = waiter.xid;
        let secs = || started.elapsed().as_secs().min(u64::from(u16::MAX)) as u16;
        let mut without_boot_file = 0u32;
        let mut offer = None;
        'discover: for wait in waits {
            hub.broadcast(&self.message(xid, MessageType::Discover, fw, secs())).await?;
            *sends += 1;
            let until = Instant::now() + *wait;
            while let Some(bytes) = waiter.next(until).await {
                let Some(msg) = self.decode(&bytes, &[MessageType::Offer]) else { continue };
                if msg.yiaddr().is_unspecified() {
                    continue;
                }
                if boot_file(&msg).is_none() {
                    // Firmware waits for an offer that says what to boot.
                    without_boot_file += 1;
                    continue;
                }
                offer = Some(msg);
                break 'discover;
            }
        }
        let Some(offer) = offer else {
            let extra = if without_boot_file > 0 {
                format!(" ({without_boot_file} offers named no boot file)")
            } else {
                String::new()
            };
            return Err(format!("no DHCPOFFER after {} DISCOVERs{extra}", waits.len()));
        };
        let Some(DhcpOption::ServerIdentifier(server_id)) = offer.opts().get(OptionCode::ServerIdentifier).cloned()
        else {
            return Err("the DHCPOFFER has no server identifier (option 54)".into());
        };
        let ip = offer.yiaddr();
        let mut request = self.message(xid, MessageType::Request, fw, secs());
        request.opts_mut().insert(DhcpOption::ServerIdentifier(server_id));
        request.opts_mut().insert(DhcpOption::RequestedIpAddress(ip));
        for wait in waits {
            request.set_secs(secs());
            hub.broadcast(&request).await?;
            *sends += 1;
            let until = Instant::now() + *wait;
            while let Some(bytes) = waiter.next(until).await {
                let Some(msg) = self.decode(&bytes, &[MessageType::Ack, MessageType::Nak]) else { continue };
                let from = msg.opts().get(OptionCode::ServerIdentifier);
                if from.is_some_and(|o| *o != DhcpOption::ServerIdentifier(server_id)) {
                    continue;
                }
                if msg.opts().msg_type() == Some(MessageType::Nak) {
                    return Ok(Err(ip));
                }
                if msg.yiaddr() != ip {
                    return Err(format!("DHCPACK for {} after requesting {ip}", msg.yiaddr()));
                }
                let boot = boot_file(&msg).or_else(|| boot_file(&offer)).unwrap_or_default();
                let next_server = next_server(&msg, server_id);
                return Ok(Ok(Lease { ip, next_server, boot_file: boot, sends: 0, naks: 0 }));
            }
        }
        Err(format!("no DHCPACK for {ip} after {} REQUESTs", waits.len()))
    }
}

/// The boot file: option 67, else the `file` field (either may carry trailing NULs).
fn boot_file(msg: &Message) -> Option<String> {
    let from_option = match msg.opts().get(OptionCode::BootfileName) {
        Some(DhcpOption::BootfileName(b)) => Some(b.clone()),
        _ => None,
    };
    let raw = from_option.or_else(|| msg.fname().map(<[u8]>::to_vec))?;
    let text = String::from_utf8_lossy(&raw).trim_end_matches('\0').trim().to_string();
    (!text.is_empty()).then_some(text)
}

fn next_server(msg: &Message, server_id: Ipv4Addr) -> Ipv4Addr {
    if !msg.siaddr().is_unspecified() {
        return msg.siaddr();
    }
    if let Some(DhcpOption::TFTPServerName(name)) = msg.opts().get(OptionCode::TFTPServerName) {
        if let Ok(ip) = String::from_utf8_lossy(name).trim_end_matches('\0').parse() {
            return ip;
        }
    }
    server_id
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_file_prefers_option_67_and_drops_nuls() {
        let client = Client { mac: [2, 0, 0, 0, 0, 1], uuid: [0; 16] };
        let mut msg = client.message(7, MessageType::Offer, Firmware::Pxe, 0);
        assert_eq!(boot_file(&msg), None);
        msg.set_fname_str("undionly.kpxe\0");
        assert_eq!(boot_file(&msg).as_deref(), Some("undionly.kpxe"));
        msg.opts_mut().insert(DhcpOption::BootfileName(b"http://10.5.0.1/ipxe/boot\0".to_vec()));
        assert_eq!(boot_file(&msg).as_deref(), Some("http://10.5.0.1/ipxe/boot"));
    }
}
