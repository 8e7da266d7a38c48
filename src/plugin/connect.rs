//! Reaching a machine as the operator does: its address (spec.ssh.host, the
//! provider's host, or the first address in status), its KeyPair's private
//! key, its jump host, and its pinned host key (spec.ssh.hostKey, else the
//! one recorded at first contact) — resolved with the operator's own
//! functions, Network defaults included.
//!
//! `ssh` and `scp` run the system's OpenSSH client, which gives real
//! terminals, window resizes and exit codes, with a generated configuration:
//! the private keys in 0600 files of a private temporary directory (removed
//! afterwards), a known_hosts file holding only the pinned keys and
//! StrictHostKeyChecking=yes, so OpenSSH never accepts or records another
//! key. Before that, the host key is checked here (no credentials are sent
//! for that), so a mismatch is refused with both fingerprints.

use std::fmt::Write as _;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use kube::api::Api;
use russh::keys::PrivateKey;

use super::{Kube, PluginError, Result};
use crate::api::machine::{MachineStatus, SshSpec};
use crate::api::{KeyPair, Machine, Network};
use crate::controller::machine::{Resolved, host_key_pin, resolve};
use crate::ssh::{self, HostKey, Session, SshError};

const TIMEOUT: Duration = Duration::from_secs(15);

/// One SSH login: where, as whom, with which key, and the key the host must show.
pub struct Login {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub key: PrivateKey,
    pub pin: HostKey,
    /// Which field pins it, for messages.
    pub pin_source: String,
}

/// How to reach one machine.
pub struct Route {
    pub machine: String,
    pub target: Login,
    pub jump: Option<Login>,
}

/// Pure: the address the operator connects to, from the resolved settings
/// and status (as the providers report it: existing gives its host and port,
/// a cloud instance its first address, on port 22).
pub fn ssh_endpoint(resolved: &Resolved, status: Option<&MachineStatus>) -> Option<(String, u16)> {
    let existing = resolved.provider.existing.as_ref();
    let host = resolved
        .ssh
        .host
        .clone()
        .or_else(|| existing.map(|e| e.host.clone()))
        .or_else(|| status.and_then(|s| s.addresses.first()).map(|a| a.address.clone()))?;
    let port = resolved.ssh.port.or(existing.map(|e| e.port)).and_then(|p| u16::try_from(p).ok()).unwrap_or(22);
    Some((host, port))
}

async fn keypair_key(kube: &Kube, ns: &str, name: &str, field: &str) -> Result<PrivateKey> {
    let keypair = Api::<KeyPair>::namespaced(kube.client.clone(), ns)
        .get_opt(name)
        .await?
        .ok_or_else(|| PluginError::Usage(format!("KeyPair {name} ({field}) not found in namespace {ns}")))?;
    crate::controller::keypair::private_key_with(&kube.client, ns, &keypair)
        .await
        .map_err(|e| PluginError::Refused(format!("KeyPair {name}: {e}")))
}

/// Resolves how to reach `machine`, as the operator would.
pub async fn route(kube: &Kube, machine: &Machine) -> Result<Route> {
    let ns = machine.namespace().unwrap_or_default();
    let name = machine.name_any();
    let network_name = &machine.spec.network_ref.name;
    let network = Api::<Network>::namespaced(kube.client.clone(), &ns)
        .get_opt(network_name)
        .await?
        .ok_or_else(|| PluginError::Usage(format!("Network {network_name} of Machine {name} not found")))?;
    let resolved = resolve(machine, &network).map_err(|e| PluginError::Usage(format!("Machine {name}: {e}")))?;
    let status = machine.status.as_ref();
    let (host, port) = ssh_endpoint(&resolved, status).ok_or_else(|| {
        PluginError::Usage(format!("Machine {name} has no address yet: wait until it is Provisioned"))
    })?;
    let pin = host_key_pin(resolved.ssh.host_key.as_deref(), None, status.and_then(|s| s.host_key.as_deref()))
        .map_err(|e| PluginError::Refused(format!("Machine {name}: {e}")))?
        .ok_or_else(|| {
            PluginError::Refused(format!(
                "Machine {name} has no pinned host key yet (spec.ssh.hostKey, or status.hostKey once the operator has \
                 reached it): nothing to verify the machine with, so no login"
            ))
        })?;
    let key_ref = resolved.ssh.key_pair_ref.as_ref().ok_or_else(|| {
        PluginError::Usage(format!(
            "Machine {name} has no spec.ssh.keyPairRef (nor its Network a default): no key to log in with"
        ))
    })?;
    let key = keypair_key(kube, &ns, &key_ref.name, "spec.ssh.keyPairRef.name").await?;
    let user = resolved.ssh.user.clone().unwrap_or_else(|| "root".into());
    let jump = match &resolved.ssh.jump_host {
        None => hypervisor_login(kube, &ns, &network, &resolved).await?,
        Some(jump) => Some(jump_login(kube, &ns, jump, &resolved.ssh, &key).await?),
    };
    let target = Login { host, port, user, key, pin: pin.key, pin_source: pin.source.to_owned() };
    Ok(Route { machine: name, target, jump })
}

