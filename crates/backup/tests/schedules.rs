//! Scheduled backups and retention against the real API server (and, for retention and
//! deletion, real runs writing to the real S3 server). Time comes from a manual clock the
//! tests move, never from long sleeps. Run with `cargo xtask test`.

use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use chrono::{DateTime, TimeZone, Utc};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::{Api, ResourceExt};
use stateward_api::common::{
    APP_LABEL, DATA_FINALIZER, KEEP_LABEL, SCHEDULE_LABEL, SCHEDULED_TIME_ANNOTATION,
};
use stateward_api::statefulapp::{ScheduleStatus, StatefulApp};
use stateward_api::{Backup, BackupPhase, DeletionPolicy};
use stateward_backup::{Config, ScheduleConfig};
use stateward_runtime::time::ManualClock;
use stateward_testkit::harness::{wait_for, wait_pod_ready};

mod common;
use common::*;

fn utc(y: i32, mo: u32, d: u32, h: u32, mi: u32, s: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(y, mo, d, h, mi, s)
        .single()
        .unwrap_or_default()
}

/// Controller settings for these tests: the scheduler looks every second, so a moved
/// clock is noticed at once.
fn config(max_deletions: usize) -> Config {
    let mut config = Config {
        schedules: ScheduleConfig {
            resync: Duration::from_secs(1),
            max_deletions_per_pass: max_deletions,
        },
        ..Default::default()
    };
    config.runs.orphan_wait = Duration::from_secs(10);
    config
}

/// A StatefulApp `name` on StatefulSet `sts` with these schedules (YAML list items,
/// indented by 4) and extra spec lines.
fn scheduled_app(name: &str, sts: &str, schedules: &str, extra: &str) -> String {
    format!(
        "apiVersion: stateward.io/v1alpha1\nkind: StatefulApp\nmetadata: {{ name: {name} }}\nspec:\n  statefulSetName: {sts}\n{extra}  backup:\n    repository: repo\n    schedules:\n{schedules}"
    )
}

impl World {
    fn apps(&self) -> Api<StatefulApp> {
        self.cluster.api(&self.ns.name)
    }

    /// Waits until schedule `schedule` of `app` satisfies `check`.
    async fn wait_schedule(
        &self,
        app: &str,
        schedule: &str,
        what: &str,
        check: impl Fn(&ScheduleStatus) -> bool,
    ) -> Result<ScheduleStatus> {
        let apps = self.apps();
        wait_for(&format!("{app}/{schedule}: {what}"), MINUTE, || async {
            let app = apps.get(app).await?;
            let state = app
                .status
                .and_then(|s| s.backup)
                .and_then(|b| b.schedules.get(schedule).cloned());
            Ok(state.filter(|s| check(s)))
        })
        .await
    }

    /// The names of the Backups of `app`, sorted.
    async fn backup_names(&self, app: &str) -> Result<Vec<String>> {
        let mut names: Vec<String> = self
            .backups()
            .list(&ListParams::default())
            .await?
            .items
            .into_iter()
            .filter(|b| b.spec.app == app)
            .map(|b| b.name_any())
            .collect();
        names.sort();
        Ok(names)
    }

    async fn wait_backup_exists(&self, name: &str) -> Result<Backup> {
        let api = self.backups();
        wait_for(&format!("Backup {name} to be created"), MINUTE, || async {
            Ok(api.get_opt(name).await?)
        })
        .await
    }

    async fn wait_backup_gone(&self, name: &str) -> Result<()> {
        let api = self.backups();
        wait_for(&format!("Backup {name} to be gone"), MINUTE, || async {
            Ok(api.get_opt(name).await?.is_none().then_some(()))
        })
        .await
    }

    /// Lets the scheduler look a few times at the current (manual) time.
    async fn settle(&self) {
        tokio::time::sleep(Duration::from_secs(3)).await;
    }

    async fn events(&self, type_: &str, reason: &str) -> Result<Vec<String>> {
        let events: Api<k8s_openapi::api::events::v1::Event> = self.cluster.api(&self.ns.name);
        Ok(events
            .list(&ListParams::default())
            .await?
            .items
            .into_iter()
            .filter(|e| e.type_.as_deref() == Some(type_) && e.reason.as_deref() == Some(reason))
            .filter_map(|e| e.note)
            .collect())
    }

