//! kiln as an installed tool: help within 100 columns, man pages that `man` renders, completions that bash
//! loads, progress output (bars on a terminal, a line per step in a pipe, nothing with --quiet), the Debian
//! package of scripts/package-deb.sh (its listing, its reproducibility, an install into clean Debian 12 trees),
//! the systemd unit (`systemd-analyze verify`), and `kiln serve` as that unit runs it: an unprivileged user with
//! CAP_NET_BIND_SERVICE only, answering a real DHCP client through an interface-bound socket and telling its
//! NOTIFY_SOCKET READY=1 and STOPPING=1.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use clap::CommandFactory;
use common::*;

fn kiln_bin() -> &'static str {
    env!("CARGO_BIN_EXE_kiln")
}

fn run(cmd: &mut Command) -> std::process::Output {
    let shown = format!("{cmd:?}");
    let out = cmd.output().unwrap_or_else(|e| panic!("starting {shown}: {e}"));
    assert!(
        out.status.success(),
        "{shown} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn is_root() -> bool {
    sh("id -u").trim() == "0"
}

/// Every command path: [], ["build"], ["store", "ls"], …
fn command_paths() -> Vec<Vec<String>> {
    fn walk(cmd: &clap::Command, prefix: Vec<String>, out: &mut Vec<Vec<String>>) {
        out.push(prefix.clone());
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set() && s.get_name() != "help") {
            let mut p = prefix.clone();
            p.push(sub.get_name().to_string());
            walk(sub, p, out);
        }
    }
    let mut out = Vec::new();
    walk(&kiln::cli::Cli::command(), Vec::new(), &mut out);
    out
}

#[test]
fn help_fits_in_100_columns() {
    let paths = command_paths();
    assert!(paths.len() > 10, "{paths:?}");
    let mut long = Vec::new();
    for path in &paths {
        for flag in ["-h", "--help"] {
            // A wide terminal: clap must still stop at max_term_width.
            let out = run(Command::new(kiln_bin()).args(path).arg(flag).env("COLUMNS", "250"));
            for line in String::from_utf8_lossy(&out.stdout).lines() {
                if line.chars().count() > 100 {
                    long.push(format!("kiln {} {flag}: {} columns: {line}", path.join(" "), line.chars().count()));
                }
            }
        }
    }
    assert!(long.is_empty(), "help lines over 100 columns:\n{}", long.join("\n"));
}

#[test]
fn man_pages_render_with_man() {
    let dir = tempfile::tempdir().unwrap();
    let out = run(Command::new(kiln_bin()).arg("man").arg("--out-dir").arg(dir.path()));
    let listed = String::from_utf8(out.stdout).unwrap();
    // A page per command, named the way `man kiln-store-gc` looks it up.
    for path in command_paths() {
        let name = if path.is_empty() { "kiln".to_string() } else { format!("kiln-{}", path.join("-")) };
        let page = dir.path().join(format!("{name}.1"));
        assert!(listed.contains(&page.display().to_string()), "{name}.1 not listed:\n{listed}");
        let shown = run(Command::new("man").arg("--warnings").arg("-l").arg(&page).env("MANWIDTH", "100"));
        let text = String::from_utf8_lossy(&shown.stdout);
        let warnings = String::from_utf8_lossy(&shown.stderr);
        assert!(warnings.trim().is_empty(), "man warns about {name}.1:\n{warnings}");
        assert!(text.contains("NAME") && text.contains("SYNOPSIS"), "{name}.1 renders without its sections:\n{text}");
        assert!(text.contains(&name), "{name}.1 does not name its command:\n{text}");
    }
    // One page on stdout, as `kiln man serve | man -l -` reads it.
    let serve = run(Command::new(kiln_bin()).args(["man", "serve"]));
    assert_eq!(serve.stdout, fs::read(dir.path().join("kiln-serve.1")).unwrap());
    let err = Command::new(kiln_bin()).args(["man", "serv"]).output().unwrap();
    assert!(!err.status.success());
    let msg = String::from_utf8_lossy(&err.stderr);
    assert!(msg.contains("no page \"kiln-serv\"") && msg.contains("kiln-serve"), "{msg}");
}

#[test]
fn bash_loads_the_completions_and_completes() {
    let script = format!(
        "source <('{kiln}' completions bash) && complete -p kiln && \
         COMP_WORDS=(kiln se) COMP_CWORD=1 COMP_LINE='kiln se' COMP_POINT=7 && _kiln kiln se kiln && \
         echo \"words: ${{COMPREPLY[*]}}\" && \
         COMP_WORDS=(kiln serve --dh) COMP_CWORD=2 COMP_LINE='kiln serve --dh' COMP_POINT=15 && \
         _kiln kiln --dh serve && echo \"options: ${{COMPREPLY[*]}}\"",
        kiln = kiln_bin()
    );
    let out = run(Command::new("bash").arg("-c").arg(script));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains(" -F _kiln kiln\n"), "{text}");
    assert!(text.contains("words: serve"), "`kiln se<TAB>` should offer serve:\n{text}");
    assert!(text.contains("options: --dhcp --dhcp-port") || text.contains("options: --dhcp-port --dhcp"), "{text}");
}

