//! The backup controller. Today it checks BackupRepositories (the `Ready` condition, a
//! Warning event and the `stateward_backup_repository_ready` gauge); Backup runs,
//! schedules and retention arrive next (issues #4 and #5).

pub mod repository;

use std::sync::Arc;

use futures::StreamExt;
use kube::Api;
use kube::runtime::{Controller, watcher};
use stateward_api::BackupRepository;
use stateward_runtime::Context;

/// The controller's name in metrics and logs.
pub const CONTROLLER: &str = "backup";

/// Runs the loop until the stream ends; `namespace` limits the watch.
pub async fn run(base: Context, namespace: Option<String>) {
    let gauge = prometheus_client::metrics::family::Family::default();
    base.metrics.register(
        "backup_repository_ready",
        "1 when the repository's last check succeeded",
        gauge.clone(),
    );
    let ctx = Arc::new(repository::RepositoryContext {
        base: base.clone(),
        ready_gauge: gauge,
        next_check: Default::default(),
    });
    let repos: Api<BackupRepository> = match &namespace {
        Some(ns) => Api::namespaced(base.client.clone(), ns),
        None => Api::all(base.client.clone()),
    };
    Controller::new(repos, watcher::Config::default().any_semantic())
        .graceful_shutdown_on(base.shutdown.clone().cancelled_owned())
        .run(repository::reconcile, repository::error_policy, ctx)
        .for_each(|_| futures::future::ready(()))
        .await;
}
