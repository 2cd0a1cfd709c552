//! Upstream faults (DESIGN.md §1 "Upstream call", issue 9): a response torn off
//! mid-head (clean close, abrupt close, reset), a certificate for the wrong host or an
//! expired one, an upstream that accepts TCP but never speaks TLS, 502 and 504 retried
//! like 503, and deadlines that hold with slow upstreams and retries.
//!
//! The closed port is in `tests/gateway.rs`, the full audit disk in `tests/ops.rs`,
//! SIGKILL under load in `tests/crash.rs`.

use crate::common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use mpc_gateway::simulator::{Fault, SimTls};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// Slack allowed past a deadline for scheduling and the reply. The tests bounded by it run
/// with [`NO_FSYNC`], so that the bound measures the deadline, not the disk.
const SLACK: Duration = Duration::from_millis(700);

/// `fsync: never` (records are still written before they are acknowledged): an fsync's
/// latency is the disk's, and a wall-clock bound on a deadline is not about it.
const NO_FSYNC: &str = "never";

/// The longest first backoff: jittered between half and all of 100 ms.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);

// ---------------------------------------------------------------------------------------
// A raw upstream
// ---------------------------------------------------------------------------------------

/// What the raw upstream does with each connection.
#[derive(Clone, Copy, Debug)]
enum Behaviour {
    /// TLS handshake, read the request head, write `HTTP/1.1 204 No Content\r\nContent-Len`
    /// and close as set by [`Close`].
    TornResponse(Close),
    /// TLS handshake only (the client is expected to refuse the certificate).
    HandshakeOnly,
    /// Accept TCP and never send a byte (no TLS ServerHello); hold the connection.
    Silent,
}

/// How a torn response ends.
#[derive(Clone, Copy, Debug)]
enum Close {
    /// TLS close_notify, then FIN: the client sees a clean end of stream mid-head.
    Clean,
    /// FIN without close_notify.
    Abrupt,
    /// RST (`SO_LINGER` 0).
    Reset,
}

/// A loopback listener bound before the gateway starts, so its URL can go into the
/// config; it serves once the harness (and its PKI) exists.
struct RawUpstream {
    listener: TcpListener,
}

/// A serving raw upstream: counts accepted connections; stops when dropped.
struct RawServing {
    accepted: Arc<AtomicUsize>,
    /// [`Behaviour::HandshakeOnly`]: connections whose TLS handshake completed on the
    /// server's side, and the bytes of application data read on them.
    handshakes: Arc<AtomicUsize>,
    app_bytes: Arc<AtomicUsize>,
    /// [`Behaviour::HandshakeOnly`]: connections whose handling has ended.
    finished: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Drop for RawServing {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl RawServing {
    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Waits (at most 10 s: each connection's handling is bounded by 5 s plus 1 s) until
    /// every accepted connection's handling ended; returns (completed handshakes,
    /// application bytes read).
    async fn handshake_outcome(&self) -> (usize, usize) {
        let done = eventually_async(Duration::from_secs(10), || async {
            self.finished.load(Ordering::SeqCst) == self.accepted()
        })
        .await;
        assert!(done, "the raw upstream's connections did not end");
        (
            self.handshakes.load(Ordering::SeqCst),
            self.app_bytes.load(Ordering::SeqCst),
        )
    }
}

impl RawUpstream {
    async fn bind() -> RawUpstream {
        RawUpstream {
            listener: TcpListener::bind("127.0.0.1:0").await.expect("bind"),
        }
    }

    /// `https://localhost:PORT`, a name the harness's server certificates cover.
    fn base_url(&self) -> String {
        let port = self.listener.local_addr().expect("addr").port();
        format!("https://localhost:{port}")
    }

    fn serve(self, behaviour: Behaviour, tls: SimTls) -> RawServing {
        let acceptor = tls_acceptor(&tls);
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&accepted);
        let handshakes = Arc::new(AtomicUsize::new(0));
        let app_bytes = Arc::new(AtomicUsize::new(0));
        let finished = Arc::new(AtomicUsize::new(0));
        let (handshakes_, app_bytes_, finished_) = (
            Arc::clone(&handshakes),
            Arc::clone(&app_bytes),
            Arc::clone(&finished),
        );
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            // Bounded: a test makes a handful of connections.
            for _ in 0..64 {
                let Ok((tcp, _)) = self.listener.accept().await else {
                    break;
                };
                counter.fetch_add(1, Ordering::SeqCst);
                match behaviour {
                    Behaviour::Silent => held.push(tcp),
                    Behaviour::HandshakeOnly => {
                        let acceptor = acceptor.clone();
                        let (handshakes, app_bytes, finished) = (
                            Arc::clone(&handshakes_),
                            Arc::clone(&app_bytes_),
                            Arc::clone(&finished_),
                        );
                        // Per-connection tasks end on their own within their timeouts.
                        tokio::spawn(async move {
                            let accepted =
                                tokio::time::timeout(Duration::from_secs(5), acceptor.accept(tcp))
                                    .await;
                            if let Ok(Ok(mut tls)) = accepted {
                                handshakes.fetch_add(1, Ordering::SeqCst);
                                // Whatever request crosses a completed handshake is read.
                                let mut buf = [0u8; 4096];
                                let read = async {
                                    loop {
                                        match tls.read(&mut buf).await {
                                            Ok(0) | Err(_) => break,
                                            Ok(n) => {
                                                app_bytes.fetch_add(n, Ordering::SeqCst);
                                            }
                                        }
                                    }
                                };
                                let _ = tokio::time::timeout(Duration::from_secs(1), read).await;
                            }
                            finished.fetch_add(1, Ordering::SeqCst);
                        });
                    }
                    Behaviour::TornResponse(close) => {
                        let acceptor = acceptor.clone();
                        tokio::spawn(torn_response(acceptor, tcp, close));
                    }
                }
            }
        });
        RawServing {
            accepted,
            handshakes,
            app_bytes,
            finished,
            task,
        }
    }
}

