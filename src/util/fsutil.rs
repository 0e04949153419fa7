//! Files written so that a crash never leaves half of one: temp file, fsync, rename, fsync of the directory.

use std::fs::{self, File};
use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};

/// Writes `data` to `path` atomically: a temp file beside it, fsync, rename, fsync of the directory.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let mut tmp = tempfile::Builder::new()
        .prefix(".kiln-tmp-")
        .tempfile_in(dir)
        .with_context(|| format!("creating a temporary file in {}", dir.display()))?;
    tmp.write_all(data).with_context(|| format!("writing {}", tmp.path().display()))?;
    // tempfile creates 0600; outputs are meant to be read by others (the HTTP server, users).
    use std::os::unix::fs::PermissionsExt;
    tmp.as_file()
        .set_permissions(fs::Permissions::from_mode(0o644))
        .with_context(|| format!("setting permissions of {}", tmp.path().display()))?;
    tmp.as_file().sync_all().with_context(|| format!("syncing {}", tmp.path().display()))?;
    tmp.persist(path).with_context(|| format!("renaming into {}", path.display()))?;
    fsync_dir(dir)
}

/// Makes a rename or create inside `dir` durable.
pub fn fsync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).with_context(|| format!("syncing directory {}", dir.display()))
}

/// Creates a directory and its parents, with context.
pub fn mkdir_p(path: &Path) -> Result<()> {
    fs::create_dir_all(path).with_context(|| format!("creating directory {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_whole_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o644);
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1, "no temp files left");
    }
}
