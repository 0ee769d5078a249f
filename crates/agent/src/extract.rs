//! Unpacking a volume archive into a staging directory, refusing anything that would land
//! outside it. Pure file-system code (no S3), unit-tested on real directories.
//!
//! Kept: ownership, modes, mtimes, symlinks, hard links, FIFOs. Ownership is given as
//! recorded or the entry is refused: a non-root agent (the default, running as the data's
//! owner) can give only its own uid and its own groups, and anything else is refused as
//! needing elevated mode ([`ExtractError::NotPermitted`]), never silently re-owned.
//! Refused, with the entry named: absolute paths, `..`, a hard link whose target is not
//! inside the archive, a relative symlink that climbs above the volume root, any entry
//! below a symlink (a crafted archive's classic `link -> /etc` then `link/passwd`), any
//! entry whose own name already exists as a symlink (`d -> /etc` then a directory `d/`,
//! whose mode and mtime would otherwise land on `/etc`), device nodes and setuid/setgid
//! files unless the restore runs elevated, and entry types Stateward never writes.
//! Directory metadata is applied through a descriptor opened without following links.
//! Absolute symlink targets are restored as links and never followed: the app resolves
//! them in its own container, as it did when the backup was taken.

use std::io::Read;
use std::path::{Component, Path, PathBuf};

/// What an extraction wrote.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ExtractStats {
    /// Regular files written (hard links not counted, as in the backup).
    pub files: u64,
    /// Bytes of regular-file content written.
    pub bytes: u64,
    /// Entries of any kind.
    pub entries: u64,
}

/// Why an archive was refused or could not be written.
#[derive(Debug, thiserror::Error)]
pub enum ExtractError {
    #[error("the archive entry {path:?} is unsafe: {why}")]
    Unsafe { path: String, why: &'static str },
    #[error(
        "writing {path} as recorded (owner, group or mode) is not permitted to this restore, which runs as the data's owner without elevated mode: the backup holds data of another owner; set spec.dataAccess.elevated: true on the app to restore it as root ({source})"
    )]
    NotPermitted {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("reading the archive: {0}")]
    Read(#[source] std::io::Error),
    #[error("writing {path}: {source}")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

impl ExtractError {
    /// Whether retrying the same archive can never help (a crafted or broken archive).
    pub fn is_permanent(&self) -> bool {
        matches!(self, Self::Unsafe { .. } | Self::NotPermitted { .. })
    }

    /// A write error, or [`Self::NotPermitted`] when the kernel said no (EPERM, EACCES):
    /// an identity question no retry answers.
    fn write(path: &Path, source: std::io::Error) -> Self {
        let path = path.to_string_lossy().into_owned();
        if source.kind() == std::io::ErrorKind::PermissionDenied {
            Self::NotPermitted { path, source }
        } else {
            Self::Write { path, source }
        }
    }
}

/// What an extraction may write beyond plain files of the agent's own identity.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Elevation {
    /// Setuid/setgid files and device nodes are written too (the elevated mode: the agent
    /// runs as root with CHOWN, FOWNER, DAC_OVERRIDE and, for devices, MKNOD).
    pub special_files: bool,
}

fn unsafe_entry(path: &Path, why: &'static str) -> ExtractError {
    ExtractError::Unsafe {
        path: path.to_string_lossy().into_owned(),
        why,
    }
}

/// A path inside the archive, made relative and checked: `./a/b` → `a/b`; absolute or
/// `..` → refused. `None` for the archive root itself.
pub fn inside(path: &Path) -> Result<Option<PathBuf>, ExtractError> {
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::Normal(part) => out.push(part),
            Component::CurDir => {}
            Component::ParentDir => return Err(unsafe_entry(path, "it contains `..`")),
            Component::RootDir | Component::Prefix(_) => {
                return Err(unsafe_entry(path, "it is an absolute path"));
            }
        }
    }
    Ok((!out.as_os_str().is_empty()).then_some(out))
}

