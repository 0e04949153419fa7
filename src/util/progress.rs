//! What a long command shows while it works: on a terminal, a spinner per step that becomes a bar with bytes and
//! rate where the work's size is known; in a pipe, one line per finished step (with its time, bytes and rate);
//! nothing with `--quiet`. And the log (tracing) set up once at start, printed around the bars.

use std::fmt;
use std::io::{self, IsTerminal, Read, Write};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::LazyLock;
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// How progress is shown, decided once by [`init_tracing`] (or on first use).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// `--quiet`: nothing.
    Quiet,
    /// stderr is a pipe, a file or a dumb terminal: a line per finished step.
    Lines,
    /// stderr is a terminal: spinners and bars, redrawn in place.
    Bars,
}

const UNSET: u8 = 0;
static MODE: AtomicU8 = AtomicU8::new(UNSET);

fn mode() -> Mode {
    match MODE.load(Ordering::Relaxed) {
        1 => Mode::Quiet,
        2 => Mode::Lines,
        3 => Mode::Bars,
        _ => {
            let m = detect(false);
            set_mode(m);
            m
        }
    }
}

fn set_mode(m: Mode) {
    let v = match m {
        Mode::Quiet => 1,
        Mode::Lines => 2,
        Mode::Bars => 3,
    };
    MODE.store(v, Ordering::Relaxed);
}

fn detect(quiet: bool) -> Mode {
    let dumb = std::env::var_os("TERM").is_some_and(|t| t == "dumb");
    if quiet {
        Mode::Quiet
    } else if io::stderr().is_terminal() && !dumb {
        Mode::Bars
    } else {
        Mode::Lines
    }
}

/// Every bar of the process draws through this one, so bars of nested work stack and log lines print above them.
static BARS: LazyLock<MultiProgress> =
    LazyLock::new(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr_with_hz(10)));

pub fn init_tracing(verbose: u8, quiet: bool) {
    let m = detect(quiet);
    set_mode(m);
    let default = match (quiet, verbose) {
        (true, _) => "error",
        (false, 0) => "warn",
        (false, 1) => "info",
        (false, _) => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("KILN_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    // Colours only on a terminal: escape codes in a log file or a pipe are noise.
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(io::stderr().is_terminal());
    let _ = if m == Mode::Bars {
        builder.with_writer(|| LogWriter).try_init()
    } else {
        builder.with_writer(io::stderr).try_init()
    };
}

/// stderr for log lines while bars may be on screen: each line is written with the bars cleared, then they are
/// drawn again below it.
struct LogWriter;

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        BARS.suspend(|| io::stderr().write_all(buf))?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        io::stderr().flush()
    }
}

/// Step-by-step progress on stderr for one piece of work (`build compute`, `appliance`): [`Progress::step`] starts
/// a step (ending the one before), [`Progress::bytes`] counts the bytes it moves, [`Progress::done`] ends with a
/// result line.
pub struct Progress {
    mode: Mode,
    label: String,
    step: Option<Step>,
}

struct Step {
    what: String,
    bar: ProgressBar,
    start: Instant,
}

impl Progress {
    pub fn new(label: impl Into<String>) -> Self {
        Progress { mode: mode(), label: label.into(), step: None }
    }

    pub fn step(&mut self, what: impl Into<String>) {
        self.end_step();
        let what = what.into();
        let bar = match self.mode {
            Mode::Bars => {
                let bar = BARS.add(ProgressBar::new_spinner());
                bar.set_style(style(SPINNER));
                bar.set_message(format!("{}: {what}", self.label));
                bar.enable_steady_tick(Duration::from_millis(100));
                bar
            }
            // A hidden bar still counts bytes, for the line that ends the step.
            Mode::Lines | Mode::Quiet => ProgressBar::hidden(),
        };
        self.step = Some(Step { what, bar, start: Instant::now() });
    }

    /// A counter for the bytes the current step moves (shown as they move, on a terminal). Without a step, a
    /// counter nobody sees.
    pub fn bytes(&self) -> ByteProgress {
        match &self.step {
            Some(step) => {
                if self.mode == Mode::Bars {
                    step.bar.set_style(style(BYTES));
                }
                ByteProgress { bar: step.bar.clone(), bars: self.mode == Mode::Bars }
            }
            None => ByteProgress::hidden(),
        }
    }

