//! The admin listener: `GET /healthz` (the process runs), `GET /readyz` (config loaded,
//! audit log writable, not draining) and `GET /metrics` (Prometheus text, or OpenMetrics
//! for a scraper that asks for it). It stays up while the data listener drains, so
//! probes see the 503.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{ALLOW, CONTENT_TYPE};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::gateway::Gateway;
use crate::server::accept::accept_within;

/// What Prometheus asks for first; prometheus-client writes it (it ends with `# EOF`).
const OPENMETRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// The classic Prometheus text format, for every scraper that does not ask for OpenMetrics.
const PROMETHEUS_TEXT_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Admin connections open at once; more wait in the kernel's accept queue. Probes and
/// scrapers need a handful; the cap keeps a flood of idle connections from taking the
/// file descriptors the data path needs (upstream connections, audit rotation).
const MAX_ADMIN_CONNECTIONS: usize = 64;
const ADMIN_HEADER_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

pub async fn serve(listener: TcpListener, gateway: Gateway) {
    serve_at_most(listener, gateway, MAX_ADMIN_CONNECTIONS).await;
}

async fn serve_at_most(listener: TcpListener, gateway: Gateway, max_connections: usize) {
    let connections = Arc::new(Semaphore::new(max_connections));
    // HTTP/1.1 only: probes and scrapers speak it, and without version sniffing (which
    // has no timeout) the header read timeout covers a connection that sends nothing.
    let mut builder = auto::Builder::new(TokioExecutor::new()).http1_only();
    // One request per connection, its head within 2 s: an idle or slow connection holds
    // one of the few admin slots only briefly, so probes are not kept waiting.
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(ADMIN_HEADER_READ_TIMEOUT)
        .keep_alive(false);
    while let Some((permit, stream, _)) = accept_within(&listener, &connections, "admin").await {
        let gateway = gateway.clone();
        let service = service_fn(move |request: Request<Incoming>| {
            let response = answer(&gateway, &request);
            async move { Ok::<_, Infallible>(response) }
        });
        let connection = builder
            .serve_connection(TokioIo::new(stream), service)
            .into_owned();
        tokio::spawn(async move {
            let _ = connection.await;
            drop(permit);
        });
    }
}

/// Why the gateway is not ready, if it is not.
pub fn readiness(gateway: &Gateway) -> Result<(), &'static str> {
    if gateway.is_draining() {
        return Err("draining");
    }
    if !gateway.audit().is_writable() {
        return Err("audit log not writable");
    }
    Ok(())
}

fn answer<B>(gateway: &Gateway, request: &Request<B>) -> Response<Full<Bytes>> {
    let (method, path) = (request.method(), request.uri().path());
    if !matches!(path, "/healthz" | "/readyz" | "/metrics") {
        return text(StatusCode::NOT_FOUND, "not found\n");
    }
    if method != Method::GET && method != Method::HEAD {
        let mut response = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
        response
            .headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    match path {
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" => match readiness(gateway) {
            Ok(()) => text(StatusCode::OK, "ready\n"),
            Err(why) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {why}\n"),
            ),
        },
        _ => {
            let metrics = gateway.metrics();
            let (body, content_type) = if accepts_openmetrics(request.headers()) {
                (metrics.encode(), OPENMETRICS_CONTENT_TYPE)
            } else {
                (
                    metrics.encode_prometheus_text(),
                    PROMETHEUS_TEXT_CONTENT_TYPE,
                )
            };
            let mut response = text(StatusCode::OK, body);
            response
                .headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
            response
        }
    }
}

