//! Closure archives: everything a site serves in one file, for sites with no network to a registry.
//!
//! The archive is a plain tar of an OCI image layout (`oci-layout`, `index.json`, `blobs/sha256/…`), so
//! `skopeo copy oci-archive:site.kiln:<tag> docker://…` or any mirror tool that reads OCI layouts can also
//! take outputs from it. It holds one artifact per store output (as pushed to a registry, tagged by the store
//! path's name) and one site artifact, tagged `site`, whose config maps the site's roots to store paths and
//! whose layers are the recipe, its lock and the boot files the recipe names. Entries are sorted, owned by
//! root, dated 1970, so one closure always gives the same archive.
//!
//! Importing extracts into the store's tmp/ and verifies every artifact and file before the first output is
//! committed; a truncated or altered archive is refused and leaves the store as it was.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::Serialize;
use serde_json::{json, Value};

use super::artifact::{self, Verified, MANIFEST_MEDIA_TYPE, REF_NAME, TITLE};
use crate::store::{input_hash, verify_output, write_manifest, Store};
use crate::util::{fsync_dir, sha256_file, Digest, FileDigest};

pub const SITE_ARTIFACT_TYPE: &str = "application/vnd.kiln.site.v1";
pub const SITE_CONFIG_MEDIA_TYPE: &str = "application/vnd.kiln.site.v1+json";
pub const SITE_TAG: &str = "site";

/// What a site serves: store outputs by root name (`image-compute`), and files by name (`kiln.toml`,
/// `boot-bios`), with a description the importer reads back (`site`).
pub struct Closure {
    pub roots: BTreeMap<String, PathBuf>,
    pub files: BTreeMap<String, PathBuf>,
    pub site: Value,
}

#[derive(Debug, Serialize)]
pub struct Exported {
    pub path: PathBuf,
    pub outputs: usize,
    pub files: usize,
    /// The archive's size in bytes.
    pub size: u64,
    pub sha256: String,
}

fn file_name_ok(name: &str) -> bool {
    !name.is_empty() && !name.starts_with('.') && !name.contains('/') && name.len() <= 200
}

