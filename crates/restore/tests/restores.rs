//! The restore controller end to end against the local cluster: real API server and
//! kube-controller-manager, real S3 (versitygw), the real agent in Jobs, and the backup
//! and scaling controllers running beside it as the manager runs them. Run with
//! `cargo xtask test`.

mod common;

use anyhow::{Context as _, Result, ensure};
use aws_sdk_s3::primitives::ByteStream;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use kube::api::DeleteParams;
use kube::{Api, ResourceExt};
use stateward_api::{Backup, RestorePhase};

use common::*;

#[tokio::test]
async fn in_place_restores_every_byte_of_two_replicas_and_brings_the_app_back() -> Result<()> {
    let world = World::new("rst-inplace").await?;
    world.apply(&writer("ip", 2, "64Mi")).await?;
    world.apply(&app("ip", "ip", "")).await?;
    world.wait_ready("ip", 2).await?;
    let before = [
        world.fingerprint("ip-0", "/data").await?,
        world.fingerprint("ip-1", "/data").await?,
    ];
    ensure!(
        before[0].contains("./db/rows.hard F 644 2"),
        "hard link in the fixture: {}",
        before[0]
    );
    let claims_before = claim_uids(&world, "ip").await?;
    world.backup("ip-b1", "ip").await?;

    for pod in ["ip-0", "ip-1"] {
        world.sh(pod, DAMAGE).await?;
    }
    ensure!(
        world.fingerprint("ip-0", "/data").await? != before[0],
        "the damage shows"
    );

    let restore = world
        .restore(
            "ip-r1",
            "  source: { backup: ip-b1 }\n  target: { app: ip }",
        )
        .await?;
    ensure!(
        phase(&restore) == Some(RestorePhase::Completed),
        "{:?}",
        ready(&restore)
    );
    let status = restore.status.clone().unwrap_or_default();
    ensure!(status.verified, "verified: {status:?}");
    ensure!(
        status.volumes.len() == 2
            && status
                .volumes
                .iter()
                .all(|v| v.phase == "Completed" && v.verified),
        "{:?}",
        status.volumes
    );
    println!(
        "restore took {:?}; volumes {:?}",
        status.duration, status.volumes
    );

    let pods = world.wait_ready("ip", 2).await?;
    ensure!(pods.len() == 2);
    let after = [
        world.fingerprint("ip-0", "/data").await?,
        world.fingerprint("ip-1", "/data").await?,
    ];
    ensure!(
        after == before,
        "restored tree differs:\nbefore {}\nafter  {}",
        before[0],
        after[0]
    );
    ensure!(
        !after[0].contains("./added"),
        "a file added after the backup is gone"
    );
    ensure!(
        claim_uids(&world, "ip").await? == claims_before,
        "the same PVC objects"
    );
    let sts: StatefulSet = world.api().get("ip").await?;
    ensure!(
        sts.spec.and_then(|s| s.replicas) == Some(2),
        "back at 2 replicas"
    );
    let text = world.metrics.encode();
    ensure!(
        text.contains("stateward_restore_runs_total{result=\"completed\"} 1"),
        "{text}"
    );
    world.finish().await
}

