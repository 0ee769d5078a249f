//! Operations end in bounded time with a reason (issue 14), against the local cluster:
//! names of any legal length, agent pods refused by admission or quota, and restores into
//! a namespace that has never seen Stateward. Run with `cargo xtask test`.

mod common;

use anyhow::{Result, ensure};
use stateward_api::RestorePhase;

use common::*;

#[tokio::test]
async fn a_restore_and_a_backup_with_long_names_of_an_app_named_with_63_characters_complete()
-> Result<()> {
    let world = World::new("rst-long").await?;
    // Names as long as Kubernetes allows for each kind: every label and Job name derived
    // from them must still fit (a 63-character limit), or the app stays stopped.
    let app_name = format!("app-{}", "a".repeat(59));
    let backup_name = format!("backup-{}", "b".repeat(70));
    let restore_name = format!("restore.of-{}", "r".repeat(80));
    assert!(app_name.len() == 63 && backup_name.len() > 70 && restore_name.len() > 70);
    world.apply(&writer("ln", 1, "32Mi")).await?;
    world.apply(&app(&app_name, "ln", "")).await?;
    world.wait_ready("ln", 1).await?;
    let before = world.fingerprint("ln-0", "/data").await?;
    world.backup(&backup_name, &app_name).await?;
    world.sh("ln-0", DAMAGE).await?;

    let restore = world
        .restore(
            &restore_name,
            &format!("  source: {{ backup: {backup_name} }}\n  target: {{ app: {app_name} }}"),
        )
        .await?;
    ensure!(
        phase(&restore) == Some(RestorePhase::Completed),
        "{:?}",
        ready(&restore)
    );
    world.wait_ready("ln", 1).await?;
    ensure!(
        world.fingerprint("ln-0", "/data").await? == before,
        "the long-named restore brought the data back"
    );
    world.finish().await
}

/// How long the tests let an agent pod fail to start (the manager's default is minutes).
const START_BOUND: std::time::Duration = std::time::Duration::from_secs(20);

/// The bound runs from the Job's `stateward.io/created-at` stamp, an RFC 3339 time in
/// whole seconds: up to a second earlier than the Job really was created, so a run can
/// end just under the bound after the test created its object (19.98 s was seen).
const STAMP_PRECISION: std::time::Duration = std::time::Duration::from_secs(1);

fn bounded_world_configs() -> (stateward_backup::Config, stateward_restore::Config) {
    let mut backup = stateward_backup::Config::default();
    backup.runs.agent_start_timeout = START_BOUND;
    let restore = stateward_restore::Config {
        agent_start_timeout: START_BOUND,
        ..Default::default()
    };
    (backup, restore)
}

/// The writer app as a namespace enforcing Pod Security `restricted` and a quota on CPU
/// admit it: non-root with an fsGroup, no privilege escalation, no capabilities, the
/// runtime's seccomp profile, CPU requests and limits.
fn restricted_writer(name: &str) -> String {
    writer(name, 1, "32Mi")
        .replace(
            "      terminationGracePeriodSeconds: 1\n",
            "      terminationGracePeriodSeconds: 1\n      securityContext: { runAsNonRoot: true, runAsUser: 1000, runAsGroup: 1000, fsGroup: 1000, seccompProfile: { type: RuntimeDefault } }\n",
        )
        .replace(
            "        readinessProbe:",
            "        securityContext: { allowPrivilegeEscalation: false, capabilities: { drop: [ALL] } }\n        resources: { requests: { cpu: 10m }, limits: { cpu: 100m } }\n        readinessProbe:",
        )
}

