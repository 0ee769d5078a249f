//! The per-app operation lock.
//!
//! Operations that change an app's data or shape (backup hooks and runs, restore,
//! scale-down, volume expansion) exclude each other per StatefulSet. The lock is a
//! `coordination.k8s.io` Lease named after the StatefulSet (`stateward-sts-<name>`;
//! one StatefulApp manages a StatefulSet, see `ownership`), written with resourceVersion
//! preconditions (create, or replace at the version read), so two writers never both
//! win. The Lease records the holder (apiVersion/resource/kind/name/uid of the operation
//! object), an intent (e.g. `Stop` with the replica count to come back to) and a token.
//! A nested operation (the backup a scale-down asks for first) presents its parent's
//! token and runs under the parent's lock instead of deadlocking on it. A lock whose
//! holder object is gone (or finished) is recovered by the next acquirer — except a lock
//! whose record says a restore's swap began and did not finish (`incompleteSwap`): the
//! app's volumes may hold a mix of old and new data, so the app stays stopped and only
//! another in-place Restore (whose agents finish the volume's journal first) may take
//! the lock over; it inherits the mark until its own swap completes.
//!
//! Upgrades: earlier managers (0.1) named the Lease after the app (`stateward-app-<app>`).
//! The first acquirer after an upgrade moves such a record — holder, token, marks — to
//! the StatefulSet's Lease and deletes the old one, so an operation that began before the
//! upgrade keeps its lock (its token still releases it) and a marked swap stays marked.

use chrono::{DateTime, Utc};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use kube::api::{ApiResource, DeleteParams, DynamicObject, PostParams, Preconditions};
use kube::{Api, Client};
use serde::{Deserialize, Serialize};

use crate::names;
use crate::time::to_k8s_micro_time;

/// Annotation holding the [`LockRecord`] as JSON.
pub const RECORD_ANNOTATION: &str = "stateward.io/operation-lock";

/// The object whose operation holds the lock.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Holder {
    /// e.g. `stateward.io/v1alpha1`.
    pub api_version: String,
    /// e.g. `Backup`.
    pub kind: String,
    /// Plural resource name, e.g. `backups` (to look the holder up without discovery).
    pub resource: String,
    pub name: String,
    pub uid: String,
}

impl Holder {
    fn identity(&self) -> String {
        format!("{}/{}/{}", self.kind, self.name, self.uid)
    }
}

/// What the holder intends to do to the app, so others (and a restarted manager) know.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(tag = "type")]
pub enum Intent {
    /// Read the app's data (a backup).
    Read,
    /// Stop the app, then bring it back to `replicas`.
    Stop { replicas: i32 },
    /// Change the app's data in place (a restore).
    Write,
    /// Change the app's shape (scale down, expand volumes).
    Reshape,
}

/// The lock's content.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct LockRecord {
    pub holder: Holder,
    pub intent: Intent,
    /// Presented by nested operations to run under this lock.
    pub token: String,
    pub acquired_at: DateTime<Utc>,
    /// Set by a restore before its first swap rename: which restore began swapping and
    /// what the user must do. While set, the app stays stopped whoever holds the lock.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub incomplete_swap: Option<String>,
    /// The uid of the one operation the holder created to run under this lock (the Backup
    /// a scale-down asks for first): only it may present the token. A copied annotation on
    /// any other object does not open the lock.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nested: Option<String>,
}

