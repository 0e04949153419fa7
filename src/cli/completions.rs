//! `kiln completions`: a shell completion script, generated from the clap definitions the binary parses with, so
//! it can never name an option the binary lacks.

use std::io::Write;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, CommandFactory, ValueEnum};

#[derive(Args, Debug)]
pub struct CompletionsArgs {
    /// The shell to write the script for.
    pub shell: CompletionShell,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum CompletionShell {
    Bash,
    Zsh,
    Fish,
}

impl CompletionShell {
    fn generator(self) -> clap_complete::Shell {
        match self {
            CompletionShell::Bash => clap_complete::Shell::Bash,
            CompletionShell::Zsh => clap_complete::Shell::Zsh,
            CompletionShell::Fish => clap_complete::Shell::Fish,
        }
    }
}

/// The completion script for `shell`, as bytes.
pub fn script(shell: CompletionShell) -> Vec<u8> {
    let mut cmd = super::Cli::command();
    let mut out = Vec::new();
    clap_complete::generate(shell.generator(), &mut cmd, "kiln", &mut out);
    out
}

/// `kiln completions SHELL`: the script on stdout.
pub fn run(args: CompletionsArgs) -> Result<ExitCode> {
    // Generated into memory first: clap_complete panics when its writer fails (a closed pipe), kiln reports it.
    let text = script(args.shell);
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(&text).and_then(|()| stdout.flush()).context("writing the completion script to stdout")?;
    Ok(ExitCode::SUCCESS)
}
