//! A small Redfish client (DMTF DSP0266) for what `kiln power` needs: the computer system's `PowerState`, the
//! `ComputerSystem.Reset` action, a one-time boot override (`Boot.BootSourceOverrideTarget = Pxe`,
//! `BootSourceOverrideEnabled = Once`), and what the manager says about its serial console.
//!
//! HTTP Basic authentication on every request (no sessions: a power command is two to four requests). TLS is
//! verified against the public roots, or the BMC's `ca_file`; `insecure` turns verification off. Proxy variables
//! are ignored (BMCs sit on management networks) and redirects are reported, not followed, so the credentials go
//! only to the address written in kiln.toml. Every request has the run's timeout. Left out: sessions
//! (`X-Auth-Token`), `@Redfish.ActionInfo` lookups, task monitors, chassis-level power.

use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use serde_json::{json, Value};

use super::credentials::Credentials;
use super::{Done, ErrorKind, Failure, PowerAction, PowerState};
use crate::recipe::nodes::{Bmc, BmcScheme};

/// A connection to one BMC's Redfish service.
pub struct Redfish {
    agent: ureq::Agent,
    /// `https://host[:port]`.
    base: String,
    authorization: String,
    /// The system's path when the address names one.
    system: Option<String>,
    timeout: Duration,
}

/// The computer system as read: its path, its JSON and its ETag.
struct System {
    path: String,
    json: Value,
    etag: Option<String>,
}

/// What a manager says about its serial console.
#[derive(Debug, Default)]
pub struct ConsoleOffer {
    /// Connection types listed (`IPMI`, `SSH`, `Telnet`, `Oem`).
    pub listed: Vec<String>,
    /// `Some(false)` when the manager says IPMI (SOL or the protocol) is off.
    pub ipmi_enabled: Option<bool>,
    pub ipmi_port: Option<u16>,
    pub ssh_port: Option<u16>,
}

impl Redfish {
    pub fn connect(bmc: &Bmc, creds: &Credentials, timeout: Duration) -> Result<Self, Failure> {
        let scheme = match bmc.address.scheme {
            Some(BmcScheme::Http) => "http",
            Some(BmcScheme::Https) | None => "https",
        };
        let mut tls = ureq::tls::TlsConfig::builder();
        if bmc.insecure {
            tls = tls.disable_verification(true);
        }
        if let Some(ca) = &bmc.ca_file {
            tls = tls.root_certs(read_ca(ca).map_err(|e| Failure::new(ErrorKind::Config, e))?);
        }
        let config = ureq::Agent::config_builder()
            .timeout_global(Some(timeout))
            .http_status_as_error(false)
            .max_redirects(0)
            .proxy(None)
            .user_agent(format!("kiln/{}", env!("CARGO_PKG_VERSION")))
            .tls_config(tls.build())
            .build();
        let token = base64(format!("{}:{}", creds.user, creds.password.expose()).as_bytes());
        Ok(Redfish {
            agent: config.into(),
            base: format!("{scheme}://{}", bmc.address.authority()),
            authorization: format!("Basic {token}"),
            system: (!bmc.address.path.is_empty()).then(|| bmc.address.path.clone()),
            timeout,
        })
    }

    /// The power state.
    pub fn status(&self) -> Result<PowerState, Failure> {
        Ok(power_state(&self.system()?.json))
    }

