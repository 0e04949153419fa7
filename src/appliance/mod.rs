//! `kiln appliance`: a bootable, reproducible hybrid ISO (BIOS + UEFI, CD or USB stick) that
//! boots a kiln bundle and runs `kiln serve` from a recipe and store carried on it.
//!
//! The boot payload is the `[appliance] image` bundle's kernel and one initrd: its `initramfs`,
//! its `image` and an "appliance" newc archive (gzip) concatenated, which the kernel unpacks in
//! turn into one rootfs. The appliance archive holds this kiln binary with the shared libraries
//! it links (run through their own dynamic loader, so the image's glibc does not matter),
//! busybox (for `ip`, `modprobe`, `sleep`), the recipe rewritten for the appliance, the store
//! subset it serves (every bundle verified against its manifest) and `/kiln/appliance-init`,
//! which the bundle's init shim runs (`kiln.init=`). How the ISO is laid out, and why those
//! tools, is in docs/appliance.md; [`iso`] drives them.
//!
//! The appliance's own image must be of the architecture this kiln is built for (x86_64: the
//! ISO boots PCs); the node images it carries and serves may be x86_64 or arm64.

pub mod iso;

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use serde_json::json;

use crate::archive::{Compression, Compressor, NewcTree};
use crate::build::{self, BuildOptions};
use crate::bundle::manifest::{IMAGE, INITRAMFS, KERNEL};
use crate::recipe::LoadedRecipe;
use crate::recipe::{DhcpMode, UnknownPolicy};
use crate::store::{input_hash, verify_output, write_manifest, RootKind, Store, FORMAT_VERSION};
use crate::util::{sha256_file, HashingWriter, Progress};

/// Bumped whenever the way kiln lays out the appliance changes its output.
const APPLIANCE_FORMAT: u32 = 1;

/// The init the bundle's shim starts on the appliance.
pub const APPLIANCE_INIT: &str = include_str!("../../appliance/appliance-init");

/// Where the appliance keeps its store, and where its recipe says the store is.
const APPLIANCE_STORE: &str = "var/lib/kiln";

/// Network drivers the appliance tries to load (missing ones are skipped).
const NET_MODULES: &[&str] = &[
    "virtio_pci",
    "virtio_net",
    "e1000",
    "e1000e",
    "igb",
    "igc",
    "ixgbe",
    "i40e",
    "ice",
    "r8169",
    "tg3",
    "bnx2",
    "bnx2x",
    "bnxt_en",
    "mlx4_en",
    "mlx5_core",
    "vmxnet3",
    "atlantic",
    "ena",
];

/// Storage and filesystem drivers the appliance tries to load, so it finds a partition labelled
/// KILN-DATA on a virtual, SATA, NVMe or USB disk (missing ones are skipped). ext4 needs a
/// crc32c implementation, which the kernel would otherwise ask modprobe for by alias.
const STORAGE_MODULES: &[&str] = &[
    "virtio_pci",
    "virtio_blk",
    "virtio_scsi",
    "sd_mod",
    "ahci",
    "ata_piix",
    "nvme",
    "xhci_pci",
    "ehci_pci",
    "ohci_pci",
    "uhci_hcd",
    "usb_storage",
    "uas",
    "mmc_block",
    "sdhci_pci",
    "crc32c_intel",
    "crc32c_generic",
    "ext4",
    "vfat",
    "nls_cp437",
    "nls_iso8859_1",
    "nls_utf8",
    "xfs",
    "btrfs",
];

/// How long, in seconds after the storage drivers load, the appliance looks for KILN-DATA.
const DATA_WAIT_SECS: u32 = 5;

/// What an appliance build produced.
pub struct BuiltIso {
    pub path: PathBuf,
    pub size: u64,
    pub sha256: String,
}

