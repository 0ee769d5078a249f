//! Finding the backup a Restore names — a Backup object, or a repository plus a path for
//! a backup made elsewhere — checking tenancy, and reading its manifest.

use aws_sdk_s3::error::DisplayErrorContext;
use kube::{Api, ResourceExt};
use stateward_agent::manifest::{FORMAT_VERSION, MANIFEST, Manifest};
use stateward_api::repository::BackupRepository;
use stateward_api::{Backup, BackupPhase, Restore};

use crate::plan::Refusal;

/// The backup to restore.
pub struct Source {
    pub repository: BackupRepository,
    /// Full key prefix of the backup in the bucket.
    pub prefix: String,
    /// The path below the repository prefix: `<namespace>/<app>/<backup>-<uid>`.
    pub path: String,
    pub manifest: Manifest,
}

/// Why the source could not be resolved.
pub enum SourceError {
    /// Retrying cannot help until something changes: a condition says what.
    Refused(Refusal),
    /// The repository cannot be read right now.
    Unavailable(String),
}

fn refused(reason: &'static str, message: impl Into<String>) -> SourceError {
    SourceError::Refused(Refusal {
        reason,
        message: message.into(),
    })
}

/// Resolves the Restore's source.
pub async fn resolve(client: &kube::Client, restore: &Restore) -> Result<Source, SourceError> {
    let ns = restore.namespace().unwrap_or_default();
    let repos: Api<BackupRepository> = Api::namespaced(client.clone(), &ns);
    let unavailable = |e: kube::Error| SourceError::Unavailable(e.to_string());
    let (repository_name, prefix, path) = match (
        &restore.spec.source.backup,
        &restore.spec.source.repository_path,
    ) {
        (Some(name), _) => {
            let backups: Api<Backup> = Api::namespaced(client.clone(), &ns);
            let backup = backups.get_opt(name).await.map_err(unavailable)?.ok_or_else(|| {
                refused(
                    "BackupNotFound",
                    format!("Backup {name} does not exist in namespace {ns} (to restore a backup whose object is gone, use source.repositoryPath)"),
                )
            })?;
            let status = backup.status.clone().unwrap_or_default();
            if status.phase != Some(BackupPhase::Completed) {
                return Err(refused(
                    "BackupNotCompleted",
                    format!(
                        "Backup {name} is {:?}, not Completed: only a committed backup can be restored",
                        status.phase.unwrap_or_default()
                    ),
                ));
            }
            let (Some(repository), Some(location)) = (status.repository, status.location) else {
                return Err(refused(
                    "BackupNotCompleted",
                    format!("Backup {name} records no repository or location"),
                ));
            };
            let repo = repos.get_opt(&repository).await.map_err(unavailable)?.ok_or_else(|| {
                refused(
                    "RepositoryNotFound",
                    format!("BackupRepository {repository} (where Backup {name} is stored) does not exist"),
                )
            })?;
            let path = location
                .strip_prefix(&repo.spec.key_prefix(""))
                .unwrap_or(&location)
                .to_string();
            (repo, location, path)
        }
        (None, Some(rp)) => {
            let repo = repos
                .get_opt(&rp.repository)
                .await
                .map_err(unavailable)?
                .ok_or_else(|| {
                    refused(
                        "RepositoryNotFound",
                        format!(
                            "BackupRepository {} does not exist in namespace {ns}",
                            rp.repository
                        ),
                    )
                })?;
            if let Err(message) = repo.spec.readable_from(&ns, &rp.path, &rp.repository) {
                return Err(refused("CrossNamespaceRefused", message));
            }
            (
                repo.clone(),
                repo.spec.key_prefix(&rp.path),
                rp.path.clone(),
            )
        }
        (None, None) => {
            return Err(refused(
                "NoSource",
                "set source.backup or source.repositoryPath",
            ));
        }
    };
    let manifest = read_manifest(client, &repository_name, &prefix).await?;
    Ok(Source {
        repository: repository_name,
        prefix,
        path,
        manifest,
    })
}

async fn read_manifest(
    client: &kube::Client,
    repo: &BackupRepository,
    prefix: &str,
) -> Result<Manifest, SourceError> {
    let s3 = stateward_agent::repository::s3_client(client, repo)
        .await
        .map_err(|e| refused("RepositoryUnusable", e.to_string()))?;
    let key = format!("{prefix}/{MANIFEST}");
    let object = match s3
        .get_object()
        .bucket(&repo.spec.s3.bucket)
        .key(&key)
        .send()
        .await
    {
        Ok(o) => o,
        Err(e) if e.as_service_error().is_some_and(|s| s.is_no_such_key()) => {
            return Err(refused(
                "ManifestNotFound",
                format!(
                    "no {MANIFEST} under {prefix}: the backup does not exist there or never completed"
                ),
            ));
        }
        Err(e) => {
            return Err(SourceError::Unavailable(format!(
                "reading {key}: {}",
                DisplayErrorContext(&e)
            )));
        }
    };
    let body = object
        .body
        .collect()
        .await
        .map_err(|e| SourceError::Unavailable(format!("reading {key}: {e}")))?
        .into_bytes();
    let manifest: Manifest = serde_json::from_slice(&body).map_err(|e| {
        refused(
            "ManifestInvalid",
            format!("{key} is not a Stateward manifest: {e}"),
        )
    })?;
    if manifest.format_version > FORMAT_VERSION {
        return Err(refused(
            "UnsupportedFormat",
            format!(
                "the backup's format version {} is newer than this Stateward reads ({FORMAT_VERSION}): upgrade the operator",
                manifest.format_version
            ),
        ));
    }
    Ok(manifest)
}
