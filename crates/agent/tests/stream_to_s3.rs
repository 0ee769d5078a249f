//! The data mover against the local S3 server: a volume tree goes up as a multipart
//! object that standard tools (`zstd -d | tar x`) turn back into identical files, and a
//! failing stream leaves no object and no open upload. Run with `cargo xtask test`.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result, ensure};
use sha2::{Digest, Sha256};
use stateward_agent::{UploadError, UploadOptions, stream_to_s3, write_volume_archive};
use stateward_testkit::harness::Cluster;

async fn bucket(client: &aws_sdk_s3::Client) -> Result<String> {
    let name = format!("agent-{:08x}", rand::random::<u32>());
    client.create_bucket().bucket(&name).send().await?;
    Ok(name)
}

/// A tree with compressible text, incompressible bytes, an empty file and nesting.
fn make_tree(dir: &Path) -> Result<BTreeMap<String, String>> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir.join("logs/2026"))?;
    let mut files = BTreeMap::new();
    let mut put = |rel: &str, data: Vec<u8>| -> Result<()> {
        std::fs::write(dir.join(rel), &data)?;
        files.insert(rel.to_string(), hex::encode(Sha256::digest(&data)));
        Ok(())
    };
    let text: Vec<u8> = (0..400_000)
        .flat_map(|i| format!("line {i} of a very compressible log\n").into_bytes())
        .collect();
    put("logs/2026/app.log", text)?;
    let mut random = vec![0u8; 12 << 20];
    let mut state = 0x2545F4914F6CDD1Du64;
    for chunk in random.chunks_mut(8) {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        chunk.copy_from_slice(&state.to_le_bytes()[..chunk.len()]);
    }
    put("data.bin", random)?;
    put("empty", Vec::new())?;
    for i in 0..200 {
        put(
            &format!("logs/small-{i:03}.txt"),
            format!("small file {i}\n").into_bytes(),
        )?;
    }
    Ok(files)
}

fn hash_tree(dir: &Path, rel: &Path, out: &mut BTreeMap<String, String>) -> Result<()> {
    for entry in std::fs::read_dir(dir.join(rel))? {
        let entry = entry?;
        let name = rel.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            hash_tree(dir, &name, out)?;
        } else {
            let data = std::fs::read(entry.path())?;
            out.insert(
                name.to_string_lossy().into_owned(),
                hex::encode(Sha256::digest(&data)),
            );
        }
    }
    Ok(())
}

#[tokio::test]
async fn a_volume_streams_to_s3_and_standard_tools_restore_it_byte_for_byte() -> Result<()> {
    let cluster = Cluster::connect().await?;
    let client = cluster.s3_client();
    let bucket = bucket(&client).await?;
    let work = std::env::temp_dir().join(format!("stateward-agent-{}", std::process::id()));
    let source = work.join("source");
    let expected = make_tree(&source)?;

    let options = UploadOptions {
        bucket: bucket.clone(),
        key: "ns/app/backup-uid/data-app-0.tar.zst".into(),
        part_size: 5 << 20,
        parts_in_flight: 3,
        segment_parts: stateward_agent::upload::MAX_PARTS,
    };
    let src = source.clone();
    let (result, stats) = stream_to_s3(&client, &options, move |writer| {
        write_volume_archive(&src, writer, 3, 2)
    })
    .await?;
    ensure!(
        stats.files == expected.len() as u64,
        "archived {} files of {}",
        stats.files,
        expected.len()
    );
    ensure!(
        result.parts >= 2,
        "expected a multipart object, got {} part(s)",
        result.parts
    );

    let object = client
        .get_object()
        .bucket(&bucket)
        .key(&options.key)
        .send()
        .await?;
    let stored = object.body.collect().await?.into_bytes();
    ensure!(
        stored.len() as u64 == result.bytes_stored,
        "stored {} bytes, reported {}",
        stored.len(),
        result.bytes_stored
    );
    ensure!(
        hex::encode(Sha256::digest(&stored)) == result.sha256,
        "the reported sha256 is not the stored object's"
    );

    // By hand, with standard tools.
    let archive = work.join("downloaded.tar.zst");
    std::fs::File::create(&archive)?.write_all(&stored)?;
    let restored = work.join("restored");
    std::fs::create_dir_all(&restored)?;
    let status = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "zstd -d -c '{}' | tar -x -C '{}'",
            archive.display(),
            restored.display()
        ))
        .status()
        .context("running zstd and tar")?;
    ensure!(status.success(), "zstd -d | tar x failed");
    let mut got = BTreeMap::new();
    hash_tree(&restored, Path::new(""), &mut got)?;
    ensure!(
        got == expected,
        "restored tree differs:\nexpected {expected:?}\ngot {got:?}"
    );
    let _ = std::fs::remove_dir_all(&work);
    Ok(())
}

