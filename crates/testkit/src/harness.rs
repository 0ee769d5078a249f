//! Helpers for integration tests: one local cluster for the whole test run (started by
//! `cargo xtask test` or `cargo xtask testenv up`), a namespace per test, a serial group for
//! tests that touch cluster-scoped objects, exec, and waits that say what they waited for.

use std::future::Future;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{AttachParams, DeleteParams, PostParams};
use kube::{Api, Client};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// What `cargo xtask testenv up` writes to `target/testenv/env.json`.
#[derive(Deserialize, Debug, Clone)]
pub struct TestEnv {
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
    /// The pinned helm binary.
    #[serde(default)]
    pub helm: PathBuf,
    /// kubectl of the cluster's own Kubernetes version.
    #[serde(default)]
    pub kubectl: PathBuf,
    /// The Prometheus Operator's CRD manifests (generated from its pinned API types).
    #[serde(default)]
    pub prometheus_crds: PathBuf,
    /// The API server's audit log (read with [`crate::audit`]).
    #[serde(default)]
    pub audit_log: PathBuf,
}

/// A connection to the local cluster.
#[derive(Clone)]
pub struct Cluster {
    pub client: Client,
    pub env: TestEnv,
}

fn env_file() -> PathBuf {
    if let Some(path) = std::env::var_os("STATEWARD_TESTENV") {
        return PathBuf::from(path);
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("../../target"));
    target.join("testenv/env.json")
}

impl Cluster {
    /// Connects to the running local cluster; fails with instructions when there is none.
    pub async fn connect() -> Result<Self> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        // The controllers' logs, shown for a failing test (RUST_LOG picks the level;
        // warnings by default, so a reconcile error is never silent).
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
            )
            .with_test_writer()
            .try_init();
        let path = env_file();
        let text = std::fs::read(&path).with_context(|| {
            format!(
                "no local cluster ({} is missing): run the tests with `cargo xtask test`, or start \
                 one with `cargo xtask testenv up`",
                path.display()
            )
        })?;
        let env: TestEnv = serde_json::from_slice(&text)?;
        let kubeconfig = kube::config::Kubeconfig::read_from(&env.kubeconfig)?;
        let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default()).await?;
        let client = Client::try_from(config)?;
        Ok(Self { client, env })
    }

    /// A client acting as ServiceAccount `namespace/name`, with a real token from the
    /// TokenRequest API (it carries the account's groups, as a pod's projected token does).
    pub async fn client_as(&self, namespace: &str, name: &str) -> Result<Client> {
        use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
        use k8s_openapi::api::core::v1::ServiceAccount;
        let accounts: Api<ServiceAccount> = self.api(namespace);
        let request = TokenRequest {
            spec: Some(TokenRequestSpec {
                expiration_seconds: Some(3600),
                ..TokenRequestSpec::default()
            }),
            ..TokenRequest::default()
        };
        let token = accounts
            .create_token_request(name, &PostParams::default(), &request)
            .await
            .with_context(|| format!("a token for ServiceAccount {namespace}/{name}"))?
            .status
            .and_then(|s| s.token)
            .context("the TokenRequest returned no token")?;
        let pem = std::fs::read_to_string(&self.env.ca_cert)?;
        let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        use base64::Engine;
        let mut config = kube::Config::new(self.env.api_server.parse()?);
        config.root_cert = Some(vec![
            base64::engine::general_purpose::STANDARD.decode(body)?,
        ]);
        config.auth_info.token = Some(token.into());
        Ok(Client::try_from(config)?)
    }

    /// `helm install` of the project's chart as `release` in `namespace`, waiting for the
    /// manager pod: the image is this build (`stateward:dev`), the leader Lease short and
    /// the log text; `sets` adds `--set` values.
    pub async fn install_chart(&self, release: &str, namespace: &str, sets: &[&str]) -> Result<()> {
        anyhow::ensure!(
            self.env.helm.is_file(),
            "helm is not built: run through `cargo xtask test`"
        );
        let chart = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../charts/stateward");
        let mut command = tokio::process::Command::new(&self.env.helm);
        command.args(["install", release]).arg(&chart).args([
            "--namespace",
            namespace,
            "--wait",
            "--timeout",
            "3m",
        ]);
        for set in [
            "image.repository=stateward",
            "image.tag=dev",
            "leaderElection.leaseDurationSeconds=6",
            "logFormat=text",
        ]
        .iter()
        .chain(sets)
        {
            command.args(["--set", set]);
        }
        let out = command
            .env("KUBECONFIG", &self.env.kubeconfig)
            .output()
            .await?;
        anyhow::ensure!(
            out.status.success(),
            "helm install failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    }

    /// `helm uninstall` of `release` in `namespace`, waiting for its objects to go.
    pub async fn uninstall_chart(&self, release: &str, namespace: &str) -> Result<()> {
        let out = tokio::process::Command::new(&self.env.helm)
            .args(["uninstall", release, "--namespace", namespace, "--wait"])
            .env("KUBECONFIG", &self.env.kubeconfig)
            .output()
            .await?;
        anyhow::ensure!(
            out.status.success(),
            "helm uninstall failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    }

    /// A fresh namespace named after the test; deleted by [`TestNamespace::cleanup`].
    pub async fn namespace(&self, test: &str) -> Result<TestNamespace> {
        use rand::Rng;
        let suffix: u32 = rand::rng().random_range(0..0xffffff);
        let base: String = test
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '-'
                }
            })
            .take(40)
            .collect();
        let name = format!("{}-{suffix:06x}", base.trim_matches('-'));
        let api: Api<Namespace> = Api::all(self.client.clone());
        let ns: Namespace = from_yaml(&format!(
            "metadata:\n  name: {name}\n  labels:\n    stateward.io/test: \"true\"\n"
        ))?;
        api.create(&PostParams::default(), &ns).await?;
        // Pods need the namespace's default ServiceAccount (made by the controller manager).
        let sas: Api<k8s_openapi::api::core::v1::ServiceAccount> =
            Api::namespaced(self.client.clone(), &name);
        wait_for(
            &format!("ServiceAccount default in {name}"),
            Duration::from_secs(60),
            || async { Ok(sas.get_opt("default").await?.map(|_| ())) },
        )
        .await?;
        Ok(TestNamespace {
            name,
            client: self.client.clone(),
        })
    }

    /// Serialises tests that touch cluster-scoped objects, across test binaries too.
    pub async fn serial(&self) -> Result<SerialGuard> {
        let path = self.env.state_dir.join("serial.lock");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)?;
        let lock = tokio::task::spawn_blocking(move || {
            nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive).map_err(|(_, e)| e)
        })
        .await??;
        Ok(SerialGuard { _lock: lock })
    }

    pub fn api<K>(&self, namespace: &str) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>
            + Clone
            + DeserializeOwned
            + std::fmt::Debug,
        K::DynamicType: Default,
    {
        Api::namespaced(self.client.clone(), namespace)
    }
}