#[tokio::test]
async fn a_clone_from_a_repository_path_fills_fresh_volumes_and_never_touches_the_source()
-> Result<()> {
    let world = World::new("rst-clone").await?;
    world.apply(&writer("src", 2, "32Mi")).await?;
    world.apply(&app("src", "src", "")).await?;
    let source_pods = world.wait_ready("src", 2).await?;
    let before = world.fingerprint("src-1", "/data").await?;
    let backup = world.backup("src-b1", "src").await?;
    let path = format!(
        "{}/src/src-b1-{}",
        world.ns.name,
        backup.uid().unwrap_or_default()
    );
    // The Backup object goes (its data stays: Retain), as after a cluster loss.
    let backups: Api<Backup> = world.api();
    backups.delete("src-b1", &DeleteParams::default()).await?;

    let restore = world
        .restore(
            "src-clone",
            &format!("  source: {{ repositoryPath: {{ repository: repo, path: {path} }} }}\n  target: {{ app: src, cloneStatefulSetName: copy, createStatefulSet: true }}"),
        )
        .await?;
    ensure!(
        phase(&restore) == Some(RestorePhase::Completed),
        "{:?}",
        ready(&restore)
    );
    ensure!(restore.status.as_ref().and_then(|s| s.backup_path.clone()) == Some(path.clone()));
    let claims: Api<PersistentVolumeClaim> = world.api();
    let clone_claim = claims.get("data-copy-1").await?;
    ensure!(
        clone_claim.owner_references().is_empty(),
        "clone PVCs are not owned by the Restore"
    );
    world.wait_ready("copy", 2).await?;
    let cloned = world.fingerprint("copy-1", "/data").await?;
    ensure!(cloned == before, "clone differs:\n{before}\n{cloned}");
    // The source never stopped: same pods, no restarts.
    let pods: Api<Pod> = world.api();
    for pod in &source_pods {
        let now = pods.get(&pod.name_any()).await?;
        ensure!(now.uid() == pod.uid(), "{} was replaced", pod.name_any());
    }
    let sts: StatefulSet = world.api().get("copy").await?;
    ensure!(
        sts.spec.as_ref().map(|s| s
            .selector
            .match_labels
            .clone()
            .unwrap_or_default()
            .contains_key("stateward.io/clone"))
            == Some(true),
        "the clone's selector is its own"
    );

    // The same backup imported as a Backup object again: completed from its manifest,
    // nothing runs; another namespace's path is refused.
    world
        .apply(&format!(
            "apiVersion: stateward.io/v1alpha1\nkind: Backup\nmetadata: {{ name: src-imported }}\nspec: {{ app: src, repository: repo, importPath: {path} }}\n---\napiVersion: stateward.io/v1alpha1\nkind: Backup\nmetadata: {{ name: foreign-import }}\nspec: {{ app: src, repository: repo, importPath: other-team/db/db-1-abc }}"
        ))
        .await?;
    let imported = stateward_testkit::harness::wait_for("the import", MINUTE, || async {
        Ok(backups
            .get("src-imported")
            .await?
            .status
            .filter(|s| s.phase.is_some()))
    })
    .await?;
    ensure!(
        imported.phase == Some(stateward_api::BackupPhase::Completed),
        "{imported:?}"
    );
    ensure!(
        imported.volumes.len() == 2 && imported.stored_bytes.unwrap_or(0) > 0,
        "{imported:?}"
    );
    ensure!(
        imported
            .location
            .as_deref()
            .is_some_and(|l| l.ends_with(&path)),
        "{:?}",
        imported.location
    );
    let foreign = stateward_testkit::harness::wait_for("the foreign import", MINUTE, || async {
        Ok(backups
            .get("foreign-import")
            .await?
            .status
            .filter(|s| s.phase.is_some()))
    })
    .await?;
    ensure!(
        foreign
            .conditions
            .iter()
            .any(|c| c.type_ == "Failed" && c.reason == "CrossNamespaceRefused"),
        "{foreign:?}"
    );

    // Another namespace's path without the repository's permission: refused.
    let refused = world
        .restore(
            "foreign",
            "  source: { repositoryPath: { repository: repo, path: other-team/db/db-1-abc } }\n  target: { app: src, cloneStatefulSetName: foreign }",
        )
        .await?;
    let (_, reason, message) = ready(&refused);
    ensure!(
        phase(&refused) == Some(RestorePhase::Failed) && reason == "CrossNamespaceRefused",
        "{reason}: {message}"
    );
    ensure!(message.contains("allowRestoreFromNamespaces"), "{message}");
    ensure!(
        claims.get_opt("data-foreign-0").await?.is_none(),
        "nothing created"
    );
    world.finish().await
}

