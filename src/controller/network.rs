//! Network controller: publishes membership, and (with a cloud provider)
//! owns the physical network. Deletion waits until no Machine uses it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::Controller;
use kube::runtime::reflector::ObjectRef;
use kube::{Client, ResourceExt};

use super::deploy;
use super::shared::SharedWatch;
use super::status::{Conditions, is_true};
use super::{
    Cleanup, Context, Error, PendingCreate, Reconciler, Result, create_part_once, object_status, record_external_name,
};
use crate::api::machine::Machine;
use crate::api::network::{NetworkMember, NetworkStatus, ResourcePhase};
use crate::api::{
    CLOUD_DELETED_ANNOTATION, CREDENTIALS_FINALIZER_PREFIX, DeletionPolicy, EXTERNAL_NAME_ANNOTATION, ManagementPolicy,
    Network, condition,
};
use crate::provider::{CloudTarget, NetworkProvider, NetworkResources, Owner, ProviderError};
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
        // Held before anything is created with it, released once unnamed.
        let named = credentials_secret(&self);
        if let Some(secret) = named {
            hold_credentials(&ctx.client, &self, secret).await?;
        }
        if let Some(held) = held_credentials(&ctx, &self, status.credentials_secret.as_deref()).await?
            && Some(held.as_str()) != named
        {
            release_credentials(&ctx.client, &self, &held).await?;
        }
        status.credentials_secret = named.map(str::to_owned);
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
                let announce = |r: &NetworkResources| format!("VPC {} in {}", r.vpc_id, ec2.region);
                provision_announced(&self, &ctx, &*provider, &target, known.as_deref(), announce).await?
            };
            status.provider = Some("ec2".into());
            status.vpc_id = Some(resources.vpc_id);
            status.subnets = resources.subnets;
            status.internet_gateway_id = resources.internet_gateway_id;
            status.security_group_id = resources.security_group_id;
        } else if let Some(libvirt) = self.spec.provider.as_ref().and_then(|p| p.libvirt.as_ref()) {
            let provider = ctx.providers.network("libvirt")?;
            let target = CloudTarget { owner: owner.clone(), network: (*self).clone() };
            let known = self.annotations().get(EXTERNAL_NAME_ANNOTATION).cloned();
            let name = if self.spec.management_policy == ManagementPolicy::Observe {
                provider.find(&target, known.as_deref()).await?.ok_or_else(|| {
                    Error::stalled(
                        "NetworkNotFound",
                        format!(
                            "spec.managementPolicy Observe: the hypervisor has no libvirt network named by the {EXTERNAL_NAME_ANNOTATION} annotation (or, without it, with this Network's UID as its UUID)"
                        ),
                    )
                })?
            } else {
                let announce = |r: &NetworkResources| {
                    format!("libvirt network {} ({}) on {}", r.vpc_id, libvirt.cidr, libvirt.uri)
                };
                provision_announced(&self, &ctx, &*provider, &target, known.as_deref(), announce).await?.vpc_id
            };
            status.provider = Some("libvirt".into());
            status.vpc_id = Some(name);
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
        let mesh = super::mesh::converge_keys(&self, &ctx, &members, &status.members).await?;
        status.members = members
            .iter()
            .map(|m| {
                let s = m.status.clone().unwrap_or_default();
                let meshed = mesh.get(&m.name_any());
                NetworkMember {
                    name: m.name_any(),
                    addresses: s.addresses,
                    host_key: s.host_key,
                    mesh_address: meshed.map(|k| k.address.to_string()),
                    mesh_key: meshed.map(|k| k.public_key.clone()),
                }
            })
            .collect();
        let mesh_ready = members
            .iter()
            .filter(|m| m.status.as_ref().is_some_and(|s| is_true(&s.conditions, super::mesh::MESH_READY)))
            .count();
        status.phase = Some(ResourcePhase::Ready);
        let summary = format!("{} machines, {ready} ready, {updated} on their desired closure", members.len());
        let mut conds = Conditions::new(&mut status.conditions, self.metadata.generation);
        conds.ready("Ready", summary.clone());
        if super::mesh::mesh_of(&self).is_some() {
            let all = mesh_ready == members.len() && !members.is_empty();
            let message =
                format!("{mesh_ready} of {} members have handshaken with all their peers recently", members.len());
            conds.set(super::mesh::MESH_READY, all, if all { "Handshaken" } else { "WaitingForHandshake" }, message);
        } else {
            conds.remove(super::mesh::MESH_READY);
        }
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
            && let Some(kind) = self.spec.provider.as_ref().and_then(|p| p.kind())
            && !self.annotations().contains_key(CLOUD_DELETED_ANNOTATION)
        {
            let owner = Owner::of(&*self);
            let provider = ctx.providers.network(kind)?;
            let target = CloudTarget { owner, network: (*self).clone() };
            // The VPC found last, if the annotation was not written yet: a
            // lookup by tag that lags would leave it behind.
            let known = self
                .annotations()
                .get(EXTERNAL_NAME_ANNOTATION)
                .cloned()
                .or_else(|| self.status.as_ref().and_then(|s| s.vpc_id.clone()));
            provider.delete(&target, known.as_deref()).await?;
        }
        // The credentials go last. Marked first: a crash after the release
        // must not leave a cleanup that needs a Secret already deleted.
        let held = held_credentials(&ctx, &self, None).await?;
        let mut secrets: Vec<&str> = credentials_secret(&self).into_iter().chain(held.as_deref()).collect();
        secrets.dedup();
        if !secrets.is_empty() {
            if !self.annotations().contains_key(CLOUD_DELETED_ANNOTATION) {
                let api = Api::<Network>::namespaced(ctx.client.clone(), &self.namespace().unwrap_or_default());
                let patch = serde_json::json!({"metadata": {"annotations": {CLOUD_DELETED_ANNOTATION: "true"}}});
                api.patch(&self.name_any(), &PatchParams::default(), &Patch::Merge(&patch)).await?;
            }
            for secret in secrets {
                release_credentials(&ctx.client, &self, secret).await?;
            }
            crate::fault::point(crate::fault::points::NETWORK_AFTER_CREDENTIALS_RELEASED, None).await;
        }
        Ok(Cleanup::Done)
    }
}

