//! Boot bundles: kernel discovery, the init shim, the `image` and `initramfs` archives, and the
//! manifest ([`Manifest`]).
//!
//! A bundle directory holds `kernel`, `initramfs`, `image` and `manifest.json`. On the `initrd` boot path a
//! node boots `kernel` with `initramfs` then `image` as initrds; the kernel unpacks both into one rootfs
//! (concatenating the two files works too) and runs `/init`, the shim in [`INIT_SHIM`]. On the `two-stage`
//! path ([`two_stage`]) `initramfs` is kiln's loader and `image` a squashfs the loader fetches and mounts.

pub mod kernel;
pub mod manifest;
pub mod streamed;
pub mod two_stage;

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
use std::path::Path;

use anyhow::{bail, Context, Result};
use globset::{GlobBuilder, GlobSet, GlobSetBuilder};
use serde::{Deserialize, Serialize};

use crate::archive::{Compression, Compressor, CpioEntry, CpioWriter, NewcTree};
use crate::image::tree::{group_sizes, show, Kind, Node, Tree};
use crate::image::Source;
use crate::recipe::{BootMode, ImageRecipe, LoadedRecipe};
use crate::util::{ByteProgress, Digest, FileDigest, HashingWriter};

pub use kernel::{FoundKernel, KernelSpec};
pub use manifest::{KernelEntry, Manifest, SourceEntry};

/// The `/init` kiln puts in front of every image.
///
/// The kernel runs it as PID 1 once it has unpacked `initramfs` and `image` into its rootfs.
/// It mounts `/proc`, `/sys` and `/dev` (Debian's kernels do not mount devtmpfs by themselves),
/// reads `kiln.init=` and `kiln.shell` from the kernel command line, and `exec`s the image's own
/// init (`/sbin/init` by default), which keeps PID 1 and runs from RAM. It needs the image's
/// `/bin/sh`; in an image without one, the kernel falls back to running `/sbin/init` itself.
/// Just before, it starts kiln's status agent in the background when the node's overlay brought
/// one (`/usr/lib/kiln/kiln-node`, see `serve::heartbeat`): the image's init inherits it.
pub const INIT_SHIM: &str = r#"#!/bin/sh
# kiln init shim: PID 1 from the unpacked initramfs + image. It mounts the kernel's API
# filesystems and replaces itself with the image's own init, which runs from RAM.
# Kernel command line: kiln.init=PATH (default /sbin/init), kiln.shell (a shell instead).
PATH=/usr/sbin:/usr/bin:/sbin:/bin
export PATH
mnt() {
  [ -d "$2" ] || mkdir -p "$2"
  grep -qs " $2 " /proc/mounts || mount -t "$1" "$1" "$2" 2>/dev/null
}
mnt proc /proc
mnt sysfs /sys
mnt devtmpfs /dev
init=/sbin/init
read -r cmdline < /proc/cmdline
for arg in $cmdline; do
  case "$arg" in
    kiln.init=*) init="${arg#kiln.init=}" ;;
    kiln.shell) init=/bin/sh ;;
  esac
done
if [ ! -x "$init" ]; then
  echo "kiln: $init is missing or not executable in this image; starting /bin/sh" >&2
  exec /bin/sh
fi
# kiln's status agent, from the node's overlay: it reports to kiln serve beside the image's init,
# which inherits it, and ends with every other process at shutdown.
if [ -x /usr/lib/kiln/kiln-node ] && [ -r /etc/kiln/node.env ]; then
  /usr/lib/kiln/kiln-node agent --log /dev/kmsg </dev/null >/dev/null 2>&1 &
fi
echo "kiln: starting $init" >&2
exec "$init" "$@"
"#;

/// What a build asks for besides the image itself.
#[derive(Debug, Clone)]
pub struct BundleSpec {
    pub name: String,
    pub kernel: KernelSpec,
    /// The kernel command line; `None`: [`default_cmdline`] for the image's architecture.
    pub cmdline: Option<String>,
    pub compression: Compression,
    pub level: i32,
    pub exclude: Vec<String>,
    pub boot: BootMode,
}

/// The kernel command line of an x86_64 bundle whose recipe sets none.
pub const DEFAULT_CMDLINE: &str = "console=tty0 console=ttyS0,115200";
/// The same for arm64, whose servers' (and QEMU's `virt`) serial port is a PL011, `ttyAMA0`.
pub const DEFAULT_CMDLINE_ARM64: &str = "console=tty0 console=ttyAMA0,115200";

