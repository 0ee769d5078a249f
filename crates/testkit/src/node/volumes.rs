//! A pod's volumes and environment, materialised as a kubelet would: files for Secrets,
//! ConfigMaps, projected service-account tokens and the downward API; the local PV's
//! directory for a claim; emptyDirs under the pod's directory.

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, DownwardAPIVolumeFile, KeyToPath, ObjectFieldSelector, PersistentVolume,
    PersistentVolumeClaim, Pod, Secret, ServiceAccount, Volume,
};
use kube::{Api, Client};

use super::runner::MountSpec;

/// A volume ready to be bind-mounted.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub path: PathBuf,
    pub read_only: bool,
    /// Held while the pod runs, for claims: the storage side does not unmount it meanwhile.
    pub usage: Option<std::sync::Arc<super::UsageGuard>>,
}

/// Why a pod cannot start yet; shown in the container's waiting reason.
#[derive(Debug, thiserror::Error)]
pub enum NotReady {
    #[error("{0}")]
    Waiting(String),
}

fn field_value(pod: &Pod, field: &ObjectFieldSelector) -> Result<String> {
    let meta = &pod.metadata;
    let path = field.field_path.as_str();
    let label = |map: &Option<BTreeMap<String, String>>, key: &str| {
        map.as_ref()
            .and_then(|m| m.get(key).cloned())
            .unwrap_or_default()
    };
    let value = match path {
        "metadata.name" => meta.name.clone().unwrap_or_default(),
        "metadata.namespace" => meta.namespace.clone().unwrap_or_default(),
        "metadata.uid" => meta.uid.clone().unwrap_or_default(),
        "spec.nodeName" => pod
            .spec
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .unwrap_or_default(),
        "spec.serviceAccountName" => pod
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_default(),
        "status.podIP" => pod
            .status
            .as_ref()
            .and_then(|s| s.pod_ip.clone())
            .unwrap_or_default(),
        "status.hostIP" => pod
            .status
            .as_ref()
            .and_then(|s| s.host_ip.clone())
            .unwrap_or_default(),
        "metadata.labels" => format_map(&meta.labels),
        "metadata.annotations" => format_map(&meta.annotations),
        other => {
            if let Some(key) = other
                .strip_prefix("metadata.labels['")
                .and_then(|k| k.strip_suffix("']"))
            {
                label(&meta.labels, key)
            } else if let Some(key) = other
                .strip_prefix("metadata.annotations['")
                .and_then(|k| k.strip_suffix("']"))
            {
                label(&meta.annotations, key)
            } else {
                bail!("the local node does not support the downward API field {other:?}")
            }
        }
    };
    Ok(value)
}

fn format_map(map: &Option<BTreeMap<String, String>>) -> String {
    map.as_ref()
        .map(|m| m.iter().map(|(k, v)| format!("{k}=\"{v}\"\n")).collect())
        .unwrap_or_default()
}

/// Replaces `$(VAR)` with earlier variables, `$$` with `$`, as the kubelet does.
pub fn expand(input: &str, vars: &HashMap<String, String>) -> String {
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos + 1..];
        if let Some(stripped) = after.strip_prefix('$') {
            out.push('$');
            rest = stripped;
        } else if let Some(body) = after.strip_prefix('(') {
            match body.find(')') {
                Some(end) if vars.contains_key(&body[..end]) => {
                    out.push_str(&vars[&body[..end]]);
                    rest = &body[end + 1..];
                }
                Some(end) => {
                    out.push_str(&rest[pos..pos + 2 + end + 1]);
                    rest = &body[end + 1..];
                }
                None => {
                    out.push_str(&rest[pos..]);
                    rest = "";
                }
            }
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

async fn secret_data(
    client: &Client,
    ns: &str,
    name: &str,
) -> Result<Option<BTreeMap<String, Vec<u8>>>> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    Ok(secrets.get_opt(name).await?.map(|s| {
        let mut data: BTreeMap<String, Vec<u8>> = s
            .data
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| (k, v.0))
            .collect();
        for (k, v) in s.string_data.unwrap_or_default() {
            data.insert(k, v.into_bytes());
        }
        data
    }))
}

