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
    fn status_patches_name_their_kind() {
        let p = status_patch::<Pod>("p", serde_json::json!({"phase": "Running"}));
        assert_eq!(p["apiVersion"], "v1");
        assert_eq!(p["kind"], "Pod");
        assert_eq!(p["status"]["phase"], "Running");
    }
}
