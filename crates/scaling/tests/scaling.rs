//! The scaling controller against the real API server and kube-controller-manager
//! (StatefulSets with `podManagementPolicy: Parallel`, so any ordering comes from
//! Stateward), with the backup controller running for backups taken before a scale-down.
//! Run with `cargo xtask test`.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context as _, Result, bail, ensure};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{ConfigMap, PersistentVolumeClaim, Pod};
use k8s_openapi::api::events::v1::Event;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, ResourceExt};
use stateward_api::statefulapp::StatefulApp;
use stateward_api::{Backup, BackupPhase};
use stateward_runtime::Context;
use stateward_runtime::lock::{Acquired, Holder, Intent, OperationLock};
use stateward_runtime::metrics::Metrics;
use stateward_runtime::time::to_chrono;
use stateward_testkit::harness::{Cluster, TestNamespace, apply_yaml, install_crds, wait_for};

const MINUTE: Duration = Duration::from_secs(60);

struct World {
    cluster: Cluster,
    ns: TestNamespace,
    controllers: Vec<tokio::task::JoinHandle<()>>,
    metrics: Metrics,
}

impl World {
    /// The scaling controller (and, with `backups`, the backup controller and a
    /// repository `repo`) watching a fresh namespace.
    async fn new(test: &str, backups: bool) -> Result<Self> {
        let cluster = Cluster::connect().await?;
        {
            let _serial = cluster.serial().await?;
            install_crds(&cluster.client, &stateward_api::crds()).await?;
        }
        let ns = cluster.namespace(test).await?;
        let metrics = Metrics::new();
        // One set of shared watches, as in the manager.
        let stores = stateward_runtime::watch::Stores::start_in(
            cluster.client.clone(),
            Some(ns.name.clone()),
        );
        let mut controllers = vec![tokio::spawn(stateward_scaling::run(
            Context::new(
                cluster.client.clone(),
                stateward_scaling::CONTROLLER,
                metrics.clone(),
            ),
            stores.clone(),
        ))];
        if backups {
            let bucket = cluster.bucket_and_secret(&ns.name, "scale").await?;
            controllers.push(tokio::spawn(stateward_backup::run(
                Context::new(
                    cluster.client.clone(),
                    stateward_backup::CONTROLLER,
                    metrics.clone(),
                ),
                stores.clone(),
                stateward_backup::Config::default(),
            )));
            apply_yaml(
                &cluster.client,
                &ns.name,
                &format!(
                    "apiVersion: stateward.io/v1alpha1\nkind: BackupRepository\nmetadata: {{ name: repo }}\nspec:\n  s3:\n    \
                     bucket: {bucket}\n    prefix: backups\n    endpoint: \"{}\"\n    forcePathStyle: true\n    \
                     credentials:\n      accessKeyId: {{ name: s3, key: accessKeyId }}\n      \
                     secretAccessKey: {{ name: s3, key: secretAccessKey }}\n",
                    cluster.env.s3_endpoint_from_pods
                ),
                "test",
            )
            .await?;
        }
        Ok(Self {
            cluster,
            ns,
            controllers,
            metrics,
        })
    }

    async fn apply(&self, yaml: &str) -> Result<()> {
        apply_yaml(&self.cluster.client, &self.ns.name, yaml, "test").await?;
        Ok(())
    }

    fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = kube::core::NamespaceResourceScope, DynamicType = ()>
            + Clone
            + serde::de::DeserializeOwned
            + std::fmt::Debug,
    {
        self.cluster.api(&self.ns.name)
    }

    async fn condition(&self, app: &str, type_: &str) -> Result<Option<(String, String, String)>> {
        let app: StatefulApp = self.api().get(app).await?;
        Ok(app.status.and_then(|s| {
            s.conditions
                .into_iter()
                .find(|c| c.type_ == type_)
                .map(|c| (c.status, c.reason, c.message))
        }))
    }

    async fn wait_condition(
        &self,
        app: &str,
        type_: &str,
        status: &str,
        reason: &str,
    ) -> Result<String> {
        wait_for(
            &format!("{app}: {type_}={status} ({reason})"),
            2 * MINUTE,
            || async {
                Ok(self
                    .condition(app, type_)
                    .await?
                    .filter(|(s, r, _)| s == status && r == reason)
                    .map(|(_, _, m)| m))
            },
        )
        .await
    }

