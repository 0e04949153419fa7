//! OCI image layouts (image-spec `image-layout.md`), as a directory or as a tar archive, and
//! `docker save` archives.
//!
//! Archives are never extracted: their tar headers are read once to find where each member's
//! bytes are, and blobs are then read in place by offset. Every manifest and config read is
//! checked against the digest that names it; layers are checked while they are read.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use serde::Deserialize;

use super::{ImageConfig, LayerBlob};
use crate::util::Digest;

/// Manifests, indexes and configs larger than this are refused rather than read into memory.
const MAX_JSON: u64 = 16 << 20;

/// Bytes of a blob on this machine: `len` bytes of `path` starting at `offset`.
#[derive(Debug, Clone)]
pub struct BlobLoc {
    pub path: PathBuf,
    pub offset: u64,
    pub len: u64,
}

impl BlobLoc {
    pub fn whole_file(path: PathBuf, len: u64) -> Self {
        BlobLoc { path, offset: 0, len }
    }

    pub fn open(&self) -> Result<io::Take<File>> {
        let mut f = File::open(&self.path).with_context(|| format!("opening {}", self.path.display()))?;
        f.seek(SeekFrom::Start(self.offset)).with_context(|| format!("seeking in {}", self.path.display()))?;
        Ok(f.take(self.len))
    }

    fn read_small(&self, what: &str) -> Result<Vec<u8>> {
        if self.len > MAX_JSON {
            bail!("{what} is {} bytes, more than a manifest or config can sensibly be", self.len);
        }
        let mut buf = Vec::with_capacity(self.len as usize);
        self.open()?.read_to_end(&mut buf).with_context(|| format!("reading {what}"))?;
        if buf.len() as u64 != self.len {
            bail!("{what} is truncated: expected {} bytes, read {}", self.len, buf.len());
        }
        Ok(buf)
    }
}

/// Where the members of a layout live: a directory, or an (uncompressed) tar archive.
pub struct Layout {
    label: String,
    root: Option<PathBuf>,
    members: HashMap<String, BlobLoc>,
}

pub struct LayoutImage {
    pub digest: Digest,
    pub config: ImageConfig,
    pub layers: Vec<LayerBlob>,
}

#[derive(Deserialize)]
struct Descriptor {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    digest: String,
    #[serde(default)]
    size: Option<u64>,
    #[serde(default)]
    annotations: HashMap<String, String>,
    #[serde(default)]
    platform: Option<Platform>,
}

#[derive(Deserialize)]
struct Platform {
    architecture: String,
    #[serde(default)]
    os: String,
}

#[derive(Deserialize)]
struct Index {
    #[serde(default)]
    manifests: Vec<Descriptor>,
}

#[derive(Deserialize)]
struct Manifest {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Vec<Descriptor>,
    #[serde(default)]
    manifests: Option<Vec<Descriptor>>,
}

const TAG_ANNOTATION: &str = "org.opencontainers.image.ref.name";

impl Layout {
    pub fn open_dir(dir: &Path) -> Result<Self> {
        if !dir.join("index.json").is_file() {
            bail!(
                "{} is not an OCI image layout (it has no index.json); for a plain root filesystem use dir:{}",
                dir.display(),
                dir.display()
            );
        }
        Ok(Layout { label: format!("oci:{}", dir.display()), root: Some(dir.to_path_buf()), members: HashMap::new() })
    }

    pub fn open_archive(file: &Path) -> Result<Self> {
        let members = index_tar(file)?;
        if !members.contains_key("index.json") {
            bail!("{} is not an OCI archive (it has no index.json member)", file.display());
        }
        Ok(Layout { label: format!("oci-archive:{}", file.display()), root: None, members })
    }

    fn member(&self, name: &str) -> Result<BlobLoc> {
        match &self.root {
            Some(root) => {
                let path = root.join(name);
                let meta = std::fs::metadata(&path).with_context(|| format!("{}: missing {name}", self.label))?;
                Ok(BlobLoc::whole_file(path, meta.len()))
            }
            None => self.members.get(name).cloned().ok_or_else(|| anyhow!("{}: missing {name}", self.label)),
        }
    }

    fn blob(&self, digest: &Digest) -> Result<BlobLoc> {
        self.member(&format!("blobs/sha256/{}", digest.hex()))
    }

    /// Reads a JSON blob and checks that it hashes to the digest that names it.
    fn verified_json(&self, digest: &Digest, what: &str) -> Result<Vec<u8>> {
        let bytes = self.blob(digest)?.read_small(what)?;
        let actual = Digest::of_bytes(&bytes);
        if &actual != digest {
            bail!(
                "{}: {what} {digest} is corrupt: its content hashes to {actual}; recreate or re-copy the image",
                self.label
            );
        }
        Ok(bytes)
    }

