//! The firmware files kiln serve hands to machines that network-boot: one per client architecture (BIOS,
//! x86_64 UEFI, arm64 UEFI), by the name DHCP gives them, served by TFTP and, for UEFI HTTP boot, by HTTP.
//!
//! They come from the `[server] ipxe` build in the store (checked against its manifest), overridden per
//! architecture by `[server.boot_files]` (each file checked against a manifest beside it when there is one, as
//! the appliance carries).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::recipe::ServerRecipe;
use crate::store::{verify_listed, verify_output, RootKind, Store};

/// One firmware file: the name it is served under and where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FirmwareFile {
    /// The TFTP name (and HTTP path, without the leading `/`), e.g. `undionly.kpxe`, `arm64/snponly.efi`.
    pub name: String,
    pub path: PathBuf,
}

/// The firmware file per client architecture; `None`: that architecture gets no boot file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BootFiles {
    /// Legacy BIOS PXE (arch 0), served as `undionly.kpxe`.
    pub bios: Option<FirmwareFile>,
    /// x86_64 UEFI (arch 7, 9; 16 over HTTP), served as `snponly.efi`.
    pub efi_x64: Option<FirmwareFile>,
    /// arm64 UEFI (arch 11; 19 over HTTP), served as `arm64/snponly.efi`.
    pub efi_arm64: Option<FirmwareFile>,
}

/// The served names, by architecture, and the files of an iPXE build they are taken from.
const BIOS: (&str, &str) = ("undionly.kpxe", "bin-x86_64-pcbios-undionly.kpxe");
const EFI_X64: (&str, &str) = ("snponly.efi", "bin-x86_64-efi-snponly.efi");
const EFI_ARM64: (&str, &str) = ("arm64/snponly.efi", "bin-arm64-efi-snponly.efi");

impl BootFiles {
    /// A set served under the usual names from these files (tests, tools).
    pub fn from_paths(bios: Option<PathBuf>, efi_x64: Option<PathBuf>, efi_arm64: Option<PathBuf>) -> BootFiles {
        let file = |name: &str, path: Option<PathBuf>| path.map(|path| FirmwareFile { name: name.to_string(), path });
        BootFiles {
            bios: file(BIOS.0, bios),
            efi_x64: file(EFI_X64.0, efi_x64),
            efi_arm64: file(EFI_ARM64.0, efi_arm64),
        }
    }

    /// The files `[server]` names, checked against their manifests. `recipe` names the recipe in errors.
    pub fn load(server: &ServerRecipe, store: &Store, recipe: &str) -> Result<BootFiles> {
        let mut out = BootFiles::default();
        if let Some(name) = &server.ipxe {
            let dir = store.root(RootKind::Ipxe, name).with_context(|| {
                format!(
                    "{recipe}: [server] ipxe = {name:?} has not been built: run `kiln build-ipxe` (see docs/ipxe.md)"
                )
            })?;
            if let Some(p) = verify_output(&dir).first() {
                bail!("{}: {} (rebuild it with `kiln build-ipxe`)", p.path.display(), p.problem);
            }
            let pick = |(served, built): (&str, &str)| {
                let path = dir.join(built);
                path.is_file().then(|| FirmwareFile { name: served.to_string(), path })
            };
            out.bios = pick(BIOS);
            out.efi_x64 = pick(EFI_X64);
            out.efi_arm64 = pick(EFI_ARM64);
        }
        if let Some(bf) = &server.boot_files {
            let check = |p: &Path, served: &str| -> Result<FirmwareFile> {
                if !p.is_file() {
                    bail!("{recipe}: [server.boot_files] names {}, which does not exist", p.display());
                }
                verify_listed(p)?;
                Ok(FirmwareFile { name: served.to_string(), path: p.to_path_buf() })
            };
            if let Some(p) = &bf.bios {
                out.bios = Some(check(p, BIOS.0)?);
            }
            if let Some(p) = &bf.efi_x64 {
                out.efi_x64 = Some(check(p, EFI_X64.0)?);
            }
            if let Some(p) = &bf.efi_arm64 {
                out.efi_arm64 = Some(check(p, EFI_ARM64.0)?);
            }
        }
        Ok(out)
    }

    /// Every file served, BIOS first.
    pub fn iter(&self) -> impl Iterator<Item = &FirmwareFile> {
        [&self.bios, &self.efi_x64, &self.efi_arm64].into_iter().flatten()
    }

    /// The file served under `name`.
    pub fn by_name(&self, name: &str) -> Option<&FirmwareFile> {
        self.iter().find(|f| f.name == name)
    }
}
