//! `kiln.toml`, the one file users write, and `kiln.lock`, where kiln pins what it resolved: the schema as
//! plain serde types. This module imports no other part of kiln; each part turns the section it needs into its
//! own validated configuration (`bundle::BundleSpec`, `ipxe::BuildSpec`, `serve::Site`, …).
//!
//! Unknown keys are errors (a typo must not be silently ignored); every error names the file,
//! the line and the field. The keys are documented in docs/recipe.md.
//!
//! - [`server`]: `[server]`, `[profile.NAME]`, `[node.NAME]`, `[ipxe.NAME]`, `[appliance]`;
//! - [`nodes`]: the node list with profiles applied ([`Node`]), checked as a whole;
//! - [`edit`]: `kiln node add|set|rm`, editing kiln.toml in place;
//! - [`lock`]: the lock file, kiln.lock.

pub mod edit;
pub mod lock;
pub mod nodes;
pub mod server;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::Deserialize;

pub use lock::{Lock, LockedImage, LockedIpxe};
pub use nodes::{resolve_nodes, Node};
pub use server::{
    ApplianceRecipe, BootFilesRecipe, DhcpMode, IpxeRecipe, IpxeSourceRecipe, NodeRecipe, ProfileRecipe, ServerRecipe,
    UnknownPolicy,
};

/// How a node boots a bundle: `initrd` (the kernel unpacks the image from RAM; the default) or `two-stage`
/// (kiln's loader fetches the image itself, verifies it, mounts it and switches to it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum BootMode {
    #[default]
    Initrd,
    TwoStage,
}

impl BootMode {
    pub fn is_initrd(&self) -> bool {
        *self == BootMode::Initrd
    }
}

impl std::fmt::Display for BootMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BootMode::Initrd => "initrd",
            BootMode::TwoStage => "two-stage",
        })
    }
}

impl std::str::FromStr for BootMode {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "initrd" => Ok(BootMode::Initrd),
            "two-stage" => Ok(BootMode::TwoStage),
            _ => bail!("invalid boot {s:?}: expected \"initrd\" or \"two-stage\""),
        }
    }
}

crate::serde_as_text!(BootMode);

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    pub source_date_epoch: Option<i64>,
    /// Registries (`docker://REGISTRY/REPO`) or OCI layouts (`oci:DIR`) asked for each output before it is
    /// built: kiln's binary caches.
    #[serde(default)]
    pub substituters: Vec<String>,
    #[serde(default)]
    pub image: BTreeMap<String, ImageRecipe>,
    /// iPXE builds (`kiln build-ipxe`), read with [`LoadedRecipe::ipxe`] so their errors name the table.
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
    pub appliance: Option<ApplianceRecipe>,
}

/// `[image.NAME]`: a bundle to build. Values are checked by `bundle::BundleSpec::from_recipe`.
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
    /// How nodes boot it unless their profile or node table says otherwise (default `initrd`).
    #[serde(default)]
    pub boot: Option<BootMode>,
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
        for name in recipe.image.keys() {
            check_name(name).with_context(|| format!("{}: [image.{name}]", path.display()))?;
        }
        Ok(LoadedRecipe { path: path.to_path_buf(), recipe })
    }

    pub fn lock_path(&self) -> PathBuf {
        self.path.with_file_name("kiln.lock")
    }

    /// The directory relative paths in the recipe are relative to (empty for a recipe in the current
    /// directory, so paths read as the user wrote them).
    pub fn base_dir(&self) -> &Path {
        self.path.parent().unwrap_or(Path::new(""))
    }

    /// `path` as the recipe means it: relative paths are relative to the recipe's directory.
    pub fn resolve_path(&self, path: &Path) -> PathBuf {
        if path.is_absolute() {
            path.to_path_buf()
        } else {
            self.base_dir().join(path)
        }
    }

    /// The `[ipxe.NAME]` table, read; errors name the file and the table.
    pub fn ipxe(&self, name: &str) -> Result<IpxeRecipe> {
        let at = || format!("{}: [ipxe.{name}]", self.path.display());
        let table =
            self.recipe.ipxe.get(name).with_context(|| format!("{} has no [ipxe.{name}]", self.path.display()))?;
        check_name(name).with_context(at)?;
        IpxeRecipe::deserialize(toml::Value::Table(table.clone())).map_err(|e| anyhow::anyhow!("{e}")).with_context(at)
    }

    /// The `[server]` table, required: kiln serve and the appliance need one.
    pub fn server(&self) -> Result<&ServerRecipe> {
        self.recipe
            .server
            .as_ref()
            .with_context(|| format!("{} has no [server] table: kiln serve needs one", self.path.display()))
    }

    /// The node list with profiles applied, checked as a whole; errors name the file.
    pub fn nodes(&self) -> Result<Vec<Node>> {
        let server = self.recipe.server.clone().unwrap_or_default();
        resolve_nodes(&server, &self.recipe.profile, &self.recipe.node).with_context(|| self.path.display().to_string())
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
        assert_eq!(r.image["compute"].level, Some(3));
        assert_eq!(r.server.unwrap().dhcp, Some(DhcpMode::Full));
    }

    #[test]
    fn typos_are_errors_with_line_numbers() {
        let err = parse("[image.c]\nfrom = \"oci:x\"\ncompresion = \"zstd\"\n").unwrap_err().to_string();
        assert!(err.contains("line 3") && err.contains("compresion"), "{err}");
        let err = parse("sourcedate = 1\n").unwrap_err().to_string();
        assert!(err.contains("line 1") && err.contains("sourcedate"), "{err}");
        let err = parse("[node.n1]\nmac = \"52:54:00:aa:bb\"\n").unwrap_err().to_string();
        assert!(err.contains("line 2") && err.contains("not a MAC address"), "{err}");
    }

    #[test]
    fn names_are_checked() {
        assert!(check_name("../x").is_err());
        assert!(check_name("compute-9").is_ok());
    }
}
