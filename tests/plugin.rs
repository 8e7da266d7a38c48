//! `kubectl nixops`, the real plugin binary, against the real control plane,
//! operator and nodes (Debian's Nix and sshd in their own namespaces): ssh
//! and scp with the pinned host key (and the refusal of another key, naming
//! both), info, generations after three deploys and a rollback to the first,
//! a check round trip with a failed unit, a reboot, and deploy --wait on a
//! failing closure.
//!
//! A node's reboot is simulated (tests/support/node.rs): the test system's
//! `systemctl reboot` has the node's init kill every process of the node,
//! start /run afresh with the system profile as /run/current-system, and
//! start sshd again with the same host keys. There is no kernel or systemd
//! boot; what the operator sees — the connection gone, the machine back
//! with the same key, /run empty, the boot default running — is what a
//! NixOS reboot shows it.

mod support;

use std::process::{Command, Output};

use kube::api::{Patch, PatchParams};
use nixops_operator::api::machine::{CHECK_ANNOTATION, CheckResult, RebootResult};
use nixops_operator::ssh::HostKey;
use serde_json::json;
use support::fleet::{Fleet, nonce, system};
use support::node::{Activation, FAILED_UNITS};
use support::plugin::{run as plugin, text};

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn logins(node: &support::node::NixNode) -> usize {
    node.sshd_log().matches("Accepted publickey").count()
}

