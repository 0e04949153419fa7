//! The reproducible newc cpio writer and the compressors around it.
//!
//! newc ("SVR4 with no CRC", magic `070701`) is the format the Linux kernel unpacks an initramfs
//! from (Documentation/driver-api/early-userspace/buffer-format.rst). Every header field is
//! written explicitly by the caller, so the bytes depend only on the entries given: kiln passes
//! clamped mtimes, renumbered inodes and sorted names. newc stores sizes in 32 bits: a file of
//! 4 GiB or more cannot be represented and is refused by name rather than truncated. Extended
//! attributes (file capabilities, SELinux labels) have no place in newc and are not carried.
//! [`NewcTree`] assembles small archives (initramfs, overlays, the appliance's) in memory. [`squashfs`] writes
//! the image of a two-stage bundle, which has no such limit.

mod compress;
mod cpio;
pub mod squashfs;
mod tree;

pub use compress::{Compression, Compressor};
pub use cpio::{CpioEntry, CpioWriter, NEWC_MAX_FILE_SIZE};
pub use squashfs::{SquashfsOptions, SquashfsWriter};
pub use tree::NewcTree;
