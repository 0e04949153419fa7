//! The command line: every clap type, one file per subcommand ([`build`], [`store`], [`serve`], [`node`],
//! [`build_ipxe`], [`appliance`], [`push`], [`pull`], [`export`], [`import`], [`power`]), each calling its part
//! with plain options and printing the result (for people, or `--json`); [`completions`] and [`man`] describe
//! the command line itself. Nothing here knows how the work is done.

// clap shows these doc comments as help text, where `[server]` names a table of kiln.toml, not a Rust item.
#![allow(rustdoc::broken_intra_doc_links, rustdoc::invalid_html_tags, rustdoc::bare_urls)]

pub mod appliance;
pub mod build;
pub mod build_ipxe;
pub mod completions;
pub mod export;
pub mod import;
pub mod man;
pub mod node;
pub mod power;
pub mod pull;
pub mod push;
pub mod serve;
pub mod store;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};

use crate::store::Store;

/// kiln: stateless bare-metal provisioning. Builds reproducible boot bundles from OCI images,
/// builds iPXE, and serves nodes that boot from RAM.
#[derive(Parser, Debug)]
#[command(name = "kiln", version, max_term_width = 100)]
pub struct Cli {
    /// Print nothing but results and errors (no progress).
    #[arg(short, long, global = true)]
    pub quiet: bool,
    /// More log output (-v: info, -vv: debug). KILN_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Build boot bundles (kernel + initramfs + image + manifest) into the store.
    ///
    /// With --from and --name, builds that one image. Otherwise builds every [image.NAME] of
    /// the recipe (./kiln.toml by default), pinning registry tags in kiln.lock beside it.
    /// Prints each bundle's store path. Example:
    ///
    ///   kiln build --from oci-archive:rocky9.tar --name compute
    Build(Box<build::BuildArgs>),
    /// Inspect and maintain the store.
    #[command(subcommand)]
    Store(store::StoreCommand),
    /// Run the boot server: DHCP, TFTP and HTTP for the nodes of the recipe.
    ///
    /// Serves the bundles built by `kiln build` and the iPXE binaries of `kiln build-ipxe`
    /// named by the recipe's [server] table. SIGHUP reloads the recipe; SIGTERM stops. Example:
    ///
    ///   kiln serve --dhcp proxy --interface eno1
    Serve(serve::ServeArgs),
    /// Build iPXE from source into the store (reproducibly, cached by its inputs).
    ///
    /// Builds bin-x86_64-efi/snponly.efi, bin-x86_64-pcbios/undionly.kpxe and
    /// bin-arm64-efi/snponly.efi by default, from upstream iPXE at a commit pinned in kiln, with
    /// VLAN commands, serial and framebuffer consoles and gzip/zlib images on. With kiln.toml's
    /// [ipxe.NAME] tables and no build flags, builds those. Prints the store path; --dest also
    /// copies the binaries under Warewulf's names. Examples:
    ///
    ///   kiln build-ipxe --vlan 1000 --dest /srv/tftp
    ///
    ///   kiln build-ipxe --source ~/src/ipxe --embed site.ipxe --option DOWNLOAD_PROTO_HTTPS
    BuildIpxe(Box<build_ipxe::BuildIpxeArgs>),
    /// List and edit the nodes of the recipe, and the unknown machines that asked to boot.
    #[command(subcommand)]
    Node(Box<node::NodeCommand>),
    /// Build a bootable hybrid ISO (BIOS + UEFI, CD or USB) that runs `kiln serve`.
    ///
    /// Builds the [appliance] image and the images the nodes boot, then an ISO that boots the
    /// appliance image and serves the recipe's nodes from the [server] address. Prints the
    /// ISO's store path. Example:
    ///
    ///   kiln appliance --out kiln.iso
    Appliance(Box<appliance::ApplianceArgs>),
    /// Push the recipe's outputs to an OCI registry (or OCI layout), one artifact per output.
    ///
    /// Each output is tagged by its store path's name (the same inputs give the same tag) and
    /// KIND-NAME-latest. What the registry holds is not sent again. Credentials as podman's
    /// (--authfile, else the containers auth file). Example:
    ///
    ///   kiln push docker://registry.site/kiln compute
    Push(Box<push::PushArgs>),
    /// Fill the store with the recipe's outputs from a registry, building nothing.
    ///
    /// Bundles are fetched by the hash kiln.toml and kiln.lock give them and verified against it;
    /// iPXE builds by their -latest tag. Example:
    ///
    ///   kiln pull docker://registry.site/kiln
    Pull(Box<pull::PullArgs>),
    /// Write one archive holding everything the recipe's site serves, for an air-gapped site.
    ///
    /// The bundles nodes and the appliance use, the [server] ipxe build, the boot files the recipe
    /// names, kiln.toml and kiln.lock, as a tar of an OCI image layout. Example:
    ///
    ///   kiln export site-a.kiln
    Export(Box<export::ExportArgs>),
    /// Verify an archive from `kiln export` and add it to the store.
    ///
    /// Everything is checked before anything lands; a damaged archive changes nothing. Writes the
    /// site's kiln.toml and kiln.lock (--to, default: here), ready for `kiln serve`. Example:
    ///
    ///   kiln import site-a.kiln --to /etc/kiln
    Import(Box<import::ImportArgs>),
    /// Power nodes on, off, cycle, reset or soft-off through their BMCs (Redfish or IPMI), or show their state.
    ///
    /// Contacts a bounded number of BMCs at once; prints one line per node (or --json) and exits non-zero when
    /// any failed. The BMC is the node's `bmc = { ... }` in kiln.toml (docs/power.md). Examples:
    ///
    ///   kiln power status --all
    ///
    ///   kiln power cycle --tag rack3 --pxe
    Power(Box<power::PowerArgs>),
    /// Print a shell completion script (bash, zsh or fish) on stdout.
    ///
    /// The Debian package installs all three. To load them by hand:
    ///
    ///   source <(kiln completions bash)
    ///
    ///   kiln completions fish > ~/.config/fish/completions/kiln.fish
    Completions(completions::CompletionsArgs),
    /// Print a manual page (roff) on stdout, or write every page into a directory.
    ///
    /// The Debian package installs them (`man kiln-serve`). Examples:
    ///
    ///   kiln man serve | man -l -
    ///
    ///   kiln man --out-dir /usr/local/share/man/man1
    Man(man::ManArgs),
}

