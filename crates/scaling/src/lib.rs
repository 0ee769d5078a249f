//! The scaling controller: the only writer of a managed StatefulSet's `spec.replicas`
//! (only when `spec.scaling.replicas` is set), behind the StatefulApp's `/scale`.
//!
//! Each reconcile is a short pipeline:
//! 1. **stop/start** — when another operation holds the app's lock with intent `Stop`,
//!    the app goes to zero with its PVCs forced to `Retain`; when it lets go, the replica
//!    count and retention policy come back (recorded on the StatefulSet, so a restarted
//!    manager knows them);
//! 2. **target** — `scaling.replicas` clamped to min/max;
//! 3. **one step** under the lock — scale-up adds one replica and waits for it to be
//!    Ready; scale-down takes a backup first (nested under the lock), runs the hook in the
//!    highest ordinal, removes that replica, waits for its pod to be gone and applies the
//!    removed-volume policy, then repeats. Progress lives in `status.scaling.operation`.

pub mod plan;
pub mod storage;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::Controller;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Api, Resource, ResourceExt};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use stateward_api::common::{
    APP_LABEL, MANAGED_BY_LABEL, MANAGED_BY_VALUE, PARENT_TOKEN_ANNOTATION,
};
use stateward_api::statefulapp::{
    RemovedVolumePolicy, ScaleOperation, ScalingStatusSection, StatefulApp,
};
use stateward_api::{Backup, BackupPhase, BackupSpec, DeletionPolicy};
use stateward_runtime::lock::{Acquired, Holder, Intent, LockError, OperationLock};
use stateward_runtime::watch::{self, Stores};
use stateward_runtime::{Context, apply, conditions, hooks, names, ownership, time};

/// The controller's name in metrics and logs.
pub const CONTROLLER: &str = "scaling";

/// On the StatefulSet while the app is stopped for another operation: the replica count
/// to come back to.
pub use stateward_api::common::STOPPED_REPLICAS_ANNOTATION;
/// On the StatefulSet while stopped: its own PVC retention policy (JSON, `null` for none),
/// restored on start.
pub const STOPPED_POLICY_ANNOTATION: &str = "stateward.io/stopped-pvc-retention-policy";
/// On a removed replica's PVC kept by `RetainStale`.
pub const STALE_LABEL: &str = "stateward.io/stale";
/// When it became stale (RFC 3339).
pub const STALE_SINCE_ANNOTATION: &str = "stateward.io/stale-since";

const STEP: Duration = Duration::from_secs(2);
/// Backups tried before a scale-down gives up.
const BACKUP_ATTEMPTS: usize = 3;
/// While a resize is pending (the storage driver or the kubelet finishing it): nothing
/// Stateward watches changes when it completes, so it looks again after this.
const STEADY: Duration = Duration::from_secs(15);
/// How often auto-expansion measures the volume with `df` (documented in docs/scaling.md):
/// usage is not an event, so this is the one timer of an app at rest.
pub const AUTO_EXPAND_PROBE: Duration = Duration::from_secs(15);
/// While a StorageClass does not allow expansion: StorageClasses are not watched (rarely
/// changed, cluster-wide), so it looks again after this.
pub const BLOCKED_RECHECK: Duration = Duration::from_secs(300);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OperationLabels {
    pub direction: String,
    pub result: String,
}

/// The scaling controller's context.
pub struct ScalingContext {
    pub base: Context,
    pub operations: Family<OperationLabels, Counter>,
    pub volume_used: Family<storage::VolumeLabels, Gauge>,
    pub volume_capacity: Family<storage::VolumeLabels, Gauge>,
    /// The manager's shared watches: who manages which StatefulSet, and what wakes an app.
    pub stores: Arc<Stores>,
    pub config: Config,
}

#[derive(Debug, thiserror::Error)]
pub enum ScalingError {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("operation lock: {0}")]
    Lock(#[from] LockError),
    #[error("encoding: {0}")]
    Encode(#[from] serde_json::Error),
}

/// Runs the scaling loop until shutdown, woken by the shared watches.
/// Operator settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// Whether volumes grow (`spec.scaling.storage`: claim patches, StorageClass reads,
    /// the StatefulSet re-created with larger templates, auto-expansion's `df`). Off (the
    /// chart's `features.volumeExpansion: false`, which drops those rights), an app whose
    /// claims are smaller than asked gets `ScalingBlocked=True/FeatureDisabled`.
    pub volume_expansion: bool,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            volume_expansion: true,
        }
    }
}

/// Runs the scaling controller with the default settings until shutdown.
pub async fn run(base: Context, stores: Arc<Stores>) {
    run_with(base, stores, Config::default()).await;
}

/// Runs the scaling controller until shutdown.
pub async fn run_with(base: Context, stores: Arc<Stores>, config: Config) {
    if !stores.wait_synced(&base.shutdown).await {
        return;
    }
    let operations = Family::<OperationLabels, Counter>::default();
    base.metrics.register(
        "scale_operations",
        "Scale operations that ended, by direction (up, down, stop, start) and result",
        operations.clone(),
    );
    // Every direction and result exists from the start, so rate() and increase() work
    // before the first operation (and dashboards never show "no data").
    for direction in ["up", "down", "stop", "start"] {
        for result in ["succeeded", "failed"] {
            let _ = operations.get_or_create(&OperationLabels {
                direction: direction.into(),
                result: result.into(),
            });
        }
    }
    let volume_used = Family::<storage::VolumeLabels, Gauge>::default();
    let volume_capacity = Family::<storage::VolumeLabels, Gauge>::default();
    base.metrics.register(
        "volume_used_bytes",
        "Bytes used on the app's volume, measured with df in the app container (auto-expansion only)",
        volume_used.clone(),
    );
    base.metrics.register(
        "volume_capacity_bytes",
        "Size of the filesystem on the app's volume, as df sees it (auto-expansion only)",
        volume_capacity.clone(),
    );
    let ctx = Arc::new(ScalingContext {
        base: base.clone(),
        operations,
        volume_used,
        volume_capacity,
        stores: stores.clone(),
        config,
    });
    wake_on(&stores)
        .with_config(watch::controller_config())
        .graceful_shutdown_on(base.shutdown.clone().cancelled_owned())
        .run(reconcile, error_policy, ctx)
        .for_each(|_| futures::future::ready(()))
        .await;
}

