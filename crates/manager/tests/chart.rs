//! The Helm chart installs on the local cluster and the manager runs as a pod under the
//! chart's own ServiceAccount, without permission errors. Run with `cargo xtask test`.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::core::v1::Pod;
use kube::api::LogParams;
use kube::{Api, ResourceExt};
use stateward_api::statefulapp::StatefulApp;
use stateward_api::{Backup, BackupPhase};
use stateward_testkit::harness::{Cluster, from_yaml, install_crds, wait_for};

/// An agent-shaped Job as the manager creates them (the chart's agent image is
/// `stateward:dev` here); `extra` is appended to its pod spec.
fn agent_job(name: &str, image: &str, extra: &str) -> String {
    format!(
        "metadata: {{ name: {name}, labels: {{ app.kubernetes.io/managed-by: stateward }} }}\n\
         spec:\n  template:\n    spec:\n      restartPolicy: Never\n      serviceAccountName: stateward-agent\n\
         \x20     containers: [{{ name: agent, image: '{image}' }}]\n{extra}"
    )
}

/// What the API server answered a dry-run write: None when admitted, else (code, message).
type Answer = Option<(u16, String)>;

fn verdict<T>(result: Result<T, kube::Error>) -> Result<Answer> {
    match result {
        Ok(_) => Ok(None),
        Err(kube::Error::Api(e)) => Ok(Some((e.code, e.message.clone()))),
        Err(e) => Err(e.into()),
    }
}

