//! Local storage with real capacity: the `stateward-local` StorageClass, a provisioner
//! that backs each claim with a loop-mounted ext4 image on the selected node, online
//! expansion (grow the image, refresh the loop device, resize2fs) and deletion.
//!
//! Where loop devices are unavailable, volumes fall back to plain directories (no
//! capacity, no expansion) and the node says so loudly in its log and in a PVC event.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
use k8s_openapi::api::storage::v1::StorageClass;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use serde_json::json;
use tokio::process::Command;

use super::NodeConfig;

pub const STORAGE_CLASS: &str = "stateward-local";
pub const PROVISIONER: &str = "stateward.io/local-node";
const SELECTED_NODE: &str = "volume.kubernetes.io/selected-node";
const STORAGE_PROVISIONER: &str = "volume.kubernetes.io/storage-provisioner";
const PROVISIONED_BY: &str = "pv.kubernetes.io/provisioned-by";

/// Parses a Kubernetes quantity of bytes ("1Gi", "500M", "1073741824").
pub fn parse_bytes(q: &str) -> Result<u64> {
    let q = q.trim();
    let split = q
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(q.len());
    let (num, suffix) = q.split_at(split);
    let num: f64 = num.parse().with_context(|| format!("bad quantity {q:?}"))?;
    let mult: f64 = match suffix {
        "" => 1.0,
        "Ki" => 1024.0,
        "Mi" => 1024.0 * 1024.0,
        "Gi" => 1024.0 * 1024.0 * 1024.0,
        "Ti" => 1024.0f64.powi(4),
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        other => bail!("unsupported quantity suffix {other:?} in {q:?}"),
    };
    Ok((num * mult).ceil() as u64)
}

/// The storage a claim requests (`spec.resources.requests.storage`).
pub fn requested_storage(pvc: &PersistentVolumeClaim) -> Option<String> {
    pvc.spec
        .as_ref()
        .and_then(|s| s.resources.as_ref())
        .and_then(|r| r.requests.as_ref())
        .and_then(|r| r.get("storage"))
        .map(|q| q.0.clone())
}

/// The storage a bound claim has (`status.capacity.storage`).
pub fn capacity_storage(pvc: &PersistentVolumeClaim) -> Option<String> {
    pvc.status
        .as_ref()
        .and_then(|s| s.capacity.as_ref())
        .and_then(|c| c.get("storage"))
        .map(|q| q.0.clone())
}

/// Whether a claim asks for more than it has.
pub fn expansion_requested(pvc: &PersistentVolumeClaim) -> Result<bool> {
    match (requested_storage(pvc), capacity_storage(pvc)) {
        (Some(requested), Some(capacity)) => Ok(parse_bytes(&requested)? > parse_bytes(&capacity)?),
        _ => Ok(false),
    }
}

/// Whether `path` is a mount point in this mount namespace.
pub fn is_mount_point(path: &Path) -> bool {
    let wanted = path.to_string_lossy();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(&*wanted))
}

/// ext4 grows a mounted filesystem only for a process with CAP_SYS_RESOURCE (some
/// sandboxes drop it even for root).
pub fn can_resize_online() -> bool {
    const CAP_SYS_RESOURCE: u32 = 24;
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        })
        .is_some_and(|caps| caps & (1 << CAP_SYS_RESOURCE) != 0)
}

async fn grow_image(image: &Path, bytes: u64) -> Result<()> {
    if std::fs::metadata(image)?.len() < bytes {
        run(
            "truncate",
            &["-s", &bytes.to_string(), &image.to_string_lossy()],
        )
        .await?;
    }
    Ok(())
}

