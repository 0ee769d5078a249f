//! Backup runs: a state machine persisted in `Backup.status`, so a restarted manager
//! continues where it was. Each reconcile reads the Backup fresh and takes the next step:
//!
//! 1. **start** (no phase yet): resolve StatefulApp → settings → repository (checked) →
//!    StatefulSet → pods → volumes; any problem ends the run Failed with a reason before
//!    anything is written to S3. Then take the app's operation lock (or wait, `Pending`
//!    with `LockAcquired=False/WaitingForLock`) and record the targets: `Running`.
//! 2. **pre-hooks**, each recorded in `status.hooks` as it finishes.
//! 3. **agent Jobs**, one per target, named deterministically (a restarted manager adopts
//!    them), created under the global and per-node caps; their outcome per volume.
//! 4. **post-hooks**, always (also after a failure).
//! 5. **commit**: `manifest.json` written last, then `Completed`; or, on any failure
//!    (`FailureTarget` set first, like a Job), stop the Jobs, abort uploads, delete the
//!    objects, then `Failed`. The lock is released last.

pub mod delete;
mod hook_progress;
pub mod identity;
mod import;
pub mod plan;
pub mod store;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use hook_progress::HookStep;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use kube::api::{DeleteParams, ListParams, PostParams, PropagationPolicy};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Api, Resource, ResourceExt};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use stateward_agent::manifest::{self, Entry, FORMAT_VERSION, Manifest};
use stateward_api::backup::{Backup, BackupPhase, BackupStatus, HookStage, VolumeResult};
use stateward_api::repository::BackupRepository;
use stateward_api::statefulapp::{BackupMethod, Hook, OnError, StatefulApp};
use stateward_runtime::agent_start::AgentStart;
use stateward_runtime::lock::{Acquired, Holder, Intent, LockError, OperationLock};
use stateward_runtime::{Context, agent_rbac, apply, conditions, hooks, ownership, time};

use plan::{Invalid, Settings};
use store::Store;

pub use stateward_api::common::PARENT_TOKEN_ANNOTATION;

/// How often a running backup is looked at when nothing else wakes it.
const POLL: Duration = Duration::from_secs(5);

/// Operator settings for runs.
#[derive(Debug, Clone)]
pub struct RunConfig {
    /// Image of the agent (the operator's own image).
    pub agent_image: String,
    /// Agent Jobs running at once, cluster-wide.
    pub max_jobs: usize,
    /// Agent Jobs running at once on one node.
    pub max_jobs_per_node: usize,
    /// How old a manifest-less prefix of a run that is no longer live must be before the
    /// repository loop sweeps it.
    pub orphan_grace: Duration,
    /// How long the finalizer of a deleted Backup retries deleting its data while the
    /// repository cannot be opened (its Secret or object gone, S3 unreachable) before it
    /// leaves the data in place with a Warning event, so namespace deletion never hangs.
    pub orphan_wait: Duration,
    /// How long an agent Job may wait for its pod to start before the run fails with the
    /// cause (see `stateward_runtime::agent_start`).
    pub agent_start_timeout: Duration,
    /// How long a run waits for the app's operation lock before it fails.
    pub lock_wait: Duration,
    /// The chart's fixed ClusterRole exec agents are bound to
    /// (`stateward_runtime::agent_rbac`).
    pub exec_cluster_role: String,
    /// Requests and limits of every agent container (the chart's `agent.resources`);
    /// `None` leaves them to the namespace's LimitRange.
    pub agent_resources: Option<k8s_openapi::api::core::v1::ResourceRequirements>,
}

