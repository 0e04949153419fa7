//! iPXE make targets (`bin-x86_64-efi/snponly.efi`): what platform builds them, with which
//! cross compiler, which tools they need, and the file name they get outside the build tree.

use std::fmt;

use anyhow::{bail, Result};

/// The targets built when none are named: what PXE firmware of x86 BIOS, x86 UEFI and arm64
/// UEFI machines load (the same set Warewulf installs).
pub const DEFAULT_TARGETS: [&str; 3] =
    ["bin-x86_64-efi/snponly.efi", "bin-x86_64-pcbios/undionly.kpxe", "bin-arm64-efi/snponly.efi"];

/// One file iPXE's make can build: `<build dir>/<file>`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Target {
    /// `bin-x86_64-efi`, or plain `bin` (i386 BIOS, iPXE's historical default).
    pub dir: String,
    /// iPXE's architecture name: `x86_64`, `i386`, `arm64`, `arm32`, `riscv64`, `loong64` …
    pub arch: String,
    /// `efi`, `pcbios`, `sbi`, `linux` …
    pub platform: String,
    /// `snponly.efi`, `undionly.kpxe`, `ipxe.iso` …
    pub file: String,
}

impl Target {
    /// Parses `bin-ARCH-PLATFORM/FILE` (or `bin/FILE`).
    pub fn parse(s: &str) -> Result<Target> {
        let example = "e.g. bin-x86_64-efi/snponly.efi or bin-x86_64-pcbios/undionly.kpxe";
        let Some((dir, file)) = s.split_once('/') else {
            bail!("target {s:?} must name a build directory and a file ({example})");
        };
        let safe = |t: &str| !t.is_empty() && t.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
        if !safe(file) || file.starts_with('.') || !file.contains('.') {
            bail!("target {s:?}: {file:?} is not an iPXE image file name like snponly.efi, undionly.kpxe or ipxe.iso");
        }
        let (arch, platform) = if dir == "bin" {
            ("i386", "pcbios")
        } else {
            match dir.strip_prefix("bin-").and_then(|rest| rest.rsplit_once('-')) {
                Some((arch, platform)) if safe(arch) && safe(platform) => (arch, platform),
                _ => bail!("target {s:?}: {dir:?} is not an iPXE build directory bin-ARCH-PLATFORM ({example})"),
            }
        };
        if !KNOWN_ARCHES.contains(&arch) {
            bail!("target {s:?}: unknown architecture {arch:?} (iPXE has {})", KNOWN_ARCHES.join(", "));
        }
        Ok(Target {
            dir: dir.to_string(),
            arch: arch.to_string(),
            platform: platform.to_string(),
            file: file.to_string(),
        })
    }

    /// The name outside the build tree, as Warewulf installs it: `bin-x86_64-efi-snponly.efi`.
    pub fn flat_name(&self) -> String {
        format!("{}-{}", self.dir, self.file)
    }

    pub fn is_efi(&self) -> bool {
        self.platform == "efi"
    }

    /// The file-system image kinds need more than a compiler (see [`image_tools`]).
    fn extension(&self) -> &str {
        self.file.rsplit_once('.').map(|(_, e)| e).unwrap_or("")
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.dir, self.file)
    }
}

const KNOWN_ARCHES: [&str; 8] = ["i386", "x86_64", "arm32", "arm64", "riscv32", "riscv64", "loong64", "s390x"];

/// A program (or file) a build needs, and the Debian/Ubuntu package that provides it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Requirement {
    /// A program looked up in PATH, or an absolute path of a file that must exist.
    pub what: String,
    pub package: &'static str,
}

impl Requirement {
    fn program(what: impl Into<String>, package: &'static str) -> Self {
        Requirement { what: what.into(), package }
    }
}

