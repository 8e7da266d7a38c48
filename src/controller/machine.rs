//! Machine controller: resolve the Network and KeyPair, provision through the
//! provider, verify the host over SSH with a pinned host key, and report.
//! Deploying closures builds on this.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::events::EventType;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{Controller, watcher};

use super::deploy;
use super::shared::SharedWatch;
use super::status::Conditions;
use super::{Cleanup, Context, Error, Reconciler, Result, create_once, object_status, record_external_name};
use crate::api::machine::{JumpHost, MachinePhase, MachineProvider as MachineProviderSpec, MachineStatus, SshSpec};
use crate::api::{DeletionPolicy, EXTERNAL_NAME_ANNOTATION, KeyPair, Machine, ManagementPolicy, Network};
use crate::provider::{InstanceState, MachineTarget, Owner, ProviderError};
use crate::ssh::{self, HostKey, Session, SshError};
use russh::keys::PrivateKey;

object_status!(MachineStatus, failed = MachinePhase::Failed, deleting = MachinePhase::Deleting);

/// Machine-specific condition types.
pub mod conditions {
    /// The machine exists and answers SSH with the expected host key.
    pub const PROVISIONED: &str = "Provisioned";
    /// The machine runs an older definition than its spec asks for until
    /// it is powered off and started again (a libvirt domain defined anew).
    pub const RESTART_REQUIRED: &str = "RestartRequired";
}

/// The machine's settings after Network defaults are applied.
pub struct Resolved {
    pub provider: MachineProviderSpec,
    pub ssh: SshSpec,
}

/// Applies the Network's machineDefaults to what the Machine leaves empty.
pub fn resolve(machine: &Machine, network: &Network) -> Result<Resolved> {
    let defaults = network.spec.machine_defaults.clone().unwrap_or_default();
    let provider = machine.spec.provider.clone().or(defaults.provider).ok_or_else(|| {
        Error::stalled(
            "NoProvider",
            format!(
                "spec.provider is not set and Network {} has no spec.machineDefaults.provider; set one of them",
                network.name_any()
            ),
        )
    })?;
    let own = machine.spec.ssh.clone().unwrap_or_default();
    let default_ssh = defaults.ssh.unwrap_or_default();
    let ssh = SshSpec {
        user: own.user.or(default_ssh.user),
        key_pair_ref: own.key_pair_ref.or(default_ssh.key_pair_ref),
        host_key: own.host_key,
        jump_host: own.jump_host.or(default_ssh.jump_host),
        // Per-host settings are never taken from the Network.
        host: own.host,
        port: own.port,
    };
    Ok(Resolved { provider, ssh })
}

/// Where the provider in use comes from, for messages.
fn provider_source(machine: &Machine) -> String {
    match machine.spec.provider {
        Some(_) => "spec.provider".into(),
        None => format!("Network {} spec.machineDefaults.provider", machine.spec.network_ref.name),
    }
}

/// A machine never moves between providers: the kind it was provisioned
/// with (status.provider) must still be the one resolved. The schema fixes
/// spec.provider, but a Machine that takes its Network's
/// machineDefaults.provider would otherwise launch an instance for a host
/// it used to deploy to, or forget the instance it launched.
fn check_provider_kind(recorded: Option<&str>, resolved: Option<&MachineProviderSpec>, source: &str) -> Result<()> {
    let Some(recorded) = recorded else { return Ok(()) };
    let now = resolved.and_then(MachineProviderSpec::kind);
    if now == Some(recorded) {
        return Ok(());
    }
    Err(Error::stalled(
        "ProviderChanged",
        format!(
            "this Machine was provisioned with provider {recorded} (status.provider), but {source} now gives {}; \
             a machine cannot move between providers: restore {source}, or create a new Machine",
            now.unwrap_or("none")
        ),
    ))
}

/// The host key a machine must present, and which field pins it.
pub struct Pin {
    pub key: HostKey,
    pub source: &'static str,
}

