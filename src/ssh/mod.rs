//! SSH with russh: host keys, pinning, the probe that learns a host's key,
//! and authenticated sessions to pinned hosts.

pub mod session;

pub use session::{CommandOutput, RemoteProcess, Session};

use std::borrow::Cow;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use russh::keys::{Algorithm, HashAlg, PublicKey, PublicKeyOrCertificate};

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
    #[error(
        "{addr}: user {user} needs passwordless sudo to run store and activation commands as root, \
         but `sudo -n true` failed: {reason}"
    )]
    SudoRefused { addr: String, user: String, reason: String },
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

/// Host key algorithms to offer in the key exchange: russh's, those of
/// `pinned`'s type first (both SHA-2 signatures for RSA). The server takes
/// the first one it has a key for, so a host that also has keys of other
/// types proves the pinned one. The other types stay on offer: the pin is
/// enforced on key material, and a host without a key of the pinned type
/// then shows the key it has, for a mismatch that names both.
fn preferred_algorithms(pinned: Option<&HostKey>) -> Cow<'static, [Algorithm]> {
    let default = russh::Preferred::DEFAULT.key;
    let Some(pinned) = pinned else { return default };
    let wanted = pinned.0.algorithm();
    let rsa = matches!(wanted, Algorithm::Rsa { .. });
    let same_type = |a: &Algorithm| if rsa { matches!(a, Algorithm::Rsa { .. }) } else { *a == wanted };
    let (mut first, rest): (Vec<Algorithm>, Vec<Algorithm>) = default.iter().cloned().partition(same_type);
    if first.is_empty() {
        // A type russh does not offer by default: offer it anyway; the
        // negotiation fails with a clear error if russh cannot verify it.
        first.push(wanted);
    }
    first.extend(rest);
    Cow::Owned(first)
}

/// The client configuration every connection starts from: key exchange
/// offering `pinned`'s algorithm first, and `timeout` of inactivity.
pub(crate) fn client_config(pinned: Option<&HostKey>, timeout: Duration) -> russh::client::Config {
    russh::client::Config {
        inactivity_timeout: Some(timeout),
        preferred: russh::Preferred { key: preferred_algorithms(pinned), ..russh::Preferred::default() },
        ..russh::client::Config::default()
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
/// key the server proved it holds. Does not authenticate. With `pinned`, the
/// server is asked for a key of that type first (a host has one key per
/// type); without, russh's order decides (ed25519 first), so repeated
/// probes of a host see the same key.
pub async fn probe_host_key(
    host: &str,
    port: u16,
    timeout: Duration,
    via: Option<&Session>,
    pinned: Option<&HostKey>,
) -> Result<HostKey, SshError> {
    let addr = format_addr(host, port);
    let seen = Arc::new(Mutex::new(None));
    let config = Arc::new(client_config(pinned, timeout));
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

    const RSA: &str = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAAAgQCzszwNWF8HFgsKE501Vmsbl6ZWdi6uZSKpQqtoTMShKx+WfguTRZBshHSPJZ3JtPogByiM77nhwIkUSZOLeUvhwOFjpSVkjukEOlQeD3XuM7oBOBg4nyvIkatNJMKXh+j0UaW1Jia6HFnpirwqew/YvhJhf8VeXKQtzo6UPGb/kw==";
    const ECDSA: &str = "ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBK2VsUdEXQpqvDMF2oh3sMVoIHBJS6nm8F8aRwxfy6Hs0jn8fqpfwlDn7L3v0emtUvrMlaODDxlC5iEmo6Jnloc=";

    #[test]
    fn the_pinned_keys_type_is_offered_first_and_every_other_type_after_it() {
        let names = |key: Option<&str>| -> Vec<String> {
            let pinned = key.map(|k| HostKey::parse(k, "pin").unwrap());
            preferred_algorithms(pinned.as_ref()).iter().map(ToString::to_string).collect()
        };
        let default = names(None);
        assert_eq!(default[0], "ssh-ed25519", "first contact asks for ed25519, as russh does");
        for (pin, first) in [
            (KEY, &["ssh-ed25519"][..]),
            (ECDSA, &["ecdsa-sha2-nistp256"][..]),
            (RSA, &["rsa-sha2-512", "rsa-sha2-256"][..]),
        ] {
            let offered = names(Some(pin));
            assert_eq!(&offered[..first.len()], first, "{pin}");
            let mut sorted = offered.clone();
            sorted.sort();
            let mut all = default.clone();
            all.sort();
            assert_eq!(sorted, all, "the other types are still offered, so a mismatch names the key the host has");
        }
    }

    #[test]
    fn ipv6_addresses_are_bracketed() {
        assert_eq!(format_addr("::1", 22), "[::1]:22");
        assert_eq!(format_addr("127.0.0.2", 2222), "127.0.0.2:2222");
    }
}
