//! Providers: where resources live. One small trait per resource kind, all
//! operations idempotent; the controllers pick an implementation from the
//! [`Providers`] registry by the provider block a spec sets.

pub mod aws;
pub mod existing;
#[cfg(feature = "libvirt")]
pub mod libvirt;
/// Built without the `libvirt` feature: no libvirt provider (libvirt
/// objects stall with `ProviderUnavailable`), only how a remote hypervisor
/// is reached, which the kubectl plugin needs for machines behind it.
#[cfg(not(feature = "libvirt"))]
pub mod libvirt {
    #[path = "remote.rs"]
    pub mod remote;
}

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;

use crate::api::machine::{MachineAddress, MachineProvider as MachineProviderSpec};

/// Errors providers return, classified for the controllers.
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    /// Worth retrying with backoff (timeouts, connection resets, server
    /// errors); whether a create went through is unknown.
    #[error("{0}")]
    Transient(String),
    /// The cloud answered that it did not do it (throttling, capacity);
    /// worth retrying with backoff, and nothing was created.
    #[error("{0}")]
    Refused(String),
    /// Needs a change to the spec or the environment; becomes Stalled.
    #[error("{message}")]
    Permanent { reason: &'static str, message: String },
}

impl ProviderError {
    pub fn permanent(reason: &'static str, message: impl Into<String>) -> Self {
        Self::Permanent { reason, message: message.into() }
    }
}

/// Tag keys set on every cloud resource the operator creates. The UID tag
/// finds a resource again after a crash, before anything is created twice.
pub mod tags {
    pub const UID: &str = "nixops.io/uid";
    pub const NAME: &str = "nixops.io/name";
    pub const NAMESPACE: &str = "nixops.io/namespace";
    pub const KIND: &str = "nixops.io/kind";
}

/// Identity of the object a provider acts for; cloud resources are tagged
/// with it so they can be found again after a crash.
#[derive(Clone, Debug)]
pub struct Owner {
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

impl Owner {
    /// The tags identifying this owner (an object of `kind`), set on every
    /// resource created for it.
    pub fn tags(&self, kind: &str) -> BTreeMap<String, String> {
        [
            (tags::UID, &self.uid),
            (tags::NAME, &self.name),
            (tags::NAMESPACE, &self.namespace),
            (tags::KIND, &kind.to_owned()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.clone()))
        .collect()
    }

    /// The identity of a Kubernetes object.
    pub fn of<K: kube::Resource>(obj: &K) -> Self {
        use kube::ResourceExt;
        Self {
            namespace: obj.namespace().unwrap_or_default(),
            name: obj.name_any(),
            uid: obj.uid().unwrap_or_default(),
        }
    }
}

/// What a Machine provider is asked to act on: the machine's identity and
/// its effective provider block (its own, or its Network's default).
#[derive(Clone, Debug)]
pub struct MachineTarget {
    pub owner: Owner,
    pub provider: MachineProviderSpec,
    pub running: bool,
    /// Cloud ID recorded earlier (status or the external-name annotation).
    pub external_id: Option<String>,
    /// The machine's Network (cloud providers take the account from it).
    pub network: Option<crate::api::Network>,
    /// Cloud key pair new instances accept.
    pub key_name: Option<String>,
    /// The login public key (OpenSSH format) of spec.ssh.keyPairRef, for
    /// providers that install it themselves (libvirt's seed).
    pub authorized_key: Option<String>,
}

/// A machine as its provider sees it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Instance {
    /// Cloud identity, e.g. aws:///eu-west-1a/i-0abc…; None for existing hosts.
    pub provider_id: Option<String>,
    pub addresses: Vec<MachineAddress>,
    /// Where SSH answers.
    pub ssh_host: String,
    pub ssh_port: u16,
    pub state: InstanceState,
    /// The SSH host key the provider installed on the machine (libvirt
    /// injects one it generated at first boot), pinned from the first
    /// connection; None where the provider cannot know it.
    pub host_key: Option<String>,
    /// Set when the machine runs an older definition than its spec asks
    /// for until it is powered off and on (libvirt domains defined anew):
    /// why, for the Machine's RestartRequired condition.
    pub restart_pending: Option<String>,
}