async fn configmap_data(
    client: &Client,
    ns: &str,
    name: &str,
) -> Result<Option<BTreeMap<String, Vec<u8>>>> {
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    Ok(maps.get_opt(name).await?.map(|c| {
        let mut data: BTreeMap<String, Vec<u8>> = c
            .data
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| (k, v.into_bytes()))
            .collect();
        for (k, v) in c.binary_data.unwrap_or_default() {
            data.insert(k, v.0);
        }
        data
    }))
}

/// The container's environment: the image's, the in-cluster service variables, then the
/// spec's `envFrom` and `env` (later wins), with `$(VAR)` expansion.
pub async fn container_env(
    client: &Client,
    pod: &Pod,
    container: &Container,
    base: Vec<(String, String)>,
) -> Result<Vec<(String, String)>> {
    let ns = pod.metadata.namespace.clone().unwrap_or_default();
    let mut order: Vec<String> = Vec::new();
    let mut vars: HashMap<String, String> = HashMap::new();
    let set =
        |order: &mut Vec<String>, vars: &mut HashMap<String, String>, k: String, v: String| {
            if !vars.contains_key(&k) {
                order.push(k.clone());
            }
            vars.insert(k, v);
        };
    for (k, v) in base {
        set(&mut order, &mut vars, k, v);
    }
    for from in container.env_from.clone().unwrap_or_default() {
        let prefix = from.prefix.clone().unwrap_or_default();
        let (data, optional, what) = if let Some(s) = &from.secret_ref {
            (
                secret_data(client, &ns, &s.name).await?,
                s.optional.unwrap_or(false),
                format!("Secret {}", s.name),
            )
        } else if let Some(c) = &from.config_map_ref {
            (
                configmap_data(client, &ns, &c.name).await?,
                c.optional.unwrap_or(false),
                format!("ConfigMap {}", c.name),
            )
        } else {
            continue;
        };
        match data {
            Some(data) => {
                for (k, v) in data {
                    set(
                        &mut order,
                        &mut vars,
                        format!("{prefix}{k}"),
                        String::from_utf8_lossy(&v).into_owned(),
                    );
                }
            }
            None if optional => {}
            None => return Err(NotReady::Waiting(format!("{what} not found")).into()),
        }
    }
    for env in container.env.clone().unwrap_or_default() {
        let value = if let Some(value) = env.value {
            expand(&value, &vars)
        } else if let Some(from) = env.value_from {
            if let Some(sel) = from.secret_key_ref {
                let data = secret_data(client, &ns, &sel.name).await?;
                match data.and_then(|d| d.get(&sel.key).cloned()) {
                    Some(v) => String::from_utf8_lossy(&v).into_owned(),
                    None if sel.optional.unwrap_or(false) => continue,
                    None => {
                        return Err(NotReady::Waiting(format!(
                            "Secret {} or its key {} not found (env {})",
                            sel.name, sel.key, env.name
                        ))
                        .into());
                    }
                }
            } else if let Some(sel) = from.config_map_key_ref {
                let data = configmap_data(client, &ns, &sel.name).await?;
                match data.and_then(|d| d.get(&sel.key).cloned()) {
                    Some(v) => String::from_utf8_lossy(&v).into_owned(),
                    None if sel.optional.unwrap_or(false) => continue,
                    None => {
                        return Err(NotReady::Waiting(format!(
                            "ConfigMap {} or its key {} not found (env {})",
                            sel.name, sel.key, env.name
                        ))
                        .into());
                    }
                }
            } else if let Some(field) = from.field_ref {
                field_value(pod, &field)?
            } else if let Some(resource) = from.resource_field_ref {
                // No resource accounting on the local node: report the request/limit as
                // written, or nothing.
                let _ = resource;
                String::new()
            } else {
                String::new()
            }
        } else {
            String::new()
        };
        set(&mut order, &mut vars, env.name, value);
    }
    Ok(order
        .into_iter()
        .map(|k| {
            let v = vars.get(&k).cloned().unwrap_or_default();
            (k, v)
        })
        .collect())
}

