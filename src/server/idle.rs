//! How long a data connection may wait for its caller: the first request head's deadline,
//! counted from the accept, and the idle timeout of an HTTP/2 connection with no request in
//! flight. (HTTP/1.1's later heads and idle keep-alive are hyper's own header timer.)

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::millis::millis;

/// Requests in flight on one HTTP/2 connection, and when the last one ended.
pub(super) struct H2Activity {
    in_flight: AtomicUsize,
    opened: Instant,
    /// When the last request ended, in milliseconds after `opened`.
    last_end_ms: AtomicU64,
    /// Notified when `in_flight` falls to zero.
    ended: Notify,
}

impl H2Activity {
    pub(super) fn new() -> H2Activity {
        H2Activity {
            in_flight: AtomicUsize::new(0),
            opened: Instant::now(),
            last_end_ms: AtomicU64::new(0),
            ended: Notify::new(),
        }
    }

    /// Counts a request until the returned guard is dropped.
    pub(super) fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(Arc::clone(self))
    }

    /// Returns once no request has been in flight for `limit`.
    pub(super) async fn idle_for(&self, limit: Duration) {
        loop {
            // Registered before the check, so an end in between is not missed.
            let mut ended = std::pin::pin!(self.ended.notified());
            ended.as_mut().enable();
            if self.in_flight.load(Ordering::Acquire) > 0 {
                ended.await;
                continue;
            }
            let last_end = Duration::from_millis(self.last_end_ms.load(Ordering::Acquire));
            let deadline = self.opened + last_end + limit;
            if Instant::now() >= deadline {
                return;
            }
            tokio::select! {
                () = tokio::time::sleep_until(deadline) => {}
                () = ended => {}
            }
        }
    }
}

/// One request counted by [`H2Activity`].
pub(super) struct InFlight(Arc<H2Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let activity = &self.0;
        let now_ms = millis(activity.opened.elapsed());
        activity.last_end_ms.store(now_ms, Ordering::Release);
        // Only the last one out can make the connection idle.
        if activity.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            activity.ended.notify_waiters();
        }
    }
}

/// Whether a connection's first request head has arrived. hyper's own header timer
/// starts only when it first reads, after the version sniff or the TLS handshake may
/// already have waited most of [`HEADER_READ_TIMEOUT`](super::HEADER_READ_TIMEOUT); this
/// holds the first head to the deadline counted from the accept. (Later heads are
/// hyper's: it restarts its timer for each.)
#[derive(Default)]
pub(super) struct FirstHead {
    arrived: AtomicBool,
    notify: Notify,
}

impl FirstHead {
    /// Called for every request; after the first it costs one load.
    pub(super) fn arrive(&self) {
        if !self.arrived.load(Ordering::Acquire) {
            self.arrived.store(true, Ordering::Release);
            self.notify.notify_waiters();
        }
    }

    /// Whether the first head arrives by `deadline` (or already has). Any number of
    /// waiters, at any time: each registers before it looks at the flag, so an arrival
    /// in between still wakes it.
    pub(super) async fn arrives_before(&self, deadline: Instant) -> bool {
        let notified = self.notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if self.arrived.load(Ordering::Acquire) {
            return true;
        }
        tokio::select! {
            () = notified => true,
            () = tokio::time::sleep_until(deadline) => self.arrived.load(Ordering::Acquire),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two waiters, one registered before the arrival and one after: both learn of it at
    /// once, not at the deadline.
    #[tokio::test(start_paused = true)]
    async fn every_waiter_learns_that_the_first_head_arrived() {
        let head = Arc::new(FirstHead::default());
        let deadline = Instant::now() + Duration::from_secs(10);
        let early = tokio::spawn({
            let head = Arc::clone(&head);
            async move { head.arrives_before(deadline).await }
        });
        tokio::task::yield_now().await;
        head.arrive();
        let started = Instant::now();
        assert!(early.await.expect("no panic"));
        assert!(head.arrives_before(deadline).await, "a later waiter");
        assert_eq!(started.elapsed(), Duration::ZERO);
        let never = FirstHead::default();
        assert!(!never.arrives_before(deadline).await);
        assert_eq!(Instant::now(), deadline);
    }

    /// Paused time: each wait below passes at once, exactly.
    #[tokio::test(start_paused = true)]
    async fn an_http2_connection_is_idle_after_the_limit_with_nothing_in_flight() {
        let limit = Duration::from_secs(10);
        let activity = Arc::new(H2Activity::new());
        let busy = activity.begin();
        let in_flight_for_a_minute =
            tokio::time::timeout(Duration::from_secs(60), activity.idle_for(limit)).await;
        assert!(
            in_flight_for_a_minute.is_err(),
            "never idle while in flight"
        );

        drop(busy);
        let ended = Instant::now();
        activity.idle_for(limit).await;
        assert_eq!(ended.elapsed(), limit);

        // A request that comes and goes restarts the count from its end.
        tokio::time::advance(Duration::from_secs(5)).await;
        drop(activity.begin());
        let restarted = Instant::now();
        activity.idle_for(limit).await;
        assert_eq!(restarted.elapsed(), limit);
    }
}
