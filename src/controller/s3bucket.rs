//! S3Bucket controller: a bucket in the Network's account and region, kept
//! as the spec says; a non-empty bucket is only deleted with forceDestroy.

use std::sync::Arc;
use std::time::Duration;

use kube::api::Api;
use kube::runtime::events::EventType;
use kube::{Resource, ResourceExt};

use super::status::Conditions;
use super::{Cleanup, Context, Error, Reconciler, Result, object_status, record_external_name};
use crate::api::network::ResourcePhase;
use crate::api::s3bucket::{PublicAccessBlock, S3BucketStatus, bucket_name_violation};
use crate::api::{DeletionPolicy, EXTERNAL_NAME_ANNOTATION, ManagementPolicy, S3Bucket};
use crate::provider::aws::owner_tags;
use crate::provider::{BucketSpec, CloudTarget, Owner};

object_status!(S3BucketStatus, failed = ResourcePhase::Failed, deleting = ResourcePhase::Deleting);

impl S3Bucket {
    /// The bucket's name in S3: spec.bucketName, else `<namespace>-<name>`.
    pub fn bucket_name(&self) -> String {
        self.spec
            .bucket_name
            .clone()
            .unwrap_or_else(|| format!("{}-{}", self.namespace().unwrap_or_default(), self.name_any()))
    }
}

/// The bucket's name, or a stall saying why S3 would refuse it and what to
/// change. The schema checks spec.bucketName, but the default name joins a
/// namespace and a name the schema cannot see together, and can be too long
/// or use a prefix or suffix AWS reserves (a namespace `sthree`, a name
/// ending in `-s3alias`).
fn valid_bucket_name(bucket: &S3Bucket) -> Result<String> {
    let name = bucket.bucket_name();
    let Some(violation) = bucket_name_violation(&name) else { return Ok(name) };
    let message = if bucket.spec.bucket_name.is_some() {
        // Only when the installed CRD predates the rule.
        format!("spec.bucketName {name} {violation}; delete this S3Bucket and create it with another bucketName")
    } else {
        format!(
            "the default bucket name {name} (<namespace>-<name>, as spec.bucketName is not set) {violation}; \
             set spec.bucketName to a name S3 accepts"
        )
    };
    Err(Error::stalled("InvalidBucketName", message))
}

/// A bucket is never renamed: once one exists (status.bucketName), another
/// name would create a second bucket and leave the first behind. The schema
/// refuses such a change; this catches a CRD installed without that rule,
/// and a name set while the first bucket was still being created.
fn check_not_renamed(recorded: Option<&str>, name: &str) -> Result<()> {
    match recorded {
        Some(recorded) if recorded != name => Err(Error::stalled(
            "BucketNameChanged",
            format!(
                "bucket {recorded} exists for this S3Bucket (status.bucketName), but the name is now {name}; \
                 a bucket cannot be renamed: set spec.bucketName to {recorded}, or delete this S3Bucket and create a new one"
            ),
        )),
        _ => Ok(()),
    }
}

/// Parses spec.policy, or explains where it is broken.
fn parse_policy(policy: Option<&str>) -> Result<Option<serde_json::Value>> {
    let Some(text) = policy else { return Ok(None) };
    let value: serde_json::Value = serde_json::from_str(text).map_err(|e| {
        Error::stalled(
            "InvalidPolicy",
            format!("spec.policy is not valid JSON ({e}); fix the document (it is sent to S3 as a bucket policy)"),
        )
    })?;
    if !value.is_object() {
        return Err(Error::stalled("InvalidPolicy", "spec.policy must be a JSON object with Version and Statement"));
    }
    Ok(Some(value))
}

/// The bucket's identity and its Network (the account).
async fn target(ctx: &Context, bucket: &S3Bucket) -> Result<CloudTarget> {
    let ns = bucket.namespace().unwrap_or_default();
    let name = &bucket.spec.network_ref.name;
    let network = super::resolve_network(ctx, &ns, name, "spec.networkRef.name").await?;
    let owner = Owner::of(bucket);
    Ok(CloudTarget { owner, network })
}

