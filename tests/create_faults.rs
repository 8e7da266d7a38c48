//! Cloud creates interrupted at named fault points (src/fault.rs): the real
//! operator is killed with SIGKILL right before or right after the create
//! call, and what moto holds afterwards is counted. A create whose outcome
//! nobody saw is settled by looking the resource up by its UID tag, never
//! by creating blindly again.

mod support;

use std::os::unix::process::ExitStatusExt;
use std::time::Duration;

use kube::api::{Api, Patch, PatchParams, PostParams};
use nixops_operator::api::Machine;
use serde_json::json;

const TIMEOUT: Duration = Duration::from_secs(90);

async fn instances(ec2: &aws_sdk_ec2::Client, uid: &str) -> usize {
    let filter = aws_sdk_ec2::types::Filter::builder().name("tag:nixops.io/uid").values(uid).build();
    let out = ec2.describe_instances().filters(filter).send().await.unwrap();
    out.reservations()
        .iter()
        .flat_map(|r| r.instances())
        .filter(|i| i.state().and_then(|s| s.name()).map(|n| n.as_str()) != Some("terminated"))
        .count()
}

/// A namespace with an AWS Network in moto (made Ready by a plain
/// operator), and a Machine created while an operator with `faults` runs;
/// waits for that operator to kill itself at its fault point.
async fn machine_with_fault(prefix: &str, faults: &str) -> (Api<Machine>, String, support::SshHost) {
    let client = support::client().await;
    support::install_crds(&client).await;
    let ns = support::namespace(&client, prefix).await;
    support::aws_network(&client, &ns, "aws", &support::moto().endpoint).await;
    let networks: Api<nixops_operator::api::Network> = Api::namespaced(client.clone(), &ns);
    {
        let _operator = support::Operator::start(&ns, &[]);
        support::wait_for(&networks, "aws", TIMEOUT, "Ready", |n| {
            n.status.as_ref().is_some_and(|s| support::is_ready(&s.conditions))
        })
        .await;
    }
    let ec2 = support::ec2_client().await;
    let ami = ec2.describe_images().send().await.unwrap().images()[0].image_id().unwrap().to_owned();
    let host = support::SshHost::start();
    let machines: Api<Machine> = Api::namespaced(client.clone(), &ns);
    let m: Machine = serde_json::from_value(json!({
        "apiVersion": "nixops.io/v1alpha1", "kind": "Machine", "metadata": {"name": "web"},
        "spec": {
            "networkRef": {"name": "aws"},
            "provider": {"ec2": {"instanceType": "t3.small", "ami": ami, "subnet": "public-a"}},
            "ssh": {"host": host.host, "port": host.port}
        }
    }))
    .unwrap();
    machines.create(&PostParams::default(), &m).await.unwrap();
    let mut operator = support::Operator::start_env(&ns, &[], &[("FAILPOINTS", faults)]);
    let status = operator.wait_exit(TIMEOUT).expect("the operator reaches its fault point");
    assert_eq!(status.signal(), Some(9), "killed by SIGKILL at the fault point");
    let uid = machines.get("web").await.unwrap().metadata.uid.unwrap();
    (machines, uid, host)
}

fn annotation(m: &Machine, key: &str) -> Option<String> {
    m.metadata.annotations.as_ref().and_then(|a| a.get(key).cloned())
}

#[tokio::test]
async fn killed_after_the_create_call_the_instance_is_found_not_made_again() {
    let (machines, uid, _host) = machine_with_fault("create-after", "create-after-call=return(kill)").await;
    let ec2 = support::ec2_client().await;
    assert_eq!(instances(&ec2, &uid).await, 1, "the create went through before the kill");
    let m = machines.get("web").await.unwrap();
    assert!(annotation(&m, "nixops.io/create-pending").is_some(), "its outcome was never recorded");
    assert!(annotation(&m, "nixops.io/external-name").is_none());

    let ns = m.metadata.namespace.clone().unwrap();
    let _operator = support::Operator::start(&ns, &[]);
    support::wait_for(&machines, "web", TIMEOUT, "Ready", |m| {
        m.status.as_ref().is_some_and(|s| support::is_ready(&s.conditions))
    })
    .await;
    let m = machines.get("web").await.unwrap();
    assert_eq!(instances(&ec2, &uid).await, 1, "exactly one instance");
    let id = annotation(&m, "nixops.io/external-name").expect("the found instance is recorded");
    assert!(m.status.as_ref().unwrap().provider_id.as_ref().unwrap().ends_with(&id));
    assert!(annotation(&m, "nixops.io/create-pending").is_none(), "and the pending mark cleared");
}

