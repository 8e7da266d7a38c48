//! `Backup`: snapshots of a Network's Volumes (NixOps `backup`), kept
//! while the object exists; restored with `kubectl nixops restore`.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::{Condition, DeletionPolicy, LocalObjectReference, rules};

/// A backup of a Network's Volumes: one cloud snapshot per volume (EBS
/// snapshots for ec2 volumes), the counterpart of NixOps `backup`.
#[derive(CustomResource, Clone, Debug, Deserialize, Serialize, PartialEq, KubeSchema)]
#[kube(
    group = "nixops.io",
    version = "v1alpha1",
    kind = "Backup",
    namespaced,
    status = "BackupStatus",
    shortname = "nixbackup",
    category = "nixops",
    doc = "Snapshots of a Network's Volumes (NixOps backup); deleting it deletes them unless deletionPolicy is Orphan.",
    printcolumn(name = "Network", type_ = "string", json_path = ".spec.networkRef.name"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Snapshots", type_ = "integer", json_path = ".status.completedSnapshots"),
    printcolumn(name = "Ready", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].status"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct BackupSpec {
    /// The Network whose Volumes are backed up. Immutable.
    #[x_kube(validation = rules::immutable("the Network"))]
    pub network_ref: LocalObjectReference,

    /// The Volumes to back up (names in this namespace); empty: every
    /// Volume of the Network. Immutable.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    #[x_kube(validation = rules::immutable("the list of volumes"))]
    pub volumes: Vec<LocalObjectReference>,

    /// Retention (NixOps clean-backups --keep): once this backup is
    /// complete, only the newest keepLast complete Backups of the Network
    /// are kept; older ones are deleted with their snapshots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000))]
    pub keep_last: Option<i32>,

    /// `Delete` deletes the snapshots with this object; `Orphan` keeps them.
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,
}

/// Observed state of a Backup.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackupStatus {
    /// The metadata.generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Pending, InProgress, Completed, Failed or Deleting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<BackupPhase>,

    /// Ready, Reconciling, Stalled, Paused.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = rules::list_map("type"))]
    pub conditions: Vec<Condition>,

    /// One snapshot per volume.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub snapshots: Vec<VolumeSnapshot>,

    /// How many snapshots are complete.
    #[serde(default)]
    pub completed_snapshots: i32,

    /// When every snapshot was complete.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completed_at: Option<Time>,
}

/// Where a Backup is.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq, schemars::JsonSchema)]
pub enum BackupPhase {
    Pending,
    InProgress,
    Completed,
    Failed,
    Deleting,
}

/// The snapshot of one volume.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct VolumeSnapshot {
    /// The Volume's name.
    pub volume: String,
    /// Its cloud ID when the snapshot was taken.
    pub volume_id: String,
    /// The snapshot's cloud ID, e.g. snap-0abc….
    pub snapshot_id: String,
    /// The cloud's state of the snapshot: pending, completed, error.
    pub state: String,
    /// The cloud's progress, e.g. 42%.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<String>,
    /// The volume's size, for restoring it.
    #[serde(default, rename = "sizeGiB")]
    pub size_gib: i32,
}
