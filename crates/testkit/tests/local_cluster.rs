//! The local cluster, proven the way the rest of the project uses it: real API server,
//! scheduler, controller manager and S3 server, and the local node running real processes.
//! Run with `cargo xtask test`.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, PersistentVolume, PersistentVolumeClaim, Pod, Secret};
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, ResourceExt};
use sha2::{Digest, Sha256};
use stateward_testkit::harness::{
    Cluster, create_claim, exec, first_container_terminated, from_yaml, wait_for, wait_pod_phase,
    wait_pod_ready,
};

const MINUTE: Duration = Duration::from_secs(60);

fn probe_statefulset(name: &str, replicas: i32, size: &str) -> String {
    format!(
        r#"
apiVersion: apps/v1
kind: StatefulSet
metadata: {{ name: {name} }}
spec:
  replicas: {replicas}
  serviceName: {name}
  selector: {{ matchLabels: {{ app: {name} }} }}
  template:
    metadata: {{ labels: {{ app: {name} }} }}
    spec:
      terminationGracePeriodSeconds: 5
      affinity:
        podAntiAffinity:
          requiredDuringSchedulingIgnoredDuringExecution:
          - labelSelector: {{ matchLabels: {{ app: {name} }} }}
            topologyKey: kubernetes.io/hostname
      containers:
      - name: main
        image: stateward-probe:dev
        args: [sleep]
        volumeMounts: [{{ name: data, mountPath: /data }}]
  volumeClaimTemplates:
  - metadata: {{ name: data }}
    spec:
      accessModes: [ReadWriteOnce]
      resources: {{ requests: {{ storage: {size} }} }}
"#
    )
}

fn pod_uid(pod: &Pod) -> String {
    pod.uid().unwrap_or_default()
}

#[tokio::test]
async fn statefulset_runs_on_local_volumes_and_keeps_data_across_pod_deletion() -> Result<()> {
    let cluster = Cluster::connect().await?;
    let ns = cluster.namespace("sts-volumes").await?;
    let sts_api: Api<StatefulSet> = cluster.api(&ns.name);
    let pods: Api<Pod> = cluster.api(&ns.name);
    let pvcs: Api<PersistentVolumeClaim> = cluster.api(&ns.name);
    let pvs: Api<PersistentVolume> = Api::all(cluster.client.clone());

    let sts: StatefulSet = from_yaml(&probe_statefulset("web", 2, "256Mi"))?;
    sts_api.create(&PostParams::default(), &sts).await?;
    let pod0 = wait_pod_ready(&pods, "web-0", 2 * MINUTE).await?;
    let pod1 = wait_pod_ready(&pods, "web-1", 2 * MINUTE).await?;

    // The scheduler placed them (anti-affinity: one per node), each PVC is bound to a
    // local PV pinned to its pod's node.
    let node0 = pod0
        .spec
        .as_ref()
        .and_then(|s| s.node_name.clone())
        .context("pod 0 unscheduled")?;
    let node1 = pod1
        .spec
        .as_ref()
        .and_then(|s| s.node_name.clone())
        .context("pod 1 unscheduled")?;
    ensure!(
        node0 != node1,
        "anti-affinity should spread the pods, both are on {node0}"
    );
    for (pod, node) in [("web-0", &node0), ("web-1", &node1)] {
        let pvc = pvcs.get(&format!("data-{pod}")).await?;
        let status = pvc.status.clone().unwrap_or_default();
        ensure!(
            status.phase.as_deref() == Some("Bound"),
            "PVC of {pod} is {:?}",
            status.phase
        );
        let pv = pvs
            .get(
                pvc.spec
                    .as_ref()
                    .and_then(|s| s.volume_name.as_deref())
                    .unwrap_or_default(),
            )
            .await?;
        let affinity =
            serde_json::to_string(&pv.spec.as_ref().and_then(|s| s.node_affinity.clone()))?;
        ensure!(
            affinity.contains(node.as_str()),
            "PV of {pod} is not pinned to {node}: {affinity}"
        );
    }

    // df inside the pod shows the claimed capacity within 10 %.
    let df = exec(
        &pods,
        "web-0",
        None,
        &["stateward-probe", "df", "/data"],
        None,
    )
    .await?;
    ensure!(
        df.exit_code == 0,
        "df failed: {}",
        String::from_utf8_lossy(&df.stderr)
    );
    let bytes: f64 = df.stdout_str().trim().parse()?;
    let claimed = 256.0 * 1024.0 * 1024.0;
    ensure!(
        (bytes - claimed).abs() / claimed < 0.10,
        "df shows {bytes} bytes for a 256Mi claim"
    );

    // A file written by replica 0 survives deleting pod 0.
    let write = exec(
        &pods,
        "web-0",
        None,
        &[
            "stateward-probe",
            "write",
            "/data/hello.txt",
            "kept across restarts",
        ],
        None,
    )
    .await?;
    ensure!(
        write.exit_code == 0,
        "write failed: {}",
        String::from_utf8_lossy(&write.stderr)
    );
    let old_uid = pod_uid(&pod0);
    pods.delete("web-0", &DeleteParams::default()).await?;
    wait_for("pod web-0 to be replaced", 2 * MINUTE, || async {
        Ok(pods
            .get_opt("web-0")
            .await?
            .filter(|p| pod_uid(p) != old_uid)
            .map(|_| ()))
    })
    .await?;
    wait_pod_ready(&pods, "web-0", 2 * MINUTE).await?;
    let read = exec(
        &pods,
        "web-0",
        None,
        &["stateward-probe", "read", "/data/hello.txt"],
        None,
    )
    .await?;
    ensure!(
        read.stdout_str() == "kept across restarts",
        "read back {:?}",
        read.stdout_str()
    );
    ns.cleanup().await
}

