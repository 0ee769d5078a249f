//! What a backup run does, decided without a client: which pods and volumes it copies,
//! and the agent Jobs and RBAC objects it needs. Unit-tested from fixtures.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use kube::{Resource, ResourceExt};
use serde_json::json;
use stateward_agent::manifest;
use stateward_api::backup::Backup;
use stateward_api::common::{APP_LABEL, MANAGED_BY_LABEL, MANAGED_BY_VALUE};
use stateward_api::repository::BackupRepository;
use stateward_api::statefulapp::{BackupMethod, ExecSpec, Hooks, ReplicaSelection, StatefulApp};
use stateward_runtime::names;

/// Label on agent Jobs naming their Backup.
pub const BACKUP_LABEL: &str = "stateward.io/backup";
/// Label on agent Jobs (and their pods) carrying their Backup's uid.
pub const BACKUP_UID_LABEL: &str = "stateward.io/backup-uid";
/// `app.kubernetes.io/component` of agent Jobs.
pub const COMPONENT_LABEL: &str = "app.kubernetes.io/component";
pub const AGENT_COMPONENT: &str = "backup-agent";
/// Label with the node an agent Job is pinned to (for the per-node cap).
pub const NODE_LABEL: &str = "stateward.io/node";

/// A reason the run cannot start; it ends Failed with this reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    pub reason: &'static str,
    pub message: String,
}

fn invalid(reason: &'static str, message: impl Into<String>) -> Invalid {
    Invalid {
        reason,
        message: message.into(),
    }
}

/// The app's policy with the Backup's overrides applied.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub repository: String,
    pub method: BackupMethod,
    pub replicas: ReplicaSelection,
    pub exec: Option<ExecSpec>,
    pub hooks: Hooks,
    pub deadline_seconds: Option<i64>,
}

/// Merges the Backup's overrides into the app's backup policy.
pub fn settings(backup: &Backup, app: &StatefulApp) -> Result<Settings, Invalid> {
    let policy = app.spec.backup.clone();
    let repository = backup
        .spec
        .repository
        .clone()
        .or_else(|| policy.as_ref().map(|p| p.repository.clone()))
        .ok_or_else(|| {
            invalid(
                "NoRepository",
                format!(
                    "StatefulApp {} has no spec.backup.repository and the Backup names none",
                    app.name_any()
                ),
            )
        })?;
    let method = backup
        .spec
        .method
        .or(policy.as_ref().map(|p| p.method))
        .unwrap_or_default();
    let exec = policy.as_ref().and_then(|p| p.exec.clone());
    if method == BackupMethod::Exec && exec.as_ref().is_none_or(|e| e.command.is_empty()) {
        return Err(invalid(
            "NoExecCommand",
            format!(
                "method Exec needs spec.backup.exec.command on StatefulApp {}",
                app.name_any()
            ),
        ));
    }
    Ok(Settings {
        repository,
        method,
        replicas: backup
            .spec
            .replicas
            .or(policy.as_ref().map(|p| p.replicas))
            .unwrap_or_default(),
        exec,
        hooks: policy
            .as_ref()
            .and_then(|p| p.hooks.clone())
            .unwrap_or_default(),
        deadline_seconds: backup
            .spec
            .active_deadline_seconds
            .or(policy.as_ref().and_then(|p| p.active_deadline_seconds)),
    })
}

/// Every container the app's spec names (`exec.container`, each hook's `container`) is
/// one of the StatefulSet's pod template: caught before anything runs, not when the exec
/// fails halfway through a run with the app quiesced. (An init or ephemeral container is
/// not a place to run a command in.)
pub fn named_containers_exist(settings: &Settings, sts: &StatefulSet) -> Result<(), Invalid> {
    let have: Vec<&str> = sts
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .map(|p| p.containers.iter().map(|c| c.name.as_str()).collect())
        .unwrap_or_default();
    let mut named: Vec<(String, &str)> = Vec::new();
    if let Some(c) = settings.exec.as_ref().and_then(|e| e.container.as_deref()) {
        named.push(("spec.backup.exec.container".into(), c));
    }
    for (stage, hooks) in [("pre", &settings.hooks.pre), ("post", &settings.hooks.post)] {
        for hook in hooks {
            if let Some(c) = hook.container.as_deref() {
                named.push((
                    format!("spec.backup.hooks.{stage}[{}].container", hook.name),
                    c,
                ));
            }
        }
    }
    match named.into_iter().find(|(_, c)| !have.contains(c)) {
        None => Ok(()),
        Some((field, container)) => Err(invalid(
            "ContainerNotFound",
            format!(
                "container {container} ({field}) is not in the pod template of StatefulSet {}; it has: {}",
                sts.name_any(),
                if have.is_empty() {
                    "none".to_string()
                } else {
                    have.join(", ")
                }
            ),
        )),
    }
}

