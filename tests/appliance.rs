//! `kiln appliance` end to end: a hybrid ISO from the Debian fixture (the appliance OS) and the
//! tiny fixture (a node image), booted in QEMU under SeaBIOS and OVMF until kiln serve says it
//! is serving, and built twice to the same bytes.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, MutexGuard, OnceLock};
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
    // diffoscope (scripts/setup.sh installs diffoscope-minimal) first: if they differ, it says where.
    let other_iso = Path::new(v["path"].as_str().unwrap());
    let start = Instant::now();
    let diff = Command::new("diffoscope")
        .arg(&b.iso)
        .arg(other_iso)
        .output()
        .expect("running diffoscope (install diffoscope-minimal: scripts/setup.sh)");
    eprintln!("diffoscope took {:.1}s", start.elapsed().as_secs_f64());
    let report = format!("{}{}", String::from_utf8_lossy(&diff.stdout), String::from_utf8_lossy(&diff.stderr));
    assert!(diff.status.success() && report.trim().is_empty(), "diffoscope: {}\n{report}", diff.status);
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

/// An appliance image without a kernel (a `dir:` tree holding only /etc/hostname): the error
/// names the image and what to do, and the store is left as it was.
#[test]
fn appliance_image_without_kernel_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    fs::create_dir_all(dir.path().join("root/etc")).unwrap();
    fs::write(dir.path().join("root/etc/hostname"), "x\n").unwrap();
    let text = r#"
[image.appliance]
from = "dir:root"

[server]
address = "10.213.9.1/24"

[appliance]
image = "appliance"
"#;
    fs::write(dir.path().join("kiln.toml"), text).unwrap();
    let before = store_snapshot(&store);
    let err = kiln_err(dir.path(), &store, &["appliance", "--quiet"]);
    assert!(err.contains("[image.appliance]") && err.contains("dir:root"), "{err}");
    assert!(err.contains("has no kernel") && err.contains("install a kernel package"), "{err}");
    assert_eq!(store_snapshot(&store), before, "a failed appliance build changed the store");
}

/// An image name with no [image.NAME] table is reported where the recipe uses it.
#[test]
fn appliance_names_where_a_missing_image_is_used() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let base = "[image.appliance]\nfrom = \"dir:root\"\n\n[server]\naddress = \"10.213.9.1/24\"\n\n";
    for (extra, who) in [
        (
            "[node.n1]\nmac = \"52:54:00:09:00:01\"\nimage = \"nosuch\"\n\n[appliance]\nimage = \"appliance\"\n",
            "[node.n1]",
        ),
        ("[appliance]\nimage = \"appliance\"\nimages = [\"nosuch\"]\n", "[appliance] images"),
        ("[appliance]\nimage = \"nosuch\"\n", "[appliance] image"),
    ] {
        fs::write(dir.path().join("kiln.toml"), format!("{base}{extra}")).unwrap();
        let err = kiln_err(dir.path(), &store, &["appliance", "--quiet"]);
        let want = format!(
            "kiln.toml: {who} names image \"nosuch\", but there is no [image.nosuch]: add one, or use one of the \
             images the recipe defines (appliance)"
        );
        assert!(err.contains(&want), "{err}");
        assert_eq!(store_snapshot(&store), Vec::<String>::new(), "a failed appliance build changed the store");
    }
}

enum Firmware {
    Bios,
    Uefi,
}

enum Media {
    Cdrom,
    /// The ISO as a virtio disk (what `dd` to a disk gives).
    Disk,
    /// The ISO as a USB stick on an xHCI controller.
    Usb,
}

/// The console line of an appliance without a KILN-DATA partition.
const RAM_STATE: &str = concat!(
    "kiln appliance: state in RAM (no partition labelled KILN-DATA): ",
    "discovered nodes, boot events and logs are lost at shutdown"
);

