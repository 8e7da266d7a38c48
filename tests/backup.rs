//! Backups against moto's EC2 API, driven by the real plugin binary: a
//! Backup snapshots every Volume of its Network once, tagged with its UID;
//! retention keeps the newest keepLast complete Backups and deletes the
//! older ones with their snapshots; restore makes new Volumes from a
//! Backup's snapshots and, with --machine, swaps them into a stopped Machine
//! that is started again; deleting a Backup deletes its snapshots; an operator
//! killed right after a snapshot was made takes no second one. (moto keeps
//! no block data, so what a restored volume holds cannot be checked here.)

mod support;

use std::os::unix::process::ExitStatusExt;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, DeleteParams, PostParams};
use nixops_operator::api::{Backup, KeyPair, Machine, Volume};
use serde_json::json;
use support::plugin::{run as plugin, text};

const TIMEOUT: Duration = Duration::from_secs(60);

fn volume(name: &str, size: i32) -> Volume {
    serde_json::from_value(json!({
        "apiVersion": "nixops.io/v1alpha1", "kind": "Volume", "metadata": {"name": name},
        "spec": {"networkRef": {"name": "aws"}, "provider": {"ec2": {"zone": "eu-west-1a", "sizeGiB": size, "type": "gp3"}}}
    }))
    .unwrap()
}

fn ready(v: &Volume) -> bool {
    v.status.as_ref().is_some_and(|s| support::is_ready(&s.conditions))
}

async fn snapshots_tagged(ec2: &aws_sdk_ec2::Client, uid: &str) -> Vec<aws_sdk_ec2::types::Snapshot> {
    let filter = aws_sdk_ec2::types::Filter::builder().name("tag:nixops.io/uid").values(uid).build();
    ec2.describe_snapshots().filters(filter).send().await.unwrap().snapshots().to_vec()
}

/// A namespace with an AWS Network (moto), an operator and two Ready
/// Volumes, data (8 GiB) and logs (4 GiB).
async fn with_two_volumes(prefix: &str) -> (String, Api<Volume>, Api<Backup>, support::Operator) {
    let client = support::client().await;
    support::install_crds(&client).await;
    let ns = support::namespace(&client, prefix).await;
    support::aws_network(&client, &ns, "aws", &support::moto().endpoint).await;
    let operator = support::Operator::start(&ns, &[]);
    let volumes: Api<Volume> = Api::namespaced(client.clone(), &ns);
    for (name, size) in [("data", 8), ("logs", 4)] {
        volumes.create(&PostParams::default(), &volume(name, size)).await.unwrap();
    }
    for name in ["data", "logs"] {
        support::wait_for(&volumes, name, TIMEOUT, "Ready", ready).await;
    }
    (ns.clone(), volumes, Api::namespaced(client, &ns), operator)
}

