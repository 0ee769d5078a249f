//! The staged swap: restored data is unpacked into `<volume>/.stateward-restore/staging`,
//! verified, and only then swapped in, one rename per top-level entry, under a journal on
//! the volume. A crash at any point leaves either the old data (no journal: the staging
//! directory is thrown away on the next attempt) or a journal, which the next attempt
//! rolls forward before doing anything else. The volume root itself cannot be renamed
//! (it is a mount point), and `lost+found` belongs to the file system: both stay.
//!
//! Roll-forward is idempotent: an old entry is moved aside only if it is still at the
//! root and not yet aside; a staged entry is moved in only if it is still staged. So the
//! same journal can be replayed after a crash at any rename.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use crate::archive::RESTORE_WORKDIR;

const JOURNAL: &str = "journal.json";
const STAGED: &str = "staged.json";

/// The marker of a verified staging directory.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
struct Staged {
    restore: String,
    result: serde_json::Value,
}
const STAGING: &str = "staging";
const OLD: &str = "old";
use crate::archive::LOST_FOUND;

/// What the journal says: written (and fsynced) after the staged data verified, before
/// the first rename.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Journal {
    pub version: u32,
    /// The restore (its uid) whose verified data is being swapped in.
    pub restore: String,
    /// Top-level names of the old data, moved to `old/`.
    pub old: Vec<Name>,
    /// Top-level names of the new data, moved from `staging/`.
    pub new: Vec<Name>,
    /// The verified result, reported again when a retry finishes this swap.
    pub result: serde_json::Value,
}

/// The restore working directory of a volume.
pub struct Workdir {
    root: PathBuf,
}

fn io(context: &str, path: &Path, e: std::io::Error) -> std::io::Error {
    std::io::Error::new(e.kind(), format!("{context} {}: {e}", path.display()))
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(|e| io("syncing", dir, e))
}

fn exists(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok()
}

/// A top-level name, kept as the file system's bytes (a lossy conversion would skip a
/// non-UTF-8 name in the swap and then delete it with the workdir). In the journal a UTF-8
/// name is a JSON string, as journals always had it; any other is `{"bytes": [...]}`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Name(pub std::ffi::OsString);

#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum NameRepr {
    Text(String),
    Bytes { bytes: Vec<u8> },
}

impl Serialize for Name {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self.0.to_str() {
            Some(text) => NameRepr::Text(text.to_string()),
            None => NameRepr::Bytes {
                bytes: self.0.as_encoded_bytes().to_vec(),
            },
        }
        .serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for Name {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use std::os::unix::ffi::OsStringExt;
        Ok(Self(match NameRepr::deserialize(deserializer)? {
            NameRepr::Text(text) => text.into(),
            NameRepr::Bytes { bytes } => std::ffi::OsString::from_vec(bytes),
        }))
    }
}

impl AsRef<Path> for Name {
    fn as_ref(&self) -> &Path {
        Path::new(&self.0)
    }
}

impl Name {
    /// One plain path component: the journal lies on a volume the app can write, so a
    /// name like `../../etc` must never reach a rename.
    fn is_plain(&self) -> bool {
        let bytes = self.0.as_encoded_bytes();
        !bytes.is_empty()
            && bytes.len() <= 255
            && bytes != b"."
            && bytes != b".."
            && !bytes.iter().any(|b| *b == b'/' || *b == 0)
    }

    fn is(&self, other: &str) -> bool {
        self.0 == std::ffi::OsStr::new(other)
    }
}

/// The largest journal read back (a million top-level names is far below it).
const MAX_JOURNAL_BYTES: u64 = 64 << 20;

/// The largest staging marker read back (it holds one restore result).
const MAX_STAGED_BYTES: u64 = 1 << 20;

