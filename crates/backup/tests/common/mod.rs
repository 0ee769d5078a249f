//! What the backup controller's tests share: a world of one namespace, one bucket, a
//! repository `repo` and the controller watching the namespace; StatefulSets and apps the
//! tests back up; S3 and event helpers.
#![allow(dead_code)] // each test binary uses a part

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::events::v1::Event;
use kube::Api;
use kube::api::ListParams;
use stateward_api::{Backup, BackupPhase};
use stateward_runtime::Context;
use stateward_runtime::metrics::Metrics;
use stateward_runtime::time::ManualClock;
use stateward_testkit::harness::{Cluster, TestNamespace, exec, install_crds, wait_for};

pub const MINUTE: Duration = Duration::from_secs(60);

/// One test's world: a namespace, a bucket, a repository `repo` and the backup
/// controller watching the namespace.
pub struct World {
    pub cluster: Cluster,
    pub ns: TestNamespace,
    pub bucket: String,
    pub s3: aws_sdk_s3::Client,
    pub metrics: Metrics,
    pub controller: tokio::task::JoinHandle<()>,
    /// What the controller runs with (kept to restart it, as a restarted manager).
    pub config: stateward_backup::Config,
    pub loops: Loops,
    pub clock: Option<ManualClock>,
}

/// Which of the backup controller's loops a test runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Loops {
    /// Everything, as the manager runs it.
    All,
    /// The scheduler alone: the Backups it creates stay Pending (as if running), which
    /// is what firing, concurrency and missed-run tests need.
    SchedulerOnly,
}

impl World {
    pub async fn new(test: &str) -> Result<Self> {
        Self::with_config(test, stateward_backup::RunConfig::default()).await
    }

    pub async fn with_config(test: &str, config: stateward_backup::RunConfig) -> Result<Self> {
        Self::start(
            test,
            stateward_backup::Config {
                runs: config,
                ..Default::default()
            },
            Loops::All,
            None,
        )
        .await
    }

    /// A world whose controller runs `loops` with `config`, on `clock` when given.
    pub async fn start(
        test: &str,
        config: stateward_backup::Config,
        loops: Loops,
        clock: Option<ManualClock>,
    ) -> Result<Self> {
        let cluster = Cluster::connect().await?;
        {
            let _serial = cluster.serial().await?;
            install_crds(&cluster.client, &stateward_api::crds()).await?;
        }
        let ns = cluster.namespace(test).await?;
        let s3 = cluster.s3_client();
        let bucket = cluster.bucket_and_secret(&ns.name, "runs").await?;
        let metrics = Metrics::new();
        let mut world = Self {
            cluster,
            ns,
            bucket,
            s3,
            metrics,
            controller: tokio::spawn(async {}),
            config,
            loops,
            clock,
        };
        world.start_controller();
        world.apply(&world.repository("repo", "s3")).await?;
        Ok(world)
    }

    /// Starts the controller (again), as a starting manager would, with fresh metrics.
    pub fn start_controller(&mut self) {
        self.metrics = Metrics::new();
        let mut base = Context::new(
            self.cluster.client.clone(),
            stateward_backup::CONTROLLER,
            self.metrics.clone(),
        );
        if let Some(clock) = &self.clock {
            base = base.with_clock(std::sync::Arc::new(clock.clone()));
        }
        // Fresh watches per start, as a starting manager has.
        let ns = stateward_runtime::watch::Stores::start_in(
            self.cluster.client.clone(),
            Some(self.ns.name.clone()),
        );
        self.controller = match self.loops {
            Loops::All => tokio::spawn(stateward_backup::run(base, ns, self.config.clone())),
            Loops::SchedulerOnly => tokio::spawn(stateward_backup::run_schedules(
                base,
                ns,
                self.config.schedules.clone(),
            )),
        };
    }

    /// Stops the controller, as a stopped manager.
    pub async fn stop_controller(&mut self) {
        self.controller.abort();
        let _ = (&mut self.controller).await;
    }

    /// Applies files of `examples/` as a user would, pointed at this test's bucket.
    pub async fn apply_example(&self, file: &str) -> Result<()> {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/").to_string() + file;
        let yaml = std::fs::read_to_string(&path)
            .with_context(|| path.clone())?
            .replace(
                "http://10.213.0.1:9000",
                &self.cluster.env.s3_endpoint_from_pods,
            )
            .replace(
                "bucket: stateward-backups",
                &format!("bucket: {}", self.bucket),
            );
        self.apply(&yaml)
            .await
            .with_context(|| format!("applying examples/{file}"))
    }

    pub fn repository(&self, name: &str, secret: &str) -> String {
        format!(
            "apiVersion: stateward.io/v1alpha1\nkind: BackupRepository\nmetadata: {{ name: {name} }}\nspec:\n  s3:\n    \
             bucket: {}\n    prefix: backups\n    endpoint: \"{}\"\n    forcePathStyle: true\n    \
             credentials:\n      accessKeyId: {{ name: {secret}, key: accessKeyId }}\n      \
             secretAccessKey: {{ name: {secret}, key: secretAccessKey }}\n",
            self.bucket, self.cluster.env.s3_endpoint_from_pods
        )
    }

    pub async fn apply(&self, yaml: &str) -> Result<()> {
        stateward_testkit::harness::apply_yaml(&self.cluster.client, &self.ns.name, yaml, "test")
            .await?;
        Ok(())
    }

    pub fn backups(&self) -> Api<Backup> {
        self.cluster.api(&self.ns.name)
    }

    pub fn pods(&self) -> Api<Pod> {
        self.cluster.api(&self.ns.name)
    }

