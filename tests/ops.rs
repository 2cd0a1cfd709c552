//! Operating the gateway as a sidecar (DESIGN.md §5, issue 4): readiness, metrics after a
//! known sequence of requests, reload (success, failure, secret rotation, limiter state),
//! graceful drain with a slow in-flight request, the slowloris header timeout, and the
//! fail-closed audit log on a full disk. In-process, on the harness in `tests/common`.

use crate::common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use mpc_gateway::gateway::BODY_READ_TIMEOUT;
use mpc_gateway::server::HEADER_READ_TIMEOUT;
use mpc_gateway::simulator::{Fault, Liveness};
use mpc_gateway::telemetry::sample;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

/// The value of one series; panics with the whole exposition when it is absent.
fn value(text: &str, series: &str) -> f64 {
    sample(text, series).unwrap_or_else(|| panic!("series {series} missing in\n{text}"))
}

/// A complete `POST /mpc/{name}/end` on its own connection, closed after the answer.
fn post_end(name: &str, token: &str) -> String {
    format!(
        "POST /mpc/{name}/end HTTP/1.1\r\nHost: gateway\r\nAuthorization: Bearer {token}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
}

fn status_of(response: &str) -> Option<u16> {
    response.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
}

/// `GET path` on the admin listener over a fresh connection; the status, if any answer.
async fn admin_status(admin: SocketAddr, path: &str) -> Option<u16> {
    let request = format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n");
    let answer = raw_exchange(admin, request.as_bytes(), Duration::from_secs(3)).await;
    status_of(&answer)
}

fn write_config(h: &Harness, yaml: &str) {
    std::fs::write(&h.config_path, yaml).expect("write config");
}

/// `text.replace(from, to)`, asserting that `from` was there (so a changed harness
/// template cannot silently turn a test into a no-op).
fn replaced(text: &str, from: &str, to: &str) -> String {
    assert!(text.contains(from), "{from:?} not in the config template");
    text.replace(from, to)
}

// ---------------------------------------------------------------------------------------
// Readiness
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_turns_503_when_draining_while_health_stays_200() {
    let h = Harness::start().await;
    let health = h.admin_get("/healthz").await;
    assert_eq!(health.status, 200);
    let ready = h.admin_get("/readyz").await;
    assert_eq!(ready.status, 200, "{:?}", ready.body);
    assert_eq!(h.end("billing-1", BILLING_TOKEN).await.status, 204);

    h.running().gateway().start_draining();
    let ready = h.admin_get("/readyz").await;
    assert_eq!(ready.status, 503, "draining: not ready");
    assert_eq!(
        h.admin_get("/healthz").await.status,
        200,
        "draining: still alive"
    );

    // A request that still arrives while draining is refused, closes its connection, is
    // audited and not forwarded.
    let reply = h.end("billing-2", BILLING_TOKEN).await;
    reply.assert_problem(503, "shutting-down");
    assert_eq!(reply.header("connection"), Some("close"));
    assert_eq!(h.sim.request_count(), 1, "nothing forwarded while draining");
    let record = h.records().pop().expect("record");
    assert_eq!(record["event"], "denied");
    assert_eq!(record["reason"], "shutting-down");
    assert_eq!(record["status"], 503);
    h.assert_chain();
    h.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// Metrics
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_a_known_sequence_exactly() {
    let h = Harness::with(Options {
        tenant_limit: (1, 2),
        ..Options::default()
    })
    .await;
    let before = metrics_text(&h).await;
    assert_eq!(
        sample(&before, "mpc_gateway_request_duration_seconds_count"),
        Some(0.0)
    );

    // 2 successes, 2 × 401 (none, unknown), 1 × 403, 1 tenant 429, 1 upstream 404.
    assert_eq!(h.end("billing-1", BILLING_TOKEN).await.status, 204);
    assert_eq!(h.end("billing-2", BILLING_TOKEN).await.status, 204);
    let anonymous = h
        .send(http::Method::POST, "/mpc/billing-3/end", &[], b"")
        .await;
    anonymous.assert_problem(401, "unauthenticated");
    h.end("billing-3", "unknown-token-value-xyz")
        .await
        .assert_problem(401, "unauthenticated");
    h.end("sales-1", BILLING_TOKEN)
        .await
        .assert_problem(403, "forbidden");
    h.end("billing-3", BILLING_TOKEN)
        .await
        .assert_problem(429, "rate-limited");
    h.end("billing-1", OPS_TOKEN)
        .await
        .assert_problem(404, "mpc-not-found");

    let reply = h.admin_get("/metrics").await;
    assert_eq!(reply.status, 200);
    let content_type = reply.header("content-type").unwrap_or_default().to_owned();
    assert!(
        content_type.starts_with("text/plain; version=0.0.4")
            || content_type.starts_with("application/openmetrics-text"),
        "a Prometheus exposition content type: {content_type}"
    );
    let text = String::from_utf8(reply.body.to_vec()).expect("UTF-8");

    let requests = |tenant: &str, reason: &str| {
        value(
            &text,
            &format!("mpc_gateway_requests_total{{tenant=\"{tenant}\",reason=\"{reason}\"}}"),
        )
    };
    assert_eq!(requests("billing", "ended"), 2.0);
    // Refused before (or at) authentication: the tenant label is empty, never the token.
    assert_eq!(requests("", "unauthenticated"), 2.0);
    assert_eq!(requests("billing", "forbidden"), 1.0);
    assert_eq!(requests("billing", "rate-limited"), 1.0);
    assert_eq!(requests("ops", "mpc-not-found"), 1.0);
    let request_series = text
        .lines()
        .filter(|l| l.starts_with("mpc_gateway_requests_total{"))
        .count();
    assert_eq!(request_series, 5, "no other request series:\n{text}");
    assert!(!text.contains("unknown-token-value-xyz"));
    assert!(!text.contains(BILLING_TOKEN));

    assert_eq!(
        value(&text, "mpc_gateway_upstream_requests_total{status=\"204\"}"),
        2.0
    );
    assert_eq!(
        value(&text, "mpc_gateway_upstream_requests_total{status=\"404\"}"),
        1.0
    );
    assert_eq!(
        value(
            &text,
            "mpc_gateway_rate_limited_total{tenant=\"billing\",limit=\"tenant\"}"
        ),
        1.0
    );
    // Declared at 0 at start, so an alert on its increase sees the first refusal.
    assert_eq!(
        sample(
            &text,
            "mpc_gateway_rate_limited_total{tenant=\"billing\",limit=\"account\"}"
        ),
        Some(0.0)
    );
    assert_eq!(
        sample(&text, "mpc_gateway_config_reloads_total{result=\"error\"}"),
        Some(0.0)
    );
    assert_eq!(
        value(&text, "mpc_gateway_request_duration_seconds_count"),
        7.0
    );
    assert_eq!(value(&text, "mpc_gateway_audit_failures_total"), 0.0);
    assert!(
        text.contains("mpc_gateway_request_duration_seconds_bucket{le=\"+Inf\"} 7"),
        "{text}"
    );
    assert_eq!(h.sim.request_count(), 3, "2 successes + 1 ended-twice");
    h.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// Reload
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_applies_a_good_config_and_keeps_serving_on_a_broken_one() {
    let h = Harness::start().await;
    h.end("sales-1", BILLING_TOKEN)
        .await
        .assert_problem(403, "forbidden");

    let original = h.config_yaml();
    let widened = replaced(
        &original,
        r#"allow: ["billing-*"]"#,
        r#"allow: ["billing-*", "sales-*"]"#,
    );
    write_config(&h, &widened);
    h.running()
        .reload_from(&h.config_path)
        .expect("good config reloads");
    assert_eq!(
        h.end("sales-2", BILLING_TOKEN).await.status,
        204,
        "the new allow rule applies"
    );

    // Each broken config is refused as a whole; the running config keeps serving.
    let broken: Vec<(&str, String, Option<&str>)> = vec![
        ("bad YAML", format!("{widened}\n  : [unclosed\n"), None),
        (
            "unknown key",
            replaced(
                &widened,
                r#"allow: ["billing-*", "sales-*"]"#,
                "allow: [\"*\"]\n    alow: [\"x\"]",
            ),
            Some("tenants.billing.alow"),
        ),
        (
            "missing secret file",
            replaced(&widened, "/plivo-token\"", "/no-such-token\""),
            Some("accounts.default.auth_token"),
        ),
    ];
    for (what, yaml, key_path) in &broken {
        write_config(&h, yaml);
        let err = h
            .running()
            .reload_from(&h.config_path)
            .expect_err(what)
            .to_string();
        if let Some(key_path) = key_path {
            assert!(err.contains(key_path), "{what}: {err}");
        }
        assert!(!err.contains(AUTH_TOKEN), "{what}: secret in error");
        assert_eq!(
            h.end("sales-3", BILLING_TOKEN).await.status,
            204,
            "{what}: the running config still allows sales-*"
        );
        h.end("other-1", BILLING_TOKEN)
            .await
            .assert_problem(403, "forbidden");
        // Re-arm sales-3 on the simulator for the next round.
        h.sim.add_mpc("sales-3");
    }

    // The secret file itself vanishing (a secret volume being re-mounted) is also an error.
    write_config(&h, &widened);
    let token_file = h.dir.path().join("plivo-token");
    std::fs::remove_file(&token_file).expect("remove token file");
    let err = h
        .running()
        .reload_from(&h.config_path)
        .expect_err("missing token file");
    assert!(
        err.to_string().contains("accounts.default.auth_token"),
        "{err}"
    );
    assert_eq!(
        h.end("billing-9", BILLING_TOKEN).await.status,
        204,
        "the token already loaded keeps working"
    );
    std::fs::write(&token_file, AUTH_TOKEN).expect("restore token");

    let text = metrics_text(&h).await;
    assert_eq!(
        value(&text, "mpc_gateway_config_reloads_total{result=\"ok\"}"),
        1.0
    );
    assert_eq!(
        value(&text, "mpc_gateway_config_reloads_total{result=\"error\"}"),
        4.0
    );
    assert_eq!(
        value(&text, "mpc_gateway_config_last_reload_successful"),
        0.0,
        "the last reload failed"
    );
    h.running()
        .reload_from(&h.config_path)
        .expect("the token file is back");
    let text = metrics_text(&h).await;
    assert_eq!(
        value(&text, "mpc_gateway_config_last_reload_successful"),
        1.0
    );
    assert_eq!(value(&text, "mpc_gateway_config_restart_pending"), 0.0);
    h.assert_chain();
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotated_plivo_token_is_used_by_the_next_upstream_call_after_reload() {
    let h = Harness::start().await;
    assert_eq!(h.end("billing-1", BILLING_TOKEN).await.status, 204);
    let token_file = h.dir.path().join("plivo-token");

    std::fs::write(&token_file, "rotated-but-wrong-token\n").expect("write");
    assert_eq!(
        h.end("billing-2", BILLING_TOKEN).await.status,
        204,
        "no re-read before the reload"
    );
    h.running()
        .reload_from(&h.config_path)
        .expect("reload with the new token");
    let reply = h.end("billing-3", BILLING_TOKEN).await;
    reply.assert_problem(502, "upstream-credentials-rejected");
    let sent = h.sim.requests().pop().expect("forwarded");
    let wrong = format!(
        "Basic {}",
        base64_encode(&format!("{AUTH_ID}:rotated-but-wrong-token"))
    );
    assert_eq!(sent.header("authorization"), Some(wrong.as_str()));
    assert!(!String::from_utf8_lossy(&reply.body).contains("rotated-but-wrong-token"));

    std::fs::write(&token_file, format!("  {AUTH_TOKEN}\n")).expect("write");
    h.running()
        .reload_from(&h.config_path)
        .expect("reload with the right token");
    assert_eq!(h.end("billing-3", BILLING_TOKEN).await.status, 204);
    let sent = h.sim.requests().pop().expect("forwarded");
    assert_eq!(
        sent.header("authorization"),
        Some(expected_basic().as_str())
    );
    h.assert_chain();
    h.shutdown().await;
}

/// A reload is how a leaked token is revoked, so once it reports success no request may
/// authenticate with the old token, even one whose head arrived before the reload and
/// whose body is held back until after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_revoked_while_its_request_holds_back_the_body_is_refused() {
    let h = Harness::start().await;
    let mut conn = TcpStream::connect(h.addr()).await.expect("connect");
    let head = format!(
        "POST /mpc/billing-1/end HTTP/1.1\r\nHost: gateway\r\nAuthorization: Bearer {BILLING_TOKEN}\r\nContent-Length: 2\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n"
    );
    conn.write_all(head.as_bytes()).await.expect("write head");
    // hyper sends `100 Continue` when the service first polls the body, which the gateway
    // does after routing and before authenticating (src/gateway/mod.rs, `admit`): from
    // here on the request is under way, and one that had taken its configuration with
    // its head would authenticate against the token directory of before.
    expect_100_continue(&mut conn).await;
    let revoked = replaced(
        &h.config_yaml(),
        &token_hash(BILLING_TOKEN),
        &token_hash("a-token-nobody-holds"),
    );
    write_config(&h, &revoked);
    h.running().reload_from(&h.config_path).expect("reload");
    conn.write_all(b"{}").await.expect("write the body");

    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(15), conn.read_to_end(&mut answer))
        .await
        .expect("answered within 15 s")
        .expect("read the answer");
    let (responses, rest) = parse_responses(&answer);
    assert_eq!((responses.len(), rest), (1, 0), "{answer:?}");
    assert_eq!(responses[0].status, 401, "{:?}", responses[0]);
    assert_eq!(h.sim.request_count(), 0, "nothing reached Plivo");
    let records = h.records();
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0]["event"], "denied");
    assert_eq!(records[0]["status"], 401);
    assert_eq!(records[0]["tenant"], serde_json::Value::Null);
    h.shutdown().await;
}

