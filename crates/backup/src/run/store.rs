//! The run's side of the repository: an S3 client from the repository's Secret, reading
//! the agents' results, committing the manifest, and sweeping what a failed run left.

use aws_sdk_s3::error::DisplayErrorContext;
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::ObjectIdentifier;
use stateward_agent::cli::VolumeResult as AgentResult;
use stateward_agent::manifest::{MANIFEST, Manifest};
use stateward_api::repository::BackupRepository;

use super::RunError;

/// A repository opened with its credentials.
pub struct Store {
    pub client: aws_sdk_s3::Client,
    pub bucket: String,
}

impl Store {
    pub async fn open(client: &kube::Client, repo: &BackupRepository) -> Result<Self, RunError> {
        let bucket = repo.spec.s3.bucket.clone();
        let client = crate::repository::s3_client(client, repo)
            .await
            .map_err(|v| RunError::Store(v.message(&bucket)))?;
        Ok(Self { client, bucket })
    }

    /// The agent's full result for a data object, if it wrote one.
    pub async fn result(&self, result_key: &str) -> Result<Option<AgentResult>, RunError> {
        self.json(result_key, "a result").await
    }

    /// The manifest under `prefix`, if the backup exists there.
    pub async fn manifest(&self, prefix: &str) -> Result<Option<Manifest>, RunError> {
        self.json(&format!("{prefix}/{MANIFEST}"), "a manifest")
            .await
    }

    /// A JSON object of the repository, `None` when it does not exist.
    async fn json<T: serde::de::DeserializeOwned>(
        &self,
        key: &str,
        what: &str,
    ) -> Result<Option<T>, RunError> {
        match self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
        {
            Ok(object) => {
                // Bounded: a manifest or result is input from whoever can write the bucket.
                let body = stateward_agent::repository::read_bounded(
                    object,
                    stateward_agent::repository::MAX_JSON_BYTES,
                )
                .await
                .map_err(|e| RunError::Store(format!("reading {key}: {e}")))?;
                serde_json::from_slice(&body)
                    .map(Some)
                    .map_err(|e| RunError::Store(format!("{key} is not {what}: {e}")))
            }
            Err(e) if e.as_service_error().is_some_and(|s| s.is_no_such_key()) => Ok(None),
            Err(e) => Err(RunError::Store(format!(
                "reading {key}: {}",
                DisplayErrorContext(&e)
            ))),
        }
    }

    /// Whether `<prefix>/manifest.json` exists (the backup is committed).
    pub async fn has_manifest(&self, prefix: &str) -> Result<bool, RunError> {
        let key = format!("{prefix}/{MANIFEST}");
        match self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(&key)
            .send()
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if e.as_service_error().is_some_and(|s| s.is_not_found()) => Ok(false),
            Err(e) => Err(RunError::Store(format!(
                "checking {key}: {}",
                DisplayErrorContext(&e)
            ))),
        }
    }

    /// Writes the manifest: the commit point of a backup.
    pub async fn commit(&self, prefix: &str, manifest: &Manifest) -> Result<(), RunError> {
        let body = serde_json::to_vec_pretty(manifest)
            .map_err(|e| RunError::Store(format!("encoding the manifest: {e}")))?;
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(format!("{prefix}/{MANIFEST}"))
            .content_type("application/json")
            .body(ByteStream::from(body))
            .send()
            .await
            .map(|_| ())
            .map_err(|e| {
                RunError::Store(format!("writing the manifest: {}", DisplayErrorContext(&e)))
            })
    }

    /// Deletes a committed backup: the manifest first, so that a deletion interrupted
    /// half-way leaves a prefix without a manifest — never taken for a valid backup, and
    /// swept by the repository loop — then everything else under `prefix/`. Returns how
    /// many objects it removed.
    pub async fn delete_backup(&self, prefix: &str) -> Result<usize, RunError> {
        let key = format!("{prefix}/{MANIFEST}");
        let had_manifest = self.has_manifest(prefix).await?;
        // S3 answers a DELETE of a missing key with success, so a retry is harmless.
        self.client
            .delete_object()
            .bucket(&self.bucket)
            .key(&key)
            .send()
            .await
            .map_err(|e| RunError::Store(format!("deleting {key}: {}", DisplayErrorContext(&e))))?;
        let (_, deleted) = self.sweep(prefix).await?;
        Ok(usize::from(had_manifest) + deleted)
    }

    /// Aborts the multipart uploads and deletes the objects under `prefix/` (a run that
    /// will not commit). Returns how many uploads and objects it removed.
    pub async fn sweep(&self, prefix: &str) -> Result<(usize, usize), RunError> {
        let prefix = format!("{prefix}/");
        let mut aborted = 0;
        let uploads = self
            .client
            .list_multipart_uploads()
            .bucket(&self.bucket)
            .prefix(&prefix)
            .send()
            .await
            .map_err(|e| {
                RunError::Store(format!(
                    "listing multipart uploads: {}",
                    DisplayErrorContext(&e)
                ))
            })?;
        for upload in uploads.uploads() {
            let (Some(key), Some(id)) = (upload.key(), upload.upload_id()) else {
                continue;
            };
            self.client
                .abort_multipart_upload()
                .bucket(&self.bucket)
                .key(key)
                .upload_id(id)
                .send()
                .await
                .map_err(|e| {
                    RunError::Store(format!(
                        "aborting the upload of {key}: {}",
                        DisplayErrorContext(&e)
                    ))
                })?;
            aborted += 1;
        }
        let mut deleted = 0;
        loop {
            let listed = self
                .client
                .list_objects_v2()
                .bucket(&self.bucket)
                .prefix(&prefix)
                .send()
                .await
                .map_err(|e| {
                    RunError::Store(format!("listing objects: {}", DisplayErrorContext(&e)))
                })?;
            let keys: Vec<ObjectIdentifier> = listed
                .contents()
                .iter()
                .filter_map(|o| o.key())
                .filter_map(|k| ObjectIdentifier::builder().key(k).build().ok())
                .collect();
            if keys.is_empty() {
                break;
            }
            deleted += keys.len();
            // One by one: some S3-compatible servers reject DeleteObjects without a
            // Content-MD5, and a failed run leaves only a few objects.
            for key in keys {
                self.client
                    .delete_object()
                    .bucket(&self.bucket)
                    .key(key.key())
                    .send()
                    .await
                    .map_err(|e| {
                        RunError::Store(format!(
                            "deleting {}: {}",
                            key.key(),
                            DisplayErrorContext(&e)
                        ))
                    })?;
            }
        }
        Ok((aborted, deleted))
    }
}