impl Instance {
    /// The cloud's own ID of the machine (the last segment of its
    /// providerID, e.g. i-0abc…), for the external-name annotation.
    pub fn cloud_id(&self) -> Option<&str> {
        self.provider_id.as_deref()?.rsplit('/').next().filter(|id| !id.is_empty())
    }
}

/// Power state of a machine.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum InstanceState {
    Pending,
    #[default]
    Running,
    Stopping,
    Stopped,
}

/// How soon a provider's lookup sees what it created, which decides what a
/// create-pending mark left by a crash means (`controller::create_once`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lookup {
    /// Reads may lag a create by seconds (EC2, S3): with the mark and
    /// nothing found, the create may still have happened; wait, then stall.
    Lagging,
    /// A lookup sees every create that reached the backend (libvirt: a
    /// domain by its UUID, a volume by its name): with the mark and nothing
    /// found, nothing was made, and the create runs again at once.
    Immediate,
}

/// Provisions machines.
#[async_trait]
pub trait MachineProvider: Send + Sync {
    /// The provider block this implements (`existing`, `ec2`, …).
    fn name(&self) -> &'static str;
    /// The machine if it exists.
    async fn observe(&self, target: &MachineTarget) -> Result<Option<Instance>, ProviderError>;
    /// Whether `create` can run now (e.g. the Network's VPC exists). Checked
    /// before the create-pending mark is written: waiting for what a create
    /// needs must not look like a create with an unknown outcome after a crash.
    fn check_create(&self, _target: &MachineTarget) -> Result<(), ProviderError> {
        Ok(())
    }
    /// Whether `observe` sees a create at once (a libvirt domain looked up
    /// by its UUID), so that a create-pending mark without a machine means
    /// the create never reached the backend. See [`Lookup`].
    fn lookup(&self) -> Lookup {
        Lookup::Lagging
    }
    /// Creates the machine; called only when `observe` found none.
    async fn create(&self, target: &MachineTarget) -> Result<Instance, ProviderError>;
    /// Converges an existing machine (start/stop, tags); returns it as it now is.
    async fn update(&self, target: &MachineTarget, current: Instance) -> Result<Instance, ProviderError>;
    /// Deletes the machine; a machine already gone is success.
    async fn delete(&self, target: &MachineTarget) -> Result<(), ProviderError>;

    /// The session to reach the machine's SSH through when the Machine
    /// names no jump host, e.g. a remote hypervisor in front of a network
    /// only it reaches; None to connect directly.
    async fn jump(
        &self,
        _target: &MachineTarget,
    ) -> Result<Option<std::sync::Arc<crate::ssh::Session>>, ProviderError> {
        Ok(None)
    }
}

/// What a cloud provider acts for: the object's identity and the Network
/// naming the account.
#[derive(Clone, Debug)]
pub struct CloudTarget {
    pub owner: Owner,
    pub network: crate::api::Network,
}

/// A block device as its provider sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct VolumeState {
    pub id: String,
    pub zone: String,
    pub size_gib: i32,
    pub volume_type: Option<String>,
    pub iops: Option<i32>,
    pub throughput: Option<i32>,
    /// The provider's word for it (creating, available, in-use, …), for messages.
    pub state: String,
    pub attachments: Vec<VolumeAttachment>,
}

/// One attachment of a volume to an instance.
#[derive(Clone, Debug, PartialEq)]
pub struct VolumeAttachment {
    pub instance_id: String,
    pub device: String,
    pub state: AttachmentState,
}

/// Where an attachment is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachmentState {
    Attaching,
    Attached,
    Detaching,
    Detached,
}

impl std::fmt::Display for AttachmentState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Attaching => "attaching",
            Self::Attached => "attached",
            Self::Detaching => "detaching",
            Self::Detached => "detached",
        })
    }
}
/// What a bucket provider is asked for, and what it did.
/// A bucket as desired.
pub struct BucketSpec<'a> {
    pub name: &'a str,
    pub versioning: bool,
    /// Already checked to be valid JSON.
    pub policy: Option<&'a serde_json::Value>,
    pub public_access_block: crate::api::s3bucket::PublicAccessBlock,
    pub tags: BTreeMap<String, String>,
}