/// A by-uuid request learns the name it will end only from Plivo's answer, up to
/// `timeout` later: the allow list that authorizes that name is the one in force then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_during_a_by_uuid_lookup_that_narrows_the_allow_list_is_obeyed() {
    let h = Harness::with_explicit_liveness().await;
    let uuid = h.sim.add_mpc("billing-weekly");
    h.sim.push_fault(Fault::Delay(Duration::from_secs(1)));
    let narrowed = replaced(
        &h.config_yaml(),
        r#"allow: ["billing-*"]"#,
        r#"allow: ["billing-daily"]"#,
    );
    let reload_during_lookup = async {
        let looking_up = eventually_async(Duration::from_secs(10), || async {
            h.sim.request_count() == 1
        })
        .await;
        assert!(looking_up, "the lookup reached the simulator");
        write_config(&h, &narrowed);
        h.running().reload_from(&h.config_path).expect("reload");
    };
    let by_uuid = format!("by-uuid/{uuid}");
    let (reply, ()) = tokio::join!(h.end(&by_uuid, BILLING_TOKEN), reload_during_lookup);
    reply.assert_problem(403, "forbidden");
    assert!(h.sim.is_live("billing-weekly"), "not ended");
    let methods: Vec<String> = h.sim.requests().into_iter().map(|r| r.method).collect();
    assert_eq!(methods, ["GET"], "only the lookup");
    let result = h.records().pop().expect("result");
    assert_eq!(result["event"], "result");
    assert_eq!(result["reason"], "forbidden");
    assert_eq!(result["mpc"], "billing-weekly");
    h.shutdown().await;
}

