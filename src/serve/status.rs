//! Node status: what each node of the site is doing, from what kiln serve heard of it: its boot events (DHCP, TFTP,
//! its script, kernel and initrds, overlay) and its agent's heartbeats ([`super::heartbeat`]).
//!
//! | state | meaning |
//! | --- | --- |
//! | `off` | never heard of, or its agent said goodbye (stage `shutdown`) |
//! | `booting` | boot steps heard since its last heartbeat; the stage is the last one (`dhcp-ack`, `tftp`, `script`, `kernel`, `initramfs`, `image`, `overlay`) |
//! | `up` | its agent reported within the last 3 heartbeat intervals |
//! | `lost` | it was up, and its agent has been silent for longer than that |
//! | `unknown` | a machine that is not a node of the recipe (`kiln node status --unknown`) |
//!
//! A running node renews its DHCP lease now and then: a DHCP exchange after a fresh heartbeat does not make it
//! `booting`, a TFTP transfer or a script request (only firmware and iPXE ask for those) does.
//!
//! The server keeps what it heard in a [`Tracker`] (memory, nodes of the recipe only) and heartbeats in its state
//! database; `kiln node status` asks the running server over the control socket, or reads the database when no
//! server runs ([`query`]).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::bootlog::Recorder;
use super::control::{self, Query};
use super::site::Site;
use super::state::{Heartbeat, Record, State};
use crate::net::Mac;
use crate::recipe::{LoadedRecipe, Node};
use crate::util::unix_now;

/// Seconds between heartbeats when `[server] heartbeat` is not set.
pub const DEFAULT_HEARTBEAT: u64 = 30;
/// A node whose agent is silent for this many intervals is `lost`.
pub const LOST_AFTER: u64 = 3;

/// What a machine is doing, as far as kiln serve knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeState {
    Off,
    Booting,
    Up,
    Lost,
    Unknown,
}

impl NodeState {
    pub const ALL: [NodeState; 5] =
        [NodeState::Off, NodeState::Booting, NodeState::Up, NodeState::Lost, NodeState::Unknown];

    pub fn as_str(self) -> &'static str {
        match self {
            NodeState::Off => "off",
            NodeState::Booting => "booting",
            NodeState::Up => "up",
            NodeState::Lost => "lost",
            NodeState::Unknown => "unknown",
        }
    }
}

impl std::fmt::Display for NodeState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A boot step heard of a machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// Unix seconds.
    pub time: u64,
    pub kind: String,
    pub detail: String,
}

/// What the server heard of one machine.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Seen {
    /// Its last boot step.
    pub step: Option<Step>,
    /// When it last began to boot: its last TFTP transfer or script request.
    pub boot_started: Option<u64>,
    pub heartbeat: Option<Heartbeat>,
}

/// Whether an event of this kind is a step of a boot (and not, say, the agent's `up`).
fn is_boot_step(kind: &str) -> bool {
    kind.starts_with("dhcp-")
        || kind.starts_with("proxydhcp-")
        || matches!(kind, "tftp" | "script" | "blob" | "overlay" | "arch-mismatch")
}

/// Whether an event of this kind means the machine is booting again: only firmware and iPXE ask for these.
fn starts_boot(kind: &str) -> bool {
    matches!(kind, "tftp" | "script")
}

impl Seen {
    /// Notes a boot event (other events are ignored).
    pub fn event(&mut self, kind: &str, detail: &str, time: u64) {
        if !is_boot_step(kind) {
            return;
        }
        if self.step.as_ref().is_none_or(|s| time >= s.time) {
            self.step = Some(Step { time, kind: kind.to_string(), detail: detail.to_string() });
        }
        if starts_boot(kind) && self.boot_started.is_none_or(|t| time >= t) {
            self.boot_started = Some(time);
        }
    }

    /// When anything was last heard of the machine.
    pub fn last_seen(&self) -> Option<u64> {
        let step = self.step.as_ref().map(|s| s.time);
        let beat = self.heartbeat.as_ref().map(|h| h.received);
        step.max(beat)
    }

