//! Crash safety of backup runs with the real `stateward` binary: a manager killed with
//! SIGKILL while agents run resumes the same Backup without a duplicate Job, and an agent
//! killed mid-upload fails its volume with a reason, leaving no manifest and no open
//! multipart upload. Run with `cargo xtask test`.

mod common;

use std::time::Duration;

use anyhow::{Context as _, Result, bail, ensure};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use kube::api::ListParams;
use kube::{Api, ResourceExt};
use stateward_api::{Backup, BackupPhase};
use stateward_testkit::harness::{
    Cluster, TestNamespace, apply_yaml, install_crds, wait_for, wait_pod_ready,
};

use common::Manager;

const MINUTE: Duration = Duration::from_secs(60);

struct Setup {
    cluster: Cluster,
    ns: TestNamespace,
    bucket: String,
    s3: aws_sdk_s3::Client,
}

/// A namespace with a bucket, a repository and a one-replica app whose Exec dump runs
/// `dump` (a shell script).
async fn setup(test: &str, app: &str, dump: &str) -> Result<Setup> {
    let cluster = Cluster::connect().await?;
    {
        let _serial = cluster.serial().await?;
        install_crds(&cluster.client, &stateward_api::crds()).await?;
    }
    let ns = cluster.namespace(test).await?;
    let s3 = cluster.s3_client();
    let bucket = cluster.bucket_and_secret(&ns.name, "crash").await?;
    let env = &cluster.env;
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
metadata: {{ name: {app} }}
spec:
  replicas: 1
  serviceName: {app}
  selector: {{ matchLabels: {{ app: {app} }} }}
  template:
    metadata: {{ labels: {{ app: {app} }} }}
    spec:
      terminationGracePeriodSeconds: 2
      containers: [{{ name: main, image: stateward-probe, args: [sleep] }}]
---
apiVersion: stateward.io/v1alpha1
kind: StatefulApp
metadata: {{ name: {app} }}
spec:
  statefulSetName: {app}
  backup:
    repository: repo
    method: Exec
    exec: {{ command: [sh, -c, "{dump}"] }}
"#,
        endpoint = env.s3_endpoint_from_pods
    );
    apply_yaml(&cluster.client, &ns.name, &yaml, "test").await?;
    let pods: Api<Pod> = cluster.api(&ns.name);
    wait_pod_ready(&pods, &format!("{app}-0"), 2 * MINUTE).await?;
    Ok(Setup {
        cluster,
        ns,
        bucket,
        s3,
    })
}

impl Setup {
    async fn start_backup(&self, name: &str, app: &str) -> Result<()> {
        apply_yaml(
            &self.cluster.client,
            &self.ns.name,
            &format!("apiVersion: stateward.io/v1alpha1\nkind: Backup\nmetadata: {{ name: {name} }}\nspec: {{ app: {app} }}\n"),
            "test",
        )
        .await?;
        Ok(())
    }

    async fn wait_agent_running(&self, name: &str) -> Result<()> {
        let api: Api<Backup> = self.cluster.api(&self.ns.name);
        wait_for("the agent Job to run", 2 * MINUTE, || async {
            let b = api.get(name).await?;
            let status = b.status.unwrap_or_default();
            if status.phase == Some(BackupPhase::Failed) {
                bail!("failed early: {:?}", status.conditions);
            }
            Ok(status
                .volumes
                .iter()
                .any(|v| v.phase == BackupPhase::Running)
                .then_some(()))
        })
        .await
    }

    async fn wait_done(&self, name: &str) -> Result<Backup> {
        let api: Api<Backup> = self.cluster.api(&self.ns.name);
        wait_for(&format!("Backup {name} to end"), 3 * MINUTE, || async {
            let b = api.get(name).await?;
            let phase = b.status.as_ref().and_then(|s| s.phase);
            Ok(matches!(phase, Some(BackupPhase::Completed | BackupPhase::Failed)).then_some(b))
        })
        .await
    }

    async fn open_uploads(&self) -> Result<usize> {
        Ok(self
            .s3
            .list_multipart_uploads()
            .bucket(&self.bucket)
            .send()
            .await?
            .uploads()
            .len())
    }

