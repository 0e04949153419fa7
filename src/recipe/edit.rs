//! `kiln node add|set|rm`: the node list in `kiln.toml`, edited in place (comments, order and formatting of
//! everything else are kept).
//!
//! Every edit is checked by parsing the whole edited recipe and resolving its nodes (duplicate
//! MACs and addresses, unknown profiles) before the file is replaced atomically, so a rejected
//! edit leaves the file as it was.

use std::path::Path;

use anyhow::{bail, Context, Result};

use super::nodes::{resolve_nodes, BmcAddress, Node};
use super::server::BmcProtocol;
use super::{check_name, parse};
use crate::net::{Ipv4Cidr, Mac};

/// Settings given on the command line; `None` leaves a key as it is.
#[derive(Debug, Default, Clone)]
pub struct NodeEdit {
    pub mac: Option<String>,
    pub image: Option<String>,
    pub profile: Option<String>,
    pub ipv4: Option<String>,
    pub gateway: Option<String>,
    pub hostname: Option<String>,
    pub cmdline: Option<String>,
    pub vlan: Option<u16>,
    pub tags: Option<Vec<String>>,
    pub bmc: BmcEdit,
}

/// The node's `bmc = { ... }` keys given on the command line; `None` leaves a key as it is. There is no password:
/// it never goes in kiln.toml.
#[derive(Debug, Default, Clone)]
pub struct BmcEdit {
    pub address: Option<String>,
    pub protocol: Option<String>,
    pub user: Option<String>,
    pub password_file: Option<String>,
    pub insecure: Option<bool>,
    pub ca_file: Option<String>,
    pub cipher_suite: Option<u8>,
}

fn validate(text: &str, path: &Path) -> Result<Vec<Node>> {
    let recipe = parse(text).with_context(|| format!("the edited {} would not be valid", path.display()))?;
    let server = recipe.server.clone().unwrap_or_default();
    resolve_nodes(&server, &recipe.profile, &recipe.node)
        .with_context(|| format!("the edited {} would not be valid", path.display()))
}

fn load_doc(path: &Path) -> Result<toml_edit::DocumentMut> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    text.parse::<toml_edit::DocumentMut>().with_context(|| format!("{} is not valid TOML", path.display()))
}

fn apply(table: &mut toml_edit::Table, edit: &NodeEdit) -> Result<()> {
    use toml_edit::value;
    if let Some(m) = &edit.mac {
        let mac: Mac = m.parse().context("--mac")?;
        table["mac"] = value(mac.to_string());
    }
    if let Some(i) = &edit.image {
        table["image"] = value(i.as_str());
    }
    if let Some(p) = &edit.profile {
        table["profile"] = value(p.as_str());
    }
    if let Some(a) = &edit.ipv4 {
        let c: Ipv4Cidr = a.parse().context("--ipv4")?;
        table["ipv4"] = value(c.to_string());
    }
    if let Some(g) = &edit.gateway {
        let g: std::net::Ipv4Addr = g.parse().with_context(|| format!("--gateway {g:?} is not an IPv4 address"))?;
        table["gateway"] = value(g.to_string());
    }
    if let Some(h) = &edit.hostname {
        table["hostname"] = value(h.as_str());
    }
    if let Some(c) = &edit.cmdline {
        table["cmdline"] = value(c.as_str());
    }
    if let Some(v) = edit.vlan {
        table["vlan"] = value(i64::from(v));
    }
    if let Some(tags) = &edit.tags {
        let mut arr = toml_edit::Array::new();
        for t in tags {
            arr.push(t.as_str());
        }
        table["tags"] = value(arr);
    }
    apply_bmc(table, &edit.bmc)
}

/// Sets keys of the node's `bmc` table (inline or not), creating it inline when absent.
fn apply_bmc(table: &mut toml_edit::Table, edit: &BmcEdit) -> Result<()> {
    use toml_edit::value;
    let mut keys: Vec<(&str, toml_edit::Item)> = Vec::new();
    if let Some(a) = &edit.address {
        let parsed: BmcAddress = a.parse().context("--bmc-address")?;
        keys.push(("address", value(parsed.to_string())));
    }
    if let Some(p) = &edit.protocol {
        let p: BmcProtocol = p.parse().context("--bmc-protocol")?;
        keys.push(("protocol", value(p.to_string())));
    }
    if let Some(u) = &edit.user {
        keys.push(("user", value(u.as_str())));
    }
    if let Some(f) = &edit.password_file {
        keys.push(("password_file", value(f.as_str())));
    }
    if let Some(i) = edit.insecure {
        keys.push(("insecure", value(i)));
    }
    if let Some(c) = &edit.ca_file {
        keys.push(("ca_file", value(c.as_str())));
    }
    if let Some(c) = edit.cipher_suite {
        keys.push(("cipher_suite", value(i64::from(c))));
    }
    if keys.is_empty() {
        return Ok(());
    }
    let item = table.entry("bmc").or_insert_with(|| value(toml_edit::InlineTable::new()));
    let bmc = item.as_table_like_mut().context("the node's `bmc` is not a table")?;
    for (k, v) in keys {
        bmc.insert(k, v);
    }
    // A key appended to an inline table keeps the old last key's trailing space before its comma.
    if let Some(inline) = item.as_inline_table_mut() {
        inline.fmt();
    }
    Ok(())
}

