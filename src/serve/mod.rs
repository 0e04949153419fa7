//! `kiln serve`: the boot server. DHCP, TFTP and HTTP in one process, sharing one state.

pub mod dhcp;
pub mod state;
pub mod tftp;
