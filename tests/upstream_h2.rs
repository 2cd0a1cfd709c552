//! The upstream call over HTTP/2: the real gateway in front of the TLS simulator offering
//! `h2` by ALPN. Covers the contract request as it crosses an HTTP/2 stream (method,
//! `:path`, `:authority`, headers, no body, nothing of the caller's leaking), many calls
//! multiplexed over one connection with one forward and one result record each, and the
//! contract's fault handling over HTTP/2: a retried 503, a 429 mapped to
//! `503 upstream-rate-limited` with Plivo's `Retry-After`, a reset connection retried on a
//! new one, a reset stream retried on the same one, and an unanswered stream that times
//! out and retires its connection (the next call opens a new one).

use crate::common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use http::Method;
use mpc_gateway::simulator::{Fault, RecordedRequest};

/// How much later than `timeout` a timed-out call may answer: scheduling and the reply.
/// Tests bounded by it run with `fsync: never`, so the disk is not part of the budget.
const SLACK: Duration = Duration::from_millis(700);

const HTTP2: &str = "HTTP/2.0";

async fn h2_harness(options: Options) -> Harness {
    Harness::with(Options {
        http2: true,
        ..options
    })
    .await
}

/// The upstream path the gateway must use for `name` on the default account.
fn upstream_path(name: &str) -> String {
    format!("/v1/Account/{AUTH_ID}/MultiPartyCall/name_{name}/")
}

/// Ends `name` as billing with the caller's `x-request-id`.
async fn end_with_id(h: &Harness, name: &str, request_id: &str) -> Reply {
    let auth = format!("Bearer {BILLING_TOKEN}");
    h.send(
        Method::POST,
        &format!("/mpc/{name}/end"),
        &[("authorization", &auth), ("x-request-id", request_id)],
        b"",
    )
    .await
}

/// Every request the simulator saw came over HTTP/2.
fn assert_all_http2(requests: &[RecordedRequest]) {
    for (index, request) in requests.iter().enumerate() {
        assert_eq!(
            request.version, HTTP2,
            "request {index} ({} {}) did not use HTTP/2",
            request.method, request.target
        );
    }
}

/// Establishes the HTTP/2 connection with one successful call, so later connection
/// counts are deterministic.
async fn warm_up(h: &Harness) {
    let reply = h.end("billing-warm", BILLING_TOKEN).await;
    assert_eq!(reply.status, 204, "warm-up: {:?}", reply.body);
    assert_eq!(h.sim.connection_count(), 1, "warm-up opens one connection");
    assert_all_http2(&h.sim.requests());
}

