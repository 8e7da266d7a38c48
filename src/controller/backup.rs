//! Backup controller (NixOps `backup`, `backup-status`, `clean-backups`):
//! resolve the Network and its Volumes → snapshot each volume once (found
//! again by the Backup's UID tag after a crash, never taken twice) → wait
//! until the cloud has completed them → keep only the newest `keepLast`
//! complete Backups of the Network. Deleting a Backup deletes its snapshots
//! unless `deletionPolicy: Orphan`. A complete Backup costs nothing more.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::events::EventType;

use super::status::Conditions;
use super::{Cleanup, Context, Error, Reconciler, Result, object_status};
use crate::api::backup::{BackupPhase, BackupSpec, BackupStatus, VolumeSnapshot};
use crate::api::machine::SYNC_ANNOTATION;
use crate::api::{Backup, DeletionPolicy, Machine, Network, Volume};
use crate::provider::{CloudTarget, Owner, SnapshotPhase, VolumeProvider};

object_status!(BackupStatus, failed = BackupPhase::Failed, deleting = BackupPhase::Deleting);

/// How soon snapshots still being made are looked at again.
const SNAPSHOT_RECHECK: Duration = Duration::from_secs(5);
/// How long a Backup waits for the machines of its volumes to sync.
const SYNC_WAIT: Duration = Duration::from_secs(120);
/// How soon the machines' answers are looked for again.
const SYNC_RECHECK: Duration = Duration::from_secs(2);

/// A volume to snapshot: its name, cloud ID and size.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Source {
    pub name: String,
    pub id: String,
    pub size_gib: i32,
}

/// Pure: the volumes `spec` asks for, from the namespace's `volumes`.
pub fn sources(spec: &BackupSpec, volumes: &[Volume]) -> Result<Vec<Source>> {
    let network = &spec.network_ref.name;
    let chosen: Vec<&Volume> = if spec.volumes.is_empty() {
        let all: Vec<&Volume> = volumes.iter().filter(|v| &v.spec.network_ref.name == network).collect();
        if all.is_empty() {
            return Err(Error::stalled(
                "NoVolumes",
                format!("Network {network} has no Volumes to back up; create them, or list them in spec.volumes"),
            ));
        }
        all
    } else {
        let mut chosen = Vec::new();
        for (i, wanted) in spec.volumes.iter().enumerate() {
            let volume = volumes.iter().find(|v| v.name_any() == wanted.name).ok_or_else(|| {
                Error::waiting(
                    "VolumeNotFound",
                    format!("Volume {} (spec.volumes[{i}].name) does not exist yet", wanted.name),
                )
            })?;
            if &volume.spec.network_ref.name != network {
                return Err(Error::stalled(
                    "VolumeOfAnotherNetwork",
                    format!(
                        "Volume {} (spec.volumes[{i}].name) belongs to Network {}, not {network}; back it up with a Backup of that Network",
                        wanted.name, volume.spec.network_ref.name
                    ),
                ));
            }
            chosen.push(volume);
        }
        chosen
    };
    let mut sources: Vec<Source> = Vec::new();
    for volume in chosen {
        let status = volume.status.clone().unwrap_or_default();
        let id = status.volume_id.ok_or_else(|| {
            Error::waiting("VolumeNotReady", format!("Volume {} has no cloud volume yet", volume.name_any()))
        })?;
        sources.push(Source { name: volume.name_any(), id, size_gib: status.size_gib.unwrap_or_default() });
    }
    sources.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(sources)
}

/// Pure: which complete Backups retention deletes — all but the newest
/// `keep`, newest by completion (then creation, then name).
pub fn to_prune(mut complete: Vec<(Option<Timestamp>, String)>, keep: usize) -> Vec<String> {
    complete.sort_by(|a, b| b.cmp(a));
    complete.into_iter().skip(keep).map(|(_, name)| name).collect()
}

fn phase_word(phase: SnapshotPhase) -> &'static str {
    match phase {
        SnapshotPhase::Pending => "pending",
        SnapshotPhase::Completed => "completed",
        SnapshotPhase::Failed => "error",
    }
}

