//! `kiln serve`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Args;

use super::StoreArg;
use crate::recipe::DhcpMode;
use crate::serve::{self, ServeOptions};

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Recipe file.
    #[arg(long, short = 'f', default_value = "kiln.toml")]
    pub recipe: PathBuf,
    #[command(flatten)]
    pub store: StoreArg,
    /// DHCP mode: full, proxy or off (overrides [server] dhcp).
    #[arg(long)]
    pub dhcp: Option<String>,
    /// Interface to serve DHCP on (overrides [server] interface).
    #[arg(long)]
    pub interface: Option<String>,
    /// HTTP port (default: [server] http_port, else 80).
    #[arg(long)]
    pub http_port: Option<u16>,
    /// TFTP port (default 69).
    #[arg(long)]
    pub tftp_port: Option<u16>,
    /// DHCP port (default 67; proxy mode also uses 4011).
    #[arg(long)]
    pub dhcp_port: Option<u16>,
    /// Where leases, discovered machines and boot events are kept (default: <store>/state).
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
}

/// `kiln serve`.
pub fn run(args: ServeArgs) -> Result<ExitCode> {
    let dhcp = args.dhcp.as_deref().map(str::parse::<DhcpMode>).transpose().context("--dhcp")?;
    serve::run(ServeOptions {
        store_root: args.store.root(),
        recipe: args.recipe,
        dhcp,
        interface: args.interface,
        http_port: args.http_port,
        tftp_port: args.tftp_port,
        dhcp_port: args.dhcp_port,
        state_dir: args.state_dir,
    })
}
