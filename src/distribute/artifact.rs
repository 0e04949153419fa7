//! One store output as one OCI artifact, and back.
//!
//! The artifact is an OCI image manifest (image-spec 1.1 `artifactType`) whose config blob is the output's
//! `manifest.json`, byte for byte, and whose layers are the output's files, each a blob addressed by its sha256
//! and named by the `org.opencontainers.image.title` annotation. So an unchanged kernel, or any identical
//! file, is one blob however many bundles hold it, and the manifest bytes are a function of the output alone
//! (no times, keys sorted): the same output gives the same artifact digest on every machine.
//!
//! Reading an artifact back ([`verify`]) trusts nothing it reads: each blob is hashed again, the layers must
//! be exactly the files the output's manifest lists, and the manifest must claim the inputs hash its store
//! path is named by (and the one the caller expects, when it knows it).

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::store::{input_hash, FORMAT_VERSION};
use crate::util::{mkdir_p, sha256_file, write_atomic, Digest};

pub const MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
/// What kind of artifact a kiln output is (image-spec 1.1 `artifactType`).
pub const ARTIFACT_TYPE: &str = "application/vnd.kiln.output.v1";
/// The config blob: the output's manifest.json.
pub const CONFIG_MEDIA_TYPE: &str = "application/vnd.kiln.output.manifest.v1+json";
/// Each layer: one file of the output, as it is.
pub const FILE_MEDIA_TYPE: &str = "application/vnd.kiln.output.file.v1";
/// The store path's name (`<hash>-<name>`), which is also the artifact's tag.
pub const STORE_PATH_ANNOTATION: &str = "org.kiln.store-path";
pub const KIND_ANNOTATION: &str = "org.kiln.kind";
pub const TITLE: &str = "org.opencontainers.image.title";
pub const REF_NAME: &str = "org.opencontainers.image.ref.name";

/// A store output described as an artifact: the manifest's bytes and the files its blobs come from.
pub struct OutputArtifact {
    /// `<hash>-<name>`: the store path's name and the artifact's tag.
    pub store_name: String,
    pub manifest: Vec<u8>,
    pub digest: Digest,
    /// Every blob (config first), with the file holding its bytes.
    pub blobs: Vec<(Digest, u64, PathBuf)>,
}

impl OutputArtifact {
    /// Bytes of every blob, config included.
    pub fn size(&self) -> u64 {
        self.blobs.iter().map(|b| b.1).sum()
    }
}

/// The inputs hash an output's manifest says it was made from: `recipe_hash` (bundles, appliances, files),
/// the hash of `inputs` (an iPXE target), or of the targets' hashes (an iPXE build).
pub fn claimed_hash(manifest: &Value) -> Option<String> {
    if let Some(h) = manifest.get("recipe_hash").and_then(Value::as_str) {
        return Some(h.to_string());
    }
    if let Some(inputs) = manifest.get("inputs").filter(|v| v.is_object()) {
        return Some(input_hash(inputs));
    }
    let targets = manifest.get("targets")?.as_object()?;
    let mut hashes = serde_json::Map::new();
    for (t, v) in targets {
        hashes.insert(t.clone(), Value::String(v.get("input_hash")?.as_str()?.to_string()));
    }
    Some(input_hash(&json!({ "kind": "ipxe-set", "format": FORMAT_VERSION, "targets": hashes })))
}

