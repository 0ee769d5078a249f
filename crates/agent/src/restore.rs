//! `stateward agent restore-volume` and `restore-exec`: what the Jobs the restore
//! controller creates run. Every byte is checked twice while it streams — the stored
//! object against the manifest's sha256, the decompressed content against its
//! `contentSha256` — and nothing reaches the app's data before both matched: a volume
//! restore unpacks into a staging directory and swaps it in under a journal
//! ([`crate::swap`]); an exec restore verifies the whole stream first, then streams it
//! again into the restore command.
//!
//! Exit codes: 0 done, 1 failed (a retry may help), 2 refused (checksum, unsafe archive,
//! not enough space: a retry cannot help; the Job's pod failure policy stops there).

use std::io::{Read, Write};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::cli::{S3Connection, TERMINATION_LOG};
use crate::download::{HashingReader, ReadBackError, StoredObject, decrypted, read_back};
use crate::swap::{Workdir, free_space, space_needed};

/// Environment variable carrying the age identity (private key) into restore Jobs.
pub const IDENTITY_ENV: &str = "AGE_IDENTITY";

/// Exit code of a failure a retry cannot fix.
pub const EXIT_REFUSED: i32 = 2;

/// The stored data object to read back, as the manifest records it.
#[derive(clap::Args, Debug, Clone)]
pub struct StoredArgs {
    #[command(flatten)]
    pub connection: S3Connection,
    /// Object key of the data (its first segment).
    #[arg(long)]
    pub key: String,
    /// Objects the data is stored in (the manifest's `segments`).
    #[arg(long, default_value_t = 1)]
    pub segments: u32,
    /// sha256 of the stored bytes (the manifest's `sha256`).
    #[arg(long)]
    pub sha256: String,
    /// sha256 of the plaintext (the manifest's `contentSha256`; absent in backups made
    /// before it was recorded, which are then checked by the stored sha256 alone).
    #[arg(long)]
    pub content_sha256: Option<String>,
    /// Decrypt with the age identity in `AGE_IDENTITY`.
    #[arg(long)]
    pub decrypt: bool,
    /// Bytes of the stored data (the manifest's `bytesStored`): a download running past
    /// them is refused (`ChecksumMismatch`) before more reaches the volume. Optional, for
    /// controllers that do not pass it yet.
    #[arg(long)]
    pub bytes_stored: Option<u64>,
}

impl StoredArgs {
    fn object(&self) -> StoredObject {
        StoredObject {
            bucket: self.connection.bucket.clone(),
            key: self.key.clone(),
            segments: self.segments,
            expected_bytes: self.bytes_stored,
        }
    }

    fn identity(&self) -> Result<Option<age::x25519::Identity>, Failure> {
        if !self.decrypt {
            return Ok(None);
        }
        let text = std::env::var(IDENTITY_ENV).map_err(|_| {
            Failure::refused("NoIdentity", format!("--decrypt needs {IDENTITY_ENV}"))
        })?;
        crate::crypto::parse_identity(&text)
            .map(Some)
            .map_err(|e| Failure::refused("NoIdentity", format!("{IDENTITY_ENV} is {e}")))
    }
}

/// `stateward agent restore-volume`: unpack a volume archive (or place a dump as one
/// file) into a mounted volume through the staged swap.
#[derive(clap::Args, Debug, Clone)]
pub struct RestoreVolumeArgs {
    /// The volume's mount path (read-write).
    #[arg(long)]
    pub target: PathBuf,
    /// The Restore's uid, recorded in the swap journal.
    #[arg(long)]
    pub restore_id: String,
    /// Bytes of content the backup read (the manifest's `bytesRead`), for the free-space
    /// check.
    #[arg(long, default_value_t = 0)]
    pub bytes: u64,
    /// Files in the archive (the manifest's `files`), checked after unpacking.
    #[arg(long)]
    pub files: Option<u64>,
    /// Place a dump (exec backup) as this file at the volume root, instead of
    /// unpacking an archive (e.g. `dump.rdb` for redis).
    #[arg(long)]
    pub as_file: Option<PathBuf>,
    /// With `--as-file`: another name at the volume root removed in the same swap
    /// (repeatable).
    #[arg(long)]
    pub also_remove: Vec<String>,
    /// With `--as-file`: a small file written next to it, `PATH=CONTENT` (repeatable),
    /// e.g. the AOF manifest that makes redis load the dump as its AOF base.
    #[arg(long)]
    pub extra_file: Vec<String>,
    /// `all` (default): stage, verify and swap in. A restore of several volumes runs
    /// `stage` on every volume first and `swap` only when all verified, so a bad object
    /// on one volume never leaves the app with some volumes new and some old; `discard`
    /// throws away a staging that will not be used.
    #[arg(long, value_enum, default_value_t = Step::All)]
    pub step: Step,
    /// Elevated mode (`spec.dataAccess.elevated`): setuid/setgid files and device nodes
    /// are written too. Without it they are refused, and so is any entry whose owner the
    /// agent's own identity cannot give.
    #[arg(long)]
    pub elevated: bool,
    #[command(flatten)]
    pub stored: StoredArgs,
}

