//! Running iPXE's make: the work trees (private copies of the source, one per build directory,
//! reused between builds so a new embed or option only recompiles what changed), their
//! `config/local/*.h` and embedded script, and one `make` per build directory with the
//! settings that make the output reproducible.
//!
//! One copy per build directory, not one shared tree: iPXE's make touches shared headers
//! (`include/compiler.h`, `config/named.h` …) the first time it builds a new `bin-*`
//! directory, which would make every other platform's objects stale; and platforms building
//! in parallel would race to build the helper programs in `util/`.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};

use super::embed::EmbedScript;
use super::options::Config;
use super::source::{copy_tree, Source};
use crate::util::{mkdir_p, tail, write_atomic};

/// Where embedded scripts go, relative to the work tree's `src/`.
const EMBED_DIR: &str = "kiln-embed";

/// A private copy of one source tree for one build directory, under
/// `<store>/cache/ipxe-build/<tree>-<build dir>/`, locked for as long as this value lives (two
/// builds of the same platform and source take turns).
pub struct WorkTree {
    root: PathBuf,
    src: PathBuf,
    _lock: File,
}

impl WorkTree {
    /// Opens the work tree of `source` for the build directory `bin_dir`, copying the source
    /// in on first use.
    pub fn open(cache: &Path, source: &Source, bin_dir: &str) -> Result<WorkTree> {
        let base = cache.join("ipxe-build");
        mkdir_p(&base)?;
        let id = format!("{}-{bin_dir}", &source.tree[..32]);
        let lock_path = base.join(format!("{id}.lock"));
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .with_context(|| format!("opening {}", lock_path.display()))?;
        lock.lock().with_context(|| format!("locking {}", lock_path.display()))?;
        let root = base.join(&id);
        let src = root.join("src");
        if !src.join(".kiln-source").is_file() {
            let tmp = base.join(format!("{id}.tmp"));
            let _ = fs::remove_dir_all(&tmp);
            let _ = fs::remove_dir_all(&root);
            copy_tree(&source.src_dir, &tmp.join("src"))
                .with_context(|| format!("copying the iPXE source to {}", tmp.display()))?;
            fs::rename(&tmp, &root).with_context(|| format!("moving {} to {}", tmp.display(), root.display()))?;
        }
        let src = src.canonicalize().with_context(|| format!("resolving {}", src.display()))?;
        Ok(WorkTree { root, src, _lock: lock })
    }

    /// make's output of the last build here.
    pub fn log(&self) -> PathBuf {
        self.root.join("make.log")
    }

    pub fn src(&self) -> &Path {
        &self.src
    }

    /// Writes `config/local/*.h` for `config` and the embedded script; returns the `EMBED=`
    /// value. Files whose content is already right are not touched, so make rebuilds nothing.
    pub fn prepare(&self, source: &Source, config: &Config, embed: Option<&EmbedScript>) -> Result<String> {
        let local = self.src.join("config/local");
        mkdir_p(&local)?;
        let wanted = config.render_all(&source.src_dir.join("config/local"))?;
        // Every header a build may have overridden goes back to the source's own when this
        // build has no settings for it.
        for h in super::options::config_headers(&self.src.join("config"))? {
            let original = source.src_dir.join("config/local").join(&h);
            let content = match wanted.get(&h) {
                Some(text) => Some(text.clone().into_bytes()),
                None => fs::read(&original).ok(),
            };
            let path = local.join(&h);
            match content {
                Some(bytes) => write_if_changed(&path, &bytes)?,
                // make creates a missing local header as an empty file.
                None if fs::metadata(&path).map(|m| m.len() > 0).unwrap_or(false) => write_if_changed(&path, b"")?,
                None => {}
            }
        }
        let Some(script) = embed else { return Ok(String::new()) };
        let rel = format!("{EMBED_DIR}/{}", script.name);
        mkdir_p(&self.src.join(EMBED_DIR))?;
        write_if_changed(&self.src.join(&rel), &script.text)?;
        Ok(rel)
    }
}

fn write_if_changed(path: &Path, bytes: &[u8]) -> Result<()> {
    if fs::read(path).map(|old| old == bytes).unwrap_or(false) {
        return Ok(());
    }
    write_atomic(path, bytes)
}

