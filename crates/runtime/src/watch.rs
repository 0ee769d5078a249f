//! Shared watches: one watch and one cache (a kube reflector store) per kind, for every
//! controller in the manager.
//!
//! Why not a `Controller::new` per controller: each one opens its own watch of the same
//! kind and keeps its own copy of every object, and four controllers watching StatefulApp
//! meant four copies of 1,000 apps, each one woken by the other three's status writes.
//! Here one task per kind runs the watch, applies it to one store and fans the changes out
//! to subscribers over a broadcast channel:
//!
//! - a subscriber first gets every cached object once the cache is ready, then each change
//!   (an applied or a deleted object) — so the order in which watches and controllers start
//!   does not matter;
//! - a subscriber that falls behind (more than [`BUFFER`] changes) or a watch that re-lists
//!   gets a resync: the objects whose key changed, and the last state of those that left
//!   the cache, so nothing is missed, only folded;
//! - [`Shared::subscribe_by`] emits an object only when the key it is given changes (a
//!   predicate, so a controller is not woken by status it does not read);
//! - cached objects are slim: `managedFields` and the last-applied annotation are dropped.
//!
//! Only Stateward's own Jobs and Leases are watched (by label), never every Job or Lease
//! in the cluster; Pods and PVCs are not cached at all (they are read when a reconcile
//! needs them, which only a change of something watched or a timer triggers).

use std::collections::{HashMap, HashSet};
use std::fmt::Debug;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures::{Stream, StreamExt};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::Api;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::watcher;
use kube::runtime::{WatchStreamExt, controller};
use kube::{Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use stateward_api::common::{MANAGED_BY_LABEL, MANAGED_BY_VALUE};
use stateward_api::{Backup, BackupRepository, Restore, StatefulApp};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

mod merge;
use merge::{Merge, Merged};

/// Changes a subscriber may fall behind by before it gets a resync instead.
pub const BUFFER: usize = 1024;
/// Reconciles one controller runs at once (kube's default is unbounded).
pub const RECONCILE_CONCURRENCY: u16 = 8;
/// How long a cache may stay unsynced before the manager says so, naming the kind.
pub const SYNC_WARNING_AFTER: Duration = Duration::from_secs(30);

/// The controller settings every Stateward controller uses.
pub fn controller_config() -> controller::Config {
    controller::Config::default().concurrency(RECONCILE_CONCURRENCY)
}

/// What the watch task tells subscribers.
#[derive(Clone, Debug)]
enum Signal<K> {
    /// Applied (created or changed): the cached object.
    Changed(Arc<K>),
    /// Deleted: its last state.
    Deleted(Arc<K>),
    /// The cache was re-listed: compare everything.
    Resync,
}

type IndexFn<K> = Arc<dyn Fn(&K) -> Option<String> + Send + Sync>;

/// A secondary index: key → the objects carrying it (kept by the watch task).
struct Index<K: Resource<DynamicType = ()>> {
    key: IndexFn<K>,
    entries: RwLock<IndexEntries<K>>,
}

struct IndexEntries<K: Resource<DynamicType = ()>> {
    by_key: HashMap<String, HashSet<ObjectRef<K>>>,
    key_of: HashMap<ObjectRef<K>, String>,
}

impl<K> Index<K>
where
    K: Resource<DynamicType = ()> + Clone,
{
    fn new(key: IndexFn<K>) -> Self {
        Self {
            key,
            entries: RwLock::new(IndexEntries {
                by_key: HashMap::new(),
                key_of: HashMap::new(),
            }),
        }
    }

    fn remove(entries: &mut IndexEntries<K>, r: &ObjectRef<K>) {
        if let Some(old) = entries.key_of.remove(r)
            && let Some(set) = entries.by_key.get_mut(&old)
        {
            set.remove(r);
            if set.is_empty() {
                entries.by_key.remove(&old);
            }
        }
    }

    fn apply(&self, object: &K) {
        let r = ObjectRef::from_obj(object);
        let Ok(mut entries) = self.entries.write() else {
            return;
        };
        Self::remove(&mut entries, &r);
        if let Some(key) = (self.key)(object) {
            entries
                .by_key
                .entry(key.clone())
                .or_default()
                .insert(r.clone());
            entries.key_of.insert(r, key);
        }
    }

    fn delete(&self, object: &K) {
        if let Ok(mut entries) = self.entries.write() {
            Self::remove(&mut entries, &ObjectRef::from_obj(object));
        }
    }

    /// Rebuilds the index from the whole cache (after a re-list).
    fn rebuild(&self, all: &[Arc<K>]) {
        let Ok(mut entries) = self.entries.write() else {
            return;
        };
        entries.by_key.clear();
        entries.key_of.clear();
        for object in all {
            if let Some(key) = (self.key)(object) {
                let r = ObjectRef::from_obj(object.as_ref());
                entries
                    .by_key
                    .entry(key.clone())
                    .or_default()
                    .insert(r.clone());
                entries.key_of.insert(r, key);
            }
        }
    }

    fn get(&self, key: &str) -> Vec<ObjectRef<K>> {
        self.entries
            .read()
            .map(|e| {
                e.by_key
                    .get(key)
                    .map(|s| s.iter().cloned().collect())
                    .unwrap_or_default()
            })
            .unwrap_or_default()
    }
}

/// One kind's shared watch: its cache, its change feed and its optional index.
pub struct Shared<K: Resource<DynamicType = ()> + 'static> {
    reader: Store<K>,
    signals: broadcast::Sender<Signal<K>>,
    index: Option<Arc<Index<K>>>,
}