/// The command line a bundle for `arch` (Linux name) boots with when its recipe sets none.
pub fn default_cmdline(arch: &str) -> &'static str {
    match arch {
        "aarch64" | "arm64" => DEFAULT_CMDLINE_ARM64,
        _ => DEFAULT_CMDLINE,
    }
}

impl BundleSpec {
    /// The bundle `[image.NAME]` describes; errors name the field.
    pub fn from_recipe(name: &str, img: &ImageRecipe) -> Result<BundleSpec> {
        Source::parse(&img.from).context("field `from`")?;
        if let Some(arch) = &img.arch {
            crate::image::oci_arch(arch).context("field `arch`")?;
        }
        let compression = match &img.compression {
            Some(c) => Compression::parse(c).context("field `compression`")?,
            None => Compression::Zstd,
        };
        let level = img.level.unwrap_or_else(|| compression.default_level());
        compression.check_level(level).context("field `level`")?;
        exclude_set(&img.exclude).context("field `exclude`")?;
        Ok(BundleSpec {
            name: name.to_string(),
            kernel: KernelSpec::parse(img.kernel.as_deref().unwrap_or("auto")),
            cmdline: img.cmdline.clone(),
            compression,
            level,
            exclude: img.exclude.clone(),
            boot: img.boot.unwrap_or_default(),
        })
    }

    /// Every `[image.NAME]` of a recipe, checked; an error names the file and the table.
    pub fn all(loaded: &LoadedRecipe) -> Result<BTreeMap<String, BundleSpec>> {
        let mut out = BTreeMap::new();
        for (name, img) in &loaded.recipe.image {
            let spec = BundleSpec::from_recipe(name, img)
                .with_context(|| format!("{}: [image.{name}]", loaded.path.display()))?;
            out.insert(name.clone(), spec);
        }
        Ok(out)
    }
}

/// Numbers about a written archive.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArchiveInfo {
    pub file: String,
    pub sha256: String,
    pub size: u64,
    pub compression: String,
    pub level: i32,
    pub entries: u64,
    pub uncompressed_size: u64,
}

/// Compiles `exclude` globs. Patterns are absolute paths in the image (a missing leading `/`
/// is added); `*` stays within one directory, `**` crosses them.
pub fn exclude_set(patterns: &[String]) -> Result<GlobSet> {
    let mut b = GlobSetBuilder::new();
    for p in patterns {
        let abs = if p.starts_with('/') { p.clone() } else { format!("/{p}") };
        let g = GlobBuilder::new(&abs)
            .literal_separator(true)
            .build()
            .with_context(|| format!("exclude pattern {p:?} is not a valid glob"))?;
        b.add(g);
    }
    Ok(b.build()?)
}

/// The tree's paths that survive the exclude patterns (a dropped directory takes its subtree along), in
/// bytewise order.
pub(crate) fn kept_entries<'t>(tree: &'t Tree, exclude: &GlobSet) -> Vec<(&'t [u8], &'t Node)> {
    let mut filter = streamed::ExcludeFilter::new(exclude);
    tree.nodes
        .iter()
        .filter(|(path, node)| !filter.excluded(path, node.kind == Kind::Dir))
        .map(|(path, node)| (path.as_slice(), node))
        .collect()
}

/// How an image is written: what every image writer takes (cpio or squashfs, from the whole tree or while a
/// layer streams).
#[derive(Clone, Copy)]
pub struct ImageSettings<'a> {
    /// Paths left out (the recipe's `exclude`).
    pub exclude: &'a GlobSet,
    /// SOURCE_DATE_EPOCH: no time written is later.
    pub sde: i64,
    pub compression: Compression,
    pub level: i32,
    /// Compression threads (the bytes written do not depend on them).
    pub threads: usize,
}

