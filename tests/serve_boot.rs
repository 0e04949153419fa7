//! `kiln serve` end to end: a network namespace with a bridge and a tap, kiln serving there, and
//! a QEMU machine on the tap booting from the network with its stock firmware until the node
//! prints the hostname its overlay gave it.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;

const SUBNET: &str = "10.213.7";

/// A namespace with `br0` (the server's address) and `tap0` in it, plus optionally a second
/// namespace joined to the bridge by a veth pair (for another DHCP server). Removed on drop,
/// with every process started in it.
struct Net {
    ns: String,
    other: Option<String>,
    children: Vec<Child>,
}

fn ip(args: &[&str]) {
    let st = Command::new("ip").args(args).status().expect("running ip");
    assert!(st.success(), "ip {args:?} failed");
}

impl Net {
    fn new(tag: &str, with_other: bool) -> Net {
        let ns = format!("kiln-{tag}-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &ns]).stderr(Stdio::null()).status();
        ip(&["netns", "add", &ns]);
        let mut net = Net { ns: ns.clone(), other: None, children: vec![] };
        ip(&["-n", &ns, "link", "set", "lo", "up"]);
        ip(&["-n", &ns, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &ns, "addr", "add", &format!("{SUBNET}.1/24"), "dev", "br0"]);
        ip(&["-n", &ns, "link", "set", "br0", "up"]);
        ip(&["-n", &ns, "tuntap", "add", "dev", "tap0", "mode", "tap"]);
        ip(&["-n", &ns, "link", "set", "tap0", "master", "br0"]);
        ip(&["-n", &ns, "link", "set", "tap0", "up"]);
        if with_other {
            let other = format!("{ns}-o");
            let _ = Command::new("ip").args(["netns", "del", &other]).stderr(Stdio::null()).status();
            ip(&["netns", "add", &other]);
            net.other = Some(other.clone());
            ip(&["-n", &ns, "link", "add", "veth0", "type", "veth", "peer", "name", "veth1", "netns", &other]);
            ip(&["-n", &ns, "link", "set", "veth0", "master", "br0"]);
            ip(&["-n", &ns, "link", "set", "veth0", "up"]);
            ip(&["-n", &other, "addr", "add", &format!("{SUBNET}.2/24"), "dev", "veth1"]);
            ip(&["-n", &other, "link", "set", "veth1", "up"]);
            ip(&["-n", &other, "link", "set", "lo", "up"]);
        }
        net
    }

    fn spawn(&mut self, ns: &str, cmd: &[&str], log: &Path) {
        let out = fs::File::create(log).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", ns])
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
        if let Some(o) = &self.other {
            let _ = Command::new("ip").args(["netns", "del", o]).status();
        }
    }
}

/// A node image: the tiny fixture's merged rootfs with an init that prints the hostname.
fn node_image(work: &Path) -> PathBuf {
    let root = work.join("rootfs");
    fs::create_dir_all(&root).unwrap();
    sh(&format!("tar -xf '{}' -C '{}'", tiny().join("tiny.rootfs.tar").display(), root.display()));
    let init = root.join("sbin/init");
    let _ = fs::remove_file(&init);
    fs::write(
        &init,
        // The hostname line comes last: the test stops reading when it appears.
        "#!/bin/sh\nmount -t proc proc /proc 2>/dev/null\necho \"KILN-NODE-ENV $(cat /etc/kiln/node.env | tr '\\n' ' ')\"\necho \"KILN-NODE-HOSTNAME=$(cat /etc/hostname)\"\npoweroff -f\n",
    )
    .unwrap();
    sh(&format!("chmod 755 '{}'", init.display()));
    root
}

struct Setup {
    _work: tempfile::TempDir,
    dir: PathBuf,
    store: PathBuf,
}

/// The site, built; with `imported`, exported to a closure archive and imported into an empty store in
/// another directory (the source tree removed), which is what then serves.
fn setup(server_extra: &str, imported: bool) -> Setup {
    let work = tempfile::tempdir().unwrap();
    let dir = work.path().to_path_buf();
    let root = node_image(&dir);
    let store = dir.join("store");
    fs::write(
        dir.join("kiln.toml"),
        format!(
            r#"[image.node]
from = "dir:{root}"
cmdline = "console=ttyS0 panic=-1"
compression = "gzip"

[server]
address = "{SUBNET}.1/24"
interface = "br0"
pool = "{SUBNET}.100-{SUBNET}.150"
{server_extra}

[server.boot_files]
bios = "/usr/lib/ipxe/undionly.kpxe"
efi_x64 = "/usr/lib/ipxe/snponly.efi"

[node.n042]
mac = "52:54:00:aa:bb:42"
image = "node"
ipv4 = "{SUBNET}.42"
"#,
            root = root.display()
        ),
    )
    .unwrap();
    kiln_ok(&dir, &store, &["build", "--quiet"]);
    if !imported {
        return Setup { _work: work, dir, store };
    }
    kiln_ok(&dir, &store, &["export", "site.kiln", "--quiet"]);
    fs::remove_dir_all(&root).unwrap();
    let site = dir.join("air-gapped/site");
    let store = dir.join("air-gapped/store");
    fs::create_dir_all(&site).unwrap();
    kiln_ok(&site, &store, &["import", dir.join("site.kiln").to_str().unwrap(), "--quiet"]);
    assert!(kiln_ok(&site, &store, &["store", "verify"]).contains("no problems"));
    Setup { _work: work, dir: site, store }
}

fn boot(tag: &str, server_extra: &str, uefi: bool, other_dhcp: bool) {
    boot_from(tag, server_extra, uefi, other_dhcp, false)
}

fn boot_from(tag: &str, server_extra: &str, uefi: bool, other_dhcp: bool, imported: bool) {
    if !have("qemu-system-x86_64") || !Path::new("/usr/lib/ipxe/undionly.kpxe").exists() {
        panic!("qemu-system-x86 and ipxe are needed: run scripts/setup.sh");
    }
    let s = setup(server_extra, imported);
    let mut net = Net::new(tag, other_dhcp);
    let serve_log = s.dir.join("serve.log");
    if let Some(other) = net.other.clone() {
        // The site's own DHCP server: addresses only, no boot information.
        let leases = s.dir.join("dnsmasq.leases");
        net.spawn(
            &other,
            &[
                "dnsmasq",
                "--no-daemon",
                "--conf-file=/dev/null",
                "--port=0",
                "--interface=veth1",
                "--bind-interfaces",
                &format!("--dhcp-range={SUBNET}.160,{SUBNET}.199,1h"),
                &format!("--dhcp-leasefile={}", leases.display()),
                "--log-dhcp",
            ],
            &s.dir.join("dnsmasq.log"),
        );
    }
    let kiln = env!("CARGO_BIN_EXE_kiln");
    let recipe = s.dir.join("kiln.toml");
    let store = s.store.display().to_string();
    net.spawn(&net.ns.clone(), &[kiln, "serve", "-f", recipe.to_str().unwrap(), "--store", &store], &serve_log);
    std::thread::sleep(Duration::from_millis(500));

    let console = s.dir.join("console.log");
    let mut qemu: Vec<String> =
        ["qemu-system-x86_64", "-accel", "tcg", "-cpu", "max", "-m", "1024"].into_iter().map(String::from).collect();
    qemu.extend(["-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"].map(String::from));
    qemu.extend(["-serial".into(), format!("file:{}", console.display())]);
    qemu.extend(["-netdev", "tap,id=n0,ifname=tap0,script=no,downscript=no"].map(String::from));
    if uefi {
        let vars = s.dir.join("OVMF_VARS.fd");
        fs::copy("/usr/share/OVMF/OVMF_VARS_4M.fd", &vars).unwrap();
        qemu.extend(["-machine", "q35", "-drive"].map(String::from));
        qemu.push("if=pflash,format=raw,unit=0,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd".into());
        qemu.push("-drive".into());
        qemu.push(format!("if=pflash,format=raw,unit=1,file={}", vars.display()));
        qemu.extend(
            ["-device", "virtio-net-pci,netdev=n0,mac=52:54:00:aa:bb:42,romfile=,bootindex=1"].map(String::from),
        );
    } else {
        let sercon = s.dir.join("sercon");
        fs::write(&sercon, [0xf8u8, 0x03]).unwrap();
        qemu.extend(
            ["-machine", "pc", "-device", "virtio-net-pci,netdev=n0,mac=52:54:00:aa:bb:42,bootindex=1"]
                .map(String::from),
        );
        qemu.extend(["-fw_cfg".into(), format!("name=etc/sercon-port,file={}", sercon.display())]);
    }
    let args: Vec<&str> = qemu.iter().map(String::as_str).collect();
    let mut vm = Command::new("ip")
        .args(["netns", "exec", &net.ns])
        .args(&args)
        .stdout(Stdio::null())
        .stderr(fs::File::create(s.dir.join("qemu.err")).unwrap())
        .spawn()
        .expect("starting QEMU");
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        wait_console(&console, "KILN-NODE-HOSTNAME=n042", &mut vm, Duration::from_secs(420))
    }));
    let _ = vm.kill();
    let _ = vm.wait();
    let serve = fs::read_to_string(&serve_log).unwrap_or_default();
    eprintln!("--- kiln serve log:\n{serve}");
    if let Ok(d) = fs::read_to_string(s.dir.join("dnsmasq.log")) {
        eprintln!("--- dnsmasq log:\n{d}");
    }
    let console = result.unwrap_or_else(|e| std::panic::resume_unwind(e));
    assert!(console.contains(&format!("KILN_IPV4='{SUBNET}.42'")), "overlay env missing:\n{console}");
    assert!(serve.contains("n042 script"), "kiln did not log the boot:\n{serve}");
    assert!(serve.contains("n042 overlay"));
    // The kernel and initrds iPXE fetched are in n042's boot log too (they name no MAC: attributed by address).
    for file in ["kernel", "initramfs", "image"] {
        assert!(serve.contains(&format!("n042 blob node/{file} ")), "no {file} download logged for n042:\n{serve}");
    }
}

#[test]
fn seabios_nic_rom_boots_a_node_from_kiln_serve() {
    boot("bios", "dhcp = \"full\"", false, false);
}

/// An air-gapped site: the closure exported, imported into an empty store elsewhere, served from there.
#[test]
fn seabios_boots_a_node_from_an_imported_closure() {
    boot_from("imp", "dhcp = \"full\"", false, false, true);
}

#[test]
fn ovmf_native_pxe_loads_ipxe_over_tftp_and_boots() {
    boot("uefi", "dhcp = \"full\"", true, false);
}

#[test]
fn proxy_dhcp_beside_the_sites_dhcp_server() {
    if !have("dnsmasq") {
        panic!("dnsmasq is needed: run scripts/setup.sh");
    }
    boot("proxy", "dhcp = \"proxy\"", false, true);
}