/// The outcome of an acquisition.
#[derive(Debug, Clone, PartialEq)]
pub enum Acquired {
    /// The caller holds the lock (newly, or again after a restart).
    Held(LockRecord),
    /// The caller runs under its parent's lock; nothing to release.
    Nested(LockRecord),
    /// Someone else holds it; wait and retry.
    Busy(LockRecord),
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("reading or writing the operation lock")]
    Kube(#[from] kube::Error),
    #[error("the operation lock's record is unreadable")]
    Record(#[from] serde_json::Error),
    #[error("lost a race for the operation lock {attempts} times in a row")]
    Contention { attempts: u32 },
    #[error("the operation lock is not held by this operation")]
    NotHeld,
}

/// What to do, given the current record (pure: unit-tested).
#[derive(Debug, PartialEq)]
enum Decision {
    Take,
    AlreadyHeld,
    Nested,
    Busy,
}

fn decide(
    current: Option<&LockRecord>,
    holder: &Holder,
    intent: &Intent,
    parent_token: Option<&str>,
    holder_alive: bool,
) -> Decision {
    match current {
        None => Decision::Take,
        Some(record) if record.holder.uid == holder.uid => Decision::AlreadyHeld,
        Some(record) if record.incomplete_swap.is_some() => {
            // Mixed data on the volumes: nothing may read or reshape it, and only a
            // restore that stops the app (and so finishes the journals) may take over.
            let restore = holder.kind == RESTORE_KIND && matches!(intent, Intent::Stop { .. });
            if restore && !holder_alive {
                Decision::Take
            } else {
                Decision::Busy
            }
        }
        Some(record)
            if parent_token == Some(record.token.as_str())
                && record.nested.as_deref() == Some(holder.uid.as_str()) =>
        {
            Decision::Nested
        }
        Some(_) if !holder_alive => Decision::Take,
        Some(_) => Decision::Busy,
    }
}

/// The holder kind that may take over a lock marked `incomplete_swap`.
const RESTORE_KIND: &str = "Restore";

/// The name of the Lease that locks StatefulSet `stateful_set` (one lock per StatefulSet,
/// whichever app manages it).
pub fn lease_name(stateful_set: &str) -> String {
    names::bounded(&format!("stateward-sts-{stateful_set}"), 63, false)
}

/// The lock record a Lease carries, if any (read from a cached Lease too).
pub fn record_in(lease: &Lease) -> Result<Option<LockRecord>, LockError> {
    match lease
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(RECORD_ANNOTATION))
    {
        Some(json) if !json.is_empty() => Ok(Some(serde_json::from_str(json)?)),
        _ => Ok(None),
    }
}

/// The lock of one app.
#[derive(Clone)]
pub struct OperationLock {
    client: Client,
    namespace: String,
    lease_name: String,
    /// The Lease an earlier manager (0.1) used for the app (see the module doc).
    legacy_lease: String,
}

impl OperationLock {
    /// The lock of StatefulSet `stateful_set`, managed by StatefulApp `app`.
    pub fn new(client: Client, namespace: &str, app: &str, stateful_set: &str) -> Self {
        Self {
            client,
            namespace: namespace.to_string(),
            lease_name: lease_name(stateful_set),
            legacy_lease: names::bounded(&format!("stateward-app-{app}"), 63, false),
        }
    }

