//! SSH with russh: host keys, pinning, the probe that learns a host's key,
//! and authenticated sessions to pinned hosts.

pub mod session;

pub use session::{CommandOutput, RemoteProcess, Session};

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use russh::keys::{HashAlg, PublicKey, PublicKeyOrCertificate};

/// Errors talking SSH to a machine.
#[derive(Debug, thiserror::Error)]
pub enum SshError {
    #[error("cannot connect to {addr}: {reason}")]
    Connect { addr: String, reason: String },
    /// The connection died while a command ran; whether it finished is unknown.
    #[error("lost the connection to {addr}: {reason}")]
    Lost { addr: String, reason: String },
    #[error("no SSH answer from {addr} within {seconds} s")]
    Timeout { addr: String, seconds: u64 },
    #[error("{addr} presented host key {presented}, but {pinned} is pinned; refusing to talk to it")]
    HostKeyMismatch { addr: String, presented: String, pinned: String },
    #[error("{addr} rejected the key for user {user}; authorise the KeyPair's public key for that user")]
    AuthRejected { addr: String, user: String },
    #[error("{what} is not an OpenSSH public key: {reason}")]
    BadKey { what: String, reason: String },
}

/// An SSH host key, compared by key material (the comment is ignored).
#[derive(Clone, Debug)]
pub struct HostKey(PublicKey);

impl HostKey {
    /// Parses an OpenSSH public key line (`ssh-ed25519 AAAA… [comment]`).
    pub fn parse(line: &str, what: &str) -> Result<Self, SshError> {
        PublicKey::from_openssh(line.trim())
            .map(Self)
            .map_err(|e| SshError::BadKey { what: what.to_owned(), reason: e.to_string() })
    }

    /// SHA256 fingerprint as `ssh-keygen -l` prints it.
    pub fn fingerprint(&self) -> String {
        self.0.fingerprint(HashAlg::Sha256).to_string()
    }

    /// The key as one OpenSSH line without comment.
    pub fn to_openssh(&self) -> String {
        let mut key = self.0.clone();
        key.set_comment("");
        key.to_openssh().unwrap_or_default()
    }

    pub fn public_key(&self) -> &PublicKey {
        &self.0
    }
}

impl PartialEq for HostKey {
    fn eq(&self, other: &Self) -> bool {
        self.0.key_data() == other.0.key_data()
    }
}

impl fmt::Display for HostKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.0.algorithm(), self.fingerprint())
    }
}

/// Records the key the server presents and accepts it: used only to learn
/// a host's key, never to authenticate or send anything.
struct KeyRecorder(Arc<Mutex<Option<PublicKey>>>);

impl russh::client::Handler for KeyRecorder {
    type Error = russh::Error;

    async fn check_server_key(&mut self, key: &PublicKeyOrCertificate) -> Result<bool, Self::Error> {
        if let Ok(mut seen) = self.0.lock() {
            *seen = Some(key.public_key());
        }
        Ok(true)
    }
}

/// Connects to `host:port`, completes the key exchange, and returns the host
/// key the server proved it holds. Does not authenticate.
pub async fn probe_host_key(
    host: &str,
    port: u16,
    timeout: Duration,
    via: Option<&Session>,
) -> Result<HostKey, SshError> {
    let addr = format_addr(host, port);
    let seen = Arc::new(Mutex::new(None));
    let config =
        Arc::new(russh::client::Config { inactivity_timeout: Some(timeout), ..russh::client::Config::default() });
    let connect = session::connect_handler(config, host, port, KeyRecorder(seen.clone()), via);
    let handle = match tokio::time::timeout(timeout, connect).await {
        Err(_) => return Err(SshError::Timeout { addr, seconds: timeout.as_secs() }),
        Ok(Err(err)) => return Err(SshError::Connect { addr, reason: err.to_string() }),
        Ok(Ok(handle)) => handle,
    };
    let _ = handle.disconnect(russh::Disconnect::ByApplication, "", "en").await;
    let key = seen.lock().ok().and_then(|mut k| k.take());
    key.map(HostKey).ok_or(SshError::Connect { addr, reason: "the server presented no host key".into() })
}

/// `host:port`, with brackets around IPv6 addresses.
pub fn format_addr(host: &str, port: u16) -> String {
    if host.contains(':') { format!("[{host}]:{port}") } else { format!("{host}:{port}") }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHsf5n2k2cOqRk8yE1xXKmbvmN4QUeTSR3dOzU6pD6VJ";

    #[test]
    fn host_keys_compare_by_key_material_not_comment() {
        let a = HostKey::parse(KEY, "a").unwrap();
        let b = HostKey::parse(&format!("{KEY} root@web-1"), "b").unwrap();
        assert_eq!(a, b);
        assert!(a.fingerprint().starts_with("SHA256:"));
        assert_eq!(b.to_openssh(), KEY);
    }

    #[test]
    fn a_bad_key_names_what_it_was() {
        let err = HostKey::parse("ssh-ed25519 nope", "spec.ssh.hostKey").unwrap_err();
        assert!(err.to_string().starts_with("spec.ssh.hostKey is not an OpenSSH public key"));
    }

    #[test]
    fn ipv6_addresses_are_bracketed() {
        assert_eq!(format_addr("::1", 22), "[::1]:22");
        assert_eq!(format_addr("127.0.0.2", 2222), "127.0.0.2:2222");
    }
}