/// The pinned host key: spec.ssh.hostKey, else the one the provider
/// installed (libvirt's seed), else the one recorded at first contact;
/// None before first contact.
pub fn host_key_pin(spec_pin: Option<&str>, injected: Option<&str>, recorded: Option<&str>) -> Result<Option<Pin>> {
    let (pin, source) = match (spec_pin, injected, recorded) {
        (Some(pin), _, _) => (pin, "spec.ssh.hostKey"),
        (None, Some(key), _) => (key, "the host key the provider installed at first boot"),
        (None, None, Some(rec)) => (rec, "status.hostKey (recorded at first contact)"),
        (None, None, None) => return Ok(None),
    };
    let key = HostKey::parse(pin, source).map_err(|e| Error::stalled("InvalidHostKey", e.to_string()))?;
    Ok(Some(Pin { key, source }))
}

/// Compares the presented host key with the pinned one.
fn check_host_key(presented: &HostKey, pin: Option<&Pin>) -> Result<()> {
    let Some(Pin { key: pinned, source }) = pin else { return Ok(()) };
    if pinned != presented {
        return Err(Error::stalled(
            "HostKeyMismatch",
            format!(
                "the host presented {presented} but {source} pins {pinned}; no work is done on this machine. \
                 If the host was reinstalled, set spec.ssh.hostKey to its new key; otherwise the connection may be intercepted"
            ),
        ));
    }
    Ok(())
}

/// Logs in to the jump host, whose key must match spec.ssh.jumpHost.hostKey.
pub(super) async fn connect_jump_host(
    ctx: &Context,
    ns: &str,
    jump: &JumpHost,
    ssh: &SshSpec,
    machine_key: Option<&PrivateKey>,
) -> Result<Arc<Session>> {
    let pinned = HostKey::parse(&jump.host_key, "spec.ssh.jumpHost.hostKey")
        .map_err(|e| Error::stalled("InvalidHostKey", e.to_string()))?;
    let key = match &jump.key_pair_ref {
        Some(key_ref) => {
            let keypair =
                Api::<KeyPair>::namespaced(ctx.client.clone(), ns).get_opt(&key_ref.name).await?.ok_or_else(|| {
                    Error::waiting(
                        "KeyPairNotFound",
                        format!("KeyPair {} (spec.ssh.jumpHost.keyPairRef.name) does not exist yet", key_ref.name),
                    )
                })?;
            super::keypair::private_key(ctx, ns, &keypair).await?
        }
        None => machine_key.cloned().ok_or_else(|| {
            Error::stalled(
                "NoKeyPair",
                "spec.ssh.jumpHost needs a key: set spec.ssh.keyPairRef or spec.ssh.jumpHost.keyPairRef",
            )
        })?,
    };
    let user = jump.user.clone().or_else(|| ssh.user.clone()).unwrap_or_else(|| "root".into());
    let port = u16::try_from(jump.port).unwrap_or(22);
    let session = Session::connect(&jump.host, port, &user, &key, &pinned, ctx.settings.ssh_timeout, None).await;
    ctx.metrics.provider_call("ssh", "jump", session.is_ok());
    session.map(Arc::new).map_err(|err| match err {
        SshError::HostKeyMismatch { .. } => Error::stalled(
            "JumpHostKeyMismatch",
            format!("{err}; spec.ssh.jumpHost.hostKey must be the jump host's key, and nothing is sent through it until it is"),
        ),
        SshError::AuthRejected { .. } => Error::stalled("JumpHostAuthRejected", format!("jump host: {err}")),
        other => ProviderError::Transient(format!("jump host: {other}")).into(),
    })
}

impl Reconciler for Machine {
    type Status = MachineStatus;
    const KIND: &'static str = "Machine";

    fn status(&self) -> Option<&MachineStatus> {
        self.status.as_ref()
    }

