//! Importing a backup that is already in a repository (`spec.importPath`): made in another
//! cluster, or whose Backup object was deleted with `deletionPolicy: Retain`. Nothing
//! runs: the Backup is completed from the backup's manifest (a backup without a manifest
//! does not exist), so it can be restored by name, listed and retained like any other.

use kube::api::Api;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Resource, ResourceExt};
use stateward_api::backup::{Backup, BackupPhase, VolumeResult};
use stateward_api::repository::BackupRepository;
use stateward_api::statefulapp::{BackupMethod, StatefulApp};
use stateward_runtime::{conditions, time};

use super::store::Store;
use super::{RunContext, RunError, publish, write_status};

/// Completes (or fails) an import; never touches the stored data.
pub async fn import(backup: &Backup, path: &str, ctx: &RunContext) -> Result<Action, RunError> {
    let ns = backup.namespace().unwrap_or_default();
    let now = ctx.base.clock.now();
    let mut status = backup.status.clone().unwrap_or_default();
    status.start_time.get_or_insert_with(|| time::rfc3339(now));
    let refuse = |reason: &'static str, message: String| (reason, message);
    let outcome: Result<(), (&'static str, String)> = async {
        // The repository: the spec's, else the app's (the app may be gone).
        let app_repository = Api::<StatefulApp>::namespaced(ctx.base.client.clone(), &ns)
            .get_opt(&backup.spec.app)
            .await?
            .and_then(|a| a.spec.backup.map(|b| b.repository));
        let Some(repository) = backup.spec.repository.clone().or(app_repository) else {
            return Ok(Err(refuse(
                "RepositoryNotSet",
                "an import needs spec.repository (or an existing app with spec.backup.repository)".into(),
            )));
        };
        let Some(repo) = Api::<BackupRepository>::namespaced(ctx.base.client.clone(), &ns)
            .get_opt(&repository)
            .await?
        else {
            return Ok(Err(refuse(
                "RepositoryNotFound",
                format!("BackupRepository {repository} not found in namespace {ns}"),
            )));
        };
        if let Err(message) = repo.spec.readable_from(&ns, path, &repository) {
            return Ok(Err(refuse("CrossNamespaceRefused", message)));
        }
        let prefix = repo.spec.key_prefix(path);
        let store = match Store::open(&ctx.base.client, &repo).await {
            Ok(store) => store,
            Err(e) => return Ok(Err(refuse("RepositoryUnusable", e.to_string()))),
        };
        let Some(manifest) = store.manifest(&prefix).await? else {
            return Ok(Err(refuse(
                "ManifestNotFound",
                format!("no manifest.json under {prefix}: the backup does not exist there or never completed"),
            )));
        };
        status.repository = Some(repository);
        status.location = Some(prefix.clone());
        status.method = Some(if manifest.method == "Exec" { BackupMethod::Exec } else { BackupMethod::Volume });
        status.start_time = Some(manifest.started_at.clone());
        status.completion_time = Some(manifest.completed_at.clone());
        status.volumes = manifest
            .entries
            .iter()
            .map(|e| VolumeResult {
                name: e.name.clone(),
                phase: BackupPhase::Completed,
                bytes_read: i64::try_from(e.bytes_read).ok(),
                bytes_stored: i64::try_from(e.bytes_stored).ok(),
                sha256: Some(e.sha256.clone()),
                content_sha256: e.content_sha256.clone(),
                files: e.files.and_then(|f| i64::try_from(f).ok()),
                segments: Some(i64::from(e.segments)),
                pod: Some(e.pod.clone()),
                key: Some(e.key.clone()),
                ownership: e.ownership.clone(),
                ..Default::default()
            })
            .collect();
        status.stored_bytes = Some(status.volumes.iter().filter_map(|v| v.bytes_stored).sum());
        Ok(Ok(()))
    }
    .await
    .map_err(|e: RunError| e)?;
    match outcome {
        Ok(()) => {
            status.phase = Some(BackupPhase::Completed);
            let message = format!(
                "imported from {}: {} target(s), {} bytes stored, made {} by {}",
                status.location.clone().unwrap_or_default(),
                status.volumes.len(),
                status.stored_bytes.unwrap_or(0),
                status.completion_time.clone().unwrap_or_default(),
                backup.spec.app
            );
            conditions::set(
                &mut status.conditions,
                conditions::condition(
                    "Completed",
                    true,
                    "Imported",
                    message.clone(),
                    backup.meta().generation,
                ),
                now,
            );
            write_status(backup, ctx, &status).await?;
            publish(ctx, backup, EventType::Normal, "Imported", message).await;
        }
        Err((reason, message)) => {
            status.phase = Some(BackupPhase::Failed);
            status.completion_time = Some(time::rfc3339(now));
            conditions::set(
                &mut status.conditions,
                conditions::condition(
                    "Failed",
                    true,
                    reason,
                    message.clone(),
                    backup.meta().generation,
                ),
                now,
            );
            write_status(backup, ctx, &status).await?;
            publish(ctx, backup, EventType::Warning, reason, message).await;
        }
    }
    Ok(Action::await_change())
}