/// Writes the merged tree as a compressed newc archive; returns its digest and numbers. The file contents read
/// are counted in `bytes`.
pub fn write_image(
    tree: &Tree,
    settings: &ImageSettings,
    out: &Path,
    file_name: &str,
    bytes: &ByteProgress,
) -> Result<ArchiveInfo> {
    let ImageSettings { exclude, sde, compression, level, threads } = *settings;
    let f = File::create(out).with_context(|| format!("creating {}", out.display()))?;
    let comp = Compressor::new(HashingWriter::new(f), compression, level, threads)?;
    let mut cpio = CpioWriter::new(BufWriter::with_capacity(1 << 20, comp));
    let kept = kept_entries(tree, exclude);
    let groups = group_sizes(kept.iter().map(|(_, n)| *n));
    let content: HashMap<u32, u64> = kept
        .iter()
        .filter_map(|(_, n)| match n.kind {
            Kind::File { size, group, .. } => Some((group, size)),
            _ => None,
        })
        .collect();
    bytes.set_total(content.values().sum());
    let mut group_ino: HashMap<u32, (u32, u32)> = HashMap::new(); // group → (ino, emitted)
    let mut next_ino = 0u32;
    let clamp = |t: i64| t.clamp(0, sde.clamp(0, u32::MAX as i64)) as u32;
    for (path, node) in &kept {
        let name: &[u8] = if path.is_empty() { b"." } else { path };
        let mut entry = CpioEntry {
            name,
            ino: 0,
            mode: node.st_mode(),
            uid: node.uid,
            gid: node.gid,
            nlink: 1,
            mtime: clamp(node.mtime),
            size: 0,
            rdev_major: 0,
            rdev_minor: 0,
        };
        match &node.kind {
            Kind::Dir => {
                next_ino += 1;
                entry.ino = next_ino;
                entry.nlink = 2;
                cpio.write_entry(&entry, None)?;
            }
            Kind::File { size, group, .. } => {
                let total = groups.get(group).copied().unwrap_or(1);
                let slot = group_ino.entry(*group).or_insert_with(|| {
                    next_ino += 1;
                    (next_ino, 0)
                });
                slot.1 += 1;
                entry.ino = slot.0;
                entry.nlink = total;
                // newc carries the data of a hardlinked file once, with its last link.
                if slot.1 == total {
                    entry.size = *size;
                    let mut data = bytes.reader(tree.open_data(path, node)?);
                    cpio.write_entry(&entry, Some(&mut data)).with_context(|| format!("archiving /{}", show(path)))?;
                } else {
                    cpio.write_entry(&entry, None)?;
                }
            }
            Kind::Symlink(target) => {
                next_ino += 1;
                entry.ino = next_ino;
                entry.size = target.len() as u64;
                cpio.write_entry(&entry, Some(&mut &target[..]))?;
            }
            Kind::Char { major, minor } | Kind::Block { major, minor } => {
                next_ino += 1;
                entry.ino = next_ino;
                entry.rdev_major = *major;
                entry.rdev_minor = *minor;
                cpio.write_entry(&entry, None)?;
            }
            Kind::Fifo => {
                next_ino += 1;
                entry.ino = next_ino;
                cpio.write_entry(&entry, None)?;
            }
        }
    }
    finish_archive(cpio, out, file_name, compression, level, kept.len() as u64 + 1)
}

pub(crate) fn finish_archive(
    cpio: CpioWriter<BufWriter<Compressor<HashingWriter<File>>>>,
    out: &Path,
    file_name: &str,
    compression: Compression,
    level: i32,
    entries: u64,
) -> Result<ArchiveInfo> {
    let (buf, uncompressed_size) = cpio.finish()?;
    finish_compressed(buf, uncompressed_size, out, file_name, compression, level, entries)
}

pub(crate) fn finish_compressed(
    buf: BufWriter<Compressor<HashingWriter<File>>>,
    uncompressed_size: u64,
    out: &Path,
    file_name: &str,
    compression: Compression,
    level: i32,
    entries: u64,
) -> Result<ArchiveInfo> {
    let comp = buf.into_inner().map_err(|e| e.into_error()).with_context(|| format!("writing {}", out.display()))?;
    let hashing = comp.finish().with_context(|| format!("writing {}", out.display()))?;
    let (f, digest, size) = hashing.finish();
    f.sync_all().with_context(|| format!("syncing {}", out.display()))?;
    Ok(ArchiveInfo {
        file: file_name.to_string(),
        sha256: digest.hex(),
        size,
        compression: compression.name().to_string(),
        level,
        entries,
        uncompressed_size,
    })
}

/// Writes kiln's initramfs: `/init` (the shim) and the device nodes the kernel needs to give
/// it a console before `/dev` is mounted.
pub fn write_initramfs(sde: i64, compression: Compression, level: i32, out: &Path) -> Result<ArchiveInfo> {
    let mut tree = NewcTree::default();
    tree.dir(".", 0o755);
    tree.dir("dev", 0o755);
    tree.char_device("dev/console", 0o600, 5, 1);
    tree.char_device("dev/null", 0o666, 1, 3);
    tree.bytes("init", INIT_SHIM, 0o755);
    let f = File::create(out).with_context(|| format!("creating {}", out.display()))?;
    let comp = Compressor::new(HashingWriter::new(f), compression, level, 1)?;
    let (buf, uncompressed_size) = tree.write(BufWriter::new(comp), sde.clamp(0, u32::MAX as i64) as u32)?;
    finish_compressed(buf, uncompressed_size, out, "initramfs", compression, level, tree.len() as u64 + 1)
}

