//! The content-addressed store.
//!
//! Layout under the store root:
//! - `store/<hash>-<name>/`: one output (a bundle, an iPXE build …). `<hash>` is the first 32
//!   hex digits of the sha256 of a canonical encoding of every input (Nix's input addressing),
//!   so the same inputs find the same path and skip the work.
//! - `tmp/`: outputs being written. A finished output is fsynced and renamed into `store/` whole,
//!   so a build killed at any moment leaves nothing in `store/` that looks complete.
//! - `roots/<kind>-<name>`: symlinks to the outputs last built under that name; `gc` keeps
//!   what they point at and removes the rest.
//!
//! Every output holds a `manifest.json` whose `files` map gives each file's sha256 and size;
//! `verify` checks them. Builds hold a shared lock on `<root>/lock`; `gc` takes it exclusively.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::util::{fsync_dir, mkdir_p, sha256_file, write_atomic, FileDigest};

/// Bumped whenever kiln's outputs would come out different for the same inputs.
pub const FORMAT_VERSION: u32 = 1;

pub struct Store {
    root: PathBuf,
    _lock: File,
}

/// An output being written: a directory under `tmp/`, removed on drop unless committed.
pub struct Pending {
    dir: PathBuf,
    committed: bool,
}

impl Pending {
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// What a root names: `roots/<kind>-<name>` points at the output last built under that name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RootKind {
    /// A bundle built from `[image.NAME]` or `--name`.
    Image,
    /// An iPXE build (`[ipxe.NAME]`), and each of its targets.
    Ipxe,
    /// An appliance ISO, named after its `[appliance] image`.
    Appliance,
}

impl RootKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RootKind::Image => "image",
            RootKind::Ipxe => "ipxe",
            RootKind::Appliance => "appliance",
        }
    }

    /// `image-compute` → (`Image`, `compute`): a root's name as `roots/` spells it.
    pub fn split(root: &str) -> Option<(RootKind, &str)> {
        let (kind, name) = root.split_once('-')?;
        let kind = [RootKind::Image, RootKind::Ipxe, RootKind::Appliance].into_iter().find(|k| k.as_str() == kind)?;
        Some((kind, name))
    }
}

#[derive(Debug, Serialize)]
pub struct StoreItem {
    pub path: PathBuf,
    pub hash: String,
    pub name: String,
    pub kind: String,
    pub size: u64,
    pub roots: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct Problem {
    pub path: PathBuf,
    pub problem: String,
}

#[derive(Debug, Serialize, Default)]
pub struct GcReport {
    pub removed: Vec<PathBuf>,
    pub kept: usize,
    pub freed_bytes: u64,
}

/// What every output's manifest has, whatever its kind: the kind and the `files` map.
#[derive(Debug, Deserialize)]
pub struct ManifestFiles {
    #[serde(default)]
    pub kind: Option<String>,
    #[serde(default)]
    pub files: BTreeMap<String, FileDigest>,
}

impl ManifestFiles {
    /// Reads the manifest of the output `dir`.
    pub fn read(dir: &Path) -> Result<ManifestFiles> {
        let p = dir.join("manifest.json");
        let bytes = fs::read(&p).with_context(|| format!("reading {}", p.display()))?;
        serde_json::from_slice(&bytes).with_context(|| format!("{}: not a valid manifest", p.display()))
    }