async fn torn_response(acceptor: tokio_rustls::TlsAcceptor, tcp: TcpStream, close: Close) {
    let Ok(Ok(mut tls)) = tokio::time::timeout(Duration::from_secs(5), acceptor.accept(tcp)).await
    else {
        return;
    };
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    let read_head = async {
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 64 * 1024 {
            match tls.read(&mut buf).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
        true
    };
    if !matches!(
        tokio::time::timeout(Duration::from_secs(5), read_head).await,
        Ok(true)
    ) {
        return;
    }
    let _ = tls
        .write_all(b"HTTP/1.1 204 No Content\r\nContent-Len")
        .await;
    let _ = tls.flush().await;
    match close {
        Close::Clean => {
            let _ = tls.shutdown().await;
        }
        Close::Abrupt => {
            let (tcp, _) = tls.into_inner();
            let mut tcp = tcp;
            let _ = tcp.shutdown().await;
        }
        Close::Reset => {
            let (tcp, _) = tls.into_inner();
            let _ = tcp.set_zero_linger();
            drop(tcp);
        }
    }
}

fn tls_acceptor(tls: &SimTls) -> tokio_rustls::TlsAcceptor {
    let certs: Vec<_> = rustls_pemfile::certs(&mut tls.cert_chain_pem.as_bytes())
        .collect::<Result<_, _>>()
        .expect("certificate PEM");
    let key = rustls_pemfile::private_key(&mut tls.key_pem.as_bytes())
        .expect("key PEM")
        .expect("a key");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .expect("server config");
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    tokio_rustls::TlsAcceptor::from(Arc::new(config))
}

/// A harness whose upstream is a raw listener bound before it starts.
async fn harness_with_raw_upstream(options: Options) -> (Harness, RawUpstream) {
    let raw = RawUpstream::bind().await;
    let h = Harness::with(Options {
        base_url: Some(raw.base_url()),
        ..options
    })
    .await;
    (h, raw)
}

// ---------------------------------------------------------------------------------------
// Torn responses
// ---------------------------------------------------------------------------------------

/// The upstream reads the request, starts a response head and goes away. However it goes
/// away, the caller gets `502 upstream-unavailable` (no status ever arrived) within the
/// deadline; a reset is a connect-class error and is retried up to `max_attempts`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_dies_mid_response_is_502_unavailable_and_never_hangs() {
    for close in [Close::Reset, Close::Clean, Close::Abrupt] {
        let (h, raw) = harness_with_raw_upstream(Options {
            timeout: "3s",
            ..Options::default()
        })
        .await;
        let serving = raw.serve(Behaviour::TornResponse(close), h.pki.server_tls());
        let (reply, took) = timed_end(&h, "billing-torn").await;
        reply.assert_problem(502, "upstream-unavailable");
        assert!(
            took < Duration::from_secs(3),
            "{close:?}: answered after {took:?}"
        );
        let result = last_result(&h);
        assert_eq!(result["reason"], "upstream-unavailable", "{close:?}");
        assert_eq!(
            result["upstream_status"],
            serde_json::Value::Null,
            "{close:?}"
        );
        let attempts = result["attempts"].as_u64().expect("attempts") as usize;
        assert_eq!(
            attempts,
            serving.accepted(),
            "{close:?}: one connection per attempt"
        );
        assert!((1..=3).contains(&attempts), "{close:?}: {attempts}");
        if matches!(close, Close::Reset) {
            assert_eq!(attempts, 3, "a reset is retried up to max_attempts");
        }
        h.assert_chain();
        drop(serving);
        h.shutdown().await;
    }
}