impl<K> Shared<K>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    /// Starts the watches of `sources` (one per namespace, or one of every namespace)
    /// into one cache, until `stop`, keeping an index when `index` is given.
    fn start(
        sources: Vec<(Option<String>, Api<K>)>,
        config: watcher::Config,
        index: Option<IndexFn<K>>,
        stop: CancellationToken,
    ) -> Self {
        let (reader, writer) = reflector::store();
        let (signals, _) = broadcast::channel(BUFFER);
        let index = index.map(|key| Arc::new(Index::new(key)));
        let kind = K::kind(&()).to_string();
        let namespaces: Vec<Option<String>> = sources.iter().map(|(ns, _)| ns.clone()).collect();
        let mut merge = Merge::new(writer, reader.clone(), namespaces.clone());
        let task_reader = reader.clone();
        let task_signals = signals.clone();
        let task_index = index.clone();
        tokio::spawn(async move {
            let watches = sources.into_iter().enumerate().map(|(source, (_, api))| {
                watcher::watcher(api, config.clone())
                    .default_backoff()
                    .modify(slim)
                    .map(move |event| (source, event))
                    .boxed()
            });
            let mut events = futures::stream::select_all(watches);
            loop {
                let next = tokio::select! {
                    () = stop.cancelled() => break,
                    next = events.next() => next,
                };
                let Some((source, event)) = next else { break };
                let event = match event {
                    Ok(event) => event,
                    Err(e) => {
                        // The backoff spaces these out; a 403 here names the missing verb.
                        let namespace = namespaces.get(source).cloned().flatten();
                        tracing::warn!(%kind, ?namespace, error = %e, "watch failed; retrying");
                        continue;
                    }
                };
                let signal = match merge.apply(source, event) {
                    Merged::Changed(object) => {
                        if let Some(index) = &task_index {
                            index.apply(&object);
                        }
                        Signal::Changed(object)
                    }
                    Merged::Deleted(object) => {
                        if let Some(index) = &task_index {
                            index.delete(&object);
                        }
                        Signal::Deleted(object)
                    }
                    Merged::Resynced => {
                        if let Some(index) = &task_index {
                            index.rebuild(&task_reader.state());
                        }
                        tracing::debug!(%kind, objects = task_reader.len(), "cache synced");
                        Signal::Resync
                    }
                    Merged::Nothing => continue,
                };
                // No subscriber yet is fine: each one starts from the cache.
                let _ = task_signals.send(signal);
            }
        });
        Self {
            reader,
            signals,
            index,
        }
    }

    /// The cache (ready once the first list completed).
    pub fn reader(&self) -> Store<K> {
        self.reader.clone()
    }

    /// Every object once the cache is ready, then every change (applied or deleted).
    pub fn subscribe(&self) -> impl Stream<Item = Arc<K>> + Send + 'static {
        self.subscribe_by(resource_version_key)
    }

    /// Like [`Self::subscribe`], but an applied object is emitted only when `key` of it
    /// differs from the last one emitted (a deletion always is).
    pub fn subscribe_by(
        &self,
        key: impl Fn(&K) -> u64 + Send + Sync + 'static,
    ) -> impl Stream<Item = Arc<K>> + Send + 'static {
        self.subscriber(Box::new(key)).into_stream()
    }

    /// Only what changes from now on (by `key`, as [`Self::subscribe_by`]), for a
    /// controller's secondary watches: its primary stream already starts with every
    /// object, so replaying 10,000 cached Backups to wake apps that are woken anyway is
    /// pure cost at start-up. The cache must be ready (controllers start after
    /// [`Stores::wait_synced`]); when it is not, this falls back to a full replay once it
    /// is, which is only slower.
    pub fn changes_by(
        &self,
        key: impl Fn(&K) -> u64 + Send + Sync + 'static,
    ) -> impl Stream<Item = Arc<K>> + Send + 'static {
        let mut subscriber = self.subscriber(Box::new(key));
        // The receiver exists already: a change racing this snapshot is either in it
        // (and its signal is then filtered as seen) or arrives as a signal after it.
        if is_ready(&subscriber.reader) {
            subscriber.started = true;
            for object in subscriber.reader.state() {
                subscriber.changed(object);
            }
        }
        subscriber.into_stream()
    }

    /// [`Self::changes_by`] with every new resourceVersion as a change.
    pub fn changes(&self) -> impl Stream<Item = Arc<K>> + Send + 'static {
        self.changes_by(resource_version_key)
    }

    fn subscriber(&self, key: Box<dyn Fn(&K) -> u64 + Send + Sync>) -> Subscriber<K> {
        Subscriber {
            signals: self.signals.subscribe(),
            reader: self.reader.clone(),
            seen: HashMap::new(),
            pending: Vec::new(),
            started: false,
            key,
        }
    }

    /// The cached objects whose index key is `key`.
    pub fn indexed(&self, key: &str) -> Vec<Arc<K>> {
        let Some(index) = &self.index else {
            return Vec::new();
        };
        index
            .get(key)
            .iter()
            .filter_map(|r| self.reader.get(r))
            .collect()
    }
}

