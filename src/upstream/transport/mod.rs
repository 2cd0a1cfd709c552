//! How a request reaches Plivo, and its answer back (the head and a bounded body). Over
//! TLS the first connection offers `h2` by ALPN. If Plivo takes it, every call is a
//! stream on that one connection: pinged while open, closed after a minute or two
//! without calls, and opened again at the next call once it has closed (idle, a GOAWAY,
//! a reset, failed pings). An upstream that answers ALPN with HTTP/1.1, or a plain `http`
//! base URL, gets a keep-alive pool of HTTP/1.1 connections, one call at a time each,
//! and later connections offer only `http/1.1`.
//!
//! Both are held here rather than in hyper-util's pool: its per-call checkout, boxed
//! future, URI rewriting and, over HTTP/1.1, a task spawned per call to return the
//! connection cost 4–6% of the gateway's CPU per request (benches/RESULTS.md). Here a
//! connection goes back to the pool when its answer has been read, on the calling task.
//!
//! HTTP/2 is spoken with the `h2` crate directly, not through hyper's client: hyper
//! hands each call to its connection task over a channel and spawns a task per call to
//! carry the answer back, about 6% of the gateway's CPU per request. Here the calling
//! task opens the stream and awaits its answer itself; the connection task only drives
//! the connection and its keep-alive pings.
//!
//! This module decides where each call goes and reads the answers; `connect` opens
//! connections, `http2` holds the HTTP/2 connection and its tasks, `http1_pool` the
//! idle HTTP/1.1 connections.

mod connect;
mod http1_pool;
mod http2;

use std::error::Error as StdError;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header::HOST;
use http::uri::{PathAndQuery, Scheme};
use http::{HeaderValue, Request, Response, Uri};
use http_body_util::{BodyExt as _, Empty, Limited};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_rustls::MaybeHttpsStream;
use hyper_util::client::legacy::connect::Connection;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::config::UpstreamSettings;
use crate::sync::lock_unpoisoned;
pub(super) use connect::{ConnectError, SharedConnectFailure};
use connect::{Offer, TimedConnector};
use http1_pool::{close_idle_h1, handshake_h1, H1Pool};
use http2::{close_when_idle, drive_h2, H2Slot, HeadWait, KeepAlive, OpenH2, ReadyH2};

/// An upstream connection unused this long is closed (an HTTP/2 one after between one
/// and two of these).
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// How often the HTTP/2 connection is pinged, and how long a ping may take before the
/// connection is dropped.
const H2_PING_INTERVAL: Duration = Duration::from_secs(20);
const H2_PING_TIMEOUT: Duration = Duration::from_secs(10);
/// HTTP/2 limits, as hyper's client sets them: flow-control windows that never hold up
/// an answer (Plivo's are a few hundred bytes), a bound on an answer's head, and at most
/// 100 streams until the upstream's SETTINGS say how many it takes (h2's own default is
/// no limit, and a burst of calls waiting for the first connection could exceed it).
const H2_INITIAL_MAX_SEND_STREAMS: usize = 100;
const H2_STREAM_WINDOW: u32 = 2 * 1024 * 1024;
const H2_CONNECTION_WINDOW: u32 = 5 * 1024 * 1024;
const H2_MAX_HEADER_LIST: u32 = 16 * 1024;
const H2_MAX_SEND_BUFFER: usize = 1024 * 1024;

type Stream = MaybeHttpsStream<TokioIo<TcpStream>>;
type H1Sender = http1::SendRequest<Empty<Bytes>>;

/// Why a request got no response.
#[derive(Debug)]
pub(super) enum SendError {
    /// No connection could be opened: TCP, TLS, timeout or HTTP/2 handshake.
    Connect(ConnectError),
    /// The request failed on an open HTTP/1.1 connection.
    Request(hyper::Error),
    /// The open HTTP/2 connection could not take the request (it had failed or was
    /// closing, or ran out of stream ids): nothing was sent, so another connection may
    /// carry it.
    NotSent(h2::Error),
    /// The request's stream failed on the open HTTP/2 connection, or the connection
    /// under it. Usually after the request was sent; a stream still queued behind the
    /// upstream's concurrent-stream limit fails this way too.
    Stream(h2::Error),
}

/// Which of these failures another attempt may cure is decided in `super::failure`.
impl SendError {
    /// The error whose chain of causes says what happened: for a connect, the
    /// connector's own error rather than the enum around it.
    pub(super) fn as_std(&self) -> &(dyn StdError + 'static) {
        match self {
            SendError::Connect(ConnectError::Connector(err)) => err.as_ref(),
            SendError::Connect(err) => err,
            SendError::Request(err) => err,
            SendError::NotSent(err) | SendError::Stream(err) => err,
        }
    }
}