// ---------------------------------------------------------------------------------------
// Certificates
// ---------------------------------------------------------------------------------------

/// A certificate issued by the trusted CA, but for another host (or expired): a TLS
/// failure, `502 upstream-unavailable`, one attempt; the gateway refuses the certificate,
/// so the upstream's side of the handshake never completes and no request byte reaches it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_for_the_wrong_host_or_expired_is_unavailable_and_not_retried() {
    for what in ["wrong host", "expired"] {
        let (h, raw) = harness_with_raw_upstream(Options::default()).await;
        let cert = match what {
            "wrong host" => h.pki.issue_server_cert(&["wrong.example"]),
            _ => h.pki.issue_expired_server_cert(&["localhost", "127.0.0.1"]),
        }
        .expect("issue certificate");
        let serving = raw.serve(Behaviour::HandshakeOnly, cert.sim_tls());
        let (reply, took) = timed_end(&h, "billing-cert").await;
        reply.assert_problem(502, "upstream-unavailable");
        assert!(took < Duration::from_secs(3), "{what}: {took:?}");
        let result = last_result(&h);
        assert_eq!(
            result["attempts"], 1,
            "{what}: TLS failures are not retried"
        );
        assert_eq!(result["upstream_status"], serde_json::Value::Null);
        assert_eq!(serving.accepted(), 1, "{what}: one connection");
        assert_eq!(
            serving.handshake_outcome().await,
            (0, 0),
            "{what}: (completed handshakes, request bytes) at the upstream"
        );
        drop(serving);
        h.shutdown().await;
    }
}

// ---------------------------------------------------------------------------------------
// An upstream that accepts but never answers
// ---------------------------------------------------------------------------------------

/// TCP connects, the TLS handshake never completes: the call ends at `timeout` with
/// `504 upstream-timeout`, not earlier and not much later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_accepts_but_never_speaks_tls_times_out_with_504() {
    let timeout = Duration::from_millis(1500);
    let (h, raw) = harness_with_raw_upstream(Options {
        connect_timeout: "500ms",
        timeout: "1500ms",
        fsync: NO_FSYNC,
        ..Options::default()
    })
    .await;
    let serving = raw.serve(Behaviour::Silent, h.pki.server_tls());
    let (reply, took) = timed_end(&h, "billing-silent").await;
    reply.assert_problem(504, "upstream-timeout");
    assert!(
        took >= timeout - Duration::from_millis(50) && took <= timeout + SLACK,
        "answered after {took:?}, timeout {timeout:?}"
    );
    let result = last_result(&h);
    assert_eq!(result["reason"], "upstream-timeout");
    assert_eq!(result["upstream_status"], serde_json::Value::Null);
    let attempts = result["attempts"].as_u64().expect("attempts");
    assert!(
        (1..=3).contains(&attempts) && attempts as usize <= serving.accepted(),
        "attempts {attempts}, connections {}",
        serving.accepted()
    );
    drop(serving);
    h.shutdown().await;
}

/// Calls that queue behind one connect share its failure instead of each waiting a
/// whole `connect_timeout` of its own: six concurrent calls to an upstream that never
/// speaks TLS all end `502 upstream-unavailable` after their three attempts, long before
/// `timeout`. (Queued one after another, 6 × 3 connects of 300 ms would pass the 4 s
/// timeout, and the later calls would end `504` after one attempt.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_queued_behind_a_failing_connect_share_its_failure() {
    let (h, raw) = harness_with_raw_upstream(Options {
        connect_timeout: "300ms",
        timeout: "4s",
        max_attempts: 3,
        ..Options::default()
    })
    .await;
    let serving = raw.serve(Behaviour::Silent, h.pki.server_tls());
    let started = std::time::Instant::now();
    let calls = (0..6).map(|i| {
        let h = &h;
        async move { h.end(&format!("billing-queued-{i}"), BILLING_TOKEN).await }
    });
    let replies = futures_util::future::join_all(calls).await;
    let took = started.elapsed();
    for reply in &replies {
        reply.assert_problem(502, "upstream-unavailable");
    }
    assert!(took < Duration::from_secs(3), "answered after {took:?}");
    let results: Vec<_> = h
        .records()
        .into_iter()
        .filter(|r| r["event"] == "result")
        .collect();
    assert_eq!(results.len(), 6);
    assert!(results.iter().all(|r| r["attempts"] == 3), "{results:?}");
    assert!(
        serving.accepted() < 18,
        "{} connects for 18 attempts: none was shared",
        serving.accepted()
    );
    drop(serving);
    h.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// A connect that never completes
