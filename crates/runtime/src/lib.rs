//! What every Stateward controller shares. Controllers coordinate only through the API
//! (the lock, status, owned objects); this crate holds the mechanics, never a
//! controller's logic.

pub mod admin;
pub mod agent_rbac;
pub mod agent_start;
pub mod apply;
pub mod backoff;
pub mod conditions;
pub mod events;
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
    /// Reports events as this controller (`stateward-<name>`); one per controller, so
    /// repeats of the same fact fold into one Event.
    pub recorder: Arc<events::Recorder>,
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
            metrics,
            clock: Arc::new(time::SystemClock),
            backoff: Arc::new(backoff::Backoff::default()),
            recorder: Arc::new(events::Recorder::new(client.clone(), reporter)),
            client,
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

    /// Publishes an event about `object` (a repeat of the same fact joins its series);
    /// the note is capped to the API's limit, and a failure is logged, never returned: an
    /// event is never worth failing a reconcile for (and a terminating namespace refuses
    /// them).
    pub async fn publish(
        &self,
        object: &k8s_openapi::api::core::v1::ObjectReference,
        type_: kube::runtime::events::EventType,
        reason: &str,
        action: &str,
        note: String,
    ) {
        if let Err(e) = self
            .recorder
            .publish(object, type_, reason, action, &note)
            .await
        {
            tracing::warn!(error = %e, reason, "publishing an event failed");
        }
    }
}