    async fn ready_pods(&self, sts: &str, want: usize) -> Result<Vec<Pod>> {
        let pods: Api<Pod> = self.api();
        wait_for(
            &format!("{want} ready pods of {sts}"),
            3 * MINUTE,
            || async {
                let list: Vec<Pod> = pods
                    .list(&ListParams::default().labels(&format!("app={sts}")))
                    .await?
                    .items
                    .into_iter()
                    .filter(|p| p.metadata.deletion_timestamp.is_none())
                    .collect();
                let ready = list.iter().filter(|p| ready_since(p).is_some()).count();
                Ok((list.len() == want && ready == want).then_some(list))
            },
        )
        .await
    }

    async fn events(&self, reason: &str) -> Result<Vec<Event>> {
        let events: Api<Event> = self.api();
        let mut list: Vec<Event> = events
            .list(&ListParams::default())
            .await?
            .items
            .into_iter()
            .filter(|e| e.reason.as_deref() == Some(reason))
            .collect();
        list.sort_by_key(|e| e.event_time.as_ref().map(|t| t.0));
        Ok(list)
    }

    /// Takes the app's lock for a stand-in operation (a ConfigMap as the holder object).
    async fn hold_lock(&self, app: &str, intent: Intent) -> Result<(OperationLock, String)> {
        let maps: Api<ConfigMap> = self.api();
        let holder = maps
            .create(
                &PostParams::default(),
                &serde_json::from_value(
                    serde_json::json!({"metadata": {"name": "other-operation"}}),
                )?,
            )
            .await?;
        // The test apps manage a StatefulSet of their own name.
        let lock = OperationLock::new(self.cluster.client.clone(), &self.ns.name, app, app);
        let acquired = lock
            .acquire(
                Holder {
                    api_version: "v1".into(),
                    kind: "ConfigMap".into(),
                    resource: "configmaps".into(),
                    name: holder.name_any(),
                    uid: holder.uid().unwrap_or_default(),
                },
                intent,
                None,
            )
            .await?;
        let Acquired::Held(record) = acquired else {
            anyhow::bail!("the lock was not free: {acquired:?}");
        };
        Ok((lock, record.token))
    }

    async fn finish(self) -> Result<()> {
        for c in &self.controllers {
            c.abort();
        }
        self.ns.cleanup().await
    }
}

fn ready_since(pod: &Pod) -> Option<chrono::DateTime<chrono::Utc>> {
    pod.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == "Ready" && c.status == "True")
        .and_then(|c| c.last_transition_time.as_ref())
        .map(to_chrono)
}

/// A Parallel StatefulSet whose pods become Ready 3 s after they start (so an
/// all-at-once scale-up is visible), writing into their volume.
fn statefulset(name: &str, replicas: i32, extra_spec: &str) -> String {
    format!(
        r#"
apiVersion: apps/v1
kind: StatefulSet
metadata: {{ name: {name} }}
spec:
  replicas: {replicas}
  serviceName: {name}
  podManagementPolicy: Parallel
{extra_spec}  selector: {{ matchLabels: {{ app: {name} }} }}
  template:
    metadata: {{ labels: {{ app: {name} }} }}
    spec:
      terminationGracePeriodSeconds: 1
      containers:
      - name: main
        image: stateward-probe:dev
        command: [sh, -c, "echo $HOSTNAME > /data/who; sleep 3; touch /tmp/ready; exec sleep 100000"]
        readinessProbe: {{ exec: {{ command: [test, -f, /tmp/ready] }}, periodSeconds: 1 }}
        volumeMounts: [{{ name: data, mountPath: /data }}]
  volumeClaimTemplates:
  - metadata: {{ name: data }}
    spec:
      accessModes: [ReadWriteOnce]
      resources: {{ requests: {{ storage: 16Mi }} }}
"#
    )
}

fn app(name: &str, sts: &str, spec: &str) -> String {
    format!(
        "apiVersion: stateward.io/v1alpha1\nkind: StatefulApp\nmetadata: {{ name: {name} }}\nspec:\n  statefulSetName: {sts}\n{spec}"
    )
}