#[test]
fn zsh_and_fish_parse_their_completions() {
    let dir = tempfile::tempdir().unwrap();
    for (shell, check) in [("zsh", &["-n"][..]), ("fish", &["--no-execute"][..])] {
        if !have(shell) {
            eprintln!("skipped: {shell} is not installed (scripts/setup.sh installs it)");
            continue;
        }
        let out = run(Command::new(kiln_bin()).args(["completions", shell]));
        let file = dir.path().join(format!("kiln.{shell}"));
        fs::write(&file, &out.stdout).unwrap();
        run(Command::new(shell).args(check).arg(&file));
    }
    let bad = Command::new(kiln_bin()).args(["completions", "tcsh"]).output().unwrap();
    assert!(!bad.status.success());
    let msg = String::from_utf8_lossy(&bad.stderr);
    assert!(msg.contains("bash") && msg.contains("zsh") && msg.contains("fish"), "{msg}");
}

// ---- progress ----

fn tiny_archive() -> String {
    format!("oci-archive:{}", tiny().join("tiny.oci.tar").display())
}

#[test]
fn progress_is_a_line_per_step_in_a_pipe_and_nothing_when_quiet() {
    let work = tempfile::tempdir().unwrap();
    let src = tiny_archive();
    let out = kiln(work.path(), &work.path().join("store1"), &["build", "--from", &src, "--name", "tiny"]);
    assert!(out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    let lines: Vec<&str> = err.lines().collect();
    let reading = lines.iter().find(|l| l.starts_with("build tiny: reading 2 layer(s) of ")).unwrap_or_else(|| {
        panic!("no step line for reading the layers:\n{err}");
    });
    // Bytes and rate where they are known: the layers read, the image's contents written.
    assert!(reading.contains(" MiB, ") && reading.ends_with("/s"), "{reading}");
    let writing = lines.iter().find(|l| l.starts_with("build tiny: writing image (")).expect("image step");
    assert!(writing.contains(" MiB, ") && writing.ends_with("/s"), "{writing}");
    assert!(lines.iter().any(|l| l.starts_with("build tiny: finding the kernel: ")), "{err}");
    assert!(!err.contains('\u{1b}') && !err.contains('\r'), "terminal control codes in a pipe:\n{err:?}");
    let path = String::from_utf8(out.stdout).unwrap();
    assert!(lines.last().unwrap().ends_with(path.trim()), "the last line names the result:\n{err}");

    let quiet = kiln(work.path(), &work.path().join("store2"), &["--quiet", "build", "--from", &src, "--name", "tiny"]);
    assert!(quiet.status.success());
    assert_eq!(String::from_utf8_lossy(&quiet.stderr), "", "--quiet printed on stderr");
    let quiet_path = String::from_utf8(quiet.stdout).unwrap();
    assert!(
        quiet_path.lines().count() == 1 && quiet_path.ends_with("-tiny\n"),
        "--quiet prints the result: {quiet_path}"
    );
}

#[test]
fn progress_counts_the_bytes_of_a_registry_pull() {
    if !have("docker-registry") || !have("skopeo") {
        eprintln!("skipped: docker-registry and skopeo are needed (scripts/setup.sh installs them)");
        return;
    }
    // A real registry on loopback (Debian's docker-registry), fed by skopeo; stopped on drop.
    struct Registry(Child);
    impl Drop for Registry {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let work = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let config = work.path().join("registry.yml");
    fs::write(
        &config,
        format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: \
             127.0.0.1:{port}\n",
            work.path().join("registry").display()
        ),
    )
    .unwrap();
    let _registry = Registry(
        Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting docker-registry"),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "the registry did not listen on port {port} within 30 s");
        std::thread::sleep(Duration::from_millis(50));
    }
    let reference = format!("docker://127.0.0.1:{port}/kiln/tiny:latest");
    sh(&format!(
        "skopeo copy --quiet --dest-tls-verify=false 'oci:{}:latest' '{reference}'",
        tiny().join("oci").display()
    ));
    let out = kiln(
        work.path(),
        &work.path().join("store"),
        &["build", "--from", &reference, "--name", "tiny", "--tls-verify=false"],
    );
    assert!(out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    let pulling =
        err.lines().find(|l| l.starts_with("build tiny: pulling 2 layer(s) of docker://")).unwrap_or_else(|| {
            panic!("no step line for the pull:\n{err}");
        });
    assert!(pulling.contains(" MiB, ") && pulling.ends_with("/s"), "{pulling}");
    assert!(err.lines().any(|l| l.starts_with("build tiny: reading 2 layer(s) of docker://")), "{err}");
}

/// Runs `kiln ARGS` on a pseudo-terminal (util-linux `script`); returns everything it drew.
fn on_terminal(work: &Path, store: &Path, args: &[&str]) -> String {
    let command = std::iter::once(kiln_bin()).chain(args.iter().copied()).collect::<Vec<_>>().join(" ");
    let typescript = work.join("typescript");
    let mut child = Command::new("script")
        .args(["--quiet", "--return", "--command", &command])
        .arg(&typescript)
        .current_dir(work)
        .env("KILN_STORE", store)
        .env("COLUMNS", "100")
        .env("TERM", "xterm")
        // An open stdin that sends nothing (CI has none; script ends when its input does).
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running script (util-linux)");
    // Held open until kiln is done: waiting on a child closes its stdin, and script, seeing its input end, may
    // end the session under kiln.
    let stdin = child.stdin.take();
    let out = child.wait_with_output().unwrap();
    drop(stdin);
    let text = fs::read_to_string(&typescript).unwrap_or_default();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "kiln {args:?} on a terminal failed ({}):\n{text}\nscript said: {said}", out.status);
    text
}

#[test]
fn progress_draws_bars_with_bytes_and_rate_on_a_terminal() {
    let work = tempfile::tempdir().unwrap();
    // Large enough (190 MB of files) that the bars are drawn several times.
    let src = format!("oci:{}", debian().join("oci").display());
    let text = on_terminal(work.path(), &work.path().join("store"), &["build", "--from", &src, "--name", "deb"]);
    assert!(text.contains("\u{1b}["), "no terminal drawing:\n{text:?}");
    // The bar of a step whose size is known: position, total, rate, ETA.
    assert!(text.contains(" MiB/") && text.contains("MiB/s") && text.contains(" eta "), "no byte bar:\n{text}");
    // The finished steps stay on screen as lines.
    assert!(text.contains("build deb: reading 2 layer(s) of "), "{text}");
    assert!(text.contains("build deb: writing image ("), "{text}");
}

// ---- the Debian package ----

struct Deb {
    path: PathBuf,
    _dir: tempfile::TempDir,
}

/// The package of the binary under test, built once for all the tests here.
fn deb() -> &'static Path {
    static DEB: OnceLock<Deb> = OnceLock::new();
    &DEB.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let path = package(dir.path());
        Deb { path, _dir: dir }
    })
    .path
}

