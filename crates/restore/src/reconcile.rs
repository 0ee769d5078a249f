//! The restore pipeline. Every pass reads the Restore fresh, derives where it is from its
//! status and its Jobs (deterministic names), and takes at most one step, so a manager
//! killed at any point resumes without repeating or skipping one.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Api, Resource, ResourceExt};
use stateward_agent::restore::RestoreResult;
use stateward_api::restore::{RestoreMode, RestoreVolumeStatus};
use stateward_api::{Restore, RestorePhase, RestoreStatus, StatefulApp};
use stateward_runtime::agent_start::{self, AgentStart};
use stateward_runtime::lock::{Acquired, Holder, Intent, OperationLock};
use stateward_runtime::{agent_rbac, apply, conditions, ownership, time};

use crate::plan::{self, JobStep, Plan, Refusal};
use crate::source::{self, Source, SourceError};
use crate::{RestoreContext, RestoreError, ResultLabels};
use stateward_api::common::STOPPED_REPLICAS_ANNOTATION;

/// How often a running restore is looked at (Job changes also wake it).
const POLL: Duration = Duration::from_secs(3);
const READY: &str = "Ready";
/// Held from the first step that touches anything until the restore has ended (and a
/// begun swap has finished), so deletion cannot cut a swap short.
pub const FINALIZER: &str = "restores.stateward.io";

/// The reconcile entry point.
#[tracing::instrument(skip_all, fields(namespace = restore.namespace().unwrap_or_default(), restore = restore.name_any()))]
pub async fn reconcile(
    restore: Arc<Restore>,
    ctx: Arc<RestoreContext>,
) -> Result<Action, RestoreError> {
    let timer = ctx.base.metrics.reconcile.start(crate::CONTROLLER);
    let result = step(&restore, &ctx).await;
    // The back-off resets only after a pass that succeeded: resetting it at the start of
    // a pass that then fails would retry a persistent error every second, forever.
    if result.is_ok() {
        ctx.base.backoff.on_success(&key(&restore));
    }
    timer.finish(if result.is_ok() { "success" } else { "error" });
    result
}

/// Transient errors back off per Restore.
pub fn error_policy(restore: Arc<Restore>, err: &RestoreError, ctx: Arc<RestoreContext>) -> Action {
    let key = key(&restore);
    tracing::warn!(restore = %key, error = %err, label = err.metric_label(), "restore reconcile failed");
    let delay = ctx
        .base
        .backoff
        .on_error(&key, stateward_runtime::backoff::ErrorKind::Transient)
        .unwrap_or(Duration::from_secs(300));
    Action::requeue(delay)
}

fn key(restore: &Restore) -> String {
    format!(
        "restore/{}/{}",
        restore.namespace().unwrap_or_default(),
        restore.name_any()
    )
}

fn holder(restore: &Restore) -> Holder {
    Holder {
        api_version: Restore::api_version(&()).to_string(),
        kind: Restore::kind(&()).to_string(),
        resource: Restore::plural(&()).to_string(),
        name: restore.name_any(),
        uid: restore.uid().unwrap_or_default(),
    }
}

/// One pass over a Restore.
struct Pass<'a> {
    ctx: &'a RestoreContext,
    restore: Restore,
    status: RestoreStatus,
    ns: String,
    /// The target app's StatefulSet, whose operation lock the restore takes (unknown
    /// when the app is gone: then it holds none it could release).
    stateful_set: Option<String>,
    /// The target app, as an owner of the namespace's volume-agent ServiceAccount.
    app_owner: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference>,
}

/// Completed and Failed are final: no pass ever moves a Restore out of them.
fn is_final(restore: &Restore) -> bool {
    matches!(
        restore.status.as_ref().and_then(|s| s.phase),
        Some(RestorePhase::Completed | RestorePhase::Failed)
    )
}

async fn step(cached: &Restore, ctx: &RestoreContext) -> Result<Action, RestoreError> {
    let ns = cached.namespace().unwrap_or_default();
    // A finished Restore stays finished: when it is not being deleted and the Lease cache
    // shows no lock it could still hold, there is nothing to do and nothing to read (a
    // manager start with many finished Restores costs no request).
    if is_final(cached)
        && cached.meta().deletion_timestamp.is_none()
        && !ctx
            .stores
            .may_hold_lock(&ns, cached.uid().as_deref().unwrap_or_default())
    {
        return Ok(Action::await_change());
    }
    let api: Api<Restore> = Api::namespaced(ctx.base.client.clone(), &ns);
    // Read fresh: a Job must never be created twice because the cache lagged behind our
    // own last status write.
    let Some(restore) = api.get_opt(&cached.name_any()).await? else {
        return Ok(Action::await_change());
    };
    if restore.uid() != cached.uid() {
        return Ok(Action::await_change());
    }
    let status = restore.status.clone().unwrap_or_default();
    let apps: Api<StatefulApp> = Api::namespaced(ctx.base.client.clone(), &ns);
    let app = apps.get_opt(&restore.spec.target.app).await?;
    let stateful_set = app.as_ref().map(|app| app.spec.stateful_set_name.clone());
    let app_owner = app.as_ref().and_then(|app| app.controller_owner_ref(&()));
    let mut pass = Pass {
        ctx,
        ns,
        status,
        restore,
        stateful_set,
        app_owner,
    };
    let deleting = pass.restore.meta().deletion_timestamp.is_some();
    if matches!(
        pass.status.phase,
        Some(RestorePhase::Completed | RestorePhase::Failed)
    ) {
        // Idempotent: a crash between the final status write and the release.
        pass.release_lock().await?;
        if deleting {
            pass.finish_deletion().await?;
        }
        return Ok(Action::await_change());
    }
    if deleting {
        match pass.status.step.as_deref() {
            // Nothing on a volume yet: the app comes back as it was.
            None | Some("Resolving" | "WaitingForLock" | "Stopping") => {
                pass.fail(Refusal {
                    reason: "Deleted",
                    message: "the Restore was deleted before it touched any volume".into(),
                })
                .await?;
                pass.finish_deletion().await?;
                return Ok(Action::await_change());
            }
            // Staged data is thrown away first; the failure then brings the app back.
            Some("Staging") => pass.status.step = Some("Discarding".into()),
            // A swap that began is finished (the finalizer keeps its Job alive), and a
            // dump being loaded cannot be taken back: both run to their end.
            _ => {}
        }
    }
    let before = pass.status.clone();
    let action = pass.drive().await?;
    if pass.status != before {
        pass.write_status().await?;
    }
    Ok(action)
}

