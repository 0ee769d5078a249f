//! Pods on the local node: a worker per pod sets up its sandbox (network namespace,
//! volumes), runs init containers then containers as local processes, supervises them
//! (probes, restarts), reports status, and on deletion stops them gracefully and removes
//! the pod object.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use chrono::{DateTime, Utc};
use k8s_openapi::api::core::v1::{Container, Pod};
use kube::api::{DeleteParams, Patch, PatchParams, Preconditions};
use kube::{Api, Client, ResourceExt};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde_json::{Value, json};
use tokio::sync::{Notify, watch};

use super::images::{self, ImageProgram};
use super::network::{Network, Sandbox};
use super::privileges;
use super::runner::{MountSpec, RunSpec, SPEC_VAR};
use super::{NodeConfig, memory, probes, volumes};

/// The termination message is capped like the kubelet's.
pub const TERMINATION_MESSAGE_LIMIT: usize = 4096;

/// Everything pod workers share.
pub struct PodContext {
    pub client: Client,
    pub cfg: Arc<NodeConfig>,
    pub network: Network,
    pods: Mutex<HashMap<String, Arc<PodRuntime>>>,
}

/// What exec needs to enter a running container.
#[derive(Clone, Debug)]
pub struct ExecTarget {
    pub pid: u32,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub groups: Vec<u32>,
    pub working_dir: Option<PathBuf>,
    /// The container's `allowPrivilegeEscalation: false` holds for execs too.
    pub no_new_privs: bool,
    /// So do its capabilities.
    pub capabilities: Option<Vec<u8>>,
    /// Where each exec is recorded (`exec: true`).
    pub record: Option<privileges::RecordTarget>,
    /// Execs count against the container's memory limit too.
    pub memory_cgroup: Option<PathBuf>,
    /// The container's environment as started (not /proc/<pid>/environ: programs such as
    /// redis-server overwrite that memory with their process title).
    pub env: Vec<(String, String)>,
}

impl ExecTarget {
    /// The runner invocation that enters this container and runs `command` (an exec
    /// through the API: recorded).
    pub fn command(&self, command: &[String]) -> tokio::process::Command {
        self.runner(command, true)
    }

    fn runner(&self, command: &[String], recorded: bool) -> tokio::process::Command {
        let env = self.env.clone();
        let spec = RunSpec {
            enter_pid: Some(self.pid),
            uid: self.uid,
            gid: self.gid,
            supplemental_groups: self.groups.clone(),
            working_dir: self.working_dir.clone(),
            env,
            argv: command.to_vec(),
            no_new_privs: self.no_new_privs,
            capabilities: self.capabilities.clone(),
            memory_cgroup: self.memory_cgroup.clone(),
            record: self
                .record
                .clone()
                .filter(|_| recorded)
                .map(|r| privileges::RecordTarget { exec: true, ..r }),
            ..RunSpec::default()
        };
        let mut cmd = tokio::process::Command::new(self_exe());
        cmd.arg("enter")
            .env(SPEC_VAR, serde_json::to_string(&spec).unwrap_or_default())
            .kill_on_drop(true);
        cmd
    }

    /// Runs a probe's command (not recorded: probes run every few seconds).
    pub async fn run_to_completion(&self, command: &[String]) -> Result<std::process::Output> {
        Ok(self
            .runner(command, false)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .output()
            .await?)
    }
}

/// The runner binary: a copy of this node's executable made at start-up (see
/// [`super::install_runner`]), so a rebuild of the workspace never pulls the file away
/// from under a running node.
fn self_exe() -> PathBuf {
    super::RUNNER
        .get()
        .cloned()
        .unwrap_or_else(|| PathBuf::from("/proc/self/exe"))
}

/// Why exec into a container is impossible right now.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("pod {0} not found on this node")]
    PodNotFound(String),
    #[error("container {0} not found in pod {1}")]
    ContainerNotFound(String, String),
    #[error("container {0} is not running")]
    NotRunning(String),
    #[error(
        "container {0} runs image {1}, which the local node does not map to a program, so there \
         is no process to exec into (see crates/testkit/src/node/images.rs)"
    )]
    NoProcess(String, String),
}

#[derive(Clone, Debug)]
enum CState {
    Waiting {
        reason: String,
        message: Option<String>,
    },
    Running {
        started: DateTime<Utc>,
    },
    Terminated(Terminated),
}

#[derive(Clone, Debug)]
struct Terminated {
    exit_code: i32,
    signal: Option<i32>,
    reason: String,
    message: Option<String>,
    started: Option<DateTime<Utc>>,
    finished: DateTime<Utc>,
}

#[derive(Clone, Debug)]
struct CStatus {
    name: String,
    image: String,
    state: CState,
    last: Option<Terminated>,
    restarts: i32,
    ready: bool,
    started: bool,
    /// Terminated and not going to be restarted.
    done: bool,
    exec: Option<ExecTarget>,
    no_process: bool,
}

impl CStatus {
    fn new(c: &Container) -> Self {
        Self {
            name: c.name.clone(),
            image: c.image.clone().unwrap_or_default(),
            state: CState::Waiting {
                reason: "ContainerCreating".into(),
                message: None,
            },
            last: None,
            restarts: 0,
            ready: false,
            started: false,
            done: false,
            exec: None,
            no_process: false,
        }
    }