/// One unit of work: a volume (Volume method) or a pod's dump (Exec method).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// PVC name (Volume) or pod name (Exec); the key of `status.volumes`.
    pub name: String,
    pub pod: String,
    pub node: String,
    /// The claim (Volume method).
    pub claim: Option<String>,
}

fn ordinal(pod: &str, sts: &str) -> Option<u32> {
    pod.strip_prefix(sts)?.strip_prefix('-')?.parse().ok()
}

fn is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// The StatefulSet's pods this run copies, by ordinal.
pub fn selected_pods<'a>(
    sts: &StatefulSet,
    pods: &'a [Pod],
    selection: ReplicaSelection,
) -> Result<Vec<&'a Pod>, Invalid> {
    let name = sts.name_any();
    let replicas = sts.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
    if replicas == 0 {
        return Err(invalid(
            "ScaledToZero",
            format!(
                "StatefulSet {name} has 0 replicas: no pod runs, so nothing can be read; scale it up first"
            ),
        ));
    }
    let uid = sts.uid();
    let mut owned: Vec<(u32, &Pod)> = pods
        .iter()
        .filter(|p| {
            p.owner_references()
                .iter()
                .any(|o| o.kind == "StatefulSet" && Some(&o.uid) == uid.as_ref())
        })
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter_map(|p| ordinal(&p.name_any(), &name).map(|o| (o, p)))
        .filter(|(o, _)| i64::from(*o) < i64::from(replicas))
        .collect();
    owned.sort_by_key(|(o, _)| *o);
    match selection {
        ReplicaSelection::All => {
            let missing: Vec<String> = (0..replicas.max(0) as u32)
                .filter(|o| !owned.iter().any(|(x, p)| x == o && is_ready(p)))
                .map(|o| format!("{name}-{o}"))
                .collect();
            if !missing.is_empty() {
                return Err(invalid(
                    "PodsNotReady",
                    format!(
                        "replicas: All needs every pod of StatefulSet {name} ready; not ready: {}",
                        missing.join(", ")
                    ),
                ));
            }
            Ok(owned.into_iter().map(|(_, p)| p).collect())
        }
        ReplicaSelection::One => owned
            .into_iter()
            .find(|(_, p)| is_ready(p))
            .map(|(_, p)| vec![p])
            .ok_or_else(|| {
                invalid(
                    "PodsNotReady",
                    format!("no pod of StatefulSet {name} is ready"),
                )
            }),
    }
}

