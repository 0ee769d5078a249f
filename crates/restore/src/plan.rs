//! What a restore will do, decided from the Restore, the manifest and the app, with no
//! client: the mode, one item per volume (or per pod's dump), the names of clone PVCs,
//! and the objects to create (agent Jobs, clone PVCs, the clone StatefulSet).

use std::collections::BTreeMap;

use serde_json::{Value, json};
use stateward_agent::manifest::{Entry, Manifest};
use stateward_api::common::{MANAGED_BY_LABEL, MANAGED_BY_VALUE};
use stateward_api::repository::BackupRepository;
use stateward_api::restore::RestoreMode;
use stateward_api::statefulapp::ExecSpec;
use stateward_api::{Restore, StatefulApp};
use stateward_runtime::names;

/// Labels on everything a restore creates.
pub const RESTORE_LABEL: &str = "stateward.io/restore";
pub const RESTORE_UID_LABEL: &str = "stateward.io/restore-uid";
pub const COMPONENT_LABEL: &str = "app.kubernetes.io/component";
pub const AGENT_COMPONENT: &str = "restore-agent";
/// On clone PVCs and StatefulSets: the Restore that created them (they are not owned by
/// it, so deleting the Restore keeps the data).
pub const RESTORED_BY_ANNOTATION: &str = "stateward.io/restored-by";
/// Added to a created clone StatefulSet's selector and pod labels.
pub const CLONE_LABEL: &str = "stateward.io/clone";
pub const AGENT_SERVICE_ACCOUNT: &str = "stateward-agent";

/// A refusal found while planning: a condition reason and a sentence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub reason: &'static str,
    pub message: String,
}

fn refuse(reason: &'static str, message: impl Into<String>) -> Refusal {
    Refusal {
        reason,
        message: message.into(),
    }
}

/// One volume (or one pod's dump) to restore.
#[derive(Debug, Clone, PartialEq)]
pub struct Item {
    pub entry: Entry,
    /// The PVC written (InPlace, Clone) or the pod fed (Exec).
    pub target: String,
    /// For a dump placed as a file: the file name.
    pub as_file: Option<String>,
    /// With `as_file`: other names at the volume root replaced in the same swap.
    pub also_remove: Vec<String>,
    /// With `as_file`: small files written beside it (`path=content`).
    pub extra_files: Vec<String>,
}

/// The restore's shape.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub mode: RestoreMode,
    pub items: Vec<Item>,
    /// Clone PVCs to create (name → recorded PVC it copies).
    pub clone_claims: BTreeMap<String, Value>,
    /// The app's exec container and restore command (exec restores).
    pub container: Option<String>,
    pub restore_command: Vec<String>,
}

/// `<template>-<sts>-<ordinal>` split into (template, ordinal), for a PVC name of `sts`.
pub fn claim_parts<'a>(claim: &'a str, sts: &str, templates: &[String]) -> Option<(&'a str, u32)> {
    templates.iter().find_map(|template| {
        let rest = claim.strip_prefix(template.as_str())?.strip_prefix('-')?;
        let ordinal = rest.strip_prefix(sts)?.strip_prefix('-')?;
        let ordinal: u32 = ordinal.parse().ok()?;
        Some((&claim[..template.len()], ordinal))
    })
}

/// The volumeClaimTemplate names of a recorded StatefulSet.
pub fn template_names(sts: &Value) -> Vec<String> {
    sts.pointer("/spec/volumeClaimTemplates")
        .and_then(|v| v.as_array())
        .map(|templates| {
            templates
                .iter()
                .filter_map(|t| t.pointer("/metadata/name").and_then(|n| n.as_str()))
                .map(String::from)
                .collect()
        })
        .unwrap_or_default()
}

