//! `GET /metrics`: what kiln serve did, in the Prometheus text exposition format (version 0.0.4), for any
//! Prometheus-compatible scraper.
//!
//! Counters since the process started: DHCP packets by message type and result, TFTP and HTTP transfers and bytes,
//! HTTP requests by route and status class, boots started (a node fetched its script) and completed (its agent's
//! first heartbeat of a boot), errors by kind, and every limit's refusals ([`super::limits::Limits::snapshot`]).
//! Gauges read at scrape time: nodes by state ([`super::status`]), active leases, build info.
//!
//! The counters are the process's own (atomics in a static): the protocol servers run on threads of their own and
//! count where the work is done, with no handle to pass around and no lock on any hot path. One process serves one
//! site, so the process's counters are the server's. Label values are a fixed set: nothing a client sends becomes a
//! label.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use super::dhcp::DhcpEventKind;
use super::limits::Limits;
use super::site::Site;
use super::state::State;
use super::status::Tracker;

const DHCP_TYPES: [&str; 6] = ["discover", "request", "decline", "release", "inform", "other"];
const DHCP_RESULTS: [&str; 6] = ["offer", "ack", "nak", "recorded", "ignored", "failed"];
/// HTTP routes, as labels.
pub const HTTP_ROUTES: [&str; 9] =
    ["ipxe", "blob", "overlay", "boot_file", "heartbeat", "metrics", "status", "healthz", "other"];
const HTTP_CLASSES: [&str; 4] = ["2xx", "3xx", "4xx", "5xx"];
/// Kinds of errors counted.
const ERRORS: [&str; 4] = ["state_write", "lease_write", "dhcp_send", "http_file"];

/// An error worth counting, by kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The boot log or heartbeats could not be written to the state database.
    StateWrite,
    /// Leases a batch acknowledged could not be made durable (their DHCPACKs were not sent).
    LeaseWrite,
    /// A DHCP reply could not be sent.
    DhcpSend,
    /// A file to serve over HTTP could not be opened (answered 500).
    HttpFile,
}

struct Counters {
    dhcp: [[AtomicU64; DHCP_RESULTS.len()]; DHCP_TYPES.len()],
    tftp_transfers: [AtomicU64; 2],
    tftp_bytes: AtomicU64,
    http_requests: [[AtomicU64; HTTP_CLASSES.len()]; HTTP_ROUTES.len()],
    http_bytes: [AtomicU64; HTTP_ROUTES.len()],
    http_transfers: [AtomicU64; 2],
    boots_started: AtomicU64,
    boots_completed: AtomicU64,
    errors: [AtomicU64; ERRORS.len()],
    started: AtomicU64,
}

static COUNTERS: Counters = Counters {
    dhcp: [const { [const { AtomicU64::new(0) }; DHCP_RESULTS.len()] }; DHCP_TYPES.len()],
    tftp_transfers: [const { AtomicU64::new(0) }; 2],
    tftp_bytes: AtomicU64::new(0),
    http_requests: [const { [const { AtomicU64::new(0) }; HTTP_CLASSES.len()] }; HTTP_ROUTES.len()],
    http_bytes: [const { AtomicU64::new(0) }; HTTP_ROUTES.len()],
    http_transfers: [const { AtomicU64::new(0) }; 2],
    boots_started: AtomicU64::new(0),
    boots_completed: AtomicU64::new(0),
    errors: [const { AtomicU64::new(0) }; ERRORS.len()],
    started: AtomicU64::new(0),
};

fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

fn get(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}

/// Notes when the server started (unix seconds), for `kiln_start_time_seconds`.
pub fn started(now: u64) {
    COUNTERS.started.store(now, Ordering::Relaxed);
}

/// The DHCP message type of a request (option 53), as a label.
pub fn dhcp_type(packet: &[u8]) -> &'static str {
    // Fixed BOOTP header (236 bytes) and the magic cookie, then options: code, length, value.
    let mut i = 240;
    if packet.len() < i || packet[236..240] != [99, 130, 83, 99] {
        return "other";
    }
    while i < packet.len() {
        match packet[i] {
            0 => i += 1,
            255 => break,
            code => {
                let Some(&len) = packet.get(i + 1) else { break };
                if code == 53 && len >= 1 {
                    return match packet.get(i + 2) {
                        Some(1) => "discover",
                        Some(3) => "request",
                        Some(4) => "decline",
                        Some(7) => "release",
                        Some(8) => "inform",
                        _ => "other",
                    };
                }
                i += 2 + len as usize;
            }
        }
    }
    "other"
}

fn dhcp_count(kind: &str, result: &str, n: u64) {
    let t = DHCP_TYPES.iter().position(|k| *k == kind).unwrap_or(DHCP_TYPES.len() - 1);
    let r = DHCP_RESULTS.iter().position(|k| *k == result).unwrap_or(0);
    add(&COUNTERS.dhcp[t][r], n);
}

