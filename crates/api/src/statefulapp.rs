//! `StatefulApp`: "manage this StatefulSet" — backup, scaling and monitoring policy.

use std::collections::BTreeMap;

use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use crate::common::{
    Conditions, DNS_LABEL, DNS_SUBDOMAIN, DURATION_PATTERN, RELATIVE_PATH, duration_rule,
};

/// Manage an existing StatefulSet: its backups (and their schedules), scaling and
/// monitoring. Each section is acted on by its own controller.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "stateward.io",
    version = "v1alpha1",
    kind = "StatefulApp",
    doc = "A StatefulSet managed by Stateward: backup, scaling and monitoring policy.",
    namespaced,
    status = "StatefulAppStatus",
    shortname = "sapp",
    category = "stateward",
    scale = r#"{"specReplicasPath":".spec.scaling.replicas","statusReplicasPath":".status.replicas","labelSelectorPath":".status.selector"}"#,
    printcolumn = r#"{"name":"StatefulSet","type":"string","jsonPath":".spec.statefulSetName"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.health.readyReplicas","description":"Ready replicas"}"#,
    printcolumn = r#"{"name":"Replicas","type":"integer","jsonPath":".status.replicas"}"#,
    printcolumn = r#"{"name":"Healthy","type":"string","jsonPath":".status.conditions[?(@.type==\"Healthy\")].status"}"#,
    printcolumn = r#"{"name":"Backups","type":"string","jsonPath":".status.conditions[?(@.type==\"BackupsHealthy\")].status"}"#,
    printcolumn = r#"{"name":"Last Backup","type":"date","jsonPath":".status.backup.lastSuccessfulTime"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    // A claim never shrinks: the size is compared with the largest one applied (kept in
    // status by the scaling controller), so unsetting it and then setting a smaller one
    // is refused too.
    validation = Rule::new("!has(self.spec.scaling) || !has(self.spec.scaling.storage) || !has(self.spec.scaling.storage.size) || !isQuantity(self.spec.scaling.storage.size) || !has(self.status) || !has(self.status.scaling) || !has(self.status.scaling.appliedSize) || !isQuantity(self.status.scaling.appliedSize) || quantity(self.spec.scaling.storage.size).compareTo(quantity(self.status.scaling.appliedSize)) >= 0").message("storage size can never shrink below the size already applied to the claims (status.scaling.appliedSize)").field_path(".spec.scaling.storage.size")
)]
#[serde(rename_all = "camelCase")]
pub struct StatefulAppSpec {
    /// Name of the StatefulSet (same namespace) this app manages. The StatefulSet is
    /// never recreated; Stateward attaches to it as it is.
    #[schemars(length(min = 1, max = 253), regex(pattern = DNS_SUBDOMAIN))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("statefulSetName is immutable: create another StatefulApp"))]
    pub stateful_set_name: String,
    /// Backup policy: repository, method, hooks and schedules.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup: Option<BackupPolicy>,
    /// Scaling policy: replicas, bounds, scale-down safety, storage size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scaling: Option<ScalingPolicy>,
    /// Monitoring policy: metrics endpoint, ServiceMonitor, alert rules.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub monitoring: Option<MonitoringPolicy>,
    /// What happens to this app's Backups (and their stored data) when the StatefulApp
    /// is deleted. `Retain` (default) keeps them; `Delete` deletes the Backup objects,
    /// whose own `deletionPolicy` then decides about the stored data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backups_on_delete: Option<BackupsOnDelete>,
    /// How the volume agents reach the data: its owner (found when unset) and the opt-in
    /// elevated mode for data one non-root user cannot write back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_access: Option<crate::access::DataAccess>,
}

/// What happens to an app's Backups when the app is deleted.
#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq,
)]
pub enum BackupsOnDelete {
    #[default]
    Retain,
    Delete,
}