/// Who holds a bucket name, as far as this account can tell. Buckets are
/// matched to their S3Bucket by the `nixops.io/uid` tag, never by name
/// alone: names are global, and one in this account may be anyone's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BucketHolder {
    /// No bucket has the name.
    Nobody,
    /// A bucket in this account, with its `nixops.io/uid` tag if it has one.
    ThisAccount { uid: Option<String> },
    /// A bucket of another account.
    OtherAccount,
}

/// Block devices (`Volume`). All operations are idempotent.
#[async_trait]
pub trait VolumeProvider: Send + Sync {
    fn name(&self) -> &'static str;
    /// What its volumes are called in messages ("EBS volume").
    fn noun(&self) -> &'static str {
        "volume"
    }
    /// Whether `find` sees a create at once (see [`Lookup`]).
    fn lookup(&self) -> Lookup {
        Lookup::Lagging
    }
    /// The volume recorded as `id`, else the one tagged with the owner's UID.
    async fn find(&self, target: &CloudTarget, id: Option<&str>) -> Result<Option<VolumeState>, ProviderError>;
    /// Creates the volume, tagged with its owner in the same call.
    async fn create(
        &self,
        target: &CloudTarget,
        spec: &crate::api::volume::VolumeProvider,
    ) -> Result<VolumeState, ProviderError>;
    /// Whether `current` differs from `spec` in what can change in place (size up, type, performance).
    fn needs_update(&self, spec: &crate::api::volume::VolumeProvider, current: &VolumeState) -> bool;
    /// Changes the volume in place.
    async fn update(
        &self,
        target: &CloudTarget,
        id: &str,
        spec: &crate::api::volume::VolumeProvider,
    ) -> Result<(), ProviderError>;
    /// The machine a volume of this provider attaches to, from a Machine's
    /// providerID; None for a machine of another provider (or none yet).
    fn machine_id<'a>(&self, provider_id: &'a str) -> Option<&'a str>;
    async fn attach(&self, target: &CloudTarget, id: &str, instance: &str, device: &str) -> Result<(), ProviderError>;
    /// Detaches from `instance` (always named).
    async fn detach(&self, target: &CloudTarget, id: &str, instance: &str) -> Result<(), ProviderError>;
    /// Deletes the volume; one already gone is success.
    async fn delete(&self, target: &CloudTarget, id: &str) -> Result<(), ProviderError>;
    /// The snapshots made for `target`'s owner (a Backup), by its UID tag.
    async fn snapshots(&self, target: &CloudTarget) -> Result<Vec<SnapshotState>, ProviderError>;
    /// Snapshots volume `id` (the Volume named `volume`), tagged with the
    /// owner in the same call.
    async fn create_snapshot(
        &self,
        target: &CloudTarget,
        id: &str,
        volume: &str,
    ) -> Result<SnapshotState, ProviderError>;
    /// Deletes a snapshot; one already gone is success.
    async fn delete_snapshot(&self, target: &CloudTarget, id: &str) -> Result<(), ProviderError>;
}

/// A snapshot of a block device as its provider sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotState {
    pub id: String,
    /// The block device it was taken of.
    pub volume_id: String,
    /// The Volume object's name, as tagged.
    pub volume: String,
    pub phase: SnapshotPhase,
    /// The provider's progress, e.g. "42%".
    pub progress: Option<String>,
    pub size_gib: i32,
}

/// Where a snapshot is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SnapshotPhase {
    Pending,
    Completed,
    Failed,
}