    fn to_json(&self) -> Value {
        let ts = |t: &DateTime<Utc>| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        let term = |t: &Terminated| {
            let mut v = json!({
                "exitCode": t.exit_code,
                "reason": t.reason,
                "finishedAt": ts(&t.finished),
                "containerID": "stateward://exited",
            });
            if let Some(s) = t.signal {
                v["signal"] = json!(s);
            }
            if let Some(m) = &t.message {
                v["message"] = json!(m);
            }
            if let Some(s) = &t.started {
                v["startedAt"] = json!(ts(s));
            }
            json!({ "terminated": v })
        };
        let state = match &self.state {
            CState::Waiting { reason, message } => {
                let mut w = json!({ "reason": reason });
                if let Some(m) = message {
                    w["message"] = json!(m);
                }
                json!({ "waiting": w })
            }
            CState::Running { started } => json!({ "running": { "startedAt": ts(started) } }),
            CState::Terminated(t) => term(t),
        };
        let mut v = json!({
            "name": self.name,
            "image": self.image,
            "imageID": format!("stateward-local://{}", self.image),
            "ready": self.ready,
            "started": self.started,
            "restartCount": self.restarts,
            "state": state,
            "lastState": self.last.as_ref().map(term).unwrap_or_else(|| json!({})),
        });
        if let Some(exec) = &self.exec {
            v["containerID"] = json!(format!("stateward://{}", exec.pid));
        }
        v
    }
}

#[derive(Default)]
struct PodModel {
    phase: String,
    pod_ip: Option<Ipv4Addr>,
    start_time: Option<DateTime<Utc>>,
    initialized: bool,
    init: Vec<CStatus>,
    containers: Vec<CStatus>,
    /// condition type -> (status, lastTransitionTime)
    transitions: HashMap<String, (bool, DateTime<Utc>)>,
    message: Option<String>,
    reason: Option<String>,
}

/// The node's view of one pod it runs.
pub struct PodRuntime {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    model: Mutex<PodModel>,
    changed: Notify,
    /// `Some(grace seconds)` once the pod is being deleted.
    terminate: watch::Sender<Option<i64>>,
}

impl PodRuntime {
    fn update(&self, f: impl FnOnce(&mut PodModel)) {
        if let Ok(mut m) = self.model.lock() {
            f(&mut m);
        }
        self.changed.notify_one();
    }

    fn set_container(&self, init: bool, index: usize, f: impl FnOnce(&mut CStatus)) {
        self.update(|m| {
            let list = if init { &mut m.init } else { &mut m.containers };
            if let Some(c) = list.get_mut(index) {
                f(c);
            }
        });
    }

    /// The exec target of a container, or why there is none.
    pub fn exec_target(&self, container: Option<&str>) -> Result<ExecTarget, ExecError> {
        let m = self
            .model
            .lock()
            .map_err(|_| ExecError::PodNotFound(self.name.clone()))?;
        let c = match container {
            Some(name) => m
                .containers
                .iter()
                .chain(m.init.iter())
                .find(|c| c.name == name),
            None => m.containers.first(),
        }
        .ok_or_else(|| {
            ExecError::ContainerNotFound(container.unwrap_or_default().into(), self.name.clone())
        })?;
        if c.no_process {
            return Err(ExecError::NoProcess(c.name.clone(), c.image.clone()));
        }
        match (&c.state, &c.exec) {
            (CState::Running { .. }, Some(t)) => Ok(t.clone()),
            _ => Err(ExecError::NotRunning(c.name.clone())),
        }
    }

    fn terminating(&self) -> bool {
        self.terminate.borrow().is_some()
    }
}

impl PodContext {
    pub fn new(client: Client, cfg: Arc<NodeConfig>, network: Network) -> Self {
        Self {
            client,
            cfg,
            network,
            pods: Mutex::new(HashMap::new()),
        }
    }

    pub fn find(&self, namespace: &str, name: &str) -> Option<Arc<PodRuntime>> {
        self.pods
            .lock()
            .ok()?
            .values()
            .find(|p| p.namespace == namespace && p.name == name)
            .cloned()
    }

    /// Reacts to a pod seen by the watcher.
    pub fn observe(self: &Arc<Self>, pod: Pod) {
        let Some(node) = pod.spec.as_ref().and_then(|s| s.node_name.clone()) else {
            return;
        };
        if !self.cfg.nodes.iter().any(|n| n.name == node) {
            return;
        }
        let uid = pod.uid().unwrap_or_default();
        let existing = self.pods.lock().ok().and_then(|p| p.get(&uid).cloned());
        let deleting = pod.metadata.deletion_timestamp.is_some();
        let grace = pod.metadata.deletion_grace_period_seconds.unwrap_or(30);
        match existing {
            Some(rt) => {
                if deleting && rt.terminate.borrow().is_none() {
                    let _ = rt.terminate.send(Some(grace));
                }
            }
            None => {
                let phase = pod
                    .status
                    .as_ref()
                    .and_then(|s| s.phase.clone())
                    .unwrap_or_default();
                if deleting {
                    // Never started here (or finished before a node restart): just finish
                    // the deletion.
                    let ctx = self.clone();
                    tokio::spawn(async move { ctx.finalize_delete(&pod).await });
                    return;
                }
                if phase == "Succeeded" || phase == "Failed" {
                    return;
                }
                let (tx, _) = watch::channel(None);
                let rt = Arc::new(PodRuntime {
                    uid: uid.clone(),
                    namespace: pod.namespace().unwrap_or_default(),
                    name: pod.name_any(),
                    model: Mutex::new(PodModel::default()),
                    changed: Notify::new(),
                    terminate: tx,
                });
                if let Ok(mut pods) = self.pods.lock() {
                    pods.insert(uid.clone(), rt.clone());
                }
                let ctx = self.clone();
                tokio::spawn(async move {
                    ctx.run_pod(pod, rt).await;
                    if let Ok(mut pods) = ctx.pods.lock() {
                        pods.remove(&uid);
                    }
                });
            }
        }
    }

