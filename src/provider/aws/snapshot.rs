//! EBS snapshots of a Backup: created tagged with the Backup's UID (and the
//! Volume's name) in the same call, found again by that tag after a crash,
//! deleted with the Backup.

use aws_sdk_ec2::types::{Filter, ResourceType, Tag, TagSpecification};

use super::{AwsClients, tags};
use crate::provider::{Owner, ProviderError, SnapshotPhase, SnapshotState};

/// Tag naming the Volume a snapshot was taken of.
const VOLUME_TAG: &str = "nixops.io/volume";

fn observed(s: &aws_sdk_ec2::types::Snapshot) -> SnapshotState {
    use aws_sdk_ec2::types::SnapshotState as Ec2;
    SnapshotState {
        id: s.snapshot_id().unwrap_or_default().to_owned(),
        volume_id: s.volume_id().unwrap_or_default().to_owned(),
        volume: s
            .tags()
            .iter()
            .find(|t| t.key() == Some(VOLUME_TAG))
            .and_then(|t| t.value())
            .unwrap_or_default()
            .to_owned(),
        phase: match s.state() {
            Some(Ec2::Completed) => SnapshotPhase::Completed,
            Some(Ec2::Error) | Some(Ec2::Recoverable) => SnapshotPhase::Failed,
            _ => SnapshotPhase::Pending,
        },
        progress: s.progress().map(str::to_owned),
        size_gib: s.volume_size().unwrap_or_default(),
    }
}

/// The snapshots tagged with `owner`'s UID.
pub async fn find(aws: &AwsClients, owner: &Owner) -> Result<Vec<SnapshotState>, ProviderError> {
    if crate::fault::lookup_lags() {
        return Ok(Vec::new());
    }
    let request = aws
        .reading()
        .await
        .ec2
        .describe_snapshots()
        .filters(Filter::builder().name(format!("tag:{}", tags::UID)).values(&owner.uid).build())
        .send();
    let out = aws.call("DescribeSnapshots", "", request).await?;
    Ok(out.snapshots().iter().map(observed).collect())
}

/// Snapshots volume `id` (the Volume `volume`), tagged in the same call.
pub async fn create(aws: &AwsClients, owner: &Owner, id: &str, volume: &str) -> Result<SnapshotState, ProviderError> {
    let mut tags = TagSpecification::builder().resource_type(ResourceType::Snapshot);
    for (k, v) in owner.tags("Backup") {
        tags = tags.tags(Tag::builder().key(k).value(v).build());
    }
    tags = tags.tags(Tag::builder().key(VOLUME_TAG).value(volume).build());
    let request = aws
        .writing()
        .await
        .ec2
        .create_snapshot()
        .volume_id(id)
        .description(format!("nixops backup {}/{} of volume {volume}", owner.namespace, owner.name))
        .tag_specifications(tags.build())
        .customize()
        .config_override(super::single_attempt())
        .send();
    let out = aws.call("CreateSnapshot", format!("of {id}"), request).await?;
    let mut state = SnapshotState {
        id: out.snapshot_id().unwrap_or_default().to_owned(),
        volume_id: id.to_owned(),
        volume: volume.to_owned(),
        phase: SnapshotPhase::Pending,
        progress: out.progress().map(str::to_owned),
        size_gib: out.volume_size().unwrap_or_default(),
    };
    if out.state() == Some(&aws_sdk_ec2::types::SnapshotState::Completed) {
        state.phase = SnapshotPhase::Completed;
    }
    Ok(state)
}

/// Deletes a snapshot; one already gone is success.
pub async fn delete(aws: &AwsClients, id: &str) -> Result<(), ProviderError> {
    match aws.call("DeleteSnapshot", id, aws.writing().await.ec2.delete_snapshot().snapshot_id(id).send()).await {
        Ok(_) => Ok(()),
        Err(err) if err.is("InvalidSnapshot.NotFound") => Ok(()),
        Err(err) => Err(err.into()),
    }
}