/// A DHCP request the server decided not to answer (nor record).
pub fn dhcp_ignored(packet: &[u8]) {
    dhcp_count(dhcp_type(packet), "ignored", 1);
}

/// A DHCP request answered (or recorded, for RELEASE and DECLINE), by what the answer was.
pub fn dhcp_answered(kind: DhcpEventKind) {
    let (t, r) = match kind {
        DhcpEventKind::Offer | DhcpEventKind::ProxyOffer => ("discover", "offer"),
        DhcpEventKind::Ack | DhcpEventKind::ProxyAck => ("request", "ack"),
        DhcpEventKind::Nak => ("request", "nak"),
        DhcpEventKind::Release => ("release", "recorded"),
        DhcpEventKind::Decline => ("decline", "recorded"),
        DhcpEventKind::Inform => ("inform", "ack"),
    };
    dhcp_count(t, r, 1);
}

/// A node's REQUEST to another DHCP server (proxy mode), its address noted.
pub fn dhcp_observed() {
    dhcp_count("request", "recorded", 1);
}

/// A DISCOVER from a machine that is not a node, recorded as discovered but not answered.
pub fn dhcp_unanswered_discover() {
    dhcp_count("discover", "recorded", 1);
}

/// DHCP requests whose ACK was withheld because their lease could not be written.
pub fn dhcp_failed(n: u64) {
    dhcp_count("request", "failed", n);
}

/// A TFTP transfer that ended: `bytes` sent when it finished, or a failure.
pub fn tftp_transfer(finished: bool, bytes: u64) {
    add(&COUNTERS.tftp_transfers[usize::from(!finished)], 1);
    add(&COUNTERS.tftp_bytes, bytes);
}

/// One HTTP response: its route (one of [`HTTP_ROUTES`]), status, the body bytes sent, and whether it was a file
/// transfer that `completed`.
pub fn http_response(route: &str, status: u16, bytes: u64, file: Option<bool>) {
    let r = HTTP_ROUTES.iter().position(|k| *k == route).unwrap_or(HTTP_ROUTES.len() - 1);
    let class = (status / 100).clamp(2, 5) as usize - 2;
    add(&COUNTERS.http_requests[r][class], 1);
    add(&COUNTERS.http_bytes[r], bytes);
    if let Some(completed) = file {
        add(&COUNTERS.http_transfers[usize::from(!completed)], 1);
    }
}

/// A node fetched its boot script.
pub fn boot_started() {
    add(&COUNTERS.boots_started, 1);
}

/// A node's agent reported the first time in a boot.
pub fn boot_completed() {
    add(&COUNTERS.boots_completed, 1);
}

pub fn error(kind: ErrorKind) {
    let i = match kind {
        ErrorKind::StateWrite => 0,
        ErrorKind::LeaseWrite => 1,
        ErrorKind::DhcpSend => 2,
        ErrorKind::HttpFile => 3,
    };
    add(&COUNTERS.errors[i], 1);
}

/// Writes metric families in the text format.
struct Families(String);

impl Families {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        self.0.push_str(name);
        if !labels.is_empty() {
            self.0.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.0.push(',');
                }
                let _ = write!(self.0, "{k}=\"{}\"", escape(v));
            }
            self.0.push('}');
        }
        let _ = writeln!(self.0, " {value}");
    }
}

