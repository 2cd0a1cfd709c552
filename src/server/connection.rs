//! Serving the data listener: the accept loop and its drain ([`serve_data`]), and each
//! accepted connection from its first byte to its close: the TLS handshake or the version
//! sniff, hyper's HTTP/1.1 or HTTP/2 connection with the gateway as its service (each
//! HTTP/2 request detached into its own task), the first head's deadline, HTTP/2's idle
//! timeout, the graceful close of a TLS connection whose client CAs a reload replaced,
//! the lingering close that follows every one of them (see [`super::linger`]), and the
//! count of what the HTTP layer ended itself ([`Rejection`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::header::AUTHORIZATION;
use http::Request;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tower::ServiceBuilder;
use tower_http::sensitive_headers::SetSensitiveRequestHeadersLayer;

use crate::gateway::{Gateway, Peer, MAX_HEADER_FIELDS};
use crate::problem::Problem;
use crate::request_id::{RequestId, X_REQUEST_ID};
use crate::routes::Flavor;
use crate::telemetry::Metrics;
use crate::tls::{ClientCertificate, ClientTrust};

use super::accept::accept_within;
use super::drain::{Drain, Superseded, Watcher};
use super::head::fit_to_method;
use super::idle::{FirstHead, H2Activity};
use super::linger::{linger, HandBack};
use super::rejection::Rejection;
use super::sniff::{sniff_version, HttpVersion, NoVersion};
use super::{
    FORCED_CLOSE_WAIT, H2_IDLE_TIMEOUT, H2_MAX_CONCURRENT_STREAMS, H2_MAX_HEADER_LIST_BYTES,
    HEADER_READ_TIMEOUT, MAX_CONNECTIONS, MAX_H2_STREAMS_IN_PROGRESS, MAX_HEAD_BYTES,
};

/// Accepts data connections and serves each in its own task until `stop` says so; then
/// drains them within `grace` (see [`Drain`]).
pub(super) async fn serve_data(
    listener: TcpListener,
    gateway: Gateway,
    mut stop: watch::Receiver<bool>,
    grace: Duration,
) {
    let builders = Arc::new(Builders::new());
    let drain = Drain::new();
    let connections = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let h2_streams = Arc::new(Semaphore::new(MAX_H2_STREAMS_IN_PROGRESS));
    loop {
        let accepted = tokio::select! {
            accepted = accept_within(&listener, &connections, "data") => accepted,
            _ = stop.changed() => break,
        };
        let Some((permit, stream, peer)) = accepted else {
            break;
        };
        let _ = stream.set_nodelay(true);
        let connection = Connection {
            gateway: gateway.clone(),
            builders: Arc::clone(&builders),
            watcher: drain.watcher(),
            requests_watcher: drain.watcher(),
            h2_streams: Arc::clone(&h2_streams),
            peer,
        };
        // When `shutdown_grace` runs out, every connection still open is dropped, here
        // and now, as the process exit would drop it.
        let closing = drain.watcher();
        tokio::spawn(async move {
            let metrics = Arc::clone(connection.gateway.metrics());
            metrics.connection_opened();
            if !closing.until_closed(connection.serve(stream)).await {
                tracing::debug!(%peer, "connection closed at the end of shutdown_grace");
            }
            metrics.connection_closed();
            drop(permit);
        });
    }
    drop(listener);
    let drained = drain.finish();
    tokio::pin!(drained);
    tokio::select! {
        () = &mut drained => {}
        () = tokio::time::sleep(grace) => {
            tracing::warn!("shutdown_grace elapsed with requests still in flight; closing their connections");
            drain.close();
            // Each connection sees that at its next turn; what its requests write on the
            // way out must reach the log before it closes. Detached HTTP/2 requests may
            // still be with Plivo: not waited for, their results are the drain's.
            let _ = tokio::time::timeout(FORCED_CLOSE_WAIT, drained).await;
        }
    }
}

/// The HTTP/1.1 and HTTP/2 connection builders. Each speaks one version only: the
/// version is chosen before hyper sees the connection (see [`sniff_version`]), so a
/// client that sends nothing meets a timeout instead of hyper-util's untimed sniffing.
struct Builders {
    http1: auto::Builder<TokioExecutor>,
    http2: auto::Builder<TokioExecutor>,
}