fn write_files(dir: &Path, files: &[(String, Vec<u8>, u32)]) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    for (rel, data, mode) in files {
        let rel = Path::new(rel);
        if rel.is_absolute()
            || rel
                .components()
                .any(|c| matches!(c, std::path::Component::ParentDir))
        {
            bail!(
                "volume file path {} must be relative and stay inside the volume",
                rel.display()
            );
        }
        let path = dir.join(rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&path, data)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(*mode))?;
    }
    Ok(())
}

fn select_items(
    data: BTreeMap<String, Vec<u8>>,
    items: &Option<Vec<KeyToPath>>,
    default_mode: u32,
    what: &str,
) -> Result<Vec<(String, Vec<u8>, u32)>> {
    match items {
        None => Ok(data
            .into_iter()
            .map(|(k, v)| (k, v, default_mode))
            .collect()),
        Some(items) => items
            .iter()
            .map(|item| {
                let value = data
                    .get(&item.key)
                    .cloned()
                    .ok_or_else(|| NotReady::Waiting(format!("{what} has no key {}", item.key)))?;
                let mode = item.mode.map(|m| m as u32).unwrap_or(default_mode);
                Ok((item.path.clone(), value, mode))
            })
            .collect(),
    }
}

fn downward_files(
    pod: &Pod,
    items: &[DownwardAPIVolumeFile],
    default_mode: u32,
) -> Result<Vec<(String, Vec<u8>, u32)>> {
    items
        .iter()
        .filter_map(|item| {
            item.field_ref.as_ref().map(|f| {
                Ok((
                    item.path.clone(),
                    field_value(pod, f)?.into_bytes(),
                    item.mode.map(|m| m as u32).unwrap_or(default_mode),
                ))
            })
        })
        .collect()
}

async fn service_account_token(
    client: &Client,
    pod: &Pod,
    audience: Option<String>,
    expiration: Option<i64>,
) -> Result<String> {
    let ns = pod.metadata.namespace.clone().unwrap_or_default();
    let sa = pod
        .spec
        .as_ref()
        .and_then(|s| s.service_account_name.clone())
        .unwrap_or_else(|| "default".into());
    let api: Api<ServiceAccount> = Api::namespaced(client.clone(), &ns);
    let request = TokenRequest {
        spec: Some(TokenRequestSpec {
            audiences: audience.map(|a| vec![a]),
            expiration_seconds: Some(expiration.unwrap_or(3607)),
            bound_object_ref: Some(BoundObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: pod.metadata.name.clone(),
                uid: pod.metadata.uid.clone(),
            }),
        }),
        ..Default::default()
    };
    let response = api
        .create_token_request(&sa, &Default::default(), &request)
        .await
        .map_err(|e| {
            NotReady::Waiting(format!("requesting a token for ServiceAccount {sa}: {e}"))
        })?;
    response
        .status
        .and_then(|s| s.token)
        .context("the TokenRequest returned no token")
}

