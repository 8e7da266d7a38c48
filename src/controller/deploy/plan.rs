//! The deploy step's decisions, apart from the I/O that carries them out:
//! what a reconcile does given the spec, what status recorded and what the
//! machine shows, and how an activation is settled from the facts the
//! machine keeps. Table-tested below without a cluster or a machine.

use crate::api::machine::{ActivationAction, DeployRecord, DriftPolicy, deploy_result};
use crate::nix::activation::{
    ActivationFacts, EXIT_PROFILE_FAILED, EXIT_REBOOT_REQUIRED, EXIT_TIMED_OUT, NodeState, Outcome, RollbackCause,
};

/// What the spec asks for, as far as the decisions need it.
#[derive(Clone, Copy, Debug)]
pub struct Desired<'a> {
    pub closure: &'a str,
    pub action: ActivationAction,
    pub drift: DriftPolicy,
    /// The Machine's metadata.generation.
    pub generation: Option<i64>,
}

/// What one reconcile does with the machine's system.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Plan {
    /// The desired closure failed at this spec generation; it is not tried
    /// again until the spec changes. The reason and message of that failure.
    FailedAtThisGeneration { reason: String, message: String },
    /// An activation is recorded as under way (perhaps by an operator that
    /// was restarted, perhaps of an older closure): settle it from the facts
    /// the machine keeps before anything else.
    Settle,
    /// The machine runs the desired closure.
    InSync,
    /// The machine runs something else and spec.nixos.drift is Report.
    ReportDrift { found: String },
    /// Push and activate the desired closure; `correcting` names what the
    /// machine ran instead when this corrects drift.
    Deploy { correcting: Option<String> },
}

/// Whether `last` is a failed deployment of the desired closure at this spec
/// generation. Decided before connecting to the machine.
pub fn failed_at_this_generation(desired: &Desired, last: Option<&DeployRecord>) -> Option<Plan> {
    let last = last?;
    let failed = matches!(last.result.as_deref(), Some(deploy_result::FAILED | deploy_result::ROLLED_BACK));
    (failed && last.closure == desired.closure && last.spec_generation == desired.generation).then(|| {
        Plan::FailedAtThisGeneration {
            reason: last.result.clone().unwrap_or_default(),
            message: last.message.clone().unwrap_or_default(),
        }
    })
}

/// Whether this reconcile will most likely deploy, judged before the
/// machine is asked: the desired closure is not yet deployed, has not failed
/// at this spec generation, and no activation waits to be settled. Then what
/// the machine has of the closure is asked alongside its state instead of
/// after it; drift correction, rarer, asks afterwards.
pub fn deploy_likely(desired: &Desired, last: Option<&DeployRecord>) -> bool {
    if failed_at_this_generation(desired, last).is_some() {
        return false;
    }
    last.is_none_or(|l| match l.result.as_deref() {
        Some(deploy_result::ACTIVATING) => false,
        Some(deploy_result::SUCCEEDED) => l.closure != desired.closure,
        _ => true,
    })
}

/// The next step for the machine's system.
pub fn plan(desired: &Desired, last: Option<&DeployRecord>, state: &NodeState) -> Plan {
    if let Some(failed) = failed_at_this_generation(desired, last) {
        return failed;
    }
    if last.is_some_and(|l| l.result.as_deref() == Some(deploy_result::ACTIVATING)) {
        return Plan::Settle;
    }
    let active = state.active_for(desired.action);
    let deployed_before =
        last.is_some_and(|l| l.closure == desired.closure && l.result.as_deref() == Some(deploy_result::SUCCEEDED));
    let in_sync = match desired.action {
        // dry-activate changes nothing on the machine; done once is done.
        ActivationAction::DryActivate => deployed_before,
        _ => active == Some(desired.closure),
    };
    if in_sync || (deployed_before && desired.drift == DriftPolicy::Ignore) {
        return Plan::InSync;
    }
    if !deployed_before {
        return Plan::Deploy { correcting: None };
    }
    let found = active.unwrap_or("nothing").to_owned();
    match desired.drift {
        DriftPolicy::Report => Plan::ReportDrift { found },
        _ => Plan::Deploy { correcting: Some(found) },
    }
}

/// How an activation ended, for status.lastDeploy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Succeeded,
    /// The machine runs the system it ran before; after what, and why.
    RolledBack(RollbackCause, String),
    /// The machine may run neither system, or the activation failed with
    /// nothing to go back to; why.
    Failed(String),
}

/// The next step in settling an activation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Settle {
    /// The machine knows nothing of it (never started, or rebooted since):
    /// start it.
    Start,
    /// switch-to-configuration is still running, or the machine is rolling
    /// back: look again shortly.
    Wait,
    /// The switch failed: roll back, for this reason.
    RollBack(String),
    /// The switch succeeded: run the health checks, then confirm.
    Verify { reboot_required: bool },
    /// Decided, by the operator or the machine's watchdog.
    Done(Verdict),
}

