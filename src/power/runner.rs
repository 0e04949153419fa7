//! Runs one job per node on a bounded number of threads at once, and measures how many really ran together.
//!
//! Plain threads, not async: each job is a few blocking HTTP requests or one ipmitool process, and the bound
//! (tens of BMCs) is far below where threads cost anything.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A job's result with when it started (from the start of the run) and how long it took.
#[derive(Debug)]
pub struct Timed<R> {
    pub result: R,
    pub started: Duration,
    pub elapsed: Duration,
}

/// What a run gives: each item's result in the items' order, and the most jobs that ran at once.
#[derive(Debug)]
pub struct RunResults<R> {
    pub results: Vec<Timed<R>>,
    pub peak: usize,
    pub total: Duration,
}

/// Calls `job` for every item, at most `limit` at once (at least 1).
pub fn run_bounded<T: Sync, R: Send>(items: &[T], limit: usize, job: impl Fn(&T) -> R + Sync) -> RunResults<R> {
    let start = Instant::now();
    let next = AtomicUsize::new(0);
    let running = AtomicUsize::new(0);
    let peak = AtomicUsize::new(0);
    let slots: Mutex<Vec<Option<Timed<R>>>> = Mutex::new((0..items.len()).map(|_| None).collect());
    let workers = limit.max(1).min(items.len());
    std::thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(item) = items.get(i) else { break };
                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                peak.fetch_max(now, Ordering::SeqCst);
                let started = start.elapsed();
                let result = job(item);
                let elapsed = start.elapsed() - started;
                running.fetch_sub(1, Ordering::SeqCst);
                slots.lock().unwrap_or_else(|e| e.into_inner())[i] = Some(Timed { result, started, elapsed });
            });
        }
    });
    let results = slots
        .into_inner()
        .unwrap_or_else(|e| e.into_inner())
        .into_iter()
        .map(|r| r.expect("every item ran: workers stop only when none is left"))
        .collect();
    RunResults { results, peak: peak.load(Ordering::SeqCst), total: start.elapsed() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_most_limit_at_once_and_in_order() {
        let items: Vec<u64> = (0..12).collect();
        let r = run_bounded(&items, 4, |&i| {
            std::thread::sleep(Duration::from_millis(20));
            i * 2
        });
        assert_eq!(r.results.iter().map(|t| t.result).collect::<Vec<_>>(), (0..12).map(|i| i * 2).collect::<Vec<_>>());
        assert!(r.peak >= 2 && r.peak <= 4, "peak {}", r.peak);
        assert!(run_bounded(&[] as &[u8], 4, |_| ()).results.is_empty());
    }
}
