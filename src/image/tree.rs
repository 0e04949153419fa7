//! The merged filesystem of an image: layers applied in order, as OCI's `layer.md` says.
//!
//! - `.wh.NAME` removes NAME (and everything below it) from the layers underneath;
//!   `.wh..wh..opq` empties its directory of everything from the layers underneath. Neither
//!   touches entries of its own layer. Other `.wh..wh.*` names (aufs bookkeeping) are ignored.
//! - A directory over a directory keeps the children and takes the new metadata; anything else
//!   replaces what was there, with its subtree.
//! - Hardlinks are resolved when they are applied, to the file their target names at that
//!   moment; all links of one file share a group and become one inode in the archive.
//! - Paths are normalised (`./a//b` → `a/b`). An entry whose path climbs out of the root
//!   (`..`), or whose parent is a symlink, is refused: writing through a symlink is how a layer
//!   reaches outside the tree it is unpacked into.
//! - Parent directories a layer leaves out are created (mode 0755, owner root).

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{bail, Context, Result};

use super::LayerBlob;
use crate::util::{ByteProgress, HashingReader};

/// What a path in the merged tree is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    Dir,
    /// A regular file; `group` ties hardlinks together.
    File {
        data: DataRef,
        size: u64,
        group: u32,
    },
    Symlink(Vec<u8>),
    Char {
        major: u32,
        minor: u32,
    },
    Block {
        major: u32,
        minor: u32,
    },
    Fifo,
}

/// The data file of a regular file whose bytes went straight into the output as its layer was read
/// ([`crate::image::stream`]): they cannot be read again.
pub const STREAMED_FILE: u32 = u32::MAX;

/// Where a regular file's bytes are: `offset` within one of the tree's data files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataRef {
    pub file: u32,
    pub offset: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub kind: Kind,
    /// Permission bits, including setuid/setgid/sticky (not the type bits).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: i64,
    /// The layer that last wrote this path (whiteouts only remove older layers' entries).
    pub layer: u32,
}

impl Node {
    fn synthesized_dir(layer: u32, mtime: i64) -> Self {
        Node { kind: Kind::Dir, mode: 0o755, uid: 0, gid: 0, mtime, layer }
    }

    /// The full `st_mode`, type bits included.
    pub fn st_mode(&self) -> u32 {
        let t = match self.kind {
            Kind::Dir => libc::S_IFDIR,
            Kind::File { .. } => libc::S_IFREG,
            Kind::Symlink(_) => libc::S_IFLNK,
            Kind::Char { .. } => libc::S_IFCHR,
            Kind::Block { .. } => libc::S_IFBLK,
            Kind::Fifo => libc::S_IFIFO,
        };
        t | (self.mode & 0o7777)
    }
}

/// Where file contents are read from.
#[derive(Debug)]
pub enum DataFile {
    /// An open file (a blob in place, or a spool of a decompressed layer); offsets are relative
    /// to `base`.
    Handle { file: File, base: u64 },
    /// A directory tree: contents are read from `root/<path>`.
    Root(PathBuf),
}

/// The merged filesystem, in bytewise path order. The root is the empty path.
#[derive(Debug)]
pub struct Tree {
    pub nodes: BTreeMap<Vec<u8>, Node>,
    files: Vec<DataFile>,
    next_group: u32,
}

/// A layer's entries and where their contents are.
type ScannedLayer = (Vec<RawEntry>, DataFile);

/// One tar entry as read from a layer, before merging.
#[derive(Debug)]
pub(crate) struct RawEntry {
    pub(crate) path: Vec<u8>,
    pub(crate) kind: RawKind,
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: i64,
}

#[derive(Debug)]
pub(crate) enum RawKind {
    Dir,
    File { offset: u64, size: u64 },
    HardLink(Vec<u8>),
    Symlink(Vec<u8>),
    Char(u32, u32),
    Block(u32, u32),
    Fifo,
}

