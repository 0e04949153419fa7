//! `kiln import`: a closure archive into the store, verified before anything lands.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::Args;

use super::StoreArg;
use crate::build::site;

#[derive(Args, Debug)]
pub struct ImportArgs {
    /// The archive `kiln export` wrote.
    pub archive: PathBuf,
    /// Where to write the site's kiln.toml and kiln.lock (boot files pointing into the store).
    #[arg(long, default_value = ".")]
    pub to: PathBuf,
    /// Replace kiln.toml and kiln.lock if they exist there.
    #[arg(long)]
    pub force: bool,
    #[command(flatten)]
    pub store: StoreArg,
    /// Print {"outputs","added","roots","recipe"} as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `kiln import`.
pub fn run(args: ImportArgs) -> Result<ExitCode> {
    let store = args.store.open()?;
    let r = site::import(&store, &args.archive, &args.to, args.force)?;
    if args.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        for (root, path) in &r.roots {
            println!("{root} {}", path.display());
        }
        println!(
            "{} output(s) verified, {} new in the store; the site's recipe is {}",
            r.outputs,
            r.added,
            r.recipe.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}