/// Boots the ISO (with `disks` as further virtio disks: path, read-only) until `done` holds for
/// the serial console; returns the console.
fn boot_until(
    iso: &Path,
    firmware: Firmware,
    media: Media,
    disks: &[(&Path, bool)],
    done: &dyn Fn(&str) -> bool,
    timeout: Duration,
) -> String {
    let _guard = one_boot_at_a_time();
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
            cmd.args(cdrom(iso));
        }
        Media::Disk => {
            cmd.arg("-drive").arg(format!("file={},format=raw,if=virtio,readonly=on", iso.display()));
        }
        Media::Usb => {
            cmd.args(["-device", "qemu-xhci,id=xhci"])
                .arg("-drive")
                .arg(format!("if=none,id=stick,file={},format=raw", iso.display()))
                .args(["-device", "usb-storage,bus=xhci.0,drive=stick,removable=on,bootindex=0"]);
        }
    }
    for (disk, read_only) in disks {
        cmd.arg("-drive").arg(format!("file={},format=raw,if=virtio,readonly={}", disk.display(), on(*read_only)));
    }
    let child = cmd.stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("starting qemu-system-x86_64");
    let mut vm = Vm(child);
    let start = Instant::now();
    // A guest that prints nothing for this long has hung (seen once under TCG, early in the kernel).
    let silence = Duration::from_secs(180);
    let (mut seen, mut changed) = (0, Instant::now());
    let text = loop {
        let text = fs::read_to_string(&log).unwrap_or_default();
        if done(&text) {
            break text;
        }
        if text.len() != seen {
            (seen, changed) = (text.len(), Instant::now());
        } else if changed.elapsed() > silence {
            panic!("the console has been silent for {silence:?}: the guest hung; console:\n{text}");
        }
        if let Ok(Some(status)) = vm.0.try_wait() {
            panic!("QEMU exited ({status}) before the console showed what the test waits for; console:\n{text}");
        }
        if start.elapsed() > timeout {
            panic!("the console did not show what the test waits for within {timeout:?}; console:\n{text}");
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    eprintln!("booted in {:.1}s", start.elapsed().as_secs_f64());
    text
}

fn on(flag: bool) -> &'static str {
    if flag {
        "on"
    } else {
        "off"
    }
}

/// QEMU arguments for the ISO as a CD that the firmware boots first (SeaBIOS would try a
/// data disk before a CD).
fn cdrom(iso: &Path) -> [String; 4] {
    [
        "-drive".into(),
        format!("if=none,id=cd,file={},format=raw,media=cdrom,readonly=on", iso.display()),
        "-device".into(),
        "ide-cd,drive=cd,bootindex=0".into(),
    ]
}

/// Boots the ISO until kiln serve says it is serving; returns the console.
fn boot(iso: &Path, firmware: Firmware, media: Media, disks: &[(&Path, bool)]) -> String {
    boot_until(iso, firmware, media, disks, &|text| text.contains(SERVING), Duration::from_secs(600))
}

fn check_console(text: &str) {
    assert!(text.contains("kiln appliance: address 10.213.9.1/24 on "), "{text}");
    let line = text.lines().find(|l| l.contains("kiln appliance: address 10.213.9.1/24 on ")).unwrap_or_default();
    assert!(line.trim_end().ends_with(", DHCP full"), "{text}");
    assert!(text.contains("kiln serve: 1 nodes, images: tiny"), "{text}");
}

/// A 64 MiB raw disk as an admin would prepare a stick: an MBR with one Linux partition from
/// 1 MiB, made with `mkfs.ext4 -L KILN-DATA` (written at that offset, so nothing is mounted).
fn data_disk(path: &Path) {
    const START: u64 = 1 << 20;
    const SIZE: u64 = 64 << 20;
    sh(&format!("truncate -s {SIZE} '{}'", path.display()));
    sh(&format!("mke2fs -q -F -t ext4 -L KILN-DATA -E offset={START} '{}' {}k", path.display(), (SIZE - START) / 1024));
    let mut mbr = vec![0u8; 512];
    mbr[440..444].copy_from_slice(&0x4b494c4e_u32.to_le_bytes());
    let entry = &mut mbr[446..462];
    entry[1..4].copy_from_slice(&[0xfe, 0xff, 0xff]);
    entry[4] = 0x83;
    entry[5..8].copy_from_slice(&[0xfe, 0xff, 0xff]);
    entry[8..12].copy_from_slice(&((START / 512) as u32).to_le_bytes());
    entry[12..16].copy_from_slice(&(((SIZE - START) / 512) as u32).to_le_bytes());
    mbr[510] = 0x55;
    mbr[511] = 0xaa;
    let mut f = fs::OpenOptions::new().write(true).open(path).unwrap();
    std::io::Write::write_all(&mut f, &mbr).unwrap();
}

