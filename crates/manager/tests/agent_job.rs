//! `stateward agent backup-volume` as the backup controller will run it: a Job with the
//! project's image, the app's claim mounted read-only, credentials from a Secret. The
//! stored archive restores by hand, with standard tools, into identical files.
//! Run with `cargo xtask test`.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod, Secret};
use kube::api::PostParams;
use kube::{Api, ResourceExt};
use sha2::{Digest, Sha256};
use stateward_testkit::harness::{
    Cluster, create_claim, first_container_terminated, from_yaml, wait_for, wait_pod_phase,
};

#[tokio::test]
async fn an_agent_job_backs_up_a_read_only_volume_that_restores_by_hand() -> Result<()> {
    let cluster = Cluster::connect().await?;
    let ns = cluster.namespace("agent-job").await?;
    let env = &cluster.env;
    let s3 = cluster.s3_client();
    let bucket = format!("agent-job-{:06x}", rand_suffix());
    s3.create_bucket().bucket(&bucket).send().await?;

    let secrets: Api<Secret> = cluster.api(&ns.name);
    secrets
        .create(
            &PostParams::default(),
            &from_yaml(&format!(
                "metadata: {{ name: s3 }}\nstringData: {{ accessKeyId: {}, secretAccessKey: {} }}",
                env.s3_access_key, env.s3_secret_key
            ))?,
        )
        .await?;
    let pvcs: Api<PersistentVolumeClaim> = cluster.api(&ns.name);
    create_claim(&pvcs, "data", "128Mi").await?;
    let pods: Api<Pod> = cluster.api(&ns.name);
    let writer: Pod = from_yaml(
        r#"
metadata: { name: app }
spec:
  restartPolicy: Never
  containers:
  - name: main
    image: stateward-probe
    command: [sh, -c, "mkdir -p /data/db && seq 1 200000 > /data/db/rows.txt && head -c 3000000 /dev/urandom > /data/blob.bin && echo hi > /data/hello"]
    volumeMounts: [{ name: data, mountPath: /data }]
  volumes: [{ name: data, persistentVolumeClaim: { claimName: data } }]
"#,
    )?;
    pods.create(&PostParams::default(), &writer).await?;
    wait_pod_phase(
        &pods,
        "app",
        "Succeeded",
        std::time::Duration::from_secs(120),
    )
    .await?;

    let key = format!("{}/app/backup-1/data.tar.zst", ns.name);
    let job: Job = from_yaml(&format!(
        r#"
metadata: {{ name: backup-data }}
spec:
  backoffLimit: 0
  template:
    spec:
      restartPolicy: Never
      containers:
      - name: agent
        image: ghcr.io/stateward/stateward:dev
        args: [agent, backup-volume, --source, /source, --bucket, {bucket}, --key, {key}, --result-key, {key}.result.json,
               --endpoint, "{endpoint}", --force-path-style, --part-size-mib, "5"]
        env:
        - {{ name: AWS_ACCESS_KEY_ID, valueFrom: {{ secretKeyRef: {{ name: s3, key: accessKeyId }} }} }}
        - {{ name: AWS_SECRET_ACCESS_KEY, valueFrom: {{ secretKeyRef: {{ name: s3, key: secretAccessKey }} }} }}
        volumeMounts: [{{ name: source, mountPath: /source, readOnly: true }}]
      volumes: [{{ name: source, persistentVolumeClaim: {{ claimName: data, readOnly: true }} }}]
"#,
        endpoint = env.s3_endpoint_from_pods
    ))?;
    let jobs: Api<Job> = cluster.api(&ns.name);
    jobs.create(&PostParams::default(), &job).await?;
    wait_for(
        "the agent Job to complete",
        Duration::from_secs(180),
        || async {
            let job = jobs.get("backup-data").await?;
            let conditions = job.status.and_then(|s| s.conditions).unwrap_or_default();
            if let Some(failed) = conditions
                .iter()
                .find(|c| c.type_ == "Failed" && c.status == "True")
            {
                anyhow::bail!("the agent Job failed: {:?}", failed.message);
            }
            Ok(conditions
                .iter()
                .any(|c| c.type_ == "Complete" && c.status == "True")
                .then_some(()))
        },
    )
    .await?;

    // The summary in the pod's termination message matches the stored object.
    let agent_pod = pods
        .list(&Default::default())
        .await?
        .items
        .into_iter()
        .find(|p| p.labels().get("job-name").map(String::as_str) == Some("backup-data"))
        .context("no agent pod")?;
    let message = first_container_terminated(&agent_pod)
        .and_then(|t| t.message)
        .context("no termination message")?;
    let summary: serde_json::Value = serde_json::from_str(&message)?;
    ensure!(summary["files"] == 3, "summary: {summary}");
    let stored = s3
        .get_object()
        .bucket(&bucket)
        .key(&key)
        .send()
        .await?
        .body
        .collect()
        .await?
        .into_bytes();
    ensure!(
        summary["sha256"] == hex::encode(Sha256::digest(&stored)),
        "sha256 in the summary does not match the object"
    );
    let full = s3
        .get_object()
        .bucket(&bucket)
        .key(format!("{key}.result.json"))
        .send()
        .await?
        .body
        .collect()
        .await?
        .into_bytes();
    let full: serde_json::Value = serde_json::from_slice(&full)?;
    ensure!(
        full["bytesStored"] == summary["bytesStored"],
        "the result object disagrees with the summary"
    );

    // Restore by hand: zstd -d | tar x, then compare with what the app wrote (read back
    // through a pod).
    let work = std::env::temp_dir().join(format!("agent-job-{}", ns.name));
    std::fs::create_dir_all(work.join("out"))?;
    std::fs::write(work.join("a.tar.zst"), &stored)?;
    let status = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "zstd -d -c {0}/a.tar.zst | tar -x -C {0}/out",
            work.display()
        ))
        .status()?;
    ensure!(status.success(), "zstd | tar failed");
    let rows = std::fs::read_to_string(work.join("out/db/rows.txt"))?;
    ensure!(
        rows.lines().count() == 200000 && rows.ends_with("200000\n"),
        "rows.txt came back wrong"
    );
    ensure!(
        std::fs::read(work.join("out/blob.bin"))?.len() == 3_000_000,
        "blob.bin came back with another size"
    );
    ensure!(std::fs::read_to_string(work.join("out/hello"))? == "hi\n");
    let _ = std::fs::remove_dir_all(&work);
    ns.cleanup().await
}

fn rand_suffix() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() & 0xffffff)
        .unwrap_or(0)
}
