//! Flux and `kubectl wait` read our conditions through kstatus: the real
//! library must see Ready objects as Current, work in progress as
//! InProgress, and Stalled objects as Failed. Argo CD reads them through the
//! chart's Lua health check, run here by a real Lua interpreter on the same
//! objects: Healthy, Progressing, Degraded.

mod support;

use std::time::Duration;

use kube::api::{Api, PostParams};
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