impl Default for RunConfig {
    fn default() -> Self {
        Self {
            agent_image: format!("ghcr.io/stateward/stateward:{}", env!("CARGO_PKG_VERSION")),
            max_jobs: 8,
            max_jobs_per_node: 2,
            orphan_grace: Duration::from_secs(15 * 60),
            orphan_wait: Duration::from_secs(120),
            agent_start_timeout: stateward_runtime::agent_start::DEFAULT_BOUND,
            lock_wait: Duration::from_secs(3600),
            exec_cluster_role: stateward_runtime::agent_rbac::DEFAULT_EXEC_CLUSTER_ROLE.into(),
            agent_resources: None,
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AppLabels {
    pub namespace: String,
    pub app: String,
}

/// `stateward_backup_*` families.
#[derive(Clone)]
pub struct RunMetrics {
    pub runs: Family<ResultLabels, Counter>,
    pub duration: Histogram,
    pub last_success: Family<AppLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    pub stored_bytes: Family<AppLabels, Gauge>,
    pub consecutive_failures: Family<AppLabels, Gauge>,
}

impl RunMetrics {
    pub fn register(metrics: &stateward_runtime::metrics::Metrics) -> Self {
        let this = Self {
            runs: Family::default(),
            duration: Histogram::new(exponential_buckets(1.0, 2.0, 16)),
            last_success: Family::default(),
            stored_bytes: Family::default(),
            consecutive_failures: Family::default(),
        };
        for result in ["completed", "failed"] {
            let _ = this.runs.get_or_create(&ResultLabels {
                result: result.into(),
            });
        }
        metrics.register(
            "backup_runs",
            "Backup runs that ended, by result",
            this.runs.clone(),
        );
        metrics.register(
            "backup_duration_seconds",
            "Duration of backup runs",
            this.duration.clone(),
        );
        metrics.register(
            "backup_last_success_timestamp_seconds",
            "When the app's last successful backup completed (Unix time)",
            this.last_success.clone(),
        );
        metrics.register(
            "backup_stored_bytes",
            "Bytes stored by the app's last successful backup",
            this.stored_bytes.clone(),
        );
        metrics.register(
            "backup_consecutive_failures",
            "Failed backup runs of the app since its last success",
            this.consecutive_failures.clone(),
        );
        this
    }
}

/// Shared state of the run loop.
pub struct RunContext {
    pub base: Context,
    /// Pre-hook sessions held open while a run copies, by Backup uid. Only in memory: a
    /// manager that restarts mid-run has lost them, and the run fails (`HookSessionLost`)
    /// rather than copy without what the hook held.
    pub held: std::sync::Mutex<std::collections::HashMap<String, Vec<hooks::Held>>>,
    /// The shared watches: the agent caps count Jobs in the Job store (Stateward's agent
    /// Jobs in the watched namespaces), not with a LIST per run.
    pub stores: Arc<stateward_runtime::watch::Stores>,
    pub config: RunConfig,
    pub metrics: RunMetrics,
    /// The repository loop's last checks (a fresh Ready verdict spares a probe).
    pub checks: Arc<crate::repository::RecentChecks>,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("talking to the API server")]
    Kube(#[source] kube::Error),
    #[error("taking or releasing the operation lock")]
    Lock(#[source] LockError),
    #[error("{0}")]
    Store(String),
}

impl RunError {
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::Kube(_) => "kube",
            Self::Lock(_) => "lock",
            Self::Store(_) => "store",
        }
    }
}

impl From<kube::Error> for RunError {
    fn from(e: kube::Error) -> Self {
        Self::Kube(e)
    }
}

impl From<LockError> for RunError {
    fn from(e: LockError) -> Self {
        Self::Lock(e)
    }
}

/// What a run works on, resolved from the API.
struct Resolved {
    app: StatefulApp,
    settings: Settings,
    repository: BackupRepository,
    sts: StatefulSet,
    pods: Vec<Pod>,
    claims: Vec<PersistentVolumeClaim>,
}

fn holder(backup: &Backup) -> Holder {
    Holder {
        api_version: Backup::api_version(&()).to_string(),
        kind: Backup::kind(&()).to_string(),
        resource: Backup::plural(&()).to_string(),
        name: backup.name_any(),
        uid: backup.uid().unwrap_or_default(),
    }
}

/// The reconcile entry point.
#[tracing::instrument(skip_all, fields(namespace = backup.namespace().unwrap_or_default(), backup = backup.name_any()))]
pub async fn reconcile(backup: Arc<Backup>, ctx: Arc<RunContext>) -> Result<Action, RunError> {
    let timer = ctx.base.metrics.reconcile.start(crate::CONTROLLER);
    let result = step(&backup, &ctx).await;
    // The back-off resets only after a pass that succeeded: resetting it at the start of
    // a pass that then fails would retry a persistent error every second, forever.
    if result.is_ok() {
        let ns = backup.namespace().unwrap_or_default();
        ctx.base
            .backoff
            .on_success(&format!("backup/{ns}/{}", backup.name_any()));
    }
    timer.finish(if result.is_ok() { "success" } else { "error" });
    result
}

/// Transient errors back off per Backup.
pub fn error_policy(backup: Arc<Backup>, err: &RunError, ctx: Arc<RunContext>) -> Action {
    let key = format!(
        "backup/{}/{}",
        backup.namespace().unwrap_or_default(),
        backup.name_any()
    );
    tracing::warn!(backup = %key, error = %err, label = err.metric_label(), "backup reconcile failed");
    let delay = ctx
        .base
        .backoff
        .on_error(&key, stateward_runtime::backoff::ErrorKind::Transient)
        .unwrap_or(Duration::from_secs(300));
    Action::requeue(delay)
}

async fn step(cached: &Backup, ctx: &RunContext) -> Result<Action, RunError> {
    // Completed and Failed are final, and a finished Backup holds nothing to release (a
    // lock left by a crash after the final write is taken over: its holder has finished).
    // So a cached final phase needs no fresh read: a manager start with 10,000 finished
    // Backups costs no request. Deletion still reads fresh.
    if matches!(
        cached.status.as_ref().and_then(|s| s.phase),
        Some(BackupPhase::Completed | BackupPhase::Failed)
    ) && cached.meta().deletion_timestamp.is_none()
    {
        return Ok(Action::await_change());
    }
    let ns = cached.namespace().unwrap_or_default();
    let api: Api<Backup> = Api::namespaced(ctx.base.client.clone(), &ns);
    // Read fresh: the cache can lag behind our own last status write, and a step (a hook,
    // a Job) must never run twice because of it.
    let Some(backup) = api.get_opt(&cached.name_any()).await? else {
        return Ok(Action::await_change());
    };
    if backup.uid() != cached.uid() {
        return Ok(Action::await_change());
    }
    if backup.meta().deletion_timestamp.is_some() {
        return delete::finalize(&backup, ctx).await;
    }
    match backup.status.as_ref().and_then(|s| s.phase) {
        Some(BackupPhase::Completed | BackupPhase::Failed) => Ok(Action::await_change()),
        Some(BackupPhase::Running) => running(&backup, ctx).await,
        _ => match backup.spec.import_path.clone() {
            Some(path) => import::import(&backup, &path, ctx).await,
            None => start(&backup, ctx).await,
        },
    }
}

async fn resolve(
    backup: &Backup,
    client: &kube::Client,
) -> Result<Result<Resolved, Invalid>, RunError> {
    let ns = backup.namespace().unwrap_or_default();
    let invalid = |reason: &'static str, message: String| Ok(Err(Invalid { reason, message }));
    let apps: Api<StatefulApp> = Api::namespaced(client.clone(), &ns);
    let Some(app) = apps.get_opt(&backup.spec.app).await? else {
        return invalid(
            "AppNotFound",
            format!(
                "StatefulApp {} (spec.app) not found in namespace {ns}",
                backup.spec.app
            ),
        );
    };
    let settings = match plan::settings(backup, &app) {
        Ok(s) => s,
        Err(e) => return Ok(Err(e)),
    };
    let repos: Api<BackupRepository> = Api::namespaced(client.clone(), &ns);
    let Some(repository) = repos.get_opt(&settings.repository).await? else {
        // Which field named it: the Backup's own (a schedule's override lands there) or
        // the app's.
        let field = match backup.spec.repository {
            Some(_) => "spec.repository".to_string(),
            None => format!("spec.backup.repository of StatefulApp {}", app.name_any()),
        };
        return invalid(
            "RepositoryNotFound",
            format!(
                "BackupRepository {} ({field}) not found in namespace {ns}",
                settings.repository
            ),
        );
    };
    let sets: Api<StatefulSet> = Api::namespaced(client.clone(), &ns);
    let Some(sts) = sets.get_opt(&app.spec.stateful_set_name).await? else {
        return invalid(
            "StatefulSetNotFound",
            format!(
                "StatefulSet {} (spec.statefulSetName of StatefulApp {}) not found in namespace {ns}",
                app.spec.stateful_set_name,
                app.name_any()
            ),
        );
    };
    if let Err(e) = plan::named_containers_exist(&settings, &sts) {
        return Ok(Err(e));
    }
    let selector = sts
        .spec
        .as_ref()
        .and_then(|s| s.selector.match_labels.clone())
        .unwrap_or_default()
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",");
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let pods = pods
        .list(&ListParams::default().labels(&selector))
        .await?
        .items;
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), &ns);
    let claims = claims.list(&ListParams::default()).await?.items;
    Ok(Ok(Resolved {
        app,
        settings,
        repository,
        sts,
        pods,
        claims,
    }))
}

