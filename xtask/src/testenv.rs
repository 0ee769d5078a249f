//! `cargo xtask testenv up | down | status | env`: the local cluster.
//!
//! Layout under `target/testenv/` (never committed): `pki/`, `etcd/`, `s3/`, `node/`,
//! `logs/<process>.log`, `state.json` (what runs, so `down` stops exactly that),
//! `kubeconfig`, `env` (shell exports) and `env.json` (read by the tests).

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::procs;
use crate::{deps, pki, tools};

/// Metadata for every request, once it completes (and once a watch starts); health
/// probes are left out.
const AUDIT_POLICY: &str = "apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
  - level: None
    nonResourceURLs: [/healthz*, /livez*, /readyz*]
  - level: Metadata
";

/// The bridge every pod's network namespace hangs off, and the host's address on it.
/// One testenv per machine: the bridge and the namespace prefix are fixed names.
const BRIDGE: &str = "stw0";
const BRIDGE_IP: &str = "10.213.0.1";
const POD_CIDR: &str = "10.213.0.0/16";
const SERVICE_CIDR: &str = "10.96.0.0/16";
/// Fixed test credentials of the local S3 server (test-only, never used elsewhere).
pub const S3_ACCESS_KEY: &str = "stateward-test";
pub const S3_SECRET_KEY: &str = "stateward-test-secret-key";
const S3_REGION: &str = "us-east-1";
/// The two nodes the local node process registers.
const NODE_NAMES: [&str; 2] = ["stateward-node-a", "stateward-node-b"];

/// What a running testenv consists of; `down` reads it to stop exactly that.
#[derive(Serialize, Deserialize, Default, Debug)]
struct State {
    marker: String,
    pids: BTreeMap<String, u32>,
    ports: BTreeMap<String, u16>,
}

/// What tests and users need to reach the local cluster (also written as `env.json`).
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Env {
    pub kubeconfig: PathBuf,
    pub api_server: String,
    pub api_server_from_pods: String,
    pub s3_endpoint: String,
    pub s3_endpoint_from_pods: String,
    pub s3_access_key: String,
    pub s3_secret_key: String,
    pub s3_region: String,
    pub nodes: Vec<String>,
    pub state_dir: PathBuf,
    pub ca_cert: PathBuf,
    pub kubernetes_version: String,
    /// The pinned helm binary (for chart tests).
    pub helm: PathBuf,
    /// kubectl of the cluster's own Kubernetes version (for tests that let it judge).
    #[serde(default)]
    pub kubectl: PathBuf,
    /// The Prometheus Operator's CRD manifests, generated from its pinned types (for the
    /// monitoring tests, which install them).
    #[serde(default)]
    pub prometheus_crds: PathBuf,
    /// The API server's audit log (metadata level, JSON lines): requests by user, for
    /// tests and benches that count an operator's API cost.
    #[serde(default)]
    pub audit_log: PathBuf,
}

pub fn state_dir() -> PathBuf {
    target_dir().join("testenv")
}

pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::repo_root().join("target"))
}

fn marker_for(dir: &Path) -> String {
    let digest = Sha256::digest(dir.to_string_lossy().as_bytes());
    hex::encode(&digest[..6])
}

fn load_state(dir: &Path) -> Option<State> {
    let text = std::fs::read_to_string(dir.join("state.json")).ok()?;
    serde_json::from_str(&text).ok()
}

fn save_state(dir: &Path, state: &State) -> Result<()> {
    std::fs::write(dir.join("state.json"), serde_json::to_vec_pretty(state)?)?;
    Ok(())
}

pub fn free_port() -> Result<u16> {
    let listener = TcpListener::bind("0.0.0.0:0").context("finding a free port")?;
    Ok(listener.local_addr()?.port())
}

