//! A namespace with a running operator, a generated KeyPair and a Network,
//! and real nodes to deploy to: what the deploy tests share.

use std::time::Duration;

use k8s_openapi::api::core::v1::Event;
use kube::Client;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use nixops_operator::api::{KeyPair, Machine, Network};
use serde_json::json;

use super::node::{Activation, NixNode, NodeSetup, TestSystem, build_system};

pub const TIMEOUT: Duration = Duration::from_secs(90);

/// A namespace with an operator, a generated KeyPair and a Network.
pub struct Fleet {
    pub client: Client,
    pub ns: String,
    pub machines: Api<Machine>,
    pub operator: super::Operator,
    pub public_key: String,
}

impl Fleet {
    pub async fn start(prefix: &str, network_spec: serde_json::Value) -> Self {
        let client = super::client().await;
        super::install_crds(&client).await;
        let ns = super::namespace(&client, prefix).await;
        let operator = super::Operator::start(&ns, &["--resync-seconds", "2"]);
        let keypairs = create_deployer_keypair(&client, &ns).await;
        super::wait_for(&keypairs, "deployer", TIMEOUT, "KeyPair Ready", |k| {
            k.status.as_ref().is_some_and(|s| super::is_ready(&s.conditions))
        })
        .await;
        let public_key = keypairs.get("deployer").await.unwrap().status.unwrap().public_key.unwrap();
        let network: Network = serde_json::from_value(json!({
            "apiVersion": "nixops.io/v1alpha1", "kind": "Network", "metadata": {"name": "net"}, "spec": network_spec
        }))
        .unwrap();
        Api::<Network>::namespaced(client.clone(), &ns).create(&PostParams::default(), &network).await.unwrap();
        let machines = Api::namespaced(client.clone(), &ns);
        Self { client, ns, machines, operator, public_key }
    }

    pub fn node(&self) -> NixNode {
        NixNode::start(&self.public_key)
    }

    /// A node with more host keys or login users, all accepting the KeyPair.
    pub fn node_with(&self, setup: &NodeSetup) -> NixNode {
        NixNode::start_with(&self.public_key, setup)
    }

    pub async fn create(&self, name: &str, node: &NixNode, nixos: serde_json::Value, extra: serde_json::Value) {
        let mut spec = json!({
            "networkRef": {"name": "net"},
            "provider": {"existing": {"host": node.host, "port": node.port}},
            "ssh": {"keyPairRef": {"name": "deployer"}},
            "nixos": nixos,
        });
        if let (Some(spec), Some(extra)) = (spec.as_object_mut(), extra.as_object()) {
            spec.extend(extra.clone());
        }
        let machine: Machine = serde_json::from_value(json!({
            "apiVersion": "nixops.io/v1alpha1", "kind": "Machine", "metadata": {"name": name}, "spec": spec
        }))
        .unwrap();
        self.machines.create(&PostParams::default(), &machine).await.unwrap();
    }

    pub async fn set_closure(&self, name: &str, closure: &str) {
        let patch = json!({"spec": {"nixos": {"closure": closure}}});
        self.machines.patch(name, &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    }

    pub async fn wait_running(&self, name: &str, closure: &str) -> Machine {
        self.wait_running_within(name, closure, TIMEOUT).await
    }

    /// [`Fleet::wait_running`] with its own deadline (VMs boot slowly).
    pub async fn wait_running_within(&self, name: &str, closure: &str, timeout: Duration) -> Machine {
        super::wait_for(&self.machines, name, timeout, &format!("Ready on {closure}"), |m| {
            m.status.as_ref().is_some_and(|s| {
                s.closure.as_deref() == Some(closure)
                    && super::is_ready(&s.conditions)
                    && s.observed_generation == m.metadata.generation
            })
        })
        .await;
        self.machines.get(name).await.unwrap()
    }

    pub async fn wait_stalled(&self, name: &str, reason: &str) -> Machine {
        super::wait_for(&self.machines, name, TIMEOUT, &format!("Stalled with {reason}"), |m| {
            m.status.as_ref().is_some_and(|s| {
                s.conditions.iter().any(|c| c.type_ == "Stalled" && c.status == "True" && c.reason == reason)
            })
        })
        .await;
        self.machines.get(name).await.unwrap()
    }

    pub async fn event_reasons(&self) -> Vec<String> {
        let events: Api<Event> = Api::namespaced(self.client.clone(), &self.ns);
        events.list(&ListParams::default()).await.unwrap().items.into_iter().filter_map(|e| e.reason).collect()
    }
}

/// Creates the KeyPair `deployer` (generated into Secret `deployer-ssh`).
pub async fn create_deployer_keypair(client: &Client, ns: &str) -> Api<KeyPair> {
    let keypairs: Api<KeyPair> = Api::namespaced(client.clone(), ns);
    let keypair: KeyPair = serde_json::from_value(json!({
        "apiVersion": "nixops.io/v1alpha1", "kind": "KeyPair", "metadata": {"name": "deployer"},
        "spec": {"secretRef": {"name": "deployer-ssh"}}
    }))
    .unwrap();
    keypairs.create(&PostParams::default(), &keypair).await.unwrap();
    keypairs
}

pub fn nonce() -> String {
    let mut bytes = [0u8; 6];
    getrandom::fill(&mut bytes).unwrap();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn system(name: &str, nonce: &str, packages: &[(&str, &str)], activation: Activation) -> String {
    build_system(&TestSystem {
        name: name.into(),
        packages: packages.iter().map(|(n, c)| (n.to_string(), c.to_string())).collect(),
        activation,
        nonce: nonce.into(),
    })
}

pub fn last_deploy(m: &Machine) -> nixops_operator::api::machine::DeployRecord {
    m.status.as_ref().and_then(|s| s.last_deploy.clone()).expect("status.lastDeploy")
}

impl Fleet {
    /// Replaces the operator with a new process started with `env` (e.g.
    /// `FAILPOINTS`); the old one is killed first.
    pub fn restart_operator(&mut self, env: &[(&str, &str)]) {
        let extra = ["--resync-seconds", "2"];
        let old = std::mem::replace(&mut self.operator, super::Operator::start_env(&self.ns, &extra, env));
        drop(old);
    }

    /// Makes the operator look at Machine `name` again now (an annotation
    /// changes), as a user does after fixing what it stalled on.
    pub async fn nudge(&self, name: &str) {
        let patch = serde_json::json!({"metadata": {"annotations": {"retry": nonce()}}});
        self.machines
            .patch(name, &kube::api::PatchParams::default(), &kube::api::Patch::Merge(&patch))
            .await
            .expect("annotate the machine");
    }

    /// Waits until the last deployment of `closure` has ended with `result`.
    pub async fn wait_result(&self, name: &str, closure: &str, result: &str) -> Machine {
        super::wait_for(&self.machines, name, TIMEOUT, &format!("{result} deploying {closure}"), |m| {
            m.status
                .as_ref()
                .and_then(|s| s.last_deploy.as_ref())
                .is_some_and(|l| l.closure == closure && l.result.as_deref() == Some(result))
        })
        .await;
        self.machines.get(name).await.unwrap()
    }
}