/// The credentials Secret the Network's spec names.
fn credentials_secret(network: &Network) -> Option<&str> {
    let provider = network.spec.provider.as_ref()?;
    match (&provider.ec2, &provider.libvirt) {
        (Some(ec2), _) => Some(ec2.credentials_secret_ref.as_ref()?.name.as_str()),
        (None, Some(libvirt)) => Some(libvirt.ssh.as_ref()?.credentials_secret_ref.name.as_str()),
        (None, None) => None,
    }
}

/// The credentials Secret `network` holds, as its status records it.
/// `recorded` is the watched copy's; when that differs from what the spec
/// names (a change about to be made), the stored object is read, since the
/// watched copy may not show this Network's own last status write yet,
/// and a hold it misses would never be released. None for `recorded`
/// always reads the stored object.
async fn held_credentials(ctx: &Context, network: &Network, recorded: Option<&str>) -> Result<Option<String>> {
    if recorded.is_some() && recorded == credentials_secret(network) {
        return Ok(recorded.map(str::to_owned));
    }
    let api = Api::<Network>::namespaced(ctx.client.clone(), &network.namespace().unwrap_or_default());
    let stored = api.get_opt(&network.name_any()).await?;
    Ok(stored.and_then(|n| n.status?.credentials_secret).or_else(|| recorded.map(str::to_owned)))
}

/// The finalizer `network` keeps on its credentials Secret.
fn credentials_finalizer(network: &Network) -> String {
    format!("{CREDENTIALS_FINALIZER_PREFIX}{}", network.uid().unwrap_or_default())
}

/// Keeps Secret `name` from being deleted until `network` releases it: a
/// namespace being deleted removes Secrets as early as anything else, and
/// without credentials the cloud resources could never be deleted. A Secret
/// that is missing is reported by the provider; one already being deleted
/// takes no new finalizers.
async fn hold_credentials(client: &Client, network: &Network, name: &str) -> Result<()> {
    let api: Api<Secret> = Api::namespaced(client.clone(), &network.namespace().unwrap_or_default());
    let Some(secret) = api.get_opt(name).await? else { return Ok(()) };
    let finalizer = credentials_finalizer(network);
    if secret.metadata.deletion_timestamp.is_some() || secret.finalizers().contains(&finalizer) {
        return Ok(());
    }
    // A strategic merge adds to the list without replacing others' finalizers.
    let patch = serde_json::json!({"metadata": {"finalizers": [finalizer]}});
    api.patch(name, &PatchParams::default(), &Patch::Strategic(&patch)).await?;
    Ok(())
}

/// Removes `network`'s finalizer from Secret `name`, if both are there.
async fn release_credentials(client: &Client, network: &Network, name: &str) -> Result<()> {
    let api: Api<Secret> = Api::namespaced(client.clone(), &network.namespace().unwrap_or_default());
    let patch =
        serde_json::json!({"metadata": {"$deleteFromPrimitiveList/finalizers": [credentials_finalizer(network)]}});
    match api.patch(name, &PatchParams::default(), &Patch::Strategic(&patch)).await {
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        other => other.map(drop).map_err(Into::into),
    }
}