/// Settles an activation of `closure` with `action` from the facts the
/// machine keeps about it.
pub fn settle(facts: &ActivationFacts, closure: &str, action: ActivationAction, timeout_seconds: u32) -> Settle {
    if !facts.started {
        return Settle::Start;
    }
    match &facts.outcome {
        Some(Outcome::Confirmed) => return Settle::Done(Verdict::Succeeded),
        Some(Outcome::RolledBack(cause, note)) => return Settle::Done(Verdict::RolledBack(*cause, note.clone())),
        Some(Outcome::RollbackFailed(note) | Outcome::NothingToRollBackTo(note)) => {
            return Settle::Done(Verdict::Failed(note.clone()));
        }
        // Claimed by someone who has not finished (a watchdog rolling back).
        None if facts.decided => return Settle::Wait,
        None => {}
    }
    let arg = action.as_arg();
    let tail = if facts.log_tail.is_empty() { "no output".to_owned() } else { facts.log_tail.replace('\n', " | ") };
    match facts.switch_rc {
        None => Settle::Wait,
        Some(0) => Settle::Verify { reboot_required: false },
        Some(EXIT_REBOOT_REQUIRED) => Settle::Verify { reboot_required: true },
        Some(EXIT_PROFILE_FAILED) => {
            Settle::RollBack(format!("setting the system profile to {closure} failed: {tail}"))
        }
        Some(EXIT_TIMED_OUT) => Settle::RollBack(format!(
            "switch-to-configuration {arg} of {closure} ran longer than {timeout_seconds} s \
             (spec.nixos.activationTimeoutSeconds) and was stopped: {tail}"
        )),
        Some(rc) => {
            Settle::RollBack(format!("switch-to-configuration {arg} of {closure} failed (exit status {rc}): {tail}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-nixos-system-a";
    const B: &str = "/nix/store/bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-nixos-system-b";

    fn desired(drift: DriftPolicy) -> Desired<'static> {
        Desired { closure: B, action: ActivationAction::Switch, drift, generation: Some(3) }
    }

    fn record(closure: &str, result: &str, generation: i64) -> DeployRecord {
        DeployRecord {
            closure: closure.into(),
            result: Some(result.into()),
            spec_generation: Some(generation),
            message: Some("it broke".into()),
            ..DeployRecord::default()
        }
    }

    fn running(current: Option<&str>) -> NodeState {
        NodeState { current: current.map(Into::into), ..NodeState::default() }
    }

    #[test]
    fn plans() {
        use deploy_result::*;
        let deploy = Plan::Deploy { correcting: None };
        // (case, drift policy, status.lastDeploy, /run/current-system, plan)
        type Case = (&'static str, DriftPolicy, Option<DeployRecord>, Option<&'static str>, Plan);
        let cases: Vec<Case> = vec![
            ("first deployment", DriftPolicy::Correct, None, None, deploy.clone()),
            ("first deployment, machine ran A", DriftPolicy::Correct, None, Some(A), deploy.clone()),
            ("new closure after A", DriftPolicy::Correct, Some(record(A, SUCCEEDED, 2)), Some(A), deploy.clone()),
            ("already running B, never recorded", DriftPolicy::Correct, None, Some(B), Plan::InSync),
            ("deployed and running", DriftPolicy::Correct, Some(record(B, SUCCEEDED, 3)), Some(B), Plan::InSync),
            (
                "drift corrected",
                DriftPolicy::Correct,
                Some(record(B, SUCCEEDED, 3)),
                Some(A),
                Plan::Deploy { correcting: Some(A.into()) },
            ),
            (
                "drift reported",
                DriftPolicy::Report,
                Some(record(B, SUCCEEDED, 3)),
                Some(A),
                Plan::ReportDrift { found: A.into() },
            ),
            ("drift ignored", DriftPolicy::Ignore, Some(record(B, SUCCEEDED, 3)), Some(A), Plan::InSync),
            (
                "drift to nothing",
                DriftPolicy::Correct,
                Some(record(B, SUCCEEDED, 3)),
                None,
                Plan::Deploy { correcting: Some("nothing".into()) },
            ),
            (
                "failed at this generation",
                DriftPolicy::Correct,
                Some(record(B, FAILED, 3)),
                Some(A),
                Plan::FailedAtThisGeneration { reason: FAILED.into(), message: "it broke".into() },
            ),
            (
                "rolled back at this generation",
                DriftPolicy::Correct,
                Some(record(B, ROLLED_BACK, 3)),
                Some(A),
                Plan::FailedAtThisGeneration { reason: ROLLED_BACK.into(), message: "it broke".into() },
            ),
            (
                "failed at an older generation",
                DriftPolicy::Correct,
                Some(record(B, FAILED, 2)),
                Some(A),
                deploy.clone(),
            ),
            ("another closure failed", DriftPolicy::Correct, Some(record(A, FAILED, 3)), Some(A), deploy.clone()),
            ("interrupted activation", DriftPolicy::Correct, Some(record(B, ACTIVATING, 3)), Some(B), Plan::Settle),
            (
                "interrupted, not running it",
                DriftPolicy::Correct,
                Some(record(B, ACTIVATING, 3)),
                Some(A),
                Plan::Settle,
            ),
            ("interrupted older closure", DriftPolicy::Correct, Some(record(A, ACTIVATING, 2)), Some(A), Plan::Settle),
            ("interrupted push", DriftPolicy::Correct, Some(record(B, PUSHING, 3)), Some(A), deploy.clone()),
        ];
        for (name, drift, last, current, want) in cases {
            assert_eq!(plan(&desired(drift), last.as_ref(), &running(current)), want, "{name}");
        }
    }

    #[test]
    fn a_deployment_is_foreseen_for_a_closure_not_yet_deployed() {
        use deploy_result::*;
        let cases = [
            ("first deployment", None, true),
            ("new closure after A", Some(record(A, SUCCEEDED, 2)), true),
            ("interrupted push", Some(record(B, PUSHING, 3)), true),
            ("failed at an older generation", Some(record(B, FAILED, 2)), true),
            ("deployed", Some(record(B, SUCCEEDED, 3)), false),
            ("failed at this generation", Some(record(B, FAILED, 3)), false),
            ("activation to settle", Some(record(A, ACTIVATING, 2)), false),
        ];
        for (name, last, want) in cases {
            assert_eq!(deploy_likely(&desired(DriftPolicy::Correct), last.as_ref()), want, "{name}");
        }
    }

    #[test]
    fn boot_and_dry_activate_look_at_what_they_change() {
        let boot = Desired { action: ActivationAction::Boot, ..desired(DriftPolicy::Correct) };
        let state = NodeState { current: Some(A.into()), profile: Some(B.into()), ..NodeState::default() };
        assert_eq!(plan(&boot, None, &state), Plan::InSync, "boot: the profile is what counts");
        let dry = Desired { action: ActivationAction::DryActivate, ..desired(DriftPolicy::Correct) };
        assert_eq!(plan(&dry, None, &running(Some(B))), Plan::Deploy { correcting: None });
        let done = record(B, deploy_result::SUCCEEDED, 3);
        assert_eq!(plan(&dry, Some(&done), &running(Some(A))), Plan::InSync);
    }

    #[test]
    fn settling() {
        let facts = |switch_rc: Option<u32>, decided: bool, outcome: Option<Outcome>| ActivationFacts {
            started: true,
            switch_rc,
            log_tail: "boom".into(),
            decided,
            outcome,
        };
        let rolled = Outcome::RolledBack(RollbackCause::Unconfirmed, "rolled back to A".into());
        let cases: Vec<(&str, ActivationFacts, Settle)> = vec![
            ("never started or rebooted", ActivationFacts::default(), Settle::Start),
            ("switch running", facts(None, false, None), Settle::Wait),
            ("switch ok", facts(Some(0), false, None), Settle::Verify { reboot_required: false }),
            ("reboot required", facts(Some(100), false, None), Settle::Verify { reboot_required: true }),
            (
                "switch failed",
                facts(Some(1), false, None),
                Settle::RollBack(format!("switch-to-configuration switch of {B} failed (exit status 1): boom")),
            ),
            (
                "timed out",
                facts(Some(EXIT_TIMED_OUT), false, None),
                Settle::RollBack(format!(
                    "switch-to-configuration switch of {B} ran longer than 240 s (spec.nixos.activationTimeoutSeconds) and was stopped: boom"
                )),
            ),
            (
                "profile failed",
                facts(Some(EXIT_PROFILE_FAILED), false, None),
                Settle::RollBack(format!("setting the system profile to {B} failed: boom")),
            ),
            ("watchdog rolling back", facts(Some(0), true, None), Settle::Wait),
            (
                "watchdog rolled back",
                facts(Some(0), true, Some(rolled)),
                Settle::Done(Verdict::RolledBack(RollbackCause::Unconfirmed, "rolled back to A".into())),
            ),
            ("confirmed", facts(Some(0), true, Some(Outcome::Confirmed)), Settle::Done(Verdict::Succeeded)),
            (
                "confirmed even though the switch reported 1 later? no: outcome wins",
                facts(Some(1), true, Some(Outcome::Confirmed)),
                Settle::Done(Verdict::Succeeded),
            ),
            (
                "rollback failed",
                facts(Some(1), true, Some(Outcome::RollbackFailed("disk full".into()))),
                Settle::Done(Verdict::Failed("disk full".into())),
            ),
            (
                "nothing to roll back to",
                facts(Some(1), true, Some(Outcome::NothingToRollBackTo("first system".into()))),
                Settle::Done(Verdict::Failed("first system".into())),
            ),
        ];
        for (name, facts, want) in cases {
            assert_eq!(settle(&facts, B, ActivationAction::Switch, 240), want, "{name}");
        }
    }
}
