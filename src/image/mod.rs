//! Getting an OCI image (or a plain rootfs) and walking its merged filesystem.
//!
//! Transports: `docker://REF` (through skopeo's image proxy, so registries, auth files and
//! mirrors work as they do for podman), `oci:DIR[:TAG]`, `oci-archive:FILE`,
//! `docker-archive:FILE`, `dir:PATH` and `tar:FILE` (a plain rootfs, optionally compressed).
//!
//! Resolving an image ([`resolve`]) reads only its manifest and config, so a build whose
//! output is already in the store costs almost nothing. [`tree::Tree::from_layers`] then reads each
//! layer once, in parallel, verifying its digest as it goes, and merges them in order with OCI
//! whiteouts (image-spec `layer.md`). Nothing is unpacked to disk: a compressed layer is
//! decompressed once into an unnamed spool file, and file contents are later read from there by
//! offset, so memory grows with the number of entries, never with the size of the image.

mod config;
mod layout;
mod registry;
mod rootfs;
pub mod stream;
pub mod tree;

use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Result};

use crate::util::{ByteProgress, Digest};

pub use config::ImageConfig;
pub use layout::BlobLoc;
pub use registry::RegistryOptions;

/// Where an image comes from, as the user wrote it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// `docker://registry/repo[:tag|@digest]`
    Docker(String),
    /// `oci:DIR[:TAG]`
    Oci { dir: PathBuf, tag: Option<String> },
    /// `oci-archive:FILE` (a tar of an OCI layout)
    OciArchive(PathBuf),
    /// `docker-archive:FILE` (as written by `docker save`)
    DockerArchive(PathBuf),
    /// `dir:PATH`, a root filesystem tree
    Dir(PathBuf),
    /// `tar:FILE`, a root filesystem tarball (plain, gzip or zstd)
    Tar(PathBuf),
}

pub const TRANSPORTS: &str = "docker://, oci:, oci-archive:, docker-archive:, dir: or tar:";

impl Source {
    /// This source with a relative local path made relative to `base` (a recipe's directory).
    pub fn relative_to(self, base: &Path) -> Source {
        let rel = |p: PathBuf| if p.is_absolute() { p } else { base.join(p) };
        match self {
            Source::Oci { dir, tag } => Source::Oci { dir: rel(dir), tag },
            Source::OciArchive(p) => Source::OciArchive(rel(p)),
            Source::DockerArchive(p) => Source::DockerArchive(rel(p)),
            Source::Dir(p) => Source::Dir(rel(p)),
            Source::Tar(p) => Source::Tar(rel(p)),
            s @ Source::Docker(_) => s,
        }
    }

    pub fn parse(s: &str) -> Result<Self> {
        let nonempty = |rest: &str, what: &str| -> Result<()> {
            if rest.is_empty() {
                bail!("image source {s:?} names no {what}");
            }
            Ok(())
        };
        if let Some(rest) = s.strip_prefix("docker://") {
            nonempty(rest, "image reference")?;
            return Ok(Source::Docker(rest.to_string()));
        }
        let Some((transport, rest)) = s.split_once(':') else {
            bail!("image source {s:?} has no transport: write it as {TRANSPORTS} followed by the location");
        };
        nonempty(rest, "location")?;
        Ok(match transport {
            "oci" => {
                // oci:DIR:TAG; a tag never contains '/', a directory might contain ':'.
                match rest.rsplit_once(':') {
                    Some((dir, tag)) if !tag.contains('/') && !dir.is_empty() => {
                        Source::Oci { dir: dir.into(), tag: Some(tag.to_string()) }
                    }
                    _ => Source::Oci { dir: rest.into(), tag: None },
                }
            }
            "oci-archive" => Source::OciArchive(rest.into()),
            "docker-archive" => Source::DockerArchive(rest.into()),
            "dir" => Source::Dir(rest.into()),
            "tar" => Source::Tar(rest.into()),
            "docker" => bail!("image source {s:?}: write docker references as docker://{rest}"),
            other => bail!("image source {s:?} uses unknown transport {other:?}: use {TRANSPORTS}"),
        })
    }