impl Default for Tree {
    fn default() -> Self {
        Self::new()
    }
}

impl Tree {
    pub fn new() -> Self {
        let mut nodes = BTreeMap::new();
        nodes.insert(Vec::new(), Node::synthesized_dir(0, 0));
        Tree { nodes, files: Vec::new(), next_group: 0 }
    }

    /// Reads every layer (in parallel, `threads` at a time) and applies them in order; the blob bytes read are
    /// counted in `bytes`.
    pub fn from_layers(layers: &[LayerBlob], spool_dir: &Path, threads: usize, bytes: &ByteProgress) -> Result<Tree> {
        if let Some(total) = layers.iter().map(|l| l.size).sum::<Option<u64>>() {
            bytes.set_total(total);
        }
        let results: Vec<Mutex<Option<Result<ScannedLayer>>>> = layers.iter().map(|_| Mutex::new(None)).collect();
        let next = std::sync::atomic::AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..threads.clamp(1, layers.len().max(1)) {
                s.spawn(|| loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(layer) = layers.get(i) else { break };
                    let r = scan_layer(layer, spool_dir, bytes);
                    let failed = r.is_err();
                    *results[i].lock().unwrap_or_else(|e| e.into_inner()) = Some(r);
                    if failed {
                        // Let the other workers finish their layer but start no new ones.
                        next.store(layers.len(), std::sync::atomic::Ordering::Relaxed);
                        break;
                    }
                });
            }
        });
        let mut tree = Tree::new();
        for (i, (slot, layer)) in results.into_iter().zip(layers).enumerate() {
            let scanned = slot.into_inner().unwrap_or_else(|e| e.into_inner());
            let Some(scanned) = scanned else { bail!("internal: {} was not read", layer.label) };
            let (entries, data) = scanned?;
            tree.files.push(data);
            let file = (tree.files.len() - 1) as u32;
            tree.apply(i as u32 + 1, entries, file).with_context(|| format!("applying {}", layer.label))?;
        }
        Ok(tree)
    }

    /// Adds a data source and returns its index (for trees built from directories).
    pub(crate) fn add_data_file(&mut self, f: DataFile) -> u32 {
        self.files.push(f);
        (self.files.len() - 1) as u32
    }

    pub(crate) fn new_group(&mut self) -> u32 {
        self.next_group += 1;
        self.next_group
    }

    fn apply(&mut self, layer: u32, entries: Vec<RawEntry>, file: u32) -> Result<()> {
        for e in entries {
            self.apply_entry(layer, e, file, None, &mut Vec::new())?;
        }
        Ok(())
    }

    /// Applies one entry; `touched` gets the paths it created or replaced, in order (parent directories a
    /// layer left out first). A regular file's data is at its offset in the layer, in data file `file`, unless
    /// `data_at` says where it is.
    pub(crate) fn apply_entry(
        &mut self,
        layer: u32,
        e: RawEntry,
        file: u32,
        data_at: Option<DataRef>,
        touched: &mut Vec<Vec<u8>>,
    ) -> Result<()> {
        let name = e.path.rsplit(|&b| b == b'/').next().unwrap_or(&[]);
        let parent = parent_of(&e.path);
        self.ensure_parents(&e.path, layer, e.mtime, touched)?;
        if name == b".wh..wh..opq" {
            self.remove_below(parent, layer);
            return Ok(());
        }
        if name.starts_with(b".wh..wh.") {
            return Ok(());
        }
        if let Some(hidden) = name.strip_prefix(b".wh.") {
            let mut target = parent.to_vec();
            if !target.is_empty() {
                target.push(b'/');
            }
            target.extend_from_slice(hidden);
            if self.nodes.get(&target).is_some_and(|n| n.layer < layer) {
                self.nodes.remove(&target);
            }
            self.remove_below(&target, layer);
            return Ok(());
        }
        let kind = match e.kind {
            RawKind::Dir => Kind::Dir,
            RawKind::File { offset, size } => {
                let data = data_at.unwrap_or(DataRef { file, offset });
                Kind::File { data, size, group: self.new_group() }
            }
            RawKind::HardLink(target) => {
                let target = normalize(&target).with_context(|| format!("hardlink /{}", show(&e.path)))?;
                match self.nodes.get(&target) {
                    Some(n @ Node { kind: Kind::File { .. }, .. }) => {
                        // A hardlink is the same inode: it takes the target's metadata too.
                        let mut linked = n.clone();
                        linked.layer = layer;
                        touched.push(e.path.clone());
                        self.replace(e.path, linked);
                        return Ok(());
                    }
                    Some(_) => {
                        bail!("hardlink /{} points to /{}, which is not a regular file", show(&e.path), show(&target))
                    }
                    None => bail!("hardlink /{} points to /{}, which does not exist", show(&e.path), show(&target)),
                }
            }
            RawKind::Symlink(t) => Kind::Symlink(t),
            RawKind::Char(major, minor) => Kind::Char { major, minor },
            RawKind::Block(major, minor) => Kind::Block { major, minor },
            RawKind::Fifo => Kind::Fifo,
        };
        let node = Node { kind, mode: e.mode, uid: e.uid, gid: e.gid, mtime: e.mtime, layer };
        touched.push(e.path.clone());
        self.replace(e.path, node);
        Ok(())
    }

    fn replace(&mut self, path: Vec<u8>, node: Node) {
        let new_is_dir = node.kind == Kind::Dir;
        if let Some(old) = self.nodes.get(&path) {
            if old.kind == Kind::Dir && !new_is_dir {
                self.remove_below(&path, u32::MAX);
            }
        }
        self.nodes.insert(path, node);
    }

    /// Checks that every ancestor of `path` is a directory, creating missing ones (noted in `touched`).
    fn ensure_parents(&mut self, path: &[u8], layer: u32, mtime: i64, touched: &mut Vec<Vec<u8>>) -> Result<()> {
        for (i, &b) in path.iter().enumerate() {
            if b != b'/' {
                continue;
            }
            let prefix = &path[..i];
            match self.nodes.get(prefix) {
                None => {
                    self.nodes.insert(prefix.to_vec(), Node::synthesized_dir(layer, mtime));
                    touched.push(prefix.to_vec());
                }
                Some(Node { kind: Kind::Dir, .. }) => {}
                Some(Node { kind: Kind::Symlink(t), .. }) => bail!(
                    "entry /{} goes through the symlink /{} -> {}: layers must not write through symlinks \
                     (it would land outside the directory it names); rebuild the image without it",
                    show(path),
                    show(prefix),
                    show(t)
                ),
                Some(_) => bail!("entry /{} needs /{} to be a directory, but it is a file", show(path), show(prefix)),
            }
        }
        Ok(())
    }

    /// Removes everything strictly below directory `dir` written by layers older than `layer`.
    fn remove_below(&mut self, dir: &[u8], layer: u32) {
        let (lo, hi) = if dir.is_empty() {
            (Vec::from(&b"\0"[..]), None)
        } else {
            let mut lo = dir.to_vec();
            lo.push(b'/');
            let mut hi = dir.to_vec();
            hi.push(b'/' + 1);
            (lo, Some(hi))
        };
        let doomed: Vec<Vec<u8>> = match &hi {
            Some(hi) => self.nodes.range(lo..hi.clone()),
            None => self.nodes.range(lo..),
        }
        .filter(|(_, n)| n.layer < layer)
        .map(|(k, _)| k.clone())
        .collect();
        for k in doomed {
            self.nodes.remove(&k);
        }
    }

    /// A reader over a regular file's contents.
    pub fn open_data<'a>(&'a self, path: &[u8], node: &Node) -> Result<Box<dyn Read + 'a>> {
        let Kind::File { data, size, .. } = node.kind else {
            bail!("internal: /{} is not a regular file", show(path));
        };
        match self.files.get(data.file as usize) {
            Some(DataFile::Handle { file, base }) => {
                Ok(Box::new(PreadReader { file, pos: base + data.offset, left: size }))
            }
            Some(DataFile::Root(root)) => {
                let full = root.join(OsStr::from_bytes(path));
                let f = File::open(&full).with_context(|| format!("opening {}", full.display()))?;
                Ok(Box::new(f.take(size)))
            }
            None if data.file == STREAMED_FILE => {
                bail!("internal: /{} was written as its layer streamed and cannot be read again", show(path))
            }
            None => bail!("internal: no data file {}", data.file),
        }
    }

    /// Reads a whole (small) regular file, following symlinks within the tree.
    pub fn read_file(&self, path: &[u8]) -> Result<Vec<u8>> {
        let (real, node) = self.resolve(path)?;
        let mut buf = Vec::new();
        self.open_data(&real, node)?.read_to_end(&mut buf).with_context(|| format!("reading /{}", show(&real)))?;
        Ok(buf)
    }

    /// Follows symlinks (relative or absolute, always within the tree) to a node.
    pub fn resolve(&self, path: &[u8]) -> Result<(Vec<u8>, &Node)> {
        let mut cur = normalize(path)?;
        for _ in 0..40 {
            let node = self.nodes.get(&cur).with_context(|| format!("/{} does not exist in the image", show(&cur)))?;
            match &node.kind {
                Kind::Symlink(t) => {
                    let joined = if t.starts_with(b"/") {
                        t.clone()
                    } else {
                        let mut j = parent_of(&cur).to_vec();
                        j.push(b'/');
                        j.extend_from_slice(t);
                        j
                    };
                    cur = normalize_lexically(&joined);
                }
                _ => return Ok((cur, node)),
            }
        }
        bail!("/{}: too many levels of symlinks", show(path))
    }
}

