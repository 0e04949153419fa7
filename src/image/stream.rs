//! Reading a one-layer image as a stream: the layer is decompressed by one thread while another parses its tar
//! and hands each entry, with its bytes, to the caller as it comes, so the output can be written (and
//! compressed) while the layer is still being read. Nothing is spooled but the files the build reads again
//! afterwards (those `keep` selects: the kernel, modules, firmware); with no lower layer there are no
//! whiteouts to wait for.
//!
//! The blob's digest (or the tar's `diff_id`) is checked when the stream ends; the caller must not commit what
//! it wrote before this returns `Ok`.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::path::Path;
use std::sync::mpsc::{sync_channel, Receiver};

use anyhow::{anyhow, bail, Context, Result};

use super::tree::{raw_entry, sniff, Compression, DataFile, DataRef, RawKind, Tree, STREAMED_FILE};
use super::LayerBlob;
use crate::util::{ByteProgress, HashingReader};

/// Decompressed bytes travel between the threads in chunks of this size, a few at a time.
const CHUNK: usize = 1 << 20;
const IN_FLIGHT: usize = 8;

/// What the caller is given for each path, in layer order: the tree as it is after the entry, the path, and
/// for a regular file's first name its contents (exactly the node's size).
pub type OnEntry<'a> = dyn FnMut(&Tree, &[u8], Option<&mut dyn Read>) -> Result<()> + 'a;

/// Reads the decompressed stream from the decompressing thread.
struct Chunks {
    rx: Receiver<io::Result<Vec<u8>>>,
    cur: Vec<u8>,
    pos: usize,
}

impl Read for Chunks {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.cur.len() {
            match self.rx.recv() {
                Ok(Ok(chunk)) => {
                    self.cur = chunk;
                    self.pos = 0;
                }
                Ok(Err(e)) => return Err(e),
                Err(_) => return Ok(0),
            }
        }
        let n = buf.len().min(self.cur.len() - self.pos);
        buf[..n].copy_from_slice(&self.cur[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// The decompressed stream, hashed when its digest must be checked.
enum Source {
    Hashed(HashingReader<Chunks>),
    Plain(Chunks),
}

impl Read for Source {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Source::Hashed(h) => h.read(buf),
            Source::Plain(c) => c.read(buf),
        }
    }
}

/// Notes a read error, so it is reported as the layer's.
struct Watched<R> {
    r: R,
    failed: Option<String>,
}

impl<R: Read> Read for Watched<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.r.read(buf).inspect_err(|e| self.failed = Some(e.to_string()))
    }
}

/// Copies what is read into the spool as well (files the build reads again).
struct Tee<'a, R> {
    r: R,
    w: &'a mut io::BufWriter<File>,
}

impl<R: Read> Read for Tee<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.r.read(buf)?;
        self.w.write_all(&buf[..n])?;
        Ok(n)
    }
}