/// Builds the bundles the appliance needs, then its ISO, into the store.
pub fn build(store: &Store, loaded: &LoadedRecipe, opts: &BuildOptions) -> Result<BuiltIso> {
    let recipe = &loaded.recipe;
    let file = loaded.path.display().to_string();
    let app = recipe
        .appliance
        .clone()
        .with_context(|| format!("{file} has no [appliance] table: add one with `image = \"NAME\"`"))?;
    let server =
        recipe.server.clone().with_context(|| format!("{file} has no [server] table: the appliance serves from it"))?;
    let cidr = server.address.with_context(|| {
        format!("{file}: [server] needs `address` (e.g. \"10.4.0.1/24\"): the appliance sets it on its interface")
    })?;
    let nodes = loaded.nodes()?;
    // Who asks for each image, so a missing [image.*] is reported where it is referenced.
    let mut uses: Vec<(String, String)> =
        nodes.iter().map(|n| (n.image.clone(), format!("[node.{}]", n.name))).collect();
    if let UnknownPolicy::Boot(img) = &server.unknown {
        uses.push((img.clone(), format!("[server] unknown = \"boot:{img}\"")));
    }
    uses.extend(app.images.iter().map(|img| (img.clone(), "[appliance] images".to_string())));
    let mut served: Vec<String> = uses.iter().map(|(img, _)| img.clone()).collect();
    served.sort();
    served.dedup();
    uses.push((app.image.clone(), "[appliance] image".to_string()));
    for (img, who) in &uses {
        if !recipe.image.contains_key(img) {
            let known: Vec<&str> = recipe.image.keys().map(String::as_str).collect();
            bail!(
                "{file}: {who} names image {img:?}, but there is no [image.{img}]: add one, or use one of the images \
                 the recipe defines ({})",
                if known.is_empty() { "none".to_string() } else { known.join(", ") }
            );
        }
    }
    let mut wanted = served.clone();
    wanted.push(app.image.clone());
    wanted.sort();
    wanted.dedup();
    let built = build::build_recipe(store, loaded, &wanted, opts)?;
    // By store root: an image its nodes boot both ways is built (and carried) twice.
    let by_root: BTreeMap<String, &build::Built> = built.iter().map(|b| (b.root(), b)).collect();
    let appliance = *by_root.get(app.image.as_str()).with_context(|| {
        format!(
            "{file}: [appliance] image {:?} is built two-stage only, and the appliance boots it the initrd way: \
             leave `boot` out of [image.{}]",
            app.image, app.image
        )
    })?;
    // The appliance runs this kiln binary on its own kernel; the nodes it serves may be of any
    // architecture kiln builds (their bundles are only files to it).
    let here = std::env::consts::ARCH;
    if appliance.manifest.arch != here {
        bail!(
            "{file}: [appliance] image = {:?} is built for {}, but the appliance runs this kiln, which is built for \
             {here}: give [appliance] an {here} image (arch = {:?}); node images may be of any architecture",
            app.image,
            appliance.manifest.arch,
            crate::image::host_oci_arch()
        );
    }
    let mut progress = Progress::new("appliance");
    let sde = appliance.manifest.source_date_epoch;

    let mut tree = NewcTree::default();
    // The store subset: each served bundle, checked against its manifest.
    for (name, b) in by_root.iter().filter(|(_, b)| served.contains(&b.name)) {
        let problems = verify_output(&b.path);
        if let Some(p) = problems.first() {
            bail!("{}: {} (rebuild it with `kiln build`)", p.path.display(), p.problem);
        }
        let dir_name = b.path.file_name().context("a store path has a name")?.to_string_lossy().into_owned();
        tree.dir_files(&format!("{APPLIANCE_STORE}/store/{dir_name}"), &b.path)?;
        tree.symlink(&format!("{APPLIANCE_STORE}/roots/image-{name}"), &format!("../store/{dir_name}"));
    }
    // The recipe as the appliance reads it: no [appliance], boot files and iPXE from the carried store.
    let text = fs::read_to_string(&loaded.path).with_context(|| format!("reading {file}"))?;
    let mut table: toml::Table = toml::from_str(&text).with_context(|| format!("reading {file}"))?;
    table.remove("appliance");
    if let Some(toml::Value::Table(srv)) = table.get_mut("server") {
        srv.remove("state_dir");
        srv.remove("interface");
        if let Some(toml::Value::Table(bf)) = srv.get_mut("boot_files") {
            // Carried with a manifest beside them, which `kiln serve` checks them against before serving.
            let mut listed = serde_json::Map::new();
            for (key, value) in bf.iter_mut() {
                let host = PathBuf::from(value.as_str().unwrap_or_default());
                let inside = format!("{APPLIANCE_STORE}/boot/{key}");
                tree.file(&inside, &host, 0o644)?;
                let (digest, size) =
                    sha256_file(&host).with_context(|| format!("{file}: [server.boot_files] {key}"))?;
                listed.insert(key.clone(), json!({"sha256": digest.hex(), "size": size}));
                *value = toml::Value::String(format!("/{inside}"));
            }
            if !listed.is_empty() {
                let manifest = serde_json::to_vec_pretty(&json!({ "files": listed }))?;
                tree.bytes(&format!("{APPLIANCE_STORE}/boot/manifest.json"), manifest, 0o644);
            }
        }
        if let Some(ipxe) = srv.get("ipxe").and_then(|v| v.as_str()) {
            let dir = store.root(RootKind::Ipxe, ipxe).with_context(|| {
                format!("{file}: [server] ipxe = {ipxe:?} has not been built: run `kiln build-ipxe`")
            })?;
            let dir_name = dir.file_name().context("a store path has a name")?.to_string_lossy().into_owned();
            tree.dir_files(&format!("{APPLIANCE_STORE}/store/{dir_name}"), &dir)?;
            tree.symlink(&format!("{APPLIANCE_STORE}/roots/ipxe-{ipxe}"), &format!("../store/{dir_name}"));
        }
    }
    // Overlay templates travel with the recipe.
    if let Some(toml::Value::Table(images)) = table.get_mut("image") {
        let base = loaded.path.parent().unwrap_or(Path::new(".")).to_path_buf();
        for (name, img) in images.iter_mut() {
            let Some(t) = img.as_table_mut() else { continue };
            let Some(dir) = t.get("overlay").and_then(|v| v.as_str()).map(PathBuf::from) else { continue };
            let host = if dir.is_absolute() { dir } else { base.join(dir) };
            let inside = format!("kiln/overlays/{name}");
            let templates = crate::serve::overlay::read_templates(&host)
                .with_context(|| format!("{file}: [image.{name}] overlay"))?;
            for (rel, (mode, data)) in templates {
                tree.bytes(&format!("{inside}/{rel}"), data, mode);
            }
            t.insert("overlay".into(), toml::Value::String(format!("/{inside}")));
        }
    }
    let recipe_text = format!(
        "# kiln.toml for the appliance, written by `kiln appliance` from {}\n{}",
        loaded.path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
        toml::to_string(&table)?
    );
    tree.bytes("kiln/kiln.toml", recipe_text.into_bytes(), 0o644);
    // kiln itself, with the libraries it links, run through their own loader.
    let exe = std::env::current_exe().context("finding the running kiln binary")?;
    tree.file("kiln/kiln", &exe, 0o755)?;
    for lib in linked_libraries(&exe)? {
        let name = lib.file_name().context("a library has a name")?.to_string_lossy().into_owned();
        let real = fs::canonicalize(&lib).with_context(|| format!("reading {}", lib.display()))?;
        tree.file(&format!("kiln/lib/{name}"), &real, 0o755)?;
    }
    let busybox =
        crate::util::which("busybox", None).context("busybox not found: install busybox-static (scripts/setup.sh)")?;
    tree.file("kiln/busybox", &busybox, 0o755)?;
    let env = [
        ("KILN_VERSION", env!("CARGO_PKG_VERSION").to_string()),
        ("KILN_ADDRESS", format!("{}/{}", cidr.addr, cidr.prefix.unwrap_or(24))),
        ("KILN_DHCP", server.dhcp.unwrap_or(DhcpMode::Full).to_string()),
        ("KILN_INTERFACE", server.interface.clone().unwrap_or_default()),
        ("KILN_NET_MODULES", NET_MODULES.join(" ")),
        ("KILN_STORAGE_MODULES", STORAGE_MODULES.join(" ")),
        ("KILN_DATA_WAIT", DATA_WAIT_SECS.to_string()),
    ]
    .iter()
    .map(|(k, v)| format!("{k}={}\n", shell_quote(v)))
    .collect::<String>();
    tree.bytes("kiln/appliance.env", env.into_bytes(), 0o644);
    tree.bytes("kiln/appliance-init", APPLIANCE_INIT.as_bytes().to_vec(), 0o755);

    let work = tempfile::Builder::new()
        .prefix("appliance-work-")
        .tempdir_in(store.tmp_dir())
        .context("creating a work directory in the store")?;
    progress.step(format!("writing the appliance archive ({} entries)", tree.len()));
    let archive = work.path().join("appliance.cpio.gz");
    let archive_sha = write_archive(&tree, &archive, sde)?;

    let bundle_manifest = &appliance.manifest;
    let cmdline = format!("{} kiln.init=/kiln/appliance-init", bundle_manifest.cmdline);
    let payload = iso::Payload {
        kernel: appliance.path.join("kernel"),
        initrds: vec![appliance.path.join("initramfs"), appliance.path.join("image"), archive.clone()],
        cmdline: cmdline.clone(),
        sde,
    };
    let tools = iso::Tools::find()?;
    let inputs = json!({
        "kind": "appliance",
        "format": FORMAT_VERSION,
        "appliance_format": APPLIANCE_FORMAT,
        "kernel": bundle_manifest.file(KERNEL)?.sha256,
        "initramfs": bundle_manifest.file(INITRAMFS)?.sha256,
        "image": bundle_manifest.file(IMAGE)?.sha256,
        "appliance_archive": archive_sha,
        "cmdline": cmdline,
        "source_date_epoch": sde,
        "tools": tools.identity()?,
    });
    let hash = input_hash(&inputs);
    let name = format!("appliance-{}", app.image);
    let out_dir = match store.lookup(&hash, &name) {
        Some(p) => p,
        None => {
            let pending = store.begin(&name)?;
            let iso_path = pending.dir().join("appliance.iso");
            progress.step("making the ISO (isolinux, UKI in a FAT image, xorriso)");
            iso::make(&tools, &payload, work.path(), &iso_path)?;
            let (digest, size) = sha256_file(&iso_path)?;
            let manifest = json!({
                "schema": 1,
                "kind": "appliance",
                "name": name,
                "image": app.image,
                "images": served,
                "cmdline": cmdline,
                "recipe_hash": hash,
                "source_date_epoch": sde,
                "format": FORMAT_VERSION,
                "files": { "appliance.iso": { "sha256": digest.hex(), "size": size } },
            });
            write_manifest(pending.dir(), &manifest)?;
            store.commit(pending, &hash, &name)?
        }
    };
    store.add_root(RootKind::Appliance, &app.image, &out_dir)?;
    let path = out_dir.join("appliance.iso");
    let (digest, size) = sha256_file(&path)?;
    progress.done(path.display());
    Ok(BuiltIso { path, size, sha256: digest.hex() })
}

