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
    ActivationAction, Delivery, DeployRecord, MachinePhase, MachineStatus, NixosSpec, deploy_result,
};
use crate::api::{Machine, Network};
use crate::fault;
use crate::nix::activation::{self, Activation, ActivationFacts, NodeState, RollbackCause};
use crate::nix::cache::BinaryCacheSource;
use crate::nix::keys::{self, KeyFile};
use crate::nix::local_store::LocalStore;
use crate::nix::push::{self, PathSource, Progress, PushError, PushStats, RecordCache, Survey};
use crate::nix::{PathInfo, StorePath};
use crate::provider::ProviderError;
use crate::ssh::{HostKey, Session, SshError};
use plan::{Desired, Plan, Settle, Verdict};

/// Machine condition types set by deployments.
pub mod plan;

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
/// Extra time given to a machine's watchdog beyond its window before the
/// operator reads what it did.
const WATCHDOG_GRACE: Duration = Duration::from_secs(3);
/// How soon a Machine waiting for a rollout slot looks again.
const ROLLOUT_RECHECK: Duration = Duration::from_secs(3);

/// State shared by all deployments of one operator.
pub struct Deployments {
    /// Path records shared by concurrent pushes of the same paths.
    pub records: RecordCache,
    /// SSH sessions kept for the next look at their machine.
    pub sessions: KeptSessions,
    /// Per Network ("namespace/name"): its maxUnavailable and the slots.
    rollouts: Mutex<HashMap<String, (i32, Arc<Semaphore>)>>,
    /// Per Network ("namespace/name"): its members whose deployment failed
    /// while holding a rollout slot, with their spec generation then. The
    /// failure is written to the Machine before the slot is released, but
    /// the store the next machine checks may not have it yet; this does.
    failures: Mutex<HashMap<String, HashMap<String, Option<i64>>>>,
}

impl Deployments {
    pub fn new(record_cache_bytes: u64, keep_sessions: Duration) -> Self {
        Self {
            records: RecordCache::new(record_cache_bytes),
            sessions: KeptSessions::new(keep_sessions),
            rollouts: Mutex::default(),
            failures: Mutex::default(),
        }
    }

    fn record_failure(&self, network: &Network, machine: &str, generation: Option<i64>) {
        let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        failures.entry(super::object_key(network)).or_default().insert(machine.to_owned(), generation);
    }

