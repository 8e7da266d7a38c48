//! Leader election on a coordination.k8s.io Lease, so that of several
//! replicas only one reconciles. Expiry is judged by when this replica last
//! saw the lease change (as client-go does), not by the holder's clock.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ObjectMeta, PostParams};
use tokio::sync::Mutex;

/// Timing of the election (client-go's: a holder that cannot renew within
/// `renew_deadline` stops acting, before others may take the lease after
/// `duration`).
#[derive(Clone, Copy, Debug)]
pub struct LeaseTiming {
    /// How long a lease is valid without renewal.
    pub duration: Duration,
    /// How long the holder keeps acting without a successful renewal; shorter
    /// than `duration`, so it has stopped before a standby can take over.
    pub renew_deadline: Duration,
    /// How often the holder renews, and others retry.
    pub retry: Duration,
}

impl LeaseTiming {
    /// Refuses timing under which two replicas could act at once.
    pub fn check(&self) -> Result<(), String> {
        if self.renew_deadline >= self.duration {
            return Err(format!(
                "the lease renew deadline ({} s) must be shorter than the lease duration ({} s), \
                 or a leader that cannot renew may still act when another takes over",
                self.renew_deadline.as_secs(),
                self.duration.as_secs()
            ));
        }
        if self.retry >= self.renew_deadline {
            return Err(format!(
                "the lease retry period ({} s) must be shorter than the renew deadline ({} s)",
                self.retry.as_secs(),
                self.renew_deadline.as_secs()
            ));
        }
        Ok(())
    }
}

/// One replica's view of the lease.
pub struct LeaseLock {
    api: Api<Lease>,
    name: String,
    identity: String,
    timing: LeaseTiming,
    /// The last lease record seen and when this replica saw it change.
    observed: Mutex<Option<Observed>>,
}

/// A lease record (holder, renewTime) and when it was first seen.
struct Observed {
    holder: Option<String>,
    renew_time: Option<MicroTime>,
    at: Instant,
}

impl LeaseLock {
    pub fn new(api: Api<Lease>, name: &str, identity: &str, timing: LeaseTiming) -> Self {
        Self { api, name: name.to_owned(), identity: identity.to_owned(), timing, observed: Mutex::new(None) }
    }

    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// Waits until this replica holds the lease. `on_contact` runs after the
    /// first answer from the API server (this replica then takes part in
    /// the election, as leader or standby).
    pub async fn acquire(&self, on_contact: impl Fn()) {
        loop {
            match tokio::time::timeout(self.timing.renew_deadline, self.try_acquire_or_renew()).await {
                Ok(Ok(true)) => {
                    on_contact();
                    return;
                }
                Ok(Ok(false)) => on_contact(),
                Ok(Err(err)) => tracing::warn!(%err, lease = %self.name, "cannot read or update the leader lease"),
                Err(_) => tracing::warn!(lease = %self.name, "the leader lease got no answer in time"),
            }
            tokio::time::sleep(self.timing.retry).await;
        }
    }

    /// Renews the lease until another replica took it or no renewal
    /// succeeded within the renew deadline (a hung API call included: each
    /// attempt is bounded by what is left of it); then returns, and this
    /// replica must stop acting.
    pub async fn hold(&self) {
        let mut last_renewed = Instant::now();
        loop {
            tokio::time::sleep(self.timing.retry).await;
            let left = self.timing.renew_deadline.saturating_sub(last_renewed.elapsed());
            match tokio::time::timeout(left, self.try_acquire_or_renew()).await {
                Ok(Ok(true)) => last_renewed = Instant::now(),
                Ok(Ok(false)) => {
                    tracing::error!(lease = %self.name, "another replica holds the leader lease");
                    return;
                }
                Ok(Err(err)) => tracing::warn!(%err, lease = %self.name, "cannot renew the leader lease"),
                Err(_) => tracing::warn!(lease = %self.name, "renewing the leader lease got no answer"),
            }
            if last_renewed.elapsed() >= self.timing.renew_deadline {
                tracing::error!(
                    lease = %self.name,
                    seconds = self.timing.renew_deadline.as_secs(),
                    "could not renew the leader lease within the renew deadline"
                );
                return;
            }
        }
    }

    /// Gives the lease up, so another replica takes over at once.
    pub async fn release(&self) {
        let Ok(Some(mut lease)) = self.api.get_opt(&self.name).await else { return };
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        if spec.holder_identity.as_deref() != Some(&self.identity) {
            return;
        }
        spec.holder_identity = None;
        spec.renew_time = None;
        if let Err(err) = self.api.replace(&self.name, &PostParams::default(), &lease).await {
            tracing::warn!(%err, "cannot release the leader lease");
        }
    }

    /// One round: take the lease if it is free, expired or already ours.
    async fn try_acquire_or_renew(&self) -> Result<bool, kube::Error> {
        let now = MicroTime(Timestamp::now());
        let duration_seconds = i32::try_from(self.timing.duration.as_secs()).unwrap_or(i32::MAX);
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta { name: Some(self.name.clone()), ..ObjectMeta::default() },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.identity.clone()),
                    lease_duration_seconds: Some(duration_seconds),
                    acquire_time: Some(now.clone()),
                    renew_time: Some(now),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
                Err(err) => Err(err),
            };
        };
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        let ours = spec.holder_identity.as_deref() == Some(&self.identity);
        let free = spec.holder_identity.is_none();
        let expired = {
            let mut observed = self.observed.lock().await;
            match observed.as_ref() {
                Some(seen) if seen.holder == spec.holder_identity && seen.renew_time == spec.renew_time => {
                    seen.at.elapsed() >= self.timing.duration
                }
                _ => {
                    *observed = Some(Observed {
                        holder: spec.holder_identity.clone(),
                        renew_time: spec.renew_time.clone(),
                        at: Instant::now(),
                    });
                    false
                }
            }
        };
        if !(ours || free || expired) {
            return Ok(false);
        }
        if !ours {
            spec.acquire_time = Some(now.clone());
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
            tracing::info!(identity = %self.identity, "acquiring the leader lease");
        }
        spec.holder_identity = Some(self.identity.clone());
        spec.lease_duration_seconds = Some(duration_seconds);
        spec.renew_time = Some(now);
        // replace carries the resourceVersion we read: a concurrent writer makes it fail with 409.
        match self.api.replace(&self.name, &PostParams::default(), &lease).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
            Err(err) => Err(err),
        }
    }
}