#[tokio::test]
async fn killed_before_the_create_call_the_machine_stalls_instead_of_guessing() {
    let (machines, uid, _host) = machine_with_fault("create-before", "create-before-call=return(kill)").await;
    let ec2 = support::ec2_client().await;
    assert_eq!(instances(&ec2, &uid).await, 0);
    let ns = machines.get("web").await.unwrap().metadata.namespace.unwrap();

    // Nobody knows whether the create was sent: the lookup window passes
    // without an instance, and the Machine says what to do.
    let _operator = support::Operator::start(&ns, &["--create-pending-seconds", "5"]);
    support::wait_for(&machines, "web", TIMEOUT, "Stalled with CreateOutcomeUnknown", |m| {
        m.status.as_ref().is_some_and(|s| {
            s.conditions
                .iter()
                .any(|c| c.type_ == "Stalled" && c.status == "True" && c.reason == "CreateOutcomeUnknown")
        })
    })
    .await;
    let m = machines.get("web").await.unwrap();
    let message = support::condition_message(&m.status.unwrap().conditions, "Stalled");
    assert!(message.contains("nixops.io/create-pending") && message.contains("nixops.io/external-name"), "{message}");
    assert_eq!(instances(&ec2, &uid).await, 0, "nothing created while the outcome is unknown");

    // The user checked: there is none. Removing the mark creates exactly one.
    let patch = json!({"metadata": {"annotations": {"nixops.io/create-pending": null}}});
    machines.patch("web", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    support::wait_for(&machines, "web", TIMEOUT, "Ready", |m| {
        m.status.as_ref().is_some_and(|s| support::is_ready(&s.conditions))
    })
    .await;
    assert_eq!(instances(&ec2, &uid).await, 1);
}

/// What moto holds for the objects of namespace `ns`, by resource type
/// (found by the nixops.io/namespace tag; key pairs and buckets by the
/// names the test gave them). Instances and volumes on their way out count
/// as gone.
#[derive(Debug, PartialEq, Eq)]
struct Holdings {
    vpcs: usize,
    subnets: usize,
    internet_gateways: usize,
    security_groups: usize,
    key_pairs: usize,
    instances: usize,
    volumes: usize,
    buckets: usize,
}

impl Holdings {
    fn each(n: usize) -> Self {
        Self {
            vpcs: n,
            subnets: n,
            internet_gateways: n,
            security_groups: n,
            key_pairs: n,
            instances: n,
            volumes: n,
            buckets: n,
        }
    }
}

async fn holdings(ns: &str) -> Holdings {
    let ec2 = support::ec2_client().await;
    let s3 = support::s3_client().await;
    let tagged = || aws_sdk_ec2::types::Filter::builder().name("tag:nixops.io/namespace").values(ns).build();
    let vpcs = ec2.describe_vpcs().filters(tagged()).send().await.unwrap().vpcs().len();
    let subnets = ec2.describe_subnets().filters(tagged()).send().await.unwrap().subnets().len();
    let internet_gateways =
        ec2.describe_internet_gateways().filters(tagged()).send().await.unwrap().internet_gateways().len();
    // The default group of each VPC is not the operator's and is not tagged.
    let security_groups = ec2
        .describe_security_groups()
        .filters(tagged())
        .send()
        .await
        .unwrap()
        .security_groups()
        .iter()
        .filter(|g| g.group_name() != Some("default"))
        .count();
    let key_name = format!("{ns}-deployer");
    let key_pairs = ec2
        .describe_key_pairs()
        .send()
        .await
        .unwrap()
        .key_pairs()
        .iter()
        .filter(|k| k.key_name() == Some(key_name.as_str()))
        .count();
    let instances = ec2
        .describe_instances()
        .filters(tagged())
        .send()
        .await
        .unwrap()
        .reservations()
        .iter()
        .flat_map(|r| r.instances())
        .filter(|i| {
            !matches!(i.state().and_then(|s| s.name()).map(|n| n.as_str()), Some("terminated" | "shutting-down"))
        })
        .count();
    // Instances' root volumes carry their Machine's tags: only Volumes' count.
    let volume_kind = aws_sdk_ec2::types::Filter::builder().name("tag:nixops.io/kind").values("Volume").build();
    let volumes = ec2
        .describe_volumes()
        .filters(tagged())
        .filters(volume_kind)
        .send()
        .await
        .unwrap()
        .volumes()
        .iter()
        .filter(|v| !matches!(v.state().map(|s| s.as_str()), Some("deleted" | "deleting")))
        .count();
    let bucket = format!("{ns}-cache");
    let buckets =
        s3.list_buckets().send().await.unwrap().buckets().iter().filter(|b| b.name() == Some(bucket.as_str())).count();
    Holdings { vpcs, subnets, internet_gateways, security_groups, key_pairs, instances, volumes, buckets }
}

/// One object of every kind with a cloud resource, in a namespace of its own.
struct Estate {
    client: kube::Client,
    ns: String,
    _host: support::SshHost,
}

impl Estate {
    async fn create(prefix: &str) -> Self {
        let client = support::client().await;
        support::install_crds(&client).await;
        let ns = support::namespace(&client, prefix).await;
        support::aws_network(&client, &ns, "aws", &support::moto().endpoint).await;
        let ec2 = support::ec2_client().await;
        let ami = ec2.describe_images().send().await.unwrap().images()[0].image_id().unwrap().to_owned();
        let host = support::SshHost::start();
        let objects = [
            json!({"apiVersion": "nixops.io/v1alpha1", "kind": "KeyPair", "metadata": {"name": "deployer"},
                "spec": {"secretRef": {"name": "deployer"}, "networkRef": {"name": "aws"}, "provider": {"ec2": {}}}}),
            json!({"apiVersion": "nixops.io/v1alpha1", "kind": "Volume", "metadata": {"name": "data"},
                "spec": {"networkRef": {"name": "aws"}, "provider": {"ec2": {"zone": "eu-west-1a", "sizeGiB": 4}}}}),
            json!({"apiVersion": "nixops.io/v1alpha1", "kind": "S3Bucket", "metadata": {"name": "cache"},
                "spec": {"networkRef": {"name": "aws"}, "bucketName": format!("{ns}-cache")}}),
            json!({"apiVersion": "nixops.io/v1alpha1", "kind": "Machine", "metadata": {"name": "web"},
            "spec": {
                "networkRef": {"name": "aws"},
                "provider": {"ec2": {"instanceType": "t3.small", "ami": ami, "subnet": "public-a"}},
                "ssh": {"host": host.host, "port": host.port}
            }}),
        ];
        for object in objects {
            let yaml = serde_json::to_string(&object).unwrap();
            let out = support::kubectl(&["apply", "-n", &ns, "-f", "-"], Some(&yaml));
            assert!(out.status.success(), "kubectl apply: {}", String::from_utf8_lossy(&out.stderr));
        }
        Self { client, ns, _host: host }
    }

    /// Waits until every object is Ready. An object whose create was
    /// interrupted between recording the intent and the call (the kill hit
    /// another object's create at that moment) stalls with
    /// CreateOutcomeUnknown and nothing in the cloud; the test does what its
    /// message says (remove the mark), which must not make a second one.
    async fn wait_ready(&self) {
        use nixops_operator::api::{KeyPair, Network, S3Bucket, Volume};
        let c = &self.client;
        let ns = &self.ns;
        settle(&Api::<Network>::namespaced(c.clone(), ns), "aws").await;
        settle(&Api::<KeyPair>::namespaced(c.clone(), ns), "deployer").await;
        settle(&Api::<Volume>::namespaced(c.clone(), ns), "data").await;
        settle(&Api::<S3Bucket>::namespaced(c.clone(), ns), "cache").await;
        settle(&Api::<Machine>::namespaced(c.clone(), ns), "web").await;
    }

    /// Deletes every object, the Network last, and waits until all are gone.
    async fn delete(&self) {
        for kind in ["machine/web", "volume/data", "keypair/deployer", "s3bucket/cache", "network/aws"] {
            let out = support::kubectl(&["delete", "-n", &self.ns, "--wait=false", kind], None);
            assert!(out.status.success(), "kubectl delete {kind}: {}", String::from_utf8_lossy(&out.stderr));
        }
        let networks: Api<nixops_operator::api::Network> = Api::namespaced(self.client.clone(), &self.ns);
        support::wait_gone(&networks, "aws", Duration::from_secs(180)).await;
    }
}

/// Whether `obj` has condition `type_` True (with `reason`, if given).
fn has_condition<K: serde::Serialize>(obj: &K, type_: &str, reason: Option<&str>) -> bool {
    let value = serde_json::to_value(obj).unwrap();
    value["status"]["conditions"].as_array().is_some_and(|cs| {
        cs.iter().any(|c| c["type"] == type_ && c["status"] == "True" && reason.is_none_or(|r| c["reason"] == r))
    })
}

/// Waits for object `name` to be Ready, removing the create-pending mark
/// if it stalls with CreateOutcomeUnknown (see [`Estate::wait_ready`]).
async fn settle<K>(api: &Api<K>, name: &str)
where
    K: kube::Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + serde::Serialize + Send + 'static,
    K::DynamicType: Default,
{
    let unknown = |o: &K| has_condition(o, "Stalled", Some("CreateOutcomeUnknown"));
    support::wait_for(api, name, TIMEOUT, "Ready or CreateOutcomeUnknown", |o| {
        has_condition(o, "Ready", None) || unknown(o)
    })
    .await;
    if unknown(&api.get(name).await.unwrap()) {
        let clear = json!({"metadata": {"annotations": {"nixops.io/create-pending": null}}});
        api.patch(name, &PatchParams::default(), &Patch::Merge(&clear)).await.unwrap();
        support::wait_for(api, name, TIMEOUT, "Ready", |o| has_condition(o, "Ready", None)).await;
    }
}

/// The operator is killed right after the create of one `kind` of cloud
/// resource (`create-after-call:<kind>`), before it recorded anything; a new
/// one, whose first `lagging` lookups by tag find nothing (a cloud whose
/// reads lag its writes), finishes the job. Exactly one of every resource
/// afterwards, and none once everything is deleted.
async fn killed_after_create(kind: &str, lagging: usize) -> support::Operator {
    let estate = Estate::create(&format!("cf-{kind}")).await;
    let point = format!("create-after-call:{kind}=return(kill)");
    let mut operator = support::Operator::start_env(&estate.ns, &[], &[("FAILPOINTS", point.as_str())]);
    let status = operator.wait_exit(TIMEOUT).expect("the operator reaches its fault point");
    assert_eq!(status.signal(), Some(9), "killed by SIGKILL right after creating a {kind}");
    drop(operator);
    if kind != "key-pair" {
        // Killed while the Network was being built: the Machine only waited
        // for it, which is no create, so it carries no create-pending mark
        // that would stall it after the restart.
        let machines: Api<Machine> = Api::namespaced(estate.client.clone(), &estate.ns);
        let m = machines.get("web").await.unwrap();
        assert_eq!(annotation(&m, "nixops.io/create-pending"), None, "waiting for the Network is not a create");
    }

    let lag = format!("tag-lookup-empty={lagging}*return");
    let operator =
        support::Operator::start_env(&estate.ns, &["--create-pending-seconds", "30"], &[("FAILPOINTS", lag.as_str())]);
    estate.wait_ready().await;
    assert_eq!(holdings(&estate.ns).await, Holdings::each(1), "after recovering from a kill after a {kind} create");
    assert!(operator.logs().contains("tag-lookup-empty"), "the lookups lagged");

    estate.delete().await;
    assert_eq!(holdings(&estate.ns).await, Holdings::each(0), "after deleting everything");
    operator
}

#[tokio::test]
async fn killed_after_creating_the_vpc_exactly_one_of_everything() {
    let operator = killed_after_create("vpc", 4).await;
    // Every AWS call is counted, the ones never counted before included.
    for op in ["DescribeVpcs", "CreateSubnet", "DescribeSecurityGroups", "CreateSecurityGroup", "DeleteVpc"] {
        let calls =
            operator.metric("nixops_provider_calls_total", &["provider=\"aws\"", &format!("operation=\"{op}\"")]);
        assert!(calls >= 1.0, "{op} calls are counted: {calls}");
    }
}

#[tokio::test]
async fn killed_after_creating_a_subnet_exactly_one_of_everything() {
    killed_after_create("subnet", 4).await;
}

#[tokio::test]
async fn killed_between_creating_and_attaching_the_internet_gateway_exactly_one() {
    killed_after_create("internet-gateway", 4).await;
}

#[tokio::test]
async fn killed_after_creating_the_security_group_exactly_one_of_everything() {
    killed_after_create("security-group", 4).await;
}

#[tokio::test]
async fn killed_after_importing_the_key_pair_exactly_one_of_everything() {
    killed_after_create("key-pair", 4).await;
}