    async fn apply(self: Arc<Self>, ctx: Arc<Context>, status: &mut MachineStatus) -> Result<Option<Duration>> {
        let generation = self.metadata.generation;
        let ns = self.namespace().unwrap_or_default();

        // Resolve references.
        let network_name = &self.spec.network_ref.name;
        let network = super::resolve_network(&ctx, &ns, network_name, "spec.networkRef.name").await?;
        let resolved = resolve(&self, &network)?;
        check_provider_kind(status.provider.as_deref(), Some(&resolved.provider), &provider_source(&self))?;
        {
            let mut users = ctx.keypair_users.lock().unwrap_or_else(|e| e.into_inner());
            match &resolved.ssh.key_pair_ref {
                Some(key_ref) => users.insert(super::object_key(&*self), key_ref.name.clone()),
                None => users.remove(&super::object_key(&*self)),
            };
        }
        // A check or reboot asked for needs the login key too.
        let actions_pending = super::machine_actions::pending(&self, status).any();
        let mut key_name = None;
        let mut authorized_key = None;
        let mut login_key = None;
        if let Some(key_ref) = &resolved.ssh.key_pair_ref {
            let keypair =
                Api::<KeyPair>::namespaced(ctx.client.clone(), &ns).get_opt(&key_ref.name).await?.ok_or_else(|| {
                    Error::waiting(
                        "KeyPairNotFound",
                        format!(
                            "KeyPair {} (spec.ssh.keyPairRef.name) does not exist yet; create it or fix the reference",
                            key_ref.name
                        ),
                    )
                })?;
            let status = keypair.status.clone().unwrap_or_default();
            if !super::status::is_true(&status.conditions, crate::api::condition::READY) {
                // Its own message says why (a lost private key, say).
                let why = super::status::message(&status.conditions, crate::api::condition::READY)
                    .filter(|m| !m.is_empty())
                    .map(|m| format!(": {m}"))
                    .unwrap_or_default();
                return Err(Error::waiting(
                    "KeyPairNotReady",
                    format!("KeyPair {} (spec.ssh.keyPairRef.name) is not Ready yet{why}", key_ref.name),
                ));
            }
            key_name = status.cloud_key_name;
            authorized_key = status.public_key;
            if self.spec.nixos.is_some() || resolved.ssh.jump_host.is_some() || actions_pending {
                login_key = Some(super::keypair::private_key(&ctx, &ns, &keypair).await?);
            }
        }

        // Provision.
        let provider = ctx.providers.machine(&resolved.provider)?;
        let target = MachineTarget {
            owner: Owner::of(&*self),
            provider: resolved.provider.clone(),
            running: self.spec.running,
            external_id: self.annotations().get(EXTERNAL_NAME_ANNOTATION).cloned(),
            network: Some(network.clone()),
            key_name,
            authorized_key,
        };
        let mut instance = match provider.observe(&target).await? {
            Some(current) if self.spec.management_policy == ManagementPolicy::Observe => current,
            Some(current) => {
                // Found by its UID tag (after a crash, or a create whose answer was lost).
                if target.external_id.is_none()
                    && let Some(id) = current.cloud_id()
                {
                    record_external_name(&Api::<Machine>::namespaced(ctx.client.clone(), &ns), &self, id).await?;
                }
                provider.update(&target, current).await?
            }
            None if self.spec.management_policy == ManagementPolicy::Observe => {
                return Err(Error::stalled(
                    "InstanceNotFound",
                    format!(
                        "managementPolicy Observe needs the {EXTERNAL_NAME_ANNOTATION} annotation naming an existing instance"
                    ),
                ));
            }
            None if target.external_id.is_some() => {
                return Err(Error::stalled(
                    "InstanceGone",
                    format!(
                        "instance {} named by the {EXTERNAL_NAME_ANNOTATION} annotation no longer exists; remove the annotation to create a new one",
                        target.external_id.clone().unwrap_or_default()
                    ),
                ));
            }
            None => {
                // Waiting for the Network is not a create: no mark for it.
                provider.check_create(&target)?;
                // Record the intent first: a replica with a stale copy fails here
                // instead of launching a second instance.
                let api = Api::<Machine>::namespaced(ctx.client.clone(), &ns);
                let id_of = |c: &crate::provider::Instance| c.cloud_id().map(str::to_owned);
                let created =
                    create_once(&api, &*self, &ctx, "instance", provider.lookup(), id_of, || provider.create(&target))
                        .await?;
                ctx.event(
                    &*self,
                    EventType::Normal,
                    "Created",
                    format!("created {} instance {}", provider.name(), created.provider_id.clone().unwrap_or_default()),
                )
                .await;
                created
            }
        };
        if let Some(host) = &resolved.ssh.host {
            instance.ssh_host = host.clone();
        }
        if let Some(port) = resolved.ssh.port.and_then(|p| u16::try_from(p).ok()) {
            instance.ssh_port = port;
        }
        status.provider = Some(provider.name().to_owned());
        status.provider_id = instance.provider_id.clone();
        status.addresses = instance.addresses.clone();
        let mut conds = Conditions::new(&mut status.conditions, generation);
        match &instance.restart_pending {
            Some(why) => conds.set(conditions::RESTART_REQUIRED, true, "DefinitionChanged", why.clone()),
            None => conds.remove(conditions::RESTART_REQUIRED),
        };

        if instance.state == InstanceState::Stopped && !self.spec.running {
            status.phase = Some(MachinePhase::Stopped);
            Conditions::new(&mut status.conditions, generation).ready("Stopped", "stopped as spec.running is false");
            return Ok(None);
        }

        // Verify the host over SSH before anything else touches it.
        let via = match &resolved.ssh.jump_host {
            Some(jump) => Some(connect_jump_host(&ctx, &ns, jump, &resolved.ssh, login_key.as_ref()).await?),
            None => provider.jump(&target).await?,
        };
        // Parsed before probing: the probe asks for a key of the pinned type.
        let pin =
            host_key_pin(resolved.ssh.host_key.as_deref(), instance.host_key.as_deref(), status.host_key.as_deref())?;
        let probe = ssh::probe_host_key(
            &instance.ssh_host,
            instance.ssh_port,
            ctx.settings.ssh_timeout,
            via.as_deref(),
            pin.as_ref().map(|p| &p.key),
        )
        .await;
        ctx.metrics.provider_call("ssh", "probe", probe.is_ok());
        let presented = match probe {
            Ok(key) => key,
            Err(err) => {
                status.phase = Some(MachinePhase::Provisioning);
                Conditions::new(&mut status.conditions, generation).set(
                    conditions::PROVISIONED,
                    false,
                    "Unreachable",
                    err.to_string(),
                );
                return Err(ProviderError::Transient(format!("waiting for SSH: {err}")).into());
            }
        };
        check_host_key(&presented, pin.as_ref())?;
        // Trust on first use is news; a key the spec pins or the provider
        // installed is only confirmed.
        if status.host_key.is_none() && resolved.ssh.host_key.is_none() && instance.host_key.is_none() {
            ctx.event(
                &*self,
                EventType::Normal,
                "HostKeyRecorded",
                format!("recorded host key {presented} at first contact; it is enforced from now on"),
            )
            .await;
        }
        status.host_key = Some(presented.to_openssh());

        let was_provisioned = super::status::is_true(&status.conditions, conditions::PROVISIONED);
        let mut conds = Conditions::new(&mut status.conditions, generation);
        conds.set(
            conditions::PROVISIONED,
            true,
            "Provisioned",
            format!(
                "{} answers SSH with host key {}",
                ssh::format_addr(&instance.ssh_host, instance.ssh_port),
                presented.fingerprint()
            ),
        );
        if self.spec.nixos.is_none() {
            conds.ready("Provisioned", "provisioned; spec.nixos is not set, so nothing is deployed");
            status.phase = Some(MachinePhase::Running);
        }
        if !was_provisioned {
            ctx.event(&*self, EventType::Normal, "Provisioned", format!("{} machine provisioned", provider.name()))
                .await;
        }
        let Some(key) = login_key else {
            if self.spec.nixos.is_some() {
                return Err(Error::stalled(
                    "NoKeyPair",
                    "deploying spec.nixos needs an SSH key: set spec.ssh.keyPairRef or the Network's spec.machineDefaults.ssh.keyPairRef",
                ));
            }
            return Ok(None);
        };
        let target = deploy::Target {
            host: instance.ssh_host.clone(),
            port: instance.ssh_port,
            user: resolved.ssh.user.clone().unwrap_or_else(|| "root".into()),
            key,
            host_key: presented,
            via,
        };
        // A system built from Git is deployed as a pasted closure, from the builder's store.
        let built = match self.spec.nixos.as_ref().is_some_and(|n| n.build.is_some()) {
            true => match super::build::reconcile(&self, &network, &ctx, &target, status).await? {
                super::build::Outcome::Deploy(built) => Some(built),
                super::build::Outcome::Wait(after) => return Ok(Some(after)),
            },
            false => None,
        };
        let (machine, source) = match &built {
            Some(b) => (&b.machine, Some(b.source.clone())),
            None => (&*self, None),
        };
        let requeue = deploy::reconcile(machine, &network, &ctx, &target, status, source).await?;
        super::machine_actions::carry_out(&self, &network, &ctx, &target, status).await?;
        Ok(requeue)
    }