struct Subscriber<K: Resource<DynamicType = ()> + 'static> {
    signals: broadcast::Receiver<Signal<K>>,
    reader: Store<K>,
    /// What was last emitted per object, by key (and the object, to report its
    /// deletion if a resync finds it gone).
    seen: HashMap<ObjectRef<K>, (u64, Arc<K>)>,
    pending: Vec<Arc<K>>,
    started: bool,
    key: Box<dyn Fn(&K) -> u64 + Send + Sync>,
}

/// Every new resourceVersion is a change.
fn resource_version_key<K: Resource>(object: &K) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    object.meta().resource_version.hash(&mut h);
    h.finish()
}

impl<K> Subscriber<K>
where
    K: Resource<DynamicType = ()> + Clone + Debug + Send + Sync + 'static,
{
    fn into_stream(self) -> impl Stream<Item = Arc<K>> + Send + 'static {
        futures::stream::unfold(self, |mut s| async move {
            let next = s.next().await?;
            Some((next, s))
        })
    }

    async fn next(&mut self) -> Option<Arc<K>> {
        loop {
            if let Some(object) = self.pending.pop() {
                return Some(object);
            }
            // Until the cache is ready, only its Resync (sent after the first list) is
            // worth anything. Not `Store::wait_until_ready`: a second waiter on it was
            // never woken here (kube 5.0.0), so the readiness is read without waiting,
            // and the Resync that follows the first list wakes us. The receiver exists
            // since `subscribe_by`, so that Resync cannot be missed.
            if !self.started && is_ready(&self.reader) {
                self.started = true;
                self.resync();
                continue;
            }
            match self.signals.recv().await {
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) if !self.started => {}
                Ok(Signal::Changed(object)) => {
                    if let Some(object) = self.changed(object) {
                        return Some(object);
                    }
                }
                Ok(Signal::Deleted(object)) => {
                    self.seen.remove(&ObjectRef::from_obj(object.as_ref()));
                    return Some(object);
                }
                Ok(Signal::Resync) | Err(broadcast::error::RecvError::Lagged(_)) => self.resync(),
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }

    /// `object` if its key changed since it was last emitted.
    fn changed(&mut self, object: Arc<K>) -> Option<Arc<K>> {
        let key = (self.key)(&object);
        let r = ObjectRef::from_obj(object.as_ref());
        if self.seen.get(&r).is_some_and(|(k, _)| *k == key) {
            return None;
        }
        self.seen.insert(r, (key, object.clone()));
        Some(object)
    }

    /// Queues what changed or left since the last emission, compared with the cache.
    fn resync(&mut self) {
        let all = self.reader.state();
        let present: HashSet<ObjectRef<K>> = all
            .iter()
            .map(|o| ObjectRef::from_obj(o.as_ref()))
            .collect();
        let gone: Vec<ObjectRef<K>> = self
            .seen
            .keys()
            .filter(|r| !present.contains(*r))
            .cloned()
            .collect();
        for r in gone {
            if let Some((_, last)) = self.seen.remove(&r) {
                self.pending.push(last);
            }
        }
        for object in all {
            if let Some(object) = self.changed(object) {
                self.pending.push(object);
            }
        }
    }
}

