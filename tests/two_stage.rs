//! Two-stage boot end to end: `kiln serve` in a network namespace, a QEMU machine (TCG, SeaBIOS, Debian's
//! iPXE ROM) PXE-booting a two-stage bundle: the loader fetches the image, verifies it, mounts it (from RAM or
//! from the node's disk) and starts the image's init, which prints what the test checks.
//!
//! One QEMU machine at a time (a lock): boots under TCG share the cores, and timeouts would lie otherwise.

mod common;

use std::fs;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use common::*;

const SUBNET: &str = "10.213.9";
const MAC: &str = "52:54:00:aa:bb:42";
/// 4.5 GiB and a 9-byte tail: more than newc (and 32 bits) can say.
const BIG_SIZE: u64 = (9 << 29) + 9;

static QEMU: Mutex<()> = Mutex::new(());

/// The static kiln-node the bundles carry: $KILN_NODE (scripts/test.sh sets it), else built now.
fn kiln_node() -> PathBuf {
    static NODE: OnceLock<PathBuf> = OnceLock::new();
    NODE.get_or_init(|| {
        if let Some(p) = std::env::var_os("KILN_NODE").filter(|p| !p.is_empty()) {
            return PathBuf::from(p);
        }
        let out = Command::new("bash")
            .arg(repo().join("scripts/build-node.sh"))
            .env("PROFILE", "dev")
            .stderr(Stdio::inherit())
            .output()
            .expect("running scripts/build-node.sh");
        assert!(out.status.success(), "scripts/build-node.sh failed");
        PathBuf::from(String::from_utf8(out.stdout).unwrap().lines().last().unwrap().trim())
    })
    .clone()
}