    pub fn image(&self, tag: Option<&str>, arch: &str) -> Result<LayoutImage> {
        let index_bytes = self.member("index.json")?.read_small("index.json")?;
        let index: Index =
            serde_json::from_slice(&index_bytes).with_context(|| format!("{}: index.json is not valid", self.label))?;
        let chosen: Vec<&Descriptor> = match tag {
            Some(t) => index
                .manifests
                .iter()
                .filter(|m| m.annotations.get(TAG_ANNOTATION).map(String::as_str) == Some(t))
                .collect(),
            None => index.manifests.iter().collect(),
        };
        // Several platforms listed side by side in index.json (rather than behind one image
        // index) are one image too: choose by architecture as from an index.
        let by_platform = chosen.len() > 1 && chosen.iter().all(|m| m.platform.is_some());
        if by_platform {
            let pick = pick_platform(chosen.iter().copied(), arch, &self.label)?;
            return self.resolve_manifest(pick, arch, 0);
        }
        let desc = match chosen.as_slice() {
            [one] => *one,
            [] if tag.is_some() => {
                let tags: Vec<&str> = index
                    .manifests
                    .iter()
                    .filter_map(|m| m.annotations.get(TAG_ANNOTATION).map(String::as_str))
                    .collect();
                bail!(
                    "{}: no image is tagged {:?}; tags present: {}",
                    self.label,
                    tag.unwrap_or_default(),
                    tags.join(", ")
                )
            }
            [] => bail!("{}: index.json lists no images", self.label),
            many => {
                let tags: Vec<&str> =
                    many.iter().filter_map(|m| m.annotations.get(TAG_ANNOTATION).map(String::as_str)).collect();
                bail!("{}: holds several images; name one with oci:DIR:TAG (tags: {})", self.label, tags.join(", "))
            }
        };
        self.resolve_manifest(desc, arch, 0)
    }

    fn resolve_manifest(&self, desc: &Descriptor, arch: &str, depth: usize) -> Result<LayoutImage> {
        if depth > 4 {
            bail!("{}: image indexes nest too deeply", self.label);
        }
        let digest = Digest::parse(&desc.digest).with_context(|| format!("{}: manifest descriptor", self.label))?;
        let bytes = self.verified_json(&digest, "manifest")?;
        let manifest: Manifest = serde_json::from_slice(&bytes)
            .with_context(|| format!("{}: manifest {digest} is not a valid OCI manifest", self.label))?;
        let is_index = manifest.manifests.is_some()
            || desc.media_type.contains("image.index")
            || desc.media_type.contains("manifest.list")
            || manifest.media_type.contains("image.index");
        if is_index {
            let subs = manifest.manifests.unwrap_or_default();
            let pick = pick_platform(subs.iter(), arch, &self.label)?;
            return self.resolve_manifest(pick, arch, depth + 1);
        }
        let config_desc =
            manifest.config.as_ref().with_context(|| format!("{}: manifest {digest} has no config", self.label))?;
        let config_digest = Digest::parse(&config_desc.digest)?;
        let config_bytes = self.verified_json(&config_digest, "config")?;
        let config = ImageConfig::parse(&config_bytes, &format!("{}: config {config_digest}", self.label))?;
        let mut layers = Vec::with_capacity(manifest.layers.len());
        for (i, l) in manifest.layers.iter().enumerate() {
            let d = Digest::parse(&l.digest).with_context(|| format!("{}: layer {i}", self.label))?;
            if !is_tar_layer(&l.media_type) {
                bail!(
                    "{}: layer {i} has media type {:?}, which is not a filesystem layer (tar, tar+gzip or tar+zstd)",
                    self.label,
                    l.media_type
                );
            }
            let loc = self.blob(&d)?;
            if let Some(size) = l.size {
                if size != loc.len {
                    bail!(
                        "{}: layer {d} should be {size} bytes but is {}: the blob is truncated or corrupt",
                        self.label,
                        loc.len
                    );
                }
            }
            layers.push(LayerBlob {
                digest: Some(d.clone()),
                diff_id: config.diff_ids.get(i).cloned(),
                size: l.size,
                loc,
                label: format!("layer {} ({d})", i + 1),
            });
        }
        Ok(LayoutImage { digest, config, layers })
    }
}

