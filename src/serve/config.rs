//! The `[server]`, `[profile.NAME]` and `[node.NAME]` tables of `kiln.toml`.
//!
//! Values that have a format (MAC addresses, IPv4 addresses with prefixes, pools, the DHCP mode,
//! the unknown-machine policy) are parsed while the TOML is read, so a bad value is reported
//! with its line and column like any other recipe error.

use std::collections::BTreeMap;
use std::fmt;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::str::FromStr;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

pub use super::dhcp::{DhcpMode, Pool};

/// A MAC address; parsed from `52:54:00:aa:bb:42`, `52-54-00-AA-BB-42` or `525400aabb42`,
/// shown lowercase with colons.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Mac(pub [u8; 6]);

impl FromStr for Mac {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        let hex: String = s.chars().filter(|c| !matches!(c, ':' | '-' | '.')).collect();
        let seps = s.len() - hex.len();
        if hex.len() != 12 || !(seps == 0 || seps == 5 || seps == 2) || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
            bail!("{s:?} is not a MAC address (write it as 52:54:00:aa:bb:42)");
        }
        let mut out = [0u8; 6];
        hex::decode_to_slice(&hex, &mut out).context("not hexadecimal")?;
        Ok(Mac(out))
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(f, "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", m[0], m[1], m[2], m[3], m[4], m[5])
    }
}

impl fmt::Debug for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// An IPv4 address with an optional prefix length: `10.4.0.1/24` or `10.4.0.11`.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Ipv4Cidr {
    pub addr: Ipv4Addr,
    pub prefix: Option<u8>,
}

impl FromStr for Ipv4Cidr {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        let (a, p) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: Ipv4Addr = a.parse().with_context(|| format!("{s:?} is not an IPv4 address"))?;
        let prefix = match p {
            Some(p) => {
                let n: u8 = p.parse().with_context(|| format!("{s:?}: prefix length {p:?} is not a number"))?;
                if n > 32 {
                    bail!("{s:?}: prefix length {n} is more than 32");
                }
                Some(n)
            }
            None => None,
        };
        Ok(Ipv4Cidr { addr, prefix })
    }
}

impl fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.prefix {
            Some(p) => write!(f, "{}/{p}", self.addr),
            None => write!(f, "{}", self.addr),
        }
    }
}

/// What to do with machines that are not in the node list: `ignore`, `record` (default), or
/// `boot:<image>`.
#[derive(Clone, PartialEq, Eq, Debug, Default)]
pub enum Unknown {
    Ignore,
    #[default]
    Record,
    Boot(String),
}

impl FromStr for Unknown {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "ignore" => Ok(Unknown::Ignore),
            "record" => Ok(Unknown::Record),
            other => match other.strip_prefix("boot:") {
                Some(img) if !img.is_empty() => Ok(Unknown::Boot(img.to_string())),
                _ => bail!("{s:?} is not an unknown-machine policy: use ignore, record or boot:<image>"),
            },
        }
    }
}

macro_rules! serde_via_str {
    ($($t:ty),*) => {$(
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                s.parse().map_err(|e: anyhow::Error| serde::de::Error::custom(format!("{e:#}")))
            }
        }
        impl Serialize for $t {
            fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
                s.serialize_str(&self.to_string())
            }
        }
    )*};
}
serde_via_str!(Mac, Ipv4Cidr);

/// Types read from TOML strings through their `FromStr`.
macro_rules! deserialize_via_str {
    ($($t:ty),*) => {$(
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                s.parse().map_err(|e: anyhow::Error| serde::de::Error::custom(format!("{e:#}")))
            }
        }
    )*};
}
deserialize_via_str!(Unknown, DhcpMode, Pool);

/// Boot files per client architecture, overriding the `[ipxe.*]` build named by `ipxe`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootFiles {
    pub bios: Option<PathBuf>,
    pub efi_x64: Option<PathBuf>,
    pub efi_arm64: Option<PathBuf>,
}

/// `[server]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerRecipe {
    /// Where DHCP/TFTP listen; unset: the interface that holds `address`.
    pub interface: Option<String>,
    /// The server's address and prefix on the provisioning network.
    pub address: Option<Ipv4Cidr>,
    /// `full` (default), `proxy` or `off`.
    pub dhcp: Option<DhcpMode>,
    pub pool: Option<Pool>,
    /// Which `[ipxe.NAME]` build answers PXE firmware.
    pub ipxe: Option<String>,
    #[serde(default)]
    pub unknown: Unknown,
    pub http_port: Option<u16>,
    pub tftp_port: Option<u16>,
    pub dhcp_port: Option<u16>,
    pub gateway: Option<Ipv4Addr>,
    #[serde(default)]
    pub dns: Vec<Ipv4Addr>,
    pub domain: Option<String>,
    /// Lease time in seconds (default 3600).
    pub lease_time: Option<u32>,
    pub boot_files: Option<BootFiles>,
    /// Leases, discovered machines and boot events (default: `<store>/state`).
    pub state_dir: Option<PathBuf>,
    /// Keys put in every node's `/root/.ssh/authorized_keys`.
    #[serde(default)]
    pub ssh_authorized_keys: Vec<String>,
}

/// `[profile.NAME]`: settings shared by nodes.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProfileRecipe {
    pub image: Option<String>,
    /// Appended to the bundle's command line.
    pub cmdline: Option<String>,
    pub gateway: Option<Ipv4Addr>,
    pub vlan: Option<u16>,
    #[serde(default)]
    pub tags: Vec<String>,
    #[serde(default)]
    pub ssh_authorized_keys: Vec<String>,
}

/// `[node.NAME]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeRecipe {
    pub mac: Mac,
    pub profile: Option<String>,
    pub image: Option<String>,
    pub ipv4: Option<Ipv4Cidr>,
    pub gateway: Option<Ipv4Addr>,
    /// Default: the table's name.
    pub hostname: Option<String>,
    /// Appended after the profile's.
    pub cmdline: Option<String>,
    pub vlan: Option<u16>,
    #[serde(default)]
    pub tags: Vec<String>,
    #[serde(default)]
    pub ssh_authorized_keys: Vec<String>,
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_parse_in_common_forms() {
        let m: Mac = "52:54:00:AA:bb:42".parse().unwrap();
        assert_eq!(m.to_string(), "52:54:00:aa:bb:42");
        assert_eq!("52-54-00-aa-bb-42".parse::<Mac>().unwrap(), m);
        assert_eq!("525400aabb42".parse::<Mac>().unwrap(), m);
        assert!("52:54:00:aa:bb".parse::<Mac>().is_err());
        assert!("52:54:00:aa:bb:zz".parse::<Mac>().is_err());
    }

    #[test]
    fn values_parse_with_clear_errors() {
        assert_eq!("10.4.0.1/24".parse::<Ipv4Cidr>().unwrap().prefix, Some(24));
        assert!("10.4.0.1/33".parse::<Ipv4Cidr>().is_err());
        assert!("10.4.0.300".parse::<Ipv4Cidr>().is_err());
        assert_eq!("boot:compute".parse::<Unknown>().unwrap(), Unknown::Boot("compute".into()));
        assert!("boot:".parse::<Unknown>().is_err());
        assert!("10.0.0.9-10.0.0.1".parse::<Pool>().is_err());
    }

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
        nodes.get_mut("n002").unwrap().mac = "52:54:00:00:00:01".parse().unwrap();
        let err = resolve_nodes(&server, &profiles, &nodes).unwrap_err().to_string();
        assert!(err.contains("[node.n002]") && err.contains("also used by [node.n001]"), "{err}");
    }
}
