//! The `[server]`, `[profile.NAME]`, `[node.NAME]`, `[ipxe.NAME]` and `[appliance]` tables of `kiln.toml`.
//!
//! Values that have a format (MAC addresses, IPv4 addresses with prefixes, pools, the DHCP mode, the
//! unknown-machine policy) are parsed while the TOML is read, so a bad value is reported with its line and
//! column like any other recipe error.

use std::fmt;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::str::FromStr;

use anyhow::{bail, Result};
use serde::Deserialize;

use super::BootMode;
use crate::net::{Ipv4Cidr, Mac, Pool, Subnet};

/// What kind of DHCP service the boot server gives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DhcpMode {
    /// Authoritative for the subnet: addresses and boot information.
    #[default]
    Full,
    /// Boot information only, next to the site's DHCP server.
    Proxy,
    /// No DHCP at all.
    Off,
}

impl fmt::Display for DhcpMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DhcpMode::Full => "full",
            DhcpMode::Proxy => "proxy",
            DhcpMode::Off => "off",
        })
    }
}

impl FromStr for DhcpMode {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "full" => Ok(DhcpMode::Full),
            "proxy" => Ok(DhcpMode::Proxy),
            "off" => Ok(DhcpMode::Off),
            _ => bail!("invalid DHCP mode {s:?}: expected full, proxy or off"),
        }
    }
}

/// What to do with machines that are not in the node list: `ignore` (neither answer nor record them),
/// `record` (the default: note them as discovered, give them an address from the pool but no boot file), or
/// `boot:<image>` (record them and boot them with that image).
#[derive(Clone, PartialEq, Eq, Debug, Default)]
pub enum UnknownPolicy {
    Ignore,
    #[default]
    Record,
    Boot(String),
}

impl UnknownPolicy {
    /// Whether unknown machines are booted.
    pub fn boots(&self) -> bool {
        matches!(self, UnknownPolicy::Boot(_))
    }
}

impl fmt::Display for UnknownPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UnknownPolicy::Ignore => f.write_str("ignore"),
            UnknownPolicy::Record => f.write_str("record"),
            UnknownPolicy::Boot(image) => write!(f, "boot:{image}"),
        }
    }
}

impl FromStr for UnknownPolicy {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "ignore" => Ok(UnknownPolicy::Ignore),
            "record" => Ok(UnknownPolicy::Record),
            other => match other.strip_prefix("boot:") {
                Some(img) if !img.is_empty() => Ok(UnknownPolicy::Boot(img.to_string())),
                _ => bail!("{s:?} is not an unknown-machine policy: use ignore, record or boot:<image>"),
            },
        }
    }
}

/// How kiln talks to a node's BMC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BmcProtocol {
    /// DMTF Redfish over HTTPS (HTTP accepted for emulators and test rigs).
    #[default]
    Redfish,
    /// IPMI 2.0 (RMCP+, `ipmitool -I lanplus`).
    Ipmi,
}

impl fmt::Display for BmcProtocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BmcProtocol::Redfish => "redfish",
            BmcProtocol::Ipmi => "ipmi",
        })
    }
}

impl FromStr for BmcProtocol {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "redfish" => Ok(BmcProtocol::Redfish),
            "ipmi" => Ok(BmcProtocol::Ipmi),
            _ => bail!("invalid BMC protocol {s:?}: expected redfish or ipmi"),
        }
    }
}

crate::serde_as_text!(DhcpMode, UnknownPolicy, BmcProtocol);

/// `bmc = { ... }` of a `[node.NAME]` or `[profile.NAME]`: the node's baseboard management controller, used by
/// `kiln power` and `kiln node console`. A profile carries everything but the address; the node's keys win.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BmcRecipe {
    /// A host, `host:port`, or a URL (`https://` is the default for Redfish; a Redfish URL may end with the
    /// system's path, `/redfish/v1/Systems/ID`).
    pub address: Option<String>,
    /// `redfish` (default) or `ipmi`.
    pub protocol: Option<BmcProtocol>,
    pub user: Option<String>,
    /// A file holding the password (its first line); else `KILN_BMC_PASSWORD`.
    pub password_file: Option<PathBuf>,
    /// Skip TLS certificate verification (self-signed BMC certificates); said on every use.
    pub insecure: Option<bool>,
    /// PEM file of the CA (or the certificate itself) the BMC's certificate is checked against, instead of the
    /// public roots.
    pub ca_file: Option<PathBuf>,
    /// IPMI (and a Redfish BMC's console, which is IPMI SOL): the RMCP+ cipher suite (`ipmitool -C`; 17 on current BMCs, 3 on old ones). Unset, ipmitool asks
    /// the BMC, which costs a timeout on BMCs that do not answer that question.
    pub cipher_suite: Option<u8>,
    /// Never read: accepted only so that a password written here is refused with a message saying where it goes.
    #[serde(default)]
    pub password: Option<serde::de::IgnoredAny>,
}

/// `[server.boot_files]`: a firmware file per client architecture, overriding the `[ipxe.*]` build named by
/// `[server] ipxe`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootFilesRecipe {
    pub bios: Option<PathBuf>,
    pub efi_x64: Option<PathBuf>,
    pub efi_arm64: Option<PathBuf>,
}

