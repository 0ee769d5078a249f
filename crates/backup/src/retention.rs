//! Retention: which of a schedule's Backups to keep. Pure — the scheduler lists the
//! Backups, calls [`plan`], and deletes what it says (under the mass-deletion breaker).
//!
//! Grandfather-father-son as restic and borg do it: walking the Completed backups newest
//! first, `keepLast` keeps the first N, and each `keep<Period>` keeps the newest backup of
//! each of the last N periods *that have a backup*, periods read as wall-clock time in
//! the schedule's time zone (a day is a local calendar day, 23 or 25 hours long across a
//! DST change). A backup is kept when any rule keeps it. Regardless of the rules:
//! - the newest Completed backup is never pruned, so an app always keeps its last good
//!   backup, even when every later run failed;
//! - a backup marked to keep, or used by a running Restore, is never pruned;
//! - Pending or Running backups are never touched;
//! - Failed backups hold no data; they stay while they are newer than the newest
//!   success (they tell what is going wrong), at most [`FAILED_KEPT`] of them.

use chrono::{DateTime, Datelike, Timelike, Utc};
use chrono_tz::Tz;
use stateward_api::statefulapp::Retention;

/// Failed backups newer than the newest success that are kept for diagnosis.
pub const FAILED_KEPT: usize = 3;

/// What retention needs to know about one Backup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub name: String,
    /// The slot it was taken for (or when it was created, for one made by hand).
    pub time: DateTime<Utc>,
    pub state: State,
    /// Why it must be kept whatever the rules say, if anything.
    pub protected_by: Option<String>,
}

/// A Backup's outcome as far as retention cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Completed,
    Failed,
    /// Pending or Running: never touched.
    Active,
}

/// The verdict for each candidate.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Kept, with the reasons (`last`, `daily`, `newest`, ...).
    pub keep: Vec<(String, Vec<String>)>,
    /// To delete, newest first.
    pub prune: Vec<String>,
}

#[derive(Clone, Copy)]
enum Period {
    Hour,
    Day,
    Week,
    Month,
    Year,
}

impl Period {
    fn name(self) -> &'static str {
        match self {
            Period::Hour => "hourly",
            Period::Day => "daily",
            Period::Week => "weekly",
            Period::Month => "monthly",
            Period::Year => "yearly",
        }
    }

    /// The wall-clock bucket of `time` in `zone`.
    fn bucket(self, time: DateTime<Utc>, zone: Tz) -> (i32, u32, u32, u32) {
        let local = time.with_timezone(&zone);
        match self {
            Period::Hour => (local.year(), local.month(), local.day(), local.hour()),
            Period::Day => (local.year(), local.month(), local.day(), 0),
            Period::Week => {
                let week = local.iso_week();
                (week.year(), week.week(), 0, 0)
            }
            Period::Month => (local.year(), local.month(), 0, 0),
            Period::Year => (local.year(), 0, 0, 0),
        }
    }
}