/// Reads `left` bytes of a file from `pos` with pread, so many readers can share one handle.
struct PreadReader<'a> {
    file: &'a File,
    pos: u64,
    left: u64,
}

impl Read for PreadReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let want = buf.len().min(self.left.try_into().unwrap_or(usize::MAX));
        if want == 0 {
            return Ok(0);
        }
        let n = self.file.read_at(&mut buf[..want], self.pos)?;
        self.pos += n as u64;
        self.left -= n as u64;
        Ok(n)
    }
}

/// Copies everything read into a writer (the spool of a decompressed layer).
struct Tee<R, W> {
    r: R,
    w: W,
}

impl<R: Read, W: Write> Read for Tee<R, W> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.r.read(buf)?;
        self.w.write_all(&buf[..n])?;
        Ok(n)
    }
}

pub(crate) enum Compression {
    Gzip,
    Zstd,
    Plain,
}

pub(crate) fn sniff(head: &[u8]) -> Compression {
    if head.starts_with(&[0x1f, 0x8b]) {
        Compression::Gzip
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Compression::Zstd
    } else {
        Compression::Plain
    }
}

/// Reads one layer's tar stream: its entries, and where their contents can be read later.
/// The blob is checked against its digest (or the uncompressed stream against its diff_id).
fn scan_layer(blob: &LayerBlob, spool_dir: &Path, bytes: &ByteProgress) -> Result<ScannedLayer> {
    let what = &blob.label;
    let mut hashed = HashingReader::new(bytes.reader(blob.loc.open()?));
    let mut entries = Vec::new();
    let data;
    let diff;
    {
        let mut peek = BufReader::with_capacity(1 << 20, &mut hashed);
        let head = peek.fill_buf().with_context(|| format!("reading {what}"))?.to_vec();
        let compression = sniff(&head);
        let decoded: Box<dyn Read + '_> = match compression {
            Compression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(peek)),
            Compression::Zstd => Box::new(zstd::stream::read::Decoder::with_buffer(peek).context("starting zstd")?),
            Compression::Plain => Box::new(peek),
        };
        let mut diff_hashed = HashingReader::new(decoded);
        let corrupt = |e: &dyn std::fmt::Display| {
            format!("reading {what}: the layer is truncated or corrupt ({e}); re-pull or re-copy the image")
        };
        match compression {
            Compression::Plain => {
                let file =
                    File::open(&blob.loc.path).with_context(|| format!("opening {}", blob.loc.path.display()))?;
                read_tar(&mut diff_hashed, &mut entries).map_err(|e| anyhow::anyhow!(corrupt(&format!("{e:#}"))))?;
                data = DataFile::Handle { file, base: blob.loc.offset };
            }
            Compression::Gzip | Compression::Zstd => {
                let spool = tempfile::tempfile_in(spool_dir)
                    .with_context(|| format!("creating a spool file in {}", spool_dir.display()))?;
                {
                    let mut tee = Tee { r: &mut diff_hashed, w: io::BufWriter::with_capacity(1 << 20, &spool) };
                    read_tar(&mut tee, &mut entries).map_err(|e| anyhow::anyhow!(corrupt(&format!("{e:#}"))))?;
                    tee.w.flush().with_context(|| format!("writing the spool of {what}"))?;
                }
                data = DataFile::Handle { file: spool, base: 0 };
            }
        }
        diff = diff_hashed.drain().map_err(|e| anyhow::anyhow!(corrupt(&e)))?;
    }
    let (digest, len) = hashed.drain().with_context(|| format!("reading {what}"))?;
    if let Some(expected) = &blob.digest {
        if &digest != expected {
            bail!("{what} is corrupt: its content hashes to {digest}, not {expected}; re-pull or re-copy the image");
        }
    } else if let Some(expected) = &blob.diff_id {
        if &diff.0 != expected {
            bail!("{what} is corrupt: its content hashes to {}, not {expected}; re-pull or re-copy the image", diff.0);
        }
    }
    if let Some(size) = blob.size {
        if size != len {
            bail!("{what} should be {size} bytes but is {len}: the blob is truncated or corrupt");
        }
    }
    Ok((entries, data))
}