async fn jump_login(
    kube: &Kube,
    ns: &str,
    jump: &crate::api::machine::JumpHost,
    ssh: &SshSpec,
    machine_key: &PrivateKey,
) -> Result<Login> {
    let pin =
        HostKey::parse(&jump.host_key, "spec.ssh.jumpHost.hostKey").map_err(|e| PluginError::Refused(e.to_string()))?;
    let key = match &jump.key_pair_ref {
        Some(r) => keypair_key(kube, ns, &r.name, "spec.ssh.jumpHost.keyPairRef.name").await?,
        None => machine_key.clone(),
    };
    Ok(Login {
        host: jump.host.clone(),
        port: u16::try_from(jump.port).unwrap_or(22),
        user: jump.user.clone().or_else(|| ssh.user.clone()).unwrap_or_else(|| "root".into()),
        key,
        pin,
        pin_source: "spec.ssh.jumpHost.hostKey".into(),
    })
}

/// The remote hypervisor a libvirt machine is reached through, as the
/// operator reaches it (see `provider::libvirt::remote`), if it is.
async fn hypervisor_login(kube: &Kube, ns: &str, network: &Network, resolved: &Resolved) -> Result<Option<Login>> {
    use crate::provider::libvirt::remote;
    let spec = network.spec.provider.as_ref().and_then(|p| p.libvirt.as_ref());
    let (Some(spec), Some(_)) = (spec, &resolved.provider.libvirt) else { return Ok(None) };
    let (Some(ssh), Some(uri)) = (&spec.ssh, remote::SshUri::parse(&spec.uri).ok().flatten()) else { return Ok(None) };
    if !remote::jumps_through_hypervisor(spec) {
        return Ok(None);
    }
    let secret_name = &ssh.credentials_secret_ref.name;
    let secret = Api::<Secret>::namespaced(kube.client.clone(), ns).get_opt(secret_name).await?.ok_or_else(|| {
        PluginError::Usage(format!(
            "Secret {secret_name} (the Network's spec.provider.libvirt.ssh.credentialsSecretRef) not found in namespace {ns}"
        ))
    })?;
    let refused = |e: crate::provider::ProviderError| PluginError::Refused(format!("hypervisor: {e}"));
    Ok(Some(Login {
        host: uri.host,
        port: uri.port,
        user: uri.user,
        key: remote::login_key(&secret).map_err(refused)?,
        pin: remote::pinned_key(ssh).map_err(refused)?,
        pin_source: "the Network's spec.provider.libvirt.ssh.hostKey".into(),
    }))
}

/// The refusal for a host presenting another key than the pinned one.
fn mismatch(machine: &str, login: &Login, presented: &HostKey) -> PluginError {
    PluginError::Refused(format!(
        "REFUSED: {machine} at {} presented host key {presented}, but {} pins {}.\n\
         Nothing was sent to it. If the machine was reinstalled, set spec.ssh.hostKey to its new key; \
         otherwise the connection may be intercepted.",
        ssh::format_addr(&login.host, login.port),
        login.pin_source,
        login.pin,
    ))
}

/// Logs in to the jump host, if any, refusing a wrong key.
async fn jump_session(route: &Route) -> Result<Option<Arc<Session>>> {
    let Some(jump) = &route.jump else { return Ok(None) };
    match Session::connect(&jump.host, jump.port, &jump.user, &jump.key, &jump.pin, TIMEOUT, None).await {
        Ok(session) => Ok(Some(Arc::new(session))),
        Err(SshError::HostKeyMismatch { addr, presented, pinned }) => Err(PluginError::Refused(format!(
            "REFUSED: jump host {addr} presented host key {presented}, but {} pins {pinned}; nothing was sent through it",
            jump.pin_source
        ))),
        Err(err) => Err(PluginError::Refused(format!("jump host: {err}"))),
    }
}