/// How a backup copies the app's data.
#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq,
)]
pub enum BackupMethod {
    /// Copy the files of each PersistentVolumeClaim (mounted read-only by an agent Job).
    #[default]
    Volume,
    /// Run a command in the app container (`pg_dumpall`, `redis-cli --rdb -`) and store its
    /// standard output.
    Exec,
}

/// Which replicas a backup copies.
#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq,
)]
pub enum ReplicaSelection {
    /// Every replica's volumes (or dump).
    #[default]
    All,
    /// Only one replica (the lowest ordinal that is ready): enough for replicated data.
    One,
}

/// Backup policy of an app.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.method != 'Exec' || (has(self.exec) && size(self.exec.command) > 0)").message("method Exec requires exec.command").field_path(".exec").reason(Reason::FieldValueRequired))]
pub struct BackupPolicy {
    /// Name of the BackupRepository (same namespace) that stores the backups.
    #[schemars(length(min = 1, max = 253), regex(pattern = DNS_SUBDOMAIN))]
    pub repository: String,
    /// How data is copied: `Volume` (files of each PVC, default) or `Exec` (a dump command's
    /// output).
    #[serde(default)]
    pub method: BackupMethod,
    /// The dump command for the Exec method (and the command that loads it on restore).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exec: Option<ExecSpec>,
    /// Which replicas are backed up: `All` (default) or `One`.
    #[serde(default)]
    pub replicas: ReplicaSelection,
    /// Commands run in the app container before and after each backup, for consistency.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hooks: Option<Hooks>,
    /// Upper bound, in seconds, for one backup run; past it the run is stopped and Failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 60, max = 604800))]
    pub active_deadline_seconds: Option<i64>,
    /// Scheduled backups, keyed by name. Cron and time zone are fully checked by the
    /// backup controller; problems show as the `SchedulesValid` condition naming the
    /// schedule and field.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["name".into()]))]
    pub schedules: Vec<Schedule>,
}

/// A dump (and load) command run in the app container.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.restoreFile) || !has(self.restoreCommand) || size(self.restoreCommand) == 0").message("set restoreCommand or restoreFile, not both: a dump is restored one way").field_path(".restoreFile"))]
pub struct ExecSpec {
    /// Container to run in (default: the pod's first container).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63), regex(pattern = DNS_LABEL))]
    pub container: Option<String>,
    /// Command whose standard output is the backup, e.g. `[pg_dumpall, -U, postgres]`.
    #[schemars(length(min = 1, max = 64), inner(length(min = 1)))]
    pub command: Vec<String>,
    /// Command that reads a backup from standard input on restore, e.g. `[psql, -U, postgres]`.
    /// The app keeps running; the dump is verified in full before the command sees a byte.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(length(min = 1)))]
    pub restore_command: Vec<String>,
    /// Restore by placing the dump as a file the app loads on start (redis: `dump.rdb`),
    /// instead of a restore command: the app is stopped, the file swapped in on each
    /// pod's volume, and the app started again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore_file: Option<RestoreFile>,
}

/// A small file written with a restored dump.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RestoreFileContent {
    /// Path relative to the volume, under the same top-level entry as `restoreFile.path`.
    #[schemars(length(min = 1, max = 255), regex(pattern = RELATIVE_PATH))]
    #[x_kube(validation = Rule::new("!self.split('/').exists(p, p == '.' || p == '..')").message("restoreFile.files[].path must stay inside the volume: no . or .. segment"))]
    pub path: String,
    /// The file's content.
    #[schemars(length(max = 4096))]
    pub content: String,
}

