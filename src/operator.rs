//! `nixops-operator run`: every controller in one process, behind leader
//! election, with the HTTP endpoints, until SIGTERM.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::Api;
use kube::runtime::controller::Controller;
use kube::runtime::events::Reporter;
use kube::runtime::watcher;
use kube::{Client, Resource};
use serde::de::DeserializeOwned;
use tokio::sync::watch;

use crate::api::{Backup, KeyPair, Machine, Network, S3Bucket, Volume};
use crate::controller::shared::{SharedWatch, Stores};
use crate::controller::{self, Context, KeyPairUsers, Reconciler, Settings};
use crate::http::{self, Health};
use crate::leader::{LeaseLock, LeaseTiming};
use crate::metrics::Metrics;

/// How the operator runs.
#[derive(Clone, Debug)]
pub struct Options {
    /// Watch only this namespace; all namespaces when None.
    pub namespace: Option<String>,
    /// Most objects of one kind reconciled at once.
    pub concurrency: u16,
    pub metrics_addr: SocketAddr,
    /// Leader election: the Lease's namespace and name, or None to run without.
    pub leader_election: Option<(String, String)>,
    pub lease: LeaseTiming,
    pub identity: String,
    pub settings: Settings,
    /// Longest wait for reconciliations in flight after SIGTERM.
    pub shutdown_grace: Duration,
}

/// Errors that stop the operator.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot connect to Kubernetes: {0}")]
    Client(#[source] kube::Error),
    #[error("cannot set up metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("cannot serve HTTP on {addr}: {source}")]
    Http { addr: SocketAddr, source: std::io::Error },
    #[error("lost the leader lease; exiting so that another replica takes over")]
    LeaseLost,
    #[error("{0}")]
    Config(String),
}

/// Runs until SIGTERM/SIGINT (Ok) or until the lease is lost (Err).
pub async fn run(opts: Options) -> Result<(), RunError> {
    if opts.leader_election.is_some() {
        opts.lease.check().map_err(RunError::Config)?;
    }
    let client = Client::try_default().await.map_err(RunError::Client)?;
    let metrics = Metrics::new()?;
    let ready = Arc::new(AtomicBool::new(false));
    let (stop_tx, stop_rx) = watch::channel(false);

    let health = Health { metrics: metrics.clone(), ready: ready.clone() };
    let http_listener = {
        let addr = opts.metrics_addr;
        let mut rx = stop_rx.clone();
        let server = http::serve(addr, health, async move {
            let _ = rx.wait_for(|stop| *stop).await;
        });
        tokio::spawn(async move { server.await.map_err(|source| RunError::Http { addr, source }) })
    };

    let lease = opts.leader_election.as_ref().map(|(ns, name)| {
        LeaseLock::new(Api::<Lease>::namespaced(client.clone(), ns), name, &opts.identity, opts.lease)
    });
    // Ready: able to do its part. Without an election that is at once; with
    // one, once the Lease has answered (as leader or as a standby that can
    // take over). Leading is not required, or a rolling upgrade whose new
    // pod waits for the old one's lease would never finish.
    if lease.is_none() {
        ready.store(true, Ordering::Relaxed);
    }
    let signal = shutdown_signal();
    tokio::pin!(signal);

    if let Some(lease) = &lease {
        tracing::info!(identity = %lease.identity(), "waiting for the leader lease");
        tokio::select! {
            _ = lease.acquire(|| ready.store(true, Ordering::Relaxed)) => {}
            _ = &mut signal => {
                let _ = stop_tx.send(true);
                let _ = http_listener.await;
                return Ok(());
            }
        }
        tracing::info!(identity = %lease.identity(), "leading");
    }
    metrics.leader.set(1);

    let watches = Watches::default();
    let keypair_users = KeyPairUsers::default();
    let ctx = Arc::new(Context::new(
        client.clone(),
        Reporter { controller: "nixops-operator".into(), instance: Some(opts.identity.clone()) },
        metrics.clone(),
        opts.settings.clone(),
        watches.stores(),
        keypair_users.clone(),
    ));
    let controllers = run_controllers(&client, &opts, watches, keypair_users, ctx.clone(), stop_rx.clone());
    tokio::pin!(controllers);

    let result = tokio::select! {
        _ = &mut signal => {
            tracing::info!(in_flight = ctx.in_flight(), "shutting down: finishing reconciliations in flight");
            let _ = stop_tx.send(true);
            // The controllers stop taking new work; wait until they are done,
            // or nothing is in flight any more, or the grace period is over
            // (every step is idempotent, so abandoned work resumes safely).
            tokio::select! {
                _ = &mut controllers => {}
                _ = until_idle(&ctx) => {}
                _ = tokio::time::sleep(opts.shutdown_grace) => {
                    tracing::warn!(in_flight = ctx.in_flight(), "grace period over; abandoning reconciliations in flight");
                }
            }
            Ok(())
        }
        _ = async { match &lease { Some(l) => l.hold().await, None => std::future::pending().await } } => {
            let _ = stop_tx.send(true);
            Err(RunError::LeaseLost)
        }
        _ = &mut controllers => Ok(()),
    };
    metrics.leader.set(0);
    if let Some(lease) = &lease
        && result.is_ok()
    {
        lease.release().await;
    }
    let _ = stop_tx.send(true);
    if let Ok(Err(err)) = http_listener.await {
        tracing::warn!(%err, "HTTP server failed");
    }
    result
}