/// Object storage buckets (`S3Bucket`).
#[async_trait]
pub trait BucketProvider: Send + Sync {
    fn name(&self) -> &'static str;
    /// The region the bucket lives in, and its ARN.
    fn location(&self, target: &CloudTarget, bucket: &str) -> (String, String);
    /// Who holds the bucket name, and the owner tag of a bucket in this account.
    async fn holder(&self, target: &CloudTarget, bucket: &str) -> Result<BucketHolder, ProviderError>;
    /// Creates the bucket tagged with its owner; called only when `holder` found none.
    async fn create(&self, target: &CloudTarget, spec: &BucketSpec<'_>) -> Result<(), ProviderError>;
    /// Converges a bucket of this owner's to `spec`; returns what changed.
    async fn converge(&self, target: &CloudTarget, spec: &BucketSpec<'_>) -> Result<Vec<&'static str>, ProviderError>;
    async fn object_count(&self, target: &CloudTarget, bucket: &str) -> Result<usize, ProviderError>;
    /// Deletes the bucket (its objects first when `force`); one already gone is success.
    async fn delete(&self, target: &CloudTarget, bucket: &str, force: bool) -> Result<(), ProviderError>;
}

/// The physical network of a Network: the cloud IDs of what exists.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NetworkResources {
    /// The network itself (a VPC on AWS).
    pub vpc_id: String,
    pub subnets: Vec<crate::api::network::SubnetStatus>,
    pub internet_gateway_id: Option<String>,
    pub security_group_id: Option<String>,
}

/// One cloud resource of a Network's physical network. They are created
/// one at a time in this order, each under the Network's create-pending
/// mark, which names the part ("subnet public-a") as this displays it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NetworkPart {
    Vpc,
    /// The subnet of that spec name.
    Subnet(String),
    InternetGateway,
    SecurityGroup,
}

impl NetworkPart {
    /// The kind of resource, for fault points and metrics: `vpc`, `subnet`, …
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Vpc => "vpc",
            Self::Subnet(_) => "subnet",
            Self::InternetGateway => "internet-gateway",
            Self::SecurityGroup => "security-group",
        }
    }
}

impl std::fmt::Display for NetworkPart {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Vpc => f.write_str("VPC"),
            Self::Subnet(name) => write!(f, "subnet {name}"),
            Self::InternetGateway => f.write_str("internet gateway"),
            Self::SecurityGroup => f.write_str("security group"),
        }
    }
}

/// What a lookup of a Network's parts found: the parts that exist (already
/// converged to the spec), in order, and the first one that does not.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NetworkState {
    pub resources: NetworkResources,
    pub found: Vec<NetworkPart>,
    pub missing: Option<NetworkPart>,
}

/// Physical networks (`Network`).
#[async_trait]
pub trait NetworkProvider: Send + Sync {
    fn name(&self) -> &'static str;
    /// The network's ID: the one recorded as `known`, else the one tagged with the owner's UID.
    async fn find(&self, target: &CloudTarget, known: Option<&str>) -> Result<Option<String>, ProviderError>;
    /// Looks each part up (by `known` for the network, else by the owner's
    /// UID tag) in creation order, converges those that exist, and stops at
    /// the first missing one.
    async fn ensure(&self, target: &CloudTarget, known: Option<&str>) -> Result<NetworkState, ProviderError>;
    /// Creates `part`, tagged with the owner; `found` holds the parts before
    /// it. Called only when `ensure` reported it missing. Returns its ID.
    async fn create(
        &self,
        target: &CloudTarget,
        part: &NetworkPart,
        found: &NetworkResources,
    ) -> Result<String, ProviderError>;
    /// Deletes everything the Network owns; what is already gone is skipped.
    async fn delete(&self, target: &CloudTarget, known: Option<&str>) -> Result<(), ProviderError>;
}

/// A cloud key pair of some name, as a lookup found it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloudKey {
    /// None has the name.
    Absent,
    /// One created for this owner (tagged with its UID).
    Ours,
    /// One created by someone else.
    Other,
}

/// Cloud key pairs (`KeyPair` with a provider).
#[async_trait]
pub trait KeyPairProvider: Send + Sync {
    fn name(&self) -> &'static str;
    /// The key pair named `key_name`, and whose it is.
    async fn find(&self, target: &CloudTarget, key_name: &str) -> Result<CloudKey, ProviderError>;
    /// Registers `public_key` as `key_name`, tagged with the owner; called
    /// only when `find` found none.
    async fn import(&self, target: &CloudTarget, key_name: &str, public_key: &str) -> Result<(), ProviderError>;
    /// Deletes the key if this owner created it.
    async fn delete(&self, target: &CloudTarget, key_name: &str) -> Result<(), ProviderError>;
}

