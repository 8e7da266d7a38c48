//! Volume lifecycle against moto's EC2 API: create, grow, delete or orphan.

mod support;

use std::time::Duration;

use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use nixops_operator::api::Volume;
use serde_json::json;

const TIMEOUT: Duration = Duration::from_secs(60);

fn volume(name: &str, size: i32, policy: &str) -> Volume {
    serde_json::from_value(json!({
        "apiVersion": "nixops.io/v1alpha1", "kind": "Volume", "metadata": {"name": name},
        "spec": {"networkRef": {"name": "aws"}, "deletionPolicy": policy,
                 "provider": {"ec2": {"zone": "eu-west-1a", "sizeGiB": size, "type": "gp3"}}}
    }))
    .unwrap()
}

fn ready(v: &Volume) -> bool {
    v.status.as_ref().is_some_and(|s| support::is_ready(&s.conditions))
}

async fn volumes_tagged(ec2: &aws_sdk_ec2::Client, uid: &str) -> Vec<aws_sdk_ec2::types::Volume> {
    let filter = aws_sdk_ec2::types::Filter::builder().name("tag:nixops.io/uid").values(uid).build();
    ec2.describe_volumes().filters(filter).send().await.unwrap().volumes().to_vec()
}

#[tokio::test]
async fn volume_is_created_grown_and_deleted_or_orphaned() {
    let client = support::client().await;
    support::install_crds(&client).await;
    let ns = support::namespace(&client, "volume").await;
    support::aws_network(&client, &ns, "aws", &support::moto().endpoint).await;
    let _operator = support::Operator::start(&ns, &[]);
    let volumes: Api<Volume> = Api::namespaced(client.clone(), &ns);
    let ec2 = support::ec2_client().await;

    volumes.create(&PostParams::default(), &volume("data", 10, "Delete")).await.unwrap();
    volumes.create(&PostParams::default(), &volume("kept", 5, "Orphan")).await.unwrap();
    support::wait_for(&volumes, "data", TIMEOUT, "Ready", ready).await;
    support::wait_for(&volumes, "kept", TIMEOUT, "Ready", ready).await;

    let data = volumes.get("data").await.unwrap();
    let uid = data.metadata.uid.clone().unwrap();
    let id = data.status.as_ref().unwrap().volume_id.clone().unwrap();
    assert_eq!(data.metadata.annotations.as_ref().unwrap()["nixops.io/external-name"], id);
    let cloud = volumes_tagged(&ec2, &uid).await;
    assert_eq!(cloud.len(), 1, "exactly one volume carries the object's UID");
    assert_eq!(cloud[0].size(), Some(10));
    assert_eq!(cloud[0].availability_zone(), Some("eu-west-1a"));

    // Grow.
    let patch = json!({"spec": {"provider": {"ec2": {"sizeGiB": 20}}}});
    volumes.patch("data", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    support::wait_for(&volumes, "data", TIMEOUT, "20 GiB", |v| {
        ready(v)
            && v.status.as_ref().and_then(|s| s.size_gib) == Some(20)
            && v.status.as_ref().and_then(|s| s.observed_generation) == v.metadata.generation
    })
    .await;
    assert_eq!(volumes_tagged(&ec2, &uid).await[0].size(), Some(20));

    // Delete removes the cloud volume; Orphan keeps it.
    let kept_uid = volumes.get("kept").await.unwrap().metadata.uid.unwrap();
    volumes.delete("data", &DeleteParams::default()).await.unwrap();
    volumes.delete("kept", &DeleteParams::default()).await.unwrap();
    support::wait_gone(&volumes, "data", TIMEOUT).await;
    support::wait_gone(&volumes, "kept", TIMEOUT).await;
    assert!(volumes_tagged(&ec2, &uid).await.is_empty(), "Delete must delete the EBS volume");
    assert_eq!(volumes_tagged(&ec2, &kept_uid).await.len(), 1, "Orphan must keep the EBS volume");
}

#[tokio::test]
async fn a_volume_deleted_out_of_band_does_not_block_deletion() {
    let client = support::client().await;
    support::install_crds(&client).await;
    let ns = support::namespace(&client, "volume-oob").await;
    support::aws_network(&client, &ns, "aws", &support::moto().endpoint).await;
    let _operator = support::Operator::start(&ns, &[]);
    let volumes: Api<Volume> = Api::namespaced(client.clone(), &ns);
    let ec2 = support::ec2_client().await;

    volumes.create(&PostParams::default(), &volume("gone", 8, "Delete")).await.unwrap();
    support::wait_for(&volumes, "gone", TIMEOUT, "Ready", ready).await;
    let id = volumes.get("gone").await.unwrap().status.unwrap().volume_id.unwrap();
    ec2.delete_volume().volume_id(&id).send().await.unwrap();
    volumes.delete("gone", &DeleteParams::default()).await.unwrap();
    support::wait_gone(&volumes, "gone", TIMEOUT).await;
}
