//! The chart installed cluster-wide, as a platform team installs it: every feature runs
//! under the chart's own RBAC and manager policy, and the API server's audit log shows no
//! 403 for the manager's user. A cluster-wide manager acts on every namespace, so this
//! test needs the cluster to itself: `cargo xtask test` runs the tests named
//! `exclusive_...` in a phase of their own, after the others.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{ApiResource, DynamicObject, ListParams, Patch, PatchParams};
use kube::{Api, ResourceExt};
use stateward_api::statefulapp::StatefulApp;
use stateward_api::{Backup, BackupPhase, Restore, RestorePhase};
use stateward_testkit::audit;
use stateward_testkit::harness::{
    Cluster, apply_yaml, exec, install_crds, wait_for, wait_pod_ready,
};

const MINUTE: Duration = Duration::from_secs(60);

/// Two probe replicas that write a file once, on their first start.
const APP: &str = r#"
apiVersion: apps/v1
kind: StatefulSet
metadata: { name: shop }
spec:
  replicas: 2
  serviceName: shop
  podManagementPolicy: Parallel
  selector: { matchLabels: { app: shop } }
  template:
    metadata: { labels: { app: shop } }
    spec:
      terminationGracePeriodSeconds: 1
      containers:
      - name: main
        image: stateward-probe:dev
        command: [sh, -c, "[ -f /data/who ] || { seq 1 20000 > /data/rows; echo $HOSTNAME > /data/who; }; exec sleep 100000"]
        readinessProbe: { exec: { command: [test, -f, /data/who] }, periodSeconds: 1 }
        volumeMounts: [{ name: data, mountPath: /data }]
  volumeClaimTemplates:
  - metadata: { name: data }
    spec:
      accessModes: [ReadWriteOnce]
      resources: { requests: { storage: 16Mi } }
"#;

fn statefulapp(size: &str, replicas: i32) -> String {
    format!(
        r#"
apiVersion: stateward.io/v1alpha1
kind: StatefulApp
metadata: {{ name: shop }}
spec:
  statefulSetName: shop
  backup:
    repository: repo
    exec:
      command: [sh, -c, "cat /data/rows"]
    schedules:
    - {{ name: minutely, cron: "* * * * *", retention: {{ keepLast: 2 }} }}
  scaling:
    replicas: {replicas}
    scaleDown: {{ backupFirst: true, removedVolumes: RetainStale }}
    storage: {{ size: {size} }}
  monitoring: {{ metricsPort: 9100, backupMaxAge: 26h }}
"#
    )
}

async fn backup_done(backups: &Api<Backup>, name: &str) -> Result<Backup> {
    let backup = wait_for(&format!("Backup {name} to end"), 3 * MINUTE, || async {
        let b = backups.get(name).await?;
        Ok(matches!(
            b.status.as_ref().and_then(|s| s.phase),
            Some(BackupPhase::Completed | BackupPhase::Failed)
        )
        .then_some(b))
    })
    .await?;
    let status = backup.status.clone().unwrap_or_default();
    ensure!(
        status.phase == Some(BackupPhase::Completed),
        "Backup {name}: {:?}",
        status.conditions
    );
    Ok(backup)
}

async fn restore_done(restores: &Api<Restore>, name: &str) -> Result<()> {
    let restore = wait_for(&format!("Restore {name} to end"), 4 * MINUTE, || async {
        let r = restores.get(name).await?;
        Ok(matches!(
            r.status.as_ref().and_then(|s| s.phase),
            Some(RestorePhase::Completed | RestorePhase::Failed)
        )
        .then_some(r))
    })
    .await?;
    let status = restore.status.clone().unwrap_or_default();
    ensure!(
        status.phase == Some(RestorePhase::Completed),
        "Restore {name}: {:?}",
        status.conditions
    );
    Ok(())
}

