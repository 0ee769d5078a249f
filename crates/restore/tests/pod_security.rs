//! Agents that pass Pod Security `restricted` and run as the data's owner, judged by the
//! API server's admission and by the local node's record of every process it started
//! (uid, no_new_privs, capabilities). Run with `cargo xtask test`.

mod common;

use anyhow::{Result, ensure};
use common::*;
use kube::api::{Patch, PatchParams};
use stateward_api::RestorePhase;
use stateward_testkit::node::privileges::{ProcessRecord, records};

/// What the node recorded of the agent containers started in this test's namespace.
fn agent_records(world: &World) -> Vec<ProcessRecord> {
    records(&world.cluster.env.state_dir.join("node"), &world.ns.name)
        .into_iter()
        .filter(|r| r.container == "agent" && !r.exec)
        .collect()
}

async fn enforce_restricted(world: &World) -> Result<()> {
    let namespaces: kube::Api<k8s_openapi::api::core::v1::Namespace> =
        kube::Api::all(world.cluster.client.clone());
    namespaces
        .patch(
            &world.ns.name,
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"metadata": {"labels": {
                "pod-security.kubernetes.io/enforce": "restricted"
            }}})),
        )
        .await?;
    Ok(())
}

async fn completed(world: &World, name: &str, spec: &str) -> Result<()> {
    let restore = world.restore(name, spec).await?;
    ensure!(
        phase(&restore) == Some(RestorePhase::Completed),
        "restore {name}: {:?}",
        ready(&restore)
    );
    Ok(())
}

/// The restricted examples in a namespace that enforces `restricted`: redis (exec and
/// volume backups, an in-place restore of its dump) and postgres (volume and exec
/// backups, an in-place restore, a clone). Every agent passed admission, and the node saw
/// each run as a non-root user with no_new_privs and no capability.
#[tokio::test]
async fn restricted_examples_back_up_restore_and_clone_with_restricted_agents() -> Result<()> {
    let world = World::new("psa-examples").await?;
    enforce_restricted(&world).await?;
    world.apply(&world.repository("default", "")).await?;
    world.apply(&example("redis.yaml")?).await?;
    world.apply(&example("redis-app.yaml")?).await?;
    world.apply(&example("postgres-restricted.yaml")?).await?;
    world.apply(&example("postgres-app.yaml")?).await?;
    world.wait_ready("redis", 1).await?;
    world.wait_ready("postgres", 1).await?;

    world
        .sh("redis-0", "redis-cli SET greeting restricted")
        .await?;
    let psql = |sql: &str| format!("psql -U postgres -d postgres -tAc \"{sql}\"");
    world
        .sh(
            "postgres-0",
            &psql("CREATE TABLE t (id int); INSERT INTO t SELECT generate_series(1, 1000)"),
        )
        .await?;
    world.backup("redis-dump", "redis").await?;
    world
        .backup_with("redis-files", "{ app: redis, method: Volume }")
        .await?;
    world
        .backup_with("pg-files", "{ app: postgres, method: Volume }")
        .await?;
    world
        .backup_with("pg-dump", "{ app: postgres, method: Exec }")
        .await?;

    world.sh("redis-0", "redis-cli FLUSHALL").await?;
    completed(
        &world,
        "redis-back",
        "  source: { backup: redis-dump }\n  target: { app: redis }",
    )
    .await?;
    world.wait_ready("redis", 1).await?;
    let greeting = world.sh("redis-0", "redis-cli GET greeting").await?;
    ensure!(
        greeting.trim() == "restricted",
        "GET greeting = {greeting:?}"
    );

    // The volume backup in place, then the dump streamed back through psql by a
    // restricted exec agent: each brings the 1000 rows back.
    for (restore, backup) in [("pg-back", "pg-files"), ("pg-dump-back", "pg-dump")] {
        world.sh("postgres-0", &psql("DELETE FROM t")).await?;
        completed(
            &world,
            restore,
            &format!("  source: {{ backup: {backup} }}\n  target: {{ app: postgres }}"),
        )
        .await?;
        world.wait_ready("postgres", 1).await?;
        let rows = world
            .sh("postgres-0", &psql("SELECT count(*) FROM t"))
            .await?;
        ensure!(rows.trim() == "1000", "rows after {restore}: {rows:?}");
    }
    completed(
        &world,
        "pg-clone",
        "  source: { backup: pg-files }\n  target: { app: postgres, cloneStatefulSetName: pgcopy }",
    )
    .await?;

    let agents = agent_records(&world);
    ensure!(
        agents.len() >= 6,
        "the node recorded {} agent processes: {agents:?}",
        agents.len()
    );
    for agent in &agents {
        ensure!(
            agent.uid != 0 && agent.no_new_privs && agent.capabilities.is_empty(),
            "an agent ran with privileges: {agent:?}"
        );
    }
    // Volume agents ran as the apps' user, not as the image's.
    ensure!(
        agents.iter().filter(|a| a.uid == 999).count() >= 3,
        "volume agents as uid 999: {agents:?}"
    );
    world.finish().await
}