impl Builders {
    fn new() -> Builders {
        Builders {
            http1: http_builder().http1_only(),
            http2: http_builder().http2_only(),
        }
    }

    fn for_version(&self, version: HttpVersion) -> &auto::Builder<TokioExecutor> {
        match version {
            HttpVersion::Http1 => &self.http1,
            HttpVersion::Http2 => &self.http2,
        }
    }
}

/// Both versions' settings: the limits and timers every data connection is held to.
fn http_builder() -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_HEAD_BYTES)
        // Envoy's default too; up to 100, hyper parses a head without allocating.
        .max_headers(MAX_HEADER_FIELDS)
        // A caller that closes its side mid-request must not cancel the request: once
        // the forward record is written, the upstream call and its result record must
        // finish. (Without this hyper reads mid-request to notice the close, and drops the
        // request when it does; that read also cost an 8 KiB buffer per request.)
        .half_close(true)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(H2_MAX_CONCURRENT_STREAMS)
        .max_header_list_size(H2_MAX_HEADER_LIST_BYTES)
        .keep_alive_interval(Some(Duration::from_secs(30)));
    builder
}

/// One accepted data connection.
struct Connection {
    gateway: Gateway,
    builders: Arc<Builders>,
    /// Keeps the drain waiting for this connection.
    watcher: Watcher,
    /// Keeps the drain waiting for the connection's detached HTTP/2 requests.
    requests_watcher: Watcher,
    /// The HTTP/2 streams in progress on all connections; see
    /// [`MAX_H2_STREAMS_IN_PROGRESS`].
    h2_streams: Arc<Semaphore>,
    peer: SocketAddr,
}

impl Connection {
    /// Plain HTTP, or TLS first when `listen_tls` is set; the acceptor is read per
    /// connection so certificates re-read on SIGHUP apply to new connections, and a
    /// reload that replaces the client CAs also has this one finish what it serves and
    /// close.
    async fn serve(self, stream: TcpStream) {
        let metrics = Arc::clone(self.gateway.metrics());
        // The version sniff or the TLS handshake, and the first request head, all within
        // the header timeout of the accept.
        let head_deadline = Instant::now() + HEADER_READ_TIMEOUT;
        let Some(tls) = self.gateway.data_tls() else {
            let version = match sniff_version(&stream, head_deadline).await {
                Ok(version) => version,
                Err(NoVersion::TimedOut) => return metrics.http_rejected(Rejection::HeaderTimeout),
                // A TCP probe (load balancer, kubelet): nothing was refused.
                Err(NoVersion::Closed) => return,
            };
            let (stream, returned) = HandBack::new(stream);
            let result = self
                .serve_http(TokioIo::new(stream), version, None, head_deadline, None)
                .await;
            record_result(&metrics, result);
            return linger(returned).await;
        };
        let handshake = tokio::time::timeout_at(head_deadline, tls.acceptor.accept(stream));
        let stream = match handshake.await {
            Ok(Ok(stream)) => stream,
            Ok(Err(err)) => {
                tracing::debug!(peer = %self.peer, error = %err, "TLS handshake failed");
                metrics.http_rejected(Rejection::TlsHandshake);
                return;
            }
            Err(_) => {
                metrics.http_rejected(Rejection::TlsHandshake);
                return;
            }
        };
        let session = stream.get_ref().1;
        let version = match session.alpn_protocol() {
            Some(b"h2") => HttpVersion::Http2,
            _ => HttpVersion::Http1,
        };
        let certificate = ClientCertificate::from_peer(session.peer_certificates());
        let (stream, returned) = HandBack::new(stream);
        let superseded = trust_replaced(tls.trust_changed);
        let result = self
            .serve_http(
                TokioIo::new(stream),
                version,
                certificate,
                head_deadline,
                Some(superseded),
            )
            .await;
        record_result(&metrics, result);
        linger(returned).await;
    }

