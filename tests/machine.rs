//! Machine lifecycle with the `existing` provider against real sshd hosts.

mod support;

use std::time::Duration;

use k8s_openapi::api::core::v1::Event;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use nixops_operator::api::machine::MachinePhase;
use nixops_operator::api::{Machine, Network};
use serde_json::json;

const TIMEOUT: Duration = Duration::from_secs(60);

fn network(name: &str) -> Network {
    serde_json::from_value(json!({
        "apiVersion": "nixops.io/v1alpha1", "kind": "Network", "metadata": {"name": name}, "spec": {}
    }))
    .unwrap()
}

fn machine(name: &str, network: &str, host: &support::SshHost, extra: serde_json::Value) -> Machine {
    let mut spec = json!({
        "networkRef": {"name": network},
        "provider": {"existing": {"host": host.host, "port": host.port}},
    });
    if let (Some(spec), Some(extra)) = (spec.as_object_mut(), extra.as_object()) {
        spec.extend(extra.clone());
    }
    serde_json::from_value(json!({
        "apiVersion": "nixops.io/v1alpha1", "kind": "Machine", "metadata": {"name": name}, "spec": spec
    }))
    .unwrap()
}

fn cond(m: &Machine, type_: &str) -> Option<String> {
    m.status.as_ref().and_then(|s| support::condition(&s.conditions, type_))
}

fn message(m: &Machine, type_: &str) -> String {
    m.status.as_ref().map(|s| support::condition_message(&s.conditions, type_)).unwrap_or_default()
}

#[tokio::test]
async fn machine_waits_for_its_network_then_provisions_and_records_the_host_key() {
    let client = support::client().await;
    support::install_crds(&client).await;
    let ns = support::namespace(&client, "machine").await;
    // A long resync: recovery must come from the Network watch, not from polling.
    let _operator = support::Operator::start(&ns, &["--resync-seconds", "3600"]);
    let machines: Api<Machine> = Api::namespaced(client.clone(), &ns);
    let networks: Api<Network> = Api::namespaced(client.clone(), &ns);
    let host = support::SshHost::start();

    machines.create(&PostParams::default(), &machine("web-1", "prod", &host, json!({}))).await.unwrap();
    support::wait_for(&machines, "web-1", TIMEOUT, "Ready=False naming the Network", |m| {
        cond(m, "Ready").as_deref() == Some("False") && message(m, "Ready").contains("Network prod")
    })
    .await;
    let waiting = machines.get("web-1").await.unwrap();
    assert_eq!(
        cond(&waiting, "Reconciling").as_deref(),
        Some("True"),
        "kstatus must read a waiting Machine as InProgress"
    );

    networks.create(&PostParams::default(), &network("prod")).await.unwrap();
    support::wait_for(&machines, "web-1", TIMEOUT, "Ready", |m| cond(m, "Ready").as_deref() == Some("True")).await;

    let m = machines.get("web-1").await.unwrap();
    let status = m.status.clone().unwrap();
    assert_eq!(status.phase, Some(MachinePhase::Running));
    assert_eq!(status.provider.as_deref(), Some("existing"));
    assert_eq!(cond(&m, "Provisioned").as_deref(), Some("True"));
    assert_eq!(status.observed_generation, m.metadata.generation);
    assert_eq!(status.addresses[0].address, "127.0.0.1");
    assert!(host.host_key.starts_with(status.host_key.as_deref().unwrap()), "status.hostKey must be the host's key");
    assert!(m.metadata.finalizers.unwrap_or_default().contains(&"nixops.io/cleanup".to_owned()));

    // The Network publishes its membership.
    support::wait_for(&networks, "prod", TIMEOUT, "one ready member", |n| {
        n.status.as_ref().is_some_and(|s| s.ready_machines == Some(1) && s.members.len() == 1)
    })
    .await;

    let events: Api<Event> = Api::namespaced(client.clone(), &ns);
    let reasons: Vec<String> =
        events.list(&ListParams::default()).await.unwrap().items.into_iter().filter_map(|e| e.reason).collect();
    assert!(reasons.contains(&"HostKeyRecorded".to_owned()), "{reasons:?}");
    assert!(reasons.contains(&"Provisioned".to_owned()), "{reasons:?}");

    // A host presenting another key than the one recorded at first contact is refused.
    drop(host);
    let impostor = support::SshHost::start();
    let patch = json!({"spec": {"provider": {"existing": {"host": "127.0.0.1", "port": impostor.port}}}});
    machines.patch("web-1", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    support::wait_for(&machines, "web-1", TIMEOUT, "Stalled on the host key", |m| {
        cond(m, "Stalled").as_deref() == Some("True")
    })
    .await;
    let m = machines.get("web-1").await.unwrap();
    let msg = message(&m, "Stalled");
    assert!(msg.contains("status.hostKey (recorded at first contact) pins"), "{msg}");
    assert_eq!(m.status.unwrap().phase, Some(MachinePhase::Failed));

    // Deleting goes through the finalizer; the existing host is left alone.
    machines.delete("web-1", &DeleteParams::default()).await.unwrap();
    support::wait_gone(&machines, "web-1", TIMEOUT).await;
}

#[tokio::test]
async fn pinned_host_key_mismatch_stalls_with_both_fingerprints() {
    let client = support::client().await;
    support::install_crds(&client).await;
    let ns = support::namespace(&client, "machine-pin").await;
    let _operator = support::Operator::start(&ns, &[]);
    let machines: Api<Machine> = Api::namespaced(client.clone(), &ns);
    let networks: Api<Network> = Api::namespaced(client.clone(), &ns);
    networks.create(&PostParams::default(), &network("prod")).await.unwrap();
    let host = support::SshHost::start();
    let other = support::SshHost::start();

    let pinned = machine("pinned", "prod", &host, json!({"ssh": {"hostKey": other.host_key}}));
    machines.create(&PostParams::default(), &pinned).await.unwrap();
    support::wait_for(&machines, "pinned", TIMEOUT, "Stalled", |m| cond(m, "Stalled").as_deref() == Some("True")).await;
    let m = machines.get("pinned").await.unwrap();
    let msg = message(&m, "Stalled");
    let fingerprint = |key: &str| {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), key).unwrap();
        let out = std::process::Command::new("ssh-keygen").arg("-lf").arg(file.path()).output().unwrap();
        String::from_utf8_lossy(&out.stdout).split_whitespace().nth(1).unwrap().to_owned()
    };
    assert!(msg.contains(&fingerprint(&host.host_key)), "message must show the presented key: {msg}");
    assert!(msg.contains(&fingerprint(&other.host_key)), "message must show the pinned key: {msg}");
    assert!(msg.contains("spec.ssh.hostKey"), "{msg}");
    assert_eq!(cond(&m, "Ready").as_deref(), Some("False"));

    // Fixing the pin lets it proceed.
    let patch = json!({"spec": {"ssh": {"hostKey": host.host_key}}});
    machines.patch("pinned", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    support::wait_for(&machines, "pinned", TIMEOUT, "Ready", |m| cond(m, "Ready").as_deref() == Some("True")).await;

    for policy in ["Delete", "Orphan"] {
        let name = format!("policy-{}", policy.to_lowercase());
        let m = machine(&name, "prod", &host, json!({"deletionPolicy": policy}));
        machines.create(&PostParams::default(), &m).await.unwrap();
        support::wait_for(&machines, &name, TIMEOUT, "Ready", |m| cond(m, "Ready").as_deref() == Some("True")).await;
        machines.delete(&name, &DeleteParams::default()).await.unwrap();
        support::wait_gone(&machines, &name, TIMEOUT).await;
    }
}