/// What wakes an app (see docs/architecture.md): its spec and metadata (not status), an
/// app managing the same StatefulSet, its StatefulSet (spec or status: readiness arrives
/// there), its lock Lease, and its Backups and Restores changing phase (a lock holder
/// ending). Pods and PVCs are read when woken, never cached.
fn wake_on(stores: &Arc<Stores>) -> Controller<StatefulApp> {
    let (siblings, sets, locks) = (stores.clone(), stores.clone(), stores.clone());
    Controller::for_shared_stream(
        stores.apps.subscribe_by(watch::spec_and_metadata),
        stores.apps.reader(),
    )
    .watches_shared_stream(
        stores.apps.changes_by(watch::spec_and_metadata),
        move |app: Arc<StatefulApp>| {
            let mut same = StatefulSet::default();
            same.metadata.namespace = app.namespace();
            same.metadata.name = Some(app.spec.stateful_set_name.clone());
            let me = kube::runtime::reflector::ObjectRef::from_obj(app.as_ref());
            let others: Vec<_> = siblings
                .apps_of_statefulset(&same)
                .into_iter()
                .filter(|r| *r != me)
                .collect();
            others
        },
    )
    .watches_shared_stream(
        stores.statefulsets.changes(),
        move |sts: Arc<StatefulSet>| sets.apps_of_statefulset(&sts),
    )
    .watches_shared_stream(stores.leases.changes(), move |lease| {
        locks.apps_of_lock(&lease)
    })
    .watches_shared_stream(
        stores.backups.changes_by(|b: &Backup| {
            let phase = b.status.as_ref().and_then(|s| s.phase);
            watch::final_key(
                b,
                matches!(phase, Some(BackupPhase::Completed | BackupPhase::Failed)),
            )
        }),
        |b: Arc<Backup>| Stores::app_named(b.namespace(), &b.spec.app),
    )
    .watches_shared_stream(
        stores.restores.changes_by(|r: &stateward_api::Restore| {
            let phase = r.status.as_ref().and_then(|s| s.phase);
            watch::final_key(
                r,
                matches!(
                    phase,
                    Some(
                        stateward_api::RestorePhase::Completed
                            | stateward_api::RestorePhase::Failed
                    )
                ),
            )
        }),
        |r: Arc<stateward_api::Restore>| Stores::app_named(r.namespace(), &r.spec.target.app),
    )
}

/// How an app at rest waits: for a change, unless time itself is the trigger — a resize
/// the storage finishes on its own, or auto-expansion's next measurement.
fn at_rest(world: &World) -> Action {
    let auto_expand = world
        .app
        .spec
        .scaling
        .as_ref()
        .and_then(|s| s.storage.as_ref())
        .is_some_and(|s| s.auto_expand.is_some());
    if !world.section.pending_resize.is_empty() {
        Action::requeue(STEADY)
    } else if auto_expand {
        Action::requeue(AUTO_EXPAND_PROBE)
    } else {
        Action::await_change()
    }
}

/// The reconcile entry point.
#[tracing::instrument(skip_all, fields(namespace = app.namespace().unwrap_or_default(), app = app.name_any()))]
pub async fn reconcile(
    app: Arc<StatefulApp>,
    ctx: Arc<ScalingContext>,
) -> Result<Action, ScalingError> {
    let timer = ctx.base.metrics.reconcile.start(CONTROLLER);
    let result = step(&app, &ctx).await;
    // The back-off resets only after a pass that succeeded: resetting it at the start of
    // a pass that then fails would retry a persistent error every second, forever.
    if result.is_ok() {
        let ns = app.namespace().unwrap_or_default();
        ctx.base
            .backoff
            .on_success(&format!("scaling/{ns}/{}", app.name_any()));
    }
    timer.finish(if result.is_ok() { "success" } else { "error" });
    result
}

pub fn error_policy(app: Arc<StatefulApp>, err: &ScalingError, ctx: Arc<ScalingContext>) -> Action {
    let key = format!(
        "scaling/{}/{}",
        app.namespace().unwrap_or_default(),
        app.name_any()
    );
    tracing::warn!(app = %key, error = %err, "scaling reconcile failed");
    Action::requeue(
        ctx.base
            .backoff
            .on_error(&key, stateward_runtime::backoff::ErrorKind::Transient)
            .unwrap_or(Duration::from_secs(300)),
    )
}

/// What one reconcile found.
struct World {
    app: StatefulApp,
    sts: StatefulSet,
    pods: Vec<Pod>,
    section: ScalingStatusSection,
    conditions: Vec<Condition>,
    /// The pods' label selector, once the StatefulSet was read (for `/scale`).
    selector: Option<String>,
}

impl World {
    fn ns(&self) -> String {
        self.app.namespace().unwrap_or_default()
    }

    fn replicas(&self) -> i32 {
        self.sts.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1)
    }

    fn pod(&self, ordinal: i32) -> Option<&Pod> {
        let name = plan::pod_name(&self.sts, ordinal);
        self.pods.iter().find(|p| p.name_any() == name)
    }

    fn ready(&self, ordinal: i32) -> bool {
        self.pod(ordinal).is_some_and(|p| {
            p.metadata.deletion_timestamp.is_none()
                && p.status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        })
    }

    /// Pods at or above `from` that still exist (leaving, or left by an earlier step).
    fn pods_from(&self, from: i32) -> Vec<String> {
        self.pods
            .iter()
            .filter(|p| plan::ordinal_of(&self.sts, &p.name_any()).is_some_and(|o| o >= from))
            .map(|p| p.name_any())
            .collect()
    }

    fn set(
        &mut self,
        type_: &str,
        status: bool,
        reason: &str,
        message: impl Into<String>,
        now: chrono::DateTime<chrono::Utc>,
    ) {
        let generation = self.app.meta().generation;
        conditions::set(
            &mut self.conditions,
            conditions::condition(type_, status, reason, message, generation),
            now,
        );
    }
}