/// `text` as one word for sh: single-quoted, with each `'` written as `'\''`.
fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

/// The shared libraries `exe` loads, by `ldd` (the vDSO left out).
fn linked_libraries(exe: &Path) -> Result<Vec<PathBuf>> {
    let out = crate::util::run_command(Command::new("ldd").arg(exe))?;
    let mut libs = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            libs.push(PathBuf::from(p));
        }
    }
    if !libs.iter().any(|l| l.file_name().is_some_and(|n| n.to_string_lossy().starts_with("ld-linux"))) {
        bail!("{} links no ld-linux loader (ldd found: {libs:?}); the appliance needs a dynamically linked kiln for x86_64", exe.display());
    }
    libs.sort();
    Ok(libs)
}

/// Writes the appliance archive, gzip-compressed; returns its sha256.
fn write_archive(tree: &NewcTree, out: &Path, sde: i64) -> Result<String> {
    let f = File::create(out).with_context(|| format!("creating {}", out.display()))?;
    let comp = Compressor::new(HashingWriter::new(f), Compression::Gzip, 6, 1)?;
    let (buf, _) = tree.write(BufWriter::with_capacity(1 << 20, comp), sde.clamp(0, u32::MAX as i64) as u32)?;
    let comp = buf.into_inner().map_err(|e| e.into_error())?;
    let hashing = comp.finish().with_context(|| format!("writing {}", out.display()))?;
    let (f, digest, _) = hashing.finish();
    f.sync_all()?;
    Ok(digest.hex())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_quote_survives_sh() {
        for text in ["eno1", "", "it's", "a b $x `y` \\ \"z\"", "''"] {
            let out = Command::new("sh")
                .arg("-c")
                .arg(format!("v={}; printf %s \"$v\"", shell_quote(text)))
                .output()
                .unwrap();
            assert_eq!(String::from_utf8_lossy(&out.stdout), text);
        }
    }
}
