//! Operations end in bounded time with a reason (issue 14), against the local cluster:
//! names of any legal length, agent pods refused by admission or quota, and restores into
//! a namespace that has never seen Stateward. Run with `cargo xtask test`.

mod common;

use anyhow::{Result, ensure};
use stateward_api::RestorePhase;

use common::*;

#[tokio::test]
async fn a_restore_and_a_backup_with_long_names_of_an_app_named_with_63_characters_complete()
-> Result<()> {
    let world = World::new("rst-long").await?;
    // Names as long as Kubernetes allows for each kind: every label and Job name derived
    // from them must still fit (a 63-character limit), or the app stays stopped.
    let app_name = format!("app-{}", "a".repeat(59));
    let backup_name = format!("backup-{}", "b".repeat(70));
    let restore_name = format!("restore.of-{}", "r".repeat(80));
    assert!(app_name.len() == 63 && backup_name.len() > 70 && restore_name.len() > 70);
    world.apply(&writer("ln", 1, "32Mi")).await?;
    world.apply(&app(&app_name, "ln", "")).await?;
    world.wait_ready("ln", 1).await?;
    let before = world.fingerprint("ln-0", "/data").await?;
    world.backup(&backup_name, &app_name).await?;
    world.sh("ln-0", DAMAGE).await?;

    let restore = world
        .restore(
            &restore_name,
            &format!("  source: {{ backup: {backup_name} }}\n  target: {{ app: {app_name} }}"),
        )
        .await?;
    ensure!(
        phase(&restore) == Some(RestorePhase::Completed),
        "{:?}",
        ready(&restore)
    );
    world.wait_ready("ln", 1).await?;
    ensure!(
        world.fingerprint("ln-0", "/data").await? == before,
        "the long-named restore brought the data back"
    );
    world.finish().await
}