    pub fn transport(&self) -> &'static str {
        match self {
            Source::Docker(_) => "docker",
            Source::Oci { .. } => "oci",
            Source::OciArchive(_) => "oci-archive",
            Source::DockerArchive(_) => "docker-archive",
            Source::Dir(_) => "dir",
            Source::Tar(_) => "tar",
        }
    }

    /// The reference as recorded in manifests: registry references in full, local ones by file
    /// name only, so a bundle's bytes do not depend on where the input sat on the build machine.
    pub fn portable_reference(&self) -> String {
        let base = |p: &Path| p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        match self {
            Source::Docker(r) => format!("docker://{r}"),
            Source::Oci { dir, tag: Some(t) } => format!("oci:{}:{t}", base(dir)),
            Source::Oci { dir, tag: None } => format!("oci:{}", base(dir)),
            Source::OciArchive(p) => format!("oci-archive:{}", base(p)),
            Source::DockerArchive(p) => format!("docker-archive:{}", base(p)),
            Source::Dir(p) => format!("dir:{}", base(p)),
            Source::Tar(p) => format!("tar:{}", base(p)),
        }
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Docker(r) => write!(f, "docker://{r}"),
            Source::Oci { dir, tag: Some(t) } => write!(f, "oci:{}:{t}", dir.display()),
            Source::Oci { dir, tag: None } => write!(f, "oci:{}", dir.display()),
            Source::OciArchive(p) => write!(f, "oci-archive:{}", p.display()),
            Source::DockerArchive(p) => write!(f, "docker-archive:{}", p.display()),
            Source::Dir(p) => write!(f, "dir:{}", p.display()),
            Source::Tar(p) => write!(f, "tar:{}", p.display()),
        }
    }
}

/// One layer blob: where its bytes are and what they must hash to.
#[derive(Debug, Clone)]
pub struct LayerBlob {
    /// Digest of the blob as stored (compressed), when the format gives one.
    pub digest: Option<Digest>,
    /// Digest of the uncompressed tar (the config's `diff_id`), checked when `digest` is absent.
    pub diff_id: Option<Digest>,
    pub size: Option<u64>,
    pub loc: BlobLoc,
    /// What to call it in messages.
    pub label: String,
}

/// An image whose identity is known: enough to compute a store key without reading layers.
pub struct ResolvedImage {
    pub source: Source,
    /// The manifest digest (OCI sources), the config digest (docker-archive), or the sha256 of
    /// the content (dir and tar sources).
    pub digest: Digest,
    /// For registry sources: the reference pinned by digest (`docker://repo@sha256:…`).
    pub pinned: Option<String>,
    pub config: ImageConfig,
    content: Content,
}

enum Content {
    Layers(Vec<LayerBlob>),
    Registry(registry::Session, Vec<registry::RemoteLayer>),
    Dir(PathBuf),
}

/// Options that affect how images are fetched (not what they contain).
#[derive(Debug, Clone, Default)]
pub struct FetchOptions {
    pub registry: RegistryOptions,
    /// Architecture to choose from a multi-platform index and to require of a single image
    /// (`amd64`, `arm64`, or the kernel's names `x86_64`, `aarch64`). By default, this machine's.
    pub arch: Option<String>,
}

/// The OCI name of an architecture a user wrote (`x86_64` and `aarch64` are accepted too).
pub fn oci_arch(name: &str) -> Result<&'static str> {
    match name.trim().to_ascii_lowercase().as_str() {
        "amd64" | "x86_64" | "x86-64" => Ok("amd64"),
        "arm64" | "aarch64" => Ok("arm64"),
        other => bail!("unknown architecture {other:?}: kiln builds bundles for amd64 (x86_64) and arm64 (aarch64)"),
    }
}

