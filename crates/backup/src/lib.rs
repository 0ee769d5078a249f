//! The backup controller: BackupRepository checks (the `Ready` condition, Warning events,
//! the `stateward_backup_repository_ready` gauge) and Backup runs (`run`): agent Jobs,
//! hooks, the manifest commit, cancel and deadline, sweeping failed runs. Schedules and
//! retention arrive with issue #5.

pub mod repository;
pub mod retention;
pub mod run;
pub mod sweep;

use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::batch::v1::Job;
use kube::Api;
use kube::runtime::{Controller, watcher};
use stateward_api::{Backup, BackupRepository};
use stateward_runtime::Context;

pub use run::RunConfig;

/// The controller's name in metrics and logs.
pub const CONTROLLER: &str = "backup";

/// Runs the repository and backup-run loops until shutdown; `namespace` limits the
/// watches.
pub async fn run(base: Context, namespace: Option<String>, config: RunConfig) {
    let gauge = prometheus_client::metrics::family::Family::default();
    base.metrics.register(
        "backup_repository_ready",
        "1 when the repository's last check succeeded",
        gauge.clone(),
    );
    let repo_ctx = Arc::new(repository::RepositoryContext {
        base: base.clone(),
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
