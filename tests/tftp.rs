//! The TFTP server, run in-process on 127.0.0.1, against real clients: curl, atftp (windowsize) and
//! scripts/bench/tftp-client.py (options, loss, strangers). Needs `curl` and `atftp` (Debian: `apt-get install
//! curl atftp`) and python3.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln::serve::limits::Limits;
use kiln::serve::tftp::{serve, ErrorCode, Packet, TftpConfig, TftpEvent, TftpFiles, READ_ONLY_MESSAGE};
use sha2::{Digest, Sha256};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot, watch};

const MIB: usize = 1024 * 1024;

struct Server {
    addr: SocketAddr,
    dir: tempfile::TempDir,
    config: watch::Sender<Arc<TftpConfig>>,
    events: mpsc::Receiver<TftpEvent>,
    limits: Limits,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Server {
    /// Serves `dir/root` as the root and `boot.efi` (a 3000-byte file outside it) by name.
    async fn start(tune: impl FnOnce(&mut TftpConfig)) -> Server {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("root")).unwrap();
        write_file(&dir.path().join("boot.efi"), 3000, 1);
        let mut config = TftpConfig {
            files: TftpFiles {
                named: BTreeMap::from([("boot.efi".to_string(), dir.path().join("boot.efi"))]),
                root: Some(dir.path().join("root")),
            },
            timeout: Duration::from_millis(300),
            ..TftpConfig::default()
        };
        tune(&mut config);
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        let (config, config_rx) = watch::channel(Arc::new(config));
        let (events_tx, events) = mpsc::channel(64);
        let limits = Limits::default();
        let (stop, stop_rx) = oneshot::channel::<()>();
        let task = tokio::spawn(serve(socket, config_rx, Some(events_tx), limits.clone(), async move {
            let _ = stop_rx.await;
        }));
        Server { addr, dir, config, events, limits, stop: Some(stop), task }
    }

    fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    /// Writes a file of `len` pseudo-random bytes under the root and returns its sha256.
    fn add(&self, name: &str, len: usize) -> String {
        write_file(&self.root().join(name), len, len as u64)
    }

    fn url(&self, name: &str) -> String {
        format!("tftp://{}/{name}", self.addr)
    }

    /// The next event other than `Started`, within 20 s.
    async fn outcome(&mut self) -> TftpEvent {
        loop {
            let event = tokio::time::timeout(Duration::from_secs(20), self.events.recv())
                .await
                .expect("no TFTP event within 20 s")
                .expect("event channel closed");
            if !matches!(event, TftpEvent::Started { .. }) {
                return event;
            }
        }
    }

    async fn stop(mut self) {
        self.stop.take().unwrap().send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("serve did not return after shutdown")
            .unwrap()
            .unwrap();
    }
}

fn write_file(path: &Path, len: usize, seed: u64) -> String {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut bytes = Vec::with_capacity(len + 8);
    while bytes.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        bytes.extend_from_slice(&state.to_le_bytes());
    }
    bytes.truncate(len);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, &bytes).unwrap();
    sha256(&bytes)
}

fn sha256(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn sha256_file(path: &Path) -> String {
    sha256(&std::fs::read(path).unwrap_or_default())
}

/// Runs a client with a time limit; returns (success, stdout, stderr) and prints all of it, with the command.
async fn run(program: &str, args: &[&str]) -> (bool, String, String) {
    let mut command = tokio::process::Command::new(program);
    command.args(args).kill_on_drop(true);
    let shown = format!("{program} {}", args.join(" "));
    let output = tokio::time::timeout(Duration::from_secs(120), command.output())
        .await
        .unwrap_or_else(|_| panic!("{shown}: no answer within 120 s"))
        .unwrap_or_else(|e| panic!("{shown}: {e} (install it: apt-get install curl atftp python3)"));
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    eprintln!("$ {shown}\n-> {}\nstdout: {stdout}\nstderr: {stderr}", output.status);
    (output.status.success(), stdout, stderr)
}

async fn curl(server: &Server, name: &str, out: &Path, extra: &[&str]) -> bool {
    let url = server.url(name);
    let mut args = vec!["-sS", "--max-time", "100", "--path-as-is", "-o", out.to_str().unwrap()];
    args.extend_from_slice(extra);
    args.push(&url);
    run("curl", &args).await.0
}

/// Runs scripts/bench/tftp-client.py and returns its JSON report.
async fn py_client(server: &Server, name: &str, extra: &[&str]) -> serde_json::Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/bench/tftp-client.py");
    let port = server.addr.port().to_string();
    let mut args = vec![script.to_str().unwrap(), "127.0.0.1", &port, name];
    args.extend_from_slice(extra);
    let (_, stdout, _) = run("python3", &args).await;
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("client report {stdout:?}: {e}"))
}

