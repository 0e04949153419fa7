//! What one boot server serves, resolved from the recipe and the store: nodes, the bundles they
//! boot (verified against their manifests), the iPXE binaries for firmware, overlays, and the
//! per-node iPXE scripts. Built whole at start and on every reload; requests read a snapshot.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use serde::Deserialize;

use super::config::{resolve_nodes, DhcpMode, Mac, Node, ServerRecipe, Unknown};
use super::overlay;
use crate::recipe::LoadedRecipe;
use crate::store::{verify_output, Store};

/// A file served by digest.
#[derive(Debug, Clone)]
pub struct Blob {
    pub path: PathBuf,
    pub size: u64,
    /// What it is, for the boot log: `IMAGE/kernel`, `IMAGE/initramfs`, `IMAGE/image`.
    pub label: String,
}

/// A bundle as the server uses it.
#[derive(Debug, Clone)]
pub struct Bundle {
    pub name: String,
    pub path: PathBuf,
    pub kernel: String,
    pub initramfs: String,
    pub image: String,
    pub cmdline: String,
}

/// The TFTP name of each firmware boot file, and where it is.
#[derive(Debug, Clone, Default)]
pub struct BootFiles {
    pub bios: Option<(String, PathBuf)>,
    pub efi_x64: Option<(String, PathBuf)>,
    pub efi_arm64: Option<(String, PathBuf)>,
}

pub struct Site {
    pub server: ServerRecipe,
    pub address: Ipv4Addr,
    pub prefix: u8,
    pub http_port: u16,
    pub nodes: Vec<Node>,
    by_mac: HashMap<Mac, usize>,
    pub bundles: BTreeMap<String, Bundle>,
    pub blobs: HashMap<String, Blob>,
    pub overlays: HashMap<Mac, Arc<Vec<u8>>>,
    pub boot_files: BootFiles,
}

#[derive(Deserialize)]
struct BundleManifest {
    kind: String,
    cmdline: String,
    files: BTreeMap<String, crate::store::FileEntry>,
}

impl Site {
    pub fn load(loaded: &LoadedRecipe, store: &Store) -> Result<Site> {
        let recipe = &loaded.recipe;
        let file = loaded.path.display().to_string();
        let server =
            recipe.server.clone().with_context(|| format!("{file} has no [server] table: kiln serve needs one"))?;
        let cidr =
            server.address.with_context(|| format!("{file}: [server] needs `address` (e.g. \"10.4.0.1/24\")"))?;
        let prefix = cidr.prefix.unwrap_or(24);
        let nodes = resolve_nodes(&server, &recipe.profile, &recipe.node).with_context(|| file.clone())?;
        let by_mac = nodes.iter().enumerate().map(|(i, n)| (n.mac, i)).collect();

        let mut wanted: Vec<(String, String)> =
            nodes.iter().map(|n| (n.image.clone(), format!("[node.{}]", n.name))).collect();
        if let Unknown::Boot(img) = &server.unknown {
            wanted.push((img.clone(), "[server] unknown".into()));
        }
        let mut bundles = BTreeMap::new();
        let mut blobs = HashMap::new();
        for (image, who) in wanted {
            if bundles.contains_key(&image) {
                continue;
            }
            if !recipe.image.contains_key(&image) {
                bail!("{file}: {who} uses image {image:?}, but there is no [image.{image}] to build it");
            }
            let bundle = load_bundle(store, &image).with_context(|| format!("{file}: {who} uses image {image:?}"))?;
            for hex in [&bundle.kernel, &bundle.initramfs, &bundle.image] {
                let name = if hex == &bundle.kernel {
                    "kernel"
                } else if hex == &bundle.initramfs {
                    "initramfs"
                } else {
                    "image"
                };
                let path = bundle.path.join(name);
                let size = std::fs::metadata(&path).with_context(|| format!("reading {}", path.display()))?.len();
                blobs.insert(hex.clone(), Blob { path, size, label: format!("{image}/{name}") });
            }
            bundles.insert(image.clone(), bundle);
        }
        let boot_files = boot_files(&server, store, &file)?;
        let mut templates = HashMap::new();
        for (name, img) in &recipe.image {
            if let Some(dir) = &img.overlay {
                let dir = if dir.is_absolute() {
                    dir.clone()
                } else {
                    loaded.path.parent().unwrap_or(Path::new(".")).join(dir)
                };
                let t = overlay::read_templates(&dir).with_context(|| format!("{file}: [image.{name}] overlay"))?;
                templates.insert(name.clone(), t);
            }
        }
        let none = BTreeMap::new();
        let mut overlays = HashMap::new();
        for n in &nodes {
            let t = templates.get(&n.image).unwrap_or(&none);
            let bytes = overlay::build(n, &nodes, cidr.addr, server.domain.as_deref(), t)
                .with_context(|| format!("{file}: overlay of [node.{}]", n.name))?;
            overlays.insert(n.mac, Arc::new(bytes));
        }
        Ok(Site {
            http_port: server.http_port.unwrap_or(80),
            address: cidr.addr,
            prefix,
            server,
            nodes,
            by_mac,
            bundles,
            blobs,
            overlays,
            boot_files,
        })
    }