/// One `make` run: every requested file of one build directory.
#[derive(Debug, Clone)]
pub struct MakeJob {
    /// `bin-x86_64-efi`
    pub dir: String,
    /// `snponly.efi` …
    pub files: Vec<String>,
    /// `CROSS=` prefix, if cross compiling.
    pub cross: Option<String>,
    pub jobs: usize,
}

/// What `make` gets besides the targets: the same for every platform of a build.
#[derive(Debug, Clone)]
pub struct MakeEnv {
    pub embed: String,
    pub git_version: Option<String>,
    pub source_date_epoch: i64,
}

/// The make command line for `job` in the work tree `src`.
pub fn make_command(src: &Path, job: &MakeJob, env: &MakeEnv) -> Command {
    let mut cmd = Command::new("make");
    cmd.current_dir(src).arg(format!("-j{}", job.jobs.max(1)));
    for f in &job.files {
        cmd.arg(format!("{}/{f}", job.dir));
    }
    if let Some(prefix) = &job.cross {
        cmd.arg(format!("CROSS={prefix}"));
    }
    // Object files must not carry the work tree's path: the EFI build id is a checksum of them.
    cmd.arg(format!("EXTRA_CFLAGS=-ffile-prefix-map={}=.", src.display()));
    cmd.arg(format!("EMBED={}", env.embed));
    // Set explicitly, so make never asks a git repository the work tree happens to sit in.
    cmd.arg(format!("GITVERSION={}", env.git_version.as_deref().unwrap_or("")));
    // A clean environment: make imports variables such as CFLAGS from it.
    cmd.env_clear();
    for keep in ["PATH", "HOME", "TMPDIR"] {
        if let Some(v) = std::env::var_os(keep) {
            cmd.env(keep, v);
        }
    }
    cmd.env("LC_ALL", "C").env("TZ", "UTC").env("SOURCE_DATE_EPOCH", env.source_date_epoch.to_string());
    cmd
}

/// Runs `job`; make's output goes to `log`. On failure the error holds the tail of the log.
pub fn run_make(src: &Path, job: &MakeJob, env: &MakeEnv, log: &Path) -> Result<f64> {
    let started = Instant::now();
    let mut cmd = make_command(src, job, env);
    let out = File::create(log).with_context(|| format!("creating {}", log.display()))?;
    cmd.stdin(Stdio::null()).stdout(out.try_clone()?).stderr(out);
    let shown = format!("{cmd:?}");
    let status = cmd.status().with_context(|| format!("starting {shown}"))?;
    if !status.success() {
        let text = fs::read(log).unwrap_or_default();
        bail!("make failed ({status}); last lines of {}:\n{}", log.display(), tail(&text, 25));
    }
    for f in &job.files {
        let p = src.join(&job.dir).join(f);
        if !p.is_file() {
            bail!("make succeeded but did not produce {}", p.display());
        }
    }
    Ok(started.elapsed().as_secs_f64())
}

