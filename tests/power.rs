//! `kiln power` and `kiln node console` against real BMC emulators on loopback: sushy-tools' Redfish emulator
//! (its fake driver: no libvirt) and OpenIPMI's `ipmi_sim` driven through `ipmitool`, plus a port nothing
//! listens on and a socket that never answers. Tests whose tools are missing print "skipped: why";
//! scripts/setup.sh installs them (sushy-tools in a venv under ~/.cache/kiln).

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::bmc::{free_udp_port, have_ipmi, write_private, IpmiBmc, NO_IPMI};
use serde_json::Value;

macro_rules! require {
    ($cond:expr, $why:expr) => {
        if !$cond {
            eprintln!("skipped: {}", $why);
            return;
        }
    };
}

fn have(tool: &str) -> bool {
    Command::new("sh").arg("-c").arg(format!("command -v {tool}")).output().map(|o| o.status.success()).unwrap_or(false)
}

/// The venv scripts/setup.sh makes (KILN_SUSHY_VENV, else ~/.cache/kiln/sushy-venv), if sushy-emulator is in it.
fn sushy_venv() -> Option<PathBuf> {
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into())).join(".cache"));
    let venv = std::env::var_os("KILN_SUSHY_VENV").map(PathBuf::from).unwrap_or_else(|| cache.join("kiln/sushy-venv"));
    venv.join("bin/sushy-emulator").exists().then_some(venv)
}

const NO_SUSHY: &str = "sushy-emulator not found in ~/.cache/kiln/sushy-venv (scripts/setup.sh installs it)";