/// Reads a marker the agent wrote on the volume, which the app may have replaced since:
/// never through a symlink, never more than `limit` bytes held. `None` when absent.
fn read_marker(path: &Path, limit: u64) -> std::io::Result<Option<Vec<u8>>> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let file = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK)
        .open(path)
    {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io("reading", path, e)),
    };
    // A FIFO or device planted under the marker's name would block or never end.
    if !file
        .metadata()
        .map_err(|e| io("reading", path, e))?
        .is_file()
    {
        return Err(std::io::Error::other(format!(
            "{} is not a regular file",
            path.display()
        )));
    }
    let mut bytes = Vec::new();
    file.take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| io("reading", path, e))?;
    if bytes.len() as u64 > limit {
        return Err(std::io::Error::other(format!(
            "{} is larger than {limit} bytes",
            path.display()
        )));
    }
    Ok(Some(bytes))
}

/// Writes and fsyncs a marker as a new file: whatever the app left under that name (a
/// symlink to a file outside the volume, say) is unlinked first, never written through.
fn write_marker(path: &Path, body: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => remove_tree(path)?,
        Ok(_) => std::fs::remove_file(path).map_err(|e| io("removing", path, e))?,
        Err(_) => {}
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| io("writing", path, e))?;
    file.write_all(body)
        .and_then(|()| file.sync_all())
        .map_err(|e| io("writing", path, e))
}

/// Whether `path` is a real directory: `Ok(false)` when absent, an error when something
/// else (a symlink the app planted, a file) stands under the name.
fn real_dir(path: &Path) -> std::io::Result<bool> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => Ok(true),
        Ok(_) => Err(std::io::Error::other(format!(
            "{} is not a directory (a symlink or file left on the volume is never followed)",
            path.display()
        ))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(io("reading", path, e)),
    }
}

fn names(dir: &Path) -> std::io::Result<Vec<Name>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| io("listing", dir, e))? {
        out.push(Name(entry?.file_name()));
    }
    out.sort();
    Ok(out)
}

/// Reads and checks the journal: bounded, every name one plain component.
fn read_journal(path: &Path) -> std::io::Result<Option<Journal>> {
    let invalid = |why: String| {
        std::io::Error::other(format!(
            "the restore journal {} is invalid: {why}",
            path.display()
        ))
    };
    let Some(bytes) = read_marker(path, MAX_JOURNAL_BYTES).map_err(|e| invalid(e.to_string()))?
    else {
        return Ok(None);
    };
    let journal: Journal = serde_json::from_slice(&bytes).map_err(|e| invalid(e.to_string()))?;
    // The agent's own names never appear in a journal it wrote: moving the workdir into
    // itself, or lost+found out of the file system, is a crafted journal's doing.
    if let Some(bad) = journal
        .old
        .iter()
        .chain(&journal.new)
        .find(|n| !n.is_plain() || n.is(RESTORE_WORKDIR) || n.is(LOST_FOUND))
    {
        return Err(invalid(format!(
            "it names {:?}, which is not a top-level name",
            bad.0
        )));
    }
    Ok(Some(journal))
}

/// Removes a tree even when it holds read-only directories (restored modes).
fn remove_tree(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    match std::fs::symlink_metadata(path) {
        Err(_) => return Ok(()),
        // A symlink (or file) where a directory was: the name goes, its target stays.
        Ok(meta) if !meta.is_dir() => {
            return std::fs::remove_file(path).map_err(|e| io("removing", path, e));
        }
        Ok(_) => {}
    }
    if std::fs::remove_dir_all(path).is_ok() {
        return Ok(());
    }
    // Make every directory writable, then try again.
    fn open_up(dir: &Path) {
        let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
        if let Ok(entries) = std::fs::read_dir(dir) {
            for entry in entries.flatten() {
                if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                    open_up(&entry.path());
                }
            }
        }
    }
    open_up(path);
    std::fs::remove_dir_all(path).map_err(|e| io("removing", path, e))
}

impl Workdir {
    pub fn new(volume: &Path) -> Self {
        Self {
            root: volume.to_path_buf(),
        }
    }

    fn dir(&self) -> PathBuf {
        self.root.join(RESTORE_WORKDIR)
    }

    /// Where the new data is unpacked.
    pub fn staging(&self) -> PathBuf {
        self.dir().join(STAGING)
    }

