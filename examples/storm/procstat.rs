//! What server processes spent, read from /proc: CPU seconds (utime + stime of `/proc/PID/stat`, with the cutime +
//! cstime of children already reaped), peak resident memory (`VmHWM` of `/proc/PID/status`), threads and open files,
//! summed over the processes named and all their descendants (nginx's workers, for instance); and the UDP drop
//! counters of a network namespace (`/proc/PID/net/snmp` is the namespace of PID).

use std::collections::HashMap;

/// `USER_HZ`: the unit of the times in /proc/PID/stat, 100 on every Linux architecture kiln runs on.
const TICKS_PER_SEC: f64 = 100.0;

/// One reading of a process tree.
#[derive(Debug, Default, Clone)]
pub struct Reading {
    /// CPU ticks per process.
    pub cpu: HashMap<u32, u64>,
    pub hwm_kib: u64,
    pub threads: u64,
    pub open_files: u64,
    pub processes: usize,
}

/// `(ppid, cpu ticks)` from `/proc/PID/stat`. The command name may hold spaces and parentheses: fields count from
/// the last `)`.
fn stat(pid: u32) -> Option<(u32, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state(0) ppid(1) … utime(11) stime(12) cutime(13) cstime(14).
    let ppid = f.get(1)?.parse().ok()?;
    let ticks = f.get(11..15)?.iter().map(|v| v.parse::<u64>().unwrap_or(0)).sum();
    Some((ppid, ticks))
}

fn status_field(pid: u32, field: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim_start_matches(':').split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// `roots` and every process descending from them.
pub fn tree(roots: &[u32]) -> Vec<u32> {
    let mut parent = HashMap::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for entry in dir.flatten() {
            if let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) {
                if let Some((ppid, _)) = stat(pid) {
                    parent.insert(pid, ppid);
                }
            }
        }
    }
    let mut out: Vec<u32> = roots.iter().copied().filter(|p| parent.contains_key(p)).collect();
    // Parents before children is not guaranteed by pid order: repeat until nothing is added (depth-bounded).
    for _ in 0..16 {
        let before = out.len();
        for (&pid, &ppid) in &parent {
            if out.contains(&ppid) && !out.contains(&pid) {
                out.push(pid);
            }
        }
        if out.len() == before {
            break;
        }
    }
    out
}

pub fn read(roots: &[u32]) -> Reading {
    let mut r = Reading::default();
    for pid in tree(roots) {
        if let Some((_, ticks)) = stat(pid) {
            r.cpu.insert(pid, ticks);
            r.hwm_kib += status_field(pid, "VmHWM");
            r.threads += status_field(pid, "Threads");
            r.open_files += std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count() as u64).unwrap_or(0);
            r.processes += 1;
        }
    }
    r
}

/// CPU seconds spent between two readings (a process new in `end` counts from zero).
pub fn cpu_secs(start: &Reading, end: &Reading) -> f64 {
    let ticks: u64 = end.cpu.iter().map(|(pid, t)| t.saturating_sub(start.cpu.get(pid).copied().unwrap_or(0))).sum();
    ticks as f64 / TICKS_PER_SEC
}

/// This process's CPU seconds so far and peak RSS in KiB.
pub fn own() -> (f64, u64) {
    let pid = std::process::id();
    let ticks = stat(pid).map(|(_, t)| t).unwrap_or(0);
    (ticks as f64 / TICKS_PER_SEC, status_field(pid, "VmHWM"))
}

/// The soft limit on open files, from /proc/self/limits.
pub fn open_files_limit() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..].split_whitespace().next()?.parse().ok()
}

/// UDP datagrams received and those dropped because a socket's receive buffer was full (`RcvbufErrors`), in the
/// network namespace of `pid` (`self` for this process).
pub fn udp_drops(pid: &str) -> Option<(u64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/net/snmp")).ok()?;
    let mut rows = text.lines().filter(|l| l.starts_with("Udp:"));
    let names: Vec<&str> = rows.next()?.split_whitespace().collect();
    let values: Vec<&str> = rows.next()?.split_whitespace().collect();
    let get = |name: &str| values.get(names.iter().position(|n| *n == name)?)?.parse().ok();
    Some((get("InDatagrams")?, get("RcvbufErrors")?))
}
