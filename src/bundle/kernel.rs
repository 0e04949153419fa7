//! Finding the kernel inside an image, as Warewulf does: `/boot/vmlinuz-*`,
//! `/lib/modules/*/vmlinuz` (also under `/usr`), `/boot/Image-*`; the highest version wins;
//! rescue, debug and kdump kernels and signature/hmac files are skipped.

use std::cmp::Ordering;

use anyhow::{bail, Context, Result};

use crate::image::tree::{show, Kind, Tree};

/// Which kernel a recipe asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KernelSpec {
    Auto,
    Path(String),
}

impl KernelSpec {
    pub fn parse(s: &str) -> Self {
        if s == "auto" || s.is_empty() {
            KernelSpec::Auto
        } else {
            KernelSpec::Path(s.to_string())
        }
    }

    pub fn as_str(&self) -> &str {
        match self {
            KernelSpec::Auto => "auto",
            KernelSpec::Path(p) => p,
        }
    }
}

#[derive(Debug, Clone)]
pub struct FoundKernel {
    /// Path inside the image (symlinks resolved), without the leading `/`.
    pub path: Vec<u8>,
    pub version: String,
}

/// The version a kernel path encodes, if it is a path kernels are found at.
fn candidate_version(path: &[u8]) -> Option<String> {
    let p = std::str::from_utf8(path).ok()?;
    let ver = if let Some(v) = p.strip_prefix("boot/vmlinuz-") {
        v
    } else if let Some(v) = p.strip_prefix("boot/Image-") {
        v
    } else {
        let rest = p.strip_prefix("lib/modules/").or_else(|| p.strip_prefix("usr/lib/modules/"))?;
        rest.strip_suffix("/vmlinuz")?
    };
    if ver.is_empty() || ver.contains('/') {
        return None;
    }
    let lower = ver.to_ascii_lowercase();
    let skip = ["rescue", "debug", "kdump", ".hmac", ".sig", ".old", ".bak"];
    if skip.iter().any(|s| lower.contains(s)) {
        return None;
    }
    Some(ver.to_string())
}

/// Compares versions piecewise: runs of digits numerically, other runs bytewise.
pub fn compare_versions(a: &str, b: &str) -> Ordering {
    fn chunks(s: &str) -> Vec<(bool, &str)> {
        let mut out = Vec::new();
        let mut start = 0;
        let bytes = s.as_bytes();
        for i in 1..=bytes.len() {
            if i == bytes.len() || bytes[i].is_ascii_digit() != bytes[start].is_ascii_digit() {
                out.push((bytes[start].is_ascii_digit(), &s[start..i]));
                start = i;
            }
        }
        out
    }
    let (ca, cb) = (chunks(a), chunks(b));
    for (x, y) in ca.iter().zip(&cb) {
        let ord = match (x, y) {
            ((true, x), (true, y)) => {
                let (x, y) = (x.trim_start_matches('0'), y.trim_start_matches('0'));
                x.len().cmp(&y.len()).then_with(|| x.cmp(y))
            }
            ((_, x), (_, y)) => x.cmp(y),
        };
        if ord != Ordering::Equal {
            return ord;
        }
    }
    ca.len().cmp(&cb.len())
}

