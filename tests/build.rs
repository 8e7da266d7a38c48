//! Building systems from Git (spec.nixos.build) on a builder node or on the
//! target itself, through the real operator: a Git repository made here
//! (no network) holding a flake and a plain Nix file that build demo-style
//! systems without nixpkgs, read by the builder's git from a file:// URL
//! (nodes share this host's /tmp).

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use k8s_openapi::api::core::v1::Event;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use nixops_operator::api::Machine;
use nixops_operator::api::build::BuildResult;
use serde_json::json;
use support::fleet::{Fleet, TIMEOUT, last_deploy};
use support::node::NixNode;

/// The repository's demo system: a toplevel with a `motd` package and a
/// switch-to-configuration that records activations as the test systems
/// of support::node do; `fail` makes its build print 12 lines and fail, `sleep` (seconds)
/// makes it sleep first.
const SYSTEM_NIX: &str = r#"
{ name, message, fail ? false, sleep ? 0, system }:
let
  motd = builtins.derivation {
    name = "motd-${name}";
    inherit system;
    builder = "/bin/sh";
    args = [ "-c" "echo '${message}' > $out" ];
  };
in builtins.derivation {
  name = "nixos-system-${name}";
  inherit system;
  builder = "/bin/sh";
  args = [ "-c" ((if sleep > 0 then "/bin/sleep ${toString sleep}; " else "") + (if fail then "for i in 01 02 03 04 05 06 07 08 09 10 11 12; do echo \"log line $i of ${name}\"; done; echo 'error: system ${name} refuses to build (fail = true)' >&2; exit 1" else ''
    /bin/mkdir -p $out/bin
    echo ${motd} > $out/packages
    /bin/cat > $out/bin/switch-to-configuration <<EOS
    #!/bin/sh
    set -e
    /bin/mkdir -p /run/nixops-test
    echo "\$1 $out" >> /run/nixops-test/activations
    case "\$1" in switch|test) /bin/ln -sfn $out /run/current-system ;; esac
    EOS
    /bin/chmod +x $out/bin/switch-to-configuration
  '')) ];
}
"#;

/// Flake outputs: nixosConfigurations.<name>.config.system.build.toplevel.
const FLAKE_NIX: &str = r#"{
  outputs = { self }: let
    machines = builtins.fromJSON (builtins.readFile ./machines.json);
    mk = name: cfg: import ./system.nix ({ inherit name; } // cfg);
  in {
    nixosConfigurations = builtins.mapAttrs (name: cfg: { config.system.build.toplevel = mk name cfg; }) machines;
  };
}
"#;

