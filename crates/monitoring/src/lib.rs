//! The monitoring controller: per StatefulApp, `status.health` and the `Healthy` condition
//! (with an event when it flips), the per-app gauges on `/metrics`, and — when the
//! Prometheus Operator's CRDs exist and `spec.monitoring` asks for them — a PodMonitor for
//! the app's metrics port and a PrometheusRule with Stateward's default alerts.
//!
//! The CRDs are discovered, never assumed: the two CRDs are watched by name (metadata
//! only), and any change of them forgets the last lookup and reassesses every app, so
//! installing the Prometheus Operator after Stateward starts is picked up without a
//! restart; while they are absent the `MonitoringObjects` condition says so, quietly
//! (no error loop, no Warning storm).
//!
//! What wakes an app: its spec and metadata, its backup status (the newest backup), its
//! StatefulSet (readiness arrives in its status), the Prometheus CRDs, and — the one
//! timer — the newest backup's deadline. Pods and PVCs are read when woken; a PVC whose
//! phase changes with no change to the StatefulSet is seen at the next wake.
//!
//! The pipeline: fetch (StatefulSet, its pods and PVCs) → assess (pure, `health.rs`) →
//! build the monitoring objects (pure, `objects.rs`) → apply → status, gauges, events.

pub mod health;
pub mod objects;

use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use kube::api::{ApiResource, DeleteParams, DynamicObject, ListParams};
use kube::core::GroupVersionKind;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{Controller, WatchStreamExt, watcher};
use kube::{Api, Resource, ResourceExt};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use stateward_api::StatefulApp;
use stateward_runtime::watch::{self, Stores};
use stateward_runtime::{Context, apply, conditions};

/// The controller's name (metrics label, event reporter, `--controllers`).
pub const CONTROLLER: &str = "monitoring";

const HEALTHY: &str = "Healthy";
const MONITORING_OBJECTS: &str = "MonitoringObjects";

/// What the monitoring controller writes in an app's status.
const STATUS_FIELDS: apply::StatusFields = apply::StatusFields {
    keys: &["health"],
    conditions: &[HEALTHY, MONITORING_OBJECTS],
};

/// Operator settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// Whether apps get a PodMonitor and a PrometheusRule. Off (the chart's
    /// `features.monitoringObjects: false`, which also drops the rights they need), the
    /// Prometheus Operator's CRDs are not even watched and each app's `MonitoringObjects`
    /// condition says the operator turned them off.
    pub objects: bool,
}

impl Default for Config {
    fn default() -> Self {
        Self { objects: true }
    }
}

