//! The data listener's drain: on shutdown every connection is told to finish what it
//! serves (hyper's graceful shutdown), the drain waits until every connection and every
//! detached HTTP/2 request is gone, and once `shutdown_grace` has run out, whatever is
//! still open is closed at its next turn. A connection can also be told to finish by
//! itself, before any drain ([`Superseded`]: a TLS connection whose client CAs a reload
//! replaced).
//!
//! In place of hyper-util's `GracefulShutdown` plus a `watch` per connection: a `watch`
//! receiver waiting for a change takes the channel's shared lock each time it is polled,
//! and every wake-up of a connection polled two of them, several times per request
//! (about 1.5% of the gateway's CPU per request). Here a connection looks at the drain
//! only after the drain woke it.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use futures_util::task::AtomicWaker;
use hyper_util::server::graceful::GracefulConnection;
use pin_project_lite::pin_project;
use tokio::sync::watch;

/// How far the drain has gone; it only moves forward.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Phase {
    Serving,
    /// Connections finish the requests they have and take no more.
    Finishing,
    /// The grace ran out: connections still open are closed.
    Closing,
}

/// One per listener. Dropping it closes what is still open, as [`Drain::close`] does.
pub(crate) struct Drain {
    phase: watch::Sender<Phase>,
}

/// Held by each connection and each detached HTTP/2 request: the drain waits until
/// every watcher is dropped.
#[derive(Clone)]
pub(crate) struct Watcher {
    phase: watch::Receiver<Phase>,
}

impl Drain {
    pub(crate) fn new() -> Drain {
        Drain {
            phase: watch::Sender::new(Phase::Serving),
        }
    }

    pub(crate) fn watcher(&self) -> Watcher {
        Watcher {
            phase: self.phase.subscribe(),
        }
    }

    /// Tells every connection to finish, then waits until every watcher is gone.
    pub(crate) async fn finish(&self) {
        self.advance(Phase::Finishing);
        self.phase.closed().await;
    }

    /// Closes every connection still open, at its next turn.
    pub(crate) fn close(&self) {
        self.advance(Phase::Closing);
    }

    fn advance(&self, to: Phase) {
        self.phase.send_if_modified(|phase| {
            let forward = *phase < to;
            if forward {
                *phase = to;
            }
            forward
        });
    }
}

impl Watcher {
    /// `connection`, shut down gracefully once the drain starts, or once `superseded`
    /// completes if there is one; the drain waits for it to end.
    pub(crate) fn graceful<C: GracefulConnection>(
        self,
        connection: C,
        superseded: Option<Superseded>,
    ) -> Graceful<C> {
        let finishing = self.phase_reached(Phase::Finishing);
        let finishing = match superseded {
            None => Signal::new(finishing),
            Some(superseded) => Signal::new(async move {
                tokio::select! {
                    () = finishing => {}
                    () = superseded => {}
                }
            }),
        };
        Graceful {
            finishing: Some(finishing),
            connection,
            _drain_waits: self,
        }
    }

    /// Runs `task` until it ends or the drain closes what is still open, whichever is
    /// first. `true` when the task ended by itself.
    pub(crate) async fn until_closed(&self, task: impl Future<Output = ()>) -> bool {
        let closing = Signal::new(self.phase_reached(Phase::Closing));
        tokio::select! {
            biased;
            () = task => true,
            () = closing => false,
        }
    }

    fn phase_reached(&self, phase: Phase) -> impl Future<Output = ()> + Send + 'static {
        let mut seen = self.phase.clone();
        async move {
            // A drain dropped without a word counts as reached: nothing is left to wait
            // for the connection.
            let _ = seen.wait_for(|current| *current >= phase).await;
        }
    }
}

/// Completes when a connection should finish what it serves and close although the
/// drain has not started (its client CAs were replaced).
pub(crate) type Superseded = Pin<Box<dyn Future<Output = ()> + Send>>;

pin_project! {
    /// A connection that starts its graceful shutdown when the drain starts, or when it
    /// is superseded.
    pub(crate) struct Graceful<C> {
        #[pin]
        connection: C,
        finishing: Option<Signal>,
        _drain_waits: Watcher,
    }
}

impl<C: GracefulConnection> Future for Graceful<C> {
    type Output = C::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        if let Some(finishing) = this.finishing.as_mut() {
            if Pin::new(finishing).poll(cx).is_ready() {
                *this.finishing = None;
                this.connection.as_mut().graceful_shutdown();
            }
        }
        this.connection.poll(cx)
    }
}

/// Waits for a future that rarely completes, in a task that is woken often for other
/// reasons: the future is polled only after it woke the task, so the other wake-ups
/// cost an atomic swap, not a poll of the future.
struct Signal {
    reached: Pin<Box<dyn Future<Output = ()> + Send>>,
    woken: Arc<Woken>,
}

/// The waker [`Signal`] gives its future: notes the wake-up, then wakes the task.
struct Woken {
    since_last_look: AtomicBool,
    task: AtomicWaker,
}

impl Wake for Woken {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.since_last_look.store(true, Ordering::Release);
        self.task.wake();
    }
}