/// The reason while the app's StatefulSet does not exist.
const MISSING_SET: &str = "StatefulSetNotFound";

fn holder(app: &StatefulApp) -> Holder {
    Holder {
        api_version: StatefulApp::api_version(&()).to_string(),
        kind: StatefulApp::kind(&()).to_string(),
        resource: StatefulApp::plural(&()).to_string(),
        name: app.name_any(),
        uid: app.uid().unwrap_or_default(),
    }
}

async fn step(cached: &StatefulApp, ctx: &ScalingContext) -> Result<Action, ScalingError> {
    let ns = cached.namespace().unwrap_or_default();
    let apps: Api<StatefulApp> = Api::namespaced(ctx.base.client.clone(), &ns);
    // Fresh: the operation in status must be the one we last wrote.
    let Some(app) = apps.get_opt(&cached.name_any()).await? else {
        return Ok(Action::await_change());
    };
    let now = ctx.base.clock.now();
    let status = app.status.clone().unwrap_or_default();
    let conditions = status
        .conditions
        .iter()
        .filter(|c| OUR_CONDITIONS.contains(&c.type_.as_str()))
        .cloned()
        .collect();
    let mut section = status.scaling.clone().unwrap_or_default();
    // Another StatefulApp manages this StatefulSet: this one does nothing until that one
    // changes or goes (a sibling's change wakes it). The shared cache is synced before
    // any controller starts.
    let cached = ctx.stores.apps.reader().state();
    if let Some(owner) = ownership::managed_by_other(&app, cached.iter().map(|a| a.as_ref())) {
        let message = ownership::message(&app, owner);
        let mut world = World {
            app: app.clone(),
            sts: StatefulSet::default(),
            pods: Vec::new(),
            section,
            conditions,
            selector: status.selector.clone(),
        };
        let first = !world
            .conditions
            .iter()
            .any(|c| c.reason == ownership::ALREADY_MANAGED);
        world.set(
            BLOCKED,
            true,
            ownership::ALREADY_MANAGED,
            message.clone(),
            now,
        );
        write_status(&mut world, ctx).await?;
        if first {
            publish(
                ctx,
                &app,
                EventType::Warning,
                ownership::ALREADY_MANAGED,
                message,
            )
            .await;
        }
        return Ok(Action::await_change());
    }
    let sets: Api<StatefulSet> = Api::namespaced(ctx.base.client.clone(), &ns);
    let existing = sets.get_opt(&app.spec.stateful_set_name).await?;
    // The second half of a template resize, also after a restart.
    if let Some(action) =
        storage::recreate_if_journaled(&app, &mut section, existing.as_ref(), ctx).await?
    {
        let mut world = World {
            app: app.clone(),
            sts: existing.unwrap_or_default(),
            pods: Vec::new(),
            section,
            conditions,
            selector: status.selector.clone(),
        };
        write_status(&mut world, ctx).await?;
        return Ok(action);
    }
    let Some(sts) = existing else {
        let mut world = World {
            app: app.clone(),
            sts: StatefulSet::default(),
            pods: Vec::new(),
            section,
            conditions,
            selector: None,
        };
        // Said once as an event (the condition carries it after that).
        let first = !world
            .conditions
            .iter()
            .any(|c| c.type_ == BLOCKED && c.reason == MISSING_SET);
        let message = format!(
            "StatefulSet {} (spec.statefulSetName) not found in namespace {ns}",
            app.spec.stateful_set_name
        );
        world.set(BLOCKED, true, MISSING_SET, message.clone(), now);
        write_status(&mut world, ctx).await?;
        if first {
            publish(ctx, &app, EventType::Warning, MISSING_SET, message).await;
        }
        // Its creation wakes the app (the StatefulSet watch).
        return Ok(Action::await_change());
    };
    let selector = sts
        .spec
        .as_ref()
        .and_then(|s| s.selector.match_labels.clone())
        .unwrap_or_default();
    let selector = selector
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",");
    let pods: Api<Pod> = Api::namespaced(ctx.base.client.clone(), &ns);
    let pods = pods
        .list(&ListParams::default().labels(&selector))
        .await?
        .items;
    let mut world = World {
        app,
        sts,
        pods,
        section,
        conditions,
        selector: Some(selector),
    };
    world.section.observed_generation = world.app.meta().generation;
    world.section.ready_replicas = world.sts.status.as_ref().and_then(|s| s.ready_replicas);
    let action = pipeline(&mut world, ctx).await?;
    write_status(&mut world, ctx).await?;
    Ok(action)
}

const SCALING: &str = "Scaling";
const BLOCKED: &str = "ScalingBlocked";
const STOPPED: &str = "Stopped";
const OUR_CONDITIONS: [&str; 3] = [SCALING, BLOCKED, STOPPED];

