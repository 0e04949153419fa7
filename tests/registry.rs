//! Against a real registry (Debian's docker-registry) on loopback: `docker://` sources fed by skopeo;
//! `kiln push`, substitution (`--substituter`), `kiln pull`, a registry serving a damaged blob or not
//! running at all; and `kiln export` / `kiln import` of a site's closure into another store.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use common::*;

struct Registry {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
    data: PathBuf,
    log: PathBuf,
}

impl Registry {
    fn url(&self) -> String {
        format!("docker://127.0.0.1:{}/kiln", self.port)
    }

    /// Requests that upload blob bytes, so far (the access log's PATCH and PUT of blob uploads).
    fn blob_uploads(&self) -> usize {
        let log = fs::read_to_string(&self.log).unwrap_or_default();
        log.lines()
            .filter(|l| l.contains("\"PATCH /v2/") || (l.contains("\"PUT /v2/") && l.contains("/blobs/uploads/")))
            .count()
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_registry() -> Registry {
    assert!(have("docker-registry"), "docker-registry is missing: run scripts/setup.sh");
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let config = dir.path().join("config.yml");
    fs::write(
        &config,
        format!(
            "version: 0.1\nlog:\n  level: info\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n",
            dir.path().join("data").display()
        ),
    )
    .unwrap();
    // The access log (one line per request) goes to stdout, the rest to stderr: both into one file.
    let log = dir.path().join("registry.log");
    let file = fs::File::create(&log).unwrap();
    let child = Command::new("docker-registry")
        .arg("serve")
        .arg(&config)
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .spawn()
        .expect("starting docker-registry");
    let start = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(start.elapsed() < Duration::from_secs(30), "registry did not listen on {port}");
        std::thread::sleep(Duration::from_millis(100));
    }
    Registry { child, port, data: dir.path().join("data"), log, _dir: dir }
}

#[test]
fn docker_transport_pulls_from_a_real_registry_and_pins_in_the_lock() {
    let reg = start_registry();
    let reference = format!("127.0.0.1:{}/kiln/tiny:latest", reg.port);
    sh(&format!(
        "skopeo copy --quiet --dest-tls-verify=false 'oci:{}:latest' 'docker://{reference}'",
        tiny().join("oci").display()
    ));
    let work = tempfile::tempdir().unwrap();
    let d = work.path();
    let store = d.join("store");
    let from = format!("docker://{reference}");
    let out =
        kiln_ok(d, &store, &["build", "--from", &from, "--name", "tiny", "--tls-verify=false", "--quiet", "--json"]);
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let digest = v["manifest"]["source"]["digest"].as_str().unwrap().to_string();
    let pinned = format!("docker://127.0.0.1:{}/kiln/tiny@{digest}", reg.port);
    assert_eq!(v["manifest"]["source"]["reference"], pinned.as_str());
    let bundle = PathBuf::from(v["path"].as_str().unwrap());

    // Same image bytes as building the layout it was pushed from.
    let local = kiln_ok(
        d,
        &store,
        &[
            "build",
            "--from",
            &format!("oci:{}:latest", tiny().join("oci").display()),
            "--name",
            "tiny-local",
            "--quiet",
        ],
    );
    assert_eq!(sha256_hex(&bundle.join("image")), sha256_hex(&PathBuf::from(local.trim()).join("image")));

    // A recipe pins the tag in kiln.lock; --locked then works without resolving the tag.
    fs::write(d.join("kiln.toml"), format!("[image.tiny]\nfrom = \"{from}\"\n")).unwrap();
    let err = kiln_err(d, &store, &["build", "--locked", "--tls-verify=false"]);
    assert!(err.contains("has no pin") && err.contains("--update"), "{err}");
    kiln_ok(d, &store, &["build", "--tls-verify=false", "--quiet"]);
    let lock = fs::read_to_string(d.join("kiln.lock")).unwrap();
    assert!(lock.contains(&pinned), "{lock}");
    let again = kiln_ok(d, &store, &["build", "--locked", "--tls-verify=false", "--quiet"]);
    assert_eq!(again.trim(), v["path"].as_str().unwrap());

    // A tag that does not exist is an error naming it.
    let missing = format!("docker://127.0.0.1:{}/kiln/nope:1", reg.port);
    let err = kiln_err(d, &store, &["build", "--from", &missing, "--name", "nope", "--tls-verify=false"]);
    assert!(err.contains("kiln/nope:1"), "{err}");
}

/// A site directory: the tiny fixture as a local source (`oci:tiny-oci:latest`, a copy beside the recipe
/// when `with_source`), two bundles of it, one node, the appliance.
fn site_dir(dir: &Path, with_source: bool) {
    fs::create_dir_all(dir).unwrap();
    if with_source {
        sh(&format!("cp -a '{}' '{}'", tiny().join("oci").display(), dir.join("tiny-oci").display()));
    }
    fs::write(
        dir.join("kiln.toml"),
        r#"source_date_epoch = 1700000000

[image.tiny]
from = "oci:tiny-oci:latest"
cmdline = "console=ttyS0"

[image.other]
from = "oci:tiny-oci:latest"
cmdline = "console=ttyS0 quiet"

[server]
address = "127.0.0.1/8"
dhcp = "off"

[node.n1]
mac = "52:54:00:00:07:01"
image = "tiny"
ipv4 = "10.7.0.11"

[appliance]
image = "tiny"
"#,
    )
    .unwrap();
}

fn json_lines(text: &str) -> Vec<serde_json::Value> {
    text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn files_of(dir: &Path) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let p = e.unwrap().path();
            (p.file_name().unwrap().to_string_lossy().into_owned(), sha256_hex(&p))
        })
        .collect();
    v.sort();
    v
}

