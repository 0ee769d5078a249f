//! Restore safety against the local cluster: a restore writes only its target app's own
//! claims, a swap that began never brings the app back on mixed data, clones never take
//! the app's traffic, and a dry run changes nothing. Run with `cargo xtask test`.

mod common;

use std::collections::BTreeSet;

use anyhow::{Result, ensure};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{DeleteParams, ListParams};
use kube::{Api, ResourceExt};
use stateward_api::{Restore, RestorePhase, StatefulApp};

use common::*;

/// Every pod's (name, uid) and every PVC's (name, resourceVersion) in the namespace.
async fn pods_and_claims(
    world: &World,
) -> Result<(BTreeSet<(String, String)>, BTreeSet<(String, String)>)> {
    let pods: Api<Pod> = world.api();
    let claims: Api<PersistentVolumeClaim> = world.api();
    let pods = pods
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter(|p| p.owner_references().iter().any(|o| o.kind == "StatefulSet"))
        .map(|p| (p.name_any(), p.uid().unwrap_or_default()))
        .collect();
    let claims = claims
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .map(|c| (c.name_any(), c.resource_version().unwrap_or_default()))
        .collect();
    Ok((pods, claims))
}

#[tokio::test]
async fn a_backup_of_another_app_is_refused_and_only_the_targets_claims_are_ever_written()
-> Result<()> {
    let world = World::new("rst-xapp").await?;
    for name in ["db", "web"] {
        world.apply(&writer(name, 1, "32Mi")).await?;
        world.apply(&app(name, name, "")).await?;
    }
    world.wait_ready("db", 1).await?;
    world.wait_ready("web", 1).await?;
    world.backup("db-b1", "db").await?;
    let db_before = world.fingerprint("db-0", "/data").await?;
    let web_before = world.fingerprint("web-0", "/data").await?;
    ensure!(db_before != web_before, "the two apps hold different data");
    let (pods_before, _) = pods_and_claims(&world).await?;

    // The careless restore: db's backup, web as the target.
    let refused = world
        .restore(
            "x-r1",
            "  source: { backup: db-b1 }\n  target: { app: web }",
        )
        .await?;
    let (_, reason, message) = ready(&refused);
    ensure!(
        phase(&refused) == Some(RestorePhase::Failed) && reason == "AppMismatch",
        "{:?}",
        ready(&refused)
    );
    ensure!(
        message.contains("StatefulApp db") && message.contains("StatefulApp web"),
        "names both apps: {message}"
    );
    ensure!(
        !world.warnings("AppMismatch").await?.is_empty(),
        "a Warning event"
    );
    ensure!(
        world.fingerprint("db-0", "/data").await? == db_before,
        "db untouched"
    );
    ensure!(
        world.fingerprint("web-0", "/data").await? == web_before,
        "web untouched"
    );
    let (pods_after, _) = pods_and_claims(&world).await?;
    ensure!(
        pods_before.iter().all(|p| pods_after.contains(p)),
        "both apps kept running, never restarted: {pods_before:?} → {pods_after:?}"
    );

    // Disaster recovery into a renamed app: allowed explicitly, and then it writes web's
    // own claim only — db keeps running on its own data.
    let db_pod: Pod = world.api().get("db-0").await?;
    let allowed = world
        .restore(
            "x-r2",
            "  source: { backup: db-b1 }\n  target: { app: web, allowOtherApp: true }",
        )
        .await?;
    ensure!(
        phase(&allowed) == Some(RestorePhase::Completed),
        "{:?}",
        ready(&allowed)
    );
    let targets: Vec<String> = allowed
        .status
        .clone()
        .unwrap_or_default()
        .volumes
        .iter()
        .map(|v| v.target.clone())
        .collect();
    ensure!(targets == ["data-web-0"], "only web's claim: {targets:?}");
    world.wait_ready("web", 1).await?;
    ensure!(
        world.fingerprint("web-0", "/data").await? == db_before,
        "web now holds db's backup"
    );
    ensure!(
        world.fingerprint("db-0", "/data").await? == db_before,
        "db untouched"
    );
    let db_after: Pod = world.api().get("db-0").await?;
    ensure!(db_after.uid() == db_pod.uid(), "db was never stopped");
    world.finish().await
}

