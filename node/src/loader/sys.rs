//! The system calls the loader makes as PID 1: mounts, module loading, the loop-device and partition-table
//! ioctls, and the switch to the image's root.
//!
//! The ioctls are the only unsafe code in kiln-node: `nix` generates them as `unsafe fn` because the kernel
//! cannot check the argument's type. Each passes a plain integer (a file descriptor) or nothing.

use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::mount::{mount, MsFlags};

use super::{Context, Result};

/// Mounts `fstype` on `target` (created if missing) unless something is mounted there already.
pub fn mount_fs(fstype: &str, source: &str, target: &str, flags: MsFlags, data: &str) -> Result<()> {
    fs::create_dir_all(target).ctx(|| format!("creating {target}"))?;
    if is_mount_point(target) {
        return Ok(());
    }
    mount(Some(source), target, Some(fstype), flags, Some(data)).ctx(|| format!("mounting {fstype} on {target}"))
}

/// Whether `path` is the root of a mount (another device than its parent's).
pub fn is_mount_point(path: &str) -> bool {
    let p = Path::new(path);
    let parent = p.parent().unwrap_or(Path::new("/"));
    match (fs::metadata(p), fs::metadata(parent)) {
        (Ok(a), Ok(b)) => a.dev() != b.dev() || a.ino() == b.ino(),
        _ => false,
    }
}

/// Moves the mount at `from` to `to`.
pub fn move_mount(from: &str, to: &str) -> Result<()> {
    fs::create_dir_all(to).ctx(|| format!("creating {to}"))?;
    mount(Some(from), to, None::<&str>, MsFlags::MS_MOVE, None::<&str>).ctx(|| format!("moving {from} to {to}"))
}

/// Loads one module file; a module already loaded (or built in) is not an error.
pub fn load_module(path: &Path) -> Result<()> {
    let f = File::open(path).ctx(|| format!("opening {}", path.display()))?;
    let params = CString::default();
    match nix::kmod::finit_module(&f, &params, nix::kmod::ModuleInitFlags::empty()) {
        Ok(()) | Err(nix::errno::Errno::EEXIST) => Ok(()),
        Err(e) => Err(format!("loading {}: {e}", path.display())),
    }
}

mod ioctl {
    #![allow(unsafe_code)]
    nix::ioctl_none_bad!(loop_ctl_get_free, 0x4C82);
    nix::ioctl_write_int_bad!(loop_set_fd, 0x4C00);
    nix::ioctl_none!(blkrrpart, 0x12, 95);

    /// The number of a free loop device.
    pub fn free_loop(control: &std::fs::File) -> nix::Result<i32> {
        use std::os::fd::AsRawFd;
        // SAFETY: LOOP_CTL_GET_FREE takes no argument; the descriptor is open for the call's duration.
        unsafe { loop_ctl_get_free(control.as_raw_fd()) }
    }

    /// Backs loop device `dev` with the open file `backing`.
    pub fn set_fd(dev: &std::fs::File, backing: &std::fs::File) -> nix::Result<i32> {
        use std::os::fd::AsRawFd;
        // SAFETY: LOOP_SET_FD takes a file descriptor by value; both stay open for the call's duration.
        unsafe { loop_set_fd(dev.as_raw_fd(), backing.as_raw_fd()) }
    }

    /// Makes the kernel read a disk's partition table again.
    pub fn reread_partitions(disk: &std::fs::File) -> nix::Result<i32> {
        use std::os::fd::AsRawFd;
        // SAFETY: BLKRRPART takes no argument; the descriptor is open for the call's duration.
        unsafe { blkrrpart(disk.as_raw_fd()) }
    }
}

