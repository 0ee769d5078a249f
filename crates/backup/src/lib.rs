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
use kube::ResourceExt;
use kube::runtime::Controller;
use kube::runtime::reflector::ObjectRef;
use stateward_api::{Backup, Restore, StatefulApp};
use stateward_runtime::Context;
use stateward_runtime::watch::{self, Stores};

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

/// Runs the repository, backup-run and schedule loops until shutdown, woken by the
/// shared watches (`stores`).
pub async fn run(base: Context, stores: Arc<Stores>, config: Config) {
    futures::join!(
        run_backups(base.clone(), stores.clone(), config.runs),
        run_schedules(base, stores, config.schedules)
    );
}

/// The scheduler loop alone (tests drive it with a movable clock).
///
/// What wakes an app: its spec and metadata (not status), its Backups changing phase,
/// labels or deletion (retention and the summary follow each run), a Restore changing
/// phase (a Backup it protected from retention may go), and the timers: the next slot,
/// the `BackupsHealthy` flip, and `resync`.
pub async fn run_schedules(base: Context, stores: Arc<Stores>, config: ScheduleConfig) {
    if !stores.wait_synced(&base.shutdown).await {
        return;
    }
    let ctx = Arc::new(schedule::ScheduleContext {
        metrics: schedule::ScheduleMetrics::register(&base.metrics),
        base: base.clone(),
        config,
        stores: stores.clone(),
    });
    let of_restore = stores.clone();
    Controller::for_shared_stream(
        stores.apps.subscribe_by(watch::spec_and_metadata),
        stores.apps.reader(),
    )
    .watches_shared_stream(
        stores.backups.changes_by(|b: &Backup| {
            watch::spec_and_metadata(b)
                ^ watch::phase_key(b, b.status.as_ref().and_then(|s| s.phase.as_ref()))
        }),
        |b: Arc<Backup>| Stores::app_named(b.namespace(), &b.spec.app),
    )
    .watches_shared_stream(
        stores.restores.changes_by(|r: &Restore| {
            watch::phase_key(r, r.status.as_ref().and_then(|s| s.phase.as_ref()))
        }),
        move |r: Arc<Restore>| {
            // The app whose Backup the Restore reads (retention protects it meanwhile).
            let ns = r.namespace().unwrap_or_default();
            r.spec.source.backup.as_ref().and_then(|name| {
                of_restore
                    .backups
                    .reader()
                    .get(&ObjectRef::new(name).within(&ns))
                    .map(|b| ObjectRef::<StatefulApp>::new(&b.spec.app).within(&ns))
            })
        },
    )
    .with_config(watch::controller_config())
    .graceful_shutdown_on(base.shutdown.clone().cancelled_owned())
    .run(schedule::reconcile, schedule::error_policy, ctx)
    .for_each(|_| futures::future::ready(()))
    .await;
}

/// The repository and backup-run loops.
pub async fn run_backups(base: Context, stores: Arc<Stores>, config: RunConfig) {
    if !stores.wait_synced(&base.shutdown).await {
        return;
    }
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
        held: Default::default(),
        checks,
        stores: stores.clone(),
    });
    // Repositories are read by this loop only; their watch is shared anyway so that it
    // follows the manager's scope (one namespace, several, or all). The check's timer is
    // its trigger; a spec change wakes it too.
    let repositories = Controller::for_shared_stream(
        stores.repositories.subscribe(),
        stores.repositories.reader(),
    )
    .with_config(watch::controller_config())
    .graceful_shutdown_on(base.shutdown.clone().cancelled_owned())
    .run(repository::reconcile, repository::error_policy, repo_ctx)
    .for_each(|_| futures::future::ready(()));
    // A run wakes on its Backup and on its agent Jobs (the shared store holds only
    // Stateward's agent Jobs; `owns` keeps those a Backup owns).
    let runs = Controller::for_shared_stream(stores.backups.subscribe(), stores.backups.reader())
        .owns_shared_stream(stores.jobs.changes())
        .with_config(watch::controller_config())
        .graceful_shutdown_on(base.shutdown.clone().cancelled_owned())
        .run(run::reconcile, run::error_policy, run_ctx)
        .for_each(|_| futures::future::ready(()));
    futures::join!(repositories, runs);
}
