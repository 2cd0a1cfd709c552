//! The durable audit writer (DESIGN.md §3, contract).
//!
//! [`AuditLog`] is a cheap handle. Both modes commit records in batches: serialize,
//! chain, one `write`, and only then acknowledge.
//!
//! - [`Fsync::Always`]: a dedicated OS thread (not a tokio task, so a slow disk never
//!   stalls the async runtime) takes the first waiting record, yields once so that the
//!   runtime's current turn can queue more, drains whatever else is queued (group
//!   commit), writes and fsyncs once, and wakes one caller of the batch, which wakes the
//!   rest (`AckRelay`).
//! - [`Fsync::Never`]: nothing to wait for but the page cache, so callers write under a
//!   mutex themselves; the records appended in one turn of the runtime share one write,
//!   and each caller collects its record's outcome by ticket (`InlineTicket`): no
//!   channel, no allocation per record.
//!
//! A failed write or fsync is undone (the file is cut back to its length before the
//! batch, `seq`/`prev` do not advance), every record of the batch gets an error, and the
//! log reports not writable until a later write or a periodic probe succeeds. The probe
//! (a 4 KiB write cut off again) also runs once at open, so that a disk that takes no
//! data is reported from the start. A failed rotation is retried after each write,
//! counted, and logged at most once per 10 s; the records still go to the live file.
//!
//! The live file may be removed or moved away under the writer (by hand, by logrotate
//! without `copytruncate`). A batch that finds its file removed (`fstat`: no name left)
//! fails like any failed write; a file moved away is noticed by a check of `audit.path`
//! once per `PROBE_INTERVAL` (1 s) and before every rotation. Either way the writer stops
//! writing to it and continues the chain in a new file at `audit.path`, as after a
//! rotation; records acknowledged before stay where the file went. A non-empty file
//! put in its place by someone else is neither written to nor rotated: the log is not
//! writable until the path is free (see `Writer::ensure_open`).
//!
//! A disk that stops answering (a `write` or `fsync` that does not return) makes the log
//! not writable once a batch has been in progress for `STALL_BOUND` (5 s); with
//! [`Fsync::Always`] the callers waiting for it are then refused (see `stall`).
//!
//! With [`Fsync::Never`] a rotation does not fsync the file it renames (that could stall
//! the request path behind the writeback of 100 MiB); the file is fsynced later, off the
//! request path, by the probe thread, and at the latest by [`AuditLog::close`], so that
//! a clean exit leaves every file of the log fsynced (DESIGN §5), not only the live one.

use std::collections::VecDeque;
use std::fs::File;
use std::future::Future;
use std::io;
use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use time::OffsetDateTime;
use tokio::sync::{oneshot, watch};

use super::chain::{self, ChainHasher, HexDigest};
use super::path::AuditPath;
use super::record::{self, AuditEvent, Body, TsText};
use super::recover::{continues_under, enforce_owner_only, recover, StartUp};
use super::saved_head::{self, Durability, SavedHead};
use super::segment::{self, FileId, FsOpener, LiveFile, Opener};
use super::{AuditSettings, Fsync};
use crate::millis::CountingThrottle;
use crate::sync::lock_unpoisoned;
use stall::{Progress, Queue};

/// Upper bound of one group commit, so one batch cannot grow without limit.
const MAX_BATCH: usize = 512;
/// How often a not-writable log checks whether the disk accepts writes again, and any
/// log whether `audit.path` still names its live file.
const PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// How long a batch (a write, with `fsync: always` its fsync) may be in progress before
/// the log reports not writable and, with `fsync: always`, its waiting callers are
/// refused (see `stall`). A healthy disk answers in milliseconds and a busy one well
/// within a second; 5 s is a disk (or network volume) that stopped answering, and still
/// below the timeouts callers and readiness probes are usually given.
const STALL_BOUND: Duration = Duration::from_secs(5);

/// The bound the stuck-disk tests give the writer instead of [`STALL_BOUND`].
#[cfg(test)]
pub(crate) const TEST_STALL_BOUND: Duration = Duration::from_millis(200);

/// Size of the probe write: large enough to notice a full disk.
pub(crate) const PROBE_BYTES: usize = 4096;
/// How often a rotation that keeps failing is logged: it is retried after every write.
const ROTATION_FAILURE_LOG_INTERVAL: Duration = Duration::from_secs(10);
/// How often failed writes are logged: on a full disk every request's records fail, and
/// `mpc_gateway_audit_failures_total` and `/readyz` already say so for each.
const WRITE_FAILURE_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Why the audit log could not open, write or close.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("audit log: cannot {op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("audit log: directory {} does not exist (it is not created automatically)", dir.display())]
    MissingDirectory { dir: PathBuf },
    #[error("audit log: {} is not a directory", dir.display())]
    NotADirectory { dir: PathBuf },
    #[error("audit log: {} cannot be continued: {detail}; check it with `mpc-gateway audit verify` and move it aside to start a new file", path.display())]
    Corrupt { path: PathBuf, detail: String },
    /// A rotated file ends without a newline although, with `fsync: always`, its records
    /// were fsynced before it was renamed: no crash leaves that.
    #[error("audit log: rotated file {} ends with a partial record (from byte offset {offset}); with `fsync: always` its records were fsynced before it was rotated, so no crash leaves that: it was altered, or the previous run used `fsync: never`. If it did, start once with `fsync: never` (start-up then cuts the partial record); otherwise inspect the file and truncate it after its last newline by hand", path.display())]
    TornRotatedFile { path: PathBuf, offset: u64 },
    #[error("audit log: a record could not be serialized: {detail}")]
    Encode { detail: String },
    #[error("audit log: the HMAC key (audit.hmac_key) cannot be used: {source}")]
    UnusableHmacKey {
        #[source]
        source: hmac::digest::InvalidLength,
    },
    #[error("audit log: {} is in use by another process (it holds {}); one gateway per audit log, or the chain forks", path.display(), lock.display())]
    InUse { path: PathBuf, lock: PathBuf },
    #[error("audit log is closed")]
    Closed,
    #[error("audit log: the writer thread has stopped")]
    WriterGone,
    /// A batch could not be written (or fsynced); every record of it gets this error,
    /// so they share the one I/O error, kept as the OS reported it (ENOSPC, EIO, ...).
    #[error("audit log: cannot write {}: {source}", path.display())]
    WriteFailed {
        path: PathBuf,
        #[source]
        source: Arc<io::Error>,
    },
    /// Every call of [`AuditLog::close`] returns the same outcome, so the error is shared.
    #[error("audit log: final flush of {} failed: {source}", path.display())]
    CloseFailed {
        path: PathBuf,
        #[source]
        source: Arc<io::Error>,
    },
}

