//! `kiln node status` and the node agent (`kiln-node agent`).
//!
//! - Without a VM, in network namespaces (a node's address, a stranger's): the agent a node's overlay carries
//!   reports from the node's address and is accepted; heartbeats from another address, malformed, oversized or
//!   too frequent ones are refused with a 4xx, counted under their limits, and change nothing; SIGTERM makes the
//!   agent say goodbye (`off`); the status is read from the state once the server has stopped.
//! - With QEMU: a node booted from kiln serve in a namespace shows up `up` with its uptime and memory within two
//!   heartbeats of its network coming up, and turns `lost` once killed; once with an image whose init is busybox
//!   init, once with a Debian image running systemd (scripts/fixtures/systemd-node.sh).

mod common;

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::bmc;
use common::*;
use serde_json::Value;

/// The static `kiln-node`: `$KILN_NODE` (scripts/test.sh sets it), else built with scripts/build-node.sh.
fn node_agent() -> PathBuf {
    if let Some(p) = std::env::var_os("KILN_NODE").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    let out = Command::new(repo().join("scripts/build-node.sh")).env("PROFILE", "dev").output().unwrap();
    assert!(out.status.success(), "scripts/build-node.sh failed:\n{}", String::from_utf8_lossy(&out.stderr));
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

/// A namespace with `br0` (the server's address) and optionally `tap0` for a VM, and peers: namespaces joined to
/// the bridge by veth pairs, each with an address of its own. Removed on drop, with every process started in them.
struct Net {
    ns: String,
    subnet: String,
    peers: Vec<String>,
    children: Vec<Child>,
}

fn ip(args: &[&str]) {
    let st = Command::new("ip").args(args).status().expect("running ip");
    assert!(st.success(), "ip {args:?} failed");
}

impl Net {
    fn new(tag: &str, subnet: &str, tap: bool) -> Net {
        let ns = format!("kiln-{tag}-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &ns]).stderr(Stdio::null()).status();
        ip(&["netns", "add", &ns]);
        ip(&["-n", &ns, "link", "set", "lo", "up"]);
        ip(&["-n", &ns, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &ns, "addr", "add", &format!("{subnet}.1/24"), "dev", "br0"]);
        ip(&["-n", &ns, "link", "set", "br0", "up"]);
        if tap {
            ip(&["-n", &ns, "tuntap", "add", "dev", "tap0", "mode", "tap"]);
            ip(&["-n", &ns, "link", "set", "tap0", "master", "br0"]);
            ip(&["-n", &ns, "link", "set", "tap0", "up"]);
        }
        Net { ns, subnet: subnet.to_string(), peers: vec![], children: vec![] }
    }

    /// A namespace at `<subnet>.<host>` on the bridge; returns its name.
    fn peer(&mut self, host: u8) -> String {
        let peer = format!("{}-{host}", self.ns);
        let _ = Command::new("ip").args(["netns", "del", &peer]).stderr(Stdio::null()).status();
        ip(&["netns", "add", &peer]);
        self.peers.push(peer.clone());
        let (here, there) = (format!("v{host}a"), format!("v{host}b"));
        ip(&["-n", &self.ns, "link", "add", &here, "type", "veth", "peer", "name", &there, "netns", &peer]);
        ip(&["-n", &self.ns, "link", "set", &here, "master", "br0"]);
        ip(&["-n", &self.ns, "link", "set", &here, "up"]);
        ip(&["-n", &peer, "addr", "add", &format!("{}.{host}/24", self.subnet), "dev", &there]);
        ip(&["-n", &peer, "link", "set", &there, "up"]);
        ip(&["-n", &peer, "link", "set", "lo", "up"]);
        peer
    }

    fn spawn(&mut self, ns: &str, cmd: &[&str], envs: &[(&str, &str)], log: &Path, err: &Path) -> u32 {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", ns]).args(cmd).stdin(Stdio::null());
        command.stdout(fs::File::create(log).unwrap()).stderr(fs::File::create(err).unwrap());
        for (k, v) in envs {
            command.env(k, v);
        }
        let child = command.spawn().expect("spawning in the namespace");
        let pid = child.id();
        self.children.push(child);
        pid
    }
}

/// Runs `cmd` in namespace `ns` and returns what it did.
fn run_in(ns: &str, cmd: &[&str]) -> Output {
    Command::new("ip").args(["netns", "exec", ns]).args(cmd).output().expect("running in the namespace")
}

impl Drop for Net {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for ns in self.peers.iter().chain(std::iter::once(&self.ns)) {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// `kiln node status --json` as JSON, quietly (it is asked many times).
fn status(dir: &Path, store: &Path) -> Vec<Value> {
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["node", "status", "--json"])
        .current_dir(dir)
        .env("KILN_STORE", store)
        .output()
        .expect("running kiln node status");
    assert!(out.status.success(), "kiln node status failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("kiln node status --json prints JSON")
}

fn row<'a>(rows: &'a [Value], node: &str) -> &'a Value {
    rows.iter().find(|r| r["node"] == node).unwrap_or_else(|| panic!("{node} not in {rows:?}"))
}

/// The members of concatenated newc archives (what the kernel unpacks from one initrd), by path.
fn newc_members(mut data: &[u8]) -> Vec<(String, Vec<u8>)> {
    let hex = |b: &[u8]| usize::from_str_radix(std::str::from_utf8(b).unwrap(), 16).unwrap();
    let pad4 = |n: usize| (4 - n % 4) % 4;
    let mut out = Vec::new();
    loop {
        while data.first() == Some(&0) {
            data = &data[1..];
        }
        if data.is_empty() {
            return out;
        }
        assert_eq!(&data[..6], b"070701", "not a newc header");
        let (size, namesize) = (hex(&data[54..62]), hex(&data[94..102]));
        let name = String::from_utf8(data[110..110 + namesize - 1].to_vec()).unwrap();
        let start = 110 + namesize + pad4(110 + namesize);
        let body = data[start..start + size].to_vec();
        data = &data[start + size + pad4(size)..];
        if name != "TRAILER!!!" {
            out.push((name, body));
        }
    }
}

const HEARTBEAT_BODY: &str = r#"{"event":"up","uptime":12.5,"load":[0.1,0.2,0.3],"mem_total":1000,"mem_available":500,"kernel":"6.1.0-x","image":"","boot_id":"aa-bb","agent":"0.1.0"}"#;

#[test]
fn heartbeats_come_only_from_the_node_and_garbage_changes_nothing_and_power_waits_for_them() {
    let agent = node_agent();
    assert!(bmc::have_ipmi(), "{}", bmc::NO_IPMI);
    // The nodes' BMCs (for `kiln power cycle --wait`), on the host's loopback.
    let bmcs: Vec<bmc::IpmiBmc> =
        (0..2).map(|_| bmc::IpmiBmc::start("127.0.0.1", bmc::free_udp_port("127.0.0.1"), "bmc-s3cret", None)).collect();
    let work = tempfile::tempdir().unwrap();
    let d = work.path();
    let store = d.join("store");
    let subnet = "10.213.8";
    fs::write(
        d.join("kiln.toml"),
        format!(
            r#"[image.tiny]
from = "oci:{}:latest"
cmdline = "console=ttyS0"

[server]
address = "{subnet}.1/24"
dhcp = "off"
heartbeat = 2

[node.n001]
mac = "52:54:00:00:00:01"
image = "tiny"
ipv4 = "{subnet}.11"
bmc = {{ protocol = "ipmi", address = "127.0.0.1:{bmc1}", user = "admin", password_file = "bmc.pass", cipher_suite = 3 }}

[node.n002]
mac = "52:54:00:00:00:02"
image = "tiny"
ipv4 = "{subnet}.12"
bmc = {{ protocol = "ipmi", address = "127.0.0.1:{bmc2}", user = "admin", password_file = "bmc.pass", cipher_suite = 3 }}
"#,
            tiny().join("oci").display(),
            bmc1 = bmcs[0].port,
            bmc2 = bmcs[1].port,
        ),
    )
    .unwrap();
    bmc::write_private(&d.join("bmc.pass"), "bmc-s3cret\n");
    kiln_ok(d, &store, &["build", "--quiet"]);
    let mut net = Net::new("hb", subnet, false);
    let node = net.peer(11);
    let stranger = net.peer(99);
    let kiln = env!("CARGO_BIN_EXE_kiln");
    let recipe = d.join("kiln.toml");
    let (log, err) = (d.join("serve.log"), d.join("serve.err"));
    let store_s = store.display().to_string();
    let agent_s = agent.display().to_string();
    let server_ns = net.ns.clone();
    let server = net.spawn(
        &server_ns,
        &[kiln, "serve", "-f", recipe.to_str().unwrap(), "--store", &store_s],
        &[("KILN_NODE", &agent_s)],
        &log,
        &err,
    );
    let base = format!("http://{subnet}.1");
    let curl = |ns: &str, args: &[&str]| -> String {
        let out = run_in(ns, &[&["curl", "-s"][..], args].concat());
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let code = |ns: &str, args: &[&str]| -> String {
        curl(ns, &[&["-o", "/dev/null", "-w", "%{http_code}"][..], args].concat())
    };
    assert!(
        poll(Duration::from_secs(20), || (curl(&node, &[&format!("{base}/healthz")]) == "ok\n").then_some(()))
            .is_some(),
        "kiln serve did not answer: {}",
        fs::read_to_string(&err).unwrap_or_default()
    );
    let serve_log = fs::read_to_string(&log).unwrap();
    assert!(serve_log.contains("kiln serve: node agent "), "{serve_log}");

    let rows = status(d, &store);
    assert_eq!(rows.len(), 2);
    for r in &rows {
        assert_eq!((r["state"].as_str(), &r["stage"], &r["last_seen"]), (Some("off"), &Value::Null, &Value::Null));
        assert_eq!(r["image"], "tiny");
    }

    // The node's overlay carries its settings and the agent (a second archive after the overlay's own).
    let overlay = d.join("overlay");
    curl(&node, &["-o", overlay.to_str().unwrap(), &format!("{base}/overlay/52:54:00:00:00:01")]);
    let mut unpacked = Vec::new();
    flate2::read::MultiGzDecoder::new(fs::File::open(&overlay).unwrap()).read_to_end(&mut unpacked).unwrap();
    let members = newc_members(&unpacked);
    let member = |name: &str| members.iter().find(|(n, _)| n == name).map(|(_, b)| b.clone());
    let env = String::from_utf8(member("etc/kiln/node.env").expect("node.env in the overlay")).unwrap();
    assert!(env.contains(&format!("KILN_SERVER_URL='{base}'\nKILN_HEARTBEAT='2'\n")), "{env}");
    let image_hex = sha256_hex(&fs::canonicalize(store.join("roots/image-tiny")).unwrap().join("image"));
    assert!(env.contains(&format!("KILN_IMAGE_DIGEST='sha256:{image_hex}'")), "{env}");
    let carried = member("usr/lib/kiln/kiln-node").expect("the agent in the overlay");
    assert!(carried == fs::read(&agent).unwrap(), "the overlay carries another kiln-node");
    let (env_file, agent_file) = (d.join("node.env"), d.join("kiln-node"));
    fs::write(&env_file, &env).unwrap();
    fs::write(&agent_file, &carried).unwrap();
    sh(&format!("chmod 755 '{}'", agent_file.display()));

    // The agent, from the node's address: accepted.
    let once = |ns: &str, env: &Path| {
        run_in(ns, &[agent_file.to_str().unwrap(), "agent", "--once", "--env", env.to_str().unwrap()])
    };
    let out = once(&node, &env_file);
    assert!(out.status.success(), "the agent's heartbeat was refused: {}", String::from_utf8_lossy(&out.stderr));
    let rows = status(d, &store);
    let n001 = row(&rows, "n001");
    assert_eq!(n001["state"], "up", "{n001}");
    assert_eq!(n001["image_digest"], format!("sha256:{image_hex}"));
    assert_eq!(n001["address"], format!("{subnet}.11"));
    assert_eq!(n001["kernel"].as_str().unwrap(), sh("uname -r").trim());
    let meminfo = fs::read_to_string("/proc/meminfo").unwrap();
    let total_kb: u64 = meminfo.lines().next().unwrap().split_whitespace().nth(1).unwrap().parse().unwrap();
    assert_eq!(n001["mem_total"], total_kb * 1024);
    assert!(n001["uptime"].as_u64().unwrap() > 0 && n001["mem_used"].as_u64().unwrap() > 0, "{n001}");

    // From another address: refused, nothing changes (n002 stays off, n001 keeps its heartbeat).
    let unchanged = |rows: &[Value]| -> Vec<Value> {
        rows.iter()
            .map(|r| serde_json::json!([r["node"], r["last_seen"], r["booted"], r["image_digest"], r["mem_total"]]))
            .collect()
    };
    let before = unchanged(&status(d, &store));
    let n002_env = d.join("n002.env");
    fs::write(&n002_env, format!("KILN_MAC='52:54:00:00:00:02'\nKILN_SERVER_URL='{base}'\n")).unwrap();
    let out = once(&stranger, &n002_env);
    assert!(!out.status.success());
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("403") && said.contains("only from its own address"), "{said}");
    let body = d.join("body.json");
    fs::write(&body, HEARTBEAT_BODY).unwrap();
    let post = format!("@{}", body.display());
    let n001_url = format!("{base}/heartbeat/52:54:00:00:00:01");
    assert_eq!(code(&stranger, &["-X", "POST", "--data-binary", &post, &n001_url]), "403");
    // Garbage from the node's own address: a 4xx each.
    let big = d.join("big.json");
    fs::write(&big, HEARTBEAT_BODY.replace("\"agent\":\"0.1.0\"", &format!("\"agent\":\"{}\"", "x".repeat(5000))))
        .unwrap();
    let garbage: Vec<(Vec<String>, &str)> = vec![
        (vec!["--data-binary".into(), "not json at all".into(), n001_url.clone()], "400"),
        (vec!["--data-binary".into(), HEARTBEAT_BODY.replace("\"up\"", "\"reboot\""), n001_url.clone()], "400"),
        (vec!["--data-binary".into(), HEARTBEAT_BODY.replace("12.5", "\"soon\""), n001_url.clone()], "400"),
        (vec!["--data-binary".into(), format!("@{}", big.display()), n001_url.clone()], "413"),
        (vec!["--data-binary".into(), post.clone(), format!("{base}/heartbeat/52:54:00:99:99:99")], "404"),
        (vec!["--data-binary".into(), post.clone(), format!("{base}/heartbeat/not-a-mac")], "400"),
        (
            vec![
                "-H".into(),
                "Transfer-Encoding: chunked".into(),
                "--data-binary".into(),
                post.clone(),
                n001_url.clone(),
            ],
            "400",
        ),
    ];
    for (args, expected) in &garbage {
        let mut all: Vec<&str> = vec!["-X", "POST"];
        all.extend(args.iter().map(String::as_str));
        assert_eq!(code(&node, &all), *expected, "{args:?}");
    }
    assert_eq!(code(&node, &[&n001_url]), "405", "a GET");
    // A two-stage loader's reports: only from the node's address, only the loader's steps.
    let loader_url = format!("{base}/loader/52:54:00:00:00:01?step=started&detail=x");
    assert_eq!(code(&stranger, &[&loader_url]), "403", "a loader report from another address");
    let bogus = format!("{base}/loader/52:54:00:00:00:01?step=reboot-everything&detail=x");
    assert_eq!(code(&node, &[&bogus]), "400", "a step the loader has not");
    let after = status(d, &store);
    assert_eq!(unchanged(&after), before, "a refused heartbeat changed the status");
    assert_eq!(row(&after, "n002")["state"], "off");
    // A machine that is not a node shows with --unknown only.
    curl(&stranger, &[&format!("{base}/ipxe/52:54:00:99:99:99")]);
    let listed = poll(Duration::from_secs(10), || {
        let out = kiln_ok(d, &store, &["node", "status", "--json", "--unknown"]);
        let rows: Vec<Value> = serde_json::from_str(&out).unwrap();
        rows.into_iter().find(|r| r["mac"] == "52:54:00:99:99:99")
    })
    .expect("the stranger is not listed with --unknown");
    assert_eq!(
        (&listed["node"], listed["state"].as_str(), listed["stage"].as_str()),
        (&Value::Null, Some("unknown"), Some("script"))
    );
    assert_eq!(status(d, &store).len(), 2, "without --unknown, nodes only");
    let events = kiln_ok(d, &store, &["node", "events", "--mac", "n001", "--json"]);
    assert_eq!(events.matches("\"kind\": \"up\"").count(), 1, "{events}");

    // Too many from the node itself: refused beyond heartbeat_max_per_interval (4) in one interval (2 s).
    let urls: Vec<&str> = std::iter::repeat_n(n001_url.as_str(), 8).collect();
    let codes = curl(
        &node,
        &[&["-o", "/dev/null", "-w", "%{http_code}\n", "-X", "POST", "--data-binary", &post][..], &urls].concat(),
    );
    assert!(codes.lines().any(|c| c == "429"), "eight heartbeats at once were all accepted: {codes}");

    // Every refusal is counted under a limit, and reported like the others.
    let metrics = curl(&node, &[&format!("{base}/metrics")]);
    for limit in ["heartbeat_foreign", "heartbeat_malformed", "heartbeat_max_body", "heartbeat_max_per_interval"] {
        let line = metrics.lines().find(|l| l.starts_with(&format!("kiln_limit_refused_total{{limit=\"{limit}\"}}")));
        let n: u64 = line.and_then(|l| l.rsplit(' ').next()).and_then(|n| n.parse().ok()).unwrap_or(0);
        assert!(n > 0, "{limit} counted nothing:\n{metrics}");
    }
    let reported = poll(Duration::from_secs(15), || {
        let e = fs::read_to_string(&err).unwrap_or_default();
        e.contains("limit heartbeat_foreign (0) hit: 2 heartbeats from another address than the node's refused")
            .then_some(e)
    });
    assert!(reported.is_some(), "no report line: {}", fs::read_to_string(&err).unwrap_or_default());

    // The agent running: it reports, and says goodbye on SIGTERM.
    let (alog, aerr) = (d.join("agent.log"), d.join("agent.err"));
    let pid = net.spawn(
        &node,
        &[agent_file.to_str().unwrap(), "agent", "--env", env_file.to_str().unwrap()],
        &[],
        &alog,
        &aerr,
    );
    let since = row(&status(d, &store), "n001")["last_seen"].as_u64().unwrap();
    let fresh = poll(Duration::from_secs(10), || {
        let rows = status(d, &store);
        let r = row(&rows, "n001");
        (r["state"] == "up" && r["last_seen"].as_u64() > Some(since)).then_some(())
    });
    assert!(fresh.is_some(), "the running agent did not report: {}", fs::read_to_string(&aerr).unwrap_or_default());
    // `ip netns exec` execs the command: the process is the agent.
    assert_eq!(fs::read_to_string(format!("/proc/{pid}/comm")).unwrap().trim(), "kiln-node");
    sh(&format!("kill -TERM {pid}"));
    let child = net.children.last_mut().unwrap();
    let exited = poll(Duration::from_secs(10), || child.try_wait().unwrap());
    assert!(exited.is_some_and(|s| s.success()), "the agent did not stop cleanly: {exited:?}");
    let said = fs::read_to_string(&aerr).unwrap();
    assert!(said.contains("said goodbye, stopping"), "{said}");
    let n001 = row(&status(d, &store), "n001").clone();
    assert_eq!((n001["state"].as_str(), n001["stage"].as_str()), (Some("off"), Some("shutdown")), "{n001}");

    // `kiln power cycle --wait`: returns when the nodes are up again from a boot after the cycle, or names those
    // that are not. n001's agent reports a fresh boot once its BMC has cycled it; n002 never reports.
    let (wait_out, wait_err) = (d.join("wait.json"), d.join("wait.err"));
    let mut waiting = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["power", "cycle", "n001", "n002", "--wait", "--wait-timeout", "20", "--json"])
        .current_dir(d)
        .env("KILN_STORE", &store)
        .stdout(fs::File::create(&wait_out).unwrap())
        .stderr(fs::File::create(&wait_err).unwrap())
        .spawn()
        .unwrap();
    let cycled =
        poll(Duration::from_secs(20), || bmcs.iter().all(|b| b.file("calls").contains("power 1")).then_some(()));
    assert!(cycled.is_some(), "the BMCs were not cycled: {}", fs::read_to_string(&wait_err).unwrap_or_default());
    // A report from before the cycle's boot (uptime: an hour) does not count...
    let stale = d.join("stale.json");
    fs::write(&stale, HEARTBEAT_BODY.replace("12.5", "3600")).unwrap();
    assert_eq!(code(&node, &["-X", "POST", "--data-binary", &format!("@{}", stale.display()), &n001_url]), "200");
    // ...one from a boot after it does.
    let fresh = d.join("fresh.json");
    fs::write(&fresh, HEARTBEAT_BODY.replace("12.5", "0.5").replace("aa-bb", "cc-dd")).unwrap();
    assert_eq!(code(&node, &["-X", "POST", "--data-binary", &format!("@{}", fresh.display()), &n001_url]), "200");
    let ended = poll(Duration::from_secs(40), || waiting.try_wait().unwrap());
    let said = fs::read_to_string(&wait_err).unwrap_or_default();
    assert_eq!(ended.and_then(|s| s.code()), Some(1), "n002 never came up: {said}");
    let doc: Value = serde_json::from_str(&fs::read_to_string(&wait_out).unwrap()).unwrap();
    let up: Vec<&str> = doc["wait"]["up"].as_array().unwrap().iter().map(|u| u["node"].as_str().unwrap()).collect();
    assert_eq!(up, ["n001"], "{doc}");
    let not_up = &doc["wait"]["not_up"];
    assert_eq!((not_up[0]["node"].as_str(), not_up[0]["state"].as_str()), (Some("n002"), Some("off")), "{doc}");
    assert!(said.contains("n002: not up after 20 s: off") && said.contains("1 of 2 up"), "{said}");
    // Nothing to wait on without a status to read: refused before any BMC is asked.
    let calls = bmcs[0].file("calls");
    let no_state = kiln_err(d, &store, &["power", "on", "n001", "--wait", "--state-dir", "/nonexistent/state"]);
    assert!(no_state.contains("--wait reads the nodes' status from /nonexistent/state"), "{no_state}");
    assert_eq!(bmcs[0].file("calls"), calls, "a BMC was asked although --wait could not read the status");

    // With the server stopped, the status is read from its state.
    sh(&format!("kill -TERM {server}"));
    let child = net.children.iter_mut().find(|c| c.id() == server).unwrap();
    let stopped = poll(Duration::from_secs(10), || child.try_wait().unwrap());
    assert!(stopped.is_some_and(|s| s.success()), "kiln serve did not stop: {stopped:?}");
    let offline = status(d, &store);
    // n001's last word was the heartbeat of its boot after the cycle.
    assert_eq!(row(&offline, "n001")["stage"], "heartbeat");
    assert_eq!(row(&offline, "n002")["state"], "off");
    let table = kiln_ok(d, &store, &["node", "status", "n001"]);
    assert!(
        table.starts_with("NODE") && table.contains("n001") && table.contains("heartbeat") && !table.contains("n002"),
        "{table}"
    );
    let wrong = kiln_err(d, &store, &["node", "status", "n999"]);
    assert!(wrong.contains("\"n999\" is not a node (nodes: n001, n002)"), "{wrong}");
}

/// An image whose init is busybox init (`/etc/inittab`): the tiny fixture's busybox with an rcS that sets the
/// node's address from its overlay.
fn busybox_init_image(work: &Path) -> PathBuf {
    let root = work.join("busybox-root");
    fs::create_dir_all(&root).unwrap();
    sh(&format!("tar -xf '{}' -C '{}'", tiny().join("tiny.rootfs.tar").display(), root.display()));
    sh(&format!("rm -f '{0}/sbin/init' && ln -s /bin/busybox '{0}/sbin/init'", root.display()));
    fs::create_dir_all(root.join("etc/init.d")).unwrap();
    fs::write(root.join("etc/inittab"), "::sysinit:/etc/init.d/rcS\n::shutdown:/bin/umount -a -r\n").unwrap();
    fs::write(
        root.join("etc/init.d/rcS"),
        "#!/bin/sh\nmount -t proc proc /proc 2>/dev/null\nmount -t sysfs sysfs /sys 2>/dev/null\n\
         . /etc/kiln/node.env\nmodprobe virtio_pci\nmodprobe virtio_net\nip link set lo up\nip link set eth0 up\n\
         ip addr add \"$KILN_IPV4/$KILN_PREFIX\" dev eth0\necho \"KILN-RCS-DONE $KILN_IPV4\"\n",
    )
    .unwrap();
    sh(&format!("chmod 755 '{}'", root.join("etc/init.d/rcS").display()));
    root
}

/// An image running systemd: scripts/fixtures/systemd-node.sh's Debian tree.
fn systemd_image(work: &Path) -> PathBuf {
    let fixture = fixture("systemd-node.sh");
    let root = work.join("systemd-root");
    fs::create_dir_all(&root).unwrap();
    sh(&format!("tar -xf '{}' -C '{}'", fixture.join("rootfs.tar").display(), root.display()));
    root
}

/// Boots a node of `image` (a rootfs directory) from kiln serve in a namespace, waits for it to come up in
/// `kiln node status`, kills it, and waits for it to turn lost. `heartbeat` is the interval.
fn boot_report_and_lose(tag: &str, subnet: &str, image: &Path, memory_mb: u32, heartbeat: u64) {
    let agent = node_agent();
    let work = tempfile::tempdir().unwrap();
    let d = work.path();
    let store = d.join("store");
    fs::write(
        d.join("kiln.toml"),
        format!(
            r#"[image.node]
from = "dir:{}"
cmdline = "console=ttyS0 panic=-1"

[server]
address = "{subnet}.1/24"
interface = "br0"
dhcp = "full"
heartbeat = {heartbeat}

[server.boot_files]
bios = "/usr/lib/ipxe/undionly.kpxe"

[node.n042]
mac = "52:54:00:aa:bb:42"
image = "node"
ipv4 = "{subnet}.42"
"#,
            image.display()
        ),
    )
    .unwrap();
    kiln_ok(d, &store, &["build", "--quiet"]);
    let mut net = Net::new(tag, subnet, true);
    let kiln = env!("CARGO_BIN_EXE_kiln");
    let recipe = d.join("kiln.toml");
    let (log, err) = (d.join("serve.log"), d.join("serve.err"));
    let (store_s, agent_s, ns) = (store.display().to_string(), agent.display().to_string(), net.ns.clone());
    net.spawn(
        &ns,
        &[kiln, "serve", "-f", recipe.to_str().unwrap(), "--store", &store_s],
        &[("KILN_NODE", &agent_s)],
        &log,
        &err,
    );
    let listening = poll(Duration::from_secs(20), || {
        fs::read_to_string(&log).unwrap_or_default().contains("node agent").then_some(())
    });
    assert!(listening.is_some(), "kiln serve did not start: {}", fs::read_to_string(&err).unwrap_or_default());

    let console = d.join("console.log");
    let sercon = d.join("sercon");
    fs::write(&sercon, [0xf8u8, 0x03]).unwrap();
    let mut vm = Command::new("ip")
        .args(["netns", "exec", &ns, "qemu-system-x86_64", "-accel", "tcg", "-cpu", "max", "-machine", "pc"])
        .args(["-m", &memory_mb.to_string(), "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"])
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .args(["-netdev", "tap,id=n0,ifname=tap0,script=no,downscript=no"])
        .args(["-device", "virtio-net-pci,netdev=n0,mac=52:54:00:aa:bb:42,bootindex=1"])
        .arg("-fw_cfg")
        .arg(format!("name=etc/sercon-port,file={}", sercon.display()))
        .stdout(Stdio::null())
        .stderr(fs::File::create(d.join("qemu.err")).unwrap())
        .spawn()
        .expect("starting QEMU");
    let started = Instant::now();
    let node_ip = format!("{subnet}.42");
    // The node's network is up when it answers pings (stamped with unix times) once its kernel runs kiln's /init
    // (iPXE answers pings on the same address before); its agent must be heard within two heartbeats of that.
    let pings = d.join("ping.log");
    net.spawn(&ns, &["ping", "-D", "-n", "-i", "0.2", "-W", "1", &node_ip], &[], &pings, &d.join("ping.err"));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let unix_now = || std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
        let (mut up_row, mut init_at) = (None, None);
        let deadline = Duration::from_secs(600);
        while started.elapsed() < deadline && up_row.is_none() {
            if let Ok(Some(status)) = vm.try_wait() {
                panic!("QEMU exited ({status}); console:\n{}", fs::read_to_string(&console).unwrap_or_default());
            }
            if init_at.is_none() && fs::read_to_string(&console).unwrap_or_default().contains("kiln: starting") {
                init_at = Some(unix_now());
            }
            let rows = status(d, &store);
            let r = row(&rows, "n042");
            if r["state"] == "up" {
                up_row = Some((unix_now(), r.clone()));
            } else {
                std::thread::sleep(Duration::from_millis(250));
            }
        }
        let (up_at, r) = up_row.unwrap_or_else(|| {
            panic!("n042 never came up; console:\n{}", fs::read_to_string(&console).unwrap_or_default())
        });
        eprintln!("{tag}: n042 up {:.1} s after QEMU started: {r}", started.elapsed().as_secs_f64());
        let init_at = init_at.expect("kiln's /init never said it started the image's init");
        // "[1700000000.123456] 64 bytes from 10.213.10.42: ..."
        let first_reply = fs::read_to_string(&pings)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("bytes from"))
            .filter_map(|l| l.strip_prefix('[')?.split(']').next()?.parse::<f64>().ok())
            .find(|t| *t > init_at)
            .expect("n042 is up and never answered a ping");
        let took = up_at - first_reply;
        eprintln!("{tag}: up in kiln node status {took:.1} s after its first answer to a ping");
        assert!(took <= (2 * heartbeat) as f64 + 0.5, "n042 was up {took:.1} s after its network came up");
        assert!(r["uptime"].as_u64().unwrap() > 0, "{r}");
        assert!(r["mem_total"].as_u64().unwrap() > 500 << 20 && r["mem_used"].as_u64().unwrap() > 0, "{r}");
        assert!(r["kernel"].as_str().unwrap().ends_with("-amd64"), "{r}");
        assert!(r["image_digest"].as_str().unwrap().starts_with("sha256:"), "{r}");
        // It keeps reporting: heard again a heartbeat later.
        let first = r["last_seen"].as_u64().unwrap();
        let again = poll(Duration::from_secs(3 * heartbeat), || {
            let rows = status(d, &store);
            let r = row(&rows, "n042");
            (r["state"] == "up" && r["last_seen"].as_u64().unwrap() > first).then_some(())
        });
        assert!(again.is_some(), "n042 reported once only");

        // Killed: no goodbye, so it turns lost after 3 heartbeats of silence.
        let _ = vm.kill();
        let _ = vm.wait();
        let killed = Instant::now();
        let lost = poll(Duration::from_secs(3 * heartbeat + 10), || {
            let rows = status(d, &store);
            (row(&rows, "n042")["state"] == "lost").then(|| row(&rows, "n042").clone())
        })
        .expect("n042 did not turn lost");
        let after = killed.elapsed();
        eprintln!("{tag}: lost {:.1} s after the VM was killed: {lost}", after.as_secs_f64());
        assert!(after >= Duration::from_secs(2 * heartbeat - 1), "lost too early ({after:?})");
        assert!(after <= Duration::from_secs(3 * heartbeat + 3), "lost too late ({after:?})");
        assert_eq!(lost["uptime"], Value::Null);
        fs::read_to_string(&console).unwrap_or_default()
    }));
    let _ = vm.kill();
    let _ = vm.wait();
    eprintln!("--- kiln serve log:\n{}", fs::read_to_string(&log).unwrap_or_default());
    let console = result.unwrap_or_else(|e| std::panic::resume_unwind(e));
    assert!(console.contains("kiln-node agent: reporting to"), "no agent line on the console:\n{console}");
    let events = kiln_ok(d, &store, &["node", "events", "--mac", "n042"]);
    assert!(events.contains(" up ") && events.contains("script"), "{events}");
}

#[test]
fn qemu_nodes_report_until_killed_busybox_init_and_systemd() {
    if !have("qemu-system-x86_64") || !Path::new("/usr/lib/ipxe/undionly.kpxe").exists() {
        panic!("qemu-system-x86 and ipxe are needed: run scripts/setup.sh");
    }
    let work = tempfile::tempdir().unwrap();
    // One guest at a time: the boots share the machine's cores.
    let busybox = busybox_init_image(work.path());
    boot_report_and_lose("stbb", "10.213.10", &busybox, 1024, 2);
    let systemd = systemd_image(work.path());
    boot_report_and_lose("stsd", "10.213.11", &systemd, 2048, 3);
}
