//! Remote hypervisors: `qemu+ssh://USER@HOST[:PORT]/system`.
//!
//! libvirt's own ssh transport runs the OpenSSH client, which the
//! operator's image does not have, with a key file and a known_hosts file
//! on disk. Instead the operator makes the SSH connection itself, like every
//! other one it makes: the hypervisor must prove the key pinned in
//! `spec.provider.libvirt.ssh.hostKey` during the key exchange, before
//! anything is sent, and the login key comes from the Secret and never
//! touches a disk. libvirtd's Unix socket on the hypervisor is forwarded to
//! a socket in a private directory of the operator's (`ssh -L
//! local:remote-socket`), and libvirt's client connects to that with a
//! `qemu+unix://` URI. One connection per Network is kept open and shared by
//! its calls; it is made again when it drops or its settings change.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::api::Api;
use kube::{Client, ResourceExt};

use crate::api::Network;
use crate::api::network::{HypervisorSsh, LibvirtForwardMode, LibvirtNetwork};
use crate::metrics::Metrics;
use crate::provider::ProviderError;
use crate::ssh::{HostKey, Session, SshError};

/// libvirtd's socket when the URI names none (`socket=`), as libvirt's own
/// ssh transport assumes.
const DEFAULT_SOCKET: &str = "/var/run/libvirt/libvirt-sock";

/// The key of the credentials Secret holding the login key, as in a
/// `kubernetes.io/ssh-auth` Secret.
pub const PRIVATE_KEY: &str = "ssh-privatekey";

/// A `qemu+ssh://` URI, taken apart.
#[derive(Clone, Debug, PartialEq)]
pub struct SshUri {
    pub user: String,
    pub host: String,
    pub port: u16,
    /// The driver path, `/system` or `/session`.
    pub path: String,
    /// libvirtd's socket on the hypervisor.
    pub socket: String,
}

impl SshUri {
    /// None for a URI of another transport, which libvirt handles itself.
    pub fn parse(uri: &str) -> Result<Option<Self>, ProviderError> {
        let Some(rest) = uri.strip_prefix("qemu+ssh://") else { return Ok(None) };
        let invalid = |why: &str| {
            ProviderError::permanent(
                "InvalidURI",
                format!("spec.provider.libvirt.uri {uri}: {why}; write it as qemu+ssh://USER@HOST[:PORT]/system"),
            )
        };
        let (authority, path_query) = rest.split_once('/').ok_or_else(|| invalid("it has no path"))?;
        let (path, query) = match path_query.split_once('?') {
            Some((path, query)) => (path, Some(query)),
            None => (path_query, None),
        };
        let (user, hostport) = match authority.rsplit_once('@') {
            Some((user, hostport)) => (user.to_owned(), hostport),
            None => ("root".to_owned(), authority),
        };
        let (host, port) = match hostport.strip_prefix('[') {
            // [v6]:port
            Some(v6) => {
                let (host, after) = v6.split_once(']').ok_or_else(|| invalid("an IPv6 address lacks its ']'"))?;
                (host, after.strip_prefix(':'))
            }
            None => match hostport.rsplit_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (hostport, None),
            },
        };
        if host.is_empty() || user.is_empty() {
            return Err(invalid("it names no host or an empty user"));
        }
        let port = match port {
            Some(p) => p.parse::<u16>().ok().filter(|p| *p > 0).ok_or_else(|| invalid("the port is not a number"))?,
            None => 22,
        };
        let mut socket = DEFAULT_SOCKET.to_owned();
        for param in query.unwrap_or_default().split('&').filter(|p| !p.is_empty()) {
            let (name, value) = param.split_once('=').unwrap_or((param, ""));
            match name {
                "socket" if value.starts_with('/') => socket = value.to_owned(),
                "socket" => return Err(invalid("socket= must be an absolute path")),
                // libvirt's own ssh transport options, which this connection
                // replaces: say where each one's job is done instead.
                "keyfile" | "sshauth" => {
                    return Err(invalid(&format!(
                        "{name}= does not apply: the login key comes from spec.provider.libvirt.ssh.credentialsSecretRef"
                    )));
                }
                "known_hosts" | "known_hosts_verify" | "no_verify" => {
                    return Err(invalid(&format!(
                        "{name}= does not apply: the hypervisor's key is pinned in spec.provider.libvirt.ssh.hostKey and always checked"
                    )));
                }
                other => {
                    return Err(invalid(&format!("parameter {other}= is not supported (only socket= is)")));
                }
            }
        }
        Ok(Some(Self { user, host: host.to_owned(), port, path: format!("/{path}"), socket }))
    }
}