/// Drops what no controller reads from a cached object: managed fields are often most of
/// its size.
fn slim<K: Resource>(object: &mut K) {
    let meta = object.meta_mut();
    meta.managed_fields = None;
    if let Some(annotations) = meta.annotations.as_mut() {
        annotations.remove("kubectl.kubernetes.io/last-applied-configuration");
    }
}

/// A predicate key: what a controller reading only the spec and metadata of an object
/// cares about (its generation, deletion, finalizers, labels and annotations), so status
/// writes — its own or another controller's — do not wake it.
pub fn spec_and_metadata<K: Resource>(object: &K) -> u64 {
    let meta = object.meta();
    let mut h = std::collections::hash_map::DefaultHasher::new();
    meta.generation.hash(&mut h);
    meta.deletion_timestamp.is_some().hash(&mut h);
    meta.finalizers.hash(&mut h);
    meta.labels.hash(&mut h);
    meta.annotations.hash(&mut h);
    h.finish()
}

/// A predicate key for an operation object (Backup, Restore) as a lock holder or a
/// dependency: its phase, generation and deletion, not its progress.
pub fn phase_key<K: Resource, P: Debug>(object: &K, phase: Option<&P>) -> u64 {
    let meta = object.meta();
    let mut h = std::collections::hash_map::DefaultHasher::new();
    format!("{phase:?}").hash(&mut h);
    meta.generation.hash(&mut h);
    meta.deletion_timestamp.is_some().hash(&mut h);
    h.finish()
}

/// A predicate key for an operation object (Backup, Restore) whose only news for the
/// reader is its end: whether it is final (`is_final`: Completed or Failed) or being
/// deleted. Scaling waits on lock holders and on the Backup it asked for; their progress
/// in between would only wake it for nothing.
pub fn final_key<K: Resource>(object: &K, is_final: bool) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    is_final.hash(&mut h);
    object.meta().deletion_timestamp.is_some().hash(&mut h);
    h.finish()
}

