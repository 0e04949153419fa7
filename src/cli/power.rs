//! `kiln power on|off|cycle|reset|soft|status`: node power through the BMCs, in parallel, one line (or one JSON
//! object) per node.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};

use super::StoreArg;
use crate::power::{self, PowerAction, PowerRequest};
use crate::recipe::{LoadedRecipe, Node};
use crate::serve::status::{self, NodeState, NodeStatus};
use crate::util::unix_now;

#[derive(ValueEnum, Debug, Clone, Copy)]
pub enum ActionArg {
    /// Power on (nothing if on).
    On,
    /// Power off at once (nothing if off).
    Off,
    /// Power off then on (on if off).
    Cycle,
    /// Hard reset (on if off).
    Reset,
    /// Ask the OS to shut down (ACPI power button).
    Soft,
    /// Show the power state.
    Status,
}

impl From<ActionArg> for PowerAction {
    fn from(a: ActionArg) -> Self {
        match a {
            ActionArg::On => PowerAction::On,
            ActionArg::Off => PowerAction::Off,
            ActionArg::Cycle => PowerAction::Cycle,
            ActionArg::Reset => PowerAction::Reset,
            ActionArg::Soft => PowerAction::Soft,
            ActionArg::Status => PowerAction::Status,
        }
    }
}

#[derive(Args, Debug)]
pub struct PowerArgs {
    pub action: ActionArg,
    /// Nodes by name (with --all or --tag: added to those).
    pub nodes: Vec<String>,
    /// Every node of the recipe.
    #[arg(long)]
    pub all: bool,
    /// Nodes with this tag (repeatable: any of them).
    #[arg(long = "tag", value_name = "TAG")]
    pub tags: Vec<String>,
    /// Set the next boot, once, to PXE first (Redfish BootSourceOverrideTarget = Pxe; IPMI chassis bootdev
    /// pxe), so a node with a local OS still netboots. With on, cycle or reset.
    #[arg(long)]
    pub pxe: bool,
    /// How many BMCs are contacted at once.
    #[arg(long, visible_alias = "fanout", default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub parallel: u16,
    /// Seconds each request to a BMC may take (Redfish: per HTTP request; IPMI: ipmitool's -N is half of it,
    /// with one retry).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=600))]
    pub timeout: u64,
    /// With on, cycle or reset: then wait until every node the command reached is `up` again (its status agent
    /// reports a boot that started after the command, as `kiln node status` shows) or --wait-timeout passes; the
    /// nodes that are not are named and the exit status is 1.
    #[arg(long)]
    pub wait: bool,
    /// Seconds --wait waits at most.
    #[arg(long, default_value_t = 900, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub wait_timeout: u64,
    /// With --wait: where the kiln serve that boots the nodes keeps its state (default: [server] state_dir, else
    /// <store>/state). A running kiln serve is asked over its control socket.
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    #[command(flatten)]
    pub store: StoreArg,
    #[arg(long, short = 'f', default_value = "kiln.toml")]
    pub recipe: PathBuf,
    /// One JSON document: every node's result, the failures, the time taken (with --wait, what each node's
    /// status became).
    #[arg(long)]
    pub json: bool,
}

/// The nodes named, tagged, or all of them, in the recipe's order.
fn select(loaded: &LoadedRecipe, args: &PowerArgs) -> Result<Vec<Node>> {
    let all = loaded.nodes()?;
    if !args.all && args.tags.is_empty() && args.nodes.is_empty() {
        bail!("name the nodes, or use --all or --tag TAG");
    }
    for name in &args.nodes {
        if !all.iter().any(|n| &n.name == name) {
            bail!("{} has no [node.{name}]", loaded.path.display());
        }
    }
    let chosen: Vec<Node> = all
        .into_iter()
        .filter(|n| args.all || args.nodes.contains(&n.name) || n.tags.iter().any(|t| args.tags.contains(t)))
        .map(|n| with_paths_resolved(loaded, n))
        .collect();
    if chosen.is_empty() {
        bail!("no node of {} has the tag {}", loaded.path.display(), args.tags.join(" or "));
    }
    Ok(chosen)
}

/// The node with its BMC's relative file paths made relative to the recipe's directory.
fn with_paths_resolved(loaded: &LoadedRecipe, mut node: Node) -> Node {
    if let Some(b) = node.bmc.as_mut() {
        b.password_file = b.password_file.as_deref().map(|p| loaded.resolve_path(p));
        b.ca_file = b.ca_file.as_deref().map(|p| loaded.resolve_path(p));
    }
    node
}

