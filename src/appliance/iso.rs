//! The hybrid ISO: isolinux for BIOS (El Torito), a unified kernel image (systemd-boot's EFI
//! stub with the kernel, initrd and command line added by `objcopy`) in a FAT image for UEFI
//! (El Torito EFI entry and a GPT partition), and xorriso's isohybrid MBR/GPT so the same file
//! boots from a USB stick. Reproducible: fixed mtimes, FAT serial and volume IDs, the PE
//! timestamp zeroed, xorriso run with `SOURCE_DATE_EPOCH`. Not supported: Secure Boot (the
//! UKI is unsigned), 32-bit UEFI, arm64.

use std::fs::{self, File};
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::util::{mkdir_p, run_command, sha256_file};

/// The kernel and initrds to boot, and how.
pub struct Payload {
    pub kernel: PathBuf,
    pub initrds: Vec<PathBuf>,
    pub cmdline: String,
    pub sde: i64,
}

/// The external programs and boot files the ISO is made with.
pub struct Tools {
    pub isohdpfx: PathBuf,
    pub isolinux: PathBuf,
    pub ldlinux: PathBuf,
    pub efi_stub: PathBuf,
}

const VOLUME_ID: &str = "KILN_APPLIANCE";
/// The FAT image's serial number: fixed, so the image does not depend on the clock.
const FAT_SERIAL: &str = "4b494c4e";

fn need(path: &str, package: &str) -> Result<PathBuf> {
    let p = PathBuf::from(path);
    if !p.is_file() {
        bail!("{path} not found: install the Debian package {package} (scripts/setup.sh)");
    }
    Ok(p)
}

impl Tools {
    pub fn find() -> Result<Tools> {
        for (tool, package) in [
            ("xorriso", "xorriso"),
            ("objcopy", "binutils"),
            ("mkfs.vfat", "dosfstools"),
            ("mcopy", "mtools"),
            ("mmd", "mtools"),
        ] {
            if crate::util::which(tool, None).is_none() {
                bail!("{tool} not found: install the Debian package {package} (scripts/setup.sh)");
            }
        }
        Ok(Tools {
            isohdpfx: need("/usr/lib/ISOLINUX/isohdpfx.bin", "isolinux")?,
            isolinux: need("/usr/lib/ISOLINUX/isolinux.bin", "isolinux")?,
            ldlinux: need("/usr/lib/syslinux/modules/bios/ldlinux.c32", "syslinux-common")?,
            efi_stub: need("/usr/lib/systemd/boot/efi/linuxx64.efi.stub", "systemd-boot-efi")?,
        })
    }

    /// What identifies the tools' output: the boot files' digests and the programs' versions.
    pub fn identity(&self) -> Result<serde_json::Value> {
        let digest = |p: &Path| -> Result<String> { Ok(sha256_file(p)?.0.hex()) };
        let version = |tool: &str, arg: &str| -> String {
            crate::util::pin_clock_and_locale(Command::new(tool).arg(arg))
                .output()
                .map(|o| {
                    let mut s = String::from_utf8_lossy(&o.stdout).into_owned();
                    s.push_str(&String::from_utf8_lossy(&o.stderr));
                    s.lines().find(|l| !l.trim().is_empty()).unwrap_or_default().to_string()
                })
                .unwrap_or_default()
        };
        Ok(serde_json::json!({
            "isohdpfx": digest(&self.isohdpfx)?,
            "isolinux": digest(&self.isolinux)?,
            "ldlinux": digest(&self.ldlinux)?,
            "efi_stub": digest(&self.efi_stub)?,
            "xorriso": version("xorriso", "-version"),
            "objcopy": version("objcopy", "--version"),
            "mtools": version("mcopy", "--version"),
            "mkfs.vfat": version("mkfs.vfat", "--help"),
        }))
    }
}

/// Makes the ISO at `out`, using `work` for its tree and intermediate files.
pub fn make(tools: &Tools, payload: &Payload, work: &Path, out: &Path) -> Result<()> {
    let root = work.join("iso");
    mkdir_p(&root.join("isolinux"))?;
    mkdir_p(&root.join("boot"))?;
    fs::copy(&payload.kernel, root.join("boot/vmlinuz"))
        .with_context(|| format!("copying {}", payload.kernel.display()))?;
    let initrd = root.join("boot/initrd.img");
    {
        let mut w = File::create(&initrd).with_context(|| format!("creating {}", initrd.display()))?;
        for part in &payload.initrds {
            let mut r = File::open(part).with_context(|| format!("reading {}", part.display()))?;
            std::io::copy(&mut r, &mut w).with_context(|| format!("writing {}", initrd.display()))?;
        }
        w.sync_all()?;
    }
    fs::copy(&tools.isolinux, root.join("isolinux/isolinux.bin"))?;
    fs::copy(&tools.ldlinux, root.join("isolinux/ldlinux.c32"))?;
    let cfg = format!(
        "SERIAL 0 115200\nDEFAULT kiln\nPROMPT 0\nTIMEOUT 0\nLABEL kiln\n  KERNEL /boot/vmlinuz\n  APPEND initrd=/boot/initrd.img {}\n",
        payload.cmdline
    );
    fs::write(root.join("isolinux/isolinux.cfg"), cfg)?;

    // UEFI: one PE file carrying kernel, initrd and command line, as EFI/BOOT/BOOTX64.EFI.
    let uki = work.join("BOOTX64.EFI");
    make_uki(tools, &payload.kernel, &initrd, &payload.cmdline, work, &uki)?;
    let efiboot = root.join("boot/efiboot.img");
    make_fat(&uki, &efiboot, work)?;

    normalise_mtimes(&root, payload.sde)?;
    let mut cmd = Command::new("xorriso");
    cmd.env("SOURCE_DATE_EPOCH", payload.sde.to_string())
        .args(["-as", "mkisofs", "-quiet", "-o"])
        .arg(out)
        .args(["-V", VOLUME_ID, "-r", "-J", "-joliet-long"])
        .args(["-b", "isolinux/isolinux.bin", "-c", "isolinux/boot.cat"])
        .args(["-no-emul-boot", "-boot-load-size", "4", "-boot-info-table"])
        .arg("-isohybrid-mbr")
        .arg(&tools.isohdpfx)
        .args(["-eltorito-alt-boot", "-e", "boot/efiboot.img", "-no-emul-boot", "-isohybrid-gpt-basdat"])
        .arg(&root);
    run_command(&mut cmd)?;
    Ok(())
}