async fn pipeline(world: &mut World, ctx: &ScalingContext) -> Result<Action, ScalingError> {
    let now = ctx.base.clock.now();
    let lock = OperationLock::new(
        ctx.base.client.clone(),
        &world.ns(),
        &world.app.name_any(),
        &world.app.spec.stateful_set_name,
    );
    let me = holder(&world.app);
    let current_lock = lock.current().await?;

    // 1. Stop and start for other operations.
    // A Stop holder that is gone or finished (a Restore deleted mid-way) no longer keeps
    // the app down: the app comes back instead of staying stopped forever — unless a
    // restore's swap began and did not finish: then the volumes may mix old and new data,
    // and the app stays down until another restore finishes the swap.
    if let Some(record) = &current_lock
        && record.holder.uid != me.uid
        && matches!(record.intent, Intent::Stop { .. })
    {
        if let Some(note) = &record.incomplete_swap
            && !lock.holder_alive(&record.holder).await?
        {
            return stop(world, ctx, &format!("an incomplete restore swap ({note})")).await;
        }
        if lock.holder_alive(&record.holder).await? {
            return stop(
                world,
                ctx,
                &format!("{} {}", record.holder.kind, record.holder.name),
            )
            .await;
        }
    }
    if world
        .sts
        .annotations()
        .contains_key(STOPPED_REPLICAS_ANNOTATION)
    {
        return start(world, ctx).await;
    }
    if !world.conditions.iter().any(|c| c.type_ == STOPPED) {
        world.set(STOPPED, false, "Running", "the app is not stopped", now);
    }

    // 2. The target.
    let Some(requested) = world.app.spec.scaling.as_ref().and_then(|s| s.replicas) else {
        world.section.phase = Some("Unmanaged".into());
        world.section.target_replicas = None;
        world.set(
            SCALING,
            false,
            "Unmanaged",
            "spec.scaling.replicas is not set: Stateward does not manage replicas",
            now,
        );
        world.set(BLOCKED, false, "None", "", now);
        if let Some(action) = storage::reconcile(world, ctx).await? {
            return Ok(action);
        }
        release_ours(&lock, &current_lock, &me).await?;
        return Ok(at_rest(world));
    };
    let policy = world.app.spec.scaling.clone().unwrap_or_default();
    let (target, clamped) = plan::clamp(requested, policy.min_replicas, policy.max_replicas);
    world.section.target_replicas = Some(target);
    let current = world.replicas();
    if current == target
        && world
            .section
            .operation
            .as_ref()
            .is_none_or(|o| o.leaving.is_none())
    {
        let settled = world.pods_from(target).is_empty();
        let wait_ready = policy.scale_up.as_ref().is_none_or(|u| u.wait_for_ready);
        let ready = !wait_ready || (0..target).all(|o| world.ready(o));
        if settled && ready {
            if let Some(op) = world.section.operation.take() {
                let direction = if op.target < op.from { "down" } else { "up" };
                finished(
                    world,
                    ctx,
                    direction,
                    "succeeded",
                    format!("scaled to {target} replicas"),
                )
                .await;
            }
            match clamped {
                Some(why) => world.set(BLOCKED, true, "Clamped", why, now),
                None => world.set(BLOCKED, false, "None", "", now),
            }
            if let Some(action) = storage::reconcile(world, ctx).await? {
                return Ok(action);
            }
            release_ours(&lock, &current_lock, &me).await?;
            world.section.phase = Some("Steady".into());
            world.set(SCALING, false, "Steady", format!("{target} replicas"), now);
            return Ok(at_rest(world));
        }
    }
    if world.section.failed_generation == world.app.meta().generation
        && world.section.operation.is_none()
    {
        // A failed scale-down is not retried until the spec changes.
        return Ok(at_rest(world));
    }
    world.section.failed_generation = None;

    // 3. One step, under the lock.
    let token = match lock.acquire(me, Intent::Reshape, None).await? {
        Acquired::Held(record) | Acquired::Nested(record) => record.token,
        Acquired::Busy(record) => {
            world.set(
                BLOCKED,
                true,
                "WaitingForLock",
                format!(
                    "waiting for {} {} (intent {:?}) to release the app's operation lock",
                    record.holder.kind, record.holder.name, record.intent
                ),
                now,
            );
            return Ok(Action::requeue(STEP));
        }
    };
    let op = world
        .section
        .operation
        .get_or_insert_with(|| ScaleOperation {
            target,
            from: current,
            started: Some(time::rfc3339(now)),
            ..Default::default()
        });
    op.target = target;
    match clamped {
        Some(why) => world.set(BLOCKED, true, "Clamped", why, now),
        None => world.set(BLOCKED, false, "None", "", now),
    }
    ensure_scaled_claims_retained(world, ctx).await?;
    let leaving = world
        .section
        .operation
        .as_ref()
        .is_some_and(|o| o.leaving.is_some());
    if target < current || leaving {
        scale_down(world, ctx, target, &token).await
    } else {
        // Up, or at the target and waiting for the new replicas to be Ready.
        scale_up(world, ctx, target).await
    }
}

async fn release_ours(
    lock: &OperationLock,
    current: &Option<stateward_runtime::lock::LockRecord>,
    me: &Holder,
) -> Result<(), ScalingError> {
    if let Some(record) = current
        && record.holder.uid == me.uid
    {
        lock.release(&record.token).await?;
    }
    Ok(())
}

async fn patch_sts(
    world: &World,
    ctx: &ScalingContext,
    patch: serde_json::Value,
) -> Result<(), ScalingError> {
    let sets: Api<StatefulSet> = Api::namespaced(ctx.base.client.clone(), &world.ns());
    sets.patch(
        &world.sts.name_any(),
        &PatchParams::default(),
        &Patch::Merge(&patch),
    )
    .await?;
    Ok(())
}

/// While Stateward manages replicas, the StatefulSet controller must never delete a
/// removed replica's volume (before the backup, or at all under `RetainStale`) — except
/// while a replica leaves under `removedVolumes: Delete`: then the controller itself
/// deletes that replica's claims (see [`removal_patch`]), and the policy goes back to
/// `Retain` once they are gone.
async fn ensure_scaled_claims_retained(
    world: &World,
    ctx: &ScalingContext,
) -> Result<(), ScalingError> {
    if world
        .section
        .operation
        .as_ref()
        .is_some_and(|o| o.leaving.is_some())
        && removed_volume_policy(world) == RemovedVolumePolicy::Delete
    {
        return Ok(());
    }
    let when_scaled = world
        .sts
        .spec
        .as_ref()
        .and_then(|s| s.persistent_volume_claim_retention_policy.as_ref())
        .and_then(|p| p.when_scaled.clone());
    if when_scaled.as_deref().is_some_and(|w| w != "Retain") {
        patch_sts(
            world,
            ctx,
            serde_json::json!({"spec": {"persistentVolumeClaimRetentionPolicy": {"whenScaled": "Retain"}}}),
        )
        .await?;
    }
    Ok(())
}

