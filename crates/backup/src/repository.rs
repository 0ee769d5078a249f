//! BackupRepository checks: the Secret references resolve, the bucket answers, and a
//! write/delete probe under the prefix succeeds. The outcome is the `Ready` condition with
//! a reason a user can act on, a Warning event when it is not ready, and a gauge.

use std::sync::Arc;
use std::time::Duration;

use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use chrono::{DateTime, Utc};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Api, Resource, ResourceExt};
use stateward_agent::repository::AccessError;
use stateward_api::BackupRepository;
use stateward_api::common::SecretKeyRef;
use stateward_api::repository::Encryption;
use stateward_runtime::{Context, apply, conditions, time};

/// How often a ready repository is checked again.
pub const RECHECK: Duration = Duration::from_secs(300);

/// What the repository loop writes in a repository's status.
const STATUS_FIELDS: apply::StatusFields = apply::StatusFields {
    keys: &["observedGeneration"],
    conditions: &["Ready"],
};

/// Why a repository is not ready; each variant is a condition reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Ready,
    SecretNotFound(String),
    /// The Secret lacks the opt-in label: nothing was read from it or sent.
    SecretNotAllowed(String),
    KeyMissing {
        secret: String,
        key: String,
    },
    InvalidCredentials(String),
    AccessDenied(String),
    NoSuchBucket(String),
    EndpointUnreachable(String),
    ProbeFailed(String),
    EncryptionKeyInvalid {
        secret: String,
        key: String,
    },
    /// The identity Secret holds a valid key that is not the recipient's private half:
    /// backups encrypted to the recipient could never be restored with it.
    EncryptionKeyMismatch {
        recipient: SecretKeyRef,
        identity: SecretKeyRef,
    },
}

impl Verdict {
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Ready => "Reachable",
            Self::SecretNotFound(_) => "SecretNotFound",
            Self::SecretNotAllowed(_) => "SecretNotAllowed",
            Self::KeyMissing { .. } => "KeyMissing",
            Self::InvalidCredentials(_) => "InvalidCredentials",
            Self::AccessDenied(_) => "AccessDenied",
            Self::NoSuchBucket(_) => "NoSuchBucket",
            Self::EndpointUnreachable(_) => "EndpointUnreachable",
            Self::ProbeFailed(_) => "ProbeFailed",
            Self::EncryptionKeyInvalid { .. } => "EncryptionKeyInvalid",
            Self::EncryptionKeyMismatch { .. } => "EncryptionKeyMismatch",
        }
    }

    /// A sentence for the user. Never contains credentials: only names and S3 error codes.
    pub fn message(&self, bucket: &str) -> String {
        match self {
            Self::Ready => format!("bucket {bucket} is reachable and writable under the prefix"),
            Self::SecretNotFound(name) => {
                format!("Secret {name} (credentials) not found in this namespace")
            }
            Self::SecretNotAllowed(name) => {
                stateward_agent::repository::AccessError::NotAllowed(name.clone()).to_string()
            }
            Self::KeyMissing { secret, key } => format!("Secret {secret} has no key {key}"),
            Self::InvalidCredentials(detail) => {
                format!("the S3 server rejected the credentials: {detail}")
            }
            Self::AccessDenied(detail) => format!("access to bucket {bucket} denied: {detail}"),
            Self::NoSuchBucket(_) => format!("bucket {bucket} does not exist"),
            Self::EndpointUnreachable(detail) => {
                format!("the S3 endpoint cannot be reached: {detail}")
            }
            Self::ProbeFailed(detail) => {
                format!("writing a probe object under the prefix failed: {detail}")
            }
            Self::EncryptionKeyInvalid { secret, key } => format!(
                "Secret {secret} key {key} is not an age key of the kind spec.encryption expects (the recipient: age1..., from `age-keygen -y`; the identity: AGE-SECRET-KEY-1...)"
            ),
            Self::EncryptionKeyMismatch {
                recipient,
                identity,
            } => format!(
                "spec.encryption.identity (Secret {} key {}) is not the private key of spec.encryption.recipient (Secret {} key {}): backups encrypted to that recipient could not be restored with it, so none are taken; put the matching pair in the Secrets (`age-keygen -y` prints an identity's recipient)",
                identity.name, identity.key, recipient.name, recipient.key
            ),
        }
    }

    /// Whether checking again may succeed without anyone changing anything: the endpoint
    /// was unreachable or a probe object could not be written or deleted (a busy or
    /// restarting S3 server). Every other verdict needs a user to fix a Secret, a key, a
    /// policy or a bucket.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::EndpointUnreachable(_) | Self::ProbeFailed(_))
    }
}