async fn sts_replicas(w: &World, sts: &str) -> Result<i32> {
    let api: Api<StatefulSet> = w.api();
    Ok(api
        .get(sts)
        .await?
        .spec
        .and_then(|s| s.replicas)
        .unwrap_or_default())
}

#[tokio::test]
async fn scale_up_is_ordered_clamped_waits_for_the_lock_and_serves_scale_and_hpa() -> Result<()> {
    let w = World::new("scale-up", false).await?;
    w.apply(&statefulset("up", 2, "")).await?;
    w.apply(&app(
        "up",
        "up",
        "  scaling: { replicas: 2, maxReplicas: 4 }\n",
    ))
    .await?;
    w.ready_pods("up", 2).await?;
    w.wait_condition("up", "Scaling", "False", "Steady").await?;

    // Another operation holds the lock: the request waits.
    let (lock, token) = w.hold_lock("up", Intent::Read).await?;
    let apps: Api<StatefulApp> = w.api();
    apps.patch_scale(
        "up",
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"spec": {"replicas": 5}})),
    )
    .await?;
    let waiting = w
        .wait_condition("up", "ScalingBlocked", "True", "WaitingForLock")
        .await?;
    ensure!(waiting.contains("ConfigMap other-operation"), "{waiting}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    ensure!(
        sts_replicas(&w, "up").await? == 2,
        "nothing moves while the lock is held"
    );
    lock.release(&token).await?;

    // 5 is clamped to maxReplicas 4; pods 2 and 3 come one after the other.
    let pods = w.ready_pods("up", 4).await?;
    let by_name: BTreeMap<String, &Pod> = pods.iter().map(|p| (p.name_any(), p)).collect();
    let created = |n: &str| {
        by_name
            .get(n)
            .and_then(|p| p.metadata.creation_timestamp.as_ref())
            .map(to_chrono)
    };
    let ready = |n: &str| by_name.get(n).and_then(|p| ready_since(p));
    let (c3, r2) = (
        created("up-3").context("up-3")?,
        ready("up-2").context("up-2 ready")?,
    );
    ensure!(
        c3 >= r2,
        "up-3 was created at {c3}, before up-2 was Ready at {r2}"
    );
    let clamped = w
        .wait_condition("up", "ScalingBlocked", "True", "Clamped")
        .await?;
    ensure!(clamped.contains("maxReplicas 4"), "{clamped}");
    w.wait_condition("up", "Scaling", "False", "Steady").await?;
    ensure!(sts_replicas(&w, "up").await? == 4);

    // /scale reads like a Deployment's; an HPA can drive it.
    let scale = apps.get_scale("up").await?;
    ensure!(
        scale.spec.and_then(|s| s.replicas) == Some(5),
        "spec is the request"
    );
    let status = scale.status.context("scale status")?;
    ensure!(
        status.replicas == 4 && status.selector.as_deref() == Some("app=up"),
        "{status:?}"
    );
    let hpas: Api<HorizontalPodAutoscaler> = w.api();
    hpas.create(
        &PostParams::default(),
        &serde_json::from_value(serde_json::json!({
            "metadata": {"name": "up"},
            "spec": {
                "scaleTargetRef": {"apiVersion": "stateward.io/v1alpha1", "kind": "StatefulApp", "name": "up"},
                "minReplicas": 1, "maxReplicas": 4,
                "metrics": [{"type": "Resource", "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 80}}}]
            }
        }))?,
    )
    .await?;
    wait_for("the HPA to be AbleToScale", 2 * MINUTE, || async {
        let hpa = hpas.get("up").await?;
        let able = hpa
            .status
            .and_then(|s| s.conditions)
            .unwrap_or_default()
            .into_iter()
            .any(|c| c.type_ == "AbleToScale" && c.status == "True");
        Ok(able.then_some(()))
    })
    .await?;
    w.finish().await
}

#[tokio::test]
async fn scale_down_backs_up_first_hooks_each_leaving_replica_and_never_reuses_a_stale_volume()
-> Result<()> {
    let w = World::new("scale-down", true).await?;
    w.apply(&statefulset("down", 4, "")).await?;
    w.apply(&app(
        "down",
        "down",
        "  backup: { repository: repo }\n  scaling:\n    replicas: 4\n    scaleDown:\n      backupFirst: true\n      removedVolumes: RetainStale\n      preScaleDownHook: { name: leave, command: [sh, -c, \"echo left > /data/left\"], timeoutSeconds: 20 }\n",
    ))
    .await?;
    w.ready_pods("down", 4).await?;
    w.wait_condition("down", "Scaling", "False", "Steady")
        .await?;

    let apps: Api<StatefulApp> = w.api();
    apps.patch_scale(
        "down",
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"spec": {"replicas": 2}})),
    )
    .await?;
    w.ready_pods("down", 2).await?;
    w.wait_condition("down", "Scaling", "False", "Steady")
        .await?;

    // A Completed backup before the first pod went; hooks in pod 3, then pod 2.
    let backups: Api<Backup> = w.api();
    // (A transiently failed attempt is retried: find the one that completed.)
    let backup = backups
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .find(|b| b.status.as_ref().and_then(|s| s.phase) == Some(BackupPhase::Completed))
        .context("no backup completed")?;
    let status = backup.status.clone().unwrap_or_default();
    ensure!(
        status.phase == Some(BackupPhase::Completed),
        "{:?}",
        status.conditions
    );
    ensure!(
        status.volumes.len() == 4,
        "all four replicas were backed up: {:?}",
        status.volumes
    );
    let completed = status.completion_time.context("completion time")?;
    let hooks = w.events("PreScaleDownHook").await?;
    let notes: Vec<String> = hooks.iter().filter_map(|e| e.note.clone()).collect();
    ensure!(
        notes == vec!["hook leave ran in down-3", "hook leave ran in down-2"],
        "{notes:?}"
    );
    let removals = w.events("ScalingDown").await?;
    let first_removal = removals
        .first()
        .and_then(|e| e.event_time.as_ref())
        .context("no removal")?;
    ensure!(
        completed
            <= stateward_runtime::time::rfc3339(stateward_runtime::time::from_jiff(
                first_removal.0
            )),
        "the backup completed at {completed}, after the first removal"
    );
    // Exactly once each, even across reconciles.
    ensure!(hooks.len() == 2);

    // The removed replicas' volumes are kept, marked stale.
    let claims: Api<PersistentVolumeClaim> = w.api();
    for ordinal in [2, 3] {
        let pvc = claims.get(&format!("data-down-{ordinal}")).await?;
        ensure!(pvc.labels().get("stateward.io/stale").map(String::as_str) == Some("true"));
    }
    // Scaling up again stops at the stale volume until the user decides.
    apps.patch_scale(
        "down",
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"spec": {"replicas": 3}})),
    )
    .await?;
    let stale = w
        .wait_condition("down", "ScalingBlocked", "True", "StaleVolume")
        .await?;
    ensure!(stale.contains("data-down-2"), "{stale}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    ensure!(sts_replicas(&w, "down").await? == 2, "no silent reattach");
    claims
        .delete("data-down-2", &DeleteParams::default())
        .await?;
    w.ready_pods("down", 3).await?;
    let pods: Api<Pod> = w.api();
    let out =
        stateward_testkit::harness::exec(&pods, "down-2", None, &["sh", "-c", "ls /data"], None)
            .await?;
    ensure!(
        !out.stdout_str().contains("left"),
        "down-2 starts on a fresh volume: {}",
        out.stdout_str()
    );
    w.finish().await
}