/// How many platforms build at once, and make's `-j` for each: two cores or more per make,
/// so a 2-core machine builds one platform at a time with `-j2`.
pub fn schedule(platforms: usize, jobs: usize) -> (usize, usize) {
    let jobs = jobs.max(1);
    let parallel = platforms.min((jobs / 2).max(1)).max(1);
    (parallel, (jobs / parallel).max(1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn schedules_by_cores() {
        assert_eq!(schedule(3, 2), (1, 2));
        assert_eq!(schedule(3, 1), (1, 1));
        assert_eq!(schedule(3, 4), (2, 2));
        assert_eq!(schedule(3, 8), (3, 2));
        assert_eq!(schedule(1, 16), (1, 16));
    }

    #[test]
    fn make_command_is_reproducible_and_clean() {
        let job = MakeJob {
            dir: "bin-arm64-efi".into(),
            files: vec!["snponly.efi".into()],
            cross: Some("aarch64-linux-gnu-".into()),
            jobs: 2,
        };
        let env = MakeEnv { embed: "kiln-embed/kiln.ipxe".into(), git_version: None, source_date_epoch: 1_700_000_000 };
        let cmd = make_command(Path::new("/w/src"), &job, &env);
        let args: Vec<_> = cmd.get_args().map(|a| a.to_string_lossy().into_owned()).collect();
        assert_eq!(
            args,
            [
                "-j2",
                "bin-arm64-efi/snponly.efi",
                "CROSS=aarch64-linux-gnu-",
                "EXTRA_CFLAGS=-ffile-prefix-map=/w/src=.",
                "EMBED=kiln-embed/kiln.ipxe",
                "GITVERSION=",
            ]
        );
        let envs: BTreeMap<_, _> = cmd
            .get_envs()
            .filter_map(|(k, v)| Some((k.to_string_lossy().into_owned(), v?.to_string_lossy().into_owned())))
            .collect();
        assert_eq!(envs["SOURCE_DATE_EPOCH"], "1700000000");
        assert!(!envs.contains_key("CFLAGS"), "the caller's CFLAGS must not reach make");
    }

    #[test]
    fn prepare_writes_headers_and_restores_them() {
        let d = tempfile::tempdir().unwrap();
        let top = d.path().join("ipxe");
        fs::create_dir_all(top.join("src/config/local")).unwrap();
        fs::write(top.join("src/Makefile"), "all:\n").unwrap();
        fs::write(top.join("src/config/general.h"), "//#define IMAGE_ZLIB\n#define VLAN_CMD\n").unwrap();
        fs::write(top.join("src/config/console.h"), "//#define CONSOLE_SERIAL\n").unwrap();
        fs::write(top.join("src/config/crypto.h"), "#define CRYPTO_DIGEST_MD5\n").unwrap();
        fs::write(top.join("src/config/local/console.h"), "#define KEYBOARD_MAP de\n").unwrap();
        let source = Source {
            src_dir: top.join("src"),
            tree: super::super::source::tree_hash(&top.join("src")).unwrap(),
            commit: None,
            commit_time: None,
        };
        let cache = d.path().join("cache");
        let work = WorkTree::open(&cache, &source, "bin-x86_64-efi").unwrap();
        let local = work.src().join("config/local");
        let config =
            Config::resolve(&["crypto.h:CRYPTO_DIGEST_SHA1".into()], &[], &source.src_dir.join("config")).unwrap();
        let embed = EmbedScript { name: "kiln.ipxe".into(), text: b"#!ipxe\n".to_vec() };
        assert_eq!(work.prepare(&source, &config, Some(&embed)).unwrap(), "kiln-embed/kiln.ipxe");
        assert!(fs::read_to_string(local.join("crypto.h")).unwrap().contains("#define CRYPTO_DIGEST_SHA1"));
        let console = fs::read_to_string(local.join("console.h")).unwrap();
        assert!(console.contains("#define KEYBOARD_MAP de\n") && console.contains("#define CONSOLE_SERIAL\n"));
        assert_eq!(fs::read(work.src().join("kiln-embed/kiln.ipxe")).unwrap(), b"#!ipxe\n");
        // The source itself is never written.
        assert_eq!(fs::read_to_string(top.join("src/config/local/console.h")).unwrap(), "#define KEYBOARD_MAP de\n");
        assert!(!top.join("src/config/local/crypto.h").exists());
        // Unchanged content keeps its mtime (make would rebuild the platform otherwise).
        let before = fs::metadata(local.join("general.h")).unwrap().modified().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        work.prepare(&source, &config, Some(&embed)).unwrap();
        assert_eq!(fs::metadata(local.join("general.h")).unwrap().modified().unwrap(), before);
        // Without the option, crypto.h goes back to what the source has (nothing).
        let plain = Config::resolve(&[], &[], &source.src_dir.join("config")).unwrap();
        assert_eq!(work.prepare(&source, &plain, None).unwrap(), "");
        assert_eq!(fs::read(local.join("crypto.h")).unwrap(), b"");
        drop(work);
        // A second open reuses the copy.
        let again = WorkTree::open(&cache, &source, "bin-x86_64-efi").unwrap();
        assert!(again.log().to_string_lossy().ends_with("-bin-x86_64-efi/make.log"));
        assert_eq!(fs::read(again.src().join("config/local/crypto.h")).unwrap(), b"");
    }
}
