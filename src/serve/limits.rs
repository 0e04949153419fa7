//! The limits `kiln serve` enforces (transfers at once, queued boot events, …) and what they turned away: each
//! [`Limit`] counts its refusals from any thread, [`Limits::report_every`] prints at most one line per limit and
//! interval, and [`Limits::snapshot`] gives the totals to whatever exports metrics.
//!
//! A limit hit under load (a boot storm, a hostile client) refuses thousands of requests a second; one log line per
//! refusal would cost more than the request and bury everything else, and no line at all would leave an
//! administrator guessing why machines wait. So refusals are counted, and summed up per interval:
//!
//! ```text
//! kiln serve: limit tftp_max_per_client (8) hit: 1,992 requests refused in the last 10 s
//! ```

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The limits of one server, by name. Clones share the same limits and counters.
#[derive(Debug, Clone, Default)]
pub struct Limits {
    by_name: Arc<Mutex<BTreeMap<&'static str, Arc<Limit>>>>,
}

/// One limit: its name (the setting an administrator would change, e.g. `tftp_max_per_client`), its current
/// value and how many requests it refused since the server started.
#[derive(Debug)]
pub struct Limit {
    name: &'static str,
    /// What one refusal turned away, in the plural, for the report: "requests refused", "boot events dropped".
    refused_what: &'static str,
    value: AtomicU64,
    refused: AtomicU64,
    /// `refused` when the last report line for this limit was made.
    reported: AtomicU64,
}

impl Limit {
    /// Counts one refusal. Lock-free: called on the hot path, once per refused packet.
    pub fn refuse(&self) {
        self.refused.fetch_add(1, Ordering::Relaxed);
    }

    /// Refusals since the server started.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    pub fn name(&self) -> &'static str {
        self.name
    }

    pub fn value(&self) -> u64 {
        self.value.load(Ordering::Relaxed)
    }

    /// Records a new value of the limit (after a reload), for the report.
    pub fn set_value(&self, value: u64) {
        self.value.store(value, Ordering::Relaxed);
    }
}

impl Limits {
    /// The limit called `name`, registered on first use with `value` and a description of what it refuses
    /// ("requests refused"); later calls return the same limit with `value` as its current value.
    pub fn limit(&self, name: &'static str, value: u64, refused_what: &'static str) -> Arc<Limit> {
        let mut by_name = self.by_name.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let limit = by_name.entry(name).or_insert_with(|| {
            Arc::new(Limit {
                name,
                refused_what,
                value: AtomicU64::new(value),
                refused: AtomicU64::new(0),
                reported: AtomicU64::new(0),
            })
        });
        limit.set_value(value);
        limit.clone()
    }

    /// Every limit's total refusals since the server started, by name (limits never hit included, at 0).
    pub fn snapshot(&self) -> BTreeMap<&'static str, u64> {
        self.all().iter().map(|limit| (limit.name, limit.refused())).collect()
    }

    /// One line for each limit that refused anything since the previous call, counting what it refused since then
    /// (`interval` is only how the line names that period).
    pub fn report(&self, interval: Duration) -> Vec<String> {
        let mut lines = Vec::new();
        for limit in self.all() {
            let total = limit.refused();
            let before = limit.reported.swap(total, Ordering::Relaxed);
            if total > before {
                lines.push(format!(
                    "kiln serve: limit {} ({}) hit: {} {} in the last {}",
                    limit.name,
                    grouped(limit.value()),
                    grouped(total - before),
                    limit.refused_what,
                    seconds(interval)
                ));
            }
        }
        lines
    }

    /// Every `interval`, hands each line of [`Limits::report`] to `print`, until `stop` completes. A limit hit
    /// continuously gives one line per interval; a quiet one gives none.
    pub async fn report_every(
        self,
        interval: Duration,
        mut print: impl FnMut(&str) + Send,
        stop: impl Future<Output = ()> + Send,
    ) {
        let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(stop);
        loop {
            tokio::select! {
                _ = &mut stop => return,
                _ = ticks.tick() => {
                    for line in self.report(interval) {
                        print(&line);
                    }
                }
            }
        }
    }

    fn all(&self) -> Vec<Arc<Limit>> {
        self.by_name.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).values().cloned().collect()
    }
}

/// `1992` as `1,992`: report lines are read by people, often at a glance.
fn grouped(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, digit) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(digit);
    }
    out
}

