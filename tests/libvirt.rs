//! The libvirt provider against a real libvirtd booting real QEMU VMs (TCG)
//! of the Debian image hack/libvirt/image.sh builds: a Machine boots, is
//! reached with the host key the operator injected, gets a system pushed
//! and activated, stops and starts with the same disk; a crash between the
//! domain's define and the status write leaves one domain; deleting the
//! Machine and its Network leaves nothing on the hypervisor.

mod support;

use std::time::Instant;

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use nixops_operator::api::machine::MachinePhase;
use nixops_operator::api::{Machine, Network, Volume};
use serde_json::json;
use support::fleet::{Fleet, nonce, system};
use support::libvirt::{Hypervisor, ONE_AT_A_TIME, VM_TIMEOUT, hypervisor, ssh};
use support::node::Activation;

async fn start_fleet(prefix: &str, hv: &Hypervisor, subnet: u8) -> Fleet {
    let fleet = Fleet::start(prefix, json!({"provider": hv.network_provider(subnet)})).await;
    let networks: Api<Network> = Api::namespaced(fleet.client.clone(), &fleet.ns);
    support::wait_for(&networks, "net", VM_TIMEOUT, "Network Ready", |n| {
        n.status.as_ref().is_some_and(|s| support::is_ready(&s.conditions) && s.vpc_id.is_some())
    })
    .await;
    fleet
}

async fn create_machine(fleet: &Fleet, hv: &Hypervisor, name: &str, nixos: Option<&str>) {
    create_machine_with(fleet, hv, name, nixos, json!({})).await
}

async fn create_machine_with(
    fleet: &Fleet,
    hv: &Hypervisor,
    name: &str,
    nixos: Option<&str>,
    extra: serde_json::Value,
) {
    let mut spec = json!({
        "networkRef": {"name": "net"},
        "provider": hv.machine_provider(),
        "ssh": {"keyPairRef": {"name": "deployer"}},
    });
    if let (Some(spec), Some(extra)) = (spec.as_object_mut(), extra.as_object()) {
        spec.extend(extra.clone());
    }
    if let Some(closure) = nixos {
        spec["nixos"] = json!({"closure": closure});
    }
    let machine: Machine = serde_json::from_value(json!({
        "apiVersion": "nixops.io/v1alpha1", "kind": "Machine", "metadata": {"name": name}, "spec": spec
    }))
    .unwrap();
    fleet.machines.create(&PostParams::default(), &machine).await.unwrap();
}

async fn wait_phase(fleet: &Fleet, name: &str, phase: MachinePhase) -> Machine {
    support::wait_for(&fleet.machines, name, VM_TIMEOUT, &format!("phase {phase:?} and Ready"), |m| {
        m.status.as_ref().is_some_and(|s| {
            s.phase == Some(phase) && support::is_ready(&s.conditions) && s.observed_generation == m.metadata.generation
        })
    })
    .await;
    fleet.machines.get(name).await.unwrap()
}

async fn private_key(fleet: &Fleet) -> String {
    let secret = Api::<Secret>::namespaced(fleet.client.clone(), &fleet.ns).get("deployer-ssh").await.unwrap();
    let data = secret.data.unwrap();
    String::from_utf8(data["ssh-privatekey"].0.clone()).unwrap()
}