#[tokio::test]
async fn a_swap_that_fails_after_its_first_rename_keeps_the_app_stopped_until_a_new_restore_finishes_it()
-> Result<()> {
    let config = pausing_mid_swap(10);
    let world = World::with_restore_config("rst-noreturn", config).await?;
    world.apply(&writer("nr", 1, "32Mi")).await?;
    world.apply(&app("nr", "nr", "")).await?;
    world.wait_ready("nr", 1).await?;
    let backed_up = world.fingerprint("nr-0", "/data").await?;
    world.backup("nr-b1", "nr").await?;
    world.sh("nr-0", DAMAGE).await?;
    world
        .apply("apiVersion: stateward.io/v1alpha1\nkind: Restore\nmetadata: { name: nr-r1 }\nspec:\n  source: { backup: nr-b1 }\n  target: { app: nr }")
        .await?;
    // Every swap agent (the first and each of the Job's retries) is killed right after a
    // rename, until the Job gives up: the volume is left half old, half new.
    let restores: Api<Restore> = world.api();
    let pods: Api<Pod> = world.api();
    let killed = std::cell::RefCell::new(BTreeSet::new());
    let failed =
        stateward_testkit::harness::wait_for("the swap Job gave up", 5 * MINUTE, || async {
            let restore = restores.get("nr-r1").await?;
            if phase(&restore) == Some(RestorePhase::Failed)
                || phase(&restore) == Some(RestorePhase::Completed)
            {
                return Ok(Some(restore));
            }
            let uid = restore.uid().unwrap_or_default();
            if swap_paused(&world, "nr-r1").await? {
                for pid in pids_with(&["restore-volume", "swap", uid.as_str()]) {
                    if killed.borrow_mut().insert(pid) {
                        let _ = std::process::Command::new("kill")
                            .args(["-9", &pid.to_string()])
                            .status();
                        println!("killed swap agent pid {pid}");
                    }
                }
            }
            Ok(None)
        })
        .await?;
    let (_, reason, message) = ready(&failed);
    ensure!(
        phase(&failed) == Some(RestorePhase::Failed) && reason == "SwapIncomplete",
        "{:?}",
        ready(&failed)
    );
    ensure!(
        message.contains("new Restore"),
        "says what to do: {message}"
    );
    // The app stays down: no pod comes back on the mixed volume, for as long as we look.
    for _ in 0..10 {
        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
        let sts: StatefulSet = world.api().get("nr").await?;
        ensure!(
            sts.spec.and_then(|s| s.replicas) == Some(0),
            "the app stays at zero"
        );
        ensure!(
            pods.get_opt("nr-0").await?.is_none(),
            "no app pod on mixed data"
        );
    }
    let app: StatefulApp = world.api().get("nr").await?;
    let stopped = app
        .status
        .and_then(|s| s.conditions.into_iter().find(|c| c.type_ == "Stopped"));
    ensure!(
        stopped
            .as_ref()
            .is_some_and(|c| c.status == "True" && c.message.contains("incomplete")),
        "Stopped names the incomplete swap: {stopped:?}"
    );

    // The retry: a new Restore takes the lock over, finishes the journal, restores.
    let retried = world
        .restore(
            "nr-r2",
            "  source: { backup: nr-b1 }\n  target: { app: nr }",
        )
        .await?;
    ensure!(
        phase(&retried) == Some(RestorePhase::Completed),
        "{:?}",
        ready(&retried)
    );
    world.wait_ready("nr", 1).await?;
    let after = world.fingerprint("nr-0", "/data").await?;
    ensure!(
        after == backed_up,
        "exactly the backup's data:\n{backed_up}\n{after}"
    );
    let leases: Api<Lease> = world.api();
    ensure!(
        leases
            .list(&ListParams::default())
            .await?
            .items
            .iter()
            .all(|l| !l.name_any().starts_with("stateward-sts-nr")
                && !l.name_any().starts_with("stateward-app-nr")),
        "the lock is released after the completed swap"
    );
    world.finish().await
}

