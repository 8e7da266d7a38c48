//! Deploying NixOS-like closures to real nodes (Debian's Nix + sshd, each
//! with its own /nix in its own mount namespace) through the real operator:
//! push only what is missing, activate, roll back, correct drift, keys,
//! rollout.

mod support;

use std::time::Duration;

use k8s_openapi::api::core::v1::{Event, Secret};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use nixops_operator::api::machine::MachinePhase;
use nixops_operator::api::{Machine, Network};
use serde_json::json;
use support::fleet::{Fleet, TIMEOUT, last_deploy, nonce, system};
use support::node::{Activation, NixNode, NodeSetup, NodeUser, closure};

#[tokio::test]
async fn deploy_copies_only_missing_paths_and_reapplying_changes_nothing() {
    let fleet = Fleet::start("deploy", json!({})).await;
    let node = fleet.node();
    let n = nonce();
    let packages = [("bash", "GNU bash"), ("coreutils", "ls cp mv"), ("openssh", "sshd"), ("nginx", "nginx 1.0")];
    let v1 = system("web-1", &n, &packages, Activation::Ok);
    let full = closure(&v1);
    assert_eq!(full.len(), 5, "4 packages and the system: {full:?}");

    fleet.create("web-1", &node, json!({"closure": v1}), json!({})).await;
    let m = fleet.wait_running("web-1", &v1).await;
    let record = last_deploy(&m);
    assert_eq!(record.paths_copied, full.len() as i64, "a first deploy copies the whole closure");
    assert_eq!(record.result.as_deref(), Some("Succeeded"));
    assert!(record.bytes_copied > 0);
    let status = m.status.clone().unwrap();
    assert_eq!(status.generation, Some(1));
    assert_eq!(status.phase, Some(MachinePhase::Running));
    assert!(status.closure_short.unwrap().ends_with("nixos-system-web-1"));
    assert_eq!(node.current_system().as_deref(), Some(v1.as_str()));
    assert_eq!(node.activations(), vec![format!("switch {v1}")]);
    node.verify();

    // One package changes: exactly it and the system are copied.
    let v2 = system("web-1", &n, &[packages[0], packages[1], packages[2], ("nginx", "nginx 1.1")], Activation::Ok);
    fleet.set_closure("web-1", &v2).await;
    let m = fleet.wait_running("web-1", &v2).await;
    assert_eq!(last_deploy(&m).paths_copied, 2, "only the changed package and the system are missing");
    assert_eq!(m.status.clone().unwrap().generation, Some(2));
    assert_eq!(node.current_system().as_deref(), Some(v2.as_str()));
    node.verify();

    // Resyncs (every 2 s here) and re-applying the same closure copy nothing
    // and do not activate again.
    let before = fleet.machines.get("web-1").await.unwrap();
    let patch = json!({"metadata": {"labels": {"touched": "yes"}}, "spec": {"nixos": {"closure": v2}}});
    fleet.machines.patch("web-1", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    tokio::time::sleep(Duration::from_secs(6)).await;
    let after = fleet.machines.get("web-1").await.unwrap();
    assert_eq!(node.activations().len(), 2, "{:?}", node.activations());
    assert_eq!(last_deploy(&after), last_deploy(&before), "no new deployment");
    assert_eq!(after.status.unwrap().observed_generation, after.metadata.generation);

    let events: Api<Event> = Api::namespaced(fleet.client.clone(), &fleet.ns);
    let deployed: Vec<String> = events
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some("Deployed"))
        .filter_map(|e| e.message)
        .collect();
    assert_eq!(deployed.len(), 2, "one Deployed event per deployment: {deployed:?}");
    assert!(deployed.iter().any(|n| n.contains(&v2) && n.contains("with 2 paths")), "{deployed:?}");
    let op = &fleet.operator;
    assert_eq!(op.metric("nixops_deployments_total", &["result=\"Succeeded\""]), 2.0);
    assert_eq!(op.metric("nixops_pushed_paths_total", &[]), (full.len() + 2) as f64);
    assert!(op.metric("nixops_pushed_bytes_total", &["kind=\"nar\""]) > 0.0);
}

#[tokio::test]
async fn failing_activation_rolls_back_and_stalls() {
    let fleet = Fleet::start("deploy-fail", json!({})).await;
    let node = fleet.node();
    let n = nonce();
    let good = system("db", &n, &[("postgres", "15")], Activation::Ok);
    fleet.create("db", &node, json!({"closure": good}), json!({})).await;
    fleet.wait_running("db", &good).await;

    let bad = system("db", &n, &[("postgres", "16")], Activation::Fail);
    fleet.set_closure("db", &bad).await;
    let m = fleet.wait_stalled("db", "Failed").await;
    let record = last_deploy(&m);
    assert_eq!(record.result.as_deref(), Some("Failed"));
    let message = record.message.unwrap();
    assert!(message.contains("switch-to-configuration switch") && message.contains("exit status 1"), "{message}");
    assert!(message.contains(&format!("rolled back to {good}")), "{message}");
    assert_eq!(m.status.clone().unwrap().phase, Some(MachinePhase::Failed));
    // Rolled back: the good system is active again.
    assert_eq!(node.current_system().as_deref(), Some(good.as_str()));
    assert_eq!(node.activations(), vec![format!("switch {good}"), format!("switch {bad}"), format!("switch {good}")]);
    assert!(fleet.event_reasons().await.contains(&"Failed".to_owned()));

    // Not retried while the spec stays the same.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(node.activations().len(), 3);

    // A fixed closure deploys.
    let fixed = system("db", &n, &[("postgres", "16.1")], Activation::Ok);
    fleet.set_closure("db", &fixed).await;
    fleet.wait_running("db", &fixed).await;
    node.verify();
}

/// Deploys three failing closures in a row to `name` after `good`: each
/// leaves the machine on `good`, with no failed generation in its profile;
/// then a good closure deploys.
async fn fail_three_times(fleet: &Fleet, name: &str, magic: bool) {
    let node = fleet.node();
    let n = nonce();
    let good = system(name, &n, &[("app", "good")], Activation::Ok);
    let rollback = json!({"magic": magic, "confirmTimeoutSeconds": 5});
    fleet.create(name, &node, json!({"closure": good, "rollback": rollback}), json!({})).await;
    fleet.wait_running(name, &good).await;
    let good_generations = node.generations();
    assert_eq!(good_generations.len(), 1, "{good_generations:?}");

    for attempt in 1..=3 {
        let bad = system(name, &n, &[("app", &format!("bad {attempt}"))], Activation::Fail);
        fleet.set_closure(name, &bad).await;
        let m = fleet.wait_result(name, &bad, "Failed").await;
        let message = last_deploy(&m).message.unwrap();
        assert!(message.contains(&format!("rolled back to {good}")), "attempt {attempt} (magic {magic}): {message}");
        assert_eq!(node.current_system().as_deref(), Some(good.as_str()), "attempt {attempt} (magic {magic})");
        assert_eq!(node.profile().as_deref(), Some(good.as_str()), "attempt {attempt}: the boot default is good");
        assert_eq!(node.generations(), good_generations, "attempt {attempt}: failed generations are removed");
    }
    let fixed = system(name, &n, &[("app", "fixed")], Activation::Ok);
    fleet.set_closure(name, &fixed).await;
    fleet.wait_running(name, &fixed).await;
    assert_eq!(node.profile().as_deref(), Some(fixed.as_str()));
    // With magic rollback the confirmed system outlives the watchdog's window.
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert_eq!(node.current_system().as_deref(), Some(fixed.as_str()), "magic {magic}: still on the confirmed system");
    let activations = node.activations();
    assert_eq!(activations.len(), 1 + 3 * 2 + 1, "{activations:?}");
    assert_eq!(activations.last(), Some(&format!("switch {fixed}")));
}

