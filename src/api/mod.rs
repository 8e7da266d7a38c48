//! The `nixops.io/v1alpha1` API: one file per kind, shared pieces here.
//!
//! Every field's doc comment becomes `kubectl explain` text, so they are
//! written for users. Validation that the API server can do (schema, CEL) is
//! declared next to the field it checks, in [`rules`], so bad manifests are
//! rejected at `kubectl apply` time with a message naming the field.

pub mod backup;
pub mod build;
pub mod keypair;
pub mod machine;
pub mod network;
pub mod rules;
pub mod s3bucket;
pub mod volume;

use std::collections::BTreeMap;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::{CustomResourceExt, KubeSchema};
use serde::{Deserialize, Serialize};

pub use backup::{Backup, BackupSpec, BackupStatus};
pub use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
pub use keypair::{KeyPair, KeyPairSpec, KeyPairStatus};
pub use machine::{Machine, MachineSpec, MachineStatus};
pub use network::{Network, NetworkSpec, NetworkStatus};
pub use s3bucket::{S3Bucket, S3BucketSpec, S3BucketStatus};
pub use volume::{Volume, VolumeSpec, VolumeStatus};

/// API group of every kind.
pub const GROUP: &str = "nixops.io";
/// API version of every kind.
pub const VERSION: &str = "v1alpha1";
/// `kubectl get nixops` lists every kind.
pub const CATEGORY: &str = "nixops";
/// Finalizer that makes deletion wait until the cloud resource is gone (or orphaned).
pub const FINALIZER: &str = "nixops.io/cleanup";
/// Prefix of the finalizer a Network puts on its credentials Secret, followed
/// by the Network's UID: one per Network, so Networks sharing a Secret never
/// remove each other's.
pub const CREDENTIALS_FINALIZER_PREFIX: &str = "nixops.io/network-";
/// Annotation on a Network being deleted whose cloud resources are gone: its
/// cleanup needs its credentials no more (a restart after the Secret went
/// must not stall on them).
pub const CLOUD_DELETED_ANNOTATION: &str = "nixops.io/cloud-deleted";
/// Annotation holding the cloud ID, so `status` can be rebuilt after a restore.
pub const EXTERNAL_NAME_ANNOTATION: &str = "nixops.io/external-name";
/// Annotation that stops all external calls for an object while set to "true".
pub const PAUSED_ANNOTATION: &str = "nixops.io/paused";

/// All custom resource definitions, in the order they are written to `crds/`.
pub fn crds() -> Vec<CustomResourceDefinition> {
    vec![Network::crd(), Machine::crd(), Volume::crd(), KeyPair::crd(), S3Bucket::crd(), Backup::crd()]
}

/// A reference to another object in the same namespace.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq, KubeSchema)]
pub struct LocalObjectReference {
    /// Name of the referenced object, in the same namespace as this one.
    #[x_kube(validation = rules::object_name())]
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// A reference to one key of a Secret in the same namespace.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq, KubeSchema)]
pub struct SecretKeyReference {
    /// Name of the Secret, in the same namespace as this object.
    #[x_kube(validation = rules::object_name())]
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key within the Secret's data.
    #[x_kube(validation = rules::secret_key())]
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

/// What happens to the cloud resource when the object is deleted.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq, schemars::JsonSchema)]
pub enum DeletionPolicy {
    /// Delete the cloud resource (terminate the instance, delete the volume or bucket).
    #[default]
    Delete,
    /// Leave the cloud resource in place; only the Kubernetes object goes away.
    Orphan,
}

/// How far the operator manages the cloud resource behind an object.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq, schemars::JsonSchema)]
pub enum ManagementPolicy {
    /// Create, update and delete it.
    #[default]
    Default,
    /// Only read the existing resource named by the `nixops.io/external-name`
    /// annotation and report it in status; never change or delete it.
    Observe,
}

/// Cloud resource tags, applied in addition to the ones the operator sets
/// (`nixops.io/uid`, `nixops.io/name`, `nixops.io/namespace`).
pub type Tags = BTreeMap<String, String>;

/// Condition types shared by every kind (kstatus reads Ready, Reconciling and Stalled).
pub mod condition {
    /// The object is in its desired state.
    pub const READY: &str = "Ready";
    /// Work toward the desired state is under way.
    pub const RECONCILING: &str = "Reconciling";
    /// Progress needs a change to the spec (or the environment); the message says which.
    pub const STALLED: &str = "Stalled";
    /// The `nixops.io/paused` annotation is set; no external calls are made.
    pub const PAUSED: &str = "Paused";
}
