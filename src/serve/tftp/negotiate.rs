//! Decisions on a read request, before any packet is sent: option negotiation (RFC 2347/2348/2349/7440), the
//! checks on a requested name, and finding the file in [`TftpFiles`]. Pure except for opening the file.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tracing::warn;

use super::packet::ErrorCode;
use super::{TftpConfig, TftpFiles, DEFAULT_BLKSIZE, MAX_BLKSIZE, MIN_BLKSIZE};

/// The outcome of option negotiation for one read request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    /// Payload bytes per DATA packet.
    pub blksize: u16,
    /// DATA packets sent before waiting for an ACK.
    pub window: u16,
    /// First retransmission timeout.
    pub timeout: Duration,
    /// The options accepted, as the OACK carries them (names spelled as the client spelled them). Empty when the
    /// client sent no option the server accepts: then no OACK is sent and DATA block 1 answers the request.
    pub oack: Vec<(String, String)>,
}

/// Decides blksize, windowsize, timeout and tsize for a request (RFC 2347/2348/2349/7440).
///
/// Option names are case-insensitive and the first of duplicates wins. `blksize` (8..=65464; larger values are
/// treated as 65464) is granted up to `config.max_blksize`; `windowsize` (1..=65535) up to `config.max_window`;
/// `timeout` is granted as asked when [`granted_timeout`] accepts it; `tsize` is answered with `file_size`, whatever
/// the client sent. Invalid values, refused values and unknown options are ignored, so they are absent from the OACK.
pub fn negotiate(options: &[(&str, &str)], file_size: u64, config: &TftpConfig) -> Negotiated {
    let mut negotiated = Negotiated { blksize: DEFAULT_BLKSIZE, window: 1, timeout: config.timeout, oack: Vec::new() };
    let mut seen: Vec<String> = Vec::new();
    for (name, value) in options {
        let key = name.to_ascii_lowercase();
        if seen.contains(&key) {
            continue;
        }
        seen.push(key.clone());
        let number = value.trim().parse::<u64>().ok();
        let granted = match (key.as_str(), number) {
            ("blksize", Some(asked)) if asked >= u64::from(MIN_BLKSIZE) => {
                let max = config.max_blksize.clamp(MIN_BLKSIZE, MAX_BLKSIZE);
                negotiated.blksize = asked.min(u64::from(max)) as u16;
                negotiated.blksize.to_string()
            }
            ("windowsize", Some(asked @ 1..=65535)) => {
                negotiated.window = asked.min(u64::from(config.max_window.max(1))) as u16;
                negotiated.window.to_string()
            }
            ("timeout", Some(asked)) => {
                let Some(timeout) = granted_timeout(asked, config.max_timeout) else { continue };
                negotiated.timeout = timeout;
                asked.to_string()
            }
            ("tsize", Some(_)) => file_size.to_string(),
            _ => continue,
        };
        negotiated.oack.push((name.to_string(), granted));
    }
    negotiated
}

/// The retransmission timeout granted for a client's `timeout` option of `asked` seconds, or `None` when it is not.
///
/// RFC 2349 allows 1..=255 s and has the OACK repeat the client's value, so a value cannot be lowered, only
/// refused: one above `max` (at least 1 s) is left out of the OACK and the server keeps its own timeout. A client
/// asking for 255 s would otherwise make every retransmission of a stalled transfer wait minutes.
pub fn granted_timeout(asked: u64, max: Duration) -> Option<Duration> {
    let max = max.as_secs().clamp(1, 255);
    (1..=max).contains(&asked).then(|| Duration::from_secs(asked))
}

/// Why a requested name is not served. The message is sent to the client in the ERROR packet.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// ERROR 2: the name tries to leave the served files.
    #[error("access violation: {0}")]
    AccessViolation(String),
    /// ERROR 1.
    #[error("file not found: {0}")]
    NotFound(String),
    /// ERROR 0: the file exists but could not be opened.
    #[error("cannot read {0}")]
    Unreadable(String),
}

impl Refusal {
    pub(super) fn code(&self) -> ErrorCode {
        match self {
            Refusal::AccessViolation(_) => ErrorCode::AccessViolation,
            Refusal::NotFound(_) => ErrorCode::FileNotFound,
            Refusal::Unreadable(_) => ErrorCode::NotDefined,
        }
    }
}

/// Checks a requested name and returns it relative to the served set: one leading `/` is stripped (clients
/// differ in sending it); a NUL byte, a `..` component (between `/` or `\` separators, as Windows-style clients
/// send) or a path still absolute after stripping is refused.
pub fn sanitize_name(requested: &str) -> Result<&str, Refusal> {
    let name = requested.strip_prefix('/').unwrap_or(requested);
    if name.contains('\0') {
        return Err(Refusal::AccessViolation(format!("{requested:?} contains a NUL byte")));
    }
    if name.starts_with('/') || Path::new(name).is_absolute() {
        return Err(Refusal::AccessViolation(format!("{requested:?} is an absolute path")));
    }
    if name.split(['/', '\\']).any(|component| component == "..") {
        return Err(Refusal::AccessViolation(format!("{requested:?} contains a '..' component")));
    }
    Ok(name)
}

