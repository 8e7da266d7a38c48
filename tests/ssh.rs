//! Authenticated SSH sessions against a real sshd: commands run with their
//! output and exit status; a host with another key is refused before any
//! authentication, whatever type the pinned key has; a key the host does not
//! accept is reported as such; a login other than root runs commands as root
//! through passwordless sudo, or says that it needs it.

mod support;

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use nixops_operator::ssh::{HostKey, Session, SshError, probe_host_key};
use russh::keys::PrivateKey;
use support::node::{NixNode, NodeSetup, NodeUser};

const TIMEOUT: Duration = Duration::from_secs(10);

fn client_key(dir: &std::path::Path, name: &str) -> (PrivateKey, String) {
    let path = dir.join(name);
    let status = Command::new("ssh-keygen").args(["-q", "-t", "ed25519", "-N", "", "-f"]).arg(&path).status().unwrap();
    assert!(status.success());
    let private = PrivateKey::from_openssh(std::fs::read_to_string(&path).unwrap()).unwrap();
    let public = std::fs::read_to_string(path.with_extension("pub")).unwrap();
    (private, public)
}

#[tokio::test]
async fn commands_run_only_on_the_pinned_host_with_an_authorised_key() {
    let host = support::SshHost::start();
    let other = support::SshHost::start();
    let keys = tempfile::tempdir().unwrap();
    let (key, public) = client_key(keys.path(), "deployer");
    let (stranger, _) = client_key(keys.path(), "stranger");
    std::fs::write(host.dir.path().join("authorized_keys"), public).unwrap();
    let pinned = HostKey::parse(&host.host_key, "host key").unwrap();

    let session = Session::connect(&host.host, host.port, "root", &key, &pinned, TIMEOUT, None).await.unwrap();
    let out = session.exec("echo hello; echo oops >&2; exit 3").await.unwrap();
    assert_eq!(out.status, Some(3));
    assert_eq!(out.stdout, b"hello\n");
    assert_eq!(out.stderr, b"oops\n");
    // The session carries several commands.
    assert_eq!(session.exec("true").await.unwrap().status, Some(0));
    session.close().await;

    // Another host's key pinned: refused during key exchange, naming both keys.
    let wrong_pin = HostKey::parse(&other.host_key, "other").unwrap();
    match Session::connect(&host.host, host.port, "root", &key, &wrong_pin, TIMEOUT, None).await {
        Err(err @ SshError::HostKeyMismatch { .. }) => {
            let msg = err.to_string();
            assert!(msg.contains(&pinned.fingerprint()) && msg.contains(&wrong_pin.fingerprint()), "{msg}");
        }
        Err(other) => panic!("expected a host key mismatch, got {other}"),
        Ok(_) => panic!("connected to a host whose key is not pinned"),
    }
    // sshd saw exactly one login: the first session's, none from the refused connection.
    let log = std::fs::read_to_string(host.dir.path().join("sshd.log")).unwrap_or_default();
    assert_eq!(log.matches("Accepted publickey").count(), 1, "unexpected logins:\n{log}");

    // A key the host does not accept.
    match Session::connect(&host.host, host.port, "root", &stranger, &pinned, TIMEOUT, None).await {
        Err(SshError::AuthRejected { user, .. }) => assert_eq!(user, "root"),
        Err(other) => panic!("expected the key to be rejected, got {other}"),
        Ok(_) => panic!("an unauthorised key logged in"),
    }
}

#[tokio::test]
async fn sessions_and_probes_go_through_a_jump_host() {
    let bastion = support::SshHost::start();
    let closed = support::SshHost::start_with("AllowTcpForwarding no\n");
    let target = support::SshHost::start();
    let keys = tempfile::tempdir().unwrap();
    let (key, public) = client_key(keys.path(), "deployer");
    for host in [&bastion, &closed, &target] {
        std::fs::write(host.dir.path().join("authorized_keys"), &public).unwrap();
    }
    let pin = |h: &support::SshHost| HostKey::parse(&h.host_key, "host key").unwrap();

    let jump = Arc::new(
        Session::connect(&bastion.host, bastion.port, "root", &key, &pin(&bastion), TIMEOUT, None).await.unwrap(),
    );
    let probed = probe_host_key(&target.host, target.port, TIMEOUT, Some(&jump), None).await.unwrap();
    assert_eq!(probed, pin(&target));
    let session = Session::connect(&target.host, target.port, "root", &key, &pin(&target), TIMEOUT, Some(jump.clone()))
        .await
        .unwrap();
    let out = session.exec("echo through").await.unwrap();
    assert_eq!(out.stdout, b"through\n");
    // The target is pinned through the tunnel as well.
    let wrong = Session::connect(&target.host, target.port, "root", &key, &pin(&bastion), TIMEOUT, Some(jump)).await;
    assert!(matches!(wrong, Err(SshError::HostKeyMismatch { .. })));

    // A jump host that refuses forwarding: the error says the jump host could not connect.
    let refusing = Arc::new(
        Session::connect(&closed.host, closed.port, "root", &key, &pin(&closed), TIMEOUT, None).await.unwrap(),
    );
    let err = Session::connect(&target.host, target.port, "root", &key, &pin(&target), TIMEOUT, Some(refusing))
        .await
        .err()
        .expect("forwarding is disabled on that jump host");
    assert!(err.to_string().contains("jump host"), "{err}");
}