/// A Backup and an in-place Restore whose agent pods the namespace refuses (`refuse`
/// applies the refusal after a first backup): each ends Failed with `AgentPodRefused`
/// and the API server's words within the bound, and the app runs again.
async fn refused_agents_fail_the_operation_and_the_app_comes_back(
    test: &str,
    refuse: impl AsyncFnOnce(&World) -> Result<()>,
    expected: &str,
) -> Result<()> {
    let (backup_config, restore_config) = bounded_world_configs();
    let world = World::with_configs(test, backup_config, restore_config).await?;
    world.apply(&restricted_writer("pr")).await?;
    world.apply(&app("pr", "pr", "")).await?;
    world.wait_ready("pr", 1).await?;
    world.backup("pr-b1", "pr").await?;
    refuse(&world).await?;

    let started = std::time::Instant::now();
    world
        .apply("apiVersion: stateward.io/v1alpha1\nkind: Backup\nmetadata: { name: pr-b2 }\nspec: { app: pr }")
        .await?;
    let backups: kube::Api<stateward_api::Backup> = world.api();
    let failed = stateward_testkit::harness::wait_for("Backup pr-b2 ends", 2 * MINUTE, || async {
        let b = backups.get("pr-b2").await?;
        Ok(b.status.clone().filter(|s| {
            matches!(
                s.phase,
                Some(stateward_api::BackupPhase::Completed | stateward_api::BackupPhase::Failed)
            )
        }))
    })
    .await?;
    let (reason, message) = failed
        .conditions
        .iter()
        .find(|c| c.type_ == "Failed")
        .map(|c| (c.reason.clone(), c.message.clone()))
        .unwrap_or_default();
    ensure!(
        failed.phase == Some(stateward_api::BackupPhase::Failed)
            && reason == "AgentPodRefused"
            && message.contains(expected),
        "{:?}",
        failed.conditions
    );
    println!("Backup failed after {:?}: {message}", started.elapsed());
    // It waited for the bound, and not for ever (generous: the machine may be busy).
    ensure!(
        started.elapsed() >= START_BOUND - STAMP_PRECISION
            && started.elapsed() < START_BOUND + 3 * MINUTE,
        "the Backup ended after {:?}",
        started.elapsed()
    );
    world.wait_ready("pr", 1).await?;

    let started = std::time::Instant::now();
    let restore = world
        .restore(
            "pr-r1",
            "  source: { backup: pr-b1 }\n  target: { app: pr }",
        )
        .await?;
    let (_, reason, message) = ready(&restore);
    ensure!(
        phase(&restore) == Some(RestorePhase::Failed)
            && reason == "AgentPodRefused"
            && message.contains(expected),
        "{reason}: {message}"
    );
    println!("Restore failed after {:?}: {message}", started.elapsed());
    ensure!(
        started.elapsed() >= START_BOUND - STAMP_PRECISION
            && started.elapsed() < START_BOUND + 3 * MINUTE,
        "the Restore ended after {:?}",
        started.elapsed()
    );
    let volumes = restore.status.clone().unwrap_or_default().volumes;
    ensure!(
        volumes.iter().all(|v| v.agent_never_started),
        "the never-started volume needs no discard: {volumes:?}"
    );
    // The app stopped for the restore comes back (its own pods pass the namespace).
    world.wait_ready("pr", 1).await?;
    world.finish().await
}

/// Agents run restricted as the data's owner, so what Pod Security refuses here is the
/// elevated mode (root with capabilities) the app opts into after its first backup.
#[tokio::test]
async fn agents_refused_by_pod_security_fail_backup_and_restore_and_the_app_runs_again()
-> Result<()> {
    refused_agents_fail_the_operation_and_the_app_comes_back(
        "rst-psa",
        async |world: &World| {
            let apps: kube::Api<stateward_api::StatefulApp> = world.api();
            apps.patch(
                "pr",
                &kube::api::PatchParams::default(),
                &kube::api::Patch::Merge(serde_json::json!({"spec": {"dataAccess": {"elevated": true}}})),
            )
            .await?;
            let namespaces: kube::Api<k8s_openapi::api::core::v1::Namespace> =
                kube::Api::all(world.cluster.client.clone());
            let patch = serde_json::json!({"metadata": {"labels": {"pod-security.kubernetes.io/enforce": "restricted"}}});
            namespaces
                .patch(
                    &world.ns.name,
                    &kube::api::PatchParams::default(),
                    &kube::api::Patch::Merge(&patch),
                )
                .await?;
            Ok(())
        },
        "PodSecurity",
    )
    .await
}