/// A file opened for a transfer.
#[derive(Debug)]
pub struct OpenedFile {
    pub file: std::fs::File,
    pub size: u64,
    /// Where the file was found (after symlinks, for files under the root).
    pub path: PathBuf,
}

impl TftpFiles {
    /// Resolves and opens a requested name (blocking): [`sanitize_name`], then the `named` map, then the root
    /// directory, whose canonical path the file's canonical path must stay inside. Only regular files are served.
    pub fn open(&self, requested: &str) -> Result<OpenedFile, Refusal> {
        let name = sanitize_name(requested)?;
        if let Some(path) = self.named.get(name) {
            return open_regular(path, requested);
        }
        let not_found = || Refusal::NotFound(format!("{requested:?} is not served"));
        let Some(root) = &self.root else { return Err(not_found()) };
        if name.is_empty() {
            return Err(not_found());
        }
        let root = root.canonicalize().map_err(|e| {
            warn!("TFTP root {} is unusable: {e}", root.display());
            not_found()
        })?;
        let path = match root.join(name).canonicalize() {
            Ok(path) => path,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(not_found()),
            Err(e) => return Err(Refusal::Unreadable(format!("{requested:?}: {e}"))),
        };
        if !path.starts_with(&root) {
            return Err(Refusal::AccessViolation(format!("{requested:?} resolves outside the TFTP root")));
        }
        open_regular(&path, requested)
    }
}

