//! arm64 nodes end to end, from an x86_64 build machine.
//!
//! - From one multi-platform image (the `multiarch` fixture: the tiny image for amd64 and arm64
//!   behind one image index), `--arch` / `arch =` choose the bundle's architecture; a
//!   single-platform image of another architecture is refused and the store is left as it was.
//! - The arm64 bundle boots under `qemu-system-aarch64 -M virt -cpu max` (TCG) to its init.
//! - `kiln serve` tells an arm64 machine given an x86_64 image why it does not boot (script and
//!   boot event), checked over HTTP with curl.
//! - With an iPXE tree in `KILN_IPXE_SRC`: an arm64 guest (AAVMF) and an x86_64 guest (OVMF)
//!   PXE-boot from one `kiln serve` in a network namespace through kiln's own `snponly.efi`
//!   builds, and an arm64 guest given an x86_64 image shows the mismatch on its console.
//!   Without the tree that test prints "skipped: …" and passes.
//!
//! The `docker://` case (a multi-platform index pushed with `skopeo copy --all`) is in
//! tests/registry.rs, beside the registry it needs.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// A manifest digest the multiarch fixture recorded (`amd64`, `arm64`, `index`).
fn fixture_digest(which: &str) -> String {
    fs::read_to_string(multiarch().join(format!("{which}.digest"))).unwrap().trim().to_string()
}

/// `kiln build ... --json` for one bundle: its store path and manifest.
fn build_json(dir: &Path, store: &Path, args: &[&str]) -> (PathBuf, Value) {
    let mut all = vec!["build", "--quiet", "--json"];
    all.extend_from_slice(args);
    let out = kiln_ok(dir, store, &all);
    let v: Value = serde_json::from_str(out.lines().next().expect("one bundle")).unwrap();
    (PathBuf::from(v["path"].as_str().unwrap()), v["manifest"].clone())
}

#[test]
fn one_multi_platform_archive_gives_a_bundle_per_architecture() {
    let work = tempfile::tempdir().unwrap();
    let d = work.path();
    let store = d.join("store");
    let archive = format!("oci-archive:{}", multiarch().join("multiarch.oci.tar").display());
    let layout = format!("oci:{}:latest", multiarch().join("oci").display());
    for from in [&archive, &layout] {
        let mut paths = Vec::new();
        for (arch, linux) in [("arm64", "aarch64"), ("amd64", "x86_64")] {
            let (path, m) = build_json(d, &store, &["--from", from, "--name", &format!("t-{arch}"), "--arch", arch]);
            assert_eq!(m["arch"], linux, "{from} --arch {arch}");
            assert_eq!(m["source"]["digest"], fixture_digest(arch).as_str(), "the {arch} manifest was chosen");
            let kernel_path = m["kernel"]["path"].as_str().unwrap();
            assert!(kernel_path.starts_with("/boot/vmlinuz-") && kernel_path.ends_with(&format!("-{arch}")), "{m}");
            let console = if arch == "arm64" { "console=ttyAMA0,115200" } else { "console=ttyS0,115200" };
            assert!(m["cmdline"].as_str().unwrap().contains(console), "default console for {arch}: {m}");
            let head = fs::read(path.join("kernel")).unwrap();
            if arch == "arm64" {
                assert_eq!(&head[0x38..0x3c], b"ARM\x64", "an arm64 Image");
            } else {
                assert_eq!(&head[0x202..0x206], b"HdrS", "an x86 bzImage");
            }
            paths.push(path);
        }
        assert_ne!(paths[0], paths[1], "two architectures, two bundles");
        assert_ne!(sha256_hex(&paths[0].join("image")), sha256_hex(&paths[1].join("image")));
    }

    // A recipe: `arch` per image (either naming), the machine's architecture by default.
    fs::write(
        d.join("kiln.toml"),
        format!(
            "[image.arm]\nfrom = \"{archive}\"\narch = \"arm64\"\n\n[image.arm-alias]\nfrom = \"{archive}\"\narch = \
             \"aarch64\"\n\n[image.native]\nfrom = \"{archive}\"\n"
        ),
    )
    .unwrap();
    let out = kiln_ok(d, &store, &["build", "--quiet", "--json"]);
    let built: Vec<Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let arch_of = |name: &str| {
        let b = built.iter().find(|b| b["name"] == name).unwrap();
        (b["manifest"]["arch"].as_str().unwrap().to_string(), b["manifest"]["source"]["digest"].clone())
    };
    assert_eq!(arch_of("arm"), ("aarch64".to_string(), Value::from(fixture_digest("arm64"))));
    assert_eq!(arch_of("arm-alias"), arch_of("arm"), "aarch64 names the same architecture");
    assert_eq!(arch_of("native").0, std::env::consts::ARCH);

    // Same inputs again: answered from the store.
    let again = kiln_ok(d, &store, &["build", "--quiet", "--json"]);
    for (a, b) in out.lines().zip(again.lines()) {
        let (a, b): (Value, Value) = (serde_json::from_str(a).unwrap(), serde_json::from_str(b).unwrap());
        assert_eq!(a["path"], b["path"]);
    }
}

