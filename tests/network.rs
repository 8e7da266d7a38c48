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

/// A Volume "data", a KeyPair "deployer" and an S3Bucket "logs", each using Network "aws".
async fn create_dependents(client: &kube::Client, ns: &str) {
    use nixops_operator::api::{KeyPair, S3Bucket, Volume};
    let object = |kind: &str, name: &str, spec: serde_json::Value| json!({"apiVersion": "nixops.io/v1alpha1", "kind": kind, "metadata": {"name": name}, "spec": spec});
    let vol = object(
        "Volume",
        "data",
        json!({"networkRef": {"name": "aws"}, "provider": {"ec2": {"zone": "eu-west-1a", "sizeGiB": 4}}}),
    );
    let kp = object(
        "KeyPair",
        "deployer",
        json!({"secretRef": {"name": "deployer"}, "networkRef": {"name": "aws"}, "provider": {"ec2": {}}}),
    );
    let bucket = object("S3Bucket", "logs", json!({"networkRef": {"name": "aws"}}));
    let pp = PostParams::default();
    Api::<Volume>::namespaced(client.clone(), ns).create(&pp, &serde_json::from_value(vol).unwrap()).await.unwrap();
    Api::<KeyPair>::namespaced(client.clone(), ns).create(&pp, &serde_json::from_value(kp).unwrap()).await.unwrap();
    Api::<S3Bucket>::namespaced(client.clone(), ns)
        .create(&pp, &serde_json::from_value(bucket).unwrap())
        .await
        .unwrap();
}

/// Objects that use a Network wake when it appears or becomes Ready (no
/// waiting for the resync, five minutes here), and a deleted Machine leaves
/// its Network's members at once.
#[tokio::test]
async fn dependents_wake_with_their_network_and_a_deleted_machine_leaves_it_promptly() {
    use nixops_operator::api::{KeyPair, S3Bucket, Volume};
    let client = support::client().await;
    support::install_crds(&client).await;
    let ns = support::namespace(&client, "network-wake").await;
    let _operator = support::Operator::start(&ns, &["--resync-seconds", "300"]);
    let volumes: Api<Volume> = Api::namespaced(client.clone(), &ns);
    let keypairs: Api<KeyPair> = Api::namespaced(client.clone(), &ns);
    let buckets: Api<S3Bucket> = Api::namespaced(client.clone(), &ns);
    create_dependents(&client, &ns).await;
    // They wait for a Network that does not exist yet.
    support::wait_for(&volumes, "data", TIMEOUT, "waiting for its Network", |v| {
        v.status.as_ref().is_some_and(|s| support::condition_message(&s.conditions, "Ready").contains("aws"))
    })
    .await;

    support::aws_network(&client, &ns, "aws", &support::moto().endpoint).await;
    support::wait_ready(&volumes, "data").await;
    support::wait_ready(&keypairs, "deployer").await;
    support::wait_ready(&buckets, "logs").await;

    // A member leaves at once when deleted.
    let host = support::SshHost::start();
    let machines: Api<Machine> = Api::namespaced(client.clone(), &ns);
    let networks: Api<Network> = Api::namespaced(client.clone(), &ns);
    let m: Machine = serde_json::from_value(json!({
        "apiVersion": "nixops.io/v1alpha1", "kind": "Machine", "metadata": {"name": "web"},
        "spec": {"networkRef": {"name": "aws"}, "provider": {"existing": {"host": host.host, "port": host.port}}}
    }))
    .unwrap();
    machines.create(&PostParams::default(), &m).await.unwrap();
    support::wait_for(&networks, "aws", TIMEOUT, "1 member", |n| {
        n.status.as_ref().is_some_and(|s| s.machines == Some(1))
    })
    .await;
    machines.delete("web", &DeleteParams::default()).await.unwrap();
    support::wait_gone(&machines, "web", TIMEOUT).await;
    support::wait_for(&networks, "aws", Duration::from_secs(20), "no members", |n| {
        n.status.as_ref().is_some_and(|s| s.machines == Some(0) && s.members.is_empty())
    })
    .await;
}

/// A Network deleted before the Volumes, KeyPairs and S3Buckets that use
/// its account waits for them (naming them), so each cleans up its cloud
/// resource with the Network's credentials; then the VPC goes. Counted in moto.
#[tokio::test]
async fn a_network_is_deleted_after_everything_that_uses_it() {
    use nixops_operator::api::{KeyPair, S3Bucket, Volume};
    let client = support::client().await;
    support::install_crds(&client).await;
    let ns = support::namespace(&client, "network-deps").await;
    let _operator = support::Operator::start(&ns, &[]);
    support::aws_network(&client, &ns, "aws", &support::moto().endpoint).await;
    let networks: Api<Network> = Api::namespaced(client.clone(), &ns);
    let volumes: Api<Volume> = Api::namespaced(client.clone(), &ns);
    let keypairs: Api<KeyPair> = Api::namespaced(client.clone(), &ns);
    let buckets: Api<S3Bucket> = Api::namespaced(client.clone(), &ns);
    create_dependents(&client, &ns).await;
    support::wait_ready(&volumes, "data").await;
    support::wait_ready(&keypairs, "deployer").await;
    support::wait_ready(&buckets, "logs").await;
    support::wait_ready(&networks, "aws").await;
    let net = networks.get("aws").await.unwrap();
    let vpc = net.status.as_ref().and_then(|s| s.vpc_id.clone()).expect("a VPC");
    let volume_id = volumes.get("data").await.unwrap().status.unwrap().volume_id.expect("a volume");
    let bucket_name = buckets.get("logs").await.unwrap().status.unwrap().bucket_name.expect("a bucket");
    let key_name = keypairs.get("deployer").await.unwrap().status.unwrap().cloud_key_name.expect("a key pair");

    networks.delete("aws", &DeleteParams::default()).await.unwrap();
    support::wait_for(&networks, "aws", TIMEOUT, "waiting for its dependents", |n| {
        n.status.as_ref().is_some_and(|s| {
            let message = support::condition_message(&s.conditions, "Ready");
            ["Volume data", "KeyPair deployer", "S3Bucket logs"].iter().all(|d| message.contains(d))
        })
    })
    .await;
    let ec2 = support::ec2_client().await;
    let vpcs = ec2.describe_vpcs().vpc_ids(&vpc).send().await.unwrap();
    assert_eq!(vpcs.vpcs().len(), 1, "the VPC stays while others use the Network");

    volumes.delete("data", &DeleteParams::default()).await.unwrap();
    keypairs.delete("deployer", &DeleteParams::default()).await.unwrap();
    buckets.delete("logs", &DeleteParams::default()).await.unwrap();
    support::wait_gone(&networks, "aws", TIMEOUT).await;
    let gone_volume = ec2.describe_volumes().volume_ids(&volume_id).send().await;
    assert!(gone_volume.map(|v| v.volumes().is_empty()).unwrap_or(true), "the volume was deleted");
    let keys = ec2.describe_key_pairs().send().await.unwrap();
    assert!(keys.key_pairs().iter().all(|k| k.key_name() != Some(key_name.as_str())), "the key pair was deleted");
    let s3 = support::s3_client().await;
    assert!(s3.head_bucket().bucket(&bucket_name).send().await.is_err(), "the bucket was deleted");
    let vpcs = ec2.describe_vpcs().vpc_ids(&vpc).send().await;
    assert!(vpcs.map(|v| v.vpcs().is_empty()).unwrap_or(true), "the VPC was deleted last");
}
