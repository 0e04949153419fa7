//! Kernel modules from the loader's initramfs: the index kiln build wrote (`/kiln/modules.txt`: each module's
//! dependencies and aliases, read from its `.modinfo`), loading by name with dependencies first, and loading
//! the drivers of the devices present, matched by their `modalias` as udev would.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use super::sys;
use super::Result;

pub const INDEX: &str = "/kiln/modules.txt";
pub const DIR: &str = "/kiln/modules";

#[derive(Debug, Default)]
pub struct Modules {
    deps: BTreeMap<String, Vec<String>>,
    aliases: Vec<(String, String)>,
    loaded: BTreeSet<String>,
}

impl Modules {
    pub fn load_index(path: &str) -> Result<Modules> {
        let text = fs::read_to_string(path).map_err(|e| format!("reading {path}: {e}"))?;
        Ok(Modules::parse(&text))
    }

    pub fn parse(text: &str) -> Modules {
        let mut m = Modules::default();
        for line in text.lines() {
            let mut w = line.split_whitespace();
            match (w.next(), w.next(), w.next()) {
                (Some("module"), Some(name), Some(deps)) => {
                    let deps = if deps == "-" { Vec::new() } else { deps.split(',').map(String::from).collect() };
                    m.deps.insert(name.to_string(), deps);
                }
                (Some("alias"), Some(pattern), Some(name)) => m.aliases.push((pattern.to_string(), name.to_string())),
                _ => {}
            }
        }
        m
    }

    /// Loads `name` after what it depends on; a module the index does not list is taken as built in.
    pub fn load(&mut self, name: &str) -> Result<()> {
        let mut stack = vec![(name.to_string(), false)];
        let mut seen = BTreeSet::new();
        while let Some((m, deps_done)) = stack.pop() {
            if self.loaded.contains(&m) || !self.deps.contains_key(&m) {
                continue;
            }
            if deps_done {
                sys::load_module(&Path::new(DIR).join(format!("{m}.ko")))?;
                self.loaded.insert(m);
                continue;
            }
            if !seen.insert(m.clone()) {
                continue;
            }
            stack.push((m.clone(), true));
            for d in self.deps[&m].iter().rev() {
                stack.push((d.clone(), false));
            }
        }
        Ok(())
    }

    /// The modules whose aliases match one of `modaliases` and that are not loaded yet.
    pub fn matching(&self, modaliases: &BTreeSet<String>) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        for (pattern, name) in &self.aliases {
            if self.loaded.contains(name) || out.contains(name) {
                continue;
            }
            if modaliases.iter().any(|a| glob(pattern.as_bytes(), a.as_bytes())) {
                out.insert(name.clone());
            }
        }
        out
    }

    /// Loads the drivers of the devices present, round after round (a driver may add devices, as virtio-pci
    /// adds virtio devices), until a round finds nothing new or `timeout` passes. Failures are printed and
    /// the round goes on: one broken driver must not keep the others out.
    pub fn load_for_devices(&mut self, timeout: Duration) -> Vec<String> {
        let deadline = Instant::now() + timeout;
        let mut loaded = Vec::new();
        let mut seen = modaliases();
        loop {
            let todo = self.matching(&seen);
            if todo.is_empty() {
                return loaded;
            }
            for m in todo {
                if let Err(e) = self.load(&m) {
                    println!("kiln-loader: {e}");
                    // Do not try it again.
                    self.loaded.insert(m.clone());
                }
                loaded.push(m);
            }
            // Drivers add devices as they probe (virtio-pci adds the virtio devices): wait up to a second for
            // the list to change.
            let settle = (Instant::now() + Duration::from_secs(1)).min(deadline);
            loop {
                std::thread::sleep(Duration::from_millis(50));
                let now = modaliases();
                if now != seen {
                    seen = now;
                    break;
                }
                if Instant::now() >= settle {
                    break;
                }
            }
            if Instant::now() >= deadline {
                return loaded;
            }
        }
    }
}