/// Starts the local cluster, or returns the running one when it is healthy.
pub fn up() -> Result<Env> {
    let started = Instant::now();
    deps::ensure()?;
    let tools = tools::ensure_all()?;
    let bins = build_rust_binaries()?;
    let dir = state_dir();
    let marker = marker_for(&dir);
    let runtime = tokio::runtime::Runtime::new()?;

    if let Some(state) = load_state(&dir) {
        let env = read_env(&dir);
        let healthy = state.pids.values().all(|pid| procs::alive(*pid))
            && env
                .as_ref()
                .map(|env| runtime.block_on(cluster_ready(env)).is_ok())
                .unwrap_or(false);
        if let (true, Some(env)) = (healthy, env) {
            eprintln!("xtask: the local cluster is already running");
            return Ok(env);
        }
        eprintln!("xtask: found a stale local cluster (a killed run?); cleaning it up");
        down()?;
    } else if !procs::marked_processes(&marker).is_empty()
        || procs::Cgroup::for_marker(&marker).is_some_and(|cg| !cg.pids().is_empty())
    {
        eprintln!("xtask: found processes of an earlier local cluster; cleaning them up");
        down()?;
    }

    for sub in ["pki", "etcd", "s3", "node", "logs"] {
        let path = dir.join(sub);
        if path.exists() {
            std::fs::remove_dir_all(&path)
                .with_context(|| format!("removing {}", path.display()))?;
        }
        std::fs::create_dir_all(&path)?;
    }
    let mut state = State {
        marker: marker.clone(),
        ..State::default()
    };
    save_state(&dir, &state)?;

    setup_bridge()?;
    // Everything started from here on (and their children) lands in the testenv cgroup.
    let cgroup = procs::Cgroup::for_marker(&marker);
    let _membership = match &cgroup {
        Some(cg) => Some(cg.join()?),
        None => {
            eprintln!(
                "xtask: no writable cgroup hierarchy; `down` will find processes by environment only"
            );
            None
        }
    };

    for name in [
        "etcd",
        "etcd-peer",
        "apiserver",
        "kcm",
        "scheduler",
        "s3",
        "node-a",
        "node-b",
    ] {
        state.ports.insert(name.to_string(), free_port()?);
    }
    let ports = state.ports.clone();
    let port = |name: &str| ports.get(name).copied().unwrap_or_default();
    let pki = pki::generate(&dir.join("pki"), &[BRIDGE_IP.to_string()])?;
    let admin_token = random_token();
    let kcm_token = random_token();
    let scheduler_token = random_token();
    std::fs::write(
        dir.join("pki/tokens.csv"),
        format!(
            "{admin_token},stateward-admin,uid-admin,\"system:masters\"\n\
             {kcm_token},system:kube-controller-manager,uid-kcm\n\
             {scheduler_token},system:kube-scheduler,uid-scheduler\n"
        ),
    )?;
    let api_server = format!("https://127.0.0.1:{}", port("apiserver"));
    let api_server_from_pods = format!("https://{BRIDGE_IP}:{}", port("apiserver"));
    let kubeconfig = dir.join("kubeconfig");
    write_kubeconfig(
        &kubeconfig,
        &api_server,
        &pki.ca_cert,
        "stateward-admin",
        &admin_token,
    )?;
    let kcm_kubeconfig = dir.join("pki/kcm.kubeconfig");
    write_kubeconfig(
        &kcm_kubeconfig,
        &api_server,
        &pki.ca_cert,
        "kcm",
        &kcm_token,
    )?;
    let scheduler_kubeconfig = dir.join("pki/scheduler.kubeconfig");
    write_kubeconfig(
        &scheduler_kubeconfig,
        &api_server,
        &pki.ca_cert,
        "scheduler",
        &scheduler_token,
    )?;

    let tool = |name: &str| tools.get(name).cloned().unwrap_or_default();
    let env = Env {
        kubeconfig: kubeconfig.clone(),
        api_server: api_server.clone(),
        api_server_from_pods,
        s3_endpoint: format!("http://127.0.0.1:{}", port("s3")),
        s3_endpoint_from_pods: format!("http://{BRIDGE_IP}:{}", port("s3")),
        s3_access_key: S3_ACCESS_KEY.into(),
        s3_secret_key: S3_SECRET_KEY.into(),
        s3_region: S3_REGION.into(),
        nodes: NODE_NAMES.iter().map(|n| n.to_string()).collect(),
        state_dir: dir.clone(),
        ca_cert: pki.ca_cert.clone(),
        kubernetes_version: tools::KUBERNETES_VERSION.into(),
        helm: tool("helm"),
        kubectl: tool("kubectl"),
        prometheus_crds: tools::prometheus_crds(&tool("controller-gen"))?,
        audit_log: dir.join("logs/audit.log"),
    };

    let logs = dir.join("logs");
    let start = |name: &str, cmd: Command, state: &mut State| -> Result<()> {
        let pid = procs::spawn_detached(cmd, &logs.join(format!("{name}.log")), &marker)?;
        state.pids.insert(name.to_string(), pid);
        save_state(&dir, state)
    };

    // etcd
    let mut etcd = Command::new(tool("etcd"));
    etcd.args([
        "--name=testenv",
        &format!("--data-dir={}", dir.join("etcd").display()),
        &format!("--listen-client-urls=http://127.0.0.1:{}", port("etcd")),
        &format!("--advertise-client-urls=http://127.0.0.1:{}", port("etcd")),
        &format!("--listen-peer-urls=http://127.0.0.1:{}", port("etcd-peer")),
        &format!(
            "--initial-advertise-peer-urls=http://127.0.0.1:{}",
            port("etcd-peer")
        ),
        &format!(
            "--initial-cluster=testenv=http://127.0.0.1:{}",
            port("etcd-peer")
        ),
        "--unsafe-no-fsync=true",
        "--quota-backend-bytes=4294967296",
        "--log-level=warn",
    ]);
    start("etcd", etcd, &mut state)?;
    runtime.block_on(wait_http_ok(
        "etcd /health",
        &format!("127.0.0.1:{}", port("etcd")),
        "/health",
        Duration::from_secs(60),
    ))?;

    // kube-apiserver, with an audit log of every request at metadata level (who, verb,
    // object, code; never bodies, so no Secret values), rotated so a long run stays bounded.
    let audit_policy = dir.join("pki/audit-policy.yaml");
    std::fs::write(&audit_policy, AUDIT_POLICY)?;
    let mut apiserver = Command::new(tool("kube-apiserver"));
    apiserver.args([
        format!("--audit-policy-file={}", audit_policy.display()),
        format!("--audit-log-path={}", env.audit_log.display()),
        "--audit-log-format=json".into(),
        "--audit-log-maxsize=200".into(),
        "--audit-log-maxbackup=2".into(),
    ]);
    apiserver.args([
        &format!("--etcd-servers=http://127.0.0.1:{}", port("etcd")),
        &format!("--secure-port={}", port("apiserver")),
        "--bind-address=0.0.0.0",
        &format!("--advertise-address={BRIDGE_IP}"),
        &format!("--service-cluster-ip-range={SERVICE_CIDR}"),
        &format!("--tls-cert-file={}", pki.apiserver_cert.display()),
        &format!("--tls-private-key-file={}", pki.apiserver_key.display()),
        &format!("--cert-dir={}", dir.join("pki").display()),
        &format!("--client-ca-file={}", pki.ca_cert.display()),
        &format!("--token-auth-file={}", dir.join("pki/tokens.csv").display()),
        &format!("--service-account-key-file={}", pki.sa_pub.display()),
        &format!(
            "--service-account-signing-key-file={}",
            pki.sa_key.display()
        ),
        "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
        "--api-audiences=https://kubernetes.default.svc.cluster.local",
        &format!("--kubelet-certificate-authority={}", pki.ca_cert.display()),
        "--kubelet-preferred-address-types=InternalIP",
        "--authorization-mode=RBAC",
        "--allow-privileged=true",
        "--profiling=false",
        "--event-ttl=1h",
    ]);
    start("kube-apiserver", apiserver, &mut state)?;
    runtime
        .block_on(wait_api_ready(&env, Duration::from_secs(120)))
        .context(
            "kube-apiserver did not become ready; see target/testenv/logs/kube-apiserver.log",
        )?;

    // kube-controller-manager: all default controllers.
    let mut kcm = Command::new(tool("kube-controller-manager"));
    kcm.args([
        &format!("--kubeconfig={}", kcm_kubeconfig.display()),
        &format!("--authentication-kubeconfig={}", kcm_kubeconfig.display()),
        &format!("--authorization-kubeconfig={}", kcm_kubeconfig.display()),
        "--leader-elect=false",
        "--bind-address=127.0.0.1",
        &format!("--secure-port={}", port("kcm")),
        &format!(
            "--service-account-private-key-file={}",
            pki.sa_key.display()
        ),
        &format!("--root-ca-file={}", pki.ca_cert.display()),
        &format!("--cluster-signing-cert-file={}", pki.ca_cert.display()),
        &format!("--cluster-signing-key-file={}", pki.ca_key.display()),
        "--use-service-account-credentials=true",
        "--controllers=*",
        &format!("--service-cluster-ip-range={SERVICE_CIDR}"),
        // Short enough for tests, long enough for a busy 2-core machine.
        "--node-monitor-grace-period=60s",
        "--concurrent-statefulset-syncs=5",
        "--profiling=false",
    ]);
    start("kube-controller-manager", kcm, &mut state)?;

    let mut scheduler = Command::new(tool("kube-scheduler"));
    scheduler.args([
        &format!("--kubeconfig={}", scheduler_kubeconfig.display()),
        &format!(
            "--authentication-kubeconfig={}",
            scheduler_kubeconfig.display()
        ),
        &format!(
            "--authorization-kubeconfig={}",
            scheduler_kubeconfig.display()
        ),
        "--leader-elect=false",
        "--bind-address=127.0.0.1",
        &format!("--secure-port={}", port("scheduler")),
        "--profiling=false",
    ]);
    start("kube-scheduler", scheduler, &mut state)?;

    // S3 server (versitygw, posix backend).
    std::fs::create_dir_all(dir.join("s3/data"))?;
    std::fs::create_dir_all(dir.join("s3/iam"))?;
    let mut s3 = Command::new(tool("versitygw"));
    s3.env("ROOT_ACCESS_KEY", S3_ACCESS_KEY)
        .env("ROOT_SECRET_KEY", S3_SECRET_KEY)
        .env("VGW_REGION", S3_REGION)
        .args([
            "--port",
            &format!("0.0.0.0:{}", port("s3")),
            "--iam-dir",
            &dir.join("s3/iam").to_string_lossy(),
            "posix",
            &dir.join("s3/data").to_string_lossy(),
        ]);
    start("versitygw", s3, &mut state)?;

    // The local node: both Nodes, storage, pods, exec.
    let mut node = Command::new(&bins.node);
    node.args([
        "--kubeconfig",
        &kubeconfig.to_string_lossy(),
        "--state-dir",
        &dir.join("node").to_string_lossy(),
        "--bridge",
        BRIDGE,
        "--bridge-ip",
        BRIDGE_IP,
        "--pod-cidr",
        POD_CIDR,
        "--api-server-from-pods",
        &env.api_server_from_pods,
        "--tls-cert",
        &pki.node_cert.to_string_lossy(),
        "--tls-key",
        &pki.node_key.to_string_lossy(),
        "--ca-cert",
        &pki.ca_cert.to_string_lossy(),
        "--bin-dir",
        &bins.dir.to_string_lossy(),
    ]);
    node.arg("--node")
        .arg(format!("{}={}", NODE_NAMES[0], port("node-a")))
        .arg("--node")
        .arg(format!("{}={}", NODE_NAMES[1], port("node-b")))
        .env("RUST_LOG", "info,kube=warn,hyper=warn");
    start("stateward-node", node, &mut state)?;

    write_env(&dir, &env)?;
    runtime
        .block_on(wait_cluster(&env, Duration::from_secs(180)))
        .context("the local cluster did not become ready; logs are in target/testenv/logs/")?;
    eprintln!(
        "xtask: local cluster up in {:.1} s (Kubernetes {}, {} nodes); `cargo xtask testenv env` prints its exports",
        started.elapsed().as_secs_f64(),
        tools::KUBERNETES_VERSION,
        NODE_NAMES.len()
    );
    Ok(env)
}

