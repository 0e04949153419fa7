//! `kiln build` end to end: real fixtures, real archive tools, real boots.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;

fn built_path(stdout: &str) -> PathBuf {
    PathBuf::from(stdout.lines().last().expect("kiln printed a store path").trim())
}

fn build_tiny(store: &Path, extra: &[&str]) -> PathBuf {
    let from = format!("oci:{}:latest", tiny().join("oci").display());
    let mut args = vec!["build", "--from", &from, "--name", "tiny", "--quiet"];
    args.extend_from_slice(extra);
    built_path(&kiln_ok(store, store, &args))
}

#[test]
fn image_lists_the_merged_tree_with_gnu_cpio() {
    let store = tempfile::tempdir().unwrap();
    let bundle = build_tiny(store.path(), &[]);
    for f in ["kernel", "initramfs", "image", "manifest.json"] {
        assert!(bundle.join(f).is_file(), "bundle lacks {f}");
    }
    sh(&format!("zstd -q -t '{}' '{}'", bundle.join("image").display(), bundle.join("initramfs").display()));
    let listing = sh(&format!("zstd -dc '{}' | cpio -t --quiet", bundle.join("image").display()));
    let expected = fs::read_to_string(tiny().join("expected-paths.txt")).unwrap();
    let got: Vec<&str> = listing.lines().collect();
    let want: Vec<&str> = expected.lines().collect();
    assert_eq!(got, want, "cpio listing differs from the merged image");
    assert!(!got.contains(&"etc/removed-by-whiteout"), "whiteout not applied");
    assert!(!got.iter().any(|p| p.starts_with("opt/opaque/old-")), "opaque directory not applied");
    assert!(got.contains(&"opt/opaque/new-c"));

    // Hardlinks stay one inode with two names; device nodes and modes survive.
    let verbose = sh(&format!("zstd -dc '{}' | cpio -tv --quiet", bundle.join("image").display()));
    let line = |name: &str| {
        verbose
            .lines()
            .find(|l| l.ends_with(&format!(" {name}")))
            .unwrap_or_else(|| panic!("{name} not listed"))
            .to_string()
    };
    assert!(line("etc/hardlink-src").split_whitespace().nth(1) == Some("2"), "{}", line("etc/hardlink-src"));
    assert!(line("etc/hardlink-dst").split_whitespace().nth(1) == Some("2"));
    assert!(line("sbin/init").starts_with("-rwxr-xr-x"), "{}", line("sbin/init"));

    // The initramfs carries the shim as /init.
    let init = sh(&format!("zstd -dc '{}' | cpio -i --quiet --to-stdout init", bundle.join("initramfs").display()));
    assert!(init.starts_with("#!/bin/sh") && init.contains("exec \"$init\""));

    let manifest: serde_json::Value = serde_json::from_slice(&fs::read(bundle.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["name"], "tiny");
    assert_eq!(manifest["arch"], "x86_64");
    assert_eq!(manifest["kernel"]["sha256"].as_str().unwrap(), sha256_hex(&bundle.join("kernel")));
    assert_eq!(manifest["initrds"][1]["sha256"].as_str().unwrap(), sha256_hex(&bundle.join("image")));
    assert_eq!(manifest["source"]["reference"], "oci:oci:latest");
    assert!(manifest["source"]["digest"].as_str().unwrap().starts_with("sha256:"));
    assert_eq!(manifest["source_date_epoch"], 1_700_000_000);
    assert!(manifest["kernel"]["version"].as_str().unwrap().ends_with("-amd64"));
    assert_eq!(manifest["kernel"]["modules"], true);
}

#[test]
fn same_inputs_same_bytes_across_stores_times_and_threads() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let one = built_path(&kiln_ok(
        a.path(),
        a.path(),
        &[
            "build",
            "--from",
            &format!("oci:{}:latest", tiny().join("oci").display()),
            "--name",
            "tiny",
            "--quiet",
            "--threads",
            "1",
        ],
    ));
    std::thread::sleep(Duration::from_millis(1100));
    let two = build_tiny(b.path(), &["--threads", "2"]);
    assert_ne!(one, two, "different stores");
    assert_eq!(one.file_name(), two.file_name(), "same inputs give the same store name");
    for f in ["kernel", "initramfs", "image", "manifest.json"] {
        assert_eq!(sha256_hex(&one.join(f)), sha256_hex(&two.join(f)), "{f} differs between builds");
    }
    // Another user, in another directory, with the image copied elsewhere.
    let u = tempfile::tempdir().unwrap();
    let copy = u.path().join("elsewhere/oci");
    sh(&format!(
        "mkdir -p '{}' && cp -a '{}' '{}' && chmod -R a+rwX '{}'",
        u.path().join("elsewhere").display(),
        tiny().join("oci").display(),
        copy.display(),
        u.path().display()
    ));
    let out = sh(&format!(
        "cd '{}' && runuser -u nobody -- env HOME=/nonexistent '{}' build --quiet --store '{}/store' --from 'oci:{}:latest' --name tiny",
        u.path().display(),
        env!("CARGO_BIN_EXE_kiln"),
        u.path().display(),
        copy.display()
    ));
    let by_nobody = built_path(&out);
    assert_eq!(by_nobody.file_name(), one.file_name());
    for f in ["kernel", "initramfs", "image", "manifest.json"] {
        assert_eq!(sha256_hex(&one.join(f)), sha256_hex(&by_nobody.join(f)), "{f} differs when built by another user");
    }

    // The oci-archive and docker-archive of the same image give the same image bytes.
    let c = tempfile::tempdir().unwrap();
    let from = format!("oci-archive:{}", tiny().join("tiny.oci.tar").display());
    let three = built_path(&kiln_ok(c.path(), c.path(), &["build", "--from", &from, "--name", "tiny", "--quiet"]));
    assert_eq!(sha256_hex(&one.join("image")), sha256_hex(&three.join("image")));
    let from = format!("docker-archive:{}", tiny().join("tiny.docker.tar").display());
    let four = built_path(&kiln_ok(c.path(), c.path(), &["build", "--from", &from, "--name", "tiny-d", "--quiet"]));
    assert_eq!(sha256_hex(&one.join("image")), sha256_hex(&four.join("image")));
}

