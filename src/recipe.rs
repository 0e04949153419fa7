//! `kiln.toml`, the one file users write, and `kiln.lock`, where kiln pins what it resolved.
//!
//! Unknown keys are errors (a typo must not be silently ignored); every error names the file,
//! the line and the field. The keys are documented in docs/recipe.md.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::archive::Compression;
use crate::bundle::{BundleSpec, KernelSpec, DEFAULT_CMDLINE};
use crate::image::Source;
use crate::serve::config::{NodeRecipe, ProfileRecipe, ServerRecipe};

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    pub source_date_epoch: Option<i64>,
    #[serde(default)]
    pub image: BTreeMap<String, ImageRecipe>,
    /// iPXE builds (`kiln build-ipxe`).
    #[serde(default)]
    pub ipxe: BTreeMap<String, toml::Table>,
    /// The boot server (`kiln serve`).
    #[serde(default)]
    pub server: Option<ServerRecipe>,
    #[serde(default)]
    pub profile: BTreeMap<String, ProfileRecipe>,
    #[serde(default)]
    pub node: BTreeMap<String, NodeRecipe>,
    #[serde(default)]
    pub appliance: Option<crate::appliance::ApplianceRecipe>,
}

#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct ImageRecipe {
    pub from: String,
    #[serde(default)]
    pub kernel: Option<String>,
    #[serde(default)]
    pub cmdline: Option<String>,
    #[serde(default)]
    pub compression: Option<String>,
    #[serde(default)]
    pub level: Option<i32>,
    #[serde(default)]
    pub exclude: Vec<String>,
    /// OCI architecture to pick from a multi-platform image (default: this machine's).
    #[serde(default)]
    pub arch: Option<String>,
    /// A directory of overlay templates for the nodes booting this image (`kiln serve`).
    #[serde(default)]
    pub overlay: Option<PathBuf>,
}

/// A recipe and where it was read from.
pub struct LoadedRecipe {
    pub path: PathBuf,
    pub recipe: Recipe,
}

impl LoadedRecipe {
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let recipe = parse(&text).with_context(|| format!("{} is not a valid kiln recipe", path.display()))?;
        for (name, img) in &recipe.image {
            check_name(name).with_context(|| format!("{}: [image.{name}]", path.display()))?;
            img.bundle_spec(name).with_context(|| format!("{}: [image.{name}]", path.display()))?;
        }
        Ok(LoadedRecipe { path: path.to_path_buf(), recipe })
    }

    pub fn lock_path(&self) -> PathBuf {
        self.path.with_file_name("kiln.lock")
    }

    /// Resolves a relative local source path against the recipe's directory.
    pub fn source(&self, img: &ImageRecipe) -> Result<Source> {
        let src = Source::parse(&img.from)?;
        let base = self.path.parent().unwrap_or(Path::new("."));
        let rel = |p: &PathBuf| if p.is_absolute() { p.clone() } else { base.join(p) };
        Ok(match src {
            Source::Oci { dir, tag } => Source::Oci { dir: rel(&dir), tag },
            Source::OciArchive(p) => Source::OciArchive(rel(&p)),
            Source::DockerArchive(p) => Source::DockerArchive(rel(&p)),
            Source::Dir(p) => Source::Dir(rel(&p)),
            Source::Tar(p) => Source::Tar(rel(&p)),
            s @ Source::Docker(_) => s,
        })
    }
}

pub fn parse(text: &str) -> Result<Recipe> {
    // toml's error text carries the line, the column and a caret under the offending key.
    toml::from_str(text).map_err(|e| anyhow::anyhow!("{e}"))
}

/// Names become parts of store paths and file names.
pub fn check_name(name: &str) -> Result<()> {
    if name.is_empty()
        || name.len() > 64
        || name.starts_with(['.', '-'])
        || !name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        bail!(
            "name {name:?} must be 1-64 characters of letters, digits, '-', '_' or '.', not starting with '.' or '-'"
        );
    }
    Ok(())
}