#[tokio::test]
async fn exclusive_the_chart_installed_cluster_wide_runs_every_feature_with_no_403() -> Result<()> {
    let cluster = Cluster::connect().await?;
    let _serial = cluster.serial().await?;
    install_crds(&cluster.client, &stateward_api::crds()).await?;
    // The Prometheus Operator's CRDs, so that monitoring makes its objects.
    let mut prometheus = Vec::new();
    for plural in ["podmonitors", "prometheusrules"] {
        let path = cluster
            .env
            .prometheus_crds
            .join(format!("monitoring.coreos.com_{plural}.yaml"));
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("{}: run through `cargo xtask test`", path.display()))?;
        prometheus.push(serde_yaml::from_str::<CustomResourceDefinition>(&text)?);
    }
    install_crds(&cluster.client, &prometheus).await?;

    let system = cluster.namespace("sw-system").await?;
    let release = "swc";
    let since = chrono::Utc::now() - chrono::Duration::seconds(2);
    // The optional API-server manners too, so that the API server validates them.
    cluster
        .install_chart(
            release,
            &system.name,
            &["apiPriority.enabled=true", "networkPolicy.enabled=true"],
        )
        .await?;
    let user = format!("system:serviceaccount:{}:{release}-stateward", system.name);
    let ns = cluster.namespace("e2e").await?;
    let result = match users_get_stateward_through_view_and_edit(&cluster, &ns.name).await {
        Ok(()) => every_feature(&cluster, &ns.name).await,
        Err(e) => Err(e),
    };

    // Whatever happened, the audit log says whether the manager was refused anything here
    // (in namespaces the earlier phase left terminating, writing an Event is refused with
    // a 403 that says nothing about RBAC; they do not count).
    let ours = [ns.name.as_str(), system.name.as_str(), ""];
    let refused: Vec<String> = audit::read_since(&cluster.env.audit_log, since)?
        .into_iter()
        .filter(|r| r.user == user && r.code == 403 && ours.contains(&r.namespace.as_str()))
        .map(|r| format!("{} {} {}/{}", r.verb, r.resource, r.namespace, r.name))
        .collect();
    let uninstalled = cluster.uninstall_chart(release, &system.name).await;
    result?;
    ns.cleanup().await?;
    ensure!(
        refused.is_empty(),
        "the manager was refused {} request(s):\n{}",
        refused.len(),
        refused.join("\n")
    );
    uninstalled?;
    system.cleanup().await
}

/// The chart's user roles aggregate into Kubernetes' own: a namespace editor (bound to
/// `edit`) may create StatefulApps and Restores, a viewer (bound to `view`) may list
/// Backups but not create a Restore. Dry runs: nothing is stored.
async fn users_get_stateward_through_view_and_edit(cluster: &Cluster, ns: &str) -> Result<()> {
    use k8s_openapi::api::core::v1::ServiceAccount;
    use k8s_openapi::api::rbac::v1::RoleBinding;
    use kube::api::PostParams;
    use stateward_testkit::harness::from_yaml;
    let accounts: Api<ServiceAccount> = cluster.api(ns);
    let bindings: Api<RoleBinding> = cluster.api(ns);
    for (account, role) in [("editor", "edit"), ("viewer", "view")] {
        accounts
            .create(
                &PostParams::default(),
                &from_yaml(&format!("metadata: {{ name: {account} }}"))?,
            )
            .await?;
        bindings
            .create(
                &PostParams::default(),
                &from_yaml(&format!(
                    "metadata: {{ name: {account} }}\nroleRef: {{ apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: {role} }}\nsubjects: [{{ kind: ServiceAccount, name: {account}, namespace: {ns} }}]"
                ))?,
            )
            .await?;
    }
    let dry = PostParams {
        dry_run: true,
        ..PostParams::default()
    };
    let restore: Restore =
        from_yaml("metadata: { name: r }\nspec: { source: { backup: b }, target: { app: a } }")?;
    let app: StatefulApp = from_yaml("metadata: { name: a }\nspec: { statefulSetName: a }")?;
    let editor = cluster.client_as(ns, "editor").await?;
    let viewer = cluster.client_as(ns, "viewer").await?;
    // The aggregation controller copies the rules into edit and view a moment later.
    wait_for(
        "an editor to create a StatefulApp and a Restore",
        MINUTE,
        || async {
            let apps: Api<StatefulApp> = Api::namespaced(editor.clone(), ns);
            let restores: Api<Restore> = Api::namespaced(editor.clone(), ns);
            Ok((apps.create(&dry, &app).await.is_ok()
                && restores.create(&dry, &restore).await.is_ok())
            .then_some(()))
        },
    )
    .await?;
    wait_for("a viewer to list Backups", MINUTE, || async {
        let backups: Api<Backup> = Api::namespaced(viewer.clone(), ns);
        Ok(backups.list(&ListParams::default()).await.ok().map(|_| ()))
    })
    .await?;
    let restores: Api<Restore> = Api::namespaced(viewer, ns);
    match restores.create(&dry, &restore).await {
        Err(kube::Error::Api(e)) if e.code == 403 => Ok(()),
        other => anyhow::bail!("a viewer creating a Restore: {other:?}"),
    }
}

