//! Volume size: expansion when `storage.size` (or auto-expansion) grows, and keeping the
//! StatefulSet's volumeClaimTemplates in step.
//!
//! A StatefulSet's volumeClaimTemplates are immutable (kubernetes#68737), so the claims
//! are patched one by one (the storage driver grows them; `pendingResize` follows their
//! conditions), then the StatefulSet is deleted with orphan propagation and created again
//! with the new size — its pods keep running and are adopted again by the new object.
//! The new object is written to `status.scaling.recreating` before the delete, so a
//! restart in between creates it. GitOps tools that own the StatefulSet see a changed
//! template size: put the new size in their source too, or they revert the template (not
//! the claims, which never shrink).
//!
//! Auto-expansion measures usage with `df` in the app container (the container that
//! mounts the claim): it needs `df` in the image, and it sees the filesystem as the app
//! does (reserved blocks count as used). Above `thresholdPercent` the effective size grows
//! by `incrementPercent`, never above `maxSize`, at most once per `cooldown`.

use std::time::Duration;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use k8s_openapi::api::storage::v1::StorageClass;
use kube::api::{AttachParams, DeleteParams, Patch, PatchParams, PostParams, PropagationPolicy};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Api, ResourceExt};
use prometheus_client::encoding::EncodeLabelSet;
use stateward_runtime::lock::{Acquired, Intent, OperationLock};
use stateward_runtime::{schedule::parse_duration, time};
use tokio::io::AsyncReadExt;

use super::{BLOCKED, STEP, ScalingContext, ScalingError, World, holder, plan, publish};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VolumeLabels {
    pub namespace: String,
    /// The StatefulApp (so alerts aggregate per app, like every other per-app series).
    pub app: String,
    pub persistentvolumeclaim: String,
}

const DEFAULT_COOLDOWN: Duration = Duration::from_secs(3600);

/// `ScalingBlocked` when the claims are smaller than asked and the operator runs with
/// volume expansion turned off.
fn expansion_turned_off(desired: u64) -> (&'static str, String) {
    (
        "FeatureDisabled",
        format!(
            "spec.scaling.storage asks for {}: this operator runs with volume expansion turned off (Helm value features.volumeExpansion); nothing is resized",
            plan::quantity_of(desired)
        ),
    )
}

