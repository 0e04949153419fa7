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
//! The module is laid out by concern: [`packet`] decodes requests and builds replies (pure, on bytes),
//! [`context`] holds what decisions depend on, [`decide`] makes them ([`respond`], [`respond_proxy`]: pure
//! functions of a packet, the context and the leases), [`leases`] is the lease book they read and write, and
//! [`server`] is the socket loop.

pub mod context;
pub mod decide;
pub mod leases;
pub mod packet;
pub mod server;

#[cfg(test)]
mod tests;

pub use context::{DhcpContext, RelayNetwork, Reservation};
pub use decide::{
    boot_file, respond, respond_proxy, BootFile, BootKind, DhcpEvent, DhcpEventKind, Outgoing, Reply, UnknownClient,
};
pub use leases::{LeaseBook, MemoryLeases};
pub use packet::ClientInfo;
pub use server::{serve, serve_on, Sockets};

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
