//! A reproducible squashfs 4.0 writer: the `image` of a two-stage bundle, which the loader mounts read-only.
//!
//! Reference: the kernel's `fs/squashfs/squashfs_fs.h` and `Documentation/filesystems/squashfs.rst`, and the
//! layout `mksquashfs` writes (superblock, data blocks and fragments, inode table, directory table, fragment
//! table, id table). Chosen over newc because it has no 4 GiB limit (64-bit file sizes in extended inodes) and
//! the node mounts it in place instead of unpacking it: RAM holds the compressed image only.
//!
//! How it is written:
//! - [`SquashfsWriter::add_file`] takes each regular file's bytes, in the caller's order, cut into
//!   `block_size` blocks; full blocks of zeros become sparse blocks (no bytes at all), tails shorter than a
//!   block are packed into shared fragment blocks. Blocks are compressed by a pool of threads and written in
//!   submission order, so the bytes do not depend on the number of threads; memory holds a few blocks per
//!   thread whatever the image size.
//! - [`SquashfsWriter::finish`] takes the whole tree (paths in bytewise order, root first) and writes the
//!   metadata: inodes in post-order (children before their directory), directory listings, then the tables and
//!   the superblock. Hardlinks (entries sharing one [`DataId`]) are one inode with a link count.
//!
//! Why not a crate: `backhand` (the maintained Rust squashfs library) builds an image from readers it keeps until
//! `FilesystemWriter::write`, which reads them all then; kiln's one-layer builds feed files from a tar stream
//! that can be read once, in order (`bundle::streamed`), so with backhand they would be spooled to disk first,
//! which is the cost the streamed build exists to avoid. `mksquashfs` (squashfs-tools) would be a run-time
//! dependency reading a tree from disk, the same spool. The two were not measured against this writer.
//!
//! Not written: extended attributes, the NFS export table, duplicate-file detection, directory indexes (the
//! kernel looks names up without them, scanning the listing).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use anyhow::{anyhow, bail, Context, Result};

use super::Compression;

const MAGIC: u32 = 0x7371_7368;
const SUPERBLOCK_SIZE: u64 = 96;
const METADATA_SIZE: usize = 8192;
const METADATA_UNCOMPRESSED: u16 = 1 << 15;
const DATA_UNCOMPRESSED: u32 = 1 << 24;
const INVALID: u64 = u64::MAX;
const NO_FRAGMENT: u32 = u32::MAX;
const NAME_MAX: usize = 256;
/// Entries one directory header may cover (the kernel refuses more).
const DIR_RUN_MAX: usize = 256;

const FLAG_UNCOMPRESSED_INODES: u16 = 0x0001;
const FLAG_UNCOMPRESSED_DATA: u16 = 0x0002;
const FLAG_UNCOMPRESSED_FRAGMENTS: u16 = 0x0008;
const FLAG_NO_XATTRS: u16 = 0x0200;
const FLAG_UNCOMPRESSED_IDS: u16 = 0x0800;

const DIR: u16 = 1;
const FILE: u16 = 2;
const SYMLINK: u16 = 3;
const BLOCK_DEV: u16 = 4;
const CHAR_DEV: u16 = 5;
const FIFO: u16 = 6;
const SOCKET: u16 = 7;
const EXT_DIR: u16 = 8;
const EXT_FILE: u16 = 9;

/// The default data block size: mksquashfs's, a balance between ratio and the cost of a random read.
pub const DEFAULT_BLOCK_SIZE: u32 = 128 * 1024;

/// How the image is compressed and cut.
#[derive(Debug, Clone, Copy)]
pub struct SquashfsOptions {
    pub compression: Compression,
    pub level: i32,
    /// A power of two from 4 KiB to 1 MiB.
    pub block_size: u32,
    pub threads: usize,
    /// The superblock's modification time.
    pub mtime: u32,
}

/// A regular file's data, as returned by [`SquashfsWriter::add_file`]; entries sharing one are hardlinks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DataId(u32);

/// What a path is.
#[derive(Debug, Clone)]
pub enum EntryKind<'a> {
    Dir,
    File(DataId),
    Symlink(&'a [u8]),
    Char { major: u32, minor: u32 },
    Block { major: u32, minor: u32 },
    Fifo,
    Socket,
}

/// One path of the tree given to [`SquashfsWriter::finish`].
#[derive(Debug, Clone)]
pub struct Entry<'a> {
    /// Relative, `/`-separated, no leading `/`; the root is the empty path.
    pub path: &'a [u8],
    pub kind: EntryKind<'a>,
    /// Permission bits (0o7777).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: u32,
}

/// Numbers about a written image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SquashfsInfo {
    pub size: u64,
    pub inodes: u32,
    pub fragments: u32,
    /// Sum of the regular files' sizes (hardlinked data counted once).
    pub file_bytes: u64,
}

/// Where one file's data went.
#[derive(Debug, Clone, Default)]
struct Layout {
    size: u64,
    start: Option<u64>,
    blocks: Vec<u32>,
    sparse: u64,
    fragment: Option<(u32, u32)>,
}

