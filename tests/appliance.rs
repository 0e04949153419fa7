//! `kiln appliance` end to end: a hybrid ISO from the Debian fixture (the appliance OS) and the
//! tiny fixture (a node image), booted in QEMU under SeaBIOS and OVMF until kiln serve says it
//! is serving, and built twice to the same bytes.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use common::*;

const SERVING: &str = "kiln serve: 10.213.9.1/24 on ";

struct Built {
    _dir: tempfile::TempDir,
    dir: PathBuf,
    store: PathBuf,
    iso: PathBuf,
    sha256: String,
}

fn recipe() -> String {
    format!(
        r#"source_date_epoch = 1700000000

[image.appliance]
from = "oci:{}:latest"
cmdline = "console=tty0 console=ttyS0,115200"

[image.tiny]
from = "oci:{}:latest"

[server]
address = "10.213.9.1/24"
dhcp = "full"

[node.n1]
mac = "52:54:00:09:00:01"
image = "tiny"
ipv4 = "10.213.9.11"

[appliance]
image = "appliance"
"#,
        debian().join("oci").display(),
        tiny().join("oci").display()
    )
}

fn built() -> &'static Built {
    static BUILT: OnceLock<Built> = OnceLock::new();
    BUILT.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_path_buf();
        let store = path.join("store");
        fs::write(path.join("kiln.toml"), recipe()).unwrap();
        let start = Instant::now();
        let out = kiln_ok(&path, &store, &["appliance", "--quiet", "--json", "--out", "kiln.iso"]);
        eprintln!("appliance built in {:.1}s", start.elapsed().as_secs_f64());
        let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        let iso = PathBuf::from(v["path"].as_str().unwrap());
        let sha256 = v["sha256"].as_str().unwrap().to_string();
        assert_eq!(sha256, sha256_hex(&iso));
        assert_eq!(v["size"].as_u64().unwrap(), fs::metadata(&iso).unwrap().len());
        assert_eq!(sha256_hex(&path.join("kiln.iso")), sha256);
        Built { dir: path.clone(), store, iso, sha256, _dir: dir }
    })
}

#[test]
fn appliance_iso_is_reproducible() {
    let b = built();
    // A second store and directory, built later: the bundles and the ISO are made again.
    let other = tempfile::tempdir().unwrap();
    let store = other.path().join("store");
    fs::write(other.path().join("kiln.toml"), recipe()).unwrap();
    let out = kiln_ok(other.path(), &store, &["appliance", "--quiet", "--json"]);
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["sha256"].as_str().unwrap(), b.sha256, "two builds of the same inputs differ");
    // The ISO is hybrid: an MBR boot signature and a GPT header at LBA 1.
    let head = fs::read(&b.iso).unwrap();
    assert_eq!(&head[510..512], &[0x55, 0xaa]);
    assert_eq!(&head[512..520], b"EFI PART");
    let _ = (&b.dir, &b.store);
}

#[test]
fn appliance_refuses_a_recipe_without_appliance_table() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("kiln.toml"), "[image.a]\nfrom = \"oci:x:latest\"\n").unwrap();
    let err = kiln_err(dir.path(), &dir.path().join("store"), &["appliance"]);
    assert!(err.contains("has no [appliance] table"), "{err}");
    fs::write(dir.path().join("kiln.toml"), "[appliance]\nimage = \"a\"\nimagez = []\n").unwrap();
    let err = kiln_err(dir.path(), &dir.path().join("store"), &["appliance"]);
    assert!(err.contains("imagez"), "{err}");
}

enum Firmware {
    Bios,
    Uefi,
}

enum Media {
    Cdrom,
    Disk,
}

