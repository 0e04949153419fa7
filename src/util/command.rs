//! The one way kiln runs external programs (make, skopeo, xorriso, ldd …) and finds them on `PATH`.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

/// Runs a command to completion; on failure the error carries the command line and the tail of
/// its stderr, so a user sees what ran and why it failed.
pub fn run_command(cmd: &mut Command) -> Result<std::process::Output> {
    pin_clock_and_locale(cmd);
    let shown = shown(cmd);
    let out = cmd.output().with_context(|| format!("starting {shown}"))?;
    if !out.status.success() {
        bail!("{shown} failed ({}):\n{}", out.status, tail(&out.stderr, 20));
    }
    Ok(out)
}

/// The command line of `cmd` for messages: program and arguments, quoted, never the environment it is given
/// (where a caller may pass a secret).
pub fn shown(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| format!("{:?}", a.to_string_lossy()))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs `cmd` in UTC with the C locale. Tools that write times or text into kiln's outputs (mtools stamps FAT
/// directory entries in local time, version lines are translated) would otherwise give other bytes, or another
/// store hash, under another `TZ` or `LANG`. `UTC0` is a POSIX rule, so it needs no zoneinfo file.
pub fn pin_clock_and_locale(cmd: &mut Command) -> &mut Command {
    cmd.env("TZ", "UTC0").env("LC_ALL", "C").env_remove("LANGUAGE")
}

/// The last `lines` lines of a byte buffer, as text.
pub fn tail(bytes: &[u8], lines: usize) -> String {
    let text = String::from_utf8_lossy(bytes);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Finds `program` on `path` (`$PATH` when `None`): the first executable regular file of that name. An absolute
/// `program` is checked as it is.
pub fn which(program: &str, path: Option<&OsStr>) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt as _;
    let executable =
        |p: &Path| p.metadata().map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0).unwrap_or(false);
    if program.starts_with('/') {
        let p = PathBuf::from(program);
        return executable(&p).then_some(p);
    }
    let from_env;
    let path = match path {
        Some(p) => p,
        None => {
            from_env = std::env::var_os("PATH").unwrap_or_else(|| "/usr/sbin:/usr/bin:/sbin:/bin".into());
            from_env.as_os_str()
        }
    };
    std::env::split_paths(path).map(|dir| dir.join(program)).find(|p| executable(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn which_finds_executables_only() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("tool"), "#!/bin/sh\n").unwrap();
        std::fs::write(d.path().join("data"), "x").unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(d.path().join("tool"), std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(which("tool", Some(d.path().as_os_str())), Some(d.path().join("tool")));
        assert_eq!(which("data", Some(d.path().as_os_str())), None);
        assert_eq!(which("sh", None).map(|p| p.file_name().unwrap().to_owned()), Some("sh".into()));
    }

    #[test]
    fn failures_carry_the_command_and_its_stderr() {
        let err = run_command(Command::new("sh").args(["-c", "echo oops >&2; exit 3"])).unwrap_err().to_string();
        assert!(err.contains("\"sh\"") && err.contains("oops"), "{err}");
        let mut secret = Command::new("false");
        secret.env("KILN_BMC_PASSWORD", "hunter2");
        let err = format!("{:#}", run_command(&mut secret).unwrap_err());
        assert!(err.contains("\"false\"") && !err.contains("hunter2"), "{err}");
    }
}