/// Whether a relative symlink target, resolved from the link's directory, stays inside
/// the root (lexically: the agent never follows links).
fn symlink_stays_inside(link: &Path, target: &Path) -> bool {
    if target.is_absolute() {
        return true; // resolved by the app in its container, never followed here
    }
    let mut depth = link.components().count() as i64 - 1;
    for component in target.components() {
        match component {
            Component::ParentDir => depth -= 1,
            Component::Normal(_) => depth += 1,
            _ => {}
        }
        if depth < 0 {
            return false;
        }
    }
    true
}

/// Refuses to write below a symlink: every existing ancestor of `rel` inside `root` must
/// be a real directory.
fn check_no_symlink_parent(root: &Path, rel: &Path) -> Result<(), ExtractError> {
    let mut at = root.to_path_buf();
    if let Some(parent) = rel.parent() {
        for part in parent.components() {
            at.push(part);
            match std::fs::symlink_metadata(&at) {
                Ok(meta) if meta.file_type().is_symlink() => {
                    return Err(unsafe_entry(rel, "it lies below a symlink"));
                }
                Ok(meta) if !meta.is_dir() => {
                    return Err(unsafe_entry(rel, "its parent is not a directory"));
                }
                Ok(_) => {}
                Err(_) => return Ok(()), // created fresh by the unpack
            }
        }
    }
    Ok(())
}

/// Refuses an entry before anything is written for it: its own name must not exist as a
/// symlink (or at all, but for a directory listed again), its type must be one Stateward
/// restores, and it must carry no setuid/setgid bit.
fn check_entry(
    dest: &Path,
    rel: &Path,
    kind: tar::EntryType,
    mode: u32,
    elevation: Elevation,
) -> Result<(), ExtractError> {
    // Staged at the top level it would collide with the swap's own working directory
    // and leave a journal that can never finish; a backup never holds it.
    if rel.components().next() == Some(Component::Normal(crate::archive::RESTORE_WORKDIR.as_ref()))
    {
        return Err(unsafe_entry(
            rel,
            "it names the restore's working directory",
        ));
    }
    match std::fs::symlink_metadata(dest.join(rel)) {
        Ok(meta) if meta.file_type().is_symlink() => {
            return Err(unsafe_entry(rel, "its name already exists as a symlink"));
        }
        Ok(meta) if meta.is_dir() && kind == tar::EntryType::Directory => {}
        Ok(_) => return Err(unsafe_entry(rel, "it appears twice in the archive")),
        Err(_) => {}
    }
    match kind {
        tar::EntryType::Char | tar::EntryType::Block if !elevation.special_files => {
            return Err(unsafe_entry(
                rel,
                "device nodes are restored only in elevated mode (spec.dataAccess.elevated)",
            ));
        }
        tar::EntryType::Char | tar::EntryType::Block => {}
        tar::EntryType::Directory
        | tar::EntryType::Regular
        | tar::EntryType::Continuous
        | tar::EntryType::GNUSparse
        | tar::EntryType::Link
        | tar::EntryType::Symlink
        | tar::EntryType::Fifo => {}
        _ => {
            return Err(unsafe_entry(
                rel,
                "an entry type Stateward does not restore",
            ));
        }
    }
    // A directory's setgid bit is ordinary (kubelet sets it for fsGroup volumes); on a
    // file it is a privilege the restore would hand out.
    let is_dir_or_link = matches!(kind, tar::EntryType::Directory | tar::EntryType::Symlink);
    if mode & 0o6000 != 0 && !is_dir_or_link && !elevation.special_files {
        return Err(unsafe_entry(
            rel,
            "setuid/setgid files are restored only in elevated mode (spec.dataAccess.elevated)",
        ));
    }
    Ok(())
}

/// Opens a directory for its metadata without following a symlink at its name.
fn open_dir_nofollow(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_DIRECTORY)
        .open(path)
}