fn names(built: &[serde_json::Value]) -> Vec<String> {
    built
        .iter()
        .map(|b| Path::new(b["path"].as_str().unwrap()).file_name().unwrap().to_string_lossy().into_owned())
        .collect()
}

#[test]
fn push_then_substitute_pull_and_push_again() {
    let reg = start_registry();
    let work = tempfile::tempdir().unwrap();
    let a = work.path().join("a");
    site_dir(&a, true);
    let store_a = work.path().join("store-a");
    let built = json_lines(&kiln_ok(&a, &store_a, &["build", "--quiet", "--json"]));
    assert_eq!(built.len(), 2);

    let pushed = json_lines(&kiln_ok(&a, &store_a, &["push", &reg.url(), "--tls-verify=false", "--json"]));
    assert_eq!(pushed.len(), 2);
    assert!(pushed.iter().all(|p| p["uploaded"] == true), "{pushed:?}");
    let uploads = reg.blob_uploads();
    // The two bundles share their kernel and image: 2 manifests + kernel + image + initramfs = 5 blobs.
    assert_eq!(uploads_of_distinct_blobs(&reg), 5, "identical files are one blob");
    let again = json_lines(&kiln_ok(&a, &store_a, &["push", &reg.url(), "--tls-verify=false", "--json"]));
    assert!(again.iter().all(|p| p["uploaded"] == false), "{again:?}");
    assert_eq!(reg.blob_uploads(), uploads, "pushing again uploaded a blob");

    // Another directory and an empty store, without the source image: everything is substituted.
    let b = work.path().join("b");
    site_dir(&b, false);
    fs::copy(a.join("kiln.lock"), b.join("kiln.lock")).unwrap();
    let store_b = work.path().join("store-b");
    let out = kiln(&b, &store_b, &["build", "--json", "--substituter", &reg.url(), "--tls-verify=false"]);
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.matches("substituted from").count(), 2, "{stderr}");
    let subst = json_lines(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(names(&subst), names(&built), "same store paths");
    for (x, y) in built.iter().zip(&subst) {
        assert_eq!(y["substituted"], reg.url().as_str());
        assert_eq!(files_of(Path::new(x["path"].as_str().unwrap())), files_of(Path::new(y["path"].as_str().unwrap())));
    }
    assert!(kiln_ok(&b, &store_b, &["store", "verify"]).contains("no problems"));
    // --no-substitute: no substituter is asked, and without the source nothing can be built.
    let c = work.path().join("c");
    site_dir(&c, false);
    fs::copy(a.join("kiln.lock"), c.join("kiln.lock")).unwrap();
    let err = kiln_err(&c, &work.path().join("store-c"), &["build", "--no-substitute"]);
    assert!(err.contains("tiny-oci"), "{err}");

    // kiln pull: fills an empty store for the recipe, builds nothing.
    let pulled =
        json_lines(&kiln_ok(&c, &work.path().join("store-c"), &["pull", &reg.url(), "--tls-verify=false", "--json"]));
    assert_eq!(pulled.len(), 2);
    assert!(kiln_ok(&c, &work.path().join("store-c"), &["store", "verify"]).contains("2 output(s) verified"));
}

