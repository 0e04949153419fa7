//! kiln's DHCP server against a real client: busybox udhcpc in one network namespace, the server in another,
//! joined by a veth pair. Nothing touches the host's interfaces.
//!
//! The server runs in a child process: this test binary itself, started through `ip netns exec` with
//! `KILN_DHCP_TEST_SERVER=<state dir>`, which makes `dhcp_server_helper` serve instead of returning.
//! Needs root, `ip` (iproute2) and busybox with udhcpc (busybox-static); without them the test prints
//! "skipped: …" and passes.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io::Write;
use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln::net::Mac;
use kiln::recipe::{DhcpMode, UnknownPolicy};
use kiln::serve::dhcp::{self, DhcpContext, Reservation};
use kiln::serve::firmware::BootFiles;
use kiln::serve::state::State;

const SERVER_ENV: &str = "KILN_DHCP_TEST_SERVER";
const SERVER_IF: &str = "veth-s";
const CLIENT_IF: &str = "veth-c";
const NODE_MAC: &str = "52:54:00:d4:c0:01";
const STRANGER_MAC: &str = "52:54:00:d4:c0:99";
const STRANGER_2_MAC: &str = "52:54:00:d4:c0:98";
const STRANGER_3_MAC: &str = "52:54:00:d4:c0:97";

/// The server's configuration (the child builds it; the parent asserts against it).
fn context() -> DhcpContext {
    let mut ctx = DhcpContext::new(DhcpMode::Full, "10.213.0.1/24".parse().unwrap());
    ctx.router = Some(Ipv4Addr::new(10, 213, 0, 1));
    ctx.dns = vec![Ipv4Addr::new(10, 213, 0, 1)];
    ctx.domain = Some("test.kiln".into());
    ctx.lease_secs = 600;
    let node: Mac = NODE_MAC.parse().unwrap();
    ctx.reservations.insert(node, Reservation { ip: Ipv4Addr::new(10, 213, 0, 11), hostname: Some("n001".into()) });
    ctx.known.insert(node);
    ctx.pool = Some("10.213.0.100-10.213.0.110".parse().unwrap());
    ctx.boot_files = BootFiles::from_paths(
        Some("/srv/undionly.kpxe".into()),
        Some("/srv/snponly.efi".into()),
        Some("/srv/arm64/snponly.efi".into()),
    );
    ctx.unknown = UnknownPolicy::Record;
    ctx
}

/// Not a test on its own: the server side, when started by `Lab::start_server`.
#[test]
fn dhcp_server_helper() {
    let Ok(state_dir) = std::env::var(SERVER_ENV) else { return };
    let _ = tracing_subscriber::fmt()
        .with_env_filter("kiln=debug")
        .with_ansi(false)
        .with_writer(std::io::stderr)
        .try_init();
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    runtime.block_on(async {
        let state = Arc::new(State::open(Path::new(&state_dir)).unwrap());
        let (_tx, rx) = tokio::sync::watch::channel(Arc::new(context()));
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).unwrap();
        let shutdown = async move {
            term.recv().await;
        };
        dhcp::serve(rx, state, Some(SERVER_IF.into()), 67, Some(4011), None, shutdown).await.unwrap();
    });
}

/// Why this machine cannot run the test, if it cannot.
fn missing_prerequisite() -> Option<String> {
    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
    let uid = status.lines().find_map(|l| l.strip_prefix("Uid:")).and_then(|l| l.split_whitespace().nth(1));
    if uid != Some("0") {
        return Some("needs root (network namespaces)".into());
    }
    for (tool, args) in [("ip", &["-V"][..]), ("busybox", &["udhcpc", "--help"][..]), ("ss", &["-V"][..])] {
        let ok = Command::new(tool).args(args).stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok();
        if !ok {
            return Some(format!("`{tool}` not found (install iproute2 and busybox-static: scripts/setup.sh)"));
        }
    }
    None
}