/// The run's targets. Volume method: every PVC the selected pods mount (ReadWriteOncePod
/// claims refused: a second pod can never mount them). Exec method: one per pod.
pub fn targets(
    method: BackupMethod,
    pods: &[&Pod],
    claims: &[PersistentVolumeClaim],
) -> Result<Vec<Target>, Invalid> {
    let mut out = Vec::new();
    for pod in pods {
        let pod_name = pod.name_any();
        let node = pod
            .spec
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .ok_or_else(|| invalid("PodsNotReady", format!("pod {pod_name} has no node yet")))?;
        if method == BackupMethod::Exec {
            out.push(Target {
                name: pod_name.clone(),
                pod: pod_name,
                node,
                claim: None,
            });
            continue;
        }
        let volumes = pod
            .spec
            .as_ref()
            .and_then(|s| s.volumes.clone())
            .unwrap_or_default();
        for volume in volumes {
            let Some(source) = volume.persistent_volume_claim else {
                continue;
            };
            let claim = source.claim_name;
            let found = claims
                .iter()
                .find(|c| c.name_any() == claim)
                .ok_or_else(|| {
                    invalid(
                        "ClaimNotFound",
                        format!("pod {pod_name} mounts PVC {claim}, which does not exist"),
                    )
                })?;
            let modes = found
                .spec
                .as_ref()
                .and_then(|s| s.access_modes.clone())
                .unwrap_or_default();
            if modes.iter().any(|m| m == "ReadWriteOncePod") {
                return Err(invalid(
                    "ReadWriteOncePod",
                    format!(
                        "PVC {claim} is ReadWriteOncePod: only pod {pod_name} may mount it, so an agent cannot read it; use method Exec, or ReadWriteOnce"
                    ),
                ));
            }
            out.push(Target {
                name: claim.clone(),
                pod: pod_name.clone(),
                node: node.clone(),
                claim: Some(claim),
            });
        }
    }
    if out.is_empty() {
        return Err(invalid(
            "NoVolumes",
            "the selected pods mount no PersistentVolumeClaim: nothing to back up with method Volume",
        ));
    }
    Ok(out)
}

/// Everything an agent Job needs besides the target.
#[derive(Debug, Clone)]
pub struct JobInputs<'a> {
    pub backup: &'a Backup,
    pub repository: &'a BackupRepository,
    pub settings: &'a Settings,
    pub prefix: &'a str,
    pub agent_image: &'a str,
    /// The ServiceAccount the agents run as (see `stateward_runtime::agent_rbac`).
    pub service_account: &'a str,
    /// The agent container's requests and limits (the chart's `agent.resources`).
    pub resources: Option<&'a k8s_openapi::api::core::v1::ResourceRequirements>,
}

/// Deterministic Job name: `<backup>-<target>` cut to 63 with a hash, so a restarted
/// manager finds (adopts) the same Job instead of creating another.
pub fn job_name(backup: &str, target: &str) -> String {
    names::bounded(&format!("{backup}-{target}"), 63, true)
}

/// The object key a target's data goes to.
pub fn data_key(method: BackupMethod, prefix: &str, target: &Target, encrypted: bool) -> String {
    match method {
        BackupMethod::Volume => manifest::volume_key(prefix, &target.name, encrypted),
        BackupMethod::Exec => manifest::dump_key(prefix, &target.pod, encrypted),
    }
}

