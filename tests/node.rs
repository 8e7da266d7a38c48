//! The test nodes and test systems themselves, with real components only:
//! OpenSSH's client and Nix's own nix-copy-closure against a node, so the
//! operator's tests can trust what a node reports.

mod support;

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use support::node::{AUTHORIZED_KEYS, Activation, NixNode, TestSystem, build_system, closure};

/// An SSH client key pair made by ssh-keygen.
struct ClientKey {
    _dir: tempfile::TempDir,
    private: PathBuf,
    public: String,
}

fn client_key() -> ClientKey {
    let dir = tempfile::tempdir().unwrap();
    let private = dir.path().join("id_ed25519");
    let status =
        Command::new("ssh-keygen").args(["-q", "-t", "ed25519", "-N", "", "-f"]).arg(&private).status().unwrap();
    assert!(status.success(), "ssh-keygen failed");
    let public = std::fs::read_to_string(private.with_extension("pub")).unwrap().trim().to_owned();
    ClientKey { _dir: dir, private, public }
}

/// ssh options for `node` with `key`, not checking the host key.
fn ssh_opts(node: &NixNode, key: &ClientKey) -> Vec<String> {
    [
        "-p",
        &node.port.to_string(),
        "-i",
        &key.private.display().to_string(),
        "-o",
        "StrictHostKeyChecking=no",
        "-o",
        "UserKnownHostsFile=/dev/null",
        "-o",
        "BatchMode=yes",
        "-o",
        "LogLevel=ERROR",
    ]
    .map(str::to_owned)
    .to_vec()
}

/// Runs `command` on `node` over ssh as root.
fn ssh(node: &NixNode, key: &ClientKey, command: &str) -> Output {
    Command::new("ssh")
        .args(ssh_opts(node, key))
        .arg(format!("root@{}", node.host))
        .arg(command)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Host state a node must never touch.
fn host_state() -> (Option<PathBuf>, bool, bool, bool) {
    (
        std::fs::read_link("/run/current-system").ok(),
        Path::new("/run/nixops-test").exists(),
        Path::new("/run/node").exists(),
        Path::new("/nix/var/nix/profiles/system").exists(),
    )
}

#[test]
fn nodes_have_their_own_store_receive_closures_over_ssh_and_activate_them() {
    let host_before = host_state();
    let key = client_key();
    let sys = TestSystem::new("smoke", &[("motd", "hello from the smoke test\n"), ("tool", "#!/bin/sh\necho tool\n")]);
    let toplevel = build_system(&sys);
    let paths = closure(&toplevel);
    assert!(toplevel.ends_with("-nixos-system-smoke"), "{toplevel}");
    assert_eq!(paths.len(), 3, "toplevel and two packages: {paths:?}");

    let started = Instant::now();
    let node = NixNode::start(&key.public);
    let other = NixNode::start(&key.public);
    eprintln!("two nodes started in {:?}", started.elapsed());

    // A node starts with an empty store of its own: the host's paths are not in it.
    assert_eq!(node.store_paths(), Vec::<String>::new());
    assert!(paths.iter().all(|p| !node.has_path(p)), "host paths valid in a fresh node");

    // sshd presents the node's host key and lets root in with the key.
    let known_hosts = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(known_hosts.path(), format!("[127.0.0.1]:{} {}\n", node.port, node.host_key())).unwrap();
    let out = Command::new("ssh")
        .args(["-p", &node.port.to_string(), "-i"])
        .arg(&key.private)
        .args(["-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes", "-o"])
        .arg(format!("UserKnownHostsFile={}", known_hosts.path().display()))
        .arg("root@127.0.0.1")
        .arg("id -un; command -v nix-store nix-env sh readlink mv install sha256sum curl setsid zstd | wc -l")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "ssh with the pinned host key failed: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(stdout(&out), "root\n10", "root, and every tool on the sessions' PATH");

    // Nix's own client copies a closure into the node.
    let started = Instant::now();
    let copy = Command::new("nix-copy-closure")
        .args(["--to", "root@127.0.0.1", &toplevel])
        .env("NIX_SSHOPTS", ssh_opts(&node, &key).join(" "))
        .output()
        .unwrap();
    assert!(copy.status.success(), "nix-copy-closure failed: {}", String::from_utf8_lossy(&copy.stderr));
    eprintln!("nix-copy-closure took {:?}", started.elapsed());
    assert!(paths.iter().all(|p| node.has_path(p)), "closure not valid in the node");
    assert_eq!(node.store_paths(), paths);
    node.verify();
    let motd = ssh(&node, &key, &format!("cat $(grep motd {toplevel}/packages)/motd"));
    assert_eq!(stdout(&motd), "hello from the smoke test");

    // Activation, the way the operator does it.
    node.exec_ok(&format!(
        "nix-env -p /nix/var/nix/profiles/system --set {toplevel} && {toplevel}/bin/switch-to-configuration switch"
    ));
    assert_eq!(node.activations(), vec![format!("switch {toplevel}")]);
    assert_eq!(node.current_system().as_deref(), Some(toplevel.as_str()));
    assert_eq!(stdout(&ssh(&node, &key, "readlink /run/current-system")), toplevel);

    // The other node saw none of it, and neither did the host.
    assert_eq!(other.store_paths(), Vec::<String>::new());
    assert_eq!(other.activations(), Vec::<String>::new());
    assert_eq!(other.current_system(), None);
    let seen =
        ssh(&other, &key, "ls /nix/store | wc -l; ls /run/current-system /run/nixops-test 2>&1 >/dev/null | wc -l");
    assert_eq!(stdout(&seen), "0\n2", "the other node's sessions see the first node's /nix or /run");
    assert_eq!(host_state(), host_before);
    assert!(paths.iter().all(|p| Path::new(p).exists()), "host store lost paths");

    // Dropping a node stops its sshd and removes its directory.
    let (port, dir) = (node.port, node.dir.path().to_owned());
    drop(node);
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err(), "sshd still listening");
    assert!(!dir.exists(), "{} left behind", dir.display());
}

