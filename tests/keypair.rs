//! KeyPair lifecycle against the real API server and the operator binary.

mod support;

use std::time::Duration;

use k8s_openapi::api::core::v1::{Event, Secret};
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use nixops_operator::api::network::ResourcePhase;
use nixops_operator::api::{KeyPair, Machine};
use serde_json::json;

const TIMEOUT: Duration = Duration::from_secs(60);

fn keypair(name: &str, secret: &str, policy: &str) -> KeyPair {
    serde_json::from_value(json!({
        "apiVersion": "nixops.io/v1alpha1", "kind": "KeyPair",
        "metadata": {"name": name},
        "spec": {"secretRef": {"name": secret}, "deletionPolicy": policy}
    }))
    .expect("keypair")
}

fn ready(k: &KeyPair) -> bool {
    k.status.as_ref().is_some_and(|s| support::condition(&s.conditions, "Ready").as_deref() == Some("True"))
}

#[tokio::test]
async fn generated_key_lands_in_its_secret_and_follows_the_deletion_policy() {
    let client = support::client().await;
    support::install_crds(&client).await;
    let ns = support::namespace(&client, "keypair").await;
    let operator = support::Operator::start(&ns, &[]);
    let keypairs: Api<KeyPair> = Api::namespaced(client.clone(), &ns);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);

    keypairs.create(&PostParams::default(), &keypair("deleted", "deleted-key", "Delete")).await.unwrap();
    keypairs.create(&PostParams::default(), &keypair("orphaned", "orphaned-key", "Orphan")).await.unwrap();
    support::wait_for(&keypairs, "deleted", TIMEOUT, "Ready", ready).await;
    support::wait_for(&keypairs, "orphaned", TIMEOUT, "Ready", ready).await;

    // The Secret holds an OpenSSH private key whose public half is in status.
    let kp = keypairs.get("deleted").await.unwrap();
    let status = kp.status.clone().unwrap();
    let secret = secrets.get("deleted-key").await.unwrap();
    let data = secret.data.clone().unwrap();
    let private = String::from_utf8(data["ssh-privatekey"].0.clone()).unwrap();
    assert!(private.starts_with("-----BEGIN OPENSSH PRIVATE KEY-----"), "{private}");
    let public = String::from_utf8(data["ssh-publickey"].0.clone()).unwrap();
    let status_key = status.public_key.clone().unwrap();
    assert!(public.starts_with(&status_key), "status.publicKey {status_key} must be the Secret's {public}");
    let fingerprint = status.fingerprint.clone().unwrap();
    assert!(fingerprint.starts_with("SHA256:"), "{fingerprint}");
    assert_eq!(status.observed_generation, kp.metadata.generation);

    // ssh-keygen agrees on the fingerprint.
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), &public).unwrap();
    let out = std::process::Command::new("ssh-keygen").arg("-lf").arg(file.path()).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains(&fingerprint));

    // An event says what happened; neither events nor logs nor status carry the private key.
    let events: Api<Event> = Api::namespaced(client.clone(), &ns);
    let all = events.list(&ListParams::default()).await.unwrap();
    assert!(all.items.iter().any(|e| e.reason.as_deref() == Some("KeyGenerated")), "no KeyGenerated event");
    let secret_body: String = private.lines().nth(2).unwrap().to_owned();
    for e in &all.items {
        assert!(!serde_json::to_string(e).unwrap().contains(&secret_body), "event leaks the private key");
    }
    assert!(!serde_json::to_string(&kp).unwrap().contains(&secret_body), "status leaks the private key");
    assert!(!operator.logs().contains(&secret_body), "logs leak the private key");

    // Delete removes the generated Secret; Orphan keeps it.
    keypairs.delete("deleted", &DeleteParams::default()).await.unwrap();
    keypairs.delete("orphaned", &DeleteParams::default()).await.unwrap();
    support::wait_gone(&keypairs, "deleted", TIMEOUT).await;
    support::wait_gone(&keypairs, "orphaned", TIMEOUT).await;
    assert!(secrets.get_opt("deleted-key").await.unwrap().is_none(), "Delete policy must remove the generated Secret");
    assert!(secrets.get_opt("orphaned-key").await.unwrap().is_some(), "Orphan policy must keep the Secret");
}