    /// The entry of `file`; the error says to verify the store.
    pub fn file(&self, dir: &Path, file: &str) -> Result<&FileDigest> {
        self.files.get(file).with_context(|| {
            format!("{} does not list {file}; run kiln store verify", dir.join("manifest.json").display())
        })
    }
}

/// Where the store is when `--store` and `KILN_STORE` say nothing: `/var/lib/kiln` for root, else
/// `$XDG_DATA_HOME/kiln` (or `~/.local/share/kiln`).
pub fn default_root() -> PathBuf {
    if crate::util::is_root() {
        return PathBuf::from("/var/lib/kiln");
    }
    if let Some(x) = std::env::var_os("XDG_DATA_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(x).join("kiln");
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
    home.join(".local/share/kiln")
}

/// The store hash of a canonical JSON value (serde_json's maps are sorted by key).
pub fn input_hash(inputs: &serde_json::Value) -> String {
    let canonical = serde_json::to_vec(inputs).expect("a JSON value always serialises");
    hex::encode(Sha256::digest(&canonical))
}

impl Store {
    /// Opens (creating if needed) the store at `root` and takes a shared lock on it.
    pub fn open(root: &Path) -> Result<Store> {
        // The store is read by servers that may run as another user: directories kiln creates are 0755
        // whatever the umask (a directory that already exists keeps the mode its owner gave it).
        for dir in [root.to_path_buf(), root.join("store"), root.join("tmp"), root.join("roots")] {
            if !dir.is_dir() {
                mkdir_p(&dir).with_context(|| format!("opening the store at {}", root.display()))?;
                set_mode(&dir, 0o755)?;
            }
        }
        let lock_path = root.join("lock");
        // A reader (kiln serve under a service user, the store read-only) needs no write access to take the
        // shared lock.
        let lock = match File::options().create(true).truncate(false).write(true).open(&lock_path) {
            Ok(f) => f,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::PermissionDenied | std::io::ErrorKind::ReadOnlyFilesystem
                ) =>
            {
                File::open(&lock_path).with_context(|| format!("opening {}", lock_path.display()))?
            }
            Err(e) => return Err(e).with_context(|| format!("opening {}", lock_path.display())),
        };
        lock.lock_shared().with_context(|| format!("locking {}", root.display()))?;
        Ok(Store { root: root.to_path_buf(), _lock: lock })
    }

    /// The store's directory.
    pub fn dir(&self) -> &Path {
        &self.root
    }

    /// Where kiln keeps caches (git checkouts of iPXE, …) beside the store.
    pub fn cache_dir(&self) -> PathBuf {
        self.root.join("cache")
    }

    /// Where outputs are written before they are committed.
    pub fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    fn root_link(&self, kind: RootKind, name: &str) -> PathBuf {
        self.root.join("roots").join(format!("{}-{name}", kind.as_str()))
    }

    /// The output the root `kind`/`name` points at, or `None` when there is no such root (nothing built under
    /// that name yet, or its output was removed).
    pub fn root(&self, kind: RootKind, name: &str) -> Option<PathBuf> {
        fs::canonicalize(self.root_link(kind, name)).ok().filter(|p| p.is_dir())
    }

    pub fn path_for(&self, hash: &str, name: &str) -> PathBuf {
        self.root.join("store").join(format!("{}-{name}", &hash[..32.min(hash.len())]))
    }

    /// The finished output for these inputs, if the store has it.
    pub fn lookup(&self, hash: &str, name: &str) -> Option<PathBuf> {
        let p = self.path_for(hash, name);
        p.join("manifest.json").is_file().then_some(p)
    }

    /// Starts writing an output.
    pub fn begin(&self, name: &str) -> Result<Pending> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("{name}-"))
            .tempdir_in(self.root.join("tmp"))
            .with_context(|| format!("creating a build directory in {}", self.root.join("tmp").display()))?
            .keep();
        // tempfile makes the directory 0700; a finished output is readable by everyone.
        set_mode(&dir, 0o755)?;
        Ok(Pending { dir, committed: false })
    }

    /// Syncs every file of `pending` and renames it into the store. If another build finished
    /// the same output first, that one is kept (it has the same bytes).
    /// Modes are set here, not left to the umask: files 0644, the directory 0755, so a server running as
    /// another user reads the same output on every machine.
    pub fn commit(&self, mut pending: Pending, hash: &str, name: &str) -> Result<PathBuf> {
        let dest = self.path_for(hash, name);
        for entry in fs::read_dir(&pending.dir)? {
            let entry = entry?;
            let kind = entry.file_type()?;
            if kind.is_file() {
                set_mode(&entry.path(), 0o644)?;
                File::open(entry.path())?.sync_all().with_context(|| format!("syncing {}", entry.path().display()))?;
            } else if kind.is_dir() {
                bail!("{}: an output holds files only, not directories", entry.path().display());
            }
        }
        set_mode(&pending.dir, 0o755)?;
        fsync_dir(&pending.dir)?;
        if dest.exists() {
            return Ok(dest);
        }
        fs::rename(&pending.dir, &dest)
            .with_context(|| format!("moving {} into place at {}", pending.dir.display(), dest.display()))?;
        pending.committed = true;
        fsync_dir(&self.root.join("store"))?;
        Ok(dest)
    }

    /// Points `roots/<kind>-<name>` at `path` (atomically), so `gc` keeps it.
    pub fn add_root(&self, kind: RootKind, name: &str, path: &Path) -> Result<()> {
        let link = self.root_link(kind, name);
        let rel = Path::new("../store").join(path.file_name().context("store path has no name")?);
        let tmp = self.root.join("roots").join(format!(".{}-{name}.tmp-{}", kind.as_str(), std::process::id()));
        let _ = fs::remove_file(&tmp);
        std::os::unix::fs::symlink(&rel, &tmp).with_context(|| format!("creating {}", tmp.display()))?;
        fs::rename(&tmp, &link).with_context(|| format!("updating {}", link.display()))?;
        fsync_dir(&self.root.join("roots"))
    }

    fn rooted(&self) -> Result<BTreeMap<PathBuf, Vec<String>>> {
        let mut out: BTreeMap<PathBuf, Vec<String>> = BTreeMap::new();
        for entry in fs::read_dir(self.root.join("roots"))? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                continue;
            }
            if let Ok(target) = fs::read_link(entry.path()) {
                if let Some(base) = target.file_name() {
                    out.entry(self.root.join("store").join(base)).or_default().push(name);
                }
            }
        }
        Ok(out)
    }

    /// Every finished output, in name order.
    pub fn list(&self) -> Result<Vec<StoreItem>> {
        let rooted = self.rooted()?;
        let mut items = Vec::new();
        let mut entries: Vec<_> = fs::read_dir(self.root.join("store"))?.collect::<Result<_, _>>()?;
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            let path = entry.path();
            let base = entry.file_name().to_string_lossy().into_owned();
            let Some((hash, name)) = base.split_once('-') else { continue };
            let kind = fs::read(path.join("manifest.json"))
                .ok()
                .and_then(|b| serde_json::from_slice::<ManifestFiles>(&b).ok())
                .and_then(|m| m.kind)
                .unwrap_or_else(|| "unknown".into());
            let size = dir_size(&path);
            items.push(StoreItem {
                roots: rooted.get(&path).cloned().unwrap_or_default(),
                hash: hash.to_string(),
                name: name.to_string(),
                kind,
                size,
                path,
            });
        }
        items.sort_by(|a, b| a.name.cmp(&b.name).then(a.hash.cmp(&b.hash)));
        Ok(items)
    }

    /// Re-hashes every file of every output against its manifest.
    pub fn verify(&self) -> Result<(usize, Vec<Problem>)> {
        let mut problems = Vec::new();
        let items = self.list()?;
        for item in &items {
            problems.extend(verify_output(&item.path));
        }
        Ok((items.len(), problems))
    }

    /// Removes outputs no root points at, and leftovers of interrupted builds. Takes the store
    /// lock exclusively, so it waits for running builds.
    ///
    /// While another process uses the store (a build, `kiln serve`, which keeps the outputs it serves), gc names
    /// it and fails at once; with `wait` it waits for it to finish instead.
    pub fn gc(self, dry_run: bool, wait: bool) -> Result<GcReport> {
        let Store { root, _lock } = self;
        drop(_lock);
        let lock_path = root.join("lock");
        let lock = File::options().write(true).open(&lock_path)?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) if wait => {
                lock.lock().with_context(|| format!("locking {} for gc", root.display()))?
            }
            Err(std::fs::TryLockError::WouldBlock) => {
                let holders = lock_holders(&lock_path);
                bail!(
                    "the store {} is in use by {}: gc would remove outputs from under it; stop it, or run \
                     `kiln store gc --wait` to wait until it is done",
                    root.display(),
                    if holders.is_empty() { "another process".to_string() } else { holders.join(", ") }
                );
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("locking {} for gc", root.display()))
            }
        }
        let store = Store { root, _lock: lock };
        let rooted: BTreeSet<PathBuf> = store.rooted()?.into_keys().collect();
        let mut report = GcReport::default();
        for item in store.list()? {
            if rooted.contains(&item.path) {
                report.kept += 1;
                continue;
            }
            report.freed_bytes += item.size;
            if !dry_run {
                // Rename first so a half-deleted output never sits under its store name.
                let doomed = store.root.join("tmp").join(format!("gc-{}-{}", item.hash, item.name));
                fs::rename(&item.path, &doomed).with_context(|| format!("removing {}", item.path.display()))?;
                fs::remove_dir_all(&doomed).with_context(|| format!("removing {}", doomed.display()))?;
            }
            report.removed.push(item.path);
        }
        if !dry_run {
            for entry in fs::read_dir(store.root.join("tmp"))? {
                let p = entry?.path();
                let _ = if p.is_dir() { fs::remove_dir_all(&p) } else { fs::remove_file(&p) };
            }
        }
        Ok(report)
    }
}

