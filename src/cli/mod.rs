//! Command-line definitions and output formatting. Each subcommand parses here and calls one
//! function of its part; nothing here knows how the work is done.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};

use crate::archive::Compression;
use crate::build::{self, BuildOptions};
use crate::bundle::{BundleSpec, KernelSpec, DEFAULT_CMDLINE};
use crate::image::{FetchOptions, RegistryOptions, Source};
use crate::recipe::{check_name, LoadedRecipe};
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
    Build(Box<BuildArgs>),
    /// Inspect and maintain the store.
    #[command(subcommand)]
    Store(StoreCommand),
    /// Run the boot server: DHCP, TFTP and HTTP for the nodes of the recipe.
    ///
    /// Serves the bundles built by `kiln build` and the iPXE binaries of `kiln build-ipxe`
    /// named by the recipe's [server] table. SIGHUP reloads the recipe; SIGTERM stops. Example:
    ///
    ///   kiln serve --dhcp proxy --interface eno1
    Serve(ServeArgs),
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
    BuildIpxe(Box<crate::ipxe::BuildIpxeArgs>),
    /// List and edit the nodes of the recipe, and the unknown machines that asked to boot.
    #[command(subcommand)]
    Node(NodeCommand),
    /// Build a bootable hybrid ISO (BIOS + UEFI, CD or USB) that runs `kiln serve`.
    ///
    /// Builds the [appliance] image and the images the nodes boot, then an ISO that boots the
    /// appliance image and serves the recipe's nodes from the [server] address. Prints the
    /// ISO's store path. Example:
    ///
    ///   kiln appliance --out kiln.iso
    Appliance(Box<crate::appliance::ApplianceArgs>),
}

#[derive(Args, Debug, Clone)]
pub struct NodeFields {
    /// MAC address (52:54:00:aa:bb:42).
    #[arg(long)]
    pub mac: Option<String>,
    /// The [image.NAME] it boots.
    #[arg(long)]
    pub image: Option<String>,
    /// A [profile.NAME] to take settings from.
    #[arg(long)]
    pub profile: Option<String>,
    /// Its address, optionally with a prefix (10.4.0.42/24).
    #[arg(long)]
    pub ipv4: Option<String>,
    #[arg(long)]
    pub gateway: Option<String>,
    /// Default: the node's name.
    #[arg(long)]
    pub hostname: Option<String>,
    /// Appended to the bundle's kernel command line.
    #[arg(long)]
    pub cmdline: Option<String>,
    #[arg(long)]
    pub vlan: Option<u16>,
    /// Free-form tag (repeatable); replaces the node's tags.
    #[arg(long = "tag")]
    pub tags: Vec<String>,
}

impl NodeFields {
    fn edit(&self) -> crate::serve::nodes::NodeEdit {
        crate::serve::nodes::NodeEdit {
            mac: self.mac.clone(),
            image: self.image.clone(),
            profile: self.profile.clone(),
            ipv4: self.ipv4.clone(),
            gateway: self.gateway.clone(),
            hostname: self.hostname.clone(),
            cmdline: self.cmdline.clone(),
            vlan: self.vlan,
            tags: (!self.tags.is_empty()).then(|| self.tags.clone()),
        }
    }
}

