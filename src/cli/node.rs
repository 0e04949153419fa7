//! `kiln node ls|add|set|rm|events|console|status`: the recipe's nodes, what the boot server recorded about
//! machines, a node's serial console, and what each node is doing.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};

use super::StoreArg;
use crate::net::Mac;
use crate::recipe::edit::{self, BmcEdit, NodeEdit};
use crate::recipe::LoadedRecipe;
use crate::serve::control::{self, Query};
use crate::serve::state::{BootEvent, Discovered};
use crate::serve::status::{self, NodeStatus};

#[derive(Args, Debug, Clone)]
pub struct NodeFields {
    /// MAC address (52:54:00:aa:bb:42).
    #[arg(long)]
    pub mac: Option<String>,
    /// The [image.NAME] it boots.
    #[arg(long)]
    pub image: Option<String>,
    /// A [profile.NAME] to take settings from.
    #[arg(long)]
    pub profile: Option<String>,
    /// Its address, optionally with a prefix (10.4.0.42/24).
    #[arg(long)]
    pub ipv4: Option<String>,
    #[arg(long)]
    pub gateway: Option<String>,
    /// Default: the node's name.
    #[arg(long)]
    pub hostname: Option<String>,
    /// Appended to the bundle's kernel command line.
    #[arg(long)]
    pub cmdline: Option<String>,
    #[arg(long)]
    pub vlan: Option<u16>,
    /// Free-form tag (repeatable); replaces the node's tags.
    #[arg(long = "tag")]
    pub tags: Vec<String>,
    /// The BMC's address: a host, host:port or URL (https:// is the default for Redfish).
    #[arg(long)]
    pub bmc_address: Option<String>,
    /// How kiln talks to the BMC: redfish (default) or ipmi.
    #[arg(long, value_parser = ["redfish", "ipmi"])]
    pub bmc_protocol: Option<String>,
    #[arg(long)]
    pub bmc_user: Option<String>,
    /// A file holding the BMC password (never the password itself; KILN_BMC_PASSWORD is the alternative).
    #[arg(long)]
    pub bmc_password_file: Option<String>,
    /// Accept the BMC's certificate unverified (self-signed); kiln says so on every use.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub bmc_insecure: Option<bool>,
    /// A PEM file of the CA that signed the BMC's certificate.
    #[arg(long)]
    pub bmc_ca_file: Option<String>,
    /// IPMI: the RMCP+ cipher suite (ipmitool -C), e.g. 17, or 3 for old BMCs.
    #[arg(long)]
    pub bmc_cipher_suite: Option<u8>,
}

impl NodeFields {
    fn edit(&self) -> NodeEdit {
        NodeEdit {
            mac: self.mac.clone(),
            image: self.image.clone(),
            profile: self.profile.clone(),
            ipv4: self.ipv4.clone(),
            gateway: self.gateway.clone(),
            hostname: self.hostname.clone(),
            cmdline: self.cmdline.clone(),
            vlan: self.vlan,
            tags: (!self.tags.is_empty()).then(|| self.tags.clone()),
            bmc: BmcEdit {
                address: self.bmc_address.clone(),
                protocol: self.bmc_protocol.clone(),
                user: self.bmc_user.clone(),
                password_file: self.bmc_password_file.clone(),
                insecure: self.bmc_insecure,
                ca_file: self.bmc_ca_file.clone(),
                cipher_suite: self.bmc_cipher_suite,
            },
        }
    }
}

