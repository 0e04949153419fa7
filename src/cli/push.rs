//! `kiln push`: the recipe's outputs to a registry.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::Args;

use super::{RegistryArgs, StoreArg};
use crate::build::site;
use crate::distribute::Remote;
use crate::recipe::LoadedRecipe;
use crate::util::human_size;

#[derive(Args, Debug)]
pub struct PushArgs {
    /// Where to: a registry repository, docker://REGISTRY/REPOSITORY, or an OCI layout, oci:DIR.
    pub remote: String,
    /// Only these [image.NAME] or [ipxe.NAME] tables (default: every output of the recipe: bundles, iPXE
    /// builds, the appliance ISO).
    pub names: Vec<String>,
    /// Recipe file.
    #[arg(long, short = 'f', default_value = "kiln.toml")]
    pub recipe: PathBuf,
    #[command(flatten)]
    pub store: StoreArg,
    #[command(flatten)]
    pub registry: RegistryArgs,
    /// Print one JSON object per output: {"path","tag","digest","size","uploaded","tags"}.
    #[arg(long)]
    pub json: bool,
}

/// `kiln push`.
pub fn run(args: PushArgs) -> Result<ExitCode> {
    let remote = Remote::parse(&args.remote)?;
    let loaded = LoadedRecipe::load(&args.recipe)?;
    let store = args.store.open()?;
    let pushed = site::push(&store, &loaded, &remote, &args.names, &args.registry.options())?;
    let mut out = std::io::stdout().lock();
    for p in &pushed {
        if args.json {
            writeln!(out, "{}", serde_json::to_string(p)?)?;
        } else {
            let what = if p.uploaded { "pushed" } else { "already there" };
            writeln!(out, "{} {what} ({}) {}", remote.at(&p.tag), human_size(p.size), p.path.display())?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