impl Reconciler for S3Bucket {
    type Status = S3BucketStatus;
    const KIND: &'static str = "S3Bucket";

    fn status(&self) -> Option<&S3BucketStatus> {
        self.status.as_ref()
    }

    async fn apply(self: Arc<Self>, ctx: Arc<Context>, status: &mut S3BucketStatus) -> Result<Option<Duration>> {
        let name = valid_bucket_name(&self)?;
        check_not_renamed(status.bucket_name.as_deref(), &name)?;
        let policy = parse_policy(self.spec.policy.as_deref())?;
        let target = target(&ctx, &self).await?;
        let provider = ctx.providers.bucket()?;
        let owner = Owner::of(&*self);
        let mut tags = owner_tags(&owner, "S3Bucket");
        tags.extend(self.spec.tags.clone());
        let spec = BucketSpec {
            name: &name,
            versioning: self.spec.versioning,
            policy: policy.as_ref(),
            public_access_block: self.spec.public_access_block.clone().unwrap_or(PublicAccessBlock {
                block_public_acls: true,
                ignore_public_acls: true,
                block_public_policy: true,
                restrict_public_buckets: true,
            }),
            tags,
        };
        if self.spec.management_policy == ManagementPolicy::Observe {
            if !provider.exists(&target, &name).await? {
                return Err(Error::stalled(
                    "BucketNotFound",
                    format!("bucket {name} does not exist; managementPolicy Observe only reads an existing bucket"),
                ));
            }
            status.bucket_name = Some(name.clone());
            let (region, arn) = provider.location(&target, &name);
            status.region = Some(region);
            status.arn = Some(arn);
            status.phase = Some(ResourcePhase::Ready);
            Conditions::new(&mut status.conditions, self.meta().generation).ready(
                "Observing",
                format!("observing bucket {name}; managementPolicy Observe never changes or deletes it"),
            );
            return Ok(None);
        }
        let result = provider.ensure(&target, &spec).await;
        ctx.metrics.provider_call(provider.name(), "ensure", result.is_ok());
        let state = result?;
        if self.annotations().get(EXTERNAL_NAME_ANNOTATION) != Some(&name) {
            record_external_name(&Api::<S3Bucket>::namespaced(ctx.client.clone(), &owner.namespace), &self, &name)
                .await?;
        }
        if state.created {
            ctx.event(
                &*self,
                EventType::Normal,
                "Created",
                format!("created bucket {name} in {}", provider.location(&target, &name).0),
            )
            .await;
        } else if !state.changed.is_empty() {
            ctx.event(
                &*self,
                EventType::Normal,
                "Updated",
                format!("updated {} of bucket {name}", state.changed.join(", ")),
            )
            .await;
        }

        status.bucket_name = Some(name.clone());
        let (region, arn) = provider.location(&target, &name);
        status.region = Some(region.clone());
        status.arn = Some(arn);
        status.phase = Some(ResourcePhase::Ready);
        Conditions::new(&mut status.conditions, self.meta().generation)
            .ready("Ready", format!("bucket {name} in {region}"));
        Ok(None)
    }

