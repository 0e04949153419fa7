//! A node's local disk as kiln lays it out (`disk = "/dev/sda"`): a GPT (UEFI 2.10, chapter 5) with one
//! partition labelled `kiln-image` from 1 MiB to the end, holding the image's squashfs as it was downloaded,
//! and a stamp in the gap before it (at 512 KiB) naming the image the partition holds once it was verified.
//!
//! The partition holds the squashfs itself (a read-only file system, made and labelled by kiln): the node
//! mounts it in place, so a reboot with the same image reads it from the disk and fetches nothing. A disk is
//! kiln's when its GPT is valid and its first partition is named `kiln-image`; blank when its first and last
//! MiB are zeros. Anything else is refused unless the node has `disk_wipe = true`.

use std::fs::File;
use std::os::unix::fs::FileExt;

use super::{Context, Result};

pub const PART_NAME: &str = "kiln-image";
/// Where the image starts, in bytes.
pub const IMAGE_OFFSET: u64 = 1 << 20;
const STAMP_OFFSET: u64 = 512 * 1024;
const STAMP_MAGIC: &str = "kiln-disk 1\n";
const ENTRIES: u64 = 128;
const ENTRY_SIZE: u64 = 128;
/// Linux filesystem data.
const LINUX_DATA: [u8; 16] = guid(0x0FC6_3DAF, 0x8483, 0x4772, [0x8E, 0x79, 0x3D, 0x69, 0xD8, 0x47, 0x7D, 0xE4]);

const fn guid(a: u32, b: u16, c: u16, d: [u8; 8]) -> [u8; 16] {
    let a = a.to_le_bytes();
    let b = b.to_le_bytes();
    let c = c.to_le_bytes();
    [a[0], a[1], a[2], a[3], b[0], b[1], c[0], c[1], d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]]
}

/// CRC-32 (IEEE 802.3), as GPT headers use.
pub fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

/// What a disk holds, as far as the loader is concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    /// First and last MiB are zeros.
    Blank,
    /// kiln's layout; `image` is the (sha256, size) of a verified image, if any.
    Kiln { image: Option<(String, u64)> },
    /// Something else: a partition table or file system kiln did not write.
    Foreign(String),
}

pub struct Disk {
    pub file: File,
    pub name: String,
    pub size: u64,
    pub lba: u64,
}

impl Disk {
    pub fn open(path: &str, size: u64, lba: u64) -> Result<Disk> {
        let file = std::fs::OpenOptions::new().read(true).write(true).open(path).ctx(|| format!("opening {path}"))?;
        Ok(Disk { file, name: path.to_string(), size, lba })
    }

    fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; len];
        self.file.read_exact_at(&mut buf, offset).ctx(|| format!("reading {} at byte {offset}", self.name))?;
        Ok(buf)
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.file.write_all_at(data, offset).ctx(|| format!("writing {} at byte {offset}", self.name))
    }

    fn last_lba(&self) -> u64 {
        self.size / self.lba - 1
    }

    pub fn state(&self) -> Result<State> {
        if self.size < 2 * IMAGE_OFFSET + 4 * self.lba {
            return Err(format!("{} is too small ({} bytes) for kiln's layout", self.name, self.size));
        }
        let head = self.read(0, IMAGE_OFFSET as usize)?;
        let tail = self.read(self.size - IMAGE_OFFSET, IMAGE_OFFSET as usize)?;
        if head.iter().all(|&b| b == 0) && tail.iter().all(|&b| b == 0) {
            return Ok(State::Blank);
        }
        let lba = self.lba as usize;
        let hdr = &head[lba..lba + 92];
        if &hdr[..8] != b"EFI PART" {
            let what = if head[510..512] == [0x55, 0xAA] { "an MBR partition table" } else { "data" };
            return Ok(State::Foreign(what.into()));
        }
        let mut check = hdr.to_vec();
        check[16..20].fill(0);
        if crc32(&check) != u32::from_le_bytes(hdr[16..20].try_into().expect("4 bytes")) {
            return Ok(State::Foreign("a GPT whose header is damaged".into()));
        }
        let entries_lba = u64::from_le_bytes(hdr[72..80].try_into().expect("8 bytes"));
        let first = self.read(entries_lba * self.lba, ENTRY_SIZE as usize)?;
        let name: String = char::decode_utf16(
            first[56..128].chunks(2).map(|c| u16::from_le_bytes([c[0], c[1]])).take_while(|&c| c != 0),
        )
        .map(|c| c.unwrap_or('?'))
        .collect();
        if name != PART_NAME {
            return Ok(State::Foreign(format!("a GPT whose first partition is {name:?}")));
        }
        let stamp = String::from_utf8_lossy(&head[STAMP_OFFSET as usize..STAMP_OFFSET as usize + 4096]).to_string();
        let image = stamp.strip_prefix(STAMP_MAGIC).and_then(|rest| {
            let mut sha = None;
            let mut size = None;
            for line in rest.lines() {
                match line.split_once(' ') {
                    Some(("image", v)) if v.len() == 64 => sha = Some(v.to_string()),
                    Some(("size", v)) => size = v.parse().ok(),
                    _ => {}
                }
            }
            Some((sha?, size?))
        });
        Ok(State::Kiln { image })
    }

    /// Writes kiln's layout: protective MBR, primary and backup GPT with the one partition.
    pub fn partition(&self, disk_guid: [u8; 16], part_guid: [u8; 16]) -> Result<()> {
        let lba = self.lba;
        let last = self.last_lba();
        let entry_lbas = (ENTRIES * ENTRY_SIZE).div_ceil(lba);
        let first_usable = 2 + entry_lbas;
        let last_usable = last - 1 - entry_lbas;
        let mut entries = vec![0u8; (ENTRIES * ENTRY_SIZE) as usize];
        entries[..16].copy_from_slice(&LINUX_DATA);
        entries[16..32].copy_from_slice(&part_guid);
        entries[32..40].copy_from_slice(&(IMAGE_OFFSET / lba).to_le_bytes());
        entries[40..48].copy_from_slice(&last_usable.to_le_bytes());
        for (i, c) in PART_NAME.encode_utf16().enumerate() {
            entries[56 + 2 * i..58 + 2 * i].copy_from_slice(&c.to_le_bytes());
        }
        let entries_crc = crc32(&entries);
        let header = |my: u64, alt: u64, entries_at: u64| {
            let mut h = vec![0u8; lba as usize];
            h[..8].copy_from_slice(b"EFI PART");
            h[8..12].copy_from_slice(&0x0001_0000u32.to_le_bytes());
            h[12..16].copy_from_slice(&92u32.to_le_bytes());
            h[24..32].copy_from_slice(&my.to_le_bytes());
            h[32..40].copy_from_slice(&alt.to_le_bytes());
            h[40..48].copy_from_slice(&first_usable.to_le_bytes());
            h[48..56].copy_from_slice(&last_usable.to_le_bytes());
            h[56..72].copy_from_slice(&disk_guid);
            h[72..80].copy_from_slice(&entries_at.to_le_bytes());
            h[80..84].copy_from_slice(&(ENTRIES as u32).to_le_bytes());
            h[84..88].copy_from_slice(&(ENTRY_SIZE as u32).to_le_bytes());
            h[88..92].copy_from_slice(&entries_crc.to_le_bytes());
            let crc = crc32(&h[..92]);
            h[16..20].copy_from_slice(&crc.to_le_bytes());
            h
        };
        let mut mbr = vec![0u8; lba as usize];
        let sectors = u32::try_from(last).unwrap_or(u32::MAX);
        mbr[446..462].copy_from_slice(&[0, 0, 2, 0, 0xEE, 0xFF, 0xFF, 0xFF, 1, 0, 0, 0, 0, 0, 0, 0]);
        mbr[458..462].copy_from_slice(&sectors.to_le_bytes());
        mbr[510] = 0x55;
        mbr[511] = 0xAA;
        // Backup first, primary last: a torn write leaves no valid-looking kiln disk.
        self.write((last - entry_lbas) * lba, &entries)?;
        self.write(last * lba, &header(last, 1, last - entry_lbas))?;
        self.write(2 * lba, &entries)?;
        self.write(lba, &header(1, last, 2))?;
        self.write(0, &mbr)?;
        self.sync()
    }

    /// Records that the partition holds the verified image `sha256` of `size` bytes (or, with None, nothing
    /// verified: written before an image is replaced).
    pub fn stamp(&self, image: Option<(&str, u64)>) -> Result<()> {
        let mut text = STAMP_MAGIC.to_string();
        if let Some((sha, size)) = image {
            text.push_str(&format!("image {sha}\nsize {size}\n"));
        }
        let mut block = vec![0u8; 4096];
        block[..text.len()].copy_from_slice(text.as_bytes());
        self.write(STAMP_OFFSET, &block)?;
        self.sync()
    }

    /// Bytes the partition can hold.
    pub fn capacity(&self) -> u64 {
        let entry_lbas = (ENTRIES * ENTRY_SIZE).div_ceil(self.lba);
        (self.last_lba() - entry_lbas) * self.lba - IMAGE_OFFSET
    }

    pub fn sync(&self) -> Result<()> {
        self.file.sync_all().ctx(|| format!("syncing {}", self.name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_matches_the_reference_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }

    fn disk(size: u64) -> (std::path::PathBuf, Disk) {
        let p = std::env::temp_dir().join(format!("kiln-disk-test-{}-{size}", std::process::id()));
        let f = File::create(&p).unwrap();
        f.set_len(size).unwrap();
        drop(f);
        let d = Disk::open(p.to_str().unwrap(), size, 512).unwrap();
        (p, d)
    }

    #[test]
    fn a_blank_disk_becomes_kilns_and_keeps_its_stamp() {
        let (p, d) = disk(64 << 20);
        assert_eq!(d.state().unwrap(), State::Blank);
        d.partition([1; 16], [2; 16]).unwrap();
        d.stamp(None).unwrap();
        assert_eq!(d.state().unwrap(), State::Kiln { image: None });
        let sha = "ab".repeat(32);
        d.stamp(Some((&sha, 1234))).unwrap();
        assert_eq!(d.state().unwrap(), State::Kiln { image: Some((sha, 1234)) });
        assert!(d.capacity() > 60 << 20 && d.capacity() < 63 << 20);
        // sfdisk, when there, reads the table as one partition named kiln-image from 1 MiB.
        if let Ok(out) = std::process::Command::new("sfdisk").arg("--dump").arg(&p).output() {
            if out.status.success() {
                let dump = String::from_utf8_lossy(&out.stdout);
                assert!(dump.contains("label: gpt") && dump.contains("start=        2048"), "{dump}");
                assert!(dump.contains("name=\"kiln-image\""), "{dump}");
            }
        }
        let _ = std::fs::remove_file(p);
    }

    #[test]
    fn anything_else_is_foreign() {
        let (p, d) = disk(8 << 20);
        let mut mbr = vec![0u8; 512];
        mbr[510] = 0x55;
        mbr[511] = 0xAA;
        d.write(0, &mbr).unwrap();
        assert_eq!(d.state().unwrap(), State::Foreign("an MBR partition table".into()));
        let (p2, d2) = disk(8 << 20);
        d2.write(7 << 20, b"some file system").unwrap();
        assert_eq!(d2.state().unwrap(), State::Foreign("data".into()));
        let (p3, d3) = disk(1 << 20);
        assert!(d3.state().unwrap_err().contains("too small"));
        for p in [p, p2, p3] {
            let _ = std::fs::remove_file(p);
        }
    }
}