    /// A pod vanished from the API (force-deleted): stop it now.
    pub fn forget(&self, uid: &str) {
        if let Some(rt) = self.pods.lock().ok().and_then(|p| p.get(uid).cloned())
            && rt.terminate.borrow().is_none()
        {
            let _ = rt.terminate.send(Some(0));
        }
    }

    pub fn known_uids(&self) -> Vec<String> {
        self.pods
            .lock()
            .map(|p| p.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// Stops every pod (node shutdown) and waits for them to be cleaned up.
    pub async fn shutdown(&self, timeout: Duration) {
        let all: Vec<Arc<PodRuntime>> = self
            .pods
            .lock()
            .map(|p| p.values().cloned().collect())
            .unwrap_or_default();
        for rt in &all {
            if rt.terminate.borrow().is_none() {
                let _ = rt.terminate.send(Some(5));
            }
        }
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline && !self.pods.lock().map(|p| p.is_empty()).unwrap_or(true) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn finalize_delete(&self, pod: &Pod) {
        let api: Api<Pod> =
            Api::namespaced(self.client.clone(), &pod.namespace().unwrap_or_default());
        let params = DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: Some(Preconditions {
                uid: pod.uid(),
                resource_version: None,
            }),
            ..DeleteParams::default()
        };
        if let Err(e) = api.delete(&pod.name_any(), &params).await
            && !matches!(&e, kube::Error::Api(s) if s.code == 404 || s.code == 409)
        {
            tracing::warn!(pod = %pod.name_any(), error = %e, "final delete of the pod failed");
        }
    }

    fn pod_dir(&self, uid: &str) -> PathBuf {
        self.cfg.state_dir.join("pods").join(uid)
    }

    async fn run_pod(self: &Arc<Self>, pod: Pod, rt: Arc<PodRuntime>) {
        let node_ip = self.cfg.node_ip;
        let spec = pod.spec.clone().unwrap_or_default();
        rt.update(|m| {
            m.phase = "Pending".into();
            m.start_time = Some(Utc::now());
            m.init = spec
                .init_containers
                .iter()
                .flatten()
                .map(CStatus::new)
                .collect();
            m.containers = spec.containers.iter().map(CStatus::new).collect();
        });
        let writer = tokio::spawn(status_writer(
            self.client.clone(),
            pod.clone(),
            rt.clone(),
            node_ip,
        ));
        let dir = self.pod_dir(&rt.uid);
        let mut terminate = rt.terminate.subscribe();

        // Sandbox: network and volumes; retried until they can be set up or the pod goes.
        let mut sandbox: Option<Sandbox> = None;
        let mut prepared = HashMap::new();
        loop {
            if rt.terminating() {
                break;
            }
            match self.setup(&pod, &rt, &dir, &mut sandbox).await {
                Ok(p) => {
                    prepared = p;
                    break;
                }
                Err(e) => {
                    let message = format!("{e:#}");
                    tracing::info!(pod = %rt.name, %message, "pod sandbox not ready yet");
                    rt.update(|m| {
                        for c in m.init.iter_mut().chain(m.containers.iter_mut()) {
                            c.state = CState::Waiting {
                                reason: "ContainerCreating".into(),
                                message: Some(message.clone()),
                            };
                        }
                    });
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                        _ = terminate.changed() => {}
                    }
                }
            }
        }

        if let (Some(sb), false) = (&sandbox, rt.terminating()) {
            let ip = sb.ip;
            let netns = sb.netns_path();
            rt.update(|m| m.pod_ip = Some(ip));
            let restart_policy = spec
                .restart_policy
                .clone()
                .unwrap_or_else(|| "Always".into());
            let mut init_ok = true;
            for (i, c) in spec.init_containers.iter().flatten().enumerate() {
                let policy = if restart_policy == "Never" {
                    "Never"
                } else {
                    "OnFailure"
                };
                let ok = self
                    .supervise(&pod, &rt, c, true, i, policy, &netns, &prepared, &dir)
                    .await;
                if !ok {
                    init_ok = false;
                    break;
                }
            }
            if init_ok && !rt.terminating() {
                rt.update(|m| m.initialized = true);
                let mut tasks = Vec::new();
                for (i, c) in spec.containers.iter().enumerate() {
                    let ctx = self.clone();
                    let (pod, rt, c, netns, prepared, dir, policy) = (
                        pod.clone(),
                        rt.clone(),
                        c.clone(),
                        netns.clone(),
                        prepared.clone(),
                        dir.clone(),
                        restart_policy.clone(),
                    );
                    tasks.push(tokio::spawn(async move {
                        ctx.supervise(&pod, &rt, &c, false, i, &policy, &netns, &prepared, &dir)
                            .await
                    }));
                }
                for t in tasks {
                    let _ = t.await;
                }
            } else if !init_ok {
                rt.update(|m| {
                    for c in m.containers.iter_mut() {
                        c.state = CState::Waiting {
                            reason: "PodInitializing".into(),
                            message: None,
                        };
                        c.done = true;
                    }
                });
            }
        }

        // Everything has stopped: either for good (pod finished) or for deletion.
        if !rt.terminating() {
            // A finished pod keeps its object (Jobs read it) until someone deletes it.
            let _ = terminate.wait_for(|t| t.is_some()).await;
        }
        if let Some(sb) = &sandbox {
            self.network.delete(sb).await;
        }
        rt.changed.notify_one();
        writer.abort();
        let _ = std::fs::remove_dir_all(&dir);
        self.finalize_delete(&pod).await;
    }

    async fn setup(
        &self,
        pod: &Pod,
        rt: &PodRuntime,
        dir: &std::path::Path,
        sandbox: &mut Option<Sandbox>,
    ) -> Result<HashMap<String, volumes::Prepared>> {
        std::fs::create_dir_all(dir.join("volumes"))?;
        let spec = pod.spec.clone().unwrap_or_default();
        let mut prepared = HashMap::new();
        for volume in spec.volumes.iter().flatten() {
            let p = volumes::prepare(
                &self.client,
                pod,
                volume,
                &dir.join("volumes"),
                &self.cfg.volumes,
            )
            .await?;
            if let Some(fs_group) = spec.security_context.as_ref().and_then(|s| s.fs_group) {
                let writable =
                    volume.empty_dir.is_some() || volume.persistent_volume_claim.is_some();
                // `fsGroupChangePolicy`: Always (the default) walks the whole volume at
                // every mount; OnRootMismatch only when the root does not match yet.
                let always = spec
                    .security_context
                    .as_ref()
                    .and_then(|s| s.fs_group_change_policy.as_deref())
                    != Some("OnRootMismatch");
                if writable && !p.read_only {
                    volumes::apply_fs_group(&p.path, fs_group as u32, always)
                        .with_context(|| format!("applying fsGroup to volume {}", volume.name))?;
                }
            }
            prepared.insert(volume.name.clone(), p);
        }
        if sandbox.is_none() {
            *sandbox = Some(self.network.create(&rt.uid).await?);
        }
        Ok(prepared)
    }

    /// Runs one container until it is finished for good or the pod is deleted; returns
    /// whether it ended successfully (for init containers).
    #[allow(clippy::too_many_arguments)]
    async fn supervise(
        &self,
        pod: &Pod,
        rt: &Arc<PodRuntime>,
        c: &Container,
        init: bool,
        index: usize,
        policy: &str,
        netns: &std::path::Path,
        prepared: &HashMap<String, volumes::Prepared>,
        dir: &std::path::Path,
    ) -> bool {
        let mut terminate = rt.terminate.subscribe();
        let image = c.image.clone().unwrap_or_default();
        let program = images::resolve(&image, &self.cfg.bin_dir);
        let ImageProgram::Process {
            entrypoint,
            default_cmd,
            working_dir,
            extra_path,
            tmpfs,
            env: image_env,
            user: image_user,
            kind,
        } = program
        else {
            // No process: Running and Ready until deleted.
            rt.set_container(init, index, |s| {
                s.no_process = true;
                s.state = CState::Running {
                    started: Utc::now(),
                };
                s.ready = true;
                s.started = true;
            });
            let _ = terminate.wait_for(|t| t.is_some()).await;
            rt.set_container(init, index, |s| {
                s.state = CState::Terminated(Terminated {
                    exit_code: 0,
                    signal: None,
                    reason: "Completed".into(),
                    message: None,
                    started: None,
                    finished: Utc::now(),
                });
                s.ready = false;
                s.done = true;
            });
            return true;
        };
        let spec = pod.spec.clone().unwrap_or_default();
        let pod_sc = spec.security_context.clone().unwrap_or_default();
        let sc = c.security_context.clone().unwrap_or_default();
        // The security context's user, else the image's `USER` (else root); the group
        // likewise, the image's only with the image's user (as a runtime reads it from
        // the image's passwd).
        let uid = sc
            .run_as_user
            .or(pod_sc.run_as_user)
            .map(|u| u as u32)
            .or(image_user.map(|(u, _)| u));
        let gid = sc
            .run_as_group
            .or(pod_sc.run_as_group)
            .map(|g| g as u32)
            .or(image_user.filter(|(u, _)| Some(*u) == uid).map(|(_, g)| g));
        let mut groups: Vec<u32> = pod_sc
            .supplemental_groups
            .clone()
            .unwrap_or_default()
            .iter()
            .map(|g| *g as u32)
            .collect();
        if let Some(fs_group) = pod_sc.fs_group {
            groups.push(fs_group as u32);
        }
        // `resources.limits.memory`: a memory cgroup of its own (see `memory`).
        let memory_cgroup = match (
            &self.cfg.memory_root,
            c.resources
                .as_ref()
                .and_then(|r| r.limits.as_ref())
                .and_then(|l| l.get("memory"))
                .and_then(|q| memory::quantity_bytes(&q.0)),
        ) {
            (Some((root, v2)), Some(limit)) => {
                match memory::MemoryCgroup::create(
                    root,
                    *v2,
                    &format!("{}-{}", rt.uid, c.name),
                    limit,
                ) {
                    Ok(cg) => Some(cg),
                    Err(e) => {
                        tracing::warn!(error = %format!("{e:#}"), container = %c.name, "memory limit not enforced");
                        None
                    }
                }
            }
            _ => None,
        };
        let log_path = dir.join(format!("{}.log", c.name));
        let term_path = dir.join(format!("{}.termination-log", c.name));
        let mut backoff = Duration::from_secs(1);
        loop {
            if rt.terminating() {
                return false;
            }
            // Build the run spec (env is resolved at every start, as the kubelet does).
            let spec_result = self
                .run_spec(
                    pod,
                    c,
                    &entrypoint,
                    &default_cmd,
                    working_dir.as_deref(),
                    &extra_path,
                    &tmpfs,
                    image_env.clone(),
                    kind,
                    netns,
                    prepared,
                    &term_path,
                    uid,
                    gid,
                    &groups,
                )
                .await;
            let mut run_spec = match spec_result {
                Ok(s) => s,
                Err(e) => {
                    let message = format!("{e:#}");
                    rt.set_container(init, index, |s| {
                        s.state = CState::Waiting {
                            reason: "CreateContainerConfigError".into(),
                            message: Some(message),
                        };
                    });
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                        _ = terminate.changed() => {}
                    }
                    continue;
                }
            };
            run_spec.memory_cgroup = memory_cgroup.as_ref().map(|cg| cg.procs());
            let oom_kills_before = memory_cgroup.as_ref().map_or(0, |cg| cg.oom_kills());
            let _ = std::fs::write(&term_path, b"");
            // Writable by whatever user the container runs as, as the kubelet makes it.
            let _ = std::fs::set_permissions(
                &term_path,
                std::os::unix::fs::PermissionsExt::from_mode(0o666),
            );
            let log = match std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log_path)
            {
                Ok(f) => f,
                Err(e) => {
                    tracing::error!(error = %e, "opening the container log");
                    return false;
                }
            };
            let mut cmd = tokio::process::Command::new(self_exe());
            cmd.arg("run-container")
                .env_clear()
                .env(
                    SPEC_VAR,
                    serde_json::to_string(&run_spec).unwrap_or_default(),
                )
                .stdin(Stdio::null())
                .stdout(
                    log.try_clone()
                        .map(Stdio::from)
                        .unwrap_or_else(|_| Stdio::null()),
                )
                .stderr(Stdio::from(log))
                .process_group(0);
            if let Some(marker) = &self.cfg.marker {
                cmd.env(super::MARKER_VAR, marker);
            }
            let started = Utc::now();
            let began = Instant::now();
            let mut child = match cmd.spawn() {
                Ok(child) => child,
                Err(e) => {
                    rt.set_container(init, index, |s| {
                        s.state = CState::Waiting {
                            reason: "RunContainerError".into(),
                            message: Some(e.to_string()),
                        };
                    });
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    continue;
                }
            };
            let pid = child.id().unwrap_or_default();
            let target = ExecTarget {
                pid,
                uid,
                gid,
                groups: groups.clone(),
                working_dir: run_spec.working_dir.clone(),
                no_new_privs: run_spec.no_new_privs,
                capabilities: run_spec.capabilities.clone(),
                record: run_spec.record.clone(),
                memory_cgroup: run_spec.memory_cgroup.clone(),
                env: run_spec.env.clone(),
            };
            let has_readiness = c.readiness_probe.is_some();
            rt.set_container(init, index, |s| {
                s.state = CState::Running { started };
                s.exec = Some(target.clone());
                s.started = c.startup_probe.is_none();
                s.ready = !has_readiness && !init;
            });
            tracing::info!(pod = %rt.name, container = %c.name, pid, "container started");

            let (liveness_tx, mut liveness_rx) = tokio::sync::mpsc::channel::<String>(1);
            let probes = (!init).then(|| {
                tokio::spawn(probe_loop(
                    rt.clone(),
                    c.clone(),
                    index,
                    target.clone(),
                    liveness_tx,
                ))
            });

            let mut killed_by: Option<String> = None;
            let status = tokio::select! {
                status = child.wait() => status.ok(),
                // A closed channel (no probes) disables this branch.
                Some(reason) = liveness_rx.recv() => {
                    killed_by = Some(reason);
                    let grace = spec.termination_grace_period_seconds.unwrap_or(30);
                    stop_process(&mut child, pid, grace).await
                }
                grace = wait_terminate(&mut terminate) => {
                    stop_process(&mut child, pid, grace).await
                }
            };
            if let Some(p) = probes {
                p.abort();
            }
            // Whatever the main process left in its group goes with it.
            if let Ok(raw) = i32::try_from(pid) {
                let _ = killpg(Pid::from_raw(raw), Signal::SIGKILL);
            }
            let (exit_code, signal) = exit_info(status);
            let mut message = read_termination_message(&term_path);
            if message.is_none()
                && exit_code != 0
                && c.termination_message_policy.as_deref() == Some("FallbackToLogsOnError")
            {
                message = tail_log(&log_path, 80, 2048);
            }
            let oom_killed = memory_cgroup
                .as_ref()
                .is_some_and(|cg| cg.oom_kills() > oom_kills_before);
            let terminated = Terminated {
                exit_code,
                signal,
                reason: if oom_killed {
                    "OOMKilled".into()
                } else if exit_code == 0 {
                    "Completed".into()
                } else {
                    "Error".into()
                },
                message,
                started: Some(started),
                finished: Utc::now(),
            };
            tracing::info!(pod = %rt.name, container = %c.name, exit_code, ?killed_by, "container exited");
            let restart = !rt.terminating()
                && match policy {
                    "Always" => true,
                    "OnFailure" => exit_code != 0,
                    _ => false,
                };
            let success = exit_code == 0;
            rt.set_container(init, index, |s| {
                s.exec = None;
                s.ready = false;
                if restart {
                    s.last = Some(terminated.clone());
                    s.restarts += 1;
                    s.state = CState::Waiting {
                        reason: "CrashLoopBackOff".into(),
                        message: Some(format!(
                            "back-off {}s restarting failed container",
                            backoff.as_secs()
                        )),
                    };
                } else {
                    s.state = CState::Terminated(terminated.clone());
                    s.done = true;
                }
            });
            if !restart {
                return success;
            }
            if began.elapsed() > Duration::from_secs(60) {
                backoff = Duration::from_secs(1);
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = terminate.wait_for(|t| t.is_some()) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(20));
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn run_spec(
        &self,
        pod: &Pod,
        c: &Container,
        entrypoint: &[String],
        default_cmd: &[String],
        image_working_dir: Option<&str>,
        extra_path: &[String],
        tmpfs: &[String],
        image_env: Vec<(String, String)>,
        kind: images::Known,
        netns: &std::path::Path,
        prepared: &HashMap<String, volumes::Prepared>,
        term_path: &std::path::Path,
        uid: Option<u32>,
        gid: Option<u32>,
        groups: &[u32],
    ) -> Result<RunSpec> {
        let (pod_sc, sc) = (
            pod.spec
                .as_ref()
                .and_then(|s| s.security_context.clone())
                .unwrap_or_default(),
            c.security_context.clone().unwrap_or_default(),
        );
        non_root_policy(
            sc.run_as_non_root.or(pod_sc.run_as_non_root),
            uid,
            &pod.name_any(),
            &c.name,
        )?;
        let mut path = vec![self.cfg.bin_dir.to_string_lossy().into_owned()];
        path.extend(extra_path.iter().cloned());
        path.push("/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
        let mut base = vec![
            ("PATH".to_string(), path.join(":")),
            ("HOSTNAME".to_string(), pod.name_any()),
            ("HOME".to_string(), "/root".to_string()),
            (
                "KUBERNETES_SERVICE_HOST".to_string(),
                self.cfg.api_host.clone(),
            ),
            (
                "KUBERNETES_SERVICE_PORT".to_string(),
                self.cfg.api_port.to_string(),
            ),
            (
                "KUBERNETES_SERVICE_PORT_HTTPS".to_string(),
                self.cfg.api_port.to_string(),
            ),
            (
                "KUBERNETES_PORT".to_string(),
                format!("tcp://{}:{}", self.cfg.api_host, self.cfg.api_port),
            ),
        ];
        base.extend(image_env);
        if let Some(marker) = &self.cfg.marker {
            base.push((super::MARKER_VAR.to_string(), marker.clone()));
        }
        let env = volumes::container_env(&self.client, pod, c, base).await?;
        let vars: HashMap<String, String> = env.iter().cloned().collect();
        let expand = |list: &Option<Vec<String>>| {
            list.as_ref().map(|l| {
                l.iter()
                    .map(|a| volumes::expand(a, &vars))
                    .collect::<Vec<_>>()
            })
        };
        let argv = images::argv(
            entrypoint,
            default_cmd,
            expand(&c.command).as_deref(),
            expand(&c.args).as_deref(),
            kind,
        );
        let mut mounts: Vec<MountSpec> = tmpfs
            .iter()
            .map(|t| MountSpec {
                source: None,
                target: PathBuf::from(t),
                read_only: false,
            })
            .collect();
        // The project's binaries (and image entrypoints) must stay reachable when a
        // private tmpfs covers where they live (a checkout under /tmp): bind them back.
        if tmpfs.iter().any(|t| self.cfg.bin_dir.starts_with(t)) {
            mounts.push(MountSpec {
                source: Some(self.cfg.bin_dir.clone()),
                target: self.cfg.bin_dir.clone(),
                read_only: true,
            });
        }
        mounts.extend(volumes::container_mounts(c, prepared)?);
        mounts.push(MountSpec {
            source: Some(term_path.to_path_buf()),
            target: PathBuf::from(
                c.termination_message_path
                    .clone()
                    .unwrap_or_else(|| "/dev/termination-log".into()),
            ),
            read_only: false,
        });
        let working_dir = c
            .working_dir
            .clone()
            .or(image_working_dir.map(String::from))
            .map(PathBuf::from);
        Ok(RunSpec {
            netns: Some(netns.to_path_buf()),
            enter_pid: None,
            hostname: Some(pod.name_any().chars().take(63).collect()),
            mounts,
            uid,
            gid,
            supplemental_groups: groups.to_vec(),
            working_dir,
            env,
            argv,
            detach_under: Some(self.cfg.state_dir.join("volumes")),
            no_new_privs: sc.allow_privilege_escalation == Some(false),
            capabilities: Some(privileges::container_capabilities(&sc)),
            record: Some(privileges::RecordTarget {
                path: privileges::record_path(&self.cfg.state_dir),
                namespace: pod.namespace().unwrap_or_default(),
                pod: pod.name_any(),
                container: c.name.clone(),
                exec: false,
            }),
            memory_cgroup: None, // set by the caller, which owns the cgroup
        })
    }
}

/// The kubelet's `runAsNonRoot` check, with its messages: a container that would run as
/// uid 0 is not started (`CreateContainerConfigError`). `uid` is the security context's,
/// else the image's `USER` (`None`: the image has none and runs as root).
fn non_root_policy(
    run_as_non_root: Option<bool>,
    uid: Option<u32>,
    pod: &str,
    container: &str,
) -> Result<()> {
    if run_as_non_root != Some(true) {
        return Ok(());
    }
    match uid {
        Some(0) => anyhow::bail!(
            "container's runAsUser breaks non-root policy (pod: \"{pod}\", container: {container})"
        ),
        None => anyhow::bail!(
            "container has runAsNonRoot and image will run as root (pod: \"{pod}\", container: {container})"
        ),
        Some(_) => Ok(()),
    }
}

/// Waits until the pod is being deleted; returns its grace period.
async fn wait_terminate(terminate: &mut watch::Receiver<Option<i64>>) -> i64 {
    match terminate.wait_for(|t| t.is_some()).await {
        Ok(grace) => grace.unwrap_or(30),
        Err(_) => 0,
    }
}

async fn stop_process(
    child: &mut tokio::process::Child,
    pid: u32,
    grace: i64,
) -> Option<std::process::ExitStatus> {
    let Ok(raw) = i32::try_from(pid) else {
        return child.wait().await.ok();
    };
    let _ = nix::sys::signal::kill(Pid::from_raw(raw), Signal::SIGTERM);
    let grace = Duration::from_secs(grace.max(0) as u64);
    match tokio::time::timeout(grace, child.wait()).await {
        Ok(status) => status.ok(),
        Err(_) => {
            let _ = killpg(Pid::from_raw(raw), Signal::SIGKILL);
            child.wait().await.ok()
        }
    }
}

fn exit_info(status: Option<std::process::ExitStatus>) -> (i32, Option<i32>) {
    use std::os::unix::process::ExitStatusExt;
    match status {
        Some(s) => match (s.code(), s.signal()) {
            (Some(code), _) => (code, None),
            (None, Some(sig)) => (128 + sig, Some(sig)),
            _ => (255, None),
        },
        None => (255, None),
    }
}

fn read_termination_message(path: &std::path::Path) -> Option<String> {
    let bytes = std::fs::read(path).ok()?;
    if bytes.is_empty() {
        return None;
    }
    let capped = &bytes[..bytes.len().min(TERMINATION_MESSAGE_LIMIT)];
    Some(String::from_utf8_lossy(capped).into_owned())
}

fn tail_log(path: &std::path::Path, lines: usize, bytes: usize) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    let all: Vec<&str> = text.lines().collect();
    let tail = all[all.len().saturating_sub(lines)..].join("\n");
    let start = tail.len().saturating_sub(bytes);
    let start = (start..tail.len())
        .find(|i| tail.is_char_boundary(*i))
        .unwrap_or(tail.len());
    (!tail.is_empty()).then(|| tail[start..].to_string())
}

async fn probe_loop(
    rt: Arc<PodRuntime>,
    c: Container,
    index: usize,
    target: ExecTarget,
    liveness: tokio::sync::mpsc::Sender<String>,
) {
    let ip = match rt.model.lock() {
        Ok(m) => m.pod_ip,
        Err(_) => None,
    };
    let Some(ip) = ip else { return };
    // Startup probe gates the others.
    if let Some(probe) = &c.startup_probe {
        let t = probes::timing(probe);
        tokio::time::sleep(t.initial_delay).await;
        let mut failures = 0;
        loop {
            if probes::run_once(probe, &c, ip, &target).await {
                break;
            }
            failures += 1;
            if failures >= t.failure_threshold {
                let _ = liveness.send("startup probe failed".into()).await;
                return;
            }
            tokio::time::sleep(t.period).await;
        }
    }
    rt.set_container(false, index, |s| s.started = true);
    let readiness = c.readiness_probe.clone().map(|p| (probes::timing(&p), p));
    let live = c.liveness_probe.clone().map(|p| (probes::timing(&p), p));
    if readiness.is_none() && live.is_none() {
        return;
    }
    let begin = Instant::now();
    let mut next_ready = readiness.as_ref().map(|(t, _)| begin + t.initial_delay);
    let mut next_live = live.as_ref().map(|(t, _)| begin + t.initial_delay);
    let (mut ready_ok, mut ready_fail, mut live_fail) = (0u32, 0u32, 0u32);
    loop {
        let next = [next_ready, next_live].into_iter().flatten().min();
        let Some(next) = next else { return };
        tokio::time::sleep_until(next.into()).await;
        let now = Instant::now();
        if let (Some((t, p)), Some(at)) = (&readiness, next_ready)
            && at <= now
        {
            if probes::run_once(p, &c, ip, &target).await {
                ready_ok += 1;
                ready_fail = 0;
                if ready_ok >= t.success_threshold {
                    rt.set_container(false, index, |s| s.ready = true);
                }
            } else {
                ready_fail += 1;
                ready_ok = 0;
                if ready_fail >= t.failure_threshold {
                    rt.set_container(false, index, |s| s.ready = false);
                }
            }
            next_ready = Some(Instant::now() + t.period);
        }
        if let (Some((t, p)), Some(at)) = (&live, next_live)
            && at <= now
        {
            if probes::run_once(p, &c, ip, &target).await {
                live_fail = 0;
            } else {
                live_fail += 1;
                if live_fail >= t.failure_threshold {
                    let _ = liveness.send("liveness probe failed".into()).await;
                    return;
                }
            }
            next_live = Some(Instant::now() + t.period);
        }
    }
}

fn condition(m: &mut PodModel, type_: &str, status: bool, now: DateTime<Utc>) -> Value {
    let entry = m
        .transitions
        .entry(type_.to_string())
        .or_insert((status, now));
    if entry.0 != status {
        *entry = (status, now);
    }
    json!({
        "type": type_,
        "status": if status { "True" } else { "False" },
        "lastProbeTime": null,
        "lastTransitionTime": entry.1.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
    })
}

fn status_json(m: &mut PodModel, host_ip: Ipv4Addr) -> Value {
    let now = Utc::now();
    let all_done = !m.containers.is_empty() && m.containers.iter().all(|c| c.done);
    let init_failed = m
        .init
        .iter()
        .any(|c| c.done && matches!(&c.state, CState::Terminated(t) if t.exit_code != 0));
    let phase = if init_failed {
        "Failed"
    } else if all_done {
        let ok = m
            .containers
            .iter()
            .all(|c| matches!(&c.state, CState::Terminated(t) if t.exit_code == 0));
        if ok { "Succeeded" } else { "Failed" }
    } else if m.initialized
        && m.containers
            .iter()
            .any(|c| !matches!(c.state, CState::Waiting { .. }) || c.restarts > 0)
    {
        "Running"
    } else {
        "Pending"
    };
    m.phase = phase.to_string();
    let containers_ready = m.initialized && m.containers.iter().all(|c| c.ready);
    let has_ip = m.pod_ip.is_some();
    let initialized = m.initialized;
    let conditions = vec![
        condition(m, "PodReadyToStartContainers", has_ip, now),
        condition(m, "Initialized", initialized, now),
        condition(m, "ContainersReady", containers_ready, now),
        condition(m, "Ready", containers_ready, now),
        condition(m, "PodScheduled", true, now),
    ];
    let mut status = json!({
        "phase": phase,
        "hostIP": host_ip.to_string(),
        "hostIPs": [{ "ip": host_ip.to_string() }],
        "conditions": conditions,
        // qosClass is set by the API server at creation and immutable: never written here.
        "containerStatuses": m.containers.iter().map(CStatus::to_json).collect::<Vec<_>>(),
    });
    if !m.init.is_empty() {
        status["initContainerStatuses"] =
            json!(m.init.iter().map(CStatus::to_json).collect::<Vec<_>>());
    }
    if let Some(ip) = m.pod_ip {
        status["podIP"] = json!(ip.to_string());
        status["podIPs"] = json!([{ "ip": ip.to_string() }]);
    }
    if let Some(t) = m.start_time {
        status["startTime"] = json!(t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true));
    }
    if let Some(r) = &m.reason {
        status["reason"] = json!(r);
    }
    if let Some(msg) = &m.message {
        status["message"] = json!(msg);
    }
    status
}