/// A reload that leaves `upstream` as it was keeps the upstream connections (no new
/// handshake with Plivo); one that changes it starts afresh with its new settings.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_keeps_the_upstream_connections_unless_upstream_changed() {
    let h = Harness::start().await;
    assert_eq!(h.end("billing-1", BILLING_TOKEN).await.status, 204);
    assert_eq!(h.sim.connection_count(), 1);

    h.running()
        .reload_from(&h.config_path)
        .expect("reload, nothing changed");
    assert_eq!(h.end("billing-2", BILLING_TOKEN).await.status, 204);
    assert_eq!(h.sim.connection_count(), 1, "kept across the reload");

    let changed = h
        .config_yaml()
        .replace("  timeout: 3s\n", "  timeout: 4s\n");
    assert_ne!(
        changed,
        h.config_yaml(),
        "the upstream timeout is in the config"
    );
    std::fs::write(&h.config_path, changed).expect("write");
    h.running()
        .reload_from(&h.config_path)
        .expect("reload with another upstream timeout");
    assert_eq!(h.end("billing-3", BILLING_TOKEN).await.status, 204);
    assert_eq!(
        h.sim.connection_count(),
        2,
        "a new client, a new connection"
    );
    h.shutdown().await;
}

fn base64_encode(text: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limiter_state_survives_a_reload_unless_the_limit_changed() {
    let mut h = Harness::with(Options {
        tenant_limit: (1, 1),
        ..Options::default()
    })
    .await;
    assert_eq!(h.end("billing-1", BILLING_TOKEN).await.status, 204);
    h.end("billing-2", BILLING_TOKEN)
        .await
        .assert_problem(429, "rate-limited");

    // Same limits (and an unrelated change): the exhausted bucket is kept.
    let same = replaced(
        &h.config_yaml(),
        r#"allow: ["billing-*"]"#,
        r#"allow: ["billing-*", "extra-*"]"#,
    );
    write_config(&h, &same);
    h.running().reload_from(&h.config_path).expect("reload");
    h.end("billing-2", BILLING_TOKEN)
        .await
        .assert_problem(429, "rate-limited");
    assert_eq!(h.end("ops-1", OPS_TOKEN).await.status, 204);

    // A changed limit starts a fresh bucket.
    h.options.tenant_limit = (1, 2);
    write_config(&h, &h.config_yaml());
    h.running().reload_from(&h.config_path).expect("reload");
    let reply = h.end("billing-2", BILLING_TOKEN).await;
    assert_eq!(reply.status, 204, "{:?}", reply.body);
    assert_eq!(reply.header("ratelimit-policy"), Some("\"tenant\";q=2;w=2"));
    assert_eq!(h.sim.request_count(), 3);
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn account_limiter_state_survives_a_reload_unless_the_limit_changed() {
    let mut h = Harness::with(Options {
        account_limit: (1, 1),
        ..Options::default()
    })
    .await;
    assert_eq!(h.end("billing-1", BILLING_TOKEN).await.status, 204);
    let refused = h.end("ops-1", OPS_TOKEN).await;
    refused.assert_problem(429, "rate-limited");
    assert_eq!(
        refused.header("ratelimit-policy"),
        Some("\"account\";q=1;w=1")
    );

    // A tenant's limit changes, the account's does not: the account bucket is kept.
    h.options.tenant_limit = (5, 5);
    write_config(&h, &h.config_yaml());
    h.running().reload_from(&h.config_path).expect("reload");
    h.end("ops-2", OPS_TOKEN)
        .await
        .assert_problem(429, "rate-limited");

    h.options.account_limit = (1, 2);
    write_config(&h, &h.config_yaml());
    h.running().reload_from(&h.config_path).expect("reload");
    assert_eq!(h.end("ops-3", OPS_TOKEN).await.status, 204);
    assert_eq!(h.sim.request_count(), 2);
    let text = metrics_text(&h).await;
    assert_eq!(
        value(
            &text,
            "mpc_gateway_rate_limited_total{tenant=\"ops\",limit=\"account\"}"
        ),
        2.0
    );
    h.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// Drain
// ---------------------------------------------------------------------------------------

/// At most `MAX_IN_FLIGHT` (256) calls to Plivo at once: with every slot held by a slow
/// call, one more waits (within its deadline) and reaches Plivo only when a slot frees.
///
/// The simulator has no gate a test can release, so each slot is held by a `Delay` long
/// enough that the whole check runs inside it. The extra call's `forward` record is the
/// evidence that it reached the cap: it is acknowledged right before the upstream call
/// (DESIGN §3), whose first step is taking a slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_calls_in_flight_are_capped() {
    let cap = mpc_gateway::upstream::MAX_IN_FLIGHT;
    // `fsync: never` and a hold of 8 s: 257 calls' records and handshakes on two loaded
    // cores must fit well inside the hold, or a slot frees before the check.
    let h = Harness::with(Options {
        tenant_limit: (1000, 1000),
        timeout: "15s",
        fsync: "never",
        ..Options::default()
    })
    .await;
    let hold = Duration::from_secs(8);
    for _ in 0..cap {
        h.sim.push_fault(Fault::Delay(hold));
    }
    // No held call can reach the simulator, let alone be answered, before this.
    let started = Instant::now();
    let names: Vec<String> = (0..cap).map(|i| format!("billing-held-{i}")).collect();
    let held = futures_util::future::join_all(names.iter().map(|name| h.end(name, BILLING_TOKEN)));
    let extra = async {
        assert!(
            eventually_async(Duration::from_secs(10), || async {
                h.sim.request_count() >= cap as u64
            })
            .await,
            "the first {cap} calls reached the simulator"
        );
        let (reply, seen_while_full) = tokio::join!(h.end("billing-extra", BILLING_TOKEN), async {
            assert!(
                eventually_async(hold, || async { has_forward_record(&h, "billing-extra") }).await,
                "the extra call's forward record was written"
            );
            // Time for a call past the cap to reach Plivo, were it not held there.
            tokio::time::sleep(Duration::from_millis(200)).await;
            let seen = h.sim.request_count();
            assert!(
                started.elapsed() < hold,
                "sampled {:?} after the held calls were sent, not within their {hold:?}: \
                 a slot may have freed already",
                started.elapsed()
            );
            seen
        });
        (reply, seen_while_full)
    };
    let (held, (extra, seen_while_full)) = tokio::join!(held, extra);
    assert!(held.iter().all(|reply| reply.status == 204));
    assert_eq!(
        seen_while_full, cap as u64,
        "while {cap} calls were in flight, one more did not reach Plivo"
    );
    assert_eq!(extra.status, 204, "it went through once a slot was free");
    assert_eq!(h.sim.request_count(), cap as u64 + 1);
    let records = h.records();
    let result = records
        .iter()
        .find(|r| r["event"] == "result" && r["mpc"] == "billing-extra")
        .expect("the extra call's result record");
    assert_eq!(result["attempts"], 1);
    h.shutdown().await;
}

/// Reads exactly `HTTP/1.1 100 Continue` and its empty header block from `conn` (within
/// 10 s), nothing more: the gateway's service has started reading the request's body.
async fn expect_100_continue(conn: &mut TcpStream) {
    const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";
    let mut got = vec![0u8; CONTINUE.len()];
    tokio::time::timeout(Duration::from_secs(10), conn.read_exact(&mut got))
        .await
        .expect("100 Continue within 10 s")
        .expect("read 100 Continue");
    assert_eq!(
        String::from_utf8_lossy(&got),
        String::from_utf8_lossy(CONTINUE)
    );
}

/// Whether the audit log holds a `forward` record for `mpc`. Read while the gateway
/// writes, so a line still being written is skipped rather than parsed.
fn has_forward_record(h: &Harness, mpc: &str) -> bool {
    let text = std::fs::read_to_string(&h.audit_path).unwrap_or_default();
    text.lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .any(|record| record["event"] == "forward" && record["mpc"] == mpc)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_a_slow_in_flight_request_finish_and_refuses_new_connections() {
    let mut h = Harness::start().await;
    let addr = h.addr();
    let admin = h.admin_addr();

    // An idle kept-alive connection that has already served one request.
    let mut idle = TcpStream::connect(addr).await.expect("connect");
    let keep_alive = format!(
        "POST /mpc/billing-0/end HTTP/1.1\r\nHost: gateway\r\nAuthorization: Bearer {BILLING_TOKEN}\r\nContent-Length: 0\r\n\r\n"
    );
    idle.write_all(keep_alive.as_bytes()).await.expect("write");
    let first = read_one_response_head(&mut idle).await;
    assert!(first.starts_with("HTTP/1.1 204"), "{first}");

    h.sim.push_fault(Fault::Delay(Duration::from_millis(1500)));
    let in_flight = end_in_background(&h, "billing-slow", 2).await;

    let gateway = h.gateway.take().expect("gateway");
    let shutdown = tokio::spawn(gateway.shutdown());

    assert!(
        eventually_async(Duration::from_secs(2), || async {
            TcpStream::connect(addr).await.is_err()
        })
        .await,
        "new connections are refused once shutdown started"
    );
    assert!(
        !in_flight.is_finished(),
        "the slow request is still in flight: the probes below see a drain under way"
    );
    assert_eq!(
        admin_status(admin, "/readyz").await,
        Some(503),
        "not ready while draining"
    );
    assert_eq!(
        admin_status(admin, "/healthz").await,
        Some(200),
        "alive while draining"
    );
    assert!(
        !in_flight.is_finished(),
        "the slow request was still in flight when the listener closed"
    );

    // The idle connection is either closed or answers 503 shutting-down with close.
    let again = format!(
        "POST /mpc/billing-late/end HTTP/1.1\r\nHost: gateway\r\nAuthorization: Bearer {BILLING_TOKEN}\r\nContent-Length: 0\r\n\r\n"
    );
    // A failed write means the gateway already closed it; the read below sees that too.
    let _ = idle.write_all(again.as_bytes()).await;
    let late = closed_or_answered(&mut idle, Duration::from_secs(5)).await;
    if !late.is_empty() {
        assert!(late.starts_with("HTTP/1.1 503"), "{late}");
        assert!(late.contains("urn:mpc-gateway:shutting-down"), "{late}");
        assert!(late.to_ascii_lowercase().contains("connection: close"));
    }

    let answer = tokio::time::timeout(Duration::from_secs(10), in_flight)
        .await
        .expect("in-flight request finished")
        .expect("task");
    assert_eq!(status_of(&answer), Some(204), "{answer}");
    tokio::time::timeout(Duration::from_secs(10), shutdown)
        .await
        .expect("shutdown finished within grace")
        .expect("task")
        .expect("clean shutdown");
    assert_eq!(
        h.sim.request_count(),
        2,
        "the late request was not forwarded"
    );

    let records = h.records();
    let slow: Vec<_> = records
        .iter()
        .filter(|r| r["path"] == "/mpc/billing-slow/end")
        .collect();
    assert_eq!(slow.len(), 2, "forward and result for the slow request");
    assert_eq!(slow[0]["event"], "forward");
    assert_eq!(slow[1]["event"], "result");
    assert_eq!(slow[1]["status"], 204);
    assert_eq!(slow[1]["reason"], "ended");
    assert!(records.iter().all(|r| r["path"] != "/mpc/billing-late/end"
        || (r["event"] == "denied" && r["reason"] == "shutting-down")));
    h.assert_chain();
}

/// `shutdown_grace` (2 s here) runs out while a forwarded request is still with Plivo:
/// the caller gets no answer, and its `result` record is written before the log closes,
/// with no status and reason `shutting-down`. A chain with a `forward` and no `result`
/// would hide whether the MPC was ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_still_with_plivo_when_the_grace_runs_out_gets_a_result_record() {
    for fsync in ["always", "never"] {
        requests_still_with_plivo_get_result_records(fsync).await;
    }
}

/// Three requests cut at once: their `result` records share one batch, whose
/// acknowledgement must reach all three (awaited one by one, the drain never ended).
async fn requests_still_with_plivo_get_result_records(fsync: &'static str) {
    let mut h = Harness::with(Options {
        timeout: "10s",
        fsync,
        ..Options::default()
    })
    .await;
    let names = ["billing-cut-1", "billing-cut-2", "billing-cut-3"];
    let mut in_flight = Vec::new();
    for (sent, name) in (1..).zip(names) {
        h.sim.push_fault(Fault::Delay(Duration::from_secs(6)));
        in_flight.push(end_in_background(&h, name, sent).await);
    }
    let started = std::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(5), h.stop_gateway())
        .await
        .expect("the drain ends");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(4),
        "{fsync}: the drain waited for the grace, not for Plivo: {took:?}"
    );
    for answer in in_flight {
        let answer = tokio::time::timeout(Duration::from_secs(10), answer)
            .await
            .expect("the caller's exchange ended")
            .expect("task");
        assert_eq!(
            status_of(&answer),
            None,
            "no answer reached the caller: {answer}"
        );
    }

    let records = h.records();
    for name in names {
        let path = format!("/mpc/{name}/end");
        let cut: Vec<_> = records.iter().filter(|r| r["path"] == path).collect();
        assert_eq!(cut.len(), 2, "{fsync}: forward and result: {records:?}");
        assert_eq!(cut[0]["event"], "forward");
        assert_eq!(cut[1]["event"], "result");
        assert_eq!(cut[1]["request_id"], cut[0]["request_id"]);
        assert_eq!(cut[1]["status"], serde_json::Value::Null);
        assert_eq!(cut[1]["reason"], "shutting-down");
        assert_eq!(cut[1]["upstream_status"], serde_json::Value::Null);
        assert_eq!(cut[1]["mpc"], name);
        assert!(cut[1]["duration_ms"].as_u64().is_some_and(|ms| ms >= 1900));
    }
    h.assert_chain();
}

