//! The Machine controller's build step (spec.nixos.build), before deploy:
//! resolve the followed ref to a commit on the builder (`git ls-remote`),
//! build that commit's toplevel there, and hand the result to the deploy
//! step exactly as a pasted closure, with the builder's store as the
//! closure's source.
//!
//! One build serves every member of the Network that follows the same
//! repository, expression and ref with the same builder: the first member
//! to need a commit starts a job that evaluates and builds all their
//! toplevels in one go, the others find it (the [`Builds`] registry). A
//! job for a newer commit of the same ref stops the older one on the
//! builder. At most `spec.build.maxConcurrentBuilds` jobs run per builder.
//! A failed or refused commit leaves the machine on the system it runs.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::events::EventType;
use tokio::sync::Semaphore;

use super::deploy::Target;
use super::status::Conditions;
use super::{Context, Error, Result};
use crate::api::build::{BuildOn, BuildRecord, BuildResult, BuildSpec};
use crate::api::machine::{MachinePhase, MachineStatus};
use crate::api::{KeyPair, Machine, Network};
use crate::fault;
use crate::metrics::Metrics;
use crate::nix::build::{self as script, BuildRequest, Expression};
use crate::nix::push::PathSource;
use crate::nix::remote_store::RemoteStore;
use crate::provider::{MachineTarget, Owner, ProviderError};
use crate::ssh::{HostKey, Session, SshError};

/// Machine condition types set by builds.
pub mod conditions {
    /// spec.nixos.build's current commit is built; the message says which.
    pub const BUILT: &str = "Built";
}

/// How soon a Machine waiting for its build looks again.
const BUILD_RECHECK: Duration = Duration::from_secs(2);
/// How long a finished job's result stays for members that have not
/// picked it up yet.
const KEEP_FINISHED: Duration = Duration::from_secs(600);
/// Lines of a failed build's log in status, and bytes of it in the event
/// (an Event's note holds at most 1 kB).
const STATUS_LOG_LINES: usize = 8;
const EVENT_LOG_BYTES: usize = 900;

/// A closure ready for the deploy step.
pub struct Deployable {
    /// The Machine with spec.nixos.closure set to what was built.
    pub machine: Machine,
    /// Where its paths come from: the builder's store.
    pub source: PathSource,
}

/// What the build step leaves the deploy step.
pub enum Outcome {
    /// Deploy this.
    Deploy(Box<Deployable>),
    /// Nothing to deploy yet; look again after this long.
    Wait(Duration),
}

/// The closure a Machine should run: spec.nixos.closure, or for a built
/// system the closure its last successful build produced.
pub fn desired_closure(machine: &Machine) -> Option<&str> {
    let nixos = machine.spec.nixos.as_ref()?;
    if nixos.build.is_none() {
        return Some(nixos.closure.as_str());
    }
    machine.status.as_ref()?.build.as_ref().filter(|b| b.result == BuildResult::Succeeded)?.closure.as_deref()
}

/// What a Machine's build spec asks for, resolved against its name.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Wanted {
    url: String,
    expression: Expression,
    attribute: String,
    /// What the job follows: `ref:<name>`, `HEAD`, or `rev:<rev>` (never superseded).
    follows: String,
    /// The installable, as status.build.source records it.
    source: String,
    signers: Vec<String>,
}

impl Wanted {
    fn of(name: &str, spec: &BuildSpec) -> Self {
        let (expression, attribute) = match &spec.file {
            Some(file) => (Expression::File(file.clone()), spec.attribute.clone().unwrap_or_else(|| name.to_owned())),
            None => (Expression::Flake, spec.flake.clone().unwrap_or_else(|| format!("nixosConfigurations.{name}"))),
        };
        let follows = match (&spec.git.rev, &spec.git.ref_name) {
            (Some(rev), _) => format!("rev:{rev}"),
            (None, Some(r)) => format!("ref:{r}"),
            (None, None) => "HEAD".into(),
        };
        let mut signers = spec.require_signed_by.clone();
        signers.sort();
        // What was built includes whose signature was checked: a build
        // made before requireSignedBy (or under other keys) is not taken
        // for a verified one.
        let mut source = expression.installable(&spec.git.url, &attribute);
        if !signers.is_empty() {
            let digest = crate::nix::keys::sha256_hex(signers.join("\n").as_bytes());
            source += &format!(" (signed by one of {} keys, {})", signers.len(), &digest[..12]);
        }
        Self { url: spec.git.url.clone(), expression, attribute, follows, source, signers }
    }
}

