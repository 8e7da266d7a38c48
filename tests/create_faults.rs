//! Cloud creates interrupted at named fault points (src/fault.rs): the real
//! operator is killed with SIGKILL right before or right after the create
//! call, and what moto holds afterwards is counted. A create whose outcome
//! nobody saw is settled by looking the resource up by its UID tag, never
//! by creating blindly again.

mod support;

use std::os::unix::process::ExitStatusExt;
use std::time::Duration;

use kube::api::{Api, Patch, PatchParams, PostParams};
use nixops_operator::api::Machine;
use serde_json::json;

const TIMEOUT: Duration = Duration::from_secs(90);

async fn instances(ec2: &aws_sdk_ec2::Client, uid: &str) -> usize {
    let filter = aws_sdk_ec2::types::Filter::builder().name("tag:nixops.io/uid").values(uid).build();
    let out = ec2.describe_instances().filters(filter).send().await.unwrap();
    out.reservations()
        .iter()
        .flat_map(|r| r.instances())
        .filter(|i| i.state().and_then(|s| s.name()).map(|n| n.as_str()) != Some("terminated"))
        .count()
}

/// A namespace with an AWS Network in moto (made Ready by a plain
/// operator), and a Machine created while an operator with `faults` runs;
/// waits for that operator to kill itself at its fault point.
async fn machine_with_fault(prefix: &str, faults: &str) -> (Api<Machine>, String, support::SshHost) {
    let client = support::client().await;
    support::install_crds(&client).await;
    let ns = support::namespace(&client, prefix).await;
    support::aws_network(&client, &ns, "aws", &support::moto().endpoint).await;
    let networks: Api<nixops_operator::api::Network> = Api::namespaced(client.clone(), &ns);
    {
        let _operator = support::Operator::start(&ns, &[]);
        support::wait_for(&networks, "aws", TIMEOUT, "Ready", |n| {
            n.status.as_ref().is_some_and(|s| support::is_ready(&s.conditions))
        })
        .await;
    }
    let ec2 = support::ec2_client().await;
    let ami = ec2.describe_images().send().await.unwrap().images()[0].image_id().unwrap().to_owned();
    let host = support::SshHost::start();
    let machines: Api<Machine> = Api::namespaced(client.clone(), &ns);
    let m: Machine = serde_json::from_value(json!({
        "apiVersion": "nixops.io/v1alpha1", "kind": "Machine", "metadata": {"name": "web"},
        "spec": {
            "networkRef": {"name": "aws"},
            "provider": {"ec2": {"instanceType": "t3.small", "ami": ami, "subnet": "public-a"}},
            "ssh": {"host": host.host, "port": host.port}
        }
    }))
    .unwrap();
    machines.create(&PostParams::default(), &m).await.unwrap();
    let mut operator = support::Operator::start_env(&ns, &[], &[("FAILPOINTS", faults)]);
    let status = operator.wait_exit(TIMEOUT).expect("the operator reaches its fault point");
    assert_eq!(status.signal(), Some(9), "killed by SIGKILL at the fault point");
    let uid = machines.get("web").await.unwrap().metadata.uid.unwrap();
    (machines, uid, host)
}

fn annotation(m: &Machine, key: &str) -> Option<String> {
    m.metadata.annotations.as_ref().and_then(|a| a.get(key).cloned())
}

#[tokio::test]
async fn killed_after_the_create_call_the_instance_is_found_not_made_again() {
    let (machines, uid, _host) = machine_with_fault("create-after", "create-after-call=return(kill)").await;
    let ec2 = support::ec2_client().await;
    assert_eq!(instances(&ec2, &uid).await, 1, "the create went through before the kill");
    let m = machines.get("web").await.unwrap();
    assert!(annotation(&m, "nixops.io/create-pending").is_some(), "its outcome was never recorded");
    assert!(annotation(&m, "nixops.io/external-name").is_none());

    let ns = m.metadata.namespace.clone().unwrap();
    let _operator = support::Operator::start(&ns, &[]);
    support::wait_for(&machines, "web", TIMEOUT, "Ready", |m| {
        m.status.as_ref().is_some_and(|s| support::is_ready(&s.conditions))
    })
    .await;
    let m = machines.get("web").await.unwrap();
    assert_eq!(instances(&ec2, &uid).await, 1, "exactly one instance");
    let id = annotation(&m, "nixops.io/external-name").expect("the found instance is recorded");
    assert!(m.status.as_ref().unwrap().provider_id.as_ref().unwrap().ends_with(&id));
    assert!(annotation(&m, "nixops.io/create-pending").is_none(), "and the pending mark cleared");
}

#[tokio::test]
async fn killed_before_the_create_call_the_machine_stalls_instead_of_guessing() {
    let (machines, uid, _host) = machine_with_fault("create-before", "create-before-call=return(kill)").await;
    let ec2 = support::ec2_client().await;
    assert_eq!(instances(&ec2, &uid).await, 0);
    let ns = machines.get("web").await.unwrap().metadata.namespace.unwrap();

    // Nobody knows whether the create was sent: the lookup window passes
    // without an instance, and the Machine says what to do.
    let _operator = support::Operator::start(&ns, &["--create-pending-seconds", "5"]);
    support::wait_for(&machines, "web", TIMEOUT, "Stalled with CreateOutcomeUnknown", |m| {
        m.status.as_ref().is_some_and(|s| {
            s.conditions
                .iter()
                .any(|c| c.type_ == "Stalled" && c.status == "True" && c.reason == "CreateOutcomeUnknown")
        })
    })
    .await;
    let m = machines.get("web").await.unwrap();
    let message = support::condition_message(&m.status.unwrap().conditions, "Stalled");
    assert!(message.contains("nixops.io/create-pending") && message.contains("nixops.io/external-name"), "{message}");
    assert_eq!(instances(&ec2, &uid).await, 0, "nothing created while the outcome is unknown");

    // The user checked: there is none. Removing the mark creates exactly one.
    let patch = json!({"metadata": {"annotations": {"nixops.io/create-pending": null}}});
    machines.patch("web", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    support::wait_for(&machines, "web", TIMEOUT, "Ready", |m| {
        m.status.as_ref().is_some_and(|s| support::is_ready(&s.conditions))
    })
    .await;
    assert_eq!(instances(&ec2, &uid).await, 1);
}
