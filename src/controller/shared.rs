//! One watch per kind for the whole operator. Its store serves every lookup
//! a reconciler makes of other objects (a Network's members, a Volume's
//! users, a Machine's Network), and its events wake the controllers.
//!
//! An event reaches the store before any controller hears of it, so a
//! reconcile woken by a change reads that change, or a newer one, from the
//! store: lookups need no LIST from the API server and cannot run behind
//! what woke them.

use std::fmt::Debug;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use kube::api::Api;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Resource, ResourceExt};
use serde::de::DeserializeOwned;
use tokio::sync::{mpsc, watch};

use super::{Error, Result};
use crate::api::network::NetworkStatus;
use crate::api::{KeyPair, Machine, Network, S3Bucket, Volume};

/// Events a subscriber may hold before the watch waits for it.
const SUBSCRIBER_BUFFER: usize = 1024;

/// A kind's watch, its store, and the controllers its events wake.
pub struct SharedWatch<K: Resource<DynamicType = ()> + Clone + 'static> {
    reader: Store<K>,
    writer: reflector::store::Writer<K>,
    /// True once the store holds the first complete list.
    synced: watch::Sender<bool>,
    /// Each subscriber, and whether it hears of deletions too.
    subscribers: Vec<(bool, mpsc::Sender<K>)>,
}

impl<K> Default for SharedWatch<K>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    fn default() -> Self {
        Self::new()
    }
}

impl<K> SharedWatch<K>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    pub fn new() -> Self {
        let (reader, writer) = reflector::store();
        Self { reader, writer, synced: watch::Sender::new(false), subscribers: Vec::new() }
    }

    /// The store this watch keeps.
    pub fn store(&self) -> Store<K> {
        self.reader.clone()
    }

    /// The store, for lookups that wait until it is synced.
    pub fn synced(&self) -> Synced<K> {
        Synced { store: self.reader.clone(), synced: self.synced.subscribe() }
    }

    /// Objects as they are created or changed: what wakes the kind's own
    /// controller (as `Controller::new` would).
    pub fn applied(&mut self) -> impl Stream<Item = Result<K, watcher::Error>> + Send + 'static {
        self.subscribe(false)
    }

    /// Objects as they are created, changed or deleted: what wakes other
    /// kinds' controllers (as `Controller::watches` would).
    pub fn touched(&mut self) -> impl Stream<Item = Result<K, watcher::Error>> + Send + 'static {
        self.subscribe(true)
    }

    fn subscribe(&mut self, deletions: bool) -> impl Stream<Item = Result<K, watcher::Error>> + Send + 'static {
        let (tx, rx) = mpsc::channel(SUBSCRIBER_BUFFER);
        self.subscribers.push((deletions, tx));
        futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|obj| (Ok(obj), rx)) })
    }

    /// Watches `api` until `stop` turns true, keeping the store and passing
    /// each event to the subscribers once the store has it. A slow
    /// subscriber holds the watch back rather than losing events.
    pub async fn run(self, api: Api<K>, wc: watcher::Config, mut stop: watch::Receiver<bool>) {
        let Self { writer, synced, subscribers, .. } = self;
        let kind = K::kind(&());
        let forward = async move {
            let events = reflector::reflector(writer, watcher(api, wc).default_backoff());
            futures::pin_mut!(events);
            while let Some(event) = events.next().await {
                let (obj, deleted) = match event {
                    Ok(watcher::Event::Apply(obj) | watcher::Event::InitApply(obj)) => (obj, false),
                    Ok(watcher::Event::Delete(obj)) => (obj, true),
                    Ok(watcher::Event::InitDone) => {
                        synced.send_replace(true);
                        continue;
                    }
                    Ok(watcher::Event::Init) => continue,
                    Err(err) => {
                        tracing::warn!(%kind, %err, "watch failed; retrying");
                        continue;
                    }
                };
                for (deletions, tx) in &subscribers {
                    if deleted && !deletions {
                        continue;
                    }
                    // A closed subscriber is a controller that has stopped.
                    let _ = tx.send(obj.clone()).await;
                }
            }
        };
        tokio::select! {
            _ = forward => {}
            _ = stop.wait_for(|s| *s) => {}
        }
    }
}

/// A shared watch's store and whether it is synced.
///
/// Not `Store::wait_until_ready`: that wakes only the last of several
/// waiters (a oneshot receiver behind a mutex), so a reconcile waiting on it
/// beside the controller's own runner could wait forever.
#[derive(Clone)]
pub struct Synced<K: Resource<DynamicType = ()> + Clone + 'static> {
    store: Store<K>,
    synced: watch::Receiver<bool>,
}