/// The volume provider of the Network's cloud account.
fn provider_of(ctx: &Context, network: &Network) -> Result<Arc<dyn VolumeProvider>> {
    if network.spec.provider.as_ref().is_none_or(|p| p.ec2.is_none()) {
        return Err(Error::stalled(
            "NoCloudProvider",
            format!("Network {} has no spec.provider.ec2: Backups snapshot cloud volumes", network.name_any()),
        ));
    }
    Ok(ctx.providers.volumes_of_network("ec2")?)
}

impl Reconciler for Backup {
    type Status = BackupStatus;
    const KIND: &'static str = "Backup";

    fn status(&self) -> Option<&BackupStatus> {
        self.status.as_ref()
    }

    async fn apply(self: Arc<Self>, ctx: Arc<Context>, status: &mut BackupStatus) -> Result<Option<Duration>> {
        if status.phase == Some(BackupPhase::Completed) {
            return Ok(None);
        }
        let generation = self.metadata.generation;
        let ns = self.namespace().unwrap_or_default();
        let network = super::resolve_network(&ctx, &ns, &self.spec.network_ref.name, "spec.networkRef.name").await?;
        let provider = provider_of(&ctx, &network)?;
        let volumes = Api::<Volume>::namespaced(ctx.client.clone(), &ns).list(&ListParams::default()).await?.items;
        let sources = sources(&self.spec, &volumes)?;
        let target = CloudTarget { owner: Owner::of(&*self), network };

        // Snapshots already made for this Backup (after a crash too) are
        // found by its UID tag; each volume is snapshotted once.
        let existing = provider.snapshots(&target).await?;
        status.phase = Some(BackupPhase::InProgress);
        let to_take: Vec<&Source> = sources.iter().filter(|s| !existing.iter().any(|e| e.volume_id == s.id)).collect();
        if let Some(requeue) = self.sync_machines(&ctx, &ns, &volumes, &to_take, status).await? {
            return Ok(Some(requeue));
        }
        let mut snapshots = Vec::new();
        for source in &sources {
            let snapshot = match existing.iter().find(|s| s.volume_id == source.id) {
                Some(found) => found.clone(),
                None => {
                    let made = provider.create_snapshot(&target, &source.id, &source.name).await;
                    crate::fault::point(&format!("{}:snapshot", crate::fault::points::CREATE_AFTER_CALL), None).await;
                    let made = made?;
                    let note = format!("snapshot {} of Volume {} ({})", made.id, source.name, source.id);
                    ctx.event(&*self, EventType::Normal, "SnapshotCreated", note).await;
                    made
                }
            };
            snapshots.push(VolumeSnapshot {
                volume: source.name.clone(),
                volume_id: source.id.clone(),
                snapshot_id: snapshot.id.clone(),
                state: phase_word(snapshot.phase).to_owned(),
                progress: snapshot.progress.clone(),
                size_gib: if snapshot.size_gib > 0 { snapshot.size_gib } else { source.size_gib },
            });
        }
        let done = snapshots.iter().filter(|s| s.state == phase_word(SnapshotPhase::Completed)).count();
        status.completed_snapshots = done as i32;
        let failed: Vec<String> = snapshots
            .iter()
            .filter(|s| s.state == phase_word(SnapshotPhase::Failed))
            .map(|s| format!("{} ({})", s.snapshot_id, s.volume))
            .collect();
        status.snapshots = snapshots;
        if !failed.is_empty() {
            return Err(Error::stalled(
                "SnapshotFailed",
                format!("the cloud failed snapshots {}; delete this Backup and take a new one", failed.join(", ")),
            ));
        }
        let total = status.snapshots.len();
        if done < total {
            Conditions::new(&mut status.conditions, generation)
                .reconciling("Snapshotting", format!("{done} of {total} snapshots complete"));
            return Ok(Some(SNAPSHOT_RECHECK));
        }
        status.phase = Some(BackupPhase::Completed);
        status.completed_at = Some(Time(Timestamp::now()));
        Conditions::new(&mut status.conditions, generation)
            .ready("Completed", format!("{total} snapshot(s) of Network {} complete", self.spec.network_ref.name));
        ctx.event(&*self, EventType::Normal, "Completed", format!("{total} snapshot(s) complete")).await;
        if let Some(keep) = self.spec.keep_last {
            self.prune(&ctx, &ns, keep).await?;
        }
        Ok(None)
    }

