//! `kiln pull`: fill the store with the recipe's outputs from a registry, building nothing.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::Args;

use super::{RegistryArgs, StoreArg};
use crate::build::site::{self, Scope};
use crate::distribute::Remote;
use crate::recipe::LoadedRecipe;

#[derive(Args, Debug)]
pub struct PullArgs {
    /// Where from: a registry repository, docker://REGISTRY/REPOSITORY, or an OCI layout, oci:DIR.
    pub remote: String,
    /// Recipe file. Its kiln.lock names each bundle's source image, so the source is not needed here.
    #[arg(long, short = 'f', default_value = "kiln.toml")]
    pub recipe: PathBuf,
    /// Only what `kiln serve` serves (the images nodes boot, the [server] ipxe build), not every image.
    #[arg(long)]
    pub served: bool,
    #[command(flatten)]
    pub store: StoreArg,
    #[command(flatten)]
    pub registry: RegistryArgs,
    /// Print one JSON object per output: {"root","path","from"}.
    #[arg(long)]
    pub json: bool,
}

/// `kiln pull`.
pub fn run(args: PullArgs) -> Result<ExitCode> {
    let remote = Remote::parse(&args.remote)?;
    let loaded = LoadedRecipe::load(&args.recipe)?;
    let store = args.store.open()?;
    let scope = if args.served { Scope::Served } else { Scope::Recipe };
    let pulled = site::pull(&store, &loaded, &remote, scope, &args.registry.options())?;
    let mut out = std::io::stdout().lock();
    for p in &pulled {
        if args.json {
            writeln!(out, "{}", serde_json::to_string(p)?)?;
        } else {
            writeln!(out, "{} {} (from {})", p.root, p.path.display(), p.from)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
