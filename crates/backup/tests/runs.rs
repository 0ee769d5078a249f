//! Backup runs against the real API server, kube-controller-manager (Jobs, StatefulSets)
//! and S3 server, with agent Jobs running the project's binary on the local nodes. Each
//! test drives a run as a user would: apply a StatefulApp and a Backup, wait for the
//! phase, then check S3 (objects, manifest, bytes) and the app. Run with `cargo xtask test`.

use std::time::Duration;

use anyhow::{Context as _, Result, bail, ensure};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::{Api, ResourceExt};
use sha2::{Digest, Sha256};
use stateward_api::BackupPhase;
use stateward_testkit::harness::{exec, exec_verdict, from_yaml, wait_for, wait_pod_ready};

mod common;
use common::*;

#[tokio::test]
async fn volume_backup_of_two_replicas_on_two_nodes_restores_by_hand_byte_identical() -> Result<()>
{
    let world = World::new("run-volume").await?;
    world.apply(&writer_statefulset("files", 2)).await?;
    world.apply(&app("files", "files", "")).await?;
    let pods = world.pods();
    for p in ["files-0", "files-1"] {
        wait_pod_ready(&pods, p, 2 * MINUTE).await?;
    }
    let backup = world.backup("first", "files", "").await?;
    let status = backup.status.clone().unwrap_or_default();
    ensure!(
        status.phase == Some(BackupPhase::Completed),
        "{}",
        failed_reason(&backup)
    );
    ensure!(
        status.volumes.len() == 2,
        "two volumes expected: {:?}",
        status.volumes
    );

    // Each Job ran on its pod's node.
    let jobs: Api<Job> = world.cluster.api(&world.ns.name);
    let mut nodes = Vec::new();
    for volume in &status.volumes {
        let pod = pods.get(volume.pod.as_deref().unwrap_or_default()).await?;
        let app_node = pod.spec.and_then(|s| s.node_name).unwrap_or_default();
        let job = jobs.get(volume.job.as_deref().unwrap_or_default()).await?;
        let agent = pods
            .list(&ListParams::default().labels(&format!("job-name={}", job.name_any())))
            .await?
            .items
            .into_iter()
            .next()
            .context("agent pod gone")?;
        let agent_node = agent.spec.and_then(|s| s.node_name).unwrap_or_default();
        ensure!(
            agent_node == app_node,
            "{}: agent on {agent_node}, app on {app_node}",
            volume.name
        );
        nodes.push(app_node);
        ensure!(volume.phase == BackupPhase::Completed, "{volume:?}");
        ensure!(volume.files == Some(3), "3 files per volume: {volume:?}");
    }
    ensure!(
        nodes[0] != nodes[1],
        "the pods should sit on different nodes: {nodes:?}"
    );

    // The manifest is in S3, names every object, and each object's sha256 matches.
    let prefix = status.location.clone().context("no location")?;
    let manifest: serde_json::Value =
        serde_json::from_slice(&world.object(&format!("{prefix}/manifest.json")).await?)?;
    ensure!(manifest["formatVersion"] == 1, "{manifest}");
    ensure!(
        manifest["statefulSet"]["spec"]["replicas"] == 2,
        "manifest lacks the StatefulSet spec"
    );
    ensure!(
        manifest["persistentVolumeClaims"].as_array().map(Vec::len) == Some(2),
        "manifest lacks the PVC specs"
    );
    let work = std::env::temp_dir().join(format!("runs-{}", world.ns.name));
    for entry in manifest["entries"].as_array().context("no entries")? {
        let key = entry["key"].as_str().context("no key")?;
        let stored = world.object(key).await?;
        ensure!(
            entry["sha256"] == hex::encode(Sha256::digest(&stored)),
            "sha256 of {key} differs"
        );
        // By hand, with standard tools: zstd -d | tar x.
        let pod = entry["pod"].as_str().context("no pod")?;
        let out = work.join(pod);
        std::fs::create_dir_all(&out)?;
        std::fs::write(work.join(format!("{pod}.tar.zst")), &stored)?;
        let ok = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!(
                "zstd -q -d -c {0}/{pod}.tar.zst | tar -x -C {0}/{pod}",
                work.display()
            ))
            .status()?
            .success();
        ensure!(ok, "zstd -d | tar x failed for {key}");
        let restored = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!(
                "cd {} && find . -type f -exec sha256sum {{}} +",
                out.display()
            ))
            .output()?;
        let restored = parse_digests(&String::from_utf8_lossy(&restored.stdout));
        let source = source_digests(&pods, pod).await?;
        ensure!(
            restored == source,
            "{pod}: restored files differ\nrestored {restored:?}\nsource {source:?}"
        );
        ensure!(source.len() == 3, "{source:?}");
        let link = std::fs::read_link(out.join("link"))?;
        ensure!(
            link == std::path::Path::new("who"),
            "the symlink came back as {link:?}"
        );
    }
    let _ = std::fs::remove_dir_all(&work);

    // The lock is released; metrics and the event tell the story.
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> = world.cluster.api(&world.ns.name);
    ensure!(
        leases.get_opt("stateward-sts-files").await?.is_none()
            && leases.get_opt("stateward-app-files").await?.is_none(),
        "the operation lock is still held"
    );
    let text = world.metrics.encode();
    ensure!(
        text.contains(r#"stateward_backup_runs_total{result="completed"} 1"#),
        "{text}"
    );
    ensure!(
        text.contains(r#"stateward_backup_stored_bytes{namespace=""#),
        "{text}"
    );
    ensure!(
        text.contains("stateward_backup_last_success_timestamp_seconds{"),
        "{text}"
    );
    world.finish().await
}

/// An exec backup in a namespace that enforces Pod Security `restricted`: the API server
/// admits the exec agent's pod (non-root, RuntimeDefault seccomp, no escalation, no
/// capability) and the dump completes. A root pod is refused there, so the label holds.
#[tokio::test]
async fn an_exec_backup_runs_in_a_namespace_that_enforces_restricted() -> Result<()> {
    use k8s_openapi::api::core::v1::{Namespace, Pod};
    let world = World::new("run-restricted").await?;
    let namespaces: Api<Namespace> = Api::all(world.cluster.client.clone());
    namespaces
        .patch(
            &world.ns.name,
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"metadata": {"labels": {
                "pod-security.kubernetes.io/enforce": "restricted"
            }}})),
        )
        .await?;
    let root: Pod = from_yaml(
        "metadata: { name: root }\nspec: { containers: [{ name: main, image: stateward-probe:dev }] }",
    )?;
    match world.pods().create(&PostParams::default(), &root).await {
        Err(kube::Error::Api(e)) if e.code == 403 && e.message.contains("restricted") => {}
        other => bail!("a root pod in a restricted namespace: {other:?}"),
    }
    world
        .apply(
            r#"
apiVersion: apps/v1
kind: StatefulSet
metadata: { name: fenced }
spec:
  replicas: 1
  serviceName: fenced
  selector: { matchLabels: { app: fenced } }
  template:
    metadata: { labels: { app: fenced } }
    spec:
      terminationGracePeriodSeconds: 1
      securityContext:
        runAsNonRoot: true
        runAsUser: 1000
        runAsGroup: 1000
        fsGroup: 1000
        seccompProfile: { type: RuntimeDefault }
      containers:
      - name: main
        image: stateward-probe:dev
        command: [sh, -c, "seq 1 5000 > /data/rows; exec sleep 100000"]
        readinessProbe: { exec: { command: [test, -f, /data/rows] }, periodSeconds: 1 }
        securityContext: { allowPrivilegeEscalation: false, capabilities: { drop: [ALL] } }
        volumeMounts: [{ name: data, mountPath: /data }]
  volumeClaimTemplates:
  - metadata: { name: data }
    spec:
      accessModes: [ReadWriteOnce]
      resources: { requests: { storage: 16Mi } }
"#,
        )
        .await?;
    world
        .apply(&app(
            "fenced",
            "fenced",
            "    exec:\n      command: [sh, -c, \"cat /data/rows\"]\n",
        ))
        .await?;
    wait_pod_ready(&world.pods(), "fenced-0", 2 * MINUTE).await?;
    let backup = world.backup("dump", "fenced", "  method: Exec\n").await?;
    let (status, _) = completed_with_key(&backup)?;
    ensure!(
        status.volumes.iter().all(|v| v.bytes_read.unwrap_or(0) > 0),
        "the dump is empty: {:?}",
        status.volumes
    );
    world.finish().await
}