/// The artifact of the store output `dir`. The output is not re-hashed here: callers verify it first.
pub fn describe(dir: &Path) -> Result<OutputArtifact> {
    let store_name = dir.file_name().context("a store path has a name")?.to_string_lossy().into_owned();
    let manifest_path = dir.join("manifest.json");
    let output_manifest = fs::read(&manifest_path).with_context(|| format!("reading {}", manifest_path.display()))?;
    let parsed: Value = serde_json::from_slice(&output_manifest)
        .with_context(|| format!("{}: not a valid manifest", manifest_path.display()))?;
    let kind = parsed.get("kind").and_then(Value::as_str).unwrap_or("unknown").to_string();
    let files: BTreeMap<String, crate::util::FileDigest> = serde_json::from_value(
        parsed.get("files").cloned().with_context(|| format!("{} lists no files", manifest_path.display()))?,
    )
    .with_context(|| format!("{}: `files`", manifest_path.display()))?;
    let config = Digest::of_bytes(&output_manifest);
    let mut blobs = vec![(config.clone(), output_manifest.len() as u64, manifest_path)];
    let mut layers = Vec::new();
    for (name, entry) in &files {
        let digest = Digest::from_hex(&entry.sha256).with_context(|| format!("{}: {name}", dir.display()))?;
        layers.push(json!({
            "mediaType": FILE_MEDIA_TYPE,
            "digest": digest.to_string(),
            "size": entry.size,
            "annotations": { TITLE: name },
        }));
        blobs.push((digest, entry.size, dir.join(name)));
    }
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST_MEDIA_TYPE,
        "artifactType": ARTIFACT_TYPE,
        "config": { "mediaType": CONFIG_MEDIA_TYPE, "digest": config.to_string(), "size": output_manifest.len() },
        "layers": layers,
        "annotations": { STORE_PATH_ANNOTATION: store_name, KIND_ANNOTATION: kind },
    });
    let manifest = serde_json::to_vec(&manifest).context("encoding an artifact manifest")?;
    Ok(OutputArtifact { store_name, digest: Digest::of_bytes(&manifest), manifest, blobs })
}

/// An OCI image layout being written in a directory: blobs hard-linked from where they are (the store and
/// the layout sit on one file system), manifests listed in `index.json` by tag.
pub struct LayoutWriter {
    dir: PathBuf,
    index: Vec<Value>,
}

impl LayoutWriter {
    pub fn create(dir: &Path) -> Result<LayoutWriter> {
        mkdir_p(&dir.join("blobs/sha256"))?;
        fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)
            .with_context(|| format!("writing {}", dir.join("oci-layout").display()))?;
        Ok(LayoutWriter { dir: dir.to_path_buf(), index: Vec::new() })
    }

    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.dir.join("blobs/sha256").join(digest.hex())
    }

    /// Adds the blob whose bytes are the file `from`.
    pub fn link_blob(&self, digest: &Digest, from: &Path) -> Result<()> {
        let to = self.blob_path(digest);
        if to.exists() {
            return Ok(());
        }
        if fs::hard_link(from, &to).is_err() {
            fs::copy(from, &to).with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
        }
        Ok(())
    }

    /// Adds the artifact of an output, tagged with its store path's name.
    pub fn add_output(&mut self, art: &OutputArtifact) -> Result<()> {
        for (digest, _, from) in &art.blobs {
            self.link_blob(digest, from)?;
        }
        self.add_manifest(&art.manifest, &art.store_name)
    }

    pub fn add_manifest(&mut self, manifest: &[u8], tag: &str) -> Result<()> {
        let digest = Digest::of_bytes(manifest);
        let path = self.blob_path(&digest);
        if !path.exists() {
            fs::write(&path, manifest).with_context(|| format!("writing {}", path.display()))?;
        }
        self.index.push(json!({
            "mediaType": MANIFEST_MEDIA_TYPE,
            "digest": digest.to_string(),
            "size": manifest.len(),
            "annotations": { REF_NAME: tag },
        }));
        Ok(())
    }

    pub fn finish(self) -> Result<PathBuf> {
        let index = json!({ "schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": self.index });
        write_atomic(&self.dir.join("index.json"), &serde_json::to_vec(&index)?)?;
        Ok(self.dir)
    }
}

/// An output read from an OCI layout and checked whole.
#[derive(Debug)]
pub struct Verified {
    /// `<hash>-<name>`.
    pub store_name: String,
    pub name: String,
    /// The full inputs hash the output claims, consistent with its store path's name.
    pub hash: String,
    pub kind: String,
    /// The output's manifest.json, byte for byte.
    pub output_manifest: Vec<u8>,
    /// Each file of the output and the verified blob holding it.
    pub files: Vec<(String, PathBuf)>,
    pub size: u64,
}