/// Materialises one pod volume under `dir`.
pub async fn prepare(
    client: &Client,
    pod: &Pod,
    volume: &Volume,
    dir: &Path,
    usage: &super::VolumeUsage,
) -> Result<Prepared> {
    let ns = pod.metadata.namespace.clone().unwrap_or_default();
    let target = dir.join(&volume.name);
    if volume.empty_dir.is_some() {
        std::fs::create_dir_all(&target)?;
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o777))?;
        return Ok(Prepared {
            path: target,
            read_only: false,
            usage: None,
        });
    }
    if let Some(host) = &volume.host_path {
        let path = PathBuf::from(&host.path);
        if !path.exists() && host.type_.as_deref() == Some("DirectoryOrCreate") {
            std::fs::create_dir_all(&path)?;
        }
        return Ok(Prepared {
            path,
            read_only: false,
            usage: None,
        });
    }
    if let Some(claim) = &volume.persistent_volume_claim {
        let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), &ns);
        let pvc = claims.get_opt(&claim.claim_name).await?.ok_or_else(|| {
            NotReady::Waiting(format!(
                "PersistentVolumeClaim {} not found",
                claim.claim_name
            ))
        })?;
        let bound = pvc.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Bound");
        let pv_name = pvc.spec.as_ref().and_then(|s| s.volume_name.clone());
        let (true, Some(pv_name)) = (bound, pv_name) else {
            return Err(NotReady::Waiting(format!(
                "PersistentVolumeClaim {} is not bound yet",
                claim.claim_name
            ))
            .into());
        };
        let pvs: Api<PersistentVolume> = Api::all(client.clone());
        let pv = pvs.get(&pv_name).await?;
        let spec = pv.spec.unwrap_or_default();
        let path = spec
            .local
            .map(|l| l.path)
            .or(spec.host_path.map(|h| h.path))
            .ok_or_else(|| {
                NotReady::Waiting(format!(
                    "PersistentVolume {pv_name} is neither local nor hostPath"
                ))
            })?;
        let path = PathBuf::from(path);
        // A pending expansion that cannot happen online waits for the volume to be unused:
        // let the storage side do it before this pod mounts the volume.
        if !super::storage::can_resize_online() && super::storage::expansion_requested(&pvc)? {
            return Err(NotReady::Waiting(format!(
                "PersistentVolumeClaim {} is being expanded",
                claim.claim_name
            ))
            .into());
        }
        let usage = usage.try_use(&path).ok_or_else(|| {
            NotReady::Waiting(format!("PersistentVolume {pv_name} is being resized"))
        })?;
        // A loop-backed volume must be mounted, else we would bind its empty mount point.
        let image = path.with_extension("img");
        if image.exists() && !super::storage::is_mount_point(&path) {
            return Err(NotReady::Waiting(format!(
                "PersistentVolume {pv_name} is not mounted yet"
            ))
            .into());
        }
        return Ok(Prepared {
            path,
            read_only: claim.read_only.unwrap_or(false),
            usage: Some(std::sync::Arc::new(usage)),
        });
    }
    if let Some(secret) = &volume.secret {
        let name = secret.secret_name.clone().unwrap_or_default();
        let mode = secret.default_mode.map(|m| m as u32).unwrap_or(0o644);
        let files = match secret_data(client, &ns, &name).await? {
            Some(data) => select_items(data, &secret.items, mode, &format!("Secret {name}"))?,
            None if secret.optional.unwrap_or(false) => vec![],
            None => {
                return Err(NotReady::Waiting(format!(
                    "Secret {name} not found (volume {})",
                    volume.name
                ))
                .into());
            }
        };
        write_files(&target, &files)?;
        return Ok(Prepared {
            path: target,
            read_only: true,
            usage: None,
        });
    }
    if let Some(cm) = &volume.config_map {
        let name = cm.name.clone();
        let mode = cm.default_mode.map(|m| m as u32).unwrap_or(0o644);
        let files = match configmap_data(client, &ns, &name).await? {
            Some(data) => select_items(data, &cm.items, mode, &format!("ConfigMap {name}"))?,
            None if cm.optional.unwrap_or(false) => vec![],
            None => {
                return Err(NotReady::Waiting(format!(
                    "ConfigMap {name} not found (volume {})",
                    volume.name
                ))
                .into());
            }
        };
        write_files(&target, &files)?;
        return Ok(Prepared {
            path: target,
            read_only: true,
            usage: None,
        });
    }
    if let Some(downward) = &volume.downward_api {
        let mode = downward.default_mode.map(|m| m as u32).unwrap_or(0o644);
        let files = downward_files(pod, downward.items.as_deref().unwrap_or_default(), mode)?;
        write_files(&target, &files)?;
        return Ok(Prepared {
            path: target,
            read_only: true,
            usage: None,
        });
    }
    if let Some(projected) = &volume.projected {
        let mode = projected.default_mode.map(|m| m as u32).unwrap_or(0o644);
        let mut files = Vec::new();
        for source in projected.sources.clone().unwrap_or_default() {
            if let Some(token) = source.service_account_token {
                let jwt =
                    service_account_token(client, pod, token.audience, token.expiration_seconds)
                        .await?;
                files.push((token.path, jwt.into_bytes(), mode));
            }
            if let Some(cm) = source.config_map {
                match configmap_data(client, &ns, &cm.name).await? {
                    Some(data) => files.extend(select_items(
                        data,
                        &cm.items,
                        mode,
                        &format!("ConfigMap {}", cm.name),
                    )?),
                    None if cm.optional.unwrap_or(false) => {}
                    None => {
                        return Err(
                            NotReady::Waiting(format!("ConfigMap {} not found", cm.name)).into(),
                        );
                    }
                }
            }
            if let Some(secret) = source.secret {
                match secret_data(client, &ns, &secret.name).await? {
                    Some(data) => files.extend(select_items(
                        data,
                        &secret.items,
                        mode,
                        &format!("Secret {}", secret.name),
                    )?),
                    None if secret.optional.unwrap_or(false) => {}
                    None => {
                        return Err(
                            NotReady::Waiting(format!("Secret {} not found", secret.name)).into(),
                        );
                    }
                }
            }
            if let Some(downward) = source.downward_api {
                files.extend(downward_files(
                    pod,
                    downward.items.as_deref().unwrap_or_default(),
                    mode,
                )?);
            }
        }
        write_files(&target, &files)?;
        return Ok(Prepared {
            path: target,
            read_only: true,
            usage: None,
        });
    }
    bail!(
        "volume {}: this volume type is not supported by the local node (supported: emptyDir, \
         hostPath, persistentVolumeClaim, secret, configMap, downwardAPI, projected)",
        volume.name
    )
}