/// The `CROSS=` prefix for building `arch` on a machine of `host_arch` (Rust's names:
/// `x86_64`, `aarch64`), and the package with that compiler. `None`: the host compiler builds it.
pub fn cross_prefix(arch: &str, host_arch: &str) -> Result<Option<(&'static str, &'static str, &'static str)>> {
    // (prefix, gcc package, binutils package)
    let native = match arch {
        "x86_64" | "i386" => matches!(host_arch, "x86_64" | "x86"),
        "arm64" => host_arch == "aarch64",
        "arm32" => host_arch == "arm",
        "riscv64" => host_arch == "riscv64",
        "loong64" => host_arch == "loongarch64",
        "s390x" => host_arch == "s390x",
        _ => false,
    };
    if native {
        return Ok(None);
    }
    Ok(Some(match arch {
        "x86_64" => ("x86_64-linux-gnu-", "gcc-x86-64-linux-gnu", "binutils-x86-64-linux-gnu"),
        "i386" => ("i686-linux-gnu-", "gcc-i686-linux-gnu", "binutils-i686-linux-gnu"),
        "arm64" => ("aarch64-linux-gnu-", "gcc-aarch64-linux-gnu", "binutils-aarch64-linux-gnu"),
        "arm32" => ("arm-linux-gnueabihf-", "gcc-arm-linux-gnueabihf", "binutils-arm-linux-gnueabihf"),
        "riscv64" => ("riscv64-linux-gnu-", "gcc-riscv64-linux-gnu", "binutils-riscv64-linux-gnu"),
        "loong64" => ("loongarch64-linux-gnu-", "gcc-loongarch64-linux-gnu", "binutils-loongarch64-linux-gnu"),
        "s390x" => ("s390x-linux-gnu-", "gcc-s390x-linux-gnu", "binutils-s390x-linux-gnu"),
        other => bail!("no known cross compiler builds iPXE's {other} on a {host_arch} machine"),
    }))
}

/// Everything building `target` on a `host_arch` machine needs.
pub fn requirements(target: &Target, host_arch: &str) -> Result<Vec<Requirement>> {
    let mut reqs = vec![
        Requirement::program("make", "make"),
        Requirement::program("perl", "perl"),
        // iPXE's helper programs (zbin, elf2efi) are built with the host compiler.
        Requirement::program("gcc", "gcc"),
    ];
    match cross_prefix(&target.arch, host_arch)? {
        None => {
            reqs.push(Requirement::program("ld", "binutils"));
            reqs.push(Requirement::program("objcopy", "binutils"));
        }
        Some((prefix, gcc, binutils)) => {
            reqs.push(Requirement::program(format!("{prefix}gcc"), gcc));
            reqs.push(Requirement::program(format!("{prefix}ld"), binutils));
            reqs.push(Requirement::program(format!("{prefix}objcopy"), binutils));
        }
    }
    if !target.is_efi() {
        // zbin, which compresses every non-EFI image, links liblzma.
        reqs.push(Requirement::program("/usr/include/lzma.h", "liblzma-dev"));
    }
    reqs.extend(image_tools(target));
    Ok(reqs)
}

/// What util/genfsimg needs for the disk and CD images.
fn image_tools(target: &Target) -> Vec<Requirement> {
    let mut reqs = Vec::new();
    let ext = target.extension();
    if matches!(ext, "iso" | "usb" | "img") && target.is_efi() || ext == "usb" {
        reqs.push(Requirement::program("mformat", "mtools"));
        reqs.push(Requirement::program("mcopy", "mtools"));
    }
    if ext == "iso" {
        reqs.push(Requirement::program("xorriso", "xorriso"));
        if target.platform == "pcbios" {
            reqs.push(Requirement::program("/usr/lib/ISOLINUX/isolinux.bin", "isolinux"));
        }
    }
    if ext == "usb" && target.platform == "pcbios" {
        reqs.push(Requirement::program("syslinux", "syslinux"));
    }
    reqs
}

