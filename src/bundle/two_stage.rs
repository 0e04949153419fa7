//! The two-stage bundle's `image` and `initramfs`: the image's merged tree as a squashfs (no size limit; the
//! node mounts it where it lands instead of unpacking it), and an initramfs holding kiln's loader (`kiln-node`
//! as `/init`) with the kernel modules it needs, taken from the image.
//!
//! Which modules the loader carries: the image's kernel has its drivers as modules, and the loader must reach
//! the network and the disk before the image is there. It carries every Ethernet driver (`drivers/net/ethernet`,
//! plus virtio-net, vmxnet3, Hyper-V and Xen netfront: servers and VMs of any vendor), the virtio transport,
//! the common disk controllers (virtio-blk/scsi, AHCI, NVMe, SAS/RAID HBAs of Broadcom/Microchip/HPE, VMware,
//! Hyper-V, Xen, the SCSI disk driver), squashfs, overlayfs, loop and 802.1Q VLANs, each with the modules it
//! depends on. That is about 10 MB compressed for Debian's kernel. The loader loads only the ones whose
//! aliases match the machine's devices, as udev would, so carrying many costs download size, not boot time.
//! Firmware files those modules name are carried when the image has them (`/lib/firmware`).
//!
//! Dependencies and aliases are read from each module's own `.modinfo` section, so the image needs no
//! `modules.dep`. Compressed modules (`.ko.xz`, `.ko.zst`, `.ko.gz`) are stored decompressed.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fs::File;
use std::io::{BufWriter, Read};
use std::path::Path;

use anyhow::{bail, Context, Result};
use globset::GlobSet;
use serde::{Deserialize, Serialize};

use super::streamed::{ExcludeFilter, StreamAbort};
use super::{finish_compressed, kept_entries, ArchiveInfo, FoundKernel, ImageSettings};
use crate::archive::squashfs::{DataId, Entry, EntryKind, SquashfsOptions, SquashfsWriter, DEFAULT_BLOCK_SIZE};
use crate::archive::{Compression, Compressor, NewcTree};
use crate::image::tree::{show, Kind, Tree};
use crate::recipe::BootMode;
use crate::util::{sha256_file, FileDigest, HashingWriter};

/// Version of what this module writes (the image layout, the initramfs layout, the module choice): part of a
/// two-stage bundle's store hash.
pub const TWO_STAGE_FORMAT: u32 = 1;

/// The `image` format of a two-stage bundle.
pub const IMAGE_FORMAT: &str = "squashfs";

/// Where the loader finds its modules and their index, inside the initramfs.
pub const MODULE_DIR: &str = "kiln/modules";
pub const MODULE_INDEX: &str = "kiln/modules.txt";
pub const FIRMWARE_DIR: &str = "kiln/firmware";

/// Modules carried, as paths below `lib/modules/<version>/kernel/`: a directory (ending in `/`) or one file
/// (without its compression suffix).
const CARRIED: &[&str] = &[
    // Network: every Ethernet driver and the virtual NICs.
    "drivers/net/ethernet/",
    "drivers/net/virtio_net.ko",
    "drivers/net/vmxnet3/",
    "drivers/net/hyperv/",
    "drivers/net/xen-netfront.ko",
    "drivers/virtio/",
    "drivers/hv/hv_vmbus.ko",
    "net/8021q/",
    // Disks, for `disk =`.
    "drivers/block/virtio_blk.ko",
    "drivers/block/xen-blkfront.ko",
    "drivers/scsi/virtio_scsi.ko",
    "drivers/scsi/sd_mod.ko",
    "drivers/scsi/vmw_pvscsi.ko",
    "drivers/scsi/hv_storvsc.ko",
    "drivers/scsi/hpsa.ko",
    "drivers/scsi/megaraid/megaraid_sas.ko",
    "drivers/scsi/mpt3sas/",
    "drivers/scsi/smartpqi/",
    "drivers/ata/ahci.ko",
    "drivers/nvme/host/nvme.ko",
    // What the loader mounts with.
    "drivers/block/loop.ko",
    "fs/squashfs/",
    "fs/overlayfs/",
];