fn kiln_with_node(dir: &Path, store: &Path, args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .current_dir(dir)
        .env("KILN_STORE", store)
        .env("KILN_NODE", kiln_node())
        .env_remove("SOURCE_DATE_EPOCH")
        .output()
        .expect("running kiln");
    eprintln!(
        "$ kiln {}\n--- status: {}\n--- stdout:\n{}--- stderr:\n{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn kiln_node_ok(dir: &Path, store: &Path, args: &[&str]) -> String {
    let out = kiln_with_node(dir, store, args);
    assert!(out.status.success(), "kiln {args:?} failed:\n{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// A node image: the tiny fixture's rootfs, the kernel modules a two-stage node needs (virtio, loop,
/// squashfs, overlay, with their dependencies, as a distribution kernel has them), edge cases the image must
/// keep (a hardlink, a device node, a setuid file owned by 1000:100), and an init that reports them.
fn node_root(work: &Path, big: bool, version: &str) -> PathBuf {
    let root = work.join("rootfs");
    fs::create_dir_all(&root).unwrap();
    sh(&format!("tar -xf '{}' -C '{}'", tiny().join("tiny.rootfs.tar").display(), root.display()));
    let kdir = fixture("kernel.sh");
    let kver = fs::read_to_string(kdir.join("kernel-release")).unwrap().trim().to_string();
    let src = kdir.join("lib/modules").join(&kver);
    let deps = fs::read_to_string(src.join("modules.dep")).unwrap();
    let dep_of = |m: &str| -> Vec<String> {
        let line =
            deps.lines().find(|l| l.starts_with(&format!("{m}:"))).unwrap_or_else(|| panic!("{m} not in modules.dep"));
        line.split_once(':').unwrap().1.split_whitespace().map(String::from).collect()
    };
    let mut todo: Vec<String> = [
        "kernel/drivers/net/virtio_net.ko",
        "kernel/drivers/virtio/virtio_pci.ko",
        "kernel/drivers/block/virtio_blk.ko",
        "kernel/drivers/block/loop.ko",
        "kernel/fs/squashfs/squashfs.ko",
        "kernel/fs/overlayfs/overlay.ko",
    ]
    .map(String::from)
    .to_vec();
    let mut done = std::collections::BTreeSet::new();
    while let Some(m) = todo.pop() {
        if done.insert(m.clone()) {
            todo.extend(dep_of(&m));
        }
    }
    let dst = root.join("lib/modules").join(&kver);
    for m in &done {
        fs::create_dir_all(dst.join(m).parent().unwrap()).unwrap();
        fs::copy(src.join(m), dst.join(m)).unwrap();
    }
    sh(&format!("mknod '{0}/opt/null' c 1 3 && printf owned > '{0}/opt/owned' && chown 1000:100 '{0}/opt/owned' && chmod 4750 '{0}/opt/owned'", root.display()));
    fs::write(root.join("etc/version"), format!("{version}\n")).unwrap();
    if big {
        let f = fs::File::create(root.join("big")).unwrap();
        f.set_len(BIG_SIZE - 9).unwrap();
        f.write_all_at(b"KILN-TAIL", BIG_SIZE - 9).unwrap();
    }
    let init = root.join("sbin/init");
    let _ = fs::remove_file(&init);
    fs::write(
        &init,
        r#"#!/bin/sh
export PATH=/bin:/sbin
mount -t proc proc /proc 2>/dev/null
[ -c /dev/console ] && exec </dev/console >/dev/console 2>&1
if [ -e /big ]; then
  echo "KILN-BIG-SIZE=$(stat -c %s /big)"
  echo "KILN-BIG-TAIL=$(tail -c 9 /big)"
fi
echo "KILN-LINKS=$(stat -c %h:%i /etc/hardlink-src) $(stat -c %h:%i /etc/hardlink-dst)"
echo "KILN-OWNED=$(stat -c %u:%g:%a /opt/owned)"
echo "KILN-DEV=$(stat -c %F:%t:%T /opt/null)"
echo "KILN-ROOT=$(grep ' / ' /proc/mounts | cut -d' ' -f3)"
echo "KILN-VERSION=$(cat /etc/version)"
echo "KILN-AGENT=$(cat /proc/[0-9]*/cmdline 2>/dev/null | tr '\000' ' ' | grep -o 'kiln-node agent' | head -n 1)"
echo "KILN-DONE host=$(cat /etc/hostname)"
poweroff -f
"#,
    )
    .unwrap();
    sh(&format!("chmod 755 '{}'", init.display()));
    root
}

struct Site {
    _work: tempfile::TempDir,
    dir: PathBuf,
    store: PathBuf,
    recipe: PathBuf,
}

/// Writes a recipe with `[image.node]` from `from` (two-stage) and node n042, and builds it.
fn site(from: &str, node_extra: &str) -> Site {
    let work = tempfile::tempdir().unwrap();
    let dir = work.path().to_path_buf();
    site_in(work, dir, from, node_extra)
}

fn site_in(work: tempfile::TempDir, dir: PathBuf, from: &str, node_extra: &str) -> Site {
    let store = dir.join("store");
    let recipe = dir.join("kiln.toml");
    fs::write(
        &recipe,
        format!(
            r#"source_date_epoch = 1700000000

[image.node]
from = "{from}"
cmdline = "console=ttyS0 panic=-1"
boot = "two-stage"

[server]
address = "{SUBNET}.1/24"
interface = "br0"
pool = "{SUBNET}.100-{SUBNET}.150"
dhcp = "full"

[server.boot_files]
bios = "/usr/lib/ipxe/undionly.kpxe"

[node.n042]
mac = "{MAC}"
image = "node"
{node_extra}
"#
        ),
    )
    .unwrap();
    kiln_node_ok(&dir, &store, &["build", "--quiet"]);
    Site { _work: work, dir, store, recipe }
}

/// A namespace with `br0` (the server's address) and `tap0`; kiln serve runs in it. Removed on drop, with
/// what was started in it.
struct Server {
    ns: String,
    serve: Option<Child>,
    log: PathBuf,
}

fn ip(args: &[&str]) {
    let st = Command::new("ip").args(args).status().expect("running ip");
    assert!(st.success(), "ip {args:?} failed");
}

impl Server {
    fn start(tag: &str, s: &Site) -> Server {
        let ns = format!("kiln-2s-{tag}-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &ns]).stderr(Stdio::null()).status();
        ip(&["netns", "add", &ns]);
        ip(&["-n", &ns, "link", "set", "lo", "up"]);
        ip(&["-n", &ns, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &ns, "addr", "add", &format!("{SUBNET}.1/24"), "dev", "br0"]);
        ip(&["-n", &ns, "link", "set", "br0", "up"]);
        ip(&["-n", &ns, "tuntap", "add", "dev", "tap0", "mode", "tap"]);
        ip(&["-n", &ns, "link", "set", "tap0", "master", "br0"]);
        ip(&["-n", &ns, "link", "set", "tap0", "up"]);
        let log = s.dir.join(format!("serve-{tag}.log"));
        let out = fs::File::create(&log).unwrap();
        let serve = Command::new("ip")
            .args(["netns", "exec", &ns, env!("CARGO_BIN_EXE_kiln"), "serve", "-f"])
            .arg(&s.recipe)
            .arg("--store")
            .arg(&s.store)
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .stdin(Stdio::null())
            .spawn()
            .expect("starting kiln serve");
        let mut server = Server { ns, serve: Some(serve), log };
        server.wait_healthy();
        server
    }

    /// Waits (bounded) until kiln serve answers HTTP in the namespace.
    fn wait_healthy(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let ok = Command::new("ip")
                .args(["netns", "exec", &self.ns, "curl", "-sf", "-m", "2"])
                .arg(format!("http://{SUBNET}.1/healthz"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if ok {
                return;
            }
            if let Some(Ok(Some(st))) = self.serve.as_mut().map(|c| c.try_wait()) {
                panic!("kiln serve exited ({st}):\n{}", fs::read_to_string(&self.log).unwrap_or_default());
            }
            assert!(Instant::now() < deadline, "kiln serve did not answer within 60 s");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Reloads the recipe and the store (SIGHUP) and waits for the server to say it did.
    fn reload(&mut self) {
        let before = fs::read_to_string(&self.log).unwrap_or_default().matches("reloaded").count();
        let pid = self.serve.as_ref().unwrap().id();
        sh(&format!("kill -HUP {pid}"));
        let deadline = Instant::now() + Duration::from_secs(120);
        while fs::read_to_string(&self.log).unwrap_or_default().matches("reloaded").count() == before {
            assert!(
                Instant::now() < deadline,
                "kiln serve did not reload:\n{}",
                fs::read_to_string(&self.log).unwrap()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Boots the node in QEMU (one at a time) until `marker` is on its console; returns the console.
    fn boot(&self, s: &Site, disk: Option<&Path>, mem: &str, marker: &str, timeout: Duration) -> String {
        if !have("qemu-system-x86_64") || !Path::new("/usr/lib/ipxe/undionly.kpxe").exists() {
            panic!("qemu-system-x86 and ipxe are needed: run scripts/setup.sh");
        }
        let _one = QEMU.lock().unwrap_or_else(|e| e.into_inner());
        let n = fs::read_dir(&s.dir)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("console"))
            .count();
        let console = s.dir.join(format!("console-{n}.log"));
        let sercon = s.dir.join("sercon");
        fs::write(&sercon, [0xf8u8, 0x03]).unwrap();
        let mut args: Vec<String> = ["qemu-system-x86_64", "-accel", "tcg", "-cpu", "max", "-m", mem, "-machine", "pc"]
            .into_iter()
            .map(String::from)
            .collect();
        args.extend(["-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"].map(String::from));
        args.extend(["-serial".into(), format!("file:{}", console.display())]);
        args.extend(["-fw_cfg".into(), format!("name=etc/sercon-port,file={}", sercon.display())]);
        args.extend(["-netdev", "tap,id=n0,ifname=tap0,script=no,downscript=no"].map(String::from));
        args.extend(["-device".into(), format!("virtio-net-pci,netdev=n0,mac={MAC},bootindex=1")]);
        if let Some(d) = disk {
            args.extend(["-drive".into(), format!("file={},format=raw,if=none,id=d0", d.display())]);
            args.extend(["-device", "virtio-blk-pci,drive=d0,bootindex=9"].map(String::from));
        }
        let mut vm = Command::new("ip")
            .args(["netns", "exec", &self.ns])
            .args(&args)
            .stdout(Stdio::null())
            .stderr(fs::File::create(s.dir.join(format!("qemu-{n}.err"))).unwrap())
            .spawn()
            .expect("starting QEMU");
        let started = Instant::now();
        let result =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| wait_console(&console, marker, &mut vm, timeout)));
        let _ = vm.kill();
        let _ = vm.wait();
        eprintln!("--- boot {n}: {marker:?} after {:.1}s", started.elapsed().as_secs_f64());
        match result {
            Ok(text) => text,
            Err(e) => {
                eprintln!("--- kiln serve log:\n{}", self.log());
                std::panic::resume_unwind(e)
            }
        }
    }

    /// The loader's reports and downloads recorded for n042, as `kiln node events` prints them (runs of spaces
    /// squeezed).
    fn events(&self, s: &Site) -> String {
        let out = kiln_node_ok(
            &s.dir,
            &s.store,
            &["node", "events", "-f", s.recipe.to_str().unwrap(), "--mac", "n042", "--limit", "1000"],
        );
        out.lines().map(|l| l.split_whitespace().collect::<Vec<_>>().join(" ") + "\n").collect()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.serve.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
    }
}

/// The store path of the node's two-stage bundle.
fn bundle(s: &Site) -> PathBuf {
    fs::canonicalize(s.store.join("roots/image-node.two-stage")).expect("the two-stage root")
}

fn manifest_image_sha(s: &Site) -> String {
    let m: serde_json::Value = serde_json::from_slice(&fs::read(bundle(s).join("manifest.json")).unwrap()).unwrap();
    m["files"]["image"]["sha256"].as_str().unwrap().to_string()
}

#[test]
fn a_file_over_4_gib_boots_from_ram_with_links_devices_and_owners() {
    let work = tempfile::tempdir().unwrap();
    let root = node_root(work.path(), true, "1");
    let dir = work.path().to_path_buf();
    let s = site_in(work, dir, &format!("dir:{}", root.display()), &format!("ipv4 = \"{SUBNET}.42\""));
    // The initrd path refuses this image; two-stage holds it.
    let err = kiln_with_node(&s.dir, &s.store, &["build", "--from", &format!("dir:{}", root.display()), "--name", "x"]);
    assert!(!err.status.success() && String::from_utf8_lossy(&err.stderr).contains("4 GiB"));
    let server = Server::start("big", &s);
    let console = server.boot(&s, None, "1024", "KILN-DONE", Duration::from_secs(600));
    assert!(console.contains(&format!("KILN-BIG-SIZE={BIG_SIZE}")), "{console}");
    assert!(console.contains("KILN-BIG-TAIL=KILN-TAIL"), "{console}");
    let links = console.lines().find_map(|l| l.strip_prefix("KILN-LINKS=")).unwrap().trim().to_string();
    let (a, b) = links.split_once(' ').unwrap();
    assert!(a == b && a.starts_with("2:"), "hardlinks: {links}");
    assert!(console.contains("KILN-OWNED=1000:100:4750"), "{console}");
    assert!(console.contains("KILN-DEV=character special file:1:3"), "{console}");
    assert!(console.contains("KILN-ROOT=overlay"), "{console}");
    assert!(console.contains("KILN-DONE host=n042"), "the node's overlay was not applied:\n{console}");
    assert!(console.contains("KILN-AGENT=kiln-node agent"), "the loader did not start the status agent:\n{console}");
    let events = server.events(&s);
    for step in ["loader started", "loader fetched image", "loader verified sha256:", "loader switch_root"] {
        assert!(events.contains(step), "no {step:?} event:\n{events}");
    }
    assert!(server.log().contains("n042 blob node.two-stage/image"), "{}", server.log());
}

#[test]
fn a_byte_flipped_after_serve_verified_the_image_is_refused() {
    let work = tempfile::tempdir().unwrap();
    let root = node_root(work.path(), false, "1");
    let dir = work.path().to_path_buf();
    let s = site_in(work, dir, &format!("dir:{}", root.display()), &format!("ipv4 = \"{SUBNET}.42\""));
    let server = Server::start("flip", &s);
    let expected = manifest_image_sha(&s);
    // kiln serve checked the bundle when it started; now the file changes under it.
    let image = bundle(&s).join("image");
    let f = fs::OpenOptions::new().write(true).open(&image).unwrap();
    let at = f.metadata().unwrap().len() / 2;
    let mut b = [0u8; 1];
    fs::File::open(&image).unwrap().read_exact_at(&mut b, at).unwrap();
    f.write_all_at(&[b[0] ^ 0xff], at).unwrap();
    drop(f);
    let console = server.boot(&s, None, "1024", "kiln-loader: stopped", Duration::from_secs(600));
    assert!(!console.contains("KILN-DONE"), "a corrupt image booted:\n{console}");
    assert!(
        console.contains(&format!("image digest mismatch: expected sha256:{expected}, got sha256:")),
        "the console does not name the digests:\n{console}"
    );
    assert!(console.contains("gave up after 3 attempts"), "{console}");
    let events = server.events(&s);
    assert!(
        events.contains(&format!("loader mismatch attempt 1 of 3: image digest mismatch: expected sha256:{expected}")),
        "{events}"
    );
    assert!(events.contains("loader failed"), "{events}");
    assert!(!events.contains("loader switch_root"), "{events}");
}

#[test]
fn a_disk_is_installed_then_reused_then_replaced_when_the_image_changes() {
    let work = tempfile::tempdir().unwrap();
    let root = node_root(work.path(), false, "1");
    let dir = work.path().to_path_buf();
    let s =
        site_in(work, dir, &format!("dir:{}", root.display()), &format!("ipv4 = \"{SUBNET}.42\"\ndisk = \"/dev/vda\""));
    let disk = s.dir.join("disk.raw");
    fs::File::create(&disk).unwrap().set_len(256 << 20).unwrap();
    let mut server = Server::start("disk", &s);
    let image_downloads = |server: &Server| server.log().matches("blob node.two-stage/image").count();

    let first = server.boot(&s, Some(&disk), "1024", "KILN-DONE", Duration::from_secs(600));
    assert!(first.contains("KILN-VERSION=1") && first.contains("/dev/vda is blank"), "{first}");
    let events = server.events(&s);
    assert!(events.contains("loader installed to /dev/vda"), "{events}");
    assert_eq!(image_downloads(&server), 1);
    let table = sh(&format!("sfdisk --dump '{}'", disk.display()));
    assert!(table.contains("name=\"kiln-image\""), "{table}");

    let second = server.boot(&s, Some(&disk), "1024", "KILN-DONE", Duration::from_secs(600));
    assert!(second.contains("KILN-VERSION=1") && second.contains("already holds image"), "{second}");
    let events = server.events(&s);
    assert_eq!(events.matches("loader reused image sha256:").count(), 1, "{events}");
    assert_eq!(events.matches("loader fetched").count(), 1, "the second boot fetched the image:\n{events}");
    assert_eq!(image_downloads(&server), 1, "the second boot downloaded the image:\n{}", server.log());

    // A new image: rebuilt, reloaded, and the next boot replaces what the disk holds.
    fs::write(root.join("etc/version"), "2\n").unwrap();
    kiln_node_ok(&s.dir, &s.store, &["build", "--quiet"]);
    server.reload();
    let third = server.boot(&s, Some(&disk), "1024", "KILN-DONE", Duration::from_secs(600));
    assert!(third.contains("KILN-VERSION=2") && third.contains("holds another image"), "{third}");
    let events = server.events(&s);
    assert_eq!(events.matches("loader installed to /dev/vda").count(), 2, "{events}");
    assert_eq!(image_downloads(&server), 2);
}

#[test]
fn a_disk_kiln_did_not_write_is_refused_without_disk_wipe() {
    let work = tempfile::tempdir().unwrap();
    let root = node_root(work.path(), false, "1");
    let dir = work.path().to_path_buf();
    let s =
        site_in(work, dir, &format!("dir:{}", root.display()), &format!("ipv4 = \"{SUBNET}.42\"\ndisk = \"/dev/vda\""));
    let disk = s.dir.join("disk.raw");
    fs::File::create(&disk).unwrap().set_len(64 << 20).unwrap();
    sh(&format!("echo 'label: dos' | sfdisk -q '{}'", disk.display()));
    let before = fs::read(&disk).unwrap();
    let server = Server::start("foreign", &s);
    let console = server.boot(&s, Some(&disk), "1024", "kiln-loader: stopped", Duration::from_secs(600));
    assert!(console.contains("/dev/vda holds an MBR partition table, not written by kiln"), "{console}");
    assert!(!console.contains("KILN-DONE"));
    assert!(fs::read(&disk).unwrap() == before, "the refused disk was written to");
    let events = server.events(&s);
    assert!(events.contains("loader refused /dev/vda holds an MBR partition table"), "{events}");
}

#[test]
fn the_debian_image_boots_two_stage_with_dhcp() {
    let fix = debian();
    let s = site(&format!("oci:{}:latest", fix.join("oci").display()), "");
    let server = Server::start("debian", &s);
    let console = server.boot(&s, None, "1536", "KILN-DEBIAN-BOOTED", Duration::from_secs(900));
    assert!(console.contains("kiln-loader: DHCP:"), "{console}");
    let events = server.events(&s);
    assert!(events.contains("loader verified") && events.contains("loader switch_root"), "{events}");
}

#[test]
fn two_stage_bundles_are_reproducible_and_carry_the_loader() {
    let work = tempfile::tempdir().unwrap();
    let root = node_root(work.path(), false, "1");
    let from = format!("dir:{}", root.display());
    let mut sums = Vec::new();
    for i in 0..2 {
        let d = work.path().join(format!("b{i}"));
        fs::create_dir_all(&d).unwrap();
        let path = kiln_node_ok(
            &d,
            &d.join("store"),
            &[
                "build",
                "--quiet",
                "--from",
                &from,
                "--name",
                "node",
                "--boot",
                "two-stage",
                "--source-date-epoch",
                "1700000000",
                "--threads",
                &(i + 1).to_string(),
            ],
        );
        let path = PathBuf::from(path.trim());
        let m: serde_json::Value = serde_json::from_slice(&fs::read(path.join("manifest.json")).unwrap()).unwrap();
        assert_eq!(m["boot"], "two-stage");
        assert_eq!(m["image"]["format"], "squashfs");
        assert_eq!(m["loader"]["sha256"], sha256_hex(&kiln_node()));
        let mods: Vec<&str> = m["loader"]["modules"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
        for want in ["virtio_net", "virtio_pci", "loop", "squashfs", "overlay", "virtio_blk"] {
            assert!(mods.contains(&want), "{want} not carried: {mods:?}");
        }
        let files: Vec<String> =
            ["kernel", "initramfs", "image", "manifest.json"].iter().map(|f| sha256_hex(&path.join(f))).collect();
        sums.push((path.file_name().unwrap().to_owned(), files));
    }
    assert_eq!(sums[0], sums[1], "two builds differ");
    let mut listing = Command::new("unsquashfs")
        .args(["-lln", "-d", ""])
        .arg(work.path().join("b0/store/store").join(&sums[0].0).join("image"))
        .output()
        .unwrap();
    assert!(listing.status.success());
    listing.stdout.truncate(1 << 20);
    let text = String::from_utf8_lossy(&listing.stdout);
    assert!(text.contains("/sbin/init") && text.contains("/etc/hardlink-dst"), "{text}");
    let _ = std::io::stdout().flush();
}

/// One-layer images are written while the layer streams; the bytes are those of a build that reads the layer
/// whole (KILN_NO_STREAM=1), for a layer in walk order (GNU tar --sort=name), one in bytewise order, and one
/// in neither (the stream gives up and the layer is read whole).
#[test]
fn one_layer_images_stream_to_the_same_bytes() {
    let work = tempfile::tempdir().unwrap();
    let rootfs = work.path().join("rootfs");
    fs::create_dir_all(&rootfs).unwrap();
    sh(&format!("tar -xf '{}' -C '{}'", tiny().join("tiny.rootfs.tar").display(), rootfs.display()));
    let orders = [
        ("walk", "tar --sort=name -C ROOT -cf OUT ."),
        ("bytewise", "cd ROOT && find . | LC_ALL=C sort | tar --no-recursion -T - -cf OUT"),
        ("reversed", "cd ROOT && find . | LC_ALL=C sort -r | tar --no-recursion -T - -cf OUT"),
    ];
    for (name, cmd) in orders {
        let tar = work.path().join(format!("{name}.tar"));
        let cmd = cmd.replace("ROOT", &rootfs.display().to_string()).replace("OUT", &tar.display().to_string());
        sh(&format!("{cmd} --numeric-owner --mtime=@1700000000 && gzip -n '{}'", tar.display()));
        let oci = work.path().join(format!("{name}-oci"));
        sh(&format!(
            "python3 '{}' '{}' 2023-11-14T22:13:20Z '{}.gz' >/dev/null",
            repo().join("scripts/fixtures/oci-assemble.py").display(),
            oci.display(),
            tar.display()
        ));
        for boot in ["initrd", "two-stage"] {
            let mut sums = Vec::new();
            for stream in [true, false] {
                let store = work.path().join(format!("store-{name}-{boot}-{stream}"));
                let mut cmd = Command::new(env!("CARGO_BIN_EXE_kiln"));
                cmd.args(["build", "--quiet", "--from", &format!("oci:{}:latest", oci.display()), "--name", "t"])
                    .args(["--boot", boot, "--exclude", "/opt/opaque/**"])
                    .env("KILN_STORE", &store)
                    .env("KILN_NODE", kiln_node());
                if !stream {
                    cmd.env("KILN_NO_STREAM", "1");
                }
                let out = cmd.output().unwrap();
                assert!(out.status.success(), "{name} {boot}: {}", String::from_utf8_lossy(&out.stderr));
                let path = PathBuf::from(String::from_utf8(out.stdout).unwrap().trim());
                let files: Vec<String> = ["kernel", "initramfs", "image", "manifest.json"]
                    .iter()
                    .map(|f| sha256_hex(&path.join(f)))
                    .collect();
                sums.push(files);
            }
            assert_eq!(sums[0], sums[1], "{name} layer, {boot}: the streamed build differs");
        }
    }
}
