//! S3 buckets: create in the region, versioning, policy, public access
//! block, tags; deletion refuses a non-empty bucket unless forced.

use std::collections::BTreeMap;

use aws_sdk_s3::types::{
    BucketLocationConstraint, BucketVersioningStatus, CreateBucketConfiguration, Delete, ObjectIdentifier,
    PublicAccessBlockConfiguration, Tag, Tagging, VersioningConfiguration,
};

use super::AwsClients;
use crate::provider::{BucketHolder, BucketSpec, ProviderError};

/// Whether the bucket exists in this account.
async fn exists(aws: &AwsClients, name: &str) -> Result<bool, ProviderError> {
    match aws.call("HeadBucket", name, aws.reading().await.s3.head_bucket().bucket(name).send()).await {
        Ok(_) => Ok(true),
        Err(err) => match err.http_status() {
            Some(404) => Ok(false),
            Some(403) => Err(ProviderError::permanent(
                "BucketNameTaken",
                format!("bucket {name} exists but belongs to another account; choose another spec.bucketName"),
            )),
            _ => Err(err.into()),
        },
    }
}

/// Who holds the bucket `name`, with its owner tag.
pub async fn holder(aws: &AwsClients, name: &str) -> Result<BucketHolder, ProviderError> {
    match exists(aws, name).await {
        Ok(true) => {}
        Ok(false) => return Ok(BucketHolder::Nobody),
        Err(ProviderError::Permanent { reason: "BucketNameTaken", .. }) => return Ok(BucketHolder::OtherAccount),
        Err(err) => return Err(err),
    }
    let uid = current_tags(aws, name).await?.remove(super::tags::UID);
    Ok(BucketHolder::ThisAccount { uid })
}

async fn current_tags(aws: &AwsClients, name: &str) -> Result<BTreeMap<String, String>, ProviderError> {
    match aws.call("GetBucketTagging", name, aws.reading().await.s3.get_bucket_tagging().bucket(name).send()).await {
        Ok(out) => Ok(out.tag_set().iter().map(|t| (t.key().to_owned(), t.value().to_owned())).collect()),
        Err(err) if err.is("NoSuchTagSet") => Ok(BTreeMap::new()),
        Err(err) => Err(err.into()),
    }
}

async fn put_tags(aws: &AwsClients, name: &str, tags: &BTreeMap<String, String>) -> Result<(), ProviderError> {
    let tags: Result<Vec<Tag>, _> = tags.iter().map(|(k, v)| Tag::builder().key(k).value(v).build()).collect();
    let tagging = Tagging::builder()
        .set_tag_set(Some(tags.map_err(|e| ProviderError::permanent("InvalidTag", format!("spec.tags: {e}")))?))
        .build()
        .map_err(|e| ProviderError::permanent("InvalidTag", format!("spec.tags: {e}")))?;
    aws.call(
        "PutBucketTagging",
        name,
        aws.writing().await.s3.put_bucket_tagging().bucket(name).tagging(tagging).send(),
    )
    .await?;
    Ok(())
}

/// Creates the bucket and tags it with its owner at once, so a lookup by
/// name and UID tag finds it again. Called only when no bucket has the name.
pub async fn create(aws: &AwsClients, spec: &BucketSpec<'_>) -> Result<(), ProviderError> {
    let name = spec.name;
    let mut create = aws.writing().await.s3.create_bucket().bucket(name);
    if aws.region != "us-east-1" {
        create = create.create_bucket_configuration(
            CreateBucketConfiguration::builder()
                .location_constraint(BucketLocationConstraint::from(aws.region.as_str()))
                .build(),
        );
    }
    match aws.call("CreateBucket", name, create.send()).await {
        Ok(_) => {}
        // Made by someone else since the lookup: not ours to tag.
        Err(err) if err.is("BucketAlreadyOwnedByYou") => {
            return Err(ProviderError::permanent(
                "BucketNotOwned",
                format!("bucket {name} was created in this account by someone else meanwhile; it is left as it is"),
            ));
        }
        Err(err) if err.is("BucketAlreadyExists") => {
            return Err(ProviderError::permanent(
                "BucketNameTaken",
                format!("bucket name {name} is taken in S3 (names are global); choose another spec.bucketName"),
            ));
        }
        Err(err) => return Err(err.into()),
    }
    put_tags(aws, name, &spec.tags).await
}