fn read_tar<R: Read>(r: R, out: &mut Vec<RawEntry>) -> Result<()> {
    let mut archive = tar::Archive::new(r);
    for entry in archive.entries()? {
        let mut entry = entry?;
        if let Some(e) = raw_entry(&mut entry)? {
            out.push(e);
        }
    }
    // Read up to the end of the stream so the digest covers every byte.
    let mut rest = archive.into_inner();
    io::copy(&mut rest, &mut io::sink())?;
    Ok(())
}

pub(crate) fn raw_entry<R: Read>(entry: &mut tar::Entry<'_, R>) -> Result<Option<RawEntry>> {
    use tar::EntryType as T;
    let raw_path = entry.path_bytes().into_owned();
    let etype = entry.header().entry_type();
    if matches!(etype, T::XGlobalHeader | T::XHeader | T::GNULongName | T::GNULongLink) {
        return Ok(None);
    }
    let path = normalize(&raw_path)?;
    let hdr = entry.header();
    let mut uid = hdr.uid().unwrap_or(0);
    let mut gid = hdr.gid().unwrap_or(0);
    let mut mtime = hdr.mtime().unwrap_or(0) as i64;
    let mode = hdr.mode().with_context(|| format!("/{}: bad mode field", show(&path)))? & 0o7777;
    let dev = |f: io::Result<Option<u32>>| f.ok().flatten().unwrap_or(0);
    let (major, minor) = (dev(hdr.device_major()), dev(hdr.device_minor()));
    let link = entry.link_name_bytes().map(|l| l.into_owned());
    if let Ok(Some(pax)) = entry.pax_extensions() {
        for ext in pax.flatten() {
            let v = ext.value().ok().and_then(|v| v.split('.').next().and_then(|v| v.parse::<i64>().ok()));
            match (ext.key().unwrap_or(""), v) {
                ("uid", Some(v)) => uid = v as u64,
                ("gid", Some(v)) => gid = v as u64,
                ("mtime", Some(v)) => mtime = v,
                _ => {}
            }
        }
    }
    let size = entry.size();
    let kind = match etype {
        T::Regular | T::Continuous => RawKind::File { offset: entry.raw_file_position(), size },
        T::Directory => RawKind::Dir,
        T::Link => RawKind::HardLink(link.with_context(|| format!("hardlink /{} has no target", show(&path)))?),
        T::Symlink => RawKind::Symlink(link.with_context(|| format!("symlink /{} has no target", show(&path)))?),
        T::Char => RawKind::Char(major, minor),
        T::Block => RawKind::Block(major, minor),
        T::Fifo => RawKind::Fifo,
        T::GNUSparse => bail!("/{} is a sparse file, which kiln does not support in layers", show(&path)),
        other => bail!("/{} has unsupported tar entry type {:?}", show(&path), other.as_byte() as char),
    };
    if path.is_empty() && !matches!(kind, RawKind::Dir) {
        bail!("the root of the image is not a directory");
    }
    let to_u32 =
        |v: u64, what: &str| u32::try_from(v).with_context(|| format!("/{}: {what} {v} is too large", show(&path)));
    Ok(Some(RawEntry { uid: to_u32(uid, "uid")?, gid: to_u32(gid, "gid")?, path, kind, mode, mtime }))
}