#[test]
fn an_image_of_another_architecture_is_refused_and_the_store_is_unchanged() {
    let work = tempfile::tempdir().unwrap();
    let d = work.path();
    let store = d.join("store");
    let amd64 = tiny();
    kiln_ok(
        d,
        &store,
        &["build", "--quiet", "--from", &format!("oci:{}:latest", amd64.join("oci").display()), "--name", "t"],
    );
    let before = store_snapshot(&store);

    for from in [
        format!("oci-archive:{}", amd64.join("tiny.oci.tar").display()),
        format!("oci:{}:latest", amd64.join("oci").display()),
        format!("docker-archive:{}", amd64.join("tiny.docker.tar").display()),
    ] {
        let err = kiln_err(d, &store, &["build", "--from", &from, "--name", "wrong", "--arch", "arm64"]);
        assert!(err.contains("it is an image for amd64, but arm64 was asked for"), "{from}: {err}");
    }
    // The other way round, by default on an x86_64 machine.
    if std::env::consts::ARCH == "x86_64" {
        let from = format!("oci-archive:{}", tiny_arm64().join("tiny.oci.tar").display());
        let err = kiln_err(d, &store, &["build", "--from", &from, "--name", "wrong"]);
        assert!(err.contains("it is an image for arm64, but amd64 was asked for"), "{err}");
    }
    // An index without the architecture names the ones it has.
    let from = format!("oci:{}:latest", multiarch().join("oci").display());
    let err = kiln_err(d, &store, &["build", "--from", &from, "--name", "wrong", "--arch", "riscv64"]);
    assert!(err.contains("unknown architecture \"riscv64\""), "{err}");
    // A recipe's `arch` is checked where it is written.
    fs::write(d.join("kiln.toml"), format!("[image.s]\nfrom = \"{from}\"\narch = \"sparc\"\n")).unwrap();
    let err = kiln_err(d, &store, &["build"]);
    assert!(err.contains("[image.s]") && err.contains("field `arch`") && err.contains("\"sparc\""), "{err}");

    assert_eq!(store_snapshot(&store), before, "a refused build leaves the store as it was");
}

/// Waits (bounded) until no other QEMU guest runs: boot timeouts mean nothing on a machine
/// whose cores another guest holds.
fn wait_for_idle_qemu() {
    let start = Instant::now();
    while Command::new("pgrep").args(["-f", "qemu-system"]).output().is_ok_and(|o| o.status.success()) {
        if start.elapsed() > Duration::from_secs(1200) {
            eprintln!("another QEMU guest still runs after 20 minutes; booting anyway");
            return;
        }
        std::thread::sleep(Duration::from_secs(10));
    }
}

fn need_qemu_aarch64() {
    assert!(
        have("qemu-system-aarch64") && Path::new("/usr/share/AAVMF/AAVMF_CODE.fd").exists(),
        "qemu-system-arm and qemu-efi-aarch64 are needed: run scripts/setup.sh"
    );
}

