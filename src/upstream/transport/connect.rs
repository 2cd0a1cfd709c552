//! Opening a connection to the upstream: TCP and then TLS (rustls, through
//! hyper-rustls) under one `connect_timeout`, offering `h2` and `http/1.1` by ALPN or
//! `http/1.1` alone; why a connect failed; and that failure as handed to the calls that
//! waited for another call's connect.

use std::error::Error as StdError;
use std::time::Duration;

use http::Uri;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;

use super::{SendError, Stream};

/// Why no connection to the upstream could be opened.
#[derive(Debug, thiserror::Error)]
pub(in crate::upstream) enum ConnectError {
    /// TCP or TLS, as the connector reports it (hyper-rustls boxes its errors).
    #[error(transparent)]
    Connector(Box<dyn StdError + Send + Sync>),
    /// TCP and TLS together took longer than `connect_timeout`, or the HTTP/2 handshake
    /// after them did.
    #[error("connect timed out")]
    TimedOut,
    /// The HTTP/2 handshake on the new connection failed.
    #[error("HTTP/2 handshake failed: {0}")]
    Handshake(#[source] h2::Error),
    /// The connect this call waited for, made by another call, failed.
    #[error(transparent)]
    Shared(SharedConnectFailure),
}

/// The failure of a connect that other calls waited for, handed to each of them.
#[derive(Debug, Clone, thiserror::Error)]
#[error("the connect this call waited for failed: {detail}")]
pub(in crate::upstream) struct SharedConnectFailure {
    detail: String,
    /// A TLS failure is not retried; the others are, like the original error.
    pub(in crate::upstream) tls: bool,
}

impl SharedConnectFailure {
    pub(in crate::upstream) fn of(err: &SendError) -> SharedConnectFailure {
        SharedConnectFailure {
            detail: err.as_std().to_string(),
            tls: err.is_tls(),
        }
    }
}

/// What a connector offers by ALPN.
#[derive(Clone, Copy)]
pub(super) enum Offer {
    H2First,
    Http1Only,
}

/// The rustls connector with `connect_timeout` over the TCP connect *and* the TLS
/// handshake: an upstream that accepts TCP but never speaks TLS is a connect failure
/// (retried), not a wait for the whole call's `timeout`.
#[derive(Clone)]
pub(super) struct TimedConnector {
    inner: HttpsConnector<HttpConnector>,
    pub(super) timeout: Duration,
}

impl TimedConnector {
    pub(super) fn new(
        tls: rustls::ClientConfig,
        http: HttpConnector,
        offer: Offer,
        timeout: Duration,
    ) -> Self {
        let builder = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http();
        let inner = match offer {
            Offer::H2First => builder.enable_all_versions().wrap_connector(http),
            Offer::Http1Only => builder.enable_http1().wrap_connector(http),
        };
        TimedConnector { inner, timeout }
    }

    pub(super) async fn connect(&self, uri: Uri) -> Result<Stream, ConnectError> {
        let connecting = tower::ServiceExt::oneshot(self.inner.clone(), uri);
        match tokio::time::timeout(self.timeout, connecting).await {
            Ok(connected) => connected.map_err(ConnectError::Connector),
            Err(_) => Err(ConnectError::TimedOut),
        }
    }
}
