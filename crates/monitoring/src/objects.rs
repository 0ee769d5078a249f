//! The Prometheus Operator objects of an app (pure: unit-tested, and validated against
//! the real upstream CRD schemas and `promtool` in the integration tests): a PodMonitor
//! for the app's own metrics port, and a PrometheusRule with Stateward's default alerts.
//!
//! Every expression aggregates with `max by (namespace, app)`: only the leader exports
//! per-app series, and a standby that was leader a moment ago cannot double an alert.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;
use serde_json::{Value, json};
use stateward_api::StatefulApp;
use stateward_api::common::{APP_LABEL, MANAGED_BY_LABEL, MANAGED_BY_VALUE};

/// The object names (one of each per app).
pub fn object_name(app: &str) -> String {
    stateward_runtime::names::bounded(&format!("stateward-{app}"), 63, false)
}

fn owner(app: &StatefulApp) -> Value {
    json!({
        "apiVersion": "stateward.io/v1alpha1",
        "kind": "StatefulApp",
        "name": app.metadata.name.clone().unwrap_or_default(),
        "uid": app.metadata.uid.clone().unwrap_or_default(),
        "controller": true,
        "blockOwnerDeletion": true,
    })
}

/// A PodMonitor scraping the app's pods (the StatefulSet's selector) on its metrics port.
pub fn pod_monitor(app: &StatefulApp, selector: &BTreeMap<String, String>) -> Option<Value> {
    let monitoring = app.spec.monitoring.as_ref()?;
    let port = monitoring.metrics_port?;
    let name = app.metadata.name.clone().unwrap_or_default();
    Some(json!({
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PodMonitor",
        "metadata": {
            "name": object_name(&name),
            "labels": {MANAGED_BY_LABEL: MANAGED_BY_VALUE, APP_LABEL: stateward_runtime::names::label_value(&name)},
            "ownerReferences": [owner(app)],
        },
        "spec": {
            "selector": {"matchLabels": selector},
            "podMetricsEndpoints": [{
                "portNumber": port,
                "path": monitoring.metrics_path.clone().unwrap_or_else(|| "/metrics".into()),
                "relabelings": [{"targetLabel": "stateward_app", "replacement": name}],
            }],
        },
    }))
}

/// One alert of a rule group.
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct Alert {
    pub alert: String,
    pub expr: String,
    #[serde(rename = "for")]
    pub for_: String,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
}

/// The runbook base of every alert (docs/metrics.md has one section per alert).
pub const RUNBOOKS: &str = "https://github.com/stateward/stateward/blob/main/docs/metrics.md";

fn alert(
    name: &str,
    expr: String,
    for_: &str,
    severity: &str,
    summary: String,
    description: &str,
) -> Alert {
    Alert {
        alert: name.into(),
        expr,
        for_: for_.into(),
        labels: BTreeMap::from([("severity".into(), severity.into())]),
        annotations: BTreeMap::from([
            ("summary".into(), summary),
            ("description".into(), description.into()),
            (
                "runbook_url".into(),
                format!("{RUNBOOKS}#{}", name.to_lowercase()),
            ),
        ]),
    }
}

/// Stateward's default alerts for one app. `max_backup_age` is the helper's value (the
/// same one `BackupsHealthy` and `status.health` use); without it there is no backup-age
/// alert.
pub fn alerts(namespace: &str, app: &str, max_backup_age: Option<Duration>) -> Vec<Alert> {
    let sel = format!("namespace=\"{namespace}\", app=\"{app}\"");
    let mut out = Vec::new();
    if let Some(max) = max_backup_age {
        out.push(alert(
            "StatewardBackupTooOld",
            format!(
                "time() - max by (namespace, app) (stateward_backup_last_success_timestamp_seconds{{{sel}}}) > {}",
                max.as_secs()
            ),
            "5m",
            "warning",
            format!("The newest successful backup of {namespace}/{app} is older than {}s", max.as_secs()),
            "Backups of the app stopped succeeding or stopped running (a suspended schedule, a failing repository, a lock held for long).",
        ));
    }
    out.push(alert(
        "StatewardBackupsFailing",
        format!("max by (namespace, app) (stateward_backup_consecutive_failures{{{sel}}}) >= 2"),
        "0m",
        "warning",
        format!("The last backups of {namespace}/{app} failed"),
        "Two or more backups in a row failed; the Backup's Failed condition says why.",
    ));
    out.push(alert(
        "StatewardReplicasNotReady",
        format!(
            "max by (namespace, app) (stateward_app_desired_replicas{{{sel}}}) - max by (namespace, app) (stateward_app_ready_replicas{{{sel}}}) > 0"
        ),
        "10m",
        "warning",
        format!("{namespace}/{app} has replicas that are not ready"),
        "The StatefulApp's Healthy condition names each pod that is not ready and why.",
    ));
    out.push(alert(
        "StatewardVolumeAlmostFull",
        format!(
            "max by (namespace, app, persistentvolumeclaim) (stateward_volume_used_bytes{{{sel}}} / stateward_volume_capacity_bytes{{{sel}}}) > 0.9"
        ),
        "15m",
        "warning",
        format!("A volume of {namespace}/{app} is more than 90% full"),
        "Grow spec.scaling.storage.size, or enable autoExpand.",
    ));
    out
}

