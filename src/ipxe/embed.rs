//! The script compiled into an iPXE binary (iPXE's `EMBED=`): the user's file, or one kiln
//! generates from `--vlan`/`--chain` out of the templates in the top-level `ipxe/` folder.

use std::path::Path;

use anyhow::{bail, Context, Result};

const VLAN: &str = include_str!("../../ipxe/vlan.ipxe");
const VLAN_CHAIN: &str = include_str!("../../ipxe/vlan-chain.ipxe");
const CHAIN: &str = include_str!("../../ipxe/chain.ipxe");

/// A script to embed. `name` is the file name iPXE gives the embedded image (`imgstat` shows it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmbedScript {
    pub name: String,
    pub text: Vec<u8>,
}

/// The script for `--vlan`/`--chain`, or `None` when neither is given (iPXE's own autoboot).
pub fn generate(vlan: Option<u16>, chain: Option<&str>) -> Result<Option<EmbedScript>> {
    if let Some(id) = vlan {
        if !(1..=4094).contains(&id) {
            bail!("VLAN ID {id} is out of range 1-4094");
        }
    }
    if let Some(url) = chain {
        if url.is_empty() || url.chars().any(|c| c.is_whitespace() || c.is_control()) {
            bail!("chain URL {url:?} must be one word without spaces (iPXE settings like ${{mac}} are fine)");
        }
    }
    let template = match (vlan, chain) {
        (None, None) => return Ok(None),
        (Some(_), None) => VLAN,
        (Some(_), Some(_)) => VLAN_CHAIN,
        (None, Some(_)) => CHAIN,
    };
    let text = template
        .replace("@VLAN@", &vlan.map(|v| v.to_string()).unwrap_or_default())
        .replace("@URL@", chain.unwrap_or_default());
    Ok(Some(EmbedScript { name: "kiln.ipxe".into(), text: text.into_bytes() }))
}

/// The user's `--embed FILE`.
pub fn from_file(path: &Path) -> Result<EmbedScript> {
    let text = std::fs::read(path).with_context(|| format!("reading the embed script {}", path.display()))?;
    if !(text.starts_with(b"#!ipxe") || text.starts_with(b"#!gpxe")) {
        bail!("{} does not start with #!ipxe, so iPXE would not run it as a script", path.display());
    }
    let base = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    // make splits EMBED= on spaces and commas; anything unusual gets a plain name.
    let safe = !base.is_empty()
        && !base.starts_with('.')
        && base.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    let name = if safe { base } else { "embedded.ipxe".to_string() };
    Ok(EmbedScript { name, text })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vlan_script_tags_net0_then_boots_the_vlan_device() {
        let s = generate(Some(1000), None).unwrap().unwrap();
        let text = String::from_utf8(s.text).unwrap();
        assert!(text.starts_with("#!ipxe\n"));
        let vcreate = text.find("\nvcreate --tag 1000 net0 ").unwrap();
        let autoboot = text.find("\nautoboot net0-1000 ").unwrap();
        assert!(vcreate < autoboot, "{text}");
        assert!(!text.contains('@'), "every placeholder is filled: {text}");
        assert_eq!(s.name, "kiln.ipxe");
    }

    #[test]
    fn chain_scripts() {
        let text =
            String::from_utf8(generate(None, Some("http://10.4.0.1/ipxe/${mac}")).unwrap().unwrap().text).unwrap();
        assert!(text.contains("\ndhcp && chain http://10.4.0.1/ipxe/${mac} || goto retry\n"), "{text}");
        let text = String::from_utf8(generate(Some(7), Some("http://b/x")).unwrap().unwrap().text).unwrap();
        assert!(
            text.contains("\nvcreate --tag 7 net0 ") && text.contains("\ndhcp net0-7 && chain http://b/x "),
            "{text}"
        );
        assert_eq!(generate(None, None).unwrap(), None);
    }

    #[test]
    fn bad_flags_are_refused() {
        assert!(generate(Some(0), None).unwrap_err().to_string().contains("out of range 1-4094"));
        assert!(generate(Some(4095), None).is_err());
        assert!(generate(None, Some("http://a b")).unwrap_err().to_string().contains("without spaces"));
    }

    #[test]
    fn embed_files_must_be_scripts() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("site.ipxe");
        std::fs::write(&p, "#!ipxe\ndhcp\n").unwrap();
        assert_eq!(from_file(&p).unwrap().name, "site.ipxe");
        let odd = d.path().join("my script,v2.ipxe");
        std::fs::write(&odd, "#!ipxe\n").unwrap();
        assert_eq!(from_file(&odd).unwrap().name, "embedded.ipxe");
        std::fs::write(&p, "dhcp\n").unwrap();
        assert!(from_file(&p).unwrap_err().to_string().contains("does not start with #!ipxe"));
    }
}
