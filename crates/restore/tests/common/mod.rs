//! What the restore tests share: a namespace with a bucket and a repository `repo`, the
//! backup, scaling and restore controllers watching it (as the manager runs them), apps
//! whose data the tests back up, damage and restore, and a fingerprint of a volume's tree
//! (content, modes, mtimes, hard-link counts, symlink targets) read inside the app pod.
#![allow(dead_code)] // each test binary uses a part

use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::events::v1::Event;
use kube::Api;
use kube::api::ListParams;
use stateward_api::{Backup, BackupPhase, Restore, RestorePhase};
use stateward_runtime::Context;
use stateward_runtime::metrics::Metrics;
use stateward_runtime::watch::Stores;
use stateward_testkit::harness::{
    Cluster, TestNamespace, apply_yaml, exec, install_crds, wait_for,
};

pub const MINUTE: Duration = Duration::from_secs(60);

pub struct World {
    pub cluster: Cluster,
    pub ns: TestNamespace,
    pub bucket: String,
    pub s3: aws_sdk_s3::Client,
    pub metrics: Metrics,
    pub controllers: Vec<tokio::task::JoinHandle<()>>,
}

impl World {
    pub async fn new(test: &str) -> Result<Self> {
        Self::with_restore_config(test, stateward_restore::Config::default()).await
    }

    pub async fn with_restore_config(
        test: &str,
        config: stateward_restore::Config,
    ) -> Result<Self> {
        Self::with_configs(test, stateward_backup::Config::default(), config).await
    }

    pub async fn with_configs(
        test: &str,
        backup_config: stateward_backup::Config,
        config: stateward_restore::Config,
    ) -> Result<Self> {
        let cluster = Cluster::connect().await?;
        {
            let _serial = cluster.serial().await?;
            install_crds(&cluster.client, &stateward_api::crds()).await?;
        }
        let ns = cluster.namespace(test).await?;
        let bucket = cluster.bucket_and_secret(&ns.name, "rst").await?;
        let metrics = Metrics::new();
        let base = |name: &str| Context::new(cluster.client.clone(), name, metrics.clone());
        let scope = Some(ns.name.clone());
        let stores = Stores::start_in(cluster.client.clone(), scope.clone());
        let controllers = vec![
            tokio::spawn(stateward_backup::run(
                base(stateward_backup::CONTROLLER),
                stores.clone(),
                backup_config,
            )),
            tokio::spawn(stateward_scaling::run(
                base(stateward_scaling::CONTROLLER),
                stores.clone(),
            )),
            tokio::spawn(stateward_restore::run(
                base(stateward_restore::CONTROLLER),
                stores,
                config,
            )),
        ];
        let world = Self {
            s3: cluster.s3_client(),
            cluster,
            ns,
            bucket,
            metrics,
            controllers,
        };
        world.apply(&world.repository("repo", "")).await?;
        Ok(world)
    }

    pub fn repository(&self, name: &str, extra: &str) -> String {
        format!(
            "apiVersion: stateward.io/v1alpha1\nkind: BackupRepository\nmetadata: {{ name: {name} }}\nspec:\n  s3:\n    bucket: {}\n    prefix: backups\n    endpoint: \"{}\"\n    forcePathStyle: true\n    credentials:\n      accessKeyId: {{ name: s3, key: accessKeyId }}\n      secretAccessKey: {{ name: s3, key: secretAccessKey }}\n{extra}",
            self.bucket, self.cluster.env.s3_endpoint_from_pods
        )
    }

    pub async fn apply(&self, yaml: &str) -> Result<()> {
        apply_yaml(&self.cluster.client, &self.ns.name, yaml, "test").await?;
        Ok(())
    }

    pub fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = kube::core::NamespaceResourceScope, DynamicType = ()>
            + Clone
            + serde::de::DeserializeOwned
            + std::fmt::Debug,
    {
        self.cluster.api(&self.ns.name)
    }

    /// Creates a Backup of `app` and waits for it to complete.
    pub async fn backup(&self, name: &str, app: &str) -> Result<Backup> {
        self.backup_with(name, &format!("{{ app: {app} }}")).await
    }

    /// Creates a Backup with this spec (flow YAML) and waits for it to complete.
    pub async fn backup_with(&self, name: &str, spec: &str) -> Result<Backup> {
        self.apply(&format!(
            "apiVersion: stateward.io/v1alpha1\nkind: Backup\nmetadata: {{ name: {name} }}\nspec: {spec}"
        ))
        .await?;
        let backups: Api<Backup> = self.api();
        let backup = wait_for(&format!("Backup {name} done"), 3 * MINUTE, || async {
            let b = backups.get(name).await?;
            Ok(matches!(
                b.status.as_ref().and_then(|s| s.phase),
                Some(BackupPhase::Completed | BackupPhase::Failed)
            )
            .then_some(b))
        })
        .await?;
        ensure!(
            backup.status.as_ref().and_then(|s| s.phase) == Some(BackupPhase::Completed),
            "Backup {name} failed: {:?}",
            backup.status.as_ref().map(|s| &s.conditions)
        );
        Ok(backup)
    }

