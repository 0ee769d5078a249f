//! The CRDs on a real API server: examples are accepted, invalid objects are rejected
//! with a message naming the field, conditions are shared by field managers, and the
//! short names and printer columns work. Run with `cargo xtask test`.

use anyhow::{Context, Result, bail, ensure};
use kube::api::{DynamicObject, Patch, PatchParams};
use kube::{Api, Client};
use stateward_api::StatefulApp;
use stateward_testkit::harness::{Cluster, apply_yaml, install_crds};

async fn setup(test: &str) -> Result<(Cluster, stateward_testkit::harness::TestNamespace)> {
    let cluster = Cluster::connect().await?;
    {
        let _serial = cluster.serial().await?;
        install_crds(&cluster.client, &stateward_api::crds()).await?;
    }
    let ns = cluster.namespace(test).await?;
    Ok((cluster, ns))
}

#[tokio::test]
async fn every_example_is_accepted_by_the_api_server() -> Result<()> {
    let (cluster, ns) = setup("examples").await?;
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples");
    let mut files: Vec<_> = std::fs::read_dir(&dir)?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .collect();
    files.sort();
    ensure!(
        files.len() >= 5,
        "expected the example files in {}",
        dir.display()
    );
    for file in files
        .iter()
        .filter(|f| f.extension().is_some_and(|e| e == "yaml"))
    {
        let yaml = std::fs::read_to_string(file)?;
        apply_yaml(&cluster.client, &ns.name, &yaml, "stateward-tests")
            .await
            .with_context(|| format!("applying {}", file.display()))?;
    }
    ns.cleanup().await
}

const APP: &str = "apiVersion: stateward.io/v1alpha1\nkind: StatefulApp\nmetadata: { name: bad }\n";
const REPO: &str =
    "apiVersion: stateward.io/v1alpha1\nkind: BackupRepository\nmetadata: { name: bad }\n";
const BACKUP: &str = "apiVersion: stateward.io/v1alpha1\nkind: Backup\nmetadata: { name: bad }\n";
const RESTORE: &str = "apiVersion: stateward.io/v1alpha1\nkind: Restore\nmetadata: { name: bad }\n";
const CREDS: &str =
    "credentials: { accessKeyId: { name: s, key: a }, secretAccessKey: { name: s, key: b } }";