fn free_tcp_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Polls `check` every 100 ms until it gives a value or `within` passes.
fn wait_for<T>(what: &str, within: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(start.elapsed() < within, "{what}: not within {within:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// One sushy-emulator process: a Redfish BMC with one fake system, Basic auth, optionally TLS.
struct RedfishBmc {
    child: Child,
    dir: tempfile::TempDir,
    pub base: String,
    pub uuid: String,
}

impl RedfishBmc {
    /// Starts the emulator; [`RedfishBmc::wait_ready`] waits for it to answer.
    fn start(venv: &Path, ip: &str, index: usize, password: &str, tls: Option<(&Path, &Path)>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let port = free_tcp_port();
        let uuid = format!("{index:08x}-0000-4000-8000-{:012x}", port);
        let mut hash = Command::new(venv.join("bin/python"))
            .args(["-c", "import bcrypt,sys; print('admin:' + bcrypt.hashpw(sys.stdin.read().encode(), bcrypt.gensalt(4)).decode())"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        hash.stdin.take().unwrap().write_all(password.as_bytes()).unwrap();
        let out = hash.wait_with_output().unwrap();
        assert!(out.status.success(), "bcrypt failed");
        std::fs::write(d.join("htpasswd"), out.stdout).unwrap();
        std::fs::write(
            d.join("conf.py"),
            format!(
                "SUSHY_EMULATOR_FAKE_DRIVER = True\nSUSHY_EMULATOR_STATE_DIR = '{state}'\n\
                 SUSHY_EMULATOR_AUTH_FILE = '{auth}'\nSUSHY_EMULATOR_FAKE_SYSTEMS = [{{'uuid': '{uuid}', \
                 'name': 'node{index}', 'power_state': 'Off', 'nics': [{{'mac': '52:54:00:00:{:02x}:{:02x}', \
                 'ip': '10.0.0.1'}}]}}]\n",
                index / 256,
                index % 256,
                state = d.join("state").display(),
                auth = d.join("htpasswd").display(),
            ),
        )
        .unwrap();
        // curl's credentials go in a file: the password stays out of the process list.
        write_private(&d.join("curl.conf"), &format!("user = \"admin:{password}\"\n"));
        let log = std::fs::File::create(d.join("emulator.log")).unwrap();
        let mut cmd = Command::new(venv.join("bin/sushy-emulator"));
        cmd.arg("--config").arg(d.join("conf.py")).args(["-i", ip, "-p", &port.to_string()]);
        if let Some((cert, key)) = tls {
            cmd.arg("--ssl-certificate").arg(cert).arg("--ssl-key").arg(key);
        }
        let child =
            cmd.stdin(Stdio::null()).stdout(log.try_clone().unwrap()).stderr(log).spawn().expect("sushy-emulator");
        let scheme = if tls.is_some() { "https" } else { "http" };
        RedfishBmc { child, dir, base: format!("{scheme}://{ip}:{port}"), uuid }
    }

    fn wait_ready(&mut self, within: Duration) {
        let start = Instant::now();
        loop {
            if self.get("/redfish/v1/Systems").is_some() {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("sushy-emulator exited ({status}):\n{}", self.log());
            }
            assert!(start.elapsed() < within, "sushy-emulator not up within {within:?}:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("emulator.log")).unwrap_or_default()
    }

    /// GETs a path with curl (a client independent of kiln).
    fn get(&self, path: &str) -> Option<Value> {
        let out = Command::new("curl")
            .args(["-sfk", "--max-time", "5", "-K"])
            .arg(self.dir.path().join("curl.conf"))
            .arg(format!("{}{path}", self.base))
            .output()
            .ok()?;
        out.status.success().then(|| serde_json::from_slice(&out.stdout).ok()).flatten()
    }

    fn system(&self) -> Value {
        self.get(&format!("/redfish/v1/Systems/{}", self.uuid)).expect("reading the system with curl")
    }

    /// Waits for the fake driver to apply a power change (it takes 1 to 11 s, like real hardware).
    fn wait_power(&self, want: &str) {
        wait_for(&format!("{} PowerState {want}", self.base), Duration::from_secs(30), || {
            (self.system()["PowerState"] == want).then_some(())
        });
    }
}

impl Drop for RedfishBmc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs the real kiln in `dir` with `env` added; prints what it did.
fn kiln(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .current_dir(dir)
        .env_remove("KILN_BMC_PASSWORD")
        .envs(env.iter().copied())
        .output()
        .expect("running kiln");
    eprintln!(
        "$ kiln {}\n--- status: {}\n--- stdout:\n{}--- stderr:\n{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// `kiln ... --json`'s report.
fn report(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

fn node<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["nodes"].as_array().unwrap().iter().find(|n| n["node"] == name).unwrap_or_else(|| panic!("no {name}"))
}

fn text(out: &Output) -> (String, String) {
    (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// A socket that accepts connections and never answers: a BMC that hangs.
fn silent_bmc() -> (TcpListener, u16) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    (l, port)
}

#[test]
fn redfish_on_off_cycle_reset_soft_status_and_pxe_once() {
    let Some(venv) = sushy_venv() else {
        eprintln!("skipped: {NO_SUSHY}");
        return;
    };
    require!(have("curl"), "curl missing");
    let mut bmc = RedfishBmc::start(&venv, "127.0.0.1", 1, "s3cret-rf", None);
    bmc.wait_ready(Duration::from_secs(60));
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    write_private(&w.join("good.pass"), "s3cret-rf\n");
    write_private(&w.join("bad.pass"), "wrong-password\n");
    let dead = free_tcp_port();
    let (_silent, silent) = silent_bmc();
    std::fs::write(
        w.join("kiln.toml"),
        format!(
            "[profile.rf]\nimage = \"compute\"\nbmc = {{ user = \"admin\", password_file = \"good.pass\" }}\n\
             [node.n1]\nmac = \"52:54:00:00:00:01\"\nprofile = \"rf\"\nbmc = {{ address = \"{base}\" }}\n\
             [node.n2]\nmac = \"52:54:00:00:00:02\"\nprofile = \"rf\"\n\
             bmc = {{ address = \"{base}/redfish/v1/Systems/{uuid}\", password_file = \"bad.pass\" }}\n\
             [node.n3]\nmac = \"52:54:00:00:00:03\"\nprofile = \"rf\"\nbmc = {{ address = \"http://127.0.0.1:{dead}\" }}\n\
             [node.n4]\nmac = \"52:54:00:00:00:04\"\nprofile = \"rf\"\nbmc = {{ address = \"http://127.0.0.1:{silent}\" }}\n",
            base = bmc.base,
            uuid = bmc.uuid
        ),
    )
    .unwrap();

    // One good BMC, one wrong password, one down, one silent: each gets its own result, the run fails.
    let out = kiln(w, &["power", "on", "--all", "--timeout", "2", "--json"], &[]);
    assert_eq!(out.status.code(), Some(1), "a failed node makes the exit status non-zero");
    let r = report(&out);
    assert_eq!(r["failed"], 3);
    let n1 = node(&r, "n1");
    assert_eq!((n1["ok"].as_bool(), n1["power"].as_str(), n1["did"].as_str()), (Some(true), Some("off"), Some("On")));
    let n2 = node(&r, "n2");
    assert_eq!(n2["error_kind"], "auth");
    assert_eq!(
        n2["error"].as_str().unwrap(),
        format!(
            "n2: power on: GET {}/redfish/v1/Systems/{}: 401 Unauthorized: check the user and password",
            bmc.base, bmc.uuid
        )
    );
    let n3 = node(&r, "n3");
    assert_eq!(n3["error_kind"], "unreachable");
    assert!(n3["error"].as_str().unwrap().contains("connection refused: is the BMC up and its address right?"), "{n3}");
    let n4 = node(&r, "n4");
    assert_eq!(n4["error_kind"], "timeout");
    assert!(n4["error"].as_str().unwrap().starts_with("n4: power on: GET http://127.0.0.1:"), "{n4}");
    assert!(n4["error"].as_str().unwrap().ends_with("no answer within 2s"), "{n4}");
    assert!(n4["elapsed_ms"].as_u64().unwrap() < 4_000, "the silent BMC held kiln past its timeout: {n4}");
    assert!(r["total_ms"].as_u64().unwrap() < 5_000, "the BMCs were not handled in parallel: {r}");
    bmc.wait_power("On");

    let out = kiln(w, &["power", "status", "n1"], &[]);
    assert!(out.status.success());
    assert_eq!(text(&out).0, "n1        on\n");
    let r = report(&kiln(w, &["power", "on", "n1", "--json"], &[]));
    assert_eq!(node(&r, "n1")["did"], "nothing: already on");

    // cycle --pxe: the override is set first; the emulator offers no PowerCycle, so kiln sends ForceRestart.
    let out = kiln(w, &["-vv", "power", "cycle", "n1", "--pxe", "--json"], &[]);
    assert!(out.status.success());
    let r = report(&out);
    let n1 = node(&r, "n1");
    assert_eq!((n1["did"].as_str(), n1["next_boot"].as_str()), (Some("ForceRestart"), Some("pxe once")));
    let sys = bmc.system();
    assert_eq!(sys["Boot"]["BootSourceOverrideTarget"], "Pxe", "{sys}");
    // The emulator keeps no BootSourceOverrideEnabled (it reports Continuous whatever is sent): kiln's log shows it.
    assert!(text(&out).1.contains(r#""BootSourceOverrideEnabled":"Once""#));
    assert_eq!(sys["PowerState"], "Off", "ForceRestart turns the fake system off first");
    bmc.wait_power("On");

    let r = report(&kiln(w, &["power", "off", "n1", "--json"], &[]));
    assert_eq!(node(&r, "n1")["did"], "ForceOff");
    bmc.wait_power("Off");
    let r = report(&kiln(w, &["power", "reset", "n1", "--json"], &[]));
    assert_eq!(node(&r, "n1")["did"], "On", "reset of an off node powers it on");
    bmc.wait_power("On");
    let r = report(&kiln(w, &["power", "soft", "n1", "--json"], &[]));
    assert_eq!(node(&r, "n1")["did"], "GracefulShutdown");
    bmc.wait_power("Off");
    let out = kiln(w, &["power", "status", "n1", "--json"], &[]);
    assert_eq!(node(&report(&out), "n1")["power"], "off");
}

/// A CA and a certificate for 127.0.0.1 signed by it.
fn make_certs(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let sh = |cmd: String| {
        let out = Command::new("bash").arg("-c").arg(&cmd).current_dir(dir).output().unwrap();
        assert!(out.status.success(), "{cmd}: {}", String::from_utf8_lossy(&out.stderr));
    };
    let ec = "-newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes";
    sh(format!("openssl req -x509 {ec} -keyout ca.key -out ca.pem -days 2 -subj /CN=kiln-test-ca"));
    sh(format!("openssl req {ec} -keyout bmc.key -out bmc.csr -subj /CN=bmc"));
    std::fs::write(
        dir.join("ext"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    sh("openssl x509 -req -in bmc.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out bmc.pem -days 2 -extfile ext"
        .into());
    (dir.join("ca.pem"), dir.join("bmc.pem"), dir.join("bmc.key"))
}

#[test]
fn redfish_tls_is_verified_unless_insecure_which_is_said_every_time() {
    let Some(venv) = sushy_venv() else {
        eprintln!("skipped: {NO_SUSHY}");
        return;
    };
    require!(have("curl") && have("openssl"), "curl or openssl missing");
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let (ca, cert, key) = make_certs(w);
    let mut bmc = RedfishBmc::start(&venv, "127.0.0.1", 2, "s3cret-tls", Some((&cert, &key)));
    bmc.wait_ready(Duration::from_secs(60));
    assert!(bmc.base.starts_with("https://"));
    write_private(&w.join("pass"), "s3cret-tls");
    let addr = bmc.base.trim_start_matches("https://");
    std::fs::write(
        w.join("kiln.toml"),
        format!(
            "[profile.tls]\nimage = \"compute\"\nbmc = {{ user = \"admin\", password_file = \"pass\" }}\n\
             [node.t1]\nmac = \"52:54:00:00:01:01\"\nprofile = \"tls\"\nbmc = {{ address = \"{addr}\" }}\n\
             [node.t2]\nmac = \"52:54:00:00:01:02\"\nprofile = \"tls\"\nbmc = {{ address = \"{addr}\", insecure = true }}\n\
             [node.t3]\nmac = \"52:54:00:00:01:03\"\nprofile = \"tls\"\nbmc = {{ address = \"{addr}\", ca_file = \"{}\" }}\n",
            ca.display()
        ),
    )
    .unwrap();
    let out = kiln(w, &["power", "status", "--all", "--json"], &[]);
    assert_eq!(out.status.code(), Some(1));
    let r = report(&out);
    let t1 = node(&r, "t1");
    assert_eq!(t1["error_kind"], "tls", "an unknown CA is refused by default: {t1}");
    let e = t1["error"].as_str().unwrap();
    assert!(e.starts_with(&format!("t1: power status: GET https://{addr}/redfish/v1/Systems: TLS: ")), "{e}");
    assert!(e.contains("ca_file") && e.contains("insecure = true"), "{e}");
    let t2 = node(&r, "t2");
    assert_eq!((t2["ok"].as_bool(), t2["tls_verified"].as_bool()), (Some(true), Some(false)));
    let t3 = node(&r, "t3");
    assert_eq!((t3["ok"].as_bool(), t3["tls_verified"].as_bool()), (Some(true), Some(true)));
    let warning = format!("t2: the certificate of BMC https://{addr} is not verified (insecure = true)");
    assert!(text(&out).1.contains(&warning), "insecure must be said on every use");
    let out = kiln(w, &["power", "status", "t2", "t3"], &[]);
    let (stdout, stderr) = text(&out);
    assert!(stdout.contains("t2        off [TLS certificate not verified]\nt3        off\n"), "{stdout}");
    assert!(stderr.contains(&warning));
}

#[test]
fn ipmi_on_off_status_bootdev_pxe_wrong_password_and_console() {
    require!(have_ipmi(), NO_IPMI);
    // The node's serial port: ipmi_sim connects to it and carries it over SOL.
    let serial = TcpListener::bind("127.0.0.1:0").unwrap();
    let sol_port = serial.local_addr().unwrap().port();
    let typed = Arc::new(Mutex::new(Vec::new()));
    let typed_in = typed.clone();
    std::thread::spawn(move || {
        let (mut conn, _) = serial.accept().unwrap();
        conn.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
        for i in 0..300 {
            if conn.write_all(format!("kiln-sol-line {i}\r\n").as_bytes()).is_err() {
                return;
            }
            let mut buf = [0u8; 256];
            if let Ok(n) = conn.read(&mut buf) {
                typed_in.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        }
    });
    let port = free_udp_port("127.0.0.1");
    let bmc = IpmiBmc::start("127.0.0.1", port, "ipmi-s3cret", Some(sol_port));
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    write_private(&w.join("good.pass"), "ipmi-s3cret\n");
    write_private(&w.join("bad.pass"), "not-the-password\n");
    std::fs::write(
        w.join("kiln.toml"),
        format!(
            "[profile.ipmi]\nimage = \"compute\"\nbmc = {{ protocol = \"ipmi\", user = \"admin\", cipher_suite = 3 }}\n\
             [node.i1]\nmac = \"52:54:00:00:02:01\"\nprofile = \"ipmi\"\n\
             bmc = {{ address = \"127.0.0.1:{port}\", password_file = \"good.pass\" }}\n\
             [node.i2]\nmac = \"52:54:00:00:02:02\"\nprofile = \"ipmi\"\n\
             bmc = {{ address = \"127.0.0.1:{port}\", password_file = \"bad.pass\" }}\n"
        ),
    )
    .unwrap();
    let out = kiln(w, &["power", "status", "--all", "--timeout", "2", "--json"], &[]);
    assert_eq!(out.status.code(), Some(1));
    let r = report(&out);
    assert_eq!(node(&r, "i1")["power"], "off");
    let i2 = node(&r, "i2");
    assert_eq!(i2["error_kind"], "auth", "{i2}");
    let e = i2["error"].as_str().unwrap();
    assert!(
        e.starts_with(&format!(
            "i2: power status: ipmitool chassis power status on 127.0.0.1:{port}: authentication failed: check the \
             user and password: "
        )) && e.contains("RAKP 2 HMAC is invalid"),
        "{e}"
    );

    let r = report(&kiln(w, &["power", "on", "i1", "--json"], &[]));
    assert_eq!(node(&r, "i1")["did"], "chassis power on");
    assert_eq!(bmc.file("power"), "1");
    assert_eq!(text(&kiln(w, &["power", "status", "i1"], &[])).0, "i1        on\n");

    let out = kiln(w, &["power", "cycle", "i1", "--pxe", "--json"], &[]);
    assert!(out.status.success());
    let i1 = node(&report(&out), "i1").clone();
    assert_eq!((i1["did"].as_str(), i1["next_boot"].as_str()), (Some("chassis power cycle"), Some("pxe once")));
    assert_eq!(bmc.file("boot"), "pxe");
    let param = String::from_utf8_lossy(&bmc.ipmitool(&["chassis", "bootparam", "get", "5"]).stdout).into_owned();
    assert!(param.contains("Force PXE") && param.contains("Options apply to only next boot"), "{param}");
    // ipmi_sim carries out a cycle as "off" now and "on" from a timer about a second later.
    let deadline = Instant::now() + Duration::from_secs(20);
    while bmc.file("power") != "1" {
        assert!(Instant::now() < deadline, "the cycled chassis did not come back on: calls {}", bmc.file("calls"));
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(bmc.file("calls").ends_with("power 0\npower 1"), "a cycle is off then on: {}", bmc.file("calls"));

    let r = report(&kiln(w, &["power", "off", "i1", "--json"], &[]));
    assert_eq!(node(&r, "i1")["did"], "chassis power off");
    assert_eq!(bmc.file("power"), "0");
    assert_eq!(node(&report(&kiln(w, &["power", "status", "i1", "--json"], &[])), "i1")["power"], "off");

    // The console: the serial port's lines arrive on kiln's stdout; ~. ends it.
    console_shows_serial(w, "i1", &[&format!("serial console over IPMI SOL at 127.0.0.1:{port}")]);
    let typed = String::from_utf8_lossy(&typed.lock().unwrap()).into_owned();
    assert!(typed.contains("typed-by-kiln-test"), "keys typed on the console did not reach the serial port: {typed:?}");
}

/// Runs `kiln node console NODE`, waits for the serial port's lines on its stdout, types a line, leaves with ~.
fn console_shows_serial(dir: &Path, name: &str, notes: &[&str]) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["node", "console", name, "--timeout", "2"])
        .current_dir(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if line.contains("kiln-sol-line") => break,
            Ok(line) => seen.push(line),
            Err(_) => {
                let _ = child.kill();
                let out = child.wait_with_output().unwrap();
                panic!("no serial line on the console within 20 s: {seen:?}\n{}", String::from_utf8_lossy(&out.stderr));
            }
        }
    }
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"typed-by-kiln-test\r").unwrap();
    stdin.flush().unwrap();
    // Give the typed line time to cross SOL before the escape ends the session: wait for more serial output.
    let more = Instant::now() + Duration::from_secs(5);
    let mut lines_after = 0;
    while lines_after < 5 && Instant::now() < more {
        if rx.recv_timeout(Duration::from_millis(500)).is_ok() {
            lines_after += 1;
        }
    }
    stdin.write_all(b"\n~.").unwrap();
    stdin.flush().unwrap();
    let status = wait_for("the console to end after ~.", Duration::from_secs(10), || child.try_wait().unwrap());
    let mut stderr = String::new();
    child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    eprintln!("console stderr:\n{stderr}");
    assert!(status.success(), "console ended with {status}: {stderr}");
    for note in notes {
        assert!(stderr.contains(note), "missing {note:?} in {stderr}");
    }
}

#[test]
fn redfish_console_falls_back_to_ipmi_sol_on_the_same_host() {
    let Some(venv) = sushy_venv() else {
        eprintln!("skipped: {NO_SUSHY}");
        return;
    };
    require!(have_ipmi() && have("curl"), NO_IPMI);
    // IPMI's port 623 on an address of its own; binding it needs root.
    let ip = format!("127.0.{}.{}", std::process::id() % 200 + 20, std::process::id() % 250 + 2);
    if UdpSocket::bind((ip.as_str(), 623)).is_err() {
        eprintln!("skipped: cannot bind UDP {ip}:623 (needs root)");
        return;
    }
    let serial = TcpListener::bind("127.0.0.1:0").unwrap();
    let sol_port = serial.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let (mut conn, _) = serial.accept().unwrap();
        for i in 0..300 {
            if conn.write_all(format!("kiln-sol-line {i}\r\n").as_bytes()).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    let _ipmi = IpmiBmc::start(&ip, 623, "both-s3cret", Some(sol_port));
    let mut rf = RedfishBmc::start(&venv, &ip, 3, "both-s3cret", None);
    rf.wait_ready(Duration::from_secs(60));
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    write_private(&w.join("pass"), "both-s3cret");
    std::fs::write(
        w.join("kiln.toml"),
        format!(
            "[node.r1]\nmac = \"52:54:00:00:03:01\"\nimage = \"compute\"\n\
             bmc = {{ address = \"{}\", user = \"admin\", password_file = \"pass\", cipher_suite = 3 }}\n",
            rf.base
        ),
    )
    .unwrap();
    console_shows_serial(w, "r1", &["Redfish carries no console stream", &format!("Using IPMI SOL at {ip}:623")]);
}

#[test]
fn fifty_redfish_bmcs_in_parallel_with_bounded_concurrency() {
    let Some(venv) = sushy_venv() else {
        eprintln!("skipped: {NO_SUSHY}");
        return;
    };
    require!(have("curl"), "curl missing");
    const N: usize = 50;
    let start = Instant::now();
    let mut bmcs: Vec<RedfishBmc> =
        (0..N).map(|i| RedfishBmc::start(&venv, "127.0.0.1", 100 + i, "fifty", None)).collect();
    for b in &mut bmcs {
        b.wait_ready(Duration::from_secs(180));
    }
    eprintln!("{N} emulated BMCs up in {:.1} s", start.elapsed().as_secs_f64());
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    write_private(&w.join("pass"), "fifty");
    let mut recipe =
        String::from("[profile.rack]\nimage = \"compute\"\nbmc = { user = \"admin\", password_file = \"pass\" }\n");
    for (i, b) in bmcs.iter().enumerate() {
        recipe.push_str(&format!(
            "[node.n{i:03}]\nmac = \"52:54:00:01:00:{i:02x}\"\nprofile = \"rack\"\nbmc = {{ address = \"{}\" }}\n",
            b.base
        ));
    }
    std::fs::write(w.join("kiln.toml"), recipe).unwrap();

    let limit = 8;
    let out = kiln(w, &["-q", "power", "on", "--all", "--parallel", &limit.to_string(), "--json"], &[]);
    assert!(out.status.success());
    let r = report(&out);
    let nodes = r["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), N);
    assert!(nodes.iter().all(|n| n["ok"] == true && n["did"] == "On"), "{r}");
    let peak = r["peak_parallel"].as_u64().unwrap() as usize;
    assert!((2..=limit).contains(&peak), "peak {peak} with --parallel {limit}");
    // The same bound seen from the per-node intervals.
    let spans: Vec<(u64, u64)> = nodes
        .iter()
        .map(|n| {
            (n["started_ms"].as_u64().unwrap(), n["started_ms"].as_u64().unwrap() + n["elapsed_ms"].as_u64().unwrap())
        })
        .collect();
    let most = spans.iter().map(|&(s, _)| spans.iter().filter(|&&(a, b)| a <= s && s < b).count()).max().unwrap();
    assert!(most <= limit, "{most} node jobs overlapped with --parallel {limit}");
    let on_ms = r["total_ms"].as_u64().unwrap();

    let serial = report(&kiln(w, &["-q", "power", "status", "--all", "--parallel", "1", "--json"], &[]));
    let wide = report(&kiln(w, &["-q", "power", "status", "--all", "--parallel", "16", "--json"], &[]));
    assert_eq!((serial["failed"].as_u64(), wide["failed"].as_u64()), (Some(0), Some(0)));
    let (one_ms, sixteen_ms) = (serial["total_ms"].as_u64().unwrap(), wide["total_ms"].as_u64().unwrap());
    eprintln!(
        "{N} BMCs: power on {:.2} s at {limit} at once (peak {peak}); status {:.2} s one at a time, {:.2} s at 16 at once \
         ({:.1}x)",
        on_ms as f64 / 1000.0,
        one_ms as f64 / 1000.0,
        sixteen_ms as f64 / 1000.0,
        one_ms as f64 / sixteen_ms.max(1) as f64
    );
    // No speed-up is asserted: on loopback the emulators (Python) share this machine's cores, so contacting more at
    // once cannot be faster here; real BMCs answer in hundreds of milliseconds, which is what the bound overlaps.
}

#[test]
fn the_password_never_appears_in_output_logs_errors_or_the_process_list() {
    let Some(venv) = sushy_venv() else {
        eprintln!("skipped: {NO_SUSHY}");
        return;
    };
    require!(have_ipmi() && have("curl"), NO_IPMI);
    const ENV_PASSWORD: &str = "EnvCanary-7f3a91";
    const FILE_PASSWORD: &str = "FileCanary-91c2ab";
    let mut rf = RedfishBmc::start(&venv, "127.0.0.1", 4, FILE_PASSWORD, None);
    rf.wait_ready(Duration::from_secs(60));
    let ipmi_port = free_udp_port("127.0.0.1");
    let _ipmi = IpmiBmc::start("127.0.0.1", ipmi_port, FILE_PASSWORD, None);
    let dead_ipmi = free_udp_port("127.0.0.1");
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let runtime = w.join("runtime");
    std::fs::create_dir(&runtime).unwrap();
    write_private(&w.join("file.pass"), &format!("{FILE_PASSWORD}\n"));
    std::fs::write(
        w.join("kiln.toml"),
        format!(
            "[node.ok]\nmac = \"52:54:00:00:04:01\"\nimage = \"c\"\n\
             bmc = {{ address = \"{base}\", user = \"admin\", password_file = \"file.pass\" }}\n\
             [node.envwrong]\nmac = \"52:54:00:00:04:02\"\nimage = \"c\"\nbmc = {{ address = \"{base}\", user = \"admin\" }}\n\
             [node.ipmiwrong]\nmac = \"52:54:00:00:04:03\"\nimage = \"c\"\n\
             bmc = {{ address = \"127.0.0.1:{ipmi_port}\", protocol = \"ipmi\", user = \"admin\", cipher_suite = 3 }}\n\
             [node.ipmidead]\nmac = \"52:54:00:00:04:04\"\nimage = \"c\"\n\
             bmc = {{ address = \"127.0.0.1:{dead_ipmi}\", protocol = \"ipmi\", user = \"admin\", cipher_suite = 3 }}\n\
             [node.ipmifile]\nmac = \"52:54:00:00:04:05\"\nimage = \"c\"\n\
             bmc = {{ address = \"127.0.0.1:{ipmi_port}\", protocol = \"ipmi\", user = \"admin\", password_file = \"file.pass\", cipher_suite = 3 }}\n",
            base = rf.base
        ),
    )
    .unwrap();
    let b64 = |s: &str| {
        let out = Command::new("base64").arg("-w0").stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
        let mut out = out;
        out.stdin.take().unwrap().write_all(s.as_bytes()).unwrap();
        String::from_utf8(out.wait_with_output().unwrap().stdout).unwrap()
    };
    let secrets = [
        ENV_PASSWORD.to_string(),
        FILE_PASSWORD.to_string(),
        b64(&format!("admin:{ENV_PASSWORD}")),
        b64(&format!("admin:{FILE_PASSWORD}")),
    ];
    for args in [
        &["-vv", "power", "status", "--all", "--timeout", "2", "--json"][..],
        &["-vv", "power", "cycle", "--all", "--pxe", "--timeout", "2"][..],
    ] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(args)
            .current_dir(w)
            .env("KILN_BMC_PASSWORD", ENV_PASSWORD)
            .env("XDG_RUNTIME_DIR", &runtime)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdout = child.stdout.take().unwrap();
        let mut stderr = child.stderr.take().unwrap();
        let out_t = std::thread::spawn(move || {
            let mut s = String::new();
            stdout.read_to_string(&mut s).unwrap();
            s
        });
        let err_t = std::thread::spawn(move || {
            let mut s = String::new();
            stderr.read_to_string(&mut s).unwrap();
            s
        });
        // Every process's command line and ipmitool's environment, sampled until kiln ends.
        let mut ipmitools = 0;
        let start = Instant::now();
        while child.try_wait().unwrap().is_none() {
            assert!(start.elapsed() < Duration::from_secs(60), "kiln did not end");
            for entry in std::fs::read_dir("/proc").unwrap().flatten() {
                let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
                let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
                for s in &secrets {
                    assert!(!cmdline.contains(s.as_str()), "a password is in the process list: {cmdline}");
                }
                if cmdline.starts_with("ipmitool ") {
                    ipmitools += 1;
                    let environ = std::fs::read(entry.path().join("environ")).unwrap_or_default();
                    let environ = String::from_utf8_lossy(&environ);
                    assert!(!environ.contains(ENV_PASSWORD), "ipmitool's environment holds the password");
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let (stdout, stderr) = (out_t.join().unwrap(), err_t.join().unwrap());
        eprintln!("$ kiln {}\n--- stdout:\n{stdout}--- stderr:\n{stderr}", args.join(" "));
        assert!(ipmitools > 0, "no ipmitool process was seen: the process-list check saw nothing");
        for s in &secrets {
            assert!(!stdout.contains(s.as_str()) && !stderr.contains(s.as_str()), "{s} leaked");
        }
        assert!(stdout.contains("envwrong") && stdout.contains("ipmidead"));
        assert!(
            std::fs::read_dir(&runtime).unwrap().next().is_none(),
            "ipmitool's temporary password file was left behind"
        );
    }
}

#[test]
fn bad_requests_and_bmc_settings_are_named() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    std::fs::write(w.join("kiln.toml"), "[image.compute]\nfrom = \"dir:/nonexistent\"\n").unwrap();
    let ok = |args: &[&str]| {
        let out = kiln(w, args, &[]);
        assert!(out.status.success(), "kiln {args:?} failed");
    };
    ok(&["node", "add", "n1", "--mac", "52:54:00:00:05:01", "--image", "compute"]);
    ok(&["node", "add", "n2", "--mac", "52:54:00:00:05:02", "--image", "compute", "--bmc-address", "10.9.0.2"]);
    ok(&[
        "node",
        "set",
        "n2",
        "--bmc-protocol",
        "ipmi",
        "--bmc-user",
        "admin",
        "--bmc-password-file",
        "/nonexistent/bmc.pass",
        "--bmc-cipher-suite",
        "17",
    ]);
    let toml = std::fs::read_to_string(w.join("kiln.toml")).unwrap();
    assert!(
        toml.contains(
            "bmc = { address = \"10.9.0.2\", protocol = \"ipmi\", user = \"admin\", password_file = \
             \"/nonexistent/bmc.pass\", cipher_suite = 17 }"
        ),
        "{toml}"
    );
    let err = |args: &[&str]| {
        let out = kiln(w, args, &[]);
        assert!(!out.status.success(), "kiln {args:?} should fail");
        text(&out)
    };
    assert!(err(&["power", "status"]).1.contains("name the nodes, or use --all or --tag TAG"));
    assert!(err(&["power", "off", "n1", "--pxe"])
        .1
        .contains("--pxe sets the next boot: use it with on, cycle or reset"));
    assert!(err(&["power", "status", "n9"]).1.contains("has no [node.n9]"));
    assert!(err(&["power", "status", "--tag", "gpu"]).1.contains("no node of"));
    let (stdout, _) = err(&["power", "on", "n1", "n2", "--json"]);
    let r: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(node(&r, "n1")["error_kind"], "config");
    assert!(node(&r, "n1")["error"].as_str().unwrap().starts_with("n1: power on: no BMC: set [node.n1] bmc"));
    let e2 = node(&r, "n2")["error"].as_str().unwrap();
    assert!(e2.starts_with("n2: power on: reading the BMC password file /nonexistent/bmc.pass"), "{e2}");
    let out = kiln(w, &["power", "status", "n2", "--json"], &[("KILN_BMC_PASSWORD", "x")]);
    assert!(node(&report(&out), "n2")["error"].as_str().unwrap().contains("reading the BMC password file"));
    ok(&["node", "set", "n1", "--bmc-address", "https://10.9.0.1", "--bmc-user", "admin"]);
    let (stdout, _) = err(&["power", "status", "n1", "--json"]);
    let e1 = node(&serde_json::from_str(&stdout).unwrap(), "n1")["error"].as_str().unwrap().to_string();
    assert_eq!(
        e1,
        "n1: power status: no BMC password: set `password_file` in the node's or profile's bmc, or KILN_BMC_PASSWORD"
    );

    // A password written in kiln.toml is refused, and not repeated.
    let toml = std::fs::read_to_string(w.join("kiln.toml")).unwrap();
    std::fs::write(
        w.join("kiln.toml"),
        toml.replace("user = \"admin\" }", "user = \"admin\", password = \"hunter2\" }"),
    )
    .unwrap();
    let (_, stderr) = err(&["power", "status", "--all"]);
    assert!(
        stderr.contains("[node.n1]") && stderr.contains("password_file") && !stderr.contains("hunter2"),
        "{stderr}"
    );
    let (_, stderr) = err(&[
        "node",
        "add",
        "n3",
        "--mac",
        "52:54:00:00:05:03",
        "--image",
        "compute",
        "--bmc-address",
        "https://root:hunter2@10.9.0.3",
    ]);
    assert!(stderr.contains("credentials do not belong in the address") && !stderr.contains("hunter2"), "{stderr}");
}
