//! An idle manager costs the API server no writes, no polls and no reconciles: 20 apps (two with a running pod, the
//! rest at zero replicas, one yearly schedule each, a checked repository) left alone for
//! two minutes. The API server's audit log is the judge, not the manager's own figures:
//! the manager runs under its own (impersonated) user so its requests can be told from
//! the test's. Run with `cargo xtask test`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use chrono::Utc;
use stateward_api::StatefulApp;
use stateward_testkit::audit;
use stateward_testkit::harness::{Cluster, apply_yaml, counter_by_label, install_crds, wait_for};

mod common;
use common::Manager;

const APPS: usize = 20;
const RUNNING: usize = 2;
const IDLE: Duration = Duration::from_secs(120);

#[tokio::test]
async fn twenty_idle_apps_cost_no_writes_polls_or_reconciles_for_two_minutes() -> Result<()> {
    let cluster = Cluster::connect().await?;
    {
        let _serial = cluster.serial().await?;
        install_crds(&cluster.client, &stateward_api::crds()).await?;
    }
    ensure!(
        !cluster.env.audit_log.as_os_str().is_empty(),
        "the local cluster has no audit log (started by an older xtask): restart it"
    );
    let ns = cluster.namespace("idle").await?;
    let bucket = cluster.bucket_and_secret(&ns.name, "idle").await?;
    let mut yaml = format!(
        "apiVersion: stateward.io/v1alpha1\nkind: BackupRepository\nmetadata: {{ name: default }}\n\
         spec:\n  s3:\n    bucket: {bucket}\n    region: {}\n    endpoint: {}\n    forcePathStyle: true\n    \
         credentials:\n      accessKeyId: {{ name: s3, key: accessKeyId }}\n      \
         secretAccessKey: {{ name: s3, key: secretAccessKey }}\n",
        cluster.env.s3_region, cluster.env.s3_endpoint_from_pods
    );
    for i in 0..APPS {
        let replicas = i32::from(i < RUNNING);
        yaml.push_str(&format!(
            r#"---
apiVersion: apps/v1
kind: StatefulSet
metadata: {{ name: app-{i} }}
spec:
  replicas: {replicas}
  serviceName: app-{i}
  selector: {{ matchLabels: {{ app: app-{i} }} }}
  template:
    metadata: {{ labels: {{ app: app-{i} }} }}
    spec:
      terminationGracePeriodSeconds: 1
      containers:
      - name: main
        image: stateward-probe:dev
        command: [sh, -c, "touch /tmp/ready; exec sleep 100000"]
        readinessProbe: {{ exec: {{ command: [test, -f, /tmp/ready] }}, periodSeconds: 5 }}
        volumeMounts: [{{ name: data, mountPath: /data }}]
  volumeClaimTemplates:
  - metadata: {{ name: data }}
    spec:
      accessModes: [ReadWriteOnce]
      resources: {{ requests: {{ storage: 8Mi }} }}
---
apiVersion: stateward.io/v1alpha1
kind: StatefulApp
metadata: {{ name: app-{i} }}
spec:
  statefulSetName: app-{i}
  backup:
    repository: default
    schedules: [{{ name: yearly, cron: "0 3 1 1 *", timeZone: UTC }}]
"#
        ));
    }
    apply_yaml(&cluster.client, &ns.name, &yaml, "idle-test").await?;

    let user = format!("stateward-idle-{}", ns.name);
    let kubeconfig = impersonating_kubeconfig(&cluster, &user)?;
    let manager = Manager::start_with(&kubeconfig, &["--namespace", ns.name.as_str()])?;
    manager.wait_ready().await?;
    let apps: kube::Api<StatefulApp> = cluster.api(&ns.name);
    wait_for(
        "every app's status to be current and healthy",
        Duration::from_secs(180),
        || async {
            let list = apps.list(&Default::default()).await?.items;
            Ok(list.iter().all(settled).then_some(()))
        },
    )
    .await?;
    // The start-up's own writes (finalizers, first status) are done; let the last of
    // them land before the window opens.
    tokio::time::sleep(Duration::from_secs(5)).await;

    let reconciles_before = reconciles(&manager).await?;
    let from = Utc::now();
    tokio::time::sleep(IDLE).await;
    let to = Utc::now();
    let reconciles_after = reconciles(&manager).await?;
    // The audit log is written as requests complete.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let requests: Vec<audit::Request> = audit::read_since(&cluster.env.audit_log, from)?
        .into_iter()
        .filter(|r| r.user == user && r.at < to)
        .collect();
    let writes: Vec<&audit::Request> = requests.iter().filter(|r| r.is_write()).collect();
    eprintln!(
        "idle for {} s: {} requests by the manager ({:?}); reconciles {:?} -> {:?}",
        IDLE.as_secs(),
        requests.len(),
        audit::by_verb_and_resource(&requests),
        reconciles_before,
        reconciles_after
    );
    ensure!(
        writes.is_empty(),
        "an idle manager wrote {} times in {} s: {:?}; first: {:?}",
        writes.len(),
        IDLE.as_secs(),
        audit::by_verb_and_resource(writes.iter().copied()),
        writes.first()
    );
    // No reconcile outside time triggers: the repository check is timer-driven (its
    // interval), every other loop waits for a change, and nothing changed.
    let delta = |name: &str| {
        let of = |list: &[(String, f64)]| {
            list.iter()
                .find(|(c, _)| c == name)
                .map_or(0.0, |(_, n)| *n)
        };
        of(&reconciles_after) - of(&reconciles_before)
    };
    for loop_name in [
        "scaling",
        "monitoring",
        "backup",
        "backup-schedule",
        "restore",
    ] {
        ensure!(
            delta(loop_name) == 0.0,
            "{loop_name} reconciled {} times while nothing changed ({reconciles_before:?} -> {reconciles_after:?})",
            delta(loop_name)
        );
    }
    // Reads too: an idle manager only holds its watches open (a watch that the API
    // server ends is re-opened, which the audit log shows as a new WATCH or LIST).
    let polls: Vec<&audit::Request> = requests
        .iter()
        .filter(|r| !matches!(r.verb.as_str(), "watch" | "list"))
        // The repository check's timer (every 5 minutes) reads its credentials.
        .filter(|r| r.resource != "secrets")
        .collect();
    ensure!(
        polls.is_empty(),
        "an idle manager polled {} times in {} s: {:?}",
        polls.len(),
        IDLE.as_secs(),
        audit::by_verb_and_resource(polls.iter().copied())
    );
    drop(manager);
    let _ = std::fs::remove_file(&kubeconfig);
    ns.cleanup().await
}