    fn app_condition(app: &StatefulApp, type_: &str) -> Option<(String, String, String)> {
        app.status
            .as_ref()?
            .conditions
            .iter()
            .find(|c| c.type_ == type_)
            .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
    }
}

#[tokio::test]
async fn schedules_fire_at_their_slot_in_their_time_zone_under_documented_names() -> Result<()> {
    let clock = ManualClock::new(utc(2026, 3, 28, 20, 0, 0));
    let w = World::start(
        "sched-tz",
        config(10),
        Loops::SchedulerOnly,
        Some(clock.clone()),
    )
    .await?;
    w.apply(&scheduled_app(
        "tz",
        "db",
        // Allow: with only the scheduler running, its Backups stay Pending, and the
        // default Forbid would skip every later slot.
        "    - { name: kathmandu, cron: \"30 2 * * *\", timeZone: Asia/Kathmandu, concurrencyPolicy: Allow }\n    - { name: berlin, cron: \"30 2 * * *\", timeZone: Europe/Berlin, concurrencyPolicy: Allow }\n",
        "",
    ))
    .await?;
    // Kathmandu is UTC+05:45: 02:30 local is 20:45 UTC the day before.
    w.wait_schedule("tz", "kathmandu", "next at 20:45 UTC", |s| {
        s.next_scheduled_time.as_deref() == Some("2026-03-28T20:45:00Z")
    })
    .await?;
    // Berlin springs forward that night: 02:30 does not exist and runs at 03:00 CEST.
    w.wait_schedule("tz", "berlin", "next right after the DST gap", |s| {
        s.next_scheduled_time.as_deref() == Some("2026-03-29T01:00:00Z")
    })
    .await?;
    ensure!(
        w.backup_names("tz").await?.is_empty(),
        "nothing fires early"
    );

    clock.set(utc(2026, 3, 28, 20, 45, 5));
    let fired = w.wait_backup_exists("tz-kathmandu-202603282045").await?;
    ensure!(fired.labels().get(APP_LABEL).map(String::as_str) == Some("tz"));
    ensure!(fired.labels().get(SCHEDULE_LABEL).map(String::as_str) == Some("kathmandu"));
    ensure!(
        fired
            .annotations()
            .get(SCHEDULED_TIME_ANNOTATION)
            .map(String::as_str)
            == Some("2026-03-28T20:45:00Z")
    );
    ensure!(fired.spec.deletion_policy == DeletionPolicy::Delete);
    ensure!(fired.finalizers().iter().any(|f| f == DATA_FINALIZER));
    ensure!(
        fired.owner_references().is_empty(),
        "Backups are not owned by the app"
    );
    w.settle().await;
    ensure!(w.backup_names("tz").await? == vec!["tz-kathmandu-202603282045"]);

    clock.set(utc(2026, 3, 29, 1, 0, 5));
    w.wait_backup_exists("tz-berlin-202603290100").await?;
    clock.set(utc(2026, 3, 29, 20, 45, 5));
    w.wait_backup_exists("tz-kathmandu-202603292045").await?;
    // The next night, 02:30 exists again, now CEST (UTC+2).
    clock.set(utc(2026, 3, 30, 0, 30, 5));
    w.wait_backup_exists("tz-berlin-202603300030").await?;
    let state = w
        .wait_schedule("tz", "berlin", "last slot recorded", |s| {
            s.last_scheduled_time.as_deref() == Some("2026-03-30T00:30:00Z")
        })
        .await?;
    ensure!(
        state.missed_runs == 0 && state.skipped_slots == 0,
        "{state:?}"
    );
    ensure!(state.last_backup.as_deref() == Some("tz-berlin-202603300030"));

    // Deleting the app keeps its Backups (backupsOnDelete defaults to Retain).
    w.apps().delete("tz", &DeleteParams::default()).await?;
    let apps = w.apps();
    wait_for("app tz to be gone", MINUTE, || async {
        Ok(apps.get_opt("tz").await?.is_none().then_some(()))
    })
    .await?;
    ensure!(
        w.backup_names("tz").await?.len() == 4,
        "the app's Backups stay"
    );

    // Fall back on 2026-10-25: 02:30 happens twice (CEST, then CET); it fires once.
    clock.set(utc(2026, 10, 24, 12, 0, 0));
    w.apply(&scheduled_app(
        "fall",
        "db",
        "    - { name: berlin, cron: \"30 2 * * *\", timeZone: Europe/Berlin, concurrencyPolicy: Allow }\n",
        "",
    ))
    .await?;
    w.wait_schedule("fall", "berlin", "next at the first 02:30", |s| {
        s.next_scheduled_time.as_deref() == Some("2026-10-25T00:30:00Z")
    })
    .await?;
    clock.set(utc(2026, 10, 25, 0, 30, 5));
    w.wait_backup_exists("fall-berlin-202610250030").await?;
    clock.set(utc(2026, 10, 25, 1, 30, 5)); // the second 02:30
    w.wait_schedule("fall", "berlin", "next is tomorrow", |s| {
        s.next_scheduled_time.as_deref() == Some("2026-10-26T01:30:00Z")
    })
    .await?;
    w.settle().await;
    ensure!(w.backup_names("fall").await? == vec!["fall-berlin-202610250030"]);
    clock.set(utc(2026, 10, 26, 1, 30, 5));
    w.wait_backup_exists("fall-berlin-202610260130").await?;

    let metrics = w.metrics.encode();
    let line = metrics
        .lines()
        .find(|l| {
            l.starts_with("stateward_backup_next_run_timestamp_seconds")
                && l.contains("app=\"fall\"")
        })
        .context("next-run gauge")?;
    ensure!(
        line.ends_with(&format!(" {}.0", utc(2026, 10, 27, 1, 30, 0).timestamp())),
        "{line}"
    );
    w.finish().await
}

