//! The backup controller, three loops:
//! - `repository`: BackupRepository checks (the `Ready` condition, Warning events, the
//!   `stateward_backup_repository_ready` gauge) and sweeping what crashed runs left;
//! - `run`: each Backup (agent Jobs, hooks, the manifest commit, cancel and deadline,
//!   and the finalizer that deletes stored data);
//! - `schedule`: each StatefulApp's schedules (firing, retention via `retention`,
//!   `status.backup`, `SchedulesValid`, `BackupsHealthy`).

pub mod repository;
pub mod retention;
pub mod run;
pub mod schedule;
pub mod sweep;

use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::batch::v1::Job;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{Controller, watcher};
use kube::{Api, ResourceExt};
use stateward_api::{Backup, BackupRepository, StatefulApp};
use stateward_runtime::Context;

pub use run::RunConfig;
pub use schedule::ScheduleConfig;

/// Operator settings of the backup controller.
#[derive(Debug, Clone, Default)]
pub struct Config {
    pub runs: RunConfig,
    pub schedules: ScheduleConfig,
}

/// The controller's name in metrics and logs.
pub const CONTROLLER: &str = "backup";

/// Runs the repository and backup-run loops until shutdown; `namespace` limits the
/// watches.
pub async fn run(base: Context, namespace: Option<String>, config: Config) {
    futures::join!(
        run_backups(base.clone(), namespace.clone(), config.runs),
        run_schedules(base, namespace, config.schedules)
    );
}

/// The scheduler loop alone (tests drive it with a movable clock).
pub async fn run_schedules(base: Context, namespace: Option<String>, config: ScheduleConfig) {
    let ctx = Arc::new(schedule::ScheduleContext {
        metrics: schedule::ScheduleMetrics::register(&base.metrics),
        base: base.clone(),
        config,
    });
    let (apps, backups): (Api<StatefulApp>, Api<Backup>) = match &namespace {
        Some(ns) => (
            Api::namespaced(base.client.clone(), ns),
            Api::namespaced(base.client.clone(), ns),
        ),
        None => (Api::all(base.client.clone()), Api::all(base.client.clone())),
    };
    // A Backup that changes (completes, fails, is deleted) wakes its app: retention and
    // the summary follow each run without waiting for the resync.
    Controller::new(apps, watcher::Config::default().any_semantic())
        .watches(
            backups,
            watcher::Config::default().any_semantic(),
            |b: Backup| {
                b.namespace()
                    .map(|ns| ObjectRef::<StatefulApp>::new(&b.spec.app).within(&ns))
            },
        )
        .graceful_shutdown_on(base.shutdown.clone().cancelled_owned())
        .run(schedule::reconcile, schedule::error_policy, ctx)
        .for_each(|_| futures::future::ready(()))
        .await;
}

/// The repository and backup-run loops.
pub async fn run_backups(base: Context, namespace: Option<String>, config: RunConfig) {
    let gauge = prometheus_client::metrics::family::Family::default();
    base.metrics.register(
        "backup_repository_ready",
        "1 when the repository's last check succeeded",
        gauge.clone(),
    );
    let checked_gauge = prometheus_client::metrics::family::Family::default();
    base.metrics.register(
        "backup_repository_last_check_timestamp_seconds",
        "When the repository was last checked (Unix time; status changes only with the verdict)",
        checked_gauge.clone(),
    );
    let checks = Arc::new(repository::RecentChecks::default());
    let repo_ctx = Arc::new(repository::RepositoryContext {
        base: base.clone(),
        checks: checks.clone(),
        checked_gauge,
        ready_gauge: gauge,
        next_check: Default::default(),
        orphan_grace: config.orphan_grace,
        swept: {
            let counter = prometheus_client::metrics::counter::Counter::default();
            base.metrics.register(
                "backup_orphans_swept",
                "Backup prefixes without a manifest, left by crashed runs, that were swept",
                counter.clone(),
            );
            counter
        },
    });
    let run_ctx = Arc::new(run::RunContext {
        base: base.clone(),
        metrics: run::RunMetrics::register(&base.metrics),
        config,
        scope: namespace.clone(),
        held: Default::default(),
        checks,
    });
    let (repos, backups, jobs): (Api<BackupRepository>, Api<Backup>, Api<Job>) = match &namespace {
        Some(ns) => (
            Api::namespaced(base.client.clone(), ns),
            Api::namespaced(base.client.clone(), ns),
            Api::namespaced(base.client.clone(), ns),
        ),
        None => (
            Api::all(base.client.clone()),
            Api::all(base.client.clone()),
            Api::all(base.client.clone()),
        ),
    };
    let repositories = Controller::new(repos, watcher::Config::default().any_semantic())
        .graceful_shutdown_on(base.shutdown.clone().cancelled_owned())
        .run(repository::reconcile, repository::error_policy, repo_ctx)
        .for_each(|_| futures::future::ready(()));
    // Agent Jobs wake their Backup; only ours are watched (by label).
    let agent_jobs = watcher::Config::default()
        .labels(&format!(
            "{}={}",
            run::plan::COMPONENT_LABEL,
            run::plan::AGENT_COMPONENT
        ))
        .any_semantic();
    let runs = Controller::new(backups, watcher::Config::default().any_semantic())
        .owns(jobs, agent_jobs)
        .graceful_shutdown_on(base.shutdown.clone().cancelled_owned())
        .run(run::reconcile, run::error_policy, run_ctx)
        .for_each(|_| futures::future::ready(()));
    futures::join!(repositories, runs);
}