/// A record waiting for the writer, and where to report its fate.
struct Request {
    event: AuditEvent,
    ack: oneshot::Sender<Ack>,
}

/// A record's fate (its seq, or why it was not written), with the relay of the rest of
/// its batch.
type Ack = (Result<u64, AuditError>, AckRelay);

/// The acknowledgements of a batch, but for the one they travel with. The writer thread
/// wakes one waiting caller and hands it the rest, so the others are woken from inside
/// the caller's runtime: from another thread, every wake-up is a syscall and often a
/// context switch (on a current-thread runtime, one per record). Whoever drops the relay
/// sends what it holds, so nothing is lost if that caller has gone away.
#[derive(Default)]
struct AckRelay(Vec<(oneshot::Sender<Ack>, Result<u64, AuditError>)>);

impl AckRelay {
    /// Acknowledges a whole batch: one send, the relay doing the rest.
    fn send_all(mut acks: Vec<(oneshot::Sender<Ack>, Result<u64, AuditError>)>) {
        if let Some((first, outcome)) = acks.pop() {
            // If that caller is gone, the returned relay is dropped here and sends the rest.
            let _ = first.send((outcome, AckRelay(acks)));
        }
    }
}

impl Drop for AckRelay {
    fn drop(&mut self) {
        for (ack, outcome) in self.0.drain(..) {
            let _ = ack.send((outcome, AckRelay::default()));
        }
    }
}

/// `None` while running; the final flush's outcome once the writer stopped.
type Outcome = Option<Result<(), Arc<io::Error>>>;

/// Cheap, cloneable handle to the audit writer.
#[derive(Clone)]
pub struct AuditLog {
    shared: Arc<Shared>,
}

struct Shared {
    path: AuditPath,
    writable: Arc<AtomicBool>,
    rotation_failures: RotationFailures,
    /// When the batch in progress started: not writable while it is stuck.
    progress: Arc<Progress>,
    stall_bound: Duration,
    mode: Mode,
}

/// Where records are written.
enum Mode {
    /// `fsync: always`: a dedicated thread commits batches (one write, one fsync) so that
    /// one fsync covers many records and never blocks the async runtime.
    Threaded {
        /// `None` once closed. Dropping the last sender tells the writer to finish.
        tx: Mutex<Option<mpsc::Sender<Request>>>,
        done: watch::Receiver<Outcome>,
    },
    /// `fsync: never`: nothing to wait for but a write into the page cache, so callers
    /// write under a mutex themselves; handing each record to another thread would cost
    /// more (two context switches) than the write. Records appended in the same turn of
    /// the runtime share one write (see [`InlineTicket`]). A small thread does the
    /// periodic work: fsyncing rotated files, following a live file moved away, probing
    /// while the log is not writable.
    Inline(Arc<Mutex<InlineState>>),
}

/// The inline mode's records, by ticket: each append takes the next ticket. Tickets
/// from `first_uncollected` on are first `settled` (written or refused, their outcome
/// waiting to be collected), then `pending` (not yet written), in that order.
struct InlineState {
    /// `None` once closed.
    writer: Option<Writer>,
    /// Outcomes not yet collected; `None` where collected out of order.
    settled: VecDeque<Option<Result<u64, AuditError>>>,
    /// Appended, not yet written.
    pending: Vec<AuditEvent>,
    /// The ticket of `settled`'s first entry.
    first_uncollected: u64,
    /// The final flush's outcome, once closed.
    outcome: Outcome,
}

impl InlineState {
    /// Queues a record; returns its ticket.
    fn push(&mut self, event: AuditEvent) -> u64 {
        self.pending.push(event);
        self.first_uncollected + (self.settled.len() + self.pending.len() - 1) as u64
    }

    /// Writes (or, once closed, refuses) every pending record; their outcomes wait to be
    /// collected.
    fn flush(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        // Out of `pending` before anything is written, so that no record can be written
        // twice, whatever happens after the write.
        let mut events = std::mem::take(&mut self.pending);
        let settled = &mut self.settled;
        let mut settle = |outcomes: Vec<Result<u64, AuditError>>| {
            // Tickets are positions: one outcome per record, in order.
            debug_assert_eq!(outcomes.len(), events.len());
            settled.extend(outcomes.into_iter().map(Some));
        };
        match self.writer.as_mut() {
            Some(writer) => writer.commit_and_rotate(&events, settle),
            None => settle(events.iter().map(|_| Err(AuditError::Closed)).collect()),
        }
        events.clear();
        self.pending = events;
    }

    /// The outcome of `ticket`'s record, flushing first if it is still pending. Each
    /// ticket is collected exactly once (see [`InlineTicket`]).
    fn collect(&mut self, ticket: u64) -> Result<u64, AuditError> {
        let index = ticket
            .checked_sub(self.first_uncollected)
            .and_then(|index| usize::try_from(index).ok());
        if index.is_some_and(|index| index >= self.settled.len()) {
            self.flush();
        }
        let outcome = index
            .and_then(|index| self.settled.get_mut(index))
            .and_then(Option::take);
        // Always there: each ticket is collected once, and flushed before.
        debug_assert!(outcome.is_some(), "ticket {ticket} collected twice");
        let outcome = outcome.unwrap_or(Err(AuditError::WriterGone));
        while let Some(None) = self.settled.front() {
            self.settled.pop_front();
            self.first_uncollected += 1;
        }
        outcome
    }
}

/// An inline append's claim on its record's outcome. It yields once, so that the other
/// requests ready in this turn of the runtime append theirs, and then collects: the first
/// of a turn's appends to get there writes every pending record in one write, the others
/// find theirs written. Dropped before that, it collects on drop, writing what is still
/// pending, so that no record waits for an append that may never come.
struct InlineTicket<'a> {
    state: &'a Mutex<InlineState>,
    ticket: u64,
    collected: bool,
}

impl InlineTicket<'_> {
    async fn after_this_turn(mut self) -> Result<u64, AuditError> {
        tokio::task::yield_now().await;
        self.collected = true;
        lock_unpoisoned(self.state).collect(self.ticket)
    }
}

impl Drop for InlineTicket<'_> {
    fn drop(&mut self) {
        if !self.collected {
            let _ = lock_unpoisoned(self.state).collect(self.ticket);
        }
    }
}

/// What an appended record's future waits on.
enum Acknowledgement<'a> {
    Threaded(oneshot::Receiver<Ack>),
    Inline(InlineTicket<'a>),
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog")
            .field("path", &self.shared.path.as_path())
            .field("writable", &self.is_writable())
            .finish()
    }
}