#[test]
fn unchanged_inputs_do_no_work() {
    let store = tempfile::tempdir().unwrap();
    let first = build_tiny(store.path(), &[]);
    let stamp = fs::metadata(first.join("image")).unwrap().modified().unwrap();
    let start = Instant::now();
    let second = build_tiny(store.path(), &[]);
    eprintln!("cached build answered in {:?}", start.elapsed());
    assert_eq!(first, second);
    assert_eq!(stamp, fs::metadata(second.join("image")).unwrap().modified().unwrap(), "image was rewritten");
    // A changed input is a new store path.
    let third = build_tiny(store.path(), &["--cmdline", "console=ttyS0 quiet"]);
    assert_ne!(first, third);
}

#[test]
fn store_ls_verify_gc() {
    let store = tempfile::tempdir().unwrap();
    let s = store.path();
    let first = build_tiny(s, &["--cmdline", "one"]);
    let second = build_tiny(s, &["--cmdline", "two"]);
    let ls: serde_json::Value = serde_json::from_str(&kiln_ok(s, s, &["store", "ls", "--json"])).unwrap();
    assert_eq!(ls.as_array().unwrap().len(), 2);
    assert!(kiln_ok(s, s, &["store", "verify"]).contains("2 output(s) verified"));
    // The root follows the latest build of the name; gc removes the other one.
    let report = kiln_ok(s, s, &["store", "gc", "--dry-run"]);
    assert!(report.contains(&first.display().to_string()), "{report}");
    assert!(first.exists());
    kiln_ok(s, s, &["store", "gc"]);
    assert!(!first.exists() && second.exists());
    // Tampering is found.
    let image = second.join("image");
    let mut bytes = fs::read(&image).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    fs::write(&image, bytes).unwrap();
    let out = kiln(s, s, &["store", "verify", "--json"]);
    assert!(!out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["ok"], false);
    assert!(v["problems"][0]["problem"].as_str().unwrap().contains("content changed"));
}

#[test]
fn recipe_builds_with_json_and_names_typos() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let oci = tiny().join("oci");
    fs::write(
        d.join("kiln.toml"),
        format!(
            "source_date_epoch = 1600000000\n[image.tiny]\nfrom = \"oci:{}:latest\"\ncmdline = \"console=ttyS0\"\ncompression = \"gzip\"\nexclude = [\"/opt/**\"]\n",
            oci.display()
        ),
    )
    .unwrap();
    let store = d.join("store");
    let out = kiln_ok(d, &store, &["build", "--json"]);
    let v: serde_json::Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    assert_eq!(v["name"], "tiny");
    assert_eq!(v["manifest"]["source_date_epoch"], 1_600_000_000);
    assert_eq!(v["manifest"]["initrds"][1]["compression"], "gzip");
    let image = Path::new(v["path"].as_str().unwrap()).join("image");
    let listing = sh(&format!("gzip -dc '{}' | cpio -t --quiet", image.display()));
    assert!(
        listing.lines().any(|l| l == "opt") && !listing.lines().any(|l| l.starts_with("opt/")),
        "exclude not applied"
    );

    fs::write(d.join("kiln.toml"), format!("[image.tiny]\nfrom = \"oci:{}\"\ncompresion = \"zstd\"\n", oci.display()))
        .unwrap();
    let err = kiln_err(d, &store, &["build"]);
    assert!(err.contains("kiln.toml") && err.contains("line 3") && err.contains("compresion"), "{err}");
}

#[test]
fn tiny_bundle_boots_to_its_own_init() {
    if !have("qemu-system-x86_64") {
        panic!("qemu-system-x86_64 is missing: run scripts/setup.sh");
    }
    let store = tempfile::tempdir().unwrap();
    let b = build_tiny(store.path(), &["--cmdline", "console=ttyS0 panic=-1"]);
    let manifest: serde_json::Value = serde_json::from_slice(&fs::read(b.join("manifest.json")).unwrap()).unwrap();
    let log = boot_until(
        &b.join("kernel"),
        &[&b.join("initramfs"), &b.join("image")],
        manifest["cmdline"].as_str().unwrap(),
        "KILN-TINY-BOOTED",
        Duration::from_secs(240),
    );
    assert!(log.contains("kiln: starting /sbin/init"), "the shim did not run:\n{log}");
}

#[test]
fn debian_bundle_boots_to_its_own_init() {
    let store = tempfile::tempdir().unwrap();
    let from = format!("oci:{}:latest", debian().join("oci").display());
    let b = built_path(&kiln_ok(
        store.path(),
        store.path(),
        &["build", "--from", &from, "--name", "debian", "--quiet", "--cmdline", "console=ttyS0 panic=-1"],
    ));
    let log = boot_until(
        &b.join("kernel"),
        &[&b.join("initramfs"), &b.join("image")],
        "console=ttyS0 panic=-1",
        "KILN-DEBIAN-BOOTED",
        Duration::from_secs(300),
    );
    assert!(log.contains("kiln: starting /sbin/init"), "the shim did not run:\n{log}");
}