async fn start(backup: &Backup, ctx: &RunContext) -> Result<Action, RunError> {
    let now = ctx.base.clock.now();
    if backup.spec.cancel == Some(true) {
        return fail_before_start(
            backup,
            ctx,
            "Cancelled",
            "cancelled before it started".into(),
        )
        .await;
    }
    // Before anything is written: data that must go with the Backup needs the finalizer.
    delete::ensure_finalizer(backup, &ctx.base.client).await?;
    let resolved = match resolve(backup, &ctx.base.client).await? {
        Ok(r) => r,
        Err(e) => return fail_before_start(backup, ctx, e.reason, e.message).await,
    };
    // Another StatefulApp manages this StatefulSet: nothing runs through this one.
    if let Some(message) = ownership::check(&resolved.app, &ctx.stores) {
        return fail_before_start(backup, ctx, ownership::ALREADY_MANAGED, message).await;
    }
    // The repository: a Ready verdict the repository loop reached moments ago is trusted
    // (runs started together would each probe again), otherwise the run checks before
    // anything is written. A transient failure keeps the run Pending with back-off up to
    // a bound; a permanent one fails it.
    let repository = &resolved.repository;
    let verdict = if crate::repository::recently_ready(repository, ctx.checks.get(repository), now)
    {
        crate::repository::Verdict::Ready
    } else {
        crate::repository::check(&ctx.base.client, repository).await
    };
    let mut run_status = backup.status.clone().unwrap_or_default();
    let since = crate::repository::waiting_since(&run_status.conditions);
    let message = format!(
        "BackupRepository {}: {}",
        repository.name_any(),
        verdict.message(&repository.spec.s3.bucket)
    );
    match crate::repository::gate(&verdict, since, now) {
        crate::repository::RunGate::Proceed => {}
        crate::repository::RunGate::Fail => {
            let message = match since {
                Some(since) => format!(
                    "{message} (after waiting {} for it)",
                    human_duration((now - since).num_seconds())
                ),
                None => message,
            };
            return fail_before_start(backup, ctx, verdict.reason(), message).await;
        }
        crate::repository::RunGate::Wait { retry_in, until } => {
            let waiting = crate::repository::waiting_message(repository, &verdict, until);
            run_status.phase = Some(BackupPhase::Pending);
            conditions::set(
                &mut run_status.conditions,
                conditions::condition(
                    crate::repository::RUN_CONDITION,
                    false,
                    crate::repository::WAITING_REASON,
                    waiting.clone(),
                    backup.meta().generation,
                ),
                now,
            );
            write_status(backup, ctx, &run_status).await?;
            if since.is_none() {
                let reason = crate::repository::WAITING_REASON;
                publish(ctx, backup, EventType::Warning, reason, waiting).await;
            }
            return Ok(Action::requeue(retry_in));
        }
    }
    // A run that waited shows that the wait is over: what follows writes the status from
    // `backup`.
    let proceeding;
    let backup = match conditions::get(&run_status.conditions, crate::repository::RUN_CONDITION) {
        Some(_) => {
            conditions::set(
                &mut run_status.conditions,
                conditions::condition(
                    crate::repository::RUN_CONDITION,
                    true,
                    verdict.reason(),
                    message,
                    backup.meta().generation,
                ),
                now,
            );
            proceeding = Backup {
                status: Some(run_status),
                ..backup.clone()
            };
            &proceeding
        }
        None => backup,
    };
    let selected =
        match plan::selected_pods(&resolved.sts, &resolved.pods, resolved.settings.replicas) {
            Ok(p) => p,
            Err(e) => return fail_before_start(backup, ctx, e.reason, e.message).await,
        };
    let targets = match plan::targets(resolved.settings.method, &selected, &resolved.claims) {
        Ok(t) => t,
        Err(e) => return fail_before_start(backup, ctx, e.reason, e.message).await,
    };
    let ns = backup.namespace().unwrap_or_default();
    let lock = OperationLock::new(
        ctx.base.client.clone(),
        &ns,
        &resolved.app.name_any(),
        &resolved.app.spec.stateful_set_name,
    );
    let parent = backup
        .annotations()
        .get(PARENT_TOKEN_ANNOTATION)
        .map(String::as_str);
    let mut status = backup.status.clone().unwrap_or_default();
    let lock_reason = match lock.acquire(holder(backup), Intent::Read, parent).await? {
        Acquired::Busy(record) => {
            // Waiting for the lock is bounded too: a run that cannot start within
            // `lock_wait` ends, naming who held the app.
            let waiting_since = conditions::get(&status.conditions, "LockAcquired")
                .filter(|c| c.status == "False" && c.reason == "WaitingForLock")
                .map(|c| time::to_chrono(&c.last_transition_time));
            if let Some(since) = waiting_since
                && now - since
                    >= chrono::Duration::from_std(ctx.config.lock_wait).unwrap_or_default()
            {
                let message = format!(
                    "app {}'s operation lock stayed with {} {} (intent {:?}, since {}) for {}: the run gave up (--backup-lock-wait-seconds)",
                    resolved.app.name_any(),
                    record.holder.kind,
                    record.holder.name,
                    record.intent,
                    time::rfc3339(record.acquired_at),
                    human_duration((now - since).num_seconds())
                );
                return fail_before_start(backup, ctx, "LockWaitExceeded", message).await;
            }
            status.phase = Some(BackupPhase::Pending);
            conditions::set(
                &mut status.conditions,
                conditions::condition(
                    "LockAcquired",
                    false,
                    "WaitingForLock",
                    format!(
                        "waiting for {} {} (intent {:?}) to release app {}'s operation lock, held since {}",
                        record.holder.kind,
                        record.holder.name,
                        record.intent,
                        resolved.app.name_any(),
                        time::rfc3339(record.acquired_at)
                    ),
                    backup.meta().generation,
                ),
                now,
            );
            write_status(backup, ctx, &status).await?;
            return Ok(Action::requeue(POLL));
        }
        Acquired::Held(_) => "Held",
        Acquired::Nested(_) => "Nested",
    };
    let prefix = manifest::backup_prefix(
        resolved.repository.spec.s3.prefix.as_deref(),
        &ns,
        &resolved.app.name_any(),
        &backup.name_any(),
        &backup.uid().unwrap_or_default(),
    );
    status.phase = Some(BackupPhase::Running);
    status.observed_generation = backup.meta().generation;
    status.start_time = Some(time::rfc3339(now));
    status.repository = Some(resolved.repository.name_any());
    status.method = Some(resolved.settings.method);
    status.location = Some(prefix.clone());
    status.volumes = targets
        .iter()
        .map(|t| VolumeResult {
            name: t.name.clone(),
            phase: BackupPhase::Pending,
            pod: Some(t.pod.clone()),
            node: Some(t.node.clone()),
            job: Some(plan::job_name(&backup.name_any(), &t.name)),
            key: Some(plan::data_key(
                resolved.settings.method,
                &prefix,
                t,
                resolved.repository.spec.encryption.is_some(),
            )),
            ..Default::default()
        })
        .collect();
    conditions::set(
        &mut status.conditions,
        conditions::condition(
            "LockAcquired",
            true,
            lock_reason,
            format!("holds app {}'s operation lock", resolved.app.name_any()),
            backup.meta().generation,
        ),
        now,
    );
    write_status(backup, ctx, &status).await?;
    publish(
        ctx,
        backup,
        EventType::Normal,
        "Started",
        format!(
            "backing up {} target(s) of {} to {prefix}",
            targets.len(),
            resolved.app.name_any()
        ),
    )
    .await;
    Ok(Action::requeue(Duration::from_millis(200)))
}

fn failure_target(status: &BackupStatus) -> Option<(String, String)> {
    conditions::get(&status.conditions, "FailureTarget")
        .filter(|c| c.status == "True")
        .map(|c| (c.reason.clone(), c.message.clone()))
}

fn set_failure(
    backup: &Backup,
    status: &mut BackupStatus,
    reason: &str,
    message: String,
    now: DateTime<Utc>,
) {
    if failure_target(status).is_some() {
        return;
    }
    conditions::set(
        &mut status.conditions,
        conditions::condition(
            "FailureTarget",
            true,
            reason,
            message,
            backup.meta().generation,
        ),
        now,
    );
}

fn run_pods(status: &BackupStatus) -> Vec<String> {
    status
        .volumes
        .iter()
        .filter_map(|v| v.pod.clone())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect()
}