async fn scale_up(
    world: &mut World,
    ctx: &ScalingContext,
    target: i32,
) -> Result<Action, ScalingError> {
    let now = ctx.base.clock.now();
    let current = world.replicas();
    world.section.phase = Some("ScalingUp".into());
    let leftovers = world.pods_from(current);
    if !leftovers.is_empty() {
        world.set(
            SCALING,
            true,
            "ScalingUp",
            format!("waiting for {} to be gone", leftovers.join(", ")),
            now,
        );
        return Ok(Action::requeue(STEP));
    }
    if current >= target {
        world.set(
            SCALING,
            true,
            "ScalingUp",
            format!("waiting for the {target} replicas to be Ready"),
            now,
        );
        return Ok(Action::requeue(STEP));
    }
    let wait_ready = world
        .app
        .spec
        .scaling
        .as_ref()
        .and_then(|s| s.scale_up.as_ref())
        .is_none_or(|u| u.wait_for_ready);
    if wait_ready && let Some(o) = (0..current).find(|o| !world.ready(*o)) {
        world.set(
            SCALING,
            true,
            "ScalingUp",
            format!(
                "{current} → {target}: waiting for {} to be Ready",
                plan::pod_name(&world.sts, o)
            ),
            now,
        );
        return Ok(Action::requeue(STEP));
    }
    let next = if wait_ready { current + 1 } else { target };
    // Never hand a removed replica's old volume to a new one without the user's say.
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(ctx.base.client.clone(), &world.ns());
    for ordinal in current..next {
        for name in plan::claim_names(&world.sts, ordinal) {
            if let Some(pvc) = claims.get_opt(&name).await?
                && pvc.labels().get(STALE_LABEL).map(String::as_str) == Some("true")
            {
                let since = pvc
                    .annotations()
                    .get(STALE_SINCE_ANNOTATION)
                    .cloned()
                    .unwrap_or_default();
                let message = format!(
                    "PVC {name} holds the data of a replica removed at {since}; delete the PVC to start {} empty, \
                     or remove its label {STALE_LABEL} to start it from that data",
                    plan::pod_name(&world.sts, ordinal)
                );
                if !world
                    .conditions
                    .iter()
                    .any(|c| c.type_ == BLOCKED && c.reason == "StaleVolume")
                {
                    publish(
                        ctx,
                        &world.app,
                        EventType::Warning,
                        "StaleVolume",
                        message.clone(),
                    )
                    .await;
                }
                world.set(BLOCKED, true, "StaleVolume", message, now);
                world.set(
                    SCALING,
                    true,
                    "ScalingUp",
                    format!("{current} → {target}: blocked by a stale volume"),
                    now,
                );
                return Ok(Action::requeue(STEP));
            }
        }
    }
    patch_sts(world, ctx, serde_json::json!({"spec": {"replicas": next}})).await?;
    publish(
        ctx,
        &world.app,
        EventType::Normal,
        "ScalingUp",
        format!("{current} → {next} (target {target})"),
    )
    .await;
    world.set(
        SCALING,
        true,
        "ScalingUp",
        format!("{current} → {next} (target {target})"),
        now,
    );
    Ok(Action::requeue(STEP))
}

fn removed_volume_policy(world: &World) -> RemovedVolumePolicy {
    world
        .app
        .spec
        .scaling
        .as_ref()
        .and_then(|s| s.scale_down.as_ref())
        .map(|d| d.removed_volumes)
        .unwrap_or_default()
}

/// The patch that removes replica `ordinal` (the last one). Under `removedVolumes:
/// Delete` it also sets `whenScaled: Delete`, so the StatefulSet controller makes the
/// leaving pod the owner of its claims and the garbage collector deletes them after it:
/// the manager never deletes an app's claim itself (its admission policy lets it delete
/// only what Stateward labelled).
fn removal_patch(ordinal: i32, policy: RemovedVolumePolicy) -> serde_json::Value {
    match policy {
        RemovedVolumePolicy::Delete => serde_json::json!({"spec": {
            "replicas": ordinal,
            "persistentVolumeClaimRetentionPolicy": {"whenScaled": "Delete"},
        }}),
        RemovedVolumePolicy::RetainStale => serde_json::json!({"spec": {"replicas": ordinal}}),
    }
}