/// The image a two-stage bundle boots, as its manifest describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageEntry {
    pub file: String,
    /// `squashfs`.
    pub format: String,
    pub compression: String,
    pub level: i32,
    pub block_size: u32,
    /// Paths in the image, the root included.
    pub entries: u64,
    /// Bytes of regular file contents (hardlinked data once): what the image holds unpacked.
    pub file_bytes: u64,
    pub sha256: String,
    pub size: u64,
}

/// The loader in a two-stage bundle's `initramfs`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoaderEntry {
    /// The `kiln-node` binary.
    pub sha256: String,
    pub size: u64,
    /// Kernel modules carried (by name), from the image's kernel.
    pub modules: Vec<String>,
    /// Firmware files carried, by path below `/lib/firmware`.
    pub firmware: Vec<String>,
}

/// The name of a bundle's root in the store: the image's name for `initrd` (as before two-stage existed),
/// `NAME.two-stage` for `two-stage`, so one image may be built both ways when its nodes differ.
pub fn root_name(image: &str, boot: BootMode) -> String {
    match boot {
        BootMode::Initrd => image.to_string(),
        BootMode::TwoStage => format!("{image}.two-stage"),
    }
}

/// Refuses a loader that cannot run on the image's machines: `kiln-node` is built for one architecture.
pub fn check_loader_arch(loader: &Path, arch: &str) -> Result<()> {
    let mut head = [0u8; 20];
    File::open(loader)
        .and_then(|mut f| f.read_exact(&mut head))
        .with_context(|| format!("reading kiln-node at {}", loader.display()))?;
    if &head[..4] != b"\x7fELF" {
        bail!("{} is not an ELF executable (is KILN_NODE pointing at kiln-node?)", loader.display());
    }
    let built_for = match u16::from_le_bytes([head[18], head[19]]) {
        62 => "x86_64",
        183 => "aarch64",
        other => bail!("{}: unknown ELF machine {other}", loader.display()),
    };
    if built_for != arch {
        bail!(
            "boot = \"two-stage\" needs kiln's loader (kiln-node) built for {arch}, and {} is built for {built_for}; \
             kiln-node cannot be built for {arch} on this machine (no {arch} Rust standard library is installed): \
             use boot = \"initrd\" for this image",
            loader.display()
        );
    }
    Ok(())
}

/// Refuses an image whose kernel cannot mount what the loader mounts, when the image carries the kernel's
/// `/boot/config-VERSION` to tell: squashfs (with the bundle's compression), overlayfs and loop devices.
pub fn check_kernel_config(tree: &Tree, kernel: &FoundKernel, compression: Compression) -> Result<()> {
    let path = format!("boot/config-{}", kernel.version);
    let Ok(text) = tree.read_file(path.as_bytes()) else { return Ok(()) };
    let text = String::from_utf8_lossy(&text);
    let has = |opt: &str| text.lines().any(|l| l == format!("{opt}=y") || l == format!("{opt}=m"));
    let mut wanted = vec![
        ("CONFIG_SQUASHFS", "squashfs"),
        ("CONFIG_OVERLAY_FS", "overlayfs"),
        ("CONFIG_BLK_DEV_LOOP", "loop devices"),
    ];
    match compression {
        Compression::Zstd => wanted.push(("CONFIG_SQUASHFS_ZSTD", "zstd in squashfs (use compression = \"gzip\")")),
        Compression::Gzip => wanted.push(("CONFIG_SQUASHFS_ZLIB", "zlib in squashfs")),
        Compression::None => {}
    }
    let missing: Vec<&str> = wanted.iter().filter(|(o, _)| !has(o)).map(|(_, what)| *what).collect();
    if !missing.is_empty() {
        bail!(
            "boot = \"two-stage\": the image's kernel {} lacks {} (/{path}), which the loader needs",
            kernel.version,
            missing.join(", ")
        );
    }
    Ok(())
}

