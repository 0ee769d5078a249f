//! Metrics with `prometheus-client`: the controller-runtime families users already chart,
//! plus room for `stateward_*` domain families registered by each controller.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ControllerLabels {
    pub controller: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub controller: String,
    /// `success`, `error`, `requeue` or `requeue_after`, as controller-runtime.
    pub result: String,
}

/// Reconcile metrics shared by every controller (label `controller`).
#[derive(Clone)]
pub struct ReconcileMetrics {
    pub total: Family<ResultLabels, Counter>,
    pub errors: Family<ControllerLabels, Counter>,
    pub time: Family<ControllerLabels, Histogram>,
}

impl ReconcileMetrics {
    fn new() -> Self {
        Self {
            total: Family::default(),
            errors: Family::default(),
            time: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.005, 2.0, 14))
            }),
        }
    }

    /// Creates the zero-valued series of a controller at start-up (as controller-runtime
    /// does), so dashboards and alerts see the controller before its first reconcile.
    pub fn init(&self, controller: &str) {
        for result in ["success", "error", "requeue", "requeue_after"] {
            let _ = self.total.get_or_create(&ResultLabels {
                controller: controller.into(),
                result: result.into(),
            });
        }
        let labels = ControllerLabels {
            controller: controller.into(),
        };
        let _ = self.errors.get_or_create(&labels);
        let _ = self.time.get_or_create(&labels);
    }

    /// Starts timing one reconcile of `controller`; call [`ReconcileTimer::finish`].
    pub fn start(&self, controller: &str) -> ReconcileTimer {
        ReconcileTimer {
            metrics: self.clone(),
            controller: controller.to_string(),
            started: Instant::now(),
        }
    }
}

/// Records one reconcile's duration and result.
pub struct ReconcileTimer {
    metrics: ReconcileMetrics,
    controller: String,
    started: Instant,
}

impl ReconcileTimer {
    pub fn finish(self, result: &str) {
        let labels = ControllerLabels {
            controller: self.controller.clone(),
        };
        self.metrics
            .time
            .get_or_create(&labels)
            .observe(self.started.elapsed().as_secs_f64());
        self.metrics
            .total
            .get_or_create(&ResultLabels {
                controller: self.controller.clone(),
                result: result.to_string(),
            })
            .inc();
        if result == "error" {
            self.metrics.errors.get_or_create(&labels).inc();
        }
    }
}

/// The process's registry.
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Mutex<Registry>>,
    pub reconcile: ReconcileMetrics,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let reconcile = ReconcileMetrics::new();
        registry.register(
            "controller_runtime_reconcile",
            "Total number of reconciliations per controller",
            reconcile.total.clone(),
        );
        registry.register(
            "controller_runtime_reconcile_errors",
            "Total number of reconciliation errors per controller",
            reconcile.errors.clone(),
        );
        registry.register(
            "controller_runtime_reconcile_time_seconds",
            "Length of time per reconciliation per controller",
            reconcile.time.clone(),
        );
        Self {
            registry: Arc::new(Mutex::new(registry)),
            reconcile,
        }
    }

    /// Registers a domain metric family (name without the `stateward_` prefix).
    pub fn register<M: prometheus_client::registry::Metric>(
        &self,
        name: &str,
        help: &str,
        metric: M,
    ) {
        if let Ok(mut registry) = self.registry.lock() {
            registry
                .sub_registry_with_prefix("stateward")
                .register(name, help, metric);
        }
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Ok(registry) = self.registry.lock() {
            let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposes_controller_runtime_names() {
        let metrics = Metrics::new();
        metrics.reconcile.init("restore");
        assert!(metrics.encode().contains(
            r#"controller_runtime_reconcile_total{controller="restore",result="error"} 0"#
        ));
        metrics.reconcile.start("backup").finish("success");
        metrics.reconcile.start("backup").finish("error");
        let text = metrics.encode();
        assert!(
            text.contains(
                r#"controller_runtime_reconcile_total{controller="backup",result="success"} 1"#
            ),
            "{text}"
        );
        assert!(
            text.contains(r#"controller_runtime_reconcile_errors_total{controller="backup"} 1"#),
            "{text}"
        );
        assert!(
            text.contains("controller_runtime_reconcile_time_seconds_bucket"),
            "{text}"
        );
    }
}