/// Checks that the machine proves its pinned key, without logging in to it.
pub async fn verify(route: &Route) -> Result<()> {
    let via = jump_session(route).await?;
    let t = &route.target;
    let presented = ssh::probe_host_key(&t.host, t.port, TIMEOUT, via.as_deref(), Some(&t.pin))
        .await
        .map_err(|e| PluginError::Refused(format!("{}: {e}", route.machine)))?;
    if presented != t.pin {
        return Err(mismatch(&route.machine, t, &presented));
    }
    Ok(())
}

/// An authenticated session to the machine (through its jump host).
pub async fn session(route: &Route) -> Result<Session> {
    let via = jump_session(route).await?;
    let t = &route.target;
    Session::connect(&t.host, t.port, &t.user, &t.key, &t.pin, TIMEOUT, via).await.map_err(|err| match err {
        SshError::HostKeyMismatch { .. } => {
            let presented = err.to_string();
            PluginError::Refused(format!("REFUSED: {}: {presented}", route.machine))
        }
        other => PluginError::Refused(format!("{}: {other}", route.machine)),
    })
}

/// OpenSSH's HostKeyAlgorithms for a pinned key line: its own type (both
/// SHA-2 signatures for RSA), so the host must prove exactly that key.
fn algorithms(key_line: &str) -> String {
    match key_line.split_whitespace().next().unwrap_or_default() {
        "ssh-rsa" => "rsa-sha2-512,rsa-sha2-256".into(),
        other => other.into(),
    }
}

/// The OpenSSH alias of a machine in the generated configuration.
pub fn alias(route: &Route) -> String {
    format!("{}.nixops", route.machine)
}

/// Pure: the ssh_config text for `routes`, with keys and known_hosts in `dir`.
pub fn ssh_config(routes: &[Route], dir: &Path) -> String {
    let mut config = String::new();
    let block = |config: &mut String, alias: &str, login: &Login, key_file: &str, jump: Option<&str>| {
        let _ = write!(
            config,
            "Host {alias}\n  HostName {}\n  Port {}\n  User {}\n  HostKeyAlias {alias}\n  IdentityFile \"{}\"\n",
            login.host,
            login.port,
            login.user,
            dir.join(key_file).display()
        );
        if let Some(jump) = jump {
            let _ = writeln!(config, "  ProxyJump {jump}");
        }
        let _ = write!(
            config,
            "  HostKeyAlgorithms {}\n  UserKnownHostsFile \"{}\"\n  GlobalKnownHostsFile /dev/null\n  \
             StrictHostKeyChecking yes\n  CheckHostIP no\n  UpdateHostKeys no\n  IdentitiesOnly yes\n  \
             IdentityAgent none\n  PreferredAuthentications publickey\n  LogLevel ERROR\n",
            algorithms(&login.pin.to_openssh()),
            dir.join("known_hosts").display()
        );
    };
    for (i, route) in routes.iter().enumerate() {
        let alias = alias(route);
        let jump_alias = route.jump.as_ref().map(|_| format!("jump.{alias}"));
        if let (Some(jump), Some(jump_alias)) = (&route.jump, &jump_alias) {
            block(&mut config, jump_alias, jump, &format!("jump-{i}.key"), None);
        }
        block(&mut config, &alias, &route.target, &format!("{i}.key"), jump_alias.as_deref());
    }
    config
}

/// Pure: known_hosts lines pinning each host (and jump host) under its alias.
pub fn known_hosts(routes: &[Route]) -> String {
    let mut lines = String::new();
    for route in routes {
        let alias = alias(route);
        if let Some(jump) = &route.jump {
            let _ = writeln!(lines, "jump.{alias} {}", jump.pin.to_openssh());
        }
        let _ = writeln!(lines, "{alias} {}", route.target.pin.to_openssh());
    }
    lines
}

/// The generated OpenSSH files; the directory goes when this is dropped.
pub struct OpenSshFiles {
    dir: tempfile::TempDir,
}

