//! Scale: a member change costs its Network a few reconciles served from the
//! operator's shared store, whatever the number of members. In a test binary
//! of its own, so the API server's request counters see this operator only.

mod support;

use std::time::Duration;

use kube::api::{Api, PostParams};
use nixops_operator::api::{Machine, Network};
use serde_json::json;

const TIMEOUT: Duration = Duration::from_secs(120);
const MEMBERS: usize = 40;

/// LIST requests for Machines the API server has served. Panics when the
/// series is missing: a renamed metric must not read as zero.
async fn machine_lists(client: &kube::Client) -> f64 {
    let request = http::Request::get("/metrics").body(Vec::new()).expect("request");
    let body = client.request_text(request).await.expect("API server metrics");
    let samples: Vec<f64> = body
        .lines()
        .filter(|l| l.starts_with("apiserver_request_total{"))
        .filter(|l| l.contains("verb=\"LIST\"") && l.contains("resource=\"machines\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .collect();
    assert!(!samples.is_empty(), "the API server reports no LIST of machines (its watches start with one)");
    samples.iter().sum()
}

/// A counter of the operator's for Networks; panics when the series is missing.
fn network_counter(operator: &support::Operator, name: &str) -> f64 {
    let (200, body) = operator.http_get("/metrics").expect("operator metrics") else {
        panic!("operator /metrics did not answer 200")
    };
    let line = body
        .lines()
        .find(|l| l.starts_with(&format!("{name}{{")) && l.contains("kind=\"Network\""))
        .unwrap_or_else(|| panic!("no {name}{{kind=\"Network\"}} in the operator's metrics"));
    line.rsplit(' ').next().and_then(|v| v.parse().ok()).expect("a number")
}

fn machine(name: &str) -> Machine {
    serde_json::from_value(json!({
        "apiVersion": "nixops.io/v1alpha1", "kind": "Machine", "metadata": {"name": name},
        "spec": {"networkRef": {"name": "big"}}
    }))
    .unwrap()
}

fn ready_members(network: &Network) -> usize {
    network.status.as_ref().and_then(|s| s.ready_machines).unwrap_or_default() as usize
}

/// Waits until the Network's reconcile count stops moving for a moment.
async fn settled(operator: &support::Operator) -> f64 {
    let mut last = network_counter(operator, "nixops_reconciles_total");
    let mut still = 0;
    for _ in 0..600 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = network_counter(operator, "nixops_reconciles_total");
        still = if now == last { still + 1 } else { 0 };
        last = now;
        if still >= 20 {
            return now;
        }
    }
    panic!("the Network kept reconciling for a minute with nothing changing");
}

#[tokio::test]
async fn a_member_joining_a_big_network_costs_a_few_reconciles_and_no_machine_lists() {
    let client = support::client().await;
    support::install_crds(&client).await;
    let ns = support::namespace(&client, "netscale").await;
    let operator = support::Operator::start(&ns, &[]);
    let machines: Api<Machine> = Api::namespaced(client.clone(), &ns);
    let networks: Api<Network> = Api::namespaced(client.clone(), &ns);
    let host = support::SshHost::start();

    let net: Network = serde_json::from_value(json!({
        "apiVersion": "nixops.io/v1alpha1", "kind": "Network", "metadata": {"name": "big"},
        "spec": {"machineDefaults": {"provider": {"existing": {"host": host.host, "port": host.port}}}}
    }))
    .unwrap();
    networks.create(&PostParams::default(), &net).await.unwrap();
    for i in 0..MEMBERS {
        machines.create(&PostParams::default(), &machine(&format!("m-{i}"))).await.unwrap();
    }
    support::wait_for(&networks, "big", TIMEOUT, "every member Ready", |n| ready_members(n) == MEMBERS).await;
    let reconciles_before = settled(&operator).await;
    let writes_before = network_counter(&operator, "nixops_status_writes_total");
    let lists_before = machine_lists(&client).await;

    // One member change: a machine joins and becomes Ready.
    machines.create(&PostParams::default(), &machine("joiner")).await.unwrap();
    support::wait_for(&networks, "big", TIMEOUT, "the joiner published as a Ready member", |n| {
        ready_members(n) == MEMBERS + 1
            && n.status.as_ref().is_some_and(|s| s.members.iter().any(|m| m.name == "joiner" && m.host_key.is_some()))
    })
    .await;
    let reconciles = settled(&operator).await - reconciles_before;
    let writes = network_counter(&operator, "nixops_status_writes_total") - writes_before;
    let lists = machine_lists(&client).await - lists_before;
    eprintln!("one member joining {MEMBERS}: {reconciles} Network reconciles, {writes} writes, {lists} Machine LISTs");

    // Its joining changes what the Network publishes a few times (member,
    // addresses and host key, Ready); each wakes the Network once, and each
    // write wakes it once more to find nothing to do. None of that grows
    // with the members, and none of it lists Machines from the API server.
    assert!(reconciles >= 1.0, "the Network never reconciled for the joiner");
    assert!(
        reconciles <= 10.0,
        "{reconciles} Network reconciles for one member joining a Network of {MEMBERS}: a cascade"
    );
    assert!(writes <= 4.0, "{writes} Network status writes for one member joining");
    assert_eq!(lists, 0.0, "the Network (or another controller) listed Machines from the API server {lists} times");
}