impl Signal {
    fn new(reached: impl Future<Output = ()> + Send + 'static) -> Signal {
        Signal {
            reached: Box::pin(reached),
            // The future has never been polled: look at it the first time.
            woken: Arc::new(Woken {
                since_last_look: AtomicBool::new(true),
                task: AtomicWaker::new(),
            }),
        }
    }
}

impl Future for Signal {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        // Registered before looking at the flag: a wake-up between the two is not lost.
        self.woken.task.register(cx.waker());
        if !self.woken.since_last_look.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        let waker = Waker::from(Arc::clone(&self.woken));
        self.reached.as_mut().poll(&mut Context::from_waker(&waker))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;

    use bytes::Bytes;
    use http_body_util::Empty;
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    /// Counts its polls; ready once `open` is set, and keeps the latest waker so the test
    /// can wake it.
    struct Gate {
        polls: Arc<AtomicUsize>,
        open: Arc<AtomicBool>,
        waker: Arc<std::sync::Mutex<Option<Waker>>>,
    }

    impl Future for Gate {
        type Output = ();
        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            self.polls.fetch_add(1, Ordering::SeqCst);
            if self.open.load(Ordering::SeqCst) {
                return Poll::Ready(());
            }
            *self.waker.lock().expect("lock") = Some(cx.waker().clone());
            Poll::Pending
        }
    }

    #[test]
    fn a_signal_polls_its_future_only_after_the_future_woke_it() {
        let polls = Arc::new(AtomicUsize::new(0));
        let open = Arc::new(AtomicBool::new(false));
        let waker = Arc::new(std::sync::Mutex::new(None::<Waker>));
        let gate = Gate {
            polls: Arc::clone(&polls),
            open: Arc::clone(&open),
            waker: Arc::clone(&waker),
        };
        let mut signal = Signal::new(gate);
        let mut cx = Context::from_waker(Waker::noop());
        for _ in 0..5 {
            assert!(Pin::new(&mut signal).poll(&mut cx).is_pending());
        }
        assert_eq!(polls.load(Ordering::SeqCst), 1, "only the first poll looks");
        // Woken without being ready: looked at once more.
        let stored = waker.lock().expect("lock").take().expect("waker kept");
        stored.wake_by_ref();
        assert!(Pin::new(&mut signal).poll(&mut cx).is_pending());
        assert!(Pin::new(&mut signal).poll(&mut cx).is_pending());
        assert_eq!(polls.load(Ordering::SeqCst), 2);
        open.store(true, Ordering::SeqCst);
        stored.wake();
        assert!(Pin::new(&mut signal).poll(&mut cx).is_ready());
        assert_eq!(polls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn finish_waits_for_every_watcher_and_close_cuts_what_is_left() {
        let drain = Drain::new();
        let watcher = drain.watcher();
        let detached = drain.watcher();
        let (ended_tx, ended_rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            let ended_by_itself = watcher.until_closed(std::future::pending()).await;
            let _ = ended_tx.send(ended_by_itself);
        });
        let finished = drain.finish();
        tokio::pin!(finished);
        // Finishing does not cut a task.
        let waited = tokio::time::timeout(Duration::from_millis(50), &mut finished).await;
        assert!(waited.is_err(), "two watchers are alive");
        drain.close();
        assert_eq!(ended_rx.await.ok(), Some(false), "closed, not ended");
        task.await.expect("task");
        let waited = tokio::time::timeout(Duration::from_millis(50), &mut finished).await;
        assert!(waited.is_err(), "the detached watcher is alive");
        drop(detached);
        tokio::time::timeout(Duration::from_secs(5), finished)
            .await
            .expect("every watcher gone");
    }

    #[tokio::test]
    async fn a_task_that_ends_by_itself_is_not_cut() {
        let drain = Drain::new();
        assert!(drain.watcher().until_closed(async {}).await);
        drop(drain);
        // A drain dropped without a word closes what is left.
        let orphan = Drain::new().watcher();
        assert!(!orphan.until_closed(std::future::pending()).await);
    }

    #[tokio::test]
    async fn the_drain_shuts_a_connection_down_gracefully_after_its_request() {
        let drain = Drain::new();
        let (client, server) = tokio::io::duplex(4096);
        let connection = hyper::server::conn::http1::Builder::new().serve_connection(
            TokioIo::new(server),
            service_fn(|_request| async {
                Ok::<_, std::convert::Infallible>(http::Response::new(Empty::<Bytes>::new()))
            }),
        );
        let served = tokio::spawn(drain.watcher().graceful(connection, None));
        let (mut read, mut write) = tokio::io::split(client);
        write
            .write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .expect("write");
        let mut answer = vec![0u8; 1024];
        let n = read.read(&mut answer).await.expect("read");
        assert!(answer[..n].starts_with(b"HTTP/1.1 200"));
        // Kept alive until the drain starts; then the idle connection closes.
        assert!(!served.is_finished());
        tokio::time::timeout(Duration::from_secs(5), drain.finish())
            .await
            .expect("the connection let its watcher go");
        let result = served.await.expect("task");
        assert!(result.is_ok(), "{result:?}");
        assert_eq!(read.read(&mut answer).await.expect("eof"), 0);
    }
}
