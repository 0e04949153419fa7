//! Bad input gets a clear error naming the thing, and the store is left as it was.

mod common;

use std::fs;
use std::path::{Path, PathBuf};

use common::*;

/// Builds an OCI layout whose single layer is made by a Python `tarfile` snippet operating on `t`.
fn hostile_image(work: &Path, name: &str, tar_body: &str) -> PathBuf {
    let layer = work.join(format!("{name}.tar.gz"));
    let script = format!(
        "import io, tarfile\nt = tarfile.open('{}', 'w:gz', format=tarfile.PAX_FORMAT)\n\
         def add(name, data=b'', **kw):\n    i = tarfile.TarInfo(name)\n    i.size = len(data)\n    \
         [setattr(i, k, v) for k, v in kw.items()]\n    t.addfile(i, io.BytesIO(data))\n{tar_body}\nt.close()\n",
        layer.display()
    );
    let py = work.join(format!("{name}.py"));
    fs::write(&py, script).unwrap();
    sh(&format!("python3 '{}'", py.display()));
    let out = work.join(name);
    sh(&format!(
        "python3 '{}' '{}' 2023-11-14T22:13:20Z '{}' >/dev/null",
        repo().join("scripts/fixtures/oci-assemble.py").display(),
        out.display(),
        layer.display()
    ));
    out
}

/// Runs a failing build and checks the store did not change.
fn fails(store: &Path, from: &str, extra: &[&str]) -> String {
    let before = store_snapshot(store);
    let mut args = vec!["build", "--from", from, "--name", "bad"];
    args.extend_from_slice(extra);
    let err = kiln_err(store, store, &args);
    assert_eq!(store_snapshot(store), before, "a failed build changed the store");
    err
}

fn primed_store() -> tempfile::TempDir {
    let store = tempfile::tempdir().unwrap();
    let from = format!("oci:{}:latest", tiny().join("oci").display());
    kiln_ok(store.path(), store.path(), &["build", "--from", &from, "--name", "tiny", "--quiet"]);
    store
}

#[test]
fn corrupt_blob_is_named() {
    let store = primed_store();
    let work = tempfile::tempdir().unwrap();
    let copy = work.path().join("oci");
    sh(&format!("cp -a '{}' '{}'", tiny().join("oci").display(), copy.display()));
    // Flip a byte in the middle of the largest blob (the first layer) without changing its size.
    let blob = sh(&format!("ls -S '{}'/blobs/sha256/* | head -1", copy.display())).trim().to_string();
    let mut bytes = fs::read(&blob).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x55;
    fs::write(&blob, bytes).unwrap();
    let err = fails(store.path(), &format!("oci:{}:latest", copy.display()), &[]);
    let hex = Path::new(&blob).file_name().unwrap().to_string_lossy().to_string();
    assert!(err.contains("layer 1") && err.contains(&hex), "{err}");
    assert!(err.contains("corrupt"), "{err}");
}

#[test]
fn escaping_paths_are_refused() {
    let store = primed_store();
    let work = tempfile::tempdir().unwrap();
    let dotdot = hostile_image(work.path(), "dotdot", "add('etc/ok', b'x')\nadd('../../etc/shadow', b'owned')");
    let err = fails(store.path(), &format!("oci:{}", dotdot.display()), &[]);
    assert!(err.contains("../../etc/shadow") && err.contains("climbs out"), "{err}");

    let through = hostile_image(
        work.path(),
        "symlink",
        "add('evil', type=tarfile.SYMTYPE, linkname='/etc')\nadd('evil/passwd', b'root::0:0::/:/bin/sh')",
    );
    let err = fails(store.path(), &format!("oci:{}", through.display()), &[]);
    assert!(err.contains("/evil/passwd goes through the symlink /evil -> /etc"), "{err}");
}

