//! A real Prometheus (Debian's package) scrapes the real `stateward` binary's `/metrics`;
//! after one successful and one failed backup, PromQL through Prometheus's HTTP API
//! returns the app's last-success timestamp and the backup controller's reconcile count.
//! The chart's Grafana dashboard is valid JSON and every metric its queries use is one
//! the manager registers. Run with `cargo xtask test`.

mod common;

use std::collections::BTreeSet;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use kube::Api;
use stateward_api::{Backup, BackupPhase};
use stateward_testkit::harness::{Cluster, apply_yaml, install_crds, wait_for};

use common::Manager;

const MINUTE: Duration = Duration::from_secs(60);

/// Metric names a scrape of the manager exposes (sample names: counters with `_total`,
/// histograms with `_bucket`/`_sum`/`_count`).
fn exposed_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            let (Some(name), Some(kind)) = (parts.next(), parts.next()) else {
                continue;
            };
            match kind {
                "counter" => {
                    names.insert(format!("{}_total", name.trim_end_matches("_total")));
                }
                "histogram" => {
                    for suffix in ["_bucket", "_sum", "_count"] {
                        names.insert(format!("{name}{suffix}"));
                    }
                }
                _ => {
                    names.insert(name.to_string());
                }
            }
        }
    }
    names
}

/// Metric names a PromQL expression uses (Stateward's and controller-runtime's).
fn used_names(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let bytes: Vec<char> = expr.chars().collect();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i].is_ascii_alphabetic() || bytes[i] == '_' {
            let start = i;
            while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || bytes[i] == '_') {
                i += 1;
            }
            let word: String = bytes[start..i].iter().collect();
            if word.starts_with("stateward_") || word.starts_with("controller_runtime_") {
                out.insert(word);
            }
        } else {
            i += 1;
        }
    }
    out
}

struct Prometheus {
    child: Child,
    port: u16,
    dir: std::path::PathBuf,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Prometheus {
    fn start(target_port: u16) -> Result<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let dir = std::env::temp_dir().join(format!("stateward-prometheus-{port}"));
        std::fs::create_dir_all(&dir)?;
        std::fs::write(
            dir.join("prometheus.yml"),
            format!(
                "global: {{ scrape_interval: 1s, evaluation_interval: 1s }}\nscrape_configs:\n  - job_name: stateward\n    static_configs: [{{ targets: ['127.0.0.1:{target_port}'] }}]\n"
            ),
        )?;
        let child = Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context(
                "starting prometheus (Debian package prometheus; `cargo xtask test` installs it)",
            )?;
        Ok(Self { child, port, dir })
    }