/// Stops what `up` started and removes what the node left on the host.
pub fn down() -> Result<()> {
    let dir = state_dir();
    let marker = load_state(&dir)
        .map(|s| s.marker)
        .unwrap_or_else(|| marker_for(&dir));
    let state = load_state(&dir).unwrap_or_default();
    // The node first, so it stops pods gracefully and unmounts what it mounted.
    if let Some(pid) = state.pids.get("stateward-node") {
        procs::terminate(&[*pid], Duration::from_secs(20));
    }
    let cgroup = procs::Cgroup::for_marker(&marker);
    let mut remaining = procs::marked_processes(&marker);
    remaining.extend(state.pids.values().copied().filter(|p| procs::alive(*p)));
    if let Some(cg) = &cgroup {
        remaining.extend(cg.pids());
    }
    remaining.sort_unstable();
    remaining.dedup();
    procs::terminate(&remaining, Duration::from_secs(10));
    // Anything that ignored SIGKILL for a moment (a process in D state) gets a second look.
    let mut stubborn = procs::marked_processes(&marker);
    if let Some(cg) = &cgroup {
        stubborn.extend(cg.pids());
    }
    if !stubborn.is_empty() {
        std::thread::sleep(Duration::from_secs(1));
        procs::terminate(&stubborn, Duration::from_secs(5));
    }
    procs::unmount_below(&dir);
    procs::detach_loops_below(&dir);
    procs::delete_netns();
    procs::delete_link(BRIDGE);
    let _ = std::fs::remove_file(dir.join("state.json"));
    let mut left = procs::marked_processes(&marker);
    if let Some(cg) = &cgroup {
        left.extend(cg.pids());
        cg.remove();
    }
    if !left.is_empty() {
        bail!("processes of the local cluster are still running: {left:?}");
    }
    eprintln!("xtask: local cluster stopped");
    Ok(())
}