#[tokio::test]
async fn failing_deploys_in_a_row_each_leave_the_last_good_system() {
    let fleet = Fleet::start("deploy-fail-row", json!({})).await;
    tokio::join!(fail_three_times(&fleet, "magic", true), fail_three_times(&fleet, "plain", false));
}

#[tokio::test]
async fn a_hung_activation_is_stopped_and_rolled_back() {
    let fleet = Fleet::start("deploy-hang", json!({})).await;
    let node = fleet.node();
    let n = nonce();
    let good = system("slow", &n, &[("app", "v1")], Activation::Ok);
    fleet.create("slow", &node, json!({"closure": good, "activationTimeoutSeconds": 10}), json!({})).await;
    fleet.wait_running("slow", &good).await;
    let hung = system("slow", &n, &[("app", "v2")], Activation::Hang);
    fleet.set_closure("slow", &hung).await;
    let m = fleet.wait_result("slow", &hung, "Failed").await;
    let message = last_deploy(&m).message.unwrap();
    assert!(message.contains("ran longer than 10 s") && message.contains("activationTimeoutSeconds"), "{message}");
    assert_eq!(node.current_system().as_deref(), Some(good.as_str()));
    assert_eq!(node.profile().as_deref(), Some(good.as_str()));
    let hang = support::node::hang_command(&n);
    assert!(node.exec(&format!("pgrep -f '^{hang}'")).stdout.is_empty(), "the hung switch was stopped");
}

/// A push the machine's store cannot take (its disk is full) stalls with
/// what nix-store said, and goes through once there is room.
#[tokio::test]
async fn a_full_disk_on_the_machine_stalls_with_its_cause() {
    let fleet = Fleet::start("deploy-disk", json!({})).await;
    let node = fleet.node();
    // 256 KiB for the store: the closure below needs more.
    node.exec_ok("mount -t tmpfs -o size=256k tmpfs /nix/store");
    let n = nonce();
    let big = "x".repeat(1 << 20);
    let sys = system("full", &n, &[("blob", big.as_str())], Activation::Ok);
    fleet.create("full", &node, json!({"closure": sys}), json!({})).await;
    let m = fleet.wait_stalled("full", "MachineDiskFull").await;
    let message = support::condition_message(&m.status.unwrap().conditions, "Stalled");
    assert!(message.contains("No space left on device"), "the machine's own words: {message}");
    assert!(message.contains("nix-collect-garbage"), "and the fix: {message}");
    assert!(node.current_system().is_none());

    node.exec_ok("mount -o remount,size=64m /nix/store");
    fleet.nudge("full").await;
    fleet.wait_running("full", &sys).await;
    node.verify();
}

/// A path whose bytes in the source store no longer match its recorded
/// hash: the machine's nix-store refuses it, which no retry can heal, so
/// the Machine stalls naming the cause, and the machine registers none of
/// it. Once the source is repaired, the next look deploys.
#[tokio::test]
async fn a_source_path_that_does_not_match_its_hash_stalls_as_corrupt() {
    let fleet = Fleet::start("deploy-corrupt", json!({})).await;
    let node = fleet.node();
    let n = nonce();
    let genuine = "genuine bytes";
    let sys = system("rot", &n, &[("blob", genuine)], Activation::Ok);
    let pkg = closure(&sys).into_iter().find(|p| p.ends_with("-blob")).expect("the blob package");
    let file = format!("{pkg}/blob");
    // The same length, so only the hash tells.
    let rewrite = |content: &str| {
        let chmod = |mode: &str, path: &str| {
            assert!(std::process::Command::new("chmod").args([mode, path]).status().unwrap().success());
        };
        chmod("u+w", &pkg);
        chmod("u+w", &file);
        std::fs::write(&file, content).unwrap();
        chmod("a-w", &file);
        chmod("a-w", &pkg);
    };
    rewrite("tampered byte");

    fleet.create("rot", &node, json!({"closure": sys}), json!({})).await;
    let m = fleet.wait_stalled("rot", "CorruptClosure").await;
    let message = support::condition_message(&m.status.unwrap().conditions, "Stalled");
    assert!(message.contains("hash mismatch"), "the machine's own words: {message}");
    assert!(message.contains("repair the source"), "and the fix: {message}");
    assert!(!node.has_path(&pkg), "nothing of the corrupt path is registered");
    assert!(node.current_system().is_none());

    rewrite(genuine);
    fleet.nudge("rot").await;
    fleet.wait_running("rot", &sys).await;
    node.verify();
}

/// Client ports of the logged-in SSH connections open at the end of `log`
/// (sshd's); a connection that never logs in (a host-key scan) is not one.
fn open_connections(log: &str) -> std::collections::BTreeSet<String> {
    let port = |line: &str, prefix: &str| {
        line.split_once(prefix).and_then(|(_, rest)| rest.split([' ', ':']).next()).map(str::to_owned)
    };
    let mut open = std::collections::BTreeSet::new();
    for line in log.lines() {
        if let Some(p) = port(line, "Accepted publickey for root from 127.0.0.1 port ") {
            open.insert(p);
        } else if let Some(p) = ["Disconnected from user root 127.0.0.1 port ", "Disconnected from 127.0.0.1 port "]
            .iter()
            .chain(&["Connection closed by 127.0.0.1 port ", "Connection reset by 127.0.0.1 port "])
            .find_map(|prefix| port(line, prefix))
        {
            open.remove(&p);
        }
    }
    open
}

