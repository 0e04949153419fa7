//! Calendar time, in the two forms kiln meets: RFC 3339 timestamps in image configs, and UTC times it prints.

use anyhow::{Context, Result};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// Parses an RFC 3339 timestamp (`2023-11-14T22:13:20.123Z`, `...+02:00`) into seconds since the epoch.
pub fn parse_rfc3339(s: &str) -> Result<i64> {
    let t = OffsetDateTime::parse(s, &Rfc3339).with_context(|| format!("{s:?} is not an RFC 3339 timestamp"))?;
    Ok(t.unix_timestamp())
}

/// `YYYY-MM-DD HH:MM:SS` (UTC) of a unix time.
pub fn utc_time(secs: u64) -> String {
    let format = time::macros::format_description!("[year]-[month]-[day] [hour]:[minute]:[second]");
    i64::try_from(secs)
        .ok()
        .and_then(|s| OffsetDateTime::from_unix_timestamp(s).ok())
        .and_then(|t| t.format(&format).ok())
        .unwrap_or_else(|| format!("@{secs}"))
}

/// Seconds since the epoch, now.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_times() {
        assert_eq!(utc_time(0), "1970-01-01 00:00:00");
        assert_eq!(utc_time(951_782_400), "2000-02-29 00:00:00");
        assert_eq!(utc_time(1_700_000_000), "2023-11-14 22:13:20");
        assert_eq!(utc_time(4_107_542_399), "2100-02-28 23:59:59");
    }
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
}
