//! The operator process as a whole: a steady state writes nothing, leader
//! election with failover, graceful SIGTERM, HTTP endpoints.

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Event;
use kube::api::{Api, ListParams, PostParams};
use kube::{Client, ResourceExt};
use nixops_operator::api::{KeyPair, Machine, Network};
use serde_json::json;

const TIMEOUT: Duration = Duration::from_secs(60);

fn ready<K: HasConditions>(obj: &K) -> bool {
    obj.ready()
}

trait HasConditions {
    fn ready(&self) -> bool;
}
impl HasConditions for Machine {
    fn ready(&self) -> bool {
        self.status.as_ref().is_some_and(|s| support::condition(&s.conditions, "Ready").as_deref() == Some("True"))
    }
}
impl HasConditions for Network {
    fn ready(&self) -> bool {
        self.status.as_ref().is_some_and(|s| support::condition(&s.conditions, "Ready").as_deref() == Some("True"))
    }
}
impl HasConditions for KeyPair {
    fn ready(&self) -> bool {
        self.status.as_ref().is_some_and(|s| support::condition(&s.conditions, "Ready").as_deref() == Some("True"))
    }
}

async fn create_network(client: &Client, ns: &str, name: &str) {
    let api: Api<Network> = Api::namespaced(client.clone(), ns);
    let net: Network = serde_json::from_value(json!({
        "apiVersion": "nixops.io/v1alpha1", "kind": "Network", "metadata": {"name": name}, "spec": {}
    }))
    .unwrap();
    api.create(&PostParams::default(), &net).await.unwrap();
}

/// resourceVersion of every object the operator manages in `ns`.
async fn resource_versions(client: &Client, ns: &str) -> BTreeMap<String, String> {
    let mut versions = BTreeMap::new();
    let lp = ListParams::default();
    for m in Api::<Machine>::namespaced(client.clone(), ns).list(&lp).await.unwrap() {
        versions.insert(format!("machine/{}", m.name_any()), m.resource_version().unwrap());
    }
    for n in Api::<Network>::namespaced(client.clone(), ns).list(&lp).await.unwrap() {
        versions.insert(format!("network/{}", n.name_any()), n.resource_version().unwrap());
    }
    for k in Api::<KeyPair>::namespaced(client.clone(), ns).list(&lp).await.unwrap() {
        versions.insert(format!("keypair/{}", k.name_any()), k.resource_version().unwrap());
    }
    versions
}

