//! The local node: a stand-in for kubelet and a container runtime, for tests and the demo.
//!
//! It registers two Nodes, provisions local volumes with real capacity, runs pods as
//! local processes in their own network and mount namespaces, and serves exec over
//! WebSocket. See `docs/local-cluster.md` for what it does and does not emulate.

pub mod images;
pub mod memory;
pub mod network;
pub mod pods;
pub mod privileges;
pub mod probes;
pub mod registration;
pub mod runner;
pub mod server;
pub mod storage;
pub mod volumes;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client, ResourceExt};

/// Set by `cargo xtask testenv` on everything it starts; the node passes it on to every
/// container so `testenv down` finds stray processes.
pub const MARKER_VAR: &str = "STATEWARD_TESTENV_ID";

/// Path of the runner binary (a private copy of this executable).
pub static RUNNER: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

/// Copies this executable into the state dir; containers and execs start from the copy.
fn install_runner(state_dir: &std::path::Path) -> Result<()> {
    let dir = state_dir.join("bin");
    std::fs::create_dir_all(&dir)?;
    let target = dir.join("stateward-node");
    let staging = dir.join("stateward-node.tmp");
    std::fs::copy("/proc/self/exe", &staging).context("copying the node binary")?;
    std::fs::rename(&staging, &target)?;
    let _ = RUNNER.set(target);
    Ok(())
}

/// One Node this process stands in for.
#[derive(Debug, Clone)]
pub struct NodeSpec {
    pub name: String,
    pub port: u16,
}

/// Configuration shared by the node's parts.
#[derive(Debug)]
pub struct NodeConfig {
    pub nodes: Vec<NodeSpec>,
    pub node_ip: Ipv4Addr,
    pub state_dir: PathBuf,
    /// Where the project's binaries (and the image entrypoints) live; put first on PATH.
    pub bin_dir: PathBuf,
    pub api_host: String,
    pub api_port: u16,
    pub kubernetes_version: String,
    pub started_at: String,
    pub marker: Option<String>,
    /// Which volumes pods use, and which the storage side is resizing offline.
    pub volumes: VolumeUsage,
    /// Where containers' memory cgroups go (`None`: no writable memory controller, no
    /// limits), and whether it is cgroup v2.
    pub memory_root: Option<(PathBuf, bool)>,
}

/// Who uses which volume directory right now: pods (bind-mounted into containers) or the
/// storage side (unmounted for an offline resize). The two exclude each other.
#[derive(Debug, Default, Clone)]
pub struct VolumeUsage(Arc<std::sync::Mutex<UsageState>>);

#[derive(Debug, Default)]
struct UsageState {
    users: std::collections::HashMap<PathBuf, usize>,
    maintenance: std::collections::HashSet<PathBuf>,
}

impl VolumeUsage {
    /// Starts maintenance of `dir` when no pod uses it.
    pub fn try_maintain(&self, dir: &std::path::Path) -> Option<UsageGuard> {
        let mut state = self.0.lock().ok()?;
        if state.users.get(dir).copied().unwrap_or(0) > 0 || state.maintenance.contains(dir) {
            return None;
        }
        state.maintenance.insert(dir.to_path_buf());
        Some(UsageGuard {
            owner: self.clone(),
            dir: dir.to_path_buf(),
            maintenance: true,
        })
    }

    /// Registers a pod's use of `dir`; `None` while the volume is under maintenance.
    pub fn try_use(&self, dir: &std::path::Path) -> Option<UsageGuard> {
        let mut state = self.0.lock().ok()?;
        if state.maintenance.contains(dir) {
            return None;
        }
        *state.users.entry(dir.to_path_buf()).or_default() += 1;
        Some(UsageGuard {
            owner: self.clone(),
            dir: dir.to_path_buf(),
            maintenance: false,
        })
    }
}

/// Ends a use or a maintenance when dropped.
#[derive(Debug)]
pub struct UsageGuard {
    owner: VolumeUsage,
    dir: PathBuf,
    maintenance: bool,
}

impl Drop for UsageGuard {
    fn drop(&mut self) {
        if let Ok(mut state) = self.owner.0.lock() {
            if self.maintenance {
                state.maintenance.remove(&self.dir);
            } else if let Some(n) = state.users.get_mut(&self.dir) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    state.users.remove(&self.dir);
                }
            }
        }
    }
}

/// Arguments of `stateward-node`.
#[derive(clap::Parser, Debug)]
#[command(
    name = "stateward-node",
    about = "The local cluster's node (kubelet + runtime stand-in)"
)]
pub struct Args {
    #[arg(long)]
    pub kubeconfig: PathBuf,
    #[arg(long)]
    pub state_dir: PathBuf,
    /// `name=port`, once per node.
    #[arg(long = "node", required = true)]
    pub nodes: Vec<String>,
    #[arg(long)]
    pub bridge: String,
    #[arg(long)]
    pub bridge_ip: Ipv4Addr,
    #[arg(long)]
    pub pod_cidr: String,
    /// The API server URL as pods reach it (https://<bridge ip>:<port>).
    #[arg(long)]
    pub api_server_from_pods: String,
    #[arg(long)]
    pub tls_cert: PathBuf,
    #[arg(long)]
    pub tls_key: PathBuf,
    #[arg(long)]
    pub ca_cert: PathBuf,
    /// Directory holding stateward-probe (and stateward when built).
    #[arg(long)]
    pub bin_dir: PathBuf,
    #[arg(long, default_value = "v1.36.3")]
    pub kubernetes_version: String,
}