/// Which part of a volume restore to run.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    All,
    Stage,
    Swap,
    Discard,
}

/// `stateward agent restore-exec`: verify a dump, then stream it into a command's
/// standard input in an app pod.
#[derive(clap::Args, Debug, Clone)]
pub struct RestoreExecArgs {
    /// Namespace of the app pod (default: the agent's own).
    #[arg(long, env = "POD_NAMESPACE")]
    pub namespace: String,
    #[arg(long)]
    pub pod: String,
    #[arg(long)]
    pub container: Option<String>,
    #[command(flatten)]
    pub stored: StoredArgs,
    /// The restore command, after `--`.
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

/// What a restore agent reports (stdout and the termination message).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct RestoreResult {
    /// Both checksums matched.
    pub verified: bool,
    pub bytes_stored: u64,
    pub bytes_written: u64,
    pub files: u64,
    pub sha256: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub content_sha256: String,
    pub duration_seconds: f64,
    /// The swap finished after a crash of an earlier attempt.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub recovered: bool,
    /// Failure: a short reason (`ChecksumMismatch`, `ArchiveRefused`, `NotEnoughSpace`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A failure with its reason and whether retrying can help.
#[derive(Debug)]
pub struct Failure {
    pub reason: &'static str,
    pub message: String,
    pub permanent: bool,
}

impl Failure {
    fn refused(reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            reason,
            message: message.into(),
            permanent: true,
        }
    }

    fn transient(reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            reason,
            message: message.into(),
            permanent: false,
        }
    }
}

impl From<ReadBackError> for Failure {
    fn from(e: ReadBackError) -> Self {
        Self {
            reason: e.reason(),
            permanent: e.is_permanent(),
            message: e.to_string(),
        }
    }
}

fn report(outcome: Result<RestoreResult, Failure>) -> i32 {
    let (result, code) = match outcome {
        Ok(result) => (result, 0),
        Err(failure) => {
            eprintln!("agent failed: {}", failure.message);
            let code = if failure.permanent { EXIT_REFUSED } else { 1 };
            (
                RestoreResult {
                    reason: Some(failure.reason.to_string()),
                    error: Some(failure.message.chars().take(3000).collect()),
                    ..Default::default()
                },
                code,
            )
        }
    };
    let text = serde_json::to_string(&result).unwrap_or_default();
    println!("{text}");
    let _ = std::fs::write(TERMINATION_LOG, text.chars().take(4096).collect::<String>());
    code
}

/// Runs `restore-volume`; returns the process exit code.
pub async fn restore_volume(args: RestoreVolumeArgs) -> i32 {
    report(restore_volume_inner(&args).await)
}

/// Runs `restore-exec`; returns the process exit code.
pub async fn restore_exec(args: RestoreExecArgs) -> i32 {
    report(restore_exec_inner(&args).await)
}