/// The operator's own alert (in the chart's PrometheusRule, not per app: one operator).
pub fn operator_alerts() -> Vec<Alert> {
    vec![alert(
        "StatewardReconcileErrors",
        "sum by (controller) (rate(controller_runtime_reconcile_errors_total[5m])) > 0".into(),
        "15m",
        "warning",
        "The Stateward {{ $labels.controller }} controller keeps failing to reconcile".into(),
        "Reconciles fail and are retried with back-off; the operator's logs and the objects' conditions and Warning events say why.",
    )]
}

/// The rule group of an app, as a Prometheus rule file's `groups` entry.
pub fn rule_group(namespace: &str, app: &str, max_backup_age: Option<Duration>) -> Value {
    json!({"name": format!("stateward-{namespace}-{app}"), "rules": alerts(namespace, app, max_backup_age)})
}

/// The PrometheusRule of an app.
pub fn prometheus_rule(
    app: &StatefulApp,
    namespace: &str,
    max_backup_age: Option<Duration>,
) -> Value {
    let name = app.metadata.name.clone().unwrap_or_default();
    json!({
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": object_name(&name),
            "labels": {MANAGED_BY_LABEL: MANAGED_BY_VALUE, APP_LABEL: stateward_runtime::names::label_value(&name)},
            "ownerReferences": [owner(app)],
        },
        "spec": {"groups": [rule_group(namespace, &name, max_backup_age)]},
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn app(monitoring: &str) -> StatefulApp {
        serde_yaml::from_str(&format!(
            "apiVersion: stateward.io/v1alpha1\nkind: StatefulApp\nmetadata: {{name: db, uid: u1}}\nspec: {{statefulSetName: db, monitoring: {monitoring}}}"
        ))
        .unwrap()
    }

    #[test]
    fn a_pod_monitor_needs_a_metrics_port_and_selects_the_statefulsets_pods() {
        assert!(pod_monitor(&app("{}"), &BTreeMap::new()).is_none());
        let selector = BTreeMap::from([("app".to_string(), "db".to_string())]);
        let pm = pod_monitor(&app("{metricsPort: 9121}"), &selector).unwrap();
        assert_eq!(pm["spec"]["selector"]["matchLabels"]["app"], "db");
        assert_eq!(pm["spec"]["podMetricsEndpoints"][0]["portNumber"], 9121);
        assert_eq!(pm["spec"]["podMetricsEndpoints"][0]["path"], "/metrics");
        assert_eq!(pm["metadata"]["ownerReferences"][0]["uid"], "u1");
    }

    #[test]
    fn objects_fit_kubernetes_limits_for_app_names_of_every_length() {
        let selector = BTreeMap::from([("app".to_string(), "db".to_string())]);
        for name in stateward_runtime::names::sample_names() {
            let mut app = app("{metricsPort: 9121}");
            app.metadata.name = Some(name.clone());
            for object in [
                pod_monitor(&app, &selector).unwrap(),
                prometheus_rule(&app, "shop", None),
            ] {
                stateward_runtime::names::check_object(&object)
                    .unwrap_or_else(|e| panic!("app name of {} characters: {e}", name.len()));
            }
        }
    }

    #[test]
    fn every_alert_is_scoped_to_the_app_aggregated_and_has_a_runbook() {
        let alerts = alerts("shop", "db", Some(Duration::from_secs(26 * 3600)));
        assert_eq!(alerts.len(), 4);
        for a in &alerts {
            assert!(
                a.expr.contains("namespace=\"shop\", app=\"db\""),
                "{}",
                a.expr
            );
            assert!(a.expr.contains("max by (namespace, app"), "{}", a.expr);
            assert!(a.annotations["runbook_url"].ends_with(&a.alert.to_lowercase()));
        }
        assert!(alerts[0].expr.ends_with("> 93600"));
        assert_eq!(
            super::alerts("shop", "db", None).len(),
            3,
            "no backup-age alert without a maximum"
        );
    }
}
