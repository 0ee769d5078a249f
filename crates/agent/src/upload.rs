//! Streaming a byte stream into one S3 object through a multipart upload, with a bounded
//! number of parts in memory and in flight.

use std::io::Write;

use aws_sdk_s3::Client;
use aws_sdk_s3::error::DisplayErrorContext;
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use bytes::Bytes;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

/// S3's smallest part (except the last).
pub const MIN_PART_SIZE: usize = 5 << 20;

/// Where and how to upload.
#[derive(Debug, Clone)]
pub struct UploadOptions {
    pub bucket: String,
    pub key: String,
    /// Bytes per part (at least 5 MiB).
    pub part_size: usize,
    /// Parts uploading at once; also the parts waiting in the hand-over channel.
    pub parts_in_flight: usize,
}

impl UploadOptions {
    /// Upper bound of the stream data held in memory at once.
    pub fn memory_bound(&self) -> usize {
        // in flight + queued + the one being filled
        self.part_size * (2 * self.parts_in_flight.max(1) + 1)
    }
}

/// What was stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamResult {
    pub bytes_stored: u64,
    /// sha256 of the stored bytes (hex).
    pub sha256: String,
    pub parts: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    #[error("producing the stream failed: {0}")]
    Produce(#[source] std::io::Error),
    #[error("starting the multipart upload of {key} failed: {message}")]
    Start { key: String, message: String },
    #[error("uploading part {part} of {key} failed: {message}")]
    Part {
        key: String,
        part: i32,
        message: String,
    },
    #[error("completing the upload of {key} failed: {message}")]
    Complete { key: String, message: String },
    #[error("the producer task panicked or was cancelled")]
    ProducerLost,
}

impl UploadError {
    /// A short label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::Produce(_) => "produce",
            Self::Start { .. } => "start",
            Self::Part { .. } => "part",
            Self::Complete { .. } => "complete",
            Self::ProducerLost => "producer_lost",
        }
    }
}

/// The writer the producer writes the stream into: it cuts parts and hashes as it goes.
pub struct PartWriter {
    buffer: Vec<u8>,
    part_size: usize,
    sender: mpsc::Sender<Bytes>,
    hasher: Sha256,
    written: u64,
}

impl PartWriter {
    fn send_buffer(&mut self) -> std::io::Result<()> {
        let full = std::mem::replace(&mut self.buffer, Vec::with_capacity(self.part_size));
        self.sender
            .blocking_send(Bytes::from(full))
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the upload stopped"))
    }

    fn finish(mut self) -> std::io::Result<(u64, String)> {
        if !self.buffer.is_empty() {
            self.send_buffer()?;
        }
        Ok((self.written, hex::encode(self.hasher.finalize())))
    }
}

impl Write for PartWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let room = self.part_size - self.buffer.len();
        let n = room.min(data.len());
        self.buffer.extend_from_slice(&data[..n]);
        self.hasher.update(&data[..n]);
        self.written += n as u64;
        if self.buffer.len() == self.part_size {
            self.send_buffer()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn sdk_message<E: std::error::Error>(e: &E) -> String {
    DisplayErrorContext(e).to_string()
}

/// Runs `produce` on a blocking thread, giving it a writer, and uploads everything it
/// writes as one object. On any failure the multipart upload is aborted.
pub async fn stream_to_s3<F, T>(
    client: &Client,
    opts: &UploadOptions,
    produce: F,
) -> Result<(StreamResult, T), UploadError>
where
    F: FnOnce(PartWriter) -> std::io::Result<(PartWriter, T)> + Send + 'static,
    T: Send + 'static,
{
    let part_size = opts.part_size.max(MIN_PART_SIZE);
    let in_flight = opts.parts_in_flight.max(1);
    let created = client
        .create_multipart_upload()
        .bucket(&opts.bucket)
        .key(&opts.key)
        .send()
        .await
        .map_err(|e| UploadError::Start {
            key: opts.key.clone(),
            message: sdk_message(&e),
        })?;
    let upload_id = created.upload_id().unwrap_or_default().to_string();

    let (sender, mut receiver) = mpsc::channel::<Bytes>(in_flight);
    let producer = tokio::task::spawn_blocking(move || {
        let writer = PartWriter {
            buffer: Vec::with_capacity(part_size),
            part_size,
            sender,
            hasher: Sha256::new(),
            written: 0,
        };
        let (writer, value) = produce(writer)?;
        let (written, sha) = writer.finish()?;
        Ok::<_, std::io::Error>((written, sha, value))
    });

    let result = async {
        let mut uploads: JoinSet<Result<CompletedPart, UploadError>> = JoinSet::new();
        let mut completed = Vec::new();
        let mut next_part = 1i32;
        while let Some(part) = receiver.recv().await {
            while uploads.len() >= in_flight {
                if let Some(done) = uploads.join_next().await {
                    completed.push(done.map_err(|_| UploadError::ProducerLost)??);
                }
            }
            let (client, bucket, key, upload_id, number) = (
                client.clone(),
                opts.bucket.clone(),
                opts.key.clone(),
                upload_id.clone(),
                next_part,
            );
            uploads.spawn(async move {
                let response = client
                    .upload_part()
                    .bucket(&bucket)
                    .key(&key)
                    .upload_id(&upload_id)
                    .part_number(number)
                    .body(ByteStream::from(part))
                    .send()
                    .await
                    .map_err(|e| UploadError::Part {
                        key: key.clone(),
                        part: number,
                        message: sdk_message(&e),
                    })?;
                Ok(CompletedPart::builder()
                    .part_number(number)
                    .set_e_tag(response.e_tag().map(String::from))
                    .build())
            });
            next_part += 1;
        }
        while let Some(done) = uploads.join_next().await {
            completed.push(done.map_err(|_| UploadError::ProducerLost)??);
        }
        let (written, sha256, value) = producer
            .await
            .map_err(|_| UploadError::ProducerLost)?
            .map_err(UploadError::Produce)?;
        if completed.is_empty() {
            // An empty stream still needs one (empty) part.
            let response = client
                .upload_part()
                .bucket(&opts.bucket)
                .key(&opts.key)
                .upload_id(&upload_id)
                .part_number(1)
                .body(ByteStream::from_static(b""))
                .send()
                .await
                .map_err(|e| UploadError::Part {
                    key: opts.key.clone(),
                    part: 1,
                    message: sdk_message(&e),
                })?;
            completed.push(
                CompletedPart::builder()
                    .part_number(1)
                    .set_e_tag(response.e_tag().map(String::from))
                    .build(),
            );
        }
        completed.sort_by_key(|p| p.part_number());
        let parts = completed.len() as u32;
        client
            .complete_multipart_upload()
            .bucket(&opts.bucket)
            .key(&opts.key)
            .upload_id(&upload_id)
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(completed))
                    .build(),
            )
            .send()
            .await
            .map_err(|e| UploadError::Complete {
                key: opts.key.clone(),
                message: sdk_message(&e),
            })?;
        Ok((
            StreamResult {
                bytes_stored: written,
                sha256,
                parts,
            },
            value,
        ))
    }
    .await;

    if result.is_err() {
        // Dropping the receiver stops the producer at its next part.
        drop(receiver);
        if let Err(e) = client
            .abort_multipart_upload()
            .bucket(&opts.bucket)
            .key(&opts.key)
            .upload_id(&upload_id)
            .send()
            .await
        {
            tracing::warn!(key = %opts.key, error = %sdk_message(&e), "aborting the multipart upload failed; the sweep will retry");
        }
    }
    result
}
