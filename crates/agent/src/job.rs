//! What every agent Job's container needs to reach a repository: the connection
//! arguments and the credentials as Secret references (never values), shared by the
//! backup and restore controllers so both agents see the repository the same way.

use serde_json::{Value, json};
use stateward_api::repository::{BackupRepositorySpec, ChecksumMode, S3Location};

/// `--bucket ... --region ... [--endpoint ...] [--force-path-style] [--checksum-when-required]`.
pub fn connection_args(s3: &S3Location) -> Vec<String> {
    let mut args = vec![
        "--bucket".into(),
        s3.bucket.clone(),
        "--region".into(),
        s3.region.clone().unwrap_or_else(|| "us-east-1".into()),
    ];
    if let Some(endpoint) = &s3.endpoint {
        args.extend(["--endpoint".into(), endpoint.clone()]);
    }
    if s3.force_path_style {
        args.push("--force-path-style".into());
    }
    if s3.checksum_mode == ChecksumMode::WhenRequired {
        args.push("--checksum-when-required".into());
    }
    args
}

/// The S3 credentials (from the repository's Secret) and the pod's namespace.
pub fn credential_env(repo: &BackupRepositorySpec) -> Vec<Value> {
    let creds = &repo.s3.credentials;
    vec![
        json!({"name": "AWS_ACCESS_KEY_ID", "valueFrom": {"secretKeyRef": {"name": creds.access_key_id.name, "key": creds.access_key_id.key}}}),
        json!({"name": "AWS_SECRET_ACCESS_KEY", "valueFrom": {"secretKeyRef": {"name": creds.secret_access_key.name, "key": creds.secret_access_key.key}}}),
        json!({"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}}),
    ]
}

/// The age recipient (backups) from the repository's Secret, when it encrypts.
pub fn recipient_env(repo: &BackupRepositorySpec) -> Option<Value> {
    repo.encryption.as_ref().map(|e| json!({"name": crate::crypto::RECIPIENT_ENV, "valueFrom": {"secretKeyRef": {"name": e.recipient.name, "key": e.recipient.key}}}))
}

/// The age identity (restores) from the repository's Secret, when it has one.
pub fn identity_env(repo: &BackupRepositorySpec) -> Option<Value> {
    repo.encryption
        .as_ref()
        .and_then(|e| e.identity.as_ref())
        .map(|i| json!({"name": crate::restore::IDENTITY_ENV, "valueFrom": {"secretKeyRef": {"name": i.name, "key": i.key}}}))
}
