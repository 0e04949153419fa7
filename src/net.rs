//! Network values with one parser each, used by the recipe, the DHCP, TFTP and HTTP servers, the state
//! database and the command line: [`Mac`], [`Ipv4Cidr`] (an address with an optional prefix), [`Subnet`] and
//! [`Pool`]. Each reads from and writes to the text people type, so a MAC is spelled the same way everywhere.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A MAC address. Parsed from `52:54:00:aa:bb:42`, `52-54-00-AA-BB-42`, `5254.00aa.bb42` or `525400aabb42`
/// (any case); shown lowercase with colons.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Mac(pub [u8; 6]);

impl Mac {
    /// The six bytes.
    pub fn octets(self) -> [u8; 6] {
        self.0
    }
}

impl FromStr for Mac {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        let bad = || anyhow::anyhow!("{s:?} is not a MAC address (write it as 52:54:00:aa:bb:42)");
        // The spellings in use: six pairs joined by ':' or '-', three groups of four joined by '.', or twelve
        // digits. Separators must sit between whole groups, so a typo never parses as some other address.
        let groups: Vec<&str> = if s.contains(':') {
            s.split(':').collect()
        } else if s.contains('-') {
            s.split('-').collect()
        } else if s.contains('.') {
            s.split('.').collect()
        } else {
            vec![s]
        };
        let width = match groups.len() {
            6 => 2,
            3 => 4,
            1 => 12,
            _ => return Err(bad()),
        };
        if (width == 4) != s.contains('.') || groups.iter().any(|g| g.len() != width) {
            return Err(bad());
        }
        let hex: String = groups.concat();
        if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad());
        }
        let mut out = [0u8; 6];
        hex::decode_to_slice(&hex, &mut out).map_err(|_| bad())?;
        Ok(Mac(out))
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

impl fmt::Debug for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl From<[u8; 6]> for Mac {
    fn from(octets: [u8; 6]) -> Self {
        Mac(octets)
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

/// An IPv4 network: an address and a prefix length, e.g. `10.4.0.1/24`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subnet {
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

impl Subnet {
    pub fn new(addr: Ipv4Addr, prefix: u8) -> Result<Subnet> {
        if prefix > 32 {
            bail!("invalid prefix length /{prefix}: at most 32");
        }
        Ok(Subnet { addr, prefix })
    }

    pub fn mask(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.mask_bits())
    }

    pub fn network(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) & self.mask_bits())
    }

    pub fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) | !self.mask_bits())
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask_bits() == u32::from(self.addr) & self.mask_bits()
    }

    fn mask_bits(&self) -> u32 {
        u32::MAX.checked_shl(32 - u32::from(self.prefix.min(32))).unwrap_or(0)
    }
}

impl FromStr for Subnet {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        let (addr, prefix) =
            s.split_once('/').with_context(|| format!("invalid address {s:?}: expected 10.4.0.1/24"))?;
        let addr = addr.parse().with_context(|| format!("invalid address {s:?}: expected 10.4.0.1/24"))?;
        let prefix = prefix.parse().with_context(|| format!("invalid prefix length in {s:?}: expected 0 to 32"))?;
        Subnet::new(addr, prefix)
    }
}

/// An inclusive range of addresses handed to machines without a reservation, e.g. `10.4.0.100-10.4.0.199`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pool {
    pub start: Ipv4Addr,
    pub end: Ipv4Addr,
}

impl Pool {
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        (self.start..=self.end).contains(&ip)
    }

    /// Every address of the pool, in order.
    pub fn addresses(&self) -> impl Iterator<Item = Ipv4Addr> {
        (u32::from(self.start)..=u32::from(self.end)).map(Ipv4Addr::from)
    }
}

impl FromStr for Pool {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        let bad = || format!("invalid pool {s:?}: expected FIRST-LAST, e.g. 10.4.0.100-10.4.0.199");
        let (start, end) = s.split_once('-').with_context(bad)?;
        let start: Ipv4Addr = start.trim().parse().with_context(bad)?;
        let end: Ipv4Addr = end.trim().parse().with_context(bad)?;
        if start > end {
            bail!("invalid pool {s:?}: the first address is after the last");
        }
        Ok(Pool { start, end })
    }
}

