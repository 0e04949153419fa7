//! `kiln serve` on loopback with DHCP off: HTTP and TFTP with real clients (curl), bad requests,
//! reload on SIGHUP, stop on SIGTERM, and configuration errors.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

struct Server {
    child: Child,
    log: PathBuf,
    http: u16,
    tftp: u16,
}

impl Server {
    fn start(dir: &Path, store: &Path) -> Server {
        let (http, tftp) = (free_port(), free_port());
        let log = dir.join("serve.log");
        let child = Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(["serve", "--dhcp", "off", "--http-port", &http.to_string(), "--tftp-port", &tftp.to_string()])
            .arg("--store")
            .arg(store)
            .current_dir(dir)
            .stdout(fs::File::create(&log).unwrap())
            .stderr(fs::File::create(dir.join("serve.err")).unwrap())
            .spawn()
            .unwrap();
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", http)).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "kiln serve did not listen: {}",
                fs::read_to_string(dir.join("serve.err")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Server { child, log, http, tftp }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.http)
    }

    fn signal(&self, sig: &str) {
        sh(&format!("kill -{sig} {}", self.child.id()));
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn site() -> (tempfile::TempDir, PathBuf) {
    let work = tempfile::tempdir().unwrap();
    let d = work.path();
    let store = d.join("store");
    fs::write(
        d.join("kiln.toml"),
        format!(
            r#"[image.tiny]
from = "oci:{}:latest"
cmdline = "console=ttyS0"
overlay = "overlay-tiny"

[server]
address = "127.0.0.1/8"
dhcp = "off"
# The tests fetch overlays from 127.0.0.1, not from each node's own address.
overlay_allow = ["127.0.0.0/8"]

[server.boot_files]
bios = "{}"

[node.n001]
mac = "52:54:00:00:00:01"
image = "tiny"
ipv4 = "10.9.0.11"
"#,
            tiny().join("oci").display(),
            d.join("undionly.kpxe").display()
        ),
    )
    .unwrap();
    fs::create_dir_all(d.join("overlay-tiny/etc")).unwrap();
    fs::write(d.join("overlay-tiny/etc/motd"), "welcome to {{node}} ({{ipv4}}/{{prefix}})\n").unwrap();
    // A stand-in firmware file of a few TFTP blocks.
    fs::write(d.join("undionly.kpxe"), (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect::<Vec<u8>>()).unwrap();
    kiln_ok(d, &store, &["build", "--quiet"]);
    (work, store)
}

/// `f()` once it is `Some`, trying for up to 10 s.
fn poll<T>(mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(10) {
        if let Some(v) = f() {
            return Some(v);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    None
}

fn curl(args: &str) -> String {
    sh(&format!("curl -s {args}"))
}

#[test]
fn http_and_tftp_serve_the_site_to_real_clients() {
    let (work, store) = site();
    let d = work.path();
    let srv = Server::start(d, &store);
    assert_eq!(curl(&srv.url("/healthz")), "ok\n");

    let script = curl(&srv.url("/ipxe/52%3A54%3A00%3A00%3A00%3A01"));
    assert!(
        script.starts_with("#!ipxe\n") && script.contains("initrd=initramfs initrd=image initrd=overlay"),
        "{script}"
    );
    let bundle = fs::canonicalize(store.join("roots/image-tiny")).unwrap();
    let image_hex = sha256_hex(&bundle.join("image"));
    assert!(script.contains(&format!("/blob/sha256/{image_hex}")), "{script}");

    // Whole blob, a range, a suffix range, an unsatisfiable range, a conditional request, HEAD.
    let got = d.join("image.got");
    curl(&format!("-o '{}' '{}'", got.display(), srv.url(&format!("/blob/sha256/{image_hex}"))));
    assert_eq!(sha256_hex(&got), image_hex);
    let size = fs::metadata(bundle.join("image")).unwrap().len();
    let head = curl(&format!("-D - -o /dev/null -r 10-19 '{}'", srv.url(&format!("/blob/sha256/{image_hex}"))));
    assert!(head.starts_with("HTTP/1.1 206") && head.contains(&format!("Content-Range: bytes 10-19/{size}")), "{head}");
    let part = curl(&format!("-r 10-19 '{}' | od -An -tx1", srv.url(&format!("/blob/sha256/{image_hex}"))));
    let want =
        sh(&format!("dd if='{}' bs=1 skip=10 count=10 status=none | od -An -tx1", bundle.join("image").display()));
    assert_eq!(part, want);
    let suffix = curl(&format!("-D - -o /dev/null -r -100 '{}'", srv.url(&format!("/blob/sha256/{image_hex}"))));
    assert!(suffix.contains(&format!("bytes {}-{}/{size}", size - 100, size - 1)), "{suffix}");
    let bad_range = curl(&format!(
        "-o /dev/null -w '%{{http_code}}' -r {size}- '{}'",
        srv.url(&format!("/blob/sha256/{image_hex}"))
    ));
    assert_eq!(bad_range, "416");
    let etag = format!("\"sha256:{image_hex}\"");
    let cond = curl(&format!(
        "-o /dev/null -w '%{{http_code}}' -H 'If-None-Match: {etag}' '{}'",
        srv.url(&format!("/blob/sha256/{image_hex}"))
    ));
    assert_eq!(cond, "304");
    let head = curl(&format!("-I '{}'", srv.url(&format!("/blob/sha256/{image_hex}"))));
    assert!(
        head.contains(&format!("ETag: {etag}"))
            && head.contains("immutable")
            && head.contains(&format!("Content-Length: {size}")),
        "{head}"
    );

    // The overlay carries the node's hostname.
    let overlay = curl(&format!(
        "'{}' | gzip -dc | cpio -i --quiet --to-stdout etc/hostname",
        srv.url("/overlay/52:54:00:00:00:01")
    ));
    assert_eq!(overlay, "n001\n");
    let motd =
        curl(&format!("'{}' | gzip -dc | cpio -i --quiet --to-stdout etc/motd", srv.url("/overlay/52:54:00:00:00:01")));
    assert_eq!(motd, "welcome to n001 (10.9.0.11/8)\n", "the admin's template was not rendered");

    // TFTP: the firmware file, byte for byte; nothing outside the served set.
    let fw = d.join("fw.got");
    sh(&format!("curl -s --tftp-blksize 1468 -o '{}' tftp://127.0.0.1:{}/undionly.kpxe", fw.display(), srv.tftp));
    assert_eq!(sha256_hex(&fw), sha256_hex(&d.join("undionly.kpxe")));
    // The same file over HTTP, as UEFI HTTP boot clients fetch it.
    let fw_http = d.join("fw-http.got");
    curl(&format!("-o '{}' '{}'", fw_http.display(), srv.url("/undionly.kpxe")));
    assert_eq!(sha256_hex(&fw_http), sha256_hex(&d.join("undionly.kpxe")));
    for evil in ["../../etc/shadow", "/etc/shadow", "kiln.toml"] {
        let out = Command::new("curl")
            .args(["-s", "-o", "-", &format!("tftp://127.0.0.1:{}/{evil}", srv.tftp)])
            .output()
            .unwrap();
        assert!(!out.status.success() && out.stdout.is_empty(), "TFTP served {evil}");
    }

    // The boot log, read while the server runs (it holds the database; the CLI asks it over its socket):
    // the script and overlay name the MAC; blob downloads and TFTP come from the address that asked for
    // n001's script, so they are n001's too.
    // (The last TFTP event is recorded when the server sees curl's last ACK: wait for it, boundedly.)
    let events = poll(|| {
        let out = kiln_ok(d, &store, &["node", "events", "--mac", "n001", "--json"]);
        out.contains("undionly.kpxe").then_some(out)
    })
    .expect("no TFTP event for n001");
    let events: Vec<serde_json::Value> = serde_json::from_str(&events).unwrap();
    let kinds: Vec<(&str, &str)> =
        events.iter().map(|e| (e["kind"].as_str().unwrap(), e["detail"].as_str().unwrap())).collect();
    assert!(events.iter().all(|e| e["mac"] == "52:54:00:00:00:01"), "{events:?}");
    assert_eq!(kinds[0], ("script", "n001"), "{kinds:?}");
    let whole = format!("tiny/image {size} bytes in ");
    assert!(kinds.iter().any(|(k, d)| *k == "blob" && d.starts_with(&whole)), "{kinds:?}");
    assert!(kinds.iter().any(|(k, d)| *k == "blob" && d.starts_with("tiny/image 10 bytes")), "the range: {kinds:?}");
    assert!(kinds.iter().any(|(k, d)| *k == "overlay" && d.ends_with(" bytes")), "{kinds:?}");
    assert!(kinds.iter().any(|(k, d)| *k == "tftp" && d.starts_with("undionly.kpxe ")), "{kinds:?}");
    let text = kiln_ok(d, &store, &["node", "events"]);
    assert!(text.lines().any(|l| l.contains("52:54:00:00:00:01 n001") && l.contains("blob")), "{text}");
    let log = fs::read_to_string(&srv.log).unwrap();
    assert!(log.contains("n001 blob tiny/image"), "{log}");
    let err = kiln_err(d, &store, &["node", "events", "--mac", "n999"]);
    assert!(err.contains("neither a MAC address nor a node"), "{err}");

    // One MAC parser everywhere: the spellings the recipe accepts name the same machine on the command line
    // (`--mac 525400000001` was refused before) and in URLs.
    let by_name = kiln_ok(d, &store, &["node", "events", "--mac", "n001", "--json", "--limit", "5"]);
    for spelling in ["52:54:00:00:00:01", "52-54-00-00-00-01", "525400000001", "5254.0000.0001"] {
        let got = kiln_ok(d, &store, &["node", "events", "--mac", spelling, "--json", "--limit", "5"]);
        assert_eq!(got, by_name, "--mac {spelling}");
    }
    let script = curl(&format!("'{}'", srv.url("/ipxe/52:54:00:00:00:01")));
    for spelling in ["525400000001", "52-54-00-00-00-01"] {
        assert_eq!(curl(&format!("'{}'", srv.url(&format!("/ipxe/{spelling}")))), script, "/ipxe/{spelling}");
    }
    let err = kiln_err(d, &store, &["node", "events", "--mac", "52:54:00:00:00"]);
    assert!(err.contains("neither a MAC address nor a node"), "{err}");
}

#[test]
fn bad_requests_get_errors_and_the_server_keeps_serving() {
    let (work, store) = site();
    let srv = Server::start(work.path(), &store);
    let code = |args: &str| curl(&format!("-o /dev/null -w '%{{http_code}}' {args}"));
    assert_eq!(code(&format!("--path-as-is '{}'", srv.url("/blob/sha256/../../etc/passwd"))), "400");
    assert_eq!(code(&format!("'{}'", srv.url(&format!("/blob/sha256/{}", "0".repeat(64))))), "404");
    assert_eq!(code(&format!("'{}'", srv.url("/blob/sha256/ABCDEF"))), "400");
    assert_eq!(code(&format!("'{}'", srv.url("/ipxe/not-a-mac"))), "400");
    assert_eq!(code(&format!("'{}'", srv.url("/overlay/52:54:00:00:00:99"))), "404");
    assert_eq!(code(&format!("-X POST -d x '{}'", srv.url("/ipxe/52:54:00:00:00:01"))), "405");
    assert_eq!(code(&format!("'{}'", srv.url("/etc/passwd"))), "404");
    // Garbage on the socket, then a normal request still works.
    sh(&format!(
        "printf '\\x00\\x01\\x02garbage\\r\\n\\r\\n' | timeout 5 bash -c 'cat > /dev/tcp/127.0.0.1/{}' || true",
        srv.http
    ));
    sh(&format!("head -c 20000 /dev/urandom | timeout 5 bash -c 'cat > /dev/tcp/127.0.0.1/{}' || true", srv.http));
    assert_eq!(curl(&srv.url("/healthz")), "ok\n");
    // An unknown machine is told to wait, and recorded.
    let script = curl(&srv.url("/ipxe/52:54:00:00:00:77"));
    assert!(script.contains("not a known node") && script.contains("reboot"), "{script}");
    // (Recorded by the server's event loop just after the answer: wait for it, boundedly.)
    let unknown = poll(|| {
        let out = kiln_ok(work.path(), &store, &["node", "ls", "--unknown", "--json"]);
        out.contains("52:54:00:00:00:77").then_some(out)
    });
    assert!(unknown.is_some(), "not listed while the server runs");
    // Garbage on the control socket gets an error answer; the server keeps answering.
    let socket = store.join("state/kiln.sock");
    let answer = {
        use std::io::{BufRead, Write};
        let mut stream = std::os::unix::net::UnixStream::connect(&socket).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        stream.write_all(b"garbage\n").unwrap();
        let mut line = String::new();
        std::io::BufReader::new(stream).read_line(&mut line).unwrap();
        line
    };
    assert!(answer.contains("\"ok\":false") && answer.contains("not a query"), "{answer}");
    assert_eq!(curl(&srv.url("/healthz")), "ok\n");
    let unknown = kiln_ok(work.path(), &store, &["node", "ls", "--unknown", "--json"]);
    assert!(unknown.contains("52:54:00:00:00:77"), "{unknown}");
}

#[test]
fn reload_on_sighup_and_stop_on_sigterm() {
    let (work, store) = site();
    let d = work.path();
    let mut srv = Server::start(d, &store);
    let unknown = curl(&srv.url("/ipxe/52:54:00:00:00:02"));
    assert!(unknown.contains("not a known node"));
    let out = kiln(
        d,
        &store,
        &["node", "add", "n002", "--mac", "52:54:00:00:00:02", "--image", "tiny", "--ipv4", "10.9.0.12"],
    );
    assert!(out.status.success());
    // A bad edit is refused by kiln node and leaves the file alone.
    let before = fs::read_to_string(d.join("kiln.toml")).unwrap();
    let err = kiln_err(d, &store, &["node", "add", "n003", "--mac", "52:54:00:00:00:02", "--image", "tiny"]);
    assert!(err.contains("also used by [node.n002]"), "{err}");
    assert_eq!(fs::read_to_string(d.join("kiln.toml")).unwrap(), before);
    srv.signal("HUP");
    let start = Instant::now();
    loop {
        let s = curl(&srv.url("/ipxe/52:54:00:00:00:02"));
        if s.contains("booting n002") {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "reload did not take effect: {s}");
        std::thread::sleep(Duration::from_millis(100));
    }
    // A broken recipe on reload keeps the running configuration.
    fs::write(d.join("kiln.toml"), format!("{before}\n[node.broken]\nmac = \"zz\"\n")).unwrap();
    srv.signal("HUP");
    std::thread::sleep(Duration::from_millis(500));
    assert!(curl(&srv.url("/ipxe/52:54:00:00:00:01")).contains("booting n001"));
    srv.signal("TERM");
    let start = Instant::now();
    let status = loop {
        if let Some(st) = srv.child.try_wait().unwrap() {
            break st;
        }
        // Stopping waits for nothing but running transfers (none here): well under the 6 s grace period.
        assert!(start.elapsed() < Duration::from_secs(3), "kiln serve did not stop on SIGTERM within 3 s");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success());
    let log = fs::read_to_string(&srv.log).unwrap();
    assert!(log.contains("reloaded") && log.contains("stopped"), "{log}");
    let err = fs::read_to_string(d.join("serve.err")).unwrap();
    assert!(err.contains("reload failed") && err.contains("mac"), "{err}");
    // The machine asked before it was a node: it was recorded, and shows as unknown once it is
    // no longer a node.
    fs::write(d.join("kiln.toml"), &before).unwrap();
    let unknown = kiln_ok(d, &store, &["node", "ls", "--unknown", "--json"]);
    assert!(!unknown.contains("52:54:00:00:00:02"), "n002 is a node, not unknown: {unknown}");
    kiln_ok(d, &store, &["node", "rm", "n002"]);
    let unknown = kiln_ok(d, &store, &["node", "ls", "--unknown", "--json"]);
    assert!(unknown.contains("52:54:00:00:00:02"), "the machine that asked was not recorded: {unknown}");
    let nodes = kiln_ok(d, &store, &["node", "ls", "--json"]);
    assert!(nodes.contains("\"n001\"") && !nodes.contains("n002"), "{nodes}");
}

#[test]
fn configuration_errors_are_named_before_serving() {
    let (work, store) = site();
    let d = work.path();
    let text = fs::read_to_string(d.join("kiln.toml")).unwrap();
    fs::write(d.join("kiln.toml"), text.replace("image = \"tiny\"\nipv4", "image = \"missing\"\nipv4")).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args([
            "serve",
            "--dhcp",
            "off",
            "--http-port",
            &free_port().to_string(),
            "--tftp-port",
            &free_port().to_string(),
        ])
        .arg("--store")
        .arg(&store)
        .current_dir(d)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("[node.n001]") && err.contains("\"missing\"") && err.contains("[image.missing]"), "{err}");
    fs::write(d.join("overlay-tiny/etc/motd"), "{{nonsense}}").unwrap();
    fs::write(d.join("kiln.toml"), &text).unwrap();
    let err = kiln_err(d, &store, &["serve", "--dhcp", "off", "--http-port", "0", "--tftp-port", "0"]);
    assert!(err.contains("etc/motd") && err.contains("{{nonsense}}"), "{err}");
    fs::write(d.join("kiln.toml"), text.replace("[server]\n", "[server]\nmystery = 1\n")).unwrap();
    let err = kiln_err(d, &store, &["serve"]);
    assert!(err.contains("mystery") && err.contains("line"), "{err}");
    // A boot file whose directory's manifest lists it (as the appliance carries them) is checked against it.
    fs::write(d.join("kiln.toml"), &text).unwrap();
    fs::write(d.join("overlay-tiny/etc/motd"), "hello\n").unwrap();
    let listed = format!(
        r#"{{"files": {{"undionly.kpxe": {{"sha256": "{}", "size": 1}}}}}}"#,
        sha256_hex(&d.join("undionly.kpxe"))
    );
    fs::write(d.join("manifest.json"), listed).unwrap();
    let err = kiln_err(d, &store, &["serve", "--dhcp", "off", "--http-port", "0", "--tftp-port", "0"]);
    assert!(err.contains("undionly.kpxe: content changed") && err.contains("manifest.json says"), "{err}");
    // A tampered bundle file is refused too.
    fs::remove_file(d.join("manifest.json")).unwrap();
    let bundle = fs::canonicalize(store.join("roots/image-tiny")).unwrap();
    let mut bytes = fs::read(bundle.join("kernel")).unwrap();
    bytes[100] ^= 1;
    fs::write(bundle.join("kernel"), bytes).unwrap();
    let err = kiln_err(d, &store, &["serve", "--dhcp", "off", "--http-port", "0", "--tftp-port", "0"]);
    assert!(err.contains("kernel: content changed") && err.contains("kiln build"), "{err}");
}
