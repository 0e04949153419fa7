//! Heartbeats: `POST /heartbeat/{mac}` from a node's status agent (`kiln-node agent`), and the agent itself,
//! which kiln serve hands to every node inside its overlay.
//!
//! A heartbeat is accepted only when everything holds, checked in this order, each refusal counted under a limit
//! (reported every 10 s like the others, and in `/metrics`):
//!
//! 1. the MAC is a node of the recipe (else 404; `heartbeat_malformed`);
//! 2. it comes from that node's own address: its reservation, its active DHCP lease, or where kiln served its
//!    overlay in its last boot (sites where another DHCP server gives the addresses, proxy DHCP) (else 403;
//!    `heartbeat_foreign`): MACs are easy to guess, addresses on the provisioning network are not so easy to take;
//! 3. that node sent at most `heartbeat_max_per_interval` of them in the current interval (else 429;
//!    `heartbeat_max_per_interval`), so the state it lives in is written at a bounded rate;
//! 4. its body is at most `heartbeat_max_body` bytes (else 413, before it is read; `heartbeat_max_body`) and a
//!    well-formed report (else 400; `heartbeat_malformed`).
//!
//! A refused heartbeat changes nothing. An accepted one is answered `{"heartbeat":SECONDS}`, the interval the
//! agent should keep (so a reload that changes `[server] heartbeat` reaches running nodes).
//!
//! **The agent on the node.** At start kiln serve packs `kiln-node` ([`crate::util::node_binary`]) as
//! `/usr/lib/kiln/kiln-node` in a small gzip'd newc archive, once, and appends it to every node's overlay (the
//! kernel unpacks concatenated archives one after the other), so nothing is needed from the image and the
//! per-node overlays stay a few kilobytes in memory. kiln's init shim (`bundle::INIT_SHIM`) starts it in the
//! background before it execs the image's init. A dynamically linked `kiln-node` is refused: nodes run it on
//! images that may have no C library, or another one. Nodes whose image is built for another architecture
//! than `kiln-node` get no agent (their status stops at `booting`).

use std::io::Write;
use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::http::{HttpEvent, Shared};
use super::site::Site;
use super::state::{Heartbeat, Report};
use super::status::heartbeat_of;
use crate::archive::{Compression, Compressor, NewcTree};
use crate::net::Mac;
use crate::recipe::ServerRecipe;
use crate::util::unix_now;

/// Heartbeats one node may send per interval, by default: the periodic one, a goodbye and a new boot's first
/// fit with room to spare.
pub const MAX_PER_INTERVAL: u32 = 4;
/// Largest heartbeat body, by default (the agent sends about 300 bytes).
pub const MAX_BODY: usize = 4096;
/// Where the agent lands on the node.
pub const AGENT_PATH: &str = "usr/lib/kiln/kiln-node";

/// The heartbeat settings of `[server]`, with their defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    /// Seconds between heartbeats.
    pub interval: u64,
    pub max_per_interval: u32,
    pub max_body: usize,
}

impl Settings {
    pub fn of(server: &ServerRecipe) -> Settings {
        Settings {
            interval: heartbeat_of(server.heartbeat),
            max_per_interval: server.heartbeat_max_per_interval.unwrap_or(MAX_PER_INTERVAL).max(1),
            max_body: server.heartbeat_max_body.unwrap_or(MAX_BODY),
        }
    }

    /// Refuses settings that cannot work; the error names the key.
    pub fn check(server: &ServerRecipe) -> Result<()> {
        if let Some(h) = server.heartbeat {
            if !(1..=86_400).contains(&h) {
                bail!("[server] heartbeat = {h}: give seconds between 1 and 86400 (the default is 30)");
            }
        }
        if server.heartbeat_max_per_interval == Some(0) {
            bail!("[server] heartbeat_max_per_interval = 0 would refuse every heartbeat (the default is 4)");
        }
        if let Some(b) = server.heartbeat_max_body {
            if b < 512 {
                bail!("[server] heartbeat_max_body = {b}: an agent's heartbeat needs about 300 bytes (give at least 512; the default is 4096)");
            }
        }
        Ok(())
    }
}

