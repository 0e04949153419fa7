//! What two-stage loaders report: `GET /loader/{mac}?step=STEP&detail=TEXT`, one request per step, recorded as
//! a `loader` boot event of that machine (`kiln node events`).
//!
//! Kept small and bounded: a fixed set of steps, a detail of at most [`MAX_DETAIL`] printable bytes, accepted
//! only from the machine's own address (as overlays are, see `http::overlay_allowed`), and recorded through
//! the boot log's bounded queue with the per-machine event cap.

/// The steps a loader reports, in the order it goes through them.
pub const STEPS: &[&str] = &[
    "started",     // the loader runs, its network is up
    "fetched",     // the image arrived: bytes and seconds
    "verified",    // its sha256 matched the manifest's
    "mismatch",    // its sha256 did not (or it was truncated): the loader retries
    "installed",   // written to the node's disk
    "reused",      // the node's disk already held this image: nothing fetched
    "refused",     // the disk holds data kiln did not write
    "failed",      // the loader gave up: the node stays stopped
    "switch_root", // handing over to the image's init
];

/// Longest detail kept, in bytes.
pub const MAX_DETAIL: usize = 300;

/// Reads `step` and `detail` from a report's query string; the event detail to record, or why the report is
/// refused.
pub fn parse_report(query: &str) -> Result<String, String> {
    let mut step = None;
    let mut detail = String::new();
    for pair in query.split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let v = decode(v);
        match k {
            "step" => step = Some(v),
            "detail" => detail = v,
            _ => {}
        }
    }
    let step = step.ok_or("a loader report needs ?step=")?;
    if !STEPS.contains(&step.as_str()) {
        return Err(format!("unknown step {:?} (known: {})", clip(&step, 32), STEPS.join(", ")));
    }
    let detail = clip(&detail, MAX_DETAIL);
    Ok(if detail.is_empty() { step } else { format!("{step} {detail}") })
}

/// `%XX` and `+` decoded; anything that is not printable ASCII becomes `?` (it ends up in logs and terminals).
fn decode(v: &str) -> String {
    let b = v.as_bytes();
    let mut out = String::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let c = match b[i] {
            b'%' if i + 2 < b.len() => {
                match u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("zz"), 16) {
                    Ok(v) => {
                        i += 2;
                        v
                    }
                    Err(_) => b'%',
                }
            }
            b'+' => b' ',
            c => c,
        };
        out.push(if (0x20..0x7f).contains(&c) { c as char } else { '?' });
        i += 1;
    }
    out
}

fn clip(s: &str, max: usize) -> String {
    // `s` is ASCII by now (decode), so any byte index is a char boundary.
    s[..s.len().min(max)].trim().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_are_checked_and_bounded() {
        assert_eq!(
            parse_report("step=fetched&detail=image+12345+bytes+in+2.0s").unwrap(),
            "fetched image 12345 bytes in 2.0s"
        );
        assert_eq!(parse_report("step=switch_root").unwrap(), "switch_root");
        assert_eq!(parse_report("detail=x&step=mismatch&junk").unwrap(), "mismatch x");
        assert!(parse_report("detail=x").unwrap_err().contains("?step="));
        assert!(parse_report("step=rm%20-rf").unwrap_err().contains("unknown step"));
        let long = format!("step=failed&detail={}", "a".repeat(5000));
        assert_eq!(parse_report(&long).unwrap().len(), "failed ".len() + MAX_DETAIL);
        assert_eq!(parse_report("step=failed&detail=%1b[31mred%0a%ff").unwrap(), "failed ?[31mred??");
        assert_eq!(parse_report("step=failed&detail=100%").unwrap(), "failed 100%");
    }
}
