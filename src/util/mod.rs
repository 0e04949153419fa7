//! Small pieces every part uses, one concern per module: [`digest`] (sha256 and hashing I/O), [`fsutil`]
//! (atomic writes), [`command`] (running external programs), [`progress`] (what long work shows), [`time`]
//! (calendar conversions), [`sys`] (the machine and user) and [`notify`] (readiness for systemd). Their items are
//! re-exported here.

pub mod command;
pub mod digest;
pub mod fsutil;
pub mod notify;
pub mod progress;
pub mod sys;
pub mod time;

pub use command::{pin_clock_and_locale, run_command, tail, which};
pub use digest::{sha256_file, Digest, FileDigest, HashingReader, HashingWriter};
pub use fsutil::{fsync_dir, mkdir_p, write_atomic};
pub use progress::{human_size, init_tracing, say, ByteProgress, Progress};
pub use sys::{is_root, node_binary, thread_count};
pub use time::{unix_now, utc_time};
