//! Writing a bundle's `image` while its one layer is still being read ([`crate::image::stream`]), so
//! decompression, merging and compression overlap instead of following each other.
//!
//! The archive is the same, byte for byte, as the one written from the whole tree ([`super::write_image`]):
//! members in bytewise path order, inode numbers 1..n in that order, a hardlinked file's data with its last
//! name. Entries wait in a window sorted by path (at most [`WINDOW_BYTES`] of file data and
//! [`WINDOW_ENTRIES`] members) and leave it smallest first, so a layer in bytewise order (umoci, Docker's
//! layer diffs) streams straight through, and one in walk order (`tar --sort=name`, Go's `filepath.Walk`:
//! `a/b` before `a-c`) too, as long as what it has out of order fits in the window. An entry that sorts before
//! one already written, a path given twice, or a hardlink to a file already written stops the stream with
//! [`StreamAbort`], and the build reads the layer whole instead.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::io::{BufWriter, Read};
use std::path::Path;

use anyhow::{Context, Result};
use globset::GlobSet;

use super::{finish_archive, ArchiveInfo, ImageSettings};
use crate::archive::{Compression, Compressor, CpioEntry, CpioWriter};
use crate::image::tree::{show, Kind, Node, Tree};
use crate::util::HashingWriter;

/// File data held back, at most, waiting for its turn or for hardlinks to the file.
pub const WINDOW_BYTES: usize = 32 << 20;
/// Members held back, at most.
pub const WINDOW_ENTRIES: usize = 16384;

/// The stream cannot produce the canonical archive; the layer must be read whole instead.
#[derive(Debug)]
pub struct StreamAbort(pub String);

impl std::fmt::Display for StreamAbort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the layer cannot be streamed: {}", self.0)
    }
}

impl std::error::Error for StreamAbort {}

fn abort(why: String) -> anyhow::Error {
    anyhow::Error::new(StreamAbort(why))
}

/// The `exclude` patterns as paths come (a directory before what is below it): a directory dropped takes
/// its subtree along.
pub struct ExcludeFilter<'a> {
    set: &'a GlobSet,
    dropped: HashSet<Vec<u8>>,
    abs: Vec<u8>,
}

impl<'a> ExcludeFilter<'a> {
    pub fn new(set: &'a GlobSet) -> Self {
        ExcludeFilter { set, dropped: HashSet::new(), abs: Vec::with_capacity(256) }
    }

    pub fn excluded(&mut self, path: &[u8], is_dir: bool) -> bool {
        if path.is_empty() || self.set.is_empty() {
            return false;
        }
        let under_dropped = path.iter().enumerate().any(|(i, &b)| b == b'/' && self.dropped.contains(&path[..i]));
        self.abs.clear();
        self.abs.push(b'/');
        self.abs.extend_from_slice(path);
        let excluded = under_dropped || self.set.is_match(std::str::from_utf8(&self.abs).unwrap_or_default());
        if excluded && is_dir {
            self.dropped.insert(path.to_vec());
        }
        excluded
    }
}

/// A hardlink group (one file, its names).
#[derive(Default)]
struct Group {
    /// Names seen so far.
    names: u32,
    /// Names written so far.
    written: u32,
    ino: Option<u32>,
    /// The file's bytes, until its last name is written.
    data: Option<Vec<u8>>,
}

/// The streamed newc archive.
pub struct CpioStream<'a> {
    cpio: CpioWriter<BufWriter<Compressor<HashingWriter<File>>>>,
    exclude: ExcludeFilter<'a>,
    clamp: u32,
    started: bool,
    /// The last path written: nothing at or before it may come any more.
    written: Option<Vec<u8>>,
    window: BTreeMap<Vec<u8>, Node>,
    window_bytes: usize,
    groups: HashMap<u32, Group>,
    next_ino: u32,
    entries: u64,
}

impl<'a> CpioStream<'a> {
    pub fn new(out: &Path, settings: ImageSettings<'a>) -> Result<Self> {
        let ImageSettings { exclude, sde, compression, level, threads } = settings;
        let f = File::create(out).with_context(|| format!("creating {}", out.display()))?;
        let comp = Compressor::new(HashingWriter::new(f), compression, level, threads)?;
        Ok(CpioStream {
            cpio: CpioWriter::new(BufWriter::with_capacity(1 << 20, comp)),
            exclude: ExcludeFilter::new(exclude),
            clamp: sde.clamp(0, u32::MAX as i64) as u32,
            started: false,
            written: None,
            window: BTreeMap::new(),
            window_bytes: 0,
            groups: HashMap::new(),
            next_ino: 0,
            entries: 0,
        })
    }

