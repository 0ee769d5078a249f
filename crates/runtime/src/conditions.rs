//! Conditions by the Kubernetes convention: `lastTransitionTime` changes only when the
//! status flips, `observedGeneration` says which spec the condition is about.

use chrono::{DateTime, Utc};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;

use crate::time::to_k8s_time;

/// Builds a condition; `set` fills in the transition time.
pub fn condition(
    type_: &str,
    status: bool,
    reason: &str,
    message: impl Into<String>,
    generation: Option<i64>,
) -> Condition {
    Condition {
        type_: type_.to_string(),
        status: if status { "True" } else { "False" }.to_string(),
        reason: reason.to_string(),
        message: message.into(),
        observed_generation: generation,
        last_transition_time: to_k8s_time(DateTime::<Utc>::UNIX_EPOCH),
    }
}

/// Merges `new` into `conditions`: replaces the condition of the same type, keeping its
/// `lastTransitionTime` unless the status changed (then it becomes `now`).
pub fn set(conditions: &mut Vec<Condition>, mut new: Condition, now: DateTime<Utc>) {
    match conditions.iter_mut().find(|c| c.type_ == new.type_) {
        Some(existing) => {
            new.last_transition_time = if existing.status == new.status {
                existing.last_transition_time.clone()
            } else {
                to_k8s_time(now)
            };
            *existing = new;
        }
        None => {
            new.last_transition_time = to_k8s_time(now);
            conditions.push(new);
        }
    }
}

/// The condition of a type, if present.
pub fn get<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

/// Whether the condition of a type is present and True.
pub fn is_true(conditions: &[Condition], type_: &str) -> bool {
    get(conditions, type_).is_some_and(|c| c.status == "True")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::time::to_chrono;
    use chrono::TimeZone;

    fn at(h: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 1, 1, h, 0, 0)
            .single()
            .unwrap_or_default()
    }

    #[test]
    fn transition_time_changes_only_when_the_status_flips() {
        let mut list = Vec::new();
        set(
            &mut list,
            condition("Ready", false, "Checking", "first", Some(1)),
            at(1),
        );
        assert_eq!(to_chrono(&list[0].last_transition_time), at(1));
        set(
            &mut list,
            condition("Ready", false, "StillChecking", "second", Some(2)),
            at(2),
        );
        assert_eq!(
            to_chrono(&list[0].last_transition_time),
            at(1),
            "same status keeps the time"
        );
        assert_eq!(list[0].reason, "StillChecking");
        assert_eq!(list[0].observed_generation, Some(2));
        set(
            &mut list,
            condition("Ready", true, "Reachable", "ok", Some(2)),
            at(3),
        );
        assert_eq!(
            to_chrono(&list[0].last_transition_time),
            at(3),
            "a flip moves the time"
        );
        set(&mut list, condition("Other", true, "X", "", None), at(4));
        assert_eq!(list.len(), 2);
        assert!(is_true(&list, "Ready") && is_true(&list, "Other") && !is_true(&list, "Missing"));
    }
}