    fn journal_path(&self) -> PathBuf {
        self.dir().join(JOURNAL)
    }

    /// Finishes what an earlier attempt left: rolls a journaled swap forward (returning
    /// its journal), or throws away unverified staging and a finished swap's leftovers.
    pub fn recover(&self) -> std::io::Result<Option<Journal>> {
        if real_dir(&self.dir()).is_err() {
            // The agent only ever makes a real directory here: anything else is the app's,
            // and a journal behind a symlink would move data outside the volume.
            remove_tree(&self.dir())?;
            return Ok(None);
        }
        let journal = read_journal(&self.journal_path())?;
        if let Some(journal) = &journal {
            self.roll_forward(journal, None)?;
        }
        remove_tree(&self.dir())?;
        Ok(journal)
    }

    /// Records that the staging directory holds `restore`'s verified data (fsynced), so a
    /// later step (`--step swap`) can swap it in without reading the data again.
    pub fn mark_staged(&self, restore: &str, result: serde_json::Value) -> std::io::Result<()> {
        sync_tree(&self.staging())?;
        let marker = Staged {
            restore: restore.to_string(),
            result,
        };
        let path = self.dir().join(STAGED);
        let body = serde_json::to_vec_pretty(&marker).map_err(std::io::Error::other)?;
        write_marker(&path, &body)?;
        sync_dir(&self.dir())
    }

    /// What the staging marker records for `restore`, if that is what the volume holds.
    /// The app can write the marker: callers check the result against their own inputs.
    pub fn staged(&self, restore: &str) -> Option<serde_json::Value> {
        if !(real_dir(&self.dir()).ok()? && real_dir(&self.staging()).ok()?) {
            return None;
        }
        let bytes = read_marker(&self.dir().join(STAGED), MAX_STAGED_BYTES).ok()??;
        let marker: Staged = serde_json::from_slice(&bytes).ok()?;
        (marker.restore == restore).then_some(marker.result)
    }

    /// Whether a swap is journaled (an earlier attempt crashed mid-swap).
    pub fn journaled(&self) -> bool {
        exists(&self.journal_path())
    }

    /// A fresh, empty staging directory.
    pub fn prepare(&self) -> std::io::Result<PathBuf> {
        remove_tree(&self.dir())?;
        let staging = self.staging();
        std::fs::create_dir_all(&staging).map_err(|e| io("creating", &staging, e))?;
        Ok(staging)
    }

    /// Swaps the verified staging in. With `replace_everything` every old top-level entry
    /// goes (a volume restore: the volume becomes exactly the backup); without, only the
    /// names staged and those in `also` are replaced (a dump placed as one file, and what
    /// the app would load instead of it). `crash_after` (tests) stops after that many
    /// renames, as a crash would.
    pub fn swap_in(
        &self,
        restore: &str,
        result: serde_json::Value,
        replace_everything: bool,
        also: &[String],
        crash_after: Option<usize>,
    ) -> std::io::Result<()> {
        for dir in [self.dir(), self.staging()] {
            if !real_dir(&dir)? {
                return Err(std::io::Error::other(format!(
                    "{} is missing: nothing is staged",
                    dir.display()
                )));
            }
        }
        let new: Vec<Name> = names(&self.staging())?
            .into_iter()
            .filter(|n| !n.is(LOST_FOUND) && !n.is(RESTORE_WORKDIR))
            .collect();
        let old: Vec<Name> = names(&self.root)?
            .into_iter()
            .filter(|n| !n.is(RESTORE_WORKDIR) && !n.is(LOST_FOUND))
            .filter(|n| replace_everything || new.contains(n) || also.iter().any(|a| n.is(a)))
            .collect();
        let journal = Journal {
            version: 1,
            restore: restore.to_string(),
            old,
            new,
            result,
        };
        let tmp = self.dir().join("journal.tmp");
        let body = serde_json::to_vec_pretty(&journal).map_err(std::io::Error::other)?;
        write_marker(&tmp, &body)?;
        // Everything staged must be on disk before the journal makes it the truth.
        sync_tree(&self.staging())?;
        std::fs::rename(&tmp, self.journal_path()).map_err(|e| io("committing", &tmp, e))?;
        sync_dir(&self.dir())?;
        self.roll_forward(&journal, crash_after)?;
        if crash_after.is_some() {
            return Ok(());
        }
        remove_tree(&self.dir())
    }