#[tokio::test]
async fn after_downtime_run_once_catches_up_once_skip_does_not_and_suspend_never_bursts()
-> Result<()> {
    let clock = ManualClock::new(utc(2026, 11, 25, 10, 30, 0));
    let mut w = World::start(
        "sched-down",
        config(10),
        Loops::SchedulerOnly,
        Some(clock.clone()),
    )
    .await?;
    let schedules = |paused: bool| {
        format!(
            "    - {{ name: once, cron: \"@hourly\", concurrencyPolicy: Allow }}\n    \
             - {{ name: skip, cron: \"0 * * * *\", missedRunPolicy: Skip, concurrencyPolicy: Allow }}\n    \
             - {{ name: paused, cron: \"0 * * * *\", suspend: {paused}, concurrencyPolicy: Allow }}\n"
        )
    };
    w.apply(&scheduled_app("down", "db", &schedules(true), ""))
        .await?;
    for s in ["once", "skip"] {
        w.wait_schedule("down", s, "next at 11:00", |s| {
            s.next_scheduled_time.as_deref() == Some("2026-11-25T11:00:00Z")
        })
        .await?;
    }
    w.wait_schedule("down", "paused", "suspended", |s| {
        s.suspended && s.next_scheduled_time.is_none()
    })
    .await?;

    // The manager is down across the 11:00 and 12:00 slots.
    w.stop_controller().await;
    clock.set(utc(2026, 11, 25, 12, 20, 0));
    w.start_controller();
    let catch_up = w.wait_backup_exists("down-once-202611251200").await?;
    ensure!(
        catch_up
            .annotations()
            .get("stateward.io/catch-up")
            .map(String::as_str)
            == Some("true")
    );
    let once = w
        .wait_schedule("down", "once", "two missed runs", |s| s.missed_runs == 2)
        .await?;
    ensure!(
        once.last_scheduled_time.as_deref() == Some("2026-11-25T12:00:00Z"),
        "{once:?}"
    );
    let skip = w
        .wait_schedule("down", "skip", "two missed runs", |s| s.missed_runs == 2)
        .await?;
    ensure!(
        skip.last_skipped_time.as_deref() == Some("2026-11-25T12:00:00Z"),
        "{skip:?}"
    );
    ensure!(
        skip.last_skip_reason
            .as_deref()
            .is_some_and(|r| r.contains("missed")),
        "{skip:?}"
    );
    ensure!(skip.last_scheduled_time.is_none());
    w.settle().await;
    ensure!(
        w.backup_names("down").await? == vec!["down-once-202611251200"],
        "exactly one catch-up, no burst: {:?}",
        w.backup_names("down").await?
    );
    ensure!(!w.events("Warning", "MissedRun").await?.is_empty());
    let metrics = w.metrics.encode();
    ensure!(
        metrics
            .lines()
            .any(|l| l.starts_with("stateward_backup_missed_runs_total")
                && l.contains("schedule=\"skip\"")
                && l.ends_with(" 2")),
        "{metrics}"
    );

    // Lifting the suspension fires nothing for the slots it covered; the next slot fires.
    w.apply(&scheduled_app("down", "db", &schedules(false), ""))
        .await?;
    w.wait_schedule("down", "paused", "resumed, next at 13:00", |s| {
        !s.suspended && s.next_scheduled_time.as_deref() == Some("2026-11-25T13:00:00Z")
    })
    .await?;
    w.settle().await;
    ensure!(
        w.backup_names("down").await?.len() == 1,
        "no burst after resuming"
    );
    clock.set(utc(2026, 11, 25, 13, 0, 5));
    for name in [
        "down-once-202611251300",
        "down-skip-202611251300",
        "down-paused-202611251300",
    ] {
        w.wait_backup_exists(name).await?;
    }
    w.settle().await;
    ensure!(w.backup_names("down").await?.len() == 4);
    w.finish().await
}