async fn running(backup: &Backup, ctx: &RunContext) -> Result<Action, RunError> {
    let now = ctx.base.clock.now();
    let ns = backup.namespace().unwrap_or_default();
    let mut status = backup.status.clone().unwrap_or_default();
    let resolved = resolve(backup, &ctx.base.client).await?;
    let settings = resolved.as_ref().ok().map(|r| r.settings.clone());

    // Cancel and deadline.
    if backup.spec.cancel == Some(true) {
        set_failure(
            backup,
            &mut status,
            "Cancelled",
            "cancelled by setting spec.cancel: true".into(),
            now,
        );
    }
    let started = status
        .start_time
        .as_deref()
        .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
        .map(|t| t.with_timezone(&Utc));
    let deadline = settings.as_ref().and_then(|s| s.deadline_seconds);
    if let (Some(started), Some(seconds)) = (started, deadline)
        && now >= started + chrono::Duration::seconds(seconds)
    {
        set_failure(
            backup,
            &mut status,
            "DeadlineExceeded",
            format!("did not finish within activeDeadlineSeconds ({seconds}s)"),
            now,
        );
    }
    if let Err(e) = &resolved {
        set_failure(backup, &mut status, e.reason, e.message.clone(), now);
    }
    let pods_api: Api<Pod> = Api::namespaced(ctx.base.client.clone(), &ns);
    let pods = run_pods(&status);

    // A held pre-hook whose session this process does not have: the manager restarted
    // and the hold ended with it.
    let uid = backup.uid().unwrap_or_default();
    let have_held = ctx
        .held
        .lock()
        .map(|m| m.contains_key(&uid))
        .unwrap_or(false);
    if !have_held
        && let Some(lost) = status
            .hooks
            .iter()
            .find(|h| h.stage == HookStage::Pre && h.held > 0)
    {
        let message = format!(
            "pre-hook {} held its session while the data was copied, and the manager restarted: the hold ended, so the copy cannot be trusted; run the backup again",
            lost.name
        );
        set_failure(backup, &mut status, "HookSessionLost", message, now);
        for result in status.hooks.iter_mut() {
            result.held = 0;
        }
    }

    // Pre-hooks, each recorded once.
    if failure_target(&status).is_none()
        && let Some(settings) = &settings
    {
        for hook in &settings.hooks.pre {
            if run_hook(
                backup,
                ctx,
                &pods_api,
                &pods,
                hook,
                HookStage::Pre,
                &mut status,
            )
            .await?
            {
                break;
            }
        }
    }

    // Agent Jobs.
    if failure_target(&status).is_none()
        && let Ok(resolved) = &resolved
    {
        let all_done = agents(backup, ctx, resolved, &mut status).await?;
        if !all_done && failure_target(&status).is_none() {
            write_status(backup, ctx, &status).await?;
            return Ok(Action::requeue(
                POLL.min(until_deadline(started, deadline, now)),
            ));
        }
    }

    // Held pre-hook sessions end now that the copy is over (or failed): before the
    // post-hooks, which may depend on the hold being released.
    release_held(backup, ctx, &mut status).await;

    // A failing run stops its agents before anything else, so no upload continues
    // behind the sweep.
    if failure_target(&status).is_some() {
        write_status(backup, ctx, &status).await?;
        if !stop_agents(backup, ctx).await? {
            return Ok(Action::requeue(Duration::from_secs(2)));
        }
    }

    // Post-hooks always run (in the pods the run started with).
    if let Some(settings) = &settings {
        for hook in &settings.hooks.post {
            run_hook(
                backup,
                ctx,
                &pods_api,
                &pods,
                hook,
                HookStage::Post,
                &mut status,
            )
            .await?;
        }
    }

    match failure_target(&status) {
        None => {
            let Ok(resolved) = &resolved else {
                return Ok(Action::requeue(POLL));
            };
            commit(backup, ctx, resolved, &mut status).await
        }
        Some((reason, message)) => {
            fail(
                backup,
                ctx,
                resolved.ok().map(|r| r.repository),
                &mut status,
                &reason,
                &message,
            )
            .await
        }
    }
}

fn until_deadline(
    started: Option<DateTime<Utc>>,
    deadline: Option<i64>,
    now: DateTime<Utc>,
) -> Duration {
    match (started, deadline) {
        (Some(s), Some(d)) => (s + chrono::Duration::seconds(d) - now)
            .to_std()
            .unwrap_or(Duration::ZERO)
            .max(Duration::from_millis(200)),
        _ => POLL,
    }
}

/// The message of a pre-hook result whose session is held open.
const HOLDING: &str = "holding its session until the copy is done";

/// Runs `hook` in each pod of the run it has not started in yet, recording the start
/// before each exec and the end after it (see [`hook_progress`]). Returns true when the
/// run must stop (a failure with onError Fail).
async fn run_hook(
    backup: &Backup,
    ctx: &RunContext,
    pods_api: &Api<Pod>,
    pods: &[String],
    hook: &Hook,
    stage: HookStage,
    status: &mut BackupStatus,
) -> Result<bool, RunError> {
    loop {
        let recorded = status
            .hooks
            .iter()
            .find(|h| h.stage == stage && h.name == hook.name);
        let (pod, outcome) = match hook_progress::next(recorded, pods, hook.on_error) {
            HookStep::Done { stop } => return Ok(stop),
            HookStep::Interrupted(pod) => (pod, Err(hook_progress::INTERRUPTED.to_string())),
            HookStep::Run(pod) => {
                // Recorded before the exec: a crash from here on never runs it twice.
                hook_progress::record_start(hook_progress::entry(
                    &mut status.hooks,
                    stage,
                    &hook.name,
                    pods.len(),
                ));
                write_status(backup, ctx, status).await?;
                let outcome = exec_hook(backup, ctx, pods_api, &pod, hook, stage).await;
                (pod, outcome)
            }
        };
        tracing::info!(hook = %hook.name, %pod, ?stage, succeeded = outcome.is_ok(), "hook ended");
        let failure = outcome.as_ref().err().cloned();
        let holding = matches!(&outcome, Ok(Some(note)) if note == HOLDING);
        let result = hook_progress::entry(&mut status.hooks, stage, &hook.name, pods.len());
        if holding {
            result.held += 1;
        }
        hook_progress::record_end(result, &pod, outcome);
        if let Some(message) = failure {
            let message = format!("hook {} in {pod}: {message}", hook.name);
            publish(
                ctx,
                backup,
                EventType::Warning,
                "HookFailed",
                message.clone(),
            )
            .await;
            if hook.on_error == OnError::Fail {
                set_failure(backup, status, "HookFailed", message, ctx.base.clock.now());
            }
        }
        write_status(backup, ctx, status).await?;
    }
}

/// One exec of a hook in one pod: `Ok(note)` or the failure's message. A held pre-hook
/// keeps its session open in the context until the copy is done.
async fn exec_hook(
    backup: &Backup,
    ctx: &RunContext,
    pods_api: &Api<Pod>,
    pod: &str,
    hook: &Hook,
    stage: HookStage,
) -> Result<Option<String>, String> {
    if stage == HookStage::Pre && hook.hold_until_post_hook {
        return match hooks::hold(pods_api, pod, hook).await? {
            Some(held) => {
                if let Ok(mut map) = ctx.held.lock() {
                    map.entry(backup.uid().unwrap_or_default())
                        .or_default()
                        .push(held);
                }
                Ok(Some(HOLDING.to_string()))
            }
            None => Ok(None),
        };
    }
    hooks::run(pods_api, pod, hook).await.map(|()| None)
}