#[tokio::test]
async fn a_restore_deleted_mid_swap_finishes_its_swap_before_it_goes() -> Result<()> {
    let config = pausing_mid_swap(10);
    let world = World::with_restore_config("rst-delswap", config).await?;
    world.apply(&writer("ds", 1, "32Mi")).await?;
    world.apply(&app("ds", "ds", "")).await?;
    world.wait_ready("ds", 1).await?;
    let backed_up = world.fingerprint("ds-0", "/data").await?;
    world.backup("ds-b1", "ds").await?;
    world.sh("ds-0", DAMAGE).await?;
    world
        .apply("apiVersion: stateward.io/v1alpha1\nkind: Restore\nmetadata: { name: ds-r1 }\nspec:\n  source: { backup: ds-b1 }\n  target: { app: ds }")
        .await?;
    stateward_testkit::harness::wait_for("the swap agent paused mid-swap", 3 * MINUTE, || async {
        if swap_paused(&world, "ds-r1").await? {
            return Ok(Some(()));
        }
        Ok(None)
    })
    .await?;
    // Foreground deletion deletes owned dependents first: the swap Job is not one.
    let restores: Api<Restore> = world.api();
    restores
        .delete("ds-r1", &DeleteParams::foreground())
        .await?;
    let restore = restores.get("ds-r1").await?;
    ensure!(
        restore
            .finalizers()
            .iter()
            .any(|f| f == "restores.stateward.io"),
        "the finalizer holds the Restore: {:?}",
        restore.finalizers()
    );
    stateward_testkit::harness::wait_for("the deleted Restore is gone", 4 * MINUTE, || async {
        Ok(restores.get_opt("ds-r1").await?.is_none().then_some(()))
    })
    .await?;
    world.wait_ready("ds", 1).await?;
    let after = world.fingerprint("ds-0", "/data").await?;
    ensure!(
        after == backed_up,
        "the swap finished: never a mixed volume:\n{backed_up}\n{after}"
    );
    let jobs: Api<Job> = world.api();
    ensure!(
        jobs.list(&ListParams::default().labels("stateward.io/restore=ds-r1"))
            .await?
            .items
            .is_empty(),
        "no Job left behind"
    );
    world.finish().await
}

#[tokio::test]
async fn a_clone_never_takes_the_apps_traffic_and_a_dry_run_changes_nothing() -> Result<()> {
    let world = World::new("rst-clonesvc").await?;
    world.apply(&writer("cs", 1, "32Mi")).await?;
    world
        .apply("apiVersion: v1\nkind: Service\nmetadata: { name: cs }\nspec:\n  selector: { app: cs }\n  ports: [{ port: 80 }]")
        .await?;
    world.apply(&app("cs", "cs", "")).await?;
    world.wait_ready("cs", 1).await?;
    world.backup("cs-b1", "cs").await?;

    // A dry run: the plan in status, nothing stopped, created or written.
    let before = pods_and_claims(&world).await?;
    let dry = world
        .restore(
            "cs-dry",
            "  dryRun: true\n  source: { backup: cs-b1 }\n  target: { app: cs }",
        )
        .await?;
    let (_, reason, _) = ready(&dry);
    ensure!(
        phase(&dry) == Some(RestorePhase::Completed) && reason == "DryRun",
        "{:?}",
        ready(&dry)
    );
    let plan = dry.status.clone().unwrap_or_default().plan;
    println!("dry-run plan: {plan:?}");
    ensure!(
        plan.as_ref().is_some_and(|p| p.writes.len() == 1
            && p.writes[0].target == "data-cs-0"
            && p.writes[0].bytes > 2_000_000
            && p.stops.as_deref() == Some("cs")
            && p.space.as_deref() == Some("Fits")),
        "the plan names the PVC, its bytes and the space verdict: {plan:?}"
    );
    ensure!(
        pods_and_claims(&world).await? == before,
        "pods and PVCs unchanged"
    );
    let jobs: Api<Job> = world.api();
    ensure!(
        jobs.list(&ListParams::default().labels("stateward.io/restore=cs-dry"))
            .await?
            .items
            .is_empty(),
        "no Job"
    );

    // A clone with its StatefulSet: running beside the app, never behind its Service.
    let clone = world
        .restore(
            "cs-clone",
            "  source: { backup: cs-b1 }\n  target: { app: cs, cloneStatefulSetName: cs-copy, createStatefulSet: true }",
        )
        .await?;
    ensure!(
        phase(&clone) == Some(RestorePhase::Completed),
        "{:?}",
        ready(&clone)
    );
    let clone_pods = world.wait_ready("cs-copy", 1).await?;
    let clone_ips: BTreeSet<String> = clone_pods
        .iter()
        .filter_map(|p| p.status.as_ref()?.pod_ip.clone())
        .collect();
    ensure!(!clone_ips.is_empty(), "clone pods have IPs");
    let slices: Api<EndpointSlice> = world.api();
    let endpoints = stateward_testkit::harness::wait_for(
        "the app's Service has endpoints",
        2 * MINUTE,
        || async {
            let list = slices
                .list(&ListParams::default().labels("kubernetes.io/service-name=cs"))
                .await?;
            let addresses: Vec<String> = list
                .items
                .iter()
                .flat_map(|s| s.endpoints.iter().flatten())
                .flat_map(|e| e.addresses.iter().cloned())
                .collect();
            Ok((!addresses.is_empty()).then_some(addresses))
        },
    )
    .await?;
    ensure!(
        endpoints.iter().all(|a| !clone_ips.contains(a)),
        "the app's Service never routes to the clone: {endpoints:?} vs clone {clone_ips:?}"
    );
    let app_pod: Pod = world.api().get("cs-0").await?;
    ensure!(
        app_pod
            .status
            .and_then(|s| s.pod_ip)
            .is_some_and(|ip| endpoints.contains(&ip)),
        "the app's own pod is behind it: {endpoints:?}"
    );
    world.finish().await
}