    async fn cleanup(self: Arc<Self>, ctx: Arc<Context>) -> Result<Cleanup> {
        ctx.deployments.sessions.forget(&self.uid().unwrap_or_default());
        if self.spec.deletion_policy == DeletionPolicy::Orphan
            || self.spec.management_policy == ManagementPolicy::Observe
        {
            return Ok(Cleanup::Done);
        }
        let ns = self.namespace().unwrap_or_default();
        let network = Api::<Network>::namespaced(ctx.client.clone(), &ns).get_opt(&self.spec.network_ref.name).await?;
        let provider_spec = match (&self.spec.provider, &network) {
            (Some(p), _) => Some(p.clone()),
            (None, Some(n)) => n.spec.machine_defaults.as_ref().and_then(|d| d.provider.clone()),
            (None, None) => None,
        };
        let recorded = self.status.as_ref().and_then(|s| s.provider.as_deref());
        if let Err(Error::Stalled { reason, message }) =
            check_provider_kind(recorded, provider_spec.as_ref(), &provider_source(&self))
        {
            return Ok(Cleanup::Stalled {
                reason,
                message: format!("{message}; or set spec.deletionPolicy: Orphan to leave what it provisioned"),
            });
        }
        // Without a provider nothing was ever created.
        let Some(provider_spec) = provider_spec else { return Ok(Cleanup::Done) };
        let provider = ctx.providers.machine(&provider_spec)?;
        let target = MachineTarget {
            owner: Owner::of(&*self),
            provider: provider_spec,
            running: false,
            external_id: self.annotations().get(EXTERNAL_NAME_ANNOTATION).cloned(),
            network,
            key_name: None,
            authorized_key: None,
        };
        ctx.keypair_users.lock().unwrap_or_else(|e| e.into_inner()).remove(&super::object_key(&*self));
        provider.delete(&target).await?;
        Ok(Cleanup::Done)
    }
}