    fn end_step(&mut self) {
        let Some(step) = self.step.take() else { return };
        let elapsed = step.start.elapsed();
        let mut line = format!("{}: {}: {:.1}s", self.label, step.what, elapsed.as_secs_f64());
        let moved = step.bar.position();
        if moved > 0 {
            let rate = moved as f64 / elapsed.as_secs_f64().max(1e-3);
            line.push_str(&format!(", {}, {}/s", human_size(moved), human_size(rate as u64)));
        }
        match self.mode {
            Mode::Bars => {
                step.bar.finish_and_clear();
                BARS.remove(&step.bar);
                let _ = BARS.println(line);
            }
            Mode::Lines => eprintln!("{line}"),
            Mode::Quiet => {}
        }
    }

    pub fn done(mut self, msg: impl fmt::Display) {
        self.end_step();
        let line = format!("{}: {msg}", self.label);
        match self.mode {
            Mode::Bars => {
                let _ = BARS.println(line);
            }
            Mode::Lines => eprintln!("{line}"),
            Mode::Quiet => {}
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.end_step();
    }
}

const SPINNER: &str = "{spinner} {wide_msg} {elapsed}";
// Bytes and bar on a line of their own: step messages carry source paths that would leave no room.
const BYTES: &str = "{spinner} {wide_msg}\n  {bytes} {binary_bytes_per_sec} {elapsed}";
const BAR: &str = "{spinner} {wide_msg}\n  [{wide_bar}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}";

fn style(template: &str) -> ProgressStyle {
    // The templates are constants checked by the unit tests below.
    ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_spinner()).progress_chars("=> ")
}

/// Counts the bytes a step moves; cheap to clone and share between threads (layers are read in parallel).
#[derive(Clone)]
pub struct ByteProgress {
    bar: ProgressBar,
    bars: bool,
}

impl ByteProgress {
    /// A counter that shows nothing (for callers with no progress to report to).
    pub fn hidden() -> Self {
        ByteProgress { bar: ProgressBar::hidden(), bars: false }
    }

    /// The number of bytes the step will move, when known: the spinner becomes a bar with an ETA.
    pub fn set_total(&self, total: u64) {
        self.bar.set_length(total);
        if self.bars {
            self.bar.set_style(style(BAR));
        }
    }

    pub fn add(&self, n: u64) {
        self.bar.inc(n);
    }

    /// `r`, counting what is read through it.
    pub fn reader<R: Read>(&self, r: R) -> CountingReader<R> {
        CountingReader { inner: r, bytes: self.clone() }
    }

    /// The bytes counted so far.
    pub fn count(&self) -> u64 {
        self.bar.position()
    }
}

/// A reader that adds what passes through it to a [`ByteProgress`].
pub struct CountingReader<R> {
    inner: R,
    bytes: ByteProgress,
}

impl<R: Read> Read for CountingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.bytes.add(n as u64);
        Ok(n)
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
    match mode() {
        Mode::Quiet => {}
        // Above the bars, which are drawn again below it.
        Mode::Bars => {
            let _ = BARS.println(msg.to_string());
        }
        Mode::Lines => eprintln!("{msg}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_parse() {
        for t in [SPINNER, BYTES, BAR] {
            ProgressStyle::with_template(t).unwrap_or_else(|e| panic!("{t}: {e}"));
        }
    }

    #[test]
    fn counting_reader_counts_across_clones() {
        let bytes = ByteProgress::hidden();
        let mut out = Vec::new();
        bytes.reader(&[7u8; 3000][..]).read_to_end(&mut out).unwrap();
        let other = bytes.clone();
        other.add(24);
        assert_eq!((out.len(), bytes.count()), (3000, 3024));
    }

    #[test]
    fn sizes_for_people() {
        assert_eq!(human_size(512), "512 B");
        assert_eq!(human_size(1536), "1.5 KiB");
        assert_eq!(human_size(3 << 30), "3.0 GiB");
    }
}
