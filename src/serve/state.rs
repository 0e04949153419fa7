//! The boot server's persistent state: leases, discovered machines, boot events, nodes' last heartbeats.
//!
//! One embedded database, `<state dir>/state.redb` (redb: copy-on-write B-trees, every write a transaction, safe
//! against a crash mid-write). Leases are committed durably before the DHCPACK that announces them leaves the
//! server; discovery records and boot events are written with eventual durability (they survive a restart of the
//! process, an unlucky power cut may lose the last few). Values are JSON so a later kiln reads an older file.
//!
//! The database holds an exclusive lock: while `kiln serve` runs, other processes cannot open it.
//! Leases are also cached in memory (the DHCP server asks about them on every packet).

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use anyhow::{bail, Context, Result};
use redb::{Database, Durability, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::net::{Mac, Pool};

/// Boot events kept per MAC; older ones are dropped as new ones arrive.
pub const EVENTS_PER_MAC: u64 = 1000;

/// How much the database may hold of what clients can make it record. Beyond a cap the oldest records are
/// dropped (and counted), so a flood of made-up MACs cannot grow the state (and, with the state in RAM, memory)
/// without bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StateLimits {
    /// Discovered machines kept (the least recently seen are forgotten). By default, 65,536.
    pub max_discovered: u64,
    /// Boot events kept across all machines (the oldest are dropped). By default, 500,000 (about 100 MiB).
    pub max_events: u64,
}

impl Default for StateLimits {
    fn default() -> Self {
        StateLimits { max_discovered: 65_536, max_events: 500_000 }
    }
}

/// One thing to note in the boot log, written in batches by [`State::record`].
#[derive(Debug, Clone, PartialEq)]
pub enum Record {
    /// A boot event of `mac`.
    Event { mac: Mac, kind: String, detail: String, time: u64 },
    /// A machine outside the node list asked for boot service.
    Discovered { mac: Mac, arch: Option<u16>, vendor_class: Option<String>, time: u64 },
    /// A node's agent reported; replaces that node's previous heartbeat.
    Heartbeat(Heartbeat),
}

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
/// MAC → JSON [`Heartbeat`]: each node's last heartbeat. Only nodes of the recipe have one (the server refuses
/// heartbeats for any other MAC), so the table is as large as the node list.
const HEARTBEATS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("heartbeats");
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

/// A lease put in the in-memory book, waiting to be written ([`State::commit_leases`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StagedLease {
    pub lease: Lease,
    /// The machine whose lease on the same address it replaces.
    displaced: Option<Mac>,
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

/// What a node's status agent (`kiln-node agent`) said in one heartbeat, checked by the server
/// ([`super::heartbeat`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// `up`, or `stop` when the node shuts down.
    pub event: String,
    /// Seconds since the node's kernel started.
    pub uptime: f64,
    /// The 1, 5 and 15 minute load averages.
    pub load: [f64; 3],
    /// Bytes.
    pub mem_total: u64,
    /// Bytes the node could still use (MemAvailable).
    pub mem_available: u64,
    /// The kernel release (`uname -r`).
    pub kernel: String,
    /// The digest of the image the node was given (`sha256:…`), empty if it does not know.
    #[serde(default)]
    pub image: String,
    /// The kernel's boot id: a new one means a new boot.
    #[serde(default)]
    pub boot_id: String,
    /// The agent's version.
    #[serde(default)]
    pub agent: String,
}

/// A node's last heartbeat.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Heartbeat {
    pub mac: Mac,
    /// Unix seconds when it arrived.
    pub received: u64,
    /// The address it came from.
    pub from: IpAddr,
    pub report: Report,
}

/// The persistent state of one boot server.
pub struct State {
    db: Database,
    path: PathBuf,
    /// Every lease on disk, and the offers held in memory only.
    leases: Mutex<LeaseCache>,
    /// Declined addresses and the time until which they are not offered.
    declined: Mutex<HashMap<Ipv4Addr, u64>>,
    limits: Mutex<StateLimits>,
    /// Addresses nodes were seen taking from another DHCP server (proxy mode), until when: memory only, one per
    /// node of the recipe (only known nodes are noted).
    observed: Mutex<HashMap<Mac, (Ipv4Addr, u64)>>,
    /// Discovered machines by last sighting, to forget the stalest first without a scan.
    discovered_by_age: Mutex<DiscoveredIndex>,
    /// Records dropped at a cap since the server started: (events, discovered machines).
    dropped_events: AtomicU64,
    dropped_discovered: AtomicU64,
}

