//! What one boot server serves, resolved from the recipe and the store: nodes, the bundles they
//! boot (verified against their manifests), the iPXE binaries for firmware, overlays, and the
//! per-node iPXE scripts. Built whole at start and on every reload; requests read a snapshot.
//!
//! A script first asks iPXE which architecture it runs as (`${buildarch}`): a machine whose
//! firmware cannot run its bundle's kernel (an arm64 node given an x86_64 image, or the reverse)
//! is sent back for a script that says so on its console, and the server records the mismatch,
//! rather than handing it a kernel that cannot start.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};

use super::firmware::BootFiles;
use super::http::HttpLimits;
use super::overlay;
use super::state::StateLimits;
use crate::bundle::{self, two_stage, Manifest};
use crate::net::{Mac, Subnet};
use crate::recipe::{BootMode, DhcpMode, LoadedRecipe, Node, ServerRecipe, UnknownPolicy};
use crate::store::{verify_output, RootKind, Store};

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
    /// The kernel's architecture as Linux names it (`x86_64`, `aarch64`), from the manifest.
    pub arch: String,
    pub boot: BootMode,
    /// The image's size (the two-stage loader checks it).
    pub image_size: u64,
}

/// A script for one machine, and what went wrong when it cannot boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Script {
    pub text: String,
    /// Set when the machine's firmware cannot run its image's kernel: a line for the boot log.
    pub mismatch: Option<String>,
}

impl Script {
    fn ok(text: String) -> Script {
        Script { text, mismatch: None }
    }
}

/// iPXE's `${buildarch}` values that can start a kernel for `arch` (Linux name). A 32-bit x86
/// iPXE (Debian's `undionly.kpxe`) boots 64-bit kernels.
fn firmware_runs(arch: &str) -> &'static [&'static str] {
    match arch {
        "x86_64" => &["x86_64", "i386"],
        "aarch64" => &["arm64"],
        _ => &[],
    }
}

pub struct Site {
    pub server: ServerRecipe,
    /// What one HTTP client may hold.
    pub http_limits: HttpLimits,
    /// Networks from which any overlay may be fetched (`[server] overlay_allow`).
    pub overlay_allow: Vec<Subnet>,
    /// Caps on discovered machines and boot events.
    pub state_limits: StateLimits,
    pub address: Ipv4Addr,
    pub prefix: u8,
    pub http_port: u16,
    pub nodes: Vec<Node>,
    by_mac: HashMap<Mac, usize>,
    /// By store root name: the image's name (initrd) or `NAME.two-stage` (`bundle::two_stage::root_name`).
    pub bundles: BTreeMap<String, Bundle>,
    /// Each node's bundle (its root name), by index in `nodes`.
    node_bundle: Vec<String>,
    /// How unknown machines boot the `unknown = "boot:IMAGE"` image (the image's own `boot`).
    unknown_bundle: Option<String>,
    pub blobs: HashMap<String, Blob>,
    pub overlays: HashMap<Mac, Arc<Vec<u8>>>,
    pub boot_files: BootFiles,
}