/// The Machine controller; a Network, KeyPair or key Secret appearing or
/// changing wakes the Machines that use it (no polling). Machines, Networks
/// and KeyPairs come from the shared watches, whose stores the reconcile reads.
pub fn controller(
    machines: &mut SharedWatch<Machine>,
    networks: &mut SharedWatch<Network>,
    keypairs: &mut SharedWatch<KeyPair>,
    secrets: Api<Secret>,
    keypair_users: super::KeyPairUsers,
    wc: watcher::Config,
) -> Controller<Machine> {
    let controller = Controller::for_stream(machines.applied(), machines.store());
    let by_network = machines.store();
    let by_key_secret = machines.store();
    // Network status changes with every member's readiness; only a spec
    // change (a new generation) or a change of membership (what members
    // publish to their machines) concerns the members.
    let seen_generations = Mutex::new(HashMap::<String, (Option<i64>, u64)>::new());
    controller
        .watches_stream(networks.touched(), move |network| {
            let key = super::object_key(&network);
            let seen_now = (network.metadata.generation, membership_digest(&network));
            let mut seen = seen_generations.lock().unwrap_or_else(|e| e.into_inner());
            let before = seen.insert(key, seen_now);
            if before == Some(seen_now) && network.metadata.deletion_timestamp.is_none() {
                return Vec::new();
            }
            // Only membership changed: only members that publish it (deploy) care.
            let only_membership = before.is_some_and(|(generation, _)| generation == seen_now.0)
                && network.metadata.deletion_timestamp.is_none();
            let ns = network.namespace();
            let name = network.name_any();
            by_network
                .state()
                .into_iter()
                .filter(|m| m.namespace() == ns && m.spec.network_ref.name == name)
                .filter(|m| !only_membership || m.spec.nixos.is_some())
                .map(|m| ObjectRef::from_obj(&*m))
                .collect::<Vec<_>>()
        })
        .watches(secrets, wc, move |secret| {
            // A changed Secret rewrites the key files made from it (spec.keys).
            let ns = secret.namespace();
            let name = secret.name_any();
            by_key_secret
                .state()
                .into_iter()
                .filter(|m| m.namespace() == ns && m.spec.keys.iter().any(|k| k.secret_ref.name == name))
                .map(|m| ObjectRef::from_obj(&*m))
                .collect::<Vec<_>>()
        })
        .watches_stream(keypairs.touched(), move |keypair| {
            // Machines whose last reconcile resolved to this KeyPair (directly
            // or through the Network's defaults), including those waiting for it.
            let ns = keypair.namespace().unwrap_or_default();
            let name = keypair.name_any();
            let prefix = format!("{ns}/");
            let users = keypair_users.lock().unwrap_or_else(|e| e.into_inner());
            users
                .iter()
                .filter(|(machine, keypair)| **keypair == name && machine.starts_with(&prefix))
                .filter_map(|(machine, _)| machine.split_once('/').map(|(ns, n)| ObjectRef::new(n).within(ns)))
                .collect::<Vec<_>>()
        })
}