/// The Prometheus Operator CRDs the controller looks for, watched by name.
pub const PROMETHEUS_CRDS: [&str; 2] = [
    "podmonitors.monitoring.coreos.com",
    "prometheusrules.monitoring.coreos.com",
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AppLabels {
    pub namespace: String,
    pub app: String,
}

/// The per-app gauges (exported by the leader only: a standby runs no controller).
#[derive(Clone, Default)]
pub struct AppGauges {
    pub desired: Family<AppLabels, Gauge>,
    pub ready: Family<AppLabels, Gauge>,
    pub healthy: Family<AppLabels, Gauge>,
}

impl AppGauges {
    pub fn register(metrics: &stateward_runtime::metrics::Metrics) -> Self {
        let gauges = Self::default();
        metrics.register(
            "app_desired_replicas",
            "Replicas the app's StatefulSet wants",
            gauges.desired.clone(),
        );
        metrics.register(
            "app_ready_replicas",
            "Ready replicas of the app",
            gauges.ready.clone(),
        );
        metrics.register(
            "app_healthy",
            "1 when the app's Healthy condition is True (all replicas ready, newest backup young enough)",
            gauges.healthy.clone(),
        );
        gauges
    }
}

/// What discovery found of the Prometheus Operator's kinds.
#[derive(Clone, Debug, Default)]
pub struct Found {
    pub pod_monitor: Option<ApiResource>,
    pub prometheus_rule: Option<ApiResource>,
}

/// Everything a reconcile needs.
pub struct MonitoringContext {
    pub base: Context,
    pub config: Config,
    pub gauges: AppGauges,
    /// The shared watches: the StatefulSet is read from its cache (monitoring only
    /// reports; a change to it wakes the app again).
    pub stores: Arc<Stores>,
    /// The last lookup of the Prometheus Operator's kinds, until one of their CRDs changes.
    discovered: Arc<Mutex<Discovered>>,
}

/// The last lookup, and how many CRD changes were seen: a lookup that started before a
/// change is not kept (it may describe the CRDs as they were).
#[derive(Default)]
struct Discovered {
    changes: u64,
    found: Option<Found>,
    /// The Prometheus Operator CRDs that exist, as their watch last said.
    crds: std::collections::BTreeSet<String>,
}

/// How long after a CRD appears its kind may still be missing from the API server's
/// discovery (it is published asynchronously after `Established`): a lookup that misses
/// a kind whose CRD exists is not kept, and the app looks again after this.
const DISCOVERY_SETTLE: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum MonitoringError {
    #[error("Kubernetes API")]
    Kube(#[from] kube::Error),
    #[error("encoding an object: {0}")]
    Encode(#[from] serde_json::Error),
}

impl MonitoringError {
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::Kube(_) => "kube",
            Self::Encode(_) => "encode",
        }
    }
}

/// Runs the monitoring controller until shutdown, woken by the shared watches.
pub async fn run(base: Context, stores: Arc<Stores>, config: Config) {
    if !stores.wait_synced(&base.shutdown).await {
        return;
    }
    let discovered = Arc::new(Mutex::new(Discovered::default()));
    let ctx = Arc::new(MonitoringContext {
        gauges: AppGauges::register(&base.metrics),
        base: base.clone(),
        config,
        discovered: discovered.clone(),
        stores: stores.clone(),
    });
    base.metrics.reconcile.init(CONTROLLER);
    let sets = stores.clone();
    Controller::for_shared_stream(
        stores.apps.subscribe_by(what_health_reads),
        stores.apps.reader(),
    )
    .watches_shared_stream(stores.statefulsets.changes(), move |sts| {
        sets.apps_of_statefulset(&sts)
    })
    .reconcile_all_on(if ctx.config.objects {
        prometheus_crd_changes(base.client.clone(), discovered).left_stream()
    } else {
        futures::stream::pending::<()>().right_stream()
    })
    .with_config(watch::controller_config())
    .graceful_shutdown_on(base.shutdown.clone().cancelled_owned())
    .run(reconcile, error_policy, ctx)
    .for_each(|_| futures::future::ready(()))
    .await;
}

/// What of an app the assessment reads: its spec and metadata and its backup status
/// (not the health this controller writes, nor other controllers' sections).
fn what_health_reads(app: &StatefulApp) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    watch::spec_and_metadata(app).hash(&mut h);
    app.status
        .as_ref()
        .and_then(|s| s.backup.as_ref())
        .map(|b| serde_json::to_string(b).unwrap_or_default())
        .hash(&mut h);
    h.finish()
}

/// A tick whenever one of the Prometheus Operator CRDs is created, changed or deleted
/// (metadata-only watches by name, so only those two objects are ever sent); each tick
/// forgets the last discovery first.
fn prometheus_crd_changes(
    client: kube::Client,
    discovered: Arc<Mutex<Discovered>>,
) -> impl futures::Stream<Item = ()> + Send + 'static {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    let crds: Api<kube::core::PartialObjectMeta<CustomResourceDefinition>> = Api::all(client);
    let streams = PROMETHEUS_CRDS.map(|name| {
        watcher::watcher(
            crds.clone(),
            watcher::Config::default().fields(&format!("metadata.name={name}")),
        )
        .default_backoff()
        .boxed()
    });
    futures::stream::select_all(streams).filter_map(move |event| {
        let discovered = discovered.clone();
        async move {
            match event {
                Ok(watcher::Event::Apply(_) | watcher::Event::Delete(_) | watcher::Event::InitDone) => {
                    if let Ok(mut cache) = discovered.lock() {
                        cache.changes += 1;
                        cache.found = None;
                        match &event {
                            Ok(watcher::Event::Apply(crd)) => {
                                cache.crds.insert(crd.name_any());
                            }
                            Ok(watcher::Event::Delete(crd)) => {
                                cache.crds.remove(&crd.name_any());
                            }
                            _ => {}
                        }
                    }
                    Some(())
                }
                Ok(watcher::Event::InitApply(crd)) => {
                    if let Ok(mut cache) = discovered.lock() {
                        cache.crds.insert(crd.name_any());
                    }
                    None
                }
                Ok(watcher::Event::Init) => {
                    if let Ok(mut cache) = discovered.lock() {
                        cache.crds.clear();
                    }
                    None
                }
                Err(e) => {
                    tracing::warn!(error = %e, "watching the Prometheus Operator CRDs failed; retrying");
                    None
                }
            }
        }
    })
}