enum Target {
    Block(u32),
    Fragment(u32),
}

struct Job {
    seq: u64,
    target: Target,
    data: Vec<u8>,
    /// A full block may be stored sparse when it is all zeros.
    full: bool,
}

struct Done {
    seq: u64,
    target: Target,
    /// None: a sparse block.
    bytes: Option<(Vec<u8>, bool)>,
}

/// What the writer thread hands back: the file, where the data ended, where each file's blocks went, and the
/// fragment table.
type Written = (File, u64, HashMap<u32, (u64, Vec<u32>)>, Vec<(u64, u32)>);

/// Writes one squashfs image: [`SquashfsWriter::add_file`] for every file's data, then
/// [`SquashfsWriter::finish`] with the tree.
pub struct SquashfsWriter {
    opts: SquashfsOptions,
    jobs: Option<SyncSender<Job>>,
    workers: Vec<JoinHandle<()>>,
    writer: Option<JoinHandle<Result<Written>>>,
    seq: u64,
    layouts: Vec<Layout>,
    fragment: Vec<u8>,
    fragments: u32,
    buf: Vec<u8>,
}

impl SquashfsWriter {
    /// Starts an image in `file` (written from its start; it is truncated).
    pub fn new(mut file: File, opts: SquashfsOptions) -> Result<Self> {
        if !opts.block_size.is_power_of_two() || !(4096..=1 << 20).contains(&opts.block_size) {
            bail!("squashfs block size {} is not a power of two from 4 KiB to 1 MiB", opts.block_size);
        }
        opts.compression.check_level(opts.level)?;
        file.set_len(0)?;
        file.seek(SeekFrom::Start(0))?;
        file.write_all(&[0u8; SUPERBLOCK_SIZE as usize])?;
        let threads = opts.threads.max(1);
        let (jobs_tx, jobs_rx) = sync_channel::<Job>(threads * 2);
        let (done_tx, done_rx) = sync_channel::<Result<Done>>(threads * 2);
        let jobs_rx = Arc::new(Mutex::new(jobs_rx));
        let mut workers = Vec::with_capacity(threads);
        for i in 0..threads {
            let rx = jobs_rx.clone();
            let tx = done_tx.clone();
            let worker = std::thread::Builder::new()
                .name(format!("kiln-squashfs-{i}"))
                .spawn(move || compress_loop(&rx, &tx, opts))
                .context("starting a compression thread")?;
            workers.push(worker);
        }
        drop(done_tx);
        let writer = std::thread::Builder::new()
            .name("kiln-squashfs-writer".into())
            .spawn(move || write_loop(file, done_rx))
            .context("starting the writer thread")?;
        Ok(SquashfsWriter {
            opts,
            jobs: Some(jobs_tx),
            workers,
            writer: Some(writer),
            seq: 0,
            layouts: Vec::new(),
            fragment: Vec::with_capacity(opts.block_size as usize),
            fragments: 0,
            buf: Vec::new(),
        })
    }

    fn send(&mut self, target: Target, data: Vec<u8>, full: bool) -> Result<()> {
        let job = Job { seq: self.seq, target, data, full };
        self.seq += 1;
        let sent = self.jobs.as_ref().map(|tx| tx.send(job).is_ok()).unwrap_or(false);
        if !sent {
            // A worker or the writer stopped: its error says why.
            return Err(self.stop().err().unwrap_or_else(|| anyhow!("internal: the squashfs pipeline stopped")));
        }
        Ok(())
    }

    /// Adds a regular file's contents: exactly `size` bytes read from `data`.
    pub fn add_file(&mut self, data: &mut dyn Read, size: u64) -> Result<DataId> {
        let id = u32::try_from(self.layouts.len()).context("more than 4 billion files")?;
        let bs = self.opts.block_size as u64;
        let mut layout = Layout { size, ..Default::default() };
        let mut left = size;
        while left >= bs {
            let mut block = std::mem::take(&mut self.buf);
            block.resize(bs as usize, 0);
            data.read_exact(&mut block).map_err(|e| short_read(e, size, size - left))?;
            left -= bs;
            self.send(Target::Block(id), block, true)?;
        }
        if left > 0 {
            let tail = left as usize;
            if self.fragment.len() + tail > bs as usize {
                self.flush_fragment()?;
            }
            let offset = self.fragment.len();
            self.fragment.resize(offset + tail, 0);
            data.read_exact(&mut self.fragment[offset..]).map_err(|e| short_read(e, size, size - left))?;
            layout.fragment = Some((self.fragments, offset as u32));
        }
        self.layouts.push(layout);
        Ok(DataId(id))
    }

    fn flush_fragment(&mut self) -> Result<()> {
        if self.fragment.is_empty() {
            return Ok(());
        }
        let data = std::mem::replace(&mut self.fragment, Vec::with_capacity(self.opts.block_size as usize));
        let index = self.fragments;
        self.fragments += 1;
        self.send(Target::Fragment(index), data, false)
    }