/// With a real token of the manager's ServiceAccount, writes the manager never makes are
/// refused by RBAC or by the chart's manager policy (each by name), and the ones it does
/// make are admitted. Every write is a dry run: authorization and admission run in full,
/// nothing is stored.
async fn the_manager_token_is_fenced(cluster: &Cluster, ns: &str, account: &str) -> Result<()> {
    use k8s_openapi::api::apps::v1::StatefulSet;
    use k8s_openapi::api::batch::v1::Job;
    use k8s_openapi::api::coordination::v1::Lease;
    use k8s_openapi::api::core::v1::PersistentVolumeClaim;
    use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
    use kube::api::{DeleteParams, PostParams};
    let dry = PostParams {
        dry_run: true,
        ..PostParams::default()
    };
    let dry_delete = DeleteParams {
        dry_run: true,
        ..DeleteParams::default()
    };
    let manager = cluster.client_as(ns, account).await?;
    let in_ns = |kind: &str| format!("{kind} in {ns}");
    // Objects the test made as admin, for the manager to touch.
    let claims: Api<PersistentVolumeClaim> = cluster.api(ns);
    claims
        .create(
            &PostParams::default(),
            &from_yaml("metadata: { name: users-claim }\nspec: { accessModes: [ReadWriteOnce], resources: { requests: { storage: 1Mi } } }")?,
        )
        .await?;
    claims
        .create(
            &PostParams::default(),
            &from_yaml("metadata: { name: our-claim, labels: { app.kubernetes.io/managed-by: stateward } }\nspec: { accessModes: [ReadWriteOnce], resources: { requests: { storage: 1Mi } } }")?,
        )
        .await?;
    let system_leases: Api<Lease> = cluster.api("kube-system");
    let lease_name = format!("not-stateward-{}", &ns[ns.len() - 6..]);
    system_leases
        .create(
            &PostParams::default(),
            &from_yaml(&format!("metadata: {{ name: {lease_name} }}"))?,
        )
        .await?;

    let jobs: Api<Job> = Api::namespaced(manager.clone(), ns);
    let system_jobs: Api<Job> = Api::namespaced(manager.clone(), "kube-system");
    let sets: Api<StatefulSet> = Api::namespaced(manager.clone(), ns);
    let bindings: Api<RoleBinding> = Api::namespaced(manager.clone(), ns);
    let roles: Api<Role> = Api::namespaced(manager.clone(), ns);
    let leases: Api<Lease> = Api::namespaced(manager.clone(), "kube-system");
    let manager_claims: Api<PersistentVolumeClaim> = Api::namespaced(manager.clone(), ns);
    let policy = |which: &str| format!("-stateward-manager-{which}");
    let privileged_set = "metadata: { name: evil }\nspec:\n  serviceName: evil\n  selector: { matchLabels: { a: b } }\n  template:\n    metadata: { labels: { a: b } }\n    spec: { containers: [{ name: c, image: busybox, securityContext: { privileged: true } }] }\n";
    let cases: Vec<(String, Answer, &str)> = vec![
        (
            "an agent Job".into(),
            verdict(jobs.create(&dry, &from_yaml(&agent_job("ok", "stateward:dev", ""))?).await)?,
            "",
        ),
        (
            "a Job in kube-system".into(),
            verdict(system_jobs.create(&dry, &from_yaml(&agent_job("evil", "stateward:dev", ""))?).await)?,
            "RBAC",
        ),
        (
            in_ns("a Job with a foreign image"),
            verdict(jobs.create(&dry, &from_yaml(&agent_job("evil", "busybox", ""))?).await)?,
            "jobs",
        ),
        (
            in_ns("a Job with a hostPath"),
            verdict(
                jobs.create(
                    &dry,
                    &from_yaml(&agent_job(
                        "evil",
                        "stateward:dev",
                        "      volumes: [{ name: root, hostPath: { path: / } }]\n",
                    ))?,
                )
                .await,
            )?,
            "jobs",
        ),
        (
            in_ns("a StatefulSet with a privileged container"),
            verdict(sets.create(&dry, &from_yaml(privileged_set)?).await)?,
            "statefulsets",
        ),
        (
            in_ns("a RoleBinding to cluster-admin"),
            verdict(
                bindings
                    .create(
                        &dry,
                        &from_yaml(&format!("metadata: {{ name: evil }}\nroleRef: {{ apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: cluster-admin }}\nsubjects: [{{ kind: ServiceAccount, name: stateward-exec-x, namespace: {ns} }}]"))?,
                    )
                    .await,
            )?,
            // RBAC's escalation check may answer before admission does.
            "RBAC|rolebindings",
        ),
        (
            "an update of a Lease in kube-system".into(),
            verdict(
                leases
                    .replace(
                        &lease_name,
                        &dry,
                        &system_leases.get(&lease_name).await?,
                    )
                    .await,
            )?,
            "RBAC",
        ),
        (
            in_ns("a delete of an unlabelled claim"),
            verdict(manager_claims.delete("users-claim", &dry_delete).await)?,
            "objects",
        ),
        (
            in_ns("a delete of a claim Stateward labelled"),
            verdict(manager_claims.delete("our-claim", &dry_delete).await)?,
            "",
        ),
        (
            in_ns("a Role"),
            verdict(
                roles
                    .create(
                        &dry,
                        &from_yaml("metadata: { name: evil }\nrules: [{ apiGroups: [''], resources: [pods], verbs: [get] }]")?,
                    )
                    .await,
            )?,
            "RBAC",
        ),
    ];
    let _ = system_leases
        .delete(&lease_name, &DeleteParams::default())
        .await;
    let mut wrong = Vec::new();
    for (what, answer, refused_by) in &cases {
        // `refused_by`: "" (admitted), or who may refuse: "RBAC" and/or a manager policy.
        let right = match answer {
            None => refused_by.is_empty(),
            Some((403, message)) => refused_by.split('|').any(|by| match by {
                "" => false,
                "RBAC" => {
                    message.contains("forbidden") && !message.contains("ValidatingAdmissionPolicy")
                }
                which => {
                    message.contains("ValidatingAdmissionPolicy")
                        && message.contains(&policy(which))
                }
            }),
            Some(_) => false,
        };
        println!("{what}: {answer:?}");
        if !right {
            wrong.push(format!(
                "{what}: expected {}, got {answer:?}",
                if refused_by.is_empty() {
                    "admitted".to_string()
                } else {
                    format!("refused by {refused_by}")
                }
            ));
        }
    }
    ensure!(
        wrong.is_empty(),
        "the manager's token:\n{}",
        wrong.join("\n")
    );
    Ok(())
}