    /// Does `action` (after setting a one-time PXE boot when `pxe`), skipping what is already so.
    pub fn act(&self, action: PowerAction, pxe: bool) -> Result<Done, Failure> {
        let sys = self.system()?;
        let was = power_state(&sys.json);
        let mut done = Done { power: was.clone(), did: None, next_boot: None };
        let reset = match (action, &was) {
            (PowerAction::Status, _) => return Ok(done),
            (PowerAction::On, PowerState::On) => None,
            (PowerAction::Off | PowerAction::Soft, PowerState::Off) => None,
            (PowerAction::On | PowerAction::Cycle | PowerAction::Reset, PowerState::Off) => Some("On"),
            (PowerAction::On, _) => Some("On"),
            (PowerAction::Off, _) => Some("ForceOff"),
            (PowerAction::Soft, _) => Some("GracefulShutdown"),
            (PowerAction::Reset, _) => Some("ForceRestart"),
            (PowerAction::Cycle, _) => Some("PowerCycle"),
        };
        if pxe {
            self.boot_pxe_once(&sys)?;
            done.next_boot = Some("pxe once".into());
        }
        let Some(mut reset) = reset else {
            done.did = Some(format!("nothing: already {was}"));
            return Ok(done);
        };
        let action_json = &sys.json["Actions"]["#ComputerSystem.Reset"];
        let allowed: Option<Vec<&str>> = action_json["ResetType@Redfish.AllowableValues"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_str).collect());
        if let Some(allowed) = &allowed {
            // Not every BMC has PowerCycle or On; these are what the others mean by them.
            let fallback = match reset {
                "PowerCycle" => Some("ForceRestart"),
                "On" => Some("ForceOn"),
                _ => None,
            };
            if !allowed.contains(&reset) {
                match fallback.filter(|f| allowed.contains(f)) {
                    Some(f) => reset = f,
                    None => {
                        return Err(Failure::new(
                            ErrorKind::Unsupported,
                            anyhow!("the BMC offers no {reset} reset (it offers {})", allowed.join(", ")),
                        ))
                    }
                }
            }
        }
        let target = action_json["target"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| format!("{}/Actions/ComputerSystem.Reset", sys.path));
        self.send("POST", &target, &json!({ "ResetType": reset }), None)?;
        done.did = Some(reset.to_string());
        Ok(done)
    }

    /// What the system's manager offers as a serial console (`SerialConsole`, `NetworkProtocol`); missing
    /// properties leave fields unset.
    pub fn console_offer(&self) -> Result<ConsoleOffer, Failure> {
        let sys = self.system()?;
        let manager_path = match sys.json["Links"]["ManagedBy"][0]["@odata.id"].as_str() {
            Some(p) => p.to_string(),
            None => self.only_member("/redfish/v1/Managers", "managers")?,
        };
        let (manager, _) = self.get(&manager_path)?;
        let mut offer = ConsoleOffer::default();
        let serial = &manager["SerialConsole"];
        for t in serial["ConnectTypesSupported"].as_array().into_iter().flatten().filter_map(Value::as_str) {
            offer.listed.push(t.to_string());
        }
        for proto in ["IPMI", "SSH", "Telnet"] {
            if serial[proto].is_object() && !offer.listed.iter().any(|l| l == proto) {
                offer.listed.push(proto.to_string());
            }
        }
        if serial["IPMI"]["ServiceEnabled"] == Value::Bool(false) {
            offer.ipmi_enabled = Some(false);
        }
        if let Some(np) = manager["NetworkProtocol"]["@odata.id"].as_str() {
            // Optional detail: a manager without a readable NetworkProtocol still has a console.
            if let Ok((np, _)) = self.get(np) {
                if np["IPMI"]["ProtocolEnabled"] == Value::Bool(false) {
                    offer.ipmi_enabled = Some(false);
                } else if np["IPMI"]["ProtocolEnabled"] == Value::Bool(true) && offer.ipmi_enabled.is_none() {
                    offer.ipmi_enabled = Some(true);
                }
                offer.ipmi_port = np["IPMI"]["Port"].as_u64().and_then(|p| u16::try_from(p).ok());
                if np["SSH"]["ProtocolEnabled"] == Value::Bool(true) {
                    offer.ssh_port = np["SSH"]["Port"].as_u64().and_then(|p| u16::try_from(p).ok()).or(Some(22));
                }
            }
        }
        Ok(offer)
    }

    fn boot_pxe_once(&self, sys: &System) -> Result<(), Failure> {
        let boot = &sys.json["Boot"];
        if let Some(targets) = boot["BootSourceOverrideTarget@Redfish.AllowableValues"].as_array() {
            if !targets.iter().any(|t| t == "Pxe") {
                return Err(Failure::new(
                    ErrorKind::Unsupported,
                    anyhow!("the BMC offers no PXE boot override (it offers {})", join_values(targets)),
                ));
            }
        }
        let body = json!({ "Boot": { "BootSourceOverrideTarget": "Pxe", "BootSourceOverrideEnabled": "Once" } });
        tracing::debug!("PATCH {}{}: {body}", self.base, sys.path);
        self.send("PATCH", &sys.path, &body, sys.etag.as_deref()).map_err(|f| f.context("setting the next boot to PXE"))
    }

    fn system(&self) -> Result<System, Failure> {
        let path = match &self.system {
            Some(p) => p.clone(),
            None => self.only_member("/redfish/v1/Systems", "systems")?,
        };
        let (json, etag) = self.get(&path)?;
        Ok(System { path, json, etag })
    }

    /// The one member of a collection; an error naming them when there are several.
    fn only_member(&self, collection: &str, what: &str) -> Result<String, Failure> {
        let (json, _) = self.get(collection)?;
        let members: Vec<&str> =
            json["Members"].as_array().into_iter().flatten().filter_map(|m| m["@odata.id"].as_str()).collect();
        match members.as_slice() {
            [one] => Ok(one.to_string()),
            [] => Err(Failure::new(ErrorKind::Unsupported, anyhow!("GET {}{collection}: no {what}", self.base))),
            many => Err(Failure::new(
                ErrorKind::Config,
                anyhow!(
                    "GET {}{collection}: {} {what} ({}): put the one this node is in the address, as {}{}",
                    self.base,
                    many.len(),
                    many.iter().take(4).copied().collect::<Vec<_>>().join(", "),
                    self.base,
                    many[0]
                ),
            )),
        }
    }

    fn url(&self, path: &str) -> String {
        if path.starts_with("http://") || path.starts_with("https://") {
            path.to_string()
        } else {
            format!("{}{path}", self.base)
        }
    }

    fn get(&self, path: &str) -> Result<(Value, Option<String>), Failure> {
        let url = self.url(path);
        let resp = self
            .agent
            .get(&url)
            .header("Authorization", &self.authorization)
            .header("Accept", "application/json")
            .call()
            .map_err(|e| self.transport("GET", &url, e))?;
        let etag = resp.headers().get("etag").and_then(|v| v.to_str().ok()).map(str::to_string);
        let body = check("GET", &url, resp)?;
        let json = serde_json::from_str(&body)
            .map_err(|e| Failure::new(ErrorKind::Bmc, anyhow!("GET {url}: the answer is not Redfish JSON ({e})")))?;
        Ok((json, etag))
    }

    fn send(&self, method: &str, path: &str, body: &Value, etag: Option<&str>) -> Result<(), Failure> {
        let url = self.url(path);
        let builder = match method {
            "PATCH" => self.agent.patch(&url),
            _ => self.agent.post(&url),
        };
        let mut builder = builder
            .header("Authorization", &self.authorization)
            .header("Accept", "application/json")
            .header("Content-Type", "application/json");
        if let Some(etag) = etag {
            builder = builder.header("If-Match", etag);
        }
        let resp = builder.send(body.to_string()).map_err(|e| self.transport(method, &url, e))?;
        check(method, &url, resp).map(drop)
    }

    fn transport(&self, method: &str, url: &str, e: ureq::Error) -> Failure {
        use std::io::ErrorKind as Io;
        let (kind, detail) = match &e {
            ureq::Error::Timeout(_) => (ErrorKind::Timeout, format!("no answer within {:?}", self.timeout)),
            ureq::Error::Io(io) if io.kind() == Io::TimedOut || io.kind() == Io::WouldBlock => {
                (ErrorKind::Timeout, format!("no answer within {:?}", self.timeout))
            }
            ureq::Error::Io(io) if io.kind() == Io::ConnectionRefused => {
                (ErrorKind::Unreachable, "connection refused: is the BMC up and its address right?".into())
            }
            ureq::Error::HostNotFound => (ErrorKind::Unreachable, "host not found".into()),
            // rustls reports a refused certificate or a failed handshake through the socket's reads.
            ureq::Error::Io(io) if io.kind() == Io::InvalidData && url.starts_with("https://") => (
                ErrorKind::Tls,
                format!(
                    "TLS: {io}: set the BMC's `ca_file` to the CA that signed its certificate, or `insecure = true` \
                     to accept it unverified"
                ),
            ),
            ureq::Error::Io(io) => (ErrorKind::Unreachable, io.to_string()),
            ureq::Error::ConnectionFailed => (ErrorKind::Unreachable, "connection failed".into()),
            ureq::Error::Tls(_) | ureq::Error::Rustls(_) | ureq::Error::Pem(_) => (
                ErrorKind::Tls,
                format!(
                    "TLS: {e}: set the BMC's `ca_file` to the CA that signed its certificate, or `insecure = true` \
                     to accept it unverified"
                ),
            ),
            _ => (ErrorKind::Bmc, e.to_string()),
        };
        Failure::new(kind, anyhow!("{method} {url}: {detail}"))
    }
}