/// Ends this run's held pre-hook sessions, recording how each ended.
async fn release_held(backup: &Backup, ctx: &RunContext, status: &mut BackupStatus) {
    let uid = backup.uid().unwrap_or_default();
    let held = ctx
        .held
        .lock()
        .ok()
        .and_then(|mut m| m.remove(&uid))
        .unwrap_or_default();
    let now = ctx.base.clock.now();
    for session in held {
        // Sessions are named `<hook>@<pod>`.
        let name = session.name.clone();
        // Hook names may contain `@`; pod names never do.
        let (hook, pod) = name.rsplit_once('@').unwrap_or((name.as_str(), ""));
        let outcome = session.release().await;
        if let Some(result) = status
            .hooks
            .iter_mut()
            .find(|h| h.stage == HookStage::Pre && h.name == hook)
        {
            result.held = (result.held - 1).max(0);
            match &outcome {
                Ok(()) if result.succeeded => {
                    result.message =
                        Some("held its session while the data was copied; released cleanly".into());
                }
                Ok(()) => {}
                Err(e) => hook_progress::record_failure(result, pod, e.clone()),
            }
        }
        if let Err(e) = outcome {
            publish(ctx, backup, EventType::Warning, "HookFailed", e.clone()).await;
            set_failure(backup, status, "HookFailed", e, now);
        }
    }
}

fn job_condition<'a>(
    job: &'a Job,
    type_: &str,
) -> Option<&'a k8s_openapi::api::batch::v1::JobCondition> {
    job.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == type_ && c.status == "True"))
}

fn job_active(job: &Job) -> bool {
    job_condition(job, "Complete").is_none() && job_condition(job, "Failed").is_none()
}

/// Why an agent Job failed: the agent's own words from its termination message, else
/// the Job's condition.
async fn job_failure(pods: &Api<Pod>, job: &Job) -> String {
    let selector = format!("job-name={}", job.name_any());
    if let Ok(list) = pods.list(&ListParams::default().labels(&selector)).await {
        for pod in list.items {
            let terminated = pod
                .status
                .as_ref()
                .and_then(|s| s.container_statuses.as_ref())
                .and_then(|c| c.first())
                .and_then(|c| c.state.as_ref())
                .and_then(|s| s.terminated.clone());
            if let Some(t) = terminated {
                if let Some(message) = t.message.as_deref()
                    && let Ok(v) = serde_json::from_str::<serde_json::Value>(message)
                    && let Some(error) = v.get("error").and_then(|e| e.as_str())
                {
                    return error.to_string();
                }
                return format!(
                    "the agent exited with code {} ({})",
                    t.exit_code,
                    t.reason.unwrap_or_default()
                );
            }
        }
    }
    job_condition(job, "Failed")
        .map(|c| {
            format!(
                "{}: {}",
                c.reason.clone().unwrap_or_default(),
                c.message.clone().unwrap_or_default()
            )
        })
        .unwrap_or_else(|| "the agent Job failed".into())
}

/// `AgentsStarted`: whether every agent runs, or what the first waiting volume waits for
/// (an agent slot under the caps, its pod's admission or scheduling).
fn set_agents_condition(backup: &Backup, status: &mut BackupStatus, now: DateTime<Utc>) {
    let waiting = status
        .volumes
        .iter()
        .filter(|v| matches!(v.phase, BackupPhase::Pending | BackupPhase::Running))
        .find_map(|v| Some((v.name.as_str(), v.message.as_deref()?)));
    let (started, reason, message) = match waiting {
        Some((volume, note)) if note.starts_with("waiting for an agent slot") => {
            (false, "WaitingForAgentSlot", format!("{volume}: {note}"))
        }
        Some((volume, note)) => match note.split_once(": ") {
            Some((reason, rest)) if reason.starts_with("Agent") => (
                false,
                match reason {
                    "AgentPodRefused" => "AgentPodRefused",
                    "AgentUnschedulable" => "AgentUnschedulable",
                    _ => "AgentNotStarted",
                },
                format!("{volume}: {rest}"),
            ),
            _ => (true, "Started", "every agent has started".to_string()),
        },
        None => (true, "Started", "every agent has started".to_string()),
    };
    conditions::set(
        &mut status.conditions,
        conditions::condition(
            "AgentsStarted",
            started,
            reason,
            message,
            backup.meta().generation,
        ),
        now,
    );
}

/// Whether an unfinished agent Job's pod started, waits (for what) or never will.
async fn agent_start(ctx: &RunContext, job: &Job) -> Result<AgentStart, RunError> {
    let status = job.status.clone().unwrap_or_default();
    if status.ready.unwrap_or(0) > 0 {
        return Ok(AgentStart::Started);
    }
    let signals = stateward_runtime::agent_start::observe(&ctx.base.client, job).await?;
    Ok(stateward_runtime::agent_start::decide(
        &signals,
        ctx.base.clock.now(),
        ctx.config.agent_start_timeout,
    ))
}

