//! `kiln build`: one image from `--from`, or every `[image.NAME]` of the recipe.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Args;

use super::StoreArg;
use crate::archive::Compression;
use crate::build::{self, BuildOptions};
use crate::bundle::{BundleSpec, KernelSpec};
use crate::distribute::Substituters;
use crate::image::{FetchOptions, RegistryOptions, Source};
use crate::recipe::{check_name, LoadedRecipe};

#[derive(Args, Debug)]
pub struct BuildArgs {
    /// Image to build from: docker://REF, oci:DIR[:TAG], oci-archive:FILE, docker-archive:FILE,
    /// dir:PATH or tar:FILE. Needs --name.
    #[arg(long, requires = "name")]
    pub from: Option<String>,
    /// Bundle name (with --from), or the [image.NAME] tables of the recipe to build (default: all).
    #[arg(long)]
    pub name: Vec<String>,
    /// Recipe file.
    #[arg(long, short = 'f', default_value = "kiln.toml")]
    pub recipe: PathBuf,
    #[command(flatten)]
    pub store: StoreArg,
    /// Print one JSON object per bundle: {"name","path","manifest"}.
    #[arg(long)]
    pub json: bool,
    /// Refuse to resolve anything kiln.lock does not pin.
    #[arg(long, conflicts_with = "update")]
    pub locked: bool,
    /// Resolve tags again and rewrite kiln.lock.
    #[arg(long)]
    pub update: bool,
    /// With --from: the kernel, "auto" (found in the image) or a path in the image.
    #[arg(long, default_value = "auto")]
    pub kernel: String,
    /// With --from: the kernel command line. By default "console=tty0 console=ttyS0,115200"
    /// (console=ttyAMA0,115200 for arm64).
    #[arg(long)]
    pub cmdline: Option<String>,
    /// With --from: zstd, gzip or none.
    #[arg(long, default_value = "zstd")]
    pub compression: String,
    /// With --from: compression level (default: 3 for zstd, 6 for gzip).
    #[arg(long)]
    pub level: Option<i32>,
    /// With --from: leave out paths matching this glob (repeatable), e.g. '/var/cache/**'.
    #[arg(long)]
    pub exclude: Vec<String>,
    /// Clamp file times to this; by default the recipe's, else $SOURCE_DATE_EPOCH, else the
    /// image's creation time.
    #[arg(long)]
    pub source_date_epoch: Option<i64>,
    /// Architecture to pick from a multi-platform image (amd64, arm64). Default: this machine's.
    #[arg(long)]
    pub arch: Option<String>,
    /// Verify registry TLS certificates (--tls-verify=false for a local plain-HTTP registry).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub tls_verify: bool,
    /// Registry credentials file (containers-auth.json format).
    #[arg(long)]
    pub authfile: Option<PathBuf>,
    /// With --from: how nodes boot it, initrd or two-stage (docs/bundles.md).
    #[arg(long, default_value = "initrd")]
    pub boot: String,
    /// Worker threads (default: all cores; KILN_THREADS also sets it). Outputs do not depend on it.
    #[arg(long)]
    pub threads: Option<usize>,
    /// Ask this registry repository (docker://REGISTRY/REPO) or OCI layout (oci:DIR) for each bundle
    /// before building it (repeatable; added to the recipe's `substituters`). What it serves is verified;
    /// one that is down or serves a wrong byte is said in one line and the bundle is built here.
    #[arg(long, value_name = "REMOTE")]
    pub substituter: Vec<String>,
    /// Ask no substituter, not even the recipe's.
    #[arg(long, conflicts_with = "substituter")]
    pub no_substitute: bool,
}

/// `kiln build`.
pub fn run(args: BuildArgs) -> Result<ExitCode> {
    let threads = args.threads.filter(|&n| n > 0).unwrap_or_else(crate::util::thread_count);
    let opts = BuildOptions {
        fetch: FetchOptions {
            registry: RegistryOptions { tls_verify: args.tls_verify, authfile: args.authfile.clone() },
            arch: args.arch.clone(),
        },
        threads,
        source_date_epoch: args.source_date_epoch,
        locked: args.locked,
        update: args.update,
        substituters: Substituters::default(),
        no_build: false,
    };
    let registry = RegistryOptions { tls_verify: args.tls_verify, authfile: args.authfile.clone() };
    let substituters = |mut remotes: Vec<String>| -> Result<Substituters> {
        remotes.extend(args.substituter.iter().cloned());
        if args.no_substitute {
            remotes.clear();
        }
        Substituters::new(&remotes, registry.clone())
    };
    let built = if let Some(from) = &args.from {
        let [name] = args.name.as_slice() else {
            anyhow::bail!("--from builds one bundle: give exactly one --name");
        };
        check_name(name).context("--name")?;
        let source = Source::parse(from).context("--from")?;
        let compression = Compression::parse(&args.compression).context("--compression")?;
        let level = args.level.unwrap_or_else(|| compression.default_level());
        compression.check_level(level).context("--level")?;
        crate::bundle::exclude_set(&args.exclude).context("--exclude")?;
        let spec = BundleSpec {
            name: name.clone(),
            kernel: KernelSpec::parse(&args.kernel),
            cmdline: args.cmdline.clone(),
            compression,
            level,
            exclude: args.exclude.clone(),
            boot: args.boot.parse().context("--boot")?,
        };
        let store = args.store.open()?;
        if !args.substituter.is_empty() {
            anyhow::bail!("--substituter works with a recipe's [image.NAME] tables, not with --from");
        }
        vec![build::build_from(&store, &source, &spec, &opts)?]
    } else {
        if !args.recipe.exists() {
            anyhow::bail!(
                "{} not found: write a recipe (see docs/recipe.md) or build one image with --from SOURCE --name NAME",
                args.recipe.display()
            );
        }
        let loaded = LoadedRecipe::load(&args.recipe)?;
        let store = args.store.open()?;
        let opts = BuildOptions { substituters: substituters(loaded.recipe.substituters.clone())?, ..opts };
        build::build_recipe(&store, &loaded, &args.name, &opts)?
    };
    let mut out = std::io::stdout().lock();
    for b in &built {
        if args.json {
            writeln!(out, "{}", serde_json::to_string(b)?)?;
        } else {
            writeln!(out, "{}", b.path.display())?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
