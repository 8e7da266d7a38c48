//! `make quickstart`, end to end (and with PROVIDER=libvirt, on a VM): the script a new user runs starts a
//! control plane, a NixOS-like node and the operator, deploys the demo
//! system from examples/quickstart/, redeploys a changed one, survives being
//! run again, and stops everything.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

struct Quickstart {
    dir: PathBuf,
    port: u16,
}

impl Quickstart {
    fn run(&self, args: &[&str]) -> String {
        self.run_with(args, &[])
    }

    /// [`Quickstart::run`] with more environment (`QUICKSTART_PROVIDER`).
    fn run_with(&self, args: &[&str], env: &[(&str, &str)]) -> String {
        let out = Command::new(support::repo_root().join("hack/quickstart/quickstart.sh"))
            .args(args)
            .envs(env.iter().copied())
            .env("QUICKSTART_DIR", &self.dir)
            .env("QUICKSTART_PORT", self.port.to_string())
            .env("NIXOPS_OPERATOR_BIN", env!("CARGO_BIN_EXE_nixops-operator"))
            .output()
            .expect("run hack/quickstart/quickstart.sh");
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "quickstart.sh {args:?} failed:\n{text}");
        text
    }
}

impl Drop for Quickstart {
    fn drop(&mut self) {
        if self.dir.exists() {
            let _ = Command::new(support::repo_root().join("hack/quickstart/quickstart.sh"))
                .arg("down")
                .env("QUICKSTART_DIR", &self.dir)
                .output();
        }
    }
}

fn listening(port: u16) -> bool {
    std::net::TcpStream::connect(("127.0.0.2", port)).is_ok()
}

#[test]
fn quickstart_deploys_redeploys_reruns_and_stops() {
    let parent = tempfile::tempdir().unwrap();
    let qs = Quickstart { dir: parent.path().join("quickstart"), port: support::free_port() };

    let first = qs.run(&["up"]);
    assert!(first.contains("/run/motd says: hello from nixops-operator"), "{first}");
    assert!(
        first.contains("Running") && first.contains("Succeeded"),
        "kubectl get shows the deployed Machine:\n{first}"
    );
    assert!(first.contains("make quickstart-redeploy") && first.contains("make quickstart-down"), "{first}");

    let again = qs.run(&["redeploy", "hello again"]);
    assert!(again.contains("/run/motd says: hello again"), "{again}");

    // The build path: the demo system from a local Git repository, built on
    // the node by the operator; a second commit is built and rolled out.
    let built = qs.run(&["build", "hello from git"]);
    assert!(built.contains("/run/motd says: hello from git"), "{built}");
    let rebuilt = qs.run(&["build", "hello from the next commit"]);
    assert!(rebuilt.contains("/run/motd says: hello from the next commit"), "{rebuilt}");

    // Running it again reuses the control plane and the node, and goes back
    // to the pasted closure.
    let rerun = qs.run(&["up"]);
    assert!(rerun.contains("control plane already running") && rerun.contains("node already running"), "{rerun}");
    assert!(rerun.contains("/run/motd says: hello from nixops-operator"), "{rerun}");

    qs.run(&["down"]);
    assert!(!Path::new(&qs.dir).exists(), "down removes the state directory");
    assert!(!listening(qs.port), "down stops the node");
}

/// `make quickstart PROVIDER=libvirt`: the same demo on a real QEMU VM
/// (libvirtd started by the script from hack/libvirt), and `down` stops it.
#[test]
fn quickstart_with_libvirt_deploys_the_demo_to_a_vm() {
    let parent = tempfile::tempdir().unwrap();
    let qs = Quickstart { dir: parent.path().join("quickstart"), port: support::free_port() };
    let text = qs.run_with(&["up"], &[("QUICKSTART_PROVIDER", "libvirt")]);
    assert!(text.contains("In the VM, /run/current-system -> /nix/store/"), "{text}");
    assert!(text.contains("/run/motd says: hello from nixops-operator"), "{text}");
    qs.run(&["down"]);
    assert!(!Path::new(&qs.dir).exists(), "down removes the state directory");
}
