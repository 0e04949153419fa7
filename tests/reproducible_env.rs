//! A store hash is a promise: the same inputs give the same bytes on any machine. Every kind of output (a
//! bundle, an iPXE build with a stand-in toolchain, an appliance ISO) is built twice, once plainly and once
//! with another `TZ`, `LC_ALL`, `umask`, `HOME` and working directory; the store paths, the bytes and the
//! modes (files 0644, directories 0755, whatever the umask) must be the same.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

/// How a build is run: plainly, or in a perturbed environment.
#[derive(Clone, Copy)]
enum Env {
    Plain,
    Perturbed,
}

/// Runs kiln through sh (for the umask) in `dir`, with `store`; `path` replaces PATH when given.
fn kiln_in(env: Env, dir: &Path, store: &Path, path: Option<&Path>, args: &[&str]) -> String {
    let mut c = Command::new("sh");
    let umask = match env {
        Env::Plain => "022",
        Env::Perturbed => "077",
    };
    c.arg("-c").arg(format!("umask {umask}; exec \"$0\" \"$@\"")).arg(env!("CARGO_BIN_EXE_kiln")).args(args);
    c.current_dir(dir).env("KILN_STORE", store).env_remove("SOURCE_DATE_EPOCH");
    if let Some(p) = path {
        c.env("PATH", p);
    }
    match env {
        Env::Plain => {
            c.env("TZ", "UTC").env("LC_ALL", "C");
        }
        Env::Perturbed => {
            let home = dir.join("home");
            fs::create_dir_all(&home).unwrap();
            c.env("TZ", "Asia/Tokyo").env("LC_ALL", "fr_FR.UTF-8").env("LANG", "de_DE.UTF-8").env("HOME", home);
        }
    }
    let out = c.output().unwrap();
    eprintln!("$ kiln {}\n{}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "kiln {args:?} failed:\n{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// Every output of a store: its name, each file's sha256 and mode, the directory's mode.
fn outputs(store: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut dirs: Vec<PathBuf> = fs::read_dir(store.join("store")).unwrap().map(|e| e.unwrap().path()).collect();
    dirs.sort();
    for d in dirs {
        let mode = fs::metadata(&d).unwrap().permissions().mode() & 0o7777;
        out.push(format!("{} {mode:o}", d.file_name().unwrap().to_string_lossy()));
        let mut files: Vec<PathBuf> = fs::read_dir(&d).unwrap().map(|e| e.unwrap().path()).collect();
        files.sort();
        for f in files {
            let mode = fs::metadata(&f).unwrap().permissions().mode() & 0o7777;
            out.push(format!("  {} {} {mode:o}", f.file_name().unwrap().to_string_lossy(), sha256_hex(&f)));
        }
    }
    for sub in ["", "store", "roots"] {
        let mode = fs::metadata(store.join(sub)).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o755, "{} is {mode:o}", store.join(sub).display());
    }
    out
}

fn assert_same(plain: &[String], perturbed: &[String]) {
    assert!(!plain.is_empty());
    assert_eq!(plain, perturbed, "outputs differ between the plain and the perturbed environment");
    for line in plain {
        let want = if line.starts_with("  ") { "644" } else { "755" };
        assert!(line.ends_with(want), "{line}: mode should be {want}");
    }
}

/// Builds with `args` in two fresh directories and stores, plainly and perturbed; `setup` writes the
/// recipe and whatever it needs into a directory.
fn both(setup: impl Fn(&Path) -> Option<PathBuf>, args: &[&str]) -> Vec<String> {
    let mut results = Vec::new();
    for env in [Env::Plain, Env::Perturbed] {
        let work = tempfile::tempdir().unwrap();
        let dir = work.path().join(match env {
            Env::Plain => "a",
            Env::Perturbed => "somewhere/else",
        });
        fs::create_dir_all(&dir).unwrap();
        let path = setup(&dir);
        let store = work.path().join("store");
        kiln_in(env, &dir, &store, path.as_deref(), args);
        results.push(outputs(&store));
    }
    assert_same(&results[0], &results[1]);
    results.remove(0)
}

#[test]
fn bundles_do_not_depend_on_the_environment() {
    let recipe = format!("[image.tiny]\nfrom = \"oci:{}:latest\"\n", tiny().join("oci").display());
    let outs = both(
        |d| {
            fs::write(d.join("kiln.toml"), &recipe).unwrap();
            None
        },
        &["build", "--quiet"],
    );
    assert!(outs.iter().any(|l| l.contains("-tiny ")), "{outs:?}");
}

#[test]
fn appliance_isos_do_not_depend_on_the_environment() {
    // The tiny image stands in for the appliance's OS: the ISO's bytes are what is compared, nothing boots.
    let recipe = format!(
        "source_date_epoch = 1700000000\n[image.tiny]\nfrom = \"oci:{}:latest\"\n[server]\naddress = \"10.9.8.1/24\"\n\
         [node.n1]\nmac = \"52:54:00:00:08:01\"\nimage = \"tiny\"\n[appliance]\nimage = \"tiny\"\n",
        tiny().join("oci").display()
    );
    let outs = both(
        |d| {
            fs::write(d.join("kiln.toml"), &recipe).unwrap();
            None
        },
        &["appliance", "--quiet"],
    );
    assert!(outs.iter().any(|l| l.contains("appliance.iso")), "{outs:?}");
}

const FAKE_MAKEFILE: &str = r#"# Stands in for iPXE's Makefile: each image records what it was built with.
%.efi %.kpxe:
	mkdir -p $(dir $@)
	printf 'image %s embed=%s\n' '$@' '$(EMBED)' > $@
	cat config/local/general.h >> $@
"#;

#[test]
fn ipxe_builds_do_not_depend_on_the_environment() {
    if std::env::consts::ARCH != "x86_64" || !have("make") {
        eprintln!("skipped: the stand-in toolchain needs an x86_64 host with make");
        return;
    }
    let setup = |d: &Path| {
        let tree = d.join("ipxe/src");
        fs::create_dir_all(tree.join("config/local")).unwrap();
        fs::write(tree.join("Makefile"), FAKE_MAKEFILE).unwrap();
        fs::write(tree.join("config/general.h"), "#define VLAN_CMD\n").unwrap();
        fs::write(tree.join("config/console.h"), "//#define CONSOLE_SERIAL\n").unwrap();
        let bin = d.join("bin");
        fs::create_dir_all(&bin).unwrap();
        for tool in ["make", "sh", "mkdir", "cat", "printf"] {
            let real = sh(&format!("command -v {tool}"));
            std::os::unix::fs::symlink(real.trim(), bin.join(tool)).unwrap();
        }
        for tool in ["gcc", "ld", "objcopy", "perl"] {
            // A version line that follows the locale, as real tools' translations would.
            let p = bin.join(tool);
            fs::write(&p, format!("#!/bin/sh\necho \"{tool} (stand-in) 1.0 ${{LC_ALL:-${{LANG:-}}}}\"\n")).unwrap();
            fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
        }
        Some(bin)
    };
    let outs = both(
        setup,
        &["build-ipxe", "--source", "ipxe", "--vlan", "10", "--target", "bin-x86_64-efi/snponly.efi", "--quiet"],
    );
    assert!(outs.iter().any(|l| l.contains("snponly.efi")), "{outs:?}");
}
