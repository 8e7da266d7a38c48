//! Deleting a whole namespace, and the credentials it needs: `kubectl delete namespace` on the complete
//! examples/ec2 network (in moto) leaves no cloud resource behind, and the
//! namespace goes away. The namespace controller deletes the credentials
//! Secret as early as everything else; the Network's finalizer on it keeps
//! it until the cloud resources are gone.
//!
//! This binary runs kube-controller-manager (the namespace controller). Its
//! tests that use moto take turns (`MOTO`): the namespace test compares
//! moto's whole inventory before and after.

mod support;

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::ResourceExt;
use kube::api::Api;
use nixops_operator::api::{KeyPair, Machine, Network, S3Bucket, Volume};

/// Held by each test that makes cloud resources in moto.
static MOTO: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Everything moto holds, by kind (instances: those not terminated).
async fn inventory() -> Vec<(&'static str, Vec<String>)> {
    let ec2 = support::ec2_client().await;
    let s3 = support::s3_client().await;
    let instances: Vec<String> = ec2
        .describe_instances()
        .send()
        .await
        .expect("describe instances")
        .reservations()
        .iter()
        .flat_map(|r| r.instances())
        .filter(|i| i.state().and_then(|s| s.name()).is_none_or(|n| n.as_str() != "terminated"))
        .filter_map(|i| i.instance_id().map(str::to_owned))
        .collect();
    let volumes = ec2.describe_volumes().send().await.expect("describe volumes");
    let vpcs = ec2.describe_vpcs().send().await.expect("describe vpcs");
    let subnets = ec2.describe_subnets().send().await.expect("describe subnets");
    let gateways = ec2.describe_internet_gateways().send().await.expect("describe internet gateways");
    let groups = ec2.describe_security_groups().send().await.expect("describe security groups");
    let keys = ec2.describe_key_pairs().send().await.expect("describe key pairs");
    let buckets = s3.list_buckets().send().await.expect("list buckets");
    let ids = |v: Vec<Option<&str>>| -> Vec<String> {
        let mut v: Vec<String> = v.into_iter().flatten().map(str::to_owned).collect();
        v.sort();
        v
    };
    vec![
        ("instances", instances),
        ("volumes", ids(volumes.volumes().iter().map(|v| v.volume_id()).collect())),
        ("VPCs", ids(vpcs.vpcs().iter().map(|v| v.vpc_id()).collect())),
        ("subnets", ids(subnets.subnets().iter().map(|s| s.subnet_id()).collect())),
        ("internet gateways", ids(gateways.internet_gateways().iter().map(|g| g.internet_gateway_id()).collect())),
        ("security groups", ids(groups.security_groups().iter().map(|g| g.group_id()).collect())),
        ("key pairs", ids(keys.key_pairs().iter().map(|k| k.key_name()).collect())),
        ("buckets", ids(buckets.buckets().iter().map(|b| b.name()).collect())),
    ]
}