#[derive(Subcommand, Debug)]
pub enum NodeCommand {
    /// List the nodes of the recipe (with --unknown: machines that asked to boot but are not nodes).
    Ls {
        #[arg(long, short = 'f', default_value = "kiln.toml")]
        recipe: PathBuf,
        #[command(flatten)]
        store: StoreArg,
        #[arg(long)]
        unknown: bool,
        /// Where the server keeps its state (default: [server] state_dir, else <store>/state).
        #[arg(long)]
        state_dir: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Add a [node.NAME] table to the recipe. Example: kiln node add n042 --mac 52:54:00:aa:bb:42 --image compute
    Add {
        name: String,
        #[arg(long, short = 'f', default_value = "kiln.toml")]
        recipe: PathBuf,
        #[command(flatten)]
        fields: NodeFields,
    },
    /// Change settings of a node.
    Set {
        name: String,
        #[arg(long, short = 'f', default_value = "kiln.toml")]
        recipe: PathBuf,
        #[command(flatten)]
        fields: NodeFields,
    },
    /// Show the boot log: what each machine asked for (DHCP, TFTP, script, kernel and initrds, overlay), oldest
    /// first. Reads the state directory, or asks the running `kiln serve` that holds it.
    ///
    ///   kiln node events --mac 52:54:00:aa:bb:42 --limit 20
    Events {
        #[arg(long, short = 'f', default_value = "kiln.toml")]
        recipe: PathBuf,
        #[command(flatten)]
        store: StoreArg,
        /// Only this machine's events (a MAC address, or a node name from the recipe).
        #[arg(long)]
        mac: Option<String>,
        /// How many events at most (the newest ones).
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Where the server keeps its state (default: [server] state_dir, else <store>/state).
        #[arg(long)]
        state_dir: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Remove a node from the recipe.
    Rm {
        name: String,
        #[arg(long, short = 'f', default_value = "kiln.toml")]
        recipe: PathBuf,
    },
}

#[derive(Args, Debug, Clone)]
pub struct StoreArg {
    /// Store root. By default: /var/lib/kiln for root, else $XDG_DATA_HOME/kiln.
    #[arg(long, env = "KILN_STORE", global = true)]
    pub store: Option<PathBuf>,
}

impl StoreArg {
    pub fn open(&self) -> Result<Store> {
        let root = self.store.clone().unwrap_or_else(crate::util::default_store_root);
        Store::open(&root)
    }
}

#[derive(Args, Debug)]
pub struct BuildArgs {
    /// Image to build from: docker://REF, oci:DIR[:TAG], oci-archive:FILE, docker-archive:FILE,
    /// dir:PATH or tar:FILE. Needs --name.
    #[arg(long, requires = "name")]
    pub from: Option<String>,
    /// Bundle name (with --from), or the [image.NAME] tables of the recipe to build (default: all).
    #[arg(long)]
    pub name: Vec<String>,
    /// Recipe file.
    #[arg(long, short = 'f', default_value = "kiln.toml")]
    pub recipe: PathBuf,
    #[command(flatten)]
    pub store: StoreArg,
    /// Print one JSON object per bundle: {"name","path","manifest"}.
    #[arg(long)]
    pub json: bool,
    /// Refuse to resolve anything kiln.lock does not pin.
    #[arg(long, conflicts_with = "update")]
    pub locked: bool,
    /// Resolve tags again and rewrite kiln.lock.
    #[arg(long)]
    pub update: bool,
    /// With --from: the kernel, "auto" (found in the image) or a path in the image.
    #[arg(long, default_value = "auto")]
    pub kernel: String,
    /// With --from: the kernel command line.
    #[arg(long, default_value = DEFAULT_CMDLINE)]
    pub cmdline: String,
    /// With --from: zstd, gzip or none.
    #[arg(long, default_value = "zstd")]
    pub compression: String,
    /// With --from: compression level (default: 3 for zstd, 6 for gzip).
    #[arg(long)]
    pub level: Option<i32>,
    /// With --from: leave out paths matching this glob (repeatable), e.g. '/var/cache/**'.
    #[arg(long)]
    pub exclude: Vec<String>,
    /// Clamp file times to this; by default the recipe's, else $SOURCE_DATE_EPOCH, else the
    /// image's creation time.
    #[arg(long)]
    pub source_date_epoch: Option<i64>,
    /// Architecture to pick from a multi-platform image (amd64, arm64). Default: this machine's.
    #[arg(long)]
    pub arch: Option<String>,
    /// Verify registry TLS certificates (--tls-verify=false for a local plain-HTTP registry).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub tls_verify: bool,
    /// Registry credentials file (containers-auth.json format).
    #[arg(long)]
    pub authfile: Option<PathBuf>,
    /// Worker threads (default: all cores; KILN_THREADS also sets it). Outputs do not depend on it.
    #[arg(long)]
    pub threads: Option<usize>,
}

#[derive(Subcommand, Debug)]
pub enum StoreCommand {
    /// List the store's outputs.
    Ls {
        #[command(flatten)]
        store: StoreArg,
        /// One JSON array of {path,hash,name,kind,size,roots}.
        #[arg(long)]
        json: bool,
    },
    /// Re-hash every output against its manifest; exits 1 if anything is wrong.
    Verify {
        #[command(flatten)]
        store: StoreArg,
        #[arg(long)]
        json: bool,
    },
    /// Remove outputs no root points at (the last build of each name is a root).
    Gc {
        #[command(flatten)]
        store: StoreArg,
        /// Show what would be removed, remove nothing.
        #[arg(long)]
        dry_run: bool,
        #[arg(long)]
        json: bool,
    },
}

pub fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Build(args) => run_build(*args),
        Command::Store(cmd) => run_store(cmd),
        Command::Serve(args) => run_serve(args),
        Command::Node(cmd) => run_node(cmd),
        Command::BuildIpxe(args) => crate::ipxe::run(*args),
        Command::Appliance(args) => crate::appliance::run(*args),
    }
}