/// (what is wrong, object, a fragment the API server's message must contain)
fn invalid_objects() -> Vec<(&'static str, String, &'static str)> {
    let app = |spec: &str| format!("{APP}spec: {spec}\n");
    let repo = |s3: &str| format!("{REPO}spec: {{ s3: {{ {s3} }} }}\n");
    let backup = |spec: &str| format!("{BACKUP}spec: {spec}\n");
    let restore = |spec: &str| format!("{RESTORE}spec: {spec}\n");
    let sched = |s: &str| {
        app(&format!(
            "{{ statefulSetName: db, backup: {{ repository: r, schedules: [{s}] }} }}"
        ))
    };
    vec![
        ("missing statefulSetName", app("{}"), "spec.statefulSetName"),
        (
            "empty statefulSetName",
            app("{ statefulSetName: '' }"),
            "spec.statefulSetName",
        ),
        (
            "unknown backup method",
            app("{ statefulSetName: db, backup: { repository: r, method: Snapshot } }"),
            "spec.backup.method",
        ),
        (
            "exec method without command",
            app("{ statefulSetName: db, backup: { repository: r, method: Exec } }"),
            "spec.backup.exec",
        ),
        (
            "exec command empty",
            app(
                "{ statefulSetName: db, backup: { repository: r, method: Exec, exec: { command: [] } } }",
            ),
            "spec.backup.exec.command",
        ),
        (
            "backup without repository",
            app("{ statefulSetName: db, backup: { method: Volume } }"),
            "spec.backup.repository",
        ),
        (
            "duplicate schedule names",
            sched("{ name: a, cron: '@daily' }, { name: a, cron: '@hourly' }"),
            "spec.backup.schedules[1]",
        ),
        (
            "schedule name not a DNS label",
            sched("{ name: Nightly_1, cron: '@daily' }"),
            "spec.backup.schedules[0].name",
        ),
        (
            "cron with three fields",
            sched("{ name: a, cron: '0 2 *' }"),
            "spec.backup.schedules[0].cron",
        ),
        (
            "unknown cron macro",
            sched("{ name: a, cron: '@fortnightly' }"),
            "spec.backup.schedules[0].cron",
        ),
        (
            "schedule without cron",
            sched("{ name: a }"),
            "spec.backup.schedules[0].cron",
        ),
        (
            "unknown concurrency policy",
            sched("{ name: a, cron: '@daily', concurrencyPolicy: Sometimes }"),
            "spec.backup.schedules[0].concurrencyPolicy",
        ),
        (
            "starting deadline too small",
            sched("{ name: a, cron: '@daily', startingDeadlineSeconds: 1 }"),
            "spec.backup.schedules[0].startingDeadlineSeconds",
        ),
        (
            "empty retention",
            sched("{ name: a, cron: '@daily', retention: {} }"),
            "spec.backup.schedules[0].retention",
        ),
        (
            "keepLast zero",
            sched("{ name: a, cron: '@daily', retention: { keepLast: 0 } }"),
            "spec.backup.schedules[0].retention.keepLast",
        ),
        (
            "too many schedules",
            sched(
                &(0..17)
                    .map(|i| format!("{{ name: s{i}, cron: '@daily' }}"))
                    .collect::<Vec<_>>()
                    .join(", "),
            ),
            "spec.backup.schedules",
        ),
        (
            "hook timeout zero",
            app(
                "{ statefulSetName: db, backup: { repository: r, hooks: { pre: [{ name: h, command: [true], timeoutSeconds: 0 }] } } }",
            ),
            "spec.backup.hooks.pre[0].timeoutSeconds",
        ),
        (
            "hook onError unknown",
            app(
                "{ statefulSetName: db, backup: { repository: r, hooks: { post: [{ name: h, command: [true], onError: Ignore }] } } }",
            ),
            "spec.backup.hooks.post[0].onError",
        ),
        (
            "min above max replicas",
            app("{ statefulSetName: db, scaling: { minReplicas: 5, maxReplicas: 2 } }"),
            "spec.scaling.minReplicas",
        ),
        (
            "storage size not a quantity",
            app("{ statefulSetName: db, scaling: { storage: { size: big } } }"),
            "spec.scaling.storage.size",
        ),
        (
            "autoExpand threshold out of range",
            app(
                "{ statefulSetName: db, scaling: { storage: { autoExpand: { thresholdPercent: 10, maxSize: 10Gi } } } }",
            ),
            "spec.scaling.storage.autoExpand.thresholdPercent",
        ),
        (
            "metrics port out of range",
            app("{ statefulSetName: db, monitoring: { metricsPort: 70000 } }"),
            "spec.monitoring.metricsPort",
        ),
        (
            "backupMaxAge not a duration",
            app("{ statefulSetName: db, monitoring: { backupMaxAge: 'one day' } }"),
            "spec.monitoring.backupMaxAge",
        ),
        (
            "bucket name with capitals",
            repo(&format!("bucket: MyBucket, {CREDS}")),
            "spec.s3.bucket",
        ),
        (
            "repository without credentials",
            repo("bucket: backups"),
            "spec.s3.credentials",
        ),
        (
            "endpoint without scheme",
            repo(&format!(
                "bucket: backups, endpoint: 's3.example.com', {CREDS}"
            )),
            "spec.s3.endpoint",
        ),
        (
            "prefix with a leading slash",
            repo(&format!("bucket: backups, prefix: /x, {CREDS}")),
            "spec.s3.prefix",
        ),
        ("backup without app", backup("{}"), "spec.app"),
        (
            "unknown deletion policy",
            backup("{ app: db, deletionPolicy: Shred }"),
            "spec.deletionPolicy",
        ),
        (
            "restore with two sources",
            restore(
                "{ source: { backup: b, repositoryPath: { repository: r, path: ns/app/b-1 } }, target: { app: db } }",
            ),
            "spec.source",
        ),
        (
            "restore with no source",
            restore("{ source: {}, target: { app: db } }"),
            "spec.source",
        ),
        (
            "restore path of the wrong shape",
            restore(
                "{ source: { repositoryPath: { repository: r, path: just-a-name } }, target: { app: db } }",
            ),
            "spec.source.repositoryPath.path",
        ),
        (
            "clone name not a DNS label",
            restore(
                "{ source: { backup: b }, target: { app: db, cloneStatefulSetName: Clone_1 } }",
            ),
            "spec.target.cloneStatefulSetName",
        ),
    ]
}