/// Decides the mode and the items.
pub fn plan(
    restore: &Restore,
    manifest: &Manifest,
    app: &StatefulApp,
    existing_claims: &[String],
) -> Result<Plan, Refusal> {
    let clone = restore.spec.target.clone_stateful_set_name.as_deref();
    let exec: Option<&ExecSpec> = app.spec.backup.as_ref().and_then(|b| b.exec.as_ref());
    let container = exec.and_then(|e| e.container.clone());
    let restore_command = exec.map(|e| e.restore_command.clone()).unwrap_or_default();
    let recorded_sts = manifest
        .stateful_set
        .pointer("/metadata/name")
        .and_then(|n| n.as_str())
        .unwrap_or(&app.spec.stateful_set_name)
        .to_string();
    let templates = template_names(&manifest.stateful_set);
    if manifest.entries.is_empty() {
        return Err(refuse("EmptyBackup", "the backup's manifest lists no data"));
    }
    let is_dump = manifest.method == "Exec";
    if is_dump {
        let file = exec.and_then(|e| e.restore_file.as_ref());
        if clone.is_none() && file.is_none() && !restore_command.is_empty() {
            let items = manifest
                .entries
                .iter()
                .map(|entry| Item {
                    entry: entry.clone(),
                    target: entry.pod.clone(),
                    as_file: None,
                    also_remove: Vec::new(),
                    extra_files: Vec::new(),
                })
                .collect();
            return Ok(Plan {
                mode: RestoreMode::Exec,
                items,
                clone_claims: BTreeMap::new(),
                container: container.clone(),
                restore_command: restore_command.clone(),
            });
        }
        let Some(file) = file else {
            return Err(refuse(
                "NoRestoreRecipe",
                format!(
                    "the backup is a dump (method Exec); StatefulApp {} needs spec.backup.exec.restoreCommand (stream into the running app) or spec.backup.exec.restoreFile (place the file, for a clone too)",
                    app.metadata.name.as_deref().unwrap_or_default()
                ),
            ));
        };
        let sts = clone.unwrap_or(&app.spec.stateful_set_name);
        let mut items = Vec::new();
        let mut clone_claims = BTreeMap::new();
        for entry in &manifest.entries {
            let ordinal = entry
                .pod
                .strip_prefix(&format!("{recorded_sts}-"))
                .and_then(|o| o.parse::<u32>().ok())
                .ok_or_else(|| {
                    refuse(
                        "UnknownPod",
                        format!("dump of pod {} is not a pod of {recorded_sts}", entry.pod),
                    )
                })?;
            let claim = format!("{}-{sts}-{ordinal}", file.volume);
            if clone.is_some() {
                let source = format!("{}-{recorded_sts}-{ordinal}", file.volume);
                let recorded = recorded_claim(manifest, &source)
                    .or_else(|| template_claim(manifest, &file.volume))
                    .ok_or_else(|| {
                        refuse(
                            "NoRecordedVolume",
                            format!(
                                "the backup records no PVC {source} or template {} to create the clone's volume from",
                                file.volume
                            ),
                        )
                    })?;
                clone_claims.insert(claim.clone(), recorded);
            } else if !existing_claims.contains(&claim) {
                return Err(refuse(
                    "TargetVolumeMissing",
                    format!(
                        "PVC {claim} (volume {} of pod {}) does not exist",
                        file.volume, entry.pod
                    ),
                ));
            }
            items.push(Item {
                entry: entry.clone(),
                target: claim,
                as_file: Some(file.path.clone()),
                also_remove: file.also_remove.clone(),
                extra_files: file
                    .files
                    .iter()
                    .map(|f| format!("{}={}", f.path, f.content))
                    .collect(),
            });
        }
        return Ok(Plan {
            mode: if clone.is_some() {
                RestoreMode::Clone
            } else {
                RestoreMode::InPlace
            },
            items,
            clone_claims,
            container: container.clone(),
            restore_command: restore_command.clone(),
        });
    }
    // Volume backups.
    let mut items = Vec::new();
    let mut clone_claims = BTreeMap::new();
    for entry in &manifest.entries {
        let target = match clone {
            None => {
                if !existing_claims.contains(&entry.name) {
                    return Err(refuse(
                        "TargetVolumeMissing",
                        format!(
                            "PVC {} does not exist (the app has fewer replicas than the backup: scale it up first, or restore into a clone)",
                            entry.name
                        ),
                    ));
                }
                entry.name.clone()
            }
            Some(clone) => {
                let (template, ordinal) = claim_parts(&entry.name, &recorded_sts, &templates)
                    .ok_or_else(|| {
                        refuse(
                            "UnknownVolume",
                            format!(
                                "PVC {} is not named after a volumeClaimTemplate of {recorded_sts}",
                                entry.name
                            ),
                        )
                    })?;
                let name = format!("{template}-{clone}-{ordinal}");
                let recorded = recorded_claim(manifest, &entry.name)
                    .or_else(|| template_claim(manifest, template))
                    .ok_or_else(|| {
                        refuse(
                            "NoRecordedVolume",
                            format!("the backup records no spec for PVC {}", entry.name),
                        )
                    })?;
                clone_claims.insert(name.clone(), recorded);
                name
            }
        };
        items.push(Item {
            entry: entry.clone(),
            target,
            as_file: None,
            also_remove: Vec::new(),
            extra_files: Vec::new(),
        });
    }
    Ok(Plan {
        mode: if clone.is_some() {
            RestoreMode::Clone
        } else {
            RestoreMode::InPlace
        },
        items,
        clone_claims,
        container: container.clone(),
        restore_command: restore_command.clone(),
    })
}

