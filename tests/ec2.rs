//! The AWS provider end to end against moto: a Network's VPC, a Machine with
//! a key pair and a volume, start/stop, bad AMIs, and crash safety.
//!
//! moto's instances have no SSH server (and their addresses are not ours to
//! contact), so every Machine here sets spec.ssh.host to a local sshd.

mod support;

use std::time::Duration;

use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use nixops_operator::api::machine::MachinePhase;
use nixops_operator::api::{KeyPair, Machine, Network, Volume};
use serde_json::json;

const TIMEOUT: Duration = Duration::from_secs(90);

fn tag_filter(uid: &str) -> aws_sdk_ec2::types::Filter {
    aws_sdk_ec2::types::Filter::builder().name("tag:nixops.io/uid").values(uid).build()
}

/// Live (not terminated) instances tagged with `uid`.
async fn instances(ec2: &aws_sdk_ec2::Client, uid: &str) -> Vec<aws_sdk_ec2::types::Instance> {
    let out = ec2.describe_instances().filters(tag_filter(uid)).send().await.unwrap();
    out.reservations()
        .iter()
        .flat_map(|r| r.instances().iter().cloned())
        .filter(|i| i.state().and_then(|s| s.name()).map(|n| n.as_str()) != Some("terminated"))
        .collect()
}

async fn volumes(ec2: &aws_sdk_ec2::Client, uid: &str) -> Vec<aws_sdk_ec2::types::Volume> {
    ec2.describe_volumes().filters(tag_filter(uid)).send().await.unwrap().volumes().to_vec()
}

fn ready(conditions: Option<&Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition>>) -> bool {
    conditions.is_some_and(|c| support::is_ready(c))
}