/// The body of a successful answer; an error naming the status and the BMC's message otherwise.
fn check(method: &str, url: &str, mut resp: ureq::http::Response<ureq::Body>) -> Result<String, Failure> {
    let status = resp.status();
    let body = resp.body_mut().with_config().limit(4 << 20).read_to_string().unwrap_or_default();
    if status.is_success() {
        return Ok(body);
    }
    let code = format!("{} {}", status.as_u16(), status.canonical_reason().unwrap_or(""));
    let said = redfish_message(&body).map(|m| format!(" ({m})")).unwrap_or_default();
    let (kind, detail) = match status.as_u16() {
        401 => (ErrorKind::Auth, format!("{code}: check the user and password")),
        403 => (
            ErrorKind::Auth,
            format!("{code}{said}: the user may not do this (needs the operator or administrator role)"),
        ),
        300..=399 => {
            let to = resp.headers().get("location").and_then(|v| v.to_str().ok()).unwrap_or("?");
            (ErrorKind::Bmc, format!("{code}: redirected to {to}; use that address"))
        }
        404 | 405 | 501 => (ErrorKind::Unsupported, format!("{code}{said}")),
        _ => (ErrorKind::Bmc, format!("{code}{said}")),
    };
    Err(Failure::new(kind, anyhow!("{method} {url}: {detail}")))
}