    /// Applies a Restore (`spec` is the YAML body under `spec:`) and waits until it ends.
    pub async fn restore(&self, name: &str, spec: &str) -> Result<Restore> {
        self.apply(&format!(
            "apiVersion: stateward.io/v1alpha1\nkind: Restore\nmetadata: {{ name: {name} }}\nspec:\n{spec}"
        ))
        .await?;
        self.wait_restore(name).await
    }

    pub async fn wait_restore(&self, name: &str) -> Result<Restore> {
        let restores: Api<Restore> = self.api();
        wait_for(&format!("Restore {name} finished"), 4 * MINUTE, || async {
            let r = restores.get(name).await?;
            Ok(matches!(
                r.status.as_ref().and_then(|s| s.phase),
                Some(RestorePhase::Completed | RestorePhase::Failed)
            )
            .then_some(r))
        })
        .await
    }

    /// Waits until `replicas` pods of `sts` are Ready (and no more exist).
    pub async fn wait_ready(&self, sts: &str, replicas: usize) -> Result<Vec<Pod>> {
        let pods: Api<Pod> = self.api();
        wait_for(
            &format!("{replicas} Ready pods of {sts}"),
            3 * MINUTE,
            || async {
                let list = pods.list(&ListParams::default()).await?;
                let mine: Vec<Pod> = list
                    .items
                    .into_iter()
                    .filter(|p| {
                        p.metadata
                            .owner_references
                            .iter()
                            .flatten()
                            .any(|o| o.kind == "StatefulSet" && o.name == sts)
                    })
                    .collect();
                let ready = mine
                    .iter()
                    .filter(|p| {
                        p.metadata.deletion_timestamp.is_none()
                            && p.status
                                .as_ref()
                                .and_then(|s| s.conditions.as_ref())
                                .is_some_and(|c| {
                                    c.iter().any(|c| c.type_ == "Ready" && c.status == "True")
                                })
                    })
                    .count();
                Ok((ready == replicas && mine.len() == replicas).then_some(mine))
            },
        )
        .await
    }

    pub async fn sh(&self, pod: &str, script: &str) -> Result<String> {
        let pods: Api<Pod> = self.api();
        let out = exec(&pods, pod, None, &["sh", "-c", script], None).await?;
        ensure!(
            out.exit_code == 0,
            "`{script}` in {pod}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(out.stdout_str())
    }

    /// Every entry under `dir` in `pod`: path, kind, mode, link count, mtime and content
    /// hash (files) or target (symlinks). `lost+found` belongs to the file system.
    pub async fn fingerprint(&self, pod: &str, dir: &str) -> Result<String> {
        self.sh(
            pod,
            &format!(
                r#"cd {dir} && find . -mindepth 1 ! -path './lost+found*' | LC_ALL=C sort | while read -r f; do
  if [ -L "$f" ]; then echo "$f L $(readlink "$f")";
  elif [ -f "$f" ]; then echo "$f F $(stat -c '%a %h %Y %u' "$f") $(sha256sum < "$f" | cut -c1-64)";
  else echo "$f D $(stat -c '%a' "$f")"; fi; done"#
            ),
        )
        .await
    }

    pub async fn warnings(&self, reason: &str) -> Result<Vec<String>> {
        let events: Api<Event> = self.api();
        Ok(events
            .list(&ListParams::default())
            .await?
            .items
            .into_iter()
            .filter(|e| {
                e.type_.as_deref() == Some("Warning") && e.reason.as_deref() == Some(reason)
            })
            .map(|e| e.note.unwrap_or_default())
            .collect())
    }

    pub async fn finish(self) -> Result<()> {
        for c in &self.controllers {
            c.abort();
        }
        self.ns.cleanup().await
    }
}

/// The Ready condition's (status, reason, message).
pub fn ready(restore: &Restore) -> (String, String, String) {
    restore
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"))
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
        .unwrap_or_default()
}

pub fn phase(restore: &Restore) -> Option<RestorePhase> {
    restore.status.as_ref().and_then(|s| s.phase)
}

/// A StatefulSet of probe pods that write a varied tree into `/data` once (on first
/// start only, so a restarted pod shows what was restored): nested directories, a
/// random blob, a file with mode 600 and an old mtime, a hard link, a symlink.
pub fn writer(name: &str, replicas: i32, size: &str) -> String {
    format!(
        r#"
apiVersion: apps/v1
kind: StatefulSet
metadata: {{ name: {name} }}
spec:
  replicas: {replicas}
  serviceName: {name}
  podManagementPolicy: Parallel
  selector: {{ matchLabels: {{ app: {name} }} }}
  template:
    metadata: {{ labels: {{ app: {name} }} }}
    spec:
      terminationGracePeriodSeconds: 1
      containers:
      - name: main
        image: stateward-probe:dev
        command: [sh, -c, "[ -f /data/who ] || {{ mkdir -p /data/db/nested && seq 1 50000 > /data/db/rows.txt && head -c 2000000 /dev/urandom > /data/db/nested/blob.bin && echo secret > /data/db/private && chmod 600 /data/db/private && touch -d 2020-01-02T03:04:05 /data/db/private && ln /data/db/rows.txt /data/db/rows.hard && ln -s db/rows.txt /data/link && echo $HOSTNAME > /data/who; }}; exec sleep 100000"]
        readinessProbe: {{ exec: {{ command: [test, -f, /data/who] }}, periodSeconds: 1 }}
        volumeMounts: [{{ name: data, mountPath: /data }}]
  volumeClaimTemplates:
  - metadata: {{ name: data }}
    spec:
      accessModes: [ReadWriteOnce]
      resources: {{ requests: {{ storage: {size} }} }}
"#
    )
}

/// A file of the repository's `examples/`, as users apply it.
pub fn example(file: &str) -> Result<String> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/").to_string() + file;
    std::fs::read_to_string(&path).with_context(|| path.clone())
}