/// The node `name` of the recipe at `recipe`, ready for [`crate::power::console`] (`kiln node console`).
pub fn node_for_console(recipe: &std::path::Path, name: &str) -> Result<Node> {
    let loaded = LoadedRecipe::load(recipe)?;
    let node = loaded.nodes()?.into_iter().find(|n| n.name == name);
    let node = node.with_context(|| format!("{} has no [node.{name}]", loaded.path.display()))?;
    Ok(with_paths_resolved(&loaded, node))
}

/// `kiln power`.
pub fn run(args: PowerArgs) -> Result<ExitCode> {
    let action = PowerAction::from(args.action);
    if args.pxe && !action.boots() {
        bail!("--pxe sets the next boot: use it with on, cycle or reset");
    }
    if args.wait && !action.boots() {
        bail!("--wait waits for the nodes to boot: use it with on, cycle or reset");
    }
    let loaded = LoadedRecipe::load(&args.recipe)?;
    let nodes = select(&loaded, &args)?;
    let state_dir = super::node::state_dir_of(&args.recipe, &args.store, args.state_dir.as_deref())?;
    if args.wait {
        // Asked before any BMC is: a --wait that cannot read the nodes' status must not power them first.
        let running =
            crate::serve::control::ask_running(&state_dir, &crate::serve::control::Query::Status { unknown: false })
                .with_context(|| format!("--wait reads the nodes' status from {}", state_dir.display()))?;
        if running.is_none() {
            bail!(
                "--wait reads the nodes' status from {}, but no kiln serve runs with its state there: the nodes' \
                 agents report to a running kiln serve (start it, or give its --state-dir)",
                state_dir.display()
            );
        }
    }
    let sent_at = unix_now();
    let req = PowerRequest {
        action,
        pxe: args.pxe,
        timeout: Duration::from_secs(args.timeout),
        parallel: usize::from(args.parallel),
    };
    let report = power::run(&nodes, &req);
    let waited = if args.wait {
        // A node whose BMC failed is not waited for: it is already reported as failed.
        let reached: Vec<&str> = report.nodes.iter().filter(|o| o.error.is_none()).map(|o| o.node.as_str()).collect();
        let status_of = || status::query(&state_dir, Some(&loaded), false);
        Some(wait_up(&reached, sent_at, Duration::from_secs(args.wait_timeout), status_of)?)
    } else {
        None
    };
    let mut out = std::io::stdout().lock();
    if args.json {
        let mut doc = serde_json::to_value(&report)?;
        if let Some(w) = &waited {
            doc["wait"] = serde_json::to_value(w)?;
        }
        writeln!(out, "{}", serde_json::to_string_pretty(&doc)?)?;
    } else {
        let width = report.nodes.iter().map(|o| o.node.len()).max().unwrap_or(0).max(8);
        for o in &report.nodes {
            let mut line = match (&o.error, action) {
                (Some(e), _) => format!("error: {e}"),
                (None, PowerAction::Status) => o.power.as_ref().map(ToString::to_string).unwrap_or_default(),
                (None, _) => {
                    let was = o.power.as_ref().map(ToString::to_string).unwrap_or_default();
                    let did = match o.did.as_deref() {
                        Some(d) if d.starts_with("nothing") => format!("already {was}"),
                        Some(d) => format!("was {was}, sent {d}"),
                        None => format!("was {was}"),
                    };
                    let boot = o.next_boot.as_deref().map(|b| format!(", next boot {b}")).unwrap_or_default();
                    format!("ok: {did}{boot}")
                }
            };
            if o.tls_verified == Some(false) {
                line.push_str(" [TLS certificate not verified]");
            }
            writeln!(out, "{:<width$}  {line}", o.node)?;
        }
    }
    out.flush()?;
    eprintln!(
        "power {}: {} node{}, {} failed, {:.2} s (at most {} BMCs at once, {} did)",
        report.action,
        report.nodes.len(),
        if report.nodes.len() == 1 { "" } else { "s" },
        report.failed,
        report.total_ms as f64 / 1000.0,
        report.parallel,
        report.peak_parallel
    );
    let mut failed = report.failed > 0;
    if let Some(w) = &waited {
        for n in &w.not_up {
            eprintln!(
                "{}: not up after {} s: {}{}",
                n.node,
                w.timeout_s,
                n.state.as_str(),
                n.stage.as_deref().map(|s| format!(" ({s})")).unwrap_or_default()
            );
        }
        eprintln!(
            "power {} --wait: {} of {} up in {:.1} s",
            report.action,
            w.up.len(),
            w.up.len() + w.not_up.len(),
            w.waited_s
        );
        failed |= !w.not_up.is_empty();
    }
    Ok(if failed { ExitCode::from(1) } else { ExitCode::SUCCESS })
}