fn recorded_claim(manifest: &Manifest, name: &str) -> Option<Value> {
    manifest
        .persistent_volume_claims
        .iter()
        .find(|c| c.pointer("/metadata/name").and_then(|n| n.as_str()) == Some(name))
        .cloned()
}

fn template_claim(manifest: &Manifest, template: &str) -> Option<Value> {
    manifest
        .stateful_set
        .pointer("/spec/volumeClaimTemplates")
        .and_then(|v| v.as_array())
        .and_then(|ts| {
            ts.iter()
                .find(|t| t.pointer("/metadata/name").and_then(|n| n.as_str()) == Some(template))
        })
        .cloned()
}

/// A clone PVC from a recorded one: its storage class, access modes and size, never its
/// bound volume or data source; labelled and annotated with the Restore, not owned by it.
pub fn clone_claim(name: &str, recorded: &Value, restore: &Restore) -> Value {
    let spec = recorded.get("spec").cloned().unwrap_or(json!({}));
    let mut out_spec = serde_json::Map::new();
    for field in ["accessModes", "storageClassName", "volumeMode"] {
        if let Some(v) = spec.get(field) {
            out_spec.insert(field.into(), v.clone());
        }
    }
    let size = spec
        .pointer("/resources/requests/storage")
        .cloned()
        .unwrap_or(json!("1Gi"));
    out_spec.insert("resources".into(), json!({"requests": {"storage": size}}));
    let mut labels: BTreeMap<String, Value> = recorded
        .pointer("/metadata/labels")
        .and_then(|l| serde_json::from_value(l.clone()).ok())
        .unwrap_or_default();
    labels.insert(RESTORE_LABEL.into(), json!(restore_name(restore)));
    json!({
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {
            "name": name,
            "labels": labels,
            "annotations": {RESTORED_BY_ANNOTATION: restore_name(restore)},
        },
        "spec": out_spec,
    })
}

/// The clone StatefulSet: the recorded spec under the new name, with `replicas` and the
/// clone label added to its selector and pod labels (so the source's StatefulSet never
/// selects the clone's pods, nor the clone the source's).
pub fn clone_stateful_set(recorded: &Value, name: &str, replicas: i32, restore: &Restore) -> Value {
    let mut sts = stateward_agent::manifest::trimmed(recorded);
    sts["metadata"]["name"] = json!(name);
    if let Some(meta) = sts.get_mut("metadata").and_then(|m| m.as_object_mut()) {
        meta.remove("namespace");
        let annotations = meta.entry("annotations").or_insert_with(|| json!({}));
        annotations[RESTORED_BY_ANNOTATION] = json!(restore_name(restore));
    }
    sts["spec"]["replicas"] = json!(replicas);
    sts["spec"]["selector"]["matchLabels"][CLONE_LABEL] = json!(name);
    sts["spec"]["template"]["metadata"]["labels"][CLONE_LABEL] = json!(name);
    if let Some(spec) = sts.get_mut("spec").and_then(|s| s.as_object_mut()) {
        spec.remove("status");
    }
    if let Some(templates) = sts
        .pointer_mut("/spec/volumeClaimTemplates")
        .and_then(|t| t.as_array_mut())
    {
        for template in templates {
            if let Some(t) = template.as_object_mut() {
                t.remove("status");
            }
        }
    }
    sts
}

