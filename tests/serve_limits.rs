//! `kiln serve` under hostile and careless clients, on loopback: slow HTTP clients cut off while others are
//! served, a TFTP flood after which TFTP and DHCP still answer, overlays only for their node, `unknown =
//! "ignore"` leaving no trace, reloads that would change a listener refused, and `store gc` that names the
//! server instead of hanging.

mod common;

use std::fs;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use common::*;
use dhcproto::v4::{DhcpOption, Message, MessageType, Opcode};
use dhcproto::{Decodable, Encodable};

const N001: &str = "52:54:00:00:00:01";
const N002: &str = "52:54:00:00:00:02";
const STRANGER: &str = "52:54:00:99:99:99";

/// A built store and a recipe: n001 at 10.9.0.11 (an address no test client has), n002 at 127.0.0.2 (one the
/// tests can send from). `server_extra` goes into `[server]`.
fn site(server_extra: &str) -> (tempfile::TempDir, PathBuf) {
    let work = tempfile::tempdir().unwrap();
    let d = work.path();
    let store = d.join("store");
    write_recipe(d, server_extra);
    fs::write(d.join("undionly.kpxe"), (0..80_000u32).map(|i| (i * 7 % 251) as u8).collect::<Vec<u8>>()).unwrap();
    kiln_ok(d, &store, &["build", "--quiet"]);
    (work, store)
}

fn write_recipe(d: &Path, server_extra: &str) {
    fs::write(
        d.join("kiln.toml"),
        format!(
            r#"[image.tiny]
from = "oci:{}:latest"
cmdline = "console=ttyS0"

[server]
address = "127.0.0.1/8"
{server_extra}

[server.boot_files]
bios = "{}"

[node.n001]
mac = "{N001}"
image = "tiny"
ipv4 = "10.9.0.11"

[node.n002]
mac = "{N002}"
image = "tiny"
ipv4 = "127.0.0.2"
"#,
            tiny().join("oci").display(),
            d.join("undionly.kpxe").display()
        ),
    )
    .unwrap();
}

struct Server {
    child: Child,
    dir: PathBuf,
    http: u16,
    tftp: u16,
}

impl Server {
    /// `kiln serve` with the recipe in `dir`, ports from `args` (or free ones given on the command line).
    fn start(dir: &Path, store: &Path, args: &[&str], http: u16) -> Server {
        let tftp = free_port();
        let mut all: Vec<String> = vec!["serve".into(), "--tftp-port".into(), tftp.to_string()];
        all.extend(args.iter().map(|s| s.to_string()));
        let child = Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(&all)
            .arg("--store")
            .arg(store)
            .current_dir(dir)
            .stdout(fs::File::create(dir.join("serve.log")).unwrap())
            .stderr(fs::File::create(dir.join("serve.err")).unwrap())
            .spawn()
            .unwrap();
        let start = Instant::now();
        while TcpStream::connect(("127.0.0.1", http)).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "kiln serve did not listen: {}",
                fs::read_to_string(dir.join("serve.err")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Server { child, dir: dir.to_path_buf(), http, tftp }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.http)
    }

    fn stderr(&self) -> String {
        fs::read_to_string(self.dir.join("serve.err")).unwrap_or_default()
    }

