//! How a request reaches Plivo. Over TLS the first connection offers `h2` by ALPN. If
//! Plivo takes it, every call is a stream on that one connection, which this module holds
//! itself: pinged while open, closed after a minute or two without calls, and opened
//! again at the next call once it has closed (idle, a GOAWAY, a reset, failed pings). An
//! upstream that answers ALPN with HTTP/1.1, or a plain `http` base URL, goes through
//! hyper-util's keep-alive pool instead.
//!
//! Why not the pool for HTTP/2 as well: for a connection that is always the only one, its
//! per-call checkout, boxed future and URI rewriting cost about 6% of the gateway's CPU
//! per request, and its idle bookkeeping 1.5 MiB of peak RSS (benches/RESULTS.md).

use std::error::Error as StdError;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::HOST;
use http::uri::{PathAndQuery, Scheme};
use http::{HeaderValue, Request, Response, Uri};
use http_body_util::Empty;
use hyper::body::Incoming;
use hyper::client::conn::http2;
use hyper_rustls::{HttpsConnector, MaybeHttpsStream};
use hyper_util::client::legacy::connect::{Connection, HttpConnector};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;

use crate::config::{BaseUrl, UpstreamSettings};

/// An upstream connection unused this long is closed (an HTTP/2 one after between one
/// and two of these).
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// How often the HTTP/2 connection is pinged, and how long a ping may take before the
/// connection is dropped.
const H2_PING_INTERVAL: Duration = Duration::from_secs(20);
const H2_PING_TIMEOUT: Duration = Duration::from_secs(10);

type PooledClient = Client<TimedConnector, Empty<Bytes>>;
type Stream = MaybeHttpsStream<TokioIo<TcpStream>>;
type Sender = http2::SendRequest<Empty<Bytes>>;
pub(super) type ConnectError = Box<dyn StdError + Send + Sync>;

/// Why a request got no response.
#[derive(Debug)]
pub(super) enum SendError {
    /// The HTTP/2 connection could not be opened: TCP, TLS, timeout or handshake.
    Connect(ConnectError),
    /// The request failed on a connection of this module's (HTTP/2, or the ALPN probe).
    Request(hyper::Error),
    /// The request failed in the HTTP/1.1 pool (connecting included).
    Pooled(hyper_util::client::legacy::Error),
}

impl SendError {
    /// Whether the failure happened before a connection existed.
    pub(super) fn is_connect(&self) -> bool {
        match self {
            SendError::Connect(_) => true,
            SendError::Request(_) => false,
            SendError::Pooled(err) => err.is_connect(),
        }
    }

    pub(super) fn as_std(&self) -> &(dyn StdError + 'static) {
        match self {
            SendError::Connect(err) => err.as_ref(),
            SendError::Request(err) => err,
            SendError::Pooled(err) => err,
        }
    }
}

pub(super) struct Transport {
    connector: TimedConnector,
    /// Where connections go: the base URL's scheme and authority.
    origin: Uri,
    h2_builder: http2::Builder<TokioExecutor>,
    /// The open HTTP/2 connection, if any; shared with its idle watcher.
    h2: Arc<H2Slot>,
    idle_timeout: Duration,
    /// One connect at a time, so a burst of calls opens one connection, not one each.
    connecting: tokio::sync::Mutex<()>,
    /// Set once an upstream answered ALPN without `h2` (or the base URL is plain `http`).
    http1_only: AtomicBool,
    pool: PooledClient,
}

impl Transport {
    pub(super) fn new(settings: &UpstreamSettings, tls: rustls::ClientConfig) -> Transport {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_keepalive(Some(Duration::from_secs(30)));
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            // h2 first: over one multiplexed connection, a burst of calls costs one write
            // and one read instead of one of each per call (see benches/RESULTS.md).
            .enable_all_versions()
            .wrap_connector(http);
        let connector = TimedConnector {
            inner: https,
            timeout: settings.connect_timeout,
        };
        let mut h2_builder = http2::Builder::new(TokioExecutor::new());
        // One connection carries every call, so a connection that died silently (a NAT or
        // load balancer forgot it) must be found by pings, not by calls that hang until
        // their `timeout`.
        h2_builder
            .timer(TokioTimer::new())
            .keep_alive_interval(H2_PING_INTERVAL)
            .keep_alive_timeout(H2_PING_TIMEOUT)
            .keep_alive_while_idle(true);
        let pool = Client::builder(TokioExecutor::new())
            .timer(TokioTimer::new())
            .pool_idle_timeout(IDLE_TIMEOUT)
            .pool_max_idle_per_host(64)
            .build(connector.clone());
        Transport {
            connector,
            origin: origin_uri(&settings.base_url),
            h2_builder,
            h2: Arc::new(H2Slot::default()),
            idle_timeout: IDLE_TIMEOUT,
            connecting: tokio::sync::Mutex::new(()),
            http1_only: AtomicBool::new(settings.base_url.scheme != Scheme::HTTPS),
            pool,
        }
    }