/// The storage step: `Some(action)` when it is working (or blocked), `None` when the
/// volumes are at their size (or no size is managed).
pub(crate) async fn reconcile(
    world: &mut World,
    ctx: &ScalingContext,
) -> Result<Option<Action>, ScalingError> {
    let Some(policy) = world
        .app
        .spec
        .scaling
        .as_ref()
        .and_then(|s| s.storage.clone())
    else {
        world.section.storage_size = None;
        world.section.pending_resize.clear();
        return Ok(None);
    };
    let now = ctx.base.clock.now();
    if let Some(auto) = &policy.auto_expand
        && ctx.config.volume_expansion
    {
        auto_expand(world, ctx, auto).await?;
    }
    let spec_size = policy.size.as_deref().and_then(plan::quantity_bytes);
    let auto_size = world
        .section
        .storage_size
        .as_deref()
        .and_then(plan::quantity_bytes);
    let Some(desired) = spec_size.max(auto_size) else {
        return Ok(None);
    };
    world.section.storage_size = Some(plan::quantity_of(desired));
    world.section.applied_size = raised_applied_size(
        world.section.applied_size.as_deref(),
        policy.size.as_deref(),
    );
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(ctx.base.client.clone(), &world.ns());
    let request = |c: &PersistentVolumeClaim| {
        c.spec
            .as_ref()
            .and_then(|s| s.resources.as_ref())
            .and_then(|r| r.requests.as_ref())
            .and_then(|r| r.get("storage"))
            .and_then(|q| plan::quantity_bytes(&q.0))
            .unwrap_or(0)
    };
    let mut live = Vec::new();
    for ordinal in 0..world.replicas() {
        for name in plan::claim_names(&world.sts, ordinal) {
            if let Some(claim) = claims.get_opt(&name).await? {
                live.push(claim);
            }
        }
    }
    let to_patch: Vec<&PersistentVolumeClaim> =
        live.iter().filter(|c| request(c) < desired).collect();
    let templates_small = world
        .sts
        .spec
        .as_ref()
        .and_then(|s| s.volume_claim_templates.as_ref())
        .is_some_and(|ts| ts.iter().any(|t| request(t) < desired));

    if to_patch.is_empty() && !templates_small {
        world.section.pending_resize = live
            .iter()
            .filter(|c| capacity(c) < desired)
            .map(|c| format!("{}: {}", c.name_any(), resize_state(c)))
            .collect();
        return Ok(None);
    }
    if !ctx.config.volume_expansion {
        // Nothing to wait for but a new spec or an operator installed with the feature.
        let (reason, message) = expansion_turned_off(desired);
        world.set(BLOCKED, true, reason, message, now);
        return Ok(Some(Action::await_change()));
    }
    // Only classes that allow expansion; otherwise say so and change nothing.
    let classes: Api<StorageClass> = Api::all(ctx.base.client.clone());
    for claim in &to_patch {
        let class = claim
            .spec
            .as_ref()
            .and_then(|s| s.storage_class_name.clone())
            .unwrap_or_default();
        let allowed = match classes.get_opt(&class).await {
            Ok(Some(sc)) => sc.allow_volume_expansion == Some(true),
            _ => false,
        };
        if !allowed {
            world.set(
                BLOCKED,
                true,
                "ExpansionNotSupported",
                format!(
                    "PVC {} cannot grow to {}: its StorageClass {class:?} does not allow volume expansion",
                    claim.name_any(),
                    plan::quantity_of(desired)
                ),
                now,
            );
            return Ok(Some(Action::requeue(super::BLOCKED_RECHECK)));
        }
    }
    let lock = OperationLock::new(
        ctx.base.client.clone(),
        &world.ns(),
        &world.app.name_any(),
        &world.app.spec.stateful_set_name,
    );
    if let Acquired::Busy(record) = lock
        .acquire(holder(&world.app), Intent::Reshape, None)
        .await?
    {
        world.set(
            BLOCKED,
            true,
            "WaitingForLock",
            format!(
                "volume expansion waits for {} {} to release the app's operation lock",
                record.holder.kind, record.holder.name
            ),
            now,
        );
        return Ok(Some(Action::requeue(STEP)));
    }
    world.section.phase = Some("Expanding".into());
    let size = plan::quantity_of(desired);
    for claim in &to_patch {
        claims
            .patch(
                &claim.name_any(),
                &PatchParams::default(),
                &Patch::Merge(
                    serde_json::json!({"spec": {"resources": {"requests": {"storage": size}}}}),
                ),
            )
            .await?;
    }
    if !to_patch.is_empty() {
        let names: Vec<String> = to_patch.iter().map(|c| c.name_any()).collect();
        publish(
            ctx,
            &world.app,
            EventType::Normal,
            "Expanding",
            format!("{} → {size}", names.join(", ")),
        )
        .await;
    }
    if templates_small {
        recreate_with_size(world, ctx, &size).await?;
    }
    Ok(Some(Action::requeue(STEP)))
}

/// The largest `storage.size` taken on, with `spec_size` now in effect: kept in
/// `status.scaling.appliedSize`, where admission compares a new `storage.size` with it, so a
/// shrink is refused even when the size was unset in between. It never goes down, stays
/// when the size is unset, and is the user's own quantity (not rounded), so applying the
/// same size again is always admitted.
fn raised_applied_size(applied: Option<&str>, spec_size: Option<&str>) -> Option<String> {
    let bytes = |q: Option<&str>| q.and_then(plan::quantity_bytes);
    match (bytes(applied), bytes(spec_size)) {
        (Some(a), Some(s)) if s <= a => applied.map(str::to_string),
        (_, Some(_)) => spec_size.map(str::to_string),
        (_, None) => applied.map(str::to_string),
    }
}

