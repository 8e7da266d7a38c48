//! S3 buckets: create in the region, versioning, policy, public access
//! block, tags; deletion refuses a non-empty bucket unless forced.

use std::collections::BTreeMap;

use aws_sdk_s3::types::{
    BucketLocationConstraint, BucketVersioningStatus, CreateBucketConfiguration, Delete, ObjectIdentifier,
    PublicAccessBlockConfiguration, Tag, Tagging, VersioningConfiguration,
};

use super::{AwsClients, classify, error_code};
use crate::api::s3bucket::PublicAccessBlock;
use crate::provider::ProviderError;

/// The bucket as desired.
pub struct BucketSpec<'a> {
    pub name: &'a str,
    pub versioning: bool,
    /// Already checked to be valid JSON.
    pub policy: Option<&'a serde_json::Value>,
    pub public_access_block: PublicAccessBlock,
    pub tags: BTreeMap<String, String>,
}

/// What the caller reports about a bucket.
#[derive(Debug)]
pub struct BucketState {
    pub created: bool,
    pub changed: Vec<&'static str>,
}

/// Whether the bucket exists and is ours to manage.
pub async fn exists(aws: &AwsClients, name: &str) -> Result<bool, ProviderError> {
    match aws.reading().await.s3.head_bucket().bucket(name).send().await {
        Ok(_) => Ok(true),
        Err(err) => match err.raw_response().map(|r| r.status().as_u16()) {
            Some(404) => Ok(false),
            Some(403) => Err(ProviderError::permanent(
                "BucketNameTaken",
                format!("bucket {name} exists but belongs to another account; choose another spec.bucketName"),
            )),
            _ => Err(classify(err, &format!("HeadBucket {name}"))),
        },
    }
}

/// Creates or converges the bucket. Each step reads first and writes only on a difference.
pub async fn ensure(aws: &AwsClients, spec: &BucketSpec<'_>) -> Result<BucketState, ProviderError> {
    let name = spec.name;
    let mut state = BucketState { created: false, changed: Vec::new() };
    if !exists(aws, name).await? {
        let mut create = aws.writing().await.s3.create_bucket().bucket(name);
        if aws.region != "us-east-1" {
            create = create.create_bucket_configuration(
                CreateBucketConfiguration::builder()
                    .location_constraint(BucketLocationConstraint::from(aws.region.as_str()))
                    .build(),
            );
        }
        match create.send().await {
            Ok(_) => state.created = true,
            Err(err) if error_code(&err) == Some("BucketAlreadyOwnedByYou") => {}
            Err(err) if error_code(&err) == Some("BucketAlreadyExists") => {
                return Err(ProviderError::permanent(
                    "BucketNameTaken",
                    format!("bucket name {name} is taken in S3 (names are global); choose another spec.bucketName"),
                ));
            }
            Err(err) => return Err(classify(err, &format!("CreateBucket {name}"))),
        }
    }

    // Versioning: Enabled, or Suspended once it was ever enabled.
    let current = aws
        .reading()
        .await
        .s3
        .get_bucket_versioning()
        .bucket(name)
        .send()
        .await
        .map_err(|e| classify(e, "GetBucketVersioning"))?;
    let enabled = current.status() == Some(&BucketVersioningStatus::Enabled);
    if enabled != spec.versioning && (spec.versioning || current.status().is_some()) {
        let status = if spec.versioning { BucketVersioningStatus::Enabled } else { BucketVersioningStatus::Suspended };
        aws.writing()
            .await
            .s3
            .put_bucket_versioning()
            .bucket(name)
            .versioning_configuration(VersioningConfiguration::builder().status(status).build())
            .send()
            .await
            .map_err(|e| classify(e, "PutBucketVersioning"))?;
        state.changed.push("versioning");
    }

    // Public access block.
    let pab = &spec.public_access_block;
    let desired = PublicAccessBlockConfiguration::builder()
        .block_public_acls(pab.block_public_acls)
        .ignore_public_acls(pab.ignore_public_acls)
        .block_public_policy(pab.block_public_policy)
        .restrict_public_buckets(pab.restrict_public_buckets)
        .build();
    let current = match aws.reading().await.s3.get_public_access_block().bucket(name).send().await {
        Ok(out) => out.public_access_block_configuration().cloned(),
        Err(err) if error_code(&err) == Some("NoSuchPublicAccessBlockConfiguration") => None,
        Err(err) => return Err(classify(err, "GetPublicAccessBlock")),
    };
    if current.as_ref() != Some(&desired) {
        aws.writing()
            .await
            .s3
            .put_public_access_block()
            .bucket(name)
            .public_access_block_configuration(desired)
            .send()
            .await
            .map_err(|e| classify(e, "PutPublicAccessBlock"))?;
        state.changed.push("publicAccessBlock");
    }

    // Policy, compared as JSON values.
    let current = match aws.reading().await.s3.get_bucket_policy().bucket(name).send().await {
        Ok(out) => out.policy().and_then(|p| serde_json::from_str::<serde_json::Value>(p).ok()),
        Err(err) if error_code(&err) == Some("NoSuchBucketPolicy") => None,
        Err(err) => return Err(classify(err, "GetBucketPolicy")),
    };
    match (spec.policy, current) {
        (Some(want), Some(have)) if *want == have => {}
        (Some(want), _) => {
            aws.writing()
                .await
                .s3
                .put_bucket_policy()
                .bucket(name)
                .policy(want.to_string())
                .send()
                .await
                .map_err(|e| classify(e, "PutBucketPolicy (spec.policy)"))?;
            state.changed.push("policy");
        }
        (None, Some(_)) => {
            aws.writing()
                .await
                .s3
                .delete_bucket_policy()
                .bucket(name)
                .send()
                .await
                .map_err(|e| classify(e, "DeleteBucketPolicy"))?;
            state.changed.push("policy");
        }
        (None, None) => {}
    }

    // Tags.
    let current: BTreeMap<String, String> = match aws.reading().await.s3.get_bucket_tagging().bucket(name).send().await
    {
        Ok(out) => out.tag_set().iter().map(|t| (t.key().to_owned(), t.value().to_owned())).collect(),
        Err(err) if error_code(&err) == Some("NoSuchTagSet") => BTreeMap::new(),
        Err(err) => return Err(classify(err, "GetBucketTagging")),
    };
    if current != spec.tags {
        let tags: Result<Vec<Tag>, _> = spec.tags.iter().map(|(k, v)| Tag::builder().key(k).value(v).build()).collect();
        let tagging = Tagging::builder()
            .set_tag_set(Some(tags.map_err(|e| ProviderError::permanent("InvalidTag", format!("spec.tags: {e}")))?))
            .build()
            .map_err(|e| ProviderError::permanent("InvalidTag", format!("spec.tags: {e}")))?;
        aws.writing()
            .await
            .s3
            .put_bucket_tagging()
            .bucket(name)
            .tagging(tagging)
            .send()
            .await
            .map_err(|e| classify(e, "PutBucketTagging"))?;
        state.changed.push("tags");
    }
    Ok(state)
}