    /// Closes the pipeline and returns what the writer wrote.
    fn stop(&mut self) -> Result<Written> {
        self.jobs = None;
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
        match self.writer.take() {
            Some(w) => w.join().map_err(|_| anyhow!("internal: the squashfs writer thread panicked"))?,
            None => bail!("internal: the squashfs writer was already stopped"),
        }
    }

    /// Writes the metadata for `entries` (every path of the tree, bytewise sorted, root first) and the
    /// superblock; returns the file, positioned anywhere, and numbers about the image.
    pub fn finish(mut self, entries: &[Entry<'_>]) -> Result<(File, SquashfsInfo)> {
        self.flush_fragment()?;
        let (mut file, data_end, blocks, fragment_list) = self.stop()?;
        for (id, (start, sizes)) in blocks {
            let layout = &mut self.layouts[id as usize];
            layout.sparse = sizes.iter().filter(|&&s| s == 0).count() as u64 * self.opts.block_size as u64;
            layout.start = Some(start);
            layout.blocks = sizes;
        }
        let tables = Tables::build(entries, &self.layouts, &self.opts)?;
        let mut meta = MetaCompressor::new(self.opts);
        let inode_table = data_end;
        file.seek(SeekFrom::Start(data_end))?;
        let put = |file: &mut File, bytes: &[u8]| -> Result<u64> {
            let at = file.stream_position()?;
            file.write_all(bytes).context("writing the image")?;
            Ok(at)
        };
        put(&mut file, &tables.inodes)?;
        let directory_table = put(&mut file, &tables.dirs)?;
        let fragment_table = if fragment_list.is_empty() {
            file.stream_position()?
        } else {
            let mut raw = Vec::with_capacity(fragment_list.len() * 16);
            for (start, size) in &fragment_list {
                raw.extend_from_slice(&start.to_le_bytes());
                raw.extend_from_slice(&size.to_le_bytes());
                raw.extend_from_slice(&0u32.to_le_bytes());
            }
            let (blocks_bytes, offsets) = meta.table(&raw)?;
            let blocks_at = put(&mut file, &blocks_bytes)?;
            let index: Vec<u8> = offsets.iter().flat_map(|o| (blocks_at + o).to_le_bytes()).collect();
            put(&mut file, &index)?
        };
        let raw_ids: Vec<u8> = tables.ids.iter().flat_map(|id| id.to_le_bytes()).collect();
        let (id_blocks, id_offsets) = meta.table(&raw_ids)?;
        let id_blocks_at = put(&mut file, &id_blocks)?;
        let id_index: Vec<u8> = id_offsets.iter().flat_map(|o| (id_blocks_at + o).to_le_bytes()).collect();
        let id_table = put(&mut file, &id_index)?;
        let bytes_used = file.stream_position()?;
        // Loop devices read whole 4 KiB pages: pad to one.
        let padded = bytes_used.next_multiple_of(4096);
        file.write_all(&vec![0u8; (padded - bytes_used) as usize])?;

        let mut flags = FLAG_NO_XATTRS;
        if self.opts.compression == Compression::None {
            flags |=
                FLAG_UNCOMPRESSED_INODES | FLAG_UNCOMPRESSED_DATA | FLAG_UNCOMPRESSED_FRAGMENTS | FLAG_UNCOMPRESSED_IDS;
        }
        let mut sb = Vec::with_capacity(SUPERBLOCK_SIZE as usize);
        sb.extend_from_slice(&MAGIC.to_le_bytes());
        sb.extend_from_slice(&tables.inode_count.to_le_bytes());
        sb.extend_from_slice(&self.opts.mtime.to_le_bytes());
        sb.extend_from_slice(&self.opts.block_size.to_le_bytes());
        sb.extend_from_slice(&(fragment_list.len() as u32).to_le_bytes());
        sb.extend_from_slice(&compressor_id(self.opts.compression).to_le_bytes());
        sb.extend_from_slice(&(self.opts.block_size.trailing_zeros() as u16).to_le_bytes());
        sb.extend_from_slice(&flags.to_le_bytes());
        sb.extend_from_slice(&(tables.ids.len() as u16).to_le_bytes());
        sb.extend_from_slice(&4u16.to_le_bytes());
        sb.extend_from_slice(&0u16.to_le_bytes());
        sb.extend_from_slice(&tables.root.to_le_bytes());
        sb.extend_from_slice(&bytes_used.to_le_bytes());
        sb.extend_from_slice(&id_table.to_le_bytes());
        sb.extend_from_slice(&INVALID.to_le_bytes()); // xattr id table
        sb.extend_from_slice(&inode_table.to_le_bytes());
        sb.extend_from_slice(&directory_table.to_le_bytes());
        sb.extend_from_slice(&fragment_table.to_le_bytes());
        sb.extend_from_slice(&INVALID.to_le_bytes()); // export table
        debug_assert_eq!(sb.len() as u64, SUPERBLOCK_SIZE);
        file.seek(SeekFrom::Start(0))?;
        file.write_all(&sb)?;
        file.flush()?;
        let file_bytes = self.layouts.iter().map(|l| l.size).sum();
        Ok((
            file,
            SquashfsInfo {
                size: padded,
                inodes: tables.inode_count,
                fragments: fragment_list.len() as u32,
                file_bytes,
            },
        ))
    }
}

impl Drop for SquashfsWriter {
    fn drop(&mut self) {
        if self.writer.is_some() {
            let _ = self.stop();
        }
    }
}

fn short_read(e: io::Error, size: u64, at: u64) -> anyhow::Error {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        anyhow!("expected {size} bytes of content but the source ended after about {at}: it is truncated")
    } else {
        anyhow::Error::new(e).context("reading file contents")
    }
}

