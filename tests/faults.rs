//! Transient faults between the operator and the AWS endpoint (connection
//! resets, timeouts, slow answers), injected by toxiproxy in front of moto:
//! they are retried, and each object still ends with exactly one resource.

mod support;

use std::time::Duration;

use kube::api::{Api, PostParams};
use nixops_operator::api::{Machine, Volume};
use serde_json::json;

const TIMEOUT: Duration = Duration::from_secs(240);

fn ready(c: Option<&Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition>>) -> bool {
    c.is_some_and(|c| support::is_ready(c))
}

#[tokio::test]
async fn faults_are_retried_and_leave_exactly_one_resource() {
    let client = support::client().await;
    support::install_crds(&client).await;
    let ns = support::namespace(&client, "faults").await;
    let moto = support::moto().endpoint.trim_start_matches("http://").to_owned();
    let toxi = support::toxiproxy();
    let listen = toxi.proxy("moto", &moto);
    support::aws_network(&client, &ns, "aws", &format!("http://{listen}")).await;

    let ec2 = support::ec2_client().await;
    let ami = ec2.describe_images().send().await.unwrap().images()[0].image_id().unwrap().to_owned();

    // Slow answers everywhere; a share of connections reset or hung.
    toxi.toxic("moto", "slow", "latency", 1.0, json!({"latency": 200, "jitter": 100}));
    toxi.toxic("moto", "resets", "reset_peer", 0.2, json!({"timeout": 50}));
    toxi.toxic("moto", "hangs", "timeout", 0.1, json!({"timeout": 3000}));

    let operator = support::Operator::start(&ns, &["--create-pending-seconds", "10"]);
    let host = support::SshHost::start();
    let machines: Api<Machine> = Api::namespaced(client.clone(), &ns);
    let volumes: Api<Volume> = Api::namespaced(client.clone(), &ns);
    for i in 0..3 {
        let m: Machine = serde_json::from_value(json!({
            "apiVersion": "nixops.io/v1alpha1", "kind": "Machine", "metadata": {"name": format!("m-{i}")},
            "spec": {"networkRef": {"name": "aws"}, "ssh": {"host": host.host, "port": host.port},
                     "provider": {"ec2": {"instanceType": "t3.small", "ami": ami, "subnet": "public-a"}}}
        }))
        .unwrap();
        machines.create(&PostParams::default(), &m).await.unwrap();
        let v: Volume = serde_json::from_value(json!({
            "apiVersion": "nixops.io/v1alpha1", "kind": "Volume", "metadata": {"name": format!("v-{i}")},
            "spec": {"networkRef": {"name": "aws"}, "provider": {"ec2": {"zone": "eu-west-1a", "sizeGiB": 2}}}
        }))
        .unwrap();
        volumes.create(&PostParams::default(), &v).await.unwrap();
    }
    for i in 0..3 {
        support::wait_for(&machines, &format!("m-{i}"), TIMEOUT, "Ready despite faults", |m| {
            ready(m.status.as_ref().map(|s| &s.conditions))
        })
        .await;
        support::wait_for(&volumes, &format!("v-{i}"), TIMEOUT, "Ready despite faults", |v| {
            ready(v.status.as_ref().map(|s| &s.conditions))
        })
        .await;
    }
    let retried = operator.metric("nixops_reconcile_errors_total", &["class=\"provider\""]);
    eprintln!("reconciliations that failed on an injected fault and were retried: {retried}");
    assert!(retried > 0.0, "no fault reached the operator; the test would prove nothing");
    toxi.remove_toxic("moto", "hangs");
    toxi.remove_toxic("moto", "resets");

    let tagged = |uid: String| aws_sdk_ec2::types::Filter::builder().name("tag:nixops.io/uid").values(uid).build();
    for i in 0..3 {
        let uid = machines.get(&format!("m-{i}")).await.unwrap().metadata.uid.unwrap();
        let out = ec2.describe_instances().filters(tagged(uid)).send().await.unwrap();
        let count: usize = out.reservations().iter().map(|r| r.instances().len()).sum();
        assert_eq!(count, 1, "m-{i}: exactly one instance");
        let uid = volumes.get(&format!("v-{i}")).await.unwrap().metadata.uid.unwrap();
        let out = ec2.describe_volumes().filters(tagged(uid)).send().await.unwrap();
        assert_eq!(out.volumes().len(), 1, "v-{i}: exactly one volume");
    }
    // The Network was built through the same faults: one of each of its parts.
    let in_ns = || aws_sdk_ec2::types::Filter::builder().name("tag:nixops.io/namespace").values(&ns).build();
    let vpcs = ec2.describe_vpcs().filters(in_ns()).send().await.unwrap().vpcs().len();
    let subnets = ec2.describe_subnets().filters(in_ns()).send().await.unwrap().subnets().len();
    let gateways = ec2.describe_internet_gateways().filters(in_ns()).send().await.unwrap().internet_gateways().len();
    let groups = ec2.describe_security_groups().filters(in_ns()).send().await.unwrap();
    let groups = groups.security_groups().iter().filter(|g| g.group_name() != Some("default")).count();
    assert_eq!((vpcs, subnets, gateways, groups), (1, 1, 1, 1), "one VPC, subnet, internet gateway, security group");
}