/// Parses and checks a heartbeat's body. The error says what is wrong, for the 400 answer.
pub fn parse_report(body: &[u8]) -> Result<Report, String> {
    let r: Report = serde_json::from_slice(body).map_err(|e| format!("not a heartbeat: {e}"))?;
    let printable = |s: &str, max: usize| s.len() <= max && s.bytes().all(|b| b.is_ascii_graphic());
    if !matches!(r.event.as_str(), "up" | "stop") {
        return Err(format!("event {:?}: expected \"up\" or \"stop\"", r.event));
    }
    // A hundred years of uptime, a load of a million: beyond either, the numbers are made up.
    if !(r.uptime.is_finite() && (0.0..=3.2e9).contains(&r.uptime)) {
        return Err(format!("uptime {} is not a number of seconds", r.uptime));
    }
    if !r.load.iter().all(|l| l.is_finite() && (0.0..=1e6).contains(l)) {
        return Err(format!("load {:?} is not three load averages", r.load));
    }
    if r.mem_available > r.mem_total {
        return Err(format!("mem_available {} is more than mem_total {}", r.mem_available, r.mem_total));
    }
    if r.kernel.is_empty() || !printable(&r.kernel, 128) {
        return Err(format!("kernel {:?} is not a kernel release", r.kernel));
    }
    let digest_ok = r.image.is_empty()
        || r.image.strip_prefix("sha256:").is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()));
    if !digest_ok {
        return Err(format!("image {:?} is not a sha256: digest", r.image));
    }
    if !(r.boot_id.len() <= 64 && r.boot_id.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')) {
        return Err(format!("boot_id {:?} is not a boot id", r.boot_id));
    }
    if !printable(&r.agent, 32) {
        return Err(format!("agent {:?} is not a version", r.agent));
    }
    Ok(r)
}

/// The answer to a heartbeat request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub status: u16,
    pub reason: &'static str,
    pub body: String,
    /// For a 429: when to come back (seconds).
    pub retry_after: Option<u64>,
}

impl Answer {
    fn refused(status: u16, reason: &'static str, body: String) -> Answer {
        Answer { status, reason, body, retry_after: None }
    }
}

/// Handles `POST /heartbeat/{mac}` (`mac` is the path's last part, `body` what the request carried).
pub fn handle(site: &Site, shared: &Shared, mac: &str, client: IpAddr, body: &[u8]) -> Answer {
    let settings = Settings::of(&site.server);
    let limits = &shared.limits;
    let malformed = || limits.limit("heartbeat_malformed", 0, "malformed heartbeats refused").refuse();
    let Ok(mac) = mac.parse::<Mac>() else {
        malformed();
        return Answer::refused(400, "Bad Request", format!("{mac:?} is not a MAC address\n"));
    };
    let Some(node) = site.node(mac) else {
        malformed();
        return Answer::refused(404, "Not Found", format!("{mac} is not a node of this site\n"));
    };
    let Some(tracker) = &shared.status else {
        return Answer::refused(503, "Service Unavailable", "this server keeps no node status\n".into());
    };
    let own = super::http::is_node_address(site, shared.state.as_deref(), mac, client)
        || tracker.overlay_address(mac).is_some_and(|a| super::http::same_address(a, client));
    if !own {
        limits.limit("heartbeat_foreign", 0, "heartbeats from another address than the node's refused").refuse();
        return Answer::refused(
            403,
            "Forbidden",
            format!("heartbeats of {} ({mac}) are accepted only from its own address; {client} is not\n", node.name),
        );
    }
    let interval = Duration::from_secs(settings.interval);
    if !tracker.admit(mac, settings.max_per_interval, interval, Instant::now()) {
        limits
            .limit("heartbeat_max_per_interval", settings.max_per_interval.into(), "heartbeats refused (too frequent)")
            .refuse();
        return Answer {
            status: 429,
            reason: "Too Many Requests",
            body: format!(
                "at most {} heartbeats per {} s from one node\n",
                settings.max_per_interval, settings.interval
            ),
            retry_after: Some(settings.interval),
        };
    }
    let report = match parse_report(body) {
        Ok(r) => r,
        Err(why) => {
            malformed();
            return Answer::refused(400, "Bad Request", format!("{why}\n"));
        }
    };
    let event = match report.event.as_str() {
        "stop" => Some((
            "shutdown",
            format!("the agent said goodbye after {} up", super::page::duration(report.uptime as u64)),
        )),
        _ => None,
    };
    let beat = Heartbeat { mac, received: unix_now(), from: client, report };
    let summary = format!(
        "kernel {}, {} after power-on, image {}",
        beat.report.kernel,
        super::page::duration(beat.report.uptime as u64),
        short_digest(&beat.report.image)
    );
    if tracker.heartbeat(beat) {
        super::metrics::boot_completed();
        shared.event(HttpEvent { mac: Some(mac), client, kind: "up", detail: summary });
    }
    if let Some((kind, detail)) = event {
        shared.event(HttpEvent { mac: Some(mac), client, kind, detail });
    }
    Answer { status: 200, reason: "OK", body: format!("{{\"heartbeat\":{}}}\n", settings.interval), retry_after: None }
}