fn run_build(args: BuildArgs) -> Result<ExitCode> {
    let threads = args.threads.filter(|&n| n > 0).unwrap_or_else(crate::util::thread_count);
    let opts = BuildOptions {
        fetch: FetchOptions {
            registry: RegistryOptions { tls_verify: args.tls_verify, authfile: args.authfile.clone() },
            arch: args.arch.clone(),
        },
        threads,
        source_date_epoch: args.source_date_epoch,
        locked: args.locked,
        update: args.update,
    };
    let built = if let Some(from) = &args.from {
        let [name] = args.name.as_slice() else {
            anyhow::bail!("--from builds one bundle: give exactly one --name");
        };
        check_name(name).context("--name")?;
        let source = Source::parse(from).context("--from")?;
        let compression = Compression::parse(&args.compression).context("--compression")?;
        let level = args.level.unwrap_or_else(|| compression.default_level());
        compression.check_level(level).context("--level")?;
        crate::bundle::exclude_set(&args.exclude).context("--exclude")?;
        let spec = BundleSpec {
            name: name.clone(),
            kernel: KernelSpec::parse(&args.kernel),
            cmdline: args.cmdline.clone(),
            compression,
            level,
            exclude: args.exclude.clone(),
        };
        let store = args.store.open()?;
        vec![build::build_from(&store, &source, &spec, &opts)?]
    } else {
        if !args.recipe.exists() {
            anyhow::bail!(
                "{} not found: write a recipe (see docs/recipe.md) or build one image with --from SOURCE --name NAME",
                args.recipe.display()
            );
        }
        let loaded = LoadedRecipe::load(&args.recipe)?;
        let store = args.store.open()?;
        build::build_recipe(&store, &loaded, &args.name, &opts)?
    };
    let mut out = std::io::stdout().lock();
    for b in &built {
        if args.json {
            writeln!(out, "{}", serde_json::to_string(b)?)?;
        } else {
            writeln!(out, "{}", b.path.display())?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

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

fn run_node(cmd: NodeCommand) -> Result<ExitCode> {
    use crate::serve::{nodes, state};
    let mut out = std::io::stdout().lock();
    match cmd {
        NodeCommand::Ls { recipe, store, unknown, state_dir, json } => {
            if unknown {
                let known: Vec<_> = if recipe.exists() { nodes::list(&recipe)? } else { vec![] };
                let dir = state_dir_of(&recipe, &store, state_dir)?;
                let all: Vec<crate::serve::state::Discovered> =
                    serde_json::from_value(state::ask(&dir, &state::Query::Discovered)?)?;
                let rows: Vec<_> = all.into_iter().filter(|d| !known.iter().any(|n| n.mac.0 == d.mac)).collect();
                if json {
                    writeln!(out, "{}", serde_json::to_string_pretty(&rows)?)?;
                } else {
                    for d in &rows {
                        writeln!(out, "{}", serde_json::to_string(d)?)?;
                    }
                }
            } else {
                let list = nodes::list(&recipe)?;
                if json {
                    writeln!(out, "{}", serde_json::to_string_pretty(&list)?)?;
                } else {
                    for n in &list {
                        let ip = n.ipv4.map(|i| i.to_string()).unwrap_or_else(|| "-".into());
                        writeln!(out, "{:<16} {} {:<15} {:<16} {}", n.name, n.mac, ip, n.image, n.hostname)?;
                    }
                }
            }
        }
        NodeCommand::Add { name, recipe, fields } => nodes::add(&recipe, &name, &fields.edit())?,
        NodeCommand::Set { name, recipe, fields } => nodes::set(&recipe, &name, &fields.edit())?,
        NodeCommand::Rm { name, recipe } => nodes::rm(&recipe, &name)?,
        NodeCommand::Events { recipe, store, mac, limit, state_dir, json } => {
            let known = if recipe.exists() { nodes::list(&recipe)? } else { vec![] };
            let mac = match mac {
                None => None,
                Some(m) => match known.iter().find(|n| n.name == m) {
                    Some(n) => Some(n.mac.to_string()),
                    None => Some(state::format_mac(state::parse_mac(&m).with_context(|| {
                        format!("--mac {m:?}: neither a MAC address nor a node of {}", recipe.display())
                    })?)),
                },
            };
            let dir = state_dir_of(&recipe, &store, state_dir)?;
            let events: Vec<state::BootEvent> =
                serde_json::from_value(state::ask(&dir, &state::Query::Events { mac, limit })?)?;
            if json {
                writeln!(out, "{}", serde_json::to_string_pretty(&events)?)?;
            } else {
                for e in &events {
                    let name = known.iter().find(|n| n.mac.0 == e.mac).map(|n| n.name.as_str()).unwrap_or("unknown");
                    writeln!(
                        out,
                        "{} {} {:<12} {:<10} {}",
                        crate::util::utc_time(e.time),
                        state::format_mac(e.mac),
                        name,
                        e.kind,
                        e.detail
                    )?;
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The state directory a node command reads, chosen as `kiln serve` chooses it: `--state-dir`, else the recipe's
/// `[server] state_dir`, else `<store>/state`.
fn state_dir_of(recipe: &std::path::Path, store: &StoreArg, given: Option<PathBuf>) -> Result<PathBuf> {
    if let Some(dir) = given {
        return Ok(dir);
    }
    if recipe.exists() {
        let loaded = crate::recipe::LoadedRecipe::load(recipe)?;
        if let Some(dir) = loaded.recipe.server.and_then(|s| s.state_dir) {
            return Ok(dir);
        }
    }
    Ok(store.store.clone().unwrap_or_else(crate::util::default_store_root).join("state"))
}

fn run_serve(args: ServeArgs) -> Result<ExitCode> {
    let dhcp = args.dhcp.as_deref().map(str::parse::<crate::serve::config::DhcpMode>).transpose().context("--dhcp")?;
    crate::serve::run::run(crate::serve::run::ServeOptions {
        recipe: args.recipe,
        store_root: args.store.store.clone().unwrap_or_else(crate::util::default_store_root),
        dhcp,
        interface: args.interface,
        http_port: args.http_port,
        tftp_port: args.tftp_port,
        dhcp_port: args.dhcp_port,
        state_dir: args.state_dir,
    })
}

fn run_store(cmd: StoreCommand) -> Result<ExitCode> {
    let mut out = std::io::stdout().lock();
    match cmd {
        StoreCommand::Ls { store, json } => {
            let items = store.open()?.list()?;
            if json {
                writeln!(out, "{}", serde_json::to_string_pretty(&items)?)?;
            } else {
                for i in &items {
                    let roots = if i.roots.is_empty() { "-".to_string() } else { i.roots.join(",") };
                    writeln!(out, "{:<10} {:>12} {:<24} {}", i.kind, human_size(i.size), roots, i.path.display())?;
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        StoreCommand::Verify { store, json } => {
            let (count, problems) = store.open()?.verify()?;
            if json {
                let v = serde_json::json!({ "checked": count, "ok": problems.is_empty(), "problems": problems });
                writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?;
            } else if problems.is_empty() {
                writeln!(out, "{count} output(s) verified, no problems")?;
            } else {
                for p in &problems {
                    writeln!(out, "{}: {}", p.path.display(), p.problem)?;
                }
                writeln!(out, "{} problem(s) in {count} output(s); rebuild the affected outputs", problems.len())?;
            }
            Ok(if problems.is_empty() { ExitCode::SUCCESS } else { ExitCode::from(1) })
        }
        StoreCommand::Gc { store, dry_run, json } => {
            let report = store.open()?.gc(dry_run)?;
            if json {
                writeln!(out, "{}", serde_json::to_string_pretty(&report)?)?;
            } else {
                for p in &report.removed {
                    writeln!(out, "{} {}", if dry_run { "would remove" } else { "removed" }, p.display())?;
                }
                writeln!(
                    out,
                    "{} output(s) {}, {} kept, {} freed",
                    report.removed.len(),
                    if dry_run { "unreferenced" } else { "removed" },
                    report.kept,
                    human_size(report.freed_bytes)
                )?;
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

pub fn human_size(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}
