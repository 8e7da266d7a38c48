//! The AWS implementations of the per-kind provider traits: each resolves
//! the account from the target's Network and calls the module for its
//! resource (ebs, s3, vpc, keypair).

use async_trait::async_trait;

use super::{AwsAccounts, AwsClients, ebs, keypair, s3, snapshot, vpc};
use crate::api::volume::VolumeProvider as VolumeSpec;
use crate::provider::{
    BucketHolder, BucketProvider, BucketSpec, CloudKey, CloudTarget, KeyPairProvider, NetworkPart, NetworkProvider,
    NetworkResources, NetworkState, ProviderError, SnapshotState, VolumeProvider, VolumeState,
};

/// Amazon Web Services for volumes, buckets, networks and key pairs.
pub struct Aws {
    accounts: AwsAccounts,
}

impl Aws {
    pub fn new(accounts: AwsAccounts) -> Self {
        Self { accounts }
    }

    async fn clients(&self, target: &CloudTarget) -> Result<std::sync::Arc<AwsClients>, ProviderError> {
        self.accounts.for_network(&target.network).await
    }
}

fn ec2_network(target: &CloudTarget) -> Result<&crate::api::network::Ec2Network, ProviderError> {
    target
        .network
        .spec
        .provider
        .as_ref()
        .and_then(|p| p.ec2.as_ref())
        .ok_or_else(|| ProviderError::permanent("NoProvider", "spec.provider.ec2 is not set"))
}

fn ebs_spec(spec: &VolumeSpec) -> Result<&crate::api::volume::EbsVolume, ProviderError> {
    spec.ec2.as_ref().ok_or_else(|| ProviderError::permanent("NoProvider", "spec.provider.ec2 is not set"))
}

#[async_trait]
impl VolumeProvider for Aws {
    fn name(&self) -> &'static str {
        "ec2"
    }

    fn noun(&self) -> &'static str {
        "EBS volume"
    }

    fn machine_id<'a>(&self, provider_id: &'a str) -> Option<&'a str> {
        instance_id(provider_id)
    }

    async fn find(&self, target: &CloudTarget, id: Option<&str>) -> Result<Option<VolumeState>, ProviderError> {
        ebs::find(&*self.clients(target).await?, &target.owner, id).await
    }

    async fn create(&self, target: &CloudTarget, spec: &VolumeSpec) -> Result<VolumeState, ProviderError> {
        ebs::create(&*self.clients(target).await?, &target.owner, ebs_spec(spec)?).await
    }

    fn needs_update(&self, spec: &VolumeSpec, current: &VolumeState) -> bool {
        let Some(spec) = spec.ec2.as_ref() else { return false };
        let want_type = ebs::type_name(spec.volume_type);
        spec.size_gib.is_some_and(|s| s > current.size_gib)
            || current.volume_type.as_deref() != Some(want_type.as_str())
            || (spec.iops.is_some() && spec.iops != current.iops)
            || (spec.throughput.is_some() && spec.throughput != current.throughput)
    }

    async fn update(&self, target: &CloudTarget, id: &str, spec: &VolumeSpec) -> Result<(), ProviderError> {
        ebs::modify(&*self.clients(target).await?, id, ebs_spec(spec)?).await
    }

    async fn attach(&self, target: &CloudTarget, id: &str, instance: &str, device: &str) -> Result<(), ProviderError> {
        ebs::attach(&*self.clients(target).await?, id, instance, device).await
    }

    async fn detach(&self, target: &CloudTarget, id: &str, instance: &str) -> Result<(), ProviderError> {
        ebs::detach(&*self.clients(target).await?, id, instance).await
    }

    async fn delete(&self, target: &CloudTarget, id: &str) -> Result<(), ProviderError> {
        ebs::delete(&*self.clients(target).await?, id).await
    }

    async fn snapshots(&self, target: &CloudTarget) -> Result<Vec<SnapshotState>, ProviderError> {
        snapshot::find(&*self.clients(target).await?, &target.owner).await
    }

    async fn create_snapshot(
        &self,
        target: &CloudTarget,
        id: &str,
        volume: &str,
    ) -> Result<SnapshotState, ProviderError> {
        snapshot::create(&*self.clients(target).await?, &target.owner, id, volume).await
    }

    async fn delete_snapshot(&self, target: &CloudTarget, id: &str) -> Result<(), ProviderError> {
        snapshot::delete(&*self.clients(target).await?, id).await
    }
}

