//! The boot server's persistent state: leases, discovered machines, boot events.
//!
//! One embedded database, `<state dir>/state.redb` (redb: copy-on-write B-trees, every write a transaction, safe
//! against a crash mid-write). Leases are committed durably before the DHCPACK that announces them leaves the
//! server; discovery records and boot events are written with eventual durability (they survive a restart of the
//! process, an unlucky power cut may lose the last few). Values are JSON so a later kiln reads an older file.
//!
//! The database holds an exclusive lock: while `kiln serve` runs, other processes cannot open it.
//! Leases are also cached in memory (the DHCP server asks about them on every packet).

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use anyhow::{bail, Context, Result};
use redb::{Database, Durability, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::net::Mac;

/// Boot events kept per MAC; older ones are dropped as new ones arrive.
pub const EVENTS_PER_MAC: u64 = 1000;

/// MAC (6 bytes) → JSON [`Lease`].
const LEASES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("leases");
/// MAC → JSON [`Discovered`].
const DISCOVERED: TableDefinition<&[u8], &[u8]> = TableDefinition::new("discovered");
/// MAC (6 bytes) ++ per-MAC sequence number (8 bytes, big endian) → JSON [`BootEvent`].
const EVENTS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("events");
/// Global event sequence number → key in [`EVENTS`]: the latest events of all machines without a full scan.
const EVENT_ORDER: TableDefinition<u64, &[u8]> = TableDefinition::new("event_order");
/// MAC → next per-MAC event sequence number.
const EVENT_SEQ: TableDefinition<&[u8], u64> = TableDefinition::new("event_seq");
/// IPv4 address (as u32) → unix time until which it must not be offered (a client declined it).
const DECLINED: TableDefinition<u32, u64> = TableDefinition::new("declined");
/// Counters: "events" → the global event sequence number.
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// An address given to a machine by the DHCP server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub mac: Mac,
    pub ip: Ipv4Addr,
    /// Unix seconds; the address is free for others after this.
    pub expires: u64,
    pub hostname: Option<String>,
}

impl Lease {
    /// Whether the lease still binds its address at `now`.
    pub fn active(&self, now: u64) -> bool {
        self.expires > now
    }
}

/// A machine that asked for boot service without being in the node list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Discovered {
    pub mac: Mac,
    /// Client system architecture (DHCP option 93, RFC 4578), from the last request that had one.
    pub arch: Option<u16>,
    /// Vendor class identifier (DHCP option 60), e.g. `PXEClient:Arch:00007:UNDI:003016`.
    pub vendor_class: Option<String>,
    pub first_seen: u64,
    pub last_seen: u64,
    /// How many times it was seen.
    pub count: u64,
}

/// One step of a machine's boot, e.g. `dhcp-ack` with detail `10.4.0.11 undionly.kpxe`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootEvent {
    pub mac: Mac,
    /// Unix seconds.
    pub time: u64,
    pub kind: String,
    pub detail: String,
    /// Orders events across machines (strictly increasing).
    pub seq: u64,
}

/// The persistent state of one boot server.
pub struct State {
    db: Database,
    path: PathBuf,
    /// Every lease on disk.
    leases: Mutex<LeaseCache>,
    /// Declined addresses and the time until which they are not offered.
    declined: Mutex<HashMap<Ipv4Addr, u64>>,
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("State").field("path", &self.path).finish_non_exhaustive()
    }
}