/// How a call reaches a hypervisor: the URI libvirt's client opens, and the
/// SSH connection behind it, kept open while the call holds this.
#[derive(Clone)]
pub struct Connection {
    /// What libvirt's client opens.
    pub uri: String,
    /// What the user wrote, for messages.
    pub shown: String,
    tunnel: Option<Arc<Tunnel>>,
}

impl Connection {
    /// A URI libvirt's client handles itself.
    pub fn direct(uri: &str) -> Self {
        Self { uri: uri.to_owned(), shown: uri.to_owned(), tunnel: None }
    }

    /// The SSH session to the hypervisor, if it is remote.
    pub fn session(&self) -> Option<Arc<Session>> {
        self.tunnel.as_ref().map(|t| t.session.clone())
    }
}

/// An SSH connection to a hypervisor and the local socket forwarded over
/// it; dropping it stops the forwarding and removes the socket.
struct Tunnel {
    session: Arc<Session>,
    local_uri: String,
    _dir: tempfile::TempDir,
    accept: tokio::task::JoinHandle<()>,
}

impl Drop for Tunnel {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// One kept tunnel per Network, with the settings it was made from.
type Slot = Arc<tokio::sync::Mutex<Option<(String, Arc<Tunnel>)>>>;

/// The kept SSH connections to remote hypervisors.
#[derive(Clone)]
pub struct Tunnels {
    client: Client,
    metrics: Metrics,
    timeout: Duration,
    slots: Arc<Mutex<HashMap<String, Slot>>>,
}

impl Tunnels {
    pub fn new(client: Client, metrics: Metrics, timeout: Duration) -> Self {
        Self { client, metrics, timeout, slots: Arc::default() }
    }

    /// How to reach `network`'s hypervisor: its URI as it is, or, for
    /// `qemu+ssh://`, the local end of a kept, verified SSH connection.
    pub async fn connect(&self, network: &Network, spec: &LibvirtNetwork) -> Result<Connection, ProviderError> {
        let Some(remote) = SshUri::parse(&spec.uri)? else { return Ok(Connection::direct(&spec.uri)) };
        let ssh = spec.ssh.as_ref().ok_or_else(|| {
            ProviderError::permanent(
                "HypervisorLoginMissing",
                format!(
                    "spec.provider.libvirt.uri {} is remote but spec.provider.libvirt.ssh is not set; set its credentialsSecretRef and hostKey",
                    spec.uri
                ),
            )
        })?;
        let ns = network.namespace().unwrap_or_default();
        let secret = self.secret(&ns, &network.name_any(), ssh).await?;
        let version = format!("{}|{}|{}", spec.uri, secret.resource_version().unwrap_or_default(), ssh.host_key);
        let slot = self
            .slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(format!("{ns}/{}", network.name_any()))
            .or_default()
            .clone();
        let mut kept = slot.lock().await;
        if let Some((v, tunnel)) = kept.as_ref()
            && *v == version
            && !tunnel.session.is_closed()
        {
            return Ok(Connection {
                uri: tunnel.local_uri.clone(),
                shown: spec.uri.clone(),
                tunnel: Some(tunnel.clone()),
            });
        }
        let tunnel = Arc::new(self.open(&remote, ssh, &secret).await?);
        *kept = Some((version, tunnel.clone()));
        Ok(Connection { uri: tunnel.local_uri.clone(), shown: spec.uri.clone(), tunnel: Some(tunnel) })
    }

