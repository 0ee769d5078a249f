//! Crash safety of a scale-down with the real `stateward` binary: killed with SIGKILL in
//! the middle, the manager resumes after a restart, no pre-scale-down hook runs twice,
//! one backup is taken, and the app ends at the requested count. Run with
//! `cargo xtask test`.

mod common;

use std::time::Duration;

use anyhow::{Result, ensure};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::events::v1::Event;
use kube::Api;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use stateward_api::Backup;
use stateward_api::statefulapp::StatefulApp;
use stateward_testkit::harness::{
    Cluster, apply_yaml, exec, install_crds, wait_for, wait_pod_ready,
};

use common::Manager;

const MINUTE: Duration = Duration::from_secs(60);

#[tokio::test]
async fn a_manager_killed_mid_scale_down_resumes_without_running_a_hook_twice() -> Result<()> {
    let cluster = Cluster::connect().await?;
    {
        let _serial = cluster.serial().await?;
        install_crds(&cluster.client, &stateward_api::crds()).await?;
    }
    let ns = cluster.namespace("scale-crash").await?;
    let bucket = cluster.bucket_and_secret(&ns.name, "scrash").await?;
    let yaml = format!(
        r#"
apiVersion: stateward.io/v1alpha1
kind: BackupRepository
metadata: {{ name: repo }}
spec:
  s3:
    bucket: {bucket}
    endpoint: "{endpoint}"
    forcePathStyle: true
    credentials:
      accessKeyId: {{ name: s3, key: accessKeyId }}
      secretAccessKey: {{ name: s3, key: secretAccessKey }}
---
apiVersion: apps/v1
kind: StatefulSet
metadata: {{ name: crash }}
spec:
  replicas: 3
  serviceName: crash
  podManagementPolicy: Parallel
  selector: {{ matchLabels: {{ app: crash }} }}
  template:
    metadata: {{ labels: {{ app: crash }} }}
    spec:
      terminationGracePeriodSeconds: 1
      containers:
      - name: main
        image: stateward-probe:dev
        command: [sh, -c, "echo $HOSTNAME > /data/who; exec sleep 100000"]
        readinessProbe: {{ exec: {{ command: [test, -f, /data/who] }}, periodSeconds: 1 }}
        volumeMounts: [{{ name: data, mountPath: /data }}]
  volumeClaimTemplates:
  - metadata: {{ name: data }}
    spec:
      accessModes: [ReadWriteOnce]
      resources: {{ requests: {{ storage: 16Mi }} }}
---
apiVersion: stateward.io/v1alpha1
kind: StatefulApp
metadata: {{ name: crash }}
spec:
  statefulSetName: crash
  backup: {{ repository: repo }}
  scaling:
    replicas: 3
    scaleDown:
      removedVolumes: RetainStale
      # Each run leaves a line in the leaving replica's own volume (kept, as stale).
      preScaleDownHook: {{ name: leave, command: [sh, -c, "echo ran >> /data/hook-runs; sleep 2"], timeoutSeconds: 30 }}
"#,
        endpoint = cluster.env.s3_endpoint_from_pods
    );
    apply_yaml(&cluster.client, &ns.name, &yaml, "test").await?;
    let pods: Api<Pod> = cluster.api(&ns.name);
    for p in ["crash-0", "crash-1", "crash-2"] {
        wait_pod_ready(&pods, p, 2 * MINUTE).await?;
    }
    let scope = ["--namespace", ns.name.as_str(), "--controllers", "all"];
    let mut first = Manager::start(&cluster, &scope)?;
    first.wait_ready().await?;
    let apps: Api<StatefulApp> = cluster.api(&ns.name);
    apps.patch_scale(
        "crash",
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"spec": {"replicas": 1}})),
    )
    .await?;

    // Kill it right after the first hook ran: crash-2 is leaving, crash-1 is next.
    let events: Api<Event> = cluster.api(&ns.name);
    wait_for("the first hook to run", 3 * MINUTE, || async {
        let ran = events
            .list(&ListParams::default())
            .await?
            .items
            .into_iter()
            .any(|e| e.reason.as_deref() == Some("PreScaleDownHook"));
        Ok(ran.then_some(()))
    })
    .await?;
    first.signal("KILL")?;
    let _ = first.child.wait();

    let second = Manager::start(&cluster, &scope)?;
    second.wait_ready().await?;
    let sets: Api<StatefulSet> = cluster.api(&ns.name);
    wait_for("the app to settle at 1 replica", 3 * MINUTE, || async {
        let app = apps.get("crash").await?;
        let steady = app
            .status
            .as_ref()
            .and_then(|s| s.scaling.as_ref())
            .is_some_and(|s| s.phase.as_deref() == Some("Steady") && s.operation.is_none());
        let replicas = sets.get("crash").await?.spec.and_then(|s| s.replicas);
        let left = pods
            .list(&ListParams::default().labels("app=crash"))
            .await?
            .items
            .len();
        Ok((steady && replicas == Some(1) && left == 1).then_some(()))
    })
    .await?;
    let backups: Api<Backup> = cluster.api(&ns.name);
    let completed = backups
        .list(&ListParams::default())
        .await?
        .items
        .iter()
        .filter(|b| {
            b.status.as_ref().and_then(|s| s.phase) == Some(stateward_api::BackupPhase::Completed)
        })
        .count();
    ensure!(
        completed == 1,
        "one completed backup before the scale-down, not {completed}"
    );

    // Read each removed replica's volume: the hook ran exactly once in each.
    for ordinal in [1, 2] {
        let checker = format!("check-{ordinal}");
        pods.create(
            &PostParams::default(),
            &serde_json::from_value(serde_json::json!({
                "metadata": {"name": checker},
                "spec": {
                    "terminationGracePeriodSeconds": 1,
                    "containers": [{
                        "name": "main", "image": "stateward-probe:dev",
                        "command": ["sleep", "100000"],
                        "volumeMounts": [{"name": "data", "mountPath": "/data"}]
                    }],
                    "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": format!("data-crash-{ordinal}")}}]
                }
            }))?,
        )
        .await?;
        wait_pod_ready(&pods, &checker, 2 * MINUTE).await?;
        let out = exec(&pods, &checker, None, &["cat", "/data/hook-runs"], None).await?;
        ensure!(
            out.stdout_str().lines().count() == 1,
            "the hook ran {} times in crash-{ordinal}",
            out.stdout_str().lines().count()
        );
    }
    drop(second);
    ns.cleanup().await
}
