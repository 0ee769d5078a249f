//! Pure decisions of the scaling controller: the target after clamping, and the names of
//! a replica's pod and claims.

use k8s_openapi::api::apps::v1::StatefulSet;

/// The replica count to move to, and why it differs from the request, if it does.
pub fn clamp(requested: i32, min: Option<i32>, max: Option<i32>) -> (i32, Option<String>) {
    let low = min.unwrap_or(0).max(0);
    let high = max.unwrap_or(i32::MAX).max(low);
    let target = requested.clamp(low, high);
    let why = if target > requested {
        Some(format!(
            "{requested} replicas requested, below minReplicas {low}: holding at {target}"
        ))
    } else if target < requested {
        Some(format!(
            "{requested} replicas requested, above maxReplicas {high}: holding at {target}"
        ))
    } else {
        None
    };
    (target, why)
}

/// The pod of ordinal `ordinal`.
pub fn pod_name(sts: &StatefulSet, ordinal: i32) -> String {
    format!(
        "{}-{ordinal}",
        sts.metadata.name.as_deref().unwrap_or_default()
    )
}

/// The claims the StatefulSet gives ordinal `ordinal`: `<template>-<sts>-<ordinal>`.
pub fn claim_names(sts: &StatefulSet, ordinal: i32) -> Vec<String> {
    let name = sts.metadata.name.as_deref().unwrap_or_default();
    sts.spec
        .as_ref()
        .and_then(|s| s.volume_claim_templates.as_ref())
        .map(|templates| {
            templates
                .iter()
                .filter_map(|t| t.metadata.name.as_deref())
                .map(|t| format!("{t}-{name}-{ordinal}"))
                .collect()
        })
        .unwrap_or_default()
}

/// The ordinal of a pod of this StatefulSet, from its name.
pub fn ordinal_of(sts: &StatefulSet, pod: &str) -> Option<i32> {
    let prefix = format!("{}-", sts.metadata.name.as_deref().unwrap_or_default());
    pod.strip_prefix(&prefix)?.parse().ok()
}

pub use stateward_runtime::quantity::quantity_bytes;

/// A size as a quantity, rounded up to whole MiB (what volumes are sized in).
pub fn quantity_of(bytes: u64) -> String {
    const MI: u64 = 1024 * 1024;
    let mib = bytes.div_ceil(MI);
    if mib.is_multiple_of(1024) && mib > 0 {
        format!("{}Gi", mib / 1024)
    } else {
        format!("{mib}Mi")
    }
}

/// The next size of an auto-expanding volume: `increment_percent` more than `current`,
/// never above `max`; `None` when already at `max`.
pub fn grown(current: u64, increment_percent: i32, max: u64) -> Option<u64> {
    if current >= max {
        return None;
    }
    let step = current.saturating_mul(u64::try_from(increment_percent.max(1)).unwrap_or(1)) / 100;
    Some(current.saturating_add(step.max(1)).min(max))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clamps_to_bounds_and_says_why() {
        assert_eq!(clamp(3, Some(1), Some(5)), (3, None));
        let (target, why) = clamp(7, Some(1), Some(5));
        assert_eq!(target, 5);
        assert!(why.is_some_and(|w| w.contains("maxReplicas 5")));
        let (target, why) = clamp(0, Some(2), None);
        assert_eq!(target, 2);
        assert!(why.is_some_and(|w| w.contains("minReplicas 2")));
        assert_eq!(clamp(-1, None, None).0, 0);
    }

    #[test]
    fn names_follow_the_statefulset_controller() {
        let sts: StatefulSet = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "pg"},
            "spec": {
                "selector": {}, "serviceName": "pg",
                "template": {},
                "volumeClaimTemplates": [{"metadata": {"name": "data"}}, {"metadata": {"name": "wal"}}]
            }
        }))
        .unwrap_or_default();
        assert_eq!(pod_name(&sts, 3), "pg-3");
        assert_eq!(claim_names(&sts, 3), vec!["data-pg-3", "wal-pg-3"]);
        assert_eq!(ordinal_of(&sts, "pg-12"), Some(12));
        assert_eq!(ordinal_of(&sts, "pgx-1"), None);
    }

    #[test]
    fn quantities() {
        assert_eq!(quantity_bytes("16Mi"), Some(16 * 1024 * 1024));
        assert_eq!(quantity_bytes("1.5Gi"), Some(1536 * 1024 * 1024));
        assert_eq!(quantity_bytes("2G"), Some(2_000_000_000));
        assert_eq!(quantity_bytes("1000"), Some(1000));
        assert_eq!(quantity_bytes("12Xi"), None);
        assert_eq!(quantity_of(16 * 1024 * 1024), "16Mi");
        assert_eq!(quantity_of(2 * 1024 * 1024 * 1024), "2Gi");
        assert_eq!(quantity_of(1), "1Mi");
        let mi = 1024 * 1024;
        assert_eq!(grown(100 * mi, 25, 200 * mi), Some(125 * mi));
        assert_eq!(grown(180 * mi, 25, 200 * mi), Some(200 * mi));
        assert_eq!(grown(200 * mi, 25, 200 * mi), None);
    }
}
