//! The Machine controller's deploy step, once the machine is provisioned and
//! its host key verified: keys, push, activation, health checks, magic
//! rollback and drift, as a pipeline of idempotent steps over SSH.
//!
//! A deployment's progress is written to the Machine as it goes
//! (status.lastDeploy and the Reconciling message), so `kubectl get` shows
//! a long push moving, and a restarted operator finds an interrupted
//! activation and settles it instead of starting over blindly.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::events::EventType;
use russh::keys::PrivateKey;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};

use super::status::Conditions;
use super::{Context, Error, Result, write_status};
use crate::api::machine::{
    ActivationAction, Delivery, DeployRecord, DriftPolicy, MachinePhase, MachineStatus, NixosSpec, deploy_result,
};
use crate::api::{Machine, Network};
use crate::nix::activation::{self, NodeState, Watchdog};
use crate::nix::cache::BinaryCacheSource;
use crate::nix::keys::{self, KeyFile};
use crate::nix::local_store::LocalStore;
use crate::nix::push::{self, PathSource, Progress, PushError, PushStats, RecordCache};
use crate::nix::serve::ServeConnection;
use crate::nix::{PathInfo, StorePath};
use crate::provider::ProviderError;
use crate::ssh::{HostKey, Session, SshError};

/// Machine condition types set by deployments.
pub mod conditions {
    /// The desired closure was activated.
    pub const DEPLOYED: &str = "Deployed";
    /// The active system is the desired closure.
    pub const IN_SYNC: &str = "InSync";
    /// Health checks passed after the last activation.
    pub const HEALTHY: &str = "Healthy";
    /// The new system needs a reboot to take full effect.
    pub const REBOOT_REQUIRED: &str = "RebootRequired";
}

/// How often a running push writes its progress to the Machine.
const PROGRESS_INTERVAL: Duration = Duration::from_secs(2);
/// Extra time given to a machine's watchdog beyond its timeout before the
/// operator looks at what it did.
const WATCHDOG_GRACE: Duration = Duration::from_secs(3);
/// How long a machine may take to roll back and answer again.
const ROLLBACK_WAIT: Duration = Duration::from_secs(120);

/// State shared by all deployments of one operator.
pub struct Deployments {
    /// Path records shared by concurrent pushes of the same paths.
    pub records: RecordCache,
    /// Per Network ("namespace/name"): its maxUnavailable and the slots.
    rollouts: Mutex<HashMap<String, (i32, Arc<Semaphore>)>>,
}

impl Deployments {
    pub fn new(record_cache_bytes: u64) -> Self {
        Self { records: RecordCache::new(record_cache_bytes), rollouts: Mutex::default() }
    }

    fn rollout_slots(&self, network: &Network, max: i32) -> Arc<Semaphore> {
        let key = super::object_key(network);
        let mut rollouts = self.rollouts.lock().unwrap_or_else(|e| e.into_inner());
        let entry = rollouts.entry(key).or_insert_with(|| (max, Arc::new(Semaphore::new(max.max(1) as usize))));
        if entry.0 != max {
            *entry = (max, Arc::new(Semaphore::new(max.max(1) as usize)));
        }
        entry.1.clone()
    }
}

/// How to reach the machine.
pub struct Target {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub key: PrivateKey,
    pub host_key: HostKey,
    /// The jump host session to connect through, if any.
    pub via: Option<Arc<Session>>,
}

/// Everything one deployment run needs.
struct Run<'a> {
    machine: &'a Machine,
    network: &'a Network,
    ctx: &'a Context,
    api: Api<Machine>,
    nixos: &'a NixosSpec,
    target: &'a Target,
    generation: Option<i64>,
}

/// Brings the machine to `spec.nixos`: returns with `status` describing the
/// result (Ready, or Stalled for a closure that failed), or an error to retry.
/// The Duration asks for an earlier look than the resync.
pub async fn reconcile(
    machine: &Machine,
    network: &Network,
    ctx: &Context,
    target: &Target,
    status: &mut MachineStatus,
) -> Result<Option<Duration>> {
    let Some(nixos) = &machine.spec.nixos else { return Ok(None) };
    let ns = machine.namespace().unwrap_or_default();
    let run = Run {
        machine,
        network,
        ctx,
        api: Api::namespaced(ctx.client.clone(), &ns),
        nixos,
        target,
        generation: machine.metadata.generation,
    };
    run.reconcile(status).await
}