/// A deployment that follows a look at an up-to-date machine starts on
/// the SSH session that look logged in with (kept as NixOps kept an SSH
/// ControlMaster): the deployment's commands arrive over a connection that
/// was open before the closure changed. After the activation that session
/// is closed, not kept: the next look logs in anew, so the new system
/// proves it accepts new logins.
#[tokio::test]
async fn a_deployment_after_a_look_starts_on_the_session_that_look_kept() {
    let fleet = Fleet::start("deploy-kept", json!({})).await;
    let node = fleet.node();
    let n = nonce();
    let v1 = system("kept", &n, &[("app", "v1")], Activation::Ok);
    let v2 = system("kept", &n, &[("app", "v2")], Activation::Ok);
    fleet.create("kept", &node, json!({"closure": v1}), json!({})).await;
    fleet.wait_running("kept", &v1).await;
    // Looks every 2 s; one that found the machine up to date keeps its session.
    let deadline = std::time::Instant::now() + TIMEOUT;
    let (before, kept) = loop {
        let log = node.sshd_log();
        let open = open_connections(&log);
        if !open.is_empty() {
            break (log.len(), open);
        }
        assert!(std::time::Instant::now() < deadline, "no session was kept after a look:\n{log}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    fleet.set_closure("kept", &v2).await;
    fleet.wait_running("kept", &v2).await;
    let log = node.sshd_log();
    let after = &log[before..];
    let on_kept = after
        .lines()
        .filter(|l| l.contains("Starting session: command"))
        .filter(|l| kept.iter().any(|p| l.contains(&format!("127.0.0.1 port {p} "))))
        .count();
    // Probe, key sync, the serve connection (which also carries the push), the activation, its settling.
    assert!(on_kept >= 4, "the deployment ran {on_kept} commands on the kept session {kept:?}:\n{after}");
    let deadline = std::time::Instant::now() + TIMEOUT;
    while kept.iter().any(|p| open_connections(&node.sshd_log()).contains(p)) {
        assert!(std::time::Instant::now() < deadline, "the session was kept after the activation");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn failing_health_check_rolls_back() {
    let fleet = Fleet::start("deploy-health", json!({})).await;
    let node = fleet.node();
    let n = nonce();
    let good = system("app", &n, &[("app", "v1")], Activation::Ok);
    let checks = json!([{"command": "test -e /run/current-system/sw/bin/nginx"}]);
    // The first system passes (it has no nginx, so check something it does have).
    fleet
        .create("app", &node, json!({"closure": good, "healthChecks": [{"command": "test -x /run/current-system/bin/switch-to-configuration"}]}), json!({}))
        .await;
    let m = fleet.wait_running("app", &good).await;
    assert_eq!(support::condition(&m.status.unwrap().conditions, "Healthy").as_deref(), Some("True"));

    let next = system("app", &n, &[("app", "v2")], Activation::Ok);
    let patch = json!({"spec": {"nixos": {"closure": next, "healthChecks": checks}}});
    fleet.machines.patch("app", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    let m = fleet.wait_stalled("app", "RolledBack").await;
    let message = last_deploy(&m).message.unwrap();
    assert!(message.contains("spec.nixos.healthChecks[0]"), "{message}");
    assert_eq!(support::condition(&m.status.unwrap().conditions, "Healthy").as_deref(), Some("False"));
    assert_eq!(node.current_system().as_deref(), Some(good.as_str()));
}

#[tokio::test]
async fn magic_rollback_when_the_new_system_breaks_ssh() {
    let fleet = Fleet::start("deploy-magic", json!({})).await;
    let node = fleet.node();
    let n = nonce();
    let good = system("edge", &n, &[("sshd", "ok")], Activation::Ok);
    let rollback = json!({"magic": true, "confirmTimeoutSeconds": 5});
    fleet.create("edge", &node, json!({"closure": good, "rollback": rollback}), json!({})).await;
    fleet.wait_running("edge", &good).await;

    let broken = system("edge", &n, &[("sshd", "locked out")], Activation::BreakSsh);
    fleet.set_closure("edge", &broken).await;
    let m = fleet.wait_stalled("edge", "RolledBack").await;
    let message = last_deploy(&m).message.unwrap();
    assert!(message.contains("magic rollback"), "{message}");
    // The machine reverted by itself and SSH works again.
    assert_eq!(node.current_system().as_deref(), Some(good.as_str()));
    let activations = node.activations();
    assert_eq!(activations.last(), Some(&format!("switch {good}")), "{activations:?}");
    assert_eq!(activations.len(), 3, "{activations:?}");
}

#[tokio::test]
async fn drift_is_corrected_or_reported() {
    let fleet = Fleet::start("deploy-drift", json!({})).await;
    let corrected = fleet.node();
    let reported = fleet.node();
    let n = nonce();
    let sys_a = system("a", &n, &[("pkg", "a")], Activation::Ok);
    let sys_b = system("b", &n, &[("pkg", "b")], Activation::Ok);
    fleet.create("a", &corrected, json!({"closure": sys_a}), json!({})).await;
    fleet.create("b", &reported, json!({"closure": sys_b, "drift": "Report"}), json!({})).await;
    fleet.wait_running("a", &sys_a).await;
    fleet.wait_running("b", &sys_b).await;

    // Someone activates another system by hand on both machines.
    for node in [&corrected, &reported] {
        let out = node.exec("ln -sfn /nix/var/nix/profiles/system-1-link/bin /run/current-system");
        assert!(out.status.success());
    }
    // Correct: activated again on the next resync.
    support::wait_for(&fleet.machines, "a", TIMEOUT, "drift corrected", |_| {
        corrected.current_system().as_deref() == Some(sys_a.as_str())
    })
    .await;
    assert_eq!(corrected.activations().len(), 2);
    // Report: InSync=False, nothing activated.
    support::wait_for(&fleet.machines, "b", TIMEOUT, "InSync=False", |m| {
        m.status.as_ref().and_then(|s| support::condition(&s.conditions, "InSync")).as_deref() == Some("False")
    })
    .await;
    assert_eq!(reported.activations().len(), 1);
    assert_ne!(reported.current_system().as_deref(), Some(sys_b.as_str()));
    let reasons = fleet.event_reasons().await;
    assert!(
        reasons.contains(&"CorrectingDrift".to_owned()) && reasons.contains(&"DriftDetected".to_owned()),
        "{reasons:?}"
    );
}

#[tokio::test]
async fn keys_land_with_owner_and_mode_and_follow_the_secret() {
    let fleet = Fleet::start("deploy-keys", json!({})).await;
    let node = fleet.node();
    let secrets: Api<Secret> = Api::namespaced(fleet.client.clone(), &fleet.ns);
    let secret_value = format!("s3cret-{}", nonce());
    let secret: Secret = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "db"}, "stringData": {"password": secret_value}
    }))
    .unwrap();
    secrets.create(&PostParams::default(), &secret).await.unwrap();
    let n = nonce();
    let sys = system("db", &n, &[("postgres", "15")], Activation::Ok);
    let keys = json!([{"name": "db-password", "secretRef": {"name": "db", "key": "password"},
                       "destDir": "/run/keys", "user": "nobody", "group": "nogroup", "permissions": "0440"}]);
    fleet.create("db", &node, json!({"closure": sys}), json!({"keys": keys})).await;
    let m = fleet.wait_running("db", &sys).await;
    assert_eq!(m.status.unwrap().keys, vec!["/run/keys/db-password".to_owned()]);
    let stat = |node: &NixNode| {
        let out = node.exec("stat -c '%U %G %a' /run/keys/db-password && cat /run/keys/db-password");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert_eq!(stat(&node), format!("nobody nogroup 440\n{secret_value}"));

    // A new Secret value is written again.
    let rotated = format!("rotated-{}", nonce());
    let patch = json!({"stringData": {"password": rotated}});
    secrets.patch("db", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    support::wait_for(&fleet.machines, "db", TIMEOUT, "the rotated key on the machine", |_| {
        stat(&node).ends_with(&rotated)
    })
    .await;

    // Removed from the spec: removed from the machine.
    let patch = json!({"spec": {"keys": null}});
    fleet.machines.patch("db", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    support::wait_for(&fleet.machines, "db", TIMEOUT, "the key removed", |m| {
        m.status.as_ref().is_some_and(|s| s.keys.is_empty())
    })
    .await;
    assert!(!node.exec("test -e /run/keys/db-password").status.success());
    // No temporary files left behind, and the value never logged.
    let leftovers = node.exec("ls -A /run/keys");
    assert_eq!(String::from_utf8_lossy(&leftovers.stdout).trim(), "");
    let logs = fleet.operator.logs();
    assert!(!logs.contains(&secret_value) && !logs.contains(&rotated), "a key's value appears in the operator log");
}

#[tokio::test]
async fn a_changed_host_key_stops_all_work() {
    let fleet = Fleet::start("deploy-hostkey", json!({})).await;
    let node = fleet.node();
    let other = fleet.node();
    let n = nonce();
    let sys = system("web", &n, &[("www", "index")], Activation::Ok);
    fleet
        .create(
            "web",
            &node,
            json!({"closure": sys}),
            json!({"ssh": {"keyPairRef": {"name": "deployer"}, "hostKey": other.host_key()}}),
        )
        .await;
    let m = fleet.wait_stalled("web", "HostKeyMismatch").await;
    let message = support::condition_message(&m.status.unwrap().conditions, "Stalled");
    assert!(message.contains("SHA256:"), "both fingerprints are shown: {message}");
    assert!(node.store_paths().is_empty(), "nothing was pushed to an unverified host");
    assert!(node.activations().is_empty());
}

/// Trust on first use survives a failing reconcile: the host key seen at
/// first contact is recorded although the login is then rejected (the
/// normal bootstrap, before the key is authorised), and enforced afterwards.
#[tokio::test]
async fn the_first_host_key_is_recorded_although_the_login_is_rejected() {
    let fleet = Fleet::start("deploy-tofu", json!({})).await;
    let stranger = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHsf5n2k2cOqRk8yE1xXKmbvmN4QUeTSR3dOzU6pD6VJ someone-else";
    let node = NixNode::start(stranger);
    let n = nonce();
    let sys = system("tofu", &n, &[("www", "index")], Activation::Ok);
    fleet.create("tofu", &node, json!({"closure": sys}), json!({})).await;
    let m = fleet.wait_stalled("tofu", "AuthRejected").await;
    let recorded = m.status.unwrap().host_key.expect("status.hostKey recorded at first contact");
    assert_eq!(recorded.split_whitespace().take(2).collect::<Vec<_>>().join(" "), node.host_key());

    // Authorising the key lets the deployment through, with the recorded key.
    node.exec_ok(&format!("echo '{}' > {}", fleet.public_key, support::node::AUTHORIZED_KEYS));
    fleet.nudge("tofu").await;
    fleet.wait_running("tofu", &sys).await;
}

/// Nodes with ed25519, RSA and ECDSA host keys: an RSA or ECDSA key in
/// spec.ssh.hostKey is the key the node proves (russh alone would ask for
/// ed25519 and find a mismatch), a wrong key of the pinned type is still
/// refused naming both, and first contact records the ed25519 key, once.
#[tokio::test]
async fn host_keys_of_any_type_can_be_pinned_and_first_contact_records_one() {
    use nixops_operator::ssh::HostKey;
    let fleet = Fleet::start("deploy-hostkey-types", json!({})).await;
    let setup = NodeSetup { host_keys: vec!["rsa", "ecdsa"], ..NodeSetup::default() };
    let [rsa, ecdsa, wrong, tofu]: [NixNode; 4] = std::array::from_fn(|_| fleet.node_with(&setup));
    let n = nonce();
    let key = |line: &str| HostKey::parse(line, "host key").unwrap();
    let pinned = |pin: String| json!({"ssh": {"keyPairRef": {"name": "deployer"}, "hostKey": pin}});
    let mut systems = Vec::new();
    for (name, node, extra) in [
        ("rsa", &rsa, pinned(rsa.host_key_of("rsa"))),
        ("ecdsa", &ecdsa, pinned(ecdsa.host_key_of("ecdsa"))),
        ("wrong", &wrong, pinned(rsa.host_key_of("rsa"))),
        ("tofu", &tofu, json!({})),
    ] {
        let sys = system(name, &n, &[("www", name)], Activation::Ok);
        fleet.create(name, node, json!({"closure": sys}), extra).await;
        systems.push(sys);
    }

    for (name, node, kind, sys) in [("rsa", &rsa, "rsa", &systems[0]), ("ecdsa", &ecdsa, "ecdsa", &systems[1])] {
        let m = fleet.wait_running(name, sys).await;
        assert_eq!(node.current_system().as_deref(), Some(sys.as_str()), "{name}");
        let recorded = m.status.unwrap().host_key.expect("status.hostKey");
        assert_eq!(key(&recorded), key(&node.host_key_of(kind)), "{name}: the pinned key is the one recorded");
    }

    let m = fleet.wait_stalled("wrong", "HostKeyMismatch").await;
    let message = support::condition_message(&m.status.unwrap().conditions, "Stalled");
    let (presented, pin) = (key(&wrong.host_key_of("rsa")), key(&rsa.host_key_of("rsa")));
    assert!(
        message.contains(&presented.fingerprint()) && message.contains(&pin.fingerprint()),
        "the node's RSA key and the pinned one are both named: {message}"
    );
    assert!(wrong.store_paths().is_empty(), "nothing was pushed to an unverified host");

    // First contact: the ed25519 key, recorded once and kept through resyncs
    // (every 2 s here) and reconnections.
    let m = fleet.wait_running("tofu", &systems[3]).await;
    let recorded = m.status.unwrap().host_key.expect("status.hostKey recorded at first contact");
    assert_eq!(key(&recorded), key(&tofu.host_key()));
    tokio::time::sleep(Duration::from_secs(6)).await;
    let m = fleet.machines.get("tofu").await.unwrap();
    let status = m.status.unwrap();
    assert_eq!(status.host_key.as_deref(), Some(recorded.as_str()));
    assert!(support::is_ready(&status.conditions), "{:?}", status.conditions);
    let events: Api<Event> = Api::namespaced(fleet.client.clone(), &fleet.ns);
    let events = events.list(&ListParams::default()).await.unwrap().items;
    let recorded_events = |name: &str| {
        events
            .iter()
            .filter(|e| {
                e.involved_object.name.as_deref() == Some(name) && e.reason.as_deref() == Some("HostKeyRecorded")
            })
            .count()
    };
    assert_eq!(recorded_events("tofu"), 1, "the key is recorded at first contact only");
    assert_eq!(recorded_events("rsa"), 0, "a key the spec pins is not news");
}

/// spec.ssh.user other than root: the push, the activation (with magic
/// rollback's confirmation) and the keys all run as root through
/// passwordless sudo, and the machine runs the closure.
#[tokio::test]
async fn a_non_root_user_with_passwordless_sudo_deploys() {
    let fleet = Fleet::start("deploy-sudo", json!({})).await;
    let node = fleet.node_with(&NodeSetup {
        users: vec![NodeUser { name: "deployer".into(), sudo: true }],
        ..NodeSetup::default()
    });
    let secrets: Api<Secret> = Api::namespaced(fleet.client.clone(), &fleet.ns);
    let secret_value = format!("s3cret-{}", nonce());
    let secret: Secret = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "app"}, "stringData": {"token": secret_value}
    }))
    .unwrap();
    secrets.create(&PostParams::default(), &secret).await.unwrap();
    let n = nonce();
    let sys = system("app", &n, &[("app", "v1"), ("lib", "v1")], Activation::Ok);
    let keys = json!([{"name": "token", "secretRef": {"name": "app", "key": "token"},
                       "destDir": "/run/keys", "user": "nobody", "group": "nogroup", "permissions": "0400"}]);
    let ssh = json!({"user": "deployer", "keyPairRef": {"name": "deployer"}});
    fleet.create("app", &node, json!({"closure": sys}), json!({"ssh": ssh, "keys": keys})).await;
    let m = fleet.wait_running("app", &sys).await;
    assert_eq!(last_deploy(&m).paths_copied, closure(&sys).len() as i64);
    assert_eq!(node.current_system().as_deref(), Some(sys.as_str()));
    assert_eq!(node.activations(), vec![format!("switch {sys}")]);
    assert_eq!(node.profile().as_deref(), Some(sys.as_str()));
    node.verify();
    let key_file = node.exec_ok("stat -c '%U %G %a' /run/keys/token && cat /run/keys/token");
    assert_eq!(key_file, format!("nobody nogroup 400\n{secret_value}"));
    let log = node.sshd_log();
    assert!(log.contains("Accepted publickey for deployer"), "{log}");
    assert!(!log.contains("Accepted publickey for root"), "the operator logged in as root: {log}");
}