    /// The result vector of an instant query.
    fn query(&self, promql: &str) -> Result<Vec<serde_json::Value>> {
        let out = Command::new("curl")
            .args(["-sf", "--get", "--data-urlencode"])
            .arg(format!("query={promql}"))
            .arg(format!("http://127.0.0.1:{}/api/v1/query", self.port))
            .output()?;
        ensure!(out.status.success(), "querying prometheus failed");
        let body: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        ensure!(body["status"] == "success", "{body}");
        Ok(body["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default())
    }
}

#[tokio::test]
async fn a_real_prometheus_scrapes_the_manager_and_the_dashboard_uses_only_registered_metrics()
-> Result<()> {
    let cluster = Cluster::connect().await?;
    {
        let _serial = cluster.serial().await?;
        install_crds(&cluster.client, &stateward_api::crds()).await?;
    }
    let ns = cluster.namespace("prometheus").await?;
    let bucket = cluster.bucket_and_secret(&ns.name, "prom").await?;
    apply_yaml(
        &cluster.client,
        &ns.name,
        &format!(
            r#"
apiVersion: stateward.io/v1alpha1
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
metadata: {{ name: ok }}
spec:
  replicas: 1
  serviceName: ok
  selector: {{ matchLabels: {{ app: ok }} }}
  template:
    metadata: {{ labels: {{ app: ok }} }}
    spec:
      terminationGracePeriodSeconds: 1
      containers:
      - name: main
        image: stateward-probe:dev
        command: [sh, -c, "echo data > /data/file; exec sleep 100000"]
        readinessProbe: {{ exec: {{ command: [test, -f, /data/file] }}, periodSeconds: 1 }}
        volumeMounts: [{{ name: data, mountPath: /data }}]
  volumeClaimTemplates:
  - metadata: {{ name: data }}
    spec:
      accessModes: [ReadWriteOnce]
      resources: {{ requests: {{ storage: 16Mi }} }}
---
apiVersion: stateward.io/v1alpha1
kind: StatefulApp
metadata: {{ name: ok }}
spec:
  statefulSetName: ok
  backup:
    repository: repo
    schedules: [{{ name: nightly, cron: "0 3 * * *", retention: {{ keepLast: 3 }} }}]
  # Auto-expansion measures the volume, so its usage gauges exist.
  scaling: {{ storage: {{ autoExpand: {{ thresholdPercent: 90, incrementPercent: 50, maxSize: 32Mi }} }} }}
---
apiVersion: stateward.io/v1alpha1
kind: StatefulApp
metadata: {{ name: broken }}
spec: {{ statefulSetName: does-not-exist, backup: {{ repository: repo }} }}
"#,
            endpoint = cluster.env.s3_endpoint_from_pods
        ),
        "test",
    )
    .await?;
    let manager = Manager::start(
        &cluster,
        &["--namespace", ns.name.as_str(), "--controllers", "all"],
    )?;
    manager.wait_ready().await?;
    let prometheus = Prometheus::start(manager.port)?;
    let pods: Api<k8s_openapi::api::core::v1::Pod> = cluster.api(&ns.name);
    stateward_testkit::harness::wait_pod_ready(&pods, "ok-0", 2 * MINUTE).await?;
    apply_yaml(
        &cluster.client,
        &ns.name,
        "apiVersion: stateward.io/v1alpha1\nkind: Backup\nmetadata: { name: ok-1 }\nspec: { app: ok }\n---\napiVersion: stateward.io/v1alpha1\nkind: Backup\nmetadata: { name: broken-1 }\nspec: { app: broken }",
        "test",
    )
    .await?;
    let backups: Api<Backup> = cluster.api(&ns.name);
    for (name, phase) in [
        ("ok-1", BackupPhase::Completed),
        ("broken-1", BackupPhase::Failed),
    ] {
        wait_for(&format!("Backup {name} {phase:?}"), 3 * MINUTE, || async {
            Ok(
                (backups.get(name).await?.status.and_then(|s| s.phase) == Some(phase))
                    .then_some(()),
            )
        })
        .await?;
    }
    let selector = format!("namespace=\"{}\", app=\"ok\"", ns.name);
    let last_success = wait_for(
        "PromQL: the app's last success timestamp",
        MINUTE,
        || async {
            let result = prometheus.query(&format!(
                "stateward_backup_last_success_timestamp_seconds{{{selector}}}"
            ))?;
            Ok(result
                .first()
                .map(|r| r["value"][1].as_str().unwrap_or_default().to_string()))
        },
    )
    .await?;
    let reconciles = wait_for("PromQL: backup reconciles above zero", MINUTE, || async {
        let result =
            prometheus.query("sum(controller_runtime_reconcile_total{controller=\"backup\"})")?;
        Ok(result
            .first()
            .and_then(|r| r["value"][1].as_str()?.parse::<f64>().ok())
            .filter(|v| *v > 0.0))
    })
    .await?;
    let failed = wait_for("PromQL: one failed run", MINUTE, || async {
        let result = prometheus.query("sum(stateward_backup_runs_total{result=\"failed\"})")?;
        Ok(result
            .first()
            .and_then(|r| r["value"][1].as_str()?.parse::<f64>().ok())
            .filter(|v| *v >= 1.0))
    })
    .await?;
    println!(
        "PromQL: last success {last_success}, backup reconciles {reconciles}, failed runs {failed}"
    );
    let up = prometheus.query("up{job=\"stateward\"}")?;
    ensure!(
        up.first().map(|r| r["value"][1] == "1") == Some(true),
        "{up:?}"
    );

    // The dashboard: valid JSON, and every metric its queries name is registered.
    // Families without a series are not exposed; wait until the app's schedule and
    // volume gauges have theirs.
    let registered = wait_for("the schedule and volume series", MINUTE, || async {
        let (status, scrape) = manager.get("/metrics").await?;
        ensure!(status == 200);
        let names = exposed_names(&scrape);
        Ok(
            (names.contains("stateward_backup_next_run_timestamp_seconds")
                && names.contains("stateward_volume_used_bytes"))
            .then_some(names),
        )
    })
    .await?;
    for expected in [
        "stateward_build_info",
        "stateward_app_healthy",
        "stateward_app_ready_replicas",
        "stateward_restore_runs_total",
    ] {
        ensure!(
            registered.contains(expected),
            "{expected} not registered: {registered:?}"
        );
    }
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../charts/stateward/dashboards/stateward.json"
    );
    let dashboard: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path)?)
        .context("the dashboard is not valid JSON")?;
    let panels = dashboard["panels"].as_array().context("panels")?;
    ensure!(panels.len() >= 10, "{} panels", panels.len());
    let mut checked = 0;
    for panel in panels {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().context("expr")?;
            for name in used_names(expr) {
                ensure!(
                    registered.contains(&name),
                    "panel {:?} uses {name}, which the manager does not register",
                    panel["title"]
                );
                checked += 1;
            }
            // Prometheus itself parses every expression.
            prometheus
                .query(expr)
                .with_context(|| format!("the dashboard's query {expr}"))?;
        }
    }
    println!(
        "dashboard: {} panels, {checked} metric references, all registered and all parse",
        panels.len()
    );
    drop(prometheus);
    drop(manager);
    ns.cleanup().await
}
