//! `kiln build-ipxe` end to end, driving the real `kiln` binary.
//!
//! Two kinds of test:
//! - everywhere: a stand-in iPXE tree whose Makefile writes small files, run with a PATH of
//!   stand-in compilers, covers the orchestration (store outputs, caching, --dest, --json,
//!   missing cross compilers, recipes and kiln.lock with a git source on disk);
//! - with a real iPXE tree in KILN_IPXE_SRC: the three default targets built with --vlan 1000,
//!   booted in QEMU (OVMF's PXE for snponly.efi, SeaBIOS and the NIC's ROM for undionly.kpxe)
//!   until the serial console shows net0-1000, rebuilt in another store byte for byte, and a
//!   changed embed or option gives another store path. Without KILN_IPXE_SRC they print
//!   "skipped: …" and pass. They make no network calls: QEMU's user network serves TFTP.
//!
//! The real builds share a store in the fixture cache
//! (`${KILN_FIXTURE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kiln/fixtures}/ipxe-store`), so a
//! rerun finds them there; a cold build takes ~2.5-3 minutes per platform on 2 cores.

use std::fs;
use std::io::Read as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::Value;

fn kiln() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_kiln"));
    c.env_remove("KILN_STORE").env_remove("SOURCE_DATE_EPOCH");
    c
}

fn show(cmd: &Command, out: &Output) -> String {
    format!(
        "{cmd:?}\nexit: {}\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs kiln; returns the output and a description for failure messages.
fn run(mut cmd: Command) -> (Output, String) {
    let out = cmd.output().expect("kiln runs");
    let shown = show(&cmd, &out);
    (out, shown)
}

/// The JSON lines kiln printed with --json.
fn json_lines(out: &Output) -> Vec<Value> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect()
}

fn sha256_hex(p: &Path) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(fs::read(p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()))))
}

fn program(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()).map(|d| d.join(name)).find(|p| p.is_file())
}

// ---------------------------------------------------------------------------------------------
// A stand-in iPXE tree and toolchain: runs everywhere.

const FAKE_MAKEFILE: &str = r#"# Stands in for iPXE's Makefile: each image records what it was built with.
%.efi %.kpxe:
	mkdir -p $(dir $@)
	printf 'image %s cross=%s embed=%s git=%s\n' '$@' '$(CROSS)' '$(EMBED)' '$(GITVERSION)' > $@
	cat config/local/general.h >> $@
	if [ -n '$(EMBED)' ]; then cat '$(EMBED)' >> $@; fi
"#;

fn fake_tree(dir: &Path) {
    fs::create_dir_all(dir.join("src/config/local")).unwrap();
    fs::write(dir.join("src/Makefile"), FAKE_MAKEFILE).unwrap();
    fs::write(dir.join("src/config/general.h"), "#define VLAN_CMD\n#undef DOWNLOAD_PROTO_HTTPS\n").unwrap();
    fs::write(dir.join("src/config/console.h"), "//#define CONSOLE_SERIAL\n").unwrap();
}

/// A PATH with the real make and shell tools, stand-in compilers, and no cross compiler.
fn fake_path(dir: &Path) -> PathBuf {
    fs::create_dir_all(dir).unwrap();
    for tool in ["make", "sh", "mkdir", "cat", "printf", "git"] {
        if let Some(real) = program(tool) {
            std::os::unix::fs::symlink(real, dir.join(tool)).unwrap();
        }
    }
    for tool in ["gcc", "ld", "objcopy", "perl"] {
        let p = dir.join(tool);
        fs::write(&p, format!("#!/bin/sh\necho '{tool} (stand-in) 1.0'\n")).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
    }
    dir.to_path_buf()
}

/// Skips (with a message) where the stand-in tests cannot mean anything.
fn stand_in_ok() -> bool {
    if std::env::consts::ARCH != "x86_64" {
        eprintln!("skipped: the stand-in toolchain tests assume an x86_64 host (arm64 is the cross target)");
        return false;
    }
    if program("make").is_none() {
        eprintln!("skipped: make is not installed (scripts/setup.sh installs it)");
        return false;
    }
    true
}