/// `sha256:0123456789ab` for a digest, `unknown` for none.
pub fn short_digest(digest: &str) -> String {
    if digest.is_empty() {
        return "unknown".into();
    }
    digest.chars().take("sha256:".len() + 12).collect()
}

/// The agent, packed for nodes.
#[derive(Debug)]
pub struct Agent {
    /// The initrd segment: `kiln-node` at [`AGENT_PATH`] in a gzip'd newc archive (gzip: every kernel unpacks it).
    pub archive: Arc<Vec<u8>>,
    /// The architecture it runs on, as Linux names it (`x86_64`, `aarch64`), like a bundle's manifest.
    pub arch: &'static str,
}

/// Packs `binary` for nodes. Refuses a binary that is not a static executable.
pub fn agent_archive(binary: &Path) -> Result<Agent> {
    let head = read_head(binary)?;
    let arch = check_static(&head).with_context(|| {
        format!("{}: build kiln-node with scripts/build-node.sh (a static executable)", binary.display())
    })?;
    let mut tree = NewcTree::default();
    tree.file(AGENT_PATH, binary, 0o755)?;
    let comp = Compressor::new(Vec::new(), Compression::Gzip, 6, 1)?;
    let (mut comp, _) = tree.write(comp, 0)?;
    comp.flush()?;
    let archive = comp.finish().with_context(|| format!("packing {}", binary.display()))?;
    Ok(Agent { archive: Arc::new(archive), arch })
}

fn read_head(path: &Path) -> Result<Vec<u8>> {
    use std::io::Read;
    let mut head = Vec::with_capacity(64 * 1024);
    std::fs::File::open(path)
        .and_then(|f| f.take(64 * 1024).read_to_end(&mut head))
        .with_context(|| format!("reading {}", path.display()))?;
    Ok(head)
}