async fn scale_down(
    world: &mut World,
    ctx: &ScalingContext,
    target: i32,
    token: &str,
) -> Result<Action, ScalingError> {
    let now = ctx.base.clock.now();
    world.section.phase = Some("ScalingDown".into());
    let policy = world
        .app
        .spec
        .scaling
        .as_ref()
        .and_then(|s| s.scale_down.clone())
        .unwrap_or_else(|| stateward_api::statefulapp::ScaleDownPolicy {
            backup_first: true,
            ..Default::default()
        });
    let mut op = world.section.operation.clone().unwrap_or_default();

    // A replica already leaving: make sure it goes, then apply the volume policy.
    if let Some(ordinal) = op.leaving {
        if world.replicas() > ordinal {
            patch_sts(world, ctx, removal_patch(ordinal, policy.removed_volumes)).await?;
        }
        if world.pod(ordinal).is_some() {
            world.set(
                SCALING,
                true,
                "ScalingDown",
                format!(
                    "waiting for {} to be gone",
                    plan::pod_name(&world.sts, ordinal)
                ),
                now,
            );
            return Ok(Action::requeue(STEP));
        }
        let waiting = removed_volumes(world, ctx, ordinal, policy.removed_volumes).await?;
        if !waiting.is_empty() {
            world.set(
                SCALING,
                true,
                "ScalingDown",
                format!(
                    "waiting for the StatefulSet controller to delete the claims of {}: {}",
                    plan::pod_name(&world.sts, ordinal),
                    waiting.join(", ")
                ),
                now,
            );
            return Ok(Action::requeue(STEP));
        }
        if policy.removed_volumes == RemovedVolumePolicy::Delete {
            // Its claims are gone: no other scale-down may delete claims on its own.
            patch_sts(
                world,
                ctx,
                serde_json::json!({"spec": {"persistentVolumeClaimRetentionPolicy": {"whenScaled": "Retain"}}}),
            )
            .await?;
        }
        op.leaving = None;
        world.section.operation = Some(op);
        return Ok(Action::requeue(Duration::from_millis(200)));
    }
    let current = world.replicas();
    if current <= target {
        return Ok(Action::requeue(STEP));
    }

    // The backup, once, before the first replica goes; it runs under our lock.
    if policy.backup_first && world.app.spec.backup.is_some() {
        match op.backup.clone() {
            None => {
                let name = create_backup(world, ctx, token).await?;
                op.backup = Some(name.clone());
                world.section.operation = Some(op);
                world.set(
                    SCALING,
                    true,
                    "ScalingDown",
                    format!("{current} → {target}: backing up first ({name})"),
                    now,
                );
                return Ok(Action::requeue(STEP));
            }
            Some(name) => {
                let backups: Api<Backup> = Api::namespaced(ctx.base.client.clone(), &world.ns());
                let backup = backups.get_opt(&name).await?;
                match backup
                    .as_ref()
                    .and_then(|b| b.status.as_ref())
                    .and_then(|s| s.phase)
                {
                    Some(BackupPhase::Completed) => {}
                    Some(BackupPhase::Failed) if op.failed_backups.len() + 1 < BACKUP_ATTEMPTS => {
                        // A transient failure (S3 hiccup, a pod restarting): try again.
                        publish(ctx, &world.app, EventType::Warning, "BackupRetry", format!(
                            "the backup taken before scaling down, {name}, failed; taking another (attempt {} of {BACKUP_ATTEMPTS})",
                            op.failed_backups.len() + 2
                        )).await;
                        op.failed_backups.push(name);
                        op.backup = None;
                        world.section.operation = Some(op);
                        return Ok(Action::requeue(Duration::from_secs(5)));
                    }
                    Some(BackupPhase::Failed) => {
                        return fail(world, ctx, "BackupFailed", format!(
                            "the backups taken before scaling down ({}, {name}) failed; no replica was removed (see the Backups' status)",
                            op.failed_backups.join(", ")
                        )).await;
                    }
                    _ if backup.is_none() => {
                        return fail(world, ctx, "BackupFailed", format!(
                            "the backup taken before scaling down, {name}, was deleted; no replica was removed"
                        )).await;
                    }
                    _ => {
                        // Idempotent: also names a Backup created before this manager
                        // recorded nested uids (or whose naming a crash interrupted).
                        if let Some(uid) = backup.as_ref().and_then(|b| b.uid()) {
                            OperationLock::new(
                                ctx.base.client.clone(),
                                &world.ns(),
                                &world.app.name_any(),
                                &world.app.spec.stateful_set_name,
                            )
                            .allow_nested(token, &uid)
                            .await?;
                        }
                        world.section.operation = Some(op);
                        world.set(
                            SCALING,
                            true,
                            "ScalingDown",
                            format!("{current} → {target}: waiting for backup {name}"),
                            now,
                        );
                        return Ok(Action::requeue(STEP));
                    }
                }
            }
        }
    } else if policy.backup_first {
        return fail(world, ctx, "NoBackupPolicy", "scaleDown.backupFirst is set but the app has no spec.backup: configure backups, or set scaling.scaleDown.backupFirst: false".into()).await;
    }

    let ordinal = current - 1;
    let pod = plan::pod_name(&world.sts, ordinal);
    if let Some(hook) = &policy.pre_scale_down_hook
        && !op.hooked.contains(&ordinal)
        && world.pod(ordinal).is_some()
    {
        let pods: Api<Pod> = Api::namespaced(ctx.base.client.clone(), &world.ns());
        match hooks::run(&pods, &pod, hook).await {
            Ok(()) => {
                publish(
                    ctx,
                    &world.app,
                    EventType::Normal,
                    "PreScaleDownHook",
                    format!("hook {} ran in {pod}", hook.name),
                )
                .await;
            }
            Err(e) if hook.on_error == stateward_api::statefulapp::OnError::Continue => {
                publish(
                    ctx,
                    &world.app,
                    EventType::Warning,
                    "HookFailed",
                    format!("{e} (onError Continue)"),
                )
                .await;
            }
            Err(e) => {
                return fail(
                    world,
                    ctx,
                    "HookFailed",
                    format!("{e}; {pod} was not removed"),
                )
                .await;
            }
        }
        op.hooked.push(ordinal);
        // Recorded before anything else happens, so a restarted manager never runs it again.
        world.section.operation = Some(op);
        return Ok(Action::requeue(Duration::from_millis(200)));
    }
    // Record the leaving replica first, then remove it: a restart resumes from the record.
    op.leaving = Some(ordinal);
    world.section.operation = Some(op);
    write_status(world, ctx).await?;
    patch_sts(world, ctx, removal_patch(ordinal, policy.removed_volumes)).await?;
    publish(
        ctx,
        &world.app,
        EventType::Normal,
        "ScalingDown",
        format!("removing {pod} ({current} → {ordinal}, target {target})"),
    )
    .await;
    world.set(
        SCALING,
        true,
        "ScalingDown",
        format!("removing {pod} ({current} → {ordinal}, target {target})"),
        now,
    );
    Ok(Action::requeue(STEP))
}

/// `<app>-scale-down-<yyyymmddhhmmss>`, the prefix shortened with a hash so the name
/// stays within 63 characters whatever the app's name.
fn scale_down_backup_name(app: &str, now: chrono::DateTime<chrono::Utc>) -> String {
    let stamp = now.format("%Y%m%d%H%M%S").to_string();
    let head = names::bounded(&format!("{app}-scale-down"), 63 - stamp.len() - 1, false);
    format!("{head}-{stamp}")
}

