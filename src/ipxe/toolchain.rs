//! The compilers and tools a target needs: checked before building (a missing one fails only its targets,
//! naming the Debian package), and identified by version (part of each target's store hash).

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs;
use std::process::Command;

use anyhow::{bail, Context, Result};

use super::build::BuildOptions;
use super::target::{self, Target};

/// The first line of `program --version`.
fn version_line(program: &str, path: &OsString) -> Result<String> {
    let out = Command::new(program)
        .arg("--version")
        .env("PATH", path)
        .env("LC_ALL", "C")
        .output()
        .with_context(|| format!("running {program} --version"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().next().unwrap_or("").trim().to_string();
    if !out.status.success() || line.is_empty() {
        bail!("{program} --version printed no version");
    }
    Ok(line)
}

/// The liblzma version zbin compresses with (the compressed bytes may change with it).
fn lzma_version() -> String {
    let text = fs::read_to_string("/usr/include/lzma/version.h").unwrap_or_default();
    let num = |key: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix("#define ")?.strip_prefix(key)?.trim().parse::<u32>().ok())
            .map(|n| n.to_string())
            .unwrap_or_else(|| "?".into())
    };
    format!("{}.{}.{}", num("LZMA_VERSION_MAJOR"), num("LZMA_VERSION_MINOR"), num("LZMA_VERSION_PATCH"))
}

/// Checks what `target` needs and returns its toolchain's identity (versions that change the
/// output) and its `CROSS=` prefix; the error names what is missing and which package has it.
pub fn toolchain(target: &Target, opts: &BuildOptions) -> Result<(BTreeMap<String, String>, Option<String>)> {
    let reqs = target::requirements(target, &opts.host_arch)?;
    let missing: Vec<String> = reqs
        .iter()
        .filter(|r| crate::util::which(&r.what, Some(&opts.path)).is_none())
        .map(|r| target::missing_message(target, r))
        .collect();
    if !missing.is_empty() {
        bail!("{}", missing.join("\n"));
    }
    let cross = target::cross_prefix(&target.arch, &opts.host_arch)?.map(|(p, _, _)| p.to_string());
    let prefix = cross.as_deref().unwrap_or("");
    let mut versions = BTreeMap::new();
    versions.insert("host_gcc".to_string(), version_line("gcc", &opts.path)?);
    versions.insert("gcc".to_string(), version_line(&format!("{prefix}gcc"), &opts.path)?);
    versions.insert("ld".to_string(), version_line(&format!("{prefix}ld"), &opts.path)?);
    if !target.is_efi() {
        versions.insert("liblzma".to_string(), lzma_version());
    }
    Ok((versions, cross))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_tools_fail_only_their_targets() {
        let bin = tempfile::tempdir().unwrap();
        // A PATH with a host toolchain but no cross compiler.
        for tool in ["make", "perl", "gcc", "ld", "objcopy"] {
            let p = bin.path().join(tool);
            fs::write(&p, format!("#!/bin/sh\necho '{tool} (fake) 1.0'\n")).unwrap();
            use std::os::unix::fs::PermissionsExt as _;
            fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
        }
        let mut opts = BuildOptions::new(2);
        opts.host_arch = "x86_64".into();
        opts.path = bin.path().as_os_str().to_owned();
        let (versions, cross) = toolchain(&Target::parse("bin-x86_64-efi/snponly.efi").unwrap(), &opts).unwrap();
        assert_eq!(cross, None);
        assert_eq!(versions["gcc"], "gcc (fake) 1.0");
        let err = toolchain(&Target::parse("bin-arm64-efi/snponly.efi").unwrap(), &opts).unwrap_err().to_string();
        assert_eq!(
            err,
            "bin-arm64-efi/snponly.efi: aarch64-linux-gnu-gcc not found; install gcc-aarch64-linux-gnu (Debian/Ubuntu)\n\
             bin-arm64-efi/snponly.efi: aarch64-linux-gnu-ld not found; install binutils-aarch64-linux-gnu (Debian/Ubuntu)\n\
             bin-arm64-efi/snponly.efi: aarch64-linux-gnu-objcopy not found; install binutils-aarch64-linux-gnu (Debian/Ubuntu)"
        );
    }
}