/// Checks that `head` (the first bytes of a file) is a 64-bit little-endian ELF executable with no program
/// interpreter, i.e. linked statically, for x86_64 or aarch64; returns which.
pub fn check_static(head: &[u8]) -> Result<&'static str> {
    if head.len() < 64 || &head[..4] != b"\x7fELF" {
        bail!("not an ELF executable");
    }
    if head[4] != 2 || head[5] != 1 {
        bail!("not a 64-bit little-endian ELF executable");
    }
    let u16_at = |o: usize| u16::from_le_bytes([head[o], head[o + 1]]) as usize;
    let arch = match u16_at(0x12) {
        62 => "x86_64",
        183 => "aarch64",
        other => bail!("an executable for machine type {other}, neither x86_64 nor aarch64"),
    };
    let phoff = u64::from_le_bytes(head[0x20..0x28].try_into().expect("8 bytes")) as usize;
    let (phentsize, phnum) = (u16_at(0x36), u16_at(0x38));
    for i in 0..phnum {
        let at = phoff + i * phentsize;
        let Some(p_type) = head.get(at..at + 4) else { bail!("its program headers are not where the ELF header says") };
        const PT_INTERP: u32 = 3;
        if u32::from_le_bytes(p_type.try_into().expect("4 bytes")) == PT_INTERP {
            bail!("it is dynamically linked (it names a program interpreter)");
        }
    }
    Ok(arch)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(event: &str) -> String {
        format!(
            r#"{{"event":"{event}","uptime":41.5,"load":[0.1,0.2,0.3],"mem_total":1000,"mem_available":600,"kernel":"6.1.0-28-amd64","image":"sha256:{}","boot_id":"0b1c-22","agent":"0.1.0"}}"#,
            "a".repeat(64)
        )
    }

    #[test]
    fn reports_are_checked() {
        let r = parse_report(body("up").as_bytes()).unwrap();
        assert_eq!((r.uptime, r.mem_total, r.kernel.as_str()), (41.5, 1000, "6.1.0-28-amd64"));
        assert!(parse_report(body("stop").as_bytes()).is_ok());
        let bad = [
            (body("reboot"), "event"),
            (body("up").replace("41.5", "-1"), "uptime"),
            (body("up").replace("0.1,0.2,0.3", "0.1,0.2"), "not a heartbeat"),
            (body("up").replace("\"mem_available\":600", "\"mem_available\":6000"), "mem_available"),
            (body("up").replace("6.1.0-28-amd64", "6.1 <script>"), "kernel"),
            (body("up").replace("sha256:", "md5:"), "image"),
            (body("up").replace("0b1c-22", "x/../y"), "boot_id"),
            ("{\"event\":\"up\"".to_string(), "not a heartbeat"),
            ("\u{0}\u{1}garbage".to_string(), "not a heartbeat"),
        ];
        for (text, why) in bad {
            let err = parse_report(text.as_bytes()).unwrap_err();
            assert!(err.contains(why), "{text}: {err}");
        }
    }

    #[test]
    fn settings_have_defaults_and_refuse_what_cannot_work() {
        let s = Settings::of(&ServerRecipe::default());
        assert_eq!(s, Settings { interval: 30, max_per_interval: 4, max_body: 4096 });
        let server = ServerRecipe { heartbeat: Some(0), ..ServerRecipe::default() };
        assert!(Settings::check(&server).unwrap_err().to_string().contains("[server] heartbeat = 0"));
        let server = ServerRecipe { heartbeat_max_body: Some(10), ..ServerRecipe::default() };
        assert!(Settings::check(&server).unwrap_err().to_string().contains("heartbeat_max_body"));
        assert!(Settings::check(&ServerRecipe { heartbeat: Some(2), ..ServerRecipe::default() }).is_ok());
    }

    #[test]
    fn only_static_executables_are_served_to_nodes() {
        let own = read_head(&std::env::current_exe().unwrap()).unwrap();
        // The test binary is linked dynamically (tests are built without +crt-static).
        assert!(check_static(&own).unwrap_err().to_string().contains("dynamically linked"));
        assert!(check_static(b"#!/bin/sh\necho hello\n").unwrap_err().to_string().contains("not an ELF"));
        // A static one: the same header with its PT_INTERP entry turned into PT_NULL.
        let mut head = own.clone();
        let phoff = u64::from_le_bytes(head[0x20..0x28].try_into().unwrap()) as usize;
        let (size, num) =
            (u16::from_le_bytes([head[0x36], head[0x37]]) as usize, u16::from_le_bytes([head[0x38], head[0x39]]));
        for i in 0..num as usize {
            let at = phoff + i * size;
            if head[at..at + 4] == 3u32.to_le_bytes() {
                head[at..at + 4].copy_from_slice(&0u32.to_le_bytes());
            }
        }
        assert_eq!(check_static(&head).unwrap(), std::env::consts::ARCH);
        assert_eq!(short_digest(&format!("sha256:{}", "0123456789abcdef".repeat(4))), "sha256:0123456789ab");
    }
}