/// The manager's log shows no permission error. They name the ServiceAccount ("... is
/// forbidden: User \"system:serviceaccount:...\" cannot ..."); other tests' namespaces
/// being deleted meanwhile cause unrelated refusals, which do not count.
fn no_permission_errors(logs: &str) -> Result<()> {
    let errors: Vec<&str> = logs
        .lines()
        .filter(|l| {
            l.contains("system:serviceaccount") && (l.contains("forbidden") || l.contains("cannot"))
        })
        .collect();
    ensure!(
        errors.is_empty(),
        "the manager hit permission errors:\n{}",
        errors.join("\n")
    );
    Ok(())
}

#[tokio::test]
async fn chart_installs_and_the_manager_runs_as_a_pod_with_its_own_service_account() -> Result<()> {
    let cluster = Cluster::connect().await?;
    let _serial = cluster.serial().await?;
    install_crds(&cluster.client, &stateward_api::crds()).await?;
    let ns = cluster.namespace("chart").await?;
    let release = format!("sw-{}", &ns.name[ns.name.len() - 6..]);
    // Tests share one cluster: a cluster-wide manager would also act on other tests'
    // Backups (the exclusive chart test installs it cluster-wide).
    cluster
        .install_chart(&release, &ns.name, &["namespaced=true"])
        .await?;

    let pods: Api<Pod> = cluster.api(&ns.name);
    let pod = pods
        .list(&Default::default())
        .await?
        .items
        .into_iter()
        .next()
        .context("the chart created no pod")?;
    let name = pod.metadata.name.clone().context("unnamed pod")?;
    let sa = pod
        .spec
        .as_ref()
        .and_then(|s| s.service_account_name.clone())
        .unwrap_or_default();
    ensure!(
        sa == format!("{release}-stateward"),
        "the pod runs as ServiceAccount {sa:?}"
    );
    the_manager_token_is_fenced(&cluster, &ns.name, &sa).await?;
    // The scheduler works under the chart's RBAC: it fires a schedule (creating a
    // Backup), writes the app's status, and the Backup's data finalizer is removed when
    // it is deleted. The StatefulSet does not exist, so the run fails at once.
    stateward_testkit::harness::apply_yaml(
        &cluster.client,
        &ns.name,
        "apiVersion: stateward.io/v1alpha1\nkind: StatefulApp\nmetadata: { name: app }\nspec:\n  statefulSetName: missing\n  backup:\n    repository: repo\n    schedules:\n    - { name: minutely, cron: \"* * * * *\", retention: { keepLast: 1 } }\n",
        "test",
    )
    .await?;
    let backups: Api<Backup> = cluster.api(&ns.name);
    let fired = wait_for("the schedule to fire", Duration::from_secs(90), || async {
        let list = backups.list(&Default::default()).await?.items;
        Ok(list
            .into_iter()
            .find(|b| b.status.as_ref().and_then(|s| s.phase) == Some(BackupPhase::Failed)))
    })
    .await?;
    ensure!(
        fired
            .finalizers()
            .iter()
            .any(|f| f == stateward_api::common::DATA_FINALIZER),
        "a scheduled Backup carries the data finalizer"
    );
    let apps: Api<StatefulApp> = cluster.api(&ns.name);
    let state = apps
        .get("app")
        .await?
        .status
        .and_then(|s| s.backup)
        .and_then(|b| b.schedules.get("minutely").cloned())
        .context("no schedule status")?;
    ensure!(state.next_scheduled_time.is_some(), "{state:?}");
    backups
        .delete(&fired.name_any(), &Default::default())
        .await?;
    let backup_name = fired.name_any();
    wait_for(
        "the Backup to be deleted",
        Duration::from_secs(30),
        || async { Ok(backups.get_opt(&backup_name).await?.is_none().then_some(())) },
    )
    .await?;
    // Leader election works under the chart's RBAC: the log says so, and says nothing
    // about missing permissions.
    let logs = wait_for(
        "the manager to log that it leads",
        Duration::from_secs(60),
        || async {
            let logs = pods.logs(&name, &LogParams::default()).await?;
            Ok(logs.contains("leader=true").then_some(logs))
        },
    )
    .await?;
    no_permission_errors(&logs)?;
    for bad in ["cannot read CRDs", "not installed"] {
        ensure!(
            !logs.contains(bad),
            "the manager's log mentions {bad:?}:\n{logs}"
        );
    }
    // The chart's exec ClusterRole grants what the controllers expect exec agents to get,
    // and nothing more.
    let role = kube::Api::<k8s_openapi::api::rbac::v1::ClusterRole>::all(cluster.client.clone())
        .get(&format!("{release}-stateward-agent-exec"))
        .await
        .context("the chart's exec ClusterRole")?;
    ensure!(
        role.rules.clone().unwrap_or_default()
            == stateward_runtime::agent_rbac::exec_cluster_role_rules(),
        "the chart's exec ClusterRole differs from agent_rbac's: {:?}",
        role.rules
    );
    cluster.uninstall_chart(&release, &ns.name).await?;
    ns.cleanup().await
}

