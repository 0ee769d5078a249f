//! Property tests of archive extraction (no cluster, no S3): generated archives — nested
//! directories, files, symlinks of every kind, hard links to earlier and missing entries,
//! long and non-UTF-8 names, and hostile entries mixed in — are unpacked into a staging
//! directory beside live data. Never a panic, never a change outside staging, and an
//! archive of only valid entries comes back exactly. The case count is bounded so that
//! `cargo xtask test` stays fast.
// The generators' helpers may panic: a failure there is a bug of the test itself.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use proptest::prelude::*;
use stateward_agent::extract::extract_tree;

/// What a path holds in the model of a valid archive.
#[derive(Debug, Clone, PartialEq)]
enum Node {
    Dir,
    File(Vec<u8>),
    Symlink(Vec<u8>),
}

/// One name component: short ASCII, long (up to 255 bytes), or non-UTF-8.
fn component() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        "[a-z]{1,8}".prop_map(String::into_bytes),
        (200usize..=255).prop_map(|n| vec![b'l'; n]),
        proptest::collection::vec(0x80u8..=0xfe, 1..6).prop_map(|mut v| {
            v.insert(0, b'n');
            v
        }),
    ]
}

/// A valid tree: unique paths, parents before children, hard links to earlier files,
/// symlinks inside the tree or absolute (never followed).
fn valid_tree() -> impl Strategy<Value = Vec<(Vec<u8>, Node, Option<usize>)>> {
    proptest::collection::vec(
        (
            component(),
            0usize..4,
            proptest::collection::vec(any::<u8>(), 0..64),
            any::<prop::sample::Index>(),
        ),
        1..16,
    )
    .prop_map(|raw| {
        let mut out: Vec<(Vec<u8>, Node, Option<usize>)> = Vec::new();
        let mut dirs: Vec<Vec<u8>> = vec![Vec::new()];
        for (name, kind, data, pick) in raw {
            let parent = pick.get(&dirs).clone();
            let mut path = parent.clone();
            if !path.is_empty() {
                path.push(b'/');
            }
            path.extend_from_slice(&name);
            if path.len() > 1000 || out.iter().any(|(p, _, _)| *p == path) {
                continue;
            }
            let files: Vec<usize> = (0..out.len())
                .filter(|i| matches!(out[*i].1, Node::File(_)) && out[*i].2.is_none())
                .collect();
            let entry = match kind {
                0 => {
                    dirs.push(path.clone());
                    (path, Node::Dir, None)
                }
                1 => (path, Node::File(data), None),
                2 if !files.is_empty() => {
                    let target = files[pick.index(files.len())];
                    let Node::File(content) = out[target].1.clone() else {
                        continue;
                    };
                    (path, Node::File(content), Some(target))
                }
                _ => {
                    let target = if data.first().is_some_and(|b| b % 2 == 0) {
                        b"/etc/hostname".to_vec()
                    } else {
                        name.clone()
                    };
                    (path, Node::Symlink(target), None)
                }
            };
            out.push(entry);
        }
        out
    })
}

fn header(kind: tar::EntryType, size: usize, mode: u32) -> tar::Header {
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(kind);
    header.set_size(size as u64);
    header.set_mode(mode);
    header.set_mtime(1_600_000_000);
    header.set_uid(0);
    header.set_gid(0);
    header
}

fn os(bytes: &[u8]) -> PathBuf {
    PathBuf::from(OsString::from_vec(bytes.to_vec()))
}

fn archive_of(tree: &[(Vec<u8>, Node, Option<usize>)]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for (path, node, link) in tree {
        let path = os(path);
        let result = match (node, link) {
            (Node::Dir, _) => {
                let mut h = header(tar::EntryType::Directory, 0, 0o755);
                builder.append_data(&mut h, &path, &[][..])
            }
            (Node::File(_), Some(target)) => {
                let mut h = header(tar::EntryType::Link, 0, 0o644);
                builder.append_link(&mut h, &path, os(&tree[*target].0))
            }
            (Node::File(data), None) => {
                let mut h = header(tar::EntryType::Regular, data.len(), 0o640);
                builder.append_data(&mut h, &path, &data[..])
            }
            (Node::Symlink(target), _) => {
                let mut h = header(tar::EntryType::Symlink, 0, 0o777);
                builder.append_link(&mut h, &path, os(target))
            }
        };
        result.expect("building the generated archive");
    }
    builder
        .into_inner()
        .expect("finishing the generated archive")
}

