//! `kiln-node loader`: the first stage of a two-stage boot. It runs as PID 1 from the bundle's `initramfs`
//! (as `/init`), brings up the network on the interface with the node's MAC, fetches the bundle's `image`
//! from kiln serve with retries and resume, verifies its sha256 while it streams, mounts it read-only under a
//! RAM overlay (or installs it to the node's disk and mounts it from there, or finds it there already), copies
//! the node's overlay in, and switches to the image's own init.
//!
//! What to do comes from the kernel command line ([`config`]); every step is printed on the console and
//! reported to kiln serve (`kiln node events`). A wrong digest or a short image never boots: the loader says
//! which digest was expected and which came, tries again a bounded number of times, then stops for good with a
//! message (PID 1 never exits, so there is no reboot loop).

pub mod config;
pub mod dhcp;
pub mod disk;
pub mod http;
pub mod modules;
pub mod net;
pub mod sys;

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use nix::mount::MsFlags;

use config::Config;
use http::FetchError;

pub type Result<T> = std::result::Result<T, String>;

/// Adds what was being done to an error.
pub trait Context<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T, E: std::fmt::Display> Context<T> for std::result::Result<T, E> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| format!("{}: {e}", what()))
    }
}

const NEWROOT: &str = "/newroot";
/// The squashfs, mounted read-only.
const LOWER: &str = "/kiln/ro";
/// tmpfs for the overlay's upper and work directories.
const RW: &str = "/kiln/rw";
/// tmpfs holding the downloaded image (RAM boots).
const IMAGE_DIR: &str = "/kiln/image";
/// What the loader's own initramfs holds at its top: everything else there came from the node's overlay.
const OWN: &[&str] = &["init", "kiln", "dev", "proc", "sys", "run", "newroot"];

fn say(msg: impl AsRef<str>) {
    println!("kiln-loader: {}", msg.as_ref());
}

/// Step reports for kiln serve, kept until the network is up.
struct Reporter {
    url: Option<config::Url>,
    pending: Vec<(String, String)>,
    online: bool,
    failures: u32,
}

impl Reporter {
    fn step(&mut self, step: &str, detail: impl Into<String>) {
        self.pending.push((step.to_string(), detail.into()));
        if self.online {
            self.flush();
        }
    }

    fn flush(&mut self) {
        let Some(url) = &self.url else {
            self.pending.clear();
            return;
        };
        for (step, detail) in self.pending.drain(..) {
            if self.failures >= 3 {
                break;
            }
            if let Err(e) = http::report(url, &step, &detail) {
                self.failures += 1;
                say(format!("could not report {step} to kiln serve: {e}"));
            }
        }
    }
}

/// `kiln-node loader` (also run as `/init`).
pub fn main(_args: &[String]) -> ExitCode {
    if !sys::is_init() {
        eprintln!(
            "kiln-node loader: runs as PID 1 from a two-stage bundle's initramfs (kiln build with boot = \"two-stage\"); \
             it is not meant to be started by hand"
        );
        return ExitCode::from(2);
    }
    let started = Instant::now();
    if let Err(e) = early_mounts() {
        say(format!("FAILED: {e}"));
        sys::halt();
    }
    let cmdline = fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let mut report = Reporter { url: None, pending: Vec::new(), online: false, failures: 0 };
    let cfg = match Config::parse(&cmdline) {
        Ok(c) => c,
        Err(e) => stop(&mut report, &e),
    };
    report.url = cfg.events.clone();
    say(format!(
        "kiln-node {} for {} (image sha256:{}, {} bytes)",
        env!("CARGO_PKG_VERSION"),
        cfg.mac,
        cfg.sha256,
        cfg.size
    ));
    match run(&cfg, &mut report, started) {
        Ok(()) => unreachable!("run returns only with an error"),
        Err(e) => stop(&mut report, &e),
    }
}

/// Says why the loader stops, reports it, and halts for good.
fn stop(report: &mut Reporter, why: &str) -> ! {
    say(format!("FAILED: {why}"));
    report.step("failed", why);
    say("stopped: this node will not boot until the cause is fixed and it is restarted (no reboot loop)");
    sys::halt()
}

fn early_mounts() -> Result<()> {
    let nosuid = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    sys::mount_fs("proc", "proc", "/proc", nosuid, "")?;
    sys::mount_fs("sysfs", "sysfs", "/sys", nosuid, "")?;
    sys::mount_fs("devtmpfs", "devtmpfs", "/dev", MsFlags::MS_NOSUID, "mode=0755")?;
    sys::mount_fs("tmpfs", "tmpfs", "/run", MsFlags::MS_NOSUID | MsFlags::MS_NODEV, "mode=0755")?;
    // Firmware the drivers ask for is carried at /kiln/firmware (kiln build copies it from the image).
    let _ = fs::write("/sys/module/firmware_class/parameters/path", "/kiln/firmware");
    Ok(())
}