    /// Its state and stage at `now`, a heartbeat being due every `heartbeat` seconds.
    pub fn state(&self, now: u64, heartbeat: u64) -> (NodeState, Option<String>) {
        let beat = self.heartbeat.as_ref();
        let after_beat = |t: u64| beat.is_none_or(|h| t > h.received);
        let fresh =
            beat.is_some_and(|h| h.report.event == "up" && now.saturating_sub(h.received) <= heartbeat * LOST_AFTER);
        if let Some(step) = &self.step {
            // After a fresh heartbeat, only a new boot's first steps count (lease renewals do not).
            if after_beat(step.time) && (!fresh || self.boot_started.is_some_and(after_beat)) {
                return (NodeState::Booting, Some(stage(step)));
            }
        }
        match beat {
            Some(h) if h.report.event == "stop" => (NodeState::Off, Some("shutdown".into())),
            Some(_) if fresh => (NodeState::Up, Some("heartbeat".into())),
            Some(_) => (NodeState::Lost, Some("heartbeat".into())),
            None => (NodeState::Off, None),
        }
    }
}

/// A boot step as a stage: the event's kind, or for a download the file (`kernel`, `initramfs`, `image`).
fn stage(step: &Step) -> String {
    if step.kind == "blob" {
        // "IMAGE/kernel 123 bytes in 0.4s"
        if let Some(file) = step.detail.split_whitespace().next().and_then(|label| label.rsplit('/').next()) {
            return file.to_string();
        }
    }
    step.kind.clone()
}

/// One machine's status, as `kiln node status --json` prints it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeStatus {
    /// The node's name; none for a machine that is not a node.
    pub node: Option<String>,
    pub mac: Mac,
    pub state: NodeState,
    /// The last thing heard: a boot step while `booting`, `heartbeat` when `up` or `lost`, `shutdown`.
    pub stage: Option<String>,
    /// Unix seconds.
    pub last_seen: Option<u64>,
    /// The image the recipe gives it.
    pub image: Option<String>,
    /// The digest of the image its agent says it booted.
    pub image_digest: Option<String>,
    /// Its reserved address, else its DHCP lease, else where its heartbeats come from.
    pub address: Option<IpAddr>,
    /// When it last booted (unix seconds): from its uptime once its agent reports, else its last boot's start.
    pub booted: Option<u64>,
    /// The rest is filled in while it is `up`. Seconds.
    pub uptime: Option<u64>,
    pub load: Option<[f64; 3]>,
    /// Bytes.
    pub mem_used: Option<u64>,
    pub mem_total: Option<u64>,
    pub kernel: Option<String>,
}

/// The status of one machine from what was heard of it.
pub fn status_of(
    node: Option<&Node>,
    mac: Mac,
    seen: Option<&Seen>,
    lease: Option<Ipv4Addr>,
    now: u64,
    heartbeat: u64,
) -> NodeStatus {
    let empty = Seen::default();
    let seen = seen.unwrap_or(&empty);
    let (mut state, stage) = seen.state(now, heartbeat);
    if node.is_none() {
        state = NodeState::Unknown;
    }
    let beat = seen.heartbeat.as_ref();
    let up = state == NodeState::Up;
    let report = beat.filter(|_| up).map(|h| &h.report);
    let booted = match beat {
        Some(h) if matches!(state, NodeState::Up | NodeState::Lost) => {
            Some(h.received.saturating_sub(h.report.uptime as u64))
        }
        _ => seen.boot_started,
    };
    NodeStatus {
        node: node.map(|n| n.name.clone()),
        mac,
        state,
        stage,
        last_seen: seen.last_seen(),
        image: node.map(|n| n.image.clone()),
        image_digest: beat.map(|h| h.report.image.clone()).filter(|d| !d.is_empty()),
        address: node.and_then(|n| n.ipv4).or(lease).map(IpAddr::V4).or(beat.map(|h| h.from)),
        booted,
        uptime: beat.filter(|_| up).map(|h| h.report.uptime as u64 + now.saturating_sub(h.received)),
        load: report.map(|r| r.load),
        mem_used: report.map(|r| r.mem_total.saturating_sub(r.mem_available)),
        mem_total: report.map(|r| r.mem_total),
        kernel: report.map(|r| r.kernel.clone()),
    }
}