    async fn cleanup(self: Arc<Self>, ctx: Arc<Context>) -> Result<Cleanup> {
        if self.spec.deletion_policy == DeletionPolicy::Orphan {
            return Ok(Cleanup::Done);
        }
        let ns = self.namespace().unwrap_or_default();
        let name = &self.spec.network_ref.name;
        let Some(network) = Api::<Network>::namespaced(ctx.client.clone(), &ns).get_opt(name).await? else {
            return Ok(Cleanup::Stalled {
                reason: "NetworkGone",
                message: format!(
                    "Network {name} is gone, and with it the cloud account to delete the snapshots with; \
                     recreate it, or set spec.deletionPolicy: Orphan to keep the snapshots"
                ),
            });
        };
        let provider = match provider_of(&ctx, &network) {
            Ok(provider) => provider,
            Err(_) => return Ok(Cleanup::Done),
        };
        let target = CloudTarget { owner: Owner::of(&*self), network };
        for snapshot in provider.snapshots(&target).await? {
            provider.delete_snapshot(&target, &snapshot.id).await?;
        }
        Ok(Cleanup::Done)
    }
}

/// Pure: the Machines `sources` are attached to, by name, each once.
pub fn attached_machines(volumes: &[Volume], sources: &[&Source]) -> Vec<String> {
    let mut machines: Vec<String> = volumes
        .iter()
        .filter(|v| sources.iter().any(|s| s.name == v.name_any()))
        .filter_map(|v| v.status.as_ref()?.attached_to.as_ref().map(|a| a.machine.clone()))
        .collect();
    machines.sort();
    machines.dedup();
    machines
}