/// A spec.ssh.user without passwordless sudo stalls, saying so, before
/// anything is pushed or activated.
#[tokio::test]
async fn a_user_without_passwordless_sudo_stalls_naming_spec_ssh_user() {
    let fleet = Fleet::start("deploy-nosudo", json!({})).await;
    let node = fleet
        .node_with(&NodeSetup { users: vec![NodeUser { name: "intern".into(), sudo: false }], ..NodeSetup::default() });
    let n = nonce();
    let sys = system("intern", &n, &[("app", "v1")], Activation::Ok);
    let ssh = json!({"user": "intern", "keyPairRef": {"name": "deployer"}});
    fleet.create("intern", &node, json!({"closure": sys}), json!({"ssh": ssh})).await;
    let m = fleet.wait_stalled("intern", "SudoRefused").await;
    let message = support::condition_message(&m.status.unwrap().conditions, "Stalled");
    assert!(message.contains("spec.ssh.user (intern)") && message.contains("passwordless sudo"), "{message}");
    assert!(node.store_paths().is_empty(), "nothing was pushed");
    assert!(node.activations().is_empty());
}

#[tokio::test]
async fn rollout_halts_when_a_machine_fails() {
    let fleet = Fleet::start("deploy-rollout", json!({"rollout": {"maxUnavailable": 1}})).await;
    let nodes: Vec<NixNode> = (0..3).map(|_| fleet.node()).collect();
    let n = nonce();
    let mut v1 = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        let sys = system(&format!("m{i}"), &n, &[("app", "v1")], Activation::Ok);
        fleet.create(&format!("m{i}"), node, json!({"closure": sys}), json!({})).await;
        v1.push(sys);
    }
    for (i, sys) in v1.iter().enumerate() {
        fleet.wait_running(&format!("m{i}"), sys).await;
    }
    let networks: Api<Network> = Api::namespaced(fleet.client.clone(), &fleet.ns);
    support::wait_for(&networks, "net", TIMEOUT, "3 updated machines", |n| {
        n.status.as_ref().is_some_and(|s| s.updated_machines == Some(3))
    })
    .await;

    // Every machine gets a new system that fails to activate: the first to
    // go fails and halts the rollout, so the other two stay on v1.
    for i in 0..3 {
        let sys = system(&format!("m{i}"), &n, &[("app", "v2")], Activation::Fail);
        fleet.set_closure(&format!("m{i}"), &sys).await;
    }
    support::wait_for(&networks, "net", TIMEOUT, "the rollout halted", |n| {
        n.status
            .as_ref()
            .is_some_and(|s| s.conditions.iter().any(|c| c.type_ == "RolledOut" && c.reason == "RolloutHalted"))
    })
    .await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let machines = fleet.machines.list(&ListParams::default()).await.unwrap().items;
    let failed: Vec<&Machine> = machines
        .iter()
        .filter(|m| {
            m.status.as_ref().and_then(|s| s.last_deploy.as_ref()).and_then(|l| l.result.as_deref()) == Some("Failed")
        })
        .collect();
    assert_eq!(failed.len(), 1, "exactly one machine tried and failed");
    let on_v1 =
        nodes.iter().zip(&v1).filter(|(node, sys)| node.current_system().as_deref() == Some(sys.as_str())).count();
    assert_eq!(on_v1, 3, "the failed machine rolled back and the others never left v1");
    let halted = machines
        .iter()
        .filter(|m| m.status.as_ref().is_some_and(|s| s.conditions.iter().any(|c| c.reason == "RolloutHalted")))
        .count();
    assert_eq!(halted, 2, "the other two wait, saying why");
}

