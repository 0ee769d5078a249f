//! Volume archives: a directory as a tar stream, compressed with zstd.

use std::io::Write;
use std::path::Path;

/// What an archive run read.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ArchiveStats {
    /// Regular files archived.
    pub files: u64,
    /// Bytes of file content read.
    pub bytes_read: u64,
    /// Unix sockets found and skipped: a socket is a live endpoint of a running process,
    /// not data, and cannot be restored as one (a restored app creates its own).
    pub skipped_sockets: u64,
    /// sha256 of the uncompressed tar stream (hex): what a restore recomputes after
    /// decompressing, so corruption introduced before compression or by a codec bug is
    /// caught too, not only damage to the stored object.
    pub content_sha256: String,
    /// Who owned what was archived (every entry but the root), so a restore can choose
    /// its identity before it stops the app.
    pub ownership: stateward_api::access::Ownership,
}

/// The working directory a restore keeps on the volume (staging, journal). Never backed
/// up: a backup taken right after a crashed restore must not capture its leftovers.
pub const RESTORE_WORKDIR: &str = ".stateward-restore";

/// ext4's `lost+found` at a volume root belongs to the file system (mkfs made it, fsck
/// fills it, root owns it, mode 0700): never app data, so never archived, and a restore
/// keeps the target's own.
pub const LOST_FOUND: &str = "lost+found";

/// A writer that hashes what passes through.
pub struct HashingWriter<W> {
    inner: W,
    hasher: sha2::Sha256,
    bytes: u64,
}

impl<W: Write> HashingWriter<W> {
    pub fn new(inner: W) -> Self {
        Self {
            inner,
            hasher: sha2::Digest::new(),
            bytes: 0,
        }
    }

