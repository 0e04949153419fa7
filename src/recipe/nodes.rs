//! The node list as kiln serves it: every `[node.NAME]` with its profile applied, checked as a whole (duplicate
//! MACs and addresses, missing profiles and images, hostnames), and each node's BMC with its address parsed.

use std::collections::BTreeMap;
use std::fmt;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::str::FromStr;

use anyhow::{bail, Context, Result};
use serde::Serialize;

use super::server::{BmcProtocol, BmcRecipe, NodeRecipe, ProfileRecipe, ServerRecipe};
use super::BootMode;
use crate::net::Mac;

/// A node with its profile applied.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Node {
    pub name: String,
    pub mac: Mac,
    pub image: String,
    pub hostname: String,
    pub ipv4: Option<Ipv4Addr>,
    pub prefix: Option<u8>,
    pub gateway: Option<Ipv4Addr>,
    pub cmdline: String,
    pub vlan: Option<u16>,
    pub tags: Vec<String>,
    pub ssh_authorized_keys: Vec<String>,
    /// The node's BMC (its `bmc` over its profile's), when it has an address.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bmc: Option<Bmc>,
    /// The node's or its profile's `boot`; `None`: the image's.
    pub boot: Option<BootMode>,
    /// The disk a two-stage loader installs the image to.
    pub disk: Option<String>,
    pub disk_wipe: bool,
}

/// A node's BMC with its profile's settings applied. Holds no password, only where to read one.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Bmc {
    pub address: BmcAddress,
    pub protocol: BmcProtocol,
    pub user: Option<String>,
    pub password_file: Option<PathBuf>,
    /// TLS certificate verification is off.
    pub insecure: bool,
    pub ca_file: Option<PathBuf>,
    pub cipher_suite: Option<u8>,
}

/// Whether a BMC address names its scheme.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BmcScheme {
    Http,
    Https,
}

/// A BMC address as written: `host`, `host:port`, `[v6]:port`, or `http(s)://host[:port][/path]`. Credentials in
/// the address are refused (the password never goes in kiln.toml).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BmcAddress {
    pub scheme: Option<BmcScheme>,
    /// A name or an address, without brackets.
    pub host: String,
    pub port: Option<u16>,
    /// The URL's path without a trailing `/` (empty when none): a Redfish system, `/redfish/v1/Systems/1`.
    pub path: String,
}

impl BmcAddress {
    /// `host[:port]` for a URL or a message (IPv6 addresses in brackets).
    pub fn authority(&self) -> String {
        let host = if self.host.contains(':') { format!("[{}]", self.host) } else { self.host.clone() };
        match self.port {
            Some(p) => format!("{host}:{p}"),
            None => host,
        }
    }
}

impl fmt::Display for BmcAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.scheme {
            Some(BmcScheme::Http) => f.write_str("http://")?,
            Some(BmcScheme::Https) => f.write_str("https://")?,
            None => {}
        }
        write!(f, "{}{}", self.authority(), self.path)
    }
}

impl FromStr for BmcAddress {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        if let Some((_, host)) = s.rsplit_once('@') {
            // Not echoed: what precedes '@' may be a password.
            bail!("BMC address …@{host}: credentials do not belong in the address; use `user` and `password_file`");
        }
        if s.is_empty() || s.chars().any(|c| c.is_whitespace() || c.is_control()) {
            bail!("BMC address {s:?} must be a host, host:port or URL without spaces");
        }
        let (scheme, rest) = match s.split_once("://") {
            Some(("https", rest)) => (Some(BmcScheme::Https), rest),
            Some(("http", rest)) => (Some(BmcScheme::Http), rest),
            Some((other, _)) => bail!("BMC address {s:?}: scheme {other:?} is not http or https"),
            None => (None, s),
        };
        let (authority, path) = match rest.find(['/', '?', '#']) {
            Some(i) if scheme.is_some() => (&rest[..i], &rest[i..]),
            Some(_) => bail!("BMC address {s:?}: a path needs a URL (https://{s})"),
            None => (rest, ""),
        };
        if path.contains(['?', '#']) {
            bail!("BMC address {s:?}: a query or fragment means nothing here");
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (host, after) =
                v6.split_once(']').with_context(|| format!("BMC address {s:?}: unclosed '[' of an IPv6 address"))?;
            match after {
                "" => (host, None),
                _ => (host, Some(after.strip_prefix(':').unwrap_or(after))),
            }
        } else if authority.matches(':').count() > 1 {
            bail!("BMC address {s:?}: write an IPv6 address in brackets, as [{authority}]");
        } else {
            match authority.split_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            }
        };
        if host.is_empty() {
            bail!("BMC address {s:?} has no host");
        }
        let port = match port {
            None => None,
            Some(p) => match p.parse::<u16>() {
                Ok(n) if n > 0 => Some(n),
                _ => bail!("BMC address {s:?}: port {p:?} is not a number from 1 to 65535"),
            },
        };
        Ok(BmcAddress { scheme, host: host.to_string(), port, path: path.trim_end_matches('/').to_string() })
    }
}

