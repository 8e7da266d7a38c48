//! S3Bucket controller: a bucket in the Network's account and region, kept
//! as the spec says; a non-empty bucket is only deleted with forceDestroy.

use std::sync::Arc;
use std::time::Duration;

use kube::api::Api;
use kube::runtime::events::EventType;
use kube::{Resource, ResourceExt};

use super::status::Conditions;
use super::{Cleanup, Context, Error, Reconciler, Result, create_once, object_status, record_external_name};
use crate::api::network::ResourcePhase;
use crate::api::s3bucket::{PublicAccessBlock, S3BucketStatus, bucket_name_violation};
use crate::api::{DeletionPolicy, EXTERNAL_NAME_ANNOTATION, ManagementPolicy, S3Bucket};
use crate::provider::{BucketHolder, BucketSpec, CloudTarget, Owner};

object_status!(S3BucketStatus, failed = ResourcePhase::Failed, deleting = ResourcePhase::Deleting);

/// Characters of `<namespace>-<name>` kept in a default bucket name: 63
/// less a `-` and the 8 hex digits of the hash.
const DEFAULT_NAME_PREFIX: usize = 54;

/// `<namespace>-<name>-<hash>`, the hash of `namespace/name`: joining the two
/// with `-` alone gives `team-a/logs` and `team/a-logs` one name. Cut to S3's
/// 63 characters before the hash, which keeps it unique.
fn default_bucket_name(namespace: &str, name: &str) -> String {
    // FNV-1a: stable across Rust versions, unlike `DefaultHasher`, so the name
    // an object derives never changes under it.
    let hash = format!("{namespace}/{name}")
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325_u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3));
    let mut prefix = format!("{namespace}-{name}");
    prefix.truncate(DEFAULT_NAME_PREFIX);
    format!("{}-{:08x}", prefix.trim_end_matches(['-', '.']), hash as u32)
}

impl S3Bucket {
    /// The bucket this object stands for: spec.bucketName; else the one named
    /// by the external-name annotation (adopted, observed, or created
    /// earlier); else the one in status.bucketName; else the default name.
    /// An object keeps the bucket it has even if the default changes.
    pub fn bucket_name(&self) -> String {
        self.spec
            .bucket_name
            .clone()
            .or_else(|| self.annotations().get(EXTERNAL_NAME_ANNOTATION).cloned())
            .or_else(|| self.status.as_ref().and_then(|s| s.bucket_name.clone()))
            .unwrap_or_else(|| default_bucket_name(&self.namespace().unwrap_or_default(), &self.name_any()))
    }
}

/// The bucket's name, or a stall saying why S3 would refuse it and what to
/// change. The schema checks spec.bucketName, but the default name joins a
/// namespace and a name the schema cannot see together, and can start with
/// a prefix AWS reserves (a namespace `sthree`). spec.bucketName and the
/// external-name annotation must not name two buckets.
fn valid_bucket_name(bucket: &S3Bucket) -> Result<String> {
    let annotated = bucket.annotations().get(EXTERNAL_NAME_ANNOTATION);
    if let (Some(spec), Some(annotated)) = (&bucket.spec.bucket_name, annotated)
        && spec != annotated
    {
        return Err(Error::stalled(
            "BucketNameConflict",
            format!(
                "spec.bucketName {spec} and the {EXTERNAL_NAME_ANNOTATION} annotation {annotated} name different \
                 buckets; remove the annotation, or set spec.bucketName to {annotated}"
            ),
        ));
    }
    let name = bucket.bucket_name();
    let Some(violation) = bucket_name_violation(&name) else { return Ok(name) };
    let message = if bucket.spec.bucket_name.is_some() {
        // Only when the installed CRD predates the rule.
        format!("spec.bucketName {name} {violation}; delete this S3Bucket and create it with another bucketName")
    } else if annotated.is_some() {
        format!("the {EXTERNAL_NAME_ANNOTATION} annotation {name} {violation}; fix the annotation")
    } else {
        format!(
            "the default bucket name {name} (<namespace>-<name>-<hash>, as spec.bucketName is not set) {violation}; \
             set spec.bucketName to a name S3 accepts"
        )
    };
    Err(Error::stalled("InvalidBucketName", message))
}