/// A probe StatefulSet of one replica and its StatefulApp (an exec backup of its rows),
/// with a repository in its own bucket; once its pod is ready, an on-demand Backup
/// `now`: the same in each namespace of the watchNamespaces test.
async fn app_with_a_backup(cluster: &Cluster, ns: &str) -> Result<()> {
    let bucket = cluster.bucket_and_secret(ns, "watch").await?;
    let endpoint = &cluster.env.s3_endpoint_from_pods;
    let yaml = format!(
        r#"apiVersion: stateward.io/v1alpha1
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
metadata: {{ name: shop }}
spec:
  replicas: 1
  serviceName: shop
  selector: {{ matchLabels: {{ app: shop }} }}
  template:
    metadata: {{ labels: {{ app: shop }} }}
    spec:
      terminationGracePeriodSeconds: 1
      containers:
      - name: main
        image: stateward-probe:dev
        command: [sh, -c, "seq 1 1000 > /data/rows; exec sleep 100000"]
        volumeMounts: [{{ name: data, mountPath: /data }}]
  volumeClaimTemplates:
  - metadata: {{ name: data }}
    spec:
      accessModes: [ReadWriteOnce]
      resources: {{ requests: {{ storage: 16Mi }} }}
---
apiVersion: stateward.io/v1alpha1
kind: StatefulApp
metadata: {{ name: shop }}
spec:
  statefulSetName: shop
  backup:
    repository: repo
    exec: {{ command: [sh, -c, "cat /data/rows"] }}
"#
    );
    for document in yaml.split("\n---\n") {
        stateward_testkit::harness::apply_yaml(&cluster.client, ns, document, "test").await?;
    }
    stateward_testkit::harness::wait_pod_ready(
        &cluster.api(ns),
        "shop-0",
        Duration::from_secs(120),
    )
    .await?;
    stateward_testkit::harness::apply_yaml(
        &cluster.client,
        ns,
        "apiVersion: stateward.io/v1alpha1\nkind: Backup\nmetadata: { name: now }\nspec: { app: shop, method: Exec }\n",
        "test",
    )
    .await?;
    Ok(())
}

