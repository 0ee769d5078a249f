//! Whether an agent Job's pod ever starts. A Job has no condition for "pod creation
//! refused": when admission (Pod Security, a quota, a missing ServiceAccount) refuses its
//! pod, the Job controller only records `FailedCreate` events and retries forever; an
//! unschedulable pod waits forever too. The backup and restore controllers observe those
//! signals into [`Signals`], and [`decide`] turns them into a bounded wait: after
//! `bound` without a started pod the operation fails with a reason naming the cause.

use std::time::Duration;

use chrono::{DateTime, Utc};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Event, Pod};
use kube::api::ListParams;
use kube::{Api, ResourceExt};

use crate::time;

/// The controller's own clock at a Job's creation, on the Job: the bound is measured on
/// one clock (the API server's `creationTimestamp` is another machine's, and tests move
/// the controller's).
pub const CREATED_AT_ANNOTATION: &str = "stateward.io/created-at";

/// What the cluster says about an agent Job that has not finished.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Signals {
    /// When the Job was created (by the controller's clock when it stamped the Job).
    pub created: DateTime<Utc>,
    /// When its last failed pod ended: a replacement pod's wait starts there.
    pub last_ended: Option<DateTime<Utc>>,
    /// A pod of the Job runs or succeeded (a failed pod does not count: its replacement
    /// may be the one refused).
    pub started: bool,
    /// The newest `FailedCreate` event's message: the pod was refused by the API server.
    pub refused: Option<String>,
    /// `PodScheduled=False` with reason `Unschedulable`: the scheduler's message.
    pub unschedulable: Option<String>,
    /// A container waiting for a reason other than `ContainerCreating` (an image pull that
    /// fails, a missing Secret or ConfigMap): `<reason>: <message>`.
    pub waiting: Option<String>,
}

/// The verdict on a Job that has not finished.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentStart {
    /// Its pod runs (or ran): the agent's own result decides from here.
    Started,
    /// Not started yet; `reason`/`message` say what it waits for, `until` when waiting
    /// ends in failure.
    Waiting {
        reason: &'static str,
        message: String,
        until: DateTime<Utc>,
    },
    /// Not started within the bound: the operation fails with this reason.
    Failed {
        reason: &'static str,
        message: String,
    },
}

impl AgentStart {
    /// The reason and message of a wait or a failure.
    pub fn describe(&self) -> Option<(&'static str, &str)> {
        match self {
            Self::Started => None,
            Self::Waiting {
                reason, message, ..
            }
            | Self::Failed { reason, message } => Some((reason, message.as_str())),
        }
    }
}

/// The default bound on an agent pod that does not start (`--agent-start-timeout`).
pub const DEFAULT_BOUND: Duration = Duration::from_secs(180);

/// Decides from the signals: started, still waiting (and for what), or failed.
pub fn decide(signals: &Signals, now: DateTime<Utc>, bound: Duration) -> AgentStart {
    if signals.started {
        return AgentStart::Started;
    }
    let since = signals
        .last_ended
        .map_or(signals.created, |e| e.max(signals.created));
    let until = since + chrono::Duration::from_std(bound).unwrap_or_default();
    let (reason, cause) = if let Some(message) = &signals.refused {
        (
            "AgentPodRefused",
            format!("the API server refused the agent pod: {message}"),
        )
    } else if let Some(message) = &signals.unschedulable {
        (
            "AgentUnschedulable",
            format!("the agent pod cannot be scheduled: {message}"),
        )
    } else if let Some(message) = &signals.waiting {
        (
            "AgentNotStarted",
            format!("the agent pod is waiting: {message}"),
        )
    } else {
        (
            "AgentNotStarted",
            "waiting for the agent pod to start".to_string(),
        )
    };
    let seconds = bound.as_secs();
    if now >= until {
        AgentStart::Failed {
            reason,
            message: format!("{cause} (no agent pod started within {seconds} s)"),
        }
    } else {
        AgentStart::Waiting {
            reason,
            message: format!(
                "{cause}; the operation fails at {} unless it starts",
                time::rfc3339(until)
            ),
            until,
        }
    }
}

