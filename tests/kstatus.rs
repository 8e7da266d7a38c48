//! Flux and `kubectl wait` read our conditions through kstatus: the real
//! library must see Ready objects as Current, work in progress as
//! InProgress, and Stalled objects as Failed.

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
    let verdict = support::kstatus(&machines.get("waiting").await.unwrap());
    assert!(verdict.starts_with("InProgress"), "{verdict}");

    // Current: Ready.
    let net: Network = serde_json::from_value(
        json!({"apiVersion": "nixops.io/v1alpha1", "kind": "Network", "metadata": {"name": "prod"}, "spec": {}}),
    )
    .unwrap();
    networks.create(&PostParams::default(), &net).await.unwrap();
    machines.create(&PostParams::default(), &machine("ready", "prod", None)).await.unwrap();
    support::wait_for(&machines, "ready", TIMEOUT, "Ready", |m| cond(m, "Ready").as_deref() == Some("True")).await;
    let verdict = support::kstatus(&machines.get("ready").await.unwrap());
    assert!(verdict.starts_with("Current"), "{verdict}");
    let verdict = support::kstatus(&networks.get("prod").await.unwrap());
    assert!(verdict.starts_with("Current"), "{verdict}");

    // Failed: Stalled on a host key mismatch.
    machines.create(&PostParams::default(), &machine("stalled", "prod", Some(&other.host_key))).await.unwrap();
    support::wait_for(&machines, "stalled", TIMEOUT, "Stalled", |m| cond(m, "Stalled").as_deref() == Some("True"))
        .await;
    let verdict = support::kstatus(&machines.get("stalled").await.unwrap());
    assert!(verdict.starts_with("Failed"), "{verdict}");

    // `kubectl wait` works on the Ready condition.
    let out = support::kubectl(&["wait", "-n", &ns, "--for=condition=Ready", "machine/ready", "--timeout=30s"], None);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}
