//! `kiln-node`: what kiln runs on the nodes it boots, as one static binary with one command per job. kiln serve
//! and kiln build find it with `kiln::util::node_binary`; `scripts/build-node.sh` builds it.

mod agent;
mod loader;

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    // Multi-call: invoked by a job's name (a symlink) or as `kiln-node JOB ARGS`.
    let invoked = std::path::Path::new(args.first().map(String::as_str).unwrap_or("kiln-node"))
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let (job, rest) = match invoked.strip_prefix("kiln-") {
        Some(job) if job != "node" => (job.to_string(), &args[1..]),
        _ => match args.get(1) {
            Some(job) => (job.clone(), &args[2..]),
            None => (String::new(), &args[1..]),
        },
    };
    match job.as_str() {
        "--version" | "version" => {
            println!("kiln-node {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        "agent" => agent::main(rest),
        "loader" => loader::main(rest),
        // A two-stage initramfs runs it as /init.
        _ if invoked == "init" => loader::main(&args[1..]),
        _ => {
            let _ = rest;
            eprintln!("kiln-node: unknown job {job:?}; usage: kiln-node --version");
            ExitCode::from(2)
        }
    }
}
