//! Server-side apply with one field manager per controller. Status patches carry
//! `apiVersion` and `kind`, as server-side apply requires.

use kube::api::{Patch, PatchParams};
use kube::{Api, Resource};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// The field managers, one per controller: no two controllers write the same field.
pub mod managers {
    pub const BACKUP: &str = "stateward-backup";
    pub const RESTORE: &str = "stateward-restore";
    pub const SCALING: &str = "stateward-scaling";
    pub const MONITORING: &str = "stateward-monitoring";
}

fn params(manager: &str) -> PatchParams {
    // force: the controller owns its fields; a conflicting human edit is overwritten by
    // design (the spec is the place to change behaviour).
    PatchParams::apply(manager).force()
}

/// Applies `body` (a full object with apiVersion/kind/metadata.name) as `manager`.
pub async fn apply<K>(
    api: &Api<K>,
    name: &str,
    manager: &str,
    body: &(impl Serialize + std::fmt::Debug),
) -> Result<K, kube::Error>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug,
{
    api.patch(name, &params(manager), &Patch::Apply(body)).await
}

/// Applies a status fragment (`{"conditions": [...], "backup": {...}}`) as `manager`.
pub async fn apply_status<K>(
    api: &Api<K>,
    name: &str,
    manager: &str,
    status: serde_json::Value,
) -> Result<K, kube::Error>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug,
{
    let body = status_patch::<K>(name, status);
    api.patch_status(name, &params(manager), &Patch::Apply(&body))
        .await
}

/// What one field manager writes in an object's status: the top-level keys (its section,
/// `replicas`, ...) and the condition types. Knowing them lets a controller see that an
/// apply would change nothing, including when it stops setting something it used to set
/// (server-side apply would then remove it).
#[derive(Debug, Clone, Copy)]
pub struct StatusFields {
    pub keys: &'static [&'static str],
    pub conditions: &'static [&'static str],
}

/// Applies `status` only when it differs from `current` (the status as last read, from
/// the cache or fresh): an idle controller writes nothing. Returns the object as written,
/// or `None` when nothing needed writing.
pub async fn apply_status_if_changed<K>(
    api: &Api<K>,
    name: &str,
    manager: &str,
    owned: &StatusFields,
    current: Option<&impl Serialize>,
    status: serde_json::Value,
) -> Result<Option<K>, kube::Error>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug,
{
    let current = current.and_then(|c| serde_json::to_value(c).ok());
    if !status_changes(current.as_ref(), &status, owned) {
        return Ok(None);
    }
    apply_status(api, name, manager, status).await.map(Some)
}

/// Whether applying `fragment` (the whole of what `owned` describes) would change
/// `current`. Absent, null and empty values are the same (status types skip empty
/// fields when they serialize, the API server drops nulls).
pub fn status_changes(
    current: Option<&serde_json::Value>,
    fragment: &serde_json::Value,
    owned: &StatusFields,
) -> bool {
    use serde_json::Value;
    let empty = Value::Null;
    let current = current.unwrap_or(&empty);
    for key in owned.keys {
        if normalized(&current[*key]) != normalized(&fragment[*key]) {
            return true;
        }
    }
    let conditions = |v: &Value| -> Vec<Value> {
        v["conditions"]
            .as_array()
            .map(|list| {
                let mut ours: Vec<Value> = list
                    .iter()
                    .filter(|c| {
                        c["type"]
                            .as_str()
                            .is_some_and(|t| owned.conditions.contains(&t))
                    })
                    .map(normalized)
                    .collect();
                ours.sort_by(|a, b| a["type"].as_str().cmp(&b["type"].as_str()));
                ours
            })
            .unwrap_or_default()
    };
    conditions(current) != conditions(fragment)
}

/// Drops nulls and empty arrays and objects, recursively.
fn normalized(value: &serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    let is_empty = |v: &Value| match v {
        Value::Null => true,
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        _ => false,
    };
    match value {
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| (k.clone(), normalized(v)))
                .filter(|(_, v)| !is_empty(v))
                .collect(),
        ),
        Value::Array(list) => Value::Array(list.iter().map(normalized).collect()),
        other => other.clone(),
    }
}

/// The body of a status apply: apiVersion, kind, name and the status.
pub fn status_patch<K: Resource<DynamicType = ()>>(
    name: &str,
    status: serde_json::Value,
) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "metadata": { "name": name },
        "status": status,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::Pod;

    #[test]
    fn an_apply_that_changes_nothing_is_seen_as_such() {
        use serde_json::json;
        let owned = StatusFields {
            keys: &["scaling", "replicas"],
            conditions: &["Scaling", "ScalingBlocked"],
        };
        let condition = |t: &str, status: &str, message: &str| {
            json!({"type": t, "status": status, "reason": "R", "message": message,
                   "lastTransitionTime": "2026-12-03T10:00:00Z", "observedGeneration": 2})
        };
        let stored = json!({
            "replicas": 2,
            "scaling": {"observedGeneration": 2, "phase": "Steady", "pendingResize": []},
            "health": {"readyReplicas": 1},
            "conditions": [condition("Healthy", "True", "other writer"),
                           condition("ScalingBlocked", "False", ""),
                           condition("Scaling", "True", "ok")],
        });
        let same = json!({
            "replicas": 2,
            "scaling": {"observedGeneration": 2, "phase": "Steady", "storageSize": null},
            "conditions": [condition("Scaling", "True", "ok"), condition("ScalingBlocked", "False", "")],
        });
        let rows: [(&str, Option<&serde_json::Value>, serde_json::Value, bool); 7] = [
            (
                "the same, in another order, empties and nulls aside",
                Some(&stored),
                same.clone(),
                false,
            ),
            ("nothing stored yet", None, same.clone(), true),
            (
                "a section field moved",
                Some(&stored),
                {
                    let mut v = same.clone();
                    v["scaling"]["phase"] = json!("ScalingUp");
                    v
                },
                true,
            ),
            (
                "a condition's message changed",
                Some(&stored),
                {
                    let mut v = same.clone();
                    v["conditions"][0]["message"] = json!("other");
                    v
                },
                true,
            ),
            (
                "a key no longer set (the apply would remove it)",
                Some(&stored),
                {
                    let mut v = same.clone();
                    v.as_object_mut().map(|o| o.remove("replicas"));
                    v
                },
                true,
            ),
            (
                "an owned condition no longer set",
                Some(&stored),
                {
                    let mut v = same.clone();
                    v["conditions"] = json!([condition("Scaling", "True", "ok")]);
                    v
                },
                true,
            ),
            (
                "another writer's fields are not ours to compare",
                Some(&{
                    let mut v = stored.clone();
                    v["health"]["readyReplicas"] = json!(0);
                    v["conditions"][0]["status"] = json!("False");
                    v
                }),
                same.clone(),
                false,
            ),
        ];
        for (what, current, fragment, changes) in rows {
            assert_eq!(
                status_changes(current, &fragment, &owned),
                changes,
                "{what}"
            );
        }
    }

    #[test]
    fn status_patches_name_their_kind() {
        let p = status_patch::<Pod>("p", serde_json::json!({"phase": "Running"}));
        assert_eq!(p["apiVersion"], "v1");
        assert_eq!(p["kind"], "Pod");
        assert_eq!(p["status"]["phase"], "Running");
    }
}
