//! `kubectl nixops backup`, `backups` and `restore` (NixOps `backup`,
//! `backup-status`, `restore`): a Backup object the operator carries out,
//! its status, and new Volumes made from its snapshots.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::api::{Api, ListParams, Patch, PostParams};

use super::generations::gitops_manager;
use super::output::{self, Cell, Tone};
use super::requests::wait_until;
use super::{Format, Kube, PluginError, Result};
use crate::api::backup::{BackupPhase, VolumeSnapshot};
use crate::api::condition::STALLED;
use crate::api::machine::{MachinePhase, VolumeAttachment};
use crate::api::{Backup, Machine, Volume};
use crate::controller::status::{is_true, message};

/// Pure: the name of a Backup of `network` taken at `now` (to the
/// millisecond, so names sort as the backups were taken).
pub fn backup_name(network: &str, now: Timestamp) -> String {
    format!("{network}-{}{:03}", now.strftime("%Y%m%d-%H%M%S"), now.subsec_millisecond())
}

/// `kubectl nixops backup NETWORK [--volume V]… [--keep-last N] [--wait]`.
pub async fn backup(
    kube: &Kube,
    network: &str,
    volumes: &[String],
    keep_last: Option<i32>,
    wait: Option<Duration>,
) -> Result<()> {
    let api: Api<Backup> = Api::namespaced(kube.client.clone(), &kube.namespace);
    let name = backup_name(network, Timestamp::now());
    let backup: Backup = serde_json::from_value(serde_json::json!({
        "apiVersion": "nixops.io/v1alpha1", "kind": "Backup", "metadata": {"name": name},
        "spec": {
            "networkRef": {"name": network},
            "volumes": volumes.iter().map(|v| serde_json::json!({"name": v})).collect::<Vec<_>>(),
            "keepLast": keep_last,
        }
    }))
    .map_err(|e| PluginError::Usage(e.to_string()))?;
    api.create(&PostParams::default(), &backup).await?;
    println!("backup {name} of Network {network} requested");
    let Some(timeout) = wait else { return Ok(()) };
    let deadline = Instant::now() + timeout;
    // Ok(the snapshots) once complete, Err(why) once stalled.
    let outcome = wait_until(&api, &name, deadline, |b: &Backup| {
        let status = b.status.as_ref()?;
        if status.phase == Some(BackupPhase::Completed) {
            return Some(Ok(status.snapshots.clone()));
        }
        is_true(&status.conditions, STALLED)
            .then(|| Err(message(&status.conditions, STALLED).unwrap_or_default().to_owned()))
    })
    .await?
    .map_err(|_| PluginError::Timeout(format!("backup {name} not complete within {} s", timeout.as_secs())))?;
    match outcome {
        Ok(snapshots) => {
            print!("{}", render_snapshots(&snapshots));
            Ok(())
        }
        Err(why) => Err(PluginError::Failed(format!("backup {name}: {why}"))),
    }
}

/// Pure: one line per snapshot.
pub fn render_snapshots(snapshots: &[VolumeSnapshot]) -> String {
    let rows: Vec<Vec<Cell>> = snapshots
        .iter()
        .map(|s| {
            let tone = if s.state == "completed" { Tone::Good } else { Tone::Busy };
            vec![
                Cell::plain(&s.volume),
                Cell::plain(&s.volume_id),
                Cell::plain(&s.snapshot_id),
                Cell::toned(&s.state, tone),
                Cell::plain(format!("{} GiB", s.size_gib)),
            ]
        })
        .collect();
    output::table(&["VOLUME", "VOLUME-ID", "SNAPSHOT", "STATE", "SIZE"], &rows, output::colour_enabled())
}

/// `kubectl nixops backups [NETWORK]` (NixOps backup-status).
pub async fn list(kube: &Kube, network: Option<&str>, format: Option<Format>) -> Result<()> {
    let api: Api<Backup> = if kube.all_namespaces {
        Api::all(kube.client.clone())
    } else {
        Api::namespaced(kube.client.clone(), &kube.namespace)
    };
    let mut backups: Vec<Backup> = api
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter(|b| network.is_none_or(|n| b.spec.network_ref.name == n))
        .collect();
    backups.sort_by_key(|b| b.metadata.creation_timestamp.as_ref().map(|t| t.0));
    if output::structured(format, &backups)? {
        return Ok(());
    }
    let now = Timestamp::now();
    let rows: Vec<Vec<Cell>> = backups
        .iter()
        .map(|b| {
            let status = b.status.clone().unwrap_or_default();
            let phase = status.phase.map(|p| format!("{p:?}")).unwrap_or_else(|| "Pending".into());
            let tone = match status.phase {
                Some(BackupPhase::Completed) => Tone::Good,
                Some(BackupPhase::Failed) => Tone::Bad,
                _ => Tone::Busy,
            };
            vec![
                Cell::plain(b.name_any()),
                Cell::plain(&b.spec.network_ref.name),
                Cell::toned(phase, tone),
                Cell::plain(format!("{}/{}", status.completed_snapshots, status.snapshots.len())),
                Cell::plain(output::age(b.metadata.creation_timestamp.as_ref(), now)),
            ]
        })
        .collect();
    print!("{}", output::table(&["BACKUP", "NETWORK", "PHASE", "SNAPSHOTS", "AGE"], &rows, output::colour_enabled()));
    Ok(())
}

