//! An app's health from what the cluster says (pure: unit-tested): desired and ready
//! replicas, each unready pod with its reason, the newest good backup against the same
//! maximum age the backup controller uses, and the PVCs' capacity.
//!
//! Status carries instants, never ages (an age changes every second, and writing it would
//! make an idle app cost writes): the verdict flips when the newest backup's deadline
//! passes, and the controller wakes at that instant ([`backup_deadline`]).

use std::time::Duration;

use chrono::{DateTime, Utc};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use stateward_api::StatefulApp;
use stateward_api::statefulapp::{HealthStatusSection, UnreadyPod, VolumeHealth};
use stateward_runtime::schedule::{ScheduleRef, backup_max_age};

/// The verdict: the `Healthy` condition's status, reason and message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub healthy: bool,
    pub reason: &'static str,
    pub message: String,
}

/// The event an assessment deserves, if any: a change of health either way, and a
/// Warning the first time the app names a StatefulSet that does not exist (a mistake in
/// the spec, reported also on the first assessment, when there is no change to report).
/// `was` is the previous `Healthy` condition's status and reason.
pub fn event_for(was: Option<(&str, &str)>, verdict: &Verdict) -> Option<(bool, &'static str)> {
    let status = if verdict.healthy { "True" } else { "False" };
    match was {
        Some((_, reason)) if reason == verdict.reason && verdict.reason == MISSING_SET => None,
        _ if verdict.reason == MISSING_SET => Some((true, MISSING_SET)),
        Some((was_status, _)) if was_status != status => Some(if verdict.healthy {
            (false, "Healthy")
        } else {
            (true, "Unhealthy")
        }),
        _ => None,
    }
}

const MISSING_SET: &str = "StatefulSetNotFound";

/// Why a pod is not ready, in the words the user would look for.
pub fn unready_reason(pod: &Pod) -> Option<String> {
    if pod.metadata.deletion_timestamp.is_some() {
        return Some("terminating".into());
    }
    let status = pod.status.as_ref()?;
    let ready = status
        .conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == "Ready");
    if ready.is_some_and(|c| c.status == "True") {
        return None;
    }
    for container in status.container_statuses.iter().flatten() {
        if let Some(waiting) = container.state.as_ref().and_then(|s| s.waiting.as_ref()) {
            return Some(format!(
                "container {} waiting: {}",
                container.name,
                waiting.reason.clone().unwrap_or_default()
            ));
        }
        if let Some(terminated) = container.state.as_ref().and_then(|s| s.terminated.as_ref()) {
            return Some(format!(
                "container {} terminated: {} (exit code {})",
                container.name,
                terminated.reason.clone().unwrap_or_default(),
                terminated.exit_code
            ));
        }
        if !container.ready {
            return Some(format!(
                "container {} not ready (readiness probe failing)",
                container.name
            ));
        }
    }
    let phase = status.phase.clone().unwrap_or_else(|| "Pending".into());
    Some(match ready.and_then(|c| c.message.clone()) {
        Some(message) if !message.is_empty() => format!("{phase}: {message}"),
        _ => format!("{phase}, not ready"),
    })
}

