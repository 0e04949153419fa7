//! `kiln build-ipxe`: iPXE from command-line flags or the recipe's `[ipxe.NAME]` tables.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::Args;

use super::StoreArg;
use crate::ipxe::{self, BuildOptions, BuildReport, BuildSpec, Origin, SourceSpec, DEFAULT_TARGETS, UPSTREAM_GIT};
use crate::recipe::LoadedRecipe;

#[derive(Args, Debug, Clone)]
pub struct BuildIpxeArgs {
    /// An iPXE make target: build directory and file (repeatable). Any target iPXE's make knows
    /// works, e.g. bin-x86_64-efi/ipxe.efi, bin-x86_64-pcbios/ipxe.lkrn, bin-x86_64-efi/ipxe.iso.
    /// By default bin-x86_64-efi/snponly.efi, bin-x86_64-pcbios/undionly.kpxe and
    /// bin-arm64-efi/snponly.efi.
    #[arg(long = "target", value_name = "DIR/FILE")]
    pub targets: Vec<String>,
    /// Build this local iPXE checkout (its top directory or src/). It is never written to:
    /// kiln builds a copy.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["git", "rev"])]
    pub source: Option<PathBuf>,
    /// Fetch iPXE from this git repository. By default upstream, https://github.com/ipxe/ipxe.
    #[arg(long, value_name = "URL")]
    pub git: Option<String>,
    /// The git revision to build: a commit, tag or branch. By default the upstream commit
    /// pinned in kiln, or HEAD with --git.
    #[arg(long, value_name = "REV")]
    pub rev: Option<String>,
    /// Embed this iPXE script (it must start with #!ipxe).
    #[arg(long, value_name = "FILE", conflicts_with_all = ["vlan", "chain"])]
    pub embed: Option<PathBuf>,
    /// Embed a script that tags VLAN ID on net0 (vcreate --tag ID net0), configures net0-ID by
    /// DHCP and boots what DHCP names.
    #[arg(long, value_name = "ID", value_parser = clap::value_parser!(u16).range(1..=4094))]
    pub vlan: Option<u16>,
    /// Embed a script that configures the network by DHCP (on the VLAN, with --vlan) and chains
    /// this URL; iPXE settings work, e.g. http://10.4.0.1/ipxe/${mac}.
    #[arg(long, value_name = "URL")]
    pub chain: Option<String>,
    /// Turn on a define of iPXE's src/config/*.h (repeatable): DOWNLOAD_PROTO_HTTPS,
    /// BANNER_TIMEOUT=0, or console.h:CONSOLE_VESAFB to name the header. On by default, as in
    /// Warewulf's builds: VLAN_CMD, IMAGE_ZLIB, IMAGE_GZIP, CONSOLE_FRAMEBUFFER, CONSOLE_SERIAL
    /// (x86 only).
    #[arg(long = "option", value_name = "[HEADER:]NAME[=VALUE]")]
    pub options: Vec<String>,
    /// Turn off a define (repeatable), kiln's defaults included.
    #[arg(long = "no-option", value_name = "[HEADER:]NAME")]
    pub no_options: Vec<String>,
    /// Also copy the binaries into DIR under Warewulf's names (bin-x86_64-efi-snponly.efi, …).
    #[arg(long, value_name = "DIR")]
    pub dest: Option<PathBuf>,
    /// The build's name in the store (default: ipxe); with a recipe, the [ipxe.NAME] tables to
    /// build (default: all).
    #[arg(long)]
    pub name: Vec<String>,
    /// Build the [ipxe.NAME] tables of this recipe. By default ./kiln.toml is used when it has
    /// [ipxe.*] tables and no build flags (--target, --source, --vlan, …) are given.
    #[arg(long, short = 'f', value_name = "FILE")]
    pub recipe: Option<PathBuf>,
    #[command(flatten)]
    pub store: StoreArg,
    /// Print one JSON object per build: name, store path, source, and per target its file,
    /// sha256, size, status (built, cached, failed, would-build), seconds and error.
    #[arg(long)]
    pub json: bool,
    /// Show what is cached and what would be built, and the store paths; build nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// make jobs in all (default: all cores; KILN_THREADS also sets it). Outputs do not depend
    /// on it.
    #[arg(long, short = 'j', value_name = "N")]
    pub jobs: Option<usize>,
    /// Timestamp for the binaries (the EFI link time). By default the recipe's, else
    /// $SOURCE_DATE_EPOCH, else the source commit's time, else 1980-01-01.
    #[arg(long, value_name = "SECONDS")]
    pub source_date_epoch: Option<i64>,
    /// With a recipe: refuse to resolve a git revision that kiln.lock does not pin.
    #[arg(long, conflicts_with = "update")]
    pub locked: bool,
    /// With a recipe: resolve git revisions again and rewrite kiln.lock.
    #[arg(long)]
    pub update: bool,
}