/// Held while a test runs in the serial group.
pub struct SerialGuard {
    _lock: nix::fcntl::Flock<std::fs::File>,
}

/// A namespace owned by one test.
pub struct TestNamespace {
    pub name: String,
    client: Client,
}

impl TestNamespace {
    /// Deletes the namespace (without waiting: the namespace controller finishes it).
    pub async fn cleanup(self) -> Result<()> {
        let api: Api<Namespace> = Api::all(self.client.clone());
        api.delete(&self.name, &DeleteParams::default()).await?;
        Ok(())
    }
}

/// Parses a typed object from YAML.
pub fn from_yaml<T: DeserializeOwned>(yaml: &str) -> Result<T> {
    Ok(serde_yaml::from_str(yaml)?)
}

/// Polls `check` every 250 ms until it returns `Some`, or fails after `timeout` naming
/// `what` and the last error.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>>>,
{
    let started = Instant::now();
    let mut last_error = None;
    loop {
        match check().await {
            Ok(Some(value)) => return Ok(value),
            Ok(None) => {}
            Err(e) => last_error = Some(format!("{e:#}")),
        }
        if started.elapsed() > timeout {
            match last_error {
                Some(e) => {
                    bail!("timed out after {timeout:?} waiting for {what} (last error: {e})")
                }
                None => bail!("timed out after {timeout:?} waiting for {what}"),
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Waits until the pod is Running and Ready; returns it.
pub async fn wait_pod_ready(api: &Api<Pod>, name: &str, timeout: Duration) -> Result<Pod> {
    wait_for(
        &format!("pod {name} Running and Ready"),
        timeout,
        || async {
            let Some(pod) = api.get_opt(name).await? else {
                return Ok(None);
            };
            if pod.metadata.deletion_timestamp.is_some() {
                return Ok(None);
            }
            let status = pod.status.clone().unwrap_or_default();
            let ready = status
                .conditions
                .unwrap_or_default()
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True");
            Ok((status.phase.as_deref() == Some("Running") && ready).then_some(pod))
        },
    )
    .await
}

/// Waits until the pod reaches `phase` (e.g. `Succeeded` for a pod that runs to
/// completion).
pub async fn wait_pod_phase(
    api: &Api<Pod>,
    name: &str,
    phase: &str,
    timeout: Duration,
) -> Result<Pod> {
    wait_for(
        &format!("pod {name} to reach phase {phase}"),
        timeout,
        || async {
            let pod = api.get(name).await?;
            let reached = pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some(phase);
            Ok(reached.then_some(pod))
        },
    )
    .await
}

/// The terminated state of a pod's first container, if it has ended.
pub fn first_container_terminated(
    pod: &Pod,
) -> Option<k8s_openapi::api::core::v1::ContainerStateTerminated> {
    pod.status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|c| c.first())
        .and_then(|c| c.state.as_ref())
        .and_then(|s| s.terminated.clone())
}

impl Cluster {
    /// An S3 client for the local S3 server (path-style, test credentials).
    pub fn s3_client(&self) -> aws_sdk_s3::Client {
        self.s3_client_as(&self.env.s3_access_key, &self.env.s3_secret_key)
    }

    /// An S3 client for the local S3 server with the given credentials (for tests of
    /// refused credentials).
    pub fn s3_client_as(&self, key: &str, secret: &str) -> aws_sdk_s3::Client {
        let env = &self.env;
        let creds = aws_sdk_s3::config::Credentials::new(key, secret, None, None, "testenv");
        let config = aws_sdk_s3::config::Builder::new()
            .behavior_version(aws_sdk_s3::config::BehaviorVersion::latest())
            .region(aws_sdk_s3::config::Region::new(env.s3_region.clone()))
            .endpoint_url(&env.s3_endpoint)
            .force_path_style(true)
            .credentials_provider(creds)
            .build();
        aws_sdk_s3::Client::from_conf(config)
    }

    /// A fresh bucket named `<prefix>-<namespace suffix>` and, in `namespace`, a Secret
    /// `s3` with the test credentials under `accessKeyId` and `secretAccessKey`: what a
    /// BackupRepository in a test points at. Returns the bucket's name.
    pub async fn bucket_and_secret(&self, namespace: &str, prefix: &str) -> Result<String> {
        let bucket = format!(
            "{prefix}-{}",
            &namespace[namespace.len().saturating_sub(6)..]
        );
        self.s3_client()
            .create_bucket()
            .bucket(&bucket)
            .send()
            .await?;
        let secrets: Api<k8s_openapi::api::core::v1::Secret> = self.api(namespace);
        secrets
            .create(
                &kube::api::PostParams::default(),
                &from_yaml(&format!(
                    "metadata: {{ name: s3, labels: {{ stateward.io/repository-secret: \"true\" }} }}\nstringData: {{ accessKeyId: {}, secretAccessKey: {} }}",
                    self.env.s3_access_key, self.env.s3_secret_key
                ))?,
            )
            .await?;
        Ok(bucket)
    }
}

/// Creates a ReadWriteOnce claim of `size` on the local storage class.
pub async fn create_claim(
    api: &Api<k8s_openapi::api::core::v1::PersistentVolumeClaim>,
    name: &str,
    size: &str,
) -> Result<()> {
    let claim = from_yaml(&format!(
        "metadata: {{ name: {name} }}\nspec: {{ accessModes: [ReadWriteOnce], resources: {{ requests: {{ storage: {size} }} }} }}"
    ))?;
    api.create(&PostParams::default(), &claim).await?;
    Ok(())
}

/// What the API server answers an exec into `pod` *before* any stream opens: a request
/// without the upgrade headers passes authentication, authorization and admission, then
/// is answered 400 "Upgrade request required" — or is refused on the way (403 with the
/// reason: RBAC, or the policy by name). kube's exec drops a refused upgrade's body, so
/// a test reads a refusal's reason this way. Returns (HTTP code, message).
pub async fn exec_verdict(client: &Client, namespace: &str, pod: &str) -> Result<(u16, String)> {
    let request = http::Request::post(format!(
        "/api/v1/namespaces/{namespace}/pods/{pod}/exec?command=true&stdout=true"
    ))
    .body(Vec::new())?;
    match client.request_text(request).await {
        Ok(text) => Ok((200, text)),
        Err(kube::Error::Api(e)) => Ok((e.code, e.message.clone())),
        Err(e) => Err(e.into()),
    }
}

/// The result of an exec.
#[derive(Debug)]
pub struct ExecOutput {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// 0 on success, the command's exit code otherwise (-1 when the status had none).
    pub exit_code: i32,
    pub status_message: Option<String>,
}

impl ExecOutput {
    pub fn stdout_str(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
}

/// Runs a command in a pod's container through the API server (WebSocket), optionally
/// feeding `stdin`, and collects everything.
pub async fn exec(
    api: &Api<Pod>,
    pod: &str,
    container: Option<&str>,
    command: &[&str],
    stdin: Option<Vec<u8>>,
) -> Result<ExecOutput> {
    let mut params = AttachParams::default()
        .stdin(stdin.is_some())
        .stdout(true)
        .stderr(true);
    if let Some(c) = container {
        params = params.container(c);
    }
    let mut attached = api
        .exec(
            pod,
            command.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
            &params,
        )
        .await
        .with_context(|| format!("exec {command:?} in pod {pod}"))?;
    let writer = match (stdin, attached.stdin()) {
        (Some(data), Some(mut pipe)) => Some(tokio::spawn(async move {
            pipe.write_all(&data).await?;
            pipe.shutdown().await?;
            Ok::<_, std::io::Error>(())
        })),
        _ => None,
    };
    let mut stdout_pipe = attached.stdout().context("no stdout")?;
    let mut stderr_pipe = attached.stderr().context("no stderr")?;
    let status = attached.take_status();
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    let (a, b) = tokio::join!(
        stdout_pipe.read_to_end(&mut stdout),
        stderr_pipe.read_to_end(&mut stderr)
    );
    a?;
    b?;
    if let Some(w) = writer {
        w.await??;
    }
    let status = match status {
        Some(s) => s.await,
        None => None,
    };
    attached.join().await.ok();
    let (exit_code, status_message) = match status {
        Some(s) if s.status.as_deref() == Some("Success") => (0, None),
        Some(s) => {
            let code = s
                .details
                .as_ref()
                .and_then(|d| d.causes.as_ref())
                .and_then(|c| c.iter().find(|c| c.reason.as_deref() == Some("ExitCode")))
                .and_then(|c| c.message.as_ref())
                .and_then(|m| m.parse().ok())
                .unwrap_or(-1);
            (code, s.message)
        }
        None => (-1, None),
    };
    Ok(ExecOutput {
        stdout,
        stderr,
        exit_code,
        status_message,
    })
}

/// Installs (server-side apply, forced) the given CRDs and waits until they are
/// Established, and the chart's fixed exec ClusterRole and policy (see
/// [`install_agent_exec`]). Cluster-scoped: callers hold [`Cluster::serial`].
pub async fn install_crds(
    client: &Client,
    crds: &[k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition],
) -> Result<()> {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    use kube::ResourceExt;
    use kube::api::{Patch, PatchParams};
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in crds {
        let name = crd.name_any();
        api.patch(
            &name,
            &PatchParams::apply("stateward-tests").force(),
            &Patch::Apply(crd),
        )
        .await
        .with_context(|| format!("applying CRD {name}"))?;
    }
    for crd in crds {
        let name = crd.name_any();
        wait_for(
            &format!("CRD {name} Established"),
            Duration::from_secs(60),
            || async {
                let crd = api.get(&name).await?;
                let established = crd
                    .status
                    .and_then(|s| s.conditions)
                    .unwrap_or_default()
                    .iter()
                    .any(|c| c.type_ == "Established" && c.status == "True");
                Ok(established.then_some(()))
            },
        )
        .await?;
    }
    install_agent_exec(client).await
}

/// The chart's `templates/agent-exec.yaml` rendered for a release named `stateward`
/// (the ClusterRole `stateward-agent-exec` the controllers bind by default, and the
/// policy fencing exec agents), applied once per test process: a manager started by a
/// test runs its exec agents under exactly the rights and the policy the chart ships.
pub async fn install_agent_exec(client: &Client) -> Result<()> {
    static DONE: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();
    DONE.get_or_try_init(|| async {
        let env: TestEnv = serde_json::from_slice(&std::fs::read(env_file())?)?;
        let chart = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../charts/stateward");
        let output = tokio::process::Command::new(&env.helm)
            .arg("template")
            .arg("stateward")
            .arg(&chart)
            .args(["--show-only", "templates/agent-exec.yaml"])
            .args(["--kube-version", &env.kubernetes_version])
            .output()
            .await
            .with_context(|| format!("running {}", env.helm.display()))?;
        anyhow::ensure!(
            output.status.success(),
            "helm template failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        apply_yaml(
            client,
            "default",
            &String::from_utf8_lossy(&output.stdout),
            "stateward-tests",
        )
        .await?;
        Ok::<(), anyhow::Error>(())
    })
    .await?;
    Ok(())
}

/// Applies every document of a multi-document YAML stream into `namespace` (server-side
/// apply), resolving kinds through discovery. Returns the first error, which names the
/// object.
pub async fn apply_yaml(
    client: &Client,
    namespace: &str,
    yaml: &str,
    manager: &str,
) -> Result<Vec<kube::api::DynamicObject>> {
    use kube::api::{DynamicObject, Patch, PatchParams};
    use kube::discovery::{Discovery, Scope};
    let discovery = Discovery::new(client.clone()).run().await?;
    let mut applied = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(yaml) {
        let value = serde_yaml::Value::deserialize(doc)?;
        if value.is_null() {
            continue;
        }
        let object: DynamicObject = serde_yaml::from_value(value)?;
        let types = object
            .types
            .clone()
            .context("a document without apiVersion/kind")?;
        let gvk = kube::api::GroupVersionKind::try_from(&types)?;
        let (resource, caps) = discovery.resolve_gvk(&gvk).with_context(|| {
            format!(
                "the API server does not know {}/{}",
                types.api_version, types.kind
            )
        })?;
        let api: Api<DynamicObject> = match caps.scope {
            Scope::Namespaced => Api::namespaced_with(client.clone(), namespace, &resource),
            Scope::Cluster => Api::all_with(client.clone(), &resource),
        };
        let name = object
            .metadata
            .name
            .clone()
            .context("a document without metadata.name")?;
        let result = api
            .patch(
                &name,
                &PatchParams::apply(manager).force(),
                &Patch::Apply(&object),
            )
            .await
            .with_context(|| format!("applying {} {name}", types.kind))?;
        applied.push(result);
    }
    Ok(applied)
}

/// Sums a counter family of a Prometheus text exposition by one label:
/// `counter_by_label(text, "controller_runtime_reconcile_total", "controller")`.
pub fn counter_by_label(text: &str, family: &str, label: &str) -> Vec<(String, f64)> {
    let prefix = format!("{family}{{");
    let key = format!("{label}=\"");
    let mut totals: Vec<(String, f64)> = Vec::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(&prefix) else {
            continue;
        };
        let Some(value) = rest.split(&key).nth(1).and_then(|s| s.split('"').next()) else {
            continue;
        };
        let n: f64 = line
            .rsplit(' ')
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        match totals.iter_mut().find(|(v, _)| v == value) {
            Some((_, total)) => *total += n,
            None => totals.push((value.to_string(), n)),
        }
    }
    totals.sort_by(|a, b| a.0.cmp(&b.0));
    totals
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_sum_by_one_label() {
        let text = "# TYPE controller_runtime_reconcile_total counter\n\
            controller_runtime_reconcile_total{controller=\"backup\",result=\"success\"} 3\n\
            controller_runtime_reconcile_total{controller=\"backup\",result=\"error\"} 1\n\
            controller_runtime_reconcile_total{controller=\"scaling\",result=\"success\"} 2\n\
            controller_runtime_reconcile_time_seconds_count{controller=\"backup\"} 9\n";
        assert_eq!(
            counter_by_label(text, "controller_runtime_reconcile_total", "controller"),
            vec![("backup".to_string(), 4.0), ("scaling".to_string(), 2.0)]
        );
    }
}
