//! kiln: stateless bare-metal provisioning.
//!
//! Sources (OCI images, rootfs trees) become reproducible boot bundles in a content-addressed
//! store; the rest of kiln serves them. Each part owns one module; the CLI in [`cli`] is a thin
//! layer over them.

pub mod appliance;
pub mod archive;
pub mod build;
pub mod bundle;
pub mod cli;
pub mod image;
pub mod ipxe;
pub mod recipe;
pub mod serve;
pub mod store;
pub mod util;
