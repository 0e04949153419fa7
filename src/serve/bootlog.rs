//! The boot log: what the protocol servers report about machines, attributed to a MAC, written to the state in
//! batches by a thread of its own, printed as one line each, and handed to the nodes' status
//! ([`super::status::Tracker`]).
//!
//! Everything here is bounded: the queue to the writer (a full one drops the record and counts it under
//! `event_queue`), the addresses remembered for attribution, the machines counted as booted (nodes only), and the
//! lines printed (at most `log_lines_per_second`; the rest are counted and the state still has them).

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::http::HttpEvent;
use super::limits::Limits;
use super::site::Site;
use super::state::{Record, State};
use super::status::Tracker;
use super::tftp::TftpEvent;
use crate::net::Mac;
use crate::recipe::UnknownPolicy;
use crate::util::unix_now;

/// Records waiting for the writer thread, by default.
pub const EVENT_QUEUE: usize = 10_000;
/// Boot log lines printed per second, by default.
pub const LOG_LINES_PER_SECOND: u64 = 200;
/// Most records one transaction writes.
const WRITE_BATCH: usize = 1024;
/// The writer makes what it wrote durable once no record has come for this long...
const SYNC_WHEN_IDLE: Duration = Duration::from_secs(1);
/// ...or, while records keep coming, once this long has passed since its last sync: a power cut loses at most
/// the boot events of the last few seconds, and a storm costs one fsync per interval instead of one per batch.
const SYNC_AT_LEAST_EVERY: Duration = Duration::from_secs(5);

/// The writer thread's queue. Cloning shares it; the thread ends when every clone is dropped.
#[derive(Clone)]
pub struct Recorder {
    tx: SyncSender<Record>,
    limits: Limits,
    capacity: usize,
}

impl Recorder {
    /// Starts the thread that writes records to `state`, `capacity` of them queued at most.
    pub fn start(state: Arc<State>, capacity: usize, limits: Limits) -> std::io::Result<Recorder> {
        let (tx, rx) = sync_channel(capacity.max(1));
        std::thread::Builder::new().name("kiln-bootlog".into()).spawn(move || write_loop(&state, rx))?;
        Ok(Recorder { tx, limits, capacity })
    }

    /// Queues `record`; when the writer is behind by the whole queue, drops it and counts it.
    pub fn record(&self, record: Record) {
        match self.tx.try_send(record) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                self.limits.limit("event_queue", self.capacity as u64, "boot events not logged").refuse()
            }
            Err(TrySendError::Disconnected(_)) => {}
        }
    }
}