impl AuditLog {
    /// Opens (creating with mode 0600, creating parent dirs is NOT done: a missing dir is
    /// an error), recovers the chain (continues seq/prev from the last complete record,
    /// also from the newest rotated sibling or the saved head when the live file holds
    /// no record), cuts a torn last line with a `tracing::warn!` (refusing bytes no crash
    /// leaves: see `recover`), tests that the disk takes a write (the log starts not
    /// writable when it does not), and starts the writer thread (`fsync: always`) or the
    /// probe thread (`fsync: never`).
    /// Callable from inside or outside a tokio runtime (it never blocks on async work).
    pub fn open(settings: AuditSettings) -> Result<AuditLog, AuditError> {
        Self::open_with(settings, Box::new(FsOpener))
    }

    pub(crate) fn open_with(
        settings: AuditSettings,
        opener: Box<dyn Opener>,
    ) -> Result<AuditLog, AuditError> {
        Self::open_bounded(settings, opener, STALL_BOUND)
    }

    /// [`open_with`](Self::open_with), with the time a batch may take before the log
    /// counts as stuck (tests shorten it).
    fn open_bounded(
        settings: AuditSettings,
        opener: Box<dyn Opener>,
        stall_bound: Duration,
    ) -> Result<AuditLog, AuditError> {
        let AuditSettings {
            path,
            fsync,
            rotate_bytes,
            hmac_key,
        } = settings;
        existing_dir(&path)?;
        let lock = lock_exclusively(&path)?;
        let hasher =
            ChainHasher::new(hmac_key).map_err(|source| AuditError::UnusableHmacKey { source })?;
        let head = recover(
            &path,
            &StartUp {
                hasher: &hasher,
                fsync,
            },
        )?;
        // Not refused: refusing would let whoever can edit the log stop the gateway, and
        // `audit verify` finds the break anyway.
        if !continues_under(&head, &hasher) {
            tracing::error!(
                path = %path.display(),
                seq = head.next_seq - 1,
                "the last audit record's hash does not verify with the configured audit.hmac_key: the key changed (or was added or removed) since it was written, or the record was altered; the chain continues from it, and `audit verify` will report the break there"
            );
        }
        let writable = Arc::new(AtomicBool::new(true));
        let progress = Arc::new(Progress::new());
        let rotation_failures = RotationFailures::default();
        let mut writer = Writer {
            path: path.clone(),
            fsync,
            rotate_bytes,
            key_id: saved_head::key_id(&hasher),
            hasher,
            opener,
            file: None,
            // The file recovery repaired, if any, is the writer's to continue.
            live_id: std::fs::metadata(&path).ok().map(|meta| FileId::of(&meta)),
            len: 0,
            undo_to: None,
            next_seq: head.next_seq,
            prev: HexDigest::parse(&head.prev).ok_or_else(|| AuditError::Corrupt {
                path: path.to_path_buf(),
                detail: "its last hash is not 64 lower-case hex digits".into(),
            })?,
            last_ts: head.last_ts.unwrap_or(OffsetDateTime::UNIX_EPOCH),
            writable: writable.clone(),
            progress: Arc::clone(&progress),
            buf: Vec::new(),
            ts_cache: None,
            lock: Some(lock),
            dir_needs_sync: false,
            unsynced: Arc::default(),
            // Recovery left the saved head at the chain's last record, unmarked.
            head_marked_followed: false,
            rotation_failures: rotation_failures.clone(),
            rotation_failure_log: CountingThrottle::new(ROTATION_FAILURE_LOG_INTERVAL),
            write_failure_log: CountingThrottle::new(WRITE_FAILURE_LOG_INTERVAL),
        };
        writer.ensure_open().map_err(|source| AuditError::Io {
            op: "open",
            path: path.to_path_buf(),
            source,
        })?;
        writer.probe_at_start();
        let mode = match fsync {
            Fsync::Always => Self::start_thread(writer, stall_bound)?,
            Fsync::Never => Self::start_inline(writer)?,
        };
        Ok(AuditLog {
            shared: Arc::new(Shared {
                path,
                writable,
                rotation_failures,
                progress,
                stall_bound,
                mode,
            }),
        })
    }

    /// A log whose files hang at `gate` (their fsyncs with [`Fsync::Always`], their
    /// writes with [`Fsync::Never`]) and that counts as stuck after
    /// [`TEST_STALL_BOUND`]: the stuck-disk tests of the writer and of the gateway.
    #[cfg(test)]
    pub(crate) fn open_stuck(settings: AuditSettings, gate: &segment::fault::Gate) -> AuditLog {
        let stuck = segment::fault::Stuck {
            gate: gate.clone(),
            on_sync: settings.fsync == Fsync::Always,
        };
        Self::open_bounded(settings, Box::new(stuck), TEST_STALL_BOUND).expect("open")
    }

