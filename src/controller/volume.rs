//! Volume controller: an EBS volume in the Network's account (or a libvirt
//! volume in its hypervisor's storage pool), attached to
//! the Machine whose spec.volumes names it; detached before deletion.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kube::api::Api;
use kube::runtime::Controller;
use kube::runtime::events::EventType;
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};

use super::shared::SharedWatch;
use super::status::Conditions;
use super::{Cleanup, Context, Error, Reconciler, Result, create_once, object_status, record_external_name};
use crate::api::network::ResourcePhase;
use crate::api::volume::{VolumeAttachmentStatus, VolumeStatus};
use crate::api::{DeletionPolicy, EXTERNAL_NAME_ANNOTATION, Machine, ManagementPolicy, Volume};
use crate::provider::{AttachmentState, CloudTarget, Owner};

object_status!(VolumeStatus, failed = ResourcePhase::Failed, deleting = ResourcePhase::Deleting);

/// Volume-specific condition types.
pub mod conditions {
    /// The volume is attached where Machine.spec.volumes says (or nowhere).
    pub const ATTACHED: &str = "Attached";
}

/// Where the volume should be attached, from the Machines that name it.
#[derive(Debug, PartialEq)]
struct DesiredAttachment {
    machine: String,
    device: String,
    /// None until the machine's instance exists.
    instance_id: Option<String>,
}

/// `machine_id` reads the provider's machine ID from a providerID.
fn desired_attachment<'a>(
    volume: &str,
    machines: impl IntoIterator<Item = &'a Machine>,
    machine_id: impl Fn(&str) -> Option<&str>,
) -> Result<Option<DesiredAttachment>> {
    let users: Vec<(&Machine, &str)> = machines
        .into_iter()
        .filter(|m| m.metadata.deletion_timestamp.is_none())
        .filter_map(|m| m.spec.volumes.iter().find(|v| v.volume_ref.name == volume).map(|v| (m, v.device.as_str())))
        .collect();
    match users.as_slice() {
        [] => Ok(None),
        [(m, device)] => Ok(Some(DesiredAttachment {
            machine: m.name_any(),
            device: (*device).to_owned(),
            instance_id: m
                .status
                .as_ref()
                .and_then(|s| s.provider_id.as_deref())
                .and_then(&machine_id)
                .map(str::to_owned),
        })),
        several => Err(Error::stalled(
            "AttachedBySeveral",
            format!(
                "machines {} all list this volume in spec.volumes; a volume attaches to one machine, remove it from the others",
                several.iter().map(|(m, _)| m.name_any()).collect::<Vec<_>>().join(", ")
            ),
        )),
    }
}

/// The volume's identity and its Network (the account).
async fn target(ctx: &Context, volume: &Volume) -> Result<CloudTarget> {
    let ns = volume.namespace().unwrap_or_default();
    let name = &volume.spec.network_ref.name;
    let network = super::resolve_network(ctx, &ns, name, "spec.networkRef.name").await?;
    Ok(CloudTarget { owner: owner(volume), network })
}

fn owner(volume: &Volume) -> Owner {
    Owner::of(volume)
}

impl Reconciler for Volume {
    type Status = VolumeStatus;
    const KIND: &'static str = "Volume";

    fn status(&self) -> Option<&VolumeStatus> {
        self.status.as_ref()
    }