/// Where a dump goes when it is restored as a file.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RestoreFile {
    /// The volumeClaimTemplate whose volume receives the file (e.g. `data`).
    #[schemars(length(min = 1, max = 63), regex(pattern = DNS_LABEL))]
    pub volume: String,
    /// The file's path, relative to that volume (e.g. `dump.rdb`; for redis with AOF,
    /// `appendonlydir/appendonly.aof.1.base.rdb`). The swap replaces its top-level entry
    /// as a whole.
    #[schemars(length(min = 1, max = 255), regex(pattern = RELATIVE_PATH))]
    #[x_kube(validation = Rule::new("!self.split('/').exists(p, p == '.' || p == '..')").message("restoreFile.path must stay inside the volume: no . or .. segment"))]
    pub path: String,
    /// Small files written beside it, in the same swap (redis with AOF: the manifest
    /// `appendonlydir/appendonly.aof.manifest` naming the restored file as the AOF base).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 8))]
    pub files: Vec<RestoreFileContent>,
    /// Other names at the volume root that go in the same swap, so the app cannot load
    /// them instead of the restored file (redis with AOF: `appendonlydir`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 16),
        inner(
            length(min = 1, max = 255),
            regex(pattern = r"^[^-/[:cntrl:]][^/[:cntrl:]]*$")
        )
    )]
    #[x_kube(validation = Rule::new("self.all(n, !n.contains('/') && n != '.' && n != '..' && n != 'lost+found')").message("restoreFile.alsoRemove holds names at the volume root"))]
    pub also_remove: Vec<String>,
}

/// Pre- and post-backup hooks.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Hooks {
    /// Run before the data is copied, in order. Names are unique (a list-map keyed by
    /// name): status records one result per hook.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 8))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["name".into()]))]
    pub pre: Vec<Hook>,
    /// Run after the copy, in order, also when the copy failed. Names are unique.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 8))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["name".into()]))]
    pub post: Vec<Hook>,
}

/// What to do when a hook fails.
#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq,
)]
pub enum OnError {
    /// Fail the backup (post-hooks still run).
    #[default]
    Fail,
    /// Record the failure and go on.
    Continue,
}

/// A command run in the app container around a backup.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Hook {
    /// Name shown in status and events.
    #[schemars(length(min = 1, max = 63), regex(pattern = r"^[^[:cntrl:]]+$"))]
    pub name: String,
    /// Container to run in (default: the pod's first container).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63), regex(pattern = DNS_LABEL))]
    pub container: Option<String>,
    /// The command (no shell unless you call one).
    #[schemars(length(min = 1, max = 64), inner(length(min = 1)))]
    pub command: Vec<String>,
    /// Seconds before the hook is considered failed.
    #[serde(default = "default_hook_timeout")]
    #[schemars(range(min = 1, max = 3600))]
    pub timeout_seconds: i32,
    /// `Fail` (default) or `Continue`.
    #[serde(default)]
    pub on_error: OnError,
    /// Keep this pre-hook's session open until the post-hooks ran (for a lock that must stay
    /// held while the data is copied, e.g. `FLUSH TABLES WITH READ LOCK`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub hold_until_post_hook: bool,
}

fn default_hook_timeout() -> i32 {
    60
}

/// What to do when a schedule fires while the previous run is still going.
#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq,
)]
pub enum ConcurrencyPolicy {
    /// Skip the new run (default).
    #[default]
    Forbid,
    /// Cancel the running backup and start the new one.
    Replace,
    /// Run both.
    Allow,
}

/// What to do with slots missed while the operator was down.
#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq,
)]
pub enum MissedRunPolicy {
    /// Run once for the most recent missed slot (default), never a burst.
    #[default]
    RunOnce,
    /// Skip missed slots; record them in status.
    Skip,
}

