//! The HTTP/2 connection to the upstream, spoken with the `h2` crate: the slot that holds
//! the one open connection (numbered, so that whoever saw it fail forgets only that one),
//! the task that drives it and pings it, and the watcher that forgets it once idle.
//! `Transport` (in `mod.rs`) opens it and puts each call's stream on it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::Bytes;
use hyper_util::rt::TokioIo;
use tokio::time::Instant;

use super::Stream;
use crate::sync::lock_unpoisoned;

type Sender = h2::client::SendRequest<Bytes>;

/// One HTTP/2 connection, numbered so that a failed call or an idle watcher forgets
/// only the connection it knows, never a newer one.
#[derive(Clone)]
pub(super) struct OpenH2 {
    pub(super) generation: u64,
    pub(super) sender: Sender,
    /// Set by the connection's task once the connection has ended.
    ended: Arc<AtomicBool>,
}

/// An HTTP/2 connection that can take a stream now.
pub(super) struct ReadyH2 {
    pub(super) generation: u64,
    pub(super) sender: Sender,
}

/// The HTTP/2 connection in use, and how many calls went over HTTP/2.
#[derive(Default)]
pub(super) struct H2Slot {
    /// A std mutex: it is held only to clone or swap a sender, never across an await.
    current: Mutex<Option<OpenH2>>,
    generations: AtomicU64,
    /// Calls sent over any HTTP/2 connection; the idle watcher only compares it.
    pub(super) calls: AtomicU64,
}

impl H2Slot {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<OpenH2>> {
        lock_unpoisoned(&self.current)
    }

    pub(super) fn open(&self) -> Option<OpenH2> {
        self.lock()
            .as_ref()
            .filter(|open| !open.ended.load(Ordering::Acquire))
            .cloned()
    }

    /// Makes `sender` the connection in use, under a new generation.
    pub(super) fn install(&self, sender: Sender, ended: Arc<AtomicBool>) -> OpenH2 {
        let open = OpenH2 {
            generation: self.generations.fetch_add(1, Ordering::Relaxed),
            sender,
            ended,
        };
        *self.lock() = Some(open.clone());
        open
    }

    fn is_current(&self, generation: u64) -> bool {
        holds(&self.lock(), generation)
    }

    /// Stops using connection `generation`, so the next call opens a new one, and
    /// leaves a newer connection alone. `h2` closes the connection once the last
    /// sender is gone and its last stream (a call still in flight) has ended.
    pub(super) fn forget(&self, generation: u64) {
        let mut current = self.lock();
        if holds(&current, generation) {
            *current = None;
        }
    }
}

/// A call waiting for its answer's head on HTTP/2 connection `generation`. If the call
/// is dropped at its deadline still waiting, the connection is forgotten: an upstream
/// that vanished without a reset (a NAT or load balancer forgot the connection) answers
/// nothing, and until the pings find that out (up to `H2_PING_INTERVAL` +
/// `H2_PING_TIMEOUT`) every later call on it would hang for its whole `timeout`. The
/// next call opens a new connection; the streams still on this one end on their own.
/// An upstream that is merely slow costs one new connection. A call dropped before its
/// deadline (its caller went away) says nothing about the connection, and keeps it.
pub(super) struct HeadWait<'a> {
    slot: &'a H2Slot,
    generation: u64,
    deadline: Instant,
    waiting: bool,
}

impl<'a> HeadWait<'a> {
    pub(super) fn new(slot: &'a H2Slot, generation: u64, deadline: Instant) -> Self {
        HeadWait {
            slot,
            generation,
            deadline,
            waiting: true,
        }
    }

    /// The head came, or the stream failed: either way the connection answered.
    pub(super) fn answered(mut self) {
        self.waiting = false;
    }
}

impl Drop for HeadWait<'_> {
    fn drop(&mut self) {
        // The clock is read only here, for a call cut off while waiting.
        if self.waiting && Instant::now() >= self.deadline {
            tracing::debug!(
                generation = self.generation,
                "a call reached its deadline with no answer on the upstream HTTP/2 \
                 connection; later calls go on a new one"
            );
            self.slot.forget(self.generation);
        }
    }
}

fn holds(current: &Option<OpenH2>, generation: u64) -> bool {
    current
        .as_ref()
        .is_some_and(|open| open.generation == generation)
}

/// Forgets HTTP/2 connection `generation` once a whole `idle` period passed without a
/// call, so an idle sidecar does not hold (and ping) a connection to Plivo forever. It
/// counts calls rather than reading the clock on every call.
pub(super) async fn close_when_idle(slot: Weak<H2Slot>, generation: u64, idle: Duration) {
    let mut calls_seen = match slot.upgrade() {
        Some(slot) => slot.calls.load(Ordering::Relaxed),
        None => return,
    };
    loop {
        tokio::time::sleep(idle).await;
        let Some(slot) = slot.upgrade() else { return };
        if !slot.is_current(generation) {
            return;
        }
        let calls = slot.calls.load(Ordering::Relaxed);
        if calls == calls_seen {
            tracing::debug!(generation, "closing the idle upstream HTTP/2 connection");
            slot.forget(generation);
            return;
        }
        calls_seen = calls;
    }
}

/// How often an HTTP/2 connection is pinged, and how long a pong may take.
#[derive(Clone, Copy, Debug)]
pub(super) struct KeepAlive {
    pub(super) interval: Duration,
    pub(super) timeout: Duration,
}

/// Drives one HTTP/2 connection until it ends, or until a ping goes unanswered: one
/// connection carries every call, so a connection that died silently (a NAT or load
/// balancer forgot it) must be found by pings, not by calls that hang until their
/// `timeout`. Dropping the connection fails the calls still on it, which are retried.
pub(super) async fn drive_h2(
    mut connection: h2::client::Connection<TokioIo<Stream>, Bytes>,
    keep_alive: KeepAlive,
    ended: Arc<AtomicBool>,
) {
    let pings = connection.ping_pong();
    let unanswered = async {
        match pings {
            Some(pings) => ping_until_unanswered(pings, keep_alive).await,
            // h2 hands its ping handle out once, and this is the only place that asks.
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        biased;
        result = &mut connection => {
            if let Err(err) = result {
                tracing::debug!(error = %err, "upstream HTTP/2 connection ended");
            }
        }
        () = unanswered => {
            tracing::warn!(timeout = ?keep_alive.timeout, "upstream HTTP/2 connection did not answer a ping; closing it");
        }
    }
    ended.store(true, Ordering::Release);
}

/// Pings every `interval`; returns when a pong takes longer than `timeout`. A ping the
/// connection refuses (it is closing) waits for the connection to end instead.
async fn ping_until_unanswered(mut pings: h2::PingPong, keep_alive: KeepAlive) {
    loop {
        tokio::time::sleep(keep_alive.interval).await;
        match tokio::time::timeout(keep_alive.timeout, pings.ping(h2::Ping::opaque())).await {
            Ok(Ok(_pong)) => {}
            Ok(Err(_closing)) => return std::future::pending().await,
            Err(_elapsed) => return,
        }
    }
}