async fn restore_volume_inner(args: &RestoreVolumeArgs) -> Result<RestoreResult, Failure> {
    let started = std::time::Instant::now();
    if !args.target.is_dir() {
        return Err(Failure::transient(
            "VolumeMissing",
            format!(
                "{} is not a directory (is the volume mounted?)",
                args.target.display()
            ),
        ));
    }
    let work = Workdir::new(&args.target);
    let finish = |mut result: RestoreResult| {
        result.duration_seconds = started.elapsed().as_secs_f64();
        result
    };
    // A journaled swap is finished first, whatever this run was asked to do: a volume is
    // never left half old, half new.
    if work.journaled() {
        let journal = work.recover().map_err(|e| {
            Failure::transient("RecoveryFailed", format!("finishing an earlier swap: {e}"))
        })?;
        if let Some(journal) = journal
            && journal.restore == args.restore_id
            && let Some(mut result) = matching_result(args, journal.result)
        {
            tracing::info!("an earlier attempt crashed mid-swap; the swap is now complete");
            result.recovered = true;
            return Ok(finish(result));
        }
    }
    match args.step {
        Step::Discard => {
            work.recover()
                .map_err(|e| Failure::transient("WriteFailed", e.to_string()))?;
            Ok(finish(RestoreResult::default()))
        }
        Step::Stage => {
            let result = stage(args, &work).await?;
            Ok(finish(result))
        }
        Step::Swap => {
            let staged = work.staged(&args.restore_id).ok_or_else(|| {
                Failure::refused(
                    "StagingLost",
                    "no verified staging of this restore on the volume (was it discarded?)",
                )
            })?;
            let result = matching_result(args, staged.clone()).ok_or_else(|| {
                Failure::refused(
                    "StagingLost",
                    "the staging marker on the volume does not record this backup's checksums: staging again is needed",
                )
            })?;
            swap(args, work, staged).await?;
            Ok(finish(result))
        }
        Step::All => {
            let result = stage(args, &work).await?;
            let recorded = serde_json::to_value(&result).unwrap_or_default();
            swap(args, work, recorded).await?;
            Ok(finish(result))
        }
    }
}

async fn swap(
    args: &RestoreVolumeArgs,
    work: Workdir,
    recorded: serde_json::Value,
) -> Result<(), Failure> {
    let restore_id = args.restore_id.clone();
    let replace_everything = args.as_file.is_none();
    let also = args.also_remove.clone();
    tokio::task::spawn_blocking(move || {
        work.swap_in(&restore_id, recorded, replace_everything, &also, None)
    })
    .await
    .map_err(|_| Failure::transient("SwapFailed", "the swap task was lost"))?
    .map_err(|e| {
        Failure::transient(
            "SwapFailed",
            format!("{e} (the journal keeps the swap resumable)"),
        )
    })
}

/// A result recorded on the volume (the staging marker, the swap journal), accepted only
/// when it is verified and records exactly the checksums this run was given: the volume
/// is writable by the app, so a marker alone never stands in for verification.
fn matching_result(args: &RestoreVolumeArgs, recorded: serde_json::Value) -> Option<RestoreResult> {
    let result = serde_json::from_value::<RestoreResult>(recorded).ok()?;
    let content_ok = args
        .stored
        .content_sha256
        .as_ref()
        .is_none_or(|expected| *expected == result.content_sha256);
    (result.verified && result.sha256 == args.stored.sha256 && content_ok).then_some(result)
}