    async fn apply(self: Arc<Self>, ctx: Arc<Context>, status: &mut VolumeStatus) -> Result<Option<Duration>> {
        let generation = self.metadata.generation;
        let ns = self.namespace().unwrap_or_default();
        let spec = &self.spec.provider;
        let provider = ctx.providers.volume(spec)?;
        let target = target(&ctx, &self).await?;
        let machines = ctx.stores.machines_in(&ns).await?;
        let desired = desired_attachment(&self.name_any(), machines.iter().map(|m| &**m), |p| provider.machine_id(p))?;

        let known_id = self.annotations().get(EXTERNAL_NAME_ANNOTATION).cloned();
        let observe_only = self.spec.management_policy == ManagementPolicy::Observe;
        if observe_only && known_id.is_none() {
            return Err(Error::stalled(
                "ExternalNameRequired",
                format!(
                    "spec.managementPolicy Observe needs the {EXTERNAL_NAME_ANNOTATION} annotation naming the volume to observe (vol-…)"
                ),
            ));
        }
        let mut volume = match provider.find(&target, known_id.as_deref()).await? {
            Some(v) => {
                if known_id.is_none() {
                    record_external_name(&Api::<Volume>::namespaced(ctx.client.clone(), &ns), &self, &v.id).await?;
                }
                v
            }
            None if known_id.is_some() => {
                let fix =
                    if observe_only { "fix the annotation" } else { "remove the annotation to create a new volume" };
                return Err(Error::stalled(
                    "VolumeNotFound",
                    format!(
                        "volume {} named by the {EXTERNAL_NAME_ANNOTATION} annotation does not exist; {fix}",
                        known_id.unwrap_or_default()
                    ),
                ));
            }
            None => {
                let api = Api::<Volume>::namespaced(ctx.client.clone(), &ns);
                let id_of = |v: &crate::provider::VolumeState| Some(v.id.clone());
                let created = create_once(&api, &*self, &ctx, "volume", provider.lookup(), id_of, || {
                    provider.create(&target, spec)
                })
                .await?;
                ctx.event(
                    &*self,
                    EventType::Normal,
                    "Created",
                    format!("created {} {} in {}", provider.noun(), created.id, created.zone),
                )
                .await;
                created
            }
        };

        if observe_only {
            status.volume_id = Some(volume.id.clone());
            status.size_gib = Some(volume.size_gib);
            status.attached_to = None;
            status.phase = Some(ResourcePhase::Ready);
            Conditions::new(&mut status.conditions, generation).ready(
                "Observing",
                format!(
                    "observing {} {} ({} GiB, {}); managementPolicy Observe never changes or deletes it",
                    provider.noun(),
                    volume.id,
                    volume.size_gib,
                    volume.state
                ),
            );
            return Ok(None);
        }

        // Grow, or change type / IOPS / throughput.
        if provider.needs_update(spec, &volume) {
            provider.update(&target, &volume.id, spec).await?;
            let size = spec
                .ec2
                .as_ref()
                .and_then(|e| e.size_gib)
                .or(spec.libvirt.as_ref().map(|l| l.size_gib))
                .unwrap_or(volume.size_gib);
            ctx.event(&*self, EventType::Normal, "Modified", format!("modified volume {} ({size} GiB)", volume.id))
                .await;
            volume = provider.find(&target, Some(&volume.id)).await?.unwrap_or(volume);
        }

        // Attachments: detach from anything not desired (naming the instance), then attach.
        let mut pending = None;
        for a in volume.attachments.iter().filter(|a| a.state != AttachmentState::Detached) {
            if desired.as_ref().and_then(|d| d.instance_id.as_deref()) != Some(a.instance_id.as_str()) {
                // A detach under way is waited for, not asked again.
                if a.state != AttachmentState::Detaching {
                    provider.detach(&target, &volume.id, &a.instance_id).await?;
                    ctx.event(&*self, EventType::Normal, "Detached", format!("detached from {}", a.instance_id)).await;
                }
                pending = Some(format!("detaching from {}", a.instance_id));
            }
        }
        let current = volume.attachments.iter().find(|a| a.state != AttachmentState::Detached);
        if let Some(d) = &desired {
            match (&d.instance_id, current) {
                (None, _) => pending = Some(format!("waiting for machine {}'s instance before attaching", d.machine)),
                (Some(i), Some(a)) if a.instance_id == *i && a.state == AttachmentState::Attached => {}
                (Some(i), Some(a)) if a.instance_id == *i => pending = Some(format!("{} to {}", a.state, i)),
                (Some(i), _) if pending.is_none() => {
                    provider.attach(&target, &volume.id, i, &d.device).await?;
                    ctx.event(
                        &*self,
                        EventType::Normal,
                        "Attached",
                        format!("attaching to machine {} ({i}) as {}", d.machine, d.device),
                    )
                    .await;
                    pending = Some(format!("attaching to {i}"));
                }
                (Some(_), _) => {}
            }
        }

        status.volume_id = Some(volume.id.clone());
        status.size_gib = Some(volume.size_gib);
        status.attached_to = desired
            .as_ref()
            .filter(|d| pending.is_none() && d.instance_id.is_some())
            .map(|d| VolumeAttachmentStatus { machine: d.machine.clone(), device: d.device.clone() });
        let mut conds = Conditions::new(&mut status.conditions, generation);
        match (&pending, &desired) {
            (Some(what), _) => {
                let reason = if what.starts_with("detaching") { "Detaching" } else { "Attaching" };
                conds.set(conditions::ATTACHED, false, reason, what.clone());
                conds.reconciling(reason, format!("volume {}: {what}", volume.id));
                status.phase = Some(ResourcePhase::Provisioning);
                return Ok(Some(Duration::from_secs(2)));
            }
            (None, Some(d)) => {
                conds.set(
                    conditions::ATTACHED,
                    true,
                    "Attached",
                    format!("attached to machine {} as {}", d.machine, d.device),
                );
            }
            (None, None) => {
                conds.set(conditions::ATTACHED, false, "NotAttached", "no Machine lists this volume in spec.volumes");
            }
        }
        conds.ready("Ready", format!("{} {} ({} GiB, {})", provider.noun(), volume.id, volume.size_gib, volume.state));
        status.phase = Some(ResourcePhase::Ready);
        Ok(None)
    }

