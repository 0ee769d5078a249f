//! `cargo xtask demo`: the operator's main job on the local cluster, as a user would run
//! it. The cluster comes up, the chart installs the manager as a pod, the examples are
//! applied as written (with the repository pointed at the local S3 server), real data
//! goes into redis and postgres, both are backed up by the operator (redis by its dump
//! command, postgres by its volume), and the stored backups are restored by hand with
//! standard tools and checked. Restore objects replace the by-hand step with issue #7.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{AttachParams, Patch, PatchParams};
use kube::{Api, Client};
use serde::Deserialize;
use tokio::io::AsyncReadExt;

use crate::testenv::{self, Env};

const NAMESPACE: &str = "stateward-demo";
const SYSTEM_NAMESPACE: &str = "stateward-system";

pub fn run() -> Result<()> {
    let started = Instant::now();
    let env = testenv::up()?;
    let tools = crate::tools::ensure_all()?;
    let helm = tools.get("helm").context("helm was not built")?;
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let client = client(&env).await?;
        say("installing the Stateward chart (manager as a pod, image `stateward` = this build)");
        install_chart(helm, &env)?;

        say("creating the example repository's bucket on the local S3 server");
        create_bucket(&env, "stateward-backups").await?;

        say(&format!(
            "applying examples/ into namespace {NAMESPACE}, which enforces Pod Security \"restricted\" (apps and Stateward's agents alike)"
        ));
        let namespaces: Api<Namespace> = Api::all(client.clone());
        let ns: Namespace = serde_json::from_value(serde_json::json!({"metadata": {
            "name": NAMESPACE,
            "labels": {"pod-security.kubernetes.io/enforce": "restricted"},
        }}))?;
        namespaces
            .patch(
                NAMESPACE,
                &PatchParams::apply("stateward-demo").force(),
                &Patch::Apply(&ns),
            )
            .await?;
        let examples = crate::repo_root().join("examples");
        for file in [
            "repository.yaml",
            "redis.yaml",
            "postgres-restricted.yaml",
            "redis-app.yaml",
            "postgres-app.yaml",
        ] {
            let mut yaml = std::fs::read_to_string(examples.join(file))?;
            if file == "repository.yaml" {
                // The example points at the local S3 server's usual address; use the port
                // this cluster got.
                yaml = yaml.replace("http://10.213.0.1:9000", &env.s3_endpoint_from_pods);
            }
            apply(&client, &yaml)
                .await
                .with_context(|| format!("applying examples/{file}"))?;
            println!("  applied examples/{file}");
        }

        say("waiting for redis and postgres to be ready");
        let pods: Api<Pod> = Api::namespaced(client.clone(), NAMESPACE);
        for pod in ["redis-0", "postgres-0"] {
            wait_ready(&pods, pod).await?;
            println!("  {pod} is Ready");
        }

        say("writing real data");
        let out = exec(
            &pods,
            "redis-0",
            &["redis-cli", "SET", "demo:greeting", "hello from stateward"],
        )
        .await?;
        println!("  redis SET demo:greeting -> {}", out.trim());
        let sql = "CREATE TABLE IF NOT EXISTS demo (id int PRIMARY KEY, note text); \
                   INSERT INTO demo VALUES (1, 'hello from stateward') ON CONFLICT DO NOTHING; \
                   SELECT count(*) FROM demo;";
        let out = exec(
            &pods,
            "postgres-0",
            &["psql", "-U", "postgres", "-tA", "-c", sql],
        )
        .await?;
        println!(
            "  postgres rows in demo: {}",
            out.lines().last().unwrap_or_default().trim()
        );

        say("waiting for the backup controller to check the repository");
        wait_repository_checked(&client, "default").await?;

        say("backing up redis (Exec: an RDB dump) and postgres (Volume, after a CHECKPOINT hook): examples/backup-now.yaml");
        // Backups run once; a fresh name per demo run keeps earlier runs visible.
        let suffix = chrono_suffix();
        let yaml = std::fs::read_to_string(crate::repo_root().join("examples/backup-now.yaml"))?
            .replace("name: redis-now", &format!("name: redis-{suffix}"))
            .replace("name: postgres-now", &format!("name: postgres-{suffix}"));
        apply(&client, &yaml).await.context("applying examples/backup-now.yaml")?;
        let redis = wait_backup(&client, &format!("redis-{suffix}")).await?;
        let postgres = wait_backup(&client, &format!("postgres-{suffix}")).await?;

        say("verifying the stored backups by hand, with standard tools");
        verify_redis_backup(&env, &redis).await?;
        verify_postgres_backup(&env, &postgres).await?;

        say("destroying the data");
        let out = exec(&pods, "redis-0", &["sh", "-c", "redis-cli FLUSHALL && redis-cli SET demo:greeting 'overwritten by mistake'"]).await?;
        println!("  redis FLUSHALL, then SET demo:greeting 'overwritten by mistake' -> {}", out.trim().replace('\n', " "));
        let out = exec(&pods, "postgres-0", &["psql", "-U", "postgres", "-tA", "-c", "DROP TABLE demo;"]).await?;
        println!("  postgres DROP TABLE demo -> {}", out.trim());

        say("restoring both in place: examples/restore-now.yaml");
        let yaml = std::fs::read_to_string(crate::repo_root().join("examples/restore-now.yaml"))?
            .replace("name: redis-restore", &format!("name: redis-restore-{suffix}"))
            .replace("name: postgres-restore", &format!("name: postgres-restore-{suffix}"))
            .replace("backup: redis-now", &format!("backup: redis-{suffix}"))
            .replace("backup: postgres-now", &format!("backup: postgres-{suffix}"));
        apply(&client, &yaml).await.context("applying examples/restore-now.yaml")?;
        for name in [format!("redis-restore-{suffix}"), format!("postgres-restore-{suffix}")] {
            let restore = wait_restore(&client, &name).await?;
            let status = restore.status.unwrap_or_default();
            println!(
                "  Restore {name}: {:?} in {}, verified {}, {} volume(s): {}",
                status.phase.unwrap_or_default(),
                status.duration.unwrap_or_default(),
                status.verified,
                status.volumes.len(),
                status
                    .volumes
                    .iter()
                    .map(|v| format!("{} ({} bytes)", v.target, v.bytes_written.unwrap_or(0)))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }

        say("the data is back");
        for pod in ["redis-0", "postgres-0"] {
            wait_ready(&pods, pod).await?;
        }
        let greeting = exec(&pods, "redis-0", &["redis-cli", "GET", "demo:greeting"]).await?;
        println!("  redis GET demo:greeting -> {}", greeting.trim());
        anyhow::ensure!(greeting.trim() == "hello from stateward", "redis did not come back: {greeting}");
        let note = exec(&pods, "postgres-0", &["psql", "-U", "postgres", "-tA", "-c", "SELECT note FROM demo WHERE id = 1;"]).await?;
        println!("  postgres SELECT note FROM demo -> {}", note.trim());
        anyhow::ensure!(note.trim() == "hello from stateward", "postgres did not come back: {note}");

        say("the monitoring controller's view: both apps Healthy again");
        for app in ["redis", "postgres"] {
            let message = wait_healthy(&client, app).await?;
            println!("  StatefulApp {app}: Healthy=True ({message})");
        }

        say("what a user sees (kubectl get statefulapps,backuprepositories,backups,restores -n stateward-demo)");
        for plural in ["statefulapps", "backuprepositories", "backups", "restores"] {
            print_table(&client, plural).await?;
        }
        let system: Api<Pod> = Api::namespaced(client.clone(), SYSTEM_NAMESPACE);
        for pod in system.list(&Default::default()).await?.items {
            let name = pod.metadata.name.clone().unwrap_or_default();
            let phase = pod.status.and_then(|s| s.phase).unwrap_or_default();
            println!("  manager pod {name}: {phase}");
        }
        Ok::<_, anyhow::Error>(())
    })?;
    say("done");
    println!(
        "The demo ran in {:.0} s. The local cluster stays up: `eval \"$(cargo xtask testenv env)\"` to use it, \
         `cargo xtask testenv down` to stop it.\n\
         The examples' schedules fire on their own clock; schedules, retention, scaling and the \
         other restore modes (clone, repository path, streaming into psql) are exercised by \
         `cargo xtask test` (docs/schedules.md, docs/scaling.md, docs/restore.md).",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn chrono_suffix() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    format!("{secs}")
}