fn write_loop(state: &State, rx: Receiver<Record>) {
    // When the oldest write not yet synced was made.
    let mut unsynced: Option<Instant> = None;
    let sync = |unsynced: &mut Option<Instant>| {
        if unsynced.take().is_some() {
            if let Err(e) = state.sync() {
                super::metrics::error(super::metrics::ErrorKind::StateWrite);
                tracing::warn!("{e:#}");
            }
        }
    };
    loop {
        let first = match rx.recv_timeout(SYNC_WHEN_IDLE) {
            Ok(r) => r,
            Err(RecvTimeoutError::Timeout) => {
                sync(&mut unsynced);
                continue;
            }
            Err(RecvTimeoutError::Disconnected) => break,
        };
        let mut batch = vec![first];
        while batch.len() < WRITE_BATCH {
            match rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        match state.record(&batch) {
            Ok(()) => {
                unsynced.get_or_insert_with(Instant::now);
            }
            Err(e) => {
                super::metrics::error(super::metrics::ErrorKind::StateWrite);
                tracing::warn!("{e:#}");
            }
        }
        if unsynced.is_some_and(|since| since.elapsed() >= SYNC_AT_LEAST_EVERY) {
            sync(&mut unsynced);
        }
    }
    sync(&mut unsynced);
}

/// The main loop's view of the boot log: attribution, the booted count, printing.
pub struct BootLog {
    recorder: Recorder,
    limits: Limits,
    peers: Peers,
    booted: BTreeSet<Mac>,
    lines: LineBudget,
    status: Option<Arc<Tracker>>,
}

impl BootLog {
    pub fn new(recorder: Recorder, limits: Limits) -> BootLog {
        BootLog {
            recorder,
            limits,
            peers: Peers::default(),
            booted: BTreeSet::new(),
            lines: LineBudget::new(LOG_LINES_PER_SECOND),
            status: None,
        }
    }

    /// Hands every node's boot events to `tracker` too.
    pub fn track(&mut self, tracker: Arc<Tracker>) {
        self.status = Some(tracker);
    }

    /// Notes a node's event in its status.
    fn note(&self, mac: Mac, kind: &str, detail: &str) {
        if let Some(status) = &self.status {
            status.event(mac, kind, detail, unix_now());
        }
    }

    /// Sets the printing budget (after a reload).
    pub fn set_lines_per_second(&mut self, per_second: u64) {
        self.lines = LineBudget::new(per_second);
    }

    /// Prints `line` if the budget allows, else counts it.
    fn print(&mut self, line: impl FnOnce() -> String) {
        if self.lines.take() {
            println!("{}", line());
        } else {
            self.limits
                .limit(
                    "log_lines_per_second",
                    self.lines.per_second,
                    "boot log lines not printed (kiln node events has them)",
                )
                .refuse();
        }
    }

    fn record(&self, mac: Mac, kind: &str, detail: &str) {
        self.recorder.record(Record::Event {
            mac,
            kind: kind.to_string(),
            detail: detail.to_string(),
            time: unix_now(),
        });
    }

    /// Something the HTTP server did for a client.
    pub fn http(&mut self, ev: HttpEvent, site: &Site, state: &State) {
        let Some(mac) = ev.mac.or_else(|| self.peers.mac_of(ev.client, site, state)) else {
            self.print(|| {
                format!("{} {} (no machine known at this address) {} {}", stamp(), ev.client, ev.kind, ev.detail)
            });
            return;
        };
        if ev.mac.is_some() {
            self.peers.learn(ev.client, mac);
        }
        let node = site.node(mac).map(|n| n.name.clone());
        if node.is_none() && site.server.unknown == UnknownPolicy::Ignore {
            return;
        }
        self.record(mac, ev.kind, &ev.detail);
        if node.is_some() {
            self.note(mac, ev.kind, &ev.detail);
        }
        if ev.kind == "script" {
            match &node {
                Some(_) => {
                    self.booted.insert(mac);
                }
                None => self.recorder.record(Record::Discovered {
                    mac,
                    arch: None,
                    vendor_class: Some("iPXE".into()),
                    time: unix_now(),
                }),
            }
        }
        let booted = self.booted.len();
        self.print(|| {
            format!(
                "{} {} {} {} {} (nodes booted: {booted})",
                stamp(),
                mac,
                node.as_deref().unwrap_or("unknown"),
                ev.kind,
                ev.detail
            )
        });
    }

    /// A TFTP transfer that ended.
    pub fn tftp(&mut self, ev: TftpEvent, site: &Site, state: &State) {
        let (client, detail) = match &ev {
            TftpEvent::Finished { client, file, bytes, secs } => {
                (client, format!("{file} {bytes} bytes in {secs:.1}s"))
            }
            TftpEvent::Failed { client, file, error } => (client, format!("{file} failed: {error}")),
            TftpEvent::Started { .. } => return,
        };
        match self.peers.mac_of(client.ip(), site, state) {
            Some(mac) => {
                let node = site.node(mac).map(|n| n.name.clone());
                if node.is_none() && site.server.unknown == UnknownPolicy::Ignore {
                    return;
                }
                self.record(mac, "tftp", &detail);
                if node.is_some() {
                    self.note(mac, "tftp", &detail);
                }
                self.print(|| format!("{} {} {} tftp {detail}", stamp(), mac, node.as_deref().unwrap_or("unknown")));
            }
            None => self.print(|| format!("{} tftp {client} {detail}", stamp())),
        }
    }

    /// A DHCP exchange (the DHCP thread has recorded it already).
    pub fn dhcp(&mut self, ev: super::dhcp::DhcpEvent, site: &Site) {
        let name = site.node(ev.mac).map(|n| n.name.clone());
        if name.is_some() {
            self.note(ev.mac, ev.kind.as_str(), &ev.detail());
        }
        self.print(|| {
            format!(
                "{} {} {} {} {}",
                stamp(),
                ev.mac,
                name.as_deref().unwrap_or("unknown"),
                ev.kind.as_str(),
                ev.detail()
            )
        });
    }
}

/// At most `per_second` lines in any second.
struct LineBudget {
    per_second: u64,
    window: Instant,
    used: u64,
}

impl LineBudget {
    fn new(per_second: u64) -> LineBudget {
        LineBudget { per_second, window: Instant::now(), used: 0 }
    }

    fn take(&mut self) -> bool {
        if self.window.elapsed().as_secs() >= 1 {
            self.window = Instant::now();
            self.used = 0;
        }
        self.used += 1;
        self.used <= self.per_second
    }
}

/// Which machine is at which address, for attributing requests that name no MAC (blob downloads, TFTP).
#[derive(Default)]
struct Peers {
    /// Learned from requests that name a MAC (`/ipxe/{mac}`, `/overlay/{mac}`) from that address.
    seen: HashMap<IpAddr, Mac>,
}

impl Peers {
    /// Bound on remembered addresses (a /16 worth); beyond it the map starts afresh.
    const MAX: usize = 65_536;

    fn learn(&mut self, ip: IpAddr, mac: Mac) {
        let ip = Self::canonical(ip);
        if self.seen.len() >= Self::MAX && !self.seen.contains_key(&ip) {
            self.seen.clear();
        }
        self.seen.insert(ip, mac);
    }

    fn canonical(ip: IpAddr) -> IpAddr {
        match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        }
    }

    /// The machine at `ip`: the last one that named itself from there, else the holder of its DHCP lease, else the
    /// node with that fixed address.
    fn mac_of(&self, ip: IpAddr, site: &Site, state: &State) -> Option<Mac> {
        let ip = Self::canonical(ip);
        if let Some(mac) = self.seen.get(&ip) {
            return Some(*mac);
        }
        let IpAddr::V4(v4) = ip else { return None };
        if let Some(lease) = state.lease_on(v4) {
            return Some(lease.mac);
        }
        site.nodes.iter().find(|n| n.ipv4 == Some(v4)).map(|n| n.mac)
    }
}