// ---------------------------------------------------------------------------------------

/// A loopback listener that never accepts, with its accept queue full: held connections
/// fill it, and the kernel drops further SYNs (the client retransmits after 1 s), so a
/// connect is neither made nor refused, the way an upstream behind a black-holing
/// firewall looks.
struct FullBacklog {
    listener: TcpListener,
    _held: Vec<TcpStream>,
}

impl FullBacklog {
    /// How long the probe connect may take before it counts as unanswered.
    const PROBE: Duration = Duration::from_millis(300);

    /// Listens with a backlog of 1 and connects (at most 8 times, each bounded by
    /// [`Self::PROBE`]) until a connect does not complete: that probe is the proof that
    /// SYNs go unanswered. `None` when every connect completed or failed at once (a kernel
    /// that queues more or resets on overflow, `tcp_abort_on_overflow`).
    async fn bind() -> Option<FullBacklog> {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket
            .bind(std::net::SocketAddr::from(([127, 0, 0, 1], 0)))
            .expect("bind");
        let listener = socket.listen(1).expect("listen");
        let addr = listener.local_addr().expect("addr");
        let mut held = Vec::new();
        for _ in 0..8 {
            match tokio::time::timeout(Self::PROBE, TcpStream::connect(addr)).await {
                Ok(Ok(stream)) => held.push(stream),
                Ok(Err(err)) => {
                    eprintln!("a connect to the full accept queue failed at once: {err}");
                    return None;
                }
                Err(_) => {
                    return Some(FullBacklog {
                        listener,
                        _held: held,
                    })
                }
            }
        }
        None
    }

    /// `https://127.0.0.1:PORT`: an IP, so no resolver and no second address family can
    /// answer in its place.
    fn base_url(&self) -> String {
        let port = self.listener.local_addr().expect("addr").port();
        format!("https://127.0.0.1:{port}")
    }
}

/// A connect that times out is a connect error (DESIGN §1: "refused, reset, connect
/// timeout"): each attempt ends at `connect_timeout` and is retried, and when the
/// attempts run out the caller gets `502 upstream-unavailable`, not `504` at `timeout`.
/// The listener's full accept queue makes the TCP connect itself hang (a silent
/// listener, above, would complete it and hang the TLS handshake instead).
///
/// Two attempts of 300 ms and one backoff of 50-100 ms between them: at least 600 ms,
/// at most 700 ms plus [`SLACK`], far below the 3 s `timeout` that a connect without its
/// own timeout would run into.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_that_gets_no_syn_ack_times_out_and_is_retried() {
    let connect_timeout = Duration::from_millis(300);
    // Linux queues backlog + 1 connections and then drops SYNs (with
    // `tcp_abort_on_overflow` 0, its default); a kernel that does not is reported, not
    // skipped over: this test must not pass without running.
    let upstream = FullBacklog::bind().await.unwrap_or_else(|| {
        panic!(
            "on this kernel 8 connects to a never-accepting listener of backlog 1 all \
             completed, or one was refused at once: no connect could be made to hang \
             (net.ipv4.tcp_abort_on_overflow = {:?})",
            std::fs::read_to_string("/proc/sys/net/ipv4/tcp_abort_on_overflow")
        )
    });
    let h = Harness::with(Options {
        base_url: Some(upstream.base_url()),
        connect_timeout: "300ms",
        timeout: "3s",
        max_attempts: 2,
        fsync: NO_FSYNC,
        ..Options::default()
    })
    .await;
    let (reply, took) = timed_end(&h, "billing-no-syn-ack").await;
    reply.assert_problem(502, "upstream-unavailable");
    assert!(
        took >= 2 * connect_timeout && took <= 2 * connect_timeout + FIRST_BACKOFF + SLACK,
        "answered after {took:?}: two connect timeouts of {connect_timeout:?} and a backoff"
    );
    let result = last_result(&h);
    assert_eq!(result["reason"], "upstream-unavailable");
    assert_eq!(result["status"], 502);
    assert_eq!(result["upstream_status"], serde_json::Value::Null);
    assert_eq!(result["attempts"], 2, "a connect timeout is retried");
    h.assert_chain();
    h.shutdown().await;
    drop(upstream);
}