/// A by-uuid request cut by the grace while its DELETE is with Plivo: its `result`
/// names the MPC the lookup learned, as the request's own `result` would.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_by_uuid_request_cut_by_the_grace_names_its_mpc_in_the_result() {
    let mut h = Harness::with(Options {
        timeout: "10s",
        liveness: Liveness::Explicit,
        ..Options::default()
    })
    .await;
    let uuid = h.sim.add_mpc("billing-by-uuid-cut");
    // The lookup is answered at once; the DELETE is held past the grace.
    h.sim.push_fault(Fault::Delay(Duration::ZERO));
    h.sim.push_fault(Fault::Delay(Duration::from_secs(6)));
    let in_flight = end_in_background(&h, &format!("by-uuid/{uuid}"), 2).await;
    tokio::time::timeout(Duration::from_secs(5), h.stop_gateway())
        .await
        .expect("the drain ends");
    let answer = tokio::time::timeout(Duration::from_secs(10), in_flight)
        .await
        .expect("the caller's exchange ended")
        .expect("task");
    assert_eq!(status_of(&answer), None, "no answer: {answer}");

    let result = h.records().pop().expect("a result record");
    assert_eq!(result["event"], "result");
    assert_eq!(result["reason"], "shutting-down");
    assert_eq!(result["status"], serde_json::Value::Null);
    assert_eq!(result["path"], format!("/mpc/by-uuid/{uuid}/end"));
    assert_eq!(result["mpc"], "billing-by-uuid-cut");
    h.assert_chain();
}

