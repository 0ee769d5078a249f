//! Deleting a Backup with `deletionPolicy: Delete`: the finalizer that removes its stored
//! objects. A running Backup is stopped first (agents, held hooks, the lock), so nothing
//! uploads into a prefix being deleted. The manifest goes first (see
//! [`Store::delete_backup`]). When the repository cannot be opened — its object or Secret
//! is gone, as during namespace deletion, or S3 stays unreachable — the data is orphaned
//! with a Warning event after [`RunConfig::orphan_wait`](super::RunConfig), so the
//! finalizer never blocks a namespace forever.

use std::time::Duration;

use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Api, Resource, ResourceExt};
use stateward_api::common::DATA_FINALIZER;
use stateward_api::repository::BackupRepository;
use stateward_api::{Backup, DeletionPolicy};
use stateward_runtime::time;

use super::store::Store;
use super::{RunContext, RunError, publish, release_lock, stop_agents};

/// How often a deletion waiting for the repository retries.
const RETRY: Duration = Duration::from_secs(5);

/// Adds the data finalizer to a Backup whose stored data must go with it, before any
/// data is written. True when it was added (the caller re-reads).
pub async fn ensure_finalizer(backup: &Backup, client: &kube::Client) -> Result<bool, RunError> {
    if backup.spec.deletion_policy != DeletionPolicy::Delete
        || backup.finalizers().iter().any(|f| f == DATA_FINALIZER)
    {
        return Ok(false);
    }
    let mut finalizers = backup.finalizers().to_vec();
    finalizers.push(DATA_FINALIZER.to_string());
    set_finalizers(backup, client, finalizers).await?;
    Ok(true)
}

/// Writes the finalizer list, failing (and retrying later) if the Backup changed since it
/// was read, so a concurrent edit of the list is never lost.
async fn set_finalizers(
    backup: &Backup,
    client: &kube::Client,
    finalizers: Vec<String>,
) -> Result<(), RunError> {
    let api: Api<Backup> = Api::namespaced(client.clone(), &backup.namespace().unwrap_or_default());
    let patch = serde_json::json!({
        "metadata": {
            "resourceVersion": backup.resource_version(),
            "finalizers": finalizers,
        }
    });
    match api
        .patch(
            &backup.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Runs the finalizer of a Backup being deleted.
pub async fn finalize(backup: &Backup, ctx: &RunContext) -> Result<Action, RunError> {
    if !backup.finalizers().iter().any(|f| f == DATA_FINALIZER) {
        return Ok(Action::await_change());
    }
    // Stop a run in progress: no agent may still be uploading, no lock or held hook left.
    ctx.held
        .lock()
        .ok()
        .and_then(|mut m| m.remove(&backup.uid().unwrap_or_default()));
    if !stop_agents(backup, ctx).await? {
        return Ok(Action::requeue(Duration::from_secs(2)));
    }
    release_lock(backup, ctx).await?;

    let status = backup.status.clone().unwrap_or_default();
    let (Some(prefix), Some(repository)) = (status.location.clone(), status.repository.clone())
    else {
        // It never wrote anything.
        return remove_finalizer(backup, ctx).await;
    };
    let ns = backup.namespace().unwrap_or_default();
    let repos: Api<BackupRepository> = Api::namespaced(ctx.base.client.clone(), &ns);
    let opened = match repos.get_opt(&repository).await? {
        None => Err(format!("BackupRepository {repository} no longer exists")),
        Some(repo) => Store::open(&ctx.base.client, &repo)
            .await
            .map_err(|e| e.to_string()),
    };
    let deleted = match opened {
        Ok(store) => store
            .delete_backup(&prefix)
            .await
            .map_err(|e| e.to_string()),
        Err(e) => Err(e),
    };
    match deleted {
        Ok(objects) => {
            tracing::info!(%prefix, objects, "deleted a backup's stored data");
            publish(
                ctx,
                backup,
                EventType::Normal,
                "DataDeleted",
                format!("deleted {objects} objects under {prefix} in repository {repository}"),
            )
            .await;
            remove_finalizer(backup, ctx).await
        }
        Err(reason) => {
            let since = backup
                .meta()
                .deletion_timestamp
                .as_ref()
                .map(time::to_chrono)
                .unwrap_or_else(|| ctx.base.clock.now());
            let waited = (ctx.base.clock.now() - since).to_std().unwrap_or_default();
            if waited < ctx.config.orphan_wait {
                tracing::warn!(%prefix, %reason, "cannot delete a backup's data yet; retrying");
                return Ok(Action::requeue(RETRY));
            }
            // Events cannot be created in a terminating namespace; the log still has it.
            tracing::warn!(%prefix, %reason, "orphaning a deleted backup's data");
            publish(
                ctx,
                backup,
                EventType::Warning,
                "DataOrphaned",
                format!(
                    "the stored data under {prefix} (repository {repository}) was left in place: {reason}; \
                     gave up after {}s. Delete it from the bucket by hand, or restore it by repository path",
                    ctx.config.orphan_wait.as_secs()
                ),
            )
            .await;
            remove_finalizer(backup, ctx).await
        }
    }
}

async fn remove_finalizer(backup: &Backup, ctx: &RunContext) -> Result<Action, RunError> {
    let finalizers: Vec<String> = backup
        .finalizers()
        .iter()
        .filter(|f| *f != DATA_FINALIZER)
        .cloned()
        .collect();
    set_finalizers(backup, &ctx.base.client, finalizers).await?;
    Ok(Action::await_change())
}