#[tokio::test]
async fn exec_streams_stdout_stderr_exit_code_and_64_mib_of_stdin_over_websocket() -> Result<()> {
    let cluster = Cluster::connect().await?;
    let ns = cluster.namespace("exec").await?;
    let pods: Api<Pod> = cluster.api(&ns.name);
    let pod: Pod = from_yaml(
        r#"
metadata: { name: shell }
spec:
  terminationGracePeriodSeconds: 2
  containers:
  - { name: main, image: stateward-probe, args: [sleep] }
"#,
    )?;
    pods.create(&PostParams::default(), &pod).await?;
    wait_pod_ready(&pods, "shell", MINUTE).await?;

    let out = exec(
        &pods,
        "shell",
        Some("main"),
        &["sh", "-c", "echo to-stdout; echo to-stderr >&2; exit 7"],
        None,
    )
    .await?;
    ensure!(
        out.stdout_str() == "to-stdout\n",
        "stdout was {:?}",
        out.stdout_str()
    );
    ensure!(
        String::from_utf8_lossy(&out.stderr) == "to-stderr\n",
        "stderr was {:?}",
        out.stderr
    );
    ensure!(
        out.exit_code == 7,
        "exit code was {} ({:?})",
        out.exit_code,
        out.status_message
    );

    let ok = exec(&pods, "shell", None, &["true"], None).await?;
    ensure!(ok.exit_code == 0, "true exited {}", ok.exit_code);

    // kubectl judges too: its exit code is the command's, as with a kubelet (the node
    // once closed the stream without a status code and kubectl exited 1 every time).
    for (command, code, stdout) in [("echo hi", 0, "hi\n"), ("echo hi; exit 3", 3, "hi\n")] {
        let out = tokio::process::Command::new(&cluster.env.kubectl)
            .args([
                "exec", "-n", &ns.name, "shell", "-c", "main", "--", "sh", "-c", command,
            ])
            .env("KUBECONFIG", &cluster.env.kubeconfig)
            .output()
            .await
            .context("running kubectl (built by `cargo xtask test`)")?;
        ensure!(
            out.status.code() == Some(code) && String::from_utf8_lossy(&out.stdout) == stdout,
            "kubectl exec {command:?}: exit {:?}, stdout {:?}, stderr {:?}",
            out.status.code(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // 64 MiB through stdin and back, byte-identical.
    let mut data = vec![0u8; 64 << 20];
    let mut state = 0x9e3779b97f4a7c15u64;
    for chunk in data.chunks_mut(8) {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        chunk.copy_from_slice(&state.to_le_bytes()[..chunk.len()]);
    }
    let expected = Sha256::digest(&data);
    let echoed = exec(&pods, "shell", None, &["cat"], Some(data)).await?;
    ensure!(echoed.exit_code == 0, "cat exited {}", echoed.exit_code);
    ensure!(
        echoed.stdout.len() == 64 << 20,
        "got {} bytes back",
        echoed.stdout.len()
    );
    ensure!(
        Sha256::digest(&echoed.stdout) == expected,
        "the bytes came back changed"
    );

    // The API server proxied WebSocket straight to the node: it never tried SPDY.
    let spdy = cluster.env.state_dir.join("node/spdy-attempts.log");
    ensure!(
        !spdy.exists(),
        "the API server tried SPDY: {}",
        std::fs::read_to_string(&spdy).unwrap_or_default()
    );
    ns.cleanup().await
}

/// The node enforces two of a kubelet's securityContext rules: `allowPrivilegeEscalation:
/// false` sets `no_new_privs` on the container and on every exec into it (so a setuid
/// binary gains nothing), and `runAsNonRoot` refuses a container that would run as uid 0
/// with the kubelet's `CreateContainerConfigError`.
#[tokio::test]
async fn no_new_privs_and_run_as_non_root_are_enforced_as_a_kubelet_does() -> Result<()> {
    let cluster = Cluster::connect().await?;
    let ns = cluster.namespace("secctx").await?;
    let pods: Api<Pod> = cluster.api(&ns.name);
    let pod: Pod = from_yaml(
        r#"
metadata: { name: guarded }
spec:
  terminationGracePeriodSeconds: 1
  securityContext: { runAsUser: 1000, runAsGroup: 1000 }
  containers:
  - name: fenced
    image: stateward-probe
    command: [sh, -c, "grep NoNewPrivs /proc/self/status; exec sleep 100000"]
    securityContext: { allowPrivilegeEscalation: false, runAsNonRoot: true }
  - name: open
    image: stateward-probe
    command: [sh, -c, "grep NoNewPrivs /proc/self/status; exec sleep 100000"]
"#,
    )?;
    pods.create(&PostParams::default(), &pod).await?;
    wait_pod_ready(&pods, "guarded", MINUTE).await?;
    for (container, flag) in [("fenced", "1"), ("open", "0")] {
        let started = pods
            .logs(
                "guarded",
                &kube::api::LogParams {
                    container: Some(container.into()),
                    ..Default::default()
                },
            )
            .await?;
        let exec = exec(
            &pods,
            "guarded",
            Some(container),
            &["grep", "NoNewPrivs", "/proc/self/status"],
            None,
        )
        .await?
        .stdout_str();
        for (what, status) in [("its process", started), ("an exec", exec)] {
            let seen = status.split_whitespace().last().map(String::from);
            ensure!(
                seen.as_deref() == Some(flag),
                "container {container}, {what}: {status:?} (wanted NoNewPrivs {flag})"
            );
        }
    }
    let rooted: Pod = from_yaml(
        r#"
metadata: { name: rooted }
spec:
  terminationGracePeriodSeconds: 1
  securityContext: { runAsNonRoot: true }
  containers:
  - { name: main, image: stateward-probe, args: [sleep] }
"#,
    )?;
    pods.create(&PostParams::default(), &rooted).await?;
    let waiting = wait_for("the node to refuse a root container", MINUTE, || async {
        let pod = pods.get("rooted").await?;
        Ok(pod
            .status
            .and_then(|s| s.container_statuses)
            .and_then(|c| c.into_iter().next())
            .and_then(|c| c.state)
            .and_then(|s| s.waiting)
            .filter(|w| w.reason.as_deref() == Some("CreateContainerConfigError")))
    })
    .await?;
    ensure!(
        waiting
            .message
            .as_deref()
            .is_some_and(|m| m.contains("runAsNonRoot and image will run as root")),
        "{waiting:?}"
    );
    ns.cleanup().await
}

/// Capabilities and users as a container runtime applies them: a root container gets the
/// runtime's default set minus `drop` plus `add`, a non-root one none; an image's `USER`
/// (the project's image: 65532) applies when no `runAsUser` is set, and satisfies
/// `runAsNonRoot`. Checked in the processes themselves (`/proc/self/status`, from their
/// logs) and in the node's record of every process it started.
#[tokio::test]
async fn capabilities_and_image_users_are_applied_as_a_runtime_does() -> Result<()> {
    let cluster = Cluster::connect().await?;
    let ns = cluster.namespace("caps").await?;
    let pods: Api<Pod> = cluster.api(&ns.name);
    let show = r#"[sh, -c, "id -u; grep CapEff /proc/self/status; exec sleep 100000"]"#;
    let pod: Pod = from_yaml(&format!(
        r#"
metadata: {{ name: caps }}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - {{ name: default, image: stateward-probe, command: {show} }}
  - name: narrowed
    image: stateward-probe
    command: {show}
    securityContext: {{ capabilities: {{ drop: [ALL], add: [CHOWN, FOWNER] }} }}
  - name: nonroot
    image: stateward-probe
    command: {show}
    securityContext: {{ runAsUser: 1000, capabilities: {{ add: [CHOWN] }} }}
  - name: imageuser
    image: stateward:dev
    command: {show}
    securityContext: {{ runAsNonRoot: true, allowPrivilegeEscalation: false, capabilities: {{ drop: [ALL] }} }}
"#
    ))?;
    pods.create(&PostParams::default(), &pod).await?;
    wait_pod_ready(&pods, "caps", MINUTE).await?;
    // The runtime default: CHOWN DAC_OVERRIDE FOWNER FSETID KILL SETGID SETUID SETPCAP
    // NET_BIND_SERVICE NET_RAW SYS_CHROOT MKNOD AUDIT_WRITE SETFCAP.
    let default_mask: u64 = [0u64, 1, 3, 4, 5, 6, 7, 8, 10, 13, 18, 27, 29, 31]
        .iter()
        .map(|c| 1 << c)
        .sum();
    for (container, uid, mask) in [
        ("default", "0", default_mask),
        ("narrowed", "0", (1 << 0) | (1 << 3)),
        ("nonroot", "1000", 0),
        ("imageuser", "65532", 0),
    ] {
        let log = pods
            .logs(
                "caps",
                &kube::api::LogParams {
                    container: Some(container.into()),
                    ..Default::default()
                },
            )
            .await?;
        let mut lines = log.lines();
        let seen_uid = lines.next().unwrap_or_default().trim().to_string();
        let seen_mask = lines
            .next()
            .and_then(|l| l.split_whitespace().last())
            .and_then(|hex| u64::from_str_radix(hex, 16).ok());
        ensure!(
            seen_uid == uid && seen_mask == Some(mask),
            "container {container}: {log:?} (wanted uid {uid}, CapEff {mask:016x})"
        );
    }
    let records =
        stateward_testkit::node::privileges::records(&cluster.env.state_dir.join("node"), &ns.name);
    let imageuser = records
        .iter()
        .find(|r| r.container == "imageuser" && !r.exec)
        .with_context(|| format!("no record of the imageuser container in {records:?}"))?;
    ensure!(
        imageuser.uid == 65532
            && imageuser.gid == 65532
            && imageuser.no_new_privs
            && imageuser.capabilities.is_empty(),
        "{imageuser:?}"
    );
    let narrowed = records
        .iter()
        .find(|r| r.container == "narrowed" && !r.exec)
        .with_context(|| format!("no record of the narrowed container in {records:?}"))?;
    ensure!(narrowed.capabilities == ["CHOWN", "FOWNER"], "{narrowed:?}");
    // An exec into a container holds what the container holds.
    let exec = exec(
        &pods,
        "caps",
        Some("narrowed"),
        &["grep", "CapEff", "/proc/self/status"],
        None,
    )
    .await?
    .stdout_str();
    ensure!(
        exec.split_whitespace().last() == Some("0000000000000009"),
        "an exec into the narrowed container: {exec:?}"
    );
    ns.cleanup().await
}

/// `resources.limits.memory` holds, through the memory cgroup: a container that keeps
/// 150 MiB under a 32Mi limit is OOM-killed (`OOMKilled`, exit code 137); one within its
/// limit completes.
#[tokio::test]
async fn memory_limits_are_enforced_and_end_a_container_as_oom_killed() -> Result<()> {
    let cluster = Cluster::connect().await?;
    let ns = cluster.namespace("oom").await?;
    let pods: Api<Pod> = cluster.api(&ns.name);
    for (name, bytes) in [("hog", "150M"), ("frugal", "8M")] {
        let pod: Pod = from_yaml(&format!(
            r#"
metadata: {{ name: {name} }}
spec:
  restartPolicy: Never
  containers:
  - name: main
    image: stateward-probe
    command: [sh, -c, "head -c 200M /dev/zero | tail -c {bytes} > /dev/null"]
    resources: {{ limits: {{ memory: 32Mi }} }}
"#
        ))?;
        pods.create(&PostParams::default(), &pod).await?;
    }
    for (name, reason, code) in [("hog", "OOMKilled", 137), ("frugal", "Completed", 0)] {
        let terminated = wait_for(&format!("pod {name} to end"), MINUTE, || async {
            Ok(first_container_terminated(&pods.get(name).await?))
        })
        .await?;
        ensure!(
            terminated.reason.as_deref() == Some(reason) && terminated.exit_code == code,
            "{name}: {terminated:?} (wanted {reason}, exit code {code})"
        );
    }
    ns.cleanup().await
}

#[tokio::test]
async fn pods_get_their_own_network_namespace_and_reach_each_other_by_pod_ip() -> Result<()> {
    let cluster = Cluster::connect().await?;
    let ns = cluster.namespace("pod-network").await?;
    let pods: Api<Pod> = cluster.api(&ns.name);
    for name in ["server-a", "server-b"] {
        let pod: Pod = from_yaml(&format!(
            r#"
metadata: {{ name: {name} }}
spec:
  terminationGracePeriodSeconds: 2
  containers:
  - name: web
    image: stateward-probe
    args: [serve, --port, "8080", --text, "hello from {name}"]
    readinessProbe: {{ httpGet: {{ path: /healthz, port: 8080 }}, periodSeconds: 1 }}
"#
        ))?;
        pods.create(&PostParams::default(), &pod).await?;
    }
    // Both listen on 8080: only possible with a network namespace each.
    let a = wait_pod_ready(&pods, "server-a", MINUTE).await?;
    wait_pod_ready(&pods, "server-b", MINUTE).await?;
    let ip_a = a
        .status
        .and_then(|s| s.pod_ip)
        .context("server-a has no pod IP")?;
    let fetched = exec(
        &pods,
        "server-b",
        None,
        &["stateward-probe", "fetch", &format!("http://{ip_a}:8080/")],
        None,
    )
    .await?;
    ensure!(
        fetched.stdout_str() == "hello from server-a",
        "server-b got {:?} ({})",
        fetched.stdout_str(),
        String::from_utf8_lossy(&fetched.stderr)
    );
    let hostname = exec(&pods, "server-b", None, &["hostname"], None).await?;
    ensure!(
        hostname.stdout_str().trim() == "server-b",
        "hostname in the pod is {:?}",
        hostname.stdout_str()
    );
    ns.cleanup().await
}

fn job_yaml(name: &str, command: &str, extra_volumes: &str, extra_mounts: &str) -> String {
    format!(
        r#"
apiVersion: batch/v1
kind: Job
metadata: {{ name: {name} }}
spec:
  backoffLimit: 0
  template:
    spec:
      restartPolicy: Never
      containers:
      - name: main
        image: stateward-probe
        command: [sh, -c, {command:?}]
        env:
        - name: SECRET_TOKEN
          valueFrom: {{ secretKeyRef: {{ name: job-secret, key: token }} }}
        volumeMounts: [{extra_mounts}]
      volumes: [{extra_volumes}]
"#
    )
}

fn job_pod(pods: &[Pod], job: &str) -> Option<Pod> {
    pods.iter()
        .find(|p| p.labels().get("job-name").map(String::as_str) == Some(job))
        .cloned()
}

#[tokio::test]
async fn jobs_report_termination_messages_exit_codes_and_read_only_mounts() -> Result<()> {
    let cluster = Cluster::connect().await?;
    let ns = cluster.namespace("jobs").await?;
    let pods: Api<Pod> = cluster.api(&ns.name);
    let jobs: Api<Job> = cluster.api(&ns.name);
    let secrets: Api<Secret> = cluster.api(&ns.name);
    secrets
        .create(
            &PostParams::default(),
            &from_yaml("metadata: { name: job-secret }\nstringData: { token: s3cr3t-value }")?,
        )
        .await?;
    let pvcs: Api<PersistentVolumeClaim> = cluster.api(&ns.name);
    create_claim(&pvcs, "shared", "64Mi").await?;

    // A writer fills the volume, then a Job reads it through a read-only mount.
    let writer: Pod = from_yaml(
        r#"
metadata: { name: writer }
spec:
  restartPolicy: Never
  containers:
  - { name: main, image: stateward-probe, args: [write, /data/seed.txt, seeded], volumeMounts: [{ name: data, mountPath: /data }] }
  volumes: [{ name: data, persistentVolumeClaim: { claimName: shared } }]
"#,
    )?;
    pods.create(&PostParams::default(), &writer).await?;
    wait_pod_phase(
        &pods,
        "writer",
        "Succeeded",
        std::time::Duration::from_secs(120),
    )
    .await?;

    let reader = job_yaml(
        "reader",
        "if stateward-probe write /data/evil.txt x 2>/dev/null; then exit 9; fi; \
         echo \"seed=$(cat /data/seed.txt) secret=$SECRET_TOKEN\" > /dev/termination-log",
        "{ name: data, persistentVolumeClaim: { claimName: shared } }",
        "{ name: data, mountPath: /data, readOnly: true }",
    );
    jobs.create(&PostParams::default(), &from_yaml(&reader)?)
        .await?;
    let failing = job_yaml(
        "failing",
        "stateward-probe exit 3 --message 'it broke on purpose'",
        "",
        "",
    );
    jobs.create(&PostParams::default(), &from_yaml(&failing)?)
        .await?;

    let job_condition = |name: &'static str, wanted: &'static str| {
        let jobs = jobs.clone();
        async move {
            wait_for(
                &format!("Job {name} condition {wanted}"),
                2 * MINUTE,
                || async {
                    let job = jobs.get(name).await?;
                    let conditions = job.status.and_then(|s| s.conditions).unwrap_or_default();
                    Ok(conditions
                        .iter()
                        .any(|c| c.type_ == wanted && c.status == "True")
                        .then_some(()))
                },
            )
            .await
        }
    };
    job_condition("reader", "Complete").await?;
    job_condition("failing", "Failed").await?;

    let all = pods.list(&Default::default()).await?.items;
    let reader_pod = job_pod(&all, "reader").context("no pod of Job reader")?;
    let terminated =
        first_container_terminated(&reader_pod).context("reader container not terminated")?;
    ensure!(
        terminated.message.as_deref() == Some("seed=seeded secret=s3cr3t-value\n"),
        "termination message was {:?}",
        terminated.message
    );
    let failing_pod = job_pod(&all, "failing").context("no pod of Job failing")?;
    let terminated =
        first_container_terminated(&failing_pod).context("failing container not terminated")?;
    ensure!(
        terminated.exit_code == 3,
        "exit code {}",
        terminated.exit_code
    );
    ensure!(
        terminated.message.as_deref() == Some("it broke on purpose"),
        "message {:?}",
        terminated.message
    );
    ns.cleanup().await
}

#[tokio::test]
async fn garbage_collection_namespace_deletion_and_pod_processes_end_with_their_pods() -> Result<()>
{
    let cluster = Cluster::connect().await?;
    let ns = cluster.namespace("lifecycle").await?;
    let maps: Api<ConfigMap> = cluster.api(&ns.name);
    let pods: Api<Pod> = cluster.api(&ns.name);

    // Owner-reference garbage collection by the controller manager.
    let owner = maps
        .create(
            &PostParams::default(),
            &from_yaml("metadata: { name: owner }")?,
        )
        .await?;
    let child: ConfigMap = from_yaml(&format!(
        "metadata:\n  name: child\n  ownerReferences:\n  - {{ apiVersion: v1, kind: ConfigMap, name: owner, uid: {} }}\n",
        owner.uid().unwrap_or_default()
    ))?;
    maps.create(&PostParams::default(), &child).await?;
    maps.delete("owner", &DeleteParams::background()).await?;
    wait_for(
        "the child ConfigMap to be garbage-collected",
        MINUTE,
        || async { Ok(maps.get_opt("child").await?.is_none().then_some(())) },
    )
    .await?;

    // A deleted pod's processes end and its object disappears.
    let pod: Pod = from_yaml(
        "metadata: { name: sleeper }\nspec:\n  terminationGracePeriodSeconds: 3\n  containers:\n  - { name: main, image: stateward-probe, args: [sleep] }\n",
    )?;
    pods.create(&PostParams::default(), &pod).await?;
    let running = wait_pod_ready(&pods, "sleeper", MINUTE).await?;
    let container_id = running
        .status
        .and_then(|s| s.container_statuses)
        .and_then(|c| c.first().and_then(|c| c.container_id.clone()))
        .context("no container id")?;
    let pid = container_id.trim_start_matches("stateward://").to_string();
    ensure!(
        std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "container process {pid} is not running"
    );
    pods.delete("sleeper", &DeleteParams::default()).await?;
    wait_for("the sleeper pod object to disappear", MINUTE, || async {
        Ok(pods.get_opt("sleeper").await?.is_none().then_some(()))
    })
    .await?;
    ensure!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "process {pid} outlived its pod"
    );

    // Namespace deletion finishes (the namespace controller deletes the running pod and
    // the local node completes the pod's deletion).
    let pod: Pod = from_yaml(
        "metadata: { name: leftover }\nspec:\n  terminationGracePeriodSeconds: 2\n  containers:\n  - { name: main, image: stateward-probe, args: [sleep] }\n",
    )?;
    pods.create(&PostParams::default(), &pod).await?;
    wait_pod_ready(&pods, "leftover", MINUTE).await?;
    let name = ns.name.clone();
    ns.cleanup().await?;
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(cluster.client.clone());
    wait_for(
        &format!("namespace {name} to be deleted"),
        2 * MINUTE,
        || async { Ok(namespaces.get_opt(&name).await?.is_none().then_some(())) },
    )
    .await
}

#[tokio::test]
async fn pvc_expansion_grows_the_filesystem_seen_inside_the_pod() -> Result<()> {
    let cluster = Cluster::connect().await?;
    let ns = cluster.namespace("expand").await?;
    let pods: Api<Pod> = cluster.api(&ns.name);
    let pvcs: Api<PersistentVolumeClaim> = cluster.api(&ns.name);
    create_claim(&pvcs, "grow", "128Mi").await?;
    let pod: Pod = from_yaml(
        r#"
metadata: { name: user }
spec:
  terminationGracePeriodSeconds: 2
  containers:
  - { name: main, image: stateward-probe, args: [sleep], volumeMounts: [{ name: data, mountPath: /data }] }
  volumes: [{ name: data, persistentVolumeClaim: { claimName: grow } }]
"#,
    )?;
    pods.create(&PostParams::default(), &pod).await?;
    wait_pod_ready(&pods, "user", 2 * MINUTE).await?;
    let df = |pods: Api<Pod>| async move {
        let out = exec(
            &pods,
            "user",
            None,
            &["stateward-probe", "df", "/data"],
            None,
        )
        .await?;
        Ok::<f64, anyhow::Error>(out.stdout_str().trim().parse()?)
    };
    let before = df(pods.clone()).await?;
    ensure!(
        before < 140.0 * 1024.0 * 1024.0,
        "a 128Mi volume shows {before} bytes"
    );
    pvcs.patch(
        "grow",
        &PatchParams::default(),
        &Patch::Merge(
            serde_json::json!({ "spec": { "resources": { "requests": { "storage": "384Mi" } } } }),
        ),
    )
    .await?;
    if !stateward_testkit::node::storage::can_resize_online() {
        // This machine denies online ext4 growth (no CAP_SYS_RESOURCE): the node expands
        // offline, like a CSI driver without online expansion, once the pod is gone.
        wait_for("the FileSystemResizePending condition", MINUTE, || async {
            let pvc = pvcs.get("grow").await?;
            let conditions = pvc.status.and_then(|s| s.conditions).unwrap_or_default();
            Ok(conditions
                .iter()
                .any(|c| c.type_ == "FileSystemResizePending" && c.status == "True")
                .then_some(()))
        })
        .await?;
        pods.delete("user", &DeleteParams::default()).await?;
        wait_for("pod user to be gone", MINUTE, || async {
            Ok(pods.get_opt("user").await?.is_none().then_some(()))
        })
        .await?;
        pods.create(&PostParams::default(), &pod).await?;
        wait_pod_ready(&pods, "user", 2 * MINUTE).await?;
    }
    let after = wait_for("the filesystem inside the pod to grow", 2 * MINUTE, || {
        let pods = pods.clone();
        async move {
            let now = df(pods).await?;
            Ok((now > 350.0 * 1024.0 * 1024.0).then_some(now))
        }
    })
    .await?;
    let capacity = wait_for("the claim's status capacity to follow", MINUTE, || async {
        let pvc = pvcs.get("grow").await?;
        let cap = pvc
            .status
            .and_then(|s| s.capacity)
            .and_then(|c| c.get("storage").map(|q| q.0.clone()));
        Ok(cap.filter(|c| c == "384Mi"))
    })
    .await?;
    ensure!(
        capacity == "384Mi" && after > before,
        "capacity {capacity}, df {before} -> {after}"
    );
    ns.cleanup().await
}

fn app_statefulset(name: &str, image: &str, mount: &str, env: &str, readiness: &str) -> String {
    format!(
        r#"
apiVersion: apps/v1
kind: StatefulSet
metadata: {{ name: {name} }}
spec:
  replicas: 1
  serviceName: {name}
  selector: {{ matchLabels: {{ app: {name} }} }}
  template:
    metadata: {{ labels: {{ app: {name} }} }}
    spec:
      terminationGracePeriodSeconds: 20
      containers:
      - name: {name}
        image: {image}
        env: {env}
        readinessProbe: {{ exec: {{ command: {readiness} }}, periodSeconds: 1, failureThreshold: 60 }}
        volumeMounts: [{{ name: data, mountPath: {mount} }}]
  volumeClaimTemplates:
  - metadata: {{ name: data }}
    spec:
      accessModes: [ReadWriteOnce]
      resources: {{ requests: {{ storage: 256Mi }} }}
"#
    )
}

async fn restart_pod(pods: &Api<Pod>, name: &str) -> Result<()> {
    let old = pods.get(name).await?.uid().unwrap_or_default();
    pods.delete(name, &DeleteParams::default()).await?;
    wait_for(
        &format!("pod {name} to be replaced"),
        2 * MINUTE,
        || async {
            Ok(pods
                .get_opt(name)
                .await?
                .filter(|p| p.uid().unwrap_or_default() != old)
                .map(|_| ()))
        },
    )
    .await?;
    wait_pod_ready(pods, name, 3 * MINUTE).await?;
    Ok(())
}

#[tokio::test]
async fn redis_and_postgres_images_run_the_real_servers_and_keep_data_across_restarts() -> Result<()>
{
    let cluster = Cluster::connect().await?;
    let ns = cluster.namespace("apps").await?;
    let sts: Api<StatefulSet> = cluster.api(&ns.name);
    let pods: Api<Pod> = cluster.api(&ns.name);
    let secrets: Api<Secret> = cluster.api(&ns.name);
    secrets
        .create(
            &PostParams::default(),
            &from_yaml("metadata: { name: pg }\nstringData: { password: pg-test-password }")?,
        )
        .await?;
    sts.create(
        &PostParams::default(),
        &from_yaml(&app_statefulset(
            "redis",
            "redis:7.2",
            "/data",
            "[]",
            "[redis-cli, ping]",
        ))?,
    )
    .await?;
    sts.create(
        &PostParams::default(),
        &from_yaml(&app_statefulset(
            "postgres",
            "docker.io/library/postgres:16",
            "/var/lib/postgresql/data",
            "[{ name: PGDATA, value: /var/lib/postgresql/data/pgdata }, \
              { name: POSTGRES_PASSWORD, valueFrom: { secretKeyRef: { name: pg, key: password } } }]",
            "[pg_isready, -U, postgres]",
        ))?,
    )
    .await?;
    wait_pod_ready(&pods, "redis-0", 3 * MINUTE).await?;
    wait_pod_ready(&pods, "postgres-0", 3 * MINUTE).await?;

    let set = exec(
        &pods,
        "redis-0",
        None,
        &["redis-cli", "SET", "greeting", "kept-by-redis"],
        None,
    )
    .await?;
    ensure!(
        set.stdout_str().trim() == "OK",
        "redis SET said {:?}",
        set.stdout_str()
    );
    let sql =
        "CREATE TABLE kept (id int, note text); INSERT INTO kept VALUES (42, 'kept-by-postgres');";
    let created = exec(
        &pods,
        "postgres-0",
        None,
        &["psql", "-U", "postgres", "-v", "ON_ERROR_STOP=1", "-c", sql],
        None,
    )
    .await?;
    ensure!(
        created.exit_code == 0,
        "psql failed: {}",
        String::from_utf8_lossy(&created.stderr)
    );

    // Both servers shut down gracefully on SIGTERM (redis saves its RDB) and come back
    // on the same volume.
    restart_pod(&pods, "redis-0").await?;
    restart_pod(&pods, "postgres-0").await?;
    let got = wait_for("redis to answer GET", MINUTE, || async {
        let out = exec(
            &pods,
            "redis-0",
            None,
            &["redis-cli", "GET", "greeting"],
            None,
        )
        .await?;
        Ok((out.exit_code == 0).then(|| out.stdout_str()))
    })
    .await?;
    ensure!(
        got.trim() == "kept-by-redis",
        "redis GET after restart: {got:?}"
    );
    let row = exec(
        &pods,
        "postgres-0",
        None,
        &[
            "psql",
            "-U",
            "postgres",
            "-tAc",
            "SELECT id, note FROM kept",
        ],
        None,
    )
    .await?;
    ensure!(
        row.stdout_str().trim() == "42|kept-by-postgres",
        "postgres row after restart: {:?} {}",
        row.stdout_str(),
        String::from_utf8_lossy(&row.stderr)
    );
    ns.cleanup().await
}

#[tokio::test]
async fn rbac_is_enforced_for_service_account_tokens_and_projected_pod_tokens() -> Result<()> {
    use k8s_openapi::api::authentication::v1::TokenRequest;
    use k8s_openapi::api::core::v1::ServiceAccount;
    use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
    let cluster = Cluster::connect().await?;
    let ns = cluster.namespace("rbac").await?;
    let sas: Api<ServiceAccount> = cluster.api(&ns.name);
    sas.create(
        &PostParams::default(),
        &from_yaml("metadata: { name: reader }")?,
    )
    .await?;

    // A token of a ServiceAccount with no permissions is refused by the API server.
    let token = sas
        .create_token_request(
            "reader",
            &PostParams::default(),
            &from_yaml::<TokenRequest>("spec: { audiences: [] }")?,
        )
        .await?
        .status
        .and_then(|s| s.token)
        .context("no token")?;
    let mut config = kube::Config::new(cluster.env.api_server.parse()?);
    config.root_cert = Some(vec![rustls_pemfile_der(&cluster.env.ca_cert)?]);
    config.auth_info.token = Some(token.into());
    let as_reader = kube::Client::try_from(config)?;
    let maps_as_reader: Api<ConfigMap> = Api::namespaced(as_reader, &ns.name);
    match maps_as_reader.list(&Default::default()).await {
        Err(kube::Error::Api(status)) if status.code == 403 => {}
        other => anyhow::bail!("expected 403 for a token without permissions, got {other:?}"),
    }

    // A pod running as that ServiceAccount reads its projected token and gets exactly
    // what its Role grants.
    let pods: Api<Pod> = cluster.api(&ns.name);
    let pod: Pod = from_yaml(
        r#"
metadata: { name: client }
spec:
  serviceAccountName: reader
  terminationGracePeriodSeconds: 2
  containers:
  - { name: main, image: stateward-probe, args: [sleep] }
"#,
    )?;
    pods.create(&PostParams::default(), &pod).await?;
    wait_pod_ready(&pods, "client", MINUTE).await?;
    let get = |path: String| {
        let pods = pods.clone();
        async move {
            let out = exec(
                &pods,
                "client",
                None,
                &["stateward-probe", "kube", &path],
                None,
            )
            .await?;
            ensure!(
                out.exit_code == 0,
                "probe kube failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            Ok::<String, anyhow::Error>(
                out.stdout_str()
                    .lines()
                    .next()
                    .unwrap_or_default()
                    .to_string(),
            )
        }
    };
    let configmaps = format!("/api/v1/namespaces/{}/configmaps", ns.name);
    let secrets = format!("/api/v1/namespaces/{}/secrets", ns.name);
    ensure!(
        get(configmaps.clone()).await? == "HTTP 403",
        "configmaps allowed before the Role"
    );
    let roles: Api<Role> = cluster.api(&ns.name);
    let bindings: Api<RoleBinding> = cluster.api(&ns.name);
    roles
        .create(
            &PostParams::default(),
            &from_yaml("metadata: { name: cm-reader }\nrules:\n- { apiGroups: [\"\"], resources: [configmaps], verbs: [list, get] }")?,
        )
        .await?;
    bindings
        .create(
            &PostParams::default(),
            &from_yaml(&format!(
                "metadata: {{ name: cm-reader }}\nroleRef: {{ apiGroup: rbac.authorization.k8s.io, kind: Role, name: cm-reader }}\n\
                 subjects:\n- {{ kind: ServiceAccount, name: reader, namespace: {} }}\n",
                ns.name
            ))?,
        )
        .await?;
    wait_for(
        "the Role to take effect for the pod's token",
        MINUTE,
        || async { Ok((get(configmaps.clone()).await? == "HTTP 200").then_some(())) },
    )
    .await?;
    ensure!(
        get(secrets).await? == "HTTP 403",
        "the Role grants configmaps only, yet secrets were readable"
    );
    let token_file = exec(
        &pods,
        "client",
        None,
        &[
            "stateward-probe",
            "read",
            "/var/run/secrets/kubernetes.io/serviceaccount/namespace",
        ],
        None,
    )
    .await?;
    ensure!(
        token_file.stdout_str() == ns.name,
        "projected namespace file says {:?}",
        token_file.stdout_str()
    );
    ns.cleanup().await
}

fn rustls_pemfile_der(path: &std::path::Path) -> Result<Vec<u8>> {
    let pem = std::fs::read_to_string(path)?;
    let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    use base64::Engine;
    Ok(base64::engine::general_purpose::STANDARD.decode(body)?)
}

#[tokio::test]
async fn s3_server_handles_multipart_ranged_reads_deletes_and_rejects_bad_credentials() -> Result<()>
{
    use aws_sdk_s3::primitives::ByteStream;
    use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
    let cluster = Cluster::connect().await?;
    let env = &cluster.env;
    let client = cluster.s3_client();
    let bucket = format!("test-{:08x}", rand::random::<u32>());
    client.create_bucket().bucket(&bucket).send().await?;

    // 100 MiB in 20 parts of 5 MiB.
    let part_size = 5 << 20;
    let mut data = vec![0u8; 100 << 20];
    for (i, b) in data.iter_mut().enumerate() {
        *b = (i.wrapping_mul(2654435761) >> 13) as u8;
    }
    let upload = client
        .create_multipart_upload()
        .bucket(&bucket)
        .key("big.bin")
        .send()
        .await?;
    let upload_id = upload.upload_id().context("no upload id")?.to_string();
    let mut parts = Vec::new();
    for (i, chunk) in data.chunks(part_size).enumerate() {
        let number = i as i32 + 1;
        let part = client
            .upload_part()
            .bucket(&bucket)
            .key("big.bin")
            .upload_id(&upload_id)
            .part_number(number)
            .body(ByteStream::from(chunk.to_vec()))
            .send()
            .await?;
        parts.push(
            CompletedPart::builder()
                .part_number(number)
                .set_e_tag(part.e_tag().map(String::from))
                .build(),
        );
    }
    client
        .complete_multipart_upload()
        .bucket(&bucket)
        .key("big.bin")
        .upload_id(&upload_id)
        .multipart_upload(
            CompletedMultipartUpload::builder()
                .set_parts(Some(parts))
                .build(),
        )
        .send()
        .await?;
    let head = client
        .head_object()
        .bucket(&bucket)
        .key("big.bin")
        .send()
        .await?;
    ensure!(
        head.content_length() == Some(100 << 20),
        "size {:?}",
        head.content_length()
    );

    let (start, end) = (33_554_000usize, 33_554_000usize + 1_000_000);
    let ranged = client
        .get_object()
        .bucket(&bucket)
        .key("big.bin")
        .range(format!("bytes={start}-{}", end - 1))
        .send()
        .await?
        .body
        .collect()
        .await?
        .into_bytes();
    ensure!(
        ranged.as_ref() == &data[start..end],
        "the ranged GET returned other bytes"
    );

    // Wrong credentials are refused.
    let wrong = cluster.s3_client_as(&env.s3_access_key, "not-the-secret");
    let refused = wrong.list_objects_v2().bucket(&bucket).send().await;
    ensure!(refused.is_err(), "a wrong secret key was accepted");
    let text = format!("{:?}", refused.err());
    ensure!(
        text.contains("SignatureDoesNotMatch") || text.contains("AccessDenied"),
        "unexpected refusal: {text}"
    );

    client
        .delete_object()
        .bucket(&bucket)
        .key("big.bin")
        .send()
        .await?;
    let listed = client.list_objects_v2().bucket(&bucket).send().await?;
    ensure!(
        listed.key_count().unwrap_or(0) == 0,
        "the object survived its deletion"
    );
    client.delete_bucket().bucket(&bucket).send().await?;
    Ok(())
}
