//! Closing a data connection without making the client lose answers it has not read yet
//! (nginx's `lingering_close`).
//!
//! When hyper ends a connection (an HTTP/2 GOAWAY after a drain or a client-CA reload,
//! `Connection: close`, an idle or header timeout) it shuts down the write side and drops
//! the socket. If the client is still sending then (an HTTP/2 client's WINDOW_UPDATE,
//! SETTINGS acknowledgement or next request; an HTTP/1.1 client's pipelined bytes), that
//! data arrives at a closed socket and the kernel answers with a reset. The client's next
//! write fails, and clients such as curl then abandon the connection and every answer
//! still unread on it: the gateway did the work (and audited it), the caller saw a failure.
//!
//! So the socket is not dropped at once: [`Returned`] hands it back when hyper lets go of
//! it, and [`linger`] finishes the close, our side shut down and whatever the client still
//! sends read and discarded, until it closes too or [`LINGER`] has passed. A TLS session
//! is let go of first (hyper has sent its `close_notify`): the discarded bytes are read
//! from the TCP socket, so a lingering connection holds no TLS buffers.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::oneshot;

/// The longest a closed connection waits for the client to close its side.
pub(super) const LINGER: Duration = Duration::from_secs(2);

/// A connection's stream, handed back through [`Returned`] when dropped.
pub(super) struct HandBack<S> {
    stream: Option<S>,
    back: Option<oneshot::Sender<S>>,
}

/// Receives the stream once the connection has let go of it.
pub(super) type Returned<S> = oneshot::Receiver<S>;

impl<S> HandBack<S> {
    pub(super) fn new(stream: S) -> (HandBack<S>, Returned<S>) {
        let (back, returned) = oneshot::channel();
        let io = HandBack {
            stream: Some(stream),
            back: Some(back),
        };
        (io, returned)
    }
}

impl<S> Drop for HandBack<S> {
    fn drop(&mut self) {
        if let (Some(stream), Some(back)) = (self.stream.take(), self.back.take()) {
            // Nobody waiting (the connection task itself was dropped): the stream just closes.
            let _ = back.send(stream);
        }
    }
}

/// The stream, which is always there until the drop; an I/O error otherwise, never a panic.
fn gone() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "stream already handed back")
}

impl<S: AsyncRead + Unpin> AsyncRead for HandBack<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.stream.as_mut() {
            Some(stream) => Pin::new(stream).poll_read(cx, buf),
            None => Poll::Ready(Err(gone())),
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for HandBack<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.stream.as_mut() {
            Some(stream) => Pin::new(stream).poll_write(cx, buf),
            None => Poll::Ready(Err(gone())),
        }
    }

    // Passed through: hyper writes a head and its body with one `writev`.
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.stream.as_mut() {
            Some(stream) => Pin::new(stream).poll_write_vectored(cx, bufs),
            None => Poll::Ready(Err(gone())),
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.as_ref().is_some_and(|s| s.is_write_vectored())
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.stream.as_mut() {
            Some(stream) => Pin::new(stream).poll_flush(cx),
            None => Poll::Ready(Err(gone())),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.stream.as_mut() {
            Some(stream) => Pin::new(stream).poll_shutdown(cx),
            None => Poll::Ready(Err(gone())),
        }
    }
}

/// The socket under a connection's stream.
pub(super) trait IntoSocket {
    type Socket: AsyncRead + AsyncWrite + Unpin;
    fn into_socket(self) -> Self::Socket;
}

impl IntoSocket for TcpStream {
    type Socket = TcpStream;
    fn into_socket(self) -> TcpStream {
        self
    }
}

impl IntoSocket for tokio_rustls::server::TlsStream<TcpStream> {
    type Socket = TcpStream;
    fn into_socket(self) -> TcpStream {
        self.into_inner().0
    }
}

/// Finishes closing `stream` once hyper has let go of it: our side shut down (again, if
/// hyper already did: harmless), then what the client still sends read and discarded
/// until it closes its side, fails, or [`LINGER`] passes.
pub(super) async fn linger<S: IntoSocket>(returned: Returned<S>) {
    let Ok(stream) = returned.await else {
        return;
    };
    let mut stream = stream.into_socket();
    let _ = tokio::time::timeout(LINGER, async {
        let _ = stream.shutdown().await;
        let mut discard = [0u8; 1024];
        while matches!(stream.read(&mut discard).await, Ok(read) if read > 0) {}
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{duplex, DuplexStream};

    impl IntoSocket for DuplexStream {
        type Socket = DuplexStream;
        fn into_socket(self) -> DuplexStream {
            self
        }
    }

    /// The stream comes back when the wrapper is dropped, and lingering reads what the
    /// peer still sends until it closes.
    #[tokio::test]
    async fn the_stream_comes_back_and_lingering_drains_the_peer() {
        let (ours, mut theirs) = duplex(64);
        let (mut io, returned) = HandBack::new(ours);
        io.write_all(b"answer").await.expect("write");
        drop(io);
        let lingering = tokio::spawn(linger(returned));
        let mut got = [0u8; 6];
        theirs.read_exact(&mut got).await.expect("read the answer");
        assert_eq!(&got, b"answer");
        // The peer's late writes still succeed while the gateway lingers.
        for _ in 0..10 {
            theirs
                .write_all(&[7u8; 100])
                .await
                .expect("a late write is read");
        }
        drop(theirs);
        tokio::time::timeout(Duration::from_secs(1), lingering)
            .await
            .expect("lingering ends when the peer closes")
            .expect("no panic");
    }

    /// A peer that never closes is given up after `LINGER`.
    #[tokio::test(start_paused = true)]
    async fn lingering_is_bounded() {
        let (ours, _theirs) = duplex(64);
        let (io, returned) = HandBack::new(ours);
        drop(io);
        let started = tokio::time::Instant::now();
        linger(returned).await;
        assert!(started.elapsed() >= LINGER);
        assert!(started.elapsed() < LINGER + Duration::from_millis(100));
    }
}