impl State {
    /// Opens (creating if needed) `<dir>/state.redb`.
    pub fn open(dir: &Path) -> Result<State> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating state directory {}", dir.display()))?;
        let path = dir.join("state.redb");
        let db = match Database::create(&path) {
            Ok(db) => db,
            Err(redb::DatabaseError::DatabaseAlreadyOpen) => bail!(
                "opening {}: the database is in use by another process (is `kiln serve` running with this state \
                 directory?)",
                path.display()
            ),
            Err(e @ (redb::DatabaseError::Storage(_) | redb::DatabaseError::UpgradeRequired(_))) => bail!(
                "opening {}: {e}: the file is damaged or not a kiln state database; move it aside (mv {0} \
                 {0}.broken) and kiln serve starts with empty state (the leases, discovered machines and boot \
                 events it held are forgotten)",
                path.display()
            ),
            Err(e) => return Err(e).with_context(|| format!("opening {}", path.display())),
        };
        let txn = db.begin_write().with_context(|| format!("opening {}", path.display()))?;
        {
            txn.open_table(LEASES)?;
            txn.open_table(DISCOVERED)?;
            txn.open_table(EVENTS)?;
            txn.open_table(EVENT_SEQ)?;
            txn.open_table(EVENT_ORDER)?;
            txn.open_table(DECLINED)?;
            txn.open_table(META)?;
        }
        txn.commit().with_context(|| format!("initialising {}", path.display()))?;