#[tokio::test]
async fn imported_public_key_and_a_secret_without_a_key() {
    let client = support::client().await;
    support::install_crds(&client).await;
    let ns = support::namespace(&client, "keypair-import").await;
    let _operator = support::Operator::start(&ns, &[]);
    let keypairs: Api<KeyPair> = Api::namespaced(client.clone(), &ns);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);

    let host = support::SshHost::start(); // only for a real public key
    let mut imported = keypair("imported", "imported-key", "Delete");
    imported.spec.public_key = Some(host.host_key.clone());
    keypairs.create(&PostParams::default(), &imported).await.unwrap();
    support::wait_for(&keypairs, "imported", TIMEOUT, "Ready", ready).await;
    let status = keypairs.get("imported").await.unwrap().status.unwrap();
    assert!(host.host_key.starts_with(status.public_key.as_deref().unwrap()));
    assert!(secrets.get_opt("imported-key").await.unwrap().is_none(), "an imported key must not create a Secret");

    // A Secret that exists but holds no key: Stalled, naming the Secret and the fix.
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": "empty"}, "stringData": {"other": "x"}
    }))
    .unwrap();
    secrets.create(&PostParams::default(), &secret).await.unwrap();
    keypairs.create(&PostParams::default(), &keypair("empty", "empty", "Delete")).await.unwrap();
    support::wait_for(&keypairs, "empty", TIMEOUT, "Stalled", |k| {
        k.status.as_ref().is_some_and(|s| support::condition(&s.conditions, "Stalled").as_deref() == Some("True"))
    })
    .await;
    let status = keypairs.get("empty").await.unwrap().status.unwrap();
    let message = support::condition_message(&status.conditions, "Stalled");
    assert!(message.contains("Secret empty exists but has no ssh-privatekey"), "{message}");
    assert_eq!(status.phase, Some(ResourcePhase::Failed));
}

fn stalled_with(reason: &'static str) -> impl Fn(&KeyPair) -> bool {
    move |k| {
        k.status.as_ref().is_some_and(|s| {
            s.conditions.iter().any(|c| c.type_ == "Stalled" && c.status == "True" && c.reason == reason)
        })
    }
}

/// A new ed25519 private key from ssh-keygen, in OpenSSH format.
fn other_private_key() -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("key");
    support::ssh_keygen(&file);
    std::fs::read(&file).unwrap()
}

