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
use stateward_testkit::harness::{Cluster, exec, from_yaml, wait_for, wait_pod_ready};

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
    let node0 = pod0.spec.as_ref().and_then(|s| s.node_name.clone()).context("pod 0 unscheduled")?;
    let node1 = pod1.spec.as_ref().and_then(|s| s.node_name.clone()).context("pod 1 unscheduled")?;
    ensure!(node0 != node1, "anti-affinity should spread the pods, both are on {node0}");
    for (pod, node) in [("web-0", &node0), ("web-1", &node1)] {
        let pvc = pvcs.get(&format!("data-{pod}")).await?;
        let status = pvc.status.clone().unwrap_or_default();
        ensure!(status.phase.as_deref() == Some("Bound"), "PVC of {pod} is {:?}", status.phase);
        let pv = pvs.get(pvc.spec.as_ref().and_then(|s| s.volume_name.as_deref()).unwrap_or_default()).await?;
        let affinity = serde_json::to_string(&pv.spec.as_ref().and_then(|s| s.node_affinity.clone()))?;
        ensure!(affinity.contains(node.as_str()), "PV of {pod} is not pinned to {node}: {affinity}");
    }

    // df inside the pod shows the claimed capacity within 10 %.
    let df = exec(&pods, "web-0", None, &["stateward-probe", "df", "/data"], None).await?;
    ensure!(df.exit_code == 0, "df failed: {}", String::from_utf8_lossy(&df.stderr));
    let bytes: f64 = df.stdout_str().trim().parse()?;
    let claimed = 256.0 * 1024.0 * 1024.0;
    ensure!((bytes - claimed).abs() / claimed < 0.10, "df shows {bytes} bytes for a 256Mi claim");

    // A file written by replica 0 survives deleting pod 0.
    let write = exec(&pods, "web-0", None, &["stateward-probe", "write", "/data/hello.txt", "kept across restarts"], None).await?;
    ensure!(write.exit_code == 0, "write failed: {}", String::from_utf8_lossy(&write.stderr));
    let old_uid = pod_uid(&pod0);
    pods.delete("web-0", &DeleteParams::default()).await?;
    wait_for("pod web-0 to be replaced", 2 * MINUTE, || async {
        Ok(pods.get_opt("web-0").await?.filter(|p| pod_uid(p) != old_uid).map(|_| ()))
    })
    .await?;
    wait_pod_ready(&pods, "web-0", 2 * MINUTE).await?;
    let read = exec(&pods, "web-0", None, &["stateward-probe", "read", "/data/hello.txt"], None).await?;
    ensure!(read.stdout_str() == "kept across restarts", "read back {:?}", read.stdout_str());
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

    let out = exec(&pods, "shell", Some("main"), &["sh", "-c", "echo to-stdout; echo to-stderr >&2; exit 7"], None).await?;
    ensure!(out.stdout_str() == "to-stdout\n", "stdout was {:?}", out.stdout_str());
    ensure!(String::from_utf8_lossy(&out.stderr) == "to-stderr\n", "stderr was {:?}", out.stderr);
    ensure!(out.exit_code == 7, "exit code was {} ({:?})", out.exit_code, out.status_message);

    let ok = exec(&pods, "shell", None, &["true"], None).await?;
    ensure!(ok.exit_code == 0, "true exited {}", ok.exit_code);

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
    ensure!(echoed.stdout.len() == 64 << 20, "got {} bytes back", echoed.stdout.len());
    ensure!(Sha256::digest(&echoed.stdout) == expected, "the bytes came back changed");

    // The API server proxied WebSocket straight to the node: it never tried SPDY.
    let spdy = cluster.env.state_dir.join("node/spdy-attempts.log");
    ensure!(!spdy.exists(), "the API server tried SPDY: {}", std::fs::read_to_string(&spdy).unwrap_or_default());
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
    let ip_a = a.status.and_then(|s| s.pod_ip).context("server-a has no pod IP")?;
    let fetched = exec(&pods, "server-b", None, &["stateward-probe", "fetch", &format!("http://{ip_a}:8080/")], None).await?;
    ensure!(fetched.stdout_str() == "hello from server-a", "server-b got {:?} ({})", fetched.stdout_str(), String::from_utf8_lossy(&fetched.stderr));
    let hostname = exec(&pods, "server-b", None, &["hostname"], None).await?;
    ensure!(hostname.stdout_str().trim() == "server-b", "hostname in the pod is {:?}", hostname.stdout_str());
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
        .create(&PostParams::default(), &from_yaml("metadata: { name: job-secret }\nstringData: { token: s3cr3t-value }")?)
        .await?;
    let pvcs: Api<PersistentVolumeClaim> = cluster.api(&ns.name);
    pvcs.create(
        &PostParams::default(),
        &from_yaml("metadata: { name: shared }\nspec: { accessModes: [ReadWriteOnce], resources: { requests: { storage: 64Mi } } }")?,
    )
    .await?;

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
    wait_for("the writer pod to succeed", 2 * MINUTE, || async {
        Ok(pods.get("writer").await?.status.and_then(|s| s.phase).filter(|p| p == "Succeeded").map(|_| ()))
    })
    .await?;

    let reader = job_yaml(
        "reader",
        "if stateward-probe write /data/evil.txt x 2>/dev/null; then exit 9; fi; \
         echo \"seed=$(cat /data/seed.txt) secret=$SECRET_TOKEN\" > /dev/termination-log",
        "{ name: data, persistentVolumeClaim: { claimName: shared } }",
        "{ name: data, mountPath: /data, readOnly: true }",
    );
    jobs.create(&PostParams::default(), &from_yaml(&reader)?).await?;
    let failing = job_yaml("failing", "stateward-probe exit 3 --message 'it broke on purpose'", "", "");
    jobs.create(&PostParams::default(), &from_yaml(&failing)?).await?;

    let job_condition = |name: &'static str, wanted: &'static str| {
        let jobs = jobs.clone();
        async move {
            wait_for(&format!("Job {name} condition {wanted}"), 2 * MINUTE, || async {
                let job = jobs.get(name).await?;
                let conditions = job.status.and_then(|s| s.conditions).unwrap_or_default();
                Ok(conditions.iter().any(|c| c.type_ == wanted && c.status == "True").then_some(()))
            })
            .await
        }
    };
    job_condition("reader", "Complete").await?;
    job_condition("failing", "Failed").await?;

    let all = pods.list(&Default::default()).await?.items;
    let reader_pod = job_pod(&all, "reader").context("no pod of Job reader")?;
    let terminated = reader_pod
        .status
        .and_then(|s| s.container_statuses)
        .and_then(|c| c.first().and_then(|c| c.state.clone()))
        .and_then(|s| s.terminated)
        .context("reader container not terminated")?;
    ensure!(
        terminated.message.as_deref() == Some("seed=seeded secret=s3cr3t-value\n"),
        "termination message was {:?}",
        terminated.message
    );
    let failing_pod = job_pod(&all, "failing").context("no pod of Job failing")?;
    let terminated = failing_pod
        .status
        .and_then(|s| s.container_statuses)
        .and_then(|c| c.first().and_then(|c| c.state.clone()))
        .and_then(|s| s.terminated)
        .context("failing container not terminated")?;
    ensure!(terminated.exit_code == 3, "exit code {}", terminated.exit_code);
    ensure!(terminated.message.as_deref() == Some("it broke on purpose"), "message {:?}", terminated.message);
    ns.cleanup().await
}

