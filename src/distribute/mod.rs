//! Outputs that travel: each store output as an OCI artifact ([`artifact`]), pushed to and fetched from OCI
//! registries with skopeo ([`skopeo`]), so any registry a site runs is kiln's shared store and binary cache;
//! and closure archives for air-gapped sites ([`closure`]). Whatever arrives is verified whole before it is
//! committed to the store, exactly as a local build commits it (same path, same bytes).
//!
//! A remote is a registry repository, `docker://registry.site/kiln`, or an OCI layout, `oci:/srv/kiln-cache`;
//! each output is tagged there by its store path's name (`<hash>-<name>`, so the same inputs ask for the same
//! tag), and by `<kind>-<name>-latest` for people.

pub mod artifact;
pub mod closure;
pub mod skopeo;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::image::RegistryOptions;
use crate::store::{verify_output, Store};
use artifact::{LayoutWriter, Verified};
use skopeo::Probe;

/// How long asking a remote whether it has a tag may take: a registry slower than this is treated as down.
const PROBE_TIMEOUT: Duration = Duration::from_secs(20);
/// How long one output's copy may take.
const COPY_TIMEOUT: Duration = Duration::from_secs(3600);

/// Where outputs are pushed to and fetched from: `docker://HOST/REPO` or `oci:DIR`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Remote(String);

impl Remote {
    pub fn parse(s: &str) -> Result<Remote> {
        let s = s.trim_end_matches('/');
        if let Some(rest) = s.strip_prefix("docker://") {
            let last = rest.rsplit('/').next().unwrap_or("");
            if rest.is_empty() || !rest.contains('/') || last.contains([':', '@']) {
                bail!(
                    "{s:?} is not a repository: write docker://REGISTRY/REPOSITORY (no tag: kiln tags each output), \
                     e.g. docker://registry.site/kiln"
                );
            }
        } else if let Some(dir) = s.strip_prefix("oci:") {
            if dir.is_empty() || dir.contains(':') {
                bail!("{s:?}: write an OCI layout as oci:DIR (no tag: kiln tags each output)");
            }
        } else {
            bail!("{s:?} is not a registry repository (docker://REGISTRY/REPOSITORY) or an OCI layout (oci:DIR)");
        }
        Ok(Remote(s.to_string()))
    }

    /// The reference of `tag` in this remote.
    pub fn at(&self, tag: &str) -> String {
        format!("{}:{tag}", self.0)
    }
}

impl std::fmt::Display for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The tag people use for the latest push of a root (`image-compute-latest`).
pub fn latest_tag(root: &str) -> String {
    format!("{root}-latest")
}

/// What pushing one output did.
#[derive(Debug, Serialize)]
pub struct Pushed {
    pub path: PathBuf,
    pub tag: String,
    pub digest: String,
    /// Bytes of the output (its files and manifest).
    pub size: u64,
    /// False when the remote already had this artifact under its tag: nothing was sent.
    pub uploaded: bool,
    pub tags: Vec<String>,
}

/// Pushes the store output `dir` to `remote`, tagged by its store path's name and by `extra_tags`. The output
/// is verified first (a damaged output must not reach a cache); an artifact already there is not sent again,
/// and skopeo sends only the blobs the registry does not hold.
pub fn push_output(
    store: &Store,
    dir: &Path,
    remote: &Remote,
    extra_tags: &[String],
    opts: &RegistryOptions,
) -> Result<Pushed> {
    if let Some(p) = verify_output(dir).first() {
        bail!("{}: {} (rebuild it before pushing)", p.path.display(), p.problem);
    }
    let art = artifact::describe(dir)?;
    let mut uploaded = false;
    let mut layout: Option<tempfile::TempDir> = None;
    let mut tags = vec![art.store_name.clone()];
    tags.extend(extra_tags.iter().cloned());
    for tag in &tags {
        let there = match skopeo::probe(&remote.at(tag), opts, PROBE_TIMEOUT)? {
            Probe::Found(raw) => crate::util::Digest::of_bytes(&raw) == art.digest,
            Probe::Missing => false,
        };
        if there {
            continue;
        }
        if layout.is_none() {
            let tmp = tempfile::Builder::new().prefix("push-").tempdir_in(store.tmp_dir())?;
            let mut w = LayoutWriter::create(tmp.path())?;
            w.add_output(&art)?;
            w.finish()?;
            layout = Some(tmp);
        }
        let from = skopeo::layout_ref(layout.as_ref().expect("made above").path(), &art.store_name);
        skopeo::copy(&from, &remote.at(tag), opts, COPY_TIMEOUT)?;
        uploaded |= tag == &art.store_name;
    }
    Ok(Pushed {
        path: dir.to_path_buf(),
        size: art.size(),
        digest: art.digest.to_string(),
        tag: art.store_name,
        uploaded,
        tags,
    })
}