/// `watchNamespaces: [a, b]`: the manager, bound by a RoleBinding in each, backs up
/// apps in `a` and `b`; an app in `c` is untouched (no status, no finalizer, no Job),
/// and the manager's token cannot read `c`'s Secrets. The optional features are off
/// too: their rights are gone from the manager's role, and what asks for them says so.
#[tokio::test]
async fn chart_with_watch_namespaces_and_features_off_acts_in_those_only() -> Result<()> {
    use k8s_openapi::api::batch::v1::Job;
    use k8s_openapi::api::core::v1::Secret;
    let cluster = Cluster::connect().await?;
    let _serial = cluster.serial().await?;
    install_crds(&cluster.client, &stateward_api::crds()).await?;
    let system = cluster.namespace("watchns").await?;
    let (a, b, c) = (
        cluster.namespace("team-a").await?,
        cluster.namespace("team-b").await?,
        cluster.namespace("team-c").await?,
    );
    let release = format!("sw-{}", &system.name[system.name.len() - 6..]);
    cluster
        .install_chart(
            &release,
            &system.name,
            &[
                &format!("watchNamespaces={{{},{}}}", a.name, b.name),
                "features.monitoringObjects=false",
                "features.cloneStatefulSets=false",
                "features.volumeExpansion=false",
            ],
        )
        .await?;
    for ns in [&a, &b, &c] {
        app_with_a_backup(&cluster, &ns.name).await?;
    }
    for ns in [&a, &b] {
        let backups: Api<Backup> = cluster.api(&ns.name);
        let done = wait_for(
            &format!("Backup now in {} to end", ns.name),
            Duration::from_secs(180),
            || async {
                let backup = backups.get("now").await?;
                Ok(matches!(
                    backup.status.as_ref().and_then(|s| s.phase),
                    Some(BackupPhase::Completed | BackupPhase::Failed)
                )
                .then_some(backup))
            },
        )
        .await?;
        let status = done.status.unwrap_or_default();
        ensure!(
            status.phase == Some(BackupPhase::Completed),
            "the Backup in watched namespace {}: {:?}",
            ns.name,
            status.conditions
        );
    }
    features_off_are_refused_with_a_reason(&cluster, &release, &a.name, &b.name).await?;
    // c: by now its Backup would have ended too, were it watched.
    let backup: Backup = cluster.api(&c.name).get("now").await?;
    ensure!(
        backup.status.is_none() && backup.finalizers().is_empty(),
        "the manager touched the Backup in unwatched {}: {:?} {:?}",
        c.name,
        backup.finalizers(),
        backup.status
    );
    let app: StatefulApp = cluster.api(&c.name).get("shop").await?;
    ensure!(
        app.status.is_none(),
        "the manager wrote the app's status in unwatched {}: {:?}",
        c.name,
        app.status
    );
    let jobs = cluster
        .api::<Job>(&c.name)
        .list(&Default::default())
        .await?;
    ensure!(jobs.items.is_empty(), "a Job in unwatched {}", c.name);
    // The manager's own token reads a watched namespace's Secret, not c's.
    let account = format!("{release}-stateward");
    let manager = cluster.client_as(&system.name, &account).await?;
    Api::<Secret>::namespaced(manager.clone(), &a.name)
        .get("s3")
        .await
        .context("the manager reading its repository's Secret in a watched namespace")?;
    match Api::<Secret>::namespaced(manager, &c.name).get("s3").await {
        Err(kube::Error::Api(e)) if e.code == 403 => {}
        other => anyhow::bail!(
            "the manager's token reading a Secret in unwatched {}: {other:?}",
            c.name
        ),
    }
    // Nothing it does hits a permission error (it never even tries c).
    let pods: Api<Pod> = cluster.api(&system.name);
    let pod = pods
        .list(&Default::default())
        .await?
        .items
        .into_iter()
        .next()
        .context("the chart created no pod")?;
    no_permission_errors(&pods.logs(&pod.name_any(), &LogParams::default()).await?)?;
    cluster.uninstall_chart(&release, &system.name).await?;
    for ns in [a, b, c, system] {
        ns.cleanup().await?;
    }
    Ok(())
}

