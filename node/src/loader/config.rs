//! What the loader is asked to do: `kiln.*` words of the kernel command line, written by kiln serve's
//! two-stage script from the bundle's manifest and the node's settings.
//!
//! `kiln.image=URL kiln.sha256=HEX kiln.size=BYTES kiln.mac=MAC` are required; `kiln.events=URL`,
//! `kiln.ip=A.B.C.D/P`, `kiln.gw=A.B.C.D`, `kiln.vlan=N`, `kiln.disk=/dev/X`, `kiln.disk_wipe`,
//! `kiln.init=PATH` (default `/sbin/init`) and `kiln.attempts=N` (whole downloads before giving up, default 3)
//! are optional.

use std::net::Ipv4Addr;

use super::Result;

/// An `http://A.B.C.D[:PORT]/PATH` URL: the loader looks no names up (there is no resolver before the image).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Url {
    pub host: Ipv4Addr,
    pub port: u16,
    pub path: String,
}

impl Url {
    pub fn parse(s: &str) -> Result<Url> {
        let rest = s.strip_prefix("http://").ok_or_else(|| format!("{s:?} is not an http:// URL"))?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) => (h, p.parse().map_err(|_| format!("{s:?}: bad port {p:?}"))?),
            None => (authority, 80),
        };
        let host = host.parse().map_err(|_| format!("{s:?}: the server must be named by its IPv4 address"))?;
        Ok(Url { host, port, path: path.to_string() })
    }
}

impl std::fmt::Display for Url {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.port == 80 {
            write!(f, "http://{}{}", self.host, self.path)
        } else {
            write!(f, "http://{}:{}{}", self.host, self.port, self.path)
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub image: Url,
    /// Lowercase hex.
    pub sha256: String,
    pub size: u64,
    /// Lowercase, colon-separated: as `/sys/class/net/*/address` spells it.
    pub mac: String,
    pub events: Option<Url>,
    pub ip: Option<(Ipv4Addr, u8)>,
    pub gateway: Option<Ipv4Addr>,
    pub vlan: Option<u16>,
    pub disk: Option<String>,
    pub disk_wipe: bool,
    pub init: String,
    pub attempts: u32,
}

impl Config {
    pub fn parse(cmdline: &str) -> Result<Config> {
        let (mut image, mut sha256, mut size, mut mac) = (None, None, None, None);
        let mut c = Config {
            image: Url { host: Ipv4Addr::UNSPECIFIED, port: 0, path: String::new() },
            sha256: String::new(),
            size: 0,
            mac: String::new(),
            events: None,
            ip: None,
            gateway: None,
            vlan: None,
            disk: None,
            disk_wipe: false,
            init: "/sbin/init".into(),
            attempts: 3,
        };
        for word in cmdline.split_whitespace() {
            let (k, v) = word.split_once('=').unwrap_or((word, ""));
            let bad = |what: &str| format!("kernel command line: {word:?} is not {what}");
            match k {
                "kiln.image" => image = Some(Url::parse(v)?),
                "kiln.sha256" => {
                    if v.len() != 64 || !v.bytes().all(|b| b.is_ascii_hexdigit()) {
                        return Err(bad("a sha256 (64 hex digits)"));
                    }
                    sha256 = Some(v.to_ascii_lowercase());
                }
                "kiln.size" => size = Some(v.parse().map_err(|_| bad("a size in bytes"))?),
                "kiln.mac" => {
                    let m = v.to_ascii_lowercase().replace('-', ":");
                    if m.len() != 17 || m.split(':').count() != 6 {
                        return Err(bad("a MAC address"));
                    }
                    mac = Some(m);
                }
                "kiln.events" => c.events = Some(Url::parse(v)?),
                "kiln.ip" => {
                    let (a, p) = v.split_once('/').unwrap_or((v, "24"));
                    let a = a.parse().map_err(|_| bad("an IPv4 address/prefix"))?;
                    let p: u8 = p.parse().map_err(|_| bad("an IPv4 address/prefix"))?;
                    if p > 32 {
                        return Err(bad("an IPv4 address/prefix"));
                    }
                    c.ip = Some((a, p));
                }
                "kiln.gw" => c.gateway = Some(v.parse().map_err(|_| bad("an IPv4 address"))?),
                "kiln.vlan" => {
                    let id: u16 = v.parse().map_err(|_| bad("a VLAN id"))?;
                    if !(1..=4094).contains(&id) {
                        return Err(bad("a VLAN id (1-4094)"));
                    }
                    c.vlan = Some(id);
                }
                "kiln.disk" => {
                    if !v.starts_with("/dev/") || v.len() <= 5 || v[5..].contains('/') {
                        return Err(bad("a disk under /dev"));
                    }
                    c.disk = Some(v.to_string());
                }
                "kiln.disk_wipe" => c.disk_wipe = v.is_empty() || v == "1" || v == "true",
                "kiln.init" => c.init = v.to_string(),
                "kiln.attempts" => {
                    c.attempts = v.parse::<u32>().map_err(|_| bad("a number of attempts"))?.clamp(1, 10);
                }
                _ => {}
            }
        }
        let missing = |k: &str| format!("the kernel command line has no {k}= (kiln serve's two-stage script sets it)");
        c.image = image.ok_or_else(|| missing("kiln.image"))?;
        c.sha256 = sha256.ok_or_else(|| missing("kiln.sha256"))?;
        c.size = size.ok_or_else(|| missing("kiln.size"))?;
        c.mac = mac.ok_or_else(|| missing("kiln.mac"))?;
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scripts_command_line_parses() {
        let hex = "ab".repeat(32);
        let line = format!(
            "initrd=initramfs console=ttyS0 kiln.image=http://10.4.0.1:8080/blob/sha256/{hex} kiln.sha256={hex} \
             kiln.size=123 kiln.mac=52:54:00:AA:BB:42 kiln.events=http://10.4.0.1/loader/52:54:00:aa:bb:42 \
             kiln.ip=10.4.0.42/24 kiln.gw=10.4.0.254 kiln.vlan=100 kiln.disk=/dev/vda kiln.disk_wipe"
        );
        let c = Config::parse(&line).unwrap();
        assert_eq!(c.image.port, 8080);
        assert_eq!(c.image.to_string(), format!("http://10.4.0.1:8080/blob/sha256/{hex}"));
        assert_eq!(c.mac, "52:54:00:aa:bb:42");
        assert_eq!(c.ip, Some(("10.4.0.42".parse().unwrap(), 24)));
        assert_eq!((c.vlan, c.disk.as_deref(), c.disk_wipe), (Some(100), Some("/dev/vda"), true));
        assert_eq!((c.init.as_str(), c.attempts), ("/sbin/init", 3));
    }

    #[test]
    fn bad_words_are_named() {
        let err = Config::parse("kiln.image=http://server/x").unwrap_err();
        assert!(err.contains("IPv4 address"), "{err}");
        let err = Config::parse("kiln.image=http://1.2.3.4/x kiln.sha256=zz").unwrap_err();
        assert!(err.contains("kiln.sha256=zz"), "{err}");
        let err = Config::parse("quiet").unwrap_err();
        assert!(err.contains("kiln.image="), "{err}");
        let err = Config::parse("kiln.disk=/dev/disk/by-id/x").unwrap_err();
        assert!(err.contains("disk under /dev"), "{err}");
    }
}