fn save(path: &Path, doc: &toml_edit::DocumentMut) -> Result<()> {
    let text = doc.to_string();
    validate(&text, path)?;
    crate::util::write_atomic(path, text.as_bytes())
}

pub fn add(path: &Path, name: &str, edit: &NodeEdit) -> Result<()> {
    check_name(name).context("node name")?;
    if edit.mac.is_none() {
        bail!("kiln node add needs --mac");
    }
    if edit.image.is_none() && edit.profile.is_none() {
        bail!("kiln node add needs --image or --profile");
    }
    let mut doc = load_doc(path)?;
    let nodes = doc
        .entry("node")
        .or_insert_with(|| {
            let mut t = toml_edit::Table::new();
            t.set_implicit(true);
            toml_edit::Item::Table(t)
        })
        .as_table_mut()
        .with_context(|| format!("{}: `node` is not a table", path.display()))?;
    if nodes.contains_key(name) {
        bail!("{}: [node.{name}] already exists; change it with kiln node set", path.display());
    }
    let mut table = toml_edit::Table::new();
    apply(&mut table, edit)?;
    nodes.insert(name, toml_edit::Item::Table(table));
    save(path, &doc)
}

pub fn set(path: &Path, name: &str, edit: &NodeEdit) -> Result<()> {
    let mut doc = load_doc(path)?;
    let table = doc
        .get_mut("node")
        .and_then(|n| n.get_mut(name))
        .and_then(|t| t.as_table_mut())
        .with_context(|| format!("{} has no [node.{name}]", path.display()))?;
    apply(table, edit)?;
    save(path, &doc)
}

pub fn rm(path: &Path, name: &str) -> Result<()> {
    let mut doc = load_doc(path)?;
    let removed = doc.get_mut("node").and_then(|n| n.as_table_mut()).and_then(|t| t.remove(name));
    if removed.is_none() {
        bail!("{} has no [node.{name}]", path.display());
    }
    save(path, &doc)
}

/// The nodes of the recipe at `path`, with their profiles applied.
pub fn list(path: &Path) -> Result<Vec<Node>> {
    super::LoadedRecipe::load(path)?.nodes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edits_keep_comments_and_refuse_duplicates() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("kiln.toml");
        std::fs::write(&p, "# site A\n[server]\naddress = \"10.4.0.1/24\" # the boot server\n\n[node.n001]\nmac = \"52:54:00:00:00:01\"\nimage = \"compute\"\n").unwrap();
        let edit = NodeEdit {
            mac: Some("52:54:00:AA:BB:42".into()),
            image: Some("compute".into()),
            ipv4: Some("10.4.0.42/24".into()),
            ..Default::default()
        };
        add(&p, "n042", &edit).unwrap();
        let text = std::fs::read_to_string(&p).unwrap();
        assert!(text.starts_with("# site A\n") && text.contains("# the boot server"), "{text}");
        assert!(text.contains("[node.n042]\nmac = \"52:54:00:aa:bb:42\""), "{text}");
        let dup =
            NodeEdit { mac: Some("52:54:00:00:00:01".into()), image: Some("compute".into()), ..Default::default() };
        let err = format!("{:#}", add(&p, "n043", &dup).unwrap_err());
        assert!(err.contains("also used by [node.n001]"), "{err}");
        assert_eq!(std::fs::read_to_string(&p).unwrap(), text, "a rejected edit changed the file");
        set(&p, "n042", &NodeEdit { hostname: Some("gpu42".into()), ..Default::default() }).unwrap();
        assert_eq!(list(&p).unwrap().iter().find(|n| n.name == "n042").unwrap().hostname, "gpu42");
        let bmc = BmcEdit {
            address: Some("10.5.0.42".into()),
            user: Some("admin".into()),
            password_file: Some("/etc/kiln/bmc.pass".into()),
            ..Default::default()
        };
        set(&p, "n042", &NodeEdit { bmc, ..Default::default() }).unwrap();
        let bmc = BmcEdit { protocol: Some("ipmi".into()), insecure: Some(false), ..Default::default() };
        set(&p, "n042", &NodeEdit { bmc, ..Default::default() }).unwrap();
        let text = std::fs::read_to_string(&p).unwrap();
        assert!(
            text.contains(
                "bmc = { address = \"10.5.0.42\", user = \"admin\", password_file = \"/etc/kiln/bmc.pass\", \
                 protocol = \"ipmi\", insecure = false }"
            ),
            "{text}"
        );
        let b = list(&p).unwrap().into_iter().find(|n| n.name == "n042").unwrap().bmc.unwrap();
        assert_eq!((b.address.host.as_str(), b.protocol), ("10.5.0.42", BmcProtocol::Ipmi));
        let bad = BmcEdit { address: Some("https://10.5.0.42".into()), ..Default::default() };
        let err = format!("{:#}", set(&p, "n042", &NodeEdit { bmc: bad, ..Default::default() }).unwrap_err());
        assert!(err.contains("an IPMI address is a host or host:port"), "{err}");
        rm(&p, "n001").unwrap();
        assert!(!std::fs::read_to_string(&p).unwrap().contains("n001"));
        assert!(rm(&p, "n001").is_err());
        assert!(format!(
            "{:#}",
            set(&p, "n042", &NodeEdit { ipv4: Some("10.4.0.999".into()), ..Default::default() }).unwrap_err()
        )
        .contains("--ipv4"));
    }
}