    async fn cleanup(self: Arc<Self>, ctx: Arc<Context>) -> Result<Cleanup> {
        if self.spec.deletion_policy == DeletionPolicy::Orphan
            || self.spec.management_policy == ManagementPolicy::Observe
        {
            return Ok(Cleanup::Done);
        }
        // The bucket that was created, even if the spec names another since.
        let recorded = self.status.as_ref().and_then(|s| s.bucket_name.clone());
        let name = recorded.unwrap_or_else(|| self.bucket_name());
        if bucket_name_violation(&name).is_some() && self.annotations().get(EXTERNAL_NAME_ANNOTATION) != Some(&name) {
            // S3 refuses the name, so no bucket was ever created under it.
            return Ok(Cleanup::Done);
        }
        let provider = ctx.providers.bucket()?;
        let target = match target(&ctx, &self).await {
            Ok(target) => target,
            Err(Error::Waiting { .. }) if self.annotations().get(EXTERNAL_NAME_ANNOTATION).is_none() => {
                return Ok(Cleanup::Done);
            }
            Err(err) => return Err(err),
        };
        if !provider.exists(&target, &name).await? {
            return Ok(Cleanup::Done);
        }
        let objects = provider.object_count(&target, &name).await?;
        if objects > 0 && !self.spec.force_destroy {
            return Ok(Cleanup::Stalled {
                reason: "BucketNotEmpty",
                message: format!(
                    "bucket {name} still holds {objects} object version(s); empty it, set spec.forceDestroy: true to delete them \
                     with the bucket, or set spec.deletionPolicy: Orphan to keep it"
                ),
            });
        }
        let deleted = provider.delete(&target, &name, self.spec.force_destroy).await;
        ctx.metrics.provider_call(provider.name(), "delete", deleted.is_ok());
        deleted?;
        Ok(Cleanup::Done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bucket(namespace: &str, name: &str, bucket_name: Option<&str>) -> S3Bucket {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "nixops.io/v1alpha1", "kind": "S3Bucket",
            "metadata": {"namespace": namespace, "name": name},
            "spec": {"networkRef": {"name": "aws"}, "bucketName": bucket_name},
        }))
        .unwrap()
    }

    fn stall(bucket: &S3Bucket) -> String {
        let Err(Error::Stalled { reason, message }) = valid_bucket_name(bucket) else { panic!("must stall") };
        assert_eq!(reason, "InvalidBucketName");
        message
    }

    #[test]
    fn a_default_bucket_name_s3_refuses_stalls_asking_for_spec_bucket_name() {
        assert_eq!(valid_bucket_name(&bucket("team-a", "cache", None)).unwrap(), "team-a-cache");
        for (namespace, name, rule) in [
            ("sthree", "cache", "must not start with 'sthree-'"),
            ("xn--fleet", "cache", "must not start with 'xn--'"),
            ("amzn-s3", "demo-cache", "must not start with 'amzn-s3-demo-'"),
            ("team-a", "cache-s3alias", "must not end with '-s3alias'"),
            ("team-a", "cache.mrap", "must not end with '.mrap'"),
            ("team-a", "cache--table-s3", "must not end with '--table-s3'"),
            ("a-namespace-of-thirty-characters", "and-a-name-of-thirty-two-characters", "3 to 63 characters"),
        ] {
            let message = stall(&bucket(namespace, name, None));
            assert!(message.contains(rule), "{namespace}/{name}: {message}");
            assert!(message.contains("set spec.bucketName"), "{message}");
        }
        // spec.bucketName avoids the default and is taken as it is.
        assert_eq!(valid_bucket_name(&bucket("sthree", "cache", Some("nix-cache"))).unwrap(), "nix-cache");
    }

    #[test]
    fn a_bucket_that_exists_is_never_renamed() {
        assert!(check_not_renamed(None, "team-a-cache").is_ok(), "no bucket yet: any name");
        assert!(check_not_renamed(Some("team-a-cache"), "team-a-cache").is_ok());
        let Err(Error::Stalled { reason, message }) = check_not_renamed(Some("team-a-cache"), "nix-cache") else {
            panic!("a rename must stall")
        };
        assert_eq!(reason, "BucketNameChanged");
        assert!(message.contains("set spec.bucketName to team-a-cache"), "{message}");
    }

    #[test]
    fn bad_policy_json_names_the_field() {
        let err = parse_policy(Some("{\"Version\": \"2012-10-17\",")).unwrap_err();
        let Error::Stalled { reason, message } = err else { panic!("must stall") };
        assert_eq!(reason, "InvalidPolicy");
        assert!(message.starts_with("spec.policy is not valid JSON"), "{message}");
        assert!(parse_policy(Some("[]")).is_err());
        assert!(parse_policy(None).unwrap().is_none());
        assert!(parse_policy(Some(r#"{"Version":"2012-10-17","Statement":[]}"#)).unwrap().is_some());
    }
}