/// A label value as the text format wants it: backslash, double quote and newline escaped.
fn escape(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// The `/metrics` page.
pub fn render(site: &Site, tracker: Option<&Tracker>, limits: &Limits, state: Option<&State>) -> String {
    let mut f = Families(String::with_capacity(8192));
    let c = &COUNTERS;
    f.family("kiln_build_info", "gauge", "kiln's version; always 1.");
    f.sample("kiln_build_info", &[("version", env!("CARGO_PKG_VERSION"))], 1);
    f.family("kiln_start_time_seconds", "gauge", "When kiln serve started, in unix seconds.");
    f.sample("kiln_start_time_seconds", &[], get(&c.started));
    f.family(
        "kiln_heartbeat_interval_seconds",
        "gauge",
        "Seconds between node agents' heartbeats ([server] heartbeat).",
    );
    f.sample("kiln_heartbeat_interval_seconds", &[], super::status::heartbeat_of(site.server.heartbeat));

    f.family("kiln_nodes", "gauge", "Nodes of the recipe by state (off, booting, up, lost).");
    match tracker {
        Some(t) => {
            for (state, n) in t.counts(site) {
                f.sample("kiln_nodes", &[("state", state.as_str())], n);
            }
        }
        None => f.sample("kiln_nodes", &[("state", "off")], site.nodes.len()),
    }
    if let Some(state) = state {
        let now = crate::util::unix_now();
        let active = state.leases().map(|l| l.iter().filter(|l| l.active(now)).count()).unwrap_or(0);
        f.family("kiln_dhcp_leases", "gauge", "DHCP leases in force.");
        f.sample("kiln_dhcp_leases", &[], active);
        let (events, discovered) = state.dropped();
        f.family(
            "kiln_state_dropped_total",
            "counter",
            "Records dropped at the state's caps (max_events, max_discovered).",
        );
        f.sample("kiln_state_dropped_total", &[("record", "event")], events);
        f.sample("kiln_state_dropped_total", &[("record", "discovered")], discovered);
    }

    f.family("kiln_dhcp_packets_total", "counter", "DHCP requests by message type and what came of them.");
    for (t, kind) in DHCP_TYPES.iter().enumerate() {
        for (r, result) in DHCP_RESULTS.iter().enumerate() {
            f.sample("kiln_dhcp_packets_total", &[("type", kind), ("result", result)], get(&c.dhcp[t][r]));
        }
    }
    f.family("kiln_dhcp_malformed_total", "counter", "DHCP packets that could not be parsed (dropped).");
    f.sample("kiln_dhcp_malformed_total", &[], super::dhcp::decide::MALFORMED_REQUESTS.load(Ordering::Relaxed));
    f.family("kiln_tftp_transfers_total", "counter", "TFTP transfers that ended, by result.");
    f.sample("kiln_tftp_transfers_total", &[("result", "ok")], get(&c.tftp_transfers[0]));
    f.sample("kiln_tftp_transfers_total", &[("result", "failed")], get(&c.tftp_transfers[1]));
    f.family("kiln_tftp_sent_bytes_total", "counter", "Bytes of files sent over TFTP by finished transfers.");
    f.sample("kiln_tftp_sent_bytes_total", &[], get(&c.tftp_bytes));
    f.family("kiln_http_requests_total", "counter", "HTTP requests by route and status class.");
    for (r, route) in HTTP_ROUTES.iter().enumerate() {
        for (k, class) in HTTP_CLASSES.iter().enumerate() {
            f.sample("kiln_http_requests_total", &[("route", route), ("code", class)], get(&c.http_requests[r][k]));
        }
    }
    f.family("kiln_http_sent_bytes_total", "counter", "Bytes of response bodies sent over HTTP, by route.");
    for (r, route) in HTTP_ROUTES.iter().enumerate() {
        f.sample("kiln_http_sent_bytes_total", &[("route", route)], get(&c.http_bytes[r]));
    }
    f.family("kiln_http_transfers_total", "counter", "HTTP file transfers (bundle files, firmware) by result.");
    f.sample("kiln_http_transfers_total", &[("result", "ok")], get(&c.http_transfers[0]));
    f.sample("kiln_http_transfers_total", &[("result", "failed")], get(&c.http_transfers[1]));
    f.family("kiln_boots_started_total", "counter", "Boots started: a node fetched its iPXE script.");
    f.sample("kiln_boots_started_total", &[], get(&c.boots_started));
    f.family(
        "kiln_boots_completed_total",
        "counter",
        "Boots completed: a node's agent reported for the first time in a boot.",
    );
    f.sample("kiln_boots_completed_total", &[], get(&c.boots_completed));
    f.family("kiln_errors_total", "counter", "Errors by kind (the server's output says what each was).");
    for (i, kind) in ERRORS.iter().enumerate() {
        f.sample("kiln_errors_total", &[("kind", kind)], get(&c.errors[i]));
    }
    f.family("kiln_limit_refused_total", "counter", "What each limit turned away (docs/serve.md, Limits).");
    for (name, refused) in limits.snapshot() {
        f.sample("kiln_limit_refused_total", &[("limit", name)], refused);
    }
    f.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dhcp_packet(options: &[u8]) -> Vec<u8> {
        let mut p = vec![0u8; 236];
        p.extend_from_slice(&[99, 130, 83, 99]);
        p.extend_from_slice(options);
        p
    }

    #[test]
    fn the_message_type_comes_from_option_53() {
        assert_eq!(dhcp_type(&dhcp_packet(&[53, 1, 1, 255])), "discover");
        assert_eq!(dhcp_type(&dhcp_packet(&[0, 0, 12, 2, b'n', b'1', 53, 1, 3, 255])), "request");
        assert_eq!(dhcp_type(&dhcp_packet(&[53, 1, 8])), "inform");
        assert_eq!(dhcp_type(&dhcp_packet(&[53, 1, 42])), "other");
        assert_eq!(dhcp_type(&dhcp_packet(&[12, 200])), "other", "a length past the end");
        assert_eq!(dhcp_type(&[1, 2, 3]), "other");
    }

    #[test]
    fn samples_are_written_in_the_text_format() {
        let mut f = Families(String::new());
        f.family("kiln_x_total", "counter", "An x.");
        f.sample("kiln_x_total", &[("kind", "a\"b\\c\nd"), ("code", "2xx")], 3);
        f.sample("kiln_y", &[], 1.5);
        assert_eq!(
            f.0,
            "# HELP kiln_x_total An x.\n# TYPE kiln_x_total counter\nkiln_x_total{kind=\"a\\\"b\\\\c\\nd\",code=\"2xx\"} 3\nkiln_y 1.5\n"
        );
    }
}