/// Streams, verifies and unpacks into the staging directory; marks it staged.
async fn stage(args: &RestoreVolumeArgs, work: &Workdir) -> Result<RestoreResult, Failure> {
    if let Some(result) = work.staged(&args.restore_id)
        && let Some(result) = matching_result(args, result)
    {
        return Ok(result); // staged (and verified) by an earlier attempt
    }
    work.recover()
        .map_err(|e| Failure::transient("RecoveryFailed", e.to_string()))?;
    // Room for the new data next to the old.
    let files = args.files.unwrap_or(1);
    let needed = space_needed(args.bytes, files);
    let (free, inodes) = free_space(&args.target)
        .map_err(|e| Failure::transient("VolumeMissing", format!("reading free space: {e}")))?;
    if free < needed || inodes < files {
        return Err(Failure::refused(
            "NotEnoughSpace",
            format!(
                "not enough free space: the restore needs {needed} bytes and {files} inodes, the volume has {free} bytes and {inodes} inodes free (the old data stays until the new data is verified, so both must fit: grow the volume or free space)"
            ),
        ));
    }
    let staging = work
        .prepare()
        .map_err(|e| Failure::transient("WriteFailed", e.to_string()))?;
    let identity = args.stored.identity()?;
    let expected_content = args.stored.content_sha256.clone().unwrap_or_default();
    let keep_ownership = nix::unistd::geteuid().is_root();
    let elevation = crate::extract::Elevation {
        special_files: args.elevated,
    };
    let as_file = args.as_file.clone();
    let extra_files = args.extra_file.clone();
    // Files placed from a dump belong to whoever owns the volume root (the app's user
    // through fsGroup, typically), so the app can read and rewrite them.
    let owner = std::fs::metadata(&args.target)
        .ok()
        .map(|m| {
            (
                std::os::unix::fs::MetadataExt::uid(&m),
                std::os::unix::fs::MetadataExt::gid(&m),
            )
        })
        .filter(|_| keep_ownership);
    let client = args
        .stored
        .connection
        .client()
        .map_err(|e| Failure::refused("NoCredentials", e))?;
    let (unpacked, downloaded) = read_back(
        &client,
        &args.stored.object(),
        &args.stored.sha256,
        move |stored| {
            let plain = decrypted(stored, identity.as_ref())
                .map_err(|e| ReadBackError::Consume(e.to_string()))?;
            let decoder = zstd::stream::read::Decoder::new(plain)
                .map_err(|e| ReadBackError::Consume(format!("zstd: {e}")))?;
            let content = crate::download::Pipelined::new(HashingReader::new(decoder));
            let (stats, content) = match &as_file {
                None => {
                    let (stats, content) = crate::extract::extract_tree(
                        content, &staging, elevation,
                    )
                    .map_err(|e| {
                        if e.is_permanent() {
                            ReadBackError::Refused(e.to_string())
                        } else {
                            ReadBackError::Consume(e.to_string())
                        }
                    })?;
                    (stats, content)
                }
                Some(path) => {
                    let mut content = content;
                    let bytes = place_file(&staging, path, &mut content, &extra_files, owner)?;
                    (
                        crate::extract::ExtractStats {
                            files: 1,
                            bytes,
                            entries: 1,
                        },
                        content,
                    )
                }
            };
            let (content_sha256, written) = content
                .finish()
                .map_err(|e| ReadBackError::Consume(e.to_string()))?;
            if !expected_content.is_empty() && content_sha256 != expected_content {
                return Err(ReadBackError::ContentChecksum {
                    expected: expected_content,
                    actual: content_sha256,
                });
            }
            Ok((stats, content_sha256, written))
        },
    )
    .await
    .inspect_err(|_| {
        // Unverified data never stays on the volume.
        let _ = Workdir::new(&args.target).recover();
    })?;
    let (stats, content_sha256, _written) = unpacked;
    if args.as_file.is_none()
        && let Some(expected) = args.files
        && expected != stats.files
    {
        let _ = work.recover();
        return Err(Failure::refused(
            "ChecksumMismatch",
            format!(
                "the archive held {} files, the manifest recorded {expected}",
                stats.files
            ),
        ));
    }
    let result = RestoreResult {
        verified: true,
        bytes_stored: downloaded.bytes,
        bytes_written: stats.bytes,
        files: stats.files,
        sha256: downloaded.sha256,
        content_sha256,
        duration_seconds: 0.0,
        recovered: false,
        reason: None,
        error: None,
    };
    let recorded = serde_json::to_value(&result).unwrap_or_default();
    work.mark_staged(&args.restore_id, recorded)
        .map_err(|e| Failure::transient("WriteFailed", e.to_string()))?;
    Ok(result)
}

