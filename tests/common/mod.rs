//! Shared pieces of the integration tests: fixtures built by scripts/fixtures, the real `kiln`
//! binary run in a fresh directory, and QEMU boots read from the serial console.
#![allow(dead_code)]

pub mod bmc;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Runs a fixture script (it caches its output) and returns the directory it printed last.
pub fn fixture(script: &str) -> PathBuf {
    fixture_with(script, &[])
}

/// [`fixture`] with arguments (e.g. the architecture).
pub fn fixture_with(script: &str, args: &[&str]) -> PathBuf {
    static LOCK: Mutex<()> = Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let out = Command::new("bash")
        .arg(repo().join("scripts/fixtures").join(script))
        .args(args)
        .stderr(Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("running fixture {script}: {e}"));
    assert!(out.status.success(), "fixture script {script} failed");
    let text = String::from_utf8(out.stdout).unwrap();
    let dir = PathBuf::from(text.lines().last().expect("fixture printed its path").trim());
    assert!(dir.is_dir(), "fixture {script} printed {dir:?}, which is not a directory");
    dir
}

pub fn tiny() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| fixture("tiny.sh")).clone()
}

/// The tiny image built for arm64 (Debian's arm64 kernel and busybox-static).
pub fn tiny_arm64() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| fixture_with("tiny.sh", &["arm64"])).clone()
}

/// The tiny image for amd64 and arm64 behind one image index (`oci/`, `multiarch.oci.tar`).
pub fn multiarch() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| fixture("multiarch.sh")).clone()
}

pub fn debian() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| fixture("debian.sh")).clone()
}

/// The real binary, run in `dir`, with its store in `store`.
pub fn kiln(dir: &Path, store: &Path, args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .current_dir(dir)
        .env("KILN_STORE", store)
        .env_remove("SOURCE_DATE_EPOCH")
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

pub fn kiln_ok(dir: &Path, store: &Path, args: &[&str]) -> String {
    let out = kiln(dir, store, args);
    assert!(out.status.success(), "kiln {args:?} failed:\n{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// Runs kiln expecting failure; returns stderr.
pub fn kiln_err(dir: &Path, store: &Path, args: &[&str]) -> String {
    let out = kiln(dir, store, args);
    assert!(!out.status.success(), "kiln {args:?} should have failed");
    String::from_utf8(out.stderr).unwrap()
}

pub fn sh(cmd: &str) -> String {
    let out = Command::new("bash").arg("-c").arg(cmd).output().expect("bash");
    assert!(out.status.success(), "`{cmd}` failed:\n{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

pub fn have(tool: &str) -> bool {
    Command::new("sh").arg("-c").arg(format!("command -v {tool}")).output().map(|o| o.status.success()).unwrap_or(false)
}

/// A snapshot of what the store holds (names under store/ and tmp/), to show it is unchanged.
pub fn store_snapshot(store: &Path) -> Vec<String> {
    let mut v = Vec::new();
    for sub in ["store", "tmp"] {
        if let Ok(rd) = std::fs::read_dir(store.join(sub)) {
            for e in rd.flatten() {
                v.push(format!("{sub}/{}", e.file_name().to_string_lossy()));
            }
        }
    }
    v.sort();
    v
}

/// Boots `kernel` with `initrds` concatenated as one initrd under QEMU (TCG) and waits for
/// `marker` on the serial console. Returns the console log.
pub fn boot_until(kernel: &Path, initrds: &[&Path], cmdline: &str, marker: &str, timeout: Duration) -> String {
    let work = tempfile::tempdir().unwrap();
    let initrd = work.path().join("initrd");
    let mut cat = Vec::new();
    for p in initrds {
        cat.extend(std::fs::read(p).unwrap());
    }
    std::fs::write(&initrd, cat).unwrap();
    let log = work.path().join("console.log");
    let mut child = Command::new("qemu-system-x86_64")
        .args(["-accel", "tcg", "-cpu", "max", "-machine", "pc", "-m", "3072"])
        .args(["-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"])
        .arg("-serial")
        .arg(format!("file:{}", log.display()))
        .arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(&initrd)
        .arg("-append")
        .arg(cmdline)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting qemu-system-x86_64");
    let start = Instant::now();
    let text = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains(marker) {
            break text;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("QEMU exited ({status}) before {marker:?} appeared; console:\n{text}");
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{marker:?} did not appear within {timeout:?}; console:\n{text}");
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    eprintln!("booted to {marker:?} in {:.1}s", start.elapsed().as_secs_f64());
    let _ = child.kill();
    let _ = child.wait();
    text
}

pub fn sha256_hex(p: &Path) -> String {
    sh(&format!("sha256sum '{}' | cut -d' ' -f1", p.display())).trim().to_string()
}

/// Waits for `marker` in a console log written by `vm`; panics with the log when QEMU exits
/// first or `timeout` passes. Returns the log.
pub fn wait_console(log: &Path, marker: &str, vm: &mut std::process::Child, timeout: Duration) -> String {
    let start = Instant::now();
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.contains(marker) {
            eprintln!("{marker:?} after {:.1}s", start.elapsed().as_secs_f64());
            return text;
        }
        if let Ok(Some(status)) = vm.try_wait() {
            panic!("QEMU exited ({status}) before {marker:?}; console:\n{text}");
        }
        if start.elapsed() > timeout {
            panic!("{marker:?} did not appear within {timeout:?}; console:\n{text}");
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// A free TCP port on loopback (bound, then released for the caller).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A process killed (and reaped) on drop.
pub struct Running(pub std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `f()` once it is `Some`, trying every 100 ms for up to `within`.
pub fn poll<T>(within: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if start.elapsed() > within {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