/// Opens `path` and checks, on the open file, that it is a regular file.
fn open_regular(path: &Path, requested: &str) -> Result<OpenedFile, Refusal> {
    let file = std::fs::File::open(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => Refusal::NotFound(format!("{requested:?} is not served")),
        _ => Refusal::Unreadable(format!("{requested:?}: {e}")),
    })?;
    let metadata = file.metadata().map_err(|e| Refusal::Unreadable(format!("{requested:?}: {e}")))?;
    if !metadata.is_file() {
        return Err(Refusal::NotFound(format!("{requested:?} is not a regular file")));
    }
    Ok(OpenedFile { file, size: metadata.len(), path: path.to_path_buf() })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn config() -> TftpConfig {
        TftpConfig { max_blksize: 1468, max_window: 16, ..TftpConfig::default() }
    }

    #[test]
    fn no_options_no_oack() {
        let negotiated = negotiate(&[], 1000, &config());
        assert_eq!(negotiated, Negotiated { blksize: 512, window: 1, timeout: Duration::from_secs(1), oack: vec![] });
    }

    #[test]
    fn blksize_is_clamped_to_the_configured_maximum() {
        let config = config();
        assert_eq!(negotiate(&[("blksize", "65464")], 0, &config).blksize, 1468);
        assert_eq!(negotiate(&[("blksize", "1024")], 0, &config).oack, vec![("blksize".into(), "1024".into())]);
        assert_eq!(negotiate(&[("blksize", "99999")], 0, &config).blksize, 1468);
        let big = TftpConfig::default();
        assert_eq!(negotiate(&[("blksize", "8192")], 0, &big).blksize, 8192);
        assert_eq!(negotiate(&[("blksize", "70000")], 0, &big).blksize, MAX_BLKSIZE);
        // Below the RFC minimum, or not a number: ignored, so not acknowledged.
        assert_eq!(negotiate(&[("blksize", "7")], 0, &config).oack, vec![]);
        assert_eq!(negotiate(&[("blksize", "big")], 0, &config).blksize, 512);
    }

    #[test]
    fn tsize_reports_the_file_size() {
        let negotiated = negotiate(&[("TSize", "0"), ("blksize", "1428")], 31337, &config());
        assert_eq!(negotiated.oack, vec![("TSize".into(), "31337".into()), ("blksize".into(), "1428".into())]);
    }

    #[test]
    fn windowsize_and_timeout() {
        let config = config();
        let negotiated = negotiate(&[("windowsize", "64"), ("timeout", "3")], 0, &config);
        assert_eq!((negotiated.window, negotiated.timeout), (16, Duration::from_secs(3)));
        assert_eq!(negotiated.oack, vec![("windowsize".into(), "16".into()), ("timeout".into(), "3".into())]);
        assert_eq!(negotiate(&[("windowsize", "4")], 0, &config).window, 4);
        for invalid in ["0", "65536", "-1", ""] {
            assert_eq!(negotiate(&[("windowsize", invalid)], 0, &config).oack, vec![], "windowsize {invalid:?}");
        }
        for invalid in ["0", "256"] {
            assert_eq!(negotiate(&[("timeout", invalid)], 0, &config).oack, vec![], "timeout {invalid:?}");
        }
    }

    #[test]
    fn timeouts_above_the_maximum_are_refused() {
        let ten = Duration::from_secs(10);
        assert_eq!(granted_timeout(1, ten), Some(Duration::from_secs(1)));
        assert_eq!(granted_timeout(10, ten), Some(ten));
        for refused in [0, 11, 255, 256, u64::MAX] {
            assert_eq!(granted_timeout(refused, ten), None, "timeout {refused}");
        }
        // The RFC's range still bounds a generous maximum, and a maximum under 1 s still grants 1 s.
        assert_eq!(granted_timeout(255, Duration::from_secs(1000)), Some(Duration::from_secs(255)));
        assert_eq!(granted_timeout(256, Duration::from_secs(1000)), None);
        assert_eq!(granted_timeout(1, Duration::ZERO), Some(Duration::from_secs(1)));
        // A refused timeout is absent from the OACK and the server keeps its own; other options are unaffected.
        let negotiated = negotiate(&[("timeout", "255"), ("blksize", "1024")], 0, &config());
        assert_eq!(negotiated.timeout, config().timeout);
        assert_eq!(negotiated.oack, vec![("blksize".into(), "1024".into())]);
        let negotiated = negotiate(&[("timeout", "10")], 0, &config());
        assert_eq!((negotiated.timeout, negotiated.oack), (ten, vec![("timeout".into(), "10".into())]));
    }

    #[test]
    fn unknown_and_duplicate_options() {
        let negotiated =
            negotiate(&[("multicast", ""), ("utimeout", "500"), ("blksize", "1000"), ("BLKSIZE", "9")], 0, &config());
        assert_eq!(negotiated.oack, vec![("blksize".into(), "1000".into())]);
        assert_eq!(negotiated.blksize, 1000);
    }

    #[test]
    fn sanitizes_names() {
        assert_eq!(sanitize_name("/snponly.efi"), Ok("snponly.efi"));
        assert_eq!(sanitize_name("efi/grubx64.efi"), Ok("efi/grubx64.efi"));
        // Only one leading slash: /etc/passwd becomes a name under the root, never the host's file.
        assert_eq!(sanitize_name("/etc/passwd"), Ok("etc/passwd"));
        for bad in ["../../etc/shadow", "a/../../b", "/..", "..", "x\\..\\y", "//etc/passwd", "a\0b"] {
            assert!(matches!(sanitize_name(bad), Err(Refusal::AccessViolation(_))), "{bad:?} accepted");
        }
        // Dots that are not a whole component are fine.
        assert_eq!(sanitize_name("a..b/.hidden"), Ok("a..b/.hidden"));
    }

    #[test]
    fn files_stay_inside_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir_all(root.join("sub")).unwrap();
        std::fs::write(root.join("sub/ok.bin"), b"inside").unwrap();
        std::fs::write(dir.path().join("secret"), b"outside").unwrap();
        std::os::unix::fs::symlink(dir.path().join("secret"), root.join("escape")).unwrap();
        std::os::unix::fs::symlink(dir.path(), root.join("up")).unwrap();
        std::os::unix::fs::symlink("sub/ok.bin", root.join("alias")).unwrap();
        std::fs::write(dir.path().join("mapped"), b"mapped").unwrap();
        let files = TftpFiles {
            named: BTreeMap::from([("boot.efi".to_string(), dir.path().join("mapped"))]),
            root: Some(root.clone()),
        };
        let read = |name: &str| files.open(name).map(|opened| std::fs::read(opened.path).unwrap());
        assert_eq!(read("/boot.efi").unwrap(), b"mapped");
        assert_eq!(read("sub/ok.bin").unwrap(), b"inside");
        assert_eq!(read("/alias").unwrap(), b"inside");
        assert_eq!(files.open("sub/ok.bin").unwrap().size, 6);
        assert!(matches!(read("escape"), Err(Refusal::AccessViolation(_))));
        assert!(matches!(read("up/secret"), Err(Refusal::AccessViolation(_))));
        assert!(matches!(read("../secret"), Err(Refusal::AccessViolation(_))));
        assert!(matches!(read("sub"), Err(Refusal::NotFound(_))));
        assert!(matches!(read(""), Err(Refusal::NotFound(_))));
        assert!(matches!(read("missing"), Err(Refusal::NotFound(_))));
        assert!(matches!(read("/etc/passwd"), Err(Refusal::NotFound(_))));
        let no_root = TftpFiles { root: None, ..files.clone() };
        assert!(matches!(no_root.open("sub/ok.bin"), Err(Refusal::NotFound(_))));
    }
}
