//! `GET /metrics` of a running `kiln serve` (loopback, DHCP off): Prometheus' own `promtool check metrics` accepts
//! it, and a real Prometheus server scrapes it and answers queries for kiln's metrics with the values the test
//! caused (one boot started and completed, one TFTP transfer, a blob download, a refused heartbeat).

mod common;

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::Value;

fn curl(args: &str) -> String {
    sh(&format!("curl -s {args}"))
}

/// A recipe with node n001 at 127.0.0.2 (an address the test can send heartbeats from), built.
fn site() -> (tempfile::TempDir, PathBuf) {
    let work = tempfile::tempdir().unwrap();
    let d = work.path();
    let store = d.join("store");
    fs::write(d.join("undionly.kpxe"), (0..100_000u32).map(|i| (i * 13 % 251) as u8).collect::<Vec<u8>>()).unwrap();
    fs::write(
        d.join("kiln.toml"),
        format!(
            r#"[image.tiny]
from = "oci:{}:latest"
cmdline = "console=ttyS0"

[server]
address = "127.0.0.1/8"
dhcp = "off"
heartbeat = 600

[server.boot_files]
bios = "{}"

[node.n001]
mac = "52:54:00:00:00:01"
image = "tiny"
ipv4 = "127.0.0.2"

[node.n002]
mac = "52:54:00:00:00:02"
image = "tiny"
ipv4 = "127.0.0.3"
"#,
            tiny().join("oci").display(),
            d.join("undionly.kpxe").display()
        ),
    )
    .unwrap();
    kiln_ok(d, &store, &["build", "--quiet"]);
    (work, store)
}

fn serve(dir: &Path, store: &Path, http: u16, tftp: u16) -> Running {
    let child = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["serve", "--http-port", &http.to_string(), "--tftp-port", &tftp.to_string()])
        .arg("--store")
        .arg(store)
        .current_dir(dir)
        .stdout(fs::File::create(dir.join("serve.log")).unwrap())
        .stderr(fs::File::create(dir.join("serve.err")).unwrap())
        .spawn()
        .unwrap();
    let up = poll(Duration::from_secs(20), || std::net::TcpStream::connect(("127.0.0.1", http)).ok());
    assert!(
        up.is_some(),
        "kiln serve did not listen: {}",
        fs::read_to_string(dir.join("serve.err")).unwrap_or_default()
    );
    Running(child)
}

/// The value of the sample `name` (with its labels, as written) in a text-format page.
fn sample(page: &str, name: &str) -> Option<f64> {
    page.lines().find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')).and_then(|v| v.parse().ok()))
}