#[tokio::test]
async fn failing_pre_hook_fails_the_run_and_the_post_hook_still_runs() -> Result<()> {
    let world = World::new("run-hooks").await?;
    world.apply(&writer_statefulset("hooked", 1)).await?;
    world
        .apply(&app(
            "hooked",
            "hooked",
            "    hooks:\n      pre:\n      - { name: freeze, command: [sh, -c, \"echo cannot freeze >&2; exit 3\"] }\n      \
             post:\n      - { name: thaw, command: [sh, -c, \"date > /data/post-hook-ran\"] }\n",
        ))
        .await?;
    let pods = world.pods();
    wait_pod_ready(&pods, "hooked-0", 2 * MINUTE).await?;
    let backup = world.backup("hooked-1", "hooked", "").await?;
    let (_, reason, message) = condition(&backup, "Failed").context("no Failed condition")?;
    ensure!(reason == "HookFailed", "{reason}: {message}");
    ensure!(
        message.contains("freeze") && message.contains("cannot freeze"),
        "{message}"
    );
    let status = backup.status.clone().unwrap_or_default();
    ensure!(
        status
            .hooks
            .iter()
            .any(|h| h.name == "thaw" && h.succeeded && h.finished == 1),
        "post-hook not recorded: {:?}",
        status.hooks
    );
    let marker = exec(
        &pods,
        "hooked-0",
        None,
        &["cat", "/data/post-hook-ran"],
        None,
    )
    .await?;
    ensure!(marker.exit_code == 0, "the post-hook did not run");
    // No Job was started and nothing was committed.
    let jobs: Api<Job> = world.cluster.api(&world.ns.name);
    ensure!(
        jobs.list(&ListParams::default()).await?.items.is_empty(),
        "a Job ran after a failed pre-hook"
    );
    ensure!(
        world.keys("backups/").await?.is_empty(),
        "objects in S3 after a failed run"
    );
    ensure!(
        !world.warnings("HookFailed").await?.is_empty(),
        "no HookFailed event"
    );
    world.finish().await
}

/// A StatefulApp whose Exec dump never ends: a run stays Running until stopped.
fn endless_dump_app(name: &str) -> String {
    app(
        name,
        name,
        "    method: Exec\n    exec:\n      command: [sh, -c, \"echo partial-dump; exec sleep 600\"]\n",
    )
}

