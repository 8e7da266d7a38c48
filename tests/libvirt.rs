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
use support::libvirt::{
    Hypervisor, ONE_AT_A_TIME, VM_TIMEOUT, create_machine_with, delete_all, exec, hypervisor, private_key, ssh,
    start_fleet,
};
use support::node::Activation;

/// The name of the Network's libvirt network (its status.vpcId).
async fn libvirt_network(fleet: &Fleet) -> String {
    let network = Api::<Network>::namespaced(fleet.client.clone(), &fleet.ns).get("net").await.unwrap();
    network.status.and_then(|s| s.vpc_id).expect("status.vpcId")
}

async fn create_machine(fleet: &Fleet, hv: &Hypervisor, name: &str, nixos: Option<&str>) {
    create_machine_with(fleet, hv, name, nixos, json!({})).await
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

fn owned_by(names: &[String], ns: &str) -> Vec<String> {
    names.iter().filter(|n| n.starts_with(&format!("{ns}-"))).cloned().collect()
}

/// Inside the test VM: replaces the QEMU guest agent with one that answers
/// `guest-sync` and nothing else, in the background.
const HUNG_AGENT: &str = r#"mv /usr/sbin/qemu-ga /usr/sbin/qemu-ga.off && pkill -x qemu-ga; sleep 1
for p in /sys/class/virtio-ports/*; do [ "$(cat $p/name)" = org.qemu.guest_agent.0 ] && port=/dev/${p##*/}; done
cat > /run/hung-agent <<'EOF'
exec 3<>"$1"
while read -r line <&3; do
  case $line in *guest-sync*) printf '{"return": %s}\n' "$(printf %s "${line##*id}" | tr -dc 0-9)" >&3 ;; esac
done
EOF
setsid sh /run/hung-agent "$port" </dev/null >/dev/null 2>&1 &"#;

#[tokio::test]
async fn machine_boots_with_injected_host_key_deploys_stops_starts_and_deletes() {
    let _vm = ONE_AT_A_TIME.lock().await;
    let hv = hypervisor();
    let fleet = start_fleet("lv-life", hv, 1).await;
    let network_name = libvirt_network(&fleet).await;
    assert!(hv.networks().contains(&network_name), "libvirt network {network_name} in {:?}", hv.networks());

    // A second libvirt network the machine is in too (isolated, DHCP).
    let extra = format!("{}-extra", fleet.ns);
    let extra_xml = format!(
        "<network><name>{extra}</name><ip address='10.{o}.101.1' netmask='255.255.255.0'><dhcp>\
         <range start='10.{o}.101.10' end='10.{o}.101.100'/></dhcp></ip></network>",
        o = hv.octet
    );
    let extra_file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(extra_file.path(), extra_xml).unwrap();
    hv.virsh(&["net-create", &extra_file.path().to_string_lossy()]);
    // And a third without DHCP, where only the guest knows its address.
    let static_net = format!("{}-static", fleet.ns);
    let static_xml = format!(
        "<network><name>{static_net}</name><ip address='10.{o}.102.1' netmask='255.255.255.0'/></network>",
        o = hv.octet
    );
    std::fs::write(extra_file.path(), static_xml).unwrap();
    hv.virsh(&["net-create", &extra_file.path().to_string_lossy()]);

    let closure = system("web", &nonce(), &[("motd", "hello from a libvirt VM")], Activation::Ok);
    let mut provider = hv.machine_provider();
    provider["libvirt"]["networks"] = json!([extra, static_net]);
    provider["libvirt"]["extraDevicesXML"] = json!("<watchdog model='i6300esb' action='reset'/>");
    provider["libvirt"]["extraDomainXML"] = json!("<description>from extraDomainXML</description>");
    let applied = Instant::now();
    create_machine_with(&fleet, hv, "web", Some(&closure), json!({"provider": provider})).await;
    let machine = fleet.wait_running_within("web", &closure, VM_TIMEOUT).await;
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

    // An interface in each network, SSH on the Network's own; the escape
    // hatches are in the domain as written.
    let in_net = |a: &str, subnet: u8| a.starts_with(&format!("10.{}.{subnet}.", hv.octet));
    support::wait_for(&fleet.machines, "web", VM_TIMEOUT, "an address in each network", |m| {
        let addresses: Vec<&str> = m.status.iter().flat_map(|s| &s.addresses).map(|a| a.address.as_str()).collect();
        addresses.len() == 2 && in_net(addresses[0], 1) && in_net(addresses[1], 101)
    })
    .await;
    let machine = fleet.machines.get("web").await.unwrap();
    let second = machine.status.as_ref().unwrap().addresses[1].address.clone();
    assert!(exec(&fleet, &machine, "busybox ip -4 -o addr show eth1").await.contains(&format!(" {second}/")));
    // An address set inside the guest on the network without DHCP has no
    // lease: the machine's guest agent reports it.
    let static_address = format!("10.{}.102.5", hv.octet);
    exec(&fleet, &machine, &format!("busybox ip link set eth2 up && busybox ip addr add {static_address}/24 dev eth2"))
        .await;
    support::wait_for(&fleet.machines, "web", VM_TIMEOUT, "the guest agent's address on the third network", |m| {
        let addresses: Vec<&str> = m.status.iter().flat_map(|s| &s.addresses).map(|a| a.address.as_str()).collect();
        addresses.len() == 3 && addresses[2] == static_address
    })
    .await;
    // An agent that answers libvirt's sync and then never answers the
    // query (libvirt waits for it without limit): the real agent is put
    // away and a stand-in holds its port. Looking at the machine must still
    // end, so the stop below happens.
    exec(&fleet, &machine, HUNG_AGENT).await;

    let domain_xml = hv.virsh(&["dumpxml", &uid]);
    assert!(domain_xml.contains("<watchdog model='i6300esb' action='reset'"), "{domain_xml}");
    assert_eq!(hv.virsh(&["desc", &uid]).trim(), "from extraDomainXML");
    exec(&fleet, &machine, "echo kept > /root/marker && sync").await;

    // running: false stops the domain; true starts it with the same disk.
    let patch = json!({"spec": {"running": false}});
    fleet.machines.patch("web", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    wait_phase(&fleet, "web", MachinePhase::Stopped).await;
    assert_eq!(hv.domain_state(&uid), "shut off");
    let logs = fleet.operator.logs();
    assert!(logs.contains("the guest agent has not answered"), "the stand-in agent was not asked:\n{logs}");
    // The guest powered itself off (the ACPI button), it was not pulled
    // out (destroyed) after the grace period.
    let reason = hv.virsh(&["domstate", "--reason", &uid]);
    assert!(reason.contains("(shutdown)"), "stopped as {reason:?}, not by the guest's clean shutdown");
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
    hv.virsh(&["net-destroy", &extra]);
    hv.virsh(&["net-destroy", &static_net]);
}

#[tokio::test]
async fn killed_between_define_and_status_write_leaves_one_domain() {
    let _vm = ONE_AT_A_TIME.lock().await;
    let hv = hypervisor();
    let mut fleet = start_fleet("lv-crash", hv, 2).await;
    // Killed once the create-pending mark is written, before libvirt hears
    // of the domain: the mark stays and nothing exists.
    fleet.restart_operator(&[("FAILPOINTS", "create-before-call:instance=return(kill)")]);
    create_machine(&fleet, hv, "db", None).await;
    let status = fleet.operator.wait_exit(VM_TIMEOUT).expect("the operator is killed at create-before-call");
    assert!(!status.success());
    let machine = fleet.machines.get("db").await.unwrap();
    let annotations = machine.metadata.annotations.clone().unwrap_or_default();
    assert!(annotations.contains_key("nixops.io/create-pending"), "{annotations:?}");
    assert_eq!(owned_by(&hv.domains(), &fleet.ns), Vec::<String>::new());

    // libvirt's lookup by UUID is immediate: the next operator takes the
    // mark without a domain as a create that never happened and creates at
    // once, neither waiting out the pending window (120 s) nor stalling
    // with CreateOutcomeUnknown. It is killed after its define.
    let restarted = Instant::now();
    fleet.restart_operator(&[("FAILPOINTS", "libvirt-after-define=return(kill)")]);
    let status = fleet.operator.wait_exit(VM_TIMEOUT).expect("the operator is killed at libvirt-after-define");
    assert!(!status.success());
    eprintln!("figure: restart -> domain defined after a crash before the create: {:?}", restarted.elapsed());

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
const FIND_DISK: &str = "for d in /sys/block/vd*; do [ \"$(cat $d/serial 2>/dev/null)\" = data ] && echo ${d##*/} $(cat $d/size); done; true";

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

    // More memory: the domain is defined anew (keeping the hot-plugged
    // volume) and says it needs a power cycle; the guest still has the old.
    let mem_total = |text: String| -> u64 {
        text.split_whitespace().nth(1).and_then(|kib| kib.parse().ok()).unwrap_or_else(|| panic!("MemTotal: {text}"))
    };
    let before = mem_total(exec(&fleet, &machine, "grep MemTotal /proc/meminfo").await);
    let patch = json!({"spec": {"provider": {"libvirt": {"memoryMiB": 384}}}});
    fleet.machines.patch("db", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    let restart_required = |m: &Machine| {
        m.status.as_ref().and_then(|s| support::condition(&s.conditions, "RestartRequired")) == Some("True".into())
    };
    support::wait_for(&fleet.machines, "db", VM_TIMEOUT, "RestartRequired", restart_required).await;
    let uid = machine.metadata.uid.clone().unwrap();
    let defined = hv.virsh(&["dumpxml", "--inactive", &uid]);
    assert!(defined.contains("<memory unit='KiB'>393216</memory>"), "{defined}");
    let volume_id = volumes.get("data").await.unwrap().status.unwrap().volume_id.unwrap();
    assert!(defined.contains(&format!("volume='{volume_id}'")), "the volume left the definition: {defined}");
    let live = hv.virsh(&["dumpxml", &uid]);
    assert!(live.contains("<memory unit='KiB'>262144</memory>"), "{live}");

    // Powered off and on again: the disk is part of the domain, data intact,
    // and the new definition runs.
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
    assert!(!restart_required(&machine), "RestartRequired after the power cycle");
    let after = mem_total(exec(&fleet, &machine, "grep MemTotal /proc/meminfo").await);
    assert!(after > before + 100 * 1024, "MemTotal {before} KiB -> {after} KiB");

    // Detached while the guest is paused: libvirt drops the disk from the
    // definition at once but the guest holds it until it runs again. The
    // Volume waits for that unplug (Detaching), instead of asking again and
    // failing on the definition that no longer has the disk.
    hv.virsh(&["suspend", &uid]);
    let patch = json!({"spec": {"volumes": []}});
    fleet.machines.patch("db", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    let unplugging = Instant::now();
    let mut seen = Vec::new();
    while unplugging.elapsed() < std::time::Duration::from_secs(20) {
        let conditions = volumes.get("data").await.unwrap().status.map(|s| s.conditions).unwrap_or_default();
        seen.extend(conditions.into_iter().filter(|c| c.status != "True").map(|c| (c.reason, c.message)));
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    assert!(!seen.iter().any(|(reason, _)| reason == "Retrying"), "the unplug under way failed: {seen:?}");
    assert!(
        seen.iter().any(|(reason, message)| reason == "Detaching" && message.contains("detaching from")),
        "{seen:?}"
    );
    assert!(hv.virsh(&["dumpxml", &uid]).contains(&format!("volume='{volume_id}'")), "the guest let go while paused");
    hv.virsh(&["resume", &uid]);
    support::wait_for(&volumes, "data", VM_TIMEOUT, "detached once the guest runs", |v| {
        v.status.as_ref().is_some_and(|s| s.attached_to.is_none() && support::is_ready(&s.conditions))
    })
    .await;
    assert!(!hv.virsh(&["dumpxml", &uid]).contains(&format!("volume='{volume_id}'")));
    assert_eq!(exec(&fleet, &machine, FIND_DISK).await, "", "the guest still has the disk");

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

/// A fresh ed25519 public key no host has.
fn stranger_key() -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("k");
    support::ssh_keygen(&path);
    std::fs::read_to_string(path.with_extension("pub")).unwrap().trim().to_owned()
}

/// The hypervisor reached as a remote one, `qemu+ssh://root@HOST/system`:
/// a wrong pinned host key stops everything before anything is sent or
/// created; with the right one the Network's NAT network is created over
/// SSH, a Machine boots there from a base image that is a pool volume and
/// is deployed through the hypervisor (the only host that reaches it), and
/// deleting everything leaves nothing and releases the credentials Secret.
#[tokio::test]
async fn remote_hypervisor_over_ssh_with_a_pinned_host_key() {
    let _vm = ONE_AT_A_TIME.lock().await;
    let hv = hypervisor();
    let wrong = stranger_key();
    let fleet =
        Fleet::start("lv-remote", json!({"provider": hv.remote_network_provider(5, "hypervisor", &wrong)})).await;
    let secrets: Api<Secret> = Api::namespaced(fleet.client.clone(), &fleet.ns);
    let secret: Secret = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "hypervisor"},
        "type": "kubernetes.io/ssh-auth", "stringData": {"ssh-privatekey": hv.remote.private_key},
    }))
    .unwrap();
    secrets.create(&PostParams::default(), &secret).await.unwrap();
    let networks: Api<Network> = Api::namespaced(fleet.client.clone(), &fleet.ns);

    // The hypervisor presents another key: stalled, naming the field; the
    // hypervisor has no network of this namespace.
    support::wait_for(&networks, "net", VM_TIMEOUT, "Stalled HypervisorHostKeyMismatch", |n| {
        n.status.as_ref().is_some_and(|s| {
            s.conditions.iter().any(|c| {
                c.type_ == "Stalled"
                    && c.status == "True"
                    && c.reason == "HypervisorHostKeyMismatch"
                    && c.message.contains("spec.provider.libvirt.ssh.hostKey")
            })
        })
    })
    .await;
    assert_eq!(owned_by(&hv.networks(), &fleet.ns), Vec::<String>::new(), "created despite the wrong host key");
    let held = secrets.get("hypervisor").await.unwrap();
    assert!(
        held.metadata.finalizers.unwrap_or_default().iter().any(|f| f.starts_with("nixops.io/")),
        "Secret not held"
    );

    // The right key: the network is created through the SSH connection.
    let patch = json!({"spec": {"provider": {"libvirt": {"ssh": {"hostKey": hv.remote.host_key}}}}});
    networks.patch("net", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    support::wait_for(&networks, "net", VM_TIMEOUT, "Network Ready", |n| {
        n.status.as_ref().is_some_and(|s| support::is_ready(&s.conditions) && s.vpc_id.is_some())
    })
    .await;
    let network_name = libvirt_network(&fleet).await;
    assert!(hv.networks().contains(&network_name), "{network_name} in {:?}", hv.networks());

    // A machine in the NAT network, deployed through the hypervisor, its
    // disk an overlay of an image that is a volume of the pool.
    let closure = system("web", &nonce(), &[("motd", "hello from a remote hypervisor")], Activation::Ok);
    let mut provider = hv.machine_provider();
    provider["libvirt"]["baseImage"] = json!(hv.base_volume());
    let applied = Instant::now();
    create_machine_with(&fleet, hv, "web", Some(&closure), json!({"provider": provider})).await;
    fleet.wait_running_within("web", &closure, VM_TIMEOUT).await;
    eprintln!("figure: kubectl apply -> Ready, one VM on a remote hypervisor: {:?}", applied.elapsed());
    let status = fleet.machines.get("web").await.unwrap().status.unwrap();
    let address = status.addresses.first().expect("an address").address.clone();
    let host_key = status.host_key.clone().expect("status.hostKey");
    let key = private_key(&fleet).await;
    let inside =
        support::libvirt::ssh_from(Some(&hv.remote.ns_pid), &address, &key, &host_key, "readlink /run/current-system");
    assert!(inside.status.success(), "{}", String::from_utf8_lossy(&inside.stderr));
    assert_eq!(String::from_utf8_lossy(&inside.stdout).trim(), closure);
    // kubectl nixops ssh goes through the hypervisor as the operator does.
    let out = support::plugin::run(&fleet.ns, &["ssh", "web", "--", "readlink /run/current-system"]);
    assert!(out.status.success(), "{}", support::plugin::text(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), closure);
    // The operator's host cannot reach the machine itself: the deploy went
    // through the hypervisor.
    let direct = ssh(&address, &key, &host_key, "true");
    assert!(!direct.status.success(), "{address} is reachable directly, so the jump was not tested");

    delete_all(&fleet, &["web"]).await;
    assert_eq!(owned_by(&hv.domains(), &fleet.ns), Vec::<String>::new(), "domains left");
    assert_eq!(owned_by(&hv.volumes(), &fleet.ns), Vec::<String>::new(), "volumes left");
    assert!(!hv.networks().contains(&network_name), "network left: {:?}", hv.networks());
    let released = secrets.get("hypervisor").await.unwrap();
    assert!(
        !released.metadata.finalizers.unwrap_or_default().iter().any(|f| f.starts_with("nixops.io/")),
        "the credentials Secret is still held"
    );
}

/// `python3 -m http.server` on loopback serving `dir`, stopped when dropped;
/// its log lists the requests.
struct FileServer {
    child: std::process::Child,
    port: u16,
    log: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl FileServer {
    fn start(dir: &std::path::Path) -> Self {
        let logs = tempfile::tempdir().unwrap();
        let log = logs.path().join("http.log");
        let port = support::free_port();
        let mut child = std::process::Command::new("python3")
            .args(["-m", "http.server", "--bind", "127.0.0.1", "--directory"])
            .arg(dir)
            .arg(port.to_string())
            .stderr(std::fs::File::create(&log).unwrap())
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("start python3 -m http.server");
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Self { child, port, log, _dir: logs };
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("http.server did not listen on {port}");
    }

    /// How many GETs of `path` were answered 200.
    fn served(&self, path: &str) -> usize {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        log.lines().filter(|l| l.contains(&format!("\"GET {path} ")) && l.contains("\" 200 ")).count()
    }
}

impl Drop for FileServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A baseImage URL: a wrong checksum stalls the Machine and uploads
/// nothing; with the right one, two Machines share one download, uploaded
/// once into the pool as the Network's volume, which their overlays are
/// backed by; deleting the Network deletes it. The machines stay powered
/// off (running: false): no VM boots here.
#[tokio::test]
async fn base_image_from_a_url_is_checked_uploaded_once_and_kept_only_for_orphaned_overlays() {
    let hv = hypervisor();
    let server = FileServer::start(&hv.image);
    let out = std::process::Command::new("sha256sum").arg(hv.image.join("base.qcow2")).output().unwrap();
    let sha256 = String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap().to_owned();
    let url = format!("http://127.0.0.1:{}/base.qcow2", server.port);
    let fleet = start_fleet("lv-url", hv, 6).await;
    let network_name = libvirt_network(&fleet).await;
    let image_volumes = || -> Vec<String> {
        hv.volumes().into_iter().filter(|v| v.starts_with(&format!("{network_name}-base-"))).collect()
    };
    let provider = |sha: &str| {
        let mut provider = hv.machine_provider();
        provider["libvirt"]["baseImage"] = json!(url);
        provider["libvirt"]["baseImageSha256"] = json!(sha);
        json!({"provider": provider, "running": false})
    };

    // A wrong checksum: stalled, naming the field; nothing in the pool.
    let wrong = "0".repeat(64);
    create_machine_with(&fleet, hv, "bad", None, provider(&wrong)).await;
    let stalled = fleet.wait_stalled("bad", "BaseImageChecksumMismatch").await;
    let message = support::condition_message(&stalled.status.unwrap().conditions, "Stalled");
    assert!(message.contains("baseImageSha256") && message.contains(&sha256), "{message}");
    assert_eq!(image_volumes(), Vec::<String>::new(), "uploaded despite the wrong checksum");
    assert_eq!(owned_by(&hv.domains(), &fleet.ns), Vec::<String>::new(), "defined despite the wrong checksum");
    // Retried at every resync (2 s here) without downloading it again.
    let refused = server.served("/base.qcow2");
    tokio::time::sleep(std::time::Duration::from_secs(8)).await;
    assert_eq!(server.served("/base.qcow2"), refused, "the refused image was downloaded again");
    fleet.machines.delete("bad", &DeleteParams::default()).await.unwrap();
    support::wait_gone(&fleet.machines, "bad", VM_TIMEOUT).await;

    // The right one: two machines, one download, one volume behind both
    // overlays. b's domain is to be kept when b is deleted.
    let before = server.served("/base.qcow2");
    create_machine_with(&fleet, hv, "a", None, provider(&sha256)).await;
    let mut orphan = provider(&sha256);
    orphan["deletionPolicy"] = json!("Orphan");
    create_machine_with(&fleet, hv, "b", None, orphan).await;
    for name in ["a", "b"] {
        wait_phase(&fleet, name, MachinePhase::Stopped).await;
    }
    let images = image_volumes();
    assert_eq!(images.len(), 1, "{images:?}");
    assert_eq!(server.served("/base.qcow2") - before, 1, "downloads for two machines");
    let image_path = hv.virsh(&["vol-path", &images[0], "--pool", "default"]).trim().to_owned();
    let compared = std::process::Command::new("qemu-img")
        .arg("compare")
        .arg(hv.image.join("base.qcow2"))
        .arg(&image_path)
        .output()
        .unwrap();
    assert!(compared.status.success(), "the pool's copy differs: {}", support::plugin::text(&compared));
    let mut overlays = Vec::new();
    for name in ["a", "b"] {
        let uid = fleet.machines.get(name).await.unwrap().metadata.uid.unwrap();
        let overlay = owned_by(&hv.volumes(), &fleet.ns)
            .into_iter()
            .find(|v| v.ends_with(&format!("-{}.qcow2", &uid.replace('-', "")[..8])))
            .unwrap_or_else(|| panic!("no overlay of {name} in {:?}", hv.volumes()));
        let xml = hv.virsh(&["vol-dumpxml", &overlay, "--pool", "default"]);
        assert!(xml.contains(&format!("<path>{image_path}</path>")), "{overlay} is not backed by {image_path}: {xml}");
        overlays.push(overlay);
    }

    // Deleting the Network keeps the image while b's kept overlay needs it:
    // qemu-img still reads the orphaned disk to its end.
    delete_all(&fleet, &["a", "b"]).await;
    assert_eq!(image_volumes(), images, "the image behind the orphaned domain's disk was deleted");
    let volumes = hv.volumes();
    assert!(!volumes.contains(&overlays[0]) && volumes.contains(&overlays[1]), "{volumes:?}");
    let orphan_disk = hv.virsh(&["vol-path", &overlays[1], "--pool", "default"]).trim().to_owned();
    let read = std::process::Command::new("qemu-img").args(["compare", &image_path, &orphan_disk]).output().unwrap();
    assert!(read.status.success(), "the orphaned disk cannot be read: {}", support::plugin::text(&read));
    let domains = owned_by(&hv.domains(), &fleet.ns);
    assert_eq!(domains.len(), 1, "only b's domain is kept: {domains:?}");

    // What the orphaned domain held is the user's to delete; then nothing is left.
    hv.virsh(&["undefine", &domains[0]]);
    for volume in owned_by(&hv.volumes(), &fleet.ns) {
        hv.virsh(&["vol-delete", &volume, "--pool", "default"]);
    }
    assert_eq!(owned_by(&hv.volumes(), &fleet.ns), Vec::<String>::new(), "volumes left");
    assert_eq!(owned_by(&hv.domains(), &fleet.ns), Vec::<String>::new(), "domains left");
}
