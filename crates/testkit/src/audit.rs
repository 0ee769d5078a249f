//! The local API server's audit log (`target/testenv/logs/audit.log`, metadata level, one
//! JSON event per line): who sent which requests, for tests and benches that count an
//! operator's API cost by user rather than trusting the operator's own figures.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::Path;

use anyhow::{Context, Result};
use chrono::{DateTime, Utc};
use serde::Deserialize;

/// One request, as the API server recorded it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub user: String,
    pub verb: String,
    /// `resource` or `resource/subresource`; empty for non-resource URLs.
    pub resource: String,
    pub namespace: String,
    pub name: String,
    pub code: u16,
    pub at: DateTime<Utc>,
}

impl Request {
    /// Whether the request changes state (what an idle operator should never send).
    pub fn is_write(&self) -> bool {
        matches!(
            self.verb.as_str(),
            "create" | "update" | "patch" | "delete" | "deletecollection"
        )
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Event {
    stage: String,
    verb: String,
    user: User,
    /// Set when the request impersonated someone (tests run a manager that way, to tell
    /// its requests from their own): then that user is who sent it.
    #[serde(default)]
    impersonated_user: Option<User>,
    #[serde(default)]
    object_ref: Option<ObjectRef>,
    #[serde(default)]
    response_status: Option<Status>,
    stage_timestamp: DateTime<Utc>,
}

#[derive(Deserialize)]
struct User {
    #[serde(default)]
    username: String,
}

#[derive(Deserialize, Default)]
struct ObjectRef {
    #[serde(default)]
    resource: String,
    #[serde(default)]
    subresource: String,
    #[serde(default)]
    namespace: String,
    #[serde(default)]
    name: String,
}

#[derive(Deserialize)]
struct Status {
    #[serde(default)]
    code: u16,
}

/// One line of the log as a request, or `None` for a stage that does not count: a
/// request counts once, when it completes, except a watch, which counts when it starts
/// (it may never complete inside the window).
pub fn parse_line(line: &str) -> Option<Request> {
    let event: Event = serde_json::from_str(line).ok()?;
    let counts = match event.verb.as_str() {
        "watch" => event.stage == "ResponseStarted",
        _ => event.stage == "ResponseComplete",
    };
    if !counts {
        return None;
    }
    let object = event.object_ref.unwrap_or_default();
    let resource = if object.subresource.is_empty() {
        object.resource
    } else {
        format!("{}/{}", object.resource, object.subresource)
    };
    Some(Request {
        user: event.impersonated_user.unwrap_or(event.user).username,
        verb: event.verb,
        resource,
        namespace: object.namespace,
        name: object.name,
        code: event.response_status.map(|s| s.code).unwrap_or_default(),
        at: event.stage_timestamp,
    })
}

/// Every request recorded at or after `since` (the log and its rotated predecessors).
pub fn read_since(log: &Path, since: DateTime<Utc>) -> Result<Vec<Request>> {
    let mut files = vec![log.to_path_buf()];
    if let (Some(dir), Some(stem)) = (log.parent(), log.file_stem()) {
        // The API server rotates to `audit-<timestamp>.log` next to it.
        let prefix = format!("{}-", stem.to_string_lossy());
        if let Ok(entries) = std::fs::read_dir(dir) {
            for entry in entries.flatten() {
                if entry.file_name().to_string_lossy().starts_with(&prefix) {
                    files.push(entry.path());
                }
            }
        }
    }
    let mut out = Vec::new();
    for file in files {
        let Ok(handle) = std::fs::File::open(&file) else {
            continue;
        };
        for line in BufReader::new(handle).lines() {
            let line = line.with_context(|| format!("reading {}", file.display()))?;
            if let Some(request) = parse_line(&line).filter(|r| r.at >= since) {
                out.push(request);
            }
        }
    }
    out.sort_by_key(|r| r.at);
    Ok(out)
}

/// Counts by `verb resource`, largest first.
pub fn by_verb_and_resource<'a>(
    requests: impl IntoIterator<Item = &'a Request>,
) -> Vec<(String, usize)> {
    let mut counts = BTreeMap::<String, usize>::new();
    for r in requests {
        *counts
            .entry(format!("{} {}", r.verb, r.resource))
            .or_default() += 1;
    }
    let mut out: Vec<(String, usize)> = counts.into_iter().collect();
    out.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_counts_once_and_a_watch_when_it_starts() {
        let line = |stage: &str, verb: &str| {
            format!(
                r#"{{"kind":"Event","level":"Metadata","stage":"{stage}","verb":"{verb}","user":{{"username":"system:serviceaccount:s:stateward"}},"objectRef":{{"resource":"statefulapps","subresource":"status","namespace":"a","name":"x"}},"responseStatus":{{"code":200}},"stageTimestamp":"2026-12-03T10:00:00.123456Z"}}"#
            )
        };
        assert_eq!(parse_line(&line("RequestReceived", "patch")), None);
        assert_eq!(parse_line(&line("ResponseStarted", "get")), None);
        assert_eq!(parse_line(&line("ResponseComplete", "watch")), None);
        let patch = parse_line(&line("ResponseComplete", "patch")).expect("a patch counts");
        assert_eq!(patch.resource, "statefulapps/status");
        assert_eq!(patch.user, "system:serviceaccount:s:stateward");
        assert!(patch.is_write());
        let watch = parse_line(&line("ResponseStarted", "watch")).expect("a watch counts");
        assert!(!watch.is_write());
        assert_eq!(parse_line("not json"), None);
        let impersonated = line("ResponseComplete", "get").replace(
            r#""objectRef""#,
            r#""impersonatedUser":{"username":"idle-manager"},"objectRef""#,
        );
        assert_eq!(
            parse_line(&impersonated).map(|r| r.user).as_deref(),
            Some("idle-manager")
        );
        // Non-resource requests have no objectRef.
        let healthz = r#"{"stage":"ResponseComplete","verb":"get","user":{"username":"u"},"responseStatus":{"code":200},"stageTimestamp":"2026-12-03T10:00:00Z"}"#;
        assert_eq!(parse_line(healthz).map(|r| r.resource), Some(String::new()));
        let counts = by_verb_and_resource([&patch, &patch, &watch]);
        assert_eq!(
            counts,
            vec![
                ("patch statefulapps/status".to_string(), 2),
                ("watch statefulapps/status".to_string(), 1)
            ]
        );
    }
}
