//! Per-node overlays: a small initrd unpacked after the image, carrying what makes a node itself.
//!
//! - `/etc/hostname`, and `/etc/hosts` listing the server and every node with an address;
//! - `/etc/kiln/node.env`: the node's settings as shell variables (`KILN_NODE`, `KILN_MAC`,
//!   `KILN_IPV4`, `KILN_PREFIX`, `KILN_GATEWAY`, `KILN_IMAGE`, `KILN_VLAN`, `KILN_TAGS`), and what
//!   its status agent needs (`KILN_SERVER_URL`, `KILN_HEARTBEAT`, `KILN_IMAGE_DIGEST`);
//! - `/etc/systemd/network/10-kiln.network` (when the node has an address): a static address on
//!   the interface with the node's MAC, for systemd-networkd;
//! - `/root/.ssh/authorized_keys` (0600 in a 0700 directory) when keys are configured.
//!
//! - anything the admin adds: the files of the image's `overlay` directory (`[image.NAME] overlay
//!   = "DIR"`), with `{{node}}`, `{{hostname}}`, `{{mac}}`, `{{image}}`, `{{ipv4}}`, `{{prefix}}`,
//!   `{{gateway}}`, `{{vlan}}` and `{{server}}` replaced by the node's values. They are added
//!   last, so they can replace the files above.
//!
//! The bytes depend only on the node list, the server's address and the templates: same config,
//! same overlay.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::Ipv4Addr;

use anyhow::{bail, Context, Result};

use crate::archive::{Compression, Compressor, NewcTree};
use crate::recipe::Node;

/// What node.env tells a node's status agent (`kiln-node agent`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AgentEnv {
    /// Where to report: the server's base URL, e.g. `http://10.4.0.1`.
    pub server_url: String,
    /// Seconds between heartbeats.
    pub heartbeat: u64,
    /// The digest of the node's image (`sha256:…`), empty when it has no bundle.
    pub image_digest: String,
}

/// Renders the overlay files of `node`: path → (mode, contents).
pub fn files(
    node: &Node,
    all: &[Node],
    server: Ipv4Addr,
    domain: Option<&str>,
    agent: &AgentEnv,
) -> BTreeMap<String, (u32, Vec<u8>)> {
    let mut f = BTreeMap::new();
    f.insert("etc/hostname".into(), (0o644, format!("{}\n", node.hostname).into_bytes()));
    let mut hosts = String::from("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n");
    hosts.push_str(&format!("{server}\tkiln-server\n"));
    for n in all {
        if let Some(ip) = n.ipv4 {
            match domain {
                Some(d) => hosts.push_str(&format!("{ip}\t{}.{d} {}\n", n.hostname, n.hostname)),
                None => hosts.push_str(&format!("{ip}\t{}\n", n.hostname)),
            }
        }
    }
    f.insert("etc/hosts".into(), (0o644, hosts.into_bytes()));
    let opt = |v: Option<String>| v.unwrap_or_default();
    let env = format!(
        "KILN_NODE='{}'\nKILN_HOSTNAME='{}'\nKILN_MAC='{}'\nKILN_IMAGE='{}'\nKILN_IPV4='{}'\nKILN_PREFIX='{}'\nKILN_GATEWAY='{}'\nKILN_VLAN='{}'\nKILN_TAGS='{}'\nKILN_SERVER='{server}'\n",
        node.name,
        node.hostname,
        node.mac,
        node.image,
        opt(node.ipv4.map(|i| i.to_string())),
        opt(node.prefix.map(|p| p.to_string())),
        opt(node.gateway.map(|g| g.to_string())),
        opt(node.vlan.map(|v| v.to_string())),
        node.tags.join(" ").replace('\'', ""),
    ) + &format!(
        "KILN_SERVER_URL='{}'\nKILN_HEARTBEAT='{}'\nKILN_IMAGE_DIGEST='{}'\n",
        agent.server_url, agent.heartbeat, agent.image_digest
    );
    f.insert("etc/kiln/node.env".into(), (0o644, env.into_bytes()));
    if let Some(ip) = node.ipv4 {
        let mut net = format!(
            "# Written by kiln for node {}.\n[Match]\nMACAddress={}\n\n[Network]\nAddress={ip}/{}\n",
            node.name,
            node.mac,
            node.prefix.unwrap_or(24)
        );
        if let Some(g) = node.gateway {
            net.push_str(&format!("Gateway={g}\n"));
        }
        net.push_str(&format!("DNS={server}\n"));
        f.insert("etc/systemd/network/10-kiln.network".into(), (0o644, net.into_bytes()));
    }
    if !node.ssh_authorized_keys.is_empty() {
        let mut keys = node.ssh_authorized_keys.join("\n");
        keys.push('\n');
        f.insert("root/.ssh/authorized_keys".into(), (0o600, keys.into_bytes()));
    }
    f
}