/// Waits for a Backup to end; prints its volumes; fails unless it Completed.
/// Waits for the app's `Healthy` condition (the monitoring controller re-assesses every
/// 10 s); returns its message.
async fn wait_healthy(client: &Client, name: &str) -> Result<String> {
    let api: Api<stateward_api::StatefulApp> = Api::namespaced(client.clone(), NAMESPACE);
    let deadline = Instant::now() + std::time::Duration::from_secs(120);
    loop {
        let app = api.get(name).await?;
        let healthy = app
            .status
            .as_ref()
            .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Healthy"))
            .map(|c| (c.status == "True", c.message.clone()));
        match healthy {
            Some((true, message)) => return Ok(message),
            Some((false, message)) if Instant::now() > deadline => {
                anyhow::bail!("StatefulApp {name} is not Healthy: {message}")
            }
            None if Instant::now() > deadline => {
                anyhow::bail!("StatefulApp {name} has no Healthy condition")
            }
            _ => tokio::time::sleep(std::time::Duration::from_secs(2)).await,
        }
    }
}

async fn wait_restore(client: &Client, name: &str) -> Result<stateward_api::Restore> {
    let api: Api<stateward_api::Restore> = Api::namespaced(client.clone(), NAMESPACE);
    let deadline = Instant::now() + std::time::Duration::from_secs(600);
    loop {
        let restore = api.get(name).await?;
        match restore.status.as_ref().and_then(|s| s.phase) {
            Some(stateward_api::RestorePhase::Completed) => return Ok(restore),
            Some(stateward_api::RestorePhase::Failed) => {
                let why = restore
                    .status
                    .as_ref()
                    .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"))
                    .map(|c| format!("{}: {}", c.reason, c.message))
                    .unwrap_or_default();
                anyhow::bail!("Restore {name} failed: {why}");
            }
            _ if Instant::now() > deadline => {
                anyhow::bail!("Restore {name} did not finish in 10 minutes")
            }
            _ => tokio::time::sleep(std::time::Duration::from_secs(2)).await,
        }
    }
}