impl Serialize for BmcAddress {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

/// The node's BMC: its own `bmc` keys over its profile's. `None` when neither gives an address.
fn resolve_bmc(node: Option<&BmcRecipe>, profile: Option<(&str, &BmcRecipe)>) -> Result<Option<Bmc>> {
    const NO_PASSWORD: &str = "`password` is not read from kiln.toml: put it in a file named by `password_file` \
                               (mode 0600) or in KILN_BMC_PASSWORD";
    if let Some((name, p)) = profile {
        let at = || format!("[profile.{name}] bmc");
        if p.password.is_some() {
            bail!("{}: {NO_PASSWORD}", at());
        }
        if p.address.is_some() {
            bail!("{}: `address` belongs to each node (a profile is shared): set it in [node.NAME] bmc", at());
        }
    }
    if node.is_some_and(|n| n.password.is_some()) {
        bail!("bmc: {NO_PASSWORD}");
    }
    let p = profile.map(|(_, p)| p);
    let Some(address) = node.and_then(|n| n.address.as_deref()) else {
        return Ok(None);
    };
    let address: BmcAddress = address.parse().context("bmc.address")?;
    let protocol = node.and_then(|n| n.protocol).or(p.and_then(|p| p.protocol)).unwrap_or_default();
    if protocol == BmcProtocol::Ipmi && (address.scheme.is_some() || !address.path.is_empty()) {
        bail!("bmc.address {address}: an IPMI address is a host or host:port, not a URL");
    }
    let insecure = node.and_then(|n| n.insecure).or(p.and_then(|p| p.insecure)).unwrap_or(false);
    let cipher_suite = node.and_then(|n| n.cipher_suite).or(p.and_then(|p| p.cipher_suite));
    if let Some(c) = cipher_suite.filter(|&c| c > 17) {
        bail!("bmc.cipher_suite = {c}: IPMI cipher suites are 0 to 17");
    }
    Ok(Some(Bmc {
        address,
        protocol,
        user: node.and_then(|n| n.user.clone()).or_else(|| p.and_then(|p| p.user.clone())),
        password_file: node.and_then(|n| n.password_file.clone()).or_else(|| p.and_then(|p| p.password_file.clone())),
        insecure,
        ca_file: node.and_then(|n| n.ca_file.clone()).or_else(|| p.and_then(|p| p.ca_file.clone())),
        cipher_suite,
    }))
}

/// Applies profiles and checks the node list as a whole (duplicate MACs and addresses,
/// missing profiles and images).
pub fn resolve_nodes(
    server: &ServerRecipe,
    profiles: &BTreeMap<String, ProfileRecipe>,
    nodes: &BTreeMap<String, NodeRecipe>,
) -> Result<Vec<Node>> {
    let mut out: Vec<Node> = Vec::new();
    for (name, n) in nodes {
        let ctx = || format!("[node.{name}]");
        let profile = match &n.profile {
            Some(p) => Some(profiles.get(p).with_context(|| format!("{}: profile {p:?} is not defined", ctx()))?),
            None => None,
        };
        let image = n
            .image
            .clone()
            .or_else(|| profile.and_then(|p| p.image.clone()))
            .with_context(|| format!("{}: no image (set `image` or a profile with one)", ctx()))?;
        let cmdline = [profile.and_then(|p| p.cmdline.as_deref()), n.cmdline.as_deref()]
            .into_iter()
            .flatten()
            .collect::<Vec<_>>()
            .join(" ");
        let hostname = n.hostname.clone().unwrap_or_else(|| name.clone());
        if hostname.is_empty()
            || hostname.len() > 63
            || !hostname.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            bail!("{}: hostname {hostname:?} must be 1-63 letters, digits or '-'", ctx());
        }
        let mut keys = server.ssh_authorized_keys.clone();
        keys.extend(profile.map(|p| p.ssh_authorized_keys.clone()).unwrap_or_default());
        keys.extend(n.ssh_authorized_keys.clone());
        let mut tags = profile.map(|p| p.tags.clone()).unwrap_or_default();
        tags.extend(n.tags.clone());
        let profile_bmc = n.profile.as_deref().zip(profile.and_then(|p| p.bmc.as_ref()));
        let bmc = resolve_bmc(n.bmc.as_ref(), profile_bmc).with_context(ctx)?;
        let disk = match n.disk.clone().or_else(|| profile.and_then(|p| p.disk.clone())) {
            Some(d) if d.is_empty() => None,
            Some(d) => Some(check_disk(&d).with_context(|| format!("{}: disk", ctx()))?),
            None => None,
        };
        let node = Node {
            name: name.clone(),
            mac: n.mac,
            image,
            hostname,
            ipv4: n.ipv4.map(|c| c.addr),
            prefix: n.ipv4.and_then(|c| c.prefix).or(server.address.and_then(|a| a.prefix)),
            gateway: n.gateway.or(profile.and_then(|p| p.gateway)).or(server.gateway),
            cmdline,
            vlan: n.vlan.or(profile.and_then(|p| p.vlan)),
            tags,
            ssh_authorized_keys: keys,
            bmc,
            boot: n.boot.or(profile.and_then(|p| p.boot)),
            disk,
            disk_wipe: n.disk_wipe.or(profile.and_then(|p| p.disk_wipe)).unwrap_or(false),
        };
        if let Some(other) = out.iter().find(|o| o.mac == node.mac) {
            bail!("{}: MAC {} is also used by [node.{}]", ctx(), node.mac, other.name);
        }
        if let Some(ip) = node.ipv4 {
            if let Some(other) = out.iter().find(|o| o.ipv4 == Some(ip)) {
                bail!("{}: address {ip} is also used by [node.{}]", ctx(), other.name);
            }
            if Some(ip) == server.address.map(|a| a.addr) {
                bail!("{}: address {ip} is the server's own address", ctx());
            }
        }
        out.push(node);
    }
    Ok(out)
}