#[tokio::test]
async fn forbid_skips_a_slot_while_a_run_is_in_progress_and_replace_cancels_it() -> Result<()> {
    let clock = ManualClock::new(utc(2026, 11, 25, 10, 59, 50));
    let w = World::start(
        "sched-conc",
        config(10),
        Loops::SchedulerOnly,
        Some(clock.clone()),
    )
    .await?;
    w.apply(&scheduled_app(
        "conc",
        "db",
        "    - { name: forbid, cron: \"0 * * * *\" }\n    - { name: replace, cron: \"0 * * * *\", concurrencyPolicy: Replace }\n",
        "",
    ))
    .await?;
    w.wait_schedule("conc", "forbid", "next at 11:00", |s| {
        s.next_scheduled_time.is_some()
    })
    .await?;
    clock.set(utc(2026, 11, 25, 11, 0, 5));
    // Only the scheduler runs: these stay Pending, as runs in progress.
    w.wait_backup_exists("conc-forbid-202611251100").await?;
    w.wait_backup_exists("conc-replace-202611251100").await?;

    clock.set(utc(2026, 11, 25, 12, 0, 5));
    w.wait_backup_exists("conc-replace-202611251200").await?;
    let replaced = w.backups().get("conc-replace-202611251100").await?;
    ensure!(
        replaced.spec.cancel == Some(true),
        "Replace cancels the running backup"
    );
    let forbid = w
        .wait_schedule("conc", "forbid", "a skipped slot", |s| s.skipped_slots == 1)
        .await?;
    ensure!(
        forbid
            .last_skip_reason
            .as_deref()
            .is_some_and(|r| r.contains("Forbid") && r.contains("conc-forbid-202611251100")),
        "{forbid:?}"
    );
    ensure!(forbid.last_skipped_time.as_deref() == Some("2026-11-25T12:00:00Z"));
    w.settle().await;
    ensure!(
        w.backups()
            .get_opt("conc-forbid-202611251200")
            .await?
            .is_none(),
        "Forbid never starts a second run"
    );
    ensure!(!w.events("Normal", "SlotSkipped").await?.is_empty());
    w.finish().await
}