impl Pass<'_> {
    fn now(&self) -> chrono::DateTime<chrono::Utc> {
        self.ctx.base.clock.now()
    }

    fn name(&self) -> String {
        self.restore.name_any()
    }

    fn lock(&self) -> Option<OperationLock> {
        Some(OperationLock::new(
            self.ctx.base.client.clone(),
            &self.ns,
            &self.restore.spec.target.app,
            self.stateful_set.as_deref()?,
        ))
    }

    fn api<K>(&self) -> Api<K>
    where
        K: Resource<Scope = kube::core::NamespaceResourceScope, DynamicType = ()>
            + Clone
            + serde::de::DeserializeOwned
            + std::fmt::Debug,
    {
        Api::namespaced(self.ctx.base.client.clone(), &self.ns)
    }

    fn set_ready(&mut self, status: bool, reason: &str, message: impl Into<String>) {
        let now = self.now();
        conditions::set(
            &mut self.status.conditions,
            conditions::condition(
                READY,
                status,
                reason,
                message,
                self.restore.meta().generation,
            ),
            now,
        );
    }

    /// Whether a stage Job of this restore has not finished yet.
    async fn stage_jobs_running(&self) -> Result<bool, RestoreError> {
        let jobs = self
            .api::<Job>()
            .list(&ListParams::default().labels(&format!(
                "{}={},{}={}",
                plan::RESTORE_UID_LABEL,
                self.restore.uid().unwrap_or_default(),
                plan::STEP_LABEL,
                JobStep::Stage.as_str()
            )))
            .await?;
        Ok(jobs.items.iter().any(|job| {
            !job.status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| {
                    c.iter().any(|c| {
                        (c.type_ == "Complete" || c.type_ == "Failed") && c.status == "True"
                    })
                })
        }))
    }

    /// The instant past which the restore fails unless its swap began.
    fn deadline(&self) -> Option<chrono::DateTime<chrono::Utc>> {
        let start = self
            .status
            .start_time
            .as_deref()
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())?
            .with_timezone(&chrono::Utc);
        let seconds = self
            .restore
            .spec
            .active_deadline_seconds
            .unwrap_or(self.ctx.config.default_deadline.as_secs() as i64);
        Some(start + chrono::Duration::seconds(seconds))
    }

    fn seconds_left(&self) -> i64 {
        self.deadline()
            .map(|d| (d - self.now()).num_seconds())
            .unwrap_or(i64::MAX)
    }

    /// The Ready condition of a step in progress: what it does, or — while an agent pod
    /// has not started — what it waits for and when that wait fails.
    fn set_progress(&mut self, step: &str, doing: &str, states: &[JobState]) {
        let waiting = self
            .status
            .volumes
            .iter()
            .zip(states)
            .find_map(|(volume, state)| Some((&volume.target, state.waiting_note()?)));
        match waiting {
            Some((target, note)) => {
                let (reason, message) = note
                    .split_once(": ")
                    .unwrap_or(("AgentNotStarted", note.as_str()));
                let message = format!("{step}: {target}: {message}");
                self.set_ready(false, leak_reason(reason), message);
            }
            None => self.set_ready(false, step, doing),
        }
    }

    async fn event(&self, type_: EventType, reason: &str, note: String) {
        self.ctx
            .base
            .publish(
                &self.restore.object_ref(&()),
                type_,
                reason,
                "Restore",
                note,
            )
            .await;
    }

    async fn write_status(&self) -> Result<(), RestoreError> {
        let mut status = serde_json::to_value(&self.status)?;
        status["observedGeneration"] = serde_json::json!(self.restore.meta().generation);
        apply::apply_status(
            &self.api::<Restore>(),
            &self.name(),
            apply::managers::RESTORE,
            status,
        )
        .await?;
        Ok(())
    }

    /// Releases the app's lock — unless a swap began and did not complete: then the lock
    /// stays (its holder finished, so another in-place Restore may take it over and
    /// finish the journals) and the scaling controller keeps the app stopped.
    async fn release_lock(&self) -> Result<(), RestoreError> {
        let Some(lock) = self.lock() else {
            return Ok(());
        };
        if let Some(record) = lock.current().await?
            && record.holder.uid == self.restore.uid().unwrap_or_default()
        {
            if record.incomplete_swap.is_some()
                && self.status.phase != Some(RestorePhase::Completed)
            {
                tracing::warn!("keeping the app's operation lock: a swap is incomplete");
                return Ok(());
            }
            lock.release(&record.token).await?;
            tracing::info!("released the app's operation lock");
        }
        Ok(())
    }

    /// Whether this Restore's lock carries an incomplete swap (its own or inherited).
    async fn swap_incomplete(&self) -> Result<Option<String>, RestoreError> {
        let Some(lock) = self.lock() else {
            return Ok(None);
        };
        Ok(lock
            .current()
            .await?
            .filter(|r| r.holder.uid == self.restore.uid().unwrap_or_default())
            .and_then(|r| r.incomplete_swap))
    }

    /// Marks the lock before the first swap Job: from here on the app stays stopped
    /// whatever happens to this Restore, until a swap completes.
    async fn mark_swap_begun(&self) -> Result<(), RestoreError> {
        let Some(lock) = self.lock() else {
            return Err(RestoreError::Lock(
                stateward_runtime::lock::LockError::NotHeld,
            ));
        };
        let Some(record) = lock
            .current()
            .await?
            .filter(|r| r.holder.uid == self.restore.uid().unwrap_or_default())
        else {
            return Err(RestoreError::Lock(
                stateward_runtime::lock::LockError::NotHeld,
            ));
        };
        let note = format!(
            "Restore {} began swapping backup {} into the app's volumes at {}",
            self.name(),
            self.status.backup_path.clone().unwrap_or_default(),
            time::rfc3339(self.now())
        );
        lock.mark_incomplete_swap(&record.token, &note).await?;
        Ok(())
    }

    /// Adds the Restore's finalizer (before anything is created), so that deleting it
    /// mid-way lets it discard its staging or finish its swap first.
    async fn ensure_finalizer(&self) -> Result<(), RestoreError> {
        if self.restore.finalizers().iter().any(|f| f == FINALIZER) {
            return Ok(());
        }
        let mut finalizers = self.restore.finalizers().to_vec();
        finalizers.push(FINALIZER.to_string());
        self.set_finalizers(finalizers).await
    }

    /// The end of a deleted Restore: its unowned swap Jobs go, then the finalizer.
    async fn finish_deletion(&self) -> Result<(), RestoreError> {
        let jobs: Api<Job> = self.api();
        let selector = format!(
            "{}={}",
            plan::RESTORE_UID_LABEL,
            self.restore.uid().unwrap_or_default()
        );
        jobs.delete_collection(
            &kube::api::DeleteParams::background(),
            &ListParams::default().labels(&selector),
        )
        .await?;
        let finalizers: Vec<String> = self
            .restore
            .finalizers()
            .iter()
            .filter(|f| *f != FINALIZER)
            .cloned()
            .collect();
        if finalizers.len() != self.restore.finalizers().len() {
            self.set_finalizers(finalizers).await?;
        }
        Ok(())
    }

    /// Writes the finalizer list at the resourceVersion read, so a concurrent edit of the
    /// list is never lost (a conflict retries with back-off).
    async fn set_finalizers(&self, finalizers: Vec<String>) -> Result<(), RestoreError> {
        let patch = serde_json::json!({
            "metadata": {"resourceVersion": self.restore.resource_version(), "finalizers": finalizers},
        });
        match self
            .api::<Restore>()
            .patch(
                &self.name(),
                &kube::api::PatchParams::default(),
                &kube::api::Patch::Merge(&patch),
            )
            .await
        {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// The app's `status.restore` section (the restore manager's only field there).
    async fn app_section(&self, active: bool) {
        let mut section = serde_json::json!({
            "activeRestore": if active { Some(self.name()) } else { None },
        });
        if !active {
            section["lastRestore"] = serde_json::json!(self.name());
            section["lastRestorePhase"] = serde_json::json!(self.status.phase);
            section["lastRestoreTime"] = serde_json::json!(self.status.completion_time);
        }
        let apps: Api<StatefulApp> = self.api();
        if let Err(e) = apply::apply_status(
            &apps,
            &self.restore.spec.target.app,
            apply::managers::RESTORE,
            serde_json::json!({"restore": section}),
        )
        .await
        {
            // The app may be gone (a clone of a deleted app's backup): not worth failing.
            tracing::debug!(error = %e, "updating the app's restore section failed");
        }
    }

    async fn drive(&mut self) -> Result<Action, RestoreError> {
        let now = self.now();
        if self.status.phase.is_none() || self.status.phase == Some(RestorePhase::Pending) {
            self.status.phase = Some(RestorePhase::Running);
            self.status.start_time = Some(time::rfc3339(now));
            self.status.step = Some("Resolving".into());
        }
        // What this operator was installed without is refused before anything is read.
        if self.status.mode.is_none()
            && let Some(refusal) =
                plan::turned_off(&self.restore, self.ctx.config.clone_stateful_sets)
        {
            return self.fail(refusal).await;
        }
        // Before staging a restore only waits (for the repository, the lock, the app to
        // stop): past its deadline it ends, and the app it stopped comes back.
        if matches!(
            self.status.step.as_deref(),
            Some("Resolving" | "WaitingForLock" | "Stopping")
        ) && self.seconds_left() <= 0
        {
            let waited = self
                .status
                .conditions
                .iter()
                .find(|c| c.type_ == "Ready")
                .map(|c| c.message.clone())
                .unwrap_or_default();
            return self
                .fail(Refusal {
                    reason: "DeadlineExceeded",
                    message: format!(
                        "the restore's deadline passed before it could stage (last: {waited}); set spec.activeDeadlineSeconds to allow longer"
                    ),
                })
                .await;
        }
        // Staging past the deadline: the stage Jobs carry the remaining time and end on
        // their own; when none is left running (none could be created), staging ends here.
        if self.status.step.as_deref() == Some("Staging")
            && self.seconds_left() <= 0
            && !self.stage_jobs_running().await?
        {
            for volume in self.status.volumes.iter_mut().filter(|v| {
                !v.agent_never_started && !matches!(v.phase.as_str(), "Failed" | "Staged")
            }) {
                volume.phase = "Failed".into();
                volume.message =
                    Some("DeadlineExceeded: the restore's deadline passed while staging".into());
            }
            self.status.step = Some("Discarding".into());
            self.set_ready(
                false,
                "Discarding",
                "DeadlineExceeded: discarding the staged data, the old data is untouched",
            );
        }
        // 1. The source.
        let source = match source::resolve(&self.ctx.base.client, &self.restore).await {
            Ok(source) => source,
            Err(SourceError::Refused(refusal)) => return self.fail(refusal).await,
            Err(SourceError::Unavailable(message)) => {
                self.set_ready(false, "RepositoryUnavailable", message);
                return Ok(Action::requeue(Duration::from_secs(15)));
            }
        };
        self.status.backup_path = Some(source.path.clone());
        // 2. The target app.
        let apps: Api<StatefulApp> = self.api();
        let target = self.restore.spec.target.app.clone();
        let Some(app) = apps.get_opt(&target).await? else {
            return self
                .fail(Refusal {
                    reason: "AppNotFound",
                    message: format!(
                        "StatefulApp {target} (spec.target.app) does not exist in namespace {}",
                        self.ns
                    ),
                })
                .await;
        };
        if self.status.mode.is_none()
            && let Some(message) = ownership::check(&app, &self.ctx.stores)
        {
            return self
                .fail(Refusal {
                    reason: ownership::ALREADY_MANAGED,
                    message,
                })
                .await;
        }
        let claims = self
            .api::<PersistentVolumeClaim>()
            .list(&ListParams::default())
            .await?
            .items;
        let claim_names: Vec<String> = claims.iter().map(|c| c.name_any()).collect();
        // 3. The target StatefulSet, read live: a restore writes only its claims.
        let sts_name = app.spec.stateful_set_name.clone();
        let sts = self.api::<StatefulSet>().get_opt(&sts_name).await?;
        let clone = self.restore.spec.target.clone_stateful_set_name.is_some();
        let target_set = match &sts {
            Some(sts) => plan::TargetSet::of(&target, sts, self.replicas_to_come_back(sts)),
            None if clone => plan::TargetSet {
                app: target.clone(),
                name: sts_name.clone(),
                ..Default::default()
            },
            None => {
                return self
                    .fail(Refusal {
                        reason: "StatefulSetNotFound",
                        message: format!(
                            "StatefulSet {sts_name} of StatefulApp {target} does not exist"
                        ),
                    })
                    .await;
            }
        };
        if self.status.previous_replicas.is_none() && !clone {
            self.status.previous_replicas = Some(target_set.replicas as i32);
        }
        // 4. The plan.
        let plan = match plan::plan(
            &self.restore,
            &source.manifest,
            &app,
            &target_set,
            &claim_names,
        ) {
            Ok(plan) => plan,
            Err(refusal) => return self.fail(refusal).await,
        };
        if self.status.plan.is_none() {
            self.status.plan = Some(plan::summary(&plan, &target_set, &claims));
        }
        if self.restore.spec.dry_run {
            return self.dry_run(&plan).await;
        }
        self.ensure_finalizer().await?;
        if self.status.mode.is_none() {
            self.status.mode = Some(plan.mode);
            self.status.volumes = plan
                .items
                .iter()
                .map(|item| RestoreVolumeStatus {
                    source: item.entry.name.clone(),
                    target: item.target.clone(),
                    phase: "Pending".into(),
                    ..Default::default()
                })
                .collect();
            self.event(
                EventType::Normal,
                "Started",
                format!(
                    "restoring {} ({} {}) into {}: {:?}",
                    source.path,
                    plan.items.len(),
                    if plan.mode == RestoreMode::Exec {
                        "dump(s)"
                    } else {
                        "volume(s)"
                    },
                    plan.items
                        .iter()
                        .map(|i| i.target.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                    plan.mode
                ),
            )
            .await;
            self.app_section(plan.mode != RestoreMode::Clone).await;
        }
        match plan.mode {
            RestoreMode::InPlace => self.in_place(&app, &source, &plan).await,
            RestoreMode::Clone => self.clone_into(&source, &plan).await,
            RestoreMode::Exec => self.exec(&app, &source, &plan).await,
        }
    }

    /// The replica count an in-place restore brings the app back to: recorded once; the
    /// count the scaling controller saved if the app is already stopped (a restore taking
    /// over an incomplete swap); else the StatefulSet's.
    fn replicas_to_come_back(&self, sts: &StatefulSet) -> Option<i32> {
        self.status.previous_replicas.or_else(|| {
            sts.annotations()
                .get(STOPPED_REPLICAS_ANNOTATION)
                .and_then(|r| r.parse().ok())
        })
    }

    /// `dryRun`: the plan is in status; nothing else happens.
    async fn dry_run(&mut self, plan: &Plan) -> Result<Action, RestoreError> {
        let now = self.now();
        self.status.mode = Some(plan.mode);
        self.status.phase = Some(RestorePhase::Completed);
        self.status.step = Some("Done".into());
        self.finish_times(now);
        let writes = plan.items.len();
        self.set_ready(
            true,
            "DryRun",
            format!(
                "dry run: {writes} {} would be restored ({:?}); nothing was stopped, created or written (status.plan)",
                if plan.mode == RestoreMode::Exec { "dump(s)" } else { "volume(s)" },
                plan.mode
            ),
        );
        Ok(Action::await_change())
    }

    /// Takes the app's lock; `None` when someone else holds it (the condition says who).
    async fn take_lock(&mut self, intent: Intent) -> Result<bool, RestoreError> {
        let Some(lock) = self.lock() else {
            return Ok(false);
        };
        match lock.acquire(holder(&self.restore), intent, None).await? {
            Acquired::Held(_) | Acquired::Nested(_) => Ok(true),
            Acquired::Busy(record) => {
                let message = format!(
                    "waiting for StatefulApp {}'s operation lock, held by {} {} ({:?}); nothing has been touched",
                    self.restore.spec.target.app,
                    record.holder.kind,
                    record.holder.name,
                    record.intent
                );
                if self.status.step.as_deref() != Some("WaitingForLock") {
                    self.event(EventType::Normal, "WaitingForLock", message.clone())
                        .await;
                }
                self.status.step = Some("WaitingForLock".into());
                self.set_ready(false, "LockBusy", message);
                Ok(false)
            }
        }
    }

    async fn in_place(
        &mut self,
        app: &StatefulApp,
        source: &Source,
        plan: &Plan,
    ) -> Result<Action, RestoreError> {
        let sts_name = app.spec.stateful_set_name.clone();
        let replicas = self.status.previous_replicas.unwrap_or(1);
        if !self.take_lock(Intent::Stop { replicas }).await? {
            return Ok(Action::requeue(POLL));
        }
        // Stopped: the scaling controller says so for this Restore, and no pod is left.
        if matches!(
            self.status.step.as_deref(),
            Some("Resolving" | "WaitingForLock" | "Stopping")
        ) {
            let stopped_for_us = app
                .status
                .as_ref()
                .and_then(|s| conditions::get(&s.conditions, "Stopped"))
                .is_some_and(|c| {
                    c.status == "True"
                        && c.message
                            .contains(&format!("stopped for Restore {};", self.name()))
                });
            let pods_left = self.pods_of(&sts_name).await?;
            if !stopped_for_us || !pods_left.is_empty() {
                if self.status.step.as_deref() != Some("Stopping") {
                    self.event(
                        EventType::Normal,
                        "StoppingApp",
                        format!("asked the scaling controller to stop StatefulApp {} ({replicas} replicas, PVCs kept)", app.name_any()),
                    )
                    .await;
                }
                self.status.step = Some("Stopping".into());
                self.set_ready(
                    false,
                    "Stopping",
                    if pods_left.is_empty() {
                        format!("waiting for StatefulApp {} to report Stopped (is the scaling controller running?)", app.name_any())
                    } else {
                        format!("waiting for {} to stop", pods_left.join(", "))
                    },
                );
                return Ok(Action::requeue(POLL));
            }
            self.status.step = Some("Staging".into());
        }
        self.volumes(source, plan).await
    }

    async fn pods_of(&self, sts: &str) -> Result<Vec<String>, RestoreError> {
        let prefix = format!("{sts}-");
        Ok(self
            .api::<Pod>()
            .list_metadata(&ListParams::default())
            .await?
            .items
            .into_iter()
            .filter(|p| {
                p.owner_references()
                    .iter()
                    .any(|o| o.kind == "StatefulSet" && o.name == sts)
                    || p.name_any()
                        .strip_prefix(&prefix)
                        .is_some_and(|o| o.parse::<u32>().is_ok())
            })
            .map(|p| p.name_any())
            .collect())
    }

    async fn clone_into(&mut self, source: &Source, plan: &Plan) -> Result<Action, RestoreError> {
        if matches!(self.status.step.as_deref(), Some("Resolving")) {
            // Fresh volumes only: a PVC of that name that this Restore did not create is
            // somebody's data, never overwritten.
            let claims: Api<PersistentVolumeClaim> = self.api();
            for (name, recorded) in &plan.clone_claims {
                match claims.get_opt(name).await? {
                    Some(existing)
                        if existing.annotations().get(plan::RESTORED_BY_ANNOTATION)
                            == Some(&self.name()) => {}
                    Some(_) => {
                        return self
                            .fail(Refusal {
                                reason: "TargetExists",
                                message: format!(
                                    "PVC {name} already exists: a clone restores only into fresh volumes (delete it, or choose another cloneStatefulSetName)"
                                ),
                            })
                            .await;
                    }
                    None => {
                        let body: PersistentVolumeClaim = serde_json::from_value(
                            plan::clone_claim(name, recorded, &self.restore),
                        )?;
                        claims.create(&PostParams::default(), &body).await?;
                    }
                }
            }
            if let Some(clone) = &self.restore.spec.target.clone_stateful_set_name
                && self.restore.spec.target.create_stateful_set
                && self.api::<StatefulSet>().get_opt(clone).await?.is_some()
            {
                return self
                    .fail(Refusal {
                        reason: "TargetExists",
                        message: format!("StatefulSet {clone} already exists"),
                    })
                    .await;
            }
            self.status.step = Some("Staging".into());
        }
        self.volumes(source, plan).await
    }

    /// Stage every volume; when all verified, swap every volume; on a failure before the
    /// swap, discard every staging and fail with the first reason.
    async fn volumes(&mut self, source: &Source, plan: &Plan) -> Result<Action, RestoreError> {
        let step = match self.status.step.as_deref() {
            Some("Swapping") => JobStep::Swap,
            Some("Discarding") => JobStep::Discard,
            _ => JobStep::Stage,
        };
        let states = self
            .run_jobs(source, plan, step, agent_rbac::VOLUME_AGENT_ACCOUNT)
            .await?;
        let (done, failed) = (
            states.iter().all(|s| matches!(s, JobState::Succeeded(_))),
            states.iter().find_map(JobState::failure),
        );
        for (volume, state) in self.status.volumes.iter_mut().zip(&states) {
            volume_phase(volume, step, state);
        }
        match step {
            JobStep::Stage => {
                if let Some((reason, message)) = failed {
                    // Nothing has been swapped: throw every staging away, then fail.
                    self.status.step = Some("Discarding".into());
                    self.set_ready(false, "Discarding", format!("{reason}: {message}; discarding the staged data, the old data is untouched"));
                    self.event(EventType::Warning, &reason, message).await;
                    return Ok(Action::requeue(Duration::from_secs(1)));
                }
                if done {
                    // The point of no return: from the first rename on, the app's volumes
                    // may mix old and new data, so the lock says so before any swap Job
                    // exists, and the app stays down until every journal finished.
                    if plan.mode == RestoreMode::InPlace {
                        self.mark_swap_begun().await?;
                    }
                    self.status.step = Some("Swapping".into());
                    self.set_ready(
                        false,
                        "Swapping",
                        "every volume verified; swapping the new data in",
                    );
                    self.event(
                        EventType::Normal,
                        "Verified",
                        format!("all {} volume(s) staged and verified against the manifest's checksums; swapping in", states.len()),
                    )
                    .await;
                    return Ok(Action::requeue(Duration::from_secs(1)));
                }
                self.set_progress(
                    "Staging",
                    "streaming and verifying the backup into staging directories",
                    &states,
                );
                Ok(Action::requeue(POLL))
            }
            JobStep::Swap => {
                if let Some((reason, message)) = failed {
                    // A swap is journaled: the next agent on that volume finishes it. The
                    // app stays stopped (the lock keeps the mark) until one does.
                    let finish = match plan.mode {
                        RestoreMode::InPlace => format!(
                            "StatefulApp {} stays stopped: its volumes may mix old and new data. Fix the cause, then create a new Restore of this app (in place, any backup): its agents finish this swap's journal first, then restore",
                            self.restore.spec.target.app
                        ),
                        _ => "the clone's volumes are incomplete: delete them and restore the clone again".into(),
                    };
                    return self
                        .fail(Refusal {
                            reason: "SwapIncomplete",
                            message: format!(
                                "the swap began and did not finish ({reason}: {message}). {finish}"
                            ),
                        })
                        .await;
                }
                if done {
                    return self.complete(source, plan).await;
                }
                self.set_progress("Swapping", "swapping the verified data in", &states);
                Ok(Action::requeue(POLL))
            }
            JobStep::Discard | JobStep::Exec => {
                if states.iter().all(|s| !s.is_running()) {
                    // The first failed volume's "<reason>: <message>" decides.
                    let failed = self
                        .status
                        .volumes
                        .iter()
                        .find(|v| v.phase == "Failed")
                        .and_then(|v| v.message.clone())
                        .unwrap_or_else(|| {
                            if self.restore.meta().deletion_timestamp.is_some() {
                                "Deleted: the Restore was deleted before its swap".into()
                            } else {
                                "AgentFailed: a volume failed".into()
                            }
                        });
                    let (reason, message) = failed
                        .split_once(": ")
                        .unwrap_or(("AgentFailed", failed.as_str()));
                    return self
                        .fail(Refusal {
                            reason: leak_reason(reason),
                            message: format!("{message}; the staged data was discarded and the old data is untouched"),
                        })
                        .await;
                }
                Ok(Action::requeue(POLL))
            }
        }
    }

    async fn exec(
        &mut self,
        app: &StatefulApp,
        source: &Source,
        plan: &Plan,
    ) -> Result<Action, RestoreError> {
        let sts_name = app.spec.stateful_set_name.clone();
        for item in &plan.items {
            let pod = self.api::<Pod>().get_opt(&item.target).await?;
            let owned = pod.as_ref().is_some_and(|p| {
                p.owner_references().iter().any(|o| {
                    o.kind == "StatefulSet" && o.name == sts_name && o.controller == Some(true)
                })
            });
            if pod.is_some() && !owned && self.status.step.as_deref() == Some("Resolving") {
                return self
                    .fail(Refusal {
                        reason: "TargetPodNotOwned",
                        message: format!("pod {} is not a pod of StatefulSet {sts_name}: an exec restore streams only into the target's own pods", item.target),
                    })
                    .await;
            }
            let ready = pod
                .and_then(|p| p.status)
                .and_then(|s| s.conditions)
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
            if !ready && self.status.step.as_deref() == Some("Resolving") {
                return self
                    .fail(Refusal {
                        reason: "TargetPodNotReady",
                        message: format!("pod {} (the dump's pod) is not running and Ready: an exec restore streams into the running app", item.target),
                    })
                    .await;
            }
        }
        if !self.take_lock(Intent::Write).await? {
            return Ok(Action::requeue(POLL));
        }
        let account = agent_rbac::exec_account(&sts_name);
        if self.status.step.as_deref() != Some("Restoring") {
            agent_rbac::ensure_exec_agent(
                &self.ctx.base.client,
                &self.ns,
                &sts_name,
                &self.ctx.config.exec_cluster_role,
                app.controller_owner_ref(&()),
                apply::managers::RESTORE,
            )
            .await?;
            self.status.step = Some("Restoring".into());
        }
        let states = self.run_jobs(source, plan, JobStep::Exec, &account).await?;
        for (volume, state) in self.status.volumes.iter_mut().zip(&states) {
            volume_phase(volume, JobStep::Exec, state);
        }
        if let Some((reason, message)) = states.iter().find_map(JobState::failure) {
            return self
                .fail(Refusal {
                    reason: leak_reason(&reason),
                    message,
                })
                .await;
        }
        if states.iter().all(|s| matches!(s, JobState::Succeeded(_))) {
            return self.complete(source, plan).await;
        }
        self.set_ready(
            false,
            "Restoring",
            "verifying the dump, then streaming it into the restore command",
        );
        Ok(Action::requeue(POLL))
    }

    /// Creates the step's Jobs that do not exist yet and reads every one's state.
    async fn run_jobs(
        &self,
        source: &Source,
        plan: &Plan,
        step: JobStep,
        service_account: &str,
    ) -> Result<Vec<JobState>, RestoreError> {
        let jobs: Api<Job> = self.api();
        let inputs = plan::JobInputs {
            restore: &self.restore,
            repository: &source.repository,
            agent_image: &self.ctx.config.agent_image,
            container: plan.container.as_deref(),
            restore_command: &plan.restore_command,
            extra_env: &self.ctx.config.agent_env,
            // Staging is cut at the restore's deadline; a swap never is.
            deadline_seconds: (step == JobStep::Stage).then(|| self.seconds_left().max(60)),
            service_account,
            resources: self.ctx.config.agent_resources.as_ref(),
            placement: &plan.placement,
        };
        let mut states = Vec::new();
        for (index, item) in plan.items.iter().enumerate() {
            let name = plan::job_name(&self.name(), step, index);
            // This volume's agent never started (its Job was given up on): nothing of this
            // restore touched it, so it needs no discard, and its Job is not created again.
            if let Some(volume) = self
                .status
                .volumes
                .get(index)
                .filter(|v| v.agent_never_started)
            {
                states.push(if step == JobStep::Discard {
                    JobState::Succeeded(RestoreResult::default())
                } else if jobs.get_opt(&name).await?.is_some() {
                    JobState::Running(Some(format!(
                        "{}; deleting its agent Job",
                        volume.message.clone().unwrap_or_default()
                    )))
                } else {
                    let note = volume.message.clone().unwrap_or_default();
                    let (reason, message) =
                        note.split_once(": ").unwrap_or(("AgentNotStarted", &note));
                    JobState::NeverStarted(reason.into(), message.into())
                });
                continue;
            }
            let job = match jobs.get_opt(&name).await? {
                Some(job) => job,
                None => {
                    if step != JobStep::Exec {
                        // A disaster-recovery restore into a fresh namespace has no agent
                        // ServiceAccount yet; the Job's pods would be refused without it.
                        match agent_rbac::ensure_volume_agent(
                            &self.ctx.base.client,
                            &self.ns,
                            self.app_owner.clone(),
                            apply::managers::RESTORE,
                        )
                        .await
                        {
                            Ok(()) => {}
                            Err(kube::Error::Api(e)) if matches!(e.code, 400 | 403 | 422) => {
                                states.push(JobState::Failed(
                                    "AgentJobRefused".into(),
                                    format!(
                                        "the API server refused the agent ServiceAccount {}: {}",
                                        agent_rbac::VOLUME_AGENT_ACCOUNT,
                                        e.message
                                    ),
                                ));
                                continue;
                            }
                            Err(e) => return Err(e.into()),
                        }
                    }
                    let mut body: Job =
                        serde_json::from_value(plan::agent_job(&inputs, item, index, step))?;
                    // The agent-start bound is measured on our clock, from here.
                    body.annotations_mut().insert(
                        agent_start::CREATED_AT_ANNOTATION.into(),
                        time::rfc3339(self.now()),
                    );
                    match jobs.create(&PostParams::default(), &body).await {
                        Ok(job) => job,
                        Err(kube::Error::Api(e)) if e.code == 409 => jobs.get(&name).await?,
                        // The namespace is being deleted with its volumes: nothing to
                        // finish, and waiting would keep the finalizer (and the namespace).
                        Err(kube::Error::Api(e))
                            if e.code == 403 && e.message.contains("being terminated") =>
                        {
                            states.push(JobState::Failed(
                                "Deleted".into(),
                                "the namespace is being deleted".into(),
                            ));
                            continue;
                        }
                        // The API server refused the Job itself (a derived value out of
                        // its limits, a quota on Jobs, an admission policy): it will not
                        // be accepted on a retry, so the restore ends with its words.
                        Err(kube::Error::Api(e)) if matches!(e.code, 400 | 403 | 422) => {
                            states.push(JobState::Failed(
                                "AgentJobRefused".into(),
                                format!("the API server refused agent Job {name}: {}", e.message),
                            ));
                            continue;
                        }
                        Err(e) => return Err(e.into()),
                    }
                }
            };
            states.push(self.job_state(&job, step).await?);
        }
        Ok(states)
    }

    /// A Job that has not finished: running, waiting for its pod (and for what), or never
    /// started within the bound — then it is deleted (foreground: its pods go first), so
    /// its pod cannot start later beside whatever runs next on the volume. A swap Job is
    /// never given up on: the app stays down after a swap began anyway, and the swap
    /// goes on once its pod can start.
    async fn unfinished_job_state(
        &self,
        job: &Job,
        step: JobStep,
    ) -> Result<JobState, RestoreError> {
        let status = job.status.clone().unwrap_or_default();
        if status.ready.unwrap_or(0) > 0 {
            return Ok(JobState::Running(None));
        }
        let signals = agent_start::observe(&self.ctx.base.client, job).await?;
        match agent_start::decide(&signals, self.now(), self.ctx.config.agent_start_timeout) {
            AgentStart::Started => Ok(JobState::Running(None)),
            AgentStart::Waiting {
                reason, message, ..
            } => Ok(JobState::Running(Some(format!("{reason}: {message}")))),
            AgentStart::Failed { reason, message } if step == JobStep::Swap => {
                Ok(JobState::Running(Some(format!(
                    "{reason}: {message}; the swap goes on once its agent starts"
                ))))
            }
            AgentStart::Failed { reason, message } => {
                match self
                    .api::<Job>()
                    .delete(&job.name_any(), &DeleteParams::foreground())
                    .await
                {
                    Ok(_) => {}
                    Err(kube::Error::Api(e)) if e.code == 404 => {}
                    Err(e) => return Err(e.into()),
                }
                Ok(JobState::Refusing(reason.into(), message))
            }
        }
    }

    async fn job_state(&self, job: &Job, step: JobStep) -> Result<JobState, RestoreError> {
        let condition = |type_: &str| {
            job.status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .and_then(|c| c.iter().find(|c| c.type_ == type_ && c.status == "True"))
                .cloned()
        };
        let complete = condition("Complete").is_some();
        let failed = condition("Failed");
        if !complete && failed.is_none() {
            return self.unfinished_job_state(job, step).await;
        }
        // The agent's own words, from the newest terminated pod of the Job.
        let pods = self
            .api::<Pod>()
            .list(&ListParams::default().labels(&format!("job-name={}", job.name_any())))
            .await?;
        let mut results: Vec<(i32, String)> = pods
            .items
            .iter()
            .filter_map(|p| {
                let t = p
                    .status
                    .as_ref()?
                    .container_statuses
                    .as_ref()?
                    .first()?
                    .state
                    .as_ref()?
                    .terminated
                    .clone()?;
                Some((t.exit_code, t.message.unwrap_or_default()))
            })
            .collect();
        results.sort_by_key(|(code, _)| *code != 0);
        let parsed = |text: &str| serde_json::from_str::<RestoreResult>(text).ok();
        if complete {
            let result = results
                .iter()
                .find(|(code, _)| *code == 0)
                .and_then(|(_, text)| parsed(text))
                .unwrap_or_default();
            return Ok(JobState::Succeeded(result));
        }
        let (reason, message) = results
            .iter()
            .rev()
            .find_map(|(_, text)| {
                parsed(text).and_then(|r| Some((r.reason?, r.error.unwrap_or_default())))
            })
            .unwrap_or_else(|| {
                let c = failed.unwrap_or_default();
                if c.reason.as_deref() == Some("DeadlineExceeded") {
                    return (
                        "DeadlineExceeded".to_string(),
                        "the restore's deadline (spec.activeDeadlineSeconds, or the manager's --restore-deadline-seconds) passed while staging".to_string(),
                    );
                }
                (
                    "AgentFailed".to_string(),
                    format!(
                        "{}: {}",
                        c.reason.unwrap_or_default(),
                        c.message.unwrap_or_default()
                    ),
                )
            });
        Ok(JobState::Failed(reason, message))
    }

    async fn complete(&mut self, source: &Source, plan: &Plan) -> Result<Action, RestoreError> {
        let now = self.now();
        if plan.mode == RestoreMode::Clone
            && self.restore.spec.target.create_stateful_set
            && let Some(clone) = self.restore.spec.target.clone_stateful_set_name.clone()
        {
            let replicas = plan
                .clone_claims
                .keys()
                .filter_map(|c| c.rsplit('-').next()?.parse::<i32>().ok())
                .max()
                .map(|m| m + 1)
                .unwrap_or(1);
            let body: StatefulSet = serde_json::from_value(plan::clone_stateful_set(
                &source.manifest.stateful_set,
                &clone,
                replicas,
                &self.restore,
            ))?;
            match self
                .api::<StatefulSet>()
                .create(&PostParams::default(), &body)
                .await
            {
                Ok(_) => {}
                Err(kube::Error::Api(e)) if e.code == 409 => {}
                Err(e) => return Err(e.into()),
            }
        }
        self.status.phase = Some(RestorePhase::Completed);
        self.status.step = Some("Done".into());
        self.status.verified = self.status.volumes.iter().all(|v| v.verified);
        let seconds = self.finish_times(now);
        let message = match plan.mode {
            RestoreMode::InPlace => format!(
                "{} volume(s) restored and verified; StatefulApp {} comes back at {} replica(s)",
                plan.items.len(),
                self.restore.spec.target.app,
                self.status.previous_replicas.unwrap_or(1)
            ),
            RestoreMode::Clone => format!(
                "{} clone volume(s) restored and verified{}",
                plan.items.len(),
                if self.restore.spec.target.create_stateful_set {
                    "; StatefulSet created"
                } else {
                    ""
                }
            ),
            RestoreMode::Exec => format!(
                "{} dump(s) verified and loaded by the restore command",
                plan.items.len()
            ),
        };
        self.set_ready(true, "Completed", message.clone());
        self.write_status().await?;
        self.release_lock().await?;
        self.app_section(false).await;
        self.ctx
            .metrics
            .runs
            .get_or_create(&ResultLabels {
                result: "completed".into(),
            })
            .inc();
        self.ctx.metrics.duration.observe(seconds);
        self.event(
            EventType::Normal,
            "Completed",
            format!(
                "{message} in {}",
                self.status.duration.clone().unwrap_or_default()
            ),
        )
        .await;
        Ok(Action::await_change())
    }

    fn finish_times(&mut self, now: chrono::DateTime<chrono::Utc>) -> f64 {
        self.status.completion_time = Some(time::rfc3339(now));
        let started = self
            .status
            .start_time
            .as_deref()
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
            .map(|t| t.with_timezone(&chrono::Utc))
            .unwrap_or(now);
        let seconds = (now - started).num_milliseconds().max(0) as f64 / 1000.0;
        self.status.duration = Some(format!("{}s", seconds.round() as i64));
        seconds
    }

    /// Ends the restore as Failed: condition, Warning event, metric, lock released (an
    /// in-place app comes back with its old data) — except after a swap began, where the
    /// lock stays and the app stays stopped.
    async fn fail(&mut self, mut refusal: Refusal) -> Result<Action, RestoreError> {
        let now = self.now();
        if refusal.reason != "SwapIncomplete"
            && let Some(note) = self.swap_incomplete().await?
        {
            // A take-over of an incomplete swap failed before its own swap: the app
            // still must not come back on what the earlier swap left.
            refusal.message = format!(
                "{} — StatefulApp {} stays stopped: an earlier swap is incomplete ({note}); create a new Restore once the cause is fixed",
                refusal.message, self.restore.spec.target.app
            );
        }
        self.status.phase = Some(RestorePhase::Failed);
        self.status.step = Some("Done".into());
        self.status.verified = false;
        if self.status.start_time.is_none() {
            self.status.start_time = Some(time::rfc3339(now));
        }
        let seconds = self.finish_times(now);
        self.set_ready(false, refusal.reason, refusal.message.clone());
        self.write_status().await?;
        self.release_lock().await?;
        self.app_section(false).await;
        self.ctx
            .metrics
            .runs
            .get_or_create(&ResultLabels {
                result: "failed".into(),
            })
            .inc();
        self.ctx.metrics.duration.observe(seconds);
        self.event(EventType::Warning, refusal.reason, refusal.message)
            .await;
        Ok(Action::await_change())
    }
}

/// An agent Job's state.
#[derive(Debug, Clone)]
enum JobState {
    /// Running, or waiting for its pod with a note saying for what.
    Running(Option<String>),
    Succeeded(RestoreResult),
    Failed(String, String),
    /// Its pod never started within the bound; its Job is being deleted.
    Refusing(String, String),
    /// Its pod never started within the bound and its Job is gone: nothing of this step
    /// touched the volume.
    NeverStarted(String, String),
}

impl JobState {
    fn failure(&self) -> Option<(String, String)> {
        match self {
            Self::Failed(reason, message) | Self::NeverStarted(reason, message) => {
                Some((reason.clone(), message.clone()))
            }
            _ => None,
        }
    }

    /// `<reason>: <message>` of what a running Job waits for.
    fn waiting_note(&self) -> Option<String> {
        match self {
            Self::Running(note) => note.clone(),
            Self::Refusing(reason, message) => Some(format!("{reason}: {message}")),
            _ => None,
        }
    }

    fn is_running(&self) -> bool {
        matches!(self, Self::Running(_) | Self::Refusing(..))
    }
}

fn volume_phase(volume: &mut RestoreVolumeStatus, step: JobStep, state: &JobState) {
    // A failed volume stays Failed with its reason while the others are discarded.
    if step == JobStep::Discard && volume.phase == "Failed" {
        return;
    }
    match state {
        JobState::Refusing(reason, message) => {
            volume.agent_never_started = true;
            volume.message = Some(format!("{reason}: {message}"));
        }
        JobState::Running(note) => {
            volume.message = note.clone();
            volume.phase = match step {
                JobStep::Stage => "Staging",
                JobStep::Swap => "Swapping",
                JobStep::Discard => "Discarding",
                JobStep::Exec => "Restoring",
            }
            .into();
        }
        JobState::Succeeded(result) => {
            match step {
                JobStep::Stage => volume.phase = "Staged".into(),
                JobStep::Swap | JobStep::Exec => volume.phase = "Completed".into(),
                JobStep::Discard => {
                    if volume.phase != "Failed" {
                        volume.phase = "Discarded".into();
                    }
                    return;
                }
            }
            volume.verified = result.verified;
            volume.bytes_written = i64::try_from(result.bytes_written).ok();
            volume.files = (result.files > 0)
                .then(|| i64::try_from(result.files).ok())
                .flatten();
            volume.sha256 = (!result.sha256.is_empty()).then(|| result.sha256.clone());
            volume.duration_seconds = Some((result.duration_seconds * 1000.0).round() / 1000.0);
            volume.recovered |= result.recovered;
            volume.message = None;
        }
        JobState::Failed(reason, message) | JobState::NeverStarted(reason, message) => {
            if step == JobStep::Discard {
                return;
            }
            volume.phase = "Failed".into();
            volume.verified = false;
            volume.message = Some(format!("{reason}: {message}"));
        }
    }
}

/// Condition reasons are `&'static str` in [`Refusal`]; agent reasons are a known set.
fn leak_reason(reason: &str) -> &'static str {
    match reason {
        "ChecksumMismatch" => "ChecksumMismatch",
        "ArchiveRefused" => "ArchiveRefused",
        "NotEnoughSpace" => "NotEnoughSpace",
        "StorageError" => "StorageError",
        "StagingLost" => "StagingLost",
        "RestoreCommandFailed" => "RestoreCommandFailed",
        "NoIdentity" => "NoIdentity",
        "NoCredentials" => "NoCredentials",
        "ExecFailed" => "ExecFailed",
        "WriteFailed" => "WriteFailed",
        "VolumeMissing" => "VolumeMissing",
        "Deleted" => "Deleted",
        "AgentJobRefused" => "AgentJobRefused",
        "AgentPodRefused" => "AgentPodRefused",
        "AgentUnschedulable" => "AgentUnschedulable",
        "AgentNotStarted" => "AgentNotStarted",
        "DeadlineExceeded" => "DeadlineExceeded",
        _ => "AgentFailed",
    }
}
