//! What a restore will do, decided from the Restore, the manifest and the app, with no
//! client: the mode, one item per volume (or per pod's dump), the names of clone PVCs,
//! and the objects to create (agent Jobs, clone PVCs, the clone StatefulSet).

use std::collections::BTreeMap;

use serde_json::{Value, json};
use stateward_agent::job::{VolumeAccess, VolumeWork};
use stateward_agent::manifest::{Entry, Manifest};
use stateward_api::common::{MANAGED_BY_LABEL, MANAGED_BY_VALUE};
use stateward_api::repository::BackupRepository;
use stateward_api::restore::{PlannedWrite, RestoreMode, RestorePlanStatus};
use stateward_api::statefulapp::ExecSpec;
use stateward_api::{Restore, StatefulApp};
use stateward_runtime::names;

use crate::access::TemplateIdentity;

/// Labels on everything a restore creates.
pub const RESTORE_LABEL: &str = "stateward.io/restore";
pub const RESTORE_UID_LABEL: &str = "stateward.io/restore-uid";
/// The full name of the Restore on its agent Jobs: the label value is bounded to 63
/// characters (a readable prefix and a hash), so the Job maps back through this.
pub const RESTORE_NAME_ANNOTATION: &str = "stateward.io/restore-name";
/// Which step an agent Job runs (`stage`, `swap`, `discard`, `exec`).
pub const STEP_LABEL: &str = "stateward.io/restore-step";
pub const COMPONENT_LABEL: &str = "app.kubernetes.io/component";
pub const AGENT_COMPONENT: &str = "restore-agent";
/// On clone PVCs and StatefulSets: the Restore that created them (they are not owned by
/// it, so deleting the Restore keeps the data).
pub const RESTORED_BY_ANNOTATION: &str = "stateward.io/restored-by";
/// Added to a created clone StatefulSet's selector and pod labels.
pub const CLONE_LABEL: &str = "stateward.io/clone";

/// A refusal found while planning: a condition reason and a sentence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub reason: &'static str,
    pub message: String,
}

/// A Restore that asks for a feature this operator runs without: only a clone's
/// StatefulSet can be turned off (`features.cloneStatefulSets`, which also drops the
/// right to create StatefulSets unless volume expansion needs it).
pub fn turned_off(restore: &Restore, clone_stateful_sets: bool) -> Option<Refusal> {
    (restore.spec.target.create_stateful_set && !clone_stateful_sets).then(|| {
        refuse(
            "FeatureDisabled",
            "spec.target.createStatefulSet: this operator runs with clone StatefulSets turned off (Helm value features.cloneStatefulSets); restore without it (the clone's claims are still created) and create the StatefulSet yourself, or ask the operator's admin to turn the feature on",
        )
    })
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
    /// How its volume agents run (volume items; `None` for a dump fed to a pod).
    pub access: Option<(VolumeAccess, VolumeWork)>,
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
    /// The target's claims the backup has nothing for (they stay as they are).
    pub untouched: Vec<String>,
    /// Where volume agents may run: the app's tolerations, node selector and node
    /// affinity (see [`placement`]).
    pub placement: Value,
}

/// Where a StatefulSet's pods may run, for its volume agents: tolerations (a tainted,
/// dedicated node), node selector and node affinity. Not pod (anti-)affinity: it names
/// the app's own pods, which an in-place restore has stopped, and would only keep the
/// agent away from where its volume is.
pub fn placement(sts: &Value) -> Value {
    let spec = sts.pointer("/spec/template/spec");
    let field = |path: &str| spec.and_then(|s| s.pointer(path)).filter(|v| !v.is_null());
    let mut out = serde_json::Map::new();
    if let Some(tolerations) = field("/tolerations") {
        out.insert("tolerations".into(), tolerations.clone());
    }
    if let Some(selector) = field("/nodeSelector") {
        out.insert("nodeSelector".into(), selector.clone());
    }
    if let Some(node_affinity) = field("/affinity/nodeAffinity") {
        out.insert("affinity".into(), json!({"nodeAffinity": node_affinity}));
    }
    Value::Object(out)
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

/// The target StatefulSet as the mapping sees it (read live, never from the manifest).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TargetSet {
    /// The StatefulApp restored into.
    pub app: String,
    /// Its StatefulSet.
    pub name: String,
    /// The StatefulSet's volumeClaimTemplate names.
    pub templates: Vec<String>,
    /// The replica count the app runs at (and comes back to after an in-place restore).
    pub replicas: u32,
    /// Whom its pod template runs the app as.
    pub identity: TemplateIdentity,
    /// Where its pods may run (see [`placement`]).
    pub placement: Value,
}

impl TargetSet {
    /// From the live StatefulSet of `app` (`replicas` overrides the spec's count: an
    /// in-place restore records it before the app is stopped).
    pub fn of(
        app: &str,
        sts: &k8s_openapi::api::apps::v1::StatefulSet,
        replicas: Option<i32>,
    ) -> Self {
        let spec = sts.spec.as_ref();
        // Read like the recorded StatefulSet a clone uses: one JSON view for both.
        let as_json = serde_json::to_value(sts).unwrap_or_default();
        Self {
            app: app.to_string(),
            name: sts.metadata.name.clone().unwrap_or_default(),
            templates: spec
                .and_then(|s| s.volume_claim_templates.as_ref())
                .map(|ts| ts.iter().filter_map(|t| t.metadata.name.clone()).collect())
                .unwrap_or_default(),
            replicas: replicas
                .or_else(|| spec.and_then(|s| s.replicas))
                .unwrap_or(1)
                .max(0) as u32,
            identity: TemplateIdentity::of_stateful_set(&as_json),
            placement: placement(&as_json),
        }
    }
}