/// Every device's `modalias` under /sys/bus.
pub fn modaliases() -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let Ok(buses) = fs::read_dir("/sys/bus") else { return out };
    for bus in buses.flatten() {
        let Ok(devices) = fs::read_dir(bus.path().join("devices")) else { continue };
        for d in devices.flatten() {
            if let Ok(a) = fs::read_to_string(d.path().join("modalias")) {
                let a = a.trim();
                if !a.is_empty() {
                    out.insert(a.to_string());
                }
            }
        }
    }
    out
}

/// fnmatch(3) without flags, as modules.alias patterns use it: `*`, `?` and `[...]` (with ranges and `!`).
pub fn glob(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pattern.len() {
            match pattern[p] {
                b'*' => {
                    star = Some((p, t));
                    p += 1;
                    continue;
                }
                b'?' => {
                    p += 1;
                    t += 1;
                    continue;
                }
                b'[' => {
                    if let Some((matched, next)) = class(&pattern[p..], text[t]) {
                        if matched {
                            p += next;
                            t += 1;
                            continue;
                        }
                    } else if text[t] == b'[' {
                        p += 1;
                        t += 1;
                        continue;
                    }
                }
                c if c == text[t] => {
                    p += 1;
                    t += 1;
                    continue;
                }
                _ => {}
            }
        }
        match star {
            Some((sp, st)) => {
                p = sp + 1;
                t = st + 1;
                star = Some((sp, st + 1));
            }
            None => return false,
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

/// Matches `c` against the bracket expression at the start of `pat`: (matched, length of the expression), or
/// None when it is not a complete expression.
fn class(pat: &[u8], c: u8) -> Option<(bool, usize)> {
    let mut i = 1;
    let negate = matches!(pat.get(i), Some(b'!') | Some(b'^'));
    if negate {
        i += 1;
    }
    let mut matched = false;
    let mut first = true;
    while i < pat.len() {
        if pat[i] == b']' && !first {
            return Some((matched != negate, i + 1));
        }
        first = false;
        if i + 2 < pat.len() && pat[i + 1] == b'-' && pat[i + 2] != b']' {
            if (pat[i]..=pat[i + 2]).contains(&c) {
                matched = true;
            }
            i += 3;
        } else {
            if pat[i] == c {
                matched = true;
            }
            i += 1;
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_like_fnmatch() {
        let virtio = b"pci:v00001AF4d00001041sv00001AF4sd00001100bc02sc00i00";
        assert!(glob(b"pci:v00001AF4d*sv*sd*bc*sc*i*", virtio));
        assert!(!glob(b"pci:v00008086d*sv*sd*bc*sc*i*", virtio));
        assert!(glob(b"virtio:d00000001v*", b"virtio:d00000001v00001AF4"));
        assert!(!glob(b"virtio:d00000001v*", b"virtio:d00000002v00001AF4"));
        assert!(glob(b"acpi*:PNP0C0[12]:*", b"acpi:PNP0C02:"));
        assert!(!glob(b"acpi*:PNP0C0[12]:*", b"acpi:PNP0C03:"));
        assert!(glob(b"a[!x]c", b"abc") && !glob(b"a[!b]c", b"abc"));
        assert!(glob(b"a?c", b"abc") && !glob(b"a?c", b"ac"));
        assert!(glob(b"*", b"") && glob(b"**x", b"yyx"));
    }

    #[test]
    fn the_index_gives_dependencies_and_aliases() {
        let m = Modules::parse(
            "# comment\nmodule virtio_net net_failover,virtio\nmodule net_failover failover\nmodule failover -\n\
             module virtio -\nalias virtio:d00000001v* virtio_net\n",
        );
        assert!(m.deps.contains_key("virtio_net") && !m.deps.contains_key("e1000"));
        assert_eq!(m.deps["virtio_net"], vec!["net_failover", "virtio"]);
        let found = m.matching(&["virtio:d00000001v00001AF4".to_string()].into_iter().collect());
        assert_eq!(found.into_iter().collect::<Vec<_>>(), vec!["virtio_net"]);
    }
}
