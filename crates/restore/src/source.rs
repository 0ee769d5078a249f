//! Finding the backup a Restore names — a Backup object, or a repository plus a path for
//! a backup made elsewhere — checking tenancy, and reading its manifest.

use aws_sdk_s3::error::DisplayErrorContext;
use kube::{Api, ResourceExt};
use stateward_agent::manifest::{FORMAT_VERSION, MANIFEST, Manifest};
use stateward_api::repository::BackupRepository;
use stateward_api::{Backup, BackupPhase, Restore};

use stateward_agent::repository::{
    BoundedReadError, MAX_JSON_BYTES as MAX_MANIFEST_BYTES, read_bounded,
};

use crate::plan::Refusal;

/// Bounds on what a manifest may list.
const MAX_ENTRIES: usize = 1024;
const MAX_SEGMENTS: u32 = 100_000;
const MAX_NAME: usize = 253;
const MAX_KEY: usize = 1024;

fn too_large(key: &str) -> SourceError {
    refused(
        "ManifestInvalid",
        format!("{key} is larger than {MAX_MANIFEST_BYTES} bytes: not a manifest Stateward wrote"),
    )
}

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
                    format!("Backup {name} (spec.source.backup) does not exist in namespace {ns} (to restore a backup whose object is gone, use spec.source.repositoryPath)"),
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
                            "BackupRepository {} (spec.source.repositoryPath.repository) does not exist in namespace {ns}",
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
    let manifest = read_manifest(client, &repository_name, &prefix, &path).await?;
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
    path: &str,
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
    // A manifest is input from whoever can write the bucket: bounded before it is read
    // (never a multi-GiB object in the manager's memory), then checked against the path.
    let body = match read_bounded(object, MAX_MANIFEST_BYTES).await {
        Ok(body) => body,
        Err(BoundedReadError::TooLarge { .. }) => return Err(too_large(&key)),
        Err(e) => return Err(SourceError::Unavailable(format!("reading {key}: {e}"))),
    };
    let manifest: Manifest = serde_json::from_slice(&body).map_err(|e| {
        refused(
            "ManifestInvalid",
            format!("{key} is not a Stateward manifest: {e}"),
        )
    })?;
    check_manifest(&manifest, prefix, path).map_err(SourceError::Refused)?;
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

/// Checks a manifest read from `prefix` (the backup's full key prefix) whose path below the
/// repository prefix is `path` (`<namespace>/<app>/<backup>-<uid>`): it must describe the
/// backup at that path, list a bounded number of well-formed entries, and every data key
/// must lie under the backup's own prefix — a manifest never sends a restore to read
/// another backup's (or another namespace's) objects.
pub fn check_manifest(manifest: &Manifest, prefix: &str, path: &str) -> Result<(), Refusal> {
    let invalid = |why: String| Refusal {
        reason: "ManifestInvalid",
        message: format!("the manifest under {prefix} {why}: refusing to restore from it"),
    };
    let mut parts = path.splitn(3, '/');
    let (namespace, app, run) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    );
    if manifest.namespace != namespace || manifest.app != app {
        return Err(invalid(format!(
            "says it is of {}/{}, but lies at {namespace}/{app}",
            manifest.namespace, manifest.app
        )));
    }
    if run != format!("{}-{}", manifest.backup, manifest.backup_uid) {
        return Err(invalid(format!(
            "says it is backup {}-{}, but lies at {run}",
            manifest.backup, manifest.backup_uid
        )));
    }
    if manifest.entries.len() > MAX_ENTRIES {
        return Err(invalid(format!(
            "lists {} entries (at most {MAX_ENTRIES})",
            manifest.entries.len()
        )));
    }
    let own = format!("{prefix}/");
    for entry in &manifest.entries {
        let key_ok = entry.key.len() <= MAX_KEY
            && entry.key.starts_with(&own)
            && !entry
                .key
                .split('/')
                .any(|s| s.is_empty() || s == "." || s == "..")
            && !entry.key.chars().any(char::is_control);
        if !key_ok {
            return Err(invalid(format!(
                "names data object {:?} outside the backup's own prefix",
                truncated(&entry.key)
            )));
        }
        let name_ok = |n: &str| {
            !n.is_empty()
                && n.len() <= MAX_NAME
                && n.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        };
        if !name_ok(&entry.name) || !name_ok(&entry.pod) {
            return Err(invalid(format!(
                "has an entry with an invalid PVC or pod name {:?}",
                truncated(&entry.name)
            )));
        }
        let hex64 = |h: &str| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit());
        if !hex64(&entry.sha256) || entry.content_sha256.as_deref().is_some_and(|h| !hex64(h)) {
            return Err(invalid(format!("has no valid sha256 for {}", entry.name)));
        }
        if entry.segments == 0 || entry.segments > MAX_SEGMENTS {
            return Err(invalid(format!(
                "lists {} segments for {}",
                entry.segments, entry.name
            )));
        }
        if !matches!(
            entry.encoding.as_str(),
            "tar+zstd" | "tar+zstd+age" | "zstd" | "zstd+age"
        ) {
            return Err(invalid(format!(
                "has an unknown encoding {:?}",
                truncated(&entry.encoding)
            )));
        }
    }
    Ok(())
}