fn compressor_id(c: Compression) -> u16 {
    match c {
        // squashfs's "gzip" is a zlib stream; an uncompressed image still names a compressor the kernel has.
        Compression::Gzip | Compression::None => 1,
        Compression::Zstd => 6,
    }
}

/// One compressor per thread, reused block after block.
enum BlockCompressor {
    Zstd(Box<zstd::bulk::Compressor<'static>>),
    Zlib(i32),
    None,
}

impl BlockCompressor {
    fn new(c: Compression, level: i32) -> Result<Self> {
        Ok(match c {
            Compression::Zstd => BlockCompressor::Zstd(Box::new(
                zstd::bulk::Compressor::new(level).context("starting a zstd compressor")?,
            )),
            Compression::Gzip => BlockCompressor::Zlib(level),
            Compression::None => BlockCompressor::None,
        })
    }

    /// The stored bytes and whether they are compressed (they are not when compressing does not shrink them).
    fn compress(&mut self, data: Vec<u8>) -> Result<(Vec<u8>, bool)> {
        let packed = match self {
            BlockCompressor::Zstd(c) => c.compress(&data).context("zstd")?,
            BlockCompressor::Zlib(level) => {
                let mut e = flate2::write::ZlibEncoder::new(
                    Vec::with_capacity(data.len() / 2),
                    flate2::Compression::new(*level as u32),
                );
                e.write_all(&data)?;
                e.finish()?
            }
            BlockCompressor::None => return Ok((data, false)),
        };
        Ok(if packed.len() < data.len() { (packed, true) } else { (data, false) })
    }
}

fn compress_loop(jobs: &Mutex<Receiver<Job>>, done: &SyncSender<Result<Done>>, opts: SquashfsOptions) {
    let mut comp = match BlockCompressor::new(opts.compression, opts.level) {
        Ok(c) => c,
        Err(e) => {
            let _ = done.send(Err(e));
            return;
        }
    };
    loop {
        let job = match jobs.lock() {
            Ok(rx) => rx.recv(),
            Err(_) => return,
        };
        let Ok(job) = job else { return };
        let result = if job.full && job.data.iter().all(|&b| b == 0) {
            Ok(Done { seq: job.seq, target: job.target, bytes: None })
        } else {
            comp.compress(job.data).map(|b| Done { seq: job.seq, target: job.target, bytes: Some(b) })
        };
        if done.send(result).is_err() {
            return;
        }
    }
}

/// Writes compressed blocks in submission order and notes where each went.
fn write_loop(file: File, done: Receiver<Result<Done>>) -> Result<Written> {
    let mut out = io::BufWriter::with_capacity(1 << 20, file);
    let mut pos = SUPERBLOCK_SIZE;
    let mut next = 0u64;
    let mut waiting: BTreeMap<u64, Done> = BTreeMap::new();
    let mut blocks: HashMap<u32, (u64, Vec<u32>)> = HashMap::new();
    let mut fragments: Vec<(u64, u32)> = Vec::new();
    for d in done {
        let d = d?;
        waiting.insert(d.seq, d);
        while let Some(d) = waiting.remove(&next) {
            next += 1;
            let size = match &d.bytes {
                None => 0,
                Some((bytes, compressed)) => {
                    out.write_all(bytes).context("writing the image")?;
                    bytes.len() as u32 | if *compressed { 0 } else { DATA_UNCOMPRESSED }
                }
            };
            match d.target {
                Target::Block(id) => blocks.entry(id).or_insert_with(|| (pos, Vec::new())).1.push(size),
                Target::Fragment(i) => {
                    debug_assert_eq!(i as usize, fragments.len());
                    fragments.push((pos, size));
                }
            }
            pos += d.bytes.as_ref().map(|(b, _)| b.len() as u64).unwrap_or(0);
        }
    }
    if !waiting.is_empty() {
        bail!("internal: the squashfs pipeline lost a block");
    }
    let file = out.into_inner().map_err(|e| e.into_error()).context("writing the image")?;
    Ok((file, pos, blocks, fragments))
}

/// Compresses metadata into the 8 KiB blocks squashfs tables are made of.
struct MetaCompressor {
    comp: BlockCompressor,
}

impl MetaCompressor {
    fn new(opts: SquashfsOptions) -> Self {
        let comp = BlockCompressor::new(opts.compression, opts.level).unwrap_or(BlockCompressor::None);
        MetaCompressor { comp }
    }

