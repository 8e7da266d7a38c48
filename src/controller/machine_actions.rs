//! Checks and reboots on request (`kubectl nixops check`, `reboot`): the
//! Machine's `nixops.io/check` and `nixops.io/reboot` annotations name a
//! request; the operator carries it out over SSH, records the outcome in
//! status.lastCheck / lastReboot (whose `request` acknowledges it) and
//! publishes an event. So the actions are RBAC-gated (whoever may annotate
//! the Machine may ask) and visible to everyone, as NixOps' were not.
//!
//! A reboot is recorded (Rebooting) before systemd is asked for it, so a
//! restarted operator settles it from the machine's facts instead of asking
//! again: the marker left in /run is gone once the machine has rebooted.

use std::time::{Duration, Instant};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::events::EventType;

use super::deploy::Target;
use super::deploy::conditions::REBOOT_REQUIRED;
use super::status::Conditions;
use super::{Context, Error, Result, write_status};
use crate::api::machine::{
    CHECK_ANNOTATION, CheckRecord, CheckResult, DRY_ACTIVATE_ANNOTATION, DRY_ACTIVATE_CLOSURE_ANNOTATION,
    DryActivationRecord, MachineStatus, REBOOT_ANNOTATION, RebootRecord, RebootResult, SYNC_ANNOTATION, SyncRecord,
};
use crate::api::{Machine, Network};
use crate::fault;
use crate::nix::check::{self, RebootProgress};
use crate::ssh::{Session, SshError};

/// How long a rebooting machine has to come back with its host key.
pub const REBOOT_TIMEOUT: Duration = Duration::from_secs(600);
/// How often a rebooting machine is tried.
const REBOOT_POLL: Duration = Duration::from_secs(1);

/// What the annotations ask for that status has not acknowledged yet.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Requests {
    /// A check to make.
    pub check: Option<String>,
    /// A reboot to start, or (`settle`) one started and not yet settled.
    pub reboot: Option<String>,
    pub settle_reboot: bool,
    /// A dry activation to make.
    pub dry_activate: Option<String>,
    /// A file system sync to run (before a Backup's snapshots).
    pub sync: Option<String>,
}

impl Requests {
    pub fn any(&self) -> bool {
        self.check.is_some() || self.reboot.is_some() || self.dry_activate.is_some() || self.sync.is_some()
    }
}

/// Pure: the requests of `machine` its status does not answer yet.
pub fn pending(machine: &Machine, status: &MachineStatus) -> Requests {
    let annotation = |name: &str| machine.annotations().get(name).filter(|v| !v.is_empty()).cloned();
    let check = annotation(CHECK_ANNOTATION).filter(|r| status.last_check.as_ref().is_none_or(|c| &c.request != r));
    let dry_activate = annotation(DRY_ACTIVATE_ANNOTATION)
        .filter(|r| status.last_dry_activation.as_ref().is_none_or(|d| &d.request != r));
    let sync = annotation(SYNC_ANNOTATION).filter(|r| status.last_sync.as_ref().is_none_or(|d| &d.request != r));
    let mut requests = Requests { check, dry_activate, sync, ..Requests::default() };
    if let Some(request) = annotation(REBOOT_ANNOTATION) {
        match &status.last_reboot {
            Some(last) if last.request == request && last.result == RebootResult::Rebooting => {
                requests.reboot = Some(request);
                requests.settle_reboot = true;
            }
            Some(last) if last.request == request => {}
            _ => requests.reboot = Some(request),
        }
    }
    requests
}

