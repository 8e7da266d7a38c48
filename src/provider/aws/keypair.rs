//! EC2 key pairs: the public half of a KeyPair imported under a name, so
//! new instances accept it. The private key never leaves its Secret.

use aws_sdk_ec2::primitives::Blob;
use aws_sdk_ec2::types::{ResourceType, Tag, TagSpecification};

use super::{AwsClients, classify, error_code, owner_tags, tags};
use crate::provider::{Owner, ProviderError};

/// Imports `public_key` as `name` unless it is there already. A key of that
/// name that another owner created is an error naming the field to change,
/// unless `adopt` (the external-name annotation names it).
pub async fn ensure(
    aws: &AwsClients,
    owner: &Owner,
    name: &str,
    public_key: &str,
    adopt: bool,
) -> Result<bool, ProviderError> {
    match aws.reading().await.ec2.describe_key_pairs().key_names(name).send().await {
        Ok(out) => {
            let ours = out
                .key_pairs()
                .iter()
                .any(|k| k.tags().iter().any(|t| t.key() == Some(tags::UID) && t.value() == Some(owner.uid.as_str())));
            if ours || adopt {
                return Ok(false);
            }
            return Err(ProviderError::permanent(
                "KeyNameTaken",
                format!(
                    "an EC2 key pair named {name} exists and was not created for this KeyPair; set spec.provider.ec2.keyName to another name"
                ),
            ));
        }
        Err(err) if error_code(&err) == Some("InvalidKeyPair.NotFound") => {}
        Err(err) => return Err(classify(err, "DescribeKeyPairs")),
    }
    let mut spec = TagSpecification::builder().resource_type(ResourceType::KeyPair);
    for (k, v) in owner_tags(owner, "KeyPair") {
        spec = spec.tags(Tag::builder().key(k).value(v).build());
    }
    aws.writing()
        .await
        .ec2
        .import_key_pair()
        .key_name(name)
        .public_key_material(Blob::new(public_key.as_bytes()))
        .tag_specifications(spec.build())
        .send()
        .await
        .map_err(|e| classify(e, &format!("ImportKeyPair {name}")))?;
    Ok(true)
}

/// Deletes the key pair if this owner created it; one already gone is success.
pub async fn delete(aws: &AwsClients, owner: &Owner, name: &str) -> Result<(), ProviderError> {
    let out = match aws.reading().await.ec2.describe_key_pairs().key_names(name).send().await {
        Ok(out) => out,
        Err(err) if error_code(&err) == Some("InvalidKeyPair.NotFound") => return Ok(()),
        Err(err) => return Err(classify(err, "DescribeKeyPairs")),
    };
    let ours = out
        .key_pairs()
        .iter()
        .any(|k| k.tags().iter().any(|t| t.key() == Some(tags::UID) && t.value() == Some(owner.uid.as_str())));
    if ours {
        aws.writing()
            .await
            .ec2
            .delete_key_pair()
            .key_name(name)
            .send()
            .await
            .map_err(|e| classify(e, &format!("DeleteKeyPair {name}")))?;
    }
    Ok(())
}

/// Whether a key pair of that name exists.
pub async fn exists(aws: &AwsClients, name: &str) -> Result<bool, ProviderError> {
    match aws.reading().await.ec2.describe_key_pairs().key_names(name).send().await {
        Ok(out) => Ok(!out.key_pairs().is_empty()),
        Err(err) if error_code(&err) == Some("InvalidKeyPair.NotFound") => Ok(false),
        Err(err) => Err(classify(err, "DescribeKeyPairs")),
    }
}