/// A scheduled backup.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Schedule {
    /// Unique name of the schedule within the app (a DNS label).
    #[schemars(
        length(min = 1, max = 40),
        regex(pattern = DNS_LABEL)
    )]
    pub name: String,
    /// Five-field cron expression (`minute hour day-of-month month day-of-week`) or a macro
    /// (`@hourly`, `@daily`, `@weekly`, `@monthly`, `@yearly`).
    #[schemars(
        length(min = 1, max = 100),
        regex(
            pattern = r"^(@(yearly|annually|monthly|weekly|daily|midnight|hourly)|(\S+\s+){4}\S+)$"
        )
    )]
    pub cron: String,
    /// IANA time zone the cron expression is read in (default `UTC`), e.g. `Europe/Paris`.
    /// Its shape is checked at admission; whether the zone exists, by the controller.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 64),
        regex(pattern = r"^[A-Za-z][-+_A-Za-z0-9]*(/[-+_A-Za-z0-9]+)*$")
    )]
    pub time_zone: Option<String>,
    /// Stop creating backups from this schedule (existing ones are kept).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub suspend: bool,
    /// `Forbid` (default), `Replace` or `Allow`.
    #[serde(default)]
    pub concurrency_policy: ConcurrencyPolicy,
    /// A slot not started within this many seconds counts as missed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 10, max = 86400))]
    pub starting_deadline_seconds: Option<i64>,
    /// `RunOnce` (default) or `Skip`.
    #[serde(default)]
    pub missed_run_policy: MissedRunPolicy,
    /// Spread start times by up to this many seconds, derived from the app's identity so
    /// it is stable (avoids a thousand apps firing in the same second).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 3600))]
    pub jitter_seconds: Option<i32>,
    /// Which backups of this schedule to keep. The newest successful backup is never
    /// deleted by retention.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention: Option<Retention>,
    /// Repository for this schedule's backups (default: the app's `backup.repository`),
    /// e.g. a cheaper bucket for the hourly schedule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253), regex(pattern = DNS_SUBDOMAIN))]
    pub repository: Option<String>,
    /// Method for this schedule's backups (default: the app's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<BackupMethod>,
    /// Replica selection for this schedule's backups (default: the app's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<ReplicaSelection>,
    /// Upper bound, in seconds, for each run of this schedule (default: the app's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 60, max = 604800))]
    pub active_deadline_seconds: Option<i64>,
}

/// Grandfather-father-son retention: a backup is kept when any rule keeps it.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.keepLast) || has(self.keepHourly) || has(self.keepDaily) || has(self.keepWeekly) || has(self.keepMonthly) || has(self.keepYearly)").message("retention needs at least one keep* rule"))]
pub struct Retention {
    /// Keep the newest N backups.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000))]
    pub keep_last: Option<u32>,
    /// Keep the newest backup of each of the last N hours.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000))]
    pub keep_hourly: Option<u32>,
    /// Keep the newest backup of each of the last N days.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000))]
    pub keep_daily: Option<u32>,
    /// Keep the newest backup of each of the last N weeks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000))]
    pub keep_weekly: Option<u32>,
    /// Keep the newest backup of each of the last N months.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000))]
    pub keep_monthly: Option<u32>,
    /// Keep the newest backup of each of the last N years.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100))]
    pub keep_yearly: Option<u32>,
}

/// Scaling policy of an app.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.minReplicas) || !has(self.maxReplicas) || self.minReplicas <= self.maxReplicas").message("minReplicas must not exceed maxReplicas").field_path(".minReplicas"))]
pub struct ScalingPolicy {
    /// Desired replicas. Unset (default), Stateward does not manage the StatefulSet's
    /// replicas and `/scale` is unavailable. Not bounded here so that an HPA write is never
    /// rejected: the scaling controller clamps to min/max and reports it. Never negative.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub replicas: Option<i32>,
    /// Lowest replica count the scaling controller will set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 1000))]
    pub min_replicas: Option<i32>,
    /// Highest replica count the scaling controller will set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000))]
    pub max_replicas: Option<i32>,
    /// Safety steps before a replica is removed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale_down: Option<ScaleDownPolicy>,
    /// How replicas are added.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale_up: Option<ScaleUpPolicy>,
    /// Volume size of the app's claims, and automatic expansion.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage: Option<StoragePolicy>,
}

