//! Adoption and the Observe management policy: with the
//! `nixops.io/external-name` annotation an object takes over an existing
//! cloud resource instead of creating one; with `managementPolicy: Observe`
//! it only reads it, never changing or deleting it.

mod support;

use std::time::Duration;

use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use nixops_operator::api::{S3Bucket, Volume};
use serde_json::json;

const TIMEOUT: Duration = Duration::from_secs(60);

fn volume(name: &str, id: &str, policy: &str, size: i32) -> Volume {
    serde_json::from_value(json!({
        "apiVersion": "nixops.io/v1alpha1", "kind": "Volume",
        "metadata": {"name": name, "annotations": {"nixops.io/external-name": id}},
        "spec": {"networkRef": {"name": "aws"}, "managementPolicy": policy,
                 "provider": {"ec2": {"zone": "eu-west-1a", "sizeGiB": size}}}
    }))
    .unwrap()
}

fn ready(v: &Volume) -> bool {
    v.status.as_ref().is_some_and(|s| support::is_ready(&s.conditions))
}

async fn size_of(ec2: &aws_sdk_ec2::Client, id: &str) -> Option<i32> {
    ec2.describe_volumes().volume_ids(id).send().await.ok()?.volumes().first()?.size()
}

#[tokio::test]
async fn observe_reads_and_adoption_takes_over_existing_volumes_and_buckets() {
    let client = support::client().await;
    support::install_crds(&client).await;
    let ns = support::namespace(&client, "adopt").await;
    support::aws_network(&client, &ns, "aws", &support::moto().endpoint).await;
    let _operator = support::Operator::start(&ns, &[]);
    let (ec2, s3) = (support::ec2_client().await, support::s3_client().await);
    let volumes: Api<Volume> = Api::namespaced(client.clone(), &ns);

    let made_elsewhere = |size| {
        let ec2 = ec2.clone();
        async move {
            ec2.create_volume()
                .availability_zone("eu-west-1a")
                .size(size)
                .send()
                .await
                .unwrap()
                .volume_id()
                .unwrap()
                .to_owned()
        }
    };
    let observed_id = made_elsewhere(7).await;
    let adopted_id = made_elsewhere(8).await;
    let before = ec2.describe_volumes().send().await.unwrap().volumes().len();

    // Observe: read, report, never change or delete.
    volumes.create(&PostParams::default(), &volume("observed", &observed_id, "Observe", 7)).await.unwrap();
    support::wait_for(&volumes, "observed", TIMEOUT, "Ready", ready).await;
    assert_eq!(volumes.get("observed").await.unwrap().status.unwrap().volume_id.as_deref(), Some(observed_id.as_str()));
    let patch = json!({"spec": {"provider": {"ec2": {"sizeGiB": 30}}}});
    volumes.patch("observed", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    support::wait_for(&volumes, "observed", TIMEOUT, "generation observed", |v| {
        ready(v) && v.status.as_ref().and_then(|s| s.observed_generation) == v.metadata.generation
    })
    .await;
    assert_eq!(size_of(&ec2, &observed_id).await, Some(7), "Observe must not change the volume");

    // Adoption: the annotated volume is taken over, not created anew.
    volumes.create(&PostParams::default(), &volume("adopted", &adopted_id, "Default", 16)).await.unwrap();
    support::wait_for(&volumes, "adopted", TIMEOUT, "Ready at 16 GiB", |v| {
        ready(v) && v.status.as_ref().and_then(|s| s.size_gib) == Some(16)
    })
    .await;
    assert_eq!(size_of(&ec2, &adopted_id).await, Some(16), "an adopted volume is managed");
    assert_eq!(
        ec2.describe_volumes().send().await.unwrap().volumes().len(),
        before,
        "adoption must not create volumes"
    );

    volumes.delete("observed", &DeleteParams::default()).await.unwrap();
    support::wait_gone(&volumes, "observed", TIMEOUT).await;
    assert_eq!(size_of(&ec2, &observed_id).await, Some(7), "Observe must not delete the volume");
    volumes.delete("adopted", &DeleteParams::default()).await.unwrap();
    support::wait_gone(&volumes, "adopted", TIMEOUT).await;
    assert_eq!(size_of(&ec2, &adopted_id).await, None, "an adopted volume is deleted under Delete");

    // An observed bucket keeps its objects and survives deletion.
    let bucket = format!("{ns}-observed");
    s3.create_bucket()
        .bucket(&bucket)
        .create_bucket_configuration(
            aws_sdk_s3::types::CreateBucketConfiguration::builder()
                .location_constraint(aws_sdk_s3::types::BucketLocationConstraint::from("eu-west-1"))
                .build(),
        )
        .send()
        .await
        .unwrap();
    let buckets: Api<S3Bucket> = Api::namespaced(client.clone(), &ns);
    let b: S3Bucket = serde_json::from_value(json!({
        "apiVersion": "nixops.io/v1alpha1", "kind": "S3Bucket",
        "metadata": {"name": "observed", "annotations": {"nixops.io/external-name": bucket}},
        "spec": {"networkRef": {"name": "aws"}, "managementPolicy": "Observe", "versioning": true}
    }))
    .unwrap();
    buckets.create(&PostParams::default(), &b).await.unwrap();
    support::wait_for(&buckets, "observed", TIMEOUT, "Ready", |b| {
        b.status.as_ref().is_some_and(|s| support::condition(&s.conditions, "Ready").as_deref() == Some("True"))
    })
    .await;
    let versioning = s3.get_bucket_versioning().bucket(&bucket).send().await.unwrap();
    assert!(versioning.status().is_none(), "Observe must not enable versioning");
    buckets.delete("observed", &DeleteParams::default()).await.unwrap();
    support::wait_gone(&buckets, "observed", TIMEOUT).await;
    assert!(s3.head_bucket().bucket(&bucket).send().await.is_ok(), "Observe must not delete the bucket");
}