/// Carries out what `machine`'s annotations ask for, recording it in `status`.
pub async fn carry_out(
    machine: &Machine,
    network: &Network,
    ctx: &Context,
    target: &Target,
    status: &mut MachineStatus,
) -> Result<()> {
    let requests = pending(machine, status);
    if !requests.any() {
        return Ok(());
    }
    let action = Action { machine, ctx, target };
    if requests.reboot.is_some() {
        // A reboot under way is recorded in status; a copy of the Machine
        // older than the operator's own last write (the cache lags it) would
        // ask for a second reboot, or settle a settled one again. Wait for
        // the fresh copy.
        let api: Api<Machine> = Api::namespaced(ctx.client.clone(), &machine.namespace().unwrap_or_default());
        let stored = api.get(&machine.name_any()).await?;
        if stored.metadata.resource_version != machine.metadata.resource_version {
            return Err(super::Error::Stale);
        }
    }
    if let Some(request) = &requests.reboot {
        if !requests.settle_reboot {
            action.start_reboot(request, status).await?;
        }
        if status.last_reboot.as_ref().is_some_and(|r| r.result == RebootResult::Rebooting) {
            action.settle_reboot(request, status).await;
        }
    }
    if let Some(request) = &requests.sync {
        let session = action.connect(ctx.settings.ssh_timeout).await.map_err(super::deploy::ssh_error)?;
        let synced = session.exec("sync").await;
        session.close().await;
        synced.map_err(super::deploy::ssh_error)?;
        status.last_sync = Some(SyncRecord { request: request.clone(), synced_at: Some(Time(Timestamp::now())) });
    }
    if let Some(request) = &requests.dry_activate {
        action.dry_activate(network, request, status).await?;
    }
    if let Some(request) = &requests.check {
        let session = action.connect(ctx.settings.ssh_timeout).await;
        match session {
            Ok(session) => {
                action.check(&session, request, status).await;
                session.close().await;
            }
            Err(err) => action.record_check(request, status, Err(err.to_string())).await,
        }
    }
    Ok(())
}

struct Action<'a> {
    machine: &'a Machine,
    ctx: &'a Context,
    target: &'a Target,
}