    /// Forgets the kept connection of a deleted Network.
    pub fn forget(&self, network: &Network) {
        let key = format!("{}/{}", network.namespace().unwrap_or_default(), network.name_any());
        self.slots.lock().unwrap_or_else(|e| e.into_inner()).remove(&key);
    }

    async fn secret(&self, ns: &str, network: &str, ssh: &HypervisorSsh) -> Result<Secret, ProviderError> {
        let name = &ssh.credentials_secret_ref.name;
        Api::<Secret>::namespaced(self.client.clone(), ns)
            .get_opt(name)
            .await
            .map_err(|e| ProviderError::Transient(format!("reading Secret {name}: {e}")))?
            .ok_or_else(|| {
                ProviderError::permanent(
                    "CredentialsNotFound",
                    format!(
                        "Secret {name} named by Network {network} spec.provider.libvirt.ssh.credentialsSecretRef does not exist; create it with the login key under {PRIVATE_KEY}"
                    ),
                )
            })
    }

    async fn open(&self, remote: &SshUri, ssh: &HypervisorSsh, secret: &Secret) -> Result<Tunnel, ProviderError> {
        let name = secret.name_any();
        let key = login_key(secret)?;
        let pinned = pinned_key(ssh)?;
        let session =
            Session::connect(&remote.host, remote.port, &remote.user, &key, &pinned, self.timeout, None).await;
        self.metrics.provider_call("ssh", "hypervisor", session.is_ok());
        let session = Arc::new(session.map_err(|err| match err {
            SshError::HostKeyMismatch { .. } => ProviderError::permanent(
                "HypervisorHostKeyMismatch",
                format!(
                    "{err}; spec.provider.libvirt.ssh.hostKey must be the hypervisor's key, and nothing is sent to it until it is"
                ),
            ),
            SshError::AuthRejected { .. } => ProviderError::permanent(
                "HypervisorAuthRejected",
                format!("hypervisor: {err} (the key in Secret {name})"),
            ),
            other => ProviderError::Transient(format!("hypervisor: {other}")),
        })?);
        // Reached once now, so a wrong socket path is named here rather
        // than as an end of file inside libvirt's client.
        drop(session.forward_unix(&remote.socket).await.map_err(|e| {
            ProviderError::Transient(format!("hypervisor: {e} (set the URI's socket= to libvirtd's socket)"))
        })?);
        let dir = tempfile::Builder::new()
            .prefix("nixops-libvirt-")
            .tempdir()
            .map_err(|e| ProviderError::Transient(format!("creating a directory for the hypervisor's socket: {e}")))?;
        let local = dir.path().join("libvirt-sock");
        let listener = tokio::net::UnixListener::bind(&local)
            .map_err(|e| ProviderError::Transient(format!("listening on {}: {e}", local.display())))?;
        let accept = tokio::spawn(forward(listener, session.clone(), remote.socket.clone()));
        Ok(Tunnel {
            local_uri: format!("qemu+unix://{}?socket={}", remote.path, local.display()),
            session,
            _dir: dir,
            accept,
        })
    }
}

/// The login key of a hypervisor's credentials Secret.
pub fn login_key(secret: &Secret) -> Result<russh::keys::PrivateKey, ProviderError> {
    let name = secret.name_any();
    let text = secret
        .data
        .as_ref()
        .and_then(|d| d.get(PRIVATE_KEY))
        .and_then(|b| String::from_utf8(b.0.clone()).ok())
        .ok_or_else(|| {
            ProviderError::permanent(
                "CredentialsIncomplete",
                format!("Secret {name} (spec.provider.libvirt.ssh.credentialsSecretRef) has no key {PRIVATE_KEY}; add the login key there"),
            )
        })?;
    russh::keys::decode_secret_key(&text, None).map_err(|e| {
        ProviderError::permanent(
            "InvalidCredentials",
            format!("Secret {name} {PRIVATE_KEY} is not an unencrypted OpenSSH or PEM private key: {e}"),
        )
    })
}

/// The hypervisor's pinned host key.
pub fn pinned_key(ssh: &HypervisorSsh) -> Result<HostKey, ProviderError> {
    HostKey::parse(&ssh.host_key, "spec.provider.libvirt.ssh.hostKey")
        .map_err(|e| ProviderError::permanent("InvalidHostKey", e.to_string()))
}

/// Connects each client of `listener` to `socket` over `session`.
async fn forward(listener: tokio::net::UnixListener, session: Arc<Session>, socket: String) {
    while let Ok((mut local, _)) = listener.accept().await {
        let session = session.clone();
        let socket = socket.clone();
        tokio::spawn(async move {
            match session.forward_unix(&socket).await {
                Ok(mut remote) => {
                    let _ = tokio::io::copy_bidirectional(&mut local, &mut remote).await;
                }
                Err(err) => tracing::warn!(%err, "forwarding a libvirt connection to the hypervisor"),
            }
        });
    }
}

/// Whether Machines of `spec`'s network reach SSH through the hypervisor
/// when they name no jump host: as `ssh.jump` says, else in networks only
/// the hypervisor reaches (nat, isolated).
pub fn jumps_through_hypervisor(spec: &LibvirtNetwork) -> bool {
    let Some(ssh) = &spec.ssh else { return false };
    ssh.jump.unwrap_or(matches!(spec.mode, LibvirtForwardMode::Nat | LibvirtForwardMode::Isolated))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ssh_uris_are_taken_apart() {
        let uri =
            SshUri::parse("qemu+ssh://ops@hv.example:2222/system?socket=/run/libvirt/virtqemud-sock").unwrap().unwrap();
        assert_eq!(
            uri,
            SshUri {
                user: "ops".into(),
                host: "hv.example".into(),
                port: 2222,
                path: "/system".into(),
                socket: "/run/libvirt/virtqemud-sock".into()
            }
        );
        let uri = SshUri::parse("qemu+ssh://[fd00::1]/system").unwrap().unwrap();
        assert_eq!((uri.user.as_str(), uri.host.as_str(), uri.port), ("root", "fd00::1", 22));
        assert_eq!(uri.socket, DEFAULT_SOCKET);
        assert!(SshUri::parse("qemu:///system").unwrap().is_none());
    }

    #[test]
    fn transport_options_the_operator_replaces_are_refused_with_the_field_to_use() {
        let message = |uri: &str| match SshUri::parse(uri) {
            Err(ProviderError::Permanent { message, .. }) => message,
            other => panic!("{uri}: {other:?}"),
        };
        assert!(message("qemu+ssh://h/system?no_verify=1").contains("ssh.hostKey"));
        assert!(message("qemu+ssh://h/system?keyfile=/k").contains("credentialsSecretRef"));
        assert!(message("qemu+ssh://h:x/system").contains("port"));
        assert!(message("qemu+ssh://h").contains("no path"));
    }

    #[test]
    fn machines_jump_through_the_hypervisor_where_only_it_reaches_them() {
        let ssh = HypervisorSsh { host_key: "k".into(), ..Default::default() };
        let mut spec = LibvirtNetwork { ssh: Some(ssh), ..Default::default() };
        assert!(jumps_through_hypervisor(&spec));
        spec.mode = LibvirtForwardMode::Route;
        assert!(!jumps_through_hypervisor(&spec));
        spec.ssh.as_mut().unwrap().jump = Some(true);
        assert!(jumps_through_hypervisor(&spec));
        spec.ssh = None;
        assert!(!jumps_through_hypervisor(&spec));
    }
}
