//! `cargo xtask bench scale`: what an idle Stateward costs at scale, on the local cluster,
//! with the release manager under the chart's own ServiceAccount and RBAC.
//!
//! 1. While the manager is down: N StatefulApps (a few with a running pod, the rest at
//!    zero replicas; one yearly schedule each, so nothing fires), unmanaged pods and PVCs
//!    around them, and M terminal Backups.
//! 2. The manager starts: the time until every app's status is current (every section's
//!    `observedGeneration` equals the generation).
//! 3. Three idle cycles: the manager's requests from the API server's audit log (by verb
//!    and resource; writes apart), reconciles per controller from its `/metrics`, its RSS.
//! 4. Optionally every schedule moved to the same minute (jitter 0): the delay from the
//!    slot to each Backup's creation (p50, p99, max).
//! 5. The apps deleted: RSS after.
//!
//! It prints figures and asserts nothing.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use chrono::{DateTime, Timelike, Utc};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::authentication::v1::TokenRequest;
use k8s_openapi::api::core::v1::{Namespace, Secret, ServiceAccount};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use stateward_api::{Backup, BackupRepository, StatefulApp};
use stateward_testkit::audit;

use crate::testenv::{self, Env};

#[derive(clap::Args, Debug)]
pub struct ScaleBench {
    /// StatefulApps to create.
    #[arg(long, default_value_t = 1000)]
    apps: usize,
    /// Of those, apps whose StatefulSet runs one pod (the rest are at zero replicas).
    #[arg(long, default_value_t = 20)]
    running: usize,
    /// Terminal (Completed) Backups, spread over the apps.
    #[arg(long, default_value_t = 10_000)]
    backups: usize,
    /// Namespaces to spread the apps over.
    #[arg(long, default_value_t = 1)]
    namespaces: usize,
    /// Length of each of the three idle cycles, in seconds.
    #[arg(long, default_value_t = 60)]
    idle_seconds: u64,
    /// Move every schedule to the same minute and time slot → Backup created.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    burst: bool,
    /// A manager binary to measure instead of this checkout's release build (e.g. an
    /// earlier commit's, for a before/after comparison under the same bench).
    #[arg(long)]
    manager: Option<PathBuf>,
}

const SYSTEM: &str = "stateward-bench";
const BUCKET: &str = "stateward-bench";
const BENCH_LABEL: &str = "stateward.io/bench";
const FIELD_MANAGER: &str = "stateward-bench";

fn namespace(i: usize) -> String {
    format!("bench-scale-{i}")
}

pub fn scale(args: ScaleBench) -> Result<()> {
    let env = testenv::up()?;
    let tools = crate::tools::ensure_all()?;
    let helm = tools.get("helm").context("helm was not built")?.clone();
    let manager = match &args.manager {
        Some(path) => path.clone(),
        None => crate::bench::release_agent()?,
    };
    println!("==> manager binary: {}", manager.display());
    let out = testenv::target_dir().join("bench/scale");
    std::fs::create_dir_all(&out)?;
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let client = crate::demo::client(&env).await?;
        let result = run(&args, &env, &client, &helm, &manager, &out).await;
        println!("\n==> cleaning up");
        clean(&client, &args).await;
        result
    })
}

async fn run(
    args: &ScaleBench,
    env: &Env,
    client: &Client,
    helm: &Path,
    manager: &Path,
    out: &Path,
) -> Result<()> {
    // First: on a fresh cluster (no test ran) listing StatefulApps is a 404 without them.
    stateward_testkit::harness::install_crds(client, &stateward_api::crds()).await?;
    clean(client, args).await;
    println!(
        "==> bench scale: {} apps ({} running) in {} namespace(s), {} terminal Backups",
        args.apps, args.running, args.namespaces, args.backups
    );
    // The manager watches every namespace: apps left by tests count in its figures.
    let strays: Vec<String> = Api::<StatefulApp>::all(client.clone())
        .list(&ListParams::default())
        .await?
        .items
        .iter()
        .filter(|a| {
            !a.namespace()
                .is_some_and(|ns| ns.starts_with("bench-scale-"))
        })
        .map(|a| format!("{}/{}", a.namespace().unwrap_or_default(), a.name_any()))
        .collect();
    if !strays.is_empty() {
        println!(
            "  note: {} StatefulApp(s) outside the bench's namespaces ({}): the manager \
             reconciles them too, and their requests count in the figures below",
            strays.len(),
            strays
                .iter()
                .take(5)
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let user = install_identity(client, helm).await?;
    let kubeconfig = out.join("kubeconfig");
    let token = token(client, &user.1).await?;
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: {}\n    \
             certificate-authority: {}\nusers:\n- name: u\n  user:\n    token: {token}\ncontexts:\n\
             - name: c\n  context: {{ cluster: c, user: u, namespace: {SYSTEM} }}\ncurrent-context: c\n",
            env.api_server,
            env.ca_cert.display()
        ),
    )?;

    let started = Instant::now();
    create_world(client, env, args).await?;
    println!(
        "  created the apps, StatefulSets and Backups in {:.0} s (manager down)",
        started.elapsed().as_secs_f64()
    );

    let admin_port = testenv::free_port()?;
    let mut process = start_manager(manager, &kubeconfig, admin_port, out)?;
    let pid = process.id();
    let log = audit_log(env)?;
    let result = measure(args, client, &user.0, &log, pid, admin_port).await;
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = process.wait();
    println!("  manager log: {}", out.join("manager.log").display());
    result
}

