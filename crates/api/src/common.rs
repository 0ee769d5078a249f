//! Types shared by every kind.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::KubeSchema;
use kube::core::Rule;
use serde::{Deserialize, Serialize};

/// API group of every Stateward kind.
pub const GROUP: &str = "stateward.io";
/// The one served version.
pub const VERSION: &str = "v1alpha1";
/// Label on everything Stateward creates.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";

/// The label a Secret must carry (value `"true"`) before Stateward uses it as repository
/// credentials or encryption keys: whoever may edit a BackupRepository must not be able
/// to point it at any Secret of the namespace and have its value sent to an endpoint of
/// their choosing. The Secret's owner opts it in.
pub const REPOSITORY_SECRET_LABEL: &str = "stateward.io/repository-secret";
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
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// Name of the Secret (same namespace as the referring object).
    #[schemars(length(min = 1, max = 253), regex(pattern = DNS_SUBDOMAIN))]
    pub name: String,
    /// Key within the Secret.
    #[schemars(length(min = 1, max = 253), regex(pattern = SECRET_KEY))]
    pub key: String,
}

/// A DNS label (RFC 1123, at most 63 characters): the names of namespaces, containers,
/// volumeClaimTemplates and schedules.
pub const DNS_LABEL: &str = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$";
/// A DNS subdomain (RFC 1123, at most 253 characters): the names of StatefulSets,
/// Secrets and Stateward's own kinds, so every reference to one.
pub const DNS_SUBDOMAIN: &str =
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$";
/// A key of a Secret (Kubernetes' rule for Secret and ConfigMap keys).
pub const SECRET_KEY: &str = r"^[-._a-zA-Z0-9]+$";
/// A backup's path below a repository's prefix, `<namespace>/<app>/<backup>-<uid>`: three
/// name-shaped segments, so never `.`, `..`, an empty segment or a leading `-`.
pub const BACKUP_PATH: &str = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?/[a-z0-9]([-.a-z0-9]*[a-z0-9])?/[a-z0-9]([-.a-z0-9]*[a-z0-9])?$";

/// A path relative to a volume: non-empty segments, no control character, no leading `-`
/// (it becomes an agent argument). `.` and `..` segments are refused by a CEL rule.
pub const RELATIVE_PATH: &str = r"^[^-/[:cntrl:]][^/[:cntrl:]]*(/[^/[:cntrl:]]+)*$";

/// A duration such as `90s`, `15m`, `1h30m` or `7d`: each unit at most once, largest
/// first (what `stateward_runtime::schedule::parse_duration` reads).
pub const DURATION_PATTERN: &str = r"^([0-9]{1,5}d)?([0-9]{1,6}h)?([0-9]{1,7}m)?([0-9]{1,8}s)?$";

/// A CEL rule bounding a [`DURATION_PATTERN`] duration to `min..=max` seconds, so `0s`
/// or `9999d` is refused at admission instead of being replaced by a default later. A
/// value that does not match the pattern is left to the pattern's own error.
pub fn duration_rule(min_seconds: u64, max_seconds: u64) -> Rule {
    let part = |unit: char, factor: u64| {
        format!(
            "(self.find('[0-9]+{unit}') == '' ? 0 : int(self.find('[0-9]+{unit}').replace('{unit}', '')) * {factor})"
        )
    };
    let seconds = [
        part('d', 86_400),
        part('h', 3_600),
        part('m', 60),
        part('s', 1),
    ]
    .join(" + ");
    // The pattern has no quote or backslash, so it reads the same as a CEL string.
    let pattern = DURATION_PATTERN;
    Rule::new(format!(
        // The sum is spelled twice: CRD rules have no `cel.bind` on this API server.
        "!self.matches('{pattern}') || ({seconds} >= {min_seconds} && {seconds} <= {max_seconds})"
    ))
    .message(
        format!(
            "must be between {} and {}",
            human(min_seconds),
            human(max_seconds)
        )
        .as_str(),
    )
}

/// `86400` → `1d`, `90` → `90s`: the bounds as a user writes them.
fn human(seconds: u64) -> String {
    for (unit, factor) in [("d", 86_400), ("h", 3_600), ("m", 60)] {
        if seconds >= factor && seconds.is_multiple_of(factor) {
            return format!("{}{unit}", seconds / factor);
        }
    }
    format!("{seconds}s")
}