    fn block(&mut self, raw: &[u8], out: &mut Vec<u8>) -> Result<()> {
        let (bytes, compressed) = self.comp.compress(raw.to_vec())?;
        let header = bytes.len() as u16 | if compressed { 0 } else { METADATA_UNCOMPRESSED };
        out.extend_from_slice(&header.to_le_bytes());
        out.extend_from_slice(&bytes);
        Ok(())
    }

    /// A whole table: its blocks, and each block's offset among them (for the table's index).
    fn table(&mut self, raw: &[u8]) -> Result<(Vec<u8>, Vec<u64>)> {
        let mut out = Vec::new();
        let mut offsets = Vec::new();
        for chunk in raw.chunks(METADATA_SIZE) {
            offsets.push(out.len() as u64);
            self.block(chunk, &mut out)?;
        }
        Ok((out, offsets))
    }
}

/// A metadata stream (inode or directory table) written as it grows; positions are (block start, offset).
struct MetaStream {
    out: Vec<u8>,
    cur: Vec<u8>,
}

impl MetaStream {
    fn new() -> Self {
        MetaStream { out: Vec::new(), cur: Vec::with_capacity(METADATA_SIZE) }
    }

    fn position(&self) -> (u32, u16) {
        (self.out.len() as u32, self.cur.len() as u16)
    }

    fn write(&mut self, mut bytes: &[u8], meta: &mut MetaCompressor) -> Result<()> {
        while !bytes.is_empty() {
            let room = METADATA_SIZE - self.cur.len();
            let n = room.min(bytes.len());
            self.cur.extend_from_slice(&bytes[..n]);
            bytes = &bytes[n..];
            if self.cur.len() == METADATA_SIZE {
                meta.block(&self.cur, &mut self.out)?;
                self.cur.clear();
            }
        }
        Ok(())
    }