    /// Waits (up to `within`) until the server's stderr contains `text`.
    fn await_stderr(&self, text: &str, within: Duration) -> String {
        let start = Instant::now();
        loop {
            let err = self.stderr();
            if err.contains(text) {
                return err;
            }
            assert!(start.elapsed() < within, "kiln serve never said {text:?}; stderr:\n{err}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The HTTP status curl gets for `url`, with extra curl arguments.
fn status(url: &str, extra: &str) -> String {
    sh(&format!("curl -s -o /dev/null -w '%{{http_code}}' --max-time 10 {extra} '{url}'"))
}

#[test]
fn slow_http_clients_are_cut_off_while_others_are_served() {
    let (work, store) = site("dhcp = \"off\"\nhttp_header_timeout = 2\noverlay_allow = [\"127.0.0.0/8\"]");
    let http = free_port();
    let srv = Server::start(work.path(), &store, &["--http-port", &http.to_string()], http);
    // Clients trickling a header byte every 300 ms: the head never completes.
    let mut slow: Vec<TcpStream> = (0..20).map(|_| TcpStream::connect(("127.0.0.1", http)).unwrap()).collect();
    for s in &mut slow {
        s.write_all(b"GET /healthz HTTP/1.1\r\nX-Slow: ").unwrap();
        s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    }
    let start = Instant::now();
    let mut closed_at = vec![None; slow.len()];
    while closed_at.iter().any(Option::is_none) && start.elapsed() < Duration::from_secs(15) {
        for (i, s) in slow.iter_mut().enumerate() {
            if closed_at[i].is_some() {
                continue;
            }
            let _ = s.write_all(b"a");
            let closed = match s.read(&mut [0u8; 256]) {
                Ok(0) => true,
                Ok(_) => false,
                Err(e) => !matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut),
            };
            if closed {
                closed_at[i] = Some(start.elapsed());
            }
        }
        // Meanwhile a normal client is served at once.
        assert_eq!(status(&srv.url("/healthz"), ""), "200");
        std::thread::sleep(Duration::from_millis(300));
    }
    for (i, at) in closed_at.iter().enumerate() {
        let at = at.unwrap_or_else(|| panic!("slow client {i} was still connected after 15 s"));
        assert!(
            at >= Duration::from_millis(1500) && at < Duration::from_secs(6),
            "slow client {i} cut off after {at:?}"
        );
    }
    srv.await_stderr("limit http_header_timeout (2) hit:", Duration::from_secs(15));
}

#[test]
fn overlays_go_only_to_their_node() {
    let (work, store) = site("dhcp = \"off\"");
    let http = free_port();
    let srv = Server::start(work.path(), &store, &["--http-port", &http.to_string()], http);
    // n002 is at 127.0.0.2: it gets its own overlay, not n001's; 127.0.0.1 gets neither.
    assert_eq!(status(&srv.url(&format!("/overlay/{N002}")), "--interface 127.0.0.2"), "200");
    assert_eq!(status(&srv.url(&format!("/overlay/{N001}")), "--interface 127.0.0.2"), "403");
    assert_eq!(status(&srv.url(&format!("/overlay/{N002}")), ""), "403");
    let body = sh(&format!("curl -s --max-time 10 '{}'", srv.url(&format!("/overlay/{N001}"))));
    assert!(body.contains("served only to that node's address") && body.contains("overlay_allow"), "{body}");
    // Scripts and blobs are not secret: anyone may fetch them.
    assert_eq!(status(&srv.url(&format!("/ipxe/{N001}")), ""), "200");
    // A relayed site names the networks its requests come from.
    write_recipe(work.path(), "dhcp = \"off\"\noverlay_allow = [\"127.0.0.0/8\"]");
    sh(&format!("kill -HUP {}", srv.child.id()));
    let start = Instant::now();
    while status(&srv.url(&format!("/overlay/{N001}")), "") != "200" {
        assert!(start.elapsed() < Duration::from_secs(20), "the reload did not allow 127.0.0.0/8: {}", srv.stderr());
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn unknown_ignore_leaves_no_trace_and_record_records() {
    let (work, store) = site("dhcp = \"off\"\nunknown = \"ignore\"");
    let d = work.path();
    let state = d.join("state");
    let http = free_port();
    let srv =
        Server::start(d, &store, &["--http-port", &http.to_string(), "--state-dir", state.to_str().unwrap()], http);
    for _ in 0..5 {
        assert_eq!(status(&srv.url(&format!("/ipxe/{STRANGER}")), ""), "200");
    }
    // A known node's request, made after the strangers', shows the log is written.
    assert_eq!(status(&srv.url(&format!("/ipxe/{N001}")), ""), "200");
    let start = Instant::now();
    loop {
        let events = kiln_ok(d, &store, &["node", "events", "--state-dir", state.to_str().unwrap(), "--json"]);
        if events.contains(N001) {
            assert!(!events.contains(STRANGER), "unknown = \"ignore\" recorded an event: {events}");
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "n001's script was not logged: {events}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let unknown = kiln_ok(d, &store, &["node", "ls", "--unknown", "--state-dir", state.to_str().unwrap(), "--json"]);
    assert!(!unknown.contains(STRANGER), "unknown = \"ignore\" recorded a discovered machine: {unknown}");
    let log = fs::read_to_string(d.join("serve.log")).unwrap();
    assert!(!log.contains(STRANGER), "{log}");
    drop(srv);
    // The same with `record`: the stranger is discovered and its request logged.
    write_recipe(d, "dhcp = \"off\"\nunknown = \"record\"");
    let http = free_port();
    let srv =
        Server::start(d, &store, &["--http-port", &http.to_string(), "--state-dir", state.to_str().unwrap()], http);
    assert_eq!(status(&srv.url(&format!("/ipxe/{STRANGER}")), ""), "200");
    let start = Instant::now();
    while !kiln_ok(d, &store, &["node", "ls", "--unknown", "--state-dir", state.to_str().unwrap(), "--json"])
        .contains(STRANGER)
    {
        assert!(start.elapsed() < Duration::from_secs(10), "the stranger was not recorded");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_reload_that_changes_a_listener_is_refused() {
    let (work, store) = site("dhcp = \"off\"");
    let d = work.path();
    let http = free_port();
    let recipe = fs::read_to_string(d.join("kiln.toml")).unwrap();
    fs::write(d.join("kiln.toml"), recipe.replace("dhcp = \"off\"", &format!("dhcp = \"off\"\nhttp_port = {http}")))
        .unwrap();
    let srv = Server::start(d, &store, &[], http);
    let other = free_port();
    fs::write(d.join("kiln.toml"), recipe.replace("dhcp = \"off\"", &format!("dhcp = \"off\"\nhttp_port = {other}")))
        .unwrap();
    sh(&format!("kill -HUP {}", srv.child.id()));
    let err = srv.await_stderr("reload refused, restart needed", Duration::from_secs(20));
    assert!(err.contains(&format!("http_port {http} → {other}")), "{err}");
    // Still serving where it listens, nothing on the new port.
    assert_eq!(status(&srv.url("/healthz"), ""), "200");
    assert!(TcpStream::connect(("127.0.0.1", other)).is_err());
    // A reload that changes nothing it listens on is taken.
    fs::write(
        d.join("kiln.toml"),
        recipe.replace("dhcp = \"off\"", &format!("dhcp = \"off\"\nhttp_port = {http}\nlease_time = 600")),
    )
    .unwrap();
    sh(&format!("kill -HUP {}", srv.child.id()));
    let start = Instant::now();
    while !fs::read_to_string(d.join("serve.log")).unwrap().contains("kiln serve: reloaded") {
        assert!(start.elapsed() < Duration::from_secs(20), "the reload was not taken: {}", srv.stderr());
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn store_gc_names_the_server_instead_of_hanging() {
    let (work, store) = site("dhcp = \"off\"");
    let http = free_port();
    let srv = Server::start(work.path(), &store, &["--http-port", &http.to_string()], http);
    let out = Command::new("timeout")
        .args(["20", env!("CARGO_BIN_EXE_kiln"), "store", "gc"])
        .env("KILN_STORE", &store)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains(&format!("kiln serve (pid {})", srv.child.id())) && err.contains("--wait"), "{err}");
}

/// A PXE firmware's DHCPREQUEST to the proxyDHCP port.
fn pxe_request(mac: &str) -> Vec<u8> {
    let mac: kiln::net::Mac = mac.parse().unwrap();
    let z = Ipv4Addr::UNSPECIFIED;
    let mut msg = Message::new_with_id(0x4b49_4c4e, z, z, z, z, &mac.0);
    msg.set_opcode(Opcode::BootRequest);
    let opts = msg.opts_mut();
    opts.insert(DhcpOption::MessageType(MessageType::Request));
    opts.insert(DhcpOption::ClassIdentifier(b"PXEClient:Arch:00000:UNDI:002001".to_vec()));
    opts.insert(DhcpOption::ClientSystemArchitecture(dhcproto::v4::Architecture(0)));
    msg.to_vec().unwrap()
}

#[test]
fn after_a_tftp_flood_tftp_and_dhcp_still_answer() {
    if !have("curl") {
        eprintln!("skipped: curl is not installed (scripts/setup.sh installs it)");
        return;
    }
    let (work, store) = site("dhcp = \"proxy\"");
    let http = free_port();
    let dhcp = free_port();
    let srv = Server::start(
        work.path(),
        &store,
        &["--http-port", &http.to_string(), "--dhcp", "proxy", "--dhcp-port", &dhcp.to_string()],
        http,
    );
    // 2,000 read requests asking `timeout 255`, from 100 ports of one address, never acknowledged.
    let sockets: Vec<UdpSocket> = (0..100).map(|_| UdpSocket::bind("127.0.0.3:0").unwrap()).collect();
    let mut rrq = vec![0, 1];
    for part in ["undionly.kpxe", "octet", "timeout", "255", "blksize", "1468"] {
        rrq.extend_from_slice(part.as_bytes());
        rrq.push(0);
    }
    for i in 0..2000 {
        sockets[i % sockets.len()].send_to(&rrq, ("127.0.0.1", srv.tftp)).unwrap();
        if i % 100 == 99 {
            // Let the server take them in, as a host on a LAN would be paced by its link.
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    // A normal download from another address finishes within seconds, byte for byte.
    let got = work.path().join("got");
    let start = Instant::now();
    sh(&format!(
        "curl -s --max-time 10 --interface 127.0.0.2 --tftp-blksize 1468 -o '{}' tftp://127.0.0.1:{}/undionly.kpxe",
        got.display(),
        srv.tftp
    ));
    assert!(start.elapsed() < Duration::from_secs(10));
    assert_eq!(fs::read(&got).unwrap(), fs::read(work.path().join("undionly.kpxe")).unwrap());
    // A PXE client's proxyDHCP exchange is answered at once.
    let client = UdpSocket::bind("127.0.0.2:0").unwrap();
    client.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    client.send_to(&pxe_request(N001), ("127.0.0.1", 4011)).unwrap();
    let mut buf = [0u8; 1500];
    let (n, _) = client.recv_from(&mut buf).expect("no proxyDHCP answer within 5 s of the flood");
    let ack = Message::from_bytes(&buf[..n]).unwrap();
    assert_eq!(ack.opts().msg_type(), Some(MessageType::Ack));
    assert!(String::from_utf8_lossy(ack.fname().unwrap_or_default()).starts_with("undionly.kpxe"));
    srv.await_stderr("limit tftp_max_per_client (8) hit", Duration::from_secs(15));
}