/// The tagged manifests of the OCI layout `dir` (`index.json`), by tag.
pub fn layout_index(dir: &Path) -> Result<BTreeMap<String, Digest>> {
    let p = dir.join("index.json");
    let bytes = fs::read(&p).with_context(|| format!("reading {}", p.display()))?;
    let index: Value = serde_json::from_slice(&bytes).with_context(|| format!("{}: not JSON", p.display()))?;
    let mut out = BTreeMap::new();
    for m in index.get("manifests").and_then(Value::as_array).into_iter().flatten() {
        let tag = m.pointer(&format!("/annotations/{}", REF_NAME.replace('/', "~1"))).and_then(Value::as_str);
        let digest = m.get("digest").and_then(Value::as_str);
        if let (Some(tag), Some(digest)) = (tag, digest) {
            out.insert(tag.to_string(), Digest::parse(digest).with_context(|| format!("{}: {tag}", p.display()))?);
        }
    }
    Ok(out)
}

/// Reads a blob of the layout `dir`, checking it against its digest.
pub fn read_blob(dir: &Path, digest: &Digest, limit: u64) -> Result<Vec<u8>> {
    let p = dir.join("blobs/sha256").join(digest.hex());
    let len = fs::metadata(&p).with_context(|| format!("blob {digest} is missing"))?.len();
    if len > limit {
        bail!("blob {digest} is {len} bytes, more than a manifest can be ({limit})");
    }
    let bytes = fs::read(&p).with_context(|| format!("reading {}", p.display()))?;
    if Digest::of_bytes(&bytes) != *digest {
        bail!("blob {digest} does not match its digest (damaged or altered)");
    }
    Ok(bytes)
}

fn check_file_name(name: &str) -> Result<()> {
    if name.is_empty() || name == "manifest.json" || name.starts_with('.') || name.contains('/') || name.len() > 200 {
        bail!("file name {name:?} cannot be part of a store output");
    }
    Ok(())
}