/// Writes the closure to `out` (atomically: a temp file beside it, renamed when complete).
pub fn export(closure: &Closure, out: &Path) -> Result<Exported> {
    // Blobs by digest: each written once, whoever holds it.
    let mut blobs: BTreeMap<String, (PathBuf, Option<Vec<u8>>)> = BTreeMap::new();
    let mut index = Vec::new();
    let mut roots = serde_json::Map::new();
    let mut outputs: BTreeMap<PathBuf, String> = BTreeMap::new();
    for (root, dir) in &closure.roots {
        if let Some(p) = verify_output(dir).first() {
            bail!("{}: {} (rebuild it before exporting)", p.path.display(), p.problem);
        }
        let art = artifact::describe(dir)?;
        roots.insert(root.clone(), Value::String(art.store_name.clone()));
        if outputs.insert(dir.clone(), art.store_name.clone()).is_some() {
            continue;
        }
        for (d, _, from) in &art.blobs {
            blobs.entry(d.hex()).or_insert_with(|| (from.clone(), None));
        }
        blobs.insert(art.digest.hex(), (PathBuf::new(), Some(art.manifest.clone())));
        index.push((art.store_name.clone(), art.digest.clone(), art.manifest.len()));
    }
    let mut layers = Vec::new();
    for (name, path) in &closure.files {
        if !file_name_ok(name) {
            bail!("internal: {name:?} cannot name a file in a closure");
        }
        let (d, size) = sha256_file(path)?;
        layers.push(json!({ "mediaType": "application/octet-stream", "digest": d.to_string(), "size": size,
            "annotations": { TITLE: name } }));
        blobs.entry(d.hex()).or_insert_with(|| (path.clone(), None));
    }
    let mut site = closure.site.clone();
    site["roots"] = Value::Object(roots);
    let config = serde_json::to_vec(&site)?;
    let config_digest = Digest::of_bytes(&config);
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST_MEDIA_TYPE,
        "artifactType": SITE_ARTIFACT_TYPE,
        "config": { "mediaType": SITE_CONFIG_MEDIA_TYPE, "digest": config_digest.to_string(), "size": config.len() },
        "layers": layers,
    }))?;
    let site_digest = Digest::of_bytes(&manifest);
    index.push((SITE_TAG.to_string(), site_digest.clone(), manifest.len()));
    blobs.insert(config_digest.hex(), (PathBuf::new(), Some(config)));
    blobs.insert(site_digest.hex(), (PathBuf::new(), Some(manifest)));
    let index = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": index.iter().map(|(tag, d, size)| json!({
            "mediaType": MANIFEST_MEDIA_TYPE, "digest": d.to_string(), "size": size,
            "annotations": { REF_NAME: tag },
        })).collect::<Vec<_>>(),
    });

    let dir = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let tmp = tempfile::Builder::new()
        .prefix(".kiln-export-")
        .tempfile_in(dir)
        .with_context(|| format!("creating a temporary file in {}", dir.display()))?;
    let mut tar = tar::Builder::new(BufWriter::with_capacity(1 << 20, tmp.as_file()));
    let header = |size: u64, mode: u32, kind: tar::EntryType| {
        let mut h = tar::Header::new_ustar();
        h.set_size(size);
        h.set_mode(mode);
        h.set_entry_type(kind);
        h.set_mtime(0);
        h.set_uid(0);
        h.set_gid(0);
        h
    };
    let put = |tar: &mut tar::Builder<_>, name: &str, data: &mut dyn Read, size: u64| -> Result<()> {
        let mut h = header(size, 0o644, tar::EntryType::Regular);
        tar.append_data(&mut h, name, data).with_context(|| format!("writing {name} to {}", out.display()))
    };
    put(&mut tar, "oci-layout", &mut &br#"{"imageLayoutVersion":"1.0.0"}"#[..], 30)?;
    for dir_name in ["blobs/", "blobs/sha256/"] {
        let mut h = header(0, 0o755, tar::EntryType::Directory);
        tar.append_data(&mut h, dir_name, std::io::empty())?;
    }
    for (hex, (from, bytes)) in &blobs {
        let name = format!("blobs/sha256/{hex}");
        match bytes {
            Some(b) => put(&mut tar, &name, &mut b.as_slice(), b.len() as u64)?,
            None => {
                let f = File::open(from).with_context(|| format!("reading {}", from.display()))?;
                let size = f.metadata()?.len();
                // A file that changed since it was hashed would make a blob that does not match its name.
                let mut hashing = crate::util::HashingReader::new(f.take(size));
                put(&mut tar, &name, &mut hashing, size)?;
                let (d, _) = hashing.drain()?;
                if d.hex() != *hex {
                    bail!("{} changed while it was exported; run kiln store verify", from.display());
                }
            }
        }
    }
    let index = serde_json::to_vec(&index)?;
    put(&mut tar, "index.json", &mut index.as_slice(), index.len() as u64)?;
    tar.into_inner()?.flush()?;
    tmp.as_file().sync_all()?;
    use std::os::unix::fs::PermissionsExt;
    tmp.as_file().set_permissions(fs::Permissions::from_mode(0o644))?;
    tmp.persist(out).with_context(|| format!("renaming into {}", out.display()))?;
    fsync_dir(dir)?;
    let (d, size) = sha256_file(out)?;
    Ok(Exported { path: out.to_path_buf(), outputs: outputs.len(), files: closure.files.len(), size, sha256: d.hex() })
}

/// A closure read and verified, its outputs committed to the store.
pub struct Imported {
    /// Root name → store output.
    pub roots: BTreeMap<String, PathBuf>,
    /// The site's files (recipe, lock, boot files), verified, in the import's work directory.
    pub files: BTreeMap<String, PathBuf>,
    pub site: Value,
    pub outputs: usize,
    pub added: usize,
    _work: tempfile::TempDir,
}

/// Extracts the archive's layout into `dir`, refusing any entry that is not part of an OCI layout.
fn extract(archive: &Path, dir: &Path) -> Result<()> {
    let f = File::open(archive).with_context(|| format!("opening {}", archive.display()))?;
    let mut tar = tar::Archive::new(std::io::BufReader::with_capacity(1 << 20, f));
    fs::create_dir_all(dir.join("blobs/sha256"))?;
    for entry in tar.entries().context("reading the archive")? {
        let mut entry = entry.context("reading the archive")?;
        let path = entry.path().context("an entry's name")?.to_string_lossy().into_owned();
        let path = path.trim_start_matches("./").to_string();
        match entry.header().entry_type() {
            tar::EntryType::Directory if matches!(path.as_str(), "" | "blobs/" | "blobs/sha256/") => continue,
            tar::EntryType::Regular => {}
            other => bail!("entry {path:?} ({other:?}) is not part of an OCI layout"),
        }
        let blob = path.strip_prefix("blobs/sha256/").filter(|h| Digest::from_hex(h).is_ok());
        if !(blob.is_some() || path == "index.json" || path == "oci-layout") {
            bail!("entry {path:?} is not part of an OCI layout");
        }
        let to = dir.join(&path);
        let mut out = File::create(&to).with_context(|| format!("creating {}", to.display()))?;
        std::io::copy(&mut entry, &mut out).with_context(|| format!("reading {path} from the archive"))?;
    }
    Ok(())
}