/// What apply does with the bucket of that name.
#[derive(Debug, PartialEq, Eq)]
enum BucketAction {
    /// No bucket has the name: create it, tagged with the object's UID.
    Create,
    /// The bucket is tagged with the object's UID: converge it.
    Manage,
    /// The external-name annotation names it: tag it with the UID and converge it.
    Adopt,
    /// managementPolicy Observe: only read it.
    Observe,
}

/// Decides from who holds the name. A bucket in this account not tagged
/// with this object's UID is someone else's unless the external-name
/// annotation adopts it: it is never changed or deleted otherwise.
/// `interrupted`: this S3Bucket's create may have made the bucket and nobody
/// saw its answer (see [`Context::create_unanswered`]).
fn decide(bucket: &S3Bucket, name: &str, holder: &BucketHolder, interrupted: bool) -> Result<BucketAction> {
    let uid = bucket.meta().uid.as_deref().unwrap_or_default();
    let observe = bucket.spec.management_policy == ManagementPolicy::Observe;
    let adopting = bucket.annotations().get(EXTERNAL_NAME_ANNOTATION).is_some_and(|a| a == name);
    match holder {
        BucketHolder::OtherAccount => Err(Error::stalled(
            "BucketNameTaken",
            format!(
                "bucket {name} belongs to another AWS account (bucket names are global); set spec.bucketName to \
                 another name{}",
                if adopting { ", or fix the nixops.io/external-name annotation" } else { "" }
            ),
        )),
        BucketHolder::Nobody if observe => Err(Error::stalled(
            "BucketNotFound",
            format!(
                "bucket {name} does not exist; managementPolicy Observe only reads an existing bucket: set the \
                 {EXTERNAL_NAME_ANNOTATION} annotation to its name"
            ),
        )),
        BucketHolder::Nobody => Ok(BucketAction::Create),
        BucketHolder::ThisAccount { .. } if observe => Ok(BucketAction::Observe),
        BucketHolder::ThisAccount { uid: Some(tagged) } if tagged == uid => Ok(BucketAction::Manage),
        // A create interrupted between CreateBucket and PutBucketTagging (S3
        // takes no tags with the create) leaves the bucket untagged. One
        // whose create was answered (BucketAlreadyOwnedByYou: someone else's)
        // is not taken.
        BucketHolder::ThisAccount { uid: None } if interrupted => Ok(BucketAction::Manage),
        BucketHolder::ThisAccount { .. } if adopting => Ok(BucketAction::Adopt),
        BucketHolder::ThisAccount { .. } => Err(Error::stalled(
            "BucketNotOwned",
            format!(
                "bucket {name} already exists in this account and is not tagged nixops.io/uid={uid}, so this \
                 S3Bucket did not create it and leaves it as it is. For a bucket of its own, set spec.bucketName to \
                 another name; to take this one over (its settings, policy and tags are then rewritten to the spec, \
                 and it is deleted with this S3Bucket), set the {EXTERNAL_NAME_ANNOTATION} annotation to {name}; \
                 to only read it, also set spec.managementPolicy: Observe"
            ),
        )),
    }
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
        let mut tags = owner.tags("S3Bucket");
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
        let interrupted = ctx.create_unanswered(&*self);
        let action = decide(&self, &name, &provider.holder(&target, &name).await?, interrupted)?;
        if action == BucketAction::Observe {
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
        let api = Api::<S3Bucket>::namespaced(ctx.client.clone(), &owner.namespace);
        let mut recorded = self.annotations().get(EXTERNAL_NAME_ANNOTATION) == Some(&name);
        match action {
            BucketAction::Create => {
                // Records the name as the external name once created.
                create_once(
                    &api,
                    &*self,
                    &ctx,
                    "bucket",
                    crate::provider::Lookup::Lagging,
                    |_: &()| Some(name.clone()),
                    || provider.create(&target, &spec),
                )
                .await?;
                recorded = true;
                let region = provider.location(&target, &name).0;
                ctx.event(&*self, EventType::Normal, "Created", format!("created bucket {name} in {region}")).await;
            }
            BucketAction::Adopt => {
                let message = format!("adopting bucket {name} (named by the {EXTERNAL_NAME_ANNOTATION} annotation)");
                ctx.event(&*self, EventType::Normal, "Adopted", message).await;
            }
            BucketAction::Manage | BucketAction::Observe => {}
        }
        let changed = provider.converge(&target, &spec).await?;
        if !recorded {
            record_external_name(&api, &self, &name).await?;
        }
        if !changed.is_empty() && action != BucketAction::Create {
            ctx.event(&*self, EventType::Normal, "Updated", format!("updated {} of bucket {name}", changed.join(", ")))
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
        // The bucket that was created or adopted, even if the spec names another since.
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
        let uid = self.meta().uid.clone();
        match provider.holder(&target, &name).await? {
            BucketHolder::ThisAccount { uid: tagged } if tagged == uid => {}
            BucketHolder::ThisAccount { .. } => {
                // Never created nor adopted by this object: someone else's.
                let message =
                    format!("left bucket {name} as it is: it is not tagged with this S3Bucket's nixops.io/uid");
                ctx.event(&*self, EventType::Normal, "BucketKept", message).await;
                return Ok(Cleanup::Done);
            }
            BucketHolder::Nobody | BucketHolder::OtherAccount => return Ok(Cleanup::Done),
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
        provider.delete(&target, &name, self.spec.force_destroy).await?;
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
    fn default_bucket_names_do_not_collide_and_fit_s3s_rules() {
        let a = valid_bucket_name(&bucket("team-a", "logs", None)).unwrap();
        let b = valid_bucket_name(&bucket("team", "a-logs", None)).unwrap();
        assert!(a.starts_with("team-a-logs-") && b.starts_with("team-a-logs-"), "{a} {b}");
        assert_ne!(a, b, "team-a/logs and team/a-logs must get buckets of their own");
        assert_eq!(a, default_bucket_name("team-a", "logs"), "the name must not change between calls");
        // Names S3 would refuse as <namespace>-<name> are cut or end in the hash.
        for (namespace, name) in [
            ("team-a", "cache-s3alias"),
            ("team-a", "cache.mrap"),
            ("team-a", "cache--table-s3"),
            ("a-namespace-of-thirty-characters", "and-a-name-of-thirty-two-characters"),
            ("team-a", "a-name-whose-54th-character-is-a-period-after-the-prefix.x"),
        ] {
            let name = valid_bucket_name(&bucket(namespace, name, None)).unwrap();
            assert!(name.len() <= 63, "{name}");
            assert_eq!(bucket_name_violation(&name), None, "{name}");
        }
    }

    #[test]
    fn a_default_bucket_name_s3_refuses_stalls_asking_for_spec_bucket_name() {
        for (namespace, name, rule) in [
            ("sthree", "cache", "must not start with 'sthree-'"),
            ("xn--fleet", "cache", "must not start with 'xn--'"),
            ("amzn-s3", "demo-cache", "must not start with 'amzn-s3-demo-'"),
        ] {
            let message = stall(&bucket(namespace, name, None));
            assert!(message.contains(rule), "{namespace}/{name}: {message}");
            assert!(message.contains("set spec.bucketName"), "{message}");
        }
        // spec.bucketName avoids the default and is taken as it is.
        assert_eq!(valid_bucket_name(&bucket("sthree", "cache", Some("nix-cache"))).unwrap(), "nix-cache");
    }

    #[test]
    fn an_object_keeps_the_bucket_it_has_whatever_the_default() {
        // Created under the old default <namespace>-<name>: both the
        // annotation and status say so.
        let mut old = bucket("team-a", "cache", None);
        old.meta_mut().annotations = Some([(EXTERNAL_NAME_ANNOTATION.to_owned(), "team-a-cache".to_owned())].into());
        assert_eq!(valid_bucket_name(&old).unwrap(), "team-a-cache");
        let mut restored = bucket("team-a", "cache", None);
        restored.status = Some(S3BucketStatus { bucket_name: Some("team-a-cache".into()), ..Default::default() });
        assert_eq!(valid_bucket_name(&restored).unwrap(), "team-a-cache");
        // The annotation and spec.bucketName naming two buckets is refused.
        old.spec.bucket_name = Some("nix-cache".into());
        let Err(Error::Stalled { reason, message }) = valid_bucket_name(&old) else { panic!("must stall") };
        assert_eq!(reason, "BucketNameConflict");
        assert!(message.contains("remove the annotation"), "{message}");
    }

    #[test]
    fn only_a_bucket_tagged_with_the_uid_or_named_by_the_annotation_is_managed() {
        use BucketAction::*;
        let ours = || BucketHolder::ThisAccount { uid: Some("uid-1".into()) };
        let untagged = || BucketHolder::ThisAccount { uid: None };
        let other_object = || BucketHolder::ThisAccount { uid: Some("uid-2".into()) };
        // (managementPolicy, external-name annotation, holder, action or stall reason)
        type Case = (&'static str, Option<&'static str>, BucketHolder, std::result::Result<BucketAction, &'static str>);
        let table: Vec<Case> = vec![
            ("Default", None, BucketHolder::Nobody, Ok(Create)),
            ("Default", None, ours(), Ok(Manage)),
            ("Default", None, untagged(), Err("BucketNotOwned")),
            ("Default", None, other_object(), Err("BucketNotOwned")),
            ("Default", None, BucketHolder::OtherAccount, Err("BucketNameTaken")),
            ("Default", Some("logs"), untagged(), Ok(Adopt)),
            ("Default", Some("logs"), other_object(), Ok(Adopt)),
            ("Default", Some("logs"), ours(), Ok(Manage)),
            ("Default", Some("logs"), BucketHolder::Nobody, Ok(Create)),
            ("Observe", Some("logs"), untagged(), Ok(Observe)),
            ("Observe", Some("logs"), ours(), Ok(Observe)),
            ("Observe", Some("logs"), BucketHolder::Nobody, Err("BucketNotFound")),
            ("Observe", None, BucketHolder::OtherAccount, Err("BucketNameTaken")),
        ];
        for (policy, annotation, holder, want) in table {
            let mut b = bucket("team", "logs", None);
            b.spec.management_policy = serde_json::from_value(serde_json::json!(policy)).unwrap();
            b.meta_mut().uid = Some("uid-1".into());
            b.meta_mut().annotations = annotation.map(|a| [(EXTERNAL_NAME_ANNOTATION.to_owned(), a.to_owned())].into());
            let got = decide(&b, "logs", &holder, false);
            let case = format!("{policy} {annotation:?} {holder:?}");
            match (got, want) {
                (Ok(got), Ok(want)) => assert_eq!(got, want, "{case}"),
                (Err(Error::Stalled { reason, message }), Err(want)) => {
                    assert_eq!(reason, want, "{case}");
                    if reason == "BucketNotOwned" {
                        assert!(message.contains("set spec.bucketName") && message.contains(EXTERNAL_NAME_ANNOTATION));
                    }
                }
                (got, want) => panic!("{case}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn an_untagged_bucket_is_taken_only_after_an_unanswered_create() {
        let mut b = bucket("team", "logs", None);
        b.meta_mut().uid = Some("uid-1".into());
        let untagged = BucketHolder::ThisAccount { uid: None };
        assert_eq!(decide(&b, "logs", &untagged, true).unwrap(), BucketAction::Manage);
        assert!(decide(&b, "logs", &untagged, false).is_err(), "without a create of ours: not ours");
        let other = BucketHolder::ThisAccount { uid: Some("uid-2".into()) };
        assert!(decide(&b, "logs", &other, true).is_err(), "tagged for another object: never ours");
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
