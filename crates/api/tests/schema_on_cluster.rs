//! The CRDs on a real API server: examples are accepted, conditions are shared by field
//! managers, and the short names and printer columns work (what admission refuses is
//! `admission.rs`). Run with `cargo xtask test`.

use anyhow::{Context, Result, ensure};
use kube::Api;
use kube::api::{Patch, PatchParams};
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

#[tokio::test]
async fn four_field_managers_each_keep_their_own_condition_types() -> Result<()> {
    let (cluster, ns) = setup("conditions").await?;
    apply_yaml(
        &cluster.client,
        &ns.name,
        "apiVersion: stateward.io/v1alpha1\nkind: StatefulApp\nmetadata: { name: bad }\nspec: { statefulSetName: db }\n",
        "stateward-tests",
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