#[tokio::test]
async fn crafted_manifests_are_refused_before_anything_is_read_or_touched() -> Result<()> {
    let world = World::new("rst-manifest").await?;
    world.apply(&app("mf", "mf", "")).await?;
    let ns = world.ns.name.clone();
    let entry = |key: &str| {
        serde_json::json!({"name": "data-mf-0", "pod": "mf-0", "key": key, "encoding": "tar+zstd",
            "bytesRead": 10, "bytesStored": 5, "sha256": "0".repeat(64)})
    };
    let manifest = |namespace: &str, key: &str| {
        serde_json::json!({"formatVersion": 1, "writtenBy": "crafted", "namespace": namespace, "app": "mf",
            "backup": "b", "backupUid": "u", "method": "Volume", "startedAt": "", "completedAt": "",
            "entries": [entry(key)], "statefulSet": {}, "persistentVolumeClaims": []})
        .to_string()
        .into_bytes()
    };
    let own = format!("backups/{ns}/mf/b-u");
    // (path below the repository prefix, manifest body, what the refusal must say)
    let cases: Vec<(String, Vec<u8>, &str)> = vec![
        (format!("{ns}/mf/big-u"), vec![b' '; 5 << 20], "larger than"),
        (
            format!("{ns}/mf/b-u"),
            manifest("other-team", &format!("{own}/volumes/x")),
            "says it is of other-team/mf",
        ),
        (
            format!("{ns}/mf/b-u"),
            manifest(&ns, "backups/other-team/db/b-u/volumes/x"),
            "outside the backup's own prefix",
        ),
    ];
    for (i, (path, body, says)) in cases.into_iter().enumerate() {
        world
            .s3
            .put_object()
            .bucket(&world.bucket)
            .key(format!("backups/{path}/manifest.json"))
            .body(body.into())
            .send()
            .await?;
        let restore = world
            .restore(
                &format!("mf-r{i}"),
                &format!("  source: {{ repositoryPath: {{ repository: repo, path: {path} }} }}\n  target: {{ app: mf }}"),
            )
            .await?;
        let (_, reason, message) = ready(&restore);
        ensure!(
            phase(&restore) == Some(RestorePhase::Failed)
                && reason == "ManifestInvalid"
                && message.contains(says),
            "case {i}: {reason}: {message}"
        );
        let jobs: Api<Job> = world.api();
        ensure!(
            jobs.list(&ListParams::default()).await?.items.is_empty(),
            "case {i}: no agent ran"
        );
    }
    world.finish().await
}
