//! Hostile input (DESIGN.md §1 "Hostile input", issue 9): oversized request lines and
//! header blocks at their exact boundaries, invalid UTF-8 and overlong percent-encodings
//! in the name, raw non-ASCII bytes, `Transfer-Encoding`/`Content-Length` conflicts,
//! HTTP/1.0, pipelining, absolute-form targets and foreign Host headers, a flood of
//! unauthenticated requests, a header-count bomb and prior-knowledge h2c.
//!
//! Every case asserts the status the caller gets, that nothing reached the simulator
//! (unless the case is one that must be served), and what the audit log holds: a request
//! the HTTP layer parsed gets exactly one terminal record; what the HTTP layer itself
//! refuses gets none and is counted in `mpc_gateway_http_rejected_total` instead.
//! (Slowloris is in `tests/ops.rs`.)

use crate::common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{Method, Request};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use mpc_gateway::telemetry::sample;

/// How long a raw exchange waits for the gateway to answer and close.
const WAIT: Duration = Duration::from_secs(5);

const MAX_REQUEST_LINE: usize = 8 * 1024;
const MAX_HEADER_BLOCK: usize = 32 * 1024;

/// `METHOD target HTTP/1.1` with the given header lines (each without CRLF), an empty
/// body and `Content-Length: 0`.
fn request(method: &str, target: &str, headers: &[String]) -> String {
    let mut text = format!("{method} {target} HTTP/1.1\r\n");
    for line in headers {
        text.push_str(line);
        text.push_str("\r\n");
    }
    text.push_str("\r\n");
    text
}

/// The usual headers of a request that closes its connection after the answer.
fn closing_headers(token: Option<&str>) -> Vec<String> {
    let mut headers = vec!["Host: gateway".to_owned()];
    if let Some(token) = token {
        headers.push(format!("Authorization: Bearer {token}"));
    }
    headers.push("Content-Length: 0".to_owned());
    headers.push("Connection: close".to_owned());
    headers
}

/// `POST target` with the billing token, closing its connection after the answer.
fn post(target: &str) -> String {
    request("POST", target, &closing_headers(Some(BILLING_TOKEN)))
}

/// Asserts a problem+json answer with `status` and `slug`, whose `request_id` matches
/// its `X-Request-Id`.
fn assert_raw_problem(response: &RawResponse, status: u16, slug: &str) {
    assert_eq!(
        response.status,
        status,
        "status; body {:?}",
        String::from_utf8_lossy(&response.body)
    );
    assert_eq!(
        response.header("content-type"),
        Some("application/problem+json")
    );
    let body = response.json();
    assert_eq!(body["type"], format!("urn:mpc-gateway:{slug}"), "{body}");
    assert_eq!(body["status"], status);
    // Both sides required: comparing two Options would let None == None pass.
    let header = response
        .header("x-request-id")
        .expect("every response carries X-Request-Id");
    assert_eq!(body["request_id"].as_str(), Some(header), "{body}");
}

/// The value of one metric series (0 when absent).
async fn metric(h: &Harness, series: &str) -> f64 {
    sample(&metrics_text(h).await, series).unwrap_or(0.0)
}

/// Every audit record's `path` respects the contract's 256-byte bound.
fn assert_paths_bounded(h: &Harness) {
    for record in h.records() {
        let path = record["path"].as_str().unwrap_or_default();
        assert!(path.len() <= 256, "audit path of {} bytes", path.len());
    }
}

// ---------------------------------------------------------------------------------------
// Request line: 8 KiB
// ---------------------------------------------------------------------------------------

/// The request line is `METHOD SP target SP HTTP-version` without its CRLF; at exactly
/// 8 KiB it is served, one byte more is `414`, answered by the gateway (so it has its
/// `denied` record) and never forwarded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_line_of_exactly_8_kib_is_served_and_one_byte_more_is_414() {
    let h = Harness::start().await;
    let line_len = |target: &str| "POST ".len() + target.len() + " HTTP/1.1".len();
    let base = "/mpc/billing-line/end?pad=";
    let at_limit = format!("{base}{}", "q".repeat(MAX_REQUEST_LINE - line_len(base)));
    assert_eq!(line_len(&at_limit), MAX_REQUEST_LINE);

    let served = raw_send(h.addr(), post(&at_limit).as_bytes(), WAIT)
        .await
        .single();
    assert_eq!(
        served.status,
        204,
        "8 KiB request line: {:?}",
        String::from_utf8_lossy(&served.body)
    );
    assert_eq!(h.sim.request_count(), 1);

    let over = format!("{at_limit}q");
    assert_eq!(line_len(&over), MAX_REQUEST_LINE + 1);
    let refused = raw_send(h.addr(), post(&over).as_bytes(), WAIT)
        .await
        .single();
    assert_raw_problem(&refused, 414, "uri-too-long");
    assert_eq!(h.sim.request_count(), 1, "the 414 was not forwarded");

    let records = h.records();
    assert_eq!(records.len(), 3, "forward + result, then one denied");
    let denied = &records[2];
    assert_eq!(denied["event"], "denied");
    assert_eq!(denied["status"], 414);
    assert_eq!(denied["reason"], "uri-too-long");
    assert_eq!(
        denied["tenant"],
        serde_json::Value::Null,
        "refused before auth"
    );
    assert_eq!(
        denied["request_id"].as_str(),
        refused.header("x-request-id")
    );
    assert_paths_bounded(&h);
    h.assert_chain();
    h.shutdown().await;
}

/// "Request line over 8 KiB → 414" has no upper end: a line far over 8 KiB — also one
/// longer than the HTTP layer's whole read buffer — is still `414`, never forwarded.
/// Below hyper's own URI limit of 64 KiB (src/server/mod.rs, `MAX_HEAD_BYTES`) the
/// gateway answers: a problem body and a `denied` record with a bounded path. Above it
/// hyper answers a bare `414` itself: no record, one `http_rejected_total{kind="too-large"}`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_line_far_over_8_kib_is_414_too() {
    let h = Harness::start().await;
    const TOO_LARGE: &str = "mpc_gateway_http_rejected_total{kind=\"too-large\"}";
    for size in [16 * 1024, 40 * 1024, 48 * 1024] {
        let target = format!("/mpc/billing-1/end?pad={}", "q".repeat(size));
        let response = raw_send(h.addr(), post(&target).as_bytes(), WAIT)
            .await
            .single();
        assert_raw_problem(&response, 414, "uri-too-long");
        let denied = h.records().pop().expect("a denied record");
        assert_eq!(denied["event"], "denied", "{size}: {denied}");
        assert_eq!(denied["status"], 414, "{size}");
        assert_eq!(denied["reason"], "uri-too-long", "{size}");
        assert_eq!(
            denied["request_id"].as_str(),
            response.header("x-request-id"),
            "{size}: the record is this request's"
        );
    }
    assert_eq!(h.records().len(), 3, "one denied record each");
    assert_eq!(
        metric(&h, TOO_LARGE).await,
        0.0,
        "the gateway answered those"
    );

    let target = format!("/mpc/billing-1/end?pad={}", "q".repeat(64 * 1024));
    let outcome = raw_send(h.addr(), post(&target).as_bytes(), WAIT).await;
    let statuses: Vec<u16> = outcome.responses().iter().map(|r| r.status).collect();
    assert_eq!(statuses, [414], "{:?}", truncated(&outcome.text(), 300));
    assert_eq!(h.records().len(), 3, "hyper's own 414 has no record");
    assert_eq!(metric(&h, TOO_LARGE).await, 1.0, "it is counted instead");

    assert_eq!(h.sim.request_count(), 0);
    assert_paths_bounded(&h);
    h.assert_chain();
    h.shutdown().await;
}

/// HTTP puts no bound on a method token: one of 20 KiB makes the request line too long
/// (`414`), and its record keeps only the first 32 bytes of it, so an unauthenticated
/// caller cannot make the audit log grow by its head's size per request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_method_of_20_kib_is_414_and_cut_to_32_bytes_in_its_record() {
    let h = Harness::start().await;
    let method = "A".repeat(20 * 1024);
    let request = format!(
        "{method} /mpc/billing-1/end HTTP/1.1\r\nHost: gateway\r\nAuthorization: Bearer {BILLING_TOKEN}\r\nConnection: close\r\n\r\n"
    );
    let answer = raw_send(h.addr(), request.as_bytes(), WAIT).await.single();
    assert_raw_problem(&answer, 414, "uri-too-long");
    let records = h.records();
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0]["event"], "denied");
    assert_eq!(records[0]["method"], "A".repeat(32));
    assert_eq!(h.sim.request_count(), 0);
    h.assert_chain();
    h.shutdown().await;
}

