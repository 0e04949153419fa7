//! What DHCP decisions depend on: the server's network, the nodes' reservations, the pool, relayed networks,
//! the firmware files and the unknown-machine policy. Built from the site; replaced whole on reload.

use std::collections::{HashMap, HashSet};
use std::net::Ipv4Addr;

use crate::net::{Mac, Pool, Subnet};
use crate::recipe::{DhcpMode, UnknownPolicy};
use crate::serve::firmware::BootFiles;

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
    pub reservations: HashMap<Mac, Reservation>,
    /// Addresses for machines without a reservation on the server's subnet.
    pub pool: Option<Pool>,
    /// Other subnets, served through relays.
    pub relay_networks: Vec<RelayNetwork>,
    pub boot_files: BootFiles,
    /// Base of URLs to the HTTP server, e.g. `http://10.4.0.1` or `http://10.4.0.1:8080` (no trailing slash).
    pub http_base: String,
    pub unknown: UnknownPolicy,
    /// MACs of every node in the node list (with or without a reservation).
    pub known: HashSet<Mac>,
    /// `reservations` by address, built on first use.
    reserved_ips: std::sync::OnceLock<HashMap<Ipv4Addr, Mac>>,
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
            reserved_ips: std::sync::OnceLock::new(),
        }
    }

    /// The node `ip` is reserved for, if any. Indexed on first use (the context is built whole and replaced on
    /// reload, never changed in place while serving), so a site of thousands of nodes costs one lookup per
    /// address.
    pub(super) fn reserved_for(&self, ip: Ipv4Addr) -> Option<Mac> {
        let index = self.reserved_ips.get_or_init(|| self.reservations.iter().map(|(mac, r)| (r.ip, *mac)).collect());
        index.get(&ip).copied()
    }

    pub(super) fn is_known(&self, mac: Mac) -> bool {
        self.known.contains(&mac) || self.reservations.contains_key(&mac)
    }

    /// The network a request belongs to: the relay's, else the one holding the client's address, else ours.
    pub(super) fn network_for(&self, giaddr: Ipv4Addr, ciaddr: Ipv4Addr) -> Network<'_> {
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
pub(super) struct Network<'a> {
    pub(super) subnet: Subnet,
    pub(super) router: Option<Ipv4Addr>,
    pub(super) pool: Option<&'a Pool>,
}