async fn create_backup(
    world: &World,
    ctx: &ScalingContext,
    token: &str,
) -> Result<String, ScalingError> {
    let name = scale_down_backup_name(&world.app.name_any(), ctx.base.clock.now());
    let mut backup = Backup::new(
        &name,
        BackupSpec {
            app: world.app.name_any(),
            deletion_policy: DeletionPolicy::Retain,
            ..Default::default()
        },
    );
    let meta = backup.meta_mut();
    meta.namespace = Some(world.ns());
    meta.labels = Some(BTreeMap::from([
        (
            APP_LABEL.to_string(),
            names::label_value(&world.app.name_any()),
        ),
        (MANAGED_BY_LABEL.to_string(), MANAGED_BY_VALUE.to_string()),
    ]));
    meta.annotations = Some(BTreeMap::from([(
        PARENT_TOKEN_ANNOTATION.to_string(),
        token.to_string(),
    )]));
    let api: Api<Backup> = Api::namespaced(ctx.base.client.clone(), &world.ns());
    let created = match api.create(&PostParams::default(), &backup).await {
        Ok(created) => created,
        Err(kube::Error::Api(s)) if s.code == 409 => api.get(&name).await?,
        Err(e) => return Err(e.into()),
    };
    // Only this Backup may run under our lock: the token in its annotation alone opens
    // nothing (anyone who can read the Backup could copy it).
    let lock = OperationLock::new(
        ctx.base.client.clone(),
        &world.ns(),
        &world.app.name_any(),
        &world.app.spec.stateful_set_name,
    );
    lock.allow_nested(token, &created.uid().unwrap_or_default())
        .await?;
    publish(
        ctx,
        &world.app,
        EventType::Normal,
        "BackupBeforeScaleDown",
        format!("created Backup {name}"),
    )
    .await;
    Ok(name)
}