    /// Starts the writer thread and its watchdog, which ends with it.
    fn start_thread(writer: Writer, stall_bound: Duration) -> Result<Mode, AuditError> {
        let path = writer.path.clone();
        let progress = Arc::clone(&writer.progress);
        let (tx, rx) = mpsc::channel();
        let queue = Arc::new(Queue::new(rx));
        let watched = Arc::downgrade(&queue);
        let (done_tx, done) = watch::channel(None);
        let spawn_error = |path: &AuditPath| {
            let path = path.to_path_buf();
            move |source| AuditError::Io {
                op: "start the writer thread for",
                path,
                source,
            }
        };
        std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || writer.run(&queue, done_tx))
            .map_err(spawn_error(&path))?;
        // Failing here drops the sender: the writer thread then finishes.
        std::thread::Builder::new()
            .name("audit-watchdog".into())
            .spawn({
                let path = path.clone();
                move || stall::watchdog(&watched, &progress, stall_bound, &path)
            })
            .map_err(spawn_error(&path))?;
        Ok(Mode::Threaded {
            tx: Mutex::new(Some(tx)),
            done,
        })
    }

    fn start_inline(writer: Writer) -> Result<Mode, AuditError> {
        let path = writer.path.to_path_buf();
        let unsynced = Arc::clone(&writer.unsynced);
        let audit_path = writer.path.clone();
        let state = Arc::new(Mutex::new(InlineState {
            writer: Some(writer),
            settled: VecDeque::new(),
            pending: Vec::new(),
            first_uncollected: 0,
            outcome: None,
        }));
        let weak = Arc::downgrade(&state);
        std::thread::Builder::new()
            .name("audit-probe".into())
            .spawn(move || probe_while_open(&weak, &unsynced, &audit_path))
            .map_err(|source| AuditError::Io {
                op: "start the probe thread for",
                path,
                source,
            })?;
        Ok(Mode::Inline(state))
    }

    /// Appends one record; resolves only after it is written (and, with
    /// [`Fsync::Always`], after an fsync covering it). Returns the record's seq.
    ///
    /// Dropping the future after it was polled once does not withdraw the record.
    pub async fn append(&self, event: AuditEvent) -> Result<u64, AuditError> {
        self.submit(event)?.await
    }

    /// Hands one record to the writer now, in this call: its place in the chain is taken
    /// here, before any record handed over later. For callers that must order a record
    /// against other state under their own lock. The future resolves as
    /// [`append`](Self::append)'s does; dropping it does not withdraw the record.
    ///
    /// - `fsync: always`: the writer thread takes the record at once. The records of one
    ///   batch are acknowledged through one of them, which passes the acknowledgement on
    ///   when polled: futures handed over together must be polled together (`join_all`),
    ///   never awaited one after another.
    /// - `fsync: never`: the record is written when its future, after one yield, collects
    ///   its outcome, when the future is dropped, or when another append writes the
    ///   pending records first; so each future must be awaited or dropped promptly (an
    ///   outcome not yet collected keeps the ones after it in memory too). The futures
    ///   may be awaited in any order.
    pub fn submit(
        &self,
        event: AuditEvent,
    ) -> Result<impl Future<Output = Result<u64, AuditError>> + '_, AuditError> {
        let acknowledgement = match &self.shared.mode {
            Mode::Threaded { tx, .. } => {
                let (ack, acked) = oneshot::channel();
                let guard = lock_unpoisoned(tx);
                let tx = guard.as_ref().ok_or(AuditError::Closed)?;
                tx.send(Request { event, ack })
                    .map_err(|_| AuditError::WriterGone)?;
                Acknowledgement::Threaded(acked)
            }
            Mode::Inline(state) => {
                let ticket = {
                    let mut guard = lock_unpoisoned(state);
                    if guard.writer.is_none() {
                        return Err(AuditError::Closed);
                    }
                    guard.push(event)
                };
                Acknowledgement::Inline(InlineTicket {
                    state,
                    ticket,
                    collected: false,
                })
            }
        };
        Ok(async move {
            match acknowledgement {
                Acknowledgement::Threaded(acked) => {
                    let (outcome, relay) = acked.await.map_err(|_| AuditError::WriterGone)?;
                    // Acknowledges the rest of the batch, if this record carried them.
                    drop(relay);
                    outcome
                }
                Acknowledgement::Inline(ticket) => ticket.after_this_turn().await,
            }
        })
    }

    /// How many rotations failed since the log was opened, as a handle that reads the
    /// count (for the metrics).
    pub fn rotation_failures(&self) -> RotationFailures {
        self.shared.rotation_failures.clone()
    }

    /// False when the write test at open failed, and after a failed write, until a later
    /// write (or a probe) succeeds; false
    /// while a write (or fsync) has been in progress for longer than the stall bound (a
    /// disk that stopped answering); false after [`close`](Self::close).
    pub fn is_writable(&self) -> bool {
        let shared = &self.shared;
        shared.writable.load(Ordering::SeqCst) && !shared.progress.stalled(shared.stall_bound)
    }

    /// Flushes and fsyncs everything accepted so far, then stops the writer. Idempotent:
    /// later calls wait for and return the same outcome. Appends after close fail.
    pub async fn close(&self) -> Result<(), AuditError> {
        let outcome = match &self.shared.mode {
            Mode::Threaded { tx, done } => {
                let sender = lock_unpoisoned(tx).take();
                // The writer drains the channel and finishes once every sender is gone.
                drop(sender);
                let mut done = done.clone();
                let outcome = done
                    .wait_for(Option::is_some)
                    .await
                    .map_err(|_| AuditError::WriterGone)?;
                outcome.clone()
            }
            Mode::Inline(state) => {
                let mut state = lock_unpoisoned(state);
                state.flush();
                if let Some(mut writer) = state.writer.take() {
                    let finished = writer.finish();
                    writer.writable.store(false, Ordering::SeqCst);
                    state.outcome = Some(finished);
                }
                state.outcome.clone()
            }
        };
        match outcome {
            Some(Ok(())) => Ok(()),
            Some(Err(source)) => Err(AuditError::CloseFailed {
                path: self.shared.path.to_path_buf(),
                source,
            }),
            None => Err(AuditError::WriterGone),
        }
    }
}

/// The text of `ts`, from `cache` when `ts` is the millisecond it holds (under load most
/// records share their millisecond with the one before), else made and cached.
fn cached_ts_text(cache: &mut Option<(OffsetDateTime, TsText)>, ts: OffsetDateTime) -> &TsText {
    if cache.as_ref().is_some_and(|(cached, _)| *cached != ts) {
        *cache = None;
    }
    &cache.get_or_insert_with(|| (ts, record::format_ts(ts))).1
}

/// The inline mode's background thread: once per [`PROBE_INTERVAL`], fsyncs the files
/// rotated since (outside the state's lock, so appends go on meanwhile) and runs the
/// periodic [`Writer::check`]. Ends with the log.
fn probe_while_open(
    state: &std::sync::Weak<Mutex<InlineState>>,
    unsynced: &Unsynced,
    path: &AuditPath,
) {
    loop {
        std::thread::sleep(PROBE_INTERVAL);
        // Failures are logged here and reported by close.
        let _ = unsynced.sync_all(path);
        let Some(state) = state.upgrade() else {
            return;
        };
        let mut state = lock_unpoisoned(&state);
        let Some(writer) = state.writer.as_mut() else {
            return;
        };
        writer.check();
    }
}

/// How long opening waits for another holder of the lock to let go (a gateway in this
/// process shutting down, or one on this host finishing its drain) before giving up.
const LOCK_WAIT: Duration = Duration::from_secs(2);

/// Takes an exclusive lock on `.<file name>.lock` beside the log (`flock`, so it goes with
/// the process, however it ends). Two gateways appending to one log would fork its chain,
/// and one's undo of a failed write would cut the other's acknowledged records. The lock
/// is a file of its own because the log itself is renamed by rotation; its name starts
/// with a dot so `audit verify DIR` skips it.
fn lock_exclusively(path: &AuditPath) -> Result<File, AuditError> {
    let lock_path = path.lock_file();
    let io_err = |op, source| AuditError::Io {
        op,
        path: lock_path.clone(),
        source,
    };
    let mut opts = std::fs::OpenOptions::new();
    opts.create(true).truncate(false).write(true).mode(0o600);
    let file =
        segment::open_regular(&opts, &lock_path).map_err(|e| io_err("open the lock file", e))?;
    enforce_owner_only(&file, &lock_path)
        .map_err(|e| io_err("set mode 0600 on the lock file", e))?;
    let give_up = std::time::Instant::now() + LOCK_WAIT;
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(file),
            Err(std::fs::TryLockError::WouldBlock) if std::time::Instant::now() < give_up => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(AuditError::InUse {
                    path: path.to_path_buf(),
                    lock: lock_path,
                })
            }
            Err(std::fs::TryLockError::Error(source)) => return Err(io_err("lock", source)),
        }
    }
}

