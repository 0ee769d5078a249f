//! `Restore`: bring a backup back.

use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use crate::common::{BACKUP_PATH, Conditions, DNS_LABEL, DNS_SUBDOMAIN};

/// Restore a backup into the same app (in place) or into a new StatefulSet (a clone).
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "stateward.io",
    version = "v1alpha1",
    kind = "Restore",
    doc = "Restore of a backup, in place or into a clone.",
    namespaced,
    status = "RestoreStatus",
    shortname = "rst",
    category = "stateward",
    printcolumn = r#"{"name":"Source","type":"string","jsonPath":".spec.source.backup"}"#,
    printcolumn = r#"{"name":"Target","type":"string","jsonPath":".spec.target.app"}"#,
    printcolumn = r#"{"name":"Mode","type":"string","jsonPath":".status.mode"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Verified","type":"boolean","jsonPath":".status.verified"}"#,
    printcolumn = r#"{"name":"Duration","type":"string","jsonPath":".status.duration"}"#,
    printcolumn = r#"{"name":"Reason","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].reason","priority":1}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self == oldSelf").message("a Restore's spec is immutable: create a new Restore"))]
#[x_kube(validation = Rule::new("!self.target.createStatefulSet || has(self.target.cloneStatefulSetName)").message("target.createStatefulSet needs target.cloneStatefulSetName").field_path(".target.createStatefulSet"))]
pub struct RestoreSpec {
    /// What to restore: exactly one of `backup` or `repositoryPath`.
    pub source: RestoreSource,
    /// Where to restore it.
    pub target: RestoreTarget,
    /// Only plan: resolve the source, map every backed-up volume (or dump) onto the
    /// target, check free space, and write that plan into `status.plan`. Nothing is
    /// stopped, created or written, and the Restore ends `Completed` with reason `DryRun`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub dry_run: bool,
    /// How long the restore may take before its swap begins, in seconds, counted from its
    /// start (waiting for the lock, stopping the app, staging): past it the restore ends
    /// `Failed` with `DeadlineExceeded`, the staged data is discarded and the app comes
    /// back. Unset: the manager's default (`--restore-deadline-seconds`, 6 h). A swap that has
    /// begun is never cut short: it is journaled and quick.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 60, max = 604800))]
    pub active_deadline_seconds: Option<i64>,
}

/// The backup to restore.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.backup) != has(self.repositoryPath)").message("set exactly one of source.backup or source.repositoryPath"))]
pub struct RestoreSource {
    /// A Backup in this namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253), regex(pattern = DNS_SUBDOMAIN))]
    pub backup: Option<String>,
    /// A backup made elsewhere (another cluster, a deleted Backup with Retain), found by
    /// its path in a repository.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repository_path: Option<RepositoryPath>,
}

/// A backup's location in a repository.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RepositoryPath {
    /// Name of the BackupRepository (same namespace).
    #[schemars(length(min = 1, max = 253), regex(pattern = DNS_SUBDOMAIN))]
    pub repository: String,
    /// Path of the backup below the repository prefix: `<namespace>/<app>/<backup>-<uid>`.
    #[schemars(length(min = 1, max = 1024), regex(pattern = BACKUP_PATH))]
    pub path: String,
}

/// Where a backup is restored.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RestoreTarget {
    /// The StatefulApp to restore into (in place: its data is replaced; the old data is
    /// kept until the new data is in place).
    #[schemars(length(min = 1, max = 253), regex(pattern = DNS_SUBDOMAIN))]
    pub app: String,
    /// Clone instead: restore into fresh volumes named as this new StatefulSet's
    /// volumeClaimTemplates would name them (`<template>-<name>-<ordinal>`); the app's own
    /// data is untouched. At most 52 characters, so its pods' and PVCs' names (and the
    /// `controller-revision-hash` label) stay valid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 52),
        regex(pattern = DNS_LABEL)
    )]
    pub clone_stateful_set_name: Option<String>,
    /// With a clone, also create the StatefulSet from the spec recorded in the backup
    /// (renamed; its selector is only `stateward.io/clone: <name>` and its pods carry only
    /// that label, so neither the source's StatefulSet nor its Services select them; see
    /// `keepAppLabels`). Default: only the PVCs.
    #[serde(default)]
    pub create_stateful_set: bool,
    /// Restore a backup of another app (or of another StatefulSet) into this one — a
    /// disaster-recovery restore into a renamed app. Without it such a restore is refused
    /// with `AppMismatch`. Either way only the target's own claims are written: backed-up
    /// volumes map by volumeClaimTemplate name and ordinal onto the target StatefulSet.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_other_app: bool,
    /// With `createStatefulSet`: keep the source's pod labels on the clone's pods. By
    /// default a clone's pods carry only Stateward's clone labels, so no Service of the
    /// source app selects them and clients never reach the clone by accident.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub keep_app_labels: bool,
}