/// The processes that have `lock` open, as `kiln serve (pid 1234)`: read from /proc, so only those this user
/// may see.
fn lock_holders(lock: &Path) -> Vec<String> {
    let me = std::process::id().to_string();
    let Ok(target) = fs::canonicalize(lock) else { return vec![] };
    let mut out = Vec::new();
    let Ok(procs) = fs::read_dir("/proc") else { return out };
    for p in procs.flatten() {
        let pid = p.file_name().to_string_lossy().into_owned();
        if !pid.bytes().all(|b| b.is_ascii_digit()) || pid == me {
            continue;
        }
        let Ok(fds) = fs::read_dir(p.path().join("fd")) else { continue };
        if fds.flatten().any(|fd| fs::read_link(fd.path()).is_ok_and(|t| t == target)) {
            let cmdline = fs::read(p.path().join("cmdline")).unwrap_or_default();
            let words: Vec<String> = cmdline
                .split(|b| *b == 0)
                .filter(|w| !w.is_empty())
                .map(|w| String::from_utf8_lossy(w).into_owned())
                .collect();
            let name = match words.as_slice() {
                [exe, sub, ..] if exe.ends_with("kiln") => format!("kiln {sub}"),
                [exe, ..] => exe.clone(),
                [] => "a process".to_string(),
            };
            out.push(format!("{name} (pid {pid})"));
        }
    }
    out
}