#[tokio::test]
async fn network_vpc_converges_and_is_deleted() {
    let client = support::client().await;
    support::install_crds(&client).await;
    let ns = support::namespace(&client, "ec2-net").await;
    let _operator = support::Operator::start(&ns, &[]);
    support::aws_network(&client, &ns, "aws", &support::moto().endpoint).await;
    let networks: Api<Network> = Api::namespaced(client.clone(), &ns);
    let ec2 = support::ec2_client().await;

    support::wait_for(&networks, "aws", TIMEOUT, "Ready", |n| ready(n.status.as_ref().map(|s| &s.conditions))).await;
    let net = networks.get("aws").await.unwrap();
    let status = net.status.clone().unwrap();
    let uid = net.metadata.uid.clone().unwrap();
    assert_eq!(status.provider.as_deref(), Some("ec2"));
    let vpcs = ec2.describe_vpcs().filters(tag_filter(&uid)).send().await.unwrap();
    assert_eq!(vpcs.vpcs().len(), 1, "exactly one VPC for the Network");
    assert_eq!(vpcs.vpcs()[0].cidr_block(), Some("10.42.0.0/16"));
    assert_eq!(status.vpc_id.as_deref(), vpcs.vpcs()[0].vpc_id());
    assert_eq!(status.subnets.len(), 1);
    let sg = status.security_group_id.clone().unwrap();
    let ports = |g: &aws_sdk_ec2::types::SecurityGroup| -> Vec<i32> {
        g.ip_permissions().iter().filter_map(|p| p.from_port()).collect()
    };
    let group = ec2.describe_security_groups().group_ids(&sg).send().await.unwrap().security_groups()[0].clone();
    assert_eq!(ports(&group), vec![22]);

    // A public subnet's map-public-IP attribute converges on every
    // reconcile, not only right after the create: changed behind the
    // operator's back, it is set again when the Network is next looked at.
    let subnet_id = status.subnets[0].id.clone();
    let maps_public_ip = || async {
        let out = ec2.describe_subnets().subnet_ids(&subnet_id).send().await.unwrap();
        out.subnets()[0].map_public_ip_on_launch()
    };
    assert_eq!(maps_public_ip().await, Some(true), "a public subnet maps public IPs");
    let off = aws_sdk_ec2::types::AttributeBooleanValue::builder().value(false).build();
    ec2.modify_subnet_attribute().subnet_id(&subnet_id).map_public_ip_on_launch(off).send().await.unwrap();
    let touch = json!({"metadata": {"labels": {"touched": "yes"}}});
    networks.patch("aws", &PatchParams::default(), &Patch::Merge(&touch)).await.unwrap();
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    while maps_public_ip().await != Some(true) {
        assert!(tokio::time::Instant::now() < deadline, "MapPublicIpOnLaunch was not set again");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Rules converge: 443 added, 22 removed.
    let patch = json!({"spec": {"provider": {"ec2": {"securityGroup": {"ingress": [
        {"protocol": "tcp", "fromPort": 443, "toPort": 443, "cidrBlocks": ["0.0.0.0/0"]}]}}}}});
    networks.patch("aws", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let group = ec2.describe_security_groups().group_ids(&sg).send().await.unwrap().security_groups()[0].clone();
        if ports(&group) == vec![443] {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "rules did not converge: {:?}", ports(&group));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // A subnet added later is created under the create-pending mark, which
    // the lookup that finds it clears.
    let subnets = json!({"spec": {"provider": {"ec2": {"subnets": [
        {"name": "public-a", "cidrBlock": "10.42.1.0/24", "zone": "eu-west-1a"},
        {"name": "private-b", "cidrBlock": "10.42.2.0/24", "zone": "eu-west-1b", "public": false}]}}}});
    networks.patch("aws", &PatchParams::default(), &Patch::Merge(&subnets)).await.unwrap();
    support::wait_for(&networks, "aws", TIMEOUT, "two subnets", |n| {
        n.status.as_ref().is_some_and(|s| s.subnets.len() == 2) && ready(n.status.as_ref().map(|s| &s.conditions))
    })
    .await;
    let net = networks.get("aws").await.unwrap();
    let annotations = net.metadata.annotations.clone().unwrap_or_default();
    assert!(!annotations.contains_key("nixops.io/create-pending"), "the mark is cleared: {annotations:?}");
    let private = ec2.describe_subnets().filters(tag_filter(&uid)).send().await.unwrap();
    assert_eq!(private.subnets().len(), 2, "exactly the two subnets");
    assert!(
        private
            .subnets()
            .iter()
            .any(|s| s.cidr_block() == Some("10.42.2.0/24") && s.map_public_ip_on_launch() == Some(false)),
        "a private subnet maps no public IPs"
    );

    networks.delete("aws", &DeleteParams::default()).await.unwrap();
    support::wait_gone(&networks, "aws", TIMEOUT).await;
    assert!(
        ec2.describe_vpcs().filters(tag_filter(&uid)).send().await.unwrap().vpcs().is_empty(),
        "the VPC must be deleted"
    );
}

#[tokio::test]
async fn machine_with_key_pair_and_volume_in_a_new_vpc() {
    let client = support::client().await;
    support::install_crds(&client).await;
    let ns = support::namespace(&client, "ec2-machine").await;
    let _operator = support::Operator::start(&ns, &[]);
    support::aws_network(&client, &ns, "aws", &support::moto().endpoint).await;
    let ec2 = support::ec2_client().await;
    let ami = support::some_ami(&ec2).await;
    let host = support::SshHost::start();
    let machines: Api<Machine> = Api::namespaced(client.clone(), &ns);
    let keypairs: Api<KeyPair> = Api::namespaced(client.clone(), &ns);
    let volumes_api: Api<Volume> = Api::namespaced(client.clone(), &ns);

    let kp: KeyPair = serde_json::from_value(json!({
        "apiVersion": "nixops.io/v1alpha1", "kind": "KeyPair", "metadata": {"name": "deployer"},
        "spec": {"secretRef": {"name": "deployer"}, "networkRef": {"name": "aws"}, "provider": {"ec2": {}}}
    }))
    .unwrap();
    keypairs.create(&PostParams::default(), &kp).await.unwrap();
    let vol: Volume = serde_json::from_value(json!({
        "apiVersion": "nixops.io/v1alpha1", "kind": "Volume", "metadata": {"name": "data"},
        "spec": {"networkRef": {"name": "aws"}, "provider": {"ec2": {"zone": "eu-west-1a", "sizeGiB": 10}}}
    }))
    .unwrap();
    volumes_api.create(&PostParams::default(), &vol).await.unwrap();
    let m = support::ec2_machine(
        "db-1",
        &ami,
        &host,
        json!({
            "ssh": {"host": host.host, "port": host.port, "keyPairRef": {"name": "deployer"}},
            "volumes": [{"volumeRef": {"name": "data"}, "device": "/dev/xvdf"}]
        }),
    );
    machines.create(&PostParams::default(), &m).await.unwrap();

    support::wait_for(&machines, "db-1", TIMEOUT, "Ready", |m| ready(m.status.as_ref().map(|s| &s.conditions))).await;
    let m = machines.get("db-1").await.unwrap();
    let uid = m.metadata.uid.clone().unwrap();
    let status = m.status.clone().unwrap();
    assert_eq!(status.provider.as_deref(), Some("ec2"));
    let live = instances(&ec2, &uid).await;
    assert_eq!(live.len(), 1, "exactly one instance for the Machine");
    let id = live[0].instance_id().unwrap().to_owned();
    assert!(status.provider_id.as_deref().unwrap().ends_with(&id), "{:?}", status.provider_id);
    assert_eq!(m.metadata.annotations.as_ref().unwrap()["nixops.io/external-name"], id);
    assert_eq!(live[0].key_name(), Some(format!("{ns}-deployer").as_str()), "the instance accepts the registered key");
    assert!(status.addresses.iter().any(|a| a.address_type == "InternalIP"));

    // The key pair is registered; the private half never leaves its Secret.
    let kp = keypairs.get("deployer").await.unwrap();
    assert_eq!(kp.status.unwrap().cloud_key_name, Some(format!("{ns}-deployer")));
    let registered = ec2.describe_key_pairs().key_names(format!("{ns}-deployer")).send().await.unwrap();
    assert_eq!(registered.key_pairs().len(), 1);

    // The volume attaches to the machine's instance.
    support::wait_for(&volumes_api, "data", TIMEOUT, "attached to db-1", |v| {
        v.status
            .as_ref()
            .and_then(|s| s.attached_to.as_ref())
            .is_some_and(|a| a.machine == "db-1" && a.device == "/dev/xvdf")
    })
    .await;
    let vol_uid = volumes_api.get("data").await.unwrap().metadata.uid.unwrap();
    let vols = volumes(&ec2, &vol_uid).await;
    assert_eq!(vols.len(), 1);
    assert_eq!(vols[0].attachments().first().and_then(|a| a.instance_id()), Some(id.as_str()));

    // running: false stops the instance; true starts it again.
    machines.patch("db-1", &PatchParams::default(), &Patch::Merge(&json!({"spec": {"running": false}}))).await.unwrap();
    support::wait_for(&machines, "db-1", TIMEOUT, "Stopped", |m| {
        m.status.as_ref().and_then(|s| s.phase) == Some(MachinePhase::Stopped)
    })
    .await;
    let state = instances(&ec2, &uid).await[0].state().and_then(|s| s.name()).map(|n| n.as_str().to_owned());
    assert_eq!(state.as_deref(), Some("stopped"));
    machines.patch("db-1", &PatchParams::default(), &Patch::Merge(&json!({"spec": {"running": true}}))).await.unwrap();
    support::wait_for(&machines, "db-1", TIMEOUT, "Running", |m| {
        m.status.as_ref().and_then(|s| s.phase) == Some(MachinePhase::Running)
    })
    .await;

    // Deleting the volume detaches it first; deleting the machine terminates it.
    volumes_api.delete("data", &DeleteParams::default()).await.unwrap();
    support::wait_gone(&volumes_api, "data", TIMEOUT).await;
    assert!(volumes(&ec2, &vol_uid).await.is_empty(), "the volume must be deleted");
    machines.delete("db-1", &DeleteParams::default()).await.unwrap();
    support::wait_gone(&machines, "db-1", TIMEOUT).await;
    assert!(instances(&ec2, &uid).await.is_empty(), "the instance must be terminated");
    keypairs.delete("deployer", &DeleteParams::default()).await.unwrap();
    support::wait_gone(&keypairs, "deployer", TIMEOUT).await;
    assert!(
        ec2.describe_key_pairs().key_names(format!("{ns}-deployer")).send().await.is_err(),
        "the EC2 key pair must be deleted"
    );
}

#[tokio::test]
async fn unknown_ami_stalls_with_the_aws_error_code() {
    let client = support::client().await;
    support::install_crds(&client).await;
    let ns = support::namespace(&client, "ec2-ami").await;
    let operator = support::Operator::start(&ns, &[]);
    support::aws_network(&client, &ns, "aws", &support::moto().endpoint).await;
    let host = support::SshHost::start();
    let machines: Api<Machine> = Api::namespaced(client.clone(), &ns);
    machines
        .create(&PostParams::default(), &support::ec2_machine("bad", "ami-0000000000000dead", &host, json!({})))
        .await
        .unwrap();
    support::wait_for(&machines, "bad", TIMEOUT, "Stalled", |m| {
        m.status.as_ref().is_some_and(|s| support::condition(&s.conditions, "Stalled").as_deref() == Some("True"))
    })
    .await;
    let status = machines.get("bad").await.unwrap().status.unwrap();
    let msg = support::condition_message(&status.conditions, "Stalled");
    assert!(msg.contains("InvalidAMIID"), "the message must carry the AWS error code: {msg}");
    assert!(msg.contains("spec.provider.ec2"), "the message must name the field: {msg}");
    let ec2 = support::ec2_client().await;
    let uid = machines.get("bad").await.unwrap().metadata.uid.unwrap();
    assert!(instances(&ec2, &uid).await.is_empty());

    // No hot loop: the intent written before each try wakes the object at
    // once, but the refused create is not tried again before the resync.
    let created = std::time::Instant::now();
    tokio::time::sleep(Duration::from_secs(60).saturating_sub(created.elapsed())).await;
    let calls = operator.metric("nixops_provider_calls_total", &["provider=\"aws\"", "operation=\"RunInstances\""]);
    assert!(calls >= 1.0, "the create was tried and counted");
    assert!(calls <= 3.0, "{calls} create calls in 60 s");
    let status = machines.get("bad").await.unwrap().status.unwrap();
    assert_eq!(
        support::condition(&status.conditions, "Stalled").as_deref(),
        Some("True"),
        "still Stalled, not Retrying"
    );
}

#[tokio::test]
async fn kill_9_during_provisioning_leaves_exactly_one_instance_and_volume() {
    let client = support::client().await;
    support::install_crds(&client).await;
    let ns = support::namespace(&client, "ec2-crash").await;
    support::aws_network(&client, &ns, "aws", &support::moto().endpoint).await;
    let ec2 = support::ec2_client().await;
    let ami = support::some_ami(&ec2).await;
    let host = support::SshHost::start();
    let machines: Api<Machine> = Api::namespaced(client.clone(), &ns);
    let volumes_api: Api<Volume> = Api::namespaced(client.clone(), &ns);
    let networks: Api<Network> = Api::namespaced(client.clone(), &ns);
    {
        let _operator = support::Operator::start(&ns, &[]);
        support::wait_for(&networks, "aws", TIMEOUT, "Ready", |n| ready(n.status.as_ref().map(|s| &s.conditions)))
            .await;
    }

    // Kill the operator at several points of a Machine's and a Volume's creation.
    for (i, delay_ms) in [0u64, 150, 300, 600, 1200].into_iter().enumerate() {
        let name = format!("crash-{i}");
        let vol: Volume = serde_json::from_value(json!({
            "apiVersion": "nixops.io/v1alpha1", "kind": "Volume", "metadata": {"name": name},
            "spec": {"networkRef": {"name": "aws"}, "provider": {"ec2": {"zone": "eu-west-1a", "sizeGiB": 4}}}
        }))
        .unwrap();
        volumes_api.create(&PostParams::default(), &vol).await.unwrap();
        machines.create(&PostParams::default(), &support::ec2_machine(&name, &ami, &host, json!({}))).await.unwrap();
        let operator = support::Operator::start(&ns, &[]);
        tokio::time::sleep(Duration::from_millis(500 + delay_ms)).await;
        operator.signal("KILL");
        drop(operator);
    }
    // A kill between recording the intent and the create call leaves an
    // outcome nobody saw: after the lookup window such an object stalls with
    // CreateOutcomeUnknown and nothing in the cloud; the test then does what
    // the message tells a user (remove the mark). Never a second resource.
    let _operator = support::Operator::start(&ns, &["--create-pending-seconds", "5"]);
    let settled = |c: Option<&Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition>>| {
        ready(c) || c.is_some_and(|c| c.iter().any(|c| c.reason == "CreateOutcomeUnknown" && c.status == "True"))
    };
    let unknown = |c: Option<&Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition>>| !ready(c);
    let clear = json!({"metadata": {"annotations": {"nixops.io/create-pending": null}}});
    for i in 0..5 {
        let name = format!("crash-{i}");
        support::wait_for(&machines, &name, TIMEOUT, "Ready or stalled", |m| {
            settled(m.status.as_ref().map(|s| &s.conditions))
        })
        .await;
        let m = machines.get(&name).await.unwrap();
        if unknown(m.status.as_ref().map(|s| &s.conditions)) {
            assert_eq!(
                instances(&ec2, m.metadata.uid.as_deref().unwrap()).await.len(),
                0,
                "{name}: stalled with an instance"
            );
            machines.patch(&name, &PatchParams::default(), &Patch::Merge(&clear)).await.unwrap();
        }
        support::wait_for(&volumes_api, &name, TIMEOUT, "Ready or stalled", |v| {
            settled(v.status.as_ref().map(|s| &s.conditions))
        })
        .await;
        let v = volumes_api.get(&name).await.unwrap();
        if unknown(v.status.as_ref().map(|s| &s.conditions)) {
            assert_eq!(
                volumes(&ec2, v.metadata.uid.as_deref().unwrap()).await.len(),
                0,
                "{name}: stalled with a volume"
            );
            volumes_api.patch(&name, &PatchParams::default(), &Patch::Merge(&clear)).await.unwrap();
        }
        support::wait_for(&machines, &name, TIMEOUT, "Ready", |m| ready(m.status.as_ref().map(|s| &s.conditions)))
            .await;
        support::wait_for(&volumes_api, &name, TIMEOUT, "Ready", |v| ready(v.status.as_ref().map(|s| &s.conditions)))
            .await;
        let m_uid = machines.get(&name).await.unwrap().metadata.uid.unwrap();
        let v_uid = volumes_api.get(&name).await.unwrap().metadata.uid.unwrap();
        assert_eq!(instances(&ec2, &m_uid).await.len(), 1, "{name}: exactly one instance");
        assert_eq!(volumes(&ec2, &v_uid).await.len(), 1, "{name}: exactly one volume");
    }
    let uids: Vec<(String, String)> = {
        let mut v = Vec::new();
        for i in 0..5 {
            let name = format!("crash-{i}");
            v.push((
                machines.get(&name).await.unwrap().metadata.uid.unwrap(),
                volumes_api.get(&name).await.unwrap().metadata.uid.unwrap(),
            ));
        }
        v
    };
    for i in 0..5 {
        let name = format!("crash-{i}");
        machines.delete(&name, &DeleteParams::default()).await.unwrap();
        volumes_api.delete(&name, &DeleteParams::default()).await.unwrap();
    }
    for i in 0..5 {
        let name = format!("crash-{i}");
        support::wait_gone(&machines, &name, TIMEOUT).await;
        support::wait_gone(&volumes_api, &name, TIMEOUT).await;
    }
    for (m_uid, v_uid) in uids {
        assert!(instances(&ec2, &m_uid).await.is_empty(), "an instance leaked");
        assert!(volumes(&ec2, &v_uid).await.is_empty(), "a volume leaked");
    }
}

#[tokio::test]
async fn orphaned_machine_keeps_its_instance() {
    let client = support::client().await;
    support::install_crds(&client).await;
    let ns = support::namespace(&client, "ec2-orphan").await;
    let _operator = support::Operator::start(&ns, &[]);
    support::aws_network(&client, &ns, "aws", &support::moto().endpoint).await;
    let ec2 = support::ec2_client().await;
    let ami = support::some_ami(&ec2).await;
    let host = support::SshHost::start();
    let machines: Api<Machine> = Api::namespaced(client.clone(), &ns);
    machines
        .create(&PostParams::default(), &support::ec2_machine("kept", &ami, &host, json!({"deletionPolicy": "Orphan"})))
        .await
        .unwrap();
    support::wait_for(&machines, "kept", TIMEOUT, "Ready", |m| ready(m.status.as_ref().map(|s| &s.conditions))).await;
    let uid = machines.get("kept").await.unwrap().metadata.uid.unwrap();
    machines.delete("kept", &DeleteParams::default()).await.unwrap();
    support::wait_gone(&machines, "kept", TIMEOUT).await;
    assert_eq!(instances(&ec2, &uid).await.len(), 1, "Orphan must leave the instance running");
}

/// The status contract: what a reconcile learned before it failed is
/// written. A booting instance whose SSH is not up yet still shows its
/// providerID and addresses, and its Volume attaches (a host that waits for
/// that disk would otherwise never bring SSH up).
#[tokio::test]
async fn an_unreachable_machine_still_reports_its_instance_and_gets_its_volume() {
    let client = support::client().await;
    support::install_crds(&client).await;
    let ns = support::namespace(&client, "ec2-unreachable").await;
    let _operator = support::Operator::start(&ns, &[]);
    support::aws_network(&client, &ns, "aws", &support::moto().endpoint).await;
    let ec2 = support::ec2_client().await;
    let ami = support::some_ami(&ec2).await;
    let machines: Api<Machine> = Api::namespaced(client.clone(), &ns);
    let volumes_api: Api<Volume> = Api::namespaced(client.clone(), &ns);
    let vol: Volume = serde_json::from_value(json!({
        "apiVersion": "nixops.io/v1alpha1", "kind": "Volume", "metadata": {"name": "data"},
        "spec": {"networkRef": {"name": "aws"}, "provider": {"ec2": {"zone": "eu-west-1a", "sizeGiB": 10}}}
    }))
    .unwrap();
    volumes_api.create(&PostParams::default(), &vol).await.unwrap();
    // Nothing listens on this port: SSH never comes up.
    let closed = support::free_port();
    let m: Machine = serde_json::from_value(json!({
        "apiVersion": "nixops.io/v1alpha1", "kind": "Machine", "metadata": {"name": "booting"},
        "spec": {
            "networkRef": {"name": "aws"},
            "provider": {"ec2": {"instanceType": "t3.small", "ami": ami, "subnet": "public-a"}},
            "ssh": {"host": "127.0.0.1", "port": closed},
            "volumes": [{"volumeRef": {"name": "data"}, "device": "/dev/xvdf"}]
        }
    }))
    .unwrap();
    machines.create(&PostParams::default(), &m).await.unwrap();

    support::wait_for(&machines, "booting", TIMEOUT, "providerID and Unreachable", |m| {
        m.status.as_ref().is_some_and(|s| {
            s.provider_id.is_some()
                && !s.addresses.is_empty()
                && s.conditions
                    .iter()
                    .any(|c| c.type_ == "Provisioned" && c.status == "False" && c.reason == "Unreachable")
        })
    })
    .await;
    let m = machines.get("booting").await.unwrap();
    let status = m.status.unwrap();
    assert_eq!(status.phase, Some(MachinePhase::Provisioning));
    let live = instances(&ec2, m.metadata.uid.as_deref().unwrap()).await;
    assert_eq!(live.len(), 1);
    let id = live[0].instance_id().unwrap().to_owned();
    assert!(status.provider_id.as_deref().unwrap().ends_with(&id));

    support::wait_for(&volumes_api, "data", TIMEOUT, "attached to the unreachable machine", |v| {
        v.status.as_ref().and_then(|s| s.attached_to.as_ref()).is_some_and(|a| a.machine == "booting")
    })
    .await;
    let vol_uid = volumes_api.get("data").await.unwrap().metadata.uid.unwrap();
    let vols = volumes(&ec2, &vol_uid).await;
    assert_eq!(vols[0].attachments().first().and_then(|a| a.instance_id()), Some(id.as_str()));
}