/// Converges an existing bucket that is this owner's (tagged with its UID,
/// or being adopted) to `spec`. Each step reads first and writes only on a
/// difference; returns what it changed.
pub async fn converge(aws: &AwsClients, spec: &BucketSpec<'_>) -> Result<Vec<&'static str>, ProviderError> {
    let name = spec.name;
    let mut changed = Vec::new();
    // Versioning: Enabled, or Suspended once it was ever enabled.
    let current = aws
        .call("GetBucketVersioning", name, aws.reading().await.s3.get_bucket_versioning().bucket(name).send())
        .await?;
    let enabled = current.status() == Some(&BucketVersioningStatus::Enabled);
    if enabled != spec.versioning && (spec.versioning || current.status().is_some()) {
        let status = if spec.versioning { BucketVersioningStatus::Enabled } else { BucketVersioningStatus::Suspended };
        aws.call(
            "PutBucketVersioning",
            name,
            aws.writing()
                .await
                .s3
                .put_bucket_versioning()
                .bucket(name)
                .versioning_configuration(VersioningConfiguration::builder().status(status).build())
                .send(),
        )
        .await?;
        changed.push("versioning");
    }

    // Public access block.
    let pab = &spec.public_access_block;
    let desired = PublicAccessBlockConfiguration::builder()
        .block_public_acls(pab.block_public_acls)
        .ignore_public_acls(pab.ignore_public_acls)
        .block_public_policy(pab.block_public_policy)
        .restrict_public_buckets(pab.restrict_public_buckets)
        .build();
    let request = aws.reading().await.s3.get_public_access_block().bucket(name).send();
    let current = match aws.call("GetPublicAccessBlock", name, request).await {
        Ok(out) => out.public_access_block_configuration().cloned(),
        Err(err) if err.is("NoSuchPublicAccessBlockConfiguration") => None,
        Err(err) => return Err(err.into()),
    };
    if current.as_ref() != Some(&desired) {
        aws.call(
            "PutPublicAccessBlock",
            name,
            aws.writing()
                .await
                .s3
                .put_public_access_block()
                .bucket(name)
                .public_access_block_configuration(desired)
                .send(),
        )
        .await?;
        changed.push("publicAccessBlock");
    }

    // Policy, compared as JSON values.
    let current =
        match aws.call("GetBucketPolicy", name, aws.reading().await.s3.get_bucket_policy().bucket(name).send()).await {
            Ok(out) => out.policy().and_then(|p| serde_json::from_str::<serde_json::Value>(p).ok()),
            Err(err) if err.is("NoSuchBucketPolicy") => None,
            Err(err) => return Err(err.into()),
        };
    match (spec.policy, current) {
        (Some(want), Some(have)) if *want == have => {}
        (Some(want), _) => {
            aws.call(
                "PutBucketPolicy",
                format!("{name} (spec.policy)"),
                aws.writing().await.s3.put_bucket_policy().bucket(name).policy(want.to_string()).send(),
            )
            .await?;
            changed.push("policy");
        }
        (None, Some(_)) => {
            aws.call("DeleteBucketPolicy", name, aws.writing().await.s3.delete_bucket_policy().bucket(name).send())
                .await?;
            changed.push("policy");
        }
        (None, None) => {}
    }

    // Tags.
    if current_tags(aws, name).await? != spec.tags {
        put_tags(aws, name, &spec.tags).await?;
        changed.push("tags");
    }
    Ok(changed)
}

/// Number of object versions and delete markers in the bucket (up to one page).
pub async fn object_count(aws: &AwsClients, name: &str) -> Result<usize, ProviderError> {
    let out =
        aws.call("ListObjectVersions", name, aws.reading().await.s3.list_object_versions().bucket(name).send()).await?;
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
                .call("ListObjectVersions", name, aws.reading().await.s3.list_object_versions().bucket(name).send())
                .await?;
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
            aws.call("DeleteObjects", name, aws.writing().await.s3.delete_objects().bucket(name).delete(delete).send())
                .await?;
        }
    }
    match aws.call("DeleteBucket", name, aws.writing().await.s3.delete_bucket().bucket(name).send()).await {
        Ok(_) => Ok(()),
        Err(err) if err.is("NoSuchBucket") => Ok(()),
        Err(err) => Err(err.into()),
    }
}