#[tokio::test]
async fn ssh_and_scp_log_in_with_the_pinned_key_and_a_wrong_pin_is_refused_naming_both() {
    let fleet = Fleet::start("plugin-ssh", json!({})).await;
    let node = fleet.node();
    let v1 = system("web-1", &nonce(), &[("motd", "hello")], Activation::Ok);
    fleet.create("web-1", &node, json!({"closure": v1}), json!({})).await;
    fleet.wait_running("web-1", &v1).await;

    // A command runs on the machine and its exit status comes back.
    let out = plugin(&fleet.ns, &["ssh", "web-1", "--", "echo on-$(readlink /run/current-system); exit 7"]);
    assert_eq!(out.status.code(), Some(7), "{}", text(&out));
    assert_eq!(stdout(&out).trim(), format!("on-{v1}"), "{}", text(&out));
    let out = plugin(&fleet.ns, &["ssh", "web-1", "--", "true"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));

    // scp both ways, with MACHINE:PATH.
    let dir = tempfile::tempdir().unwrap();
    let local = dir.path().join("note");
    std::fs::write(&local, "copied by kubectl nixops\n").unwrap();
    let out = plugin(&fleet.ns, &["scp", local.to_str().unwrap(), "web-1:/root/note"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(node.exec_ok("cat /root/note"), "copied by kubectl nixops\n");
    let back = dir.path().join("back");
    let out = plugin(&fleet.ns, &["scp", "web-1:/root/note", back.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(std::fs::read_to_string(&back).unwrap(), "copied by kubectl nixops\n");

    // info shows the machine, its provider, address, closure and generation;
    // plain text on a pipe, structured with -o json.
    let out = plugin(&fleet.ns, &["info"]);
    assert!(out.status.success(), "{}", text(&out));
    let table = stdout(&out);
    assert!(!table.contains('\x1b'), "no colour when stdout is not a terminal: {table:?}");
    let row = table.lines().find(|l| l.contains("web-1")).unwrap_or_else(|| panic!("no web-1 row:\n{table}"));
    assert!(row.contains("existing") && row.contains("127.0.0.1") && row.contains("True"), "{row}");
    assert!(row.contains("nixos-system-web-1") && row.contains("Succeeded"), "{row}");
    let out = plugin(&fleet.ns, &["info", "net", "-o", "json"]);
    let infos: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&out)));
    assert_eq!(infos[0]["name"], "web-1");
    assert_eq!(infos[0]["closure"], v1.as_str());
    assert_eq!(infos[0]["generation"], 1);
    assert_eq!(infos[0]["lastDeploy"]["result"], "Succeeded");

    // Another host's key pinned: refused before logging in, naming both keys.
    let other = fleet.node();
    let patch = json!({"spec": {"ssh": {"keyPairRef": {"name": "deployer"}, "hostKey": other.host_key()}}});
    fleet.machines.patch("web-1", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    // The operator refuses the host too; from then on nobody logs in.
    fleet.wait_stalled("web-1", "HostKeyMismatch").await;
    let before = logins(&node);
    let out = plugin(&fleet.ns, &["ssh", "web-1", "--", "touch /root/should-not-exist"]);
    assert_eq!(out.status.code(), Some(255), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    let presented = HostKey::parse(&node.host_key(), "node").unwrap().fingerprint();
    let pinned = HostKey::parse(&other.host_key(), "other").unwrap().fingerprint();
    assert!(err.contains("REFUSED") && err.contains(&presented) && err.contains(&pinned), "{err}");
    assert!(err.contains("spec.ssh.hostKey"), "says which field pins it: {err}");
    assert_eq!(logins(&node), before, "no login to a host with another key");
    assert!(!node.exec("test -e /root/should-not-exist").status.success());
    let out = plugin(&fleet.ns, &["scp", local.to_str().unwrap(), "web-1:/root/x"]);
    assert_eq!(out.status.code(), Some(255), "{}", text(&out));
}

#[tokio::test]
async fn ssh_goes_through_the_jump_host_whose_key_is_pinned_too() {
    let fleet = Fleet::start("plugin-jump", json!({})).await;
    let bastion = fleet.node();
    let node = fleet.node();
    let v1 = system("web-1", &nonce(), &[("motd", "behind a bastion")], Activation::Ok);
    let jump = json!({"host": bastion.host, "port": bastion.port, "hostKey": bastion.host_key()});
    let ssh = json!({"ssh": {"keyPairRef": {"name": "deployer"}, "jumpHost": jump}});
    fleet.create("web-1", &node, json!({"closure": v1}), ssh).await;
    fleet.wait_running("web-1", &v1).await;
    // Paused, the operator logs in nowhere: every login from now on is the plugin's.
    let pause = json!({"metadata": {"annotations": {"nixops.io/paused": "true"}}});
    fleet.machines.patch("web-1", &PatchParams::default(), &Patch::Merge(&pause)).await.unwrap();
    support::wait_for(&fleet.machines, "web-1", support::fleet::TIMEOUT, "Paused", |m| {
        m.status.as_ref().is_some_and(|s| support::condition(&s.conditions, "Paused").as_deref() == Some("True"))
    })
    .await;
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    let (bastion_before, node_before) = (logins(&bastion), logins(&node));

    let out = plugin(&fleet.ns, &["ssh", "web-1", "--", "echo through; exit 3"]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    assert_eq!(stdout(&out).trim(), "through");
    // The host key check and OpenSSH's ProxyJump each logged in to the
    // bastion; only OpenSSH logged in to the machine, through it.
    assert_eq!(logins(&bastion) - bastion_before, 2, "{}", bastion.sshd_log());
    assert_eq!(logins(&node) - node_before, 1, "{}", node.sshd_log());

    // A bastion with another key: nothing is sent through it.
    let other = fleet.node();
    let wrong = json!({"spec": {"ssh": {"jumpHost": {"hostKey": other.host_key()}}}});
    fleet.machines.patch("web-1", &PatchParams::default(), &Patch::Merge(&wrong)).await.unwrap();
    let out = plugin(&fleet.ns, &["ssh", "web-1", "--", "true"]);
    assert_eq!(out.status.code(), Some(255), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    let presented = HostKey::parse(&bastion.host_key(), "bastion").unwrap().fingerprint();
    assert!(err.contains("jump host") && err.contains(&presented), "{err}");
    assert_eq!(logins(&bastion) - bastion_before, 2, "no login to a bastion with another key");
}

#[tokio::test]
async fn generations_after_three_deploys_and_a_rollback_to_the_first() {
    let fleet = Fleet::start("plugin-gen", json!({})).await;
    let node = fleet.node();
    let n = nonce();
    let systems: Vec<String> =
        (1..=3).map(|i| system("web-1", &n, &[("nginx", &format!("nginx 1.{i}"))], Activation::Ok)).collect();
    fleet.create("web-1", &node, json!({"closure": systems[0]}), json!({})).await;
    fleet.wait_running("web-1", &systems[0]).await;
    for closure in &systems[1..] {
        // deploy --closure --wait follows the deployment to its end.
        let out = plugin(&fleet.ns, &["deploy", "web-1", "--closure", closure, "--wait", "--timeout", "90"]);
        assert!(out.status.success(), "{}", text(&out));
        assert!(stdout(&out).contains("Deployed"), "{}", text(&out));
        assert_eq!(node.current_system().as_deref(), Some(closure.as_str()));
    }

    let out = plugin(&fleet.ns, &["list-generations", "web-1", "-o", "json"]);
    assert!(out.status.success(), "{}", text(&out));
    let listed: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let closures: Vec<&str> = listed.iter().map(|g| g["closure"].as_str().unwrap()).collect();
    assert_eq!(closures, systems.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(listed.iter().map(|g| g["number"].as_i64().unwrap()).collect::<Vec<_>>(), [1, 2, 3]);
    assert_eq!(listed[2]["current"], true);
    assert_eq!(listed[2]["running"], true);
    let out = plugin(&fleet.ns, &["list-generations", "web-1"]);
    let table = stdout(&out);
    assert!(table.lines().nth(3).is_some_and(|l| l.starts_with('3') && l.contains("current, running")), "{table}");

    // Back to the first: the spec names its closure and the machine runs it.
    let out = plugin(&fleet.ns, &["rollback", "web-1", "--to", "1", "--wait", "--timeout", "90"]);
    assert!(out.status.success(), "{}", text(&out));
    let m = fleet.machines.get("web-1").await.unwrap();
    assert_eq!(m.spec.nixos.unwrap().closure, systems[0]);
    assert_eq!(node.current_system().as_deref(), Some(systems[0].as_str()));

    // Managed by a GitOps tool: the manifest change is printed, nothing patched.
    let argo = json!({"apiVersion": "nixops.io/v1alpha1", "kind": "Machine", "metadata": {"name": "web-1"},
                      "spec": {"networkRef": {"name": "net"}, "nixos": {"closure": systems[0]}}});
    fleet
        .machines
        .patch("web-1", &PatchParams::apply("argocd-controller").force(), &Patch::Apply(&argo))
        .await
        .unwrap();
    let generation = fleet.machines.get("web-1").await.unwrap().metadata.generation;
    let out = plugin(&fleet.ns, &["rollback", "web-1", "--previous"]);
    assert!(out.status.success(), "{}", text(&out));
    let printed = stdout(&out);
    assert!(printed.contains("Argo CD") && printed.contains(&format!("+    closure: {}", systems[2])), "{printed}");
    let m = fleet.machines.get("web-1").await.unwrap();
    assert_eq!(m.metadata.generation, generation, "the Machine is left as Git has it");

    // A failing closure: deploy --wait exits non-zero and says so.
    let broken = system("web-1", &n, &[("nginx", "broken")], Activation::Fail);
    let out = plugin(&fleet.ns, &["deploy", "web-1", "--closure", &broken, "--force", "--wait", "--timeout", "90"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(stdout(&out).contains("Failed"), "{}", text(&out));
    assert_eq!(node.current_system().as_deref(), Some(systems[0].as_str()), "rolled back by the operator");
}

#[tokio::test]
async fn check_asks_the_operator_and_prints_its_answer() {
    let fleet = Fleet::start("plugin-check", json!({})).await;
    let node = fleet.node();
    let v1 = system("web-1", &nonce(), &[("motd", "hi")], Activation::Ok);
    fleet.create("web-1", &node, json!({"closure": v1}), json!({})).await;
    fleet.wait_running("web-1", &v1).await;

    let out = plugin(&fleet.ns, &["check", "web-1"]);
    assert!(out.status.success(), "{}", text(&out));
    let row = stdout(&out).lines().nth(1).unwrap_or_default().to_owned();
    assert!(row.starts_with("web-1") && row.contains("Healthy") && row.contains("free"), "{}", text(&out));
    let m = fleet.machines.get("web-1").await.unwrap();
    let check = m.status.unwrap().last_check.expect("status.lastCheck");
    assert_eq!(Some(&check.request), m.metadata.annotations.unwrap().get(CHECK_ANNOTATION), "acknowledged");
    assert_eq!(check.active_closure.as_deref(), Some(v1.as_str()));
    assert!(check.in_sync && check.nix_free_bytes.unwrap_or_default() > 0 && check.load.is_some());

    // The sync a Backup asks of the machine of an attached volume.
    let sync = json!({"metadata": {"annotations": {"nixops.io/sync": "backup-uid-1"}}});
    fleet.machines.patch("web-1", &PatchParams::default(), &Patch::Merge(&sync)).await.unwrap();
    support::wait_for(&fleet.machines, "web-1", support::fleet::TIMEOUT, "synced", |m| {
        m.status.as_ref().and_then(|s| s.last_sync.as_ref()).is_some_and(|s| s.request == "backup-uid-1")
    })
    .await;

    // A unit fails: the next check says so and exits 1.
    node.exec_ok(&format!("echo 'nginx.service loaded failed failed Web server' > {FAILED_UNITS}"));
    let out = plugin(&fleet.ns, &["check", "--all", "-o", "json"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let answers: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(answers[0]["check"]["result"], "Degraded");
    assert_eq!(answers[0]["check"]["failedUnits"], json!(["nginx.service"]));
    let m = fleet.machines.get("web-1").await.unwrap();
    assert_eq!(m.status.unwrap().last_check.unwrap().result, CheckResult::Degraded);
    let reasons = fleet.event_reasons().await;
    assert!(reasons.iter().any(|r| r == "Checked") && reasons.iter().any(|r| r == "CheckFailed"), "{reasons:?}");
}

/// A process of the node, found by its unique command line in /proc (the
/// node shares the host's /proc mount).
fn running(cmdline: &str) -> bool {
    std::fs::read_dir("/proc").unwrap().flatten().any(|p| {
        std::fs::read(p.path().join("cmdline"))
            .is_ok_and(|c| String::from_utf8_lossy(&c).replace('\0', " ").trim() == cmdline)
    })
}

#[tokio::test]
async fn reboot_brings_up_the_boot_default_with_the_same_host_key() {
    let fleet = Fleet::start("plugin-reboot", json!({})).await;
    let node = fleet.node();
    let n = nonce();
    let v1 = system("web-1", &n, &[("kernel", "6.1")], Activation::Ok);
    fleet.create("web-1", &node, json!({"closure": v1}), json!({})).await;
    fleet.wait_running("web-1", &v1).await;
    // A new system for the next boot (a kernel update: switch says so with
    // exit status 100 on NixOS; `boot` is what waits for the reboot).
    let v2 = system("web-1", &n, &[("kernel", "6.6")], Activation::Ok);
    let patch = json!({"spec": {"nixos": {"closure": v2, "action": "boot"}}});
    fleet.machines.patch("web-1", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    fleet.wait_running("web-1", &v2).await;
    assert_eq!(node.current_system().as_deref(), Some(v1.as_str()), "boot leaves the running system");
    assert_eq!(node.profile().as_deref(), Some(v2.as_str()));

    // A process running on the machine before the reboot.
    let sleeper = format!("sleep 3600.{}", u64::from_str_radix(&n, 16).unwrap());
    node.exec_ok(&format!("setsid {sleeper} </dev/null >/dev/null 2>&1 &"));
    let started = std::time::Instant::now();
    while !running(&sleeper) {
        assert!(started.elapsed() < std::time::Duration::from_secs(10), "{sleeper} did not start in the node");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }

    let out = plugin(&fleet.ns, &["reboot", "web-1", "--wait", "--timeout", "120"]);
    assert!(out.status.success(), "{}", text(&out));
    let printed = stdout(&out);
    assert!(printed.contains("web-1: rebooted, back after") && printed.contains("Healthy"), "{printed}");
    eprintln!("{printed}");
    assert_eq!(node.sshd_log().matches("node: rebooting").count(), 1, "exactly one reboot");
    assert!(!running(&sleeper), "every process of the machine ended with the reboot");
    assert_eq!(node.current_system().as_deref(), Some(v2.as_str()), "the boot default runs after the reboot");
    let status = fleet.machines.get("web-1").await.unwrap().status.unwrap();
    let reboot = status.last_reboot.expect("status.lastReboot");
    assert_eq!(reboot.result, RebootResult::Succeeded);
    let check = status.last_check.expect("checked after the reboot");
    assert_eq!(check.request, reboot.request);
    assert_eq!(check.active_closure.as_deref(), Some(v2.as_str()));
    let reasons = fleet.event_reasons().await;
    assert!(reasons.iter().any(|r| r == "Rebooting") && reasons.iter().any(|r| r == "Rebooted"), "{reasons:?}");
    // And the machine keeps working with the operator afterwards.
    let out = plugin(&fleet.ns, &["ssh", "web-1", "--", "readlink /run/current-system"]);
    assert_eq!(stdout(&out).trim(), v2, "{}", text(&out));

    // A switch that asks for a reboot (exit status 100): RebootRequired
    // until the reboot it asks for.
    let v3 = system("web-1", &n, &[("kernel", "6.12")], Activation::RebootRequired);
    let patch = json!({"spec": {"nixos": {"closure": v3, "action": "switch"}}});
    fleet.machines.patch("web-1", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    let m = fleet.wait_running("web-1", &v3).await;
    let required = |m: &nixops_operator::api::Machine| {
        m.status
            .as_ref()
            .is_some_and(|s| support::condition(&s.conditions, "RebootRequired").as_deref() == Some("True"))
    };
    assert!(required(&m), "{:?}", m.status);
    let out = plugin(&fleet.ns, &["reboot", "web-1", "--wait", "--timeout", "120"]);
    assert!(out.status.success(), "{}", text(&out));
    let m = fleet.machines.get("web-1").await.unwrap();
    assert!(!required(&m), "the reboot it asked for clears it: {:?}", m.status);
    assert_eq!(node.sshd_log().matches("node: rebooting").count(), 2);
}

#[tokio::test]
async fn reboot_of_a_network_goes_max_unavailable_machines_at_a_time() {
    let fleet = Fleet::start("plugin-reboots", json!({"rollout": {"maxUnavailable": 1}})).await;
    let n = nonce();
    let nodes = [fleet.node(), fleet.node()];
    let v1 = system("member", &n, &[("motd", "fleet")], Activation::Ok);
    for (i, node) in nodes.iter().enumerate() {
        fleet.create(&format!("m{i}"), node, json!({"closure": v1}), json!({})).await;
    }
    for i in 0..nodes.len() {
        fleet.wait_running(&format!("m{i}"), &v1).await;
    }
    let out = plugin(&fleet.ns, &["reboot", "--network", "net", "--timeout", "120"]);
    assert!(out.status.success(), "{}", text(&out));
    for node in &nodes {
        assert_eq!(node.sshd_log().matches("node: rebooting").count(), 1, "{}", node.sshd_log());
    }
    let mut reboots = Vec::new();
    for i in 0..nodes.len() {
        let m = fleet.machines.get(&format!("m{i}")).await.unwrap();
        let reboot = m.status.unwrap().last_reboot.expect("lastReboot");
        assert_eq!(reboot.result, RebootResult::Succeeded);
        reboots.push((reboot.started_at.unwrap().0, reboot.finished_at.unwrap().0));
    }
    // maxUnavailable 1: the second began after the first was back.
    assert!(reboots[0].1 <= reboots[1].0, "{reboots:?}");
    // Each settled once: a settle from a stale copy would say Rebooted again.
    let reasons = fleet.event_reasons().await;
    assert_eq!(reasons.iter().filter(|r| *r == "Rebooted").count(), nodes.len(), "{reasons:?}");
}

/// The krew manifest names the binary this crate builds, at its version.
#[test]
fn the_krew_manifest_matches_the_crate() {
    let text = std::fs::read_to_string(support::repo_root().join("deploy/krew/nixops.yaml")).unwrap();
    let manifest: serde_json::Value = serde_yaml_ng::from_str(&text).unwrap();
    assert_eq!(manifest["kind"], "Plugin");
    assert_eq!(manifest["metadata"]["name"], "nixops", "kubectl nixops");
    assert_eq!(manifest["spec"]["version"], format!("v{}", env!("CARGO_PKG_VERSION")));
    for platform in manifest["spec"]["platforms"].as_array().unwrap() {
        assert_eq!(platform["bin"], "kubectl-nixops");
        assert!(platform["uri"].as_str().unwrap().contains(&format!("/v{}/", env!("CARGO_PKG_VERSION"))));
    }
    let out = Command::new(env!("CARGO_BIN_EXE_kubectl-nixops")).arg("--version").output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), format!("kubectl-nixops {}", env!("CARGO_PKG_VERSION")));
}

#[tokio::test]
async fn deploy_dry_activate_copies_and_asks_the_closure_and_changes_nothing() {
    let fleet = Fleet::start("plugin-dry", json!({})).await;
    let node = fleet.node();
    let n = nonce();
    let v1 = system("web-1", &n, &[("nginx", "1.0")], Activation::Ok);
    fleet.create("web-1", &node, json!({"closure": v1}), json!({})).await;
    fleet.wait_running("web-1", &v1).await;
    let v2 = system("web-1", &n, &[("nginx", "2.0")], Activation::Ok);
    assert!(!node.has_path(&v2));

    let out = plugin(&fleet.ns, &["deploy", "web-1", "--closure", &v2, "--dry-activate", "--timeout", "90"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(stdout(&out).contains(&format!("would activate {v2}")), "{}", text(&out));
    assert!(node.has_path(&v2), "the closure was copied");
    assert_eq!(node.activations().last(), Some(&format!("dry-activate {v2}")));
    assert_eq!(node.current_system().as_deref(), Some(v1.as_str()), "nothing activated");
    let m = fleet.machines.get("web-1").await.unwrap();
    assert_eq!(m.spec.nixos.unwrap().closure, v1, "the spec is left alone");
    let record = m.status.unwrap().last_dry_activation.expect("status.lastDryActivation");
    assert!(record.succeeded && record.closure == v2);
    assert!(fleet.event_reasons().await.iter().any(|r| r == "DryActivated"));
}