/// Directory metadata applied after all entries are in (a read-only directory would
/// refuse its own children; writing children changes the directory's mtime).
struct DeferredDir {
    path: PathBuf,
    mode: u32,
    mtime: u64,
    owner: (u32, u32),
}

/// Unpacks the tar stream `reader` into `dest` (which must exist and be empty), checking
/// every entry first, and gives every entry its recorded owner and group. Reads the
/// stream to its end, so a hash around `reader` covers it all.
pub fn extract_tree<R: Read>(
    reader: R,
    dest: &Path,
    elevation: Elevation,
) -> Result<(ExtractStats, R), ExtractError> {
    let mut archive = tar::Archive::new(reader);
    archive.set_preserve_permissions(true);
    archive.set_preserve_mtime(true);
    archive.set_preserve_ownerships(true);
    archive.set_overwrite(false);
    let mut stats = ExtractStats::default();
    let mut dirs: Vec<DeferredDir> = Vec::new();
    for entry in archive.entries().map_err(ExtractError::Read)? {
        let mut entry = entry.map_err(ExtractError::Read)?;
        let raw = entry.path().map_err(ExtractError::Read)?.into_owned();
        let Some(rel) = inside(&raw)? else {
            continue; // the root itself: the volume root keeps its own metadata
        };
        check_no_symlink_parent(dest, &rel)?;
        let kind = entry.header().entry_type();
        // Every entry is given its recorded owner: a header without one is malformed.
        if entry.header().uid().is_err() || entry.header().gid().is_err() {
            return Err(unsafe_entry(&rel, "its owner or group is not a number"));
        }
        check_entry(
            dest,
            &rel,
            kind,
            entry.header().mode().map_err(ExtractError::Read)?,
            elevation,
        )?;
        let target = dest.join(&rel);
        let write_err = |source| ExtractError::write(&rel, source);
        stats.entries += 1;
        match kind {
            tar::EntryType::Directory => {
                std::fs::create_dir_all(&target).map_err(write_err)?;
                let header = entry.header();
                dirs.push(DeferredDir {
                    path: target,
                    mode: header.mode().map_err(ExtractError::Read)?,
                    mtime: header.mtime().map_err(ExtractError::Read)?,
                    owner: (
                        header.uid().map_err(ExtractError::Read)? as u32,
                        header.gid().map_err(ExtractError::Read)? as u32,
                    ),
                });
            }
            tar::EntryType::Link => {
                let link = entry
                    .link_name()
                    .map_err(ExtractError::Read)?
                    .ok_or_else(|| unsafe_entry(&rel, "a hard link without a target"))?
                    .into_owned();
                let Some(link_rel) = inside(&link)? else {
                    return Err(unsafe_entry(&rel, "a hard link to the root"));
                };
                check_no_symlink_parent(dest, &link_rel)?;
                let source = dest.join(&link_rel);
                match std::fs::symlink_metadata(&source) {
                    Ok(meta) if meta.is_file() => {}
                    _ => {
                        return Err(unsafe_entry(
                            &rel,
                            "a hard link to a file not earlier in the archive",
                        ));
                    }
                }
                if let Some(parent) = target.parent() {
                    std::fs::create_dir_all(parent).map_err(write_err)?;
                }
                std::fs::hard_link(&source, &target).map_err(write_err)?;
            }
            tar::EntryType::Symlink => {
                let link = entry
                    .link_name()
                    .map_err(ExtractError::Read)?
                    .ok_or_else(|| unsafe_entry(&rel, "a symlink without a target"))?
                    .into_owned();
                if !symlink_stays_inside(&rel, &link) {
                    return Err(unsafe_entry(&rel, "a symlink pointing above the volume"));
                }
                entry.unpack(&target).map_err(write_err)?;
            }
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
                if let Some(parent) = target.parent() {
                    std::fs::create_dir_all(parent).map_err(write_err)?;
                }
                stats.files += 1;
                stats.bytes += entry.header().size().unwrap_or(0);
                entry.unpack(&target).map_err(write_err)?;
            }
            tar::EntryType::Fifo | tar::EntryType::Char | tar::EntryType::Block => {
                // The tar reader skips FIFOs and devices: made here, metadata set without
                // following. Devices only reach here in elevated mode (check_entry).
                if let Some(parent) = target.parent() {
                    std::fs::create_dir_all(parent).map_err(write_err)?;
                }
                let header = entry.header();
                let mode = header.mode().map_err(ExtractError::Read)? & 0o7777;
                let perm = nix::sys::stat::Mode::from_bits_truncate(mode & 0o1777);
                let made = match kind {
                    tar::EntryType::Fifo => nix::unistd::mkfifo(&target, perm),
                    _ => {
                        let device = nix::sys::stat::makedev(
                            u64::from(header.device_major().ok().flatten().unwrap_or(0)),
                            u64::from(header.device_minor().ok().flatten().unwrap_or(0)),
                        );
                        let node = if kind == tar::EntryType::Char {
                            nix::sys::stat::SFlag::S_IFCHR
                        } else {
                            nix::sys::stat::SFlag::S_IFBLK
                        };
                        nix::sys::stat::mknod(&target, node, perm, device)
                    }
                };
                made.map_err(|e| write_err(e.into()))?;
                let uid = header.uid().map_err(ExtractError::Read)? as u32;
                let gid = header.gid().map_err(ExtractError::Read)? as u32;
                std::os::unix::fs::lchown(&target, Some(uid), Some(gid)).map_err(write_err)?;
                // mknod applies the umask: the recorded mode, set through the path (a node
                // just created here, never a link).
                std::fs::set_permissions(
                    &target,
                    std::os::unix::fs::PermissionsExt::from_mode(mode),
                )
                .map_err(write_err)?;
                let mtime = filetime::FileTime::from_unix_time(
                    header.mtime().map_err(ExtractError::Read)? as i64,
                    0,
                );
                filetime::set_symlink_file_times(&target, mtime, mtime).map_err(write_err)?;
            }
            // Refused by check_entry; PAX and GNU long-name headers are consumed by the
            // tar reader itself.
            _ => {}
        }
    }
    // Innermost first, so a parent's mtime is set after its children's.
    dirs.sort_by_key(|d| std::cmp::Reverse(d.path.components().count()));
    for dir in dirs {
        let write_err = |source| ExtractError::write(&dir.path, source);
        // Still a real directory inside staging, and touched only through a descriptor
        // opened with O_NOFOLLOW: never a link's target.
        let rel = dir.path.strip_prefix(dest).unwrap_or(&dir.path);
        check_no_symlink_parent(dest, rel)?;
        let handle = open_dir_nofollow(&dir.path).map_err(write_err)?;
        let (uid, gid) = dir.owner;
        std::os::unix::fs::fchown(&handle, Some(uid), Some(gid)).map_err(write_err)?;
        handle
            .set_permissions(std::os::unix::fs::PermissionsExt::from_mode(
                dir.mode & 0o7777,
            ))
            .map_err(write_err)?;
        let mtime = std::time::UNIX_EPOCH + std::time::Duration::from_secs(dir.mtime);
        handle
            .set_times(
                std::fs::FileTimes::new()
                    .set_modified(mtime)
                    .set_accessed(mtime),
            )
            .map_err(write_err)?;
    }
    let mut reader = archive.into_inner();
    // The end-of-archive blocks and any padding, so the content hash covers everything.
    std::io::copy(&mut reader, &mut std::io::sink()).map_err(ExtractError::Read)?;
    Ok((stats, reader))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::MetadataExt;

    fn scratch(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("stateward-extract-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).ok();
        dir
    }

    fn raw_tar(entries: &[(&str, tar::EntryType, &[u8], Option<&str>)]) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        for (path, kind, data, link) in entries {
            let mut header = tar::Header::new_gnu();
            header.set_entry_type(*kind);
            header.set_size(data.len() as u64);
            header.set_mode(0o644);
            header.set_uid(0);
            header.set_gid(0);
            // set_path refuses `..`; write the name bytes directly, as an attacker would.
            let name = &mut header.as_old_mut().name;
            name[..path.len()].copy_from_slice(path.as_bytes());
            if let Some(link) = link {
                let field = &mut header.as_old_mut().linkname;
                field[..link.len()].copy_from_slice(link.as_bytes());
            }
            header.set_cksum();
            builder.append(&header, *data).ok();
        }
        builder.into_inner().unwrap_or_default()
    }

    #[test]
    fn a_tree_round_trips_with_modes_mtimes_symlinks_and_hard_links() {
        let src = scratch("src");
        std::fs::create_dir_all(src.join("d/e")).ok();
        std::fs::write(src.join("d/e/f.txt"), b"content").ok();
        std::fs::hard_link(src.join("d/e/f.txt"), src.join("d/hard")).ok();
        std::os::unix::fs::symlink("e/f.txt", src.join("d/soft")).ok();
        std::os::unix::fs::symlink("/etc/hostname", src.join("abs")).ok();
        std::fs::set_permissions(
            src.join("d/e/f.txt"),
            std::os::unix::fs::PermissionsExt::from_mode(0o640),
        )
        .ok();
        std::fs::set_permissions(
            src.join("d/e"),
            std::os::unix::fs::PermissionsExt::from_mode(0o555),
        )
        .ok();
        filetime::set_file_mtime(
            src.join("d/e/f.txt"),
            filetime::FileTime::from_unix_time(1_600_000_000, 0),
        )
        .ok();
        let (archive, _) = crate::write_volume_archive(&src, Vec::new(), 1, 1).unwrap_or_default();
        let plain = zstd::stream::decode_all(&archive[..]).unwrap_or_default();
        let dest = scratch("dest");
        let (stats, _) = extract_tree(&plain[..], &dest, Elevation::default())
            .map_err(|e| e.to_string())
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(stats.files, 1, "the hard link is a link, not a second file");
        assert_eq!(
            std::fs::read(dest.join("d/hard")).ok(),
            Some(b"content".to_vec())
        );
        let f = std::fs::metadata(dest.join("d/e/f.txt")).unwrap_or_else(|e| panic!("{e}"));
        let h = std::fs::metadata(dest.join("d/hard")).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(f.ino(), h.ino(), "hard link kept");
        assert_eq!(f.mode() & 0o7777, 0o640);
        assert_eq!(f.mtime(), 1_600_000_000);
        assert_eq!(
            std::fs::metadata(dest.join("d/e"))
                .map(|m| m.mode() & 0o7777)
                .ok(),
            Some(0o555)
        );
        assert_eq!(
            std::fs::read_link(dest.join("d/soft")).ok(),
            Some(PathBuf::from("e/f.txt"))
        );
        assert_eq!(
            std::fs::read_link(dest.join("abs")).ok(),
            Some(PathBuf::from("/etc/hostname"))
        );
        for dir in [&src, &dest] {
            std::fs::set_permissions(
                dir.join("d/e"),
                std::os::unix::fs::PermissionsExt::from_mode(0o755),
            )
            .ok();
            std::fs::remove_dir_all(dir).ok();
        }
    }

    #[test]
    fn crafted_archives_are_refused_and_nothing_lands_outside() {
        let outside = scratch("outside");
        let cases: Vec<(&str, Vec<u8>)> = vec![
            (
                "dotdot",
                raw_tar(&[("../escaped", tar::EntryType::Regular, b"x", None)]),
            ),
            (
                "absolute",
                raw_tar(&[("/tmp/escaped", tar::EntryType::Regular, b"x", None)]),
            ),
            (
                "through a symlink",
                raw_tar(&[
                    (
                        "link",
                        tar::EntryType::Symlink,
                        b"",
                        Some(outside.to_str().unwrap_or("/tmp")),
                    ),
                    ("link/escaped", tar::EntryType::Regular, b"x", None),
                ]),
            ),
            (
                "climbing symlink",
                raw_tar(&[("a/up", tar::EntryType::Symlink, b"", Some("../../etc"))]),
            ),
            (
                "hard link out",
                raw_tar(&[("h", tar::EntryType::Link, b"", Some("../../etc/passwd"))]),
            ),
        ];
        for (name, archive) in cases {
            let dest = scratch("crafted");
            let outcome = extract_tree(&archive[..], &dest, Elevation::default());
            match outcome {
                Err(e) => assert!(e.is_permanent(), "{name}: {e}"),
                Ok(_) => panic!("{name}: accepted"),
            }
            assert!(!outside.join("escaped").exists(), "{name}: wrote outside");
            assert!(
                !dest
                    .parent()
                    .map(|p| p.join("escaped").exists())
                    .unwrap_or(false),
                "{name}"
            );
            std::fs::remove_dir_all(&dest).ok();
        }
        std::fs::remove_dir_all(&outside).ok();
    }

    /// One crafted tar entry: name bytes, type, content, link name, mode.
    type Crafted<'a> = (&'a [u8], tar::EntryType, &'a [u8], Option<&'a [u8]>, u32);

    fn crafted_tar(entries: &[Crafted<'_>]) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        for (path, kind, data, link, mode) in entries {
            let mut header = tar::Header::new_gnu();
            header.set_entry_type(*kind);
            header.set_size(data.len() as u64);
            header.set_mode(*mode);
            header.set_mtime(1_500_000_000);
            header.set_uid(0);
            header.set_gid(0);
            let name = &mut header.as_old_mut().name;
            name[..path.len()].copy_from_slice(path);
            if let Some(link) = link {
                let field = &mut header.as_old_mut().linkname;
                field[..link.len()].copy_from_slice(link);
            }
            header.set_cksum();
            builder.append(&header, *data).ok();
        }
        builder.into_inner().unwrap_or_default()
    }

    /// Every entry below `root`: path bytes, kind, mode, owner, mtime, content or target.
    fn snapshot(root: &Path) -> Vec<String> {
        fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
            let mut entries: Vec<_> = std::fs::read_dir(dir)
                .into_iter()
                .flatten()
                .flatten()
                .collect();
            entries.sort_by_key(|e| e.file_name());
            for entry in entries {
                let path = entry.path();
                let Ok(meta) = std::fs::symlink_metadata(&path) else {
                    continue;
                };
                let what = if meta.file_type().is_symlink() {
                    format!("L {:?}", std::fs::read_link(&path).ok())
                } else if meta.is_file() {
                    format!("F {:?}", std::fs::read(&path).ok())
                } else {
                    "D".to_string()
                };
                out.push(format!(
                    "{:?} {:o} {}:{} {} {what}",
                    path.strip_prefix(root).unwrap_or(&path),
                    meta.mode(),
                    meta.uid(),
                    meta.gid(),
                    meta.mtime()
                ));
                if meta.is_dir() {
                    walk(root, &path, out);
                }
            }
        }
        let mut out = Vec::new();
        walk(root, root, &mut out);
        out
    }

    /// A volume with live data (the canary) and an empty staging directory inside it.
    fn volume_with_canary(name: &str) -> (PathBuf, PathBuf, PathBuf) {
        let volume = scratch(name);
        let canary = volume.join("live");
        std::fs::create_dir_all(canary.join("dir")).ok();
        std::fs::write(canary.join("file"), b"live data").ok();
        std::os::unix::fs::symlink("file", canary.join("link")).ok();
        filetime::set_file_mtime(
            canary.join("dir"),
            filetime::FileTime::from_unix_time(1_000_000_000, 0),
        )
        .ok();
        let staging = volume.join(".stateward-restore/staging");
        std::fs::create_dir_all(&staging).ok();
        (volume, canary, staging)
    }

    #[test]
    fn a_corpus_of_crafted_archives_is_refused_or_restored_faithfully_and_live_data_never_changes()
    {
        use tar::EntryType::*;
        let (volume, canary, staging) = volume_with_canary("corpus");
        let live_dir = canary.join("dir");
        let live_file = canary.join("file");
        let live_dir = live_dir.as_os_str().as_encoded_bytes();
        let live_file = live_file.as_os_str().as_encoded_bytes();
        // (case, entries, Err(the refusal's words) or Ok(a check on the staged tree))
        type Check = fn(&Path) -> bool;
        let cases: Vec<(&str, Vec<Crafted<'_>>, Result<Check, &str>)> = vec![
            (
                "a directory entry named as an earlier symlink to live data",
                vec![
                    (b"d", Symlink, b"", Some(live_dir), 0o777),
                    (b"d", Directory, b"", None, 0o777),
                ],
                Err("already exists as a symlink"),
            ),
            (
                "a file entry named as an earlier symlink to a live file",
                vec![
                    (b"f", Symlink, b"", Some(live_file), 0o777),
                    (b"f", Regular, b"evil", None, 0o644),
                ],
                Err("already exists as a symlink"),
            ),
            (
                "a setuid file",
                vec![(b"suid", Regular, b"x", None, 0o4755)],
                Err("setuid"),
            ),
            (
                "a setgid file",
                vec![(b"sgid", Regular, b"x", None, 0o2755)],
                Err("setuid/setgid"),
            ),
            (
                "a character device",
                vec![(b"null", Char, b"", None, 0o666)],
                Err("device nodes"),
            ),
            (
                "a block device",
                vec![(b"sda", Block, b"", None, 0o660)],
                Err("device nodes"),
            ),
            (
                "a hard link out",
                vec![(b"h", Link, b"", Some(b"../live/file"), 0o644)],
                Err(".."),
            ),
            (
                "a hard link to a missing entry",
                vec![(b"h", Link, b"", Some(b"nope"), 0o644)],
                Err("not earlier"),
            ),
            (
                "dotdot",
                vec![(b"../live/file", Regular, b"evil", None, 0o644)],
                Err(".."),
            ),
            (
                "absolute",
                vec![(b"/tmp/evil", Regular, b"evil", None, 0o644)],
                Err("absolute"),
            ),
            (
                "below a symlink",
                vec![
                    (b"l", Symlink, b"", Some(live_dir), 0o777),
                    (b"l/evil", Regular, b"x", None, 0o644),
                ],
                Err("below a symlink"),
            ),
            (
                "a symlink climbing out",
                vec![(b"up", Symlink, b"", Some(b"../live"), 0o777)],
                Err("above the volume"),
            ),
            (
                "an entry listed twice",
                vec![
                    (b"f", Regular, b"a", None, 0o644),
                    (b"f", Regular, b"b", None, 0o644),
                ],
                Err("twice"),
            ),
            (
                "the restore's working directory",
                vec![(
                    b".stateward-restore/journal.json",
                    Regular,
                    b"{}",
                    None,
                    0o644,
                )],
                Err("working directory"),
            ),
            (
                "a FIFO",
                vec![(b"pipe", Fifo, b"", None, 0o600)],
                Ok(|s| {
                    std::fs::symlink_metadata(s.join("pipe")).is_ok_and(|m| {
                        std::os::unix::fs::FileTypeExt::is_fifo(&m.file_type())
                            && m.mode() & 0o7777 == 0o600
                            && m.mtime() == 1_500_000_000
                    })
                }),
            ),
            (
                "a non-UTF-8 name",
                vec![(b"caf\xe9", Regular, b"bytes", None, 0o644)],
                Ok(|s| {
                    std::fs::read(s.join(std::ffi::OsStr::from_bytes(b"caf\xe9"))).ok()
                        == Some(b"bytes".to_vec())
                }),
            ),
            (
                "a setgid directory (fsGroup volumes have them)",
                vec![(b"shared", Directory, b"", None, 0o2775)],
                Ok(|s| {
                    std::fs::metadata(s.join("shared")).is_ok_and(|m| m.mode() & 0o7777 == 0o2775)
                }),
            ),
        ];
        let before = snapshot(&canary);
        for (case, entries, expected) in cases {
            std::fs::remove_dir_all(&staging).ok();
            std::fs::create_dir_all(&staging).ok();
            let archive = crafted_tar(&entries);
            let outcome =
                extract_tree(&archive[..], &staging, Elevation::default()).map(|(stats, _)| stats);
            match (outcome, expected) {
                (Err(e), Err(words)) => {
                    assert!(e.is_permanent(), "{case}: {e}");
                    assert!(e.to_string().contains(words), "{case}: {e}");
                }
                (Ok(_), Ok(check)) => assert!(check(&staging), "{case}: not restored faithfully"),
                (outcome, expected) => panic!(
                    "{case}: {outcome:?} but expected {:?}",
                    expected.map(|_| "restored")
                ),
            }
            assert_eq!(snapshot(&canary), before, "{case}: live data changed");
            let outside: Vec<String> = std::fs::read_dir(&volume)
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            let mut outside = outside;
            outside.sort();
            assert_eq!(
                outside,
                [".stateward-restore", "live"],
                "{case}: nothing new beside staging"
            );
        }
        std::fs::remove_dir_all(&volume).ok();
    }

    #[test]
    fn elevated_mode_restores_setuid_files_and_device_nodes_as_recorded() {
        use tar::EntryType::*;
        let dest = scratch("elevated");
        let entries: Vec<Crafted<'_>> = vec![
            (b"suid", Regular, b"x", None, 0o4755),
            (b"null", Char, b"", None, 0o666),
        ];
        let archive = crafted_tar(&entries);
        let plain = extract_tree(&archive[..], &dest, Elevation::default());
        assert!(
            plain.as_ref().is_err_and(
                |e| e.is_permanent() && e.to_string().contains("spec.dataAccess.elevated")
            ),
            "without elevation: {:?}",
            plain.map(|(s, _)| s)
        );
        std::fs::remove_dir_all(&dest).ok();
        std::fs::create_dir_all(&dest).ok();
        let elevated = Elevation {
            special_files: true,
        };
        match extract_tree(&archive[..], &dest, elevated) {
            Ok((stats, _)) => assert_eq!(stats.entries, 2),
            Err(e) => panic!("elevated: {e}"),
        }
        let suid = std::fs::metadata(dest.join("suid"))
            .map(|m| m.mode() & 0o7777)
            .ok();
        assert_eq!(suid, Some(0o4755), "the setuid bit survives the chown");
        let null = std::fs::symlink_metadata(dest.join("null")).ok();
        assert!(
            null.is_some_and(
                |m| std::os::unix::fs::FileTypeExt::is_char_device(&m.file_type())
                    && m.mode() & 0o7777 == 0o666
            ),
            "a character device with its mode"
        );
        std::fs::remove_dir_all(&dest).ok();
    }

    #[test]
    fn symlink_containment_is_lexical() {
        assert!(symlink_stays_inside(Path::new("a/b"), Path::new("../c")));
        assert!(!symlink_stays_inside(
            Path::new("a/b"),
            Path::new("../../c")
        ));
        assert!(symlink_stays_inside(Path::new("a"), Path::new("/abs")));
        assert!(!symlink_stays_inside(
            Path::new("a"),
            Path::new("x/../../..")
        ));
    }
}