async fn measure(
    args: &ScaleBench,
    client: &Client,
    user: &str,
    log: &Path,
    pid: u32,
    admin_port: u16,
) -> Result<()> {
    let started = Instant::now();
    let apps: Api<StatefulApp> = Api::all(client.clone());
    let selector = ListParams::default().labels(BENCH_LABEL);
    let deadline = started + Duration::from_secs(600);
    loop {
        let list = apps.list(&selector).await?.items;
        let current = list.iter().filter(|a| is_current(a)).count();
        if current == list.len() {
            println!(
                "\n==> every app's status current {:.1} s after the manager started ({} apps)",
                started.elapsed().as_secs_f64(),
                list.len()
            );
            break;
        }
        if Instant::now() > deadline {
            println!(
                "\n==> NOT every app's status current after 600 s: {current} of {}",
                list.len()
            );
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    println!(
        "  RSS after start: {} (peak so far {})",
        mib(rss_kib(pid)),
        mib(hwm_kib(pid))
    );

    for cycle in 1..=3 {
        idle_cycle(cycle, args.idle_seconds, user, log, pid, admin_port).await?;
    }

    if args.burst {
        burst(client, args).await?;
    }

    println!("\n==> deleting the apps");
    for i in 0..args.namespaces {
        let api: Api<StatefulApp> = Api::namespaced(client.clone(), &namespace(i));
        api.delete_collection(&DeleteParams::default(), &selector)
            .await?;
    }
    tokio::time::sleep(Duration::from_secs(args.idle_seconds)).await;
    println!(
        "  RSS {} s after the apps were deleted: {} (peak {})",
        args.idle_seconds,
        mib(rss_kib(pid)),
        mib(hwm_kib(pid))
    );
    Ok(())
}

/// One idle window: what the manager sent (audit log), what it reconciled (/metrics).
async fn idle_cycle(
    cycle: u32,
    seconds: u64,
    user: &str,
    log: &Path,
    pid: u32,
    port: u16,
) -> Result<()> {
    let before = reconciles(port).await.unwrap_or_default();
    let from = Utc::now();
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let to = Utc::now();
    let after = reconciles(port).await.unwrap_or_default();
    // The API server writes its audit log as requests complete; give the last ones a moment.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let requests: Vec<audit::Request> = audit::read_since(log, from)?
        .into_iter()
        .filter(|r| r.user == user && r.at < to)
        .collect();
    let writes: Vec<&audit::Request> = requests.iter().filter(|r| r.is_write()).collect();
    let window = (to - from).num_milliseconds() as f64 / 1000.0;
    println!(
        "\n==> idle cycle {cycle} ({window:.0} s): {} requests ({:.2}/s), {} writes ({:.2}/s); RSS {}",
        requests.len(),
        requests.len() as f64 / window,
        writes.len(),
        writes.len() as f64 / window,
        mib(rss_kib(pid))
    );
    for (what, n) in audit::by_verb_and_resource(&requests).iter().take(12) {
        println!("  {n:>7}  {:>7.2}/s  {what}", *n as f64 / window);
    }
    let mut lines: Vec<String> = after
        .iter()
        .map(|(controller, n)| {
            let was = before
                .iter()
                .find(|(c, _)| c == controller)
                .map(|(_, n)| *n)
                .unwrap_or(0.0);
            format!("{controller} {:.0}", n - was)
        })
        .collect();
    lines.sort();
    println!("  reconciles: {}", lines.join(", "));
    Ok(())
}

/// Every schedule moved to one minute with no jitter: slot → Backup created.
async fn burst(client: &Client, args: &ScaleBench) -> Result<()> {
    let slot = (Utc::now() + chrono::Duration::seconds(90))
        .with_second(0)
        .and_then(|t| t.with_nanosecond(0))
        .context("a whole minute")?
        + chrono::Duration::minutes(1);
    let cron = format!("{} {} * * *", slot.minute(), slot.hour());
    println!(
        "\n==> burst: every schedule moved to {cron} (UTC, jitter 0), slot {}",
        slot.to_rfc3339()
    );
    let patch = serde_json::json!({"spec": {"backup": {"schedules": [
        {"name": "yearly", "cron": cron, "timeZone": "UTC", "jitterSeconds": 0}
    ]}}});
    let names = app_names(args);
    futures::stream::iter(names.iter())
        .map(|(ns, name)| {
            let api: Api<StatefulApp> = Api::namespaced(client.clone(), ns);
            let patch = patch.clone();
            async move {
                api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                    .map(|_| ())
            }
        })
        .buffer_unordered(16)
        .try_collect::<Vec<()>>()
        .await?;
    let backups: Api<Backup> = Api::all(client.clone());
    let scheduled = ListParams::default().labels(stateward_api::common::SCHEDULE_LABEL);
    let deadline = Instant::now() + Duration::from_secs(90 + 60 + 120);
    let mut delays: Vec<f64> = loop {
        let list = backups.list(&scheduled).await?.items;
        let delays: Vec<f64> = list
            .iter()
            .filter_map(|b| b.creation_timestamp())
            .filter_map(|t| DateTime::<Utc>::from_timestamp(t.0.as_second(), 0))
            .filter(|t| *t >= slot)
            .map(|t| (t - slot).num_milliseconds() as f64 / 1000.0)
            .collect();
        if delays.len() >= args.apps || Instant::now() > deadline {
            break delays;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    delays.sort_by(f64::total_cmp);
    let pick = |q: f64| {
        delays
            .get(((delays.len() as f64 - 1.0) * q).round() as usize)
            .copied()
            .unwrap_or(f64::NAN)
    };
    println!(
        "  {} of {} Backups created; slot → created (creationTimestamp, 1 s resolution): p50 {:.0} s, p99 {:.0} s, max {:.0} s",
        delays.len(),
        args.apps,
        pick(0.5),
        pick(0.99),
        pick(1.0)
    );
    Ok(())
}

fn is_current(app: &StatefulApp) -> bool {
    let generation = app.metadata.generation;
    let Some(status) = &app.status else {
        return false;
    };
    let sections = [
        status.backup.as_ref().map(|s| s.observed_generation),
        status.scaling.as_ref().map(|s| s.observed_generation),
        status.health.as_ref().map(|s| s.observed_generation),
    ];
    sections.iter().all(|s| *s == Some(generation))
}

/// `(namespace, name)` of every app, spread round-robin over the namespaces.
fn app_names(args: &ScaleBench) -> Vec<(String, String)> {
    (0..args.apps)
        .map(|i| (namespace(i % args.namespaces.max(1)), format!("app-{i}")))
        .collect()
}

async fn create_world(client: &Client, env: &Env, args: &ScaleBench) -> Result<()> {
    crate::demo::create_bucket(env, BUCKET).await?;
    for i in 0..args.namespaces.max(1) {
        let ns = namespace(i);
        let namespaces: Api<Namespace> = Api::all(client.clone());
        namespaces
            .create(
                &PostParams::default(),
                &serde_json::from_value(serde_json::json!({"metadata": {"name": ns}}))?,
            )
            .await?;
        let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
        secrets
            .create(
                &PostParams::default(),
                &serde_json::from_value(serde_json::json!({
                    "metadata": {"name": "bench-s3", "labels": {"stateward.io/repository-secret": "true"}},
                    "stringData": {"accessKeyId": env.s3_access_key, "secretAccessKey": env.s3_secret_key},
                }))?,
            )
            .await?;
        let repos: Api<BackupRepository> = Api::namespaced(client.clone(), &ns);
        repos
            .create(
                &PostParams::default(),
                &serde_json::from_value(serde_json::json!({
                    "metadata": {"name": "default"},
                    "spec": {"s3": {
                        "bucket": BUCKET, "prefix": ns, "region": env.s3_region,
                        "endpoint": env.s3_endpoint_from_pods, "forcePathStyle": true,
                        "credentials": {
                            "accessKeyId": {"name": "bench-s3", "key": "accessKeyId"},
                            "secretAccessKey": {"name": "bench-s3", "key": "secretAccessKey"},
                        },
                    }},
                }))?,
            )
            .await?;
        // Unmanaged neighbours: pods and claims no app names.
        let sets: Api<StatefulSet> = Api::namespaced(client.clone(), &ns);
        sets.create(&PostParams::default(), &statefulset("unmanaged", 2, false)?)
            .await?;
    }
    let names = app_names(args);
    futures::stream::iter(names.iter().enumerate())
        .map(|(i, (ns, name))| {
            let client = client.clone();
            async move {
                let sets: Api<StatefulSet> = Api::namespaced(client.clone(), ns);
                let replicas = if i < args.running { 1 } else { 0 };
                sets.create(&PostParams::default(), &statefulset(name, replicas, true)?)
                    .await?;
                let apps: Api<StatefulApp> = Api::namespaced(client, ns);
                apps.create(
                    &PostParams::default(),
                    &serde_json::from_value(serde_json::json!({
                        "metadata": {"name": name, "labels": {BENCH_LABEL: "true"}},
                        "spec": {
                            "statefulSetName": name,
                            "backup": {"repository": "default", "schedules": [
                                {"name": "yearly", "cron": "0 3 1 1 *", "timeZone": "UTC"}
                            ]},
                        },
                    }))?,
                )
                .await?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(16)
        .try_collect::<Vec<()>>()
        .await?;
    println!("  {} apps created", names.len());
    let now = Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    futures::stream::iter(0..args.backups)
        .map(|i| {
            let (ns, app) = names[i % names.len().max(1)].clone();
            let client = client.clone();
            let now = now.clone();
            async move {
                let api: Api<Backup> = Api::namespaced(client, &ns);
                let name = format!("{app}-old-{i}");
                api.create(
                    &PostParams::default(),
                    &serde_json::from_value(serde_json::json!({
                        "metadata": {"name": name, "labels": {stateward_api::common::APP_LABEL: app}},
                        "spec": {"app": app},
                    }))?,
                )
                .await?;
                api.patch_status(
                    &name,
                    &PatchParams::default(),
                    &Patch::Merge(serde_json::json!({"status": {
                        "phase": "Completed", "startTime": now, "completionTime": now,
                        "location": format!("{ns}/backups/{name}"),
                    }})),
                )
                .await?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(16)
        .try_collect::<Vec<()>>()
        .await?;
    println!("  {} terminal Backups created", args.backups);
    Ok(())
}

fn statefulset(name: &str, replicas: i32, labelled: bool) -> Result<StatefulSet> {
    let labels = if labelled {
        "bench: app"
    } else {
        "bench: unmanaged"
    };
    Ok(serde_yaml::from_str(&format!(
        r#"
metadata: {{ name: {name} }}
spec:
  replicas: {replicas}
  serviceName: {name}
  podManagementPolicy: Parallel
  selector: {{ matchLabels: {{ app: {name} }} }}
  template:
    metadata: {{ labels: {{ app: {name}, {labels} }} }}
    spec:
      terminationGracePeriodSeconds: 1
      containers:
      - name: main
        image: stateward-probe:dev
        command: [sh, -c, "touch /tmp/ready; exec sleep 100000"]
        readinessProbe: {{ exec: {{ command: [test, -f, /tmp/ready] }}, periodSeconds: 10 }}
        volumeMounts: [{{ name: data, mountPath: /data }}]
  volumeClaimTemplates:
  - metadata: {{ name: data }}
    spec:
      accessModes: [ReadWriteOnce]
      resources: {{ requests: {{ storage: 8Mi }} }}
"#
    ))?)
}

/// The chart's ServiceAccount and RBAC (rendered by helm, applied without the Deployment):
/// the manager runs here under exactly the rights the chart grants. Returns the audit
/// user name and the ServiceAccount's name.
async fn install_identity(client: &Client, helm: &Path) -> Result<(String, String)> {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .patch(
            SYSTEM,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(serde_json::json!({
                "apiVersion": "v1", "kind": "Namespace", "metadata": {"name": SYSTEM}
            })),
        )
        .await?;
    let output = Command::new(helm)
        .args(["template", "stateward"])
        .arg(crate::repo_root().join("charts/stateward"))
        .args(["--namespace", SYSTEM])
        // helm's default is v1.20, which the chart's kubeVersion refuses.
        .args([
            "--kube-version",
            crate::tools::KUBERNETES_VERSION.trim_start_matches('v'),
        ])
        .output()?;
    if !output.status.success() {
        bail!(
            "helm template failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let rendered = String::from_utf8(output.stdout)?;
    let mut wanted = String::new();
    let mut account = None;
    for doc in crate::demo::serde_yaml_docs(&rendered)? {
        let kind = doc["kind"].as_str().unwrap_or_default();
        if kind == "ServiceAccount" {
            account = doc["metadata"]["name"].as_str().map(String::from);
        }
        if matches!(
            kind,
            "ServiceAccount" | "ClusterRole" | "ClusterRoleBinding" | "Role" | "RoleBinding"
        ) {
            wanted.push_str("---\n");
            wanted.push_str(&serde_yaml::to_string(&doc)?);
        }
    }
    let account = account.context("the chart renders no ServiceAccount")?;
    stateward_testkit::harness::apply_yaml(client, SYSTEM, &wanted, FIELD_MANAGER).await?;
    Ok((format!("system:serviceaccount:{SYSTEM}:{account}"), account))
}

async fn token(client: &Client, account: &str) -> Result<String> {
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), SYSTEM);
    let request: TokenRequest = serde_json::from_value(serde_json::json!({
        "spec": {"audiences": ["https://kubernetes.default.svc.cluster.local"], "expirationSeconds": 86_400}
    }))?;
    let issued = accounts
        .create_token_request(account, &PostParams::default(), &request)
        .await?;
    issued
        .status
        .and_then(|s| s.token)
        .context("the TokenRequest returned no token")
}

fn start_manager(binary: &Path, kubeconfig: &Path, port: u16, out: &Path) -> Result<Child> {
    let log = std::fs::File::create(out.join("manager.log"))?;
    let child = Command::new(binary)
        .args([
            "run",
            "--leader-elect",
            "--lease-namespace",
            SYSTEM,
            "--admin-addr",
            &format!("127.0.0.1:{port}"),
            "--agent-image",
            "stateward:dev",
            "--log-format",
            "json",
        ])
        .env("KUBECONFIG", kubeconfig)
        .env("POD_NAME", "stateward-bench")
        .stdout(Stdio::from(log.try_clone()?))
        .stderr(Stdio::from(log))
        .spawn()
        .context("starting the release manager")?;
    Ok(child)
}

/// Reconciles so far per controller, from the manager's `/metrics`.
async fn reconciles(port: u16) -> Result<Vec<(String, f64)>> {
    let text = http_get(port, "/metrics").await?;
    Ok(stateward_testkit::harness::counter_by_label(
        &text,
        "controller_runtime_reconcile_total",
        "controller",
    ))
}

async fn http_get(port: u16, path: &str) -> Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
        .await?;
    let mut body = String::new();
    stream.read_to_string(&mut body).await?;
    Ok(body)
}

async fn clean(client: &Client, args: &ScaleBench) {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let mut names: Vec<String> = (0..args.namespaces.max(1)).map(namespace).collect();
    names.push(SYSTEM.into());
    for ns in &names {
        let _ = namespaces.delete(ns, &DeleteParams::default()).await;
    }
    // Backups carry a finalizer the manager (now stopped) would release: drop them so
    // the namespaces can go.
    for ns in &names {
        let backups: Api<Backup> = Api::namespaced(client.clone(), ns);
        if let Ok(list) = backups.list(&ListParams::default()).await {
            for b in list.items.iter().filter(|b| !b.finalizers().is_empty()) {
                let _ = backups
                    .patch(
                        &b.name_any(),
                        &PatchParams::default(),
                        &Patch::Merge(serde_json::json!({"metadata": {"finalizers": null}})),
                    )
                    .await;
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(300);
    for ns in &names {
        while namespaces.get_opt(ns).await.ok().flatten().is_some() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

fn audit_log(env: &Env) -> Result<PathBuf> {
    if env.audit_log.as_os_str().is_empty() {
        bail!(
            "this local cluster has no audit log (started by an older xtask): restart it with \
             `cargo xtask testenv down`, then `up`"
        );
    }
    Ok(env.audit_log.clone())
}

fn rss_kib(pid: u32) -> Option<u64> {
    crate::bench::proc_status_kib(pid, "VmRSS:")
}

fn hwm_kib(pid: u32) -> Option<u64> {
    crate::bench::proc_status_kib(pid, "VmHWM:")
}

fn mib(kib: Option<u64>) -> String {
    kib.map(|k| format!("{:.0} MiB", k as f64 / 1024.0))
        .unwrap_or_else(|| "?".into())
}
