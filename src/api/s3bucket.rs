//! `S3Bucket`: an S3 bucket, also usable as a Nix binary cache.

use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::network::ResourcePhase;
use super::{Condition, DeletionPolicy, LocalObjectReference, ManagementPolicy, Tags, rules};

/// An S3 bucket, the counterpart of NixOps `resources.s3Buckets`.
#[derive(CustomResource, Clone, Debug, Deserialize, Serialize, PartialEq, KubeSchema)]
#[kube(
    group = "nixops.io",
    version = "v1alpha1",
    kind = "S3Bucket",
    namespaced,
    status = "S3BucketStatus",
    shortname = "nixbucket",
    category = "nixops",
    doc = "An S3 bucket with versioning, policy, public access block and tags; usable as a Nix binary cache.",
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Bucket", type_ = "string", json_path = ".status.bucketName"),
    printcolumn(name = "Region", type_ = "string", json_path = ".status.region"),
    printcolumn(name = "Ready", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].status"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    printcolumn(name = "Versioning", type_ = "boolean", json_path = ".spec.versioning", priority = 1),
    printcolumn(
        name = "Message",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].message",
        priority = 1
    )
)]
#[serde(rename_all = "camelCase")]
pub struct S3BucketSpec {
    /// The Network whose cloud account (region, credentials, endpoint) the bucket lives in.
    pub network_ref: LocalObjectReference,

    /// Bucket name, globally unique in S3; defaults to `<namespace>-<name>`.
    /// Immutable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.matches('^[a-z0-9][a-z0-9.-]*[a-z0-9]$') && !self.contains('..') && !isIP(self)")
        .message("must be a valid S3 bucket name: 3-63 lower-case letters, digits, '.' and '-', starting and ending with a letter or digit, not an IP address"))]
    #[x_kube(validation = rules::immutable("the bucket name"))]
    #[schemars(length(min = 3, max = 63))]
    pub bucket_name: Option<String>,

    /// Keep every version of every object.
    #[serde(default)]
    pub versioning: bool,

    /// Bucket policy as a JSON document.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 2, max = 20480))]
    pub policy: Option<String>,

    /// Public access block; everything is blocked unless relaxed here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_access_block: Option<PublicAccessBlock>,

    /// Tags for the bucket.
    #[serde(default, skip_serializing_if = "Tags::is_empty")]
    #[schemars(length(max = 40))]
    pub tags: Tags,

    /// Delete a bucket that still holds objects (all versions) on deletion.
    /// Without it, deleting a non-empty bucket waits with a Stalled condition.
    #[serde(default)]
    pub force_destroy: bool,

    /// `Default` creates, updates and deletes the cloud resource; `Observe`
    /// only reads the existing one named by the `nixops.io/external-name`
    /// annotation and never changes or deletes it. With that annotation and
    /// `Default`, an existing resource is adopted instead of created.
    #[serde(default)]
    pub management_policy: ManagementPolicy,

    /// `Delete` deletes the bucket with this object; `Orphan` keeps it and its data.
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,
}

/// S3 public access block settings.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct PublicAccessBlock {
    /// Reject new public ACLs.
    #[serde(default = "default_true")]
    pub block_public_acls: bool,
    /// Ignore existing public ACLs.
    #[serde(default = "default_true")]
    pub ignore_public_acls: bool,
    /// Reject public bucket policies.
    #[serde(default = "default_true")]
    pub block_public_policy: bool,
    /// Restrict access under public policies to the account.
    #[serde(default = "default_true")]
    pub restrict_public_buckets: bool,
}

fn default_true() -> bool {
    true
}

/// Observed state of an S3Bucket.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct S3BucketStatus {
    /// The metadata.generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Summary of the bucket's lifecycle.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<ResourcePhase>,

    /// Ready, Reconciling, Stalled, Paused.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = rules::list_map("type"))]
    pub conditions: Vec<Condition>,

    /// The bucket's name in S3.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bucket_name: Option<String>,

    /// The bucket's region.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,

    /// ARN of the bucket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arn: Option<String>,
}