/// Writes the pod's status whenever the model changes (coalescing bursts).
async fn status_writer(client: Client, pod: Pod, rt: Arc<PodRuntime>, host_ip: Ipv4Addr) {
    let api: Api<Pod> = Api::namespaced(client, &pod.namespace().unwrap_or_default());
    let name = pod.name_any();
    let mut last: Option<Value> = None;
    loop {
        let status = match rt.model.lock() {
            Ok(mut m) => status_json(&mut m, host_ip),
            Err(_) => return,
        };
        if last.as_ref() != Some(&status) {
            let patch = json!({ "status": status });
            match api
                .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => last = Some(status),
                Err(kube::Error::Api(s)) if s.code == 404 => return,
                Err(e) => {
                    tracing::warn!(pod = %name, error = %e, "writing pod status failed; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            }
        }
        tokio::select! {
            _ = rt.changed.notified() => tokio::time::sleep(Duration::from_millis(50)).await,
            _ = tokio::time::sleep(Duration::from_secs(10)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::non_root_policy;

    #[test]
    fn run_as_non_root_refuses_uid_0_with_the_kubelets_messages() {
        let verdict = |non_root, uid| {
            non_root_policy(non_root, uid, "p", "c")
                .err()
                .map(|e| e.to_string())
        };
        assert_eq!(verdict(None, None), None);
        assert_eq!(verdict(Some(false), Some(0)), None);
        assert_eq!(verdict(Some(true), Some(1000)), None);
        let implicit = verdict(Some(true), None).unwrap_or_default();
        assert!(implicit.contains("image will run as root"), "{implicit}");
        let explicit = verdict(Some(true), Some(0)).unwrap_or_default();
        assert!(
            explicit.contains("runAsUser breaks non-root policy"),
            "{explicit}"
        );
    }
}