/// Pure: the Volume restoring `snapshot` of `backup`: the original Volume's
/// spec with the snapshot as its source, named `<volume>-<backup>`.
pub fn restored_volume(original: &Volume, snapshot: &VolumeSnapshot, backup: &str) -> Result<Volume, String> {
    let mut spec = original.spec.clone();
    let ec2 = spec.provider.ec2.as_mut().ok_or("the original Volume has no spec.provider.ec2")?;
    ec2.snapshot_id = Some(snapshot.snapshot_id.clone());
    ec2.size_gib = Some(ec2.size_gib.unwrap_or_default().max(snapshot.size_gib));
    let mut volume = Volume::new(&format!("{}-{backup}", snapshot.volume), spec);
    volume.metadata.labels = Some([("nixops.io/restored-from".to_owned(), backup.to_owned())].into());
    Ok(volume)
}

/// Pure: `machine`'s spec.volumes with every Volume named in `swaps`
/// (original → restored) replaced; None when it names none of them.
pub fn swapped_volumes(machine: &Machine, swaps: &BTreeMap<String, String>) -> Option<Vec<VolumeAttachment>> {
    let mut changed = false;
    let volumes = machine
        .spec
        .volumes
        .iter()
        .cloned()
        .map(|mut attachment| {
            if let Some(restored) = swaps.get(&attachment.volume_ref.name) {
                attachment.volume_ref.name = restored.clone();
                changed = true;
            }
            attachment
        })
        .collect();
    changed.then_some(volumes)
}

/// `kubectl nixops restore BACKUP [--volume V]… [--machine M]…`: a new
/// Volume from each snapshot; with --machine, each named Machine is
/// stopped, its spec.volumes switched to the restored Volumes and started
/// again (NixOps restore). A Machine managed by Argo CD or Flux gets the
/// manifest change printed instead.
pub async fn restore(kube: &Kube, name: &str, only: &[String], machines: &[String], timeout: Duration) -> Result<()> {
    let backups: Api<Backup> = Api::namespaced(kube.client.clone(), &kube.namespace);
    let backup = backups
        .get_opt(name)
        .await?
        .ok_or_else(|| PluginError::Usage(format!("Backup {name} not found in namespace {}", kube.namespace)))?;
    let status = backup.status.clone().unwrap_or_default();
    if status.phase != Some(BackupPhase::Completed) {
        return Err(PluginError::Usage(format!("Backup {name} is not complete: nothing to restore yet")));
    }
    // Every Machine to swap exists before anything is created.
    let mut targets = Vec::new();
    for machine in machines {
        targets.push(kube.machine(machine).await?);
    }
    let volumes: Api<Volume> = Api::namespaced(kube.client.clone(), &kube.namespace);
    let mut swaps = BTreeMap::new();
    for snapshot in status.snapshots.iter().filter(|s| only.is_empty() || only.contains(&s.volume)) {
        let original = volumes.get_opt(&snapshot.volume).await?.ok_or_else(|| {
            PluginError::Usage(format!(
                "Volume {} is gone: its spec (zone, type) is what a restored copy is made from",
                snapshot.volume
            ))
        })?;
        let restored = restored_volume(&original, snapshot, name).map_err(PluginError::Usage)?;
        // A restore run again (after a timeout) goes on with the Volumes it made.
        if volumes.get_opt(&restored.name_any()).await?.is_none() {
            volumes.create(&PostParams::default(), &restored).await?;
        }
        println!(
            "Volume {} created from snapshot {} of {}",
            restored.name_any(),
            snapshot.snapshot_id,
            snapshot.volume
        );
        swaps.insert(snapshot.volume.clone(), restored.name_any());
    }
    if targets.is_empty() {
        for (original, restored) in &swaps {
            println!(
                "to use {restored}, set volumeRef.name: {restored} in the Machine's spec.volumes in place of {original} (or run restore with --machine)"
            );
        }
        return Ok(());
    }
    for machine in targets {
        swap_into(kube, &machine, &swaps, timeout).await?;
    }
    Ok(())
}