    async fn keys(&self) -> Result<Vec<String>> {
        Ok(self
            .s3
            .list_objects_v2()
            .bucket(&self.bucket)
            .send()
            .await?
            .contents()
            .iter()
            .filter_map(|o| o.key().map(str::to_string))
            .collect())
    }
}

#[tokio::test]
async fn a_manager_killed_while_agents_run_resumes_the_same_backup_without_a_duplicate_job()
-> Result<()> {
    let setup = setup("crash-manager", "survivor", "sleep 8; seq 1 5000").await?;
    let scope = ["--namespace", setup.ns.name.as_str()];
    let mut first = Manager::start(&setup.cluster, &scope)?;
    first.wait_ready().await?;
    setup.start_backup("survivor-1", "survivor").await?;
    setup.wait_agent_running("survivor-1").await?;
    let jobs: Api<Job> = setup.cluster.api(&setup.ns.name);
    let before: Vec<String> = jobs
        .list(&ListParams::default())
        .await?
        .items
        .iter()
        .filter_map(|j| j.uid())
        .collect();
    ensure!(
        before.len() == 1,
        "one agent Job expected, found {}",
        before.len()
    );
    first.child.kill()?; // SIGKILL
    first.child.wait()?;

    let second = Manager::start(&setup.cluster, &scope)?;
    second.wait_ready().await?;
    let done = setup.wait_done("survivor-1").await?;
    let status = done.status.clone().unwrap_or_default();
    ensure!(
        status.phase == Some(BackupPhase::Completed),
        "the resumed backup did not complete: {:?}",
        status.conditions
    );
    let after: Vec<String> = jobs
        .list(&ListParams::default())
        .await?
        .items
        .iter()
        .filter_map(|j| j.uid())
        .collect();
    ensure!(
        after == before,
        "the Job was duplicated or replaced: {before:?} -> {after:?}"
    );
    let volume = status.volumes.first().context("no volume")?;
    ensure!(
        volume.bytes_read
            == Some(i64::try_from(
                (1..=5000)
                    .map(|i: i32| i.to_string().len() + 1)
                    .sum::<usize>()
            )?),
        "the dump was not stored whole: {volume:?}"
    );
    let prefix = status.location.clone().context("no location")?;
    ensure!(
        setup
            .keys()
            .await?
            .contains(&format!("{prefix}/manifest.json")),
        "no manifest"
    );
    drop(second);
    setup.ns.cleanup().await
}

#[tokio::test]
async fn an_agent_killed_mid_upload_fails_its_volume_and_leaves_no_manifest_or_open_upload()
-> Result<()> {
    let setup = setup("crash-agent", "victim", "echo partial; exec sleep 600").await?;
    let manager = Manager::start(&setup.cluster, &["--namespace", setup.ns.name.as_str()])?;
    manager.wait_ready().await?;
    setup.start_backup("victim-1", "victim").await?;
    setup.wait_agent_running("victim-1").await?;
    wait_for("the agent's upload to open", MINUTE, || async {
        Ok((setup.open_uploads().await? > 0).then_some(()))
    })
    .await?;
    // The agent is a process on the local node: kill it as the OOM killer would.
    let killed = std::process::Command::new("pkill")
        .args(["-9", "-f", "agent backup-exec --pod victim-0 "])
        .status()?;
    ensure!(killed.success(), "no agent process found to kill");
    let done = setup.wait_done("victim-1").await?;
    let status = done.status.clone().unwrap_or_default();
    ensure!(
        status.phase == Some(BackupPhase::Failed),
        "{:?}",
        status.phase
    );
    let failed = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Failed")
        .context("no Failed condition")?;
    ensure!(
        failed.reason == "VolumeFailed",
        "{}: {}",
        failed.reason,
        failed.message
    );
    let volume = status.volumes.first().context("no volume")?;
    ensure!(volume.phase == BackupPhase::Failed, "{volume:?}");
    ensure!(
        volume
            .message
            .as_deref()
            .is_some_and(|m| m.contains("137") || m.contains("signal")),
        "the volume's reason should say the agent was killed: {volume:?}"
    );
    ensure!(
        setup.open_uploads().await? == 0,
        "a multipart upload is still open"
    );
    ensure!(
        setup.keys().await?.is_empty(),
        "objects left: {:?}",
        setup.keys().await?
    );
    drop(manager);
    setup.ns.cleanup().await
}
