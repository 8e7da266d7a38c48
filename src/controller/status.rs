//! The status contract every kind follows, as kstatus (Flux, `kubectl wait`)
//! reads it: `observedGeneration`, `Ready`, `Reconciling`, `Stalled`, plus
//! kind-specific conditions; written with server-side apply, and only when
//! something changed, so a steady state costs no API writes.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;

use crate::api::{Condition, condition};

/// Condition status as Kubernetes spells it.
fn status_str(value: bool) -> &'static str {
    if value { "True" } else { "False" }
}

/// The conditions of one status, changed in place. A condition whose status
/// stays the same keeps its lastTransitionTime, so an unchanged state
/// compares equal to the stored one and nothing is written.
pub struct Conditions<'a> {
    list: &'a mut Vec<Condition>,
    generation: Option<i64>,
}

impl<'a> Conditions<'a> {
    pub fn new(list: &'a mut Vec<Condition>, generation: Option<i64>) -> Self {
        Self { list, generation }
    }

    /// Sets condition `type_`. Reasons are CamelCase words; messages are for users.
    pub fn set(&mut self, type_: &str, value: bool, reason: &str, message: impl Into<String>) -> &mut Self {
        let status = status_str(value);
        let message = message.into();
        match self.list.iter_mut().find(|c| c.type_ == type_) {
            Some(existing) => {
                if existing.status != status {
                    existing.last_transition_time = Time(Timestamp::now());
                }
                existing.status = status.to_owned();
                existing.reason = reason.to_owned();
                existing.message = message;
                existing.observed_generation = self.generation;
            }
            None => self.list.push(Condition {
                type_: type_.to_owned(),
                status: status.to_owned(),
                reason: reason.to_owned(),
                message,
                observed_generation: self.generation,
                last_transition_time: Time(Timestamp::now()),
            }),
        }
        self
    }

    /// Removes condition `type_` (kstatus treats an absent Reconciling or
    /// Stalled like False).
    pub fn remove(&mut self, type_: &str) -> &mut Self {
        self.list.retain(|c| c.type_ != type_);
        self
    }

    /// Everything is as desired.
    pub fn ready(&mut self, reason: &str, message: impl Into<String>) -> &mut Self {
        self.set(condition::READY, true, reason, message).remove(condition::RECONCILING).remove(condition::STALLED)
    }

    /// Work is under way (or waiting for something that will come by itself).
    pub fn reconciling(&mut self, reason: &str, message: impl Into<String>) -> &mut Self {
        let message = message.into();
        self.set(condition::READY, false, reason, message.clone())
            .set(condition::RECONCILING, true, reason, message)
            .remove(condition::STALLED)
    }

    /// Progress needs a change to the spec or the environment.
    pub fn stalled(&mut self, reason: &str, message: impl Into<String>) -> &mut Self {
        let message = message.into();
        self.set(condition::READY, false, reason, message.clone())
            .set(condition::STALLED, true, reason, message)
            .remove(condition::RECONCILING)
    }
}

/// Looks up a condition's status.
pub fn is_true(conditions: &[Condition], type_: &str) -> bool {
    conditions.iter().any(|c| c.type_ == type_ && c.status == "True")
}

/// Looks up a condition's message.
pub fn message<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a str> {
    conditions.iter().find(|c| c.type_ == type_).map(|c| c.message.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unchanged_condition_keeps_its_transition_time() {
        let mut list = Vec::new();
        Conditions::new(&mut list, Some(1)).ready("Ready", "ok");
        let first = list.clone();
        std::thread::sleep(std::time::Duration::from_millis(5));
        Conditions::new(&mut list, Some(1)).ready("Ready", "ok");
        assert_eq!(list, first);
    }

    #[test]
    fn flipping_a_condition_moves_its_transition_time_and_generation() {
        let mut list = Vec::new();
        Conditions::new(&mut list, Some(1)).reconciling("Provisioning", "creating");
        let before = list[0].last_transition_time.clone();
        std::thread::sleep(std::time::Duration::from_millis(5));
        Conditions::new(&mut list, Some(2)).ready("Ready", "ok");
        let ready = list.iter().find(|c| c.type_ == condition::READY).unwrap();
        assert_eq!(ready.status, "True");
        assert_eq!(ready.observed_generation, Some(2));
        assert!(ready.last_transition_time > before);
        assert!(!list.iter().any(|c| c.type_ == condition::RECONCILING));
    }

    #[test]
    fn stalled_clears_reconciling_and_sets_ready_false() {
        let mut list = Vec::new();
        Conditions::new(&mut list, Some(3)).reconciling("Provisioning", "x").stalled("HostKeyMismatch", "bad key");
        assert!(is_true(&list, condition::STALLED));
        assert!(!is_true(&list, condition::READY));
        assert!(!list.iter().any(|c| c.type_ == condition::RECONCILING));
        assert_eq!(message(&list, condition::READY), Some("bad key"));
    }
}