impl Action<'_> {
    async fn connect(&self, timeout: Duration) -> Result<Session, SshError> {
        super::deploy::connect(self.ctx, self.target, timeout).await
    }

    async fn event(&self, type_: EventType, reason: &str, message: String) {
        self.ctx.event(self.machine, type_, reason, message).await;
    }

    /// Copies the closure asked for and dry-activates it; a failure that
    /// needs a person (an untrusted closure, say) is the answer, trouble
    /// reaching the machine is retried.
    async fn dry_activate(&self, network: &Network, request: &str, status: &mut MachineStatus) -> Result<()> {
        let annotations = self.machine.annotations();
        let closure = annotations
            .get(DRY_ACTIVATE_CLOSURE_ANNOTATION)
            .cloned()
            .or_else(|| self.machine.spec.nixos.as_ref().map(|n| n.closure.clone()))
            .unwrap_or_default();
        let session = self.connect(self.ctx.settings.ssh_timeout).await.map_err(super::deploy::ssh_error)?;
        let ran = super::deploy::dry_activate(self.machine, network, self.ctx, self.target, &session, &closure).await;
        session.close().await;
        let (succeeded, output) = match ran {
            Ok(ran) => ran,
            Err(Error::Stalled { message, .. }) => (false, message),
            Err(other) => return Err(other),
        };
        let (type_, reason) =
            if succeeded { (EventType::Normal, "DryActivated") } else { (EventType::Warning, "DryActivationFailed") };
        self.event(type_, reason, format!("dry activation of {closure}")).await;
        status.last_dry_activation = Some(DryActivationRecord {
            request: request.to_owned(),
            closure,
            finished_at: Some(Time(Timestamp::now())),
            succeeded,
            output,
        });
        Ok(())
    }

    /// Probes the machine and records what it found as the answer to `request`.
    async fn check(&self, session: &Session, request: &str, status: &mut MachineStatus) {
        let probed = session.exec(&check::check_script()).await;
        let health = match probed {
            Ok(out) if out.status == Some(0) => Ok(check::parse_check(&String::from_utf8_lossy(&out.stdout))),
            Ok(out) => Err(format!("the check script failed: {}", String::from_utf8_lossy(&out.stderr).trim())),
            Err(err) => Err(err.to_string()),
        };
        self.record_check(request, status, health).await;
    }

    async fn record_check(&self, request: &str, status: &mut MachineStatus, health: Result<check::Health, String>) {
        let desired = self.machine.spec.nixos.as_ref().map(|n| n.closure.as_str());
        let record = match health {
            Ok(health) => {
                let problems = health.problems(desired);
                CheckRecord {
                    request: request.to_owned(),
                    checked_at: Some(Time(Timestamp::now())),
                    result: if problems.is_empty() { CheckResult::Healthy } else { CheckResult::Degraded },
                    message: (!problems.is_empty()).then(|| problems.join("; ")),
                    in_sync: desired.is_none_or(|d| health.active.as_deref() == Some(d)),
                    active_closure: health.active,
                    failed_units: health.failed_units,
                    load: health.load,
                    nix_free_bytes: health.nix_free_bytes,
                    nix_size_bytes: health.nix_size_bytes,
                }
            }
            Err(why) => CheckRecord {
                request: request.to_owned(),
                checked_at: Some(Time(Timestamp::now())),
                result: CheckResult::Degraded,
                message: Some(format!("could not check the machine: {why}")),
                ..CheckRecord::default()
            },
        };
        match &record.message {
            None => self.event(EventType::Normal, "Checked", "check: healthy".into()).await,
            Some(message) => self.event(EventType::Warning, "CheckFailed", format!("check: {message}")).await,
        }
        status.last_check = Some(record);
    }

    /// Leaves the marker, records the reboot as under way, then asks systemd.
    async fn start_reboot(&self, request: &str, status: &mut MachineStatus) -> Result<()> {
        let record = RebootRecord {
            request: request.to_owned(),
            started_at: Some(Time(Timestamp::now())),
            ..RebootRecord::default()
        };
        let session = match self.connect(self.ctx.settings.ssh_timeout).await {
            Ok(session) => session,
            Err(err) => {
                self.reboot_failed(status, record, format!("could not log in to reboot: {err}")).await;
                return Ok(());
            }
        };
        let marked = session.exec(&check::reboot_mark_script(request)).await;
        let refused = match marked {
            Ok(out) if out.status == Some(0) => None,
            Ok(out) => Some(String::from_utf8_lossy(&out.stderr).trim().to_owned()),
            Err(err) => Some(err.to_string()),
        };
        if let Some(why) = refused {
            session.close().await;
            self.reboot_failed(status, record, format!("the machine cannot be rebooted: {why}")).await;
            return Ok(());
        }
        status.last_reboot = Some(record.clone());
        let api: Api<Machine> = Api::namespaced(self.ctx.client.clone(), &self.machine.namespace().unwrap_or_default());
        write_status(&api, self.machine, status.clone(), self.ctx).await?;
        fault::point(fault::points::REBOOT_BEFORE_REQUEST, Some(&session)).await;
        let asked = ask_reboot(&session).await;
        session.close().await;
        if let Err(why) = asked {
            self.reboot_failed(status, record, why).await;
            return Ok(());
        }
        fault::point(fault::points::REBOOT_AFTER_REQUEST, None).await;
        self.event(EventType::Normal, "Rebooting", format!("rebooting (request {request})")).await;
        Ok(())
    }

    /// Waits until the machine answers with its pinned host key and the
    /// marker is gone, then checks it; past REBOOT_TIMEOUT the reboot failed.
    async fn settle_reboot(&self, request: &str, status: &mut MachineStatus) {
        let Some(mut record) = status.last_reboot.clone() else { return };
        let started = record.started_at.as_ref().map(|t| t.0).unwrap_or_else(Timestamp::now);
        let elapsed = Duration::try_from(Timestamp::now().duration_since(started)).unwrap_or_default();
        let deadline = Instant::now() + REBOOT_TIMEOUT.saturating_sub(elapsed);
        let mut last_error = String::from("no answer yet");
        while Instant::now() < deadline {
            tokio::time::sleep(REBOOT_POLL).await;
            let timeout = self.ctx.settings.ssh_timeout.min(deadline.saturating_duration_since(Instant::now()));
            let session = match self.connect(timeout.max(Duration::from_secs(1))).await {
                Ok(session) => session,
                Err(err @ SshError::HostKeyMismatch { .. }) => {
                    let message = format!("the machine came back with another host key: {err}");
                    self.reboot_failed(status, record, message).await;
                    return;
                }
                Err(err) => {
                    last_error = err.to_string();
                    continue;
                }
            };
            let done = session.exec(&check::reboot_done_script(request)).await;
            let progress =
                done.as_ref().ok().and_then(|out| check::parse_reboot_done(&String::from_utf8_lossy(&out.stdout)));
            match (progress, done) {
                (Some(RebootProgress::NotAsked), _) => {
                    // The operator stopped between recording the reboot and asking for it.
                    if let Err(why) = ask_reboot(&session).await {
                        session.close().await;
                        self.reboot_failed(status, record, why).await;
                        return;
                    }
                    self.event(EventType::Normal, "Rebooting", format!("rebooting (request {request})")).await;
                    last_error = "the machine has not gone down yet".into();
                }
                (Some(RebootProgress::Rebooted), _) => {
                    self.check(&session, request, status).await;
                    session.close().await;
                    record.result = RebootResult::Succeeded;
                    record.finished_at = Some(Time(Timestamp::now()));
                    let took = Duration::try_from(Timestamp::now().duration_since(started)).unwrap_or_default();
                    let message = format!("back after {} s with the same host key", took.as_secs());
                    record.message = Some(message.clone());
                    status.last_reboot = Some(record);
                    // What a deployment said needed a reboot has had it.
                    Conditions::new(&mut status.conditions, self.machine.metadata.generation).remove(REBOOT_REQUIRED);
                    self.event(EventType::Normal, "Rebooted", message).await;
                    return;
                }
                (_, Err(err)) => last_error = err.to_string(),
                (_, Ok(_)) => last_error = "the machine has not gone down yet".into(),
            }
            session.close().await;
        }
        let message = format!("the machine was not back within {} s: {last_error}", REBOOT_TIMEOUT.as_secs());
        self.reboot_failed(status, record, message).await;
    }

    async fn reboot_failed(&self, status: &mut MachineStatus, mut record: RebootRecord, message: String) {
        record.result = RebootResult::Failed;
        record.finished_at = Some(Time(Timestamp::now()));
        record.message = Some(message.clone());
        status.last_reboot = Some(record);
        self.event(EventType::Warning, "RebootFailed", message).await;
    }
}