#[tokio::test]
async fn a_failing_stream_leaves_no_object_and_no_open_upload() -> Result<()> {
    let cluster = Cluster::connect().await?;
    let client = cluster.s3_client();
    let bucket = bucket(&client).await?;
    let options = UploadOptions {
        bucket: bucket.clone(),
        key: "ns/app/failed/data.tar.zst".into(),
        part_size: 5 << 20,
        parts_in_flight: 2,
        segment_parts: stateward_agent::upload::MAX_PARTS,
    };
    let outcome = stream_to_s3(&client, &options, |mut writer| {
        // Two full parts go up, then the source fails (a read error mid-volume).
        writer.write_all(&vec![1u8; 11 << 20])?;
        Err::<(_, ()), _>(std::io::Error::other("disk read error"))
    })
    .await;
    match outcome {
        Err(UploadError::Produce(e)) => ensure!(e.to_string().contains("disk read error"), "{e}"),
        other => anyhow::bail!("expected a producer error, got {other:?}"),
    }
    let head = client
        .head_object()
        .bucket(&bucket)
        .key(&options.key)
        .send()
        .await;
    ensure!(head.is_err(), "a failed stream left an object behind");
    let uploads = client
        .list_multipart_uploads()
        .bucket(&bucket)
        .send()
        .await?;
    ensure!(
        uploads.uploads().is_empty(),
        "open multipart uploads remain: {:?}",
        uploads.uploads()
    );
    Ok(())
}

#[tokio::test]
async fn a_stream_larger_than_one_object_is_split_into_segments_that_concatenate() -> Result<()> {
    let cluster = Cluster::connect().await?;
    let client = cluster.s3_client();
    let bucket = bucket(&client).await?;
    let work = std::env::temp_dir().join(format!("stateward-segments-{}", std::process::id()));
    let source = work.join("source");
    let expected = make_tree(&source)?;
    // Two 5 MiB parts per object: the ~13 MiB archive needs three segments.
    let options = UploadOptions {
        bucket: bucket.clone(),
        key: "ns/app/b-uid/volumes/big.tar.zst".into(),
        part_size: 5 << 20,
        parts_in_flight: 2,
        segment_parts: 1,
    };
    let src = source.clone();
    let (result, _) = stream_to_s3(&client, &options, move |writer| {
        write_volume_archive(&src, writer, 1, 1)
    })
    .await?;
    ensure!(
        result.segments == 3,
        "expected 3 segments, got {}",
        result.segments
    );
    let mut joined = Vec::new();
    for i in 0..result.segments {
        let key = stateward_agent::upload::segment_key(&options.key, i);
        let object = client.get_object().bucket(&bucket).key(&key).send().await?;
        joined.extend_from_slice(&object.body.collect().await?.into_bytes());
    }
    ensure!(
        hex::encode(Sha256::digest(&joined)) == result.sha256,
        "the concatenated segments are not the stream"
    );
    // By hand: cat the segments in order, then zstd -d | tar x.
    let restored = work.join("restored");
    std::fs::create_dir_all(&restored)?;
    std::fs::write(work.join("joined.tar.zst"), &joined)?;
    let status = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "zstd -d -c '{}' | tar -x -C '{}'",
            work.join("joined.tar.zst").display(),
            restored.display()
        ))
        .status()?;
    ensure!(status.success(), "zstd -d | tar x failed");
    let mut got = BTreeMap::new();
    hash_tree(&restored, Path::new(""), &mut got)?;
    ensure!(got == expected, "restored tree differs");

    // A stream failing after a finished segment leaves nothing: no segment, no upload.
    let failing = UploadOptions {
        key: "ns/app/b-uid/volumes/broken.tar.zst".into(),
        ..options.clone()
    };
    let outcome = stream_to_s3(&client, &failing, |mut writer| {
        let chunk = vec![7u8; 1 << 20];
        for _ in 0..12 {
            writer.write_all(&chunk)?;
        }
        Err::<(stateward_agent::upload::PartWriter, ()), _>(std::io::Error::other("disk gone"))
    })
    .await;
    ensure!(outcome.is_err(), "the failing stream succeeded");
    let listed = client
        .list_objects_v2()
        .bucket(&bucket)
        .prefix("ns/app/b-uid/volumes/broken")
        .send()
        .await?;
    ensure!(
        listed.contents().is_empty(),
        "segments of a failed stream remain"
    );
    let uploads = client
        .list_multipart_uploads()
        .bucket(&bucket)
        .send()
        .await?;
    ensure!(
        uploads.uploads().is_empty(),
        "an upload of a failed stream is still open"
    );
    let _ = std::fs::remove_dir_all(&work);
    Ok(())
}
