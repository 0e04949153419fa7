//! Node power and serial console through the BMC (`kiln power`, `kiln node console`): Redfish ([`redfish`]) or
//! IPMI through ipmitool ([`ipmi`]), one job per node on a bounded number of threads ([`runner`]), with the
//! password read from a file or the environment and kept out of logs, output, errors and the process list
//! ([`credentials`]).
//!
//! Each node gives a [`NodeOutcome`]; a failing BMC never stops the others. Errors read as one chain
//! (`n042: power cycle: POST https://…: 401 Unauthorized: check the user and password`) and carry an
//! [`ErrorKind`] a script can act on.

pub mod credentials;
pub mod ipmi;
pub mod redfish;
pub mod runner;

use std::fmt;
use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use serde::Serialize;

use crate::recipe::nodes::{Bmc, BmcScheme, Node};
use crate::recipe::server::BmcProtocol;
use credentials::Credentials;
use ipmi::Ipmitool;
use redfish::Redfish;

/// What `kiln power` does to a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PowerAction {
    On,
    /// Immediate, like holding the power button.
    Off,
    /// Off then on (on when it was off).
    Cycle,
    /// A hard reset (on when it was off).
    Reset,
    /// Ask the OS to shut down (ACPI power button).
    Soft,
    Status,
}

impl PowerAction {
    /// Whether the node boots afterwards, so a one-time PXE boot means something.
    pub fn boots(self) -> bool {
        matches!(self, PowerAction::On | PowerAction::Cycle | PowerAction::Reset)
    }
}

impl fmt::Display for PowerAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PowerAction::On => "on",
            PowerAction::Off => "off",
            PowerAction::Cycle => "cycle",
            PowerAction::Reset => "reset",
            PowerAction::Soft => "soft",
            PowerAction::Status => "status",
        })
    }
}

/// A system's power state as its BMC reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PowerState {
    On,
    Off,
    PoweringOn,
    PoweringOff,
    Paused,
    Other(String),
}

impl fmt::Display for PowerState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PowerState::On => f.write_str("on"),
            PowerState::Off => f.write_str("off"),
            PowerState::PoweringOn => f.write_str("powering on"),
            PowerState::PoweringOff => f.write_str("powering off"),
            PowerState::Paused => f.write_str("paused"),
            PowerState::Other(s) => write!(f, "{}", s.to_lowercase()),
        }
    }
}

impl Serialize for PowerState {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

/// Why a node failed, for scripts (`--json`'s `error_kind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// kiln.toml, the password, or a missing tool.
    Config,
    Unreachable,
    Timeout,
    /// Wrong user or password, or not enough privilege.
    Auth,
    /// The BMC's certificate was not accepted.
    Tls,
    /// The BMC lacks the action, reset type or boot override.
    Unsupported,
    /// The BMC answered with an error.
    Bmc,
}

/// A node's failure: its kind and the error chain.
#[derive(Debug)]
pub struct Failure {
    pub kind: ErrorKind,
    pub error: anyhow::Error,
}

impl Failure {
    pub fn new(kind: ErrorKind, error: anyhow::Error) -> Self {
        Failure { kind, error }
    }

    pub fn context(self, what: &'static str) -> Self {
        Failure { kind: self.kind, error: self.error.context(what) }
    }
}

/// What was done to a node.
#[derive(Debug, Clone)]
pub struct Done {
    /// The power state read before acting.
    pub power: PowerState,
    /// The reset type or chassis command sent, or why nothing was.
    pub did: Option<String>,
    /// The one-time boot override set.
    pub next_boot: Option<String>,
}

/// One `kiln power` run.
#[derive(Debug, Clone)]
pub struct PowerRequest {
    pub action: PowerAction,
    /// Set the next boot (once) to PXE before the action.
    pub pxe: bool,
    /// For each request to a BMC.
    pub timeout: Duration,
    /// BMCs contacted at once.
    pub parallel: usize,
}