async fn run(cmd: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .await
        .with_context(|| format!("running {cmd}"))?;
    if !out.status.success() {
        bail!(
            "{cmd} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

pub struct Storage {
    client: Client,
    cfg: Arc<NodeConfig>,
}

impl Storage {
    pub fn new(client: Client, cfg: Arc<NodeConfig>) -> Self {
        Self { client, cfg }
    }

    fn volume_dir(&self, pv: &str) -> PathBuf {
        self.cfg.state_dir.join("volumes").join(pv)
    }

    fn image_path(&self, pv: &str) -> PathBuf {
        self.cfg.state_dir.join("volumes").join(format!("{pv}.img"))
    }

    pub async fn ensure_storage_class(&self) -> Result<()> {
        let classes: Api<StorageClass> = Api::all(self.client.clone());
        let class = json!({
            "apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
            "metadata": {
                "name": STORAGE_CLASS,
                "annotations": { "storageclass.kubernetes.io/is-default-class": "true" },
            },
            "provisioner": PROVISIONER,
            "volumeBindingMode": "WaitForFirstConsumer",
            "allowVolumeExpansion": true,
            "reclaimPolicy": "Delete",
        });
        classes
            .patch(
                STORAGE_CLASS,
                &PatchParams::apply("stateward-node").force(),
                &Patch::Apply(&class),
            )
            .await?;
        Ok(())
    }

    /// Reconciles claims and volumes every second, forever.
    pub async fn run(self) {
        loop {
            if let Err(e) = self.sync().await {
                tracing::warn!(error = %format!("{e:#}"), "storage sync failed");
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    async fn sync(&self) -> Result<()> {
        let claims: Api<PersistentVolumeClaim> = Api::all(self.client.clone());
        let pvs: Api<PersistentVolume> = Api::all(self.client.clone());
        let pv_list = pvs.list(&ListParams::default()).await?.items;
        for pvc in claims.list(&ListParams::default()).await?.items {
            let annotations = pvc.annotations();
            let ours =
                annotations.get(STORAGE_PROVISIONER).map(String::as_str) == Some(PROVISIONER);
            if !ours {
                continue;
            }
            let bound_to = pvc
                .spec
                .as_ref()
                .and_then(|s| s.volume_name.clone())
                .filter(|v| !v.is_empty());
            let result = match bound_to {
                None => self.provision(&pvc, &pv_list).await,
                Some(pv) => self.expand(&pvc, &pv, &pv_list).await,
            };
            if let Err(e) = result {
                tracing::warn!(pvc = %pvc.name_any(), error = %format!("{e:#}"), "volume operation failed");
            }
        }
        for pv in &pv_list {
            let ours =
                pv.annotations().get(PROVISIONED_BY).map(String::as_str) == Some(PROVISIONER);
            let phase = pv.status.as_ref().and_then(|s| s.phase.as_deref());
            let reclaim = pv
                .spec
                .as_ref()
                .and_then(|s| s.persistent_volume_reclaim_policy.as_deref());
            if ours
                && phase == Some("Released")
                && reclaim == Some("Delete")
                && let Err(e) = self.delete(&pv.name_any()).await
            {
                tracing::warn!(pv = %pv.name_any(), error = %format!("{e:#}"), "deleting the volume failed");
            }
        }
        Ok(())
    }

    async fn provision(
        &self,
        pvc: &PersistentVolumeClaim,
        existing: &[PersistentVolume],
    ) -> Result<()> {
        let Some(node) = pvc.annotations().get(SELECTED_NODE).cloned() else {
            return Ok(()); // WaitForFirstConsumer: the scheduler has not picked a node yet.
        };
        if !self.cfg.nodes.iter().any(|n| n.name == node) {
            return Ok(());
        }
        let uid = pvc.uid().unwrap_or_default();
        let pv_name = format!("pvc-{uid}");
        if existing.iter().any(|pv| pv.name_any() == pv_name) {
            return Ok(());
        }
        let spec = pvc.spec.clone().unwrap_or_default();
        let request = requested_storage(pvc).context("the claim requests no storage")?;
        let bytes = parse_bytes(&request)?;
        let dir = self.volume_dir(&pv_name);
        let loop_backed = self.create_backing(&pv_name, bytes).await;
        if let Err(e) = &loop_backed {
            tracing::error!(
                pv = %pv_name, error = %format!("{e:#}"),
                "LOOP DEVICES UNAVAILABLE: falling back to a plain directory without capacity"
            );
            std::fs::create_dir_all(&dir)?;
        }
        let pv = json!({
            "apiVersion": "v1", "kind": "PersistentVolume",
            "metadata": {
                "name": pv_name,
                "annotations": { PROVISIONED_BY: PROVISIONER },
                "labels": { "stateward.io/local-node": node },
            },
            "spec": {
                "capacity": { "storage": request },
                "accessModes": spec.access_modes.clone().unwrap_or_else(|| vec!["ReadWriteOnce".into()]),
                "persistentVolumeReclaimPolicy": "Delete",
                "storageClassName": spec.storage_class_name.clone().unwrap_or_else(|| STORAGE_CLASS.into()),
                "volumeMode": "Filesystem",
                "local": { "path": dir.to_string_lossy() },
                "claimRef": {
                    "apiVersion": "v1", "kind": "PersistentVolumeClaim",
                    "namespace": pvc.namespace(), "name": pvc.name_any(), "uid": uid,
                },
                "nodeAffinity": { "required": { "nodeSelectorTerms": [{ "matchExpressions": [{
                    "key": "kubernetes.io/hostname", "operator": "In", "values": [node],
                }]}]}},
            },
        });
        let pvs: Api<PersistentVolume> = Api::all(self.client.clone());
        pvs.create(&PostParams::default(), &serde_json::from_value(pv)?)
            .await?;
        tracing::info!(pv = %pv_name, pvc = %pvc.name_any(), %node, bytes, "provisioned a volume");
        Ok(())
    }

    /// An ext4 image of `bytes`, attached to a loop device and mounted at the volume dir.
    async fn create_backing(&self, pv: &str, bytes: u64) -> Result<()> {
        if !Path::new("/dev/loop-control").exists() {
            bail!("/dev/loop-control is missing");
        }
        let image = self.image_path(pv);
        let dir = self.volume_dir(pv);
        std::fs::create_dir_all(&dir)?;
        let image_s = image.to_string_lossy().into_owned();
        run("truncate", &["-s", &bytes.to_string(), &image_s]).await?;
        // No reserved blocks and a sparse inode table, so `df` shows close to the claim.
        run(
            "mkfs.ext4",
            &[
                "-q",
                "-F",
                "-m",
                "0",
                "-i",
                "65536",
                "-E",
                "lazy_itable_init=1,lazy_journal_init=1",
                &image_s,
            ],
        )
        .await?;
        let device = run("losetup", &["--find", "--show", &image_s]).await?;
        if let Err(e) = run("mount", &[&device, &dir.to_string_lossy()]).await {
            let _ = run("losetup", &["-d", &device]).await;
            let _ = std::fs::remove_file(&image);
            return Err(e);
        }
        Ok(())
    }

    fn loop_device_of(&self, image: &Path) -> Option<String> {
        for entry in std::fs::read_dir("/sys/block").ok()?.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !name.starts_with("loop") {
                continue;
            }
            let Ok(backing) = std::fs::read_to_string(entry.path().join("loop/backing_file"))
            else {
                continue;
            };
            if Path::new(backing.trim()) == image {
                return Some(format!("/dev/{name}"));
            }
        }
        None
    }

    async fn expand(
        &self,
        pvc: &PersistentVolumeClaim,
        pv_name: &str,
        pvs: &[PersistentVolume],
    ) -> Result<()> {
        let Some(pv) = pvs.iter().find(|p| p.name_any() == pv_name) else {
            return Ok(());
        };
        if pv.annotations().get(PROVISIONED_BY).map(String::as_str) != Some(PROVISIONER) {
            return Ok(());
        }
        let (Some(requested), Some(capacity)) = (requested_storage(pvc), capacity_storage(pvc))
        else {
            return Ok(());
        };
        let (want, have) = (parse_bytes(&requested)?, parse_bytes(&capacity)?);
        if want <= have {
            return Ok(());
        }
        let image = self.image_path(pv_name);
        let device = self
            .loop_device_of(&image)
            .context("the volume has no loop device (directory fallback): it cannot be expanded")?;
        let namespace = pvc.namespace().unwrap_or_default();
        let claims: Api<PersistentVolumeClaim> = Api::namespaced(self.client.clone(), &namespace);
        if can_resize_online() {
            grow_image(&image, want).await?;
            run("losetup", &["-c", &device]).await?;
            run("resize2fs", &[&device]).await?;
        } else {
            // Without CAP_SYS_RESOURCE ext4 refuses online growth: behave like a CSI driver
            // that expands offline, i.e. when no pod uses the claim (pods about to start
            // wait for this).
            let dir = self.volume_dir(pv_name);
            let Some(_maintenance) = self.cfg.volumes.try_maintain(&dir) else {
                let pending = pvc
                    .status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .is_some_and(|c| c.iter().any(|c| c.type_ == "FileSystemResizePending"));
                if pending {
                    return Ok(());
                }
                let condition = json!({ "status": { "conditions": [{
                    "type": "FileSystemResizePending", "status": "True",
                    "lastTransitionTime": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                    "message": "Waiting for the claim's pods to stop: the local node expands volumes \
                                offline here (no CAP_SYS_RESOURCE for online ext4 growth); restart the pod.",
                }]}});
                claims
                    .patch_status(
                        &pvc.name_any(),
                        &PatchParams::default(),
                        &Patch::Merge(&condition),
                    )
                    .await?;
                return Ok(());
            };
            run("umount", &[&dir.to_string_lossy()]).await?;
            let resized = async {
                grow_image(&image, want).await?;
                run("losetup", &["-c", &device]).await?;
                // e2fsck exits 1 when it fixed something, which is fine before a resize.
                let _ = Command::new("e2fsck")
                    .args(["-f", "-p", &device])
                    .output()
                    .await;
                run("resize2fs", &[&device]).await
            }
            .await;
            run("mount", &[&device, &dir.to_string_lossy()]).await?;
            resized?;
        }
        let pvs_api: Api<PersistentVolume> = Api::all(self.client.clone());
        pvs_api
            .patch(
                pv_name,
                &PatchParams::default(),
                &Patch::Merge(&json!({ "spec": { "capacity": { "storage": requested } } })),
            )
            .await?;
        let status = json!({ "status": {
            "capacity": { "storage": Quantity(requested.clone()) },
            "allocatedResources": { "storage": Quantity(requested.clone()) },
            "conditions": null,
            "allocatedResourceStatuses": null,
        }});
        claims
            .patch_status(
                &pvc.name_any(),
                &PatchParams::default(),
                &Patch::Merge(&status),
            )
            .await?;
        tracing::info!(pv = %pv_name, from = have, to = want, online = can_resize_online(), "expanded a volume");
        Ok(())
    }

    async fn delete(&self, pv_name: &str) -> Result<()> {
        let dir = self.volume_dir(pv_name);
        let image = self.image_path(pv_name);
        if let Some(device) = self.loop_device_of(&image) {
            if is_mount_point(&dir) {
                run("umount", &[&dir.to_string_lossy()]).await?;
            }
            run("losetup", &["-d", &device]).await?;
        }
        let _ = std::fs::remove_file(&image);
        let _ = std::fs::remove_dir_all(&dir);
        let pvs: Api<PersistentVolume> = Api::all(self.client.clone());
        match pvs.delete(pv_name, &Default::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
        tracing::info!(pv = %pv_name, "deleted a released volume");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_quantities() -> Result<()> {
        assert_eq!(parse_bytes("1Gi")?, 1 << 30);
        assert_eq!(parse_bytes("256Mi")?, 256 << 20);
        assert_eq!(parse_bytes("1G")?, 1_000_000_000);
        assert_eq!(parse_bytes("1.5Gi")?, 3 << 29);
        assert_eq!(parse_bytes("1048576")?, 1 << 20);
        assert!(parse_bytes("1Xi").is_err());
        Ok(())
    }
}