/// A name may hold a right-to-left override or a zero-width space (the contract refuses
/// only control characters); its records spell them `\u202e` and `\u200b`, so `cat`,
/// `less` or `tail -f` of the log shows what was recorded, and read as JSON the record
/// has the name exactly as sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invisible_characters_in_a_name_are_escaped_in_the_raw_log() {
    let h = Harness::start().await;
    let reply = h.end("billing-%E2%80%AEdne%E2%80%8B", BILLING_TOKEN).await;
    assert_eq!(reply.status, 204, "{:?}", reply.body);
    let raw = std::fs::read_to_string(&h.audit_path).expect("audit log");
    assert!(raw.contains(r#""mpc":"billing-\u202edne\u200b""#), "{raw}");
    assert!(!raw.contains(['\u{202e}', '\u{200b}']), "{raw}");
    let records = h.records();
    assert_eq!(records.len(), 2);
    assert!(records
        .iter()
        .all(|r| r["mpc"] == "billing-\u{202e}dne\u{200b}"));
    h.assert_chain();
    h.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// Header block: 32 KiB
// ---------------------------------------------------------------------------------------

/// Header lines (without CRLF) whose block — the sum of `name: value\r\n` over all
/// header fields — is exactly `total` bytes; the last pad header absorbs the remainder.
fn header_block_of(total: usize) -> Vec<String> {
    let mut headers = closing_headers(Some(BILLING_TOKEN));
    let cost = |line: &String| line.len() + 2;
    let mut used: usize = headers.iter().map(cost).sum();
    let mut index = 0;
    // Few enough fields to stay under the count limit, whatever the size.
    let pad = (total / 32).max(1000);
    // "X-Pad-NNN: " + value + CRLF = value + 13 bytes.
    while total - used > pad + 13 + 14 {
        let line = format!("X-Pad-{index:03}: {}", "p".repeat(pad));
        used += cost(&line);
        headers.push(line);
        index += 1;
    }
    let last = format!("X-Pad-{index:03}: {}", "p".repeat(total - used - 13));
    used += cost(&last);
    headers.push(last);
    assert_eq!(used, total);
    assert!(
        headers.len() < mpc_gateway::gateway::MAX_HEADER_FIELDS,
        "under the header-count limit"
    );
    headers
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_block_of_exactly_32_kib_is_served_and_one_byte_more_is_431() {
    let h = Harness::start().await;
    let at_limit = request(
        "POST",
        "/mpc/billing-head/end",
        &header_block_of(MAX_HEADER_BLOCK),
    );
    let served = raw_send(h.addr(), at_limit.as_bytes(), WAIT).await.single();
    assert_eq!(
        served.status,
        204,
        "32 KiB header block: {:?}",
        String::from_utf8_lossy(&served.body)
    );
    assert_eq!(h.sim.request_count(), 1);
    let sent = h.sim.requests().pop().expect("forwarded");
    assert!(
        sent.headers
            .iter()
            .all(|(name, _)| !name.starts_with("x-pad")),
        "caller headers are never sent upstream"
    );

    let over = request(
        "POST",
        "/mpc/billing-head/end",
        &header_block_of(MAX_HEADER_BLOCK + 1),
    );
    let refused = raw_send(h.addr(), over.as_bytes(), WAIT).await.single();
    assert_raw_problem(&refused, 431, "request-header-fields-too-large");
    assert_eq!(h.sim.request_count(), 1, "the 431 was not forwarded");
    let denied = h.records().pop().expect("record");
    assert_eq!(denied["event"], "denied");
    assert_eq!(denied["status"], 431);
    assert_eq!(
        denied["tenant"],
        serde_json::Value::Null,
        "refused before auth"
    );
    h.assert_chain();
    h.shutdown().await;
}

/// A header block larger than the HTTP layer's read buffer (about 97 KiB: a 64 KiB request
/// line plus 32 KiB of headers) is refused by the HTTP layer itself: still `431`, no
/// audit record, counted as `too-large`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_block_beyond_the_read_buffer_is_431_from_the_http_layer() {
    let h = Harness::start().await;
    let huge = request("POST", "/mpc/billing-1/end", &header_block_of(128 * 1024));
    assert_431_from_the_http_layer(&h, huge.as_bytes()).await;
    h.shutdown().await;
}

/// Exactly `MAX_HEADER_FIELDS` (100) header fields are served; one more is `431` from the HTTP
/// layer, before any request exists (no audit record, nothing forwarded).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_header_fields_are_served_and_one_more_is_431() {
    let h = Harness::start().await;
    let with_fields = |total: usize| {
        let mut headers = closing_headers(Some(BILLING_TOKEN));
        let padding = total - headers.len();
        headers.extend((0..padding).map(|i| format!("x-pad-{i}: y")));
        assert_eq!(headers.len(), total);
        request("POST", "/mpc/billing-100/end", &headers)
    };
    let limit = mpc_gateway::gateway::MAX_HEADER_FIELDS;
    let at_limit = raw_send(h.addr(), with_fields(limit).as_bytes(), WAIT).await;
    assert_eq!(at_limit.single().status, 204, "{limit} fields are served");
    let over = raw_send(h.addr(), with_fields(limit + 1).as_bytes(), WAIT).await;
    assert_eq!(
        over.single().status,
        431,
        "{} fields are refused",
        limit + 1
    );
    assert_eq!(h.sim.request_count(), 1, "only the first was forwarded");
    assert_eq!(h.records().len(), 2, "forward and result of the first only");
    h.shutdown().await;
}

/// 10,000 one-byte headers: far past the header-count limit, refused by the HTTP layer with
/// `431` before any request exists.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_tiny_headers_are_431_from_the_http_layer() {
    let h = Harness::start().await;
    let mut headers = closing_headers(Some(BILLING_TOKEN));
    headers.extend((0..10_000).map(|i| format!("x{i}: y")));
    let bomb = request("POST", "/mpc/billing-1/end", &headers);
    assert_431_from_the_http_layer(&h, bomb.as_bytes()).await;
    h.shutdown().await;
}

/// Sends `bytes` and asserts what the HTTP layer does with a header block it will not
/// parse: one `431`, the connection closed, nothing forwarded or audited, and the refusal
/// counted once as `too-large`.
async fn assert_431_from_the_http_layer(h: &Harness, bytes: &[u8]) {
    let outcome = raw_send(h.addr(), bytes, WAIT).await;
    assert!(outcome.closed, "the connection is closed");
    let responses = outcome.responses();
    assert_eq!(responses.len(), 1, "{:?}", truncated(&outcome.text(), 300));
    assert_eq!(responses[0].status, 431);
    assert_eq!(h.sim.request_count(), 0);
    assert!(h.records().is_empty(), "not parsed: no audit record");
    let series = "mpc_gateway_http_rejected_total{kind=\"too-large\"}";
    assert!(
        eventually_async(Duration::from_secs(3), || async {
            metric(h, series).await == 1.0
        })
        .await,
        "{series} counted once:\n{}",
        metrics_text(h).await
    );
}

// ---------------------------------------------------------------------------------------
// Names: invalid UTF-8, overlong encodings, raw bytes
// ---------------------------------------------------------------------------------------

/// Overlong encodings, surrogates, code points past U+10FFFF and other invalid UTF-8 are
/// `400 invalid-mpc-name` — after authentication: an anonymous caller gets `401` for the
/// same path. Even a tenant allowed `*` cannot get one forwarded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_utf8_and_overlong_encodings_are_invalid_names_after_auth() {
    let h = Harness::start().await;
    let segments = [
        ("overlong /", "billing-%C0%AF"),
        ("3-byte overlong /", "billing-%E0%80%AF"),
        ("4-byte overlong /", "billing-%F0%80%80%AF"),
        ("overlong NUL", "billing-%C0%80"),
        ("surrogate D800", "billing-%ED%A0%80"),
        ("surrogate DFFF", "billing-%ED%BF%BF"),
        ("past U+10FFFF", "billing-%F4%90%80%80"),
        ("5-byte form", "billing-%F8%88%80%80%80"),
        ("lone continuation", "billing-%80"),
        ("truncated sequence", "billing-%E2%82"),
        ("0xFE", "billing-%FE"),
        ("overlong . .", "%C0%AE%C0%AE"),
        ("dangling %", "billing-%"),
        ("bad hex", "billing-%G1"),
        ("double-encoded /", "billing-%252F"),
    ];
    let mut expected_records = 0;
    for (what, segment) in segments {
        let path = format!("/mpc/{segment}/end");
        let anonymous = h.send(Method::POST, &path, &[], b"").await;
        anonymous.assert_problem(401, "unauthenticated");
        let body = String::from_utf8_lossy(&anonymous.body).to_lowercase();
        assert!(
            !body.contains("mpc name") && !body.contains("utf-8") && !body.contains("invalid"),
            "{what}: an anonymous caller learns nothing about names: {body}"
        );
        for token in [BILLING_TOKEN, OPS_TOKEN] {
            let reply = h.end(segment, token).await;
            assert_eq!(reply.status, 400, "{what} ({segment}): {:?}", reply.body);
            reply.assert_problem(400, "invalid-mpc-name");
            let record = h.records().pop().expect("record");
            assert_eq!(record["event"], "denied", "{what}");
            assert_eq!(record["reason"], "invalid-mpc-name", "{what}");
            assert_eq!(record["mpc"], serde_json::Value::Null, "{what}");
            assert!(record["tenant"].is_string(), "{what}: authenticated first");
        }
        expected_records += 3;
    }
    assert_eq!(h.sim.request_count(), 0, "nothing forwarded");
    assert_eq!(
        h.records().len(),
        expected_records,
        "one record per request"
    );
    h.assert_chain();
    h.shutdown().await;
}

