//! `stateward`: the manager binary. It only wires: the controllers live in their own
//! crates and run as independent sync loops; this binary starts the ones asked for, serves
//! the admin endpoints, elects a leader when asked, and shuts down gracefully.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::{Api, Client, ResourceExt};
use prometheus_client::metrics::gauge::Gauge;
use stateward_runtime::admin::{self, Readiness};
use stateward_runtime::metrics::Metrics;
use stateward_runtime::telemetry::{self, LogFormat};
use stateward_runtime::watch::{Scope, Stores};
use tokio_util::sync::CancellationToken;

/// The controllers this binary can run; each lives in its own crate and arrives with its
/// capability.
const CONTROLLERS: &[&str] = &[
    stateward_backup::CONTROLLER,
    stateward_restore::CONTROLLER,
    stateward_scaling::CONTROLLER,
    stateward_monitoring::CONTROLLER,
];

/// Every controller's settings, from the command line.
#[derive(Clone)]
struct Settings {
    backup: stateward_backup::Config,
    restore: stateward_restore::Config,
    scaling: stateward_scaling::Config,
    monitoring: stateward_monitoring::Config,
}

/// Optional features an admin can turn off; the chart's `features.*` values set them and
/// drop the rights each one needs from the manager's role.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Feature {
    /// A PodMonitor and a PrometheusRule per app.
    MonitoringObjects,
    /// A clone Restore creating the clone's StatefulSet.
    CloneStatefulsets,
    /// Growing volumes (`spec.scaling.storage`, auto-expansion).
    VolumeExpansion,
}

/// Starts the shared watches and the selected controllers as independent sync loops;
/// the manager is ready once every cache synced.
fn start_controllers(
    controllers: &[&'static str],
    client: &Client,
    metrics: &Metrics,
    scope: &Scope,
    shutdown: &CancellationToken,
    settings: &Settings,
    readiness: &Readiness,
) -> tokio::task::JoinSet<&'static str> {
    let mut set = tokio::task::JoinSet::new();
    let stores = Stores::start(client.clone(), scope.clone(), shutdown);
    {
        let (stores, readiness) = (stores.clone(), readiness.clone());
        tokio::spawn(async move {
            stores.synced().await;
            tracing::info!("caches synced");
            readiness.set(true);
        });
    }
    for name in controllers {
        let stores = stores.clone();
        let base = stateward_runtime::Context::new(client.clone(), name, metrics.clone())
            .with_shutdown(shutdown.clone());
        let settings = settings.clone();
        match *name {
            stateward_backup::CONTROLLER => {
                set.spawn(async move {
                    stateward_backup::run(base, stores, settings.backup).await;
                    stateward_backup::CONTROLLER
                });
            }
            stateward_restore::CONTROLLER => {
                set.spawn(async move {
                    stateward_restore::run(base, stores, settings.restore).await;
                    stateward_restore::CONTROLLER
                });
            }
            stateward_monitoring::CONTROLLER => {
                set.spawn(async move {
                    stateward_monitoring::run(base, stores, settings.monitoring).await;
                    stateward_monitoring::CONTROLLER
                });
            }
            stateward_scaling::CONTROLLER => {
                set.spawn(async move {
                    stateward_scaling::run_with(base, stores, settings.scaling).await;
                    stateward_scaling::CONTROLLER
                });
            }
            other => tracing::error!(controller = other, "no start function for this controller"),
        }
    }
    set
}

/// How long in-flight reconciles get to finish after SIGTERM. Kubernetes' default grace
/// period is 30 s; this leaves room for the lease release after it.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(20);

/// Asks the controllers to stop and waits for them to drain, then aborts what is left.
async fn stop_controllers(
    mut running: tokio::task::JoinSet<&'static str>,
    shutdown: &CancellationToken,
) {
    shutdown.cancel();
    let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
        while running.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(timeout = ?DRAIN_TIMEOUT, "controllers did not drain in time; aborting them");
        running.shutdown().await;
    }
}