/// Writes the merged tree (less what `exclude` drops) as a squashfs; returns what the manifest says of it.
pub fn write_image(tree: &Tree, settings: &ImageSettings, out: &Path, file_name: &str) -> Result<ImageEntry> {
    let ImageSettings { exclude, sde, compression, level, threads } = *settings;
    let kept = kept_entries(tree, exclude);
    let clamp = |t: i64| t.clamp(0, sde.clamp(0, u32::MAX as i64)) as u32;
    let file = File::create(out).with_context(|| format!("creating {}", out.display()))?;
    let opts = SquashfsOptions { compression, level, block_size: DEFAULT_BLOCK_SIZE, threads, mtime: clamp(sde) };
    let mut w = SquashfsWriter::new(file, opts)?;
    // Data first, in the order the layers hold it (what a stream of a one-layer image gives too,
    // [`SquashfsStream`]); a hardlinked file's bytes once.
    let mut files: Vec<(&[u8], &crate::image::tree::Node)> =
        kept.iter().filter(|(_, n)| matches!(n.kind, Kind::File { .. })).copied().collect();
    files.sort_by_key(|(_, n)| match n.kind {
        Kind::File { data, .. } => (data.file, data.offset),
        _ => (0, 0),
    });
    let mut data: HashMap<u32, DataId> = HashMap::new();
    for (path, node) in files {
        if let Kind::File { size, group, .. } = &node.kind {
            if !data.contains_key(group) {
                let mut r = tree.open_data(path, node)?;
                let id = w.add_file(&mut r, *size).with_context(|| format!("archiving /{}", show(path)))?;
                data.insert(*group, id);
            }
        }
    }
    finish_image(w, tree, &kept, &data, opts, compression, level, out, file_name)
}

#[allow(clippy::too_many_arguments)]
fn finish_image(
    w: SquashfsWriter,
    tree: &Tree,
    kept: &[(&[u8], &crate::image::tree::Node)],
    data: &HashMap<u32, DataId>,
    opts: SquashfsOptions,
    compression: Compression,
    level: i32,
    out: &Path,
    file_name: &str,
) -> Result<ImageEntry> {
    let _ = tree;
    let clamp = |t: i64| t.clamp(0, (opts.mtime as i64).max(0)) as u32;
    let entries: Vec<Entry<'_>> = kept
        .iter()
        .map(|(path, node)| -> Result<Entry<'_>> {
            Ok(Entry {
                path,
                kind: match &node.kind {
                    Kind::Dir => EntryKind::Dir,
                    Kind::File { group, .. } => match data.get(group) {
                        Some(id) => EntryKind::File(*id),
                        None => return Err(anyhow::anyhow!("internal: /{} has no data in the image", show(path))),
                    },
                    Kind::Symlink(t) => EntryKind::Symlink(t),
                    Kind::Char { major, minor } => EntryKind::Char { major: *major, minor: *minor },
                    Kind::Block { major, minor } => EntryKind::Block { major: *major, minor: *minor },
                    Kind::Fifo => EntryKind::Fifo,
                },
                mode: node.mode,
                uid: node.uid,
                gid: node.gid,
                mtime: clamp(node.mtime),
            })
        })
        .collect::<Result<_>>()?;
    let (file, info) = w.finish(&entries).with_context(|| format!("writing {}", out.display()))?;
    file.sync_all().with_context(|| format!("syncing {}", out.display()))?;
    drop(file);
    let (digest, size) = sha256_file(out)?;
    Ok(ImageEntry {
        file: file_name.to_string(),
        format: IMAGE_FORMAT.to_string(),
        compression: compression.name().to_string(),
        level,
        block_size: opts.block_size,
        entries: kept.len() as u64,
        file_bytes: info.file_bytes,
        sha256: digest.hex(),
        size,
    })
}

/// The squashfs image written while a one-layer image streams ([`crate::image::stream`]): each file's data
/// as it comes, the metadata from the finished tree. The bytes are those [`write_image`] writes from the whole
/// tree; a path given twice or a hardlink to a file left out stops the stream ([`StreamAbort`]).
pub struct SquashfsStream<'a> {
    w: SquashfsWriter,
    opts: SquashfsOptions,
    exclude: ExcludeFilter<'a>,
    exclude_set: &'a GlobSet,
    data: HashMap<u32, DataId>,
    seen: HashSet<Vec<u8>>,
}