/// A signed binary cache holding `closure`, written by Nix itself.
struct SignedCache {
    dir: tempfile::TempDir,
    public_key: String,
}

impl SignedCache {
    fn new(closure: &str, key_name: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (secret, public) = (dir.path().join("key.sec"), dir.path().join("key.pub"));
        let out = std::process::Command::new("nix-store")
            .args(["--generate-binary-cache-key", key_name])
            .args([&secret, &public])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let store = dir.path().join("cache");
        let url = format!("file://{}?compression=zstd&secret-key={}", store.display(), secret.display());
        let out = std::process::Command::new("nix")
            .args(["--extra-experimental-features", "nix-command", "copy", "--to", &url, closure])
            .output()
            .unwrap();
        assert!(out.status.success(), "nix copy: {}", String::from_utf8_lossy(&out.stderr));
        let public_key = std::fs::read_to_string(public).unwrap().trim().to_owned();
        Self { dir, public_key }
    }

    fn url(&self) -> String {
        format!("file://{}", self.dir.path().join("cache").display())
    }
}

impl SignedCache {
    /// A copy of this cache where `path` has other contents (`from`
    /// replaced by `to`, same length), re-signed with a key of its own: the
    /// same store path name, different bytes, a different signer.
    fn forged(&self, path: &str, from: &str, to: &str, key_name: &str) -> Self {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD;
        let dir = tempfile::tempdir().unwrap();
        let copied =
            std::process::Command::new("cp").arg("-a").arg(self.dir.path().join("cache")).arg(dir.path()).status();
        assert!(copied.unwrap().success());
        let (secret, public) = (dir.path().join("key.sec"), dir.path().join("key.pub"));
        let out = std::process::Command::new("nix-store")
            .args(["--generate-binary-cache-key", key_name])
            .args([&secret, &public])
            .output()
            .unwrap();
        assert!(out.status.success());
        let cache = dir.path().join("cache");
        let secret_text = std::fs::read_to_string(&secret).unwrap();
        let (name, key) = secret_text.trim().split_once(':').unwrap();
        let key = b64.decode(key).unwrap();
        let signer = ring::signature::Ed25519KeyPair::from_seed_unchecked(&key[..32]).unwrap();
        let sha = |bytes: &[u8]| {
            format!(
                "sha256:{}",
                nixops_operator::nix::base32::encode(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref())
            )
        };
        for entry in std::fs::read_dir(&cache).unwrap() {
            let narinfo_file = entry.unwrap().path();
            if narinfo_file.extension().is_none_or(|e| e != "narinfo") {
                continue;
            }
            let narinfo = std::fs::read_to_string(&narinfo_file).unwrap();
            let field = |name: &str| {
                narinfo.lines().find_map(|l| l.strip_prefix(&format!("{name}: "))).unwrap_or_default().to_owned()
            };
            let mut fields: Vec<(String, String)> =
                narinfo.lines().filter_map(|l| l.split_once(": ")).map(|(k, v)| (k.to_owned(), v.to_owned())).collect();
            let mut set = |k: &str, v: String| {
                fields.iter_mut().filter(|(key, _)| key == k).for_each(|(_, old)| *old = v.clone())
            };
            let (mut nar_hash, mut nar_size) = (field("NarHash"), field("NarSize"));
            if field("StorePath") == path {
                let mut nar = zstd::decode_all(&std::fs::read(cache.join(field("URL"))).unwrap()[..]).unwrap();
                assert_eq!(from.len(), to.len(), "a NAR keeps its lengths");
                let at = nar.windows(from.len()).position(|w| w == from.as_bytes()).expect("the content to replace");
                nar[at..at + to.len()].copy_from_slice(to.as_bytes());
                let file = zstd::encode_all(&nar[..], 3).unwrap();
                let file_hash = sha(&file);
                let url = format!("nar/{}.nar.zst", file_hash.trim_start_matches("sha256:"));
                std::fs::write(cache.join(&url), &file).unwrap();
                (nar_hash, nar_size) = (sha(&nar), nar.len().to_string());
                set("URL", url);
                set("FileHash", file_hash);
                set("FileSize", file.len().to_string());
                set("NarHash", nar_hash.clone());
                set("NarSize", nar_size.clone());
            }
            let references: Vec<String> =
                field("References").split_whitespace().map(|r| format!("/nix/store/{r}")).collect();
            let fingerprint = format!("1;{};{nar_hash};{nar_size};{}", field("StorePath"), references.join(","));
            set("Sig", format!("{name}:{}", b64.encode(signer.sign(fingerprint.as_bytes()).as_ref())));
            let text: String = fields.iter().map(|(k, v)| format!("{k}: {v}\n")).collect();
            std::fs::write(&narinfo_file, text).unwrap();
        }
        let public_key = std::fs::read_to_string(public).unwrap().trim().to_owned();
        Self { dir, public_key }
    }
}