    /// Sends `request` (an absolute URI on the base URL) and waits for the response head.
    pub(super) async fn send(
        &self,
        request: Request<Empty<Bytes>>,
    ) -> Result<Response<Incoming>, SendError> {
        // Connecting and the probe's one call are rare, and their futures are large:
        // boxed, they stay out of the future every request carries.
        let connected = match self.h2.open() {
            Some(open) => Connected::Http2(open),
            None if self.http1_only.load(Ordering::Relaxed) => Connected::Pool,
            None => Box::pin(self.connect_h2()).await?,
        };
        match connected {
            Connected::Http2(open) => self.send_h2(open, request).await,
            Connected::Pool => self.pool.request(request).await.map_err(SendError::Pooled),
            Connected::Http1Probe(stream) => Box::pin(send_once_http1(*stream, request)).await,
        }
    }

    async fn send_h2(
        &self,
        open: OpenH2,
        request: Request<Empty<Bytes>>,
    ) -> Result<Response<Incoming>, SendError> {
        let OpenH2 {
            generation,
            mut sender,
        } = open;
        self.h2.calls.fetch_add(1, Ordering::Relaxed);
        sender.send_request(request).await.map_err(|err| {
            if ends_connection(&err) {
                self.h2.forget(generation);
            }
            SendError::Request(err)
        })
    }

    /// Opens the HTTP/2 connection, or learns from ALPN that the upstream speaks only
    /// HTTP/1.1.
    async fn connect_h2(&self) -> Result<Connected, SendError> {
        let _turn = self.connecting.lock().await;
        // Whoever held the turn before may have connected, or learned it is HTTP/1.1.
        if let Some(open) = self.h2.open() {
            return Ok(Connected::Http2(open));
        }
        if self.http1_only.load(Ordering::Relaxed) {
            return Ok(Connected::Pool);
        }
        let stream = self.connector.connect(self.origin.clone()).await;
        let stream = stream.map_err(SendError::Connect)?;
        if !stream.connected().is_negotiated_h2() {
            tracing::info!(
                origin = %self.origin,
                "the upstream chose HTTP/1.1 by ALPN; calls use a keep-alive pool"
            );
            self.http1_only.store(true, Ordering::Relaxed);
            return Ok(Connected::Http1Probe(Box::new(stream)));
        }
        let handshake = self.h2_builder.handshake(stream);
        let (sender, connection) = tokio::time::timeout(self.connector.timeout, handshake)
            .await
            .map_err(|_| SendError::Connect(ConnectTimedOut.into()))?
            .map_err(|err| SendError::Connect(err.into()))?;
        tokio::spawn(async move {
            if let Err(err) = connection.await {
                tracing::debug!(error = %err, "upstream HTTP/2 connection ended");
            }
        });
        let open = self.h2.install(sender);
        tracing::debug!(
            origin = %self.origin,
            generation = open.generation,
            "upstream HTTP/2 connection open"
        );
        tokio::spawn(close_when_idle(
            Arc::downgrade(&self.h2),
            open.generation,
            self.idle_timeout,
        ));
        Ok(Connected::Http2(open))
    }
}

/// One HTTP/2 connection, numbered so that a failed call or an idle watcher forgets
/// only the connection it knows, never a newer one.
#[derive(Clone)]
struct OpenH2 {
    generation: u64,
    sender: Sender,
}

/// The HTTP/2 connection in use, and how many calls went over HTTP/2.
#[derive(Default)]
struct H2Slot {
    /// A std mutex: it is held only to clone or swap a sender, never across an await.
    current: Mutex<Option<OpenH2>>,
    generations: AtomicU64,
    /// Calls sent over any HTTP/2 connection; the idle watcher only compares it.
    calls: AtomicU64,
}

impl H2Slot {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<OpenH2>> {
        self.current.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn open(&self) -> Option<OpenH2> {
        self.lock()
            .as_ref()
            .filter(|open| !open.sender.is_closed())
            .cloned()
    }

    /// Makes `sender` the connection in use, under a new generation.
    fn install(&self, sender: Sender) -> OpenH2 {
        let open = OpenH2 {
            generation: self.generations.fetch_add(1, Ordering::Relaxed),
            sender,
        };
        *self.lock() = Some(open.clone());
        open
    }