/// Blobs uploaded, counted by the digests of finished uploads (PUT …?digest=).
fn uploads_of_distinct_blobs(reg: &Registry) -> usize {
    let log = fs::read_to_string(&reg.log).unwrap_or_default();
    let mut digests: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("\"PUT /v2/") && l.contains("/blobs/uploads/"))
        .filter_map(|l| l.split("digest=sha256%3A").nth(1).map(|r| &r[..64]))
        .collect();
    digests.sort();
    digests.dedup();
    digests.len()
}

#[test]
fn a_damaged_blob_or_a_registry_that_is_down_never_breaks_a_build() {
    let reg = start_registry();
    let work = tempfile::tempdir().unwrap();
    let a = work.path().join("a");
    site_dir(&a, true);
    let store_a = work.path().join("store-a");
    let built = json_lines(&kiln_ok(&a, &store_a, &["build", "--quiet", "--json"]));
    kiln_ok(&a, &store_a, &["push", &reg.url(), "--tls-verify=false", "--quiet"]);

    // The registry now serves a wrong byte in the image blob (shared by both bundles).
    let image = built[0]["manifest"]["files"]["image"]["sha256"].as_str().unwrap().to_string();
    let blob = reg.data.join("docker/registry/v2/blobs/sha256").join(&image[..2]).join(&image).join("data");
    let mut bytes = fs::read(&blob).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    fs::write(&blob, bytes).unwrap();

    let b = work.path().join("b");
    site_dir(&b, true);
    let store_b = work.path().join("store-b");
    let out = kiln(&b, &store_b, &["build", "--json", "--substituter", &reg.url(), "--tls-verify=false"]);
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("refused") && stderr.contains("building it locally"), "{stderr}");
    let local = json_lines(&String::from_utf8_lossy(&out.stdout));
    assert!(local.iter().all(|b| b.get("substituted").is_none()), "{local:?}");
    assert_eq!(names(&local), names(&built));
    assert!(kiln_ok(&b, &store_b, &["store", "verify"]).contains("2 output(s) verified, no problems"));
    assert_eq!(fs::read_dir(store_b.join("tmp")).unwrap().count(), 0, "nothing left half-written");

    // A registry that does not answer: one line, then a local build.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let down = format!("docker://127.0.0.1:{port}/kiln");
    let c = work.path().join("c");
    site_dir(&c, true);
    let out = kiln(&c, &work.path().join("store-c"), &["build", "--substituter", &down, "--tls-verify=false"]);
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().filter(|l| l.contains(&down)).collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(lines[0].contains("unreachable") && lines[0].contains("building locally"), "{stderr}");
}