/// kiln-node as scripts/test.sh built it (`$KILN_NODE`), else built here the same way.
fn node_bin() -> PathBuf {
    static NODE: OnceLock<PathBuf> = OnceLock::new();
    NODE.get_or_init(|| match std::env::var_os("KILN_NODE").filter(|v| !v.is_empty()) {
        Some(p) => PathBuf::from(p),
        None => {
            let out = run(Command::new("bash").arg(repo().join("scripts/build-node.sh")).env("PROFILE", "dev"));
            PathBuf::from(String::from_utf8(out.stdout).unwrap().lines().last().expect("build-node.sh printed a path"))
        }
    })
    .clone()
}

fn package(out: &Path) -> PathBuf {
    let start = Instant::now();
    let built = run(Command::new("bash")
        .arg(repo().join("scripts/package-deb.sh"))
        .arg("--binary")
        .arg(kiln_bin())
        .arg("--node")
        .arg(node_bin())
        .arg("--out")
        .arg(out)
        .env("SOURCE_DATE_EPOCH", "1700000000"));
    eprintln!("packaged in {:.1}s", start.elapsed().as_secs_f64());
    let text = String::from_utf8(built.stdout).unwrap();
    PathBuf::from(text.lines().last().expect("package-deb.sh printed the .deb").trim())
}

#[test]
fn deb_lists_what_it_installs_and_is_reproducible() {
    if !have("dpkg-deb") || !have("dpkg-shlibdeps") {
        eprintln!("skipped: dpkg-deb and dpkg-shlibdeps (dpkg-dev) are needed; scripts/setup.sh installs them");
        return;
    }
    let deb = deb();
    let name = deb.file_name().unwrap().to_string_lossy().into_owned();
    assert!(name.starts_with(&format!("kiln_{}-1_", env!("CARGO_PKG_VERSION"))) && name.ends_with(".deb"), "{name}");
    let listing = String::from_utf8(run(Command::new("dpkg-deb").arg("-c").arg(deb)).stdout).unwrap();
    let mut wanted = vec![
        "./usr/bin/kiln".to_string(),
        "./usr/lib/kiln/kiln-node".to_string(),
        "./lib/systemd/system/kiln-serve.service".to_string(),
        "./usr/lib/sysusers.d/kiln.conf".to_string(),
        "./usr/lib/tmpfiles.d/kiln.conf".to_string(),
        "./usr/share/bash-completion/completions/kiln".to_string(),
        "./usr/share/zsh/vendor-completions/_kiln".to_string(),
        "./usr/share/fish/vendor_completions.d/kiln.fish".to_string(),
        "./usr/share/doc/kiln/copyright".to_string(),
        "./usr/share/doc/kiln/changelog.Debian.gz".to_string(),
        "./usr/share/doc/kiln/install.md".to_string(),
    ];
    for path in command_paths() {
        let page = if path.is_empty() { "kiln".to_string() } else { format!("kiln-{}", path.join("-")) };
        wanted.push(format!("./usr/share/man/man1/{page}.1.gz"));
    }
    for path in &wanted {
        assert!(listing.lines().any(|l| l.ends_with(&format!(" {path}"))), "{path} missing from:\n{listing}");
    }
    assert!(listing.lines().all(|l| l.contains(" root/root ")), "files not owned by root:\n{listing}");
    assert!(
        listing.lines().any(|l| l.starts_with("-rwxr-xr-x") && l.ends_with(" ./usr/bin/kiln")),
        "kiln is not 0755:\n{listing}"
    );
    let field = |f: &str| String::from_utf8(run(Command::new("dpkg-deb").arg("-f").arg(deb).arg(f)).stdout).unwrap();
    assert_eq!(field("Package").trim(), "kiln");
    assert!(field("Depends").contains("libc6 (>= "), "{}", field("Depends"));
    assert!(field("Recommends").contains("skopeo"));
    // No conffiles: the unit lives in /lib and is changed with drop-ins, the recipe is the admin's.
    let control = tempfile::tempdir().unwrap();
    run(Command::new("dpkg-deb").arg("-e").arg(deb).arg(control.path()));
    assert!(!control.path().join("conffiles").exists());
    for script in ["postinst", "prerm", "postrm"] {
        run(Command::new("sh").arg("-n").arg(control.path().join(script)));
    }

    // Byte for byte the same when built again elsewhere.
    let again = tempfile::tempdir().unwrap();
    let second = package(again.path());
    assert_eq!(sha256_hex(deb), sha256_hex(&second), "two builds of the package differ: diffoscope explains");
}