impl Run<'_> {
    async fn reconcile(&self, status: &mut MachineStatus) -> Result<Option<Duration>> {
        let desired = self.nixos.closure.clone();
        let desired_path = StorePath::parse(&desired)
            .map_err(|e| Error::stalled("InvalidClosure", format!("spec.nixos.closure: {e}")))?;

        // A closure that failed at this generation is not tried again until
        // the spec changes; the machine is left on what it runs.
        if let Some(last) = &status.last_deploy
            && is_failure_of(last, &desired, self.generation)
        {
            let message = last.message.clone().unwrap_or_default();
            status.phase = Some(MachinePhase::Failed);
            Conditions::new(&mut status.conditions, self.generation).stalled(
                last.result.as_deref().unwrap_or(deploy_result::FAILED),
                format!("{message}; change spec.nixos.closure (or any other spec field) to try again"),
            );
            return Ok(None);
        }

        // A deployment in progress is recorded in status; acting on a stale
        // copy of it (the cache lags the operator's own writes) would settle
        // a deployment that has already been settled. Wait for the fresh one.
        if status
            .last_deploy
            .as_ref()
            .is_some_and(|l| matches!(l.result.as_deref(), Some(deploy_result::PUSHING | deploy_result::ACTIVATING)))
        {
            let stored = self.api.get(&self.machine.name_any()).await?;
            if stored.metadata.resource_version != self.machine.metadata.resource_version {
                return Err(Error::Stale);
            }
        }

        let session = self.connect().await?;
        let state = self.probe(&session).await?;
        self.sync_keys(&session, status).await?;

        if let Some(last) = status.last_deploy.clone()
            && last.closure == desired
            && last.result.as_deref() == Some(deploy_result::ACTIVATING)
        {
            // An activation was interrupted (operator restart, dropped
            // connection): settle it from what the machine shows.
            let outcome = if state.active_for(self.nixos.action) == Some(desired.as_str()) {
                self.after_activation(&session, status, &last, false).await?
            } else {
                self.failed(
                    status,
                    deploy_result::FAILED,
                    format!("activation of {desired} was interrupted and the machine is not running it"),
                )
                .await;
                None
            };
            session.close().await;
            return Ok(outcome);
        }

        let active = state.active_for(self.nixos.action).map(str::to_owned);
        let deployed_before = status
            .last_deploy
            .as_ref()
            .is_some_and(|l| l.closure == desired && l.result.as_deref() == Some(deploy_result::SUCCEEDED));
        let in_sync = match self.nixos.action {
            ActivationAction::DryActivate => deployed_before,
            _ => active.as_deref() == Some(desired.as_str()),
        };
        if in_sync || (deployed_before && self.nixos.drift == DriftPolicy::Ignore) {
            session.close().await;
            self.running(status, &state, &desired);
            return Ok(None);
        }
        if deployed_before {
            let found = active.clone().unwrap_or_else(|| "nothing".into());
            match self.nixos.drift {
                DriftPolicy::Report => {
                    session.close().await;
                    let message = format!(
                        "the machine runs {found} instead of {desired}; spec.nixos.drift is Report, so it is left as is"
                    );
                    if crate::controller::status::is_true(&status.conditions, conditions::IN_SYNC) {
                        self.event(EventType::Warning, "DriftDetected", message.clone()).await;
                    }
                    status.phase = Some(MachinePhase::Running);
                    Conditions::new(&mut status.conditions, self.generation)
                        .ready("Deployed", format!("deployed {desired}; drift reported"))
                        .set(conditions::IN_SYNC, false, "DriftDetected", message);
                    return Ok(None);
                }
                DriftPolicy::Correct => {
                    self.event(
                        EventType::Warning,
                        "CorrectingDrift",
                        format!("the machine runs {found} instead of {desired}; activating {desired} again"),
                    )
                    .await;
                }
                DriftPolicy::Ignore => {}
            }
        }

        let _slot = self.rollout_slot(status).await?;
        let outcome = self.deploy(&session, status, &state, &desired_path).await;
        session.close().await;
        outcome
    }

    async fn connect(&self) -> Result<Session> {
        let t = self.target;
        let timeout = self.ctx.settings.ssh_timeout;
        let connected = Session::connect(&t.host, t.port, &t.user, &t.key, &t.host_key, timeout, t.via.clone()).await;
        self.ctx.metrics.provider_call("ssh", "connect", connected.is_ok());
        connected.map_err(ssh_error)
    }

    async fn probe(&self, session: &Session) -> Result<NodeState> {
        let out = session.exec(&activation::probe_script()).await.map_err(ssh_error)?;
        Ok(activation::parse_probe(&String::from_utf8_lossy(&out.stdout)))
    }

    async fn event(&self, type_: EventType, reason: &str, message: String) {
        self.ctx.event(self.machine, type_, reason, message).await;
    }

    /// Writes spec.keys to the machine where they differ and removes the ones
    /// no longer in the spec. Runs before every activation and on every resync.
    async fn sync_keys(&self, session: &Session, status: &mut MachineStatus) -> Result<()> {
        let ns = self.machine.namespace().unwrap_or_default();
        let secrets: Api<Secret> = Api::namespaced(self.ctx.client.clone(), &ns);
        let mut wanted = Vec::new();
        let mut contents = Vec::new();
        for (i, key) in self.machine.spec.keys.iter().enumerate() {
            let field = format!("spec.keys[{i}].secretRef");
            let secret = secrets.get_opt(&key.secret_ref.name).await?.ok_or_else(|| {
                Error::waiting(
                    "KeySecretNotFound",
                    format!(
                        "Secret {} ({field}.name) does not exist yet; create it or fix the reference",
                        key.secret_ref.name
                    ),
                )
            })?;
            let content = secret
                .data
                .as_ref()
                .and_then(|d| d.get(&key.secret_ref.key))
                .map(|b| b.0.clone())
                .or_else(|| secret.string_data.as_ref()?.get(&key.secret_ref.key).map(|s| s.clone().into_bytes()))
                .ok_or_else(|| {
                    Error::stalled(
                        "KeySecretKeyMissing",
                        format!(
                            "Secret {} has no key {:?} ({field}.key); add it or fix the reference",
                            key.secret_ref.name, key.secret_ref.key
                        ),
                    )
                })?;
            let mode = keys::parse_mode(&key.permissions).ok_or_else(|| {
                Error::stalled(
                    "InvalidKeyMode",
                    format!("spec.keys[{i}].permissions {:?} is not an octal mode", key.permissions),
                )
            })?;
            wanted.push(KeyFile {
                path: format!("{}/{}", key.dest_dir.trim_end_matches('/'), key.name),
                user: key.user.clone(),
                group: key.group.clone(),
                mode,
                sha256: keys::sha256_hex(&content),
            });
            contents.push(content);
        }
        if !wanted.is_empty() {
            let paths: Vec<&str> = wanted.iter().map(|k| k.path.as_str()).collect();
            let out = session.exec(&keys::inspect_script(&paths)).await.map_err(ssh_error)?;
            let stale = keys::stale(&wanted, &String::from_utf8_lossy(&out.stdout));
            for key in stale {
                let index = wanted.iter().position(|k| k == key).unwrap_or_default();
                let out =
                    session.exec_with_input(&keys::write_script(key), &contents[index]).await.map_err(ssh_error)?;
                if out.status != Some(0) {
                    return Err(Error::stalled(
                        "KeyWriteFailed",
                        format!(
                            "writing key {} (spec.keys[{index}]) failed: {}; check destDir, user and group exist on the machine",
                            key.path,
                            String::from_utf8_lossy(&out.stderr).trim()
                        ),
                    ));
                }
                self.event(EventType::Normal, "KeyWritten", format!("wrote key {}", key.path)).await;
            }
        }
        let removed: Vec<String> =
            status.keys.iter().filter(|p| !wanted.iter().any(|k| &k.path == *p)).cloned().collect();
        if !removed.is_empty() {
            let out = session.exec(&keys::remove_script(&removed)).await.map_err(ssh_error)?;
            if out.status != Some(0) {
                return Err(ProviderError::Transient(format!(
                    "removing keys {removed:?}: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                ))
                .into());
            }
            self.event(EventType::Normal, "KeyRemoved", format!("removed {}", removed.join(", "))).await;
        }
        status.keys = wanted.into_iter().map(|k| k.path).collect();
        Ok(())
    }

    /// Waits for one of the Network's rollout slots (spec.rollout), after
    /// checking that no other member's deployment has failed.
    async fn rollout_slot(&self, status: &mut MachineStatus) -> Result<Option<OwnedSemaphorePermit>> {
        let Some(rollout) = &self.network.spec.rollout else { return Ok(None) };
        self.check_rollout_not_halted().await?;
        let slots = self.ctx.deployments.rollout_slots(self.network, rollout.max_unavailable);
        let permit = match slots.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                let message = format!(
                    "waiting for a rollout slot: Network {} deploys at most {} machine(s) at a time (spec.rollout.maxUnavailable)",
                    self.network.name_any(),
                    rollout.max_unavailable
                );
                Conditions::new(&mut status.conditions, self.generation).reconciling("RolloutWaiting", message);
                write_status(&self.api, self.machine, status.clone(), self.ctx).await?;
                slots.acquire_owned().await.map_err(|e| ProviderError::Transient(e.to_string()))?
            }
        };
        // A machine may have failed while this one waited.
        self.check_rollout_not_halted().await?;
        Ok(Some(permit))
    }

    async fn check_rollout_not_halted(&self) -> Result<()> {
        let ns = self.machine.namespace().unwrap_or_default();
        let network = self.network.name_any();
        let machines = self.api.list(&Default::default()).await?;
        let failed: Vec<String> = machines
            .items
            .iter()
            .filter(|m| m.spec.network_ref.name == network && m.name_any() != self.machine.name_any())
            .filter(|m| deploy_failed(m))
            .map(|m| m.name_any())
            .collect();
        if failed.is_empty() {
            return Ok(());
        }
        Err(Error::waiting(
            "RolloutHalted",
            format!(
                "the rollout of Network {ns}/{network} is halted because {} failed to deploy; this machine stays on its current system until that is fixed",
                failed.join(", ")
            ),
        ))
    }

    /// Pushes (or substitutes) the closure and activates it.
    async fn deploy(
        &self,
        session: &Session,
        status: &mut MachineStatus,
        state: &NodeState,
        desired: &StorePath,
    ) -> Result<Option<Duration>> {
        let started = Instant::now();
        let mut record = DeployRecord {
            closure: desired.to_string(),
            started_at: Some(Time(Timestamp::now())),
            result: Some(deploy_result::PUSHING.into()),
            spec_generation: self.generation,
            ..DeployRecord::default()
        };
        status.phase = Some(MachinePhase::Deploying);
        status.last_deploy = Some(record.clone());
        Conditions::new(&mut status.conditions, self.generation)
            .reconciling("Deploying", format!("reading the closure of {desired}"));
        write_status(&self.api, self.machine, status.clone(), self.ctx).await?;

        let source = self.path_source().await?;
        let closure = source.closure(desired).await.map_err(source_error)?;
        let mut serve = ServeConnection::open(session).await.map_err(|e| push_error(e.into()))?;
        let missing = push::missing_paths(&mut serve, &closure).await.map_err(push_error)?;
        record.paths_total = missing.len() as i64;
        record.bytes_total = missing.iter().map(|i| i.nar_size as i64).sum();
        let stats = match self.nixos.delivery {
            Delivery::Push => self.push(session, status, &record, &source, &missing, state.has_zstd).await?,
            Delivery::Substitute => self.substitute(session, desired, &missing).await?,
        };
        self.ctx.metrics.pushed(stats.paths, stats.nar_bytes, stats.wire_bytes);
        // The connection kept the machine's copies from garbage collection
        // until the profile refers to them.
        record.paths_copied = stats.paths as i64;
        record.bytes_copied = stats.nar_bytes as i64;

        record.result = Some(deploy_result::ACTIVATING.into());
        status.last_deploy = Some(record.clone());
        Conditions::new(&mut status.conditions, self.generation).reconciling(
            "Activating",
            format!(
                "copied {} paths ({}); running switch-to-configuration {}",
                stats.paths,
                mib(stats.nar_bytes),
                self.nixos.action.as_arg()
            ),
        );
        write_status(&self.api, self.machine, status.clone(), self.ctx).await?;

        let watchdog = self.watchdog(&record);
        let script = activation::activate_script(&desired.to_string(), self.nixos.action, watchdog.as_ref());
        let activated = session.exec(&script).await;
        let _ = serve.close().await;
        let out = match activated {
            Ok(out) => out,
            Err(err) => {
                // The activation may still be running; the next look settles it.
                Conditions::new(&mut status.conditions, self.generation).reconciling(
                    "Activating",
                    format!("lost the connection while activating ({err}); checking the machine again"),
                );
                return Ok(Some(Duration::from_secs(5)));
            }
        };
        let tail = output_tail(&out.stdout, &out.stderr);
        match out.status {
            Some(0) => Conditions::new(&mut status.conditions, self.generation).remove(conditions::REBOOT_REQUIRED),
            Some(activation::EXIT_REBOOT_REQUIRED) => Conditions::new(&mut status.conditions, self.generation).set(
                conditions::REBOOT_REQUIRED,
                true,
                "RebootRequired",
                format!(
                    "{desired} is active but needs a reboot to take full effect (switch-to-configuration exited 100)"
                ),
            ),
            Some(activation::EXIT_PROFILE_FAILED) => {
                self.failed(
                    status,
                    deploy_result::FAILED,
                    format!("setting the system profile to {desired} failed: {tail}"),
                )
                .await;
                return Ok(None);
            }
            code => {
                let code = code.map_or("no exit status".into(), |c| format!("exit status {c}"));
                let rolled = self.roll_back(session, watchdog.as_ref()).await;
                self.failed(
                    status,
                    deploy_result::FAILED,
                    format!(
                        "switch-to-configuration {} of {desired} failed ({code}): {tail}; {rolled}",
                        self.nixos.action.as_arg()
                    ),
                )
                .await;
                return Ok(None);
            }
        };
        tracing::info!(machine = %self.machine.name_any(), closure = %desired, seconds = started.elapsed().as_secs_f64(), "activated");
        self.after_activation(session, status, &record, true).await
    }

    /// Health checks, then the magic-rollback confirmation, then success.
    async fn after_activation(
        &self,
        session: &Session,
        status: &mut MachineStatus,
        record: &DeployRecord,
        fresh: bool,
    ) -> Result<Option<Duration>> {
        let watchdog = self.watchdog(record);
        for (i, check) in self.nixos.health_checks.iter().enumerate() {
            let out = session.exec(&activation::health_script(check)).await.map_err(ssh_error)?;
            if out.status != Some(0) {
                let what = activation::describe_check(check);
                let rolled = self.roll_back(session, watchdog.as_ref()).await;
                Conditions::new(&mut status.conditions, self.generation).set(
                    conditions::HEALTHY,
                    false,
                    "HealthCheckFailed",
                    format!("spec.nixos.healthChecks[{i}] ({what}) failed"),
                );
                self.failed(
                    status,
                    deploy_result::ROLLED_BACK,
                    format!(
                        "health check spec.nixos.healthChecks[{i}] ({what}) failed after activating {}: {}; {rolled}",
                        record.closure,
                        output_tail(&out.stdout, &out.stderr)
                    ),
                )
                .await;
                return Ok(None);
            }
        }
        if !self.nixos.health_checks.is_empty() {
            Conditions::new(&mut status.conditions, self.generation).set(
                conditions::HEALTHY,
                true,
                "HealthChecksPassed",
                format!("{} health check(s) passed", self.nixos.health_checks.len()),
            );
        }
        if let Some(w) = &watchdog {
            match self.confirm(w).await {
                Confirmation::Confirmed => {}
                Confirmation::RolledBack(note) => {
                    self.failed(
                        status,
                        deploy_result::ROLLED_BACK,
                        format!(
                            "the machine rolled back by itself (magic rollback): {note}. A configuration that breaks SSH access cannot be confirmed; \
                             fix it or set spec.nixos.rollback.magic to false"
                        ),
                    )
                    .await;
                    return Ok(None);
                }
                Confirmation::Unreachable(message) => {
                    self.failed(status, deploy_result::FAILED, message).await;
                    return Ok(None);
                }
            }
        }
        let state = self.probe(session).await?;
        let mut record = record.clone();
        record.result = Some(deploy_result::SUCCEEDED.into());
        record.finished_at = Some(Time(Timestamp::now()));
        self.ctx.metrics.deployments.with_label_values(&[deploy_result::SUCCEEDED]).inc();
        status.last_deploy = Some(record.clone());
        self.running(status, &state, &record.closure);
        if fresh {
            let seconds = record
                .started_at
                .as_ref()
                .map(|t| (Timestamp::now().as_millisecond() - t.0.as_millisecond()) as f64 / 1000.0)
                .unwrap_or_default();
            self.event(
                EventType::Normal,
                "Deployed",
                format!(
                    "activated {} ({}) with {} paths ({}) copied in {seconds:.1} s",
                    record.closure,
                    self.nixos.action.as_arg(),
                    record.paths_copied,
                    mib(record.bytes_copied as u64)
                ),
            )
            .await;
        }
        Ok(None)
    }

    /// The watchdog of a deployment with magic rollback, named after the
    /// Machine and the deployment's start, so a restarted operator finds it.
    fn watchdog(&self, record: &DeployRecord) -> Option<Watchdog> {
        let rollback = self.nixos.rollback.clone().unwrap_or_default();
        if !rollback.magic || self.nixos.action == ActivationAction::DryActivate {
            return None;
        }
        let uid = self.machine.uid().unwrap_or_default();
        let started = record.started_at.as_ref().map(|t| t.0.as_second()).unwrap_or_default();
        Some(Watchdog {
            token: format!(
                "{}-{started}",
                uid.chars().filter(char::is_ascii_alphanumeric).take(12).collect::<String>()
            ),
            timeout_seconds: rollback.confirm_timeout_seconds.max(1) as u32,
        })
    }

    /// Confirms over a new connection, proving the new system still lets the
    /// operator in; on failure waits for the watchdog and reads its verdict.
    async fn confirm(&self, watchdog: &Watchdog) -> Confirmation {
        // Past the watchdog's timeout the machine is rolling back; keep
        // asking until it says it is done, so what is reported is what runs.
        let deadline =
            Instant::now() + Duration::from_secs(watchdog.timeout_seconds.into()) + WATCHDOG_GRACE + ROLLBACK_WAIT;
        let mut last_error = String::new();
        loop {
            match self.connect().await {
                Ok(session) => {
                    let out = session.exec(&activation::confirm_script(&watchdog.token)).await;
                    session.close().await;
                    match out {
                        Ok(out) if out.status == Some(0) => return Confirmation::Confirmed,
                        Ok(out) if out.status == Some(activation::EXIT_ALREADY_DECIDED) => {
                            let note = String::from_utf8_lossy(&out.stdout).trim().to_owned();
                            return Confirmation::RolledBack(format!(
                                "{note} (the operator could not confirm over a new connection: {last_error})"
                            ));
                        }
                        Ok(out) if out.status == Some(activation::EXIT_ROLLING_BACK) => {
                            last_error = "the machine is rolling back".into();
                        }
                        Ok(out) => last_error = output_tail(&out.stdout, &out.stderr),
                        Err(err) => last_error = err.to_string(),
                    }
                }
                Err(err) => last_error = err.to_string(),
            }
            if Instant::now() >= deadline {
                return Confirmation::Unreachable(format!(
                    "after activating {} the machine neither let the operator confirm nor reported a rollback \
                     within {} s: {last_error}",
                    self.nixos.closure,
                    (Duration::from_secs(watchdog.timeout_seconds.into()) + WATCHDOG_GRACE + ROLLBACK_WAIT).as_secs()
                ));
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// Rolls back after a failure; returns a note for the message.
    async fn roll_back(&self, session: &Session, watchdog: Option<&Watchdog>) -> String {
        let script = activation::rollback_script(self.nixos.action, watchdog.map(|w| w.token.as_str()));
        match session.exec(&script).await {
            Ok(out) if out.status == Some(0) => "rolled back to the previous generation".into(),
            Ok(out) if out.status == Some(activation::EXIT_ALREADY_DECIDED) => {
                "the machine had already rolled back by itself".into()
            }
            Ok(out) if out.status == Some(activation::EXIT_NO_PREVIOUS) => {
                "there is no previous generation to roll back to".into()
            }
            Ok(out) => format!("rolling back failed too: {}", output_tail(&out.stdout, &out.stderr)),
            Err(err) => format!("rolling back failed too: {err}"),
        }
    }

    /// Records a failed deployment: Stalled until the spec changes.
    async fn failed(&self, status: &mut MachineStatus, result: &str, message: String) {
        let mut record = status.last_deploy.clone().unwrap_or_default();
        record.closure = self.nixos.closure.clone();
        record.result = Some(result.to_owned());
        record.finished_at = Some(Time(Timestamp::now()));
        record.message = Some(message.clone());
        record.spec_generation = self.generation;
        self.ctx.metrics.deployments.with_label_values(&[result]).inc();
        status.last_deploy = Some(record);
        status.phase = Some(MachinePhase::Failed);
        Conditions::new(&mut status.conditions, self.generation)
            .set(conditions::DEPLOYED, false, result, message.clone())
            .stalled(result, format!("{message}; change spec.nixos.closure (or any other spec field) to try again"));
        // Written now, while this machine still holds its rollout slot, so
        // the next machine of the rollout sees the failure.
        if let Err(err) = write_status(&self.api, self.machine, status.clone(), self.ctx).await {
            tracing::warn!(error = %err, "recording a failed deployment");
        }
        self.event(EventType::Warning, result, message).await;
    }

    /// The machine runs the desired closure.
    fn running(&self, status: &mut MachineStatus, state: &NodeState, desired: &str) {
        let active = state.active_for(self.nixos.action).map(str::to_owned);
        status.closure = active.clone().or_else(|| Some(desired.to_owned()));
        status.closure_short = status.closure.as_deref().and_then(|c| StorePath::parse(c).ok()).map(|p| p.short());
        status.generation = state.generation;
        status.phase = Some(MachinePhase::Running);
        Conditions::new(&mut status.conditions, self.generation)
            .set(
                conditions::DEPLOYED,
                true,
                "Deployed",
                format!("{desired} is deployed ({})", self.nixos.action.as_arg()),
            )
            .set(conditions::IN_SYNC, true, "InSync", "the active system is spec.nixos.closure")
            .ready("Deployed", format!("running {desired}"));
    }

    async fn path_source(&self) -> Result<PathSource> {
        let source = self.nixos.source.clone().unwrap_or_default();
        if let Some(cache) = &source.binary_cache {
            let s3 = if cache.url.starts_with("s3://") {
                if self.network.spec.provider.as_ref().is_none_or(|p| p.ec2.is_none()) {
                    return Err(Error::stalled(
                        "InvalidBinaryCache",
                        format!(
                            "spec.nixos.source.binaryCache.url is an s3:// cache, which is read with the Network's AWS account, \
                             but Network {} has no spec.provider.ec2; use a Network with an AWS account or an http(s):// URL",
                            self.network.name_any()
                        ),
                    ));
                }
                Some(self.ctx.aws.for_network(self.network).await?.s3.clone())
            } else {
                None
            };
            let source = BinaryCacheSource::new(&cache.url, &cache.public_keys, s3)
                .map_err(|e| Error::stalled("InvalidBinaryCache", format!("spec.nixos.source.binaryCache: {e}")))?;
            return Ok(PathSource::Cache(Arc::new(source)));
        }
        let root = source.local_store.and_then(|l| l.root).unwrap_or_else(|| "/nix".into());
        Ok(PathSource::Local(LocalStore::new(root)))
    }

    /// Streams the missing paths, writing progress to the Machine meanwhile.
    async fn push(
        &self,
        session: &Session,
        status: &MachineStatus,
        record: &DeployRecord,
        source: &PathSource,
        missing: &[PathInfo],
        compress: bool,
    ) -> Result<PushStats> {
        let (tx, rx) = watch::channel(Progress::default());
        let reporter = self.report_progress(status.clone(), record.clone(), rx);
        let records = &self.ctx.deployments.records;
        // The sender is dropped when the push ends, which ends the reporter.
        let pushed = async move {
            let progress = |p: Progress| {
                let _ = tx.send(p);
            };
            push::import(session, source, missing, compress, records, &progress).await
        };
        let (pushed, ()) = tokio::join!(pushed, reporter);
        pushed.map_err(push_error)
    }

    /// Writes push progress to status.lastDeploy and the Reconciling message
    /// every few seconds until the push ends.
    async fn report_progress(
        &self,
        mut status: MachineStatus,
        mut record: DeployRecord,
        mut rx: watch::Receiver<Progress>,
    ) {
        let mut last_write = Instant::now();
        loop {
            let changed = tokio::time::timeout(PROGRESS_INTERVAL, rx.changed()).await;
            if matches!(changed, Ok(Err(_))) {
                return;
            }
            if last_write.elapsed() < PROGRESS_INTERVAL {
                continue;
            }
            let p = *rx.borrow_and_update();
            record.paths_copied = p.paths_done as i64;
            record.bytes_copied = p.bytes_done as i64;
            record.paths_total = p.paths_total as i64;
            record.bytes_total = p.bytes_total as i64;
            status.last_deploy = Some(record.clone());
            Conditions::new(&mut status.conditions, self.generation).reconciling(
                "Pushing",
                format!(
                    "pushing {}: {}/{} paths, {} of {}",
                    record.closure,
                    p.paths_done,
                    p.paths_total,
                    mib(p.bytes_done),
                    mib(p.bytes_total)
                ),
            );
            if let Err(err) = write_status(&self.api, self.machine, status.clone(), self.ctx).await {
                tracing::debug!(error = %err, "writing push progress");
            }
            last_write = Instant::now();
        }
    }

    /// Makes the machine fetch the closure from the binary cache itself.
    async fn substitute(&self, session: &Session, desired: &StorePath, missing: &[PathInfo]) -> Result<PushStats> {
        let cache = self.nixos.source.as_ref().and_then(|s| s.binary_cache.as_ref()).ok_or_else(|| {
            Error::stalled("NoBinaryCache", "spec.nixos.delivery Substitute needs spec.nixos.source.binaryCache")
        })?;
        if missing.is_empty() {
            return Ok(PushStats::default());
        }
        let q = activation::shell_quote;
        let script = format!(
            "nix-store --realise {} --option substituters {} --option trusted-public-keys {} --option require-sigs true >/dev/null",
            q(&desired.to_string()),
            q(&cache.url),
            q(&cache.public_keys.join(" "))
        );
        let out = session.exec(&script).await.map_err(ssh_error)?;
        if out.status != Some(0) {
            return Err(ProviderError::Transient(format!(
                "the machine could not substitute {desired} from {}: {}",
                cache.url,
                output_tail(&out.stdout, &out.stderr)
            ))
            .into());
        }
        Ok(PushStats {
            paths: missing.len() as u64,
            nar_bytes: missing.iter().map(|i| i.nar_size).sum(),
            wire_bytes: 0,
        })
    }
}

enum Confirmation {
    Confirmed,
    /// The watchdog rolled back; its note.
    RolledBack(String),
    /// Neither happened in time.
    Unreachable(String),
}

/// Whether a Machine's last deployment of its current closure failed.
pub fn deploy_failed(machine: &Machine) -> bool {
    let (Some(nixos), Some(last)) = (&machine.spec.nixos, machine.status.as_ref().and_then(|s| s.last_deploy.as_ref()))
    else {
        return false;
    };
    is_failure_of(last, &nixos.closure, machine.metadata.generation)
}

/// Whether `last` is a failed deployment of `closure` at spec `generation`,
/// which is not tried again until the spec changes.
fn is_failure_of(last: &DeployRecord, closure: &str, generation: Option<i64>) -> bool {
    last.closure == closure
        && last.spec_generation == generation
        && matches!(last.result.as_deref(), Some(deploy_result::FAILED | deploy_result::ROLLED_BACK))
}

/// Whether a Machine runs its desired closure.
pub fn is_up_to_date(machine: &Machine) -> bool {
    let Some(nixos) = &machine.spec.nixos else { return true };
    machine.status.as_ref().is_some_and(|s| {
        s.closure.as_deref() == Some(nixos.closure.as_str())
            && s.last_deploy.as_ref().is_some_and(|l| l.result.as_deref() == Some(deploy_result::SUCCEEDED))
    })
}

fn ssh_error(err: SshError) -> Error {
    match err {
        SshError::HostKeyMismatch { .. } => {
            Error::stalled("HostKeyMismatch", format!("{err}; no work is done on this machine"))
        }
        SshError::AuthRejected { .. } => Error::stalled("AuthRejected", err.to_string()),
        other => ProviderError::Transient(other.to_string()).into(),
    }
}

/// Errors reading the closure: bad or untrusted input needs a spec change.
fn source_error(err: PushError) -> Error {
    use crate::nix::cache::CacheError;
    use crate::nix::local_store::LocalStoreError;
    match &err {
        PushError::Cache(CacheError::Signature { .. }) => Error::stalled("UntrustedClosure", err.to_string()),
        PushError::Cache(CacheError::NotFound { .. }) | PushError::Local(LocalStoreError::NotValid { .. }) => {
            Error::stalled("ClosureNotFound", format!("spec.nixos.closure: {err}"))
        }
        PushError::Cache(CacheError::Corrupt { .. }) => Error::stalled("CorruptClosure", err.to_string()),
        _ => push_error(err),
    }
}

fn push_error(err: PushError) -> Error {
    match err {
        PushError::Serve(crate::nix::serve::ServeError::Ssh(ssh)) => ssh_error(ssh),
        other => ProviderError::Transient(format!("pushing: {other}")).into(),
    }
}

/// The last lines of a command's output, for messages.
fn output_tail(stdout: &[u8], stderr: &[u8]) -> String {
    let text = format!("{}{}", String::from_utf8_lossy(stdout), String::from_utf8_lossy(stderr));
    let text = text.trim();
    let start = text.char_indices().rev().nth(499).map_or(0, |(i, _)| i);
    if text.is_empty() { "no output".into() } else { text[start..].replace('\n', " | ") }
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}
