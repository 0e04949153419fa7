//! A BMC emulator for the tests that drive node power: OpenIPMI's `ipmi_sim` on loopback, driven by `ipmitool`.

use std::net::UdpSocket;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const NO_IPMI: &str = "ipmi_sim or ipmitool missing (scripts/setup.sh installs openipmi and ipmitool)";

pub fn have_ipmi() -> bool {
    super::have("ipmi_sim") && super::have("ipmitool")
}

pub fn free_udp_port(ip: &str) -> u16 {
    UdpSocket::bind((ip, 0)).unwrap().local_addr().unwrap().port()
}

/// Writes `text` to `path`, readable by its owner only (password files).
pub fn write_private(path: &Path, text: &str) {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// One ipmi_sim process: an IPMI 2.0 BMC on UDP whose chassis control is a script keeping power and boot device
/// in files, and whose SOL is a TCP serial port the test may serve.
pub struct IpmiBmc {
    child: Child,
    dir: tempfile::TempDir,
    pub addr: String,
    pub port: u16,
}

impl IpmiBmc {
    pub fn start(ip: &str, port: u16, password: &str, sol_port: Option<u16>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let script = d.join("chassis.sh");
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\n# ipmi_sim chassis control: $1 = MC address, then get PARM... or set PARM VALUE...\n\
                 dir='{dir}'\nshift\nop=$1\nshift\ncase $op in\n\
                 get) for p in \"$@\"; do case $p in power) echo \"power:$(cat $dir/power 2>/dev/null || echo 0)\";; \
                 boot) echo \"boot:$(cat $dir/boot 2>/dev/null || echo default)\";; esac; done;;\n\
                 set) while [ $# -gt 1 ]; do echo \"$2\" > \"$dir/$1\"; echo \"$1 $2\" >> \"$dir/calls\"; shift 2; done;;\n\
                 esac\n",
                dir = d.display()
            ),
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        let sol = sol_port.map(|p| format!("sol \"tcp:127.0.0.1:{p}\" 115200\n")).unwrap_or_default();
        std::fs::write(
            d.join("lan.conf"),
            format!(
                "name \"kiln-test\"\nset_working_mc 0x20\nstartlan 1\n  addr {ip} {port}\n  priv_limit admin\n  \
                 allowed_auths_callback none md2 md5 straight\n  allowed_auths_user none md2 md5 straight\n  \
                 allowed_auths_operator none md2 md5 straight\n  allowed_auths_admin none md2 md5 straight\n  \
                 guid a123456789abcdefa123456789abcdef\nendlan\n\
                 user 2 true \"admin\" \"{password}\" admin 10 none md2 md5 straight\n\
                 chassis_control \"{script} 0x20\"\n{sol}",
                script = script.display()
            ),
        )
        .unwrap();
        std::fs::write(
            d.join("sim.emu"),
            "mc_setbmc 0x20\nmc_add 0x20 0 no-device-sdrs 0x23 9 8 0x9f 0x1291 0xf02\nmc_enable 0x20\n",
        )
        .unwrap();
        std::fs::create_dir(d.join("state")).unwrap();
        write_private(&d.join("pass"), password);
        let log = std::fs::File::create(d.join("sim.log")).unwrap();
        let child = Command::new("ipmi_sim")
            .arg("-c")
            .arg(d.join("lan.conf"))
            .arg("-f")
            .arg(d.join("sim.emu"))
            .arg("-s")
            .arg(d.join("state"))
            .arg("-n")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("ipmi_sim");
        let mut bmc = IpmiBmc { child, dir, addr: ip.to_string(), port };
        let start = Instant::now();
        while !bmc.ipmitool(&["chassis", "power", "status"]).status.success() {
            if let Ok(Some(status)) = bmc.child.try_wait() {
                panic!("ipmi_sim exited ({status}): {}", bmc.file("sim.log"));
            }
            assert!(start.elapsed() < Duration::from_secs(20), "ipmi_sim not up: {}", bmc.file("sim.log"));
            std::thread::sleep(Duration::from_millis(100));
        }
        bmc
    }

    /// ipmitool with the right password (a client independent of kiln).
    pub fn ipmitool(&self, args: &[&str]) -> Output {
        Command::new("ipmitool")
            .args(["-I", "lanplus", "-C", "3", "-N", "1", "-R", "1", "-H", &self.addr, "-p", &self.port.to_string()])
            .args(["-U", "admin", "-f"])
            .arg(self.dir.path().join("pass"))
            .args(args)
            .output()
            .unwrap()
    }

    /// A state file the chassis script keeps (`power`, `boot`, `calls`).
    pub fn file(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default().trim().to_string()
    }
}

impl Drop for IpmiBmc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
