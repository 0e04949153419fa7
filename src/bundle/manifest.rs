//! A bundle's `manifest.json`: written by the builder, read by `kiln serve`, the appliance and `--json` output.
//!
//! It is canonical JSON (keys sorted, as `store::write_manifest` writes every manifest), so the same bundle
//! always has the same manifest bytes. Readers accept fields they do not know (a later kiln may add some).

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::two_stage::{ImageEntry, LoaderEntry};
use super::ArchiveInfo;
use crate::recipe::BootMode;
use crate::util::FileDigest;

/// The `schema` a manifest written by this kiln carries.
pub const SCHEMA: u32 = 1;

/// The bundle's three files, by the name they have in its directory.
pub const KERNEL: &str = "kernel";
pub const INITRAMFS: &str = "initramfs";
pub const IMAGE: &str = "image";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub schema: u32,
    /// Always `bundle`.
    pub kind: String,
    pub name: String,
    /// The kernel's architecture as Linux names it (`x86_64`, `aarch64`).
    pub arch: String,
    pub kernel: KernelEntry,
    /// What a node loads after the kernel, in order: `initramfs`, then `image` (two-stage: `initramfs` only).
    pub initrds: Vec<ArchiveInfo>,
    /// How nodes boot it; absent means `initrd` (manifests from before two-stage boot have no such field).
    #[serde(default, skip_serializing_if = "BootMode::is_initrd")]
    pub boot: BootMode,
    /// two-stage: the image the loader fetches, verifies and mounts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<ImageEntry>,
    /// two-stage: the loader `initramfs` holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loader: Option<LoaderEntry>,
    /// The kernel command line the bundle boots with (nodes append their own).
    pub cmdline: String,
    pub source: SourceEntry,
    /// The store hash: sha256 of every input.
    pub recipe_hash: String,
    pub source_date_epoch: i64,
    /// kiln's output format version (`store::FORMAT_VERSION`).
    pub format: u32,
    /// Every file of the bundle directory but the manifest, with its sha256 and size (`kiln store verify`).
    pub files: BTreeMap<String, FileDigest>,
}

/// The kernel a bundle boots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelEntry {
    /// Its file in the bundle (`kernel`).
    pub file: String,
    /// Where it was found in the image, e.g. `/boot/vmlinuz-6.1.0-18-amd64`.
    pub path: String,
    pub version: String,
    pub sha256: String,
    pub size: u64,
    /// Whether the image holds `/lib/modules/<version>` (or under `/usr`).
    pub modules: bool,
}

/// The image a bundle was built from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceEntry {
    /// By digest for registry images, by file name for local ones.
    pub reference: String,
    pub transport: String,
    /// The image manifest's digest.
    pub digest: String,
}

impl Manifest {
    /// Reads the manifest of the bundle directory `dir`; anything that is not a bundle's manifest is an error
    /// naming the file.
    pub fn read(dir: &Path) -> Result<Manifest> {
        let p = dir.join("manifest.json");
        let bytes = std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?;
        let value: serde_json::Value =
            serde_json::from_slice(&bytes).with_context(|| format!("{} is not valid JSON", p.display()))?;
        if value.get("kind").and_then(|k| k.as_str()) != Some("bundle") {
            bail!("{} is not a bundle", dir.display());
        }
        serde_json::from_value(value).with_context(|| format!("{} is not a bundle manifest kiln can read", p.display()))
    }

    /// The sha256 and size of one of the bundle's files (`kernel`, `initramfs`, `image`).
    pub fn file(&self, name: &str) -> Result<&FileDigest> {
        self.files.get(name).with_context(|| format!("the manifest of bundle {} lists no {name}", self.name))
    }
}