/// Reads an image's manifest and config (for registries: resolves the tag to a digest).
///
/// From a multi-platform index the manifest for `opts.arch` is chosen; an image of another
/// architecture is refused with a message naming both. Plain root filesystems (`dir:`,
/// `tar:`) carry no architecture and are taken to be of the one asked for.
pub fn resolve(source: &Source, opts: &FetchOptions) -> Result<ResolvedImage> {
    let want_arch = match &opts.arch {
        Some(a) => oci_arch(a)?,
        None => host_oci_arch(),
    };
    let mut resolved = resolve_for(source, opts, want_arch)?;
    match source {
        Source::Dir(_) | Source::Tar(_) => resolved.config.architecture = want_arch.to_string(),
        _ => {
            check_arch(&resolved.config.architecture, want_arch)?;
            resolved.config.architecture = want_arch.to_string();
        }
    }
    Ok(resolved)
}

/// Refuses an image whose configuration names another architecture than the one asked for.
fn check_arch(have: &str, want: &str) -> Result<()> {
    let have_oci = oci_arch(have).ok();
    if have_oci == Some(want) {
        return Ok(());
    }
    let have = if have.is_empty() { "no architecture" } else { have };
    bail!(
        "it is an image for {have}, but {want} was asked for (`--arch` or the recipe's `arch`): build it with \
         arch = {have:?}, or from a multi-platform image that has an {want} variant"
    )
}

fn resolve_for(source: &Source, opts: &FetchOptions, want_arch: &str) -> Result<ResolvedImage> {
    match source {
        Source::Oci { dir, tag } => {
            let layout = layout::Layout::open_dir(dir)?;
            let img = layout.image(tag.as_deref(), want_arch)?;
            Ok(ResolvedImage {
                source: source.clone(),
                digest: img.digest,
                pinned: None,
                config: img.config,
                content: Content::Layers(img.layers),
            })
        }
        Source::OciArchive(file) => {
            let layout = layout::Layout::open_archive(file)?;
            let img = layout.image(None, want_arch)?;
            Ok(ResolvedImage {
                source: source.clone(),
                digest: img.digest,
                pinned: None,
                config: img.config,
                content: Content::Layers(img.layers),
            })
        }
        Source::DockerArchive(file) => {
            let img = layout::docker_archive(file)?;
            Ok(ResolvedImage {
                source: source.clone(),
                digest: img.digest,
                pinned: None,
                config: img.config,
                content: Content::Layers(img.layers),
            })
        }
        Source::Tar(file) => {
            let (digest, size) = crate::util::sha256_file(file)?;
            let layer = LayerBlob {
                digest: Some(digest.clone()),
                diff_id: None,
                size: Some(size),
                loc: BlobLoc::whole_file(file.clone(), size),
                label: file.display().to_string(),
            };
            Ok(ResolvedImage {
                source: source.clone(),
                digest,
                pinned: None,
                config: ImageConfig::for_rootfs(),
                content: Content::Layers(vec![layer]),
            })
        }
        Source::Dir(dir) => {
            let digest = rootfs::hash_tree(dir)?;
            Ok(ResolvedImage {
                source: source.clone(),
                digest,
                pinned: None,
                config: ImageConfig::for_rootfs(),
                content: Content::Dir(dir.clone()),
            })
        }
        Source::Docker(reference) => {
            let (session, resolved) = registry::Session::open(reference, &opts.registry, want_arch)?;
            Ok(ResolvedImage {
                source: source.clone(),
                digest: resolved.digest,
                pinned: Some(resolved.pinned),
                config: resolved.config,
                content: Content::Registry(session, resolved.layers),
            })
        }
    }
}

impl ResolvedImage {
    /// Whether reading the layers means downloading them first ([`ResolvedImage::pull`]).
    pub fn is_remote(&self) -> bool {
        matches!(self.content, Content::Registry(..))
    }

