//! The per-app operation lock on a real API server: contention, nesting, recovery.
//! Holders are ConfigMaps here (any namespaced object with a uid works the same way).

use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{DeleteParams, PostParams};
use kube::{Api, ResourceExt};
use stateward_runtime::lock::{Acquired, Holder, Intent, OperationLock};
use stateward_testkit::harness::{Cluster, from_yaml};

async fn holder(maps: &Api<ConfigMap>, name: &str) -> Result<Holder> {
    let cm = maps
        .create(
            &PostParams::default(),
            &from_yaml(&format!("metadata: {{ name: {name} }}"))?,
        )
        .await?;
    Ok(Holder {
        api_version: "v1".into(),
        kind: "ConfigMap".into(),
        resource: "configmaps".into(),
        name: name.into(),
        uid: cm.uid().context("no uid")?,
    })
}

#[tokio::test]
async fn only_one_of_many_concurrent_acquirers_wins() -> Result<()> {
    let cluster = Cluster::connect().await?;
    let ns = cluster.namespace("lock-contention").await?;
    let maps: Api<ConfigMap> = cluster.api(&ns.name);
    let mut holders = Vec::new();
    for i in 0..6 {
        holders.push(holder(&maps, &format!("op-{i}")).await?);
    }
    let lock = OperationLock::new(cluster.client.clone(), &ns.name, "db", "db");
    let attempts = holders.iter().cloned().map(|h| {
        let lock = lock.clone();
        tokio::spawn(async move { lock.acquire(h, Intent::Read, None).await })
    });
    let mut held = Vec::new();
    let mut busy = 0;
    for attempt in attempts {
        match attempt.await?? {
            Acquired::Held(record) => held.push(record),
            Acquired::Busy(_) => busy += 1,
            Acquired::Nested(_) => bail!("nobody asked for nesting"),
        }
    }
    ensure!(
        held.len() == 1 && busy == 5,
        "{} held, {busy} busy",
        held.len()
    );
    let winner = &held[0];
    let current = lock.current().await?.context("the lock is not recorded")?;
    ensure!(
        current.token == winner.token,
        "the Lease names another holder"
    );

    // Re-acquiring by the same holder (a restarted manager) keeps the same token.
    match lock
        .acquire(winner.holder.clone(), Intent::Read, None)
        .await?
    {
        Acquired::Held(again) => {
            ensure!(again.token == winner.token, "re-acquire changed the token")
        }
        other => bail!("the holder could not re-acquire its own lock: {other:?}"),
    }
    // A wrong token does not release; the right one does, then another can take it.
    ensure!(
        !lock.release("not-the-token").await?,
        "a wrong token released the lock"
    );
    ensure!(lock.release(&winner.token).await?, "release failed");
    let loser = holders
        .iter()
        .find(|h| h.uid != winner.holder.uid)
        .context("no loser")?;
    ensure!(
        matches!(
            lock.acquire(loser.clone(), Intent::Write, None).await?,
            Acquired::Held(_)
        ),
        "the lock was not free after release"
    );
    ns.cleanup().await
}

#[tokio::test]
async fn a_nested_operation_runs_under_its_parents_lock() -> Result<()> {
    let cluster = Cluster::connect().await?;
    let ns = cluster.namespace("lock-nesting").await?;
    let maps: Api<ConfigMap> = cluster.api(&ns.name);
    let scale_down = holder(&maps, "scale-down").await?;
    let backup_first = holder(&maps, "backup-first").await?;
    let stranger = holder(&maps, "stranger").await?;
    let lock = OperationLock::new(cluster.client.clone(), &ns.name, "db", "db");
    let Acquired::Held(parent) = lock
        .acquire(scale_down, Intent::Stop { replicas: 3 }, None)
        .await?
    else {
        bail!("the parent did not get the lock");
    };
    // Before the parent names its child, the token alone opens nothing.
    ensure!(
        matches!(
            lock.acquire(backup_first.clone(), Intent::Read, Some(&parent.token))
                .await?,
            Acquired::Busy(_)
        ),
        "the token opened the lock for an operation the parent did not name"
    );
    lock.allow_nested(&parent.token, &backup_first.uid).await?;
    match lock
        .acquire(backup_first, Intent::Read, Some(&parent.token))
        .await?
    {
        Acquired::Nested(record) => ensure!(
            record.token == parent.token && record.intent == Intent::Stop { replicas: 3 },
            "{record:?}"
        ),
        other => bail!("the nested backup was not let in: {other:?}"),
    }
    ensure!(
        matches!(
            lock.acquire(stranger.clone(), Intent::Read, Some("forged"))
                .await?,
            Acquired::Busy(_)
        ),
        "a wrong parent token got in"
    );
    ensure!(
        matches!(
            lock.acquire(stranger, Intent::Read, Some(&parent.token))
                .await?,
            Acquired::Busy(_)
        ),
        "the parent's real token, copied onto another operation, got in"
    );
    ensure!(
        lock.current().await?.map(|r| r.token) == Some(parent.token.clone()),
        "nesting changed the lock"
    );
    ns.cleanup().await
}