/// Stops `machine`, points its spec.volumes at the restored Volumes and
/// starts it again, waiting for each step.
async fn swap_into(kube: &Kube, machine: &Machine, swaps: &BTreeMap<String, String>, timeout: Duration) -> Result<()> {
    let name = machine.name_any();
    let Some(volumes) = swapped_volumes(machine, swaps) else {
        return Err(PluginError::Usage(format!(
            "Machine {name} attaches none of the restored Volumes ({})",
            swaps.keys().cloned().collect::<Vec<_>>().join(", ")
        )));
    };
    if let Some(manager) = gitops_manager(machine) {
        let patch = serde_json::json!({"spec": {"volumes": volumes}});
        println!(
            "Machine {name} is managed by {manager}: change its manifest rather than the cluster, \
             and stop and start it around the change:\n{}",
            serde_json::to_string_pretty(&patch).unwrap_or_default()
        );
        return Ok(());
    }
    let api = kube.machines();
    let params = super::patch_params();
    let phase_is = |phase: MachinePhase| move |m: &Machine| (m.status.as_ref()?.phase == Some(phase)).then_some(());
    let deadline = Instant::now() + timeout;
    api.patch(&name, &params, &Patch::Merge(serde_json::json!({"spec": {"running": false}}))).await?;
    println!("Machine {name}: stopping");
    wait_until(&api, &name, deadline, phase_is(MachinePhase::Stopped))
        .await?
        .map_err(|_| PluginError::Timeout(format!("Machine {name} not Stopped within {} s", timeout.as_secs())))?;
    let patch = serde_json::json!({"spec": {"volumes": volumes, "running": true}});
    api.patch(&name, &params, &Patch::Merge(patch)).await?;
    println!("Machine {name}: volumes swapped, starting");
    let deadline = Instant::now() + timeout;
    wait_until(&api, &name, deadline, phase_is(MachinePhase::Running))
        .await?
        .map_err(|_| PluginError::Timeout(format!("Machine {name} not Running within {} s", timeout.as_secs())))?;
    println!("Machine {name}: running with the restored volumes");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_restored_volume_is_the_original_from_the_snapshot() {
        let original: Volume = serde_json::from_value(serde_json::json!({
            "apiVersion": "nixops.io/v1alpha1", "kind": "Volume", "metadata": {"name": "pgdata"},
            "spec": {"networkRef": {"name": "prod"}, "provider": {"ec2": {"zone": "eu-west-1a", "sizeGiB": 8, "type": "gp3"}}}
        }))
        .unwrap();
        let snapshot = VolumeSnapshot {
            volume: "pgdata".into(),
            volume_id: "vol-1".into(),
            snapshot_id: "snap-1".into(),
            state: "completed".into(),
            progress: None,
            size_gib: 10,
        };
        let restored = restored_volume(&original, &snapshot, "prod-20260101-000000123").unwrap();
        assert_eq!(restored.name_any(), "pgdata-prod-20260101-000000123");
        let ec2 = restored.spec.provider.ec2.unwrap();
        assert_eq!(
            (ec2.snapshot_id.as_deref(), ec2.size_gib, ec2.zone.as_str()),
            (Some("snap-1"), Some(10), "eu-west-1a")
        );
        assert_eq!(backup_name("prod", Timestamp::from_millisecond(42).unwrap()), "prod-19700101-000000042");
    }

    #[test]
    fn a_swap_replaces_only_the_restored_volumes() {
        let machine: Machine = serde_json::from_value(serde_json::json!({
            "apiVersion": "nixops.io/v1alpha1", "kind": "Machine", "metadata": {"name": "db"},
            "spec": {"networkRef": {"name": "prod"}, "provider": {"existing": {"host": "db.example"}},
                     "volumes": [{"volumeRef": {"name": "pgdata"}, "device": "/dev/xvdf"},
                                 {"volumeRef": {"name": "logs"}, "device": "/dev/xvdg"}]}
        }))
        .unwrap();
        let swaps = BTreeMap::from([("pgdata".to_owned(), "pgdata-b1".to_owned())]);
        let volumes = swapped_volumes(&machine, &swaps).unwrap();
        let names: Vec<(&str, &str)> =
            volumes.iter().map(|v| (v.volume_ref.name.as_str(), v.device.as_str())).collect();
        assert_eq!(names, [("pgdata-b1", "/dev/xvdf"), ("logs", "/dev/xvdg")]);
        assert!(swapped_volumes(&machine, &BTreeMap::from([("other".to_owned(), "x".to_owned())])).is_none());
    }
}