/// Waits (bounded) for a path to exist: devtmpfs creates device nodes shortly after the kernel adds a device.
pub fn wait_for(path: &str, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while !Path::new(path).exists() {
        if Instant::now() > deadline {
            return Err(format!("{path} did not appear within {}s", timeout.as_secs()));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Attaches `file` (opened read-only, so the device is read-only) to a free loop device; returns its path.
pub fn attach_loop(file: &str) -> Result<String> {
    let control = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/loop-control")
        .ctx(|| "opening /dev/loop-control".into())?;
    let backing = File::open(file).ctx(|| format!("opening {file}"))?;
    // Another attach may take the device between the two calls: try a few.
    let mut last = String::new();
    for _ in 0..8 {
        let n = ioctl::free_loop(&control).ctx(|| "finding a free loop device".into())?;
        let dev = format!("/dev/loop{n}");
        wait_for(&dev, Duration::from_secs(5))?;
        let f = OpenOptions::new().read(true).open(&dev).ctx(|| format!("opening {dev}"))?;
        match ioctl::set_fd(&f, &backing) {
            Ok(_) => return Ok(dev),
            Err(nix::errno::Errno::EBUSY) => last = format!("{dev} is busy"),
            Err(e) => return Err(format!("attaching {file} to {dev}: {e}")),
        }
    }
    Err(format!("no free loop device for {file}: {last}"))
}

/// Asks the kernel to read `disk`'s partition table again (after kiln wrote it).
pub fn reread_partitions(disk: &File, name: &str) -> Result<()> {
    match ioctl::reread_partitions(disk) {
        Ok(_) => Ok(()),
        Err(e) => Err(format!("re-reading the partition table of {name}: {e}")),
    }
}

/// Hands the machine to the image: moves the API file systems into `newroot`, frees what the initramfs holds,
/// makes `newroot` the root and executes `init` there (PID 1 stays PID 1). Returns only on failure.
pub fn switch_root(newroot: &str, init: &str) -> String {
    for m in ["/dev", "/proc", "/sys", "/run"] {
        let to = format!("{newroot}{m}");
        if is_mount_point(m) {
            if let Err(e) = move_mount(m, &to) {
                return e;
            }
        }
    }
    // The initramfs is RAM: delete what the loader no longer needs, never crossing into a mount.
    if let Ok(root) = fs::metadata("/") {
        free_initramfs(Path::new("/"), root.dev(), newroot);
    }
    if let Err(e) = std::env::set_current_dir(newroot) {
        return format!("entering {newroot}: {e}");
    }
    if let Err(e) = mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>) {
        return format!("moving {newroot} to /: {e}");
    }
    if let Err(e) = nix::unistd::chroot(".") {
        return format!("entering the new root: {e}");
    }
    if let Err(e) = std::env::set_current_dir("/") {
        return format!("entering the new root: {e}");
    }
    // kiln's status agent, when the node's overlay brought it: it reports to kiln serve beside the image's init,
    // as the initrd path's shim starts it (it checks kiln.agent=off itself).
    const AGENT: &str = "/usr/lib/kiln/kiln-node";
    if Path::new(AGENT).is_file() {
        let started = std::process::Command::new(AGENT)
            .args(["agent", "--log", "/dev/kmsg"])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn();
        if let Err(e) = started {
            println!("kiln-loader: starting the status agent {AGENT}: {e}");
        }
    }
    let target = if Path::new(init).exists() {
        init.to_string()
    } else {
        println!("kiln-loader: {init} is missing in this image; starting /bin/sh");
        "/bin/sh".to_string()
    };
    use std::os::unix::process::CommandExt;
    let err = std::process::Command::new(&target).arg0(&target).exec();
    format!("starting {target}: {err}")
}

fn free_initramfs(dir: &Path, dev: u64, keep: &str) {
    let Ok(entries) = fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let p = e.path();
        if p.to_str() == Some(keep) {
            continue;
        }
        let Ok(m) = fs::symlink_metadata(&p) else { continue };
        if m.dev() != dev {
            continue;
        }
        if m.is_dir() {
            free_initramfs(&p, dev, keep);
            let _ = fs::remove_dir(&p);
        } else {
            let _ = fs::remove_file(&p);
        }
    }
}

/// Whether this process is PID 1.
pub fn is_init() -> bool {
    std::process::id() == 1
}

/// Stops here for good: PID 1 must not exit (the kernel would panic and, with `panic=`, reboot into the same
/// failure again).
pub fn halt() -> ! {
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// A disk's size in bytes and its logical block size, from sysfs.
pub fn disk_geometry(name: &str) -> Result<(u64, u64)> {
    let read = |f: &str| -> Result<u64> {
        let p = format!("/sys/class/block/{name}/{f}");
        fs::read_to_string(&p).ctx(|| format!("reading {p}"))?.trim().parse().map_err(|e| format!("{p}: {e}"))
    };
    let sectors = read("size")?;
    let lbs = read("queue/logical_block_size").unwrap_or(512);
    Ok((sectors * 512, lbs))
}

/// The device name of partition `number` of disk `name` (`vda` → `vda1`, `nvme0n1` → `nvme0n1p1`), as sysfs
/// lists it.
pub fn partition_name(name: &str, number: u32) -> Option<String> {
    let dir = format!("/sys/class/block/{name}");
    for e in fs::read_dir(&dir).ok()?.flatten() {
        let part = e.path().join("partition");
        if fs::read_to_string(&part).ok().and_then(|s| s.trim().parse::<u32>().ok()) == Some(number) {
            return Some(e.file_name().to_string_lossy().into_owned());
        }
    }
    None
}
