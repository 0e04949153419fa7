//! The lease book DHCP decisions read and write: the state database (`&State`) in the server, memory in tests.

use std::collections::HashMap;
use std::net::Ipv4Addr;

use anyhow::Result;

use crate::net::{Mac, Pool};
use crate::serve::state::{Lease, StagedLease, State};

/// The client-side state of leases, as the decisions see it. [`State`] (through `&State`) keeps it on disk;
/// [`MemoryLeases`] in memory.
pub trait LeaseBook {
    /// The lease recorded for `mac`, possibly expired.
    fn lease_of(&self, mac: Mac) -> Option<Lease>;
    /// The lease recorded on `ip`, possibly expired.
    fn lease_on(&self, ip: Ipv4Addr) -> Option<Lease>;
    /// Records `lease` durably (a DHCPACK, RELEASE or DECLINE), replacing the MAC's previous one and any other
    /// lease on the same address.
    fn put(&mut self, lease: Lease) -> Result<()>;
    /// Sets `lease` aside without making it durable (a DHCPOFFER's hold on the address).
    fn hold(&mut self, lease: Lease) -> Result<()>;
    /// Sets `ip` aside until `until` (a client found it in use).
    fn decline(&mut self, ip: Ipv4Addr, until: u64, now: u64) -> Result<()>;
    fn is_declined(&self, ip: Ipv4Addr, now: u64) -> bool;
    /// The first address of `pool` at or after `from` that no lease names (current, expired or held).
    fn first_unrecorded(&self, pool: &Pool, from: Ipv4Addr) -> Option<Ipv4Addr> {
        (u32::from(from.max(pool.start))..=u32::from(pool.end))
            .map(Ipv4Addr::from)
            .find(|ip| self.lease_on(*ip).is_none())
    }
}

impl LeaseBook for &State {
    fn lease_of(&self, mac: Mac) -> Option<Lease> {
        self.lease(mac).ok().flatten()
    }
    fn lease_on(&self, ip: Ipv4Addr) -> Option<Lease> {
        State::lease_on(self, ip)
    }
    fn put(&mut self, lease: Lease) -> Result<()> {
        self.put_lease(&lease)
    }
    fn hold(&mut self, lease: Lease) -> Result<()> {
        self.stage_lease(&lease);
        Ok(())
    }
    fn decline(&mut self, ip: Ipv4Addr, until: u64, now: u64) -> Result<()> {
        State::decline(self, ip, until, now)
    }
    fn is_declined(&self, ip: Ipv4Addr, now: u64) -> bool {
        State::is_declined(self, ip, now)
    }
    fn first_unrecorded(&self, pool: &Pool, from: Ipv4Addr) -> Option<Ipv4Addr> {
        State::first_unrecorded(self, pool, from)
    }
}

/// The server's book for one batch of requests: every decision sees the leases decided before it at once, and
/// the durable ones are written together ([`State::commit_leases`]) before any reply of the batch leaves.
pub struct BatchBook<'a> {
    pub state: &'a State,
    pub staged: Vec<StagedLease>,
}

impl LeaseBook for BatchBook<'_> {
    fn lease_of(&self, mac: Mac) -> Option<Lease> {
        self.state.lease(mac).ok().flatten()
    }
    fn lease_on(&self, ip: Ipv4Addr) -> Option<Lease> {
        self.state.lease_on(ip)
    }
    fn put(&mut self, lease: Lease) -> Result<()> {
        self.staged.push(self.state.stage_lease(&lease));
        Ok(())
    }
    fn hold(&mut self, lease: Lease) -> Result<()> {
        self.state.stage_lease(&lease);
        Ok(())
    }
    fn decline(&mut self, ip: Ipv4Addr, until: u64, now: u64) -> Result<()> {
        self.state.decline(ip, until, now)
    }
    fn is_declined(&self, ip: Ipv4Addr, now: u64) -> bool {
        self.state.is_declined(ip, now)
    }
    fn first_unrecorded(&self, pool: &Pool, from: Ipv4Addr) -> Option<Ipv4Addr> {
        self.state.first_unrecorded(pool, from)
    }
}

/// Leases in memory only (tests, dry runs).
#[derive(Debug, Clone, Default)]
pub struct MemoryLeases {
    pub leases: HashMap<Mac, Lease>,
    pub declined: HashMap<Ipv4Addr, u64>,
}

impl LeaseBook for MemoryLeases {
    fn lease_of(&self, mac: Mac) -> Option<Lease> {
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
    fn hold(&mut self, lease: Lease) -> Result<()> {
        self.put(lease)
    }
    fn decline(&mut self, ip: Ipv4Addr, until: u64, _now: u64) -> Result<()> {
        self.declined.insert(ip, until);
        Ok(())
    }
    fn is_declined(&self, ip: Ipv4Addr, now: u64) -> bool {
        self.declined.get(&ip).is_some_and(|until| *until > now)
    }
}