        let mut leases = LeaseCache::default();
        let mut declined = HashMap::new();
        {
            let read = db.begin_read()?;
            for item in read.open_table(LEASES)?.iter()? {
                let (_, value) = item?;
                let lease: Lease = decode(value.value(), &path, "lease")?;
                leases.insert(lease);
            }
            for item in read.open_table(DECLINED)?.iter()? {
                let (ip, until) = item?;
                declined.insert(Ipv4Addr::from(ip.value()), until.value());
            }
        }
        Ok(State { db, path, leases: Mutex::new(leases), declined: Mutex::new(declined) })
    }

    /// Where the database lives.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The lease recorded for `mac` (possibly expired).
    pub fn lease(&self, mac: Mac) -> Result<Option<Lease>> {
        Ok(self.cache().by_mac.get(&mac).cloned())
    }

    /// Every lease recorded (including expired ones), sorted by address.
    pub fn leases(&self) -> Result<Vec<Lease>> {
        let mut all: Vec<Lease> = self.cache().by_mac.values().cloned().collect();
        all.sort_by_key(|l| (l.ip, l.mac));
        Ok(all)
    }

    /// The lease recorded on `ip` (possibly expired).
    pub fn lease_on(&self, ip: Ipv4Addr) -> Option<Lease> {
        let cache = self.cache();
        cache.by_ip.get(&ip).and_then(|mac| cache.by_mac.get(mac)).cloned()
    }

    /// Records `lease` durably, replacing the MAC's previous lease and any other MAC's lease on the same address
    /// (one address, one holder).
    pub fn put_lease(&self, lease: &Lease) -> Result<()> {
        let mut cache = self.cache();
        let other = cache.by_ip.get(&lease.ip).copied().filter(|mac| *mac != lease.mac);
        let value = serde_json::to_vec(lease)?;
        self.write(Durability::Immediate, |txn| {
            let mut table = txn.open_table(LEASES)?;
            if let Some(mac) = other {
                table.remove(&mac.0[..])?;
            }
            table.insert(&lease.mac.0[..], &value[..])?;
            Ok(())
        })
        .with_context(|| format!("recording the lease of {} in {}", lease.ip, self.path.display()))?;
        cache.insert(lease.clone());
        Ok(())
    }

    /// Forgets the lease of `mac`.
    pub fn release(&self, mac: Mac) -> Result<()> {
        let mut cache = self.cache();
        self.write(Durability::Immediate, |txn| {
            txn.open_table(LEASES)?.remove(&mac.0[..])?;
            Ok(())
        })
        .with_context(|| format!("releasing the lease of {} in {}", mac, self.path.display()))?;
        cache.remove(mac);
        Ok(())
    }

    /// Marks `ip` as not to be offered until `until` (a client found it in use), and forgets expired marks.
    pub fn decline(&self, ip: Ipv4Addr, until: u64, now: u64) -> Result<()> {
        let mut declined = self.declined.lock().unwrap_or_else(|e| e.into_inner());
        let stale: Vec<Ipv4Addr> = declined.iter().filter(|(_, u)| **u <= now).map(|(ip, _)| *ip).collect();
        self.write(Durability::Immediate, |txn| {
            let mut table = txn.open_table(DECLINED)?;
            for old in &stale {
                table.remove(u32::from(*old))?;
            }
            table.insert(u32::from(ip), until)?;
            Ok(())
        })
        .with_context(|| format!("recording that {ip} was declined in {}", self.path.display()))?;
        for old in stale {
            declined.remove(&old);
        }
        declined.insert(ip, until);
        Ok(())
    }

    /// Whether `ip` was declined and must not be offered at `now`.
    pub fn is_declined(&self, ip: Ipv4Addr, now: u64) -> bool {
        self.declined.lock().unwrap_or_else(|e| e.into_inner()).get(&ip).is_some_and(|until| *until > now)
    }

    /// Notes that an unknown machine asked for boot service: keeps `first_seen`, updates `last_seen`, counts.
    pub fn record_discovered(&self, mac: Mac, arch: Option<u16>, vendor_class: Option<String>, now: u64) -> Result<()> {
        let path = &self.path;
        self.write(Durability::Eventual, |txn| {
            let mut table = txn.open_table(DISCOVERED)?;
            let previous: Option<Discovered> =
                table.get(&mac.0[..])?.map(|v| decode(v.value(), path, "discovery record")).transpose()?;
            let record = match previous {
                Some(old) => Discovered {
                    mac,
                    arch: arch.or(old.arch),
                    vendor_class: vendor_class.or(old.vendor_class),
                    first_seen: old.first_seen,
                    last_seen: now,
                    count: old.count + 1,
                },
                None => Discovered { mac, arch, vendor_class, first_seen: now, last_seen: now, count: 1 },
            };
            table.insert(&mac.0[..], &serde_json::to_vec(&record)?[..])?;
            Ok(())
        })
        .with_context(|| format!("recording discovered machine {} in {}", mac, path.display()))
    }

    /// Every machine discovered, by MAC.
    pub fn discovered(&self) -> Result<Vec<Discovered>> {
        let read = self.db.begin_read()?;
        let mut out = Vec::new();
        for item in read.open_table(DISCOVERED)?.iter()? {
            out.push(decode(item?.1.value(), &self.path, "discovery record")?);
        }
        Ok(out)
    }

    /// Appends a boot event for `mac`, dropping its oldest beyond [`EVENTS_PER_MAC`].
    pub fn record_event(&self, mac: Mac, kind: &str, detail: &str, now: u64) -> Result<()> {
        self.write(Durability::Eventual, |txn| {
            let seq = {
                let mut meta = txn.open_table(META)?;
                let seq = meta.get("events")?.map(|v| v.value()).unwrap_or(0);
                meta.insert("events", seq + 1)?;
                seq
            };
            let own = {
                let mut seqs = txn.open_table(EVENT_SEQ)?;
                let own = seqs.get(&mac.0[..])?.map(|v| v.value()).unwrap_or(0);
                seqs.insert(&mac.0[..], own + 1)?;
                own
            };
            let event = BootEvent { mac, time: now, kind: kind.to_owned(), detail: detail.to_owned(), seq };
            let key = event_key(mac, own);
            let mut events = txn.open_table(EVENTS)?;
            let mut order = txn.open_table(EVENT_ORDER)?;
            events.insert(&key[..], &serde_json::to_vec(&event)?[..])?;
            order.insert(seq, &key[..])?;
            if own >= EVENTS_PER_MAC {
                let dropped = events.remove(&event_key(mac, own - EVENTS_PER_MAC)[..])?;
                if let Some(dropped) = dropped {
                    let dropped: BootEvent = decode(dropped.value(), &self.path, "boot event")?;
                    order.remove(dropped.seq)?;
                }
            }
            Ok(())
        })
        .with_context(|| format!("recording a boot event of {} in {}", mac, self.path.display()))
    }

    /// The last `limit` boot events, of one machine or of all, oldest first.
    pub fn events(&self, mac: Option<Mac>, limit: usize) -> Result<Vec<BootEvent>> {
        let read = self.db.begin_read()?;
        let table = read.open_table(EVENTS)?;
        let mut out: Vec<BootEvent> = Vec::new();
        match mac {
            Some(mac) => {
                let (start, end) = (event_key(mac, 0), event_key(mac, u64::MAX));
                for item in table.range(&start[..]..=&end[..])?.rev().take(limit) {
                    out.push(decode(item?.1.value(), &self.path, "boot event")?);
                }
            }
            None => {
                let order = read.open_table(EVENT_ORDER)?;
                for item in order.iter()?.rev().take(limit) {
                    let key = item?.1;
                    if let Some(value) = table.get(key.value())? {
                        out.push(decode(value.value(), &self.path, "boot event")?);
                    }
                }
            }
        }
        out.reverse();
        Ok(out)
    }

    fn cache(&self) -> MutexGuard<'_, LeaseCache> {
        self.leases.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self, durability: Durability, f: impl FnOnce(&redb::WriteTransaction) -> Result<()>) -> Result<()> {
        let mut txn = self.db.begin_write()?;
        txn.set_durability(durability);
        f(&txn)?;
        txn.commit()?;
        Ok(())
    }
}

