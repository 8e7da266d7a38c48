//! One controller per kind in one process, sharing a [`Context`].
//!
//! Each kind implements [`Reconciler`]: `apply` (resolve → validate → plan →
//! act, returning the status it wants) and `cleanup` (run under the
//! finalizer). The shared driver here handles what every kind does the same
//! way: the paused annotation, the finalizer, the status contract (written
//! with server-side apply, only when changed), Stalled vs retried errors with
//! capped exponential backoff, warning events, and metrics.

pub mod backup;
pub mod build;
pub mod deploy;
pub mod keypair;
pub mod machine;
pub mod machine_actions;
pub mod mesh;
pub mod network;
pub mod s3bucket;
pub mod shared;
pub mod status;
pub mod volume;

use std::collections::HashMap;
use std::fmt::Debug;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::finalizer::{Error as FinalizerError, Event as FinalizerEvent, finalizer};
use kube::{Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::api::{Condition, FINALIZER, PAUSED_ANNOTATION, condition};
use crate::metrics::Metrics;
use crate::provider::aws::AwsAccounts;
use crate::provider::{Lookup, ProviderError, Providers};
use status::Conditions;

/// Bytes of path records kept for concurrent pushes of the same closure
/// (enough for a typical NixOS system closure, compressed).
const RECORD_CACHE_BYTES: u64 = 512 << 20;

/// Field manager of every write the operator makes.
pub const FIELD_MANAGER: &str = "nixops-operator";

/// Errors of a reconciliation. `Stalled` and `Waiting` become conditions;
/// the rest are retried with backoff.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Needs a change to the spec or the environment; the message names the
    /// field and the fix. Not retried until the object or the resync changes.
    #[error("{message}")]
    Stalled { reason: &'static str, message: String },

    /// Something this object needs does not exist yet; a watch brings the
    /// object back when it appears.
    #[error("{message}")]
    Waiting { reason: &'static str, message: String },

    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),

    #[error(transparent)]
    Provider(#[from] ProviderError),

    /// Adding or removing the finalizer failed.
    #[error("finalizer: {0}")]
    Finalizer(#[source] kube::Error),

    /// The object in the cache is older than the stored one, and acting on
    /// it could undo the operator's own newer work; retried shortly with the
    /// newer copy, writing nothing.
    #[error("the cached object is stale; waiting for the newer copy")]
    Stale,

    /// The finalizer helper could not act (an object without a name).
    #[error("finalizer: {0}")]
    FinalizerHelper(String),
}

impl Error {
    pub fn stalled(reason: &'static str, message: impl Into<String>) -> Self {
        Self::Stalled { reason, message: message.into() }
    }

    pub fn waiting(reason: &'static str, message: impl Into<String>) -> Self {
        Self::Waiting { reason, message: message.into() }
    }

    /// A write rejected because the object changed meanwhile (409, or the
    /// finalizer helper's resourceVersion test failing with 422).
    fn is_conflict(&self) -> bool {
        match self {
            Self::Kube(kube::Error::Api(s)) => s.code == 409,
            // The finalizer patch tests the resourceVersion it read; a stale copy fails with 422.
            Self::Finalizer(kube::Error::Api(s)) => s.code == 409 || s.code == 422,
            _ => false,
        }
    }

    /// Label for the errors metric.
    fn class(&self) -> &'static str {
        match self {
            Self::Stalled { .. } => "stalled",
            Self::Waiting { .. } => "waiting",
            Self::Kube(_) => "kubernetes",
            Self::Provider(ProviderError::Permanent { .. }) => "stalled",
            Self::Provider(_) => "provider",
            Self::Finalizer(_) | Self::FinalizerHelper(_) => "finalizer",
            Self::Stale => "stale",
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Settings shared by every controller.
#[derive(Clone, Debug)]
pub struct Settings {
    /// How often an up-to-date object is checked again.
    pub resync: Duration,
    /// Timeout for SSH connections.
    pub ssh_timeout: Duration,
    /// How long after its login an SSH session may be kept for the next
    /// look at its machine (zero: never kept); see `deploy::KeptSessions`.
    pub ssh_keep: Duration,
    /// Longest wait between retries of a failing object.
    pub max_backoff: Duration,
    /// The largest NAR read from a binary cache.
    pub max_nar_bytes: u64,
    /// How long a create with an unknown outcome is looked for by tag
    /// before creating again (or stalling, after a crash).
    pub create_pending_window: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            resync: Duration::from_secs(300),
            ssh_timeout: Duration::from_secs(10),
            ssh_keep: Duration::from_secs(600),
            max_backoff: Duration::from_secs(300),
            max_nar_bytes: crate::nix::cache::DEFAULT_MAX_NAR_BYTES,
            create_pending_window: Duration::from_secs(120),
        }
    }
}

/// What every reconciler shares.
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    reporter: Reporter,
    /// The last note per object and reason, to tell news from repeats.
    last_notes: Mutex<HashMap<String, String>>,
    pub metrics: Metrics,
    pub providers: Providers,
    pub aws: AwsAccounts,
    pub settings: Settings,
    /// Which KeyPair each Machine resolved to (directly or through its
    /// Network's defaults), so a KeyPair event wakes only its users.
    pub keypair_users: KeyPairUsers,
    /// Shared by deployments: path records and rollout slots.
    pub deployments: deploy::Deployments,
    /// Builds of spec.nixos.build running or recently finished.
    pub builds: build::Builds,
    /// The shared watches' stores: every lookup of other objects reads these.
    pub stores: shared::Stores,
    /// Consecutive failures per object, for backoff.
    failures: Mutex<HashMap<String, u32>>,
    /// Reconciliations running now, so shutdown can wait for exactly those.
    in_flight: AtomicUsize,
    /// Creates that failed, per object UID (see [`create_once`]).
    refused_creates: Mutex<HashMap<String, FailedCreate>>,
}

/// Machine ("namespace/name") → the KeyPair name it uses.
pub type KeyPairUsers = Arc<Mutex<HashMap<String, String>>>;

impl Context {
    /// `keypair_users` is the map the Machine controller's KeyPair watch reads.
    pub fn new(
        client: Client,
        reporter: Reporter,
        metrics: Metrics,
        settings: Settings,
        stores: shared::Stores,
        keypair_users: KeyPairUsers,
    ) -> Self {
        let recorder = Recorder::new(client.clone(), reporter.clone());
        let deployments = deploy::Deployments::new(RECORD_CACHE_BYTES, settings.ssh_keep);
        let aws = AwsAccounts::new(client.clone(), metrics.clone());
        #[cfg_attr(not(feature = "libvirt"), allow(unused_mut))]
        let mut providers = Providers::builtin(aws.clone());
        #[cfg(feature = "libvirt")]
        crate::provider::libvirt::register(&mut providers, client.clone(), metrics.clone(), settings.ssh_timeout);
        Self {
            client,
            recorder,
            metrics,
            providers,
            aws,
            settings,
            reporter,
            last_notes: Mutex::default(),
            keypair_users,
            deployments,
            builds: build::Builds::default(),
            stores,
            failures: Mutex::new(HashMap::new()),
            in_flight: AtomicUsize::new(0),
            refused_creates: Mutex::default(),
        }
    }

    /// Publishes an event about `obj`. Failures to publish are logged, not fatal.
    ///
    /// The recorder folds events with the same reason into one series that
    /// keeps the first note; an event saying something new (a second
    /// deployment, another closure) gets an Event of its own instead.
    pub async fn event<K: Resource<DynamicType = ()>>(&self, obj: &K, type_: EventType, reason: &str, note: String) {
        let key = format!("{}/{reason}", obj.meta().uid.as_deref().unwrap_or_default());
        let repeated = {
            let mut notes = self.last_notes.lock().unwrap_or_else(|e| e.into_inner());
            if notes.len() > 10_000 {
                notes.clear();
            }
            notes.insert(key, note.clone()).as_deref() == Some(note.as_str())
        };
        let event =
            Event { type_, reason: reason.to_owned(), note: Some(note), action: reason.to_owned(), secondary: None };
        let fresh;
        let recorder = if repeated {
            &self.recorder
        } else {
            fresh = Recorder::new(self.client.clone(), self.reporter.clone());
            &fresh
        };
        if let Err(err) = recorder.publish(&event, &obj.object_ref(&())).await {
            tracing::warn!(%err, reason, "cannot publish event");
        }
    }

    /// Whether `obj` carries a create-pending mark whose create nobody in
    /// this process saw answered (a crash, a lost answer): what a lookup
    /// finds may be that create's result, even before it was tagged.
    pub fn create_unanswered<K: Resource>(&self, obj: &K) -> bool {
        let Some(pending) = PendingCreate::of(obj) else { return false };
        let uid = obj.meta().uid.clone().unwrap_or_default();
        let refused = self.refused_creates.lock().unwrap_or_else(|e| e.into_inner());
        !refused.get(&uid).is_some_and(|r| r.mark == pending.mark && r.answered)
    }

    /// Number of reconciliations running now.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    fn backoff(&self, key: &str) -> Duration {
        let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        let n = failures.entry(key.to_owned()).or_insert(0);
        *n = n.saturating_add(1);
        let delay = Duration::from_secs(1).saturating_mul(1u32 << (*n - 1).min(16));
        delay.min(self.settings.max_backoff)
    }

    fn reset_backoff(&self, key: &str) {
        let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        failures.remove(key);
    }
}

/// The status fields every kind has.
pub trait ObjectStatus: Default + Clone + PartialEq + Serialize + Send + Sync {
    fn conditions_mut(&mut self) -> &mut Vec<Condition>;
    fn conditions(&self) -> &[Condition];
    fn observed_generation(&self) -> Option<i64>;
    fn set_observed_generation(&mut self, generation: Option<i64>);
    /// Sets the phase that goes with Stalled.
    fn set_failed(&mut self);
    /// Sets the phase that goes with deletion in progress.
    fn set_deleting(&mut self);
}

/// Result of a cleanup step.
pub enum Cleanup {
    /// The external resource is gone (or orphaned); the finalizer may go.
    Done,
    /// Still waiting (for dependants, for the cloud); the finalizer stays.
    Wait { reason: &'static str, message: String },
    /// Cannot proceed without a change to the spec (or the cloud); the finalizer stays.
    Stalled { reason: &'static str, message: String },
}

/// One kind's reconciliation logic.
pub trait Reconciler:
    Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
    + Clone
    + Debug
    + Serialize
    + DeserializeOwned
    + Send
    + Sync
    + 'static
{
    type Status: ObjectStatus;
    /// Kind name for metrics and logs.
    const KIND: &'static str;

    fn status(&self) -> Option<&Self::Status>;

    /// Brings the world toward the spec, recording what it learns in
    /// `status` as it goes. `status` starts as the current status with
    /// observedGeneration set; the driver writes it whatever the outcome, so
    /// facts learned before an error (a host key seen at first contact, an
    /// instance's addresses) are kept. Returns when to look again (`None`:
    /// the regular resync).
    fn apply<'a>(
        self: Arc<Self>,
        ctx: Arc<Context>,
        status: &'a mut Self::Status,
    ) -> impl Future<Output = Result<Option<Duration>>> + Send + 'a;

    /// Removes (or orphans) what `apply` created.
    fn cleanup(self: Arc<Self>, ctx: Arc<Context>) -> impl Future<Output = Result<Cleanup>> + Send;
}

/// "namespace/name" of an object.
pub fn object_key<K: Resource>(obj: &K) -> String {
    format!("{}/{}", obj.namespace().unwrap_or_default(), obj.name_any())
}

/// Whether the `nixops.io/paused` annotation is set to "true".
pub fn is_paused<K: Resource>(obj: &K) -> bool {
    obj.annotations().get(PAUSED_ANNOTATION).is_some_and(|v| v == "true")
}

/// The reconcile function handed to `kube::runtime::Controller`.
pub async fn reconcile<K: Reconciler>(obj: Arc<K>, ctx: Arc<Context>) -> Result<Action> {
    let _running = InFlight::enter(&ctx);
    let started = Instant::now();
    let key = object_key(&*obj);
    let result = reconcile_inner(obj, ctx.clone()).await;
    ctx.metrics.observe_reconcile(K::KIND, started.elapsed(), result.as_ref().err().map(Error::class));
    match &result {
        Ok(_) => ctx.reset_backoff(&key),
        Err(err @ Error::Waiting { .. }) => tracing::info!(kind = K::KIND, object = %key, "{err}"),
        Err(err @ Error::Stale) => tracing::debug!(kind = K::KIND, object = %key, "{err}"),
        Err(err) => tracing::warn!(kind = K::KIND, object = %key, error = %err, "reconcile failed; retrying"),
    }
    result
}

/// Counts a reconciliation as running until dropped (also on panic).
struct InFlight<'a>(&'a AtomicUsize);

impl<'a> InFlight<'a> {
    fn enter(ctx: &'a Context) -> Self {
        ctx.in_flight.fetch_add(1, Ordering::SeqCst);
        Self(&ctx.in_flight)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Requeue policy for failed reconciliations: capped exponential backoff per object.
/// A write that lost a race with another change (stale cache) is retried at
/// once without growing the backoff: the newer object is already on its way.
pub fn error_policy<K: Reconciler>(obj: Arc<K>, err: &Error, ctx: Arc<Context>) -> Action {
    if err.is_conflict() || matches!(err, Error::Stale) {
        return Action::requeue(Duration::from_millis(200));
    }
    Action::requeue(ctx.backoff(&object_key(&*obj)))
}

async fn reconcile_inner<K: Reconciler>(obj: Arc<K>, ctx: Arc<Context>) -> Result<Action> {
    let ns = obj.namespace().unwrap_or_default();
    let api: Api<K> = Api::namespaced(ctx.client.clone(), &ns);

    if is_paused(&*obj) {
        let status = paused_status(obj.status(), obj.meta().generation);
        write_status(&api, &*obj, status, &ctx).await?;
        return Ok(Action::await_change());
    }

    let ctx2 = ctx.clone();
    let api2 = api.clone();
    finalizer(&api, FINALIZER, obj, move |event| async move {
        match event {
            FinalizerEvent::Apply(obj) => apply(&api2, obj, ctx2).await,
            FinalizerEvent::Cleanup(obj) => cleanup(&api2, obj, ctx2).await,
        }
    })
    .await
    .map_err(|err| match err {
        FinalizerError::ApplyFailed(e) | FinalizerError::CleanupFailed(e) => e,
        FinalizerError::AddFinalizer(e) | FinalizerError::RemoveFinalizer(e) => Error::Finalizer(e),
        other => Error::FinalizerHelper(other.to_string()),
    })
}

/// Reason of the conditions a paused object shows.
const PAUSED_REASON: &str = "Paused";

/// The status of a paused object at `generation`. It still describes the
/// last spec the operator acted on, observedGeneration included: kstatus
/// (Flux, `kubectl wait`) must not call a spec nobody applied Current. A
/// spec not acted on yet (a change made while paused, or a new object) is
/// also Reconciling, which kstatus reads as InProgress even when there is no
/// observedGeneration to compare; a Stalled condition about an older spec
/// no longer holds. A paused object whose spec was applied stays as it was,
/// with Paused added.
fn paused_status<S: ObjectStatus>(current: Option<&S>, generation: Option<i64>) -> S {
    let mut status = current.cloned().unwrap_or_default();
    let observed = status.observed_generation();
    let mut conditions = Conditions::new(status.conditions_mut(), generation);
    let stop = format!("the {PAUSED_ANNOTATION} annotation is set; no external calls are made until it is removed");
    if observed.is_some() && observed == generation {
        conditions.set(condition::PAUSED, true, PAUSED_REASON, stop);
    } else {
        let message = format!(
            "{stop}; generation {} is not applied{}",
            generation.unwrap_or_default(),
            observed.map(|g| format!(" (status describes generation {g})")).unwrap_or_default()
        );
        conditions
            .set(condition::PAUSED, true, PAUSED_REASON, message.clone())
            .set(condition::RECONCILING, true, PAUSED_REASON, message)
            .remove(condition::STALLED);
    }
    status
}

/// The status a reconciliation starts from: the current one with
/// observedGeneration set and what pausing added cleared.
fn base_status<K: Reconciler>(obj: &K) -> K::Status {
    acting_status(obj.status(), obj.meta().generation)
}

fn acting_status<S: ObjectStatus>(current: Option<&S>, generation: Option<i64>) -> S {
    let mut status = current.cloned().unwrap_or_default();
    status.set_observed_generation(generation);
    status.conditions_mut().retain(|c| c.type_ != condition::PAUSED && c.reason != PAUSED_REASON);
    status
}

async fn apply<K: Reconciler>(api: &Api<K>, obj: Arc<K>, ctx: Arc<Context>) -> Result<Action> {
    let generation = obj.meta().generation;
    let mut status = base_status(&*obj);
    let result = obj.clone().apply(ctx.clone(), &mut status).await;
    // What the reconciler recorded before an error is written with the
    // error's condition: the status contract (DESIGN §6).
    match result {
        Ok(requeue) => {
            write_status(api, &*obj, status, &ctx).await?;
            Ok(Action::requeue(requeue.unwrap_or(ctx.settings.resync)))
        }
        Err(Error::Stalled { reason, message })
        | Err(Error::Provider(ProviderError::Permanent { reason, message })) => {
            status.set_failed();
            Conditions::new(status.conditions_mut(), generation).stalled(reason, message.clone());
            if write_status(api, &*obj, status, &ctx).await? {
                ctx.event(&*obj, EventType::Warning, reason, message).await;
            }
            Ok(Action::requeue(ctx.settings.resync))
        }
        Err(Error::Waiting { reason, message }) => {
            Conditions::new(status.conditions_mut(), generation).reconciling(reason, message);
            write_status(api, &*obj, status, &ctx).await?;
            Ok(Action::requeue(ctx.settings.resync))
        }
        // A stale copy's status must not overwrite the newer one.
        Err(Error::Stale) => Err(Error::Stale),
        Err(err) => {
            // Retried with backoff; the condition tells users what is failing.
            Conditions::new(status.conditions_mut(), generation).reconciling("Retrying", err.to_string());
            if let Err(write) = write_status(api, &*obj, status, &ctx).await {
                tracing::warn!(kind = K::KIND, error = %write, "recording a failed reconcile");
            }
            Err(err)
        }
    }
}

async fn cleanup<K: Reconciler>(api: &Api<K>, obj: Arc<K>, ctx: Arc<Context>) -> Result<Action> {
    let cleaned = match obj.clone().cleanup(ctx.clone()).await {
        Ok(cleaned) => cleaned,
        Err(err) => {
            // Cleanup errors show on the object being deleted, not only in the log.
            if !matches!(err, Error::Stale) {
                let mut status = base_status(&*obj);
                status.set_deleting();
                Conditions::new(status.conditions_mut(), obj.meta().generation)
                    .reconciling("CleanupRetrying", format!("cleaning up: {err}"));
                if let Err(write) = write_status(api, &*obj, status, &ctx).await {
                    tracing::warn!(kind = K::KIND, error = %write, "recording a failed cleanup");
                }
            }
            return Err(err);
        }
    };
    match cleaned {
        Cleanup::Done => {
            ctx.event(&*obj, EventType::Normal, "Deleted", format!("{} {} cleaned up", K::KIND, obj.name_any())).await;
            Ok(Action::await_change())
        }
        Cleanup::Wait { reason, message } => {
            let mut status = base_status(&*obj);
            status.set_deleting();
            Conditions::new(status.conditions_mut(), obj.meta().generation).reconciling(reason, message.clone());
            write_status(api, &*obj, status, &ctx).await?;
            // An error keeps the finalizer (the finalizer helper removes it on
            // any Ok); watches and backoff bring the object back.
            Err(Error::Waiting { reason, message })
        }
        Cleanup::Stalled { reason, message } => {
            let mut status = base_status(&*obj);
            status.set_deleting();
            Conditions::new(status.conditions_mut(), obj.meta().generation).stalled(reason, message.clone());
            if write_status(api, &*obj, status, &ctx).await? {
                ctx.event(&*obj, EventType::Warning, reason, message.clone()).await;
            }
            Err(Error::Stalled { reason, message })
        }
    }
}

/// The Network `name` in `ns` (from the shared store, without
/// status.members), or a Waiting error naming `field` when it does not
/// exist yet (the Network's watch brings the object back when it appears).
pub async fn resolve_network(ctx: &Context, ns: &str, name: &str, field: &str) -> Result<crate::api::Network> {
    ctx.stores.network(ns, name).await?.ok_or_else(|| {
        Error::waiting(
            "NetworkNotFound",
            format!("Network {name} ({field}) does not exist yet; create it or fix the reference"),
        )
    })
}

/// Creates a cloud resource for `obj` at most once per intent, the way
/// Crossplane's external-create-pending works. The caller has looked the
/// resource up (by external name and UID tag) and found nothing.
///
/// - A create whose outcome is unknown left the `nixops.io/create-pending`
///   mark: nothing is created while the lookup by UID tag may still find
///   the resource (`Settings::create_pending_window`; cloud reads can lag
///   a create by seconds). Past the window, a create this process saw fail
///   without an answer is tried again (nothing appeared, so nothing was
///   made); one interrupted by a crash, whose error nobody saw, stalls the
///   object with what to do.
/// - Otherwise the intent is recorded (with the object's resourceVersion,
///   so a replica acting on a stale copy fails with 409), then `create`
///   runs and its ID is recorded as the external name.
/// - A create the cloud refused is remembered here, not on the object, so
///   the next try waits for its backoff whatever wakes the object: writing
///   the object would wake it at once.
/// - With a [`Lookup::Immediate`] backend (libvirt) the lookup that found
///   nothing is the answer: a mark without the resource is a create that
///   never reached it, so the intent is recorded anew and the create runs
///   at once, neither waiting nor stalling.
pub async fn create_once<K, T, F, Fut>(
    api: &Api<K>,
    obj: &K,
    ctx: &Context,
    what: &str,
    lookup: Lookup,
    id_of: impl Fn(&T) -> Option<String>,
    create: F,
) -> Result<T>
where
    K: Reconciler,
    F: FnOnce() -> Fut,
    Fut: Future<Output = std::result::Result<T, ProviderError>>,
{
    let intent = Intent { kind: what, what, part: None, lookup };
    let (created, marked) = create_with_intent(api, obj, ctx, intent, create).await?;
    match id_of(&created) {
        Some(id) => record_external_name(api, &marked, &id).await?,
        None => clear_create_pending(api, &marked).await?,
    }
    Ok(created)
}

/// [`create_once`] for one of several cloud resources an object owns (a
/// Network's VPC, subnets, gateway and security group; a KeyPair's cloud
/// key): the mark names `part`, and stays after the create until a lookup
/// finds the part ([`PendingCreate::resolved_by`]), so a read that lags the
/// create is waited for instead of creating the part again. Returns the
/// object as written (with the mark), for the next part's create.
/// `kind` names the kind of resource (`subnet`) for the fault points.
pub async fn create_part_once<K, T, F, Fut>(
    api: &Api<K>,
    obj: &K,
    ctx: &Context,
    kind: &str,
    part: &str,
    create: F,
) -> Result<(T, K)>
where
    K: Reconciler,
    F: FnOnce() -> Fut,
    Fut: Future<Output = std::result::Result<T, ProviderError>>,
{
    let intent = Intent { kind, what: part, part: Some(part), lookup: Lookup::Lagging };
    create_with_intent(api, obj, ctx, intent, create).await
}

/// The `nixops.io/create-pending` mark: when the intent to create was
/// recorded and, for an object owning several cloud resources, which one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PendingCreate {
    /// The whole annotation value: "<RFC 3339 time>[ <part>]".
    pub mark: String,
    pub part: Option<String>,
}

impl PendingCreate {
    /// The mark on `obj`, if any.
    pub fn of<K: Resource>(obj: &K) -> Option<Self> {
        let mark = obj.annotations().get(CREATE_PENDING_ANNOTATION)?.clone();
        let part = mark.split_once(' ').map(|(_, part)| part.to_owned());
        Some(Self { mark, part })
    }

    fn new(part: Option<&str>) -> Self {
        let now = k8s_openapi::jiff::Timestamp::now().to_string();
        let mark = match part {
            Some(part) => format!("{now} {part}"),
            None => now,
        };
        Self { mark, part: part.map(str::to_owned) }
    }

    /// How long ago the intent was recorded.
    fn age(&self) -> Duration {
        let at = self.mark.split_once(' ').map_or(self.mark.as_str(), |(at, _)| at);
        at.parse::<k8s_openapi::jiff::Timestamp>()
            .map(|t| k8s_openapi::jiff::Timestamp::now().duration_since(t).unsigned_abs())
            .unwrap_or_default()
    }

    /// Whether a lookup that found `found` (part names) settles this mark.
    pub fn resolved_by(&self, found: &[String]) -> bool {
        self.part.as_ref().is_some_and(|part| found.contains(part))
    }

    /// `obj` without the mark, in memory: the next create replaces it in
    /// one write instead of two.
    pub fn remove_from<K: Resource>(obj: &mut K) {
        if let Some(a) = obj.meta_mut().annotations.as_mut() {
            a.remove(CREATE_PENDING_ANNOTATION);
        }
    }
}

/// Clears the create-pending mark (a pending create that a lookup found).
pub async fn clear_create_pending<K: Reconciler>(api: &Api<K>, obj: &K) -> Result<()> {
    if obj.annotations().contains_key(CREATE_PENDING_ANNOTATION) {
        let patch = serde_json::json!({"metadata": {"annotations": {CREATE_PENDING_ANNOTATION: null}}});
        api.patch(&obj.name_any(), &PatchParams::default(), &Patch::Merge(&patch)).await?;
    }
    Ok(())
}

/// What [`create_with_intent`] creates: `kind` of resource (`subnet`, for
/// the fault points), `what` in messages, which `part` of its object (None:
/// the object's one resource), and how soon a lookup sees it.
struct Intent<'a> {
    kind: &'a str,
    what: &'a str,
    part: Option<&'a str>,
    lookup: Lookup,
}

/// The create-pending flow of [`create_once`] and [`create_part_once`]:
/// checks the mark, records the intent, creates. Returns what was created
/// and the object as last written. The fault points are evaluated as
/// `create-before-call` and as `create-before-call:<kind>` (likewise after).
async fn create_with_intent<K, T, F, Fut>(
    api: &Api<K>,
    obj: &K,
    ctx: &Context,
    intent: Intent<'_>,
    create: F,
) -> Result<(T, K)>
where
    K: Reconciler,
    F: FnOnce() -> Fut,
    Fut: Future<Output = std::result::Result<T, ProviderError>>,
{
    let Intent { kind, what, part, lookup } = intent;
    let uid = obj.meta().uid.clone().unwrap_or_default();
    let pending = PendingCreate::of(obj);
    let refused = ctx.refused_creates.lock().unwrap_or_else(|e| e.into_inner()).get(&uid).cloned();
    let window = ctx.settings.create_pending_window;
    let mut known_unmade = false;
    match (&pending, &refused) {
        // What this process saw fail is known only for the part it tried:
        // another part missing now may be a read lagging its create.
        (Some(p), Some(r)) if p.mark == r.mark && p.part.as_deref() == part => {
            let now = Instant::now();
            if let Some((reason, message)) = &r.permanent
                && r.generation == obj.meta().generation
                && now < r.not_before
            {
                // A refusal that needs a spec change stays what it was until then.
                return Err(Error::stalled(reason, message.clone()));
            }
            if !r.answered && now < r.at + window && lookup == Lookup::Lagging {
                return Err(ProviderError::Transient(format!(
                    "creating the {what} failed without an answer ({}); looking for it by its nixops.io/uid tag \
                     for {} s more before creating again",
                    r.message,
                    (r.at + window - now).as_secs().max(1)
                ))
                .into());
            }
            known_unmade = true;
        }
        // The lookup would have found it: the create never reached the backend.
        (Some(_), _) if lookup == Lookup::Immediate => {}
        (Some(p), _) => {
            let pending_what = p.part.as_deref().unwrap_or(what);
            let at = p.mark.split_once(' ').map_or(p.mark.as_str(), |(at, _)| at);
            if p.age() < window {
                return Err(ProviderError::Transient(format!(
                    "a create of the {pending_what} started at {at} has an unknown outcome; looking for it by its \
                     nixops.io/uid tag for up to {} s before creating again",
                    window.as_secs()
                ))
                .into());
            }
            let adopt = match &p.part {
                None => format!("set the {} annotation to its ID to adopt it", crate::api::EXTERNAL_NAME_ANNOTATION),
                Some(_) => format!("tag it nixops.io/uid={uid} so it is found"),
            };
            return Err(Error::stalled(
                "CreateOutcomeUnknown",
                format!(
                    "a create of the {pending_what} started at {at} has an unknown outcome and no resource tagged \
                     nixops.io/uid={uid} appeared within {} s. If one exists, {adopt}; if none does, remove the \
                     {CREATE_PENDING_ANNOTATION} annotation to create it",
                    window.as_secs(),
                ),
            ));
        }
        _ => {}
    }
    // After a create known not to have happened the same mark serves again:
    // writing a new one would wake the object at once and defeat the backoff.
    let (mark, marked) = match pending {
        Some(p) if known_unmade => (p.mark, obj.clone()),
        _ => {
            let mark = PendingCreate::new(part).mark;
            let mut updated = obj.clone();
            updated
                .meta_mut()
                .annotations
                .get_or_insert_with(Default::default)
                .insert(CREATE_PENDING_ANNOTATION.to_owned(), mark.clone());
            let written = api.replace(&obj.name_any(), &kube::api::PostParams::default(), &updated).await?;
            (mark, written)
        }
    };
    use crate::fault::points::{CREATE_AFTER_CALL, CREATE_BEFORE_CALL};
    crate::fault::point(CREATE_BEFORE_CALL, None).await;
    crate::fault::point(&format!("{CREATE_BEFORE_CALL}:{kind}"), None).await;
    let created = create().await;
    crate::fault::point(CREATE_AFTER_CALL, None).await;
    crate::fault::point(&format!("{CREATE_AFTER_CALL}:{kind}"), None).await;
    match created {
        Ok(created) => {
            ctx.refused_creates.lock().unwrap_or_else(|e| e.into_inner()).remove(&uid);
            Ok((created, marked))
        }
        Err(err) => {
            // A refusal means nothing was made; without an answer the mark
            // stays and the lookup by tag settles it first.
            let answered = matches!(err, ProviderError::Permanent { .. } | ProviderError::Refused(_));
            let permanent = match &err {
                ProviderError::Permanent { reason, message } => Some((*reason, message.clone())),
                _ => None,
            };
            let mut refused = ctx.refused_creates.lock().unwrap_or_else(|e| e.into_inner());
            // Asked again at the resync, or at once when the spec changes.
            let backoff = if permanent.is_some() { ctx.settings.resync } else { Duration::ZERO };
            let now = Instant::now();
            refused.insert(
                uid,
                FailedCreate {
                    mark,
                    answered,
                    permanent,
                    generation: obj.meta().generation,
                    at: now,
                    not_before: now + backoff,
                    message: err.to_string(),
                },
            );
            Err(err.into())
        }
    }
}

/// A create that failed, remembered by this process (not on the object:
/// writing the object would wake it at once and defeat the backoff).
#[derive(Clone, Debug)]
pub struct FailedCreate {
    /// The create-pending mark of that attempt.
    mark: String,
    /// The cloud answered with a refusal, so nothing was created.
    answered: bool,
    /// The refusal needs a spec change: its reason and message.
    permanent: Option<(&'static str, String)>,
    /// The spec generation it was made for; a new spec may try at once.
    generation: Option<i64>,
    at: Instant,
    not_before: Instant,
    message: String,
}

/// A watch mapper that wakes the objects of a kind that use a Network
/// (`network_of` names it) when that Network appears, changes its spec,
/// becomes Ready or not, or is being deleted; not on every status write
/// (members' readiness changes it all the time).
pub fn network_dependents<K>(
    store: kube::runtime::reflector::Store<K>,
    network_of: fn(&K) -> Option<&str>,
) -> impl Fn(crate::api::Network) -> Vec<kube::runtime::reflector::ObjectRef<K>> + Send + Sync + 'static
where
    K: Reconciler,
{
    let seen = Mutex::new(HashMap::<String, (Option<i64>, bool, bool)>::new());
    move |network| {
        let projection = (
            network.metadata.generation,
            network.status.as_ref().is_some_and(|s| status::is_true(&s.conditions, condition::READY)),
            network.metadata.deletion_timestamp.is_some(),
        );
        let key = object_key(&network);
        {
            let mut seen = seen.lock().unwrap_or_else(|e| e.into_inner());
            if seen.insert(key, projection) == Some(projection) {
                return Vec::new();
            }
        }
        let ns = network.namespace();
        let name = network.name_any();
        store
            .state()
            .into_iter()
            .filter(|o| o.namespace() == ns && network_of(o) == Some(name.as_str()))
            .map(|o| kube::runtime::reflector::ObjectRef::from_obj(&*o))
            .collect()
    }
}

/// Records the cloud ID in the `nixops.io/external-name` annotation (so a
/// restore without status finds the resource) and clears the intent.
pub async fn record_external_name<K: Reconciler>(api: &Api<K>, obj: &K, id: &str) -> Result<()> {
    let patch = serde_json::json!({"metadata": {"annotations": {
        crate::api::EXTERNAL_NAME_ANNOTATION: id,
        CREATE_PENDING_ANNOTATION: null,
    }}});
    api.patch(&obj.name_any(), &PatchParams::default(), &Patch::Merge(&patch)).await?;
    Ok(())
}

/// Annotation set between recording the intent to create and recording the result.
pub const CREATE_PENDING_ANNOTATION: &str = "nixops.io/create-pending";

/// Writes `status` with server-side apply if it differs from the stored one.
/// Returns whether it wrote.
pub async fn write_status<K: Reconciler>(api: &Api<K>, obj: &K, status: K::Status, ctx: &Context) -> Result<bool> {
    if obj.status() == Some(&status) {
        return Ok(false);
    }
    let patch = serde_json::json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "status": status,
    });
    api.patch_status(&obj.name_any(), &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&patch)).await?;
    ctx.metrics.status_writes.with_label_values(&[K::KIND]).inc();
    Ok(true)
}