/// Trust never crosses between Machines: the same store path, different in
/// two caches each Machine trusts alone, reaches each machine as its own
/// cache signed it, although the operator keeps pushed paths for reuse.
#[tokio::test]
async fn each_machine_gets_the_bytes_its_own_cache_signed() {
    let fleet = Fleet::start("deploy-trust", json!({})).await;
    let n = nonce();
    let sys = system("trust", &n, &[("lib", "genuine"), ("bin", "tool")], Activation::Ok);
    let lib = closure(&sys).into_iter().find(|p| p.ends_with("-lib")).expect("the lib path");
    let a = SignedCache::new(&sys, &format!("a-{n}-1"));
    let b = a.forged(&lib, "genuine", "forgery", &format!("b-{n}-1"));

    let node_a = fleet.node();
    let source_a = json!({"binaryCache": {"url": a.url(), "publicKeys": [a.public_key]}});
    fleet.create("a", &node_a, json!({"closure": sys, "source": source_a}), json!({})).await;
    fleet.wait_running("a", &sys).await;
    // Then the other Machine, while the operator still holds what it pushed to the first.
    let node_b = fleet.node();
    let source_b = json!({"binaryCache": {"url": b.url(), "publicKeys": [b.public_key]}});
    fleet.create("b", &node_b, json!({"closure": sys, "source": source_b}), json!({})).await;
    fleet.wait_running("b", &sys).await;

    assert_eq!(node_a.exec_ok(&format!("cat {lib}/lib")), "genuine");
    assert_eq!(node_b.exec_ok(&format!("cat {lib}/lib")), "forgery", "machine b got the bytes its cache signed");
    node_a.verify();
    node_b.verify();
}

/// A cache whose NAR never ends is refused once it passes the size its
/// narinfo signed, and the operator's memory stays flat.
/// The operator's resident memory, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmRSS")
}