    /// Takes the next path of the layer (see [`crate::image::stream::OnEntry`]).
    pub fn entry(&mut self, tree: &Tree, path: &[u8], data: Option<&mut dyn Read>) -> Result<()> {
        if !self.started {
            // The root: the tree's own when the layer has none (the layer's replaces it below if it has one).
            self.started = true;
            let root = tree.nodes.get(&b""[..]).context("internal: the tree has no root")?.clone();
            self.window.insert(Vec::new(), root);
        }
        let node = tree.nodes.get(path).context("internal: a streamed path is not in the tree")?.clone();
        if let Some(last) = self.written.as_deref().filter(|w| path <= *w) {
            return Err(abort(format!("/{} comes after /{}, which is already written", show(path), show(last))));
        }
        if self.exclude.excluded(path, node.kind == Kind::Dir) {
            return Ok(());
        }
        if let Some(old) = self.window.get_mut(path) {
            // A directory given again (or made up before the layer named it) takes the new metadata.
            if old.kind == Kind::Dir && node.kind == Kind::Dir {
                *old = node;
                return Ok(());
            }
            return Err(abort(format!("/{} is given twice", show(path))));
        }
        if let Kind::File { size, group, .. } = node.kind {
            let g = self.groups.entry(group).or_default();
            if g.written > 0 {
                return Err(abort(format!("/{} is a hardlink to a file already written", show(path))));
            }
            if g.names == 0 && data.is_none() {
                return Err(abort(format!("/{} is a hardlink to a file left out", show(path))));
            }
            g.names += 1;
            if let Some(r) = data {
                if size > WINDOW_BYTES as u64 {
                    // Too big to hold back: what sorts before it goes out, then it, straight from the layer.
                    self.write_until(Some(path))?;
                    return self.write_big(path, &node, size, r);
                }
                let mut bytes = Vec::with_capacity(size as usize);
                r.take(size).read_to_end(&mut bytes).with_context(|| format!("reading /{}", show(path)))?;
                if bytes.len() as u64 != size {
                    anyhow::bail!("/{}: expected {size} bytes but the layer ended after {}", show(path), bytes.len());
                }
                self.window_bytes += bytes.len();
                self.groups.get_mut(&group).expect("just added").data = Some(bytes);
            }
        }
        self.window.insert(path.to_vec(), node);
        while self.window_bytes > WINDOW_BYTES || self.window.len() > WINDOW_ENTRIES {
            self.write_first()?;
        }
        Ok(())
    }

    /// Writes the smallest member held.
    fn write_first(&mut self) -> Result<()> {
        if let Some((path, node)) = self.window.pop_first() {
            self.write(&path, &node)?;
            self.written = Some(path);
        }
        Ok(())
    }

    /// Writes the members held that sort before `bound` (all of them with None).
    fn write_until(&mut self, bound: Option<&[u8]>) -> Result<()> {
        while let Some((first, _)) = self.window.first_key_value() {
            if bound.is_some_and(|b| first.as_slice() >= b) {
                break;
            }
            self.write_first()?;
        }
        Ok(())
    }

    fn header<'p>(&self, path: &'p [u8], node: &Node) -> CpioEntry<'p> {
        CpioEntry {
            name: if path.is_empty() { b"." } else { path },
            ino: 0,
            mode: node.st_mode(),
            uid: node.uid,
            gid: node.gid,
            nlink: 1,
            mtime: node.mtime.clamp(0, self.clamp as i64) as u32,
            size: 0,
            rdev_major: 0,
            rdev_minor: 0,
        }
    }

    fn write_big(&mut self, path: &[u8], node: &Node, size: u64, r: &mut dyn Read) -> Result<()> {
        let Kind::File { group, .. } = node.kind else { unreachable!("a regular file") };
        self.next_ino += 1;
        let ino = self.next_ino;
        let g = self.groups.get_mut(&group).expect("added by entry");
        g.ino = Some(ino);
        g.written = 1;
        let mut e = self.header(path, node);
        e.ino = ino;
        e.size = size;
        self.cpio.write_entry(&e, Some(r)).with_context(|| format!("archiving /{}", show(path)))?;
        self.entries += 1;
        self.written = Some(path.to_vec());
        Ok(())
    }

    fn write(&mut self, path: &[u8], node: &Node) -> Result<()> {
        let mut e = self.header(path, node);
        self.entries += 1;
        match &node.kind {
            Kind::File { group, .. } => {
                let g = self.groups.get_mut(group).expect("added by entry");
                let ino = match g.ino {
                    Some(i) => i,
                    None => {
                        self.next_ino += 1;
                        g.ino = Some(self.next_ino);
                        self.next_ino
                    }
                };
                g.written += 1;
                e.ino = ino;
                e.nlink = g.names;
                // newc carries a hardlinked file's data once, with its last name.
                if g.written == g.names {
                    let data = g.data.take().unwrap_or_default();
                    self.window_bytes -= data.len();
                    e.size = data.len() as u64;
                    self.cpio
                        .write_entry(&e, Some(&mut &data[..]))
                        .with_context(|| format!("archiving /{}", show(path)))
                } else {
                    self.cpio.write_entry(&e, None)
                }
            }
            Kind::Dir => {
                self.next_ino += 1;
                e.ino = self.next_ino;
                e.nlink = 2;
                self.cpio.write_entry(&e, None)
            }
            Kind::Symlink(target) => {
                self.next_ino += 1;
                e.ino = self.next_ino;
                e.size = target.len() as u64;
                self.cpio.write_entry(&e, Some(&mut &target[..]))
            }
            Kind::Char { major, minor } | Kind::Block { major, minor } => {
                self.next_ino += 1;
                e.ino = self.next_ino;
                e.rdev_major = *major;
                e.rdev_minor = *minor;
                self.cpio.write_entry(&e, None)
            }
            Kind::Fifo => {
                self.next_ino += 1;
                e.ino = self.next_ino;
                self.cpio.write_entry(&e, None)
            }
        }
    }

    /// Writes what is held and the trailer; the archive's numbers.
    pub fn finish(mut self, out: &Path, file_name: &str, compression: Compression, level: i32) -> Result<ArchiveInfo> {
        self.write_until(None)?;
        let entries = self.entries + 1;
        finish_archive(self.cpio, out, file_name, compression, level, entries)
    }
}
