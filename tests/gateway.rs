//! End-to-end tests of the request path: the real gateway on 127.0.0.1:0 in front of a
//! TLS simulator with a CA made here. Each test checks what the caller got, what the
//! upstream received and what the audit log holds.

use crate::common;

use std::time::Duration;

use common::*;
use http::Method;
use mpc_gateway::simulator::Fault;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn happy_path_sends_exactly_the_contract_request_upstream() {
    let h = Harness::start().await;
    let auth = format!("Bearer {BILLING_TOKEN}");
    let reply = h
        .send(
            Method::POST,
            "/mpc/billing-42/end?ignored=1",
            &[
                ("authorization", auth.as_str()),
                ("x-request-id", "caller-req-1"),
            ]
            .into_iter()
            .chain(LEAKY_HEADERS)
            .collect::<Vec<_>>(),
            b"{\"ignored\": true}",
        )
        .await;

    assert_eq!(reply.status, 204, "{:?}", reply.body);
    assert!(reply.body.is_empty());
    assert_eq!(reply.header("x-request-id"), Some("caller-req-1"));
    assert_eq!(
        reply.header("ratelimit-policy"),
        Some("\"tenant\";q=100;w=1")
    );
    assert_eq!(reply.header("ratelimit"), Some("\"tenant\";r=99;t=0"));

    let upstream = h.sim.requests();
    assert_eq!(upstream.len(), 1);
    assert_contract_upstream_request(&upstream[0], "billing-42");

    let records = h.records();
    assert_eq!(records.len(), 2);
    let (forward, result) = (&records[0], &records[1]);
    assert_eq!(forward["event"], "forward");
    assert_eq!(forward["status"], serde_json::Value::Null);
    assert_eq!(result["event"], "result");
    for record in [forward, result] {
        assert_eq!(record["request_id"], "caller-req-1");
        assert_eq!(record["tenant"], "billing");
        assert_eq!(
            record["token_fp"],
            &token_hash(BILLING_TOKEN)["sha256:".len()..]["".len()..12]
        );
        assert_eq!(record["method"], "POST");
        assert_eq!(record["path"], "/mpc/billing-42/end?ignored=1");
        assert_eq!(record["mpc"], "billing-42");
        assert_eq!(record["account"], "default");
        assert!(record["client"]
            .as_str()
            .is_some_and(|c| c.starts_with("127.0.0.1:")));
    }
    assert_eq!(result["status"], 204);
    assert_eq!(result["reason"], "ended");
    assert_eq!(result["upstream_status"], 204);
    assert_eq!(result["attempts"], 1);
    assert!(result["duration_ms"].is_u64());
    assert_eq!(h.assert_chain(), 2);
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odd_names_are_encoded_like_the_official_sdks() {
    let h = Harness::start().await;
    for (segment, upstream_name, decoded) in [
        ("a%20b", "name_a%20b", "a b"),
        ("%C3%A4", "name_%C3%A4", "ä"),
        ("a+b", "name_a%2Bb", "a+b"),
        ("x~y.z_1-2", "name_x~y.z_1-2", "x~y.z_1-2"),
    ] {
        let reply = h.end(segment, OPS_TOKEN).await;
        assert_eq!(reply.status, 204, "{segment}: {:?}", reply.body);
        let last = h.sim.requests().pop().expect("forwarded");
        assert_eq!(
            last.target,
            format!("/v1/Account/{AUTH_ID}/MultiPartyCall/{upstream_name}/")
        );
        let records = h.records();
        assert_eq!(records.last().expect("record")["mpc"], decoded);
    }
    h.assert_chain();
    h.shutdown().await;
}

/// One refusal: the request, the expected status and slug.
struct Refusal {
    what: &'static str,
    method: Method,
    path: String,
    headers: Vec<(&'static str, String)>,
    body: Vec<u8>,
    status: u16,
    slug: &'static str,
}

fn refusal(
    what: &'static str,
    path: &str,
    token: Option<&str>,
    status: u16,
    slug: &'static str,
) -> Refusal {
    Refusal {
        what,
        method: Method::POST,
        path: path.to_owned(),
        headers: token
            .map(|t| vec![("authorization", format!("Bearer {t}"))])
            .unwrap_or_default(),
        body: Vec::new(),
        status,
        slug,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_refusal_has_its_status_slug_and_denied_record_and_forwards_nothing() {
    let h = Harness::start().await;
    let long_name = "billing-".to_owned() + &"x".repeat(121);
    assert_eq!(long_name.chars().count(), 129);
    let mut cases = vec![
        refusal(
            "no token",
            "/mpc/billing-1/end",
            None,
            401,
            "unauthenticated",
        ),
        refusal(
            "unknown token",
            "/mpc/billing-1/end",
            Some("nope"),
            401,
            "unauthenticated",
        ),
        refusal(
            "not allowed",
            "/mpc/sales-1/end",
            Some(BILLING_TOKEN),
            403,
            "forbidden",
        ),
        refusal(
            "case-sensitive",
            "/mpc/Billing-1/end",
            Some(BILLING_TOKEN),
            403,
            "forbidden",
        ),
        refusal(
            "encoded slash",
            "/mpc/billing-a%2Fb/end",
            Some(BILLING_TOKEN),
            400,
            "invalid-mpc-name",
        ),
        refusal(
            "encoded ?",
            "/mpc/billing-a%3Fb/end",
            Some(BILLING_TOKEN),
            400,
            "invalid-mpc-name",
        ),
        refusal(
            "encoded #",
            "/mpc/billing-a%23b/end",
            Some(BILLING_TOKEN),
            400,
            "invalid-mpc-name",
        ),
        refusal(
            "encoded %",
            "/mpc/billing-a%25b/end",
            Some(BILLING_TOKEN),
            400,
            "invalid-mpc-name",
        ),
        refusal(
            "backslash",
            "/mpc/billing-a%5Cb/end",
            Some(BILLING_TOKEN),
            400,
            "invalid-mpc-name",
        ),
        refusal(
            "control char",
            "/mpc/billing-a%0Ab/end",
            Some(BILLING_TOKEN),
            400,
            "invalid-mpc-name",
        ),
        refusal(
            "NUL",
            "/mpc/billing-%00/end",
            Some(BILLING_TOKEN),
            400,
            "invalid-mpc-name",
        ),
        refusal(
            "bad UTF-8",
            "/mpc/billing-%FF/end",
            Some(BILLING_TOKEN),
            400,
            "invalid-mpc-name",
        ),
        refusal(
            "overlong UTF-8",
            "/mpc/billing-%C0%AF/end",
            Some(BILLING_TOKEN),
            400,
            "invalid-mpc-name",
        ),
        refusal(
            "129 chars",
            &format!("/mpc/{long_name}/end"),
            Some(BILLING_TOKEN),
            400,
            "invalid-mpc-name",
        ),
        refusal(
            "empty name",
            "/mpc//end",
            Some(BILLING_TOKEN),
            400,
            "invalid-mpc-name",
        ),
        refusal(
            "unknown path",
            "/v2/other",
            Some(BILLING_TOKEN),
            404,
            "not-found",
        ),
        refusal(
            "extra segment",
            "/mpc/a/b/end",
            Some(BILLING_TOKEN),
            404,
            "not-found",
        ),
    ];
    let mut get = refusal(
        "GET",
        "/mpc/billing-1/end",
        Some(BILLING_TOKEN),
        405,
        "method-not-allowed",
    );
    get.method = Method::GET;
    cases.push(get);
    let mut big = refusal(
        "5 KiB body",
        "/mpc/billing-1/end",
        Some(BILLING_TOKEN),
        413,
        "payload-too-large",
    );
    big.body = vec![b'x'; 5 * 1024];
    cases.push(big);
    // Authentication comes before the name check: an anonymous caller learns nothing.
    cases.push(refusal(
        "anon bad name",
        "/mpc/%FF/end",
        None,
        401,
        "unauthenticated",
    ));
    // The body limit comes before authentication.
    let mut big_anon = refusal(
        "anon big body",
        "/mpc/billing-1/end",
        None,
        413,
        "payload-too-large",
    );
    big_anon.body = vec![b'x'; 4097];
    cases.push(big_anon);
    // The route comes before the body limit: a big body elsewhere is 404 or 405.
    let mut big_elsewhere = refusal(
        "big body, unknown path",
        "/nowhere",
        Some(BILLING_TOKEN),
        404,
        "not-found",
    );
    big_elsewhere.body = vec![b'x'; 5 * 1024];
    cases.push(big_elsewhere);
    let mut big_get = refusal(
        "big body, GET",
        "/mpc/billing-1/end",
        Some(BILLING_TOKEN),
        405,
        "method-not-allowed",
    );
    big_get.method = Method::GET;
    big_get.body = vec![b'x'; 5 * 1024];
    cases.push(big_get);

    for case in &cases {
        let headers: Vec<(&str, &str)> =
            case.headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
        let reply = h
            .send(case.method.clone(), &case.path, &headers, &case.body)
            .await;
        assert_eq!(reply.status, case.status, "{}: {:?}", case.what, reply.body);
        reply.assert_problem(case.status, case.slug);
        match case.status {
            401 => assert_eq!(
                reply.header("www-authenticate"),
                Some("Bearer"),
                "{}",
                case.what
            ),
            405 => assert_eq!(reply.header("allow"), Some("POST"), "{}", case.what),
            _ => {}
        }
        let record = h.records().pop().expect("a record per request");
        assert_eq!(record["event"], "denied", "{}", case.what);
        assert_eq!(record["status"], case.status, "{}", case.what);
        assert_eq!(record["reason"], case.slug, "{}", case.what);
        assert_eq!(record["request_id"].as_str(), reply.header("x-request-id"));
        assert_eq!(record["upstream_status"], serde_json::Value::Null);
        // Refused after authentication: the tenant's account is known.
        let account = match case.slug {
            "forbidden" | "invalid-mpc-name" => serde_json::json!("default"),
            _ => serde_json::Value::Null,
        };
        assert_eq!(record["account"], account, "{}", case.what);
    }
    assert_eq!(h.sim.request_count(), 0, "nothing may be forwarded");
    assert_eq!(
        h.records().len(),
        cases.len(),
        "exactly one record per request"
    );

    let records = h.records();
    // Refused before authentication: no tenant, no fingerprint.
    assert_eq!(records[0]["tenant"], serde_json::Value::Null);
    assert_eq!(records[0]["token_fp"], serde_json::Value::Null);
    // An unknown token is fingerprinted so ops can find the client.
    assert_eq!(records[1]["tenant"], serde_json::Value::Null);
    assert_eq!(records[1]["token_fp"], &token_hash("nope")[7..19]);
    // Forbidden: tenant and decoded name are known.
    assert_eq!(records[2]["tenant"], "billing");
    assert_eq!(records[2]["mpc"], "sales-1");
    // Invalid names never reach the `mpc` member.
    assert_eq!(records[4]["mpc"], serde_json::Value::Null);
    h.assert_chain();
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_limit_refuses_with_retry_after_and_ratelimit_headers() {
    let h = Harness::with(Options {
        tenant_limit: (1, 2),
        ..Options::default()
    })
    .await;
    let first = h.end("billing-1", BILLING_TOKEN).await;
    assert_eq!(first.status, 204);
    assert_eq!(first.header("ratelimit-policy"), Some("\"tenant\";q=2;w=2"));
    assert_eq!(first.header("ratelimit"), Some("\"tenant\";r=1;t=0"));
    let second = h.end("billing-2", BILLING_TOKEN).await;
    assert_eq!(second.status, 204);
    assert_eq!(second.header("ratelimit"), Some("\"tenant\";r=0;t=1"));

    let third = h.end("billing-3", BILLING_TOKEN).await;
    third.assert_problem(429, "rate-limited");
    assert_eq!(third.header("retry-after"), Some("1"));
    assert_eq!(third.json()["retry_after"], 1);
    assert_eq!(third.header("ratelimit-policy"), Some("\"tenant\";q=2;w=2"));
    assert_eq!(third.header("ratelimit"), Some("\"tenant\";r=0;t=1"));
    assert_eq!(
        h.sim.request_count(),
        2,
        "the refused request is not forwarded"
    );

    // Another tenant has its own bucket.
    assert_eq!(h.end("billing-4", OPS_TOKEN).await.status, 204);

    h.clock.advance(Duration::from_secs(1));
    assert_eq!(h.end("billing-5", BILLING_TOKEN).await.status, 204);

    let denied = h
        .records()
        .into_iter()
        .find(|r| r["event"] == "denied")
        .expect("denied record");
    assert_eq!(denied["reason"], "rate-limited");
    assert_eq!(denied["status"], 429);
    assert_eq!(denied["tenant"], "billing");
    let metrics = h.admin_get("/metrics").await;
    let text = String::from_utf8_lossy(&metrics.body);
    assert!(
        text.contains("mpc_gateway_rate_limited_total{tenant=\"billing\",limit=\"tenant\"} 1"),
        "{text}"
    );
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn account_limit_is_shared_by_the_tenants_of_an_account() {
    let h = Harness::with(Options {
        account_limit: (1, 1),
        ..Options::default()
    })
    .await;
    assert_eq!(h.end("billing-1", BILLING_TOKEN).await.status, 204);
    let refused = h.end("ops-1", OPS_TOKEN).await;
    refused.assert_problem(429, "rate-limited");
    assert_eq!(refused.header("retry-after"), Some("1"));
    assert_eq!(
        refused.header("ratelimit-policy"),
        Some("\"account\";q=1;w=1")
    );
    assert_eq!(refused.header("ratelimit"), Some("\"account\";r=0;t=1"));
    assert_eq!(
        refused.json()["retry_after"],
        1,
        "the body repeats Retry-After"
    );
    assert_eq!(h.sim.request_count(), 1);
    let records = h.records();
    assert_eq!(records.len(), 3, "forward, result, denied: {records:?}");
    let denied = &records[2];
    assert_eq!(denied["event"], "denied");
    assert_eq!(denied["status"], 429);
    assert_eq!(denied["reason"], "rate-limited");
    assert_eq!(denied["tenant"], "ops");
    assert_eq!(denied["account"], "default");
    assert_eq!(denied["mpc"], "ops-1");
    assert_eq!(
        denied["request_id"].as_str(),
        refused.header("x-request-id"),
        "the record is the refused request's"
    );
    assert_eq!(denied["upstream_status"], serde_json::Value::Null);
    assert_eq!(denied["attempts"], serde_json::Value::Null);
    let text = metrics_text(&h).await;
    assert!(
        text.contains("mpc_gateway_rate_limited_total{tenant=\"ops\",limit=\"account\"} 1"),
        "{text}"
    );
    h.clock.advance(Duration::from_secs(1));
    assert_eq!(h.end("ops-2", OPS_TOKEN).await.status, 204);
    h.assert_chain();
    h.shutdown().await;
}

/// The tenant's limit is checked before the account's, and a request the tenant's limit
/// refuses takes nothing from the account: another tenant of the account still gets
/// its share.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tenant_limit_comes_first_and_its_refusal_spends_no_account_cell() {
    let h = Harness::with(Options {
        tenant_limit: (1, 1),
        account_limit: (1, 2),
        ..Options::default()
    })
    .await;
    assert_eq!(h.end("billing-1", BILLING_TOKEN).await.status, 204);
    let tenant_refused = h.end("billing-2", BILLING_TOKEN).await;
    tenant_refused.assert_problem(429, "rate-limited");
    assert_eq!(
        tenant_refused.header("ratelimit-policy"),
        Some("\"tenant\";q=1;w=1")
    );
    assert_eq!(
        h.end("ops-1", OPS_TOKEN).await.status,
        204,
        "the account's second cell is still there"
    );
    let account_refused = h.end("ops-2", OPS_TOKEN).await;
    account_refused.assert_problem(429, "rate-limited");
    assert_eq!(
        account_refused.header("ratelimit-policy"),
        Some("\"account\";q=2;w=2")
    );
    assert_eq!(h.sim.request_count(), 2);
    let reasons: Vec<_> = h.records().iter().map(|r| r["reason"].clone()).collect();
    assert_eq!(
        reasons,
        [
            serde_json::Value::Null,
            "ended".into(),
            "rate-limited".into(),
            serde_json::Value::Null,
            "ended".into(),
            "rate-limited".into(),
        ]
    );
    h.shutdown().await;
}

/// The other way round: a request the account's limit refuses takes nothing from its
/// tenant either. The account refills in half a second, the tenant in one; half a second
/// after the refusal the tenant's only cell is still there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_account_refusal_spends_no_tenant_cell() {
    let h = Harness::with(Options {
        tenant_limit: (1, 1),
        account_limit: (2, 1),
        ..Options::default()
    })
    .await;
    assert_eq!(h.end("ops-1", OPS_TOKEN).await.status, 204);
    let account_refused = h.end("billing-1", BILLING_TOKEN).await;
    account_refused.assert_problem(429, "rate-limited");
    assert_eq!(
        account_refused.header("ratelimit-policy"),
        Some("\"account\";q=1;w=1")
    );
    h.clock.advance(Duration::from_millis(500));
    let admitted = h.end("billing-2", BILLING_TOKEN).await;
    assert_eq!(admitted.status, 204, "billing's tenant cell was not spent");
    assert_eq!(
        admitted.header("ratelimit"),
        Some("\"tenant\";r=0;t=1"),
        "and this request took it"
    );
    assert_eq!(h.sim.request_count(), 2);
    let text = metrics_text(&h).await;
    assert!(
        text.contains("mpc_gateway_rate_limited_total{tenant=\"billing\",limit=\"account\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("mpc_gateway_rate_limited_total{tenant=\"billing\",limit=\"tenant\"} 0"),
        "{text}"
    );
    h.assert_chain();
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ending_twice_maps_plivo_404_to_mpc_not_found() {
    let h = Harness::start().await;
    assert_eq!(h.end("billing-7", BILLING_TOKEN).await.status, 204);
    let again = h.end("billing-7", BILLING_TOKEN).await;
    again.assert_problem(404, "mpc-not-found");
    let record = h.records().pop().expect("record");
    assert_eq!(record["event"], "result");
    assert_eq!(record["reason"], "mpc-not-found");
    assert_eq!(record["upstream_status"], 404);
    assert!(record["plivo_api_id"].is_string());
    assert!(again.json()["detail"]
        .as_str()
        .is_some_and(|d| d.contains(record["plivo_api_id"].as_str().unwrap_or("?"))));
    h.shutdown().await;
}

/// Plivo's 403 is a credentials problem too; any other 4xx is `upstream-error`, with
/// Plivo's `api_id` and message passed on. None of them is retried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plivo_403_and_other_4xx_map_as_the_contract_says() {
    let h = Harness::start().await;
    for (status, slug) in [
        (403u16, "upstream-credentials-rejected"),
        (400, "upstream-error"),
        (405, "upstream-error"),
        (422, "upstream-error"),
    ] {
        let before = h.sim.request_count();
        h.sim.push_fault(Fault::status(
            status,
            format!(r#"{{"api_id":"api-{status}","error":"refused {status}"}}"#),
        ));
        let reply = h.end(&format!("billing-{status}"), BILLING_TOKEN).await;
        reply.assert_problem(502, slug);
        assert_eq!(h.sim.request_count() - before, 1, "{status} is not retried");
        let result = last_result(&h);
        assert_eq!(result["status"], 502);
        assert_eq!(result["reason"], slug);
        assert_eq!(result["upstream_status"], status);
        assert_eq!(result["plivo_api_id"], format!("api-{status}"));
        assert_eq!(result["attempts"], 1);
        if slug == "upstream-error" {
            let detail = reply.json()["detail"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            assert!(detail.contains(&format!("refused {status}")), "{detail}");
        }
    }
    let text = metrics_text(&h).await;
    assert!(
        text.contains("mpc_gateway_upstream_requests_total{status=\"403\"} 1"),
        "{text}"
    );
    h.assert_chain();
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plivo_401_means_the_gateways_credentials_were_rejected() {
    let h = Harness::start().await;
    let reply = h.end("anything", STALE_TENANT_TOKEN).await;
    reply.assert_problem(502, "upstream-credentials-rejected");
    let detail = reply.json()["detail"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(!detail.contains(SECOND_AUTH_TOKEN));
    let sent = h.sim.requests().pop().expect("forwarded");
    assert_eq!(
        sent.target,
        format!("/v1/Account/{SECOND_AUTH_ID}/MultiPartyCall/name_anything/")
    );
    let record = h.records().pop().expect("record");
    assert_eq!(record["account"], "second");
    assert_eq!(record["upstream_status"], 401);
    assert_eq!(record["attempts"], 1, "401 is not retried");
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plivo_429_becomes_503_with_plivos_retry_after() {
    let h = Harness::start().await;
    h.sim.push_fault(Fault::Status {
        status: 429,
        headers: vec![("Retry-After".into(), "7".into())],
        body: r#"{"api_id":"rl-1","error":"too many requests"}"#.into(),
    });
    let reply = h.end("billing-1", BILLING_TOKEN).await;
    reply.assert_problem(503, "upstream-rate-limited");
    assert_eq!(reply.header("retry-after"), Some("7"));
    assert_eq!(reply.json()["retry_after"], 7);
    assert_eq!(h.sim.request_count(), 1, "429 is not retried");
    let record = h.records().pop().expect("record");
    assert_eq!(record["plivo_api_id"], "rl-1");
    assert_eq!(record["upstream_status"], 429);

    h.sim.push_fault(Fault::status(429, ""));
    let reply = h.end("billing-2", BILLING_TOKEN).await;
    assert_eq!(reply.header("retry-after"), Some("1"), "Plivo gave none: 1");
    h.shutdown().await;
}

/// RFC 9110 lets Plivo give `Retry-After` as an HTTP-date; the caller still gets whole
/// seconds (DESIGN §1: "every response that carries `Retry-After` also has
/// `retry_after`", with the same seconds), counted from now and rounded up. A date 3 s
/// ahead, formatted to the whole second, is 2 to 4 s away by the time the gateway reads
/// it; a gateway that cannot read dates falls back to 1 and fails here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plivo_429_with_an_http_date_retry_after_is_whole_seconds_from_now() {
    let h = Harness::start().await;
    let at = std::time::SystemTime::now() + Duration::from_secs(3);
    h.sim.push_fault(Fault::Status {
        status: 429,
        headers: vec![("Retry-After".into(), httpdate::fmt_http_date(at))],
        body: r#"{"api_id":"rl-date","error":"too many requests"}"#.into(),
    });
    let reply = h.end("billing-1", BILLING_TOKEN).await;
    reply.assert_problem(503, "upstream-rate-limited");
    let header = reply.header("retry-after").expect("Retry-After");
    let seconds: u64 = header
        .parse()
        .unwrap_or_else(|_| panic!("Retry-After in whole seconds, not {header:?}"));
    assert!((2..=4).contains(&seconds), "Retry-After {seconds}");
    assert_eq!(reply.json()["retry_after"], seconds, "the body agrees");
    assert_eq!(h.sim.request_count(), 1, "429 is not retried");
    let record = h.records().pop().expect("record");
    assert_eq!(record["upstream_status"], 429);
    assert_eq!(record["reason"], "upstream-rate-limited");
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_503_is_retried_and_the_retry_can_succeed() {
    let h = Harness::start().await;
    h.sim.push_fault(Fault::status(503, ""));
    let reply = h.end("billing-1", BILLING_TOKEN).await;
    assert_eq!(reply.status, 204);
    assert_eq!(h.sim.request_count(), 2);
    let record = h.records().pop().expect("record");
    assert_eq!(record["attempts"], 2);
    assert_eq!(record["upstream_status"], 204);
    let forwards = h
        .records()
        .iter()
        .filter(|r| r["event"] == "forward")
        .count();
    assert_eq!(
        forwards, 1,
        "one forward record per request, not per attempt"
    );
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exhausted_retries_report_the_last_attempt() {
    let h = Harness::start().await;
    for _ in 0..3 {
        h.sim
            .push_fault(Fault::status(503, r#"{"api_id":"x","error":"busy"}"#));
    }
    let reply = h.end("billing-1", BILLING_TOKEN).await;
    reply.assert_problem(502, "upstream-error");
    assert_eq!(h.sim.request_count(), 3, "max_attempts is 3");
    let record = h.records().pop().expect("record");
    assert_eq!(record["attempts"], 3);
    assert_eq!(record["upstream_status"], 503);

    h.sim.push_fault(Fault::status(500, ""));
    let reply = h.end("billing-2", BILLING_TOKEN).await;
    reply.assert_problem(502, "upstream-error");
    assert_eq!(h.sim.request_count(), 4, "500 is not retried");
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_never_answers_times_out_with_504() {
    let h = Harness::with(Options {
        timeout: "400ms",
        ..Options::default()
    })
    .await;
    h.sim.push_fault(Fault::Hang);
    let started = std::time::Instant::now();
    let reply = h.end("billing-1", BILLING_TOKEN).await;
    reply.assert_problem(504, "upstream-timeout");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "timeout bounds the call"
    );
    let record = last_result(&h);
    assert_eq!(record["status"], 504);
    assert_eq!(record["reason"], "upstream-timeout");
    assert_eq!(record["upstream_status"], serde_json::Value::Null);
    assert_eq!(
        record["attempts"], 1,
        "the one hanging attempt used the whole timeout"
    );
    assert_eq!(h.sim.request_count(), 1, "no retry after the deadline");
    h.shutdown().await;
}

/// The contract's limits are inclusive: a 4 KiB body, a 128-character name and a
/// 128-character request id all pass (only one more is refused, tested elsewhere).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_are_inclusive_at_their_exact_size() {
    let h = Harness::start().await;
    let name = format!("billing-{}", "é".repeat(120));
    assert_eq!(name.chars().count(), 128);
    let segment = percent_encoding::utf8_percent_encode(&name, percent_encoding::NON_ALPHANUMERIC)
        .to_string();
    let request_id = "r".repeat(128);
    let body = vec![b'x'; 4096];
    let auth = format!("Bearer {BILLING_TOKEN}");
    let reply = h
        .send(
            Method::POST,
            &format!("/mpc/{segment}/end"),
            &[("authorization", &auth), ("x-request-id", &request_id)],
            &body,
        )
        .await;
    assert_eq!(reply.status, 204, "{:?}", reply.body);
    assert_eq!(reply.header("x-request-id"), Some(request_id.as_str()));
    let sent = h.sim.requests().pop().expect("forwarded");
    let expected_name: String = name
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect();
    assert!(
        sent.target
            .ends_with(&format!("/MultiPartyCall/name_{expected_name}/")),
        "{}",
        sent.target
    );
    let result = last_result(&h);
    assert_eq!(result["mpc"], name.as_str());
    assert_eq!(result["request_id"], request_id.as_str());
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_upstream_within_timeout_succeeds() {
    let h = Harness::with(Options {
        timeout: "2s",
        ..Options::default()
    })
    .await;
    h.sim.push_fault(Fault::Delay(Duration::from_millis(300)));
    let (reply, took) = timed_end(&h, "billing-1").await;
    assert_eq!(reply.status, 204);
    assert!(
        took >= Duration::from_millis(300),
        "waited for Plivo: {took:?}"
    );
    assert_eq!(h.sim.request_count(), 1, "a slow answer is not retried");
    let result = last_result(&h);
    assert_eq!(result["attempts"], 1);
    assert_eq!(result["upstream_status"], 204);
    assert!(result["duration_ms"].as_u64().is_some_and(|ms| ms >= 300));
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resets_are_retried_then_reported_unavailable() {
    let h = Harness::start().await;
    h.sim.push_fault(Fault::Reset);
    assert_eq!(
        h.end("billing-1", BILLING_TOKEN).await.status,
        204,
        "reset then success"
    );
    for _ in 0..3 {
        h.sim.push_fault(Fault::Reset);
    }
    let reply = h.end("billing-2", BILLING_TOKEN).await;
    reply.assert_problem(502, "upstream-unavailable");
    let record = h.records().pop().expect("record");
    assert_eq!(record["attempts"], 3);
    h.shutdown().await;
}

/// A reset after the DELETE was written is retried (DELETE is idempotent). Had the reset
/// attempt ended the MPC, the retry finds it gone: `404 mpc-not-found`, and the record's
/// `attempts` says a retry happened (README, "Upstream").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_whose_retry_finds_the_mpc_gone_is_404_with_two_attempts() {
    let h = Harness::start().await;
    assert_eq!(h.end("billing-8", BILLING_TOKEN).await.status, 204);
    h.sim.push_fault(Fault::Reset);
    let reply = h.end("billing-8", BILLING_TOKEN).await;
    reply.assert_problem(404, "mpc-not-found");
    let record = h.records().pop().expect("record");
    assert_eq!(record["reason"], "mpc-not-found");
    assert_eq!(record["upstream_status"], 404);
    assert_eq!(record["attempts"], 2);
    let deletes = h.sim.requests();
    assert_eq!(
        deletes.len(),
        3,
        "one DELETE, then the reset one and its retry"
    );
    assert!(deletes.iter().all(|r| r.method == "DELETE"));
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_port_is_upstream_unavailable() {
    // Bound but never listening, and held for the whole test: no other socket can take
    // the port, and a SYN to it is answered with a reset (connection refused).
    let closed = tokio::net::TcpSocket::new_v4().expect("socket");
    closed
        .bind(std::net::SocketAddr::from(([127, 0, 0, 1], 0)))
        .expect("bind");
    let port = closed.local_addr().expect("addr").port();
    let h = Harness::with(Options {
        base_url: Some(format!("https://127.0.0.1:{port}")),
        ..Options::default()
    })
    .await;
    let reply = h.end("billing-1", BILLING_TOKEN).await;
    reply.assert_problem(502, "upstream-unavailable");
    let record = h.records().pop().expect("record");
    assert_eq!(record["attempts"], 3, "connect errors are retried");
    assert_eq!(record["upstream_status"], serde_json::Value::Null);
    h.shutdown().await;
    drop(closed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_upstream_certificate_is_unavailable_and_not_retried() {
    let h = Harness::with(Options {
        trust_simulator: false,
        ..Options::default()
    })
    .await;
    let reply = h.end("billing-1", BILLING_TOKEN).await;
    reply.assert_problem(502, "upstream-unavailable");
    assert_eq!(
        h.sim.request_count(),
        0,
        "no request crosses a failed handshake"
    );
    let record = h.records().pop().expect("record");
    assert_eq!(record["attempts"], 1, "TLS failures are not retried");
    h.shutdown().await;
}

/// A fresh request id is a UUID of version 4 or 7 (DESIGN §1), in its usual text form.
fn assert_fresh_request_id(id: &str) {
    let parsed = uuid::Uuid::parse_str(id).unwrap_or_else(|err| panic!("{id:?}: {err}"));
    assert!(
        matches!(parsed.get_version_num(), 4 | 7),
        "{id}: version {}",
        parsed.get_version_num()
    );
    assert_eq!(parsed.hyphenated().to_string(), id.to_ascii_lowercase());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_ids_are_kept_when_valid_and_made_otherwise() {
    let h = Harness::start().await;
    let too_long = "x".repeat(129);
    for (sent, kept) in [
        ("abc-DEF_123", true),
        (too_long.as_str(), false),
        ("has space", false),
        ("", false),
        ("tab\tinside", false),
    ] {
        let reply = h
            .send(
                Method::POST,
                "/mpc/billing-1/end",
                &[("x-request-id", sent)],
                b"",
            )
            .await;
        let id = reply.header("x-request-id").expect("request id").to_owned();
        if kept {
            assert_eq!(id, sent);
        } else {
            assert_fresh_request_id(&id);
        }
        assert_eq!(
            h.records().pop().expect("record")["request_id"],
            id.as_str()
        );
    }
    // What a client library refuses to send goes as raw bytes: a control character, DEL
    // and non-ASCII (UTF-8, and a lone Latin-1 byte).
    for sent in ["caf\u{e9}".as_bytes(), b"caf\xe9", b"\xff\xfe"] {
        let mut request = b"POST /mpc/billing-raw/end HTTP/1.1\r\nHost: gw\r\nContent-Length: 0\r\nConnection: close\r\nX-Request-Id: ".to_vec();
        request.extend_from_slice(sent);
        request.extend_from_slice(b"\r\n\r\n");
        let answer = raw_send(h.addr(), &request, Duration::from_secs(5)).await;
        let response = answer.single();
        let id = response
            .header("x-request-id")
            .unwrap_or_else(|| panic!("{sent:?}: no X-Request-Id: {response:?}"))
            .to_owned();
        assert_eq!(response.status, 401, "{sent:?}: {response:?}");
        assert_fresh_request_id(&id);
        assert_eq!(
            h.records().pop().expect("record")["request_id"],
            id.as_str(),
            "{sent:?}"
        );
    }
    // A control character or DEL is not a legal field value (RFC 9110 §5.5): hyper's
    // parser refuses the whole head, so the HTTP layer answers a bare `400`, closes, and
    // counts it (DESIGN §1: what the HTTP layer refuses is counted in a metric, not
    // audited). No request id can be made for a request that was never parsed.
    let records_before = h.records().len();
    for sent in [&b"ctl\x01char"[..], b"del\x7f"] {
        let mut request = b"POST /mpc/billing-raw/end HTTP/1.1\r\nHost: gw\r\nContent-Length: 0\r\nX-Request-Id: ".to_vec();
        request.extend_from_slice(sent);
        request.extend_from_slice(b"\r\n\r\n");
        let answer = raw_send(h.addr(), &request, Duration::from_secs(5)).await;
        assert!(answer.closed, "{sent:?}: the connection is closed");
        let response = answer.single();
        assert_eq!(response.status, 400, "{sent:?}: {response:?}");
    }
    assert_eq!(
        h.records().len(),
        records_before,
        "nothing parsed, nothing audited"
    );
    let text = metrics_text(&h).await;
    assert!(
        text.contains("mpc_gateway_http_rejected_total{kind=\"malformed\"} 2"),
        "{text}"
    );
    // An MPC ended with no id sent: a fresh one on the 204 and in both of its records.
    let reply = h.end("billing-2", BILLING_TOKEN).await;
    assert_eq!(reply.status, 204);
    let id = reply.header("x-request-id").expect("request id").to_owned();
    assert_fresh_request_id(&id);
    let records = h.records();
    let [.., forward, result] = records.as_slice() else {
        panic!("two records for the ended MPC");
    };
    assert_eq!(
        (&forward["event"], &result["event"]),
        (&"forward".into(), &"result".into())
    );
    assert_eq!(forward["request_id"], id.as_str());
    assert_eq!(result["request_id"], id.as_str());
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hmac_keyed_chain_and_no_secret_anywhere() {
    let h = Harness::with(Options {
        hmac: true,
        ..Options::default()
    })
    .await;
    assert_eq!(h.end("billing-1", BILLING_TOKEN).await.status, 204);
    let reply = h.end("billing-1", BILLING_TOKEN).await;
    assert_eq!(reply.status, 404);
    assert_eq!(h.end("anything", STALE_TENANT_TOKEN).await.status, 502);
    assert_eq!(h.end("billing-1", "wrong").await.status, 401);
    h.assert_chain();
    let audit = std::fs::read_to_string(&h.audit_path).expect("audit");
    for secret in [
        AUTH_TOKEN,
        SECOND_AUTH_TOKEN,
        BILLING_TOKEN,
        STALE_TENANT_TOKEN,
        HMAC_KEY,
        &token_hash(BILLING_TOKEN)[7..],
        &expected_basic()[6..],
    ] {
        assert!(!audit.contains(secret), "audit log holds a secret");
        assert!(!String::from_utf8_lossy(&reply.body).contains(secret));
    }
    let metrics = h.admin_get("/metrics").await;
    assert!(!String::from_utf8_lossy(&metrics.body).contains(AUTH_TOKEN));
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_framing_is_refused_and_never_forwarded() {
    let h = Harness::start().await;
    let auth = format!("Authorization: Bearer {BILLING_TOKEN}\r\n");

    // Transfer-Encoding with Content-Length: 400 and the connection is closed.
    let both = format!(
        "POST /mpc/billing-1/end HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    );
    let answer = raw_exchange(h.addr(), both.as_bytes(), Duration::from_secs(3)).await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(
        answer.to_ascii_lowercase().contains("connection: close"),
        "{answer}"
    );

    // A Transfer-Encoding other than chunked: hyper refuses it itself.
    let gzip = format!(
        "POST /mpc/billing-1/end HTTP/1.1\r\nHost: x\r\n{auth}Transfer-Encoding: gzip\r\n\r\n"
    );
    let answer = raw_exchange(h.addr(), gzip.as_bytes(), Duration::from_secs(3)).await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");

    // Request line over 8 KiB: 414.
    let long = format!(
        "POST /mpc/billing-{}/end HTTP/1.1\r\nHost: x\r\n{auth}\r\n",
        "y".repeat(8200)
    );
    let answer = raw_exchange(h.addr(), long.as_bytes(), Duration::from_secs(3)).await;
    assert!(
        answer.starts_with("HTTP/1.1 414"),
        "{}",
        &answer[..answer.len().min(200)]
    );

    // Header block over 32 KiB: 431.
    let mut big = format!("POST /mpc/billing-1/end HTTP/1.1\r\nHost: x\r\n{auth}");
    for i in 0..40 {
        big.push_str(&format!("X-Pad-{i}: {}\r\n", "p".repeat(1000)));
    }
    big.push_str("\r\n");
    let answer = raw_exchange(h.addr(), big.as_bytes(), Duration::from_secs(3)).await;
    assert!(
        answer.starts_with("HTTP/1.1 431"),
        "{}",
        &answer[..answer.len().min(200)]
    );

    // An absolute-form target is routed by its path and never changes where we connect.
    let absolute = format!(
        "POST http://evil.example:81/mpc/billing-abs/end HTTP/1.1\r\nHost: evil.example\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n"
    );
    let answer = raw_exchange(h.addr(), absolute.as_bytes(), Duration::from_secs(3)).await;
    assert!(answer.starts_with("HTTP/1.1 204"), "{answer}");
    let sent = h.sim.requests();
    assert_eq!(
        sent.len(),
        1,
        "only the absolute-form request was forwarded"
    );
    assert_eq!(
        sent[0].target,
        format!("/v1/Account/{AUTH_ID}/MultiPartyCall/name_billing-abs/")
    );
    assert_ne!(sent[0].header("host"), Some("evil.example"));
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explicit_liveness_unknown_mpc_is_404() {
    let h = Harness::with_explicit_liveness().await;
    h.sim.add_mpc("billing-live");
    assert_eq!(h.end("billing-live", BILLING_TOKEN).await.status, 204);
    assert!(!h.sim.is_live("billing-live"));
    h.end("billing-unknown", BILLING_TOKEN)
        .await
        .assert_problem(404, "mpc-not-found");
    let result = last_result(&h);
    assert_eq!(result["status"], 404);
    assert_eq!(result["reason"], "mpc-not-found");
    assert_eq!(result["mpc"], "billing-unknown");
    assert_eq!(result["upstream_status"], 404, "Plivo's own 404");
    assert_eq!(result["attempts"], 1);
    assert_eq!(h.sim.request_count(), 2);
    h.shutdown().await;
}