pub(super) struct Transport {
    /// Offers `h2` and `http/1.1` by ALPN.
    connector: TimedConnector,
    /// Offers only `http/1.1`: once the upstream chose it, a new connection that
    /// negotiated `h2` could not carry an HTTP/1.1 call.
    h1_connector: TimedConnector,
    /// Where connections go: the base URL's scheme and authority.
    origin: Uri,
    /// `Host` for HTTP/1.1 calls, from the base URL.
    host: HeaderValue,
    h2_builder: h2::client::Builder,
    /// The open HTTP/2 connection, if any; shared with its idle watcher.
    h2: Arc<H2Slot>,
    idle_timeout: Duration,
    /// How often the HTTP/2 connection is pinged, and how long a pong may take.
    ping: KeepAlive,
    /// One connect at a time, so a burst of calls opens one connection, not one each.
    connecting: tokio::sync::Mutex<()>,
    /// Connects started through `connecting`, and how the last one to run to its end
    /// failed (if it did), with its number: calls that waited for a connect share its
    /// failure instead of each waiting a whole `connect_timeout` of its own behind it.
    connects: AtomicU64,
    last_connect_failure: Mutex<Option<NumberedFailure>>,
    /// Set once an upstream answered ALPN without `h2` (or the base URL is plain `http`).
    http1_only: AtomicBool,
    h1: Arc<H1Pool>,
}

impl Transport {
    pub(super) fn new(settings: &UpstreamSettings, tls: rustls::ClientConfig) -> Transport {
        let timeout = settings.connect_timeout;
        // h2 first: over one multiplexed connection, a burst of calls costs one write and
        // one read instead of one of each per call (see benches/RESULTS.md).
        let connector = TimedConnector::new(tls.clone(), Offer::H2First, timeout);
        let h1_connector = TimedConnector::new(tls, Offer::Http1Only, timeout);
        let mut h2_builder = h2::client::Builder::new();
        h2_builder
            .initial_max_send_streams(H2_INITIAL_MAX_SEND_STREAMS)
            .initial_window_size(H2_STREAM_WINDOW)
            .initial_connection_window_size(H2_CONNECTION_WINDOW)
            .max_header_list_size(H2_MAX_HEADER_LIST)
            .max_send_buffer_size(H2_MAX_SEND_BUFFER)
            .enable_push(false);
        Transport {
            connector,
            h1_connector,
            origin: settings.base_url.origin().clone(),
            host: settings.base_url.host_header().clone(),
            h2_builder,
            h2: Arc::new(H2Slot::default()),
            idle_timeout: IDLE_TIMEOUT,
            ping: KeepAlive {
                interval: H2_PING_INTERVAL,
                timeout: H2_PING_TIMEOUT,
            },
            connecting: tokio::sync::Mutex::new(()),
            connects: AtomicU64::new(0),
            last_connect_failure: Mutex::new(None),
            http1_only: AtomicBool::new(*settings.base_url.scheme() != Scheme::HTTPS),
            h1: Arc::new(H1Pool::default()),
        }
    }

    /// Sends `request` (an absolute URI on the base URL) and reads the answer: its head,
    /// and its body up to `body_limit` bytes (empty if longer, broken, or not over by
    /// `deadline`: the head alone decides what happened upstream).
    pub(super) async fn send(
        &self,
        request: Request<Empty<Bytes>>,
        body: BodyBounds,
    ) -> Result<Response<Bytes>, SendError> {
        let connected = match self.connection().await? {
            Connected::Http2(open) => match self.ready(open).await {
                Ok(ready) => return self.send_h2(ready, request, body).await,
                // The connection failed or is going away (a GOAWAY racing this call):
                // nothing was sent, so the call goes on a new connection, once, and that
                // is not another attempt (as with an HTTP/1.1 connection closed under it).
                Err(_gone) => self.connection().await?,
            },
            http1 => http1,
        };
        match connected {
            Connected::Http2(open) => {
                let ready = self.ready(open).await?;
                self.send_h2(ready, request, body).await
            }
            http1 => self.send_h1(http1.into_h1(), request, body).await,
        }
    }

    /// Where the next call goes: the open HTTP/2 connection, the HTTP/1.1 pool, or a
    /// new connection.
    async fn connection(&self) -> Result<Connected, SendError> {
        match self.h2.open() {
            Some(open) => Ok(Connected::Http2(open)),
            None if self.http1_only.load(Ordering::Relaxed) => Ok(Connected::Pool),
            // Connecting is rare, and its future is large: boxed, it stays out of the
            // future every request carries.
            None => Box::pin(self.connect_first()).await,
        }
    }

    /// The HTTP/2 connection, ready for a stream; or why it cannot take one (it has
    /// failed or is going away), and then it is forgotten.
    async fn ready(&self, open: OpenH2) -> Result<ReadyH2, SendError> {
        let OpenH2 {
            generation, sender, ..
        } = open;
        match sender.ready().await {
            Ok(sender) => Ok(ReadyH2 { generation, sender }),
            Err(err) => {
                self.h2.forget(generation);
                Err(SendError::NotSent(err))
            }
        }
    }

