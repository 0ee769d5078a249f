//! Events: one recorder per controller, folding repeats of the same fact into one Event.
//!
//! kube's `Recorder` folds occurrences by (type, reason, action, object) and ignores the
//! note, so a shared one would fold two different facts (a hook failed in pod 3, then in
//! pod 2) into one Event that shows only the first. Ours keys by the note too: the same
//! fact repeated within [`SERIES_WINDOW`] becomes one Event whose `series.count` grows (one
//! small PATCH instead of a new object per repeat, as client-go's events/v1 recorder
//! does); a different note is a different Event.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::{Event as K8sEvent, EventSeries};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::events::{EventType, Reporter};

/// How long after its last occurrence a repeat still joins an Event's series (client-go's
/// events/v1 window).
pub const SERIES_WINDOW: Duration = Duration::from_secs(6 * 60);

/// At most this many series are remembered; past it the oldest are forgotten (a repeat of
/// a forgotten one starts a new Event: more objects, never a lost one).
const MAX_SERIES: usize = 4096;

/// The API server refuses notes over 1 KiB.
const MAX_NOTE_BYTES: usize = 1024;

/// What makes two occurrences the same fact.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Key {
    warning: bool,
    reason: String,
    action: String,
    /// The object, by namespace, kind, name and uid (a re-created object is another one).
    regarding: (String, String, String, String),
    note: String,
}

#[derive(Clone, Debug)]
struct Seen {
    name: String,
    count: i32,
    last: Instant,
}

/// What to send for one occurrence.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Send {
    /// A new Event of this name.
    Create { name: String },
    /// The existing Event's series, now at `count` occurrences.
    Patch { name: String, count: i32 },
}

/// The series remembered, and the decision for each occurrence (no client: unit-tested).
#[derive(Default)]
struct Correlator {
    series: HashMap<Key, Seen>,
}

impl Correlator {
    /// The occurrence of `key` at `now`; `fresh_name` names the Event when it is new.
    fn observe(&mut self, key: Key, now: Instant, fresh_name: impl FnOnce() -> String) -> Send {
        self.series
            .retain(|_, s| now.saturating_duration_since(s.last) < SERIES_WINDOW);
        if let Some(seen) = self.series.get_mut(&key) {
            seen.count = seen.count.saturating_add(1);
            seen.last = now;
            return Send::Patch {
                name: seen.name.clone(),
                count: seen.count,
            };
        }
        if self.series.len() >= MAX_SERIES
            && let Some(oldest) = self
                .series
                .iter()
                .min_by_key(|(_, s)| s.last)
                .map(|(k, _)| k.clone())
        {
            self.series.remove(&oldest);
        }
        let name = fresh_name();
        self.series.insert(
            key,
            Seen {
                name: name.clone(),
                count: 1,
                last: now,
            },
        );
        Send::Create { name }
    }

    /// Forgets `key` (its Event is gone: the API server's event TTL, or a failed create).
    fn forget(&mut self, key: &Key) {
        self.series.remove(key);
    }
}

/// One per controller (kept in its [`crate::Context`]).
pub struct Recorder {
    client: kube::Client,
    reporter: Reporter,
    correlator: Mutex<Correlator>,
}

impl Recorder {
    pub fn new(client: kube::Client, reporter: Reporter) -> Self {
        Self {
            client,
            reporter,
            correlator: Mutex::default(),
        }
    }

    /// Records one occurrence: a new Event, or one more in the series of the same fact.
    pub async fn publish(
        &self,
        regarding: &ObjectReference,
        type_: EventType,
        reason: &str,
        action: &str,
        note: &str,
    ) -> Result<(), kube::Error> {
        let note = cap_note(note);
        let key = Key {
            warning: type_ == EventType::Warning,
            reason: reason.to_string(),
            action: action.to_string(),
            regarding: (
                regarding.namespace.clone().unwrap_or_default(),
                regarding.kind.clone().unwrap_or_default(),
                regarding.name.clone().unwrap_or_default(),
                regarding.uid.clone().unwrap_or_default(),
            ),
            note: note.clone(),
        };
        let now = jiff::Timestamp::now();
        let fresh_name = || {
            let object = regarding
                .name
                .as_deref()
                .unwrap_or(&self.reporter.controller);
            // Unique per occurrence, as kube's recorder names them; bounded to a name.
            let suffix = format!(".{:x}", now.as_nanosecond());
            format!(
                "{}{suffix}",
                crate::names::bounded(object, crate::names::MAX_SUBDOMAIN - suffix.len(), false)
            )
        };
        let send = self
            .correlator
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .observe(key.clone(), Instant::now(), fresh_name);
        let namespace = regarding.namespace.as_deref().unwrap_or("default");
        let events: Api<K8sEvent> = Api::namespaced(self.client.clone(), namespace);
        let result = match &send {
            Send::Patch { name, count } => {
                let series = serde_json::json!({ "series": EventSeries {
                    count: *count,
                    last_observed_time: MicroTime(now),
                }});
                match events
                    .patch(name, &PatchParams::default(), &Patch::Merge(&series))
                    .await
                {
                    // The API server expired it (events live an hour): start anew.
                    Err(kube::Error::Api(s)) if s.code == 404 => {
                        self.forget(&key);
                        return Box::pin(self.publish(regarding, type_, reason, action, &note))
                            .await;
                    }
                    other => other.map(drop),
                }
            }
            Send::Create { name } => {
                let event = self.event(name, regarding, type_, reason, action, note, now);
                events
                    .create(&PostParams::default(), &event)
                    .await
                    .map(drop)
            }
        };
        if result.is_err() && matches!(send, Send::Create { .. }) {
            // Never created: the next occurrence must create, not patch.
            self.forget(&key);
        }
        result
    }