async fn wait_backup(client: &Client, name: &str) -> Result<stateward_api::Backup> {
    let api: Api<stateward_api::Backup> = Api::namespaced(client.clone(), NAMESPACE);
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let backup = api.get(name).await?;
        let status = backup.status.clone().unwrap_or_default();
        match status.phase {
            Some(stateward_api::BackupPhase::Completed) => {
                println!(
                    "  Backup {name}: Completed in {}, {} bytes stored under {}",
                    status.duration.unwrap_or_default(),
                    status.stored_bytes.unwrap_or(0),
                    status.location.clone().unwrap_or_default()
                );
                for v in &status.volumes {
                    println!(
                        "    {} (pod {}, node {}): read {} B, stored {} B, sha256 {}",
                        v.name,
                        v.pod.clone().unwrap_or_default(),
                        v.node.clone().unwrap_or_default(),
                        v.bytes_read.unwrap_or(0),
                        v.bytes_stored.unwrap_or(0),
                        &v.sha256.clone().unwrap_or_default()
                            [..12.min(v.sha256.as_ref().map_or(0, String::len))]
                    );
                }
                return Ok(backup);
            }
            Some(stateward_api::BackupPhase::Failed) => {
                let why = status
                    .conditions
                    .iter()
                    .find(|c| c.type_ == "Failed")
                    .map(|c| format!("{}: {}", c.reason, c.message))
                    .unwrap_or_default();
                bail!("Backup {name} failed: {why}");
            }
            _ => {}
        }
        if Instant::now() > deadline {
            bail!(
                "Backup {name} did not finish within 300 s (phase {:?})",
                status.phase
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn fetch(env: &Env, key: &str) -> Result<Vec<u8>> {
    let s3 = stateward_agent::cli::s3_client_with(
        &env.s3_access_key,
        &env.s3_secret_key,
        Some(&env.s3_endpoint),
        &env.s3_region,
        true,
        false,
    );
    Ok(s3
        .get_object()
        .bucket("stateward-backups")
        .key(key)
        .send()
        .await
        .with_context(|| format!("fetching {key}"))?
        .body
        .collect()
        .await?
        .into_bytes()
        .to_vec())
}

fn sh(script: &str) -> Result<String> {
    let out = Command::new("sh").arg("-c").arg(script).output()?;
    if !out.status.success() {
        bail!("{script}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The redis dump: fetch, `zstd -d`, load into a fresh local redis-server, read the key.
async fn verify_redis_backup(env: &Env, backup: &stateward_api::Backup) -> Result<()> {
    let status = backup.status.clone().unwrap_or_default();
    let key = status
        .volumes
        .first()
        .and_then(|v| v.key.clone())
        .context("no object")?;
    let work = env.state_dir.join("demo-restore/redis");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    std::fs::write(work.join("dump.rdb.zst"), fetch(env, &key).await?)?;
    sh(&format!(
        "zstd -q -d {0}/dump.rdb.zst -o {0}/dump.rdb",
        work.display()
    ))?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let mut server = Command::new("redis-server")
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
        .spawn()
        .context("starting a fresh redis-server")?;
    let mut value = Err(anyhow::anyhow!("redis-server did not answer"));
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        value = sh(&format!("redis-cli -p {port} GET demo:greeting"));
        if matches!(&value, Ok(v) if !v.is_empty()) {
            break;
        }
    }
    let _ = server.kill();
    let _ = server.wait();
    let value = value?;
    if value != "hello from stateward" {
        bail!("the restored redis has demo:greeting = {value:?}");
    }
    println!(
        "  s3://stateward-backups/{key} | zstd -d -> a fresh redis-server: GET demo:greeting = {value:?}"
    );
    Ok(())
}

/// The postgres volume: fetch, check the sha256 against the manifest, `zstd -d | tar x`,
/// and read the cluster's PG_VERSION.
async fn verify_postgres_backup(env: &Env, backup: &stateward_api::Backup) -> Result<()> {
    use sha2::Digest;
    let status = backup.status.clone().unwrap_or_default();
    let prefix = status.location.clone().context("no location")?;
    let manifest: serde_json::Value =
        serde_json::from_slice(&fetch(env, &format!("{prefix}/manifest.json")).await?)?;
    let entry = &manifest["entries"][0];
    let key = entry["key"].as_str().context("no entry in the manifest")?;
    let data = fetch(env, key).await?;
    let sum = hex::encode(sha2::Sha256::digest(&data));
    if entry["sha256"].as_str() != Some(sum.as_str()) {
        bail!("sha256 of {key} differs from the manifest");
    }
    let work = env.state_dir.join("demo-restore/postgres");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    std::fs::write(work.join("data.tar.zst"), &data)?;
    sh(&format!(
        "zstd -q -d -c {0}/data.tar.zst | tar -x -C {0}",
        work.display()
    ))?;
    let version = std::fs::read_to_string(work.join("pgdata/PG_VERSION"))
        .context("pgdata/PG_VERSION missing from the restored volume")?;
    let files = sh(&format!(
        "find {} -type f | wc -l",
        work.join("pgdata").display()
    ))?;
    println!(
        "  manifest.json format {} lists {key}; sha256 matches; zstd -d | tar x -> pgdata with {files} files, PG_VERSION {}",
        manifest["formatVersion"],
        version.trim()
    );
    Ok(())
}

pub(crate) async fn create_bucket(env: &Env, bucket: &str) -> Result<()> {
    // The same client construction the operator uses.
    let s3 = stateward_agent::cli::s3_client_with(
        &env.s3_access_key,
        &env.s3_secret_key,
        Some(&env.s3_endpoint),
        &env.s3_region,
        true,
        false,
    );
    if s3.head_bucket().bucket(bucket).send().await.is_err() {
        s3.create_bucket()
            .bucket(bucket)
            .send()
            .await
            .context("creating the demo bucket")?;
    }
    println!("  bucket {bucket} ready");
    Ok(())
}

async fn wait_repository_checked(client: &Client, name: &str) -> Result<()> {
    let api: Api<stateward_api::BackupRepository> = Api::namespaced(client.clone(), NAMESPACE);
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let repo = api.get(name).await?;
        if let Some(c) = repo
            .status
            .and_then(|s| s.conditions.into_iter().find(|c| c.type_ == "Ready"))
        {
            println!(
                "  BackupRepository {name}: Ready={} reason={} ({})",
                c.status, c.reason, c.message
            );
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "the backup controller did not check repository {name} within 90 s (see the manager pod's log)"
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn say(what: &str) {
    println!("\n==> {what}");
}

pub(crate) async fn client(env: &Env) -> Result<Client> {
    let kubeconfig = kube::config::Kubeconfig::read_from(&env.kubeconfig)?;
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default()).await?;
    Ok(Client::try_from(config)?)
}

fn install_chart(helm: &std::path::Path, env: &Env) -> Result<()> {
    let chart = crate::repo_root().join("charts/stateward");
    let output = Command::new(helm)
        .args(["upgrade", "--install", "stateward"])
        .arg(&chart)
        // A cluster kept by `cargo xtask test --keep` already holds the chart's fixed exec
        // ClusterRole and policy (the tests install them under the same names).
        .arg("--take-ownership")
        .args([
            "--namespace",
            SYSTEM_NAMESPACE,
            "--create-namespace",
            "--wait",
            "--timeout",
            "3m",
        ])
        .args([
            "--set",
            "image.repository=stateward",
            "--set",
            "image.tag=dev",
            "--set",
            "logFormat=text",
        ])
        .env("KUBECONFIG", &env.kubeconfig)
        .output()?;
    if !output.status.success() {
        bail!(
            "helm install failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    println!("  release stateward installed in {SYSTEM_NAMESPACE}");
    Ok(())
}

async fn apply(client: &Client, yaml: &str) -> Result<()> {
    stateward_testkit::harness::apply_yaml(client, NAMESPACE, yaml, "stateward-demo").await?;
    Ok(())
}

pub(crate) fn serde_yaml_docs(yaml: &str) -> Result<Vec<serde_json::Value>> {
    let mut docs = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(yaml) {
        let value = serde_json::Value::deserialize(doc)?;
        if !value.is_null() {
            docs.push(value);
        }
    }
    Ok(docs)
}

async fn wait_ready(pods: &Api<Pod>, name: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        if let Some(pod) = pods.get_opt(name).await? {
            let ready = pod
                .status
                .and_then(|s| s.conditions)
                .unwrap_or_default()
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True");
            if ready {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            bail!("pod {name} did not become ready in 3 minutes");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn exec(pods: &Api<Pod>, pod: &str, command: &[&str]) -> Result<String> {
    let mut attached = pods
        .exec(
            pod,
            command.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
            &AttachParams::default().stderr(false),
        )
        .await?;
    let mut out = String::new();
    if let Some(mut stdout) = attached.stdout() {
        stdout.read_to_string(&mut out).await?;
    }
    attached.join().await?;
    Ok(out)
}

async fn print_table(client: &Client, plural: &str) -> Result<()> {
    let request = http::Request::get(format!(
        "/apis/stateward.io/v1alpha1/namespaces/{NAMESPACE}/{plural}"
    ))
    .header("Accept", "application/json;as=Table;v=v1;g=meta.k8s.io")
    .body(Vec::new())?;
    let table: serde_json::Value = client.request(request).await?;
    let columns: Vec<String> = table["columnDefinitions"]
        .as_array()
        .map(|c| {
            c.iter()
                .filter_map(|c| c["name"].as_str().map(|s| s.to_uppercase()))
                .collect()
        })
        .unwrap_or_default();
    println!("  {}", columns.join("\t"));
    for row in table["rows"].as_array().cloned().unwrap_or_default() {
        let cells: Vec<String> = row["cells"]
            .as_array()
            .map(|c| {
                c.iter()
                    .map(|v| {
                        v.as_str().map(String::from).unwrap_or_else(|| {
                            if v.is_null() {
                                "<none>".into()
                            } else {
                                v.to_string()
                            }
                        })
                    })
                    .collect()
            })
            .unwrap_or_default();
        println!("  {}", cells.join("\t"));
    }
    Ok(())
}
