//! `dir:` sources: a root filesystem tree on disk, read in place.
//!
//! Its identity is a sha256 over every entry in bytewise path order (path, type, mode, owner,
//! mtime, size, symlink target, device numbers, content), so a changed file changes the store
//! path and an untouched tree is recognised without building.

use std::collections::HashMap;
use std::fs;
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use anyhow::{bail, Context, Result};
use sha2::{Digest as _, Sha256};

use super::tree::{DataFile, DataRef, Kind, Node, Tree};
use crate::util::Digest;

/// Every entry below `root`, as (relative path bytes, metadata), in bytewise path order.
fn walk(root: &Path) -> Result<Vec<(Vec<u8>, fs::Metadata)>> {
    let meta = fs::symlink_metadata(root).with_context(|| format!("reading {}", root.display()))?;
    if !meta.is_dir() {
        bail!("{} is not a directory (dir: sources name a root filesystem tree)", root.display());
    }
    let mut out = Vec::new();
    let mut stack = vec![Vec::new()];
    while let Some(rel) = stack.pop() {
        let dir = root.join(std::ffi::OsStr::from_bytes(&rel));
        for entry in fs::read_dir(&dir).with_context(|| format!("reading directory {}", dir.display()))? {
            let entry = entry.with_context(|| format!("reading directory {}", dir.display()))?;
            let mut p = rel.clone();
            if !p.is_empty() {
                p.push(b'/');
            }
            p.extend_from_slice(entry.file_name().as_bytes());
            let m = entry.metadata().with_context(|| format!("reading {}", entry.path().display()))?;
            if m.is_dir() {
                stack.push(p.clone());
            }
            out.push((p, m));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

fn dev_parts(rdev: u64) -> (u32, u32) {
    let major = ((rdev >> 8) & 0xfff) | ((rdev >> 32) & !0xfff);
    let minor = (rdev & 0xff) | ((rdev >> 12) & !0xff);
    (major as u32, minor as u32)
}

pub fn hash_tree(root: &Path) -> Result<Digest> {
    let mut h = Sha256::new();
    for (rel, m) in walk(root)? {
        let full = root.join(std::ffi::OsStr::from_bytes(&rel));
        h.update((rel.len() as u64).to_le_bytes());
        h.update(&rel);
        for v in [m.mode() as u64, m.uid() as u64, m.gid() as u64, m.mtime() as u64, m.rdev()] {
            h.update(v.to_le_bytes());
        }
        let ft = m.file_type();
        if ft.is_symlink() {
            let t = fs::read_link(&full).with_context(|| format!("reading symlink {}", full.display()))?;
            h.update(t.as_os_str().as_bytes());
        } else if ft.is_file() {
            h.update(m.len().to_le_bytes());
            let mut f = fs::File::open(&full).with_context(|| format!("reading {}", full.display()))?;
            let mut w = HashWrite(&mut h);
            io::copy(&mut f, &mut w).with_context(|| format!("reading {}", full.display()))?;
        }
    }
    Digest::from_hex(&hex::encode(h.finalize()))
}

struct HashWrite<'a>(&'a mut Sha256);

impl Write for HashWrite<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

pub fn tree_from_dir(root: &Path) -> Result<Tree> {
    let mut tree = Tree::new();
    let file = tree.add_data_file(DataFile::Root(root.to_path_buf()));
    let root_meta = fs::metadata(root).with_context(|| format!("reading {}", root.display()))?;
    if let Some(n) = tree.nodes.get_mut(&Vec::new()) {
        n.mode = root_meta.mode() & 0o7777;
        n.uid = root_meta.uid();
        n.gid = root_meta.gid();
        n.mtime = root_meta.mtime();
    }
    let mut links: HashMap<(u64, u64), u32> = HashMap::new();
    for (rel, m) in walk(root)? {
        let ft = m.file_type();
        let kind = if ft.is_dir() {
            Kind::Dir
        } else if ft.is_file() {
            let group = if m.nlink() > 1 {
                match links.get(&(m.dev(), m.ino())) {
                    Some(&g) => g,
                    None => {
                        let g = tree.new_group();
                        links.insert((m.dev(), m.ino()), g);
                        g
                    }
                }
            } else {
                tree.new_group()
            };
            Kind::File { data: DataRef { file, offset: 0 }, size: m.len(), group }
        } else if ft.is_symlink() {
            let full = root.join(std::ffi::OsStr::from_bytes(&rel));
            let t = fs::read_link(&full).with_context(|| format!("reading symlink {}", full.display()))?;
            Kind::Symlink(t.as_os_str().as_bytes().to_vec())
        } else if ft.is_char_device() {
            let (major, minor) = dev_parts(m.rdev());
            Kind::Char { major, minor }
        } else if ft.is_block_device() {
            let (major, minor) = dev_parts(m.rdev());
            Kind::Block { major, minor }
        } else if ft.is_fifo() {
            Kind::Fifo
        } else {
            // Sockets have no meaning in an image; skip them as tar does.
            continue;
        };
        tree.nodes.insert(
            rel,
            Node { kind, mode: m.mode() & 0o7777, uid: m.uid(), gid: m.gid(), mtime: m.mtime(), layer: 1 },
        );
    }
    Ok(tree)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tree_hash_changes_with_content_and_keeps_hardlinks() {
        let d = tempfile::tempdir().unwrap();
        fs::create_dir(d.path().join("etc")).unwrap();
        fs::write(d.path().join("etc/a"), b"one").unwrap();
        fs::hard_link(d.path().join("etc/a"), d.path().join("etc/b")).unwrap();
        std::os::unix::fs::symlink("a", d.path().join("etc/l")).unwrap();
        let h1 = hash_tree(d.path()).unwrap();
        assert_eq!(h1, hash_tree(d.path()).unwrap());
        let t = tree_from_dir(d.path()).unwrap();
        assert_eq!(t.nodes[&b"etc/a"[..]].kind, t.nodes[&b"etc/b"[..]].kind);
        fs::write(d.path().join("etc/a"), b"two").unwrap();
        assert_ne!(h1, hash_tree(d.path()).unwrap());
        assert_eq!(dev_parts(0x0103), (1, 3));
    }
}
