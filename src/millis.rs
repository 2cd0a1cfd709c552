//! Time as whole milliseconds: what atomics hold (instants as milliseconds since an
//! origin) and what the audit log records (`duration_ms`); and as whole seconds rounded
//! up, as `Retry-After` gives it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Whole milliseconds, saturating at `u64::MAX` (585 million years) instead of wrapping.
pub(crate) fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// Whole seconds, rounded up: a wait told to a caller (`Retry-After`) is never short.
pub(crate) fn ceil_secs(duration: Duration) -> u64 {
    duration.as_secs() + u64::from(duration.subsec_nanos() > 0)
}

/// Lets one event through per interval, from any thread: for log lines about a failure
/// that may repeat on every request.
pub(crate) struct Throttle {
    origin: Instant,
    interval_ms: u64,
    /// Milliseconds since `origin` before which nothing more is let through.
    next_ms: AtomicU64,
}

impl Throttle {
    pub(crate) fn new(interval: Duration) -> Throttle {
        Throttle {
            origin: Instant::now(),
            interval_ms: millis(interval),
            next_ms: AtomicU64::new(0),
        }
    }

    /// Whether this event is the one let through for the current interval.
    pub(crate) fn ready(&self) -> bool {
        let now = millis(self.origin.elapsed());
        let next = self.next_ms.load(Ordering::Relaxed);
        now >= next
            && self
                .next_ms
                .compare_exchange(
                    next,
                    now.saturating_add(self.interval_ms),
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
    }
}

/// A [`Throttle`] that also counts the events it held back, so that the line it lets
/// through can say how many were not logged.
pub(crate) struct CountingThrottle {
    throttle: Throttle,
    suppressed: AtomicU64,
}

impl CountingThrottle {
    pub(crate) fn new(interval: Duration) -> CountingThrottle {
        CountingThrottle {
            throttle: Throttle::new(interval),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(held back since the last event let through)` when this event is the one
    /// let through for the current interval; `None` (and counted) otherwise.
    pub(crate) fn ready(&self) -> Option<u64> {
        if self.throttle.ready() {
            Some(self.suppressed.swap(0, Ordering::Relaxed))
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_event_per_interval() {
        let throttle = Throttle::new(Duration::from_secs(3600));
        assert!(throttle.ready());
        assert!(!throttle.ready());
        let every_time = Throttle::new(Duration::ZERO);
        assert!(every_time.ready() && every_time.ready());
    }

    #[test]
    fn a_counting_throttle_says_how_many_it_held_back() {
        let throttle = CountingThrottle::new(Duration::from_secs(3600));
        assert_eq!(throttle.ready(), Some(0));
        assert_eq!(throttle.ready(), None);
        assert_eq!(throttle.ready(), None);
        let every_time = CountingThrottle::new(Duration::ZERO);
        assert_eq!(every_time.ready(), Some(0));
        assert_eq!(every_time.ready(), Some(0));
        // The count restarts with each line let through.
        let held = CountingThrottle::new(Duration::from_millis(30));
        assert_eq!(held.ready(), Some(0));
        for _ in 0..3 {
            assert_eq!(held.ready(), None);
        }
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(held.ready(), Some(3));
        assert_eq!(held.ready(), None);
    }

    #[test]
    fn millis_saturate() {
        assert_eq!(millis(Duration::from_millis(1500)), 1500);
        assert_eq!(millis(Duration::MAX), u64::MAX);
    }
}
