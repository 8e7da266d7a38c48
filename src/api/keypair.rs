//! `KeyPair`: an SSH key pair, generated into a Secret or imported, and
//! optionally registered with the cloud.

use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::network::ResourcePhase;
use super::{Condition, DeletionPolicy, LocalObjectReference, ManagementPolicy, rules};

/// An SSH key pair, the counterpart of NixOps `resources.sshKeyPairs` and
/// `resources.ec2KeyPairs`.
#[derive(CustomResource, Clone, Debug, Deserialize, Serialize, PartialEq, KubeSchema)]
#[kube(
    group = "nixops.io",
    version = "v1alpha1",
    kind = "KeyPair",
    namespaced,
    status = "KeyPairStatus",
    shortname = "nixkey",
    category = "nixops",
    doc = "An SSH key pair: generated into a Secret or imported, optionally registered with the cloud.",
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Type", type_ = "string", json_path = ".spec.type"),
    printcolumn(name = "Fingerprint", type_ = "string", json_path = ".status.fingerprint"),
    printcolumn(name = "Ready", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].status"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    printcolumn(name = "Secret", type_ = "string", json_path = ".spec.secretRef.name", priority = 1),
    printcolumn(name = "Cloud-Key", type_ = "string", json_path = ".status.cloudKeyName", priority = 1),
    printcolumn(
        name = "Message",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].message",
        priority = 1
    )
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.provider) || has(self.networkRef)")
    .message("registering the key with a cloud needs networkRef, which names the account")
    .field_path(".networkRef"))]
#[x_kube(validation = Rule::new("has(self.provider) == has(oldSelf.provider)")
    .message("cannot be added or removed after creation: a key registered with a cloud stays registered (removing provider would leave it there), and one kept in Kubernetes stays there; create a new KeyPair instead")
    .field_path(".provider"))]
#[x_kube(validation = Rule::new("!has(self.provider) || !has(oldSelf.networkRef) || (has(self.networkRef) && self.networkRef.name == oldSelf.networkRef.name)")
    .message("is immutable while the key is registered with a cloud: it names the account the key lives in; create a new KeyPair instead")
    .field_path(".networkRef"))]
#[x_kube(validation = rules::fixed_at_creation("provider.ec2.keyName", "the EC2 key name"))]
#[x_kube(validation = rules::fixed_at_creation("publicKey", "the imported public key"))]
pub struct KeyPairSpec {
    /// The Secret holding the key pair (keys `ssh-privatekey` and
    /// `ssh-publickey`). The operator creates it when generating a key.
    pub secret_ref: LocalObjectReference,

    /// Import this public key instead of generating a pair; the private half
    /// must then be in the Secret under `ssh-privatekey`. Immutable: machines
    /// and the cloud authorise the key, so a new key is a new KeyPair.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = rules::ssh_public_key())]
    #[schemars(length(max = 16384))]
    pub public_key: Option<String>,

    /// Key algorithm for generated keys. Immutable.
    #[serde(default, rename = "type")]
    #[x_kube(validation = rules::immutable("the key type"))]
    pub key_type: KeyType,

    /// The Network whose cloud account the key is registered in. Immutable
    /// while `provider` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_ref: Option<LocalObjectReference>,

    /// Register the public key with a cloud. Omit to keep it in Kubernetes
    /// only. It cannot be added or removed after creation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<KeyPairProvider>,

    /// `Default` creates, updates and deletes the cloud resource; `Observe`
    /// only reads the existing one named by the `nixops.io/external-name`
    /// annotation and never changes or deletes it. With that annotation and
    /// `Default`, an existing resource is adopted instead of created.
    #[serde(default)]
    pub management_policy: ManagementPolicy,

    /// `Delete` removes the key from the cloud (and a generated Secret) with
    /// this object; `Orphan` leaves both.
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,
}

/// SSH key algorithms.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum KeyType {
    /// Ed25519 (recommended).
    #[default]
    Ed25519,
}

/// Where to register the key.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.ec2)").message("exactly one provider block must be set: ec2"))]
pub struct KeyPairProvider {
    /// Register as an EC2 key pair.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ec2: Option<Ec2KeyPair>,
}

/// An EC2 key pair.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Ec2KeyPair {
    /// Name of the key pair in EC2; defaults to `<namespace>-<name>`. It
    /// cannot be added, changed or removed after creation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.matches('^[ -~]+$')").message("must be printable ASCII"))]
    #[schemars(length(min = 1, max = 255))]
    pub key_name: Option<String>,
}

/// Observed state of a KeyPair.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct KeyPairStatus {
    /// The metadata.generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Summary of the KeyPair's lifecycle.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<ResourcePhase>,

    /// Ready, Reconciling, Stalled, Registered, Paused.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = rules::list_map("type"))]
    pub conditions: Vec<Condition>,

    /// The public key in OpenSSH format.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_key: Option<String>,

    /// SHA256 fingerprint of the public key, as ssh-keygen -l prints it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,

    /// Name of the key pair in the cloud, once registered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cloud_key_name: Option<String>,
}
