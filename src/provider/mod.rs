//! Providers: where resources live. One small trait per resource kind, all
//! operations idempotent; the controllers pick an implementation from the
//! [`Providers`] registry by the provider block a spec sets.

pub mod aws;
pub mod existing;

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;

use crate::api::machine::{MachineAddress, MachineProvider as MachineProviderSpec};

/// Errors providers return, classified for the controllers.
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    /// Worth retrying with backoff (timeouts, throttling, connection resets).
    #[error("{0}")]
    Transient(String),
    /// Needs a change to the spec or the environment; becomes Stalled.
    #[error("{message}")]
    Permanent { reason: &'static str, message: String },
}

impl ProviderError {
    pub fn permanent(reason: &'static str, message: impl Into<String>) -> Self {
        Self::Permanent { reason, message: message.into() }
    }
}

/// Identity of the object a provider acts for; cloud resources are tagged
/// with it so they can be found again after a crash.
#[derive(Clone, Debug)]
pub struct Owner {
    pub namespace: String,
    pub name: String,
    pub uid: String,
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

/// Provisions machines.
#[async_trait]
pub trait MachineProvider: Send + Sync {
    /// The provider block this implements (`existing`, `ec2`, …).
    fn name(&self) -> &'static str;
    /// The machine if it exists.
    async fn observe(&self, target: &MachineTarget) -> Result<Option<Instance>, ProviderError>;
    /// Creates the machine; called only when `observe` found none.
    async fn create(&self, target: &MachineTarget) -> Result<Instance, ProviderError>;
    /// Converges an existing machine (start/stop, tags); returns it as it now is.
    async fn update(&self, target: &MachineTarget, current: Instance) -> Result<Instance, ProviderError>;
    /// Deletes the machine; a machine already gone is success.
    async fn delete(&self, target: &MachineTarget) -> Result<(), ProviderError>;
}

/// The providers this process can use, by provider block name.
#[derive(Clone, Default)]
pub struct Providers {
    machines: BTreeMap<&'static str, Arc<dyn MachineProvider>>,
}

impl Providers {
    /// Every provider this build has: existing hosts, and EC2 through `accounts`.
    pub fn builtin(accounts: aws::AwsAccounts) -> Self {
        let mut providers = Self::default();
        providers.add_machine_provider(Arc::new(existing::ExistingHosts));
        providers.add_machine_provider(aws::ec2::Ec2Machines::new(accounts));
        providers
    }

    pub fn add_machine_provider(&mut self, provider: Arc<dyn MachineProvider>) {
        self.machines.insert(provider.name(), provider);
    }

    /// The provider for `spec`, or a Stalled-worthy error naming the field.
    pub fn machine(&self, spec: &MachineProviderSpec) -> Result<Arc<dyn MachineProvider>, ProviderError> {
        let kind = spec.kind().ok_or_else(|| {
            ProviderError::permanent("NoProvider", "spec.provider sets no provider block; set existing or ec2")
        })?;
        self.machines.get(kind).cloned().ok_or_else(|| {
            ProviderError::permanent(
                "ProviderUnavailable",
                format!(
                    "spec.provider.{kind}: this operator has no {kind} provider (available: {}); \
                     use another provider block or run an operator build with {kind} support",
                    self.machines.keys().copied().collect::<Vec<_>>().join(", ")
                ),
            )
        })
    }
}
