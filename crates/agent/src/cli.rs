//! `stateward agent ...`: what the Jobs the backup controller creates run. Credentials
//! come from the environment (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, set from the
//! repository's Secret), never from arguments, so they appear in no pod spec or log.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::{UploadOptions, stream_to_s3, write_volume_archive};

/// Where the agent writes its short summary (the kubelet reads at most 4 KiB).
pub const TERMINATION_LOG: &str = "/dev/termination-log";
const TERMINATION_LIMIT: usize = 4096;

/// How the agent reaches the repository (credentials come from the environment).
#[derive(clap::Args, Debug, Clone)]
pub struct S3Connection {
    #[arg(long)]
    pub bucket: String,
    /// S3 endpoint for S3-compatible servers.
    #[arg(long)]
    pub endpoint: Option<String>,
    #[arg(long, default_value = "us-east-1")]
    pub region: String,
    #[arg(long)]
    pub force_path_style: bool,
    /// Send checksums only when an operation requires them (for S3-compatible servers
    /// that reject the SDK's default trailing checksums).
    #[arg(long)]
    pub checksum_when_required: bool,
}

impl S3Connection {
    pub(crate) fn client(&self) -> Result<aws_sdk_s3::Client, String> {
        let key = std::env::var("AWS_ACCESS_KEY_ID")
            .map_err(|_| "AWS_ACCESS_KEY_ID is not set".to_string())?;
        let secret = std::env::var("AWS_SECRET_ACCESS_KEY")
            .map_err(|_| "AWS_SECRET_ACCESS_KEY is not set".to_string())?;
        Ok(s3_client_with(
            &key,
            &secret,
            self.endpoint.as_deref(),
            &self.region,
            self.force_path_style,
            self.checksum_when_required,
        ))
    }
}

/// Where and how the agent stores one object.
#[derive(clap::Args, Debug, Clone)]
pub struct S3Target {
    #[command(flatten)]
    pub connection: S3Connection,
    /// Object key of the data.
    #[arg(long)]
    pub key: String,
    /// Object key of the full result (JSON).
    #[arg(long)]
    pub result_key: Option<String>,
    /// Part size in MiB (at least 5). Memory is about (parts in flight + 2) parts; the
    /// defaults keep the agent near 64 MiB resident (`cargo xtask bench backup`).
    #[arg(long, default_value_t = 5)]
    pub part_size_mib: usize,
    /// Parts uploading at once (raise for high-latency object stores, at one part of
    /// memory each).
    #[arg(long, default_value_t = 2)]
    pub parts_in_flight: usize,
    /// Parts per object: a longer stream continues in segment objects `<key>.seg-00001`,
    /// ... (S3 allows 10,000 parts per multipart upload).
    #[arg(long, default_value_t = crate::upload::MAX_PARTS)]
    pub segment_parts: u32,
    /// zstd level (1 fastest .. 19 smallest).
    #[arg(long, default_value_t = 3)]
    pub zstd_level: i32,
    /// zstd worker threads.
    #[arg(long, default_value_t = 2)]
    pub zstd_threads: u32,
    /// Encrypt to the age recipient in the `AGE_RECIPIENT` environment variable.
    #[arg(long)]
    pub encrypt: bool,
}

impl S3Target {
    /// The age recipient when `--encrypt` is set.
    fn recipient(&self) -> Result<Option<age::x25519::Recipient>, String> {
        if !self.encrypt {
            return Ok(None);
        }
        let text = std::env::var(crate::crypto::RECIPIENT_ENV)
            .map_err(|_| format!("--encrypt needs {}", crate::crypto::RECIPIENT_ENV))?;
        crate::crypto::parse_recipient(&text)
            .map(Some)
            .map_err(|e| format!("{}: {e}", crate::crypto::RECIPIENT_ENV))
    }

    fn client(&self) -> Result<aws_sdk_s3::Client, String> {
        self.connection.client()
    }

    fn upload_options(&self) -> UploadOptions {
        UploadOptions {
            bucket: self.connection.bucket.clone(),
            key: self.key.clone(),
            part_size: self.part_size_mib.max(5) << 20,
            parts_in_flight: self.parts_in_flight.max(1),
            segment_parts: self.segment_parts,
        }
    }