/// The health section and the verdict.
pub fn assess(
    app: &StatefulApp,
    sts: Option<&StatefulSet>,
    pods: &[Pod],
    claims: &[PersistentVolumeClaim],
    now: DateTime<Utc>,
) -> (HealthStatusSection, Verdict) {
    let mut section = HealthStatusSection {
        observed_generation: app.metadata.generation,
        ..Default::default()
    };
    let Some(sts) = sts else {
        let verdict = Verdict {
            healthy: false,
            reason: MISSING_SET,
            message: format!(
                "StatefulSet {} (spec.statefulSetName) does not exist",
                app.spec.stateful_set_name
            ),
        };
        return (section, verdict);
    };
    section.desired_replicas = sts.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
    let mut pods: Vec<&Pod> = pods.iter().collect();
    pods.sort_by_key(|p| p.metadata.name.clone());
    for pod in pods {
        match unready_reason(pod) {
            None => section.ready_replicas += 1,
            Some(reason) => section.unready_pods.push(UnreadyPod {
                name: pod.metadata.name.clone().unwrap_or_default(),
                reason,
            }),
        }
    }
    section.volumes = claims
        .iter()
        .map(|c| VolumeHealth {
            name: c.metadata.name.clone().unwrap_or_default(),
            capacity: c
                .status
                .as_ref()
                .and_then(|s| s.capacity.as_ref())
                .and_then(|c| c.get("storage"))
                .map(|q| q.0.clone()),
            phase: c.status.as_ref().and_then(|s| s.phase.clone()),
        })
        .collect();
    section.volumes.sort_by(|a, b| a.name.cmp(&b.name));

    let max_age = max_backup_age(app, now);
    section.backup_max_age_seconds = max_age.map(|d| d.as_secs() as i64);
    let stopped = app
        .status
        .as_ref()
        .and_then(|s| stateward_runtime::conditions::get(&s.conditions, "Stopped"))
        .is_some_and(|c| c.status == "True");
    let verdict = if stopped {
        Verdict {
            healthy: false,
            reason: "StoppedForOperation",
            message:
                "the app is stopped for another operation (a restore); see the Stopped condition"
                    .into(),
        }
    } else if !section.unready_pods.is_empty() || section.ready_replicas < section.desired_replicas
    {
        let named: Vec<String> = section
            .unready_pods
            .iter()
            .map(|p| format!("{} ({})", p.name, p.reason))
            .collect();
        Verdict {
            healthy: false,
            reason: "ReplicasNotReady",
            message: if named.is_empty() {
                format!(
                    "{} of {} replicas ready",
                    section.ready_replicas, section.desired_replicas
                )
            } else {
                format!(
                    "{} of {} replicas ready; not ready: {}",
                    section.ready_replicas,
                    section.desired_replicas,
                    named.join(", ")
                )
            },
        }
    } else if let (Some(max), Some(deadline)) = (max_age, backup_deadline(app, now)) {
        let allowed = human(max.as_secs());
        let due = rfc3339(deadline);
        match last_success(app) {
            Some(last) if now > deadline => Verdict {
                healthy: false,
                reason: "BackupTooOld",
                message: format!(
                    "the newest successful backup completed at {} and was due again by {due} \
                     (allowed age {allowed})",
                    rfc3339(last)
                ),
            },
            None if now > deadline => Verdict {
                healthy: false,
                reason: "NoBackup",
                message: format!(
                    "no successful backup since the app was created; the first was due by {due} \
                     (allowed age {allowed})"
                ),
            },
            Some(last) => Verdict {
                healthy: true,
                reason: "Healthy",
                message: format!(
                    "all {} replicas ready; newest backup completed at {}, the next is due by \
                     {due} (allowed age {allowed})",
                    section.desired_replicas,
                    rfc3339(last)
                ),
            },
            None => Verdict {
                healthy: true,
                reason: "Healthy",
                message: format!(
                    "all {} replicas ready; no backup yet, the first is due by {due} (allowed \
                     age {allowed})",
                    section.desired_replicas
                ),
            },
        }
    } else {
        Verdict {
            healthy: true,
            reason: "Healthy",
            message: format!("all {} replicas ready", section.desired_replicas),
        }
    };
    (section, verdict)
}

/// When the app's newest successful backup (or, before the first, the app's creation)
/// becomes older than the maximum age: the instant the verdict flips by time alone.
/// `None` when the app has no backups or no maximum.
pub fn backup_deadline(app: &StatefulApp, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
    app.spec.backup.as_ref()?;
    let max = chrono::Duration::from_std(max_backup_age(app, now)?).ok()?;
    let since = last_success(app).or_else(|| {
        app.metadata
            .creation_timestamp
            .as_ref()
            .map(stateward_runtime::time::to_chrono)
    })?;
    Some(since + max)
}