fn stamp() -> String {
    let secs = unix_now();
    format!("{:02}:{:02}:{:02}", (secs / 3600) % 24, (secs / 60) % 60, secs % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_line_budget_refills_every_second() {
        let mut b = LineBudget::new(3);
        assert!(b.take() && b.take() && b.take());
        assert!(!b.take());
        b.window -= std::time::Duration::from_secs(1);
        assert!(b.take());
    }

    #[test]
    fn a_full_queue_is_counted_not_waited_for() {
        let dir = tempfile::tempdir().unwrap();
        let state = Arc::new(State::open(dir.path()).unwrap());
        let limits = Limits::default();
        // A queue of one and a writer that may be busy: sending many never blocks, and what did not fit is counted.
        let recorder = Recorder::start(state.clone(), 1, limits.clone()).unwrap();
        let mac: Mac = "52:54:00:00:00:01".parse().unwrap();
        for i in 0..10_000 {
            recorder.record(Record::Event { mac, kind: "x".into(), detail: i.to_string(), time: i });
        }
        let dropped = limits.snapshot().get("event_queue").copied().unwrap_or(0);
        drop(recorder);
        // Whatever was not dropped reaches the state (the writer drains its queue before it stops).
        let expected = (10_000 - dropped).min(crate::serve::state::EVENTS_PER_MAC) as usize;
        let deadline = Instant::now() + std::time::Duration::from_secs(20);
        while state.events(Some(mac), usize::MAX).unwrap().len() < expected {
            assert!(Instant::now() < deadline, "the writer did not drain its queue");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        assert!(dropped > 0, "a queue of one took 10,000 records without dropping any");
    }
}