    /// The members of `network` that failed to deploy, other than `this`:
    /// those `members` (from the store) shows failed, and those this process
    /// saw fail at the generation the store still shows for them (the store
    /// may lag the failure's write). A record outlives neither a spec change
    /// nor the machine.
    fn failed_members<M: std::ops::Deref<Target = Machine>>(
        &self,
        network: &Network,
        members: &[M],
        this: &str,
    ) -> Vec<String> {
        let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        let recorded = failures.entry(super::object_key(network)).or_default();
        recorded.retain(|name, generation| {
            members.iter().any(|m| m.name_any() == *name && m.metadata.generation == *generation)
        });
        members
            .iter()
            .filter(|m| m.name_any() != this)
            .filter(|m| deploy_failed(m) || recorded.contains_key(&m.name_any()))
            .map(|m| m.name_any())
            .collect()
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

/// At most this many sessions are kept; the oldest logins go first.
const MAX_KEPT_SESSIONS: usize = 1024;

/// SSH sessions kept between looks at a machine, as NixOps kept an SSH
/// ControlMaster: a deployment that follows a resync starts on the session
/// that resync used instead of a new login (six round trips, the most of
/// an incremental deploy over a slow link). A session is kept only after a
/// look that activated nothing, since a new system must prove it accepts
/// new logins; only for `max_age` after its login, so every machine proves
/// that again at least that often; never through a jump host; and only
/// for exactly the target it logged in to (address, user, key, pinned
/// host key).
pub struct KeptSessions {
    max_age: Duration,
    /// Per Machine UID.
    kept: Mutex<HashMap<String, Kept>>,
}

struct Kept {
    /// What the session logged in to; another target gets a new login.
    target: String,
    login: Instant,
    session: Session,
}

impl KeptSessions {
    fn new(max_age: Duration) -> Self {
        Self { max_age, kept: Mutex::default() }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Kept>> {
        self.kept.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The session kept for `uid`, if it is to `target`, young enough and
    /// still connected; with the time of its login.
    fn take(&self, uid: &str, target: &str) -> Option<(Session, Instant)> {
        let kept = self.lock().remove(uid)?;
        (kept.target == target && kept.login.elapsed() < self.max_age && !kept.session.is_closed())
            .then_some((kept.session, kept.login))
    }

    /// Keeps `session` (logged in at `login`) for the next look at `uid`.
    fn keep(&self, uid: &str, target: String, session: Session, login: Instant) {
        if login.elapsed() >= self.max_age || session.is_closed() {
            return;
        }
        let mut kept = self.lock();
        if kept.len() >= MAX_KEPT_SESSIONS
            && let Some(oldest) = kept.iter().min_by_key(|(_, k)| k.login).map(|(uid, _)| uid.clone())
        {
            kept.remove(&oldest);
        }
        kept.insert(uid.to_owned(), Kept { target, login, session });
    }

    /// Lets go of the session kept for a Machine that is going away.
    pub fn forget(&self, uid: &str) {
        self.lock().remove(uid);
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
    /// How soon the Network's membership wants another look (mesh peers
    /// without a handshake yet).
    membership_recheck: Mutex<Option<Duration>>,
    /// Where the closure comes from when the spec does not say (a builder's store).
    source: Option<PathSource>,
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
    source: Option<PathSource>,
) -> Result<Option<Duration>> {
    let Some(nixos) = &machine.spec.nixos else { return Ok(None) };
    let run = Run::new(machine, network, ctx, target, nixos, source);
    let requeue = run.reconcile(status).await?;
    let recheck = *run.membership_recheck.lock().unwrap_or_else(|e| e.into_inner());
    Ok(match (requeue, recheck) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    })
}

impl<'a> Run<'a> {
    fn new(
        machine: &'a Machine,
        network: &'a Network,
        ctx: &'a Context,
        target: &'a Target,
        nixos: &'a NixosSpec,
        source: Option<PathSource>,
    ) -> Self {
        Run {
            machine,
            network,
            ctx,
            api: Api::namespaced(ctx.client.clone(), &machine.namespace().unwrap_or_default()),
            nixos,
            target,
            generation: machine.metadata.generation,
            membership_recheck: Mutex::default(),
            source,
        }
    }
}

impl Run<'_> {
    fn desired(&self) -> Desired<'_> {
        Desired {
            closure: &self.nixos.closure,
            action: self.nixos.action,
            drift: self.nixos.drift,
            generation: self.generation,
        }
    }

    async fn reconcile(&self, status: &mut MachineStatus) -> Result<Option<Duration>> {
        let desired = self.nixos.closure.clone();
        let desired_path = StorePath::parse(&desired)
            .map_err(|e| Error::stalled("InvalidClosure", format!("spec.nixos.closure: {e}")))?;

        // A closure that failed at this generation is not tried again until
        // the spec changes; the machine is left on what it runs.
        if let Some(Plan::FailedAtThisGeneration { reason, message }) =
            plan::failed_at_this_generation(&self.desired(), status.last_deploy.as_ref())
        {
            status.phase = Some(MachinePhase::Failed);
            Conditions::new(&mut status.conditions, self.generation).stalled(
                &reason,
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

        let uid = self.machine.uid().unwrap_or_default();
        let target = self.target_id();
        let kept = target.as_deref().and_then(|t| self.ctx.deployments.sessions.take(&uid, t));
        let (session, login) = match kept {
            Some(kept) => kept,
            None => (self.connect().await?, Instant::now()),
        };
        let before = status.last_deploy.clone();
        let outcome = self.reconcile_on(&session, status, &desired_path).await;
        match target {
            Some(target) if outcome.is_ok() && status.last_deploy == before => {
                self.ctx.deployments.sessions.keep(&uid, target, session, login);
            }
            _ => session.close().await,
        }
        outcome
    }

    /// What a session logs in to, for keeping it: None through a jump host
    /// (whose own session is new for every look).
    fn target_id(&self) -> Option<String> {
        let t = self.target;
        if t.via.is_some() {
            return None;
        }
        let key = t.key.public_key().fingerprint(russh::keys::HashAlg::Sha256);
        Some(format!("{}@{}:{} key {key} host {}", t.user, t.host, t.port, t.host_key))
    }

    async fn reconcile_on(
        &self,
        session: &Session,
        status: &mut MachineStatus,
        desired_path: &StorePath,
    ) -> Result<Option<Duration>> {
        let desired = desired_path.to_string();
        // The machine's state, its keys and, when a deployment is likely,
        // which paths of the closure it has: asked at once, one wait instead
        // of three over a slow link.
        let likely = plan::deploy_likely(&self.desired(), status.last_deploy.as_ref());
        let surveying = async { if likely { Some(self.survey(session, desired_path).await) } else { None } };
        // The Network's membership (and mesh) is published before anything is activated.
        let mut conditions = status.conditions.clone();
        let publishing = super::mesh::publish(session, self.machine, self.ctx, &mut conditions);
        let (state, keys, survey, published) =
            tokio::join!(self.probe(session), self.sync_keys(session, status), surveying, publishing);
        super::mesh::carry_conditions(&conditions, &mut status.conditions);
        let keys = keys.and_then(|()| {
            *self.membership_recheck.lock().unwrap_or_else(|e| e.into_inner()) = published?;
            Ok(())
        });
        let state = match state.and_then(|state| keys.map(|()| state)) {
            Ok(state) => state,
            Err(err) => {
                release(survey).await;
                return Err(err);
            }
        };

        let plan = plan::plan(&self.desired(), status.last_deploy.as_ref(), &state);
        let survey = if matches!(plan, Plan::Deploy { .. }) {
            survey
        } else {
            release(survey).await;
            None
        };
        match plan {
            Plan::FailedAtThisGeneration { .. } => Ok(None),
            Plan::Settle => {
                let record = status.last_deploy.clone().unwrap_or_default();
                let requeue = self.settle(session, status, &record, false).await?;
                // An older closure's activation is settled; the desired one is next.
                Ok(if record.closure != desired && requeue.is_none() { Some(Duration::ZERO) } else { requeue })
            }
            Plan::InSync => {
                self.running(status, &state, &desired);
                Ok(None)
            }
            Plan::ReportDrift { found } => {
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
                Ok(None)
            }
            Plan::Deploy { correcting } => {
                if let Some(found) = correcting {
                    self.event(
                        EventType::Warning,
                        "CorrectingDrift",
                        format!("the machine runs {found} instead of {desired}; activating {desired} again"),
                    )
                    .await;
                }
                let _slot = match self.rollout_slot(status).await {
                    Ok(Some(slot)) => slot,
                    other => {
                        release(survey).await;
                        return other.map(|_| Some(ROLLOUT_RECHECK));
                    }
                };
                self.deploy(session, status, &state, desired_path, survey).await
            }
        }
    }

    async fn connect(&self) -> Result<Session> {
        connect(self.ctx, self.target, self.ctx.settings.ssh_timeout).await.map_err(ssh_error)
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

    /// Takes one of the Network's rollout slots (spec.rollout), after
    /// checking that no other member's deployment has failed. `None` when
    /// all slots are taken: the Machine says so and looks again shortly,
    /// without holding a worker while it waits.
    async fn rollout_slot(&self, status: &mut MachineStatus) -> Result<Option<Option<OwnedSemaphorePermit>>> {
        let Some(rollout) = &self.network.spec.rollout else { return Ok(Some(None)) };
        self.check_rollout_not_halted().await?;
        let slots = self.ctx.deployments.rollout_slots(self.network, rollout.max_unavailable);
        let Ok(permit) = slots.try_acquire_owned() else {
            let message = format!(
                "waiting for a rollout slot: Network {} deploys at most {} machine(s) at a time (spec.rollout.maxUnavailable)",
                self.network.name_any(),
                rollout.max_unavailable
            );
            Conditions::new(&mut status.conditions, self.generation).reconciling("RolloutWaiting", message);
            return Ok(None);
        };
        Ok(Some(Some(permit)))
    }

    /// Reads the members from the shared store; what it may not have yet
    /// (a failure written just before the slot was released) comes from
    /// [`Deployments::failed_members`], so a lagging store cannot let the
    /// next machine deploy past a failure.
    async fn check_rollout_not_halted(&self) -> Result<()> {
        let ns = self.machine.namespace().unwrap_or_default();
        let network = self.network.name_any();
        let members = self.ctx.stores.members(&ns, &network).await?;
        let failed = self.ctx.deployments.failed_members(self.network, &members, &self.machine.name_any());
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

    /// The closure's source, and which of its paths the machine lacks.
    async fn survey(&self, session: &Session, desired: &StorePath) -> Result<Surveyed> {
        let source = self.path_source().await?;
        let survey = push::survey(session, &source, desired).await.map_err(source_error)?;
        Ok((source, survey))
    }

    /// Pushes (or substitutes) the closure and activates it; `survey` is
    /// what the machine was found to lack, if that was asked already.
    async fn deploy(
        &self,
        session: &Session,
        status: &mut MachineStatus,
        state: &NodeState,
        desired: &StorePath,
        survey: Option<Result<Surveyed>>,
    ) -> Result<Option<Duration>> {
        let mut record = DeployRecord {
            closure: desired.to_string(),
            previous_closure: state.active_for(self.nixos.action).map(str::to_owned),
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

        let (source, mut survey) = match survey {
            Some(survey) => survey?,
            None => self.survey(session, desired).await?,
        };
        record.paths_total = survey.missing.len() as i64;
        record.bytes_total = survey.missing.iter().map(|i| i.nar_size as i64).sum();
        let stats = match self.nixos.delivery {
            Delivery::Push => self.push(session, &mut survey, status, &record, &source, state.has_zstd).await?,
            Delivery::Substitute => self.substitute(session, desired, &survey.missing).await?,
        };
        self.ctx.metrics.pushed(stats.paths, stats.nar_bytes, stats.wire_bytes);
        record.paths_copied = stats.paths as i64;
        record.bytes_copied = stats.nar_bytes as i64;
        fault::point(fault::points::DEPLOY_AFTER_PUSH, Some(session)).await;

        // Recorded before the machine is touched: whatever happens next, the
        // next look settles this activation from the machine's own facts.
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
        // The serve connection kept the copied paths from garbage collection;
        // the profile refers to them once the activation has started.
        let started = self.start_activation(session, &record).await;
        survey.serve.release().await;
        started?;
        self.settle(session, status, &record, true).await
    }

    /// The activation of `record`'s closure, named after the Machine and the
    /// deployment's start, so a restarted operator finds it on the machine.
    fn activation(&self, record: &DeployRecord) -> Activation {
        let rollback = self.nixos.rollback.clone().unwrap_or_default();
        let magic = rollback.magic && self.nixos.action != ActivationAction::DryActivate;
        let uid = self.machine.uid().unwrap_or_default();
        let started = record.started_at.as_ref().map(|t| t.0.as_second()).unwrap_or_default();
        // The closure too: a deployment can start within the second the last
        // one (of another closure) started, and must not be taken for it.
        let closure = record.closure.strip_prefix("/nix/store/").unwrap_or_default();
        Activation {
            token: format!(
                "{}-{started}-{}",
                uid.chars().filter(char::is_ascii_alphanumeric).take(12).collect::<String>(),
                closure.chars().filter(char::is_ascii_alphanumeric).take(8).collect::<String>()
            ),
            closure: record.closure.clone(),
            action: self.nixos.action,
            timeout_seconds: self.nixos.activation_timeout_seconds.max(1) as u32,
            confirm_seconds: magic.then(|| rollback.confirm_timeout_seconds.max(1) as u32),
        }
    }

    async fn start_activation(&self, session: &Session, record: &DeployRecord) -> Result<()> {
        let out = session.exec(&self.activation(record).start_script()).await.map_err(ssh_error)?;
        if out.status != Some(0) {
            return Err(ProviderError::Transient(format!(
                "starting the activation of {} failed: {}",
                record.closure,
                output_tail(&out.stdout, &out.stderr)
            ))
            .into());
        }
        fault::point(fault::points::DEPLOY_AFTER_START, Some(session)).await;
        Ok(())
    }

    /// Brings an activation to its end from the facts the machine keeps:
    /// waits for the switch, rolls back a failed one, runs the health checks
    /// and confirms a good one, and records the verdict. A lost connection
    /// is an error to retry, never a verdict.
    async fn settle(
        &self,
        session: &Session,
        status: &mut MachineStatus,
        record: &DeployRecord,
        fresh: bool,
    ) -> Result<Option<Duration>> {
        let activation = self.activation(record);
        let wait = activation.timeout_seconds + 5;
        let mut facts = self.facts(session, &activation, wait).await?;
        loop {
            match plan::settle(&facts, &record.closure, activation.action, activation.timeout_seconds) {
                Settle::Start => {
                    self.event(
                        EventType::Normal,
                        "ActivationRestarted",
                        format!(
                            "the machine has no record of activating {} (never started, or rebooted); starting it",
                            record.closure
                        ),
                    )
                    .await;
                    self.start_activation(session, record).await?;
                    facts = self.facts(session, &activation, wait).await?;
                }
                Settle::Wait => {
                    Conditions::new(&mut status.conditions, self.generation).reconciling(
                        "Activating",
                        format!(
                            "switch-to-configuration of {} (or a rollback) is still running on the machine",
                            record.closure
                        ),
                    );
                    return Ok(Some(Duration::from_secs(2)));
                }
                Settle::RollBack(reason) => {
                    let out = session
                        .exec(&activation.rollback_script(RollbackCause::SwitchFailed, &reason))
                        .await
                        .map_err(ssh_error)?;
                    facts = activation::parse_facts(&String::from_utf8_lossy(&out.stdout));
                    if facts.outcome.is_none() {
                        return Err(ProviderError::Transient(format!(
                            "rolling back after \"{reason}\" left no outcome on the machine: {}",
                            output_tail(&out.stdout, &out.stderr)
                        ))
                        .into());
                    }
                }
                Settle::Verify { reboot_required } => {
                    let mut conds = Conditions::new(&mut status.conditions, self.generation);
                    if reboot_required {
                        conds.set(
                            conditions::REBOOT_REQUIRED,
                            true,
                            "RebootRequired",
                            format!(
                                "{} is active but needs a reboot to take full effect (switch-to-configuration exited 100)",
                                record.closure
                            ),
                        );
                    } else {
                        conds.remove(conditions::REBOOT_REQUIRED);
                    }
                    fault::point(fault::points::DEPLOY_BEFORE_HEALTH_CHECKS, Some(session)).await;
                    facts = match self.health_checks(session, status).await? {
                        Some(failure) => {
                            let out = session
                                .exec(&activation.rollback_script(RollbackCause::Unhealthy, &failure))
                                .await
                                .map_err(ssh_error)?;
                            activation::parse_facts(&String::from_utf8_lossy(&out.stdout))
                        }
                        None => {
                            fault::point(fault::points::DEPLOY_BEFORE_CONFIRM, Some(session)).await;
                            match self.confirm(session, &activation).await? {
                                Some(facts) => facts,
                                None => return Ok(Some(Duration::from_secs(2))),
                            }
                        }
                    };
                }
                Settle::Done(verdict) => return self.record_verdict(session, status, record, verdict, fresh).await,
            }
        }
    }

    /// What the machine keeps about `activation`, waiting up to `seconds`
    /// for a running switch to end.
    async fn facts(&self, session: &Session, activation: &Activation, seconds: u32) -> Result<ActivationFacts> {
        let script = activation.facts_script(seconds);
        let out = tokio::time::timeout(Duration::from_secs(u64::from(seconds) + 30), session.exec(&script))
            .await
            .map_err(|_| ProviderError::Transient(format!("the machine did not answer within {} s", seconds + 30)))?
            .map_err(ssh_error)?;
        Ok(activation::parse_facts(&String::from_utf8_lossy(&out.stdout)))
    }

    /// Runs spec.nixos.healthChecks; the first failure, described, or None.
    /// A connection lost during a check is an error, not a failed check.
    async fn health_checks(&self, session: &Session, status: &mut MachineStatus) -> Result<Option<String>> {
        for (i, check) in self.nixos.health_checks.iter().enumerate() {
            let limit = Duration::from_secs(check.timeout_seconds.max(1) as u64 + 15);
            let out = tokio::time::timeout(limit, session.exec(&activation::health_script(check)))
                .await
                .map_err(|_| {
                    ProviderError::Transient(format!(
                        "spec.nixos.healthChecks[{i}] got no answer from the machine within {} s",
                        limit.as_secs()
                    ))
                })?
                .map_err(ssh_error)?;
            if out.status != Some(0) {
                let what = activation::describe_check(check);
                Conditions::new(&mut status.conditions, self.generation).set(
                    conditions::HEALTHY,
                    false,
                    "HealthCheckFailed",
                    format!("spec.nixos.healthChecks[{i}] ({what}) failed"),
                );
                return Ok(Some(format!(
                    "health check spec.nixos.healthChecks[{i}] ({what}) failed after activating {}: {}",
                    self.nixos.closure,
                    output_tail(&out.stdout, &out.stderr)
                )));
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
        Ok(None)
    }

    /// Confirms the activation. With magic rollback, over a new connection
    /// (proving the new system still lets the operator in), retried until
    /// the watchdog's window has passed; then the machine's facts say what
    /// happened. `None`: the machine is still rolling back.
    async fn confirm(&self, session: &Session, activation: &Activation) -> Result<Option<ActivationFacts>> {
        let Some(window) = activation.confirm_seconds else {
            let out = session.exec(&activation.confirm_script()).await.map_err(ssh_error)?;
            if out.status != Some(0) && out.status != Some(activation::EXIT_ALREADY_DECIDED) {
                return Err(ProviderError::Transient(format!(
                    "confirming the activation failed: {}",
                    output_tail(&out.stdout, &out.stderr)
                ))
                .into());
            }
            return self.facts(session, activation, 0).await.map(Some);
        };
        let deadline = Instant::now() + Duration::from_secs(window.into()) + WATCHDOG_GRACE;
        loop {
            if let Ok(fresh) = self.connect().await {
                let out = fresh.exec(&activation.confirm_script()).await;
                fresh.close().await;
                if let Ok(out) = out
                    && out.status != Some(activation::EXIT_ROLLING_BACK)
                {
                    break;
                }
            }
            if Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        // Past the window the watchdog has decided; read the verdict over
        // whichever connection works (the old one may have been cut).
        let facts = match self.facts(session, activation, 0).await {
            Ok(facts) => facts,
            Err(_) => {
                let fresh = self.connect().await?;
                let facts = self.facts(&fresh, activation, 0).await;
                fresh.close().await;
                facts?
            }
        };
        Ok(facts.outcome.is_some().then_some(facts))
    }

    /// Writes the verdict of an activation to status, with its event and metric.
    async fn record_verdict(
        &self,
        session: &Session,
        status: &mut MachineStatus,
        record: &DeployRecord,
        verdict: Verdict,
        fresh: bool,
    ) -> Result<Option<Duration>> {
        match verdict {
            Verdict::Succeeded => {
                let state = self.probe(session).await?;
                let mut record = record.clone();
                record.result = Some(deploy_result::SUCCEEDED.into());
                record.finished_at = Some(Time(Timestamp::now()));
                self.ctx.metrics.deployments.with_label_values(&[deploy_result::SUCCEEDED]).inc();
                status.last_deploy = Some(record.clone());
                if record.closure == self.nixos.closure {
                    self.running(status, &state, &record.closure);
                }
                let seconds = record
                    .started_at
                    .as_ref()
                    .map(|t| (Timestamp::now().as_millisecond() - t.0.as_millisecond()) as f64 / 1000.0)
                    .unwrap_or_default();
                let how = if fresh { "" } else { " (settled after an interruption)" };
                self.event(
                    EventType::Normal,
                    "Deployed",
                    format!(
                        "activated {} ({}) with {} paths ({}) copied in {seconds:.1} s{how}",
                        record.closure,
                        self.nixos.action.as_arg(),
                        record.paths_copied,
                        mib(record.bytes_copied as u64)
                    ),
                )
                .await;
                Ok(None)
            }
            Verdict::RolledBack(cause, note) => {
                let (result, hint) = match cause {
                    // The activation itself failed; the machine is back where it was.
                    RollbackCause::SwitchFailed => (deploy_result::FAILED, ""),
                    RollbackCause::Unhealthy => (deploy_result::ROLLED_BACK, ""),
                    RollbackCause::Unconfirmed => (
                        deploy_result::ROLLED_BACK,
                        ". A configuration that breaks SSH access cannot be confirmed; fix it or set spec.nixos.rollback.magic to false",
                    ),
                };
                self.failed(status, record, result, format!("{note}{hint}")).await;
                Ok(None)
            }
            Verdict::Failed(note) => {
                self.failed(status, record, deploy_result::FAILED, note).await;
                Ok(None)
            }
        }
    }

    /// Records a failed deployment of `record`: Stalled until the spec changes.
    async fn failed(&self, status: &mut MachineStatus, record: &DeployRecord, result: &str, message: String) {
        let mut record = record.clone();
        record.result = Some(result.to_owned());
        record.finished_at = Some(Time(Timestamp::now()));
        record.message = Some(message.clone());
        self.ctx.metrics.deployments.with_label_values(&[result]).inc();
        status.last_deploy = Some(record);
        status.phase = Some(MachinePhase::Failed);
        Conditions::new(&mut status.conditions, self.generation)
            .set(conditions::DEPLOYED, false, result, message.clone())
            .stalled(result, format!("{message}; change spec.nixos.closure (or any other spec field) to try again"));
        // Written now, while this machine still holds its rollout slot, so
        // the next machine of the rollout sees the failure; recorded here
        // too, for a next machine whose store has not seen the write yet.
        if self.network.spec.rollout.is_some() {
            self.ctx.deployments.record_failure(self.network, &self.machine.name_any(), self.generation);
        }
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
        if let Some(source) = &self.source {
            return Ok(source.clone());
        }
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
                .map_err(|e| Error::stalled("InvalidBinaryCache", format!("spec.nixos.source.binaryCache: {e}")))?
                .with_max_nar_bytes(self.ctx.settings.max_nar_bytes);
            return Ok(PathSource::Cache(Arc::new(source)));
        }
        let root = source.local_store.and_then(|l| l.root).unwrap_or_else(|| "/nix".into());
        Ok(PathSource::Local(LocalStore::new(root)))
    }

    /// Streams the missing paths, writing progress to the Machine meanwhile.
    async fn push(
        &self,
        session: &Session,
        survey: &mut Survey,
        status: &MachineStatus,
        record: &DeployRecord,
        source: &PathSource,
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
            push::import(session, &mut survey.serve, source, &survey.missing, compress, records, &progress).await
        };
        let (pushed, ()) = tokio::join!(pushed, reporter);
        pushed.map_err(source_error)
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
        let script = activation::substitute_script(&desired.to_string(), &cache.url, &cache.public_keys);
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

/// Copies `closure` to the machine from the Machine's own source (as a
/// deployment would) and runs its `switch-to-configuration dry-activate`:
/// what activating it would change, with nothing changed (`kubectl nixops
/// deploy --dry-activate`). Returns whether it succeeded and its output.
pub async fn dry_activate(
    machine: &Machine,
    network: &Network,
    ctx: &Context,
    target: &Target,
    session: &Session,
    closure: &str,
) -> Result<(bool, String)> {
    let nixos = machine.spec.nixos.as_ref().ok_or_else(|| {
        Error::stalled("NoNixos", "a dry activation needs spec.nixos (its source and delivery)".to_owned())
    })?;
    let path = StorePath::parse(closure)
        .map_err(|e| Error::stalled("InvalidClosure", format!("the closure to dry-activate: {e}")))?;
    let run = Run::new(machine, network, ctx, target, nixos, None);
    let (source, mut survey) = run.survey(session, &path).await?;
    let copied = match nixos.delivery {
        Delivery::Push => {
            let records = &ctx.deployments.records;
            push::import(session, &mut survey.serve, &source, &survey.missing, false, records, &|_| {})
                .await
                .map_err(source_error)
        }
        Delivery::Substitute => run.substitute(session, &path, &survey.missing).await,
    };
    let out = match copied {
        Ok(_) => {
            let command =
                format!("{} dry-activate", activation::shell_quote(&format!("{path}/bin/switch-to-configuration")));
            session.exec(&command).await.map_err(ssh_error)
        }
        Err(err) => Err(err),
    };
    survey.serve.release().await;
    let out = out?;
    Ok((out.status == Some(0), output_tail(&out.stdout, &out.stderr)))
}

/// A closure's source and what the machine lacks of it.
type Surveyed = (PathSource, Survey);

/// Lets go of a survey that is not used.
async fn release(survey: Option<Result<Surveyed>>) {
    if let Some(Ok((_, survey))) = survey {
        survey.serve.release().await;
    }
}

/// Whether a Machine's last deployment of its current closure failed.
pub fn deploy_failed(machine: &Machine) -> bool {
    let Some(nixos) = &machine.spec.nixos else { return false };
    let Some(closure) = super::build::desired_closure(machine) else { return false };
    let desired =
        Desired { closure, action: nixos.action, drift: nixos.drift, generation: machine.metadata.generation };
    plan::failed_at_this_generation(&desired, machine.status.as_ref().and_then(|s| s.last_deploy.as_ref())).is_some()
}

/// Whether a Machine runs its desired closure.
pub fn is_up_to_date(machine: &Machine) -> bool {
    if machine.spec.nixos.is_none() {
        return true;
    }
    machine.status.as_ref().is_some_and(|s| {
        s.closure.is_some()
            && s.closure.as_deref() == super::build::desired_closure(machine)
            && s.last_deploy.as_ref().is_some_and(|l| l.result.as_deref() == Some(deploy_result::SUCCEEDED))
    })
}

/// Logs in to `t`, counted in the provider-call metrics as every SSH login is.
pub(crate) async fn connect(ctx: &Context, t: &Target, timeout: Duration) -> std::result::Result<Session, SshError> {
    let connected = Session::connect(&t.host, t.port, &t.user, &t.key, &t.host_key, timeout, t.via.clone()).await;
    ctx.metrics.provider_call("ssh", "connect", connected.is_ok());
    connected
}

pub(crate) fn ssh_error(err: SshError) -> Error {
    match err {
        SshError::HostKeyMismatch { .. } => {
            Error::stalled("HostKeyMismatch", format!("{err}; no work is done on this machine"))
        }
        SshError::AuthRejected { .. } => Error::stalled("AuthRejected", err.to_string()),
        SshError::SudoRefused { ref user, .. } => Error::stalled(
            "SudoRefused",
            format!(
                "{err}; give spec.ssh.user ({user}) passwordless sudo on the machine (a NOPASSWD sudoers rule), \
                 or set spec.ssh.user to root"
            ),
        ),
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
        PushError::Cache(CacheError::TooLarge { .. }) => Error::stalled("ClosureTooLarge", err.to_string()),
        _ => push_error(err),
    }
}

/// Errors pushing: the machine's store failing for good (disk full, a
/// hash mismatch) needs a person and stalls; connection trouble is retried.
fn push_error(err: PushError) -> Error {
    use crate::nix::serve::{ServeError, StoreFailure};
    match err {
        PushError::Serve(ServeError::Ssh(ssh)) => ssh_error(ssh),
        PushError::Serve(serve) => match serve.store_failure() {
            Some(StoreFailure::DiskFull) => Error::stalled(
                "MachineDiskFull",
                format!(
                    "pushing: {serve}; free space in the machine's /nix (nix-collect-garbage -d) and the next look retries"
                ),
            ),
            Some(StoreFailure::HashMismatch) => Error::stalled(
                "CorruptClosure",
                format!(
                    "pushing: {serve}; the source's copy of a path does not match its recorded hash: repair the source store or cache"
                ),
            ),
            None => ProviderError::Transient(format!("pushing: {serve}")).into(),
        },
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

#[cfg(test)]
mod tests {
    use super::*;

    const CLOSURE: &str = "/nix/store/00000000000000000000000000000000-nixos-system-a";

    fn member(name: &str, generation: i64, result: Option<&str>) -> Machine {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "nixops.io/v1alpha1", "kind": "Machine",
            "metadata": {"name": name, "namespace": "ns", "generation": generation},
            "spec": {"networkRef": {"name": "net"}, "nixos": {"closure": CLOSURE}},
            "status": {"lastDeploy": {"closure": CLOSURE, "result": result, "specGeneration": generation}}
        }))
        .unwrap()
    }

    fn network() -> Network {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "nixops.io/v1alpha1", "kind": "Network",
            "metadata": {"name": "net", "namespace": "ns"}, "spec": {}
        }))
        .unwrap()
    }

    #[test]
    fn a_failure_counts_before_the_store_shows_it_and_ends_with_a_spec_change() {
        let deployments = Deployments::new(1 << 20, Duration::ZERO);
        let net = network();
        let stored_failed = member("a", 1, Some(deploy_result::FAILED));
        assert_eq!(deployments.failed_members(&net, &[&stored_failed, &member("b", 1, None)], "b"), ["a"]);
        assert!(deployments.failed_members(&net, &[&stored_failed], "a").is_empty(), "a machine does not halt itself");

        // Written and recorded while holding the slot; the store still has the older copy.
        deployments.record_failure(&net, "a", Some(1));
        let lagging = member("a", 1, Some(deploy_result::PUSHING));
        assert_eq!(deployments.failed_members(&net, &[&lagging, &member("b", 1, None)], "b"), ["a"]);

        // A new spec for "a" lets the rollout go on; the record does not come back.
        let respecified = member("a", 2, None);
        assert!(deployments.failed_members(&net, &[&respecified], "b").is_empty());
        assert!(deployments.failed_members(&net, &[&lagging], "b").is_empty());

        // Nor does one for a machine that is gone.
        deployments.record_failure(&net, "c", Some(1));
        assert!(deployments.failed_members::<&Machine>(&net, &[], "b").is_empty());
        assert!(deployments.failed_members(&net, &[&member("c", 1, None)], "b").is_empty());
    }
}