#[derive(Parser)]
#[command(
    name = "stateward",
    version,
    about = "Day-2 operations for stateful applications on Kubernetes"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the manager.
    Run(RunArgs),
    /// Print the CRDs as YAML (pipe into `kubectl apply -f -` to install or upgrade them).
    Crds,
    /// Print the version.
    Version,
    /// The data mover, run inside Jobs.
    Agent {
        #[command(subcommand)]
        command: AgentCommand,
    },
}

#[derive(Subcommand)]
enum AgentCommand {
    /// Archive a mounted volume (tar, zstd) into an S3 object.
    BackupVolume(stateward_agent::cli::BackupVolumeArgs),
    /// Run a dump command in an app pod (through the API) and store its output in S3.
    BackupExec(stateward_agent::cli::BackupExecArgs),
    /// Restore a stored volume archive (or a dump as one file) into a mounted volume,
    /// verified, through a journaled staged swap.
    RestoreVolume(stateward_agent::restore::RestoreVolumeArgs),
    /// Verify a stored dump, then stream it into a restore command in an app pod.
    RestoreExec(stateward_agent::restore::RestoreExecArgs),
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// Controllers to start, comma-separated, or `all`.
    #[arg(long, default_value = "all", env = "STATEWARD_CONTROLLERS")]
    controllers: String,
    /// Watch (and act in) only these namespaces, comma-separated (default: all). Each
    /// one costs a watch per kind; the chart's `watchNamespaces` sets it with a
    /// RoleBinding in each.
    #[arg(long, env = "STATEWARD_NAMESPACE", value_delimiter = ',')]
    namespace: Vec<String>,
    /// Address of the admin server (/metrics, /livez, /readyz).
    #[arg(long, default_value = "0.0.0.0:8080", env = "STATEWARD_ADMIN_ADDR")]
    admin_addr: SocketAddr,
    /// Elect a leader through a Lease; only the leader runs controllers.
    #[arg(long, env = "STATEWARD_LEADER_ELECT")]
    leader_elect: bool,
    /// Namespace of the leader-election Lease (default: the pod's namespace).
    #[arg(long, env = "POD_NAMESPACE")]
    lease_namespace: Option<String>,
    /// Leader lease duration in seconds.
    #[arg(long, default_value_t = 15)]
    lease_duration: u64,
    /// Image of the backup agent (default: this binary's own release image).
    #[arg(long, env = "STATEWARD_AGENT_IMAGE")]
    agent_image: Option<String>,
    /// The fixed ClusterRole (`pods/exec` only) that exec agents are bound to in their
    /// namespace; the chart installs it and passes its name.
    #[arg(
        long,
        default_value = stateward_runtime::agent_rbac::DEFAULT_EXEC_CLUSTER_ROLE,
        env = "STATEWARD_AGENT_EXEC_CLUSTER_ROLE"
    )]
    agent_exec_cluster_role: String,
    /// Requests and limits of every agent container, as JSON
    /// (`{"requests":{"cpu":"100m"},"limits":{"memory":"1Gi"}}`); the chart's
    /// `agent.resources`.
    #[arg(long, env = "STATEWARD_AGENT_RESOURCES", value_parser = parse_resources)]
    agent_resources: Option<ResourceRequirements>,
    /// Agent Jobs running at once, cluster-wide.
    #[arg(long, default_value_t = 8, env = "STATEWARD_MAX_AGENT_JOBS")]
    max_agent_jobs: usize,
    /// Agent Jobs running at once on one node.
    #[arg(long, default_value_t = 2, env = "STATEWARD_MAX_AGENT_JOBS_PER_NODE")]
    max_agent_jobs_per_node: usize,
    /// The retention breaker: a pass that would delete more Backups of one schedule than
    /// this deletes none, and reports them (status `pendingPrune`, a Warning event).
    #[arg(long, default_value_t = 10, env = "STATEWARD_RETENTION_MAX_DELETIONS")]
    retention_max_deletions: usize,
    /// How long a deleted Backup's finalizer retries while its repository cannot be
    /// opened before leaving the data in place with a Warning event.
    #[arg(long, default_value_t = 120, env = "STATEWARD_ORPHAN_WAIT_SECONDS")]
    orphan_wait_seconds: u64,
    /// How long an agent Job may wait for its pod to start (refused by admission or a
    /// quota, unschedulable, an image that does not pull) before its backup or restore
    /// fails with the cause.
    #[arg(
        long,
        default_value_t = 180,
        env = "STATEWARD_AGENT_START_TIMEOUT_SECONDS"
    )]
    agent_start_timeout_seconds: u64,
    /// How long a Backup waits for its app's operation lock (another backup, a restore, a
    /// scale-down) before it fails with `LockWaitExceeded`.
    #[arg(
        long,
        default_value_t = 3600,
        env = "STATEWARD_BACKUP_LOCK_WAIT_SECONDS"
    )]
    backup_lock_wait_seconds: u64,
    /// A Restore's deadline before its swap begins when it sets none
    /// (`spec.activeDeadlineSeconds`).
    #[arg(
        long,
        default_value_t = 21600,
        env = "STATEWARD_RESTORE_DEADLINE_SECONDS"
    )]
    restore_deadline_seconds: u64,
    /// Optional features to turn off, comma-separated: monitoring-objects,
    /// clone-statefulsets, volume-expansion.
    #[arg(long, env = "STATEWARD_DISABLE", value_delimiter = ',', value_enum)]
    disable: Vec<Feature>,
    /// Log format: text or json.
    #[arg(long, default_value = "text", env = "STATEWARD_LOG_FORMAT")]
    log_format: LogFormat,
}