/// Template files of an overlay directory: relative path → (mode, contents). Only regular files
/// and directories are read; symlinks are refused so nothing outside the directory is read.
pub fn read_templates(dir: &std::path::Path) -> Result<BTreeMap<String, (u32, Vec<u8>)>> {
    use std::os::unix::fs::PermissionsExt;
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).with_context(|| format!("reading overlay directory {}", d.display()))? {
            let e = e?;
            let p = e.path();
            let ft = e.file_type()?;
            if ft.is_dir() {
                stack.push(p);
            } else if ft.is_file() {
                let rel = p.strip_prefix(dir).expect("below the overlay directory").to_string_lossy().into_owned();
                let mode = e.metadata()?.permissions().mode() & 0o7777;
                out.insert(rel, (mode, std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?));
            } else {
                bail!("{}: overlay templates must be regular files or directories", p.display());
            }
        }
    }
    Ok(out)
}

/// Replaces `{{name}}` with the node's values; an unknown name is an error naming the file.
pub fn render(file: &str, text: &[u8], node: &Node, server: Ipv4Addr) -> Result<Vec<u8>> {
    let Ok(text) = std::str::from_utf8(text) else { return Ok(text.to_vec()) };
    let opt = |v: Option<String>| v.unwrap_or_default();
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("{{") {
        out.push_str(&rest[..i]);
        let after = &rest[i + 2..];
        let j = after.find("}}").with_context(|| format!("overlay template {file}: `{{{{` without `}}}}`"))?;
        let value = match after[..j].trim() {
            "node" => node.name.clone(),
            "hostname" => node.hostname.clone(),
            "mac" => node.mac.to_string(),
            "image" => node.image.clone(),
            "ipv4" => opt(node.ipv4.map(|i| i.to_string())),
            "prefix" => opt(node.prefix.map(|p| p.to_string())),
            "gateway" => opt(node.gateway.map(|g| g.to_string())),
            "vlan" => opt(node.vlan.map(|v| v.to_string())),
            "server" => server.to_string(),
            other => bail!(
                "overlay template {file} uses unknown variable {{{{{other}}}}} (known: node, hostname, mac, image, ipv4, prefix, gateway, vlan, server)"
            ),
        };
        out.push_str(&value);
        rest = &after[j + 2..];
    }
    out.push_str(rest);
    Ok(out.into_bytes())
}

