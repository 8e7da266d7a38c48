//! The `existing` provider: hosts that already run NixOS. Nothing is created
//! or deleted; the machine "exists" at the address the spec gives, and the
//! controller's SSH probe decides whether it is provisioned.

use async_trait::async_trait;

use super::{Instance, InstanceState, MachineProvider, MachineTarget, ProviderError};
use crate::api::machine::MachineAddress;

/// Provider for `spec.provider.existing`.
pub struct ExistingHosts;

impl ExistingHosts {
    fn instance(target: &MachineTarget) -> Result<Instance, ProviderError> {
        let host = target
            .provider
            .existing
            .as_ref()
            .ok_or_else(|| ProviderError::permanent("NoProvider", "spec.provider.existing is not set"))?;
        let port = u16::try_from(host.port).map_err(|_| {
            ProviderError::permanent(
                "InvalidPort",
                format!("spec.provider.existing.port {} is not a TCP port", host.port),
            )
        })?;
        let address_type = if host.host.parse::<std::net::IpAddr>().is_ok() { "ExternalIP" } else { "Hostname" };
        Ok(Instance {
            provider_id: None,
            addresses: vec![MachineAddress { address_type: address_type.into(), address: host.host.clone() }],
            ssh_host: host.host.clone(),
            ssh_port: port,
            state: InstanceState::Running,
            host_key: None,
            restart_pending: None,
        })
    }
}

#[async_trait]
impl MachineProvider for ExistingHosts {
    fn name(&self) -> &'static str {
        "existing"
    }

    async fn observe(&self, target: &MachineTarget) -> Result<Option<Instance>, ProviderError> {
        Self::instance(target).map(Some)
    }

    async fn create(&self, target: &MachineTarget) -> Result<Instance, ProviderError> {
        Self::instance(target)
    }

    async fn update(&self, target: &MachineTarget, _current: Instance) -> Result<Instance, ProviderError> {
        Self::instance(target)
    }

    async fn delete(&self, _target: &MachineTarget) -> Result<(), ProviderError> {
        // An existing host is never ours to delete.
        Ok(())
    }
}
