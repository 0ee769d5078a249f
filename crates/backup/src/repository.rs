//! BackupRepository checks: the Secret references resolve, the bucket answers, and a
//! write/delete probe under the prefix succeeds. The outcome is the `Ready` condition with
//! a reason a user can act on, a Warning event when it is not ready, and a gauge.

use std::sync::Arc;
use std::time::Duration;

use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use k8s_openapi::api::core::v1::Secret;
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::{Api, Resource, ResourceExt};
use stateward_agent::repository::AccessError;
use stateward_api::BackupRepository;
use stateward_api::common::SecretKeyRef;
use stateward_runtime::{Context, apply, conditions, time};

/// How often a ready repository is checked again.
pub const RECHECK: Duration = Duration::from_secs(300);

/// Why a repository is not ready; each variant is a condition reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Ready,
    SecretNotFound(String),
    KeyMissing { secret: String, key: String },
    InvalidCredentials(String),
    AccessDenied(String),
    NoSuchBucket(String),
    EndpointUnreachable(String),
    ProbeFailed(String),
    EncryptionKeyInvalid { secret: String, key: String },
}

impl Verdict {
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Ready => "Reachable",
            Self::SecretNotFound(_) => "SecretNotFound",
            Self::KeyMissing { .. } => "KeyMissing",
            Self::InvalidCredentials(_) => "InvalidCredentials",
            Self::AccessDenied(_) => "AccessDenied",
            Self::NoSuchBucket(_) => "NoSuchBucket",
            Self::EndpointUnreachable(_) => "EndpointUnreachable",
            Self::ProbeFailed(_) => "ProbeFailed",
            Self::EncryptionKeyInvalid { .. } => "EncryptionKeyInvalid",
        }
    }

    /// A sentence for the user. Never contains credentials: only names and S3 error codes.
    pub fn message(&self, bucket: &str) -> String {
        match self {
            Self::Ready => format!("bucket {bucket} is reachable and writable under the prefix"),
            Self::SecretNotFound(name) => {
                format!("Secret {name} (credentials) not found in this namespace")
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
                "Secret {secret} key {key} is not an age recipient (expected age1..., from `age-keygen -y`)"
            ),
        }
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
        if stateward_agent::crypto::parse_recipient(&recipient).is_err() {
            return Verdict::EncryptionKeyInvalid {
                secret: encryption.recipient.name.clone(),
                key: encryption.recipient.key.clone(),
            };
        }
        if let Some(identity) = &encryption.identity
            && let Err(v) = secret_value(&secrets, identity).await
        {
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
    // prove that backups can be written.
    let prefix = s3
        .prefix
        .as_deref()
        .map(|p| format!("{p}/"))
        .unwrap_or_default();
    let probe = format!(
        "{prefix}{ns}/.stateward-probe-{}",
        repo.uid().unwrap_or_default()
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

/// fetch → check → status (+ event, gauge) → requeue.
pub async fn reconcile(
    repo: Arc<BackupRepository>,
    ctx: Arc<RepositoryContext>,
) -> Result<Action, RepositoryError> {
    let timer = ctx.base.metrics.reconcile.start(crate::CONTROLLER);
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
        "lastCheckedTime": time::rfc3339(now),
    });
    let api: Api<BackupRepository> = Api::namespaced(ctx.base.client.clone(), &ns);
    let written = apply::apply_status(&api, &name, apply::managers::BACKUP, status).await;
    if let Err(e) = written {
        timer.finish("error");
        return Err(RepositoryError::Status(e));
    }
    ctx.ready_gauge
        .get_or_create(&RepoLabels {
            namespace: ns.clone(),
            repository: name.clone(),
        })
        .set(i64::from(ready));
    if !ready {
        let event = Event {
            type_: EventType::Warning,
            reason: verdict.reason().to_string(),
            note: Some(message),
            action: "CheckRepository".into(),
            secondary: None,
        };
        if let Err(e) = ctx
            .base
            .recorder()
            .publish(&event, &repo.object_ref(&()))
            .await
        {
            tracing::warn!(repository = %name, error = %e, "publishing an event failed");
        }
    }
    tracing::info!(namespace = %ns, repository = %name, reason = verdict.reason(), "checked repository");
    if ready {
        match sweep_orphans(&ctx, &repo).await {
            Ok(0) => {}
            Ok(swept) => {
                ctx.swept.inc_by(swept as u64);
                let event = Event {
                    type_: EventType::Normal,
                    reason: "SweptOrphans".into(),
                    note: Some(format!(
                        "removed {swept} backup prefix(es) without a manifest left by runs that crashed or were deleted"
                    )),
                    action: "Sweep".into(),
                    secondary: None,
                };
                let _ = ctx
                    .base
                    .recorder()
                    .publish(&event, &repo.object_ref(&()))
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
}
