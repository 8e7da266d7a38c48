//! `kubectl nixops`: the kubectl plugin (krew name `nixops`). Install with
//! `cargo install --path . --bin kubectl-nixops` (or krew, see
//! deploy/krew/nixops.yaml); kubectl finds `kubectl-nixops` on PATH.
#![deny(warnings)]

use clap::Parser;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let cli = nixops_operator::plugin::Cli::parse();
    let code = nixops_operator::plugin::run(cli).await;
    std::process::exit(code);
}