impl fmt::Display for Pool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.start, self.end)
    }
}

/// Implements serde for types that read and write as their text (`FromStr` + `Display`), so a bad value in
/// kiln.toml is reported with its line and column like any other recipe error.
#[macro_export]
macro_rules! serde_as_text {
    ($($t:ty),*) => {$(
        impl<'de> ::serde::Deserialize<'de> for $t {
            fn deserialize<D: ::serde::Deserializer<'de>>(d: D) -> ::std::result::Result<Self, D::Error> {
                let s = <String as ::serde::Deserialize>::deserialize(d)?;
                s.parse().map_err(|e: ::anyhow::Error| ::serde::de::Error::custom(format!("{e:#}")))
            }
        }
        impl ::serde::Serialize for $t {
            fn serialize<S: ::serde::Serializer>(&self, s: S) -> ::std::result::Result<S::Ok, S::Error> {
                s.serialize_str(&self.to_string())
            }
        }
    )*};
}

serde_as_text!(Mac, Ipv4Cidr, Pool);

impl Serialize for Subnet {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{}/{}", self.addr, self.prefix))
    }
}

impl<'de> Deserialize<'de> for Subnet {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(|e: anyhow::Error| serde::de::Error::custom(format!("{e:#}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_parse_in_every_common_spelling() {
        let m: Mac = "52:54:00:AA:bb:42".parse().unwrap();
        assert_eq!(m.to_string(), "52:54:00:aa:bb:42");
        for spelling in ["52-54-00-aa-bb-42", "525400aabb42", "525400AABB42", "5254.00aa.bb42", "52:54:00:aa:bb:42"] {
            assert_eq!(spelling.parse::<Mac>().unwrap(), m, "{spelling}");
        }
        for bad in [
            "52:54:00:aa:bb",
            "52:54:00:aa:bb:zz",
            "52:54:00:aa:bb:42:01",
            "525:400:aa:bb:42:0",
            "52:54-00:aa:bb:42",
            "5254.00aa.bb4",
            "525400aabb4",
            "52.54.00.aa.bb.42",
            "",
        ] {
            assert!(bad.parse::<Mac>().is_err(), "{bad:?} parsed");
        }
        let json = serde_json::to_string(&m).unwrap();
        assert_eq!(json, "\"52:54:00:aa:bb:42\"");
        assert_eq!(serde_json::from_str::<Mac>("\"525400aabb42\"").unwrap(), m);
    }

    #[test]
    fn addresses_and_ranges_parse_with_clear_errors() {
        assert_eq!("10.4.0.1/24".parse::<Ipv4Cidr>().unwrap().prefix, Some(24));
        assert!("10.4.0.1/33".parse::<Ipv4Cidr>().is_err());
        assert!("10.4.0.300".parse::<Ipv4Cidr>().is_err());
        assert!("10.0.0.9-10.0.0.1".parse::<Pool>().is_err());
        let pool: Pool = "10.0.0.1-10.0.0.3".parse().unwrap();
        assert_eq!(pool.addresses().count(), 3);
        assert_eq!(pool.to_string(), "10.0.0.1-10.0.0.3");
    }

    #[test]
    fn subnet_and_pool_parse() {
        let s: Subnet = "10.4.0.1/24".parse().unwrap();
        assert_eq!(
            (s.mask(), s.network(), s.broadcast()),
            ([255, 255, 255, 0].into(), [10, 4, 0, 0].into(), [10, 4, 0, 255].into())
        );
        assert!(s.contains([10, 4, 0, 200].into()) && !s.contains([10, 4, 1, 1].into()));
        let all: Subnet = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains([1, 2, 3, 4].into()));
        assert!("10.4.0.1/33".parse::<Subnet>().is_err());
        assert!("10.4.0.1".parse::<Subnet>().is_err());
        assert!("10.4.0.9-10.4.0.1".parse::<Pool>().is_err());
    }
}
