//! The monitoring controller against the local cluster: health in status without the
//! Prometheus Operator, a pod that stops being ready named in `Healthy`, then the real
//! upstream Prometheus Operator CRDs (generated from its pinned API types by
//! `cargo xtask tools`) installed while the controller runs: the app's PodMonitor and
//! PrometheusRule appear without a restart, accepted by the real schemas. Run with
//! `cargo xtask test`.

use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, ensure};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::Api;
use kube::api::{ApiResource, DeleteParams, DynamicObject};
use stateward_api::StatefulApp;
use stateward_runtime::Context;
use stateward_runtime::metrics::Metrics;
use stateward_testkit::harness::{Cluster, apply_yaml, exec, install_crds, wait_for};

const MINUTE: Duration = Duration::from_secs(60);
const PROMETHEUS_CRDS: [&str; 3] = ["podmonitors", "prometheusrules", "servicemonitors"];

fn condition(app: &StatefulApp, type_: &str) -> Option<(String, String, String)> {
    app.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

async fn remove_prometheus_crds(cluster: &Cluster) -> Result<()> {
    let crds: Api<CustomResourceDefinition> = Api::all(cluster.client.clone());
    for plural in PROMETHEUS_CRDS {
        let name = format!("{plural}.monitoring.coreos.com");
        if crds.get_opt(&name).await?.is_some() {
            crds.delete(&name, &DeleteParams::default()).await?;
        }
        wait_for(&format!("CRD {name} gone"), MINUTE, || async {
            Ok(crds.get_opt(&name).await?.is_none().then_some(()))
        })
        .await?;
    }
    Ok(())
}

#[tokio::test]
async fn health_without_the_prometheus_operator_then_its_objects_once_the_crds_appear() -> Result<()>
{
    let cluster = Cluster::connect().await?;
    // Cluster-scoped CRDs come and go here: no other serial test runs meanwhile.
    let _serial = cluster.serial().await?;
    install_crds(&cluster.client, &stateward_api::crds()).await?;
    remove_prometheus_crds(&cluster).await?;
    let ns = cluster.namespace("monitoring").await?;
    let metrics = Metrics::new();
    let controller = tokio::spawn(stateward_monitoring::run(
        Context::new(
            cluster.client.clone(),
            stateward_monitoring::CONTROLLER,
            metrics.clone(),
        ),
        stateward_runtime::watch::Stores::start_in(cluster.client.clone(), Some(ns.name.clone())),
        stateward_monitoring::Config::default(),
    ));
    apply_yaml(
        &cluster.client,
        &ns.name,
        r#"
apiVersion: apps/v1
kind: StatefulSet
metadata: { name: mon }
spec:
  replicas: 2
  serviceName: mon
  podManagementPolicy: Parallel
  selector: { matchLabels: { app: mon } }
  template:
    metadata: { labels: { app: mon } }
    spec:
      terminationGracePeriodSeconds: 1
      containers:
      - name: main
        image: stateward-probe:dev
        command: [sh, -c, "touch /tmp/ready-$HOSTNAME; exec sleep 100000"]
        readinessProbe: { exec: { command: [sh, -c, "test -f /tmp/ready-$HOSTNAME"] }, periodSeconds: 2, failureThreshold: 1 }
        volumeMounts: [{ name: data, mountPath: /data }]
  volumeClaimTemplates:
  - metadata: { name: data }
    spec:
      accessModes: [ReadWriteOnce]
      resources: { requests: { storage: 16Mi } }
---
apiVersion: stateward.io/v1alpha1
kind: StatefulApp
metadata: { name: mon }
spec:
  statefulSetName: mon
  backup: { repository: repo }
  monitoring: { metricsPort: 9100, backupMaxAge: 26h }
---
apiVersion: stateward.io/v1alpha1
kind: StatefulApp
metadata: { name: ghost }
spec:
  statefulSetName: absent
"#,
        "test",
    )
    .await?;
    let apps: Api<StatefulApp> = cluster.api(&ns.name);

    // 1. No Prometheus Operator: health works, a condition says why there are no objects.
    let app = wait_for("Healthy=True", 2 * MINUTE, || async {
        let app = apps.get("mon").await?;
        Ok(condition(&app, "Healthy")
            .filter(|c| c.0 == "True")
            .map(|_| app))
    })
    .await?;
    let health = app
        .status
        .as_ref()
        .and_then(|s| s.health.clone())
        .context("status.health")?;
    ensure!(
        health.desired_replicas == 2 && health.ready_replicas == 2,
        "{health:?}"
    );
    ensure!(
        health.volumes.len() == 2 && health.volumes.iter().all(|v| v.capacity.is_some()),
        "{:?}",
        health.volumes
    );
    ensure!(
        health.backup_max_age_seconds == Some(26 * 3600),
        "{health:?}"
    );
    let (status, reason, message) =
        condition(&app, "MonitoringObjects").context("MonitoringObjects")?;
    ensure!(
        status == "False" && reason == "PrometheusOperatorMissing",
        "{reason}: {message}"
    );
    println!("without the CRDs: {message}");
    // An app naming a StatefulSet that does not exist: the field named, one Warning.
    let message = wait_for(
        "ghost: Healthy=False (StatefulSetNotFound)",
        MINUTE,
        || async {
            let app = apps.get("ghost").await?;
            Ok(condition(&app, "Healthy")
                .filter(|c| c.0 == "False" && c.1 == "StatefulSetNotFound")
                .map(|c| c.2))
        },
    )
    .await?;
    ensure!(
        message.contains("absent (spec.statefulSetName)"),
        "{message}"
    );
    let events: Api<k8s_openapi::api::events::v1::Event> = cluster.api(&ns.name);
    let warning = wait_for("a StatefulSetNotFound Warning event", MINUTE, || async {
        Ok(events
            .list(&Default::default())
            .await?
            .items
            .into_iter()
            .find(|e| {
                e.reason.as_deref() == Some("StatefulSetNotFound")
                    && e.type_.as_deref() == Some("Warning")
            })
            .and_then(|e| e.note))
    })
    .await?;
    ensure!(warning.contains("spec.statefulSetName"), "{warning}");
    let text = metrics.encode();
    ensure!(
        text.contains(&format!(
            "stateward_app_ready_replicas{{namespace=\"{}\",app=\"mon\"}} 2",
            ns.name
        )),
        "{text}"
    );
    ensure!(
        text.contains("controller_runtime_reconcile_errors_total{controller=\"monitoring\"} 0"),
        "no errors in a loop while the CRDs are absent:\n{text}"
    );

    // 2. A pod stops being ready: Healthy turns False, naming it.
    let pods: Api<Pod> = cluster.api(&ns.name);
    let started = Instant::now();
    exec(
        &pods,
        "mon-1",
        None,
        &["sh", "-c", "rm /tmp/ready-$HOSTNAME"],
        None,
    )
    .await?;
    let message = wait_for("Healthy=False naming mon-1", 2 * MINUTE, || async {
        let app = apps.get("mon").await?;
        Ok(condition(&app, "Healthy")
            .filter(|c| c.0 == "False" && c.2.contains("mon-1"))
            .map(|c| c.2))
    })
    .await?;
    println!(
        "Healthy=False after {:.1} s: {message}",
        started.elapsed().as_secs_f64()
    );
    ensure!(message.contains("1 of 2 replicas ready"), "{message}");
    let text = metrics.encode();
    ensure!(
        text.contains(&format!(
            "stateward_app_healthy{{namespace=\"{}\",app=\"mon\"}} 0",
            ns.name
        )),
        "{text}"
    );
    let events: Api<k8s_openapi::api::events::v1::Event> = cluster.api(&ns.name);
    let unhealthy = wait_for("an Unhealthy Warning event", MINUTE, || async {
        Ok(events
            .list(&Default::default())
            .await?
            .items
            .into_iter()
            .find(|e| {
                e.reason.as_deref() == Some("Unhealthy") && e.type_.as_deref() == Some("Warning")
            })
            .and_then(|e| e.note))
    })
    .await?;
    ensure!(unhealthy.contains("mon-1"), "{unhealthy}");

    // 3. The Prometheus Operator's CRDs arrive: the objects follow, without a restart.
    let dir = &cluster.env.prometheus_crds;
    ensure!(
        dir.is_dir(),
        "the Prometheus Operator CRDs are not generated: run through `cargo xtask test`"
    );
    let mut crds = Vec::new();
    for plural in PROMETHEUS_CRDS {
        let text =
            std::fs::read_to_string(dir.join(format!("monitoring.coreos.com_{plural}.yaml")))?;
        crds.push(serde_yaml::from_str::<CustomResourceDefinition>(&text)?);
    }
    install_crds(&cluster.client, &crds).await?;
    let installed = Instant::now();
    let resource = |kind: &str, plural: &str| ApiResource {
        group: "monitoring.coreos.com".into(),
        version: "v1".into(),
        api_version: "monitoring.coreos.com/v1".into(),
        kind: kind.into(),
        plural: plural.into(),
    };
    let monitors: Api<DynamicObject> = Api::namespaced_with(
        cluster.client.clone(),
        &ns.name,
        &resource("PodMonitor", "podmonitors"),
    );
    let rules: Api<DynamicObject> = Api::namespaced_with(
        cluster.client.clone(),
        &ns.name,
        &resource("PrometheusRule", "prometheusrules"),
    );
    let (monitor, rule) = wait_for("the PodMonitor and PrometheusRule", 3 * MINUTE, || async {
        Ok(
            match (
                monitors.get_opt("stateward-mon").await?,
                rules.get_opt("stateward-mon").await?,
            ) {
                (Some(m), Some(r)) => Some((m, r)),
                _ => None,
            },
        )
    })
    .await?;
    println!(
        "objects created {:.1} s after the CRDs were installed",
        installed.elapsed().as_secs_f64()
    );
    ensure!(
        monitor.data["spec"]["podMetricsEndpoints"][0]["portNumber"] == 9100,
        "{:?}",
        monitor.data
    );
    ensure!(monitor.data["spec"]["selector"]["matchLabels"]["app"] == "mon");
    let alerts: Vec<String> = rule.data["spec"]["groups"][0]["rules"]
        .as_array()
        .context("rules")?
        .iter()
        .filter_map(|r| r["alert"].as_str().map(String::from))
        .collect();
    ensure!(
        alerts
            == [
                "StatewardBackupTooOld",
                "StatewardBackupsFailing",
                "StatewardReplicasNotReady",
                "StatewardVolumeAlmostFull"
            ],
        "{alerts:?}"
    );
    let app = wait_for("MonitoringObjects=True", MINUTE, || async {
        let app = apps.get("mon").await?;
        Ok(condition(&app, "MonitoringObjects")
            .filter(|c| c.0 == "True")
            .map(|_| app))
    })
    .await?;
    println!("{:?}", condition(&app, "MonitoringObjects"));

    // 4. Alert rules turned off: the PrometheusRule goes.
    apps.patch(
        "mon",
        &kube::api::PatchParams::apply("test"),
        &kube::api::Patch::Apply(serde_json::json!({
            "apiVersion": "stateward.io/v1alpha1", "kind": "StatefulApp",
            "metadata": {"name": "mon"},
            "spec": {"statefulSetName": "mon", "backup": {"repository": "repo"}, "monitoring": {"metricsPort": 9100, "backupMaxAge": "26h", "alertRules": false}},
        })),
    )
    .await?;
    wait_for("the PrometheusRule removed", MINUTE, || async {
        Ok(rules
            .get_opt("stateward-mon")
            .await?
            .is_none()
            .then_some(()))
    })
    .await?;

    controller.abort();
    ns.cleanup().await?;
    remove_prometheus_crds(&cluster).await
}