/// The message for a target that cannot be built because `req` is missing.
pub fn missing_message(target: &Target, req: &Requirement) -> String {
    format!("{target}: {} not found; install {} (Debian/Ubuntu)", req.what, req.package)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_flattens_targets() {
        let t = Target::parse("bin-x86_64-efi/snponly.efi").unwrap();
        assert_eq!((t.arch.as_str(), t.platform.as_str(), t.file.as_str()), ("x86_64", "efi", "snponly.efi"));
        assert_eq!(t.flat_name(), "bin-x86_64-efi-snponly.efi");
        assert_eq!(t.to_string(), "bin-x86_64-efi/snponly.efi");
        let names: Vec<String> = DEFAULT_TARGETS.iter().map(|s| Target::parse(s).unwrap().flat_name()).collect();
        assert_eq!(
            names,
            ["bin-x86_64-efi-snponly.efi", "bin-x86_64-pcbios-undionly.kpxe", "bin-arm64-efi-snponly.efi"]
        );
        let legacy = Target::parse("bin/ipxe.lkrn").unwrap();
        assert_eq!((legacy.arch.as_str(), legacy.platform.as_str()), ("i386", "pcbios"));
        assert_eq!(legacy.flat_name(), "bin-ipxe.lkrn");
    }

    #[test]
    fn refuses_malformed_targets() {
        for (bad, why) in [
            ("ipxe.efi", "must name a build directory"),
            ("bin-x86_64-efi/", "not an iPXE image file name"),
            ("bin-x86_64-efi/../x.efi", "not an iPXE image file name"),
            ("bin-x86_64-efi/sub/x.efi", "not an iPXE image file name"),
            ("build/ipxe.efi", "not an iPXE build directory"),
            ("bin-mips-efi/ipxe.efi", "unknown architecture"),
        ] {
            let err = Target::parse(bad).unwrap_err().to_string();
            assert!(err.contains(why), "{bad}: {err}");
        }
    }

    #[test]
    fn cross_compilers_by_host() {
        assert_eq!(cross_prefix("x86_64", "x86_64").unwrap(), None);
        assert_eq!(cross_prefix("i386", "x86_64").unwrap(), None);
        assert_eq!(cross_prefix("arm64", "x86_64").unwrap().unwrap().0, "aarch64-linux-gnu-");
        assert_eq!(cross_prefix("arm64", "aarch64").unwrap(), None);
        assert_eq!(cross_prefix("x86_64", "aarch64").unwrap().unwrap().0, "x86_64-linux-gnu-");
        assert!(cross_prefix("riscv32", "x86_64").unwrap_err().to_string().contains("no known cross compiler"));
    }

    #[test]
    fn requirements_name_their_packages() {
        let arm = Target::parse("bin-arm64-efi/snponly.efi").unwrap();
        let reqs = requirements(&arm, "x86_64").unwrap();
        let gcc = reqs.iter().find(|r| r.what == "aarch64-linux-gnu-gcc").unwrap();
        assert_eq!(
            missing_message(&arm, gcc),
            "bin-arm64-efi/snponly.efi: aarch64-linux-gnu-gcc not found; install gcc-aarch64-linux-gnu (Debian/Ubuntu)"
        );
        assert!(!reqs.iter().any(|r| r.package == "liblzma-dev"), "EFI images are not compressed by zbin");
        let bios = Target::parse("bin-x86_64-pcbios/undionly.kpxe").unwrap();
        let reqs = requirements(&bios, "x86_64").unwrap();
        let lzma = reqs.iter().find(|r| r.package == "liblzma-dev").unwrap();
        assert_eq!(
            missing_message(&bios, lzma),
            "bin-x86_64-pcbios/undionly.kpxe: /usr/include/lzma.h not found; install liblzma-dev (Debian/Ubuntu)"
        );
        let iso = Target::parse("bin-x86_64-pcbios/ipxe.iso").unwrap();
        let pkgs: Vec<_> = requirements(&iso, "x86_64").unwrap().iter().map(|r| r.package).collect();
        assert!(pkgs.contains(&"xorriso") && pkgs.contains(&"isolinux"), "{pkgs:?}");
    }
}