impl BuildIpxeArgs {
    /// Whether the command line itself describes a build (so no recipe is read).
    fn describes_a_build(&self) -> bool {
        !self.targets.is_empty()
            || self.source.is_some()
            || self.git.is_some()
            || self.rev.is_some()
            || self.embed.is_some()
            || self.vlan.is_some()
            || self.chain.is_some()
            || !self.options.is_empty()
            || !self.no_options.is_empty()
    }

    fn spec(&self) -> Result<BuildSpec> {
        let name = match self.name.as_slice() {
            [] => "ipxe",
            [one] => one.as_str(),
            _ => bail!("--name: a build from command-line flags has one name"),
        };
        let source = match (&self.source, &self.git, &self.rev) {
            (Some(dir), _, _) => SourceSpec::Path(dir.clone()),
            (None, None, None) => SourceSpec::upstream(),
            (None, Some(url), rev) => {
                SourceSpec::Git { url: url.clone(), rev: rev.clone().unwrap_or_else(|| "HEAD".into()) }
            }
            (None, None, Some(rev)) => SourceSpec::Git { url: UPSTREAM_GIT.into(), rev: rev.clone() },
        };
        let targets: Vec<String> = if self.targets.is_empty() {
            DEFAULT_TARGETS.iter().map(|s| s.to_string()).collect()
        } else {
            self.targets.clone()
        };
        BuildSpec::new(
            Origin::Cli,
            name,
            &targets,
            source,
            self.embed.as_deref(),
            self.vlan,
            self.chain.as_deref(),
            self.options.clone(),
            self.no_options.clone(),
            None,
        )
    }
}

/// `kiln build-ipxe`.
pub fn run(args: BuildIpxeArgs) -> Result<ExitCode> {
    let jobs = args.jobs.filter(|&n| n > 0).unwrap_or_else(crate::util::thread_count);
    let mut opts = BuildOptions::new(jobs);
    opts.dest = args.dest.clone();
    opts.dry_run = args.dry_run;
    opts.locked = args.locked;

    let recipe_path = args.recipe.clone().unwrap_or_else(|| PathBuf::from("kiln.toml"));
    let loaded = if args.describes_a_build() {
        if args.recipe.is_some() {
            bail!("--recipe builds the recipe's [ipxe.NAME] tables; leave out the build flags, or leave out --recipe");
        }
        None
    } else if args.recipe.is_some() || recipe_path.is_file() {
        let loaded = LoadedRecipe::load(&recipe_path)?;
        if loaded.recipe.ipxe.is_empty() && (args.recipe.is_some() || !args.name.is_empty()) {
            bail!("{} has no [ipxe.NAME] tables (see docs/ipxe.md)", recipe_path.display());
        }
        (!loaded.recipe.ipxe.is_empty()).then_some(loaded)
    } else {
        None
    };

    let mut reports = Vec::new();
    let store = args.store.open()?;
    match loaded {
        None => {
            if args.locked || args.update {
                bail!("--locked and --update apply to recipe builds (kiln.lock)");
            }
            let mut spec = args.spec()?;
            spec.source_date_epoch = args.source_date_epoch;
            reports
                .push(ipxe::build(&store, &spec, &opts, None).with_context(|| format!("building iPXE {}", spec.name))?);
        }
        Some(loaded) => {
            let names: Vec<String> =
                if args.name.is_empty() { loaded.recipe.ipxe.keys().cloned().collect() } else { args.name.clone() };
            reports = ipxe::build_recipe(&store, &loaded, &names, &opts, args.source_date_epoch, args.update)?;
        }
    }
    print_reports(&reports, args.json, args.dry_run)
}