/// The agent Job of one target. Volume method: the claim read-only, pinned to the app
/// pod's node with its tolerations and node selector, running as `access` says (the
/// data's owner, see [`super::identity`]; unknown, the image's own unprivileged user).
/// Exec method: the agent execs in the app pod through the API, restricted as the
/// image's own user (`access` is not used).
pub fn agent_job(
    inputs: &JobInputs<'_>,
    target: &Target,
    app_pod: &Pod,
    identity: Option<super::identity::Resolved>,
) -> serde_json::Value {
    let backup = inputs.backup;
    let s3 = &inputs.repository.spec.s3;
    let encryption = inputs.repository.spec.encryption.as_ref();
    let key = data_key(
        inputs.settings.method,
        inputs.prefix,
        target,
        encryption.is_some(),
    );
    let mut args: Vec<String> = vec!["agent".into()];
    match inputs.settings.method {
        BackupMethod::Volume => {
            args.extend(["backup-volume".into(), "--source".into(), "/source".into()]);
            if let Some(user) = identity.and_then(|i| i.app_user) {
                args.extend(["--app-user".into(), user.to_string()]);
            }
        }
        BackupMethod::Exec => {
            args.extend(["backup-exec".into(), "--pod".into(), target.pod.clone()]);
            if let Some(container) = inputs
                .settings
                .exec
                .as_ref()
                .and_then(|e| e.container.clone())
            {
                args.extend(["--container".into(), container]);
            }
        }
    }
    args.extend([
        "--key".into(),
        key.clone(),
        "--result-key".into(),
        manifest::result_key(&key),
    ]);
    args.extend(stateward_agent::job::connection_args(s3));
    if encryption.is_some() {
        args.push("--encrypt".into());
    }
    if inputs.settings.method == BackupMethod::Exec {
        args.push("--".into());
        args.extend(
            inputs
                .settings
                .exec
                .as_ref()
                .map(|e| e.command.clone())
                .unwrap_or_default(),
        );
    }
    let mut env = stateward_agent::job::credential_env(&inputs.repository.spec);
    env.extend(stateward_agent::job::recipient_env(&inputs.repository.spec));
    env.push(json!({"name": "RUST_LOG", "value": "info"}));
    let labels = agent_labels(backup, &target.node);
    let pod_spec = app_pod.spec.clone().unwrap_or_default();
    let mut spec = json!({
        "restartPolicy": "Never",
        "serviceAccountName": inputs.service_account,
        "automountServiceAccountToken": inputs.settings.method == BackupMethod::Exec,
        "containers": [{
            "name": "agent",
            "image": inputs.agent_image,
            "args": args,
            "env": env,
            "terminationMessagePolicy": "File",
            "securityContext": stateward_agent::job::restricted_container(),
        }],
    });
    if let Some(resources) = inputs.resources {
        spec["containers"][0]["resources"] = json!(resources);
    }
    if inputs.settings.method == BackupMethod::Exec {
        // It reads no volume, only the API and S3: Pod Security `restricted`, as the
        // image's own user.
        spec["securityContext"] = stateward_agent::job::restricted_pod();
    }
    if inputs.settings.method == BackupMethod::Volume {
        spec["nodeName"] = json!(target.node);
        if let Some(tolerations) = &pod_spec.tolerations {
            spec["tolerations"] = json!(tolerations);
        }
        if let Some(selector) = &pod_spec.node_selector {
            spec["nodeSelector"] = json!(selector);
        }
        let (pod_sc, container_sc) = stateward_agent::job::volume_contexts(
            identity.map_or(stateward_agent::job::VolumeAccess::AGENT, |i| i.access),
            stateward_agent::job::VolumeWork::Backup,
        );
        spec["securityContext"] = pod_sc;
        spec["containers"][0]["securityContext"] = container_sc;
        spec["containers"][0]["volumeMounts"] =
            json!([{"name": "source", "mountPath": "/source", "readOnly": true}]);
        spec["volumes"] = json!([{"name": "source", "persistentVolumeClaim": {"claimName": target.claim, "readOnly": true}}]);
    }
    let mut job_spec = json!({
        // The controller decides about retries (a failed volume fails the run with its
        // reason); a Job-level retry would re-upload silently.
        "backoffLimit": 0,
        "template": {"metadata": {"labels": labels}, "spec": spec},
    });
    // A backstop: the controller enforces the run's deadline itself.
    if let Some(deadline) = inputs.settings.deadline_seconds {
        job_spec["activeDeadlineSeconds"] = json!(deadline);
    }
    json!({
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": job_name(&backup.name_any(), &target.name),
            "labels": labels,
            "ownerReferences": [owner(backup)],
        },
        "spec": job_spec,
    })
}

fn owner(backup: &Backup) -> serde_json::Value {
    json!({
        "apiVersion": Backup::api_version(&()),
        "kind": Backup::kind(&()),
        "name": backup.name_any(),
        "uid": backup.uid().unwrap_or_default(),
        "controller": true,
        "blockOwnerDeletion": true,
    })
}

