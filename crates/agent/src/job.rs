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

/// The uid and gid of the agent image's own user (`stateward`, as in the Dockerfile).
pub const AGENT_USER: i64 = 65532;

/// The pod security context of an agent that touches no volume (exec agents: a dump
/// streamed out of an app's pod, or into its restore command): Pod Security
/// `restricted` — non-root as the image's own user, the runtime's default seccomp
/// profile. With [`RESTRICTED_CONTAINER`], such a pod is admitted by a namespace that
/// enforces `restricted`.
pub fn restricted_pod() -> Value {
    json!({
        "runAsNonRoot": true,
        "runAsUser": AGENT_USER,
        "runAsGroup": AGENT_USER,
        "seccompProfile": {"type": "RuntimeDefault"},
    })
}

/// The container security context every agent container starts from: no privilege
/// escalation, a read-only root filesystem, every capability dropped.
pub fn restricted_container() -> Value {
    json!({
        "allowPrivilegeEscalation": false,
        "readOnlyRootFilesystem": true,
        "capabilities": {"drop": ["ALL"]},
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What Pod Security `restricted` checks of a pod and its containers (the 1.36
    /// profile's rules that these contexts can break).
    #[test]
    fn the_restricted_contexts_meet_the_restricted_profile() {
        let pod = restricted_pod();
        let container = restricted_container();
        assert_eq!(pod["runAsNonRoot"], true);
        assert_ne!(pod["runAsUser"], 0);
        assert_eq!(pod["seccompProfile"]["type"], "RuntimeDefault");
        assert_eq!(container["allowPrivilegeEscalation"], false);
        assert_eq!(container["capabilities"]["drop"], json!(["ALL"]));
        assert!(container["capabilities"].get("add").is_none());
    }
}
