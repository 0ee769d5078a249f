//! The scheduler: one reconcile per StatefulApp that fires its backup schedules, applies
//! their retention, and reports `status.backup`, `SchedulesValid` and `BackupsHealthy`.
//!
//! The pipeline, each step small:
//! 1. app deletion (`backupsOnDelete: Delete` deletes the app's Backups, via a finalizer);
//! 2. per schedule: parse → [`decide`] the slot → fire it under the concurrency policy
//!    → retention;
//! 3. the app-wide summary and conditions → one status write → requeue at the next slot.
//!
//! Backups are named from the slot's UTC instant (`<app>-<schedule>-<yyyymmddhhmm>`), so
//! re-deciding a slot after a crash, or a second manager deciding it, hits AlreadyExists
//! instead of creating a duplicate. Backups are not owned by the app (no cascade).

pub mod decide;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Api, Resource, ResourceExt};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use stateward_api::common::{
    APP_LABEL, BACKUPS_FINALIZER, DATA_FINALIZER, KEEP_LABEL, MANAGED_BY_LABEL, MANAGED_BY_VALUE,
    SCHEDULE_LABEL, SCHEDULED_TIME_ANNOTATION,
};
use stateward_api::restore::{Restore, RestorePhase};
use stateward_api::statefulapp::{
    BackupStatusSection, BackupsOnDelete, ConcurrencyPolicy, Schedule, ScheduleStatus, StatefulApp,
};
use stateward_api::{Backup, BackupPhase, BackupSpec, DeletionPolicy};
use stateward_runtime::schedule::{CronSchedule, ScheduleRef, backup_max_age, jitter};
use stateward_runtime::{Context, apply, conditions, names, time};

use crate::retention::{self, Candidate, State};
use decide::{DEFAULT_STARTING_DEADLINE, Decision, Input, decide};

/// Annotation on a Backup fired late under `missedRunPolicy: RunOnce`.
pub const CATCH_UP_ANNOTATION: &str = "stateward.io/catch-up";

/// Operator settings for the scheduler.
#[derive(Debug, Clone)]
pub struct ScheduleConfig {
    /// The longest timer: an app is looked at again after this even when nothing changed
    /// and no slot or `BackupsHealthy` flip is due (a safety net, not a trigger; every
    /// change arrives as a watch event).
    pub resync: Duration,
    /// The mass-deletion breaker: a retention pass that would delete more Backups of one
    /// schedule than this deletes none and reports them instead.
    pub max_deletions_per_pass: usize,
}

