//! Flux and `kubectl wait` read our conditions through kstatus: the real
//! library must see Ready objects as Current, work in progress as
//! InProgress, and Stalled objects as Failed. Argo CD reads them through the
//! chart's Lua health check, run here by a real Lua interpreter on the same
//! objects: Healthy, Progressing, Degraded.

mod support;

use std::time::Duration;

use kube::api::{Api, Patch, PatchParams, PostParams};
use nixops_operator::api::{Machine, Network};
use serde_json::json;

const TIMEOUT: Duration = Duration::from_secs(60);

fn cond(m: &Machine, type_: &str) -> Option<String> {
    m.status.as_ref().and_then(|s| support::condition(&s.conditions, type_))
}

#[tokio::test]
async fn kstatus_reads_current_in_progress_and_failed() {
    let client = support::client().await;
    support::install_crds(&client).await;
    let ns = support::namespace(&client, "kstatus").await;
    let _operator = support::Operator::start(&ns, &[]);
    let machines: Api<Machine> = Api::namespaced(client.clone(), &ns);
    let networks: Api<Network> = Api::namespaced(client.clone(), &ns);
    let host = support::SshHost::start();
    let other = support::SshHost::start();

    let machine = |name: &str, network: &str, pin: Option<&str>| -> Machine {
        let mut spec =
            json!({"networkRef": {"name": network}, "provider": {"existing": {"host": host.host, "port": host.port}}});
        if let Some(pin) = pin {
            spec["ssh"] = json!({"hostKey": pin});
        }
        serde_json::from_value(
            json!({"apiVersion": "nixops.io/v1alpha1", "kind": "Machine", "metadata": {"name": name}, "spec": spec}),
        )
        .unwrap()
    };

    // InProgress: waiting for a Network that does not exist.
    machines.create(&PostParams::default(), &machine("waiting", "missing", None)).await.unwrap();
    support::wait_for(&machines, "waiting", TIMEOUT, "Reconciling", |m| {
        cond(m, "Reconciling").as_deref() == Some("True")
    })
    .await;
    let waiting = machines.get("waiting").await.unwrap();
    let verdict = support::kstatus(&waiting);
    assert!(verdict.starts_with("InProgress"), "{verdict}");
    let (health, message) = support::argocd_health(&waiting);
    assert_eq!(health, "Progressing", "Argo CD: {message}");
    assert!(message.contains("Network missing"), "Argo CD shows why: {message}");

    // Current: Ready.
    let net: Network = serde_json::from_value(
        json!({"apiVersion": "nixops.io/v1alpha1", "kind": "Network", "metadata": {"name": "prod"}, "spec": {}}),
    )
    .unwrap();
    networks.create(&PostParams::default(), &net).await.unwrap();
    machines.create(&PostParams::default(), &machine("ready", "prod", None)).await.unwrap();
    support::wait_for(&machines, "ready", TIMEOUT, "Ready", |m| cond(m, "Ready").as_deref() == Some("True")).await;
    let ready = machines.get("ready").await.unwrap();
    let verdict = support::kstatus(&ready);
    assert!(verdict.starts_with("Current"), "{verdict}");
    assert_eq!(support::argocd_health(&ready).0, "Healthy");
    assert_eq!(support::argocd_health(&networks.get("prod").await.unwrap()).0, "Healthy");
    let verdict = support::kstatus(&networks.get("prod").await.unwrap());
    assert!(verdict.starts_with("Current"), "{verdict}");

    // Failed: Stalled on a host key mismatch.
    machines.create(&PostParams::default(), &machine("stalled", "prod", Some(&other.host_key))).await.unwrap();
    support::wait_for(&machines, "stalled", TIMEOUT, "Stalled", |m| cond(m, "Stalled").as_deref() == Some("True"))
        .await;
    let stalled = machines.get("stalled").await.unwrap();
    let verdict = support::kstatus(&stalled);
    assert!(verdict.starts_with("Failed"), "{verdict}");
    let (health, message) = support::argocd_health(&stalled);
    assert_eq!(health, "Degraded", "Argo CD: {message}");
    assert!(message.contains("pins"), "Argo CD shows the Stalled message: {message}");

    // `kubectl wait` works on the Ready condition.
    let out = support::kubectl(&["wait", "-n", &ns, "--for=condition=Ready", "machine/ready", "--timeout=30s"], None);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

fn network_condition(n: &Network, type_: &str) -> Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    n.status.as_ref().and_then(|s| s.conditions.iter().find(|c| c.type_ == type_).cloned())
}