/// Decides which candidates to keep and which to prune.
pub fn plan(candidates: &[Candidate], rules: &Retention, zone: Tz) -> Plan {
    let mut sorted: Vec<&Candidate> = candidates.iter().collect();
    // Newest first; names break ties so the verdict never depends on list order.
    sorted.sort_by(|a, b| b.time.cmp(&a.time).then_with(|| b.name.cmp(&a.name)));
    let completed: Vec<&Candidate> = sorted
        .iter()
        .copied()
        .filter(|c| c.state == State::Completed)
        .collect();
    let mut reasons: Vec<Vec<String>> = vec![Vec::new(); sorted.len()];
    let index_of = |name: &str| sorted.iter().position(|c| c.name == name);

    if let Some(n) = rules.keep_last {
        for c in completed.iter().take(n as usize) {
            if let Some(i) = index_of(&c.name) {
                reasons[i].push("last".into());
            }
        }
    }
    let periods = [
        (Period::Hour, rules.keep_hourly),
        (Period::Day, rules.keep_daily),
        (Period::Week, rules.keep_weekly),
        (Period::Month, rules.keep_monthly),
        (Period::Year, rules.keep_yearly),
    ];
    for (period, count) in periods {
        let Some(count) = count else { continue };
        let mut seen = None;
        let mut kept = 0;
        for c in &completed {
            if kept == count {
                break;
            }
            let bucket = period.bucket(c.time, zone);
            if seen != Some(bucket) {
                seen = Some(bucket);
                kept += 1;
                if let Some(i) = index_of(&c.name) {
                    reasons[i].push(period.name().into());
                }
            }
        }
    }
    let newest_success = completed.first().map(|c| c.time);
    if let Some(newest) = completed.first()
        && let Some(i) = index_of(&newest.name)
    {
        reasons[i].push("newest".into());
    }
    let mut failed_kept = 0;
    for (i, c) in sorted.iter().enumerate() {
        if let Some(why) = &c.protected_by {
            reasons[i].push(why.clone());
        }
        match c.state {
            State::Active => reasons[i].push("active".into()),
            State::Failed => {
                let after_success = newest_success.is_none_or(|t| c.time > t);
                if after_success && failed_kept < FAILED_KEPT {
                    failed_kept += 1;
                    reasons[i].push("failed-since-last-success".into());
                }
            }
            State::Completed => {}
        }
    }
    let mut out = Plan::default();
    for (c, why) in sorted.into_iter().zip(reasons) {
        if why.is_empty() {
            out.prune.push(c.name.clone());
        } else {
            out.keep.push((c.name.clone(), why));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn at(zone: Tz, text: &str) -> DateTime<Utc> {
        let naive =
            chrono::NaiveDateTime::parse_from_str(text, "%Y-%m-%d %H:%M").unwrap_or_default();
        zone.from_local_datetime(&naive)
            .earliest()
            .map(|t| t.with_timezone(&Utc))
            .unwrap_or_default()
    }

    fn backup(zone: Tz, text: &str, state: State) -> Candidate {
        Candidate {
            name: text.replace([' ', ':'], "-"),
            time: at(zone, text),
            state,
            protected_by: None,
        }
    }

    fn rules(f: impl FnOnce(&mut Retention)) -> Retention {
        let mut r = Retention::default();
        f(&mut r);
        r
    }

    struct Case {
        what: &'static str,
        zone: &'static str,
        rules: Retention,
        history: Vec<(&'static str, State)>,
        kept: Vec<&'static str>,
    }

    #[test]
    fn table() {
        use State::{Active, Completed as C, Failed as F};
        let cases = vec![
            Case {
                what: "keepLast keeps the newest N successes",
                zone: "UTC",
                rules: rules(|r| r.keep_last = Some(2)),
                history: vec![
                    ("2026-01-01 00:00", C),
                    ("2026-01-02 00:00", C),
                    ("2026-01-03 00:00", C),
                    ("2026-01-04 00:00", C),
                ],
                kept: vec!["2026-01-04 00:00", "2026-01-03 00:00"],
            },
            Case {
                what: "the newest success survives when every later run failed",
                zone: "UTC",
                rules: rules(|r| r.keep_last = Some(1)),
                history: vec![
                    ("2026-01-01 00:00", C),
                    ("2026-01-02 00:00", C),
                    ("2026-01-03 00:00", F),
                    ("2026-01-04 00:00", F),
                    ("2026-01-05 00:00", F),
                    ("2026-01-06 00:00", F),
                ],
                // The three newest failures stay for diagnosis; the oldest failure goes.
                kept: vec![
                    "2026-01-06 00:00",
                    "2026-01-05 00:00",
                    "2026-01-04 00:00",
                    "2026-01-02 00:00",
                ],
            },
            Case {
                what: "failures older than the newest success go; running ones stay",
                zone: "UTC",
                rules: rules(|r| r.keep_last = Some(1)),
                history: vec![
                    ("2026-01-01 00:00", F),
                    ("2026-01-02 00:00", C),
                    ("2026-01-03 00:00", Active),
                ],
                kept: vec!["2026-01-03 00:00", "2026-01-02 00:00"],
            },
            Case {
                what: "daily in Kathmandu: local days, not UTC days",
                zone: "Asia/Kathmandu",
                rules: rules(|r| r.keep_daily = Some(2)),
                // 05:00 and 23:00 local on the 2nd are one local day (two UTC days).
                history: vec![
                    ("2026-01-01 23:00", C),
                    ("2026-01-02 05:00", C),
                    ("2026-01-02 23:00", C),
                ],
                kept: vec!["2026-01-02 23:00", "2026-01-01 23:00"],
            },
            Case {
                what: "daily in Berlin across spring forward (a 23-hour day)",
                zone: "Europe/Berlin",
                rules: rules(|r| r.keep_daily = Some(3)),
                history: vec![
                    ("2026-03-28 01:30", C),
                    ("2026-03-28 23:30", C),
                    ("2026-03-29 00:30", C),
                    ("2026-03-29 23:30", C),
                    ("2026-03-30 00:30", C),
                ],
                kept: vec!["2026-03-30 00:30", "2026-03-29 23:30", "2026-03-28 23:30"],
            },
            Case {
                what: "weekly uses ISO weeks; monthly and yearly combine",
                zone: "America/New_York",
                rules: rules(|r| {
                    r.keep_weekly = Some(2);
                    r.keep_monthly = Some(2);
                    r.keep_yearly = Some(2);
                }),
                history: vec![
                    ("2025-12-20 03:00", C), // 2025 W51, Dec 2025, 2025
                    ("2025-12-31 03:00", C), // 2026 W01 (ISO), Dec 2025, 2025 (newest of the year)
                    ("2026-01-02 03:00", C), // 2026 W01, Jan 2026
                    ("2026-01-06 03:00", C), // 2026 W02, Jan 2026, 2026
                ],
                kept: vec!["2026-01-06 03:00", "2026-01-02 03:00", "2025-12-31 03:00"],
            },
            Case {
                what: "GFS with failures mixed in: failures never fill a bucket",
                zone: "Europe/Paris",
                rules: rules(|r| {
                    r.keep_last = Some(1);
                    r.keep_daily = Some(3);
                }),
                history: vec![
                    ("2026-02-01 02:00", C),
                    ("2026-02-02 02:00", F),
                    ("2026-02-02 14:00", C),
                    ("2026-02-03 02:00", C),
                    ("2026-02-03 14:00", F),
                    ("2026-02-04 02:00", F),
                    ("2026-02-04 14:00", C),
                ],
                kept: vec!["2026-02-04 14:00", "2026-02-03 02:00", "2026-02-02 14:00"],
            },
        ];
        for case in cases {
            let zone: Tz = case.zone.parse().unwrap_or(Tz::UTC);
            let history: Vec<Candidate> = case
                .history
                .iter()
                .map(|(t, s)| backup(zone, t, *s))
                .collect();
            let plan = plan(&history, &case.rules, zone);
            let kept: Vec<String> = plan.keep.iter().map(|(n, _)| n.clone()).collect();
            let want: Vec<String> = case
                .kept
                .iter()
                .map(|t| t.replace([' ', ':'], "-"))
                .collect();
            assert_eq!(kept, want, "{}: {:?}", case.what, plan);
            assert_eq!(
                plan.keep.len() + plan.prune.len(),
                history.len(),
                "{}",
                case.what
            );
        }
    }

    #[test]
    fn protected_backups_are_kept_whatever_the_rules() {
        let zone = Tz::UTC;
        let mut history = vec![
            backup(zone, "2026-01-01 00:00", State::Completed),
            backup(zone, "2026-01-02 00:00", State::Completed),
            backup(zone, "2026-01-03 00:00", State::Completed),
        ];
        history[0].protected_by = Some("keep-label".into());
        history[1].protected_by = Some("restore/r1".into());
        let plan = plan(&history, &rules(|r| r.keep_last = Some(1)), zone);
        assert!(plan.prune.is_empty(), "{plan:?}");
        assert_eq!(
            plan.keep[2],
            (
                "2026-01-01-00-00".to_string(),
                vec!["keep-label".to_string()]
            )
        );
    }

    #[test]
    fn hourly_across_fall_back_counts_wall_clock_hours() {
        let zone: Tz = "Europe/Berlin".parse().unwrap_or(Tz::UTC);
        // 00:10 UTC = 02:10 CEST; 01:40 UTC = 02:40 CET: same local hour.
        let history = vec![
            Candidate {
                name: "cest".into(),
                time: Utc
                    .with_ymd_and_hms(2026, 10, 25, 0, 10, 0)
                    .single()
                    .unwrap_or_default(),
                state: State::Completed,
                protected_by: None,
            },
            Candidate {
                name: "cet".into(),
                time: Utc
                    .with_ymd_and_hms(2026, 10, 25, 1, 40, 0)
                    .single()
                    .unwrap_or_default(),
                state: State::Completed,
                protected_by: None,
            },
            Candidate {
                name: "before".into(),
                time: Utc
                    .with_ymd_and_hms(2026, 10, 24, 23, 50, 0)
                    .single()
                    .unwrap_or_default(),
                state: State::Completed,
                protected_by: None,
            },
        ];
        let plan = plan(&history, &rules(|r| r.keep_hourly = Some(2)), zone);
        assert_eq!(plan.prune, vec!["cest".to_string()]);
    }
}