/// Refuses a backup of another app or StatefulSet unless the Restore allows it.
pub fn check_same_app(
    manifest: &Manifest,
    target: &TargetSet,
    allowed: bool,
) -> Result<(), Refusal> {
    let recorded = recorded_set(manifest).unwrap_or(&manifest.app);
    if allowed || (manifest.app == target.app && recorded == target.name) {
        return Ok(());
    }
    Err(refuse(
        "AppMismatch",
        format!(
            "the backup is of StatefulApp {} (StatefulSet {recorded}) in namespace {}, the target is StatefulApp {} (StatefulSet {}): set spec.target.allowOtherApp: true to restore it into {} anyway (only {}'s own claims are written)",
            manifest.app, manifest.namespace, target.app, target.name, target.app, target.name
        ),
    ))
}

fn recorded_set(manifest: &Manifest) -> Option<&str> {
    manifest
        .stateful_set
        .pointer("/metadata/name")
        .and_then(|n| n.as_str())
}

/// A backed-up volume mapped onto one of the target's claims.
#[derive(Debug, Clone, PartialEq)]
pub struct Mapping {
    pub entry: Entry,
    /// `<template>-<target sts>-<ordinal>`.
    pub claim: String,
}

/// Maps every volume of a backup onto the target StatefulSet's own claims: the entry's
/// template and ordinal (parsed against the *recorded* StatefulSet's name and templates)
/// name the target's claim `<template>-<target>-<ordinal>`. A claim named in the manifest
/// is never written as such. Refused: an entry not named after a recorded template, a
/// template the target lacks, an ordinal the target does not run, two entries onto one
/// claim, a claim that does not exist. Returned beside the mappings: what stays as it is.
pub fn map_volumes(
    manifest: &Manifest,
    target: &TargetSet,
    existing_claims: &[String],
) -> Result<(Vec<Mapping>, Vec<String>), Refusal> {
    let recorded = recorded_set(manifest).unwrap_or(&manifest.app).to_string();
    let templates = template_names(&manifest.stateful_set);
    let mut mapped: Vec<Mapping> = Vec::new();
    for entry in &manifest.entries {
        let (template, ordinal) = claim_parts(&entry.name, &recorded, &templates).ok_or_else(|| {
            refuse(
                "UnknownVolume",
                format!("the backup's PVC {} is not named after a volumeClaimTemplate of its StatefulSet {recorded}", entry.name),
            )
        })?;
        let claim = target_claim(target, template, ordinal, &entry.name)?;
        if mapped.iter().any(|m| m.claim == claim) {
            return Err(refuse(
                "DuplicateVolume",
                format!(
                    "the backup lists two volumes for PVC {claim}: the manifest is inconsistent"
                ),
            ));
        }
        if !existing_claims.contains(&claim) {
            return Err(refuse(
                "TargetVolumeMissing",
                format!(
                    "PVC {claim} (for the backup's {}) does not exist: start StatefulSet {} at {} replica(s) once so it creates its claims, or restore into a clone",
                    entry.name,
                    target.name,
                    ordinal + 1
                ),
            ));
        }
        mapped.push(Mapping {
            entry: entry.clone(),
            claim,
        });
    }
    let mut untouched = Vec::new();
    for template in &target.templates {
        for ordinal in 0..target.replicas {
            let claim = format!("{template}-{}-{ordinal}", target.name);
            if !mapped.iter().any(|m| m.claim == claim) {
                untouched.push(format!(
                    "PVC {claim} is not in the backup and stays as it is"
                ));
            }
        }
    }
    Ok((mapped, untouched))
}

/// The target's claim for a recorded template and ordinal, or why there is none.
fn target_claim(
    target: &TargetSet,
    template: &str,
    ordinal: u32,
    what: &str,
) -> Result<String, Refusal> {
    if !target.templates.iter().any(|t| t == template) {
        return Err(refuse(
            "TemplateMismatch",
            format!(
                "the backup's {what} belongs to volumeClaimTemplate {template}, which StatefulSet {} does not have (its templates: {}): a restore writes only claims of the target's own templates",
                target.name,
                if target.templates.is_empty() {
                    "none".to_string()
                } else {
                    target.templates.join(", ")
                }
            ),
        ));
    }
    if ordinal >= target.replicas {
        return Err(refuse(
            "TooFewReplicas",
            format!(
                "the backup's {what} is ordinal {ordinal}, but StatefulSet {} runs {} replica(s): scale it to at least {} first, or restore into a clone",
                target.name,
                target.replicas,
                ordinal + 1
            ),
        ));
    }
    Ok(format!("{template}-{}-{ordinal}", target.name))
}

/// The ordinal of a dump's pod, parsed against the recorded StatefulSet's name.
fn dump_ordinal(entry: &Entry, recorded: &str) -> Result<u32, Refusal> {
    entry
        .pod
        .strip_prefix(&format!("{recorded}-"))
        .and_then(|o| o.parse::<u32>().ok())
        .ok_or_else(|| {
            refuse(
                "UnknownPod",
                format!("dump of pod {} is not a pod of {recorded}", entry.pod),
            )
        })
}