impl<'a> SquashfsStream<'a> {
    pub fn new(out: &Path, settings: ImageSettings<'a>) -> Result<Self> {
        let ImageSettings { exclude, sde, compression, level, threads } = settings;
        let file = File::create(out).with_context(|| format!("creating {}", out.display()))?;
        let opts = SquashfsOptions {
            compression,
            level,
            block_size: DEFAULT_BLOCK_SIZE,
            threads,
            mtime: sde.clamp(0, u32::MAX as i64) as u32,
        };
        Ok(SquashfsStream {
            w: SquashfsWriter::new(file, opts)?,
            opts,
            exclude: ExcludeFilter::new(exclude),
            exclude_set: exclude,
            data: HashMap::new(),
            seen: HashSet::new(),
        })
    }

    /// Takes the next path of the layer (see [`crate::image::stream::OnEntry`]).
    pub fn entry(&mut self, tree: &Tree, path: &[u8], data: Option<&mut dyn Read>) -> Result<()> {
        if !self.seen.insert(path.to_vec()) {
            return Err(anyhow::Error::new(StreamAbort(format!("/{} is given twice", show(path)))));
        }
        let node = tree.nodes.get(path).context("internal: a streamed path is not in the tree")?;
        if self.exclude.excluded(path, node.kind == Kind::Dir) {
            return Ok(());
        }
        if let Kind::File { size, group, .. } = node.kind {
            match data {
                Some(r) => {
                    let id = self.w.add_file(r, size).with_context(|| format!("archiving /{}", show(path)))?;
                    self.data.insert(group, id);
                }
                None if !self.data.contains_key(&group) => {
                    return Err(anyhow::Error::new(StreamAbort(format!(
                        "/{} is a hardlink to a file left out",
                        show(path)
                    ))));
                }
                None => {}
            }
        }
        Ok(())
    }

    pub fn finish(self, tree: &Tree, out: &Path, file_name: &str) -> Result<ImageEntry> {
        let kept = kept_entries(tree, self.exclude_set);
        finish_image(self.w, tree, &kept, &self.data, self.opts, self.opts.compression, self.opts.level, out, file_name)
    }
}

/// A carried module: its bytes, dependencies, aliases and firmware files.
type ModInfo = (Vec<u8>, Vec<String>, Vec<String>, Vec<String>);

/// A kernel module of the image.
struct Module {
    /// Path in the tree.
    path: Vec<u8>,
}

/// `key=value` strings of an ELF object's `.modinfo` section.
fn modinfo(elf: &[u8]) -> Result<Vec<(String, String)>> {
    let u16_at = |o: usize| elf.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]) as usize);
    let u32_at = |o: usize| elf.get(o..o + 4).map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")) as usize);
    let u64_at = |o: usize| elf.get(o..o + 8).map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")) as usize);
    if elf.get(..6) != Some(b"\x7fELF\x02\x01") {
        bail!("not a 64-bit little-endian ELF object");
    }
    let bad = || anyhow::anyhow!("malformed ELF section table");
    let shoff = u64_at(0x28).ok_or_else(bad)?;
    let shentsize = u16_at(0x3a).ok_or_else(bad)?;
    let shnum = u16_at(0x3c).ok_or_else(bad)?;
    let shstrndx = u16_at(0x3e).ok_or_else(bad)?;
    let section = |i: usize| -> Option<(usize, usize, usize)> {
        let h = shoff.checked_add(i.checked_mul(shentsize)?)?;
        Some((u32_at(h)?, u64_at(h + 24)?, u64_at(h + 32)?))
    };
    let (_, stroff, strsize) = section(shstrndx).ok_or_else(bad)?;
    let strtab = elf.get(stroff..stroff.checked_add(strsize).ok_or_else(bad)?).ok_or_else(bad)?;
    for i in 0..shnum {
        let (name, off, size) = section(i).ok_or_else(bad)?;
        let name = strtab.get(name..).ok_or_else(bad)?;
        if !name.starts_with(b".modinfo\0") {
            continue;
        }
        let body = elf.get(off..off.checked_add(size).ok_or_else(bad)?).ok_or_else(bad)?;
        return Ok(body
            .split(|&b| b == 0)
            .filter_map(|kv| {
                let kv = std::str::from_utf8(kv).ok()?;
                let (k, v) = kv.split_once('=')?;
                Some((k.to_string(), v.to_string()))
            })
            .collect());
    }
    Ok(Vec::new())
}