#[tokio::test]
async fn bad_schedules_are_rejected_or_named_in_a_condition_and_never_fire() -> Result<()> {
    let clock = ManualClock::new(utc(2026, 11, 25, 10, 30, 0));
    let w = World::start(
        "sched-bad",
        config(10),
        Loops::SchedulerOnly,
        Some(clock.clone()),
    )
    .await?;
    // Rejected by the API server: shape of the cron, negative counts, duplicate names.
    for (schedules, field) in [
        (
            "    - { name: a, cron: \"0 * * *\" }\n",
            "spec.backup.schedules[0].cron",
        ),
        (
            "    - { name: a, cron: \"@daily\", retention: { keepLast: -1 } }\n",
            "spec.backup.schedules[0].retention.keepLast",
        ),
        (
            "    - { name: a, cron: \"@daily\" }\n    - { name: a, cron: \"@hourly\" }\n",
            // Server-side apply names the duplicate key; a create says "Duplicate value".
            "duplicate entries for key [name=\"a\"]",
        ),
        (
            "    - { name: a, cron: \"@daily\", retention: {} }\n",
            "spec.backup.schedules[0].retention",
        ),
    ] {
        let err = w
            .apply(&scheduled_app("rejected", "db", schedules, ""))
            .await
            .err()
            .with_context(|| format!("accepted: {schedules}"))?;
        ensure!(format!("{err:#}").contains(field), "{field}: {err:#}");
    }
    // Checked by the controller: what a schema cannot know.
    w.apply(&scheduled_app(
        "bad",
        "db",
        "    - { name: ok, cron: \"0 * * * *\" }\n    - { name: badcron, cron: \"61 * * * *\" }\n    - { name: badzone, cron: \"0 * * * *\", timeZone: Mars/Olympus }\n",
        "",
    ))
    .await?;
    let apps = w.apps();
    let (status, reason, message) = wait_for("SchedulesValid False", MINUTE, || async {
        let app = apps.get("bad").await?;
        Ok(World::app_condition(&app, "SchedulesValid").filter(|(s, _, _)| s == "False"))
    })
    .await?;
    ensure!(status == "False" && reason == "InvalidSchedule");
    ensure!(
        message.contains("spec.backup.schedules[badcron].cron"),
        "{message}"
    );
    ensure!(
        message.contains("spec.backup.schedules[badzone].timeZone"),
        "{message}"
    );
    ensure!(message.contains("Mars/Olympus"), "{message}");
    ensure!(!w.events("Warning", "InvalidSchedule").await?.is_empty());
    clock.set(utc(2026, 11, 25, 11, 0, 5));
    w.wait_backup_exists("bad-ok-202611251100").await?;
    w.settle().await;
    ensure!(
        w.backup_names("bad").await? == vec!["bad-ok-202611251100"],
        "only the valid schedule fires"
    );
    w.finish().await
}

/// Moves the clock to `hour`:00:05 on 2026-11-25 and waits for that slot's run to end.
async fn run_slot(w: &World, clock: &ManualClock, hour: u32) -> Result<Backup> {
    clock.set(utc(2026, 11, 25, hour, 0, 5));
    let name = format!("ret-hourly-20261125{hour:02}00");
    w.wait_backup_exists(&name).await?;
    w.wait_done(&name, 3 * MINUTE).await
}

async fn scale(w: &World, sts: &str, replicas: i32) -> Result<()> {
    let api: Api<StatefulSet> = w.cluster.api(&w.ns.name);
    api.patch(
        sts,
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"spec": {"replicas": replicas}})),
    )
    .await?;
    Ok(())
}