/// A directory tree to chroot into, removed (with what is mounted in it) on drop.
struct Chroot {
    dir: tempfile::TempDir,
}

impl Chroot {
    fn root(&self) -> &Path {
        self.dir.path()
    }

    /// Runs `cmd` (through sh) inside, with a clean environment; returns stdout.
    fn sh(&self, cmd: &str) -> String {
        let out = run(Command::new("chroot")
            .arg(self.root())
            .args(["/usr/bin/env", "-i", "PATH=/usr/sbin:/usr/bin:/sbin:/bin", "DEBIAN_FRONTEND=noninteractive"])
            .args(["LANG=C.UTF-8", "/bin/sh", "-c", cmd]));
        String::from_utf8(out.stdout).unwrap()
    }

    /// A fresh tree from a Debian 12 root filesystem tarball, with the device nodes dpkg and apt use.
    fn from_tarball(tarball: &Path) -> Chroot {
        let dir = tempfile::tempdir().unwrap();
        run(Command::new("tar").arg("-xf").arg(tarball).arg("-C").arg(dir.path()));
        let chroot = Chroot { dir };
        for (name, minor) in [("null", 3), ("zero", 5), ("random", 8), ("urandom", 9)] {
            let node = chroot.root().join("dev").join(name);
            let _ = fs::remove_file(&node);
            run(Command::new("mknod").args(["-m", "666"]).arg(&node).args(["c", "1", &minor.to_string()]));
        }
        chroot
    }

    /// `apt install ./kiln_*.deb` inside, as a user would (no network: everything it depends on is there).
    fn install(&self, deb: &Path) -> String {
        fs::copy(deb, self.root().join("tmp/kiln.deb")).unwrap();
        self.sh("apt-get install -y --no-install-recommends /tmp/kiln.deb 2>&1")
    }
}

/// The first layer of the debian fixture: `debootstrap --variant=minbase bookworm`, no systemd.
fn minbase_tarball() -> PathBuf {
    let oci = debian().join("oci");
    let index: serde_json::Value = serde_json::from_slice(&fs::read(oci.join("index.json")).unwrap()).unwrap();
    let blob = |digest: &str| oci.join("blobs/sha256").join(digest.trim_start_matches("sha256:"));
    let manifest_digest = index["manifests"][0]["digest"].as_str().unwrap();
    let manifest: serde_json::Value = serde_json::from_slice(&fs::read(blob(manifest_digest)).unwrap()).unwrap();
    blob(manifest["layers"][0]["digest"].as_str().unwrap())
}

/// A Debian 12 root filesystem with systemd (scripts/fixtures/systemd.sh), as a tarball.
fn systemd_tarball() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| fixture("systemd.sh")).join("rootfs.tar")
}

fn check_installed(chroot: &Chroot) {
    let root = chroot.root();
    assert_eq!(chroot.sh("kiln --version").trim(), format!("kiln {}", env!("CARGO_PKG_VERSION")));
    // kiln-node is where kiln looks for it (util::NODE_BINARY_INSTALLED) and runs without a C library of its own.
    assert!(root.join(kiln::util::sys::NODE_BINARY_INSTALLED.trim_start_matches('/')).is_file());
    let user = chroot.sh("getent passwd kiln");
    assert!(user.contains(":/var/lib/kiln/state:/usr/sbin/nologin"), "{user}");
    // The store's skeleton: root writes it, group kiln may take the lock kiln serve holds.
    assert_eq!(chroot.sh("stat -c '%a %U %G' /var/lib/kiln/lock").trim(), "664 root kiln");
    for dir in ["/var/lib/kiln/store", "/var/lib/kiln/roots", "/var/lib/kiln/tmp", "/etc/kiln"] {
        assert_eq!(chroot.sh(&format!("stat -c '%a %U' {dir}")).trim(), "755 root", "{dir}");
    }
    // What was installed is what `man` and bash read.
    let page = root.join("usr/share/man/man1/kiln-serve.1.gz");
    let shown = run(Command::new("man").arg("--warnings").arg("-l").arg(&page).env("MANWIDTH", "100"));
    assert!(String::from_utf8_lossy(&shown.stdout).contains("kiln-serve"));
    assert!(String::from_utf8_lossy(&shown.stderr).trim().is_empty());
    let completion = root.join("usr/share/bash-completion/completions/kiln");
    let complete =
        run(Command::new("bash").arg("-c").arg(format!("source '{}' && complete -p kiln", completion.display())));
    assert!(String::from_utf8_lossy(&complete.stdout).contains("_kiln"));
}

