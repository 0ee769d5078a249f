//! `Restore`: bring a backup back.

use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use crate::common::Conditions;

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
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self == oldSelf").message("a Restore's spec is immutable: create a new Restore"))]
pub struct RestoreSpec {
    /// What to restore: exactly one of `backup` or `repositoryPath`.
    pub source: RestoreSource,
    /// Where to restore it.
    pub target: RestoreTarget,
}

/// The backup to restore.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.backup) != has(self.repositoryPath)").message("set exactly one of source.backup or source.repositoryPath"))]
pub struct RestoreSource {
    /// A Backup in this namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
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
    #[schemars(length(min = 1, max = 253))]
    pub repository: String,
    /// Path of the backup below the repository prefix: `<namespace>/<app>/<backup>-<uid>`.
    #[schemars(length(min = 1, max = 1024), regex(pattern = r"^[^/]+/[^/]+/[^/]+$"))]
    pub path: String,
}

/// Where a backup is restored.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RestoreTarget {
    /// The StatefulApp to restore into (in place: its data is replaced; the old data is
    /// kept until the new data is in place).
    #[schemars(length(min = 1, max = 253))]
    pub app: String,
    /// Clone instead: create this new StatefulSet (from the manifest's recorded spec) and
    /// restore into its fresh volumes; the app's own data is untouched.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 52),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub clone_stateful_set_name: Option<String>,
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
}
