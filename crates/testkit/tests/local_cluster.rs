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
