//! `docker://` against a real registry (Debian's docker-registry) on loopback, fed by skopeo.

mod common;

use std::fs;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

struct Registry {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
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
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n",
            dir.path().join("data").display()
        ),
    )
    .unwrap();
    let child = Command::new("docker-registry")
        .arg("serve")
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting docker-registry");
    let start = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(start.elapsed() < Duration::from_secs(30), "registry did not listen on {port}");
        std::thread::sleep(Duration::from_millis(100));
    }
    Registry { child, port, _dir: dir }
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