/// Number of object versions and delete markers in the bucket (up to one page).
pub async fn object_count(aws: &AwsClients, name: &str) -> Result<usize, ProviderError> {
    let out = aws
        .reading()
        .await
        .s3
        .list_object_versions()
        .bucket(name)
        .send()
        .await
        .map_err(|e| classify(e, "ListObjectVersions"))?;
    Ok(out.versions().len() + out.delete_markers().len())
}

/// Deletes every object version, then the bucket. A bucket already gone is success.
pub async fn delete(aws: &AwsClients, name: &str, force: bool) -> Result<(), ProviderError> {
    if !exists(aws, name).await? {
        return Ok(());
    }
    if force {
        loop {
            let out = aws
                .reading()
                .await
                .s3
                .list_object_versions()
                .bucket(name)
                .send()
                .await
                .map_err(|e| classify(e, "ListObjectVersions"))?;
            let mut ids = Vec::new();
            for v in out.versions() {
                ids.push((v.key().unwrap_or_default().to_owned(), v.version_id().map(str::to_owned)));
            }
            for m in out.delete_markers() {
                ids.push((m.key().unwrap_or_default().to_owned(), m.version_id().map(str::to_owned)));
            }
            if ids.is_empty() {
                break;
            }
            let objects: Result<Vec<ObjectIdentifier>, _> = ids
                .into_iter()
                .map(|(key, version)| ObjectIdentifier::builder().key(key).set_version_id(version).build())
                .collect();
            let objects = objects.map_err(|e| ProviderError::Transient(format!("DeleteObjects: {e}")))?;
            let delete = Delete::builder()
                .set_objects(Some(objects))
                .quiet(true)
                .build()
                .map_err(|e| ProviderError::Transient(format!("DeleteObjects: {e}")))?;
            aws.writing()
                .await
                .s3
                .delete_objects()
                .bucket(name)
                .delete(delete)
                .send()
                .await
                .map_err(|e| classify(e, "DeleteObjects"))?;
        }
    }
    match aws.writing().await.s3.delete_bucket().bucket(name).send().await {
        Ok(_) => Ok(()),
        Err(err) if error_code(&err) == Some("NoSuchBucket") => Ok(()),
        Err(err) => Err(classify(err, &format!("DeleteBucket {name}"))),
    }
}