impl OpenSshFiles {
    pub fn write(routes: &[Route]) -> Result<Self> {
        let io = |what: &str, e: std::io::Error| PluginError::Failed(format!("writing the SSH {what}: {e}"));
        let dir = tempfile::Builder::new().prefix("kubectl-nixops-").tempdir().map_err(|e| io("directory", e))?;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).map_err(|e| io("directory", e))?;
        let write_private = |name: String, key: &PrivateKey| -> Result<()> {
            let text = key
                .to_openssh(russh::keys::ssh_key::LineEnding::LF)
                .map_err(|e| PluginError::Failed(format!("encoding the private key: {e}")))?;
            let path = dir.path().join(name);
            // Created 0600 before anything is in it.
            let file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .map_err(|e| io("key", e))?;
            std::io::Write::write_all(&mut &file, text.as_bytes()).map_err(|e| io("key", e))
        };
        for (i, route) in routes.iter().enumerate() {
            write_private(format!("{i}.key"), &route.target.key)?;
            if let Some(jump) = &route.jump {
                write_private(format!("jump-{i}.key"), &jump.key)?;
            }
        }
        std::fs::write(dir.path().join("known_hosts"), known_hosts(routes)).map_err(|e| io("known_hosts", e))?;
        std::fs::write(dir.path().join("config"), ssh_config(routes, dir.path())).map_err(|e| io("config", e))?;
        Ok(Self { dir })
    }

    pub fn config(&self) -> PathBuf {
        self.dir.path().join("config")
    }
}

/// Runs `program` with `args`, passing the terminal through, and returns
/// its exit status (128 + signal when killed). Ctrl-C reaches the child
/// (same terminal) while this process outlives it to remove the keys.
async fn run_client(program: &str, args: Vec<String>) -> Result<i32> {
    let mut child = tokio::process::Command::new(program)
        .args(&args)
        .spawn()
        .map_err(|e| PluginError::Failed(format!("cannot run {program} (install OpenSSH's client): {e}")))?;
    let status = loop {
        tokio::select! {
            status = child.wait() => break status,
            _ = tokio::signal::ctrl_c() => continue,
        }
    };
    let status = status.map_err(|e| PluginError::Failed(format!("waiting for {program}: {e}")))?;
    Ok(status.code().unwrap_or_else(|| 128 + std::os::unix::process::ExitStatusExt::signal(&status).unwrap_or(0)))
}

/// `kubectl nixops ssh MACHINE [-t] [-- COMMAND…]`: exits with the remote
/// command's status.
pub async fn ssh(kube: &Kube, machine: &str, tty: bool, command: &[String]) -> Result<i32> {
    let machine = kube.machine(machine).await?;
    let route = route(kube, &machine).await?;
    verify(&route).await?;
    let alias = alias(&route);
    let files = OpenSshFiles::write(std::slice::from_ref(&route))?;
    let mut args = vec!["-F".to_owned(), files.config().display().to_string()];
    if tty {
        args.push("-t".into());
    }
    args.push("--".into());
    args.push(alias);
    args.extend(command.iter().cloned());
    let code = run_client("ssh", args).await;
    drop(files);
    code
}

/// Pure: splits `MACHINE:PATH` into the machine and the path; None for a
/// local path (no colon before the first slash).
pub fn remote_path(arg: &str) -> Option<(&str, &str)> {
    let (host, path) = arg.split_once(':')?;
    (!host.is_empty() && !host.contains('/')).then_some((host, path))
}

