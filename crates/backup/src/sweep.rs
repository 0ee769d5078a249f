//! Sweeping what crashed runs left behind. A run that fails sweeps its own prefix; a run
//! whose manager died for good, or whose Backup was deleted mid-run, leaves a prefix
//! without `manifest.json` (and maybe an open multipart upload). The repository loop
//! sweeps those in its namespace's part of the bucket, never a committed backup (one with
//! a manifest) and never a run that is still going.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use aws_sdk_s3::error::DisplayErrorContext;
use chrono::{DateTime, Utc};
use stateward_agent::manifest::MANIFEST;

/// An object or upload under a namespace prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    pub key: String,
    pub at: DateTime<Utc>,
    /// Set for multipart uploads.
    pub upload_id: Option<String>,
}

/// What to remove.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SweepPlan {
    pub objects: Vec<String>,
    pub uploads: Vec<(String, String)>,
    /// Backup prefixes (`<app>/<backup>-<uid>`) the plan removes.
    pub prefixes: Vec<String>,
}

/// The backup directory (`<app>/<backup>-<uid>`) a key belongs to, relative to the
/// namespace prefix, and the uid at its end.
fn backup_dir(rel: &str) -> Option<(String, String)> {
    let mut parts = rel.splitn(3, '/');
    let (app, dir, _rest) = (parts.next()?, parts.next()?, parts.next()?);
    // Kubernetes uids are 36-character UUIDs.
    let uid = dir.get(dir.len().checked_sub(36)?..)?;
    if uid.len() != 36 || uid.chars().filter(|c| *c == '-').count() != 4 {
        return None;
    }
    Some((format!("{app}/{dir}"), uid.to_string()))
}

/// Decides what is orphaned: a backup directory without a manifest, whose Backup (by uid)
/// is not live, and whose newest object or upload is older than `grace`.
pub fn plan(
    namespace_prefix: &str,
    listed: &[Listed],
    live_uids: &HashSet<String>,
    now: DateTime<Utc>,
    grace: Duration,
) -> SweepPlan {
    struct Dir {
        committed: bool,
        newest: DateTime<Utc>,
        uid: String,
        items: Vec<Listed>,
    }
    let mut dirs: BTreeMap<String, Dir> = BTreeMap::new();
    for item in listed {
        let Some(rel) = item.key.strip_prefix(namespace_prefix) else {
            continue;
        };
        let Some((dir, uid)) = backup_dir(rel) else {
            continue;
        };
        let entry = dirs.entry(dir.clone()).or_insert_with(|| Dir {
            committed: false,
            newest: item.at,
            uid,
            items: Vec::new(),
        });
        if item.upload_id.is_none() && rel == format!("{dir}/{MANIFEST}") {
            entry.committed = true;
        }
        entry.newest = entry.newest.max(item.at);
        entry.items.push(item.clone());
    }
    let grace = chrono::Duration::from_std(grace).unwrap_or(chrono::Duration::MAX);
    let mut out = SweepPlan::default();
    for (dir, found) in dirs {
        if found.committed || live_uids.contains(&found.uid) || now - found.newest < grace {
            continue;
        }
        out.prefixes.push(dir);
        for item in found.items {
            match item.upload_id {
                Some(id) => out.uploads.push((item.key, id)),
                None => out.objects.push(item.key),
            }
        }
    }
    out
}

fn to_chrono(t: Option<&aws_sdk_s3::primitives::DateTime>) -> DateTime<Utc> {
    t.and_then(|t| DateTime::<Utc>::from_timestamp(t.secs(), t.subsec_nanos()))
        .unwrap_or_else(Utc::now)
}