/// When `file`'s directory has a `manifest.json` listing it (a store output, or the boot files an appliance
/// carries), checks the file against it.
pub fn verify_listed(file: &Path) -> Result<()> {
    let (Some(dir), Some(name)) = (file.parent(), file.file_name()) else { return Ok(()) };
    let Ok(bytes) = std::fs::read(dir.join("manifest.json")) else { return Ok(()) };
    let listed: ManifestFiles = serde_json::from_slice(&bytes)
        .with_context(|| format!("{}: not a valid manifest", dir.join("manifest.json").display()))?;
    let Some(want) = listed.files.get(&*name.to_string_lossy()) else { return Ok(()) };
    let (digest, size) = sha256_file(file)?;
    if !want.matches(&digest, size) {
        bail!(
            "{}: content changed: sha256 {} ({size} bytes), {} says {} ({} bytes)",
            file.display(),
            digest.hex(),
            dir.join("manifest.json").display(),
            want.sha256,
            want.size
        );
    }
    Ok(())
}

/// Checks one output directory against its manifest's `files`.
pub fn verify_output(dir: &Path) -> Vec<Problem> {
    let mut problems = Vec::new();
    let mut problem = |p: PathBuf, what: String| problems.push(Problem { path: p, problem: what });
    let manifest = match fs::read(dir.join("manifest.json")) {
        Ok(b) => b,
        Err(e) => {
            problem(dir.to_path_buf(), format!("manifest.json cannot be read: {e}"));
            return problems;
        }
    };
    let files = match serde_json::from_slice::<ManifestFiles>(&manifest) {
        Ok(m) => m.files,
        Err(e) => {
            problem(dir.join("manifest.json"), format!("not a valid manifest: {e}"));
            return problems;
        }
    };
    for (name, want) in &files {
        let p = dir.join(name);
        match sha256_file(&p) {
            Ok((digest, size)) => {
                if !want.matches(&digest, size) {
                    problem(
                        p,
                        format!(
                            "content changed: sha256 {} ({size} bytes), manifest says {} ({} bytes)",
                            digest.hex(),
                            want.sha256,
                            want.size
                        ),
                    );
                }
            }
            Err(e) => problem(p, format!("{e:#}")),
        }
    }
    if let Ok(rd) = fs::read_dir(dir) {
        for entry in rd.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name != "manifest.json" && !files.contains_key(&name) {
                problem(entry.path(), "not listed in the manifest".into());
            }
        }
    }
    problems
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting the mode of {} to {mode:o}", path.display()))
}