/// Completion time of the newest successful backup, as the backup controller records it.
fn last_success(app: &StatefulApp) -> Option<DateTime<Utc>> {
    app.status
        .as_ref()
        .and_then(|s| s.backup.as_ref())
        .and_then(|b| b.last_successful_time.as_deref())
        .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
        .map(|t| t.with_timezone(&Utc))
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// The same maximum age the backup controller's `BackupsHealthy` uses.
pub fn max_backup_age(app: &StatefulApp, now: DateTime<Utc>) -> Option<Duration> {
    let schedules = app
        .spec
        .backup
        .as_ref()
        .map(|b| b.schedules.as_slice())
        .unwrap_or_default();
    let refs = schedules.iter().map(|s| ScheduleRef {
        cron: &s.cron,
        time_zone: s.time_zone.as_deref(),
        suspended: s.suspend,
    });
    let explicit = app
        .spec
        .monitoring
        .as_ref()
        .and_then(|m| m.backup_max_age.as_deref());
    backup_max_age(explicit, refs, now)
}

fn human(seconds: u64) -> String {
    match seconds {
        s if s >= 86_400 => format!("{}d{}h", s / 86_400, (s % 86_400) / 3600),
        s if s >= 3600 => format!("{}h{}m", s / 3600, (s % 3600) / 60),
        s if s >= 60 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_mark_changes_and_a_missing_statefulset_once() {
        let verdict = |healthy, reason| Verdict {
            healthy,
            reason,
            message: String::new(),
        };
        // (previous Healthy status and reason, verdict, expected (warning?, reason)).
        type Row<'a> = (Option<(&'a str, &'a str)>, Verdict, Option<(bool, &'a str)>);
        let rows: [Row; 8] = [
            // First assessment: healthy or not yet ready says nothing.
            (None, verdict(true, "Healthy"), None),
            (None, verdict(false, "PodsNotReady"), None),
            // First assessment of a missing StatefulSet: a Warning at once.
            (None, verdict(false, MISSING_SET), Some((true, MISSING_SET))),
            // Still missing: said once.
            (
                Some(("False", MISSING_SET)),
                verdict(false, MISSING_SET),
                None,
            ),
            // Went missing from unhealthy for another reason: said.
            (
                Some(("False", "PodsNotReady")),
                verdict(false, MISSING_SET),
                Some((true, MISSING_SET)),
            ),
            // Changes of health either way.
            (
                Some(("True", "Healthy")),
                verdict(false, "PodsNotReady"),
                Some((true, "Unhealthy")),
            ),
            (
                Some(("False", MISSING_SET)),
                verdict(true, "Healthy"),
                Some((false, "Healthy")),
            ),
            // No change.
            (Some(("True", "Healthy")), verdict(true, "Healthy"), None),
        ];
        for (was, verdict, want) in rows {
            assert_eq!(event_for(was, &verdict), want, "{was:?} -> {verdict:?}");
        }
    }

    fn yaml<T: serde::de::DeserializeOwned>(text: &str) -> T {
        serde_yaml::from_str(text).unwrap()
    }

    fn pod(name: &str, ready: bool, waiting: Option<&str>) -> Pod {
        let state = match waiting {
            Some(reason) => format!("{{waiting: {{reason: {reason}}}}}"),
            None => "{running: {}}".into(),
        };
        yaml(&format!(
            "metadata: {{name: {name}}}\nstatus: {{phase: Running, conditions: [{{type: Ready, status: \"{}\"}}], containerStatuses: [{{name: main, ready: {ready}, restartCount: 0, image: x, imageID: x, state: {state}}}]}}",
            if ready { "True" } else { "False" }
        ))
    }

    fn app(extra: &str, last_backup: Option<&str>) -> StatefulApp {
        let status = last_backup
            .map(|t| format!("\nstatus: {{backup: {{lastSuccessfulTime: \"{t}\"}}}}"))
            .unwrap_or_default();
        yaml(&format!(
            "apiVersion: stateward.io/v1alpha1\nkind: StatefulApp\nmetadata: {{name: db, generation: 3}}\nspec: {{statefulSetName: db{extra}}}{status}"
        ))
    }

    fn sts(replicas: i32) -> StatefulSet {
        yaml(&format!(
            "metadata: {{name: db}}\nspec: {{replicas: {replicas}, serviceName: db, selector: {{}}, template: {{}}}}"
        ))
    }

    fn now() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-12-01T12:00:00Z")
            .unwrap()
            .with_timezone(&Utc)
    }

    #[test]
    fn an_unready_pod_is_named_with_its_reason() {
        let pods = [
            pod("db-0", true, None),
            pod("db-1", false, Some("CrashLoopBackOff")),
        ];
        let (section, verdict) = assess(&app("", None), Some(&sts(2)), &pods, &[], now());
        assert_eq!((section.desired_replicas, section.ready_replicas), (2, 1));
        assert!(!verdict.healthy);
        assert_eq!(verdict.reason, "ReplicasNotReady");
        assert!(
            verdict
                .message
                .contains("db-1 (container main waiting: CrashLoopBackOff)"),
            "{}",
            verdict.message
        );
    }

    #[test]
    fn a_missing_replica_counts_even_without_a_pod() {
        let (_, verdict) = assess(
            &app("", None),
            Some(&sts(3)),
            &[pod("db-0", true, None)],
            &[],
            now(),
        );
        assert_eq!(
            (verdict.healthy, verdict.message.as_str()),
            (false, "1 of 3 replicas ready")
        );
    }

    #[test]
    fn backup_age_uses_the_same_maximum_as_the_backup_controller() {
        let backed = ", backup: {repository: r}, monitoring: {backupMaxAge: 26h}";
        let fresh = app(backed, Some("2026-12-01T02:00:00Z"));
        let (section, verdict) = assess(
            &fresh,
            Some(&sts(1)),
            &[pod("db-0", true, None)],
            &[],
            now(),
        );
        assert!(verdict.healthy, "{verdict:?}");
        assert_eq!(
            verdict.message,
            "all 1 replicas ready; newest backup completed at 2026-12-01T02:00:00Z, the next is \
             due by 2026-12-02T04:00:00Z (allowed age 1d2h)"
        );
        assert_eq!(section.backup_max_age_seconds, Some(26 * 3600));
        // The controller wakes when the verdict would flip by time alone.
        assert_eq!(
            backup_deadline(&fresh, now()).map(rfc3339).as_deref(),
            Some("2026-12-02T04:00:00Z")
        );
        let (_, later) = assess(
            &fresh,
            Some(&sts(1)),
            &[pod("db-0", true, None)],
            &[],
            now() + chrono::Duration::hours(17),
        );
        assert_eq!(later.reason, "BackupTooOld", "{later:?}");
        let stale = app(backed, Some("2026-11-29T12:00:00Z"));
        let (_, verdict) = assess(
            &stale,
            Some(&sts(1)),
            &[pod("db-0", true, None)],
            &[],
            now(),
        );
        assert_eq!(verdict.reason, "BackupTooOld");
        // Without an explicit maximum: twice the nightly schedule's gap (48h).
        let nightly = app(
            ", backup: {repository: r, schedules: [{name: n, cron: \"0 2 * * *\", retention: {keepLast: 3}}]}",
            Some("2026-11-29T13:00:00Z"),
        );
        let (section, verdict) = assess(
            &nightly,
            Some(&sts(1)),
            &[pod("db-0", true, None)],
            &[],
            now(),
        );
        assert_eq!(section.backup_max_age_seconds, Some(48 * 3600));
        assert!(verdict.healthy, "47h old, 48h allowed: {verdict:?}");
    }

    #[test]
    fn no_statefulset_is_unhealthy() {
        let (_, verdict) = assess(&app("", None), None, &[], &[], now());
        assert_eq!(verdict.reason, "StatefulSetNotFound");
    }
}
