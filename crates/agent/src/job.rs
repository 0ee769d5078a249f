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

/// How a volume agent (one that mounts an app's volume) runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VolumeAccess {
    /// As the data's owner with every capability dropped, non-root when the owner is:
    /// Pod Security `restricted` unless the data belongs to root.
    Owner(stateward_api::access::AgentIdentity),
    /// `spec.dataAccess.elevated`: root with only what the work needs (see
    /// [`elevated_capabilities`]).
    Elevated,
}

impl VolumeAccess {
    /// The image's own unprivileged user: for when nothing better is known.
    pub const AGENT: Self = Self::Owner(stateward_api::access::AgentIdentity {
        user: AGENT_USER,
        group: AGENT_USER,
        fs_group: None,
    });
}

/// What a volume agent does with the volume, for the capabilities elevated mode grants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VolumeWork {
    /// Reads every file, whoever owns it.
    Backup,
    /// Writes files back with their owners and modes; `devices` when the backup holds
    /// device nodes, `setid` when it holds setuid/setgid files.
    Restore { devices: bool, setid: bool },
}

/// The capabilities an elevated agent keeps (everything else is dropped). A backup only
/// reads past permissions; a restore gives owners (CHOWN), sets modes and times on files
/// it does not own (FOWNER) and writes into directories whatever their modes
/// (DAC_OVERRIDE), plus MKNOD for device nodes and FSETID for setgid files whose group
/// root is not in (without it the kernel silently drops the bit).
pub fn elevated_capabilities(work: VolumeWork) -> Vec<&'static str> {
    match work {
        VolumeWork::Backup => vec!["DAC_READ_SEARCH"],
        VolumeWork::Restore { devices, setid } => {
            let mut caps = vec!["CHOWN", "FOWNER", "DAC_OVERRIDE"];
            if setid {
                caps.push("FSETID");
            }
            if devices {
                caps.push("MKNOD");
            }
            caps
        }
    }
}

/// The pod and container security contexts of a volume agent.
pub fn volume_contexts(access: VolumeAccess, work: VolumeWork) -> (Value, Value) {
    match access {
        VolumeAccess::Owner(id) => {
            let mut pod = json!({
                "runAsNonRoot": id.user != 0,
                "runAsUser": id.user,
                "runAsGroup": id.group,
                "seccompProfile": {"type": "RuntimeDefault"},
            });
            if let Some(fs_group) = id.fs_group {
                pod["fsGroup"] = json!(fs_group);
                // The app's volume root already carries its fsGroup: no walk that would
                // add group write to every file (postgres refuses a g+w PGDATA) or
                // change what a restore just wrote.
                pod["fsGroupChangePolicy"] = json!("OnRootMismatch");
            }
            (pod, restricted_container())
        }
        VolumeAccess::Elevated => {
            let mut container = restricted_container();
            container["capabilities"]["add"] = json!(elevated_capabilities(work));
            (
                json!({
                    "runAsUser": 0,
                    "runAsGroup": 0,
                    "seccompProfile": {"type": "RuntimeDefault"},
                }),
                container,
            )
        }
    }
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

    #[test]
    fn volume_agents_run_as_the_owner_or_elevated_with_only_what_the_work_needs() {
        use stateward_api::access::AgentIdentity;
        let owner = |user, fs_group| {
            VolumeAccess::Owner(AgentIdentity {
                user,
                group: user,
                fs_group,
            })
        };
        let restore = |devices, setid| VolumeWork::Restore { devices, setid };
        // (case, access, work, runAsNonRoot, runAsUser, fsGroup, added capabilities)
        type Row = (
            &'static str,
            VolumeAccess,
            VolumeWork,
            bool,
            i64,
            Value,
            Value,
        );
        let rows: Vec<Row> = vec![
            (
                "a non-root owner backs up restricted",
                owner(999, Some(999)),
                VolumeWork::Backup,
                true,
                999,
                json!(999),
                Value::Null,
            ),
            (
                "a non-root owner restores restricted",
                owner(999, None),
                restore(false, false),
                true,
                999,
                Value::Null,
                Value::Null,
            ),
            (
                "data of root: root, but no capability",
                owner(0, None),
                restore(false, false),
                false,
                0,
                Value::Null,
                Value::Null,
            ),
            (
                "an elevated backup reads past modes only",
                VolumeAccess::Elevated,
                VolumeWork::Backup,
                false,
                0,
                Value::Null,
                json!(["DAC_READ_SEARCH"]),
            ),
            (
                "an elevated restore",
                VolumeAccess::Elevated,
                restore(false, false),
                false,
                0,
                Value::Null,
                json!(["CHOWN", "FOWNER", "DAC_OVERRIDE"]),
            ),
            (
                "an elevated restore of setid files and devices",
                VolumeAccess::Elevated,
                restore(true, true),
                false,
                0,
                Value::Null,
                json!(["CHOWN", "FOWNER", "DAC_OVERRIDE", "FSETID", "MKNOD"]),
            ),
        ];
        for (case, access, work, non_root, user, fs_group, added) in rows {
            let (pod, container) = volume_contexts(access, work);
            assert_eq!(
                pod["runAsNonRoot"].as_bool().unwrap_or(false),
                non_root,
                "{case}"
            );
            assert_eq!(pod["runAsUser"], user, "{case}");
            assert_eq!(pod["fsGroup"], fs_group, "{case}");
            assert_eq!(pod["seccompProfile"]["type"], "RuntimeDefault", "{case}");
            assert_eq!(container["allowPrivilegeEscalation"], false, "{case}");
            assert_eq!(container["capabilities"]["drop"], json!(["ALL"]), "{case}");
            assert_eq!(container["capabilities"]["add"], added, "{case}");
            assert!(
                !container.to_string().contains("SETFCAP"),
                "{case}: SETFCAP is never granted"
            );
        }
    }
}
