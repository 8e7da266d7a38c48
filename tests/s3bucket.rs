//! S3Bucket lifecycle against moto's S3 API.

mod support;

use std::time::Duration;

use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use nixops_operator::api::S3Bucket;
use serde_json::json;

const TIMEOUT: Duration = Duration::from_secs(60);

fn bucket(name: &str, spec: serde_json::Value) -> S3Bucket {
    let mut full = json!({"networkRef": {"name": "aws"}});
    full.as_object_mut().unwrap().extend(spec.as_object().unwrap().clone());
    serde_json::from_value(json!({
        "apiVersion": "nixops.io/v1alpha1", "kind": "S3Bucket", "metadata": {"name": name}, "spec": full
    }))
    .unwrap()
}

fn cond(b: &S3Bucket, t: &str) -> Option<String> {
    b.status.as_ref().and_then(|s| support::condition(&s.conditions, t))
}

#[tokio::test]
async fn bucket_lifecycle_with_versioning_policy_tags_and_deletion_rules() {
    let client = support::client().await;
    support::install_crds(&client).await;
    let ns = support::namespace(&client, "bucket").await;
    support::aws_network(&client, &ns, "aws", &support::moto().endpoint).await;
    let _operator = support::Operator::start(&ns, &[]);
    let buckets: Api<S3Bucket> = Api::namespaced(client.clone(), &ns);
    let s3 = support::s3_client().await;
    let cache = format!("{ns}-cache");

    let policy = json!({"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Principal": "*",
        "Action": "s3:GetObject", "Resource": format!("arn:aws:s3:::{cache}/*")}]});
    buckets
        .create(
            &PostParams::default(),
            &bucket(
                "cache",
                json!({"bucketName": cache, "versioning": true,
            "policy": policy.to_string(), "tags": {"purpose": "nix-cache"}}),
            ),
        )
        .await
        .unwrap();
    support::wait_for(&buckets, "cache", TIMEOUT, "Ready", |b| cond(b, "Ready").as_deref() == Some("True")).await;
    let status = buckets.get("cache").await.unwrap().status.unwrap();
    assert_eq!(status.bucket_name.as_deref(), Some(cache.as_str()));
    assert_eq!(status.region.as_deref(), Some("eu-west-1"));

    let versioning = s3.get_bucket_versioning().bucket(&cache).send().await.unwrap();
    assert_eq!(versioning.status().map(|s| s.as_str()), Some("Enabled"));
    let tags = s3.get_bucket_tagging().bucket(&cache).send().await.unwrap();
    assert!(tags.tag_set().iter().any(|t| t.key() == "purpose" && t.value() == "nix-cache"));
    assert!(tags.tag_set().iter().any(|t| t.key() == "nixops.io/uid"));
    let stored: serde_json::Value =
        serde_json::from_str(s3.get_bucket_policy().bucket(&cache).send().await.unwrap().policy().unwrap()).unwrap();
    assert_eq!(stored["Statement"][0]["Action"], "s3:GetObject");
    let location = s3.get_bucket_location().bucket(&cache).send().await.unwrap();
    assert_eq!(location.location_constraint().map(|l| l.as_str()), Some("eu-west-1"));

    // Bad policy JSON: Stalled, naming the field; the bucket is untouched.
    let patch = json!({"spec": {"policy": "{\"Version\": \"2012-10-17\","}});
    buckets.patch("cache", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    support::wait_for(&buckets, "cache", TIMEOUT, "Stalled", |b| cond(b, "Stalled").as_deref() == Some("True")).await;
    let msg = support::condition_message(&buckets.get("cache").await.unwrap().status.unwrap().conditions, "Stalled");
    assert!(msg.contains("spec.policy is not valid JSON"), "{msg}");
    assert!(s3.get_bucket_policy().bucket(&cache).send().await.is_ok(), "the old policy must stay");

    // A non-empty bucket is not deleted without forceDestroy.
    s3.put_object()
        .bucket(&cache)
        .key("nix-cache-info")
        .body(b"StoreDir: /nix/store\n".to_vec().into())
        .send()
        .await
        .unwrap();
    let patch = json!({"spec": {"policy": null}});
    buckets.patch("cache", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    support::wait_for(&buckets, "cache", TIMEOUT, "Ready again", |b| cond(b, "Ready").as_deref() == Some("True")).await;
    buckets.delete("cache", &DeleteParams::default()).await.unwrap();
    support::wait_for(&buckets, "cache", TIMEOUT, "Stalled on a non-empty bucket", |b| {
        cond(b, "Stalled").as_deref() == Some("True")
            && support::condition_message(&b.status.as_ref().unwrap().conditions, "Stalled").contains("forceDestroy")
    })
    .await;
    assert!(s3.head_bucket().bucket(&cache).send().await.is_ok(), "a non-empty bucket must not be deleted");

    // forceDestroy empties and deletes it.
    let patch = json!({"spec": {"forceDestroy": true}});
    buckets.patch("cache", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    support::wait_gone(&buckets, "cache", TIMEOUT).await;
    assert!(s3.head_bucket().bucket(&cache).send().await.is_err(), "the bucket must be gone");

    // Orphan keeps the bucket; the default name is <namespace>-<name>.
    buckets.create(&PostParams::default(), &bucket("kept", json!({"deletionPolicy": "Orphan"}))).await.unwrap();
    support::wait_for(&buckets, "kept", TIMEOUT, "Ready", |b| cond(b, "Ready").as_deref() == Some("True")).await;
    buckets.delete("kept", &DeleteParams::default()).await.unwrap();
    support::wait_gone(&buckets, "kept", TIMEOUT).await;
    assert!(s3.head_bucket().bucket(format!("{ns}-kept")).send().await.is_ok(), "Orphan must keep the bucket");
}