/// Writes the dump at `path` (relative, possibly nested: its top-level entry is what the
/// swap replaces) and the extra files, owned by `owner`.
fn place_file(
    staging: &std::path::Path,
    path: &std::path::Path,
    content: &mut impl Read,
    extra_files: &[String],
    owner: Option<(u32, u32)>,
) -> Result<u64, ReadBackError> {
    let consume = |e: std::io::Error| ReadBackError::Consume(e.to_string());
    let place = |rel: &std::path::Path| -> Result<PathBuf, ReadBackError> {
        let rel = crate::extract::inside(rel)
            .map_err(|e| ReadBackError::Refused(e.to_string()))?
            .ok_or_else(|| ReadBackError::Refused("a restore file names the volume root".into()))?;
        let mut at = staging.to_path_buf();
        let parts: Vec<_> = rel.components().collect();
        for part in &parts[..parts.len().saturating_sub(1)] {
            at.push(part);
            if !at.exists() {
                std::fs::create_dir(&at).map_err(consume)?;
                if let Some((uid, gid)) = owner {
                    std::os::unix::fs::chown(&at, Some(uid), Some(gid)).map_err(consume)?;
                }
            }
        }
        Ok(staging.join(rel))
    };
    let target = place(path)?;
    let mut file = std::fs::File::create(&target).map_err(consume)?;
    let bytes = std::io::copy(content, &mut file)
        .map_err(|e| ReadBackError::Consume(format!("decoding the dump: {e}")))?;
    file.sync_all().map_err(consume)?;
    let mut written = vec![target];
    for extra in extra_files {
        let Some((rel, text)) = extra.split_once('=') else {
            return Err(ReadBackError::Refused(format!(
                "--extra-file {extra:?} is not PATH=CONTENT"
            )));
        };
        let at = place(std::path::Path::new(rel))?;
        std::fs::write(&at, text).map_err(consume)?;
        written.push(at);
    }
    if let Some((uid, gid)) = owner {
        for path in &written {
            std::os::unix::fs::chown(path, Some(uid), Some(gid)).map_err(consume)?;
        }
    }
    Ok(bytes)
}

/// How much of the restore command's output is kept for the error message.
const OUTPUT_TAIL: usize = 1024;