/// Reads the signals of an unfinished Job: its pods, and (only while it has none) its
/// `FailedCreate` events.
pub async fn observe(client: &kube::Client, job: &Job) -> Result<Signals, kube::Error> {
    let ns = job.namespace().unwrap_or_default();
    let stamped = job
        .annotations()
        .get(CREATED_AT_ANNOTATION)
        .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
        .map(|t| t.with_timezone(&Utc));
    let created = stamped
        .or_else(|| {
            job.metadata
                .creation_timestamp
                .as_ref()
                .map(time::to_chrono)
        })
        .unwrap_or_default();
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let pods = pods
        .list(&ListParams::default().labels(&format!("job-name={}", job.name_any())))
        .await?
        .items;
    let mut signals = pod_signals(&pods);
    signals.created = created;
    let live = pods.iter().any(|p| {
        matches!(
            p.status.as_ref().and_then(|s| s.phase.as_deref()),
            Some("Pending" | "Running")
        )
    });
    if !live {
        let events: Api<Event> = Api::namespaced(client.clone(), &ns);
        let uid = job.uid().unwrap_or_default();
        let list = events
            .list(
                &ListParams::default()
                    .fields(&format!("involvedObject.uid={uid},reason=FailedCreate")),
            )
            .await?;
        signals.refused = list
            .items
            .iter()
            // Events written through events.k8s.io carry eventTime, not lastTimestamp.
            .max_by_key(|e| {
                e.last_timestamp
                    .as_ref()
                    .map(time::to_chrono)
                    .or_else(|| e.event_time.as_ref().map(|t| time::from_jiff(t.0)))
                    .or_else(|| e.metadata.creation_timestamp.as_ref().map(time::to_chrono))
                    .unwrap_or_default()
            })
            .and_then(|e| e.message.clone());
    }
    Ok(signals)
}