/// Verifies the archive `archive` whole, then commits its outputs to the store.
pub fn import(store: &Store, archive: &Path) -> Result<Imported> {
    let work = tempfile::Builder::new().prefix("import-").tempdir_in(store.tmp_dir())?;
    let layout = work.path();
    let refuse = |e: anyhow::Error| {
        e.context(format!("{} is damaged or not a kiln closure; nothing was imported", archive.display()))
    };
    extract(archive, layout).map_err(refuse)?;
    let tags = artifact::layout_index(layout).map_err(refuse)?;
    let site_digest = tags.get(SITE_TAG).with_context(|| format!("no artifact tagged {SITE_TAG}")).map_err(refuse)?;
    let (site, files) = read_site(layout, site_digest).context("the site artifact").map_err(refuse)?;
    let mut verified: BTreeMap<String, Verified> = BTreeMap::new();
    for (tag, digest) in &tags {
        if tag == SITE_TAG {
            continue;
        }
        let v = artifact::verify(layout, digest, None).with_context(|| format!("output {tag}")).map_err(refuse)?;
        if v.store_name != *tag {
            return Err(refuse(anyhow::anyhow!("output tagged {tag} names store path {}", v.store_name)));
        }
        verified.insert(tag.clone(), v);
    }
    let mut wanted = BTreeMap::new();
    for (root, name) in site.get("roots").and_then(Value::as_object).into_iter().flatten() {
        let name = name.as_str().unwrap_or_default();
        if !verified.contains_key(name) {
            return Err(refuse(anyhow::anyhow!("root {root} names {name}, which the archive does not hold")));
        }
        wanted.insert(root.clone(), name.to_string());
    }
    // Everything checked: only now does anything land in the store.
    let mut committed = BTreeMap::new();
    let mut added = 0;
    for (tag, v) in &verified {
        if store.lookup(&v.hash, &v.name).is_none() {
            added += 1;
        }
        committed.insert(tag.clone(), super::commit_verified(store, v)?);
    }
    let roots = wanted.into_iter().map(|(root, name)| (root, committed[&name].clone())).collect();
    Ok(Imported { roots, files, site, outputs: verified.len(), added, _work: work })
}

fn read_site(layout: &Path, digest: &Digest) -> Result<(Value, BTreeMap<String, PathBuf>)> {
    let raw = artifact::read_blob(layout, digest, 4 << 20)?;
    let m: Value = serde_json::from_slice(&raw).context("not JSON")?;
    if m.get("artifactType").and_then(Value::as_str) != Some(SITE_ARTIFACT_TYPE) {
        bail!("not a kiln site (artifactType is not {SITE_ARTIFACT_TYPE})");
    }
    let config = Digest::parse(m.pointer("/config/digest").and_then(Value::as_str).unwrap_or_default())?;
    let site: Value = serde_json::from_slice(&artifact::read_blob(layout, &config, 16 << 20)?)?;
    let mut files = BTreeMap::new();
    for l in m.get("layers").and_then(Value::as_array).into_iter().flatten() {
        let name = l.pointer(&format!("/annotations/{}", TITLE.replace('/', "~1"))).and_then(Value::as_str);
        let name = name.filter(|n| file_name_ok(n)).context("a site file has no valid name")?;
        let d = Digest::parse(l.get("digest").and_then(Value::as_str).unwrap_or_default())?;
        let p = layout.join("blobs/sha256").join(d.hex());
        let (got, _) = sha256_file(&p).with_context(|| format!("site file {name}"))?;
        if got != d {
            bail!("site file {name} does not match its digest");
        }
        files.insert(name.to_string(), p);
    }
    Ok((site, files))
}

/// Commits plain files (boot files a recipe names) as one store output of kind `files`, named by the hash of
/// their names and contents.
pub fn commit_files(store: &Store, name: &str, files: &BTreeMap<String, PathBuf>) -> Result<PathBuf> {
    let mut listed = BTreeMap::new();
    for (file, path) in files {
        listed.insert(file.clone(), FileDigest::of_file(path)?);
    }
    let hash = input_hash(&json!({ "kind": "files", "name": name, "files": listed }));
    if let Some(p) = store.lookup(&hash, name) {
        return Ok(p);
    }
    let pending = store.begin(name)?;
    for (file, path) in files {
        let to = pending.dir().join(file);
        if fs::hard_link(path, &to).is_err() {
            fs::copy(path, &to).with_context(|| format!("copying {}", path.display()))?;
        }
    }
    write_manifest(pending.dir(), &json!({ "kind": "files", "name": name, "recipe_hash": hash, "files": listed }))?;
    store.commit(pending, &hash, name)
}