fn truncated(text: &str) -> String {
    text.chars().take(80).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const PREFIX: &str = "base/ns/db/b1-u1";
    const HASH: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn manifest(change: impl FnOnce(&mut serde_json::Value)) -> Manifest {
        let mut m = json!({
            "formatVersion": 1, "writtenBy": "t", "namespace": "ns", "app": "db", "backup": "b1",
            "backupUid": "u1", "method": "Volume", "startedAt": "", "completedAt": "",
            "entries": [{"name": "data-db-0", "pod": "db-0", "key": format!("{PREFIX}/volumes/data-db-0.tar.zst"),
                "encoding": "tar+zstd", "bytesRead": 10, "bytesStored": 5, "sha256": HASH}],
            "statefulSet": {}, "persistentVolumeClaims": [],
        });
        change(&mut m);
        serde_json::from_value(m).unwrap()
    }

    #[test]
    fn manifests_must_describe_their_own_path_and_keys() {
        let table: Vec<(&str, Manifest, bool)> = vec![
            ("as written", manifest(|_| {}), true),
            (
                "another namespace",
                manifest(|m| m["namespace"] = json!("other")),
                false,
            ),
            ("another app", manifest(|m| m["app"] = json!("web")), false),
            (
                "another backup",
                manifest(|m| m["backupUid"] = json!("u2")),
                false,
            ),
            (
                "a key under another prefix",
                manifest(|m| m["entries"][0]["key"] = json!("base/other/db/b1-u1/volumes/x")),
                false,
            ),
            (
                "a key climbing out",
                manifest(|m| m["entries"][0]["key"] = json!(format!("{PREFIX}/../../other/x"))),
                false,
            ),
            (
                "a key that is the prefix's sibling",
                manifest(|m| m["entries"][0]["key"] = json!(format!("{PREFIX}-x/volumes/y"))),
                false,
            ),
            (
                "a bad checksum",
                manifest(|m| m["entries"][0]["sha256"] = json!("s")),
                false,
            ),
            (
                "no segments",
                manifest(|m| m["entries"][0]["segments"] = json!(0)),
                false,
            ),
            (
                "an unknown encoding",
                manifest(|m| m["entries"][0]["encoding"] = json!("gzip")),
                false,
            ),
            (
                "a claim name with a slash",
                manifest(|m| m["entries"][0]["name"] = json!("../data")),
                false,
            ),
            (
                "too many entries",
                manifest(|m| {
                    let e = m["entries"][0].clone();
                    m["entries"] = json!(vec![e; MAX_ENTRIES + 1]);
                }),
                false,
            ),
        ];
        for (why, m, ok) in table {
            let got = check_manifest(&m, PREFIX, "ns/db/b1-u1");
            assert_eq!(got.is_ok(), ok, "{why}: {got:?}");
            if let Err(refusal) = got {
                assert_eq!(refusal.reason, "ManifestInvalid", "{why}");
            }
        }
    }
}