/// Runs `command` in the machine over SSH, pinning the host key its status records.
async fn exec(fleet: &Fleet, machine: &Machine, command: &str) -> String {
    let status = machine.status.clone().unwrap();
    let address = status.addresses.first().expect("an address").address.clone();
    let host_key = status.host_key.expect("status.hostKey");
    let out = ssh(&address, &private_key(fleet).await, &host_key, command);
    assert!(out.status.success(), "ssh {address} {command:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Deletes the Machines and the Network and waits until they are gone.
async fn delete_all(fleet: &Fleet, machines: &[&str]) {
    for name in machines {
        fleet.machines.delete(name, &DeleteParams::default()).await.unwrap();
    }
    let networks: Api<Network> = Api::namespaced(fleet.client.clone(), &fleet.ns);
    networks.delete("net", &DeleteParams::default()).await.unwrap();
    for name in machines {
        support::wait_gone(&fleet.machines, name, VM_TIMEOUT).await;
    }
    support::wait_gone(&networks, "net", VM_TIMEOUT).await;
}

fn owned_by(names: &[String], ns: &str) -> Vec<String> {
    names.iter().filter(|n| n.starts_with(&format!("{ns}-"))).cloned().collect()
}

#[tokio::test]
async fn machine_boots_with_injected_host_key_deploys_stops_starts_and_deletes() {
    let _vm = ONE_AT_A_TIME.lock().await;
    let hv = hypervisor();
    let fleet = start_fleet("lv-life", hv, 1).await;
    let network_name = Api::<Network>::namespaced(fleet.client.clone(), &fleet.ns)
        .get("net")
        .await
        .unwrap()
        .status
        .unwrap()
        .vpc_id
        .unwrap();
    assert!(hv.networks().contains(&network_name), "libvirt network {network_name} in {:?}", hv.networks());

    let closure = system("web", &nonce(), &[("motd", "hello from a libvirt VM")], Activation::Ok);
    let applied = Instant::now();
    create_machine(&fleet, hv, "web", Some(&closure)).await;
    support::wait_for(&fleet.machines, "web", VM_TIMEOUT, "Ready with the system deployed", |m| {
        m.status
            .as_ref()
            .is_some_and(|s| s.closure.as_deref() == Some(closure.as_str()) && support::is_ready(&s.conditions))
    })
    .await;
    let machine = fleet.machines.get("web").await.unwrap();
    eprintln!("figure: kubectl apply -> Ready with a deployed system, one VM: {:?}", applied.elapsed());
    eprintln!("figure: QEMU RSS per VM (KiB): {:?}", hv.qemu_rss_kib());
    let status = machine.status.clone().unwrap();
    let uid = machine.metadata.uid.clone().unwrap();
    assert_eq!(status.provider_id.as_deref(), Some(format!("libvirt:///{uid}").as_str()));

    // The host key is the one the operator generated and put in the seed
    // and the domain's metadata; it was pinned, never learnt on first use.
    let metadata = hv.virsh(&["metadata", &uid, "--uri", "https://nixops.io/libvirt/v1"]);
    let host_key = status.host_key.clone().expect("status.hostKey");
    assert!(metadata.contains(&format!("hostKey=\"{host_key}")), "{host_key} not in the domain metadata {metadata}");
    let reasons = fleet.event_reasons().await;
    assert!(!reasons.iter().any(|r| r == "HostKeyRecorded"), "host key learnt on first use: {reasons:?}");

    // The system is active inside the VM.
    assert_eq!(exec(&fleet, &machine, "readlink /run/current-system").await, closure);
    exec(&fleet, &machine, "echo kept > /root/marker && sync").await;

    // running: false stops the domain; true starts it with the same disk.
    let patch = json!({"spec": {"running": false}});
    fleet.machines.patch("web", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    wait_phase(&fleet, "web", MachinePhase::Stopped).await;
    assert_eq!(hv.domain_state(&uid), "shut off");
    let patch = json!({"spec": {"running": true}});
    fleet.machines.patch("web", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    let restarted = wait_phase(&fleet, "web", MachinePhase::Running).await;
    assert_eq!(hv.domain_state(&uid), "running");
    assert_eq!(exec(&fleet, &restarted, "cat /root/marker").await, "kept");

    // Deleting the Machine and the Network leaves nothing on the hypervisor.
    delete_all(&fleet, &["web"]).await;
    assert_eq!(owned_by(&hv.domains(), &fleet.ns), Vec::<String>::new(), "domains left");
    assert_eq!(owned_by(&hv.volumes(), &fleet.ns), Vec::<String>::new(), "volumes left");
    assert!(!hv.networks().contains(&network_name), "network left: {:?}", hv.networks());
}

#[tokio::test]
async fn killed_between_define_and_status_write_leaves_one_domain() {
    let _vm = ONE_AT_A_TIME.lock().await;
    let hv = hypervisor();
    let mut fleet = start_fleet("lv-crash", hv, 2).await;
    fleet.restart_operator(&[("FAILPOINTS", "libvirt-after-define=return(kill)")]);
    create_machine(&fleet, hv, "db", None).await;
    let status = fleet.operator.wait_exit(VM_TIMEOUT).expect("the operator is killed at libvirt-after-define");
    assert!(!status.success());

    // Defined, not started, and nothing recorded: no ID, no status.
    let machine = fleet.machines.get("db").await.unwrap();
    let uid = machine.metadata.uid.clone().unwrap();
    assert_eq!(owned_by(&hv.domains(), &fleet.ns).len(), 1, "{:?}", hv.domains());
    assert_eq!(hv.domain_state(&uid), "shut off");
    assert!(machine.status.as_ref().and_then(|s| s.provider_id.clone()).is_none());

    // A new operator finds the domain by the Machine's UID and starts it.
    fleet.restart_operator(&[]);
    let machine = wait_phase(&fleet, "db", MachinePhase::Running).await;
    assert_eq!(owned_by(&hv.domains(), &fleet.ns).len(), 1, "{:?}", hv.domains());
    assert_eq!(hv.domain_state(&uid), "running");
    let status = machine.status.unwrap();
    assert_eq!(status.provider_id.as_deref(), Some(format!("libvirt:///{uid}").as_str()));
    // Reached with the key injected before the crash.
    let metadata = hv.virsh(&["metadata", &uid, "--uri", "https://nixops.io/libvirt/v1"]);
    assert!(metadata.contains(status.host_key.as_deref().unwrap()), "{metadata}");

    delete_all(&fleet, &["db"]).await;
    assert_eq!(owned_by(&hv.domains(), &fleet.ns), Vec::<String>::new());
    assert_eq!(owned_by(&hv.volumes(), &fleet.ns), Vec::<String>::new());
}

/// The guest's view of the disk whose serial is `serial`: "<dev> <512-byte sectors>".
const FIND_DISK: &str =
    "for d in /sys/block/vd*; do [ \"$(cat $d/serial 2>/dev/null)\" = data ] && echo ${d##*/} $(cat $d/size); done";

#[tokio::test]
async fn volume_is_a_block_device_of_its_size_grows_in_place_and_survives_a_power_cycle() {
    let _vm = ONE_AT_A_TIME.lock().await;
    let hv = hypervisor();
    let fleet = start_fleet("lv-vol", hv, 3).await;
    let volumes: Api<Volume> = Api::namespaced(fleet.client.clone(), &fleet.ns);
    let volume: Volume = serde_json::from_value(json!({
        "apiVersion": "nixops.io/v1alpha1", "kind": "Volume", "metadata": {"name": "data"},
        "spec": {"networkRef": {"name": "net"}, "provider": {"libvirt": {"sizeGiB": 1}}}
    }))
    .unwrap();
    volumes.create(&PostParams::default(), &volume).await.unwrap();
    let volumes_spec = json!({"volumes": [{"volumeRef": {"name": "data"}, "device": "/dev/vdb"}]});
    create_machine_with(&fleet, hv, "db", None, volumes_spec).await;
    wait_phase(&fleet, "db", MachinePhase::Running).await;
    let attached = |size: i32| {
        move |v: &Volume| {
            v.status.as_ref().is_some_and(|s| {
                support::is_ready(&s.conditions)
                    && s.size_gib == Some(size)
                    && s.attached_to.as_ref().is_some_and(|a| a.machine == "db" && a.device == "/dev/vdb")
            })
        }
    };
    support::wait_for(&volumes, "data", VM_TIMEOUT, "attached to db, 1 GiB", attached(1)).await;
    let machine = fleet.machines.get("db").await.unwrap();
    // Hot-plugged into the running guest: a 1 GiB disk with serial "data".
    let found = exec(&fleet, &machine, FIND_DISK).await;
    let (dev, sectors) = found.split_once(' ').unwrap_or_else(|| panic!("no disk with serial data: {found:?}"));
    assert_eq!(sectors, (1u64 << 30 >> 9).to_string(), "{found}");
    exec(
        &fleet,
        &machine,
        &format!("echo kept-on-volume | dd of=/dev/{dev} bs=512 count=1 conv=sync,fsync 2>/dev/null"),
    )
    .await;

    // Grown in place while attached: the guest sees 2 GiB at once.
    let patch = json!({"spec": {"provider": {"libvirt": {"sizeGiB": 2}}}});
    volumes.patch("data", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    support::wait_for(&volumes, "data", VM_TIMEOUT, "grown to 2 GiB", attached(2)).await;
    let found = exec(&fleet, &machine, FIND_DISK).await;
    assert!(found.ends_with(&format!(" {}", 2u64 << 30 >> 9)), "{found}");

    // Powered off and on again: the disk is part of the domain, data intact.
    for running in [false, true] {
        let patch = json!({"spec": {"running": running}});
        fleet.machines.patch("db", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
        let phase = if running { MachinePhase::Running } else { MachinePhase::Stopped };
        wait_phase(&fleet, "db", phase).await;
    }
    let machine = fleet.machines.get("db").await.unwrap();
    let found = exec(&fleet, &machine, FIND_DISK).await;
    let (dev, sectors) = found.split_once(' ').unwrap_or_else(|| panic!("disk gone after the power cycle: {found:?}"));
    assert_eq!(sectors, (2u64 << 30 >> 9).to_string());
    let head = exec(&fleet, &machine, &format!("head -c 14 /dev/{dev}")).await;
    assert_eq!(head, "kept-on-volume");

    // Deleting the Machine, the Volume and the Network leaves nothing.
    fleet.machines.delete("db", &DeleteParams::default()).await.unwrap();
    support::wait_gone(&fleet.machines, "db", VM_TIMEOUT).await;
    volumes.delete("data", &DeleteParams::default()).await.unwrap();
    support::wait_gone(&volumes, "data", VM_TIMEOUT).await;
    delete_all(&fleet, &[]).await;
    assert_eq!(owned_by(&hv.domains(), &fleet.ns), Vec::<String>::new());
    assert_eq!(owned_by(&hv.volumes(), &fleet.ns), Vec::<String>::new());
}

#[tokio::test]
async fn an_orphaned_volume_stays_in_the_pool() {
    let hv = hypervisor();
    let fleet = start_fleet("lv-orphan", hv, 4).await;
    let volumes: Api<Volume> = Api::namespaced(fleet.client.clone(), &fleet.ns);
    let volume: Volume = serde_json::from_value(json!({
        "apiVersion": "nixops.io/v1alpha1", "kind": "Volume", "metadata": {"name": "keep"},
        "spec": {"networkRef": {"name": "net"}, "provider": {"libvirt": {"sizeGiB": 1, "format": "raw"}},
                 "deletionPolicy": "Orphan"}
    }))
    .unwrap();
    volumes.create(&PostParams::default(), &volume).await.unwrap();
    support::wait_for(&volumes, "keep", VM_TIMEOUT, "Ready", |v| {
        v.status.as_ref().is_some_and(|s| support::is_ready(&s.conditions) && s.size_gib == Some(1))
    })
    .await;
    let name = volumes.get("keep").await.unwrap().status.unwrap().volume_id.unwrap();
    assert!(name.ends_with(".img") && hv.volumes().contains(&name), "{name} in {:?}", hv.volumes());
    volumes.delete("keep", &DeleteParams::default()).await.unwrap();
    support::wait_gone(&volumes, "keep", VM_TIMEOUT).await;
    delete_all(&fleet, &[]).await;
    assert!(hv.volumes().contains(&name), "the orphaned volume {name} was deleted: {:?}", hv.volumes());
    hv.virsh(&["vol-delete", &name, "--pool", "default"]);
}