fn restore_name(restore: &Restore) -> String {
    restore.metadata.name.clone().unwrap_or_default()
}

/// Which part of a volume restore a Job runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobStep {
    Stage,
    Swap,
    Discard,
    Exec,
}

impl JobStep {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stage => "stage",
            Self::Swap => "swap",
            Self::Discard => "discard",
            Self::Exec => "exec",
        }
    }
}

/// `<restore>-<step>-<index>`, bounded with a hash so it stays a valid Job (and pod) name.
pub fn job_name(restore: &str, step: JobStep, index: usize) -> String {
    names::bounded(&format!("{restore}-{}-{index}", step.as_str()), 52, false)
}

/// What an agent Job needs beyond the item.
pub struct JobInputs<'a> {
    pub restore: &'a Restore,
    pub repository: &'a BackupRepository,
    pub agent_image: &'a str,
    pub container: Option<&'a str>,
    pub restore_command: &'a [String],
    /// Extra environment for the agent (tests: the pause before the swap).
    pub extra_env: &'a [(String, String)],
}

/// Exit code of an agent refusal (checksum, unsafe archive, no space): the Job stops
/// there instead of retrying.
const EXIT_REFUSED: i32 = stateward_agent::restore::EXIT_REFUSED;

/// The agent Job of one item and step.
pub fn agent_job(inputs: &JobInputs<'_>, item: &Item, index: usize, step: JobStep) -> Value {
    let restore = inputs.restore;
    let name = restore_name(restore);
    let uid = restore.metadata.uid.clone().unwrap_or_default();
    let entry = &item.entry;
    let encrypted = entry.encoding.ends_with("+age");
    let mut args: Vec<String> = vec!["agent".into()];
    match step {
        JobStep::Exec => args.extend(["restore-exec".into(), "--pod".into(), item.target.clone()]),
        _ => args.extend([
            "restore-volume".into(),
            "--target".into(),
            "/target".into(),
            "--restore-id".into(),
            uid.clone(),
            "--step".into(),
            step.as_str().into(),
            "--bytes".into(),
            entry.bytes_read.to_string(),
        ]),
    }
    if step == JobStep::Exec
        && let Some(container) = inputs.container
    {
        args.extend(["--container".into(), container.into()]);
    }
    if let (JobStep::Stage | JobStep::Swap | JobStep::Discard, Some(file)) = (step, &item.as_file) {
        args.extend(["--as-file".into(), file.clone()]);
        for name in &item.also_remove {
            args.extend(["--also-remove".into(), name.clone()]);
        }
        for extra in &item.extra_files {
            args.extend(["--extra-file".into(), extra.clone()]);
        }
    } else if step != JobStep::Exec
        && let Some(files) = entry.files
    {
        args.extend(["--files".into(), files.to_string()]);
    }
    args.extend([
        "--key".into(),
        entry.key.clone(),
        "--segments".into(),
        entry.segments.to_string(),
        "--sha256".into(),
        entry.sha256.clone(),
    ]);
    if let Some(content) = &entry.content_sha256 {
        args.extend(["--content-sha256".into(), content.clone()]);
    }
    if encrypted {
        args.push("--decrypt".into());
    }
    args.extend(stateward_agent::job::connection_args(
        &inputs.repository.spec.s3,
    ));
    if step == JobStep::Exec {
        args.push("--".into());
        args.extend(inputs.restore_command.iter().cloned());
    }
    let mut env = stateward_agent::job::credential_env(&inputs.repository.spec);
    if encrypted {
        env.extend(stateward_agent::job::identity_env(&inputs.repository.spec));
    }
    env.push(json!({"name": "RUST_LOG", "value": "info"}));
    for (key, value) in inputs.extra_env {
        env.push(json!({"name": key, "value": value}));
    }
    let labels = json!({
        MANAGED_BY_LABEL: MANAGED_BY_VALUE,
        COMPONENT_LABEL: AGENT_COMPONENT,
        RESTORE_LABEL: name,
        RESTORE_UID_LABEL: uid,
    });
    let mut spec = json!({
        "restartPolicy": "Never",
        "serviceAccountName": AGENT_SERVICE_ACCOUNT,
        "automountServiceAccountToken": step == JobStep::Exec,
        "containers": [{
            "name": "agent",
            "image": inputs.agent_image,
            "args": args,
            "env": env,
            "terminationMessagePolicy": "File",
        }],
    });
    if step == JobStep::Exec {
        spec["containers"][0]["securityContext"] = json!({"allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true, "capabilities": {"drop": ["ALL"]}});
    } else {
        // Restoring ownership and modes needs root with CHOWN/FOWNER/DAC_OVERRIDE; the pod
        // is pinned by the scheduler to the volume's node (the app is stopped, or the
        // clone's volume is new).
        spec["securityContext"] = json!({"runAsUser": 0, "runAsGroup": 0});
        spec["containers"][0]["securityContext"] = json!({
            "allowPrivilegeEscalation": false,
            "readOnlyRootFilesystem": true,
            "capabilities": {"drop": ["ALL"], "add": ["CHOWN", "FOWNER", "DAC_OVERRIDE", "MKNOD", "SETFCAP"]},
        });
        spec["containers"][0]["volumeMounts"] = json!([{"name": "target", "mountPath": "/target"}]);
        spec["volumes"] =
            json!([{"name": "target", "persistentVolumeClaim": {"claimName": item.target}}]);
    }
    json!({
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": job_name(&name, step, index),
            "labels": labels,
            "ownerReferences": [{
                "apiVersion": "stateward.io/v1alpha1",
                "kind": "Restore",
                "name": name,
                "uid": restore.metadata.uid.clone().unwrap_or_default(),
                "controller": true,
                "blockOwnerDeletion": true,
            }],
        },
        "spec": {
            // A crash of the agent (or its node) is retried: every step is idempotent
            // (a journaled swap rolls forward); a refusal (exit 2) is final.
            "backoffLimit": if step == JobStep::Exec { 0 } else { 3 },
            "podFailurePolicy": {"rules": [{"action": "FailJob", "onExitCodes": {"containerName": "agent", "operator": "In", "values": [EXIT_REFUSED]}}]},
            "template": {"metadata": {"labels": labels}, "spec": spec},
        },
    })
}

/// The Role letting exec-restore agents run the restore command in exactly these pods.
pub fn agent_role(app: &str, pods: &[String]) -> Value {
    json!({
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": {"name": agent_role_name(app), "labels": {MANAGED_BY_LABEL: MANAGED_BY_VALUE}},
        "rules": [
            {"apiGroups": [""], "resources": ["pods"], "verbs": ["get"], "resourceNames": pods},
            {"apiGroups": [""], "resources": ["pods/exec"], "verbs": ["create", "get"], "resourceNames": pods},
        ],
    })
}

pub fn agent_role_binding(app: &str) -> Value {
    json!({
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": {"name": agent_role_name(app), "labels": {MANAGED_BY_LABEL: MANAGED_BY_VALUE}},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": agent_role_name(app)},
        "subjects": [{"kind": "ServiceAccount", "name": AGENT_SERVICE_ACCOUNT}],
    })
}