// ---------------------------------------------------------------------------------------
// Retried statuses
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_502_and_504_are_retried_like_503() {
    let h = Harness::start().await;
    // 502, then 504, then the real answer.
    h.sim.push_fault(Fault::status(
        502,
        r#"{"api_id":"g1","error":"bad gateway"}"#,
    ));
    h.sim.push_fault(Fault::status(504, ""));
    let reply = h.end("billing-1", BILLING_TOKEN).await;
    assert_eq!(reply.status, 204, "{:?}", reply.body);
    assert_eq!(h.sim.request_count(), 3);
    let result = last_result(&h);
    assert_eq!(result["attempts"], 3);
    assert_eq!(result["upstream_status"], 204);
    // The metric counts every request Plivo got, by its own status.
    assert_eq!(upstream_requests(&h).await, [1.0, 1.0, 1.0, 0.0]);

    // Only 502s or only 504s: the attempts run out and the last one decides. Plivo's 504
    // is an answer, so it is `502 upstream-error`, not the gateway's own timeout.
    for status in [502u16, 504] {
        let before = h.sim.request_count();
        for _ in 0..3 {
            h.sim.push_fault(Fault::status(
                status,
                r#"{"api_id":"last-1","error":"busy"}"#,
            ));
        }
        let reply = h.end(&format!("billing-{status}"), BILLING_TOKEN).await;
        reply.assert_problem(502, "upstream-error");
        assert_eq!(h.sim.request_count() - before, 3, "{status}: max_attempts");
        let result = last_result(&h);
        assert_eq!(result["attempts"], 3);
        assert_eq!(result["upstream_status"], status);
        assert_eq!(result["plivo_api_id"], "last-1");
    }
    assert_eq!(upstream_requests(&h).await, [4.0, 4.0, 1.0, 0.0]);

    // Other 5xx are not retried.
    for status in [500u16, 501, 505] {
        let before = h.sim.request_count();
        h.sim.push_fault(Fault::status(status, ""));
        let reply = h.end(&format!("billing-{status}"), BILLING_TOKEN).await;
        reply.assert_problem(502, "upstream-error");
        assert_eq!(h.sim.request_count() - before, 1, "{status} is not retried");
        assert_eq!(last_result(&h)["attempts"], 1);
    }
    h.assert_chain();
    h.shutdown().await;
}

/// `mpc_gateway_upstream_requests_total{status}`: one count per attempt, by its outcome.
fn upstream_series(text: &str, status: &str) -> f64 {
    let series = format!("mpc_gateway_upstream_requests_total{{status=\"{status}\"}}");
    mpc_gateway::telemetry::sample(text, &series).unwrap_or(0.0)
}