/// Gives the pod's fsGroup ownership of a writable volume, as the kubelet does for
/// volumes that support ownership management: every entry's group, `g+rw` (and `g+xs` for
/// directories). `always` (`fsGroupChangePolicy: Always`, the default) walks at every
/// mount; otherwise only when the root does not match yet (`OnRootMismatch`). The walk
/// is what breaks a postgres PGDATA (`g+w` makes the server refuse it) on the second
/// mount unless the pod asks for OnRootMismatch.
pub fn apply_fs_group(path: &Path, fs_group: u32, always: bool) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path)?;
    if !always && meta.gid() == fs_group && meta.mode() & 0o2070 == 0o2070 {
        return Ok(());
    }
    fn walk(path: &Path, gid: u32) -> Result<()> {
        let meta = std::fs::symlink_metadata(path)?;
        std::os::unix::fs::lchown(path, None, Some(gid))?;
        if meta.is_dir() {
            let mode = meta.permissions().mode() | 0o2070;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
            for entry in std::fs::read_dir(path)? {
                walk(&entry?.path(), gid)?;
            }
        } else if meta.is_file() {
            let mode = meta.permissions().mode() | 0o060;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
        }
        Ok(())
    }
    walk(path, fs_group)
}

/// The bind mounts of one container: its volumeMounts (with subPath) onto prepared volumes.
pub fn container_mounts(
    container: &Container,
    prepared: &HashMap<String, Prepared>,
) -> Result<Vec<MountSpec>> {
    let mut mounts = Vec::new();
    for vm in container.volume_mounts.clone().unwrap_or_default() {
        let volume = prepared
            .get(&vm.name)
            .with_context(|| format!("volumeMount {} names no volume of the pod", vm.name))?;
        let mut source = volume.path.clone();
        if let Some(sub) = vm.sub_path.as_deref().filter(|s| !s.is_empty()) {
            if Path::new(sub).is_absolute() || sub.split('/').any(|c| c == "..") {
                bail!("subPath {sub} must be relative and stay inside the volume");
            }
            source = source.join(sub);
            if !source.exists() {
                std::fs::create_dir_all(&source)?;
            }
        }
        mounts.push(MountSpec {
            source: Some(source),
            target: PathBuf::from(&vm.mount_path),
            read_only: vm.read_only.unwrap_or(false) || volume.read_only,
        });
    }
    Ok(mounts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expands_variables_like_the_kubelet() {
        let vars: HashMap<String, String> = [("A".to_string(), "1".to_string())].into();
        assert_eq!(expand("x$(A)y", &vars), "x1y");
        assert_eq!(expand("$(B)", &vars), "$(B)");
        assert_eq!(expand("$$(A)", &vars), "$(A)");
        assert_eq!(expand("cost $5", &vars), "cost $5");
        assert_eq!(expand("$(A", &vars), "$(A");
    }
}
