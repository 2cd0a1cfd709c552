//! Forwarded requests whose `result` record is still to come.
//!
//! DESIGN §1 gives every forwarded request a `result` record. A drain cut short by
//! `shutdown_grace` drops requests still waiting on Plivo, so the drain writes their
//! `result` records instead ([`Forwarded::cut`]): `status` null (the caller got no
//! answer), `reason` `shutting-down`, nothing known of Plivo's answer. Exactly one side
//! writes each record: whoever takes the entry out of the table.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use foldhash::HashMap;

use crate::audit::{AuditEvent, EventKind};
use crate::millis::millis;
use crate::sync::lock_unpoisoned;

/// Forwarded requests not concluded yet, by ticket.
#[derive(Default)]
pub(super) struct Forwarded {
    table: Mutex<Table>,
    next_ticket: AtomicU64,
}

#[derive(Default)]
struct Table {
    waiting: HashMap<u64, Waiting>,
    /// Set by [`Forwarded::cut`]: from then on nothing is forwarded and no request
    /// writes its own `result`.
    cut: bool,
}

struct Waiting {
    forward: AuditEvent,
    started: Instant,
}

/// A forwarded request's claim on its `result` record.
#[must_use = "a ticket is settled when the request concludes"]
pub(super) struct Ticket(u64);

impl Forwarded {
    /// Registers a request about to be forwarded and runs `submit_forward` (which hands
    /// its `forward` record to the audit log) before any drain can cut in, so a `result`
    /// the drain writes always follows its `forward`. `None` once the drain has cut.
    pub(super) fn register<T>(
        &self,
        forward: AuditEvent,
        started: Instant,
        submit_forward: impl FnOnce() -> T,
    ) -> Option<(Ticket, T)> {
        let mut table = self.lock();
        if table.cut {
            return None;
        }
        let submitted = submit_forward();
        let ticket = self.next_ticket.fetch_add(1, Ordering::Relaxed);
        table.waiting.insert(ticket, Waiting { forward, started });
        Some((Ticket(ticket), submitted))
    }

    /// The request has its outcome: `submit_result` hands its `result` record to the
    /// audit log, unless the drain wrote one already (`None`). Run under the table's lock,
    /// so the drain's flush that follows a cut covers it.
    pub(super) fn settle<T>(&self, ticket: Ticket, submit_result: impl FnOnce() -> T) -> Option<T> {
        let mut table = self.lock();
        table.waiting.remove(&ticket.0)?;
        Some(submit_result())
    }

    /// The by-uuid lookup learned the MPC's name: a `result` the drain writes for this
    /// request names it too, as the request's own `result` would.
    pub(super) fn name_learned(&self, ticket: &Ticket, name: &Arc<str>) {
        if let Some(waiting) = self.lock().waiting.get_mut(&ticket.0) {
            waiting.forward.mpc = Some(Arc::clone(name));
        }
    }

    /// Ends every wait: a `result` event for each request still waiting on Plivo, which
    /// the caller writes. Requests forwarded later are refused.
    pub(super) fn cut(&self) -> Vec<AuditEvent> {
        let mut table = self.lock();
        table.cut = true;
        table
            .waiting
            .drain()
            .map(|(_, waiting)| cut_short(waiting))
            .collect()
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        // The table stays consistent whatever panicked while holding it.
        lock_unpoisoned(&self.table)
    }
}

fn cut_short(waiting: Waiting) -> AuditEvent {
    AuditEvent {
        event: EventKind::Result,
        status: None,
        reason: Some("shutting-down".into()),
        upstream_status: None,
        plivo_api_id: None,
        attempts: None,
        duration_ms: Some(millis(waiting.started.elapsed())),
        ..waiting.forward
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn forward(id: &str) -> AuditEvent {
        AuditEvent {
            event: EventKind::Forward,
            request_id: Arc::from(id),
            mpc: Some(Arc::from("billing-1")),
            ..AuditEvent::default()
        }
    }

    #[test]
    fn a_request_that_settles_first_writes_its_own_result() {
        let forwarded = Forwarded::default();
        let (ticket, ()) = forwarded
            .register(forward("a"), Instant::now(), || ())
            .expect("not cut");
        assert_eq!(forwarded.settle(ticket, || "written"), Some("written"));
        assert!(forwarded.cut().is_empty());
    }

    #[test]
    fn a_name_learned_after_the_forward_is_in_the_cut_result() {
        let forwarded = Forwarded::default();
        let mut by_uuid = forward("a");
        by_uuid.mpc = None;
        let (ticket, ()) = forwarded
            .register(by_uuid, Instant::now(), || ())
            .expect("not cut");
        forwarded.name_learned(&ticket, &Arc::from("billing-standup"));
        let cut = forwarded.cut();
        assert_eq!(cut[0].mpc.as_deref(), Some("billing-standup"));
        // Learned too late: the entry is gone, nothing to update.
        forwarded.name_learned(&ticket, &Arc::from("other"));
        assert_eq!(forwarded.settle(ticket, || ()), None);
    }

    #[test]
    fn the_cut_writes_the_results_of_requests_still_waiting_and_only_once() {
        let forwarded = Forwarded::default();
        let (first, ()) = forwarded
            .register(forward("a"), Instant::now(), || ())
            .expect("not cut");
        let (second, ()) = forwarded
            .register(forward("b"), Instant::now(), || ())
            .expect("not cut");
        assert_eq!(forwarded.settle(second, || ()), Some(()));
        let cut = forwarded.cut();
        assert_eq!(cut.len(), 1);
        let result = &cut[0];
        assert_eq!(&*result.request_id, "a");
        assert_eq!(result.event, EventKind::Result);
        assert_eq!(result.status, None);
        assert_eq!(result.reason.as_deref(), Some("shutting-down"));
        assert_eq!(result.mpc.as_deref(), Some("billing-1"));
        assert!(result.duration_ms.is_some());
        // The request cut short learns it must not write a second result.
        assert_eq!(
            forwarded.settle(first, || unreachable!("written twice")),
            None::<()>
        );
        // Nothing is forwarded after the cut, and its forward record is not submitted.
        assert!(forwarded
            .register(forward("c"), Instant::now(), || unreachable!("submitted"))
            .map(|(_, ())| ())
            .is_none());
    }
}