    fn is_current(&self, generation: u64) -> bool {
        holds(&self.lock(), generation)
    }

    /// Stops using connection `generation`, so the next call opens a new one, and
    /// leaves a newer connection alone. hyper closes the connection once the last
    /// sender (a call still in flight holds one) is gone.
    fn forget(&self, generation: u64) {
        let mut current = self.lock();
        if holds(&current, generation) {
            *current = None;
        }
    }
}

fn holds(current: &Option<OpenH2>, generation: u64) -> bool {
    current
        .as_ref()
        .is_some_and(|open| open.generation == generation)
}

/// Forgets HTTP/2 connection `generation` once a whole `idle` period passed without a
/// call, so an idle sidecar does not hold (and ping) a connection to Plivo forever. It
/// counts calls rather than reading the clock on every call.
async fn close_when_idle(slot: Weak<H2Slot>, generation: u64, idle: Duration) {
    let mut calls_seen = match slot.upgrade() {
        Some(slot) => slot.calls.load(Ordering::Relaxed),
        None => return,
    };
    loop {
        tokio::time::sleep(idle).await;
        let Some(slot) = slot.upgrade() else { return };
        if !slot.is_current(generation) {
            return;
        }
        let calls = slot.calls.load(Ordering::Relaxed);
        if calls == calls_seen {
            tracing::debug!(generation, "closing the idle upstream HTTP/2 connection");
            slot.forget(generation);
            return;
        }
        calls_seen = calls;
    }
}

/// Where a call goes.
enum Connected {
    Http2(OpenH2),
    /// hyper-util's HTTP/1.1 pool.
    Pool,
    /// The connection that asked for `h2` and got HTTP/1.1: it carries this one call
    /// rather than being thrown away, then closes. (Boxed: a TLS stream is large, and
    /// this happens once per process.)
    Http1Probe(Box<Stream>),
}

async fn send_once_http1(
    stream: Stream,
    request: Request<Empty<Bytes>>,
) -> Result<Response<Incoming>, SendError> {
    let (mut sender, connection) = hyper::client::conn::http1::handshake(stream)
        .await
        .map_err(SendError::Request)?;
    tokio::spawn(async move {
        if let Err(err) = connection.await {
            tracing::debug!(error = %err, "upstream HTTP/1.1 probe connection ended");
        }
    });
    let request = into_origin_form(request);
    sender
        .send_request(request)
        .await
        .map_err(SendError::Request)
}

/// An HTTP/1.1 request line carries only the path; the authority moves to `Host`, with
/// the port unless it is the scheme's default (as hyper-util's pool writes it).
fn into_origin_form(mut request: Request<Empty<Bytes>>) -> Request<Empty<Bytes>> {
    let uri = request.uri();
    let host = host_header(uri);
    let path = uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    *request.uri_mut() = Uri::from(path);
    if let Some(host) = host {
        request.headers_mut().entry(HOST).or_insert(host);
    }
    request
}

fn host_header(uri: &Uri) -> Option<HeaderValue> {
    let host = uri.host()?;
    let default_port = if uri.scheme() == Some(&Scheme::HTTPS) {
        443
    } else {
        80
    };
    match uri.port_u16() {
        Some(port) if port != default_port => HeaderValue::from_str(&format!("{host}:{port}")).ok(),
        _ => HeaderValue::from_str(host).ok(),
    }
}

/// Whether a failed call means its HTTP/2 connection is unusable: anything but the
/// upstream resetting that one stream (`RST_STREAM`), after which the connection carries
/// on. A GOAWAY, an I/O error or a closed connection all need a new one.
fn ends_connection(err: &hyper::Error) -> bool {
    let mut source = err.source();
    while let Some(cause) = source {
        if let Some(h2) = cause.downcast_ref::<h2::Error>() {
            return !h2.is_reset();
        }
        source = cause.source();
    }
    true
}

/// `scheme://authority/` of the base URL, which is what the connector needs.
fn origin_uri(base_url: &BaseUrl) -> Uri {
    Uri::builder()
        .scheme(base_url.scheme.clone())
        .authority(base_url.authority.clone())
        .path_and_query("/")
        .build()
        // Scheme and authority were validated when the config was loaded.
        .unwrap_or_default()
}

/// The rustls connector with `connect_timeout` over the TCP connect *and* the TLS
/// handshake: an upstream that accepts TCP but never speaks TLS is a connect failure
/// (retried), not a wait for the whole call's `timeout`.
#[derive(Clone)]
struct TimedConnector {
    inner: HttpsConnector<HttpConnector>,
    timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
#[error("connect timed out")]
struct ConnectTimedOut;

impl TimedConnector {
    async fn connect(&self, uri: Uri) -> Result<Stream, ConnectError> {
        let connecting = tower::ServiceExt::oneshot(self.inner.clone(), uri);
        match tokio::time::timeout(self.timeout, connecting).await {
            Ok(connected) => connected,
            Err(_) => Err(ConnectTimedOut.into()),
        }
    }
}

impl tower::Service<Uri> for TimedConnector {
    type Response = Stream;
    type Error = ConnectError;
    type Future = Pin<Box<dyn Future<Output = Result<Stream, ConnectError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ConnectError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move { this.connect(uri).await })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::simulator::{generate_pki, Simulator, SimulatorConfig};