#[tokio::test]
async fn agents_refused_by_a_quota_fail_backup_and_restore_and_the_app_runs_again() -> Result<()> {
    refused_agents_fail_the_operation_and_the_app_comes_back(
        "rst-quota",
        async |world: &World| {
            world
                .apply("apiVersion: v1\nkind: ResourceQuota\nmetadata: { name: cpu }\nspec: { hard: { requests.cpu: '1', limits.cpu: '1' } }")
                .await?;
            // Admission enforces a quota only once the quota controller has written its
            // status; a pod created before that is admitted.
            let quotas: kube::Api<k8s_openapi::api::core::v1::ResourceQuota> = world.api();
            stateward_testkit::harness::wait_for("the quota to be enforced", MINUTE, || async {
                let quota = quotas.get("cpu").await?;
                Ok(quota
                    .status
                    .and_then(|s| s.hard)
                    .filter(|hard| hard.contains_key("limits.cpu"))
                    .map(|_| ()))
            })
            .await
        },
        "quota",
    )
    .await
}

#[tokio::test]
async fn a_clone_from_a_repository_path_completes_in_a_namespace_stateward_never_saw() -> Result<()>
{
    let source = World::new("rst-dr-src").await?;
    source.apply(&writer("dr", 1, "32Mi")).await?;
    source.apply(&app("dr", "dr", "")).await?;
    source.wait_ready("dr", 1).await?;
    let before = source.fingerprint("dr-0", "/data").await?;
    let backup = source.backup("dr-b1", "dr").await?;
    let path = format!(
        "{}/dr/dr-b1-{}",
        source.ns.name,
        kube::ResourceExt::uid(&backup).unwrap_or_default()
    );

    // A fresh namespace: a credentials Secret, a repository on the source's bucket that
    // may read the source namespace's backups, a StatefulApp to clone into — and no agent
    // ServiceAccount, no Role, nothing Stateward made before.
    let fresh = World::new("rst-dr-new").await?;
    fresh
        .apply(&format!(
            "apiVersion: stateward.io/v1alpha1\nkind: BackupRepository\nmetadata: {{ name: dr }}\nspec:\n  allowRestoreFromNamespaces: [{}]\n  s3:\n    bucket: {}\n    prefix: backups\n    endpoint: \"{}\"\n    forcePathStyle: true\n    credentials:\n      accessKeyId: {{ name: s3, key: accessKeyId }}\n      secretAccessKey: {{ name: s3, key: secretAccessKey }}\n",
            source.ns.name, source.bucket, source.cluster.env.s3_endpoint_from_pods
        ))
        .await?;
    fresh.apply(&app("dr", "dr", "")).await?;
    let accounts: kube::Api<k8s_openapi::api::core::v1::ServiceAccount> = fresh.api();
    ensure!(
        accounts.get_opt("stateward-agent").await?.is_none(),
        "the namespace starts without the agent ServiceAccount"
    );
    let restore = fresh
        .restore(
            "dr-clone",
            &format!("  source: {{ repositoryPath: {{ repository: dr, path: {path} }} }}\n  target: {{ app: dr, cloneStatefulSetName: dr, createStatefulSet: true }}"),
        )
        .await?;
    ensure!(
        phase(&restore) == Some(RestorePhase::Completed),
        "{:?}",
        ready(&restore)
    );
    fresh.wait_ready("dr", 1).await?;
    ensure!(
        fresh.fingerprint("dr-0", "/data").await? == before,
        "the clone in the fresh namespace has the source's data"
    );
    fresh.finish().await?;
    source.finish().await
}