/// A disk as the loader names it: a device under `/dev` (`/dev/sda`, `/dev/nvme0n1`, `/dev/vda`). The loader runs
/// without udev, so `/dev/disk/by-*` links do not exist there.
fn check_disk(d: &str) -> Result<String> {
    let name = d.strip_prefix("/dev/").unwrap_or_default();
    if name.is_empty() || name.len() > 32 || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        bail!("{d:?} is not a disk device: use its kernel name under /dev, e.g. \"/dev/sda\" or \"/dev/nvme0n1\"");
    }
    Ok(d.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profiles_apply_and_duplicates_are_refused() {
        let t: toml::Table = toml::from_str(
            r#"
[server]
address = "10.4.0.1/24"
gateway = "10.4.0.254"
[profile.compute]
image = "compute"
cmdline = "mitigations=off"
[node.n001]
mac = "52:54:00:00:00:01"
profile = "compute"
ipv4 = "10.4.0.11"
cmdline = "quiet"
[node.n002]
mac = "52:54:00:00:00:02"
image = "other"
hostname = "gpu2"
"#,
        )
        .unwrap();
        let server: ServerRecipe = t["server"].clone().try_into().unwrap();
        let profiles: BTreeMap<String, ProfileRecipe> = t["profile"].clone().try_into().unwrap();
        let mut nodes: BTreeMap<String, NodeRecipe> = t["node"].clone().try_into().unwrap();
        let resolved = resolve_nodes(&server, &profiles, &nodes).unwrap();
        assert_eq!(resolved[0].image, "compute");
        assert_eq!(resolved[0].cmdline, "mitigations=off quiet");
        assert_eq!(resolved[0].prefix, Some(24));
        assert_eq!(resolved[0].gateway, Some("10.4.0.254".parse().unwrap()));
        assert_eq!(resolved[1].hostname, "gpu2");
        assert_eq!(resolved[0].bmc, None);
        nodes.get_mut("n002").unwrap().mac = "52:54:00:00:00:01".parse().unwrap();
        let err = resolve_nodes(&server, &profiles, &nodes).unwrap_err().to_string();
        assert!(err.contains("[node.n002]") && err.contains("also used by [node.n001]"), "{err}");
    }

    fn resolve(text: &str) -> Result<Vec<Node>> {
        let t: toml::Table = toml::from_str(text).unwrap();
        let profiles: BTreeMap<String, ProfileRecipe> =
            t.get("profile").cloned().map(|p| p.try_into().unwrap()).unwrap_or_default();
        let nodes: BTreeMap<String, NodeRecipe> = t["node"].clone().try_into().unwrap();
        resolve_nodes(&ServerRecipe::default(), &profiles, &nodes)
    }

    #[test]
    fn bmc_settings_come_from_the_profile_and_the_node() {
        let nodes = resolve(
            r#"
[profile.rack1]
image = "compute"
bmc = { protocol = "ipmi", user = "admin", password_file = "/etc/kiln/bmc.pass", cipher_suite = 17 }
[node.n001]
mac = "52:54:00:00:00:01"
profile = "rack1"
bmc = { address = "10.5.0.11:6230", user = "root" }
[node.n002]
mac = "52:54:00:00:00:02"
profile = "rack1"
[node.n003]
mac = "52:54:00:00:00:03"
image = "compute"
bmc = { address = "https://[fd00::5]/redfish/v1/Systems/1/", insecure = true }
"#,
        )
        .unwrap();
        let b = nodes[0].bmc.as_ref().unwrap();
        assert_eq!((b.protocol, b.user.as_deref(), b.address.port), (BmcProtocol::Ipmi, Some("root"), Some(6230)));
        assert_eq!(b.password_file.as_deref(), Some(std::path::Path::new("/etc/kiln/bmc.pass")));
        assert_eq!(b.cipher_suite, Some(17));
        assert_eq!(nodes[1].bmc, None, "no address: no BMC");
        let b = nodes[2].bmc.as_ref().unwrap();
        assert_eq!((b.protocol, b.insecure), (BmcProtocol::Redfish, true));
        assert_eq!((b.address.host.as_str(), b.address.path.as_str()), ("fd00::5", "/redfish/v1/Systems/1"));
        assert_eq!(b.address.to_string(), "https://[fd00::5]/redfish/v1/Systems/1");
    }

    #[test]
    fn bmc_mistakes_are_named() {
        let node = |bmc: &str| format!("[node.n1]\nmac = \"52:54:00:00:00:01\"\nimage = \"c\"\nbmc = {bmc}\n");
        let err = |text: &str| format!("{:#}", resolve(text).unwrap_err());
        let e = err(&node(r#"{ address = "10.0.0.1", password = "hunter2" }"#));
        assert!(e.contains("[node.n1]") && e.contains("password_file") && !e.contains("hunter2"), "{e}");
        let e = err(&format!(
            "[profile.p]\nbmc = {{ address = \"10.0.0.1\" }}\n{}profile = \"p\"\n",
            node(r#"{ user = "x" }"#)
        ));
        assert!(e.contains("[profile.p] bmc") && e.contains("belongs to each node"), "{e}");
        let e = err(&node(r#"{ address = "https://admin:pw@10.0.0.1" }"#));
        assert!(e.contains("credentials do not belong") && !e.contains("admin:pw@"), "{e}");
        let e = err(&node(r#"{ address = "10.0.0.1", cipher_suite = 18 }"#));
        assert!(e.contains("0 to 17"), "{e}");
        let e = err(&node(r#"{ address = "admin:hunter2@10.0.0.1/x" }"#));
        assert!(e.contains("credentials do not belong") && !e.contains("hunter2"), "{e}");
        let e = err(&node(r#"{ address = "fd00::5" }"#));
        assert!(e.contains("[fd00::5]"), "{e}");
        let e = err(&node(r#"{ address = "10.0.0.1:99999" }"#));
        assert!(e.contains("not a number from 1 to 65535"), "{e}");
        let e = err(&node(r#"{ address = "ftp://10.0.0.1" }"#));
        assert!(e.contains("not http or https"), "{e}");
        let e = err(&node(r#"{ address = "https://10.0.0.1", protocol = "ipmi" }"#));
        assert!(e.contains("an IPMI address is a host or host:port"), "{e}");
        let e = super::super::parse(&node(r#"{ address = "10.0.0.1", protocl = "ipmi" }"#)).unwrap_err().to_string();
        assert!(e.contains("line 4") && e.contains("protocl"), "{e}");
    }
}