#[derive(Subcommand, Debug)]
pub enum NodeCommand {
    /// List the nodes of the recipe (with --unknown: machines that asked to boot but are not nodes).
    Ls {
        #[arg(long, short = 'f', default_value = "kiln.toml")]
        recipe: PathBuf,
        #[command(flatten)]
        store: StoreArg,
        #[arg(long)]
        unknown: bool,
        /// Where the server keeps its state (default: [server] state_dir, else <store>/state).
        #[arg(long)]
        state_dir: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Add a [node.NAME] table to the recipe. Example: kiln node add n042 --mac 52:54:00:aa:bb:42 --image compute
    Add {
        name: String,
        #[arg(long, short = 'f', default_value = "kiln.toml")]
        recipe: PathBuf,
        #[command(flatten)]
        fields: NodeFields,
    },
    /// Change settings of a node.
    Set {
        name: String,
        #[arg(long, short = 'f', default_value = "kiln.toml")]
        recipe: PathBuf,
        #[command(flatten)]
        fields: NodeFields,
    },
    /// Show the boot log: what each machine asked for (DHCP, TFTP, script, kernel and initrds, overlay), oldest
    /// first. Reads the state directory, or asks the running `kiln serve` that holds it.
    ///
    ///   kiln node events --mac 52:54:00:aa:bb:42 --limit 20
    Events {
        #[arg(long, short = 'f', default_value = "kiln.toml")]
        recipe: PathBuf,
        #[command(flatten)]
        store: StoreArg,
        /// Only this machine's events (a MAC address, or a node name from the recipe).
        #[arg(long)]
        mac: Option<String>,
        /// How many events at most (the newest ones).
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Where the server keeps its state (default: [server] state_dir, else <store>/state).
        #[arg(long)]
        state_dir: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Attach to a node's serial console through its BMC (IPMI Serial-over-LAN, with ipmitool). For a Redfish
    /// BMC, which has no console stream, kiln asks what it offers and uses IPMI SOL on the same host. Type ~.
    /// to leave. Example: kiln node console n042
    Console {
        name: String,
        #[arg(long, short = 'f', default_value = "kiln.toml")]
        recipe: PathBuf,
        /// Seconds each request to the BMC may take.
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=600))]
        timeout: u64,
    },
    /// Show what each node is doing: off (never seen, or shut down), booting (with the step it is at), up (with
    /// its uptime, load, memory and kernel, from the agent kiln puts on every node) or lost (up, then silent for 3
    /// heartbeats). Asks the running `kiln serve`, else reads the state it left. Examples:
    ///
    ///   kiln node status
    ///
    ///   kiln node status n042 n043 --watch
    ///
    ///   kiln node status --json --unknown
    Status {
        /// Nodes to show (names or MAC addresses). By default, every node of the recipe.
        nodes: Vec<String>,
        #[arg(long, short = 'f', default_value = "kiln.toml")]
        recipe: PathBuf,
        #[command(flatten)]
        store: StoreArg,
        /// Also machines that asked to boot but are not nodes (state `unknown`).
        #[arg(long)]
        unknown: bool,
        /// Where the server keeps its state (default: [server] state_dir, else <store>/state).
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// Print a JSON list of objects (node, mac, state, stage, last_seen, image, address, booted, uptime, load,
        /// mem_used, mem_total, kernel, image_digest; times in unix seconds).
        #[arg(long)]
        json: bool,
        /// Show it again every 2 seconds until interrupted (with --json: one list per line).
        #[arg(long)]
        watch: bool,
    },
    /// Remove a node from the recipe.
    Rm {
        name: String,
        #[arg(long, short = 'f', default_value = "kiln.toml")]
        recipe: PathBuf,
    },
}