#[tokio::test]
async fn paused_machine_makes_no_external_calls() {
    let client = support::client().await;
    support::install_crds(&client).await;
    let ns = support::namespace(&client, "machine-paused").await;
    let operator = support::Operator::start(&ns, &["--resync-seconds", "1"]);
    let machines: Api<Machine> = Api::namespaced(client.clone(), &ns);
    let networks: Api<Network> = Api::namespaced(client.clone(), &ns);
    networks.create(&PostParams::default(), &network("prod")).await.unwrap();
    let host = support::SshHost::start();

    let mut m = machine("paused", "prod", &host, json!({}));
    m.metadata.annotations = Some([("nixops.io/paused".to_owned(), "true".to_owned())].into());
    machines.create(&PostParams::default(), &m).await.unwrap();
    support::wait_for(&machines, "paused", TIMEOUT, "Paused", |m| cond(m, "Paused").as_deref() == Some("True")).await;
    operator.wait_ready().await;
    let probes = operator.metric("nixops_provider_calls_total", &["provider=\"ssh\""]);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        operator.metric("nixops_provider_calls_total", &["provider=\"ssh\""]),
        probes,
        "a paused machine was probed"
    );
    let paused = machines.get("paused").await.unwrap();
    assert!(cond(&paused, "Provisioned").is_none(), "nothing may be provisioned while paused");
    assert!(paused.metadata.finalizers.is_none(), "paused: not even the finalizer is added");

    // Unpausing resumes.
    let patch = json!({"metadata": {"annotations": {"nixops.io/paused": null}}});
    machines.patch("paused", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    support::wait_for(&machines, "paused", TIMEOUT, "Ready and not Paused", |m| {
        cond(m, "Ready").as_deref() == Some("True") && cond(m, "Paused").is_none()
    })
    .await;
}

#[tokio::test]
async fn machine_waits_for_the_keypair_named_by_its_network_defaults() {
    let client = support::client().await;
    support::install_crds(&client).await;
    let ns = support::namespace(&client, "machine-keypair").await;
    let _operator = support::Operator::start(&ns, &["--resync-seconds", "3600"]);
    let machines: Api<Machine> = Api::namespaced(client.clone(), &ns);
    let networks: Api<Network> = Api::namespaced(client.clone(), &ns);
    let keypairs: Api<nixops_operator::api::KeyPair> = Api::namespaced(client.clone(), &ns);
    let host = support::SshHost::start();

    let net: Network = serde_json::from_value(json!({
        "apiVersion": "nixops.io/v1alpha1", "kind": "Network", "metadata": {"name": "prod"},
        "spec": {"machineDefaults": {"ssh": {"keyPairRef": {"name": "deployer"}}}}
    }))
    .unwrap();
    networks.create(&PostParams::default(), &net).await.unwrap();
    machines.create(&PostParams::default(), &machine("web-1", "prod", &host, json!({}))).await.unwrap();
    support::wait_for(&machines, "web-1", TIMEOUT, "waiting for KeyPair deployer", |m| {
        message(m, "Ready").contains("KeyPair deployer")
    })
    .await;

    let kp: nixops_operator::api::KeyPair = serde_json::from_value(json!({
        "apiVersion": "nixops.io/v1alpha1", "kind": "KeyPair", "metadata": {"name": "deployer"},
        "spec": {"secretRef": {"name": "deployer"}}
    }))
    .unwrap();
    keypairs.create(&PostParams::default(), &kp).await.unwrap();
    support::wait_for(&machines, "web-1", TIMEOUT, "Ready once the KeyPair exists", |m| {
        cond(m, "Ready").as_deref() == Some("True")
    })
    .await;
}