/// A module file's bytes, decompressed.
fn module_bytes(tree: &Tree, path: &[u8]) -> Result<Vec<u8>> {
    let raw = tree.read_file(path)?;
    let name = show(path);
    let mut out = Vec::new();
    if name.ends_with(".ko") {
        return Ok(raw);
    } else if name.ends_with(".ko.zst") {
        zstd::stream::copy_decode(&raw[..], &mut out).with_context(|| format!("decompressing /{name}"))?;
    } else if name.ends_with(".ko.gz") {
        flate2::read::GzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .with_context(|| format!("decompressing /{name}"))?;
    } else if name.ends_with(".ko.xz") {
        lzma_rs::xz_decompress(&mut &raw[..], &mut out).map_err(|e| anyhow::anyhow!("decompressing /{name}: {e}"))?;
    } else {
        bail!("internal: /{name} is not a module");
    }
    Ok(out)
}

/// The module name a file stands for: `kernel/drivers/net/virtio_net.ko.xz` → `virtio_net` (`-` read as `_`).
fn module_name(rel: &str) -> Option<(String, &str)> {
    let file = rel.rsplit('/').next()?;
    let stem = [".ko", ".ko.xz", ".ko.zst", ".ko.gz"].iter().find_map(|s| file.strip_suffix(s))?;
    let bare = rel.strip_suffix(&file[stem.len()..])?;
    Some((stem.replace('-', "_"), bare))
}

fn carried(bare: &str) -> bool {
    let Some(rel) = bare.strip_prefix("kernel/") else { return false };
    CARRIED.iter().any(|c| if c.ends_with('/') { rel.starts_with(c) } else { rel == c.trim_end_matches(".ko") })
}

/// Writes the loader's initramfs: `/init` (kiln-node), `/dev/console`, `/dev/null`, the modules with their
/// index, and their firmware.
pub fn write_initramfs(
    tree: &Tree,
    kernel: &FoundKernel,
    loader: &Path,
    sde: i64,
    compression: Compression,
    level: i32,
    out: &Path,
) -> Result<(ArchiveInfo, LoaderEntry)> {
    let mut nt = NewcTree::default();
    nt.dir(".", 0o755);
    nt.dir("dev", 0o755);
    nt.char_device("dev/console", 0o600, 5, 1);
    nt.char_device("dev/null", 0o666, 1, 3);
    nt.file("init", loader, 0o755).with_context(|| format!("kiln-node at {}", loader.display()))?;
    let loader_digest = FileDigest::of_file(loader)?;

    let (modules, firmware) = add_modules(tree, kernel, &mut nt)?;
    let f = File::create(out).with_context(|| format!("creating {}", out.display()))?;
    let comp = Compressor::new(HashingWriter::new(f), compression, level, 1)?;
    let (buf, uncompressed_size) = nt.write(BufWriter::new(comp), sde.clamp(0, u32::MAX as i64) as u32)?;
    let info = finish_compressed(buf, uncompressed_size, out, "initramfs", compression, level, nt.len() as u64 + 1)?;
    Ok((info, LoaderEntry { sha256: loader_digest.sha256, size: loader_digest.size, modules, firmware }))
}

