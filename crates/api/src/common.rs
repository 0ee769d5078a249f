//! Types shared by every kind.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::KubeSchema;
use serde::{Deserialize, Serialize};

/// API group of every Stateward kind.
pub const GROUP: &str = "stateward.io";
/// The one served version.
pub const VERSION: &str = "v1alpha1";
/// Label on everything Stateward creates.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
pub const MANAGED_BY_VALUE: &str = "stateward";
/// Label linking a Backup to its StatefulApp (Backups are not owned by the app: deleting
/// an app must never delete backup data by cascade).
pub const APP_LABEL: &str = "stateward.io/app";
/// Label naming the schedule that created a Backup.
pub const SCHEDULE_LABEL: &str = "stateward.io/schedule";
/// Annotation on a scheduled Backup: the slot (RFC 3339, UTC) it was created for.
pub const SCHEDULED_TIME_ANNOTATION: &str = "stateward.io/scheduled-time";
/// Annotation a parent operation (a scale-down that backs up first) sets on the Backup it
/// creates, with its operation-lock token, so the backup runs under the parent's lock
/// instead of waiting for it.
pub const PARENT_TOKEN_ANNOTATION: &str = "stateward.io/parent-operation-token";
/// Label a user sets (`"true"`) on a Backup that retention must never delete.
pub const KEEP_LABEL: &str = "stateward.io/keep";
/// Finalizer on a Backup with `deletionPolicy: Delete`: removed once its stored objects
/// are gone (or, when the repository cannot be reached, orphaned after a bounded wait).
pub const DATA_FINALIZER: &str = "stateward.io/delete-data";
/// On a StatefulSet the scaling controller stopped for another operation: the replica
/// count it comes back to (read by the restore controller too).
pub const STOPPED_REPLICAS_ANNOTATION: &str = "stateward.io/stopped-replicas";
/// Finalizer on a StatefulApp with `backupsOnDelete: Delete`: removed once its Backups
/// are deleted.
pub const BACKUPS_FINALIZER: &str = "stateward.io/delete-backups";

/// Conditions as a list-map keyed by `type`, so that each controller's server-side apply
/// owns only its own condition types.
pub type Conditions = Vec<Condition>;

/// A reference to a key of a Secret in the same namespace.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// Name of the Secret (same namespace as the referring object).
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key within the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

/// A Kubernetes duration such as `90s`, `15m`, `36h` or `7d`.
pub const DURATION_PATTERN: &str = r"^([0-9]+(s|m|h|d))+$";
