//! Network controller: publishes membership, and (with a cloud provider)
//! owns the physical network. Deletion waits until no Machine uses it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::Controller;
use kube::runtime::reflector::ObjectRef;

use super::deploy;
use super::shared::SharedWatch;
use super::status::{Conditions, is_true};
use super::{Cleanup, Context, Error, Reconciler, Result, object_status, record_external_name};
use crate::api::machine::Machine;
use crate::api::network::{NetworkMember, NetworkStatus, ResourcePhase};
use crate::api::{DeletionPolicy, EXTERNAL_NAME_ANNOTATION, ManagementPolicy, Network, condition};
use crate::provider::{CloudTarget, NetworkResources, Owner};
use kube::runtime::events::EventType;

/// Condition: every member runs its desired closure (or why not).
pub const ROLLOUT: &str = "RolledOut";

object_status!(NetworkStatus, failed = ResourcePhase::Failed, deleting = ResourcePhase::Deleting);

impl Reconciler for Network {
    type Status = NetworkStatus;
    const KIND: &'static str = "Network";

    fn status(&self) -> Option<&NetworkStatus> {
        self.status.as_ref()
    }

    async fn apply(self: Arc<Self>, ctx: Arc<Context>, status: &mut NetworkStatus) -> Result<Option<Duration>> {
        let owner = Owner::of(&*self);
        if let Some(ec2) = self.spec.provider.as_ref().and_then(|p| p.ec2.as_ref()) {
            let provider = ctx.providers.network("ec2")?;
            let target = CloudTarget { owner: owner.clone(), network: (*self).clone() };
            let known = self.annotations().get(EXTERNAL_NAME_ANNOTATION).cloned();
            let resources = if self.spec.management_policy == ManagementPolicy::Observe {
                let id = known.clone().ok_or_else(|| {
                    Error::stalled("ExternalNameRequired", format!("spec.managementPolicy Observe needs the {EXTERNAL_NAME_ANNOTATION} annotation naming the VPC (vpc-…)"))
                })?;
                let found = provider.find(&target, Some(&id)).await?.ok_or_else(|| {
                    Error::stalled(
                        "VpcNotFound",
                        format!("VPC {id} named by the {EXTERNAL_NAME_ANNOTATION} annotation does not exist"),
                    )
                })?;
                NetworkResources { vpc_id: found, ..Default::default() }
            } else {
                let ensured = provider.ensure(&target, known.as_deref()).await;
                ctx.metrics.provider_call(provider.name(), "ensure", ensured.is_ok());
                ensured?
            };
            if self.annotations().get(EXTERNAL_NAME_ANNOTATION) != Some(&resources.vpc_id) {
                let api = Api::<Network>::namespaced(ctx.client.clone(), &owner.namespace);
                record_external_name(&api, &self, &resources.vpc_id).await?;
                ctx.event(
                    &*self,
                    EventType::Normal,
                    "Provisioned",
                    format!("VPC {} in {}", resources.vpc_id, ec2.region),
                )
                .await;
            }
            status.provider = Some("ec2".into());
            status.vpc_id = Some(resources.vpc_id);
            status.subnets = resources.subnets;
            status.internet_gateway_id = resources.internet_gateway_id;
            status.security_group_id = resources.security_group_id;
        } else {
            status.provider = None;
        }
        let members = ctx.stores.members(&owner.namespace, &self.name_any()).await?;
        let ready = members
            .iter()
            .filter(|m| m.status.as_ref().is_some_and(|s| is_true(&s.conditions, condition::READY)))
            .count();

        let updated = members.iter().filter(|m| deploy::is_up_to_date(m)).count();
        let failed: Vec<String> = members.iter().filter(|m| deploy::deploy_failed(m)).map(|m| m.name_any()).collect();

        status.machines = Some(members.len() as i32);
        status.ready_machines = Some(ready as i32);
        status.updated_machines = Some(updated as i32);
        status.members = members
            .iter()
            .map(|m| {
                let s = m.status.clone().unwrap_or_default();
                NetworkMember { name: m.name_any(), addresses: s.addresses, host_key: s.host_key }
            })
            .collect();
        status.phase = Some(ResourcePhase::Ready);
        let summary = format!("{} machines, {ready} ready, {updated} on their desired closure", members.len());
        let mut conds = Conditions::new(&mut status.conditions, self.metadata.generation);
        conds.ready("Ready", summary.clone());
        if failed.is_empty() {
            let rolling = updated < members.len();
            conds.set(ROLLOUT, !rolling, if rolling { "RollingOut" } else { "RolledOut" }, summary);
        } else {
            conds.set(
                ROLLOUT,
                false,
                "RolloutHalted",
                format!(
                    "halted: {} failed to deploy; the other machines stay on their current system",
                    failed.join(", ")
                ),
            );
        }
        Ok(None)
    }

