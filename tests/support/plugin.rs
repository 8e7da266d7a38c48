//! Running the real `kubectl-nixops` binary against the test control plane.

use std::process::{Command, Output, Stdio};

/// Runs `kubectl-nixops --kubeconfig … -n NS ARGS` (stdin empty, stdout a pipe).
pub fn run(ns: &str, args: &[&str]) -> Output {
    let kubeconfig = super::control_plane().kubeconfig.display().to_string();
    Command::new(env!("CARGO_BIN_EXE_kubectl-nixops"))
        .args(["--kubeconfig", &kubeconfig, "-n", ns])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run kubectl-nixops")
}

/// Both outputs, for assertion messages.
pub fn text(out: &Output) -> String {
    format!("stdout:\n{}\nstderr:\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}
