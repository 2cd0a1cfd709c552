//! Which HTTP version a plain (non-TLS) data connection speaks: HTTP/1.1, or HTTP/2 with
//! prior knowledge (h2c), told apart by peeking at its first bytes within the head
//! deadline. hyper-util's own sniffing has no timeout, so a client that sends nothing would
//! hold its connection for ever. (Over TLS, ALPN says which.)

use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::Instant;

/// The HTTP version a data connection speaks, chosen before hyper sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum HttpVersion {
    Http1,
    Http2,
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Why a connection has no HTTP version.
pub(super) enum NoVersion {
    /// Not enough bytes by the head deadline.
    TimedOut,
    /// The client closed (or reset) the connection before sending a byte.
    Closed,
}

/// Tells HTTP/1 from prior-knowledge HTTP/2 (h2c) by peeking at the first bytes, before
/// the connection's head deadline.
pub(super) async fn sniff_version(
    stream: &TcpStream,
    deadline: Instant,
) -> Result<HttpVersion, NoVersion> {
    let mut buf = [0u8; 24];
    let mut pause = SNIFF_FIRST_PAUSE;
    loop {
        // `timeout_at` polls the peek first, and a partial preface is always ready:
        // check the deadline explicitly.
        if Instant::now() >= deadline {
            return Err(NoVersion::TimedOut);
        }
        let peeked = tokio::time::timeout_at(deadline, stream.peek(&mut buf)).await;
        let n = match peeked {
            // (A client that closes after part of a preface still has those bytes
            // peeked, so it waits out the deadline above.)
            Ok(Ok(0)) | Ok(Err(_)) => return Err(NoVersion::Closed),
            Ok(Ok(n)) => n,
            Err(_) => return Err(NoVersion::TimedOut),
        };
        if buf[..n] != H2_PREFACE[..n] {
            return Ok(HttpVersion::Http1);
        }
        if n == H2_PREFACE.len() {
            return Ok(HttpVersion::Http2);
        }
        // A partial preface: peek would return the same bytes at once, so wait for the
        // rest. Honest h2c clients rarely split their preface; a client that sends one
        // byte and stops must not cost a peek every few milliseconds until the deadline.
        tokio::time::sleep(pause).await;
        pause = next_sniff_pause(pause);
    }
}

const SNIFF_FIRST_PAUSE: Duration = Duration::from_millis(5);
const SNIFF_LONGEST_PAUSE: Duration = Duration::from_millis(250);

/// Doubling pauses between peeks at a partial preface, capped: about 45 peeks in the
/// 10 s a head may take, where a fixed 5 ms pause made 2,000.
fn next_sniff_pause(pause: Duration) -> Duration {
    (pause * 2).min(SNIFF_LONGEST_PAUSE)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::HEADER_READ_TIMEOUT;
    use tokio::net::TcpListener;

    #[test]
    fn a_partial_preface_is_peeked_at_a_few_dozen_times_until_the_head_deadline() {
        let mut pause = SNIFF_FIRST_PAUSE;
        let mut waited = Duration::ZERO;
        let mut peeks = 1;
        while waited < HEADER_READ_TIMEOUT {
            waited += pause;
            pause = next_sniff_pause(pause);
            peeks += 1;
        }
        assert!(peeks <= 50, "{peeks} peeks");
        assert_eq!(pause, SNIFF_LONGEST_PAUSE);
    }

    #[tokio::test]
    async fn a_preface_split_by_a_pause_is_still_http2() {
        use tokio::io::AsyncWriteExt;
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let mut client = TcpStream::connect(listener.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        client.write_all(&H2_PREFACE[..1]).await.expect("write");
        let rest = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            client.write_all(&H2_PREFACE[1..]).await.expect("write");
            client
        });
        let deadline = Instant::now() + Duration::from_secs(5);
        let version = sniff_version(&server, deadline).await;
        assert!(matches!(version, Ok(HttpVersion::Http2)));
        drop(rest.await.expect("writer"));
    }
}