#[tokio::test]
async fn a_flipped_byte_or_a_crafted_archive_fails_and_leaves_the_old_data_and_a_running_app()
-> Result<()> {
    let world = World::new("rst-damage").await?;
    world.apply(&writer("dm", 1, "32Mi")).await?;
    world.apply(&app("dm", "dm", "")).await?;
    world.wait_ready("dm", 1).await?;
    let backup = world.backup("dm-b1", "dm").await?;
    let key = backup_keys(&backup)?.remove(0);
    world.sh("dm-0", DAMAGE).await?;
    let damaged = world.fingerprint("dm-0", "/data").await?;

    // 1. One byte flipped in the middle of the stored object.
    let original = world
        .s3
        .get_object()
        .bucket(&world.bucket)
        .key(&key)
        .send()
        .await?
        .body
        .collect()
        .await?
        .into_bytes()
        .to_vec();
    let mut flipped = original.clone();
    let middle = flipped.len() / 2;
    flipped[middle] ^= 0x01;
    world
        .s3
        .put_object()
        .bucket(&world.bucket)
        .key(&key)
        .body(ByteStream::from(flipped))
        .send()
        .await?;
    let restore = world
        .restore(
            "dm-flip",
            "  source: { backup: dm-b1 }\n  target: { app: dm }",
        )
        .await?;
    let (_, reason, message) = ready(&restore);
    ensure!(
        phase(&restore) == Some(RestorePhase::Failed) && reason == "ChecksumMismatch",
        "{reason}: {message}"
    );
    ensure!(message.contains("checksum mismatch"), "{message}");
    world.wait_ready("dm", 1).await?;
    ensure!(
        world.fingerprint("dm-0", "/data").await? == damaged,
        "the volume is exactly as before the failed restore"
    );
    ensure!(
        !world.warnings("ChecksumMismatch").await?.is_empty(),
        "a Warning event"
    );

    // 2. A crafted archive: `../escaped` (the manifest's checksums rewritten to match, so
    //    only the path check stands between it and the node).
    let mut tar = Vec::new();
    {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::Regular);
        header.set_size(4);
        header.set_mode(0o644);
        let name = b"../escaped-stateward";
        header.as_old_mut().name[..name.len()].copy_from_slice(name);
        header.set_cksum();
        let mut builder = tar::Builder::new(&mut tar);
        builder.append(&header, &b"evil"[..])?;
        builder.finish()?;
    }
    let content_sha = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&tar));
    let stored = zstd::stream::encode_all(&tar[..], 3)?;
    let stored_sha = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&stored));
    world
        .s3
        .put_object()
        .bucket(&world.bucket)
        .key(&key)
        .body(ByteStream::from(stored))
        .send()
        .await?;
    let prefix = backup
        .status
        .as_ref()
        .and_then(|s| s.location.clone())
        .context("location")?;
    let manifest_key = format!("{prefix}/manifest.json");
    let manifest = world
        .s3
        .get_object()
        .bucket(&world.bucket)
        .key(&manifest_key)
        .send()
        .await?
        .body
        .collect()
        .await?
        .into_bytes();
    let mut manifest: serde_json::Value = serde_json::from_slice(&manifest)?;
    manifest["entries"][0]["sha256"] = serde_json::json!(stored_sha);
    manifest["entries"][0]["contentSha256"] = serde_json::json!(content_sha);
    manifest["entries"][0]["files"] = serde_json::json!(1);
    world
        .s3
        .put_object()
        .bucket(&world.bucket)
        .key(&manifest_key)
        .body(ByteStream::from(serde_json::to_vec(&manifest)?))
        .send()
        .await?;
    let restore = world
        .restore(
            "dm-crafted",
            "  source: { backup: dm-b1 }\n  target: { app: dm }",
        )
        .await?;
    let (_, reason, message) = ready(&restore);
    ensure!(
        phase(&restore) == Some(RestorePhase::Failed) && reason == "ArchiveRefused",
        "{reason}: {message}"
    );
    ensure!(message.contains("escaped-stateward"), "{message}");
    world.wait_ready("dm", 1).await?;
    ensure!(
        world.fingerprint("dm-0", "/data").await? == damaged,
        "untouched"
    );
    ensure!(
        !std::path::Path::new("/escaped-stateward").exists(),
        "nothing written outside the volume"
    );
    let text = world.metrics.encode();
    ensure!(
        text.contains("stateward_restore_runs_total{result=\"failed\"} 2"),
        "{text}"
    );
    world.finish().await
}