#[test]
fn test_systems_build_deterministically_and_each_change_is_its_own_path() {
    let sys = TestSystem::new("determinism", &[("a", "one"), ("b", "two")]);
    let toplevel = build_system(&sys);
    assert_eq!(build_system(&sys.clone()), toplevel, "same system, same path");
    let before = closure(&toplevel);

    let mut changed = sys.clone();
    changed.packages[1].1 = "two, revised".into();
    let after = closure(&build_system(&changed));
    let new: Vec<_> = after.iter().filter(|p| !before.contains(p)).collect();
    assert_eq!(new.len(), 2, "exactly package b and the toplevel are new: {new:?}");
    assert!(new.iter().any(|p| p.ends_with("-b")) && new.iter().any(|p| p.ends_with("-nixos-system-determinism")));

    let reactivated = closure(&build_system(&TestSystem { activation: Activation::Fail, ..sys.clone() }));
    assert_eq!(reactivated.iter().filter(|p| !before.contains(p)).count(), 1, "only the toplevel changes");

    let fresh = closure(&build_system(&TestSystem::new("determinism", &[("a", "one"), ("b", "two")])));
    assert!(fresh.iter().all(|p| !before.contains(p)), "another nonce shares paths: {fresh:?}");
}

#[test]
fn test_systems_activate_as_declared() {
    let key = client_key();
    let node = NixNode::start(&key.public);
    let system = |name: &str, activation| {
        let toplevel = build_system(&TestSystem { activation, ..TestSystem::new(name, &[("etc", name)]) });
        let copy = Command::new("nix-copy-closure")
            .args(["--to", "root@127.0.0.1", &toplevel])
            .env("NIX_SSHOPTS", ssh_opts(&node, &key).join(" "))
            .output()
            .unwrap();
        assert!(copy.status.success(), "nix-copy-closure failed: {}", String::from_utf8_lossy(&copy.stderr));
        toplevel
    };
    let good = system("good", Activation::Ok);
    let failing = system("failing", Activation::Fail);
    let reboot = system("reboot", Activation::RebootRequired);
    let breaking = system("breaking", Activation::BreakSsh);
    let switch = |toplevel: &str, action: &str| node.exec(&format!("{toplevel}/bin/switch-to-configuration {action}"));

    assert_eq!(switch(&good, "boot").status.code(), Some(0));
    assert_eq!(node.current_system(), None, "boot does not change the running system");
    assert_eq!(switch(&failing, "switch").status.code(), Some(1));
    assert_eq!(node.current_system().as_deref(), Some(failing.as_str()));
    assert_eq!(switch(&reboot, "test").status.code(), Some(100));
    assert_eq!(node.current_system().as_deref(), Some(reboot.as_str()));
    assert!(ssh(&node, &key, "true").status.success(), "ssh before BreakSsh");

    // BreakSsh: no more logins until a good system is activated.
    assert_eq!(switch(&breaking, "switch").status.code(), Some(0));
    assert!(!ssh(&node, &key, "true").status.success(), "ssh still works after BreakSsh");
    assert!(node.exec(&format!("test -e {AUTHORIZED_KEYS}.off")).status.success());
    assert_eq!(switch(&good, "switch").status.code(), Some(0));
    assert!(ssh(&node, &key, "true").status.success(), "a good system did not restore ssh:\n{}", node.sshd_log());

    assert_eq!(
        node.activations(),
        vec![
            format!("boot {good}"),
            format!("switch {failing}"),
            format!("test {reboot}"),
            format!("switch {breaking}"),
            format!("switch {good}"),
        ]
    );
    node.verify();
    // A store path whose contents changed fails verification.
    node.exec_ok(&format!("chmod u+w {good}/packages && echo tampered >> {good}/packages"));
    let problems = node.check_store().expect_err("a tampered store verifies");
    assert!(problems.contains(&format!("path '{good}' was modified")), "{problems}");
}

/// Not a test: the process `a_node_dies_with_the_test_process_that_started_it`
/// starts and kills. Prints the node's port and directory, then waits.
#[test]
#[ignore = "run by a_node_dies_with_the_test_process_that_started_it"]
fn node_owner_process() {
    if std::env::var_os("NIXOPS_TEST_NODE_OWNER").is_none() {
        return;
    }
    let node = NixNode::start(&client_key().public);
    println!("node {} {}", node.port, node.dir.path().display());
    loop {
        std::thread::park();
    }
}

#[test]
fn a_node_dies_with_the_test_process_that_started_it() {
    let mut owner = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "node_owner_process", "--ignored", "--nocapture"])
        .env("NIXOPS_TEST_NODE_OWNER", "1")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let line = std::io::BufReader::new(owner.stdout.take().unwrap())
        .lines()
        .map_while(Result::ok)
        .find(|l| l.starts_with("node "))
        .expect("the owner process reports its node");
    let mut fields = line.split_whitespace().skip(1);
    let port: u16 = fields.next().unwrap().parse().unwrap();
    let dir = PathBuf::from(fields.next().unwrap());
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_ok(), "node not up");

    owner.kill().unwrap(); // SIGKILL: no destructor runs
    owner.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() || dir.exists() {
        assert!(
            Instant::now() < deadline,
            "node on port {port} outlived its test process ({} exists: {})",
            dir.display(),
            dir.exists()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