/// The label selector of Stateward's agent Jobs.
pub const AGENT_JOBS: &str = "app.kubernetes.io/managed-by=stateward,app.kubernetes.io/component in (backup-agent,restore-agent)";

/// The shared watches of the manager: every kind more than one controller reads, or that
/// a controller reads on every pass.
pub struct Stores {
    pub apps: Shared<StatefulApp>,
    /// Read by the repository check only; shared so that it follows the same scope.
    pub repositories: Shared<BackupRepository>,
    pub backups: Shared<Backup>,
    pub restores: Shared<Restore>,
    pub statefulsets: Shared<StatefulSet>,
    /// Stateward's agent Jobs only.
    pub jobs: Shared<Job>,
    /// Stateward's Leases only (the operation locks), never the control plane's.
    pub leases: Shared<Lease>,
    /// The namespaces watched, or all.
    pub scope: Scope,
    /// Ends the watches when the last holder of the stores goes.
    _stop: tokio_util::sync::DropGuard,
}

/// Which namespaces the manager watches (and acts in).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Scope {
    /// Every namespace: one cluster-wide watch per kind.
    #[default]
    All,
    /// These namespaces only (sorted, without repeats; never empty): one watch per
    /// namespace and kind, since the API has no watch of a list of namespaces.
    Namespaces(Vec<String>),
}

impl Scope {
    /// The namespaces given (blank entries ignored); none means all.
    pub fn of<I, S>(namespaces: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut list: Vec<String> = namespaces
            .into_iter()
            .map(|ns| ns.as_ref().trim().to_string())
            .filter(|ns| !ns.is_empty())
            .collect();
        list.sort();
        list.dedup();
        if list.is_empty() {
            Self::All
        } else {
            Self::Namespaces(list)
        }
    }

    /// Whether objects in `namespace` are watched.
    pub fn contains(&self, namespace: &str) -> bool {
        match self {
            Self::All => true,
            Self::Namespaces(list) => list.iter().any(|ns| ns == namespace),
        }
    }

    /// One Api per watch: each namespace's, or the cluster-wide one.
    pub fn apis<K>(&self, client: &Client) -> Vec<(Option<String>, Api<K>)>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
    {
        match self {
            Self::All => vec![(None, Api::all(client.clone()))],
            Self::Namespaces(list) => list
                .iter()
                .map(|ns| (Some(ns.clone()), Api::namespaced(client.clone(), ns)))
                .collect(),
        }
    }
}

impl From<Option<String>> for Scope {
    fn from(namespace: Option<String>) -> Self {
        Self::of(namespace)
    }
}

/// The key of the Backup index: the app a Backup belongs to.
fn backup_app_key(backup: &Backup) -> Option<String> {
    Some(format!(
        "{}/{}",
        backup.namespace().unwrap_or_default(),
        backup.spec.app
    ))
}

impl Stores {
    /// Starts every shared watch, in the namespaces of `scope` or cluster-wide; they end
    /// on `shutdown` (or when the stores are dropped).
    pub fn start(
        client: Client,
        scope: impl Into<Scope>,
        shutdown: &CancellationToken,
    ) -> Arc<Self> {
        let scope = scope.into();
        let stop = shutdown.child_token();
        let all = || watcher::Config::default().any_semantic();
        let ours = format!("{MANAGED_BY_LABEL}={MANAGED_BY_VALUE}");
        let stores = Self {
            apps: Shared::start(scope.apis(&client), all(), None, stop.clone()),
            repositories: Shared::start(scope.apis(&client), all(), None, stop.clone()),
            backups: Shared::start(
                scope.apis(&client),
                all(),
                Some(Arc::new(backup_app_key)),
                stop.clone(),
            ),
            restores: Shared::start(scope.apis(&client), all(), None, stop.clone()),
            statefulsets: Shared::start(scope.apis(&client), all(), None, stop.clone()),
            jobs: Shared::start(
                scope.apis(&client),
                all().labels(AGENT_JOBS),
                None,
                stop.clone(),
            ),
            leases: Shared::start(scope.apis(&client), all().labels(&ours), None, stop.clone()),
            scope,
            _stop: stop.drop_guard(),
        };
        Arc::new(stores)
    }