fn capacity(claim: &PersistentVolumeClaim) -> u64 {
    claim
        .status
        .as_ref()
        .and_then(|s| s.capacity.as_ref())
        .and_then(|c| c.get("storage"))
        .and_then(|q| plan::quantity_bytes(&q.0))
        .unwrap_or(0)
}

fn resize_state(claim: &PersistentVolumeClaim) -> String {
    let conditions = claim
        .status
        .as_ref()
        .and_then(|s| s.conditions.clone())
        .unwrap_or_default();
    if conditions
        .iter()
        .any(|c| c.type_ == "FileSystemResizePending" && c.status == "True")
    {
        "FileSystemResizePending: the volume grew; the driver grows the filesystem when the pod restarts".into()
    } else if conditions
        .iter()
        .any(|c| c.type_ == "Resizing" && c.status == "True")
    {
        "Resizing".into()
    } else {
        "waiting for the storage driver".into()
    }
}

/// Deletes the StatefulSet with orphan propagation (pods and claims stay) after writing
/// the new object, with the larger templates, to status; `recreate_if_journaled` creates
/// it again.
async fn recreate_with_size(
    world: &mut World,
    ctx: &ScalingContext,
    size: &str,
) -> Result<(), ScalingError> {
    let mut fresh = world.sts.clone();
    fresh.status = None;
    let meta = &mut fresh.metadata;
    meta.uid = None;
    meta.resource_version = None;
    meta.creation_timestamp = None;
    meta.generation = None;
    meta.managed_fields = None;
    meta.deletion_timestamp = None;
    meta.owner_references = world.sts.metadata.owner_references.clone();
    if let Some(templates) = fresh
        .spec
        .as_mut()
        .and_then(|s| s.volume_claim_templates.as_mut())
    {
        for t in templates {
            let requests = t
                .spec
                .get_or_insert_with(Default::default)
                .resources
                .get_or_insert_with(Default::default)
                .requests
                .get_or_insert_with(Default::default);
            requests.insert(
                "storage".into(),
                k8s_openapi::apimachinery::pkg::api::resource::Quantity(size.to_string()),
            );
        }
    }
    world.section.recreating = Some(serde_json::to_string(&fresh)?);
    super::write_status(world, ctx).await?;
    let sets: Api<StatefulSet> = Api::namespaced(ctx.base.client.clone(), &world.ns());
    let params = DeleteParams {
        propagation_policy: Some(PropagationPolicy::Orphan),
        ..DeleteParams::default()
    };
    match sets.delete(&world.sts.name_any(), &params).await {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 404 => {}
        Err(e) => return Err(e.into()),
    }
    publish(
        ctx,
        &world.app,
        EventType::Normal,
        "TemplateResized",
        format!(
            "StatefulSet {} recreated with volumeClaimTemplates of {size} (orphaning delete: pods and PVCs untouched)",
            world.sts.name_any()
        ),
    )
    .await;
    Ok(())
}

/// Creates the StatefulSet recorded in status if it is gone (the second half of a
/// recreate, also after a restart). `Some(action)` while the recreate is in progress.
pub(crate) async fn recreate_if_journaled(
    app: &stateward_api::StatefulApp,
    section: &mut stateward_api::statefulapp::ScalingStatusSection,
    existing: Option<&StatefulSet>,
    ctx: &ScalingContext,
) -> Result<Option<Action>, ScalingError> {
    let Some(journal) = section.recreating.clone() else {
        return Ok(None);
    };
    match existing {
        // The old object is still being deleted (the garbage collector orphans first).
        Some(sts) if sts.metadata.deletion_timestamp.is_some() => {
            Ok(Some(Action::requeue(Duration::from_secs(1))))
        }
        Some(_) => {
            section.recreating = None;
            Ok(None)
        }
        None => {
            let sts: StatefulSet = serde_json::from_str(&journal)?;
            let sets: Api<StatefulSet> = Api::namespaced(
                ctx.base.client.clone(),
                &app.namespace().unwrap_or_default(),
            );
            match sets.create(&PostParams::default(), &sts).await {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.code == 409 => {}
                Err(e) => return Err(e.into()),
            }
            section.recreating = None;
            Ok(Some(Action::requeue(Duration::from_secs(1))))
        }
    }
}