/// What happens to a removed replica's volume. The StatefulSet's
/// `persistentVolumeClaimRetentionPolicy.whenScaled` is kept at `Retain` while Stateward
/// manages replicas, so the StatefulSet controller never deletes a volume before the
/// backup (`Delete` only during the removal of a replica under `Delete`).
#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq,
)]
pub enum RemovedVolumePolicy {
    /// Keep the PVC and label it `stateward.io/stale: "true"`: a later scale-up that would
    /// reattach it stops with `ScalingBlocked` (reason `StaleVolume`) until you delete the
    /// PVC (the replica starts empty) or remove the label (it starts from the old data).
    #[default]
    RetainStale,
    /// Delete the PVC with the pod (after the backup, when `backupFirst`): for that
    /// removal Stateward sets the StatefulSet's `whenScaled: Delete`, so the StatefulSet
    /// controller and the garbage collector delete it, then sets `Retain` again.
    Delete,
}

/// How replicas are added.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ScaleUpPolicy {
    /// Add one replica at a time and wait for it to be Ready before the next (default
    /// true); false adds them all at once.
    #[serde(default = "default_true")]
    pub wait_for_ready: bool,
}

/// Safety steps of a scale-down.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ScaleDownPolicy {
    /// Back up the replicas being removed first (default true).
    #[serde(default = "default_true")]
    pub backup_first: bool,
    /// Command run in each leaving replica before it goes (e.g. leave a cluster), with
    /// its timeout; a failure with `onError: Fail` stops the scale-down.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pre_scale_down_hook: Option<Hook>,
    /// `RetainStale` (default) or `Delete`.
    #[serde(default)]
    pub removed_volumes: RemovedVolumePolicy,
}

fn default_true() -> bool {
    true
}

/// Volume size of the app's claims.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.size) || !has(self.autoExpand) || !isQuantity(self.size) || !isQuantity(self.autoExpand.maxSize) || quantity(self.autoExpand.maxSize).compareTo(quantity(self.size)) >= 0").message("autoExpand.maxSize must be at least size").field_path(".autoExpand.maxSize"))]
pub struct StoragePolicy {
    /// Size every data claim should have (a quantity such as `20Gi`). It can only grow.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = Rule::new("isQuantity(self)").message("size must be a quantity such as 20Gi"))]
    #[x_kube(validation = Rule::new("!isQuantity(self) || quantity(self).isGreaterThan(quantity('0'))").message("size must be positive"))]
    #[x_kube(validation = Rule::new("!isQuantity(self) || !isQuantity(oldSelf) || quantity(self).compareTo(quantity(oldSelf)) >= 0").message("storage size can never shrink"))]
    pub size: Option<String>,
    /// Grow volumes automatically when they fill up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_expand: Option<AutoExpand>,
}

/// Automatic volume expansion.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AutoExpand {
    /// Expand when usage passes this percentage.
    #[serde(default = "default_threshold")]
    #[schemars(range(min = 50, max = 99))]
    pub threshold_percent: i32,
    /// Grow by this percentage of the current size each time.
    #[serde(default = "default_increment")]
    #[schemars(range(min = 5, max = 400))]
    pub increment_percent: i32,
    /// Never grow beyond this size (a quantity).
    #[schemars(length(min = 1, max = 32))]
    #[x_kube(validation = Rule::new("isQuantity(self)").message("maxSize must be a quantity such as 100Gi"))]
    #[x_kube(validation = Rule::new("!isQuantity(self) || quantity(self).isGreaterThan(quantity('0'))").message("maxSize must be positive"))]
    pub max_size: String,
    /// At most one expansion per this long, e.g. `1h` (default), so a runaway writer
    /// cannot grow the volume step after step. Between `10s` and `30d`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 2, max = 32), regex(pattern = DURATION_PATTERN))]
    #[x_kube(validation = duration_rule(10, 30 * 86_400))]
    pub cooldown: Option<String>,
}

