//! Reading a stored backup back: the segments of one data object streamed from S3 in
//! order, hashed as they arrive, handed to a blocking consumer (age → zstd → tar or a
//! command's stdin) over a bounded channel, so memory stays flat whatever the size.

use std::io::Read;

use aws_sdk_s3::Client;
use aws_sdk_s3::error::DisplayErrorContext;
use bytes::Bytes;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use crate::upload::segment_key;

/// Chunks waiting between the download and the consumer (each at most a few hundred KiB,
/// as the HTTP body delivers them).
const CHANNEL_CHUNKS: usize = 64;

/// What was downloaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Downloaded {
    pub bytes: u64,
    /// sha256 of the stored bytes (all segments), hex.
    pub sha256: String,
}

/// Why a download or its consumer failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadBackError {
    #[error("reading {key} from S3: {message}")]
    Get { key: String, message: String },
    /// The stored bytes are not the ones the manifest recorded: the object was damaged
    /// or replaced. Checked over the whole stream, even when decoding failed first.
    #[error(
        "checksum mismatch: the stored data hashes to {actual}, the manifest recorded {expected}{}",
        decode.as_ref().map(|d| format!(" (decoding also failed: {d})")).unwrap_or_default()
    )]
    StoredChecksum {
        expected: String,
        actual: String,
        decode: Option<String>,
    },
    #[error(
        "checksum mismatch: the restored content hashes to {actual}, the manifest recorded {expected}"
    )]
    ContentChecksum { expected: String, actual: String },
    #[error("{0}")]
    Consume(String),
    /// The consumer refused the data for a reason a retry cannot fix.
    #[error("{0}")]
    Refused(String),
    #[error("the consumer task panicked or was cancelled")]
    ConsumerLost,
    /// More bytes arrived than the manifest recorded: the object was replaced, and the
    /// rest is not read (it could be endless, or fill the volume before any hash ends).
    #[error(
        "checksum mismatch: the stored data is larger than the {expected} bytes the manifest recorded"
    )]
    LargerThanRecorded { expected: u64 },
}

impl ReadBackError {
    /// Whether a retry with the same inputs can never succeed.
    pub fn is_permanent(&self) -> bool {
        matches!(
            self,
            Self::StoredChecksum { .. }
                | Self::ContentChecksum { .. }
                | Self::Refused(_)
                | Self::LargerThanRecorded { .. }
        )
    }

    /// The condition reason a controller shows.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::StoredChecksum { .. }
            | Self::ContentChecksum { .. }
            | Self::LargerThanRecorded { .. } => "ChecksumMismatch",
            Self::Refused(_) => "ArchiveRefused",
            Self::Get { .. } => "StorageError",
            Self::Consume(_) | Self::ConsumerLost => "WriteFailed",
        }
    }
}

/// A blocking reader over the chunks the download hands over.
pub struct ChannelReader {
    rx: mpsc::Receiver<Bytes>,
    current: Bytes,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.current.is_empty() {
            match self.rx.blocking_recv() {
                Some(chunk) => self.current = chunk,
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current.split_to(n));
        Ok(n)
    }
}

/// A reader that hashes what passes through.
pub struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
    bytes: u64,
}

impl<R: Read> HashingReader<R> {
    pub fn new(inner: R) -> Self {
        Self {
            inner,
            hasher: Sha256::new(),
            bytes: 0,
        }
    }

    /// Reads to the end, then gives the hex digest and byte count.
    pub fn finish(mut self) -> std::io::Result<(String, u64)> {
        std::io::copy(&mut self, &mut std::io::sink())?;
        Ok((hex::encode(self.hasher.finalize()), self.bytes))
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
}

/// Bytes handed from the decoding thread to the unpacking one per message.
const PIPELINE_CHUNK: usize = 1 << 20;

/// A two-stage pipeline: a thread decodes and hashes (`inner`) ahead of the reader, which
/// unpacks; on 2 cores that overlaps decompression and hashing with file writes. Memory:
/// at most 4 chunks in flight.
pub struct Pipelined {
    rx: std::sync::mpsc::Receiver<std::io::Result<Vec<u8>>>,
    current: Vec<u8>,
    at: usize,
    worker: Option<std::thread::JoinHandle<std::io::Result<(String, u64)>>>,
}

impl Pipelined {
    pub fn new<R: Read + Send + 'static>(mut inner: HashingReader<R>) -> Self {
        let (tx, rx) = std::sync::mpsc::sync_channel(4);
        let worker = std::thread::spawn(move || {
            loop {
                let mut chunk = vec![0u8; PIPELINE_CHUNK];
                let mut filled = 0;
                while filled < chunk.len() {
                    match inner.read(&mut chunk[filled..]) {
                        Ok(0) => break,
                        Ok(n) => filled += n,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(e) => {
                            let message = e.to_string();
                            let _ = tx.send(Err(e));
                            return Err(std::io::Error::other(message));
                        }
                    }
                }
                if filled == 0 {
                    return inner.finish();
                }
                chunk.truncate(filled);
                if tx.send(Ok(chunk)).is_err() {
                    // The reader gave up (it failed); its error is the one reported.
                    return Err(std::io::Error::other("the reader stopped"));
                }
            }
        });
        Self {
            rx,
            current: Vec::new(),
            at: 0,
            worker: Some(worker),
        }
    }