/// DESIGN §1: "When the attempts run out first, the last attempt's outcome decides",
/// whatever the earlier attempts were: resets then a 503 is Plivo's answer (`502
/// upstream-error`, its status and api_id in the record), 503s then a reset is no answer
/// (`502 upstream-unavailable`, no upstream status). Every attempt that got no answer (a
/// reset, or a hang to the deadline) counts as `status="error"` in
/// `mpc_gateway_upstream_requests_total` (which counts attempts, not calls).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_attempts_run_out_the_last_attempts_outcome_decides() {
    let h = Harness::with(Options {
        timeout: "2s",
        fsync: NO_FSYNC,
        ..Options::default()
    })
    .await;

    h.sim.push_fault(Fault::Reset);
    h.sim.push_fault(Fault::Reset);
    h.sim.push_fault(Fault::status(
        503,
        r#"{"api_id":"last-503","error":"busy"}"#,
    ));
    let reply = h.end("billing-reset-first", BILLING_TOKEN).await;
    reply.assert_problem(502, "upstream-error");
    assert_eq!(h.sim.request_count(), 3, "max_attempts");
    let result = last_result(&h);
    assert_eq!(result["status"], 502);
    assert_eq!(result["reason"], "upstream-error");
    assert_eq!(result["attempts"], 3);
    assert_eq!(result["upstream_status"], 503);
    assert_eq!(result["plivo_api_id"], "last-503");
    let text = metrics_text(&h).await;
    assert_eq!(upstream_series(&text, "error"), 2.0, "two resets: {text}");
    assert_eq!(upstream_series(&text, "503"), 1.0, "{text}");

    h.sim
        .push_fault(Fault::status(503, r#"{"api_id":"early-503"}"#));
    h.sim
        .push_fault(Fault::status(503, r#"{"api_id":"early-503"}"#));
    h.sim.push_fault(Fault::Reset);
    let reply = h.end("billing-503-first", BILLING_TOKEN).await;
    reply.assert_problem(502, "upstream-unavailable");
    assert_eq!(h.sim.request_count(), 6, "max_attempts");
    let result = last_result(&h);
    assert_eq!(result["status"], 502);
    assert_eq!(result["reason"], "upstream-unavailable");
    assert_eq!(result["attempts"], 3);
    assert_eq!(
        result["upstream_status"],
        serde_json::Value::Null,
        "the last attempt got no answer"
    );
    assert_eq!(result["plivo_api_id"], serde_json::Value::Null);
    let text = metrics_text(&h).await;
    assert_eq!(
        upstream_series(&text, "error"),
        3.0,
        "one more reset: {text}"
    );
    assert_eq!(upstream_series(&text, "503"), 3.0, "two more 503s: {text}");

    // A hang to the deadline is no answer either.
    h.sim.push_fault(Fault::Hang);
    let reply = h.end("billing-hang", BILLING_TOKEN).await;
    reply.assert_problem(504, "upstream-timeout");
    assert_eq!(last_result(&h)["upstream_status"], serde_json::Value::Null);
    let text = metrics_text(&h).await;
    assert_eq!(upstream_series(&text, "error"), 4.0, "the hang: {text}");
    assert_eq!(upstream_series(&text, "503"), 3.0, "{text}");
    h.assert_chain();
    h.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// Deadlines with slow upstreams and retries
// ---------------------------------------------------------------------------------------

/// A 503 is retried; the retry is slower than what is left of `timeout`: the call still
/// ends at `timeout` with `504 upstream-timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_retry_cannot_stretch_the_deadline() {
    let timeout = Duration::from_secs(1);
    let h = Harness::with(Options {
        timeout: "1s",
        fsync: NO_FSYNC,
        ..Options::default()
    })
    .await;
    h.sim.push_fault(Fault::status(503, ""));
    h.sim.push_fault(Fault::Delay(Duration::from_secs(5)));
    let (reply, took) = timed_end(&h, "billing-slow").await;
    reply.assert_problem(504, "upstream-timeout");
    assert!(
        took >= timeout - Duration::from_millis(50) && took <= timeout + SLACK,
        "answered after {took:?}"
    );
    assert_eq!(h.sim.request_count(), 2, "the 503 and the slow retry");
    let result = last_result(&h);
    assert_eq!(result["reason"], "upstream-timeout");
    assert_eq!(result["upstream_status"], serde_json::Value::Null);
    assert_eq!(result["attempts"], 2);
    h.shutdown().await;
}

/// Plivo's `2xx` head arrives in time and its body never ends: the MPC was ended, so
/// the caller gets `204` at the deadline and the audit says so, over both upstream
/// protocols. The HTTP/1.1 connection whose body was cut is not reused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_2xx_whose_body_never_ends_is_204_at_the_deadline() {
    for http2 in [false, true] {
        let timeout = Duration::from_millis(800);
        let h = Harness::with(Options {
            timeout: "800ms",
            http2,
            fsync: NO_FSYNC,
            ..Options::default()
        })
        .await;
        h.sim.push_fault(Fault::StalledBody(200));
        let (reply, took) = timed_end(&h, "billing-stalled").await;
        assert_eq!(reply.status, 204, "http2 {http2}: {:?}", reply.body);
        assert!(
            took >= timeout - Duration::from_millis(50) && took <= timeout + SLACK,
            "http2 {http2}: answered after {took:?}"
        );
        assert_eq!(
            h.sim.request_count(),
            1,
            "http2 {http2}: a 2xx is not retried"
        );
        let result = last_result(&h);
        assert_eq!(result["status"], 204, "http2 {http2}: {result}");
        assert_eq!(result["upstream_status"], 200);
        assert_eq!(result["attempts"], 1);

        // The next call works, on a connection whose answer is not half read.
        let reply = h.end("billing-after", BILLING_TOKEN).await;
        assert_eq!(reply.status, 204, "http2 {http2}: {:?}", reply.body);
        assert_eq!(last_result(&h)["upstream_status"], 204);
        let versions: Vec<String> = h.sim.requests().into_iter().map(|r| r.version).collect();
        let expected = if http2 { "HTTP/2.0" } else { "HTTP/1.1" };
        assert_eq!(versions, [expected, expected]);
        h.assert_chain();
        h.shutdown().await;
    }
}

/// A `503` head in time and a body that never ends: the body is cut at the deadline, no
/// retry fits after it, and the caller gets `504` then, with the record and the detail
/// keeping the `503` Plivo sent (not "no answer").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_503_whose_body_never_ends_is_504_keeping_the_503() {
    let timeout = Duration::from_millis(800);
    let h = Harness::with(Options {
        timeout: "800ms",
        fsync: NO_FSYNC,
        ..Options::default()
    })
    .await;
    h.sim.push_fault(Fault::StalledBody(503));
    let (reply, took) = timed_end(&h, "billing-stalled-503").await;
    reply.assert_problem(504, "upstream-timeout");
    assert_eq!(
        reply.json()["detail"],
        "Plivo answered 503, and no further attempt fitted in upstream.timeout"
    );
    assert!(
        took >= timeout - Duration::from_millis(50) && took <= timeout + SLACK,
        "answered after {took:?}"
    );
    assert_eq!(h.sim.request_count(), 1, "no attempt after the deadline");
    let result = last_result(&h);
    assert_eq!(result["reason"], "upstream-timeout");
    assert_eq!(result["upstream_status"], 503);
    assert_eq!(result["attempts"], 1);
    h.assert_chain();
    h.shutdown().await;
}

/// Every attempt hangs: one attempt uses the whole `timeout`, no retry runs past it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hanging_attempts_end_at_the_deadline() {
    let timeout = Duration::from_millis(800);
    let h = Harness::with(Options {
        timeout: "800ms",
        fsync: NO_FSYNC,
        ..Options::default()
    })
    .await;
    for _ in 0..3 {
        h.sim.push_fault(Fault::Hang);
    }
    let (reply, took) = timed_end(&h, "billing-hang").await;
    reply.assert_problem(504, "upstream-timeout");
    assert!(
        took >= timeout - Duration::from_millis(50) && took <= timeout + SLACK,
        "answered after {took:?}"
    );
    assert_eq!(h.sim.request_count(), 1);
    let result = last_result(&h);
    assert_eq!(result["status"], 504);
    assert_eq!(result["reason"], "upstream-timeout");
    assert_eq!(
        result["attempts"], 1,
        "the hanging attempt was the only one"
    );
    assert_eq!(result["upstream_status"], serde_json::Value::Null);
    assert_eq!(result["plivo_api_id"], serde_json::Value::Null);
    h.assert_chain();
    h.shutdown().await;
}