/// The overlay as a gzip-compressed newc archive (every iPXE and kernel reads gzip).
pub fn build(
    node: &Node,
    all: &[Node],
    server: Ipv4Addr,
    domain: Option<&str>,
    templates: &BTreeMap<String, (u32, Vec<u8>)>,
    agent: &AgentEnv,
) -> Result<Vec<u8>> {
    let mut files = files(node, all, server, domain, agent);
    for (path, (mode, text)) in templates {
        files.insert(path.clone(), (*mode, render(path, text, node, server)?));
    }
    let mut tree = NewcTree::default();
    for (path, (mode, data)) in files {
        tree.bytes(&path, data, mode);
    }
    // SSH refuses keys in a directory others can read.
    for private in ["root", "root/.ssh"] {
        if tree.has_children(private) {
            tree.dir(private, 0o700);
        }
    }
    let comp = Compressor::new(Vec::new(), Compression::Gzip, 6, 1)?;
    let (mut comp, _) = tree.write(comp, 0)?;
    comp.flush()?;
    Ok(comp.finish()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, ip: Option<&str>) -> Node {
        Node {
            name: name.into(),
            mac: "52:54:00:00:00:01".parse().unwrap(),
            image: "compute".into(),
            hostname: name.into(),
            ipv4: ip.map(|i| i.parse().unwrap()),
            prefix: Some(24),
            gateway: None,
            cmdline: String::new(),
            vlan: None,
            tags: vec![],
            ssh_authorized_keys: vec!["ssh-ed25519 AAAA test".into()],
            bmc: None,
            boot: None,
            disk: None,
            disk_wipe: false,
        }
    }

    #[test]
    fn overlay_is_deterministic_and_lists_cluster_hosts() {
        let all = vec![node("n001", Some("10.4.0.11")), node("n002", Some("10.4.0.12"))];
        let server: Ipv4Addr = "10.4.0.1".parse().unwrap();
        let agent =
            AgentEnv { server_url: "http://10.4.0.1:8080".into(), heartbeat: 30, image_digest: "sha256:ab".into() };
        let a = build(&all[0], &all, server, None, &BTreeMap::new(), &agent).unwrap();
        assert_eq!(a, build(&all[0], &all, server, None, &BTreeMap::new(), &agent).unwrap());
        let f = files(&all[0], &all, server, Some("cluster"), &agent);
        let env = String::from_utf8(f["etc/kiln/node.env"].1.clone()).unwrap();
        assert!(
            env.contains(
                "KILN_SERVER_URL='http://10.4.0.1:8080'\nKILN_HEARTBEAT='30'\nKILN_IMAGE_DIGEST='sha256:ab'\n"
            ),
            "{env}"
        );
        assert_eq!(f["etc/hostname"].1, b"n001\n");
        let hosts = String::from_utf8(f["etc/hosts"].1.clone()).unwrap();
        assert!(hosts.contains("10.4.0.12\tn002.cluster n002"), "{hosts}");
        assert_eq!(f["root/.ssh/authorized_keys"].0, 0o600);
        assert!(String::from_utf8_lossy(&f["etc/systemd/network/10-kiln.network"].1).contains("Address=10.4.0.11/24"));
        assert_ne!(a, build(&all[1], &all, server, None, &BTreeMap::new(), &agent).unwrap());
    }

    #[test]
    fn admin_templates_are_rendered_and_checked() {
        let n = node("n001", Some("10.4.0.11"));
        let server: Ipv4Addr = "10.4.0.1".parse().unwrap();
        let out = render("etc/motd", b"{{hostname}} at {{ ipv4 }}/{{prefix}} via {{server}}\n", &n, server).unwrap();
        assert_eq!(out, b"n001 at 10.4.0.11/24 via 10.4.0.1\n");
        let err = render("etc/motd", b"{{nope}}", &n, server).unwrap_err().to_string();
        assert!(err.contains("etc/motd") && err.contains("{{nope}}"), "{err}");
        assert!(render("x", b"{{hostname", &n, server).is_err());
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("etc")).unwrap();
        std::fs::write(d.path().join("etc/motd"), "welcome to {{node}}\n").unwrap();
        let t = read_templates(d.path()).unwrap();
        let all = vec![n.clone()];
        let agent = AgentEnv::default();
        let bytes = build(&n, &all, server, None, &t, &agent).unwrap();
        assert_ne!(bytes, build(&n, &all, server, None, &BTreeMap::new(), &agent).unwrap());
        std::os::unix::fs::symlink("/etc/shadow", d.path().join("etc/shadow")).unwrap();
        assert!(read_templates(d.path()).unwrap_err().to_string().contains("regular files"));
    }
}