/// Observes and creates agent Jobs. Returns true when every target completed.
async fn agents(
    backup: &Backup,
    ctx: &RunContext,
    resolved: &Resolved,
    status: &mut BackupStatus,
) -> Result<bool, RunError> {
    let ns = backup.namespace().unwrap_or_default();
    let uid = backup.uid().unwrap_or_default();
    let jobs_api: Api<Job> = Api::namespaced(ctx.base.client.clone(), &ns);
    let pods_api: Api<Pod> = Api::namespaced(ctx.base.client.clone(), &ns);
    let mine: BTreeMap<String, Job> = jobs_api
        .list(&ListParams::default().labels(&format!("{}={uid}", plan::BACKUP_UID_LABEL)))
        .await?
        .items
        .into_iter()
        .map(|j| (j.name_any(), j))
        .collect();
    let mut store: Option<Store> = None;
    let mut to_create = Vec::new();
    // The reason when an agent pod never started (refused, unschedulable): it names the
    // run's failure better than "VolumeFailed".
    let mut never_started: Option<&'static str> = None;
    for volume in status.volumes.iter_mut() {
        if matches!(volume.phase, BackupPhase::Completed | BackupPhase::Failed) {
            continue;
        }
        let job_name = volume.job.clone().unwrap_or_default();
        match mine.get(&job_name) {
            Some(job) if job_condition(job, "Complete").is_some() => {
                if store.is_none() {
                    store = Some(Store::open(&ctx.base.client, &resolved.repository).await?);
                }
                let key = volume.key.clone().unwrap_or_default();
                let result = match &store {
                    Some(store) => store.result(&manifest::result_key(&key)).await?,
                    None => None,
                };
                match result {
                    Some(r) => {
                        volume.phase = BackupPhase::Completed;
                        volume.bytes_read = i64::try_from(r.bytes_read).ok();
                        volume.bytes_stored = i64::try_from(r.bytes_stored).ok();
                        volume.sha256 = Some(r.sha256);
                        volume.content_sha256 =
                            (!r.content_sha256.is_empty()).then_some(r.content_sha256);
                        volume.segments = Some(i64::from(r.segments));
                        volume.files = (resolved.settings.method == BackupMethod::Volume)
                            .then(|| i64::try_from(r.files).ok())
                            .flatten();
                        volume.duration_seconds =
                            Some((r.duration_seconds * 1000.0).round() / 1000.0);
                        volume.ownership = r.ownership;
                        volume.message = None;
                    }
                    None => {
                        volume.phase = BackupPhase::Failed;
                        volume.message = Some(format!(
                            "the agent finished but its result object {} is missing",
                            manifest::result_key(&key)
                        ));
                    }
                }
            }
            Some(job) if job_condition(job, "Failed").is_some() => {
                volume.phase = BackupPhase::Failed;
                volume.message = Some(job_failure(&pods_api, job).await);
            }
            Some(job) => {
                volume.phase = BackupPhase::Running;
                volume.message = None;
                match agent_start(ctx, job).await? {
                    AgentStart::Started => {}
                    AgentStart::Waiting {
                        reason, message, ..
                    } => volume.message = Some(format!("{reason}: {message}")),
                    AgentStart::Failed { reason, message } => {
                        // Deleted, so its pod cannot start after the run has ended.
                        match jobs_api
                            .delete(&job_name, &DeleteParams::background())
                            .await
                        {
                            Ok(_) => {}
                            Err(kube::Error::Api(e)) if e.code == 404 => {}
                            Err(e) => return Err(e.into()),
                        }
                        volume.phase = BackupPhase::Failed;
                        volume.message = Some(message);
                        never_started.get_or_insert(reason);
                    }
                }
            }
            None if volume.phase == BackupPhase::Running => {
                volume.phase = BackupPhase::Failed;
                volume.message = Some(format!("the agent Job {job_name} was deleted while it ran"));
            }
            None => to_create.push(volume.name.clone()),
        }
    }
    if !to_create.is_empty() {
        create_jobs(backup, ctx, resolved, status, &to_create).await?;
    }
    set_agents_condition(backup, status, ctx.base.clock.now());
    let failed: Vec<String> = status
        .volumes
        .iter()
        .filter(|v| v.phase == BackupPhase::Failed)
        .map(|v| format!("{}: {}", v.name, v.message.clone().unwrap_or_default()))
        .collect();
    if !failed.is_empty() {
        let message = failed.join("; ");
        let reason = never_started.unwrap_or("VolumeFailed");
        publish(ctx, backup, EventType::Warning, reason, message.clone()).await;
        set_failure(backup, status, reason, message, ctx.base.clock.now());
    }
    Ok(status
        .volumes
        .iter()
        .all(|v| v.phase == BackupPhase::Completed))
}

/// Creates the Jobs of `names` that fit under the caps; the rest wait as Pending.
async fn create_jobs(
    backup: &Backup,
    ctx: &RunContext,
    resolved: &Resolved,
    status: &mut BackupStatus,
    names: &[String],
) -> Result<(), RunError> {
    let ns = backup.namespace().unwrap_or_default();
    let jobs_api: Api<Job> = Api::namespaced(ctx.base.client.clone(), &ns);
    let pods_api: Api<Pod> = Api::namespaced(ctx.base.client.clone(), &ns);
    // From the cache: a Job this manager created a moment ago may be missing for the
    // watch's latency, so two runs deciding at once can exceed the cap by one each — the
    // cap bounds load, it is not a lock.
    let active: Vec<Arc<Job>> = ctx
        .stores
        .jobs
        .reader()
        .state()
        .into_iter()
        .filter(|j| {
            j.labels().get(plan::COMPONENT_LABEL).map(String::as_str) == Some(plan::AGENT_COMPONENT)
                && job_active(j)
        })
        .collect();
    let mut running_total = active.len();
    let mut per_node: BTreeMap<String, usize> = BTreeMap::new();
    for job in &active {
        if let Some(node) = job.labels().get(plan::NODE_LABEL) {
            *per_node.entry(node.clone()).or_default() += 1;
        }
    }
    let service_account = if resolved.settings.method == BackupMethod::Exec {
        agent_rbac::ensure_exec_agent(
            &ctx.base.client,
            &ns,
            &resolved.app.spec.stateful_set_name,
            &ctx.config.exec_cluster_role,
            resolved.app.controller_owner_ref(&()),
            apply::managers::BACKUP,
        )
        .await?
    } else {
        agent_rbac::ensure_volume_agent(
            &ctx.base.client,
            &ns,
            resolved.app.controller_owner_ref(&()),
            apply::managers::BACKUP,
        )
        .await?;
        agent_rbac::VOLUME_AGENT_ACCOUNT.to_string()
    };
    let prefix = status.location.clone().unwrap_or_default();
    let inputs = plan::JobInputs {
        backup,
        repository: &resolved.repository,
        settings: &resolved.settings,
        prefix: &prefix,
        agent_image: &ctx.config.agent_image,
        service_account: &service_account,
        resources: ctx.config.agent_resources.as_ref(),
    };
    for volume in status
        .volumes
        .iter_mut()
        .filter(|v| names.contains(&v.name))
    {
        let node = volume.node.clone().unwrap_or_default();
        // Jobs carry the node as a (bounded) label value: count by the same key.
        let on_node = per_node
            .get(&stateward_runtime::names::label_value(&node))
            .copied()
            .unwrap_or(0);
        if running_total >= ctx.config.max_jobs || on_node >= ctx.config.max_jobs_per_node {
            volume.message = Some(format!(
                "waiting for an agent slot ({running_total} agent Jobs running of {} allowed, {on_node} on node {node} of {})",
                ctx.config.max_jobs, ctx.config.max_jobs_per_node
            ));
            continue;
        }
        let pod_name = volume.pod.clone().unwrap_or_default();
        let Some(app_pod) = resolved.pods.iter().find(|p| p.name_any() == pod_name) else {
            volume.phase = BackupPhase::Failed;
            volume.message = Some(format!("pod {pod_name} is gone"));
            continue;
        };
        let target = plan::Target {
            name: volume.name.clone(),
            pod: pod_name.clone(),
            node: node.clone(),
            claim: (resolved.settings.method == BackupMethod::Volume).then(|| volume.name.clone()),
        };
        // Who the volume agent runs as: the data's owner, learned before it runs.
        let identity = match resolved.settings.method {
            BackupMethod::Exec => None,
            BackupMethod::Volume => {
                match identity::resolve(&pods_api, &resolved.app, app_pod, &volume.name).await {
                    Ok(resolved) => Some(resolved),
                    Err(message) => {
                        volume.phase = BackupPhase::Failed;
                        volume.message = Some(message);
                        continue;
                    }
                }
            }
        };
        let mut job: Job =
            serde_json::from_value(plan::agent_job(&inputs, &target, app_pod, identity))
                .map_err(|e| RunError::Store(format!("building the agent Job: {e}")))?;
        // The agent-start bound is measured on our clock, from here.
        job.annotations_mut().insert(
            stateward_runtime::agent_start::CREATED_AT_ANNOTATION.into(),
            time::rfc3339(ctx.base.clock.now()),
        );
        match jobs_api.create(&PostParams::default(), &job).await {
            Ok(_) => {}
            // Created by an earlier reconcile whose status write was lost: adopt it.
            Err(kube::Error::Api(s)) if s.code == 409 => {}
            Err(e) => return Err(e.into()),
        }
        tracing::info!(job = %job.name_any(), %node, "created agent Job");
        volume.phase = BackupPhase::Running;
        volume.message = None;
        running_total += 1;
        *per_node
            .entry(stateward_runtime::names::label_value(&node))
            .or_default() += 1;
    }
    Ok(())
}

