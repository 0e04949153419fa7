//! Boot-server replicas: two `kiln serve` instances, each in its own network namespace with its own
//! `[server]` address, start from empty stores and pull what their nodes boot from one registry
//! (`[server] pull`), then serve the same node the same boot: the same script (but for the server's
//! address) and the same kernel and initrd bytes, fetched with curl from inside each namespace. A reload
//! (SIGHUP) pulls what a new node needs; a replica whose registry is down says so in one line.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const NODE: &str = "52:54:00:00:0a:01";
const NODE2: &str = "52:54:00:00:0a:02";

fn ip(args: &[&str]) {
    let st = Command::new("ip").args(args).status().expect("running ip");
    assert!(st.success(), "ip {args:?} failed");
}

/// Two namespaces, each linked to this one by a veth pair: 10.231.N.1 here, 10.231.N.2 there.
struct Net {
    names: Vec<String>,
}

impl Net {
    fn new() -> Net {
        let tag = std::process::id() % 100_000;
        let names: Vec<String> = (1..=2).map(|i| format!("kiln-rep{i}-{tag}")).collect();
        let net = Net { names };
        for (i, ns) in net.names.iter().enumerate() {
            let n = i + 1;
            let (here, there) = (format!("krh{n}-{tag}"), format!("krt{n}-{tag}"));
            ip(&["netns", "add", ns]);
            ip(&["link", "add", &here, "type", "veth", "peer", "name", &there, "netns", ns]);
            ip(&["addr", "add", &format!("10.231.{n}.1/24"), "dev", &here]);
            ip(&["link", "set", &here, "up"]);
            ip(&["-n", ns, "addr", "add", &format!("10.231.{n}.2/24"), "dev", &there]);
            ip(&["-n", ns, "link", "set", &there, "up"]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
            ip(&["-n", ns, "route", "add", "default", "via", &format!("10.231.{n}.1")]);
        }
        net
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in &self.names {
            // Deleting the namespace deletes its end of the veth pair, and so the pair.
            let _ = Command::new("ip").args(["netns", "del", ns]).stderr(Stdio::null()).status();
        }
    }
}

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits (bounded) until `f` holds.
fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn registry(dir: &Path, addr: &str) -> Proc {
    let config = dir.join("registry.yml");
    fs::write(
        &config,
        format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {addr}\n",
            dir.join("data").display()
        ),
    )
    .unwrap();
    let child =
        Command::new("docker-registry").arg("serve").arg(&config).stdout(Stdio::null()).stderr(Stdio::null()).spawn();
    let p = Proc(child.expect("starting docker-registry"));
    wait_for("the registry", Duration::from_secs(30), || std::net::TcpStream::connect(addr).is_ok());
    p
}

fn recipe(address: &str, pull: &str, nodes: &[(&str, &str)]) -> String {
    let mut r = format!(
        "source_date_epoch = 1700000000\n\n[image.tiny]\nfrom = \"oci:tiny-oci:latest\"\ncmdline = \"console=ttyS0\"\n\n\
         [image.other]\nfrom = \"oci:tiny-oci:latest\"\ncmdline = \"console=ttyS0 quiet\"\n\n\
         [server]\naddress = \"{address}\"\ndhcp = \"off\"\npull = \"{pull}\"\npull_tls_verify = false\n"
    );
    for (i, (mac, image)) in nodes.iter().enumerate() {
        r.push_str(&format!("\n[node.n{i}]\nmac = \"{mac}\"\nimage = \"{image}\"\n"));
    }
    r
}

/// `curl` run inside the namespace `ns`.
fn curl_in(ns: &str, args: &str) -> Vec<u8> {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "sh", "-c", &format!("curl -sSf --max-time 20 {args}")])
        .output()
        .unwrap();
    assert!(out.status.success(), "curl {args} in {ns}: {}", String::from_utf8_lossy(&out.stderr));
    out.stdout
}

struct Replica {
    _proc: Proc,
    ns: String,
    dir: PathBuf,
    addr: String,
    http: u16,
}

impl Replica {
    fn start(ns: &str, dir: &Path, addr: &str, expect: &str) -> Replica {
        let http = free_port();
        let tftp = free_port();
        let log = dir.join("serve.log");
        let child = Command::new("ip")
            .args(["netns", "exec", ns, env!("CARGO_BIN_EXE_kiln"), "serve"])
            .args(["--http-port", &http.to_string(), "--tftp-port", &tftp.to_string(), "--store"])
            .arg(dir.join("store"))
            .current_dir(dir)
            .stdout(fs::File::create(&log).unwrap())
            .stderr(fs::File::create(dir.join("serve.err")).unwrap())
            .spawn()
            .unwrap();
        let r =
            Replica { _proc: Proc(child), ns: ns.to_string(), dir: dir.to_path_buf(), addr: addr.to_string(), http };
        wait_for(&format!("the replica in {ns} to say {expect:?}"), Duration::from_secs(60), || {
            r.output().contains(expect)
        });
        r
    }

    fn output(&self) -> String {
        let read = |f: &str| fs::read_to_string(self.dir.join(f)).unwrap_or_default();
        format!("{}{}", read("serve.log"), read("serve.err"))
    }