#[tokio::test]
async fn cancel_and_deadline_stop_the_run_and_leave_a_clean_bucket() -> Result<()> {
    let world = World::new("run-cancel").await?;
    world.apply(&writer_statefulset("slow", 1)).await?;
    world.apply(&endless_dump_app("slow")).await?;
    let pods = world.pods();
    wait_pod_ready(&pods, "slow-0", 2 * MINUTE).await?;

    // Cancel: wait until the agent runs (its multipart upload is open), then cancel.
    world
        .apply("apiVersion: stateward.io/v1alpha1\nkind: Backup\nmetadata: { name: cancelled }\nspec:\n  app: slow\n")
        .await?;
    let api = world.backups();
    wait_for("the agent to run", 2 * MINUTE, || async {
        let b = api.get("cancelled").await?;
        let running = b
            .status
            .as_ref()
            .is_some_and(|s| s.volumes.iter().any(|v| v.phase == BackupPhase::Running));
        if b.status.as_ref().and_then(|s| s.phase) == Some(BackupPhase::Failed) {
            bail!("failed early: {}", failed_reason(&b));
        }
        Ok(running.then_some(()))
    })
    .await?;
    wait_for("the agent's upload to open", MINUTE, || async {
        Ok((world.open_uploads().await? > 0).then_some(()))
    })
    .await?;
    api.patch(
        "cancelled",
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"spec": {"cancel": true}})),
    )
    .await?;
    let cancelled = world.wait_done("cancelled", 2 * MINUTE).await?;
    let (_, reason, message) = condition(&cancelled, "Failed").context("no Failed condition")?;
    ensure!(reason == "Cancelled", "{reason}: {message}");
    ensure!(
        world.open_uploads().await? == 0,
        "a multipart upload is still open"
    );
    ensure!(
        world.keys("backups/").await?.is_empty(),
        "objects left after cancel"
    );

    // Deadline: the smallest the schema allows is 60 s.
    let timed = world
        .backup("timed", "slow", "  activeDeadlineSeconds: 60\n")
        .await?;
    let (_, reason, message) = condition(&timed, "Failed").context("no Failed condition")?;
    ensure!(reason == "DeadlineExceeded", "{reason}: {message}");
    ensure!(
        world.open_uploads().await? == 0,
        "a multipart upload is still open"
    );
    ensure!(
        world.keys("backups/").await?.is_empty(),
        "objects left after the deadline"
    );
    world.finish().await
}

#[tokio::test]
async fn bad_input_fails_with_a_reason_that_names_the_problem() -> Result<()> {
    let world = World::new("run-invalid").await?;
    world.apply(&writer_statefulset("ok", 1)).await?;
    world
        .apply(&format!(
            "{}\n---\n{}\n---\n{}\n---\n{}\n---\n{}\n---\n{}",
            app("ok", "ok", ""),
            app(
                "wrong-container",
                "ok",
                "    hooks: { pre: [{ name: flush, container: sidecar, command: [sync] }] }\n"
            ),
            app("no-sts", "absent-sts", ""),
            world.repository("no-secret-repo", "absent-secret"),
            "apiVersion: apps/v1\nkind: StatefulSet\nmetadata: { name: zero }\nspec:\n  replicas: 0\n  serviceName: zero\n  selector: { matchLabels: { app: zero } }\n  template:\n    metadata: { labels: { app: zero } }\n    spec: { containers: [{ name: main, image: stateward-probe }] }\n",
            app("zero", "zero", ""),
        ))
        .await?;
    // Wrong credentials, and a bucket that does not exist.
    let secrets: Api<Secret> = world.cluster.api(&world.ns.name);
    secrets
        .create(
            &PostParams::default(),
            &from_yaml(&format!(
                "metadata: {{ name: wrong, labels: {{ stateward.io/repository-secret: \"true\" }} }}\nstringData: {{ accessKeyId: {}, secretAccessKey: not-the-secret }}",
                world.cluster.env.s3_access_key
            ))?,
        )
        .await?;
    world
        .apply(&format!(
            "{}---\n{}",
            world.repository("wrong-creds-repo", "wrong"),
            world.repository("no-bucket-repo", "s3").replace(
                &format!("bucket: {}", world.bucket),
                "bucket: no-such-bucket-here"
            ),
        ))
        .await?;
    // A ReadWriteOncePod volume.
    world
        .apply(&writer_statefulset("rwop", 1).replace("[ReadWriteOnce]", "[ReadWriteOncePod]"))
        .await?;
    world.apply(&app("rwop", "rwop", "")).await?;
    wait_pod_ready(&world.pods(), "rwop-0", 2 * MINUTE).await?;
    wait_pod_ready(&world.pods(), "ok-0", 2 * MINUTE).await?;

    let cases = [
        (
            "no-app",
            "absent-app",
            "",
            "AppNotFound",
            "absent-app (spec.app)",
        ),
        (
            "no-sts",
            "no-sts",
            "",
            "StatefulSetNotFound",
            "absent-sts (spec.statefulSetName",
        ),
        (
            "no-repo",
            "ok",
            "  repository: absent-repo\n",
            "RepositoryNotFound",
            "absent-repo (spec.repository)",
        ),
        (
            "no-secret",
            "ok",
            "  repository: no-secret-repo\n",
            "SecretNotFound",
            "absent-secret",
        ),
        ("zero", "zero", "", "ScaledToZero", "0 replicas"),
        (
            "wrong-creds",
            "ok",
            "  repository: wrong-creds-repo\n",
            "InvalidCredentials|AccessDenied",
            "wrong-creds-repo",
        ),
        (
            "no-bucket",
            "ok",
            "  repository: no-bucket-repo\n",
            "NoSuchBucket",
            "no-such-bucket-here",
        ),
        ("rwop", "rwop", "", "ReadWriteOncePod", "data-rwop-0"),
        (
            "no-container",
            "wrong-container",
            "",
            "ContainerNotFound",
            "sidecar (spec.backup.hooks.pre[flush].container)",
        ),
    ];
    for (name, app_name, extra, reason, names) in cases {
        let backup = world.backup(name, app_name, extra).await?;
        let (_, got, message) =
            condition(&backup, "Failed").with_context(|| format!("{name}: no Failed condition"))?;
        ensure!(
            reason.split('|').any(|r| r == got),
            "{name}: reason {got} ({message}), expected {reason}"
        );
        ensure!(
            message.contains(names),
            "{name}: the message does not name {names}: {message}"
        );
        ensure!(
            !world.warnings(&got).await?.is_empty(),
            "{name}: no Warning event {got}"
        );
        ensure!(
            !message.contains("not-the-secret"),
            "{name}: a secret leaked into the message"
        );
    }
    ensure!(
        world.keys("backups/").await?.is_empty(),
        "objects in S3 after rejected runs"
    );
    world.finish().await
}