pub fn app(name: &str, sts: &str, extra: &str) -> String {
    format!(
        "apiVersion: stateward.io/v1alpha1\nkind: StatefulApp\nmetadata: {{ name: {name} }}\nspec:\n  statefulSetName: {sts}\n  backup:\n    repository: repo\n{extra}"
    )
}

/// Damages the app's data: a file changed, one deleted, one added.
pub const DAMAGE: &str =
    "echo changed > /data/who && rm /data/db/nested/blob.bin && echo new > /data/added";

/// The uid of every PVC named `data-<sts>-*`.
pub async fn claim_uids(world: &World, sts: &str) -> Result<Vec<(String, String)>> {
    let claims: Api<k8s_openapi::api::core::v1::PersistentVolumeClaim> = world.api();
    let mut out: Vec<(String, String)> = claims
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter(|c| {
            c.metadata
                .name
                .as_deref()
                .is_some_and(|n| n.starts_with(&format!("data-{sts}-")))
        })
        .map(|c| {
            (
                c.metadata.name.unwrap_or_default(),
                c.metadata.uid.unwrap_or_default(),
            )
        })
        .collect();
    out.sort();
    Ok(out)
}

/// The data object keys of a completed Backup.
pub fn backup_keys(backup: &Backup) -> Result<Vec<String>> {
    backup
        .status
        .as_ref()
        .context("no status")?
        .volumes
        .iter()
        .map(|v| v.key.clone().context("no key"))
        .collect()
}

/// A restore controller whose swap agents pause after their first rename (the volume
/// half old, half new), so a test can act at the worst moment.
pub fn pausing_mid_swap(seconds: u64) -> stateward_restore::Config {
    stateward_restore::Config {
        agent_env: vec![(
            stateward_agent::swap::PAUSE_MID_SWAP_ENV.into(),
            seconds.to_string(),
        )],
        ..Default::default()
    }
}

/// Whether a swap agent of Restore `restore` has said it paused mid-swap.
pub async fn swap_paused(world: &World, restore: &str) -> Result<bool> {
    let pods: Api<Pod> = world.api();
    let list = pods
        .list(&ListParams::default().labels(&format!("stateward.io/restore={restore}")))
        .await?;
    for pod in list.items.iter().filter(|p| {
        p.metadata
            .name
            .as_deref()
            .is_some_and(|n| n.contains("-swap-"))
    }) {
        let name = pod.metadata.name.clone().unwrap_or_default();
        let log = pods
            .logs(&name, &Default::default())
            .await
            .unwrap_or_default();
        if log.contains("in the middle of the swap") {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Processes on this machine whose arguments include every one of `parts`.
pub fn pids_with(parts: &[&str]) -> Vec<i32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if parts.iter().all(|p| args.iter().any(|a| a == p)) {
            out.push(pid);
        }
    }
    out
}

/// Takes the operation lock of `app` (whose StatefulSet has its name) for another
/// operation, a ConfigMap `holder` standing in for it, as a busy cluster would.
pub async fn hold_lock(
    world: &World,
    holder: &str,
    app: &str,
) -> Result<(
    stateward_runtime::lock::OperationLock,
    stateward_runtime::lock::LockRecord,
)> {
    use kube::ResourceExt;
    use stateward_runtime::lock::{Acquired, Holder, Intent, OperationLock};
    let maps: Api<k8s_openapi::api::core::v1::ConfigMap> = world.api();
    let map = maps
        .create(
            &Default::default(),
            &serde_json::from_value(serde_json::json!({"metadata": {"name": holder}}))?,
        )
        .await?;
    let lock = OperationLock::new(world.cluster.client.clone(), &world.ns.name, app, app);
    let holder = Holder {
        api_version: "v1".into(),
        kind: "ConfigMap".into(),
        resource: "configmaps".into(),
        name: holder.into(),
        uid: map.uid().unwrap_or_default(),
    };
    let Acquired::Held(record) = lock.acquire(holder, Intent::Reshape, None).await? else {
        anyhow::bail!("could not take the lock for the test");
    };
    Ok((lock, record))
}