/// Kills a QEMU process when dropped, so a failed assertion leaves nothing running.
struct Vm(Child);

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn arm64_bundle_boots_in_qemu_virt() {
    need_qemu_aarch64();
    let work = tempfile::tempdir().unwrap();
    let d = work.path();
    let store = d.join("store");
    let from = format!("oci-archive:{}", multiarch().join("multiarch.oci.tar").display());
    let (bundle, m) = build_json(
        d,
        &store,
        &["--from", &from, "--name", "a", "--arch", "arm64", "--cmdline", "console=ttyAMA0 panic=-1"],
    );
    let initrd = d.join("initrd");
    let mut cat = fs::read(bundle.join("initramfs")).unwrap();
    cat.extend(fs::read(bundle.join("image")).unwrap());
    fs::write(&initrd, cat).unwrap();
    let log = d.join("console.log");
    wait_for_idle_qemu();
    let mut vm = Vm(Command::new("qemu-system-aarch64")
        .args(["-M", "virt", "-cpu", "max", "-accel", "tcg", "-m", "1024"])
        .args(["-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"])
        .arg("-serial")
        .arg(format!("file:{}", log.display()))
        .arg("-kernel")
        .arg(bundle.join("kernel"))
        .arg("-initrd")
        .arg(&initrd)
        .args(["-append", m["cmdline"].as_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting qemu-system-aarch64"));
    let console = wait_console(&log, "KILN-TINY-BOOTED", &mut vm.0, Duration::from_secs(300));
    assert!(console.contains("kiln: starting /sbin/init"), "kiln's init shim ran:\n{console}");
    // `uname -r` follows the marker.
    let release = fs::read_to_string(tiny_arm64().join("kernel-release")).unwrap();
    let console = wait_console(&log, release.trim(), &mut vm.0, Duration::from_secs(60));
    assert!(console.contains("Machine model: linux,dummy-virt"), "{console}");
}

/// Free TCP and UDP ports on loopback (bound and released; the server binds them next).
/// A running `kiln serve`, stopped when dropped.
struct Serve(Child);

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn curl(url: &str) -> String {
    sh(&format!("curl -sS --max-time 10 '{url}'"))
}

/// The boot log of `mac` as `kiln node events --json` gives it, once `kind` is in it (bounded wait:
/// the server records events after answering).
fn events_with(d: &Path, store: &Path, mac: &str, kind: &str) -> Vec<Value> {
    let start = Instant::now();
    loop {
        let out = kiln_ok(d, store, &["node", "events", "--mac", mac, "--json"]);
        let events: Vec<Value> = serde_json::from_str(&out).unwrap();
        if events.iter().any(|e| e["kind"] == kind) || start.elapsed() > Duration::from_secs(15) {
            return events;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn an_arm64_machine_given_an_x86_image_is_told_so() {
    let work = tempfile::tempdir().unwrap();
    let d = work.path();
    let store = d.join("store");
    let (http, tftp) = (free_port(), free_port());
    fs::write(
        d.join("kiln.toml"),
        format!(
            r#"[image.x86]
from = "oci-archive:{}"
arch = "amd64"

[server]
address = "127.0.0.1/8"
dhcp = "off"
http_port = {http}
tftp_port = {tftp}

[node.a002]
mac = "52:54:00:aa:bb:63"
image = "x86"
"#,
            tiny().join("tiny.oci.tar").display()
        ),
    )
    .unwrap();
    kiln_ok(d, &store, &["build", "--quiet"]);
    let serve_log = d.join("serve.log");
    let _serve = Serve(
        Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(["serve", "--store"])
            .arg(&store)
            .current_dir(d)
            .stdout(fs::File::create(&serve_log).unwrap())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting kiln serve"),
    );
    let base = format!("http://127.0.0.1:{http}");
    let start = Instant::now();
    while Command::new("curl").args(["-sf", &format!("{base}/healthz")]).output().map_or(true, |o| !o.status.success())
    {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "kiln serve did not answer:\n{}",
            fs::read_to_string(&serve_log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let mac = "52:54:00:aa:bb:63";

    // The first script lets an x86 iPXE boot and sends any other back with its architecture.
    let first = curl(&format!("{base}/ipxe/{mac}"));
    assert!(
        first.contains(&format!(
            "iseq ${{buildarch}} x86_64 || iseq ${{buildarch}} i386 || chain --replace --autofree {base}/ipxe/{mac}?arch=${{buildarch}}\n"
        )),
        "{first}"
    );
    // What an arm64 iPXE then gets: the reason on its console, and no kernel.
    let told = curl(&format!("{base}/ipxe/{mac}?arch=arm64"));
    assert!(
        told.contains("echo kiln: a002 (52:54:00:aa:bb:63): image x86 is built for x86_64, but the machine's firmware runs arm64 code: not booting it"),
        "{told}"
    );
    assert!(!told.contains("kernel ") && told.contains("sleep 60\nreboot\n"), "{told}");
    let events = events_with(d, &store, "a002", "arch-mismatch");
    let mismatch =
        events.iter().find(|e| e["kind"] == "arch-mismatch").unwrap_or_else(|| panic!("no event: {events:?}"));
    assert!(mismatch["detail"]
        .as_str()
        .unwrap()
        .contains("built for x86_64, but the machine's firmware runs arm64 code"));

    // An x86 iPXE asking the same way boots.
    let booted = curl(&format!("{base}/ipxe/{mac}?arch=x86_64"));
    assert!(booted.contains("\nkernel ") && !booted.contains("buildarch"), "{booted}");
}

/// The appliance (x86_64) carries an arm64 node image and the arm64 firmware file, and refuses an
/// arm64 image as its own OS.
#[test]
fn appliance_carries_arm64_node_images_and_stays_x86_64() {
    if std::env::consts::ARCH != "x86_64" {
        eprintln!("skipped: the appliance ISO is built for x86_64 machines");
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let d = work.path();
    let store = d.join("store");
    fs::write(d.join("snponly-arm64.efi"), b"stands in for kiln's arm64 snponly.efi").unwrap();
    let recipe = |appliance: &str| {
        format!(
            r#"source_date_epoch = 1700000000

[image.appliance]
from = "oci:{tiny}:latest"

[image.arm]
from = "oci-archive:{multi}"
arch = "arm64"

[server]
address = "10.213.9.1/24"
dhcp = "full"

[server.boot_files]
efi_arm64 = "snponly-arm64.efi"

[node.a1]
mac = "52:54:00:09:00:61"
image = "arm"
ipv4 = "10.213.9.61"

[appliance]
image = "{appliance}"
"#,
            tiny = tiny().join("oci").display(),
            multi = multiarch().join("multiarch.oci.tar").display()
        )
    };
    fs::write(d.join("kiln.toml"), recipe("arm")).unwrap();
    let err = kiln_err(d, &store, &["appliance", "--quiet"]);
    assert!(
        err.contains("[appliance] image = \"arm\" is built for aarch64, but the appliance runs this kiln, which is built for x86_64"),
        "{err}"
    );

    fs::write(d.join("kiln.toml"), recipe("appliance")).unwrap();
    let out = kiln_ok(d, &store, &["appliance", "--quiet", "--json"]);
    let iso = PathBuf::from(serde_json::from_str::<Value>(out.trim()).unwrap()["path"].as_str().unwrap());
    let arm = PathBuf::from(kiln_ok(d, &store, &["build", "--name", "arm", "--quiet"]).trim());
    let app = PathBuf::from(kiln_ok(d, &store, &["build", "--name", "appliance", "--quiet"]).trim());
    // The ISO's initrd is the appliance bundle's initramfs and image, then the appliance archive.
    sh(&format!(
        "xorriso -osirrox on -indev '{}' -extract /boot/initrd.img '{}' 2>/dev/null",
        iso.display(),
        d.join("initrd").display()
    ));
    let skip = fs::metadata(app.join("initramfs")).unwrap().len() + fs::metadata(app.join("image")).unwrap().len();
    let listing = sh(&format!("tail -c +{} '{}' | gzip -dc | cpio -t --quiet", skip + 1, d.join("initrd").display()));
    let arm_dir = arm.file_name().unwrap().to_string_lossy().into_owned();
    for want in [
        format!("var/lib/kiln/store/{arm_dir}/kernel"),
        format!("var/lib/kiln/store/{arm_dir}/manifest.json"),
        "var/lib/kiln/roots/image-arm".into(),
        "var/lib/kiln/boot/efi_arm64".into(),
    ] {
        assert!(listing.lines().any(|l| l == want), "{want} not carried:\n{listing}");
    }
    let carried = sh(&format!(
        "tail -c +{} '{}' | gzip -dc | (cd '{}' && cpio -id --quiet 'var/lib/kiln/store/{arm_dir}/manifest.json') && cat '{}/var/lib/kiln/store/{arm_dir}/manifest.json'",
        skip + 1,
        d.join("initrd").display(),
        d.display(),
        d.display()
    ));
    let carried: Value = serde_json::from_str(&carried).unwrap();
    assert_eq!(carried["arch"], "aarch64");
}

// ---------------------------------------------------------------------------------------------
// PXE boots through kiln serve with a real iPXE tree (KILN_IPXE_SRC).

const SUBNET: &str = "10.213.9";

fn ipxe_src() -> Option<PathBuf> {
    match std::env::var_os("KILN_IPXE_SRC").filter(|v| !v.is_empty()) {
        Some(p) => Some(PathBuf::from(p)),
        None => {
            eprintln!(
                "skipped: KILN_IPXE_SRC is not set, so there is no iPXE to build the arm64 and x86_64 snponly.efi \
                 from; point it at an iPXE checkout (git clone https://github.com/ipxe/ipxe) to PXE-boot arm64 and \
                 x86_64 guests from kiln serve"
            );
            None
        }
    }
}

fn fixture_cache() -> PathBuf {
    if let Some(p) = std::env::var_os("KILN_FIXTURE_CACHE").filter(|v| !v.is_empty()) {
        return PathBuf::from(p);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").expect("HOME is set")).join(".cache"));
    base.join("kiln/fixtures")
}

/// kiln's `snponly.efi` for arm64 and x86_64 from `src`, built once into a store in the fixture
/// cache (a cold build takes a few minutes per platform; later runs find it there).
fn snponly(src: &Path) -> (PathBuf, PathBuf) {
    let store = fixture_cache().join("ipxe-store");
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("build-ipxe")
        .arg("--store")
        .arg(&store)
        .arg("--source")
        .arg(src)
        .args(["--target", "bin-arm64-efi/snponly.efi", "--target", "bin-x86_64-efi/snponly.efi", "--json"])
        .env_remove("SOURCE_DATE_EPOCH")
        .output()
        .expect("running kiln build-ipxe");
    assert!(out.status.success(), "kiln build-ipxe failed:\n{}", String::from_utf8_lossy(&out.stderr));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let path = |t: &str| {
        let target = report["targets"].as_array().unwrap().iter().find(|x| x["target"] == t).unwrap();
        PathBuf::from(target["path"].as_str().unwrap())
    };
    (path("bin-arm64-efi/snponly.efi"), path("bin-x86_64-efi/snponly.efi"))
}

fn ip(args: &[&str]) {
    let st = Command::new("ip").args(args).status().expect("running ip");
    assert!(st.success(), "ip {args:?} failed");
}

/// A namespace with `br0` (the server's address) and a tap per guest; removed on drop with
/// every process started in it.
struct Net {
    ns: String,
    children: Vec<Child>,
}

impl Net {
    fn new(taps: usize) -> Net {
        let ns = format!("kiln-arm64-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &ns]).stderr(Stdio::null()).status();
        ip(&["netns", "add", &ns]);
        let net = Net { ns: ns.clone(), children: vec![] };
        ip(&["-n", &ns, "link", "set", "lo", "up"]);
        ip(&["-n", &ns, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &ns, "addr", "add", &format!("{SUBNET}.1/24"), "dev", "br0"]);
        ip(&["-n", &ns, "link", "set", "br0", "up"]);
        for i in 0..taps {
            let tap = format!("tap{i}");
            ip(&["-n", &ns, "tuntap", "add", "dev", &tap, "mode", "tap"]);
            ip(&["-n", &ns, "link", "set", &tap, "master", "br0"]);
            ip(&["-n", &ns, "link", "set", &tap, "up"]);
        }
        net
    }

    fn spawn(&mut self, cmd: &[&str], log: &Path) {
        let out = fs::File::create(log).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", &self.ns])
            .args(cmd)
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .stdin(Stdio::null())
            .spawn()
            .expect("spawning in the namespace");
        self.children.push(child);
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
    }
}

/// A node root filesystem from a tiny fixture's merged rootfs, whose init prints the hostname
/// its overlay gave it.
fn node_rootfs(tiny: &Path, root: &Path) {
    fs::create_dir_all(root).unwrap();
    sh(&format!("tar -xf '{}' -C '{}'", tiny.join("tiny.rootfs.tar").display(), root.display()));
    let init = root.join("sbin/init");
    let _ = fs::remove_file(&init);
    fs::write(
        &init,
        "#!/bin/sh\nmount -t proc proc /proc 2>/dev/null\necho \"KILN-NODE-ARCH=$(uname -m)\"\n\
         echo \"KILN-NODE-HOSTNAME=$(cat /etc/hostname)\"\npoweroff -f\n",
    )
    .unwrap();
    sh(&format!("chmod 755 '{}'", init.display()));
}

/// Boots a guest on `tap` with UEFI firmware whose NIC boots first; returns the console once
/// `marker` shows (panics with it otherwise).
fn pxe_guest(net: &Net, dir: &Path, arm64: bool, tap: &str, mac: &str, marker: &str) -> String {
    let console = dir.join(format!("console-{mac}.log").replace(':', ""));
    let vars = dir.join(format!("vars-{mac}.fd").replace(':', ""));
    let mut qemu: Vec<String> = Vec::new();
    if arm64 {
        fs::copy("/usr/share/AAVMF/AAVMF_VARS.fd", &vars).unwrap();
        qemu.extend(["qemu-system-aarch64", "-M", "virt", "-cpu", "max"].map(String::from));
        qemu.push("-drive".into());
        qemu.push("if=pflash,format=raw,unit=0,readonly=on,file=/usr/share/AAVMF/AAVMF_CODE.fd".into());
    } else {
        fs::copy("/usr/share/OVMF/OVMF_VARS_4M.fd", &vars).unwrap();
        qemu.extend(["qemu-system-x86_64", "-machine", "q35", "-cpu", "max"].map(String::from));
        qemu.push("-drive".into());
        qemu.push("if=pflash,format=raw,unit=0,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd".into());
    }
    qemu.push("-drive".into());
    qemu.push(format!("if=pflash,format=raw,unit=1,file={}", vars.display()));
    qemu.extend(
        ["-accel", "tcg", "-m", "1024", "-nodefaults", "-no-user-config", "-display", "none"].map(String::from),
    );
    qemu.extend(["-no-reboot".into(), "-serial".into(), format!("file:{}", console.display())]);
    qemu.extend(["-netdev".into(), format!("tap,id=n0,ifname={tap},script=no,downscript=no")]);
    // The NIC without an option ROM: the firmware's own PXE loads kiln's iPXE over TFTP.
    qemu.extend(["-device".into(), format!("virtio-net-pci,netdev=n0,mac={mac},romfile=,bootindex=1")]);
    let args: Vec<&str> = qemu.iter().map(String::as_str).collect();
    wait_for_idle_qemu();
    let mut vm = Vm(Command::new("ip")
        .args(["netns", "exec", &net.ns])
        .args(&args)
        .stdout(Stdio::null())
        .stderr(fs::File::create(dir.join(format!("qemu-{mac}.err").replace(':', ""))).unwrap())
        .spawn()
        .expect("starting QEMU"));
    wait_console(&console, marker, &mut vm.0, Duration::from_secs(600))
}

fn kinds(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .map(|e| format!("{} {}", e["kind"].as_str().unwrap_or(""), e["detail"].as_str().unwrap_or("")))
        .collect()
}

#[test]
fn arm64_and_x86_nodes_pxe_boot_from_one_kiln_serve() {
    let Some(src) = ipxe_src() else { return };
    need_qemu_aarch64();
    let (arm64_efi, x64_efi) = snponly(&src);
    let work = tempfile::tempdir().unwrap();
    let d = work.path();
    let store = d.join("store");
    node_rootfs(&tiny_arm64(), &d.join("rootfs-arm64"));
    node_rootfs(&tiny(), &d.join("rootfs-x86"));
    fs::write(
        d.join("kiln.toml"),
        format!(
            r#"[image.arm]
from = "dir:rootfs-arm64"
arch = "arm64"
cmdline = "console=ttyAMA0 panic=-1"
compression = "gzip"

[image.x86]
from = "dir:rootfs-x86"
cmdline = "console=ttyS0 panic=-1"
compression = "gzip"

[server]
address = "{SUBNET}.1/24"
interface = "br0"
dhcp = "full"
pool = "{SUBNET}.100-{SUBNET}.150"

[server.boot_files]
efi_arm64 = "{arm64}"
efi_x64 = "{x64}"

[node.a001]
mac = "52:54:00:aa:bb:61"
image = "arm"
ipv4 = "{SUBNET}.61"

[node.x001]
mac = "52:54:00:aa:bb:62"
image = "x86"
ipv4 = "{SUBNET}.62"

# An arm64 machine whose node entry names the x86_64 image.
[node.a002]
mac = "52:54:00:aa:bb:63"
image = "x86"
ipv4 = "{SUBNET}.63"
"#,
            arm64 = arm64_efi.display(),
            x64 = x64_efi.display()
        ),
    )
    .unwrap();
    kiln_ok(d, &store, &["build", "--quiet"]);

    let mut net = Net::new(3);
    let serve_log = d.join("serve.log");
    let recipe = d.join("kiln.toml");
    net.spawn(
        &[env!("CARGO_BIN_EXE_kiln"), "serve", "-f", recipe.to_str().unwrap(), "--store", store.to_str().unwrap()],
        &serve_log,
    );
    let start = Instant::now();
    while !fs::read_to_string(&serve_log).unwrap_or_default().contains("kiln serve: state") {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "kiln serve did not start:\n{}",
            fs::read_to_string(&serve_log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let arm = pxe_guest(&net, d, true, "tap0", "52:54:00:aa:bb:61", "KILN-NODE-HOSTNAME=a001");
        assert!(arm.contains("KILN-NODE-ARCH=aarch64"), "{arm}");
        let x86 = pxe_guest(&net, d, false, "tap1", "52:54:00:aa:bb:62", "KILN-NODE-HOSTNAME=x001");
        assert!(x86.contains("KILN-NODE-ARCH=x86_64"), "{x86}");
        let told = pxe_guest(&net, d, true, "tap2", "52:54:00:aa:bb:63", "but the machine's firmware runs arm64 code");
        assert!(told.contains("image x86 is built for x86_64"), "{told}");
    }));
    let serve = fs::read_to_string(&serve_log).unwrap_or_default();
    eprintln!("--- kiln serve log:\n{serve}");
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
    drop(net);

    // The boot log: firmware DHCP (arch 11) → TFTP of arm64/snponly.efi → iPXE → script → kernel and initrds.
    let a001 = kinds(&events_with(d, &store, "a001", "overlay"));
    assert!(
        a001.iter().any(|e| e.starts_with("dhcp-ack") && e.ends_with(" arm64/snponly.efi")),
        "the firmware's DHCP got the arm64 iPXE: {a001:#?}"
    );
    for want in ["tftp arm64/snponly.efi", "script a001", "blob arm/kernel", "blob arm/image", "overlay"] {
        assert!(a001.iter().any(|e| e.starts_with(want)), "{want:?} missing from a001's events: {a001:#?}");
    }
    // Both bundles' initramfs are the same bytes, one blob: it is logged under either image's name.
    assert!(a001.iter().any(|e| e.starts_with("blob ") && e.contains("/initramfs ")), "{a001:#?}");
    let x001 = kinds(&events_with(d, &store, "x001", "overlay"));
    for want in ["tftp snponly.efi", "script x001", "blob x86/kernel"] {
        assert!(x001.iter().any(|e| e.starts_with(want)), "{want:?} missing from x001's events: {x001:#?}");
    }
    let a002 = kinds(&events_with(d, &store, "a002", "arch-mismatch"));
    assert!(a002.iter().any(|e| e.starts_with("arch-mismatch image x86 is built for x86_64")), "{a002:#?}");
    assert!(!a002.iter().any(|e| e.starts_with("blob ")), "a002 was given no kernel: {a002:#?}");
}
