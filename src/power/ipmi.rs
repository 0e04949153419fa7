//! IPMI 2.0 through `ipmitool -I lanplus`, the tool administrators already trust: chassis power status and
//! control, the one-time boot device (`chassis bootdev pxe`: the next boot only, IPMI's default), and
//! Serial-over-LAN (`sol activate`).
//!
//! The password reaches ipmitool as a file (`-f`), never as `-P` (the process list) nor `IPMI_PASSWORD` (kiln's
//! error messages show a command's environment). Every call runs through [`crate::util::run_command`], so a
//! failure carries ipmitool's stderr; `-v` makes that stderr say why a session failed (a bad password and an
//! unreachable BMC read alike without it). Timeouts are ipmitool's own: `-N` seconds per try, `-R 1` retry.
//! The cipher suite is the BMC's `cipher_suite` (`-C`) or ipmitool's choice. Left out: IPMI 1.5 (`-I lan`),
//! privilege levels (ipmitool's default), bridging.

use std::process::{Command, ExitStatus};
use std::time::Duration;

use anyhow::{anyhow, Context};

use super::credentials::{Credentials, IpmiPasswordFile, PASSWORD_ENV};
use super::{Done, ErrorKind, Failure, PowerAction, PowerState};
use crate::util::{run_command, which};

/// The standard RMCP port.
pub const DEFAULT_PORT: u16 = 623;

/// ipmitool pointed at one BMC.
pub struct Ipmitool {
    host: String,
    port: u16,
    user: String,
    password_file: IpmiPasswordFile,
    cipher_suite: Option<u8>,
    timeout: Duration,
}

impl Ipmitool {
    pub fn new(
        host: &str,
        port: Option<u16>,
        cipher_suite: Option<u8>,
        creds: &Credentials,
        timeout: Duration,
    ) -> Result<Self, Failure> {
        if which("ipmitool", None).is_none() {
            return Err(Failure::new(
                ErrorKind::Config,
                anyhow!("ipmitool is not installed (Debian: apt-get install ipmitool)"),
            ));
        }
        let password_file = IpmiPasswordFile::new(creds).map_err(|e| Failure::new(ErrorKind::Config, e))?;
        Ok(Ipmitool {
            host: host.to_string(),
            port: port.unwrap_or(DEFAULT_PORT),
            user: creds.user.clone(),
            password_file,
            cipher_suite,
            timeout,
        })
    }

    fn command(&self, verbose: bool) -> Command {
        let mut cmd = Command::new("ipmitool");
        // ipmitool needs none of kiln's environment's secrets.
        cmd.env_remove(PASSWORD_ENV);
        if verbose {
            cmd.arg("-v");
        }
        // ipmitool waits -N seconds per message and retries -R times; a dead BMC costs about 2 x N x R.
        let per_try = (self.timeout.as_secs() / 2).max(1);
        cmd.args(["-I", "lanplus", "-H", &self.host, "-p", &self.port.to_string(), "-U", &self.user])
            .arg("-f")
            .arg(self.password_file.path())
            .args(["-N", &per_try.to_string(), "-R", "1"]);
        if let Some(c) = self.cipher_suite {
            cmd.args(["-C", &c.to_string()]);
        }
        cmd
    }

    fn run(&self, args: &[&str]) -> Result<String, Failure> {
        let out = run_command(self.command(true).args(args)).map_err(|e| self.classify(args, e))?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Names why ipmitool failed, keeping its command and the stderr lines that matter.
    fn classify(&self, args: &[&str], e: anyhow::Error) -> Failure {
        let text = format!("{e:#}");
        let lower = text.to_lowercase();
        let (kind, why) = if lower.contains("rakp 2 hmac is invalid")
            || lower.contains("unauthorized name")
            || lower.contains("invalid user name")
            || lower.contains("insufficient privilege")
        {
            (ErrorKind::Auth, "authentication failed: check the user and password".to_string())
        } else if lower.contains("get auth capabilities error")
            || lower.contains("no response")
            || lower.contains("unable to establish")
        {
            (
                ErrorKind::Unreachable,
                format!("no answer within ipmitool's timeout ({:?} per try, 1 retry)", self.timeout / 2),
            )
        } else if lower.contains("invalid command") || lower.contains("not supported") {
            (ErrorKind::Unsupported, "the BMC does not support this command".to_string())
        } else {
            (ErrorKind::Bmc, "ipmitool failed".to_string())
        };
        // run_command's message is the command line, then stderr's tail; -v adds lines that explain nothing.
        let noise = ["Loading IANA PEN Registry", "Running Get VSO", "Discovered IPMB", "Unable to Get Channel Cipher"];
        let kept: Vec<&str> =
            text.lines().map(str::trim).filter(|l| !l.is_empty() && !noise.iter().any(|n| l.contains(n))).collect();
        Failure::new(
            kind,
            anyhow!("ipmitool {} on {}:{}: {why}: {}", args.join(" "), self.host, self.port, kept.join("; ")),
        )
    }

    pub fn status(&self) -> Result<PowerState, Failure> {
        let out = self.run(&["chassis", "power", "status"])?;
        match out.trim().strip_prefix("Chassis Power is ") {
            Some("on") => Ok(PowerState::On),
            Some("off") => Ok(PowerState::Off),
            _ => Err(Failure::new(ErrorKind::Bmc, anyhow!("ipmitool chassis power status said {:?}", out.trim()))),
        }
    }

    /// Does `action` (after setting the next boot to PXE when `pxe`), skipping what is already so.
    pub fn act(&self, action: PowerAction, pxe: bool) -> Result<Done, Failure> {
        let was = self.status()?;
        let mut done = Done { power: was.clone(), did: None, next_boot: None };
        let off = was == PowerState::Off;
        let control = match (action, off) {
            (PowerAction::Status, _) => return Ok(done),
            (PowerAction::On, false) | (PowerAction::Off | PowerAction::Soft, true) => None,
            (PowerAction::On | PowerAction::Cycle | PowerAction::Reset, true) => Some("on"),
            (PowerAction::Off, false) => Some("off"),
            (PowerAction::Soft, false) => Some("soft"),
            (PowerAction::Reset, false) => Some("reset"),
            (PowerAction::Cycle, false) => Some("cycle"),
        };
        if pxe {
            self.run(&["chassis", "bootdev", "pxe"]).map_err(|f| f.context("setting the next boot to PXE"))?;
            done.next_boot = Some("pxe once".into());
        }
        match control {
            None => done.did = Some(format!("nothing: already {was}")),
            Some(c) => {
                self.run(&["chassis", "power", c])?;
                done.did = Some(format!("chassis power {c}"));
            }
        }
        Ok(done)
    }

    /// The Serial-over-LAN console on this terminal until ipmitool ends (`~.`). Interactive, so not through
    /// run_command: ipmitool's stderr goes straight to the user.
    pub fn console(&self) -> anyhow::Result<ExitStatus> {
        let mut cmd = self.command(false);
        cmd.args(["sol", "activate"]);
        cmd.status().with_context(|| format!("starting {cmd:?}"))
    }

    pub fn endpoint(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}