/// What `--wait` saw.
#[derive(Debug, serde::Serialize)]
pub struct Waited {
    pub timeout_s: u64,
    /// Seconds from the end of the power command to the last node up (or the timeout).
    pub waited_s: f64,
    pub up: Vec<CameUp>,
    pub not_up: Vec<NotUp>,
}

#[derive(Debug, serde::Serialize)]
pub struct CameUp {
    pub node: String,
    /// Seconds after the power command ended.
    pub after_s: f64,
}

#[derive(Debug, serde::Serialize)]
pub struct NotUp {
    pub node: String,
    pub state: NodeState,
    /// The last thing heard of it (a boot step, `heartbeat`, ...).
    pub stage: Option<String>,
}

/// True when `row` is up from a boot that started at or after `since` (unix seconds; the boot time is derived
/// from the agent's uptime, to the second, hence the one second of slack).
fn up_since(row: &NodeStatus, since: u64) -> bool {
    row.state == NodeState::Up && row.booted.is_some_and(|b| b + 1 >= since)
}

/// Polls `status_of` once a second until every node of `names` is up since `since`, or `timeout` passes. On a
/// terminal, says on stderr each node that comes up.
fn wait_up(
    names: &[&str],
    since: u64,
    timeout: Duration,
    status_of: impl Fn() -> Result<Vec<NodeStatus>>,
) -> Result<Waited> {
    let start = Instant::now();
    let terminal = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let mut up: Vec<CameUp> = Vec::new();
    let mut last: Vec<NodeStatus> = Vec::new();
    loop {
        last = match status_of() {
            Ok(rows) => rows,
            // The server restarting, or its database busy for a moment: try again within the timeout.
            Err(e) if start.elapsed() < timeout => {
                tracing::debug!("reading the nodes' status: {e:#}");
                last
            }
            Err(e) => return Err(e.context("--wait: reading the nodes' status")),
        };
        for name in names {
            if up.iter().any(|u| u.node == *name) {
                continue;
            }
            if last.iter().any(|r| r.node.as_deref() == Some(name) && up_since(r, since)) {
                let after_s = start.elapsed().as_secs_f64();
                if terminal {
                    eprintln!("{name} up after {after_s:.0} s ({} of {})", up.len() + 1, names.len());
                }
                up.push(CameUp { node: name.to_string(), after_s });
            }
        }
        if up.len() == names.len() || start.elapsed() >= timeout {
            break;
        }
        std::thread::sleep(Duration::from_secs(1).min(timeout.saturating_sub(start.elapsed())));
    }
    let not_up = names
        .iter()
        .filter(|n| !up.iter().any(|u| u.node == **n))
        .map(|n| {
            let row = last.iter().find(|r| r.node.as_deref() == Some(n));
            NotUp {
                node: n.to_string(),
                state: row.map(|r| r.state).unwrap_or(NodeState::Off),
                stage: row.and_then(|r| r.stage.clone()),
            }
        })
        .collect();
    Ok(Waited { timeout_s: timeout.as_secs(), waited_s: start.elapsed().as_secs_f64(), up, not_up })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::Mac;

    fn row(node: &str, state: NodeState, booted: Option<u64>) -> NodeStatus {
        NodeStatus {
            node: Some(node.into()),
            mac: Mac([0x52, 0x54, 0, 0, 0, 1]),
            state,
            stage: Some("heartbeat".into()),
            last_seen: None,
            image: None,
            image_digest: None,
            address: None,
            booted,
            uptime: None,
            load: None,
            mem_used: None,
            mem_total: None,
            kernel: None,
        }
    }

    #[test]
    fn a_node_is_up_again_only_from_a_boot_after_the_command() {
        assert!(!up_since(&row("n1", NodeState::Up, Some(900)), 1000), "up from before the cycle");
        assert!(up_since(&row("n1", NodeState::Up, Some(999)), 1000), "a second of rounding");
        assert!(up_since(&row("n1", NodeState::Up, Some(1010)), 1000));
        assert!(!up_since(&row("n1", NodeState::Booting, Some(1010)), 1000));
        assert!(!up_since(&row("n1", NodeState::Up, None), 1000));
    }

    #[test]
    fn wait_names_the_nodes_that_did_not_come_up() {
        let w = wait_up(&["n1", "n2"], 1000, Duration::from_millis(10), || {
            Ok(vec![row("n1", NodeState::Up, Some(1005)), row("n2", NodeState::Lost, Some(100))])
        })
        .unwrap();
        assert_eq!(w.up.iter().map(|u| u.node.as_str()).collect::<Vec<_>>(), ["n1"]);
        assert_eq!(w.not_up.len(), 1);
        assert_eq!((w.not_up[0].node.as_str(), w.not_up[0].state), ("n2", NodeState::Lost));
    }
}
