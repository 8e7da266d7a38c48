use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use nixops_operator::crdgen;

/// NixOps as a Kubernetes operator.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the CustomResourceDefinitions as YAML (pipe to `kubectl apply -f -`).
    Crds {
        /// Write one file per kind into this directory instead of printing.
        #[arg(long)]
        out_dir: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Crds { out_dir: Some(dir) } => crdgen::write_dir(&dir),
        Command::Crds { out_dir: None } => crdgen::render_stream().map(|yaml| print!("{yaml}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("nixops-operator: {err}");
            ExitCode::FAILURE
        }
    }
}