#[test]
fn truncated_layer_is_named() {
    let store = primed_store();
    let work = tempfile::tempdir().unwrap();
    let blob = sh(&format!("ls -S '{}'/blobs/sha256/* | head -1", tiny().join("oci").display())).trim().to_string();
    let truncated = work.path().join("rootfs.tar.gz");
    let bytes = fs::read(&blob).unwrap();
    fs::write(&truncated, &bytes[..bytes.len() / 3]).unwrap();
    let err = fails(store.path(), &format!("tar:{}", truncated.display()), &[]);
    assert!(err.contains("truncated or corrupt"), "{err}");
}

#[test]
fn image_without_kernel_says_what_to_do() {
    let store = primed_store();
    let work = tempfile::tempdir().unwrap();
    let nokernel = hostile_image(work.path(), "nokernel", "add('bin/sh', b'#!')\nadd('etc/hostname', b'x')");
    let err = fails(store.path(), &format!("oci:{}", nokernel.display()), &[]);
    assert!(err.contains("has no kernel") && err.contains("kernel = "), "{err}");
    let err = fails(store.path(), &format!("oci:{}", nokernel.display()), &["--kernel", "/boot/nope"]);
    assert!(err.contains("/boot/nope"), "{err}");
    let err = fails(store.path(), &format!("oci:{}", nokernel.display()), &["--kernel", "/etc/hostname"]);
    assert!(err.contains("does not look like a Linux kernel"), "{err}");
}

#[test]
fn unknown_transport_and_missing_sources() {
    let store = primed_store();
    let err = fails(store.path(), "ftp:example/image", &[]);
    assert!(err.contains("unknown transport \"ftp\"") && err.contains("docker://"), "{err}");
    let err = fails(store.path(), "oci-archive:/nonexistent/image.tar", &[]);
    assert!(err.contains("/nonexistent/image.tar"), "{err}");
    let err = fails(store.path(), &format!("oci:{}:nosuchtag", tiny().join("oci").display()), &[]);
    assert!(err.contains("no image is tagged \"nosuchtag\"") && err.contains("latest"), "{err}");
}

#[test]
fn files_of_4_gib_are_refused_by_name() {
    let store = primed_store();
    let work = tempfile::tempdir().unwrap();
    let root = work.path().join("root");
    fs::create_dir_all(root.join("boot")).unwrap();
    // A stand-in kernel: the x86 boot header magic is all kiln checks.
    let mut kernel = vec![0u8; 4096];
    kernel[0x202..0x206].copy_from_slice(b"HdrS");
    fs::write(root.join("boot/vmlinuz-1.0"), kernel).unwrap();
    fs::create_dir_all(root.join("data")).unwrap();
    let big = fs::File::create(root.join("data/huge.img")).unwrap();
    big.set_len(1 << 32).unwrap(); // sparse: costs no disk
    let err = fails(store.path(), &format!("dir:{}", root.display()), &[]);
    assert!(err.contains("/data/huge.img") && err.contains("4 GiB") && err.contains("exclude"), "{err}");
    // Excluding it makes the build work.
    kiln_ok(
        store.path(),
        store.path(),
        &["build", "--from", &format!("dir:{}", root.display()), "--name", "big", "--exclude", "/data/**", "--quiet"],
    );
}

#[test]
fn bad_recipe_values_name_file_and_field() {
    let store = tempfile::tempdir().unwrap();
    let d = store.path();
    fs::write(d.join("kiln.toml"), "[image.a]\nfrom = \"oci:/x\"\nlevel = 99\n").unwrap();
    let err = kiln_err(d, d, &["build"]);
    assert!(err.contains("kiln.toml") && err.contains("[image.a]") && err.contains("level"), "{err}");
    fs::write(d.join("kiln.toml"), "[image.a]\nfrom = 3\n").unwrap();
    let err = kiln_err(d, d, &["build"]);
    assert!(err.contains("line 2") && err.contains("from"), "{err}");
    let err = kiln_err(d, d, &["build", "--name", "nope"]);
    assert!(err.contains("line 2"), "{err}");
    fs::write(d.join("kiln.toml"), "[image.a]\nfrom = \"oci:/x\"\n").unwrap();
    let err = kiln_err(d, d, &["build", "--name", "nope"]);
    assert!(err.contains("no [image.nope]"), "{err}");
}