// ---------------------------------------------------------------------------------------
// The contract request
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_contract_request_goes_upstream_over_http2() {
    let h = h2_harness(Options::default()).await;
    let auth = format!("Bearer {BILLING_TOKEN}");
    let reply = h
        .send(
            Method::POST,
            "/mpc/billing-h2/end",
            &[
                ("authorization", auth.as_str()),
                ("x-request-id", "caller-h2-1"),
            ]
            .into_iter()
            .chain(LEAKY_HEADERS)
            .collect::<Vec<_>>(),
            b"{\"ignored\": true}",
        )
        .await;

    assert_eq!(reply.status, 204, "{:?}", reply.body);
    assert!(reply.body.is_empty());
    assert_eq!(reply.header("x-request-id"), Some("caller-h2-1"));

    let upstream = h.sim.requests();
    assert_eq!(upstream.len(), 1, "{upstream:?}");
    let sent = &upstream[0];
    assert_eq!(sent.version, HTTP2);
    assert_contract_upstream_request(sent, "billing-h2");
    let port = h.sim.local_addr().port();
    assert_eq!(
        sent.authority.as_deref(),
        Some(format!("localhost:{port}").as_str())
    );
    assert_eq!(h.sim.connection_count(), 1);

    let records = h.records();
    assert_eq!(records.len(), 2, "{records:?}");
    let (forward, result) = (&records[0], &records[1]);
    assert_eq!(forward["event"], "forward");
    assert_eq!(forward["status"], serde_json::Value::Null);
    assert_eq!(result["event"], "result");
    for record in [forward, result] {
        assert_eq!(record["request_id"], "caller-h2-1");
        assert_eq!(record["tenant"], "billing");
        assert_eq!(record["mpc"], "billing-h2");
        assert_eq!(record["account"], "default");
    }
    assert_eq!(result["status"], 204);
    assert_eq!(result["reason"], "ended");
    assert_eq!(result["upstream_status"], 204);
    assert_eq!(result["attempts"], 1);
    assert_eq!(h.assert_chain(), 2);
    h.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// Multiplexing
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_calls_share_one_http2_connection() {
    const CONCURRENT: usize = 40;
    let h = h2_harness(Options::default()).await;
    let first = end_with_id(&h, "billing-first", "h2-first").await;
    assert_eq!(first.status, 204, "{:?}", first.body);
    assert_eq!(h.sim.connection_count(), 1);

    let names: Vec<(String, String)> = (0..CONCURRENT)
        .map(|i| (format!("billing-mux-{i}"), format!("h2-mux-{i}")))
        .collect();
    // Each call is bounded by the harness client's own 15 s timeout.
    let replies = futures_util::future::join_all(
        names
            .iter()
            .map(|(name, request_id)| end_with_id(&h, name, request_id)),
    )
    .await;
    for ((name, _), reply) in names.iter().zip(&replies) {
        assert_eq!(reply.status, 204, "{name}: {:?}", reply.body);
    }
    assert_eq!(
        h.sim.connection_count(),
        1,
        "every call is multiplexed over the first connection"
    );

    let upstream = h.sim.requests();
    assert_eq!(upstream.len(), CONCURRENT + 1);
    assert_all_http2(&upstream);
    let mut targets: Vec<String> = upstream.iter().map(|r| r.target.clone()).collect();
    targets.sort();
    let mut expected: Vec<String> = std::iter::once(upstream_path("billing-first"))
        .chain(names.iter().map(|(name, _)| upstream_path(name)))
        .collect();
    expected.sort();
    assert_eq!(targets, expected, "each name ended exactly once");

    let records = h.records();
    assert_eq!(records.len(), 2 * (CONCURRENT + 1), "{records:?}");
    // request_id -> (forward seq, result seq)
    let mut pairs: HashMap<String, (Vec<u64>, Vec<u64>)> = HashMap::new();
    for record in &records {
        let request_id = record["request_id"]
            .as_str()
            .expect("request_id")
            .to_owned();
        let seq = record["seq"].as_u64().expect("seq");
        let entry = pairs.entry(request_id).or_default();
        match record["event"].as_str() {
            Some("forward") => entry.0.push(seq),
            Some("result") => {
                assert_eq!(record["status"], 204, "{record}");
                assert_eq!(record["reason"], "ended", "{record}");
                assert_eq!(record["upstream_status"], 204, "{record}");
                assert_eq!(record["attempts"], 1, "{record}");
                entry.1.push(seq);
            }
            other => panic!("unexpected event {other:?}: {record}"),
        }
    }
    let results = records.iter().filter(|r| r["event"] == "result").count();
    assert_eq!(results, CONCURRENT + 1);
    let mut expected_ids: Vec<String> = names.iter().map(|(_, id)| id.clone()).collect();
    expected_ids.push("h2-first".to_owned());
    expected_ids.sort();
    let mut ids: Vec<String> = pairs.keys().cloned().collect();
    ids.sort();
    assert_eq!(ids, expected_ids);
    for (request_id, (forwards, results)) in &pairs {
        assert_eq!(forwards.len(), 1, "{request_id}: forwards {forwards:?}");
        assert_eq!(results.len(), 1, "{request_id}: results {results:?}");
        assert!(
            forwards[0] < results[0],
            "{request_id}: forward after result"
        );
    }
    h.assert_chain();
    h.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// Faults over HTTP/2
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_503_over_http2_is_retried_and_the_retry_succeeds() {
    let h = h2_harness(Options::default()).await;
    h.sim.push_fault(Fault::status(503, ""));
    let reply = h.end("billing-1", BILLING_TOKEN).await;
    assert_eq!(reply.status, 204, "{:?}", reply.body);
    let upstream = h.sim.requests();
    assert_eq!(upstream.len(), 2, "the 503 and the retry");
    assert_all_http2(&upstream);
    assert_eq!(
        h.sim.connection_count(),
        1,
        "the retry reuses the connection"
    );
    let result = last_result(&h);
    assert_eq!(result["status"], 204);
    assert_eq!(result["reason"], "ended");
    assert_eq!(result["attempts"], 2);
    assert_eq!(result["upstream_status"], 204);
    assert_eq!(
        h.assert_chain(),
        2,
        "one forward record, not one per attempt"
    );
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_over_http2_becomes_503_with_plivos_retry_after() {
    let h = h2_harness(Options::default()).await;
    h.sim.push_fault(Fault::Status {
        status: 429,
        headers: vec![("Retry-After".into(), "7".into())],
        body: r#"{"api_id":"rl-h2","error":"too many requests"}"#.into(),
    });
    let reply = h.end("billing-1", BILLING_TOKEN).await;
    reply.assert_problem(503, "upstream-rate-limited");
    assert_eq!(reply.header("retry-after"), Some("7"));
    assert_eq!(reply.json()["retry_after"], 7);
    let upstream = h.sim.requests();
    assert_eq!(upstream.len(), 1, "429 is not retried");
    assert_all_http2(&upstream);
    let result = last_result(&h);
    assert_eq!(result["status"], 503);
    assert_eq!(result["reason"], "upstream-rate-limited");
    assert_eq!(result["upstream_status"], 429);
    assert_eq!(result["plivo_api_id"], "rl-h2");
    assert_eq!(result["attempts"], 1);
    h.assert_chain();
    h.shutdown().await;
}

/// `Fault::Reset` drops the whole HTTP/2 connection with an RST. A reset is a
/// connect-class error (contract: retried), so the gateway opens a new connection and the
/// retry ends the MPC.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_http2_connection_is_retried_on_a_new_connection() {
    let h = h2_harness(Options::default()).await;
    warm_up(&h).await;
    h.sim.push_fault(Fault::Reset);
    let reply = h.end("billing-reset", BILLING_TOKEN).await;
    assert_eq!(
        reply.status,
        204,
        "reset then success; body {:?}; records {:?}",
        String::from_utf8_lossy(&reply.body),
        h.records().last()
    );
    let upstream = h.sim.requests();
    assert_eq!(
        upstream.len(),
        3,
        "warm-up, the reset attempt and the retry"
    );
    assert_all_http2(&upstream);
    assert_eq!(upstream[1].target, upstream_path("billing-reset"));
    assert_eq!(upstream[2].target, upstream_path("billing-reset"));
    assert_eq!(
        h.sim.connection_count(),
        2,
        "the retry runs on a new connection"
    );
    let result = last_result(&h);
    assert_eq!(result["status"], 204);
    assert_eq!(result["reason"], "ended");
    assert_eq!(result["upstream_status"], 204);
    assert_eq!(result["attempts"], 2);
    h.assert_chain();
    h.shutdown().await;
}

/// The upstream resets one stream (`RST_STREAM`, `INTERNAL_ERROR`) before answering: the
/// HTTP/2 form of a reset, retried like one, on the same connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_http2_stream_is_retried_on_the_same_connection() {
    let h = h2_harness(Options::default()).await;
    warm_up(&h).await;
    h.sim.push_fault(Fault::ResetStream);
    let reply = h.end("billing-stream-reset", BILLING_TOKEN).await;
    assert_eq!(
        reply.status,
        204,
        "{:?}",
        String::from_utf8_lossy(&reply.body)
    );
    let upstream = h.sim.requests();
    assert_eq!(upstream.len(), 3, "warm-up, the reset stream and the retry");
    assert_all_http2(&upstream);
    assert_eq!(upstream[2].target, upstream_path("billing-stream-reset"));
    assert_eq!(
        h.sim.connection_count(),
        1,
        "a stream reset keeps the connection"
    );
    let result = last_result(&h);
    assert_eq!(result["upstream_status"], 204);
    assert_eq!(result["attempts"], 2);
    h.assert_chain();
    h.shutdown().await;
}

/// A stream the upstream accepts and never answers ends with `504 upstream-timeout` at
/// the deadline, and the connection it was on gets no more calls: an upstream that
/// vanished without a reset would answer none of them. The next call goes out at once on
/// a new connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unanswered_http2_stream_times_out_and_the_next_call_uses_a_new_connection() {
    let timeout = Duration::from_secs(1);
    let h = h2_harness(Options {
        timeout: "1s",
        fsync: "never",
        ..Options::default()
    })
    .await;
    warm_up(&h).await;
    h.sim.push_fault(Fault::Hang);
    let (reply, took) = timed_end(&h, "billing-unanswered").await;
    reply.assert_problem(504, "upstream-timeout");
    assert!(
        took >= timeout - Duration::from_millis(50) && took <= timeout + SLACK,
        "answered after {took:?}, timeout {timeout:?}"
    );
    let result = last_result(&h);
    assert_eq!(result["status"], 504);
    assert_eq!(result["reason"], "upstream-timeout");
    assert_eq!(result["upstream_status"], serde_json::Value::Null);
    assert_eq!(result["attempts"], 1);

    let (reply, took) = timed_end(&h, "billing-after-unanswered").await;
    assert_eq!(
        reply.status, 204,
        "after the unanswered stream: {:?}",
        reply.body
    );
    assert!(took < timeout, "the next call is not held up: {took:?}");
    let result = last_result(&h);
    assert_eq!(result["status"], 204);
    assert_eq!(result["attempts"], 1);
    let upstream = h.sim.requests();
    assert_eq!(
        upstream.len(),
        3,
        "warm-up, the unanswered call, the next call"
    );
    assert_all_http2(&upstream);
    assert_eq!(
        h.sim.connection_count(),
        2,
        "the next call went on a new connection"
    );
    h.assert_chain();
    h.shutdown().await;
}