/// A request not yet forwarded when `shutdown_grace` runs out (here: its declared body
/// never comes) is dropped with its connection, and still gets its terminal record: a
/// `denied` with no status (the caller got no answer) and reason `shutting-down`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_not_yet_forwarded_when_the_grace_runs_out_gets_a_denied_record() {
    let mut h = Harness::start().await;
    let mut waiting = TcpStream::connect(h.addr()).await.expect("connect");
    let head = format!(
        "POST /mpc/billing-waiting/end HTTP/1.1\r\nHost: gateway\r\nAuthorization: Bearer {BILLING_TOKEN}\r\nContent-Length: 10\r\nExpect: 100-continue\r\n\r\n"
    );
    waiting.write_all(head.as_bytes()).await.expect("write");
    // The head is read and the gateway is waiting for the body: `100 Continue` is sent
    // when it first polls the body (src/gateway/mod.rs, `read_bounded_body`).
    expect_100_continue(&mut waiting).await;
    tokio::time::timeout(Duration::from_secs(5), h.stop_gateway())
        .await
        .expect("the drain ends");
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(2), waiting.read_to_end(&mut rest)).await;
    assert!(
        rest.is_empty(),
        "no answer: {:?}",
        String::from_utf8_lossy(&rest)
    );
    let records = h.records();
    assert_eq!(records.len(), 1, "{records:?}");
    let denied = &records[0];
    assert_eq!(denied["event"], "denied");
    assert_eq!(denied["path"], "/mpc/billing-waiting/end");
    assert_eq!(denied["status"], serde_json::Value::Null);
    assert_eq!(denied["reason"], "shutting-down");
    assert_eq!(h.sim.request_count(), 0);
    h.assert_chain();
}