/// Maps an S3 error to a verdict by its error code, never by its text.
fn classify<E: ProvideErrorMetadata + std::error::Error + 'static, R: std::fmt::Debug>(
    err: &SdkError<E, R>,
) -> Verdict {
    match err {
        SdkError::DispatchFailure(_) | SdkError::TimeoutError(_) => {
            Verdict::EndpointUnreachable(DisplayErrorContext(err).to_string())
        }
        _ => {
            let code = err.code().unwrap_or_default().to_string();
            let status = match err {
                SdkError::ServiceError(e) => format!("{:?}", e.raw()).contains("403"),
                _ => false,
            };
            match code.as_str() {
                "NoSuchBucket" | "NotFound" => Verdict::NoSuchBucket(code),
                "InvalidAccessKeyId" | "SignatureDoesNotMatch" => Verdict::InvalidCredentials(code),
                "AccessDenied" | "Forbidden" => Verdict::AccessDenied(code),
                "" if status => Verdict::AccessDenied("403".into()),
                "" => Verdict::EndpointUnreachable(DisplayErrorContext(err).to_string()),
                other => Verdict::ProbeFailed(other.to_string()),
            }
        }
    }
}

impl From<AccessError> for Verdict {
    fn from(e: AccessError) -> Self {
        match e {
            AccessError::SecretNotFound(name) => Self::SecretNotFound(name),
            AccessError::NotAllowed(name) => Self::SecretNotAllowed(name),
            AccessError::KeyMissing { secret, key } => Self::KeyMissing { secret, key },
            AccessError::Api { .. } => Self::EndpointUnreachable(e.to_string()),
        }
    }
}

async fn secret_value(secrets: &Api<Secret>, r: &SecretKeyRef) -> Result<String, Verdict> {
    Ok(stateward_agent::repository::secret_value(secrets, r).await?)
}

/// An S3 client for the repository, with the credentials from its Secret: the one way
/// the controller (checks, runs, sweeps) talks to a repository.
pub async fn s3_client(
    client: &kube::Client,
    repo: &BackupRepository,
) -> Result<aws_sdk_s3::Client, Verdict> {
    Ok(stateward_agent::repository::s3_client(client, repo).await?)
}

/// Judges the encryption keys read from their Secrets: the recipient must parse before any
/// backup relies on it, the identity too, and the identity must be the recipient's
/// private half (a pair that does not match would take backups no one can restore).
pub fn encryption_verdict(
    encryption: &Encryption,
    recipient: &str,
    identity: Option<&str>,
) -> Result<(), Verdict> {
    let invalid = |r: &SecretKeyRef| Verdict::EncryptionKeyInvalid {
        secret: r.name.clone(),
        key: r.key.clone(),
    };
    let parsed_recipient = stateward_agent::crypto::parse_recipient(recipient)
        .map_err(|_| invalid(&encryption.recipient))?;
    let (Some(reference), Some(identity)) = (&encryption.identity, identity) else {
        return Ok(());
    };
    let parsed_identity =
        stateward_agent::crypto::parse_identity(identity).map_err(|_| invalid(reference))?;
    if !stateward_agent::crypto::identity_matches(&parsed_identity, &parsed_recipient) {
        return Err(Verdict::EncryptionKeyMismatch {
            recipient: encryption.recipient.clone(),
            identity: reference.clone(),
        });
    }
    Ok(())
}