/// The directory that must already hold the audit file (it is not created).
fn existing_dir(path: &AuditPath) -> Result<&Path, AuditError> {
    let dir = path.dir();
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => Ok(dir),
        Ok(_) => Err(AuditError::NotADirectory {
            dir: dir.to_path_buf(),
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(AuditError::MissingDirectory {
            dir: dir.to_path_buf(),
        }),
        Err(source) => Err(AuditError::Io {
            op: "inspect",
            path: dir.to_path_buf(),
            source,
        }),
    }
}

/// Used by `check-config`: verifies that the directory of `path` exists and takes data
/// (writes 4 KiB to a temporary file in it, fsyncs and removes it: creating an empty file
/// needs no data block, so only a write notices a full disk), and that an existing audit
/// file can be opened for appending. Writes nothing to the audit file itself.
pub fn check_writable(path: &AuditPath) -> Result<(), AuditError> {
    let dir = existing_dir(path)?;
    let probe = dir.join(format!(
        ".mpc-gateway-audit-check.{}.{}",
        std::process::id(),
        OffsetDateTime::now_utc().unix_timestamp_nanos()
    ));
    let io_err = |op, p: &Path| {
        let p = p.to_path_buf();
        move |source| AuditError::Io {
            op,
            path: p,
            source,
        }
    };
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&probe)
        .map_err(io_err("create a file in", dir))?;
    let wrote =
        io::Write::write_all(&mut file, &[b' '; PROBE_BYTES]).and_then(|()| file.sync_all());
    drop(file);
    // Removed whether or not the write succeeded: a full disk must not keep it.
    let removed = std::fs::remove_file(&probe);
    wrote.map_err(io_err(
        "write 4 KiB (a test write, removed again) to a file in",
        dir,
    ))?;
    removed.map_err(io_err("remove", &probe))?;
    // `serve` opens both with `open_regular` (writing): a link, FIFO or directory at
    // either name is refused here as it would be there.
    let mut for_writing = std::fs::OpenOptions::new();
    for_writing.write(true);
    for (file, op) in [
        (path.as_path(), "open for appending"),
        (path.lock_file().as_path(), "open the lock file"),
    ] {
        if std::fs::symlink_metadata(file).is_ok() {
            segment::open_regular(&for_writing, file).map_err(io_err(op, file))?;
        }
    }
    Ok(())
}

/// The file, the chain's head and the batch buffer: owned by the writer thread (`fsync:
/// always`) or by the inline state's mutex (`fsync: never`).
struct Writer {
    path: AuditPath,
    fsync: Fsync,
    rotate_bytes: u64,
    hasher: ChainHasher,
    opener: Box<dyn Opener>,
    /// `None` after a rotation whose new file could not be created yet.
    file: Option<Box<dyn LiveFile>>,
    /// The live file the writer last wrote to, which it may reopen with records in it
    /// (after a failed undo); `None` once it stopped using it (rotated, moved away or
    /// removed), when only a new or empty file at the path is taken.
    live_id: Option<FileId>,
    /// Length of the live file as far as committed records go.
    len: u64,
    /// A failed batch that could not be cut off yet: cut to this length before writing.
    undo_to: Option<u64>,
    next_seq: u64,
    prev: HexDigest,
    /// Never goes backwards, so `ts` is monotonic with `seq` even if the clock steps back.
    last_ts: OffsetDateTime,
    writable: Arc<AtomicBool>,
    /// When the batch in progress started (see `stall`).
    progress: Arc<Progress>,
    /// The batch being written.
    buf: Vec<u8>,
    /// The last formatted `ts`.
    ts_cache: Option<(OffsetDateTime, TsText)>,
    /// Held until the log is closed: see [`lock_exclusively`].
    lock: Option<File>,
    /// A file was created whose directory entry is not yet known to be on disk.
    dir_needs_sync: bool,
    /// Files this writer no longer writes to whose records no fsync covers yet.
    unsynced: Arc<Unsynced>,
    /// Identifies the key of [`hasher`](Self::hasher) in the saved head (see `saved_head`).
    key_id: String,
    /// The saved head is marked as followed by records (or there is none): see
    /// `SavedHead::records_may_follow`. Cleared by each save of the head.
    head_marked_followed: bool,
    /// Counts failed rotations, for the metrics.
    rotation_failures: RotationFailures,
    /// A failing rotation is retried after every write: its error is logged once per
    /// [`ROTATION_FAILURE_LOG_INTERVAL`], with the number of failures not logged.
    rotation_failure_log: CountingThrottle,
    /// Failed writes are logged once per [`WRITE_FAILURE_LOG_INTERVAL`], with the number
    /// not logged.
    write_failure_log: CountingThrottle,
}

/// How many rotations of a log failed since it was opened: a cheap handle, shared by
/// the writer (which counts) and whoever reports the count.
#[derive(Debug, Clone, Default)]
pub struct RotationFailures(Arc<std::sync::atomic::AtomicU64>);

