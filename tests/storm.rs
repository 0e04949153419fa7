//! A small boot storm in the suite: 50 simulated PXE clients (examples/storm.rs) boot at once against the real
//! `kiln serve` in a network namespace (DHCP as a BIOS PXE ROM, TFTP of undionly.kpxe, DHCP as iPXE, HTTP of the
//! script, kernel and initrds, every size and sha256 checked) and every one of them must boot, within about a minute.
//!
//! The clients run in a second namespace where the server's pool range is local (`ip route add local`), so each
//! uses the address it was leased. The generator is built here with `cargo build --example storm` (the debug build
//! `cargo test` has already compiled, so this costs a second; 50 clients need no release build). Needs root and
//! network namespaces; without them the test prints "skipped: …" and passes.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const CLIENTS: usize = 50;
const SERVER_IP: &str = "10.6.0.1";
const CLIENT_IP: &str = "10.6.255.254";
const POOL_NET: &str = "10.6.64.0/18";
const BIOS_FILE: &str = "/usr/lib/ipxe/undionly.kpxe";
/// The storm's own deadline; the test waits a little longer for its report.
const DEADLINE_SECS: u64 = 60;

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip").args(args).output().map_err(|e| format!("running ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("ip {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

/// Two namespaces joined by a veth pair (server: veth-s, clients: veth-c with the pool range local) and the
/// processes started in them; all removed on drop.
struct Lab {
    server: String,
    clients: String,
    children: Vec<Child>,
}

impl Lab {
    fn new() -> Result<Lab, String> {
        let tag = std::process::id();
        let lab =
            Lab { server: format!("kiln-storm-{tag}-s"), clients: format!("kiln-storm-{tag}-c"), children: vec![] };
        let (s, c) = (lab.server.as_str(), lab.clients.as_str());
        for ns in [s, c] {
            let _ = ip(&["netns", "del", ns]);
            ip(&["netns", "add", ns])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        ip(&["-n", s, "link", "add", "veth-s", "type", "veth", "peer", "name", "veth-c", "netns", c])?;
        ip(&["-n", s, "addr", "add", &format!("{SERVER_IP}/16"), "dev", "veth-s"])?;
        ip(&["-n", c, "addr", "add", &format!("{CLIENT_IP}/16"), "dev", "veth-c"])?;
        ip(&["-n", s, "link", "set", "veth-s", "up"])?;
        ip(&["-n", c, "link", "set", "veth-c", "up"])?;
        ip(&["-n", c, "route", "add", "local", POOL_NET, "dev", "veth-c"])?;
        // The server reaches the clients through one neighbour, not one ARP entry each.
        ip(&["-n", s, "route", "add", POOL_NET, "via", CLIENT_IP, "dev", "veth-s"])?;
        Ok(lab)
    }

    fn spawn(&mut self, ns: &str, cmd: &[&str], log: &Path) -> u32 {
        let out = fs::File::create(log).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", ns])
            .args(cmd)
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .stdin(Stdio::null())
            .spawn()
            .expect("starting a process in the namespace");
        let pid = child.id();
        self.children.push(child);
        pid
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = ip(&["netns", "del", &self.server]);
        let _ = ip(&["netns", "del", &self.clients]);
    }
}

fn skip_reason() -> Option<String> {
    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
    let uid = status.lines().find_map(|l| l.strip_prefix("Uid:")).and_then(|l| l.split_whitespace().nth(1));
    if uid != Some("0") {
        return Some("needs root (network namespaces)".into());
    }
    let probe = format!("kiln-storm-probe-{}", std::process::id());
    if let Err(e) = ip(&["netns", "add", &probe]) {
        return Some(format!("no network namespaces here: {e}"));
    }
    let _ = ip(&["netns", "del", &probe]);
    None
}

/// Builds examples/storm.rs and returns its path (from cargo's own report, wherever the target dir is).
fn build_storm() -> PathBuf {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args(["build", "--profile", "test", "--example", "storm", "--message-format=json-render-diagnostics"])
        .current_dir(repo())
        .stderr(Stdio::inherit())
        .output()
        .expect("running cargo build --example storm");
    assert!(out.status.success(), "cargo build --example storm failed");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|m| m["target"]["name"] == "storm")
        .find_map(|m| m["executable"].as_str().map(PathBuf::from))
        .expect("cargo named no executable for the storm example")
}

/// A bundle small enough for a quick storm: a stand-in kernel ("HdrS" at 0x202) and a little data, uncompressed.
fn recipe(work: &Path) -> PathBuf {
    let root = work.join("rootfs");
    fs::create_dir_all(root.join("boot")).unwrap();
    fs::create_dir_all(root.join("data")).unwrap();
    let mut kernel = vec![0u8; 64 * 1024];
    kernel[0x202..0x206].copy_from_slice(b"HdrS");
    fs::write(root.join("boot/vmlinuz-1.0"), kernel).unwrap();
    let data: Vec<u8> = (0..256 * 1024u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
    fs::write(root.join("data/blob.bin"), data).unwrap();
    let recipe = work.join("kiln.toml");
    fs::write(
        &recipe,
        format!(
            r#"source_date_epoch = 1700000000

[image.storm]
from = "dir:{root}"
kernel = "auto"
compression = "none"

[server]
interface = "veth-s"
address = "{SERVER_IP}/16"
dhcp = "full"
pool = "10.6.64.1-10.6.127.254"
unknown = "boot:storm"

[server.boot_files]
bios = "{BIOS_FILE}"
"#,
            root = root.display()
        ),
    )
    .unwrap();
    recipe
}

/// Waits (bounded) until kiln answers DHCP, TFTP and HTTP in the server's namespace.
fn wait_ready(lab: &mut Lab, log: &Path) {
    let ns = lab.server.clone();
    let start = Instant::now();
    loop {
        let listening = |port: &str| {
            Command::new("ip")
                .args(["netns", "exec", &ns, "ss", "-Hlun", &format!("sport = :{port}")])
                .output()
                .map(|o| !o.stdout.is_empty())
                .unwrap_or(false)
        };
        let http = Command::new("ip")
            .args(["netns", "exec", &ns, "curl", "-sf", "-o", "/dev/null", &format!("http://{SERVER_IP}/healthz")])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if listening("67") && listening("69") && http {
            return;
        }
        if let Some(status) = lab.children.iter_mut().find_map(|c| c.try_wait().ok().flatten()) {
            panic!("kiln serve exited ({status}):\n{}", fs::read_to_string(log).unwrap_or_default());
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "kiln serve did not start within 20 s:\n{}",
            fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn fifty_pxe_clients_boot_at_once_from_kiln_serve() {
    if let Some(why) = skip_reason() {
        eprintln!("skipped: {why}");
        return;
    }
    assert!(Path::new(BIOS_FILE).exists(), "{BIOS_FILE} is missing: run scripts/setup.sh (Debian package ipxe)");
    let storm = build_storm();
    let work = tempfile::tempdir().unwrap();
    let dir = work.path();
    let store = dir.join("store");
    let recipe = recipe(dir);
    kiln_ok(dir, &store, &["build", "--quiet", "-f", recipe.to_str().unwrap()]);

    let mut lab = Lab::new().unwrap_or_else(|e| panic!("setting up the namespaces: {e}"));
    let serve_log = dir.join("serve.log");
    let state = dir.join("state");
    let server = lab.server.clone();
    let kiln_pid = lab.spawn(
        &server,
        &[
            env!("CARGO_BIN_EXE_kiln"),
            "serve",
            "-f",
            recipe.to_str().unwrap(),
            "--store",
            store.to_str().unwrap(),
            "--state-dir",
            state.to_str().unwrap(),
        ],
        &serve_log,
    );
    wait_ready(&mut lab, &serve_log);

    let report = dir.join("storm.json");
    let storm_log = dir.join("storm.log");
    let clients = lab.clients.clone();
    let started = Instant::now();
    let mut child = Command::new("ip")
        .args(["netns", "exec", &clients])
        .arg(&storm)
        .args(["--interface", "veth-c", "--server", SERVER_IP, "--clients", &CLIENTS.to_string(), "--ramp", "2"])
        .args(["--deadline", &DEADLINE_SECS.to_string(), "--label", "kiln", "--server-pid", &kiln_pid.to_string()])
        .arg("--json")
        .arg(&report)
        .stdout(fs::File::create(&storm_log).unwrap())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("starting the storm generator");
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting for the generator") {
            break status;
        }
        if started.elapsed() > Duration::from_secs(DEADLINE_SECS + 30) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the generator outlived its own deadline of {DEADLINE_SECS}s");
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let text = fs::read_to_string(&storm_log).unwrap_or_default();
    eprintln!("{text}");
    if !status.success() {
        let serve = fs::read_to_string(&serve_log).unwrap_or_default();
        let tail: Vec<&str> = serve.lines().rev().take(40).collect();
        eprintln!("--- kiln serve log (last 40 lines):\n{}", tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
    }
    let r: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(&report).expect("the generator wrote its report")).unwrap();
    assert_eq!(r["booted"], CLIENTS, "not every client booted:\n{text}");
    for phase in ["dhcp", "tftp", "ipxe-dhcp", "script", "kernel/initrds"] {
        assert_eq!(r["failed"][phase], 0, "failures in {phase}:\n{text}");
    }
    // kernel, initramfs and image for each client, all named by digest and all checked.
    assert_eq!(r["blob_downloads"], 3 * CLIENTS);
    assert_eq!(r["digests_checked"], 3 * CLIENTS);
    assert_eq!(r["tftp_without_tsize"], 0);
    assert!(r["server_cpu_secs"].as_f64().is_some_and(|s| s > 0.0), "no server CPU measured:\n{text}");
    assert!(status.success(), "the generator failed ({status}):\n{text}");
    eprintln!("storm of {CLIENTS} clients: {:.1}s", started.elapsed().as_secs_f64());
}