/// The same systems for `nix-build default.nix -A <name>`.
const DEFAULT_NIX: &str = r#"
builtins.mapAttrs (name: cfg: import ./system.nix ({ inherit name; } // cfg))
  (builtins.fromJSON (builtins.readFile ./machines.json))
"#;

/// A Git repository in a directory the nodes can read.
struct Repo {
    dir: tempfile::TempDir,
    /// An SSH key that signs commits when asked.
    signing_key: PathBuf,
}

impl Repo {
    fn new() -> Self {
        let dir = tempfile::Builder::new().prefix("nixops-git-").tempdir().expect("repo dir");
        let repo = Self { signing_key: dir.path().join("signing-key"), dir };
        repo.git(&["init", "-q", "-b", "main", "repo"], Some(repo.dir.path()));
        std::fs::write(repo.path().join("system.nix"), SYSTEM_NIX).unwrap();
        std::fs::write(repo.path().join("flake.nix"), FLAKE_NIX).unwrap();
        std::fs::write(repo.path().join("default.nix"), DEFAULT_NIX).unwrap();
        let keygen = Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", "release-signer", "-f"])
            .arg(&repo.signing_key)
            .output()
            .unwrap();
        assert!(keygen.status.success(), "{}", String::from_utf8_lossy(&keygen.stderr));
        repo
    }

    fn path(&self) -> PathBuf {
        self.dir.path().join("repo")
    }

    fn url(&self) -> String {
        format!("file://{}", self.path().display())
    }

    /// The public half of the signing key, as requireSignedBy lists it.
    fn signer(&self) -> String {
        let line = std::fs::read_to_string(self.signing_key.with_extension("pub")).unwrap();
        line.split_whitespace().take(2).collect::<Vec<_>>().join(" ")
    }

    fn git(&self, args: &[&str], cwd: Option<&Path>) -> String {
        let out = Command::new("git")
            .args(["-c", "user.name=Test", "-c", "user.email=test@example.org", "-c", "commit.gpgsign=false"])
            .args(args)
            .current_dir(cwd.map(Path::to_path_buf).unwrap_or_else(|| self.path()))
            .output()
            .expect("run git");
        assert!(out.status.success(), "git {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// Commits `machines` (name → {message, fail}) to main; returns the rev.
    fn commit(&self, machines: serde_json::Value, signed: bool) -> String {
        self.commit_with(machines, signed.then_some(&self.signing_key))
    }

    /// Commits `machines`, signed with the SSH key at `key` if given.
    fn commit_with(&self, machines: serde_json::Value, key: Option<&PathBuf>) -> String {
        let system = format!("{}-linux", std::env::consts::ARCH);
        let mut machines = machines;
        for cfg in machines.as_object_mut().unwrap().values_mut() {
            cfg["system"] = json!(system);
        }
        std::fs::write(self.path().join("machines.json"), machines.to_string()).unwrap();
        self.git(&["add", "-A"], None);
        let signing = format!("user.signingkey={}", key.unwrap_or(&self.signing_key).display());
        let mut args = vec!["-c", "gpg.format=ssh", "-c", &signing, "commit", "-q", "-m", "machines"];
        if key.is_some() {
            args.push("-S");
        }
        self.git(&args, None);
        self.git(&["rev-parse", "HEAD"], None)
    }
}

/// A node whose root builds without asking substituters (no network
/// here), as root itself: the host's nixbld users are shared by every node
/// and the host, and a build on any of them starts by killing whatever that
/// build user runs, which would end the tests' long builds at random.
fn offline(node: NixNode) -> NixNode {
    node.exec_ok(
        "mkdir -p /root/.config/nix && printf 'substituters =\\nbuild-users-group =\\n' > /root/.config/nix/nix.conf",
    );
    node
}

async fn create(fleet: &Fleet, name: &str, node: &NixNode, nixos: serde_json::Value) {
    let mut spec = json!({
        "networkRef": {"name": "net"},
        "provider": {"existing": {"host": node.host, "port": node.port}},
        "ssh": {"keyPairRef": {"name": "deployer"}},
    });
    if !nixos.is_null() {
        spec["nixos"] = nixos;
    }
    let machine: Machine = serde_json::from_value(json!({
        "apiVersion": "nixops.io/v1alpha1", "kind": "Machine", "metadata": {"name": name}, "spec": spec
    }))
    .unwrap();
    fleet.machines.create(&PostParams::default(), &machine).await.unwrap();
}

/// Waits until `name` runs what it built from `rev`; returns the Machine.
async fn wait_built_and_running(fleet: &Fleet, name: &str, rev: &str) -> Machine {
    support::wait_for(&fleet.machines, name, TIMEOUT, &format!("running the build of {rev}"), |m| {
        m.status.as_ref().is_some_and(|s| {
            let build = s.build.as_ref();
            build.is_some_and(|b| b.rev == rev && b.result == BuildResult::Succeeded)
                && s.closure.is_some()
                && s.closure == build.and_then(|b| b.closure.clone())
                && support::is_ready(&s.conditions)
        })
    })
    .await;
    fleet.machines.get(name).await.unwrap()
}

/// The message of the system a node runs (its motd package).
fn motd(node: &NixNode) -> String {
    node.exec_ok("cat \"$(cat /run/current-system/packages)\"").trim().to_owned()
}

fn builds(fleet: &Fleet, result: &str) -> f64 {
    fleet.operator.metric("nixops_builds_total", &[&format!("result=\"{result}\"")])
}

#[tokio::test]
async fn a_flake_on_a_branch_is_built_once_per_commit_on_the_builder_and_rolled_out() {
    let repo = Repo::new();
    let rev1 = repo.commit(json!({"a": {"message": "a v1"}, "b": {"message": "b v1"}}), false);
    let fleet = Fleet::start("build", json!({"build": {"builder": {"name": "builder"}}})).await;
    let builder = offline(fleet.node());
    let (node_a, node_b, node_p) = (fleet.node(), fleet.node(), fleet.node());
    let follow = json!({"build": {"git": {"url": repo.url(), "ref": "main"}}});
    create(&fleet, "a", &node_a, follow.clone()).await;
    create(&fleet, "b", &node_b, follow).await;
    // The builder last: both members wait for it, so the first build finds both.
    create(&fleet, "builder", &builder, serde_json::Value::Null).await;

    let a = wait_built_and_running(&fleet, "a", &rev1).await;
    let b = wait_built_and_running(&fleet, "b", &rev1).await;
    assert_eq!((motd(&node_a).as_str(), motd(&node_b).as_str()), ("a v1", "b v1"));
    let built_a = a.status.as_ref().unwrap().build.clone().unwrap();
    assert!(built_a.closure.as_deref().unwrap().ends_with("-nixos-system-a"), "{built_a:?}");
    assert_eq!(built_a.builder.as_deref(), Some("builder"));
    assert_eq!(support::condition(&a.status.as_ref().unwrap().conditions, "Built").as_deref(), Some("True"));
    assert_eq!(node_a.current_system(), built_a.closure);
    assert!(builder.has_path(built_a.closure.as_deref().unwrap()), "built in the builder's store");
    assert!(last_deploy(&b).paths_copied >= 2, "pushed from the builder's store: the system and its motd");
    node_a.verify();
    assert_eq!(builds(&fleet, "Succeeded"), 1.0, "two machines on one commit: one build");

    // The build's whole log is on the builder, and build-log reads it from
    // there (with the builder Machine's key and pinned host key).
    let path = built_a.log_path.clone().expect("status.build.logPath");
    assert!(builder.exec_ok(&format!("test -f {path} && echo yes")).contains("yes"), "the log is on the builder");
    let shown = support::plugin::run(&fleet.ns, &["build-log", "b"]);
    let log = String::from_utf8_lossy(&shown.stdout);
    assert!(shown.status.success(), "{}", support::plugin::text(&shown));
    assert!(log.contains(&rev1) && log.contains("-nixos-system-a.drv") && log.contains("-nixos-system-b.drv"), "{log}");

    // `kubectl get machines -o wide` shows the commit.
    let wide = support::kubectl(&["get", "machines", "-n", &fleet.ns, "-o", "wide"], None);
    let wide = String::from_utf8_lossy(&wide.stdout);
    assert!(wide.contains("REV") && wide.contains(&rev1), "{wide}");

    // A machine pinned to the first commit.
    let pinned = json!({"build": {"git": {"url": repo.url(), "rev": rev1}, "flake": "nixosConfigurations.a"}});
    create(&fleet, "p", &node_p, pinned).await;
    wait_built_and_running(&fleet, "p", &rev1).await;
    assert_eq!(motd(&node_p), "a v1");

    // A new commit on main is built (once) and rolled out; the pinned machine stays.
    let rev2 = repo.commit(json!({"a": {"message": "a v2"}, "b": {"message": "b v2"}}), false);
    wait_built_and_running(&fleet, "a", &rev2).await;
    wait_built_and_running(&fleet, "b", &rev2).await;
    assert_eq!((motd(&node_a).as_str(), motd(&node_b).as_str()), ("a v2", "b v2"));
    assert_eq!(builds(&fleet, "Succeeded"), 3.0, "rev1 for a and b, rev1 for p, rev2 for a and b");
    let p = fleet.machines.get("p").await.unwrap();
    assert_eq!(p.status.as_ref().unwrap().build.as_ref().unwrap().rev, rev1, "a pinned rev never moves");
    assert_eq!(motd(&node_p), "a v1");
    assert_eq!(node_p.activations().len(), 1, "{:?}", node_p.activations());
}

#[tokio::test]
async fn a_failed_build_keeps_the_old_system_and_unsigned_commits_are_refused() {
    let repo = Repo::new();
    let rev1 = repo.commit(json!({"t": {"message": "t v1"}}), false);
    // No builder in the Network: the machine builds its own system.
    let mut fleet = Fleet::start("build-target", json!({})).await;
    let node = offline(fleet.node());
    let nixos = json!({"build": {"git": {"url": repo.url(), "ref": "main"}, "file": "default.nix"}});
    create(&fleet, "t", &node, nixos).await;
    let m = wait_built_and_running(&fleet, "t", &rev1).await;
    assert_eq!(motd(&node), "t v1");
    assert_eq!(m.status.as_ref().unwrap().build.as_ref().unwrap().builder, None, "built on the machine itself");
    assert_eq!(last_deploy(&m).paths_copied, 0, "built where it runs: nothing to copy");
    let v1 = node.current_system().unwrap();

    // A commit that does not build: the machine stays on v1 and says why.
    // The reconcile that starts the build looks at it only once it has
    // ended, as when it fails at once: Built must not stay True from v1.
    fleet.restart_operator(&[("FAILPOINTS", "build-before-outcome=return(hold)")]);
    let rev2 = repo.commit(json!({"t": {"message": "t v2", "fail": true}}), false);
    let m = fleet.wait_stalled("t", "BuildFailed").await;
    let record = m.status.as_ref().unwrap().build.clone().unwrap();
    assert_eq!((record.rev.as_str(), record.result), (rev2.as_str(), BuildResult::Failed));
    let message = record.message.unwrap_or_default();
    assert!(message.starts_with(&format!("building {rev2} failed")), "{message}");
    assert!(message.contains("refuses to build (fail = true)"), "the log's end is in status: {message}");
    assert_eq!(support::condition(&m.status.as_ref().unwrap().conditions, "Built").as_deref(), Some("False"));
    assert_eq!(node.current_system().as_deref(), Some(v1.as_str()), "still on the old system");
    let events: Api<Event> = Api::namespaced(fleet.client.clone(), &fleet.ns);
    let failed: Vec<String> = events
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some("BuildFailed"))
        .filter_map(|e| e.message)
        .collect();
    assert!(failed.iter().any(|n| n.contains("refuses to build")), "{failed:?}");

    // The whole log stays on the machine that built it (here the machine
    // itself): status has only its end, `kubectl nixops build-log` all of it.
    assert!(!message.contains("log line 01 of t"), "status holds only the log's end: {message}");
    let path = record.log_path.clone().expect("status.build.logPath");
    let shown = support::plugin::run(&fleet.ns, &["build-log", "t"]);
    let text = support::plugin::text(&shown);
    assert!(shown.status.success(), "{text}");
    let log = String::from_utf8_lossy(&shown.stdout);
    for line in ["log line 01 of t", "log line 12 of t", "refuses to build (fail = true)", rev2.as_str()] {
        assert!(log.contains(line), "build-log shows {line:?}: {text}");
    }
    assert!(node.exec_ok(&format!("cat {path}")).contains("log line 01 of t"), "the log is the node's file {path}");
    // A log that is gone is said so, with a failing exit status.
    node.exec_ok(&format!("rm {path}"));
    let gone = support::plugin::run(&fleet.ns, &["build-log", "t"]);
    assert_eq!(gone.status.code(), Some(1), "{}", support::plugin::text(&gone));
    assert!(String::from_utf8_lossy(&gone.stderr).contains("is gone"), "{}", support::plugin::text(&gone));

    // Signatures required: an unsigned (and otherwise fine) commit is refused.
    let patch = json!({"spec": {"nixos": {"build": {"requireSignedBy": [repo.signer()]}}}});
    fleet.machines.patch("t", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    let rev3 = repo.commit(json!({"t": {"message": "t v3"}}), false);
    support::wait_for(&fleet.machines, "t", TIMEOUT, "refusing the unsigned commit", |m| {
        m.status
            .as_ref()
            .and_then(|s| s.build.as_ref())
            .is_some_and(|b| b.rev == rev3 && b.result == BuildResult::Refused)
    })
    .await;
    let m = fleet.wait_stalled("t", "UnsignedCommit").await;
    let record = m.status.as_ref().unwrap().build.clone().unwrap();
    assert_eq!((record.rev.as_str(), record.result), (rev3.as_str(), BuildResult::Refused));
    assert!(record.message.unwrap_or_default().contains("carries no signature"));
    assert_eq!(node.current_system().as_deref(), Some(v1.as_str()), "an unsigned commit is not deployed");
    assert_eq!(node.activations().len(), 1, "{:?}", node.activations());

    // So is one signed by a key that is not listed.
    let stranger = repo.dir.path().join("stranger-key");
    let keygen =
        Command::new("ssh-keygen").args(["-q", "-t", "ed25519", "-N", "", "-f"]).arg(&stranger).output().unwrap();
    assert!(keygen.status.success());
    let rev3b = repo.commit_with(json!({"t": {"message": "t v3b"}}), Some(&stranger));
    support::wait_for(&fleet.machines, "t", TIMEOUT, "refusing the stranger's commit", |m| {
        m.status
            .as_ref()
            .and_then(|s| s.build.as_ref())
            .is_some_and(|b| b.rev == rev3b && b.result == BuildResult::Refused)
    })
    .await;
    assert_eq!(node.current_system().as_deref(), Some(v1.as_str()), "a commit signed by another key is not deployed");

    // A signed commit goes through.
    let rev4 = repo.commit(json!({"t": {"message": "t v4"}}), true);
    wait_built_and_running(&fleet, "t", &rev4).await;
    assert_eq!(motd(&node), "t v4");
}

/// Whether a process with exactly `args` runs on this host (nodes share
/// its /proc).
fn running(args: &str) -> bool {
    Command::new("pgrep").args(["-f", &format!("^{args}$")]).output().unwrap().status.success()
}

#[tokio::test]
async fn a_newer_commit_stops_the_build_of_an_older_one() {
    let repo = Repo::new();
    // A build that would take an hour, with a sleep no other test runs.
    let seconds = 3600 + u32::from_str_radix(&support::fleet::nonce()[..3], 16).unwrap();
    let sleeping = format!("/bin/sleep {seconds}");
    let rev1 = repo.commit(json!({"s": {"message": "s v1", "sleep": seconds}}), false);
    let fleet = Fleet::start("build-cancel", json!({"build": {"builder": {"name": "builder"}}})).await;
    let builder = offline(fleet.node());
    let node = fleet.node();
    create(&fleet, "builder", &builder, serde_json::Value::Null).await;
    create(&fleet, "s", &node, json!({"build": {"git": {"url": repo.url(), "ref": "main"}}})).await;
    support::wait_for(&fleet.machines, "s", TIMEOUT, "building rev1", |m| {
        m.status
            .as_ref()
            .and_then(|s| s.build.as_ref())
            .is_some_and(|b| b.rev == rev1 && b.result == BuildResult::Building)
    })
    .await;
    let deadline = std::time::Instant::now() + TIMEOUT;
    while !running(&sleeping) {
        assert!(std::time::Instant::now() < deadline, "the build of rev1 never started its builder");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }

    // The next commit supersedes it: the old build is stopped on the
    // builder (it holds the builder's only slot) and the new one deployed.
    let rev2 = repo.commit(json!({"s": {"message": "s v2"}}), false);
    wait_built_and_running(&fleet, "s", &rev2).await;
    assert_eq!(motd(&node), "s v2");
    assert!(!running(&sleeping), "the superseded build still runs on the builder");
    assert_eq!(builds(&fleet, "Cancelled"), 1.0);
    assert_eq!(node.activations().len(), 1, "rev1 was never deployed: {:?}", node.activations());
}

#[tokio::test]
async fn a_build_left_by_a_killed_operator_is_stopped_by_the_next_commit() {
    let repo = Repo::new();
    let seconds = 3600 + u32::from_str_radix(&support::fleet::nonce()[..3], 16).unwrap();
    let sleeping = format!("/bin/sleep {seconds}");
    let rev1 = repo.commit(json!({"s": {"message": "s v1", "sleep": seconds}}), false);
    let mut fleet = Fleet::start("build-restart", json!({"build": {"builder": {"name": "builder"}}})).await;
    // Killed right after it started the build on the builder.
    fleet.restart_operator(&[("FAILPOINTS", "build-after-start=return(kill)")]);
    let builder = offline(fleet.node());
    let node = fleet.node();
    create(&fleet, "builder", &builder, serde_json::Value::Null).await;
    create(&fleet, "s", &node, json!({"build": {"git": {"url": repo.url(), "ref": "main"}}})).await;
    assert!(fleet.operator.wait_exit(TIMEOUT).is_some(), "the operator did not reach build-after-start");
    let deadline = std::time::Instant::now() + TIMEOUT;
    while !running(&sleeping) {
        assert!(std::time::Instant::now() < deadline, "the build of {rev1} never started its builder");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }

    // Another operator, another commit: the orphaned build of the old one stops.
    let rev2 = repo.commit(json!({"s": {"message": "s v2"}}), false);
    fleet.restart_operator(&[]);
    wait_built_and_running(&fleet, "s", &rev2).await;
    assert_eq!(motd(&node), "s v2");
    let deadline = std::time::Instant::now() + TIMEOUT;
    while running(&sleeping) {
        assert!(std::time::Instant::now() < deadline, "the orphaned build of {rev1} still runs on the builder");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}
