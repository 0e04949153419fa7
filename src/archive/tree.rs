//! A small file tree assembled in memory and written as one reproducible newc archive: kiln's initramfs, each
//! node's overlay and the appliance archive are built this way (bundle images stream from an image's merged
//! tree instead, see `bundle::write_image`).
//!
//! Members are written in bytewise path order, parents before children (parents are added as 0755
//! directories when not given), inode numbers count from 1 in that order, every member has the same mtime and
//! owner 0:0. The bytes therefore depend only on what was added.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use super::{CpioEntry, CpioWriter};

enum Member {
    Dir(u32),
    File(PathBuf, u32),
    Bytes(Vec<u8>, u32),
    Symlink(String),
    CharDevice { mode: u32, major: u32, minor: u32 },
}

/// Members by path (relative, `/`-separated, no leading `/`; `.` is the archive's root directory).
#[derive(Default)]
pub struct NewcTree {
    entries: BTreeMap<String, Member>,
}

impl NewcTree {
    /// How many members the archive will hold (the trailer not counted).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Whether some member lies under `dir`.
    pub fn has_children(&self, dir: &str) -> bool {
        let prefix = format!("{dir}/");
        self.entries.range(prefix.clone()..).next().is_some_and(|(p, _)| p.starts_with(&prefix))
    }

    fn parents(&mut self, path: &str) {
        let mut p = path;
        while let Some((parent, _)) = p.rsplit_once('/') {
            self.entries.entry(parent.to_string()).or_insert(Member::Dir(0o755));
            p = parent;
        }
    }

    /// A directory with permission bits `mode` (replacing the default of a parent added earlier).
    pub fn dir(&mut self, path: &str, mode: u32) {
        self.parents(path);
        self.entries.insert(path.to_string(), Member::Dir(mode));
    }

    /// A regular file whose content is read from `host` when the archive is written.
    pub fn file(&mut self, path: &str, host: &Path, mode: u32) -> Result<()> {
        if !host.is_file() {
            bail!("{} does not exist or is not a file", host.display());
        }
        self.parents(path);
        self.entries.insert(path.to_string(), Member::File(host.to_path_buf(), mode));
        Ok(())
    }

    /// A regular file with this content.
    pub fn bytes(&mut self, path: &str, data: impl Into<Vec<u8>>, mode: u32) {
        self.parents(path);
        self.entries.insert(path.to_string(), Member::Bytes(data.into(), mode));
    }

    pub fn symlink(&mut self, path: &str, target: &str) {
        self.parents(path);
        self.entries.insert(path.to_string(), Member::Symlink(target.to_string()));
    }

    pub fn char_device(&mut self, path: &str, mode: u32, major: u32, minor: u32) {
        self.parents(path);
        self.entries.insert(path.to_string(), Member::CharDevice { mode, major, minor });
    }

    /// The regular files directly in `dir` (a store output is flat), as `path/<name>`, mode 0644.
    pub fn dir_files(&mut self, path: &str, dir: &Path) -> Result<()> {
        let mut names = Vec::new();
        for e in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
            let e = e?;
            if e.file_type()?.is_file() {
                names.push(e.file_name().to_string_lossy().into_owned());
            }
        }
        self.parents(&format!("{path}/x"));
        for n in names {
            self.file(&format!("{path}/{n}"), &dir.join(&n), 0o644)?;
        }
        Ok(())
    }

    /// Writes the archive (uncompressed newc: wrap `out` in a compressor for a compressed one); returns `out`
    /// and the archive's length.
    pub fn write<W: Write>(&self, out: W, mtime: u32) -> Result<(W, u64)> {
        let mut cpio = CpioWriter::new(out);
        for (ino, (name, member)) in self.entries.iter().enumerate() {
            let mut e = CpioEntry { name: name.as_bytes(), ino: ino as u32 + 1, nlink: 1, mtime, ..Default::default() };
            match member {
                Member::Dir(mode) => {
                    e.mode = libc::S_IFDIR | mode;
                    e.nlink = 2;
                    cpio.write_entry(&e, None)?;
                }
                Member::File(host, mode) => {
                    let mut data = File::open(host).with_context(|| format!("reading {}", host.display()))?;
                    e.mode = libc::S_IFREG | mode;
                    e.size = data.metadata().with_context(|| format!("reading {}", host.display()))?.len();
                    let mut limited = (&mut data).take(e.size);
                    cpio.write_entry(&e, Some(&mut limited))
                        .with_context(|| format!("archiving {}", host.display()))?;
                }
                Member::Bytes(data, mode) => {
                    e.mode = libc::S_IFREG | mode;
                    e.size = data.len() as u64;
                    cpio.write_entry(&e, Some(&mut &data[..]))?;
                }
                Member::Symlink(target) => {
                    e.mode = libc::S_IFLNK | 0o777;
                    e.size = target.len() as u64;
                    cpio.write_entry(&e, Some(&mut target.as_bytes()))?;
                }
                Member::CharDevice { mode, major, minor } => {
                    e.mode = libc::S_IFCHR | mode;
                    e.rdev_major = *major;
                    e.rdev_minor = *minor;
                    cpio.write_entry(&e, None)?;
                }
            }
        }
        cpio.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_are_sorted_with_parents_and_numbered() {
        let mut t = NewcTree::default();
        t.bytes("b/c/file", "hi", 0o600);
        t.symlink("a", "b/c/file");
        t.dir("b", 0o700);
        t.char_device("dev/null", 0o666, 1, 3);
        assert_eq!(t.len(), 6);
        let (out, len) = t.write(Vec::new(), 7).unwrap();
        assert_eq!(len as usize, out.len());
        let text = String::from_utf8_lossy(&out);
        let names: Vec<&str> = ["a\0", "b\0", "b/c\0", "b/c/file\0", "dev\0", "dev/null\0", "TRAILER!!!\0"]
            .into_iter()
            .filter(|n| text.contains(n))
            .collect();
        assert_eq!(names.len(), 7, "{text}");
        let pos = |n: &str| text.find(n).unwrap();
        assert!(pos("a\0") < pos("b\0") && pos("b\0") < pos("b/c\0") && pos("b/c/file\0") < pos("dev\0"));
        // b keeps the mode it was given after its child made it exist: 040700, inode 2.
        let b = pos("b\0") - 104;
        assert_eq!(&text[b..b + 8], "00000002");
        assert_eq!(&text[b + 8..b + 16], "000041c0");
        let (again, _) = t.write(Vec::new(), 7).unwrap();
        assert_eq!(out, again);
    }
}