/// With every optional feature off: the manager's role has none of their rights, an
/// app's `MonitoringObjects` condition says the operator turned them off, a bigger volume
/// is blocked (`FeatureDisabled`, the claim untouched), and a clone Restore that asks for
/// its StatefulSet fails with `FeatureDisabled` naming the value.
async fn features_off_are_refused_with_a_reason(
    cluster: &Cluster,
    release: &str,
    a: &str,
    b: &str,
) -> Result<()> {
    use stateward_api::{Restore, RestorePhase};
    let role = kube::Api::<k8s_openapi::api::rbac::v1::ClusterRole>::all(cluster.client.clone())
        .get(&format!("{release}-stateward-controllers"))
        .await?;
    for rule in role.rules.unwrap_or_default() {
        let groups = rule.api_groups.unwrap_or_default();
        let resources = rule.resources.unwrap_or_default();
        ensure!(
            !groups.iter().any(|g| g == "monitoring.coreos.com"),
            "monitoring objects are off, yet the role grants {resources:?}"
        );
        ensure!(
            !(resources.iter().any(|r| r == "statefulsets")
                && rule.verbs.iter().any(|v| v == "create" || v == "delete")),
            "clones and expansion are off, yet the role grants statefulsets {:?}",
            rule.verbs
        );
    }
    let apps: Api<StatefulApp> = cluster.api(a);
    wait_for(
        "MonitoringObjects to say the operator turned them off",
        Duration::from_secs(60),
        || async {
            let app = apps.get("shop").await?;
            let conditions = app.status.map(|s| s.conditions).unwrap_or_default();
            Ok(conditions
                .iter()
                .any(|c| c.type_ == "MonitoringObjects" && c.reason == "TurnedOffByOperator")
                .then_some(()))
        },
    )
    .await?;
    // A bigger volume asked of an operator without volume expansion: blocked, nothing
    // resized.
    apps.patch(
        "shop",
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(
            serde_json::json!({"spec": {"scaling": {"storage": {"size": "32Mi"}}}}),
        ),
    )
    .await?;
    wait_for(
        "ScalingBlocked to say volume expansion is off",
        Duration::from_secs(60),
        || async {
            let app = apps.get("shop").await?;
            let conditions = app.status.map(|s| s.conditions).unwrap_or_default();
            Ok(conditions
                .iter()
                .any(|c| {
                    c.type_ == "ScalingBlocked"
                        && c.reason == "FeatureDisabled"
                        && c.message.contains("features.volumeExpansion")
                })
                .then_some(()))
        },
    )
    .await?;
    let claim: k8s_openapi::api::core::v1::PersistentVolumeClaim =
        cluster.api(a).get("data-shop-0").await?;
    let requested = claim
        .spec
        .and_then(|s| s.resources)
        .and_then(|r| r.requests)
        .and_then(|r| r.get("storage").cloned())
        .map(|q| q.0);
    ensure!(
        requested.as_deref() == Some("16Mi"),
        "the claim was resized: {requested:?}"
    );
    stateward_testkit::harness::apply_yaml(
        &cluster.client,
        b,
        "apiVersion: stateward.io/v1alpha1\nkind: Restore\nmetadata: { name: clone }\nspec:\n  source: { backup: now }\n  target: { app: shop, cloneStatefulSetName: shop-copy, createStatefulSet: true }\n",
        "test",
    )
    .await?;
    let restores: Api<Restore> = cluster.api(b);
    let restore = wait_for(
        "the clone Restore to fail",
        Duration::from_secs(60),
        || async {
            let r = restores.get("clone").await?;
            Ok(
                (r.status.as_ref().and_then(|s| s.phase) == Some(RestorePhase::Failed))
                    .then_some(r),
            )
        },
    )
    .await?;
    let conditions = restore.status.map(|s| s.conditions).unwrap_or_default();
    ensure!(
        conditions
            .iter()
            .any(|c| c.reason == "FeatureDisabled"
                && c.message.contains("features.cloneStatefulSets")),
        "the clone Restore: {conditions:?}"
    );
    Ok(())
}
