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