/// Adds the carried modules of `kernel` (and what they depend on) and their index to `nt`; returns the module
/// names and the firmware files added.
fn add_modules(tree: &Tree, kernel: &FoundKernel, nt: &mut NewcTree) -> Result<(Vec<String>, Vec<String>)> {
    let mut dir = None;
    for base in ["usr/lib/modules/", "lib/modules/"] {
        let p = format!("{base}{}", kernel.version);
        if let Ok((real, node)) = tree.resolve(p.as_bytes()) {
            if node.kind == Kind::Dir {
                dir = Some(real);
                break;
            }
        }
    }
    let Some(dir) = dir else {
        // A kernel with its drivers built in needs no modules.
        nt.bytes(MODULE_INDEX, format!("# no modules: the image has no /lib/modules/{}\n", kernel.version), 0o644);
        return Ok((Vec::new(), Vec::new()));
    };
    let mut prefix = dir.clone();
    prefix.push(b'/');
    let mut all: HashMap<String, Module> = HashMap::new();
    let mut wanted: BTreeSet<String> = BTreeSet::new();
    for (path, node) in tree.nodes.range(prefix.clone()..) {
        if !path.starts_with(&prefix) {
            break;
        }
        if !matches!(node.kind, Kind::File { .. }) {
            continue;
        }
        let rel = show(&path[prefix.len()..]);
        let Some((name, bare)) = module_name(&rel) else { continue };
        if carried(bare) {
            wanted.insert(name.clone());
        }
        all.entry(name).or_insert(Module { path: path.clone() });
    }
    // Close over dependencies; a dependency the image does not have as a file is built into the kernel.
    let mut info: BTreeMap<String, ModInfo> = BTreeMap::new();
    let mut queue: Vec<String> = wanted.into_iter().collect();
    while let Some(name) = queue.pop() {
        if info.contains_key(&name) {
            continue;
        }
        let Some(m) = all.get(&name) else { continue };
        let bytes = module_bytes(tree, &m.path)?;
        let fields = modinfo(&bytes).with_context(|| format!("reading the module /{}", show(&m.path)))?;
        let mut deps = Vec::new();
        let mut aliases = Vec::new();
        let mut firmware = Vec::new();
        for (k, v) in fields {
            match k.as_str() {
                "depends" => deps.extend(v.split(',').filter(|d| !d.is_empty()).map(|d| d.replace('-', "_"))),
                "alias" => aliases.push(v),
                "firmware" => firmware.push(v),
                _ => {}
            }
        }
        queue.extend(deps.iter().cloned());
        info.insert(name, (bytes, deps, aliases, firmware));
    }
    let mut index = format!(
        "# kiln loader modules for Linux {}: `module NAME DEPENDENCIES` (comma-separated, - for none), \
         `alias PATTERN NAME`\n",
        kernel.version
    );
    let mut fw_wanted = BTreeSet::new();
    for (name, (_, deps, _, firmware)) in &info {
        let deps: Vec<&str> = deps.iter().filter(|d| info.contains_key(*d)).map(String::as_str).collect();
        index.push_str(&format!("module {name} {}\n", if deps.is_empty() { "-".into() } else { deps.join(",") }));
        fw_wanted.extend(firmware.iter().cloned());
    }
    for (name, (_, _, aliases, _)) in &info {
        for a in aliases {
            if !a.contains(char::is_whitespace) {
                index.push_str(&format!("alias {a} {name}\n"));
            }
        }
    }
    let names: Vec<String> = info.keys().cloned().collect();
    for (name, (bytes, ..)) in info {
        nt.bytes(&format!("{MODULE_DIR}/{name}.ko"), bytes, 0o644);
    }
    nt.bytes(MODULE_INDEX, index, 0o644);
    // Firmware the modules ask for, where the image has it (the kernel reads it from the path the loader sets).
    let mut firmware = Vec::new();
    for fw in fw_wanted {
        if fw.contains("..") || fw.starts_with('/') {
            continue;
        }
        for base in ["usr/lib/firmware/", "lib/firmware/"] {
            let p = format!("{base}{fw}");
            if let Ok((real, node)) = tree.resolve(p.as_bytes()) {
                if matches!(node.kind, Kind::File { .. }) {
                    nt.bytes(&format!("{FIRMWARE_DIR}/{fw}"), tree.read_file(&real)?, 0o644);
                    firmware.push(fw.clone());
                    break;
                }
            }
        }
    }
    Ok((names, firmware))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_names_and_the_carried_set() {
        assert_eq!(
            module_name("kernel/drivers/net/virtio_net.ko"),
            Some(("virtio_net".into(), "kernel/drivers/net/virtio_net"))
        );
        assert_eq!(
            module_name("kernel/drivers/net/ethernet/intel/e1000e/e1000e.ko.xz").map(|m| m.0),
            Some("e1000e".into())
        );
        assert_eq!(module_name("kernel/fs/nls/nls-cp437.ko.zst").map(|m| m.0), Some("nls_cp437".into()));
        assert_eq!(module_name("modules.dep"), None);
        assert!(carried("kernel/drivers/net/virtio_net"));
        assert!(carried("kernel/drivers/net/ethernet/intel/igb/igb"));
        assert!(carried("kernel/fs/squashfs/squashfs"));
        assert!(!carried("kernel/drivers/net/wireless/ath/ath9k/ath9k"));
        assert!(!carried("kernel/drivers/net/virtio_net_extra"));
    }

    #[test]
    fn a_loader_for_another_architecture_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let elf = |machine: u16| {
            let mut h = vec![0u8; 64];
            h[..4].copy_from_slice(b"\x7fELF");
            h[18..20].copy_from_slice(&machine.to_le_bytes());
            h
        };
        let x86 = d.path().join("x86");
        std::fs::write(&x86, elf(62)).unwrap();
        check_loader_arch(&x86, "x86_64").unwrap();
        let err = check_loader_arch(&x86, "aarch64").unwrap_err().to_string();
        assert!(err.contains("built for aarch64") && err.contains("boot = \"initrd\""), "{err}");
        let script = d.path().join("script");
        std::fs::write(&script, "#!/bin/sh\nexit 0\n#######################").unwrap();
        assert!(check_loader_arch(&script, "x86_64").unwrap_err().to_string().contains("not an ELF"));
    }

    #[test]
    fn root_names_keep_initrd_bundles_where_they_were() {
        assert_eq!(root_name("compute", BootMode::Initrd), "compute");
        assert_eq!(root_name("compute", BootMode::TwoStage), "compute.two-stage");
    }

    #[test]
    fn modinfo_is_read_from_the_elf_section() {
        // A minimal ELF64 object: header, a .modinfo section and the section-name table.
        let modinfo_body = b"license=GPL\0depends=virtio,virtio_ring\0alias=virtio:d00000001v*\0";
        let names = b"\0.modinfo\0.shstrtab\0";
        let mut elf = vec![0u8; 64];
        elf[..6].copy_from_slice(b"\x7fELF\x02\x01");
        let body_at = elf.len();
        elf.extend_from_slice(modinfo_body);
        let names_at = elf.len();
        elf.extend_from_slice(names);
        let shoff = elf.len();
        let mut sh = |name: u32, off: usize, size: usize| {
            let mut h = vec![0u8; 64];
            h[..4].copy_from_slice(&name.to_le_bytes());
            h[24..32].copy_from_slice(&(off as u64).to_le_bytes());
            h[32..40].copy_from_slice(&(size as u64).to_le_bytes());
            elf.extend_from_slice(&h);
        };
        sh(0, 0, 0);
        sh(1, body_at, modinfo_body.len());
        sh(10, names_at, names.len());
        elf[0x28..0x30].copy_from_slice(&(shoff as u64).to_le_bytes());
        elf[0x3a..0x3c].copy_from_slice(&64u16.to_le_bytes());
        elf[0x3c..0x3e].copy_from_slice(&3u16.to_le_bytes());
        elf[0x3e..0x40].copy_from_slice(&2u16.to_le_bytes());
        let fields = modinfo(&elf).unwrap();
        assert!(fields.contains(&("depends".into(), "virtio,virtio_ring".into())));
        assert!(fields.contains(&("alias".into(), "virtio:d00000001v*".into())));
        assert!(modinfo(b"not an elf").is_err());
        let mut truncated = elf.clone();
        truncated.truncate(shoff + 10);
        assert!(modinfo(&truncated).is_err());
    }
}
