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
    #[serde(with = "mac_text")]
    pub mac: [u8; 6],
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
    #[serde(with = "mac_text")]
    pub mac: [u8; 6],
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
    #[serde(with = "mac_text")]
    pub mac: [u8; 6],
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
    pub fn lease(&self, mac: [u8; 6]) -> Result<Option<Lease>> {
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
                table.remove(&mac[..])?;
            }
            table.insert(&lease.mac[..], &value[..])?;
            Ok(())
        })
        .with_context(|| format!("recording the lease of {} in {}", lease.ip, self.path.display()))?;
        cache.insert(lease.clone());
        Ok(())
    }

    /// Forgets the lease of `mac`.
    pub fn release(&self, mac: [u8; 6]) -> Result<()> {
        let mut cache = self.cache();
        self.write(Durability::Immediate, |txn| {
            txn.open_table(LEASES)?.remove(&mac[..])?;
            Ok(())
        })
        .with_context(|| format!("releasing the lease of {} in {}", format_mac(mac), self.path.display()))?;
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
    pub fn record_discovered(
        &self,
        mac: [u8; 6],
        arch: Option<u16>,
        vendor_class: Option<String>,
        now: u64,
    ) -> Result<()> {
        let path = &self.path;
        self.write(Durability::Eventual, |txn| {
            let mut table = txn.open_table(DISCOVERED)?;
            let previous: Option<Discovered> =
                table.get(&mac[..])?.map(|v| decode(v.value(), path, "discovery record")).transpose()?;
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
            table.insert(&mac[..], &serde_json::to_vec(&record)?[..])?;
            Ok(())
        })
        .with_context(|| format!("recording discovered machine {} in {}", format_mac(mac), path.display()))
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
    pub fn record_event(&self, mac: [u8; 6], kind: &str, detail: &str, now: u64) -> Result<()> {
        self.write(Durability::Eventual, |txn| {
            let seq = {
                let mut meta = txn.open_table(META)?;
                let seq = meta.get("events")?.map(|v| v.value()).unwrap_or(0);
                meta.insert("events", seq + 1)?;
                seq
            };
            let own = {
                let mut seqs = txn.open_table(EVENT_SEQ)?;
                let own = seqs.get(&mac[..])?.map(|v| v.value()).unwrap_or(0);
                seqs.insert(&mac[..], own + 1)?;
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
        .with_context(|| format!("recording a boot event of {} in {}", format_mac(mac), self.path.display()))
    }

    /// The last `limit` boot events, of one machine or of all, oldest first.
    pub fn events(&self, mac: Option<[u8; 6]>, limit: usize) -> Result<Vec<BootEvent>> {
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
    by_mac: HashMap<[u8; 6], Lease>,
    by_ip: HashMap<Ipv4Addr, [u8; 6]>,
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

    fn remove(&mut self, mac: [u8; 6]) {
        if let Some(old) = self.by_mac.remove(&mac) {
            if self.by_ip.get(&old.ip) == Some(&mac) {
                self.by_ip.remove(&old.ip);
            }
        }
    }
}

/// The control socket `kiln serve` listens on in its state directory: while it runs, the database is locked and
/// other kiln commands ask the server instead.
pub const SOCKET: &str = "kiln.sock";

/// A question about the state, answered from the database or, while `kiln serve` holds it, by the server over
/// [`SOCKET`] (one JSON line each way).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "query", rename_all = "lowercase", deny_unknown_fields)]
pub enum Query {
    /// Counts of leases, discovered machines and boot events.
    Summary,
    /// Every lease.
    Leases,
    /// Every discovered machine.
    Discovered,
    /// The last `limit` boot events, of one MAC (`52:54:00:…`) or of all.
    Events { mac: Option<String>, limit: usize },
}

/// What [`Query::Summary`] answers.
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

    /// Answers `query` from this database.
    pub fn answer(&self, query: &Query) -> Result<serde_json::Value> {
        Ok(match query {
            Query::Summary => serde_json::to_value(self.summary()?)?,
            Query::Leases => serde_json::to_value(self.leases()?)?,
            Query::Discovered => serde_json::to_value(self.discovered()?)?,
            Query::Events { mac, limit } => {
                let mac = mac.as_deref().map(parse_mac).transpose()?;
                serde_json::to_value(self.events(mac, *limit)?)?
            }
        })
    }
}

/// Answers `query` about the state in `dir`: from the running server if one holds it, else from the database
/// (created if missing).
pub fn ask(dir: &Path, query: &Query) -> Result<serde_json::Value> {
    let socket = dir.join(SOCKET);
    match std::os::unix::net::UnixStream::connect(&socket) {
        Ok(stream) => return ask_server(stream, &socket, query),
        Err(e) if matches!(e.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused) => {}
        Err(e) => return Err(e).with_context(|| format!("connecting to {}", socket.display())),
    }
    State::open(dir)?.answer(query)
}

fn ask_server(mut stream: std::os::unix::net::UnixStream, socket: &Path, query: &Query) -> Result<serde_json::Value> {
    use std::io::{BufRead, Write};
    let timeout = Some(std::time::Duration::from_secs(10));
    stream.set_read_timeout(timeout)?;
    stream.set_write_timeout(timeout)?;
    let mut line = serde_json::to_vec(query)?;
    line.push(b'\n');
    stream.write_all(&line).with_context(|| format!("asking kiln serve over {}", socket.display()))?;
    let mut answer = String::new();
    std::io::BufReader::new(&stream)
        .read_line(&mut answer)
        .with_context(|| format!("reading kiln serve's answer over {}", socket.display()))?;
    let reply: Reply = serde_json::from_str(&answer)
        .with_context(|| format!("kiln serve answered {} with something that is not a reply", socket.display()))?;
    match reply {
        Reply { ok: true, data: Some(data), .. } => Ok(data),
        Reply { error, .. } => bail!("kiln serve ({}): {}", socket.display(), error.unwrap_or_default()),
    }
}

/// One answer on the control socket.
#[derive(Debug, Serialize, Deserialize)]
pub struct Reply {
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Reply {
    /// The reply to one request line.
    pub fn to_line(state: &State, line: &[u8]) -> Vec<u8> {
        let reply = match serde_json::from_slice::<Query>(line) {
            Err(e) => Reply { ok: false, data: None, error: Some(format!("not a query: {e}")) },
            Ok(q) => match state.answer(&q) {
                Ok(data) => Reply { ok: true, data: Some(data), error: None },
                Err(e) => Reply { ok: false, data: None, error: Some(format!("{e:#}")) },
            },
        };
        let mut out = serde_json::to_vec(&reply).unwrap_or_else(|_| b"{\"ok\":false}".to_vec());
        out.push(b'\n');
        out
    }
}

fn event_key(mac: [u8; 6], seq: u64) -> [u8; 14] {
    let mut key = [0; 14];
    key[..6].copy_from_slice(&mac);
    key[6..].copy_from_slice(&seq.to_be_bytes());
    key
}

fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8], path: &Path, what: &str) -> Result<T> {
    serde_json::from_slice(bytes).with_context(|| format!("reading a {what} from {}: corrupt record", path.display()))
}

/// `52:54:00:aa:bb:cc`: lowercase, colon-separated.
pub fn format_mac(mac: [u8; 6]) -> String {
    let [a, b, c, d, e, f] = mac;
    format!("{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{f:02x}")
}

/// Parses `52:54:00:AA:BB:CC` or `52-54-00-aa-bb-cc`.
pub fn parse_mac(text: &str) -> Result<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split([':', '-']);
    for byte in &mut mac {
        let part = parts.next().filter(|p| p.len() == 2);
        *byte = part
            .and_then(|p| u8::from_str_radix(p, 16).ok())
            .with_context(|| format!("invalid MAC address {text:?}: expected six hex pairs like 52:54:00:aa:bb:cc"))?;
    }
    if parts.next().is_some() {
        bail!("invalid MAC address {text:?}: expected six hex pairs like 52:54:00:aa:bb:cc");
    }
    Ok(mac)
}

/// Serde for `[u8; 6]` as `"52:54:00:aa:bb:cc"`, so JSON output is readable: `#[serde(with = "mac_text")]`.
pub mod mac_text {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(mac: &[u8; 6], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::format_mac(*mac))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 6], D::Error> {
        let text = String::deserialize(d)?;
        super::parse_mac(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: [u8; 6] = [0x52, 0x54, 0, 0xaa, 0xbb, 0x01];
    const B: [u8; 6] = [0x52, 0x54, 0, 0xaa, 0xbb, 0x02];

    fn lease(mac: [u8; 6], ip: [u8; 4], expires: u64) -> Lease {
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

    #[test]
    fn mac_text_round_trips() {
        assert_eq!(format_mac(A), "52:54:00:aa:bb:01");
        assert_eq!(parse_mac("52-54-00-AA-BB-01").unwrap(), A);
        assert!(parse_mac("52:54:00:aa:bb").is_err());
        assert!(parse_mac("52:54:00:aa:bb:01:02").is_err());
        let json = serde_json::to_string(&lease(A, [10, 0, 0, 5], 1)).unwrap();
        assert!(json.contains("\"52:54:00:aa:bb:01\""), "{json}");
        assert_eq!(serde_json::from_str::<Lease>(&json).unwrap(), lease(A, [10, 0, 0, 5], 1));
    }
}
