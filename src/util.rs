//! Small shared pieces: digests, hashing readers and writers, atomic file writes, progress lines,
//! and the one way kiln runs external commands.

use std::fmt;
use std::fs::{self, File};
use std::io::{self, IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use sha2::{Digest as _, Sha256};

/// A sha256 content digest, as written in OCI manifests: `sha256:<64 hex>`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest([u8; 32]);

impl Digest {
    /// Parses `sha256:<hex>`; other algorithms are refused with a message naming the value.
    pub fn parse(s: &str) -> Result<Self> {
        let hex_part = s
            .strip_prefix("sha256:")
            .with_context(|| format!("digest {s:?} is not a sha256 digest (expected sha256:<64 hex digits>)"))?;
        Self::from_hex(hex_part).with_context(|| format!("digest {s:?} is malformed"))
    }

    pub fn from_hex(h: &str) -> Result<Self> {
        let mut out = [0u8; 32];
        if h.len() != 64 || h.bytes().any(|b| b.is_ascii_uppercase()) {
            bail!("expected 64 lowercase hex digits, got {} characters", h.len());
        }
        hex::decode_to_slice(h, &mut out).context("not hexadecimal")?;
        Ok(Digest(out))
    }

    pub fn of_bytes(data: &[u8]) -> Self {
        Digest(Sha256::digest(data).into())
    }

    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Hashes everything read through it; [`HashingReader::finish`] checks the digest and length.
pub struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
    count: u64,
}

impl<R: Read> HashingReader<R> {
    pub fn new(inner: R) -> Self {
        HashingReader { inner, hasher: Sha256::new(), count: 0 }
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    /// Reads whatever is left, then returns the digest of everything and the byte count.
    pub fn drain(mut self) -> io::Result<(Digest, u64)> {
        io::copy(&mut self, &mut io::sink())?;
        Ok((Digest(self.hasher.finalize().into()), self.count))
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
}

/// Hashes and counts everything written through it.
pub struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    count: u64,
}

impl<W: Write> HashingWriter<W> {
    pub fn new(inner: W) -> Self {
        HashingWriter { inner, hasher: Sha256::new(), count: 0 }
    }

    pub fn finish(self) -> (W, Digest, u64) {
        (self.inner, Digest(self.hasher.finalize().into()), self.count)
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// sha256 of a whole file, streamed.
pub fn sha256_file(path: &Path) -> Result<(Digest, u64)> {
    let f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    HashingReader::new(io::BufReader::with_capacity(1 << 20, f))
        .drain()
        .with_context(|| format!("reading {}", path.display()))
}

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

/// Runs a command to completion; on failure the error carries the command line and the tail of
/// its stderr, so a user sees what ran and why it failed.
pub fn run_command(cmd: &mut Command) -> Result<std::process::Output> {
    let shown = format!("{cmd:?}");
    let out = cmd.output().with_context(|| format!("starting {shown}"))?;
    if !out.status.success() {
        bail!("{shown} failed ({}):\n{}", out.status, tail(&out.stderr, 20));
    }
    Ok(out)
}

/// The last `lines` lines of a byte buffer, as text.
pub fn tail(bytes: &[u8], lines: usize) -> String {
    let text = String::from_utf8_lossy(bytes);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

static QUIET: AtomicBool = AtomicBool::new(false);

pub fn init_tracing(verbose: u8, quiet: bool) {
    QUIET.store(quiet, Ordering::Relaxed);
    let default = match (quiet, verbose) {
        (true, _) => "error",
        (false, 0) => "warn",
        (false, 1) => "info",
        (false, _) => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("KILN_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(io::stderr).try_init();
}

/// Step-by-step progress on stderr: one line per step with its duration, shown only when stderr
/// is a terminal and `--quiet` was not given.
pub struct Progress {
    enabled: bool,
    label: String,
    step: Option<(String, Instant)>,
}

impl Progress {
    pub fn new(label: impl Into<String>) -> Self {
        let enabled = !QUIET.load(Ordering::Relaxed) && io::stderr().is_terminal();
        Progress { enabled, label: label.into(), step: None }
    }

    pub fn step(&mut self, what: impl Into<String>) {
        self.end_step();
        let what = what.into();
        if self.enabled {
            eprint!("{}: {what} ...", self.label);
            let _ = io::stderr().flush();
        }
        self.step = Some((what, Instant::now()));
    }

    fn end_step(&mut self) {
        if let Some((_, start)) = self.step.take() {
            if self.enabled {
                eprintln!(" {:.1}s", start.elapsed().as_secs_f64());
            }
        }
    }

    pub fn done(mut self, msg: impl fmt::Display) {
        self.end_step();
        if self.enabled {
            eprintln!("{}: {msg}", self.label);
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.end_step();
    }
}

/// The user's data directory default for the store: `/var/lib/kiln` for root, else
/// `$XDG_DATA_HOME/kiln` (or `~/.local/share/kiln`).
pub fn default_store_root() -> PathBuf {
    if is_root() {
        return PathBuf::from("/var/lib/kiln");
    }
    if let Some(x) = std::env::var_os("XDG_DATA_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(x).join("kiln");
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
    home.join(".local/share/kiln")
}

pub fn is_root() -> bool {
    // SAFETY-free: geteuid has no preconditions, but libc calls are unsafe in Rust.
    #[allow(unsafe_code)]
    unsafe {
        libc::geteuid() == 0
    }
}

/// Number of worker threads: `KILN_THREADS`, else `RAYON_NUM_THREADS`, else the machine's cores.
/// Outputs never depend on it; only speed does.
pub fn thread_count() -> usize {
    for var in ["KILN_THREADS", "RAYON_NUM_THREADS"] {
        if let Some(n) = std::env::var(var).ok().and_then(|v| v.parse::<usize>().ok()) {
            if n > 0 {
                return n;
            }
        }
    }
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

/// Creates a directory and its parents, with context.
pub fn mkdir_p(path: &Path) -> Result<()> {
    fs::create_dir_all(path).with_context(|| format!("creating directory {}", path.display()))
}

/// `YYYY-MM-DD HH:MM:SS` (UTC) of a unix time.
pub fn utc_time(secs: u64) -> String {
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}", rem / 3600, rem / 60 % 60, rem % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_parse_and_display_round_trip() {
        let d = Digest::of_bytes(b"abc");
        let s = d.to_string();
        assert_eq!(s, "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        assert_eq!(Digest::parse(&s).unwrap(), d);
    }

    #[test]
    fn digest_rejects_other_algorithms_and_bad_hex() {
        assert!(Digest::parse("sha512:00").unwrap_err().to_string().contains("not a sha256"));
        assert!(Digest::parse("sha256:zz").is_err());
        let upper = format!("sha256:{}", "A".repeat(64));
        assert!(Digest::parse(&upper).is_err());
    }

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

    #[test]
    fn utc_times() {
        assert_eq!(utc_time(0), "1970-01-01 00:00:00");
        assert_eq!(utc_time(951_782_400), "2000-02-29 00:00:00");
        assert_eq!(utc_time(1_700_000_000), "2023-11-14 22:13:20");
        assert_eq!(utc_time(4_107_542_399), "2100-02-28 23:59:59");
    }
}