/// `[server]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerRecipe {
    /// Where DHCP listens (SO_BINDTODEVICE); unset: every interface. TFTP and HTTP listen on every interface.
    pub interface: Option<String>,
    /// The server's address and prefix on the provisioning network.
    pub address: Option<Ipv4Cidr>,
    /// `full` (default), `proxy` or `off`.
    pub dhcp: Option<DhcpMode>,
    pub pool: Option<Pool>,
    /// Which `[ipxe.NAME]` build answers PXE firmware.
    pub ipxe: Option<String>,
    #[serde(default)]
    pub unknown: UnknownPolicy,
    pub http_port: Option<u16>,
    pub tftp_port: Option<u16>,
    pub dhcp_port: Option<u16>,
    pub gateway: Option<Ipv4Addr>,
    #[serde(default)]
    pub dns: Vec<Ipv4Addr>,
    pub domain: Option<String>,
    /// Lease time in seconds (default 3600).
    pub lease_time: Option<u32>,
    pub boot_files: Option<BootFilesRecipe>,
    /// Leases, discovered machines and boot events (default: `<store>/state`).
    pub state_dir: Option<PathBuf>,
    /// Keys put in every node's `/root/.ssh/authorized_keys`.
    #[serde(default)]
    pub ssh_authorized_keys: Vec<String>,
    /// Networks from which any node's overlay may be fetched, besides each node's own address (its
    /// reservation or lease): for sites where requests arrive relayed or NATed. Default: none.
    #[serde(default)]
    pub overlay_allow: Vec<Subnet>,
    /// Limits on what clients can make the server hold (docs/serve.md, "Limits"); unset: the defaults.
    pub http_max_connections: Option<usize>,
    /// Seconds.
    pub http_header_timeout: Option<u64>,
    /// Seconds.
    pub http_write_timeout: Option<u64>,
    /// Seconds.
    pub http_idle_timeout: Option<u64>,
    pub tftp_max_transfers: Option<usize>,
    pub tftp_max_per_client: Option<usize>,
    /// Seconds: the largest `timeout` option a TFTP client is granted.
    pub tftp_max_timeout: Option<u64>,
    /// Seconds a TFTP transfer may go without progress.
    pub tftp_stall_limit: Option<u64>,
    pub max_discovered: Option<u64>,
    pub max_events: Option<u64>,
    /// Boot events waiting to be written; beyond it they are counted and not logged.
    pub event_queue: Option<usize>,
    /// Boot log lines printed per second; beyond it they are counted (the state keeps every event).
    pub log_lines_per_second: Option<u64>,
    /// A registry repository (`docker://registry.site/kiln`) or OCI layout (`oci:DIR`) to fetch what this
    /// server serves from, before serving and on each reload (a boot-server replica).
    pub pull: Option<String>,
    /// Verify the `pull` registry's TLS certificate (false: a plain-HTTP or self-signed registry).
    pub pull_tls_verify: Option<bool>,
    /// Registry credentials for `pull` (containers auth.json format); default: where podman and skopeo look.
    pub pull_authfile: Option<PathBuf>,
    /// Seconds between the node agents' heartbeats (default 30); a node silent for 3 of them is `lost`.
    pub heartbeat: Option<u64>,
    /// Heartbeats accepted from one node per interval (default 4); the rest are refused and counted.
    pub heartbeat_max_per_interval: Option<u32>,
    /// Bytes a heartbeat's body may have (default 4096).
    pub heartbeat_max_body: Option<usize>,
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
    /// BMC settings shared by the profile's nodes (everything but `address`).
    pub bmc: Option<BmcRecipe>,
    /// Overrides the image's `boot`.
    pub boot: Option<BootMode>,
    /// two-stage: the local disk the loader installs the image to and boots it from (e.g. `/dev/sda`).
    pub disk: Option<String>,
    /// Lets the loader overwrite a `disk` that holds data kiln did not write.
    pub disk_wipe: Option<bool>,
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
    /// The node's BMC, over the profile's settings.
    pub bmc: Option<BmcRecipe>,
    /// Overrides the profile's and the image's `boot`.
    pub boot: Option<BootMode>,
    /// Overrides the profile's `disk`; `""` for none.
    pub disk: Option<String>,
    pub disk_wipe: Option<bool>,
}

/// `[ipxe.NAME]`: an iPXE build (`kiln build-ipxe`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IpxeRecipe {
    pub targets: Option<Vec<String>>,
    pub vlan: Option<u16>,
    pub embed: Option<PathBuf>,
    pub chain: Option<String>,
    #[serde(default)]
    pub options: Vec<String>,
    #[serde(default)]
    pub no_options: Vec<String>,
    pub source: Option<IpxeSourceRecipe>,
}

/// `source = { git = URL, rev = REV }` or `source = { path = DIR }` of an `[ipxe.NAME]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IpxeSourceRecipe {
    pub git: Option<String>,
    pub rev: Option<String>,
    pub path: Option<PathBuf>,
}

/// `[appliance]`: what `kiln appliance` puts on its ISO.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ApplianceRecipe {
    /// The `[image.*]` whose OS runs kiln serve (needs a kernel and its modules).
    pub image: String,
    /// Images to carry besides those the nodes reference.
    #[serde(default)]
    pub images: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_parse_with_clear_errors() {
        assert_eq!("boot:compute".parse::<UnknownPolicy>().unwrap(), UnknownPolicy::Boot("compute".into()));
        assert!("boot:".parse::<UnknownPolicy>().is_err());
        assert_eq!("full".parse::<DhcpMode>().unwrap(), DhcpMode::Full);
        assert!("fulll".parse::<DhcpMode>().unwrap_err().to_string().contains("full, proxy or off"));
        assert_eq!("ipmi".parse::<BmcProtocol>().unwrap(), BmcProtocol::Ipmi);
        assert!("redfsh".parse::<BmcProtocol>().unwrap_err().to_string().contains("redfish or ipmi"));
        for p in ["ignore", "record", "boot:x"] {
            assert_eq!(p.parse::<UnknownPolicy>().unwrap().to_string(), p);
        }
    }
}