/// Measures each live claim with `df` in the container that mounts it, exports the
/// gauges, and grows the effective size when one is over the threshold.
async fn auto_expand(
    world: &mut World,
    ctx: &ScalingContext,
    auto: &stateward_api::statefulapp::AutoExpand,
) -> Result<(), ScalingError> {
    let now = ctx.base.clock.now();
    let Some(max) = plan::quantity_bytes(&auto.max_size) else {
        return Ok(());
    };
    let pods: Api<Pod> = Api::namespaced(ctx.base.client.clone(), &world.ns());
    let mounts = template_mounts(&world.sts);
    let mut fullest: Option<(String, u64, u64)> = None;
    for ordinal in 0..world.replicas() {
        if !world.ready(ordinal) {
            continue;
        }
        let pod = plan::pod_name(&world.sts, ordinal);
        for (template, container, path) in &mounts {
            let claim = format!("{template}-{}-{ordinal}", world.sts.name_any());
            let Some((used, size)) = df(&pods, &pod, container, path).await else {
                continue;
            };
            let labels = VolumeLabels {
                namespace: world.ns(),
                app: world.app.name_any(),
                persistentvolumeclaim: claim.clone(),
            };
            ctx.volume_used.get_or_create(&labels).set(used as i64);
            ctx.volume_capacity.get_or_create(&labels).set(size as i64);
            let percent = used.saturating_mul(100) / size.max(1);
            if percent >= u64::try_from(auto.threshold_percent).unwrap_or(80)
                && fullest
                    .as_ref()
                    .is_none_or(|(_, u, s)| used * s.max(&1) > u * size.max(1))
            {
                fullest = Some((claim, used, size));
            }
        }
    }
    let Some((claim, used, size)) = fullest else {
        return Ok(());
    };
    let cooldown = auto
        .cooldown
        .as_deref()
        .and_then(parse_duration)
        .unwrap_or(DEFAULT_COOLDOWN);
    let last = world
        .section
        .last_expansion
        .as_deref()
        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
        .map(|t| t.with_timezone(&chrono::Utc));
    if last.is_some_and(|t| (now - t).to_std().unwrap_or_default() < cooldown) {
        return Ok(());
    }
    let spec_size = world
        .app
        .spec
        .scaling
        .as_ref()
        .and_then(|s| s.storage.as_ref())
        .and_then(|s| s.size.as_deref())
        .and_then(plan::quantity_bytes)
        .unwrap_or(0);
    let current = spec_size
        .max(
            world
                .section
                .storage_size
                .as_deref()
                .and_then(plan::quantity_bytes)
                .unwrap_or(0),
        )
        .max(size);
    let Some(next) = plan::grown(current, auto.increment_percent, max) else {
        if !world
            .conditions
            .iter()
            .any(|c| c.type_ == BLOCKED && c.reason == "AtMaxSize")
        {
            publish(
                ctx,
                &world.app,
                EventType::Warning,
                "AtMaxSize",
                format!(
                    "{claim} is {}% full and already at maxSize {}",
                    used * 100 / size.max(1),
                    auto.max_size
                ),
            )
            .await;
        }
        world.set(
            BLOCKED,
            true,
            "AtMaxSize",
            format!(
                "{claim} is {}% full and already at maxSize {}",
                used * 100 / size.max(1),
                auto.max_size
            ),
            now,
        );
        return Ok(());
    };
    world.section.storage_size = Some(plan::quantity_of(next));
    world.section.last_expansion = Some(time::rfc3339(now));
    publish(
        ctx,
        &world.app,
        EventType::Normal,
        "AutoExpand",
        format!(
            "{claim} is {}% full ({used} of {size} bytes): growing the app's volumes to {}",
            used * 100 / size.max(1),
            plan::quantity_of(next)
        ),
    )
    .await;
    Ok(())
}

