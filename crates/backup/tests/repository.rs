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
                    "metadata: {{ name: {name} }}\nstringData: {{ accessKeyId: {}, secretAccessKey: {secret_key} }}",
                    env.s3_access_key
                ))?,
            )
            .await?;
    }
    let endpoint = env.s3_endpoint.as_str();
    let cases = [
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
        Some(ns.name.clone()),
        stateward_backup::RunConfig::default(),
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
    }
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
            &from_yaml(&format!("metadata: {{ name: absent }}\nstringData: {{ accessKeyId: {}, secretAccessKey: {} }}", env.s3_access_key, env.s3_secret_key))?,
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