/// The first message of a Redfish error body.
fn redfish_message(body: &str) -> Option<String> {
    let v: Value = serde_json::from_str(body).ok()?;
    let e = &v["error"];
    let m = e["@Message.ExtendedInfo"][0]["Message"].as_str().or(e["message"].as_str())?;
    Some(m.chars().take(300).collect())
}

fn power_state(system: &Value) -> PowerState {
    match system["PowerState"].as_str() {
        Some("On") => PowerState::On,
        Some("Off") => PowerState::Off,
        Some("PoweringOn") => PowerState::PoweringOn,
        Some("PoweringOff") => PowerState::PoweringOff,
        Some("Paused") => PowerState::Paused,
        Some(other) => PowerState::Other(other.to_string()),
        None => PowerState::Other("not reported".into()),
    }
}

fn join_values(values: &[Value]) -> String {
    values.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(", ")
}

fn read_ca(path: &std::path::Path) -> Result<ureq::tls::RootCerts> {
    let pem = std::fs::read(path).with_context(|| format!("reading the BMC CA file {}", path.display()))?;
    let mut certs = Vec::new();
    for item in ureq::tls::parse_pem(&pem) {
        if let ureq::tls::PemItem::Certificate(c) =
            item.with_context(|| format!("{} is not a PEM file", path.display()))?
        {
            certs.push(c);
        }
    }
    if certs.is_empty() {
        anyhow::bail!("{} holds no PEM certificate", path.display());
    }
    Ok(ureq::tls::RootCerts::new_with_certs(&certs))
}

/// RFC 4648 base64 with padding, for the Basic authorization header.
fn base64(input: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for (i, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(n >> shift & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648() {
        for (i, o) in
            [("", ""), ("f", "Zg=="), ("fo", "Zm8="), ("foo", "Zm9v"), ("foob", "Zm9vYg=="), ("fooba", "Zm9vYmE=")]
        {
            assert_eq!(base64(i.as_bytes()), o);
        }
        assert_eq!(base64(b"admin:s3cret"), "YWRtaW46czNjcmV0");
    }

    #[test]
    fn redfish_errors_give_their_message() {
        let body = r#"{"error":{"code":"Base.1.0.GeneralError","message":"Power state PowerCycle is not supported"}}"#;
        assert_eq!(redfish_message(body).unwrap(), "Power state PowerCycle is not supported");
        let body = r#"{"error":{"message":"x","@Message.ExtendedInfo":[{"Message":"The request failed."}]}}"#;
        assert_eq!(redfish_message(body).unwrap(), "The request failed.");
        assert_eq!(redfish_message("<html>"), None);
    }
}