#[tokio::test]
async fn deleting_the_namespace_of_a_full_ec2_network_leaves_nothing_behind() {
    let _moto = MOTO.lock().await;
    support::controller_manager();
    let client = support::client().await;
    support::install_crds(&client).await;
    let ns = support::namespace(&client, "lifecycle").await;
    let _operator = support::Operator::start(&ns, &[]);
    let ec2 = support::ec2_client().await;
    let ami =
        ec2.describe_images().send().await.expect("describe images").images()[0].image_id().expect("AMI ID").to_owned();
    let host = support::SshHost::start();
    let before = inventory().await;

    let out = support::kubectl(&["apply", "-n", &ns, "-f", "-"], Some(&support::examples_ec2(&ns, &ami, &host)));
    assert!(out.status.success(), "kubectl apply: {}", String::from_utf8_lossy(&out.stderr));
    support::wait_ready(&Api::<Network>::namespaced(client.clone(), &ns), "prod").await;
    support::wait_ready(&Api::<KeyPair>::namespaced(client.clone(), &ns), "deployer").await;
    support::wait_ready(&Api::<Volume>::namespaced(client.clone(), &ns), "pgdata").await;
    support::wait_ready(&Api::<S3Bucket>::namespaced(client.clone(), &ns), "nix-cache").await;
    support::wait_ready(&Api::<Machine>::namespaced(client.clone(), &ns), "db-1").await;
    let during = inventory().await;
    for ((kind, was), (_, now)) in before.iter().zip(&during) {
        assert!(now.len() > was.len(), "the example made no {kind}: {now:?}");
    }
    // The Network holds its credentials.
    let network_uid = Api::<Network>::namespaced(client.clone(), &ns).get("prod").await.unwrap().uid().unwrap();
    let secret = Api::<Secret>::namespaced(client.clone(), &ns).get("aws-credentials").await.unwrap();
    assert!(
        secret.finalizers().contains(&format!("nixops.io/network-{network_uid}")),
        "the credentials Secret must carry the Network's finalizer: {:?}",
        secret.finalizers()
    );

    let started = Instant::now();
    let out = support::kubectl(&["delete", "namespace", &ns, "--wait=false"], None);
    assert!(out.status.success(), "kubectl delete namespace: {}", String::from_utf8_lossy(&out.stderr));
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let deadline = Instant::now() + Duration::from_secs(240);
    while namespaces.get_opt(&ns).await.unwrap().is_some() {
        if Instant::now() > deadline {
            let left = support::kubectl(&["get", "nixops,secrets", "-n", &ns, "-o", "yaml"], None);
            panic!(
                "namespace {ns} still exists 240 s after kubectl delete namespace; what is left:\n{}",
                String::from_utf8_lossy(&left.stdout)
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    eprintln!("namespace deleted in {:?}", started.elapsed());

    let after = inventory().await;
    for ((kind, was), (_, now)) in before.iter().zip(&after) {
        let left: Vec<&String> = now.iter().filter(|id| !was.contains(id)).collect();
        assert!(left.is_empty(), "{kind} left in moto after the namespace was deleted: {left:?}");
    }
}

/// The credentials finalizers on Secrets `names` in `ns`.
async fn credentials_finalizers(secrets: &Api<Secret>, names: &[&str]) -> Vec<Vec<String>> {
    let mut all = Vec::new();
    for name in names {
        let secret = secrets.get(name).await.expect("get Secret");
        all.push(secret.finalizers().iter().filter(|f| f.starts_with("nixops.io/network-")).cloned().collect());
    }
    all
}

/// A Network holds the Secret its spec names, lets go of it when the spec
/// names another, and releases that one when deleted (here with Orphan: no
/// cloud call, so no cloud is needed; the endpoint is a closed port).
#[tokio::test]
async fn a_network_holds_only_the_credentials_its_spec_names() {
    let client = support::client().await;
    support::install_crds(&client).await;
    let ns = support::namespace(&client, "credentials").await;
    let _operator = support::Operator::start(&ns, &[]);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    for name in ["old", "new"] {
        let secret: Secret = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name}, "stringData": {"accessKeyId": "testing", "secretAccessKey": "testing"}
        }))
        .unwrap();
        secrets.create(&Default::default(), &secret).await.expect("create Secret");
    }
    let closed = format!("http://127.0.0.1:{}", support::free_port());
    let network: Network = serde_json::from_value(serde_json::json!({
        "apiVersion": "nixops.io/v1alpha1", "kind": "Network", "metadata": {"name": "net"},
        "spec": {"deletionPolicy": "Orphan", "provider": {"ec2": {
            "region": "eu-west-1", "endpoint": closed, "credentialsSecretRef": {"name": "old"},
            "vpc": {"cidrBlock": "10.42.0.0/16"},
            "subnets": [{"name": "a", "cidrBlock": "10.42.1.0/24", "zone": "eu-west-1a"}]
        }}}
    }))
    .unwrap();
    let networks: Api<Network> = Api::namespaced(client.clone(), &ns);
    networks.create(&Default::default(), &network).await.expect("create Network");
    let uid = networks.get("net").await.unwrap().uid().unwrap();
    let held = vec![format!("nixops.io/network-{uid}")];

    let deadline = Instant::now() + Duration::from_secs(60);
    let mut seen = credentials_finalizers(&secrets, &["old", "new"]).await;
    while seen != [held.clone(), vec![]] {
        assert!(Instant::now() < deadline, "the Network must hold Secret old only; finalizers: {seen:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
        seen = credentials_finalizers(&secrets, &["old", "new"]).await;
    }

    let patch = serde_json::json!({"spec": {"provider": {"ec2": {"credentialsSecretRef": {"name": "new"}}}}});
    networks.patch("net", &Default::default(), &kube::api::Patch::Merge(&patch)).await.expect("patch Network");
    while seen != [vec![], held.clone()] {
        assert!(Instant::now() < deadline, "the Network must move to Secret new; finalizers: {seen:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
        seen = credentials_finalizers(&secrets, &["old", "new"]).await;
    }

    networks.delete("net", &Default::default()).await.expect("delete Network");
    support::wait_gone(&networks, "net", Duration::from_secs(60)).await;
    assert_eq!(credentials_finalizers(&secrets, &["old", "new"]).await, [Vec::<String>::new(), vec![]]);
}

/// Killed after its credentials were released (the Secret, being deleted
/// too, is then gone) but before its own finalizer went, the operator
/// finishes the Network's deletion on restart instead of stalling on the
/// missing Secret: the Network recorded that its cloud resources are gone.
#[tokio::test]
async fn a_restart_after_the_credentials_were_released_finishes_the_deletion() {
    use std::os::unix::process::ExitStatusExt;
    let _moto = MOTO.lock().await;
    let client = support::client().await;
    support::install_crds(&client).await;
    let ns = support::namespace(&client, "released").await;
    support::aws_network(&client, &ns, "aws", &support::moto().endpoint).await;
    let networks: Api<Network> = Api::namespaced(client.clone(), &ns);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let mut operator =
        support::Operator::start_env(&ns, &[], &[("FAILPOINTS", "network-after-credentials-released=return(kill)")]);
    support::wait_ready(&networks, "aws").await;
    let net = networks.get("aws").await.unwrap();
    let vpc = net.status.and_then(|s| s.vpc_id).expect("the Network's VPC");

    // As a namespace deletion does: the credentials go too.
    networks.delete("aws", &Default::default()).await.expect("delete Network");
    secrets.delete("aws-aws", &Default::default()).await.expect("delete Secret");
    let status = operator.wait_exit(Duration::from_secs(120)).expect("the operator reaches its fault point");
    assert_eq!(status.signal(), Some(9), "killed by SIGKILL at the fault point");
    support::wait_gone(&secrets, "aws-aws", Duration::from_secs(30)).await;
    assert!(networks.get_opt("aws").await.unwrap().is_some(), "killed before the Network's finalizer went");
    let ec2 = support::ec2_client().await;
    let left = ec2.describe_vpcs().vpc_ids(&vpc).send().await.map(|o| o.vpcs().len()).unwrap_or(0);
    assert_eq!(left, 0, "the VPC was deleted before the credentials were released");

    let _operator = support::Operator::start(&ns, &[]);
    support::wait_gone(&networks, "aws", Duration::from_secs(60)).await;
}