    /// Reads to the end, then gives the decoding thread's digest and byte count.
    pub fn finish(mut self) -> std::io::Result<(String, u64)> {
        std::io::copy(&mut self, &mut std::io::sink())?;
        match self.worker.take().map(|w| w.join()) {
            Some(Ok(result)) => result,
            _ => Err(std::io::Error::other("the decoding thread was lost")),
        }
    }
}

impl Read for Pipelined {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.at == self.current.len() {
            match self.rx.recv() {
                Ok(Ok(chunk)) => {
                    self.current = chunk;
                    self.at = 0;
                }
                Ok(Err(e)) => return Err(e),
                Err(_) => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len() - self.at);
        buf[..n].copy_from_slice(&self.current[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

/// The plaintext of a stored stream: decrypted when `identity` is given (age), as is.
pub fn decrypted<'a, R: Read + Send + 'a>(
    reader: R,
    identity: Option<&age::x25519::Identity>,
) -> std::io::Result<Box<dyn Read + Send + 'a>> {
    match identity {
        None => Ok(Box::new(reader)),
        Some(identity) => {
            let decryptor = age::Decryptor::new(reader).map_err(|e| {
                std::io::Error::other(format!("the data is not an age stream: {e}"))
            })?;
            let plain = decryptor
                .decrypt(std::iter::once(identity as &dyn age::Identity))
                .map_err(|e| {
                    std::io::Error::other(format!(
                        "decrypting failed (is the repository's identity the key the backup was encrypted to?): {e}"
                    ))
                })?;
            Ok(Box::new(plain))
        }
    }
}

/// Where the stored object is.
#[derive(Debug, Clone)]
pub struct StoredObject {
    pub bucket: String,
    pub key: String,
    pub segments: u32,
    /// The stored size the manifest recorded (all segments), when the caller knows it:
    /// the download stops with a refusal as soon as more arrives.
    pub expected_bytes: Option<u64>,
}

/// Refuses a download once it has run past the recorded size.
fn within_recorded(expected: Option<u64>, bytes: u64) -> Result<(), ReadBackError> {
    match expected {
        Some(expected) if bytes > expected => Err(ReadBackError::LargerThanRecorded { expected }),
        _ => Ok(()),
    }
}

/// Streams the object's segments into `tx`, hashing every byte. When the consumer goes
/// away early (it failed), the rest is still read and hashed, so a damaged object is
/// reported as a checksum mismatch rather than as whatever decoding error came first.
pub async fn download(
    client: &Client,
    object: &StoredObject,
    tx: mpsc::Sender<Bytes>,
) -> Result<Downloaded, ReadBackError> {
    let mut hasher = Sha256::new();
    let mut bytes = 0u64;
    let mut consumer_alive = true;
    for index in 0..object.segments.max(1) {
        let key = segment_key(&object.key, index);
        let response = client
            .get_object()
            .bucket(&object.bucket)
            .key(&key)
            .send()
            .await
            .map_err(|e| ReadBackError::Get {
                key: key.clone(),
                message: DisplayErrorContext(&e).to_string(),
            })?;
        let mut body = response.body;
        while let Some(chunk) = body.try_next().await.map_err(|e| ReadBackError::Get {
            key: key.clone(),
            message: e.to_string(),
        })? {
            hasher.update(&chunk);
            bytes += chunk.len() as u64;
            within_recorded(object.expected_bytes, bytes)?;
            if consumer_alive && tx.send(chunk).await.is_err() {
                consumer_alive = false;
            }
        }
    }
    Ok(Downloaded {
        bytes,
        sha256: hex::encode(hasher.finalize()),
    })
}

/// Runs `consume` on a blocking thread over the object's stored bytes, and checks the
/// stored checksum once everything arrived. The consumer's own error is returned only
/// when the stored bytes were intact.
pub async fn read_back<T: Send + 'static>(
    client: &Client,
    object: &StoredObject,
    expected_sha256: &str,
    consume: impl FnOnce(ChannelReader) -> Result<T, ReadBackError> + Send + 'static,
) -> Result<(T, Downloaded), ReadBackError> {
    let (tx, rx) = mpsc::channel(CHANNEL_CHUNKS);
    let consumer = tokio::task::spawn_blocking(move || {
        consume(ChannelReader {
            rx,
            current: Bytes::new(),
        })
    });
    let downloaded = download(client, object, tx).await;
    let consumed = consumer.await.map_err(|_| ReadBackError::ConsumerLost)?;
    let downloaded = downloaded?;
    if !expected_sha256.is_empty() && downloaded.sha256 != expected_sha256 {
        return Err(ReadBackError::StoredChecksum {
            expected: expected_sha256.to_string(),
            actual: downloaded.sha256,
            decode: consumed.err().map(|e| e.to_string()),
        });
    }
    Ok((consumed?, downloaded))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_download_past_the_recorded_size_is_refused_as_a_checksum_mismatch() {
        assert!(within_recorded(None, u64::MAX).is_ok());
        assert!(within_recorded(Some(10), 10).is_ok());
        let refused = within_recorded(Some(10), 11).err();
        assert!(
            refused
                .as_ref()
                .is_some_and(|e| e.is_permanent() && e.reason() == "ChecksumMismatch"),
            "{refused:?}"
        );
    }
}
