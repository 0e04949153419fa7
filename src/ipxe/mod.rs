//! `kiln build-ipxe`: iPXE built from source, reproducibly, into the store.
//!
//! A build takes a source (a local tree, or a git commit fetched into the store's cache), a list
//! of make targets, build options (iPXE `config/*.h` defines, written as `config/local/*.h` into
//! a private copy of the source) and an embedded script (a file, or one generated from `--vlan`
//! and `--chain`). Each target becomes its own store output, named by the hash of everything
//! that went into it (source tree, headers, script, target, compiler and binutils versions,
//! `SOURCE_DATE_EPOCH`), so the same inputs find the finished binary and build nothing. The
//! binaries of one build are then gathered, with Warewulf's names, into one more output: the
//! store path `kiln build-ipxe` prints, which `kiln serve` uses.
//!
//! Reproducible: make runs in a clean environment with `SOURCE_DATE_EPOCH` (EFI link
//! timestamp) and `-ffile-prefix-map=<tree>=.` (the EFI build id is a checksum of objects that
//! would otherwise carry the tree's path), so the same inputs give the same bytes wherever the
//! store is. Missing compilers or tools fail only the targets that need them, naming the
//! Debian/Ubuntu package. Not supported: iPXE's named configurations (`CONFIG=`), and more
//! than one embedded file.

mod embed;
mod make;
mod options;
mod recipe;
mod source;
mod target;

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::Mutex;

use anyhow::{bail, Context, Result};
use clap::Args;
use serde::Serialize;

pub use embed::EmbedScript;
pub use options::Config;
pub use source::{SourceSpec, PINNED_COMMIT, UPSTREAM_GIT};
pub use target::{Target, DEFAULT_TARGETS};

use crate::cli::StoreArg;
use crate::recipe::{check_name, LoadedRecipe, Lock, LockedIpxe};
use crate::store::{input_hash, write_manifest, Store, FORMAT_VERSION};
use crate::util::{mkdir_p, sha256_file, write_atomic, Progress};

/// Bumped whenever the way kiln drives iPXE's build changes its output.
const BUILD_VERSION: u32 = 1;

/// `SOURCE_DATE_EPOCH` when nothing else gives one (a source that is not a git checkout):
/// 1980-01-01, the oldest time every archive format can hold.
const DEFAULT_EPOCH: i64 = 315_532_800;

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

/// Where a build was described, for error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Cli,
    Recipe,
}

impl Origin {
    fn field(self, recipe_key: &str, flag: &str) -> String {
        match self {
            Origin::Cli => flag.to_string(),
            Origin::Recipe => format!("field `{recipe_key}`"),
        }
    }
}

/// One iPXE build: what to build from what.
#[derive(Debug, Clone)]
pub struct BuildSpec {
    pub name: String,
    pub targets: Vec<Target>,
    pub source: SourceSpec,
    pub embed: Option<EmbedScript>,
    pub options: Vec<String>,
    pub no_options: Vec<String>,
    pub source_date_epoch: Option<i64>,
}

impl BuildSpec {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        origin: Origin,
        name: &str,
        targets: &[String],
        source: SourceSpec,
        embed: Option<&Path>,
        vlan: Option<u16>,
        chain: Option<&str>,
        options: Vec<String>,
        no_options: Vec<String>,
        source_date_epoch: Option<i64>,
    ) -> Result<BuildSpec> {
        check_name(name).with_context(|| origin.field("name", "--name"))?;
        if targets.is_empty() {
            bail!("{}: name at least one target", origin.field("targets", "--target"));
        }
        let mut parsed = Vec::new();
        for t in targets {
            let t = Target::parse(t).with_context(|| origin.field("targets", "--target"))?;
            if !parsed.contains(&t) {
                parsed.push(t);
            }
        }
        let embed = match (embed, vlan, chain) {
            (Some(_), Some(_), _) => {
                bail!("{} and {} exclude each other", origin.field("embed", "--embed"), origin.field("vlan", "--vlan"))
            }
            (Some(_), _, Some(_)) => {
                bail!(
                    "{} and {} exclude each other",
                    origin.field("embed", "--embed"),
                    origin.field("chain", "--chain")
                )
            }
            (Some(file), None, None) => Some(embed::from_file(file).with_context(|| origin.field("embed", "--embed"))?),
            (None, vlan, chain) => {
                let what =
                    if vlan.is_some() { origin.field("vlan", "--vlan") } else { origin.field("chain", "--chain") };
                embed::generate(vlan, chain).with_context(|| what)?
            }
        };
        Ok(BuildSpec { name: name.to_string(), targets: parsed, source, embed, options, no_options, source_date_epoch })
    }
}