    fn finish(mut self, meta: &mut MetaCompressor) -> Result<Vec<u8>> {
        if !self.cur.is_empty() {
            meta.block(&self.cur, &mut self.out)?;
        }
        Ok(self.out)
    }
}

/// The metadata of the whole tree, compressed.
struct Tables {
    inodes: Vec<u8>,
    dirs: Vec<u8>,
    ids: Vec<u32>,
    root: u64,
    inode_count: u32,
}

fn basic_type(kind: &EntryKind<'_>) -> u16 {
    match kind {
        EntryKind::Dir => DIR,
        EntryKind::File(_) => FILE,
        EntryKind::Symlink(_) => SYMLINK,
        EntryKind::Block { .. } => BLOCK_DEV,
        EntryKind::Char { .. } => CHAR_DEV,
        EntryKind::Fifo => FIFO,
        EntryKind::Socket => SOCKET,
    }
}

/// Linux's `new_encode_dev`, which squashfs stores.
fn encode_dev(major: u32, minor: u32) -> u32 {
    (minor & 0xff) | ((major & 0xfff) << 8) | ((minor & !0xff) << 12)
}

fn show(p: &[u8]) -> String {
    String::from_utf8_lossy(p).into_owned()
}

impl Tables {
    fn build(entries: &[Entry<'_>], layouts: &[Layout], opts: &SquashfsOptions) -> Result<Tables> {
        let Some(root) = entries.first().filter(|e| e.path.is_empty() && matches!(e.kind, EntryKind::Dir)) else {
            bail!("internal: a squashfs tree starts with its root directory");
        };
        let _ = root;
        // Children of each directory, in the order given (bytewise by name for direct children).
        let mut dir_index: HashMap<&[u8], usize> = HashMap::new();
        let mut children: Vec<Vec<usize>> = vec![Vec::new(); entries.len()];
        let mut parent_of = vec![0usize; entries.len()];
        let mut links: HashMap<DataId, u32> = HashMap::new();
        for (i, e) in entries.iter().enumerate() {
            if i > 0 {
                let (parent, name) = match e.path.iter().rposition(|&b| b == b'/') {
                    Some(k) => (&e.path[..k], &e.path[k + 1..]),
                    None => (&b""[..], e.path),
                };
                if name.is_empty() || name.len() > NAME_MAX {
                    bail!("/{}: a name must be 1 to {NAME_MAX} bytes long", show(e.path));
                }
                let p = *dir_index
                    .get(parent)
                    .with_context(|| format!("internal: /{} comes before its directory", show(e.path)))?;
                children[p].push(i);
                parent_of[i] = p;
            }
            match e.kind {
                EntryKind::Dir => {
                    dir_index.insert(e.path, i);
                }
                EntryKind::File(id) => {
                    if id.0 as usize >= layouts.len() {
                        bail!("internal: /{} names data that was never added", show(e.path));
                    }
                    *links.entry(id).or_insert(0) += 1;
                }
                _ => {}
            }
        }
        // Post-order: a directory after everything below it, since its listing names their inodes.
        let mut order = Vec::with_capacity(entries.len());
        let mut stack: Vec<(usize, usize)> = vec![(0, 0)];
        while let Some((dir, next)) = stack.pop() {
            if let Some(&child) = children[dir].get(next) {
                stack.push((dir, next + 1));
                if matches!(entries[child].kind, EntryKind::Dir) {
                    stack.push((child, 0));
                } else {
                    order.push(child);
                }
            } else {
                order.push(dir);
            }
        }
        // Inode numbers in writing order; hardlinks share their first link's.
        let mut number = vec![0u32; entries.len()];
        let mut data_number: HashMap<DataId, u32> = HashMap::new();
        let mut count = 0u32;
        for &i in &order {
            number[i] = match entries[i].kind {
                EntryKind::File(id) => *data_number.entry(id).or_insert_with(|| {
                    count += 1;
                    count
                }),
                _ => {
                    count += 1;
                    count
                }
            };
        }
        let ids: Vec<u32> = entries.iter().flat_map(|e| [e.uid, e.gid]).collect::<BTreeSet<_>>().into_iter().collect();
        if ids.len() > u16::MAX as usize + 1 {
            bail!("the image uses {} distinct owners and groups; squashfs holds at most 65536", ids.len());
        }
        let id_index: HashMap<u32, u16> = ids.iter().enumerate().map(|(i, &v)| (v, i as u16)).collect();

        let mut meta = MetaCompressor::new(*opts);
        let mut inodes = MetaStream::new();
        let mut dirs = MetaStream::new();
        let mut reference = vec![0u64; entries.len()];
        let mut data_ref: HashMap<DataId, u64> = HashMap::new();
        let mut buf = Vec::with_capacity(256);
        for &i in &order {
            let e = &entries[i];
            if let EntryKind::File(id) = e.kind {
                if let Some(&r) = data_ref.get(&id) {
                    reference[i] = r;
                    continue;
                }
            }
            buf.clear();
            let header = |buf: &mut Vec<u8>, t: u16| {
                buf.extend_from_slice(&t.to_le_bytes());
                buf.extend_from_slice(&((e.mode & 0o7777) as u16).to_le_bytes());
                buf.extend_from_slice(&id_index[&e.uid].to_le_bytes());
                buf.extend_from_slice(&id_index[&e.gid].to_le_bytes());
                buf.extend_from_slice(&e.mtime.to_le_bytes());
                buf.extend_from_slice(&number[i].to_le_bytes());
            };
            match &e.kind {
                EntryKind::Dir => {
                    let (block, offset) = dirs.position();
                    let listing = listing(&children[i], entries, &reference, &number)?;
                    dirs.write(&listing, &mut meta)?;
                    let size = listing.len() as u64 + 3;
                    let subdirs = children[i].iter().filter(|&&c| matches!(entries[c].kind, EntryKind::Dir)).count();
                    let nlink = 2 + subdirs as u32;
                    let parent = if i == 0 { count + 1 } else { number[parent_of[i]] };
                    if size <= u16::MAX as u64 {
                        header(&mut buf, DIR);
                        buf.extend_from_slice(&block.to_le_bytes());
                        buf.extend_from_slice(&nlink.to_le_bytes());
                        buf.extend_from_slice(&(size as u16).to_le_bytes());
                        buf.extend_from_slice(&offset.to_le_bytes());
                        buf.extend_from_slice(&parent.to_le_bytes());
                    } else {
                        let size =
                            u32::try_from(size).with_context(|| format!("/{}: directory too large", show(e.path)))?;
                        header(&mut buf, EXT_DIR);
                        buf.extend_from_slice(&nlink.to_le_bytes());
                        buf.extend_from_slice(&size.to_le_bytes());
                        buf.extend_from_slice(&block.to_le_bytes());
                        buf.extend_from_slice(&parent.to_le_bytes());
                        buf.extend_from_slice(&0u16.to_le_bytes()); // no directory index
                        buf.extend_from_slice(&offset.to_le_bytes());
                        buf.extend_from_slice(&u32::MAX.to_le_bytes()); // no xattrs
                    }
                }
                EntryKind::File(id) => {
                    let l = &layouts[id.0 as usize];
                    let nlink = links[id];
                    let start = l.start.unwrap_or(0);
                    let (frag, frag_offset) = l.fragment.unwrap_or((NO_FRAGMENT, 0));
                    if nlink == 1 && l.size < 1 << 32 && start < 1 << 32 && l.sparse == 0 {
                        header(&mut buf, FILE);
                        buf.extend_from_slice(&(start as u32).to_le_bytes());
                        buf.extend_from_slice(&frag.to_le_bytes());
                        buf.extend_from_slice(&frag_offset.to_le_bytes());
                        buf.extend_from_slice(&(l.size as u32).to_le_bytes());
                    } else {
                        header(&mut buf, EXT_FILE);
                        buf.extend_from_slice(&start.to_le_bytes());
                        buf.extend_from_slice(&l.size.to_le_bytes());
                        buf.extend_from_slice(&l.sparse.to_le_bytes());
                        buf.extend_from_slice(&nlink.to_le_bytes());
                        buf.extend_from_slice(&frag.to_le_bytes());
                        buf.extend_from_slice(&frag_offset.to_le_bytes());
                        buf.extend_from_slice(&u32::MAX.to_le_bytes());
                    }
                    let expected = if l.fragment.is_some() {
                        l.size / opts.block_size as u64
                    } else {
                        l.size.div_ceil(opts.block_size as u64)
                    };
                    if l.blocks.len() as u64 != expected {
                        bail!("internal: /{} has {} blocks, not {expected}", show(e.path), l.blocks.len());
                    }
                    for b in &l.blocks {
                        buf.extend_from_slice(&b.to_le_bytes());
                    }
                }
                EntryKind::Symlink(target) => {
                    header(&mut buf, SYMLINK);
                    buf.extend_from_slice(&1u32.to_le_bytes());
                    buf.extend_from_slice(&(target.len() as u32).to_le_bytes());
                    buf.extend_from_slice(target);
                }
                EntryKind::Char { major, minor } | EntryKind::Block { major, minor } => {
                    if *major > 0xfff || *minor > 0xf_ffff {
                        bail!("/{}: device {major}:{minor} does not fit squashfs's 32-bit device number", show(e.path));
                    }
                    header(&mut buf, basic_type(&e.kind));
                    buf.extend_from_slice(&1u32.to_le_bytes());
                    buf.extend_from_slice(&encode_dev(*major, *minor).to_le_bytes());
                }
                EntryKind::Fifo | EntryKind::Socket => {
                    header(&mut buf, basic_type(&e.kind));
                    buf.extend_from_slice(&1u32.to_le_bytes());
                }
            }
            let (block, offset) = inodes.position();
            let r = ((block as u64) << 16) | offset as u64;
            reference[i] = r;
            if let EntryKind::File(id) = e.kind {
                data_ref.insert(id, r);
            }
            inodes.write(&buf, &mut meta)?;
        }
        Ok(Tables {
            inodes: inodes.finish(&mut meta)?,
            dirs: dirs.finish(&mut meta)?,
            ids,
            root: reference[0],
            inode_count: count,
        })
    }
}

/// A directory's listing: runs of entries whose inodes share a metadata block and whose numbers are near.
fn listing(children: &[usize], entries: &[Entry<'_>], reference: &[u64], number: &[u32]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < children.len() {
        let first = children[i];
        let block = (reference[first] >> 16) as u32;
        let base = number[first];
        let mut j = i;
        while j < children.len() && j - i < DIR_RUN_MAX {
            let c = children[j];
            let delta = number[c] as i64 - base as i64;
            if (reference[c] >> 16) as u32 != block || !(-32768..=32767).contains(&delta) {
                break;
            }
            j += 1;
        }
        out.extend_from_slice(&((j - i - 1) as u32).to_le_bytes());
        out.extend_from_slice(&block.to_le_bytes());
        out.extend_from_slice(&base.to_le_bytes());
        for &c in &children[i..j] {
            let e = &entries[c];
            let name = e.path.rsplit(|&b| b == b'/').next().unwrap_or(e.path);
            out.extend_from_slice(&((reference[c] & 0xffff) as u16).to_le_bytes());
            out.extend_from_slice(&((number[c] as i64 - base as i64) as i16).to_le_bytes());
            out.extend_from_slice(&basic_type(&e.kind).to_le_bytes());
            out.extend_from_slice(&((name.len() - 1) as u16).to_le_bytes());
            out.extend_from_slice(name);
        }
        i = j;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn opts(compression: Compression, threads: usize) -> SquashfsOptions {
        SquashfsOptions {
            compression,
            level: compression.default_level(),
            block_size: 4096,
            threads,
            mtime: 1_700_000_000,
        }
    }

    fn entry<'a>(path: &'a str, kind: EntryKind<'a>, mode: u32) -> Entry<'a> {
        Entry { path: path.as_bytes(), kind, mode, uid: 0, gid: 0, mtime: 1_600_000_000 }
    }

    /// A small tree with every kind of entry, files below, at and above the block size, a sparse block, a
    /// hardlink and a directory big enough for several metadata blocks and directory runs.
    fn write(compression: Compression, threads: usize, out: &std::path::Path) -> SquashfsInfo {
        let f = File::create(out).unwrap();
        let mut w = SquashfsWriter::new(f, opts(compression, threads)).unwrap();
        let small = w.add_file(&mut &b"hello\n"[..], 6).unwrap();
        let exact: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
        let exact_id = w.add_file(&mut &exact[..], 4096).unwrap();
        let mut sparse = vec![0u8; 4096 * 3 + 100];
        sparse[4096 * 2] = 7;
        let sparse_id = w.add_file(&mut &sparse[..], sparse.len() as u64).unwrap();
        let empty = w.add_file(&mut &b""[..], 0).unwrap();
        let many: Vec<(String, DataId)> = (0..600)
            .map(|i| {
                let text = format!("file number {i}\n");
                (format!("big/f{i:04}"), w.add_file(&mut text.as_bytes(), text.len() as u64).unwrap())
            })
            .collect();
        let mut entries = vec![
            entry("", EntryKind::Dir, 0o755),
            entry("a", EntryKind::File(small), 0o644),
            entry("b-link", EntryKind::File(small), 0o644),
            entry("big", EntryKind::Dir, 0o755),
        ];
        for (p, id) in &many {
            entries.push(entry(p, EntryKind::File(*id), 0o600));
        }
        entries.extend([
            entry("dev", EntryKind::Dir, 0o755),
            entry("dev/console", EntryKind::Char { major: 5, minor: 1 }, 0o600),
            entry("dev/sda1", EntryKind::Block { major: 8, minor: 1 }, 0o660),
            entry("empty", EntryKind::File(empty), 0o644),
            entry("exact", EntryKind::File(exact_id), 0o4755),
            entry("fifo", EntryKind::Fifo, 0o644),
            entry("link", EntryKind::Symlink(b"a"), 0o777),
            entry("sparse", EntryKind::File(sparse_id), 0o644),
        ]);
        entries[1].uid = 1000;
        entries[1].gid = 100;
        entries[2].uid = 1000;
        entries[2].gid = 100;
        let (_, info) = w.finish(&entries).unwrap();
        info
    }

    #[test]
    fn bytes_do_not_depend_on_threads() {
        let d = tempfile::tempdir().unwrap();
        for c in [Compression::Zstd, Compression::Gzip, Compression::None] {
            write(c, 1, &d.path().join("one"));
            write(c, 3, &d.path().join("three"));
            assert_eq!(std::fs::read(d.path().join("one")).unwrap(), std::fs::read(d.path().join("three")).unwrap());
        }
    }

    #[test]
    fn unsquashfs_reads_back_every_kind_of_entry() {
        if Command::new("unsquashfs").arg("-help").output().is_err() {
            panic!("unsquashfs is needed: run scripts/setup.sh (squashfs-tools)");
        }
        let d = tempfile::tempdir().unwrap();
        let img = d.path().join("img");
        let info = write(Compression::Zstd, 2, &img);
        assert_eq!(info.size % 4096, 0);
        assert_eq!(info.inodes, 1 + 1 + 1 + 600 + 1 + 2 + 1 + 1 + 1 + 1 + 1);
        let out = Command::new("unsquashfs").env("TZ", "UTC").args(["-lln", "-d", ""]).arg(&img).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        // Compared with runs of spaces squeezed: unsquashfs pads its columns.
        let squeeze = |s: &str| s.split_whitespace().collect::<Vec<_>>().join(" ");
        let list: Vec<String> = String::from_utf8_lossy(&out.stdout).lines().map(squeeze).collect();
        for want in [
            "-rw-r--r-- 1000/100                6 2020-09-13 12:26 /a",
            "crw------- 0/0                 5,  1 2020-09-13 12:26 /dev/console",
            "brw-rw---- 0/0                 8,  1 2020-09-13 12:26 /dev/sda1",
            "-rwsr-xr-x 0/0                  4096 2020-09-13 12:26 /exact",
            "lrwxrwxrwx 0/0                     1 2020-09-13 12:26 /link -> a",
            "prw-r--r-- 0/0                     0 2020-09-13 12:26 /fifo",
            "/big/f0599",
        ] {
            let want = squeeze(want);
            assert!(list.iter().any(|l| l.ends_with(&want)), "{want:?} missing from:\n{}", list.join("\n"));
        }
        let x = d.path().join("x");
        let out = Command::new("unsquashfs").arg("-no-xattrs").arg("-d").arg(&x).arg(&img).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(std::fs::read(x.join("b-link")).unwrap(), b"hello\n");
        assert_eq!(std::fs::read(x.join("big/f0321")).unwrap(), b"file number 321\n");
        let sparse = std::fs::read(x.join("sparse")).unwrap();
        assert_eq!(sparse.len(), 4096 * 3 + 100);
        assert_eq!(sparse.iter().filter(|&&b| b != 0).count(), 1);
        assert_eq!(sparse[4096 * 2], 7);
        let exact = std::fs::read(x.join("exact")).unwrap();
        assert_eq!(exact[4095], (4095 % 251) as u8);
        use std::os::unix::fs::MetadataExt;
        assert_eq!(std::fs::metadata(x.join("a")).unwrap().ino(), std::fs::metadata(x.join("b-link")).unwrap().ino());
    }

    #[test]
    fn short_contents_are_an_error() {
        let d = tempfile::tempdir().unwrap();
        let f = File::create(d.path().join("img")).unwrap();
        let mut w = SquashfsWriter::new(f, opts(Compression::Zstd, 2)).unwrap();
        let err = w.add_file(&mut &b"abc"[..], 10).unwrap_err().to_string();
        assert!(err.contains("truncated"), "{err}");
        let err = w.add_file(&mut &[0u8; 5000][..], 9000).unwrap_err().to_string();
        assert!(err.contains("truncated"), "{err}");
    }

    #[test]
    fn device_numbers_encode_like_linux() {
        assert_eq!(encode_dev(8, 1), 0x801);
        assert_eq!(encode_dev(259, 0x12345), (0x45) | (259 << 8) | (0x12300 << 12));
    }
}
