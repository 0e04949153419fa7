//! `kiln power on|off|cycle|reset|soft|status`: node power through the BMCs, in parallel, one line (or one JSON
//! object) per node.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};

use crate::power::{self, PowerAction, PowerRequest};
use crate::recipe::{LoadedRecipe, Node};

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
    #[arg(long, short = 'f', default_value = "kiln.toml")]
    pub recipe: PathBuf,
    /// One JSON document: every node's result, the failures, the time taken.
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
    let loaded = LoadedRecipe::load(&args.recipe)?;
    let nodes = select(&loaded, &args)?;
    let req = PowerRequest {
        action,
        pxe: args.pxe,
        timeout: Duration::from_secs(args.timeout),
        parallel: usize::from(args.parallel),
    };
    let report = power::run(&nodes, &req);
    let mut out = std::io::stdout().lock();
    if args.json {
        writeln!(out, "{}", serde_json::to_string_pretty(&report)?)?;
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
    Ok(if report.failed > 0 { ExitCode::from(1) } else { ExitCode::SUCCESS })
}