    /// Opens a stream for `request` on the HTTP/2 connection and reads its answer. A
    /// failure other than the upstream resetting this one stream means the connection
    /// is unusable: the next call opens another. So does reaching the call's deadline
    /// with no answer's head ([`HeadWait`]).
    async fn send_h2(
        &self,
        ready: ReadyH2,
        request: Request<Empty<Bytes>>,
        body: BodyBounds,
    ) -> Result<Response<Bytes>, SendError> {
        let ReadyH2 {
            generation,
            mut sender,
        } = ready;
        self.h2.calls.fetch_add(1, Ordering::Relaxed);
        let forget_unless_reset = |err: &h2::Error| {
            if !err.is_reset() {
                self.h2.forget(generation);
            }
        };
        let (head, _empty) = request.into_parts();
        // Calls beyond the upstream's concurrent-stream limit wait inside h2, under the
        // call's deadline.
        let (answer, _no_body) = sender
            .send_request(Request::from_parts(head, ()), true)
            .map_err(|err| {
                forget_unless_reset(&err);
                SendError::NotSent(err)
            })?;
        let waiting = HeadWait::new(&self.h2, generation, body.deadline);
        let response = answer.await;
        waiting.answered();
        let response = response.map_err(|err| {
            forget_unless_reset(&err);
            SendError::Stream(err)
        })?;
        Ok(read_h2_body(response, body).await)
    }

    /// Sends `request` on `fresh` (a connection just opened for it), or on an idle
    /// pooled connection, or on a new one.
    async fn send_h1(
        &self,
        mut fresh: Option<H1Sender>,
        request: Request<Empty<Bytes>>,
        body: BodyBounds,
    ) -> Result<Response<Bytes>, SendError> {
        let mut request = into_origin_form(request, &self.host);
        // Bounded: each turn either uses up a pooled connection or ends.
        loop {
            let (mut sender, pooled) = match fresh.take() {
                Some(sender) => (sender, false),
                None => match self.h1.take_ready().await {
                    Some(sender) => (sender, true),
                    None => (Box::pin(self.connect_h1()).await?, false),
                },
            };
            match sender.try_send_request(request).await {
                Ok(response) => {
                    let (response, complete) = read_body(response, body).await;
                    // A connection whose answer was not read to the end cannot carry
                    // another call; hyper closes it once dropped.
                    if complete {
                        self.give_back(sender);
                    }
                    return Ok(response);
                }
                // The upstream closed an idle connection just before this request was
                // written: it never left, so it goes out on another connection and is
                // not an attempt (hyper-util's pool does the same).
                Err(mut err) => match err.take_message() {
                    Some(unsent) if pooled => request = unsent,
                    _ => return Err(SendError::Request(err.into_error())),
                },
            }
        }
    }

    fn give_back(&self, sender: H1Sender) {
        if self.h1.put(sender) && !self.h1.sweeping.swap(true, Ordering::Relaxed) {
            tokio::spawn(close_idle_h1(Arc::downgrade(&self.h1), self.idle_timeout));
        }
    }

    /// A new HTTP/1.1 connection, offering only `http/1.1` by ALPN.
    async fn connect_h1(&self) -> Result<H1Sender, SendError> {
        let stream = self.h1_connector.connect(self.origin.clone()).await;
        handshake_h1(stream.map_err(SendError::Connect)?).await
    }

    /// Opens the HTTP/2 connection, or learns from ALPN that the upstream speaks only
    /// HTTP/1.1 (and then this call goes on the connection that asked).
    async fn connect_first(&self) -> Result<Connected, SendError> {
        let seen = self.connects.load(Ordering::Acquire);
        let _turn = self.connecting.lock().await;
        // Whoever held the turn before may have connected, or learned it is HTTP/1.1.
        if let Some(open) = self.h2.open() {
            return Ok(Connected::Http2(open));
        }
        if self.http1_only.load(Ordering::Relaxed) {
            return Ok(Connected::Pool);
        }
        // Or tried while this call waited, and failed: that is this attempt's outcome too
        // (an unreachable upstream must not cost each queued call a connect_timeout).
        if let Some(failure) = self.failure_waited_for(seen) {
            return Err(SendError::Connect(ConnectError::Shared(failure)));
        }
        let connect = self.connects.fetch_add(1, Ordering::AcqRel) + 1;
        // If this future is dropped here (its call's deadline passed), nothing is
        // recorded: the next call finds an older connect's number beside any failure.
        let connected = self.open_first_connection().await;
        *lock_unpoisoned(&self.last_connect_failure) = match &connected {
            Err(err) => Some(NumberedFailure {
                connect,
                failure: SharedConnectFailure::of(err),
            }),
            Ok(_) => None,
        };
        connected
    }