impl ImageRecipe {
    pub fn bundle_spec(&self, name: &str) -> Result<BundleSpec> {
        Source::parse(&self.from).context("field `from`")?;
        let compression = match &self.compression {
            Some(c) => Compression::parse(c).context("field `compression`")?,
            None => Compression::Zstd,
        };
        let level = self.level.unwrap_or_else(|| compression.default_level());
        compression.check_level(level).context("field `level`")?;
        crate::bundle::exclude_set(&self.exclude).context("field `exclude`")?;
        Ok(BundleSpec {
            name: name.to_string(),
            kernel: KernelSpec::parse(self.kernel.as_deref().unwrap_or("auto")),
            cmdline: self.cmdline.clone().unwrap_or_else(|| DEFAULT_CMDLINE.to_string()),
            compression,
            level,
            exclude: self.exclude.clone(),
        })
    }
}

/// `kiln.lock`: what tags and revisions resolved to.
#[derive(Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Lock {
    #[serde(default = "lock_version")]
    pub version: u32,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub image: BTreeMap<String, LockedImage>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub ipxe: BTreeMap<String, LockedIpxe>,
}

fn lock_version() -> u32 {
    1
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LockedImage {
    /// The `from` this pin was made for; a changed `from` makes the pin stale.
    pub from: String,
    /// The same image by digest.
    pub pinned: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LockedIpxe {
    pub git: String,
    pub rev: String,
    pub commit: String,
}

impl Lock {
    pub fn load(path: &Path) -> Result<Lock> {
        match std::fs::read_to_string(path) {
            Ok(text) => toml::from_str(&text).map_err(|e| anyhow::anyhow!("{e}")).with_context(|| {
                format!(
                    "{} is not a valid lock file (delete it and run `kiln build --update` to recreate it)",
                    path.display()
                )
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Lock { version: 1, ..Default::default() }),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let body = toml::to_string_pretty(self)?;
        let text = format!("# kiln.lock: written by kiln, pins what kiln.toml names to digests. Commit it.\n{body}");
        crate::util::write_atomic(path, text.as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_design_example() {
        let r = parse(
            r#"
source_date_epoch = 1700000000
[image.compute]
from = "docker://registry.example/hpc/rocky:9"
kernel = "auto"
cmdline = "console=ttyS0 quiet"
compression = "zstd"
level = 3
exclude = ["/var/cache/**"]
[server]
dhcp = "full"
[node.n001]
mac = "52:54:00:00:00:01"
"#,
        )
        .unwrap();
        assert_eq!(r.source_date_epoch, Some(1_700_000_000));
        let spec = r.image["compute"].bundle_spec("compute").unwrap();
        assert_eq!(spec.level, 3);
        assert_eq!(spec.kernel, KernelSpec::Auto);
    }

    #[test]
    fn typos_are_errors_with_line_numbers() {
        let err = parse("[image.c]\nfrom = \"oci:x\"\ncompresion = \"zstd\"\n").unwrap_err().to_string();
        assert!(err.contains("line 3") && err.contains("compresion"), "{err}");
        let err = parse("sourcedate = 1\n").unwrap_err().to_string();
        assert!(err.contains("line 1") && err.contains("sourcedate"), "{err}");
    }

    #[test]
    fn bad_values_name_the_field() {
        let r = parse("[image.c]\nfrom = \"oci:x\"\ncompression = \"xz\"\n").unwrap();
        let err = format!("{:#}", r.image["c"].bundle_spec("c").unwrap_err());
        assert!(err.contains("field `compression`"), "{err}");
        let r = parse("[image.c]\nfrom = \"ftp:x\"\n").unwrap();
        let err = format!("{:#}", r.image["c"].bundle_spec("c").unwrap_err());
        assert!(err.contains("field `from`") && err.contains("unknown transport"), "{err}");
        assert!(check_name("../x").is_err());
        assert!(check_name("compute-9").is_ok());
    }

    #[test]
    fn lock_round_trips() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("kiln.lock");
        let mut lock = Lock::load(&p).unwrap();
        lock.image
            .insert("c".into(), LockedImage { from: "docker://a/b:1".into(), pinned: "docker://a/b@sha256:00".into() });
        lock.save(&p).unwrap();
        assert_eq!(Lock::load(&p).unwrap(), lock);
    }
}