/// Every section current (observedGeneration = generation) and the Healthy verdict in.
fn settled(app: &StatefulApp) -> bool {
    let generation = app.metadata.generation;
    let Some(status) = &app.status else {
        return false;
    };
    let current = [
        status.backup.as_ref().map(|s| s.observed_generation),
        status.scaling.as_ref().map(|s| s.observed_generation),
        status.health.as_ref().map(|s| s.observed_generation),
    ]
    .iter()
    .all(|g| *g == Some(generation));
    current
        && status
            .conditions
            .iter()
            .any(|c| c.type_ == "Healthy" && c.status == "True")
}

/// The test's kubeconfig, acting as `user` (in `system:masters`, like the admin).
fn impersonating_kubeconfig(cluster: &Cluster, user: &str) -> Result<PathBuf> {
    let mut config = kube::config::Kubeconfig::read_from(&cluster.env.kubeconfig)?;
    for auth in &mut config.auth_infos {
        let info = auth
            .auth_info
            .as_mut()
            .context("a user without credentials")?;
        info.impersonate = Some(user.to_string());
        info.impersonate_groups = Some(vec!["system:masters".into()]);
    }
    let path = std::env::temp_dir().join(format!("{user}.kubeconfig"));
    std::fs::write(&path, serde_yaml::to_string(&config)?)?;
    Ok(path)
}

/// Reconciles so far, by controller, from the manager's `/metrics`.
async fn reconciles(manager: &Manager) -> Result<Vec<(String, f64)>> {
    let (_, text) = manager.get("/metrics").await?;
    Ok(counter_by_label(
        &text,
        "controller_runtime_reconcile_total",
        "controller",
    ))
}