/// Sends `POST /mpc/{name}/end` on a connection of its own in the background and waits
/// until the simulator has received `forwarded` requests in all (this one included);
/// the task yields the raw answer.
async fn end_in_background(
    h: &Harness,
    name: &str,
    forwarded: u64,
) -> tokio::task::JoinHandle<String> {
    let addr = h.addr();
    let request = post_end(name, BILLING_TOKEN);
    let in_flight = tokio::spawn(async move {
        raw_exchange(addr, request.as_bytes(), Duration::from_secs(10)).await
    });
    assert!(
        eventually_async(Duration::from_secs(5), || async {
            h.sim.request_count() >= forwarded
        })
        .await,
        "the simulator received {name}"
    );
    in_flight
}

/// Reads until the end of one response head plus its (empty or Content-Length) body.
async fn read_one_response_head(stream: &mut TcpStream) -> String {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    let deadline = Instant::now() + Duration::from_secs(5);
    while !String::from_utf8_lossy(&buf).contains("\r\n\r\n") {
        let left = deadline.saturating_duration_since(Instant::now());
        let n = tokio::time::timeout(left, stream.read(&mut chunk))
            .await
            .expect("response within 5 s")
            .expect("read");
        assert!(n > 0, "connection closed before a response");
        buf.extend_from_slice(&chunk[..n]);
    }
    String::from_utf8_lossy(&buf).into_owned()
}

/// Reads `stream` until the server closes it (EOF or a reset) or a complete response has
/// arrived, and returns what was read (empty when it closed without answering). Panics
/// when neither happens `within`: a connection left hanging is a failure, not a pass.
async fn closed_or_answered(stream: &mut TcpStream, within: Duration) -> String {
    let mut received = Vec::new();
    let mut chunk = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let read = tokio::time::timeout_at(deadline, stream.read(&mut chunk))
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "neither closed nor answered within {within:?}; received {:?}",
                    String::from_utf8_lossy(&received)
                )
            });
        match read {
            Ok(0) => break,
            Ok(n) => received.extend_from_slice(&chunk[..n]),
            Err(err) if err.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(err) => panic!("reading the idle connection: {err}"),
        }
        if !parse_responses(&received).0.is_empty() {
            break;
        }
    }
    String::from_utf8_lossy(&received).into_owned()
}

// ---------------------------------------------------------------------------------------
// Slowloris
// ---------------------------------------------------------------------------------------

/// Waits (at most 15 s) for the server to close `stream`; returns how long that took.
async fn time_until_closed(stream: &mut TcpStream, started: Instant) -> Duration {
    let mut buf = [0u8; 512];
    let mut received = Vec::new();
    let outcome = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => received.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(
        outcome.is_ok(),
        "the server still held the connection after 15 s (header timeout is {HEADER_READ_TIMEOUT:?}); received {:?}",
        String::from_utf8_lossy(&received)
    );
    assert!(
        !String::from_utf8_lossy(&received).contains(" 204"),
        "a partial request was answered as a success"
    );
    started.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_partial_head_is_closed_by_the_header_timeout() {
    let h = Harness::start().await;
    let started = Instant::now();
    let mut stream = TcpStream::connect(h.addr()).await.expect("connect");
    stream
        .write_all(
            format!(
                "POST /mpc/billing-1/end HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {BILLING_TOKEN}\r\n"
            )
            .as_bytes(),
        )
        .await
        .expect("write");
    let took = time_until_closed(&mut stream, started).await;
    assert!(
        took >= HEADER_READ_TIMEOUT - Duration::from_secs(1),
        "closed after {took:?}, before the header timeout: something else closed it"
    );
    assert_eq!(h.sim.request_count(), 0, "nothing forwarded");
    assert!(
        h.records().is_empty(),
        "no audit record for an unparsed request"
    );
    let text = metrics_text(&h).await;
    assert_eq!(
        sample(&text, "mpc_gateway_request_duration_seconds_count"),
        Some(0.0)
    );
    // What the HTTP layer refuses is counted in a metric instead of the audit log.
    let series = "mpc_gateway_http_rejected_total{kind=\"header-timeout\"}";
    assert!(
        eventually_async(Duration::from_secs(2), || async {
            sample(&metrics_text(&h).await, series) == Some(1.0)
        })
        .await,
        "{series} counted once:\n{}",
        metrics_text(&h).await
    );
    h.shutdown().await;
}

/// An idle kept-alive connection: after its first answer the client sends nothing more.
/// Waiting for the next request head is covered by the same timeout, so the connection is
/// closed about 10 s later instead of being held forever. That is counted apart from a
/// first head that never came (`idle-timeout`, not `header-timeout`): an alert on
/// refusals must not fire for idle clients.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keep_alive_connection_is_closed_by_the_header_timeout() {
    let h = Harness::start().await;
    let mut stream = TcpStream::connect(h.addr()).await.expect("connect");
    let request = format!(
        "POST /mpc/billing-idle/end HTTP/1.1\r\nHost: gateway\r\nAuthorization: Bearer {BILLING_TOKEN}\r\nContent-Length: 0\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.expect("write");
    let head = read_one_response_head(&mut stream).await;
    assert_eq!(status_of(&head), Some(204), "{head}");
    let started = Instant::now();
    let took = time_until_closed(&mut stream, started).await;
    assert!(
        took >= HEADER_READ_TIMEOUT - Duration::from_secs(1),
        "closed too early: {took:?}"
    );
    assert_eq!(h.records().len(), 2, "only the one request was recorded");
    let idle = "mpc_gateway_http_rejected_total{kind=\"idle-timeout\"}";
    assert!(
        eventually_async(Duration::from_secs(2), || async {
            sample(&metrics_text(&h).await, idle) == Some(1.0)
        })
        .await,
        "{idle} counted once:\n{}",
        metrics_text(&h).await
    );
    let refused = "mpc_gateway_http_rejected_total{kind=\"header-timeout\"}";
    assert_eq!(sample(&metrics_text(&h).await, refused), None);
    h.shutdown().await;
}

/// The 10 s count from the accept, not from the first byte: a client that waits 6 s and
/// then trickles a partial head is closed about 10 s after it connected, not 16 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_partial_head_is_closed_ten_seconds_after_the_accept() {
    let h = Harness::start().await;
    let started = Instant::now();
    let mut stream = TcpStream::connect(h.addr()).await.expect("connect");
    tokio::time::sleep(Duration::from_secs(6)).await;
    stream
        .write_all(b"POST /mpc/billing-1/end HTTP/1.1\r\nHost: x\r\n")
        .await
        .expect("write");
    let took = time_until_closed(&mut stream, started).await;
    assert!(
        took >= HEADER_READ_TIMEOUT - Duration::from_secs(1)
            && took < HEADER_READ_TIMEOUT + Duration::from_secs(2),
        "closed {took:?} after the connect"
    );
    assert_eq!(h.sim.request_count(), 0);
    assert!(h.records().is_empty());
    let series = "mpc_gateway_http_rejected_total{kind=\"header-timeout\"}";
    assert_eq!(sample(&metrics_text(&h).await, series), Some(1.0));
    h.shutdown().await;
}

