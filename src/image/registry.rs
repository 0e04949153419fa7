//! `docker://` sources, read through skopeo's image proxy (`skopeo experimental-image-proxy`)
//! with the `containers-image-proxy` crate, so registries, auth files, mirrors and
//! `registries.conf` behave as they do for podman and skopeo.
//!
//! From a multi-platform image (an image index or manifest list) the proxy chooses the manifest
//! for the architecture kiln asks for (skopeo's `--override-arch`, never the build machine's by
//! accident), and the digest kiln pins is that manifest's.
//!
//! Blobs are downloaded into the build's spool directory (the proxy checks their size and
//! digest, and kiln checks the digest again when it reads them).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use containers_image_proxy::{ImageProxy, ImageProxyConfig, OpenedImage};
use serde::Deserialize;
use tokio::io::AsyncWriteExt;

use super::{BlobLoc, ImageConfig, LayerBlob};
use crate::util::{ByteProgress, Digest};

/// How to reach registries.
#[derive(Debug, Clone)]
pub struct RegistryOptions {
    /// Verify TLS certificates (`--tls-verify=false` for a local plain-HTTP registry).
    pub tls_verify: bool,
    /// A containers auth file (`--authfile`), else the usual locations.
    pub authfile: Option<PathBuf>,
}

impl Default for RegistryOptions {
    fn default() -> Self {
        RegistryOptions { tls_verify: true, authfile: None }
    }
}

pub struct RemoteLayer {
    digest: Digest,
    size: u64,
}

pub struct Resolved {
    pub digest: Digest,
    pub pinned: String,
    pub config: ImageConfig,
    pub layers: Vec<RemoteLayer>,
}

/// An open connection to the proxy with the image opened in it.
pub struct Session {
    rt: Option<tokio::runtime::Runtime>,
    proxy: Option<ImageProxy>,
    img: OpenedImage,
    reference: String,
}

impl Drop for Session {
    fn drop(&mut self) {
        // Closing the socket makes skopeo exit; only then can the runtime's blocking task that
        // waits for it finish, so the order matters (dropping the runtime first would hang).
        drop(self.proxy.take());
        if let Some(rt) = self.rt.take() {
            rt.shutdown_timeout(std::time::Duration::from_secs(5));
        }
    }
}

#[derive(Deserialize)]
struct Manifest {
    config: Desc,
    #[serde(default)]
    layers: Vec<Desc>,
}

#[derive(Deserialize)]
struct Desc {
    digest: String,
    size: u64,
}

impl Session {
    /// Opens `reference` and reads the manifest and config of its `arch` (OCI name) image.
    pub fn open(reference: &str, opts: &RegistryOptions, arch: &str) -> Result<(Self, Resolved)> {
        let rt =
            tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting the async runtime")?;
        let full = format!("docker://{reference}");
        if crate::util::which("skopeo", None).is_none() {
            bail!("{full}: docker:// sources are read with skopeo, which is not installed (Debian/Ubuntu: apt-get install skopeo)");
        }
        let (proxy, img) = rt.block_on(async {
            let mut config = ImageProxyConfig::default();
            config.authfile = opts.authfile.clone();
            config.insecure_skip_tls_verification = Some(!opts.tls_verify);
            config.skopeo_cmd = Some(skopeo_command(arch));
            let proxy = ImageProxy::new_with_config(config).await.context(
                "starting skopeo's image proxy (docker:// sources need skopeo; on Debian/Ubuntu: apt-get install skopeo)",
            )?;
            let img = proxy.open_image(&full).await.with_context(|| format!("opening {full}"))?;
            anyhow::Ok((proxy, img))
        })?;
        let session = Session { rt: Some(rt), proxy: Some(proxy), img, reference: full.clone() };
        let (digest, raw) = session
            .rt()
            .block_on(session.proxy().fetch_manifest_raw_oci(&session.img))
            .with_context(|| format!("fetching the manifest of {full}"))?;
        let digest = Digest::parse(&digest).with_context(|| format!("{full}: manifest digest"))?;
        let manifest: Manifest = serde_json::from_slice(&raw)
            .with_context(|| format!("{full}: the manifest is not a valid image manifest"))?;
        // The config blob itself (GetFullConfig would return a re-serialisation whose bytes
        // do not match the digest).
        let config_digest = Digest::parse(&manifest.config.digest)?;
        let config_bytes = session
            .rt()
            .block_on(async {
                let d: containers_image_proxy::oci_spec::image::Digest = config_digest.to_string().parse()?;
                let (mut reader, driver) = session.proxy().get_blob(&session.img, &d, manifest.config.size).await?;
                let mut buf = Vec::new();
                let read = async {
                    tokio::io::AsyncReadExt::read_to_end(&mut reader, &mut buf).await?;
                    anyhow::Ok(())
                };
                let (read, driven) = tokio::join!(read, driver);
                read?;
                driven?;
                anyhow::Ok(buf)
            })
            .with_context(|| format!("fetching the config of {full}"))?;
        if Digest::of_bytes(&config_bytes) != config_digest {
            bail!("{full}: the config does not match its digest {config_digest}");
        }
        let config = ImageConfig::parse(&config_bytes, &format!("{full}: config"))?;
        let layers = manifest
            .layers
            .iter()
            .map(|l| Ok(RemoteLayer { digest: Digest::parse(&l.digest)?, size: l.size }))
            .collect::<Result<Vec<_>>>()?;
        let pinned = format!("docker://{}@{digest}", repository_of(reference));
        Ok((session, Resolved { digest, pinned, config, layers }))
    }

