//! Connection IO with an injectable reset: the connection's stream (plain TCP or TLS), and
//! the switch through which a fault drops a connection with an RST or closes it gracefully.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

pub(super) enum IoInner {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

/// What a fault asks of its connection: [`Fault::Reset`] drops it at once, without a
/// shutdown; [`Fault::GoAway`] closes it gracefully.
///
/// [`Fault::Reset`]: super::Fault::Reset
/// [`Fault::GoAway`]: super::Fault::GoAway
#[derive(Default)]
pub(super) struct ConnectionSwitch {
    set: AtomicBool,
    pub(super) fired: tokio::sync::Notify,
    pub(super) go_away: tokio::sync::Notify,
}

impl ConnectionSwitch {
    pub(super) fn go_away(&self) {
        self.go_away.notify_one();
    }

    pub(super) fn fire(&self) {
        self.set.store(true, Ordering::SeqCst);
        // `notify_one` keeps a permit, so the connection task cannot miss it.
        self.fired.notify_one();
    }

    fn is_set(&self) -> bool {
        self.set.load(Ordering::SeqCst)
    }
}

/// The connection's stream. Once `reset` is set (by [`Fault::Reset`]), shutdown is skipped
/// and the socket gets `SO_LINGER` 0 before it is closed, so the peer sees an RST.
///
/// [`Fault::Reset`]: super::Fault::Reset
pub(super) struct SimIo {
    pub(super) inner: IoInner,
    pub(super) reset: Arc<ConnectionSwitch>,
}

impl SimIo {
    fn tcp(&self) -> &TcpStream {
        match &self.inner {
            IoInner::Plain(tcp) => tcp,
            IoInner::Tls(tls) => tls.get_ref().0,
        }
    }
}

impl Drop for SimIo {
    fn drop(&mut self) {
        if self.reset.is_set() {
            let _ = self.tcp().set_zero_linger();
        }
    }
}

impl AsyncRead for SimIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match &mut self.get_mut().inner {
            IoInner::Plain(s) => Pin::new(s).poll_read(cx, buf),
            IoInner::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for SimIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().inner {
            IoInner::Plain(s) => Pin::new(s).poll_write(cx, buf),
            IoInner::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().inner {
            IoInner::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            IoInner::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.inner {
            IoInner::Plain(s) => s.is_write_vectored(),
            IoInner::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().inner {
            IoInner::Plain(s) => Pin::new(s).poll_flush(cx),
            IoInner::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.reset.is_set() {
            return Poll::Ready(Ok(()));
        }
        match &mut this.inner {
            IoInner::Plain(s) => Pin::new(s).poll_shutdown(cx),
            IoInner::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}