/// Runs every check; the first failure decides.
pub async fn check(client: &kube::Client, repo: &BackupRepository) -> Verdict {
    let ns = repo.namespace().unwrap_or_default();
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let s3 = &repo.spec.s3;
    let s3_client = match s3_client(client, repo).await {
        Ok(c) => c,
        Err(v) => return v,
    };
    // Encryption: the recipient must parse before any backup relies on it.
    if let Some(encryption) = &repo.spec.encryption {
        let recipient = match secret_value(&secrets, &encryption.recipient).await {
            Ok(v) => v,
            Err(v) => return v,
        };
        let identity = match &encryption.identity {
            Some(r) => match secret_value(&secrets, r).await {
                Ok(v) => Some(v),
                Err(v) => return v,
            },
            None => None,
        };
        if let Err(v) = encryption_verdict(encryption, &recipient, identity.as_deref()) {
            return v;
        }
    }
    let client = s3_client;
    let head = tokio::time::timeout(
        Duration::from_secs(20),
        client.head_bucket().bucket(&s3.bucket).send(),
    )
    .await;
    match head {
        Err(_) => return Verdict::EndpointUnreachable("no answer within 20 s".into()),
        Ok(Err(e)) => return classify(&e),
        Ok(Ok(_)) => {}
    }
    // A write/delete probe under this namespace's part of the prefix: head alone does not
    // prove that backups can be written. Each probe has its own key: the repository loop
    // and any number of runs check the same repository at once, and on a shared key one's
    // delete races another's put.
    let probe = probe_key(
        s3.prefix.as_deref(),
        &ns,
        &repo.uid().unwrap_or_default(),
        probe_nonce(),
    );
    if let Err(e) = client
        .put_object()
        .bucket(&s3.bucket)
        .key(&probe)
        .body(aws_sdk_s3::primitives::ByteStream::from_static(
            b"stateward repository probe",
        ))
        .send()
        .await
    {
        return match classify(&e) {
            Verdict::EndpointUnreachable(d) | Verdict::ProbeFailed(d) => Verdict::ProbeFailed(d),
            other => other,
        };
    }
    if let Err(e) = client
        .delete_object()
        .bucket(&s3.bucket)
        .key(&probe)
        .send()
        .await
    {
        return Verdict::ProbeFailed(format!(
            "deleting the probe object: {}",
            e.code().unwrap_or("unknown")
        ));
    }
    Verdict::Ready
}

/// The key of one probe object: directly under the namespace's part of the prefix (where
/// the orphan sweep, which only looks at `<app>/<backup>-<uid>/...`, never goes), named
/// for the repository and made unique by `nonce`.
pub fn probe_key(prefix: Option<&str>, ns: &str, repo_uid: &str, nonce: u64) -> String {
    format!(
        "{}{PROBE_PREFIX}{repo_uid}-{nonce:016x}",
        stateward_agent::manifest::namespace_prefix(prefix, ns)
    )
}

/// How every probe object's name (the last segment of its key) begins.
pub const PROBE_PREFIX: &str = ".stateward-probe-";

/// A fresh 64-bit nonce per probe, without a dependency: std's `RandomState` is seeded
/// from the OS's randomness (so two managers differ), and the counter keeps two probes of
/// one process apart.
fn probe_nonce() -> u64 {
    use std::hash::BuildHasher;
    use std::sync::atomic::{AtomicU64, Ordering};
    static PROBES: AtomicU64 = AtomicU64::new(0);
    std::hash::RandomState::new().hash_one(PROBES.fetch_add(1, Ordering::Relaxed))
}

/// How long a run trusts the repository loop's last `Ready` verdict instead of probing
/// itself. Short because the loop does not watch the Secret or the bucket, long enough
/// that the runs started together right after a check (a schedule firing for several
/// apps, a demo) do not each probe again.
pub const TRUST_READY_FOR: Duration = Duration::from_secs(60);

/// The repository loop's last check of one repository, kept in memory (the loop and the
/// runs live in the same process): status records the verdict only when it changes, so
/// an idle repository costs no write, and the check's time lives here and in
/// `stateward_backup_repository_last_check_timestamp_seconds`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checked {
    /// The spec generation checked.
    pub generation: Option<i64>,
    pub ready: bool,
    pub at: DateTime<Utc>,
}

/// The last check of every repository, by uid.
#[derive(Debug, Default)]
pub struct RecentChecks(std::sync::Mutex<std::collections::HashMap<String, Checked>>);

impl RecentChecks {
    pub fn record(&self, repo: &BackupRepository, checked: Checked) {
        if let Ok(mut map) = self.0.lock() {
            map.insert(repo.uid().unwrap_or_default(), checked);
        }
    }

    pub fn get(&self, repo: &BackupRepository) -> Option<Checked> {
        let uid = repo.uid().unwrap_or_default();
        self.0.lock().ok().and_then(|map| map.get(&uid).copied())
    }
}

/// Whether the repository loop found `repo` ready, for its current spec, less than
/// [`TRUST_READY_FOR`] before `now` (a check stamped after `now` is not trusted).
pub fn recently_ready(repo: &BackupRepository, last: Option<Checked>, now: DateTime<Utc>) -> bool {
    let Some(last) = last else {
        return false;
    };
    let age = (now - last.at).to_std().ok();
    last.ready
        && last.generation == repo.meta().generation
        && age.is_some_and(|age| age < TRUST_READY_FOR)
}