#[test]
fn export_then_import_into_an_empty_store_elsewhere() {
    let work = tempfile::tempdir().unwrap();
    let a = work.path().join("a");
    site_dir(&a, true);
    let boot = a.join("undionly.kpxe");
    fs::write(&boot, (0..100_000u32).map(|i| (i * 13 % 251) as u8).collect::<Vec<u8>>()).unwrap();
    let mut recipe = fs::read_to_string(a.join("kiln.toml")).unwrap();
    recipe.push_str("\n[server.boot_files]\nbios = \"undionly.kpxe\"\n");
    fs::write(a.join("kiln.toml"), recipe).unwrap();
    let store_a = work.path().join("store-a");
    kiln_ok(&a, &store_a, &["build", "--quiet"]);
    let e: serde_json::Value =
        serde_json::from_str(&kiln_ok(&a, &store_a, &["export", "site.kiln", "--json"])).unwrap();
    assert_eq!(e["outputs"], 1, "the served closure: the one image the node boots");
    let archive = a.join("site.kiln");
    assert_eq!(e["sha256"].as_str().unwrap(), sha256_hex(&archive));
    // The same closure gives the same archive.
    kiln_ok(&a, &store_a, &["export", "again.kiln"]);
    assert_eq!(sha256_hex(&a.join("again.kiln")), sha256_hex(&archive));

    let d = work.path().join("elsewhere/site");
    fs::create_dir_all(&d).unwrap();
    let store_d = work.path().join("store-d");
    // Damaged archives are refused and change nothing.
    let bytes = fs::read(&archive).unwrap();
    let truncated = d.join("truncated.kiln");
    fs::write(&truncated, &bytes[..bytes.len() * 2 / 3]).unwrap();
    let mut flipped = bytes.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0x40;
    fs::write(d.join("flipped.kiln"), flipped).unwrap();
    fs::create_dir_all(&store_d).unwrap();
    kiln_ok(&d, &store_d, &["store", "ls"]);
    let before = store_snapshot(&store_d);
    for bad in ["truncated.kiln", "flipped.kiln"] {
        let err = kiln_err(&d, &store_d, &["import", bad]);
        assert!(err.contains("nothing was imported"), "{err}");
        assert_eq!(store_snapshot(&store_d), before, "{bad} changed the store");
        assert!(!d.join("kiln.toml").exists());
    }

    let r: serde_json::Value =
        serde_json::from_str(&kiln_ok(&d, &store_d, &["import", archive.to_str().unwrap(), "--json"])).unwrap();
    assert_eq!(r["added"], 1);
    assert!(kiln_ok(&d, &store_d, &["store", "verify"]).contains("no problems"));
    let tiny_a = PathBuf::from(kiln_ok(&a, &store_a, &["build", "--quiet", "--name", "tiny"]).trim());
    let tiny_d = PathBuf::from(r["roots"]["image-tiny"].as_str().unwrap());
    assert_eq!(tiny_a.file_name(), tiny_d.file_name(), "same store path");
    assert_eq!(files_of(&tiny_a), files_of(&tiny_d));
    // The imported recipe: boot files point into the store, and kiln build finds every bundle it serves
    // there without the source image.
    let imported = fs::read_to_string(d.join("kiln.toml")).unwrap();
    assert!(imported.contains(&store_d.join("store").display().to_string()), "{imported}");
    let again = kiln_ok(&d, &store_d, &["build", "--quiet", "--name", "tiny"]);
    assert_eq!(again.trim(), tiny_d.to_str().unwrap());
    // An appliance ISO made from the imported store is the one the build machine makes.
    let iso = |dir: &Path, store: &Path| -> String {
        let v: serde_json::Value =
            serde_json::from_str(&kiln_ok(dir, store, &["appliance", "--quiet", "--json"])).unwrap();
        v["sha256"].as_str().unwrap().to_string()
    };
    assert_eq!(iso(&d, &store_d), iso(&a, &store_a));
    // Importing twice adds nothing; an existing recipe is kept unless --force.
    let err = kiln_err(&d, &store_d, &["import", archive.to_str().unwrap()]);
    assert!(err.contains("--force"), "{err}");
    let r: serde_json::Value =
        serde_json::from_str(&kiln_ok(&d, &store_d, &["import", archive.to_str().unwrap(), "--force", "--json"]))
            .unwrap();
    assert_eq!(r["added"], 0);
}

