//! Cron arithmetic in IANA time zones, shared by the backup controller (which fires
//! schedules) and the monitoring controller (which judges whether the newest backup is
//! too old). Pure: no clock, no API.
//!
//! Daylight saving time follows Vixie cron (via `croner`): a fixed-time slot that falls in
//! a skipped hour runs right after the gap, a slot in a repeated hour runs once (its
//! first occurrence), and interval patterns (`*/15 * * * *`) run by wall-clock time.
//! Slots are identified by their UTC instant, so each is unique across DST changes.

use std::time::Duration;

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use croner::Cron;
use croner::parser::{CronParser, Seconds};

/// The field of a schedule that is wrong, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ScheduleError {
    /// `cron` or `timeZone`.
    pub field: &'static str,
    pub message: String,
}

/// A parsed cron expression and the time zone it is read in.
#[derive(Debug, Clone)]
pub struct CronSchedule {
    cron: Cron,
    zone: Tz,
}

/// Searching further than this for the next slot means the pattern never matches
/// (for example `0 0 30 2 *`, February 30th).
const SEARCH_HORIZON_DAYS: i64 = 5 * 366;

impl CronSchedule {
    /// Parses five-field cron (or `@hourly`, `@daily`, `@midnight`, `@weekly`,
    /// `@monthly`, `@yearly`, `@annually`) and an IANA zone (default UTC).
    pub fn parse(cron: &str, time_zone: Option<&str>) -> Result<Self, ScheduleError> {
        let zone = match time_zone {
            None => Tz::UTC,
            Some(name) => name.parse::<Tz>().map_err(|_| ScheduleError {
                field: "timeZone",
                message: format!(
                    "unknown time zone {name:?}: use an IANA name such as Europe/Berlin or UTC"
                ),
            })?,
        };
        let pattern = cron.trim();
        let pattern = if pattern.eq_ignore_ascii_case("@midnight") {
            "@daily"
        } else {
            pattern
        };
        let invalid = |message: String| ScheduleError {
            field: "cron",
            message: format!("invalid cron expression {cron:?}: {message}"),
        };
        if !pattern.starts_with('@') && pattern.split_whitespace().count() != 5 {
            return Err(invalid(
                "expected five fields: minute hour day-of-month month day-of-week".into(),
            ));
        }
        let parsed = CronParser::builder()
            .seconds(Seconds::Disallowed)
            .build()
            .parse(pattern)
            .map_err(|e| invalid(e.to_string()))?;
        let schedule = Self { cron: parsed, zone };
        // A pattern that parses but never matches would silently never fire.
        let probe = DateTime::<Utc>::from_timestamp(0, 0).unwrap_or_default();
        if schedule.next_after(probe).is_none() {
            return Err(invalid("it never matches a date".into()));
        }
        Ok(schedule)
    }

    /// The time zone the pattern is read in.
    pub fn zone(&self) -> Tz {
        self.zone
    }

    /// The first slot strictly after `after`.
    pub fn next_after(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let local = after.with_timezone(&self.zone);
        let next = self.cron.find_next_occurrence(&local, false).ok()?;
        let next = next.with_timezone(&Utc);
        (next - after <= chrono::Duration::days(SEARCH_HORIZON_DAYS)).then_some(next)
    }

    /// The last slot at or before `at`.
    pub fn latest_at_or_before(&self, at: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let local = at.with_timezone(&self.zone);
        let previous = self.cron.find_previous_occurrence(&local, true).ok()?;
        Some(previous.with_timezone(&Utc))
    }

    /// The slots in `(after, until]`, oldest first, at most `limit` of them; the bool is
    /// true when more were left out.
    pub fn slots_between(
        &self,
        after: DateTime<Utc>,
        until: DateTime<Utc>,
        limit: usize,
    ) -> (Vec<DateTime<Utc>>, bool) {
        let mut slots = Vec::new();
        let mut cursor = after;
        while let Some(next) = self.next_after(cursor) {
            if next > until {
                break;
            }
            if slots.len() == limit {
                return (slots, true);
            }
            slots.push(next);
            cursor = next;
        }
        (slots, false)
    }

    /// The longest gap between consecutive slots over the next `samples` slots after
    /// `from`: how long one can go without a slot (a weekday schedule's weekend counts).
    pub fn longest_gap(&self, from: DateTime<Utc>, samples: usize) -> Option<Duration> {
        let mut previous = self.next_after(from)?;
        let mut longest = chrono::Duration::zero();
        for _ in 0..samples {
            let next = self.next_after(previous)?;
            longest = longest.max(next - previous);
            previous = next;
        }
        longest.to_std().ok()
    }
}

