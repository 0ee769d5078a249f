//! BackupRepository checks against the real API server and S3 server: each problem a user
//! can make shows as the Ready condition's reason, with a Warning event, and a good
//! repository becomes Ready. Run with `cargo xtask test`.

use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::events::v1::Event;
use kube::Api;
use kube::api::PostParams;
use stateward_api::BackupRepository;
use stateward_runtime::Context;
use stateward_runtime::metrics::Metrics;
use stateward_testkit::harness::{Cluster, from_yaml, install_crds, wait_for};

fn repo(name: &str, bucket: &str, endpoint: &str, secret: &str, key_field: &str) -> String {
    format!(
        "apiVersion: stateward.io/v1alpha1\nkind: BackupRepository\nmetadata: {{ name: {name} }}\nspec:\n  s3:\n    \
         bucket: {bucket}\n    prefix: team-a\n    endpoint: \"{endpoint}\"\n    forcePathStyle: true\n    \
         credentials:\n      accessKeyId: {{ name: {secret}, key: {key_field} }}\n      \
         secretAccessKey: {{ name: {secret}, key: secretAccessKey }}\n"
    )
}

#[tokio::test]
async fn repository_checks_report_actionable_reasons_and_events() -> Result<()> {
    let cluster = Cluster::connect().await?;
    {
        let _serial = cluster.serial().await?;
        install_crds(&cluster.client, &stateward_api::crds()).await?;
    }
    let ns = cluster.namespace("repositories").await?;
    let env = &cluster.env;
    let s3 = cluster.s3_client();
    let bucket = format!("repo-{}", &ns.name[ns.name.len() - 6..]);
    s3.create_bucket().bucket(&bucket).send().await?;
    let secrets: Api<Secret> = cluster.api(&ns.name);
    for (name, secret_key) in [
        ("good", env.s3_secret_key.as_str()),
        ("wrong", "not-the-secret"),
    ] {
        secrets
            .create(
                &PostParams::default(),
                &from_yaml(&format!(
                    "metadata: {{ name: {name}, labels: {{ stateward.io/repository-secret: \"true\" }} }}\nstringData: {{ accessKeyId: {}, secretAccessKey: {secret_key} }}",
                    env.s3_access_key
                ))?,
            )
            .await?;
    }
    // The same valid credentials in a Secret that did not opt in, for a repository whose
    // endpoint is a listener that counts connections: nothing may reach it.
    secrets
        .create(
            &PostParams::default(),
            &from_yaml(&format!(
                "metadata: {{ name: plain }}\nstringData: {{ accessKeyId: {}, secretAccessKey: {} }}",
                env.s3_access_key, env.s3_secret_key
            ))?,
        )
        .await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let listening = format!("http://{}", listener.local_addr()?);
    let connections = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = connections.clone();
    let counter = tokio::spawn(async move {
        while listener.accept().await.is_ok() {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    });
    let endpoint = env.s3_endpoint.as_str();
    let cases = [
        (
            "not-opted-in",
            repo("not-opted-in", &bucket, &listening, "plain", "accessKeyId"),
            vec!["SecretNotAllowed"],
        ),
        (
            "ok",
            repo("ok", &bucket, endpoint, "good", "accessKeyId"),
            vec!["Reachable"],
        ),
        (
            "no-secret",
            repo("no-secret", &bucket, endpoint, "absent", "accessKeyId"),
            vec!["SecretNotFound"],
        ),
        (
            "no-key",
            repo("no-key", &bucket, endpoint, "good", "accessKeyID"),
            vec!["KeyMissing"],
        ),
        (
            "bad-creds",
            repo("bad-creds", &bucket, endpoint, "wrong", "accessKeyId"),
            vec!["InvalidCredentials", "AccessDenied"],
        ),
        (
            "no-bucket",
            repo(
                "no-bucket",
                "does-not-exist-here",
                endpoint,
                "good",
                "accessKeyId",
            ),
            vec!["NoSuchBucket"],
        ),
        (
            "unreachable",
            repo(
                "unreachable",
                &bucket,
                "http://127.0.0.1:9",
                "good",
                "accessKeyId",
            ),
            vec!["EndpointUnreachable"],
        ),
    ];
    let repos: Api<BackupRepository> = cluster.api(&ns.name);
    for (_, yaml, _) in &cases {
        repos
            .create(&PostParams::default(), &from_yaml(yaml)?)
            .await?;
    }

    // The controller, as the manager runs it, watching this namespace.
    let controller = tokio::spawn(stateward_backup::run(
        Context::new(
            cluster.client.clone(),
            stateward_backup::CONTROLLER,
            Metrics::new(),
        ),
        stateward_runtime::watch::Stores::start_in(cluster.client.clone(), Some(ns.name.clone())),
        stateward_backup::Config::default(),
    ));

    for (name, _, reasons) in &cases {
        let (status, reason, message) = wait_for(
            &format!("repository {name} to be checked"),
            Duration::from_secs(90),
            || async {
                let repo = repos.get(name).await?;
                let ready = repo
                    .status
                    .and_then(|s| s.conditions.into_iter().find(|c| c.type_ == "Ready"));
                Ok(ready.map(|c| (c.status, c.reason, c.message)))
            },
        )
        .await?;
        ensure!(
            reasons.contains(&reason.as_str()),
            "{name}: reason {reason} ({message}), expected one of {reasons:?}"
        );
        ensure!(
            (status == "True") == (*name == "ok"),
            "{name}: Ready={status}"
        );
        ensure!(
            !message.contains(&env.s3_secret_key) && !message.contains("not-the-secret"),
            "{name}: a secret leaked into the message"
        );
        if *name == "not-opted-in" {
            ensure!(
                message.contains("stateward.io/repository-secret=true"),
                "{name}: the message names the label to set: {message}"
            );
        }
    }
    ensure!(
        connections.load(std::sync::atomic::Ordering::SeqCst) == 0,
        "a repository whose Secret did not opt in reached its endpoint"
    );
    counter.abort();
    // Warning events for the broken ones.
    let events: Api<Event> = cluster.api(&ns.name);
    let warned = wait_for(
        "Warning events for the broken repositories",
        Duration::from_secs(30),
        || async {
            let list = events.list(&Default::default()).await?.items;
            let reasons: Vec<String> = list
                .iter()
                .filter(|e| e.type_.as_deref() == Some("Warning"))
                .filter_map(|e| e.reason.clone())
                .collect();
            Ok(["SecretNotFound", "KeyMissing", "NoSuchBucket"]
                .iter()
                .all(|r| reasons.iter().any(|x| x == r))
                .then_some(reasons))
        },
    )
    .await?;
    ensure!(
        !warned.iter().any(|r| r == "Reachable"),
        "a healthy repository produced a Warning"
    );

    // Fixing the problem is picked up without touching the repository: create the Secret.
    secrets
        .create(
            &PostParams::default(),
            &from_yaml(&format!("metadata: {{ name: absent, labels: {{ stateward.io/repository-secret: \"true\" }} }}\nstringData: {{ accessKeyId: {}, secretAccessKey: {} }}", env.s3_access_key, env.s3_secret_key))?,
        )
        .await?;
    wait_for(
        "repository no-secret to become Ready once its Secret exists",
        Duration::from_secs(90),
        || async {
            let repo = repos.get("no-secret").await?;
            let ready = repo
                .status
                .map(|s| {
                    s.conditions
                        .iter()
                        .any(|c| c.type_ == "Ready" && c.status == "True")
                })
                .unwrap_or(false);
            Ok(ready.then_some(()))
        },
    )
    .await
    .context("the fix was not noticed")?;
    // The probe object was removed again.
    let listed = s3.list_objects_v2().bucket(&bucket).send().await?;
    ensure!(
        listed.key_count().unwrap_or(0) == 0,
        "probe objects were left in the bucket"
    );
    controller.abort();
    ns.cleanup().await
}

fn fake_uid() -> String {
    let h = format!("{:032x}", rand_u128());
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

fn rand_u128() -> u128 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    t.wrapping_mul(0x9E37_79B9_7F4A_7C15_F39C_C060_5CED_C835)
}

#[tokio::test]
async fn prefixes_left_by_crashed_runs_are_swept_and_committed_backups_kept() -> Result<()> {
    let cluster = Cluster::connect().await?;
    {
        let _serial = cluster.serial().await?;
        install_crds(&cluster.client, &stateward_api::crds()).await?;
    }
    let ns = cluster.namespace("sweep").await?;
    let env = &cluster.env;
    let s3 = cluster.s3_client();
    let bucket = format!("sweep-{}", &ns.name[ns.name.len() - 6..]);
    s3.create_bucket().bucket(&bucket).send().await?;
    let secrets: Api<Secret> = cluster.api(&ns.name);
    secrets
        .create(
            &PostParams::default(),
            &from_yaml(&format!(
                "metadata: {{ name: good, labels: {{ stateward.io/repository-secret: \"true\" }} }}\nstringData: {{ accessKeyId: {}, secretAccessKey: {} }}",
                env.s3_access_key, env.s3_secret_key
            ))?,
        )
        .await?;
    // What runs left: a crashed run (data, no manifest), an open upload of another, a
    // committed backup, and another namespace's crashed run (not ours to touch).
    let base = format!("team-a/{}/app", ns.name);
    let dead = format!("{base}/dead-{}", fake_uid());
    let kept = format!("{base}/kept-{}", fake_uid());
    let other = format!("team-a/someone-else/app/dead-{}", fake_uid());
    for key in [
        format!("{dead}/volumes/data.tar.zst"),
        format!("{dead}/volumes/data.tar.zst.result.json"),
        format!("{kept}/volumes/data.tar.zst"),
        format!("{kept}/manifest.json"),
        format!("{other}/volumes/data.tar.zst"),
    ] {
        s3.put_object()
            .bucket(&bucket)
            .key(&key)
            .body(aws_sdk_s3::primitives::ByteStream::from_static(b"x"))
            .send()
            .await?;
    }
    let open = format!("{base}/open-{}/dumps/p.zst", fake_uid());
    s3.create_multipart_upload()
        .bucket(&bucket)
        .key(&open)
        .send()
        .await?;
    let repos: Api<BackupRepository> = cluster.api(&ns.name);
    repos
        .create(
            &PostParams::default(),
            &from_yaml(&repo(
                "sweeper",
                &bucket,
                &env.s3_endpoint,
                "good",
                "accessKeyId",
            ))?,
        )
        .await?;
    let metrics = Metrics::new();
    let controller = tokio::spawn(stateward_backup::run(
        Context::new(
            cluster.client.clone(),
            stateward_backup::CONTROLLER,
            metrics.clone(),
        ),
        stateward_runtime::watch::Stores::start_in(cluster.client.clone(), Some(ns.name.clone())),
        stateward_backup::Config {
            runs: stateward_backup::RunConfig {
                orphan_grace: Duration::ZERO,
                ..Default::default()
            },
            ..Default::default()
        },
    ));
    let keys = |prefix: String| {
        let s3 = s3.clone();
        let bucket = bucket.clone();
        async move {
            let listed = s3
                .list_objects_v2()
                .bucket(&bucket)
                .prefix(prefix)
                .send()
                .await?;
            Ok::<Vec<String>, anyhow::Error>(
                listed
                    .contents()
                    .iter()
                    .filter_map(|o| o.key().map(String::from))
                    .collect(),
            )
        }
    };
    wait_for(
        "the crashed run's prefix to be swept",
        Duration::from_secs(90),
        || async {
            let left = keys(dead.clone()).await?;
            let uploads = s3.list_multipart_uploads().bucket(&bucket).send().await?;
            Ok((left.is_empty() && uploads.uploads().is_empty()).then_some(()))
        },
    )
    .await?;
    ensure!(
        keys(kept.clone()).await?.len() == 2,
        "the committed backup was touched"
    );
    ensure!(
        keys(other.clone()).await?.len() == 1,
        "another namespace's data was touched"
    );
    let text = metrics.encode();
    ensure!(
        text.contains("stateward_backup_orphans_swept_total 2"),
        "{text}"
    );
    let events: Api<Event> = cluster.api(&ns.name);
    ensure!(
        events
            .list(&Default::default())
            .await?
            .items
            .iter()
            .any(|e| e.reason.as_deref() == Some("SweptOrphans")),
        "no SweptOrphans event"
    );
    controller.abort();
    ns.cleanup().await
}