/// Runs a command to completion; panics with its output if it fails.
fn run(program: &str, args: &[&str]) {
    let out = Command::new(program).args(args).output().unwrap_or_else(|e| panic!("running {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {} failed: {}\n{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Two namespaces, a veth pair, the server process; all removed on drop, even when the test fails.
struct Lab {
    server_ns: String,
    client_ns: String,
    dir: tempfile::TempDir,
    server: Option<Child>,
    server_runs: usize,
}

impl Lab {
    fn new() -> Lab {
        let pid = std::process::id();
        let lab = Lab {
            server_ns: format!("kiln-dhcp-{pid}-s"),
            client_ns: format!("kiln-dhcp-{pid}-c"),
            dir: tempfile::tempdir().unwrap(),
            server: None,
            server_runs: 0,
        };
        let (s, c) = (lab.server_ns.as_str(), lab.client_ns.as_str());
        run("ip", &["netns", "add", s]);
        run("ip", &["netns", "add", c]);
        run("ip", &["-n", s, "link", "add", SERVER_IF, "type", "veth", "peer", "name", CLIENT_IF, "netns", c]);
        run("ip", &["-n", s, "addr", "add", "10.213.0.1/24", "dev", SERVER_IF]);
        for (ns, dev) in [(s, SERVER_IF), (s, "lo"), (c, CLIENT_IF), (c, "lo")] {
            run("ip", &["-n", ns, "link", "set", dev, "up"]);
        }
        let script = lab.dir.path().join("udhcpc.script");
        fs::write(&script, "#!/bin/sh\n[ \"$1\" = bound ] && env > \"$KILN_UDHCPC_OUT\"\nexit 0\n").unwrap();
        fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).unwrap();
        lab
    }

    fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    fn server_log(&self, run: usize) -> PathBuf {
        self.dir.path().join(format!("server-{run}.log"))
    }

    /// Starts the server in its namespace and waits until it listens on port 67.
    fn start_server(&mut self) {
        self.server_runs += 1;
        let log = fs::File::create(self.server_log(self.server_runs)).unwrap();
        let exe = std::env::current_exe().unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", &self.server_ns])
            .arg(exe)
            .args(["--exact", "dhcp_server_helper", "--nocapture", "--test-threads=1"])
            .env(SERVER_ENV, self.state_dir())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.server = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let out = Command::new("ip")
                .args(["netns", "exec", &self.server_ns, "ss", "-Hlun", "sport", "=", ":67"])
                .output()
                .unwrap();
            if !String::from_utf8_lossy(&out.stdout).trim().is_empty() {
                return;
            }
            if let Some(status) = self.server.as_mut().unwrap().try_wait().unwrap() {
                panic!("the DHCP server exited early ({status})");
            }
            assert!(Instant::now() < deadline, "the DHCP server did not listen on port 67 within 20 s");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the server with SIGTERM (it closes its database cleanly), SIGKILL after 10 s.
    fn stop_server(&mut self) {
        let Some(mut child) = self.server.take() else { return };
        let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if child.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("the DHCP server did not stop on SIGTERM within 10 s");
    }

    /// Runs udhcpc once as `mac` with extra arguments; the variables its script saw on `bound`, or `None`.
    fn udhcpc(&self, mac: &str, extra: &[&str]) -> Option<HashMap<String, String>> {
        let c = self.client_ns.as_str();
        run("ip", &["-n", c, "link", "set", CLIENT_IF, "down"]);
        run("ip", &["-n", c, "link", "set", CLIENT_IF, "address", mac]);
        run("ip", &["-n", c, "link", "set", CLIENT_IF, "up"]);
        let out = self.dir.path().join("bound.env");
        let _ = fs::remove_file(&out);
        let script = self.dir.path().join("udhcpc.script");
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", c, "busybox", "udhcpc", "-i", CLIENT_IF, "-f", "-q", "-n", "-t", "3", "-T", "1"])
            .arg("-s")
            .arg(&script)
            .args(extra)
            .env("KILN_UDHCPC_OUT", &out)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        let deadline = Instant::now() + Duration::from_secs(15);
        while child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let output = child.wait_with_output().unwrap();
        eprintln!("udhcpc {mac} {}: {}\n{}", extra.join(" "), output.status, String::from_utf8_lossy(&output.stderr));
        let env = fs::read_to_string(&out).ok()?;
        Some(env.lines().filter_map(|l| l.split_once('=')).map(|(k, v)| (k.to_owned(), v.to_owned())).collect())
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Some(mut child) = self.server.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        for ns in [&self.server_ns, &self.client_ns] {
            let _ = Command::new("ip").args(["netns", "del", ns]).stderr(Stdio::null()).status();
        }
        if std::thread::panicking() {
            for run in 1..=self.server_runs {
                let log = fs::read_to_string(self.server_log(run)).unwrap_or_default();
                let _ = writeln!(std::io::stderr(), "--- server log, run {run} ---\n{log}");
            }
        }
    }
}

fn var<'a>(env: &'a HashMap<String, String>, key: &str) -> Option<&'a str> {
    env.get(key).map(String::as_str)
}

#[test]
fn udhcpc_gets_leases_and_boot_files_and_keeps_them_across_a_restart() {
    if std::env::var_os(SERVER_ENV).is_some() {
        return;
    }
    if let Some(why) = missing_prerequisite() {
        eprintln!("skipped: {why}");
        return;
    }
    let started = Instant::now();
    let mut lab = Lab::new();
    lab.start_server();

    // A node: its reservation, hostname and the network options; no boot file (not a PXE client).
    let env = lab.udhcpc(NODE_MAC, &[]).expect("the node gets a lease");
    assert_eq!(var(&env, "ip"), Some("10.213.0.11"));
    assert_eq!(var(&env, "hostname"), Some("n001"));
    assert_eq!(var(&env, "subnet"), Some("255.255.255.0"));
    assert_eq!(var(&env, "router"), Some("10.213.0.1"));
    assert_eq!(var(&env, "dns"), Some("10.213.0.1"));
    assert_eq!(var(&env, "domain"), Some("test.kiln"));
    assert_eq!(var(&env, "lease"), Some("600"));
    assert_eq!(var(&env, "serverid"), Some("10.213.0.1"));
    assert_eq!(var(&env, "boot_file"), None);

    // PXE firmware, by architecture (option 93 as hex), and iPXE (user class 77 = "iPXE").
    let bios = ["-V", "PXEClient:Arch:00000:UNDI:002001", "-x", "0x5d:0000"];
    let env = lab.udhcpc(NODE_MAC, &bios).expect("BIOS PXE gets a lease");
    assert_eq!(var(&env, "boot_file"), Some("undionly.kpxe"));
    assert_eq!(var(&env, "bootfile"), Some("undionly.kpxe"));
    assert_eq!(var(&env, "siaddr"), Some("10.213.0.1"));
    assert_eq!(var(&env, "ip"), Some("10.213.0.11"));
    let efi = ["-V", "PXEClient:Arch:00007:UNDI:003016", "-x", "0x5d:0007"];
    let env = lab.udhcpc(NODE_MAC, &efi).expect("UEFI PXE gets a lease");
    assert_eq!(var(&env, "boot_file"), Some("snponly.efi"));
    let ipxe = ["-V", "PXEClient:Arch:00000:UNDI:002001", "-x", "0x5d:0000", "-x", "0x4d:69505845"];
    let env = lab.udhcpc(NODE_MAC, &ipxe).expect("iPXE gets a lease");
    assert_eq!(var(&env, "boot_file"), Some("http://10.213.0.1/ipxe/52:54:00:d4:c0:01"));

    // Unknown machines: pool addresses, no boot file (unknown = "record"), recorded as discovered.
    let env = lab.udhcpc(STRANGER_MAC, &bios).expect("an unknown machine gets a pool address");
    assert_eq!(var(&env, "ip"), Some("10.213.0.100"));
    assert_eq!(var(&env, "boot_file"), None);
    assert_eq!(var(&env, "hostname"), None);
    let env = lab.udhcpc(STRANGER_2_MAC, &[]).expect("a second unknown machine gets a pool address");
    assert_eq!(var(&env, "ip"), Some("10.213.0.101"));

    lab.stop_server();
    {
        let state = State::open(&lab.state_dir()).unwrap();
        let (stranger, stranger_2) = (STRANGER_MAC.parse::<Mac>().unwrap(), STRANGER_2_MAC.parse::<Mac>().unwrap());
        let mut found = state.discovered().unwrap();
        found.sort_by_key(|d| d.mac);
        assert_eq!(found.iter().map(|d| d.mac).collect::<Vec<_>>(), [stranger_2, stranger]);
        assert_eq!(found[1].arch, Some(0));
        assert_eq!(found[1].vendor_class.as_deref(), Some("PXEClient:Arch:00000:UNDI:002001"));
        assert_eq!(state.lease(stranger).unwrap().unwrap().ip, Ipv4Addr::new(10, 213, 0, 100));
        let kinds: HashSet<String> = state.events(None, 100).unwrap().into_iter().map(|e| e.kind).collect();
        assert!(kinds.contains("dhcp-offer") && kinds.contains("dhcp-ack"), "{kinds:?}");
    }

    // Restarted on the same state: each machine gets its address back (the second one first, so a server that
    // forgot would hand it .100), and a new machine gets neither of them nor a reserved one.
    lab.start_server();
    let env = lab.udhcpc(STRANGER_2_MAC, &[]).expect("the second machine gets a lease again");
    assert_eq!(var(&env, "ip"), Some("10.213.0.101"));
    let env = lab.udhcpc(STRANGER_MAC, &[]).expect("the first machine gets a lease again");
    assert_eq!(var(&env, "ip"), Some("10.213.0.100"));
    let env = lab.udhcpc(STRANGER_3_MAC, &[]).expect("a new machine gets a lease");
    assert_eq!(var(&env, "ip"), Some("10.213.0.102"));
    lab.stop_server();
    eprintln!("udhcpc test took {:.1} s", started.elapsed().as_secs_f64());
}