/// Copies the artifact `tag` of `remote` into a fresh layout in the store's tmp/ and verifies it; `None` when
/// the remote does not have the tag.
fn fetch_verified(
    store: &Store,
    remote: &Remote,
    tag: &str,
    expected: Option<&str>,
    opts: &RegistryOptions,
) -> Result<Option<(tempfile::TempDir, Verified)>> {
    let digest = match skopeo::probe(&remote.at(tag), opts, PROBE_TIMEOUT)? {
        Probe::Missing => return Ok(None),
        Probe::Found(raw) => crate::util::Digest::of_bytes(&raw),
    };
    // The remote answered: from here on, a failure is this artifact's, not the remote's being down.
    let reject = |e: anyhow::Error| anyhow::Error::new(Reject(format!("{e:#}")));
    let tmp = tempfile::Builder::new().prefix("pull-").tempdir_in(store.tmp_dir())?;
    skopeo::copy(&remote.at(tag), &skopeo::layout_ref(tmp.path(), tag), opts, COPY_TIMEOUT).map_err(reject)?;
    let tags = artifact::layout_index(tmp.path()).map_err(reject)?;
    let got = tags.get(tag).context("skopeo wrote no manifest for the tag").map_err(reject)?;
    if *got != digest {
        return Err(reject(anyhow::anyhow!("the remote answered with two manifests for {tag} ({digest}, then {got})")));
    }
    let verified = artifact::verify(tmp.path(), got, expected).map_err(reject)?;
    Ok(Some((tmp, verified)))
}

/// Commits a verified output to the store (its blobs hard-linked, not copied), or finds it already there.
pub fn commit_verified(store: &Store, v: &Verified) -> Result<PathBuf> {
    if let Some(p) = store.lookup(&v.hash, &v.name) {
        return Ok(p);
    }
    let pending = store.begin(&v.name)?;
    for (file, blob) in &v.files {
        let to = pending.dir().join(file);
        if std::fs::hard_link(blob, &to).is_err() {
            std::fs::copy(blob, &to).with_context(|| format!("copying {} to {}", blob.display(), to.display()))?;
        }
    }
    std::fs::write(pending.dir().join("manifest.json"), &v.output_manifest)
        .with_context(|| format!("writing the manifest of {}", v.store_name))?;
    store.commit(pending, &v.hash, &v.name)
}

/// Fetches the output tagged `tag` from `remote` into the store (verified; `expected`: the inputs hash it
/// must have been made from). `Ok(None)`: the remote does not have it.
pub fn fetch(
    store: &Store,
    remote: &Remote,
    tag: &str,
    expected: Option<&str>,
    opts: &RegistryOptions,
) -> Result<Option<(PathBuf, u64)>> {
    let Some((_layout, v)) = fetch_verified(store, remote, tag, expected, opts)? else { return Ok(None) };
    Ok(Some((commit_verified(store, &v)?, v.size)))
}

/// Binary caches asked before building (Nix's substituters). A substituter that is down, slow or serves
/// something that fails verification never fails a build: kiln says so once and builds locally.
#[derive(Debug, Clone, Default)]
pub struct Substituters {
    remotes: Vec<Remote>,
    pub registry: RegistryOptions,
    down: Arc<Mutex<BTreeSet<String>>>,
}

/// An output a substituter had.
#[derive(Debug, Clone)]
pub struct Substituted {
    pub path: PathBuf,
    pub from: String,
    pub size: u64,
}

impl Substituters {
    pub fn new(remotes: &[String], registry: RegistryOptions) -> Result<Substituters> {
        let remotes = remotes
            .iter()
            .map(|r| Remote::parse(r).with_context(|| format!("substituter {r:?}")))
            .collect::<Result<Vec<_>>>()?;
        Ok(Substituters { remotes, registry, down: Arc::default() })
    }

    pub fn is_empty(&self) -> bool {
        self.remotes.is_empty()
    }

    /// Asks each substituter in turn for the output named `name` made from inputs hashing to `hash`.
    pub fn fetch(&self, store: &Store, hash: &str, name: &str) -> Option<Substituted> {
        let tag = store.path_for(hash, name).file_name()?.to_string_lossy().into_owned();
        for remote in &self.remotes {
            let key = remote.to_string();
            if self.down.lock().map(|d| d.contains(&key)).unwrap_or(true) {
                continue;
            }
            match fetch(store, remote, &tag, Some(hash), &self.registry) {
                Ok(Some((path, size))) => return Some(Substituted { path, from: key, size }),
                Ok(None) => tracing::info!("substituter {remote} has no {tag}"),
                Err(e) if e.is::<Reject>() => {
                    crate::util::say(format!("kiln: substituter {remote}: {tag} refused ({e:#}); building it locally"));
                }
                Err(e) => {
                    crate::util::say(format!(
                        "kiln: substituter {remote} is unreachable ({e:#}); building locally without it"
                    ));
                    if let Ok(mut d) = self.down.lock() {
                        d.insert(key);
                    }
                }
            }
        }
        None
    }
}

/// Marks an artifact that arrived but failed verification (as opposed to a remote that could not be reached).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Reject(pub String);