fn item(entry: &Entry, target: String) -> Item {
    Item {
        entry: entry.clone(),
        target,
        access: None,
        as_file: None,
        also_remove: Vec::new(),
        extra_files: Vec::new(),
    }
}

/// Decides the mode and the items: the backup must be of the target app (or the Restore
/// allows another), every item writes only the target's own claims or pods, and each
/// volume item's agents run as the data allows (see [`crate::access`]) — all before
/// anything is stopped.
pub fn plan(
    restore: &Restore,
    manifest: &Manifest,
    app: &StatefulApp,
    target: &TargetSet,
    existing_claims: &[String],
) -> Result<Plan, Refusal> {
    let mut out = plan_items(restore, manifest, app, target, existing_claims)?;
    if out.mode != RestoreMode::Exec {
        let clone = out.mode == RestoreMode::Clone;
        out.placement = if clone {
            placement(&manifest.stateful_set)
        } else {
            target.placement.clone()
        };
        // A clone's StatefulSet is the recorded one; in place, the live one.
        let template = if clone {
            TemplateIdentity::of_stateful_set(&manifest.stateful_set)
        } else {
            target.identity
        };
        let data_access = app.spec.data_access.clone().unwrap_or_default();
        for item in &mut out.items {
            item.access = Some(crate::access::volume_access(
                &item.entry,
                item.as_file.is_some(),
                &data_access,
                template,
                clone,
            )?);
        }
    }
    Ok(out)
}

