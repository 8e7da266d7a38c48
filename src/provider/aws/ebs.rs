//! EBS volumes: found by ID or by the owner's UID tag, created with tags in
//! the same call, grown, attached, detached (always naming the instance) and
//! deleted.

use aws_sdk_ec2::types::{Filter, ResourceType, Tag, TagSpecification, VolumeType};

use super::{AwsClients, AwsError, tags};
use crate::api::machine::EbsVolumeType;
use crate::api::volume::EbsVolume;
use crate::provider::{AttachmentState, Owner, ProviderError, VolumeAttachment, VolumeState};

fn api_type(t: EbsVolumeType) -> VolumeType {
    match t {
        EbsVolumeType::Gp3 => VolumeType::Gp3,
        EbsVolumeType::Gp2 => VolumeType::Gp2,
        EbsVolumeType::Io1 => VolumeType::Io1,
        EbsVolumeType::Io2 => VolumeType::Io2,
        EbsVolumeType::St1 => VolumeType::St1,
        EbsVolumeType::Sc1 => VolumeType::Sc1,
        EbsVolumeType::Standard => VolumeType::Standard,
    }
}

/// The name EC2 uses for a volume type.
pub fn type_name(t: EbsVolumeType) -> String {
    api_type(t).as_str().to_owned()
}

fn attachment_state(state: Option<&aws_sdk_ec2::types::VolumeAttachmentState>) -> AttachmentState {
    use aws_sdk_ec2::types::VolumeAttachmentState as Ec2;
    match state {
        Some(Ec2::Attaching) => AttachmentState::Attaching,
        Some(Ec2::Attached) => AttachmentState::Attached,
        Some(Ec2::Detaching) => AttachmentState::Detaching,
        Some(Ec2::Detached) => AttachmentState::Detached,
        // busy, or a state this SDK does not know: in use, not settled.
        _ => AttachmentState::Attaching,
    }
}

fn observed(v: &aws_sdk_ec2::types::Volume) -> VolumeState {
    VolumeState {
        id: v.volume_id().unwrap_or_default().to_owned(),
        zone: v.availability_zone().unwrap_or_default().to_owned(),
        size_gib: v.size().unwrap_or_default(),
        volume_type: v.volume_type().map(|t| t.as_str().to_owned()),
        iops: v.iops(),
        throughput: v.throughput(),
        state: v.state().map(|s| s.as_str().to_owned()).unwrap_or_default(),
        attachments: v
            .attachments()
            .iter()
            .map(|a| VolumeAttachment {
                instance_id: a.instance_id().unwrap_or_default().to_owned(),
                device: a.device().unwrap_or_default().to_owned(),
                state: attachment_state(a.state()),
            })
            .collect(),
    }
}

/// Finds the volume: by its recorded ID if there is one, else by the owner's UID tag.
pub async fn find(aws: &AwsClients, owner: &Owner, id: Option<&str>) -> Result<Option<VolumeState>, ProviderError> {
    let request = match id {
        Some(id) => aws.reading().await.ec2.describe_volumes().volume_ids(id),
        None if crate::fault::lookup_lags() => return Ok(None),
        None => aws
            .reading()
            .await
            .ec2
            .describe_volumes()
            .filters(Filter::builder().name(format!("tag:{}", tags::UID)).values(&owner.uid).build()),
    };
    match aws.call("DescribeVolumes", "", request.send()).await {
        Ok(out) => Ok(out.volumes().iter().map(observed).find(|v| v.state != "deleted")),
        Err(err) if err.is("InvalidVolume.NotFound") => Ok(None),
        Err(err) => Err(err.into()),
    }
}

fn tag_spec(owner: &Owner, extra: &std::collections::BTreeMap<String, String>) -> TagSpecification {
    let mut builder = TagSpecification::builder().resource_type(ResourceType::Volume);
    for (k, v) in owner.tags("Volume").iter().chain(extra.iter()) {
        builder = builder.tags(Tag::builder().key(k).value(v).build());
    }
    builder.build()
}

/// Creates the volume, tagged with its owner in the same call.
pub async fn create(aws: &AwsClients, owner: &Owner, spec: &EbsVolume) -> Result<VolumeState, ProviderError> {
    let request = aws
        .writing()
        .await
        .ec2
        .create_volume()
        .availability_zone(&spec.zone)
        .set_size(spec.size_gib)
        .volume_type(api_type(spec.volume_type))
        .set_iops(spec.iops)
        .set_throughput(spec.throughput)
        .encrypted(spec.encrypted)
        .set_kms_key_id(spec.kms_key_id.clone())
        .set_snapshot_id(spec.snapshot_id.clone())
        .tag_specifications(tag_spec(owner, &spec.tags))
        .customize()
        .config_override(super::single_attempt())
        .send();
    let out = aws.call("CreateVolume", "(spec.provider.ec2)", request).await?;
    Ok(VolumeState {
        id: out.volume_id().unwrap_or_default().to_owned(),
        zone: out.availability_zone().unwrap_or_default().to_owned(),
        size_gib: out.size().unwrap_or_default(),
        volume_type: out.volume_type().map(|t| t.as_str().to_owned()),
        iops: out.iops(),
        throughput: out.throughput(),
        state: out.state().map(|s| s.as_str().to_owned()).unwrap_or_default(),
        attachments: Vec::new(),
    })
}

/// Grows the volume or changes its type, IOPS or throughput.
pub async fn modify(aws: &AwsClients, id: &str, spec: &EbsVolume) -> Result<(), ProviderError> {
    let request = aws
        .writing()
        .await
        .ec2
        .modify_volume()
        .volume_id(id)
        .set_size(spec.size_gib)
        .volume_type(api_type(spec.volume_type))
        .set_iops(spec.iops)
        .set_throughput(spec.throughput)
        .send();
    aws.call("ModifyVolume", "(spec.provider.ec2)", request).await?;
    Ok(())
}

/// Attaches the volume to an instance as `device`.
pub async fn attach(aws: &AwsClients, id: &str, instance_id: &str, device: &str) -> Result<(), ProviderError> {
    let request = aws.writing().await.ec2.attach_volume().volume_id(id).instance_id(instance_id).device(device).send();
    // An instance launched moments ago may not be visible yet: retried.
    aws.call("AttachVolume", format!("{id} to {instance_id} as {device}"), request)
        .await
        .map_err(AwsError::retry_not_found)?;
    Ok(())
}

/// Detaches the volume from `instance_id` (always named: the API's
/// instance-less form is ambiguous and some endpoints reject it).
pub async fn detach(aws: &AwsClients, id: &str, instance_id: &str) -> Result<(), ProviderError> {
    let request = aws.writing().await.ec2.detach_volume().volume_id(id).instance_id(instance_id).send();
    match aws.call("DetachVolume", format!("{id} from {instance_id}"), request).await {
        Ok(_) => Ok(()),
        Err(err) if err.is("IncorrectState") || err.is("InvalidAttachment.NotFound") => Ok(()),
        Err(err) => Err(err.into()),
    }
}

/// Deletes the volume; one already gone is success.
pub async fn delete(aws: &AwsClients, id: &str) -> Result<(), ProviderError> {
    match aws.call("DeleteVolume", id, aws.writing().await.ec2.delete_volume().volume_id(id).send()).await {
        Ok(_) => Ok(()),
        Err(err) if err.is("InvalidVolume.NotFound") => Ok(()),
        Err(err) => Err(err.into()),
    }
}