#[tokio::test]
async fn a_lock_whose_holder_is_gone_or_finished_is_recovered() -> Result<()> {
    let cluster = Cluster::connect().await?;
    let ns = cluster.namespace("lock-recovery").await?;
    let maps: Api<ConfigMap> = cluster.api(&ns.name);
    let lock = OperationLock::new(cluster.client.clone(), &ns.name, "db", "db");

    // The holder crashed and its object was deleted.
    let crashed = holder(&maps, "crashed").await?;
    ensure!(matches!(
        lock.acquire(crashed, Intent::Write, None).await?,
        Acquired::Held(_)
    ));
    let next = holder(&maps, "next").await?;
    ensure!(
        matches!(
            lock.acquire(next.clone(), Intent::Read, None).await?,
            Acquired::Busy(_)
        ),
        "a live holder was displaced"
    );
    maps.delete("crashed", &DeleteParams::default()).await?;
    let Acquired::Held(recovered) = lock.acquire(next.clone(), Intent::Read, None).await? else {
        bail!("the lock of a deleted holder was not recovered");
    };
    ensure!(recovered.holder == next);

    // The holder finished (its status.phase says so) without releasing: a Pod that ran
    // to completion stands in for a finished operation.
    let pods: Api<k8s_openapi::api::core::v1::Pod> = cluster.api(&ns.name);
    let pod = pods
        .create(
            &PostParams::default(),
            &from_yaml("metadata: { name: finished-op }\nspec:\n  restartPolicy: Never\n  containers: [{ name: main, image: stateward-probe, args: [exit, \"0\"] }]\n")?,
        )
        .await?;
    let finished = Holder {
        api_version: "v1".into(),
        kind: "Pod".into(),
        resource: "pods".into(),
        name: "finished-op".into(),
        uid: pod.uid().context("no uid")?,
    };
    lock.release(&recovered.token).await?;
    ensure!(matches!(
        lock.acquire(finished, Intent::Write, None).await?,
        Acquired::Held(_)
    ));
    let third = holder(&maps, "third").await?;
    stateward_testkit::harness::wait_pod_phase(
        &pods,
        "finished-op",
        "Succeeded",
        std::time::Duration::from_secs(120),
    )
    .await?;
    ensure!(
        matches!(
            lock.acquire(third, Intent::Reshape, None).await?,
            Acquired::Held(_)
        ),
        "a finished holder kept the lock"
    );
    ns.cleanup().await
}

#[tokio::test]
async fn a_lock_held_in_an_earlier_managers_app_named_lease_carries_over() -> Result<()> {
    use k8s_openapi::api::coordination::v1::Lease;
    let cluster = Cluster::connect().await?;
    let ns = cluster.namespace("lock-upgrade").await?;
    let maps: Api<ConfigMap> = cluster.api(&ns.name);
    let leases: Api<Lease> = cluster.api(&ns.name);
    // An earlier manager's lock: a Lease named after the app, holding a swap mark.
    let restore = holder(&maps, "old-restore").await?;
    let record = serde_json::json!({
        "holder": restore, "intent": {"type": "Stop", "replicas": 2}, "token": "old-token",
        "acquiredAt": "2026-12-01T10:00:00Z", "incompleteSwap": "Restore old-restore began swapping",
    });
    leases
        .create(
            &PostParams::default(),
            &serde_json::from_value(serde_json::json!({
                "metadata": {"name": "stateward-app-shop", "annotations": {"stateward.io/operation-lock": record.to_string()}},
            }))?,
        )
        .await?;
    let lock = OperationLock::new(cluster.client.clone(), &ns.name, "shop", "shop-db");
    ensure!(
        lock.current().await?.map(|r| r.token).as_deref() == Some("old-token"),
        "the new manager sees the old lock before it moves"
    );
    // A backup after the upgrade waits for the old holder, and the lock moves over.
    let backup = holder(&maps, "new-backup").await?;
    ensure!(
        matches!(
            lock.acquire(backup.clone(), Intent::Read, None).await?,
            Acquired::Busy(_)
        ),
        "the old lock was ignored"
    );
    ensure!(
        leases.get_opt("stateward-app-shop").await?.is_none(),
        "the app-named Lease stays after the move"
    );
    let moved = lock
        .current()
        .await?
        .context("the lock was lost in the move")?;
    ensure!(
        lock.lease_name() == "stateward-sts-shop-db"
            && moved.token == "old-token"
            && moved.incomplete_swap.is_some(),
        "{moved:?}"
    );
    // The old holder's token still releases it.
    ensure!(
        lock.release("old-token").await?,
        "the old token no longer releases"
    );
    ensure!(matches!(
        lock.acquire(backup, Intent::Read, None).await?,
        Acquired::Held(_)
    ));
    ns.cleanup().await
}
