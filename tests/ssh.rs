//! Authenticated SSH sessions against a real sshd: commands run with their
//! output and exit status; a host with another key is refused before any
//! authentication; a key the host does not accept is reported as such.

mod support;

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use nixops_operator::ssh::{HostKey, Session, SshError};
use russh::keys::PrivateKey;

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
    let probed = nixops_operator::ssh::probe_host_key(&target.host, target.port, TIMEOUT, Some(&jump)).await.unwrap();
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
