//! Where the iPXE source comes from: a local tree (`--source DIR`) or a git commit fetched
//! into `<store>/cache/ipxe-src/<commit>`. Either way a source is known by the hash of its
//! `src/` files ([`Source::tree`]), so a clean checkout and a fetch of the same commit are the
//! same input, and a local edit is a different one.

use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use sha2::{Digest as _, Sha256};

use crate::util::{mkdir_p, run_command, sha256_file};

/// Upstream iPXE.
pub const UPSTREAM_GIT: &str = "https://github.com/ipxe/ipxe";
/// The upstream commit kiln builds by default ("\[arm\] Add missing condition code clobbers to
/// inline assembly", 2026-08-21). Bump it deliberately: it changes every default build.
pub const PINNED_COMMIT: &str = "0ab2277c40f1de56c736b9e7db7ee23d52509ec5";

/// What the user asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceSpec {
    /// A local tree: its top directory (with `src/`) or its `src/` directory.
    Path(PathBuf),
    /// A git repository and a revision (a commit, a tag, a branch, `HEAD`).
    Git { url: String, rev: String },
}

impl SourceSpec {
    pub fn upstream() -> SourceSpec {
        SourceSpec::Git { url: UPSTREAM_GIT.into(), rev: PINNED_COMMIT.into() }
    }

    pub fn describe(&self) -> serde_json::Value {
        match self {
            SourceSpec::Path(p) => serde_json::json!({ "path": p }),
            SourceSpec::Git { url, rev } => serde_json::json!({ "git": url, "rev": rev }),
        }
    }
}

/// A source ready to build.
#[derive(Debug, Clone)]
pub struct Source {
    /// The tree's `src/` directory, where iPXE's Makefile is. Only read, never written.
    pub src_dir: PathBuf,
    /// sha256 over the paths, modes and contents of every file under `src/` that a build reads.
    pub tree: String,
    /// The git commit the tree is a checkout of (what iPXE's own Makefile would put in its
    /// version string), if it is one.
    pub commit: Option<String>,
    /// That commit's time, the default `SOURCE_DATE_EPOCH`.
    pub commit_time: Option<i64>,
}