#[tokio::test]
async fn garbage_collection_namespace_deletion_and_pod_processes_end_with_their_pods() -> Result<()> {
    let cluster = Cluster::connect().await?;
    let ns = cluster.namespace("lifecycle").await?;
    let maps: Api<ConfigMap> = cluster.api(&ns.name);
    let pods: Api<Pod> = cluster.api(&ns.name);

    // Owner-reference garbage collection by the controller manager.
    let owner = maps.create(&PostParams::default(), &from_yaml("metadata: { name: owner }")?).await?;
    let child: ConfigMap = from_yaml(&format!(
        "metadata:\n  name: child\n  ownerReferences:\n  - {{ apiVersion: v1, kind: ConfigMap, name: owner, uid: {} }}\n",
        owner.uid().unwrap_or_default()
    ))?;
    maps.create(&PostParams::default(), &child).await?;
    maps.delete("owner", &DeleteParams::background()).await?;
    wait_for("the child ConfigMap to be garbage-collected", MINUTE, || async {
        Ok(maps.get_opt("child").await?.is_none().then_some(()))
    })
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
    ensure!(std::path::Path::new(&format!("/proc/{pid}")).exists(), "container process {pid} is not running");
    pods.delete("sleeper", &DeleteParams::default()).await?;
    wait_for("the sleeper pod object to disappear", MINUTE, || async {
        Ok(pods.get_opt("sleeper").await?.is_none().then_some(()))
    })
    .await?;
    ensure!(!std::path::Path::new(&format!("/proc/{pid}")).exists(), "process {pid} outlived its pod");

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
    wait_for(&format!("namespace {name} to be deleted"), 2 * MINUTE, || async {
        Ok(namespaces.get_opt(&name).await?.is_none().then_some(()))
    })
    .await
}

#[tokio::test]
async fn pvc_expansion_grows_the_filesystem_seen_inside_the_pod() -> Result<()> {
    let cluster = Cluster::connect().await?;
    let ns = cluster.namespace("expand").await?;
    let pods: Api<Pod> = cluster.api(&ns.name);
    let pvcs: Api<PersistentVolumeClaim> = cluster.api(&ns.name);
    pvcs.create(
        &PostParams::default(),
        &from_yaml("metadata: { name: grow }\nspec: { accessModes: [ReadWriteOnce], resources: { requests: { storage: 128Mi } } }")?,
    )
    .await?;
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
        let out = exec(&pods, "user", None, &["stateward-probe", "df", "/data"], None).await?;
        Ok::<f64, anyhow::Error>(out.stdout_str().trim().parse()?)
    };
    let before = df(pods.clone()).await?;
    ensure!(before < 140.0 * 1024.0 * 1024.0, "a 128Mi volume shows {before} bytes");
    pvcs.patch(
        "grow",
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({ "spec": { "resources": { "requests": { "storage": "384Mi" } } } })),
    )
    .await?;
    if !stateward_testkit::node::storage::can_resize_online() {
        // This machine denies online ext4 growth (no CAP_SYS_RESOURCE): the node expands
        // offline, like a CSI driver without online expansion, once the pod is gone.
        wait_for("the FileSystemResizePending condition", MINUTE, || async {
            let pvc = pvcs.get("grow").await?;
            let conditions = pvc.status.and_then(|s| s.conditions).unwrap_or_default();
            Ok(conditions.iter().any(|c| c.type_ == "FileSystemResizePending" && c.status == "True").then_some(()))
        })
        .await?;
        pods.delete("user", &DeleteParams::default()).await?;
        wait_for("pod user to be gone", MINUTE, || async { Ok(pods.get_opt("user").await?.is_none().then_some(())) }).await?;
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
        let cap = pvc.status.and_then(|s| s.capacity).and_then(|c| c.get("storage").map(|q| q.0.clone()));
        Ok(cap.filter(|c| c == "384Mi"))
    })
    .await?;
    ensure!(capacity == "384Mi" && after > before, "capacity {capacity}, df {before} -> {after}");
    ns.cleanup().await
}