/// Leases by MAC, with an index by address (the DHCP server asks "who holds this address?" for every address
/// of a pool it scans).
#[derive(Default)]
struct LeaseCache {
    by_mac: HashMap<Mac, Lease>,
    by_ip: HashMap<Ipv4Addr, Mac>,
}

impl LeaseCache {
    /// Adds `lease`, dropping the MAC's previous lease and any other lease on the same address.
    fn insert(&mut self, lease: Lease) {
        self.remove(lease.mac);
        if let Some(other) = self.by_ip.insert(lease.ip, lease.mac) {
            self.by_mac.remove(&other);
        }
        self.by_mac.insert(lease.mac, lease);
    }

    fn remove(&mut self, mac: Mac) {
        if let Some(old) = self.by_mac.remove(&mac) {
            if self.by_ip.get(&old.ip) == Some(&mac) {
                self.by_ip.remove(&old.ip);
            }
        }
    }
}

/// What `Query::Summary` answers (see [`super::control`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary {
    pub leases: u64,
    pub discovered: u64,
    pub events: u64,
}

impl State {
    /// Counts of what the database holds.
    pub fn summary(&self) -> Result<Summary> {
        let read = self.db.begin_read()?;
        Ok(Summary {
            leases: read.open_table(LEASES)?.len()?,
            discovered: read.open_table(DISCOVERED)?.len()?,
            events: read.open_table(EVENT_ORDER)?.len()?,
        })
    }
}

fn event_key(mac: Mac, seq: u64) -> [u8; 14] {
    let mut key = [0; 14];
    key[..6].copy_from_slice(&mac.0);
    key[6..].copy_from_slice(&seq.to_be_bytes());
    key
}

fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8], path: &Path, what: &str) -> Result<T> {
    serde_json::from_slice(bytes).with_context(|| format!("reading a {what} from {}: corrupt record", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: Mac = Mac([0x52, 0x54, 0, 0xaa, 0xbb, 0x01]);
    const B: Mac = Mac([0x52, 0x54, 0, 0xaa, 0xbb, 0x02]);

    fn lease(mac: Mac, ip: [u8; 4], expires: u64) -> Lease {
        Lease { mac, ip: ip.into(), expires, hostname: Some("n1".into()) }
    }

    #[test]
    fn reopen_keeps_everything() {
        let dir = tempfile::tempdir().unwrap();
        {
            let state = State::open(dir.path()).unwrap();
            state.put_lease(&lease(A, [10, 0, 0, 5], 1000)).unwrap();
            state.put_lease(&lease(B, [10, 0, 0, 6], 2000)).unwrap();
            state.record_discovered(B, Some(7), Some("PXEClient:Arch:00007".into()), 100).unwrap();
            state.record_discovered(B, None, None, 150).unwrap();
            state.record_event(A, "dhcp-ack", "10.0.0.5", 10).unwrap();
            state.record_event(B, "dhcp-offer", "10.0.0.6", 11).unwrap();
            state.decline([10, 0, 0, 9].into(), 500, 0).unwrap();
        }
        let state = State::open(dir.path()).unwrap();
        assert_eq!(state.lease(A).unwrap(), Some(lease(A, [10, 0, 0, 5], 1000)));
        assert_eq!(state.leases().unwrap().len(), 2);
        assert_eq!(state.lease_on([10, 0, 0, 6].into()).unwrap().mac, B);
        let found = state.discovered().unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(
            found[0],
            Discovered {
                mac: B,
                arch: Some(7),
                vendor_class: Some("PXEClient:Arch:00007".into()),
                first_seen: 100,
                last_seen: 150,
                count: 2
            }
        );
        let events = state.events(None, 10).unwrap();
        assert_eq!(events.iter().map(|e| e.kind.as_str()).collect::<Vec<_>>(), ["dhcp-ack", "dhcp-offer"]);
        assert_eq!(state.events(Some(A), 10).unwrap().len(), 1);
        assert!(state.is_declined([10, 0, 0, 9].into(), 499));
        assert!(!state.is_declined([10, 0, 0, 9].into(), 500));
    }

    #[test]
    fn one_holder_per_address_and_release() {
        let dir = tempfile::tempdir().unwrap();
        let state = State::open(dir.path()).unwrap();
        state.put_lease(&lease(A, [10, 0, 0, 5], 1000)).unwrap();
        state.put_lease(&lease(B, [10, 0, 0, 5], 3000)).unwrap();
        assert_eq!(state.lease(A).unwrap(), None);
        state.release(B).unwrap();
        drop(state);
        let state = State::open(dir.path()).unwrap();
        assert!(state.leases().unwrap().is_empty());
    }

    #[test]
    fn a_damaged_database_is_named_and_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let garbage: Vec<u8> = (0..100_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
        std::fs::write(dir.path().join("state.redb"), &garbage).unwrap();
        let err = format!("{:#}", State::open(dir.path()).unwrap_err());
        assert!(err.contains("state.redb") && err.contains("damaged") && err.contains("move it aside"), "{err}");
        assert_eq!(std::fs::read(dir.path().join("state.redb")).unwrap(), garbage, "the file was changed");
    }

    #[test]
    fn events_are_bounded_per_mac_and_ordered() {
        let dir = tempfile::tempdir().unwrap();
        let state = State::open(dir.path()).unwrap();
        for i in 0..(EVENTS_PER_MAC + 5) {
            state.record_event(A, "dhcp-offer", &i.to_string(), i).unwrap();
        }
        state.record_event(B, "dhcp-offer", "b", 5000).unwrap();
        let a = state.events(Some(A), usize::MAX).unwrap();
        assert_eq!(a.len() as u64, EVENTS_PER_MAC);
        assert_eq!(a[0].detail, "5");
        assert_eq!(a.last().unwrap().detail, (EVENTS_PER_MAC + 4).to_string());
        assert_eq!(state.events(None, usize::MAX).unwrap().len() as u64, EVENTS_PER_MAC + 1);
        let last = state.events(None, 2).unwrap();
        assert_eq!(
            last.iter().map(|e| e.detail.as_str()).collect::<Vec<_>>(),
            [(EVENTS_PER_MAC + 4).to_string(), "b".into()]
        );
    }

    #[test]
    fn second_open_says_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let _first = State::open(dir.path()).unwrap();
        let err = State::open(dir.path()).unwrap_err();
        assert!(format!("{err:#}").contains("is `kiln serve` running"), "{err:#}");
    }
}