impl RotationFailures {
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }

    fn add_one(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

/// With `fsync: never`, the handles of files the writer stopped writing to (rotated
/// away) while their records were not yet fsynced. They are fsynced in the background
/// (the inline mode's probe thread) and at the latest on close, never on the request path.
#[derive(Default)]
struct Unsynced {
    /// Handed over by rotations. Locked only to push or take, never across an fsync, so
    /// a rotation on the request path never waits for the disk.
    queue: Mutex<Vec<Box<dyn LiveFile>>>,
    /// Held across the fsyncs, so that close waits for a background fsync in flight
    /// instead of reporting the log fsynced before it is. Holds the first failure, which
    /// close reports: a failed fsync cannot be trusted to succeed when retried.
    syncing: Mutex<Option<Arc<io::Error>>>,
}

impl Unsynced {
    fn push(&self, file: Box<dyn LiveFile>) {
        lock_unpoisoned(&self.queue).push(file);
    }

    /// fsyncs (and lets go of) every file handed over so far. Err with the first failure
    /// of this or any earlier call.
    fn sync_all(&self, path: &AuditPath) -> Result<(), Arc<io::Error>> {
        let mut failure = lock_unpoisoned(&self.syncing);
        let files = std::mem::take(&mut *lock_unpoisoned(&self.queue));
        for mut file in files {
            if let Err(e) = file.sync() {
                tracing::error!(path = %path.display(), error = %e, "cannot fsync a rotated audit file; its last records may not survive a power loss");
                failure.get_or_insert(Arc::new(e));
            }
        }
        failure.clone().map_or(Ok(()), Err)
    }
}

/// What [`Writer::commit`] did with a batch.
struct Committed {
    /// Each record's seq, or why it was not written: exactly one per record, in order
    /// (the inline mode's tickets are positions).
    outcomes: Vec<Result<u64, AuditError>>,
    /// The batch reached the file: time to check whether the file is due to rotate.
    written: bool,
}

/// The encoded batch: per request, its seq or why it could not be encoded.
struct Encoded {
    outcomes: Vec<Result<u64, AuditError>>,
    next_seq: u64,
    prev: HexDigest,
    last_ts: OffsetDateTime,
}

impl Writer {
    fn run(mut self, queue: &Queue, done: watch::Sender<Outcome>) {
        let mut events = Vec::with_capacity(MAX_BATCH);
        let mut acks = Vec::with_capacity(MAX_BATCH);
        let mut checked = Instant::now();
        let path = self.path.clone();
        while self.next_batch(queue, &mut events, &mut acks, &mut checked) {
            // Reachable by the watchdog while the batch is written.
            queue.hand_over(&mut acks);
            self.commit_and_rotate(&events, |outcomes| {
                queue.take_back(&mut acks);
                stall::acknowledge(&mut acks, outcomes, &path);
            });
            events.clear();
            // Under a steady load the wait for a request never times out.
            if checked.elapsed() >= PROBE_INTERVAL {
                self.check();
                checked = Instant::now();
            }
        }
        let outcome = self.finish();
        self.writable.store(false, Ordering::SeqCst);
        done.send_replace(Some(outcome));
    }

    /// Collects the next batch into `events` and `acks`: first the records the watchdog
    /// answered while the last batch was stuck (queued before the rest), then what the
    /// channel holds. Blocks while there is nothing, waking up to [`check`](Self::check)
    /// once per [`PROBE_INTERVAL`] since `checked`. False once every sender is gone and
    /// nothing is left.
    fn next_batch(
        &mut self,
        queue: &Queue,
        events: &mut Vec<AuditEvent>,
        acks: &mut Vec<stall::Pending>,
        checked: &mut Instant,
    ) -> bool {
        loop {
            let rx = queue.lock_rx();
            queue.take_answered(events, acks);
            if events.is_empty() {
                match rx.recv_timeout(PROBE_INTERVAL.saturating_sub(checked.elapsed())) {
                    Ok(Request { event, ack }) => {
                        // The first record woke this thread, usually in the middle of a
                        // turn of the runtime that is about to send more; step aside once
                        // so that they join this batch instead of waiting for the fsync
                        // after it.
                        std::thread::yield_now();
                        events.push(event);
                        acks.push(Some(ack));
                    }
                    Err(RecvTimeoutError::Timeout) => {
                        // Not holding the queue: the check does I/O, which may get stuck.
                        drop(rx);
                        self.check();
                        *checked = Instant::now();
                        continue;
                    }
                    Err(RecvTimeoutError::Disconnected) => return false,
                }
            }
            let room = MAX_BATCH.saturating_sub(events.len());
            for Request { event, ack } in rx.try_iter().take(room) {
                events.push(event);
                acks.push(Some(ack));
            }
            return true;
        }
    }

    /// Writes a batch, hands its outcomes to `deliver` and then, if it was written,
    /// rotates when due (a rotation then delays only the next batch), all timed by
    /// `progress` so that a stuck disk shows.
    fn commit_and_rotate(
        &mut self,
        batch: &[AuditEvent],
        deliver: impl FnOnce(Vec<Result<u64, AuditError>>),
    ) {
        self.progress.start();
        let committed = self.commit(batch);
        deliver(committed.outcomes);
        if committed.written {
            self.maybe_rotate();
        }
        self.progress.end();
    }

    /// The periodic check, once per [`PROBE_INTERVAL`]: follows a live file moved away
    /// and, while the log is not writable, probes whether the disk takes writes again.
    /// Timed like a batch: it writes and fsyncs too.
    fn check(&mut self) {
        self.progress.start();
        self.follow_path();
        if !self.writable.load(Ordering::SeqCst) {
            self.probe();
        }
        self.progress.end();
    }

    /// Writes one batch. Rotation is the caller's, once the outcomes are delivered and if
    /// the batch was written: [`Writer::maybe_rotate`].
    fn commit(&mut self, batch: &[AuditEvent]) -> Committed {
        let encoded = self.encode(batch);
        let result = if self.buf.is_empty() {
            Ok(())
        } else {
            self.write_batch()
        };
        match result {
            Ok(()) => {
                self.next_seq = encoded.next_seq;
                self.prev = encoded.prev;
                self.last_ts = encoded.last_ts;
                self.set_writable(true);
                Committed {
                    outcomes: encoded.outcomes,
                    written: true,
                }
            }
            Err(e) => {
                if let Some(suppressed) = self.write_failure_log.ready() {
                    tracing::error!(path = %self.path.display(), error = %e, records = batch.len(), suppressed, "audit write failed; records rejected (logged at most once per 10 s; `suppressed` failed writes since the last such line were not logged)");
                }
                self.set_writable(false);
                let e = Arc::new(e);
                Committed {
                    outcomes: batch
                        .iter()
                        .map(|_| {
                            Err(AuditError::WriteFailed {
                                path: self.path.to_path_buf(),
                                source: Arc::clone(&e),
                            })
                        })
                        .collect(),
                    written: false,
                }
            }
        }
    }

    /// Serializes the batch into `self.buf`, chaining from the committed state without
    /// changing it (a failed write must not advance `seq` or `prev`).
    fn encode(&mut self, batch: &[AuditEvent]) -> Encoded {
        self.buf.clear();
        let mut seq = self.next_seq;
        let mut prev = self.prev;
        let mut last_ts = self.last_ts;
        let mut outcomes = Vec::with_capacity(batch.len());
        // One clock read per batch: its records are written together.
        let now = record::now_ms();
        for event in batch {
            // No record may take a seq that nothing could follow (a recovered log near
            // u64::MAX): refuse it instead of overflowing.
            let Some(next_seq) = seq.checked_add(1) else {
                outcomes.push(Err(AuditError::Encode {
                    detail: "seq is exhausted; start a new audit log".into(),
                }));
                continue;
            };
            let ts = now.max(last_ts);
            let ts_text = cached_ts_text(&mut self.ts_cache, ts);
            let body_start = self.buf.len();
            let body = Body::new(seq, ts_text, &prev, event);
            match body.write_json(&mut self.buf) {
                Ok(()) => {
                    let hash = self.hasher.digest(&self.buf[body_start..]);
                    chain::seal_in_place(&mut self.buf, body_start, hash.as_bytes());
                    outcomes.push(Ok(seq));
                    seq = next_seq;
                    prev = hash;
                    last_ts = ts;
                }
                Err(e) => {
                    // Nothing of a record that could not be encoded is written.
                    self.buf.truncate(body_start);
                    outcomes.push(Err(AuditError::Encode {
                        detail: e.to_string(),
                    }));
                }
            }
        }
        Encoded {
            outcomes,
            next_seq: seq,
            prev,
            last_ts,
        }
    }

    /// One write (and one fsync with `Fsync::Always`) of `self.buf`; on failure the file
    /// is cut back so that no partial line remains.
    fn write_batch(&mut self) -> io::Result<()> {
        self.ensure_open()?;
        if !self.head_marked_followed {
            self.mark_head_followed();
        }
        let start = self.len;
        let always = self.fsync == Fsync::Always;
        let Some(file) = self.file.as_mut() else {
            return Err(io::Error::other("live file is not open"));
        };
        // The `fstat` after the write: a file removed under the writer takes writes
        // that nobody can ever read, and they must not be acknowledged.
        let written = file
            .append(&self.buf)
            .and_then(|()| if always { file.sync() } else { Ok(()) })
            .and_then(|()| file.metadata());
        match written {
            Ok(meta) if meta.nlink() > 0 => {
                self.len += self.buf.len() as u64;
                Ok(())
            }
            Ok(_) => {
                tracing::error!(path = %self.path.display(), "the audit log's live file was removed under the writer; the records of this write are rejected, and the chain continues in a new file at audit.path");
                // Nothing to undo in a file without a name, nor to fsync.
                self.file = None;
                self.leave_live_file();
                Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    "the live file was removed while it was written to",
                ))
            }
            Err(e) => {
                self.undo(start);
                Err(e)
            }
        }
    }

    /// Cuts the live file back to `len`; if even that fails, remembers to do it before
    /// the next write so that no record ever follows a partial line.
    fn undo(&mut self, len: u64) {
        let Some(file) = self.file.as_mut() else {
            return;
        };
        match file.truncate(len) {
            Ok(()) => {
                let _ = file.sync(); // best effort: the disk is already failing
                self.undo_to = None;
            }
            Err(e) => {
                tracing::error!(path = %self.path.display(), error = %e, "cannot cut a failed audit write back; will retry before the next write");
                self.undo_to = Some(len);
                self.file = None; // reopen: the handle may be what is broken
            }
        }
    }

    /// Opens the live file when it is not open, finishing a pending undo first, and
    /// fsyncs the directory when the file had to be created. Only the writer's own file
    /// or a new or empty one is taken: a non-empty file someone else put at the path is
    /// not the chain's to continue (appending to it would break the chain, or their
    /// file), so it is refused until the path is free again.
    fn ensure_open(&mut self) -> io::Result<()> {
        if self.file.is_none() {
            let opened = self.opener.open(self.path.as_path())?;
            self.dir_needs_sync |= opened.created;
            let id = FileId::of(&opened.file.metadata()?);
            if self.live_id != Some(id) {
                if opened.len > 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::AlreadyExists,
                        "audit.path names a file with content that this writer did not write (its own file was moved away); move that file aside and the log continues in a new one",
                    ));
                }
                // A new file: a failed batch left nothing in it to cut.
                self.undo_to = None;
                self.live_id = Some(id);
            }
            self.file = Some(opened.file);
            self.len = opened.len;
        }
        // Until it succeeds: a failed directory fsync must not be forgotten because the
        // next attempt finds the file already created.
        if self.dir_needs_sync {
            self.opener.sync_dir(self.path.dir())?;
            self.dir_needs_sync = false;
        }
        if let (Some(len), Some(file)) = (self.undo_to, self.file.as_mut()) {
            file.truncate(len)?;
            file.sync()?;
            self.len = len;
            self.undo_to = None;
        }
        Ok(())
    }

    /// Checks whether the disk takes writes again (see [`test_write`](Self::test_write)).
    fn probe(&mut self) {
        match self.test_write() {
            Ok(()) => self.set_writable(true),
            Err(e) => {
                tracing::debug!(path = %self.path.display(), error = %e, "audit log still not writable");
            }
        }
    }

    /// The same test once at open, so that readiness tells from the start whether records
    /// can be written (a full disk), not only after a request was refused. A failure is
    /// not fatal: the log starts not writable and the periodic probe finds out when the
    /// disk takes writes again.
    fn probe_at_start(&mut self) {
        if let Err(e) = self.test_write() {
            tracing::error!(path = %self.path.display(), error = %e, "the audit log cannot be written (a test write failed); requests are refused with 503 and /readyz reports not ready until it can");
            self.set_writable(false);
        }
    }

    /// Appends 4 KiB of spaces to the live file, fsyncs and cuts them off again. Never
    /// leaves bytes behind (a crash in between leaves blanks after the last newline,
    /// which start-up recognizes and cuts).
    fn test_write(&mut self) -> io::Result<()> {
        self.ensure_open()?;
        let start = self.len;
        let Some(file) = self.file.as_mut() else {
            return Err(io::Error::other("live file is not open"));
        };
        let wrote = file.append(&[b' '; PROBE_BYTES]).and_then(|()| file.sync());
        // Cut unconditionally: a failed append may still have left some bytes.
        let cut = file.truncate(start).and_then(|()| file.sync());
        if cut.is_err() {
            self.undo_to = Some(start);
            self.file = None;
        }
        wrote.and(cut)
    }

    fn set_writable(&self, ok: bool) {
        let was = self.writable.swap(ok, Ordering::SeqCst);
        if ok && !was {
            tracing::info!(path = %self.path.display(), "audit log is writable again");
        }
    }

    /// Whether `audit.path` still names the live file; if the file was moved away or
    /// removed (and no write noticed it yet), stops writing to it and starts a new live
    /// file at the path, which continues the chain as after a rotation. Records already
    /// acknowledged stay where the file went. Returns whether it had gone.
    fn follow_path(&mut self) -> bool {
        let Some(ours) = self.live_id.filter(|_| self.file.is_some()) else {
            return false;
        };
        let at_path = match std::fs::metadata(&self.path) {
            Ok(meta) => Some(FileId::of(&meta)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => {
                tracing::debug!(path = %self.path.display(), error = %e, "cannot check that audit.path still names the live file");
                return false;
            }
        };
        if at_path == Some(ours) {
            return false;
        }
        tracing::error!(path = %self.path.display(), path_names_a_file = at_path.is_some(), "the audit log's live file was moved away or removed; the records written to it stay where it went, and the chain continues in a new file at audit.path");
        self.retire_file();
        self.leave_live_file();
        // Now, not at the next write: readiness then tells whether records can be written.
        if let Err(e) = self.ensure_open() {
            tracing::error!(path = %self.path.display(), error = %e, "cannot start a new audit file; not writable until it can");
            self.set_writable(false);
        }
        true
    }

    /// The live file is gone from `audit.path` (its handle already let go of): the next
    /// records start a new file there, and the chain head is saved, as at a rotation, so
    /// that a restart before they are written continues from the last record, which is
    /// no longer at the path.
    fn leave_live_file(&mut self) {
        self.live_id = None;
        self.len = 0;
        self.undo_to = None;
        if let Some(last_seq) = self.next_seq.checked_sub(1).filter(|&seq| seq > 0) {
            if let Err(e) = self.save_head(last_seq) {
                tracing::error!(path = %self.path.display(), error = %e, "a restart before the next record would not continue the chain from the last one");
            }
        }
    }

    /// Rotates once the live file reached `rotate_bytes`. A failed rotation is logged and
    /// retried after the next write; the records already written are safe either way.
    fn maybe_rotate(&mut self) {
        if self.len < self.rotate_bytes {
            return;
        }
        if let Err(e) = self.rotate() {
            self.rotation_failures.add_one();
            // Retried after every write: one line per interval, not one per request.
            if let Some(suppressed) = self.rotation_failure_log.ready() {
                tracing::error!(path = %self.path.display(), error = %e, suppressed, "audit log rotation failed; will retry after the next write (logged at most once per 10 s; `suppressed` failures since the last such line were not logged)");
            }
            // Renamed, but the new file could not be created: nothing can be written
            // until it is, so readiness says so now rather than at the next request's
            // 503. The probe (or the next write) creates it and restores writability.
            if self.file.is_none() {
                self.set_writable(false);
            }
        }
    }

    fn rotate(&mut self) -> io::Result<()> {
        // Never rename a file that is not the writer's: a live file moved away already
        // left the path to a new one (or to someone else's file). Only a swap within
        // the one syscall between this check and the rename goes unseen.
        if self.follow_path() {
            return Ok(());
        }
        let last_seq = self.next_seq.saturating_sub(1);
        let target = self.path.rotated(last_seq);
        if target.exists() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} already exists", target.display()),
            ));
        }
        // With `fsync: always` every record is already synced and this is cheap; with
        // `never` the caller chose not to wait for the disk, and syncing a 100 MiB file
        // here would stall every request behind the rotation: it is fsynced later
        // (`retire_file`).
        if self.fsync == Fsync::Always {
            if let Some(file) = self.file.as_mut() {
                file.sync()?;
            }
        }
        // Before the rename: once the records have left the live file they may be shipped
        // off the host, and then only the saved head continues the chain at the next
        // start. If it cannot be saved, the file is not rotated (retried after the next
        // write). Synced as the records are (see `Durability`).
        self.save_head(last_seq)?;
        std::fs::rename(&self.path, &target)?;
        // From here on the records are in `target`; the next ones go to a fresh file.
        self.retire_file();
        self.len = 0;
        self.undo_to = None;
        if self.fsync == Fsync::Always {
            segment::sync_dir(self.path.dir())?;
        }
        tracing::info!(path = %self.path.display(), rotated_to = %target.display(), last_seq, "audit log rotated");
        self.ensure_open()
    }

    /// Stops writing through the live file's handle. With `fsync: never` its records may
    /// not be on disk yet, so it goes to be fsynced off the request path ([`Unsynced`]).
    fn retire_file(&mut self) {
        if let Some(file) = self.file.take() {
            if self.fsync == Fsync::Never {
                self.unsynced.push(file);
            }
        }
    }

    /// Before the first write after the head was saved: from now on records the head
    /// does not know of may exist, and a restart that finds neither them nor a newer head
    /// must not continue from it. Once per start and per rotation, synced as the records
    /// are. Best effort: a head that cannot be marked leaves today's continuation.
    fn mark_head_followed(&mut self) {
        self.head_marked_followed = true;
        if let Err(e) = saved_head::mark_records_may_follow(&self.path, self.head_durability()) {
            tracing::warn!(path = %self.path.saved_head().display(), error = %e, "cannot mark the saved audit chain head as followed by records");
        }
    }

    fn head_durability(&self) -> Durability {
        match self.fsync {
            Fsync::Always => Durability::Synced,
            Fsync::Never => Durability::Written,
        }
    }

    /// Saves the chain head, record `last_seq`, beside the log (see `saved_head`), synced
    /// as the records are.
    fn save_head(&mut self, last_seq: u64) -> io::Result<()> {
        self.save_head_as(last_seq, self.head_durability())
    }

    fn save_head_as(&mut self, last_seq: u64, durability: Durability) -> io::Result<()> {
        let head = SavedHead {
            seq: last_seq,
            ts: record::format_ts(self.last_ts).as_str().to_owned(),
            hash: self.prev.as_str().to_owned(),
            key_id: Some(self.key_id.clone()),
            records_may_follow: false,
        };
        self.head_marked_followed = false;
        saved_head::save(&self.path, &head, durability).map_err(|e| {
            let path = self.path.saved_head();
            io::Error::new(
                e.kind(),
                format!("cannot save the chain head to {}: {e}", path.display()),
            )
        })
    }

    /// The final flush on close: fsync the files rotated and not yet fsynced, the live
    /// file and their directory; then save the chain head.
    fn finish(&mut self) -> Result<(), Arc<io::Error>> {
        let rotated = self.unsynced.sync_all(&self.path);
        let synced = match self.file.as_mut() {
            Some(file) => file.sync(),
            None => Ok(()),
        };
        let finished = synced
            .and_then(|()| segment::sync_dir(self.path.dir()))
            .map_err(Arc::new)
            .and(rotated);
        self.save_head_at_shutdown();
        // Closed: another gateway may take the log over.
        self.lock = None;
        finished
    }

    /// Saves the head once more, synced: operators archive every file while the gateway
    /// is stopped (`mv audit.jsonl* elsewhere/`), and a head from the last rotation would
    /// then continue the chain at a seq the archive already holds. Not a failure of the
    /// close: every record is on disk, and a restart with the files in place needs no head.
    fn save_head_at_shutdown(&mut self) {
        let Some(last_seq) = self.next_seq.checked_sub(1).filter(|&seq| seq > 0) else {
            return;
        };
        if let Err(e) = self.save_head_as(last_seq, Durability::Synced) {
            tracing::error!(path = %self.path.display(), error = %e, "cannot save the audit chain head at shutdown; if every audit file is moved away before the next start, the chain continues from an older head");
        }
    }
}

mod stall;
#[cfg(test)]
mod tests;