/// A path far larger than a push's chunks (96 MiB of random bytes, which
/// no compressor shrinks) goes from the source to the machine in pieces:
/// from the operator host's store and from a signed binary cache alike,
/// the operator's memory stays flat while it pushes.
#[tokio::test]
async fn a_large_path_is_streamed_without_growing_the_operator() {
    let fleet = Fleet::start("deploy-large", json!({})).await;
    let n = nonce();
    let sys = system("large", &n, &[("blob", "random-mib:96")], Activation::Ok);
    let blob = closure(&sys).into_iter().find(|p| p.ends_with("-blob")).expect("the blob package");
    let cache = SignedCache::new(&sys, &format!("cache-{n}-large"));
    let local = fleet.node();
    let cached = fleet.node();
    let pid = fleet.operator.pid();
    let before = rss_kib(pid);
    let peak = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(before));
    let sampling = {
        let peak = peak.clone();
        tokio::spawn(async move {
            loop {
                peak.fetch_max(rss_kib(pid), std::sync::atomic::Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    fleet.create("local", &local, json!({"closure": sys}), json!({})).await;
    fleet.wait_running("local", &sys).await;
    let source = json!({"binaryCache": {"url": cache.url(), "publicKeys": [cache.public_key]}});
    fleet.create("cached", &cached, json!({"closure": sys, "source": source}), json!({})).await;
    fleet.wait_running("cached", &sys).await;
    sampling.abort();
    let grown_mib = peak.load(std::sync::atomic::Ordering::Relaxed).saturating_sub(before) / 1024;
    for node in [&local, &cached] {
        assert!(node.has_path(&blob));
        node.verify();
    }
    println!("pushed a 96 MiB path twice; the operator grew by {grown_mib} MiB");
    // Whole, the path would be held two or three times over (NAR, record, compressed).
    assert!(grown_mib < 64, "the operator grew by {grown_mib} MiB pushing a 96 MiB path");
}

#[tokio::test]
async fn an_endless_nar_is_refused_without_growing_the_operator() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fleet = Fleet::start("deploy-endless", json!({})).await;
    let n = nonce();
    let sys = system("endless", &n, &[("lib", "libfoo")], Activation::Ok);
    let cache = SignedCache::new(&sys, &format!("cache-{n}-1"));
    // Serves the cache's files, except that every NAR is an endless stream.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let root = cache.dir.path().join("cache");
    let served = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counter = served.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut conn, _)) = listener.accept().await else { return };
            let root = root.clone();
            let counter = counter.clone();
            tokio::spawn(async move {
                let mut request = vec![0u8; 4096];
                let n = conn.read(&mut request).await.unwrap_or(0);
                let request = String::from_utf8_lossy(&request[..n]).to_string();
                let path = request.split_whitespace().nth(1).unwrap_or("/").trim_start_matches('/').to_owned();
                if path.starts_with("nar/") {
                    let _ = conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n\r\n").await;
                    let chunk = vec![0u8; 1 << 16];
                    while conn.write_all(&chunk).await.is_ok() {
                        counter.fetch_add(chunk.len() as u64, std::sync::atomic::Ordering::Relaxed);
                    }
                } else if let Ok(body) = std::fs::read(root.join(&path)) {
                    let head =
                        format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
                    let _ = conn.write_all(head.as_bytes()).await;
                    let _ = conn.write_all(&body).await;
                } else {
                    let _ = conn
                        .write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                        .await;
                }
            });
        }
    });
    let rss = |pid: u32| -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    let before = rss(fleet.operator.pid());
    let node = fleet.node();
    let source = json!({"binaryCache": {"url": format!("http://127.0.0.1:{port}"), "publicKeys": [cache.public_key]}});
    fleet.create("endless", &node, json!({"closure": sys, "source": source}), json!({})).await;
    let m = fleet.wait_stalled("endless", "ClosureTooLarge").await;
    let message = support::condition_message(&m.status.unwrap().conditions, "Stalled");
    assert!(message.contains("FileSize") && message.contains("stopped reading"), "{message}");
    let after = rss(fleet.operator.pid());
    let sent = served.load(std::sync::atomic::Ordering::Relaxed);
    assert!(after < before + 64 * 1024, "RSS grew from {before} KiB to {after} KiB");
    assert!(sent < 64 << 20, "the operator stopped reading after {sent} bytes");
    assert!(node.store_paths().is_empty(), "nothing reached the machine");
}

#[tokio::test]
async fn closures_come_from_signed_binary_caches_pushed_or_substituted() {
    let fleet = Fleet::start("deploy-cache", json!({})).await;
    let n = nonce();
    let sys = system("cached", &n, &[("lib", "libfoo"), ("bin", "foo")], Activation::Ok);
    let cache = SignedCache::new(&sys, &format!("cache-{n}-1"));
    let stranger = SignedCache::new(&sys, &format!("other-{n}-1"));

    // Pushed by the operator from the cache.
    let pushed = fleet.node();
    let source = json!({"binaryCache": {"url": cache.url(), "publicKeys": [cache.public_key]}});
    fleet.create("pushed", &pushed, json!({"closure": sys, "source": source}), json!({})).await;
    let m = fleet.wait_running("pushed", &sys).await;
    assert_eq!(last_deploy(&m).paths_copied, closure(&sys).len() as i64);
    pushed.verify();

    // Signed by a key the Machine does not trust: refused, nothing copied.
    let refused = fleet.node();
    let untrusted = json!({"binaryCache": {"url": stranger.url(), "publicKeys": [cache.public_key]}});
    fleet.create("refused", &refused, json!({"closure": sys, "source": untrusted}), json!({})).await;
    let m = fleet.wait_stalled("refused", "UntrustedClosure").await;
    let message = support::condition_message(&m.status.unwrap().conditions, "Stalled");
    assert!(message.contains(&format!("other-{n}-1")), "names the key that signed it: {message}");
    assert!(refused.store_paths().is_empty(), "nothing reached the machine");

    // Substituted: the machine fetches from the cache itself.
    let substituted = fleet.node();
    let nixos = json!({"closure": sys, "source": source, "delivery": "Substitute"});
    fleet.create("substituted", &substituted, nixos, json!({})).await;
    fleet.wait_running("substituted", &sys).await;
    assert!(substituted.has_path(&sys));
    substituted.verify();
}