    fn roll_forward(&self, journal: &Journal, crash_after: Option<usize>) -> std::io::Result<()> {
        let old_dir = self.dir().join(OLD);
        // Renames only between real directories of the volume: an `old` or `staging`
        // swapped for a symlink would move data out of the volume or pull files in.
        if !real_dir(&old_dir)? {
            std::fs::create_dir(&old_dir).map_err(|e| io("creating", &old_dir, e))?;
        }
        real_dir(&self.staging())?;
        let mut renames = 0usize;
        let pause = mid_swap_pause();
        let mut step = |from: &Path, to: &Path| -> std::io::Result<bool> {
            if crash_after.is_some_and(|limit| renames >= limit) {
                return Ok(false);
            }
            std::fs::rename(from, to).map_err(|e| io("moving", from, e))?;
            renames += 1;
            if renames == 1
                && let Some(pause) = pause
            {
                eprintln!("pausing {pause:?} in the middle of the swap ({PAUSE_MID_SWAP_ENV})");
                std::thread::sleep(pause);
            }
            Ok(true)
        };
        for name in &journal.old {
            let (at_root, aside) = (self.root.join(name), old_dir.join(name));
            if exists(&at_root) && !exists(&aside) && !step(&at_root, &aside)? {
                return Ok(());
            }
        }
        sync_dir(&self.root)?;
        for name in &journal.new {
            let (staged, at_root) = (self.staging().join(name), self.root.join(name));
            if !exists(&staged) {
                continue;
            }
            if exists(&at_root) {
                return Err(std::io::Error::other(format!(
                    "{:?} appeared at the volume root during the swap; the journal in {} keeps the swap resumable",
                    name.0,
                    self.dir().display()
                )));
            }
            if !step(&staged, &at_root)? {
                return Ok(());
            }
        }
        sync_dir(&self.root)?;
        // The swap is complete: the journal goes first, then the old data.
        std::fs::remove_file(self.journal_path())
            .map_err(|e| io("removing", &self.journal_path(), e))?;
        sync_dir(&self.dir())
    }
}

/// Test-only fault injection: a pause right after the first rename of a swap, when the
/// volume is half old and half new, so a test can kill the agent at the worst moment.
/// Unset in every real deployment.
pub const PAUSE_MID_SWAP_ENV: &str = "STATEWARD_TEST_PAUSE_MID_SWAP_SECONDS";

fn mid_swap_pause() -> Option<std::time::Duration> {
    std::env::var(PAUSE_MID_SWAP_ENV)
        .ok()?
        .parse::<u64>()
        .ok()
        .map(std::time::Duration::from_secs)
}

/// Makes everything written below `dir` durable: one `syncfs` of its file system (a
/// volume restore writes tens of thousands of files; an fsync per file cost more than the
/// unpacking itself in `cargo xtask bench restore`).
fn sync_tree(dir: &Path) -> std::io::Result<()> {
    let handle = std::fs::File::open(dir).map_err(|e| io("opening", dir, e))?;
    nix::unistd::syncfs(&handle)
        .map_err(std::io::Error::from)
        .map_err(|e| io("syncing the file system of", dir, e))
}

/// Free bytes and inodes available to the agent on the file system holding `path`.
pub fn free_space(path: &Path) -> std::io::Result<(u64, u64)> {
    let stat = nix::sys::statvfs::statvfs(path).map_err(std::io::Error::from)?;
    Ok((
        stat.blocks_available() as u64 * stat.fragment_size() as u64,
        stat.files_available() as u64,
    ))
}