async fn restore_exec_inner(args: &RestoreExecArgs) -> Result<RestoreResult, Failure> {
    use kube::api::{Api, AttachParams};
    use tokio::io::AsyncWriteExt;

    let started = std::time::Instant::now();
    let client = args
        .stored
        .connection
        .client()
        .map_err(|e| Failure::refused("NoCredentials", e))?;
    let expected_content = args.stored.content_sha256.clone().unwrap_or_default();

    // Pass 1: the whole dump verified before the app sees a byte.
    let identity = args.stored.identity()?;
    let check_content = expected_content.clone();
    let ((content_sha256, bytes), downloaded) = read_back(
        &client,
        &args.stored.object(),
        &args.stored.sha256,
        move |stored| {
            let plain = decrypted(stored, identity.as_ref())
                .map_err(|e| ReadBackError::Consume(e.to_string()))?;
            let decoder = zstd::stream::read::Decoder::new(plain)
                .map_err(|e| ReadBackError::Consume(format!("zstd: {e}")))?;
            let (digest, bytes) = HashingReader::new(decoder)
                .finish()
                .map_err(|e| ReadBackError::Consume(format!("decoding the dump: {e}")))?;
            if !check_content.is_empty() && digest != check_content {
                return Err(ReadBackError::ContentChecksum {
                    expected: check_content,
                    actual: digest,
                });
            }
            Ok((digest, bytes))
        },
    )
    .await?;

    // Pass 2: stream it into the restore command.
    let kube = kube::Client::try_default().await.map_err(|e| {
        Failure::transient("NoKubernetes", format!("no Kubernetes configuration: {e}"))
    })?;
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(kube, &args.namespace);
    let mut params = AttachParams::default()
        .stdin(true)
        .stdout(true)
        .stderr(true);
    if let Some(container) = &args.container {
        params = params.container(container.clone());
    }
    let mut process = pods
        .exec(&args.pod, args.command.clone(), &params)
        .await
        .map_err(|e| Failure::transient("ExecFailed", format!("exec in pod {}: {e}", args.pod)))?;
    let mut stdin = process
        .stdin()
        .ok_or_else(|| Failure::transient("ExecFailed", "the exec session has no stdin"))?;
    let status = process.take_status();
    let output_tail = {
        let stdout = process.stdout();
        let stderr = process.stderr();
        tokio::spawn(async move {
            use tokio::io::AsyncReadExt;
            let mut tail = Vec::new();
            let mut buffer = vec![0u8; 16 << 10];
            for mut stream in [stdout, stderr].into_iter().flatten() {
                loop {
                    match stream.read(&mut buffer).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            tail.extend_from_slice(&buffer[..n]);
                            if tail.len() > OUTPUT_TAIL {
                                tail.drain(..tail.len() - OUTPUT_TAIL);
                            }
                        }
                    }
                }
            }
            String::from_utf8_lossy(&tail).trim().to_string()
        })
    };
    let (plain_tx, mut plain_rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(8);
    let identity = args.stored.identity()?;
    let object = args.stored.object();
    let second = read_back(&client, &object, &args.stored.sha256, move |stored| {
        let plain = decrypted(stored, identity.as_ref())
            .map_err(|e| ReadBackError::Consume(e.to_string()))?;
        let mut decoder = zstd::stream::read::Decoder::new(plain)
            .map_err(|e| ReadBackError::Consume(format!("zstd: {e}")))?;
        let mut buffer = vec![0u8; 256 << 10];
        loop {
            let n = decoder
                .read(&mut buffer)
                .map_err(|e| ReadBackError::Consume(format!("decoding the dump: {e}")))?;
            if n == 0 {
                return Ok(());
            }
            if plain_tx
                .blocking_send(bytes::Bytes::copy_from_slice(&buffer[..n]))
                .is_err()
            {
                return Err(ReadBackError::Consume(
                    "the restore command stopped reading its input".into(),
                ));
            }
        }
    });
    let feed = async {
        while let Some(chunk) = plain_rx.recv().await {
            stdin.write_all(&chunk).await?;
        }
        stdin.shutdown().await?;
        drop(stdin);
        Ok::<(), std::io::Error>(())
    };
    let (streamed, fed) = tokio::join!(second, feed);
    let exit = match status {
        None => Err("the exec session reported no exit status".to_string()),
        Some(status) => match status.await {
            Some(s) if s.status.as_deref() == Some("Success") => Ok(()),
            Some(s) => Err(s
                .message
                .unwrap_or_else(|| "the restore command failed".to_string())),
            None => Err("the exec session ended without an exit status".to_string()),
        },
    };
    let output = output_tail.await.unwrap_or_default();
    streamed?;
    let with_output = |message: String| {
        if output.is_empty() {
            message
        } else {
            format!("{message}; output: {output}")
        }
    };
    if let Err(e) = fed {
        return Err(Failure::transient(
            "ExecFailed",
            with_output(format!(
                "writing to the restore command in pod {}: {e}",
                args.pod
            )),
        ));
    }
    if let Err(e) = exit {
        return Err(Failure::refused(
            "RestoreCommandFailed",
            with_output(format!(
                "the restore command failed in pod {}: {e}",
                args.pod
            )),
        ));
    }
    let _ = std::io::stdout().flush();
    Ok(RestoreResult {
        verified: true,
        bytes_stored: downloaded.bytes,
        bytes_written: bytes,
        files: 0,
        sha256: downloaded.sha256,
        content_sha256,
        duration_seconds: started.elapsed().as_secs_f64(),
        recovered: false,
        reason: None,
        error: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        args: RestoreVolumeArgs,
    }

    fn args(extra: &[&str]) -> RestoreVolumeArgs {
        let base = [
            "agent",
            "--target",
            "/data",
            "--restore-id",
            "r1",
            "--bucket",
            "b",
            "--key",
            "k",
            "--sha256",
            "stored",
        ];
        <Cli as clap::Parser>::try_parse_from(base.iter().chain(extra))
            .map(|c| c.args)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn a_recorded_result_counts_only_when_verified_with_this_runs_checksums() {
        let with_content = args(&["--content-sha256", "content"]);
        let recorded = |verified: bool, sha256: &str, content: &str| {
            serde_json::json!({"verified": verified, "bytesStored": 1, "bytesWritten": 1, "files": 1,
                "sha256": sha256, "contentSha256": content, "durationSeconds": 0.0})
        };
        assert!(matching_result(&with_content, recorded(true, "stored", "content")).is_some());
        for (case, value) in [
            ("unverified", recorded(false, "stored", "content")),
            ("another object", recorded(true, "other", "content")),
            ("another content", recorded(true, "stored", "other")),
            ("no content hash", recorded(true, "stored", "")),
            ("not a result", serde_json::json!({"verified": true})),
        ] {
            assert!(matching_result(&with_content, value).is_none(), "{case}");
        }
        // A backup from before contentSha256 was recorded: the stored checksum decides.
        assert!(matching_result(&args(&[]), recorded(true, "stored", "")).is_some());
        assert!(matching_result(&args(&[]), recorded(true, "other", "")).is_none());
    }
}