/// Discovered machines ordered by when they were last seen.
#[derive(Default)]
struct DiscoveredIndex {
    seen: HashMap<Mac, u64>,
    by_age: BTreeSet<(u64, Mac)>,
}

impl DiscoveredIndex {
    fn touch(&mut self, mac: Mac, time: u64) {
        if let Some(old) = self.seen.insert(mac, time) {
            self.by_age.remove(&(old, mac));
        }
        self.by_age.insert((time, mac));
    }

    fn pop_oldest(&mut self) -> Option<Mac> {
        let (_, mac) = self.by_age.pop_first()?;
        self.seen.remove(&mac);
        Some(mac)
    }
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
            txn.open_table(HEARTBEATS)?;
            txn.open_table(META)?;
        }
        txn.commit().with_context(|| format!("initialising {}", path.display()))?;

        let mut leases = LeaseCache::default();
        let mut declined = HashMap::new();
        let mut discovered = DiscoveredIndex::default();
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
            for item in read.open_table(DISCOVERED)?.iter()? {
                let record: Discovered = decode(item?.1.value(), &path, "discovery record")?;
                discovered.touch(record.mac, record.last_seen);
            }
        }
        Ok(State {
            db,
            path,
            leases: Mutex::new(leases),
            declined: Mutex::new(declined),
            limits: Mutex::new(StateLimits::default()),
            observed: Mutex::new(HashMap::new()),
            discovered_by_age: Mutex::new(discovered),
            dropped_events: AtomicU64::new(0),
            dropped_discovered: AtomicU64::new(0),
        })
    }

    /// Sets the caps on what clients can make the database hold (at start and on reload); a lower cap takes
    /// effect with the next record.
    pub fn set_limits(&self, limits: StateLimits) {
        *self.limits.lock().unwrap_or_else(|e| e.into_inner()) = limits;
    }

    /// Notes that node `mac` took `ip` from another DHCP server (proxy mode), valid until `until`.
    pub fn observe(&self, mac: Mac, ip: Ipv4Addr, until: u64) {
        self.observed.lock().unwrap_or_else(|e| e.into_inner()).insert(mac, (ip, until));
    }

    /// The address `mac` holds at `now`: its lease from this server, else the one it was seen taking from another.
    pub fn address_of(&self, mac: Mac, now: u64) -> Option<Ipv4Addr> {
        if let Some(lease) = self.cache().by_mac.get(&mac).filter(|l| l.active(now)) {
            return Some(lease.ip);
        }
        let observed = self.observed.lock().unwrap_or_else(|e| e.into_inner());
        observed.get(&mac).filter(|(_, until)| *until > now).map(|(ip, _)| *ip)
    }

    /// Records dropped at a cap since the server started: (boot events, discovered machines).
    pub fn dropped(&self) -> (u64, u64) {
        (self.dropped_events.load(Ordering::Relaxed), self.dropped_discovered.load(Ordering::Relaxed))
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
        self.put_leases(std::slice::from_ref(lease))
    }

    /// Records `leases` durably in one transaction, each as [`State::put_lease`] would, in order.
    pub fn put_leases(&self, leases: &[Lease]) -> Result<()> {
        let staged: Vec<StagedLease> = leases.iter().map(|l| self.stage_lease(l)).collect();
        self.commit_leases(&staged)
    }

    /// The first address of `pool` at or after `from` that no lease (current, expired or held) names.
    pub fn first_unrecorded(&self, pool: &Pool, from: Ipv4Addr) -> Option<Ipv4Addr> {
        self.cache().first_unrecorded(pool, from)
    }

    /// Puts `lease` in the in-memory lease book at once (later decisions see it) and returns what
    /// [`State::commit_leases`] needs to make it durable. An offer (DHCPOFFER) is only staged: RFC 2131 asks
    /// nothing durable of it, and a restart forgets it (the client's REQUEST is then decided afresh).
    pub fn stage_lease(&self, lease: &Lease) -> StagedLease {
        let mut cache = self.cache();
        let displaced = cache.by_ip.get(&lease.ip).copied().filter(|mac| *mac != lease.mac);
        cache.insert(lease.clone());
        StagedLease { lease: lease.clone(), displaced }
    }

    /// Writes staged leases in one durable transaction (one sync to disk for a whole batch of DHCPACKs). On
    /// failure the in-memory book is read back from disk, so it never claims what is not durable.
    pub fn commit_leases(&self, staged: &[StagedLease]) -> Result<()> {
        if staged.is_empty() {
            return Ok(());
        }
        let written = self.write(Durability::Immediate, |txn| {
            let mut table = txn.open_table(LEASES)?;
            for s in staged {
                if let Some(other) = s.displaced {
                    table.remove(&other.0[..])?;
                }
                table.insert(&s.lease.mac.0[..], &serde_json::to_vec(&s.lease)?[..])?;
            }
            Ok(())
        });
        if let Err(e) = written {
            if let Err(reread) = self.reload_leases() {
                tracing::warn!("re-reading the leases of {}: {reread:#}", self.path.display());
            }
            return Err(e).with_context(|| format!("recording {} lease(s) in {}", staged.len(), self.path.display()));
        }
        Ok(())
    }

    fn reload_leases(&self) -> Result<()> {
        let mut fresh = LeaseCache::default();
        let read = self.db.begin_read()?;
        for item in read.open_table(LEASES)?.iter()? {
            fresh.insert(decode(item?.1.value(), &self.path, "lease")?);
        }
        *self.cache() = fresh;
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
        self.record(&[Record::Discovered { mac, arch, vendor_class, time: now }])
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
        self.record(&[Record::Event { mac, kind: kind.to_owned(), detail: detail.to_owned(), time: now }])
    }

    /// Writes `records` in one transaction (eventual durability: they survive a restart of the process; a power
    /// cut loses those written since the last [`State::sync`]), dropping the oldest events and the stalest discovered machines beyond
    /// [`StateLimits`].
    pub fn record(&self, records: &[Record]) -> Result<()> {
        if records.is_empty() {
            return Ok(());
        }
        let limits = *self.limits.lock().unwrap_or_else(|e| e.into_inner());
        let mut index = self.discovered_by_age.lock().unwrap_or_else(|e| e.into_inner());
        let mut dropped = (0u64, 0u64);
        self.write(Durability::Eventual, |txn| {
            let mut meta = txn.open_table(META)?;
            let mut seqs = txn.open_table(EVENT_SEQ)?;
            let mut events = txn.open_table(EVENTS)?;
            let mut order = txn.open_table(EVENT_ORDER)?;
            let mut discovered = txn.open_table(DISCOVERED)?;
            let mut heartbeats = txn.open_table(HEARTBEATS)?;
            for record in records {
                match record {
                    Record::Heartbeat(beat) => {
                        heartbeats.insert(&beat.mac.0[..], &serde_json::to_vec(beat)?[..])?;
                    }
                    Record::Event { mac, kind, detail, time } => {
                        let seq = meta.get("events")?.map(|v| v.value()).unwrap_or(0);
                        meta.insert("events", seq + 1)?;
                        let own = seqs.get(&mac.0[..])?.map(|v| v.value()).unwrap_or(0);
                        seqs.insert(&mac.0[..], own + 1)?;
                        let event =
                            BootEvent { mac: *mac, time: *time, kind: kind.clone(), detail: detail.clone(), seq };
                        let key = event_key(*mac, own);
                        events.insert(&key[..], &serde_json::to_vec(&event)?[..])?;
                        order.insert(seq, &key[..])?;
                        if own >= EVENTS_PER_MAC {
                            if let Some(old) = events.remove(&event_key(*mac, own - EVENTS_PER_MAC)[..])? {
                                let old: BootEvent = decode(old.value(), &self.path, "boot event")?;
                                order.remove(old.seq)?;
                            }
                        }
                        while order.len()? > limits.max_events {
                            let Some((_, key)) = order.pop_first()? else { break };
                            let key = key.value().to_vec();
                            events.remove(&key[..])?;
                            dropped.0 += 1;
                        }
                    }
                    Record::Discovered { mac, arch, vendor_class, time } => {
                        let previous: Option<Discovered> = discovered
                            .get(&mac.0[..])?
                            .map(|v| decode(v.value(), &self.path, "discovery record"))
                            .transpose()?;
                        let record = match previous {
                            Some(old) => Discovered {
                                mac: *mac,
                                arch: arch.or(old.arch),
                                vendor_class: vendor_class.clone().or(old.vendor_class),
                                first_seen: old.first_seen,
                                last_seen: *time,
                                count: old.count + 1,
                            },
                            None => Discovered {
                                mac: *mac,
                                arch: *arch,
                                vendor_class: vendor_class.clone(),
                                first_seen: *time,
                                last_seen: *time,
                                count: 1,
                            },
                        };
                        discovered.insert(&mac.0[..], &serde_json::to_vec(&record)?[..])?;
                        index.touch(*mac, *time);
                        while index.seen.len() as u64 > limits.max_discovered {
                            let Some(stale) = index.pop_oldest() else { break };
                            discovered.remove(&stale.0[..])?;
                            dropped.1 += 1;
                        }
                    }
                }
            }
            Ok(())
        })
        .with_context(|| format!("recording {} boot log record(s) in {}", records.len(), self.path.display()))?;
        self.dropped_events.fetch_add(dropped.0, Ordering::Relaxed);
        self.dropped_discovered.fetch_add(dropped.1, Ordering::Relaxed);
        Ok(())
    }

    /// Every node's last heartbeat.
    pub fn heartbeats(&self) -> Result<Vec<Heartbeat>> {
        let read = self.db.begin_read()?;
        let mut out = Vec::new();
        for item in read.open_table(HEARTBEATS)?.iter()? {
            out.push(decode(item?.1.value(), &self.path, "heartbeat")?);
        }
        Ok(out)
    }

    /// Forgets the heartbeats of machines for which `keep` says no (nodes no longer in the recipe); returns how
    /// many.
    pub fn forget_heartbeats(&self, keep: impl Fn(Mac) -> bool) -> Result<usize> {
        let gone: Vec<Mac> = self.heartbeats()?.into_iter().map(|h| h.mac).filter(|m| !keep(*m)).collect();
        if !gone.is_empty() {
            self.write(Durability::Eventual, |txn| {
                let mut table = txn.open_table(HEARTBEATS)?;
                for mac in &gone {
                    table.remove(&mac.0[..])?;
                }
                Ok(())
            })
            .with_context(|| format!("forgetting heartbeats in {}", self.path.display()))?;
        }
        Ok(gone.len())
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

    /// Makes every record written so far durable (one empty transaction with immediate durability: redb then
    /// persists it and all eventual commits before it).
    pub fn sync(&self) -> Result<()> {
        self.write(Durability::Immediate, |_| Ok(()))
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
    /// Per pool (by its first address): every address from the pool's start up to this one has a lease record,
    /// so the search for one that never had a lease starts here instead of at the start (a storm hands out
    /// thousands of addresses in a row; walking the given ones each time would cost O(leases) per machine).
    unrecorded_from: HashMap<Ipv4Addr, Ipv4Addr>,
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
                for from in self.unrecorded_from.values_mut() {
                    if old.ip < *from {
                        *from = old.ip;
                    }
                }
            }
        }
    }

    /// The first address of `pool` at or after `from` that no lease names.
    fn first_unrecorded(&mut self, pool: &Pool, from: Ipv4Addr) -> Option<Ipv4Addr> {
        let known = self.unrecorded_from.get(&pool.start).copied().unwrap_or(pool.start);
        let start = u32::from(from.max(pool.start).max(known));
        let found = (start..=u32::from(pool.end)).map(Ipv4Addr::from).find(|ip| !self.by_ip.contains_key(ip));
        if from <= known {
            // Everything from the pool's start to what was found (or the pool's end) has a lease.
            let upto = found.unwrap_or(pool.end);
            self.unrecorded_from.insert(pool.start, upto);
        }
        found
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
    fn heartbeats_are_kept_one_per_node() {
        let dir = tempfile::tempdir().unwrap();
        let beat = |mac: Mac, received: u64| {
            Record::Heartbeat(Heartbeat {
                mac,
                received,
                from: "10.0.0.5".parse().unwrap(),
                report: Report {
                    event: "up".into(),
                    uptime: 12.5,
                    load: [0.5, 0.25, 0.0],
                    mem_total: 100,
                    mem_available: 40,
                    kernel: "6.1".into(),
                    image: String::new(),
                    boot_id: "b".into(),
                    agent: "0.1.0".into(),
                },
            })
        };
        {
            let state = State::open(dir.path()).unwrap();
            state.record(&[beat(A, 10), beat(B, 11), beat(A, 40)]).unwrap();
        }
        let state = State::open(dir.path()).unwrap();
        let mut kept: Vec<(Mac, u64)> = state.heartbeats().unwrap().iter().map(|h| (h.mac, h.received)).collect();
        kept.sort();
        assert_eq!(kept, [(A, 40), (B, 11)], "one heartbeat per node, the last");
        assert_eq!(state.heartbeats().unwrap()[0].report.load, [0.5, 0.25, 0.0]);
        assert_eq!(state.forget_heartbeats(|mac| mac == A).unwrap(), 1);
        assert_eq!(state.heartbeats().unwrap().len(), 1);
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

    #[test]
    fn caps_drop_the_oldest_and_count_them() {
        let dir = tempfile::tempdir().unwrap();
        let state = State::open(dir.path()).unwrap();
        state.set_limits(StateLimits { max_discovered: 3, max_events: 10 });
        let mac = |i: u8| Mac([0x52, 0x54, 0, 0, 1, i]);
        let records: Vec<Record> = (0..5u8)
            .map(|i| Record::Discovered { mac: mac(i), arch: None, vendor_class: None, time: 100 + i as u64 })
            .collect();
        state.record(&records).unwrap();
        // Seen again: no longer the stalest.
        state.record_discovered(mac(2), None, None, 200).unwrap();
        state.record_discovered(mac(5), None, None, 201).unwrap();
        let mut kept: Vec<Mac> = state.discovered().unwrap().into_iter().map(|d| d.mac).collect();
        kept.sort();
        assert_eq!(kept, [mac(2), mac(4), mac(5)]);
        for i in 0..25u64 {
            state.record_event(mac((i % 4) as u8), "x", &i.to_string(), i).unwrap();
        }
        let events = state.events(None, usize::MAX).unwrap();
        assert_eq!(
            events.iter().map(|e| e.detail.as_str()).collect::<Vec<_>>(),
            (15..25).map(|i| i.to_string()).collect::<Vec<_>>()
        );
        assert_eq!(state.dropped(), (15, 3));
        // Reopened, the caps still hold what was kept (they are the server's to set again).
        drop(state);
        let state = State::open(dir.path()).unwrap();
        assert_eq!(state.summary().unwrap().events, 10);
        assert_eq!(state.events(Some(mac(3)), usize::MAX).unwrap().len(), 3);
    }

    #[test]
    fn offers_are_held_in_memory_and_acks_batched_to_disk() {
        let dir = tempfile::tempdir().unwrap();
        {
            let state = State::open(dir.path()).unwrap();
            state.stage_lease(&lease(A, [10, 0, 0, 5], 1000));
            assert_eq!(state.lease_on([10, 0, 0, 5].into()).unwrap().mac, A, "an offer holds its address at once");
            let staged = vec![
                state.stage_lease(&lease(B, [10, 0, 0, 6], 2000)),
                state.stage_lease(&lease(A, [10, 0, 0, 7], 3000)),
            ];
            state.commit_leases(&staged).unwrap();
        }
        let state = State::open(dir.path()).unwrap();
        let mut on_disk: Vec<(Mac, Ipv4Addr)> = state.leases().unwrap().iter().map(|l| (l.mac, l.ip)).collect();
        on_disk.sort();
        assert_eq!(on_disk, [(A, [10, 0, 0, 7].into()), (B, [10, 0, 0, 6].into())], "the offer was not written");
    }
}
