//! Where a hook stands in a run, so that it runs at most once per pod: the run records
//! `started` before each exec and `finished` after it, in the run's pod order. A hook
//! that was started and never recorded (the manager died during the exec) is counted as
//! failed, per its `onError`, and never run again: a second `FLUSH TABLES` or a second
//! "notify" is worse than a failed backup. One result per hook, whatever the replicas.

use stateward_api::backup::{HookResult, HookStage};
use stateward_api::statefulapp::OnError;

/// How many failing pods a result names (it counts them all).
const NAMED_FAILURES: usize = 10;

/// The message of a hook interrupted by a restart of the manager.
pub const INTERRUPTED: &str =
    "the manager stopped while this hook ran; it is not run again (at most once)";

/// The one next thing to do for a hook in a stage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HookStep {
    /// Run it in this pod (record the start first).
    Run(String),
    /// It was started in this pod and never recorded: count it as failed.
    Interrupted(String),
    /// Nothing left; `stop` when the run must stop (a failure with `onError: Fail`).
    Done { stop: bool },
}

/// Decides from the recorded result (if any) and the run's pods.
pub fn next(result: Option<&HookResult>, pods: &[String], on_error: OnError) -> HookStep {
    let (started, finished, failed) = result
        .map(|r| (r.started, r.finished, r.failed_count))
        .unwrap_or_default();
    let at = |i: i32| pods.get(usize::try_from(i).unwrap_or(usize::MAX)).cloned();
    if finished < started
        && let Some(pod) = at(finished)
    {
        return HookStep::Interrupted(pod);
    }
    if failed > 0 && on_error == OnError::Fail {
        return HookStep::Done { stop: true };
    }
    match at(finished.max(started)) {
        Some(pod) => HookStep::Run(pod),
        None => HookStep::Done { stop: false },
    }
}

/// The result entry of `name` in `stage`, created when missing.
pub fn entry<'a>(
    hooks: &'a mut Vec<HookResult>,
    stage: HookStage,
    name: &str,
    pods: usize,
) -> &'a mut HookResult {
    let index = match hooks
        .iter()
        .position(|h| h.stage == stage && h.name == name)
    {
        Some(i) => i,
        None => {
            hooks.push(HookResult {
                stage,
                name: name.to_string(),
                succeeded: true,
                pods: i32::try_from(pods).unwrap_or(i32::MAX),
                ..Default::default()
            });
            hooks.len() - 1
        }
    };
    &mut hooks[index]
}

/// Records that the hook is about to start in the next pod.
pub fn record_start(result: &mut HookResult) {
    result.started = result.finished + 1;
}

/// Records how the hook ended in `pod`.
pub fn record_end(result: &mut HookResult, pod: &str, outcome: Result<Option<String>, String>) {
    result.finished = result.started.max(result.finished + 1);
    match outcome {
        Ok(note) => {
            if result.message.is_none() {
                result.message = note;
            }
        }
        Err(message) => record_failure(result, pod, message),
    }
}

/// Records a failure in `pod` (also a held session that ended badly).
pub fn record_failure(result: &mut HookResult, pod: &str, message: String) {
    result.succeeded = false;
    result.failed_count += 1;
    if result.failed_pods.len() < NAMED_FAILURES {
        result.failed_pods.push(pod.to_string());
    }
    if result.failed_count == 1 || result.message.is_none() {
        result.message = Some(format!("{pod}: {message}"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pods() -> Vec<String> {
        ["db-0", "db-1", "db-2"].map(String::from).to_vec()
    }

    fn result(started: i32, finished: i32, failed: i32) -> HookResult {
        HookResult {
            stage: HookStage::Pre,
            name: "flush".into(),
            succeeded: failed == 0,
            pods: 3,
            started,
            finished,
            failed_count: failed,
            ..Default::default()
        }
    }

    #[test]
    fn a_hook_runs_once_per_pod_and_an_interrupted_one_counts_as_failed() {
        type Row = (&'static str, Option<HookResult>, OnError, HookStep);
        let run = |p: &str| HookStep::Run(p.into());
        let rows: Vec<Row> = vec![
            ("nothing yet", None, OnError::Fail, run("db-0")),
            (
                "one done",
                Some(result(1, 1, 0)),
                OnError::Fail,
                run("db-1"),
            ),
            (
                "started in db-1, never recorded",
                Some(result(2, 1, 0)),
                OnError::Fail,
                HookStep::Interrupted("db-1".into()),
            ),
            (
                "failed, onError Fail",
                Some(result(2, 2, 1)),
                OnError::Fail,
                HookStep::Done { stop: true },
            ),
            (
                "failed, onError Continue",
                Some(result(2, 2, 1)),
                OnError::Continue,
                run("db-2"),
            ),
            (
                "all done",
                Some(result(3, 3, 0)),
                OnError::Fail,
                HookStep::Done { stop: false },
            ),
        ];
        for (case, recorded, on_error, expected) in rows {
            assert_eq!(
                next(recorded.as_ref(), &pods(), on_error),
                expected,
                "{case}"
            );
        }
    }

    #[test]
    fn records_stay_one_entry_per_hook_and_name_the_failing_pods() {
        let mut hooks = Vec::new();
        let many: Vec<String> = (0..50).map(|i| format!("db-{i}")).collect();
        for pod in &many {
            for name in ["a", "b", "c", "d", "e", "f"] {
                let r = entry(&mut hooks, HookStage::Pre, name, many.len());
                record_start(r);
                let outcome = if pod.ends_with('7') {
                    Err("exit 1".to_string())
                } else {
                    Ok(None)
                };
                record_end(r, pod, outcome);
            }
        }
        assert_eq!(hooks.len(), 6, "one result per hook at 50 replicas");
        let a = &hooks[0];
        assert_eq!((a.started, a.finished, a.pods), (50, 50, 50));
        assert_eq!(a.failed_count, 5);
        assert_eq!(a.failed_pods, ["db-7", "db-17", "db-27", "db-37", "db-47"]);
        assert_eq!(a.message.as_deref(), Some("db-7: exit 1"));
        assert!(!a.succeeded);
    }
}
