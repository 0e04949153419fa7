//! `kiln store ls|verify|gc`.

use std::io::Write;
use std::process::ExitCode;

use anyhow::Result;
use clap::Subcommand;

use super::StoreArg;
use crate::util::human_size;

#[derive(Subcommand, Debug)]
pub enum StoreCommand {
    /// List the store's outputs.
    Ls {
        #[command(flatten)]
        store: StoreArg,
        /// One JSON array of {path,hash,name,kind,size,roots}.
        #[arg(long)]
        json: bool,
    },
    /// Re-hash every output against its manifest; exits 1 if anything is wrong.
    Verify {
        #[command(flatten)]
        store: StoreArg,
        #[arg(long)]
        json: bool,
    },
    /// Remove outputs no root points at (the last build of each name is a root).
    Gc {
        #[command(flatten)]
        store: StoreArg,
        /// Show what would be removed, remove nothing.
        #[arg(long)]
        dry_run: bool,
        /// While another kiln uses the store (kiln serve, a build), wait for it instead of failing.
        #[arg(long)]
        wait: bool,
        #[arg(long)]
        json: bool,
    },
}

/// `kiln store`.
pub fn run(cmd: StoreCommand) -> Result<ExitCode> {
    let mut out = std::io::stdout().lock();
    match cmd {
        StoreCommand::Ls { store, json } => {
            let items = store.open()?.list()?;
            if json {
                writeln!(out, "{}", serde_json::to_string_pretty(&items)?)?;
            } else {
                for i in &items {
                    let roots = if i.roots.is_empty() { "-".to_string() } else { i.roots.join(",") };
                    writeln!(out, "{:<10} {:>12} {:<24} {}", i.kind, human_size(i.size), roots, i.path.display())?;
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        StoreCommand::Verify { store, json } => {
            let (count, problems) = store.open()?.verify()?;
            if json {
                let v = serde_json::json!({ "checked": count, "ok": problems.is_empty(), "problems": problems });
                writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?;
            } else if problems.is_empty() {
                writeln!(out, "{count} output(s) verified, no problems")?;
            } else {
                for p in &problems {
                    writeln!(out, "{}: {}", p.path.display(), p.problem)?;
                }
                writeln!(out, "{} problem(s) in {count} output(s); rebuild the affected outputs", problems.len())?;
            }
            Ok(if problems.is_empty() { ExitCode::SUCCESS } else { ExitCode::from(1) })
        }
        StoreCommand::Gc { store, dry_run, wait, json } => {
            let report = store.open()?.gc(dry_run, wait)?;
            if json {
                writeln!(out, "{}", serde_json::to_string_pretty(&report)?)?;
            } else {
                for p in &report.removed {
                    writeln!(out, "{} {}", if dry_run { "would remove" } else { "removed" }, p.display())?;
                }
                writeln!(
                    out,
                    "{} output(s) {}, {} kept, {} freed",
                    report.removed.len(),
                    if dry_run { "unreferenced" } else { "removed" },
                    report.kept,
                    human_size(report.freed_bytes)
                )?;
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