/// `kubectl nixops scp [-r] SRC… DST`, MACHINE:PATH naming a machine's file.
pub async fn scp(kube: &Kube, recursive: bool, paths: &[String]) -> Result<i32> {
    let mut routes: Vec<Route> = Vec::new();
    for (name, _) in paths.iter().filter_map(|p| remote_path(p)) {
        if routes.iter().any(|r| r.machine == name) {
            continue;
        }
        let machine = kube.machine(name).await?;
        let route = route(kube, &machine).await?;
        verify(&route).await?;
        routes.push(route);
    }
    if routes.is_empty() {
        return Err(PluginError::Usage("no MACHINE:PATH among the paths: nothing to copy from or to a machine".into()));
    }
    let files = OpenSshFiles::write(&routes)?;
    let mut args = vec!["-F".to_owned(), files.config().display().to_string()];
    if recursive {
        args.push("-r".into());
    }
    args.push("--".into());
    for p in paths {
        args.push(match remote_path(p) {
            Some((name, path)) => {
                let route = routes.iter().find(|r| r.machine == name).expect("every named machine has a route");
                format!("{}:{path}", alias(route))
            }
            None => p.clone(),
        });
    }
    let code = run_client("scp", args).await;
    drop(files);
    code
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHsf5n2k2cOqRk8yE1xXKmbvmN4QUeTSR3dOzU6pD6VJ";
    const RSA: &str = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAAAgQCzszwNWF8HFgsKE501Vmsbl6ZWdi6uZSKpQqtoTMShKx+WfguTRZBshHSPJZ3JtPogByiM77nhwIkUSZOLeUvhwOFjpSVkjukEOlQeD3XuM7oBOBg4nyvIkatNJMKXh+j0UaW1Jia6HFnpirwqew/YvhJhf8VeXKQtzo6UPGb/kw==";

    fn login(host: &str, pin: &str) -> Login {
        let key = PrivateKey::from(russh::keys::ssh_key::private::Ed25519Keypair::from_seed(&[7; 32]));
        Login {
            host: host.into(),
            port: 2222,
            user: "root".into(),
            key,
            pin: HostKey::parse(pin, "pin").unwrap(),
            pin_source: "spec.ssh.hostKey".into(),
        }
    }

    #[test]
    fn the_config_pins_every_host_and_never_accepts_another_key() {
        let routes = vec![Route {
            machine: "web-1".into(),
            target: login("10.0.0.5", KEY),
            jump: Some(login("bastion.example.org", RSA)),
        }];
        let config = ssh_config(&routes, Path::new("/tmp/x"));
        assert!(config.contains("Host web-1.nixops\n  HostName 10.0.0.5\n  Port 2222\n"), "{config}");
        assert!(config.contains("ProxyJump jump.web-1.nixops"), "{config}");
        assert!(config.contains("HostKeyAlgorithms rsa-sha2-512,rsa-sha2-256"), "{config}");
        assert!(config.contains("HostKeyAlgorithms ssh-ed25519"), "{config}");
        assert_eq!(config.matches("StrictHostKeyChecking yes").count(), 2, "{config}");
        assert!(!config.contains("accept-new") && !config.contains("StrictHostKeyChecking no"));
        let known = known_hosts(&routes);
        assert_eq!(known, format!("jump.web-1.nixops {RSA}\nweb-1.nixops {KEY}\n"));
    }

    #[test]
    fn machine_paths_are_told_from_local_ones() {
        assert_eq!(remote_path("web-1:/etc/hosts"), Some(("web-1", "/etc/hosts")));
        assert_eq!(remote_path("web-1:"), Some(("web-1", "")));
        assert_eq!(remote_path("./a:b"), None);
        assert_eq!(remote_path("/tmp/file"), None);
        assert_eq!(remote_path(":x"), None);
    }

    #[test]
    fn the_address_is_the_operators() {
        let resolved = |provider: serde_json::Value, ssh: serde_json::Value| Resolved {
            provider: serde_json::from_value(provider).unwrap(),
            ssh: serde_json::from_value(ssh).unwrap(),
        };
        let status: MachineStatus = serde_json::from_value(
            serde_json::json!({"addresses": [{"type": "ExternalIP", "address": "198.51.100.7"}]}),
        )
        .unwrap();
        let existing = serde_json::json!({"existing": {"host": "203.0.113.5", "port": 2200}});
        let ec2 = serde_json::json!({"ec2": {"instanceType": "t3.small", "ami": "ami-01234567", "subnet": "a"}});
        assert_eq!(
            ssh_endpoint(&resolved(existing.clone(), serde_json::json!({})), None),
            Some(("203.0.113.5".into(), 2200))
        );
        assert_eq!(
            ssh_endpoint(&resolved(ec2.clone(), serde_json::json!({})), Some(&status)),
            Some(("198.51.100.7".into(), 22))
        );
        assert_eq!(ssh_endpoint(&resolved(ec2.clone(), serde_json::json!({})), None), None);
        let over = serde_json::json!({"host": "nat.example.org", "port": 2022});
        assert_eq!(ssh_endpoint(&resolved(ec2, over), Some(&status)), Some(("nat.example.org".into(), 2022)));
    }
}
