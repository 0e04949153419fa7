//! `kiln serve`: the boot server. DHCP, TFTP and HTTP in one process, sharing one state.

pub mod config;
pub mod dhcp;
mod dhcp_glue;
pub mod http;
pub mod limits;
pub mod nodes;
pub mod overlay;
pub mod run;
pub mod site;
pub mod state;
pub mod tftp;