#[test]
fn promtool_accepts_the_metrics_and_prometheus_scrapes_them() {
    for tool in ["promtool", "prometheus", "curl"] {
        assert!(have(tool), "{tool} is needed: run scripts/setup.sh");
    }
    let (work, store) = site();
    let d = work.path();
    let (http, tftp) = (free_port(), free_port());
    let _server = serve(d, &store, http, tftp);
    let base = format!("http://127.0.0.1:{http}");

    // One boot: the script, a bundle file, the firmware over TFTP, and the agent's first heartbeat.
    let script = curl(&format!("{base}/ipxe/52:54:00:00:00:01"));
    let kernel = script.split_whitespace().find(|w| w.contains("/blob/sha256/")).expect("a kernel URL").to_string();
    let got = curl(&format!("-o /dev/null -w '%{{size_download}}' '{kernel}'"));
    let kernel_size: u64 = got.parse().unwrap();
    assert!(kernel_size > 1_000_000, "{got}");
    curl(&format!("-o '{}' tftp://127.0.0.1:{tftp}/undionly.kpxe", d.join("fw").display()));
    assert_eq!(fs::metadata(d.join("fw")).unwrap().len(), 100_000);
    let body = d.join("beat.json");
    fs::write(&body, r#"{"event":"up","uptime":30,"load":[0.5,0.3,0.1],"mem_total":8589934592,"mem_available":6442450944,"kernel":"6.1.0-28-amd64","image":"","boot_id":"0b1c","agent":"0.1.0"}"#).unwrap();
    let beat = |from: &str| {
        curl(&format!(
            "-o /dev/null -w '%{{http_code}}' --interface {from} -X POST --data-binary @'{}' {base}/heartbeat/52:54:00:00:00:01",
            body.display()
        ))
    };
    assert_eq!(beat("127.0.0.2"), "200");
    assert_eq!(beat("127.0.0.3"), "403", "from n002's address");

    let page = curl(&format!("{base}/metrics"));
    let expect = [
        ("kiln_build_info{version=\"0.1.0\"}", 1.0),
        ("kiln_boots_started_total", 1.0),
        ("kiln_boots_completed_total", 1.0),
        ("kiln_nodes{state=\"up\"}", 1.0),
        ("kiln_nodes{state=\"off\"}", 1.0),
        ("kiln_tftp_transfers_total{result=\"ok\"}", 1.0),
        ("kiln_tftp_sent_bytes_total", 100_000.0),
        ("kiln_http_transfers_total{result=\"ok\"}", 1.0),
        ("kiln_http_sent_bytes_total{route=\"blob\"}", kernel_size as f64),
        ("kiln_http_requests_total{route=\"heartbeat\",code=\"4xx\"}", 1.0),
        ("kiln_limit_refused_total{limit=\"heartbeat_foreign\"}", 1.0),
        ("kiln_dhcp_packets_total{type=\"discover\",result=\"offer\"}", 0.0),
        ("kiln_heartbeat_interval_seconds", 600.0),
    ];
    for (name, value) in expect {
        assert_eq!(sample(&page, name), Some(value), "{name} in:\n{page}");
    }

    // Prometheus' own linter.
    let mut check = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    check.stdin.take().unwrap().write_all(page.as_bytes()).unwrap();
    let checked = check.wait_with_output().unwrap();
    let said = format!("{}{}", String::from_utf8_lossy(&checked.stdout), String::from_utf8_lossy(&checked.stderr));
    assert!(checked.status.success() && said.trim().is_empty(), "promtool check metrics: {said}");

    // A real Prometheus server scraping kiln serve.
    let prom_port = free_port();
    let config = d.join("prometheus.yml");
    fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n  - job_name: kiln\n    \
             static_configs:\n      - targets: ['127.0.0.1:{http}']\n"
        ),
    )
    .unwrap();
    let prom_log = d.join("prometheus.log");
    let _prometheus = Running(
        Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", d.join("tsdb").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"))
            .stdout(Stdio::null())
            .stderr(fs::File::create(&prom_log).unwrap())
            .spawn()
            .expect("starting prometheus"),
    );
    let api = format!("http://127.0.0.1:{prom_port}");
    let query = |expr: &str| -> Option<f64> {
        let out = Command::new("curl")
            .args(["-s", "-G", &format!("{api}/api/v1/query"), "--data-urlencode"])
            .arg(format!("query={expr}"))
            .output()
            .ok()?;
        let answer: Value = serde_json::from_slice(&out.stdout).ok()?;
        answer["data"]["result"][0]["value"][1].as_str()?.parse().ok()
    };
    let scraped = poll(Duration::from_secs(60), || query("up{job=\"kiln\"}").filter(|v| *v == 1.0));
    assert!(
        scraped.is_some(),
        "Prometheus did not scrape kiln serve:\n{}",
        fs::read_to_string(&prom_log).unwrap_or_default()
    );
    for (expr, value) in [
        ("kiln_boots_started_total{job=\"kiln\"}", 1.0),
        ("kiln_boots_completed_total{job=\"kiln\"}", 1.0),
        ("kiln_nodes{job=\"kiln\",state=\"up\"}", 1.0),
        ("kiln_tftp_sent_bytes_total{job=\"kiln\"}", 100_000.0),
        ("sum(kiln_limit_refused_total{job=\"kiln\"})", 1.0),
    ] {
        assert_eq!(poll(Duration::from_secs(20), || query(expr)), Some(value), "{expr}");
    }
}
