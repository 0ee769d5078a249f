//! Which slot of a schedule to fire now, and which ones were missed. Pure: the scheduler
//! reads its cursor from status and the time from the runtime's `Clock`.
//!
//! A slot fires at `slot + jitter`. A slot is *on time* when it is noticed within the
//! starting deadline after that; older ones are *missed* (the manager was down or
//! overloaded). Of the slots that came due since the cursor, only the newest can fire —
//! never a burst: on time, it fires; missed, `RunOnce` fires it once as a catch-up and
//! `Skip` does not. Every other due slot counts as missed.

use std::time::Duration;

use chrono::{DateTime, Utc};
use stateward_api::statefulapp::MissedRunPolicy;
use stateward_runtime::schedule::CronSchedule;

/// How late after its time a slot may still start and count as on time, when the
/// schedule sets no `startingDeadlineSeconds`.
pub const DEFAULT_STARTING_DEADLINE: Duration = Duration::from_secs(300);

/// Missed slots counted at most per decision (a schedule every minute that was down for
/// a month would otherwise be counted one by one).
const COUNT_LIMIT: usize = 10_000;

/// What the scheduler knows about one schedule.
#[derive(Debug, Clone)]
pub struct Input<'a> {
    pub schedule: &'a CronSchedule,
    pub jitter: Duration,
    pub starting_deadline: Duration,
    pub missed_run_policy: MissedRunPolicy,
    pub suspended: bool,
    /// The cursor from status; `None` for a schedule seen for the first time.
    pub decided_until: Option<DateTime<Utc>>,
    pub now: DateTime<Utc>,
}

/// The slot to fire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fire {
    pub slot: DateTime<Utc>,
    /// Fired late under `RunOnce`.
    pub catch_up: bool,
}

/// The decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub fire: Option<Fire>,
    /// Slots that came due and were not started on time (the fired catch-up included).
    pub missed: u64,
    /// The newest missed slot that was not fired at all, if any.
    pub skipped: Option<DateTime<Utc>>,
    /// The new cursor.
    pub decided_until: DateTime<Utc>,
    /// When the next slot fires (slot plus jitter); `None` while suspended.
    pub next_fire: Option<DateTime<Utc>>,
}