/// A host with ed25519, RSA and ECDSA keys proves whichever one is pinned
/// (russh would pick ed25519 by itself), and only that very key is
/// accepted: another host's key of the same type is refused, naming both.
#[tokio::test]
async fn a_pinned_host_key_of_any_type_is_negotiated_and_enforced() {
    let keys = tempfile::tempdir().unwrap();
    let (key, public) = client_key(keys.path(), "deployer");
    let setup = NodeSetup { host_keys: vec!["rsa", "ecdsa"], ..NodeSetup::default() };
    let node = NixNode::start_with(&public, &setup);
    let other = NixNode::start_with(&public, &setup);

    for kind in ["rsa", "ecdsa", "ed25519"] {
        let pinned = HostKey::parse(&node.host_key_of(kind), kind).unwrap();
        let session = Session::connect(&node.host, node.port, "root", &key, &pinned, TIMEOUT, None)
            .await
            .unwrap_or_else(|e| panic!("a {kind} pin on a host that has that key: {e}"));
        assert_eq!(session.exec("echo ok").await.unwrap().stdout, b"ok\n");
        session.close().await;
        let probed = probe_host_key(&node.host, node.port, TIMEOUT, None, Some(&pinned)).await.unwrap();
        assert_eq!(probed, pinned, "a probe for a {kind} pin sees the host's {kind} key");

        let wrong = HostKey::parse(&other.host_key_of(kind), kind).unwrap();
        match Session::connect(&node.host, node.port, "root", &key, &wrong, TIMEOUT, None).await {
            Err(err @ SshError::HostKeyMismatch { .. }) => {
                let msg = err.to_string();
                assert!(
                    msg.contains(&pinned.fingerprint()) && msg.contains(&wrong.fingerprint()),
                    "the host's own {kind} key and the wrong {kind} pin are both named: {msg}"
                );
            }
            Err(err) => panic!("expected a host key mismatch for a wrong {kind} pin, got {err}"),
            Ok(_) => panic!("connected to a host whose {kind} key is not the pinned one"),
        }
    }
    // Only the sessions with the right pins logged in.
    assert_eq!(node.sshd_log().matches("Accepted publickey").count(), 3, "{}", node.sshd_log());

    // Through a jump host pinned by its ECDSA key, to the node pinned by its RSA key.
    let jump_pin = HostKey::parse(&other.host_key_of("ecdsa"), "ecdsa").unwrap();
    let jump =
        Arc::new(Session::connect(&other.host, other.port, "root", &key, &jump_pin, TIMEOUT, None).await.unwrap());
    let rsa_pin = HostKey::parse(&node.host_key_of("rsa"), "rsa").unwrap();
    let probed = probe_host_key(&node.host, node.port, TIMEOUT, Some(&jump), Some(&rsa_pin)).await.unwrap();
    assert_eq!(probed, rsa_pin);
    let session =
        Session::connect(&node.host, node.port, "root", &key, &rsa_pin, TIMEOUT, Some(jump.clone())).await.unwrap();
    assert_eq!(session.exec("echo through").await.unwrap().stdout, b"through\n");

    // Nothing pinned (first contact): always the ed25519 key, so what is
    // recorded does not depend on the attempt.
    for _ in 0..3 {
        let probed = probe_host_key(&node.host, node.port, TIMEOUT, None, None).await.unwrap();
        assert_eq!(probed, HostKey::parse(&node.host_key(), "ed25519").unwrap());
    }
}

/// A login user other than root runs every command as root through
/// `sudo -n`, standard input and output passing through unchanged; a user
/// without passwordless sudo is told so before any command runs.
#[tokio::test]
async fn a_non_root_login_runs_commands_as_root_through_passwordless_sudo() {
    let keys = tempfile::tempdir().unwrap();
    let (key, public) = client_key(keys.path(), "deployer");
    let users = vec![NodeUser { name: "deployer".into(), sudo: true }, NodeUser { name: "intern".into(), sudo: false }];
    let node = NixNode::start_with(&public, &NodeSetup { users, ..NodeSetup::default() });
    let pinned = HostKey::parse(&node.host_key(), "host key").unwrap();

    let session = Session::connect(&node.host, node.port, "deployer", &key, &pinned, TIMEOUT, None).await.unwrap();
    let out = session.exec("id -un; echo \"it's $(id -u)\" >&2; exit 3").await.unwrap();
    assert_eq!((out.status, out.stdout, out.stderr), (Some(3), b"root\n".to_vec(), b"it's 0\n".to_vec()));
    // Binary input and output, larger than a channel window, byte for byte.
    let data: Vec<u8> = (0..4 << 20).map(|i: u32| (i % 251) as u8).collect();
    let mut cat = session.spawn("cat").await.unwrap();
    cat.send(data.clone()).await.unwrap();
    let echoed = cat.read_exact(data.len()).await.unwrap();
    assert!(echoed == data, "what went through sudo came back changed");
    assert_eq!(cat.finish().await.unwrap().status, Some(0));
    let out = session.exec_with_input("cat > /root/written; stat -c '%U %s' /root/written", b"secret").await.unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "root 6\n");
    session.close().await;
    assert!(node.sshd_log().contains("Accepted publickey for deployer"), "{}", node.sshd_log());

    let session = Session::connect(&node.host, node.port, "intern", &key, &pinned, TIMEOUT, None).await.unwrap();
    match session.exec("touch /root/intern-was-here").await {
        Err(err @ SshError::SudoRefused { .. }) => {
            let msg = err.to_string();
            assert!(msg.contains("user intern needs passwordless sudo"), "{msg}");
            assert!(msg.contains("a password is required"), "what sudo said is kept: {msg}");
        }
        Err(err) => panic!("expected sudo to be refused, got {err}"),
        Ok(out) => panic!("a user without passwordless sudo ran a command: {out:?}"),
    }
    assert!(!node.exec("test -e /root/intern-was-here").status.success());
}