/// Resolves once no reconciliation has been running for a moment.
async fn until_idle(ctx: &Context) {
    let mut idle_since = None;
    loop {
        match (ctx.in_flight(), idle_since) {
            (0, None) => idle_since = Some(std::time::Instant::now()),
            (0, Some(t)) if t.elapsed() >= Duration::from_millis(300) => return,
            (0, Some(_)) => {}
            _ => idle_since = None,
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn api<K>(client: &Client, namespace: &Option<String>) -> Api<K>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// One shared watch per kind the controllers look up (see
/// [`controller::shared`]).
#[derive(Default)]
struct Watches {
    machines: SharedWatch<Machine>,
    networks: SharedWatch<Network>,
    volumes: SharedWatch<Volume>,
    keypairs: SharedWatch<KeyPair>,
    buckets: SharedWatch<S3Bucket>,
}

impl Watches {
    fn stores(&self) -> Stores {
        Stores {
            machines: self.machines.synced(),
            networks: self.networks.synced(),
            volumes: self.volumes.synced(),
            keypairs: self.keypairs.synced(),
            buckets: self.buckets.synced(),
        }
    }
}

/// Runs one controller per kind, and the shared watches that wake them,
/// until `stop` turns true; reconciliations in flight are finished first.
async fn run_controllers(
    client: &Client,
    opts: &Options,
    mut w: Watches,
    keypair_users: KeyPairUsers,
    ctx: Arc<Context>,
    stop: watch::Receiver<bool>,
) {
    let wc = watcher::Config::default();
    let config = kube::runtime::controller::Config::default().concurrency(opts.concurrency);
    let ns = &opts.namespace;

    let machines = controller::machine::controller(
        &mut w.machines,
        &mut w.networks,
        &mut w.keypairs,
        api(client, ns),
        keypair_users,
        wc.clone(),
    );
    let networks = controller::network::controller(
        &mut w.networks,
        &mut w.machines,
        &mut w.volumes,
        &mut w.keypairs,
        &mut w.buckets,
        api(client, ns),
        wc.clone(),
    );
    let keypairs = controller::keypair::controller(&mut w.keypairs, api(client, ns), &mut w.networks, wc.clone());
    let volumes = controller::volume::controller(&mut w.volumes, &mut w.machines, &mut w.networks);
    let buckets = {
        let store = w.buckets.store();
        fn network_of(b: &S3Bucket) -> Option<&str> {
            Some(&b.spec.network_ref.name)
        }
        Controller::for_stream(w.buckets.applied(), w.buckets.store())
            .watches_stream(w.networks.touched(), controller::network_dependents(store, network_of))
    };

    // Backups look nothing up by watch: their own watch is enough.
    let backups = Controller::new(api::<Backup>(client, ns), wc.clone());

    // Every subscription is made above: the watches start with all their controllers.
    futures::join!(
        w.machines.run(api(client, ns), wc.clone(), stop.clone()),
        w.networks.run(api(client, ns), wc.clone(), stop.clone()),
        w.volumes.run(api(client, ns), wc.clone(), stop.clone()),
        w.keypairs.run(api(client, ns), wc.clone(), stop.clone()),
        w.buckets.run(api(client, ns), wc, stop.clone()),
        drive::<Machine>(machines, config.clone(), ctx.clone(), stop.clone()),
        drive::<Network>(networks, config.clone(), ctx.clone(), stop.clone()),
        drive::<KeyPair>(keypairs, config.clone(), ctx.clone(), stop.clone()),
        drive::<Volume>(volumes, config.clone(), ctx.clone(), stop.clone()),
        drive::<S3Bucket>(buckets, config.clone(), ctx.clone(), stop.clone()),
        drive::<Backup>(backups, config, ctx, stop),
    );
}

async fn drive<K>(
    controller: Controller<K>,
    config: kube::runtime::controller::Config,
    ctx: Arc<Context>,
    mut stop: watch::Receiver<bool>,
) where
    K: Reconciler + DeserializeOwned,
{
    controller
        .with_config(config)
        .graceful_shutdown_on(async move {
            let _ = stop.wait_for(|s| *s).await;
        })
        .run(controller::reconcile::<K>, controller::error_policy::<K>, ctx)
        .for_each(|result| async move {
            if let Err(err) = result {
                tracing::debug!(kind = K::KIND, %err, "controller event");
            }
        })
        .await;
    tracing::info!(kind = K::KIND, "controller stopped");
}

async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(err) => {
            tracing::warn!(%err, "cannot listen for SIGTERM; only Ctrl-C stops the operator");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