async fn create(client: &Client, namespace: &str, yaml: &str) -> Result<(), kube::Error> {
    let object: DynamicObject = serde_yaml::from_str(yaml).map_err(|e| {
        kube::Error::SerdeError(serde_json::Error::io(std::io::Error::other(e.to_string())))
    })?;
    let types = object.types.clone().unwrap_or_default();
    let kind = types.kind.clone();
    let plural = format!("{}s", kind.to_lowercase());
    let resource = kube::api::ApiResource {
        group: "stateward.io".into(),
        version: "v1alpha1".into(),
        api_version: "stateward.io/v1alpha1".into(),
        kind,
        plural: if plural == "backuprepositorys" {
            "backuprepositories".into()
        } else {
            plural
        },
    };
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), namespace, &resource);
    api.create(&Default::default(), &object).await.map(|_| ())
}

#[tokio::test]
async fn invalid_objects_are_rejected_with_a_message_naming_the_field() -> Result<()> {
    let (cluster, ns) = setup("invalid").await?;
    let cases = invalid_objects();
    ensure!(cases.len() >= 25, "at least 25 cases, have {}", cases.len());
    let mut failures = Vec::new();
    for (what, yaml, field) in &cases {
        match create(&cluster.client, &ns.name, yaml).await {
            Ok(()) => failures.push(format!("{what}: accepted")),
            Err(kube::Error::Api(status)) if status.code == 422 => {
                if !status.message.contains(field) {
                    failures.push(format!(
                        "{what}: message does not name {field}: {}",
                        status.message
                    ));
                }
            }
            Err(e) => failures.push(format!("{what}: unexpected error {e}")),
        }
    }
    if !failures.is_empty() {
        bail!(
            "{} of {} cases failed:\n{}",
            failures.len(),
            cases.len(),
            failures.join("\n")
        );
    }
    // Transition rule: a storage size can grow but never shrink.
    let apps: Api<StatefulApp> = Api::namespaced(cluster.client.clone(), &ns.name);
    create(
        &cluster.client,
        &ns.name,
        &format!("{APP}spec: {{ statefulSetName: db, scaling: {{ storage: {{ size: 2Gi }} }} }}\n"),
    )
    .await?;
    apps.patch(
        "bad",
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"spec": {"scaling": {"storage": {"size": "3Gi"}}}})),
    )
    .await?;
    match apps
        .patch(
            "bad",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"scaling": {"storage": {"size": "1Gi"}}}})),
        )
        .await
    {
        Err(kube::Error::Api(s))
            if s.code == 422 && s.message.contains("spec.scaling.storage.size") => {}
        other => bail!("shrinking the storage size was not rejected as expected: {other:?}"),
    }
    ns.cleanup().await
}

