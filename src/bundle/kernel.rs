//! Finding the kernel inside an image, as Warewulf does: `/boot/vmlinuz-*`,
//! `/lib/modules/*/vmlinuz` (also under `/usr`), `/boot/Image-*`; the highest version wins;
//! rescue, debug and kdump kernels and signature/hmac files are skipped. The file found must be
//! a kernel for the image's architecture ([`check_format`]).

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

/// How many bytes of a kernel file [`detect_arch`] needs to see.
pub const HEAD_LEN: usize = 64 * 1024;

/// The architecture (Linux names: `x86_64`, `aarch64`) of a kernel from the first bytes of its
/// file, or `None` when they are not a kernel kiln knows: an x86 bzImage (`HdrS` at 0x202), an
/// arm64 `Image` (`ARM\x64` at 0x38), an EFI zboot image (`zimg` at 4; the PE header's machine
/// says which), or a gzip'd one of these (as some distributions ship arm64's `vmlinuz`).
pub fn detect_arch(head: &[u8]) -> Option<&'static str> {
    let at = |off: usize, magic: &[u8]| head.get(off..off + magic.len()) == Some(magic);
    if at(0x202, b"HdrS") {
        return Some("x86_64");
    }
    if at(0x38, b"ARM\x64") {
        return Some("aarch64");
    }
    if at(0, b"MZ") && at(4, b"zimg") {
        let pe = u32::from_le_bytes(head.get(0x3c..0x40)?.try_into().ok()?) as usize;
        if !at(pe, b"PE\0\0") {
            return None;
        }
        return match u16::from_le_bytes(head.get(pe + 4..pe + 6)?.try_into().ok()?) {
            0xaa64 => Some("aarch64"),
            0x8664 => Some("x86_64"),
            _ => None,
        };
    }
    if at(0, &[0x1f, 0x8b]) {
        // Only the start is needed; a truncated stream still yields it.
        let mut inner = Vec::with_capacity(4096);
        let mut gz = flate2::read::GzDecoder::new(head);
        let mut buf = [0u8; 4096];
        while inner.len() < 4096 {
            match std::io::Read::read(&mut gz, &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => inner.extend_from_slice(&buf[..n]),
            }
        }
        // A gzip'd gzip is no kernel format (and would recurse).
        if inner.starts_with(&[0x1f, 0x8b]) {
            return None;
        }
        return detect_arch(&inner);
    }
    None
}

/// Checks that the kernel is one for `arch`, so a wrong file fails at build time, not at boot.
pub fn check_format(head: &[u8], arch: &str, path: &str) -> Result<()> {
    let want = match arch {
        "amd64" => "x86_64",
        "arm64" => "aarch64",
        a => a,
    };
    match detect_arch(head) {
        Some(found) if found == want => Ok(()),
        Some(found) => bail!(
            "/{path} is a kernel for {found}, but the image is for {want}: \
             the image's configuration names the wrong architecture, or `kernel = ...` names another machine's kernel"
        ),
        None => bail!(
            "/{path} does not look like a Linux kernel for {want} (no bzImage, arm64 Image, EFI zboot or gzip'd Image \
             header); name the right file with `kernel = ...`"
        ),
    }
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
        let err = check_format(&head, "aarch64", "boot/vmlinuz-x").unwrap_err().to_string();
        assert!(err.contains("a kernel for x86_64, but the image is for aarch64"), "{err}");
    }

    fn arm64_image() -> Vec<u8> {
        let mut head = vec![0u8; 2048];
        head[..2].copy_from_slice(b"MZ");
        head[0x38..0x3c].copy_from_slice(b"ARM\x64");
        head
    }

    #[test]
    fn arm64_kernels_plain_gzipped_and_zboot() {
        let plain = arm64_image();
        assert_eq!(detect_arch(&plain), Some("aarch64"));
        assert!(check_format(&plain, "arm64", "boot/Image-6.6").is_ok());

        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        std::io::Write::write_all(&mut gz, &plain).unwrap();
        std::io::Write::write_all(&mut gz, &vec![7u8; 100_000]).unwrap();
        let gz = gz.finish().unwrap();
        // Only the first bytes of the file are looked at.
        assert_eq!(detect_arch(&gz[..200.min(gz.len())]), Some("aarch64"));
        let err = check_format(&gz, "x86_64", "boot/vmlinuz-6.1").unwrap_err().to_string();
        assert!(err.contains("a kernel for aarch64, but the image is for x86_64"), "{err}");

        // EFI zboot: MZ, "zimg", then a PE header whose machine is arm64.
        let mut zboot = vec![0u8; 512];
        zboot[..2].copy_from_slice(b"MZ");
        zboot[4..8].copy_from_slice(b"zimg");
        zboot[0x3c..0x40].copy_from_slice(&0x80u32.to_le_bytes());
        zboot[0x80..0x84].copy_from_slice(b"PE\0\0");
        zboot[0x84..0x86].copy_from_slice(&0xaa64u16.to_le_bytes());
        assert_eq!(detect_arch(&zboot), Some("aarch64"));
        zboot[0x84..0x86].copy_from_slice(&0x5064u16.to_le_bytes());
        assert_eq!(detect_arch(&zboot), None);

        let err = check_format(b"not a kernel at all", "arm64", "boot/vmlinuz-x").unwrap_err().to_string();
        assert!(err.contains("does not look like a Linux kernel for aarch64"), "{err}");
    }
}