/// A TCP probe (a load balancer's, a kubelet `tcpSocket` check) connects and closes
/// without a byte: nothing was refused, so nothing is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_closed_before_its_first_byte_is_not_counted_as_refused() {
    let h = Harness::start().await;
    for _ in 0..3 {
        drop(TcpStream::connect(h.addr()).await.expect("connect"));
    }
    // A request after the probes: once it is answered, the probes' connections, accepted
    // before it, have been looked at.
    assert_eq!(
        h.end("billing-after-probes", BILLING_TOKEN).await.status,
        204
    );
    assert!(
        eventually_async(Duration::from_secs(2), || async {
            let open = sample(&metrics_text(&h).await, "mpc_gateway_open_connections");
            matches!(open, Some(n) if n <= 1.0)
        })
        .await,
        "every probe's connection closed (the harness keeps its own alive)"
    );
    let text = metrics_text(&h).await;
    assert!(
        !text.contains("mpc_gateway_http_rejected_total{"),
        "nothing counted as refused:\n{text}"
    );
    h.shutdown().await;
}

/// A connection that sends nothing at all has not completed its headers either; it must
/// not be held forever (4096 such connections would stop the gateway from accepting).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connection_is_closed_by_the_header_timeout() {
    let h = Harness::start().await;
    let started = Instant::now();
    let mut silent = TcpStream::connect(h.addr()).await.expect("connect");
    let took = time_until_closed(&mut silent, started).await;
    assert!(
        took >= HEADER_READ_TIMEOUT - Duration::from_secs(1),
        "{took:?}"
    );
    assert_eq!(h.sim.request_count(), 0);
    assert!(h.records().is_empty());
    h.shutdown().await;
}

/// Bytes that could still begin the HTTP/2 preface (`PRI * HTTP/2.0...`), then nothing:
/// the same slowloris, one step further.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_http2_preface_is_closed_by_the_header_timeout() {
    let h = Harness::start().await;
    let started = Instant::now();
    let mut stream = TcpStream::connect(h.addr()).await.expect("connect");
    stream.write_all(b"PRI * HTTP/2").await.expect("write");
    let took = time_until_closed(&mut stream, started).await;
    assert!(
        took >= HEADER_READ_TIMEOUT - Duration::from_secs(1),
        "{took:?}"
    );
    assert_eq!(h.sim.request_count(), 0);
    assert!(h.records().is_empty());
    h.shutdown().await;
}

/// A body that is declared and never finished, before authentication: the body timeout
/// answers `408 request-timeout` and closes the connection, instead of holding it (and a
/// connection slot) for as long as the caller likes. The one terminal record is `denied`,
/// with no tenant: the body is read before the caller is authenticated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declared_body_never_sent_is_408_after_the_body_timeout() {
    let h = Harness::start().await;
    let head = format!(
        "POST /mpc/billing-1/end HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {BILLING_TOKEN}\r\nContent-Length: 100\r\n\r\n{{\"partial\":"
    );
    let started = Instant::now();
    let answer = raw_exchange(h.addr(), head.as_bytes(), Duration::from_secs(15)).await;
    let took = started.elapsed();
    assert!(
        took >= BODY_READ_TIMEOUT - Duration::from_secs(1) && took < Duration::from_secs(15),
        "answered and closed after {took:?}: {answer}"
    );
    assert_eq!(status_of(&answer), Some(408), "{answer}");
    assert!(
        answer.to_ascii_lowercase().contains("connection: close"),
        "{answer}"
    );
    assert!(
        answer.contains("urn:mpc-gateway:request-timeout"),
        "{answer}"
    );
    assert_eq!(h.sim.request_count(), 0, "nothing forwarded");
    let records = h.records();
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0]["event"], "denied");
    assert_eq!(records[0]["reason"], "request-timeout");
    assert_eq!(records[0]["status"], 408);
    assert_eq!(records[0]["tenant"], serde_json::Value::Null);
    h.assert_chain();
    h.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// Audit fail-closed on a full disk
// ---------------------------------------------------------------------------------------

