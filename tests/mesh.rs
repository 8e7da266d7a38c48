//! A Network's members know each other (membership document and names on
//! every member) and, with spec.mesh.wireguard, talk over an encrypted
//! WireGuard mesh the operator configures over SSH at run time.

mod support;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Event, Secret};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use nixops_operator::api::Network;
use nixops_operator::api::network::NetworkMember;
use serde_json::json;
use support::fleet::{Fleet, TIMEOUT, nonce, system};
use support::netns::Lan;
use support::node::{Activation, NixNode, NodeSetup};

/// Polls `check` on the nodes until it holds, or panics after TIMEOUT.
async fn until(what: &str, mut check: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !check() {
        assert!(start.elapsed() < TIMEOUT, "timed out after {TIMEOUT:?} waiting until {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    start.elapsed()
}

/// The network.json a node has.
fn document(node: &NixNode) -> serde_json::Value {
    let text = node.exec_ok("cat /run/nixops/network.json 2>/dev/null || echo null");
    serde_json::from_str(&text).unwrap_or(serde_json::Value::Null)
}

fn member_names(doc: &serde_json::Value) -> BTreeSet<String> {
    doc["members"].as_array().into_iter().flatten().filter_map(|m| m["name"].as_str().map(str::to_owned)).collect()
}

/// What `name` resolves to on `node` (through its /etc/hosts), if anything.
fn resolve(node: &NixNode, name: &str) -> Option<String> {
    let out = node.exec(&format!("getent hosts {name}"));
    let text = String::from_utf8_lossy(&out.stdout);
    out.status.success().then(|| text.split_whitespace().next().unwrap_or_default().to_owned())
}

async fn members(networks: &Api<Network>) -> Vec<NetworkMember> {
    networks.get("net").await.unwrap().status.unwrap_or_default().members
}

/// Membership on loopback nodes: every member gets the document (root
/// only, every member's name, addresses and host key) and resolves the
/// others' names; a member added or removed reaches the others on the
/// membership change itself, not a closure; a mesh on members without
/// WireGuard says which module they lack.
#[tokio::test]
async fn every_member_knows_every_other_and_hears_of_changes() {
    let mut fleet = Fleet::start("membership", json!({})).await;
    // A resync far beyond the test's deadlines: membership changes must
    // reach the members by themselves.
    fleet.operator = support::Operator::start(&fleet.ns, &["--resync-seconds", "3600"]);
    let networks: Api<Network> = Api::namespaced(fleet.client.clone(), &fleet.ns);
    let closure = system("member", &nonce(), &[("hello", "hi")], Activation::Ok);
    let nodes: Vec<NixNode> = (0..3).map(|_| fleet.node()).collect();
    let names = ["m-a", "m-b", "m-c"];
    for (name, node) in names.iter().zip(&nodes) {
        fleet.create(name, node, json!({"closure": closure}), json!({})).await;
    }
    for name in names {
        fleet.wait_running(name, &closure).await;
    }
    let all: BTreeSet<String> = names.iter().map(|n| n.to_string()).collect();
    let started = Instant::now();
    let complete = |doc: &serde_json::Value| {
        member_names(doc) == all
            && doc["members"].as_array().is_some_and(|m| m.iter().all(|m| m["hostKey"].is_string()))
    };
    until("every node lists all three members with their host keys", || nodes.iter().all(|n| complete(&document(n))))
        .await;
    eprintln!("membership: all three nodes complete {:?} after the last Ready", started.elapsed());
    for (name, node) in names.iter().zip(&nodes) {
        let doc = document(node);
        assert_eq!(doc["this"], *name);
        assert_eq!(node.exec_ok("stat -c '%U %a' /run/nixops/network.json").trim(), "root 600", "root only");
        for (other, other_node) in names.iter().zip(&nodes) {
            let entry = doc["members"].as_array().unwrap().iter().find(|m| m["name"] == *other).unwrap().clone();
            assert_eq!(entry["hostKey"], other_node.host_key(), "{name} has {other}'s host key");
            assert_eq!(entry["addresses"]["ExternalIP"], other_node.host);
            assert_eq!(resolve(node, other).as_deref(), Some("127.0.0.1"), "{other} resolves on {name}");
        }
        assert!(!doc.to_string().contains("PRIVATE"), "nothing secret");
    }

    // A member leaves: the others drop it without a closure or a resync's wait.
    let activations: Vec<usize> = nodes.iter().map(|n| n.activations().len()).collect();
    let left = Instant::now();
    fleet.machines.delete("m-c", &DeleteParams::default()).await.unwrap();
    let took = until("m-a and m-b no longer list m-c", || {
        nodes[..2].iter().all(|n| !member_names(&document(n)).contains("m-c") && resolve(n, "m-c").is_none())
    })
    .await;
    eprintln!("membership: a removal reached both other members in {took:?}");
    assert!(left.elapsed() < TIMEOUT);
    // And comes back.
    fleet.create("m-c", &nodes[2], json!({"closure": closure}), json!({})).await;
    let took = until("m-a and m-b list m-c again", || {
        nodes[..2].iter().all(|n| member_names(&document(n)).contains("m-c") && resolve(n, "m-c").is_some())
    })
    .await;
    eprintln!("membership: an addition reached both other members in {took:?}");
    let after: Vec<usize> = nodes[..2].iter().map(|n| n.activations().len()).collect();
    assert_eq!(after, activations[..2], "membership changes activate nothing");

    // A mesh on machines without WireGuard: each says what it lacks and
    // which module provides it; nothing is torn down meanwhile.
    let patch = json!({"spec": {"mesh": {"wireguard": {"addressRange": "10.77.0.0/24"}}}});
    networks.patch("net", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    for name in names {
        support::wait_for(&fleet.machines, name, TIMEOUT, "MeshReady False: WireguardMissing", |m| {
            m.status.as_ref().is_some_and(|s| {
                s.conditions.iter().any(|c| {
                    c.type_ == "MeshReady"
                        && c.status == "False"
                        && c.reason == "WireguardMissing"
                        && c.message.contains("nix/nixops-network.nix")
                })
            })
        })
        .await;
    }
    support::wait_for(&networks, "net", TIMEOUT, "MeshReady False", |n| {
        n.status.as_ref().is_some_and(|s| support::condition(&s.conditions, "MeshReady").as_deref() == Some("False"))
    })
    .await;
}

/// ping's average round trip in ms from its summary line.
fn rtt(ping_output: &str) -> f64 {
    let line = ping_output.lines().find(|l| l.contains("min/avg/max")).unwrap_or_else(|| panic!("{ping_output}"));
    line.split('=').nth(1).and_then(|v| v.trim().split('/').nth(1)).and_then(|v| v.parse().ok()).unwrap()
}

/// Three nodes in network namespaces of their own on one bridge, in a
/// WireGuard mesh: they ping each other's mesh addresses while a capture on
/// the bridge sees only WireGuard's UDP between them; their names resolve
/// to mesh addresses; a key rotated by deleting its Secret and a member
/// removed reach every other member; no private key shows anywhere.
#[tokio::test]
async fn members_talk_over_an_encrypted_mesh() {
    let lan = Lan::new();
    let fleet =
        Fleet::start("mesh", json!({"mesh": {"wireguard": {"addressRange": "10.77.0.0/24", "listenPort": 51820}}}))
            .await;
    let networks: Api<Network> = Api::namespaced(fleet.client.clone(), &fleet.ns);
    let secrets: Api<Secret> = Api::namespaced(fleet.client.clone(), &fleet.ns);
    let wireguard_go = support::go_tool("hack/wireguard/build.sh");
    let closure = system("meshed", &nonce(), &[("hello", "hi")], Activation::Ok);
    let names = ["a", "b", "c"];
    let nodes: Vec<NixNode> = names
        .iter()
        .map(|_| {
            fleet.node_with(&NodeSetup { net: Some(lan.port()), bin: vec![wireguard_go.clone()], ..Default::default() })
        })
        .collect();
    for (name, node) in names.iter().zip(&nodes) {
        fleet.create(name, node, json!({"closure": closure}), json!({})).await;
    }
    let started = Instant::now();
    support::wait_for(&networks, "net", TIMEOUT, "MeshReady", |n| {
        n.status.as_ref().is_some_and(|s| support::condition(&s.conditions, "MeshReady").as_deref() == Some("True"))
    })
    .await;
    eprintln!("mesh: MeshReady {:?} after the Machines were created", started.elapsed());
    let meshed = members(&networks).await;
    let mesh_address =
        |name: &str| meshed.iter().find(|m| m.name == name).and_then(|m| m.mesh_address.clone()).unwrap();
    let addresses: BTreeSet<String> = names.iter().map(|n| mesh_address(n)).collect();
    assert_eq!(addresses.len(), 3, "distinct mesh addresses: {meshed:?}");
    let mut private_keys: Vec<String> = Vec::new();
    for name in names {
        let secret = secrets.get(&format!("{name}-wireguard")).await.unwrap();
        private_keys.push(String::from_utf8(secret.data.unwrap()["privateKey"].0.clone()).unwrap());
    }

    // Pings over the mesh; on the wire between members only WireGuard's UDP.
    let capture = lan.capture(&format!("ip and not host {}", lan.host_address()));
    for (i, node) in nodes.iter().enumerate() {
        for (j, other) in names.iter().enumerate() {
            if i != j {
                node.exec_ok(&format!("ping -c 2 -W 2 {}", mesh_address(other)));
            }
        }
    }
    let packets: Vec<String> = capture.stop().into_iter().filter(|p| !p.trim().is_empty()).collect();
    eprintln!("mesh: {} packets between members during the pings, e.g. {:?}", packets.len(), packets.first());
    assert!(packets.len() >= 12, "the pings crossed the bridge: {packets:?}");
    for p in &packets {
        assert!(
            p.contains(": UDP") && p.contains(".51820 > ") && p.contains(".51820:"),
            "only WireGuard: {p}\nall: {packets:#?}"
        );
        assert!(!p.contains("ICMP"), "no plaintext ICMP between members: {p}");
    }

    // Names resolve to mesh addresses on every member.
    for node in &nodes {
        for other in names {
            assert_eq!(resolve(node, other), Some(mesh_address(other)), "{other} on {}", node.host);
        }
    }

    // Round trips over the mesh and directly.
    let over_mesh = rtt(&nodes[0].exec_ok(&format!("ping -q -c 50 -i 0.02 {}", mesh_address("b"))));
    let direct = rtt(&nodes[0].exec_ok(&format!("ping -q -c 50 -i 0.02 {}", nodes[1].host)));
    eprintln!("mesh: ping a -> b: {over_mesh:.3} ms over the mesh, {direct:.3} ms direct ({:.1}x)", over_mesh / direct);

    // Rotation: b's Secret deleted; b gets a new key, keeps its address,
    // and the tunnels come back.
    let old_key = meshed.iter().find(|m| m.name == "b").and_then(|m| m.mesh_key.clone()).unwrap();
    secrets.delete("b-wireguard", &DeleteParams::default()).await.unwrap();
    support::wait_for(&networks, "net", TIMEOUT, "b has a new key and the mesh is ready again", |n| {
        n.status.as_ref().is_some_and(|s| {
            s.members.iter().any(|m| m.name == "b" && m.mesh_key.as_ref().is_some_and(|k| *k != old_key))
                && support::condition(&s.conditions, "MeshReady").as_deref() == Some("True")
        })
    })
    .await;
    let rotated = members(&networks).await;
    let b = rotated.iter().find(|m| m.name == "b").unwrap();
    assert_eq!(b.mesh_address.as_deref(), Some(mesh_address("b").as_str()), "b keeps its address");
    let new_key = b.mesh_key.clone().unwrap();
    until("a and c have b's new key", || {
        [&nodes[0], &nodes[2]].iter().all(|n| n.exec_ok("wg show nixops0 peers").contains(&new_key))
    })
    .await;
    // And b itself runs it: until then a's handshakes with the new key fail.
    until("b runs its new key", || nodes[1].exec_ok("wg show nixops0 public-key").trim() == new_key).await;
    nodes[0].exec_ok(&format!("ping -c 2 -W 2 {}", mesh_address("b")));
    nodes[2].exec_ok(&format!("ping -c 2 -W 2 {}", mesh_address("b")));
    private_keys.push(
        String::from_utf8(secrets.get("b-wireguard").await.unwrap().data.unwrap()["privateKey"].0.clone()).unwrap(),
    );

    // Re-addressed: b answers on a second address and its Machine names it;
    // a and c send to the new endpoint, and the tunnel carries on.
    let moved = format!("{}.99", nodes[1].host.rsplit_once('.').unwrap().0);
    nodes[1].exec_ok(&format!("ip addr add {moved}/24 dev eth0"));
    let patch = json!({"spec": {"provider": {"existing": {"host": moved}}}});
    fleet.machines.patch("b", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    let endpoint = format!("{moved}:51820");
    let took = until("a and c send to b's new address", || {
        [&nodes[0], &nodes[2]].iter().all(|n| n.exec_ok("wg show nixops0 endpoints").contains(&endpoint))
    })
    .await;
    eprintln!("mesh: a re-addressed member reached both other members' endpoints in {took:?}");
    assert!(document(&nodes[0]).to_string().contains(&moved), "a's network.json has b's new address");
    nodes[0].exec_ok(&format!("ping -c 2 -W 2 {}", mesh_address("b")));

    // Removal: c leaves; a and b drop its peer and its name, and keep their
    // own interface and session (wg syncconf, nothing torn down).
    let ifindex = |n: &NixNode| n.exec_ok("ip -o link show dev nixops0 | cut -d: -f1");
    let handshake_with = |n: &NixNode, key: &str| {
        n.exec_ok("wg show nixops0 latest-handshakes").lines().find(|l| l.starts_with(key)).map(str::to_owned)
    };
    let a_before = (ifindex(&nodes[0]), handshake_with(&nodes[0], &new_key));
    assert!(a_before.1.as_ref().is_some_and(|l| !l.ends_with("\t0")), "a has a session with b: {a_before:?}");
    let c_key = meshed.iter().find(|m| m.name == "c").and_then(|m| m.mesh_key.clone()).unwrap();
    fleet.machines.delete("c", &DeleteParams::default()).await.unwrap();
    let took = until("a and b dropped c", || {
        nodes[..2].iter().all(|n| !n.exec_ok("wg show nixops0 peers").contains(&c_key) && resolve(n, "c").is_none())
    })
    .await;
    eprintln!("mesh: a removed member left both other members' peers and hosts in {took:?}");
    let a_after = (ifindex(&nodes[0]), handshake_with(&nodes[0], &new_key));
    assert_eq!(a_after, a_before, "a's interface and its session with b are the same after c left");
    support::wait_gone(&secrets, "c-wireguard", TIMEOUT).await;

    // Events say what happened; no private key anywhere.
    let reasons = fleet.event_reasons().await;
    for reason in ["MeshPeerAdded", "MeshKeyRotated", "MeshPeerRemoved"] {
        assert!(reasons.iter().any(|r| r == reason), "event {reason}: {reasons:?}");
    }
    let events: Api<Event> = Api::namespaced(fleet.client.clone(), &fleet.ns);
    let mut seen = serde_json::to_string(&events.list(&ListParams::default()).await.unwrap().items).unwrap();
    seen += &serde_json::to_string(&networks.get("net").await.unwrap()).unwrap();
    seen += &serde_json::to_string(&fleet.machines.list(&ListParams::default()).await.unwrap().items).unwrap();
    seen += &fleet.operator.logs();
    for key in &private_keys {
        assert!(!seen.contains(key.trim()), "a private key leaked into events, status or logs");
    }
    for node in &nodes[..2] {
        assert!(!node.exec_ok("cat /run/nixops/network.json").contains(private_keys[0].trim()));
    }
}

/// The NixOS module members import parses, and uses the paths and the
/// interface the operator writes to (no nixpkgs here to evaluate it).
#[test]
fn the_nixos_module_parses_and_matches_the_operator() {
    use nixops_operator::nix::membership;
    let module = support::repo_root().join("nix/nixops-network.nix");
    let out = std::process::Command::new("nix-instantiate").arg("--parse").arg(&module).output().unwrap();
    assert!(out.status.success(), "nix-instantiate --parse: {}", String::from_utf8_lossy(&out.stderr));
    let text = std::fs::read_to_string(&module).unwrap();
    for used in [
        membership::HOSTS,
        membership::HOSTS_BLOCK,
        membership::HOSTS_BASE.trim_start_matches("/etc/"),
        membership::INTERFACE,
        "wireguard-tools",
        "allowedUDPPorts",
    ] {
        assert!(text.contains(used), "the module does not mention {used}");
    }
    assert!(
        nixops_operator::controller::mesh::MODULE_HINT.contains("nix/nixops-network.nix"),
        "conditions name the module's file"
    );
}

/// The UDP rules of the security group `sg`, as (from port, CIDR).
async fn udp_rules(ec2: &aws_sdk_ec2::Client, sg: &str) -> Vec<(i32, String)> {
    let out = ec2.describe_security_groups().group_ids(sg).send().await.unwrap();
    let group = out.security_groups()[0].clone();
    group
        .ip_permissions()
        .iter()
        .filter(|p| p.ip_protocol() == Some("udp"))
        .flat_map(|p| {
            p.ip_ranges().iter().map(|r| (p.from_port().unwrap_or(-1), r.cidr_ip().unwrap_or_default().to_owned()))
        })
        .collect()
}

/// An AWS Network's security group opens the mesh's UDP port while the
/// mesh is on, and closes it when the mesh goes (moto).
#[tokio::test]
async fn an_aws_network_opens_the_mesh_port_while_it_has_a_mesh() {
    let client = support::client().await;
    support::install_crds(&client).await;
    let ns = support::namespace(&client, "mesh-aws").await;
    let _operator = support::Operator::start(&ns, &[]);
    support::aws_network(&client, &ns, "aws", &support::moto().endpoint).await;
    let networks: Api<Network> = Api::namespaced(client.clone(), &ns);
    let ec2 = support::ec2_client().await;
    support::wait_for(&networks, "aws", TIMEOUT, "Ready", |n| {
        n.status.as_ref().is_some_and(|s| support::is_ready(&s.conditions) && s.security_group_id.is_some())
    })
    .await;
    let sg = networks.get("aws").await.unwrap().status.unwrap().security_group_id.unwrap();
    assert!(udp_rules(&ec2, &sg).await.is_empty(), "no mesh, no UDP rule");

    let mesh = json!({"spec": {"mesh": {"wireguard": {"addressRange": "10.77.0.0/24", "listenPort": 51999}}}});
    networks.patch("aws", &PatchParams::default(), &Patch::Merge(&mesh)).await.unwrap();
    let deadline = Instant::now() + TIMEOUT;
    while udp_rules(&ec2, &sg).await != [(51999, "0.0.0.0/0".to_owned())] {
        assert!(Instant::now() < deadline, "the mesh port never opened: {:?}", udp_rules(&ec2, &sg).await);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let off = json!({"spec": {"mesh": null}});
    networks.patch("aws", &PatchParams::default(), &Patch::Merge(&off)).await.unwrap();
    while !udp_rules(&ec2, &sg).await.is_empty() {
        assert!(Instant::now() < deadline, "the mesh port stayed open: {:?}", udp_rules(&ec2, &sg).await);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The operator killed right after creating a member's key Secret, before
/// the Network records it: after a restart every member has exactly one
/// key Secret, the one created before the crash is kept (same key, same
/// address), and the addresses the status shows are the Secrets'.
#[tokio::test]
async fn a_crash_after_a_key_is_created_duplicates_and_loses_nothing() {
    let client = support::client().await;
    support::install_crds(&client).await;
    let ns = support::namespace(&client, "mesh-crash").await;
    let mut operator = support::Operator::start_env(&ns, &[], &[("FAILPOINTS", "mesh-after-key-created=return(kill)")]);
    let networks: Api<Network> = Api::namespaced(client.clone(), &ns);
    let machines: Api<nixops_operator::api::Machine> = Api::namespaced(client.clone(), &ns);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let pp = kube::api::PostParams::default();
    let network = json!({"apiVersion": "nixops.io/v1alpha1", "kind": "Network", "metadata": {"name": "net"},
        "spec": {"mesh": {"wireguard": {"addressRange": "10.77.0.0/29"}}}});
    networks.create(&pp, &serde_json::from_value(network).unwrap()).await.unwrap();
    for name in ["a", "b", "c"] {
        // Members need not be reachable for the Network to give them keys.
        let machine = json!({"apiVersion": "nixops.io/v1alpha1", "kind": "Machine", "metadata": {"name": name},
            "spec": {"networkRef": {"name": "net"}, "provider": {"existing": {"host": "127.0.0.1", "port": 1}}}});
        machines.create(&pp, &serde_json::from_value(machine).unwrap()).await.unwrap();
    }
    assert!(operator.wait_exit(TIMEOUT).is_some(), "the operator was not killed at mesh-after-key-created");
    let mesh_secrets = || async {
        let list = secrets.list(&ListParams::default().labels("nixops.io/mesh-network=net")).await.unwrap();
        list.items
    };
    let before = mesh_secrets().await;
    assert_eq!(before.len(), 1, "killed right after the first key Secret");
    let first = before[0].clone();

    let _operator = support::Operator::start(&ns, &[]);
    support::wait_for(&networks, "net", TIMEOUT, "three members with mesh keys", |n| {
        n.status.as_ref().is_some_and(|s| s.members.len() == 3 && s.members.iter().all(|m| m.mesh_key.is_some()))
    })
    .await;
    let after = mesh_secrets().await;
    assert_eq!(after.len(), 3, "one key Secret per member");
    let kept = after.iter().find(|s| s.metadata.name == first.metadata.name).expect("the first Secret is kept");
    assert_eq!(kept.data, first.data, "its key is not replaced");
    assert_eq!(kept.metadata.uid, first.metadata.uid);
    let status = networks.get("net").await.unwrap().status.unwrap();
    let mut addresses = BTreeSet::new();
    for secret in &after {
        let member = &secret.metadata.labels.as_ref().unwrap()["nixops.io/mesh-member"];
        let address = &secret.metadata.annotations.as_ref().unwrap()["nixops.io/mesh-address"];
        let recorded = status.members.iter().find(|m| &m.name == member).unwrap();
        assert_eq!(recorded.mesh_address.as_ref(), Some(address), "status shows {member}'s Secret's address");
        assert!(addresses.insert(address.clone()), "{address} given twice");
    }
}
