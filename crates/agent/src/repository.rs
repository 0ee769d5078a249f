//! Opening a repository from a controller: the S3 client built with the credentials in
//! the repository's Secret. Shared by the backup controller (checks, runs, sweeps) and
//! the restore controller (manifests), so both read a repository the same way.

use k8s_openapi::api::core::v1::Secret;
use kube::{Api, ResourceExt};
use stateward_api::common::SecretKeyRef;
use stateward_api::repository::{BackupRepository, ChecksumMode};

/// Why a repository's credentials could not be read. Never carries a secret value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AccessError {
    #[error("Secret {0} (credentials) not found in this namespace")]
    SecretNotFound(String),
    #[error("Secret {secret} has no key {key}")]
    KeyMissing { secret: String, key: String },
    #[error("reading Secret {secret}: {message}")]
    Api { secret: String, message: String },
    #[error(
        "Secret {0} is not opted in for Stateward: label it {label}=true to let Stateward use it as repository credentials or keys (its value was not used or sent anywhere)",
        label = stateward_api::common::REPOSITORY_SECRET_LABEL
    )]
    NotAllowed(String),
}

/// Whether `secret` carries the opt-in label (see
/// [`stateward_api::common::REPOSITORY_SECRET_LABEL`]).
pub fn opted_in(secret: &Secret) -> bool {
    secret
        .labels()
        .get(stateward_api::common::REPOSITORY_SECRET_LABEL)
        .is_some_and(|v| v == "true")
}

/// One value of a Secret, trimmed; only from a Secret that opted in.
pub async fn secret_value(secrets: &Api<Secret>, r: &SecretKeyRef) -> Result<String, AccessError> {
    let secret = secrets
        .get_opt(&r.name)
        .await
        .map_err(|e| AccessError::Api {
            secret: r.name.clone(),
            message: e.to_string(),
        })?
        .ok_or_else(|| AccessError::SecretNotFound(r.name.clone()))?;
    if !opted_in(&secret) {
        return Err(AccessError::NotAllowed(r.name.clone()));
    }
    let data = secret.data.unwrap_or_default();
    data.get(&r.key)
        .map(|v| String::from_utf8_lossy(&v.0).trim().to_string())
        .ok_or_else(|| AccessError::KeyMissing {
            secret: r.name.clone(),
            key: r.key.clone(),
        })
}

/// An S3 client for the repository, with the credentials from its Secret.
pub async fn s3_client(
    client: &kube::Client,
    repo: &BackupRepository,
) -> Result<aws_sdk_s3::Client, AccessError> {
    let secrets: Api<Secret> =
        Api::namespaced(client.clone(), &repo.namespace().unwrap_or_default());
    let s3 = &repo.spec.s3;
    let key = secret_value(&secrets, &s3.credentials.access_key_id).await?;
    let secret = secret_value(&secrets, &s3.credentials.secret_access_key).await?;
    Ok(crate::cli::s3_client_with(
        &key,
        &secret,
        s3.endpoint.as_deref(),
        s3.region.as_deref().unwrap_or("us-east-1"),
        s3.force_path_style,
        s3.checksum_mode == ChecksumMode::WhenRequired,
    ))
}

/// The largest JSON object (manifest, agent result) read from a repository: far above
/// what Stateward writes, far below what would hurt the manager's memory.
pub const MAX_JSON_BYTES: usize = 4 << 20;

/// Why a bounded read failed.
#[derive(Debug, thiserror::Error)]
pub enum BoundedReadError {
    #[error("the object is larger than {limit} bytes")]
    TooLarge { limit: usize },
    #[error("reading the object: {0}")]
    Read(#[from] std::io::Error),
}

/// Reads an object's body into memory, refusing it before more than `limit` bytes are
/// held — by its declared length first, then by counting (a declared length may lie).
/// Everything read from a bucket is input from whoever can write the bucket.
pub async fn read_bounded(
    object: aws_sdk_s3::operation::get_object::GetObjectOutput,
    limit: usize,
) -> Result<Vec<u8>, BoundedReadError> {
    use tokio::io::AsyncReadExt;
    if object
        .content_length()
        .is_some_and(|n| usize::try_from(n).map_or(true, |n| n > limit))
    {
        return Err(BoundedReadError::TooLarge { limit });
    }
    let mut body = Vec::new();
    object
        .body
        .into_async_read()
        .take(limit as u64 + 1)
        .read_to_end(&mut body)
        .await?;
    if body.len() > limit {
        return Err(BoundedReadError::TooLarge { limit });
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_sdk_s3::operation::get_object::GetObjectOutput;
    use aws_sdk_s3::primitives::ByteStream;

    fn object(body: Vec<u8>, declared: Option<i64>) -> GetObjectOutput {
        GetObjectOutput::builder()
            .body(ByteStream::from(body))
            .set_content_length(declared)
            .build()
    }

    #[tokio::test]
    async fn bodies_are_refused_past_the_bound_whatever_length_they_declare() {
        let read = read_bounded(object(b"{}".to_vec(), Some(2)), 16).await;
        assert_eq!(read.ok(), Some(b"{}".to_vec()));
        let exact = read_bounded(object(vec![b' '; 16], None), 16).await;
        assert_eq!(exact.map(|b| b.len()).ok(), Some(16));
        for (case, declared) in [
            ("declared too large", Some(17)),
            ("declared small, is large", Some(2)),
            ("not declared", None),
        ] {
            let body = if case == "declared too large" { 1 } else { 17 };
            let read = read_bounded(object(vec![b' '; body], declared), 16).await;
            assert!(
                matches!(read, Err(BoundedReadError::TooLarge { limit: 16 })),
                "{case}: {read:?}"
            );
        }
    }
}