    pub fn node(&self, mac: Mac) -> Option<&Node> {
        self.by_mac.get(&mac).map(|&i| &self.nodes[i])
    }

    pub fn dhcp_mode(&self) -> DhcpMode {
        self.server.dhcp.unwrap_or(DhcpMode::Full)
    }

    pub fn base_url(&self) -> String {
        if self.http_port == 80 {
            format!("http://{}", self.address)
        } else {
            format!("http://{}:{}", self.address, self.http_port)
        }
    }

    /// The iPXE script for a machine: its node's bundle, or what `unknown` says for others.
    pub fn script(&self, mac: Mac) -> String {
        match self.node(mac) {
            Some(node) => match self.bundles.get(&node.image) {
                Some(b) => {
                    boot_script(&self.base_url(), &format!("{} ({mac})", node.name), b, &node.cmdline, Some(mac))
                }
                None => wait_script(&format!("kiln: no bundle for image {} of {}", node.image, node.name)),
            },
            None => match &self.server.unknown {
                Unknown::Boot(img) => match self.bundles.get(img) {
                    Some(b) => boot_script(&self.base_url(), &format!("unknown machine {mac}"), b, "", None),
                    None => wait_script(&format!("kiln: no bundle for image {img}")),
                },
                _ => wait_script(&format!(
                    "kiln: {mac} is not a known node; it has been recorded. Add it with kiln node add."
                )),
            },
        }
    }
}

/// Renders a boot script. Initrds are named and listed as `initrd=NAME` on the command line,
/// which iPXE builds from before 2020 need under UEFI and which BIOS boots ignore.
pub fn boot_script(base: &str, who: &str, b: &Bundle, extra: &str, overlay: Option<Mac>) -> String {
    let mut s = String::from("#!ipxe\n");
    let _ = writeln!(s, "echo kiln: booting {who} with {}", b.name);
    let mut initrds = vec!["initramfs", "image"];
    if overlay.is_some() {
        initrds.push("overlay");
    }
    let names: Vec<String> = initrds.iter().map(|n| format!("initrd={n}")).collect();
    let cmdline = [names.join(" "), b.cmdline.clone(), extra.to_string()]
        .into_iter()
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    let _ = writeln!(s, "kernel {base}/blob/sha256/{} {cmdline}", b.kernel);
    let _ = writeln!(s, "initrd --name initramfs {base}/blob/sha256/{}", b.initramfs);
    let _ = writeln!(s, "initrd --name image {base}/blob/sha256/{}", b.image);
    if let Some(mac) = overlay {
        let _ = writeln!(s, "initrd --name overlay {base}/overlay/{mac}");
    }
    s.push_str("boot\n");
    s
}

fn wait_script(msg: &str) -> String {
    format!("#!ipxe\necho {msg}\necho retrying in 30 seconds\nsleep 30\nreboot\n")
}

