//! What a long command shows while it works: step lines on a terminal, nothing in a pipe or with `--quiet`;
//! and the log (tracing) set up once at start.

use std::fmt;
use std::io::{self, IsTerminal, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

static QUIET: AtomicBool = AtomicBool::new(false);

pub fn init_tracing(verbose: u8, quiet: bool) {
    QUIET.store(quiet, Ordering::Relaxed);
    let default = match (quiet, verbose) {
        (true, _) => "error",
        (false, 0) => "warn",
        (false, 1) => "info",
        (false, _) => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("KILN_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(io::stderr)
        .with_ansi(io::stderr().is_terminal())
        .try_init();
}

/// Step-by-step progress on stderr: one line per step with its duration, shown only when stderr
/// is a terminal and `--quiet` was not given.
pub struct Progress {
    enabled: bool,
    label: String,
    step: Option<(String, Instant)>,
}

impl Progress {
    pub fn new(label: impl Into<String>) -> Self {
        let enabled = !QUIET.load(Ordering::Relaxed) && io::stderr().is_terminal();
        Progress { enabled, label: label.into(), step: None }
    }

    pub fn step(&mut self, what: impl Into<String>) {
        self.end_step();
        let what = what.into();
        if self.enabled {
            eprint!("{}: {what} ...", self.label);
            let _ = io::stderr().flush();
        }
        self.step = Some((what, Instant::now()));
    }

    fn end_step(&mut self) {
        if let Some((_, start)) = self.step.take() {
            if self.enabled {
                eprintln!(" {:.1}s", start.elapsed().as_secs_f64());
            }
        }
    }

    pub fn done(mut self, msg: impl fmt::Display) {
        self.end_step();
        if self.enabled {
            eprintln!("{}: {msg}", self.label);
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.end_step();
    }
}

/// A byte count for people: `512 B`, `1.5 MiB`.
pub fn human_size(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// A line for people on stderr, terminal or not (not with `--quiet`): what kiln decided that they should know
/// about, such as an output fetched instead of built or a cache that could not be reached.
pub fn say(msg: impl fmt::Display) {
    if !QUIET.load(Ordering::Relaxed) {
        eprintln!("{msg}");
    }
}