    /// Moves a record left in the app-named Lease of an earlier manager to the
    /// StatefulSet's Lease (when that has none), then deletes the old Lease. A leftover
    /// whose holder is still alive while the StatefulSet's Lease is held by another stays,
    /// and is returned: it blocks acquisitions until its holder ends.
    async fn migrate_legacy(&self) -> Result<Option<LockRecord>, LockError> {
        let Some(old) = self.api().get_opt(&self.legacy_lease).await? else {
            return Ok(None);
        };
        if let Some(record) = record_in(&old)? {
            match self.api().get_opt(&self.lease_name).await? {
                None => {
                    let lease = self.lease_with(None, &record)?;
                    match self.api().create(&PostParams::default(), &lease).await {
                        Ok(_) => {
                            tracing::info!(from = %self.legacy_lease, to = %self.lease_name, holder = %record.holder.identity(), "moved an operation lock to its StatefulSet's Lease");
                        }
                        // Someone else moved it, or took the new lock first.
                        Err(kube::Error::Api(s)) if s.code == 409 => {}
                        Err(e) => return Err(e.into()),
                    }
                }
                Some(current) => {
                    let same = record_in(&current)?.is_some_and(|c| c.token == record.token);
                    if !same
                        && (record.incomplete_swap.is_some()
                            || self.holder_alive(&record.holder).await?)
                    {
                        return Ok(Some(record));
                    }
                }
            }
        }
        let params = DeleteParams {
            preconditions: Some(Preconditions {
                resource_version: old.metadata.resource_version.clone(),
                uid: old.metadata.uid.clone(),
            }),
            ..DeleteParams::default()
        };
        match self.api().delete(&self.legacy_lease, &params).await {
            Ok(_) => Ok(None),
            Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// `existing` (or a new Lease) carrying `record`.
    fn lease_with(&self, existing: Option<Lease>, record: &LockRecord) -> Result<Lease, LockError> {
        let mut lease = existing.unwrap_or_else(|| Lease {
            metadata: kube::api::ObjectMeta {
                name: Some(self.lease_name.clone()),
                labels: Some(
                    [(
                        "app.kubernetes.io/managed-by".to_string(),
                        "stateward".to_string(),
                    )]
                    .into(),
                ),
                ..Default::default()
            },
            ..Default::default()
        });
        Self::write_record(&mut lease, record)?;
        lease.spec = Some(LeaseSpec {
            holder_identity: Some(record.holder.identity()),
            acquire_time: Some(to_k8s_micro_time(record.acquired_at)),
            renew_time: Some(to_k8s_micro_time(record.acquired_at)),
            ..Default::default()
        });
        Ok(lease)
    }

    pub fn lease_name(&self) -> &str {
        &self.lease_name
    }

    fn api(&self) -> Api<Lease> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    /// Puts `record` into the Lease's annotation (the inverse of [`record_in`]).
    fn write_record(lease: &mut Lease, record: &LockRecord) -> Result<(), LockError> {
        lease
            .metadata
            .annotations
            .get_or_insert_with(Default::default)
            .insert(
                RECORD_ANNOTATION.to_string(),
                serde_json::to_string(record)?,
            );
        Ok(())
    }

    /// The current record, if the lock is held (also in an earlier manager's app-named
    /// Lease not moved yet).
    pub async fn current(&self) -> Result<Option<LockRecord>, LockError> {
        for name in [&self.lease_name, &self.legacy_lease] {
            if let Some(lease) = self.api().get_opt(name).await?
                && let Some(record) = record_in(&lease)?
            {
                return Ok(Some(record));
            }
        }
        Ok(None)
    }

    /// Whether the holder object still exists with the same uid and has not finished
    /// (`status.phase` Completed, Failed or Succeeded).
    pub async fn holder_alive(&self, holder: &Holder) -> Result<bool, LockError> {
        let (group, version) = match holder.api_version.split_once('/') {
            Some((g, v)) => (g.to_string(), v.to_string()),
            None => (String::new(), holder.api_version.clone()),
        };
        let resource = ApiResource {
            group,
            version,
            api_version: holder.api_version.clone(),
            kind: holder.kind.clone(),
            plural: holder.resource.clone(),
        };
        let api: Api<DynamicObject> =
            Api::namespaced_with(self.client.clone(), &self.namespace, &resource);
        let Some(object) = api.get_opt(&holder.name).await? else {
            return Ok(false);
        };
        if object.metadata.uid.as_deref() != Some(holder.uid.as_str()) {
            return Ok(false);
        }
        let phase = object
            .data
            .pointer("/status/phase")
            .and_then(|p| p.as_str())
            .unwrap_or_default();
        Ok(!matches!(phase, "Completed" | "Failed" | "Succeeded"))
    }

    /// Tries to take the lock for `holder` (or to run under the parent's lock when
    /// `parent_token` is the current token). Never waits: `Busy` means try later.
    pub async fn acquire(
        &self,
        holder: Holder,
        intent: Intent,
        parent_token: Option<&str>,
    ) -> Result<Acquired, LockError> {
        const ATTEMPTS: u32 = 5;
        if let Some(blocker) = self.migrate_legacy().await?
            && blocker.holder.uid != holder.uid
        {
            return Ok(Acquired::Busy(blocker));
        }
        for _ in 0..ATTEMPTS {
            let existing = self.api().get_opt(&self.lease_name).await?;
            let current = match &existing {
                Some(lease) => record_in(lease)?,
                None => None,
            };
            let alive = match &current {
                Some(record) if record.holder.uid != holder.uid => {
                    self.holder_alive(&record.holder).await?
                }
                _ => true,
            };
            match decide(current.as_ref(), &holder, &intent, parent_token, alive) {
                Decision::AlreadyHeld => {
                    return Ok(Acquired::Held(
                        current.unwrap_or_else(|| unreachable_record(&holder)),
                    ));
                }
                Decision::Nested => {
                    return Ok(Acquired::Nested(
                        current.unwrap_or_else(|| unreachable_record(&holder)),
                    ));
                }
                Decision::Busy => {
                    return Ok(Acquired::Busy(
                        current.unwrap_or_else(|| unreachable_record(&holder)),
                    ));
                }
                Decision::Take => {}
            }
            if let Some(previous) = &current {
                tracing::info!(lock = %self.lease_name, previous = %previous.holder.identity(), "recovering an operation lock whose holder is gone or finished");
            }
            let record = LockRecord {
                holder: holder.clone(),
                intent: intent.clone(),
                token: new_token(),
                acquired_at: Utc::now(),
                // A take-over inherits the mark: only a completed swap clears it.
                incomplete_swap: current.as_ref().and_then(|c| c.incomplete_swap.clone()),
                nested: None,
            };
            let lease = self.lease_with(existing, &record)?;
            // create fails with 409 if someone created it first; replace carries the
            // resourceVersion we read and fails with 409 if someone wrote since.
            let written = if lease.metadata.resource_version.is_some() {
                self.api()
                    .replace(&self.lease_name, &PostParams::default(), &lease)
                    .await
            } else {
                self.api().create(&PostParams::default(), &lease).await
            };
            match written {
                Ok(_) => return Ok(Acquired::Held(record)),
                Err(kube::Error::Api(status)) if status.code == 409 => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(LockError::Contention { attempts: ATTEMPTS })
    }

    /// Marks the lock held by `token` with an incomplete swap (see the module doc), before
    /// the first rename of a restore's swap. Idempotent.
    pub async fn mark_incomplete_swap(&self, token: &str, note: &str) -> Result<(), LockError> {
        self.rewrite_record(token, |record| {
            if record.incomplete_swap.is_some() {
                return false;
            }
            record.incomplete_swap = Some(note.to_string());
            true
        })
        .await
    }

    /// Lets the operation with `uid` (which the holder of `token` just created) run under
    /// this lock by presenting the token. Idempotent.
    pub async fn allow_nested(&self, token: &str, uid: &str) -> Result<(), LockError> {
        self.rewrite_record(token, |record| {
            if record.nested.as_deref() == Some(uid) {
                return false;
            }
            record.nested = Some(uid.to_string());
            true
        })
        .await
    }

    /// Changes the record of the lock held by `token` (`change` returns false when there
    /// is nothing to write), replacing the Lease at the version read.
    async fn rewrite_record(
        &self,
        token: &str,
        change: impl Fn(&mut LockRecord) -> bool,
    ) -> Result<(), LockError> {
        self.migrate_legacy().await?;
        for _ in 0..5 {
            let Some(mut lease) = self.api().get_opt(&self.lease_name).await? else {
                return Err(LockError::NotHeld);
            };
            let Some(mut record) = record_in(&lease)?.filter(|r| r.token == token) else {
                return Err(LockError::NotHeld);
            };
            if !change(&mut record) {
                return Ok(());
            }
            Self::write_record(&mut lease, &record)?;
            match self
                .api()
                .replace(&self.lease_name, &PostParams::default(), &lease)
                .await
            {
                Ok(_) => return Ok(()),
                Err(kube::Error::Api(status)) if status.code == 409 => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(LockError::Contention { attempts: 5 })
    }

    /// Releases the lock if `token` still holds it (deleting the Lease with a
    /// resourceVersion precondition). Releasing a lock one does not hold is a no-op.
    pub async fn release(&self, token: &str) -> Result<bool, LockError> {
        // Also the app-named Lease of an earlier manager, for an operation that began
        // before the upgrade and ends before it acquires again.
        for name in [&self.lease_name, &self.legacy_lease] {
            let Some(lease) = self.api().get_opt(name).await? else {
                continue;
            };
            match record_in(&lease)? {
                Some(record) if record.token == token => {}
                _ => continue,
            }
            let params = DeleteParams {
                preconditions: Some(Preconditions {
                    resource_version: lease.metadata.resource_version.clone(),
                    uid: lease.metadata.uid.clone(),
                }),
                ..DeleteParams::default()
            };
            return match self.api().delete(name, &params).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => Ok(false),
                Err(e) => Err(e.into()),
            };
        }
        Ok(false)
    }
}

fn unreachable_record(holder: &Holder) -> LockRecord {
    // decide() only answers AlreadyHeld/Nested/Busy with a current record; this keeps
    // the code free of unwrap without a panic path.
    LockRecord {
        holder: holder.clone(),
        intent: Intent::Read,
        token: String::new(),
        acquired_at: Utc::now(),
        incomplete_swap: None,
        nested: None,
    }
}

fn new_token() -> String {
    use rand::Rng;
    let bytes: [u8; 16] = rand::rng().random();
    hex::encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn holder(uid: &str) -> Holder {
        Holder {
            api_version: "stateward.io/v1alpha1".into(),
            kind: "Backup".into(),
            resource: "backups".into(),
            name: format!("b-{uid}"),
            uid: uid.into(),
        }
    }

    fn record(uid: &str, token: &str) -> LockRecord {
        LockRecord {
            holder: holder(uid),
            intent: Intent::Stop { replicas: 3 },
            token: token.into(),
            acquired_at: Utc::now(),
            incomplete_swap: None,
            nested: None,
        }
    }

    /// A record whose holder created operation `child` to run under it.
    fn parent_of(child: &str) -> LockRecord {
        LockRecord {
            nested: Some(child.into()),
            ..record("2", "t")
        }
    }

    fn swapping(uid: &str) -> LockRecord {
        LockRecord {
            incomplete_swap: Some("Restore r began swapping".into()),
            ..record(uid, "t")
        }
    }

    #[test]
    fn decisions() {
        let mine = holder("1");
        let restore = Holder {
            kind: "Restore".into(),
            ..holder("1")
        };
        let stop = Intent::Stop { replicas: 2 };
        // (current, acquirer, intent, parent token, current holder alive) → decision
        type Row<'a> = (
            Option<LockRecord>,
            &'a Holder,
            &'a Intent,
            Option<&'a str>,
            bool,
            Decision,
            &'a str,
        );
        let table: Vec<Row> = vec![
            (
                None,
                &mine,
                &Intent::Read,
                None,
                true,
                Decision::Take,
                "free",
            ),
            (
                Some(record("1", "t")),
                &mine,
                &Intent::Read,
                None,
                true,
                Decision::AlreadyHeld,
                "ours",
            ),
            (
                Some(parent_of("1")),
                &mine,
                &Intent::Read,
                Some("t"),
                true,
                Decision::Nested,
                "the parent's token, presented by the child it created",
            ),
            (
                Some(parent_of("3")),
                &mine,
                &Intent::Read,
                Some("t"),
                true,
                Decision::Busy,
                "the parent's token copied onto another operation",
            ),
            (
                Some(record("2", "t")),
                &mine,
                &Intent::Read,
                Some("t"),
                true,
                Decision::Busy,
                "the token, but the parent named no child",
            ),
            (
                Some(record("2", "t")),
                &mine,
                &Intent::Read,
                Some("other"),
                true,
                Decision::Busy,
                "wrong token",
            ),
            (
                Some(record("2", "t")),
                &mine,
                &Intent::Read,
                None,
                true,
                Decision::Busy,
                "held",
            ),
            (
                Some(record("2", "t")),
                &mine,
                &Intent::Read,
                None,
                false,
                Decision::Take,
                "a dead holder is recovered",
            ),
            (
                Some(swapping("2")),
                &mine,
                &Intent::Read,
                None,
                false,
                Decision::Busy,
                "no backup of mixed data",
            ),
            (
                Some(swapping("2")),
                &mine,
                &Intent::Read,
                Some("t"),
                false,
                Decision::Busy,
                "not even nested",
            ),
            (
                Some(swapping("2")),
                &restore,
                &Intent::Write,
                None,
                false,
                Decision::Busy,
                "a restore that does not stop the app",
            ),
            (
                Some(swapping("2")),
                &restore,
                &stop,
                None,
                true,
                Decision::Busy,
                "the swapping restore still runs",
            ),
            (
                Some(swapping("2")),
                &restore,
                &stop,
                None,
                false,
                Decision::Take,
                "a new in-place restore takes over",
            ),
            (
                Some(swapping("1")),
                &restore,
                &stop,
                None,
                true,
                Decision::AlreadyHeld,
                "the swapping restore itself",
            ),
        ];
        for (current, who, intent, token, alive, expected, why) in table {
            assert_eq!(
                decide(current.as_ref(), who, intent, token, alive),
                expected,
                "{why}"
            );
        }
    }

    #[test]
    fn records_serialise_with_their_intent() -> Result<(), serde_json::Error> {
        let r = record("1", "t");
        let json = serde_json::to_string(&r)?;
        assert!(
            json.contains(r#""intent":{"type":"Stop","replicas":3}"#),
            "{json}"
        );
        assert_eq!(serde_json::from_str::<LockRecord>(&json)?, r);
        Ok(())
    }
}