#[tokio::test]
async fn bad_input_names_the_problem_and_touches_nothing() -> Result<()> {
    let world = World::new("rst-bad").await?;
    world.apply(&writer("bad", 1, "16Mi")).await?;
    world.apply(&app("bad", "bad", "")).await?;
    let pods = world.wait_ready("bad", 1).await?;
    // 10 MB of incompressible data in a 16Mi volume: a backup fits, a restore beside the
    // old data does not.
    world
        .sh("bad-0", "head -c 9000000 /dev/urandom > /data/big.bin")
        .await?;
    world.backup("bad-b1", "bad").await?;
    let fingerprint = world.fingerprint("bad-0", "/data").await?;

    // Missing backup, missing app.
    let r = world
        .restore(
            "no-backup",
            "  source: { backup: nope }\n  target: { app: bad }",
        )
        .await?;
    ensure!(
        ready(&r).1 == "BackupNotFound" && ready(&r).2.contains("nope (spec.source.backup)"),
        "{:?}",
        ready(&r)
    );
    let r = world
        .restore(
            "no-app",
            "  source: { backup: bad-b1 }\n  target: { app: ghost }",
        )
        .await?;
    ensure!(
        ready(&r).1 == "AppNotFound" && ready(&r).2.contains("ghost (spec.target.app)"),
        "{:?}",
        ready(&r)
    );

    // A Backup that did not complete (its app's StatefulSet does not exist).
    world.apply(&app("broken", "missing-sts", "")).await?;
    world.apply("apiVersion: stateward.io/v1alpha1\nkind: Backup\nmetadata: { name: broken-b1 }\nspec: { app: broken }").await?;
    let backups: Api<Backup> = world.api();
    stateward_testkit::harness::wait_for("broken-b1 failed", MINUTE, || async {
        Ok(backups
            .get("broken-b1")
            .await?
            .status
            .and_then(|s| s.phase)
            .filter(|p| *p == stateward_api::BackupPhase::Failed))
    })
    .await?;
    let r = world
        .restore(
            "not-completed",
            "  source: { backup: broken-b1 }\n  target: { app: bad }",
        )
        .await?;
    ensure!(ready(&r).1 == "BackupNotCompleted", "{:?}", ready(&r));

    // Another operation holds the app's lock: the restore waits and says so.
    let (lock, record) = hold_lock(&world, "other-op", "bad").await?;
    world.apply("apiVersion: stateward.io/v1alpha1\nkind: Restore\nmetadata: { name: waits }\nspec:\n  source: { backup: bad-b1 }\n  target: { app: bad }").await?;
    let restores: Api<stateward_api::Restore> = world.api();
    let waiting =
        stateward_testkit::harness::wait_for("the restore waits for the lock", MINUTE, || async {
            let r = restores.get("waits").await?;
            Ok((ready(&r).1 == "LockBusy").then_some(r))
        })
        .await?;
    ensure!(
        ready(&waiting).2.contains("ConfigMap other-op"),
        "{:?}",
        ready(&waiting)
    );
    let pod: Pod = world.api().get("bad-0").await?;
    ensure!(
        pod.uid() == pods[0].uid(),
        "the app was not stopped while waiting"
    );
    lock.release(&record.token).await?;

    // ... and then runs into the free-space check: refused, nothing touched.
    let r = world.wait_restore("waits").await?;
    let (_, reason, message) = ready(&r);
    ensure!(reason == "NotEnoughSpace", "{reason}: {message}");
    ensure!(message.contains("grow the volume"), "{message}");
    world.wait_ready("bad", 1).await?;
    ensure!(
        world.fingerprint("bad-0", "/data").await? == fingerprint,
        "untouched"
    );
    world.finish().await
}

/// The examples' StatefulSets, as a user applies them.
#[tokio::test]
async fn a_postgres_dump_streams_back_through_psql_and_its_rows_return() -> Result<()> {
    let world = World::new("rst-pg").await?;
    world.apply(&example("postgres.yaml")?).await?;
    // The recipe of docs/restore.md: a dump that drops what it recreates, loaded by psql.
    // The example's own recipe: Volume backups on schedule, and a logical dump (a Backup
    // with `method: Exec`) that psql loads into the running server.
    world.apply(&world.repository("default", "")).await?;
    world.apply(&example("postgres-app.yaml")?).await?;
    world.wait_ready("postgres", 1).await?;
    let psql = |sql: &str| format!("psql -U postgres -d postgres -tAc \"{sql}\"");
    world
        .sh("postgres-0", &psql("CREATE TABLE orders (id int primary key, note text); INSERT INTO orders SELECT g, 'order ' || g FROM generate_series(1, 5000) g"))
        .await?;
    let sum_before = world
        .sh(
            "postgres-0",
            &psql("SELECT count(*), sum(id), md5(string_agg(note, ',' ORDER BY id)) FROM orders"),
        )
        .await?;
    world
        .backup_with("pg-dump", "{ app: postgres, method: Exec }")
        .await?;
    world.sh("postgres-0", &psql("DELETE FROM orders WHERE id > 10; INSERT INTO orders VALUES (99999, 'after the backup')")).await?;
    let pod_before: Pod = world.api().get("postgres-0").await?;

    let restore = world
        .restore(
            "pg-restore",
            "  source: { backup: pg-dump }\n  target: { app: postgres }",
        )
        .await?;
    ensure!(
        phase(&restore) == Some(RestorePhase::Completed),
        "{:?}",
        ready(&restore)
    );
    let status = restore.status.clone().unwrap_or_default();
    ensure!(
        status.mode == Some(stateward_api::restore::RestoreMode::Exec) && status.verified,
        "{status:?}"
    );
    let sum_after = world
        .sh(
            "postgres-0",
            &psql("SELECT count(*), sum(id), md5(string_agg(note, ',' ORDER BY id)) FROM orders"),
        )
        .await?;
    ensure!(
        sum_after == sum_before,
        "rows: before {sum_before}, after {sum_after}"
    );
    let pod_after: Pod = world.api().get("postgres-0").await?;
    ensure!(
        pod_after.uid() == pod_before.uid(),
        "an exec restore keeps the app running"
    );
    world.finish().await
}

