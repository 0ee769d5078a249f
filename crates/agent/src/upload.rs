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
    /// Parts per object before the stream continues in the next segment object.
    pub segment_parts: u32,
}

/// S3's largest part count per multipart upload.
pub const MAX_PARTS: u32 = 10_000;

impl UploadOptions {
    /// Upper bound of the stream data held in memory at once.
    pub fn memory_bound(&self) -> usize {
        // in flight + one queued + the one being filled
        self.part_size * (self.parts_in_flight.max(1) + 2)
    }
}

/// What was stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamResult {
    pub bytes_stored: u64,
    /// sha256 of the stored bytes (hex).
    pub sha256: String,
    pub parts: u32,
    /// Objects the stream was stored in (see [`segment_key`]).
    pub segments: u32,
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

/// Object key of segment `index` of a stream stored under `key`: the first segment is
/// `key` itself, so a stream that fits one multipart upload is one plain object.
pub fn segment_key(key: &str, index: u32) -> String {
    if index == 0 {
        key.to_string()
    } else {
        format!("{key}.seg-{index:05}")
    }
}

/// One multipart upload: a segment of the stream.
struct Segment {
    key: String,
    upload_id: String,
    uploads: JoinSet<Result<CompletedPart, UploadError>>,
    completed: Vec<CompletedPart>,
    next_part: i32,
}

impl Segment {
    async fn start(client: &Client, bucket: &str, key: String) -> Result<Self, UploadError> {
        let created = client
            .create_multipart_upload()
            .bucket(bucket)
            .key(&key)
            .send()
            .await
            .map_err(|e| UploadError::Start {
                key: key.clone(),
                message: sdk_message(&e),
            })?;
        Ok(Self {
            upload_id: created.upload_id().unwrap_or_default().to_string(),
            key,
            uploads: JoinSet::new(),
            completed: Vec::new(),
            next_part: 1,
        })
    }

    fn parts(&self) -> u32 {
        (self.next_part - 1).max(0) as u32
    }

    async fn reap_one(&mut self) -> Result<(), UploadError> {
        if let Some(done) = self.uploads.join_next().await {
            self.completed
                .push(done.map_err(|_| UploadError::ProducerLost)??);
        }
        Ok(())
    }

    fn spawn_part(&mut self, client: &Client, bucket: &str, body: Bytes) {
        let (client, bucket, key, upload_id, number) = (
            client.clone(),
            bucket.to_string(),
            self.key.clone(),
            self.upload_id.clone(),
            self.next_part,
        );
        self.uploads.spawn(async move {
            let response = client
                .upload_part()
                .bucket(&bucket)
                .key(&key)
                .upload_id(&upload_id)
                .part_number(number)
                .body(ByteStream::from(body))
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
        self.next_part += 1;
    }

    async fn complete(mut self, client: &Client, bucket: &str) -> Result<u32, UploadError> {
        while !self.uploads.is_empty() {
            self.reap_one().await?;
        }
        if self.completed.is_empty() {
            // An empty stream still needs one (empty) part.
            self.spawn_part(client, bucket, Bytes::new());
            self.reap_one().await?;
        }
        self.completed.sort_by_key(|p| p.part_number());
        let parts = self.completed.len() as u32;
        client
            .complete_multipart_upload()
            .bucket(bucket)
            .key(&self.key)
            .upload_id(&self.upload_id)
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(std::mem::take(&mut self.completed)))
                    .build(),
            )
            .send()
            .await
            .map_err(|e| UploadError::Complete {
                key: self.key.clone(),
                message: sdk_message(&e),
            })?;
        Ok(parts)
    }
}

/// Runs `produce` on a blocking thread, giving it a writer, and uploads everything it
/// writes: one multipart upload per segment of at most `segment_parts` parts (S3 allows
/// 10,000), named by [`segment_key`]; concatenated, the segments are the stream. On any
/// failure the open upload is aborted and the finished segments are deleted, so nothing
/// of a failed stream stays behind.
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
    let segment_parts = opts.segment_parts.clamp(1, MAX_PARTS);
    let mut segment = Segment::start(client, &opts.bucket, segment_key(&opts.key, 0)).await?;
    let mut finished: Vec<String> = Vec::new();

    // One part waits while the others upload: enough to keep the uploads busy, and
    // every extra slot would be another part in memory.
    let (sender, mut receiver) = mpsc::channel::<Bytes>(1);
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

    let mut parts_total = 0u32;
    let result = async {
        while let Some(part) = receiver.recv().await {
            if segment.parts() >= segment_parts {
                let next = Segment::start(
                    client,
                    &opts.bucket,
                    segment_key(&opts.key, finished.len() as u32 + 1),
                )
                .await?;
                let done = std::mem::replace(&mut segment, next);
                let key = done.key.clone();
                parts_total += done.complete(client, &opts.bucket).await?;
                finished.push(key);
            }
            while segment.uploads.len() >= in_flight {
                segment.reap_one().await?;
            }
            segment.spawn_part(client, &opts.bucket, part);
        }
        let (written, sha256, value) = producer
            .await
            .map_err(|_| UploadError::ProducerLost)?
            .map_err(UploadError::Produce)?;
        Ok::<_, UploadError>((written, sha256, value))
    }
    .await;
    let (error, key, upload_id) = match result {
        Ok((written, sha256, value)) => {
            let key = segment.key.clone();
            let upload_id = segment.upload_id.clone();
            match segment.complete(client, &opts.bucket).await {
                Ok(parts) => {
                    finished.push(key);
                    return Ok((
                        StreamResult {
                            bytes_stored: written,
                            sha256,
                            parts: parts_total + parts,
                            segments: finished.len() as u32,
                        },
                        value,
                    ));
                }
                Err(e) => (e, key, upload_id),
            }
        }
        Err(e) => (e, segment.key.clone(), segment.upload_id.clone()),
    };
    // Dropping the receiver stops the producer at its next part.
    drop(receiver);
    if let Err(e) = client
        .abort_multipart_upload()
        .bucket(&opts.bucket)
        .key(&key)
        .upload_id(&upload_id)
        .send()
        .await
    {
        tracing::warn!(%key, error = %sdk_message(&e), "aborting the multipart upload failed; the sweep will retry");
    }
    for key in finished {
        if let Err(e) = client
            .delete_object()
            .bucket(&opts.bucket)
            .key(&key)
            .send()
            .await
        {
            tracing::warn!(%key, error = %sdk_message(&e), "deleting a finished segment failed; the sweep will retry");
        }
    }
    Err(error)
}
