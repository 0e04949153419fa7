//! `kiln.lock`: what kiln resolved the recipe's tags and revisions to, so later builds use the same bytes.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

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

/// What an `[image.NAME]`'s `from` resolved to. With `digest`, `arch` and `created` recorded, the bundle's
/// store hash is known without reaching the source: `kiln pull`, substitution and an imported store work
/// where the source image is not.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LockedImage {
    /// The `from` this pin was made for; a changed `from` makes the pin stale.
    pub from: String,
    /// A registry image by digest (`docker://repo@sha256:…`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pinned: Option<String>,
    /// The image's identity: its manifest digest (the config digest for docker-archive, the content's
    /// sha256 for dir: and tar:).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// The image config's architecture (OCI name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arch: Option<String>,
    /// The image config's `created`, in seconds since 1970.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<i64>,
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
    fn lock_round_trips() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("kiln.lock");
        let mut lock = Lock::load(&p).unwrap();
        lock.image.insert(
            "c".into(),
            LockedImage {
                from: "docker://a/b:1".into(),
                pinned: Some("docker://a/b@sha256:00".into()),
                ..Default::default()
            },
        );
        lock.save(&p).unwrap();
        assert_eq!(Lock::load(&p).unwrap(), lock);
    }
}
