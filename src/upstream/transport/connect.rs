//! Opening a connection to the upstream: TCP and then TLS (rustls, through
//! hyper-rustls) under one `connect_timeout`, offering `h2` and `http/1.1` by ALPN or
//! `http/1.1` alone; why a connect failed; and that failure as handed to the calls that
//! waited for another call's connect.

use std::error::Error as StdError;
use std::time::Duration;

use http::Uri;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::dns::GaiResolver;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tower::Service;

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
/// (retried), not a wait for the whole call's `timeout`. The resolver is the system's
/// (`getaddrinfo`); tests give their own, to resolve a name to chosen addresses.
#[derive(Clone)]
pub(super) struct TimedConnector<R = GaiResolver> {
    inner: HttpsConnector<HttpConnector<R>>,
    pub(super) timeout: Duration,
}

impl TimedConnector {
    pub(super) fn new(tls: rustls::ClientConfig, offer: Offer, timeout: Duration) -> Self {
        TimedConnector::with_resolver(tls, GaiResolver::new(), offer, timeout)
    }
}

impl<R> TimedConnector<R>
where
    HttpConnector<R>: Service<Uri, Response = TokioIo<TcpStream>> + Clone,
    <HttpConnector<R> as Service<Uri>>::Future: Send + 'static,
    <HttpConnector<R> as Service<Uri>>::Error: Into<Box<dyn StdError + Send + Sync>>,
{
    pub(super) fn with_resolver(
        tls: rustls::ClientConfig,
        resolver: R,
        offer: Offer,
        timeout: Duration,
    ) -> Self {
        let http = tcp_connector(resolver, timeout);
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

/// The TCP connector. Its own connect timeout is `connect_timeout` too: hyper-util then
/// gives each of a name's addresses an equal share of it, so an address that never
/// answers (a black-holed SYN) costs only its share and the next address is tried.
/// Without it the first address would use up the whole `connect_timeout` (the bound
/// around TCP and TLS) and the others would never be tried.
fn tcp_connector<R>(resolver: R, connect_timeout: Duration) -> HttpConnector<R> {
    let mut http = HttpConnector::new_with_resolver(resolver);
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_keepalive(Some(Duration::from_secs(30)));
    http.set_connect_timeout(Some(connect_timeout));
    http
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;
    use std::sync::Arc;
    use std::time::Instant;

    /// A loopback listener that never accepts, with its accept queue full, so the kernel
    /// drops further SYNs: a connect to it neither completes nor is refused (an address
    /// behind a black-holing firewall). `None` when this kernel cannot be made to do that
    /// (it queues more, or resets on overflow). As in tests/faults.rs.
    async fn black_hole() -> Option<(tokio::net::TcpListener, Vec<TcpStream>)> {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket
            .bind(SocketAddr::from(([127, 0, 0, 1], 0)))
            .expect("bind");
        let listener = socket.listen(1).expect("listen");
        let addr = listener.local_addr().expect("addr");
        let mut held = Vec::new();
        for _ in 0..8 {
            let probe = TcpStream::connect(addr);
            match tokio::time::timeout(Duration::from_millis(300), probe).await {
                Ok(Ok(stream)) => held.push(stream),
                Ok(Err(_)) => return None,
                Err(_unanswered) => return Some((listener, held)),
            }
        }
        None
    }

    fn plain_tls() -> rustls::ClientConfig {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth()
    }

    /// A name whose first address never answers and whose second listens: the connect
    /// reaches the second within `connect_timeout`, instead of spending all of it on the
    /// first and failing.
    #[tokio::test]
    async fn a_black_holed_first_address_leaves_time_for_the_next() {
        let Some((dead, _held)) = black_hole().await else {
            eprintln!(
                "SKIPPED a_black_holed_first_address_leaves_time_for_the_next: no connect \
                 could be made to hang on this kernel"
            );
            return;
        };
        let live = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addrs = [
            dead.local_addr().expect("addr"),
            live.local_addr().expect("addr"),
        ];
        // Each address keeps its own port: the URI below names none.
        let resolver =
            tower::service_fn(
                move |_name| async move { Ok::<_, std::io::Error>(addrs.into_iter()) },
            );
        let connect_timeout = Duration::from_secs(1);
        let connector =
            TimedConnector::with_resolver(plain_tls(), resolver, Offer::H2First, connect_timeout);
        let started = Instant::now();
        let uri = Uri::from_static("http://two-addresses.test/");
        let stream = connector.connect(uri).await.expect("the second address");
        let took = started.elapsed();
        let peer = match &stream {
            hyper_rustls::MaybeHttpsStream::Http(tcp) => tcp.inner().peer_addr().ok(),
            hyper_rustls::MaybeHttpsStream::Https(_) => None,
        };
        assert_eq!(peer, Some(addrs[1]), "connected to the listening address");
        assert!(took < connect_timeout, "within connect_timeout: {took:?}");
    }
}