/// For each volumeClaimTemplate: the container that mounts it and where.
fn template_mounts(sts: &StatefulSet) -> Vec<(String, String, String)> {
    let Some(spec) = sts.spec.as_ref() else {
        return Vec::new();
    };
    let templates: Vec<String> = spec
        .volume_claim_templates
        .iter()
        .flatten()
        .filter_map(|t| t.metadata.name.clone())
        .collect();
    let mut out = Vec::new();
    for container in spec.template.spec.iter().flat_map(|s| s.containers.iter()) {
        for mount in container.volume_mounts.iter().flatten() {
            if templates.contains(&mount.name)
                && !out
                    .iter()
                    .any(|(t, _, _): &(String, String, String)| t == &mount.name)
            {
                out.push((
                    mount.name.clone(),
                    container.name.clone(),
                    mount.mount_path.clone(),
                ));
            }
        }
    }
    out
}

/// `(used, size)` in bytes of the filesystem at `path`, from `df -P -k` in the container.
async fn df(pods: &Api<Pod>, pod: &str, container: &str, path: &str) -> Option<(u64, u64)> {
    let params = AttachParams::default()
        .stdin(false)
        .stdout(true)
        .stderr(false)
        .container(container);
    let mut process = pods
        .exec(pod, vec!["df", "-P", "-k", path], &params)
        .await
        .ok()?;
    let mut out = String::new();
    process.stdout()?.read_to_string(&mut out).await.ok()?;
    parse_df(&out)
}

/// Parses POSIX `df -P -k`: the second line's 1K-blocks, used.
pub fn parse_df(out: &str) -> Option<(u64, u64)> {
    let fields: Vec<&str> = out.lines().nth(1)?.split_whitespace().collect();
    let size: u64 = fields.get(1)?.parse().ok()?;
    let used: u64 = fields.get(2)?.parse().ok()?;
    Some((used * 1024, size * 1024))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expansion_turned_off_names_the_size_the_field_and_the_value() {
        let (reason, message) = expansion_turned_off(2 * 1024 * 1024 * 1024);
        assert_eq!(reason, "FeatureDisabled");
        for part in ["2Gi", "spec.scaling.storage", "features.volumeExpansion"] {
            assert!(message.contains(part), "{message}");
        }
    }

    #[test]
    fn the_applied_size_only_grows_and_survives_an_unset_size() {
        let cases = [
            ("first size", None, Some("2Gi"), Some("2Gi")),
            ("grown", Some("2Gi"), Some("3Gi"), Some("3Gi")),
            ("same size", Some("2Gi"), Some("2Gi"), Some("2Gi")),
            (
                "same size, other units",
                Some("2Gi"),
                Some("2048Mi"),
                Some("2Gi"),
            ),
            (
                "kept as written, not rounded",
                None,
                Some("1500M"),
                Some("1500M"),
            ),
            (
                "a smaller one (ratcheted in) never lowers it",
                Some("3Gi"),
                Some("1Gi"),
                Some("3Gi"),
            ),
            ("size unset", Some("3Gi"), None, Some("3Gi")),
            ("never set", None, None, None),
        ];
        for (case, applied, spec, expected) in cases {
            assert_eq!(
                raised_applied_size(applied, spec).as_deref(),
                expected,
                "{case}"
            );
        }
    }

    #[test]
    fn reads_posix_df() {
        let out = "Filesystem     1024-blocks  Used Available Capacity Mounted on\n/dev/loop3          245679 198000     30000      87% /data\n";
        assert_eq!(parse_df(out), Some((198_000 * 1024, 245_679 * 1024)));
        assert_eq!(parse_df("garbage"), None);
    }
}