fn assert_finished(event: TftpEvent, len: usize) {
    match event {
        TftpEvent::Finished { bytes, .. } => assert_eq!(bytes, len as u64),
        other => panic!("expected a finished transfer, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_reads_small_and_named_files() {
    let mut server = Server::start(|_| {}).await;
    let want = server.add("ipxe/undionly.kpxe", 81_234);
    let out = server.dir.path().join("out");
    assert!(curl(&server, "ipxe/undionly.kpxe", &out, &[]).await);
    assert_eq!(sha256_file(&out), want);
    assert_finished(server.outcome().await, 81_234);

    // By name from the map, with a leading slash, and with curl's plain RFC 1350 (no options, so no OACK).
    let want = sha256_file(&server.dir.path().join("boot.efi"));
    assert!(curl(&server, "/boot.efi", &out, &["--tftp-no-options"]).await);
    assert_eq!(sha256_file(&out), want);
    assert_finished(server.outcome().await, 3000);

    // Exactly one block, then the empty block that ends it; and an empty file.
    let want = server.add("exact", 512);
    assert!(curl(&server, "exact", &out, &["--tftp-no-options"]).await);
    assert_eq!(sha256_file(&out), want);
    // curl refuses "tsize 0" in an OACK, so it reads the empty file without options.
    server.add("empty", 0);
    assert!(curl(&server, "empty", &out, &["--tftp-no-options"]).await);
    assert_eq!(std::fs::metadata(&out).unwrap().len(), 0);
    let report = py_client(&server, "empty", &["--tsize"]).await;
    assert_eq!((&report["ok"], &report["oack"]["tsize"]), (&true.into(), &"0".into()), "{report}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn atftp_reads_5_mib_with_windowsize_16() {
    let mut server = Server::start(|_| {}).await;
    let want = server.add("kernel", 5 * MIB);
    let out = server.dir.path().join("out");
    let port = server.addr.port().to_string();
    let (ok, _, _) = run(
        "atftp",
        &[
            "--option",
            "blksize 1468",
            "--option",
            "windowsize 16",
            "-g",
            "-r",
            "kernel",
            "-l",
            out.to_str().unwrap(),
            "127.0.0.1",
            &port,
        ],
    )
    .await;
    assert!(ok);
    assert_eq!(sha256_file(&out), want);
    assert_finished(server.outcome().await, 5 * MIB);

    // The same with the Python client, which reports the OACK it got.
    let report = py_client(&server, "kernel", &["--blksize", "1468", "--windowsize", "16", "--tsize"]).await;
    assert_eq!(report["ok"], true, "{report}");
    assert_eq!(report["sha256"], want.as_str());
    let size = (5 * MIB).to_string();
    assert_eq!(report["oack"], serde_json::json!({"blksize": "1468", "windowsize": "16", "tsize": size}));
    server.stop().await;
}

/// Windows leave with UDP segmentation offload where the kernel has it (loopback does); the same transfers, with
/// losses, through the `sendmmsg` path kiln falls back to where it does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn windows_without_segmentation_offload() {
    let mut server = Server::start(|c| c.segmentation_offload = false).await;
    let want = server.add("kernel", 3 * MIB + 77);
    let report = py_client(&server, "kernel", &["--blksize", "1468", "--windowsize", "16"]).await;
    assert_eq!(report["ok"], true, "{report}");
    assert_eq!(report["sha256"], want.as_str());
    assert_finished(server.outcome().await, 3 * MIB + 77);
    let report = py_client(
        &server,
        "kernel",
        &["--blksize", "1024", "--windowsize", "8", "--drop-data", "5", "--drop-data", "17", "--drop-ack", "24"],
    )
    .await;
    assert_eq!(report["ok"], true, "{report}");
    assert_eq!(report["sha256"], want.as_str());
    assert_finished(server.outcome().await, 3 * MIB + 77);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_numbers_wrap_past_65535() {
    let mut server = Server::start(|_| {}).await;
    // 66,000 blocks of 512 bytes: past 65535 and into the second cycle of block numbers.
    let len = 66_000 * 512 + 100;
    let want = server.add("big", len);
    let out = server.dir.path().join("out");
    let start = Instant::now();
    assert!(curl(&server, "big", &out, &["--tftp-blksize", "512"]).await);
    eprintln!("33 MiB at blksize 512 (curl): {:.1} s", start.elapsed().as_secs_f64());
    assert_eq!(sha256_file(&out), want);
    assert_finished(server.outcome().await, len);

    // Windowed, too: the window straddles the wrap.
    let report = py_client(&server, "big", &["--blksize", "512", "--windowsize", "64"]).await;
    assert_eq!(report["ok"], true, "{report}");
    assert_eq!(report["sha256"], want.as_str());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tsize_and_clamped_options() {
    let server = Server::start(|config| {
        config.max_blksize = 1468;
        config.max_window = 8;
    })
    .await;
    server.add("f", 100_000);
    let report =
        py_client(&server, "f", &["--tsize", "--blksize", "9000", "--windowsize", "32", "--timeout", "2"]).await;
    assert_eq!(report["ok"], true, "{report}");
    assert_eq!(
        report["oack"],
        serde_json::json!({"tsize": "100000", "blksize": "1468", "windowsize": "8", "timeout": "2"})
    );
    // A client asking for less than the maximum gets what it asked for; unknown options are left out.
    let report = py_client(&server, "f", &["--blksize", "600", "--mode", "netascii"]).await;
    assert_eq!(report["oack"], serde_json::json!({"blksize": "600"}));
    assert_eq!(report["bytes"], 100_000);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_outside_the_served_files_are_refused() {
    let mut server = Server::start(|_| {}).await;
    // A decoy under the root named like the target, to show "/etc/shadow" maps into the root, never to the host.
    for name in ["../../etc/shadow", "/../etc/shadow", "..\\..\\etc\\shadow", "a/../../etc/shadow"] {
        let report = py_client(&server, name, &[]).await;
        assert_eq!(report["error_code"], 2, "{name}: {report}");
        assert_eq!(report["bytes"], 0);
        assert!(matches!(server.outcome().await, TftpEvent::Failed { .. }));
    }
    for name in ["/etc/shadow", "etc/passwd", "missing.efi"] {
        let report = py_client(&server, name, &[]).await;
        assert_eq!(report["error_code"], 1, "{name}: {report}");
        assert_eq!(report["bytes"], 0);
        assert!(matches!(server.outcome().await, TftpEvent::Failed { .. }));
    }
    // A symlink out of the root.
    std::os::unix::fs::symlink("/etc/passwd", server.root().join("passwd")).unwrap();
    let report = py_client(&server, "passwd", &[]).await;
    assert_eq!(report["error_code"], 2, "{report}");
    // And curl, which gets no bytes.
    let out = server.dir.path().join("out");
    assert!(!curl(&server, "../../etc/shadow", &out, &[]).await);
    assert!(std::fs::metadata(&out).map(|m| m.len() == 0).unwrap_or(true));
    server.stop().await;
}

async fn exchange(server: &Server, datagram: &[u8]) -> Option<Vec<u8>> {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    socket.send_to(datagram, server.addr).await.unwrap();
    let mut buf = vec![0u8; 2048];
    let (len, _) = tokio::time::timeout(Duration::from_millis(500), socket.recv_from(&mut buf)).await.ok()?.unwrap();
    Some(buf[..len].to_vec())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_and_garbage_are_refused_and_serving_goes_on() {
    let mut server = Server::start(|_| {}).await;
    let want = server.add("after", 10_000);
    let answer = exchange(&server, b"\x00\x02upload.bin\x00octet\x00").await.expect("no answer to a WRQ");
    assert_eq!(
        Packet::parse(&answer).unwrap(),
        Packet::Error { code: ErrorCode::AccessViolation, message: READ_ONLY_MESSAGE }
    );
    // curl's upload gets the same refusal.
    let src = server.root().join("after");
    let (ok, _, _) = run("curl", &["-sS", "--max-time", "10", "-T", src.to_str().unwrap(), &server.url("up")]).await;
    assert!(!ok);

    let garbage: [&[u8]; 8] = [
        b"",
        b"\x00",
        b"\x00\x09abc",
        b"\x00\x01no-terminator",
        b"\x00\x01f\x00binary\x00",
        b"\x00\x01\xff\xfe\x00octet\x00",
        b"\x00\x04\x00",
        &[0xAB; 1400],
    ];
    for datagram in garbage {
        if let Some(answer) = exchange(&server, datagram).await {
            let packet = Packet::parse(&answer).unwrap();
            assert!(matches!(packet, Packet::Error { code: ErrorCode::IllegalOperation, .. }), "{packet:?}");
        }
    }
    // A stray ERROR is dropped silently rather than answered.
    assert_eq!(exchange(&server, b"\x00\x05\x00\x00oops\x00").await, None);

    let out = server.dir.path().join("out");
    assert!(curl(&server, "after", &out, &[]).await);
    assert_eq!(sha256_file(&out), want);
    assert_finished(server.outcome().await, 10_000);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_packets_are_retransmitted() {
    let mut server = Server::start(|_| {}).await;
    let want = server.add("f", 200_000);
    // Lock-step: the OACK's ACK and block 1's ACK are lost; the server resends after its timeout.
    let report = py_client(&server, "f", &["--blksize", "1024", "--tsize", "--drop-ack", "0", "--drop-ack", "1"]).await;
    assert_eq!(report["ok"], true, "{report}");
    assert_eq!(report["sha256"], want.as_str());
    assert_eq!(report["acks_dropped"], 2);
    assert!(report["duplicates"].as_u64().unwrap() >= 2, "{report}");
    assert_finished(server.outcome().await, 200_000);

    // Windowed: block 5 (inside the first window) and block 17 (first of the second) are lost, and the ACK
    // closing the third window too. The server slides to the partial ACK, or resends after its timeout.
    let report = py_client(
        &server,
        "f",
        &["--blksize", "1024", "--windowsize", "8", "--drop-data", "5", "--drop-data", "17", "--drop-ack", "24"],
    )
    .await;
    assert_eq!(report["ok"], true, "{report}");
    assert_eq!(report["sha256"], want.as_str());
    assert_finished(server.outcome().await, 200_000);

    // The reply from a stranger's port is ERROR 5, and the transfer carries on.
    let report = py_client(&server, "f", &["--stranger"]).await;
    assert_eq!(report["ok"], true, "{report}");
    assert_eq!(report["stranger_answer"], serde_json::json!([5, 5]));
    assert_eq!(report["sha256"], want.as_str());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_client_is_given_up_after_the_retries() {
    let mut server = Server::start(|config| {
        config.timeout = Duration::from_millis(50);
        config.retries = 3;
    })
    .await;
    server.add("f", 5000);
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    socket.send_to(b"\x00\x01f\x00octet\x00", server.addr).await.unwrap();
    let start = Instant::now();
    let mut copies = 0;
    let mut buf = [0u8; 1024];
    while let Ok(Ok((len, _))) = tokio::time::timeout(Duration::from_secs(2), socket.recv_from(&mut buf)).await {
        assert!(matches!(Packet::parse(&buf[..len]), Ok(Packet::Data { block: 1, data }) if data.len() == 512));
        copies += 1;
    }
    // The first send and three retries, with doubling timeouts: 50 + 100 + 200 + 400 ms.
    assert_eq!(copies, 4);
    match server.outcome().await {
        TftpEvent::Failed { error, .. } => assert!(error.contains("after 3 retries"), "{error}"),
        other => panic!("expected a failure, got {other:?}"),
    }
    assert!(start.elapsed() < Duration::from_secs(4));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_config_applies_to_new_requests() {
    let mut server = Server::start(|_| {}).await;
    let out = server.dir.path().join("out");
    let other = server.dir.path().join("other.efi");
    let want = write_file(&other, 4000, 9);
    assert!(!curl(&server, "other.efi", &out, &[]).await);
    assert!(matches!(server.outcome().await, TftpEvent::Failed { .. }));
    server.config.send_modify(|config| {
        let mut next = TftpConfig::clone(config);
        next.files.named.insert("other.efi".into(), other.clone());
        *config = Arc::new(next);
    });
    assert!(curl(&server, "other.efi", &out, &[]).await);
    assert_eq!(sha256_file(&out), want);
    server.stop().await;
}

/// Starts a server on `bind` (a wildcard address) serving one file; returns its port and the file's hash.
async fn wildcard_server(bind: &str) -> Option<(u16, String, oneshot::Sender<()>, tempfile::TempDir)> {
    let socket = UdpSocket::bind(bind).await.ok()?;
    let port = socket.local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let want = write_file(&dir.path().join("f"), 2000, 5);
    let mut config = TftpConfig::default();
    config.files.named.insert("f".into(), dir.path().join("f"));
    let (_, config) = watch::channel(Arc::new(config));
    let (stop, stop_rx) = oneshot::channel::<()>();
    tokio::spawn(serve(socket, config, None, Limits::default(), async move {
        let _ = stop_rx.await;
    }));
    Some((port, want, stop, dir))
}

/// Sends a plain RRQ for "f" from 127.0.0.1 to `to` and reads the file, checking every DATA comes from `to`'s IP.
async fn read_checking_source(to: SocketAddr) -> Vec<u8> {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    socket.send_to(b"\x00\x01f\x00octet\x00", to).await.unwrap();
    let mut content = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        let (len, from) = tokio::time::timeout(Duration::from_secs(5), socket.recv_from(&mut buf))
            .await
            .expect("no DATA within 5 s")
            .unwrap();
        assert_eq!(from.ip(), to.ip(), "DATA from {from}, request sent to {to}");
        let Ok(Packet::Data { block, data }) = Packet::parse(&buf[..len]) else {
            panic!("not DATA: {:?}", &buf[..len])
        };
        content.extend_from_slice(data);
        socket.send_to(&Packet::Ack { block }.encode(), from).await.unwrap();
        if data.len() < 512 {
            return content;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_from_the_address_the_request_reached() {
    // 127.0.0.2 is local on Linux; the client sits on 127.0.0.1, so a reply the kernel routed would come from
    // 127.0.0.1. Served from a wildcard socket, the transfer must bind 127.0.0.2.
    let (port, want, stop, _dir) = wildcard_server("0.0.0.0:0").await.unwrap();
    let content = read_checking_source(format!("127.0.0.2:{port}").parse().unwrap()).await;
    assert_eq!(sha256(&content), want);
    stop.send(()).unwrap();

    // A dual-stack IPv6 socket receiving IPv4 (as v4-mapped addresses), where the host has IPv6.
    if let Some((port, want, stop, _dir)) = wildcard_server("[::]:0").await {
        let content = read_checking_source(format!("127.0.0.2:{port}").parse().unwrap()).await;
        assert_eq!(sha256(&content), want);
        stop.send(()).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_running_transfers_with_an_error() {
    let mut server = Server::start(|config| config.timeout = Duration::from_secs(30)).await;
    server.add("f", 5000);
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    socket.send_to(b"\x00\x01f\x00octet\x00", server.addr).await.unwrap();
    let mut buf = [0u8; 1024];
    let (len, _) = socket.recv_from(&mut buf).await.unwrap();
    assert!(matches!(Packet::parse(&buf[..len]), Ok(Packet::Data { block: 1, .. })));
    assert!(matches!(server.events.recv().await, Some(TftpEvent::Started { size: 5000, .. })));
    let start = Instant::now();
    server.stop.take().unwrap().send(()).unwrap();
    let (len, _) = tokio::time::timeout(Duration::from_secs(5), socket.recv_from(&mut buf)).await.unwrap().unwrap();
    assert_eq!(
        Packet::parse(&buf[..len]).unwrap(),
        Packet::Error { code: ErrorCode::NotDefined, message: "server is shutting down" }
    );
    server.task.await.unwrap().unwrap();
    assert!(start.elapsed() < Duration::from_secs(5));
}

/// Loopback throughput of a 30 MiB file at blksize 1468, windowsize 1 and 16, with the Python client.
/// `cargo test --release --test tftp -- --ignored --nocapture throughput`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark"]
async fn throughput() {
    let server = Server::start(|_| {}).await;
    let want = server.add("big", 30 * MIB);
    let out = server.dir.path().join("out");
    for window in ["1", "16", "64"] {
        let report = py_client(&server, "big", &["--blksize", "1468", "--windowsize", window]).await;
        assert_eq!(report["sha256"], want.as_str());
        eprintln!("windowsize {window}: {} s, {} MB/s (python client)", report["secs"], report["mb_per_s"]);
    }
    let start = Instant::now();
    assert!(curl(&server, "big", &out, &["--tftp-blksize", "1468"]).await);
    let secs = start.elapsed().as_secs_f64();
    eprintln!("windowsize 1: {secs:.2} s, {:.1} MB/s (curl)", (30 * MIB) as f64 / secs / 1e6);
    server.stop().await;
}