/// The status of every node, in the recipe's order.
pub fn nodes_status(
    nodes: &[Node],
    seen: &HashMap<Mac, Seen>,
    lease: impl Fn(Mac) -> Option<Ipv4Addr>,
    now: u64,
    heartbeat: u64,
) -> Vec<NodeStatus> {
    nodes.iter().map(|n| status_of(Some(n), n.mac, seen.get(&n.mac), lease(n.mac), now, heartbeat)).collect()
}

/// What was heard of `macs`, read from the state database: their heartbeats and their recent boot events.
pub fn seen_in(state: &State, macs: impl IntoIterator<Item = Mac>) -> Result<HashMap<Mac, Seen>> {
    let mut beats: HashMap<Mac, Heartbeat> = state.heartbeats()?.into_iter().map(|h| (h.mac, h)).collect();
    let mut out = HashMap::new();
    for mac in macs {
        let mut seen = Seen { heartbeat: beats.remove(&mac), ..Seen::default() };
        // A boot is a few dozen events: the last 64 hold its start.
        for e in state.events(Some(mac), 64)? {
            seen.event(&e.kind, &e.detail, e.time);
        }
        out.insert(mac, seen);
    }
    Ok(out)
}

/// An active lease's address for `mac`.
fn leased(state: &State, mac: Mac, now: u64) -> Option<Ipv4Addr> {
    state.lease(mac).ok().flatten().filter(|l| l.active(now)).map(|l| l.ip)
}

/// Machines that asked to boot but are not nodes, as `unknown` rows.
fn unknown_status(state: &State, nodes: &[Node], now: u64) -> Result<Vec<NodeStatus>> {
    let mut out = Vec::new();
    for d in state.discovered()? {
        if nodes.iter().any(|n| n.mac == d.mac) {
            continue;
        }
        let mut seen = Seen::default();
        for e in state.events(Some(d.mac), 1)? {
            seen.event(&e.kind, &e.detail, e.time);
        }
        let mut row = status_of(None, d.mac, Some(&seen), leased(state, d.mac, now), now, DEFAULT_HEARTBEAT);
        row.last_seen = row.last_seen.max(Some(d.last_seen));
        out.push(row);
    }
    out.sort_by_key(|r| r.mac);
    Ok(out)
}

/// What the running server knows of its nodes: every node's [`Seen`] (memory, fed by the boot log and the
/// heartbeat route), and how often each node's agent may report.
///
/// It holds nodes of the recipe only (callers check), so it is as large as the node list; nodes removed from the
/// recipe are forgotten on reload ([`Tracker::retain`]).
pub struct Tracker {
    seen: Mutex<HashMap<Mac, Seen>>,
    windows: Mutex<HashMap<Mac, (Instant, u32)>>,
    /// Where each node's overlay went last: its address in its last boot, where kiln leased none (proxy DHCP).
    overlay_to: Mutex<HashMap<Mac, IpAddr>>,
    recorder: Option<Recorder>,
}

impl Tracker {
    /// A tracker that starts from `seen` and writes heartbeats to the state through `recorder`.
    pub fn new(seen: HashMap<Mac, Seen>, recorder: Option<Recorder>) -> Tracker {
        Tracker {
            seen: Mutex::new(seen),
            windows: Mutex::new(HashMap::new()),
            overlay_to: Mutex::new(HashMap::new()),
            recorder,
        }
    }

    /// Node `mac`'s overlay was served to `client`.
    pub fn overlay_served(&self, mac: Mac, client: IpAddr) {
        self.overlay_to.lock().unwrap_or_else(|e| e.into_inner()).insert(mac, client);
    }