pub fn status() -> Result<()> {
    let dir = state_dir();
    let Some(state) = load_state(&dir) else {
        println!("local cluster: not running");
        return Ok(());
    };
    for (name, pid) in &state.pids {
        let alive = if procs::alive(*pid) {
            "running"
        } else {
            "DEAD"
        };
        println!("{name:<26} pid {pid:<8} {alive}");
    }
    if let Some(env) = read_env(&dir) {
        let runtime = tokio::runtime::Runtime::new()?;
        match runtime.block_on(cluster_ready(&env)) {
            Ok(()) => println!(
                "API server {} ready; S3 at {}",
                env.api_server, env.s3_endpoint
            ),
            Err(e) => println!("not ready: {e:#}"),
        }
    }
    Ok(())
}

pub fn print_env() -> Result<()> {
    let env = read_env(&state_dir())
        .context("the local cluster is not running: `cargo xtask testenv up`")?;
    print!("{}", shell_exports(&env));
    Ok(())
}

fn shell_exports(env: &Env) -> String {
    format!(
        "export KUBECONFIG={}\nexport STATEWARD_TESTENV={}\nexport AWS_ENDPOINT_URL={}\n\
         export AWS_ACCESS_KEY_ID={}\nexport AWS_SECRET_ACCESS_KEY={}\nexport AWS_REGION={}\n",
        env.kubeconfig.display(),
        env.state_dir.join("env.json").display(),
        env.s3_endpoint,
        env.s3_access_key,
        env.s3_secret_key,
        env.s3_region
    )
}

