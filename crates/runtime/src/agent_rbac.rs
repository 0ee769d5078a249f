//! Who the agents run as, and the only right any of them gets.
//!
//! - **Volume agents** (backup and restore of claims) run as `stateward-agent`, one
//!   ServiceAccount per namespace, with no API token mounted: they talk to S3, never to the
//!   API server. Every StatefulApp whose agents used it is one of its owners (none the
//!   controller), so the garbage collector deletes it when the last of them goes.
//! - **Exec agents** (a dump streamed out of, or a restore command streamed into, the
//!   app's pods) run as `stateward-exec-<statefulset>`, one ServiceAccount per StatefulSet,
//!   owned by the StatefulApp (garbage-collected with it). A RoleBinding gives it the
//!   chart's fixed ClusterRole `<release>-agent-exec` (`pods/exec`, nothing else) in that
//!   namespace; the chart's ValidatingAdmissionPolicy `<release>-agent-exec` narrows it to
//!   the pods of that StatefulSet (`<statefulset>-<ordinal>`), because RBAC alone cannot
//!   name pods that do not exist yet.
//!
//! The manager never creates or edits a Role: it binds the one fixed ClusterRole (its
//! `bind` right is limited to that name), so it cannot hand out anything else. The policy
//! reads the StatefulSet's name from the ServiceAccount's, which is why the name is never
//! shortened: `stateward-exec-` plus a StatefulSet name always fits a ServiceAccount name
//! (253 characters).

use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::rbac::v1::{PolicyRule, RoleBinding, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::Api;
use stateward_api::common::{MANAGED_BY_LABEL, MANAGED_BY_VALUE};

use crate::apply;

/// The volume agents' ServiceAccount (no token).
pub const VOLUME_AGENT_ACCOUNT: &str = "stateward-agent";

/// The prefix of an exec agent's ServiceAccount; the chart's policy matches on it.
pub const EXEC_ACCOUNT_PREFIX: &str = "stateward-exec-";

/// The fixed ClusterRole exec agents are bound to, as the chart names it for a release
/// called `stateward`; the chart passes its own name (`--agent-exec-cluster-role`).
pub const DEFAULT_EXEC_CLUSTER_ROLE: &str = "stateward-agent-exec";

/// The ServiceAccount of the agents that exec in StatefulSet `stateful_set`'s pods.
pub fn exec_account(stateful_set: &str) -> String {
    format!("{EXEC_ACCOUNT_PREFIX}{stateful_set}")
}

fn labels() -> std::collections::BTreeMap<String, String> {
    [(MANAGED_BY_LABEL.to_string(), MANAGED_BY_VALUE.to_string())].into()
}

/// The volume agents' ServiceAccount: no token is mounted in their pods.
pub fn volume_agent_service_account() -> ServiceAccount {
    ServiceAccount {
        metadata: ObjectMeta {
            name: Some(VOLUME_AGENT_ACCOUNT.into()),
            labels: Some(labels()),
            ..ObjectMeta::default()
        },
        automount_service_account_token: Some(false),
        ..ServiceAccount::default()
    }
}

/// An exec agent's ServiceAccount, owned by `owner` (the StatefulApp) when given.
pub fn exec_service_account(stateful_set: &str, owner: Option<OwnerReference>) -> ServiceAccount {
    ServiceAccount {
        metadata: ObjectMeta {
            name: Some(exec_account(stateful_set)),
            labels: Some(labels()),
            owner_references: owner.map(|o| vec![o]),
            ..ObjectMeta::default()
        },
        // Mounted only in the exec agents' pods (their Jobs ask for it).
        automount_service_account_token: Some(false),
        ..ServiceAccount::default()
    }
}

/// Binds `cluster_role` (the chart's fixed exec role) to the exec agent of `stateful_set`,
/// in the RoleBinding's namespace only.
pub fn exec_role_binding(
    namespace: &str,
    stateful_set: &str,
    cluster_role: &str,
    owner: Option<OwnerReference>,
) -> RoleBinding {
    RoleBinding {
        metadata: ObjectMeta {
            name: Some(exec_account(stateful_set)),
            labels: Some(labels()),
            owner_references: owner.map(|o| vec![o]),
            ..ObjectMeta::default()
        },
        role_ref: RoleRef {
            api_group: Some("rbac.authorization.k8s.io".into()),
            kind: "ClusterRole".into(),
            name: cluster_role.into(),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".into(),
            name: exec_account(stateful_set),
            namespace: Some(namespace.into()),
            ..Subject::default()
        }]),
    }
}

/// The rules of the fixed exec ClusterRole (the chart's `agent-exec.yaml` holds the same;
/// the chart test compares them). `create` is what a WebSocket exec is authorized as,
/// `get` what an SPDY one is.
pub fn exec_cluster_role_rules() -> Vec<PolicyRule> {
    vec![PolicyRule {
        api_groups: Some(vec![String::new()]),
        resources: Some(vec!["pods/exec".into()]),
        verbs: vec!["create".into(), "get".into()],
        ..PolicyRule::default()
    }]
}

