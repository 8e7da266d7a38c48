//! Deployments interrupted at named fault points (src/fault.rs): the real
//! operator is killed with SIGKILL, or its SSH connection cut, at an exact
//! step, and the machine must end on the right system — checked on the node
//! (/run/current-system, the profile's generations, the activations it ran),
//! not only in what the operator wrote.

mod support;

use std::os::unix::process::ExitStatusExt;
use std::time::Duration;

use serde_json::json;
use support::fleet::{Fleet, last_deploy, nonce, system};
use support::node::{Activation, NixNode};

/// Deploys `good` with a plain operator, then restarts the operator with
/// `faults` and asks for `next`.
async fn deploy_then_fault(
    prefix: &str,
    nixos: serde_json::Value,
    next: &str,
    faults: &str,
) -> (Fleet, NixNode, String) {
    let mut fleet = Fleet::start(prefix, json!({})).await;
    let node = fleet.node();
    let good = nixos["closure"].as_str().unwrap().to_owned();
    fleet.create("m", &node, nixos, json!({})).await;
    fleet.wait_running("m", &good).await;
    fleet.restart_operator(&[("FAILPOINTS", faults)]);
    fleet.set_closure("m", next).await;
    (fleet, node, good)
}

/// Waits for the operator to kill itself at its fault point.
fn wait_killed(fleet: &mut Fleet) {
    let status = fleet.operator.wait_exit(Duration::from_secs(90)).expect("the operator reaches its fault point");
    assert_eq!(status.signal(), Some(9), "killed by SIGKILL at the fault point: {status:?}");
}

/// The profile holds `good` as its newest generation and no generation of `bad`.
fn assert_on(node: &NixNode, good: &str, bad: &str) {
    assert_eq!(node.current_system().as_deref(), Some(good), "the machine runs the last good system");
    assert_eq!(node.profile().as_deref(), Some(good), "and boots it");
    let generations = node.generations();
    assert!(generations.iter().all(|(_, s)| s != bad), "the failed generation is gone: {generations:?}");
}

#[tokio::test]
async fn killed_while_a_failing_switch_runs_the_machine_is_rolled_back() {
    let n = nonce();
    let good = system("k1", &n, &[("app", "v1")], Activation::Ok);
    let bad = system("k1", &n, &[("app", "v2")], Activation::Fail);
    let nixos = json!({"closure": good, "rollback": {"magic": false}});
    let (mut fleet, node, good) =
        deploy_then_fault("fault-kill-fail", nixos, &bad, "deploy-after-start=return(kill)").await;
    wait_killed(&mut fleet);
    // The switch ran to its end (it points /run/current-system at the new
    // system, then fails) with no operator watching.
    fleet.restart_operator(&[]);
    let m = fleet.wait_result("m", &bad, "Failed").await;
    let message = last_deploy(&m).message.unwrap();
    assert!(message.contains("exit status 1") && message.contains("rolled back to"), "{message}");
    assert_on(&node, &good, &bad);
    assert_eq!(node.activations(), vec![format!("switch {good}"), format!("switch {bad}"), format!("switch {good}")]);
}

#[tokio::test]
async fn killed_after_a_good_switch_the_deployment_is_settled_without_activating_again() {
    let n = nonce();
    let good = system("k2", &n, &[("app", "v1")], Activation::Ok);
    let next = system("k2", &n, &[("app", "v2")], Activation::Ok);
    let nixos = json!({"closure": good, "rollback": {"magic": false}});
    let (mut fleet, node, good) =
        deploy_then_fault("fault-kill-ok", nixos, &next, "deploy-after-start=return(kill)").await;
    wait_killed(&mut fleet);
    fleet.restart_operator(&[]);
    let m = fleet.wait_running("m", &next).await;
    assert_eq!(last_deploy(&m).previous_closure.as_deref(), Some(good.as_str()));
    assert_eq!(node.activations(), vec![format!("switch {good}"), format!("switch {next}")], "activated once");
    assert_eq!(node.profile().as_deref(), Some(next.as_str()));
}

#[tokio::test]
async fn killed_with_magic_rollback_the_machine_rolls_back_by_itself() {
    let n = nonce();
    let good = system("k3", &n, &[("app", "v1")], Activation::Ok);
    let next = system("k3", &n, &[("app", "v2")], Activation::Ok);
    let nixos = json!({"closure": good, "rollback": {"magic": true, "confirmTimeoutSeconds": 5}});
    let (mut fleet, node, good) =
        deploy_then_fault("fault-kill-magic", nixos, &next, "deploy-after-start=return(kill)").await;
    wait_killed(&mut fleet);
    // Nobody confirms: the watchdog armed before the switch rolls back and
    // records that it did.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let outcome = node.exec_ok("cat /run/nixops/deploy-*/outcome 2>/dev/null; true");
        if outcome.lines().any(|l| l == "rolled-back unconfirmed") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the watchdog never rolled back: {outcome:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    fleet.restart_operator(&[]);
    let m = fleet.wait_result("m", &next, "RolledBack").await;
    let message = last_deploy(&m).message.unwrap();
    assert!(message.contains("magic rollback"), "{message}");
    assert_on(&node, &good, &next);
    // Not deployed again at this generation.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(node.activations().len(), 3, "{:?}", node.activations());
}

#[tokio::test]
async fn a_connection_cut_during_activation_is_settled_from_the_machine() {
    let n = nonce();
    let good = system("d1", &n, &[("app", "v1")], Activation::Ok);
    let bad = system("d1", &n, &[("app", "v2")], Activation::Fail);
    let nixos = json!({"closure": good, "rollback": {"magic": false}});
    let (fleet, node, good) = deploy_then_fault("fault-drop", nixos, &bad, "deploy-after-start=1*return(drop)").await;
    let m = fleet.wait_result("m", &bad, "Failed").await;
    let message = last_deploy(&m).message.unwrap();
    assert!(message.contains("exit status 1"), "{message}");
    assert_on(&node, &good, &bad);
    assert!(fleet.operator.logs().contains("deploy-after-start"), "the connection was cut at the fault point");
}

#[tokio::test]
async fn a_connection_cut_during_health_checks_is_not_a_failed_check() {
    let n = nonce();
    let good = system("d2", &n, &[("app", "v1")], Activation::Ok);
    let next = system("d2", &n, &[("app", "v2")], Activation::Ok);
    let nixos = json!({"closure": good, "healthChecks": [{"command": "true"}]});
    let (fleet, node, _good) =
        deploy_then_fault("fault-drop-check", nixos, &next, "deploy-before-health-checks=1*return(drop)").await;
    let m = fleet.wait_running("m", &next).await;
    assert_eq!(support::condition(&m.status.unwrap().conditions, "Healthy").as_deref(), Some("True"));
    assert_eq!(node.current_system().as_deref(), Some(next.as_str()));
    assert!(fleet.operator.logs().contains("deploy-before-health-checks"), "the connection was cut at the fault point");
}