/// `removedVolumes: Delete`: the leaving replica's claim is deleted by the StatefulSet
/// controller (Stateward sets `whenScaled: Delete` for the removal only: the manager's
/// admission policy lets it delete only claims Stateward labelled), the kept replicas'
/// claims stay, and the StatefulSet's policy is `Retain` again afterwards.
#[tokio::test]
async fn scale_down_with_removed_volumes_delete_leaves_the_claim_to_the_statefulset_controller()
-> Result<()> {
    let w = World::new("scale-del", false).await?;
    w.apply(&statefulset("del", 3, "")).await?;
    w.apply(&app(
        "del",
        "del",
        "  scaling:\n    replicas: 3\n    scaleDown: { backupFirst: false, removedVolumes: Delete }\n",
    ))
    .await?;
    w.ready_pods("del", 3).await?;
    w.wait_condition("del", "Scaling", "False", "Steady")
        .await?;
    let claims: Api<PersistentVolumeClaim> = w.api();
    let kept: Vec<Option<String>> = {
        let mut uids = Vec::new();
        for name in ["data-del-0", "data-del-1"] {
            uids.push(claims.get(name).await?.uid());
        }
        uids
    };

    let apps: Api<StatefulApp> = w.api();
    let since = chrono::Utc::now() - chrono::Duration::seconds(2);
    apps.patch_scale(
        "del",
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"spec": {"replicas": 2}})),
    )
    .await?;
    wait_for("claim data-del-2 to be deleted", 2 * MINUTE, || async {
        Ok(claims.get_opt("data-del-2").await?.is_none().then_some(()))
    })
    .await?;
    // Deleted by Kubernetes (the garbage collector: the leaving pod owned it), not by the
    // manager.
    let deleters: Vec<String> =
        stateward_testkit::audit::read_since(&w.cluster.env.audit_log, since)?
            .into_iter()
            .filter(|r| {
                r.verb == "delete"
                    && r.resource == "persistentvolumeclaims"
                    && r.namespace == w.ns.name
                    && r.name == "data-del-2"
            })
            .map(|r| r.user)
            .collect();
    ensure!(
        !deleters.is_empty()
            && deleters.iter().all(|u| {
                u == "system:serviceaccount:kube-system:generic-garbage-collector"
                    || u == "system:serviceaccount:kube-system:statefulset-controller"
            }),
        "data-del-2 was deleted by {deleters:?}"
    );
    w.wait_condition("del", "Scaling", "False", "Steady")
        .await?;
    for (name, uid) in ["data-del-0", "data-del-1"].iter().zip(&kept) {
        ensure!(
            claims.get(name).await?.uid() == *uid,
            "{name} was kept (same claim)"
        );
    }
    let sets: Api<StatefulSet> = w.api();
    let when_scaled = sets
        .get("del")
        .await?
        .spec
        .and_then(|s| s.persistent_volume_claim_retention_policy)
        .and_then(|p| p.when_scaled);
    ensure!(
        when_scaled.as_deref() == Some("Retain"),
        "whenScaled is back to Retain after the removal: {when_scaled:?}"
    );
    ensure!(sts_replicas(&w, "del").await? == 2, "two replicas left");
    w.finish().await
}