#[tokio::test]
async fn an_s3_bucket_serves_as_the_binary_cache() {
    use aws_sdk_s3::primitives::ByteStream;
    use nixops_operator::api::S3Bucket;
    let moto = support::moto();
    let fleet = Fleet::start(
        "deploy-s3",
        json!({"provider": {"ec2": {
            "region": "eu-west-1", "endpoint": moto.endpoint, "credentialsSecretRef": {"name": "aws"},
            "vpc": {"cidrBlock": "10.43.0.0/16"},
            "subnets": [{"name": "a", "cidrBlock": "10.43.1.0/24", "zone": "eu-west-1a"}]
        }}}),
    )
    .await;
    let secrets: Api<Secret> = Api::namespaced(fleet.client.clone(), &fleet.ns);
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": "aws"}, "stringData": {"accessKeyId": "testing", "secretAccessKey": "testing"}
    }))
    .unwrap();
    secrets.create(&PostParams::default(), &secret).await.unwrap();
    let buckets: Api<S3Bucket> = Api::namespaced(fleet.client.clone(), &fleet.ns);
    let bucket_name = format!("{}-nix", fleet.ns);
    let bucket: S3Bucket = serde_json::from_value(json!({
        "apiVersion": "nixops.io/v1alpha1", "kind": "S3Bucket", "metadata": {"name": "nix-cache"},
        "spec": {"networkRef": {"name": "net"}, "bucketName": bucket_name, "forceDestroy": true}
    }))
    .unwrap();
    buckets.create(&PostParams::default(), &bucket).await.unwrap();
    support::wait_for(&buckets, "nix-cache", TIMEOUT, "bucket Ready", |b| {
        b.status.as_ref().is_some_and(|s| support::is_ready(&s.conditions))
    })
    .await;

    // Upload a cache written by Nix into the bucket.
    let n = nonce();
    let sys = system("s3", &n, &[("pkg", "from s3")], Activation::Ok);
    let cache = SignedCache::new(&sys, &format!("s3-{n}-1"));
    let s3 = support::s3_client().await;
    let root = cache.dir.path().join("cache");
    let mut stack = vec![root.clone()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(dir).unwrap().flatten() {
            if entry.file_type().unwrap().is_dir() {
                stack.push(entry.path());
                continue;
            }
            let key = entry.path().strip_prefix(&root).unwrap().to_string_lossy().into_owned();
            let body = ByteStream::from(std::fs::read(entry.path()).unwrap());
            s3.put_object().bucket(&bucket_name).key(key).body(body).send().await.unwrap();
        }
    }

    let node = fleet.node();
    let source = json!({"binaryCache": {"url": format!("s3://{bucket_name}"), "publicKeys": [cache.public_key]}});
    fleet.create("from-s3", &node, json!({"closure": sys, "source": source}), json!({})).await;
    let m = fleet.wait_running("from-s3", &sys).await;
    assert_eq!(last_deploy(&m).paths_copied, closure(&sys).len() as i64);
    node.verify();
}

#[tokio::test]
async fn reboot_required_and_http_health_checks() {
    let fleet = Fleet::start("deploy-reboot", json!({})).await;
    let node = fleet.node();
    let site = tempfile::tempdir().unwrap();
    std::fs::write(site.path().join("healthz"), "ok").unwrap();
    let http = support::HttpServer::start(site.path());
    let n = nonce();
    let kernel = system("k", &n, &[("linux", "6.12")], Activation::RebootRequired);
    let healthy = json!([{"http": {"url": format!("http://127.0.0.1:{}/healthz", http.port)}}]);
    fleet.create("k", &node, json!({"closure": kernel, "healthChecks": healthy}), json!({})).await;
    let m = fleet.wait_running("k", &kernel).await;
    let conditions = m.status.unwrap().conditions;
    assert_eq!(support::condition(&conditions, "RebootRequired").as_deref(), Some("True"));
    assert_eq!(support::condition(&conditions, "Healthy").as_deref(), Some("True"));

    // An HTTP check answered 404 rolls the next system back.
    let next = system("k", &n, &[("linux", "6.13")], Activation::Ok);
    let missing = json!([{"http": {"url": format!("http://127.0.0.1:{}/missing", http.port)}}]);
    let patch = json!({"spec": {"nixos": {"closure": next, "healthChecks": missing}}});
    fleet.machines.patch("k", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    let m = fleet.wait_stalled("k", "RolledBack").await;
    let message = last_deploy(&m).message.unwrap();
    assert!(message.contains("HTTP status 404"), "{message}");
    assert_eq!(node.current_system().as_deref(), Some(kernel.as_str()));
}

#[tokio::test]
async fn a_long_push_shows_its_progress() {
    let fleet = Fleet::start("deploy-progress", json!({})).await;
    let node = fleet.node();
    // A slow link: 300 KB/s each way.
    let proxy = support::toxiproxy();
    let listen = proxy.proxy("slow", &format!("127.0.0.1:{}", node.port));
    for stream in ["upstream", "downstream"] {
        proxy.toxic_on("slow", &format!("rate-{stream}"), "bandwidth", stream, 1.0, json!({"rate": 300}));
    }
    let port: u16 = listen.rsplit(':').next().unwrap().parse().unwrap();
    // 12 packages of 384 KiB that compress poorly (base64 of random bytes),
    // 4.5 MiB in all: well beyond the 2 MiB SSH window, so progress is seen
    // part way.
    use base64::Engine as _;
    let n = nonce();
    let contents: Vec<(String, String)> = (0..12)
        .map(|i| {
            let mut bytes = vec![0u8; 288 << 10];
            getrandom::fill(&mut bytes).unwrap();
            (format!("blob{i}"), base64::engine::general_purpose::STANDARD.encode(&bytes))
        })
        .collect();
    let packages: Vec<(&str, &str)> = contents.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
    let sys = system("slow", &n, &packages, Activation::Ok);
    let spec = json!({"closure": sys});
    let machine: Machine = serde_json::from_value(json!({
        "apiVersion": "nixops.io/v1alpha1", "kind": "Machine", "metadata": {"name": "slow"},
        "spec": {"networkRef": {"name": "net"}, "provider": {"existing": {"host": "127.0.0.1", "port": port}},
                 "ssh": {"keyPairRef": {"name": "deployer"}}, "nixos": spec}
    }))
    .unwrap();
    fleet.machines.create(&PostParams::default(), &machine).await.unwrap();
    let seen = std::sync::Mutex::new(None);
    support::wait_for(&fleet.machines, "slow", TIMEOUT, "progress part way through the push", |m| {
        let part_way = m.status.as_ref().and_then(|s| s.last_deploy.as_ref()).is_some_and(|l| {
            l.result.as_deref() == Some("Pushing") && l.paths_copied > 0 && l.paths_copied < l.paths_total
        });
        if part_way {
            *seen.lock().unwrap() = Some(m.clone());
        }
        part_way
    })
    .await;
    let seen = seen.into_inner().unwrap().unwrap();
    let record = last_deploy(&seen);
    assert_eq!(record.paths_total, 13);
    assert!(record.bytes_copied > 0 && record.bytes_copied < record.bytes_total, "{record:?}");
    let message = support::condition_message(&seen.status.unwrap().conditions, "Reconciling");
    assert!(message.contains("paths") && message.contains("MiB"), "{message}");
    fleet.wait_running("slow", &sys).await;
}

#[tokio::test]
async fn a_closure_of_many_paths_goes_in_one_stream() {
    // More paths than russh buffers messages per channel: the machine's
    // per-path answers must be taken in while the push is still sending.
    let fleet = Fleet::start("deploy-many", json!({})).await;
    let node = fleet.node();
    let n = nonce();
    let contents: Vec<(String, String)> = (0..300).map(|i| (format!("p{i}"), format!("package {i}"))).collect();
    let packages: Vec<(&str, &str)> = contents.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
    let sys = system("many", &n, &packages, Activation::Ok);
    fleet.create("many", &node, json!({"closure": sys}), json!({})).await;
    let m = fleet.wait_running("many", &sys).await;
    assert_eq!(last_deploy(&m).paths_copied, 301);
    node.verify();
}
