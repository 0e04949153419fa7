//! newc cpio encoding.

use std::io::{self, Read, Write};

use anyhow::{bail, Context, Result};

/// The largest file newc can describe: its size field is 8 hex digits.
pub const NEWC_MAX_FILE_SIZE: u64 = u32::MAX as u64;

/// One archive member's header fields. `mode` includes the file type bits (`S_IFREG` …).
#[derive(Debug, Clone, Default)]
pub struct CpioEntry<'a> {
    pub name: &'a [u8],
    pub ino: u32,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u32,
    pub mtime: u32,
    pub size: u64,
    pub rdev_major: u32,
    pub rdev_minor: u32,
}

/// Writes newc members to `W`, keeping the 4-byte alignment the format needs.
pub struct CpioWriter<W: Write> {
    out: W,
    offset: u64,
    header: Vec<u8>,
}

impl<W: Write> CpioWriter<W> {
    pub fn new(out: W) -> Self {
        CpioWriter { out, offset: 0, header: Vec::with_capacity(512) }
    }

    /// Writes one member; `data` must yield exactly `entry.size` bytes.
    pub fn write_entry(&mut self, entry: &CpioEntry<'_>, data: Option<&mut dyn Read>) -> Result<()> {
        if entry.size > NEWC_MAX_FILE_SIZE {
            bail!(
                "/{} is {} bytes: the newc cpio format cannot hold files of 4 GiB or more; \
                 leave it out with an `exclude` pattern in the recipe",
                String::from_utf8_lossy(entry.name),
                entry.size
            );
        }
        if entry.name.contains(&0) {
            bail!("a path contains a NUL byte: {:?}", String::from_utf8_lossy(entry.name));
        }
        self.header.clear();
        let namesize = entry.name.len() as u32 + 1;
        let fields = [
            entry.ino,
            entry.mode,
            entry.uid,
            entry.gid,
            entry.nlink,
            entry.mtime,
            entry.size as u32,
            0, // devmajor of the file system holding the file: meaningless here
            0,
            entry.rdev_major,
            entry.rdev_minor,
            namesize,
            0, // check: unused in newc
        ];
        self.header.extend_from_slice(b"070701");
        for f in fields {
            write!(&mut self.header, "{f:08x}").expect("writing to a Vec cannot fail");
        }
        self.header.extend_from_slice(entry.name);
        self.header.push(0);
        pad_to_4(&mut self.header, self.offset);
        self.out.write_all(&self.header)?;
        self.offset += self.header.len() as u64;

        if entry.size > 0 {
            let data = data.context("internal: a sized cpio entry was given no data")?;
            let copied = io::copy(&mut data.take(entry.size), &mut self.out)
                .with_context(|| format!("copying /{}", String::from_utf8_lossy(entry.name)))?;
            if copied != entry.size {
                bail!(
                    "/{}: expected {} bytes of content but the source ended after {copied}: \
                     the layer is truncated",
                    String::from_utf8_lossy(entry.name),
                    entry.size
                );
            }
            self.offset += copied;
            let pad = (4 - (self.offset % 4) as usize) % 4;
            self.out.write_all(&[0u8; 3][..pad])?;
            self.offset += pad as u64;
        }
        Ok(())
    }

    /// Writes the `TRAILER!!!` member; returns the inner writer and the archive's length.
    pub fn finish(mut self) -> Result<(W, u64)> {
        let trailer = CpioEntry { name: b"TRAILER!!!", nlink: 1, ..Default::default() };
        self.write_entry(&trailer, None)?;
        Ok((self.out, self.offset))
    }
}

fn pad_to_4(buf: &mut Vec<u8>, start: u64) {
    while !(start + buf.len() as u64).is_multiple_of(4) {
        buf.push(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_layout_matches_newc() {
        let mut w = CpioWriter::new(Vec::new());
        let e = CpioEntry { name: b"a", ino: 1, mode: 0o100644, nlink: 1, size: 3, ..Default::default() };
        w.write_entry(&e, Some(&mut &b"xyz"[..])).unwrap();
        let (out, len) = w.finish().unwrap();
        assert_eq!(len as usize, out.len());
        assert_eq!(&out[..6], b"070701");
        // header (110) + "a\0" = 112, already aligned; data 3 + 1 pad.
        assert_eq!(&out[110..112], b"a\0");
        assert_eq!(&out[112..116], b"xyz\0");
        assert_eq!(out.len() % 4, 0);
        assert!(out.windows(10).any(|w| w == b"TRAILER!!!"));
    }

    #[test]
    fn refuses_files_of_4_gib() {
        let mut w = CpioWriter::new(io::sink());
        let e = CpioEntry { name: b"big", size: 1 << 32, ..Default::default() };
        let err = w.write_entry(&e, None).unwrap_err().to_string();
        assert!(err.contains("/big") && err.contains("4 GiB"), "{err}");
    }

    #[test]
    fn short_data_is_an_error_not_a_short_archive() {
        let mut w = CpioWriter::new(Vec::new());
        let e = CpioEntry { name: b"f", size: 10, ..Default::default() };
        let err = w.write_entry(&e, Some(&mut &b"abc"[..])).unwrap_err().to_string();
        assert!(err.contains("truncated"), "{err}");
    }
}