fn print_reports(reports: &[BuildReport], json: bool, dry_run: bool) -> Result<ExitCode> {
    let mut out = std::io::stdout().lock();
    let mut failed = false;
    for r in reports {
        if json {
            writeln!(out, "{}", serde_json::to_string(r)?)?;
        } else if dry_run {
            for t in &r.targets {
                match (&t.error, &t.path) {
                    (Some(e), _) => writeln!(out, "cannot build {e}")?,
                    (None, Some(p)) => writeln!(out, "{:<11} {:<36} {}", t.status, t.target, p.display())?,
                    (None, None) => {}
                }
            }
            if let Some(p) = &r.path {
                writeln!(
                    out,
                    "{:<11} {:<36} {}",
                    if r.cached { "cached" } else { "would-build" },
                    r.name,
                    p.display()
                )?;
            }
        } else if let Some(p) = &r.path {
            writeln!(out, "{}", p.display())?;
        }
        if !r.errors.is_empty() {
            failed = true;
            if !json {
                for e in &r.errors {
                    eprintln!("error: {e}");
                }
                let ok: Vec<String> =
                    r.targets.iter().filter_map(|t| t.path.as_ref()).map(|p| p.display().to_string()).collect();
                eprintln!(
                    "error: {} of {} target(s) of {} failed{}",
                    r.errors.len(),
                    r.targets.len(),
                    r.name,
                    if ok.is_empty() { String::new() } else { format!("; built: {}", ok.join(" ")) }
                );
            }
        }
    }
    Ok(if failed { ExitCode::from(1) } else { ExitCode::SUCCESS })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<BuildIpxeArgs, clap::Error> {
        use clap::Parser as _;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            args: BuildIpxeArgs,
        }
        Cli::try_parse_from(std::iter::once("build-ipxe").chain(args.iter().copied())).map(|c| c.args)
    }

    #[test]
    fn command_line_specs() {
        let spec = parse(&["--vlan", "1000"]).unwrap().spec().unwrap();
        assert_eq!(spec.name, "ipxe");
        assert_eq!(spec.source, SourceSpec::upstream());
        assert_eq!(spec.targets.iter().map(|t| t.to_string()).collect::<Vec<_>>(), DEFAULT_TARGETS);
        let spec = parse(&["--git", "https://example.org/ipxe"]).unwrap().spec().unwrap();
        assert_eq!(spec.source, SourceSpec::Git { url: "https://example.org/ipxe".into(), rev: "HEAD".into() });
        let spec = parse(&["--rev", "v2.0.0"]).unwrap().spec().unwrap();
        assert_eq!(spec.source, SourceSpec::Git { url: UPSTREAM_GIT.into(), rev: "v2.0.0".into() });
        let e = format!("{:#}", parse(&["--target", "ipxe.efi"]).unwrap().spec().unwrap_err());
        assert!(e.starts_with("--target: target \"ipxe.efi\" must name a build directory"), "{e}");
        assert!(parse(&["--name", "a", "--name", "b"]).unwrap().spec().is_err());
        // clap refuses contradictions and bad VLAN IDs before anything runs.
        assert!(parse(&["--vlan", "4095"]).is_err());
        assert!(parse(&["--vlan", "10", "--embed", "x.ipxe"]).is_err());
        assert!(parse(&["--source", "x", "--git", "y"]).is_err());
        assert!(!parse(&["--dest", "/srv/tftp"]).unwrap().describes_a_build());
        assert!(parse(&["--option", "X"]).unwrap().describes_a_build());
    }
}