#[tokio::test]
async fn an_app_naming_a_missing_statefulset_is_blocked_with_the_field_named_and_one_warning()
-> Result<()> {
    let w = World::new("scale-missing", false).await?;
    w.apply(&app("ghost", "absent", "  scaling: { replicas: 2 }\n"))
        .await?;
    let message = w
        .wait_condition("ghost", "ScalingBlocked", "True", "StatefulSetNotFound")
        .await?;
    ensure!(
        message.contains("absent (spec.statefulSetName)"),
        "{message}"
    );
    let warnings = wait_for("a StatefulSetNotFound Warning", MINUTE, || async {
        let list = w.events("StatefulSetNotFound").await?;
        Ok((!list.is_empty()).then_some(list))
    })
    .await?;
    ensure!(
        warnings
            .iter()
            .all(|e| e.type_.as_deref() == Some("Warning")
                && e.note
                    .as_deref()
                    .is_some_and(|n| n.contains("spec.statefulSetName"))),
        "{warnings:?}"
    );
    // Nothing was created for it, and the Warning is said once, not per pass.
    let sets: Api<StatefulSet> = w.api();
    ensure!(sets.get_opt("absent").await?.is_none());
    tokio::time::sleep(Duration::from_secs(20)).await;
    let again = w.events("StatefulSetNotFound").await?;
    let count = |list: &[Event]| -> i32 {
        list.iter()
            .map(|e| e.series.as_ref().map_or(1, |s| s.count))
            .sum()
    };
    ensure!(count(&again) == 1, "{again:?}");
    w.finish().await
}

