//! `Backup`: one backup of one app.

use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use crate::common::{BACKUP_PATH, Conditions, DNS_SUBDOMAIN};
use crate::statefulapp::{BackupMethod, ReplicaSelection};

/// One backup of one StatefulApp. Its data lives in the app's repository under
/// `<prefix>/<namespace>/<app>/<backup>-<uid>/`; a backup without a committed manifest
/// does not exist.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "stateward.io",
    version = "v1alpha1",
    kind = "Backup",
    doc = "One backup of one StatefulApp.",
    namespaced,
    status = "BackupStatus",
    shortname = "bk",
    category = "stateward",
    printcolumn = r#"{"name":"App","type":"string","jsonPath":".spec.app"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Size","type":"integer","format":"int64","jsonPath":".status.storedBytes","description":"Bytes stored in the repository"}"#,
    printcolumn = r#"{"name":"Duration","type":"string","jsonPath":".status.duration"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = immutable_but_cancel())]
#[x_kube(validation = Rule::new("!has(self.importPath) || self.deletionPolicy != 'Delete'").message("an imported backup was made elsewhere: its data is never deleted with this object (use deletionPolicy: Retain)").field_path(".deletionPolicy"))]
#[x_kube(validation = Rule::new("!has(self.importPath) || (!has(self.method) && !has(self.replicas) && !has(self.activeDeadlineSeconds))").message("method, replicas and activeDeadlineSeconds mean nothing for an import: nothing runs").field_path(".importPath"))]
pub struct BackupSpec {
    /// Name of the StatefulApp (same namespace) to back up.
    #[schemars(length(min = 1, max = 253), regex(pattern = DNS_SUBDOMAIN))]
    pub app: String,
    /// Repository override (default: the app's `spec.backup.repository`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253), regex(pattern = DNS_SUBDOMAIN))]
    pub repository: Option<String>,
    /// Method override (default: the app's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<BackupMethod>,
    /// Replica selection override (default: the app's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<ReplicaSelection>,
    /// What happens to the stored data when this Backup is deleted: `Retain` (the
    /// default for a Backup created by hand) or `Delete` (what schedules set: a finalizer
    /// deletes the stored objects, the manifest first).
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,
    /// Upper bound, in seconds, for this run (default: the app's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 60, max = 604800))]
    pub active_deadline_seconds: Option<i64>,
    /// Set to true to cancel a running backup: its Jobs stop, uploads are aborted, no
    /// manifest is written and the Backup ends Failed with reason `Cancelled`. The only
    /// change a Backup's spec admits, and only to true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cancel: Option<bool>,
    /// Import instead of run: the path of a backup already in the repository, below its
    /// prefix (`<namespace>/<app>/<backup>-<uid>`, e.g. one made in another cluster or
    /// whose Backup object was deleted). Nothing runs: the Backup is completed from the
    /// backup's manifest, and can then be restored, listed and retained like any other.
    /// Another namespace's path needs the repository's `allowRestoreFromNamespaces`.
    /// An import takes neither `method`, `replicas`, `activeDeadlineSeconds` nor
    /// `deletionPolicy: Delete`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024), regex(pattern = BACKUP_PATH))]
    pub import_path: Option<String>,
}

/// The spec fields besides `app` and `cancel`: each must stay as it was (set or unset,
/// and to the same value) when `cancel` is set.
const FIXED_FIELDS: [&str; 6] = [
    "repository",
    "method",
    "replicas",
    "deletionPolicy",
    "activeDeadlineSeconds",
    "importPath",
];

/// A Backup's spec is immutable, except that `cancel` may be set to true (and then never
/// back): CEL cannot compare two objects minus one field, so the rule names every other
/// field (a unit test keeps [`FIXED_FIELDS`] complete).
fn immutable_but_cancel() -> kube::core::Rule {
    let same = FIXED_FIELDS
        .iter()
        .map(|f| {
            format!(
                "has(self.{f}) == has(oldSelf.{f}) && (!has(self.{f}) || self.{f} == oldSelf.{f})"
            )
        })
        .collect::<Vec<_>>()
        .join(" && ");
    kube::core::Rule::new(format!(
        "self == oldSelf || (has(self.cancel) && self.cancel && self.app == oldSelf.app && {same})"
    ))
    .message("a Backup's spec is immutable, except setting cancel: true")
}

/// What happens to stored data when a Backup object is deleted.
#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq,
)]
pub enum DeletionPolicy {
    /// Delete the stored data with the Backup (what schedules set).
    Delete,
    /// Keep the stored data; it can still be restored by repository path (default).
    #[default]
    Retain,
}