/// The Backup condition a run that waits for its repository shows.
pub const RUN_CONDITION: &str = "RepositoryReady";

/// The reason of [`RUN_CONDITION`] while the run waits.
pub const WAITING_REASON: &str = "WaitingForRepository";

/// How long a run waits for its repository to pass a check after a transient failure,
/// counted from when [`RUN_CONDITION`] turned `False` (its `lastTransitionTime`), before
/// it fails with the verdict's reason. A restarting S3 server is back well within it.
pub const WAIT_FOR_REPOSITORY: Duration = Duration::from_secs(300);

/// The first and the longest delay between checks while a run waits.
const RETRY_FIRST: Duration = Duration::from_secs(5);
const RETRY_MAX: Duration = Duration::from_secs(60);

/// What a run that has not started does about its repository's verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunGate {
    /// Ready: the run goes on.
    Proceed,
    /// A transient failure within [`WAIT_FOR_REPOSITORY`]: the run stays Pending, checks
    /// again after `retry_in`, and fails if the repository is not ready by `until`.
    Wait {
        retry_in: Duration,
        until: DateTime<Utc>,
    },
    /// A permanent failure, or a transient one that outlasted the wait: the run fails
    /// with the verdict's reason.
    Fail,
}

/// Since when the run has been waiting for its repository: the `lastTransitionTime` of
/// its [`RUN_CONDITION`] while that is `False`.
pub fn waiting_since(run_conditions: &[Condition]) -> Option<DateTime<Utc>> {
    conditions::get(run_conditions, RUN_CONDITION)
        .filter(|c| c.status == "False")
        .map(|c| time::to_chrono(&c.last_transition_time))
}

/// The message of [`RUN_CONDITION`] while a run waits: which repository, what failed (the
/// verdict's message: names and S3 error codes, never a secret), and until when.
pub fn waiting_message(repo: &BackupRepository, verdict: &Verdict, until: DateTime<Utc>) -> String {
    format!(
        "waiting for BackupRepository {}: {}; checking again until {}, then the run fails with {}",
        repo.name_any(),
        verdict.message(&repo.spec.s3.bucket),
        time::rfc3339(until),
        verdict.reason()
    )
}

/// Decides from the verdict and the wait so far. The delay grows with the time waited
/// (5 s, 5 s, 10 s, 20 s, ... at most 60 s), so it is a back-off that survives a restart of
/// the manager, and the last check falls on the deadline.
pub fn gate(verdict: &Verdict, since: Option<DateTime<Utc>>, now: DateTime<Utc>) -> RunGate {
    if *verdict == Verdict::Ready {
        return RunGate::Proceed;
    }
    if !verdict.is_transient() {
        return RunGate::Fail;
    }
    let since = since.unwrap_or(now);
    let waited = (now - since).to_std().unwrap_or_default();
    let Some(left) = WAIT_FOR_REPOSITORY
        .checked_sub(waited)
        .filter(|l| !l.is_zero())
    else {
        return RunGate::Fail;
    };
    RunGate::Wait {
        retry_in: waited.clamp(RETRY_FIRST, RETRY_MAX).min(left),
        // From `since`, not `now`: the deadline (and the message naming it) stays the same
        // on every pass, so waiting writes the status once.
        until: since + chrono::Duration::seconds(WAIT_FOR_REPOSITORY.as_secs() as i64),
    }
}