    /// How the connect made while this call waited for its turn failed: the last one
    /// (no other runs while the turn is held), if it started after `seen` and ran to its
    /// end. A connect cut off mid-way left no outcome; the failure recorded then is an
    /// older connect's, which says nothing about this call's chances (it may even be a
    /// TLS failure, which is not retried), so the call connects itself.
    fn failure_waited_for(&self, seen: u64) -> Option<SharedConnectFailure> {
        let last = self.connects.load(Ordering::Acquire);
        if last == seen {
            return None;
        }
        let recorded = lock_unpoisoned(&self.last_connect_failure);
        recorded
            .as_ref()
            .filter(|recorded| recorded.connect == last)
            .map(|recorded| recorded.failure.clone())
    }

    /// Connects, and opens HTTP/2 on the connection or learns it is HTTP/1.1.
    async fn open_first_connection(&self) -> Result<Connected, SendError> {
        let stream = self.connector.connect(self.origin.clone()).await;
        let stream = stream.map_err(SendError::Connect)?;
        if !stream.connected().is_negotiated_h2() {
            tracing::info!(
                origin = %self.origin,
                "the upstream chose HTTP/1.1 by ALPN; calls use a keep-alive pool"
            );
            self.http1_only.store(true, Ordering::Relaxed);
            return Ok(Connected::Http1(handshake_h1(stream).await?));
        }
        let handshake = self.h2_builder.handshake(TokioIo::new(stream));
        let (sender, connection) = tokio::time::timeout(self.connector.timeout, handshake)
            .await
            .map_err(|_| SendError::Connect(ConnectError::TimedOut))?
            .map_err(|err| SendError::Connect(ConnectError::Handshake(err)))?;
        let ended = Arc::new(AtomicBool::new(false));
        tokio::spawn(drive_h2(connection, self.ping, Arc::clone(&ended)));
        let open = self.h2.install(sender, ended);
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

/// How much of an answer's body is read, and until when.
#[derive(Clone, Copy, Debug)]
pub(super) struct BodyBounds {
    /// At most this many bytes.
    pub limit: usize,
    /// The call's deadline: a head that arrived in time is not lost to a slow body.
    pub deadline: tokio::time::Instant,
}

/// Marks an answer whose body the call's deadline cut off (its head came in time).
#[derive(Clone, Copy, Debug)]
pub(super) struct BodyCutByDeadline;

/// Reads the body within `bounds`. The flag says whether it was read to the end; if not
/// (too long, broken, or too slow), the body is empty: the status is what matters, and a
/// broken error body is not worth a retry. A body cut by the deadline is marked with
/// [`BodyCutByDeadline`].
async fn read_body(response: Response<Incoming>, bounds: BodyBounds) -> (Response<Bytes>, bool) {
    let (parts, body) = response.into_parts();
    let read = async {
        let collected = Limited::new(body, bounds.limit).collect().await.ok()?;
        Some(collected.to_bytes())
    };
    within_deadline(parts, bounds.deadline, read).await
}

/// [`read_body`] for an HTTP/2 answer. Every chunk read is handed back to the
/// stream's flow control, so a body never waits for window updates.
async fn read_h2_body(response: Response<h2::RecvStream>, bounds: BodyBounds) -> Response<Bytes> {
    let (parts, mut body) = response.into_parts();
    let read = async {
        let mut collected = BytesMut::new();
        while let Some(chunk) = body.data().await {
            let chunk = chunk.ok()?;
            let _ = body.flow_control().release_capacity(chunk.len());
            if collected.len() + chunk.len() > bounds.limit {
                return None;
            }
            collected.extend_from_slice(&chunk);
        }
        Some(collected.freeze())
    };
    within_deadline(parts, bounds.deadline, read).await.0
}

/// The answer with the body `read` gives by `deadline` (`None`: too long or broken),
/// and whether the body was read to the end. Empty if not; marked with
/// [`BodyCutByDeadline`] if the deadline cut it.
async fn within_deadline(
    parts: http::response::Parts,
    deadline: tokio::time::Instant,
    read: impl std::future::Future<Output = Option<Bytes>>,
) -> (Response<Bytes>, bool) {
    match tokio::time::timeout_at(deadline, read).await {
        Ok(Some(body)) => (Response::from_parts(parts, body), true),
        Ok(None) => (Response::from_parts(parts, Bytes::new()), false),
        Err(_elapsed) => {
            let mut cut = Response::from_parts(parts, Bytes::new());
            cut.extensions_mut().insert(BodyCutByDeadline);
            (cut, false)
        }
    }
}

/// A connect's failure, and which connect it was (its number in `Transport::connects`).
struct NumberedFailure {
    connect: u64,
    failure: SharedConnectFailure,
}

/// Where a call goes.
enum Connected {
    Http2(OpenH2),
    /// The HTTP/1.1 pool.
    Pool,
    /// The connection that asked for `h2` and got HTTP/1.1: it carries this call, then
    /// joins the pool.
    Http1(H1Sender),
}

impl Connected {
    /// The HTTP/1.1 connection a call goes on: `None` for the pool.
    fn into_h1(self) -> Option<H1Sender> {
        match self {
            Connected::Http1(sender) => Some(sender),
            Connected::Http2(_) | Connected::Pool => None,
        }
    }
}

/// An HTTP/1.1 request line carries only the path; the authority goes in `Host`.
fn into_origin_form(
    mut request: Request<Empty<Bytes>>,
    host: &HeaderValue,
) -> Request<Empty<Bytes>> {
    let path = request
        .uri()
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    *request.uri_mut() = Uri::from(path);
    request
        .headers_mut()
        .entry(HOST)
        .or_insert_with(|| host.clone());
    request
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::BaseUrl;
    use crate::simulator::{generate_pki, Simulator, SimulatorConfig};
    use rustls::pki_types::CertificateDer;
    use std::sync::mpsc::{Receiver, Sender};

    /// A transport to a TLS simulator that offers `h2` (or only HTTP/1.1), closing idle
    /// connections after `idle`.
    async fn transport(idle: Duration, http2: bool) -> (Simulator, Transport) {
        let (sim, ca) = simulator(http2).await;
        let mut transport = transport_to(&sim.base_url(), vec![ca]);
        transport.idle_timeout = idle;
        (sim, transport)
    }

    /// A TLS simulator for `localhost` and 127.0.0.1, and its CA.
    async fn simulator(http2: bool) -> (Simulator, CertificateDer<'static>) {
        let pki = generate_pki(&["localhost", "127.0.0.1"]).expect("pki");
        let mut config = SimulatorConfig::new("MAIDLE", "token");
        config.tls = Some(pki.server_tls());
        config.http2 = http2;
        // Every call ends the same name, and every answer is 204.
        config.liveness = crate::simulator::Liveness::AllNames { forget_ended: true };
        let sim = Simulator::start(config).await.expect("simulator");
        (sim, pki.ca_cert_der())
    }

    fn test_bounds() -> BodyBounds {
        BodyBounds {
            limit: 1024,
            deadline: tokio::time::Instant::now() + Duration::from_secs(5),
        }
    }

    fn transport_to(base_url: &str, extra_roots: Vec<CertificateDer<'static>>) -> Transport {
        let settings = UpstreamSettings {
            base_url: BaseUrl::try_from(base_url).expect("base url"),
            ca_file: None,
            extra_roots,
            connect_timeout: Duration::from_secs(2),
            timeout: Duration::from_secs(5),
            max_attempts: 1,
        };
        let tls = super::super::client_tls_config(&settings).expect("tls");
        Transport::new(&settings, tls)
    }

    fn delete_request(sim: &Simulator) -> Request<Empty<Bytes>> {
        let uri = format!(
            "{}/v1/Account/MAIDLE/MultiPartyCall/name_idle/",
            sim.base_url()
        );
        Request::delete(uri)
            .header(http::header::AUTHORIZATION, "Basic TUFJRExFOnRva2Vu")
            .body(Empty::new())
            .expect("request")
    }

    async fn call(sim: &Simulator, transport: &Transport) -> http::Version {
        let response = transport
            .send(delete_request(sim), test_bounds())
            .await
            .expect("answered");
        assert_eq!(response.status(), 204);
        response.version()
    }

    #[tokio::test]
    async fn an_idle_http2_connection_is_closed_and_the_next_call_opens_another() {
        let idle = Duration::from_millis(500);
        let (sim, transport) = transport(idle, true).await;
        // Calls far more often than `idle` keep the connection (a stall of a whole
        // `idle` on a loaded machine would be needed to lose it).
        for _ in 0..15 {
            assert_eq!(call(&sim, &transport).await, http::Version::HTTP_2);
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

    /// A TCP relay to `target` whose connections stop carrying bytes, in both
    /// directions and without closing, once `silent` is set: a peer that vanished
    /// without a reset (a NAT or load balancer that forgot the connection).
    async fn relay_that_can_go_silent(target: std::net::SocketAddr) -> (u16, Arc<AtomicBool>) {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let silent = Arc::new(AtomicBool::new(false));
        let switch = Arc::clone(&silent);
        tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let Ok(outbound) = TcpStream::connect(target).await else {
                    return;
                };
                let (in_read, in_write) = inbound.into_split();
                let (out_read, out_write) = outbound.into_split();
                for (mut from, mut to) in [(in_read, out_write), (out_read, in_write)] {
                    let silent = Arc::clone(&switch);
                    tokio::spawn(async move {
                        let mut buf = vec![0u8; 16 * 1024];
                        while let Ok(n @ 1..) = from.read(&mut buf).await {
                            if silent.load(Ordering::SeqCst) {
                                // Holds both sockets open and carries nothing more.
                                return std::future::pending().await;
                            }
                            if to.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    });
                }
            }
        });
        (port, silent)
    }

    /// Also: a call on a connection that has failed is not sent there, and goes out on a
    /// new connection in the same attempt.
    #[tokio::test]
    async fn an_http2_connection_that_stops_answering_pings_is_closed() {
        let (sim, ca) = simulator(true).await;
        let (port, silent) = relay_that_can_go_silent(sim.local_addr()).await;
        let mut transport = transport_to(&format!("https://localhost:{port}"), vec![ca]);
        transport.ping = KeepAlive {
            interval: Duration::from_millis(100),
            timeout: Duration::from_millis(300),
        };
        assert_eq!(call(&sim, &transport).await, http::Version::HTTP_2);
        // Answered pings keep an idle connection.
        tokio::time::sleep(Duration::from_millis(600)).await;
        let stale = transport.h2.open().expect("pings answered: kept");
        silent.store(true, Ordering::SeqCst);
        // The next ping is unanswered: closed after at most interval + timeout.
        let closed = async {
            while transport.h2.open().is_some() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(3), closed)
            .await
            .expect("the silent connection is given up");
        assert_eq!(sim.connection_count(), 1);
        // A call that still took the closed connection is refused before anything is
        // sent, and so may go out again on another connection.
        let refused = transport
            .ready(stale.clone())
            .await
            .err()
            .expect("the connection is closed");
        assert!(matches!(refused, SendError::NotSent(_)), "{refused:?}");
        assert!(refused.is_unsent());
        // New connections through the relay carry bytes again.
        silent.store(false, Ordering::SeqCst);
        assert_eq!(call(&sim, &transport).await, http::Version::HTTP_2);
        assert_eq!(sim.connection_count(), 2, "the next call opened a new one");

        // A call that finds the connection in use failed, before its task noticed (a
        // GOAWAY racing the call): it goes out on a new connection, in the same attempt.
        transport
            .h2
            .install(stale.sender, Arc::new(AtomicBool::new(false)));
        assert_eq!(call(&sim, &transport).await, http::Version::HTTP_2);
        assert_eq!(sim.connection_count(), 3, "sent on a new connection");
        sim.shutdown().await;
    }

    /// The upstream vanished without a reset (the relay goes silent): a call that reaches
    /// its deadline with no answer's head retires the HTTP/2 connection, so the next call
    /// goes on a new one instead of hanging on the dead one until the pings notice. A
    /// call dropped before its deadline (its caller went away) keeps the connection.
    #[tokio::test]
    async fn a_call_with_no_answer_at_its_deadline_retires_the_http2_connection() {
        let (sim, ca) = simulator(true).await;
        let (port, silent) = relay_that_can_go_silent(sim.local_addr()).await;
        let transport = transport_to(&format!("https://localhost:{port}"), vec![ca]);
        assert_eq!(call(&sim, &transport).await, http::Version::HTTP_2);

        // Dropped long before its deadline: the connection stays.
        sim.push_fault(crate::simulator::Fault::Hang);
        let abandoned = transport.send(delete_request(&sim), test_bounds());
        let abandoned = tokio::time::timeout(Duration::from_millis(200), abandoned).await;
        assert!(abandoned.is_err(), "the hung stream gave no answer");
        assert_eq!(call(&sim, &transport).await, http::Version::HTTP_2);
        assert_eq!(sim.connection_count(), 1, "kept after a caller went away");

        silent.store(true, Ordering::SeqCst);
        let deadline = tokio::time::Instant::now() + Duration::from_millis(300);
        let bounds = BodyBounds {
            limit: 1024,
            deadline,
        };
        let cut = tokio::time::timeout_at(deadline, transport.send(delete_request(&sim), bounds));
        assert!(cut.await.is_err(), "no answer through the silent relay");
        silent.store(false, Ordering::SeqCst);
        let next = tokio::time::timeout(Duration::from_secs(2), call(&sim, &transport))
            .await
            .expect("the next call is not held up by the silent connection");
        assert_eq!(next, http::Version::HTTP_2);
        assert_eq!(sim.connection_count(), 2, "the next call opened a new one");
        sim.shutdown().await;
    }

    #[tokio::test]
    async fn http1_calls_reuse_a_pooled_connection_until_it_idles_out() {
        let idle = Duration::from_millis(500);
        let (sim, transport) = transport(idle, false).await;
        for _ in 0..15 {
            assert_eq!(call(&sim, &transport).await, http::Version::HTTP_11);
            tokio::time::sleep(idle / 10).await;
        }
        assert_eq!(sim.connection_count(), 1, "the ALPN connection, reused");
        assert_eq!(transport.h1.idle_count(), 1, "back in the pool");
        // Two idle periods without a call close it.
        tokio::time::sleep(idle * 2 + idle / 2).await;
        assert_eq!(transport.h1.idle_count(), 0, "idle: closed");
        call(&sim, &transport).await;
        assert_eq!(sim.connection_count(), 2, "the next call opened a new one");
        sim.shutdown().await;
    }

    #[tokio::test]
    async fn http1_concurrent_calls_each_get_a_connection_and_all_are_kept() {
        let (sim, transport) = transport(IDLE_TIMEOUT, false).await;
        call(&sim, &transport).await;
        sim.push_fault(crate::simulator::Fault::Delay(Duration::from_millis(200)));
        sim.push_fault(crate::simulator::Fault::Delay(Duration::from_millis(200)));
        sim.push_fault(crate::simulator::Fault::Delay(Duration::from_millis(200)));
        // Three at once: the pooled connection and two new ones.
        let (a, b, c) = tokio::join!(
            call(&sim, &transport),
            call(&sim, &transport),
            call(&sim, &transport)
        );
        assert_eq!([a, b, c], [http::Version::HTTP_11; 3]);
        assert_eq!(sim.connection_count(), 3);
        assert_eq!(transport.h1.idle_count(), 3, "every connection kept");
        for _ in 0..5 {
            call(&sim, &transport).await;
        }
        assert_eq!(sim.connection_count(), 3, "later calls reuse them");
        sim.shutdown().await;
    }

    /// A call dropped while waiting for its answer (its deadline passed) takes its
    /// HTTP/1.1 connection with it: the connection is given back only once an answer has
    /// been read, so the next call opens a new one.
    #[tokio::test]
    async fn http1_connection_of_a_call_cut_off_without_an_answer_is_not_reused() {
        let (sim, transport) = transport(IDLE_TIMEOUT, false).await;
        call(&sim, &transport).await;
        assert_eq!(transport.h1.idle_count(), 1);
        sim.push_fault(crate::simulator::Fault::Hang);
        let cut = transport.send(delete_request(&sim), test_bounds());
        let cut = tokio::time::timeout(Duration::from_millis(200), cut).await;
        assert!(cut.is_err(), "no answer");
        assert_eq!(transport.h1.idle_count(), 0, "not given back");
        call(&sim, &transport).await;
        assert_eq!(sim.connection_count(), 2, "the next call opened a new one");
        sim.shutdown().await;
    }

    #[tokio::test]
    async fn http1_connection_the_upstream_closes_is_not_reused() {
        let (sim, transport) = transport(IDLE_TIMEOUT, false).await;
        call(&sim, &transport).await;
        // `Connection: close` on this answer.
        sim.push_fault(crate::simulator::Fault::GoAway);
        call(&sim, &transport).await;
        call(&sim, &transport).await;
        call(&sim, &transport).await;
        assert_eq!(
            sim.connection_count(),
            2,
            "one connection until the close, one after"
        );
        sim.shutdown().await;
    }

    /// A plain-HTTP upstream on a std thread, so it runs while the test's runtime is
    /// blocked. Answers every request `204` with keep-alive; its first connection is
    /// closed (FIN) when `close_first` sends it a channel, on which it then says so.
    /// Returns the port and the connection count.
    fn closing_upstream(close_first: Receiver<Sender<()>>) -> (u16, Arc<AtomicU64>) {
        use std::io::{BufRead, BufReader, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let connections = Arc::new(AtomicU64::new(0));
        let counted = Arc::clone(&connections);
        std::thread::spawn(move || {
            let mut close_first = Some(close_first);
            for stream in listener.incoming().take(4) {
                let Ok(mut stream) = stream else { return };
                let first = counted.fetch_add(1, Ordering::Relaxed) == 0;
                let close = if first { close_first.take() } else { None };
                std::thread::spawn(move || {
                    let mut reader = BufReader::new(stream.try_clone().expect("clone"));
                    loop {
                        let mut line = String::new();
                        // One request head: lines up to the blank one.
                        loop {
                            line.clear();
                            match reader.read_line(&mut line) {
                                Ok(0) | Err(_) => return,
                                Ok(_) if line == "\r\n" => break,
                                Ok(_) => {}
                            }
                        }
                        let answer = b"HTTP/1.1 204 No Content\r\n\r\n";
                        if stream.write_all(answer).is_err() {
                            return;
                        }
                        if let Some(close) = &close {
                            let Ok(closed) = close.recv_timeout(Duration::from_secs(5)) else {
                                return;
                            };
                            // On loopback the FIN is in the peer's socket once this returns.
                            let _ = stream.shutdown(std::net::Shutdown::Both);
                            let _ = closed.send(());
                            return;
                        }
                    }
                });
            }
        });
        (port, connections)
    }

    /// The upstream closes an idle pooled connection at the moment a call takes it: the
    /// FIN is in the socket, but the connection task has not run (here: the runtime is
    /// blocked), so the connection still looks ready. hyper writes the request and
    /// reads the close: the attempt fails as a reset, which the caller's retry policy
    /// retries, and the next call goes on a new connection.
    #[tokio::test]
    async fn http1_connection_closed_as_a_call_takes_it_fails_as_a_retriable_reset() {
        let (close, close_first) = std::sync::mpsc::channel();
        let (port, connections) = closing_upstream(close_first);
        let transport = transport_to(&format!("http://127.0.0.1:{port}"), Vec::new());
        let send = || {
            let request = Request::delete(format!("http://127.0.0.1:{port}/v1/x/"))
                .body(Empty::new())
                .expect("request");
            transport.send(request, test_bounds())
        };
        assert_eq!(send().await.expect("first call").status(), 204);
        assert_eq!(transport.h1.idle_count(), 1, "pooled");
        // Blocks the runtime while the upstream closes: the FIN arrives, but the
        // connection task cannot see it.
        let (closed, is_closed) = std::sync::mpsc::channel();
        close.send(closed).expect("signal");
        is_closed
            .recv_timeout(Duration::from_secs(5))
            .expect("upstream closed the connection");
        let err = send().await.expect_err("written to a closed connection");
        assert!(
            matches!(err.retry_class(), super::super::Attempt::Retriable),
            "{err:?} is retried like a reset"
        );
        assert_eq!(send().await.expect("third call").status(), 204);
        assert_eq!(
            connections.load(Ordering::Relaxed),
            2,
            "on a new connection"
        );
    }

    /// Whether `connect_first` ended without being cut off, and how.
    type Outcome = Result<(), SendError>;

    fn connect_first_in_a_task(transport: &Arc<Transport>) -> tokio::task::JoinHandle<Outcome> {
        let transport = Arc::clone(transport);
        tokio::spawn(async move { transport.connect_first().await.map(|_| ()) })
    }

    /// The next connection the test upstream accepted, if one comes within 2 s.
    async fn next_connection(
        connections: &mut tokio::sync::mpsc::UnboundedReceiver<TcpStream>,
    ) -> Option<TcpStream> {
        let next = connections.recv();
        tokio::time::timeout(Duration::from_secs(2), next)
            .await
            .ok()
            .flatten()
    }

    /// Runs every other task that is ready (on this single-threaded runtime) until it
    /// waits.
    async fn let_others_run() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    /// A connect whose call is dropped mid-way leaves no outcome: a call queued behind it
    /// must not take an older connect's failure (here a TLS failure, which is not
    /// retried) as its own, and connects itself.
    #[tokio::test]
    async fn a_call_queued_behind_a_cancelled_connect_connects_itself() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let (accepted, mut connections) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                if accepted.send(stream).is_err() {
                    return;
                }
            }
        });
        let transport = Arc::new(transport_to(&format!("https://127.0.0.1:{port}"), vec![]));

