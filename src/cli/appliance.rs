//! `kiln appliance`.

use std::fs;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Args;
use serde_json::json;

use super::StoreArg;
use crate::appliance;
use crate::build::BuildOptions;
use crate::recipe::LoadedRecipe;

#[derive(Args, Debug)]
pub struct ApplianceArgs {
    /// The recipe: its [appliance], [server], nodes and images.
    #[arg(long, short = 'f', default_value = "kiln.toml")]
    pub recipe: PathBuf,
    #[command(flatten)]
    pub store: StoreArg,
    /// Also copy the ISO to this file.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Print {"path","size","sha256"} as JSON.
    #[arg(long)]
    pub json: bool,
    /// Refuse to resolve anything kiln.lock does not pin.
    #[arg(long)]
    pub locked: bool,
}

/// `kiln appliance`.
pub fn run(args: ApplianceArgs) -> Result<ExitCode> {
    let store = args.store.open()?;
    let loaded = LoadedRecipe::load(&args.recipe)?;
    let opts = BuildOptions { locked: args.locked, threads: crate::util::thread_count(), ..Default::default() };
    let built = appliance::build(&store, &loaded, &opts)?;
    if let Some(out) = &args.out {
        fs::copy(&built.path, out).with_context(|| format!("copying the ISO to {}", out.display()))?;
    }
    if args.json {
        println!("{}", json!({"path": built.path, "size": built.size, "sha256": built.sha256}));
    } else {
        println!("{}", built.path.display());
    }
    Ok(ExitCode::SUCCESS)
}
