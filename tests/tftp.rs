//! The TFTP server, run in-process on 127.0.0.1, against real clients: curl, atftp (windowsize) and
//! scripts/bench/tftp-client.py (options, loss, strangers), and against a flood of requests never acknowledged.
//! Needs `curl` and `atftp` (Debian: `apt-get install curl atftp`) and python3.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln::serve::limits::Limits;
use kiln::serve::tftp::{serve, ErrorCode, Mode, Packet, Request, TftpConfig, TftpEvent, TftpFiles, READ_ONLY_MESSAGE};
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
        Server::start_with_queue(64, tune).await
    }

    /// [`Server::start`] with an event queue of `capacity` events.
    async fn start_with_queue(capacity: usize, tune: impl FnOnce(&mut TftpConfig)) -> Server {
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
        let (events_tx, events) = mpsc::channel(capacity);
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

    /// Refusals counted under the limit `name` so far.
    fn refused(&self, name: &str) -> u64 {
        self.limits.snapshot().get(name).copied().unwrap_or(0)
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

/// Polls `condition` every 5 ms until it holds, for at most `limit`; whether it held.
async fn eventually(limit: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while !condition() {
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    true
}

fn rrq(name: &str, options: &[(&str, &str)]) -> Vec<u8> {
    Packet::Read(Request { filename: name, mode: Mode::Octet, options: options.to_vec() }).encode()
}

/// The next datagram on `socket` within `limit`, parsed, with its sender; `None` on silence.
async fn receive(socket: &UdpSocket, limit: Duration) -> Option<(Vec<u8>, SocketAddr)> {
    let mut buf = vec![0u8; 65536];
    let (len, from) = tokio::time::timeout(limit, socket.recv_from(&mut buf)).await.ok()?.unwrap();
    Some((buf[..len].to_vec(), from))
}

fn count_entries(dir: &str) -> usize {
    std::fs::read_dir(dir).map(|entries| entries.count()).unwrap_or_else(|e| panic!("reading {dir}: {e}"))
}

/// Threads of this process (the server runs in it).
fn threads() -> usize {
    count_entries("/proc/self/task")
}

fn open_files() -> usize {
    count_entries("/proc/self/fd")
}

/// Set in the child process that runs the flood test alone.
const FLOOD_CHILD: &str = "KILN_TFTP_FLOOD_CHILD";

/// Issue "Boot storms and hostile clients": 2,000 read requests for the BIOS boot file from one address, each asking
/// `timeout 255` and never acknowledged, left the server at ~515 threads and ~1,040 open files, and a normal
/// download timed out for minutes. The test runs in a process of its own (this test binary, re-run with a filter),
/// so /proc/self/task counts this server's threads and no other test's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_unacknowledged_requests_leaves_the_server_serving() {
    if std::env::var_os(FLOOD_CHILD).is_some() {
        return flood().await;
    }
    let exe = std::env::current_exe().unwrap();
    let name = "a_flood_of_unacknowledged_requests_leaves_the_server_serving";
    let mut command = tokio::process::Command::new(&exe);
    command.args([name, "--exact", "--nocapture", "--test-threads=1"]).env(FLOOD_CHILD, "1").kill_on_drop(true);
    let output = tokio::time::timeout(Duration::from_secs(120), command.output())
        .await
        .expect("the flood test did not end within 120 s")
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    eprintln!(
        "$ {} {name} (in its own process) -> {}\n{stdout}\n{}",
        exe.display(),
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success());
    assert!(stdout.contains("1 passed"), "the flood test did not run");
}

async fn flood() {
    const REQUESTS: usize = 2000;
    const SOCKETS: usize = 100;
    const BATCH: usize = 100;
    let interval = Duration::from_secs(2);
    let stall = Duration::from_secs(4);
    let mut server = Server::start(|config| config.stall_limit = stall).await;
    let max_per_client = TftpConfig::default().max_per_client;
    let want = server.add("undionly.kpxe", 81_234);
    let (lines_tx, mut lines) = mpsc::unbounded_channel::<(Instant, String)>();
    let (stop_reporter, reporter_stop) = oneshot::channel::<()>();
    let reporter = tokio::spawn(server.limits.clone().report_every(
        interval,
        move |line| {
            let _ = lines_tx.send((Instant::now(), line.to_string()));
        },
        async move {
            let _ = reporter_stop.await;
        },
    ));

    // The flooding host: 127.0.0.2, many source ports.
    let mut sockets = Vec::new();
    for _ in 0..SOCKETS {
        sockets.push(UdpSocket::bind("127.0.0.2:0").await.unwrap());
    }
    let (threads_before, files_before) = (threads(), open_files());
    let request = rrq("undionly.kpxe", &[("timeout", "255")]);
    let start = Instant::now();
    let (mut max_threads, mut max_files) = (threads_before, files_before);
    // Sent in batches, each awaited until the server has counted it, so no request is lost in a full socket buffer.
    for batch in 0..REQUESTS / BATCH {
        for i in batch * BATCH..(batch + 1) * BATCH {
            sockets[i % SOCKETS].send_to(&request, server.addr).await.unwrap();
        }
        let sent = (batch + 1) * BATCH;
        let refused = (sent - max_per_client) as u64;
        let counted = eventually(Duration::from_secs(10), || server.refused("tftp_max_per_client") == refused).await;
        assert!(
            counted,
            "after {sent} requests: {} refused, expected {refused}",
            server.refused("tftp_max_per_client")
        );
        max_threads = max_threads.max(threads());
        max_files = max_files.max(open_files());
    }
    let flood_secs = start.elapsed().as_secs_f64();
    eprintln!(
        "{REQUESTS} requests in {flood_secs:.2} s; threads {threads_before} before, at most {max_threads}; open files \
         {files_before} before, at most {max_files}"
    );
    // One thread, one socket and one file per admitted transfer, nothing per refused request.
    assert!(max_threads <= threads_before + max_per_client + 2, "threads: {threads_before} -> {max_threads}");
    assert!(max_files <= files_before + 2 * max_per_client + 4, "open files: {files_before} -> {max_files}");
    assert_eq!(server.refused("tftp_max_transfers"), 0);

    // Another machine downloads normally, at once.
    let out = server.dir.path().join("out");
    let download = Instant::now();
    assert!(curl(&server, "undionly.kpxe", &out, &["--max-time", "5"]).await);
    eprintln!("download during the flood: {:.2} s", download.elapsed().as_secs_f64());
    assert_eq!(sha256_file(&out), want);

    // The refusals are summed up in one line per interval, however many there were.
    let mut reported = Vec::new();
    while reported.iter().map(|(_, n)| n).sum::<u64>() < (REQUESTS - max_per_client) as u64 {
        let (at, line) = tokio::time::timeout(interval * 3, lines.recv())
            .await
            .expect("no limit line within three intervals")
            .unwrap();
        eprintln!("captured: {line}");
        let count = line
            .strip_prefix("kiln serve: limit tftp_max_per_client (8) hit: ")
            .and_then(|rest| rest.strip_suffix(" requests refused in the last 2 s"))
            .unwrap_or_else(|| panic!("unexpected line {line:?}"));
        reported.push((at, count.replace(',', "").parse::<u64>().unwrap()));
    }
    assert_eq!(reported.iter().map(|(_, n)| n).sum::<u64>(), (REQUESTS - max_per_client) as u64);
    assert!(reported.len() as f64 <= 1.0 + flood_secs / interval.as_secs_f64(), "{} lines", reported.len());
    for pair in reported.windows(2) {
        assert!(pair[1].0 - pair[0].0 >= interval * 9 / 10, "two lines within one interval");
    }
    if reported.len() == 1 {
        assert_eq!(reported[0].1, 1992);
    }

    // The stalled transfers are abandoned at the stall limit, not after the client's 255 s timeouts.
    let mut stalled = 0;
    while stalled < max_per_client {
        match server.outcome().await {
            TftpEvent::Failed { client, error, .. } => {
                assert_eq!(client.ip().to_string(), "127.0.0.2");
                assert!(error.contains("no ACK for block 1 in 4 s"), "{error}");
                stalled += 1;
            }
            TftpEvent::Finished { client, .. } => assert_eq!(client.ip().to_string(), "127.0.0.1"),
            TftpEvent::Started { .. } => unreachable!(),
        }
    }
    let gone = start.elapsed();
    eprintln!("stalled transfers gone {:.1} s after the flood began", gone.as_secs_f64());
    assert!(gone < stall + Duration::from_secs(3), "stalled transfers lasted {gone:?}");
    assert!(eventually(Duration::from_secs(5), || threads() <= threads_before + 2).await, "threads: {}", threads());
    // Nothing refused since the last line, so no new line.
    assert!(lines.try_recv().is_err(), "a limit line without refusals");

    // With its transfers gone, the flooding host is served again.
    assert!(curl(&server, "undionly.kpxe", &out, &["--max-time", "5", "--interface", "127.0.0.2"]).await);
    assert_eq!(sha256_file(&out), want);
    stop_reporter.send(()).unwrap();
    reporter.await.unwrap();
    server.stop().await;
}

/// At `max_transfers`, a request is dropped without an answer (an ERROR would make a PXE ROM give up); the
/// client's retransmission is served once a place is free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_the_total_limit_requests_wait_for_a_free_place() {
    let mut server = Server::start(|config| {
        config.max_transfers = 2;
        config.timeout = Duration::from_secs(5);
    })
    .await;
    server.add("f", 5000);
    // Two transfers held open by clients that never acknowledge block 1.
    let mut holders = Vec::new();
    for address in ["127.0.0.2:0", "127.0.0.3:0"] {
        let socket = UdpSocket::bind(address).await.unwrap();
        socket.send_to(&rrq("f", &[]), server.addr).await.unwrap();
        let (packet, from) = receive(&socket, Duration::from_secs(5)).await.expect("no DATA for a holder");
        assert!(matches!(Packet::parse(&packet), Ok(Packet::Data { block: 1, .. })));
        holders.push((socket, from));
    }
    let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    client.send_to(&rrq("f", &[]), server.addr).await.unwrap();
    assert_eq!(receive(&client, Duration::from_millis(500)).await, None, "a request over the limit was answered");
    assert_eq!(server.refused("tftp_max_transfers"), 1);
    assert_eq!(server.refused("tftp_max_per_client"), 0);

    // One holder ends its transfer; the waiting client's retransmissions (every 200 ms, as a client would) get in.
    let (holder, transfer) = &holders[0];
    holder.send_to(&Packet::Error { code: ErrorCode::NotDefined, message: "done" }.encode(), *transfer).await.unwrap();
    assert!(matches!(server.outcome().await, TftpEvent::Failed { error, .. } if error.contains("client sent ERROR 0")));
    let mut answer = None;
    for _ in 0..25 {
        answer = receive(&client, Duration::from_millis(200)).await;
        if answer.is_some() {
            break;
        }
        client.send_to(&rrq("f", &[]), server.addr).await.unwrap();
    }
    let (packet, from) = answer.expect("the retransmitted request was not served within 5 s");
    assert!(matches!(Packet::parse(&packet), Ok(Packet::Data { block: 1, .. })));
    client.send_to(&Packet::Error { code: ErrorCode::NotDefined, message: "done" }.encode(), from).await.unwrap();
    server.stop().await;
}

/// A client asking for `timeout 255` gets no timeout in the OACK (the server keeps its own), and a transfer whose
/// client never answers ends at the stall limit however many retries are left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_timeouts_are_refused_and_stalls_end_transfers() {
    let mut server = Server::start(|config| {
        config.timeout = Duration::from_millis(200);
        config.retries = 100;
        config.stall_limit = Duration::from_secs(2);
    })
    .await;
    server.add("f", 5000);
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let start = Instant::now();
    socket.send_to(&rrq("f", &[("timeout", "255"), ("blksize", "1024")]), server.addr).await.unwrap();
    let mut copies = 0;
    while let Some((packet, _)) = receive(&socket, Duration::from_secs(3)).await {
        assert_eq!(Packet::parse(&packet), Ok(Packet::Oack { options: vec![("blksize", "1024")] }));
        copies += 1;
    }
    // Sent at 0, 0.2, 0.6, 1.4 s with doubling timeouts; given up at 2 s instead of after 100 retries.
    assert!((3..=5).contains(&copies), "{copies} OACKs");
    match server.outcome().await {
        TftpEvent::Failed { error, .. } => assert!(error.contains("no ACK for the OACK in 2 s"), "{error}"),
        other => panic!("expected a failure, got {other:?}"),
    }
    assert!(start.elapsed() < Duration::from_secs(6));
    // A timeout within the maximum is granted as asked.
    let report = py_client(&server, "f", &["--timeout", "10"]).await;
    assert_eq!(report["oack"], serde_json::json!({"timeout": "10"}), "{report}");
    server.stop().await;
}

/// Outcomes that find the event queue full are dropped and counted, never queued without bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_event_queue_drops_and_counts() {
    let mut server = Server::start_with_queue(1, |_| {}).await;
    let want = server.add("f", 20_000);
    let out = server.dir.path().join("out");
    for _ in 0..3 {
        assert!(curl(&server, "f", &out, &[]).await);
        assert_eq!(sha256_file(&out), want);
    }
    // Three transfers, a Started and a Finished each: the first fills the queue, the other five are dropped.
    assert!(
        eventually(Duration::from_secs(5), || server.refused("tftp_events") == 5).await,
        "{} events dropped",
        server.refused("tftp_events")
    );
    assert!(matches!(server.events.recv().await, Some(TftpEvent::Started { size: 20_000, .. })));
    assert!(server.events.try_recv().is_err());
    server.stop().await;
}
