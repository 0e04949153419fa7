//! The node list as kiln serves it: every `[node.NAME]` with its profile applied, checked as a whole (duplicate
//! MACs and addresses, missing profiles and images, hostnames).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use anyhow::{bail, Context, Result};
use serde::Serialize;

use super::server::{NodeRecipe, ProfileRecipe, ServerRecipe};
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