    /// Starts the stores with their own stop token (tests; they end when dropped).
    pub fn start_in(client: Client, scope: impl Into<Scope>) -> Arc<Self> {
        Self::start(client, scope, &CancellationToken::new())
    }

    /// Waits until every cache has listed once; every [`SYNC_WARNING_AFTER`] without it,
    /// logs which kinds are still missing (usually an RBAC `list`/`watch` missing: the
    /// watch's own warning names the verb).
    pub async fn synced(&self) {
        // Polled at start-up only (see `Subscriber::next` on why not `wait_until_ready`).
        let started = tokio::time::Instant::now();
        let mut warned_at = started;
        loop {
            let missing = self.unsynced();
            if missing.is_empty() {
                return;
            }
            if warned_at.elapsed() >= SYNC_WARNING_AFTER {
                warned_at = tokio::time::Instant::now();
                tracing::error!(
                    kinds = ?missing,
                    waited_seconds = started.elapsed().as_secs(),
                    "caches not synced: controllers wait (check the watch warnings above and the manager's RBAC list/watch rights)"
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// [`Self::synced`], or `false` when `shutdown` comes first. Every controller waits
    /// for it before its first pass: deciding from a cache still listing (no Backups yet,
    /// say) could act on a world that is not there.
    pub async fn wait_synced(&self, shutdown: &CancellationToken) -> bool {
        tokio::select! {
            () = self.synced() => true,
            () = shutdown.cancelled() => false,
        }
    }

    /// The kinds whose cache has not listed yet.
    pub fn unsynced(&self) -> Vec<&'static str> {
        let mut missing = Vec::new();
        // A store is ready once its first list was applied; `len` does not tell, so ask
        // without waiting.
        let ready = |ready: bool, kind: &'static str, missing: &mut Vec<&'static str>| {
            if !ready {
                missing.push(kind);
            }
        };
        ready(is_ready(&self.apps.reader), "StatefulApp", &mut missing);
        ready(
            is_ready(&self.repositories.reader),
            "BackupRepository",
            &mut missing,
        );
        ready(is_ready(&self.backups.reader), "Backup", &mut missing);
        ready(is_ready(&self.restores.reader), "Restore", &mut missing);
        ready(
            is_ready(&self.statefulsets.reader),
            "StatefulSet",
            &mut missing,
        );
        ready(is_ready(&self.jobs.reader), "Job", &mut missing);
        ready(is_ready(&self.leases.reader), "Lease", &mut missing);
        missing
    }

    /// The Backups of app `app` in `namespace`, from the index (no scan of every Backup).
    pub fn backups_of_app(&self, namespace: &str, app: &str) -> Vec<Arc<Backup>> {
        self.backups.indexed(&format!("{namespace}/{app}"))
    }

    /// The apps that manage StatefulSet `sts` (usually one), from the cache.
    pub fn apps_of_statefulset(&self, sts: &StatefulSet) -> Vec<ObjectRef<StatefulApp>> {
        let ns = sts.namespace();
        let name = sts.name_any();
        self.apps
            .reader
            .state()
            .iter()
            .filter(|a| a.namespace() == ns && a.spec.stateful_set_name == name)
            .map(|a| ObjectRef::from_obj(a.as_ref()))
            .collect()
    }

    /// The apps whose operation lock is Lease `lease`.
    pub fn apps_of_lock(&self, lease: &Lease) -> Vec<ObjectRef<StatefulApp>> {
        let ns = lease.namespace();
        let name = lease.name_any();
        self.apps
            .reader
            .state()
            .iter()
            .filter(|a| {
                a.namespace() == ns && crate::lock::lease_name(&a.spec.stateful_set_name) == name
            })
            .map(|a| ObjectRef::from_obj(a.as_ref()))
            .collect()
    }

    /// Whether a cached Lease in `namespace` may hold a lock for the holder with `uid`: a
    /// record naming it, or one we cannot read (then only a fresh look can tell).
    pub fn may_hold_lock(&self, namespace: &str, uid: &str) -> bool {
        self.leases.reader.state().iter().any(|lease| {
            lease.namespace().as_deref() == Some(namespace)
                && crate::lock::record_in(lease)
                    .map_or(true, |r| r.is_some_and(|r| r.holder.uid == uid))
        })
    }

    /// The app a Backup or Restore names (`spec.app`), in its namespace.
    pub fn app_named(namespace: Option<String>, app: &str) -> Option<ObjectRef<StatefulApp>> {
        namespace.map(|ns| ObjectRef::new(app).within(&ns))
    }
}

/// Whether a store listed once, without waiting.
fn is_ready<K>(store: &Store<K>) -> bool
where
    K: Resource<DynamicType = ()> + Clone + 'static,
{
    futures::FutureExt::now_or_never(store.wait_until_ready()).is_some_and(|r| r.is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::runtime::watcher::Event;

    fn app(name: &str, generation: i64, status_note: &str) -> StatefulApp {
        let mut a: StatefulApp = serde_json::from_value(serde_json::json!({
            "apiVersion": "stateward.io/v1alpha1",
            "kind": "StatefulApp",
            "metadata": {"name": name, "namespace": "n", "generation": generation,
                         "resourceVersion": format!("{generation}-{status_note}"),
                         "managedFields": [{"manager": "x"}],
                         "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{}", "keep": "1"}},
            "spec": {"statefulSetName": "s"}
        }))
        .unwrap_or_else(|e| panic!("fixture: {e}"));
        a.status = Some(Default::default());
        a
    }

    #[test]
    fn slim_drops_managed_fields_and_last_applied_only() {
        let mut a = app("a", 1, "x");
        slim(&mut a);
        assert!(a.metadata.managed_fields.is_none());
        let annotations = a.metadata.annotations.unwrap_or_default();
        assert_eq!(annotations.len(), 1);
        assert!(annotations.contains_key("keep"));
    }

    #[test]
    fn spec_and_metadata_ignores_status_and_resource_version() {
        let a = app("a", 1, "first");
        let b = app("a", 1, "second");
        assert_eq!(spec_and_metadata(&a), spec_and_metadata(&b));
        let c = app("a", 2, "second");
        assert_ne!(spec_and_metadata(&a), spec_and_metadata(&c));
        let mut d = app("a", 1, "first");
        d.metadata.finalizers = Some(vec!["f".into()]);
        assert_ne!(spec_and_metadata(&a), spec_and_metadata(&d));
    }

    #[test]
    fn index_follows_applies_deletes_and_rebuilds() {
        let index: Index<StatefulApp> = Index::new(Arc::new(|a: &StatefulApp| {
            a.annotations().get("keep").cloned()
        }));
        let a = app("a", 1, "x");
        index.apply(&a);
        assert_eq!(index.get("1").len(), 1);
        let mut moved = a.clone();
        moved.annotations_mut().insert("keep".into(), "2".into());
        index.apply(&moved);
        assert!(index.get("1").is_empty());
        assert_eq!(index.get("2").len(), 1);
        index.delete(&moved);
        assert!(index.get("2").is_empty());
        index.rebuild(&[Arc::new(a)]);
        assert_eq!(index.get("1").len(), 1);
    }

    #[test]
    fn scope_of_a_list_sorts_drops_blanks_and_repeats() {
        assert_eq!(Scope::of(Vec::<String>::new()), Scope::All);
        assert_eq!(Scope::of([" ", ""]), Scope::All);
        assert_eq!(
            Scope::of(["b", "a", "b"]),
            Scope::Namespaces(vec!["a".into(), "b".into()])
        );
        assert_eq!(Scope::from(Some("x".to_string())), Scope::of(["x"]));
        assert!(Scope::of(["a"]).contains("a") && !Scope::of(["a"]).contains("b"));
        assert!(Scope::All.contains("anything"));
    }

    /// The fan-out as a subscriber sees it, driven through a real store writer.
    #[tokio::test]
    async fn subscriber_starts_from_the_cache_filters_by_key_and_resyncs() {
        let (reader, mut writer) = reflector::store::<StatefulApp>();
        let (signals, _) = broadcast::channel(2);
        let shared = Shared {
            reader: reader.clone(),
            signals: signals.clone(),
            index: None,
        };
        let mut changes = Box::pin(shared.subscribe_by(spec_and_metadata));
        writer.apply_watcher_event(&Event::Init);
        writer.apply_watcher_event(&Event::InitApply(app("a", 1, "x")));
        writer.apply_watcher_event(&Event::InitDone);
        // First: the cache.
        let first = changes.next().await.map(|a| a.name_any());
        assert_eq!(first.as_deref(), Some("a"));
        // A status-only change is filtered; a generation change is not.
        let status_only = Arc::new(app("a", 1, "y"));
        let _ = signals.send(Signal::Changed(status_only));
        let spec = Arc::new(app("a", 2, "y"));
        let _ = signals.send(Signal::Changed(spec));
        let next = changes.next().await.and_then(|a| a.metadata.generation);
        assert_eq!(next, Some(2));
        // A lag (buffer 2) resyncs against the cache: b appears, a (generation 1 in the
        // cache, 2 last emitted) is emitted again.
        writer.apply_watcher_event(&Event::Apply(app("b", 1, "x")));
        for n in 0..4 {
            let _ = signals.send(Signal::Changed(Arc::new(app("a", 2, &format!("z{n}")))));
        }
        let mut names = vec![
            changes.next().await.map(|a| a.name_any()),
            changes.next().await.map(|a| a.name_any()),
        ];
        names.sort();
        assert_eq!(names, vec![Some("a".to_string()), Some("b".to_string())]);
        // The two changes still buffered: a at generation 2 differs from the cached
        // generation 1 just emitted, once; the second has the same key.
        let buffered = changes.next().await.and_then(|a| a.metadata.generation);
        assert_eq!(buffered, Some(2));
        // A deletion is always emitted.
        let _ = signals.send(Signal::Deleted(Arc::new(app("b", 1, "x"))));
        let gone = changes.next().await.map(|a| a.name_any());
        assert_eq!(gone.as_deref(), Some("b"));
    }

    /// A secondary watch on a ready cache starts quiet: only later changes wake.
    #[tokio::test]
    async fn changes_skip_what_the_ready_cache_holds_but_not_what_follows() {
        let (reader, mut writer) = reflector::store::<StatefulApp>();
        let (signals, _) = broadcast::channel(8);
        let shared = Shared {
            reader: reader.clone(),
            signals: signals.clone(),
            index: None,
        };
        // Before the cache is ready: a full replay once it is.
        let mut early = Box::pin(shared.changes_by(spec_and_metadata));
        writer.apply_watcher_event(&Event::Init);
        writer.apply_watcher_event(&Event::InitApply(app("a", 1, "x")));
        writer.apply_watcher_event(&Event::InitDone);
        let _ = signals.send(Signal::Resync);
        assert_eq!(
            early.next().await.map(|a| a.name_any()).as_deref(),
            Some("a")
        );
        // On a ready cache: "a" is not replayed (nor its in-flight signal, same key)...
        let mut quiet = Box::pin(shared.changes_by(spec_and_metadata));
        let _ = signals.send(Signal::Changed(Arc::new(app("a", 1, "x"))));
        // ...but a change after the snapshot is, and so is a deletion.
        let _ = signals.send(Signal::Changed(Arc::new(app("a", 2, "y"))));
        assert_eq!(
            quiet.next().await.and_then(|a| a.metadata.generation),
            Some(2)
        );
        let _ = signals.send(Signal::Deleted(Arc::new(app("a", 2, "y"))));
        assert_eq!(
            quiet.next().await.map(|a| a.name_any()).as_deref(),
            Some("a")
        );
    }
}
