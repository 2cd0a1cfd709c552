//! Why an attempt got no answer, and whether another attempt could get one: a
//! [`SendError`] sorted into the contract's retry classes (DESIGN.md, "Upstream call").
//! Retried: a request that never left (no connection, or the open one could not take
//! it) and a connection the upstream reset or closed before answering. Not retried: a
//! TLS failure, and anything else, which another attempt would repeat.

use std::error::Error as StdError;
use std::io;

use super::transport::{ConnectError, SendError};
use super::Attempt;
use crate::causes;

impl SendError {
    /// `Attempt::Retriable` or `Attempt::Fatal` (never `Answered`): how the attempt that
    /// failed this way ends.
    pub(super) fn retry_class(&self) -> Attempt {
        if self.is_tls() {
            return Attempt::Fatal;
        }
        if self.is_unsent() || caused_by_reset(self.as_std()) {
            return Attempt::Retriable;
        }
        Attempt::Fatal
    }

    /// Whether the request never left: no connection could be opened, or the open one
    /// could not take it. Such a request can always be sent again.
    pub(super) fn is_unsent(&self) -> bool {
        match self {
            SendError::Connect(_) | SendError::NotSent(_) => true,
            SendError::Request(_) | SendError::Stream(_) => false,
        }
    }

    /// Whether TLS failed: the upstream's certificate, or the handshake. Another attempt
    /// would fail the same way. A connect shared by calls that waited for it keeps only
    /// this answer, taken from the original error.
    pub(super) fn is_tls(&self) -> bool {
        match self {
            SendError::Connect(ConnectError::Shared(shared)) => shared.tls,
            _ => causes::chain(self.as_std()).any(|e| e.is::<rustls::Error>()),
        }
    }
}

fn caused_by_reset(err: &(dyn StdError + 'static)) -> bool {
    causes::chain(err).any(|e| {
        let reset_io = e.downcast_ref::<io::Error>().is_some_and(is_reset_io);
        let closed_early = e
            .downcast_ref::<hyper::Error>()
            .is_some_and(|h| h.is_incomplete_message() || h.is_canceled());
        let h2_reset = e.downcast_ref::<h2::Error>().is_some_and(is_h2_reset);
        reset_io || closed_early || h2_reset
    })
}

fn is_reset_io(io: &io::Error) -> bool {
    matches!(
        io.kind(),
        io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
            // A TLS peer that vanishes without close_notify.
            | io::ErrorKind::UnexpectedEof
    )
}

/// The HTTP/2 forms of a reset connection: the socket reset under the connection, or
/// the upstream resetting the stream (`RST_STREAM`) or going away (`GOAWAY`) before it
/// answered, for a reason that says nothing about the request itself. (`h2::Error`
/// keeps its I/O cause out of `source()`, so it is asked directly.)
fn is_h2_reset(err: &h2::Error) -> bool {
    if let Some(io) = err.get_io() {
        return is_reset_io(io);
    }
    (err.is_reset() || err.is_go_away())
        && matches!(
            err.reason(),
            Some(
                h2::Reason::NO_ERROR
                    | h2::Reason::REFUSED_STREAM
                    | h2::Reason::CANCEL
                    | h2::Reason::INTERNAL_ERROR
            )
        )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::transport::SharedConnectFailure;

    fn is_retried(err: &SendError) -> bool {
        matches!(err.retry_class(), Attempt::Retriable)
    }

    /// A connect failure handed to the calls that waited for it is classified as the
    /// original: retried, except a TLS failure.
    #[test]
    fn a_shared_connect_failure_keeps_the_original_class() {
        let refused = SendError::Connect(ConnectError::Connector(Box::new(io::Error::from(
            io::ErrorKind::ConnectionRefused,
        ))));
        let tls = SendError::Connect(ConnectError::Connector(Box::new(io::Error::other(
            rustls::Error::General("bad certificate".into()),
        ))));
        assert!(is_retried(&refused));
        assert!(!is_retried(&tls));
        for (original, retriable) in [(refused, true), (tls, false)] {
            let shared =
                SendError::Connect(ConnectError::Shared(SharedConnectFailure::of(&original)));
            assert_eq!(is_retried(&shared), retriable, "{shared:?}");
        }
    }
}
