//! EC2 key pairs: the public half of a KeyPair imported under a name, so
//! new instances accept it. The private key never leaves its Secret.

use aws_sdk_ec2::primitives::Blob;
use aws_sdk_ec2::types::{ResourceType, Tag, TagSpecification};

use super::{AwsClients, tags};
use crate::provider::{CloudKey, Owner, ProviderError};

/// The key pair named `name`, and whether it was created for `owner`.
pub async fn find(aws: &AwsClients, owner: &Owner, name: &str) -> Result<CloudKey, ProviderError> {
    if crate::fault::lookup_lags() {
        return Ok(CloudKey::Absent);
    }
    describe(aws, owner, name).await
}

async fn describe(aws: &AwsClients, owner: &Owner, name: &str) -> Result<CloudKey, ProviderError> {
    let request = aws.reading().await.ec2.describe_key_pairs().key_names(name).send();
    let out = match aws.call("DescribeKeyPairs", name, request).await {
        Ok(out) => out,
        Err(err) if err.is("InvalidKeyPair.NotFound") => return Ok(CloudKey::Absent),
        Err(err) => return Err(err.into()),
    };
    let ours = |k: &aws_sdk_ec2::types::KeyPairInfo| {
        k.tags().iter().any(|t| t.key() == Some(tags::UID) && t.value() == Some(owner.uid.as_str()))
    };
    Ok(match out.key_pairs() {
        [] => CloudKey::Absent,
        keys if keys.iter().any(ours) => CloudKey::Ours,
        _ => CloudKey::Other,
    })
}

/// Imports `public_key` as `name`, tagged with its owner in the same call.
pub async fn import(aws: &AwsClients, owner: &Owner, name: &str, public_key: &str) -> Result<(), ProviderError> {
    let mut spec = TagSpecification::builder().resource_type(ResourceType::KeyPair);
    for (k, v) in owner.tags("KeyPair") {
        spec = spec.tags(Tag::builder().key(k).value(v).build());
    }
    let request = aws
        .writing()
        .await
        .ec2
        .import_key_pair()
        .key_name(name)
        .public_key_material(Blob::new(public_key.as_bytes()))
        .tag_specifications(spec.build())
        .send();
    match aws.call("ImportKeyPair", name, request).await {
        Ok(_) => Ok(()),
        // Names are unique: the lookup before lagged, and the next one says whose it is.
        Err(err) if err.is("InvalidKeyPair.Duplicate") => Err(err.refused()),
        Err(err) => Err(err.into()),
    }
}

/// Deletes the key pair if this owner created it; one already gone is success.
pub async fn delete(aws: &AwsClients, owner: &Owner, name: &str) -> Result<(), ProviderError> {
    if describe(aws, owner, name).await? == CloudKey::Ours {
        match aws.call("DeleteKeyPair", name, aws.writing().await.ec2.delete_key_pair().key_name(name).send()).await {
            Ok(_) => {}
            Err(err) if err.is("InvalidKeyPair.NotFound") => {}
            Err(err) => return Err(err.into()),
        }
    }
    Ok(())
}