/// The stores of the shared watches, for lookups by reconcilers.
#[derive(Clone)]
pub struct Stores {
    pub machines: Synced<Machine>,
    pub networks: Synced<Network>,
    pub volumes: Synced<Volume>,
    pub keypairs: Synced<KeyPair>,
    pub buckets: Synced<S3Bucket>,
}

/// A store's objects once it holds the first complete list; before that
/// (or after the watch stopped) nothing is decided from it.
async fn ready<K>(shared: &Synced<K>) -> Result<&Store<K>>
where
    K: Resource<DynamicType = ()> + Clone + 'static,
{
    shared.synced.clone().wait_for(|synced| *synced).await.map_err(|_| Error::Stale)?;
    Ok(&shared.store)
}

impl Stores {
    /// The Machines in `ns` whose spec.networkRef names `network`, sorted by name.
    pub async fn members(&self, ns: &str, network: &str) -> Result<Vec<Arc<Machine>>> {
        let mut members = ready(&self.machines)
            .await?
            .state_filter(|m| m.namespace().as_deref() == Some(ns) && m.spec.network_ref.name == network);
        members.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
        Ok(members)
    }

    /// Every Machine in `ns`.
    pub async fn machines_in(&self, ns: &str) -> Result<Vec<Arc<Machine>>> {
        Ok(ready(&self.machines).await?.state_filter(|m| m.namespace().as_deref() == Some(ns)))
    }

    /// The Network `name` in `ns`, as its references need it: without
    /// status.members, which grows with the Network and which no reference
    /// reads.
    pub async fn network(&self, ns: &str, name: &str) -> Result<Option<Network>> {
        let found = ready(&self.networks).await?.get(&ObjectRef::new(name).within(ns));
        Ok(found.map(|n| Network {
            metadata: n.metadata.clone(),
            spec: n.spec.clone(),
            status: n.status.as_ref().map(without_members),
        }))
    }

    /// The Network `name` in `ns` as stored, status.members included: what
    /// its members publish to their machines.
    pub async fn membership(&self, ns: &str, name: &str) -> Result<Option<Arc<Network>>> {
        Ok(ready(&self.networks).await?.get(&ObjectRef::new(name).within(ns)))
    }

    /// The Volumes, KeyPairs and S3Buckets in `ns` that name Network `network`, as "Kind name", sorted.
    pub async fn network_dependents(&self, ns: &str, network: &str) -> Result<Vec<String>> {
        let in_ns = |meta: &kube::api::ObjectMeta| meta.namespace.as_deref() == Some(ns);
        let mut found = Vec::new();
        for v in ready(&self.volumes).await?.state_filter(|v| in_ns(&v.metadata) && v.spec.network_ref.name == network)
        {
            found.push(format!("Volume {}", v.name_any()));
        }
        for k in ready(&self.keypairs)
            .await?
            .state_filter(|k| in_ns(&k.metadata) && k.spec.network_ref.as_ref().is_some_and(|r| r.name == network))
        {
            found.push(format!("KeyPair {}", k.name_any()));
        }
        for b in ready(&self.buckets).await?.state_filter(|b| in_ns(&b.metadata) && b.spec.network_ref.name == network)
        {
            found.push(format!("S3Bucket {}", b.name_any()));
        }
        found.sort();
        Ok(found)
    }
}

/// A copy of a Network's status without its members. Every field is named,
/// so a field added to NetworkStatus is a compile error here, not a field
/// that references silently lose.
fn without_members(status: &NetworkStatus) -> NetworkStatus {
    let NetworkStatus {
        observed_generation,
        phase,
        conditions,
        provider,
        machines,
        ready_machines,
        updated_machines,
        members: _,
        vpc_id,
        subnets,
        security_group_id,
        internet_gateway_id,
        credentials_secret,
    } = status;
    NetworkStatus {
        observed_generation: *observed_generation,
        phase: *phase,
        conditions: conditions.clone(),
        provider: provider.clone(),
        machines: *machines,
        ready_machines: *ready_machines,
        updated_machines: *updated_machines,
        members: Vec::new(),
        vpc_id: vpc_id.clone(),
        subnets: subnets.clone(),
        security_group_id: security_group_id.clone(),
        internet_gateway_id: internet_gateway_id.clone(),
        credentials_secret: credentials_secret.clone(),
    }
}