/// A digest of a Network's published membership.
fn membership_digest(network: &Network) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    if let Some(status) = &network.status {
        for m in &status.members {
            (&m.name, &m.host_key, &m.mesh_address, &m.mesh_key).hash(&mut hasher);
            for a in &m.addresses {
                (&a.address_type, &a.address).hash(&mut hasher);
            }
        }
        status.members.len().hash(&mut hasher);
    }
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHsf5n2k2cOqRk8yE1xXKmbvmN4QUeTSR3dOzU6pD6VJ";
    const B: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl";

    fn check(presented: &HostKey, spec_pin: Option<&str>, recorded: Option<&str>) -> Result<()> {
        check_host_key(presented, host_key_pin(spec_pin, None, recorded)?.as_ref())
    }

    #[test]
    fn an_injected_host_key_is_enforced_from_the_first_connection() {
        let a = HostKey::parse(A, "a").unwrap();
        let pin = |spec, injected, recorded| host_key_pin(spec, injected, recorded).unwrap();
        assert!(check_host_key(&a, pin(None, Some(A), None).as_ref()).is_ok());
        let Err(Error::Stalled { message, .. }) = check_host_key(&a, pin(None, Some(B), None).as_ref()) else {
            panic!("a host presenting another key than the injected one must stall")
        };
        assert!(message.contains("the provider installed at first boot"), "{message}");
        // The spec's pin still wins over the injected key.
        assert!(check_host_key(&a, pin(Some(A), Some(B), None).as_ref()).is_ok());
    }

    #[test]
    fn host_key_is_enforced_from_spec_then_from_first_contact() {
        let a = HostKey::parse(A, "a").unwrap();
        assert!(check(&a, None, None).is_ok(), "nothing pinned: first contact is accepted");
        assert!(check(&a, Some(A), None).is_ok());
        assert!(check(&a, None, Some(A)).is_ok());
        let err = check(&a, Some(B), Some(A)).unwrap_err();
        let Error::Stalled { reason, message } = err else { panic!("mismatch must stall") };
        assert_eq!(reason, "HostKeyMismatch");
        assert!(message.contains("spec.ssh.hostKey pins"), "{message}");
        assert!(message.contains(&a.fingerprint()), "message shows the presented fingerprint: {message}");
        assert!(matches!(check(&a, None, Some(B)), Err(Error::Stalled { .. })));
    }

    #[test]
    fn a_machine_keeps_the_provider_it_was_provisioned_with() {
        let existing: MachineProviderSpec =
            serde_json::from_value(serde_json::json!({"existing": {"host": "203.0.113.5"}})).unwrap();
        let ec2: MachineProviderSpec = serde_json::from_value(
            serde_json::json!({"ec2": {"instanceType": "t3.small", "ami": "ami-0123456789abcdef0", "subnet": "a"}}),
        )
        .unwrap();
        let source = "Network web spec.machineDefaults.provider";
        assert!(check_provider_kind(None, Some(&ec2), source).is_ok(), "nothing provisioned yet");
        assert!(check_provider_kind(Some("ec2"), Some(&ec2), source).is_ok());
        for (recorded, now, says) in [
            ("existing", Some(&ec2), "now gives ec2"),
            ("ec2", Some(&existing), "now gives existing"),
            ("ec2", None, "now gives none"),
        ] {
            let Err(Error::Stalled { reason, message }) = check_provider_kind(Some(recorded), now, source) else {
                panic!("{recorded} -> {says} must stall")
            };
            assert_eq!(reason, "ProviderChanged");
            assert!(
                message.contains(says) && message.contains("restore Network web spec.machineDefaults.provider"),
                "{message}"
            );
        }
    }
}
