//! `kiln man`: manual pages (roff), one per command (`kiln.1`, `kiln-serve.1`, `kiln-store-ls.1`, ...), generated
//! from the clap definitions the binary parses with, so a page never describes an option the binary lacks.

use std::fmt::Write as _;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Args, CommandFactory};

#[derive(Args, Debug)]
pub struct ManArgs {
    /// Write every page (kiln.1, kiln-build.1, kiln-serve.1 and so on) into this directory, one file
    /// each, and print their paths. Without it, prints one page on stdout.
    #[arg(long, value_name = "DIR")]
    pub out_dir: Option<PathBuf>,
    /// The command whose page to print, e.g. `serve` or `store ls` (default: kiln itself).
    #[arg(conflicts_with = "out_dir")]
    pub command: Vec<String>,
}

/// One page: its file name (`kiln-serve.1`) and its roff text.
pub struct ManPage {
    pub file_name: String,
    pub text: Vec<u8>,
}

/// Every page: kiln's and each (visible) subcommand's, parents before children.
pub fn pages() -> Result<Vec<ManPage>> {
    let root = super::Cli::command();
    // The page's NAME line wants a short phrase; the help's first line says more, and stays the DESCRIPTION.
    let description = root.get_about().map(|a| a.to_string()).unwrap_or_default();
    let mut cmd = root
        .disable_help_subcommand(true)
        .about("stateless bare-metal provisioning: boot bundles, iPXE, the boot server")
        .long_about(description);
    cmd.build();
    let mut out = Vec::new();
    collect(&cmd, &mut out)?;
    Ok(out)
}

fn collect(cmd: &clap::Command, out: &mut Vec<ManPage>) -> Result<()> {
    let man =
        clap_mangen::Man::new(cmd.clone()).manual("kiln manual").source(format!("kiln {}", env!("CARGO_PKG_VERSION")));
    let mut text = Vec::new();
    man.render(&mut text).with_context(|| format!("rendering the page of {}", cmd.get_name()))?;
    text.extend_from_slice(extra_sections(cmd).as_bytes());
    out.push(ManPage { file_name: man.get_filename(), text });
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        collect(sub, out)?;
    }
    Ok(())
}

/// What clap does not know: where kiln keeps things, what steers it from the environment, where to read on.
fn extra_sections(cmd: &clap::Command) -> String {
    let name = cmd.get_display_name().unwrap_or_else(|| cmd.get_name());
    let mut s = String::new();
    if name == "kiln" {
        s.push_str(
            ".SH ENVIRONMENT\n\
             .TP\n\\fBKILN_STORE\\fR\nThe store's directory, as \\fB\\-\\-store\\fR.\n\
             .TP\n\\fBKILN_LOG\\fR\nLog filter (tracing's EnvFilter syntax), overriding \\fB\\-v\\fR.\n\
             .TP\n\\fBSOURCE_DATE_EPOCH\\fR\nThe time stamped on every built file when the recipe names none.\n\
             .SH FILES\n\
             .TP\n\\fI/var/lib/kiln\\fR\nThe store when kiln runs as root: \\fIstore/\\fR (outputs), \\fIroots/\\fR, \
             \\fIstate/\\fR (leases, discovered machines, boot events of \\fBkiln serve\\fR).\n\
             .TP\n\\fI$XDG_DATA_HOME/kiln\\fR\nThe store for other users (default \\fI~/.local/share/kiln\\fR).\n\
             .TP\n\\fI./kiln.toml\\fR, \\fI./kiln.lock\\fR\nThe recipe and the digests its tags resolved to.\n",
        );
    }
    if name == "kiln-serve" {
        s.push_str(
            ".SH SYSTEMD\n\
             The Debian package installs \\fIkiln\\-serve.service\\fR, which runs \\fBkiln serve \\-\\-recipe \
             /etc/kiln/kiln.toml\\fR as the user \\fIkiln\\fR with CAP_NET_BIND_SERVICE only, keeps its state in \
             \\fI/var/lib/kiln/state\\fR, tells systemd when it listens (Type=notify) and is restarted when it fails. \
             \\fBsystemctl reload kiln\\-serve\\fR sends SIGHUP, which reloads the recipe.\n",
        );
    }
    let mut see_also: Vec<String> = Vec::new();
    if name != "kiln" {
        see_also.push("\\fBkiln\\fR(1)".to_string());
    }
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        let sub_name = sub.get_display_name().unwrap_or_else(|| sub.get_name());
        see_also.push(format!("\\fB{}\\fR(1)", sub_name.replace('-', "\\-")));
    }
    if name == "kiln-serve" {
        see_also.push("\\fBsystemd.service\\fR(5)".to_string());
    }
    if !see_also.is_empty() {
        let _ = writeln!(s, ".SH \"SEE ALSO\"\n{}", see_also.join(", "));
    }
    s
}

/// `kiln man`: every page into `--out-dir`, else one page on stdout.
pub fn run(args: ManArgs) -> Result<ExitCode> {
    let all = pages()?;
    let mut stdout = std::io::stdout().lock();
    match &args.out_dir {
        Some(dir) => {
            crate::util::mkdir_p(dir)?;
            for page in &all {
                let path = dir.join(&page.file_name);
                crate::util::write_atomic(&path, &page.text)?;
                writeln!(stdout, "{}", path.display()).context("writing to stdout")?;
            }
        }
        None => {
            let wanted =
                if args.command.is_empty() { "kiln".to_string() } else { format!("kiln-{}", args.command.join("-")) };
            let file_name = format!("{wanted}.1");
            let Some(page) = all.iter().find(|p| p.file_name == file_name) else {
                let known: Vec<&str> = all.iter().map(|p| p.file_name.trim_end_matches(".1")).collect();
                bail!("there is no page {wanted:?}; the pages are: {}", known.join(", "));
            };
            stdout.write_all(&page.text).and_then(|()| stdout.flush()).context("writing the page to stdout")?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