    /// Applies a Backup of `app` (extra spec lines indented by 2) and waits for it to end.
    pub async fn backup(&self, name: &str, app: &str, extra: &str) -> Result<Backup> {
        self.apply(&format!(
            "apiVersion: stateward.io/v1alpha1\nkind: Backup\nmetadata: {{ name: {name} }}\nspec:\n  app: {app}\n{extra}"
        ))
        .await?;
        self.wait_done(name, 3 * MINUTE).await
    }

    pub async fn wait_done(&self, name: &str, timeout: Duration) -> Result<Backup> {
        let api = self.backups();
        wait_for(&format!("Backup {name} to end"), timeout, || async {
            let b = api.get(name).await?;
            let phase = b.status.as_ref().and_then(|s| s.phase);
            Ok(matches!(phase, Some(BackupPhase::Completed | BackupPhase::Failed)).then_some(b))
        })
        .await
    }

    pub async fn keys(&self, prefix: &str) -> Result<Vec<String>> {
        let listed = self
            .s3
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(prefix)
            .send()
            .await?;
        Ok(listed
            .contents()
            .iter()
            .filter_map(|o| o.key().map(str::to_string))
            .collect())
    }

    pub async fn open_uploads(&self) -> Result<usize> {
        let listed = self
            .s3
            .list_multipart_uploads()
            .bucket(&self.bucket)
            .send()
            .await?;
        Ok(listed.uploads().len())
    }

    pub async fn object(&self, key: &str) -> Result<Vec<u8>> {
        Ok(self
            .s3
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
            .with_context(|| format!("get {key}"))?
            .body
            .collect()
            .await?
            .into_bytes()
            .to_vec())
    }

    pub async fn warnings(&self, reason: &str) -> Result<Vec<String>> {
        let events: Api<Event> = self.cluster.api(&self.ns.name);
        Ok(events
            .list(&ListParams::default())
            .await?
            .items
            .into_iter()
            .filter(|e| {
                e.type_.as_deref() == Some("Warning") && e.reason.as_deref() == Some(reason)
            })
            .filter_map(|e| e.note)
            .collect())
    }

    pub async fn finish(self) -> Result<()> {
        self.controller.abort();
        self.ns.cleanup().await
    }
}

pub fn condition(backup: &Backup, type_: &str) -> Option<(String, String, String)> {
    backup
        .status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

/// The status of a Backup that must have Completed, and its first data object's key.
pub fn completed_with_key(backup: &Backup) -> Result<(stateward_api::BackupStatus, String)> {
    let status = backup.status.clone().unwrap_or_default();
    ensure!(
        status.phase == Some(BackupPhase::Completed),
        "{}",
        failed_reason(backup)
    );
    let key = status
        .volumes
        .first()
        .and_then(|v| v.key.clone())
        .context("no key")?;
    Ok((status, key))
}

pub fn failed_reason(backup: &Backup) -> String {
    condition(backup, "Failed")
        .map(|(_, r, m)| format!("{r}: {m}"))
        .unwrap_or_else(|| format!("{:?}", backup.status))
}

/// A StatefulSet of probe pods, one per node, each writing known files into its volume.
pub fn writer_statefulset(name: &str, replicas: i32) -> String {
    format!(
        r#"
apiVersion: apps/v1
kind: StatefulSet
metadata: {{ name: {name} }}
spec:
  replicas: {replicas}
  serviceName: {name}
  selector: {{ matchLabels: {{ app: {name} }} }}
  template:
    metadata: {{ labels: {{ app: {name} }} }}
    spec:
      terminationGracePeriodSeconds: 2
      affinity:
        podAntiAffinity:
          requiredDuringSchedulingIgnoredDuringExecution:
          - labelSelector: {{ matchLabels: {{ app: {name} }} }}
            topologyKey: kubernetes.io/hostname
      containers:
      - name: main
        image: stateward-probe:dev
        command: [sh, -c, "mkdir -p /data/db/nested && seq 1 100000 > /data/db/rows-$HOSTNAME.txt && head -c 3000000 /dev/urandom > /data/db/nested/blob.bin && echo $HOSTNAME > /data/who && ln -sf who /data/link && exec sleep 100000"]
        readinessProbe: {{ exec: {{ command: [test, -f, /data/who] }}, periodSeconds: 1 }}
        volumeMounts: [{{ name: data, mountPath: /data }}]
  volumeClaimTemplates:
  - metadata: {{ name: data }}
    spec:
      accessModes: [ReadWriteOnce]
      resources: {{ requests: {{ storage: 64Mi }} }}
"#
    )
}

pub fn app(name: &str, sts: &str, backup: &str) -> String {
    format!(
        "apiVersion: stateward.io/v1alpha1\nkind: StatefulApp\nmetadata: {{ name: {name} }}\nspec:\n  statefulSetName: {sts}\n  backup:\n    repository: repo\n{backup}"
    )
}

/// sha256 of every regular file under /data in a pod, by relative path.
pub async fn source_digests(pods: &Api<Pod>, pod: &str) -> Result<BTreeMap<String, String>> {
    let out = exec(
        pods,
        pod,
        None,
        &[
            "sh",
            "-c",
            "cd /data && find . -type f ! -name 'post-hook-*' -exec sha256sum {} +",
        ],
        None,
    )
    .await?;
    ensure!(
        out.exit_code == 0,
        "sha256sum in {pod}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(parse_digests(&out.stdout_str()))
}

pub fn parse_digests(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| l.split_once("  "))
        .map(|(sum, path)| (path.trim_start_matches("./").to_string(), sum.to_string()))
        .collect()
}