    /// Writes the full result next to the data.
    async fn put_result(
        &self,
        client: &aws_sdk_s3::Client,
        result: &VolumeResult,
    ) -> Result<(), String> {
        let Some(result_key) = &self.result_key else {
            return Ok(());
        };
        let body = serde_json::to_vec_pretty(result).map_err(|e| e.to_string())?;
        client
            .put_object()
            .bucket(&self.connection.bucket)
            .key(result_key)
            .body(aws_sdk_s3::primitives::ByteStream::from(body))
            .send()
            .await
            .map(|_| ())
            .map_err(|e| {
                format!(
                    "writing the result object: {}",
                    aws_sdk_s3::error::DisplayErrorContext(&e)
                )
            })
    }
}

/// `stateward agent backup-volume`: archive a mounted volume into one S3 object.
#[derive(clap::Args, Debug, Clone)]
pub struct BackupVolumeArgs {
    /// The volume's mount path (mounted read-only).
    #[arg(long)]
    pub source: PathBuf,
    /// The uid the app's container runs as (learned by the manager), recorded with the
    /// ownership so a restore knows what the app itself may do.
    #[arg(long)]
    pub app_user: Option<u32>,
    #[command(flatten)]
    pub target: S3Target,
}

/// `stateward agent backup-exec`: run a dump command in an app pod through the
/// Kubernetes API and store its standard output, zstd-compressed.
#[derive(clap::Args, Debug, Clone)]
pub struct BackupExecArgs {
    /// Namespace of the app pod (default: the agent's own).
    #[arg(long, env = "POD_NAMESPACE")]
    pub namespace: String,
    /// The app pod to run the command in.
    #[arg(long)]
    pub pod: String,
    /// Container (default: the pod's first).
    #[arg(long)]
    pub container: Option<String>,
    #[command(flatten)]
    pub target: S3Target,
    /// The dump command, after `--`.
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

/// The agent's result: the full version goes to S3, a summary to the termination log.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct VolumeResult {
    pub key: String,
    pub files: u64,
    pub bytes_read: u64,
    pub bytes_stored: u64,
    pub sha256: String,
    pub parts: u32,
    /// Objects the data was stored in: `key`, then `key.seg-00001`, ...
    #[serde(default = "one")]
    pub segments: u32,
    pub duration_seconds: f64,
    /// sha256 of the plaintext before compression (the tar stream, or the dump), hex.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub content_sha256: String,
    /// Unix sockets in the volume, skipped (they are endpoints of running processes).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub skipped_sockets: u64,
    /// Who owned the archived files (volume method).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ownership: Option<stateward_api::access::Ownership>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

fn one() -> u32 {
    1
}

/// Builds an S3 client from explicit credentials (never logged). `checksum_when_required`
/// is for S3-compatible servers that reject the SDK's default trailing checksums.
pub fn s3_client_with(
    key: &str,
    secret: &str,
    endpoint: Option<&str>,
    region: &str,
    force_path_style: bool,
    checksum_when_required: bool,
) -> aws_sdk_s3::Client {
    let creds = aws_sdk_s3::config::Credentials::new(key, secret, None, None, "stateward");
    let mut config = aws_sdk_s3::config::Builder::new()
        .behavior_version(aws_sdk_s3::config::BehaviorVersion::latest())
        .region(aws_sdk_s3::config::Region::new(region.to_string()))
        .force_path_style(force_path_style)
        .credentials_provider(creds)
        // Transient S3 errors (throttling, 5xx, dropped connections) are retried with
        // exponential back-off and jitter; a part that still fails fails the upload,
        // which is then aborted.
        .retry_config(
            aws_sdk_s3::config::retry::RetryConfig::standard()
                .with_max_attempts(8)
                .with_initial_backoff(std::time::Duration::from_millis(200))
                .with_max_backoff(std::time::Duration::from_secs(10)),
        )
        // The SDK's default connect timeout (3.1 s) is tuned for AWS endpoints; an
        // in-cluster S3 server on a busy node can take longer to accept, and a backup
        // Job runs once (backoffLimit 0), so a slow accept must not fail the volume.
        // Attempts (each bounded) are retried above; the whole run has its Job deadline.
        .timeout_config(
            aws_sdk_s3::config::timeout::TimeoutConfig::builder()
                .connect_timeout(std::time::Duration::from_secs(15))
                .build(),
        );
    if let Some(endpoint) = endpoint {
        config = config.endpoint_url(endpoint);
    }
    if checksum_when_required {
        config = config
            .request_checksum_calculation(
                aws_sdk_s3::config::RequestChecksumCalculation::WhenRequired,
            )
            .response_checksum_validation(
                aws_sdk_s3::config::ResponseChecksumValidation::WhenRequired,
            );
    }
    aws_sdk_s3::Client::from_conf(config.build())
}

/// Runs `backup-volume`; returns the process exit code.
pub async fn backup_volume(args: BackupVolumeArgs) -> i32 {
    report(backup_volume_inner(&args).await)
}

/// Runs `backup-exec`; returns the process exit code.
pub async fn backup_exec(args: BackupExecArgs) -> i32 {
    report(backup_exec_inner(&args).await)
}

/// Prints the result (or the error) and writes the termination message the controller
/// reads.
fn report(outcome: Result<VolumeResult, String>) -> i32 {
    match outcome {
        Ok(result) => {
            let summary = serde_json::to_string(&result).unwrap_or_default();
            println!("{summary}");
            write_termination(&summary);
            0
        }
        Err(message) => {
            eprintln!("agent failed: {message}");
            write_termination(&format!(
                "{{\"error\":{}}}",
                serde_json::Value::String(message)
            ));
            1
        }
    }
}

fn write_termination(text: &str) {
    let capped: String = text.chars().take(TERMINATION_LIMIT).collect();
    let _ = std::fs::write(TERMINATION_LOG, capped);
}

async fn backup_volume_inner(args: &BackupVolumeArgs) -> Result<VolumeResult, String> {
    if !args.source.is_dir() {
        return Err(format!(
            "the source {} is not a directory (is the volume mounted?)",
            args.source.display()
        ));
    }
    let target = &args.target;
    let client = target.client()?;
    let recipient = target.recipient()?;
    let started = std::time::Instant::now();
    let (source, level, threads) = (args.source.clone(), target.zstd_level, target.zstd_threads);
    let (stored, stats) = stream_to_s3(&client, &target.upload_options(), move |writer| {
        crate::crypto::sealed(writer, recipient.as_ref(), |out| {
            write_volume_archive(&source, out, level, threads)
                .map(|(_, stats)| stats)
                .map_err(unreadable_hint)
        })
    })
    .await
    .map_err(|e| e.to_string())?;
    let result = VolumeResult {
        key: target.key.clone(),
        files: stats.files,
        bytes_read: stats.bytes_read,
        bytes_stored: stored.bytes_stored,
        sha256: stored.sha256,
        parts: stored.parts,
        segments: stored.segments,
        duration_seconds: started.elapsed().as_secs_f64(),
        content_sha256: stats.content_sha256,
        skipped_sockets: stats.skipped_sockets,
        ownership: Some(stateward_api::access::Ownership {
            app_user: args.app_user.map(i64::from),
            ..stats.ownership
        }),
    };
    if stats.skipped_sockets > 0 {
        tracing::info!(
            sockets = stats.skipped_sockets,
            "skipped unix sockets (live endpoints, not data)"
        );
    }
    target.put_result(&client, &result).await?;
    Ok(result)
}

/// A file the agent's user cannot read: say who the agent is and what to change.
fn unreadable_hint(e: std::io::Error) -> std::io::Error {
    if e.kind() != std::io::ErrorKind::PermissionDenied {
        return e;
    }
    std::io::Error::new(
        e.kind(),
        format!(
            "{e} (the agent runs as uid {}, the data's owner as Stateward found it: files of another owner need spec.dataAccess.elevated: true on the app, or set spec.dataAccess.owner)",
            nix::unistd::geteuid()
        ),
    )
}

/// How much of the dump command's stderr is kept for the error message.
const STDERR_TAIL: usize = 1024;

async fn backup_exec_inner(args: &BackupExecArgs) -> Result<VolumeResult, String> {
    use futures::StreamExt as _;
    use kube::api::{Api, AttachParams};
    use tokio::io::AsyncReadExt;

    let target = &args.target;
    let s3 = target.client()?;
    let recipient = target.recipient()?;
    let kube = kube::Client::try_default()
        .await
        .map_err(|e| format!("no Kubernetes configuration: {e}"))?;
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(kube, &args.namespace);
    let mut params = AttachParams::default()
        .stdin(false)
        .stdout(true)
        .stderr(true);
    if let Some(container) = &args.container {
        params = params.container(container.clone());
    }
    let started = std::time::Instant::now();
    let mut process = pods
        .exec(&args.pod, args.command.clone(), &params)
        .await
        .map_err(|e| format!("exec in pod {}: {e}", args.pod))?;
    let mut stdout = process.stdout().ok_or("the exec session has no stdout")?;
    let stderr = process.stderr();
    let status = process.take_status();

    // stdout → bounded channel → the blocking zstd producer. The channel keeps memory
    // bounded: a slow upload slows the reads, and the API server applies back-pressure.
    let (chunks, mut receive) = tokio::sync::mpsc::channel::<bytes::Bytes>(8);
    let reader = tokio::spawn(async move {
        let mut buffer = vec![0u8; 256 << 10];
        loop {
            let n = stdout.read(&mut buffer).await?;
            if n == 0 {
                return Ok::<(), std::io::Error>(());
            }
            if chunks
                .send(bytes::Bytes::copy_from_slice(&buffer[..n]))
                .await
                .is_err()
            {
                return Ok(());
            }
        }
    });
    let stderr_tail = tokio::spawn(async move {
        let mut tail = Vec::new();
        if let Some(stderr) = stderr {
            let mut lines = tokio_util::io::ReaderStream::new(stderr);
            while let Some(Ok(chunk)) = lines.next().await {
                tail.extend_from_slice(&chunk);
                if tail.len() > STDERR_TAIL {
                    tail.drain(..tail.len() - STDERR_TAIL);
                }
            }
        }
        String::from_utf8_lossy(&tail).trim().to_string()
    });
    // The command's exit status, handed to the producer so that a failed dump fails the
    // upload (which is then aborted) instead of storing a truncated stream.
    let (exit_tx, exit_rx) = std::sync::mpsc::channel::<Result<(), String>>();
    let status_task = tokio::spawn(async move {
        let outcome = match status {
            None => Err("the exec session reported no exit status".to_string()),
            Some(status) => match status.await {
                Some(s) if s.status.as_deref() == Some("Success") => Ok(()),
                Some(s) => Err(s
                    .message
                    .unwrap_or_else(|| "the dump command failed".to_string())),
                None => Err("the exec session ended without an exit status".to_string()),
            },
        };
        let _ = exit_tx.send(outcome);
    });
    let (level, threads) = (target.zstd_level, target.zstd_threads);
    let produced = stream_to_s3(&s3, &target.upload_options(), move |writer| {
        crate::crypto::sealed(writer, recipient.as_ref(), |out| {
            let mut encoder = crate::archive::HashingWriter::new(crate::archive::zstd_encoder(
                out, level, threads,
            )?);
            while let Some(chunk) = receive.blocking_recv() {
                std::io::Write::write_all(&mut encoder, &chunk)?;
            }
            match exit_rx.recv_timeout(std::time::Duration::from_secs(60)) {
                Ok(Ok(())) => {}
                Ok(Err(message)) => return Err(std::io::Error::other(message)),
                Err(_) => {
                    return Err(std::io::Error::other(
                        "the dump command's exit status never arrived",
                    ));
                }
            }
            let (encoder, content_sha256, read) = encoder.finish();
            encoder.finish()?;
            Ok((read, content_sha256))
        })
    })
    .await;
    let _ = status_task.await;
    let read_error = match reader.await {
        Ok(Err(e)) => Some(e.to_string()),
        _ => None,
    };
    let stderr = stderr_tail.await.unwrap_or_default();
    let (stored, (bytes_read, content_sha256)) = match produced {
        Ok(done) => done,
        Err(e) => {
            let mut message = format!("{} in pod {}", e, args.pod);
            if let Some(read_error) = read_error {
                message.push_str(&format!(" (reading its output: {read_error})"));
            }
            if !stderr.is_empty() {
                message.push_str(&format!("; stderr: {stderr}"));
            }
            return Err(message);
        }
    };
    let result = VolumeResult {
        key: target.key.clone(),
        files: 0,
        bytes_read,
        bytes_stored: stored.bytes_stored,
        sha256: stored.sha256,
        parts: stored.parts,
        segments: stored.segments,
        duration_seconds: started.elapsed().as_secs_f64(),
        content_sha256,
        skipped_sockets: 0,
        ownership: None,
    };
    target.put_result(&s3, &result).await?;
    Ok(result)
}
