//! The parts of an OCI image configuration (image-spec `config.md`) kiln uses.

use anyhow::{bail, Context, Result};
use serde::Deserialize;

use crate::util::Digest;

#[derive(Debug, Clone, Default)]
pub struct ImageConfig {
    /// OCI architecture name (`amd64`, `arm64`).
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
                Some(parse_rfc3339(s).with_context(|| format!("{what}: field `created` ({s:?})"))?)
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
        Ok(ImageConfig {
            architecture: raw.architecture.unwrap_or_else(|| super::host_oci_arch().to_string()),
            created,
            diff_ids,
        })
    }

    /// A plain rootfs has no config: it is taken to be for the host's architecture.
    pub fn for_rootfs() -> Self {
        ImageConfig { architecture: super::host_oci_arch().to_string(), created: None, diff_ids: vec![] }
    }
}

/// Parses the RFC 3339 timestamps found in image configs (`2023-11-14T22:13:20.123Z`,
/// `...+02:00`) into seconds since the epoch.
pub fn parse_rfc3339(s: &str) -> Result<i64> {
    let b = s.as_bytes();
    let num = |r: std::ops::Range<usize>| -> Result<i64> {
        let part = s.get(r).context("too short")?;
        if !part.bytes().all(|c| c.is_ascii_digit()) {
            bail!("expected digits, found {part:?}");
        }
        Ok(part.parse()?)
    };
    if b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b'T' | b't' | b' ')
        || b[13] != b':'
        || b[16] != b':'
    {
        bail!("not an RFC 3339 timestamp");
    }
    let (y, mo, d, h, mi, sec) = (num(0..4)?, num(5..7)?, num(8..10)?, num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || sec > 60 {
        bail!("date or time out of range");
    }
    let mut i = 19;
    if b.get(i) == Some(&b'.') {
        i += 1;
        while b.get(i).is_some_and(|c| c.is_ascii_digit()) {
            i += 1;
        }
    }
    let offset = match b.get(i) {
        Some(b'Z' | b'z') if i + 1 == b.len() => 0,
        Some(sign @ (b'+' | b'-')) if i + 6 == b.len() && b[i + 3] == b':' => {
            let off = num(i + 1..i + 3)? * 3600 + num(i + 4..i + 6)? * 60;
            if *sign == b'+' {
                off
            } else {
                -off
            }
        }
        _ => bail!("missing or malformed time zone"),
    };
    Ok(days_from_civil(y, mo, d) * 86400 + h * 3600 + mi * 60 + sec - offset)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146097 + doe - 719468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_forms() {
        assert_eq!(parse_rfc3339("2023-11-14T22:13:20Z").unwrap(), 1_700_000_000);
        assert_eq!(parse_rfc3339("2023-11-14T22:13:20.999999999Z").unwrap(), 1_700_000_000);
        assert_eq!(parse_rfc3339("2023-11-15T00:13:20+02:00").unwrap(), 1_700_000_000);
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z").unwrap(), 0);
        assert!(parse_rfc3339("2023-11-14").is_err());
        assert!(parse_rfc3339("2023-13-14T22:13:20Z").is_err());
        assert!(parse_rfc3339("2023-11-14T22:13:20").is_err());
    }

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