#[tokio::test]
async fn a_steady_state_writes_nothing_during_forced_resyncs() {
    let client = support::client().await;
    support::install_crds(&client).await;
    let ns = support::namespace(&client, "steady").await;
    let operator = support::Operator::start(&ns, &["--resync-seconds", "1"]);
    let host = support::SshHost::start();

    create_network(&client, &ns, "prod").await;
    let keypairs: Api<KeyPair> = Api::namespaced(client.clone(), &ns);
    let kp: KeyPair = serde_json::from_value(json!({
        "apiVersion": "nixops.io/v1alpha1", "kind": "KeyPair", "metadata": {"name": "deployer"},
        "spec": {"secretRef": {"name": "deployer"}}
    }))
    .unwrap();
    keypairs.create(&PostParams::default(), &kp).await.unwrap();
    let machines: Api<Machine> = Api::namespaced(client.clone(), &ns);
    for i in 0..3 {
        let m: Machine = serde_json::from_value(json!({
            "apiVersion": "nixops.io/v1alpha1", "kind": "Machine", "metadata": {"name": format!("web-{i}")},
            "spec": {"networkRef": {"name": "prod"}, "ssh": {"keyPairRef": {"name": "deployer"}},
                     "provider": {"existing": {"host": host.host, "port": host.port}}}
        }))
        .unwrap();
        machines.create(&PostParams::default(), &m).await.unwrap();
    }
    for i in 0..3 {
        support::wait_for(&machines, &format!("web-{i}"), TIMEOUT, "Ready", ready).await;
    }
    let networks: Api<Network> = Api::namespaced(client.clone(), &ns);
    support::wait_for(&networks, "prod", TIMEOUT, "3 ready machines", |n| {
        n.status.as_ref().is_some_and(|s| s.ready_machines == Some(3))
    })
    .await;
    support::wait_for(&keypairs, "deployer", TIMEOUT, "Ready", ready).await;
    operator.wait_ready().await;

    // Let the last status writes settle, then watch several full resyncs.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = resource_versions(&client, &ns).await;
    let events_before =
        Api::<Event>::namespaced(client.clone(), &ns).list(&ListParams::default()).await.unwrap().items.len();
    let writes_before = operator.metric("nixops_status_writes_total", &[]);
    let reconciles_before = operator.metric("nixops_reconciles_total", &[]);
    let objects = before.len() as f64;
    let deadline = Instant::now() + TIMEOUT;
    while operator.metric("nixops_reconciles_total", &[]) < reconciles_before + 3.0 * objects {
        assert!(Instant::now() < deadline, "resyncs did not happen");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let after = resource_versions(&client, &ns).await;
    let events_after =
        Api::<Event>::namespaced(client.clone(), &ns).list(&ListParams::default()).await.unwrap().items.len();
    assert_eq!(before, after, "a resync of up-to-date objects changed them");
    assert_eq!(events_before, events_after, "a resync of up-to-date objects published events");
    assert_eq!(operator.metric("nixops_status_writes_total", &[]), writes_before, "status writes during resync");
    eprintln!(
        "steady state: {} objects, {} reconciles, 0 writes",
        before.len(),
        operator.metric("nixops_reconciles_total", &[]) - reconciles_before
    );
}

#[tokio::test]
async fn http_endpoints_answer() {
    let client = support::client().await;
    support::install_crds(&client).await;
    let ns = support::namespace(&client, "http").await;
    let operator = support::Operator::start(&ns, &[]);
    operator.wait_ready().await;
    create_network(&client, &ns, "prod").await;
    let networks: Api<Network> = Api::namespaced(client.clone(), &ns);
    support::wait_for(&networks, "prod", TIMEOUT, "Ready", ready).await;

    assert_eq!(operator.http_get("/healthz").map(|r| r.0), Some(200));
    assert_eq!(operator.http_get("/readyz").map(|r| r.0), Some(200));
    let (code, body) = operator.http_get("/metrics").unwrap();
    assert_eq!(code, 200);
    for metric in ["nixops_reconciles_total", "nixops_reconcile_duration_seconds_bucket", "nixops_status_writes_total"]
    {
        assert!(body.contains(metric), "/metrics lacks {metric}:\n{body}");
    }
    assert!(operator.metric("nixops_reconciles_total", &["kind=\"Network\""]) >= 1.0);
}

fn lease_flags(ns: &str) -> Vec<String> {
    [
        "--leader-election",
        "--lease-namespace",
        ns,
        "--lease-duration-seconds",
        "4",
        "--lease-renew-deadline-seconds",
        "3",
        "--lease-retry-seconds",
        "1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

#[tokio::test]
async fn only_the_leader_reconciles_and_a_standby_takes_over_when_it_dies() {
    let client = support::client().await;
    support::install_crds(&client).await;
    let ns = support::namespace(&client, "leader").await;
    let flags = lease_flags(&ns);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let first = support::Operator::start(&ns, &flags);
    first.wait_ready().await;
    first.wait_leading("the first replica never led").await;
    let second = support::Operator::start(&ns, &flags);
    second.wait_ready().await;

    create_network(&client, &ns, "one").await;
    let networks: Api<Network> = Api::namespaced(client.clone(), &ns);
    support::wait_for(&networks, "one", TIMEOUT, "Ready", ready).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(second.metric("nixops_leader", &[]), 0.0, "two leaders");
    assert_eq!(second.metric("nixops_reconciles_total", &[]), 0.0, "the standby reconciled");

    let killed_at = Instant::now();
    first.signal("KILL");
    second.wait_leading("the standby never took over").await;
    let takeover = killed_at.elapsed();
    eprintln!("takeover after {takeover:?} (lease 4 s, retry 1 s)");
    assert!(
        takeover <= Duration::from_secs(4 + 3),
        "takeover took {takeover:?}, more than the lease duration plus retries"
    );

    create_network(&client, &ns, "two").await;
    support::wait_for(&networks, "two", TIMEOUT, "Ready under the new leader", ready).await;
    let lease = Api::<Lease>::namespaced(client.clone(), &ns).get("nixops-operator").await.unwrap();
    let spec = lease.spec.unwrap();
    assert_eq!(spec.lease_transitions, Some(1));
    assert_ne!(spec.holder_identity, None);
}

/// A leader whose connection to the API server hangs (toxiproxy stops all
/// traffic between it and kube-apiserver) stops acting before the standby
/// takes over: its renewals are bounded by the renew deadline, shorter than
/// the lease.
#[tokio::test]
async fn a_leader_whose_api_connection_hangs_stops_before_the_standby_starts() {
    let client = support::client().await;
    support::install_crds(&client).await;
    let ns = support::namespace(&client, "leader-hang").await;
    let kubeconfig = std::fs::read_to_string(&support::control_plane().kubeconfig).unwrap();
    let server = kubeconfig
        .lines()
        .find_map(|l| l.trim().strip_prefix("server: https://"))
        .expect("the kubeconfig names its server")
        .to_owned();
    let toxi = support::toxiproxy();
    let listen = toxi.proxy("apiserver", &server);
    let dir = tempfile::tempdir().unwrap();
    let proxied = dir.path().join("kubeconfig");
    std::fs::write(&proxied, kubeconfig.replace(&server, &listen)).unwrap();

    let flags = [
        "--leader-election",
        "--lease-namespace",
        &ns,
        "--lease-duration-seconds",
        "6",
        "--lease-renew-deadline-seconds",
        "4",
        "--lease-retry-seconds",
        "1",
    ];
    let mut first = support::Operator::start_env(&ns, &flags, &[("KUBECONFIG", proxied.to_str().unwrap())]);
    first.wait_ready().await;
    first.wait_leading("the first replica never led").await;
    let second = support::Operator::start(&ns, &flags);
    second.wait_ready().await;
    assert_eq!(second.metric("nixops_leader", &[]), 0.0, "a ready standby, not a second leader");

    // Everything between the leader and the API server now hangs.
    for stream in ["upstream", "downstream"] {
        toxi.toxic_on(
            "apiserver",
            &format!("hang-{stream}"),
            "timeout",
            stream,
            1.0,
            serde_json::json!({"timeout": 0}),
        );
    }
    let hung_at = Instant::now();
    let mut first_stopped = None;
    let mut second_leads = None;
    while second_leads.is_none() {
        assert!(hung_at.elapsed() < TIMEOUT, "the standby never took over");
        if first_stopped.is_none() && first.wait_exit(Duration::from_millis(50)).is_some() {
            first_stopped = Some(hung_at.elapsed());
        }
        if second.metric("nixops_leader", &[]) >= 1.0 {
            second_leads = Some(hung_at.elapsed());
        }
    }
    let first_stopped = first_stopped.expect("the hung leader was still running when the standby took over");
    let second_leads = second_leads.unwrap_or_default();
    eprintln!("hung leader stopped after {first_stopped:?}, standby led after {second_leads:?}");
    assert!(
        first_stopped < second_leads,
        "the hung leader stopped {first_stopped:?} after the hang, the standby led at {second_leads:?}"
    );
    assert!(first.logs().contains("renew deadline"), "the leader says why it stopped");
}

#[tokio::test]
async fn sigterm_stops_cleanly_and_releases_the_lease() {
    let client = support::client().await;
    support::install_crds(&client).await;
    let ns = support::namespace(&client, "sigterm").await;
    let flags = lease_flags(&ns);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let mut operator = support::Operator::start(&ns, &flags);
    operator.wait_ready().await;
    operator.wait_leading("never led").await;
    operator.signal("TERM");
    let status = operator.wait_exit(Duration::from_secs(30)).expect("the operator did not exit after SIGTERM");
    assert!(status.success(), "exit status after SIGTERM: {status}; log:\n{}", operator.logs());
    let lease = Api::<Lease>::namespaced(client.clone(), &ns).get("nixops-operator").await.unwrap();
    assert_eq!(lease.spec.unwrap().holder_identity, None, "the lease was not released");
}