fn make_uki(tools: &Tools, kernel: &Path, initrd: &Path, cmdline: &str, work: &Path, out: &Path) -> Result<()> {
    let osrel = work.join("os-release");
    fs::write(&osrel, "NAME=\"kiln appliance\"\nID=kiln\nPRETTY_NAME=\"kiln appliance\"\n")?;
    let cmd_file = work.join("cmdline");
    fs::write(&cmd_file, format!("{cmdline}\0"))?;
    let kernel_size = fs::metadata(kernel)?.len();
    // Section addresses: after the stub's own sections, each section past the previous one.
    let linux_vma: u64 = 0x2000000;
    let initrd_vma = (linux_vma + kernel_size + 0xfffff) & !0xfffff;
    let arg = |name: &str, path: &Path| format!("{name}={}", path.display());
    let mut cmd = Command::new("objcopy");
    cmd.arg("--add-section")
        .arg(arg(".osrel", &osrel))
        .args(["--change-section-vma", ".osrel=0x20000"])
        .arg("--add-section")
        .arg(arg(".cmdline", &cmd_file))
        .args(["--change-section-vma", ".cmdline=0x30000"])
        .arg("--add-section")
        .arg(arg(".linux", kernel))
        .arg("--change-section-vma")
        .arg(format!(".linux={linux_vma:#x}"))
        .arg("--add-section")
        .arg(arg(".initrd", initrd))
        .arg("--change-section-vma")
        .arg(format!(".initrd={initrd_vma:#x}"))
        .arg(&tools.efi_stub)
        .arg(out);
    run_command(&mut cmd)?;
    zero_pe_timestamp(out)
}

/// objcopy stamps the PE/COFF header with the current time (and a checksum over it); zeroing
/// both keeps the file reproducible.
fn zero_pe_timestamp(path: &Path) -> Result<()> {
    let mut f = File::options().read(true).write(true).open(path)?;
    let mut head = [0u8; 0x40];
    std::io::Read::read_exact(&mut f, &mut head)?;
    if &head[..2] != b"MZ" {
        bail!("{} is not a PE file", path.display());
    }
    let pe = u32::from_le_bytes(head[0x3c..0x40].try_into().unwrap()) as u64;
    let mut sig = [0u8; 4];
    f.seek(SeekFrom::Start(pe))?;
    std::io::Read::read_exact(&mut f, &mut sig)?;
    if &sig != b"PE\0\0" {
        bail!("{} has no PE header", path.display());
    }
    // COFF header: signature (4), machine (2), section count (2), then TimeDateStamp (4).
    f.seek(SeekFrom::Start(pe + 8))?;
    f.write_all(&[0u8; 4])?;
    // The optional header's CheckSum (pe + 24 + 64) covers the timestamp; 0 means "none",
    // which UEFI firmware accepts.
    f.seek(SeekFrom::Start(pe + 24 + 64))?;
    f.write_all(&[0u8; 4])?;
    f.sync_all()?;
    Ok(())
}

fn make_fat(uki: &Path, out: &Path, work: &Path) -> Result<()> {
    let size = fs::metadata(uki)?.len();
    // Room for the file plus FAT tables and directories, in KiB.
    let kib = (size + size / 50 + (4 << 20)) / 1024;
    let mut mkfs = Command::new("mkfs.vfat");
    mkfs.args(["--invariant", "-i", FAT_SERIAL, "-n", "KILNEFI", "-C"]).arg(out).arg(kib.to_string());
    run_command(&mut mkfs)?;
    // mtools stamps new directories and (without -m) files with the clock: a fixed one.
    let img = out.to_string_lossy().into_owned();
    let mtools = |args: &[&str]| -> Result<()> {
        let mut c = Command::new(args[0]);
        c.args(&args[1..]).env("SOURCE_DATE_EPOCH", "315532800").env("MTOOLS_SKIP_CHECK", "1");
        run_command(&mut c)?;
        Ok(())
    };
    mtools(&["mmd", "-i", &img, "::/EFI", "::/EFI/BOOT"])?;
    let staged = work.join("fat-BOOTX64.EFI");
    fs::copy(uki, &staged)?;
    set_mtime(&staged, 315532800)?;
    mtools(&["mcopy", "-m", "-i", &img, &staged.to_string_lossy(), "::/EFI/BOOT/BOOTX64.EFI"])?;
    Ok(())
}

fn set_mtime(path: &Path, secs: i64) -> Result<()> {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs.max(0) as u64);
    let f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    f.set_times(fs::FileTimes::new().set_modified(t).set_accessed(t))
        .with_context(|| format!("setting the time of {}", path.display()))
}

fn normalise_mtimes(dir: &Path, sde: i64) -> Result<()> {
    for e in fs::read_dir(dir)? {
        let p = e?.path();
        if p.is_dir() {
            normalise_mtimes(&p, sde)?;
        } else {
            set_mtime(&p, sde)?;
        }
    }
    set_mtime(dir, sde)
}