/// [`provision`], with a `Provisioned` event saying `announce` when the
/// network is new (its ID differs from the one recorded).
async fn provision_announced(
    network: &Network,
    ctx: &Context,
    provider: &dyn NetworkProvider,
    target: &CloudTarget,
    known: Option<&str>,
    announce: impl Fn(&NetworkResources) -> String,
) -> Result<NetworkResources> {
    let resources = provision(network, ctx, provider, target, known).await?;
    if known != Some(resources.vpc_id.as_str()) {
        ctx.event(network, EventType::Normal, "Provisioned", announce(&resources)).await;
    }
    Ok(resources)
}

/// Finds or creates the Network's physical network one part at a time, in
/// order: each lookup converges the parts that exist and names the first
/// missing one, which is created under the create-pending mark naming it.
/// The mark stays until a lookup finds that part, so a crash after the
/// create, or a read lagging it, never leads to a second one. Once every
/// part is found, the VPC is recorded as the external name and the mark
/// cleared.
async fn provision(
    network: &Network,
    ctx: &Context,
    provider: &dyn NetworkProvider,
    target: &CloudTarget,
    known: Option<&str>,
) -> Result<NetworkResources> {
    let api = Api::<Network>::namespaced(ctx.client.clone(), &target.owner.namespace);
    let mut obj = network.clone();
    // Whether the stored object has a mark (obj drops a settled one in memory).
    let mut marked = PendingCreate::of(network).is_some();
    let parts = network.spec.provider.as_ref().and_then(|p| p.ec2.as_ref()).map_or(0, |e| e.subnets.len()) + 3;
    // Each part is created at most once per reconcile; then one more lookup.
    for _ in 0..=parts {
        let state = provider.ensure(target, known).await?;
        let found: Vec<String> = state.found.iter().map(ToString::to_string).collect();
        if PendingCreate::of(&obj).is_some_and(|p| p.resolved_by(&found)) {
            PendingCreate::remove_from(&mut obj);
        }
        let Some(part) = state.missing else {
            let vpc_id = &state.resources.vpc_id;
            if marked || obj.annotations().get(EXTERNAL_NAME_ANNOTATION) != Some(vpc_id) {
                record_external_name(&api, &obj, vpc_id).await?;
            }
            return Ok(state.resources);
        };
        let what = part.to_string();
        let create = || provider.create(target, &part, &state.resources);
        let (id, written) = create_part_once(&api, &obj, ctx, part.kind(), &what, create).await?;
        obj = written;
        marked = true;
        ctx.event(network, EventType::Normal, "Created", format!("created {what} {id}")).await;
    }
    Err(ProviderError::Transient(
        "the network's parts are not all found after creating each missing one once; looking again".into(),
    )
    .into())
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
    secrets: Api<Secret>,
    wc: kube::runtime::watcher::Config,
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
        // A mesh key Secret deleted (to rotate the key) or changed.
        .watches(secrets, wc.labels(super::mesh::NETWORK_LABEL), |secret| {
            let network = secret.labels().get(super::mesh::NETWORK_LABEL)?;
            Some(ObjectRef::new(network).within(&secret.namespace().unwrap_or_default()))
        })
        .watches_stream(machines.touched(), move |machine| {
            let status = machine.status.clone().unwrap_or_default();
            // The finalizers are part of it: their removal is the Machine leaving
            // (its last event), which must reach the Network at once.
            let projection = format!(
                "{}|{:?}|{:?}|{}|{}|{}|{}",
                machine.spec.network_ref.name,
                status.addresses,
                status.host_key,
                is_true(&status.conditions, condition::READY),
                is_true(&status.conditions, super::mesh::MESH_READY),
                machine.metadata.deletion_timestamp.is_some(),
                machine.metadata.finalizers.as_ref().map_or(0, Vec::len),
            );
            let mut seen = seen.lock().unwrap_or_else(|e| e.into_inner());
            // A Machine being deleted wakes its Network on every event: the
            // watch's last one (the Machine gone from the store) may carry
            // the same state as the one before it, finalizer included, and
            // must still reach the Network, which drops it from membership.
            let gone = machine.metadata.deletion_timestamp.is_some();
            if gone {
                seen.remove(&super::object_key(&machine));
            } else if seen.insert(super::object_key(&machine), projection.clone()).as_ref() == Some(&projection) {
                return None;
            }
            Some(ObjectRef::new(&machine.spec.network_ref.name).within(&machine.namespace().unwrap_or_default()))
        })
}