/// Sweeps this namespace's manifest-less prefixes whose run is gone; returns how many.
async fn sweep_orphans(ctx: &RepositoryContext, repo: &BackupRepository) -> Result<usize, String> {
    use stateward_api::{Backup, BackupPhase};
    let ns = repo.namespace().unwrap_or_default();
    let s3 = &repo.spec.s3;
    let client = s3_client(&ctx.base.client, repo)
        .await
        .map_err(|v| v.message(&s3.bucket))?;
    let prefix = stateward_agent::manifest::namespace_prefix(s3.prefix.as_deref(), &ns);
    let listed = crate::sweep::list(&client, &s3.bucket, &prefix).await?;
    if listed.is_empty() {
        return Ok(0);
    }
    // Live runs: every Backup in the namespace that has not ended (a Pending one may be
    // about to write).
    let backups: Api<Backup> = Api::namespaced(ctx.base.client.clone(), &ns);
    let live = backups
        .list(&Default::default())
        .await
        .map_err(|e| format!("listing Backups: {e}"))?
        .items
        .into_iter()
        .filter(|b| {
            !matches!(
                b.status.as_ref().and_then(|s| s.phase),
                Some(BackupPhase::Completed | BackupPhase::Failed)
            )
        })
        .filter_map(|b| b.uid())
        .collect();
    let plan = crate::sweep::plan(
        &prefix,
        &listed,
        &live,
        ctx.base.clock.now(),
        ctx.orphan_grace,
    );
    if plan.prefixes.is_empty() {
        return Ok(0);
    }
    let (objects, uploads) = crate::sweep::execute(&client, &s3.bucket, &plan).await?;
    tracing::info!(namespace = %ns, repository = %repo.name_any(), prefixes = ?plan.prefixes, objects, uploads, "swept orphaned backup prefixes");
    Ok(plan.prefixes.len())
}

/// Shared state of the repository loop.
pub struct RepositoryContext {
    pub base: Context,
    /// The last check of each repository (shared with the runs).
    pub checks: Arc<RecentChecks>,
    /// `stateward_backup_repository_last_check_timestamp_seconds`.
    pub checked_gauge: prometheus_client::metrics::family::Family<
        RepoLabels,
        prometheus_client::metrics::gauge::Gauge,
    >,
    /// When each repository (namespace/name) is due for its next check. Our own status
    /// writes wake the controller too; this keeps them from starting a check storm.
    pub next_check: std::sync::Mutex<std::collections::HashMap<String, std::time::Instant>>,
    /// See [`crate::RunConfig::orphan_grace`].
    pub orphan_grace: Duration,
    /// `stateward_backup_orphans_swept_total`.
    pub swept: prometheus_client::metrics::counter::Counter,
    pub ready_gauge: prometheus_client::metrics::family::Family<
        RepoLabels,
        prometheus_client::metrics::gauge::Gauge,
    >,
}

/// Labels of the readiness gauge (repositories are few: per-object labels are fine).
#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct RepoLabels {
    pub namespace: String,
    pub repository: String,
}

#[derive(Debug, thiserror::Error)]
pub enum RepositoryError {
    #[error("writing the repository status")]
    Status(#[source] kube::Error),
}

impl RepositoryError {
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::Status(_) => "status",
        }
    }
}

/// The loop's name in metrics (its own: its timer-driven checks are told apart from runs).
pub const CONTROLLER: &str = "backup-repository";

