//! `kiln serve`: the boot server. DHCP, TFTP and HTTP in one process, sharing one state.
//!
//! - [`site`]: what is served, resolved from the recipe and the store (nodes, verified bundles, firmware files
//!   from [`firmware`], overlays from [`overlay`], per-node iPXE scripts); rebuilt whole on reload;
//! - [`dhcp`], [`tftp`], [`http`]: the three protocols, each with pure decisions and a thin socket loop;
//! - [`loader`]: the steps two-stage loaders report over HTTP;
//! - [`state`]: leases, discovered machines and boot events on disk; [`control`]: the socket other kiln
//!   commands ask while the server holds that state;
//! - [`status`]: what each node is doing (off, booting, up, lost), from its boot events and the heartbeats of
//!   its agent ([`heartbeat`]); [`metrics`] (`/metrics`) and [`page`] (`/`) show it;
//! - [`mod@run`]: starts everything, reloads on SIGHUP, keeps the boot log.

pub mod bootlog;
pub mod control;
pub mod dhcp;
mod dhcp_glue;
pub mod firmware;
pub mod heartbeat;
pub mod http;
pub mod limits;
pub mod loader;
pub mod metrics;
pub mod overlay;
pub mod page;
pub mod run;
pub mod site;
pub mod state;
pub mod status;
pub mod tftp;

use std::path::{Path, PathBuf};

use crate::recipe::ServerRecipe;

pub use run::{run, ServeOptions};

/// Where a server keeps its state: `given` (`--state-dir`), else the recipe's `[server] state_dir`, else
/// `<store>/state`. `kiln serve` and the commands that read its state choose it the same way.
pub fn state_dir(given: Option<&Path>, server: Option<&ServerRecipe>, store_root: &Path) -> PathBuf {
    given
        .map(Path::to_path_buf)
        .or_else(|| server.and_then(|s| s.state_dir.clone()))
        .unwrap_or_else(|| store_root.join("state"))
}