/// The owners and modes of PGDATA's fixed parts, and every distinct owner below it (a
/// running server adds and recycles files, so not every file is compared).
async fn pgdata_owners(world: &World) -> Result<String> {
    world
        .sh(
            "postgres-0",
            "cd /var/lib/postgresql/data && stat -c '%u:%g %a %n' pgdata pgdata/PG_VERSION pgdata/postgresql.conf pgdata/pg_hba.conf pgdata/base pgdata/global pgdata/pg_wal && find pgdata -printf '%u:%g\\n' | LC_ALL=C sort -u",
        )
        .await
}

/// The postgres example as it is (no securityContext: the image runs as root and hands
/// PGDATA to its postgres user): the backup agent reads PGDATA as that user, and the
/// restore writes it back with the same owners and modes.
#[tokio::test]
async fn postgres_without_a_security_context_is_backed_up_as_its_owner_and_restored_as_it_was()
-> Result<()> {
    let world = World::new("psa-pg").await?;
    world.apply(&world.repository("default", "")).await?;
    world.apply(&example("postgres.yaml")?).await?;
    world.apply(&example("postgres-app.yaml")?).await?;
    world.wait_ready("postgres", 1).await?;
    let owner = world
        .sh("postgres-0", "stat -c %u /var/lib/postgresql/data/pgdata")
        .await?
        .trim()
        .parse::<u32>()?;
    ensure!(owner != 0, "PGDATA belongs to the postgres user");
    let before = pgdata_owners(&world).await?;
    world
        .backup_with("pg-files", "{ app: postgres, method: Volume }")
        .await?;
    let backup_agents = agent_records(&world);
    ensure!(
        !backup_agents.is_empty()
            && backup_agents
                .iter()
                .all(|a| a.uid == owner && a.capabilities.is_empty()),
        "the backup agent ran as PGDATA's owner {owner} with no capability: {backup_agents:?}"
    );
    completed(
        &world,
        "pg-back",
        "  source: { backup: pg-files }\n  target: { app: postgres }",
    )
    .await?;
    world.wait_ready("postgres", 1).await?;
    let after = pgdata_owners(&world).await?;
    ensure!(
        before == after,
        "owners and modes changed:\nbefore:\n{before}\nafter:\n{after}"
    );
    world.finish().await
}