/// Makes sure namespace `namespace` has the volume agents' ServiceAccount.
pub async fn ensure_volume_agent(
    client: &kube::Client,
    namespace: &str,
    app: Option<OwnerReference>,
    manager: &str,
) -> Result<(), kube::Error> {
    let api: Api<ServiceAccount> = Api::namespaced(client.clone(), namespace);
    let account = apply::apply(
        &api,
        VOLUME_AGENT_ACCOUNT,
        manager,
        &volume_agent_service_account(),
    )
    .await?;
    if let Some(patch) = app.and_then(|app| added_owner(&account, app)) {
        // A strategic merge of ownerReferences (merge key: uid) adds this app and keeps
        // the others; an apply would drop the ones this manager named before.
        api.patch(
            VOLUME_AGENT_ACCOUNT,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Strategic(patch),
        )
        .await?;
    }
    Ok(())
}

/// The patch that makes `app` one more owner of the shared `account`, unless it is one:
/// never the controller, never blocking the app's deletion.
fn added_owner(account: &ServiceAccount, app: OwnerReference) -> Option<serde_json::Value> {
    let owners = account
        .metadata
        .owner_references
        .as_deref()
        .unwrap_or_default();
    if owners.iter().any(|o| o.uid == app.uid) {
        return None;
    }
    let owner = OwnerReference {
        controller: None,
        block_owner_deletion: None,
        ..app
    };
    Some(serde_json::json!({"metadata": {"ownerReferences": [owner]}}))
}

/// Makes sure StatefulSet `stateful_set`'s exec agent has its ServiceAccount and its
/// RoleBinding to `cluster_role`; returns the ServiceAccount's name.
pub async fn ensure_exec_agent(
    client: &kube::Client,
    namespace: &str,
    stateful_set: &str,
    cluster_role: &str,
    owner: Option<OwnerReference>,
    manager: &str,
) -> Result<String, kube::Error> {
    let name = exec_account(stateful_set);
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), namespace);
    apply::apply(
        &accounts,
        &name,
        manager,
        &exec_service_account(stateful_set, owner.clone()),
    )
    .await?;
    let bindings: Api<RoleBinding> = Api::namespaced(client.clone(), namespace);
    apply::apply(
        &bindings,
        &name,
        manager,
        &exec_role_binding(namespace, stateful_set, cluster_role, owner),
    )
    .await?;
    Ok(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shared_volume_account_gains_each_app_as_a_non_controlling_owner_once() {
        let app = |uid: &str| OwnerReference {
            api_version: "stateward.io/v1alpha1".into(),
            kind: "StatefulApp".into(),
            name: format!("app-{uid}"),
            uid: uid.into(),
            controller: Some(true),
            block_owner_deletion: Some(true),
        };
        let mut account = volume_agent_service_account();
        let patch = added_owner(&account, app("a")).unwrap_or_default();
        let owner = &patch["metadata"]["ownerReferences"][0];
        assert_eq!(owner["uid"], "a");
        assert!(owner.get("controller").is_none() && owner.get("blockOwnerDeletion").is_none());
        account.metadata.owner_references = Some(vec![app("a")]);
        assert_eq!(added_owner(&account, app("a")), None, "already an owner");
        assert!(
            added_owner(&account, app("b")).is_some(),
            "a second app joins"
        );
    }

    #[test]
    fn exec_identity_names_its_statefulset_in_full() {
        let long = "a".repeat(63);
        for (sts, account) in [
            ("db", "stateward-exec-db".to_string()),
            (long.as_str(), format!("stateward-exec-{long}")),
        ] {
            assert_eq!(exec_account(sts), account);
            let binding = exec_role_binding("ns", sts, "r", None);
            assert_eq!(binding.metadata.name.as_deref(), Some(account.as_str()));
            let subjects = binding.subjects.unwrap_or_default();
            assert_eq!(subjects.len(), 1);
            assert_eq!(subjects[0].name, account);
            assert_eq!(subjects[0].kind, "ServiceAccount");
            assert_eq!(subjects[0].namespace.as_deref(), Some("ns"));
            assert_eq!(binding.role_ref.kind, "ClusterRole");
            assert_eq!(binding.role_ref.name, "r");
        }
    }

    #[test]
    fn no_agent_account_mounts_a_token_by_default() {
        assert_eq!(
            volume_agent_service_account().automount_service_account_token,
            Some(false)
        );
        assert_eq!(
            exec_service_account("db", None).automount_service_account_token,
            Some(false)
        );
    }

    #[test]
    fn the_exec_role_grants_exec_only() {
        let rules = exec_cluster_role_rules();
        assert_eq!(rules.len(), 1);
        assert_eq!(
            rules[0].resources.as_deref(),
            Some(&["pods/exec".to_string()][..])
        );
        assert_eq!(rules[0].resource_names, None);
    }
}