/// Implements [`ObjectStatus`] for a status type with `observed_generation`,
/// `conditions` and `phase` fields.
macro_rules! object_status {
    ($status:ty, failed = $failed:expr, deleting = $deleting:expr) => {
        impl $crate::controller::ObjectStatus for $status {
            fn conditions_mut(&mut self) -> &mut Vec<$crate::api::Condition> {
                &mut self.conditions
            }
            fn conditions(&self) -> &[$crate::api::Condition] {
                &self.conditions
            }
            fn observed_generation(&self) -> Option<i64> {
                self.observed_generation
            }
            fn set_observed_generation(&mut self, generation: Option<i64>) {
                self.observed_generation = generation;
            }
            fn set_failed(&mut self) {
                self.phase = Some($failed);
            }
            fn set_deleting(&mut self) {
                self.phase = Some($deleting);
            }
        }
    };
}
pub(crate) use object_status;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::NetworkStatus;
    use status::is_true;

    fn ready_at(generation: i64) -> NetworkStatus {
        let mut status = NetworkStatus { observed_generation: Some(generation), ..NetworkStatus::default() };
        Conditions::new(&mut status.conditions, Some(generation)).ready("Ready", "3 machines");
        status
    }

    #[test]
    fn pausing_an_applied_spec_keeps_its_status_and_adds_paused() {
        let status = paused_status(Some(&ready_at(2)), Some(2));
        assert_eq!(status.observed_generation, Some(2));
        assert!(is_true(&status.conditions, condition::READY));
        assert!(is_true(&status.conditions, condition::PAUSED));
        assert!(!status.conditions.iter().any(|c| c.type_ == condition::RECONCILING));
    }

    #[test]
    fn a_spec_changed_while_paused_is_not_reported_as_observed() {
        let mut before = ready_at(2);
        Conditions::new(&mut before.conditions, Some(2)).stalled("HostKeyMismatch", "bad key");
        let status = paused_status(Some(&before), Some(3));
        assert_eq!(status.observed_generation, Some(2), "observedGeneration stays at the spec acted on");
        assert!(is_true(&status.conditions, condition::RECONCILING));
        assert!(!status.conditions.iter().any(|c| c.type_ == condition::STALLED), "Stalled was about generation 2");
        let paused = status.conditions.iter().find(|c| c.type_ == condition::PAUSED).unwrap();
        assert!(paused.message.contains("generation 3 is not applied"), "{}", paused.message);
        assert!(paused.message.contains("status describes generation 2"), "{}", paused.message);

        // Unpaused, the reconciler starts from a status without what pausing added.
        let resumed = acting_status(Some(&status), Some(3));
        assert_eq!(resumed.observed_generation, Some(3));
        assert!(!resumed.conditions.iter().any(|c| c.type_ == condition::RECONCILING));
        assert!(!resumed.conditions.iter().any(|c| c.type_ == condition::PAUSED));
        assert!(
            resumed.conditions.iter().any(|c| c.type_ == condition::READY),
            "other conditions stay until the reconciler sets them"
        );
    }

    #[test]
    fn a_pending_part_is_settled_only_by_finding_that_part() {
        let mut net = k8s_openapi::api::core::v1::ConfigMap::default();
        assert_eq!(PendingCreate::of(&net), None);
        let mark = PendingCreate::new(Some("subnet public-a"));
        net.metadata.annotations =
            Some([(CREATE_PENDING_ANNOTATION.to_owned(), mark.mark.clone())].into_iter().collect());
        let pending = PendingCreate::of(&net).unwrap();
        assert_eq!(pending, mark);
        assert_eq!(pending.part.as_deref(), Some("subnet public-a"));
        assert!(pending.age() < Duration::from_secs(60), "the time parses: {}", pending.mark);
        assert!(!pending.resolved_by(&["VPC".into()]), "found only the VPC: a read may lag the subnet's create");
        assert!(pending.resolved_by(&["VPC".into(), "subnet public-a".into()]));

        // A whole-object mark (an instance, a volume) is settled by recording the external name instead.
        let whole = PendingCreate::new(None);
        assert_eq!(whole.part, None);
        assert!(!whole.resolved_by(&["VPC".into()]));
        assert!(whole.age() < Duration::from_secs(60));

        PendingCreate::remove_from(&mut net);
        assert_eq!(PendingCreate::of(&net), None);
    }

    #[test]
    fn an_object_created_paused_is_reconciling() {
        let status: NetworkStatus = paused_status(None, Some(1));
        assert_eq!(status.observed_generation, None);
        assert!(is_true(&status.conditions, condition::RECONCILING));
        assert!(is_true(&status.conditions, condition::PAUSED));
    }
}