/// The pods' part of the signals.
pub fn pod_signals(pods: &[Pod]) -> Signals {
    let mut signals = Signals::default();
    for pod in pods {
        let Some(status) = &pod.status else { continue };
        let containers = status.container_statuses.iter().flatten();
        if status.phase.as_deref() == Some("Failed") {
            let ended = containers
                .clone()
                .filter_map(|c| c.state.as_ref()?.terminated.as_ref()?.finished_at.as_ref())
                .map(time::to_chrono)
                .max();
            signals.last_ended = signals.last_ended.max(ended);
            continue;
        }
        let runs = matches!(status.phase.as_deref(), Some("Running" | "Succeeded"))
            || containers.clone().any(|c| {
                c.state
                    .as_ref()
                    .is_some_and(|s| s.running.is_some() || s.terminated.is_some())
            });
        if runs {
            signals.started = true;
        }
        for condition in status.conditions.iter().flatten() {
            if condition.type_ == "PodScheduled"
                && condition.status == "False"
                && condition.reason.as_deref() == Some("Unschedulable")
            {
                signals.unschedulable = Some(condition.message.clone().unwrap_or_default());
            }
        }
        for c in containers {
            if let Some(waiting) = c.state.as_ref().and_then(|s| s.waiting.as_ref())
                && let Some(reason) = waiting.reason.as_deref()
                && reason != "ContainerCreating"
            {
                signals.waiting = Some(format!(
                    "{reason}: {}",
                    waiting.message.clone().unwrap_or_default()
                ));
            }
        }
    }
    signals
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + seconds, 0).unwrap_or_default()
    }

    fn pod(yaml: &str) -> Pod {
        serde_yaml::from_str(yaml).unwrap_or_else(|e| panic!("fixture: {e}"))
    }

    #[test]
    fn an_agent_that_does_not_start_fails_after_the_bound_naming_the_cause() {
        let bound = Duration::from_secs(60);
        let base = Signals {
            created: at(0),
            ..Signals::default()
        };
        type Row = (&'static str, Signals, i64, Option<&'static str>, bool);
        // (case, signals, now, expected reason (None: started), failed)
        let rows: Vec<Row> = vec![
            (
                "started",
                Signals {
                    started: true,
                    refused: Some("old".into()),
                    ..base.clone()
                },
                500,
                None,
                false,
            ),
            (
                "refused, within the bound",
                Signals {
                    refused: Some("pods \"x\" is forbidden: violates PodSecurity".into()),
                    ..base.clone()
                },
                30,
                Some("AgentPodRefused"),
                false,
            ),
            (
                "refused, past the bound",
                Signals {
                    refused: Some("exceeded quota: tiny".into()),
                    ..base.clone()
                },
                60,
                Some("AgentPodRefused"),
                true,
            ),
            (
                "unschedulable",
                Signals {
                    unschedulable: Some("0/1 nodes are available".into()),
                    ..base.clone()
                },
                61,
                Some("AgentUnschedulable"),
                true,
            ),
            (
                "image pull failing",
                Signals {
                    waiting: Some("ImagePullBackOff: no such image".into()),
                    ..base.clone()
                },
                90,
                Some("AgentNotStarted"),
                true,
            ),
            (
                "nothing yet",
                base.clone(),
                10,
                Some("AgentNotStarted"),
                false,
            ),
        ];
        for (case, signals, now, reason, failed) in rows {
            let verdict = decide(&signals, at(now), bound);
            assert_eq!(verdict.describe().map(|(r, _)| r), reason, "{case}");
            assert_eq!(
                matches!(verdict, AgentStart::Failed { .. }),
                failed,
                "{case}"
            );
            if let Some((_, message)) = verdict.describe() {
                for said in [&signals.refused, &signals.unschedulable, &signals.waiting]
                    .into_iter()
                    .flatten()
                {
                    assert!(message.contains(said.as_str()), "{case}: {message}");
                }
            }
        }
    }

    #[test]
    fn pods_say_whether_the_agent_started_or_why_not() {
        let unschedulable = pod(
            "metadata: {name: a}\nstatus: {phase: Pending, conditions: [{type: PodScheduled, status: 'False', reason: Unschedulable, message: '0/1 nodes are available: insufficient cpu'}]}",
        );
        let s = pod_signals(&[unschedulable]);
        assert!(!s.started);
        assert_eq!(
            s.unschedulable.as_deref(),
            Some("0/1 nodes are available: insufficient cpu")
        );
        let pulling = pod(
            "metadata: {name: a}\nstatus: {phase: Pending, containerStatuses: [{name: agent, image: i, imageID: '', ready: false, restartCount: 0, state: {waiting: {reason: ErrImagePull, message: nope}}}]}",
        );
        assert_eq!(
            pod_signals(&[pulling]).waiting.as_deref(),
            Some("ErrImagePull: nope")
        );
        let creating = pod(
            "metadata: {name: a}\nstatus: {phase: Pending, containerStatuses: [{name: agent, image: i, imageID: '', ready: false, restartCount: 0, state: {waiting: {reason: ContainerCreating}}}]}",
        );
        assert_eq!(pod_signals(&[creating]).waiting, None);
        let running = pod("metadata: {name: a}\nstatus: {phase: Running}");
        assert!(pod_signals(&[running]).started);
        // A failed pod is not a start: its replacement may be the one refused, and the
        // wait for it counts from the failure.
        let failed = pod(
            "metadata: {name: a}\nstatus: {phase: Failed, containerStatuses: [{name: agent, image: i, imageID: '', ready: false, restartCount: 0, state: {terminated: {exitCode: 1, finishedAt: '2027-01-15T08:00:00Z'}}}]}",
        );
        let s = pod_signals(&[failed]);
        assert!(!s.started);
        assert_eq!(
            s.last_ended.map(|t| t.to_rfc3339()).as_deref(),
            Some("2027-01-15T08:00:00+00:00")
        );
        let bound = Duration::from_secs(60);
        let replaced = Signals {
            created: at(0),
            last_ended: Some(at(100)),
            refused: Some("quota".into()),
            ..Signals::default()
        };
        assert!(matches!(
            decide(&replaced, at(150), bound),
            AgentStart::Waiting { .. }
        ));
        assert!(matches!(
            decide(&replaced, at(160), bound),
            AgentStart::Failed { .. }
        ));
    }
}
