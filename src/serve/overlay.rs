//! Per-node overlays: a small initrd unpacked after the image, carrying what makes a node itself.
//!
//! - `/etc/hostname`, and `/etc/hosts` listing the server and every node with an address;
//! - `/etc/kiln/node.env`: the node's settings as shell variables (`KILN_NODE`, `KILN_MAC`,
//!   `KILN_IPV4`, `KILN_PREFIX`, `KILN_GATEWAY`, `KILN_IMAGE`, `KILN_VLAN`, `KILN_TAGS`);
//! - `/etc/systemd/network/10-kiln.network` (when the node has an address): a static address on
//!   the interface with the node's MAC, for systemd-networkd;
//! - `/root/.ssh/authorized_keys` (0600 in a 0700 directory) when keys are configured.
//!
//! The bytes depend only on the node list and the server's address: same config, same overlay.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::Ipv4Addr;

use anyhow::Result;

use super::config::Node;
use crate::archive::{Compression, Compressor, CpioEntry, CpioWriter};

/// Renders the overlay files of `node`: path → (mode, contents).
pub fn files(node: &Node, all: &[Node], server: Ipv4Addr, domain: Option<&str>) -> BTreeMap<String, (u32, Vec<u8>)> {
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

/// The overlay as a gzip-compressed newc archive (every iPXE and kernel reads gzip).
pub fn build(node: &Node, all: &[Node], server: Ipv4Addr, domain: Option<&str>) -> Result<Vec<u8>> {
    let files = files(node, all, server, domain);
    let mut dirs: BTreeMap<String, u32> = BTreeMap::new();
    for path in files.keys() {
        let mut cur = String::new();
        for comp in path.split('/').collect::<Vec<_>>().split_last().map(|(_, d)| d).unwrap_or(&[]) {
            if !cur.is_empty() {
                cur.push('/');
            }
            cur.push_str(comp);
            let mode = if cur == "root" || cur == "root/.ssh" { 0o700 } else { 0o755 };
            dirs.insert(cur.clone(), mode);
        }
    }
    let mut entries: BTreeMap<String, (u32, Option<&Vec<u8>>)> = BTreeMap::new();
    for (d, mode) in &dirs {
        entries.insert(d.clone(), (libc::S_IFDIR | mode, None));
    }
    for (p, (mode, data)) in &files {
        entries.insert(p.clone(), (libc::S_IFREG | mode, Some(data)));
    }
    let comp = Compressor::new(Vec::new(), Compression::Gzip, 6, 1)?;
    let mut cpio = CpioWriter::new(comp);
    for (ino, (name, (mode, data))) in entries.iter().enumerate() {
        let entry = CpioEntry {
            name: name.as_bytes(),
            ino: ino as u32 + 1,
            mode: *mode,
            nlink: if data.is_some() { 1 } else { 2 },
            size: data.map(|d| d.len() as u64).unwrap_or(0),
            ..Default::default()
        };
        match data {
            Some(d) => cpio.write_entry(&entry, Some(&mut d.as_slice()))?,
            None => cpio.write_entry(&entry, None)?,
        }
    }
    let (mut comp, _) = cpio.finish()?;
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
        }
    }

    #[test]
    fn overlay_is_deterministic_and_lists_cluster_hosts() {
        let all = vec![node("n001", Some("10.4.0.11")), node("n002", Some("10.4.0.12"))];
        let server: Ipv4Addr = "10.4.0.1".parse().unwrap();
        let a = build(&all[0], &all, server, None).unwrap();
        assert_eq!(a, build(&all[0], &all, server, None).unwrap());
        let f = files(&all[0], &all, server, Some("cluster"));
        assert_eq!(f["etc/hostname"].1, b"n001\n");
        let hosts = String::from_utf8(f["etc/hosts"].1.clone()).unwrap();
        assert!(hosts.contains("10.4.0.12\tn002.cluster n002"), "{hosts}");
        assert_eq!(f["root/.ssh/authorized_keys"].0, 0o600);
        assert!(String::from_utf8_lossy(&f["etc/systemd/network/10-kiln.network"].1).contains("Address=10.4.0.11/24"));
        assert_ne!(a, build(&all[1], &all, server, None).unwrap());
    }
}