fn check_purged(chroot: &Chroot) {
    chroot.sh("apt-get purge -y kiln 2>&1");
    let root = chroot.root();
    for gone in ["usr/bin/kiln", "lib/systemd/system/kiln-serve.service", "usr/share/man/man1/kiln.1.gz"] {
        assert!(!root.join(gone).exists(), "{gone} is still there after purge");
    }
    // The admin's data stays: built images are not the package's to delete.
    assert!(root.join("var/lib/kiln/store").is_dir());
}

#[test]
fn deb_installs_on_a_minimal_debian12_without_systemd() {
    if !is_root() || !have("dpkg-deb") || !have("dpkg-shlibdeps") {
        eprintln!("skipped: chroot needs root, packaging needs dpkg-dev (scripts/setup.sh)");
        return;
    }
    let chroot = Chroot::from_tarball(&minbase_tarball());
    assert!(!chroot.root().join("usr/bin/systemd-sysusers").exists(), "the minbase tree should have no systemd");
    let log = chroot.install(deb());
    assert!(log.contains("Setting up kiln ("), "{log}");
    check_installed(&chroot);
    check_purged(&chroot);
}

#[test]
fn deb_installs_on_debian12_with_systemd_and_the_unit_verifies() {
    if !is_root() || !have("dpkg-deb") || !have("dpkg-shlibdeps") || !have("debootstrap") {
        eprintln!("skipped: chroot and debootstrap need root, packaging needs dpkg-dev (scripts/setup.sh)");
        return;
    }
    let chroot = Chroot::from_tarball(&systemd_tarball());
    let log = chroot.install(deb());
    assert!(log.contains("Setting up kiln ("), "{log}");
    // The user came from sysusers.d, the skeleton from tmpfiles.d (systemd's own tools, in the chroot).
    check_installed(&chroot);
    let unit = chroot.root().join("lib/systemd/system/kiln-serve.service");
    // Documentation= is checked by running the host's man, which does not look inside the tree; the
    // pages are rendered above instead.
    let verify = Command::new("systemd-analyze")
        .arg(format!("--root={}", chroot.root().display()))
        .args(["verify", "--man=no"])
        .arg(&unit)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&verify.stderr);
    assert!(verify.status.success() && said.trim().is_empty(), "systemd-analyze verify:\n{said}");
    // Not enabled by the install: it needs a recipe first.
    assert!(!chroot.root().join("etc/systemd/system/multi-user.target.wants/kiln-serve.service").exists());
    check_purged(&chroot);
}

// ---- kiln serve as the unit runs it ----

const NOBODY: &str = "65534";

/// A server namespace and a client namespace joined by a veth pair; removed on drop with the server process.
struct Lab {
    server_ns: String,
    client_ns: String,
    server: Option<Child>,
}

impl Lab {
    fn new() -> Lab {
        Lab::new_named(&format!("kiln-pkg-{}", std::process::id()))
    }

    fn new_named(prefix: &str) -> Lab {
        let lab = Lab { server_ns: format!("{prefix}-s"), client_ns: format!("{prefix}-c"), server: None };
        let (s, c) = (lab.server_ns.as_str(), lab.client_ns.as_str());
        for ns in [s, c] {
            let _ = Command::new("ip").args(["netns", "del", ns]).stderr(Stdio::null()).status();
            run(Command::new("ip").args(["netns", "add", ns]));
        }
        run(Command::new("ip")
            .args(["-n", s, "link", "add", "kiln0", "type", "veth", "peer", "name", "eth0"])
            .args(["netns", c]));
        run(Command::new("ip").args(["-n", s, "addr", "add", "10.77.0.1/24", "dev", "kiln0"]));
        run(Command::new("ip").args(["-n", c, "link", "set", "eth0", "address", "52:54:00:77:00:11"]));
        for (ns, dev) in [(s, "kiln0"), (s, "lo"), (c, "eth0"), (c, "lo")] {
            run(Command::new("ip").args(["-n", ns, "link", "set", dev, "up"]));
        }
        lab
    }

    /// `kiln serve` in the server namespace as uid/gid 65534 with the capabilities `caps` (setpriv's syntax:
    /// `-all,+net_bind_service`) in every set, and no way to gain more.
    fn serve(&self, caps: &str, dir: &Path, notify: Option<&Path>, log: &Path) -> Child {
        let out = fs::File::create(log).unwrap();
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.server_ns, "setpriv"])
            .args([&format!("--reuid={NOBODY}"), &format!("--regid={NOBODY}"), "--clear-groups"])
            .args([&format!("--inh-caps={caps}"), &format!("--ambient-caps={caps}")])
            .args([&format!("--bounding-set={caps}"), "--no-new-privs", "--"])
            .arg(kiln_bin())
            .args(["serve", "--recipe", "kiln.toml"])
            .current_dir(dir)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("KILN_STORE", dir.join("store"))
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out);
        if let Some(socket) = notify {
            cmd.env("NOTIFY_SOCKET", socket);
        }
        cmd.spawn().expect("starting kiln serve through setpriv")
    }

    fn stop(&mut self) -> std::process::ExitStatus {
        let mut child = self.server.take().expect("a server runs");
        run(Command::new("kill").args(["-TERM", &child.id().to_string()]));
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "kiln serve did not stop within 20 s of SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Some(mut child) = self.server.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        for ns in [&self.server_ns, &self.client_ns] {
            let _ = Command::new("ip").args(["netns", "del", ns]).stderr(Stdio::null()).status();
        }
    }
}