/// Boots the ISO and waits for kiln serve's line on the serial console; returns the console.
fn boot(iso: &Path, firmware: Firmware, media: Media, timeout: Duration) -> String {
    // One VM at a time: each needs 3 GiB and a core.
    static ONE: Mutex<()> = Mutex::new(());
    let _guard = ONE.lock().unwrap_or_else(|e| e.into_inner());
    let work = tempfile::tempdir().unwrap();
    let log = work.path().join("console.log");
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-accel", "tcg", "-cpu", "max", "-m", "3072", "-smp", "2"])
        .args(["-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"])
        .arg("-serial")
        .arg(format!("file:{}", log.display()))
        .args(["-netdev", "user,id=n0,restrict=on", "-device", "virtio-net-pci,netdev=n0,romfile="]);
    match firmware {
        Firmware::Bios => {
            cmd.args(["-machine", "pc"]);
        }
        Firmware::Uefi => {
            let vars = work.path().join("OVMF_VARS.fd");
            fs::copy("/usr/share/OVMF/OVMF_VARS_4M.fd", &vars).unwrap();
            cmd.args(["-machine", "q35"])
                .args(["-drive", "if=pflash,format=raw,unit=0,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd"])
                .arg("-drive")
                .arg(format!("if=pflash,format=raw,unit=1,file={}", vars.display()));
        }
    }
    match media {
        Media::Cdrom => {
            cmd.arg("-drive").arg(format!("file={},format=raw,media=cdrom,readonly=on", iso.display()));
        }
        Media::Disk => {
            cmd.arg("-drive").arg(format!("file={},format=raw,if=virtio,readonly=on", iso.display()));
        }
    }
    let mut child = cmd.stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("starting qemu-system-x86_64");
    let start = Instant::now();
    let text = loop {
        let text = fs::read_to_string(&log).unwrap_or_default();
        if text.contains(SERVING) {
            break text;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("QEMU exited ({status}) before kiln serve started; console:\n{text}");
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            panic!("kiln serve did not start within {timeout:?}; console:\n{text}");
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    eprintln!("booted to serving in {:.1}s", start.elapsed().as_secs_f64());
    let _ = child.kill();
    let _ = child.wait();
    text
}

fn check_console(text: &str) {
    assert!(text.contains("kiln appliance: address 10.213.9.1/24 on "), "{text}");
    let line = text.lines().find(|l| l.contains("kiln appliance: address 10.213.9.1/24 on ")).unwrap_or_default();
    assert!(line.trim_end().ends_with(", DHCP full"), "{text}");
    assert!(text.contains("kiln serve: 1 nodes, images: tiny"), "{text}");
}

#[test]
fn appliance_boots_bios_cdrom() {
    let text = boot(&built().iso, Firmware::Bios, Media::Cdrom, Duration::from_secs(600));
    check_console(&text);
}

#[test]
fn appliance_boots_uefi_cdrom() {
    let text = boot(&built().iso, Firmware::Uefi, Media::Cdrom, Duration::from_secs(600));
    check_console(&text);
}

#[test]
fn appliance_boots_bios_usb_disk() {
    let text = boot(&built().iso, Firmware::Bios, Media::Disk, Duration::from_secs(600));
    check_console(&text);
}

/// Kills a QEMU process when dropped, so a failed assertion leaves nothing running.
struct Vm(std::process::Child);

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The real job: VM A boots the appliance ISO; VM B, diskless and joined to A only by a private
/// QEMU link on loopback, PXE-boots from A (its NIC ROM's iPXE → A's DHCP → A's HTTP) into the
/// node image carried on the ISO and prints that image's marker.
#[test]
fn a_diskless_node_pxe_boots_from_the_appliance() {
    static ONE: Mutex<()> = Mutex::new(());
    let _guard = ONE.lock().unwrap_or_else(|e| e.into_inner());
    let iso = &built().iso;
    let work = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let log_a = work.path().join("appliance.log");
    let a = Command::new("qemu-system-x86_64")
        .args(["-accel", "tcg", "-cpu", "max", "-m", "3072", "-smp", "2", "-machine", "pc"])
        .args(["-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"])
        .arg("-serial")
        .arg(format!("file:{}", log_a.display()))
        .arg("-netdev")
        .arg(format!("socket,id=n0,listen=127.0.0.1:{port}"))
        .args(["-device", "virtio-net-pci,netdev=n0,romfile="])
        .arg("-drive")
        .arg(format!("file={},format=raw,media=cdrom,readonly=on", iso.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting the appliance VM");
    let mut a = Vm(a);
    wait_console(&log_a, SERVING, &mut a.0, Duration::from_secs(600));

    let log_b = work.path().join("node.log");
    let b = Command::new("qemu-system-x86_64")
        .args(["-accel", "tcg", "-cpu", "max", "-m", "1024", "-machine", "pc"])
        .args(["-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"])
        .arg("-serial")
        .arg(format!("file:{}", log_b.display()))
        .arg("-netdev")
        .arg(format!("socket,id=n0,connect=127.0.0.1:{port}"))
        .args(["-device", "virtio-net-pci,netdev=n0,mac=52:54:00:09:00:01,bootindex=1"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting the node VM");
    let mut b = Vm(b);
    wait_console(&log_b, "KILN-TINY-BOOTED", &mut b.0, Duration::from_secs(600));
    let console_a = fs::read_to_string(&log_a).unwrap_or_default();
    assert!(console_a.contains("n1 script"), "the appliance did not log the node's boot:\n{console_a}");
}
