//! The data mover. A volume (as a tar stream) or a dump command's output goes through
//! zstd into an S3 multipart upload; memory is bounded by `parts_in_flight × part_size`
//! whatever the data size, and the sha256 of the stored bytes is computed on the way.
//!
//! The pipeline: a blocking producer (tar → zstd → [`PartWriter`]) cuts the compressed
//! stream into parts and hands them over a bounded channel to the async [`upload`] loop,
//! which keeps a few part uploads in flight. A failed upload is aborted, so no half
//! object and no open multipart upload stays behind.

pub mod archive;
pub mod cli;
pub mod crypto;
pub mod download;
pub mod extract;
pub mod job;
pub mod manifest;
pub mod repository;
pub mod restore;
pub mod swap;
pub mod upload;

pub use archive::{ArchiveStats, write_volume_archive};
pub use upload::{StreamResult, UploadError, UploadOptions, stream_to_s3};