    /// The inner writer, the hex digest and the byte count.
    pub fn finish(self) -> (W, String, u64) {
        (
            self.inner,
            hex::encode(sha2::Digest::finalize(self.hasher)),
            self.bytes,
        )
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        sha2::Digest::update(&mut self.hasher, &buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Bytes of input per zstd worker job. zstd's default for multi-threaded compression
/// is several window sizes per job and a pool of them per worker, which measured about
/// 70 MiB of resident memory with two workers; 1 MiB jobs keep the agent's memory small
/// and flat at a negligible cost in ratio.
const ZSTD_JOB_SIZE: u32 = 1 << 20;

/// A zstd encoder at `level`; with `threads` > 1 it compresses on that many workers.
pub fn zstd_encoder<W: Write>(
    out: W,
    level: i32,
    threads: u32,
) -> std::io::Result<zstd::stream::write::Encoder<'static, W>> {
    let mut encoder = zstd::stream::write::Encoder::new(out, level)?;
    if threads > 1 {
        encoder.multithread(threads)?;
        encoder.set_parameter(zstd::stream::raw::CParameter::JobSize(ZSTD_JOB_SIZE))?;
    }
    Ok(encoder)
}

/// Writes `dir` as a zstd-compressed tar stream into `out`. Paths in the archive are
/// relative to `dir`; symlinks are stored as links, never followed; ownership and modes
/// are kept so a restore (or `tar x` by hand) gives the same tree.
pub fn write_volume_archive<W: Write>(
    dir: &Path,
    out: W,
    level: i32,
    threads: u32,
) -> std::io::Result<(W, ArchiveStats)> {
    let encoder = zstd_encoder(out, level, threads)?;
    let mut builder = tar::Builder::new(HashingWriter::new(encoder));
    builder.follow_symlinks(false);
    builder.mode(tar::HeaderMode::Complete);
    let mut stats = ArchiveStats::default();
    let root = std::fs::metadata(dir)?;
    stats.ownership.root_user = Some(i64::from(std::os::unix::fs::MetadataExt::uid(&root)));
    stats.ownership.root_group = Some(i64::from(std::os::unix::fs::MetadataExt::gid(&root)));
    let mut seen = std::collections::HashMap::new();
    append_tree(&mut builder, dir, Path::new(""), &mut stats, &mut seen)?;
    let (encoder, content_sha256, _) = builder.into_inner()?.finish();
    stats.content_sha256 = content_sha256;
    let out = encoder.finish()?;
    Ok((out, stats))
}

fn append_tree<W: Write>(
    builder: &mut tar::Builder<W>,
    root: &Path,
    rel: &Path,
    stats: &mut ArchiveStats,
    seen: &mut std::collections::HashMap<(u64, u64), std::path::PathBuf>,
) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    // Errors name the entry (relative to the volume): "permission denied" alone does not
    // say which file of another owner stopped the backup.
    fn at(path: &Path) -> impl Fn(std::io::Error) -> std::io::Error + '_ {
        move |e| {
            let shown = if path.as_os_str().is_empty() {
                Path::new(".")
            } else {
                path
            };
            std::io::Error::new(e.kind(), format!("{}: {e}", shown.display()))
        }
    }
    let mut entries: Vec<_> = std::fs::read_dir(root.join(rel))
        .and_then(|d| d.collect::<Result<Vec<_>, _>>())
        .map_err(at(rel))?;
    // A stable order makes archives of the same tree identical.
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let name = rel.join(entry.file_name());
        if rel.as_os_str().is_empty()
            && (entry.file_name() == RESTORE_WORKDIR || entry.file_name() == LOST_FOUND)
        {
            continue;
        }
        let meta = std::fs::symlink_metadata(entry.path())?;
        let kind = meta.file_type();
        if std::os::unix::fs::FileTypeExt::is_socket(&kind) {
            stats.skipped_sockets += 1;
            continue;
        }
        stats.ownership.observe(
            meta.uid(),
            meta.gid(),
            kind.is_file() && meta.mode() & 0o6000 != 0,
            std::os::unix::fs::FileTypeExt::is_char_device(&kind)
                || std::os::unix::fs::FileTypeExt::is_block_device(&kind),
        );
        if meta.is_dir() {
            builder.append_dir(&name, entry.path())?;
            append_tree(builder, root, &name, stats, seen)?;
        } else if let Some(first) = meta
            .is_file()
            .then(|| seen.get(&(meta.dev(), meta.ino())).cloned())
            .flatten()
        {
            // A second name of a file already stored: a hard-link entry, so a restore
            // gives one inode again (and the data is stored once).
            let mut header = tar::Header::new_gnu();
            header.set_metadata_in_mode(&meta, tar::HeaderMode::Complete);
            header.set_entry_type(tar::EntryType::Link);
            header.set_size(0);
            builder.append_link(&mut header, &name, &first)?;
        } else if meta.is_file() {
            if meta.nlink() > 1 {
                seen.insert((meta.dev(), meta.ino()), name.clone());
            }
            let mut file = std::fs::File::open(entry.path()).map_err(at(&name))?;
            builder.append_file(&name, &mut file)?;
            stats.files += 1;
            stats.bytes_read += meta.len();
        } else {
            // Symlinks, FIFOs, devices: stored as their kind (append_path_with_name keeps
            // the entry type without following links).
            builder.append_path_with_name(entry.path(), &name)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockets_are_skipped_and_counted_not_fatal() -> std::io::Result<()> {
        let src =
            std::env::temp_dir().join(format!("stateward-archive-sock-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&src);
        std::fs::create_dir_all(&src)?;
        std::fs::write(src.join("data"), b"kept")?;
        let _listener = std::os::unix::net::UnixListener::bind(src.join("app.sock"))?;
        let (archive, stats) = write_volume_archive(&src, Vec::new(), 1, 1)?;
        assert_eq!((stats.files, stats.skipped_sockets), (1, 1));
        let plain = zstd::stream::decode_all(&archive[..])?;
        let mut tar = tar::Archive::new(&plain[..]);
        let names: Vec<String> = tar
            .entries()?
            .filter_map(|e| Some(e.ok()?.path().ok()?.to_string_lossy().into_owned()))
            .collect();
        assert_eq!(names, ["data"]);
        std::fs::remove_dir_all(&src)
    }

    #[test]
    fn archives_round_trip_through_zstd_and_tar() -> std::io::Result<()> {
        let dir = std::env::temp_dir().join(format!("stateward-archive-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("sub/deeper"))?;
        std::fs::create_dir_all(dir.join("lost+found"))?;
        std::fs::write(dir.join("a.txt"), b"alpha")?;
        std::fs::write(dir.join("sub/deeper/b.bin"), vec![7u8; 100_000])?;
        std::os::unix::fs::symlink("a.txt", dir.join("link"))?;
        std::fs::write(dir.join("suid"), b"s")?;
        std::fs::set_permissions(
            dir.join("suid"),
            std::os::unix::fs::PermissionsExt::from_mode(0o4755),
        )?;
        let (bytes, stats) = write_volume_archive(&dir, Vec::new(), 3, 2)?;
        // Every entry is this process's own (it made them): one owner, one setuid file.
        let (uid, gid) = (
            nix::unistd::geteuid().as_raw(),
            nix::unistd::getegid().as_raw(),
        );
        let mut ownership = stateward_api::access::Ownership {
            root_user: Some(i64::from(uid)),
            root_group: Some(i64::from(gid)),
            ..Default::default()
        };
        ownership.observe(uid, gid, true, false);
        assert_eq!(
            stats,
            ArchiveStats {
                files: 3,
                bytes_read: 100_006,
                skipped_sockets: 0,
                content_sha256: hex::encode(<sha2::Sha256 as sha2::Digest>::digest(
                    zstd::stream::decode_all(&bytes[..])?
                )),
                ownership,
            }
        );
        let decoded = zstd::stream::decode_all(&bytes[..])?;
        let mut archive = tar::Archive::new(&decoded[..]);
        let mut names = Vec::new();
        for entry in archive.entries()? {
            let entry = entry?;
            names.push((
                entry.path()?.to_string_lossy().into_owned(),
                entry.header().entry_type(),
            ));
        }
        assert!(
            !names.iter().any(|(n, _)| n.starts_with("lost+found")),
            "the file system's lost+found is not archived: {names:?}"
        );
        assert!(
            names.contains(&("a.txt".into(), tar::EntryType::Regular)),
            "{names:?}"
        );
        assert!(
            names.contains(&("link".into(), tar::EntryType::Symlink)),
            "{names:?}"
        );
        assert!(
            names.contains(&("sub/deeper/b.bin".into(), tar::EntryType::Regular)),
            "{names:?}"
        );
        std::fs::remove_dir_all(&dir)
    }
}