    async fn cleanup(self: Arc<Self>, ctx: Arc<Context>) -> Result<Cleanup> {
        if self.spec.deletion_policy == DeletionPolicy::Orphan
            || self.spec.management_policy == ManagementPolicy::Observe
        {
            return Ok(Cleanup::Done);
        }
        let target = match target(&ctx, &self).await {
            Ok(target) => target,
            // Without its Network the account is unknown; nothing can be deleted.
            Err(Error::Waiting { .. }) if self.annotations().get(EXTERNAL_NAME_ANNOTATION).is_none() => {
                return Ok(Cleanup::Done);
            }
            Err(err) => return Err(err),
        };
        let provider = ctx.providers.volume(&self.spec.provider)?;
        let known_id = self.annotations().get(EXTERNAL_NAME_ANNOTATION).cloned();
        let Some(volume) = provider.find(&target, known_id.as_deref()).await? else {
            return Ok(Cleanup::Done); // already gone, e.g. deleted out of band
        };
        let attached: Vec<_> = volume.attachments.iter().filter(|a| a.state != AttachmentState::Detached).collect();
        if !attached.is_empty() {
            for a in &attached {
                if a.state != AttachmentState::Detaching {
                    provider.detach(&target, &volume.id, &a.instance_id).await?;
                }
            }
            return Ok(Cleanup::Wait {
                reason: "Detaching",
                message: format!(
                    "detaching volume {} from {} before deleting it",
                    volume.id,
                    attached.iter().map(|a| a.instance_id.as_str()).collect::<Vec<_>>().join(", ")
                ),
            });
        }
        provider.delete(&target, &volume.id).await?;
        Ok(Cleanup::Done)
    }
}

/// The Volume controller; a Machine adding or dropping a volume, or getting
/// its instance, wakes the volumes it names now and named before. Triggers
/// come from the shared watches, whose Machine store the reconcile reads.
pub fn controller(
    volumes: &mut SharedWatch<Volume>,
    machines: &mut SharedWatch<Machine>,
    networks: &mut SharedWatch<crate::api::Network>,
) -> Controller<Volume> {
    let seen = Mutex::new(HashMap::<String, (BTreeSet<String>, Option<String>)>::new());
    let store = volumes.store();
    Controller::for_stream(volumes.applied(), volumes.store())
        .watches_stream(
            networks.touched(),
            super::network_dependents(store, |v: &Volume| Some(&v.spec.network_ref.name)),
        )
        .watches_stream(machines.touched(), move |machine| {
            let ns = machine.namespace().unwrap_or_default();
            let now: BTreeSet<String> = if machine.meta().deletion_timestamp.is_some() {
                BTreeSet::new()
            } else {
                machine.spec.volumes.iter().map(|v| v.volume_ref.name.clone()).collect()
            };
            let provider_id = machine.status.as_ref().and_then(|s| s.provider_id.clone());
            let mut seen = seen.lock().unwrap_or_else(|e| e.into_inner());
            let before = seen.insert(super::object_key(&machine), (now.clone(), provider_id.clone()));
            if before.as_ref() == Some(&(now.clone(), provider_id)) {
                return Vec::new();
            }
            let mut names = now;
            names.extend(before.map(|(b, _)| b).unwrap_or_default());
            names.into_iter().map(|n| ObjectRef::new(&n).within(&ns)).collect::<Vec<_>>()
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn machine(name: &str, volumes: serde_json::Value, provider_id: Option<&str>) -> Machine {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "nixops.io/v1alpha1", "kind": "Machine", "metadata": {"name": name},
            "spec": {"networkRef": {"name": "n"}, "volumes": volumes},
            "status": {"providerID": provider_id}
        }))
        .unwrap()
    }

    #[test]
    fn one_user_gives_the_attachment_and_two_stall() {
        let a = machine(
            "a",
            serde_json::json!([{"volumeRef": {"name": "data"}, "device": "/dev/xvdf"}]),
            Some("aws:///z/i-1"),
        );
        let b = machine("b", serde_json::json!([{"volumeRef": {"name": "data"}, "device": "/dev/xvdg"}]), None);
        let c = machine("c", serde_json::json!([]), None);
        // Whatever the provider reads from a providerID.
        fn id(provider_id: &str) -> Option<&str> {
            provider_id.rsplit('/').next()
        }
        assert_eq!(desired_attachment("data", std::slice::from_ref(&c), id).unwrap(), None);
        assert_eq!(
            desired_attachment("data", &[a.clone(), c], id).unwrap(),
            Some(DesiredAttachment {
                machine: "a".into(),
                device: "/dev/xvdf".into(),
                instance_id: Some("i-1".into())
            })
        );
        let err = desired_attachment("data", &[a, b], id).unwrap_err();
        assert!(err.to_string().contains("machines a, b"), "{err}");
    }
}