#[tokio::test]
async fn a_second_backup_of_the_same_app_waits_for_the_lock_then_runs() -> Result<()> {
    let world = World::new("run-lock").await?;
    world.apply(&writer_statefulset("locked", 1)).await?;
    world.apply(&endless_dump_app("locked")).await?;
    wait_pod_ready(&world.pods(), "locked-0", 2 * MINUTE).await?;
    let api = world.backups();
    world
        .apply("apiVersion: stateward.io/v1alpha1\nkind: Backup\nmetadata: { name: holder }\nspec:\n  app: locked\n")
        .await?;
    wait_for("the first backup to run", 2 * MINUTE, || async {
        let b = api.get("holder").await?;
        Ok((b.status.and_then(|s| s.phase) == Some(BackupPhase::Running)).then_some(()))
    })
    .await?;
    world
        .apply("apiVersion: stateward.io/v1alpha1\nkind: Backup\nmetadata: { name: waiter }\nspec:\n  app: locked\n  method: Volume\n")
        .await?;
    let message = wait_for("the second backup to wait for the lock", MINUTE, || async {
        let b = api.get("waiter").await?;
        Ok(condition(&b, "LockAcquired")
            .and_then(|(s, r, m)| (s == "False" && r == "WaitingForLock").then_some(m)))
    })
    .await?;
    ensure!(
        message.contains("holder"),
        "the waiting message should name the holder: {message}"
    );
    // Still waiting a few seconds later: no Job of its own.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let waiter = api.get("waiter").await?;
    ensure!(
        waiter.status.as_ref().and_then(|s| s.phase) == Some(BackupPhase::Pending),
        "the second backup did not wait: {:?}",
        waiter.status
    );
    api.patch(
        "holder",
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"spec": {"cancel": true}})),
    )
    .await?;
    let done = world.wait_done("waiter", 3 * MINUTE).await?;
    ensure!(
        done.status.as_ref().and_then(|s| s.phase) == Some(BackupPhase::Completed),
        "{}",
        failed_reason(&done)
    );
    world.finish().await
}