#[tokio::test]
async fn a_redis_rdb_is_placed_as_dump_rdb_and_its_keys_return_after_the_restart() -> Result<()> {
    let world = World::new("rst-redis").await?;
    world.apply(&example("redis.yaml")?).await?;
    // The example's own recipe (examples/redis-app.yaml): the dump through a file, put
    // back as the base of redis's append-only file with the manifest that names it.
    world.apply(&world.repository("default", "")).await?;
    world.apply(&example("redis-app.yaml")?).await?;
    world.wait_ready("redis", 1).await?;
    world
        .sh("redis-0", "for i in $(seq 1 200); do echo \"SET key:$i value-$i\"; done | redis-cli > /dev/null && redis-cli SET greeting 'hello from stateward'")
        .await?;
    world.backup("redis-rdb", "redis").await?;
    world
        .sh(
            "redis-0",
            "redis-cli FLUSHALL && redis-cli SET after backup",
        )
        .await?;

    let restore = world
        .restore(
            "redis-restore",
            "  source: { backup: redis-rdb }\n  target: { app: redis }",
        )
        .await?;
    ensure!(
        phase(&restore) == Some(RestorePhase::Completed),
        "{:?}",
        ready(&restore)
    );
    world.wait_ready("redis", 1).await?;
    let greeting = world.sh("redis-0", "redis-cli GET greeting").await?;
    ensure!(
        greeting.trim() == "hello from stateward",
        "GET greeting = {greeting:?}"
    );
    let keys = world.sh("redis-0", "redis-cli DBSIZE").await?;
    ensure!(keys.trim() == "201", "DBSIZE = {keys}");
    let after = world.sh("redis-0", "redis-cli EXISTS after").await?;
    ensure!(
        after.trim() == "0",
        "the key written after the backup is gone"
    );
    world.finish().await
}

/// Pids of local processes whose command line holds every one of `parts` (the local node
/// runs pods as processes on this machine).
#[tokio::test]
async fn an_agent_killed_in_the_middle_of_the_swap_is_retried_and_its_journal_finishes_it()
-> Result<()> {
    let config = pausing_mid_swap(15);
    let world = World::with_restore_config("rst-kill", config).await?;
    world.apply(&writer("kl", 1, "32Mi")).await?;
    world.apply(&app("kl", "kl", "")).await?;
    world.wait_ready("kl", 1).await?;
    let before = world.fingerprint("kl-0", "/data").await?;
    world.backup("kl-b1", "kl").await?;
    world.sh("kl-0", DAMAGE).await?;
    world
        .apply("apiVersion: stateward.io/v1alpha1\nkind: Restore\nmetadata: { name: kl-r1 }\nspec:\n  source: { backup: kl-b1 }\n  target: { app: kl }")
        .await?;
    // The swap agent pauses after its first rename: the volume is half old, half new.
    let restores: Api<stateward_api::Restore> = world.api();
    let pid = stateward_testkit::harness::wait_for(
        "the swap agent paused mid-swap",
        3 * MINUTE,
        || async {
            let uid = restores.get("kl-r1").await?.uid().unwrap_or_default();
            if !swap_paused(&world, "kl-r1").await? {
                return Ok(None);
            }
            Ok(pids_with(&["restore-volume", "swap", uid.as_str()])
                .first()
                .copied())
        },
    )
    .await?;
    let killed = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()?;
    ensure!(killed.success(), "kill -9 {pid}");
    println!("killed the swap agent (pid {pid}) in the middle of the swap");

    let restore = world.wait_restore("kl-r1").await?;
    ensure!(
        phase(&restore) == Some(RestorePhase::Completed),
        "{:?}",
        ready(&restore)
    );
    let volumes = restore.status.clone().unwrap_or_default().volumes;
    ensure!(
        volumes.first().is_some_and(|v| v.recovered && v.verified),
        "the retry finished the journaled swap: {volumes:?}"
    );
    world.wait_ready("kl", 1).await?;
    let after = world.fingerprint("kl-0", "/data").await?;
    ensure!(after == before, "never a mixed volume:\n{before}\n{after}");
    world.finish().await
}
