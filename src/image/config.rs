//! The parts of an OCI image configuration (image-spec `config.md`) kiln uses.

use anyhow::{Context, Result};
use serde::Deserialize;

use crate::util::Digest;

#[derive(Debug, Clone, Default)]
pub struct ImageConfig {
    /// OCI architecture name (`amd64`, `arm64`); empty when the configuration names none.
    pub architecture: String,
    /// `created`, as seconds since the epoch.
    pub created: Option<i64>,
    /// The digests of the uncompressed layers, in order.
    pub diff_ids: Vec<Digest>,
}

#[derive(Deserialize)]
struct RawConfig {
    #[serde(default)]
    architecture: Option<String>,
    #[serde(default)]
    created: Option<String>,
    #[serde(default)]
    rootfs: Option<RawRootfs>,
}

#[derive(Deserialize)]
struct RawRootfs {
    #[serde(default)]
    diff_ids: Vec<String>,
}

impl ImageConfig {
    pub fn parse(bytes: &[u8], what: &str) -> Result<Self> {
        let raw: RawConfig =
            serde_json::from_slice(bytes).with_context(|| format!("{what} is not a valid OCI image configuration"))?;
        let created = match raw.created.as_deref() {
            Some(s) if !s.is_empty() => {
                Some(crate::util::time::parse_rfc3339(s).with_context(|| format!("{what}: field `created` ({s:?})"))?)
            }
            _ => None,
        };
        let diff_ids = raw
            .rootfs
            .map(|r| r.diff_ids)
            .unwrap_or_default()
            .iter()
            .map(|d| Digest::parse(d))
            .collect::<Result<Vec<_>>>()
            .with_context(|| format!("{what}: field `rootfs.diff_ids`"))?;
        Ok(ImageConfig { architecture: raw.architecture.unwrap_or_default(), created, diff_ids })
    }

    /// A plain rootfs has no config: [`super::resolve`] gives it the architecture asked for.
    pub fn for_rootfs() -> Self {
        ImageConfig { architecture: String::new(), created: None, diff_ids: vec![] }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_fields() {
        let c = ImageConfig::parse(
            br#"{"architecture":"arm64","created":"2023-11-14T22:13:20Z","rootfs":{"type":"layers","diff_ids":[]}}"#,
            "config",
        )
        .unwrap();
        assert_eq!(c.architecture, "arm64");
        assert_eq!(c.created, Some(1_700_000_000));
        let err = ImageConfig::parse(b"{", "config blob").unwrap_err().to_string();
        assert!(err.contains("config blob"), "{err}");
    }
}