/// Deletes this run's agent Jobs; true once none of their pods is left.
async fn stop_agents(backup: &Backup, ctx: &RunContext) -> Result<bool, RunError> {
    let ns = backup.namespace().unwrap_or_default();
    let selector = format!(
        "{}={}",
        plan::BACKUP_UID_LABEL,
        backup.uid().unwrap_or_default()
    );
    let jobs: Api<Job> = Api::namespaced(ctx.base.client.clone(), &ns);
    let params = DeleteParams {
        propagation_policy: Some(PropagationPolicy::Background),
        ..DeleteParams::default()
    };
    for job in jobs
        .list(&ListParams::default().labels(&selector))
        .await?
        .items
    {
        if job_active(&job) && job.metadata.deletion_timestamp.is_none() {
            match jobs.delete(&job.name_any(), &params).await {
                Ok(_) => tracing::info!(job = %job.name_any(), "stopped agent Job"),
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    let pods: Api<Pod> = Api::namespaced(ctx.base.client.clone(), &ns);
    let left = pods
        .list(&ListParams::default().labels(&selector))
        .await?
        .items
        .into_iter()
        .filter(|p| {
            let phase = p
                .status
                .as_ref()
                .and_then(|s| s.phase.clone())
                .unwrap_or_default();
            !matches!(phase.as_str(), "Succeeded" | "Failed")
        })
        .count();
    Ok(left == 0)
}

async fn release_lock(backup: &Backup, ctx: &RunContext) -> Result<(), RunError> {
    let ns = backup.namespace().unwrap_or_default();
    // The lock is the app's StatefulSet's. An app deleted since leaves its lock to be
    // recovered by the next acquirer (this run's holder has finished by then).
    let apps: Api<StatefulApp> = Api::namespaced(ctx.base.client.clone(), &ns);
    let Some(app) = apps.get_opt(&backup.spec.app).await? else {
        return Ok(());
    };
    let lock = OperationLock::new(
        ctx.base.client.clone(),
        &ns,
        &app.name_any(),
        &app.spec.stateful_set_name,
    );
    if let Some(record) = lock.current().await?
        && Some(&record.holder.uid) == backup.uid().as_ref()
    {
        lock.release(&record.token).await?;
    }
    Ok(())
}

fn human_duration(seconds: i64) -> String {
    let (h, m, s) = (seconds / 3600, (seconds % 3600) / 60, seconds % 60);
    match (h, m) {
        (0, 0) => format!("{s}s"),
        (0, _) => format!("{m}m{s}s"),
        _ => format!("{h}h{m}m{s}s"),
    }
}

fn finish_times(status: &mut BackupStatus, now: DateTime<Utc>) -> f64 {
    let started = status
        .start_time
        .as_deref()
        .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
        .map(|t| t.with_timezone(&Utc))
        .unwrap_or(now);
    let seconds = (now - started).num_milliseconds().max(0) as f64 / 1000.0;
    status.completion_time = Some(time::rfc3339(now));
    status.duration = Some(human_duration(seconds.round() as i64));
    seconds
}

/// Writes the manifest (the commit point), then Completed, then releases the lock.
async fn commit(
    backup: &Backup,
    ctx: &RunContext,
    resolved: &Resolved,
    status: &mut BackupStatus,
) -> Result<Action, RunError> {
    let now = ctx.base.clock.now();
    let prefix = status.location.clone().unwrap_or_default();
    let method = status.method.unwrap_or_default();
    // Whether a run's data is encrypted was decided when it started (the key says so),
    // whatever the repository says now.
    let sealed = |v: &VolumeResult| v.key.as_deref().is_some_and(|k| k.ends_with(".age"));
    let encrypted = status.volumes.iter().any(sealed);
    let entries = status
        .volumes
        .iter()
        .map(|v| Entry {
            name: v.name.clone(),
            pod: v.pod.clone().unwrap_or_default(),
            key: v.key.clone().unwrap_or_default(),
            encoding: format!(
                "{}{}",
                match method {
                    BackupMethod::Volume => "tar+zstd",
                    BackupMethod::Exec => "zstd",
                },
                if sealed(v) { "+age" } else { "" }
            ),
            bytes_read: v.bytes_read.unwrap_or(0).max(0) as u64,
            bytes_stored: v.bytes_stored.unwrap_or(0).max(0) as u64,
            sha256: v.sha256.clone().unwrap_or_default(),
            content_sha256: v.content_sha256.clone(),
            segments: v.segments.unwrap_or(1).max(1) as u32,
            files: v.files.map(|f| f.max(0) as u64),
            ownership: v.ownership.clone(),
            command: match method {
                BackupMethod::Exec => resolved
                    .settings
                    .exec
                    .as_ref()
                    .map(|e| e.command.clone())
                    .unwrap_or_default(),
                BackupMethod::Volume => Vec::new(),
            },
        })
        .collect();
    let claims = resolved
        .claims
        .iter()
        .filter(|c| {
            status.volumes.iter().any(|v| v.name == c.name_any()) && method == BackupMethod::Volume
        })
        .filter_map(|c| serde_json::to_value(c).ok())
        .map(|c| manifest::trimmed(&c))
        .collect();
    let mut sts = serde_json::to_value(&resolved.sts).unwrap_or_default();
    sts["apiVersion"] = "apps/v1".into();
    sts["kind"] = "StatefulSet".into();
    let manifest = Manifest {
        format_version: FORMAT_VERSION,
        written_by: format!("stateward {}", env!("CARGO_PKG_VERSION")),
        namespace: backup.namespace().unwrap_or_default(),
        app: resolved.app.name_any(),
        backup: backup.name_any(),
        backup_uid: backup.uid().unwrap_or_default(),
        method: format!("{method:?}"),
        started_at: status.start_time.clone().unwrap_or_default(),
        completed_at: time::rfc3339(now),
        encryption: encrypted.then(|| "age".to_string()),
        entries,
        stateful_set: manifest::trimmed(&sts),
        persistent_volume_claims: claims,
    };
    let store = Store::open(&ctx.base.client, &resolved.repository).await?;
    store.commit(&prefix, &manifest).await?;
    let seconds = finish_times(status, now);
    let stored: i64 = status.volumes.iter().filter_map(|v| v.bytes_stored).sum();
    status.stored_bytes = Some(stored);
    status.phase = Some(BackupPhase::Completed);
    conditions::set(
        &mut status.conditions,
        conditions::condition(
            "Completed",
            true,
            "ManifestWritten",
            format!(
                "{} target(s) stored under {prefix}; manifest written",
                status.volumes.len()
            ),
            backup.meta().generation,
        ),
        now,
    );
    release_lock(backup, ctx).await?;
    release_condition(backup, status, now);
    write_status(backup, ctx, status).await?;
    let labels = AppLabels {
        namespace: backup.namespace().unwrap_or_default(),
        app: backup.spec.app.clone(),
    };
    ctx.metrics
        .runs
        .get_or_create(&ResultLabels {
            result: "completed".into(),
        })
        .inc();
    ctx.metrics.duration.observe(seconds);
    ctx.metrics
        .last_success
        .get_or_create(&labels)
        .set(now.timestamp() as f64);
    ctx.metrics.stored_bytes.get_or_create(&labels).set(stored);
    ctx.metrics
        .consecutive_failures
        .get_or_create(&labels)
        .set(0);
    publish(
        ctx,
        backup,
        EventType::Normal,
        "Completed",
        format!(
            "stored {stored} bytes in {} under {prefix}",
            human_duration(seconds.round() as i64)
        ),
    )
    .await;
    Ok(Action::await_change())
}

fn release_condition(backup: &Backup, status: &mut BackupStatus, now: DateTime<Utc>) {
    if conditions::is_true(&status.conditions, "LockAcquired") {
        conditions::set(
            &mut status.conditions,
            conditions::condition(
                "LockAcquired",
                false,
                "Released",
                "the run ended and released the operation lock",
                backup.meta().generation,
            ),
            now,
        );
    }
}

/// Sweeps what the run stored (no manifest was written), releases the lock, Failed.
async fn fail(
    backup: &Backup,
    ctx: &RunContext,
    repository: Option<BackupRepository>,
    status: &mut BackupStatus,
    reason: &str,
    message: &str,
) -> Result<Action, RunError> {
    let now = ctx.base.clock.now();
    let mut note = String::new();
    if let (Some(repository), Some(prefix)) = (repository, status.location.clone()) {
        match Store::open(&ctx.base.client, &repository).await {
            Ok(store) => {
                let (aborted, deleted) = store.sweep(&prefix).await?;
                tracing::info!(%prefix, aborted, deleted, "swept a failed run's objects");
            }
            Err(e) => note = format!(" (objects under {prefix} could not be swept: {e})"),
        }
    }
    finish_and_record_failure(
        backup,
        ctx,
        status,
        reason,
        &format!("{message}{note}"),
        now,
    )
    .await?;
    release_lock(backup, ctx).await?;
    Ok(Action::await_change())
}

async fn finish_and_record_failure(
    backup: &Backup,
    ctx: &RunContext,
    status: &mut BackupStatus,
    reason: &str,
    message: &str,
    now: DateTime<Utc>,
) -> Result<(), RunError> {
    let seconds = finish_times(status, now);
    status.phase = Some(BackupPhase::Failed);
    status.observed_generation = backup.meta().generation;
    conditions::set(
        &mut status.conditions,
        conditions::condition(
            "Failed",
            true,
            reason,
            message.to_string(),
            backup.meta().generation,
        ),
        now,
    );
    release_condition(backup, status, now);
    write_status(backup, ctx, status).await?;
    let labels = AppLabels {
        namespace: backup.namespace().unwrap_or_default(),
        app: backup.spec.app.clone(),
    };
    ctx.metrics
        .runs
        .get_or_create(&ResultLabels {
            result: "failed".into(),
        })
        .inc();
    ctx.metrics.duration.observe(seconds);
    ctx.metrics
        .consecutive_failures
        .get_or_create(&labels)
        .inc();
    publish(ctx, backup, EventType::Warning, reason, message.to_string()).await;
    Ok(())
}

/// A run that never started: nothing was written to S3 and no lock is held.
async fn fail_before_start(
    backup: &Backup,
    ctx: &RunContext,
    reason: &str,
    message: String,
) -> Result<Action, RunError> {
    let now = ctx.base.clock.now();
    let mut status = backup.status.clone().unwrap_or_default();
    status.start_time.get_or_insert_with(|| time::rfc3339(now));
    finish_and_record_failure(backup, ctx, &mut status, reason, &message, now).await?;
    Ok(Action::await_change())
}

async fn write_status(
    backup: &Backup,
    ctx: &RunContext,
    status: &BackupStatus,
) -> Result<(), RunError> {
    let api: Api<Backup> = Api::namespaced(
        ctx.base.client.clone(),
        &backup.namespace().unwrap_or_default(),
    );
    let body = serde_json::to_value(status)
        .map_err(|e| RunError::Store(format!("encoding status: {e}")))?;
    apply::apply_status(&api, &backup.name_any(), apply::managers::BACKUP, body).await?;
    Ok(())
}

async fn publish(ctx: &RunContext, backup: &Backup, type_: EventType, reason: &str, note: String) {
    ctx.base
        .publish(&backup.object_ref(&()), type_, reason, "Backup", note)
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agents_started_names_what_the_first_waiting_volume_waits_for() {
        let backup: Backup = serde_yaml::from_str("metadata: {name: b}\nspec: {app: db}")
            .unwrap_or_else(|e| panic!("{e}"));
        let volume = |name: &str, phase: BackupPhase, message: Option<&str>| VolumeResult {
            name: name.into(),
            phase,
            message: message.map(String::from),
            ..Default::default()
        };
        type Row = (&'static str, Vec<VolumeResult>, bool, &'static str);
        let rows: Vec<Row> = vec![
            (
                "all running",
                vec![volume("a", BackupPhase::Running, None)],
                true,
                "Started",
            ),
            (
                "a slot",
                vec![
                    volume("a", BackupPhase::Running, None),
                    volume(
                        "b",
                        BackupPhase::Pending,
                        Some(
                            "waiting for an agent slot (8 agent Jobs running of 8 allowed, 0 on node n of 2)",
                        ),
                    ),
                ],
                false,
                "WaitingForAgentSlot",
            ),
            (
                "refused",
                vec![volume(
                    "a",
                    BackupPhase::Running,
                    Some("AgentPodRefused: the API server refused the agent pod: quota"),
                )],
                false,
                "AgentPodRefused",
            ),
            (
                "unschedulable",
                vec![volume(
                    "a",
                    BackupPhase::Running,
                    Some("AgentUnschedulable: 0/2 nodes"),
                )],
                false,
                "AgentUnschedulable",
            ),
            (
                "finished volumes do not wait",
                vec![volume("a", BackupPhase::Failed, Some("AgentPodRefused: x"))],
                true,
                "Started",
            ),
        ];
        for (case, volumes, started, reason) in rows {
            let mut status = BackupStatus {
                volumes,
                ..Default::default()
            };
            set_agents_condition(&backup, &mut status, Utc::now());
            let c = conditions::get(&status.conditions, "AgentsStarted")
                .unwrap_or_else(|| panic!("{case}"));
            assert_eq!(
                (c.status == "True", c.reason.as_str()),
                (started, reason),
                "{case}"
            );
            if !started {
                assert!(
                    c.message.contains(
                        &status
                            .volumes
                            .last()
                            .map(|v| v.name.clone())
                            .unwrap_or_default()
                    ),
                    "{case}: {}",
                    c.message
                );
            }
        }
    }

    #[test]
    fn durations_read_like_kubectl() {
        assert_eq!(human_duration(5), "5s");
        assert_eq!(human_duration(65), "1m5s");
        assert_eq!(human_duration(3725), "1h2m5s");
    }
}