fn load_bundle(store: &Store, image: &str) -> Result<Bundle> {
    let root = store.root().join("roots").join(format!("image-{image}"));
    let path = std::fs::canonicalize(&root).with_context(|| {
        format!("it has not been built into the store at {}: run `kiln build` first", store.root().display())
    })?;
    let problems = verify_output(&path);
    if let Some(p) = problems.first() {
        bail!("{}: {} (rebuild it with `kiln build`)", p.path.display(), p.problem);
    }
    let bytes = std::fs::read(path.join("manifest.json"))?;
    let m: BundleManifest =
        serde_json::from_slice(&bytes).with_context(|| format!("{}/manifest.json", path.display()))?;
    if m.kind != "bundle" {
        bail!("{} is not a bundle", path.display());
    }
    let hex = |f: &str| -> Result<String> {
        Ok(m.files.get(f).with_context(|| format!("{}: manifest lists no {f}", path.display()))?.sha256.clone())
    };
    Ok(Bundle {
        name: image.to_string(),
        kernel: hex("kernel")?,
        initramfs: hex("initramfs")?,
        image: hex("image")?,
        cmdline: m.cmdline,
        path,
    })
}

fn boot_files(server: &ServerRecipe, store: &Store, file: &str) -> Result<BootFiles> {
    let mut out = BootFiles::default();
    if let Some(name) = &server.ipxe {
        let dir =
            std::fs::canonicalize(store.root().join("roots").join(format!("ipxe-{name}"))).with_context(|| {
                format!("{file}: [server] ipxe = {name:?} has not been built: run `kiln build-ipxe` (see docs/ipxe.md)")
            })?;
        if let Some(p) = verify_output(&dir).first() {
            bail!("{}: {} (rebuild it with `kiln build-ipxe`)", p.path.display(), p.problem);
        }
        let pick = |f: &str, served: &str| {
            let p = dir.join(f);
            p.is_file().then(|| (served.to_string(), p))
        };
        out.bios = pick("bin-x86_64-pcbios-undionly.kpxe", "undionly.kpxe");
        out.efi_x64 = pick("bin-x86_64-efi-snponly.efi", "snponly.efi");
        out.efi_arm64 = pick("bin-arm64-efi-snponly.efi", "arm64/snponly.efi");
    }
    if let Some(bf) = &server.boot_files {
        let check = |p: &Path, served: &str| -> Result<(String, PathBuf)> {
            if !p.is_file() {
                bail!("{file}: [server.boot_files] names {}, which does not exist", p.display());
            }
            crate::store::verify_listed(p)?;
            Ok((served.to_string(), p.to_path_buf()))
        };
        if let Some(p) = &bf.bios {
            out.bios = Some(check(p, "undionly.kpxe")?);
        }
        if let Some(p) = &bf.efi_x64 {
            out.efi_x64 = Some(check(p, "snponly.efi")?);
        }
        if let Some(p) = &bf.efi_arm64 {
            out.efi_arm64 = Some(check(p, "arm64/snponly.efi")?);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn script_names_initrds_for_old_uefi_ipxe() {
        let b = Bundle {
            name: "compute".into(),
            path: "/x".into(),
            kernel: "k".repeat(64),
            initramfs: "i".repeat(64),
            image: "m".repeat(64),
            cmdline: "console=ttyS0".into(),
        };
        let mac: Mac = "52:54:00:00:00:01".parse().unwrap();
        let s = boot_script("http://10.4.0.1", "n001", &b, "quiet", Some(mac));
        assert!(s.starts_with("#!ipxe\n"));
        assert!(s.contains(&format!(
            "kernel http://10.4.0.1/blob/sha256/{} initrd=initramfs initrd=image initrd=overlay console=ttyS0 quiet\n",
            "k".repeat(64)
        )));
        assert!(s.contains("initrd --name overlay http://10.4.0.1/overlay/52:54:00:00:00:01\n"));
        assert!(s.ends_with("boot\n"));
    }
}