fn plan_items(
    restore: &Restore,
    manifest: &Manifest,
    app: &StatefulApp,
    target: &TargetSet,
    existing_claims: &[String],
) -> Result<Plan, Refusal> {
    let clone = restore.spec.target.clone_stateful_set_name.as_deref();
    let exec: Option<&ExecSpec> = app.spec.backup.as_ref().and_then(|b| b.exec.as_ref());
    let container = exec.and_then(|e| e.container.clone());
    let restore_command = exec.map(|e| e.restore_command.clone()).unwrap_or_default();
    if manifest.entries.is_empty() {
        return Err(refuse("EmptyBackup", "the backup's manifest lists no data"));
    }
    check_same_app(manifest, target, restore.spec.target.allow_other_app)?;
    let recorded_sts = recorded_set(manifest).unwrap_or(&manifest.app).to_string();
    let templates = template_names(&manifest.stateful_set);
    let mode = if clone.is_some() {
        RestoreMode::Clone
    } else {
        RestoreMode::InPlace
    };
    let mut out = Plan {
        mode,
        items: Vec::new(),
        clone_claims: BTreeMap::new(),
        container,
        restore_command,
        untouched: Vec::new(),
        placement: Value::Null,
    };
    if manifest.method == "Exec" {
        let file = exec.and_then(|e| e.restore_file.as_ref());
        if clone.is_none() && file.is_none() && !out.restore_command.is_empty() {
            // Streamed into the running app: only into the target StatefulSet's own pods.
            out.mode = RestoreMode::Exec;
            for entry in &manifest.entries {
                let ordinal = dump_ordinal(entry, &recorded_sts)?;
                if ordinal >= target.replicas {
                    return Err(refuse(
                        "TooFewReplicas",
                        format!(
                            "the backup's dump of pod {} is ordinal {ordinal}, but StatefulSet {} runs {} replica(s)",
                            entry.pod, target.name, target.replicas
                        ),
                    ));
                }
                out.items
                    .push(item(entry, format!("{}-{ordinal}", target.name)));
            }
            return Ok(out);
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
        for entry in &manifest.entries {
            let ordinal = dump_ordinal(entry, &recorded_sts)?;
            let claim = match clone {
                Some(clone) => {
                    let claim = format!("{}-{clone}-{ordinal}", file.volume);
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
                    out.clone_claims.insert(claim.clone(), recorded);
                    claim
                }
                None => {
                    let claim = target_claim(
                        target,
                        &file.volume,
                        ordinal,
                        &format!("dump of pod {}", entry.pod),
                    )?;
                    if !existing_claims.contains(&claim) {
                        return Err(refuse(
                            "TargetVolumeMissing",
                            format!(
                                "PVC {claim} (volume {} of pod {}-{ordinal}) does not exist",
                                file.volume, target.name
                            ),
                        ));
                    }
                    claim
                }
            };
            out.items.push(Item {
                as_file: Some(file.path.clone()),
                also_remove: file.also_remove.clone(),
                extra_files: file
                    .files
                    .iter()
                    .map(|f| format!("{}={}", f.path, f.content))
                    .collect(),
                ..item(entry, claim)
            });
        }
        return Ok(out);
    }
    let Some(clone) = clone else {
        let (mapped, untouched) = map_volumes(manifest, target, existing_claims)?;
        out.items = mapped
            .into_iter()
            .map(|m| item(&m.entry, m.claim))
            .collect();
        out.untouched = untouched;
        return Ok(out);
    };
    for entry in &manifest.entries {
        let (template, ordinal) =
            claim_parts(&entry.name, &recorded_sts, &templates).ok_or_else(|| {
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
        if out.clone_claims.insert(name.clone(), recorded).is_some() {
            return Err(refuse(
                "DuplicateVolume",
                format!(
                    "the backup lists two volumes for PVC {name}: the manifest is inconsistent"
                ),
            ));
        }
        out.items.push(item(entry, name));
    }
    Ok(out)
}

/// The plan as the user reads it in `status.plan` (before anything is touched, and as
/// the whole answer of a dry run). The space verdict compares each existing PVC's
/// capacity with what the agent will need; the agent still measures real free space
/// before it unpacks.
pub fn summary(
    plan: &Plan,
    target: &TargetSet,
    claims: &[k8s_openapi::api::core::v1::PersistentVolumeClaim],
) -> RestorePlanStatus {
    let mut notes = plan.untouched.clone();
    let mut verdicts = Vec::new();
    let writes: Vec<PlannedWrite> = plan
        .items
        .iter()
        .map(|item| {
            let bytes = item.entry.bytes_read;
            if plan.mode == RestoreMode::InPlace {
                let capacity = claims
                    .iter()
                    .find(|c| c.metadata.name.as_deref() == Some(item.target.as_str()))
                    .and_then(|c| c.status.as_ref()?.capacity.as_ref()?.get("storage").cloned())
                    .and_then(|q| stateward_runtime::quantity::quantity_bytes(&q.0));
                let needed = stateward_agent::swap::space_needed(bytes, item.entry.files.unwrap_or(0));
                verdicts.push(match capacity {
                    Some(capacity) if capacity >= needed => "Fits",
                    Some(capacity) => {
                        notes.push(format!(
                            "PVC {} holds {capacity} bytes; staging {} needs {needed} beside the old data: expand it first",
                            item.target, item.entry.name
                        ));
                        "TooSmall"
                    }
                    None => "Unknown",
                });
            }
            PlannedWrite {
                source: item.entry.name.clone(),
                object: item.entry.key.clone(),
                target: item.target.clone(),
                bytes: i64::try_from(bytes).unwrap_or(i64::MAX),
                agent: item.access.map(|(access, work)| agent_summary(access, work)),
            }
        })
        .collect();
    let space = ["TooSmall", "Unknown", "Fits"]
        .into_iter()
        .find(|v| verdicts.contains(v))
        .map(String::from);
    notes.truncate(256);
    RestorePlanStatus {
        mode: plan.mode,
        stops: (plan.mode == RestoreMode::InPlace).then(|| target.name.clone()),
        bytes: writes
            .iter()
            .map(|w| w.bytes)
            .fold(0i64, i64::saturating_add),
        writes,
        space,
        notes,
    }
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
    labels.insert(
        RESTORE_LABEL.into(),
        json!(names::label_value(&restore_name(restore))),
    );
    // Stateward made it: the manager policy admits creating only claims so labelled.
    labels.insert(MANAGED_BY_LABEL.into(), json!(MANAGED_BY_VALUE));
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

/// The clone StatefulSet: the recorded spec under the new name with `replicas`. Its
/// selector is only Stateward's clone label, and its pods carry only that label (plus
/// `managed-by`) unless the Restore keeps the app's labels: no Service, PodMonitor or
/// NetworkPolicy of the source app selects a clone pod, and the source's StatefulSet never
/// adopts one. `serviceName` names the clone itself, so clone pods get no DNS name under
/// the source's governing Service.
pub fn clone_stateful_set(recorded: &Value, name: &str, replicas: i32, restore: &Restore) -> Value {
    let mut sts = stateward_agent::manifest::trimmed(recorded);
    sts["metadata"]["name"] = json!(name);
    if let Some(meta) = sts.get_mut("metadata").and_then(|m| m.as_object_mut()) {
        meta.remove("namespace");
        let annotations = meta.entry("annotations").or_insert_with(|| json!({}));
        annotations[RESTORED_BY_ANNOTATION] = json!(restore_name(restore));
    }
    sts["spec"]["replicas"] = json!(replicas);
    sts["spec"]["serviceName"] = json!(name);
    sts["spec"]["selector"] = json!({"matchLabels": {CLONE_LABEL: name}});
    let labels = &mut sts["spec"]["template"]["metadata"]["labels"];
    if !restore.spec.target.keep_app_labels || !labels.is_object() {
        *labels = json!({MANAGED_BY_LABEL: MANAGED_BY_VALUE});
    }
    labels[CLONE_LABEL] = json!(name);
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

/// How a volume agent runs, as `status.plan` says it.
fn agent_summary(access: VolumeAccess, work: VolumeWork) -> String {
    match access {
        VolumeAccess::Owner(id) => format!(
            "uid {}, gid {}{}, no capability",
            id.user,
            id.group,
            id.fs_group
                .map(|g| format!(", fsGroup {g}"))
                .unwrap_or_default()
        ),
        VolumeAccess::Elevated => format!(
            "root with {}",
            stateward_agent::job::elevated_capabilities(work).join(", ")
        ),
    }
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
    /// The Job's `activeDeadlineSeconds` (staging, cut at the restore's deadline).
    pub deadline_seconds: Option<i64>,
    /// The ServiceAccount the agents run as (see `stateward_runtime::agent_rbac`).
    pub service_account: &'a str,
    /// The agent container's requests and limits (the chart's `agent.resources`).
    pub resources: Option<&'a k8s_openapi::api::core::v1::ResourceRequirements>,
    /// Where volume agents may run ([`Plan::placement`]).
    pub placement: &'a Value,
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
        // The download stops as soon as more than the recorded size arrives.
        "--bytes-stored".into(),
        entry.bytes_stored.to_string(),
        "--sha256".into(),
        entry.sha256.clone(),
    ]);
    if let Some(content) = &entry.content_sha256 {
        args.extend(["--content-sha256".into(), content.clone()]);
    }
    if encrypted {
        args.push("--decrypt".into());
    }
    if step != JobStep::Exec && matches!(item.access, Some((VolumeAccess::Elevated, _))) {
        args.push("--elevated".into());
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
        RESTORE_LABEL: names::label_value(&name),
        RESTORE_UID_LABEL: uid,
        STEP_LABEL: step.as_str(),
    });
    let mut spec = json!({
        "restartPolicy": "Never",
        "serviceAccountName": inputs.service_account,
        "automountServiceAccountToken": step == JobStep::Exec,
        "containers": [{
            "name": "agent",
            "image": inputs.agent_image,
            "args": args,
            "env": env,
            "terminationMessagePolicy": "File",
        }],
    });
    if let Some(resources) = inputs.resources {
        spec["containers"][0]["resources"] = json!(resources);
    }
    if step == JobStep::Exec {
        // It writes no volume, only streams into the app's restore command: Pod Security
        // `restricted`, as the image's own user.
        spec["securityContext"] = stateward_agent::job::restricted_pod();
        spec["containers"][0]["securityContext"] = stateward_agent::job::restricted_container();
    } else {
        // As the data's owner (or elevated when the app allows it and the data needs
        // it), decided by the plan; the pod is pinned by the scheduler to the volume's
        // node (the app is stopped, or the clone's volume is new).
        let (access, work) = item.access.unwrap_or((
            VolumeAccess::AGENT,
            VolumeWork::Restore {
                devices: false,
                setid: false,
            },
        ));
        let (pod_sc, container_sc) = stateward_agent::job::volume_contexts(access, work);
        spec["securityContext"] = pod_sc;
        spec["containers"][0]["securityContext"] = container_sc;
        spec["containers"][0]["volumeMounts"] = json!([{"name": "target", "mountPath": "/target"}]);
        if let Some(placement) = inputs.placement.as_object() {
            for (key, value) in placement {
                spec[key.as_str()] = value.clone();
            }
        }
        spec["volumes"] =
            json!([{"name": "target", "persistentVolumeClaim": {"claimName": item.target}}]);
    }
    // A swap Job is owned by nobody: a foreground deletion of the Restore (which deletes
    // owned dependents first) must never kill a swap half-way. The Restore's finalizer
    // deletes it once the Restore has ended.
    let owners = if step == JobStep::Swap {
        json!([])
    } else {
        json!([{
            "apiVersion": "stateward.io/v1alpha1",
            "kind": "Restore",
            "name": name,
            "uid": restore.metadata.uid.clone().unwrap_or_default(),
            "controller": true,
            "blockOwnerDeletion": true,
        }])
    };
    json!({
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": job_name(&name, step, index),
            "labels": labels,
            "annotations": {RESTORE_NAME_ANNOTATION: name},
            "ownerReferences": owners,
        },
        "spec": {
            // A crash of the agent (or its node) is retried: every step is idempotent
            // (a journaled swap rolls forward); a refusal (exit 2) is final.
            "backoffLimit": if step == JobStep::Exec { 0 } else { 3 },
            "activeDeadlineSeconds": inputs.deadline_seconds,
            "podFailurePolicy": {"rules": [{"action": "FailJob", "onExitCodes": {"containerName": "agent", "operator": "In", "values": [EXIT_REFUSED]}}]},
            "template": {"metadata": {"labels": labels}, "spec": spec},
        },
    })
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
                "ownership": {"users": [0], "groups": [0]},
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

    fn target(app: &str, sts: &str, templates: &[&str], replicas: u32) -> TargetSet {
        TargetSet {
            app: app.into(),
            name: sts.into(),
            templates: templates.iter().map(|t| t.to_string()).collect(),
            replicas,
            identity: TemplateIdentity::default(),
            placement: Value::Null,
        }
    }

    fn db() -> TargetSet {
        target("db", "db", &["data"], 2)
    }

    #[test]
    fn volumes_map_onto_the_targets_own_claims() {
        let two = manifest("Volume", &[("data-db-0", "db-0"), ("data-db-1", "db-1")]);
        let one = manifest("Volume", &[("data-db-0", "db-0")]);
        let odd = manifest("Volume", &[("other-db-0", "db-0")]);
        let twice = manifest("Volume", &[("data-db-0", "db-0"), ("data-db-0", "db-0")]);
        let claims = |names: &[&str]| names.iter().map(|n| n.to_string()).collect::<Vec<_>>();
        let web_claims = claims(&["data-web-0", "data-web-1", "data-web-2", "data-db-0"]);
        // (manifest, target, existing claims) → Ok(claims written) or Err(reason)
        type Row<'a> = (
            &'a str,
            &'a Manifest,
            TargetSet,
            Vec<String>,
            Result<Vec<&'a str>, &'a str>,
        );
        let table: Vec<Row> = vec![
            (
                "same app",
                &two,
                db(),
                claims(&["data-db-0", "data-db-1"]),
                Ok(vec!["data-db-0", "data-db-1"]),
            ),
            (
                "renamed app: the target's claims, never db's",
                &two,
                target("web", "web", &["data"], 3),
                web_claims.clone(),
                Ok(vec!["data-web-0", "data-web-1"]),
            ),
            (
                "fewer ordinals than replicas: the rest stay",
                &one,
                target("web", "web", &["data"], 3),
                web_claims.clone(),
                Ok(vec!["data-web-0"]),
            ),
            (
                "more ordinals than replicas",
                &two,
                target("web", "web", &["data"], 1),
                web_claims.clone(),
                Err("TooFewReplicas"),
            ),
            (
                "a template the target lacks",
                &two,
                target("web", "web", &["pgdata"], 2),
                claims(&["pgdata-web-0", "pgdata-web-1"]),
                Err("TemplateMismatch"),
            ),
            (
                "a claim not named after a recorded template",
                &odd,
                db(),
                claims(&["data-db-0"]),
                Err("UnknownVolume"),
            ),
            (
                "two entries onto one claim",
                &twice,
                db(),
                claims(&["data-db-0"]),
                Err("DuplicateVolume"),
            ),
            (
                "the claim does not exist",
                &two,
                db(),
                claims(&["data-db-0"]),
                Err("TargetVolumeMissing"),
            ),
            (
                "no templates at all",
                &one,
                target("web", "web", &[], 1),
                web_claims.clone(),
                Err("TemplateMismatch"),
            ),
        ];
        for (why, manifest, target, existing, expected) in table {
            let got = map_volumes(manifest, &target, &existing)
                .map(|(m, _)| m.into_iter().map(|m| m.claim).collect::<Vec<_>>())
                .map_err(|r| r.reason);
            let expected = expected.map(|v| v.into_iter().map(String::from).collect::<Vec<_>>());
            assert_eq!(got, expected, "{why}");
        }
        let (_, untouched) =
            map_volumes(&one, &target("web", "web", &["data"], 3), &web_claims).unwrap();
        assert_eq!(
            untouched.len(),
            2,
            "data-web-1 and data-web-2 are named: {untouched:?}"
        );
    }

    #[test]
    fn a_backup_of_another_app_is_refused_unless_allowed() {
        let m = manifest("Volume", &[("data-db-0", "db-0")]);
        let web = target("web", "web", &["data"], 1);
        let claims = vec!["data-web-0".to_string(), "data-db-0".to_string()];
        let refused = plan(&restore("{app: web}"), &m, &app(""), &web, &claims).unwrap_err();
        assert_eq!(refused.reason, "AppMismatch");
        assert!(
            refused.message.contains("StatefulApp db")
                && refused.message.contains("StatefulApp web"),
            "{refused:?}"
        );
        let allowed = plan(
            &restore("{app: web, allowOtherApp: true}"),
            &m,
            &app(""),
            &web,
            &claims,
        )
        .unwrap();
        assert_eq!(
            allowed
                .items
                .iter()
                .map(|i| i.target.as_str())
                .collect::<Vec<_>>(),
            ["data-web-0"]
        );
        // Same app name, another StatefulSet: still another app's data.
        let other_sts = target("db", "db-v2", &["data"], 1);
        let refused = plan(
            &restore("{app: db}"),
            &m,
            &app(""),
            &other_sts,
            &["data-db-v2-0".into()],
        )
        .unwrap_err();
        assert_eq!(refused.reason, "AppMismatch");
    }

    #[test]
    fn dumps_go_only_to_the_target_statefulsets_pods() {
        let m = manifest("Exec", &[("db-0", "db-0")]);
        let exec = app(", method: Exec, exec: {command: [dump], restoreCommand: [load]}");
        let web = target("web", "web", &["data"], 1);
        let p = plan(
            &restore("{app: web, allowOtherApp: true}"),
            &m,
            &exec,
            &web,
            &[],
        )
        .unwrap();
        assert_eq!(
            (p.mode, p.items[0].target.as_str()),
            (RestoreMode::Exec, "web-0")
        );
        let none = plan(
            &restore("{app: web, allowOtherApp: true}"),
            &m,
            &exec,
            &target("web", "web", &["data"], 0),
            &[],
        )
        .unwrap_err();
        assert_eq!(none.reason, "TooFewReplicas");
    }

    #[test]
    fn in_place_writes_the_recorded_claims_and_refuses_missing_ones() {
        let m = manifest("Volume", &[("data-db-0", "db-0"), ("data-db-1", "db-1")]);
        let claims = vec!["data-db-0".to_string(), "data-db-1".to_string()];
        let p = plan(&restore("{app: db}"), &m, &app(""), &db(), &claims).unwrap();
        assert_eq!(p.mode, RestoreMode::InPlace);
        assert_eq!(
            p.items
                .iter()
                .map(|i| i.target.as_str())
                .collect::<Vec<_>>(),
            ["data-db-0", "data-db-1"]
        );
        let refused = plan(&restore("{app: db}"), &m, &app(""), &db(), &claims[..1]).unwrap_err();
        assert_eq!(refused.reason, "TargetVolumeMissing");
        assert!(refused.message.contains("data-db-1"), "{refused:?}");
    }

    /// Only a clone that asks for its StatefulSet is refused when the operator runs
    /// without clone StatefulSets; everything else runs either way.
    #[test]
    fn turned_off_refuses_only_a_clone_statefulset_the_operator_cannot_create() {
        let with_set = restore("{app: db, cloneStatefulSetName: db-copy, createStatefulSet: true}");
        let claims_only = restore("{app: db, cloneStatefulSetName: db-copy}");
        let in_place = restore("{app: db}");
        for (r, feature_on, refused) in [
            (&with_set, false, true),
            (&with_set, true, false),
            (&claims_only, false, false),
            (&in_place, false, false),
        ] {
            let refusal = turned_off(r, feature_on);
            assert_eq!(
                refusal.is_some(),
                refused,
                "{:?} on={feature_on}",
                r.spec.target
            );
            if let Some(refusal) = refusal {
                assert_eq!(refusal.reason, "FeatureDisabled");
                assert!(refusal.message.contains("spec.target.createStatefulSet"));
                assert!(refusal.message.contains("features.cloneStatefulSets"));
            }
        }
    }

    #[test]
    fn a_clone_names_claims_as_its_templates_would_and_copies_only_safe_spec_fields() {
        let m = manifest("Volume", &[("data-db-0", "db-0"), ("data-db-1", "db-1")]);
        let r = restore("{app: db, cloneStatefulSetName: db-copy, createStatefulSet: true}");
        let p = plan(&r, &m, &app(""), &db(), &[]).unwrap();
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
        assert_eq!(
            c0["metadata"]["labels"][MANAGED_BY_LABEL], MANAGED_BY_VALUE,
            "the manager policy admits only claims Stateward labels"
        );
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
            sts["spec"]["template"]["metadata"]["labels"],
            json!({CLONE_LABEL: "db-copy", MANAGED_BY_LABEL: MANAGED_BY_VALUE}),
            "no label a Service of the app selects"
        );
        assert_eq!(
            sts["spec"]["selector"],
            json!({"matchLabels": {CLONE_LABEL: "db-copy"}})
        );
        assert_eq!(sts["spec"]["serviceName"], "db-copy");
        assert_eq!(sts["spec"]["replicas"], 2);
        let kept = restore(
            "{app: db, cloneStatefulSetName: db-copy, createStatefulSet: true, keepAppLabels: true}",
        );
        let sts = clone_stateful_set(&m.stateful_set, "db-copy", 2, &kept);
        assert_eq!(
            sts["spec"]["template"]["metadata"]["labels"]["app"], "db",
            "kept on request"
        );
        assert_eq!(
            sts["spec"]["selector"],
            json!({"matchLabels": {CLONE_LABEL: "db-copy"}})
        );
    }

    #[test]
    fn dumps_stream_into_the_restore_command_or_land_as_a_file() {
        let m = manifest("Exec", &[("db-0", "db-0")]);
        let exec = app(", method: Exec, exec: {command: [dump], restoreCommand: [load]}");
        let p = plan(&restore("{app: db}"), &m, &exec, &db(), &[]).unwrap();
        assert_eq!(
            (p.mode, p.items[0].target.as_str()),
            (RestoreMode::Exec, "db-0")
        );
        let file = app(
            ", method: Exec, exec: {command: [dump], restoreFile: {volume: data, path: dump.rdb}}",
        );
        let p = plan(
            &restore("{app: db}"),
            &m,
            &file,
            &db(),
            &["data-db-0".into()],
        )
        .unwrap();
        assert_eq!(p.mode, RestoreMode::InPlace);
        assert_eq!(p.items[0].target, "data-db-0");
        assert_eq!(p.items[0].as_file.as_deref(), Some("dump.rdb"));
        let none = plan(
            &restore("{app: db}"),
            &m,
            &app(", method: Exec, exec: {command: [dump]}"),
            &db(),
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
    fn jobs_and_clone_claims_fit_kubernetes_limits_for_restore_names_of_every_length() {
        let m = manifest("Volume", &[("data-db-0", "db-0")]);
        let repo: BackupRepository = serde_yaml::from_str("apiVersion: stateward.io/v1alpha1\nkind: BackupRepository\nmetadata: {name: repo}\nspec: {s3: {bucket: bkt, credentials: {accessKeyId: {name: s, key: a}, secretAccessKey: {name: s, key: b}}}}").unwrap();
        let item = Item {
            entry: m.entries[0].clone(),
            target: "data-db-0".into(),
            as_file: None,
            also_remove: vec![],
            extra_files: vec![],
            access: None,
        };
        let recorded = recorded_claim(&m, "data-db-0").unwrap();
        for name in stateward_runtime::names::sample_names() {
            let mut r = restore("{app: db}");
            r.metadata.name = Some(name.clone());
            let inputs = JobInputs {
                restore: &r,
                repository: &repo,
                agent_image: "img",
                container: None,
                restore_command: &[],
                extra_env: &[],
                deadline_seconds: Some(600),
                service_account: "stateward-agent",
                resources: None,
                placement: &Value::Null,
            };
            let mut objects: Vec<Value> = [
                JobStep::Stage,
                JobStep::Swap,
                JobStep::Discard,
                JobStep::Exec,
            ]
            .into_iter()
            .map(|step| agent_job(&inputs, &item, 9, step))
            .collect();
            objects.push(clone_claim("data-copy-0", &recorded, &r));
            for object in &objects {
                names::check_object(object)
                    .unwrap_or_else(|e| panic!("restore name of {} characters: {e}", name.len()));
            }
            assert_eq!(
                objects[0]["metadata"]["annotations"][RESTORE_NAME_ANNOTATION], name,
                "the Job maps back to the full name"
            );
        }
    }

    #[test]
    fn data_one_user_cannot_write_back_is_refused_by_the_plan_unless_elevated() {
        let mut m = manifest("Volume", &[("data-db-0", "db-0")]);
        m.entries[0].ownership = Some(stateward_api::access::Ownership {
            users: vec![0, 999],
            groups: vec![999],
            ..Default::default()
        });
        let claims = ["data-db-0".to_string()];
        let refused = plan(&restore("{app: db}"), &m, &app(""), &db(), &claims);
        assert_eq!(
            refused.map(|_| ()).map_err(|r| r.reason),
            Err(crate::access::ELEVATED_REQUIRED)
        );
        let mut elevated = app("");
        elevated.spec.data_access = Some(stateward_api::access::DataAccess {
            elevated: true,
            ..Default::default()
        });
        let planned = plan(&restore("{app: db}"), &m, &elevated, &db(), &claims)
            .unwrap_or_else(|r| panic!("{r:?}"));
        let item = &planned.items[0];
        assert!(matches!(item.access, Some((VolumeAccess::Elevated, _))));
        let (r, repo) = (restore("{app: db}"), repository());
        let job = agent_job(&plain_inputs(&r, &repo), item, 0, JobStep::Stage);
        let container = &job["spec"]["template"]["spec"]["containers"][0];
        assert!(
            container["args"]
                .as_array()
                .is_some_and(|a| a.contains(&json!("--elevated")))
        );
        assert_eq!(
            container["securityContext"]["capabilities"]["add"],
            json!(["CHOWN", "FOWNER", "DAC_OVERRIDE"])
        );
    }

    fn repository() -> BackupRepository {
        serde_yaml::from_str("apiVersion: stateward.io/v1alpha1\nkind: BackupRepository\nmetadata: {name: repo}\nspec: {s3: {bucket: bkt, credentials: {accessKeyId: {name: s, key: a}, secretAccessKey: {name: s, key: b}}}}").unwrap()
    }

    /// Job inputs with no container, command, extra env or deadline.
    fn plain_inputs<'a>(r: &'a Restore, repo: &'a BackupRepository) -> JobInputs<'a> {
        JobInputs {
            restore: r,
            repository: repo,
            agent_image: "img",
            container: None,
            restore_command: &[],
            extra_env: &[],
            deadline_seconds: None,
            service_account: "stateward-agent",
            resources: None,
            placement: &Value::Null,
        }
    }

    #[test]
    fn volume_agents_run_where_the_app_may_and_with_the_charts_resources() {
        let sts = json!({"spec": {"template": {"spec": {
            "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "db", "effect": "NoSchedule"}],
            "nodeSelector": {"disk": "ssd"},
            "affinity": {
                "nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [{"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]}]}},
                "podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [{"topologyKey": "kubernetes.io/hostname", "labelSelector": {"matchLabels": {"app": "db"}}}]},
            },
        }}}});
        let placed = placement(&sts);
        assert_eq!(placed["nodeSelector"]["disk"], "ssd");
        assert_eq!(placed["tolerations"][0]["key"], "dedicated");
        assert!(placed["affinity"]["nodeAffinity"].is_object());
        assert!(
            placed["affinity"].get("podAntiAffinity").is_none(),
            "not the app's pod rules"
        );
        assert_eq!(placement(&json!({})), json!({}));
        let m = manifest("Volume", &[("data-db-0", "db-0")]);
        let mut target = db();
        target.placement = placed.clone();
        let planned = plan(
            &restore("{app: db}"),
            &m,
            &app(""),
            &target,
            &["data-db-0".to_string()],
        )
        .unwrap_or_else(|r| panic!("{r:?}"));
        assert_eq!(
            planned.placement, placed,
            "in place: the live StatefulSet's"
        );
        let (r, repo) = (restore("{app: db}"), repository());
        let resources: k8s_openapi::api::core::v1::ResourceRequirements =
            serde_yaml::from_str("requests: {cpu: 100m}\nlimits: {memory: 1Gi}").unwrap();
        let inputs = JobInputs {
            resources: Some(&resources),
            placement: &planned.placement,
            ..plain_inputs(&r, &repo)
        };
        for step in [JobStep::Stage, JobStep::Swap, JobStep::Exec] {
            let job = agent_job(&inputs, &planned.items[0], 0, step);
            let spec = &job["spec"]["template"]["spec"];
            assert_eq!(
                spec["containers"][0]["resources"]["limits"]["memory"], "1Gi",
                "{step:?}"
            );
            assert_eq!(
                spec["nodeSelector"]["disk"].as_str(),
                (step != JobStep::Exec).then_some("ssd"),
                "{step:?}: only volume agents follow the volume's app"
            );
        }
    }

    #[test]
    fn jobs_carry_checksums_and_stop_on_refusal() {
        let m = manifest("Volume", &[("data-db-0", "db-0")]);
        let (r, repo) = (restore("{app: db}"), repository());
        let inputs = plain_inputs(&r, &repo);
        let item = Item {
            entry: m.entries[0].clone(),
            target: "data-db-0".into(),
            as_file: None,
            also_remove: vec![],
            extra_files: vec![],
            access: None,
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
            "--bytes-stored",
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