    async fn cleanup(self: Arc<Self>, ctx: Arc<Context>) -> Result<Cleanup> {
        // Everything that uses this Network's account or VPC goes first:
        // deleted after it, a volume, key pair or bucket could no longer be
        // cleaned up and would leak.
        let ns = self.namespace().unwrap_or_default();
        let members = ctx.stores.members(&ns, &self.name_any()).await?;
        let dependents = ctx.stores.network_dependents(&ns, &self.name_any()).await?;
        if !members.is_empty() || !dependents.is_empty() {
            let names: Vec<String> =
                members.iter().map(|m| format!("Machine {}", m.name_any())).chain(dependents).collect();
            let reason = if members.is_empty() { "DependentsRemain" } else { "MachinesRemain" };
            return Ok(Cleanup::Wait {
                reason,
                message: format!(
                    "waiting for {} object(s) using this Network to be deleted first: {}",
                    names.len(),
                    names.join(", ")
                ),
            });
        }
        if self.spec.deletion_policy == DeletionPolicy::Delete
            && self.spec.management_policy != ManagementPolicy::Observe
            && let Some(_) = self.spec.provider.as_ref().and_then(|p| p.ec2.as_ref())
        {
            let owner = Owner::of(&*self);
            let provider = ctx.providers.network("ec2")?;
            let target = CloudTarget { owner, network: (*self).clone() };
            let known = self.annotations().get(EXTERNAL_NAME_ANNOTATION).cloned();
            let deleted = provider.delete(&target, known.as_deref()).await;
            ctx.metrics.provider_call(provider.name(), "delete", deleted.is_ok());
            deleted?;
        }
        Ok(Cleanup::Done)
    }
}

/// The Network controller. A Machine wakes its Network only when what the
/// Network publishes about it changes (membership, addresses, host key,
/// readiness), not on every status write.
///
/// Every trigger comes from a shared watch (see [`super::shared`]), whose
/// store the reconcile reads: a Network woken by a Machine sees that change.
pub fn controller(
    networks: &mut SharedWatch<Network>,
    machines: &mut SharedWatch<Machine>,
    volumes: &mut SharedWatch<crate::api::Volume>,
    keypairs: &mut SharedWatch<crate::api::KeyPair>,
    buckets: &mut SharedWatch<crate::api::S3Bucket>,
) -> Controller<Network> {
    // A dependent being deleted lets a Network that waits for it go on.
    fn leaving(meta: &kube::api::ObjectMeta, network: Option<&str>) -> Option<ObjectRef<Network>> {
        meta.deletion_timestamp.as_ref()?;
        Some(ObjectRef::new(network?).within(meta.namespace.as_deref().unwrap_or_default()))
    }
    let seen = Mutex::new(HashMap::<String, String>::new());
    // A Network's own status writes (every member change makes one) wake
    // nothing: only what the reconcile reads from the object itself does.
    let own = Mutex::new(HashMap::<String, String>::new());
    let changed = move |network: &Network| {
        let m = &network.metadata;
        let projection = format!(
            "{:?}|{:?}|{:?}|{:?}|{:?}",
            m.generation, m.annotations, m.labels, m.finalizers, m.deletion_timestamp
        );
        let mut own = own.lock().unwrap_or_else(|e| e.into_inner());
        own.insert(super::object_key(network), projection.clone()).as_ref() != Some(&projection)
    };
    let triggers = networks.applied().filter(move |n| std::future::ready(n.as_ref().map_or(true, &changed)));
    Controller::for_stream(triggers, networks.store())
        .watches_stream(volumes.touched(), |v| leaving(&v.metadata, Some(&v.spec.network_ref.name)))
        .watches_stream(keypairs.touched(), |k| {
            leaving(&k.metadata, k.spec.network_ref.as_ref().map(|r| r.name.as_str()))
        })
        .watches_stream(buckets.touched(), |b| leaving(&b.metadata, Some(&b.spec.network_ref.name)))
        .watches_stream(machines.touched(), move |machine| {
            let status = machine.status.clone().unwrap_or_default();
            // The finalizers are part of it: their removal is the Machine leaving
            // (its last event), which must reach the Network at once.
            let projection = format!(
                "{}|{:?}|{:?}|{}|{}|{}",
                machine.spec.network_ref.name,
                status.addresses,
                status.host_key,
                is_true(&status.conditions, condition::READY),
                machine.metadata.deletion_timestamp.is_some(),
                machine.metadata.finalizers.as_ref().map_or(0, Vec::len),
            );
            let mut seen = seen.lock().unwrap_or_else(|e| e.into_inner());
            let gone = machine.metadata.deletion_timestamp.is_some()
                && machine.metadata.finalizers.as_ref().is_none_or(Vec::is_empty);
            if gone {
                seen.remove(&super::object_key(&machine));
            } else if seen.insert(super::object_key(&machine), projection.clone()).as_ref() == Some(&projection) {
                return None;
            }
            Some(ObjectRef::new(&machine.spec.network_ref.name).within(&machine.namespace().unwrap_or_default()))
        })
}