/// The raw upstream's answer to every request: `503`, empty, connection kept.
const ANSWER_503: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n";

/// A raw upstream that answers every request `503` at once, except request number `held`
/// (counted from 1 across connections), whose `503` it sends at `answer_at`.
struct Held503 {
    requests: Arc<AtomicUsize>,
    /// When the held answer was written.
    held_answered: Arc<std::sync::Mutex<Option<std::time::Instant>>>,
    task: JoinHandle<()>,
}

impl Drop for Held503 {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl RawUpstream {
    fn serve_503s(self, tls: SimTls, held: usize, answer_at: std::time::Instant) -> Held503 {
        let acceptor = tls_acceptor(&tls);
        let requests = Arc::new(AtomicUsize::new(0));
        let held_answered = Arc::new(std::sync::Mutex::new(None));
        let (count, answered) = (Arc::clone(&requests), Arc::clone(&held_answered));
        let task = tokio::spawn(async move {
            // Bounded: the gateway retries over a handful of connections at most.
            for _ in 0..16 {
                let Ok((tcp, _)) = self.listener.accept().await else {
                    break;
                };
                let (acceptor, count, answered) =
                    (acceptor.clone(), Arc::clone(&count), Arc::clone(&answered));
                tokio::spawn(async move {
                    let Ok(Ok(mut tls)) =
                        tokio::time::timeout(Duration::from_secs(5), acceptor.accept(tcp)).await
                    else {
                        return;
                    };
                    let mut pending = Vec::new();
                    let mut buf = [0u8; 4096];
                    for _ in 0..16 {
                        // One request head (a DELETE has no body), bounded in time and size.
                        while !pending.windows(4).any(|w| w == b"\r\n\r\n") {
                            let read =
                                tokio::time::timeout(Duration::from_secs(10), tls.read(&mut buf));
                            match read.await {
                                Ok(Ok(n)) if n > 0 && pending.len() < 64 * 1024 => {
                                    pending.extend_from_slice(&buf[..n]);
                                }
                                _ => return,
                            }
                        }
                        let end = pending
                            .windows(4)
                            .position(|w| w == b"\r\n\r\n")
                            .expect("a complete head")
                            + 4;
                        pending.drain(..end);
                        if count.fetch_add(1, Ordering::SeqCst) + 1 == held {
                            tokio::time::sleep_until(answer_at.into()).await;
                            *answered.lock().expect("lock") = Some(std::time::Instant::now());
                        }
                        if tls.write_all(ANSWER_503).await.is_err() || tls.flush().await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        Held503 {
            requests,
            held_answered,
            task,
        }
    }
}

/// `503`s, retried with backoff, until the deadline passes during a backoff: the call
/// ends `504` at the deadline, neither before it nor after sleeping the backoff out,
/// and its record and detail keep the `503` Plivo last answered.
///
/// Why the numbers: backoffs are jittered (half to all of 100 ms, 200, 400, 800, 1600,
/// then 2 s), so only a late attempt's backoff is long enough to tell "ended at the
/// deadline" from "slept the backoff, then gave up" by a wide margin: the one after
/// attempt 6 lasts at least 1 s. Attempts 1-5 are answered at once (their backoffs
/// take at most 3.1 s); attempt 6 is answered 100 ms before the 4 s deadline, so the
/// deadline passes during the backoff that follows it. Then:
/// - right: the answer comes about 100 ms after that last `503` (plus scheduling and the
///   audit write; with `fsync: never`, no disk flush), and no seventh attempt is made;
/// - sleeping the backoff out: at least 1 s after it;
/// - giving up at once when the backoff would pass the deadline: before `timeout`.
///
/// The bound of 700 ms after the last `503` leaves 600 ms for a loaded machine and is
/// still 300 ms short of the shortest backoff. The deadline starts after the request
/// was sent, so "100 ms before it" only grows under load.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadline_that_passes_during_backoff_is_504() {
    let timeout = Duration::from_secs(4);
    let (h, raw) = harness_with_raw_upstream(Options {
        timeout: "4s",
        max_attempts: 10,
        fsync: NO_FSYNC,
        ..Options::default()
    })
    .await;
    let started = std::time::Instant::now();
    let upstream = raw.serve_503s(
        h.pki.server_tls(),
        6,
        started + timeout - Duration::from_millis(100),
    );
    let reply = h.end("billing-backoff", BILLING_TOKEN).await;
    let replied = std::time::Instant::now();

    reply.assert_problem(504, "upstream-timeout");
    assert_eq!(
        reply.json()["detail"],
        "Plivo answered 503, and no further attempt fitted in upstream.timeout",
        "Plivo did answer; the detail says with what"
    );
    let took = replied - started;
    assert!(
        took >= timeout,
        "answered after {took:?}, before the deadline"
    );
    let last_503 = upstream
        .held_answered
        .lock()
        .expect("lock")
        .expect("attempt 6 was made and answered");
    let after_last_503 = replied - last_503;
    assert!(
        after_last_503 <= Duration::from_millis(700),
        "answered {after_last_503:?} after the last 503 (the backoff is at least 1 s)"
    );
    assert_eq!(
        upstream.requests.load(Ordering::SeqCst),
        6,
        "no attempt after the last 503"
    );
    let result = last_result(&h);
    assert_eq!(result["reason"], "upstream-timeout");
    assert_eq!(result["upstream_status"], 503, "the last answer Plivo gave");
    assert_eq!(result["attempts"], 6);
    drop(upstream);
    h.shutdown().await;
}

/// `mpc_gateway_upstream_requests_total` for statuses 502, 504, 204 and `error`.
async fn upstream_requests(h: &Harness) -> [f64; 4] {
    let text = metrics_text(h).await;
    ["502", "504", "204", "error"].map(|status| {
        let series = format!("mpc_gateway_upstream_requests_total{{status=\"{status}\"}}");
        mpc_gateway::telemetry::sample(&text, &series).unwrap_or(0.0)
    })
}
