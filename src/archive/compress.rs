//! Compression with fixed parameters, so the bytes never depend on the machine.
//!
//! zstd always runs in its multithreaded mode, even with one worker: the framing of that mode
//! does not depend on the number of workers, while the single-threaded mode's does differ from it.
//! gzip is single-threaded flate2 with an empty header (no name, mtime 0).

use std::io::{self, Write};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    Zstd,
    Gzip,
    None,
}

impl Compression {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "zstd" => Ok(Compression::Zstd),
            "gzip" => Ok(Compression::Gzip),
            "none" => Ok(Compression::None),
            other => bail!("unknown compression {other:?}: use zstd, gzip or none"),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Compression::Zstd => "zstd",
            Compression::Gzip => "gzip",
            Compression::None => "none",
        }
    }

    pub fn default_level(self) -> i32 {
        match self {
            Compression::Zstd => 3,
            Compression::Gzip => 6,
            Compression::None => 0,
        }
    }

    /// Checks a level against what the compressor accepts.
    pub fn check_level(self, level: i32) -> Result<()> {
        let ok = match self {
            Compression::Zstd => (1..=19).contains(&level),
            Compression::Gzip => (1..=9).contains(&level),
            Compression::None => true,
        };
        if !ok {
            let range = if self == Compression::Zstd { "1-19" } else { "1-9" };
            bail!("compression level {level} is out of range for {}: use {range}", self.name());
        }
        Ok(())
    }
}

/// A compressing writer; [`Compressor::finish`] must be called to write the end of the stream.
pub enum Compressor<W: Write> {
    Zstd(zstd::stream::write::Encoder<'static, W>),
    Gzip(flate2::write::GzEncoder<W>),
    None(W),
}

impl<W: Write> Compressor<W> {
    pub fn new(out: W, compression: Compression, level: i32, threads: usize) -> Result<Self> {
        compression.check_level(level)?;
        Ok(match compression {
            Compression::Zstd => {
                let mut enc = zstd::stream::write::Encoder::new(out, level).context("starting zstd")?;
                enc.multithread(threads.max(1) as u32).context("starting zstd workers")?;
                enc.include_checksum(true).context("configuring zstd")?;
                Compressor::Zstd(enc)
            }
            Compression::Gzip => Compressor::Gzip(
                flate2::GzBuilder::new()
                    .mtime(0)
                    .operating_system(3)
                    .write(out, flate2::Compression::new(level as u32)),
            ),
            Compression::None => Compressor::None(out),
        })
    }

    pub fn finish(self) -> io::Result<W> {
        match self {
            Compressor::Zstd(e) => e.finish(),
            Compressor::Gzip(e) => e.finish(),
            Compressor::None(w) => Ok(w),
        }
    }
}

impl<W: Write> Write for Compressor<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Compressor::Zstd(e) => e.write(buf),
            Compressor::Gzip(e) => e.write(buf),
            Compressor::None(w) => w.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Compressor::Zstd(e) => e.flush(),
            Compressor::Gzip(e) => e.flush(),
            Compressor::None(w) => w.flush(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compress(c: Compression, threads: usize, data: &[u8]) -> Vec<u8> {
        let mut w = Compressor::new(Vec::new(), c, c.default_level(), threads).unwrap();
        w.write_all(data).unwrap();
        w.finish().unwrap()
    }

    #[test]
    fn zstd_output_does_not_depend_on_threads() {
        // Large enough for several zstdmt jobs.
        let data: Vec<u8> = (0..24u32 << 20).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8 & 0x3f).collect();
        let one = compress(Compression::Zstd, 1, &data);
        assert_eq!(one, compress(Compression::Zstd, 2, &data));
        assert_eq!(one, compress(Compression::Zstd, 4, &data));
        assert_eq!(zstd::decode_all(&one[..]).unwrap(), data);
    }

    #[test]
    fn gzip_is_deterministic() {
        let a = compress(Compression::Gzip, 1, b"hello hello hello");
        assert_eq!(a, compress(Compression::Gzip, 8, b"hello hello hello"));
        assert_eq!(&a[4..8], &[0, 0, 0, 0], "mtime field is zero");
    }

    #[test]
    fn levels_are_checked() {
        assert!(Compression::Zstd.check_level(20).is_err());
        assert!(Compression::Gzip.check_level(0).is_err());
        assert!(Compression::parse("xz").unwrap_err().to_string().contains("zstd, gzip or none"));
    }
}
