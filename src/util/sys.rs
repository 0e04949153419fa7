//! Facts about the machine and the user kiln runs as.

/// Whether kiln runs as root (effective user 0).
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Number of worker threads: `KILN_THREADS`, else `RAYON_NUM_THREADS`, else the machine's cores.
/// Outputs never depend on it; only speed does.
pub fn thread_count() -> usize {
    for var in ["KILN_THREADS", "RAYON_NUM_THREADS"] {
        if let Some(n) = std::env::var(var).ok().and_then(|v| v.parse::<usize>().ok()) {
            if n > 0 {
                return n;
            }
        }
    }
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}