impl Site {
    pub fn load(loaded: &LoadedRecipe, store: &Store) -> Result<Site> {
        let recipe = &loaded.recipe;
        let file = loaded.path.display().to_string();
        let server = loaded.server()?.clone();
        let cidr =
            server.address.with_context(|| format!("{file}: [server] needs `address` (e.g. \"10.4.0.1/24\")"))?;
        let prefix = cidr.prefix.unwrap_or(24);
        let specs = bundle::BundleSpec::all(loaded)?;
        let nodes = loaded.nodes()?;
        let by_mac = nodes.iter().enumerate().map(|(i, n)| (n.mac, i)).collect();
        let boot_of = |image: &str| specs.get(image).map(|s| s.boot).unwrap_or_default();

        let mut wanted: Vec<(String, BootMode, String)> = Vec::new();
        let mut node_bundle = Vec::with_capacity(nodes.len());
        for n in &nodes {
            let boot = n.boot.unwrap_or_else(|| boot_of(&n.image));
            if n.disk.is_some() && boot != BootMode::TwoStage {
                bail!(
                    "{file}: [node.{}] has a disk, which only the two-stage loader installs to: set boot = \"two-stage\" \
                     (on the node, its profile or [image.{}])",
                    n.name,
                    n.image
                );
            }
            node_bundle.push(two_stage::root_name(&n.image, boot));
            wanted.push((n.image.clone(), boot, format!("[node.{}]", n.name)));
        }
        let mut unknown_bundle = None;
        if let UnknownPolicy::Boot(img) = &server.unknown {
            unknown_bundle = Some(two_stage::root_name(img, boot_of(img)));
            wanted.push((img.clone(), boot_of(img), "[server] unknown".into()));
        }
        let mut bundles = BTreeMap::new();
        let mut blobs = HashMap::new();
        for (image, boot, who) in wanted {
            let root = two_stage::root_name(&image, boot);
            if bundles.contains_key(&root) {
                continue;
            }
            if !recipe.image.contains_key(&image) {
                bail!("{file}: {who} uses image {image:?}, but there is no [image.{image}] to build it");
            }
            let bundle =
                load_bundle(store, &image, boot).with_context(|| format!("{file}: {who} uses image {image:?}"))?;
            for (name, hex) in [
                (bundle::manifest::KERNEL, &bundle.kernel),
                (bundle::manifest::INITRAMFS, &bundle.initramfs),
                (bundle::manifest::IMAGE, &bundle.image),
            ] {
                let path = bundle.path.join(name);
                let size = std::fs::metadata(&path).with_context(|| format!("reading {}", path.display()))?.len();
                blobs.insert(hex.clone(), Blob { path, size, label: format!("{root}/{name}") });
            }
            bundles.insert(root, bundle);
        }
        let boot_files = BootFiles::load(&server, store, &file)?;
        super::heartbeat::Settings::check(&server).with_context(|| file.clone())?;
        let http_port = server.http_port.unwrap_or(80);
        let mut templates = HashMap::new();
        for (name, img) in &recipe.image {
            if let Some(dir) = &img.overlay {
                let dir = loaded.resolve_path(dir);
                let t = overlay::read_templates(&dir).with_context(|| format!("{file}: [image.{name}] overlay"))?;
                templates.insert(name.clone(), t);
            }
        }
        let none = BTreeMap::new();
        let mut overlays = HashMap::new();
        for n in &nodes {
            let t = templates.get(&n.image).unwrap_or(&none);
            let agent = overlay::AgentEnv {
                server_url: base_url(cidr.addr, http_port),
                heartbeat: super::status::heartbeat_of(server.heartbeat),
                image_digest: bundles.get(&n.image).map(|b: &Bundle| format!("sha256:{}", b.image)).unwrap_or_default(),
            };
            let bytes = overlay::build(n, &nodes, cidr.addr, server.domain.as_deref(), t, &agent)
                .with_context(|| format!("{file}: overlay of [node.{}]", n.name))?;
            overlays.insert(n.mac, Arc::new(bytes));
        }
        let secs =
            |v: Option<u64>, default: std::time::Duration| v.map(std::time::Duration::from_secs).unwrap_or(default);
        let http = HttpLimits::default();
        let http_limits = HttpLimits {
            max_connections: server.http_max_connections.unwrap_or(http.max_connections),
            header_timeout: secs(server.http_header_timeout, http.header_timeout),
            write_timeout: secs(server.http_write_timeout, http.write_timeout),
            idle_timeout: secs(server.http_idle_timeout, http.idle_timeout),
        };
        let state = StateLimits::default();
        let state_limits = StateLimits {
            max_discovered: server.max_discovered.unwrap_or(state.max_discovered),
            max_events: server.max_events.unwrap_or(state.max_events),
        };
        Ok(Site {
            http_limits,
            overlay_allow: server.overlay_allow.clone(),
            state_limits,
            http_port,
            address: cidr.addr,
            prefix,
            server,
            nodes,
            by_mac,
            bundles,
            node_bundle,
            unknown_bundle,
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
        base_url(self.address, self.http_port)
    }

    /// The iPXE script for a machine: its node's bundle, or what `unknown` says for others.
    ///
    /// `firmware` is the architecture the machine's iPXE reported (`${buildarch}`, sent back as
    /// `?arch=`): `None` on the first request, whose script checks it before booting; empty when
    /// that iPXE cannot tell, which boots as before.
    pub fn script(&self, mac: Mac, firmware: Option<&str>) -> Script {
        let base = self.base_url();
        let (who, bundle, extra, node) = match self.by_mac.get(&mac) {
            Some(&i) => {
                let node = &self.nodes[i];
                match self.bundles.get(&self.node_bundle[i]) {
                    Some(b) => (format!("{} ({mac})", node.name), b, node.cmdline.as_str(), Some(node)),
                    None => {
                        return Script::ok(wait_script(&format!(
                            "kiln: no bundle for image {} of {}",
                            node.image, node.name
                        )))
                    }
                }
            }
            None => match &self.server.unknown {
                UnknownPolicy::Boot(img) => match self.unknown_bundle.as_ref().and_then(|r| self.bundles.get(r)) {
                    Some(b) => (format!("unknown machine {mac}"), b, "", None),
                    None => return Script::ok(wait_script(&format!("kiln: no bundle for image {img}"))),
                },
                _ => {
                    return Script::ok(wait_script(&format!(
                        "kiln: {mac} is not a known node; it has been recorded. Add it with kiln node add."
                    )))
                }
            },
        };
        let render = || match bundle.boot {
            BootMode::TwoStage => two_stage_script(&base, &who, bundle, mac, node),
            BootMode::Initrd => boot_script(&base, &who, bundle, extra, node.map(|_| mac)),
        };
        let runs = firmware_runs(&bundle.arch);
        match firmware {
            Some(fw) if !fw.is_empty() && !runs.is_empty() && !runs.contains(&fw) => {
                let problem = format!(
                    "image {} is built for {}, but the machine's firmware runs {fw} code: not booting it",
                    bundle.name, bundle.arch
                );
                Script { text: mismatch_script(&who, &problem), mismatch: Some(problem) }
            }
            Some(_) => Script::ok(render()),
            None => {
                let mut text = render();
                if !runs.is_empty() {
                    // Any other architecture (or an iPXE that does not know its own) asks again,
                    // saying what it is; the answer then boots or explains. Never a loop: that
                    // request carries `arch`.
                    let checks: Vec<String> = runs.iter().map(|a| format!("iseq ${{buildarch}} {a}")).collect();
                    let guard = format!(
                        "{} || chain --replace --autofree {base}/ipxe/{mac}?arch=${{buildarch}}\n",
                        checks.join(" || ")
                    );
                    text.insert_str("#!ipxe\n".len(), &guard);
                }
                Script::ok(text)
            }
        }
    }
}

/// `http://ADDRESS[:PORT]`: where nodes find the server.
pub fn base_url(address: Ipv4Addr, http_port: u16) -> String {
    if http_port == 80 {
        format!("http://{address}")
    } else {
        format!("http://{address}:{http_port}")
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

/// Renders a two-stage boot script: the kernel with the loader (and the node's overlay, which the loader copies
/// into the image), and on the command line what the loader needs: the image's URL, digest and size (from the
/// manifest), where to report its steps, the node's MAC, static address, VLAN and disk.
pub fn two_stage_script(base: &str, who: &str, b: &Bundle, mac: Mac, node: Option<&Node>) -> String {
    let mut s = String::from("#!ipxe\n");
    let _ = writeln!(s, "echo kiln: booting {who} with {} (two-stage)", b.name);
    let mut args: Vec<String> = vec!["initrd=initramfs".into()];
    if node.is_some() {
        args.push("initrd=overlay".into());
    }
    args.push(b.cmdline.clone());
    if let Some(n) = node {
        args.push(n.cmdline.clone());
    }
    args.push(format!("kiln.image={base}/blob/sha256/{}", b.image));
    args.push(format!("kiln.sha256={}", b.image));
    args.push(format!("kiln.size={}", b.image_size));
    args.push(format!("kiln.mac={mac}"));
    args.push(format!("kiln.events={base}/loader/{mac}"));
    if let Some(n) = node {
        if let Some(ip) = n.ipv4 {
            args.push(format!("kiln.ip={ip}/{}", n.prefix.unwrap_or(24)));
            if let Some(gw) = n.gateway {
                args.push(format!("kiln.gw={gw}"));
            }
        }
        if let Some(vlan) = n.vlan {
            args.push(format!("kiln.vlan={vlan}"));
        }
        if let Some(disk) = &n.disk {
            args.push(format!("kiln.disk={disk}"));
            if n.disk_wipe {
                args.push("kiln.disk_wipe".into());
            }
        }
    }
    args.retain(|a| !a.is_empty());
    let _ = writeln!(s, "kernel {base}/blob/sha256/{} {}", b.kernel, args.join(" "));
    let _ = writeln!(s, "initrd --name initramfs {base}/blob/sha256/{}", b.initramfs);
    if node.is_some() {
        let _ = writeln!(s, "initrd --name overlay {base}/overlay/{mac}");
    }
    s.push_str("boot\n");
    s
}

fn wait_script(msg: &str) -> String {
    format!("#!ipxe\necho {msg}\necho retrying in 30 seconds\nsleep 30\nreboot\n")
}

/// What a machine whose firmware cannot run its image's kernel shows, until the recipe is fixed.
fn mismatch_script(who: &str, problem: &str) -> String {
    format!(
        "#!ipxe\necho kiln: {who}: {problem}\n\
         echo kiln: give it an image built for its architecture (arch in the image's recipe), then kiln build\n\
         echo retrying in 60 seconds\nsleep 60\nreboot\n"
    )
}

fn load_bundle(store: &Store, image: &str, boot: BootMode) -> Result<Bundle> {
    let root = two_stage::root_name(image, boot);
    let path = store.root(RootKind::Image, &root).with_context(|| {
        format!(
            "its {boot} bundle has not been built into the store at {}: run `kiln build` first",
            store.dir().display()
        )
    })?;
    let problems = verify_output(&path);
    if let Some(p) = problems.first() {
        bail!("{}: {} (rebuild it with `kiln build`)", p.path.display(), p.problem);
    }
    let m = Manifest::read(&path)?;
    if m.boot != boot {
        bail!("{} is a {} bundle, not {boot}: rebuild it with `kiln build`", path.display(), m.boot);
    }
    let hex = |f: &str| -> Result<String> { Ok(m.file(f).with_context(|| path.display().to_string())?.sha256.clone()) };
    Ok(Bundle {
        name: image.to_string(),
        kernel: hex(bundle::manifest::KERNEL)?,
        initramfs: hex(bundle::manifest::INITRAMFS)?,
        image: hex(bundle::manifest::IMAGE)?,
        cmdline: m.cmdline.clone(),
        arch: m.arch.clone(),
        boot: m.boot,
        image_size: m.file(bundle::manifest::IMAGE)?.size,
        path,
    })
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
            arch: "x86_64".into(),
            boot: BootMode::Initrd,
            image_size: 1,
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

    fn site_with(arch: &str) -> (Site, Mac) {
        let mac: Mac = "52:54:00:00:00:02".parse().unwrap();
        let node = Node {
            name: "a001".into(),
            mac,
            image: "compute".into(),
            hostname: "a001".into(),
            ipv4: None,
            prefix: None,
            gateway: None,
            cmdline: String::new(),
            vlan: None,
            tags: vec![],
            ssh_authorized_keys: vec![],
            bmc: None,
            boot: None,
            disk: None,
            disk_wipe: false,
        };
        let bundle = Bundle {
            name: "compute".into(),
            path: "/x".into(),
            kernel: "k".repeat(64),
            initramfs: "i".repeat(64),
            image: "m".repeat(64),
            cmdline: String::new(),
            arch: arch.into(),
            boot: BootMode::Initrd,
            image_size: 1,
        };
        let site = Site {
            server: ServerRecipe::default(),
            http_limits: HttpLimits::default(),
            overlay_allow: vec![],
            state_limits: StateLimits::default(),
            address: Ipv4Addr::new(10, 4, 0, 1),
            prefix: 24,
            http_port: 80,
            nodes: vec![node],
            by_mac: [(mac, 0)].into_iter().collect(),
            bundles: [("compute".to_string(), bundle)].into_iter().collect(),
            node_bundle: vec!["compute".into()],
            unknown_bundle: None,
            blobs: HashMap::new(),
            overlays: HashMap::new(),
            boot_files: BootFiles::default(),
        };
        (site, mac)
    }

    #[test]
    fn scripts_check_the_firmware_architecture_before_booting() {
        let (site, mac) = site_with("aarch64");
        // First request: iPXE checks its own architecture, and asks again only when it differs.
        let first = site.script(mac, None);
        assert_eq!(first.mismatch, None);
        let lines: Vec<&str> = first.text.lines().collect();
        assert_eq!(lines[0], "#!ipxe");
        assert_eq!(
            lines[1],
            "iseq ${buildarch} arm64 || chain --replace --autofree http://10.4.0.1/ipxe/52:54:00:00:00:02?arch=${buildarch}"
        );
        assert!(first.text.contains("\nkernel http://10.4.0.1/blob/sha256/") && first.text.ends_with("boot\n"));

        // An x86 iPXE asking again gets the explanation, not the kernel.
        let wrong = site.script(mac, Some("x86_64"));
        let problem = wrong.mismatch.expect("a mismatch");
        assert_eq!(
            problem,
            "image compute is built for aarch64, but the machine's firmware runs x86_64 code: not booting it"
        );
        assert!(wrong.text.contains(&format!("echo kiln: a001 (52:54:00:00:00:02): {problem}\n")), "{}", wrong.text);
        assert!(!wrong.text.contains("kernel ") && !wrong.text.contains("chain"), "{}", wrong.text);

        // The right architecture, or an iPXE that cannot say, boots without asking again.
        for fw in ["arm64", ""] {
            let ok = site.script(mac, Some(fw));
            assert_eq!(ok.mismatch, None);
            assert!(!ok.text.contains("buildarch") && ok.text.contains("\nboot\n"), "{}", ok.text);
        }

        // x86_64 images accept 32-bit x86 iPXE builds too.
        let (site, mac) = site_with("x86_64");
        assert!(site.script(mac, None).text.contains("iseq ${buildarch} x86_64 || iseq ${buildarch} i386 || chain"));
        assert_eq!(site.script(mac, Some("i386")).mismatch, None);
        assert!(site.script(mac, Some("arm64")).mismatch.unwrap().contains("firmware runs arm64 code"));
    }

    #[test]
    fn two_stage_scripts_pass_what_the_loader_needs() {
        let b = Bundle {
            name: "compute".into(),
            path: "/x".into(),
            kernel: "k".repeat(64),
            initramfs: "i".repeat(64),
            image: "m".repeat(64),
            cmdline: "console=ttyS0".into(),
            boot: BootMode::TwoStage,
            image_size: 123,
            arch: "x86_64".into(),
        };
        let mac: Mac = "52:54:00:00:00:01".parse().unwrap();
        let node = Node {
            name: "n001".into(),
            mac,
            image: "compute".into(),
            hostname: "n001".into(),
            ipv4: Some("10.4.0.11".parse().unwrap()),
            prefix: Some(24),
            gateway: Some("10.4.0.254".parse().unwrap()),
            cmdline: "quiet".into(),
            vlan: Some(100),
            tags: vec![],
            ssh_authorized_keys: vec![],
            bmc: None,
            boot: None,
            disk: Some("/dev/sda".into()),
            disk_wipe: true,
        };
        let s = two_stage_script("http://10.4.0.1", "n001", &b, mac, Some(&node));
        let m = "m".repeat(64);
        assert!(
            s.contains(&format!(
                "kernel http://10.4.0.1/blob/sha256/{} initrd=initramfs initrd=overlay console=ttyS0 quiet \
             kiln.image=http://10.4.0.1/blob/sha256/{m} kiln.sha256={m} kiln.size=123 kiln.mac=52:54:00:00:00:01 \
             kiln.events=http://10.4.0.1/loader/52:54:00:00:00:01 kiln.ip=10.4.0.11/24 kiln.gw=10.4.0.254 \
             kiln.vlan=100 kiln.disk=/dev/sda kiln.disk_wipe\n",
                "k".repeat(64)
            )),
            "{s}"
        );
        assert!(!s.contains("initrd --name image"), "{s}");
        assert!(s.contains("initrd --name overlay http://10.4.0.1/overlay/52:54:00:00:00:01\n"));
        let unknown = two_stage_script("http://10.4.0.1", "unknown", &b, mac, None);
        assert!(!unknown.contains("overlay") && !unknown.contains("kiln.ip="), "{unknown}");
    }
}