    /// A transport to a TLS simulator that offers `h2`, closing idle connections after
    /// `idle`.
    async fn h2_transport(idle: Duration) -> (Simulator, Transport) {
        let pki = generate_pki(&["localhost", "127.0.0.1"]).expect("pki");
        let mut config = SimulatorConfig::new("MAIDLE", "token");
        config.tls = Some(pki.server_tls());
        config.http2 = true;
        let sim = Simulator::start(config).await.expect("simulator");
        let base_url: Uri = sim.base_url().parse().expect("base url");
        let settings = UpstreamSettings {
            base_url: BaseUrl {
                scheme: base_url.scheme().expect("scheme").clone(),
                authority: base_url.authority().expect("authority").clone(),
            },
            ca_file: None,
            extra_roots: rustls_pemfile::certs(&mut pki.ca_cert_pem.as_bytes())
                .collect::<Result<_, _>>()
                .expect("CA"),
            connect_timeout: Duration::from_secs(2),
            timeout: Duration::from_secs(5),
            max_attempts: 1,
        };
        let tls = super::super::client_tls_config(&settings).expect("tls");
        let mut transport = Transport::new(&settings, tls);
        transport.idle_timeout = idle;
        (sim, transport)
    }

    async fn call(sim: &Simulator, transport: &Transport) {
        let uri = format!(
            "{}/v1/Account/MAIDLE/MultiPartyCall/name_idle/",
            sim.base_url()
        );
        let request = Request::delete(uri)
            .header(http::header::AUTHORIZATION, "Basic TUFJRExFOnRva2Vu")
            .body(Empty::new())
            .expect("request");
        let response = transport.send(request).await.expect("answered");
        assert_eq!(response.version(), http::Version::HTTP_2);
    }

    #[tokio::test]
    async fn an_idle_http2_connection_is_closed_and_the_next_call_opens_another() {
        let idle = Duration::from_millis(500);
        let (sim, transport) = h2_transport(idle).await;
        // Calls far more often than `idle` keep the connection (a stall of a whole
        // `idle` on a loaded machine would be needed to lose it).
        for _ in 0..15 {
            call(&sim, &transport).await;
            tokio::time::sleep(idle / 10).await;
        }
        assert_eq!(sim.connection_count(), 1, "busy: one connection");
        assert!(transport.h2.open().is_some());
        // Two idle periods without a call close it.
        tokio::time::sleep(idle * 2 + idle / 2).await;
        assert!(transport.h2.open().is_none(), "idle: forgotten");
        call(&sim, &transport).await;
        assert_eq!(sim.connection_count(), 2, "the next call opened a new one");
        sim.shutdown().await;
    }

    fn origin_form(uri: &str) -> (String, Option<String>) {
        let request = Request::get(uri).body(Empty::new()).expect("request");
        let request = into_origin_form(request);
        let host = request
            .headers()
            .get(HOST)
            .map(|h| h.to_str().expect("ascii").to_owned());
        (request.uri().to_string(), host)
    }

    #[test]
    fn origin_form_moves_the_authority_to_host_without_a_default_port() {
        assert_eq!(
            origin_form("https://api.plivo.com/v1/Account/MA1/MultiPartyCall/name_a/"),
            (
                "/v1/Account/MA1/MultiPartyCall/name_a/".to_owned(),
                Some("api.plivo.com".to_owned())
            )
        );
        assert_eq!(
            origin_form("https://api.plivo.com:443/v1/"),
            ("/v1/".to_owned(), Some("api.plivo.com".to_owned()))
        );
        assert_eq!(
            origin_form("https://127.0.0.1:8443/v1/?q=1"),
            ("/v1/?q=1".to_owned(), Some("127.0.0.1:8443".to_owned()))
        );
        assert_eq!(
            origin_form("http://localhost:443/"),
            ("/".to_owned(), Some("localhost:443".to_owned()))
        );
    }
}