/// EC2 and the machines keep authorising the key a KeyPair issued, so a
/// lost private key is never silently replaced by a new one (logins would
/// then fail with nothing saying why), nor a different key in the Secret
/// taken: the KeyPair stalls, naming the key, where it is registered and the
/// fix, and goes on once the key is restored.
#[tokio::test]
async fn a_registered_key_whose_secret_is_lost_is_not_regenerated() {
    let client = support::client().await;
    support::install_crds(&client).await;
    let ns = support::namespace(&client, "keypair-lost").await;
    support::aws_network(&client, &ns, "aws", &support::moto().endpoint).await;
    // No resync during the test: the Secret's deletion itself must wake the KeyPair.
    let _operator = support::Operator::start(&ns, &["--resync-seconds", "3600"]);
    let keypairs: Api<KeyPair> = Api::namespaced(client.clone(), &ns);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let ec2 = support::ec2_client().await;
    let cloud_name = format!("{ns}-deployer");

    let kp: KeyPair = serde_json::from_value(json!({
        "apiVersion": "nixops.io/v1alpha1", "kind": "KeyPair", "metadata": {"name": "deployer"},
        "spec": {"secretRef": {"name": "deployer-ssh"}, "networkRef": {"name": "aws"}, "provider": {"ec2": {}}}
    }))
    .unwrap();
    keypairs.create(&PostParams::default(), &kp).await.unwrap();
    support::wait_for(&keypairs, "deployer", TIMEOUT, "Ready and registered", |k| {
        ready(k) && k.status.as_ref().is_some_and(|s| s.cloud_key_name.is_some())
    })
    .await;
    let issued = keypairs.get("deployer").await.unwrap().status.unwrap();
    let fingerprint = issued.fingerprint.clone().unwrap();
    let private = secrets.get("deployer-ssh").await.unwrap().data.unwrap()["ssh-privatekey"].clone();
    let registered = ec2.describe_key_pairs().key_names(&cloud_name).send().await.unwrap();
    let registered_id = registered.key_pairs()[0].key_pair_id().unwrap().to_owned();

    // A Machine logging in with it (on a port where nothing listens).
    let machines: Api<Machine> = Api::namespaced(client.clone(), &ns);
    let machine: Machine = serde_json::from_value(json!({
        "apiVersion": "nixops.io/v1alpha1", "kind": "Machine", "metadata": {"name": "web"},
        "spec": {"networkRef": {"name": "aws"},
                 "provider": {"existing": {"host": "127.0.0.1", "port": support::free_port()}},
                 "ssh": {"keyPairRef": {"name": "deployer"}}}
    }))
    .unwrap();
    machines.create(&PostParams::default(), &machine).await.unwrap();

    // The Secret goes: no new key, a Stalled condition that says why.
    secrets.delete("deployer-ssh", &DeleteParams::default()).await.unwrap();
    support::wait_for(&keypairs, "deployer", TIMEOUT, "Stalled PrivateKeyLost", stalled_with("PrivateKeyLost")).await;
    support::wait_for(&machines, "web", TIMEOUT, "waiting for the KeyPair, saying why", |m| {
        m.status.as_ref().is_some_and(|s| {
            support::condition_message(&s.conditions, "Ready").contains("KeyPair deployer")
                && support::condition_message(&s.conditions, "Ready").contains("no longer holds ssh-privatekey")
        })
    })
    .await;
    let status = keypairs.get("deployer").await.unwrap().status.unwrap();
    let message = support::condition_message(&status.conditions, "Stalled");
    for says in [
        fingerprint.as_str(),
        &format!("EC2 key pair {cloud_name}"),
        "Restore ssh-privatekey in Secret deployer-ssh",
        "delete this KeyPair, create it again",
    ] {
        assert!(message.contains(says), "the message must say {says:?}: {message}");
    }
    assert_eq!(status.fingerprint.as_deref(), Some(fingerprint.as_str()), "status keeps the key EC2 authorises");
    assert_eq!(status.phase, Some(ResourcePhase::Failed));
    assert!(secrets.get_opt("deployer-ssh").await.unwrap().is_none(), "no new key may be generated");
    let still = ec2.describe_key_pairs().key_names(&cloud_name).send().await.unwrap();
    assert_eq!(still.key_pairs()[0].key_pair_id(), Some(registered_id.as_str()), "EC2 keeps the issued key");

    // Another key put in its place is not taken either.
    let secret = |private: Vec<u8>| -> Secret {
        serde_json::from_value(json!({
            "metadata": {"name": "deployer-ssh"}, "type": "kubernetes.io/ssh-auth",
            "data": {"ssh-privatekey": k8s_openapi::ByteString(private)}
        }))
        .unwrap()
    };
    secrets.create(&PostParams::default(), &secret(other_private_key())).await.unwrap();
    support::wait_for(&keypairs, "deployer", TIMEOUT, "Stalled KeyReplaced", stalled_with("KeyReplaced")).await;
    let status = keypairs.get("deployer").await.unwrap().status.unwrap();
    let message = support::condition_message(&status.conditions, "Stalled");
    assert!(message.contains(&format!("issued {fingerprint}")), "{message}");
    assert_eq!(status.fingerprint.as_deref(), Some(fingerprint.as_str()));

    // The issued key restored: Ready again, nothing re-imported.
    secrets.delete("deployer-ssh", &DeleteParams::default()).await.unwrap();
    secrets.create(&PostParams::default(), &secret(private.0)).await.unwrap();
    support::wait_for(&keypairs, "deployer", TIMEOUT, "Ready again", ready).await;
    let status = keypairs.get("deployer").await.unwrap().status.unwrap();
    assert_eq!(status.fingerprint.as_deref(), Some(fingerprint.as_str()));
    assert!(support::condition(&status.conditions, "Stalled").is_none());
    let after = ec2.describe_key_pairs().key_names(&cloud_name).send().await.unwrap();
    assert_eq!(after.key_pairs()[0].key_pair_id(), Some(registered_id.as_str()));
}