/// Phase of a backup run.
#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq,
)]
pub enum BackupPhase {
    #[default]
    Pending,
    Running,
    Completed,
    Failed,
}

/// Observed state of a Backup: the run's state machine, persisted so that a restarted
/// manager continues where it was.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct BackupStatus {
    /// Generation of the spec this status reflects.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Pending`, `Running`, `Completed` or `Failed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<BackupPhase>,
    /// Conditions of the run.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Conditions,
    /// When the run started (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<String>,
    /// When the run ended (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<String>,
    /// Human-readable duration of the run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration: Option<String>,
    /// Bytes stored in the repository (after compression and encryption).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stored_bytes: Option<i64>,
    /// Object key prefix of this backup in the repository.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub location: Option<String>,
    /// The repository this run writes to (the spec's override or the app's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repository: Option<String>,
    /// The method this run uses (the spec's override or the app's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<BackupMethod>,
    /// Pre- and post-hook results, in the order they ran.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["stage".into(), "name".into()]))]
    pub hooks: Vec<HookResult>,
    /// Per-volume (or per-pod for Exec) results.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 1000))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["name".into()]))]
    pub volumes: Vec<VolumeResult>,
}

/// The result of one volume (or one dump stream).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct VolumeResult {
    /// PVC name (Volume method) or pod name (Exec method).
    pub name: String,
    /// `Pending`, `Running`, `Completed` or `Failed`.
    #[serde(default)]
    pub phase: BackupPhase,
    /// Bytes read from the source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_read: Option<i64>,
    /// Bytes stored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_stored: Option<i64>,
    /// sha256 of the stored stream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// sha256 of the content before compression (the tar stream or the dump), checked
    /// again by a restore after decompressing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_sha256: Option<String>,
    /// Files archived (Volume method).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files: Option<i64>,
    /// Objects the data was stored in (more than one for a volume larger than one
    /// multipart upload).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub segments: Option<i64>,
    /// The app pod this volume belongs to (or the pod dumped).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    /// The node the agent Job ran on (the app pod's node).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// The agent Job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<String>,
    /// Object key of the stored data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// Seconds the agent took.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_seconds: Option<f64>,
    /// Who owned the archived files (Volume method), recorded in the manifest so a
    /// restore knows before it stops the app whether it needs elevated mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ownership: Option<crate::access::Ownership>,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// When a hook ran.
#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq,
)]
pub enum HookStage {
    #[default]
    Pre,
    Post,
}

/// The result of one hook, aggregated over the pods it runs in (in the run's pod order),
/// so status stays one entry per hook at any replica count. `started` is recorded before
/// each exec and `finished` after it: after a crash, a hook started but not finished is
/// counted as failed (per its `onError`), never run again.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HookResult {
    /// `Pre` or `Post`.
    pub stage: HookStage,
    /// The hook's name.
    pub name: String,
    /// Whether the hook succeeded in every pod it finished in so far.
    pub succeeded: bool,
    /// How many pods it runs in.
    #[serde(default)]
    pub pods: i32,
    /// In how many pods it was started (each at most once).
    #[serde(default)]
    pub started: i32,
    /// In how many pods it ended (succeeded, failed or interrupted).
    #[serde(default)]
    pub finished: i32,
    /// The pods where it failed (the first few; `failedCount` counts them all).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 10))]
    pub failed_pods: Vec<String>,
    /// In how many pods it failed.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub failed_count: i32,
    /// Sessions of a `holdUntilPostHook` pre-hook still held open (the manager holds them
    /// in memory: a restart while one is open loses the hold, and fails the run).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub held: i32,
    /// What went wrong first (exit code, timeout, last lines of stderr), or how a held
    /// session ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

fn is_zero(n: &i32) -> bool {
    *n == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The immutability rule names every spec field but `app` and `cancel`: a field added
    /// to the spec and not to [`FIXED_FIELDS`] could change with `cancel: true`.
    #[test]
    fn the_immutability_rule_covers_every_spec_field() -> Result<(), serde_json::Error> {
        let crd = serde_json::to_value(<Backup as kube::CustomResourceExt>::crd())?;
        let spec = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
        let mut fields: Vec<String> = spec["properties"]
            .as_object()
            .map(|p| p.keys().cloned().collect())
            .unwrap_or_default();
        fields.retain(|f| f != "app" && f != "cancel");
        fields.sort();
        let mut fixed: Vec<String> = FIXED_FIELDS.iter().map(|f| f.to_string()).collect();
        fixed.sort();
        assert_eq!(fields, fixed);
        Ok(())
    }
}