#[tokio::test]
async fn a_stop_holder_gets_the_app_at_zero_with_its_volumes_then_it_comes_back() -> Result<()> {
    let w = World::new("scale-stop", false).await?;
    w.apply(&statefulset(
        "stop",
        2,
        "  persistentVolumeClaimRetentionPolicy: { whenDeleted: Delete, whenScaled: Delete }\n",
    ))
    .await?;
    // Replicas are not managed: stop/start works for every app.
    w.apply(&app("stop", "stop", "")).await?;
    w.ready_pods("stop", 2).await?;
    let claims: Api<PersistentVolumeClaim> = w.api();
    let uids = |list: Vec<PersistentVolumeClaim>| {
        let mut v: Vec<String> = list.into_iter().filter_map(|c| c.uid()).collect();
        v.sort();
        v
    };
    let before = uids(claims.list(&ListParams::default()).await?.items);
    ensure!(before.len() == 2);

    let (lock, token) = w.hold_lock("stop", Intent::Stop { replicas: 2 }).await?;
    w.wait_condition("stop", "Stopped", "True", "StoppedForOperation")
        .await?;
    let pods: Api<Pod> = w.api();
    ensure!(
        pods.list(&ListParams::default().labels("app=stop"))
            .await?
            .items
            .is_empty()
    );
    ensure!(
        uids(claims.list(&ListParams::default()).await?.items) == before,
        "PVCs intact"
    );
    let sets: Api<StatefulSet> = w.api();
    let policy = sets
        .get("stop")
        .await?
        .spec
        .and_then(|s| s.persistent_volume_claim_retention_policy)
        .context("policy")?;
    ensure!(
        policy.when_scaled.as_deref() == Some("Retain")
            && policy.when_deleted.as_deref() == Some("Retain")
    );

    lock.release(&token).await?;
    w.wait_condition("stop", "Stopped", "False", "Started")
        .await?;
    w.ready_pods("stop", 2).await?;
    let sts = sets.get("stop").await?;
    let policy = sts
        .spec
        .as_ref()
        .and_then(|s| s.persistent_volume_claim_retention_policy.clone())
        .context("policy")?;
    ensure!(
        policy.when_scaled.as_deref() == Some("Delete")
            && policy.when_deleted.as_deref() == Some("Delete"),
        "{policy:?}"
    );
    ensure!(
        !sts.annotations()
            .contains_key(stateward_scaling::STOPPED_REPLICAS_ANNOTATION)
    );
    ensure!(
        uids(claims.list(&ListParams::default()).await?.items) == before,
        "the same PVC objects"
    );
    let metrics = w.metrics.encode();
    ensure!(
        metrics.contains(
            "stateward_scale_operations_total{direction=\"stop\",result=\"succeeded\"} 1"
        ),
        "{metrics}"
    );
    w.finish().await
}

/// `df -k` of /data in a pod: (used, size) in KiB.
async fn df(w: &World, pod: &str) -> Result<(u64, u64)> {
    let pods: Api<Pod> = w.api();
    let out =
        stateward_testkit::harness::exec(&pods, pod, None, &["df", "-P", "-k", "/data"], None)
            .await?;
    stateward_scaling::storage::parse_df(&out.stdout_str())
        .map(|(u, s)| (u / 1024, s / 1024))
        .context("df output")
}

fn claim_capacity(pvc: &PersistentVolumeClaim) -> String {
    pvc.status
        .as_ref()
        .and_then(|s| s.capacity.as_ref())
        .and_then(|c| c.get("storage"))
        .map(|q| q.0.clone())
        .unwrap_or_default()
}

fn claim_request(pvc: &PersistentVolumeClaim) -> String {
    pvc.spec
        .as_ref()
        .and_then(|s| s.resources.as_ref())
        .and_then(|r| r.requests.as_ref())
        .and_then(|r| r.get("storage"))
        .map(|q| q.0.clone())
        .unwrap_or_default()
}