/// A paused object reports the spec it last acted on: a spec changed while
/// paused, or an object created paused, is InProgress for kstatus and
/// Suspended for Argo CD, never Current on an old Ready.
#[tokio::test]
async fn a_paused_object_never_reports_a_spec_it_did_not_apply() {
    let client = support::client().await;
    support::install_crds(&client).await;
    let ns = support::namespace(&client, "kstatus-paused").await;
    let _operator = support::Operator::start(&ns, &[]);
    let networks: Api<Network> = Api::namespaced(client.clone(), &ns);
    let network = |name: &str, paused: bool| -> Network {
        let annotations = if paused { json!({"nixops.io/paused": "true"}) } else { json!({}) };
        serde_json::from_value(json!({
            "apiVersion": "nixops.io/v1alpha1", "kind": "Network",
            "metadata": {"name": name, "annotations": annotations}, "spec": {}
        }))
        .unwrap()
    };
    let paused_at = |generation: i64| {
        move |n: &Network| {
            network_condition(n, "Paused")
                .is_some_and(|c| c.status == "True" && c.observed_generation == Some(generation))
        }
    };

    networks.create(&PostParams::default(), &network("held", false)).await.unwrap();
    support::wait_for(&networks, "held", TIMEOUT, "Ready", |n| {
        network_condition(n, "Ready").is_some_and(|c| c.status == "True")
    })
    .await;
    assert!(support::kstatus(&networks.get("held").await.unwrap()).starts_with("Current"));

    // Paused with nothing new to apply: what it shows was applied.
    let pause = json!({"metadata": {"annotations": {"nixops.io/paused": "true"}}});
    networks.patch("held", &PatchParams::default(), &Patch::Merge(&pause)).await.unwrap();
    support::wait_for(&networks, "held", TIMEOUT, "Paused", paused_at(1)).await;
    let held = networks.get("held").await.unwrap();
    let verdict = support::kstatus(&held);
    assert!(verdict.starts_with("Current"), "the spec it shows was applied: {verdict}");
    assert_eq!(support::argocd_health(&held).0, "Suspended");

    // A spec changed while paused is not applied, and nothing may say it is.
    let change = json!({"spec": {"rollout": {"maxUnavailable": 2}}});
    networks.patch("held", &PatchParams::default(), &Patch::Merge(&change)).await.unwrap();
    support::wait_for(&networks, "held", TIMEOUT, "Paused at generation 2", paused_at(2)).await;
    let held = networks.get("held").await.unwrap();
    assert_eq!(held.metadata.generation, Some(2));
    let status = held.status.clone().unwrap();
    assert_eq!(status.observed_generation, Some(1), "observedGeneration must stay at the spec acted on");
    let verdict = support::kstatus(&held);
    assert!(verdict.starts_with("InProgress"), "kstatus must not call an unapplied spec Current: {verdict}");
    let (health, message) = support::argocd_health(&held);
    assert_eq!(health, "Suspended", "Argo CD: {message}");
    assert!(message.contains("generation 2 is not applied"), "Argo CD says what waits: {message}");
    let out = support::kubectl(&["wait", "-n", &ns, "--for=condition=Ready", "network/held", "--timeout=1s"], None);
    assert!(!out.status.success(), "kubectl wait must not see the unapplied spec as Ready");

    // Created paused: nothing was ever applied.
    networks.create(&PostParams::default(), &network("born-paused", true)).await.unwrap();
    support::wait_for(&networks, "born-paused", TIMEOUT, "Paused", paused_at(1)).await;
    let verdict = support::kstatus(&networks.get("born-paused").await.unwrap());
    assert!(verdict.starts_with("InProgress"), "an object created paused was never applied: {verdict}");

    // Unpaused, the new spec is applied and reported.
    let resume = json!({"metadata": {"annotations": {"nixops.io/paused": null}}});
    networks.patch("held", &PatchParams::default(), &Patch::Merge(&resume)).await.unwrap();
    support::wait_for(&networks, "held", TIMEOUT, "Ready at generation 2", |n| {
        n.status.as_ref().is_some_and(|s| s.observed_generation == Some(2))
            && network_condition(n, "Ready").is_some_and(|c| c.status == "True")
            && network_condition(n, "Paused").is_none()
    })
    .await;
    let verdict = support::kstatus(&networks.get("held").await.unwrap());
    assert!(verdict.starts_with("Current"), "{verdict}");
}