/// Reads `files` from the KILN-DATA partition of a [`data_disk`] into `dir`, as the kernel would find them after
/// a power cut: a copy of the partition has its journal replayed by e2fsck before debugfs reads it (debugfs
/// alone reads only what was checkpointed to the inodes' home blocks). Returns which files were there.
fn read_data_files(disk: &Path, files: &[&str], dir: &Path) -> Vec<bool> {
    let part = dir.join("data-partition.img");
    sh(&format!(
        "dd if='{}' of='{}' bs=1M skip=1 status=none; e2fsck -fy '{}' >/dev/null 2>&1; [ $? -le 1 ]",
        disk.display(),
        part.display(),
        part.display()
    ));
    let found = files
        .iter()
        .map(|file| {
            let out = dir.join(Path::new(file).file_name().unwrap());
            let _ = fs::remove_file(&out);
            sh(&format!("debugfs -R 'dump {file} {}' '{}' 2>/dev/null", out.display(), part.display()));
            out.is_file()
        })
        .collect();
    fs::remove_file(&part).unwrap();
    found
}

#[test]
fn appliance_boots_bios_cdrom() {
    let text = boot(&built().iso, Firmware::Bios, Media::Cdrom, &[]);
    check_console(&text);
    assert!(text.contains(RAM_STATE), "{text}");
}

#[test]
fn appliance_boots_uefi_cdrom() {
    let text = boot(&built().iso, Firmware::Uefi, Media::Cdrom, &[]);
    check_console(&text);
    assert!(text.contains(RAM_STATE), "{text}");
}

/// The ISO written to a disk, booted by SeaBIOS; a second disk carries a KILN-DATA partition
/// whose ext4 superblock is damaged: the appliance says so and serves with its state in RAM.
#[test]
fn appliance_boots_bios_usb_disk() {
    let work = tempfile::tempdir().unwrap();
    let bad = work.path().join("bad.img");
    data_disk(&bad);
    // An incompatible-feature bit no kernel knows (the superblock checksum no longer matches either).
    let mut bytes = fs::read(&bad).unwrap();
    bytes[(1 << 20) + 1024 + 0x63] |= 0x80;
    fs::write(&bad, bytes).unwrap();
    let text = boot(&built().iso, Firmware::Bios, Media::Disk, &[(&bad, false)]);
    check_console(&text);
    assert!(text.contains("kiln appliance: error: cannot mount /dev/vdb1 (labelled KILN-DATA): "), "{text}");
    assert!(text.contains("mkfs.ext4 -L KILN-DATA /dev/vdb1"), "{text}");
    assert!(
        text.contains(
            "kiln appliance: state in RAM (KILN-DATA on /dev/vdb1 is unusable): discovered nodes, boot events and \
             logs are lost at shutdown"
        ),
        "{text}"
    );
}