fn is_commit_id(rev: &str) -> bool {
    rev.len() == 40 && rev.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

/// Makes `spec` ready: checks a local tree, or finds (fetching if needed) a git commit in
/// `cache`. `pinned` is the commit kiln.lock recorded for this git URL and revision; with
/// `offline`, nothing is fetched that is not pinned.
pub fn resolve(spec: &SourceSpec, cache: &Path, pinned: Option<&str>, offline: bool) -> Result<Source> {
    let top = match spec {
        SourceSpec::Path(dir) => local_src_dir(dir)?,
        SourceSpec::Git { url, rev } => {
            let want = if is_commit_id(rev) { Some(rev.as_str()) } else { pinned };
            let cached = want.map(|c| cache.join("ipxe-src").join(c)).filter(|d| d.join("src/Makefile").is_file());
            match cached {
                Some(dir) => dir.join("src"),
                None if offline && want.is_none() => {
                    bail!("{url} {rev} is not pinned in kiln.lock and --locked forbids resolving it")
                }
                // A pinned commit is fetched by its id, so a moved branch cannot change it.
                None => fetch(url, want.unwrap_or(rev), want, cache)?.join("src"),
            }
        }
    };
    let tree = tree_hash(&top).with_context(|| format!("hashing the iPXE source in {}", top.display()))?;
    let (commit, commit_time) = git_head(&top);
    Ok(Source { src_dir: top, tree, commit, commit_time })
}

/// The `src/` directory of a local iPXE tree given as its top or as `src/` itself.
fn local_src_dir(dir: &Path) -> Result<PathBuf> {
    let dir = dir.canonicalize().with_context(|| format!("iPXE source {}", dir.display()))?;
    if dir.join("src/Makefile").is_file() && dir.join("src/config/general.h").is_file() {
        return Ok(dir.join("src"));
    }
    if dir.join("Makefile").is_file() && dir.join("config/general.h").is_file() {
        return Ok(dir);
    }
    bail!(
        "{} is not an iPXE source tree (no src/Makefile and src/config/general.h); give the top \
         directory of a checkout of https://github.com/ipxe/ipxe",
        dir.display()
    )
}

/// Fetches one revision (shallow) into `cache/ipxe-src/<commit>` with the git CLI.
fn fetch(url: &str, rev: &str, expect: Option<&str>, cache: &Path) -> Result<PathBuf> {
    let base = cache.join("ipxe-src");
    mkdir_p(&base)?;
    let tmp = tempfile::Builder::new().prefix(".fetch-").tempdir_in(&base)?;
    let git = |args: &[&str]| {
        let mut c = Command::new("git");
        c.arg("-C").arg(tmp.path()).args(args).env("GIT_TERMINAL_PROMPT", "0");
        c
    };
    let context = || format!("fetching iPXE {rev} from {url} (is git installed and the URL reachable?)");
    run_command(git(&["init", "-q"]).arg(".")).with_context(context)?;
    run_command(&mut git(&["fetch", "-q", "--depth", "1", url, rev])).with_context(context)?;
    run_command(&mut git(&["-c", "advice.detachedHead=false", "checkout", "-q", "FETCH_HEAD"]))
        .with_context(context)?;
    let out = run_command(&mut git(&["rev-parse", "HEAD"])).with_context(context)?;
    let commit = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if let Some(want) = expect {
        if commit != want {
            bail!("{url} {rev} resolved to {commit}, but {want} was expected (kiln.lock or --rev)");
        }
    }
    if !tmp.path().join("src/Makefile").is_file() {
        bail!("{url} {rev} ({commit}) is not an iPXE tree: it has no src/Makefile");
    }
    let dest = base.join(&commit);
    if !dest.join("src/Makefile").is_file() {
        let _ = fs::remove_dir_all(&dest);
        let kept = tmp.keep();
        fs::rename(&kept, &dest).with_context(|| format!("moving {} to {}", kept.display(), dest.display()))?;
    }
    Ok(dest)
}

/// The commit of the git checkout `src_dir` belongs to, and its time. Mirrors iPXE's
/// Makefile, which reads `src/../.git`.
fn git_head(src_dir: &Path) -> (Option<String>, Option<i64>) {
    let top = src_dir.join("..");
    if !top.join(".git").exists() {
        return (None, None);
    }
    let out = Command::new("git").arg("-C").arg(&top).args(["log", "-1", "--format=%H %ct", "HEAD"]).output();
    match out {
        Ok(o) if o.status.success() => {
            let text = String::from_utf8_lossy(&o.stdout);
            let mut words = text.split_whitespace();
            let commit = words.next().filter(|c| is_commit_id(c)).map(str::to_string);
            let time = words.next().and_then(|t| t.parse().ok());
            (commit, time)
        }
        _ => (None, None),
    }
}

/// One file of a source tree, as a build sees it.
#[derive(Debug)]
enum Entry {
    File { rel: PathBuf, executable: bool },
    Symlink { rel: PathBuf, target: PathBuf },
}

/// Whether `rel` (relative to `src/`) is a build output or VCS data rather than source.
fn skipped(rel: &Path, abs: &Path, is_dir: bool) -> bool {
    let name = rel.file_name().map(|n| n.to_string_lossy()).unwrap_or_default();
    if name == ".git" {
        return true;
    }
    let depth = rel.components().count();
    if depth == 1
        && (is_dir && (name == "bin" || name.starts_with("bin-")) || name == ".toolcheck" || name == ".echocheck")
    {
        return true;
    }
    // util/zbin64, util/elf2efi64 …: helper programs an earlier build compiled in place.
    if depth == 2 && rel.starts_with("util") && !is_dir {
        let mut magic = [0u8; 4];
        if let Ok(mut f) = fs::File::open(abs) {
            use std::io::Read as _;
            if f.read_exact(&mut magic).is_ok() && &magic == b"\x7fELF" {
                return true;
            }
        }
    }
    false
}

fn walk(src_dir: &Path) -> Result<Vec<Entry>> {
    fn visit(root: &Path, rel: &Path, out: &mut Vec<Entry>) -> Result<()> {
        let dir = root.join(rel);
        let mut names: Vec<_> = fs::read_dir(&dir)
            .with_context(|| format!("reading {}", dir.display()))?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<_, _>>()?;
        names.sort();
        for name in names {
            let rel = rel.join(&name);
            let abs = root.join(&rel);
            let meta = fs::symlink_metadata(&abs).with_context(|| format!("reading {}", abs.display()))?;
            let ft = meta.file_type();
            if skipped(&rel, &abs, ft.is_dir()) {
                continue;
            }
            if ft.is_dir() {
                visit(root, &rel, out)?;
            } else if ft.is_symlink() {
                let target = fs::read_link(&abs).with_context(|| format!("reading {}", abs.display()))?;
                out.push(Entry::Symlink { rel, target });
            } else if ft.is_file() {
                use std::os::unix::fs::PermissionsExt as _;
                out.push(Entry::File { rel, executable: meta.permissions().mode() & 0o111 != 0 });
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    visit(src_dir, Path::new(""), &mut out)?;
    Ok(out)
}

/// The identity of a `src/` tree: sha256 over each file's path, kind, mode and content hash,
/// in path order.
pub fn tree_hash(src_dir: &Path) -> Result<String> {
    let mut h = Sha256::new();
    for e in walk(src_dir)? {
        let line = match e {
            Entry::File { rel, executable } => {
                let (digest, _) = sha256_file(&src_dir.join(&rel))?;
                format!("{}\0{}\0{}\n", rel.display(), if executable { "x" } else { "f" }, digest.hex())
            }
            Entry::Symlink { rel, target } => format!("{}\0l\0{}\n", rel.display(), target.display()),
        };
        h.update(line.as_bytes());
    }
    Ok(hex::encode(h.finalize()))
}

/// Copies the source part of `src_dir` to `dest` (which must not exist), keeping modes and
/// symlinks, leaving out what [`tree_hash`] leaves out.
pub fn copy_tree(src_dir: &Path, dest: &Path) -> Result<()> {
    mkdir_p(dest)?;
    for e in walk(src_dir)? {
        match e {
            Entry::File { rel, .. } => {
                let to = dest.join(&rel);
                if let Some(parent) = to.parent() {
                    mkdir_p(parent)?;
                }
                fs::copy(src_dir.join(&rel), &to)
                    .with_context(|| format!("copying {} to {}", src_dir.join(&rel).display(), to.display()))?;
            }
            Entry::Symlink { rel, target } => {
                let to = dest.join(&rel);
                if let Some(parent) = to.parent() {
                    mkdir_p(parent)?;
                }
                std::os::unix::fs::symlink(&target, &to).with_context(|| format!("creating {}", to.display()))?;
            }
        }
    }
    // config/local/ holds only a .gitignore upstream, and make writes into it.
    mkdir_p(&dest.join("config/local"))?;
    let mut marker = fs::File::create(dest.join(".kiln-source"))?;
    writeln!(marker, "copied by kiln build-ipxe from {}", src_dir.display())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_tree(dir: &Path) {
        fs::create_dir_all(dir.join("src/config/local")).unwrap();
        fs::create_dir_all(dir.join("src/util")).unwrap();
        fs::create_dir_all(dir.join("src/bin-x86_64-efi")).unwrap();
        fs::create_dir_all(dir.join(".git")).unwrap();
        fs::write(dir.join("src/Makefile"), "all:\n").unwrap();
        fs::write(dir.join("src/config/general.h"), "#define VLAN_CMD\n").unwrap();
        fs::write(dir.join("src/util/genfsimg"), "#!/bin/sh\n").unwrap();
        fs::write(dir.join("src/util/zbin64"), b"\x7fELF...").unwrap();
        fs::write(dir.join("src/bin-x86_64-efi/snponly.efi"), "built").unwrap();
        fs::write(dir.join(".git/HEAD"), "ref: x").unwrap();
    }

    #[test]
    fn tree_hash_ignores_build_outputs_and_location() {
        let a = tempfile::tempdir().unwrap();
        fake_tree(a.path());
        let h1 = tree_hash(&a.path().join("src")).unwrap();
        // Build outputs and VCS data do not count.
        fs::write(a.path().join("src/bin-x86_64-efi/more.o"), "x").unwrap();
        fs::write(a.path().join("src/util/elf2efi64"), b"\x7fELF..").unwrap();
        assert_eq!(tree_hash(&a.path().join("src")).unwrap(), h1);
        // A copy elsewhere is the same source.
        let b = tempfile::tempdir().unwrap();
        copy_tree(&a.path().join("src"), &b.path().join("copy")).unwrap();
        assert!(!b.path().join("copy/bin-x86_64-efi").exists() && !b.path().join("copy/util/zbin64").exists());
        assert!(b.path().join("copy/config/local").is_dir());
        fs::remove_file(b.path().join("copy/.kiln-source")).unwrap();
        assert_eq!(tree_hash(&b.path().join("copy")).unwrap(), h1);
        // Content and modes do count, config/local included.
        fs::write(a.path().join("src/config/local/general.h"), "#define X\n").unwrap();
        let h2 = tree_hash(&a.path().join("src")).unwrap();
        assert_ne!(h2, h1);
        use std::os::unix::fs::PermissionsExt as _;
        fs::set_permissions(a.path().join("src/util/genfsimg"), fs::Permissions::from_mode(0o755)).unwrap();
        assert_ne!(tree_hash(&a.path().join("src")).unwrap(), h2);
    }

    #[test]
    fn local_trees_are_found_from_top_or_src() {
        let a = tempfile::tempdir().unwrap();
        fake_tree(a.path());
        assert_eq!(local_src_dir(a.path()).unwrap(), a.path().canonicalize().unwrap().join("src"));
        assert_eq!(local_src_dir(&a.path().join("src")).unwrap(), a.path().canonicalize().unwrap().join("src"));
        let err = local_src_dir(&a.path().join("src/config")).unwrap_err().to_string();
        assert!(err.contains("is not an iPXE source tree"), "{err}");
    }

    #[test]
    fn fetches_a_git_revision_into_the_cache() {
        if Command::new("git").arg("--version").output().is_err() {
            eprintln!("skipped: git is not installed");
            return;
        }
        let repo = tempfile::tempdir().unwrap();
        let git = |args: &[&str]| {
            let ok = Command::new("git")
                .arg("-C")
                .arg(repo.path())
                .args(["-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"])
                .args(args)
                .env("GIT_COMMITTER_DATE", "1700000000 +0000")
                .env("GIT_AUTHOR_DATE", "1700000000 +0000")
                .status()
                .unwrap()
                .success();
            assert!(ok, "git {args:?}");
        };
        git(&["init", "-q", "-b", "main"]);
        fs::create_dir_all(repo.path().join("src/config")).unwrap();
        fs::write(repo.path().join("src/Makefile"), "all:\n").unwrap();
        fs::write(repo.path().join("src/config/general.h"), "\n").unwrap();
        git(&["add", "."]);
        git(&["commit", "-q", "-m", "one"]);
        let cache = tempfile::tempdir().unwrap();
        let url = format!("file://{}", repo.path().display());
        let spec = SourceSpec::Git { url: url.clone(), rev: "main".into() };
        assert!(resolve(&spec, cache.path(), None, true).unwrap_err().to_string().contains("--locked"));
        let s = resolve(&spec, cache.path(), None, false).unwrap();
        let commit = s.commit.clone().unwrap();
        assert_eq!(s.commit_time, Some(1_700_000_000));
        assert_eq!(s.src_dir, cache.path().join("ipxe-src").join(&commit).join("src"));
        // Pinned and cached: no fetch at all, even with the repository gone.
        drop(repo);
        let again = resolve(&spec, cache.path(), Some(&commit), true).unwrap();
        assert_eq!((again.tree, again.commit), (s.tree, Some(commit.clone())));
        let by_commit = SourceSpec::Git { url, rev: commit.clone() };
        assert!(resolve(&by_commit, cache.path(), None, true).is_ok());
    }
}
