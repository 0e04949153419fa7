//! The status page (`GET /`) of a running `kiln serve`, loaded in headless Chromium: the DOM lists every node with
//! its state (one up, one booting, one lost, one off), the boot events and the server; a screenshot is saved
//! (docs/status-page.png is one).

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::Value;

/// Four nodes at 127.0.0.11-14 (addresses the test can send heartbeats from), built.
fn site() -> (tempfile::TempDir, PathBuf) {
    let work = tempfile::tempdir().unwrap();
    let d = work.path();
    let store = d.join("store");
    let mut recipe = format!(
        r#"[image.compute]
from = "oci:{}:latest"
cmdline = "console=ttyS0"

[server]
address = "127.0.0.1/8"
dhcp = "off"
heartbeat = 2
"#,
        tiny().join("oci").display()
    );
    for i in 1..=4 {
        recipe.push_str(&format!(
            "\n[node.n00{i}]\nmac = \"52:54:00:00:00:0{i}\"\nimage = \"compute\"\nipv4 = \"127.0.0.1{i}\"\n"
        ));
    }
    fs::write(d.join("kiln.toml"), recipe).unwrap();
    kiln_ok(d, &store, &["build", "--quiet"]);
    (work, store)
}

fn status(dir: &Path, store: &Path) -> Vec<Value> {
    serde_json::from_str(&kiln_ok(dir, store, &["node", "status", "--json"])).unwrap()
}

#[test]
fn the_status_page_lists_the_nodes_in_headless_chromium() {
    assert!(have("chromium"), "chromium is needed: run scripts/setup.sh");
    let (work, store) = site();
    let d = work.path();
    let http = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["serve", "--http-port", &http.to_string(), "--tftp-port", &free_port().to_string()])
        .arg("--store")
        .arg(&store)
        .current_dir(d)
        .stdout(fs::File::create(d.join("serve.log")).unwrap())
        .stderr(fs::File::create(d.join("serve.err")).unwrap())
        .spawn()
        .unwrap();
    let _server = Running(child);
    let base = format!("http://127.0.0.1:{http}");
    assert!(poll(Duration::from_secs(20), || std::net::TcpStream::connect(("127.0.0.1", http)).ok()).is_some());

    let image = fs::canonicalize(store.join("roots/image-compute")).unwrap().join("image");
    let digest = format!("sha256:{}", sha256_hex(&image));
    let beat = |i: u32, uptime: u32, load: f64| {
        let body = format!(
            r#"{{"event":"up","uptime":{uptime},"load":[{load},{},{}],"mem_total":8589934592,"mem_available":{},"kernel":"6.1.0-28-amd64","image":"{digest}","boot_id":"b00{i}","agent":"0.1.0"}}"#,
            load / 2.0,
            load / 4.0,
            6_000_000_000u64 - u64::from(i) * 700_000_000
        );
        let code = sh(&format!(
            "curl -s -o /dev/null -w '%{{http_code}}' --interface 127.0.0.1{i} -X POST --data-binary '{body}' \
             {base}/heartbeat/52:54:00:00:00:0{i}"
        ));
        assert_eq!(code, "200");
    };
    // n003 booted and went silent; n002 is booting (its script and kernel fetched); n001 is up; n004 never came.
    for path in ["/ipxe/52:54:00:00:00:03", "/ipxe/52:54:00:00:00:01"] {
        sh(&format!("curl -s -o /dev/null --interface 127.0.0.1 {base}{path}"));
    }
    beat(3, 3620, 3.91);
    let lost = poll(Duration::from_secs(15), || {
        let rows = status(d, &store);
        rows.iter().any(|r| r["node"] == "n003" && r["state"] == "lost").then_some(())
    });
    assert!(lost.is_some(), "n003 did not turn lost");
    let script = sh(&format!("curl -s {base}/ipxe/52:54:00:00:00:02"));
    let kernel = script.split_whitespace().find(|w| w.contains("/blob/sha256/")).unwrap().to_string();
    sh(&format!("curl -s -o /dev/null --interface 127.0.0.12 '{kernel}'"));
    beat(1, 9_784, 0.42);
    // n001 keeps reporting, as its agent would, while Chromium (slow to start on a busy machine) loads the page.
    let done = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| {
        scope.spawn(|| {
            let mut uptime = 9_784;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                std::thread::sleep(Duration::from_secs(1));
                uptime += 1;
                beat(1, uptime, 0.42);
            }
        });
        let checked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check_page(d, &base)));
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        checked.unwrap_or_else(|e| std::panic::resume_unwind(e));
    });
}

/// Loads the page in headless Chromium, checks its DOM and saves a screenshot.
fn check_page(d: &Path, base: &str) {
    let profile = d.join("chromium");
    let chromium = |extra: &[&str]| {
        let out = Command::new("chromium")
            .args(["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run"])
            .arg(format!("--user-data-dir={}", profile.display()))
            .args(extra)
            .arg(format!("{base}/"))
            .stdin(Stdio::null())
            .output()
            .expect("running chromium");
        assert!(out.status.success(), "chromium failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let dom = chromium(&["--dump-dom"]);
    for (node, state) in [("n001", "up"), ("n002", "booting"), ("n003", "lost"), ("n004", "off")] {
        assert!(
            dom.contains(&format!("<tr data-node=\"{node}\" data-state=\"{state}\">")),
            "{node} {state} not in:\n{dom}"
        );
    }
    assert!(dom.contains("<table id=\"events\">") && dom.contains("<td>script</td>"), "{dom}");
    assert!(dom.contains("<dl id=\"server\">") && dom.contains("http://127.0.0.1:"), "{dom}");
    assert!(dom.contains("2 h 43 min") && dom.contains("6.1.0-28-amd64"), "n001's uptime and kernel: {dom}");
    assert!(!dom.contains("<script"), "the page needs no JavaScript");

    let shot = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("status-page.png");
    let _ = fs::remove_file(&shot);
    chromium(&["--window-size=1640,800", &format!("--screenshot={}", shot.display())]);
    let png = fs::read(&shot).expect("no screenshot");
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 10_000, "not a screenshot");
    eprintln!("screenshot: {}", shot.display());
}
