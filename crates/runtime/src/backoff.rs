//! The error policy: permanent errors (an invalid spec) wait for a change; transient ones
//! back off per object, exponentially, and the back-off resets on success.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

/// Whether retrying can help.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The user must change something; retrying the same spec will fail the same way.
    Permanent,
    /// The cluster or a dependency may recover.
    Transient,
}

/// Per-object exponential back-off.
#[derive(Debug)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    attempts: Mutex<HashMap<String, u32>>,
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new(Duration::from_secs(1), Duration::from_secs(300))
    }
}

impl Backoff {
    pub fn new(base: Duration, max: Duration) -> Self {
        Self {
            base,
            max,
            attempts: Mutex::new(HashMap::new()),
        }
    }

    /// The delay before retrying `key` after a failure; `None` for permanent errors (wait
    /// for a change of the object instead).
    pub fn on_error(&self, key: &str, kind: ErrorKind) -> Option<Duration> {
        if kind == ErrorKind::Permanent {
            return None;
        }
        let mut attempts = self.attempts.lock().ok()?;
        let n = attempts.entry(key.to_string()).or_insert(0);
        let delay = self
            .base
            .saturating_mul(2u32.saturating_pow(*n))
            .min(self.max);
        *n = n.saturating_add(1);
        Some(delay)
    }

    /// A success resets the object's back-off.
    pub fn on_success(&self, key: &str) {
        if let Ok(mut attempts) = self.attempts.lock() {
            attempts.remove(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_per_object_caps_and_resets() {
        let b = Backoff::new(Duration::from_secs(1), Duration::from_secs(5));
        let delays: Vec<_> = (0..5)
            .filter_map(|_| b.on_error("a", ErrorKind::Transient))
            .map(|d| d.as_secs())
            .collect();
        assert_eq!(delays, vec![1, 2, 4, 5, 5]);
        assert_eq!(
            b.on_error("other", ErrorKind::Transient),
            Some(Duration::from_secs(1)),
            "per object"
        );
        b.on_success("a");
        assert_eq!(
            b.on_error("a", ErrorKind::Transient),
            Some(Duration::from_secs(1))
        );
        assert_eq!(b.on_error("a", ErrorKind::Permanent), None);
    }
}