impl Default for ScheduleConfig {
    fn default() -> Self {
        Self {
            resync: Duration::from_secs(7 * 24 * 3600),
            max_deletions_per_pass: 10,
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ScheduleLabels {
    pub namespace: String,
    pub app: String,
    pub schedule: String,
}

/// `stateward_backup_*` families of the scheduler.
#[derive(Clone, Default)]
pub struct ScheduleMetrics {
    pub next_run: Family<ScheduleLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    pub missed_runs: Family<ScheduleLabels, Counter>,
    pub pruned: Family<ScheduleLabels, Counter>,
}

impl ScheduleMetrics {
    pub fn register(metrics: &stateward_runtime::metrics::Metrics) -> Self {
        let this = Self::default();
        metrics.register(
            "backup_next_run_timestamp_seconds",
            "When the schedule fires next (Unix time; absent while suspended)",
            this.next_run.clone(),
        );
        metrics.register(
            "backup_missed_runs",
            "Slots of the schedule that did not start on time",
            this.missed_runs.clone(),
        );
        metrics.register(
            "backup_pruned",
            "Backups of the schedule deleted by retention",
            this.pruned.clone(),
        );
        this
    }
}

/// The scheduler's context.
pub struct ScheduleContext {
    pub base: Context,
    pub config: ScheduleConfig,
    pub metrics: ScheduleMetrics,
    /// The shared watches (the app's Backups come from the index, Restores from the cache).
    pub stores: Arc<stateward_runtime::watch::Stores>,
}

#[derive(Debug, thiserror::Error)]
pub enum ScheduleError {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("encoding status: {0}")]
    Encode(#[from] serde_json::Error),
}

/// The reconcile entry point.
#[tracing::instrument(skip_all, fields(namespace = app.namespace().unwrap_or_default(), app = app.name_any()))]
pub async fn reconcile(
    app: Arc<StatefulApp>,
    ctx: Arc<ScheduleContext>,
) -> Result<Action, ScheduleError> {
    let timer = ctx.base.metrics.reconcile.start(CONTROLLER);
    let result = step(&app, &ctx).await;
    // The back-off resets only after a pass that succeeded: resetting it at the start of
    // a pass that then fails would retry a persistent error every second, forever.
    if result.is_ok() {
        let ns = app.namespace().unwrap_or_default();
        ctx.base
            .backoff
            .on_success(&format!("schedule/{ns}/{}", app.name_any()));
    }
    timer.finish(if result.is_ok() { "success" } else { "error" });
    result
}

/// The controller's name in metrics.
pub const CONTROLLER: &str = "backup-schedule";

/// Transient errors back off per app.
pub fn error_policy(
    app: Arc<StatefulApp>,
    err: &ScheduleError,
    ctx: Arc<ScheduleContext>,
) -> Action {
    let key = format!(
        "schedule/{}/{}",
        app.namespace().unwrap_or_default(),
        app.name_any()
    );
    tracing::warn!(app = %key, error = %err, "schedule reconcile failed");
    Action::requeue(
        ctx.base
            .backoff
            .on_error(&key, stateward_runtime::backoff::ErrorKind::Transient)
            .unwrap_or(Duration::from_secs(300)),
    )
}

async fn step(cached: &StatefulApp, ctx: &ScheduleContext) -> Result<Action, ScheduleError> {
    let ns = cached.namespace().unwrap_or_default();
    let apps: Api<StatefulApp> = Api::namespaced(ctx.base.client.clone(), &ns);
    // Fresh, not cached: the cursor in status must be the one we last wrote, or a slot
    // would be counted twice.
    let Some(app) = apps.get_opt(&cached.name_any()).await? else {
        return Ok(Action::await_change());
    };
    // From the index of the shared cache: deletions below carry preconditions, so a
    // stale entry makes a 409, never a wrong delete.
    let owned: Vec<Backup> = ctx
        .stores
        .backups_of_app(&ns, &app.name_any())
        .iter()
        .map(|b| b.as_ref().clone())
        .collect();
    if app.meta().deletion_timestamp.is_some() {
        return app_deleted(&app, &owned, ctx).await;
    }
    sync_app_finalizer(&app, ctx).await?;

    let now = ctx.base.clock.now();
    let in_use = restores_in_use(
        ctx.stores
            .restores
            .reader()
            .state()
            .iter()
            .filter(|r| r.namespace().as_deref() == Some(ns.as_str()))
            .map(|r| r.as_ref()),
    );
    let previous = app
        .status
        .as_ref()
        .and_then(|s| s.backup.clone())
        .unwrap_or_default();
    let mut section = BackupStatusSection {
        observed_generation: app.meta().generation,
        ..BackupStatusSection::default()
    };
    let mut invalid = Vec::new();
    let mut wake = now + chrono::Duration::from_std(ctx.config.resync).unwrap_or_default();
    let schedules = app
        .spec
        .backup
        .as_ref()
        .map(|b| b.schedules.clone())
        .unwrap_or_default();
    for schedule in &schedules {
        let mut state = previous
            .schedules
            .get(&schedule.name)
            .cloned()
            .unwrap_or_default();
        let labels = ScheduleLabels {
            namespace: ns.clone(),
            app: app.name_any(),
            schedule: schedule.name.clone(),
        };
        let parsed = match CronSchedule::parse(&schedule.cron, schedule.time_zone.as_deref()) {
            Ok(p) => p,
            Err(e) => {
                invalid.push(format!(
                    "spec.backup.schedules[{}].{}: {}",
                    schedule.name, e.field, e.message
                ));
                state.next_scheduled_time = None;
                ctx.metrics.next_run.remove(&labels);
                section.schedules.insert(schedule.name.clone(), state);
                continue;
            }
        };
        let decision = decide(&Input {
            schedule: &parsed,
            jitter: jitter(
                &format!("{ns}/{}/{}", app.name_any(), schedule.name),
                u32::try_from(schedule.jitter_seconds.unwrap_or(0)).unwrap_or(0),
            ),
            starting_deadline: schedule
                .starting_deadline_seconds
                .and_then(|s| u64::try_from(s).ok())
                .map(Duration::from_secs)
                .unwrap_or(DEFAULT_STARTING_DEADLINE),
            missed_run_policy: schedule.missed_run_policy,
            suspended: schedule.suspend,
            decided_until: state.decided_until.as_deref().and_then(parse_time),
            now,
        });
        let of_schedule: Vec<&Backup> = owned
            .iter()
            .filter(|b| b.labels().get(SCHEDULE_LABEL) == Some(&schedule.name))
            .collect();
        apply_decision(&app, schedule, &decision, &of_schedule, &mut state, ctx).await?;
        if decision.missed > 0 {
            ctx.metrics
                .missed_runs
                .get_or_create(&labels)
                .inc_by(decision.missed);
        }
        match decision.next_fire {
            Some(next) => {
                wake = wake.min(next);
                ctx.metrics
                    .next_run
                    .get_or_create(&labels)
                    .set(next.timestamp() as f64);
            }
            None => {
                ctx.metrics.next_run.remove(&labels);
            }
        }
        if let Some(rules) = &schedule.retention {
            // The listing above is enough: a Backup this pass created is Pending, which
            // retention never touches.
            prune(
                &app,
                schedule,
                rules,
                parsed.zone(),
                &of_schedule,
                &in_use,
                decision.next_fire,
                &mut state,
                &labels,
                ctx,
            )
            .await?;
        }
        section.schedules.insert(schedule.name.clone(), state);
    }
    // Schedules removed from the spec: forget their state and series.
    for name in previous.schedules.keys() {
        if !section.schedules.contains_key(name) {
            let labels = ScheduleLabels {
                namespace: ns.clone(),
                app: app.name_any(),
                schedule: name.clone(),
            };
            ctx.metrics.next_run.remove(&labels);
        }
    }
    summarize(&owned, &mut section);
    let old_conditions = app
        .status
        .as_ref()
        .map(|s| s.conditions.clone())
        .unwrap_or_default();
    let mut ours: Vec<Condition> = old_conditions
        .iter()
        .filter(|c| c.type_ == SCHEDULES_VALID || c.type_ == BACKUPS_HEALTHY)
        .cloned()
        .collect();
    let generation = app.meta().generation;
    let valid = conditions::condition(
        SCHEDULES_VALID,
        invalid.is_empty(),
        if invalid.is_empty() {
            "Valid"
        } else {
            "InvalidSchedule"
        },
        if invalid.is_empty() {
            format!("{} schedule(s) valid", schedules.len())
        } else {
            format!(
                "{}; these schedules do not fire until fixed",
                invalid.join("; ")
            )
        },
        generation,
    );
    let was = conditions::get(&old_conditions, SCHEDULES_VALID).map(|c| c.message.clone());
    if !invalid.is_empty() && was.as_deref() != Some(valid.message.as_str()) {
        publish(
            ctx,
            &app,
            EventType::Warning,
            "InvalidSchedule",
            valid.message.clone(),
        )
        .await;
    }
    conditions::set(&mut ours, valid, now);
    let healthy = backups_healthy(&app, &schedules, &section, now);
    if let Some(flip) = healthy_changes_at(&app, &schedules, &section, now) {
        wake = wake.min(flip);
    }
    conditions::set(&mut ours, healthy, now);

    let status = serde_json::json!({
        "conditions": ours,
        "backup": serde_json::to_value(&section)?,
    });
    apply::apply_status_if_changed(
        &apps,
        &app.name_any(),
        apply::managers::BACKUP,
        &STATUS_FIELDS,
        app.status.as_ref(),
        status,
    )
    .await?;
    let until = (wake - ctx.base.clock.now())
        .to_std()
        .unwrap_or_default()
        .clamp(Duration::from_secs(1), ctx.config.resync);
    Ok(Action::requeue(until))
}

const SCHEDULES_VALID: &str = "SchedulesValid";
const BACKUPS_HEALTHY: &str = "BackupsHealthy";

/// What the scheduler writes in an app's status.
const STATUS_FIELDS: apply::StatusFields = apply::StatusFields {
    keys: &["backup"],
    conditions: &[SCHEDULES_VALID, BACKUPS_HEALTHY],
};

fn not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 404)
}

fn parse_time(text: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(text)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

/// `<app>-<schedule>-<yyyymmddhhmm>` of the slot in UTC; the prefix is shortened (with a
/// hash) when needed so the name stays a DNS label and the instant stays readable.
pub fn backup_name(app: &str, schedule: &str, slot: DateTime<Utc>) -> String {
    let stamp = slot.format("%Y%m%d%H%M").to_string();
    let head = names::bounded(&format!("{app}-{schedule}"), 63 - stamp.len() - 1, false);
    format!("{head}-{stamp}")
}

fn phase(backup: &Backup) -> Option<BackupPhase> {
    backup.status.as_ref().and_then(|s| s.phase)
}

fn is_active(backup: &Backup) -> bool {
    backup.meta().deletion_timestamp.is_none()
        && !matches!(
            phase(backup),
            Some(BackupPhase::Completed | BackupPhase::Failed)
        )
}

/// Fires the decided slot (if any) under the concurrency policy, and records it.
async fn apply_decision(
    app: &StatefulApp,
    schedule: &Schedule,
    decision: &Decision,
    of_schedule: &[&Backup],
    state: &mut ScheduleStatus,
    ctx: &ScheduleContext,
) -> Result<(), ScheduleError> {
    state.suspended = schedule.suspend;
    state.decided_until = Some(time::rfc3339(decision.decided_until));
    state.next_scheduled_time = decision.next_fire.map(time::rfc3339);
    state.missed_runs += decision.missed as i64;
    if let Some(slot) = decision.skipped {
        state.skipped_slots += 1;
        state.last_skipped_time = Some(time::rfc3339(slot));
        state.last_skip_reason = Some(format!(
            "missed: not started within the starting deadline after its time (missedRunPolicy {:?})",
            schedule.missed_run_policy
        ));
    }
    if decision.missed > 0 {
        publish(
            ctx,
            app,
            EventType::Warning,
            "MissedRun",
            format!(
                "schedule {}: {} slot(s) up to {} did not start on time; {}",
                schedule.name,
                decision.missed,
                time::rfc3339(decision.decided_until),
                match decision.fire {
                    Some(_) => "running one catch-up backup (missedRunPolicy RunOnce)",
                    None => "skipped (missedRunPolicy Skip)",
                }
            ),
        )
        .await;
    }
    let Some(fire) = decision.fire else {
        return Ok(());
    };
    let name = backup_name(&app.name_any(), &schedule.name, fire.slot);
    let running: Vec<&&Backup> = of_schedule
        .iter()
        .filter(|b| is_active(b) && b.name_any() != name)
        .collect();
    if !running.is_empty() {
        let names: Vec<String> = running.iter().map(|b| b.name_any()).collect();
        match schedule.concurrency_policy {
            ConcurrencyPolicy::Forbid => {
                state.skipped_slots += 1;
                state.last_skipped_time = Some(time::rfc3339(fire.slot));
                let reason = format!(
                    "concurrencyPolicy Forbid: {} still running",
                    names.join(", ")
                );
                state.last_skip_reason = Some(reason.clone());
                publish(
                    ctx,
                    app,
                    EventType::Normal,
                    "SlotSkipped",
                    format!(
                        "schedule {}, slot {}: {reason}",
                        schedule.name,
                        time::rfc3339(fire.slot)
                    ),
                )
                .await;
                return Ok(());
            }
            ConcurrencyPolicy::Replace => {
                let api: Api<Backup> = Api::namespaced(
                    ctx.base.client.clone(),
                    &app.namespace().unwrap_or_default(),
                );
                for old in &names {
                    let patch = serde_json::json!({"spec": {"cancel": true}});
                    match api
                        .patch(old, &PatchParams::default(), &Patch::Merge(&patch))
                        .await
                    {
                        Ok(_) => {}
                        Err(e) if not_found(&e) => {}
                        Err(e) => return Err(e.into()),
                    }
                }
                publish(
                    ctx,
                    app,
                    EventType::Normal,
                    "Replaced",
                    format!(
                        "schedule {}: cancelled {} for slot {}",
                        schedule.name,
                        names.join(", "),
                        time::rfc3339(fire.slot)
                    ),
                )
                .await;
            }
            ConcurrencyPolicy::Allow => {}
        }
    }
    create_backup(app, schedule, &name, fire, ctx).await?;
    state.last_scheduled_time = Some(time::rfc3339(fire.slot));
    state.last_backup = Some(name);
    Ok(())
}

async fn create_backup(
    app: &StatefulApp,
    schedule: &Schedule,
    name: &str,
    fire: decide::Fire,
    ctx: &ScheduleContext,
) -> Result<(), ScheduleError> {
    let ns = app.namespace().unwrap_or_default();
    let mut backup = Backup::new(
        name,
        BackupSpec {
            app: app.name_any(),
            repository: schedule.repository.clone(),
            method: schedule.method,
            replicas: schedule.replicas,
            deletion_policy: DeletionPolicy::Delete,
            active_deadline_seconds: schedule.active_deadline_seconds,
            cancel: None,
            import_path: None,
        },
    );
    let meta = backup.meta_mut();
    meta.namespace = Some(ns.clone());
    meta.labels = Some(BTreeMap::from([
        (APP_LABEL.to_string(), names::label_value(&app.name_any())),
        (SCHEDULE_LABEL.to_string(), schedule.name.clone()),
        (MANAGED_BY_LABEL.to_string(), MANAGED_BY_VALUE.to_string()),
    ]));
    let mut annotations = BTreeMap::from([(
        SCHEDULED_TIME_ANNOTATION.to_string(),
        time::rfc3339(fire.slot),
    )]);
    if fire.catch_up {
        annotations.insert(CATCH_UP_ANNOTATION.to_string(), "true".into());
    }
    meta.annotations = Some(annotations);
    // In place from the start: the data a scheduled Backup writes goes with it.
    meta.finalizers = Some(vec![DATA_FINALIZER.to_string()]);
    let api: Api<Backup> = Api::namespaced(ctx.base.client.clone(), &ns);
    match api.create(&PostParams::default(), &backup).await {
        Ok(_) => {
            tracing::info!(backup = name, slot = %time::rfc3339(fire.slot), catch_up = fire.catch_up, "schedule fired");
            publish(
                ctx,
                app,
                EventType::Normal,
                "Scheduled",
                format!(
                    "schedule {}: created Backup {name} for slot {}{}",
                    schedule.name,
                    time::rfc3339(fire.slot),
                    if fire.catch_up { " (catch-up)" } else { "" }
                ),
            )
            .await;
            Ok(())
        }
        // Already fired (a retry after a crash, or another manager): the name is the slot.
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Backups used by a Restore that has not finished (retention must not touch them), of
/// the Restores given.
fn restores_in_use<'a>(restores: impl Iterator<Item = &'a Restore>) -> BTreeMap<String, String> {
    restores
        .filter(|r| {
            !matches!(
                r.status.as_ref().and_then(|s| s.phase),
                Some(RestorePhase::Completed | RestorePhase::Failed)
            )
        })
        .filter_map(|r| r.spec.source.backup.clone().map(|b| (b, r.name_any())))
        .collect()
}

/// The same, from a fresh LIST: asked right before retention deletes, since a Restore
/// created a moment ago may not be in the cache yet (and deleting is not undone).
async fn restores_in_use_now(
    client: &kube::Client,
    ns: &str,
) -> Result<BTreeMap<String, String>, ScheduleError> {
    let api: Api<Restore> = Api::namespaced(client.clone(), ns);
    match api.list(&ListParams::default()).await {
        Ok(l) => Ok(restores_in_use(l.items.iter())),
        // The Restore CRD may not be installed in a partial set-up: nothing is in use.
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(BTreeMap::new()),
        Err(e) => Err(e.into()),
    }
}

/// Applies one schedule's retention, under the mass-deletion breaker.
#[allow(clippy::too_many_arguments)]
async fn prune(
    app: &StatefulApp,
    schedule: &Schedule,
    rules: &stateward_api::statefulapp::Retention,
    zone: chrono_tz::Tz,
    backups: &[&Backup],
    in_use: &BTreeMap<String, String>,
    next_slot: Option<DateTime<Utc>>,
    state: &mut ScheduleStatus,
    labels: &ScheduleLabels,
    ctx: &ScheduleContext,
) -> Result<(), ScheduleError> {
    let candidates: Vec<Candidate> = backups
        .iter()
        .filter(|b| b.meta().deletion_timestamp.is_none())
        .map(|b| Candidate {
            name: b.name_any(),
            time: b
                .annotations()
                .get(SCHEDULED_TIME_ANNOTATION)
                .and_then(|t| parse_time(t))
                .or_else(|| b.meta().creation_timestamp.as_ref().map(time::to_chrono))
                .unwrap_or_default(),
            state: match phase(b) {
                Some(BackupPhase::Completed) => State::Completed,
                Some(BackupPhase::Failed) => State::Failed,
                _ => State::Active,
            },
            protected_by: if b.labels().get(KEEP_LABEL).map(String::as_str) == Some("true") {
                Some(format!("label {KEEP_LABEL}=true"))
            } else {
                in_use
                    .get(&b.name_any())
                    .map(|r| format!("used by Restore {r}"))
            },
        })
        .collect();
    let plan = retention::plan(&candidates, rules, zone);
    state.retained = Some(plan.keep.len() as i32);
    state.next_to_prune = forecast(&candidates, &plan, rules, zone, next_slot);
    if plan.prune.is_empty() {
        state.pending_prune.clear();
        return Ok(());
    }
    if plan.prune.len() > ctx.config.max_deletions_per_pass {
        let first_time =
            state.pending_prune != plan.prune.iter().take(50).cloned().collect::<Vec<_>>();
        state.pending_prune = plan.prune.iter().take(50).cloned().collect();
        if first_time {
            publish(
                ctx,
                app,
                EventType::Warning,
                "RetentionBlocked",
                format!(
                    "schedule {}: retention would delete {} Backups, more than the {} a pass may delete; \
                     nothing was deleted. Check the retention rules; if this is intended, delete them by hand \
                     or raise the manager's --retention-max-deletions. Would delete: {}",
                    schedule.name,
                    plan.prune.len(),
                    ctx.config.max_deletions_per_pass,
                    plan.prune.join(", ")
                ),
            )
            .await;
        }
        return Ok(());
    }
    state.pending_prune.clear();
    let ns = app.namespace().unwrap_or_default();
    let api: Api<Backup> = Api::namespaced(ctx.base.client.clone(), &ns);
    // The plan was made from caches: check what a delete cannot take back. A Restore
    // that started since protects its Backup (fresh LIST), and each delete carries the
    // cached uid and resourceVersion, so a Backup that changed since (a keep label, a
    // new phase) is skipped (409) and judged again on its watch event.
    let in_use_now = restores_in_use_now(&ctx.base.client, &ns).await?;
    let mut deleted = Vec::new();
    for name in &plan.prune {
        if in_use_now.contains_key(name) {
            continue;
        }
        let Some(cached) = backups.iter().find(|b| b.name_any() == *name) else {
            continue;
        };
        let params = DeleteParams {
            preconditions: Some(kube::api::Preconditions {
                uid: cached.uid(),
                resource_version: cached.resource_version(),
            }),
            ..DeleteParams::default()
        };
        match api.delete(name, &params).await {
            Ok(_) => deleted.push(name.clone()),
            Err(e) if not_found(&e) => {}
            Err(kube::Error::Api(s)) if s.code == 409 => {
                tracing::debug!(backup = %name, "changed since the retention plan; judged again on its event");
            }
            Err(e) => return Err(e.into()),
        }
    }
    if deleted.is_empty() {
        return Ok(());
    }
    let plan = retention::Plan {
        prune: deleted,
        ..plan
    };
    state.pruned += plan.prune.len() as i64;
    state.last_pruned = plan.prune.iter().take(50).cloned().collect();
    ctx.metrics
        .pruned
        .get_or_create(labels)
        .inc_by(plan.prune.len() as u64);
    let kept: Vec<String> = plan
        .keep
        .iter()
        .map(|(n, why)| format!("{n} ({})", why.join(", ")))
        .collect();
    publish(
        ctx,
        app,
        EventType::Normal,
        "Pruned",
        format!(
            "schedule {}: deleted {}; kept {}",
            schedule.name,
            plan.prune.join(", "),
            kept.join(", ")
        ),
    )
    .await;
    Ok(())
}

/// What retention will delete once the next slot's backup completes: the plan again with
/// that backup added, minus what goes now.
fn forecast(
    candidates: &[Candidate],
    now: &retention::Plan,
    rules: &stateward_api::statefulapp::Retention,
    zone: chrono_tz::Tz,
    next_slot: Option<DateTime<Utc>>,
) -> Vec<String> {
    let Some(slot) = next_slot else {
        return Vec::new();
    };
    const NEXT: &str = "\0next";
    let mut with_next = candidates.to_vec();
    with_next.push(Candidate {
        name: NEXT.into(),
        time: slot,
        state: State::Completed,
        protected_by: None,
    });
    retention::plan(&with_next, rules, zone)
        .prune
        .into_iter()
        .filter(|n| n != NEXT && !now.prune.contains(n))
        .take(50)
        .collect()
}

/// The newest success and the failures since, over all of the app's Backups.
fn summarize(backups: &[Backup], section: &mut BackupStatusSection) {
    let finished = |b: &Backup| {
        b.status
            .as_ref()
            .and_then(|s| s.completion_time.as_deref())
            .and_then(parse_time)
    };
    let newest = backups
        .iter()
        .filter(|b| phase(b) == Some(BackupPhase::Completed))
        .filter_map(|b| finished(b).map(|t| (t, b)))
        .max_by_key(|(t, _)| *t);
    if let Some((at, backup)) = newest {
        section.last_successful_time = Some(time::rfc3339(at));
        section.last_successful_backup = Some(backup.name_any());
    }
    section.consecutive_failures = backups
        .iter()
        .filter(|b| phase(b) == Some(BackupPhase::Failed))
        .filter(|b| match (finished(b), newest) {
            (Some(t), Some((last, _))) => t > last,
            (_, None) => true,
            (None, Some(_)) => false,
        })
        .count() as i32;
}

/// `BackupsHealthy`: is the newest success younger than the app's backup max age?
fn backups_healthy(
    app: &StatefulApp,
    schedules: &[Schedule],
    section: &BackupStatusSection,
    now: DateTime<Utc>,
) -> Condition {
    let generation = app.meta().generation;
    let unknown = |reason: &str, message: String| {
        let mut c = conditions::condition(BACKUPS_HEALTHY, false, reason, message, generation);
        c.status = "Unknown".into();
        c
    };
    let Some(max_age) = app_backup_max_age(app, schedules, now) else {
        return unknown(
            "NoSchedule",
            "no active schedule and no monitoring.backupMaxAge: nothing to judge backup age against".into(),
        );
    };
    let max = chrono::Duration::from_std(max_age).unwrap_or_default();
    let last = section.last_successful_time.as_deref().and_then(parse_time);
    match last {
        Some(at) if now - at <= max => conditions::condition(
            BACKUPS_HEALTHY,
            true,
            "BackupRecent",
            format!(
                "newest successful backup {} completed at {} (max age {}s)",
                section.last_successful_backup.as_deref().unwrap_or("?"),
                time::rfc3339(at),
                max_age.as_secs()
            ),
            generation,
        ),
        Some(at) => conditions::condition(
            BACKUPS_HEALTHY,
            false,
            "BackupTooOld",
            format!(
                "newest successful backup {} completed at {}, older than the max age of {}s; {} failed since",
                section.last_successful_backup.as_deref().unwrap_or("?"),
                time::rfc3339(at),
                max_age.as_secs(),
                section.consecutive_failures
            ),
            generation,
        ),
        None => {
            let created = app
                .meta()
                .creation_timestamp
                .as_ref()
                .map(time::to_chrono)
                .unwrap_or(now);
            if now - created <= max {
                unknown(
                    "AwaitingFirstBackup",
                    format!(
                        "no successful backup yet; the first is due within {}s",
                        max_age.as_secs()
                    ),
                )
            } else {
                conditions::condition(
                    BACKUPS_HEALTHY,
                    false,
                    "NoSuccessfulBackup",
                    format!(
                        "no successful backup in the {}s since the app was created; {} failed",
                        max_age.as_secs(),
                        section.consecutive_failures
                    ),
                    generation,
                )
            }
        }
    }
}

/// The app's maximum backup age: `monitoring.backupMaxAge`, or from its active schedules
/// (the shared helper monitoring uses too).
fn app_backup_max_age(
    app: &StatefulApp,
    schedules: &[Schedule],
    now: DateTime<Utc>,
) -> Option<std::time::Duration> {
    let refs = schedules.iter().map(|s| ScheduleRef {
        cron: &s.cron,
        time_zone: s.time_zone.as_deref(),
        suspended: s.suspend,
    });
    let explicit = app
        .spec
        .monitoring
        .as_ref()
        .and_then(|m| m.backup_max_age.as_deref());
    backup_max_age(explicit, refs, now)
}

/// When `BackupsHealthy` next changes with time alone: the newest success (or, before
/// the first, the app's creation) passing the max age. `None` when no age applies or the
/// instant has passed (the verdict already says so).
fn healthy_changes_at(
    app: &StatefulApp,
    schedules: &[Schedule],
    section: &BackupStatusSection,
    now: DateTime<Utc>,
) -> Option<DateTime<Utc>> {
    let max = chrono::Duration::from_std(app_backup_max_age(app, schedules, now)?).ok()?;
    let since = section
        .last_successful_time
        .as_deref()
        .and_then(parse_time)
        .or_else(|| app.meta().creation_timestamp.as_ref().map(time::to_chrono))?;
    let at = since + max + chrono::Duration::seconds(1);
    (at > now).then_some(at)
}

/// Keeps the app's finalizer in step with `backupsOnDelete`.
async fn sync_app_finalizer(app: &StatefulApp, ctx: &ScheduleContext) -> Result<(), ScheduleError> {
    let wants = app.spec.backups_on_delete == Some(BackupsOnDelete::Delete);
    let has = app.finalizers().iter().any(|f| f == BACKUPS_FINALIZER);
    if wants == has {
        return Ok(());
    }
    let mut finalizers: Vec<String> = app
        .finalizers()
        .iter()
        .filter(|f| *f != BACKUPS_FINALIZER)
        .cloned()
        .collect();
    if wants {
        finalizers.push(BACKUPS_FINALIZER.to_string());
    }
    set_app_finalizers(app, ctx, finalizers).await
}

async fn set_app_finalizers(
    app: &StatefulApp,
    ctx: &ScheduleContext,
    finalizers: Vec<String>,
) -> Result<(), ScheduleError> {
    let api: Api<StatefulApp> = Api::namespaced(
        ctx.base.client.clone(),
        &app.namespace().unwrap_or_default(),
    );
    let patch = serde_json::json!({
        "metadata": {"resourceVersion": app.resource_version(), "finalizers": finalizers}
    });
    match api
        .patch(
            &app.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
    {
        Ok(_) => Ok(()),
        Err(e) if not_found(&e) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// The app is being deleted. With `backupsOnDelete: Delete` its Backups are deleted
/// (each one's `deletionPolicy` decides about the stored data) and the finalizer is
/// removed once they are gone; otherwise they stay, unowned.
async fn app_deleted(
    app: &StatefulApp,
    backups: &[Backup],
    ctx: &ScheduleContext,
) -> Result<Action, ScheduleError> {
    if !app.finalizers().iter().any(|f| f == BACKUPS_FINALIZER) {
        return Ok(Action::await_change());
    }
    if backups.is_empty() {
        let finalizers = app
            .finalizers()
            .iter()
            .filter(|f| *f != BACKUPS_FINALIZER)
            .cloned()
            .collect();
        set_app_finalizers(app, ctx, finalizers).await?;
        return Ok(Action::await_change());
    }
    let api: Api<Backup> = Api::namespaced(
        ctx.base.client.clone(),
        &app.namespace().unwrap_or_default(),
    );
    for backup in backups
        .iter()
        .filter(|b| b.meta().deletion_timestamp.is_none())
    {
        match api
            .delete(&backup.name_any(), &DeleteParams::default())
            .await
        {
            Ok(_) => {}
            Err(e) if not_found(&e) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(Action::requeue(Duration::from_secs(2)))
}

async fn publish(
    ctx: &ScheduleContext,
    app: &StatefulApp,
    type_: EventType,
    reason: &str,
    note: String,
) {
    ctx.base
        .publish(&app.object_ref(&()), type_, reason, "Schedule", note)
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn backup_names_carry_the_utc_slot_and_fit_a_label() {
        let slot = Utc
            .with_ymd_and_hms(2026, 11, 25, 20, 45, 0)
            .single()
            .unwrap_or_default();
        assert_eq!(
            backup_name("pg", "nightly", slot),
            "pg-nightly-202611252045"
        );
        let long = backup_name(&"a".repeat(60), "nightly", slot);
        assert_eq!(long.len(), 63);
        assert!(long.ends_with("-202611252045"));
        assert_ne!(long, backup_name(&"a".repeat(61), "nightly", slot));
        for app in names::sample_names() {
            let name = backup_name(&app, "nightly", slot);
            assert!(
                names::is_dns_subdomain(&name) && name.len() <= names::MAX_LABEL,
                "app name of {} characters: {name:?}",
                app.len()
            );
            assert!(names::is_label_value(&names::label_value(&app)));
        }
    }

    #[test]
    fn backups_healthy_flips_when_the_newest_success_passes_the_max_age() {
        let at = |h: u32| {
            Utc.with_ymd_and_hms(2026, 12, 1, h, 0, 0)
                .single()
                .unwrap_or_default()
        };
        let app = |max_age: Option<&str>| -> StatefulApp {
            let monitoring = max_age
                .map(|m| format!(", monitoring: {{backupMaxAge: {m}}}"))
                .unwrap_or_default();
            serde_yaml::from_str(&format!(
                "apiVersion: stateward.io/v1alpha1\nkind: StatefulApp\nmetadata: {{name: a, creationTimestamp: \"2026-12-01T00:00:00Z\"}}\nspec: {{statefulSetName: a{monitoring}}}"
            ))
            .unwrap_or_else(|e| panic!("fixture: {e}"))
        };
        let section = |last: Option<DateTime<Utc>>| BackupStatusSection {
            last_successful_time: last.map(time::rfc3339),
            ..Default::default()
        };
        let second = chrono::Duration::seconds(1);
        // (max age, newest success, now, expected flip)
        let rows = [
            // A success at 01:00 with 2h: flips at 03:00 (+1 s).
            (Some("2h"), Some(at(1)), at(2), Some(at(3) + second)),
            // Already past: the verdict says so; no timer.
            (Some("2h"), Some(at(1)), at(4), None),
            // No success yet: counted from the app's creation (00:00).
            (Some("2h"), None, at(1), Some(at(2) + second)),
            // No max age and no schedule: nothing to judge.
            (None, Some(at(1)), at(2), None),
        ];
        for (max_age, last, now, expected) in rows {
            assert_eq!(
                healthy_changes_at(&app(max_age), &[], &section(last), now),
                expected,
                "{max_age:?} {last:?} {now}"
            );
        }
    }
}