pub fn agent_role_name(app: &str) -> String {
    names::bounded(&format!("stateward-restore-agent-{app}"), 63, false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(method: &str, entries: &[(&str, &str)]) -> Manifest {
        serde_json::from_value(json!({
            "formatVersion": 1, "writtenBy": "t", "namespace": "ns", "app": "db", "backup": "b",
            "backupUid": "u", "method": method, "startedAt": "", "completedAt": "",
            "entries": entries.iter().map(|(name, pod)| json!({
                "name": name, "pod": pod, "key": format!("k/{name}"), "encoding": "tar+zstd",
                "bytesRead": 10, "bytesStored": 5, "sha256": "s", "files": 2,
            })).collect::<Vec<_>>(),
            "statefulSet": {"metadata": {"name": "db", "labels": {"app": "db"}}, "spec": {
                "replicas": 2, "selector": {"matchLabels": {"app": "db"}},
                "template": {"metadata": {"labels": {"app": "db"}}},
                "volumeClaimTemplates": [{"metadata": {"name": "data"}, "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "16Mi"}}}}]}},
            "persistentVolumeClaims": [{"metadata": {"name": "data-db-0", "labels": {"app": "db"}}, "spec": {"volumeName": "pv-1", "accessModes": ["ReadWriteOnce"], "storageClassName": "local", "resources": {"requests": {"storage": "32Mi"}}}}],
        }))
        .unwrap()
    }

    fn restore(target: &str) -> Restore {
        serde_yaml::from_str(&format!(
            "apiVersion: stateward.io/v1alpha1\nkind: Restore\nmetadata: {{name: r, uid: ru}}\nspec: {{source: {{backup: b}}, target: {target}}}"
        ))
        .unwrap()
    }

    fn app(exec: &str) -> StatefulApp {
        serde_yaml::from_str(&format!(
            "apiVersion: stateward.io/v1alpha1\nkind: StatefulApp\nmetadata: {{name: db}}\nspec: {{statefulSetName: db, backup: {{repository: repo{exec}}}}}"
        ))
        .unwrap()
    }

    #[test]
    fn in_place_writes_the_recorded_claims_and_refuses_missing_ones() {
        let m = manifest("Volume", &[("data-db-0", "db-0"), ("data-db-1", "db-1")]);
        let claims = vec!["data-db-0".to_string(), "data-db-1".to_string()];
        let p = plan(&restore("{app: db}"), &m, &app(""), &claims).unwrap();
        assert_eq!(p.mode, RestoreMode::InPlace);
        assert_eq!(
            p.items
                .iter()
                .map(|i| i.target.as_str())
                .collect::<Vec<_>>(),
            ["data-db-0", "data-db-1"]
        );
        let refused = plan(&restore("{app: db}"), &m, &app(""), &claims[..1]).unwrap_err();
        assert_eq!(refused.reason, "TargetVolumeMissing");
        assert!(refused.message.contains("data-db-1"), "{refused:?}");
    }

    #[test]
    fn a_clone_names_claims_as_its_templates_would_and_copies_only_safe_spec_fields() {
        let m = manifest("Volume", &[("data-db-0", "db-0"), ("data-db-1", "db-1")]);
        let r = restore("{app: db, cloneStatefulSetName: db-copy, createStatefulSet: true}");
        let p = plan(&r, &m, &app(""), &[]).unwrap();
        assert_eq!(p.mode, RestoreMode::Clone);
        assert_eq!(
            p.clone_claims.keys().collect::<Vec<_>>(),
            ["data-db-copy-0", "data-db-copy-1"]
        );
        let c0 = clone_claim("data-db-copy-0", &p.clone_claims["data-db-copy-0"], &r);
        assert_eq!(
            c0["spec"]["resources"]["requests"]["storage"], "32Mi",
            "the recorded PVC's size"
        );
        assert!(
            c0["spec"].get("volumeName").is_none(),
            "never the source's volume"
        );
        assert_eq!(c0["metadata"]["labels"]["app"], "db");
        assert!(c0["metadata"].get("ownerReferences").is_none());
        let c1 = clone_claim("data-db-copy-1", &p.clone_claims["data-db-copy-1"], &r);
        assert_eq!(
            c1["spec"]["resources"]["requests"]["storage"], "16Mi",
            "from the template"
        );
        let sts = clone_stateful_set(&m.stateful_set, "db-copy", 2, &r);
        assert_eq!(sts["metadata"]["name"], "db-copy");
        assert_eq!(
            sts["spec"]["selector"]["matchLabels"][CLONE_LABEL],
            "db-copy"
        );
        assert_eq!(
            sts["spec"]["template"]["metadata"]["labels"][CLONE_LABEL],
            "db-copy"
        );
        assert_eq!(sts["spec"]["replicas"], 2);
    }

    #[test]
    fn dumps_stream_into_the_restore_command_or_land_as_a_file() {
        let m = manifest("Exec", &[("db-0", "db-0")]);
        let exec = app(", method: Exec, exec: {command: [dump], restoreCommand: [load]}");
        let p = plan(&restore("{app: db}"), &m, &exec, &[]).unwrap();
        assert_eq!(
            (p.mode, p.items[0].target.as_str()),
            (RestoreMode::Exec, "db-0")
        );
        let file = app(
            ", method: Exec, exec: {command: [dump], restoreFile: {volume: data, path: dump.rdb}}",
        );
        let p = plan(&restore("{app: db}"), &m, &file, &["data-db-0".into()]).unwrap();
        assert_eq!(p.mode, RestoreMode::InPlace);
        assert_eq!(p.items[0].target, "data-db-0");
        assert_eq!(p.items[0].as_file.as_deref(), Some("dump.rdb"));
        let none = plan(
            &restore("{app: db}"),
            &m,
            &app(", method: Exec, exec: {command: [dump]}"),
            &[],
        )
        .unwrap_err();
        assert_eq!(none.reason, "NoRestoreRecipe");
    }

    #[test]
    fn claim_names_split_on_the_known_template_and_set() {
        let templates = vec!["data".to_string(), "wal-data".to_string()];
        assert_eq!(
            claim_parts("data-db-0", "db", &templates),
            Some(("data", 0))
        );
        assert_eq!(
            claim_parts("wal-data-db-12", "db", &templates),
            Some(("wal-data", 12))
        );
        assert_eq!(claim_parts("data-other-0", "db", &templates), None);
    }

    #[test]
    fn jobs_carry_checksums_and_stop_on_refusal() {
        let m = manifest("Volume", &[("data-db-0", "db-0")]);
        let r = restore("{app: db}");
        let repo: BackupRepository = serde_yaml::from_str("apiVersion: stateward.io/v1alpha1\nkind: BackupRepository\nmetadata: {name: repo}\nspec: {s3: {bucket: bkt, credentials: {accessKeyId: {name: s, key: a}, secretAccessKey: {name: s, key: b}}}}").unwrap();
        let inputs = JobInputs {
            restore: &r,
            repository: &repo,
            agent_image: "img",
            container: None,
            restore_command: &[],
            extra_env: &[],
        };
        let item = Item {
            entry: m.entries[0].clone(),
            target: "data-db-0".into(),
            as_file: None,
            also_remove: vec![],
            extra_files: vec![],
        };
        let job = agent_job(&inputs, &item, 0, JobStep::Stage);
        let args: Vec<String> = serde_json::from_value(
            job["spec"]["template"]["spec"]["containers"][0]["args"].clone(),
        )
        .unwrap();
        for expected in [
            "restore-volume",
            "--sha256",
            "--files",
            "stage",
            "--restore-id",
            "ru",
        ] {
            assert!(args.iter().any(|a| a == expected), "{expected} in {args:?}");
        }
        assert_eq!(
            job["spec"]["podFailurePolicy"]["rules"][0]["onExitCodes"]["values"][0],
            2
        );
        assert_eq!(
            job["spec"]["template"]["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"],
            "data-db-0"
        );
        let env = &job["spec"]["template"]["spec"]["containers"][0]["env"];
        assert_eq!(env[0]["name"], "AWS_ACCESS_KEY_ID");
        assert_eq!(
            env[0]["valueFrom"]["secretKeyRef"]["name"], "s",
            "credentials only by reference"
        );
        assert!(env[0].get("value").is_none());
    }
}