    /// Serves requests until the connection ends; closes it at `head_deadline` if no
    /// request head has arrived by then, and gracefully once `superseded` completes.
    async fn serve_http<I>(
        self,
        io: I,
        version: HttpVersion,
        certificate: Option<ClientCertificate>,
        head_deadline: Instant,
        superseded: Option<Superseded>,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>>
    where
        I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    {
        let detach = match version {
            HttpVersion::Http1 => None,
            HttpVersion::Http2 => Some(H2Requests {
                watcher: Arc::new(self.requests_watcher),
                activity: Arc::new(H2Activity::new()),
                slots: self.h2_streams,
            }),
        };
        let activity = detach.as_ref().map(|h2| Arc::clone(&h2.activity));
        let first_head = Arc::new(FirstHead::default());
        let service = data_service(
            &self.gateway,
            self.peer,
            certificate,
            detach,
            Arc::clone(&first_head),
        );
        let superseded =
            superseded.map(|superseded| after_first_head(superseded, &first_head, head_deadline));
        let builder = self.builders.for_version(version);
        let connection = builder.serve_connection(io, service).into_owned();
        let mut served = std::pin::pin!(self.watcher.graceful(connection, superseded));
        tokio::select! {
            // hyper's own header timer, started a little later, can be due in the same
            // tick: the first head's deadline is this one, and decides how it is counted.
            biased;
            arrived = first_head.arrives_before(head_deadline) => {
                if !arrived {
                    // Counted before the return drops the connection (which closes it),
                    // so a client that sees the close finds the count already there.
                    self.gateway.metrics().http_rejected(Rejection::HeaderTimeout);
                    return Ok(());
                }
            }
            result = &mut served => return result,
        }
        let Some(activity) = activity else {
            return served.await;
        };
        tokio::select! {
            result = &mut served => result,
            () = activity.idle_for(H2_IDLE_TIMEOUT) => {
                // No request in flight, and the last answer went out long ago: dropping
                // the connection loses nothing.
                tracing::debug!(peer = %self.peer, "closing an idle HTTP/2 connection");
                Ok(())
            }
        }
    }
}

/// `superseded`, held until the connection's first request head has arrived (or its
/// deadline passed). A client whose handshake overlapped a client-CA reload has already
/// sent its first request; closing the connection before hyper reads it would drop that
/// request unanswered (an empty reply, which a caller cannot tell from a lost answer).
/// Held, the request is served and answered, and the connection closes after it.
fn after_first_head(
    superseded: Superseded,
    first_head: &Arc<FirstHead>,
    head_deadline: Instant,
) -> Superseded {
    let first_head = Arc::clone(first_head);
    Box::pin(async move {
        superseded.await;
        first_head.arrives_before(head_deadline).await;
    })
}

/// Completes at the first reload after `trust_changed` was taken that changes which
/// client certificates are accepted.
fn trust_replaced(mut trust_changed: watch::Receiver<Option<ClientTrust>>) -> Superseded {
    Box::pin(async move {
        if trust_changed.changed().await.is_err() {
            // The gateway is gone; the drain closes the connection.
            std::future::pending::<()>().await;
        }
    })
}

/// What each HTTP/2 request's task holds: the drain waits for it, the idle timer
/// counts it as activity, and it has one of the process's stream slots.
#[derive(Clone)]
struct H2Requests {
    watcher: Arc<Watcher>,
    activity: Arc<H2Activity>,
    slots: Arc<Semaphore>,
}

/// How a stream is refused when every stream slot is taken: `RST_STREAM` with
/// `REFUSED_STREAM`, which tells the client the request was not processed at all and may
/// be sent again (RFC 9113 §8.7). hyper resets a stream with the reason of the error its
/// service returns.
fn refused_stream() -> h2::Error {
    h2::Error::from(h2::Reason::REFUSED_STREAM)
}

/// Counts the error a served connection ended with, if it ended with one.
fn record_result(metrics: &Metrics, result: Result<(), Box<dyn std::error::Error + Send + Sync>>) {
    if let Err(err) = result {
        let rejection = Rejection::of_connection_error(err.as_ref());
        metrics.http_rejected(rejection);
        tracing::debug!(kind = rejection.as_str(), error = %err, "connection ended with an error");
    }
}

/// The data listener's per-connection service, in request order.
///
/// With `detach` (HTTP/2), each request runs as its own task: a caller can cancel an
/// HTTP/2 stream, and hyper then drops the stream's service future, but a request must
/// finish (its upstream call and its audit record) whatever the caller does. The task
/// holds the watcher, so the drain waits for it as for a connection. HTTP/1.1 needs no
/// task: with `half_close`, hyper never drops a request mid-flight.
///
/// Every answer leaves fitted to its request's method ([`fit_to_method`]): an answer to
/// `HEAD` has no content, whichever HTTP version carries it.
fn data_service(
    gateway: &Gateway,
    addr: SocketAddr,
    certificate: Option<ClientCertificate>,
    detach: Option<H2Requests>,
    first_head: Arc<FirstHead>,
) -> TowerToHyperService<
    impl tower::Service<
            Request<Incoming>,
            Response = http::Response<http_body_util::Full<bytes::Bytes>>,
            Error = h2::Error,
            Future = impl Send,
        > + Clone,
> {
    let gateway = gateway.clone();
    let peer = Arc::new(Peer::new(addr, certificate));
    // The request id is read by the gateway itself (`Trail::new`) and put on every reply
    // it builds (`Gateway::respond`).
    let stack = ServiceBuilder::new()
        .layer(SetSensitiveRequestHeadersLayer::new([AUTHORIZATION]))
        .service_fn(move |request: Request<Incoming>| {
            first_head.arrive();
            let peer = Arc::clone(&peer);
            let gateway = gateway.clone();
            let detach = detach.clone();
            // Counted from here, before the task exists, so the idle timer never sees a
            // gap between the head's arrival and the request.
            let in_flight = detach.as_ref().map(|h2| h2.activity.begin());
            let slot = detach.as_ref().map(|h2| stream_slot(h2, &gateway));
            let method = request.method().clone();
            let answered = async move {
                let Some(H2Requests { watcher, .. }) = detach else {
                    return Ok(gateway.handle(request, &peer).await);
                };
                let Some(Ok(slot)) = slot else {
                    return Err(refused_stream());
                };
                // For the reply if the task is cancelled (the request goes with it).
                let caller_id = request.headers().get(&X_REQUEST_ID).cloned();
                let detached = tokio::spawn(async move {
                    let _drain_waits = watcher;
                    let _busy = in_flight;
                    let _slot = slot;
                    gateway.handle(request, &peer).await
                });
                match detached.await {
                    Ok(response) => Ok(response),
                    // A panic: pass it on as if the request had run inline.
                    Err(err) if err.is_panic() => std::panic::resume_unwind(err.into_panic()),
                    // Cancelled: only by the runtime shutting down, when no one reads this.
                    Err(_) => Ok(shutting_down(caller_id.as_ref())),
                }
            };
            async move {
                let response = answered.await?;
                Ok(fit_to_method(&method, response))
            }
        });
    TowerToHyperService::new(stack)
}

/// One of the process's HTTP/2 stream slots for a new stream, or `Err` (counted) when
/// all are taken.
fn stream_slot(h2: &H2Requests, gateway: &Gateway) -> Result<OwnedSemaphorePermit, ()> {
    Arc::clone(&h2.slots).try_acquire_owned().map_err(|_| {
        gateway.metrics().http_rejected(Rejection::StreamsExhausted);
    })
}

/// The reply to a request whose task the runtime cancelled while shutting down: the
/// caller's id when it sent a valid one, else a fresh one.
fn shutting_down(
    caller_id: Option<&http::HeaderValue>,
) -> http::Response<http_body_util::Full<bytes::Bytes>> {
    let (id, header) = RequestId::from_header(caller_id).into_parts();
    let mut response = Problem::ShuttingDown.to_response(&id, Flavor::Native);
    response.headers_mut().insert(X_REQUEST_ID.clone(), header);
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reply to a request cancelled by shutdown names the caller's id when it sent a
    /// valid one, else a fresh one; the header and the body agree.
    #[tokio::test]
    async fn a_request_cancelled_by_shutdown_is_answered_with_its_id() {
        use http_body_util::BodyExt as _;
        let caller = http::HeaderValue::from_static("caller-7");
        for (sent, expect_caller) in [(Some(&caller), true), (None, false)] {
            let reply = shutting_down(sent);
            assert_eq!(reply.status(), http::StatusCode::SERVICE_UNAVAILABLE);
            let header = reply.headers()[&X_REQUEST_ID]
                .to_str()
                .expect("ascii")
                .to_owned();
            let body = reply.into_body().collect().await.expect("body").to_bytes();
            let body: serde_json::Value = serde_json::from_slice(&body).expect("json");
            assert_eq!(body["request_id"], header.as_str());
            if expect_caller {
                assert_eq!(header, "caller-7");
            } else {
                assert!(uuid::Uuid::parse_str(&header).is_ok(), "{header}");
            }
        }
    }
}