fn write_env(dir: &Path, env: &Env) -> Result<()> {
    std::fs::write(dir.join("env.json"), serde_json::to_vec_pretty(env)?)?;
    std::fs::write(dir.join("env"), shell_exports(env))?;
    Ok(())
}

pub fn read_env(dir: &Path) -> Option<Env> {
    serde_json::from_slice(&std::fs::read(dir.join("env.json")).ok()?).ok()
}

fn random_token() -> String {
    use rand::Rng;
    let bytes: [u8; 24] = rand::rng().random();
    hex::encode(bytes)
}

fn write_kubeconfig(path: &Path, server: &str, ca: &Path, user: &str, token: &str) -> Result<()> {
    let text = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: stateward-testenv\n  cluster:\n    \
         server: {server}\n    certificate-authority: {ca}\nusers:\n- name: {user}\n  user:\n    \
         token: {token}\ncontexts:\n- name: stateward-testenv\n  context:\n    cluster: \
         stateward-testenv\n    user: {user}\n    namespace: default\ncurrent-context: \
         stateward-testenv\n",
        ca = ca.display()
    );
    pki::write_private(path, &text)
}

fn setup_bridge() -> Result<()> {
    procs::delete_netns();
    procs::delete_link(BRIDGE);
    procs::run(Command::new("ip").args(["link", "add", BRIDGE, "type", "bridge"]))?;
    procs::run(Command::new("ip").args([
        "addr",
        "add",
        &format!("{BRIDGE_IP}/16"),
        "dev",
        BRIDGE,
    ]))?;
    procs::run(Command::new("ip").args(["link", "set", BRIDGE, "up"]))?;
    // Pods reach each other and the host through the bridge; nothing is routed further.
    let _ = std::fs::write("/proc/sys/net/bridge/bridge-nf-call-iptables", "0");
    Ok(())
}

