//! sha256 digests as OCI writes them (`sha256:<hex>`), and readers and writers that hash what passes through.

use std::fmt;
use std::fs::File;
use std::io::{self, Read, Write};
use std::path::Path;

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

/// Hashes everything read through it; [`HashingReader::drain`] reads the rest and gives the digest and length.
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

/// A file's sha256 (lowercase hex, as manifests write it) and size: one entry of a manifest's `files` map.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FileDigest {
    pub sha256: String,
    pub size: u64,
}

impl FileDigest {
    /// Hashes the file at `path`.
    pub fn of_file(path: &Path) -> Result<FileDigest> {
        let (digest, size) = sha256_file(path)?;
        Ok(FileDigest { sha256: digest.hex(), size })
    }

    /// Whether `other` (a file just hashed) matches this entry.
    pub fn matches(&self, digest: &Digest, size: u64) -> bool {
        self.size == size && self.sha256 == digest.hex()
    }
}

/// sha256 of a whole file, streamed.
pub fn sha256_file(path: &Path) -> Result<(Digest, u64)> {
    let f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    HashingReader::new(io::BufReader::with_capacity(1 << 20, f))
        .drain()
        .with_context(|| format!("reading {}", path.display()))
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
}