fn parse_nodes(raw: &[String]) -> Result<Vec<NodeSpec>> {
    raw.iter()
        .map(|n| {
            let (name, port) = n.split_once('=').context("--node takes name=port")?;
            Ok(NodeSpec {
                name: name.to_string(),
                port: port.parse().context("--node port")?,
            })
        })
        .collect()
}

fn tls_config(args: &Args) -> Result<Arc<rustls::ServerConfig>> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&args.tls_cert)
        .context("reading the node certificate")?
        .collect::<Result<_, _>>()?;
    let key = PrivateKeyDer::from_pem_file(&args.tls_key).context("reading the node key")?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(certs, key)?;
    // Exec upgrades are HTTP/1.1 only.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

pub async fn run(args: Args) -> Result<()> {
    let nodes = parse_nodes(&args.nodes)?;
    let api: url_parts::Parts = url_parts::parse(&args.api_server_from_pods)?;
    std::fs::create_dir_all(&args.state_dir)?;
    std::fs::create_dir_all(args.state_dir.join("pods"))?;
    std::fs::create_dir_all(args.state_dir.join("volumes"))?;
    install_runner(&args.state_dir)?;
    // The postgres image's entrypoint lives beside the project's binaries (on PATH).
    let entrypoint = args.bin_dir.join("postgres-entrypoint.sh");
    std::fs::write(&entrypoint, images::POSTGRES_ENTRYPOINT)?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&entrypoint, std::fs::Permissions::from_mode(0o755))?;
    }
    let cfg = Arc::new(NodeConfig {
        nodes: nodes.clone(),
        node_ip: args.bridge_ip,
        state_dir: args.state_dir.clone(),
        bin_dir: args.bin_dir.clone(),
        api_host: api.host,
        api_port: api.port,
        kubernetes_version: args.kubernetes_version.clone(),
        started_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        marker: std::env::var(MARKER_VAR).ok(),
        volumes: VolumeUsage::default(),
        memory_root: memory::node_root(),
    });
    if cfg.memory_root.is_none() {
        tracing::warn!(
            "no writable memory cgroup controller: containers' memory limits are not enforced"
        );
    }
    if !storage::can_resize_online() {
        tracing::warn!(
            "this process lacks CAP_SYS_RESOURCE: volumes are expanded offline (when no pod uses \
             them), with the FileSystemResizePending condition meanwhile"
        );
    }
    let kubeconfig = kube::config::Kubeconfig::read_from(&args.kubeconfig)?;
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default()).await?;
    let client = Client::try_from(config)?;

    for node in &nodes {
        registration::register(&client, &cfg, node).await?;
    }
    let storage = storage::Storage::new(client.clone(), cfg.clone());
    storage.ensure_storage_class().await?;

    let network = network::Network::new(&args.bridge, args.bridge_ip, &args.pod_cidr)?;
    let ctx = Arc::new(pods::PodContext::new(client.clone(), cfg.clone(), network));
    let tls = tls_config(&args)?;
    let mut tasks = tokio::task::JoinSet::new();
    for node in &nodes {
        let addr = SocketAddr::from((args.bridge_ip, node.port));
        tasks.spawn(server::serve(ctx.clone(), addr, tls.clone()));
    }
    tasks.spawn(async move {
        storage.run().await;
        Ok(())
    });
    {
        let (client, cfg) = (client.clone(), cfg.clone());
        tasks.spawn(async move {
            registration::heartbeat(client, cfg).await;
            Ok(())
        });
    }
    {
        let ctx = ctx.clone();
        tasks.spawn(async move {
            watch_pods(ctx).await;
            Ok(())
        });
    }
    tracing::info!(nodes = ?nodes.iter().map(|n| &n.name).collect::<Vec<_>>(), "local node running");

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: stopping pods"),
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupted: stopping pods"),
        Some(result) = tasks.join_next() => {
            tracing::error!(?result, "a node task ended");
        }
    }
    ctx.shutdown(Duration::from_secs(15)).await;
    Ok(())
}

async fn watch_pods(ctx: Arc<pods::PodContext>) {
    let api: Api<Pod> = Api::all(ctx.client.clone());
    let mut seen_in_list: Vec<String> = Vec::new();
    let stream = watcher::watcher(api, watcher::Config::default().page_size(200)).default_backoff();
    futures::pin_mut!(stream);
    while let Some(event) = stream.next().await {
        match event {
            Ok(Event::Apply(pod)) => ctx.observe(pod),
            Ok(Event::Delete(pod)) => ctx.forget(&pod.uid().unwrap_or_default()),
            Ok(Event::Init) => seen_in_list.clear(),
            Ok(Event::InitApply(pod)) => {
                seen_in_list.push(pod.uid().unwrap_or_default());
                ctx.observe(pod);
            }
            Ok(Event::InitDone) => {
                // Pods we run that vanished while the watch was down.
                for uid in ctx.known_uids() {
                    if !seen_in_list.contains(&uid) {
                        ctx.forget(&uid);
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "pod watch error; retrying"),
        }
    }
}

/// Tiny URL splitting for `https://host:port`.
mod url_parts {
    use anyhow::{Context, Result};

    pub struct Parts {
        pub host: String,
        pub port: u16,
    }

    pub fn parse(url: &str) -> Result<Parts> {
        let rest = url.split_once("://").map(|(_, r)| r).unwrap_or(url);
        let hostport = rest.split('/').next().unwrap_or(rest);
        let (host, port) = hostport
            .rsplit_once(':')
            .context("the API server URL needs a port")?;
        Ok(Parts {
            host: host.to_string(),
            port: port.parse()?,
        })
    }
}