/// Phase of a restore.
#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq,
)]
pub enum RestorePhase {
    #[default]
    Pending,
    Running,
    Completed,
    Failed,
}

/// How a restore runs (decided from the backup's method and the target).
#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq,
)]
pub enum RestoreMode {
    /// The app is stopped (PVCs kept), every volume staged and verified, then swapped in,
    /// and the app started again.
    #[default]
    InPlace,
    /// Fresh volumes for a new StatefulSet name; the app is not touched.
    Clone,
    /// A dump streamed into the app's `restoreCommand` while it runs.
    Exec,
}

/// One volume (or one pod's dump) of a restore.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RestoreVolumeStatus {
    /// The backup entry (PVC or pod name in the backup).
    pub source: String,
    /// The PVC written (volume restores) or the pod fed (exec restores).
    pub target: String,
    /// `Pending`, `Staging`, `Staged`, `Swapping`, `Completed`, `Failed`.
    pub phase: String,
    /// Stored and content checksums both matched.
    #[serde(default)]
    pub verified: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_written: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_seconds: Option<f64>,
    /// A retry finished a swap that a crash interrupted.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub recovered: bool,
    /// This volume's agent pod never started (refused, unschedulable) and its Job was
    /// deleted: nothing of this restore touched the volume, so it needs no discard.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub agent_never_started: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// Observed state of a Restore.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RestoreStatus {
    /// Generation of the spec this status reflects.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Pending`, `Running`, `Completed` or `Failed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<RestorePhase>,
    /// Conditions of the restore.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Conditions,
    /// When the restore started (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<String>,
    /// When it ended (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<String>,
    /// How long it took, e.g. `42s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration: Option<String>,
    /// How it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<RestoreMode>,
    /// The backup restored: its path in the repository (`<namespace>/<app>/<backup>-<uid>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup_path: Option<String>,
    /// Every volume (or dump) verified against the manifest's checksums.
    #[serde(default)]
    pub verified: bool,
    /// Per volume (or per pod for exec restores).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256))]
    pub volumes: Vec<RestoreVolumeStatus>,
    /// The step in progress: `Resolving`, `WaitingForLock`, `Stopping`, `Staging`,
    /// `Swapping`, `Discarding`, `Starting`, `Done`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
    /// The replica count the app had before an in-place restore stopped it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_replicas: Option<i32>,
    /// What the restore does (or, with `dryRun`, would do): written before anything is
    /// touched.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan: Option<RestorePlanStatus>,
}

/// The plan of a restore, as a user checks it before (or instead of) running it.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RestorePlanStatus {
    /// How it runs.
    pub mode: RestoreMode,
    /// The StatefulSet stopped for the restore (in-place volume restores), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stops: Option<String>,
    /// One row per backed-up volume or dump.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256))]
    pub writes: Vec<PlannedWrite>,
    /// Bytes to unpack, over all rows.
    #[serde(default)]
    pub bytes: i64,
    /// Whether every target volume has room (only known for existing PVCs, from their
    /// capacity; `Unknown` otherwise — the agent checks real free space before staging).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub space: Option<String>,
    /// Backed-up volumes that are not restored, and target claims left as they are.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256))]
    pub notes: Vec<String>,
}

/// One volume (or dump) of a plan.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PlannedWrite {
    /// The backup's entry (the PVC or pod it came from).
    pub source: String,
    /// Its data object in the repository.
    pub object: String,
    /// The PVC written (new for a clone) or the pod fed (exec).
    pub target: String,
    /// Bytes to unpack.
    pub bytes: i64,
    /// How its volume agents run: `uid 999, gid 999, fsGroup 999` (restricted) or `root
    /// with CHOWN, FOWNER, DAC_OVERRIDE` (elevated). Absent for a dump fed to a pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
}
