//! `stateward agent ...`: what the Jobs the backup controller creates run. Credentials
//! come from the environment (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, set from the
//! repository's Secret), never from arguments, so they appear in no pod spec or log.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::{UploadOptions, stream_to_s3, write_volume_archive};

/// Where the agent writes its short summary (the kubelet reads at most 4 KiB).
pub const TERMINATION_LOG: &str = "/dev/termination-log";
const TERMINATION_LIMIT: usize = 4096;

/// `stateward agent backup-volume`: archive a mounted volume into one S3 object.
#[derive(clap::Args, Debug, Clone)]
pub struct BackupVolumeArgs {
    /// The volume's mount path (mounted read-only).
    #[arg(long)]
    pub source: PathBuf,
    #[arg(long)]
    pub bucket: String,
    /// Object key of the archive.
    #[arg(long)]
    pub key: String,
    /// Object key of the full result (JSON).
    #[arg(long)]
    pub result_key: Option<String>,
    /// S3 endpoint for S3-compatible servers.
    #[arg(long)]
    pub endpoint: Option<String>,
    #[arg(long, default_value = "us-east-1")]
    pub region: String,
    #[arg(long)]
    pub force_path_style: bool,
    /// Part size in MiB (at least 5).
    #[arg(long, default_value_t = 16)]
    pub part_size_mib: usize,
    #[arg(long, default_value_t = 4)]
    pub parts_in_flight: usize,
    /// zstd level (1 fastest .. 19 smallest).
    #[arg(long, default_value_t = 3)]
    pub zstd_level: i32,
    /// zstd worker threads.
    #[arg(long, default_value_t = 2)]
    pub zstd_threads: u32,
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
    pub duration_seconds: f64,
}

/// Builds an S3 client from explicit settings and environment credentials.
pub fn s3_client(
    endpoint: Option<&str>,
    region: &str,
    force_path_style: bool,
) -> Result<aws_sdk_s3::Client, String> {
    let key = std::env::var("AWS_ACCESS_KEY_ID")
        .map_err(|_| "AWS_ACCESS_KEY_ID is not set".to_string())?;
    let secret = std::env::var("AWS_SECRET_ACCESS_KEY")
        .map_err(|_| "AWS_SECRET_ACCESS_KEY is not set".to_string())?;
    Ok(s3_client_with(
        &key,
        &secret,
        endpoint,
        region,
        force_path_style,
        false,
    ))
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
        .credentials_provider(creds);
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
    match backup_volume_inner(&args).await {
        Ok(result) => {
            let summary = serde_json::to_string(&result).unwrap_or_default();
            println!("{summary}");
            write_termination(&summary);
            0
        }
        Err(message) => {
            eprintln!("backup-volume failed: {message}");
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
    let client = s3_client(
        args.endpoint.as_deref(),
        &args.region,
        args.force_path_style,
    )?;
    let options = UploadOptions {
        bucket: args.bucket.clone(),
        key: args.key.clone(),
        part_size: args.part_size_mib.max(5) << 20,
        parts_in_flight: args.parts_in_flight.max(1),
    };
    let started = std::time::Instant::now();
    let (source, level, threads) = (args.source.clone(), args.zstd_level, args.zstd_threads);
    let (stored, stats) = stream_to_s3(&client, &options, move |writer| {
        write_volume_archive(&source, writer, level, threads)
    })
    .await
    .map_err(|e| e.to_string())?;
    let result = VolumeResult {
        key: args.key.clone(),
        files: stats.files,
        bytes_read: stats.bytes_read,
        bytes_stored: stored.bytes_stored,
        sha256: stored.sha256,
        parts: stored.parts,
        duration_seconds: started.elapsed().as_secs_f64(),
    };
    if let Some(result_key) = &args.result_key {
        let body = serde_json::to_vec_pretty(&result).map_err(|e| e.to_string())?;
        client
            .put_object()
            .bucket(&args.bucket)
            .key(result_key)
            .body(aws_sdk_s3::primitives::ByteStream::from(body))
            .send()
            .await
            .map_err(|e| {
                format!(
                    "writing the result object: {}",
                    aws_sdk_s3::error::DisplayErrorContext(&e)
                )
            })?;
    }
    Ok(result)
}