/// Decides. Suspended schedules move their cursor along without firing or counting, so
/// lifting the suspension starts with the next slot, never a catch-up.
pub fn decide(input: &Input<'_>) -> Decision {
    let jitter = chrono::Duration::from_std(input.jitter).unwrap_or_default();
    // Slots are compared against `now - jitter`: slot s is due once now >= s + jitter.
    let horizon = input.now - jitter;
    if input.suspended {
        // The cursor moves to the newest slot passed, not to `now`: it changes once per
        // slot, so a suspended schedule costs no status write per pass.
        let passed = input.schedule.latest_at_or_before(horizon);
        return Decision {
            fire: None,
            missed: 0,
            skipped: None,
            decided_until: passed.max(input.decided_until).unwrap_or(horizon),
            next_fire: None,
        };
    }
    // A new schedule starts from now: slots before it existed are not missed.
    let cursor = input.decided_until.unwrap_or(horizon);
    let (due, more) = input.schedule.slots_between(cursor, horizon, COUNT_LIMIT);
    // When the walk was cut short, the newest due slot lies beyond it.
    let newest = if more {
        input.schedule.latest_at_or_before(horizon)
    } else {
        due.last().copied()
    };
    let Some(newest) = newest else {
        return Decision {
            fire: None,
            missed: 0,
            skipped: None,
            decided_until: cursor,
            next_fire: input.schedule.next_after(cursor).map(|s| s + jitter),
        };
    };
    let deadline = chrono::Duration::from_std(input.starting_deadline).unwrap_or_default();
    let on_time = input.now - (newest + jitter) <= deadline;
    let mut missed = due.len() as u64 - u64::from(on_time);
    if more {
        missed += 1; // "at least"; the exact count is not worth a longer walk
    }
    let fire = if on_time {
        Some(Fire {
            slot: newest,
            catch_up: false,
        })
    } else if input.missed_run_policy == MissedRunPolicy::RunOnce {
        Some(Fire {
            slot: newest,
            catch_up: true,
        })
    } else {
        None
    };
    let skipped = match fire {
        None => Some(newest),
        Some(_) => due.iter().rev().nth(1).copied(),
    };
    Decision {
        fire,
        missed,
        skipped,
        decided_until: newest,
        next_fire: input.schedule.next_after(newest).map(|s| s + jitter),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn utc(d: u32, h: u32, m: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, d, h, m, 0)
            .single()
            .unwrap_or_default()
    }

    fn hourly() -> CronSchedule {
        CronSchedule::parse("0 * * * *", None).unwrap_or_else(|e| panic!("{e}"))
    }

    fn input(
        schedule: &CronSchedule,
        cursor: Option<DateTime<Utc>>,
        now: DateTime<Utc>,
    ) -> Input<'_> {
        Input {
            schedule,
            jitter: Duration::ZERO,
            starting_deadline: DEFAULT_STARTING_DEADLINE,
            missed_run_policy: MissedRunPolicy::RunOnce,
            suspended: false,
            decided_until: cursor,
            now,
        }
    }

    #[test]
    fn a_new_schedule_waits_for_its_next_slot() {
        let s = hourly();
        let d = decide(&input(&s, None, utc(25, 10, 30)));
        assert_eq!(d.fire, None);
        assert_eq!(d.missed, 0);
        assert_eq!(d.decided_until, utc(25, 10, 30));
        assert_eq!(d.next_fire, Some(utc(25, 11, 0)));
    }

    #[test]
    fn an_on_time_slot_fires_once() {
        let s = hourly();
        let d = decide(&input(&s, Some(utc(25, 10, 30)), utc(25, 11, 0)));
        assert_eq!(
            d.fire,
            Some(Fire {
                slot: utc(25, 11, 0),
                catch_up: false
            })
        );
        assert_eq!((d.missed, d.skipped), (0, None));
        assert_eq!(d.decided_until, utc(25, 11, 0));
        assert_eq!(d.next_fire, Some(utc(25, 12, 0)));
        // The same instant again: nothing more.
        let again = decide(&input(&s, Some(d.decided_until), utc(25, 11, 1)));
        assert_eq!(again.fire, None);
    }

    #[test]
    fn downtime_across_two_slots_runs_once_or_skips() {
        let s = hourly();
        // Down from 10:30 to 12:20: 11:00 and 12:00 were missed.
        let mut i = input(&s, Some(utc(25, 10, 30)), utc(25, 12, 20));
        let d = decide(&i);
        assert_eq!(
            d.fire,
            Some(Fire {
                slot: utc(25, 12, 0),
                catch_up: true
            })
        );
        assert_eq!(d.missed, 2);
        assert_eq!(d.skipped, Some(utc(25, 11, 0)));
        i.missed_run_policy = MissedRunPolicy::Skip;
        let d = decide(&i);
        assert_eq!(d.fire, None);
        assert_eq!(d.missed, 2);
        assert_eq!(d.skipped, Some(utc(25, 12, 0)));
        assert_eq!(d.decided_until, utc(25, 12, 0));
    }

    #[test]
    fn within_the_starting_deadline_a_late_slot_is_on_time() {
        let s = hourly();
        let d = decide(&input(&s, Some(utc(25, 10, 30)), utc(25, 11, 4)));
        assert_eq!(d.fire.map(|f| f.catch_up), Some(false));
        assert_eq!(d.missed, 0);
    }

    #[test]
    fn jitter_delays_the_fire_time_not_the_slot() {
        let s = hourly();
        let mut i = input(&s, Some(utc(25, 10, 30)), utc(25, 11, 5));
        i.jitter = Duration::from_secs(600);
        let d = decide(&i);
        assert_eq!(d.fire, None);
        assert_eq!(d.next_fire, Some(utc(25, 11, 10)));
        i.now = utc(25, 11, 10);
        assert_eq!(decide(&i).fire.map(|f| f.slot), Some(utc(25, 11, 0)));
    }

    #[test]
    fn suspension_moves_the_cursor_and_lifting_it_fires_no_burst() {
        let s = hourly();
        let mut i = input(&s, Some(utc(25, 10, 30)), utc(25, 15, 30));
        i.suspended = true;
        let d = decide(&i);
        assert_eq!((d.fire, d.missed, d.next_fire), (None, 0, None));
        assert_eq!(
            d.decided_until,
            utc(25, 15, 0),
            "the newest slot passed, not now"
        );
        // Later in the same hour: the same cursor (no status write per pass).
        i.now = utc(25, 15, 50);
        i.decided_until = Some(d.decided_until);
        assert_eq!(decide(&i).decided_until, utc(25, 15, 0));
        i.now = utc(25, 15, 30);
        i.suspended = false;
        i.decided_until = Some(d.decided_until);
        i.now = utc(25, 15, 31);
        let d = decide(&i);
        assert_eq!(d.fire, None);
        assert_eq!(d.next_fire, Some(utc(25, 16, 0)));
    }

    #[test]
    fn a_month_down_counts_without_walking_forever() {
        let s = CronSchedule::parse("* * * * *", None).unwrap_or_else(|e| panic!("{e}"));
        let d = decide(&input(&s, Some(utc(1, 0, 0)), utc(30, 0, 0)));
        // The newest slot is this very minute: on time; all the others were missed.
        assert_eq!(d.fire.map(|f| f.catch_up), Some(false));
        assert!(d.missed > 9_000);
        assert_eq!(d.fire.map(|f| f.slot), Some(utc(30, 0, 0)));
        assert_eq!(d.decided_until, utc(30, 0, 0));
    }
}
