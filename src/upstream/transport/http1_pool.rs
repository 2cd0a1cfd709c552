//! The keep-alive pool of HTTP/1.1 connections, for an upstream that does not speak
//! HTTP/2: idle connections, the most recently used taken first, swept once per idle
//! period; and the handshake that opens one. `Transport::send_h1` (in `mod.rs`) takes a
//! connection from it for each call and gives it back once the answer is read.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, Weak};
use std::time::Duration;

use hyper::client::conn::http1;

use super::{H1Sender, SendError, Stream};
use crate::sync::lock_unpoisoned;

/// At most this many idle HTTP/1.1 connections are kept; more are closed when their call
/// ends.
const H1_MAX_IDLE: usize = 64;

/// Idle HTTP/1.1 connections, the most recently used on top (its TLS session and
/// buffers are the warmest).
#[derive(Default)]
pub(super) struct H1Pool {
    /// A std mutex: held only to push or pop, never across an await.
    idle: Mutex<Vec<IdleH1>>,
    /// Advanced once per idle period by the sweeper; an idle connection is stamped with
    /// it, so nothing on the request path reads the clock for this.
    period: AtomicU64,
    /// Whether the sweeper task runs.
    pub(super) sweeping: AtomicBool,
}

struct IdleH1 {
    sender: H1Sender,
    period: u64,
}

impl H1Pool {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<IdleH1>> {
        lock_unpoisoned(&self.idle)
    }

    #[cfg(test)]
    pub(super) fn idle_count(&self) -> usize {
        self.lock().len()
    }

    /// An idle connection ready for a call, if any is left open.
    pub(super) async fn take_ready(&self) -> Option<H1Sender> {
        loop {
            let mut sender = self.pop()?;
            if sender.is_ready() {
                return Some(sender);
            }
            // Given back the moment its previous answer was read: ready as soon as its
            // connection task has run, or an error if the upstream closed it meanwhile.
            if sender.ready().await.is_ok() {
                return Some(sender);
            }
        }
    }

    fn pop(&self) -> Option<H1Sender> {
        let mut idle = self.lock();
        while let Some(IdleH1 { sender, .. }) = idle.pop() {
            if !sender.is_closed() {
                return Some(sender);
            }
        }
        None
    }

    /// Keeps `sender` for a later call; false if it was closed or the pool is full.
    pub(super) fn put(&self, sender: H1Sender) -> bool {
        if sender.is_closed() {
            return false;
        }
        let mut idle = self.lock();
        if idle.len() >= H1_MAX_IDLE {
            return false;
        }
        let period = self.period.load(Ordering::Relaxed);
        idle.push(IdleH1 { sender, period });
        true
    }

    /// Starts a new period and closes the connections that stayed idle through the
    /// whole of the last one. Returns how many it closed.
    fn sweep(&self) -> usize {
        let now = self.period.fetch_add(1, Ordering::Relaxed) + 1;
        let mut idle = self.lock();
        let before = idle.len();
        idle.retain(|conn| conn.period + 1 >= now && !conn.sender.is_closed());
        before - idle.len()
    }
}

/// Closes HTTP/1.1 connections idle for between one and two `idle` periods, for as long
/// as the transport exists.
pub(super) async fn close_idle_h1(pool: Weak<H1Pool>, idle: Duration) {
    loop {
        tokio::time::sleep(idle).await;
        let Some(pool) = pool.upgrade() else { return };
        let closed = pool.sweep();
        if closed > 0 {
            tracing::debug!(closed, "closed idle upstream HTTP/1.1 connections");
        }
    }
}

pub(super) async fn handshake_h1(stream: Stream) -> Result<H1Sender, SendError> {
    let (sender, connection) = http1::handshake(stream).await.map_err(SendError::Request)?;
    tokio::spawn(async move {
        if let Err(err) = connection.await {
            tracing::debug!(error = %err, "upstream HTTP/1.1 connection ended");
        }
    });
    Ok(sender)
}
