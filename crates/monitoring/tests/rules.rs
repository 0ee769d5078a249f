//! The alert rules Stateward generates, checked by the real `promtool` (Debian's
//! prometheus package, installed by `cargo xtask test`): `promtool check rules` accepts
//! them, and `promtool test rules` shows each alert firing in the scenario it describes —
//! and not before. Run with `cargo xtask test`.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use serde_json::{Value, json};
use stateward_monitoring::objects::{Alert, alerts, operator_alerts};

fn promtool(args: &[&str], dir: &std::path::Path) -> Result<String> {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(dir)
        .output()
        .context("running promtool (Debian package prometheus; `cargo xtask test` installs it)")?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(out.status.success(), "promtool {args:?} failed:\n{text}");
    Ok(text)
}

/// The alert as `promtool test rules` expects it when firing.
fn expected(alert: &Alert, labels: &[(&str, &str)]) -> Value {
    let mut exp_labels: BTreeMap<String, String> = alert.labels.clone();
    for (k, v) in labels {
        exp_labels.insert((*k).into(), (*v).into());
    }
    json!({"exp_labels": exp_labels, "exp_annotations": alert.annotations})
}

fn find<'a>(alerts: &'a [Alert], name: &str) -> &'a Alert {
    alerts
        .iter()
        .find(|a| a.alert == name)
        .unwrap_or_else(|| panic!("no alert {name}"))
}

#[test]
fn promtool_accepts_the_rules_and_each_alert_fires_in_its_scenario() -> Result<()> {
    let dir = std::env::temp_dir().join(format!("stateward-rules-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let app_alerts = alerts("shop", "db", Some(Duration::from_secs(3600)));
    let operator = operator_alerts();
    let rules = json!({"groups": [
        {"name": "stateward-shop-db", "rules": app_alerts},
        {"name": "stateward-operator", "rules": operator},
    ]});
    std::fs::write(dir.join("rules.yaml"), serde_yaml::to_string(&rules)?)?;
    let checked = promtool(&["check", "rules", "rules.yaml"], &dir)?;
    println!("{checked}");
    ensure!(checked.contains("SUCCESS: 5 rules found"), "{checked}");

    let app = [("namespace", "shop"), ("app", "db")];
    let too_old = find(&app_alerts, "StatewardBackupTooOld");
    let failing = find(&app_alerts, "StatewardBackupsFailing");
    let unready = find(&app_alerts, "StatewardReplicasNotReady");
    let full = find(&app_alerts, "StatewardVolumeAlmostFull");
    let errors = find(&operator, "StatewardReconcileErrors");
    let tests = json!({
        "rule_files": ["rules.yaml"],
        "evaluation_interval": "1m",
        "tests": [
            {
                // The last success at t=0, max age 1h: quiet at 30m, firing from 65m (5m for).
                "interval": "1m",
                "input_series": [
                    {"series": "stateward_backup_last_success_timestamp_seconds{namespace=\"shop\",app=\"db\"}", "values": "0+0x120"},
                    // Another app's fresh backup never fires for this one.
                    {"series": "stateward_backup_last_success_timestamp_seconds{namespace=\"shop\",app=\"other\"}", "values": "0+60x120"},
                ],
                "alert_rule_test": [
                    {"eval_time": "30m", "alertname": "StatewardBackupTooOld", "exp_alerts": []},
                    {"eval_time": "62m", "alertname": "StatewardBackupTooOld", "exp_alerts": []},
                    {"eval_time": "70m", "alertname": "StatewardBackupTooOld", "exp_alerts": [expected(too_old, &app)]},
                ],
            },
            {
                // Failures 0, 0, 1, 2: firing at the second failure in a row.
                "interval": "1m",
                "input_series": [
                    {"series": "stateward_backup_consecutive_failures{namespace=\"shop\",app=\"db\"}", "values": "0 0 1 2 2 2"},
                ],
                "alert_rule_test": [
                    {"eval_time": "2m", "alertname": "StatewardBackupsFailing", "exp_alerts": []},
                    {"eval_time": "3m", "alertname": "StatewardBackupsFailing", "exp_alerts": [expected(failing, &app)]},
                ],
            },
            {
                // 3 wanted; one replica goes unready at 5m: firing after 10 minutes of it.
                "interval": "1m",
                "input_series": [
                    {"series": "stateward_app_desired_replicas{namespace=\"shop\",app=\"db\"}", "values": "3x40"},
                    {"series": "stateward_app_ready_replicas{namespace=\"shop\",app=\"db\"}", "values": "3x4 2x35"},
                ],
                "alert_rule_test": [
                    {"eval_time": "10m", "alertname": "StatewardReplicasNotReady", "exp_alerts": []},
                    {"eval_time": "20m", "alertname": "StatewardReplicasNotReady", "exp_alerts": [expected(unready, &app)]},
                ],
            },
            {
                // 95% full from the start: firing after 15 minutes; a 50% volume never.
                "interval": "1m",
                "input_series": [
                    {"series": "stateward_volume_used_bytes{namespace=\"shop\",app=\"db\",persistentvolumeclaim=\"data-db-0\"}", "values": "95x30"},
                    {"series": "stateward_volume_capacity_bytes{namespace=\"shop\",app=\"db\",persistentvolumeclaim=\"data-db-0\"}", "values": "100x30"},
                    {"series": "stateward_volume_used_bytes{namespace=\"shop\",app=\"db\",persistentvolumeclaim=\"data-db-1\"}", "values": "50x30"},
                    {"series": "stateward_volume_capacity_bytes{namespace=\"shop\",app=\"db\",persistentvolumeclaim=\"data-db-1\"}", "values": "100x30"},
                ],
                "alert_rule_test": [
                    {"eval_time": "10m", "alertname": "StatewardVolumeAlmostFull", "exp_alerts": []},
                    {"eval_time": "20m", "alertname": "StatewardVolumeAlmostFull", "exp_alerts": [expected(full, &[("namespace", "shop"), ("app", "db"), ("persistentvolumeclaim", "data-db-0")])]},
                ],
            },
            {
                // The backup controller fails a reconcile every minute: firing after 15m.
                "interval": "1m",
                "input_series": [
                    {"series": "controller_runtime_reconcile_errors_total{controller=\"backup\"}", "values": "0+1x40"},
                    {"series": "controller_runtime_reconcile_errors_total{controller=\"restore\"}", "values": "0x40"},
                ],
                "alert_rule_test": [
                    {"eval_time": "10m", "alertname": "StatewardReconcileErrors", "exp_alerts": []},
                    {"eval_time": "25m", "alertname": "StatewardReconcileErrors", "exp_alerts": [{
                        "exp_labels": {"severity": "warning", "controller": "backup"},
                        "exp_annotations": {
                            "summary": "The Stateward backup controller keeps failing to reconcile",
                            "description": errors.annotations["description"],
                            "runbook_url": errors.annotations["runbook_url"],
                        },
                    }]},
                ],
            },
        ],
    });
    std::fs::write(dir.join("tests.yaml"), serde_yaml::to_string(&tests)?)?;
    let tested = promtool(&["test", "rules", "tests.yaml"], &dir)?;
    println!("{tested}");
    ensure!(tested.contains("SUCCESS"), "{tested}");
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