#[tokio::test]
async fn backups_snapshot_a_networks_volumes_keep_the_last_two_and_restore() {
    let (ns, volumes, backups, _operator) = with_two_volumes("backup").await;
    let ec2 = support::ec2_client().await;
    let volume_id = |v: &Volume| v.status.as_ref().unwrap().volume_id.clone().unwrap();
    let data_id = volume_id(&volumes.get("data").await.unwrap());

    // Three backups, keeping the last two.
    let mut taken = Vec::new();
    for _ in 0..3 {
        let out = plugin(&ns, &["backup", "aws", "--keep-last", "2", "--wait", "--timeout", "60"]);
        assert!(out.status.success(), "{}", text(&out));
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let name = stdout.split_whitespace().nth(1).unwrap().to_owned();
        assert!(stdout.contains(&data_id) && stdout.matches("completed").count() == 2, "{stdout}");
        let backup = backups.get(&name).await.unwrap();
        let uid = backup.metadata.uid.clone().unwrap();
        let status = backup.status.unwrap();
        assert_eq!(status.snapshots.len(), 2);
        assert_eq!(snapshots_tagged(&ec2, &uid).await.len(), 2, "one snapshot per volume, never two");
        taken.push((name, uid, status.snapshots));
    }
    // The oldest went with its snapshots; the last two stay.
    support::wait_gone(&backups, &taken[0].0, TIMEOUT).await;
    assert!(snapshots_tagged(&ec2, &taken[0].1).await.is_empty(), "a pruned Backup's snapshots are deleted");
    for (name, uid, _) in &taken[1..] {
        assert!(backups.get_opt(name).await.unwrap().is_some(), "{name} is kept");
        assert_eq!(snapshots_tagged(&ec2, uid).await.len(), 2);
    }
    let out = plugin(&ns, &["backups", "aws"]);
    let listed = String::from_utf8_lossy(&out.stdout);
    assert!(!listed.contains(&taken[0].0) && listed.contains(&taken[2].0) && listed.contains("2/2"), "{listed}");

    // Restore the newest: new Volumes from its snapshots.
    let (newest, _, snapshots) = &taken[2];
    let out = plugin(&ns, &["restore", newest]);
    assert!(out.status.success(), "{}", text(&out));
    for snapshot in snapshots {
        let name = format!("{}-{newest}", snapshot.volume);
        support::wait_for(&volumes, &name, TIMEOUT, "Ready", ready).await;
        let id = volume_id(&volumes.get(&name).await.unwrap());
        let cloud = ec2.describe_volumes().volume_ids(&id).send().await.unwrap();
        assert_eq!(cloud.volumes()[0].snapshot_id(), Some(snapshot.snapshot_id.as_str()), "made from the snapshot");
    }

    // Deleting a Backup deletes its snapshots.
    backups.delete(&taken[1].0, &DeleteParams::default()).await.unwrap();
    support::wait_gone(&backups, &taken[1].0, TIMEOUT).await;
    assert!(snapshots_tagged(&ec2, &taken[1].1).await.is_empty());
}

#[tokio::test]
async fn killed_after_a_snapshot_was_made_the_backup_takes_no_second_one() {
    let (ns, _, backups, operator) = with_two_volumes("backup-kill").await;
    let ec2 = support::ec2_client().await;
    drop(operator);
    let mut operator =
        support::Operator::start_env(&ns, &[], &[("FAILPOINTS", "create-after-call:snapshot=return(kill)")]);

    let out = plugin(&ns, &["backup", "aws"]);
    assert!(out.status.success(), "{}", text(&out));
    let name = String::from_utf8_lossy(&out.stdout).split_whitespace().nth(1).unwrap().to_owned();
    let status = operator.wait_exit(Duration::from_secs(60)).expect("the operator reaches its fault point");
    assert_eq!(status.signal(), Some(9), "killed right after the first snapshot: {status:?}");
    let uid = backups.get(&name).await.unwrap().metadata.uid.unwrap();
    assert_eq!(snapshots_tagged(&ec2, &uid).await.len(), 1, "the snapshot made before the kill");

    drop(operator);
    let _operator = support::Operator::start(&ns, &[]);
    support::wait_for(&backups, &name, TIMEOUT, "Completed", |b| {
        b.status.as_ref().is_some_and(|s| s.completed_snapshots == 2)
    })
    .await;
    let tagged = snapshots_tagged(&ec2, &uid).await;
    assert_eq!(tagged.len(), 2, "one per volume: the first was found by its tag, not taken again");
    let mut of: Vec<&str> = tagged.iter().filter_map(|s| s.volume_id()).collect();
    of.sort();
    of.dedup();
    assert_eq!(of.len(), 2, "{tagged:?}");
}

