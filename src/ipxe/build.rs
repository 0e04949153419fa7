//! Building an iPXE [`BuildSpec`] into the store: one output per target (named by the hash of everything that
//! decides its bytes), built with one `make` per platform directory, then one output gathering the binaries.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{Context, Result};
use serde::Serialize;

use super::embed::EmbedScript;
use super::options::Config;
use super::source;
use super::spec::BuildSpec;
use super::target::Target;
use super::toolchain::toolchain;
use super::{make, BUILD_VERSION, DEFAULT_EPOCH};
use crate::store::{input_hash, write_manifest, ManifestFiles, RootKind, Store, FORMAT_VERSION};
use crate::util::{mkdir_p, sha256_file, write_atomic, Progress};

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
    crate::util::human_size(n)
}

/// Reads the sha256 and size of `file` from the manifest of the output `dir`.
fn manifest_entry(dir: &Path, file: &str) -> Result<(String, u64)> {
    let listed = ManifestFiles::read(dir)?;
    let entry = listed.file(dir, file)?;
    Ok((entry.sha256.clone(), entry.size))
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
    let cache = store.cache_dir();
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
            store.add_root(RootKind::Ipxe, &spec.name, &out)?;
            out
        });
    }
    if !opts.dry_run {
        for (t, r) in spec.targets.iter().zip(&reports) {
            if let Some(p) = r.path.as_ref().and_then(|p| p.parent()) {
                store.add_root(RootKind::Ipxe, &target_store_name(&spec.name, t), p)?;
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
    let cache = store.cache_dir();
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ipxe::embed;
    use crate::ipxe::source::SourceSpec;

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
}