/// A stable offset in `[0, max_seconds)` for one schedule of one app, so that many apps
/// with the same cron do not all start in the same second, yet each app's start time is
/// the same on every manager replica and after every restart.
pub fn jitter(identity: &str, max_seconds: u32) -> Duration {
    if max_seconds == 0 {
        return Duration::ZERO;
    }
    // FNV-1a: tiny, stable across Rust versions (unlike `DefaultHasher`).
    let hash = identity.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    Duration::from_secs(hash % u64::from(max_seconds))
}

/// One schedule as far as backup age is concerned.
#[derive(Debug, Clone, Copy)]
pub struct ScheduleRef<'a> {
    pub cron: &'a str,
    pub time_zone: Option<&'a str>,
    pub suspended: bool,
}

/// How old the newest successful backup of an app may be before it counts as unhealthy:
/// the explicit `monitoring.backupMaxAge` when set, otherwise twice the longest gap of
/// the app's most frequent active schedule (one missed slot is tolerated, two are not).
/// `None` when the app has neither, so nothing can be judged. The backup controller's
/// `BackupsHealthy` condition and the monitoring controller's alerts both use this.
pub fn backup_max_age<'a>(
    explicit: Option<&str>,
    schedules: impl IntoIterator<Item = ScheduleRef<'a>>,
    now: DateTime<Utc>,
) -> Option<Duration> {
    if let Some(age) = explicit.and_then(parse_duration) {
        return Some(age);
    }
    schedules
        .into_iter()
        .filter(|s| !s.suspended)
        .filter_map(|s| CronSchedule::parse(s.cron, s.time_zone).ok())
        .filter_map(|s| s.longest_gap(now, 16))
        .min()
        .map(|gap| gap * 2)
}