fn seconds(interval: Duration) -> String {
    if interval.subsec_millis() == 0 {
        format!("{} s", interval.as_secs())
    } else {
        format!("{:.1} s", interval.as_secs_f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_grouped_by_thousands() {
        let cases = [(0, "0"), (8, "8"), (999, "999"), (1000, "1,000"), (1992, "1,992"), (123456789, "123,456,789")];
        for (n, text) in cases {
            assert_eq!(grouped(n), text);
        }
        assert_eq!(seconds(Duration::from_secs(10)), "10 s");
        assert_eq!(seconds(Duration::from_millis(1500)), "1.5 s");
    }

    #[test]
    fn one_line_per_limit_hit_since_the_last_report() {
        let limits = Limits::default();
        let per_client = limits.limit("tftp_max_per_client", 8, "requests refused");
        let total = limits.limit("tftp_max_transfers", 512, "requests refused");
        assert!(limits.report(Duration::from_secs(10)).is_empty());
        for _ in 0..1992 {
            per_client.refuse();
        }
        assert_eq!(
            limits.report(Duration::from_secs(10)),
            ["kiln serve: limit tftp_max_per_client (8) hit: 1,992 requests refused in the last 10 s"]
        );
        // Nothing new, nothing said; then only the limit that was hit again, with what it refused since.
        assert!(limits.report(Duration::from_secs(10)).is_empty());
        per_client.refuse();
        total.refuse();
        total.refuse();
        assert_eq!(
            limits.report(Duration::from_secs(10)),
            [
                "kiln serve: limit tftp_max_per_client (8) hit: 1 requests refused in the last 10 s",
                "kiln serve: limit tftp_max_transfers (512) hit: 2 requests refused in the last 10 s",
            ]
        );
        assert_eq!(limits.snapshot(), BTreeMap::from([("tftp_max_per_client", 1993), ("tftp_max_transfers", 2)]));
    }

    #[test]
    fn a_limit_is_shared_and_keeps_its_count_across_new_values() {
        let limits = Limits::default();
        let first = limits.limit("tftp_max_transfers", 512, "requests refused");
        first.refuse();
        // A reload registers the same name with a new value: the counter carries on, the line shows the new value.
        let again = limits.clone().limit("tftp_max_transfers", 64, "requests refused");
        again.refuse();
        assert_eq!((first.refused(), first.value()), (2, 64));
        assert_eq!(
            limits.report(Duration::from_secs(10)),
            ["kiln serve: limit tftp_max_transfers (64) hit: 2 requests refused in the last 10 s"]
        );
        assert_eq!(limits.snapshot(), BTreeMap::from([("tftp_max_transfers", 2)]));
    }

    #[test]
    fn counts_from_many_threads() {
        let limits = Limits::default();
        let limit = limits.limit("tftp_events", 1024, "boot events dropped");
        std::thread::scope(|scope| {
            for _ in 0..4 {
                scope.spawn(|| (0..10_000).for_each(|_| limit.refuse()));
            }
        });
        assert_eq!(limits.snapshot()["tftp_events"], 40_000);
    }

    type Line = (tokio::time::Instant, String);

    async fn next_line(lines: &mut tokio::sync::mpsc::UnboundedReceiver<Line>) -> Line {
        tokio::time::timeout(Duration::from_secs(5), lines.recv()).await.expect("no report line in 5 s").unwrap()
    }

    #[tokio::test]
    async fn the_reporter_prints_at_most_once_per_interval() {
        let interval = Duration::from_millis(200);
        let limits = Limits::default();
        let limit = limits.limit("tftp_max_per_client", 8, "requests refused");
        let (lines_tx, mut lines) = tokio::sync::mpsc::unbounded_channel::<Line>();
        let (stop_tx, stop) = tokio::sync::oneshot::channel::<()>();
        let reporter = tokio::spawn(limits.clone().report_every(
            interval,
            move |line| {
                let _ = lines_tx.send((tokio::time::Instant::now(), line.to_string()));
            },
            async move {
                let _ = stop.await;
            },
        ));
        (0..1500).for_each(|_| limit.refuse());
        let (first_at, first) = next_line(&mut lines).await;
        assert_eq!(first, "kiln serve: limit tftp_max_per_client (8) hit: 1,500 requests refused in the last 0.2 s");
        // Refusals right after a line wait for the next tick, and come as one line.
        (0..40).for_each(|_| limit.refuse());
        (0..2).for_each(|_| limit.refuse());
        let (second_at, second) = next_line(&mut lines).await;
        assert_eq!(second, "kiln serve: limit tftp_max_per_client (8) hit: 42 requests refused in the last 0.2 s");
        assert!(second_at - first_at >= interval * 9 / 10, "two lines {:?} apart", second_at - first_at);
        stop_tx.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(5), reporter).await.expect("reporter did not stop").unwrap();
    }
}