#[tokio::test]
async fn retention_prunes_with_its_data_keeps_the_last_success_and_the_breaker_stops_mass_deletion()
-> Result<()> {
    let clock = ManualClock::new(utc(2026, 11, 25, 10, 59, 0));
    let w = World::start("sched-ret", config(2), Loops::All, Some(clock.clone())).await?;
    w.apply(&writer_statefulset("ret", 1)).await?;
    wait_pod_ready(&w.pods(), "ret-0", 2 * MINUTE).await?;
    w.apply(&scheduled_app(
        "ret",
        "ret",
        "    - { name: hourly, cron: \"0 * * * *\", retention: { keepLast: 2 } }\n",
        "",
    ))
    .await?;
    w.wait_schedule("ret", "hourly", "next at 11:00", |s| {
        s.next_scheduled_time.is_some()
    })
    .await?;
    let mut locations = Vec::new();
    for hour in [11, 12] {
        let backup = run_slot(&w, &clock, hour).await?;
        let (status, _) = completed_with_key(&backup)?;
        locations.push(status.location.context("location")?);
    }
    // The forecast: the next success will push the 11:00 backup out.
    w.wait_schedule("ret", "hourly", "a forecast", |s| {
        s.next_to_prune == vec!["ret-hourly-202611251100"]
    })
    .await?;
    let backup = run_slot(&w, &clock, 13).await?;
    let (status, _) = completed_with_key(&backup)?;
    locations.push(status.location.context("location")?);
    // keepLast 2: the 11:00 backup goes, and its objects with it.
    w.wait_backup_gone("ret-hourly-202611251100").await?;
    ensure!(
        w.keys(&format!("{}/", locations[0])).await?.is_empty(),
        "pruned data is deleted"
    );
    for kept in &locations[1..] {
        ensure!(
            w.keys(&format!("{kept}/manifest.json")).await?.len() == 1,
            "{kept} is kept"
        );
    }
    let state = w
        .wait_schedule("ret", "hourly", "one pruned", |s| s.pruned == 1)
        .await?;
    ensure!(
        state.last_pruned == vec!["ret-hourly-202611251100"],
        "{state:?}"
    );
    ensure!(state.retained == Some(2), "{state:?}");
    ensure!(!w.events("Normal", "Pruned").await?.is_empty());
    ensure!(!w.events("Normal", "DataDeleted").await?.is_empty());

    // Every later run fails (the app is scaled to zero): the successes stay.
    scale(&w, "ret", 0).await?;
    let pods = w.pods();
    wait_for("ret-0 to be gone", 2 * MINUTE, || async {
        Ok(pods.get_opt("ret-0").await?.is_none().then_some(()))
    })
    .await?;
    for hour in [14, 15, 16, 17] {
        let backup = run_slot(&w, &clock, hour).await?;
        ensure!(
            backup.status.as_ref().and_then(|s| s.phase) == Some(BackupPhase::Failed),
            "{}",
            failed_reason(&backup)
        );
    }
    // Failures never push a success out; the oldest failure beyond three goes.
    w.wait_backup_gone("ret-hourly-202611251400").await?;
    w.settle().await;
    ensure!(
        w.backup_names("ret").await?
            == vec![
                "ret-hourly-202611251200",
                "ret-hourly-202611251300",
                "ret-hourly-202611251500",
                "ret-hourly-202611251600",
                "ret-hourly-202611251700"
            ],
        "{:?}",
        w.backup_names("ret").await?
    );
    let apps = w.apps();
    let (_, reason, message) = wait_for("BackupsHealthy False", MINUTE, || async {
        let app = apps.get("ret").await?;
        Ok(World::app_condition(&app, "BackupsHealthy").filter(|(s, _, _)| s == "False"))
    })
    .await?;
    ensure!(
        reason == "BackupTooOld" && message.contains("ret-hourly-202611251300"),
        "{message}"
    );

    // A success again: now four Backups are due to go (12:00 and the three failures),
    // more than the breaker's 2: nothing is deleted, all four are reported.
    scale(&w, "ret", 1).await?;
    wait_pod_ready(&w.pods(), "ret-0", 2 * MINUTE).await?;
    completed_with_key(&run_slot(&w, &clock, 18).await?)?;
    let state = w
        .wait_schedule("ret", "hourly", "deletions held back", |s| {
            s.pending_prune.len() == 4
        })
        .await?;
    ensure!(
        state
            .pending_prune
            .contains(&"ret-hourly-202611251200".to_string()),
        "{state:?}"
    );
    w.settle().await;
    ensure!(
        w.backup_names("ret").await?.len() == 6,
        "the breaker deleted nothing"
    );
    let blocked = w.events("Warning", "RetentionBlocked").await?;
    ensure!(
        blocked.iter().any(|n| n.contains("4 Backups")),
        "{blocked:?}"
    );
    let app = w.apps().get("ret").await?;
    ensure!(
        World::app_condition(&app, "BackupsHealthy").is_some_and(|(s, _, _)| s == "True"),
        "{:?}",
        World::app_condition(&app, "BackupsHealthy")
    );

    // A Backup marked to keep is never pruned. Mark one (three left to prune: still over
    // the cap), then delete one by hand: the two left are within the cap and go.
    w.backups()
        .patch(
            "ret-hourly-202611251500",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"metadata": {"labels": {KEEP_LABEL: "true"}}})),
        )
        .await?;
    w.wait_schedule("ret", "hourly", "three held back", |s| {
        s.pending_prune.len() == 3
    })
    .await?;
    w.backups()
        .delete("ret-hourly-202611251200", &DeleteParams::default())
        .await?;
    for name in [
        "ret-hourly-202611251200",
        "ret-hourly-202611251600",
        "ret-hourly-202611251700",
    ] {
        w.wait_backup_gone(name).await?;
    }
    w.settle().await;
    ensure!(
        w.backup_names("ret").await?
            == vec![
                "ret-hourly-202611251300",
                "ret-hourly-202611251500",
                "ret-hourly-202611251800"
            ],
        "{:?}",
        w.backup_names("ret").await?
    );
    w.finish().await
}