/// Where builds of a Machine run.
struct Builder {
    /// "namespace/name" of the builder Machine, or "target:<uid>".
    id: String,
    /// The builder Machine's name; None when the machine builds itself.
    name: Option<String>,
    max_builds: i32,
}

/// Builds running or recently finished, shared by all Machines.
#[derive(Default)]
pub struct Builds {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    jobs: Vec<Arc<Job>>,
    /// Per builder: its limit and slots.
    slots: HashMap<String, (i32, Arc<Semaphore>)>,
}

/// One build of one commit for one or more machines.
struct Job {
    builder: String,
    url: String,
    expression: Expression,
    follows: String,
    /// The keys the commit must be signed with: part of what the job is,
    /// so a Machine that requires signatures never takes an unchecked build.
    signers: Vec<String>,
    rev: String,
    /// Names the job's pid file on the builder.
    id: String,
    attributes: Vec<String>,
    started: Time,
    outcome: Mutex<Option<(JobOutcome, Instant)>>,
    task: Mutex<Option<tokio::task::AbortHandle>>,
    /// Set when a newer commit superseded the job.
    cancelled: std::sync::atomic::AtomicBool,
}

#[derive(Clone, Debug)]
enum JobOutcome {
    /// The toplevel of each attribute.
    Built(Vec<(String, String)>),
    /// Failed or Refused, with a headline and the log's end.
    Failed { result: BuildResult, headline: String, log: String },
    /// Could not run (connection lost, fetch failed): tried again.
    Transient(String),
}

impl Job {
    fn outcome(&self) -> Option<JobOutcome> {
        self.outcome.lock().unwrap_or_else(|e| e.into_inner()).as_ref().map(|(o, _)| o.clone())
    }

    fn finished_before(&self, age: Duration) -> bool {
        self.outcome.lock().unwrap_or_else(|e| e.into_inner()).as_ref().is_some_and(|(_, at)| at.elapsed() > age)
    }
}

impl Builds {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn slots(&self, builder: &str, max: i32) -> Arc<Semaphore> {
        let mut inner = self.lock();
        let entry = inner
            .slots
            .entry(builder.to_owned())
            .or_insert_with(|| (max, Arc::new(Semaphore::new(max.max(1) as usize))));
        if entry.0 != max {
            *entry = (max, Arc::new(Semaphore::new(max.max(1) as usize)));
        }
        entry.1.clone()
    }

    /// The job building `rev` for `wanted` on `builder`: a running or
    /// finished one that includes its attribute, else a new one for
    /// `attributes`, which replaces (and stops) jobs of older commits of
    /// the same ref. With `retry`, a failed job is not taken but run again
    /// (the spec changed since that failure). Returns the job, whether it
    /// is new, and the jobs to stop on the builder.
    fn job_for(
        &self,
        builder: &str,
        wanted: &Wanted,
        rev: &str,
        attributes: Vec<String>,
        retry: bool,
    ) -> (Arc<Job>, bool, Vec<Arc<Job>>) {
        let mut inner = self.lock();
        let same_line = |j: &Job| {
            j.builder == builder
                && j.url == wanted.url
                && j.expression == wanted.expression
                && j.follows == wanted.follows
                && j.signers == wanted.signers
        };
        let stale = |j: &Job| {
            let failed = matches!(j.outcome(), Some(JobOutcome::Failed { .. }));
            j.finished_before(KEEP_FINISHED)
                || matches!(j.outcome(), Some(JobOutcome::Transient(_)))
                || (retry && failed && j.rev == rev && same_line(j))
        };
        inner.jobs.retain(|j| !stale(j));
        if let Some(job) =
            inner.jobs.iter().find(|j| same_line(j) && j.rev == rev && j.attributes.contains(&wanted.attribute))
        {
            return (job.clone(), false, Vec::new());
        }
        let (superseded, kept): (Vec<_>, Vec<_>) =
            inner.jobs.drain(..).partition(|j| same_line(j) && j.rev != rev && j.outcome().is_none());
        inner.jobs = kept;
        let line = format!("{} {:?} {} {}", wanted.url, wanted.expression, wanted.follows, wanted.signers.join(" "));
        let line = crate::nix::keys::sha256_hex(line.as_bytes());
        let key = format!("{builder} {line} {rev} {}", attributes.join(" "));
        let digest = crate::nix::keys::sha256_hex(key.as_bytes());
        let job = Arc::new(Job {
            builder: builder.to_owned(),
            url: wanted.url.clone(),
            expression: wanted.expression.clone(),
            follows: wanted.follows.clone(),
            signers: wanted.signers.clone(),
            rev: rev.to_owned(),
            id: format!("{}-{}-{}", &line[..12], &rev[..rev.len().min(12)], &digest[..12]),
            attributes,
            started: Time(Timestamp::now()),
            outcome: Mutex::default(),
            task: Mutex::default(),
            cancelled: Default::default(),
        });
        inner.jobs.push(job.clone());
        (job, true, superseded)
    }
}