/// A node's result, as `--json` prints it.
#[derive(Debug, Serialize)]
pub struct NodeOutcome {
    pub node: String,
    pub bmc: Option<String>,
    pub protocol: Option<BmcProtocol>,
    pub ok: bool,
    /// The power state read (before the action).
    pub power: Option<PowerState>,
    pub did: Option<String>,
    pub next_boot: Option<String>,
    /// For HTTPS: whether the BMC's certificate was verified (`false` with `insecure = true`).
    pub tls_verified: Option<bool>,
    pub error: Option<String>,
    pub error_kind: Option<ErrorKind>,
    /// When the node's job started, from the start of the run.
    pub started_ms: u64,
    pub elapsed_ms: u64,
}

/// The whole run, as `--json` prints it.
#[derive(Debug, Serialize)]
pub struct PowerReport {
    pub action: String,
    pub pxe: bool,
    pub nodes: Vec<NodeOutcome>,
    pub failed: usize,
    /// The bound on BMCs contacted at once, and the most that were.
    pub parallel: usize,
    pub peak_parallel: usize,
    pub total_ms: u64,
}

/// Runs `req` on every node, at most `req.parallel` at once. Never fails as a whole: each node has its result.
pub fn run(nodes: &[Node], req: &PowerRequest) -> PowerReport {
    let ran = runner::run_bounded(nodes, req.parallel, |node| one(node, req));
    let mut outcomes = Vec::with_capacity(nodes.len());
    for (node, timed) in nodes.iter().zip(ran.results) {
        let bmc = node.bmc.as_ref();
        let mut o = NodeOutcome {
            node: node.name.clone(),
            bmc: bmc.map(endpoint),
            protocol: bmc.map(|b| b.protocol),
            ok: timed.result.is_ok(),
            power: None,
            did: None,
            next_boot: None,
            tls_verified: bmc.filter(|b| uses_tls(b)).map(|b| !b.insecure),
            error: None,
            error_kind: None,
            started_ms: timed.started.as_millis() as u64,
            elapsed_ms: timed.elapsed.as_millis() as u64,
        };
        match timed.result {
            Ok(done) => {
                o.power = Some(done.power);
                o.did = done.did;
                o.next_boot = done.next_boot;
            }
            Err(f) => {
                o.error = Some(format!("{}: power {}: {:#}", node.name, req.action, f.error));
                o.error_kind = Some(f.kind);
            }
        }
        outcomes.push(o);
    }
    PowerReport {
        action: req.action.to_string(),
        pxe: req.pxe,
        failed: outcomes.iter().filter(|o| !o.ok).count(),
        nodes: outcomes,
        parallel: req.parallel,
        peak_parallel: ran.peak,
        total_ms: ran.total.as_millis() as u64,
    }
}

/// Where kiln reaches a BMC: the Redfish URL (https:// unless written http://) or IPMI's host:port.
pub fn endpoint(bmc: &Bmc) -> String {
    let a = &bmc.address;
    match bmc.protocol {
        BmcProtocol::Redfish => {
            let scheme = if a.scheme == Some(BmcScheme::Http) { "http" } else { "https" };
            format!("{scheme}://{}{}", a.authority(), a.path)
        }
        BmcProtocol::Ipmi if a.port.is_some() => a.authority(),
        BmcProtocol::Ipmi => format!("{}:{}", a.authority(), ipmi::DEFAULT_PORT),
    }
}

fn uses_tls(bmc: &Bmc) -> bool {
    bmc.protocol == BmcProtocol::Redfish && bmc.address.scheme != Some(BmcScheme::Http)
}

/// Says, on every use, what weakens a BMC connection.
fn warn_about(node: &Node, bmc: &Bmc) {
    if uses_tls(bmc) && bmc.insecure {
        tracing::warn!("{}: the certificate of BMC {} is not verified (insecure = true)", node.name, endpoint(bmc));
    }
    if bmc.protocol == BmcProtocol::Redfish && bmc.address.scheme == Some(BmcScheme::Http) {
        tracing::warn!("{}: BMC {} is plain HTTP: the password crosses the network readable", node.name, bmc.address);
    }
}