    /// Where node `mac`'s overlay went last, if it went anywhere since the server started.
    pub fn overlay_address(&self, mac: Mac) -> Option<IpAddr> {
        self.overlay_to.lock().unwrap_or_else(|e| e.into_inner()).get(&mac).copied()
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<Mac, Seen>> {
        self.seen.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A boot event of node `mac`.
    pub fn event(&self, mac: Mac, kind: &str, detail: &str, time: u64) {
        if is_boot_step(kind) {
            self.lock().entry(mac).or_default().event(kind, detail, time);
        }
    }

    /// A heartbeat of a node, already checked; it is also queued for the state database. Returns whether it is
    /// the first of a new boot (the node just came up).
    pub fn heartbeat(&self, beat: Heartbeat) -> bool {
        let new_boot = {
            let mut all = self.lock();
            let seen = all.entry(beat.mac).or_default();
            let new_boot = beat.report.event == "up"
                && match &seen.heartbeat {
                    None => true,
                    Some(last) => {
                        last.report.event != "up"
                            || seen.boot_started.is_some_and(|t| t > last.received)
                            || if beat.report.boot_id.is_empty() || last.report.boot_id.is_empty() {
                                beat.report.uptime < last.report.uptime
                            } else {
                                beat.report.boot_id != last.report.boot_id
                            }
                    }
                };
            seen.heartbeat = Some(beat.clone());
            new_boot
        };
        if let Some(recorder) = &self.recorder {
            recorder.record(Record::Heartbeat(beat));
        }
        new_boot
    }

    /// Counts a heartbeat of `mac` against `max` per `interval`: false when this one is over.
    pub fn admit(&self, mac: Mac, max: u32, interval: Duration, now: Instant) -> bool {
        let mut windows = self.windows.lock().unwrap_or_else(|e| e.into_inner());
        let window = windows.entry(mac).or_insert((now, 0));
        if now.duration_since(window.0) >= interval {
            *window = (now, 0);
        }
        window.1 += 1;
        window.1 <= max
    }

    /// Forgets machines for which `keep` says no (after a reload removed nodes).
    pub fn retain(&self, keep: impl Fn(Mac) -> bool) {
        self.lock().retain(|mac, _| keep(*mac));
        self.windows.lock().unwrap_or_else(|e| e.into_inner()).retain(|mac, _| keep(*mac));
        self.overlay_to.lock().unwrap_or_else(|e| e.into_inner()).retain(|mac, _| keep(*mac));
    }

    /// A copy of what was heard.
    pub fn seen(&self) -> HashMap<Mac, Seen> {
        self.lock().clone()
    }

    /// The status of every node of `site` now, and with `unknown` of the machines that are not nodes.
    pub fn status(&self, site: &Site, state: Option<&State>, unknown: bool) -> Result<Vec<NodeStatus>> {
        let now = unix_now();
        let seen = self.seen();
        let heartbeat = heartbeat_of(site.server.heartbeat);
        let mut rows = nodes_status(&site.nodes, &seen, |mac| state.and_then(|s| leased(s, mac, now)), now, heartbeat);
        if let (true, Some(state)) = (unknown, state) {
            rows.extend(unknown_status(state, &site.nodes, now)?);
        }
        Ok(rows)
    }

    /// How many nodes of `site` are in each state now.
    pub fn counts(&self, site: &Site) -> Vec<(NodeState, usize)> {
        let now = unix_now();
        let heartbeat = heartbeat_of(site.server.heartbeat);
        let seen = self.lock();
        let mut counts: HashMap<NodeState, usize> = HashMap::new();
        for n in &site.nodes {
            let state = seen.get(&n.mac).map(|s| s.state(now, heartbeat).0).unwrap_or(NodeState::Off);
            *counts.entry(state).or_default() += 1;
        }
        NodeState::ALL
            .iter()
            .filter(|s| **s != NodeState::Unknown)
            .map(|s| (*s, counts.get(s).copied().unwrap_or(0)))
            .collect()
    }
}

/// The heartbeat interval `[server] heartbeat` asks for (seconds, at least 1).
pub fn heartbeat_of(configured: Option<u64>) -> u64 {
    configured.unwrap_or(DEFAULT_HEARTBEAT).max(1)
}

/// The status of the recipe's nodes (with `unknown`, of other machines that asked to boot too): from the running
/// `kiln serve` that holds the state in `dir`, else from the database there and the recipe.
pub fn query(dir: &Path, loaded: Option<&LoadedRecipe>, unknown: bool) -> Result<Vec<NodeStatus>> {
    if let Some(answer) = control::ask_running(dir, &Query::Status { unknown })? {
        return serde_json::from_value(answer).context("reading kiln serve's node status");
    }
    let Some(loaded) = loaded else {
        bail!("no kiln serve runs with the state in {} and there is no recipe to say what the nodes are", dir.display())
    };
    let nodes = loaded.nodes()?;
    let heartbeat = heartbeat_of(loaded.recipe.server.as_ref().and_then(|s| s.heartbeat));
    let state = State::open(dir)?;
    let now = unix_now();
    let seen = seen_in(&state, nodes.iter().map(|n| n.mac))?;
    let mut rows = nodes_status(&nodes, &seen, |mac| leased(&state, mac, now), now, heartbeat);
    if unknown {
        rows.extend(unknown_status(&state, &nodes, now)?);
    }
    Ok(rows)
}

/// The state of node `name` (a node's name or MAC): what `kiln power cycle --wait` waits on. Asks the running
/// server, else reads the state in `dir`.
pub fn node_state(dir: &Path, loaded: Option<&LoadedRecipe>, name: &str) -> Result<NodeState> {
    let rows = query(dir, loaded, false)?;
    let mac = name.parse::<Mac>().ok();
    rows.iter()
        .find(|r| r.node.as_deref() == Some(name) || Some(r.mac) == mac)
        .map(|r| r.state)
        .with_context(|| format!("{name:?} is not a node of the recipe"))
}

/// What the control socket answers to [`Query::Status`] while the server runs.
#[derive(Clone)]
pub struct Live {
    pub tracker: Arc<Tracker>,
    pub site: tokio::sync::watch::Receiver<Arc<Site>>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serve::state::Report;

    const MAC: Mac = Mac([0x52, 0x54, 0, 0xaa, 0xbb, 0x42]);

    fn beat(received: u64, event: &str, boot_id: &str, uptime: f64) -> Heartbeat {
        Heartbeat {
            mac: MAC,
            received,
            from: "10.4.0.42".parse().unwrap(),
            report: Report {
                event: event.into(),
                uptime,
                load: [0.5, 0.25, 0.125],
                mem_total: 1000,
                mem_available: 400,
                kernel: "6.1.0-28-amd64".into(),
                image: "sha256:ab".into(),
                boot_id: boot_id.into(),
                agent: "0.1.0".into(),
            },
        }
    }

    fn node() -> Node {
        let text = "[node.n042]\nmac = \"52:54:00:aa:bb:42\"\nimage = \"compute\"\nipv4 = \"10.4.0.42/24\"\n";
        let recipe = crate::recipe::parse(text).unwrap();
        LoadedRecipe { path: "kiln.toml".into(), recipe }.nodes().unwrap().remove(0)
    }

    #[test]
    fn a_boot_goes_off_booting_up_lost() {
        let mut seen = Seen::default();
        assert_eq!(seen.state(100, 30), (NodeState::Off, None));
        seen.event("dhcp-ack", "10.4.0.42 undionly.kpxe", 100);
        assert_eq!(seen.state(100, 30), (NodeState::Booting, Some("dhcp-ack".into())));
        seen.event("tftp", "undionly.kpxe 81000 bytes in 0.4s", 101);
        seen.event("script", "n042", 110);
        seen.event("blob", "compute/initramfs 1000 bytes in 0.1s", 111);
        assert_eq!(seen.state(112, 30), (NodeState::Booting, Some("initramfs".into())));
        // The agent's own events are not boot steps.
        seen.event("up", "kernel 6.1", 140);
        assert_eq!(seen.step.as_ref().unwrap().time, 111);
        seen.heartbeat = Some(beat(140, "up", "b1", 20.0));
        assert_eq!(seen.state(140, 30), (NodeState::Up, Some("heartbeat".into())));
        assert_eq!(seen.state(230, 30).0, NodeState::Up, "3 intervals of silence are allowed");
        assert_eq!(seen.state(231, 30).0, NodeState::Lost);
        // A lease renewal does not make a running node booting; a new boot's TFTP transfer does.
        seen.event("dhcp-ack", "10.4.0.42", 150);
        assert_eq!(seen.state(150, 30).0, NodeState::Up);
        seen.event("tftp", "undionly.kpxe", 160);
        assert_eq!(seen.state(160, 30), (NodeState::Booting, Some("tftp".into())));
        // A lost node heard from again over DHCP is booting.
        let mut lost = Seen { heartbeat: Some(beat(140, "up", "b1", 20.0)), ..Seen::default() };
        lost.event("dhcp-offer", "10.4.0.42", 500);
        assert_eq!(lost.state(500, 30), (NodeState::Booting, Some("dhcp-offer".into())));
        // A goodbye is off.
        let stopped = Seen { heartbeat: Some(beat(140, "stop", "b1", 20.0)), ..Seen::default() };
        assert_eq!(stopped.state(141, 30), (NodeState::Off, Some("shutdown".into())));
    }

    #[test]
    fn a_row_has_the_numbers_while_up() {
        let n = node();
        let seen = Seen { heartbeat: Some(beat(1000, "up", "b1", 60.4)), ..Seen::default() };
        let row = status_of(Some(&n), MAC, Some(&seen), None, 1010, 30);
        assert_eq!(row.state, NodeState::Up);
        assert_eq!((row.uptime, row.booted, row.last_seen), (Some(70), Some(940), Some(1000)));
        assert_eq!((row.mem_used, row.mem_total), (Some(600), Some(1000)));
        assert_eq!(row.address, Some("10.4.0.42".parse().unwrap()));
        assert_eq!((row.image.as_deref(), row.image_digest.as_deref()), (Some("compute"), Some("sha256:ab")));
        let json = serde_json::to_value(&row).unwrap();
        for key in ["node", "mac", "state", "stage", "last_seen", "image"] {
            assert!(json.get(key).is_some(), "{key} missing from {json}");
        }
        assert_eq!(json["state"], "up");
        assert_eq!(json["mac"], "52:54:00:aa:bb:42");
        let lost = status_of(Some(&n), MAC, Some(&seen), None, 2000, 30);
        assert_eq!((lost.state, lost.uptime, lost.kernel), (NodeState::Lost, None, None));
        assert_eq!(lost.booted, Some(940));
        let never = status_of(Some(&n), MAC, None, None, 2000, 30);
        assert_eq!((never.state, never.stage, never.last_seen), (NodeState::Off, None, None));
    }

    #[test]
    fn new_boots_are_told_apart_and_heartbeats_are_rate_limited() {
        let t = Tracker::new(HashMap::new(), None);
        assert!(t.heartbeat(beat(100, "up", "b1", 10.0)));
        assert!(!t.heartbeat(beat(130, "up", "b1", 40.0)));
        assert!(t.heartbeat(beat(400, "up", "b2", 12.0)), "a new boot id");
        assert!(!t.heartbeat(beat(430, "stop", "b2", 42.0)));
        assert!(t.heartbeat(beat(500, "up", "b2", 5.0)), "up after a goodbye");
        assert!(t.heartbeat(beat(600, "up", "", 3.0)), "an agent without a boot id: its uptime went down");
        let start = Instant::now();
        let interval = Duration::from_secs(30);
        assert!((0..4).all(|_| t.admit(MAC, 4, interval, start)));
        assert!(!t.admit(MAC, 4, interval, start + Duration::from_secs(29)));
        assert!(t.admit(MAC, 4, interval, start + interval), "a new interval");
        t.retain(|_| false);
        assert!(t.seen().is_empty());
    }
}
