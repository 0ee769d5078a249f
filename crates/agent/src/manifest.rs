//! The backup format: where a backup's objects live and what `manifest.json` says.
//! Documented for users in `docs/backup-format.md`; a change here is a format change
//! (bump [`FORMAT_VERSION`], keep reading the previous one).

use serde::{Deserialize, Serialize};

/// Version of the manifest schema and object layout.
pub const FORMAT_VERSION: u32 = 1;

/// The manifest's file name inside a backup's prefix. Written last: a backup without it
/// does not exist.
pub const MANIFEST: &str = "manifest.json";

/// `<prefix>/<namespace>/<app>/<backup>-<uid>` (no trailing slash).
pub fn backup_prefix(
    repo_prefix: Option<&str>,
    namespace: &str,
    app: &str,
    backup: &str,
    uid: &str,
) -> String {
    let base = format!("{namespace}/{app}/{backup}-{uid}");
    match repo_prefix {
        Some(p) if !p.is_empty() => format!("{p}/{base}"),
        _ => base,
    }
}

/// The prefix all of a namespace's backups live under (tenancy boundary).
pub fn namespace_prefix(repo_prefix: Option<&str>, namespace: &str) -> String {
    match repo_prefix {
        Some(p) if !p.is_empty() => format!("{p}/{namespace}/"),
        _ => format!("{namespace}/"),
    }
}

/// Object key of one volume's archive (`tar` then `zstd`, then `age` when encrypted).
pub fn volume_key(prefix: &str, pvc: &str, encrypted: bool) -> String {
    format!(
        "{prefix}/volumes/{pvc}.tar.zst{}",
        if encrypted { ".age" } else { "" }
    )
}

/// Object key of one pod's dump (the command's stdout, `zstd`-compressed, then `age`).
pub fn dump_key(prefix: &str, pod: &str, encrypted: bool) -> String {
    format!(
        "{prefix}/dumps/{pod}.zst{}",
        if encrypted { ".age" } else { "" }
    )
}

/// Object key of the agent's full result for a data object.
pub fn result_key(data_key: &str) -> String {
    format!("{data_key}.result.json")
}

/// How one data object was produced, so a reader knows how to undo it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Entry {
    /// PVC name (volume method) or pod name (exec method).
    pub name: String,
    /// The app pod it came from.
    pub pod: String,
    /// Object key, relative to the bucket.
    pub key: String,
    /// `tar+zstd` (a volume) or `zstd` (a dump).
    pub encoding: String,
    pub bytes_read: u64,
    pub bytes_stored: u64,
    /// sha256 of the stored data (all segments, concatenated), hex.
    pub sha256: String,
    /// sha256 of the plaintext before compression (the tar stream, or the dump), hex.
    /// Absent in backups written before it was recorded; a restore checks it when present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_sha256: Option<String>,
    /// Objects the data is stored in: `key`, then `key.seg-00001`, `key.seg-00002`, ...
    /// (a volume larger than one multipart upload); concatenate them in order.
    #[serde(default = "one")]
    pub segments: u32,
    /// Files in the archive (volume method).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files: Option<u64>,
    /// The dump command (exec method).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
    /// Who owned the archived files (volume method). Absent in backups written before it
    /// was recorded: restoring those needs `spec.dataAccess.elevated`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ownership: Option<stateward_api::access::Ownership>,
}

fn one() -> u32 {
    1
}

/// `manifest.json`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    pub format_version: u32,
    /// The Stateward version that wrote it.
    pub written_by: String,
    pub namespace: String,
    pub app: String,
    pub backup: String,
    pub backup_uid: String,
    /// `Volume` or `Exec`.
    pub method: String,
    /// RFC 3339.
    pub started_at: String,
    /// RFC 3339.
    pub completed_at: String,
    /// `null`, or `age` when the data objects are encrypted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<String>,
    pub entries: Vec<Entry>,
    /// The StatefulSet as it was (metadata trimmed), so a clone can recreate it.
    pub stateful_set: serde_json::Value,
    /// The PVCs backed up (metadata trimmed), for the same reason.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub persistent_volume_claims: Vec<serde_json::Value>,
}

/// Keeps what recreating an object needs: name, labels, annotations (minus the noisy
/// ones) and spec; drops status and server-set metadata.
pub fn trimmed(object: &serde_json::Value) -> serde_json::Value {
    let mut out = serde_json::Map::new();
    for field in ["apiVersion", "kind", "spec"] {
        if let Some(v) = object.get(field) {
            out.insert(field.into(), v.clone());
        }
    }
    let mut meta = serde_json::Map::new();
    if let Some(m) = object.get("metadata") {
        for field in ["name", "namespace", "labels"] {
            if let Some(v) = m.get(field) {
                meta.insert(field.into(), v.clone());
            }
        }
        if let Some(serde_json::Value::Object(annotations)) = m.get("annotations") {
            let kept: serde_json::Map<_, _> = annotations
                .iter()
                .filter(|(k, _)| k.as_str() != "kubectl.kubernetes.io/last-applied-configuration")
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            if !kept.is_empty() {
                meta.insert("annotations".into(), kept.into());
            }
        }
    }
    out.insert("metadata".into(), meta.into());
    out.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_is_namespaced_and_stable() {
        let p = backup_prefix(Some("team"), "shop", "pg", "pg-1", "abc");
        assert_eq!(p, "team/shop/pg/pg-1-abc");
        assert!(p.starts_with(&namespace_prefix(Some("team"), "shop")));
        assert_eq!(
            volume_key(&p, "data-pg-0", false),
            "team/shop/pg/pg-1-abc/volumes/data-pg-0.tar.zst"
        );
        assert_eq!(
            dump_key(&p, "pg-0", true),
            "team/shop/pg/pg-1-abc/dumps/pg-0.zst.age"
        );
        assert_eq!(backup_prefix(None, "a", "b", "c", "d"), "a/b/c-d");
    }

    #[test]
    fn trimming_keeps_spec_and_drops_status_and_server_fields() {
        let object = serde_json::json!({
            "apiVersion": "apps/v1", "kind": "StatefulSet",
            "metadata": {"name": "pg", "uid": "u", "resourceVersion": "1", "managedFields": [],
                         "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{}", "team": "a"}},
            "spec": {"replicas": 2}, "status": {"replicas": 2}
        });
        let t = trimmed(&object);
        assert_eq!(t["spec"]["replicas"], 2);
        assert!(t.get("status").is_none());
        assert!(t["metadata"].get("uid").is_none());
        assert_eq!(
            t["metadata"]["annotations"],
            serde_json::json!({"team": "a"})
        );
    }
}