/// `./a//b/` → `a/b`, `/` → `` (the root). `..` anywhere is refused.
pub fn normalize(p: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(p.len());
    for comp in p.split(|&b| b == b'/') {
        match comp {
            b"" | b"." => {}
            b".." => {
                bail!("path {:?} climbs out of the image root with '..'; the layer is malformed or hostile", show(p))
            }
            c => {
                if !out.is_empty() {
                    out.push(b'/');
                }
                out.extend_from_slice(c);
            }
        }
    }
    Ok(out)
}

/// Like [`normalize`], but resolves `..` (clamped at the root) as a path lookup inside the tree does.
fn normalize_lexically(p: &[u8]) -> Vec<u8> {
    let mut parts: Vec<&[u8]> = Vec::new();
    for comp in p.split(|&b| b == b'/') {
        match comp {
            b"" | b"." => {}
            b".." => {
                parts.pop();
            }
            c => parts.push(c),
        }
    }
    parts.join(&b'/')
}

fn parent_of(p: &[u8]) -> &[u8] {
    match p.iter().rposition(|&b| b == b'/') {
        Some(i) => &p[..i],
        None => &[],
    }
}

pub fn show(p: &[u8]) -> String {
    String::from_utf8_lossy(p).into_owned()
}

/// Counts members per hardlink group (used to give each group one inode in the archive).
pub fn group_sizes<'a>(nodes: impl Iterator<Item = &'a Node>) -> HashMap<u32, u32> {
    let mut m = HashMap::new();
    for n in nodes {
        if let Kind::File { group, .. } = n.kind {
            *m.entry(group).or_insert(0) += 1;
        }
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(path: &str, size: u64) -> RawEntry {
        RawEntry { path: path.into(), kind: RawKind::File { offset: 0, size }, mode: 0o644, uid: 0, gid: 0, mtime: 5 }
    }

    fn dir(path: &str) -> RawEntry {
        RawEntry { path: path.into(), kind: RawKind::Dir, mode: 0o755, uid: 0, gid: 0, mtime: 5 }
    }

    fn paths(t: &Tree) -> Vec<String> {
        t.nodes.keys().map(|k| show(k)).collect()
    }

    #[test]
    fn normalize_paths() {
        assert_eq!(normalize(b"./a//b/").unwrap(), b"a/b");
        assert_eq!(normalize(b"/").unwrap(), b"");
        assert!(normalize(b"a/../../etc/shadow").unwrap_err().to_string().contains("climbs out"));
        assert_eq!(normalize_lexically(b"boot/../../vmlinuz"), b"vmlinuz");
    }

    #[test]
    fn whiteouts_remove_lower_layers_only() {
        let mut t = Tree::new();
        t.apply(
            1,
            vec![
                dir("etc"),
                file("etc/a", 1),
                file("etc/b", 1),
                dir("opt"),
                file("opt/x", 1),
                dir("opt/d"),
                file("opt/d/y", 1),
            ],
            0,
        )
        .unwrap();
        t.apply(2, vec![file("etc/.wh.a", 0), file("opt/new", 1), file("opt/.wh..wh..opq", 0)], 0).unwrap();
        assert_eq!(paths(&t), vec!["", "etc", "etc/b", "opt", "opt/new"]);
    }

    #[test]
    fn whiteout_of_directory_removes_subtree() {
        let mut t = Tree::new();
        t.apply(1, vec![dir("a"), dir("a/b"), file("a/b/c", 1), file("a-c", 1)], 0).unwrap();
        t.apply(2, vec![file(".wh.a", 0)], 0).unwrap();
        assert_eq!(paths(&t), vec!["", "a-c"]);
    }

    #[test]
    fn file_replacing_directory_drops_children() {
        let mut t = Tree::new();
        t.apply(1, vec![dir("a"), file("a/x", 1)], 0).unwrap();
        t.apply(2, vec![file("a", 1)], 0).unwrap();
        assert_eq!(paths(&t), vec!["", "a"]);
        assert!(matches!(t.nodes[&b"a"[..]].kind, Kind::File { .. }));
    }

    #[test]
    fn missing_parents_are_created_and_sorted_bytewise() {
        let mut t = Tree::new();
        t.apply(1, vec![file("a/b", 1), file("a-c", 1)], 0).unwrap();
        assert_eq!(paths(&t), vec!["", "a", "a-c", "a/b"]);
    }

    #[test]
    fn writing_through_symlink_is_refused() {
        let mut t = Tree::new();
        let link = RawEntry {
            path: b"evil".to_vec(),
            kind: RawKind::Symlink(b"/etc".to_vec()),
            mode: 0o777,
            uid: 0,
            gid: 0,
            mtime: 0,
        };
        let err = t.apply(1, vec![link, file("evil/passwd", 1)], 0).unwrap_err().to_string();
        assert!(err.contains("goes through the symlink /evil -> /etc"), "{err}");
    }

    #[test]
    fn hardlinks_share_a_group() {
        let mut t = Tree::new();
        let link = RawEntry {
            path: b"b".to_vec(),
            kind: RawKind::HardLink(b"./a".to_vec()),
            mode: 0,
            uid: 0,
            gid: 0,
            mtime: 0,
        };
        t.apply(1, vec![file("a", 3), link], 0).unwrap();
        assert_eq!(t.nodes[&b"a"[..]].kind, t.nodes[&b"b"[..]].kind);
        let dangling = RawEntry {
            path: b"c".to_vec(),
            kind: RawKind::HardLink(b"nope".to_vec()),
            mode: 0,
            uid: 0,
            gid: 0,
            mtime: 0,
        };
        assert!(t.apply(1, vec![dangling], 0).unwrap_err().to_string().contains("does not exist"));
    }

    #[test]
    fn resolve_follows_symlinks_inside_the_tree() {
        let mut t = Tree::new();
        let l1 = RawEntry {
            path: b"vmlinuz".to_vec(),
            kind: RawKind::Symlink(b"boot/vmlinuz-1".to_vec()),
            mode: 0o777,
            uid: 0,
            gid: 0,
            mtime: 0,
        };
        t.apply(1, vec![dir("boot"), file("boot/vmlinuz-1", 1), l1], 0).unwrap();
        assert_eq!(t.resolve(b"/vmlinuz").unwrap().0, b"boot/vmlinuz-1");
    }
}
