//! The Helm chart installs on the local cluster and the manager runs as a pod under the
//! chart's own ServiceAccount, without permission errors. Run with `cargo xtask test`.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::core::v1::Pod;
use kube::api::LogParams;
use kube::{Api, ResourceExt};
use stateward_api::statefulapp::StatefulApp;
use stateward_api::{Backup, BackupPhase};
use stateward_testkit::harness::{Cluster, install_crds, wait_for};

#[tokio::test]
async fn chart_installs_and_the_manager_runs_as_a_pod_with_its_own_service_account() -> Result<()> {
    let cluster = Cluster::connect().await?;
    let _serial = cluster.serial().await?;
    install_crds(&cluster.client, &stateward_api::crds()).await?;
    let ns = cluster.namespace("chart").await?;
    ensure!(
        cluster.env.helm.is_file(),
        "helm is not built: run through `cargo xtask test`"
    );
    let chart = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../charts/stateward");
    let release = format!("sw-{}", &ns.name[ns.name.len() - 6..]);
    let install = tokio::process::Command::new(&cluster.env.helm)
        .args(["install", &release])
        .arg(&chart)
        .args(["--namespace", &ns.name, "--wait", "--timeout", "3m"])
        .args([
            "--set",
            "image.repository=stateward",
            "--set",
            "image.tag=dev",
        ])
        .args([
            "--set",
            "leaderElection.leaseDurationSeconds=6",
            "--set",
            "logFormat=text",
            // Tests share one cluster: a cluster-wide manager would also act on other
            // tests' Backups. The demo installs the chart cluster-wide.
            "--set",
            "namespaced=true",
        ])
        .env("KUBECONFIG", &cluster.env.kubeconfig)
        .output()
        .await?;
    ensure!(
        install.status.success(),
        "helm install failed:\n{}{}",
        String::from_utf8_lossy(&install.stdout),
        String::from_utf8_lossy(&install.stderr)
    );

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
    // Permission errors name the ServiceAccount ("... is forbidden: User
    // \"system:serviceaccount:...\" cannot ..."); other tests' namespaces being deleted
    // meanwhile cause unrelated refusals, which do not count.
    let permission_errors: Vec<&str> = logs
        .lines()
        .filter(|l| {
            l.contains("system:serviceaccount") && (l.contains("forbidden") || l.contains("cannot"))
        })
        .collect();
    ensure!(
        permission_errors.is_empty(),
        "the manager hit permission errors:\n{}",
        permission_errors.join("\n")
    );
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
    let uninstall = tokio::process::Command::new(&cluster.env.helm)
        .args(["uninstall", &release, "--namespace", &ns.name, "--wait"])
        .env("KUBECONFIG", &cluster.env.kubeconfig)
        .output()
        .await?;
    ensure!(
        uninstall.status.success(),
        "helm uninstall failed: {}",
        String::from_utf8_lossy(&uninstall.stderr)
    );
    ns.cleanup().await
}