/// Parses a Kubernetes-style duration made of `<n>s|m|h|d` parts (`90s`, `1h30m`, `7d`).
pub fn parse_duration(text: &str) -> Option<Duration> {
    let mut total = 0u64;
    let mut number = String::new();
    for c in text.chars() {
        if c.is_ascii_digit() {
            number.push(c);
            continue;
        }
        let n: u64 = number.parse().ok()?;
        number.clear();
        let unit = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86_400,
            _ => return None,
        };
        total = total.checked_add(n.checked_mul(unit)?)?;
    }
    (number.is_empty() && total > 0).then(|| Duration::from_secs(total))
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn utc(y: i32, mo: u32, d: u32, h: u32, mi: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, mo, d, h, mi, 0)
            .single()
            .unwrap_or_default()
    }

    fn next(cron: &str, tz: &str, after: DateTime<Utc>) -> DateTime<Utc> {
        CronSchedule::parse(cron, Some(tz))
            .ok()
            .and_then(|s| s.next_after(after))
            .unwrap_or_default()
    }

    #[test]
    fn kathmandu_daily_fires_at_twenty_forty_five_utc() {
        // UTC+05:45: 02:30 local is 20:45 UTC the day before.
        assert_eq!(
            next("30 2 * * *", "Asia/Kathmandu", utc(2026, 11, 25, 12, 0)),
            utc(2026, 11, 25, 20, 45)
        );
        assert_eq!(
            next("30 2 * * *", "Asia/Kathmandu", utc(2026, 11, 25, 20, 45)),
            utc(2026, 11, 26, 20, 45)
        );
    }

    #[test]
    fn berlin_daily_across_both_dst_changes() {
        let tz = "Europe/Berlin";
        // Spring forward on 2026-03-29: 02:00 CET jumps to 03:00 CEST.
        assert_eq!(
            next("30 1 * * *", tz, utc(2026, 3, 28, 12, 0)),
            utc(2026, 3, 29, 0, 30)
        ); // 01:30 CET
        assert_eq!(
            next("30 3 * * *", tz, utc(2026, 3, 28, 12, 0)),
            utc(2026, 3, 29, 1, 30)
        ); // 03:30 CEST
        assert_eq!(
            next("30 3 * * *", tz, utc(2026, 3, 27, 12, 0)),
            utc(2026, 3, 28, 2, 30)
        ); // 03:30 CET, the day before
        // 02:30 does not exist that night: it runs right after the gap (03:00 CEST), once.
        let gap = next("30 2 * * *", tz, utc(2026, 3, 28, 12, 0));
        assert_eq!(gap, utc(2026, 3, 29, 1, 0));
        assert_eq!(next("30 2 * * *", tz, gap), utc(2026, 3, 30, 0, 30));
        // Fall back on 2026-10-25: 03:00 CEST goes back to 02:00 CET; 02:30 happens twice
        // and the slot fires once, at the first (CEST) one.
        let overlap = next("30 2 * * *", tz, utc(2026, 10, 24, 12, 0));
        assert_eq!(overlap, utc(2026, 10, 25, 0, 30));
        assert_eq!(next("30 2 * * *", tz, overlap), utc(2026, 10, 26, 1, 30));
    }

    #[test]
    fn hourly_patterns_follow_wall_clock_across_dst() {
        let schedule = CronSchedule::parse("0 * * * *", Some("Europe/Berlin"));
        let Ok(schedule) = schedule else {
            panic!("parse failed")
        };
        // 23 slots on the short day, 25 on the long one.
        let (short, _) =
            schedule.slots_between(utc(2026, 3, 28, 23, 0), utc(2026, 3, 29, 22, 0), 100);
        assert_eq!(short.len(), 23);
        let (long, _) =
            schedule.slots_between(utc(2026, 10, 24, 22, 0), utc(2026, 10, 25, 23, 0), 100);
        assert_eq!(long.len(), 25);
    }

    #[test]
    fn macros_and_limits() {
        assert_eq!(
            next("@daily", "UTC", utc(2026, 1, 1, 5, 0)),
            utc(2026, 1, 2, 0, 0)
        );
        assert_eq!(
            next("@midnight", "UTC", utc(2026, 1, 1, 5, 0)),
            utc(2026, 1, 2, 0, 0)
        );
        assert_eq!(
            next("@hourly", "UTC", utc(2026, 1, 1, 5, 7)),
            utc(2026, 1, 1, 6, 0)
        );
        let Ok(s) = CronSchedule::parse("*/15 * * * *", None) else {
            panic!("parse failed")
        };
        let (slots, more) = s.slots_between(utc(2026, 1, 1, 0, 0), utc(2026, 1, 1, 2, 0), 3);
        assert_eq!(slots.len(), 3);
        assert!(more);
        assert_eq!(
            s.latest_at_or_before(utc(2026, 1, 1, 2, 7)),
            Some(utc(2026, 1, 1, 2, 0))
        );
        assert_eq!(
            s.latest_at_or_before(utc(2026, 1, 1, 2, 15)),
            Some(utc(2026, 1, 1, 2, 15))
        );
    }

    #[test]
    fn bad_input_names_the_field() {
        let err = |cron: &str, tz: Option<&str>| CronSchedule::parse(cron, tz).err();
        assert_eq!(err("61 * * * *", None).map(|e| e.field), Some("cron"));
        assert_eq!(err("* * * *", None).map(|e| e.field), Some("cron"));
        assert_eq!(err("0 0 * * * *", None).map(|e| e.field), Some("cron"));
        assert_eq!(err("@fortnightly", None).map(|e| e.field), Some("cron"));
        assert_eq!(err("0 0 30 2 *", None).map(|e| e.field), Some("cron"));
        assert_eq!(
            err("0 0 * * *", Some("Mars/Olympus")).map(|e| e.field),
            Some("timeZone")
        );
        assert!(err("0 0 * * *", Some("America/New_York")).is_none());
    }

    #[test]
    fn jitter_is_stable_and_bounded() {
        assert_eq!(jitter("ns/app/nightly", 0), Duration::ZERO);
        let a = jitter("ns/app/nightly", 600);
        assert_eq!(a, jitter("ns/app/nightly", 600));
        assert!(a < Duration::from_secs(600));
        let spread: std::collections::BTreeSet<_> = (0..50)
            .map(|i| jitter(&format!("ns/app-{i}/nightly"), 600))
            .collect();
        assert!(spread.len() > 40, "jitter spreads apps: {}", spread.len());
    }

    #[test]
    fn max_age_prefers_explicit_then_most_frequent_schedule() {
        let now = utc(2026, 11, 25, 0, 0);
        let daily = ScheduleRef {
            cron: "0 2 * * *",
            time_zone: None,
            suspended: false,
        };
        let hourly = ScheduleRef {
            cron: "0 * * * *",
            time_zone: None,
            suspended: false,
        };
        let weekdays = ScheduleRef {
            cron: "0 2 * * 1-5",
            time_zone: None,
            suspended: false,
        };
        assert_eq!(
            backup_max_age(Some("26h"), [daily], now),
            Some(Duration::from_secs(26 * 3600))
        );
        assert_eq!(
            backup_max_age(None, [daily, hourly], now),
            Some(Duration::from_secs(2 * 3600))
        );
        assert_eq!(
            backup_max_age(None, [weekdays], now),
            Some(Duration::from_secs(6 * 86_400))
        );
        let suspended = ScheduleRef {
            suspended: true,
            ..hourly
        };
        assert_eq!(
            backup_max_age(None, [daily, suspended], now),
            Some(Duration::from_secs(2 * 86_400))
        );
        assert_eq!(backup_max_age(None, [], now), None);
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_duration("1h30m"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_duration("7d"), Some(Duration::from_secs(604_800)));
        assert_eq!(parse_duration("7"), None);
        assert_eq!(parse_duration("h"), None);
        assert_eq!(parse_duration("0s"), None);
    }
}