/// Whether the scraper lists OpenMetrics in `Accept` (Prometheus does, first), and not
/// with `q=0`.
fn accepts_openmetrics(headers: &http::HeaderMap) -> bool {
    headers
        .get_all(http::header::ACCEPT)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .any(|range| {
            let mut parts = range.split(';').map(str::trim);
            let is_openmetrics = parts
                .next()
                .is_some_and(|media| media.eq_ignore_ascii_case("application/openmetrics-text"));
            let refused = parts.any(|param| {
                param
                    .split_once('=')
                    .filter(|(name, _)| name.trim().eq_ignore_ascii_case("q"))
                    .and_then(|(_, q)| q.trim().parse::<f32>().ok())
                    .is_some_and(|q| q <= 0.0)
            });
            is_openmetrics && !refused
        })
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::AuditLog;
    use crate::rate_limit::LimiterClock;
    use crate::telemetry::Metrics;
    use http_body_util::BodyExt as _;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    fn gateway(dir: &std::path::Path) -> Gateway {
        let config = crate::config::for_tests(dir, "");
        let audit = AuditLog::open(config.audit.clone()).expect("audit log");
        let metrics = Arc::new(Metrics::new());
        Gateway::new(&config, audit, metrics, LimiterClock::monotonic()).expect("gateway")
    }

    async fn healthz(stream: &mut TcpStream) -> String {
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: admin\r\n\r\n")
            .await
            .expect("write");
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await.expect("read");
        answer
    }

    /// Prometheus asks for OpenMetrics first and gets it; anything else (curl, promtool,
    /// a refusal of OpenMetrics with `q=0`) gets the classic text format.
    #[tokio::test]
    async fn metrics_are_openmetrics_only_for_a_scraper_that_asks() {
        let dir = tempfile::tempdir().expect("tempdir");
        let gateway = gateway(dir.path());
        let prometheus = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        for (accept, openmetrics) in [
            (Some(prometheus), true),
            (None, false),
            (Some("*/*"), false),
            (Some("text/plain;version=0.0.4"), false),
            (Some("application/openmetrics-text; q=0"), false),
            (Some("Application/OpenMetrics-Text;Q=0.0"), false),
            (Some("APPLICATION/OPENMETRICS-TEXT"), true),
        ] {
            let mut request = Request::get("/metrics");
            if let Some(accept) = accept {
                request = request.header(http::header::ACCEPT, accept);
            }
            let response = answer(&gateway, &request.body(()).expect("request"));
            let content_type = response.headers()[CONTENT_TYPE]
                .to_str()
                .unwrap_or("")
                .to_owned();
            let body = response
                .into_body()
                .collect()
                .await
                .expect("body")
                .to_bytes();
            let body = String::from_utf8_lossy(&body);
            if openmetrics {
                assert!(
                    content_type.starts_with("application/openmetrics-text"),
                    "{accept:?}"
                );
                assert!(body.ends_with("# EOF\n"), "{accept:?}");
            } else {
                assert!(
                    content_type.starts_with("text/plain; version=0.0.4"),
                    "{accept:?}"
                );
                assert!(!body.contains("# EOF"), "{accept:?}");
                assert!(
                    body.contains("# TYPE mpc_gateway_requests_total counter\n"),
                    "{accept:?}"
                );
                assert!(
                    body.contains("# TYPE mpc_gateway_build_info gauge\n"),
                    "{accept:?}"
                );
            }
        }
    }

    /// Connections beyond the cap wait, unanswered, until one of those open closes.
    #[tokio::test]
    async fn connections_beyond_the_cap_wait_for_one_to_close() {
        let dir = tempfile::tempdir().expect("tempdir");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let serving = tokio::spawn(serve_at_most(listener, gateway(dir.path()), 2));

        let idle_one = TcpStream::connect(addr).await.expect("connect");
        let _idle_two = TcpStream::connect(addr).await.expect("connect");
        let mut waiting = TcpStream::connect(addr).await.expect("connect");
        let early = tokio::time::timeout(Duration::from_millis(300), healthz(&mut waiting)).await;
        assert!(early.is_err(), "answered beyond the cap: {early:?}");

        drop(idle_one);
        let answer = tokio::time::timeout(Duration::from_secs(5), async {
            let mut rest = String::new();
            waiting.read_to_string(&mut rest).await.expect("read");
            rest
        })
        .await
        .expect("answered once a slot was free");
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        // One request per connection: it gives its slot back at once.
        assert!(
            answer.to_ascii_lowercase().contains("connection: close"),
            "{answer}"
        );
        serving.abort();
    }
}