fn bmc_of(node: &Node) -> Result<&Bmc, Failure> {
    node.bmc.as_ref().ok_or_else(|| {
        Failure::new(
            ErrorKind::Config,
            anyhow!(
                "no BMC: set [node.{}] bmc = {{ address = \"...\" }} (its other keys may come from the profile)",
                node.name
            ),
        )
    })
}

fn one(node: &Node, req: &PowerRequest) -> Result<Done, Failure> {
    let bmc = bmc_of(node)?;
    let creds = Credentials::of(bmc).map_err(|e| Failure::new(ErrorKind::Config, e))?;
    warn_about(node, bmc);
    match bmc.protocol {
        BmcProtocol::Redfish => Redfish::connect(bmc, &creds, req.timeout)?.act(req.action, req.pxe),
        BmcProtocol::Ipmi => Ipmitool::new(&bmc.address.host, bmc.address.port, bmc.cipher_suite, &creds, req.timeout)?
            .act(req.action, req.pxe),
    }
}

/// How `kiln node console` reaches a node's serial console: what to tell the user, then IPMI SOL.
pub struct ConsolePlan {
    /// Lines for the user before the console starts.
    pub notes: Vec<String>,
    ipmitool: Ipmitool,
}

impl ConsolePlan {
    /// Runs the console on this terminal until the user leaves it.
    pub fn run(self) -> Result<std::process::ExitStatus> {
        self.ipmitool.console()
    }
}

/// Plans the serial console of `node`. IPMI BMCs: SOL. Redfish defines no console stream, so a Redfish BMC is
/// asked what its manager offers (`SerialConsole`, `NetworkProtocol`) and reached over IPMI SOL on the same
/// host unless it says IPMI is off; then the error names what it does offer.
pub fn console(node: &Node, timeout: Duration) -> Result<ConsolePlan> {
    let at = |e: anyhow::Error| e.context(format!("{}: console", node.name));
    let bmc = bmc_of(node).map_err(|f| at(f.error))?;
    let creds = Credentials::of(bmc).map_err(at)?;
    warn_about(node, bmc);
    let host = bmc.address.host.clone();
    let leave = "type ~. at the start of a line to leave";
    match bmc.protocol {
        BmcProtocol::Ipmi => {
            let ipmitool =
                Ipmitool::new(&host, bmc.address.port, bmc.cipher_suite, &creds, timeout).map_err(|f| at(f.error))?;
            let notes =
                vec![format!("{}: serial console over IPMI SOL at {}; {leave}", node.name, ipmitool.endpoint())];
            Ok(ConsolePlan { notes, ipmitool })
        }
        BmcProtocol::Redfish => {
            let offer = Redfish::connect(bmc, &creds, timeout)
                .and_then(|r| r.console_offer())
                .map_err(|f| at(f.error.context("asking the BMC which serial console it offers")))?;
            let listed = if offer.listed.is_empty() { "nothing".to_string() } else { offer.listed.join(", ") };
            if offer.ipmi_enabled == Some(false) {
                let ssh = offer
                    .ssh_port
                    .map(|p| format!("; its SSH console: ssh -p {p} {}@{host}", creds.user))
                    .unwrap_or_default();
                bail!(
                    "{}: console: Redfish carries no console stream and this BMC has IPMI turned off (its manager \
                     lists: {listed}){ssh}",
                    node.name
                );
            }
            let ipmitool =
                Ipmitool::new(&host, offer.ipmi_port, bmc.cipher_suite, &creds, timeout).map_err(|f| at(f.error))?;
            let notes = vec![
                format!(
                    "{}: Redfish carries no console stream; the BMC's manager lists: {listed}. Using IPMI SOL at {} \
                     with the same user.",
                    node.name,
                    ipmitool.endpoint()
                ),
                format!("{}: {leave}", node.name),
            ];
            Ok(ConsolePlan { notes, ipmitool })
        }
    }
}
