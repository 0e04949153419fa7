//! `kiln export`: one archive with everything the recipe's site serves.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::Args;

use super::StoreArg;
use crate::build::site;
use crate::recipe::LoadedRecipe;
use crate::util::human_size;

#[derive(Args, Debug)]
pub struct ExportArgs {
    /// The archive to write (a tar of an OCI image layout), e.g. site-a.kiln.
    pub archive: PathBuf,
    /// Recipe file.
    #[arg(long, short = 'f', default_value = "kiln.toml")]
    pub recipe: PathBuf,
    #[command(flatten)]
    pub store: StoreArg,
    /// Print {"path","outputs","files","size","sha256"} as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `kiln export`.
pub fn run(args: ExportArgs) -> Result<ExitCode> {
    let loaded = LoadedRecipe::load(&args.recipe)?;
    let store = args.store.open()?;
    let e = site::export(&store, &loaded, &args.archive)?;
    if args.json {
        println!("{}", serde_json::to_string(&e)?);
    } else {
        println!(
            "{}: {} output(s), {} file(s), {}, sha256 {}",
            e.path.display(),
            e.outputs,
            e.files,
            human_size(e.size),
            e.sha256
        );
    }
    Ok(ExitCode::SUCCESS)
}