impl Backup {
    /// Asks the Machines the volumes to snapshot are attached to for a
    /// `sync` (the nixops.io/sync annotation, valued with this Backup's UID;
    /// their operator answers in status.lastSync) and waits for the answers
    /// at most SYNC_WAIT after this Backup was created; then the snapshots
    /// are taken anyway, with a warning naming the machines. Some(requeue)
    /// while waiting.
    async fn sync_machines(
        &self,
        ctx: &Context,
        ns: &str,
        volumes: &[Volume],
        sources: &[&Source],
        status: &mut BackupStatus,
    ) -> Result<Option<Duration>> {
        let uid = self.uid().unwrap_or_default();
        let api = Api::<Machine>::namespaced(ctx.client.clone(), ns);
        let mut waiting = Vec::new();
        for name in attached_machines(volumes, sources) {
            let Some(machine) = api.get_opt(&name).await? else { continue };
            if machine.status.as_ref().and_then(|s| s.last_sync.as_ref()).is_some_and(|s| s.request == uid) {
                continue;
            }
            if machine.annotations().get(SYNC_ANNOTATION) != Some(&uid) {
                let patch = serde_json::json!({"metadata": {"annotations": {SYNC_ANNOTATION: uid}}});
                api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch)).await?;
            }
            waiting.push(name);
        }
        if waiting.is_empty() {
            return Ok(None);
        }
        let created = self.metadata.creation_timestamp.as_ref().map(|t| t.0).unwrap_or_else(Timestamp::now);
        let age = Duration::try_from(Timestamp::now().duration_since(created)).unwrap_or_default();
        if age < SYNC_WAIT {
            Conditions::new(&mut status.conditions, self.metadata.generation).reconciling(
                "SyncingFileSystems",
                format!("waiting for {} to sync their file systems", waiting.join(", ")),
            );
            return Ok(Some(SYNC_RECHECK));
        }
        let note = format!(
            "{} did not sync their file systems within {} s; snapshotting anyway",
            waiting.join(", "),
            SYNC_WAIT.as_secs()
        );
        ctx.event(self, EventType::Warning, "NotSynced", note).await;
        Ok(None)
    }

    /// Deletes the Network's complete Backups beyond the newest `keep`
    /// (this one counts as complete).
    async fn prune(&self, ctx: &Context, ns: &str, keep: i32) -> Result<()> {
        let api = Api::<Backup>::namespaced(ctx.client.clone(), ns);
        let this = self.name_any();
        let complete: Vec<(Option<Timestamp>, String)> = api
            .list(&ListParams::default())
            .await?
            .items
            .into_iter()
            .filter(|b| {
                b.spec.network_ref.name == self.spec.network_ref.name && b.metadata.deletion_timestamp.is_none()
            })
            .filter(|b| b.name_any() == this || b.status.as_ref().and_then(|s| s.phase) == Some(BackupPhase::Completed))
            .map(|b| {
                let at = if b.name_any() == this {
                    Some(Timestamp::now())
                } else {
                    b.status.as_ref().and_then(|s| s.completed_at.as_ref()).map(|t| t.0)
                };
                (at, b.name_any())
            })
            .collect();
        for name in to_prune(complete, keep.max(1) as usize) {
            api.delete(&name, &DeleteParams::default()).await?;
            let note = format!("deleted Backup {name}: spec.keepLast is {keep}");
            ctx.event(self, EventType::Normal, "Pruned", note).await;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn volume(name: &str, network: &str, id: Option<&str>) -> Volume {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "nixops.io/v1alpha1", "kind": "Volume", "metadata": {"name": name},
            "spec": {"networkRef": {"name": network}, "provider": {"ec2": {"zone": "eu-west-1a", "sizeGiB": 8}}},
            "status": {"volumeId": id, "sizeGiB": 8},
        }))
        .unwrap()
    }

    fn spec(volumes: &[&str]) -> BackupSpec {
        serde_json::from_value(serde_json::json!({
            "networkRef": {"name": "net"}, "volumes": volumes.iter().map(|v| serde_json::json!({"name": v})).collect::<Vec<_>>()
        }))
        .unwrap()
    }

    #[test]
    fn a_backup_takes_the_networks_volumes_or_the_listed_ones() {
        let volumes =
            [volume("b", "net", Some("vol-b")), volume("a", "net", Some("vol-a")), volume("x", "other", Some("vol-x"))];
        let names = |s: Vec<Source>| s.into_iter().map(|s| s.id).collect::<Vec<_>>();
        assert_eq!(names(sources(&spec(&[]), &volumes).unwrap()), ["vol-a", "vol-b"]);
        assert_eq!(names(sources(&spec(&["b"]), &volumes).unwrap()), ["vol-b"]);
        assert!(matches!(
            sources(&spec(&["x"]), &volumes),
            Err(Error::Stalled { reason: "VolumeOfAnotherNetwork", .. })
        ));
        assert!(matches!(sources(&spec(&["y"]), &volumes), Err(Error::Waiting { reason: "VolumeNotFound", .. })));
        assert!(matches!(sources(&spec(&[]), &volumes[2..]), Err(Error::Stalled { reason: "NoVolumes", .. })));
        let pending = [volume("a", "net", None)];
        assert!(matches!(sources(&spec(&[]), &pending), Err(Error::Waiting { reason: "VolumeNotReady", .. })));
    }

    #[test]
    fn the_machines_of_attached_volumes_are_asked_to_sync_once_each() {
        let mut a = volume("a", "net", Some("vol-a"));
        let mut b = volume("b", "net", Some("vol-b"));
        let c = volume("c", "net", Some("vol-c"));
        for v in [&mut a, &mut b] {
            v.status.as_mut().unwrap().attached_to =
                Some(crate::api::volume::VolumeAttachmentStatus { machine: "db".into(), device: "/dev/xvdf".into() });
        }
        let volumes = [a, b, c];
        let all = sources(&spec(&[]), &volumes).unwrap();
        let refs: Vec<&Source> = all.iter().collect();
        assert_eq!(attached_machines(&volumes, &refs), ["db"]);
        assert!(attached_machines(&volumes, &refs[2..]).is_empty(), "an unattached volume needs no sync");
    }

    #[test]
    fn retention_keeps_the_newest_complete_backups() {
        let at = |s: i64| Some(Timestamp::from_second(s).unwrap());
        let complete = vec![(at(300), "c".to_owned()), (at(100), "a".to_owned()), (at(200), "b".to_owned())];
        assert_eq!(to_prune(complete.clone(), 2), ["a"]);
        assert_eq!(to_prune(complete.clone(), 1), ["b", "a"]);
        assert!(to_prune(complete, 3).is_empty());
    }
}