/// Applies the removed-volume policy to a replica whose pod is gone; returns the claims
/// still waiting for their deletion (empty when done).
async fn removed_volumes(
    world: &World,
    ctx: &ScalingContext,
    ordinal: i32,
    policy: RemovedVolumePolicy,
) -> Result<Vec<String>, ScalingError> {
    let mut waiting = Vec::new();
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(ctx.base.client.clone(), &world.ns());
    let pods: Api<Pod> = Api::namespaced(ctx.base.client.clone(), &world.ns());
    let finished_agents: Vec<Pod> = pods
        .list(&ListParams::default().labels(&format!("{MANAGED_BY_LABEL}={MANAGED_BY_VALUE}")))
        .await?
        .items
        .into_iter()
        .filter(|p| {
            matches!(
                p.status.as_ref().and_then(|s| s.phase.as_deref()),
                Some("Succeeded" | "Failed")
            )
        })
        .collect();
    for name in plan::claim_names(&world.sts, ordinal) {
        // A finished backup agent that mounted this claim keeps its `pvc-protection`
        // finalizer: the claim could not be deleted (by this policy, or by the user
        // deciding about a stale volume) until the Backup is. Its result is in the
        // Backup's status; the pod goes.
        for agent in finished_agents.iter().filter(|p| mounts(p, &name)) {
            match pods
                .delete(&agent.name_any(), &DeleteParams::default())
                .await
            {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => return Err(e.into()),
            }
        }
        match policy {
            RemovedVolumePolicy::Delete => {
                let Some(claim) = claims.get_opt(&name).await? else {
                    continue;
                };
                // Owned by the leaving pod (set by the StatefulSet controller under
                // `whenScaled: Delete`): the garbage collector deletes it. Otherwise (a
                // replica removed by an earlier manager, before this rule) the manager
                // deletes it; its admission policy refuses that for a claim Stateward
                // did not label, and the refusal is reported.
                let owned_by_pod = claim.owner_references().iter().any(|o| o.kind == "Pod");
                if !owned_by_pod && claim.metadata.deletion_timestamp.is_none() {
                    match claims.delete(&name, &DeleteParams::default()).await {
                        Ok(_) => {}
                        Err(kube::Error::Api(s)) if s.code == 404 => continue,
                        Err(e) => return Err(e.into()),
                    }
                }
                waiting.push(name);
            }
            RemovedVolumePolicy::RetainStale => {
                let patch = serde_json::json!({"metadata": {
                    "labels": {STALE_LABEL: "true"},
                    "annotations": {STALE_SINCE_ANNOTATION: time::rfc3339(ctx.base.clock.now())},
                }});
                match claims
                    .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                {
                    Ok(_) => {}
                    Err(kube::Error::Api(s)) if s.code == 404 => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
    }
    Ok(waiting)
}

fn mounts(pod: &Pod, claim: &str) -> bool {
    pod.spec
        .as_ref()
        .and_then(|s| s.volumes.as_ref())
        .is_some_and(|v| {
            v.iter().any(|v| {
                v.persistent_volume_claim
                    .as_ref()
                    .is_some_and(|c| c.claim_name == claim)
            })
        })
}

async fn fail(
    world: &mut World,
    ctx: &ScalingContext,
    reason: &str,
    message: String,
) -> Result<Action, ScalingError> {
    let now = ctx.base.clock.now();
    let direction = "down";
    world.section.operation = None;
    world.section.failed_generation = world.app.meta().generation;
    world.section.phase = Some("Steady".into());
    world.set(BLOCKED, true, reason, message.clone(), now);
    world.set(
        SCALING,
        false,
        reason,
        "scale-down stopped; change spec.scaling to try again",
        now,
    );
    finished(world, ctx, direction, "failed", message).await;
    let lock = OperationLock::new(
        ctx.base.client.clone(),
        &world.ns(),
        &world.app.name_any(),
        &world.app.spec.stateful_set_name,
    );
    let current = lock.current().await?;
    release_ours(&lock, &current, &holder(&world.app)).await?;
    Ok(at_rest(world))
}

async fn finished(
    world: &World,
    ctx: &ScalingContext,
    direction: &str,
    result: &str,
    message: String,
) {
    ctx.operations
        .get_or_create(&OperationLabels {
            direction: direction.into(),
            result: result.into(),
        })
        .inc();
    let type_ = if result == "succeeded" {
        EventType::Normal
    } else {
        EventType::Warning
    };
    let reason = if result == "succeeded" {
        "Scaled"
    } else {
        "ScalingFailed"
    };
    publish(ctx, &world.app, type_, reason, message).await;
}

/// Another operation holds the lock with intent Stop: record what to come back to, keep
/// every PVC, go to zero.
async fn stop(
    world: &mut World,
    ctx: &ScalingContext,
    for_whom: &str,
) -> Result<Action, ScalingError> {
    let now = ctx.base.clock.now();
    world.section.phase = Some("Stopped".into());
    if !world
        .sts
        .annotations()
        .contains_key(STOPPED_REPLICAS_ANNOTATION)
    {
        let policy = world
            .sts
            .spec
            .as_ref()
            .and_then(|s| s.persistent_volume_claim_retention_policy.clone());
        patch_sts(
            world,
            ctx,
            serde_json::json!({
                "metadata": {"annotations": {
                    STOPPED_REPLICAS_ANNOTATION: world.replicas().to_string(),
                    STOPPED_POLICY_ANNOTATION: serde_json::to_string(&policy)?,
                }},
                "spec": {
                    "replicas": 0,
                    "persistentVolumeClaimRetentionPolicy": {"whenDeleted": "Retain", "whenScaled": "Retain"},
                },
            }),
        )
        .await?;
        publish(
            ctx,
            &world.app,
            EventType::Normal,
            "Stopping",
            format!(
                "stopping for {for_whom}: {} → 0 replicas, PVCs retained",
                world.replicas()
            ),
        )
        .await;
        world.set(
            STOPPED,
            false,
            "Stopping",
            format!("stopping for {for_whom}"),
            now,
        );
        return Ok(Action::requeue(STEP));
    }
    let left = world.pods_from(0);
    if left.is_empty() {
        if !world
            .conditions
            .iter()
            .any(|c| c.type_ == STOPPED && c.status == "True")
        {
            ctx.operations
                .get_or_create(&OperationLabels {
                    direction: "stop".into(),
                    result: "succeeded".into(),
                })
                .inc();
        }
        world.set(
            STOPPED,
            true,
            "StoppedForOperation",
            format!("stopped for {for_whom}; comes back when it releases the lock"),
            now,
        );
    } else {
        world.set(
            STOPPED,
            false,
            "Stopping",
            format!("stopping for {for_whom}: waiting for {}", left.join(", ")),
            now,
        );
    }
    world.set(
        SCALING,
        false,
        "Stopped",
        format!("stopped for {for_whom}"),
        now,
    );
    Ok(Action::requeue(STEP))
}

/// The Stop holder let go: bring back the replica count and the PVC retention policy.
async fn start(world: &mut World, ctx: &ScalingContext) -> Result<Action, ScalingError> {
    let now = ctx.base.clock.now();
    let replicas: i32 = world
        .sts
        .annotations()
        .get(STOPPED_REPLICAS_ANNOTATION)
        .and_then(|r| r.parse().ok())
        .unwrap_or(1);
    let policy: serde_json::Value = world
        .sts
        .annotations()
        .get(STOPPED_POLICY_ANNOTATION)
        .and_then(|p| serde_json::from_str(p).ok())
        .unwrap_or(serde_json::Value::Null);
    // A merge patch sets the whole policy back (or removes it when there was none).
    let mut spec =
        serde_json::json!({"replicas": replicas, "persistentVolumeClaimRetentionPolicy": null});
    patch_sts(world, ctx, serde_json::json!({"spec": spec.clone()})).await?;
    spec["persistentVolumeClaimRetentionPolicy"] = policy;
    patch_sts(
        world,
        ctx,
        serde_json::json!({
            "metadata": {"annotations": {STOPPED_REPLICAS_ANNOTATION: null, STOPPED_POLICY_ANNOTATION: null}},
            "spec": spec,
        }),
    )
    .await?;
    ctx.operations
        .get_or_create(&OperationLabels {
            direction: "start".into(),
            result: "succeeded".into(),
        })
        .inc();
    publish(
        ctx,
        &world.app,
        EventType::Normal,
        "Started",
        format!("started again with {replicas} replicas"),
    )
    .await;
    world.section.phase = Some("Steady".into());
    world.set(
        STOPPED,
        false,
        "Started",
        format!("started again with {replicas} replicas"),
        now,
    );
    Ok(Action::requeue(STEP))
}

/// What the scaling controller writes in an app's status.
const STATUS_FIELDS: apply::StatusFields = apply::StatusFields {
    keys: &["scaling", "selector", "replicas"],
    conditions: &OUR_CONDITIONS,
};

/// Writes the section and our conditions when they changed (compared with the app as
/// last read or written), and keeps `world.app` as written, so a second write in the same
/// pass compares with the first.
async fn write_status(world: &mut World, ctx: &ScalingContext) -> Result<(), ScalingError> {
    let apps: Api<StatefulApp> = Api::namespaced(ctx.base.client.clone(), &world.ns());
    let mut status = serde_json::json!({
        "scaling": serde_json::to_value(&world.section)?,
        "conditions": world.conditions,
    });
    if let Some(selector) = &world.selector {
        status["selector"] = selector.clone().into();
        status["replicas"] = world
            .sts
            .status
            .as_ref()
            .map(|s| s.replicas)
            .unwrap_or_default()
            .into();
    }
    if let Some(written) = apply::apply_status_if_changed(
        &apps,
        &world.app.name_any(),
        apply::managers::SCALING,
        &STATUS_FIELDS,
        world.app.status.as_ref(),
        status,
    )
    .await?
    {
        world.app.status = written.status;
    }
    Ok(())
}

async fn publish(
    ctx: &ScalingContext,
    app: &StatefulApp,
    type_: EventType,
    reason: &str,
    note: String,
) {
    ctx.base
        .publish(&app.object_ref(&()), type_, reason, "Scale", note)
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scale_down_backup_names_fit_for_app_names_of_every_length() {
        let now = chrono::DateTime::parse_from_rfc3339("2026-12-02T10:11:12Z")
            .map(|t| t.with_timezone(&chrono::Utc))
            .unwrap_or_default();
        assert_eq!(
            scale_down_backup_name("db", now),
            "db-scale-down-20261202101112"
        );
        for app in names::sample_names() {
            let name = scale_down_backup_name(&app, now);
            assert!(
                names::is_dns_subdomain(&name) && name.len() <= names::MAX_LABEL,
                "app name of {} characters: {name:?}",
                app.len()
            );
        }
    }
}