/// Raw bytes >= 0x80 in the request target are not HTTP: whoever refuses them (the HTTP
/// layer or the gateway), the request is never forwarded and the connection is answered
/// with a 4xx or closed — never left hanging, never a success.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_non_ascii_bytes_in_the_target_are_never_forwarded() {
    let h = Harness::start().await;
    let targets: [&[u8]; 5] = [
        b"/mpc/billing-\xC3\xA4/end",
        b"/mpc/billing-\xFF/end",
        b"/mpc/billing-\x80/end",
        b"/mpc/billing-\xC0\xAF/end",
        b"/mpc/billing-1/end?q=\xE9",
    ];
    let mut failures = Vec::new();
    // The request ids of the answers the gateway itself gave (problem+json); hyper's
    // own refusals carry neither a body nor a record.
    let mut answered_by_gateway = Vec::new();
    for target in targets {
        let mut raw = b"POST ".to_vec();
        raw.extend_from_slice(target);
        raw.extend_from_slice(
            format!(
                " HTTP/1.1\r\nHost: gateway\r\nAuthorization: Bearer {BILLING_TOKEN}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            )
            .as_bytes(),
        );
        let before = h.sim.request_count();
        let outcome = raw_send(h.addr(), &raw, WAIT).await;
        let shown = String::from_utf8_lossy(target).into_owned();
        let responses = outcome.responses();
        let statuses: Vec<u16> = responses.iter().map(|r| r.status).collect();
        for response in &responses {
            if response.header("content-type") == Some("application/problem+json") {
                let id = response
                    .header("x-request-id")
                    .expect("the gateway's answer carries X-Request-Id");
                answered_by_gateway.push(id.to_owned());
            }
        }
        let forwarded = h.sim.request_count() - before;
        let refused = statuses.iter().all(|s| (400..500).contains(s));
        if !(outcome.closed && refused && forwarded == 0) {
            failures.push(format!(
                "{shown}: answered {statuses:?}, closed {}, forwarded {forwarded}",
                outcome.closed
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "raw non-ASCII targets must be refused (4xx or closed) and never forwarded:\n{}",
        failures.join("\n")
    );
    // Whatever the gateway itself answered has its denied record, and nothing else has
    // one (counted, so that a log with no records cannot pass by having none to check).
    let denied: Vec<String> = h
        .records()
        .iter()
        .map(|record| {
            assert_eq!(record["event"], "denied", "{record}");
            record["request_id"]
                .as_str()
                .expect("a denied record has a request_id")
                .to_owned()
        })
        .collect();
    assert_eq!(
        denied, answered_by_gateway,
        "one denied record per answer of the gateway's own, in order"
    );
    h.assert_chain();
    h.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// Framing: Transfer-Encoding and Content-Length
// ---------------------------------------------------------------------------------------

/// A request smuggled behind the first one: it must never be forwarded.
fn smuggled() -> String {
    format!(
        "POST /mpc/billing-smuggled/end HTTP/1.1\r\nHost: gateway\r\nAuthorization: Bearer {BILLING_TOKEN}\r\nContent-Length: 0\r\n\r\n"
    )
}

/// Who refused a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RefusedBy {
    /// The gateway: `400 bad-request` problem+json, `Connection: close`, a `denied` record.
    Gateway,
    /// The HTTP layer, before the request was parsed: hyper's bare `400`, no record,
    /// counted as `http_rejected_total{kind="malformed"}`.
    HttpLayer,
}

/// Asserts one `400` answer, a closed connection and nothing smuggled through; says who
/// answered, so the caller can account for each refusal in the audit log or the metric.
fn assert_refused_and_closed(what: &str, outcome: &RawOutcome) -> RefusedBy {
    let responses = outcome.responses();
    assert_eq!(
        responses.len(),
        1,
        "{what}: exactly one answer, nothing smuggled: {:?}",
        truncated(&outcome.text(), 600)
    );
    assert_eq!(responses[0].status, 400, "{what}: {:?}", outcome.text());
    assert!(outcome.closed, "{what}: the connection is closed");
    match responses[0].header("content-type") {
        Some("application/problem+json") => {
            assert!(responses[0].closes(), "{what}: Connection: close");
            assert_raw_problem(&responses[0], 400, "bad-request");
            RefusedBy::Gateway
        }
        other => {
            assert_eq!(other, None, "{what}: hyper's own 400 has no body");
            RefusedBy::HttpLayer
        }
    }
}

const MALFORMED: &str = "mpc_gateway_http_rejected_total{kind=\"malformed\"}";

/// Every refusal is accounted for: one `denied 400 bad-request` record per gateway
/// answer, one `malformed` count per HTTP-layer answer.
async fn assert_each_refusal_recorded(h: &Harness, refusals: &[RefusedBy]) {
    let by_gateway = refusals
        .iter()
        .filter(|r| **r == RefusedBy::Gateway)
        .count();
    let by_http = refusals.len() - by_gateway;
    let records = h.records();
    assert_eq!(
        records.len(),
        by_gateway,
        "one record per gateway answer: {records:?}"
    );
    for record in &records {
        assert_eq!(record["event"], "denied");
        assert_eq!(record["status"], 400);
        assert_eq!(record["reason"], "bad-request");
    }
    #[allow(clippy::cast_precision_loss)]
    let expected = by_http as f64;
    assert!(
        eventually_async(Duration::from_secs(3), || async {
            metric(h, MALFORMED).await == expected
        })
        .await,
        "{MALFORMED} is {by_http}:\n{}",
        metrics_text(h).await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfer_encoding_with_content_length_is_400_and_closes() {
    let h = Harness::start().await;
    let auth = format!("Authorization: Bearer {BILLING_TOKEN}");
    let cases = [
        (
            "TE then CL",
            format!(
                "POST /mpc/billing-te1/end HTTP/1.1\r\nHost: x\r\n{auth}\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n{}",
                smuggled()
            ),
        ),
        (
            "CL then TE",
            format!(
                "POST /mpc/billing-te2/end HTTP/1.1\r\nHost: x\r\n{auth}\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{}",
                smuggled()
            ),
        ),
        (
            "CL 0 hiding a chunked body",
            format!(
                "POST /mpc/billing-te3/end HTTP/1.1\r\nHost: x\r\n{auth}\r\nContent-Length: 0\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{}\r\n0\r\n\r\n",
                smuggled().len(),
                smuggled()
            ),
        ),
    ];
    for (what, raw) in &cases {
        let outcome = raw_send(h.addr(), raw.as_bytes(), WAIT).await;
        // hyper drops the Content-Length and hands the gateway a chunked request, which
        // it refuses like every Transfer-Encoding.
        assert_eq!(
            assert_refused_and_closed(what, &outcome),
            RefusedBy::Gateway,
            "{what}"
        );
    }
    assert_eq!(h.sim.request_count(), 0, "nothing forwarded");
    assert_each_refusal_recorded(&h, &[RefusedBy::Gateway; 3]).await;
    h.assert_chain();
    h.shutdown().await;
}

/// The contract lets the gateway refuse every `Transfer-Encoding` (no route takes a
/// streamed body): `chunked` alone is `400 bad-request` with `Connection: close`, and so
/// is every other coding or list.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_transfer_encoding_is_400_and_closes() {
    let h = Harness::start().await;
    let auth = format!("Authorization: Bearer {BILLING_TOKEN}");
    let mut refusals = Vec::new();
    for coding in [
        "chunked",
        "Chunked",
        "chunked, chunked",
        "gzip, chunked",
        "gzip",
        "identity",
        "chunked, gzip",
    ] {
        let raw = format!(
            "POST /mpc/billing-te/end HTTP/1.1\r\nHost: x\r\n{auth}\r\nTransfer-Encoding: {coding}\r\n\r\n0\r\n\r\n{}",
            smuggled()
        );
        let outcome = raw_send(h.addr(), raw.as_bytes(), WAIT).await;
        refusals.push(assert_refused_and_closed(coding, &outcome));
    }
    assert_eq!(
        refusals[0],
        RefusedBy::Gateway,
        "chunked alone reaches the gateway, which answers it"
    );
    assert_each_refusal_recorded(&h, &refusals).await;
    assert_eq!(h.sim.request_count(), 0, "nothing forwarded");
    h.assert_chain();
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conflicting_content_lengths_are_400_and_never_forwarded() {
    let h = Harness::start().await;
    let auth = format!("Authorization: Bearer {BILLING_TOKEN}");
    let mut refusals = Vec::new();
    for (what, lengths) in [
        ("two different", "Content-Length: 0\r\nContent-Length: 5"),
        (
            "different, other order",
            "Content-Length: 5\r\nContent-Length: 0",
        ),
        ("list of different", "Content-Length: 0, 5"),
        ("negative", "Content-Length: -1"),
        ("signed", "Content-Length: +0"),
        ("hex", "Content-Length: 0x0"),
    ] {
        let raw = format!(
            "POST /mpc/billing-cl/end HTTP/1.1\r\nHost: x\r\n{auth}\r\n{lengths}\r\n\r\n{}",
            smuggled()
        );
        let outcome = raw_send(h.addr(), raw.as_bytes(), WAIT).await;
        refusals.push(assert_refused_and_closed(what, &outcome));
    }
    assert_eq!(h.sim.request_count(), 0, "nothing forwarded");
    assert_each_refusal_recorded(&h, &refusals).await;
    h.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// HTTP/1.0 and pipelining
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_1_0_is_served_and_the_connection_closes_after() {
    let h = Harness::start().await;
    let raw = format!(
        "POST /mpc/billing-http10/end HTTP/1.0\r\nAuthorization: Bearer {BILLING_TOKEN}\r\nX-Request-Id: http10-req\r\nContent-Length: 0\r\n\r\n"
    );
    let outcome = raw_send(h.addr(), raw.as_bytes(), WAIT).await;
    let response = outcome.single();
    assert_eq!(response.status, 204, "{:?}", outcome.text());
    assert_eq!(response.header("x-request-id"), Some("http10-req"));
    assert!(
        outcome.closed && outcome.read_error.is_none(),
        "an HTTP/1.0 request without keep-alive is answered, then the connection closes"
    );
    assert_eq!(h.sim.request_count(), 1);
    let events: Vec<_> = h
        .records()
        .iter()
        .map(|r| (r["event"].clone(), r["request_id"].clone()))
        .collect();
    assert_eq!(
        events,
        vec![
            ("forward".into(), "http10-req".into()),
            ("result".into(), "http10-req".into())
        ]
    );
    h.shutdown().await;
}

/// Three requests in one write on one connection: three answers in order, each with its
/// own request id and audit record(s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_are_answered_in_order_each_with_its_own_id_and_record() {
    let h = Harness::start().await;
    let first = format!(
        "POST /mpc/billing-pipe-1/end HTTP/1.1\r\nHost: gateway\r\nAuthorization: Bearer {BILLING_TOKEN}\r\nX-Request-Id: pipe-1\r\nContent-Length: 0\r\n\r\n"
    );
    // No id and no token: a fresh id, 401.
    let second =
        "POST /mpc/billing-pipe-2/end HTTP/1.1\r\nHost: gateway\r\nContent-Length: 0\r\n\r\n";
    let third = format!(
        "POST /mpc/billing-pipe-3/end HTTP/1.1\r\nHost: gateway\r\nAuthorization: Bearer {BILLING_TOKEN}\r\nX-Request-Id: pipe-3\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    let raw = format!("{first}{second}{third}");
    let outcome = raw_send(h.addr(), raw.as_bytes(), WAIT).await;
    assert!(outcome.closed, "closed after the third (Connection: close)");
    let responses = outcome.responses();
    let statuses: Vec<u16> = responses.iter().map(|r| r.status).collect();
    assert_eq!(statuses, [204, 401, 204], "{:?}", outcome.text());
    let ids: Vec<&str> = responses
        .iter()
        .map(|r| r.header("x-request-id").expect("every answer has an id"))
        .collect();
    assert_eq!(ids[0], "pipe-1");
    assert!(
        uuid::Uuid::parse_str(ids[1]).is_ok(),
        "fresh id: {}",
        ids[1]
    );
    assert_eq!(ids[2], "pipe-3");

    let upstream: Vec<String> = h.sim.requests().into_iter().map(|r| r.target).collect();
    assert_eq!(
        upstream,
        [
            format!("/v1/Account/{AUTH_ID}/MultiPartyCall/name_billing-pipe-1/"),
            format!("/v1/Account/{AUTH_ID}/MultiPartyCall/name_billing-pipe-3/"),
        ]
    );
    let events: Vec<(String, String)> = h
        .records()
        .iter()
        .map(|r| {
            (
                r["event"].as_str().unwrap_or_default().to_owned(),
                r["request_id"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    let expected: Vec<(String, String)> = [
        ("forward", "pipe-1"),
        ("result", "pipe-1"),
        ("denied", ids[1]),
        ("forward", "pipe-3"),
        ("result", "pipe-3"),
    ]
    .iter()
    .map(|(e, id)| ((*e).to_owned(), (*id).to_owned()))
    .collect();
    assert_eq!(events, expected);
    h.assert_chain();
    h.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// Where the gateway connects: absolute-form targets and Host
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absolute_form_and_foreign_host_never_change_where_the_gateway_connects() {
    let h = Harness::start().await;
    let sim_host = format!("localhost:{}", h.sim.local_addr().port());
    let auth = format!("Authorization: Bearer {BILLING_TOKEN}");
    // A listener the gateway must never be steered to.
    let decoy = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind decoy");
    let decoy_addr = decoy.local_addr().expect("decoy addr");
    let cases = [
        (
            "absolute-form to another host",
            format!(
                "POST http://evil.example:81/mpc/billing-abs1/end HTTP/1.1\r\nHost: evil.example:81\r\n{auth}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            ),
            "billing-abs1",
        ),
        (
            "absolute-form https to a loopback decoy",
            format!(
                "POST https://{decoy_addr}/mpc/billing-abs2/end HTTP/1.1\r\nHost: {decoy_addr}\r\n{auth}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            ),
            "billing-abs2",
        ),
        (
            "origin-form with a foreign Host",
            format!(
                "POST /mpc/billing-host/end HTTP/1.1\r\nHost: {decoy_addr}\r\n{auth}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            ),
            "billing-host",
        ),
        (
            "absolute-form and Host disagree",
            format!(
                "POST http://evil.example/mpc/billing-abs3/end HTTP/1.1\r\nHost: other.example\r\n{auth}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            ),
            "billing-abs3",
        ),
    ];
    for (what, raw, name) in &cases {
        let outcome = raw_send(h.addr(), raw.as_bytes(), WAIT).await;
        let response = outcome.single();
        assert_eq!(response.status, 204, "{what}: {:?}", outcome.text());
        let sent = h.sim.requests().pop().expect("forwarded to the simulator");
        assert_eq!(
            sent.target,
            format!("/v1/Account/{AUTH_ID}/MultiPartyCall/name_{name}/"),
            "{what}"
        );
        assert_eq!(
            sent.header("host"),
            Some(sim_host.as_str()),
            "{what}: the upstream Host is the configured upstream's"
        );
    }
    assert_eq!(h.sim.request_count(), cases.len() as u64);

    // Pointing an absolute-form target straight at the upstream does not skip anything:
    // the path decides the route, and that route wants its own credentials.
    let direct = format!(
        "DELETE https://{sim_host}/v1/Account/{AUTH_ID}/MultiPartyCall/name_billing-direct/ HTTP/1.1\r\nHost: {sim_host}\r\n{auth}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    let outcome = raw_send(h.addr(), direct.as_bytes(), WAIT).await;
    assert_eq!(outcome.single().status, 401, "{:?}", outcome.text());

    // Other request-target forms are not routes.
    for (what, raw) in [
        (
            "authority-form CONNECT",
            format!(
                "CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n{auth}\r\n\r\n"
            ),
        ),
        (
            "asterisk-form OPTIONS",
            format!("OPTIONS * HTTP/1.1\r\nHost: x\r\n{auth}\r\nConnection: close\r\n\r\n"),
        ),
    ] {
        let outcome = raw_send(h.addr(), raw.as_bytes(), Duration::from_secs(2)).await;
        let responses = outcome.responses();
        assert_eq!(
            responses.len(),
            1,
            "{what}: one answer: {:?}",
            outcome.text()
        );
        assert!(
            (400..500).contains(&responses[0].status),
            "{what}: {}",
            responses[0].status
        );
    }
    assert_eq!(
        h.sim.request_count(),
        cases.len() as u64,
        "nothing else forwarded"
    );
    // The decoy never saw a connection.
    let accepted = tokio::time::timeout(Duration::from_millis(100), decoy.accept()).await;
    assert!(accepted.is_err(), "the gateway connected to the decoy");

    // The audit path is the raw request target (cut at 256 bytes).
    let paths: Vec<String> = h
        .records()
        .iter()
        .filter(|r| r["event"] == "result")
        .map(|r| r["path"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(paths[0], "http://evil.example:81/mpc/billing-abs1/end");
    assert_eq!(paths[2], "/mpc/billing-host/end");
    h.assert_chain();
    h.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// Floods
// ---------------------------------------------------------------------------------------

/// 500 unauthenticated requests over 5 kept-alive connections: all `401`, nothing
/// forwarded.
///
/// The audit bound: the contract gives every request the HTTP layer parses exactly one
/// terminal record, so the audit log grows by one record per request — a flood cannot be
/// summarised or dropped without breaking that promise (and no limiter applies before
/// authentication: there is no tenant yet). What the gateway must bound is the size of
/// each record, whatever the caller sends: `path` is cut at 256 bytes, `request_id` is
/// at most 128 visible characters, `token_fp` is 12 hex digits however long the token,
/// and the rest has a fixed shape. So each record stays under 1 KiB, and the flood adds
/// exactly 500 records and less than 500 KiB. The requests here are built to push each
/// bound: 2 KiB query strings, 128-character ids, 4 KiB bogus tokens.
///
/// The operational log is bounded more strictly: see
/// `a_flood_of_refusals_adds_no_operational_log_lines`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_unauthenticated_requests_is_refused_with_bounded_audit_volume() {
    const CONNECTIONS: usize = 5;
    const PER_CONNECTION: usize = 100;
    let h = Harness::start().await;
    let addr = h.addr();
    let mut tasks = Vec::new();
    for connection in 0..CONNECTIONS {
        tasks.push(tokio::spawn(async move {
            let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .expect("handshake");
            let driver = tokio::spawn(conn);
            let bogus = format!("Bearer {}", "z".repeat(4096));
            let mut statuses = Vec::new();
            for i in 0..PER_CONNECTION {
                let id = format!("{connection}-{i:03}-{}", "r".repeat(122));
                assert_eq!(id.len(), 128, "the longest id the gateway keeps");
                let mut builder = Request::builder()
                    .method(Method::POST)
                    .uri(format!("/mpc/billing-{i}/end?flood={}", "f".repeat(2048)))
                    .header("host", "gateway")
                    .header("x-request-id", id.as_str());
                if i % 2 == 1 {
                    builder = builder.header("authorization", bogus.as_str());
                }
                let request = builder.body(Empty::<Bytes>::new()).expect("request");
                tokio::time::timeout(WAIT, sender.ready())
                    .await
                    .expect("connection ready in time")
                    .expect("connection kept alive");
                let response = tokio::time::timeout(WAIT, sender.send_request(request))
                    .await
                    .expect("answered in time")
                    .expect("answered");
                let status = response.status().as_u16();
                let www = response
                    .headers()
                    .get("www-authenticate")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned);
                let _ = response.into_body().collect().await;
                statuses.push((status, www));
            }
            drop(sender);
            let _ = tokio::time::timeout(WAIT, driver).await;
            statuses
        }));
    }
    let mut answered = 0;
    for task in tasks {
        for (status, www) in task.await.expect("flood task") {
            assert_eq!(status, 401);
            assert_eq!(www.as_deref(), Some("Bearer"));
            answered += 1;
        }
    }
    assert_eq!(answered, CONNECTIONS * PER_CONNECTION);
    assert_eq!(h.sim.request_count(), 0, "nothing forwarded");

    let records = h.records();
    assert_eq!(
        records.len(),
        CONNECTIONS * PER_CONNECTION,
        "exactly one record per parsed request"
    );
    assert!(records
        .iter()
        .all(|r| r["event"] == "denied" && r["reason"] == "unauthenticated"));
    let text = std::fs::read_to_string(&h.audit_path).expect("audit");
    for line in text.lines() {
        assert!(line.len() < 1024, "a record of {} bytes", line.len());
        assert!(
            !line.contains("zzzzzzzzzzzzzzzz"),
            "the token is never logged"
        );
    }
    let size = std::fs::metadata(&h.audit_path).expect("audit").len();
    assert!(
        size < (CONNECTIONS * PER_CONNECTION * 1024) as u64,
        "audit file of {size} bytes"
    );
    assert_eq!(
        metric(
            &h,
            "mpc_gateway_requests_total{tenant=\"\",reason=\"unauthenticated\"}"
        )
        .await,
        (CONNECTIONS * PER_CONNECTION) as f64
    );
    h.assert_chain();
    h.shutdown().await;
}

/// The operational log has no duty to record each request, so its bound is stricter: a
/// flood of refusals is counted in metrics and adds (almost) nothing to the log of the
/// real `serve` process at its default level. 500 refusals of every pre-authentication
/// kind (no token, unknown token, bad name, unknown path, wrong method, oversized body)
/// may add at most 5 lines.
#[test]
fn a_flood_of_refusals_adds_no_operational_log_lines() {
    use std::io::{BufRead, BufReader, Read, Write};
    const CONNECTIONS: usize = 5;
    const PER_CONNECTION: usize = 100;
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().display().to_string();
    std::fs::write(dir.path().join("plivo-token"), AUTH_TOKEN).expect("write");
    // The upstream is never reached: nothing here gets past authentication.
    let yaml = format!(
        r#"listen: 127.0.0.1:0
admin_listen: 127.0.0.1:0
shutdown_grace: 2s
accounts:
  default:
    auth_id: {AUTH_ID}
    auth_token: {{file: "{root}/plivo-token"}}
upstream:
  base_url: https://127.0.0.1:9
tenants:
  billing:
    tokens: ["{}"]
    allow: ["billing-*"]
audit:
  path: "{root}/audit.jsonl"
  fsync: always
log:
  format: json
  level: info
"#,
        token_hash(BILLING_TOKEN)
    );
    let config = dir.path().join("gateway.yaml");
    std::fs::write(&config, yaml).expect("write config");
    /// Kills the child if the test panics before it exits.
    struct KillOnDrop(std::process::Child);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            if matches!(self.0.try_wait(), Ok(None)) {
                let _ = self.0.kill();
                let _ = self.0.wait();
            }
        }
    }
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_mpc-gateway"))
        .args(["serve", "--config", config.to_str().expect("UTF-8")])
        .env_remove("RUST_LOG")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn serve");
    let mut child = KillOnDrop(child);
    let (lines_tx, lines_rx) = std::sync::mpsc::channel::<String>();
    let stderr = child.0.stderr.take().expect("stderr");
    let reader = std::thread::spawn(move || {
        let mut all = Vec::new();
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            let _ = lines_tx.send(line.clone());
            all.push(line);
        }
        all
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let addr = loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let Ok(line) = lines_rx.recv_timeout(left) else {
            panic!("serve did not log its address within 15 s");
        };
        let value: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
        if let Some(addr) = value["local_addr"]
            .as_str()
            .and_then(|a| a.parse::<std::net::SocketAddr>().ok())
        {
            break addr;
        }
    };

    let refusals = [
        ("/mpc/billing-1/end", "POST", String::new(), 401),
        (
            "/mpc/billing-1/end",
            "POST",
            format!("Authorization: Bearer {}\r\n", "z".repeat(2048)),
            401,
        ),
        ("/mpc/%C0%AF/end", "POST", String::new(), 401),
        ("/nowhere", "GET", String::new(), 404),
        ("/mpc/billing-1/end", "GET", String::new(), 405),
    ];
    let workers: Vec<_> = (0..CONNECTIONS)
        .map(|connection| {
            let refusals = refusals.clone();
            std::thread::spawn(move || {
                let mut stream = std::net::TcpStream::connect(addr).expect("connect");
                stream
                    .set_read_timeout(Some(Duration::from_secs(10)))
                    .expect("timeout");
                // All requests pipelined in one write; the last one closes.
                let mut batch = String::new();
                let mut expected = Vec::new();
                for i in 0..PER_CONNECTION {
                    let (path, method, extra, status) = &refusals[(connection + i) % 5];
                    let close = if i + 1 == PER_CONNECTION {
                        "Connection: close\r\n"
                    } else {
                        ""
                    };
                    batch.push_str(&format!(
                        "{method} {path} HTTP/1.1\r\nHost: gateway\r\n{extra}{close}Content-Length: 0\r\n\r\n"
                    ));
                    expected.push(*status);
                }
                stream.write_all(batch.as_bytes()).expect("write");
                let mut answer = Vec::new();
                let _ = stream.read_to_end(&mut answer);
                let statuses: Vec<u16> = parse_responses(&answer)
                    .0
                    .iter()
                    .map(|r| r.status)
                    .collect();
                assert_eq!(statuses, expected, "connection {connection}");
                statuses.len()
            })
        })
        .collect();
    let answered: usize = workers.into_iter().map(|w| w.join().expect("worker")).sum();
    assert_eq!(answered, CONNECTIONS * PER_CONNECTION);

    // SIGTERM, so the whole log is flushed and read before counting.
    let status = std::process::Command::new("kill")
        .args(["-TERM", &child.0.id().to_string()])
        .status()
        .expect("run kill");
    assert!(status.success());
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let exit = loop {
        if let Some(exit) = child.0.try_wait().expect("try_wait") {
            break exit;
        }
        if std::time::Instant::now() >= deadline {
            panic!("serve did not exit after SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(exit.code(), Some(0));
    let log = reader.join().expect("log reader");
    let start = log
        .iter()
        .position(|l| l.contains("mpc-gateway listening"))
        .expect("listening line");
    let end = log
        .iter()
        .position(|l| l.contains("draining"))
        .unwrap_or(log.len());
    let during = &log[start + 1..end];
    assert!(
        during.len() <= 5,
        "{} log lines for {answered} refusals:\n{}",
        during.len(),
        during.join("\n")
    );
    assert!(
        !log.iter().any(|l| l.contains("zzzzzzzz")),
        "a token in the log"
    );
    // The audit log has the one record per request the contract asks for.
    let records = read_records(&dir.path().join("audit.jsonl"));
    assert_eq!(records.len(), answered);
}

// ---------------------------------------------------------------------------------------
// HTTP/2 with prior knowledge (h2c)
// ---------------------------------------------------------------------------------------

/// An HTTP/2 connection with prior knowledge (h2c) to `addr`, for request bodies of type
/// `B`: its sender, and the task that drives it.
async fn h2c_connect<B>(
    addr: std::net::SocketAddr,
) -> (
    hyper::client::conn::http2::SendRequest<B>,
    tokio::task::JoinHandle<hyper::Result<()>>,
)
where
    B: http_body::Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("h2 handshake");
    (sender, tokio::spawn(conn))
}

/// `POST /mpc/{name}/end` for an HTTP/2 sender to `h`, with `token` as Bearer if any.
fn h2_end_request(h: &Harness, name: &str, token: Option<&str>) -> Request<Empty<Bytes>> {
    let mut builder = Request::builder()
        .method(Method::POST)
        .uri(format!("http://{}/mpc/{name}/end", h.addr()));
    if let Some(token) = token {
        builder = builder.header("authorization", format!("Bearer {token}"));
    }
    builder.body(Empty::<Bytes>::new()).expect("request")
}

/// hyper's HTTP/2 server has no idle timeout of its own: once its last answer is out, an
/// h2c connection with nothing in flight is closed after `H2_IDLE_TIMEOUT`, instead of
/// holding a connection slot for as long as the client answers pings.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_h2c_connection_is_closed_after_the_idle_timeout() {
    let h = Harness::start().await;
    let (mut sender, driver) = h2c_connect(h.addr()).await;
    let request = h2_end_request(&h, "billing-idle", Some(BILLING_TOKEN));
    let answer = tokio::time::timeout(WAIT, sender.send_request(request))
        .await
        .expect("answered in time")
        .expect("answered");
    assert_eq!(answer.status().as_u16(), 204);
    let answered = std::time::Instant::now();
    let limit = mpc_gateway::server::H2_IDLE_TIMEOUT;
    let closed = tokio::time::timeout(limit + Duration::from_secs(5), driver).await;
    assert!(
        closed.is_ok(),
        "still open {:?} after the answer",
        answered.elapsed()
    );
    let idle = answered.elapsed();
    assert!(
        idle >= limit - Duration::from_millis(500),
        "closed after only {idle:?}"
    );
    assert!(sender.is_closed());
    h.shutdown().await;
}

/// An answer to HEAD has its status and headers and no content (RFC 9110 §9.3.2), over
/// HTTP/2 as over HTTP/1.1: content on a HEAD answer is a malformed HTTP/2 response
/// (RFC 9113 §8.1.1), which the client resets, so the caller would see a protocol error
/// instead of its 404 or 405. Each request is audited as any refused one is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_request_is_answered_without_content_over_h2c_and_http1() {
    let h = Harness::start().await;
    let sdk_path = format!("/v1/Account/{BILLING_SDK_AUTH_ID}/MultiPartyCall/name_billing-1/");
    let cases = [
        ("/nowhere", 404, "not-found", None),
        (
            "/mpc/billing-1/end",
            405,
            "method-not-allowed",
            Some("POST"),
        ),
        (sdk_path.as_str(), 405, "method-not-allowed", Some("DELETE")),
    ];
    let (mut sender, _driver) = h2c_connect::<Empty<Bytes>>(h.addr()).await;
    for (path, status, reason, allow) in cases {
        let request = Request::builder()
            .method(Method::HEAD)
            .uri(format!("http://{}{path}", h.addr()))
            .body(Empty::<Bytes>::new())
            .expect("request");
        let answer = tokio::time::timeout(WAIT, sender.send_request(request))
            .await
            .expect("answered in time")
            .expect("answered");
        assert_eq!(answer.status().as_u16(), status, "h2 {path}");
        assert_eq!(
            answer
                .headers()
                .get("allow")
                .map(|v| v.to_str().expect("ascii")),
            allow,
            "h2 {path}"
        );
        assert!(answer.headers().contains_key("x-request-id"), "h2 {path}");
        let body = tokio::time::timeout(WAIT, answer.into_body().collect())
            .await
            .expect("the stream ends in time")
            .unwrap_or_else(|err| panic!("h2 {path}: the stream is broken: {err}"))
            .to_bytes();
        assert!(body.is_empty(), "h2 {path}: {body:?}");

        let reply = h.send(Method::HEAD, path, &[], b"").await;
        assert_eq!(reply.status, status, "HTTP/1.1 {path}");
        assert_eq!(reply.header("allow"), allow, "HTTP/1.1 {path}");
        assert!(reply.header("content-length").is_some(), "HTTP/1.1 {path}");
        assert!(reply.body.is_empty(), "HTTP/1.1 {path}");

        let records = h.records();
        for record in &records[records.len() - 2..] {
            assert_eq!(record["event"], "denied", "{path}");
            assert_eq!(record["method"], "HEAD", "{path}");
            assert_eq!(record["status"], status, "{path}");
            assert_eq!(record["reason"], reason, "{path}");
        }
    }
    assert_eq!(h.records().len(), 2 * cases.len(), "one record per request");
    assert_eq!(h.sim.request_count(), 0, "nothing forwarded");
    h.shutdown().await;
}

/// A request body: one that never ends (always pending), or none at all.
enum TestBody {
    Stalled,
    Empty,
}

impl http_body::Body for TestBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        match *self {
            TestBody::Stalled => std::task::Poll::Pending,
            TestBody::Empty => std::task::Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self, TestBody::Empty)
    }
}

/// Over HTTP/2 a stream whose body never ends is answered `408` by the body timeout, and
/// audited as `denied`; the connection and its other streams are not held by it: a
/// second stream on the same connection, opened while the first stalls, gets its `204`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_stream_with_a_body_that_never_ends_is_408() {
    let h = Harness::start().await;
    let (mut sender, driver) = h2c_connect::<TestBody>(h.addr()).await;
    let request = Request::builder()
        .method(Method::POST)
        .uri(format!("http://{}/mpc/billing-h2/end", h.addr()))
        .header("authorization", format!("Bearer {BILLING_TOKEN}"))
        .header("x-request-id", "h2-stalled")
        .body(TestBody::Stalled)
        .expect("request");
    let started = std::time::Instant::now();
    // `send_request` hands the request to the connection at once (not on first poll),
    // so its HEADERS go out before the second stream's below.
    let stalled = sender.send_request(request);
    let stalled = tokio::spawn(async move {
        tokio::time::timeout(Duration::from_secs(15), stalled)
            .await
            .expect("answered within 15 s")
            .expect("answered")
    });

    // A second stream on the same connection is served while the first one stalls.
    let other = {
        let mut second = sender.clone();
        let request = Request::builder()
            .method(Method::POST)
            .uri(format!("http://{}/mpc/billing-h2-other/end", h.addr()))
            .header("authorization", format!("Bearer {BILLING_TOKEN}"))
            .header("x-request-id", "h2-other")
            .body(TestBody::Empty)
            .expect("request");
        let answer = tokio::time::timeout(Duration::from_secs(10), second.send_request(request))
            .await
            .expect("the other stream answered within 10 s")
            .expect("answered");
        answer
    };
    assert_eq!(other.status().as_u16(), 204, "the other stream is served");
    assert!(
        !stalled.is_finished(),
        "the stalled stream was still open when the other one was answered"
    );
    assert!(
        started.elapsed() < mpc_gateway::gateway::BODY_READ_TIMEOUT,
        "answered before the body timeout: {:?}",
        started.elapsed()
    );

    let answer = stalled.await.expect("stalled request task");
    let took = started.elapsed();
    assert_eq!(answer.status().as_u16(), 408);
    assert!(
        took >= mpc_gateway::gateway::BODY_READ_TIMEOUT - Duration::from_secs(1),
        "{took:?}"
    );
    assert_eq!(
        h.sim.request_count(),
        1,
        "only the other stream was forwarded"
    );
    let records = h.records();
    assert_eq!(records.len(), 3, "{records:?}");
    assert_eq!(
        (&records[0]["event"], &records[1]["event"]),
        (&"forward".into(), &"result".into())
    );
    assert_eq!(records[1]["request_id"], "h2-other");
    assert_eq!(records[1]["status"], 204);
    assert_eq!(records[2]["event"], "denied");
    assert_eq!(records[2]["reason"], "request-timeout");
    assert_eq!(records[2]["request_id"], "h2-stalled");
    drop(sender);
    driver.abort();
    h.assert_chain();
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_with_prior_knowledge_is_served() {
    let h = Harness::start().await;
    let (mut sender, driver) = h2c_connect(h.addr()).await;

    let mut send = |path: &str, token: Option<&str>, id: &str| {
        let mut builder = Request::builder()
            .method(Method::POST)
            .uri(format!("http://{}{path}", h.addr()))
            .header("x-request-id", id);
        if let Some(token) = token {
            builder = builder.header("authorization", format!("Bearer {token}"));
        }
        let request = builder.body(Empty::<Bytes>::new()).expect("request");
        sender.send_request(request)
    };
    // Two streams on one connection, one of them refused.
    let ok = send("/mpc/billing-h2/end", Some(BILLING_TOKEN), "h2-req-1");
    let anonymous = send("/mpc/billing-h2b/end", None, "h2-req-2");
    let (ok, anonymous) = tokio::time::timeout(WAIT, async { tokio::join!(ok, anonymous) })
        .await
        .expect("answered in time");
    let ok = ok.expect("answered");
    assert_eq!(ok.version(), http::Version::HTTP_2);
    assert_eq!(ok.status().as_u16(), 204);
    assert_eq!(
        ok.headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok()),
        Some("h2-req-1")
    );
    let anonymous = anonymous.expect("answered");
    assert_eq!(anonymous.status().as_u16(), 401);

    assert_eq!(h.sim.request_count(), 1);
    let sent = h.sim.requests().pop().expect("forwarded");
    assert_eq!(
        sent.target,
        format!("/v1/Account/{AUTH_ID}/MultiPartyCall/name_billing-h2/")
    );
    assert_eq!(
        sent.header("authorization"),
        Some(expected_basic().as_str())
    );
    let records = h.records();
    assert_eq!(records.len(), 3, "forward + result + denied");
    let result = records
        .iter()
        .find(|r| r["event"] == "result")
        .expect("result record");
    assert_eq!(result["request_id"], "h2-req-1");
    assert_eq!(result["status"], 204);
    // The request target of an HTTP/2 request is its :path.
    assert_eq!(result["path"], "/mpc/billing-h2/end");
    drop(sender);
    driver.abort();
    h.assert_chain();
    h.shutdown().await;
}

/// The process holds at most `MAX_H2_STREAMS_IN_PROGRESS` HTTP/2 streams at once, however
/// many connections carry them. Unauthenticated streams whose bodies never come fill
/// every slot; a stream beyond them is refused at once with `REFUSED_STREAM` (not after
/// the body timeout), is neither audited nor forwarded, and is counted; its connection
/// stays usable and is served again once the stalled streams are gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_streams_in_progress_are_capped_across_connections() {
    // `fsync: never`: the probes' denied records must not slow the loop below down on a
    // busy machine.
    let h = Harness::with(Options {
        fsync: "never",
        ..Options::default()
    })
    .await;
    let per_connection = mpc_gateway::server::H2_MAX_CONCURRENT_STREAMS as usize;
    let cap = mpc_gateway::server::MAX_H2_STREAMS_IN_PROGRESS;
    let started = std::time::Instant::now();
    let mut stalled = Vec::new();
    let mut opened = 0;
    while opened < cap {
        let (mut sender, driver) = h2c_connect::<TestBody>(h.addr()).await;
        let mut answers = Vec::new();
        for _ in 0..per_connection.min(cap - opened) {
            let request = Request::builder()
                .method(Method::POST)
                .uri(format!("http://{}/mpc/billing-flood/end", h.addr()))
                .body(TestBody::Stalled)
                .expect("request");
            // Sent now; the answer (a 408 after the body timeout) is never awaited.
            answers.push(sender.send_request(request));
            opened += 1;
        }
        stalled.push((sender, driver, answers));
    }

    // Anonymous probes on a connection of their own are answered (401) while slots are
    // free, until every slot is held by a stalled stream.
    let (mut probe, probe_driver) = h2c_connect(h.addr()).await;
    let mut answered_probes = 0;
    // Bounded well before the first stalled stream's body timeout frees its slot.
    let refused_by = mpc_gateway::gateway::BODY_READ_TIMEOUT - Duration::from_secs(3);
    let refusal = loop {
        assert!(
            started.elapsed() < refused_by,
            "no stream was refused while {cap} were stalled ({answered_probes} probes answered in {:?})",
            started.elapsed()
        );
        let request = h2_end_request(&h, "billing-probe", None);
        match tokio::time::timeout(WAIT, probe.send_request(request))
            .await
            .expect("the probe was answered or refused in time")
        {
            Ok(answer) => {
                assert_eq!(answer.status().as_u16(), 401);
                answered_probes += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(err) => break err,
        }
    };
    let reason = std::error::Error::source(&refusal)
        .and_then(|source| source.downcast_ref::<h2::Error>())
        .and_then(h2::Error::reason);
    assert_eq!(reason, Some(h2::Reason::REFUSED_STREAM), "{refusal:?}");
    assert_eq!(
        metric(
            &h,
            "mpc_gateway_http_rejected_total{kind=\"streams-exhausted\"}"
        )
        .await,
        1.0
    );

    // The stalled callers go away; their streams end, free their slots, and the probe's
    // connection is served again.
    drop(stalled);
    assert!(
        eventually_async(WAIT, || async {
            h.records().len() == cap + answered_probes
        })
        .await,
        "one denied record per stalled stream and answered probe, none for the refused one"
    );
    let request = h2_end_request(&h, "billing-after", Some(BILLING_TOKEN));
    let after = tokio::time::timeout(WAIT, probe.send_request(request))
        .await
        .expect("answered in time")
        .expect("answered");
    assert_eq!(after.status().as_u16(), 204);
    assert_eq!(
        h.sim.request_count(),
        1,
        "only the last request was forwarded"
    );
    let records = h.records();
    assert!(records[..cap + answered_probes]
        .iter()
        .all(|record| record["event"] == "denied"));
    drop(probe);
    probe_driver.abort();
    h.assert_chain();
    h.shutdown().await;
}

/// HTTP/2 callers get the contract's head limits, as HTTP/1.1 callers do: a 20 KiB header
/// block is served (the h2 library alone would refuse anything above 16 KiB), a header
/// block over 32 KiB or with more than 100 fields is `431` and a `:path` over 8 KiB `414`,
/// each a problem+json answer with a `denied` record. (The field limit matters most here:
/// HPACK lets a caller send a field indexed once in a single byte, so without it a small
/// head could hold thousands of fields while the request waits for its body.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_heads_get_the_contracts_limits_not_the_h2_librarys() {
    let h = Harness::start().await;
    let (mut sender, driver) = h2c_connect(h.addr()).await;
    let mut send = |path: String, pad: usize, id: &str, extra_fields: usize| {
        let mut request = Request::builder()
            .method(Method::POST)
            .uri(format!("http://{}{path}", h.addr()))
            .header("x-request-id", id)
            .header("authorization", format!("Bearer {BILLING_TOKEN}"))
            .header("x-pad", "p".repeat(pad));
        for field in 0..extra_fields {
            request = request.header(format!("x-f{field}"), "");
        }
        sender.send_request(request.body(Empty::<Bytes>::new()).expect("request"))
    };
    let cases = [
        (
            send("/mpc/billing-h2-pad/end".into(), 20 * 1024, "h2-pad-20k", 0),
            204,
            None,
        ),
        (
            send("/mpc/billing-h2-big/end".into(), 33 * 1024, "h2-pad-33k", 0),
            431,
            Some("request-header-fields-too-large"),
        ),
        // 101 fields in a small block: over the field limit HTTP/1.1 callers get too.
        (
            send("/mpc/billing-h2-many/end".into(), 0, "h2-101-fields", 98),
            431,
            Some("request-header-fields-too-large"),
        ),
        (
            send(
                format!("/mpc/{}/end", "a".repeat(9 * 1024)),
                0,
                "h2-long-path",
                0,
            ),
            414,
            Some("uri-too-long"),
        ),
    ];
    for (answer, status, slug) in cases {
        let answer = tokio::time::timeout(WAIT, answer)
            .await
            .expect("answered in time")
            .expect("answered, not refused by the h2 library");
        assert_eq!(answer.status().as_u16(), status);
        if let Some(slug) = slug {
            assert_eq!(
                answer
                    .headers()
                    .get("content-type")
                    .and_then(|v| v.to_str().ok()),
                Some("application/problem+json")
            );
            let body = answer.into_body().collect().await.expect("body").to_bytes();
            let body: serde_json::Value = serde_json::from_slice(&body).expect("json");
            assert_eq!(body["type"], format!("urn:mpc-gateway:{slug}"));
        }
    }
    // Far over the contract's limits the h2 library refuses the head itself (an HTTP/2
    // connection holds up to 256 heads at once, so that room is bounded): a bare `431`
    // and a refused stream, or, when the block spans CONTINUATION frames, a GOAWAY for
    // the connection; either way no record and nothing forwarded.
    let huge = send(
        "/mpc/billing-h2-huge/end".into(),
        80 * 1024,
        "h2-pad-80k",
        0,
    );
    if let Ok(answer) = tokio::time::timeout(WAIT, huge).await.expect("in time") {
        assert_eq!(answer.status().as_u16(), 431);
        assert!(
            answer.headers().get("x-request-id").is_none(),
            "not the gateway's"
        );
    }
    assert_eq!(
        h.sim.request_count(),
        1,
        "only the 20 KiB head is forwarded"
    );
    let records = h.records();
    assert!(records.iter().all(|r| r["request_id"] != "h2-pad-80k"));
    for (id, status) in [
        ("h2-pad-33k", 431),
        ("h2-101-fields", 431),
        ("h2-long-path", 414),
    ] {
        let denied = records
            .iter()
            .find(|r| r["request_id"] == id)
            .unwrap_or_else(|| panic!("a record for {id}: {records:?}"));
        assert_eq!(denied["event"], "denied");
        assert_eq!(denied["status"], status);
    }
    drop(sender);
    driver.abort();
    h.assert_chain();
    h.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// Callers that go away mid-request
// ---------------------------------------------------------------------------------------

/// Waits until the audit log holds a `result` for `request_id`, and returns it. While
/// polling, a line the writer has not finished yet is skipped rather than parsed (and
/// the final read, after the result was seen, is strict again).
async fn wait_for_result(h: &Harness, request_id: &str) -> serde_json::Value {
    let found = eventually_async(WAIT, || async {
        std::fs::read_to_string(&h.audit_path)
            .unwrap_or_default()
            .lines()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .any(|r| r["event"] == "result" && r["request_id"] == request_id)
    })
    .await;
    let records = h.records();
    assert!(found, "no result record for {request_id}: {records:?}");
    records
        .into_iter()
        .find(|r| r["event"] == "result" && r["request_id"] == request_id)
        .expect("result record")
}

/// A caller (HTTP/1.1) that closes its connection while its call to Plivo is under way,
/// as a client whose own timeout is shorter than Plivo's answer does. The DELETE has
/// gone out, so the call must finish and be recorded: the forward *and* its result,
/// with Plivo's status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http1_caller_that_hangs_up_mid_call_still_gets_its_result_recorded() {
    let h = Harness::start().await;
    h.sim
        .push_fault(mpc_gateway::simulator::Fault::Delay(Duration::from_millis(
            400,
        )));
    let mut headers = closing_headers(Some(BILLING_TOKEN));
    headers.push("X-Request-Id: h1-hangs-up".to_owned());
    let text = request("POST", "/mpc/billing-hangup/end", &headers);
    let mut stream = tokio::net::TcpStream::connect(h.addr())
        .await
        .expect("connect");
    tokio::io::AsyncWriteExt::write_all(&mut stream, text.as_bytes())
        .await
        .expect("send");
    // Hang up once the call is upstream.
    assert!(
        eventually_async(WAIT, || async { h.sim.request_count() == 1 }).await,
        "the call reached the simulator"
    );
    drop(stream);

    let result = wait_for_result(&h, "h1-hangs-up").await;
    assert_eq!(result["status"], 204);
    assert_eq!(result["reason"], "ended");
    assert_eq!(result["upstream_status"], 204);
    let records = h.records();
    assert_eq!(records.len(), 2, "forward and result: {records:?}");
    assert_eq!(records[0]["event"], "forward");
    h.assert_chain();
    h.shutdown().await;
}

/// An HTTP/2 caller (h2c) with one call that Plivo answers only after 400 ms, returned
/// once that call has reached the simulator unanswered.
async fn h2_caller_with_a_call_upstream(h: &Harness, name: &str, request_id: &str) -> Caller {
    h.sim
        .push_fault(mpc_gateway::simulator::Fault::Delay(Duration::from_millis(
            400,
        )));
    let (mut sender, driver) = h2c_connect(h.addr()).await;
    let request = Request::builder()
        .method(Method::POST)
        .uri(format!("http://{}/mpc/{name}/end", h.addr()))
        .header("authorization", format!("Bearer {BILLING_TOKEN}"))
        .header("x-request-id", request_id)
        .body(Empty::<Bytes>::new())
        .expect("request");
    let mut answer = Box::pin(sender.send_request(request));
    let reached = tokio::time::timeout(WAIT, async {
        loop {
            tokio::select! {
                _ = answer.as_mut() => return false,
                () = tokio::time::sleep(Duration::from_millis(10)) => {
                    if h.sim.request_count() == 1 {
                        return true;
                    }
                }
            }
        }
    })
    .await;
    assert_eq!(
        reached,
        Ok(true),
        "the call reached the simulator unanswered"
    );
    Caller {
        answer: Some(answer),
        _sender: sender,
        driver,
    }
}

type PendingAnswer = std::pin::Pin<
    Box<
        dyn std::future::Future<Output = hyper::Result<http::Response<hyper::body::Incoming>>>
            + Send,
    >,
>;

/// An HTTP/2 caller with a call in flight; see [`h2_caller_with_a_call_upstream`].
/// Dropping it closes the connection without a word.
struct Caller {
    answer: Option<PendingAnswer>,
    _sender: hyper::client::conn::http2::SendRequest<Empty<Bytes>>,
    driver: tokio::task::JoinHandle<hyper::Result<()>>,
}

impl Caller {
    /// Gives up on the call: its stream is reset (`RST_STREAM`, `CANCEL`), the
    /// connection stays open.
    fn cancel_stream(&mut self) {
        self.answer = None;
    }
}

impl Drop for Caller {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

/// The same for an HTTP/2 caller that cancels its stream (`RST_STREAM`, `CANCEL`) while
/// the call is upstream: hyper drops a cancelled stream's service future, so the gateway
/// must not have tied the call to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_caller_that_cancels_mid_call_still_gets_its_result_recorded() {
    let h = Harness::start().await;
    let mut caller = h2_caller_with_a_call_upstream(&h, "billing-cancel", "h2-cancels").await;
    caller.cancel_stream();

    let result = wait_for_result(&h, "h2-cancels").await;
    assert_eq!(result["status"], 204);
    assert_eq!(result["upstream_status"], 204);
    assert_eq!(h.records().len(), 2, "forward and result");
    h.assert_chain();
    drop(caller);
    h.shutdown().await;
}

/// A shutdown that starts right after an HTTP/2 caller cancelled its stream mid-call
/// waits for that call like for any in-flight request: its result is on disk when the
/// gateway has stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_drain_waits_for_a_call_whose_http2_caller_cancelled() {
    let mut h = Harness::start().await;
    let caller = h2_caller_with_a_call_upstream(&h, "billing-drain", "h2-cancels-then-drain").await;
    // Close the connection mid-call, then stop the gateway at once.
    drop(caller);
    h.stop_gateway().await;

    let records = h.records();
    assert_eq!(records.len(), 2, "forward and result: {records:?}");
    assert_eq!(records[1]["event"], "result");
    assert_eq!(records[1]["request_id"], "h2-cancels-then-drain");
    assert_eq!(records[1]["status"], 204);
    h.assert_chain();
}

/// A closed connection lingers (nginx's `lingering_close`): after answering a
/// `Connection: close` request the gateway keeps reading what the client still sends, so
/// the client's late writes (an HTTP/2 client's WINDOW_UPDATE or next request after a
/// GOAWAY) succeed instead of meeting a reset that makes clients such as curl drop the
/// answers they have not read yet. Without the linger the socket is closed at once, and
/// the second late write below fails with a broken pipe or a reset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_connection_keeps_reading_what_the_client_still_sends() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let h = Harness::start().await;
    let mut stream = tokio::net::TcpStream::connect(h.addr())
        .await
        .expect("connect");
    let request = format!(
        "POST /mpc/billing-linger/end HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {BILLING_TOKEN}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.expect("send");
    let mut answer = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut answer))
        .await
        .expect("answered and closed in time")
        .expect("read");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 204"), "{answer}");
    // The gateway's side is closed; the client's side is still open and writes on.
    for write in 0..3 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        stream
            .write_all(b"late bytes the gateway reads and discards\r\n")
            .await
            .unwrap_or_else(|err| panic!("late write {write} failed: {err}"));
    }
    drop(stream);
    h.shutdown().await;
}