fn agent_labels(backup: &Backup, node: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (MANAGED_BY_LABEL.to_string(), MANAGED_BY_VALUE.to_string()),
        (COMPONENT_LABEL.to_string(), AGENT_COMPONENT.to_string()),
        (
            BACKUP_LABEL.to_string(),
            names::bounded(&backup.name_any(), 63, false),
        ),
        (
            BACKUP_UID_LABEL.to_string(),
            backup.uid().unwrap_or_default(),
        ),
        (
            APP_LABEL.to_string(),
            names::bounded(&backup.spec.app, 63, false),
        ),
        (NODE_LABEL.to_string(), names::label_value(node)),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::batch::v1::Job;

    fn yaml<T: serde::de::DeserializeOwned>(text: &str) -> T {
        serde_yaml::from_str(text).unwrap_or_else(|e| panic!("fixture: {e}"))
    }

    fn sts(replicas: i32) -> StatefulSet {
        yaml(&format!(
            "metadata: {{name: db, uid: s1}}\nspec: {{replicas: {replicas}, serviceName: db, selector: {{matchLabels: {{app: db}}}}, template: {{}}}}"
        ))
    }

    fn pod(name: &str, node: &str, ready: bool, claim: &str) -> Pod {
        yaml(&format!(
            r#"
metadata: {{name: {name}, ownerReferences: [{{apiVersion: apps/v1, kind: StatefulSet, name: db, uid: s1}}]}}
spec:
  nodeName: {node}
  securityContext: {{runAsUser: 999, fsGroup: 999}}
  tolerations: [{{key: dedicated, operator: Exists}}]
  containers: [{{name: db, image: postgres}}]
  volumes: [{{name: data, persistentVolumeClaim: {{claimName: {claim}}}}}]
status: {{conditions: [{{type: Ready, status: "{}"}}]}}
"#,
            if ready { "True" } else { "False" }
        ))
    }

    fn claim(name: &str, mode: &str) -> PersistentVolumeClaim {
        yaml(&format!(
            "metadata: {{name: {name}}}\nspec: {{accessModes: [{mode}]}}"
        ))
    }

    #[test]
    fn named_containers_must_be_in_the_pod_template() {
        let sts: StatefulSet = yaml(
            "metadata: {name: db}\nspec: {serviceName: db, selector: {}, template: {spec: {containers: [{name: db}, {name: sidecar}]}}}",
        );
        let settings = |exec: Option<&str>, pre: Option<&str>, post: Option<&str>| {
            let hook = |c: Option<&str>| -> Vec<stateward_api::statefulapp::Hook> {
                c.map(|c| yaml(&format!("{{name: h, container: {c}, command: [true]}}")))
                    .into_iter()
                    .collect()
            };
            Settings {
                repository: "r".into(),
                method: BackupMethod::Exec,
                replicas: ReplicaSelection::One,
                exec: exec.map(|c| yaml(&format!("{{container: {c}, command: [true]}}"))),
                hooks: Hooks {
                    pre: hook(pre),
                    post: hook(post),
                },
                deadline_seconds: None,
            }
        };
        let rows = [
            (None, None, None, None),
            (Some("db"), Some("sidecar"), Some("db"), None),
            (Some("dbx"), None, None, Some("spec.backup.exec.container")),
            (
                None,
                Some("nope"),
                None,
                Some("spec.backup.hooks.pre[h].container"),
            ),
            (
                Some("db"),
                None,
                Some("nope"),
                Some("spec.backup.hooks.post[h].container"),
            ),
        ];
        for (exec, pre, post, field) in rows {
            let got = named_containers_exist(&settings(exec, pre, post), &sts);
            match field {
                None => assert_eq!(got, Ok(()), "{exec:?} {pre:?} {post:?}"),
                Some(field) => {
                    let err = got.expect_err(field);
                    assert_eq!(err.reason, "ContainerNotFound");
                    assert!(err.message.contains(field), "{}", err.message);
                    assert!(
                        err.message.contains("it has: db, sidecar"),
                        "{}",
                        err.message
                    );
                }
            }
        }
    }

    #[test]
    fn all_replicas_need_every_pod_ready_and_one_takes_the_lowest_ready() {
        let pods = vec![
            pod("db-1", "n2", true, "data-db-1"),
            pod("db-0", "n1", false, "data-db-0"),
        ];
        let err = selected_pods(&sts(2), &pods, ReplicaSelection::All).err();
        assert_eq!(err.map(|e| e.reason), Some("PodsNotReady"));
        let one = selected_pods(&sts(2), &pods, ReplicaSelection::One).unwrap_or_default();
        assert_eq!(one.len(), 1);
        assert_eq!(one[0].name_any(), "db-1");
        let zero = selected_pods(&sts(0), &pods, ReplicaSelection::All).err();
        assert_eq!(zero.map(|e| e.reason), Some("ScaledToZero"));
    }

    #[test]
    fn volume_targets_follow_the_pods_and_refuse_read_write_once_pod() {
        let pods = [
            pod("db-0", "n1", true, "data-db-0"),
            pod("db-1", "n2", true, "data-db-1"),
        ];
        let refs: Vec<&Pod> = pods.iter().collect();
        let claims = vec![
            claim("data-db-0", "ReadWriteOnce"),
            claim("data-db-1", "ReadWriteOnce"),
        ];
        let targets = targets(BackupMethod::Volume, &refs, &claims).unwrap_or_default();
        assert_eq!(targets.len(), 2);
        assert_eq!(
            (targets[1].name.as_str(), targets[1].node.as_str()),
            ("data-db-1", "n2")
        );
        let claims = vec![
            claim("data-db-0", "ReadWriteOncePod"),
            claim("data-db-1", "ReadWriteOnce"),
        ];
        let err = super::targets(BackupMethod::Volume, &refs, &claims).err();
        assert_eq!(err.as_ref().map(|e| e.reason), Some("ReadWriteOncePod"));
        assert!(err.is_some_and(|e| e.message.contains("data-db-0")));
    }

    #[test]
    fn agent_objects_fit_kubernetes_limits_for_names_of_every_length() {
        let repo: BackupRepository = yaml(
            "metadata: {name: r}\nspec: {s3: {bucket: backups, credentials: {accessKeyId: {name: s3, key: id}, secretAccessKey: {name: s3, key: secret}}}}",
        );
        let settings = Settings {
            repository: "r".into(),
            method: BackupMethod::Volume,
            replicas: ReplicaSelection::All,
            exec: None,
            hooks: Hooks::default(),
            deadline_seconds: None,
        };
        let app_pod = pod("db-0", "n1", true, "data-db-0");
        for name in stateward_runtime::names::sample_names() {
            // The Backup, its app and the claim each take the sample name.
            let backup: Backup = yaml(&format!(
                "metadata: {{name: '{name}', namespace: shop, uid: b1}}\nspec: {{app: '{name}'}}"
            ));
            let target = Target {
                name: format!("data-{name}"),
                pod: "db-0".into(),
                node: name.clone(),
                claim: Some(format!("data-{name}")),
            };
            let inputs = JobInputs {
                backup: &backup,
                repository: &repo,
                settings: &settings,
                prefix: "shop/db/x",
                agent_image: "img",
                service_account: "stateward-agent",
                resources: None,
            };
            let job = agent_job(&inputs, &target, &app_pod, None);
            stateward_runtime::names::check_object(&job)
                .unwrap_or_else(|e| panic!("names of {} characters: {e}", name.len()));
        }
    }

    #[test]
    fn the_volume_job_is_pinned_read_only_and_runs_as_the_datas_owner() {
        let resources: k8s_openapi::api::core::v1::ResourceRequirements =
            yaml("requests: {cpu: 100m, memory: 128Mi}\nlimits: {memory: 1Gi}");
        let backup: Backup =
            yaml("metadata: {name: nightly, namespace: shop, uid: b1}\nspec: {app: db}");
        let repo: BackupRepository = yaml(
            "metadata: {name: r}\nspec: {s3: {bucket: backups, endpoint: 'http://s3:9000', forcePathStyle: true, checksumMode: WhenRequired, credentials: {accessKeyId: {name: s3, key: id}, secretAccessKey: {name: s3, key: secret}}}}",
        );
        let settings = Settings {
            repository: "r".into(),
            method: BackupMethod::Volume,
            replicas: ReplicaSelection::All,
            exec: None,
            hooks: Hooks::default(),
            deadline_seconds: Some(600),
        };
        let app_pod = pod("db-0", "n1", true, "data-db-0");
        let target = Target {
            name: "data-db-0".into(),
            pod: "db-0".into(),
            node: "n1".into(),
            claim: Some("data-db-0".into()),
        };
        let inputs = JobInputs {
            backup: &backup,
            repository: &repo,
            settings: &settings,
            prefix: "shop/db/nightly-b1",
            agent_image: "img",
            service_account: "stateward-agent",
            resources: Some(&resources),
        };
        let job = agent_job(
            &inputs,
            &target,
            &app_pod,
            Some(super::super::identity::Resolved {
                access: stateward_agent::job::VolumeAccess::Owner(
                    stateward_api::access::AgentIdentity {
                        user: 999,
                        group: 999,
                        fs_group: Some(999),
                    },
                ),
                app_user: Some(999),
            }),
        );
        let spec = &job["spec"]["template"]["spec"];
        assert_eq!(spec["nodeName"], "n1");
        assert_eq!(
            spec["containers"][0]["resources"]["limits"]["memory"],
            "1Gi"
        );
        assert_eq!(spec["securityContext"]["runAsUser"], 999);
        assert_eq!(spec["securityContext"]["runAsNonRoot"], true);
        assert_eq!(spec["securityContext"]["fsGroup"], 999);
        assert_eq!(
            spec["securityContext"]["seccompProfile"]["type"],
            "RuntimeDefault"
        );
        assert_eq!(
            spec["containers"][0]["securityContext"]["capabilities"]["drop"][0],
            "ALL"
        );
        assert_eq!(spec["tolerations"][0]["key"], "dedicated");
        assert_eq!(
            spec["volumes"][0]["persistentVolumeClaim"]["readOnly"],
            true
        );
        assert_eq!(spec["automountServiceAccountToken"], false);
        assert_eq!(job["spec"]["activeDeadlineSeconds"], 600);
        assert_eq!(job["metadata"]["ownerReferences"][0]["controller"], true);
        let args: Vec<String> =
            serde_json::from_value(spec["containers"][0]["args"].clone()).unwrap_or_default();
        assert!(args.contains(&"--checksum-when-required".to_string()));
        assert!(args.contains(&"shop/db/nightly-b1/volumes/data-db-0.tar.zst".to_string()));
        // Credentials only by reference.
        let text = job.to_string();
        assert!(text.contains("secretKeyRef"));
        let parsed: Result<Job, _> = serde_json::from_value(job);
        assert!(parsed.is_ok());
        assert_eq!(
            job_name("nightly", "data-db-0"),
            job_name("nightly", "data-db-0")
        );
        assert!(job_name(&"x".repeat(60), "data").len() <= 63);
    }

    /// An exec agent reads no volume: it runs as Pod Security `restricted` (non-root as
    /// the image's user, RuntimeDefault seccomp, no escalation, no capability), whatever
    /// the app runs as; a volume agent runs as the app.
    #[test]
    fn the_exec_job_is_restricted_and_not_the_apps_user() {
        let backup: Backup =
            yaml("metadata: {name: nightly, namespace: shop, uid: b1}\nspec: {app: db}");
        let repo: BackupRepository = yaml(
            "metadata: {name: r}\nspec: {s3: {bucket: backups, credentials: {accessKeyId: {name: s3, key: id}, secretAccessKey: {name: s3, key: secret}}}}",
        );
        let settings = Settings {
            repository: "r".into(),
            method: BackupMethod::Exec,
            replicas: ReplicaSelection::All,
            exec: None,
            hooks: Hooks::default(),
            deadline_seconds: None,
        };
        let app_pod = pod("db-0", "n1", true, "data-db-0");
        let target = Target {
            name: "dump-db-0".into(),
            pod: "db-0".into(),
            node: "n1".into(),
            claim: None,
        };
        let inputs = JobInputs {
            backup: &backup,
            repository: &repo,
            settings: &settings,
            prefix: "shop/db/nightly-b1",
            agent_image: "img",
            service_account: "stateward-exec-db",
            resources: None,
        };
        // Whatever a volume agent would run as, the exec agent is the image's own user.
        let job = agent_job(&inputs, &target, &app_pod, None);
        let spec = &job["spec"]["template"]["spec"];
        assert_eq!(spec["securityContext"]["runAsNonRoot"], true);
        assert_eq!(
            spec["securityContext"]["runAsUser"],
            stateward_agent::job::AGENT_USER
        );
        assert_eq!(
            spec["securityContext"]["seccompProfile"]["type"],
            "RuntimeDefault"
        );
        assert!(spec.get("volumes").is_none() && spec.get("nodeName").is_none());
        let container = &spec["containers"][0]["securityContext"];
        assert_eq!(container["allowPrivilegeEscalation"], false);
        assert_eq!(container["capabilities"]["drop"][0], "ALL");
        assert_eq!(spec["automountServiceAccountToken"], true);
    }
}
