//! A BMC's user and password: read from the node's `password_file` or `KILN_BMC_PASSWORD`, held so that no
//! `Debug`, log line or error can show the password, and handed to ipmitool as a file (never on its command line,
//! never in its environment: both are visible to other users or in kiln's own error messages).

use std::fmt;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::recipe::nodes::Bmc;

/// The environment variable read when a BMC has no `password_file`.
pub const PASSWORD_ENV: &str = "KILN_BMC_PASSWORD";

/// A password; `Debug` and `Display` show `***`.
#[derive(Clone)]
pub struct Password(String);

impl Password {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// Where a password came from (to name in messages; never the password itself).
#[derive(Debug, Clone)]
pub enum PasswordSource {
    File(PathBuf),
    Env,
}

/// A BMC login.
#[derive(Debug, Clone)]
pub struct Credentials {
    pub user: String,
    pub password: Password,
    pub source: PasswordSource,
}

impl Credentials {
    /// The user and password of `bmc`: its `password_file` (first line, without the line end), else
    /// `KILN_BMC_PASSWORD`.
    pub fn of(bmc: &Bmc) -> Result<Self> {
        let user = bmc.user.clone().context("no BMC user: set `user` in the node's or profile's bmc")?;
        if user.is_empty() {
            bail!("the BMC user is empty");
        }
        let (password, source) = match &bmc.password_file {
            Some(path) => (read_password_file(path)?, PasswordSource::File(path.clone())),
            None => match std::env::var(PASSWORD_ENV) {
                Ok(p) if !p.is_empty() => (p, PasswordSource::Env),
                _ => bail!("no BMC password: set `password_file` in the node's or profile's bmc, or {PASSWORD_ENV}"),
            },
        };
        Ok(Credentials { user, password: Password(password), source })
    }
}

fn read_password_file(path: &Path) -> Result<String> {
    use std::os::unix::fs::PermissionsExt as _;
    // The error names the file only: io errors carry no content.
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading the BMC password file {}", path.display()))?;
    let mode = std::fs::metadata(path).map(|m| m.permissions().mode() & 0o777).unwrap_or(0);
    // Once per file, not once per node sharing it.
    static WARNED: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());
    let mut warned = WARNED.lock().unwrap_or_else(|e| e.into_inner());
    if mode & 0o077 != 0 && !warned.iter().any(|p| p == path) {
        tracing::warn!("{} is readable by other users (mode {mode:o}): chmod 600 it", path.display());
        warned.push(path.to_path_buf());
    }
    drop(warned);
    let first = text.lines().next().unwrap_or("");
    if first.is_empty() {
        bail!("the BMC password file {} is empty (the password is its first line)", path.display());
    }
    Ok(first.to_string())
}

/// A file ipmitool reads the password from (`-f`): the node's own password file when ipmitool reads it as kiln
/// does, else a private temporary copy (mode 0600) removed when this is dropped.
pub struct IpmiPasswordFile {
    path: PathBuf,
    _temp: Option<tempfile::NamedTempFile>,
}

impl IpmiPasswordFile {
    pub fn new(creds: &Credentials) -> Result<Self> {
        let p = creds.password.expose();
        // ipmitool reads at most 20 bytes of the file's first line and stops at whitespace (1.8.19).
        if p.len() > 20 || p.chars().any(char::is_whitespace) {
            bail!("an IPMI password is at most 20 bytes without spaces; this one is not (ipmitool could not send it)");
        }
        if let PasswordSource::File(path) = &creds.source {
            return Ok(IpmiPasswordFile { path: path.clone(), _temp: None });
        }
        let dir = std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from).unwrap_or_else(std::env::temp_dir);
        let mut temp = tempfile::Builder::new()
            .prefix(".kiln-bmc-")
            .tempfile_in(&dir)
            .with_context(|| format!("creating a private password file for ipmitool in {}", dir.display()))?;
        temp.write_all(p.as_bytes()).and_then(|()| temp.flush()).context("writing ipmitool's password file")?;
        Ok(IpmiPasswordFile { path: temp.path().to_path_buf(), _temp: Some(temp) })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_show() {
        let c = Credentials { user: "admin".into(), password: Password("hunter2".into()), source: PasswordSource::Env };
        let shown = format!("{c:?} {}", c.password);
        assert!(!shown.contains("hunter2") && shown.contains("***"), "{shown}");
        let f = IpmiPasswordFile::new(&c).unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(std::fs::metadata(f.path()).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(std::fs::read_to_string(f.path()).unwrap(), "hunter2");
        let path = f.path().to_path_buf();
        drop(f);
        assert!(!path.exists(), "the temporary password file outlived its use");
        let long = Credentials { password: Password("x".repeat(21)), ..c };
        assert!(IpmiPasswordFile::new(&long).is_err());
    }

    #[test]
    fn password_files_give_their_first_line() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("pass");
        std::fs::write(&p, "s3cret\n").unwrap();
        assert_eq!(read_password_file(&p).unwrap(), "s3cret");
        std::fs::write(&p, "\n").unwrap();
        assert!(format!("{:#}", read_password_file(&p).unwrap_err()).contains("is empty"));
    }
}