/// Transient errors back off per app.
pub fn error_policy(
    app: Arc<StatefulApp>,
    err: &MonitoringError,
    ctx: Arc<MonitoringContext>,
) -> Action {
    let key = format!(
        "monitoring/{}/{}",
        app.namespace().unwrap_or_default(),
        app.name_any()
    );
    tracing::warn!(app = %key, error = %err, label = err.metric_label(), "monitoring reconcile failed");
    let delay = ctx
        .base
        .backoff
        .on_error(&key, stateward_runtime::backoff::ErrorKind::Transient)
        .unwrap_or(Duration::from_secs(300));
    Action::requeue(delay)
}

/// The reconcile entry point.
#[tracing::instrument(skip_all, fields(namespace = app.namespace().unwrap_or_default(), app = app.name_any()))]
pub async fn reconcile(
    app: Arc<StatefulApp>,
    ctx: Arc<MonitoringContext>,
) -> Result<Action, MonitoringError> {
    let timer = ctx.base.metrics.reconcile.start(CONTROLLER);
    let result = step(&app, &ctx).await;
    // The back-off resets only after a pass that succeeded: resetting it at the start of
    // a pass that then fails would retry a persistent error every second, forever.
    if result.is_ok() {
        let ns = app.namespace().unwrap_or_default();
        ctx.base
            .backoff
            .on_success(&format!("monitoring/{ns}/{}", app.name_any()));
    }
    timer.finish(if result.is_ok() { "success" } else { "error" });
    result
}

async fn step(app: &StatefulApp, ctx: &MonitoringContext) -> Result<Action, MonitoringError> {
    let ns = app.namespace().unwrap_or_default();
    let name = app.name_any();
    let labels = AppLabels {
        namespace: ns.clone(),
        app: name.clone(),
    };
    if app.meta().deletion_timestamp.is_some() {
        for family in [&ctx.gauges.desired, &ctx.gauges.ready, &ctx.gauges.healthy] {
            family.remove(&labels);
        }
        return Ok(Action::await_change());
    }
    let now = ctx.base.clock.now();
    // 1. Fetch.
    let sts = ctx
        .stores
        .statefulsets
        .reader()
        .get(&ObjectRef::new(&app.spec.stateful_set_name).within(&ns))
        .map(|s| s.as_ref().clone());
    let selector = sts
        .as_ref()
        .and_then(|s| s.spec.as_ref())
        .and_then(|s| s.selector.match_labels.clone())
        .unwrap_or_default();
    let (pods, claims) = match &sts {
        Some(sts) => {
            let sts_name = sts.name_any();
            let label_selector = selector
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(",");
            let pods: Vec<Pod> = Api::<Pod>::namespaced(ctx.base.client.clone(), &ns)
                .list(&ListParams::default().labels(&label_selector))
                .await?
                .items
                .into_iter()
                .filter(|p| {
                    p.owner_references()
                        .iter()
                        .any(|o| o.kind == "StatefulSet" && o.name == sts_name)
                })
                .collect();
            let templates: Vec<String> = sts
                .spec
                .as_ref()
                .and_then(|s| s.volume_claim_templates.as_ref())
                .map(|t| t.iter().filter_map(|t| t.metadata.name.clone()).collect())
                .unwrap_or_default();
            let claims: Vec<PersistentVolumeClaim> =
                Api::<PersistentVolumeClaim>::namespaced(ctx.base.client.clone(), &ns)
                    .list(&ListParams::default())
                    .await?
                    .items
                    .into_iter()
                    .filter(|c| {
                        let claim = c.name_any();
                        templates.iter().any(|t| {
                            claim
                                .strip_prefix(&format!("{t}-{sts_name}-"))
                                .is_some_and(|o| o.parse::<u32>().is_ok())
                        })
                    })
                    .collect();
            (pods, claims)
        }
        None => (Vec::new(), Vec::new()),
    };
    // 2. Assess.
    let (mut section, verdict) = health::assess(app, sts.as_ref(), &pods, &claims, now);
    // 3. The monitoring objects.
    let (objects_ok, objects_reason, objects_message, discovery_settled) =
        monitoring_objects(app, &ns, &selector, ctx).await?;
    section.monitoring_objects = Some(objects_reason.to_string());
    // 4. Status, gauges, events.
    let mut current = app
        .status
        .as_ref()
        .map(|s| s.conditions.clone())
        .unwrap_or_default();
    let was = conditions::get(&current, HEALTHY).map(|c| (c.status.clone(), c.reason.clone()));
    let generation = app.meta().generation;
    conditions::set(
        &mut current,
        conditions::condition(
            HEALTHY,
            verdict.healthy,
            verdict.reason,
            verdict.message.clone(),
            generation,
        ),
        now,
    );
    conditions::set(
        &mut current,
        conditions::condition(
            MONITORING_OBJECTS,
            objects_ok,
            objects_reason,
            objects_message,
            generation,
        ),
        now,
    );
    let ours: Vec<_> = current
        .into_iter()
        .filter(|c| c.type_ == HEALTHY || c.type_ == MONITORING_OBJECTS)
        .collect();
    let apps: Api<StatefulApp> = Api::namespaced(ctx.base.client.clone(), &ns);
    // Compared with the cached app: if the cache lags behind our own last write, the
    // watch event of that write brings this app back with the written status.
    apply::apply_status_if_changed(
        &apps,
        &name,
        apply::managers::MONITORING,
        &STATUS_FIELDS,
        app.status.as_ref(),
        serde_json::json!({"health": section, "conditions": ours}),
    )
    .await?;
    ctx.gauges
        .desired
        .get_or_create(&labels)
        .set(i64::from(section.desired_replicas));
    ctx.gauges
        .ready
        .get_or_create(&labels)
        .set(i64::from(section.ready_replicas));
    ctx.gauges
        .healthy
        .get_or_create(&labels)
        .set(i64::from(verdict.healthy));
    let was = was.as_ref().map(|(s, r)| (s.as_str(), r.as_str()));
    if let Some((warning, reason)) = health::event_for(was, &verdict) {
        let type_ = if warning {
            EventType::Warning
        } else {
            EventType::Normal
        };
        ctx.base
            .publish(
                &app.object_ref(&()),
                type_,
                reason,
                "Assess",
                verdict.message.clone(),
            )
            .await;
    }
    if !discovery_settled {
        return Ok(Action::requeue(DISCOVERY_SETTLE));
    }
    // Time changes the verdict only when the newest backup's deadline passes: wake then;
    // everything else arrives as a watch event.
    Ok(health::backup_deadline(app, now)
        .and_then(|at| (at - now).to_std().ok())
        .map_or_else(Action::await_change, |until| {
            Action::requeue(until + Duration::from_secs(1))
        }))
}

