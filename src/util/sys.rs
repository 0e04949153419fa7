//! Facts about the machine and the user kiln runs as, and where kiln's own files are.

use std::path::PathBuf;

use anyhow::{bail, Result};

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

/// Where packages install `kiln-node`.
pub const NODE_BINARY_INSTALLED: &str = "/usr/lib/kiln/kiln-node";

/// `kiln-node`, the static binary kiln puts on the nodes it boots: `$KILN_NODE`, else beside the running kiln,
/// else where packages install it. The error says how to get one.
pub fn node_binary() -> Result<PathBuf> {
    let mut looked = Vec::new();
    if let Some(p) = std::env::var_os("KILN_NODE").filter(|v| !v.is_empty()).map(PathBuf::from) {
        if p.is_file() {
            return Ok(p);
        }
        bail!(
            "KILN_NODE={} is not a file: point it at kiln-node (scripts/build-node.sh prints where it built it)",
            p.display()
        );
    }
    if let Some(dir) = std::env::current_exe().ok().and_then(|e| e.parent().map(|d| d.to_path_buf())) {
        looked.push(dir.join("kiln-node"));
    }
    looked.push(PathBuf::from(NODE_BINARY_INSTALLED));
    if let Some(p) = looked.iter().find(|p| p.is_file()) {
        return Ok(p.clone());
    }
    let shown: Vec<String> = looked.iter().map(|p| p.display().to_string()).collect();
    bail!(
        "kiln-node (the program kiln puts on nodes) not found in {}: install the kiln package, or build it with \
         scripts/build-node.sh and set KILN_NODE to the path it prints",
        shown.join(", ")
    )
}