#[test]
fn missing_cross_compiler_fails_only_its_target_and_the_rest_is_cached() {
    if !stand_in_ok() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    fake_tree(&d.path().join("ipxe"));
    let path = fake_path(&d.path().join("bin"));
    let store = d.path().join("store");
    let dest = d.path().join("tftp");
    let build = || {
        let mut c = kiln();
        c.current_dir(d.path()).env("PATH", &path).arg("build-ipxe").arg("--store").arg(&store);
        c.args(["--source", "ipxe", "--vlan", "1000", "--json", "--dest", "tftp"]);
        c.args(["--target", "bin-x86_64-efi/snponly.efi", "--target", "bin-arm64-efi/snponly.efi"]);
        // Two build directories that can build, with cores for both at once: the parallel path.
        c.args(["--target", "bin-x86_64-efi/ipxe.efi", "--target", "bin-i386-efi/snponly.efi", "-j", "4"]);
        c
    };
    let (out, shown) = run(build());
    assert_eq!(out.status.code(), Some(1), "a failed target makes the exit code nonzero\n{shown}");
    let report = &json_lines(&out)[0];
    assert_eq!(report["path"], Value::Null, "no build output while a target is missing\n{shown}");
    assert_eq!(
        report["errors"],
        serde_json::json!([
            "bin-arm64-efi/snponly.efi: aarch64-linux-gnu-gcc not found; install gcc-aarch64-linux-gnu (Debian/Ubuntu)\n\
             bin-arm64-efi/snponly.efi: aarch64-linux-gnu-ld not found; install binutils-aarch64-linux-gnu (Debian/Ubuntu)\n\
             bin-arm64-efi/snponly.efi: aarch64-linux-gnu-objcopy not found; install binutils-aarch64-linux-gnu (Debian/Ubuntu)"
        ]),
        "{shown}"
    );
    let targets = report["targets"].as_array().unwrap();
    for t in [&targets[0], &targets[2], &targets[3]] {
        assert_eq!(t["status"], "built", "{shown}");
        let file = PathBuf::from(t["path"].as_str().unwrap());
        assert_eq!(sha256_hex(&file), t["sha256"].as_str().unwrap());
        let copied = dest.join(t["file"].as_str().unwrap());
        assert_eq!(fs::read(&copied).unwrap(), fs::read(&file).unwrap(), "--dest holds the same bytes");
    }
    assert_eq!(targets[0]["file"], "bin-x86_64-efi-snponly.efi");
    assert_eq!(targets[1]["status"], "failed");
    let image = fs::read_to_string(targets[0]["path"].as_str().unwrap()).unwrap();
    assert!(image.starts_with("image bin-x86_64-efi/snponly.efi cross= embed=kiln-embed/kiln.ipxe git=\n"), "{image}");
    assert!(image.contains("#define VLAN_CMD") && image.contains("vcreate --tag 1000 net0"), "{image}");
    assert!(!d.path().join("ipxe/src/config/local/general.h").exists(), "the source tree is never written");
    assert!(!d.path().join("ipxe/src/bin-x86_64-efi").exists(), "the source tree is never written");

    // The same inputs again: both built targets come from the store, nothing is run.
    let (again, shown) = run(build());
    let again = &json_lines(&again)[0];
    for i in [0, 2, 3] {
        assert_eq!(again["targets"][i]["status"], "cached", "{shown}");
        assert_eq!(again["targets"][i]["path"], targets[i]["path"]);
    }

    // With only what can be built, the build's own output exists and holds both binaries.
    let mut c = kiln();
    c.current_dir(d.path()).env("PATH", &path).arg("build-ipxe").arg("--store").arg(&store);
    c.args(["--source", "ipxe", "--vlan", "1000", "--quiet"]);
    c.args(["--target", "bin-x86_64-efi/snponly.efi", "--target", "bin-x86_64-efi/ipxe.efi"]);
    let (out, shown) = run(c);
    assert!(out.status.success(), "{shown}");
    let set = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    assert!(
        set.join("bin-x86_64-efi-snponly.efi").is_file() && set.join("bin-x86_64-efi-ipxe.efi").is_file(),
        "{shown}"
    );
    let manifest: Value = serde_json::from_slice(&fs::read(set.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["kind"], "ipxe");
    assert_eq!(manifest["targets"]["bin-x86_64-efi/snponly.efi"]["file"], "bin-x86_64-efi-snponly.efi");

    let mut c = kiln();
    c.args(["store", "verify", "--store"]).arg(&store);
    let (out, shown) = run(c);
    assert!(out.status.success(), "every ipxe output matches its manifest\n{shown}");
}

#[test]
fn options_and_embeds_change_the_store_path() {
    if !stand_in_ok() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    fake_tree(&d.path().join("ipxe"));
    let path = fake_path(&d.path().join("bin"));
    let store = d.path().join("store");
    fs::write(d.path().join("site.ipxe"), "#!ipxe\necho site\n").unwrap();
    let path_of = |extra: &[&str]| {
        let mut c = kiln();
        c.current_dir(d.path()).env("PATH", &path).arg("build-ipxe").arg("--store").arg(&store);
        c.args(["--source", "ipxe", "--target", "bin-x86_64-efi/snponly.efi", "--json"]).args(extra);
        let (out, shown) = run(c);
        assert!(out.status.success(), "{shown}");
        let r = &json_lines(&out)[0];
        (r["path"].as_str().unwrap().to_string(), r["targets"][0]["sha256"].as_str().unwrap_or("").to_string())
    };
    let plain = path_of(&[]);
    let vlan = path_of(&["--vlan", "1000"]);
    let vlan2 = path_of(&["--vlan", "1001"]);
    let https = path_of(&["--vlan", "1000", "--option", "DOWNLOAD_PROTO_HTTPS"]);
    let no_fb = path_of(&["--vlan", "1000", "--no-option", "CONSOLE_FRAMEBUFFER"]);
    let site = path_of(&["--embed", "site.ipxe"]);
    let dry = path_of(&["--vlan", "1000", "--option", "DOWNLOAD_PROTO_HTTPS", "--dry-run"]);
    let paths = [&plain.0, &vlan.0, &vlan2.0, &https.0, &no_fb.0, &site.0];
    for (i, a) in paths.iter().enumerate() {
        for b in &paths[i + 1..] {
            assert_ne!(a, b, "different inputs share a store path");
        }
    }
    assert_eq!(dry.0, https.0, "--dry-run names the path a build would use");
    assert_eq!(path_of(&["--vlan", "1000"]), vlan, "same inputs, same path and bytes");
    let err = {
        let mut c = kiln();
        c.current_dir(d.path()).env("PATH", &path).arg("build-ipxe").arg("--store").arg(&store);
        c.args(["--source", "ipxe", "--option", "DOWNLOAD_PROTO_HTTP5"]);
        let (out, shown) = run(c);
        assert_eq!(out.status.code(), Some(1), "{shown}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    assert!(err.contains("option DOWNLOAD_PROTO_HTTP5 is not defined in any"), "{err}");
}

#[test]
fn recipe_builds_pin_git_sources_in_kiln_lock() {
    if !stand_in_ok() {
        return;
    }
    if program("git").is_none() {
        eprintln!("skipped: git is not installed");
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let repo = d.path().join("ipxe.git");
    fake_tree(&repo);
    let git = |args: &[&str]| {
        let st = Command::new("git")
            .arg("-C")
            .arg(&repo)
            .args(["-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"])
            .args(args)
            .status()
            .unwrap();
        assert!(st.success(), "git {args:?}");
    };
    git(&["init", "-q", "-b", "main"]);
    git(&["add", "."]);
    git(&["commit", "-q", "-m", "fake ipxe"]);
    let path = fake_path(&d.path().join("bin"));
    let recipe = format!(
        "[ipxe.site]\ntargets = [\"bin-x86_64-efi/snponly.efi\"]\nvlan = 1000\nsource = {{ git = \"file://{}\", rev = \"main\" }}\n",
        repo.display()
    );
    fs::write(d.path().join("kiln.toml"), recipe).unwrap();
    let store = d.path().join("store");
    let build = |extra: &[&str]| {
        let mut c = kiln();
        c.current_dir(d.path())
            .env("PATH", &path)
            .arg("build-ipxe")
            .arg("--store")
            .arg(&store)
            .arg("--json")
            .args(extra);
        run(c)
    };
    let (out, shown) = build(&[]);
    assert!(out.status.success(), "{shown}");
    let report = &json_lines(&out)[0];
    assert_eq!(report["name"], "site");
    let commit = report["source"]["commit"].as_str().unwrap().to_string();
    let lock = fs::read_to_string(d.path().join("kiln.lock")).unwrap();
    assert!(lock.contains("[ipxe.site]") && lock.contains(&format!("commit = \"{commit}\"")), "{lock}");
    let image = fs::read_to_string(report["targets"][0]["path"].as_str().unwrap()).unwrap();
    assert!(image.contains(&format!("git={commit}")), "the version string names the commit: {image}");

    // A new commit upstream does not change a locked build; --update picks it up.
    fs::write(repo.join("src/config/console.h"), "//#define CONSOLE_SERIAL\n// changed\n").unwrap();
    git(&["commit", "-q", "-am", "change"]);
    let (out, shown) = build(&["--locked"]);
    assert!(out.status.success(), "{shown}");
    assert_eq!(json_lines(&out)[0]["source"]["commit"], commit.as_str());
    assert_eq!(json_lines(&out)[0]["targets"][0]["status"], "cached");
    let (out, shown) = build(&["--update"]);
    assert!(out.status.success(), "{shown}");
    let updated = json_lines(&out)[0]["source"]["commit"].as_str().unwrap().to_string();
    assert_ne!(updated, commit);
    assert!(fs::read_to_string(d.path().join("kiln.lock")).unwrap().contains(&updated));

    fs::write(d.path().join("kiln.toml"), "[ipxe.site]\nvlna = 1000\n").unwrap();
    let (out, shown) = build(&[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("kiln.toml: [ipxe.site]") && err.contains("unknown field `vlna`"), "{shown}");
}

// ---------------------------------------------------------------------------------------------
// A real iPXE tree (KILN_IPXE_SRC).

fn ipxe_src() -> Option<PathBuf> {
    match std::env::var_os("KILN_IPXE_SRC").filter(|v| !v.is_empty()) {
        Some(p) => Some(PathBuf::from(p)),
        None => {
            eprintln!(
                "skipped: KILN_IPXE_SRC is not set; point it at an iPXE checkout \
                 (git clone https://github.com/ipxe/ipxe) to build and boot real iPXE"
            );
            None
        }
    }
}

fn fixture_cache() -> PathBuf {
    if let Some(p) = std::env::var_os("KILN_FIXTURE_CACHE").filter(|v| !v.is_empty()) {
        return PathBuf::from(p);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").expect("HOME is set")).join(".cache"));
    base.join("kiln/fixtures")
}

/// The three default targets with --vlan 1000, built once per test run (in the shared store).
struct RealBuild {
    src: PathBuf,
    store: PathBuf,
    report: Value,
}

impl RealBuild {
    fn target(&self, name: &str) -> &Value {
        self.report["targets"].as_array().unwrap().iter().find(|t| t["target"] == name).expect("target in the report")
    }

    fn file(&self, name: &str) -> PathBuf {
        PathBuf::from(self.target(name)["path"].as_str().unwrap())
    }
}

fn real_build() -> Option<&'static RealBuild> {
    static BUILT: OnceLock<Option<RealBuild>> = OnceLock::new();
    let src = ipxe_src()?;
    BUILT
        .get_or_init(|| {
            let store = fixture_cache().join("ipxe-store");
            let mut c = kiln();
            c.arg("build-ipxe").arg("--store").arg(&store).arg("--source").arg(&src).args(["--vlan", "1000", "--json"]);
            let started = Instant::now();
            let (out, shown) = run(c);
            assert!(out.status.success(), "{shown}");
            eprintln!("real iPXE build (3 targets, --vlan 1000) took {:?}", started.elapsed());
            Some(RealBuild { src: src.clone(), store, report: json_lines(&out).remove(0) })
        })
        .as_ref()
}

#[test]
fn real_default_targets_build_with_vlan_and_rebuild_from_the_store() {
    let Some(b) = real_build() else { return };
    assert!(b.report["errors"].as_array().unwrap().is_empty(), "{}", b.report);
    for (t, min, max) in [
        ("bin-x86_64-efi/snponly.efi", 100_000, 1_000_000),
        ("bin-x86_64-pcbios/undionly.kpxe", 40_000, 400_000),
        ("bin-arm64-efi/snponly.efi", 100_000, 1_000_000),
    ] {
        let size = b.target(t)["size"].as_u64().unwrap();
        assert!((min..max).contains(&size), "{t}: {size} bytes");
        assert_eq!(sha256_hex(&b.file(t)), b.target(t)["sha256"].as_str().unwrap());
        let bytes = fs::read(b.file(t)).unwrap();
        if let Some(arch) = t.strip_prefix("bin-").and_then(|r| r.strip_suffix("-efi/snponly.efi")) {
            // A PE image for the right machine, with the script in it (EFI images are not compressed).
            let pe = u32::from_le_bytes(bytes[0x3c..0x40].try_into().unwrap()) as usize;
            assert_eq!(&bytes[pe..pe + 4], b"PE\0\0", "{t} is a PE image");
            let machine = u16::from_le_bytes([bytes[pe + 4], bytes[pe + 5]]);
            assert_eq!(machine, if arch == "arm64" { 0xaa64 } else { 0x8664 }, "{t}");
            assert!(bytes.windows(23).any(|w| w == b"vcreate --tag 1000 net0"), "{t} embeds the --vlan script");
        }
    }

    // Same inputs: no work, same path.
    let mut c = kiln();
    c.arg("build-ipxe").arg("--store").arg(&b.store).arg("--source").arg(&b.src).args(["--vlan", "1000", "--json"]);
    let started = Instant::now();
    let (out, shown) = run(c);
    assert!(out.status.success(), "{shown}");
    let again = &json_lines(&out)[0];
    assert_eq!(again["cached"], true, "{shown}");
    assert_eq!(again["path"], b.report["path"]);
    assert!(started.elapsed() < Duration::from_secs(30), "a cached build took {:?}", started.elapsed());
}

#[test]
fn real_rebuild_elsewhere_is_byte_identical_and_inputs_change_the_path() {
    let Some(b) = real_build() else { return };
    // Another store: another work tree path, another time. Only the EFI binary is path- and
    // time-sensitive (link timestamp, build id); undionly.kpxe was identical as is.
    let other = tempfile::tempdir().unwrap();
    let t = "bin-x86_64-efi/snponly.efi";
    let mut c = kiln();
    c.arg("build-ipxe").arg("--store").arg(other.path().join("deeper/store"));
    c.arg("--source").arg(&b.src).args(["--vlan", "1000", "--json", "--target", t]);
    let (out, shown) = run(c);
    assert!(out.status.success(), "{shown}");
    let r = &json_lines(&out)[0];
    assert_eq!(r["targets"][0]["status"], "built", "{shown}");
    assert_eq!(
        r["targets"][0]["sha256"],
        b.target(t)["sha256"],
        "rebuilt in another directory, the bytes differ\n{shown}"
    );
    let first = PathBuf::from(b.target(t)["path"].as_str().unwrap());
    let second = PathBuf::from(r["targets"][0]["path"].as_str().unwrap());
    assert_eq!(
        first.parent().unwrap().file_name(),
        second.parent().unwrap().file_name(),
        "same inputs, same store name"
    );

    // A changed embed relinks (seconds) and lands elsewhere, with other bytes.
    let mut c = kiln();
    c.arg("build-ipxe").arg("--store").arg(other.path().join("deeper/store"));
    c.arg("--source").arg(&b.src).args(["--vlan", "1001", "--json", "--target", t]);
    let (out, shown) = run(c);
    assert!(out.status.success(), "{shown}");
    let r1001 = &json_lines(&out)[0];
    assert_ne!(r1001["targets"][0]["path"], r["targets"][0]["path"]);
    assert_ne!(r1001["targets"][0]["sha256"], r["targets"][0]["sha256"]);

    // A changed option names another path (checked without the platform rebuild it would cost).
    let mut c = kiln();
    c.arg("build-ipxe").arg("--store").arg(&b.store).arg("--source").arg(&b.src);
    c.args(["--vlan", "1000", "--json", "--dry-run", "--option", "DOWNLOAD_PROTO_HTTPS"]);
    let (out, shown) = run(c);
    assert!(out.status.success(), "{shown}");
    let dry = &json_lines(&out)[0];
    for (i, target) in dry["targets"].as_array().unwrap().iter().enumerate() {
        assert_eq!(target["status"], "would-build", "{shown}");
        assert_ne!(target["path"], b.report["targets"][i]["path"]);
    }
    assert_ne!(dry["path"], b.report["path"]);
}

// ---------------------------------------------------------------------------------------------
// QEMU: boot the built binaries over PXE (QEMU's user-network TFTP) and read the serial console.

/// A QEMU process, killed (by PID) and reaped when dropped.
struct Vm(Child);

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn qemu_ok() -> bool {
    if program("qemu-system-x86_64").is_none() {
        eprintln!("skipped: qemu-system-x86_64 is not installed (scripts/setup.sh installs qemu-system-x86)");
        return false;
    }
    true
}

/// Boots a PXE guest whose TFTP root is `tftp` and boot file `bootfile` until the serial log
/// shows `marker` or `timeout` passes; returns the log.
fn pxe_boot(firmware: &str, tftp: &Path, bootfile: &str, marker: &str, timeout: Duration) -> String {
    let work = tempfile::tempdir().unwrap();
    let log = work.path().join("serial.log");
    let screen = work.path().join("screen.log");
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-accel", "tcg", "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot", "-m", "256"]);
    cmd.arg("-serial").arg(format!("file:{}", log.display()));
    cmd.arg("-netdev").arg(format!("user,id=n0,restrict=on,tftp={},bootfile={bootfile}", tftp.display()));
    match firmware {
        "ovmf" => {
            let vars = work.path().join("OVMF_VARS.fd");
            fs::copy("/usr/share/OVMF/OVMF_VARS_4M.fd", &vars).expect("OVMF (package ovmf) is installed");
            cmd.args(["-machine", "q35"]);
            cmd.args(["-drive", "if=pflash,format=raw,unit=0,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd"]);
            cmd.arg("-drive").arg(format!("if=pflash,format=raw,unit=1,file={}", vars.display()));
            // romfile= (empty): OVMF's own PXE, not an iPXE option ROM, loads the binary.
            cmd.args(["-device", "virtio-net-pci,netdev=n0,romfile=,bootindex=1"]);
        }
        "seabios" => {
            // SeaBIOS copies the text screen (its own, the NIC ROM's and iPXE's BIOS console)
            // to COM2, so COM1 holds only what iPXE's serial console writes: the two would
            // interleave character by character on one port.
            let sercon = work.path().join("sercon");
            fs::write(&sercon, [0xf8, 0x02]).unwrap();
            cmd.args(["-machine", "pc", "-device", "virtio-net-pci,netdev=n0,bootindex=1"]);
            cmd.arg("-fw_cfg").arg(format!("name=etc/sercon-port,file={}", sercon.display()));
            cmd.arg("-serial").arg(format!("file:{}", screen.display()));
        }
        other => panic!("unknown firmware {other}"),
    }
    cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
    let shown = format!("{cmd:?}");
    let mut vm = Vm(cmd.spawn().unwrap_or_else(|e| panic!("starting {shown}: {e}")));
    let started = Instant::now();
    loop {
        let text = String::from_utf8_lossy(&fs::read(&log).unwrap_or_default()).into_owned();
        if shows(&text, marker) {
            eprintln!("{firmware}: {marker} after {:?}", started.elapsed());
            return text;
        }
        if let Ok(Some(status)) = vm.0.try_wait() {
            let mut err = String::new();
            let _ = vm.0.stderr.take().map(|mut e| e.read_to_string(&mut err));
            panic!(
                "QEMU exited ({status}) before {marker:?}\n{shown}\nstderr: {err}\nserial:\n{text}{}",
                screen_text(&screen)
            );
        }
        if started.elapsed() > timeout {
            drop(vm);
            panic!(
                "no {marker:?} on the serial console within {timeout:?}\n{shown}\nserial:\n{text}{}",
                screen_text(&screen)
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Whether the serial log shows `what`. With CONSOLE_SERIAL, iPXE writes to the serial port
/// itself; under firmware that also copies its console there (OVMF), every character arrives
/// twice.
fn shows(log: &str, what: &str) -> bool {
    let doubled: String = what.chars().flat_map(|c| [c, c]).collect();
    log.contains(what) || log.contains(&doubled)
}

fn screen_text(screen: &Path) -> String {
    match fs::read(screen) {
        Ok(b) => format!("\nscreen (COM2):\n{}", String::from_utf8_lossy(&b)),
        Err(_) => String::new(),
    }
}

#[test]
fn real_snponly_efi_boots_in_ovmf_and_creates_the_vlan() {
    let Some(b) = real_build() else { return };
    if !qemu_ok() {
        return;
    }
    let tftp = tempfile::tempdir().unwrap();
    fs::copy(b.file("bin-x86_64-efi/snponly.efi"), tftp.path().join("snponly.efi")).unwrap();
    let log = pxe_boot("ovmf", tftp.path(), "snponly.efi", "net0-1000", Duration::from_secs(150));
    assert!(shows(&log, "iPXE 2."), "the iPXE that ran is the one built: {log}");
}

#[test]
fn real_undionly_kpxe_boots_in_seabios_and_creates_the_vlan() {
    let Some(b) = real_build() else { return };
    if !qemu_ok() {
        return;
    }
    let tftp = tempfile::tempdir().unwrap();
    fs::copy(b.file("bin-x86_64-pcbios/undionly.kpxe"), tftp.path().join("undionly.kpxe")).unwrap();
    let log = pxe_boot("seabios", tftp.path(), "undionly.kpxe", "net0-1000", Duration::from_secs(150));
    assert!(shows(&log, "iPXE 2."), "the iPXE that ran is the one built, not the NIC ROM's: {log}");
}