/// Looks up (or reuses the last lookup of) the Prometheus Operator's kinds, and whether
/// the lookup is settled. A failed lookup is not kept (the next reconcile tries again),
/// nor one that misses a kind whose CRD exists (discovery lags behind the CRD: the caller
/// looks again after [`DISCOVERY_SETTLE`]).
async fn discover(ctx: &MonitoringContext) -> (Found, bool) {
    let (changes, crds) = match ctx.discovered.lock() {
        Ok(cache) => {
            if let Some(found) = &cache.found {
                return (found.clone(), true);
            }
            (cache.changes, cache.crds.clone())
        }
        Err(_) => (0, Default::default()),
    };
    let mut found = Found::default();
    match kube::discovery::Discovery::new(ctx.base.client.clone())
        .filter(&["monitoring.coreos.com"])
        .run()
        .await
    {
        Ok(discovery) => {
            for (kind, slot) in [
                ("PodMonitor", &mut found.pod_monitor),
                ("PrometheusRule", &mut found.prometheus_rule),
            ] {
                *slot = discovery
                    .resolve_gvk(&GroupVersionKind::gvk("monitoring.coreos.com", "v1", kind))
                    .map(|(resource, _)| resource);
            }
        }
        Err(e) => {
            tracing::debug!(error = %e, "discovering monitoring.coreos.com failed");
            return (found, false);
        }
    }
    let settled = [
        (PROMETHEUS_CRDS[0], &found.pod_monitor),
        (PROMETHEUS_CRDS[1], &found.prometheus_rule),
    ]
    .iter()
    .all(|(crd, resolved)| !crds.contains(*crd) || resolved.is_some());
    if settled
        && let Ok(mut cache) = ctx.discovered.lock()
        && cache.changes == changes
    {
        cache.found = Some(found.clone());
    }
    (found, settled)
}