/// Runs a local command, failing with its stderr.
fn sh(script: &str) -> Result<String> {
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(script)
        .output()?;
    ensure!(
        out.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The redis dump's agent ran as `stateward-exec-redis`, bound to the chart's exec
/// ClusterRole (no Role was made), owned by the app; with that account's token, exec in
/// `redis-0` works and exec in `postgres-0` (another StatefulSet) is refused by the
/// chart's policy, by name.
async fn exec_agent_reaches_only_its_own_statefulset(world: &World) -> Result<()> {
    use k8s_openapi::api::core::v1::{Pod, ServiceAccount};
    use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
    let ns = &world.ns.name;
    let roles: Api<Role> = world.cluster.api(ns);
    let made: Vec<String> = roles
        .list(&ListParams::default())
        .await?
        .items
        .iter()
        .map(ResourceExt::name_any)
        .collect();
    ensure!(made.is_empty(), "the manager made Roles: {made:?}");
    let binding = world
        .cluster
        .api::<RoleBinding>(ns)
        .get("stateward-exec-redis")
        .await
        .context("the exec agent's RoleBinding")?;
    ensure!(
        binding.role_ref.kind == "ClusterRole"
            && binding.role_ref.name == stateward_runtime::agent_rbac::DEFAULT_EXEC_CLUSTER_ROLE,
        "bound to {:?}",
        binding.role_ref
    );
    let account = world
        .cluster
        .api::<ServiceAccount>(ns)
        .get("stateward-exec-redis")
        .await?;
    ensure!(
        account
            .owner_references()
            .iter()
            .any(|o| o.kind == "StatefulApp" && o.name == "redis"),
        "the exec agent's ServiceAccount is not owned by its app"
    );
    let as_agent = world.cluster.client_as(ns, "stateward-exec-redis").await?;
    let pods: Api<Pod> = Api::namespaced(as_agent.clone(), ns);
    let own = exec(&pods, "redis-0", None, &["true"], None).await?;
    ensure!(own.exit_code == 0, "exec in its own pod: {own:?}");
    let (code, message) = exec_verdict(&as_agent, ns, "redis-0").await?;
    ensure!(
        code == 400,
        "its own pod, without upgrade: {code} {message}"
    );
    let (code, message) = exec_verdict(&as_agent, ns, "postgres-0").await?;
    ensure!(
        code == 403
            && message.contains("stateward-agent-exec")
            && message.contains("only in the pods of its own StatefulSet"),
        "exec in postgres-0 as the redis agent: {code} {message} (refused by the policy?)"
    );
    Ok(())
}

#[tokio::test]
async fn exec_backups_of_the_redis_and_postgres_examples_load_into_fresh_servers() -> Result<()> {
    let world = World::new("run-exec").await?;
    for file in [
        "repository.yaml",
        "redis.yaml",
        "redis-app.yaml",
        "postgres.yaml",
        "postgres-app.yaml",
    ] {
        world.apply_example(file).await?;
    }
    let pods = world.pods();
    wait_pod_ready(&pods, "redis-0", 2 * MINUTE).await?;
    wait_pod_ready(&pods, "postgres-0", 3 * MINUTE).await?;
    let script: String = (0..500)
        .map(|i| format!("SET key:{i} value-{i}\n"))
        .collect();
    let out = exec(
        &pods,
        "redis-0",
        None,
        &["redis-cli"],
        Some(script.into_bytes()),
    )
    .await?;
    ensure!(
        out.exit_code == 0,
        "redis writes: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let sql = "CREATE TABLE items (id int PRIMARY KEY, note text); \
               INSERT INTO items SELECT g, 'note ' || g FROM generate_series(1, 2000) g;";
    let out = exec(
        &pods,
        "postgres-0",
        None,
        &["psql", "-U", "postgres", "-v", "ON_ERROR_STOP=1", "-c", sql],
        None,
    )
    .await?;
    ensure!(
        out.exit_code == 0,
        "postgres writes: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // redis: the app's method is Exec (`redis-cli --rdb -`).
    let redis = world.backup("redis-dump", "redis", "").await?;
    let (_, key) = completed_with_key(&redis)?;
    ensure!(key.ends_with("/dumps/redis-0.zst"), "{key}");
    let work = std::env::temp_dir().join(format!("runs-{}", world.ns.name));
    std::fs::create_dir_all(&work)?;
    std::fs::write(work.join("dump.rdb.zst"), world.object(&key).await?)?;
    sh(&format!(
        "zstd -q -d {0}/dump.rdb.zst -o {0}/dump.rdb",
        work.display()
    ))?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let mut server = std::process::Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .arg("--dir")
        .arg(&work)
        .args(["--dbfilename", "dump.rdb"])
        .stdout(std::process::Stdio::null())
        .spawn()?;
    let loaded = wait_for("a fresh redis-server to load the dump", MINUTE, || async {
        Ok(sh(&format!("redis-cli -p {port} DBSIZE"))
            .ok()
            .filter(|n| n == "500"))
    })
    .await;
    let value = sh(&format!("redis-cli -p {port} GET key:123"));
    let _ = server.kill();
    let _ = server.wait();
    loaded?;
    ensure!(value? == "value-123", "a key came back wrong");
    exec_agent_reaches_only_its_own_statefulset(&world).await?;

    // postgres: the app backs up volumes; this Backup asks for its logical dump.
    let pg = world
        .backup("pg-dump", "postgres", "  method: Exec\n")
        .await?;
    let (status, key) = completed_with_key(&pg)?;
    let compressed = world.object(&key).await?;
    let manifest: serde_json::Value = serde_json::from_slice(
        &world
            .object(&format!(
                "{}/manifest.json",
                status.location.clone().unwrap_or_default()
            ))
            .await?,
    )?;
    ensure!(
        manifest["entries"][0]["command"][0] == "pg_dumpall",
        "{manifest}"
    );
    ensure!(
        manifest["entries"][0]["sha256"] == hex::encode(Sha256::digest(&compressed)),
        "sha256 differs"
    );
    let dump = zstd_decode(&compressed)?;
    ensure!(
        String::from_utf8_lossy(&dump).contains("CREATE TABLE public.items"),
        "not a pg_dumpall output"
    );
    // A fresh postgres (a new pod with an empty volume) loads it.
    world
        .apply(
            "apiVersion: v1\nkind: Pod\nmetadata: { name: fresh-pg }\nspec:\n  containers:\n  - name: postgres\n    image: postgres:16\n    \
             env: [{ name: POSTGRES_PASSWORD, value: fresh }, { name: PGDATA, value: /var/lib/postgresql/data/pgdata }]\n    \
             readinessProbe: { exec: { command: [pg_isready, -U, postgres] }, periodSeconds: 2 }\n    \
             volumeMounts: [{ name: data, mountPath: /var/lib/postgresql/data }]\n  volumes: [{ name: data, emptyDir: {} }]\n",
        )
        .await?;
    wait_pod_ready(&pods, "fresh-pg", 3 * MINUTE).await?;
    let out = exec(
        &pods,
        "fresh-pg",
        None,
        &["psql", "-U", "postgres", "-q"],
        Some(dump),
    )
    .await?;
    ensure!(
        out.exit_code == 0,
        "loading the dump: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = exec(
        &pods,
        "fresh-pg",
        None,
        &[
            "psql",
            "-U",
            "postgres",
            "-tA",
            "-c",
            "SELECT count(*), sum(id) FROM items",
        ],
        None,
    )
    .await?;
    ensure!(
        out.stdout_str().trim() == "2000|2001000",
        "rows after loading: {}",
        out.stdout_str()
    );
    let _ = std::fs::remove_dir_all(&work);
    world.finish().await
}

fn zstd_decode(data: &[u8]) -> Result<Vec<u8>> {
    use std::io::Write;
    let mut child = std::process::Command::new("zstd")
        .args(["-q", "-d", "-c"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let mut stdin = child.stdin.take().context("no stdin")?;
    let input = data.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let out = child.wait_with_output()?;
    let _ = writer.join();
    ensure!(out.status.success(), "zstd -d failed");
    Ok(out.stdout)
}

#[tokio::test]
async fn an_encrypted_backup_decrypts_with_age_by_hand_and_bad_or_mismatched_keys_are_refused()
-> Result<()> {
    let world = World::new("run-age").await?;
    // Keys made with the standard tool, as a user would.
    let work = std::env::temp_dir().join(format!("runs-{}", world.ns.name));
    std::fs::create_dir_all(&work)?;
    let key_file = work.join("key.txt");
    sh(&format!("age-keygen -o {} 2>/dev/null", key_file.display()))?;
    let recipient = sh(&format!("age-keygen -y {}", key_file.display()))?;
    // The identity as `age-keygen -o` writes it, comments and all: what a user puts in
    // the Secret with `--from-file`.
    let identity = std::fs::read_to_string(&key_file)?;
    let other_key = work.join("other.txt");
    sh(&format!(
        "age-keygen -o {} 2>/dev/null",
        other_key.display()
    ))?;
    let other_recipient = sh(&format!("age-keygen -y {}", other_key.display()))?;
    let secrets: Api<Secret> = world.cluster.api(&world.ns.name);
    let mut secret: Secret =
        from_yaml("metadata: { name: age, labels: { stateward.io/repository-secret: \"true\" } }")?;
    secret.string_data = Some(
        [
            ("recipient".to_string(), recipient.clone()),
            ("identity".to_string(), identity.clone()),
            ("bad".to_string(), "age1notakey".to_string()),
            ("other-recipient".to_string(), other_recipient.clone()),
        ]
        .into(),
    );
    secrets.create(&PostParams::default(), &secret).await?;
    let sealed = world.repository("sealed", "s3")
        + "  encryption:\n    recipient: { name: age, key: recipient }\n    identity: { name: age, key: identity }\n";
    let broken = world.repository("broken", "s3")
        + "  encryption:\n    recipient: { name: age, key: bad }\n";
    // A valid recipient, and a valid identity that is not its private key.
    let mismatched = world.repository("mismatched", "s3")
        + "  encryption:\n    recipient: { name: age, key: other-recipient }\n    identity: { name: age, key: identity }\n";
    world
        .apply(&format!("{sealed}---\n{broken}---\n{mismatched}"))
        .await?;
    world.apply(&writer_statefulset("secret-files", 1)).await?;
    world
        .apply(&app("secret-files", "secret-files", ""))
        .await?;
    let pods = world.pods();
    wait_pod_ready(&pods, "secret-files-0", 2 * MINUTE).await?;

    let backup = world
        .backup("sealed-1", "secret-files", "  repository: sealed\n")
        .await?;
    let (status, key) = completed_with_key(&backup)?;
    ensure!(key.ends_with(".tar.zst.age"), "{key}");
    let stored = world.object(&key).await?;
    ensure!(
        stored.starts_with(b"age-encryption.org/v1"),
        "the object is not in the age format"
    );
    let manifest: serde_json::Value = serde_json::from_slice(
        &world
            .object(&format!(
                "{}/manifest.json",
                status.location.clone().unwrap_or_default()
            ))
            .await?,
    )?;
    ensure!(manifest["encryption"] == "age", "{manifest}");
    ensure!(
        manifest["entries"][0]["encoding"] == "tar+zstd+age",
        "{manifest}"
    );
    std::fs::write(work.join("data.age"), &stored)?;
    std::fs::create_dir_all(work.join("out"))?;
    sh(&format!(
        "age -d -i {0}/key.txt {0}/data.age | zstd -q -d | tar -x -C {0}/out",
        work.display()
    ))?;
    let restored = sh(&format!(
        "cd {}/out && find . -type f -exec sha256sum {{}} +",
        work.display()
    ))?;
    let source = source_digests(&pods, "secret-files-0").await?;
    ensure!(
        parse_digests(&restored) == source,
        "decrypted files differ from the source"
    );

    // A recipient that does not parse: Failed before anything is stored, naming the key.
    let bad = world
        .backup("broken-1", "secret-files", "  repository: broken\n")
        .await?;
    let (_, reason, message) = condition(&bad, "Failed").context("no Failed condition")?;
    ensure!(reason == "EncryptionKeyInvalid", "{reason}: {message}");
    ensure!(
        message.contains("age") && message.contains("bad"),
        "{message}"
    );
    ensure!(
        !message.contains(&identity) && !message.contains(&recipient),
        "a key leaked into the message"
    );

    // A pair that does not match: backups no one could restore are never taken. The
    // Backup fails before any Job, and the repository says why, with a Warning event.
    let mismatch = world
        .backup("mismatch-1", "secret-files", "  repository: mismatched\n")
        .await?;
    let (_, reason, message) = condition(&mismatch, "Failed").context("no Failed condition")?;
    ensure!(reason == "EncryptionKeyMismatch", "{reason}: {message}");
    ensure!(
        message.contains("spec.encryption.identity")
            && message.contains("spec.encryption.recipient"),
        "the message does not name the fields: {message}"
    );
    for key in [identity.trim(), recipient.trim(), other_recipient.trim()] {
        let secret_line = key.lines().last().unwrap_or(key);
        ensure!(
            !message.contains(secret_line),
            "a key leaked into the message"
        );
    }
    let jobs: Api<Job> = world.cluster.api(&world.ns.name);
    let started = jobs
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter(|j| {
            j.metadata
                .name
                .as_deref()
                .is_some_and(|n| n.contains("mismatch-1"))
        })
        .count();
    ensure!(
        started == 0,
        "{started} agent Job(s) ran for the mismatched backup"
    );
    let repositories: Api<stateward_api::BackupRepository> = world.cluster.api(&world.ns.name);
    let deadline = std::time::Instant::now() + 2 * MINUTE;
    loop {
        let repo = repositories.get("mismatched").await?;
        let ready = repo
            .status
            .as_ref()
            .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"))
            .map(|c| (c.status.clone(), c.reason.clone()));
        let warned = !world.warnings("EncryptionKeyMismatch").await?.is_empty();
        if ready == Some(("False".into(), "EncryptionKeyMismatch".into())) && warned {
            break;
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "the repository shows {ready:?} (Warning event: {warned}), not Ready=False/EncryptionKeyMismatch"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let _ = std::fs::remove_dir_all(&work);
    world.finish().await
}

#[tokio::test]
async fn a_held_pre_hook_keeps_its_session_during_the_copy_and_ends_before_the_post_hook()
-> Result<()> {
    let world = World::new("run-hold").await?;
    world.apply(&writer_statefulset("held", 1)).await?;
    // The "lock": a file that exists exactly while the pre-hook's session is open.
    world
        .apply(&app(
            "held",
            "held",
            "    hooks:\n      pre:\n      - { name: lock, holdUntilPostHook: true, command: [sh, -c, \"echo locked > /data/lock-held; cat > /dev/null; rm /data/lock-held\"] }\n      \
             post:\n      - { name: check, command: [sh, -c, \"test ! -e /data/lock-held && date > /data/post-hook-saw-release\"] }\n",
        ))
        .await?;
    let pods = world.pods();
    wait_pod_ready(&pods, "held-0", 2 * MINUTE).await?;
    let backup = world.backup("held-1", "held", "").await?;
    let status = backup.status.clone().unwrap_or_default();
    ensure!(
        status.phase == Some(BackupPhase::Completed),
        "{}",
        failed_reason(&backup)
    );
    let lock = status
        .hooks
        .iter()
        .find(|h| h.name == "lock")
        .context("no lock hook")?;
    ensure!(
        lock.succeeded
            && lock
                .message
                .as_deref()
                .is_some_and(|m| m.contains("released cleanly")),
        "{lock:?}"
    );
    ensure!(
        status
            .hooks
            .iter()
            .any(|h| h.name == "check" && h.succeeded),
        "post-hook: {:?}",
        status.hooks
    );
    // The archive was taken while the hold was in place: it contains the lock file.
    let key = status
        .volumes
        .first()
        .and_then(|v| v.key.clone())
        .context("no key")?;
    let listing = {
        let work = std::env::temp_dir().join(format!("runs-{}", world.ns.name));
        std::fs::create_dir_all(&work)?;
        std::fs::write(work.join("a.tar.zst"), world.object(&key).await?)?;
        let out = sh(&format!(
            "zstd -q -d -c {}/a.tar.zst | tar -t",
            work.display()
        ));
        let _ = std::fs::remove_dir_all(&work);
        out?
    };
    ensure!(
        listing
            .lines()
            .any(|l| l.trim_start_matches("./") == "lock-held"),
        "the copy did not happen under the hold:\n{listing}"
    );
    let gone = exec(
        &pods,
        "held-0",
        None,
        &["test", "!", "-e", "/data/lock-held"],
        None,
    )
    .await?;
    ensure!(gone.exit_code == 0, "the hold was not released");
    world.finish().await
}

#[tokio::test]
async fn agent_jobs_wait_for_a_slot_under_the_global_cap() -> Result<()> {
    // One agent at a time: the two volumes are copied one after the other.
    let world = World::with_config(
        "run-cap",
        stateward_backup::RunConfig {
            max_jobs: 1,
            ..Default::default()
        },
    )
    .await?;
    world.apply(&writer_statefulset("capped", 2)).await?;
    world.apply(&app("capped", "capped", "")).await?;
    let pods = world.pods();
    for p in ["capped-0", "capped-1"] {
        wait_pod_ready(&pods, p, 2 * MINUTE).await?;
    }
    world
        .apply("apiVersion: stateward.io/v1alpha1\nkind: Backup\nmetadata: { name: capped-1 }\nspec: { app: capped }\n")
        .await?;
    let api = world.backups();
    let waiting = wait_for("a volume to wait for an agent slot", 2 * MINUTE, || async {
        let b = api.get("capped-1").await?;
        let status = b.status.unwrap_or_default();
        if status.phase == Some(BackupPhase::Completed) {
            bail!("completed without ever waiting for a slot");
        }
        Ok(status.volumes.iter().find_map(|v| {
            v.message
                .clone()
                .filter(|m| m.contains("waiting for an agent slot"))
        }))
    })
    .await?;
    ensure!(waiting.contains("1 allowed"), "{waiting}");
    let done = world.wait_done("capped-1", 3 * MINUTE).await?;
    ensure!(
        done.status.as_ref().and_then(|s| s.phase) == Some(BackupPhase::Completed),
        "{}",
        failed_reason(&done)
    );
    // The Jobs never overlapped.
    let jobs: Api<Job> = world.cluster.api(&world.ns.name);
    let mut windows: Vec<(String, String)> = jobs
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter_map(|j| {
            let s = j.status?;
            Some((
                serde_json::to_string(&s.start_time?).ok()?,
                serde_json::to_string(&s.completion_time?).ok()?,
            ))
        })
        .collect();
    windows.sort();
    ensure!(
        windows.len() == 2,
        "two finished Jobs expected: {windows:?}"
    );
    ensure!(
        windows[0].1 <= windows[1].0,
        "the agent Jobs overlapped: {windows:?}"
    );
    world.finish().await
}

#[tokio::test]
async fn two_apps_sharing_a_repository_back_up_at_the_same_moment_three_rounds_in_a_row()
-> Result<()> {
    // A still clock: round 1 runs right after the repository loop's check (each run trusts
    // its verdict), then the clock moves past `TRUST_READY_FOR` so that in rounds 2 and 3
    // both runs probe the repository at the same moment.
    let clock = stateward_runtime::time::ManualClock::new(chrono::Utc::now());
    // The moved clock is ahead of the API server's: the agent-start bound is measured on
    // the controller's clock alone, so it does not fire because of that.
    let world = World::start(
        "run-shared-repo",
        Default::default(),
        Loops::All,
        Some(clock.clone()),
    )
    .await?;
    let apps = ["left", "right"];
    for name in apps {
        world.apply(&writer_statefulset(name, 1)).await?;
        world.apply(&app(name, name, "")).await?;
    }
    let pods = world.pods();
    for name in apps {
        wait_pod_ready(&pods, &format!("{name}-0"), 2 * MINUTE).await?;
    }
    let repos: Api<stateward_api::BackupRepository> = world.cluster.api(&world.ns.name);
    wait_for("the repository to be Ready", MINUTE, || async {
        let repo = repos.get("repo").await?;
        let ready = repo.status.is_some_and(|s| {
            s.conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True")
        });
        Ok(ready.then_some(()))
    })
    .await?;
    for round in 1..=3 {
        if round > 1 {
            clock.advance(chrono::Duration::minutes(2));
        }
        // Both Backups in the same second.
        let backup = |name: &str| {
            format!(
                "apiVersion: stateward.io/v1alpha1\nkind: Backup\nmetadata: {{ name: {name}-{round} }}\nspec: {{ app: {name} }}\n"
            )
        };
        let (left, right) = (backup(apps[0]), backup(apps[1]));
        tokio::try_join!(world.apply(&left), world.apply(&right))?;
        for name in apps {
            let done = world
                .wait_done(&format!("{name}-{round}"), 3 * MINUTE)
                .await?;
            ensure!(
                done.status.as_ref().and_then(|s| s.phase) == Some(BackupPhase::Completed),
                "round {round}, {name}: {}",
                failed_reason(&done)
            );
            // A probe that collided would have made the run wait for the repository.
            ensure!(
                condition(&done, stateward_backup::repository::RUN_CONDITION).is_none(),
                "round {round}, {name} waited for the repository: {:?}",
                condition(&done, stateward_backup::repository::RUN_CONDITION)
            );
        }
    }
    let probes = world
        .keys(&format!(
            "backups/{}/{}",
            world.ns.name,
            stateward_backup::repository::PROBE_PREFIX
        ))
        .await?;
    ensure!(probes.is_empty(), "probe objects were left: {probes:?}");
    world.finish().await
}

/// `writer_statefulset` without its one-pod-per-node rule (the local cluster has two
/// nodes).
fn packed_writer(name: &str, replicas: i32) -> String {
    let text = writer_statefulset(name, replicas);
    let start = text.find("      affinity:").unwrap_or(0);
    let end = text.find("      containers:").unwrap_or(0);
    format!("{}{}", &text[..start], &text[end..])
}

#[tokio::test]
async fn six_hooks_on_three_replicas_run_once_each_and_status_keeps_one_entry_per_hook()
-> Result<()> {
    let world = World::new("run-six-hooks").await?;
    world.apply(&packed_writer("six", 3)).await?;
    let hook = |name: &str| {
        format!(
            "      - {{ name: {name}, command: [sh, -c, \"echo {name} >> /data/hooks.log\"] }}\n"
        )
    };
    let hooks = format!(
        "    hooks:\n      pre:\n{}{}{}      post:\n{}{}{}",
        hook("a"),
        hook("b"),
        hook("c"),
        hook("d"),
        hook("e"),
        hook("f")
    );
    world.apply(&app("six", "six", &hooks)).await?;
    let pods = world.pods();
    for pod in ["six-0", "six-1", "six-2"] {
        wait_pod_ready(&pods, pod, 2 * MINUTE).await?;
    }
    let backup = world.backup("six-1", "six", "").await?;
    let status = backup.status.clone().unwrap_or_default();
    ensure!(
        status.phase == Some(BackupPhase::Completed),
        "{}",
        failed_reason(&backup)
    );
    ensure!(status.hooks.len() == 6, "{:?}", status.hooks);
    for h in &status.hooks {
        ensure!(
            h.succeeded && (h.pods, h.started, h.finished) == (3, 3, 3),
            "{h:?}"
        );
    }
    for pod in ["six-0", "six-1", "six-2"] {
        let log = exec(&pods, pod, None, &["cat", "/data/hooks.log"], None).await?;
        ensure!(
            String::from_utf8_lossy(&log.stdout)
                .lines()
                .collect::<Vec<_>>()
                == ["a", "b", "c", "d", "e", "f"],
            "{pod}: each hook once, in order: {:?}",
            String::from_utf8_lossy(&log.stdout)
        );
    }
    world.finish().await
}

#[tokio::test]
async fn a_hook_interrupted_by_a_manager_restart_is_not_run_again_and_follows_on_error()
-> Result<()> {
    let mut world = World::new("run-hook-crash").await?;
    world.apply(&packed_writer("crash", 1)).await?;
    world
        .apply(&app(
            "crash",
            "crash",
            "    hooks:\n      pre:\n      - { name: slow, command: [sh, -c, \"echo started >> /data/slow.log; sleep 20\"] }\n      \
             post:\n      - { name: thaw, command: [sh, -c, \"echo thawed >> /data/thaw.log\"] }\n",
        ))
        .await?;
    let pods = world.pods();
    wait_pod_ready(&pods, "crash-0", 2 * MINUTE).await?;
    world
        .apply("apiVersion: stateward.io/v1alpha1\nkind: Backup\nmetadata: { name: crash-1 }\nspec: { app: crash }")
        .await?;
    let backups = world.backups();
    // The start is recorded, the exec is under way: the manager goes.
    stateward_testkit::harness::wait_for("the hook's start recorded", 2 * MINUTE, || async {
        let b = backups.get("crash-1").await?;
        let started = b
            .status
            .as_ref()
            .and_then(|s| s.hooks.iter().find(|h| h.name == "slow"))
            .is_some_and(|h| h.started == 1 && h.finished == 0);
        let log = exec(&pods, "crash-0", None, &["cat", "/data/slow.log"], None).await?;
        Ok((started && log.exit_code == 0).then_some(()))
    })
    .await?;
    world.stop_controller().await;
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    world.start_controller();

    let backup = world.wait_done("crash-1", 3 * MINUTE).await?;
    let (_, reason, message) = condition(&backup, "Failed").context("no Failed condition")?;
    ensure!(
        reason == "HookFailed" && message.contains("not run again"),
        "{reason}: {message}"
    );
    let status = backup.status.clone().unwrap_or_default();
    let slow = status
        .hooks
        .iter()
        .find(|h| h.name == "slow")
        .context("slow")?;
    ensure!(
        !slow.succeeded && (slow.started, slow.finished, slow.failed_count) == (1, 1, 1),
        "{slow:?}"
    );
    ensure!(slow.failed_pods == ["crash-0"], "{slow:?}");
    // Give a wrongly repeated exec time to show, then count.
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    let log = exec(&pods, "crash-0", None, &["cat", "/data/slow.log"], None).await?;
    let log = String::from_utf8_lossy(&log.stdout).to_string();
    ensure!(log.lines().count() == 1, "ran again: {log:?}");
    let thaw = exec(&pods, "crash-0", None, &["cat", "/data/thaw.log"], None).await?;
    let thaw = String::from_utf8_lossy(&thaw.stdout).to_string();
    ensure!(thaw.lines().count() == 1, "post-hook once: {thaw:?}");
    world.finish().await
}