/// fetch → check → status (+ event, gauge) → requeue.
pub async fn reconcile(
    repo: Arc<BackupRepository>,
    ctx: Arc<RepositoryContext>,
) -> Result<Action, RepositoryError> {
    let timer = ctx.base.metrics.reconcile.start(CONTROLLER);
    let ns = repo.namespace().unwrap_or_default();
    let name = repo.name_any();
    let key = format!("{ns}/{name}");
    let spec_seen =
        repo.status.as_ref().and_then(|s| s.observed_generation) == repo.meta().generation;
    let due = ctx
        .next_check
        .lock()
        .ok()
        .and_then(|m| m.get(&key).copied());
    if let (true, Some(due)) = (spec_seen, due) {
        let now = std::time::Instant::now();
        if now < due {
            timer.finish("requeue_after");
            return Ok(Action::requeue(due - now));
        }
    }
    let verdict = check(&ctx.base.client, &repo).await;
    let ready = verdict == Verdict::Ready;
    let now = ctx.base.clock.now();
    let mut list = repo
        .status
        .as_ref()
        .map(|s| s.conditions.clone())
        .unwrap_or_default();
    let message = verdict.message(&repo.spec.s3.bucket);
    conditions::set(
        &mut list,
        conditions::condition(
            "Ready",
            ready,
            verdict.reason(),
            message.clone(),
            repo.meta().generation,
        ),
        now,
    );
    let status = serde_json::json!({
        "observedGeneration": repo.meta().generation,
        "conditions": list,
    });
    let api: Api<BackupRepository> = Api::namespaced(ctx.base.client.clone(), &ns);
    // Written only when the verdict (or its message, or the spec checked) changed.
    let written = apply::apply_status_if_changed(
        &api,
        &name,
        apply::managers::BACKUP,
        &STATUS_FIELDS,
        repo.status.as_ref(),
        status,
    )
    .await;
    if let Err(e) = written {
        timer.finish("error");
        return Err(RepositoryError::Status(e));
    }
    ctx.checks.record(
        &repo,
        Checked {
            generation: repo.meta().generation,
            ready,
            at: now,
        },
    );
    let labels = RepoLabels {
        namespace: ns.clone(),
        repository: name.clone(),
    };
    ctx.ready_gauge.get_or_create(&labels).set(i64::from(ready));
    ctx.checked_gauge
        .get_or_create(&labels)
        .set(now.timestamp());
    // A failing repository is said at every check (a failing repository is not idle; a
    // healthy one sends nothing).
    if !ready {
        ctx.base
            .publish(
                &repo.object_ref(&()),
                EventType::Warning,
                verdict.reason(),
                "CheckRepository",
                message,
            )
            .await;
    }
    tracing::info!(namespace = %ns, repository = %name, reason = verdict.reason(), "checked repository");
    if ready {
        match sweep_orphans(&ctx, &repo).await {
            Ok(0) => {}
            Ok(swept) => {
                ctx.swept.inc_by(swept as u64);
                ctx.base
                    .publish(
                        &repo.object_ref(&()),
                        EventType::Normal,
                        "SweptOrphans",
                        "Sweep",
                        format!(
                            "removed {swept} backup prefix(es) without a manifest left by runs that crashed or were deleted"
                        ),
                    )
                    .await;
            }
            Err(e) => {
                tracing::warn!(repository = %name, error = %e, "sweeping orphaned prefixes failed; next check retries")
            }
        }
    }
    // Every outcome requeues after a delay (controller-runtime's `requeue_after`).
    timer.finish("requeue_after");
    // Not ready: check again soon with a per-object back-off (users fix Secrets and
    // buckets without touching the repository object); ready: the periodic re-check.
    let delay = if ready {
        ctx.base.backoff.on_success(&key);
        RECHECK
    } else {
        ctx.base
            .backoff
            .on_error(&key, stateward_runtime::backoff::ErrorKind::Transient)
            .unwrap_or(RECHECK)
            .min(Duration::from_secs(60))
    };
    if let Ok(mut next) = ctx.next_check.lock() {
        next.insert(key, std::time::Instant::now() + delay);
    }
    Ok(Action::requeue(delay))
}