#[async_trait]
impl BucketProvider for Aws {
    fn name(&self) -> &'static str {
        "ec2"
    }

    fn location(&self, target: &CloudTarget, bucket: &str) -> (String, String) {
        let region = target
            .network
            .spec
            .provider
            .as_ref()
            .and_then(|p| p.ec2.as_ref())
            .map(|e| e.region.clone())
            .unwrap_or_default();
        (region, format!("arn:aws:s3:::{bucket}"))
    }

    async fn holder(&self, target: &CloudTarget, bucket: &str) -> Result<BucketHolder, ProviderError> {
        s3::holder(&*self.clients(target).await?, bucket).await
    }

    async fn create(&self, target: &CloudTarget, spec: &BucketSpec<'_>) -> Result<(), ProviderError> {
        s3::create(&*self.clients(target).await?, spec).await
    }

    async fn converge(&self, target: &CloudTarget, spec: &BucketSpec<'_>) -> Result<Vec<&'static str>, ProviderError> {
        s3::converge(&*self.clients(target).await?, spec).await
    }

    async fn object_count(&self, target: &CloudTarget, bucket: &str) -> Result<usize, ProviderError> {
        s3::object_count(&*self.clients(target).await?, bucket).await
    }

    async fn delete(&self, target: &CloudTarget, bucket: &str, force: bool) -> Result<(), ProviderError> {
        s3::delete(&*self.clients(target).await?, bucket, force).await
    }
}

#[async_trait]
impl NetworkProvider for Aws {
    fn name(&self) -> &'static str {
        "ec2"
    }

    async fn find(&self, target: &CloudTarget, known: Option<&str>) -> Result<Option<String>, ProviderError> {
        vpc::find_vpc(&*self.clients(target).await?, &target.owner, known).await
    }

    async fn ensure(&self, target: &CloudTarget, known: Option<&str>) -> Result<NetworkState, ProviderError> {
        let spec = vpc::with_mesh_port(ec2_network(target)?, target.network.spec.mesh.as_ref());
        vpc::ensure(&*self.clients(target).await?, &target.owner, &spec, known).await
    }

    async fn create(
        &self,
        target: &CloudTarget,
        part: &NetworkPart,
        found: &NetworkResources,
    ) -> Result<String, ProviderError> {
        vpc::create(&*self.clients(target).await?, &target.owner, ec2_network(target)?, part, found).await
    }

    async fn delete(&self, target: &CloudTarget, known: Option<&str>) -> Result<(), ProviderError> {
        vpc::delete(&*self.clients(target).await?, &target.owner, known).await
    }
}

#[async_trait]
impl KeyPairProvider for Aws {
    fn name(&self) -> &'static str {
        "ec2"
    }

    async fn find(&self, target: &CloudTarget, key_name: &str) -> Result<CloudKey, ProviderError> {
        keypair::find(&*self.clients(target).await?, &target.owner, key_name).await
    }

    async fn import(&self, target: &CloudTarget, key_name: &str, public_key: &str) -> Result<(), ProviderError> {
        keypair::import(&*self.clients(target).await?, &target.owner, key_name, public_key).await
    }

    async fn delete(&self, target: &CloudTarget, key_name: &str) -> Result<(), ProviderError> {
        keypair::delete(&*self.clients(target).await?, &target.owner, key_name).await
    }
}

/// The instance ID in a providerID such as aws:///eu-west-1a/i-0abc.
fn instance_id(provider_id: &str) -> Option<&str> {
    provider_id.strip_prefix("aws:///")?.rsplit('/').next().filter(|id| id.starts_with("i-"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn provider_ids_give_instance_ids() {
        use super::instance_id;
        assert_eq!(instance_id("aws:///eu-west-1a/i-0abc123"), Some("i-0abc123"));
        assert_eq!(instance_id("gce://p/z/n"), None, "a machine of another provider");
        assert_eq!(instance_id("aws:///eu-west-1a/"), None);
    }
}