    /// Downloads a registry image's layer blobs into `spool_dir`, counting the bytes in `bytes`; local sources
    /// have nothing to download.
    pub fn pull(&mut self, spool_dir: &Path, bytes: &ByteProgress) -> Result<()> {
        self.content = match std::mem::replace(&mut self.content, Content::Layers(Vec::new())) {
            Content::Registry(session, remote) => Content::Layers(session.download(&remote, spool_dir, bytes)?),
            local => local,
        };
        Ok(())
    }

    /// Reads every layer (downloading registry blobs into `spool_dir` first, unless pulled already) and merges
    /// them, counting the layer bytes read in `bytes`.
    pub fn merged_tree(self, spool_dir: &Path, threads: usize, bytes: &ByteProgress) -> Result<tree::Tree> {
        let layers = match self.content {
            Content::Layers(layers) => layers,
            Content::Registry(session, remote) => session.download(&remote, spool_dir, &ByteProgress::hidden())?,
            Content::Dir(dir) => return rootfs::tree_from_dir(&dir),
        };
        tree::Tree::from_layers(&layers, spool_dir, threads, bytes)
    }

    /// Reads a one-layer image as a stream ([`stream::stream_layer`]), counting the layer bytes read in `bytes`;
    /// `None` when the image has several layers, is a directory (those are read whole first,
    /// [`ResolvedImage::merged_tree`]) or is still in its registry ([`ResolvedImage::pull`] it first).
    pub fn stream(
        &self,
        spool_dir: &Path,
        keep: &dyn Fn(&[u8]) -> bool,
        bytes: &ByteProgress,
        on_entry: &mut stream::OnEntry<'_>,
    ) -> Option<Result<tree::Tree>> {
        match &self.content {
            Content::Layers(l) if l.len() == 1 => Some(stream::stream_layer(&l[0], spool_dir, keep, bytes, on_entry)),
            _ => None,
        }
    }

    pub fn layer_count(&self) -> usize {
        match &self.content {
            Content::Layers(l) => l.len(),
            Content::Registry(_, l) => l.len(),
            Content::Dir(_) => 0,
        }
    }
}

/// The OCI architecture name of the machine kiln runs on.
pub fn host_oci_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

/// Kernel-style architecture name for an OCI one.
pub fn kernel_arch(oci: &str) -> &str {
    match oci {
        "amd64" => "x86_64",
        "arm64" => "aarch64",
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_transport() {
        assert_eq!(Source::parse("docker://r.io/a/b:1").unwrap(), Source::Docker("r.io/a/b:1".into()));
        assert_eq!(
            Source::parse("oci:/x/y:latest").unwrap(),
            Source::Oci { dir: "/x/y".into(), tag: Some("latest".into()) }
        );
        assert_eq!(Source::parse("oci:/x/y").unwrap(), Source::Oci { dir: "/x/y".into(), tag: None });
        assert_eq!(Source::parse("oci-archive:a.tar").unwrap(), Source::OciArchive("a.tar".into()));
        assert_eq!(Source::parse("docker-archive:a.tar").unwrap(), Source::DockerArchive("a.tar".into()));
        assert_eq!(Source::parse("dir:/r").unwrap(), Source::Dir("/r".into()));
        assert_eq!(Source::parse("tar:/r.tar").unwrap(), Source::Tar("/r.tar".into()));
    }

    #[test]
    fn unknown_transport_is_named() {
        let err = Source::parse("ftp:foo").unwrap_err().to_string();
        assert!(err.contains("unknown transport \"ftp\"") && err.contains("docker://"), "{err}");
        let err = Source::parse("just-a-name").unwrap_err().to_string();
        assert!(err.contains("no transport"), "{err}");
        assert!(Source::parse("docker://").is_err());
        assert!(Source::parse("docker:foo").unwrap_err().to_string().contains("docker://foo"));
    }

    #[test]
    fn portable_reference_drops_local_directories() {
        let s = Source::parse("oci-archive:/home/me/build/tiny.oci.tar").unwrap();
        assert_eq!(s.portable_reference(), "oci-archive:tiny.oci.tar");
    }
}
