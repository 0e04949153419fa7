//! `kiln build-ipxe`: iPXE built from source, reproducibly, into the store.
//!
//! A build takes a source (a local tree, or a git commit fetched into the store's cache), a list
//! of make targets, build options (iPXE `config/*.h` defines, written as `config/local/*.h` into
//! a private copy of the source) and an embedded script (a file, or one generated from `--vlan`
//! and `--chain`). Each target becomes its own store output, named by the hash of everything
//! that went into it (source tree, headers, script, target, compiler and binutils versions,
//! `SOURCE_DATE_EPOCH`), so the same inputs find the finished binary and build nothing. The
//! binaries of one build are then gathered, with Warewulf's names, into one more output: the
//! store path `kiln build-ipxe` prints, which `kiln serve` uses.
//!
//! Reproducible: make runs in a clean environment with `SOURCE_DATE_EPOCH` (EFI link
//! timestamp) and `-ffile-prefix-map=<tree>=.` (the EFI build id is a checksum of objects that
//! would otherwise carry the tree's path), so the same inputs give the same bytes wherever the
//! store is. Missing compilers or tools fail only the targets that need them, naming the
//! Debian/Ubuntu package. Not supported: iPXE's named configurations (`CONFIG=`), and more
//! than one embedded file.
//!
//! [`spec`] says what to build ([`BuildSpec`], from the command line or an `[ipxe.NAME]` table via [`recipe`]),
//! [`build()`] builds it into the store, `toolchain` checks and identifies the compilers, `make` runs iPXE's
//! make, `options` writes its config headers, `embed` the embedded script, `source` fetches the tree.

pub mod build;
mod embed;
mod make;
mod options;
pub mod recipe;
mod source;
pub mod spec;
mod target;
mod toolchain;

pub use build::{build, BuildOptions, BuildReport, SourceReport, TargetReport};
pub use embed::EmbedScript;
pub use options::Config;
pub use recipe::build_recipe;
pub use source::{SourceSpec, PINNED_COMMIT, UPSTREAM_GIT};
pub use spec::{BuildSpec, Origin};
pub use target::{Target, DEFAULT_TARGETS};

/// Bumped whenever the way kiln drives iPXE's build changes its output.
const BUILD_VERSION: u32 = 1;

/// `SOURCE_DATE_EPOCH` when nothing else gives one (a source that is not a git checkout):
/// 1980-01-01, the oldest time every archive format can hold.
const DEFAULT_EPOCH: i64 = 315_532_800;