/// Applies (or removes) the app's PodMonitor and PrometheusRule; the condition's
/// status, reason and message, and whether the discovery it used is settled.
async fn monitoring_objects(
    app: &StatefulApp,
    ns: &str,
    selector: &std::collections::BTreeMap<String, String>,
    ctx: &MonitoringContext,
) -> Result<(bool, &'static str, String, bool), MonitoringError> {
    let policy = app.spec.monitoring.clone().unwrap_or_default();
    let want_monitor = policy.service_monitor && policy.metrics_port.is_some();
    let want_rules = policy.alert_rules;
    if !ctx.config.objects {
        return Ok(objects_turned_off(want_monitor || want_rules));
    }
    let (found, settled) = discover(ctx).await;
    let name = objects::object_name(&app.name_any());
    let mut made = Vec::new();
    for (want, resource, body, kind) in [
        (
            want_monitor,
            &found.pod_monitor,
            objects::pod_monitor(app, selector),
            "PodMonitor",
        ),
        (
            want_rules,
            &found.prometheus_rule,
            Some(objects::prometheus_rule(
                app,
                ns,
                health::max_backup_age(app, ctx.base.clock.now()),
            )),
            "PrometheusRule",
        ),
    ] {
        let Some(resource) = resource else { continue };
        let api: Api<DynamicObject> = Api::namespaced_with(ctx.base.client.clone(), ns, resource);
        match (want, body) {
            (true, Some(body)) => {
                apply::apply(&api, &name, apply::managers::MONITORING, &body).await?;
                made.push(kind);
            }
            _ => {
                // Turned off (or no metrics port): an object we made earlier goes.
                if let Some(existing) = api.get_opt(&name).await?
                    && existing
                        .labels()
                        .get(stateward_api::common::MANAGED_BY_LABEL)
                        .map(String::as_str)
                        == Some(stateward_api::common::MANAGED_BY_VALUE)
                {
                    api.delete(&name, &DeleteParams::default()).await?;
                }
            }
        }
    }
    if !want_monitor && !want_rules {
        return Ok((
            false,
            "Disabled",
            "spec.monitoring turns both the monitor and the alert rules off".into(),
            settled,
        ));
    }
    if found.pod_monitor.is_none() && found.prometheus_rule.is_none() {
        return Ok((
            false,
            "PrometheusOperatorMissing",
            "the Prometheus Operator's CRDs (monitoring.coreos.com PodMonitor, PrometheusRule) are not installed; Stateward creates the app's monitor and rules when they appear".into(),
            settled,
        ));
    }
    let mut notes = Vec::new();
    if want_monitor && found.pod_monitor.is_none() {
        notes.push("the PodMonitor CRD is not installed");
    }
    if want_rules && found.prometheus_rule.is_none() {
        notes.push("the PrometheusRule CRD is not installed");
    }
    if policy.service_monitor && policy.metrics_port.is_none() {
        notes.push("no spec.monitoring.metricsPort, so no PodMonitor");
    }
    let message = if made.is_empty() {
        "nothing to create".to_string()
    } else {
        format!("{} {name} applied", made.join(" and "))
    };
    Ok((
        !made.is_empty(),
        if made.is_empty() {
            "NothingToCreate"
        } else {
            "Applied"
        },
        if notes.is_empty() {
            message
        } else {
            format!("{message}; {}", notes.join("; "))
        },
        settled,
    ))
}

/// The `MonitoringObjects` condition when the operator runs with monitoring objects
/// turned off: nothing is created, looked up or deleted (it has no rights to).
fn objects_turned_off(wanted: bool) -> (bool, &'static str, String, bool) {
    let message = if wanted {
        "this operator runs with monitoring objects turned off (Helm value features.monitoringObjects): the app's PodMonitor and PrometheusRule are not created; write them yourself, or ask the operator's admin to turn the feature on"
    } else {
        "this operator runs with monitoring objects turned off (Helm value features.monitoringObjects)"
    };
    (false, "TurnedOffByOperator", message.into(), true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn objects_turned_off_by_the_operator_say_so_and_name_the_value() {
        for wanted in [true, false] {
            let (ok, reason, message, settled) = objects_turned_off(wanted);
            assert!(!ok && settled);
            assert_eq!(reason, "TurnedOffByOperator");
            assert!(message.contains("features.monitoringObjects"), "{message}");
            assert_eq!(message.contains("PodMonitor"), wanted, "{message}");
        }
    }

    #[test]
    fn monitoring_objects_are_on_by_default() {
        assert!(Config::default().objects);
    }
}
