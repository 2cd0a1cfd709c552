//! A disk that stops answering: a `write` or `fsync` that does not return.
//!
//! Without a bound, `/readyz` (DESIGN §5: ready only while the audit log is writable)
//! would stay 200 and every caller would wait for ever. [`Progress`] records when the
//! batch in progress started, and [`AuditLog::is_writable`](super::AuditLog::is_writable)
//! is false once that is longer ago than the bound: one clock read and two atomic
//! stores per batch, nothing per record.
//!
//! With `fsync: always` the callers wait for the writer thread, so a [`watchdog`] thread
//! beside it answers them past the bound with the error of a failed write (the gateway
//! then replies `503 audit-unavailable` and does not forward): those of the stuck batch
//! and those queued behind it. Their records are not withdrawn, since a write in
//! progress cannot be: the stuck batch lands if the disk answers again, and the queued
//! records after it, in order. So whatever a request writes after its record was
//! refused this way (the gateway's `denied` record after a refused `forward`) follows
//! that record in the log, as after any failed write.
//!
//! With `fsync: never` the write happens on the caller's own thread, under the log's
//! mutex: nothing can answer that caller before the write returns, so only readiness
//! applies there.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex, TryLockError, Weak};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::{Ack, AckRelay, AuditError, Request};
use crate::audit::path::AuditPath;
use crate::audit::record::AuditEvent;
use crate::sync::lock_unpoisoned;

/// When the batch (or rotation, or periodic check) in progress started.
pub(super) struct Progress {
    base: Instant,
    /// Milliseconds since `base`, plus one; 0 while nothing is in progress.
    started: AtomicU64,
}

impl Progress {
    pub(super) fn new() -> Self {
        Progress {
            base: Instant::now(),
            started: AtomicU64::new(0),
        }
    }

    fn now(&self) -> u64 {
        u64::try_from(self.base.elapsed().as_millis())
            .unwrap_or(u64::MAX - 1)
            .saturating_add(1)
    }

    pub(super) fn start(&self) {
        self.started.store(self.now(), Ordering::Relaxed);
    }

    pub(super) fn end(&self) {
        self.started.store(0, Ordering::Relaxed);
    }

    /// Whether what is in progress started more than `bound` ago.
    pub(super) fn stalled(&self, bound: Duration) -> bool {
        let started = self.started.load(Ordering::Relaxed);
        let bound = u64::try_from(bound.as_millis()).unwrap_or(u64::MAX);
        started != 0 && self.now().saturating_sub(started) > bound
    }
}

/// A record's acknowledgement, `None` once the watchdog answered it.
pub(super) type Pending = Option<oneshot::Sender<Ack>>;

/// What the writer thread and its watchdog share.
pub(super) struct Queue {
    /// Records for the writer, in order. Behind a mutex only so that the watchdog can
    /// take them while the writer is stuck: the writer never holds it across I/O.
    rx: Mutex<Receiver<Request>>,
    /// The acknowledgements of the batch being written, in record order.
    in_flight: Mutex<Vec<Pending>>,
    /// Records the watchdog took from `rx` and answered; written before whatever is
    /// still in `rx`, which was queued after them.
    answered: Mutex<Vec<AuditEvent>>,
}

impl Queue {
    pub(super) fn new(rx: Receiver<Request>) -> Self {
        Queue {
            rx: Mutex::new(rx),
            in_flight: Mutex::new(Vec::new()),
            answered: Mutex::new(Vec::new()),
        }
    }

