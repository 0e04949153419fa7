//! The transport: skopeo, run as a program. It is already what kiln reads `docker://` sources with, and it
//! brings what sites have set up for podman and skopeo: the containers auth file (`--authfile`), credential
//! helpers, `registries.conf` (mirrors, `insecure = true`), and `--tls-verify=false` for a plain-HTTP registry.
//! skopeo 1.9.3 (Debian 12) copies kiln's artifacts between a registry and an OCI layout keeping the manifest's
//! bytes, checks each blob's digest as it copies, and asks the registry for each blob (HEAD) before it uploads
//! it, so a blob the registry holds is never sent again.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::image::RegistryOptions;
use crate::util::{pin_clock_and_locale, tail};

/// What asking for a tag found.
#[derive(Debug)]
pub enum Probe {
    /// The tag's manifest, as the registry holds it.
    Found(Vec<u8>),
    /// The registry answered: no such tag (or repository).
    Missing,
}

fn skopeo(timeout: Duration) -> Result<Command> {
    if crate::util::which("skopeo", None).is_none() {
        bail!("skopeo not found: kiln talks to registries through it (on Debian/Ubuntu: apt-get install skopeo)");
    }
    let mut cmd = Command::new("skopeo");
    pin_clock_and_locale(&mut cmd);
    cmd.arg("--command-timeout").arg(format!("{}s", timeout.as_secs().max(1)));
    Ok(cmd)
}

fn is_docker(reference: &str) -> bool {
    reference.starts_with("docker://")
}

/// What went wrong, from skopeo's last error line (`time=… level=fatal msg="…"`): the message, unquoted.
fn reason(stderr: &[u8]) -> String {
    let text = tail(stderr, 5);
    let line = text.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("skopeo failed").trim();
    match line.split_once("msg=\"") {
        Some((_, msg)) => msg.strip_suffix('"').unwrap_or(msg).replace("\\\"", "\""),
        None => line.to_string(),
    }
}

fn missing(stderr: &str) -> bool {
    let s = stderr.to_ascii_lowercase();
    ["manifest unknown", "name unknown", "not found", "no descriptor found", "no such file or directory"]
        .iter()
        .any(|m| s.contains(m))
}

/// Fetches the manifest `reference` names (`docker://host/repo:tag`, `oci:DIR:tag`), or learns it is not there.
pub fn probe(reference: &str, opts: &RegistryOptions, timeout: Duration) -> Result<Probe> {
    let mut cmd = skopeo(timeout)?;
    cmd.args(["inspect", "--raw", "--retry-times", "0"]);
    if is_docker(reference) {
        cmd.arg(format!("--tls-verify={}", opts.tls_verify));
        if let Some(a) = &opts.authfile {
            cmd.arg("--authfile").arg(a);
        }
    }
    cmd.arg(reference);
    let out = cmd.output().with_context(|| format!("running skopeo inspect {reference}"))?;
    if out.status.success() {
        return Ok(Probe::Found(out.stdout));
    }
    let err = String::from_utf8_lossy(&out.stderr);
    if missing(&err) {
        return Ok(Probe::Missing);
    }
    bail!("{}", reason(&out.stderr))
}

/// Copies the artifact `from` to `to` (one of them an OCI layout `oci:DIR:TAG`), blobs verified by skopeo.
pub fn copy(from: &str, to: &str, opts: &RegistryOptions, timeout: Duration) -> Result<()> {
    let mut cmd = skopeo(timeout)?;
    cmd.args(["copy", "--quiet", "--retry-times", "0", "--preserve-digests"]);
    for (side, reference) in [("src", from), ("dest", to)] {
        if is_docker(reference) {
            cmd.arg(format!("--{side}-tls-verify={}", opts.tls_verify));
            if let Some(a) = &opts.authfile {
                cmd.arg(format!("--{side}-authfile")).arg(a);
            }
        }
    }
    cmd.arg(from).arg(to);
    let out = cmd.output().with_context(|| format!("running skopeo copy {from} {to}"))?;
    if !out.status.success() {
        bail!("copying {from} to {to}: {}", reason(&out.stderr));
    }
    Ok(())
}

/// `oci:DIR:TAG` for skopeo.
pub fn layout_ref(dir: &Path, tag: &str) -> String {
    format!("oci:{}:{tag}", dir.display())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_tags_are_told_from_failures() {
        assert!(missing("reading manifest x in 127.0.0.1:5000/kiln: manifest unknown: manifest unknown"));
        assert!(missing("initializing source docker://h/r:t: reading manifest t in h/r: name unknown: repository name not known to registry"));
        assert!(!missing("pinging container registry 127.0.0.1:1: Get \"https://127.0.0.1:1/v2/\": dial tcp 127.0.0.1:1: connect: connection refused"));
        assert_eq!(reason(b"time=\"x\" level=fatal msg=\"a \\\"b\\\": boom\"\n"), "a \"b\": boom");
        assert_eq!(reason(b"plain failure\n"), "plain failure");
    }
}