    fn forget(&self, key: &Key) {
        self.correlator
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .forget(key);
    }

    #[allow(clippy::too_many_arguments)]
    fn event(
        &self,
        name: &str,
        regarding: &ObjectReference,
        type_: EventType,
        reason: &str,
        action: &str,
        note: String,
        now: jiff::Timestamp,
    ) -> K8sEvent {
        K8sEvent {
            metadata: ObjectMeta {
                name: Some(name.to_string()),
                namespace: regarding.namespace.clone(),
                ..Default::default()
            },
            event_time: Some(MicroTime(now)),
            type_: Some(
                match type_ {
                    EventType::Normal => "Normal",
                    EventType::Warning => "Warning",
                }
                .into(),
            ),
            reason: Some(reason.to_string()),
            action: Some(action.to_string()),
            note: Some(note),
            regarding: Some(regarding.clone()),
            reporting_controller: Some(self.reporter.controller.clone()),
            reporting_instance: Some(
                self.reporter
                    .instance
                    .clone()
                    .unwrap_or_else(|| self.reporter.controller.clone()),
            ),
            ..Default::default()
        }
    }
}

/// `note` cut at a character boundary to fit the API server's 1 KiB limit.
fn cap_note(note: &str) -> String {
    if note.len() <= MAX_NOTE_BYTES {
        return note.to_string();
    }
    let mut end = MAX_NOTE_BYTES - '…'.len_utf8();
    while !note.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &note[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(note: &str, uid: &str) -> Key {
        Key {
            warning: true,
            reason: "HookFailed".into(),
            action: "RunHook".into(),
            regarding: ("ns".into(), "Backup".into(), "b".into(), uid.into()),
            note: note.into(),
        }
    }

    #[test]
    fn series_fold_only_the_same_fact_within_the_window() {
        let start = Instant::now();
        let at = |s: u64| start + Duration::from_secs(s);
        let mut c = Correlator::default();
        let mut n = 0;
        let mut name = || {
            n += 1;
            format!("e{n}")
        };
        // (occurrence, at second, expected)
        let rows: Vec<(Key, u64, Send)> = vec![
            (key("pod 3", "u1"), 0, Send::Create { name: "e1".into() }),
            (
                key("pod 3", "u1"),
                10,
                Send::Patch {
                    name: "e1".into(),
                    count: 2,
                },
            ),
            // Another note on the same object: another fact, its own Event.
            (key("pod 2", "u1"), 20, Send::Create { name: "e2".into() }),
            (
                key("pod 3", "u1"),
                30,
                Send::Patch {
                    name: "e1".into(),
                    count: 3,
                },
            ),
            // The same name re-created (another uid): another object.
            (key("pod 3", "u2"), 40, Send::Create { name: "e3".into() }),
            // Past the window since its last occurrence: a new Event.
            (
                key("pod 3", "u1"),
                30 + 360,
                Send::Create { name: "e4".into() },
            ),
        ];
        for (i, (k, s, want)) in rows.into_iter().enumerate() {
            assert_eq!(c.observe(k, at(s), &mut name), want, "row {i}");
        }
    }

    #[test]
    fn forgotten_series_start_anew_and_the_map_is_bounded() {
        let now = Instant::now();
        let mut c = Correlator::default();
        assert_eq!(
            c.observe(key("x", "u"), now, || "a".into()),
            Send::Create { name: "a".into() }
        );
        c.forget(&key("x", "u"));
        assert_eq!(
            c.observe(key("x", "u"), now, || "b".into()),
            Send::Create { name: "b".into() }
        );
        for i in 0..MAX_SERIES + 10 {
            c.observe(key(&i.to_string(), "u"), now, || format!("n{i}"));
        }
        assert!(c.series.len() <= MAX_SERIES);
    }

    #[test]
    fn notes_are_cut_to_the_api_limit_at_a_character_boundary() {
        assert_eq!(cap_note("short"), "short");
        let long = "é".repeat(800); // 1,600 bytes
        let cut = cap_note(&long);
        assert!(cut.len() <= MAX_NOTE_BYTES, "{}", cut.len());
        assert!(cut.ends_with('…'));
    }
}