fn default_threshold() -> i32 {
    80
}

fn default_increment() -> i32 {
    25
}

/// Monitoring policy of an app.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MonitoringPolicy {
    /// The app's own metrics port (for the ServiceMonitor), if it exposes one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub metrics_port: Option<i32>,
    /// Path of the app's metrics endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256), regex(pattern = "^/"))]
    pub metrics_path: Option<String>,
    /// Create a ServiceMonitor when the Prometheus Operator CRDs exist (default true).
    #[serde(default = "default_true")]
    pub service_monitor: bool,
    /// Create a PrometheusRule with Stateward's alerts when the CRDs exist (default true).
    #[serde(default = "default_true")]
    pub alert_rules: bool,
    /// The newest successful backup may be at most this old before `BackupsHealthy`
    /// turns False and alerts fire, e.g. `26h`. Between `1m` and `400d`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 2, max = 32), regex(pattern = DURATION_PATTERN))]
    #[x_kube(validation = duration_rule(60, 400 * 86_400))]
    pub backup_max_age: Option<String>,
}

/// Observed state, written section by section by the four controllers.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct StatefulAppStatus {
    /// Conditions (`Healthy`, `BackupsHealthy`, `SchedulesValid`, `Scaling`, ...), one
    /// writer per type.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Conditions,
    /// Replicas of the StatefulSet (for `/scale`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<i32>,
    /// Label selector of the app's pods as a string (for `/scale` and HPA).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    /// Written by the backup controller.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup: Option<BackupStatusSection>,
    /// Written by the restore controller while a restore runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore: Option<RestoreStatusSection>,
    /// Written by the scaling controller.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scaling: Option<ScalingStatusSection>,
    /// Written by the monitoring controller.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<HealthStatusSection>,
}

/// Backup section of an app's status.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct BackupStatusSection {
    /// Generation of the spec this section reflects.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Completion time of the newest successful backup (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_successful_time: Option<String>,
    /// Name of the newest successful Backup.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_successful_backup: Option<String>,
    /// Failed runs since the last success.
    #[serde(default)]
    pub consecutive_failures: i32,
    /// Per-schedule state, keyed by schedule name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub schedules: BTreeMap<String, ScheduleStatus>,
}

/// State of one schedule.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ScheduleStatus {
    /// The last slot a Backup was created for (RFC 3339, UTC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_scheduled_time: Option<String>,
    /// The Backup created for that slot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_backup: Option<String>,
    /// When the next Backup will be created (the next slot plus jitter; RFC 3339, UTC).
    /// Absent while suspended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_scheduled_time: Option<String>,
    /// Every slot up to this instant has been decided (fired or skipped); the scheduler's
    /// cursor, so that a restarted manager knows which slots it missed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decided_until: Option<String>,
    /// Whether the schedule is suspended.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub suspended: bool,
    /// Slots that passed without starting on time (the manager was down or slow), since
    /// the schedule was created.
    #[serde(default)]
    pub missed_runs: i64,
    /// Slots that created no Backup (missed and skipped, or forbidden by the concurrency
    /// policy), since the schedule was created.
    #[serde(default)]
    pub skipped_slots: i64,
    /// The last slot that created no Backup (RFC 3339, UTC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_skipped_time: Option<String>,
    /// Why that slot created no Backup.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_skip_reason: Option<String>,
    /// Backups of this schedule retention keeps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retained: Option<i32>,
    /// Backups retention deleted, since the schedule was created.
    #[serde(default)]
    pub pruned: i64,
    /// The Backups the last pruning pass deleted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 50))]
    pub last_pruned: Vec<String>,
    /// Backups retention would delete but has not: the mass-deletion breaker stopped the
    /// pass. Delete them by hand, or raise the manager's `--retention-max-deletions`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 50))]
    pub pending_prune: Vec<String>,
    /// A forecast: the Backups retention will delete once the next scheduled backup
    /// completes, so pruning never comes as a surprise.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 50))]
    pub next_to_prune: Vec<String>,
}