#[tokio::test]
async fn growing_storage_size_expands_every_claim_and_the_template_without_touching_pods()
-> Result<()> {
    let w = World::new("scale-grow", false).await?;
    w.apply(&statefulset("grow", 2, "")).await?;
    w.apply(&app(
        "grow",
        "grow",
        "  scaling: { storage: { size: 16Mi } }\n",
    ))
    .await?;
    let before = w.ready_pods("grow", 2).await?;
    let pod_uids: Vec<String> = before.iter().filter_map(|p| p.uid()).collect();
    let sets: Api<StatefulSet> = w.api();
    // As if Helm installed it: its ownership marks must survive the recreate.
    sets.patch(
        "grow",
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"metadata": {
            "labels": {"app.kubernetes.io/managed-by": "Helm"},
            "annotations": {"meta.helm.sh/release-name": "grow"},
        }})),
    )
    .await?;
    let old_uid = sets.get("grow").await?.uid();

    w.apply(&app(
        "grow",
        "grow",
        "  scaling: { storage: { size: 32Mi } }\n",
    ))
    .await?;
    let claims: Api<PersistentVolumeClaim> = w.api();
    wait_for("both claims to request 32Mi", 2 * MINUTE, || async {
        let ok = ["data-grow-0", "data-grow-1"];
        let mut all = true;
        for c in ok {
            all &= claim_request(&claims.get(c).await?) == "32Mi";
        }
        Ok(all.then_some(()))
    })
    .await?;
    // The template carries the new size: a new StatefulSet object, the same pods.
    let sts = wait_for("the template to carry 32Mi", 2 * MINUTE, || async {
        let Some(sts) = sets.get_opt("grow").await? else {
            return Ok(None);
        };
        let size = sts
            .spec
            .as_ref()
            .and_then(|s| s.volume_claim_templates.as_ref())
            .and_then(|t| t.first())
            .map(claim_request)
            .unwrap_or_default();
        Ok((size == "32Mi").then_some(sts))
    })
    .await?;
    ensure!(sts.uid() != old_uid, "the StatefulSet was recreated");
    ensure!(
        sts.labels()
            .get("app.kubernetes.io/managed-by")
            .map(String::as_str)
            == Some("Helm")
            && sts
                .annotations()
                .get("meta.helm.sh/release-name")
                .map(String::as_str)
                == Some("grow"),
        "labels and annotations are carried over: {:?} {:?}",
        sts.labels(),
        sts.annotations()
    );
    let pods: Api<Pod> = w.api();
    let now: Vec<Pod> = pods
        .list(&ListParams::default().labels("app=grow"))
        .await?
        .items;
    let mut now_uids: Vec<String> = now.iter().filter_map(|p| p.uid()).collect();
    now_uids.sort();
    let mut was = pod_uids.clone();
    was.sort();
    ensure!(now_uids == was, "pods were not restarted");
    // ... and adopted by the new object.
    wait_for("the pods to be adopted", MINUTE, || async {
        let adopted = pods
            .list(&ListParams::default().labels("app=grow"))
            .await?
            .items
            .iter()
            .all(|p| {
                p.owner_references()
                    .iter()
                    .any(|o| Some(&o.uid) == sts.uid().as_ref())
            });
        Ok(adopted.then_some(()))
    })
    .await?;
    let app_status: StatefulApp = w.api().get("grow").await?;
    let scaling = app_status
        .status
        .and_then(|s| s.scaling)
        .context("scaling status")?;
    ensure!(
        scaling.storage_size.as_deref() == Some("32Mi")
            && scaling.applied_size.as_deref() == Some("32Mi"),
        "{scaling:?}"
    );
    // The filesystem: grown online where the node can, otherwise pending until the pod
    // restarts (this machine's node cannot resize online; docs/local-cluster.md).
    let apps: Api<StatefulApp> = w.api();
    let online = wait_for(
        "the resize to finish or wait for a restart",
        MINUTE,
        || async {
            let Some(scaling) = apps.get("grow").await?.status.and_then(|s| s.scaling) else {
                return Ok(None);
            };
            let pending = scaling
                .pending_resize
                .iter()
                .any(|p| p.contains("FileSystemResizePending"));
            let done = claim_capacity(&claims.get("data-grow-0").await?) == "32Mi"
                && claim_capacity(&claims.get("data-grow-1").await?) == "32Mi";
            Ok(if done {
                Some(true)
            } else if pending {
                Some(false)
            } else {
                None
            })
        },
    )
    .await?;
    if !online {
        // Offline (this machine's node): the claims wait for their pods to restart and
        // status says so; Stateward never restarts pods for it. The user restarts them.
        for pod in ["grow-0", "grow-1"] {
            pods.delete(pod, &DeleteParams::default()).await?;
        }
        for pod in ["grow-0", "grow-1"] {
            let old = before
                .iter()
                .find(|p| p.name_any() == pod)
                .and_then(|p| p.uid());
            wait_for(&format!("{pod} to come back"), 2 * MINUTE, || async {
                let p = pods.get_opt(pod).await?;
                Ok(p.filter(|p| p.uid() != old && ready_since(p).is_some()))
            })
            .await?;
        }
    }
    for pod in ["grow-0", "grow-1"] {
        let (_, size) = df(&w, pod).await?;
        ensure!(size > 24 * 1024, "the filesystem in {pod} is {size} KiB");
    }
    // A shrink in two steps: unsetting the size is admitted (the claims stay as they
    // are), setting a smaller one again is refused by the API server, naming the field.
    // Done last: with no size managed, status no longer reports pending resizes.
    w.apply(&app("grow", "grow", "  scaling: { storage: {} }\n"))
        .await?;
    match w
        .apply(&app(
            "grow",
            "grow",
            "  scaling: { storage: { size: 16Mi } }\n",
        ))
        .await
    {
        Err(e) if format!("{e:#}").contains("spec.scaling.storage.size") => {}
        other => bail!("a shrink after unsetting the size was not refused: {other:?}"),
    }
    w.finish().await
}

