//! kiln: stateless bare-metal provisioning.
//!
//! Sources (OCI images, rootfs trees) become reproducible boot bundles in a content-addressed
//! store; the rest of kiln serves them. Each part owns one module and imports only the parts below
//! it (docs/architecture.md has the map):
//!
//! [`util`], [`net`] (shared pieces) → [`recipe`] (kiln.toml and kiln.lock as plain types) →
//! [`image`], [`archive`] → [`bundle`] → [`store`] → [`distribute`] → [`build`], [`ipxe`] → [`serve`] →
//! [`appliance`] → [`cli`] (clap types and printing) → `main`. [`power`] (node power and consoles through their
//! BMCs) reads only the recipe and [`util`].

pub mod appliance;
pub mod archive;
pub mod build;
pub mod bundle;
pub mod cli;
pub mod distribute;
pub mod image;
pub mod ipxe;
pub mod net;
pub mod power;
pub mod recipe;
pub mod serve;
pub mod store;
pub mod util;