/// Checks the artifact `digest` of the layout `dir` whole: the manifest, the output's manifest, every file
/// blob re-hashed, the layers exactly the files listed, the store path's name made of the claimed hash
/// (and `expected`, when the caller knows which hash it asked for).
pub fn verify(dir: &Path, digest: &Digest, expected: Option<&str>) -> Result<Verified> {
    const MANIFEST_LIMIT: u64 = 4 << 20;
    let raw = read_blob(dir, digest, MANIFEST_LIMIT).context("the artifact's manifest")?;
    let m: Value = serde_json::from_slice(&raw).context("the artifact's manifest is not JSON")?;
    if m.get("artifactType").and_then(Value::as_str) != Some(ARTIFACT_TYPE) {
        bail!("not a kiln output (artifactType is not {ARTIFACT_TYPE})");
    }
    let store_name = m
        .pointer(&format!("/annotations/{STORE_PATH_ANNOTATION}"))
        .and_then(Value::as_str)
        .context("the artifact names no store path")?
        .to_string();
    let config = m.get("config").context("the artifact has no config")?;
    if config.get("mediaType").and_then(Value::as_str) != Some(CONFIG_MEDIA_TYPE) {
        bail!("the artifact's config is not a kiln output manifest");
    }
    let config_digest = Digest::parse(config.get("digest").and_then(Value::as_str).unwrap_or_default())?;
    let output_manifest = read_blob(dir, &config_digest, MANIFEST_LIMIT).context("the output's manifest.json")?;
    let om: Value = serde_json::from_slice(&output_manifest).context("the output's manifest.json is not JSON")?;
    let files: BTreeMap<String, crate::util::FileDigest> =
        serde_json::from_value(om.get("files").cloned().unwrap_or(Value::Null))
            .context("the output's manifest.json has no valid `files`")?;
    let mut layers = BTreeMap::new();
    for l in m.get("layers").and_then(Value::as_array).into_iter().flatten() {
        let title = l.pointer(&format!("/annotations/{}", TITLE.replace('/', "~1"))).and_then(Value::as_str);
        let title = title.context("a layer has no file name")?.to_string();
        check_file_name(&title)?;
        let d = Digest::parse(l.get("digest").and_then(Value::as_str).unwrap_or_default())?;
        let size = l.get("size").and_then(Value::as_u64).context("a layer has no size")?;
        if layers.insert(title.clone(), (d, size)).is_some() {
            bail!("two layers are named {title}");
        }
    }
    if layers.keys().ne(files.keys()) {
        bail!(
            "the layers ({}) are not the files the output lists ({})",
            layers.keys().cloned().collect::<Vec<_>>().join(", "),
            files.keys().cloned().collect::<Vec<_>>().join(", ")
        );
    }
    let hash = claimed_hash(&om).context("the output's manifest.json names no inputs hash")?;
    let (prefix, name) = store_name.split_once('-').context("the store path is not <hash>-<name>")?;
    if hash.len() < 32 || prefix != &hash[..32] {
        bail!("the store path {store_name} is not named by the inputs hash its manifest claims ({hash})");
    }
    crate::recipe::check_name(name).with_context(|| format!("store path {store_name}"))?;
    if let Some(want) = expected {
        if hash != want {
            bail!("it was made from other inputs ({hash}) than asked for ({want})");
        }
    }
    let mut out = Vec::new();
    let mut size = output_manifest.len() as u64;
    for (file, (d, layer_size)) in &layers {
        let want = &files[file];
        let p = dir.join("blobs/sha256").join(d.hex());
        let (got, got_size) = sha256_file(&p).with_context(|| format!("file {file} ({d})"))?;
        if got != *d || got_size != *layer_size || !want.matches(&got, got_size) {
            bail!(
                "file {file}: the blob is sha256 {} ({got_size} bytes), the manifest says {} ({} bytes)",
                got.hex(),
                want.sha256,
                want.size
            );
        }
        size += got_size;
        out.push((file.clone(), p));
    }
    Ok(Verified {
        kind: om.get("kind").and_then(Value::as_str).unwrap_or("unknown").to_string(),
        name: name.to_string(),
        store_name,
        hash,
        output_manifest,
        files: out,
        size,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{write_manifest, Store};

    #[test]
    fn an_output_survives_the_trip_and_a_changed_byte_does_not() {
        let d = tempfile::tempdir().unwrap();
        let store = Store::open(&d.path().join("s")).unwrap();
        let hash = input_hash(&json!({"x": 1}));
        let p = store.begin("out").unwrap();
        fs::write(p.dir().join("kernel"), b"kernel bytes").unwrap();
        let k = crate::util::FileDigest::of_file(&p.dir().join("kernel")).unwrap();
        write_manifest(p.dir(), &json!({"kind": "bundle", "recipe_hash": hash, "files": {"kernel": k}})).unwrap();
        let out = store.commit(p, &hash, "out").unwrap();
        let art = describe(&out).unwrap();
        assert_eq!(art.digest, describe(&out).unwrap().digest, "same output, same artifact");
        let mut w = LayoutWriter::create(&d.path().join("layout")).unwrap();
        w.add_output(&art).unwrap();
        let layout = w.finish().unwrap();
        let tags = layout_index(&layout).unwrap();
        let v = verify(&layout, &tags[&art.store_name], Some(&hash)).unwrap();
        assert_eq!(v.store_name, out.file_name().unwrap().to_string_lossy());
        assert_eq!(v.output_manifest, fs::read(out.join("manifest.json")).unwrap());
        let other = input_hash(&json!({"x": 2}));
        assert!(format!("{:#}", verify(&layout, &art.digest, Some(&other)).unwrap_err()).contains("other inputs"));
        // The blob is a hard link to the store's file: change a copy of it, not the store.
        let blob = layout.join("blobs/sha256").join(&k.sha256);
        fs::remove_file(&blob).unwrap();
        fs::write(&blob, b"kernel bytez").unwrap();
        assert!(format!("{:#}", verify(&layout, &art.digest, None).unwrap_err()).contains("file kernel"));
    }
}