/// `kiln node`.
pub fn run(cmd: NodeCommand) -> Result<ExitCode> {
    let mut out = std::io::stdout().lock();
    match cmd {
        NodeCommand::Ls { recipe, store, unknown, state_dir, json } => {
            if unknown {
                let known: Vec<_> = if recipe.exists() { edit::list(&recipe)? } else { vec![] };
                let dir = state_dir_of(&recipe, &store, state_dir.as_deref())?;
                let all: Vec<Discovered> = serde_json::from_value(control::ask(&dir, &Query::Discovered)?)?;
                let rows: Vec<_> = all.into_iter().filter(|d| !known.iter().any(|n| n.mac == d.mac)).collect();
                if json {
                    writeln!(out, "{}", serde_json::to_string_pretty(&rows)?)?;
                } else {
                    for d in &rows {
                        writeln!(out, "{}", serde_json::to_string(d)?)?;
                    }
                }
            } else {
                let list = edit::list(&recipe)?;
                if json {
                    writeln!(out, "{}", serde_json::to_string_pretty(&list)?)?;
                } else {
                    for n in &list {
                        let ip = n.ipv4.map(|i| i.to_string()).unwrap_or_else(|| "-".into());
                        writeln!(out, "{:<16} {} {:<15} {:<16} {}", n.name, n.mac, ip, n.image, n.hostname)?;
                    }
                }
            }
        }
        NodeCommand::Add { name, recipe, fields } => edit::add(&recipe, &name, &fields.edit())?,
        NodeCommand::Set { name, recipe, fields } => edit::set(&recipe, &name, &fields.edit())?,
        NodeCommand::Rm { name, recipe } => edit::rm(&recipe, &name)?,
        NodeCommand::Console { name, recipe, timeout } => {
            let node = super::power::node_for_console(&recipe, &name)?;
            let plan = crate::power::console(&node, std::time::Duration::from_secs(timeout))?;
            for note in &plan.notes {
                eprintln!("{note}");
            }
            let status = plan.run()?;
            return Ok(match status.code() {
                Some(0) => ExitCode::SUCCESS,
                Some(c) => ExitCode::from(u8::try_from(c).unwrap_or(1)),
                None => ExitCode::from(1),
            });
        }
        NodeCommand::Status { nodes, recipe, store, unknown, state_dir, json, watch } => {
            drop(out);
            let loaded = if recipe.exists() { Some(LoadedRecipe::load(&recipe)?) } else { None };
            let dir = state_dir_of(&recipe, &store, state_dir.as_deref())?;
            let show = |first: bool| -> Result<()> {
                let rows = pick(status::query(&dir, loaded.as_ref(), unknown)?, &nodes)?;
                let mut out = std::io::stdout().lock();
                if watch && !json && std::io::IsTerminal::is_terminal(&out) {
                    // Home and clear: the table is redrawn in place.
                    write!(out, "\x1b[H\x1b[2J")?;
                } else if watch && !json && !first {
                    writeln!(out)?;
                }
                if json && watch {
                    writeln!(out, "{}", serde_json::to_string(&rows)?)?;
                } else if json {
                    writeln!(out, "{}", serde_json::to_string_pretty(&rows)?)?;
                } else {
                    write!(out, "{}", status_table(&rows, crate::util::unix_now()))?;
                }
                out.flush()?;
                Ok(())
            };
            show(true)?;
            if watch {
                // Until interrupted (Ctrl-C). The server may be restarting: say so and keep watching.
                loop {
                    std::thread::sleep(std::time::Duration::from_secs(2));
                    if let Err(e) = show(false) {
                        eprintln!("kiln node status: {e:#}");
                    }
                }
            }
        }
        NodeCommand::Events { recipe, store, mac, limit, state_dir, json } => {
            let known = if recipe.exists() { edit::list(&recipe)? } else { vec![] };
            let mac = match mac {
                None => None,
                Some(m) => match known.iter().find(|n| n.name == m) {
                    Some(n) => Some(n.mac),
                    None => Some(m.parse::<Mac>().with_context(|| {
                        format!("--mac {m:?}: neither a MAC address nor a node of {}", recipe.display())
                    })?),
                },
            };
            let dir = state_dir_of(&recipe, &store, state_dir.as_deref())?;
            let events: Vec<BootEvent> = serde_json::from_value(control::ask(&dir, &Query::Events { mac, limit })?)?;
            if json {
                writeln!(out, "{}", serde_json::to_string_pretty(&events)?)?;
            } else {
                for e in &events {
                    let name = known.iter().find(|n| n.mac == e.mac).map(|n| n.name.as_str()).unwrap_or("unknown");
                    writeln!(
                        out,
                        "{} {} {:<12} {:<10} {}",
                        crate::util::utc_time(e.time),
                        e.mac,
                        name,
                        e.kind,
                        e.detail
                    )?;
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The rows of `wanted` (names or MACs), in that order; all rows when none are named.
fn pick(rows: Vec<NodeStatus>, wanted: &[String]) -> Result<Vec<NodeStatus>> {
    if wanted.is_empty() {
        return Ok(rows);
    }
    let mut out = Vec::new();
    for w in wanted {
        let mac = w.parse::<Mac>().ok();
        let row = rows.iter().find(|r| r.node.as_deref() == Some(w.as_str()) || Some(r.mac) == mac);
        match row {
            Some(r) => out.push(r.clone()),
            None => {
                let names: Vec<&str> = rows.iter().filter_map(|r| r.node.as_deref()).collect();
                anyhow::bail!("{w:?} is not a node (nodes: {})", names.join(", "));
            }
        }
    }
    Ok(out)
}

/// The status as a table for people.
fn status_table(rows: &[NodeStatus], now: u64) -> String {
    use crate::serve::page::duration;
    let dash = || "-".to_string();
    let mut table = vec![[
        "NODE",
        "MAC",
        "STATE",
        "STAGE",
        "IMAGE",
        "ADDRESS",
        "HEARD",
        "BOOTED (UTC)",
        "UPTIME",
        "LOAD",
        "MEMORY",
        "KERNEL",
    ]
    .map(String::from)];
    for r in rows {
        table.push([
            r.node.clone().unwrap_or_else(|| "(unknown)".into()),
            r.mac.to_string(),
            r.state.to_string(),
            r.stage.clone().unwrap_or_else(dash),
            r.image.clone().unwrap_or_else(dash),
            r.address.map(|a| a.to_string()).unwrap_or_else(dash),
            r.last_seen.map(|t| format!("{} ago", duration(now.saturating_sub(t)))).unwrap_or_else(|| "never".into()),
            r.booted.map(crate::util::utc_time).unwrap_or_else(dash),
            r.uptime.map(duration).unwrap_or_else(dash),
            r.load.map(|l| format!("{:.2}", l[0])).unwrap_or_else(dash),
            match (r.mem_used, r.mem_total) {
                (Some(u), Some(t)) => format!("{}/{}", crate::util::human_size(u), crate::util::human_size(t)),
                _ => dash(),
            },
            r.kernel.clone().unwrap_or_else(dash),
        ]);
    }
    let widths: Vec<usize> =
        (0..12).map(|c| table.iter().map(|row| row[c].chars().count()).max().unwrap_or(0)).collect();
    let mut text = String::new();
    for row in &table {
        let cells: Vec<String> = row.iter().zip(&widths).map(|(cell, w)| format!("{cell:<w$}")).collect();
        text.push_str(cells.join("  ").trim_end());
        text.push('\n');
    }
    text
}

/// The state directory a node command reads, chosen as `kiln serve` chooses it ([`crate::serve::state_dir`]).
pub(super) fn state_dir_of(recipe: &Path, store: &StoreArg, given: Option<&Path>) -> Result<PathBuf> {
    let loaded = if given.is_none() && recipe.exists() { Some(LoadedRecipe::load(recipe)?) } else { None };
    let server = loaded.as_ref().and_then(|l| l.recipe.server.as_ref());
    Ok(crate::serve::state_dir(given, server, &store.root()))
}