/// Hostile entries, each a short sequence written with raw header bytes (as an attacker
/// would, past the tar crate's own path checks). `LIVE` stands for the live data's
/// absolute path.
type Hostile = Vec<(Vec<u8>, tar::EntryType, Option<Vec<u8>>, u32)>;

fn hostile() -> impl Strategy<Value = Hostile> {
    use tar::EntryType::{Char, Directory, Link, Regular, Symlink};
    let one = |name: &[u8], kind, link: Option<&[u8]>, mode| {
        vec![(name.to_vec(), kind, link.map(<[u8]>::to_vec), mode)]
    };
    prop_oneof![
        Just(one(b"../escaped", Regular, None, 0o644)),
        Just(one(b"/tmp/escaped", Regular, None, 0o644)),
        Just(one(b"up", Symlink, Some(b"../../live"), 0o777)),
        Just(
            [
                one(b"out", Symlink, Some(b"LIVE"), 0o777),
                one(b"out", Directory, None, 0o777)
            ]
            .concat()
        ),
        Just(
            [
                one(b"out2", Symlink, Some(b"LIVE/file"), 0o777),
                one(b"out2", Regular, None, 0o666)
            ]
            .concat()
        ),
        Just(
            [
                one(b"out3", Symlink, Some(b"LIVE"), 0o777),
                one(b"out3/x", Regular, None, 0o644)
            ]
            .concat()
        ),
        Just(one(b"h", Link, Some(b"../live/file"), 0o644)),
        Just(one(b"h2", Link, Some(b"missing"), 0o644)),
        Just(one(b"dev", Char, None, 0o666)),
        Just(one(b"suid", Regular, None, 0o4755)),
    ]
}

fn raw_entry(
    builder: &mut tar::Builder<Vec<u8>>,
    name: &[u8],
    kind: tar::EntryType,
    link: Option<&[u8]>,
    mode: u32,
) {
    let mut h = header(kind, 1, mode);
    if !matches!(kind, tar::EntryType::Regular) {
        h.set_size(0);
    }
    h.as_old_mut().name[..name.len()].copy_from_slice(name);
    if let Some(link) = link {
        h.as_old_mut().linkname[..link.len()].copy_from_slice(link);
    }
    h.set_cksum();
    let data: &[u8] = if matches!(kind, tar::EntryType::Regular) {
        b"x"
    } else {
        b""
    };
    builder.append(&h, data).expect("appending a raw entry");
}

/// Every entry below `root` as (path bytes → kind, content or target, mode, mtime).
fn snapshot(root: &Path) -> BTreeMap<Vec<u8>, String> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<Vec<u8>, String>) {
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let path = entry.path();
            let Ok(meta) = std::fs::symlink_metadata(&path) else {
                continue;
            };
            let rel = path
                .strip_prefix(root)
                .unwrap_or(&path)
                .as_os_str()
                .as_bytes()
                .to_vec();
            let what = if meta.file_type().is_symlink() {
                format!("L {:?}", std::fs::read_link(&path).ok())
            } else if meta.is_file() {
                format!(
                    "F {:?} {:o} {}",
                    std::fs::read(&path).ok(),
                    meta.mode(),
                    meta.mtime()
                )
            } else {
                format!("D {:o} {}", meta.mode(), meta.mtime())
            };
            out.insert(rel, what);
            if meta.is_dir() {
                walk(root, &path, out);
            }
        }
    }
    let mut out = BTreeMap::new();
    if let Ok(meta) = std::fs::symlink_metadata(root) {
        out.insert(
            b".".to_vec(),
            format!(
                "D {:o} {} {}:{}",
                meta.mode(),
                meta.mtime(),
                meta.uid(),
                meta.gid()
            ),
        );
    }
    walk(root, root, &mut out);
    out
}