/// Streams the one layer `blob`: applies each entry to a fresh tree and calls `on_entry` for every path it
/// creates (parent directories the layer left out first). Regular files for which `keep` is true are copied
/// to a spool in `spool_dir` (the tree reads them from there); the others are marked streamed.
pub fn stream_layer(
    blob: &LayerBlob,
    spool_dir: &Path,
    keep: &dyn Fn(&[u8]) -> bool,
    bytes: &ByteProgress,
    on_entry: &mut OnEntry<'_>,
) -> Result<Tree> {
    let what = blob.label.clone();
    let (tx, rx) = sync_channel::<io::Result<Vec<u8>>>(IN_FLIGHT);
    if let Some(size) = blob.size {
        bytes.set_total(size);
    }
    let input = bytes.reader(blob.loc.open()?);
    let decompress = std::thread::Builder::new()
        .name("kiln-layer".into())
        .spawn(move || -> io::Result<(crate::util::Digest, u64)> {
            let mut hashed = HashingReader::new(input);
            {
                let mut peek = BufReader::with_capacity(1 << 20, &mut hashed);
                let head = peek.fill_buf()?.to_vec();
                let mut decoded: Box<dyn Read + '_> = match sniff(&head) {
                    Compression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(peek)),
                    Compression::Zstd => Box::new(zstd::stream::read::Decoder::with_buffer(peek)?),
                    Compression::Plain => Box::new(peek),
                };
                loop {
                    let mut chunk = vec![0u8; CHUNK];
                    let mut n = 0;
                    while n < CHUNK {
                        match decoded.read(&mut chunk[n..]) {
                            Ok(0) => break,
                            Ok(k) => n += k,
                            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                            Err(e) => {
                                let _ = tx.send(Err(io::Error::new(e.kind(), e.to_string())));
                                return Err(e);
                            }
                        }
                    }
                    if n == 0 {
                        break;
                    }
                    chunk.truncate(n);
                    if tx.send(Ok(chunk)).is_err() {
                        // The reader stopped (it failed, or gave up streaming): so do we.
                        return Err(io::Error::other("stopped"));
                    }
                }
            }
            hashed.drain()
        })
        .context("starting the layer thread")?;

    let corrupt = |e: &dyn std::fmt::Display| {
        anyhow!("reading {what}: the layer is truncated or corrupt ({e}); re-pull or re-copy the image")
    };
    let mut tree = Tree::new();
    let spool = tempfile::tempfile_in(spool_dir)
        .with_context(|| format!("creating a spool file in {}", spool_dir.display()))?;
    let spool_index = tree.add_data_file(DataFile::Handle { file: spool.try_clone()?, base: 0 });
    let mut spool_w = io::BufWriter::with_capacity(1 << 20, spool);
    let mut spooled = 0u64;
    let check_diff = blob.digest.is_none() && blob.diff_id.is_some();
    // The uncompressed stream is hashed only when there is no blob digest to check.
    let chunks = Chunks { rx, cur: Vec::new(), pos: 0 };
    let mut diff = if check_diff { Source::Hashed(HashingReader::new(chunks)) } else { Source::Plain(chunks) };
    let walked: Result<()> = (|| {
        let mut archive = tar::Archive::new(&mut diff);
        let mut touched = Vec::new();
        for entry in archive.entries().map_err(|e| corrupt(&e))? {
            let mut entry = entry.map_err(|e| corrupt(&e))?;
            let Some(raw) = raw_entry(&mut entry).map_err(|e| corrupt(&format!("{e:#}")))? else { continue };
            let file_size = match raw.kind {
                RawKind::File { size, .. } => Some(size),
                _ => None,
            };
            let kept = file_size.is_some() && keep(&raw.path);
            let data_at = if kept {
                DataRef { file: spool_index, offset: spooled }
            } else {
                DataRef { file: STREAMED_FILE, offset: 0 }
            };
            let path = raw.path.clone();
            touched.clear();
            tree.apply_entry(1, raw, spool_index, Some(data_at), &mut touched)
                .with_context(|| format!("applying {what}"))?;
            for p in &touched {
                let has_data = file_size.is_some() && p == &path;
                if !has_data {
                    on_entry(&tree, p, None)?;
                    continue;
                }
                let size = file_size.unwrap_or(0);
                // A read error is the layer's fault, whatever the caller makes of it.
                let mut r = Watched { r: (&mut entry).take(size), failed: None };
                let result = if kept {
                    let mut tee = Tee { r: &mut r, w: &mut spool_w };
                    let done = on_entry(&tree, p, Some(&mut tee));
                    done.and_then(|()| io::copy(&mut tee, &mut io::sink()).map_err(anyhow::Error::from))
                } else {
                    let done = on_entry(&tree, p, Some(&mut r));
                    done.and_then(|()| io::copy(&mut r, &mut io::sink()).map_err(anyhow::Error::from))
                };
                if let Some(e) = r.failed {
                    return Err(corrupt(&e));
                }
                result?;
                if kept {
                    spooled += size;
                }
            }
        }
        // Read up to the end of the stream so the digest covers every byte.
        let mut rest = archive.into_inner();
        io::copy(&mut rest, &mut io::sink()).map_err(|e| corrupt(&e))?;
        Ok(())
    })();
    // On failure the channel closes here, which stops the decompressing thread.
    let diff_digest = match (&walked, diff) {
        (Ok(()), Source::Hashed(h)) => Some(h.drain().map_err(|e| corrupt(&e))),
        _ => None,
    };
    let blob_result = decompress.join().map_err(|_| anyhow!("internal: the layer thread panicked"))?;
    walked?;
    let (digest, len) = blob_result.map_err(|e| corrupt(&e))?;
    spool_w.flush().context("writing the spool")?;
    if let Some(expected) = &blob.digest {
        if &digest != expected {
            bail!("{what} is corrupt: its content hashes to {digest}, not {expected}; re-pull or re-copy the image");
        }
    } else if let (Some(expected), Some(got)) = (&blob.diff_id, diff_digest) {
        let (diff_digest, _) = got?;
        if &diff_digest != expected {
            bail!(
                "{what} is corrupt: its content hashes to {diff_digest}, not {expected}; re-pull or re-copy the image"
            );
        }
    }
    if let Some(size) = blob.size {
        if size != len {
            bail!("{what} should be {size} bytes but is {len}: the blob is truncated or corrupt");
        }
    }
    Ok(tree)
}