/// A udhcpc script that prints `LEASE <address>` when bound.
fn udhcpc_script(dir: &Path) -> PathBuf {
    let script = dir.join("udhcpc.sh");
    fs::write(&script, "#!/bin/sh\n[ \"$1\" = bound ] && echo \"LEASE $ip\"\nexit 0\n").unwrap();
    fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).unwrap();
    script
}

/// Waits for one datagram on the notify socket (while `server`, if given, still runs).
fn notified(socket: &UnixDatagram, what: &str, mut server: Option<&mut Child>, log: &Path) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut buf = [0u8; 4096];
    loop {
        match socket.recv(&mut buf) {
            Ok(n) => return String::from_utf8_lossy(&buf[..n]).into_owned(),
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(e) => panic!("reading the notify socket: {e}"),
        }
        if let Some(status) = server.as_mut().and_then(|s| s.try_wait().unwrap()) {
            panic!("kiln serve exited ({status}) before {what}:\n{}", fs::read_to_string(log).unwrap_or_default());
        }
        assert!(Instant::now() < deadline, "no {what} within 60 s:\n{}", fs::read_to_string(log).unwrap_or_default());
    }
}

#[test]
fn serve_needs_only_cap_net_bind_service_and_tells_systemd_when_ready() {
    if !is_root() || !have("setpriv") || !have("busybox") || !have("curl") {
        eprintln!("skipped: needs root (namespaces, setpriv), setpriv, busybox (udhcpc) and curl");
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let dir = work.path();
    // The unprivileged user reads the recipe and the store, as kiln-serve.service's user does /etc/kiln and
    // /var/lib/kiln.
    fs::set_permissions(dir, fs::Permissions::from_mode(0o755)).unwrap();
    fs::write(
        dir.join("kiln.toml"),
        format!(
            "[image.tiny]\nfrom = \"{}\"\n\n[server]\ninterface = \"kiln0\"\naddress = \"10.77.0.1/24\"\n\
             dhcp = \"full\"\nstate_dir = \"{}\"\n\n[node.n1]\nmac = \"52:54:00:77:00:11\"\nimage = \"tiny\"\n\
             ipv4 = \"10.77.0.11\"\n",
            tiny_archive(),
            dir.join("state").display()
        ),
    )
    .unwrap();
    let store = dir.join("store");
    kiln_ok(dir, &store, &["build"]);
    // What /usr/lib/tmpfiles.d/kiln.conf and StateDirectory= arrange for the unit.
    run(Command::new("chown").arg(format!("root:{NOBODY}")).arg(store.join("lock")));
    fs::set_permissions(store.join("lock"), fs::Permissions::from_mode(0o664)).unwrap();
    fs::create_dir(dir.join("state")).unwrap();
    run(Command::new("chown").arg(format!("{NOBODY}:{NOBODY}")).arg(dir.join("state")));
    let notify_path = dir.join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    fs::set_permissions(&notify_path, fs::Permissions::from_mode(0o666)).unwrap();
    notify.set_read_timeout(Some(Duration::from_millis(200))).unwrap();

    let mut lab = Lab::new();
    let unprivileged_from: u32 = String::from_utf8(
        run(Command::new("ip")
            .args(["netns", "exec", &lab.server_ns, "sysctl", "-n"])
            .arg("net.ipv4.ip_unprivileged_port_start"))
        .stdout,
    )
    .unwrap()
    .trim()
    .parse()
    .unwrap();
    // Without the capability the server cannot start, and says which capability it lacks.
    if unprivileged_from > 67 {
        let log = dir.join("nocap.log");
        let mut child = lab.serve("-all", dir, None, &log);
        let status = child.wait().unwrap();
        let said = fs::read_to_string(&log).unwrap();
        assert!(!status.success(), "kiln serve started on ports below 1024 with no capability:\n{said}");
        assert!(said.contains("port 80") || said.contains("port 69") || said.contains("port 67"), "{said}");
    } else {
        eprintln!("skipped the no-capability control: ports from {unprivileged_from} up need no capability here");
    }

    let log = dir.join("serve.log");
    lab.server = Some(lab.serve("-all,+net_bind_service", dir, Some(&notify_path), &log));
    let ready = notified(&notify, "READY=1", lab.server.as_mut(), &log);
    assert_eq!(ready.trim(), "READY=1");

    // A real DHCP client on the other end of the veth gets its reservation: the socket bound to kiln0
    // (SO_BINDTODEVICE) broadcast the reply with no capability beyond CAP_NET_BIND_SERVICE.
    let script = udhcpc_script(dir);
    let client = run(Command::new("timeout")
        .arg("30")
        .args(["ip", "netns", "exec", &lab.client_ns])
        .args(["busybox", "udhcpc", "-i", "eth0", "-f", "-q", "-n", "-t", "5", "-T", "2", "-s"])
        .arg(&script));
    let said = String::from_utf8_lossy(&client.stdout);
    assert!(
        said.contains("LEASE 10.77.0.11"),
        "udhcpc got no lease:\n{said}\nserver:\n{}",
        fs::read_to_string(&log).unwrap()
    );
    // HTTP on port 80 answers the node its boot script.
    run(Command::new("ip").args(["-n", &lab.client_ns, "addr", "add", "10.77.0.11/24", "dev", "eth0"]));
    let script = run(Command::new("ip").args(["netns", "exec", &lab.client_ns]).args([
        "curl",
        "-sS",
        "--max-time",
        "10",
        "http://10.77.0.1/ipxe/52:54:00:77:00:11",
    ]));
    assert!(String::from_utf8_lossy(&script.stdout).starts_with("#!ipxe"), "{:?}", script);

    let status = lab.stop();
    // Sent before the process exits, so it is queued on the socket by now.
    let stopping = notified(&notify, "STOPPING=1", None, &log);
    assert_eq!(stopping.trim(), "STOPPING=1");
    assert!(status.success(), "kiln serve exited {status} on SIGTERM:\n{}", fs::read_to_string(&log).unwrap());
    let state_owner =
        String::from_utf8(run(Command::new("stat").args(["-c", "%u"]).arg(dir.join("state/state.redb"))).stdout);
    assert_eq!(state_owner.unwrap().trim(), NOBODY, "the state is written by the service's user");
}

// ---- the unit under a real systemd ----

/// A Debian 12 system booted by systemd in a container (systemd-nspawn) whose network is a namespace of the
/// test's, with a veth to a client namespace; everything stopped and removed on drop.
struct Booted {
    tree: Chroot,
    nspawn: Option<Child>,
    leader: u32,
    lab: Lab,
    console: PathBuf,
}

impl Booted {
    fn boot(tag: &str) -> Booted {
        let tree = Chroot::from_tarball(&systemd_tarball());
        let pid = std::process::id();
        let lab = Lab::new_named(&format!("kiln-{tag}-{pid}"));
        let console = tree.root().join("root/console.log");
        let log = fs::File::create(&console).unwrap();
        let nspawn = Command::new("systemd-nspawn")
            // No host systemd to create a scope in or a machined to register with: run where we are.
            .args(["--keep-unit", "--register=no", "--quiet", "--boot", "--console=passive"])
            .arg(format!("--network-namespace-path=/run/netns/{}", lab.server_ns))
            .arg("--directory")
            .arg(tree.root())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting systemd-nspawn");
        let mut booted = Booted { tree, nspawn: Some(nspawn), leader: 0, lab, console };
        let deadline = Instant::now() + Duration::from_secs(120);
        let nspawn_pid = booted.nspawn.as_ref().unwrap().id().to_string();
        // The container's init is nspawn's child; wait for it, then for the boot to finish.
        while booted.leader == 0 {
            let out = Command::new("pgrep").args(["-P", &nspawn_pid]).output().unwrap();
            booted.leader = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap_or(0);
            if let Some(status) = booted.nspawn.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "systemd-nspawn exited ({status}):\n{}",
                    fs::read_to_string(&booted.console).unwrap_or_default()
                );
            }
            assert!(Instant::now() < deadline, "no container init within 120 s");
            std::thread::sleep(Duration::from_millis(50));
        }
        // Until systemd answers on its socket, systemctl says "offline"; then it reports the boot's state.
        let state = loop {
            let (_, said) = booted.sh_status("systemctl is-system-running");
            let said = said.trim().to_string();
            if !matches!(said.as_str(), "offline" | "initializing" | "starting") && !said.contains("connect to bus") {
                break said;
            }
            assert!(Instant::now() < deadline, "the container did not finish booting within 120 s: {said}");
            std::thread::sleep(Duration::from_millis(100));
        };
        if state != "running" {
            let failed = booted.sh_status("systemctl --failed --no-pager; journalctl -b --no-pager | tail -50").1;
            panic!("the container's boot ended {state:?}:\n{failed}");
        }
        booted
    }

    /// Runs `cmd` through sh inside the container (all its namespaces); returns (success, stdout + stderr).
    fn sh_status(&self, cmd: &str) -> (bool, String) {
        let out = Command::new("nsenter")
            .args(["-t", &self.leader.to_string(), "-a", "/usr/bin/env", "-i"])
            .args(["PATH=/usr/sbin:/usr/bin:/sbin:/bin", "DEBIAN_FRONTEND=noninteractive", "LANG=C.UTF-8"])
            .args(["/bin/sh", "-c", cmd])
            .output()
            .expect("running nsenter");
        let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.push_str(&String::from_utf8_lossy(&out.stderr));
        (out.status.success(), text)
    }

    fn sh(&self, cmd: &str) -> String {
        let (ok, text) = self.sh_status(cmd);
        assert!(ok, "in the container, `{cmd}` failed:\n{text}");
        text
    }

    fn show(&self, property: &str) -> String {
        self.sh(&format!("systemctl show --value -p {property} kiln-serve")).trim().to_string()
    }

    /// Polls `property` of kiln-serve until it is `want` (bounded: 60 s).
    fn wait_for(&self, property: &str, want: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let got = self.show(property);
            if got == want {
                return;
            }
            if Instant::now() > deadline {
                let journal = self.sh("journalctl -u kiln-serve --no-pager | tail -30");
                panic!("kiln-serve {property} is {got:?}, not {want:?}, after 60 s:\n{journal}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Booted {
    fn drop(&mut self) {
        if let Some(mut nspawn) = self.nspawn.take() {
            // SIGTERM asks nspawn to power the container off; SIGKILL if it does not within 30 s.
            let _ = Command::new("kill").args(["-TERM", &nspawn.id().to_string()]).status();
            let deadline = Instant::now() + Duration::from_secs(30);
            while nspawn.try_wait().ok().flatten().is_none() {
                if Instant::now() > deadline {
                    let _ = nspawn.kill();
                    let _ = nspawn.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        if std::thread::panicking() {
            eprintln!("--- container console ---\n{}", fs::read_to_string(&self.console).unwrap_or_default());
        }
        let _ = &self.tree;
    }
}

#[test]
fn systemctl_starts_the_unit_under_systemd() {
    if !is_root() || !have("systemd-nspawn") || !have("dpkg-shlibdeps") || !have("busybox") {
        eprintln!("skipped: needs root, systemd-nspawn (systemd-container), dpkg-dev and busybox (scripts/setup.sh)");
        return;
    }
    let deb = deb();
    let started = Instant::now();
    let sys = Booted::boot("unit");
    eprintln!("container booted in {:.1}s", started.elapsed().as_secs_f64());
    let root = sys.tree.root();
    fs::copy(deb, root.join("root/kiln.deb")).unwrap();
    fs::copy(tiny().join("tiny.oci.tar"), root.join("root/tiny.oci.tar")).unwrap();

    // What docs/install.md tells an administrator to do.
    let log = sys.sh("apt-get install -y --no-install-recommends /root/kiln.deb 2>&1");
    assert!(log.contains("Setting up kiln ("), "{log}");
    assert_eq!(sys.sh_status("systemctl is-enabled kiln-serve").1.trim(), "disabled", "the install enabled the unit");
    fs::write(
        root.join("etc/kiln/kiln.toml"),
        "[image.tiny]\nfrom = \"oci-archive:/root/tiny.oci.tar\"\n\n[server]\ninterface = \"kiln0\"\n\
         address = \"10.77.0.1/24\"\ndhcp = \"full\"\n\n[node.n1]\nmac = \"52:54:00:77:00:11\"\nimage = \"tiny\"\n\
         ipv4 = \"10.77.0.11\"\n",
    )
    .unwrap();
    sys.sh("kiln --quiet build -f /etc/kiln/kiln.toml");
    let start = Instant::now();
    sys.sh("timeout 60 systemctl start kiln-serve");
    eprintln!("systemctl start kiln-serve returned in {:.2}s", start.elapsed().as_secs_f64());
    // Type=notify: start returned once kiln said READY=1, so the server is up now.
    assert_eq!((sys.show("ActiveState"), sys.show("SubState")), ("active".into(), "running".into()));
    let main_pid = sys.show("MainPID");
    let status = sys.sh(&format!("cat /proc/{main_pid}/status"));
    let field = |name: &str| status.lines().find(|l| l.starts_with(name)).unwrap_or_default().to_string();
    assert!(field("CapEff:").ends_with("0000000000000400"), "only CAP_NET_BIND_SERVICE: {}", field("CapEff:"));
    assert!(field("CapBnd:").ends_with("0000000000000400"), "{}", field("CapBnd:"));
    let uid = sys.sh("id -u kiln").trim().to_string();
    assert!(field("Uid:").split_whitespace().nth(1) == Some(uid.as_str()), "not running as kiln: {}", field("Uid:"));

    // A DHCP client in another namespace gets its reservation from the sandboxed server.
    let script = udhcpc_script(&root.join("root"));
    let client = run(Command::new("timeout")
        .arg("30")
        .args(["ip", "netns", "exec", &sys.lab.client_ns])
        .args(["busybox", "udhcpc", "-i", "eth0", "-f", "-q", "-n", "-t", "5", "-T", "2", "-s"])
        .arg(&script));
    let said = String::from_utf8_lossy(&client.stdout);
    assert!(said.contains("LEASE 10.77.0.11"), "no lease:\n{said}\n{}", sys.sh("journalctl -u kiln-serve --no-pager"));
    assert!(sys.sh("kiln node events --mac n1 -f /etc/kiln/kiln.toml").contains("dhcp-ack"));

    // Reload is SIGHUP; the recipe is read again.
    sys.sh("systemctl reload kiln-serve");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !sys.sh("journalctl -u kiln-serve --no-pager").contains("kiln serve: reloaded /etc/kiln/kiln.toml") {
        assert!(Instant::now() < deadline, "no reload in the journal within 30 s");
        std::thread::sleep(Duration::from_millis(100));
    }
    // A crash is followed by a restart.
    sys.sh(&format!("kill -KILL {main_pid}"));
    sys.wait_for("NRestarts", "1");
    sys.wait_for("SubState", "running");
    assert_ne!(sys.show("MainPID"), main_pid);

    let start = Instant::now();
    sys.sh("timeout 60 systemctl stop kiln-serve");
    eprintln!("systemctl stop kiln-serve returned in {:.2}s", start.elapsed().as_secs_f64());
    assert_eq!(sys.show("ActiveState"), "inactive");
    let journal = sys.sh("journalctl -u kiln-serve --no-pager");
    assert!(journal.contains("kiln serve: stopped"), "{journal}");
    let security = sys.sh("systemd-analyze security --no-pager kiln-serve");
    let overall = security.lines().find(|l| l.contains("Overall exposure level")).unwrap_or_default();
    eprintln!("{overall}");
    assert!(overall.contains(" OK") || overall.contains(" MEDIUM"), "{security}");
}