/// Copies the kernel out of the tree into `out`, checking it looks like a kernel for `arch`.
pub fn write_kernel(tree: &Tree, found: &FoundKernel, arch: &str, out: &Path) -> Result<FileDigest> {
    let node = tree.nodes.get(&found.path).context("internal: kernel vanished from the tree")?;
    let mut data = tree.open_data(&found.path, node)?;
    let mut head = vec![0u8; kernel::HEAD_LEN];
    let n = read_up_to(&mut data, &mut head)?;
    head.truncate(n);
    kernel::check_format(&head, arch, &show(&found.path))?;
    let f = File::create(out).with_context(|| format!("creating {}", out.display()))?;
    let mut w = HashingWriter::new(BufWriter::new(f));
    w.write_all(&head)?;
    io::copy(&mut data, &mut w).with_context(|| format!("copying the kernel /{}", show(&found.path)))?;
    let (buf, digest, size) = w.finish();
    let f = buf.into_inner().map_err(|e| e.into_error())?;
    f.sync_all()?;
    if let Kind::File { size: expected, .. } = node.kind {
        if expected != size {
            bail!("the kernel /{} is truncated in the image", show(&found.path));
        }
    }
    Ok(FileDigest { sha256: digest.hex(), size })
}

fn read_up_to(r: &mut dyn Read, buf: &mut [u8]) -> Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        let k = r.read(&mut buf[n..])?;
        if k == 0 {
            break;
        }
        n += k;
    }
    Ok(n)
}

/// Hash of the shim, part of every bundle's store key so a changed shim rebuilds bundles.
pub fn init_shim_digest() -> Digest {
    Digest::of_bytes(INIT_SHIM.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exclude_patterns_are_absolute_and_respect_directories() {
        let set = exclude_set(&["/var/cache/**".into(), "usr/share/doc/*".into()]).unwrap();
        assert!(set.is_match("/var/cache/apt/x.bin"));
        assert!(!set.is_match("/var/cache"));
        assert!(set.is_match("/usr/share/doc/bash"));
        assert!(!set.is_match("/usr/share/doc/bash/copyright"));
        assert!(exclude_set(&["/a/[".into()]).unwrap_err().to_string().contains("not a valid glob"));
    }

    #[test]
    fn recipe_values_name_the_field() {
        let r = crate::recipe::parse("[image.c]\nfrom = \"oci:x\"\ncompression = \"xz\"\n").unwrap();
        let err = format!("{:#}", BundleSpec::from_recipe("c", &r.image["c"]).unwrap_err());
        assert!(err.contains("field `compression`"), "{err}");
        let r = crate::recipe::parse("[image.c]\nfrom = \"ftp:x\"\n").unwrap();
        let err = format!("{:#}", BundleSpec::from_recipe("c", &r.image["c"]).unwrap_err());
        assert!(err.contains("field `from`") && err.contains("unknown transport"), "{err}");
        let r = crate::recipe::parse("[image.c]\nfrom = \"oci:x\"\nlevel = 3\nkernel = \"auto\"\n").unwrap();
        let spec = BundleSpec::from_recipe("c", &r.image["c"]).unwrap();
        assert_eq!((spec.level, spec.kernel), (3, KernelSpec::Auto));
    }

    #[test]
    fn initramfs_is_the_shim_and_two_devices() {
        let d = tempfile::tempdir().unwrap();
        let info = write_initramfs(1_700_000_000, Compression::None, 0, &d.path().join("initramfs")).unwrap();
        assert_eq!(info.entries, 6);
        let bytes = std::fs::read(d.path().join("initramfs")).unwrap();
        assert_eq!(info.sha256, Digest::of_bytes(&bytes).hex());
        let text = String::from_utf8_lossy(&bytes);
        for name in [".\0", "dev\0", "dev/console\0", "dev/null\0", "init\0", "TRAILER!!!\0"] {
            assert!(text.contains(name), "{name:?} missing");
        }
        assert!(text.contains(INIT_SHIM));
    }

    #[test]
    fn shim_is_posix_sh_and_execs_the_image_init() {
        assert!(INIT_SHIM.starts_with("#!/bin/sh\n"));
        assert!(INIT_SHIM.contains("exec \"$init\""));
        let agent = INIT_SHIM.find("kiln-node agent").expect("the shim starts the agent");
        assert!(agent < INIT_SHIM.find("exec \"$init\"").unwrap(), "the agent starts before the image's init");
    }
}