/// Asks the machine's systemd for the reboot; Err says why it refused. A
/// connection that dies meanwhile is taken as the reboot under way.
async fn ask_reboot(session: &Session) -> Result<(), String> {
    match session.exec(&check::reboot_script()).await {
        Ok(out) if out.status != Some(0) => {
            Err(format!("systemctl reboot failed: {}", String::from_utf8_lossy(&out.stderr).trim()))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn machine(annotations: serde_json::Value, status: serde_json::Value) -> (Machine, MachineStatus) {
        let m: Machine = serde_json::from_value(serde_json::json!({
            "apiVersion": "nixops.io/v1alpha1", "kind": "Machine",
            "metadata": {"name": "a", "namespace": "ns", "annotations": annotations},
            "spec": {"networkRef": {"name": "net"}},
        }))
        .unwrap();
        (m, serde_json::from_value(status).unwrap())
    }

    #[test]
    fn a_request_is_carried_out_once_and_a_reboot_under_way_is_settled() {
        let (m, s) = machine(serde_json::json!({}), serde_json::json!({}));
        assert!(!pending(&m, &s).any());
        let (m, s) =
            machine(serde_json::json!({CHECK_ANNOTATION: "1", REBOOT_ANNOTATION: "r1"}), serde_json::json!({}));
        assert_eq!(
            pending(&m, &s),
            Requests { check: Some("1".into()), reboot: Some("r1".into()), ..Requests::default() }
        );
        let answered = serde_json::json!({
            "lastCheck": {"request": "1", "result": "Healthy"},
            "lastReboot": {"request": "r1", "result": "Succeeded"},
        });
        let (m, s) = machine(serde_json::json!({CHECK_ANNOTATION: "1", REBOOT_ANNOTATION: "r1"}), answered.clone());
        assert!(!pending(&m, &s).any(), "answered requests are not repeated");
        let (m, s) = machine(serde_json::json!({CHECK_ANNOTATION: "2", REBOOT_ANNOTATION: "r2"}), answered);
        assert_eq!(
            pending(&m, &s),
            Requests { check: Some("2".into()), reboot: Some("r2".into()), ..Requests::default() }
        );
        let rebooting = serde_json::json!({"lastReboot": {"request": "r1", "result": "Rebooting"}});
        let (m, s) = machine(serde_json::json!({REBOOT_ANNOTATION: "r1"}), rebooting);
        let settle = Requests { reboot: Some("r1".into()), settle_reboot: true, ..Requests::default() };
        assert_eq!(pending(&m, &s), settle);
        let (m, s) = machine(
            serde_json::json!({DRY_ACTIVATE_ANNOTATION: "d1"}),
            serde_json::json!({"lastDryActivation": {"request": "d0", "closure": "/nix/store/x", "succeeded": true}}),
        );
        assert_eq!(pending(&m, &s).dry_activate.as_deref(), Some("d1"));
        let (m, s) =
            machine(serde_json::json!({SYNC_ANNOTATION: "b1"}), serde_json::json!({"lastSync": {"request": "b1"}}));
        assert!(!pending(&m, &s).any(), "a sync is run once per request");
    }
}