/// DESIGN §3: "If only the `result` record fails, the MPC was already ended: the caller
/// gets the real outcome, the failure is logged and counted", and `/readyz` reports not
/// ready until writes succeed again. The disk fills while the request is with Plivo.
///
/// tmpfs allocates whole pages, so a result record that fits in the page its forward
/// record ends in would still be written. Refused calls (whose `denied` record holds
/// the path, so its size is chosen) first move the log's end so that the forward record
/// ends less than a result record before a page boundary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_record_that_cannot_be_written_still_answers_the_real_outcome() {
    const PAGE: u64 = 4096;
    let mount_dir = tempfile::tempdir().expect("tempdir");
    let mount = TmpfsMount::mount(mount_dir.path(), "256k");
    let audit_path = mount.path.join("audit.jsonl");
    let h = Harness::with(Options {
        audit_path: Some(audit_path.clone()),
        ..Options::default()
    })
    .await;
    let size = || std::fs::metadata(&audit_path).expect("audit file").len();

    // The sizes of a forward and a result record for a name of this length.
    let before = size();
    assert_eq!(h.end("billing-0", BILLING_TOKEN).await.status, 204);
    let lines: Vec<u64> = std::fs::read_to_string(&audit_path)
        .expect("read")
        .lines()
        .map(|line| line.len() as u64 + 1)
        .collect();
    let (forward, result) = (lines[lines.len() - 2], lines[lines.len() - 1]);
    assert_eq!(size() - before, forward + result);

    // Where the slow request's forward record must end: half a result before a page end.
    // Refused calls of `base + 12` to `base + 256` bytes each. As many as fit at the
    // smallest size: at least three, so an even split is never above the largest.
    let mut base = denied_record_base(&h, &size, 20).await;
    let mut end = size() + forward + 3 * (base + 256);
    end += (PAGE - result / 2 + PAGE - end % PAGE) % PAGE;
    let mut calls = (end - forward - size()) / (base + 12);
    while calls > 0 {
        let gap = end - forward - size();
        let path_len = gap / calls - base;
        calls -= 1;
        assert!(
            (12..=256).contains(&path_len),
            "padding plan failed: gap {gap}, base {base}"
        );
        base = denied_record_base(&h, &size, path_len).await;
    }
    // A seq that gains a digit moves a record by a byte: the check after the forward
    // record below allows for that.
    assert!((size() + forward).abs_diff(end) < 4, "padding plan missed");

    h.sim.push_fault(Fault::Delay(Duration::from_millis(1500)));
    let in_flight = end_in_background(&h, "billing-1", 2).await;
    let room = PAGE - size() % PAGE;
    assert!(
        room < result - 8,
        "the result fits the last page ({room} bytes left)"
    );
    fill_filesystem(&mount.path.join("filler"));

    let answer = tokio::time::timeout(Duration::from_secs(10), in_flight)
        .await
        .expect("answered")
        .expect("task");
    assert_eq!(status_of(&answer), Some(204), "the real outcome: {answer}");
    assert_eq!(
        value(&metrics_text(&h).await, "mpc_gateway_audit_failures_total"),
        1.0
    );
    assert_eq!(h.admin_get("/readyz").await.status, 503);
    let last = h.records().pop().expect("records");
    assert_eq!(last["event"], "forward", "no result record: {last}");
    assert_eq!(last["mpc"], "billing-1");

    std::fs::remove_file(mount.path.join("filler")).expect("remove filler");
    assert!(
        eventually_async(Duration::from_secs(10), || async {
            h.admin_get("/readyz").await.status == 200
        })
        .await,
        "ready again once space returns"
    );
    assert_eq!(h.end("billing-2", BILLING_TOKEN).await.status, 204);
    h.assert_chain();
    h.shutdown().await;
    drop(mount);
}

/// Sends a refused (unauthenticated) call whose path is `path_len` bytes; returns the
/// size of its `denied` record without the path.
async fn denied_record_base(h: &Harness, size: &impl Fn() -> u64, path_len: u64) -> u64 {
    let filler = "p".repeat(usize::try_from(path_len).expect("small") - "/mpc//end".len());
    let before = size();
    h.end(&filler, "not-a-token")
        .await
        .assert_problem(401, "unauthenticated");
    let record = size() - before;
    assert!(
        h.records()
            .last()
            .is_some_and(|r| r["path"].as_str().map(str::len)
                == Some(usize::try_from(path_len).expect("small"))),
        "the path is recorded whole"
    );
    record - path_len
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_disk_fails_closed_and_recovers_when_space_returns() {
    full_disk_fails_closed_and_recovers("always").await;
}

/// The same with `fsync: never`, where records are written on the request's own thread.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_disk_fails_closed_and_recovers_without_fsync_too() {
    full_disk_fails_closed_and_recovers("never").await;
}

async fn full_disk_fails_closed_and_recovers(fsync: &'static str) {
    let mount_dir = tempfile::tempdir().expect("tempdir");
    let mount = TmpfsMount::mount(mount_dir.path(), "256k");
    let audit_path = mount.path.join("audit.jsonl");
    let h = Harness::with(Options {
        audit_path: Some(audit_path.clone()),
        fsync,
        ..Options::default()
    })
    .await;
    assert_eq!(h.admin_get("/readyz").await.status, 200);

    let filler = mount.path.join("filler");
    fill_filesystem(&filler);

    let reply = h.end("billing-1", BILLING_TOKEN).await;
    reply.assert_problem(503, "audit-unavailable");
    assert_eq!(
        h.sim.request_count(),
        0,
        "not forwarded without a forward record"
    );
    let ready = h.admin_get("/readyz").await;
    assert_eq!(ready.status, 503, "{:?}", ready.body);
    assert_eq!(h.admin_get("/healthz").await.status, 200);
    let text = metrics_text(&h).await;
    assert!(value(&text, "mpc_gateway_audit_failures_total") >= 1.0);
    // A refusal needs its denied record too: with the disk full it is 503 as well.
    h.end("sales-1", BILLING_TOKEN)
        .await
        .assert_problem(503, "audit-unavailable");
    assert_eq!(h.sim.request_count(), 0);

    std::fs::remove_file(&filler).expect("remove filler");
    assert!(
        eventually_async(Duration::from_secs(10), || async {
            h.admin_get("/readyz").await.status == 200
        })
        .await,
        "ready again within 10 s of space returning"
    );
    let reply = h.end("billing-2", BILLING_TOKEN).await;
    assert_eq!(reply.status, 204, "{:?}", reply.body);
    assert_eq!(h.sim.request_count(), 1);

    let records = h.records();
    assert_eq!(
        records.len(),
        2,
        "only the request after recovery: {records:?}"
    );
    assert_eq!(records[0]["event"], "forward");
    assert_eq!(records[1]["event"], "result");
    assert!(records.iter().all(|r| r["mpc"] == "billing-2"));
    assert_eq!(h.assert_chain(), 2);
    h.shutdown().await;
    drop(mount);
}