/// The upstream closes the connection gracefully (`GOAWAY`, `NO_ERROR`), as servers do
/// after a number of requests per connection: the call it came with succeeds, and every
/// later call goes out on a new connection at the first attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_goaway_later_calls_use_a_new_connection() {
    let h = h2_harness(Options::default()).await;
    warm_up(&h).await;
    h.sim.push_fault(Fault::GoAway);
    let reply = h.end("billing-goaway", BILLING_TOKEN).await;
    assert_eq!(
        reply.status,
        204,
        "{:?}",
        String::from_utf8_lossy(&reply.body)
    );
    assert_eq!(last_result(&h)["attempts"], 1);
    for call in 0..3 {
        let reply = h
            .end(&format!("billing-after-goaway-{call}"), BILLING_TOKEN)
            .await;
        assert_eq!(reply.status, 204, "call {call}: {:?}", reply.body);
        let result = last_result(&h);
        assert_eq!(result["attempts"], 1, "call {call} needed no retry");
    }
    let upstream = h.sim.requests();
    assert_eq!(upstream.len(), 5, "warm-up, the GOAWAY call and three more");
    assert_all_http2(&upstream);
    assert_eq!(
        h.sim.connection_count(),
        2,
        "one connection before the GOAWAY, one after"
    );
    h.assert_chain();
    h.shutdown().await;
}

/// An upstream that answers ALPN with HTTP/1.1: the connection that asked for `h2`
/// carries the first call instead of being thrown away, then joins the keep-alive pool
/// and carries the later ones too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http1_upstream_gets_the_first_call_on_the_alpn_connection() {
    let h = Harness::with(Options::default()).await;
    for call in 0..4 {
        let reply = h.end(&format!("billing-h1-{call}"), BILLING_TOKEN).await;
        assert_eq!(reply.status, 204, "call {call}: {:?}", reply.body);
        assert_eq!(last_result(&h)["attempts"], 1, "call {call}");
    }
    let upstream = h.sim.requests();
    assert_eq!(upstream.len(), 4);
    for (call, request) in upstream.iter().enumerate() {
        assert_eq!(request.version, "HTTP/1.1", "call {call}");
        assert_contract_upstream_request(request, &format!("billing-h1-{call}"));
    }
    assert_eq!(
        h.sim.connection_count(),
        1,
        "the ALPN connection, kept alive for every call"
    );
    h.assert_chain();
    h.shutdown().await;
}