    /// The queue of records, locked. Whatever the watchdog took from it is in
    /// `answered` by the time this returns (it moves them under this lock).
    pub(super) fn lock_rx(&self) -> std::sync::MutexGuard<'_, Receiver<Request>> {
        lock_unpoisoned(&self.rx)
    }

    /// Moves the records the watchdog answered into the batch (their acknowledgements
    /// `None`). Call with [`lock_rx`](Self::lock_rx) held, before reading `rx`.
    pub(super) fn take_answered(&self, events: &mut Vec<AuditEvent>, acks: &mut Vec<Pending>) {
        let mut answered = lock_unpoisoned(&self.answered);
        acks.extend(answered.iter().map(|_| None));
        events.append(&mut answered);
    }

    /// Makes the batch's acknowledgements reachable by the watchdog while it is written;
    /// `acks` is left with the (empty) vector taken back last time.
    pub(super) fn hand_over(&self, acks: &mut Vec<Pending>) {
        std::mem::swap(&mut *lock_unpoisoned(&self.in_flight), acks);
    }

    /// Takes the batch's acknowledgements back once it is written (or failed).
    pub(super) fn take_back(&self, acks: &mut Vec<Pending>) {
        std::mem::swap(&mut *lock_unpoisoned(&self.in_flight), acks);
    }

    /// Answers everyone waiting with a write error: the batch in flight and every record
    /// queued, which moves to `answered` so that it is still written, in order.
    fn answer_waiting(&self, path: &AuditPath, bound: Duration) {
        let mut refused: Vec<oneshot::Sender<Ack>> = lock_unpoisoned(&self.in_flight)
            .iter_mut()
            .filter_map(Option::take)
            .collect();
        // The writer holds `rx` only to take a batch, never across I/O: if it holds it
        // now, it is not stuck, and whatever is queued is about to be written.
        let rx = match self.rx.try_lock() {
            Ok(rx) => Some(rx),
            Err(TryLockError::Poisoned(poisoned)) => Some(poisoned.into_inner()),
            Err(TryLockError::WouldBlock) => None,
        };
        if let Some(rx) = rx {
            // Moved before any caller is answered: what a caller writes once answered
            // goes into `rx`, after them.
            let mut answered = lock_unpoisoned(&self.answered);
            for Request { event, ack } in rx.try_iter() {
                answered.push(event);
                refused.push(ack);
            }
        }
        if refused.is_empty() {
            return;
        }
        let source = Arc::new(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!(
                "the disk has not answered for {} ms; the record is written if it answers again",
                bound.as_millis()
            ),
        ));
        AckRelay::send_all(
            refused
                .into_iter()
                .map(|ack| {
                    let error = AuditError::WriteFailed {
                        path: path.to_path_buf(),
                        source: Arc::clone(&source),
                    };
                    (ack, Err(error))
                })
                .collect(),
        );
    }
}

/// Beside the writer thread until it ends: while a batch has been in progress longer
/// than `bound`, answers the callers waiting for it or queued behind it (see the module
/// documentation). Checks `bound / 8` apart, so a caller waits at most that much longer.
pub(super) fn watchdog(
    queue: &Weak<Queue>,
    progress: &Progress,
    bound: Duration,
    path: &AuditPath,
) {
    let tick = (bound / 8).max(Duration::from_millis(5));
    let mut reported = false;
    loop {
        std::thread::sleep(tick);
        let Some(queue) = queue.upgrade() else {
            return;
        };
        if !progress.stalled(bound) {
            reported = false;
            continue;
        }
        if !reported {
            tracing::error!(path = %path.display(), bound_ms = bound.as_millis(), "an audit write or fsync has not returned within the bound (the disk stopped answering?); not ready, and the records waiting for it are refused until it returns (they are still written, in order, if it does)");
            reported = true;
        }
        queue.answer_waiting(path, bound);
    }
}

/// Sends each record's outcome to its caller, but for those the watchdog already
/// answered: such a record was written after its caller was told it was not, which is
/// logged.
pub(super) fn acknowledge(
    acks: &mut Vec<Pending>,
    outcomes: Vec<Result<u64, AuditError>>,
    path: &AuditPath,
) {
    let mut late = Vec::new();
    let mut send = Vec::with_capacity(acks.len());
    for (ack, outcome) in acks.drain(..).zip(outcomes) {
        match (ack, outcome) {
            (Some(ack), outcome) => send.push((ack, outcome)),
            (None, Ok(seq)) => late.push(seq),
            (None, Err(_)) => {}
        }
    }
    if let (Some(first), Some(last)) = (late.first(), late.last()) {
        tracing::warn!(path = %path.display(), first_seq = first, last_seq = last, records = late.len(), "audit records written after their callers were refused (the disk answered late): the log holds them, and what their requests wrote next follows them");
    }
    AckRelay::send_all(send);
}