/// Failed status writes back off per object.
pub fn error_policy(
    repo: Arc<BackupRepository>,
    err: &RepositoryError,
    ctx: Arc<RepositoryContext>,
) -> Action {
    let key = format!(
        "{}/{}",
        repo.namespace().unwrap_or_default(),
        repo.name_any()
    );
    tracing::warn!(repository = %key, error = %err, label = err.metric_label(), "reconcile failed");
    // The reconcile timer already counted this error.
    let delay = ctx
        .base
        .backoff
        .on_error(&key, stateward_runtime::backoff::ErrorKind::Transient)
        .unwrap_or(RECHECK);
    Action::requeue(delay)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_the_problem_and_never_a_secret_value() {
        let v = Verdict::KeyMissing {
            secret: "s3".into(),
            key: "accessKeyId".into(),
        };
        assert_eq!(v.reason(), "KeyMissing");
        assert_eq!(v.message("b"), "Secret s3 has no key accessKeyId");
        assert_eq!(
            Verdict::NoSuchBucket("NoSuchBucket".into()).message("backups"),
            "bucket backups does not exist"
        );
        assert_eq!(Verdict::Ready.reason(), "Reachable");
    }

    /// Two pairs made with `age-keygen` for this test (no secret: they guard nothing).
    const RECIPIENT_1: &str = "age1pyhe75njgjzyacud99lvs863skul2zx2q5y38m2tgsyz4640l9eqema7ud";
    const IDENTITY_1: &str =
        "AGE-SECRET-KEY-1VV0MZ33GGHN5PZ4VUSW6NL82U5P9TMTJE6XSSVXJ0XSQUATELF5QVZXFWH";
    const RECIPIENT_2: &str = "age1vjy5hw0xh775xws8nyk7ujwxv9tx4l03f6nvw3dd6g6s9dn999gqkcjtp9";

    #[test]
    fn an_identity_that_is_not_the_recipients_private_key_is_a_mismatch() {
        let key = |key: &str| SecretKeyRef {
            name: "age".into(),
            key: key.into(),
        };
        let encryption = |identity: bool| Encryption {
            recipient: key("recipient"),
            identity: identity.then(|| key("identity")),
        };
        let key_file =
            format!("# created: 2026-12-02T21:55:19Z\n# public key: {RECIPIENT_1}\n{IDENTITY_1}\n");
        let mismatch = Verdict::EncryptionKeyMismatch {
            recipient: key("recipient"),
            identity: key("identity"),
        };
        let invalid = |k: &str| Verdict::EncryptionKeyInvalid {
            secret: "age".into(),
            key: k.into(),
        };
        // (case, with an identity reference, recipient, identity, verdict)
        type Case<'a> = (&'a str, bool, &'a str, Option<&'a str>, Result<(), Verdict>);
        let cases: [Case; 7] = [
            ("the pair", true, RECIPIENT_1, Some(IDENTITY_1), Ok(())),
            (
                "the pair, identity as a key file",
                true,
                RECIPIENT_1,
                Some(&key_file),
                Ok(()),
            ),
            (
                "no identity (backups only)",
                false,
                RECIPIENT_2,
                None,
                Ok(()),
            ),
            (
                "another pair's recipient",
                true,
                RECIPIENT_2,
                Some(IDENTITY_1),
                Err(mismatch.clone()),
            ),
            (
                "a recipient that does not parse",
                true,
                "age1nope",
                Some(IDENTITY_1),
                Err(invalid("recipient")),
            ),
            (
                "an identity that does not parse",
                true,
                RECIPIENT_1,
                Some("AGE-SECRET-KEY-1NOPE"),
                Err(invalid("identity")),
            ),
            (
                "a recipient in the identity's place",
                true,
                RECIPIENT_1,
                Some(RECIPIENT_1),
                Err(invalid("identity")),
            ),
        ];
        for (case, with_identity, recipient, identity, expected) in cases {
            assert_eq!(
                encryption_verdict(&encryption(with_identity), recipient, identity),
                expected,
                "{case}"
            );
        }
        assert_eq!(mismatch.reason(), "EncryptionKeyMismatch");
        let message = mismatch.message("b");
        assert!(
            message.contains("spec.encryption.identity")
                && message.contains("spec.encryption.recipient"),
            "{message}"
        );
        assert!(
            !message.contains("AGE-SECRET") && !message.contains("age1"),
            "{message}"
        );
    }

    fn at(seconds: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_780_000_000 + seconds, 0).unwrap_or_default()
    }

    #[test]
    fn two_probes_in_flight_get_distinct_keys_under_the_namespace_prefix() {
        let uid = "0b7e2f4c-1111-2222-3333-444455556666";
        for prefix in [Some("backups"), Some(""), None] {
            let ns_prefix = stateward_agent::manifest::namespace_prefix(prefix, "shop");
            let (a, b) = (
                probe_key(prefix, "shop", uid, probe_nonce()),
                probe_key(prefix, "shop", uid, probe_nonce()),
            );
            assert_ne!(a, b, "two probes of one repository share a key");
            for key in [&a, &b] {
                let name = key.strip_prefix(&ns_prefix).unwrap_or_default();
                assert!(
                    name.starts_with(&format!("{PROBE_PREFIX}{uid}-")) && !name.contains('/'),
                    "{key} is not directly under {ns_prefix}"
                );
            }
        }
        assert_eq!(
            probe_key(Some("backups"), "shop", "u", 0xab),
            "backups/shop/.stateward-probe-u-00000000000000ab"
        );
    }

    #[test]
    fn the_orphan_sweep_never_touches_probe_objects() {
        let uid = "0b7e2f4c-1111-2222-3333-444455556666";
        let listed: Vec<_> = (0..3)
            .map(|_| crate::sweep::Listed {
                key: probe_key(Some("team"), "shop", uid, probe_nonce()),
                at: at(0),
                upload_id: None,
            })
            .collect();
        let plan = crate::sweep::plan(
            "team/shop/",
            &listed,
            &Default::default(),
            at(86_400),
            Duration::from_secs(900),
        );
        assert_eq!(plan, crate::sweep::SweepPlan::default());
    }

    #[test]
    fn a_run_trusts_only_a_fresh_ready_verdict_about_the_current_spec() {
        let now = at(100);
        let mut repo = BackupRepository::new("repo", Default::default());
        repo.metadata.generation = Some(2);
        let checked = |ready: bool, seconds: i64, generation: i64| {
            Some(Checked {
                generation: Some(generation),
                ready,
                at: at(seconds),
            })
        };
        let cases = [
            ("ready, checked 10 s ago", checked(true, 90, 2), true),
            ("ready, checked just now", checked(true, 100, 2), true),
            ("ready, checked 60 s ago", checked(true, 40, 2), false),
            ("ready, checked an hour ago", checked(true, -3500, 2), false),
            ("not ready, checked 10 s ago", checked(false, 90, 2), false),
            ("spec changed since", checked(true, 90, 1), false),
            ("never checked", None, false),
            ("checked after now", checked(true, 130, 2), false),
        ];
        for (case, last, trusted) in cases {
            assert_eq!(recently_ready(&repo, last, now), trusted, "{case}");
        }
    }

    #[test]
    fn transient_failures_wait_with_back_off_and_permanent_ones_fail_at_once() {
        let unreachable = Verdict::EndpointUnreachable("connection refused".into());
        let probe = Verdict::ProbeFailed("ExistingObjectIsDirectory".into());
        let denied = Verdict::AccessDenied("AccessDenied".into());
        let wait = |retry: u64, since: i64| RunGate::Wait {
            retry_in: Duration::from_secs(retry),
            until: at(since + 300),
        };
        let cases = [
            ("ready", Verdict::Ready, None, 0, RunGate::Proceed),
            (
                "ready after waiting",
                Verdict::Ready,
                Some(0),
                200,
                RunGate::Proceed,
            ),
            (
                "first transient failure",
                probe.clone(),
                None,
                0,
                wait(5, 0),
            ),
            ("5 s in", unreachable.clone(), Some(0), 5, wait(5, 0)),
            ("20 s in", probe.clone(), Some(0), 20, wait(20, 0)),
            (
                "200 s in: at most 60 s",
                probe.clone(),
                Some(0),
                200,
                wait(60, 0),
            ),
            (
                "290 s in: the last check on the deadline",
                probe.clone(),
                Some(0),
                290,
                wait(10, 0),
            ),
            (
                "at the deadline",
                probe.clone(),
                Some(0),
                300,
                RunGate::Fail,
            ),
            (
                "past the deadline",
                unreachable.clone(),
                Some(0),
                900,
                RunGate::Fail,
            ),
            (
                "waiting since after now",
                probe.clone(),
                Some(30),
                0,
                wait(5, 30),
            ),
            ("permanent", denied.clone(), None, 0, RunGate::Fail),
            (
                "permanent while waiting",
                denied,
                Some(0),
                20,
                RunGate::Fail,
            ),
            (
                "no Secret",
                Verdict::SecretNotFound("s3".into()),
                None,
                0,
                RunGate::Fail,
            ),
        ];
        for (case, verdict, since, now, expected) in cases {
            assert_eq!(gate(&verdict, since.map(at), at(now)), expected, "{case}");
        }
    }

    #[test]
    fn the_wait_is_counted_from_when_the_run_condition_turned_false() {
        let mut list = Vec::new();
        assert_eq!(waiting_since(&list), None);
        let waiting = || conditions::condition(RUN_CONDITION, false, WAITING_REASON, "", Some(1));
        conditions::set(&mut list, waiting(), at(0));
        conditions::set(&mut list, waiting(), at(40));
        assert_eq!(
            waiting_since(&list),
            Some(at(0)),
            "a repeated wait keeps its start"
        );
        let ready = conditions::condition(RUN_CONDITION, true, "Reachable", "", Some(1));
        conditions::set(&mut list, ready, at(50));
        assert_eq!(waiting_since(&list), None);
        conditions::set(&mut list, waiting(), at(70));
        assert_eq!(waiting_since(&list), Some(at(70)), "a new wait starts anew");
    }

    #[test]
    fn the_waiting_message_names_the_repository_the_failure_and_the_deadline() {
        let mut repo = BackupRepository::new("repo", Default::default());
        repo.spec.s3.bucket = "backups".into();
        let verdict = Verdict::ProbeFailed("ExistingObjectIsDirectory".into());
        assert_eq!(
            waiting_message(&repo, &verdict, at(0)),
            format!(
                "waiting for BackupRepository repo: writing a probe object under the prefix failed: \
                 ExistingObjectIsDirectory; checking again until {}, then the run fails with ProbeFailed",
                time::rfc3339(at(0))
            )
        );
    }
}