/// The KILN-DATA partition holds a damaged state database: kiln serve cannot open it and says
/// why; after two such failures the appliance says so and serves with its state in RAM, leaving
/// the file on the partition as it was.
#[test]
fn appliance_serves_from_ram_when_its_kiln_data_state_is_damaged() {
    let work = tempfile::tempdir().unwrap();
    let disk = work.path().join("data.img");
    data_disk(&disk);
    let garbage = work.path().join("garbage");
    let bytes: Vec<u8> = (0..100_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
    fs::write(&garbage, &bytes).unwrap();
    let target = format!("'{}?offset={}'", disk.display(), 1 << 20);
    sh(&format!("debugfs -w -R 'mkdir state' {target} 2>/dev/null"));
    sh(&format!("debugfs -w -R 'write {} state/state.redb' {target} 2>/dev/null", garbage.display()));
    let text = boot(&built().iso, Firmware::Bios, Media::Cdrom, &[(&disk, false)]);
    check_console(&text);
    assert!(text.contains("kiln appliance: state on KILN-DATA (/dev/vda1, ext4)"), "{text}");
    assert!(text.contains("state/state.redb: ") && text.contains("damaged or not a kiln state database"), "{text}");
    assert!(
        text.contains("kiln appliance: error: kiln serve cannot start with its state on KILN-DATA"),
        "the appliance did not fall back to RAM:\n{text}"
    );
    assert_eq!(read_data_files(&disk, &["/state/state.redb"], work.path()), [true]);
    assert_eq!(fs::read(work.path().join("state.redb")).unwrap(), bytes, "the damaged database was changed");
}

/// The ISO written to a USB stick with a KILN-DATA partition added behind it the way
/// docs/appliance.md says (`sfdisk --append`, `mkfs.ext4 -L KILN-DATA`), on an xHCI controller,
/// booted by OVMF (its NIC has no boot ROM, so reaching kiln serve means OVMF booted the stick).
#[test]
fn appliance_boots_uefi_usb_stick_with_its_data_partition() {
    let work = tempfile::tempdir().unwrap();
    let stick = work.path().join("stick.img");
    fs::copy(&built().iso, &stick).unwrap();
    let iso_size = fs::metadata(&stick).unwrap().len();
    // What `dd if=kiln.iso of=/dev/sdX` gives on a stick larger than the ISO.
    sh(&format!("truncate -s {} '{}'", iso_size + (64 << 20), stick.display()));
    sh(&format!("echo ',,L' | sfdisk --quiet --append '{}'", stick.display()));
    let table: serde_json::Value = serde_json::from_str(&sh(&format!("sfdisk --json '{}'", stick.display()))).unwrap();
    let start = table["partitiontable"]["partitions"][2]["start"].as_u64().unwrap();
    assert!(start * 512 >= iso_size, "the new partition overlaps the ISO");
    sh(&format!("mke2fs -q -F -t ext4 -L KILN-DATA -E offset={} '{}' 32M", start * 512, stick.display()));
    let text = boot(&stick, Firmware::Uefi, Media::Usb, &[]);
    check_console(&text);
    assert!(text.contains("kiln appliance: state on KILN-DATA (/dev/sda3, ext4): kept across reboots"), "{text}");
}

/// `[server] interface` names an interface the machine does not have: the appliance says which
/// ones it has and keeps retrying (no exit, so no reboot loop). In the same boot, a KILN-DATA
/// disk that is write-protected: named, and the state stays in RAM.
#[test]
fn appliance_names_a_missing_interface_and_keeps_trying() {
    let b = built();
    let dir = tempfile::tempdir().unwrap();
    let text = recipe().replace("dhcp = \"full\"\n", "dhcp = \"full\"\ninterface = \"nosuch0\"\n");
    fs::write(dir.path().join("kiln.toml"), text).unwrap();
    let start = Instant::now();
    let out = kiln_ok(dir.path(), &b.store, &["appliance", "--quiet"]);
    eprintln!("second appliance built in {:.1}s", start.elapsed().as_secs_f64());
    let iso = PathBuf::from(out.trim());
    let locked = dir.path().join("locked.img");
    data_disk(&locked);
    let error = "kiln appliance: error: interface nosuch0 (from [server] interface) does not exist; this machine \
                 has: ";
    let text = boot_until(
        &iso,
        Firmware::Bios,
        Media::Cdrom,
        &[(&locked, true)],
        &|text| text.matches(error).count() >= 2,
        Duration::from_secs(600),
    );
    // The last attempt: by then the NIC has had time to report carrier.
    let line = text.lines().rfind(|l| l.contains(error)).unwrap();
    assert!(line.contains(" (link up)") && line.trim_end().ends_with("; retrying in 10 s"), "{text}");
    assert_eq!(text.matches("appliance starting").count(), 1, "the appliance restarted:\n{text}");
    assert!(!text.contains("Kernel panic"), "{text}");
    assert!(!text.contains("kiln serve: "), "{text}");
    assert!(
        text.contains(
            "kiln appliance: error: cannot write to /dev/vda1 (labelled KILN-DATA, ext4): Read-only file system"
        ),
        "{text}"
    );
    assert!(text.contains("kiln appliance: state in RAM (KILN-DATA on /dev/vda1 is unusable)"), "{text}");
}

/// One boot at a time: an appliance VM needs 3 GiB and a core.
fn one_boot_at_a_time() -> MutexGuard<'static, ()> {
    static ONE: Mutex<()> = Mutex::new(());
    ONE.lock().unwrap_or_else(|e| e.into_inner())
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
/// node image carried on the ISO and prints that image's marker. A has a disk with a KILN-DATA
/// partition: after A is switched off, n1's boot events and kiln serve's log are on it, and A
/// booted again starts from them.
#[test]
fn a_diskless_node_pxe_boots_from_the_appliance() {
    let guard = one_boot_at_a_time();
    let iso = &built().iso;
    let work = tempfile::tempdir().unwrap();
    let disk = work.path().join("data.img");
    data_disk(&disk);
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
        .args(cdrom(iso))
        .arg("-drive")
        .arg(format!("file={},format=raw,if=virtio", disk.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting the appliance VM");
    let mut a = Vm(a);
    let console_a = wait_console(&log_a, SERVING, &mut a.0, Duration::from_secs(600));
    assert!(
        console_a.contains("kiln appliance: state on KILN-DATA (/dev/vda1, ext4): kept across reboots"),
        "{console_a}"
    );
    assert!(!console_a.contains("state in RAM"), "{console_a}");

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
    drop(b);

    // Switched off the way appliances are: no shutdown, once the disk (read from outside while A runs) has
    // n1's boot events in the state (synced within a second of the last event) and in the log (written back
    // within seconds: the init shortens the kernel's 30 s).
    let state = work.path().join("state");
    fs::create_dir(&state).unwrap();
    let on_disk = || {
        let found = read_data_files(&disk, &["/state/state.redb", "/log/kiln-serve.log"], &state);
        let events = kiln(
            work.path(),
            &work.path().join("store"),
            &["node", "events", "--state-dir", &state.display().to_string(), "--json"],
        );
        let events: Vec<serde_json::Value> = serde_json::from_slice(&events.stdout).unwrap_or_default();
        let script = events.iter().any(|e| e["mac"] == "52:54:00:09:00:01" && e["kind"] == "script");
        let log = fs::read_to_string(state.join("kiln-serve.log")).unwrap_or_default();
        found.iter().all(|f| *f) && script && log.contains("n1 script")
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    while !on_disk() {
        assert!(Instant::now() < deadline, "n1's boot is not on KILN-DATA after 120 s");
        std::thread::sleep(Duration::from_secs(1));
    }
    drop(a);
    assert!(on_disk(), "n1's boot was on KILN-DATA while A ran and is not after it was switched off");
    let out = kiln_ok(
        work.path(),
        &work.path().join("store"),
        &["node", "events", "--state-dir", &state.display().to_string(), "--json"],
    );
    let events: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    let n1: Vec<&str> =
        events.iter().filter(|e| e["mac"] == "52:54:00:09:00:01").filter_map(|e| e["kind"].as_str()).collect();
    assert!(n1.contains(&"script"), "n1's boot events are not on KILN-DATA: {out}");
    let log = fs::read_to_string(state.join("kiln-serve.log")).unwrap();
    assert!(log.contains("kiln appliance: state on KILN-DATA (/dev/vda1, ext4)"), "{log}");
    assert!(log.contains(SERVING), "{log}");
    assert!(log.contains("n1 script"), "{log}");

    // A boots again from the same disk: kiln serve starts with what the first run recorded.
    drop(guard);
    let again = boot(iso, Firmware::Bios, Media::Cdrom, &[(&disk, false)]);
    assert!(again.contains("kiln appliance: state on KILN-DATA (/dev/vda1, ext4): kept across reboots"), "{again}");
    let line =
        again.lines().find(|l| l.starts_with("kiln serve: state /var/lib/kiln-data/state: ")).unwrap_or_default();
    let events = events.len().to_string();
    assert!(line.starts_with("kiln serve: state /var/lib/kiln-data/state: 1 leases, "), "{again}");
    assert!(line.trim_end().ends_with(&format!(", {events} boot events")), "{again}");
}