/// Lists a namespace prefix (objects and open uploads).
pub async fn list(
    client: &aws_sdk_s3::Client,
    bucket: &str,
    namespace_prefix: &str,
) -> Result<Vec<Listed>, String> {
    let mut out = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let page = client
            .list_objects_v2()
            .bucket(bucket)
            .prefix(namespace_prefix)
            .set_continuation_token(token.clone())
            .send()
            .await
            .map_err(|e| format!("listing objects: {}", DisplayErrorContext(&e)))?;
        for object in page.contents() {
            if let Some(key) = object.key() {
                out.push(Listed {
                    key: key.to_string(),
                    at: to_chrono(object.last_modified()),
                    upload_id: None,
                });
            }
        }
        match page.next_continuation_token() {
            Some(next) if page.is_truncated() == Some(true) => token = Some(next.to_string()),
            _ => break,
        }
    }
    let uploads = client
        .list_multipart_uploads()
        .bucket(bucket)
        .prefix(namespace_prefix)
        .send()
        .await
        .map_err(|e| format!("listing multipart uploads: {}", DisplayErrorContext(&e)))?;
    for upload in uploads.uploads() {
        if let (Some(key), Some(id)) = (upload.key(), upload.upload_id()) {
            out.push(Listed {
                key: key.to_string(),
                at: to_chrono(upload.initiated()),
                upload_id: Some(id.to_string()),
            });
        }
    }
    Ok(out)
}

/// Carries out a plan; returns (objects deleted, uploads aborted).
pub async fn execute(
    client: &aws_sdk_s3::Client,
    bucket: &str,
    plan: &SweepPlan,
) -> Result<(usize, usize), String> {
    for (key, id) in &plan.uploads {
        client
            .abort_multipart_upload()
            .bucket(bucket)
            .key(key)
            .upload_id(id)
            .send()
            .await
            .map_err(|e| format!("aborting the upload of {key}: {}", DisplayErrorContext(&e)))?;
    }
    for key in &plan.objects {
        client
            .delete_object()
            .bucket(bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| format!("deleting {key}: {}", DisplayErrorContext(&e)))?;
    }
    Ok((plan.objects.len(), plan.uploads.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID_A: &str = "11111111-2222-3333-4444-555555555555";
    const UID_B: &str = "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee";
    const UID_C: &str = "99999999-8888-7777-6666-555555555555";

    fn at(minutes_ago: i64) -> DateTime<Utc> {
        DateTime::<Utc>::from_timestamp(1_800_000_000 - minutes_ago * 60, 0).unwrap_or_default()
    }

    fn obj(key: &str, minutes_ago: i64) -> Listed {
        Listed {
            key: key.into(),
            at: at(minutes_ago),
            upload_id: None,
        }
    }

    #[test]
    fn only_old_uncommitted_dead_runs_are_swept() {
        let ns = "team/shop/";
        let listed = vec![
            // committed: kept whatever its age
            obj(
                &format!("team/shop/pg/nightly-{UID_A}/volumes/d.tar.zst"),
                600,
            ),
            obj(&format!("team/shop/pg/nightly-{UID_A}/manifest.json"), 600),
            // crashed run, dead Backup, old: swept (object + open upload)
            obj(
                &format!("team/shop/pg/crashed-{UID_B}/volumes/d.tar.zst.result.json"),
                120,
            ),
            Listed {
                key: format!("team/shop/pg/crashed-{UID_B}/volumes/d.tar.zst"),
                at: at(120),
                upload_id: Some("u1".into()),
            },
            // live run: kept
            obj(
                &format!("team/shop/redis/running-{UID_C}/dumps/r.zst.result.json"),
                120,
            ),
            // probe objects and foreign keys: never touched
            obj("team/shop/.stateward-probe-x", 120),
            obj(
                "team/other/pg/x-11111111-2222-3333-4444-555555555555/a",
                120,
            ),
        ];
        let live: HashSet<String> = [UID_C.to_string()].into();
        let plan = plan(ns, &listed, &live, at(0), Duration::from_secs(900));
        assert_eq!(plan.prefixes, vec![format!("pg/crashed-{UID_B}")]);
        assert_eq!(plan.objects.len(), 1);
        assert_eq!(
            plan.uploads,
            vec![(
                format!("team/shop/pg/crashed-{UID_B}/volumes/d.tar.zst"),
                "u1".to_string()
            )]
        );
        // Within the grace period nothing is swept.
        let young = super::plan(ns, &listed, &live, at(100), Duration::from_secs(3600));
        assert!(young.prefixes.is_empty());
    }
}