#[tokio::test]
async fn four_field_managers_each_keep_their_own_condition_types() -> Result<()> {
    let (cluster, ns) = setup("conditions").await?;
    create(
        &cluster.client,
        &ns.name,
        &format!("{APP}spec: {{ statefulSetName: db }}\n"),
    )
    .await?;
    let apps: Api<StatefulApp> = Api::namespaced(cluster.client.clone(), &ns.name);
    let managers = [
        ("stateward-backup", "BackupsHealthy"),
        ("stateward-restore", "Restoring"),
        ("stateward-scaling", "Scaling"),
        ("stateward-monitoring", "Healthy"),
    ];
    for round in 0..2 {
        for (manager, condition) in managers {
            let patch = serde_json::json!({
                "apiVersion": "stateward.io/v1alpha1", "kind": "StatefulApp",
                "status": { "conditions": [{
                    "type": condition, "status": if round == 0 { "False" } else { "True" },
                    "reason": format!("Round{round}"), "message": format!("written by {manager}"),
                    "lastTransitionTime": "2026-01-01T00:00:00Z",
                }]},
            });
            apps.patch_status(
                "bad",
                &PatchParams::apply(manager).force(),
                &Patch::Apply(&patch),
            )
            .await?;
        }
    }
    let app = apps.get_status("bad").await?;
    let conditions = app.status.map(|s| s.conditions).unwrap_or_default();
    for (manager, condition) in managers {
        let c = conditions
            .iter()
            .find(|c| c.type_ == condition)
            .with_context(|| format!("{condition} of {manager} is gone"))?;
        ensure!(
            c.status == "True" && c.reason == "Round1",
            "{condition} was not updated by {manager}: {c:?}"
        );
    }
    ensure!(
        conditions.len() == 4,
        "expected 4 conditions, got {conditions:?}"
    );
    ns.cleanup().await
}

#[tokio::test]
async fn short_names_resolve_and_tables_show_the_printer_columns() -> Result<()> {
    let (cluster, ns) = setup("columns").await?;
    let yaml = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/repository.yaml"),
    )?;
    apply_yaml(&cluster.client, &ns.name, &yaml, "stateward-tests").await?;
    let discovery = kube::discovery::Discovery::new(cluster.client.clone())
        .run()
        .await?;
    let group = discovery
        .get("stateward.io")
        .context("group stateward.io not discovered")?;
    let resources = group.recommended_resources();
    let raw: serde_json::Value = cluster
        .client
        .request(http::Request::get("/apis/stateward.io/v1alpha1").body(Vec::new())?)
        .await?;
    let expected = [
        (
            "statefulapps",
            "sapp",
            vec![
                "StatefulSet",
                "Ready",
                "Replicas",
                "Healthy",
                "Backups",
                "Last Backup",
                "Age",
            ],
        ),
        (
            "backuprepositories",
            "brepo",
            vec!["Bucket", "Prefix", "Ready", "Reason", "Age"],
        ),
        (
            "backups",
            "bk",
            vec!["App", "Phase", "Size", "Duration", "Age"],
        ),
        ("restores", "rst", vec!["Source", "Target", "Phase", "Age"]),
    ];
    ensure!(resources.len() >= 4, "discovered {} kinds", resources.len());
    for (plural, short, columns) in expected {
        let entry = raw["resources"]
            .as_array()
            .and_then(|r| r.iter().find(|r| r["name"] == plural))
            .with_context(|| format!("{plural} not served"))?;
        ensure!(
            entry["shortNames"]
                .as_array()
                .is_some_and(|s| s.iter().any(|n| n == short)),
            "{plural} lacks short name {short}"
        );
        ensure!(
            entry["categories"]
                .as_array()
                .is_some_and(|s| s.iter().any(|n| n == "stateward")),
            "{plural} lacks category stateward"
        );
        // What `kubectl get <short>` asks for: a Table.
        let request = http::Request::get(format!(
            "/apis/stateward.io/v1alpha1/namespaces/{}/{plural}",
            ns.name
        ))
        .header("Accept", "application/json;as=Table;v=v1;g=meta.k8s.io")
        .body(Vec::new())?;
        let table: serde_json::Value = cluster.client.request(request).await?;
        let names: Vec<String> = table["columnDefinitions"]
            .as_array()
            .context("no columns")?
            .iter()
            .filter_map(|c| c["name"].as_str().map(String::from))
            .collect();
        for column in columns {
            ensure!(
                names.iter().any(|n| n == column),
                "{plural}: column {column} missing from {names:?}"
            );
        }
        if plural == "backuprepositories" {
            ensure!(
                table["rows"].as_array().is_some_and(|r| r.len() == 1),
                "the example repository is not listed: {table}"
            );
        }
    }
    ns.cleanup().await
}