/// The Linux image for `arch` among an index's manifests; an error lists the architectures there are.
fn pick_platform<'a>(
    manifests: impl Iterator<Item = &'a Descriptor> + Clone,
    arch: &str,
    label: &str,
) -> Result<&'a Descriptor> {
    let linux = |p: &Platform| p.os.is_empty() || p.os == "linux";
    if let Some(found) =
        manifests.clone().find(|m| m.platform.as_ref().is_some_and(|p| p.architecture == arch && linux(p)))
    {
        return Ok(found);
    }
    let mut have: Vec<String> = manifests
        .filter_map(|m| m.platform.as_ref())
        .filter(|p| linux(p) && p.architecture != "unknown")
        .map(|p| p.architecture.clone())
        .collect();
    have.dedup();
    bail!(
        "{label}: the image has no {arch} variant (it has: {}); set `arch` (or --arch) to one of those",
        if have.is_empty() { "none for Linux".to_string() } else { have.join(", ") }
    )
}

fn is_tar_layer(media_type: &str) -> bool {
    media_type.is_empty()
        || media_type.starts_with("application/vnd.oci.image.layer.v1.tar")
        || media_type.starts_with("application/vnd.docker.image.rootfs.diff.tar")
        || media_type.starts_with("application/vnd.oci.image.layer.nondistributable.v1.tar")
}

/// Indexes the members of an uncompressed tar archive: name → where its bytes are.
pub fn index_tar(file: &Path) -> Result<HashMap<String, BlobLoc>> {
    let f = File::open(file).with_context(|| format!("opening {}", file.display()))?;
    let mut magic = [0u8; 4];
    let n = (&f).read(&mut magic).with_context(|| format!("reading {}", file.display()))?;
    if n >= 2 && (magic[..2] == [0x1f, 0x8b] || (n == 4 && magic == [0x28, 0xb5, 0x2f, 0xfd])) {
        bail!("{} is compressed; decompress it first (image archives are plain tar files)", file.display());
    }
    (&f).seek(SeekFrom::Start(0))?;
    let mut archive = tar::Archive::new(f);
    let mut members = HashMap::new();
    for entry in archive.entries_with_seek().with_context(|| format!("reading {}", file.display()))? {
        let entry = entry.with_context(|| format!("{} is not a valid tar archive", file.display()))?;
        if entry.header().entry_type() != tar::EntryType::Regular
            && entry.header().entry_type() != tar::EntryType::Continuous
        {
            continue;
        }
        let name = entry.path().with_context(|| format!("{}: bad member name", file.display()))?;
        let name = name.to_string_lossy().trim_start_matches("./").to_string();
        members
            .insert(name, BlobLoc { path: file.to_path_buf(), offset: entry.raw_file_position(), len: entry.size() });
    }
    Ok(members)
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerManifestEntry {
    config: String,
    #[serde(default)]
    layers: Vec<String>,
}

/// A `docker save` archive: `manifest.json` names the config and the layer tars. Its identity
/// is the config digest (the image ID); layers are checked against the config's `diff_ids`.
pub fn docker_archive(file: &Path) -> Result<LayoutImage> {
    let label = format!("docker-archive:{}", file.display());
    let members = index_tar(file)?;
    let get = |name: &str| -> Result<BlobLoc> {
        members.get(name.trim_start_matches("./")).cloned().ok_or_else(|| anyhow!("{label}: missing member {name}"))
    };
    let manifest_bytes = get("manifest.json")
        .with_context(|| format!("{} is not a docker archive", file.display()))?
        .read_small("manifest.json")?;
    let entries: Vec<DockerManifestEntry> =
        serde_json::from_slice(&manifest_bytes).with_context(|| format!("{label}: manifest.json is not valid"))?;
    let entry = match entries.as_slice() {
        [one] => one,
        [] => bail!("{label}: manifest.json lists no images"),
        _ => bail!("{label}: holds {} images; kiln reads archives with exactly one", entries.len()),
    };
    let config_bytes = get(&entry.config)?.read_small("config")?;
    let digest = Digest::of_bytes(&config_bytes);
    // The config's member name is its digest, in both the legacy (`<hex>.json`) and the
    // OCI-style (`blobs/sha256/<hex>`) layouts.
    let named = entry.config.trim_end_matches(".json").rsplit('/').next().unwrap_or_default();
    if named.len() == 64 && named != digest.hex() {
        bail!("{label}: config {} is corrupt: its content hashes to {digest}", entry.config);
    }
    let config = ImageConfig::parse(&config_bytes, &format!("{label}: config"))?;
    if config.diff_ids.len() != entry.layers.len() {
        bail!(
            "{label}: the config lists {} layers but manifest.json names {}",
            config.diff_ids.len(),
            entry.layers.len()
        );
    }
    let layers = entry
        .layers
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let loc = get(name)?;
            Ok(LayerBlob {
                digest: None,
                diff_id: Some(config.diff_ids[i].clone()),
                size: Some(loc.len),
                loc,
                label: format!("layer {} ({name})", i + 1),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(LayoutImage { digest, config, layers })
}