/// A multi-platform image pushed with `skopeo copy --all`: `--arch` / `arch =` choose the
/// manifest (not the build machine's architecture), kiln.lock pins that manifest's digest and
/// the architecture it is for, and a single-platform image of another architecture is refused.
#[test]
fn docker_transport_chooses_the_architecture_from_a_multi_platform_image() {
    let reg = start_registry();
    let multi = format!("127.0.0.1:{}/kiln/multi:latest", reg.port);
    sh(&format!(
        "skopeo copy --all --quiet --dest-tls-verify=false 'oci:{}:latest' 'docker://{multi}'",
        multiarch().join("oci").display()
    ));
    let digest_of =
        |arch: &str| fs::read_to_string(multiarch().join(format!("{arch}.digest"))).unwrap().trim().to_string();
    let work = tempfile::tempdir().unwrap();
    let d = work.path();
    let store = d.join("store");
    let from = format!("docker://{multi}");
    let mut paths = Vec::new();
    for (arch, linux) in [("arm64", "aarch64"), ("amd64", "x86_64")] {
        let out = kiln_ok(
            d,
            &store,
            &["build", "--from", &from, "--name", "node", "--arch", arch, "--tls-verify=false", "--quiet", "--json"],
        );
        let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        assert_eq!(v["manifest"]["arch"], linux);
        let pinned = format!("docker://127.0.0.1:{}/kiln/multi@{}", reg.port, digest_of(arch));
        assert_eq!(v["manifest"]["source"]["reference"], pinned.as_str(), "{arch} pinned by its own manifest");
        paths.push(v["path"].as_str().unwrap().to_string());
    }
    assert_ne!(paths[0], paths[1]);

    // A recipe pins the arm64 manifest, and says for which architecture.
    let recipe = |arch: &str| format!("[image.node]\nfrom = \"{from}\"\narch = \"{arch}\"\n");
    fs::write(d.join("kiln.toml"), recipe("arm64")).unwrap();
    let out = kiln_ok(d, &store, &["build", "--tls-verify=false", "--quiet"]);
    assert_eq!(out.trim(), paths[0], "the same inputs as --arch arm64");
    let lock = fs::read_to_string(d.join("kiln.lock")).unwrap();
    assert!(lock.contains(&format!("@{}", digest_of("arm64"))) && lock.contains("arch = \"arm64\""), "{lock}");
    // Another architecture makes that pin stale: --locked refuses, a plain build pins anew.
    fs::write(d.join("kiln.toml"), recipe("amd64")).unwrap();
    let err = kiln_err(d, &store, &["build", "--locked", "--tls-verify=false"]);
    assert!(err.contains("has no pin for [image.node]") && err.contains("amd64"), "{err}");
    let out = kiln_ok(d, &store, &["build", "--tls-verify=false", "--quiet"]);
    assert_eq!(out.trim(), paths[1]);
    let lock = fs::read_to_string(d.join("kiln.lock")).unwrap();
    assert!(lock.contains(&format!("@{}", digest_of("amd64"))) && lock.contains("arch = \"amd64\""), "{lock}");

    // A single-platform amd64 image asked for as arm64: refused, naming both; the store unchanged.
    let single = format!("127.0.0.1:{}/kiln/tiny:latest", reg.port);
    sh(&format!(
        "skopeo copy --quiet --dest-tls-verify=false 'oci:{}:latest' 'docker://{single}'",
        tiny().join("oci").display()
    ));
    let before = store_snapshot(&store);
    let err = kiln_err(
        d,
        &store,
        &["build", "--from", &format!("docker://{single}"), "--name", "wrong", "--arch", "arm64", "--tls-verify=false"],
    );
    assert!(err.contains("it is an image for amd64, but arm64 was asked for"), "{err}");
    assert_eq!(store_snapshot(&store), before);
}
