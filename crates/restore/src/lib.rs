//! The restore controller: runs each `Restore`.
//!
//! A restore reads as a pipeline (`reconcile.rs`): resolve the source (a Backup, or a
//! repository path; tenancy checked; the manifest read) → plan (pure, `plan.rs`: mode,
//! one item per volume or dump) → take the app's operation lock (in place: intent `Stop`,
//! so the scaling controller stops the app with its PVCs kept) → stage every volume
//! (agent Jobs stream, verify both checksums and unpack into a staging directory) → swap
//! every volume in (journaled, so a crash rolls forward) → release the lock, and the app
//! comes back at its replica count. Any failure before the swap discards the staging and
//! leaves the old data as it was. Exec restores stream a verified dump into the app's
//! `restoreCommand` while it runs; clones fill fresh PVCs and may create the StatefulSet.
//!
//! The controller never moves bytes and never reads data objects: it reads manifests,
//! creates Jobs and reads the agents' results from their termination messages.

pub mod access;
pub mod plan;
mod reconcile;
pub mod source;

use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::batch::v1::Job;
use kube::ResourceExt;
use kube::runtime::Controller;
use kube::runtime::reflector::ObjectRef;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use stateward_api::Restore;
use stateward_runtime::Context;
use stateward_runtime::lock::LockError;
use stateward_runtime::watch::{self, Stores};

pub use reconcile::{error_policy, reconcile};

/// The controller's name (metrics label, event reporter, `--controllers`).
pub const CONTROLLER: &str = "restore";

/// Operator settings for restores.
#[derive(Debug, Clone)]
pub struct Config {
    /// Image of the agent (the operator's own image).
    pub agent_image: String,
    /// Extra environment for agent containers (tests use it for fault injection).
    pub agent_env: Vec<(String, String)>,
    /// How long an agent Job may wait for its pod to start before the restore fails with
    /// the cause (refused by admission or a quota, unschedulable).
    pub agent_start_timeout: std::time::Duration,
    /// A Restore's deadline before its swap when it sets no `activeDeadlineSeconds`.
    pub default_deadline: std::time::Duration,
    /// The chart's fixed ClusterRole exec agents are bound to
    /// (`stateward_runtime::agent_rbac`).
    pub exec_cluster_role: String,
    /// Whether a clone may create its StatefulSet (`spec.target.createStatefulSet`). Off
    /// (the chart's `features.cloneStatefulSets: false`, which drops `statefulsets create`
    /// unless volume expansion keeps it), such a Restore fails with `FeatureDisabled`
    /// before it creates anything.
    pub clone_stateful_sets: bool,
    /// Requests and limits of every agent container (the chart's `agent.resources`);
    /// `None` leaves them to the namespace's LimitRange.
    pub agent_resources: Option<k8s_openapi::api::core::v1::ResourceRequirements>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            agent_image: format!("ghcr.io/stateward/stateward:{}", env!("CARGO_PKG_VERSION")),
            agent_env: Vec::new(),
            agent_start_timeout: stateward_runtime::agent_start::DEFAULT_BOUND,
            default_deadline: std::time::Duration::from_secs(6 * 3600),
            exec_cluster_role: stateward_runtime::agent_rbac::DEFAULT_EXEC_CLUSTER_ROLE.into(),
            clone_stateful_sets: true,
            agent_resources: None,
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: String,
}

/// `stateward_restore_*` families.
#[derive(Clone)]
pub struct RestoreMetrics {
    pub runs: Family<ResultLabels, Counter>,
    pub duration: Histogram,
}

impl RestoreMetrics {
    pub fn register(metrics: &stateward_runtime::metrics::Metrics) -> Self {
        let runs = Family::<ResultLabels, Counter>::default();
        let duration = Histogram::new([5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 900.0, 1800.0, 3600.0]);
        metrics.register(
            "restore_runs",
            "Restores finished, by result (completed, failed)",
            runs.clone(),
        );
        metrics.register(
            "restore_duration_seconds",
            "Duration of finished restores, from start to the data in place",
            duration.clone(),
        );
        // Both results exist from the start, so a rate() over them works before the first.
        for result in ["completed", "failed"] {
            let _ = runs.get_or_create(&ResultLabels {
                result: result.into(),
            });
        }
        Self { runs, duration }
    }
}

/// Everything a reconcile needs.
pub struct RestoreContext {
    pub base: Context,
    /// The shared watches: a finished Restore that holds no lock in the Lease cache needs
    /// no request at all.
    pub stores: Arc<Stores>,
    pub config: Config,
    pub metrics: RestoreMetrics,
}

/// What went wrong in a reconcile (transient: the reconcile is retried with back-off).
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("Kubernetes API")]
    Kube(#[from] kube::Error),
    #[error("operation lock")]
    Lock(#[from] LockError),
    #[error("encoding an object: {0}")]
    Encode(#[from] serde_json::Error),
}

impl RestoreError {
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::Kube(_) => "kube",
            Self::Lock(_) => "lock",
            Self::Encode(_) => "encode",
        }
    }
}

/// Runs the restore controller until shutdown, woken by the shared watches: a Restore's
/// own changes and its agent Jobs'.
pub async fn run(base: Context, stores: Arc<Stores>, config: Config) {
    if !stores.wait_synced(&base.shutdown).await {
        return;
    }
    let ctx = Arc::new(RestoreContext {
        metrics: RestoreMetrics::register(&base.metrics),
        base: base.clone(),
        stores: stores.clone(),
        config,
    });
    base.metrics.reconcile.init(CONTROLLER);
    // Agent Jobs map to their Restore by label, not owner: swap Jobs are unowned. The
    // shared Job store holds backup agents too: only restore agents count.
    let to_restore = |job: Arc<Job>| {
        if job.labels().get(plan::COMPONENT_LABEL).map(String::as_str)
            != Some(plan::AGENT_COMPONENT)
        {
            return None;
        }
        let name = job
            .annotations()
            .get(plan::RESTORE_NAME_ANNOTATION)
            .or_else(|| job.labels().get(plan::RESTORE_LABEL))?
            .clone();
        Some(ObjectRef::<Restore>::new(&name).within(&job.namespace()?))
    };
    Controller::for_shared_stream(stores.restores.subscribe(), stores.restores.reader())
        .watches_shared_stream(stores.jobs.changes(), to_restore)
        .with_config(watch::controller_config())
        .graceful_shutdown_on(base.shutdown.clone().cancelled_owned())
        .run(reconcile, error_policy, ctx)
        .for_each(|_| futures::future::ready(()))
        .await;
}