fn run(cfg: &Config, report: &mut Reporter, started: Instant) -> Result<()> {
    let mut mods = modules::Modules::load_index(modules::INDEX)?;
    // The NIC: load drivers for the devices present until the interface with the node's MAC shows up.
    let deadline = Instant::now() + Duration::from_secs(60);
    let nic = loop {
        let loaded = mods.load_for_devices(Duration::from_secs(10));
        if !loaded.is_empty() {
            say(format!("loaded {}", loaded.join(" ")));
        }
        if let Some(n) = net::interface_with_mac(&cfg.mac) {
            break n;
        }
        if Instant::now() > deadline {
            let have: Vec<String> = fs::read_dir("/sys/class/net")
                .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
                .unwrap_or_default();
            return Err(format!(
                "no network interface has MAC {} (interfaces: {}); is its driver among the modules of the image's \
                 kernel?",
                cfg.mac,
                have.join(", ")
            ));
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let mut nl = net::Netlink::open()?;
    nl.link_up("lo")?;
    nl.link_up(&nic)?;
    let iface = match cfg.vlan {
        Some(v) => {
            mods.load("8021q")?;
            let name = nl.add_vlan(&nic, v)?;
            nl.link_up(&name)?;
            name
        }
        None => nic.clone(),
    };
    if !net::wait_carrier(&iface, Duration::from_secs(15)) {
        say(format!("{iface} has no carrier yet; trying anyway"));
    }
    let (ip, prefix, gw) = match cfg.ip {
        Some((ip, prefix)) => (ip, prefix, cfg.gateway),
        None => {
            let lease = dhcp::lease(&iface, &cfg.mac, 6)?;
            say(format!("DHCP: {}/{} from {}", lease.ip, lease.prefix, lease.server));
            (lease.ip, lease.prefix, lease.router.or(cfg.gateway))
        }
    };
    nl.add_address(&iface, ip, prefix)?;
    if let Some(gw) = gw {
        nl.add_default_route(&iface, gw)?;
    }
    say(format!(
        "network up: {iface} {ip}/{prefix} ({:.1}s since the kernel started us)",
        started.elapsed().as_secs_f64()
    ));
    report.online = true;
    report.step("started", format!("kiln-node {} on {iface} {ip}/{prefix}", env!("CARGO_PKG_VERSION")));

    for m in ["loop", "squashfs", "overlay"] {
        mods.load(m)?;
    }
    // Disk drivers for `disk =` (their devices appeared with the NIC's round; load what matched since).
    if cfg.disk.is_some() {
        mods.load_for_devices(Duration::from_secs(5));
    }
    let source = match &cfg.disk {
        Some(d) => from_disk(cfg, d, report)?,
        None => into_ram(cfg, report)?,
    };
    sys::mount_fs("squashfs", &source, LOWER, MsFlags::MS_RDONLY, "")?;
    sys::mount_fs("tmpfs", "tmpfs", RW, MsFlags::empty(), "mode=0755")?;
    for d in [format!("{RW}/upper"), format!("{RW}/work")] {
        fs::create_dir_all(&d).ctx(|| format!("creating {d}"))?;
    }
    sys::mount_fs(
        "overlay",
        "overlay",
        NEWROOT,
        MsFlags::empty(),
        &format!("lowerdir={LOWER},upperdir={RW}/upper,workdir={RW}/work"),
    )?;
    let copied = copy_overlay(Path::new("/"), Path::new(NEWROOT), true)?;
    say(format!(
        "node overlay applied ({copied} entries); starting {} ({:.1}s)",
        cfg.init,
        started.elapsed().as_secs_f64()
    ));
    report.step("switch_root", format!("{} after {:.1}s", cfg.init, started.elapsed().as_secs_f64()));
    Err(sys::switch_root(NEWROOT, &cfg.init))
}

/// Fetches the image into RAM (a tmpfs of its size), verifying it; returns the loop device to mount.
fn into_ram(cfg: &Config, report: &mut Reporter) -> Result<String> {
    // The image's own size and a page: the tmpfs holds nothing else.
    let size = cfg.size.next_multiple_of(4096) + 4096;
    sys::mount_fs(
        "tmpfs",
        "tmpfs",
        IMAGE_DIR,
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        &format!("size={size},mode=0700"),
    )?;
    let path = format!("{IMAGE_DIR}/image");
    download(cfg, report, || {
        let f = fs::File::create(&path).ctx(|| format!("creating {path}"))?;
        Ok((f, 0))
    })?;
    sys::attach_loop(&path)
}

/// The image from the node's disk: reused when the disk holds it, else installed there (the disk must be blank,
/// kiln's, or `disk_wipe` allowed). Returns the partition to mount.
fn from_disk(cfg: &Config, path: &str, report: &mut Reporter) -> Result<String> {
    let name = path.trim_start_matches("/dev/").to_string();
    sys::wait_for(path, Duration::from_secs(30)).map_err(|e| format!("the disk {path}: {e}"))?;
    let (size, lba) = sys::disk_geometry(&name)?;
    let disk = disk::Disk::open(path, size, lba)?;
    let state = disk.state()?;
    match &state {
        disk::State::Kiln { image: Some((sha, len)) } if *sha == cfg.sha256 && *len == cfg.size => {
            say(format!("{path} already holds image sha256:{sha}: nothing to fetch"));
            report.step("reused", format!("image sha256:{sha} ({len} bytes) from {path}"));
        }
        disk::State::Foreign(what) if !cfg.disk_wipe => {
            let msg = format!(
                "{path} holds {what}, not written by kiln: refusing to overwrite it (set disk_wipe = true on this node \
                 or its profile to let kiln replace it)"
            );
            report.step("refused", &msg);
            return Err(msg);
        }
        other => {
            if cfg.size > disk.capacity() {
                return Err(format!(
                    "{path} is too small: the image is {} bytes, the disk holds {}",
                    cfg.size,
                    disk.capacity()
                ));
            }
            match other {
                disk::State::Foreign(what) => say(format!("{path} holds {what}: wiping it (disk_wipe)")),
                disk::State::Blank => say(format!("{path} is blank: installing the image")),
                _ => say(format!("{path} holds another image: replacing it")),
            }
            // The stamp goes first: a disk whose install is cut short holds no image kiln would reuse.
            disk.stamp(None)?;
            if !matches!(state, disk::State::Kiln { .. }) {
                // GUIDs from the MAC: the same node gets the same layout every time.
                let mut disk_guid = *b"kiln-disk-\0\0\0\0\0\0";
                let mut part_guid = *b"kiln-part-\0\0\0\0\0\0";
                for (i, h) in cfg.mac.split(':').take(6).enumerate() {
                    let b = u8::from_str_radix(h, 16).unwrap_or(0);
                    disk_guid[10 + i] = b;
                    part_guid[10 + i] = b;
                }
                disk.partition(disk_guid, part_guid)?;
            }
            let started = Instant::now();
            download(cfg, report, || {
                let f = disk.file.try_clone().ctx(|| format!("opening {path}"))?;
                Ok((f, disk::IMAGE_OFFSET))
            })?;
            disk.sync()?;
            disk.stamp(Some((&cfg.sha256, cfg.size)))?;
            report.step("installed", format!("to {path} in {:.1}s", started.elapsed().as_secs_f64()));
        }
    }
    // The kernel read the table when the disk appeared; after kiln wrote one, it must read it again.
    if sys::partition_name(&name, 1).is_none() {
        sys::reread_partitions(&disk.file, path)?;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    let part = loop {
        if let Some(p) = sys::partition_name(&name, 1) {
            break p;
        }
        if Instant::now() > deadline {
            return Err(format!("{path}: the kernel shows no partition 1 after kiln wrote the partition table"));
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let dev = format!("/dev/{part}");
    sys::wait_for(&dev, Duration::from_secs(10))?;
    Ok(dev)
}

/// Downloads and verifies the image into what `open` gives (a file and the offset to write at), at most
/// `cfg.attempts` times.
fn download(cfg: &Config, report: &mut Reporter, open: impl Fn() -> Result<(fs::File, u64)>) -> Result<()> {
    for attempt in 1..=cfg.attempts {
        let (file, base) = open()?;
        say(format!("fetching {} ({} bytes), attempt {attempt} of {}", cfg.image, cfg.size, cfg.attempts));
        let mut last = Instant::now();
        let size = cfg.size;
        let mut progress = |got: u64| {
            if last.elapsed() >= Duration::from_secs(5) {
                last = Instant::now();
                say(format!("{} of {} MiB", got >> 20, size >> 20));
            }
        };
        let why = match http::fetch(&cfg.image, cfg.size, &cfg.sha256, &file, base, &mut progress) {
            Ok(f) => {
                let rate = f.bytes as f64 / f.secs.max(0.001) / (1 << 20) as f64;
                say(format!("fetched {} bytes in {:.1}s ({rate:.0} MiB/s); sha256 verified", f.bytes, f.secs));
                report.step("fetched", format!("image {} bytes in {:.1}s", f.bytes, f.secs));
                report.step("verified", format!("sha256:{}", cfg.sha256));
                return Ok(());
            }
            Err(FetchError::Mismatch { got }) => {
                format!("image digest mismatch: expected sha256:{}, got sha256:{got}", cfg.sha256)
            }
            Err(FetchError::Size { got }) => format!(
                "the server's image is {got} bytes, the manifest says {} (expected sha256:{}): truncated or replaced",
                cfg.size, cfg.sha256
            ),
            Err(FetchError::Other(e)) => e,
        };
        say(format!("attempt {attempt} of {}: {why}", cfg.attempts));
        report.step("mismatch", format!("attempt {attempt} of {}: {why}", cfg.attempts));
        if attempt == cfg.attempts {
            return Err(format!("{why}; gave up after {attempt} attempts, the image was not booted"));
        }
        std::thread::sleep(Duration::from_secs(2));
    }
    Err("no download was attempted".into())
}

/// Copies what the node's overlay put in the initramfs (everything but the loader's own files) into the new
/// root, as the kernel would have unpacked it over the image: modes and owners as given, files replaced.
fn copy_overlay(from: &Path, to: &Path, top: bool) -> Result<usize> {
    let mut n = 0;
    let entries = fs::read_dir(from).ctx(|| format!("reading {}", from.display()))?;
    let mut entries: Vec<_> = entries.flatten().collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let name = e.file_name();
        if top && OWN.iter().any(|o| name == *o) {
            continue;
        }
        let src = e.path();
        let dst = to.join(&name);
        let m = fs::symlink_metadata(&src).ctx(|| format!("reading {}", src.display()))?;
        let ft = m.file_type();
        let what = || format!("copying the overlay's {}", src.display());
        if ft.is_dir() {
            match fs::symlink_metadata(&dst) {
                Ok(d) if d.is_dir() => {}
                Ok(_) => {
                    fs::remove_file(&dst).ctx(what)?;
                    fs::create_dir(&dst).ctx(what)?;
                }
                Err(_) => fs::create_dir(&dst).ctx(what)?,
            }
            n += copy_overlay(&src, &dst, false)?;
        } else if ft.is_symlink() {
            let target = fs::read_link(&src).ctx(what)?;
            if fs::symlink_metadata(&dst).is_ok() {
                remove(&dst).ctx(what)?;
            }
            std::os::unix::fs::symlink(&target, &dst).ctx(what)?;
            std::os::unix::fs::lchown(&dst, Some(m.uid()), Some(m.gid())).ctx(what)?;
            n += 1;
            continue;
        } else if ft.is_file() {
            if fs::symlink_metadata(&dst).is_ok() {
                remove(&dst).ctx(what)?;
            }
            fs::copy(&src, &dst).ctx(what)?;
        } else {
            continue;
        }
        std::os::unix::fs::chown(&dst, Some(m.uid()), Some(m.gid())).ctx(what)?;
        fs::set_permissions(&dst, fs::Permissions::from_mode(m.mode() & 0o7777)).ctx(what)?;
        n += 1;
    }
    Ok(n)
}

fn remove(p: &Path) -> std::io::Result<()> {
    if fs::symlink_metadata(p)?.is_dir() {
        fs::remove_dir_all(p)
    } else {
        fs::remove_file(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_overlay_is_copied_over_the_image_and_the_loaders_files_are_not() {
        let d = std::env::temp_dir().join(format!("kiln-overlay-test-{}", std::process::id()));
        let (src, dst) = (d.join("src"), d.join("dst"));
        let _ = fs::remove_dir_all(&d);
        for p in ["etc/kiln", "kiln/modules", "root/.ssh"] {
            fs::create_dir_all(src.join(p)).unwrap();
        }
        fs::write(src.join("etc/hostname"), "n042\n").unwrap();
        fs::write(src.join("etc/kiln/node.env"), "KILN_NODE='n042'\n").unwrap();
        fs::write(src.join("root/.ssh/authorized_keys"), "ssh-ed25519 AAAA\n").unwrap();
        fs::set_permissions(src.join("root/.ssh/authorized_keys"), fs::Permissions::from_mode(0o600)).unwrap();
        fs::set_permissions(src.join("root"), fs::Permissions::from_mode(0o700)).unwrap();
        fs::write(src.join("init"), "loader").unwrap();
        fs::write(src.join("kiln/modules/x.ko"), "module").unwrap();
        fs::create_dir_all(dst.join("etc")).unwrap();
        fs::write(dst.join("etc/hostname"), "image\n").unwrap();
        std::os::unix::fs::symlink("nowhere", dst.join("root")).unwrap();
        let n = copy_overlay(&src, &dst, true).unwrap();
        assert_eq!(n, 7, "etc, etc/hostname, etc/kiln, node.env, root, .ssh, authorized_keys");
        assert_eq!(fs::read_to_string(dst.join("etc/hostname")).unwrap(), "n042\n");
        assert!(!dst.join("init").exists() && !dst.join("kiln").exists());
        let mode = |p: &str| fs::metadata(dst.join(p)).unwrap().permissions().mode() & 0o7777;
        assert_eq!((mode("root"), mode("root/.ssh/authorized_keys")), (0o700, 0o600));
        let _ = fs::remove_dir_all(&d);
    }
}