    fn rt(&self) -> &tokio::runtime::Runtime {
        self.rt.as_ref().expect("runtime lives as long as the session")
    }

    fn proxy(&self) -> &ImageProxy {
        self.proxy.as_ref().expect("proxy lives as long as the session")
    }

    /// Downloads each layer blob into `spool_dir`, counting the bytes in `bytes`.
    pub fn download(
        mut self,
        layers: &[RemoteLayer],
        spool_dir: &Path,
        bytes: &ByteProgress,
    ) -> Result<Vec<LayerBlob>> {
        bytes.set_total(layers.iter().map(|l| l.size).sum());
        let mut out = Vec::with_capacity(layers.len());
        for (i, layer) in layers.iter().enumerate() {
            let path = spool_dir.join(format!("blob-{}", layer.digest.hex()));
            self.rt()
                .block_on(async {
                    let oci_digest: containers_image_proxy::oci_spec::image::Digest =
                        layer.digest.to_string().parse().context("digest")?;
                    let (mut reader, driver) = self.proxy().get_blob(&self.img, &oci_digest, layer.size).await?;
                    let mut file =
                        tokio::fs::File::create(&path).await.with_context(|| format!("creating {}", path.display()))?;
                    let copy = async {
                        let mut buf = vec![0u8; 1 << 20];
                        loop {
                            let n = tokio::io::AsyncReadExt::read(&mut reader, &mut buf).await?;
                            if n == 0 {
                                break;
                            }
                            file.write_all(&buf[..n]).await?;
                            bytes.add(n as u64);
                        }
                        file.flush().await?;
                        anyhow::Ok(())
                    };
                    let (copied, driven) = tokio::join!(copy, driver);
                    copied?;
                    driven?;
                    anyhow::Ok(())
                })
                .with_context(|| format!("downloading layer {} ({}) of {}", i + 1, layer.digest, self.reference))?;
            out.push(LayerBlob {
                digest: Some(layer.digest.clone()),
                diff_id: None,
                size: Some(layer.size),
                loc: BlobLoc::whole_file(path, layer.size),
                label: format!("layer {} ({})", i + 1, layer.digest),
            });
        }
        if let (Some(rt), Some(proxy)) = (self.rt.as_ref(), self.proxy.take()) {
            let _ = rt.block_on(proxy.finalize());
        }
        Ok(out)
    }
}

/// skopeo choosing images for `arch` on Linux. Its own default command binds skopeo's life to
/// kiln's with a parent-death signal; `setpriv` does the same here (util-linux, on every Debian
/// and Ubuntu), and where it is missing skopeo still exits when kiln closes the socket.
fn skopeo_command(arch: &str) -> std::process::Command {
    let platform = ["--override-arch", arch, "--override-os", "linux"];
    match crate::util::which("setpriv", None) {
        Some(setpriv) => {
            let mut c = std::process::Command::new(setpriv);
            c.args(["--pdeathsig", "TERM", "--", "skopeo"]).args(platform);
            c
        }
        None => {
            let mut c = std::process::Command::new("skopeo");
            c.args(platform);
            c
        }
    }
}

/// `registry/repo:tag` or `registry/repo@sha256:…` → `registry/repo`.
pub fn repository_of(reference: &str) -> &str {
    let no_digest = reference.split('@').next().unwrap_or(reference);
    match no_digest.rfind(':') {
        // A ':' after the last '/' separates the tag; before it, it is a registry port.
        Some(colon) if colon > no_digest.rfind('/').unwrap_or(0) => &no_digest[..colon],
        _ => no_digest,
    }
}

#[cfg(test)]
mod tests {
    use super::repository_of;

    #[test]
    fn repository_strips_tag_and_digest_not_port() {
        assert_eq!(repository_of("localhost:5000/kiln/tiny:latest"), "localhost:5000/kiln/tiny");
        assert_eq!(repository_of("localhost:5000/kiln/tiny"), "localhost:5000/kiln/tiny");
        assert_eq!(repository_of("quay.io/a/b@sha256:abc"), "quay.io/a/b");
        assert_eq!(repository_of("debian:12"), "debian");
    }
}