/// The providers this process can use, by provider block name.
#[derive(Clone, Default)]
pub struct Providers {
    machines: BTreeMap<&'static str, Arc<dyn MachineProvider>>,
    volumes: BTreeMap<&'static str, Arc<dyn VolumeProvider>>,
    buckets: BTreeMap<&'static str, Arc<dyn BucketProvider>>,
    networks: BTreeMap<&'static str, Arc<dyn NetworkProvider>>,
    keypairs: BTreeMap<&'static str, Arc<dyn KeyPairProvider>>,
}

/// Looks a provider up by block name, or explains which ones exist.
fn lookup<T: ?Sized>(map: &BTreeMap<&'static str, Arc<T>>, field: &str, kind: &str) -> Result<Arc<T>, ProviderError> {
    map.get(kind).cloned().ok_or_else(|| {
        ProviderError::permanent(
            "ProviderUnavailable",
            format!(
                "{field}.{kind}: this operator has no {kind} provider (available: {}); use another provider block",
                map.keys().copied().collect::<Vec<_>>().join(", ")
            ),
        )
    })
}

impl Providers {
    /// Every provider this build has: existing hosts, and AWS through `accounts`.
    pub fn builtin(accounts: aws::AwsAccounts) -> Self {
        let mut providers = Self::default();
        providers.add_machine_provider(Arc::new(existing::ExistingHosts));
        providers.add_machine_provider(aws::ec2::Ec2Machines::new(accounts.clone()));
        let aws = Arc::new(aws::providers::Aws::new(accounts));
        providers.volumes.insert(VolumeProvider::name(&*aws), aws.clone());
        providers.buckets.insert(BucketProvider::name(&*aws), aws.clone());
        providers.networks.insert(NetworkProvider::name(&*aws), aws.clone());
        providers.keypairs.insert(KeyPairProvider::name(&*aws), aws);
        providers
    }

    /// The provider for a Volume's `spec.provider`.
    pub fn volume(&self, spec: &crate::api::volume::VolumeProvider) -> Result<Arc<dyn VolumeProvider>, ProviderError> {
        let kind = if spec.ec2.is_some() {
            "ec2"
        } else if spec.libvirt.is_some() {
            "libvirt"
        } else {
            ""
        };
        lookup(&self.volumes, "spec.provider", kind)
    }

    /// The volume provider of a Network's provider block, by name: for
    /// what belongs to no one Volume (a Backup's snapshots).
    pub fn volumes_of_network(&self, kind: &str) -> Result<Arc<dyn VolumeProvider>, ProviderError> {
        lookup(&self.volumes, "the Network's spec.provider", kind)
    }

    /// The provider for S3Buckets.
    pub fn bucket(&self) -> Result<Arc<dyn BucketProvider>, ProviderError> {
        lookup(&self.buckets, "spec", "ec2")
    }

    /// The provider for a Network's `spec.provider` block, by name.
    pub fn network(&self, kind: &str) -> Result<Arc<dyn NetworkProvider>, ProviderError> {
        lookup(&self.networks, "spec.provider", kind)
    }

    /// The provider for a KeyPair's `spec.provider` block, by name.
    pub fn keypair(&self, kind: &str) -> Result<Arc<dyn KeyPairProvider>, ProviderError> {
        lookup(&self.keypairs, "spec.provider", kind)
    }

    pub fn add_machine_provider(&mut self, provider: Arc<dyn MachineProvider>) {
        self.machines.insert(provider.name(), provider);
    }

    /// The provider for `spec`, or a Stalled-worthy error naming the field.
    pub fn machine(&self, spec: &MachineProviderSpec) -> Result<Arc<dyn MachineProvider>, ProviderError> {
        let kind = spec.kind().ok_or_else(|| {
            ProviderError::permanent("NoProvider", "spec.provider sets no provider block; set existing, ec2 or libvirt")
        })?;
        lookup(&self.machines, "spec.provider", kind)
    }
}
