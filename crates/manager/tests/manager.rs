//! The `stateward` binary against the local cluster: readiness, metrics, graceful
//! shutdown, leader election. Run with `cargo xtask test`.

use std::time::Duration;

use anyhow::{Result, ensure};
use stateward_testkit::harness::{Cluster, install_crds, wait_for};

mod common;
use common::Manager;

async fn crds(cluster: &Cluster) -> Result<()> {
    let _serial = cluster.serial().await?;
    install_crds(&cluster.client, &stateward_api::crds()).await
}

#[tokio::test]
async fn run_becomes_ready_serves_reconcile_metrics_and_exits_cleanly_on_sigterm() -> Result<()> {
    let cluster = Cluster::connect().await?;
    crds(&cluster).await?;
    // Scoped to its own namespace: tests share the cluster, and a cluster-wide manager
    // would act on other tests' Backups.
    let ns = cluster.namespace("manager").await?;
    let mut manager = Manager::start(&cluster, &["--namespace", ns.name.as_str()])?;
    manager.wait_ready().await?;
    let (code, metrics) = manager.get("/metrics").await?;
    ensure!(code == 200, "/metrics answered {code}");
    // controller-runtime's reconcile families, one series set per running controller,
    // zero-valued from start-up.
    for family in [
        r#"controller_runtime_reconcile_total{controller="backup",result="success"}"#,
        r#"controller_runtime_reconcile_errors_total{controller="backup"}"#,
        r#"controller_runtime_reconcile_time_seconds_count{controller="backup"}"#,
    ] {
        ensure!(
            metrics.contains(family),
            "{family} missing from /metrics:\n{metrics}"
        );
    }
    ensure!(
        metrics.trim_end().ends_with("# EOF"),
        "not OpenMetrics text:\n{metrics}"
    );
    ensure!(
        metrics.contains("# TYPE stateward_leader gauge"),
        "stateward_leader missing from /metrics:\n{metrics}"
    );
    ensure!(
        metrics.contains("stateward_leader 1"),
        "without leader election the manager acts:\n{metrics}"
    );
    ensure!(manager.get("/livez").await?.0 == 200, "/livez not ok");
    manager.signal("TERM")?;
    let started = std::time::Instant::now();
    let status = loop {
        if let Some(status) = manager.child.try_wait()? {
            break status;
        }
        ensure!(
            started.elapsed() < Duration::from_secs(20),
            "the manager ignored SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    ensure!(
        status.success(),
        "the manager exited with {status} on SIGTERM"
    );
    ns.cleanup().await
}

#[tokio::test]
async fn with_leader_election_one_acts_and_the_standby_takes_over_when_it_dies() -> Result<()> {
    let cluster = Cluster::connect().await?;
    crds(&cluster).await?;
    let ns = cluster.namespace("leader").await?;
    let args = [
        "--leader-elect",
        "--lease-namespace",
        ns.name.as_str(),
        "--lease-duration",
        "6",
        "--namespace",
        ns.name.as_str(),
    ];
    let a = Manager::start(&cluster, &args)?;
    let b = Manager::start(&cluster, &args)?;
    a.wait_ready().await?;
    b.wait_ready().await?;
    let leaders = wait_for("exactly one leader", Duration::from_secs(60), || async {
        let (la, lb) = (a.is_leader().await?, b.is_leader().await?);
        Ok((la != lb).then_some((la, lb)))
    })
    .await?;
    let (leader, standby) = if leaders.0 { (a, b) } else { (b, a) };
    // Stays that way for a while: the standby does not act.
    tokio::time::sleep(Duration::from_secs(3)).await;
    ensure!(
        leader.is_leader().await? && !standby.is_leader().await?,
        "leadership flapped"
    );
    ensure!(
        standby.get("/readyz").await?.0 == 200,
        "a healthy standby must be ready"
    );
    leader.signal("KILL")?;
    let took_over = std::time::Instant::now();
    wait_for(
        "the standby to take over",
        Duration::from_secs(30),
        || async { Ok(standby.is_leader().await?.then_some(())) },
    )
    .await?;
    eprintln!(
        "standby took over {:.1} s after the leader was killed (lease 6 s)",
        took_over.elapsed().as_secs_f64()
    );
    ensure!(
        took_over.elapsed() < Duration::from_secs(20),
        "hand-over took longer than the lease allows"
    );
    drop(leader);
    drop(standby);
    ns.cleanup().await
}
