//! S3Bucket lifecycle against moto's S3 API, and the bucket names the API
//! server and the controller refuse.

mod support;

use std::time::Duration;

use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use nixops_operator::api::S3Bucket;
use nixops_operator::api::s3bucket::bucket_name_violation;
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

    // Orphan keeps the bucket; the default name is <namespace>-<name>-<hash>.
    buckets.create(&PostParams::default(), &bucket("kept", json!({"deletionPolicy": "Orphan"}))).await.unwrap();
    support::wait_for(&buckets, "kept", TIMEOUT, "Ready", |b| cond(b, "Ready").as_deref() == Some("True")).await;
    let kept = buckets.get("kept").await.unwrap();
    let name = kept.status.unwrap().bucket_name.unwrap();
    assert!(name.starts_with(&format!("{ns}-kept-")), "{name}");
    assert_eq!(kept.metadata.annotations.unwrap().get("nixops.io/external-name"), Some(&name), "the name is recorded");
    buckets.delete("kept", &DeleteParams::default()).await.unwrap();
    support::wait_gone(&buckets, "kept", TIMEOUT).await;
    assert!(s3.head_bucket().bucket(&name).send().await.is_ok(), "Orphan must keep the bucket");
}

/// The controller's check of the names it derives and the schema's check of
/// spec.bucketName are two codings of AWS's rules; the API server decides
/// whether they agree.
#[tokio::test]
async fn the_controller_refuses_exactly_the_bucket_names_the_api_server_refuses() {
    let client = support::client().await;
    support::install_crds(&client).await;
    let ns = support::namespace(&client, "bucket-names").await;
    let names = [
        "nix-cache",
        "my.bucket.example",
        "team-a-xn--cache",
        "s3alias",
        "1.2.3",
        "1.2.3.4.5",
        "a-b",
        "ab",
        "My_Bucket",
        "cache-",
        "a..b",
        "192.168.5.4",
        "192.168.05.4",
        "xn--bcher-kva",
        "sthree-cache",
        "sthree-configurator-x",
        "amzn-s3-demo-bucket",
        "cache-s3alias",
        "cache--ol-s3",
        "cache.mrap",
        "cache--x-s3",
        "cache--table-s3",
    ];
    let long = "a".repeat(64);
    let mut failures = Vec::new();
    for name in names.iter().copied().chain([long.as_str()]) {
        let manifest = serde_json::to_string(&bucket("names", json!({"bucketName": name}))).unwrap();
        let out = support::kubectl(&["create", "--dry-run=server", "-n", &ns, "-f", "-"], Some(&manifest));
        let refused = String::from_utf8_lossy(&out.stderr).into_owned();
        match (out.status.success(), bucket_name_violation(name)) {
            (true, None) => {}
            (true, Some(violation)) => {
                failures.push(format!("{name}: accepted by the API server, refused: {violation}"))
            }
            (false, None) => failures.push(format!("{name}: refused by the API server only: {refused}")),
            // The API server words length limits itself.
            (false, Some(violation)) if !violation.contains("characters long") && !refused.contains(&violation) => {
                failures
                    .push(format!("{name}: the messages differ:\n  API server: {refused}\n  controller: {violation}"))
            }
            (false, Some(_)) => {}
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[tokio::test]
async fn a_default_bucket_name_s3_refuses_stalls_until_spec_bucket_name_is_set() {
    let client = support::client().await;
    support::install_crds(&client).await;
    // Default names in a namespace sthree-… start with a prefix AWS reserves.
    let ns = support::namespace(&client, "sthree").await;
    support::aws_network(&client, &ns, "aws", &support::moto().endpoint).await;
    let _operator = support::Operator::start(&ns, &[]);
    let buckets: Api<S3Bucket> = Api::namespaced(client.clone(), &ns);
    let s3 = support::s3_client().await;

    buckets.create(&PostParams::default(), &bucket("cache-s3alias", json!({}))).await.unwrap();
    support::wait_for(&buckets, "cache-s3alias", TIMEOUT, "Stalled", |b| cond(b, "Stalled").as_deref() == Some("True"))
        .await;
    let stalled = buckets.get("cache-s3alias").await.unwrap().status.unwrap();
    let msg = support::condition_message(&stalled.conditions, "Stalled");
    assert!(msg.contains("must not start with 'sthree-'") && msg.contains("set spec.bucketName"), "{msg}");
    let listed = s3.list_buckets().send().await.unwrap();
    assert!(!listed.buckets().iter().any(|b| b.name().is_some_and(|n| n.starts_with(&ns))), "no bucket may be created");

    // Setting spec.bucketName (allowed once, while unset) unblocks it.
    let cache = format!("{}-cache", ns.trim_start_matches("sthree-"));
    let patch = json!({"spec": {"bucketName": cache, "forceDestroy": true}});
    buckets.patch("cache-s3alias", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    support::wait_for(&buckets, "cache-s3alias", TIMEOUT, "Ready", |b| cond(b, "Ready").as_deref() == Some("True"))
        .await;
    assert!(s3.head_bucket().bucket(&cache).send().await.is_ok());

    // Once the bucket exists, another name (or none) is refused: it would
    // create a second bucket and leave this one behind.
    for other in [json!(format!("{cache}-2")), json!(null)] {
        let patch = json!({"spec": {"bucketName": other}});
        let refused = buckets.patch("cache-s3alias", &PatchParams::default(), &Patch::Merge(&patch)).await;
        let Err(kube::Error::Api(status)) = refused else { panic!("bucketName {other} was accepted: {refused:?}") };
        assert!(status.message.contains("spec.bucketName"), "{}", status.message);
        assert!(status.message.contains("is immutable once the bucket exists"), "{}", status.message);
    }
    buckets.delete("cache-s3alias", &DeleteParams::default()).await.unwrap();
    support::wait_gone(&buckets, "cache-s3alias", TIMEOUT).await;

    // Deleting one still stalled on its name does not wait for a bucket that cannot exist.
    buckets.create(&PostParams::default(), &bucket("stuck.mrap", json!({}))).await.unwrap();
    support::wait_for(&buckets, "stuck.mrap", TIMEOUT, "Stalled", |b| cond(b, "Stalled").as_deref() == Some("True"))
        .await;
    buckets.delete("stuck.mrap", &DeleteParams::default()).await.unwrap();
    support::wait_gone(&buckets, "stuck.mrap", TIMEOUT).await;
}

fn tag(tags: &aws_sdk_s3::operation::get_bucket_tagging::GetBucketTaggingOutput, key: &str) -> Option<String> {
    tags.tag_set().iter().find(|t| t.key() == key).map(|t| t.value().to_owned())
}

/// `team-a/logs` and `team/a-logs` both had the default name `team-a-logs`,
/// so the second S3Bucket took over the first one's bucket.
#[tokio::test]
async fn default_names_that_used_to_collide_give_each_object_its_own_bucket() {
    let client = support::client().await;
    support::install_crds(&client).await;
    let team = support::namespace(&client, "team").await;
    let team_a = format!("{team}-a");
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
    let ns: k8s_openapi::api::core::v1::Namespace =
        serde_json::from_value(json!({"metadata": {"name": team_a}})).unwrap();
    namespaces.create(&PostParams::default(), &ns).await.unwrap();
    let mut names = Vec::new();
    let mut operators = Vec::new();
    for (ns, name) in [(&team_a, "logs"), (&team, "a-logs")] {
        support::aws_network(&client, ns, "aws", &support::moto().endpoint).await;
        operators.push(support::Operator::start(ns, &[]));
        let buckets: Api<S3Bucket> = Api::namespaced(client.clone(), ns);
        buckets.create(&PostParams::default(), &bucket(name, json!({"forceDestroy": true}))).await.unwrap();
        support::wait_for(&buckets, name, TIMEOUT, "Ready", |b| cond(b, "Ready").as_deref() == Some("True")).await;
        let b = buckets.get(name).await.unwrap();
        names.push((b.status.unwrap().bucket_name.unwrap(), b.metadata.uid.unwrap()));
    }
    assert_ne!(names[0].0, names[1].0, "{team_a}/logs and {team}/a-logs must not share a bucket");
    let s3 = support::s3_client().await;
    for (name, uid) in &names {
        assert!(name.starts_with(&format!("{team}-a-logs-")), "{name}");
        let tags = s3.get_bucket_tagging().bucket(name).send().await.unwrap();
        assert_eq!(tag(&tags, "nixops.io/uid").as_deref(), Some(uid.as_str()), "{name} is tagged with its owner");
    }
    for (ns, name) in [(&team_a, "logs"), (&team, "a-logs")] {
        let buckets: Api<S3Bucket> = Api::namespaced(client.clone(), ns);
        buckets.delete(name, &DeleteParams::default()).await.unwrap();
        support::wait_gone(&buckets, name, TIMEOUT).await;
    }
}

/// A bucket of that name already in the account, not created by this
/// S3Bucket, is neither rewritten nor deleted with it.
#[tokio::test]
async fn an_untagged_bucket_with_the_requested_name_is_never_changed_or_deleted() {
    let client = support::client().await;
    support::install_crds(&client).await;
    let ns = support::namespace(&client, "bucket").await;
    support::aws_network(&client, &ns, "aws", &support::moto().endpoint).await;
    let _operator = support::Operator::start(&ns, &[]);
    let buckets: Api<S3Bucket> = Api::namespaced(client.clone(), &ns);
    let s3 = support::s3_client().await;

    let theirs = format!("{ns}-theirs");
    support::create_bucket(&s3, &theirs).await;
    let policy = json!({"Version": "2012-10-17", "Statement": [{"Effect": "Deny", "Principal": "*",
        "Action": "s3:DeleteObject", "Resource": format!("arn:aws:s3:::{theirs}/*")}]});
    s3.put_bucket_policy().bucket(&theirs).policy(policy.to_string()).send().await.unwrap();
    let tagging = aws_sdk_s3::types::Tagging::builder()
        .tag_set(aws_sdk_s3::types::Tag::builder().key("team").value("someone-else").build().unwrap())
        .build()
        .unwrap();
    s3.put_bucket_tagging().bucket(&theirs).tagging(tagging).send().await.unwrap();

    let spec = json!({"bucketName": theirs, "versioning": true, "forceDestroy": true, "tags": {"team": "us"}});
    buckets.create(&PostParams::default(), &bucket("mine", spec)).await.unwrap();
    support::wait_for(&buckets, "mine", TIMEOUT, "Stalled", |b| cond(b, "Stalled").as_deref() == Some("True")).await;
    let msg = support::condition_message(&buckets.get("mine").await.unwrap().status.unwrap().conditions, "Stalled");
    assert!(msg.contains("not tagged nixops.io/uid"), "{msg}");
    assert!(msg.contains("set spec.bucketName") && msg.contains("nixops.io/external-name"), "{msg}");

    let tags = s3.get_bucket_tagging().bucket(&theirs).send().await.unwrap();
    assert_eq!(tags.tag_set().len(), 1, "tags must stay as they were: {:?}", tags.tag_set());
    assert_eq!(tag(&tags, "team").as_deref(), Some("someone-else"));
    let stored: serde_json::Value =
        serde_json::from_str(s3.get_bucket_policy().bucket(&theirs).send().await.unwrap().policy().unwrap()).unwrap();
    assert_eq!(stored, policy, "the policy must stay as it was");
    let versioning = s3.get_bucket_versioning().bucket(&theirs).send().await.unwrap();
    assert!(versioning.status().is_none(), "versioning must stay off");

    buckets.delete("mine", &DeleteParams::default()).await.unwrap();
    support::wait_gone(&buckets, "mine", TIMEOUT).await;
    assert!(s3.head_bucket().bucket(&theirs).send().await.is_ok(), "someone else's bucket must not be deleted");
}
