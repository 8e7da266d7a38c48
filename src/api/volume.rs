//! `Volume`: a block device (EBS volume), attached through `Machine.spec.volumes`.

use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::machine::EbsVolumeType;
use super::network::ResourcePhase;
use super::{Condition, DeletionPolicy, LocalObjectReference, ManagementPolicy, Tags, rules};

/// A block device, the counterpart of NixOps `resources.ebsVolumes`.
#[derive(CustomResource, Clone, Debug, Deserialize, Serialize, PartialEq, KubeSchema)]
#[kube(
    group = "nixops.io",
    version = "v1alpha1",
    kind = "Volume",
    namespaced,
    status = "VolumeStatus",
    shortname = "nixvol",
    category = "nixops",
    doc = "A block device (EBS volume) for a NixOS machine; attach it with Machine.spec.volumes.",
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Size", type_ = "string", json_path = ".status.sizeGiB"),
    printcolumn(name = "Attached-To", type_ = "string", json_path = ".status.attachedTo.machine"),
    printcolumn(name = "Ready", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].status"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    printcolumn(name = "Volume-ID", type_ = "string", json_path = ".status.volumeId", priority = 1),
    printcolumn(name = "Device", type_ = "string", json_path = ".status.attachedTo.device", priority = 1),
    printcolumn(
        name = "Message",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].message",
        priority = 1
    )
)]
#[serde(rename_all = "camelCase")]
pub struct VolumeSpec {
    /// The Network whose cloud account the volume lives in. Immutable.
    #[x_kube(validation = rules::immutable("the Network"))]
    pub network_ref: LocalObjectReference,

    /// Where the volume lives. Exactly one block is set.
    pub provider: VolumeProvider,

    /// `Default` creates, updates and deletes the cloud resource; `Observe`
    /// only reads the existing one named by the `nixops.io/external-name`
    /// annotation and never changes or deletes it. With that annotation and
    /// `Default`, an existing resource is adopted instead of created.
    #[serde(default)]
    pub management_policy: ManagementPolicy,

    /// `Delete` deletes the volume with this object; `Orphan` keeps it and its data.
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,
}

/// Where a volume lives.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("[has(self.ec2), has(self.libvirt)].filter(x, x).size() == 1")
    .message("exactly one provider block must be set: ec2 or libvirt"))]
#[x_kube(validation = Rule::new("has(self.ec2) == has(oldSelf.ec2) && has(self.libvirt) == has(oldSelf.libvirt)")
    .message("the provider kind is immutable; create a new Volume instead"))]
pub struct VolumeProvider {
    /// An EBS volume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ec2: Option<EbsVolume>,

    /// A volume in the storage pool of the Network's libvirt hypervisor,
    /// attached as a virtio disk (name the device /dev/vdb … /dev/vdy in
    /// Machine.spec.volumes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub libvirt: Option<LibvirtVolume>,
}

/// A libvirt storage volume.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct LibvirtVolume {
    /// Size in GiB. It can grow (in place, also while attached) but not shrink.
    #[serde(rename = "sizeGiB")]
    #[schemars(range(min = 1, max = 65536))]
    #[x_kube(validation = Rule::new("self >= oldSelf")
        .message("volumes can grow but not shrink; to shrink, create a new Volume and copy the data"))]
    pub size_gib: i32,

    /// On-disk format. Immutable.
    #[serde(default)]
    #[x_kube(validation = rules::immutable("the format"))]
    pub format: LibvirtVolumeFormat,
}

/// Format of a libvirt volume.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum LibvirtVolumeFormat {
    /// qcow2: sparse, grows as written.
    #[default]
    Qcow2,
    /// A raw image.
    Raw,
}

impl LibvirtVolumeFormat {
    /// libvirt's name of the format.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Qcow2 => "qcow2",
            Self::Raw => "raw",
        }
    }
}

/// An EBS volume.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!(self.type in ['io1', 'io2']) || has(self.iops)")
    .message("io1 and io2 volumes need iops").field_path(".iops"))]
#[x_kube(validation = Rule::new("has(self.sizeGiB) || has(self.snapshotId)")
    .message("set sizeGiB, or snapshotId to take the size from the snapshot").field_path(".sizeGiB"))]
#[x_kube(validation = rules::fixed_at_creation("snapshotId", "the source snapshot"))]
#[x_kube(validation = rules::fixed_at_creation("kmsKeyId", "the KMS key"))]
pub struct EbsVolume {
    /// Availability zone; it must match the zone of the machines it attaches to. Immutable.
    #[x_kube(validation = rules::aws_zone())]
    #[x_kube(validation = rules::immutable("the availability zone"))]
    #[schemars(length(min = 1, max = 32))]
    pub zone: String,

    /// Size in GiB. It can grow but never shrink.
    #[serde(default, rename = "sizeGiB", skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65536))]
    #[x_kube(validation = Rule::new("self >= oldSelf")
        .message("volumes can grow but not shrink; to shrink, create a new Volume and copy the data"))]
    pub size_gib: Option<i32>,

    /// Volume type.
    #[serde(default, rename = "type")]
    pub volume_type: EbsVolumeType,

    /// Provisioned IOPS (io1, io2, and gp3 above its baseline).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 100, max = 256000))]
    pub iops: Option<i32>,

    /// Throughput in MiB/s (gp3 only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 125, max = 2000))]
    pub throughput: Option<i32>,

    /// Encrypt the volume. Immutable.
    #[serde(default)]
    #[x_kube(validation = rules::immutable("encryption"))]
    pub encrypted: bool,

    /// KMS key for encryption; defaults to the account's EBS key. Immutable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048))]
    pub kms_key_id: Option<String>,

    /// Snapshot to create the volume from. Immutable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.matches('^snap-([0-9a-f]{8}|[0-9a-f]{17})$')")
        .message("must be a snapshot ID: 'snap-' followed by 8 or 17 hex digits"))]
    #[schemars(length(max = 22))]
    pub snapshot_id: Option<String>,

    /// Extra tags for the volume.
    #[serde(default, skip_serializing_if = "Tags::is_empty")]
    #[schemars(length(max = 40))]
    pub tags: Tags,
}

/// Observed state of a Volume.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct VolumeStatus {
    /// The metadata.generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Summary of the Volume's lifecycle.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<ResourcePhase>,

    /// Ready, Reconciling, Stalled, Attached, Paused.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = rules::list_map("type"))]
    pub conditions: Vec<Condition>,

    /// Cloud volume ID, e.g. vol-0abc….
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_id: Option<String>,

    /// Current size in GiB.
    #[serde(default, rename = "sizeGiB", skip_serializing_if = "Option::is_none")]
    pub size_gib: Option<i32>,

    /// The machine and device the volume is attached to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attached_to: Option<VolumeAttachmentStatus>,
}

/// Where a volume is attached.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct VolumeAttachmentStatus {
    /// Name of the Machine.
    pub machine: String,
    /// Device name on the machine.
    pub device: String,
}