        // Connect 1 is under way; A and then B queue behind it.
        let first = connect_first_in_a_task(&transport);
        let mut not_tls = next_connection(&mut connections).await.expect("connect 1");
        let cancelled = connect_first_in_a_task(&transport);
        let_others_run().await;
        let queued = connect_first_in_a_task(&transport);
        let_others_run().await;
        // Connect 1 fails in TLS.
        tokio::io::AsyncWriteExt::write_all(&mut not_tls, b"HTTP/1.1 400 Bad\r\n\r\n")
            .await
            .expect("write");
        drop(not_tls);
        let failed = first.await.expect("task").expect_err("connect 1 fails");
        assert!(failed.is_tls(), "{failed:?}");
        // A's connect (2) starts, and A's call is dropped before it ends.
        let _hanging = next_connection(&mut connections).await.expect("connect 2");
        cancelled.abort();
        assert!(cancelled.await.is_err_and(|err| err.is_cancelled()));
        // B waited for connect 2, which has no outcome: B makes connect 3.
        let own = next_connection(&mut connections).await;
        assert!(own.is_some(), "the queued call connected itself");
        drop(own);
        let outcome = queued.await.expect("task");
        assert!(
            !matches!(outcome, Err(SendError::Connect(ConnectError::Shared(_)))),
            "{outcome:?}"
        );
    }

    /// The request line's target and `Host` of `path` on `base`, over HTTP/1.1.
    fn origin_form(base: &str, path: &str) -> (String, Option<String>) {
        let base = BaseUrl::try_from(base).expect("base url");
        let uri = format!("{base}{path}");
        let request = Request::get(uri).body(Empty::new()).expect("request");
        let request = into_origin_form(request, base.host_header());
        let host = request
            .headers()
            .get(HOST)
            .map(|h| h.to_str().expect("ascii").to_owned());
        (request.uri().to_string(), host)
    }

    #[test]
    fn origin_form_moves_the_authority_to_host_without_a_default_port() {
        assert_eq!(
            origin_form(
                "https://api.plivo.com",
                "/v1/Account/MA1/MultiPartyCall/name_a/"
            ),
            (
                "/v1/Account/MA1/MultiPartyCall/name_a/".to_owned(),
                Some("api.plivo.com".to_owned())
            )
        );
        assert_eq!(
            origin_form("https://api.plivo.com:443", "/v1/"),
            ("/v1/".to_owned(), Some("api.plivo.com".to_owned()))
        );
        assert_eq!(
            origin_form("https://127.0.0.1:8443", "/v1/?q=1"),
            ("/v1/?q=1".to_owned(), Some("127.0.0.1:8443".to_owned()))
        );
        assert_eq!(
            origin_form("http://localhost:443", "/"),
            ("/".to_owned(), Some("localhost:443".to_owned()))
        );
    }
}