/// Restore section of an app's status.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RestoreStatusSection {
    /// Generation of the spec this section reflects.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The Restore currently running against this app.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_restore: Option<String>,
    /// The last Restore into this app that finished, and how.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_restore: Option<String>,
    /// `Completed` or `Failed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_restore_phase: Option<String>,
    /// When it finished (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_restore_time: Option<String>,
}

/// Scaling section of an app's status.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ScalingStatusSection {
    /// Generation of the spec this section reflects.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Replica count the controller is moving to (after clamping).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_replicas: Option<i32>,
    /// What the controller is doing (`Steady`, `ScalingUp`, `ScalingDown`, `Stopped`,
    /// `Unmanaged`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    /// Ready replicas of the StatefulSet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_replicas: Option<i32>,
    /// The scale-down in progress, persisted so a restarted manager resumes it without
    /// running a step twice.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operation: Option<ScaleOperation>,
    /// A scale-down that failed (backup or hook) is not retried until the spec changes:
    /// the generation it failed at.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed_generation: Option<i64>,
    /// The volume size in effect: `storage.size`, or larger after auto-expansion.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_size: Option<String>,
    /// The largest `storage.size` the controller has applied to the claims. Admission
    /// refuses a smaller `storage.size` (also one set again after being unset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32))]
    pub applied_size: Option<String>,
    /// When auto-expansion last grew the volumes (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_expansion: Option<String>,
    /// Claims not yet at the effective size, with what they wait for.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 1000))]
    pub pending_resize: Vec<String>,
    /// The StatefulSet being recreated with a larger volumeClaimTemplate (JSON), kept
    /// until it exists again, so a restart between the orphaning delete and the create
    /// never loses it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recreating: Option<String>,
}

/// A scale-down in progress.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ScaleOperation {
    /// The replica count being moved to.
    pub target: i32,
    /// The replica count it started from.
    #[serde(default)]
    pub from: i32,
    /// The ordinal being removed (its pod may still be terminating); its volumes get the
    /// removed-volume policy once the pod is gone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leaving: Option<i32>,
    /// The Backup taken before the first replica goes (`backupFirst`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup: Option<String>,
    /// Backups that failed before this one (a transient failure is retried, up to 3
    /// attempts, before the scale-down stops).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 3))]
    pub failed_backups: Vec<String>,
    /// Ordinals whose pre-scale-down hook succeeded.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 1000))]
    pub hooked: Vec<i32>,
    /// When it started (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started: Option<String>,
}

/// Health section of an app's status.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HealthStatusSection {
    /// Generation of the spec this section reflects.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Replicas the StatefulSet wants.
    #[serde(default)]
    pub desired_replicas: i32,
    /// Replicas that are ready.
    #[serde(default)]
    pub ready_replicas: i32,
    /// Pods that are not ready, with the reason.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 100))]
    pub unready_pods: Vec<UnreadyPod>,
    /// The age beyond which the newest backup counts as too old (`monitoring.backupMaxAge`,
    /// or twice the most frequent schedule's longest gap).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup_max_age_seconds: Option<i64>,
    /// Capacity of each of the app's PVCs, as the claims report it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256))]
    pub volumes: Vec<VolumeHealth>,
    /// Whether Stateward manages a PodMonitor and a PrometheusRule for the app.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub monitoring_objects: Option<String>,
}

/// A PVC of the app.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct VolumeHealth {
    /// PVC name.
    pub name: String,
    /// Capacity (`status.capacity.storage`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity: Option<String>,
    /// `Bound`, `Pending`, `Lost`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
}

/// A pod that is not ready.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct UnreadyPod {
    /// Pod name.
    pub name: String,
    /// Why it is not ready.
    #[serde(default)]
    pub reason: String,
}
