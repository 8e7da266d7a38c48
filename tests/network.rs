//! Network lifecycle: deletion waits for its machines.

mod support;

use std::time::Duration;

use kube::api::{Api, DeleteParams, PostParams};
use nixops_operator::api::{Machine, Network};
use serde_json::json;

const TIMEOUT: Duration = Duration::from_secs(60);

#[tokio::test]
async fn network_deletion_waits_for_its_machines_and_names_them() {
    let client = support::client().await;
    support::install_crds(&client).await;
    let ns = support::namespace(&client, "network").await;
    let _operator = support::Operator::start(&ns, &[]);
    let machines: Api<Machine> = Api::namespaced(client.clone(), &ns);
    let networks: Api<Network> = Api::namespaced(client.clone(), &ns);
    let host = support::SshHost::start();

    let net: Network = serde_json::from_value(json!({
        "apiVersion": "nixops.io/v1alpha1", "kind": "Network", "metadata": {"name": "prod"},
        "spec": {"machineDefaults": {"provider": {"existing": {"host": host.host, "port": host.port}}}}
    }))
    .unwrap();
    networks.create(&PostParams::default(), &net).await.unwrap();
    // The machine takes its provider from the Network's defaults.
    let m: Machine = serde_json::from_value(json!({
        "apiVersion": "nixops.io/v1alpha1", "kind": "Machine", "metadata": {"name": "db-1"},
        "spec": {"networkRef": {"name": "prod"}}
    }))
    .unwrap();
    machines.create(&PostParams::default(), &m).await.unwrap();
    support::wait_for(&machines, "db-1", TIMEOUT, "Ready", |m| {
        m.status.as_ref().is_some_and(|s| support::condition(&s.conditions, "Ready").as_deref() == Some("True"))
    })
    .await;
    support::wait_for(&networks, "prod", TIMEOUT, "1 machine", |n| {
        n.status.as_ref().is_some_and(|s| s.machines == Some(1))
    })
    .await;

    networks.delete("prod", &DeleteParams::default()).await.unwrap();
    support::wait_for(&networks, "prod", TIMEOUT, "waiting for db-1", |n| {
        n.status.as_ref().is_some_and(|s| support::condition_message(&s.conditions, "Ready").contains("db-1"))
    })
    .await;
    let waiting = networks.get("prod").await.unwrap();
    assert!(waiting.metadata.deletion_timestamp.is_some());
    assert_eq!(waiting.status.unwrap().phase, Some(nixops_operator::api::network::ResourcePhase::Deleting));

    machines.delete("db-1", &DeleteParams::default()).await.unwrap();
    support::wait_gone(&machines, "db-1", TIMEOUT).await;
    support::wait_gone(&networks, "prod", TIMEOUT).await;
}
