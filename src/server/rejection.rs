//! Why the HTTP layer ended a data connection itself, before or between requests, or
//! refused an HTTP/2 stream without processing it: the vocabulary of
//! `mpc_gateway_http_rejected_total{kind}`, and the one place a connection's error is
//! sorted into it. The label values are part of the operating contract (README,
//! "Metrics"): a variant may be added, never renamed.

/// One `kind` of `mpc_gateway_http_rejected_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Rejection {
    /// A request head larger than the HTTP layer accepts (a bare `431` or `414`).
    TooLarge,
    /// A request head that does not parse (a bare `400`).
    Malformed,
    /// No complete first request head within the header timeout of the accept.
    HeaderTimeout,
    /// A TLS handshake that failed or did not finish within the header timeout.
    TlsHandshake,
    /// A kept-alive HTTP/1.1 connection whose next head did not come in time (mostly an
    /// idle client), or an HTTP/2 client that stopped answering pings: not a refusal.
    IdleTimeout,
    /// The connection failed in the HTTP layer for any other reason (a reset, a broken
    /// HTTP/2 frame).
    Io,
    /// An error that did not come from hyper.
    Other,
    /// An HTTP/2 stream refused (`REFUSED_STREAM`) because the process already had
    /// [`MAX_H2_STREAMS_IN_PROGRESS`](super::MAX_H2_STREAMS_IN_PROGRESS) in progress:
    /// not processed, so not audited. The connection stays open.
    StreamsExhausted,
}

impl Rejection {
    /// The metric's label value.
    pub fn as_str(&self) -> &'static str {
        match self {
            Rejection::TooLarge => "too-large",
            Rejection::Malformed => "malformed",
            Rejection::HeaderTimeout => "header-timeout",
            Rejection::TlsHandshake => "tls-handshake",
            Rejection::IdleTimeout => "idle-timeout",
            Rejection::Io => "io",
            Rejection::Other => "other",
            Rejection::StreamsExhausted => "streams-exhausted",
        }
    }

    /// Sorts the error a served connection ended with.
    ///
    /// A hyper timeout is never a first head's: that deadline is timed from the accept
    /// and fires before hyper's own header timer can (the connection counts it as
    /// [`Rejection::HeaderTimeout`] itself), so a timeout here is an idle connection's.
    pub fn of_connection_error(err: &(dyn std::error::Error + 'static)) -> Rejection {
        match err.downcast_ref::<hyper::Error>() {
            Some(e) if e.is_parse_too_large() => Rejection::TooLarge,
            Some(e) if e.is_parse() => Rejection::Malformed,
            Some(e) if e.is_timeout() => Rejection::IdleTimeout,
            Some(_) => Rejection::Io,
            None => Rejection::Other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::convert::Infallible;

    use hyper::body::Incoming;
    use hyper_util::rt::TokioIo;
    use tokio::io::AsyncWriteExt as _;

    /// The label values are an external contract: dashboards and alerts name them.
    #[test]
    fn label_values_are_the_documented_ones() {
        let labels = [
            Rejection::TooLarge,
            Rejection::Malformed,
            Rejection::HeaderTimeout,
            Rejection::TlsHandshake,
            Rejection::IdleTimeout,
            Rejection::Io,
            Rejection::Other,
            Rejection::StreamsExhausted,
        ]
        .map(|rejection| rejection.as_str());
        assert_eq!(
            labels,
            [
                "too-large",
                "malformed",
                "header-timeout",
                "tls-handshake",
                "idle-timeout",
                "io",
                "other",
                "streams-exhausted"
            ]
        );
    }

    #[test]
    fn an_error_not_from_hyper_is_other() {
        let err = std::io::Error::other("not hyper's");
        assert_eq!(Rejection::of_connection_error(&err), Rejection::Other);
    }

    /// What hyper's HTTP/1.1 server ends a connection with when it is sent `bytes`.
    async fn hyper_error_for(bytes: &[u8]) -> hyper::Error {
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        client.write_all(bytes).await.expect("write");
        let service = hyper::service::service_fn(|_: http::Request<Incoming>| async {
            Ok::<_, Infallible>(http::Response::new(
                http_body_util::Empty::<bytes::Bytes>::new(),
            ))
        });
        let served = hyper::server::conn::http1::Builder::new()
            .max_buf_size(8192)
            .serve_connection(TokioIo::new(server), service)
            .await;
        served.expect_err("hyper refuses the head")
    }

    #[tokio::test]
    async fn hyper_parse_errors_are_malformed_or_too_large() {
        let malformed = hyper_error_for(b"NOT HTTP AT ALL\r\n\r\n").await;
        assert_eq!(
            Rejection::of_connection_error(&malformed),
            Rejection::Malformed
        );
        let huge = format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(16 * 1024));
        let too_large = hyper_error_for(huge.as_bytes()).await;
        assert_eq!(
            Rejection::of_connection_error(&too_large),
            Rejection::TooLarge
        );
    }
}
