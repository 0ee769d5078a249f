//! Time: the one place where Kubernetes timestamps (`jiff`, as kube and k8s-openapi use)
//! meet the controllers' arithmetic (`chrono`, which cron and time-zone crates build on),
//! and a [`Clock`] that tests can move without sleeping.

use std::sync::{Arc, Mutex};

use chrono::{DateTime, TimeZone, Utc};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, Time};

/// Converts a Kubernetes timestamp to chrono.
pub fn to_chrono(time: &Time) -> DateTime<Utc> {
    from_jiff(time.0)
}

/// Converts a jiff timestamp to chrono (nanosecond precision kept).
pub fn from_jiff(ts: jiff::Timestamp) -> DateTime<Utc> {
    let nanos = ts.as_nanosecond();
    let secs = nanos.div_euclid(1_000_000_000) as i64;
    let sub = nanos.rem_euclid(1_000_000_000) as u32;
    Utc.timestamp_opt(secs, sub)
        .single()
        .unwrap_or(DateTime::<Utc>::MIN_UTC)
}

/// Converts chrono to a jiff timestamp (clamped to jiff's range).
pub fn to_jiff(time: DateTime<Utc>) -> jiff::Timestamp {
    let nanos =
        i128::from(time.timestamp()) * 1_000_000_000 + i128::from(time.timestamp_subsec_nanos());
    jiff::Timestamp::from_nanosecond(nanos).unwrap_or(if nanos < 0 {
        jiff::Timestamp::MIN
    } else {
        jiff::Timestamp::MAX
    })
}

/// A Kubernetes `Time` (seconds precision on the wire).
pub fn to_k8s_time(time: DateTime<Utc>) -> Time {
    Time(to_jiff(time))
}

/// A Kubernetes `MicroTime`.
pub fn to_k8s_micro_time(time: DateTime<Utc>) -> MicroTime {
    MicroTime(to_jiff(time))
}

/// RFC 3339 with seconds, as status fields carry it.
pub fn rfc3339(time: DateTime<Utc>) -> String {
    time.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// The source of "now" for controllers.
pub trait Clock: Send + Sync + std::fmt::Debug {
    fn now(&self) -> DateTime<Utc>;
}

/// The real clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

/// A clock tests set and advance.
#[derive(Debug, Clone)]
pub struct ManualClock(Arc<Mutex<DateTime<Utc>>>);

impl ManualClock {
    pub fn new(start: DateTime<Utc>) -> Self {
        Self(Arc::new(Mutex::new(start)))
    }

    pub fn set(&self, to: DateTime<Utc>) {
        if let Ok(mut now) = self.0.lock() {
            *now = to;
        }
    }

    pub fn advance(&self, by: chrono::Duration) {
        if let Ok(mut now) = self.0.lock() {
            *now += by;
        }
    }
}

impl Clock for ManualClock {
    fn now(&self) -> DateTime<Utc> {
        self.0.lock().map(|now| *now).unwrap_or_else(|_| Utc::now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_between_jiff_and_chrono() {
        let t = Utc
            .with_ymd_and_hms(2026, 3, 29, 1, 30, 0)
            .single()
            .unwrap_or_default()
            + chrono::Duration::nanoseconds(123);
        assert_eq!(from_jiff(to_jiff(t)), t);
        let before_epoch = Utc
            .with_ymd_and_hms(1960, 1, 1, 0, 0, 0)
            .single()
            .unwrap_or_default();
        assert_eq!(from_jiff(to_jiff(before_epoch)), before_epoch);
        assert_eq!(to_chrono(&to_k8s_time(t)), t);
    }

    #[test]
    fn manual_clock_moves_only_when_told() {
        let start = Utc
            .with_ymd_and_hms(2026, 1, 1, 0, 0, 0)
            .single()
            .unwrap_or_default();
        let clock = ManualClock::new(start);
        assert_eq!(clock.now(), start);
        clock.advance(chrono::Duration::hours(25));
        assert_eq!(rfc3339(clock.now()), "2026-01-02T01:00:00Z");
    }
}