/// What a restore needs free: the data itself plus a block per file and 1 % for
/// directories and metadata (the old data stays until the new is verified, so both must
/// fit at once).
pub fn space_needed(bytes: u64, files: u64) -> u64 {
    bytes + files * 4096 + bytes / 100 + (1 << 20)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("stateward-swap-{name}-{}", std::process::id()));
        let _ = remove_tree(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn tree(root: &Path) -> Vec<(String, String)> {
        let mut out = Vec::new();
        fn walk(root: &Path, rel: &Path, out: &mut Vec<(String, String)>) {
            for name in names(&root.join(rel)).unwrap() {
                let path = rel.join(&name);
                let full = root.join(&path);
                if path.as_os_str() == RESTORE_WORKDIR {
                    continue;
                }
                if full.is_dir() {
                    out.push((path.display().to_string(), "dir".into()));
                    walk(root, &path, out);
                } else {
                    out.push((
                        path.display().to_string(),
                        String::from_utf8_lossy(&std::fs::read(&full).unwrap()).into(),
                    ));
                }
            }
        }
        walk(root, Path::new(""), &mut out);
        out
    }

    fn fill(volume: &Path) {
        std::fs::create_dir_all(volume.join("lost+found")).unwrap();
        std::fs::create_dir_all(volume.join("db")).unwrap();
        std::fs::write(volume.join("db/table"), "old table").unwrap();
        std::fs::write(volume.join("same"), "old same").unwrap();
        std::fs::write(volume.join("only-old"), "gone after").unwrap();
        std::fs::write(
            volume.join("who"),
            "removed by a single-file swap that lists it",
        )
        .unwrap();
    }

    fn stage(work: &Workdir) {
        let staging = work.prepare().unwrap();
        std::fs::create_dir_all(staging.join("db")).unwrap();
        std::fs::write(staging.join("db/table"), "new table").unwrap();
        std::fs::write(staging.join("same"), "new same").unwrap();
        std::fs::write(staging.join("only-new"), "added").unwrap();
    }

    fn expected_new() -> Vec<(String, String)> {
        vec![
            ("db".into(), "dir".into()),
            ("db/table".into(), "new table".into()),
            ("lost+found".into(), "dir".into()),
            ("only-new".into(), "added".into()),
            ("same".into(), "new same".into()),
        ]
    }

    #[test]
    fn a_crash_after_any_rename_rolls_forward_to_exactly_the_new_data() {
        // 4 old entries + 3 new ones = 7 renames; crash after each count, then recover.
        for crash_after in 0..=7 {
            let volume = scratch("crash");
            fill(&volume);
            let work = Workdir::new(&volume);
            stage(&work);
            work.swap_in(
                "r1",
                serde_json::json!({"ok": 1}),
                true,
                &[],
                Some(crash_after),
            )
            .unwrap();
            let journal = Workdir::new(&volume).recover().unwrap();
            // After the last rename the journal is gone: the swap was complete (a retry
            // then redoes the restore, which is idempotent).
            let expected = (crash_after < 7).then(|| "r1".to_string());
            assert_eq!(
                journal.map(|j| j.restore),
                expected,
                "crash after {crash_after}"
            );
            assert_eq!(tree(&volume), expected_new(), "crash after {crash_after}");
            assert!(!volume.join(RESTORE_WORKDIR).exists());
            remove_tree(&volume).unwrap();
        }
    }

    #[test]
    fn unverified_staging_is_discarded_and_the_old_data_stays() {
        let volume = scratch("unverified");
        fill(&volume);
        let before = tree(&volume);
        let work = Workdir::new(&volume);
        stage(&work); // then the agent "crashes" before the journal
        assert_eq!(Workdir::new(&volume).recover().unwrap(), None);
        assert_eq!(tree(&volume), before);
        assert!(!volume.join(RESTORE_WORKDIR).exists());
        remove_tree(&volume).unwrap();
    }

    #[test]
    fn a_clean_swap_leaves_no_workdir_and_keeps_lost_and_found() {
        let volume = scratch("clean");
        fill(&volume);
        let work = Workdir::new(&volume);
        stage(&work);
        std::fs::create_dir_all(work.staging().join("lost+found")).unwrap();
        work.swap_in("r2", serde_json::Value::Null, true, &[], None)
            .unwrap();
        assert_eq!(tree(&volume), expected_new());
        assert!(!volume.join(RESTORE_WORKDIR).exists());
        remove_tree(&volume).unwrap();
    }

    #[test]
    fn non_utf8_top_level_names_are_swapped_in_and_out_faithfully() {
        use std::os::unix::ffi::OsStrExt;
        let (old_name, new_name) = (
            std::ffi::OsStr::from_bytes(b"old-caf\xe9"),
            std::ffi::OsStr::from_bytes(b"new-caf\xe9"),
        );
        for crash_after in [None, Some(1)] {
            let volume = scratch("utf8");
            fill(&volume);
            std::fs::write(volume.join(old_name), "old bytes").unwrap();
            let work = Workdir::new(&volume);
            stage(&work);
            std::fs::write(work.staging().join(new_name), "new bytes").unwrap();
            work.swap_in("r4", serde_json::Value::Null, true, &[], crash_after)
                .unwrap();
            if crash_after.is_some() {
                work.recover().unwrap();
            }
            assert_eq!(
                std::fs::read(volume.join(new_name)).ok(),
                Some(b"new bytes".to_vec()),
                "{crash_after:?}"
            );
            assert!(
                !volume.join(old_name).exists(),
                "the old non-UTF-8 name went: {crash_after:?}"
            );
            assert!(!volume.join(RESTORE_WORKDIR).exists());
            remove_tree(&volume).unwrap();
        }
    }

    #[test]
    fn a_crafted_journal_never_moves_anything_outside_the_volume() {
        let parent = scratch("journal");
        let volume = parent.join("volume");
        std::fs::create_dir_all(&volume).unwrap();
        std::fs::write(parent.join("outside"), "live data of someone else").unwrap();
        fill(&volume);
        let work = Workdir::new(&volume);
        stage(&work);
        for names in [
            r#"["../outside"]"#,
            r#"[".."]"#,
            r#"["a/b"]"#,
            r#"[""]"#,
            r#"[".stateward-restore"]"#,
            r#"["lost+found"]"#,
            r#"[{"bytes":[46,46,47,111]}]"#,
        ] {
            let journal =
                format!(r#"{{"version":1,"restore":"x","old":{names},"new":[],"result":null}}"#);
            std::fs::write(work.journal_path(), journal).unwrap();
            let refused = work.recover().unwrap_err();
            assert!(
                refused.to_string().contains("invalid"),
                "{names}: {refused}"
            );
            assert_eq!(
                std::fs::read_to_string(parent.join("outside")).unwrap(),
                "live data of someone else",
                "{names}"
            );
            assert_eq!(
                std::fs::read_to_string(volume.join("db/table")).unwrap(),
                "old table",
                "{names}"
            );
        }
        // A journal in the earlier format (names as strings) still rolls forward.
        std::fs::write(
            work.journal_path(),
            r#"{"version":1,"restore":"x","old":["only-old"],"new":["only-new"],"result":null}"#,
        )
        .unwrap();
        work.recover().unwrap();
        assert!(volume.join("only-new").exists() && !volume.join("only-old").exists());
        remove_tree(&parent).unwrap();
    }

    #[test]
    fn a_workdir_replaced_by_symlinks_is_never_followed() {
        use std::os::unix::fs::symlink;
        let parent = scratch("links");
        let volume = parent.join("volume");
        let elsewhere = parent.join("elsewhere");
        std::fs::create_dir_all(elsewhere.join("staging")).unwrap();
        std::fs::write(elsewhere.join("staging/pulled-in"), "not the app's").unwrap();
        std::fs::create_dir_all(&volume).unwrap();
        fill(&volume);
        let before = tree(&volume);
        let work = Workdir::new(&volume);
        // The whole workdir a symlink, with a journal behind it.
        std::fs::write(
            elsewhere.join(JOURNAL),
            r#"{"version":1,"restore":"x","old":["db"],"new":["pulled-in"],"result":null}"#,
        )
        .unwrap();
        symlink(&elsewhere, volume.join(RESTORE_WORKDIR)).unwrap();
        assert_eq!(work.recover().unwrap(), None);
        assert_eq!(tree(&volume), before, "nothing moved in or out");
        assert!(!exists(&volume.join(RESTORE_WORKDIR)), "the link went");
        assert!(elsewhere.join(JOURNAL).exists() && !elsewhere.join(OLD).exists());
        // `old` a symlink under a genuine journal: the roll-forward stops.
        stage(&work);
        work.swap_in("r5", serde_json::Value::Null, true, &[], Some(0))
            .unwrap();
        let aside = parent.join("aside");
        std::fs::create_dir_all(&aside).unwrap();
        std::fs::remove_dir(work.dir().join(OLD)).unwrap();
        symlink(&aside, work.dir().join(OLD)).unwrap();
        assert!(work.recover().is_err());
        assert_eq!(std::fs::read_dir(&aside).unwrap().count(), 0);
        assert_eq!(tree(&volume), before);
        // `staging` a symlink: nothing outside is pulled into the volume.
        std::fs::remove_file(work.journal_path()).unwrap();
        work.recover().unwrap();
        stage(&work);
        remove_tree(&work.staging()).unwrap();
        symlink(elsewhere.join("staging"), work.staging()).unwrap();
        assert!(
            work.swap_in("r6", serde_json::Value::Null, true, &[], None)
                .is_err()
        );
        assert!(!volume.join("pulled-in").exists());
        assert_eq!(tree(&volume), before);
        remove_tree(&parent).unwrap();
    }

    #[test]
    fn the_staging_marker_is_never_read_or_written_through_a_symlink() {
        let parent = scratch("marker");
        let volume = parent.join("volume");
        std::fs::create_dir_all(&volume).unwrap();
        let work = Workdir::new(&volume);
        stage(&work);
        let planted = parent.join("planted.json");
        std::fs::write(&planted, r#"{"restore":"r7","result":{"verified":true}}"#).unwrap();
        std::os::unix::fs::symlink(&planted, work.dir().join(STAGED)).unwrap();
        assert_eq!(
            work.staged("r7"),
            None,
            "a marker behind a symlink is not read"
        );
        work.mark_staged("r7", serde_json::json!({"verified": true}))
            .unwrap();
        assert_eq!(
            std::fs::read_to_string(&planted).unwrap(),
            r#"{"restore":"r7","result":{"verified":true}}"#,
            "the symlink's target is not written"
        );
        assert_eq!(
            work.staged("r7"),
            Some(serde_json::json!({"verified": true}))
        );
        assert_eq!(work.staged("another"), None);
        // An oversized marker is not read at all.
        std::fs::write(
            work.dir().join(STAGED),
            vec![b' '; MAX_STAGED_BYTES as usize + 1],
        )
        .unwrap();
        assert_eq!(work.staged("r7"), None);
        remove_tree(&parent).unwrap();
    }

    #[test]
    fn a_single_file_swap_replaces_only_that_name() {
        let volume = scratch("file");
        fill(&volume);
        let work = Workdir::new(&volume);
        let staging = work.prepare().unwrap();
        std::fs::write(staging.join("same"), "new same").unwrap();
        work.swap_in("r3", serde_json::Value::Null, false, &["who".into()], None)
            .unwrap();
        assert_eq!(
            std::fs::read_to_string(volume.join("same")).unwrap(),
            "new same"
        );
        assert_eq!(
            std::fs::read_to_string(volume.join("only-old")).unwrap(),
            "gone after",
            "names neither staged nor listed stay"
        );
        assert!(
            !volume.join("who").exists(),
            "a listed name goes in the same swap"
        );
        assert_eq!(
            std::fs::read_to_string(volume.join("db/table")).unwrap(),
            "old table"
        );
        remove_tree(&volume).unwrap();
    }

    #[test]
    fn space_needed_covers_data_files_and_slack() {
        assert!(space_needed(100 << 20, 10) > 100 << 20);
        assert_eq!(space_needed(0, 0), 1 << 20);
    }
}