    fn get(&self, path: &str) -> Vec<u8> {
        curl_in(&self.ns, &format!("'http://{}:{}{path}'", self.addr, self.http))
    }

    /// The node's boot script with this server's address taken out, and the sha256 of each file it loads.
    fn boot(&self, mac: &str) -> (String, Vec<String>) {
        let script = String::from_utf8(self.get(&format!("/ipxe/{mac}"))).unwrap();
        let mut files = Vec::new();
        for url in script.split_whitespace().filter(|w| w.contains("/blob/sha256/")) {
            let path = &url[url.find("/blob/").unwrap()..];
            let bytes = self.get(path);
            let hex = sha256_bytes(&bytes);
            assert!(path.ends_with(&hex), "{path} served bytes with sha256 {hex}");
            files.push(hex);
        }
        let base = format!("http://{}:{}", self.addr, self.http);
        (script.replace(&base, "http://SERVER"), files)
    }
}

fn sha256_bytes(b: &[u8]) -> String {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    std::io::Write::write_all(&mut f, b).unwrap();
    sha256_hex(f.path())
}

#[test]
fn two_replicas_pull_from_one_registry_and_serve_the_same_boot() {
    if !nix_root() {
        eprintln!("skipped: network namespaces need root");
        return;
    }
    let net = Net::new();
    let work = tempfile::tempdir().unwrap();
    let reg_addr = format!("10.231.1.1:{}", free_port());
    let _registry = registry(work.path(), &reg_addr);
    let remote = format!("docker://{reg_addr}/kiln");

    // Built once, on a build machine, and pushed.
    let build = work.path().join("build");
    fs::create_dir_all(&build).unwrap();
    sh(&format!("cp -a '{}' '{}'", tiny().join("oci").display(), build.join("tiny-oci").display()));
    fs::write(build.join("kiln.toml"), recipe("127.0.0.1/8", &remote, &[(NODE, "tiny")])).unwrap();
    kiln_ok(&build, &build.join("store"), &["build", "--quiet"]);
    kiln_ok(&build, &build.join("store"), &["push", &remote, "--tls-verify=false", "--quiet"]);

    // Two replicas: their own [server] address, the same images and nodes, the build's kiln.lock, no source.
    let mut replicas = Vec::new();
    for (i, ns) in net.names.iter().enumerate() {
        let dir = work.path().join(format!("replica{}", i + 1));
        fs::create_dir_all(&dir).unwrap();
        let addr = format!("10.231.{}.2", i + 1);
        fs::write(dir.join("kiln.toml"), recipe(&format!("{addr}/24"), &remote, &[(NODE, "tiny")])).unwrap();
        fs::copy(build.join("kiln.lock"), dir.join("kiln.lock")).unwrap();
        replicas.push(Replica::start(ns, &dir, &addr, "kiln serve: pulled from"));
    }
    for r in &replicas {
        assert!(r.output().contains("1 fetched, 0 already here"), "{}", r.output());
    }
    let (script1, files1) = replicas[0].boot(NODE);
    let (script2, files2) = replicas[1].boot(NODE);
    assert_eq!(script1, script2, "the two replicas boot the node differently");
    assert_eq!(files1, files2);
    assert_eq!(files1.len(), 3, "kernel, initramfs and image: {script1}");

    // A new node on another image: the recipe is edited and reloaded; the replica pulls what it needs.
    let r1 = &replicas[0];
    fs::write(
        r1.dir.join("kiln.toml"),
        recipe(&format!("{}/24", r1.addr), &remote, &[(NODE, "tiny"), (NODE2, "other")]),
    )
    .unwrap();
    kiln_ok(&build, &build.join("store"), &["build", "--quiet"]);
    // `ip netns exec` execs kiln, so the child's pid is kiln serve's.
    sh(&format!("kill -HUP {}", r1._proc.0.id()));
    wait_for("the reload", Duration::from_secs(60), || r1.output().contains("kiln serve: reloaded"));
    assert!(r1.output().contains("1 fetched, 1 already here"), "{}", r1.output());
    let (script3, _) = r1.boot(NODE2);
    assert!(script3.contains("quiet"), "{script3}");

    // The registry goes away: a new replica says so in one line and serves nothing it does not have.
    drop(_registry);
    let dir = work.path().join("replica3");
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join("kiln.toml"), recipe("10.231.2.2/24", &remote, &[(NODE, "tiny")])).unwrap();
    fs::copy(build.join("kiln.lock"), dir.join("kiln.lock")).unwrap();
    drop(replicas);
    let out = Command::new("ip")
        .args(["netns", "exec", &net.names[1], env!("CARGO_BIN_EXE_kiln"), "serve", "--store"])
        .arg(dir.join("store"))
        .args(["--http-port", &free_port().to_string(), "--tftp-port", &free_port().to_string()])
        .current_dir(&dir)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert_eq!(err.lines().filter(|l| l.contains("pulling from")).count(), 1, "{err}");
    assert!(err.contains("serving what the store holds"), "{err}");
}

fn nix_root() -> bool {
    sh("id -u").trim() == "0"
}
