//! Crash safety of an in-place restore with the real `stateward` binary: killed with
//! SIGKILL as the swap starts, the manager resumes after a restart, the Restore completes,
//! the volume holds exactly the backup (never a mix) and the app runs again at its
//! replica count. Run with `cargo xtask test`.

mod common;

use std::time::Duration;

use anyhow::{Result, ensure};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use stateward_api::{Backup, BackupPhase, Restore, RestorePhase};
use stateward_testkit::harness::{
    Cluster, apply_yaml, exec, install_crds, wait_for, wait_pod_ready,
};

use common::Manager;

const MINUTE: Duration = Duration::from_secs(60);

/// Content, mode and link count of every file under /data (lost+found aside).
async fn fingerprint(pods: &Api<Pod>, pod: &str) -> Result<String> {
    let out = exec(
        pods,
        pod,
        None,
        &[
            "sh",
            "-c",
            "cd /data && find . -mindepth 1 ! -path './lost+found*' | LC_ALL=C sort | while read -r f; do if [ -f \"$f\" ] && [ ! -L \"$f\" ]; then echo \"$f $(stat -c '%a %h' \"$f\") $(sha256sum < \"$f\" | cut -c1-64)\"; else echo \"$f\"; fi; done",
        ],
        None,
    )
    .await?;
    ensure!(
        out.exit_code == 0,
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(out.stdout_str())
}

#[tokio::test]
async fn a_manager_killed_as_the_swap_starts_resumes_and_the_restore_completes() -> Result<()> {
    let cluster = Cluster::connect().await?;
    {
        let _serial = cluster.serial().await?;
        install_crds(&cluster.client, &stateward_api::crds()).await?;
    }
    let ns = cluster.namespace("restore-crash").await?;
    let bucket = cluster.bucket_and_secret(&ns.name, "rcrash").await?;
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
metadata: {{ name: rc }}
spec:
  replicas: 2
  serviceName: rc
  podManagementPolicy: Parallel
  selector: {{ matchLabels: {{ app: rc }} }}
  template:
    metadata: {{ labels: {{ app: rc }} }}
    spec:
      terminationGracePeriodSeconds: 1
      containers:
      - name: main
        image: stateward-probe:dev
        command: [sh, -c, "[ -f /data/who ] || {{ mkdir -p /data/db && head -c 3000000 /dev/urandom > /data/db/blob && echo $HOSTNAME > /data/who; }}; exec sleep 100000"]
        readinessProbe: {{ exec: {{ command: [test, -f, /data/who] }}, periodSeconds: 1 }}
        volumeMounts: [{{ name: data, mountPath: /data }}]
  volumeClaimTemplates:
  - metadata: {{ name: data }}
    spec:
      accessModes: [ReadWriteOnce]
      resources: {{ requests: {{ storage: 32Mi }} }}
---
apiVersion: stateward.io/v1alpha1
kind: StatefulApp
metadata: {{ name: rc }}
spec:
  statefulSetName: rc
  backup: {{ repository: repo }}
"#,
        endpoint = cluster.env.s3_endpoint_from_pods
    );
    let pods: Api<Pod> = cluster.api(&ns.name);
    apply_yaml(&cluster.client, &ns.name, &yaml, "test").await?;
    for p in ["rc-0", "rc-1"] {
        wait_pod_ready(&pods, p, 2 * MINUTE).await?;
    }
    let before = [
        fingerprint(&pods, "rc-0").await?,
        fingerprint(&pods, "rc-1").await?,
    ];
    let scope = ["--namespace", ns.name.as_str(), "--controllers", "all"];
    let mut first = Manager::start(&cluster, &scope)?;
    first.wait_ready().await?;
    apply_yaml(
        &cluster.client,
        &ns.name,
        "apiVersion: stateward.io/v1alpha1\nkind: Backup\nmetadata: { name: rc-b1 }\nspec: { app: rc }",
        "test",
    )
    .await?;
    let backups: Api<Backup> = cluster.api(&ns.name);
    wait_for("the backup", 3 * MINUTE, || async {
        Ok((backups.get("rc-b1").await?.status.and_then(|s| s.phase)
            == Some(BackupPhase::Completed))
        .then_some(()))
    })
    .await?;
    for p in ["rc-0", "rc-1"] {
        exec(
            &pods,
            p,
            None,
            &["sh", "-c", "echo damaged > /data/who && rm /data/db/blob"],
            None,
        )
        .await?;
    }
    apply_yaml(
        &cluster.client,
        &ns.name,
        "apiVersion: stateward.io/v1alpha1\nkind: Restore\nmetadata: { name: rc-r1 }\nspec:\n  source: { backup: rc-b1 }\n  target: { app: rc }",
        "test",
    )
    .await?;
    // Kill the manager the moment every volume verified and the swap begins.
    let restores: Api<Restore> = cluster.api(&ns.name);
    wait_for("the swap to start", 3 * MINUTE, || async {
        let r = restores.get("rc-r1").await?;
        let step = r.status.as_ref().and_then(|s| s.step.clone());
        ensure!(
            r.status.as_ref().and_then(|s| s.phase) != Some(RestorePhase::Failed),
            "{:?}",
            r.status
        );
        Ok((step.as_deref() == Some("Swapping")).then_some(()))
    })
    .await?;
    first.signal("KILL")?;
    let _ = first.child.wait();
    println!("killed the manager as the swap started");

    let second = Manager::start(&cluster, &scope)?;
    second.wait_ready().await?;
    let restore = wait_for("the restore to finish", 3 * MINUTE, || async {
        let r = restores.get("rc-r1").await?;
        Ok(matches!(
            r.status.as_ref().and_then(|s| s.phase),
            Some(RestorePhase::Completed | RestorePhase::Failed)
        )
        .then_some(r))
    })
    .await?;
    ensure!(
        restore.status.as_ref().and_then(|s| s.phase) == Some(RestorePhase::Completed),
        "{:?}",
        restore.status
    );
    for p in ["rc-0", "rc-1"] {
        wait_pod_ready(&pods, p, 3 * MINUTE).await?;
    }
    let after = [
        fingerprint(&pods, "rc-0").await?,
        fingerprint(&pods, "rc-1").await?,
    ];
    ensure!(
        after == before,
        "restored volumes differ:\n{before:?}\n{after:?}"
    );
    let sets: Api<StatefulSet> = cluster.api(&ns.name);
    ensure!(
        sets.get("rc").await?.spec.and_then(|s| s.replicas) == Some(2),
        "back at 2 replicas"
    );
    drop(second);
    ns.cleanup().await
}