/// How to build, the same for every build of one invocation.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// make jobs in all.
    pub jobs: usize,
    pub dest: Option<PathBuf>,
    pub dry_run: bool,
    /// Fetch nothing that is not pinned.
    pub locked: bool,
    /// This machine's architecture, as Rust names it (`x86_64`, `aarch64`).
    pub host_arch: String,
    /// Where programs are looked up (PATH).
    pub path: OsString,
}

impl BuildOptions {
    pub fn new(jobs: usize) -> BuildOptions {
        BuildOptions {
            jobs,
            dest: None,
            dry_run: false,
            locked: false,
            host_arch: std::env::consts::ARCH.to_string(),
            path: std::env::var_os("PATH").unwrap_or_default(),
        }
    }
}

/// What one build did: printed by `--json`.
#[derive(Debug, Clone, Serialize)]
pub struct BuildReport {
    pub name: String,
    /// The output holding every target's binary, when all of them built.
    pub path: Option<PathBuf>,
    /// Every target came from the store.
    pub cached: bool,
    pub source: SourceReport,
    pub source_date_epoch: i64,
    pub targets: Vec<TargetReport>,
    pub dest: Option<PathBuf>,
    /// One line per failed target.
    pub errors: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SourceReport {
    #[serde(flatten)]
    pub origin: serde_json::Value,
    pub tree: String,
    pub commit: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TargetReport {
    pub target: String,
    /// The binary's name outside the build tree (Warewulf's): bin-x86_64-efi-snponly.efi.
    pub file: String,
    /// The binary in the store.
    pub path: Option<PathBuf>,
    pub sha256: Option<String>,
    pub size: Option<u64>,
    /// built, cached, failed or would-build.
    pub status: &'static str,
    pub cached: bool,
    pub seconds: f64,
    pub error: Option<String>,
}

impl TargetReport {
    fn new(t: &Target) -> TargetReport {
        TargetReport {
            target: t.to_string(),
            file: t.flat_name(),
            path: None,
            sha256: None,
            size: None,
            status: "failed",
            cached: false,
            seconds: 0.0,
            error: None,
        }
    }
}

/// Looks `program` up in `path` (an absolute path is checked as a file).
fn find_program(program: &str, path: &OsString) -> Option<PathBuf> {
    if program.starts_with('/') {
        return Path::new(program).exists().then(|| PathBuf::from(program));
    }
    use std::os::unix::fs::PermissionsExt as _;
    std::env::split_paths(path)
        .map(|dir| dir.join(program))
        .find(|p| p.metadata().map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0).unwrap_or(false))
}

/// The first line of `program --version`.
fn version_line(program: &str, path: &OsString) -> Result<String> {
    let out = Command::new(program)
        .arg("--version")
        .env("PATH", path)
        .env("LC_ALL", "C")
        .output()
        .with_context(|| format!("running {program} --version"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().next().unwrap_or("").trim().to_string();
    if !out.status.success() || line.is_empty() {
        bail!("{program} --version printed no version");
    }
    Ok(line)
}

/// The liblzma version zbin compresses with (the compressed bytes may change with it).
fn lzma_version() -> String {
    let text = fs::read_to_string("/usr/include/lzma/version.h").unwrap_or_default();
    let num = |key: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix("#define ")?.strip_prefix(key)?.trim().parse::<u32>().ok())
            .map(|n| n.to_string())
            .unwrap_or_else(|| "?".into())
    };
    format!("{}.{}.{}", num("LZMA_VERSION_MAJOR"), num("LZMA_VERSION_MINOR"), num("LZMA_VERSION_PATCH"))
}

/// Checks what `target` needs and returns its toolchain's identity (versions that change the
/// output) and its `CROSS=` prefix; the error names what is missing and which package has it.
fn toolchain(target: &Target, opts: &BuildOptions) -> Result<(BTreeMap<String, String>, Option<String>)> {
    let reqs = target::requirements(target, &opts.host_arch)?;
    let missing: Vec<String> = reqs
        .iter()
        .filter(|r| find_program(&r.what, &opts.path).is_none())
        .map(|r| target::missing_message(target, r))
        .collect();
    if !missing.is_empty() {
        bail!("{}", missing.join("\n"));
    }
    let cross = target::cross_prefix(&target.arch, &opts.host_arch)?.map(|(p, _, _)| p.to_string());
    let prefix = cross.as_deref().unwrap_or("");
    let mut versions = BTreeMap::new();
    versions.insert("host_gcc".to_string(), version_line("gcc", &opts.path)?);
    versions.insert("gcc".to_string(), version_line(&format!("{prefix}gcc"), &opts.path)?);
    versions.insert("ld".to_string(), version_line(&format!("{prefix}ld"), &opts.path)?);
    if !target.is_efi() {
        versions.insert("liblzma".to_string(), lzma_version());
    }
    Ok((versions, cross))
}

/// Everything that decides one target's bytes. Its hash names the target's store output.
fn target_inputs(
    source: &source::Source,
    target: &Target,
    headers: &BTreeMap<String, String>,
    embed: Option<&EmbedScript>,
    toolchain: &BTreeMap<String, String>,
    cross: Option<&str>,
    source_date_epoch: i64,
) -> serde_json::Value {
    serde_json::json!({
        "kind": "ipxe",
        "format": FORMAT_VERSION,
        "build": BUILD_VERSION,
        "source": { "tree": source.tree, "commit": source.commit },
        "target": target.to_string(),
        "config_local": headers,
        "embed": embed.map(|e| serde_json::json!({
            "name": e.name,
            "sha256": crate::util::Digest::of_bytes(&e.text).hex(),
        })),
        "toolchain": toolchain,
        "cross": cross,
        "source_date_epoch": source_date_epoch,
    })
}

fn target_store_name(build: &str, t: &Target) -> String {
    format!("{build}-{}", t.flat_name())
}

/// A progress line on stderr (when it is a terminal and --quiet is not given).
fn note(label: &str, msg: impl std::fmt::Display) {
    Progress::new(label.to_string()).done(msg);
}

fn human(n: u64) -> String {
    crate::cli::human_size(n)
}

/// Reads the sha256 and size of `file` from the manifest of the output `dir`.
fn manifest_entry(dir: &Path, file: &str) -> Result<(String, u64)> {
    let p = dir.join("manifest.json");
    let v: serde_json::Value =
        serde_json::from_slice(&fs::read(&p).with_context(|| format!("reading {}", p.display()))?)
            .with_context(|| format!("parsing {}", p.display()))?;
    let e = &v["files"][file];
    match (e["sha256"].as_str(), e["size"].as_u64()) {
        (Some(s), Some(n)) => Ok((s.to_string(), n)),
        _ => bail!("{} does not list {file}; run kiln store verify", p.display()),
    }
}

struct Planned {
    index: usize,
    target: Target,
    hash: String,
    inputs: serde_json::Value,
}

/// Builds (or finds in the store) every target of `spec`. `pinned` is kiln.lock's commit for
/// a git source. Errors of single targets are in the report; an `Err` means nothing could start.
pub fn build(store: &Store, spec: &BuildSpec, opts: &BuildOptions, pinned: Option<&str>) -> Result<BuildReport> {
    let cache = store.root().join("cache");
    let source = source::resolve(&spec.source, &cache, pinned, opts.locked)?;
    let config = Config::resolve(&spec.options, &spec.no_options, &source.src_dir.join("config"))?;
    let headers = config.render_all(&source.src_dir.join("config/local"))?;
    let source_date_epoch = spec
        .source_date_epoch
        .or_else(|| std::env::var("SOURCE_DATE_EPOCH").ok().and_then(|v| v.trim().parse().ok()))
        .or(source.commit_time)
        .unwrap_or(DEFAULT_EPOCH);

    let mut reports: Vec<TargetReport> = spec.targets.iter().map(TargetReport::new).collect();
    let mut hashes = BTreeMap::new();
    let mut todo: BTreeMap<(String, Option<String>), Vec<Planned>> = BTreeMap::new();
    for (index, t) in spec.targets.iter().enumerate() {
        let label = t.to_string();
        let report = &mut reports[index];
        let (versions, cross) = match toolchain(t, opts) {
            Ok(v) => v,
            Err(e) => {
                report.error = Some(format!("{e:#}"));
                note(&label, format!("cannot build: {e:#}"));
                continue;
            }
        };
        let inputs =
            target_inputs(&source, t, &headers, spec.embed.as_ref(), &versions, cross.as_deref(), source_date_epoch);
        let hash = input_hash(&inputs);
        hashes.insert(t.to_string(), hash.clone());
        let name = target_store_name(&spec.name, t);
        if let Some(dir) = store.lookup(&hash, &name) {
            let (sha256, size) = manifest_entry(&dir, &t.flat_name())?;
            report.path = Some(dir.join(t.flat_name()));
            report.sha256 = Some(sha256);
            report.size = Some(size);
            report.status = "cached";
            report.cached = true;
            note(&label, format!("cached ({})", human(size)));
        } else if opts.dry_run {
            report.path = Some(store.path_for(&hash, &name).join(t.flat_name()));
            report.status = "would-build";
        } else {
            todo.entry((t.dir.clone(), cross)).or_default().push(Planned { index, target: t.clone(), hash, inputs });
        }
    }

    if !todo.is_empty() {
        run_makes(store, spec, opts, &source, &config, source_date_epoch, todo, &mut reports)?;
    }

    let errors: Vec<String> = reports.iter().filter_map(|r| r.error.clone()).collect();
    let mut path = None;
    if errors.is_empty() {
        let set_inputs = serde_json::json!({ "kind": "ipxe-set", "format": FORMAT_VERSION, "targets": hashes });
        let set_hash = input_hash(&set_inputs);
        path = Some(if opts.dry_run {
            store.path_for(&set_hash, &spec.name)
        } else {
            let out = match store.lookup(&set_hash, &spec.name) {
                Some(p) => p,
                None => commit_set(store, spec, &source, source_date_epoch, &set_hash, &hashes, &reports)?,
            };
            store.add_root("ipxe", &spec.name, &out)?;
            out
        });
    }
    if !opts.dry_run {
        for (t, r) in spec.targets.iter().zip(&reports) {
            if let Some(p) = r.path.as_ref().and_then(|p| p.parent()) {
                store.add_root("ipxe", &target_store_name(&spec.name, t), p)?;
            }
        }
        if let Some(dest) = &opts.dest {
            mkdir_p(dest)?;
            for r in reports.iter().filter(|r| r.error.is_none()) {
                let from = r.path.as_ref().expect("a target without error has a path");
                let bytes = fs::read(from).with_context(|| format!("reading {}", from.display()))?;
                write_atomic(&dest.join(&r.file), &bytes)?;
            }
        }
    }
    Ok(BuildReport {
        name: spec.name.clone(),
        path,
        cached: reports.iter().all(|r| r.cached),
        source: SourceReport {
            origin: spec.source.describe(),
            tree: source.tree.clone(),
            commit: source.commit.clone(),
        },
        source_date_epoch,
        targets: reports,
        dest: opts.dest.clone(),
        errors,
    })
}

/// Runs one make per build directory (in parallel where the cores allow, each in its own work
/// tree) and commits each built target into the store while its work tree is still locked.
#[allow(clippy::too_many_arguments)]
fn run_makes(
    store: &Store,
    spec: &BuildSpec,
    opts: &BuildOptions,
    source: &source::Source,
    config: &Config,
    source_date_epoch: i64,
    todo: BTreeMap<(String, Option<String>), Vec<Planned>>,
    reports: &mut [TargetReport],
) -> Result<()> {
    let cache = store.root().join("cache");
    let (parallel, jobs) = make::schedule(todo.len(), opts.jobs);
    let queue = Mutex::new(todo.into_iter().collect::<Vec<_>>());
    let done = Mutex::new(Vec::new());
    let build_dir = |dir: &str, cross: Option<String>, planned: &[Planned]| -> Result<Vec<(usize, Result<Built>)>> {
        let work = make::WorkTree::open(&cache, source, dir)?;
        let embed = work.prepare(source, config, spec.embed.as_ref())?;
        let env = make::MakeEnv { embed, git_version: source.commit.clone(), source_date_epoch };
        let files: Vec<String> = planned.iter().map(|p| p.target.file.clone()).collect();
        let cross_note = cross.as_deref().map(|c| format!(", CROSS={c}")).unwrap_or_default();
        note(dir, format!("building {} (make -j{jobs}{cross_note})", files.join(" ")));
        let job = make::MakeJob { dir: dir.to_string(), files, cross, jobs };
        let seconds = make::run_make(work.src(), &job, &env, &work.log())?;
        Ok(planned
            .iter()
            .map(|p| {
                let built = work.src().join(dir).join(&p.target.file);
                (
                    p.index,
                    commit_target(store, spec, p, &built).map(|(path, sha256, size)| Built {
                        path,
                        sha256,
                        size,
                        seconds,
                    }),
                )
            })
            .collect())
    };
    std::thread::scope(|s| {
        for _ in 0..parallel {
            s.spawn(|| loop {
                let Some(((dir, cross), planned)) = queue.lock().expect("queue lock").pop() else { break };
                let results = match build_dir(&dir, cross, &planned) {
                    Ok(r) => r,
                    Err(e) => planned.iter().map(|p| (p.index, Err(anyhow::anyhow!("{e:#}")))).collect(),
                };
                done.lock().expect("results lock").extend(results);
            });
        }
    });
    for (index, result) in done.into_inner().expect("results lock") {
        let label = spec.targets[index].to_string();
        let report = &mut reports[index];
        match result {
            Ok(b) => {
                note(&label, format!("built in {:.1}s ({})", b.seconds, human(b.size)));
                report.path = Some(b.path);
                report.sha256 = Some(b.sha256);
                report.size = Some(b.size);
                report.status = "built";
                report.seconds = b.seconds;
            }
            Err(e) => {
                note(&label, "failed");
                report.error = Some(format!("{label}: {e:#}"));
            }
        }
    }
    Ok(())
}

/// A target built and committed.
struct Built {
    path: PathBuf,
    sha256: String,
    size: u64,
    seconds: f64,
}

/// Puts one built binary into the store as its own output.
fn commit_target(store: &Store, spec: &BuildSpec, p: &Planned, built: &Path) -> Result<(PathBuf, String, u64)> {
    let name = target_store_name(&spec.name, &p.target);
    let file = p.target.flat_name();
    let pending = store.begin(&name)?;
    fs::copy(built, pending.dir().join(&file)).with_context(|| format!("copying {}", built.display()))?;
    let (digest, size) = sha256_file(&pending.dir().join(&file))?;
    write_manifest(
        pending.dir(),
        &serde_json::json!({
            "kind": "ipxe",
            "name": spec.name,
            "target": p.target.to_string(),
            "inputs": p.inputs,
            "files": { &file: { "sha256": digest.hex(), "size": size } },
        }),
    )?;
    let out = store.commit(pending, &p.hash, &name)?;
    Ok((out.join(&file), digest.hex(), size))
}

/// Gathers every target's binary into the build's output.
fn commit_set(
    store: &Store,
    spec: &BuildSpec,
    source: &source::Source,
    source_date_epoch: i64,
    hash: &str,
    hashes: &BTreeMap<String, String>,
    reports: &[TargetReport],
) -> Result<PathBuf> {
    let pending = store.begin(&spec.name)?;
    let mut files = serde_json::Map::new();
    let mut targets = serde_json::Map::new();
    for r in reports {
        let from = r.path.as_ref().expect("every target succeeded");
        fs::copy(from, pending.dir().join(&r.file)).with_context(|| format!("copying {}", from.display()))?;
        files.insert(r.file.clone(), serde_json::json!({ "sha256": r.sha256, "size": r.size }));
        targets.insert(r.target.clone(), serde_json::json!({ "file": r.file, "input_hash": hashes[&r.target] }));
    }
    write_manifest(
        pending.dir(),
        &serde_json::json!({
            "kind": "ipxe",
            "name": spec.name,
            "source": { "origin": spec.source.describe(), "tree": source.tree, "commit": source.commit },
            "source_date_epoch": source_date_epoch,
            "embed": spec.embed.as_ref().map(|e| String::from_utf8_lossy(&e.text).into_owned()),
            "targets": targets,
            "files": files,
        }),
    )?;
    store.commit(pending, hash, &spec.name)
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
            reports.push(build(&store, &spec, &opts, None).with_context(|| format!("building iPXE {}", spec.name))?);
        }
        Some(loaded) => {
            let names: Vec<String> =
                if args.name.is_empty() { loaded.recipe.ipxe.keys().cloned().collect() } else { args.name.clone() };
            let lock_path = loaded.lock_path();
            let mut lock = Lock::load(&lock_path)?;
            let before = toml::to_string(&lock).unwrap_or_default();
            for name in &names {
                let mut spec = recipe::spec(&loaded, name)?;
                if args.source_date_epoch.is_some() {
                    spec.source_date_epoch = args.source_date_epoch;
                }
                let pinned = match &spec.source {
                    SourceSpec::Git { url, rev } if !args.update => {
                        lock.ipxe.get(name).filter(|l| &l.git == url && &l.rev == rev).map(|l| l.commit.clone())
                    }
                    _ => None,
                };
                let report = build(&store, &spec, &opts, pinned.as_deref())
                    .with_context(|| format!("building [ipxe.{name}] of {}", loaded.path.display()))?;
                if let (SourceSpec::Git { url, rev }, Some(commit)) = (&spec.source, &report.source.commit) {
                    lock.ipxe.insert(
                        name.clone(),
                        LockedIpxe { git: url.clone(), rev: rev.clone(), commit: commit.clone() },
                    );
                }
                reports.push(report);
            }
            if !opts.dry_run && toml::to_string(&lock).unwrap_or_default() != before {
                lock.save(&lock_path)?;
            }
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

    fn fake_source(dir: &Path) -> source::Source {
        fs::create_dir_all(dir.join("src/config/local")).unwrap();
        fs::write(dir.join("src/Makefile"), "all:\n").unwrap();
        fs::write(dir.join("src/config/general.h"), "#define VLAN_CMD\n#undef DOWNLOAD_PROTO_HTTPS\n").unwrap();
        fs::write(dir.join("src/config/console.h"), "//#define CONSOLE_SERIAL\n").unwrap();
        source::resolve(&SourceSpec::Path(dir.to_path_buf()), &dir.join("cache"), None, true).unwrap()
    }

    fn key(source: &source::Source, target: &str, options: &[&str], vlan: Option<u16>, gcc: &str) -> String {
        let options: Vec<String> = options.iter().map(|s| s.to_string()).collect();
        let config = Config::resolve(&options, &[], &source.src_dir.join("config")).unwrap();
        let headers = config.render_all(&source.src_dir.join("config/local")).unwrap();
        let embed = embed::generate(vlan, None).unwrap();
        let tc = BTreeMap::from([("gcc".to_string(), gcc.to_string())]);
        input_hash(&target_inputs(source, &Target::parse(target).unwrap(), &headers, embed.as_ref(), &tc, None, 1))
    }

    #[test]
    fn cache_keys_cover_every_input() {
        let d = tempfile::tempdir().unwrap();
        let s = fake_source(d.path());
        let base = key(&s, "bin-x86_64-efi/snponly.efi", &[], Some(1000), "gcc 12.2.0");
        assert_eq!(base, key(&s, "bin-x86_64-efi/snponly.efi", &[], Some(1000), "gcc 12.2.0"), "stable");
        for other in [
            key(&s, "bin-x86_64-efi/ipxe.efi", &[], Some(1000), "gcc 12.2.0"),
            key(&s, "bin-x86_64-efi/snponly.efi", &["DOWNLOAD_PROTO_HTTPS"], Some(1000), "gcc 12.2.0"),
            key(&s, "bin-x86_64-efi/snponly.efi", &[], Some(1001), "gcc 12.2.0"),
            key(&s, "bin-x86_64-efi/snponly.efi", &[], None, "gcc 12.2.0"),
            key(&s, "bin-x86_64-efi/snponly.efi", &[], Some(1000), "gcc 13.1.0"),
        ] {
            assert_ne!(other, base);
        }
        // The source's content counts; where it sits does not.
        let moved = tempfile::tempdir().unwrap();
        let s2 = fake_source(moved.path());
        assert_eq!(key(&s2, "bin-x86_64-efi/snponly.efi", &[], Some(1000), "gcc 12.2.0"), base);
        fs::write(moved.path().join("src/config/local/general.h"), "#define X\n").unwrap();
        let s3 = source::resolve(&SourceSpec::Path(moved.path().to_path_buf()), &moved.path().join("c"), None, true)
            .unwrap();
        assert_ne!(key(&s3, "bin-x86_64-efi/snponly.efi", &[], Some(1000), "gcc 12.2.0"), base);
    }

    #[test]
    fn missing_tools_fail_only_their_targets() {
        let bin = tempfile::tempdir().unwrap();
        // A PATH with a host toolchain but no cross compiler.
        for tool in ["make", "perl", "gcc", "ld", "objcopy"] {
            let p = bin.path().join(tool);
            fs::write(&p, format!("#!/bin/sh\necho '{tool} (fake) 1.0'\n")).unwrap();
            use std::os::unix::fs::PermissionsExt as _;
            fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
        }
        let mut opts = BuildOptions::new(2);
        opts.host_arch = "x86_64".into();
        opts.path = bin.path().as_os_str().to_owned();
        let (versions, cross) = toolchain(&Target::parse("bin-x86_64-efi/snponly.efi").unwrap(), &opts).unwrap();
        assert_eq!(cross, None);
        assert_eq!(versions["gcc"], "gcc (fake) 1.0");
        let err = toolchain(&Target::parse("bin-arm64-efi/snponly.efi").unwrap(), &opts).unwrap_err().to_string();
        assert_eq!(
            err,
            "bin-arm64-efi/snponly.efi: aarch64-linux-gnu-gcc not found; install gcc-aarch64-linux-gnu (Debian/Ubuntu)\n\
             bin-arm64-efi/snponly.efi: aarch64-linux-gnu-ld not found; install binutils-aarch64-linux-gnu (Debian/Ubuntu)\n\
             bin-arm64-efi/snponly.efi: aarch64-linux-gnu-objcopy not found; install binutils-aarch64-linux-gnu (Debian/Ubuntu)"
        );
    }

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