#[tokio::test]
async fn a_second_statefulapp_on_one_statefulset_is_already_managed_and_a_copied_parent_token_waits()
-> Result<()> {
    let world = World::new("rst-owner").await?;
    world.apply(&writer("own", 1, "32Mi")).await?;
    world.apply(&app("own", "own", "")).await?;
    world.wait_ready("own", 1).await?;
    // A second StatefulApp naming the same StatefulSet, created later.
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    world.apply(&app("own-again", "own", "")).await?;
    let apps: kube::Api<stateward_api::StatefulApp> = world.api();
    let blocked = stateward_testkit::harness::wait_for("AlreadyManaged", MINUTE, || async {
        let a = apps.get("own-again").await?;
        Ok(a.status
            .unwrap_or_default()
            .conditions
            .into_iter()
            .find(|c| c.reason == "AlreadyManaged" && c.status == "True"))
    })
    .await?;
    ensure!(
        blocked.message.contains("StatefulApp own "),
        "names the owner: {}",
        blocked.message
    );
    world
        .apply("apiVersion: stateward.io/v1alpha1\nkind: Backup\nmetadata: { name: through-second }\nspec: { app: own-again }")
        .await?;
    let backups: kube::Api<stateward_api::Backup> = world.api();
    let refused = stateward_testkit::harness::wait_for("the Backup ends", MINUTE, || async {
        let b = backups.get("through-second").await?;
        Ok(b.status
            .filter(|s| s.phase == Some(stateward_api::BackupPhase::Failed)))
    })
    .await?;
    ensure!(
        refused
            .conditions
            .iter()
            .any(|c| c.type_ == "Failed" && c.reason == "AlreadyManaged"),
        "{:?}",
        refused.conditions
    );
    let jobs: kube::Api<k8s_openapi::api::batch::v1::Job> = world.api();
    ensure!(
        jobs.list(&Default::default()).await?.items.is_empty(),
        "no agent ran for the second app"
    );
    // The first app still works.
    world.backup("own-b1", "own").await?;

    // Another operation holds the lock; a Backup that copies its token into the parent
    // annotation waits like any other, then runs once the lock is free.
    let (lock, record) = hold_lock(&world, "parent-op", "own").await?;
    world
        .apply(&format!(
            "apiVersion: stateward.io/v1alpha1\nkind: Backup\nmetadata:\n  name: copied-token\n  annotations: {{ stateward.io/parent-operation-token: \"{}\" }}\nspec: {{ app: own }}",
            record.token
        ))
        .await?;
    let waiting =
        stateward_testkit::harness::wait_for("the Backup waits for the lock", MINUTE, || async {
            let b = backups.get("copied-token").await?;
            Ok(b.status.filter(|s| {
                s.conditions
                    .iter()
                    .any(|c| c.type_ == "LockAcquired" && c.reason == "WaitingForLock")
            }))
        })
        .await?;
    ensure!(
        waiting.phase == Some(stateward_api::BackupPhase::Pending),
        "{waiting:?}"
    );
    lock.release(&record.token).await?;
    let done = stateward_testkit::harness::wait_for(
        "the Backup runs after the release",
        2 * MINUTE,
        || async {
            let b = backups.get("copied-token").await?;
            Ok(b.status
                .filter(|s| s.phase == Some(stateward_api::BackupPhase::Completed)))
        },
    )
    .await?;
    ensure!(done.phase == Some(stateward_api::BackupPhase::Completed));
    world.finish().await
}

#[tokio::test]
async fn a_backup_that_cannot_get_the_lock_fails_after_the_bound_naming_the_holder() -> Result<()> {
    let mut backup_config = stateward_backup::Config::default();
    backup_config.runs.lock_wait = std::time::Duration::from_secs(10);
    let world = World::with_configs(
        "rst-lockwait",
        backup_config,
        stateward_restore::Config::default(),
    )
    .await?;
    world.apply(&writer("lw", 1, "32Mi")).await?;
    world.apply(&app("lw", "lw", "")).await?;
    world.wait_ready("lw", 1).await?;
    let (lock, record) = hold_lock(&world, "long-op", "lw").await?;
    world
        .apply("apiVersion: stateward.io/v1alpha1\nkind: Backup\nmetadata: { name: lw-b1 }\nspec: { app: lw }")
        .await?;
    let backups: kube::Api<stateward_api::Backup> = world.api();
    let failed = stateward_testkit::harness::wait_for("the Backup gives up", MINUTE, || async {
        let b = backups.get("lw-b1").await?;
        Ok(b.status
            .filter(|s| s.phase == Some(stateward_api::BackupPhase::Failed)))
    })
    .await?;
    let condition = failed
        .conditions
        .iter()
        .find(|c| c.type_ == "Failed")
        .map(|c| (c.reason.clone(), c.message.clone()))
        .unwrap_or_default();
    ensure!(
        condition.0 == "LockWaitExceeded" && condition.1.contains("ConfigMap long-op"),
        "{condition:?}"
    );
    lock.release(&record.token).await?;
    world.finish().await
}