#[tokio::test]
async fn deleting_backups_follows_their_policy_and_namespace_deletion_never_hangs() -> Result<()> {
    let w = World::start("sched-del", config(10), Loops::All, None).await?;
    w.apply(&writer_statefulset("del", 1)).await?;
    wait_pod_ready(&w.pods(), "del-0", 2 * MINUTE).await?;
    w.apply(&app("del", "del", "")).await?;
    let location = |b: &Backup| {
        b.status
            .as_ref()
            .and_then(|s| s.location.clone())
            .unwrap_or_default()
    };

    let retained = w.backup("by-hand", "del", "").await?;
    completed_with_key(&retained)?;
    ensure!(
        retained.spec.deletion_policy == DeletionPolicy::Retain,
        "by hand: Retain"
    );
    ensure!(retained.finalizers().is_empty());
    let dropped = w
        .backup("dropped", "del", "  deletionPolicy: Delete\n")
        .await?;
    completed_with_key(&dropped)?;
    ensure!(dropped.finalizers().iter().any(|f| f == DATA_FINALIZER));
    let before_retained = w.keys(&format!("{}/", location(&retained))).await?;
    ensure!(!before_retained.is_empty());

    // Delete: exactly its objects go.
    w.backups()
        .delete("dropped", &DeleteParams::default())
        .await?;
    w.wait_backup_gone("dropped").await?;
    ensure!(
        w.keys(&format!("{}/", location(&dropped)))
            .await?
            .is_empty()
    );
    ensure!(w.keys(&format!("{}/", location(&retained))).await? == before_retained);
    ensure!(!w.events("Normal", "DataDeleted").await?.is_empty());
    // Retain: the objects stay.
    w.backups()
        .delete("by-hand", &DeleteParams::default())
        .await?;
    w.wait_backup_gone("by-hand").await?;
    ensure!(w.keys(&format!("{}/", location(&retained))).await? == before_retained);

    // backupsOnDelete: Delete — deleting the app deletes its Backups (and, by their
    // policy, their data). Its own StatefulSet: a second app on `del` would be
    // AlreadyManaged.
    w.apply(&writer_statefulset("gone", 1)).await?;
    wait_pod_ready(&w.pods(), "gone-0", 2 * MINUTE).await?;
    w.apply(
        &scheduled_app("gone", "gone", "", "  backupsOnDelete: Delete\n")
            .replace("    schedules:\n", ""),
    )
    .await?;
    let with_app = w
        .backup("with-app", "gone", "  deletionPolicy: Delete\n")
        .await?;
    completed_with_key(&with_app)?;
    w.apps().delete("gone", &DeleteParams::default()).await?;
    w.wait_backup_gone("with-app").await?;
    ensure!(
        w.keys(&format!("{}/", location(&with_app)))
            .await?
            .is_empty()
    );
    let apps = w.apps();
    wait_for("app gone to be gone", MINUTE, || async {
        Ok(apps.get_opt("gone").await?.is_none().then_some(()))
    })
    .await?;

    // The Secret goes first, then the namespace: the finalizer cannot reach the data and
    // orphans it after the bounded wait (10 s here) instead of blocking the namespace.
    let last = w
        .backup("last", "del", "  deletionPolicy: Delete\n")
        .await?;
    completed_with_key(&last)?;
    let secrets: Api<Secret> = w.cluster.api(&w.ns.name);
    secrets.delete("s3", &DeleteParams::default()).await?;
    let namespaces: Api<Namespace> = Api::all(w.cluster.client.clone());
    let started = std::time::Instant::now();
    namespaces
        .delete(&w.ns.name, &DeleteParams::default())
        .await?;
    wait_for("the namespace to be gone", 3 * MINUTE, || async {
        Ok(namespaces
            .get_opt(&w.ns.name)
            .await?
            .is_none()
            .then_some(()))
    })
    .await?;
    println!("namespace deleted in {:?}", started.elapsed());
    ensure!(
        !w.keys(&format!("{}/", location(&last))).await?.is_empty(),
        "orphaned data is left in place, never half-deleted"
    );
    w.controller.abort();
    Ok(())
}