#[tokio::test]
async fn restore_with_a_machine_stops_it_swaps_its_volumes_and_starts_it() {
    let (ns, volumes, backups, _operator) = with_two_volumes("backup-swap").await;
    let ec2 = support::ec2_client().await;
    let client = support::client().await;
    let machines: Api<Machine> = Api::namespaced(client.clone(), &ns);
    // An EC2 instance in moto whose SSH is a local sshd (moto runs no VMs).
    let host = support::SshHost::start();
    // The deployer key logs in to it, so the Backup's sync reaches the machine.
    let keypair: KeyPair = serde_json::from_value(json!({
        "apiVersion": "nixops.io/v1alpha1", "kind": "KeyPair", "metadata": {"name": "deployer"},
        "spec": {"secretRef": {"name": "deployer"}, "networkRef": {"name": "aws"}, "provider": {"ec2": {}}}
    }))
    .unwrap();
    let keypairs: Api<KeyPair> = Api::namespaced(client.clone(), &ns);
    keypairs.create(&PostParams::default(), &keypair).await.unwrap();
    support::wait_ready(&keypairs, "deployer").await;
    let secret = Api::<Secret>::namespaced(client.clone(), &ns).get("deployer").await.unwrap();
    let public = secret.data.unwrap().remove("ssh-publickey").unwrap();
    std::fs::write(host.dir.path().join("authorized_keys"), &public.0).unwrap();
    let ami = support::some_ami(&ec2).await;
    let ssh = json!({"host": host.host, "port": host.port, "keyPairRef": {"name": "deployer"}});
    let volumes_of_db = json!([
        {"volumeRef": {"name": "data"}, "device": "/dev/xvdf"}, {"volumeRef": {"name": "logs"}, "device": "/dev/xvdg"}
    ]);
    let machine = support::ec2_machine("db", &ami, &host, json!({"ssh": ssh, "volumes": volumes_of_db}));
    machines.create(&PostParams::default(), &machine).await.unwrap();
    let attached_to = |v: &Volume| v.status.as_ref().and_then(|s| s.attached_to.as_ref()).map(|a| a.device.clone());
    support::wait_for(&volumes, "data", TIMEOUT, "attached", |v| attached_to(v).is_some()).await;
    let out = plugin(&ns, &["backup", "aws", "--wait", "--timeout", "60"]);
    assert!(out.status.success(), "{}", text(&out));
    let name = String::from_utf8_lossy(&out.stdout).split_whitespace().nth(1).unwrap().to_owned();
    let snapshots = backups.get(&name).await.unwrap().status.unwrap().snapshots;
    // The machine synced its file systems before the snapshots (NixOps' backup did).
    let synced = machines.get("db").await.unwrap().status.unwrap().last_sync;
    assert!(synced.is_some(), "the Backup asked db to sync and db answered");
    let instance = |m: &Machine| m.status.as_ref().and_then(|s| s.provider_id.clone()).unwrap();
    let instance_id = instance(&machines.get("db").await.unwrap()).rsplit('/').next().unwrap().to_owned();

    // Only data is restored, and swapped into db.
    let out = plugin(&ns, &["restore", &name, "--volume", "data", "--machine", "db", "--timeout", "90"]);
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("stopping") && stdout.contains("running with the restored volumes"), "{stdout}");
    let restored = format!("data-{name}");
    let db = machines.get("db").await.unwrap();
    let names: Vec<&str> = db.spec.volumes.iter().map(|v| v.volume_ref.name.as_str()).collect();
    assert_eq!(names, [restored.as_str(), "logs"], "data swapped for its restored copy, logs kept");
    assert!(db.spec.running);

    // What moto holds: the restored volume, made from the snapshot, is
    // attached to the same instance at data's device; the original is not.
    let data_snapshot = snapshots.iter().find(|s| s.volume == "data").unwrap();
    support::wait_for(&volumes, &restored, TIMEOUT, "attached at /dev/xvdf", |v| {
        attached_to(v).as_deref() == Some("/dev/xvdf")
    })
    .await;
    let id = |v: &Volume| v.status.as_ref().unwrap().volume_id.clone().unwrap();
    let restored_id = id(&volumes.get(&restored).await.unwrap());
    let data_id = id(&volumes.get("data").await.unwrap());
    let cloud = ec2.describe_volumes().volume_ids(&restored_id).volume_ids(&data_id).send().await.unwrap();
    for v in cloud.volumes() {
        let on: Vec<_> = v.attachments().iter().filter_map(|a| a.instance_id()).collect();
        if v.volume_id() == Some(restored_id.as_str()) {
            assert_eq!(v.snapshot_id(), Some(data_snapshot.snapshot_id.as_str()));
            assert_eq!(on, [instance_id.as_str()], "the restored copy is attached to db's instance");
        } else {
            assert!(on.is_empty(), "the original data volume is detached: {on:?}");
        }
    }
    let state = ec2.describe_instances().instance_ids(&instance_id).send().await.unwrap();
    let state = state.reservations()[0].instances()[0].state().and_then(|s| s.name()).map(|n| n.as_str().to_owned());
    assert_eq!(state.as_deref(), Some("running"), "the instance was started again");
}
