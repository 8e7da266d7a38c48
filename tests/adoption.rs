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

    // An observed bucket, named only by the annotation, is read, never
    // changed, and survives deletion.
    let s3_bucket = |name: &str, annotation: &str, spec: serde_json::Value| -> S3Bucket {
        let mut full = json!({"networkRef": {"name": "aws"}});
        full.as_object_mut().unwrap().extend(spec.as_object().unwrap().clone());
        serde_json::from_value(json!({
            "apiVersion": "nixops.io/v1alpha1", "kind": "S3Bucket",
            "metadata": {"name": name, "annotations": {"nixops.io/external-name": annotation}},
            "spec": full
        }))
        .unwrap()
    };
    let made_elsewhere = |name: String| {
        let s3 = s3.clone();
        async move {
            support::create_bucket(&s3, &name).await;
            name
        }
    };
    let bucket_ready = |b: &S3Bucket| {
        b.status.as_ref().is_some_and(|s| support::condition(&s.conditions, "Ready").as_deref() == Some("True"))
    };
    let uid_tag = |tags: aws_sdk_s3::operation::get_bucket_tagging::GetBucketTaggingOutput| {
        tags.tag_set().iter().find(|t| t.key() == "nixops.io/uid").map(|t| t.value().to_owned())
    };
    let watched = made_elsewhere(format!("{ns}-watched")).await;
    let buckets: Api<S3Bucket> = Api::namespaced(client.clone(), &ns);
    buckets
        .create(
            &PostParams::default(),
            &s3_bucket("observed", &watched, json!({"managementPolicy": "Observe", "versioning": true})),
        )
        .await
        .unwrap();
    support::wait_for(&buckets, "observed", TIMEOUT, "Ready", bucket_ready).await;
    let status = buckets.get("observed").await.unwrap().status.unwrap();
    assert_eq!(status.bucket_name.as_deref(), Some(watched.as_str()), "Observe reads the annotated bucket");
    let versioning = s3.get_bucket_versioning().bucket(&watched).send().await.unwrap();
    assert!(versioning.status().is_none(), "Observe must not enable versioning");
    assert!(s3.get_bucket_tagging().bucket(&watched).send().await.is_err(), "Observe must not tag the bucket");
    buckets.delete("observed", &DeleteParams::default()).await.unwrap();
    support::wait_gone(&buckets, "observed", TIMEOUT).await;
    assert!(s3.head_bucket().bucket(&watched).send().await.is_ok(), "Observe must not delete the bucket");

    // Adoption: the annotated bucket is tagged with the object's UID and
    // managed, not a new one created under the default name.
    let taken_over = made_elsewhere(format!("{ns}-taken-over")).await;
    buckets
        .create(&PostParams::default(), &s3_bucket("adopted", &taken_over, json!({"versioning": true})))
        .await
        .unwrap();
    support::wait_for(&buckets, "adopted", TIMEOUT, "Ready", bucket_ready).await;
    let adopted = buckets.get("adopted").await.unwrap();
    assert_eq!(adopted.status.unwrap().bucket_name.as_deref(), Some(taken_over.as_str()));
    let versioning = s3.get_bucket_versioning().bucket(&taken_over).send().await.unwrap();
    assert_eq!(versioning.status().map(|s| s.as_str()), Some("Enabled"), "an adopted bucket is managed");
    let tags = s3.get_bucket_tagging().bucket(&taken_over).send().await.unwrap();
    assert_eq!(uid_tag(tags), adopted.metadata.uid, "an adopted bucket is tagged with its owner");
    let listed = s3.list_buckets().send().await.unwrap();
    let created = listed.buckets().iter().filter_map(|b| b.name()).find(|n| n.starts_with(&format!("{ns}-adopted")));
    assert_eq!(created, None, "adoption must not create a bucket under the default name");
    buckets.delete("adopted", &DeleteParams::default()).await.unwrap();
    support::wait_gone(&buckets, "adopted", TIMEOUT).await;
    assert!(s3.head_bucket().bucket(&taken_over).send().await.is_err(), "an adopted bucket is deleted under Delete");
}