pub fn find(tree: &Tree, spec: &KernelSpec) -> Result<FoundKernel> {
    match spec {
        KernelSpec::Path(p) => {
            let (real, node) = tree
                .resolve(p.as_bytes())
                .with_context(|| format!("the kernel named in the recipe ({p}) is not in the image"))?;
            if !matches!(node.kind, Kind::File { .. }) {
                bail!("the kernel named in the recipe ({p}) is not a regular file");
            }
            let version =
                candidate_version(&real).or_else(|| only_module_dir(tree)).unwrap_or_else(|| "unknown".into());
            Ok(FoundKernel { path: real, version })
        }
        KernelSpec::Auto => {
            let mut best: Option<FoundKernel> = None;
            for (path, node) in &tree.nodes {
                let Some(version) = candidate_version(path) else { continue };
                let real = match node.kind {
                    Kind::File { .. } => path.clone(),
                    Kind::Symlink(_) => match tree.resolve(path) {
                        Ok((real, n)) if matches!(n.kind, Kind::File { .. }) => real,
                        _ => continue,
                    },
                    _ => continue,
                };
                let better = best.as_ref().is_none_or(|b| compare_versions(&version, &b.version) == Ordering::Greater);
                if better {
                    best = Some(FoundKernel { path: real, version });
                }
            }
            best.context(
                "the image has no kernel (looked for /boot/vmlinuz-*, /lib/modules/*/vmlinuz, /boot/Image-*): \
                 install a kernel package in the image, or name the file with --kernel PATH (`kernel = \"PATH\"` in a recipe)",
            )
        }
    }
}

fn only_module_dir(tree: &Tree) -> Option<String> {
    let mut found = None;
    for path in tree.nodes.keys() {
        if let Some(rest) = path.strip_prefix(b"lib/modules/") {
            if !rest.contains(&b'/') {
                if found.is_some() {
                    return None;
                }
                found = Some(show(rest));
            }
        }
    }
    found
}

/// Checks that the kernel looks like one for `arch` (x86 bzImage header, arm64 Image magic or
/// an EFI zboot/gzip image), so a wrong file fails at build time, not at boot.
pub fn check_format(head: &[u8], arch: &str, path: &str) -> Result<()> {
    let at = |off: usize, magic: &[u8]| head.get(off..off + magic.len()) == Some(magic);
    let ok = match arch {
        "x86_64" | "amd64" => at(0x202, b"HdrS"),
        "aarch64" | "arm64" => at(0x38, b"ARM\x64") || at(4, b"zimg") || at(0, &[0x1f, 0x8b]),
        _ => true,
    };
    if !ok {
        bail!("/{path} does not look like a Linux kernel for {arch}; name the right file with `kernel = ...`");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_compare_numerically() {
        assert_eq!(compare_versions("6.1.0-28-amd64", "6.1.0-9-amd64"), Ordering::Greater);
        assert_eq!(compare_versions("5.14.0-362.el9", "5.14.0-70.el9"), Ordering::Greater);
        assert_eq!(compare_versions("6.1", "6.1.0"), Ordering::Less);
        assert_eq!(compare_versions("6.1.0", "6.1.0"), Ordering::Equal);
    }

    #[test]
    fn candidates_skip_rescue_and_debug() {
        assert_eq!(candidate_version(b"boot/vmlinuz-6.1.0-28-amd64").as_deref(), Some("6.1.0-28-amd64"));
        assert_eq!(candidate_version(b"lib/modules/5.14.0/vmlinuz").as_deref(), Some("5.14.0"));
        assert_eq!(candidate_version(b"usr/lib/modules/5.14.0/vmlinuz").as_deref(), Some("5.14.0"));
        assert_eq!(candidate_version(b"boot/Image-6.6.0").as_deref(), Some("6.6.0"));
        assert_eq!(candidate_version(b"boot/vmlinuz-0-rescue-abc"), None);
        assert_eq!(candidate_version(b"boot/vmlinuz-5.14.0+debug"), None);
        assert_eq!(candidate_version(b"boot/.vmlinuz-5.14.0.hmac"), None);
        assert_eq!(candidate_version(b"boot/config-6.1.0"), None);
    }

    #[test]
    fn x86_kernels_need_the_boot_header() {
        let mut head = vec![0u8; 1024];
        assert!(check_format(&head, "x86_64", "boot/vmlinuz-x").is_err());
        head[0x202..0x206].copy_from_slice(b"HdrS");
        assert!(check_format(&head, "x86_64", "boot/vmlinuz-x").is_ok());
    }
}