fn main() -> Result<()> {
    // One TLS crypto provider for the process: kube and the AWS SDK must not each pick
    // their own (rustls panics when two are compiled in and none is installed).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = Cli::parse();
    match cli.command {
        Command::Crds => {
            print!("{}", stateward_api::crds_yaml()?);
            Ok(())
        }
        Command::Version => {
            println!("stateward {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
        Command::Agent { command } => {
            telemetry::init(LogFormat::Text);
            let code = tokio::runtime::Runtime::new()?.block_on(async {
                match command {
                    AgentCommand::BackupVolume(args) => {
                        stateward_agent::cli::backup_volume(args).await
                    }
                    AgentCommand::BackupExec(args) => stateward_agent::cli::backup_exec(args).await,
                    AgentCommand::RestoreVolume(args) => {
                        stateward_agent::restore::restore_volume(args).await
                    }
                    AgentCommand::RestoreExec(args) => {
                        stateward_agent::restore::restore_exec(args).await
                    }
                }
            });
            std::process::exit(code);
        }
        Command::Run(args) => {
            telemetry::init(args.log_format);
            tokio::runtime::Runtime::new()?.block_on(run(args))
        }
    }
}

fn selected_controllers(spec: &str) -> Result<Vec<&'static str>> {
    if spec == "all" {
        return Ok(CONTROLLERS.to_vec());
    }
    spec.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|name| {
            CONTROLLERS
                .iter()
                .copied()
                .find(|c| *c == name)
                .with_context(|| {
                    format!(
                        "unknown controller {name:?}: this build has {}",
                        if CONTROLLERS.is_empty() {
                            "none yet".to_string()
                        } else {
                            CONTROLLERS.join(", ")
                        }
                    )
                })
        })
        .collect()
}

/// Waits until every Stateward CRD is installed and Established, saying clearly what is
/// missing meanwhile.
async fn wait_for_crds(client: &Client) -> Result<()> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let mut warned = false;
    loop {
        let mut missing = Vec::new();
        for crd in stateward_api::crds() {
            let name = crd.name_any();
            let established = match api.get_opt(&name).await {
                Ok(Some(found)) => found
                    .status
                    .and_then(|s| s.conditions)
                    .unwrap_or_default()
                    .iter()
                    .any(|c| c.type_ == "Established" && c.status == "True"),
                Ok(None) => false,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read CRDs (RBAC needs get on customresourcedefinitions)");
                    false
                }
            };
            if !established {
                missing.push(name);
            }
        }
        if missing.is_empty() {
            return Ok(());
        }
        if !warned {
            tracing::error!(
                missing = ?missing,
                "Stateward's CRDs are not installed: install the Helm chart, or run `stateward crds | kubectl apply --server-side -f -`; waiting"
            );
            warned = true;
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
}