/// The binaries the local node runs: the node itself and the images it maps to programs.
pub struct RustBins {
    pub dir: PathBuf,
    pub node: PathBuf,
}

fn build_rust_binaries() -> Result<RustBins> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .current_dir(crate::repo_root())
        // The same build the tests make (dev-dependencies unify features), so running the
        // tests afterwards does not rebuild the binaries the cluster runs.
        .args(["test", "--quiet", "--workspace", "--no-run"])
        .status()
        .context("running cargo build")?;
    if !status.success() {
        bail!("cargo build of the workspace binaries failed");
    }
    let dir = target_dir().join("debug");
    Ok(RustBins {
        node: dir.join("stateward-node"),
        dir,
    })
}

async fn wait_http_ok(what: &str, addr: &str, path: &str, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        match http_get(addr, path).await {
            Ok(200) => return Ok(()),
            _ if Instant::now() > deadline => {
                bail!("timed out after {timeout:?} waiting for {what}")
            }
            _ => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
}

/// A minimal plain-HTTP GET returning the status code (for etcd and the S3 server).
async fn http_get(addr: &str, path: &str) -> Result<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream =
        tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(addr))
            .await??;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await?;
    let mut buf = vec![0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await??;
    let head = String::from_utf8_lossy(&buf[..n]);
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("no HTTP status")?;
    Ok(code)
}

async fn client(env: &Env) -> Result<kube::Client> {
    let kubeconfig = kube::config::Kubeconfig::read_from(&env.kubeconfig)?;
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default()).await?;
    Ok(kube::Client::try_from(config)?)
}

async fn api_readyz(client: &kube::Client) -> Result<()> {
    let request = http::Request::get("/readyz").body(Vec::new())?;
    let text = client.request_text(request).await?;
    if text.trim() != "ok" {
        bail!("/readyz says {text}");
    }
    Ok(())
}

async fn wait_api_ready(env: &Env, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    let client = client(env).await?;
    loop {
        match api_readyz(&client).await {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() > deadline => {
                return Err(e.context(format!("timed out after {timeout:?} waiting for /readyz")));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
}

/// Ready means: API server ready, both nodes Ready, the default ServiceAccount exists
/// (the controller manager works), the storage class exists and S3 answers.
async fn cluster_ready(env: &Env) -> Result<()> {
    use k8s_openapi::api::core::v1::{Node, ServiceAccount};
    use k8s_openapi::api::storage::v1::StorageClass;
    use kube::Api;
    let client = client(env).await?;
    api_readyz(&client).await?;
    let nodes: Api<Node> = Api::all(client.clone());
    for name in &env.nodes {
        let node = nodes
            .get(name)
            .await
            .with_context(|| format!("node {name}"))?;
        let ready = node
            .status
            .and_then(|s| s.conditions)
            .unwrap_or_default()
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True");
        if !ready {
            bail!("node {name} is not Ready");
        }
    }
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), "default");
    sas.get("default").await.context("default ServiceAccount")?;
    let classes: Api<StorageClass> = Api::all(client);
    classes
        .get("stateward-local")
        .await
        .context("StorageClass stateward-local")?;
    let s3 = env.s3_endpoint.trim_start_matches("http://").to_string();
    let code = http_get(&s3, "/").await.context("S3 server")?;
    // Unauthenticated requests are refused (403): that is the server answering.
    if code != 403 && code != 200 {
        bail!("S3 server answered {code}");
    }
    Ok(())
}

async fn wait_cluster(env: &Env, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        match cluster_ready(env).await {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() > deadline => {
                return Err(e.context(format!("timed out after {timeout:?}")));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
}
