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