struct Volume {
    root: PathBuf,
    live: PathBuf,
    staging: PathBuf,
}

fn volume(case: &str) -> Volume {
    let root = std::env::temp_dir().join(format!("stateward-prop-{case}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let live = root.join("live");
    std::fs::create_dir_all(live.join("dir")).expect("live data");
    std::fs::write(live.join("file"), b"live").expect("live data");
    std::os::unix::fs::symlink("file", live.join("link")).expect("live data");
    let staging = root.join(".stateward-restore/staging");
    std::fs::create_dir_all(&staging).expect("staging");
    Volume {
        root,
        live,
        staging,
    }
}

fn only_staging_and_live(root: &Path) -> bool {
    let mut names: Vec<OsString> = std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    names.sort();
    names == [OsString::from(".stateward-restore"), OsString::from("live")]
        && std::fs::read_dir(root.join(".stateward-restore"))
            .into_iter()
            .flatten()
            .flatten()
            .all(|e| e.file_name() == "staging")
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn valid_archives_round_trip_exactly(tree in valid_tree()) {
        let v = volume("valid");
        let live = snapshot(&v.live);
        let archive = archive_of(&tree);
        let outcome = extract_tree(&archive[..], &v.staging, Default::default());
        prop_assert!(outcome.is_ok(), "refused a valid archive: {:?}", outcome.err());
        let got = snapshot(&v.staging);
        for (path, node, _) in &tree {
            let seen = got.get(path).cloned().unwrap_or_default();
            match node {
                Node::Dir => prop_assert!(seen.starts_with("D 40755"), "{:?}: {seen}", os(path)),
                Node::File(data) => prop_assert!(seen.starts_with(&format!("F Some({data:?}) ")), "{:?}: {seen}", os(path)),
                Node::Symlink(target) => prop_assert_eq!(seen, format!("L {:?}", Some(os(target)))),
            }
        }
        prop_assert_eq!(got.len(), tree.len() + 1, "nothing more than the archive (and the root)");
        prop_assert_eq!(snapshot(&v.live), live);
        prop_assert!(only_staging_and_live(&v.root));
        let _ = std::fs::remove_dir_all(&v.root);
    }

    #[test]
    fn hostile_entries_never_write_outside_staging(
        tree in valid_tree(),
        bad in proptest::collection::vec(hostile(), 1..4),
        at in any::<prop::sample::Index>(),
    ) {
        let v = volume("hostile");
        let live = snapshot(&v.live);
        let live_abs = v.live.as_os_str().as_bytes().to_vec();
        // The valid entries, with hostile ones spliced in at one point.
        let split = at.index(tree.len() + 1);
        let mut builder = tar::Builder::new(Vec::new());
        let head = archive_of(&tree[..split.min(tree.len())]);
        builder.get_mut().extend_from_slice(&head[..head.len().saturating_sub(1024)]);
        for (name, kind, link, mode) in bad.iter().flatten() {
            let link = link.as_ref().map(|l| if l == b"LIVE" { live_abs.clone() } else { l.clone() });
            raw_entry(&mut builder, name, *kind, link.as_deref(), *mode);
        }
        let archive = builder.into_inner().expect("finishing the hostile archive");
        let outcome = extract_tree(&archive[..], &v.staging, Default::default());
        if let Err(e) = &outcome {
            prop_assert!(e.is_permanent() || e.to_string().contains("writing"), "{e}");
        }
        prop_assert_eq!(snapshot(&v.live), live, "live data changed: {:?}", outcome.map(|(s, _)| s));
        prop_assert!(only_staging_and_live(&v.root));
        prop_assert!(!Path::new("/tmp/escaped").exists());
        let _ = std::fs::remove_dir_all(&v.root);
    }
}
