//! Network controller: publishes membership, and (with a cloud provider)
//! owns the physical network. Deletion waits until no Machine uses it.

use std::sync::Arc;

use kube::api::{Api, ListParams};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{Controller, watcher};
use kube::{Client, ResourceExt};

use super::status::{Conditions, is_true};
use super::{Cleanup, Context, Error, Outcome, Reconciler, Result, object_status};
use crate::api::machine::Machine;
use crate::api::network::{NetworkMember, NetworkStatus, ResourcePhase};
use crate::api::{Network, condition};

object_status!(NetworkStatus, ResourcePhase, failed = ResourcePhase::Failed, deleting = ResourcePhase::Deleting);

impl Reconciler for Network {
    type Status = NetworkStatus;
    const KIND: &'static str = "Network";

    fn status(&self) -> Option<&NetworkStatus> {
        self.status.as_ref()
    }

    async fn apply(self: Arc<Self>, ctx: Arc<Context>, mut status: NetworkStatus) -> Result<Outcome<NetworkStatus>> {
        if let Some(provider) = &self.spec.provider
            && provider.ec2.is_some()
        {
            return Err(Error::stalled(
                "ProviderUnavailable",
                "spec.provider.ec2: this operator has no ec2 network provider; remove spec.provider for a network of existing hosts",
            ));
        }
        let members = members(&ctx.client, &self).await?;
        let ready = members
            .iter()
            .filter(|m| m.status.as_ref().is_some_and(|s| is_true(&s.conditions, condition::READY)))
            .count();

        status.provider = None;
        status.machines = Some(members.len() as i32);
        status.ready_machines = Some(ready as i32);
        status.members = members
            .iter()
            .map(|m| {
                let s = m.status.clone().unwrap_or_default();
                NetworkMember { name: m.name_any(), addresses: s.addresses, host_key: s.host_key }
            })
            .collect();
        status.phase = Some(ResourcePhase::Ready);
        Conditions::new(&mut status.conditions, self.metadata.generation)
            .ready("Ready", format!("{} machines, {ready} ready", members.len()));
        Ok(Outcome { status, requeue: None })
    }

    async fn cleanup(self: Arc<Self>, ctx: Arc<Context>) -> Result<Cleanup> {
        let members = members(&ctx.client, &self).await?;
        if !members.is_empty() {
            let names: Vec<String> = members.iter().map(|m| m.name_any()).collect();
            return Ok(Cleanup::Wait {
                reason: "MachinesRemain",
                message: format!(
                    "waiting for {} machine(s) of this Network to be deleted first: {}",
                    names.len(),
                    names.join(", ")
                ),
            });
        }
        Ok(Cleanup::Done)
    }
}

/// Machines in the Network's namespace whose spec.networkRef names it, sorted by name.
async fn members(client: &Client, network: &Network) -> Result<Vec<Machine>> {
    let ns = network.namespace().unwrap_or_default();
    let api: Api<Machine> = Api::namespaced(client.clone(), &ns);
    let mut machines: Vec<Machine> = api
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter(|m| m.spec.network_ref.name == network.name_any())
        .collect();
    machines.sort_by_key(|m| m.name_any());
    Ok(machines)
}

/// The Network controller; Machines changing wake their Network.
pub fn controller(networks: Api<Network>, machines: Api<Machine>, wc: watcher::Config) -> Controller<Network> {
    Controller::new(networks, wc.clone()).watches(machines, wc, |machine| {
        Some(ObjectRef::new(&machine.spec.network_ref.name).within(&machine.namespace().unwrap_or_default()))
    })
}
