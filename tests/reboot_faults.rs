//! Reboots interrupted at named fault points (src/fault.rs): the operator
//! is killed with SIGKILL between recording a reboot and asking systemd for
//! it, and right after asking. Its successor must settle the same request
//! from the marker on the machine: reboot it exactly once, never twice and
//! never not at all — counted on the node, whose init logs each reboot.

mod support;

use std::os::unix::process::ExitStatusExt;
use std::time::Duration;

use nixops_operator::api::machine::RebootResult;
use serde_json::json;
use support::fleet::{Fleet, nonce, system};
use support::node::Activation;

async fn killed_at(point: &str) {
    let mut fleet = Fleet::start("reboot-fault", json!({})).await;
    let node = fleet.node();
    let v1 = system("web-1", &nonce(), &[("kernel", "6.1")], Activation::Ok);
    fleet.create("web-1", &node, json!({"closure": v1}), json!({})).await;
    fleet.wait_running("web-1", &v1).await;
    fleet.restart_operator(&[("FAILPOINTS", &format!("{point}=return(kill)"))]);

    let out = support::plugin::run(&fleet.ns, &["reboot", "web-1"]);
    assert!(out.status.success(), "{}", support::plugin::text(&out));
    let status = fleet.operator.wait_exit(Duration::from_secs(90)).expect("the operator reaches its fault point");
    assert_eq!(status.signal(), Some(9), "killed by SIGKILL at {point}: {status:?}");

    fleet.restart_operator(&[]);
    support::wait_for(&fleet.machines, "web-1", Duration::from_secs(90), "the reboot settled", |m| {
        m.status.as_ref().and_then(|s| s.last_reboot.as_ref()).is_some_and(|r| r.result != RebootResult::Rebooting)
    })
    .await;
    let reboot = fleet.machines.get("web-1").await.unwrap().status.unwrap().last_reboot.unwrap();
    assert_eq!(reboot.result, RebootResult::Succeeded, "{reboot:?}");
    assert_eq!(node.sshd_log().matches("node: rebooting").count(), 1, "rebooted exactly once:\n{}", node.sshd_log());
    assert_eq!(node.current_system().as_deref(), Some(v1.as_str()));
}

#[tokio::test]
async fn killed_between_recording_and_asking_the_reboot_is_asked_for_once() {
    killed_at("reboot-before-request").await;
}

#[tokio::test]
async fn killed_after_asking_the_reboot_is_settled_without_rebooting_again() {
    killed_at("reboot-after-request").await;
}