/// Scheduled and on-demand backups of both methods, monitoring objects, an in-place and
/// a clone restore, a scale-down with a backup first and a volume expansion, in one
/// namespace, by the chart-installed manager.
async fn every_feature(cluster: &Cluster, ns: &str) -> Result<()> {
    let started = std::time::Instant::now();
    let bucket = cluster.bucket_and_secret(ns, "e2e").await?;
    let apply = |yaml: String| {
        let client = cluster.client.clone();
        let ns = ns.to_string();
        async move { apply_yaml(&client, &ns, &yaml, "test").await.map(|_| ()) }
    };
    apply(format!(
        "apiVersion: stateward.io/v1alpha1\nkind: BackupRepository\nmetadata: {{ name: repo }}\nspec:\n  s3:\n    bucket: {bucket}\n    prefix: backups\n    endpoint: \"{}\"\n    forcePathStyle: true\n    credentials:\n      accessKeyId: {{ name: s3, key: accessKeyId }}\n      secretAccessKey: {{ name: s3, key: secretAccessKey }}\n",
        cluster.env.s3_endpoint_from_pods
    ))
    .await?;
    apply(APP.to_string()).await?;
    apply(statefulapp("16Mi", 2)).await?;
    let pods: Api<Pod> = cluster.api(ns);
    for pod in ["shop-0", "shop-1"] {
        wait_pod_ready(&pods, pod, 2 * MINUTE).await?;
    }
    let rows = |pod: &'static str| {
        let pods = pods.clone();
        async move {
            let out = exec(&pods, pod, None, &["sh", "-c", "wc -l < /data/rows"], None).await?;
            Ok::<String, anyhow::Error>(out.stdout_str().trim().to_string())
        }
    };

    // Backups: on demand of both methods, and the schedule's.
    let backups: Api<Backup> = cluster.api(ns);
    apply("apiVersion: stateward.io/v1alpha1\nkind: Backup\nmetadata: { name: by-volume }\nspec: { app: shop }".into()).await?;
    apply("apiVersion: stateward.io/v1alpha1\nkind: Backup\nmetadata: { name: by-exec }\nspec: { app: shop, method: Exec }".into()).await?;
    backup_done(&backups, "by-volume").await?;
    backup_done(&backups, "by-exec").await?;
    println!(
        "{:>5.1} s  on-demand backups of both methods completed",
        started.elapsed().as_secs_f64()
    );
    wait_for("a scheduled Backup to complete", 3 * MINUTE, || async {
        Ok(backups
            .list(&ListParams::default().labels("stateward.io/schedule=minutely"))
            .await?
            .items
            .into_iter()
            .find(|b| b.status.as_ref().and_then(|s| s.phase) == Some(BackupPhase::Completed)))
    })
    .await?;
    println!(
        "{:>5.1} s  a scheduled backup completed",
        started.elapsed().as_secs_f64()
    );

    // Monitoring objects.
    for (kind, plural) in [
        ("PodMonitor", "podmonitors"),
        ("PrometheusRule", "prometheusrules"),
    ] {
        let resource = ApiResource {
            group: "monitoring.coreos.com".into(),
            version: "v1".into(),
            api_version: "monitoring.coreos.com/v1".into(),
            kind: kind.into(),
            plural: plural.into(),
        };
        let objects: Api<DynamicObject> =
            Api::namespaced_with(cluster.client.clone(), ns, &resource);
        wait_for(&format!("the app's {kind}"), 2 * MINUTE, || async {
            Ok((!objects.list(&ListParams::default()).await?.items.is_empty()).then_some(()))
        })
        .await?;
    }

    println!(
        "{:>5.1} s  the PodMonitor and PrometheusRule exist",
        started.elapsed().as_secs_f64()
    );

    // An in-place restore of a damaged volume, then a clone.
    exec(
        &pods,
        "shop-0",
        None,
        &["sh", "-c", "echo damaged > /data/rows"],
        None,
    )
    .await?;
    let restores: Api<Restore> = cluster.api(ns);
    apply("apiVersion: stateward.io/v1alpha1\nkind: Restore\nmetadata: { name: in-place }\nspec:\n  source: { backup: by-volume }\n  target: { app: shop }\n".into()).await?;
    restore_done(&restores, "in-place").await?;
    for pod in ["shop-0", "shop-1"] {
        wait_pod_ready(&pods, pod, 2 * MINUTE).await?;
    }
    ensure!(
        rows("shop-0").await? == "20000",
        "the in-place restore brought the rows back"
    );
    println!(
        "{:>5.1} s  the in-place restore completed",
        started.elapsed().as_secs_f64()
    );
    apply("apiVersion: stateward.io/v1alpha1\nkind: Restore\nmetadata: { name: clone }\nspec:\n  source: { backup: by-volume }\n  target: { app: shop, cloneStatefulSetName: shop-copy, createStatefulSet: true }\n".into()).await?;
    restore_done(&restores, "clone").await?;
    wait_pod_ready(&pods, "shop-copy-0", 2 * MINUTE).await?;
    ensure!(
        rows("shop-copy-0").await? == "20000",
        "the clone has the rows"
    );
    println!(
        "{:>5.1} s  the clone restore completed",
        started.elapsed().as_secs_f64()
    );

    // A scale-down with a backup first, then a volume expansion. (In that order: the
    // local node expands volumes offline, so right after an expansion a new pod that
    // mounts the claim — a backup agent — waits until the app's pod stops.)
    let apps: Api<StatefulApp> = cluster.api(ns);
    let before: usize = backups.list(&ListParams::default()).await?.items.len();
    apps.patch_scale(
        "shop",
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"spec": {"replicas": 1}})),
    )
    .await?;
    wait_for("shop-1 to be removed", 4 * MINUTE, || async {
        Ok(pods.get_opt("shop-1").await?.is_none().then_some(()))
    })
    .await?;
    let by_scaling = backups
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter(|b| !b.labels().contains_key("stateward.io/schedule"))
        .filter(|b| !["by-volume", "by-exec"].contains(&b.name_any().as_str()))
        .filter(|b| b.status.as_ref().and_then(|s| s.phase) == Some(BackupPhase::Completed))
        .count();
    ensure!(
        by_scaling >= 1,
        "the scale-down took a backup first ({before} Backups before it)"
    );
    println!(
        "{:>5.1} s  scaled down to 1 after a backup",
        started.elapsed().as_secs_f64()
    );
    apply(statefulapp("32Mi", 1)).await?;
    let claims: Api<PersistentVolumeClaim> = cluster.api(ns);
    wait_for("the claim to request 32Mi", 3 * MINUTE, || async {
        let requested = claims
            .get("data-shop-0")
            .await?
            .spec
            .and_then(|s| s.resources)
            .and_then(|r| r.requests)
            .and_then(|r| r.get("storage").map(|q| q.0.clone()));
        Ok((requested.as_deref() == Some("32Mi")).then_some(()))
    })
    .await?;
    // The template follows: the StatefulSet is re-created (delete, create) by the manager.
    let sets: Api<k8s_openapi::api::apps::v1::StatefulSet> = cluster.api(ns);
    wait_for("the template to carry 32Mi", 3 * MINUTE, || async {
        let size = sets
            .get_opt("shop")
            .await?
            .and_then(|s| s.spec)
            .and_then(|s| s.volume_claim_templates)
            .and_then(|t| t.into_iter().next())
            .and_then(|t| t.spec)
            .and_then(|s| s.resources)
            .and_then(|r| r.requests)
            .and_then(|r| r.get("storage").map(|q| q.0.clone()));
        Ok((size.as_deref() == Some("32Mi")).then_some(()))
    })
    .await?;
    println!(
        "{:>5.1} s  the claim and the StatefulSet's template were expanded",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