fn dir_size(p: &Path) -> u64 {
    fs::read_dir(p).map(|rd| rd.flatten().filter_map(|e| e.metadata().ok()).map(|m| m.len()).sum()).unwrap_or(0)
}

/// Writes an output's manifest: canonical JSON (sorted keys, whatever the order of a struct's fields),
/// pretty-printed, newline-ended.
pub fn write_manifest(dir: &Path, manifest: &impl Serialize) -> Result<()> {
    let manifest = serde_json::to_value(manifest).context("internal: encoding a manifest")?;
    if !manifest.is_object() {
        bail!("internal: a manifest must be a JSON object");
    }
    let mut bytes = serde_json::to_vec_pretty(&manifest)?;
    bytes.push(b'\n');
    write_atomic(&dir.join("manifest.json"), &bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commit_is_whole_and_gc_keeps_rooted() {
        let d = tempfile::tempdir().unwrap();
        let store = Store::open(d.path()).unwrap();
        let hash = input_hash(&serde_json::json!({"a": 1}));
        let p = store.begin("x").unwrap();
        fs::write(p.dir().join("f"), b"data").unwrap();
        let (digest, size) = sha256_file(&p.dir().join("f")).unwrap();
        write_manifest(
            p.dir(),
            &serde_json::json!({"kind": "test", "files": {"f": {"sha256": digest.hex(), "size": size}}}),
        )
        .unwrap();
        let out = store.commit(p, &hash, "x").unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(fs::metadata(&out).unwrap().permissions().mode() & 0o777, 0o755);
        assert_eq!(fs::metadata(out.join("manifest.json")).unwrap().permissions().mode() & 0o777, 0o644);
        assert_eq!(store.lookup(&hash, "x").unwrap(), out);
        assert!(store.verify().unwrap().1.is_empty());
        fs::write(out.join("f"), b"tampered").unwrap();
        let (_, problems) = store.verify().unwrap();
        assert!(problems[0].problem.contains("content changed"), "{problems:?}");

        // An abandoned build leaves nothing in store/.
        let abandoned = store.begin("y").unwrap();
        fs::write(abandoned.dir().join("f"), b"half").unwrap();
        drop(abandoned);
        assert_eq!(store.list().unwrap().len(), 1);

        store.add_root(RootKind::Image, "x", &out).unwrap();
        assert_eq!(store.root(RootKind::Image, "x").unwrap(), out.canonicalize().unwrap());
        assert_eq!(store.root(RootKind::Ipxe, "x"), None);
        let report = store.gc(true, false).unwrap();
        assert!(report.removed.is_empty());
        let store = Store::open(d.path()).unwrap();
        fs::remove_file(d.path().join("roots/image-x")).unwrap();
        let report = store.gc(false, false).unwrap();
        assert_eq!(report.removed, vec![out.clone()]);
        assert!(!out.exists());
    }
}
