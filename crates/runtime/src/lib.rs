//! What every Stateward controller shares. Controllers coordinate only through the API
//! (the lock, status, owned objects); this crate holds the mechanics, never a
//! controller's logic.

pub mod admin;
pub mod apply;
pub mod backoff;
pub mod conditions;
pub mod lock;
pub mod metrics;
pub mod names;
pub mod telemetry;
pub mod time;

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
}

impl Context {
    pub fn new(client: kube::Client, controller: &str, metrics: metrics::Metrics) -> Self {
        Self {
            client,
            metrics,
            clock: Arc::new(time::SystemClock),
            backoff: Arc::new(backoff::Backoff::default()),
            reporter: kube::runtime::events::Reporter {
                controller: format!("stateward-{controller}"),
                instance: std::env::var("POD_NAME").ok(),
            },
        }
    }

    /// A context with a movable clock, for tests.
    pub fn with_clock(mut self, clock: Arc<dyn time::Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// An event recorder for this controller.
    pub fn recorder(&self) -> kube::runtime::events::Recorder {
        kube::runtime::events::Recorder::new(self.client.clone(), self.reporter.clone())
    }
}