#[derive(Args, Debug, Clone)]
pub struct RegistryArgs {
    /// Verify registry TLS certificates (--tls-verify=false for a local plain-HTTP registry).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub tls_verify: bool,
    /// Registry credentials file (containers auth.json format). Default: where podman and skopeo look.
    #[arg(long)]
    pub authfile: Option<PathBuf>,
}

impl RegistryArgs {
    pub fn options(&self) -> crate::image::RegistryOptions {
        crate::image::RegistryOptions { tls_verify: self.tls_verify, authfile: self.authfile.clone() }
    }
}

#[derive(Args, Debug, Clone)]
pub struct StoreArg {
    /// Store root. By default: /var/lib/kiln for root, else $XDG_DATA_HOME/kiln.
    #[arg(long, env = "KILN_STORE", global = true)]
    pub store: Option<PathBuf>,
}

impl StoreArg {
    /// The store's directory: `--store`, `KILN_STORE`, else the default.
    pub fn root(&self) -> PathBuf {
        self.store.clone().unwrap_or_else(crate::store::default_root)
    }

    pub fn open(&self) -> Result<Store> {
        Store::open(&self.root())
    }
}

pub fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Build(args) => build::run(*args),
        Command::Store(cmd) => store::run(cmd),
        Command::Serve(args) => serve::run(args),
        Command::Node(cmd) => node::run(*cmd),
        Command::BuildIpxe(args) => build_ipxe::run(*args),
        Command::Appliance(args) => appliance::run(*args),
        Command::Push(args) => push::run(*args),
        Command::Pull(args) => pull::run(*args),
        Command::Export(args) => export::run(*args),
        Command::Import(args) => import::run(*args),
        Command::Power(args) => power::run(*args),
        Command::Completions(args) => completions::run(args),
        Command::Man(args) => man::run(args),
    }
}
