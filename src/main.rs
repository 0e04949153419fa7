//! The `kiln` binary: parse the command line, run the part it names, print the error chain.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = kiln::cli::Cli::parse();
    kiln::util::init_tracing(cli.verbose, cli.quiet);
    match kiln::cli::run(cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            std::process::ExitCode::from(1)
        }
    }
}