#[tokio::test]
async fn a_filling_volume_expands_once_per_cooldown_and_never_beyond_max() -> Result<()> {
    let w = World::new("scale-auto", false).await?;
    w.apply(&statefulset("auto", 1, "")).await?;
    w.apply(&app(
        "auto",
        "auto",
        "  scaling: { storage: { size: 16Mi, autoExpand: { thresholdPercent: 50, incrementPercent: 100, maxSize: 48Mi, cooldown: 20s } } }\n",
    ))
    .await?;
    w.ready_pods("auto", 1).await?;
    let pods: Api<Pod> = w.api();
    let fill = stateward_testkit::harness::exec(
        &pods,
        "auto-0",
        None,
        &[
            "sh",
            "-c",
            "head -c 10000000 /dev/urandom > /data/fill && sync",
        ],
        None,
    )
    .await?;
    ensure!(fill.exit_code == 0, "filling failed");
    let apps: Api<StatefulApp> = w.api();
    let size = |app: StatefulApp| {
        app.status
            .and_then(|s| s.scaling)
            .and_then(|s| s.storage_size)
    };
    wait_for("a first expansion to 32Mi", MINUTE, || async {
        Ok((size(apps.get("auto").await?).as_deref() == Some("32Mi")).then_some(()))
    })
    .await?;
    let first = w.events("AutoExpand").await?;
    ensure!(first.len() == 1, "{first:?}");
    // Still over the threshold (the filesystem grows offline here), but within the
    // cooldown: no second expansion yet.
    tokio::time::sleep(Duration::from_secs(8)).await;
    ensure!(size(apps.get("auto").await?).as_deref() == Some("32Mi"));
    ensure!(w.events("AutoExpand").await?.len() == 1);
    // After the cooldown it may grow again, to maxSize and never beyond.
    wait_for("maxSize to be reached", 2 * MINUTE, || async {
        Ok((size(apps.get("auto").await?).as_deref() == Some("48Mi")).then_some(()))
    })
    .await?;
    let claims: Api<PersistentVolumeClaim> = w.api();
    wait_for("the claim to request 48Mi", MINUTE, || async {
        Ok((claim_request(&claims.get("data-auto-0").await?) == "48Mi").then_some(()))
    })
    .await?;
    let metrics = w.metrics.encode();
    ensure!(
        metrics.contains("stateward_volume_used_bytes{namespace=")
            && metrics.contains("persistentvolumeclaim=\"data-auto-0\""),
        "{metrics}"
    );
    // Full and at maxSize: it says so, and grows no further.
    tokio::time::sleep(Duration::from_secs(25)).await;
    ensure!(size(apps.get("auto").await?).as_deref() == Some("48Mi"));
    w.finish().await
}
