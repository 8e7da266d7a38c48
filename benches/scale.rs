//! `make bench-scale`: SCALE_OBJECTS objects (half KeyPairs, half Machines
//! of one Network against a few local SSH hosts) reconciled by one operator
//! process. Prints `scale_objects`, `scale_ready_seconds`, `resync_writes`,
//! `rss_mib`, `network_reconciles_per_member_change` (Network reconciles
//! while its Machines join and become Ready, per Machine) and
//! `machine_list_calls` (LISTs of Machines the API server served the
//! operator meanwhile).
//! A benchmark, not a test: figures go in notes, not assertions.

#[path = "../tests/support/mod.rs"]
mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use kube::ResourceExt;
use kube::api::{Api, ListParams, Patch, PatchParams};
use nixops_operator::api::{KeyPair, Machine, Network};
use serde_json::json;

const HOSTS: usize = 4;

fn ready(conditions: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition]) -> bool {
    support::condition(conditions, "Ready").as_deref() == Some("True")
}

/// LISTs of Machines this bench makes itself, to tell the operator's apart.
static OWN_MACHINE_LISTS: AtomicUsize = AtomicUsize::new(0);

async fn count_ready(client: &kube::Client, ns: &str) -> (usize, usize) {
    let lp = ListParams::default();
    OWN_MACHINE_LISTS.fetch_add(1, Ordering::Relaxed);
    let machines = Api::<Machine>::namespaced(client.clone(), ns).list(&lp).await.expect("list machines");
    let keypairs = Api::<KeyPair>::namespaced(client.clone(), ns).list(&lp).await.expect("list keypairs");
    let ready_machines =
        machines.items.iter().filter(|m| m.status.as_ref().is_some_and(|s| ready(&s.conditions))).count();
    let ready_keypairs =
        keypairs.items.iter().filter(|k| k.status.as_ref().is_some_and(|s| ready(&s.conditions))).count();
    (ready_machines + ready_keypairs, machines.items.len() + keypairs.items.len())
}

async fn versions(client: &kube::Client, ns: &str) -> Vec<(String, String)> {
    let lp = ListParams::default();
    let mut all: Vec<(String, String)> = Vec::new();
    OWN_MACHINE_LISTS.fetch_add(1, Ordering::Relaxed);
    for m in Api::<Machine>::namespaced(client.clone(), ns).list(&lp).await.expect("list") {
        all.push((format!("m/{}", m.name_any()), m.resource_version().unwrap_or_default()));
    }
    for k in Api::<KeyPair>::namespaced(client.clone(), ns).list(&lp).await.expect("list") {
        all.push((format!("k/{}", k.name_any()), k.resource_version().unwrap_or_default()));
    }
    all
}

/// LIST requests for Machines the API server has served (its own metrics),
/// less those this bench made.
async fn machine_lists(client: &kube::Client) -> f64 {
    let request = http::Request::get("/metrics").body(Vec::new()).expect("request");
    let body = client.request_text(request).await.expect("API server metrics");
    body.lines()
        .filter(|l| l.starts_with("apiserver_request_total{"))
        .filter(|l| l.contains("verb=\"LIST\"") && l.contains("resource=\"machines\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>()
        - OWN_MACHINE_LISTS.load(Ordering::Relaxed) as f64
}

fn peak_rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        .map(|kib| kib / 1024.0)
        .unwrap_or(0.0)
}

#[tokio::main]
async fn main() {
    let objects: usize = std::env::var("SCALE_OBJECTS").ok().and_then(|v| v.parse().ok()).unwrap_or(2000);
    let client = support::client().await;
    support::install_crds(&client).await;
    let ns = support::namespace(&client, "scale").await;
    let hosts: Vec<support::SshHost> = (0..HOSTS).map(|_| support::SshHost::start()).collect();

    // Create everything first (server-side apply, as kubectl/Argo would).
    let params = PatchParams::apply("bench").force();
    let networks: Api<Network> = Api::namespaced(client.clone(), &ns);
    let net = json!({"apiVersion": "nixops.io/v1alpha1", "kind": "Network", "metadata": {"name": "scale"}, "spec": {}});
    networks.patch("scale", &params, &Patch::Apply(&net)).await.expect("network");
    let keypairs: Api<KeyPair> = Api::namespaced(client.clone(), &ns);
    let machines: Api<Machine> = Api::namespaced(client.clone(), &ns);
    let half = objects / 2;
    let created = Instant::now();
    for i in 0..half {
        let name = format!("key-{i}");
        let kp = json!({"apiVersion": "nixops.io/v1alpha1", "kind": "KeyPair", "metadata": {"name": name},
                        "spec": {"secretRef": {"name": name}}});
        keypairs.patch(&name, &params, &Patch::Apply(&kp)).await.expect("keypair");
    }
    for i in 0..objects - half {
        let name = format!("machine-{i}");
        let host = &hosts[i % HOSTS];
        let m = json!({"apiVersion": "nixops.io/v1alpha1", "kind": "Machine", "metadata": {"name": name},
                       "spec": {"networkRef": {"name": "scale"},
                                "provider": {"existing": {"host": host.host, "port": host.port}}}});
        machines.patch(&name, &params, &Patch::Apply(&m)).await.expect("machine");
    }
    eprintln!("created {objects} objects in {:.1} s", created.elapsed().as_secs_f64());

    // A resync re-checks every Machine over SSH; at 10,000 objects a short
    // one leaves no time for anything else on a small machine.
    let resync: u64 = std::env::var("SCALE_RESYNC_SECONDS").ok().and_then(|v| v.parse().ok()).unwrap_or(60);
    let lists_before = machine_lists(&client).await;
    let operator = support::Operator::start(&ns, &["--resync-seconds", &resync.to_string()]);
    let started = Instant::now();
    loop {
        let (ready, total) = count_ready(&client, &ns).await;
        if ready == total {
            break;
        }
        if started.elapsed() > Duration::from_secs(1800) {
            panic!("only {ready} of {total} Ready after 30 minutes");
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let ready_seconds = started.elapsed().as_secs_f64();
    let network_reconciles = operator.metric("nixops_reconciles_total", &["kind=\"Network\""]);
    let machine_list_calls = machine_lists(&client).await - lists_before;

    // One full resync once everything is Ready: count what it writes.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let before = versions(&client, &ns).await;
    let writes_before = operator.metric("nixops_status_writes_total", &[]);
    let reconciles_before = operator.metric("nixops_reconciles_total", &[]);
    let resync_started = Instant::now();
    while operator.metric("nixops_reconciles_total", &[]) < reconciles_before + objects as f64 {
        if resync_started.elapsed() > Duration::from_secs(resync * 10) {
            eprintln!("warning: fewer than {objects} reconciles in the resync window");
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let after = versions(&client, &ns).await;
    let changed = before.iter().zip(&after).filter(|(a, b)| a != b).count();
    let writes = operator.metric("nixops_status_writes_total", &[]) - writes_before;

    println!("scale_objects: {objects}");
    println!("scale_ready_seconds: {ready_seconds:.1}");
    println!("resync_writes: {}", writes.max(changed as f64));
    println!("rss_mib: {:.1}", peak_rss_mib(operator.pid()));
    // Every Machine joined the Network and became Ready once: one member change each.
    println!("network_reconciles_per_member_change: {:.2}", network_reconciles / (objects - half) as f64);
    println!("machine_list_calls: {machine_list_calls}");
}