/// Data of two owners and a setuid file, in an app that runs as uid 1000 (an init
/// container prepared the data as root): a restore is refused before the app stops
/// unless `spec.dataAccess.elevated` is on; with it on, owners and modes round-trip.
#[tokio::test]
async fn data_of_two_owners_and_a_setuid_file_restores_only_in_elevated_mode() -> Result<()> {
    let world = World::new("psa-elev").await?;
    world
        .apply(
            r#"
apiVersion: apps/v1
kind: StatefulSet
metadata: { name: mixed }
spec:
  replicas: 1
  serviceName: mixed
  selector: { matchLabels: { app: mixed } }
  template:
    metadata: { labels: { app: mixed } }
    spec:
      terminationGracePeriodSeconds: 1
      initContainers:
      - name: prepare
        image: stateward-probe:dev
        command: [sh, -c, "[ -f /data/app/rows ] && exit 0; mkdir -p /data/app /data/system && seq 1 1000 > /data/app/rows && chown -R 1000:1000 /data/app && echo root-only > /data/system/secret && chmod 600 /data/system/secret && cp /bin/true /data/system/suid && chmod 4755 /data/system/suid"]
        volumeMounts: [{ name: data, mountPath: /data }]
      containers:
      - name: main
        image: stateward-probe:dev
        command: [sh, -c, "exec sleep 100000"]
        securityContext: { runAsUser: 1000, runAsGroup: 1000 }
        readinessProbe: { exec: { command: [test, -f, /data/app/rows] }, periodSeconds: 1 }
        volumeMounts: [{ name: data, mountPath: /data }]
  volumeClaimTemplates:
  - metadata: { name: data }
    spec:
      accessModes: [ReadWriteOnce]
      resources: { requests: { storage: 16Mi } }
"#,
        )
        .await?;
    // Reading another owner's files needs root: the backup too runs elevated.
    world
        .apply(&app("mixed", "mixed", "  dataAccess: { elevated: true }\n"))
        .await?;
    world.wait_ready("mixed", 1).await?;
    let fingerprint = "cd /data && find . -mindepth 1 ! -path './lost+found*' -printf '%U:%G %m %p\\n' | LC_ALL=C sort";
    let before = world.sh("mixed-0", fingerprint).await?;
    ensure!(before.contains("0:0 4755 ./system/suid"), "{before}");
    world.backup("mixed-b1", "mixed").await?;

    let apps: kube::Api<stateward_api::StatefulApp> = world.api();
    let elevated = |on: bool| serde_json::json!({"spec": {"dataAccess": {"elevated": on}}});
    apps.patch(
        "mixed",
        &PatchParams::default(),
        &Patch::Merge(elevated(false)),
    )
    .await?;
    let pod_before: k8s_openapi::api::core::v1::Pod = world.api().get("mixed-0").await?;
    let refused = world
        .restore(
            "mixed-r1",
            "  source: { backup: mixed-b1 }\n  target: { app: mixed }",
        )
        .await?;
    let (_, reason, message) = ready(&refused);
    ensure!(
        phase(&refused) == Some(RestorePhase::Failed)
            && reason == "ElevatedModeRequired"
            && message.contains("spec.dataAccess.elevated")
            && message.contains("several owners")
            && message.contains("setuid"),
        "{reason}: {message}"
    );
    // Refused before anything stopped: the same pod still runs.
    let pod_after: k8s_openapi::api::core::v1::Pod = world.api().get("mixed-0").await?;
    ensure!(
        pod_before.metadata.uid == pod_after.metadata.uid,
        "the app was stopped for a refused restore"
    );

    apps.patch(
        "mixed",
        &PatchParams::default(),
        &Patch::Merge(elevated(true)),
    )
    .await?;
    world
        .sh(
            "mixed-0",
            "rm -f /data/app/rows; echo changed > /data/app/new",
        )
        .await?;
    completed(
        &world,
        "mixed-r2",
        "  source: { backup: mixed-b1 }\n  target: { app: mixed }",
    )
    .await?;
    world.wait_ready("mixed", 1).await?;
    let after = world.sh("mixed-0", fingerprint).await?;
    ensure!(
        before == after,
        "owners and modes:\nbefore:\n{before}\nafter:\n{after}"
    );
    let restore_agents: Vec<ProcessRecord> = agent_records(&world)
        .into_iter()
        .filter(|a| a.pod.starts_with("mixed-r2"))
        .collect();
    ensure!(
        !restore_agents.is_empty()
            && restore_agents.iter().all(|a| {
                a.uid == 0
                    && a.no_new_privs
                    && a.capabilities.iter().all(|c| {
                        ["CHOWN", "FOWNER", "DAC_OVERRIDE", "FSETID"].contains(&c.as_str())
                    })
            }),
        "elevated agents hold only what the data needs: {restore_agents:?}"
    );

    // The volume agents' ServiceAccount goes with the last app that used it.
    let accounts: kube::Api<k8s_openapi::api::core::v1::ServiceAccount> = world.api();
    ensure!(
        accounts.get_opt("stateward-agent").await?.is_some(),
        "the agents' ServiceAccount exists while the app does"
    );
    apps.delete("mixed", &Default::default()).await?;
    stateward_testkit::harness::wait_for(
        "the garbage collector to delete the agents' ServiceAccount",
        2 * MINUTE,
        || async {
            Ok(accounts
                .get_opt("stateward-agent")
                .await?
                .is_none()
                .then_some(()))
        },
    )
    .await?;
    world.finish().await
}