/// Runs the build step for `machine`, whose spec.nixos.build is set.
pub async fn reconcile(
    machine: &Machine,
    network: &Network,
    ctx: &Arc<Context>,
    target: &Target,
    status: &mut MachineStatus,
) -> Result<Outcome> {
    let Some(spec) = machine.spec.nixos.as_ref().and_then(|n| n.build.as_ref()) else {
        return Err(Error::stalled("NoBuild", "spec.nixos.build is not set"));
    };
    let ns = machine.namespace().unwrap_or_default();
    let name = machine.name_any();
    let generation = machine.metadata.generation;
    let wanted = Wanted::of(&name, spec);
    let builder = builder_of(machine, network, spec)?;
    let session = Arc::new(match &builder.name {
        None => connect(ctx, target).await.map_err(|e| ssh_error(e, "the machine"))?,
        Some(b) => {
            let target = builder_target(ctx, &ns, network, b).await?;
            connect(ctx, &target).await.map_err(|e| ssh_error(e, &format!("builder {b}")))?
        }
    });
    let rev = match &spec.git.rev {
        Some(rev) => rev.clone(),
        None => resolve_ref(&session, &wanted, spec.git.ref_name.as_deref()).await?,
    };

    if let Some(previous) = status.build.as_ref().filter(|b| b.rev == rev && b.source == wanted.source) {
        match (previous.result, &previous.closure) {
            (BuildResult::Succeeded, Some(closure)) => {
                let message = format!("built {closure} from {} at {rev}", wanted.source);
                let deploy = Outcome::Deploy(Box::new(deployable(machine, closure, session)));
                // Unchanged but for the generation it now speaks for.
                Conditions::new(&mut status.conditions, generation).set(conditions::BUILT, true, "Built", message);
                return Ok(deploy);
            }
            (BuildResult::Failed | BuildResult::Refused, _) if previous.spec_generation == generation => {
                let err = failed_error(previous, &name);
                not_built(status, generation, &err);
                return Err(err);
            }
            _ => {}
        }
    }

    let attributes = group_attributes(ctx, machine, network, spec, &wanted).await?;
    // A failure recorded for this commit at an older spec generation is built again.
    let retry = status.build.as_ref().is_some_and(|b| {
        b.rev == rev && b.source == wanted.source && matches!(b.result, BuildResult::Failed | BuildResult::Refused)
    });
    let (job, created, superseded) = ctx.builds.job_for(&builder.id, &wanted, &rev, attributes, retry);
    for old in superseded {
        // Stopped on the builder: its task then ends by itself and frees
        // the builder's slot. Only if the builder cannot be told is the
        // task dropped, which frees the slot while the build may go on.
        old.cancelled.store(true, std::sync::atomic::Ordering::SeqCst);
        let stopped = session.exec(&script::cancel_script(&old.id)).await;
        if !stopped.is_ok_and(|out| out.status == Some(0))
            && let Some(task) = old.task.lock().unwrap_or_else(|e| e.into_inner()).take()
        {
            task.abort();
            metrics_cancelled(&ctx.metrics);
        }
        ctx.event(
            machine,
            EventType::Normal,
            "BuildCancelled",
            format!("stopped the build of {} ({}): {} is newer", old.rev, wanted.follows, rev),
        )
        .await;
    }
    if created {
        let credentials = credentials(ctx, &ns, spec).await?;
        let request = BuildRequest {
            url: wanted.url.clone(),
            rev: rev.clone(),
            expression: wanted.expression.clone(),
            attributes: job.attributes.clone(),
            signers: wanted.signers.clone(),
            job: job.id.clone(),
        };
        let slots = ctx.builds.slots(&builder.id, builder.max_builds);
        let handle = tokio::spawn(run(job.clone(), request, credentials, session.clone(), slots, ctx.metrics.clone()));
        *job.task.lock().unwrap_or_else(|e| e.into_inner()) = Some(handle.abort_handle());
        ctx.event(
            machine,
            EventType::Normal,
            "Building",
            format!(
                "building {} at {rev} on {} for {}",
                wanted.url,
                builder.name.as_deref().unwrap_or("the machine itself"),
                job.attributes.join(", ")
            ),
        )
        .await;
    }

    let mut record = BuildRecord {
        rev: rev.clone(),
        source: wanted.source.clone(),
        closure: None,
        builder: builder.name.clone(),
        started_at: Some(job.started.clone()),
        finished_at: None,
        result: BuildResult::Building,
        message: None,
        log_path: Some(script::log_path(&job.id)),
        spec_generation: generation,
    };
    if fault::holds(fault::points::BUILD_BEFORE_OUTCOME) {
        let deadline = Instant::now() + Duration::from_secs(120);
        while job.outcome().is_none() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    match job.outcome() {
        None => {
            status.build = Some(record);
            if matches!(status.phase, None | Some(MachinePhase::Provisioning)) {
                status.phase = Some(MachinePhase::Deploying);
            }
            let message = format!("building {} at {rev}; the machine runs its current system meanwhile", wanted.source);
            Conditions::new(&mut status.conditions, generation)
                .set(conditions::BUILT, false, "Building", message.clone())
                .reconciling("Building", message);
            Ok(Outcome::Wait(BUILD_RECHECK))
        }
        Some(JobOutcome::Transient(why)) => {
            Err(ProviderError::Transient(format!("building {} at {rev}: {why}", wanted.source)).into())
        }
        Some(JobOutcome::Built(outs)) => {
            let closure =
                outs.iter().find(|(a, _)| *a == wanted.attribute).map(|(_, c)| c.clone()).ok_or_else(|| {
                    ProviderError::Transient(format!("the build of {rev} has no result for {}", wanted.attribute))
                })?;
            record.closure = Some(closure.clone());
            record.result = BuildResult::Succeeded;
            record.finished_at = Some(Time(Timestamp::now()));
            let news = status.build.as_ref().is_none_or(|b| b.closure.as_deref() != Some(closure.as_str()));
            status.build = Some(record);
            Conditions::new(&mut status.conditions, generation).set(
                conditions::BUILT,
                true,
                "Built",
                format!("built {closure} from {} at {rev}", wanted.source),
            );
            if news {
                ctx.event(machine, EventType::Normal, "Built", format!("built {closure} from {rev}")).await;
            }
            Ok(Outcome::Deploy(Box::new(deployable(machine, &closure, session))))
        }
        Some(JobOutcome::Failed { result, headline, log }) => {
            let tail = script::log_tail(&log, STATUS_LOG_LINES);
            record.result = result;
            record.finished_at = Some(Time(Timestamp::now()));
            record.message = Some(if tail.is_empty() { headline.clone() } else { format!("{headline}\n{tail}") });
            let start = log.len().saturating_sub(EVENT_LOG_BYTES);
            let start = (start..log.len()).find(|i| log.is_char_boundary(*i)).unwrap_or(log.len());
            let reason = if result == BuildResult::Refused { "BuildRefused" } else { "BuildFailed" };
            ctx.event(machine, EventType::Warning, reason, format!("{headline}: …{}", &log[start..])).await;
            let err = failed_error(&record, &name);
            status.build = Some(record);
            not_built(status, generation, &err);
            Err(err)
        }
    }
}

/// Says in the Built condition that the wanted commit was not built. A
/// build can end before the reconcile that started it looks at it, so the
/// condition may still speak of an earlier commit's success: it must not
/// stay True beside a failure.
fn not_built(status: &mut MachineStatus, generation: Option<i64>, err: &Error) {
    if let Error::Stalled { reason, message } = err {
        Conditions::new(&mut status.conditions, generation).set(conditions::BUILT, false, reason, message.clone());
    }
}

/// The Stalled error for a failed or refused build: the machine stays on
/// its current system until a new commit or a spec change.
fn failed_error(record: &BuildRecord, machine: &str) -> Error {
    let what = record.message.as_deref().unwrap_or("the build failed");
    let whole = if record.log_path.is_some() {
        format!(" (the whole log: kubectl nixops build-log {machine})")
    } else {
        String::new()
    };
    let (reason, fix) = match record.result {
        BuildResult::Refused => (
            "UnsignedCommit",
            "push a commit signed by one of spec.nixos.build.requireSignedBy, or add its signer's key there",
        ),
        _ => ("BuildFailed", "push a fixed commit or change spec.nixos.build"),
    };
    Error::stalled(
        reason,
        format!(
            "{} at {} was not built, so the machine stays on its current system; to go on, {fix}{whole}. {what}",
            record.source, record.rev
        ),
    )
}

/// Runs one job on the builder and records its outcome.
async fn run(
    job: Arc<Job>,
    request: BuildRequest,
    credentials: Vec<u8>,
    session: Arc<Session>,
    slots: Arc<Semaphore>,
    metrics: Metrics,
) {
    let outcome = match slots.acquire_owned().await {
        Err(_) => JobOutcome::Transient("the builder's slots are gone".into()),
        // Superseded while it waited for a slot: never started.
        Ok(_) if job.cancelled.load(std::sync::atomic::Ordering::SeqCst) => {
            JobOutcome::Transient("superseded by a newer commit".into())
        }
        Ok(_slot) => {
            let out = async {
                let mut process = session.spawn(&request.command()).await?;
                process.send(credentials).await?;
                let started = format!("{}\n", script::STARTED);
                process.read_exact(started.len()).await?;
                fault::point(fault::points::BUILD_AFTER_START, Some(&session)).await;
                process.finish().await
            };
            outcome_of(out.await, &request)
        }
    };
    if job.cancelled.load(std::sync::atomic::Ordering::SeqCst) {
        metrics_cancelled(&metrics);
        return;
    }
    let label = match &outcome {
        JobOutcome::Built(_) => "Succeeded",
        JobOutcome::Failed { result: BuildResult::Refused, .. } => "Refused",
        JobOutcome::Failed { .. } => "Failed",
        JobOutcome::Transient(_) => "Error",
    };
    metrics.builds.with_label_values(&[label]).inc();
    *job.outcome.lock().unwrap_or_else(|e| e.into_inner()) = Some((outcome, Instant::now()));
}

fn metrics_cancelled(metrics: &Metrics) {
    metrics.builds.with_label_values(&["Cancelled"]).inc();
}

/// What the build script's exit and output mean.
fn outcome_of(out: Result<crate::ssh::CommandOutput, SshError>, request: &BuildRequest) -> JobOutcome {
    let out = match out {
        Ok(out) => out,
        Err(err) => return JobOutcome::Transient(err.to_string()),
    };
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    let failed = |result, headline: String| JobOutcome::Failed { result, headline, log: log.clone() };
    match out.status {
        Some(0) => match script::parse_pairs(&String::from_utf8_lossy(&out.stdout), &request.attributes) {
            Some(outs) => JobOutcome::Built(outs),
            None => failed(BuildResult::Failed, "the build printed no toplevel for every attribute".into()),
        },
        Some(script::exit::UNSIGNED) => {
            failed(BuildResult::Refused, format!("commit {} is not signed by an allowed key", request.rev))
        }
        Some(script::exit::NO_COMMIT) => {
            failed(BuildResult::Failed, format!("commit {} is not in {}", request.rev, request.url))
        }
        Some(script::exit::EVAL) => failed(BuildResult::Failed, format!("evaluating {} failed", request.rev)),
        Some(script::exit::BUILD) => failed(BuildResult::Failed, format!("building {} failed", request.rev)),
        // Stopped (a newer commit's build on the builder stopped it), or the
        // connection was lost: looked at again.
        Some(script::exit::FETCH | script::exit::STOPPED) | None => {
            JobOutcome::Transient(format!("fetching or exporting the commit: {}", script::log_tail(&log, 3)))
        }
        Some(other) => failed(BuildResult::Failed, format!("the build script exited with {other}")),
    }
}

/// The deploy step's input: the machine with the built closure, pushed
/// from the builder's store.
fn deployable(machine: &Machine, closure: &str, session: Arc<Session>) -> Deployable {
    let mut machine = machine.clone();
    if let Some(nixos) = machine.spec.nixos.as_mut() {
        nixos.closure = closure.to_owned();
    }
    Deployable { machine, source: PathSource::Remote(RemoteStore::new(session)) }
}

/// Where `machine` builds: its Network's builder or itself.
fn builder_of(machine: &Machine, network: &Network, spec: &BuildSpec) -> Result<Builder> {
    let named = network.spec.build.as_ref();
    match (spec.build_on, named) {
        (Some(BuildOn::Target), _) | (None, None) => {
            Ok(Builder { id: format!("target:{}", machine.uid().unwrap_or_default()), name: None, max_builds: 1 })
        }
        (_, Some(build)) => Ok(Builder {
            id: format!("{}/{}", machine.namespace().unwrap_or_default(), build.builder.name),
            name: Some(build.builder.name.clone()),
            max_builds: build.max_concurrent_builds,
        }),
        (Some(BuildOn::Builder), None) => Err(Error::stalled(
            "NoBuilder",
            format!(
                "spec.nixos.build.buildOn is Builder but Network {} has no spec.build.builder; name a builder Machine there, or set buildOn: Target",
                network.name_any()
            ),
        )),
    }
}

/// The attributes one job builds: this machine's and those of the
/// Network's other members that follow the same line with the same builder.
async fn group_attributes(
    ctx: &Context,
    machine: &Machine,
    network: &Network,
    spec: &BuildSpec,
    wanted: &Wanted,
) -> Result<Vec<String>> {
    let mut attributes = vec![wanted.attribute.clone()];
    if builder_of(machine, network, spec)?.name.is_none() {
        return Ok(attributes);
    }
    let ns = machine.namespace().unwrap_or_default();
    for member in ctx.stores.members(&ns, &network.name_any()).await? {
        let Some(other) = member.spec.nixos.as_ref().and_then(|n| n.build.as_ref()) else { continue };
        let theirs = Wanted::of(&member.name_any(), other);
        let same_builder = builder_of(&member, network, other).is_ok_and(|b| b.name.is_some());
        if same_builder
            && theirs.url == wanted.url
            && theirs.expression == wanted.expression
            && theirs.follows == wanted.follows
            && theirs.signers == wanted.signers
            && !attributes.contains(&theirs.attribute)
        {
            attributes.push(theirs.attribute);
        }
    }
    Ok(attributes)
}

/// `git ls-remote` on the builder: the commit the ref names now.
async fn resolve_ref(session: &Session, wanted: &Wanted, reference: Option<&str>) -> Result<String> {
    let out = session
        .exec(&script::ls_remote_script(&wanted.url, reference))
        .await
        .map_err(|e| ProviderError::Transient(format!("git ls-remote {}: {e}", wanted.url)))?;
    let what = reference.unwrap_or("HEAD");
    if out.status != Some(0) {
        return Err(ProviderError::Transient(format!(
            "git ls-remote {} on the builder failed: {}",
            wanted.url,
            script::log_tail(&String::from_utf8_lossy(&out.stderr), 3)
        ))
        .into());
    }
    script::parse_ls_remote(&String::from_utf8_lossy(&out.stdout), reference).ok_or_else(|| {
        Error::stalled(
            "RefNotFound",
            format!("{} has no branch or tag {what} (spec.nixos.build.git.ref); fix the ref or push it", wanted.url),
        )
    })
}

/// The credentials Secret's entries, as the build script reads them.
async fn credentials(ctx: &Context, ns: &str, spec: &BuildSpec) -> Result<Vec<u8>> {
    let Some(secret_ref) = &spec.git.credentials_secret_ref else { return Ok(Vec::new()) };
    let secret = Api::<Secret>::namespaced(ctx.client.clone(), ns).get_opt(&secret_ref.name).await?.ok_or_else(|| {
        Error::waiting(
            "CredentialsNotFound",
            format!(
                "Secret {} (spec.nixos.build.git.credentialsSecretRef.name) does not exist yet; create it or fix the reference",
                secret_ref.name
            ),
        )
    })?;
    let data = secret.data.unwrap_or_default();
    let entries: Vec<(&str, &[u8])> = ["identity", "known_hosts", "username", "password"]
        .into_iter()
        .filter_map(|k| data.get(k).map(|v| (k, v.0.as_slice())))
        .collect();
    if entries.is_empty() {
        return Err(Error::stalled(
            "InvalidCredentials",
            format!(
                "Secret {} has none of the keys identity, known_hosts, username, password (spec.nixos.build.git.credentialsSecretRef)",
                secret_ref.name
            ),
        ));
    }
    Ok(script::credentials_input(&entries))
}

async fn connect(ctx: &Context, t: &Target) -> Result<Session, SshError> {
    super::deploy::connect(ctx, t, ctx.settings.ssh_timeout).await
}

fn ssh_error(err: SshError, what: &str) -> Error {
    match err {
        SshError::HostKeyMismatch { .. } | SshError::AuthRejected { .. } => {
            Error::stalled("BuilderUnreachable", format!("building on {what}: {err}"))
        }
        other => ProviderError::Transient(format!("building on {what}: {other}")).into(),
    }
}

/// How to reach the builder Machine: its own ssh settings (with its
/// Network's defaults), its address, and the host key it was provisioned
/// with.
async fn builder_target(ctx: &Context, ns: &str, network: &Network, name: &str) -> Result<Target> {
    let builder = ctx.stores.machines_in(ns).await?.into_iter().find(|m| m.name_any() == name).ok_or_else(|| {
        Error::waiting(
            "BuilderNotFound",
            format!("builder Machine {name} (Network {} spec.build.builder) does not exist yet", network.name_any()),
        )
    })?;
    let status = builder.status.clone().unwrap_or_default();
    let host_key = status.host_key.as_deref().ok_or_else(|| {
        Error::waiting(
            "BuilderNotReady",
            format!("builder Machine {name} has not been provisioned yet (no status.hostKey)"),
        )
    })?;
    let host_key = HostKey::parse(host_key, "the builder's status.hostKey")
        .map_err(|e| Error::stalled("InvalidHostKey", e.to_string()))?;
    let resolved = super::machine::resolve(&builder, network)?;
    let ssh = resolved.ssh;
    let (host, port) = match (&ssh.host, &resolved.provider.existing) {
        (Some(host), _) => (host.clone(), ssh.port.unwrap_or(22)),
        (None, Some(existing)) => (existing.host.clone(), ssh.port.unwrap_or(existing.port)),
        (None, None) => {
            let address = status.addresses.first().map(|a| a.address.clone()).ok_or_else(|| {
                Error::waiting("BuilderNotReady", format!("builder Machine {name} has no address yet"))
            })?;
            (address, ssh.port.unwrap_or(22))
        }
    };
    let key_ref = ssh.key_pair_ref.as_ref().ok_or_else(|| {
        Error::stalled(
            "NoKeyPair",
            format!("builder Machine {name} has no spec.ssh.keyPairRef (nor its Network a default); the operator logs in with it"),
        )
    })?;
    let keypair =
        Api::<KeyPair>::namespaced(ctx.client.clone(), ns).get_opt(&key_ref.name).await?.ok_or_else(|| {
            Error::waiting(
                "KeyPairNotFound",
                format!("KeyPair {} of builder Machine {name} does not exist yet", key_ref.name),
            )
        })?;
    let key = super::keypair::private_key(ctx, ns, &keypair).await?;
    let via = match &ssh.jump_host {
        Some(jump) => Some(super::machine::connect_jump_host(ctx, ns, jump, &ssh, Some(&key)).await?),
        // A remote hypervisor in front of the builder's network, say.
        None => {
            let target = MachineTarget {
                owner: Owner::of(&*builder),
                provider: resolved.provider.clone(),
                running: builder.spec.running,
                external_id: None,
                network: Some(network.clone()),
                key_name: None,
                authorized_key: None,
            };
            ctx.providers.machine(&resolved.provider)?.jump(&target).await?
        }
    };
    Ok(Target {
        host,
        port: u16::try_from(port).unwrap_or(22),
        user: ssh.user.clone().unwrap_or_else(|| "root".into()),
        key,
        host_key,
        via,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn machine(name: &str, build: serde_json::Value) -> Machine {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "nixops.io/v1alpha1", "kind": "Machine",
            "metadata": {"name": name, "namespace": "ns", "uid": format!("uid-{name}")},
            "spec": {"networkRef": {"name": "net"}, "nixos": {"build": build}}
        }))
        .unwrap()
    }

    fn network(build: Option<serde_json::Value>) -> Network {
        let mut spec = serde_json::json!({});
        if let Some(b) = build {
            spec["build"] = b;
        }
        serde_json::from_value(serde_json::json!({
            "apiVersion": "nixops.io/v1alpha1", "kind": "Network",
            "metadata": {"name": "net", "namespace": "ns"}, "spec": spec
        }))
        .unwrap()
    }

    #[test]
    fn flakes_default_to_the_machine_name_and_files_to_an_attribute() {
        let spec: BuildSpec =
            serde_json::from_value(serde_json::json!({"git": {"url": "file:///r", "ref": "main"}})).unwrap();
        let w = Wanted::of("web-1", &spec);
        assert_eq!((w.attribute.as_str(), w.follows.as_str()), ("nixosConfigurations.web-1", "ref:main"));
        assert_eq!(w.source, "file:///r#nixosConfigurations.web-1");
        let signed: BuildSpec = serde_json::from_value(
            serde_json::json!({"git": {"url": "file:///r", "ref": "main"}, "requireSignedBy": ["ssh-ed25519 AAAA k"]}),
        )
        .unwrap();
        let s = Wanted::of("web-1", &signed);
        assert!(
            s.source.starts_with(&w.source) && s.source != w.source,
            "a checked build is another build: {}",
            s.source
        );
        let spec: BuildSpec = serde_json::from_value(
            serde_json::json!({"git": {"url": "file:///r", "rev": "a".repeat(40)}, "file": "default.nix"}),
        )
        .unwrap();
        let w = Wanted::of("db", &spec);
        assert_eq!(w.expression, Expression::File("default.nix".into()));
        assert_eq!(w.attribute, "db");
        assert!(w.follows.starts_with("rev:"), "a pinned rev is its own line, never superseded");
    }

    #[test]
    fn builds_run_on_the_named_builder_or_the_machine() {
        let m = machine("a", serde_json::json!({"git": {"url": "file:///r"}}));
        let spec = m.spec.nixos.as_ref().unwrap().build.clone().unwrap();
        assert_eq!(builder_of(&m, &network(None), &spec).unwrap().id, "target:uid-a");
        let net = network(Some(serde_json::json!({"builder": {"name": "b"}, "maxConcurrentBuilds": 2})));
        let b = builder_of(&m, &net, &spec).unwrap();
        assert_eq!((b.id.as_str(), b.max_builds), ("ns/b", 2));
        let on_target = machine("a", serde_json::json!({"git": {"url": "file:///r"}, "buildOn": "Target"}));
        let spec_t = on_target.spec.nixos.as_ref().unwrap().build.clone().unwrap();
        assert!(builder_of(&on_target, &net, &spec_t).unwrap().name.is_none());
        let on_builder = machine("a", serde_json::json!({"git": {"url": "file:///r"}, "buildOn": "Builder"}));
        let spec_b = on_builder.spec.nixos.as_ref().unwrap().build.clone().unwrap();
        assert!(matches!(
            builder_of(&on_builder, &network(None), &spec_b),
            Err(Error::Stalled { reason: "NoBuilder", .. })
        ));
    }

    #[test]
    fn one_job_serves_a_commit_and_a_newer_commit_supersedes_it() {
        let builds = Builds::default();
        let spec: BuildSpec =
            serde_json::from_value(serde_json::json!({"git": {"url": "file:///r", "ref": "main"}})).unwrap();
        let a = Wanted::of("a", &spec);
        let b = Wanted::of("b", &spec);
        let both = vec![a.attribute.clone(), b.attribute.clone()];
        let rev1 = "1".repeat(40);
        let (job, created, _) = builds.job_for("ns/builder", &a, &rev1, both.clone(), false);
        assert!(created);
        let (same, created, _) = builds.job_for("ns/builder", &b, &rev1, both.clone(), false);
        assert!(!created && Arc::ptr_eq(&job, &same), "b's attribute is in a's job");
        let (_, created, superseded) = builds.job_for("ns/builder", &a, &"2".repeat(40), both.clone(), false);
        assert!(created);
        assert_eq!(superseded.len(), 1, "the running job of the older commit is stopped");
        assert_eq!(superseded[0].rev, rev1);
        // A finished job is kept for members that have not picked it up; a transient failure is not.
        let rev3 = "3".repeat(40);
        let (done, _, _) = builds.job_for("ns/builder", &a, &rev3, both.clone(), false);
        *done.outcome.lock().unwrap() = Some((JobOutcome::Transient("cut".into()), Instant::now()));
        let (again, created, _) = builds.job_for("ns/builder", &a, &rev3, both, false);
        assert!(created && !Arc::ptr_eq(&done, &again), "a transient failure is tried again");
    }

    #[test]
    fn script_exits_map_to_results() {
        let request = BuildRequest {
            url: "file:///r".into(),
            rev: "1".repeat(40),
            expression: Expression::Flake,
            attributes: vec!["x".into()],
            signers: vec![],
            job: "j".into(),
        };
        let out = |status, stdout: &str, stderr: &str| {
            Ok(crate::ssh::CommandOutput { status, stdout: stdout.into(), stderr: stderr.into() })
        };
        assert!(matches!(
            outcome_of(out(Some(0), "/nix/store/a.drv /nix/store/aaa-x\n", ""), &request),
            JobOutcome::Built(_)
        ));
        assert!(matches!(
            outcome_of(out(Some(script::exit::UNSIGNED), "", "no signature"), &request),
            JobOutcome::Failed { result: BuildResult::Refused, .. }
        ));
        assert!(matches!(
            outcome_of(out(Some(script::exit::BUILD), "", "error: builder failed"), &request),
            JobOutcome::Failed { result: BuildResult::Failed, .. }
        ));
        assert!(matches!(outcome_of(out(None, "", ""), &request), JobOutcome::Transient(_)));
        assert!(matches!(outcome_of(out(Some(0), "", ""), &request), JobOutcome::Failed { .. }));
    }
}