async fn run(args: RunArgs) -> Result<()> {
    let controllers = selected_controllers(&args.controllers)?;
    let mut backup_config = stateward_backup::Config::default();
    backup_config.runs.max_jobs = args.max_agent_jobs.max(1);
    backup_config.runs.max_jobs_per_node = args.max_agent_jobs_per_node.max(1);
    backup_config.runs.orphan_wait = std::time::Duration::from_secs(args.orphan_wait_seconds);
    backup_config.schedules.max_deletions_per_pass = args.retention_max_deletions;
    backup_config.runs.agent_start_timeout =
        std::time::Duration::from_secs(args.agent_start_timeout_seconds.max(1));
    backup_config.runs.lock_wait = std::time::Duration::from_secs(args.backup_lock_wait_seconds);
    backup_config.runs.exec_cluster_role = args.agent_exec_cluster_role.clone();
    backup_config.runs.agent_resources = args.agent_resources.clone();
    if let Some(image) = &args.agent_image {
        backup_config.runs.agent_image = image.clone();
    }
    let restore_config = stateward_restore::Config {
        agent_image: backup_config.runs.agent_image.clone(),
        agent_start_timeout: backup_config.runs.agent_start_timeout,
        default_deadline: std::time::Duration::from_secs(args.restore_deadline_seconds.max(60)),
        exec_cluster_role: args.agent_exec_cluster_role.clone(),
        clone_stateful_sets: !args.disable.contains(&Feature::CloneStatefulsets),
        agent_resources: args.agent_resources.clone(),
        ..Default::default()
    };
    let settings = Settings {
        backup: backup_config,
        restore: restore_config,
        scaling: stateward_scaling::Config {
            volume_expansion: !args.disable.contains(&Feature::VolumeExpansion),
        },
        monitoring: stateward_monitoring::Config {
            objects: !args.disable.contains(&Feature::MonitoringObjects),
        },
    };
    let metrics = Metrics::new();
    // Every request the controllers send is counted (`stateward_kube_requests_total`).
    let requests = stateward_runtime::kube_requests::RequestCounter::register(&metrics);
    let config = kube::Config::infer()
        .await
        .context("no Kubernetes configuration (in-cluster or KUBECONFIG)")?;
    let client = kube::client::ClientBuilder::try_from(config)?
        .with_layer(&requests.layer())
        .build();
    for controller in &controllers {
        metrics.reconcile.init(controller);
        // The backup controller runs three loops, each counted under its own name.
        if *controller == stateward_backup::CONTROLLER {
            metrics
                .reconcile
                .init(stateward_backup::repository::CONTROLLER);
            metrics
                .reconcile
                .init(stateward_backup::schedule::CONTROLLER);
        }
    }
    let leader_gauge: Gauge = Gauge::default();
    metrics.register(
        "leader",
        "1 while this replica is the leader (or runs without leader election)",
        leader_gauge.clone(),
    );
    let build_info =
        prometheus_client::metrics::family::Family::<Vec<(String, String)>, Gauge>::default();
    metrics.register(
        "build_info",
        "Always 1; the labels say which build runs",
        build_info.clone(),
    );
    build_info
        .get_or_create(&vec![(
            "version".to_string(),
            env!("CARGO_PKG_VERSION").to_string(),
        )])
        .set(1);
    let scope = Scope::of(&args.namespace);
    let readiness = Readiness::default();
    let listener = admin::bind(args.admin_addr)
        .await
        .with_context(|| format!("binding the admin address {}", args.admin_addr))?;
    tracing::info!(addr = %args.admin_addr, controllers = ?controllers, scope = ?scope, disabled = ?args.disable, "stateward starting");
    let admin_task = tokio::spawn(admin::serve(listener, metrics.clone(), readiness.clone()));

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = tokio::signal::ctrl_c() => "interrupt",
        }
    };
    tokio::pin!(shutdown);

    tokio::select! {
        result = wait_for_crds(&client) => result?,
        why = &mut shutdown => {
            tracing::info!(%why, "shutting down before start-up finished");
            return Ok(());
        }
    }
    // A standby is ready once the CRDs are there (it serves /metrics and waits for the
    // lease); a running manager once its caches synced (start_controllers).
    if args.leader_elect {
        readiness.set(true);
        tracing::info!("ready (standby until elected)");
    }

    if !args.leader_elect {
        leader_gauge.set(1);
        let stop = CancellationToken::new();
        let mut running = start_controllers(
            &controllers,
            &client,
            &metrics,
            &scope,
            &stop,
            &settings,
            &readiness,
        );
        tokio::select! {
            // Biased: when SIGTERM arrives, shutting down wins over anything else ready.
            biased;
            why = &mut shutdown => tracing::info!(%why, "shutting down"),
            Some(ended) = running.join_next() => {
                bail!("controller {} stopped", ended.unwrap_or("?"));
            }
        }
        readiness.set(false);
        stop_controllers(running, &stop).await;
        admin_task.abort();
        return Ok(());
    }

    let namespace = args
        .lease_namespace
        .clone()
        .or_else(|| {
            std::fs::read_to_string("/var/run/secrets/kubernetes.io/serviceaccount/namespace").ok()
        })
        .unwrap_or_else(|| "default".into());
    let identity = std::env::var("POD_NAME")
        .unwrap_or_else(|_| format!("{}-{}", nix_hostname(), std::process::id()));
    let manager = kube_lease_manager::LeaseManagerBuilder::new(client.clone(), "stateward-manager")
        .with_namespace(namespace.trim())
        .with_identity(identity.clone())
        .with_duration(args.lease_duration)
        .with_grace(args.lease_duration.div_ceil(3).max(2))
        .build()
        .await
        .context("setting up leader election")?;
    let (mut leader, lease_task) = manager.watch().await;
    tokio::pin!(lease_task);
    let mut running: Option<tokio::task::JoinSet<&'static str>> = None;
    let stop = CancellationToken::new();
    loop {
        let is_leader = *leader.borrow_and_update();
        leader_gauge.set(i64::from(is_leader));
        tracing::info!(%identity, leader = is_leader, "leadership");
        if is_leader && running.is_none() {
            running = Some(start_controllers(
                &controllers,
                &client,
                &metrics,
                &scope,
                &stop,
                &settings,
                &readiness,
            ));
        }
        tokio::select! {
            biased;
            why = &mut shutdown => {
                tracing::info!(%why, "shutting down");
                readiness.set(false);
                if let Some(set) = running.take() {
                    stop_controllers(set, &stop).await;
                }
                drop(leader);
                // Dropping the receiver makes the lease task release the lease.
                let _ = tokio::time::timeout(Duration::from_secs(5), &mut lease_task).await;
                admin_task.abort();
                return Ok(());
            }
            changed = leader.changed() => {
                if changed.is_err() {
                    bail!("the leader-election task stopped");
                }
                if is_leader && !*leader.borrow() {
                    // Lost leadership while acting: exit so a restart comes back as standby
                    // rather than risk two active replicas.
                    bail!("lost leadership");
                }
            }
            result = &mut lease_task => {
                bail!("the leader-election task ended: {result:?}");
            }
            Some(ended) = async { match running.as_mut() { Some(set) => set.join_next().await, None => std::future::pending().await } } => {
                bail!("controller {} stopped", ended.unwrap_or("?"));
            }
        }
    }
}

fn nix_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "stateward".into())
}

/// `--agent-resources`: a ResourceRequirements as JSON; `{}` (or empty) means none.
fn parse_resources(text: &str) -> Result<ResourceRequirements, String> {
    let text = if text.trim().is_empty() { "{}" } else { text };
    serde_json::from_str(text).map_err(|e| {
        format!("not a resources object ({e}): e.g. {{\"requests\":{{\"cpu\":\"100m\"}},\"limits\":{{\"memory\":\"1Gi\"}}}}")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn controller_selection_rejects_unknown_names() {
        assert!(selected_controllers("all").is_ok());
        assert_eq!(selected_controllers("backup").ok(), Some(vec!["backup"]));
        let err = selected_controllers("backup,snapshots")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("unknown controller \"snapshots\""), "{err}");
    }
}
