//! What every Stateward controller shares. Controllers coordinate only through the API
//! (the lock, status, owned objects); this crate holds the mechanics, never a
//! controller's logic.

pub mod admin;
pub mod agent_start;
pub mod apply;
pub mod backoff;
pub mod conditions;
pub mod hooks;
pub mod kube_requests;
pub mod lock;
pub mod metrics;
pub mod names;
pub mod ownership;
pub mod quantity;
pub mod schedule;
pub mod telemetry;
pub mod time;
pub mod watch;

use std::sync::Arc;

/// The shared part of every controller's context.
#[derive(Clone)]
pub struct Context {
    pub client: kube::Client,
    pub metrics: metrics::Metrics,
    pub clock: Arc<dyn time::Clock>,
    pub backoff: Arc<backoff::Backoff>,
    /// Reports events as this controller (`stateward-<name>`).
    pub reporter: kube::runtime::events::Reporter,
    /// Cancelled by the manager on SIGTERM. Controllers stop taking new work and let
    /// in-flight reconciles finish; only the manager listens to signals, so a controller
    /// never ends on its own and looks like a crash.
    pub shutdown: tokio_util::sync::CancellationToken,
}

impl Context {
    pub fn new(client: kube::Client, controller: &str, metrics: metrics::Metrics) -> Self {
        let reporter = kube::runtime::events::Reporter {
            controller: format!("stateward-{controller}"),
            instance: std::env::var("POD_NAME").ok(),
        };
        Self {
            client,
            metrics,
            clock: Arc::new(time::SystemClock),
            backoff: Arc::new(backoff::Backoff::default()),
            reporter,
            shutdown: tokio_util::sync::CancellationToken::new(),
        }
    }

    /// A context with a movable clock, for tests.
    pub fn with_clock(mut self, clock: Arc<dyn time::Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// A context whose shutdown is driven by `token`.
    pub fn with_shutdown(mut self, token: tokio_util::sync::CancellationToken) -> Self {
        self.shutdown = token;
        self
    }

    /// Publishes an event about `object`; the note is capped (the API refuses notes over
    /// 1 KiB) and a failure is logged, never returned: an event is never worth failing a
    /// reconcile for (and a terminating namespace refuses them).
    pub async fn publish(
        &self,
        object: &k8s_openapi::api::core::v1::ObjectReference,
        type_: kube::runtime::events::EventType,
        reason: &str,
        action: &str,
        note: String,
    ) {
        let event = kube::runtime::events::Event {
            type_,
            reason: reason.to_string(),
            note: Some(note.chars().take(1000).collect()),
            action: action.to_string(),
            secondary: None,
        };
        if let Err(e) = self.recorder().publish(&event, object).await {
            tracing::warn!(error = %e, reason, "publishing an event failed");
        }
    }

    /// An event recorder for this controller. A fresh one per event, on purpose: kube's
    /// recorder aggregates by (type, reason, action, object) and ignores the note, so a
    /// shared one would fold two different facts (a hook in pod 3, then in pod 2) into
    /// one Event that shows only the first. Aggregating repeats of the *same* note needs
    /// our own correlator (issue #16, to do).
    pub fn recorder(&self) -> kube::runtime::events::Recorder {
        kube::runtime::events::Recorder::new(self.client.clone(), self.reporter.clone())
    }
}
