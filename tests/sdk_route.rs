//! The Plivo-compatible route (`DELETE /v1/Account/{auth_id}/MultiPartyCall/…`, HTTP
//! Basic with the tenant's `sdk_auth_id`) and ending an MPC by uuid on both routes.

use crate::common;

use base64::Engine as _;
use common::*;
use http::Method;
use mpc_gateway::simulator::{Fault, Liveness};

fn basic(username: &str, password: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{username}:{password}"))
    )
}

fn sdk_path(auth_id: &str, mpc: &str) -> String {
    format!("/v1/Account/{auth_id}/MultiPartyCall/{mpc}/")
}

async fn sdk_delete(h: &Harness, path: &str, auth: &str, body: &[u8]) -> Reply {
    h.send(
        Method::DELETE,
        path,
        &[
            ("authorization", auth),
            ("content-type", "application/json"),
        ],
        body,
    )
    .await
}

fn assert_plivo_error(reply: &Reply, status: u16) {
    assert_eq!(reply.status, status, "{:?}", reply.body);
    assert_eq!(reply.header("content-type"), Some("application/json"));
    let body = reply.json();
    // Both sides required: comparing two Options would let None == None pass.
    let header = reply
        .header("x-request-id")
        .expect("every response carries X-Request-Id");
    assert_eq!(body["api_id"].as_str(), Some(header), "{body}");
    assert!(
        body["error"].as_str().is_some_and(|e| !e.is_empty()),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_route_by_name_sends_the_same_upstream_request_as_the_native_route() {
    let h = Harness::start().await;
    let auth = basic(BILLING_SDK_AUTH_ID, BILLING_TOKEN);
    let path = sdk_path(BILLING_SDK_AUTH_ID, "name_billing-a%20b");
    let reply = sdk_delete(&h, &path, &auth, br#"{"friendly_name": "billing-a b"}"#).await;
    assert_eq!(reply.status, 204, "{:?}", reply.body);
    assert_eq!(h.end("billing-c%20d", BILLING_TOKEN).await.status, 204);

    let sent = h.sim.requests();
    assert_eq!(sent.len(), 2);
    assert_eq!(
        sent[0].target,
        format!("/v1/Account/{AUTH_ID}/MultiPartyCall/name_billing-a%20b/")
    );
    for request in &sent {
        assert_eq!(request.method, "DELETE");
        assert_eq!(
            request.header("authorization"),
            Some(expected_basic().as_str())
        );
        assert!(
            request.body.is_empty(),
            "the SDK's JSON body is not forwarded"
        );
        assert_eq!(request.header("content-type"), None);
    }
    // Same headers on both routes.
    let names =
        |i: usize| -> Vec<String> { sent[i].headers.iter().map(|(n, _)| n.clone()).collect() };
    assert_eq!(names(0), names(1));

    let records = h.records();
    assert_eq!(records[1]["mpc"], "billing-a b");
    assert_eq!(records[1]["tenant"], "billing");
    assert_eq!(records[1]["path"], path.as_str());
    assert_eq!(records[1]["token_fp"], &token_hash(BILLING_TOKEN)[7..19]);
    h.assert_chain();
    h.shutdown().await;
}

/// DESIGN §7: the trailing slash of the Plivo-compatible route is optional. Upstream the
/// contract's path (with its slash) is sent; the audit log keeps the caller's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_route_without_the_trailing_slash_ends_the_mpc() {
    let h = Harness::with_explicit_liveness().await;
    h.sim.add_mpc("billing-noslash");
    let auth = basic(BILLING_SDK_AUTH_ID, BILLING_TOKEN);
    let path = format!("/v1/Account/{BILLING_SDK_AUTH_ID}/MultiPartyCall/name_billing-noslash");
    let reply = sdk_delete(&h, &path, &auth, b"").await;
    assert_eq!(reply.status, 204, "{:?}", reply.body);
    assert!(reply.body.is_empty());
    assert!(!h.sim.is_live("billing-noslash"), "ended");

    let sent = h.sim.requests();
    assert_eq!(sent.len(), 1);
    assert_contract_upstream_request(&sent[0], "billing-noslash");

    let result = last_result(&h);
    assert_eq!(h.records().len(), 2);
    assert_eq!(result["status"], 204);
    assert_eq!(result["reason"], "ended");
    assert_eq!(result["method"], "DELETE");
    assert_eq!(result["path"], path.as_str());
    assert_eq!(result["mpc"], "billing-noslash");
    assert_eq!(result["tenant"], "billing");
    assert_eq!(result["upstream_status"], 204);
    assert_eq!(
        result["request_id"],
        reply.header("x-request-id").expect("id")
    );
    h.assert_chain();
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_route_refusals_are_plivo_shaped_with_the_native_status() {
    let h = Harness::with(Options {
        tenant_limit: (1, 1),
        ..Options::default()
    })
    .await;
    let good = basic(BILLING_SDK_AUTH_ID, BILLING_TOKEN);
    let path = |mpc: &str| sdk_path(BILLING_SDK_AUTH_ID, mpc);

    // Username must equal the path's auth id.
    let other_path = sdk_path("MAOTHER0000000000000", "name_billing-1");
    let reply = sdk_delete(&h, &other_path, &good, b"").await;
    assert_plivo_error(&reply, 401);
    assert_eq!(
        reply.header("www-authenticate"),
        Some("Basic realm=\"mpc-gateway\"")
    );
    // A real token with a wrong username, a wrong token, a Bearer token: all 401.
    let wrong_user = basic("MAOTHER0000000000000", BILLING_TOKEN);
    assert_plivo_error(
        &sdk_delete(&h, &path("name_billing-1"), &wrong_user, b"").await,
        401,
    );
    let wrong_token = basic(BILLING_SDK_AUTH_ID, "nope");
    assert_plivo_error(
        &sdk_delete(&h, &path("name_billing-1"), &wrong_token, b"").await,
        401,
    );
    let bearer = format!("Bearer {BILLING_TOKEN}");
    assert_plivo_error(
        &sdk_delete(&h, &path("name_billing-1"), &bearer, b"").await,
        401,
    );
    // A tenant without sdk_auth_id cannot use the route even with a valid token.
    let ops = basic(BILLING_SDK_AUTH_ID, OPS_TOKEN);
    assert_plivo_error(
        &sdk_delete(&h, &path("name_billing-1"), &ops, b"").await,
        401,
    );
    // Names as the SDKs put them on the wire: raw `/` and `?` are refused, never rerouted.
    assert_plivo_error(
        &sdk_delete(&h, &path("name_billing-a/b"), &good, b"").await,
        400,
    );
    let query = format!("/v1/Account/{BILLING_SDK_AUTH_ID}/MultiPartyCall/name_billing-a?b/");
    assert_plivo_error(&sdk_delete(&h, &query, &good, b"").await, 400);
    assert_plivo_error(&sdk_delete(&h, &path("name_other"), &good, b"").await, 403);
    assert_plivo_error(
        &sdk_delete(&h, &path("uuid_not-a-uuid"), &good, b"").await,
        400,
    );
    assert_plivo_error(
        &sdk_delete(&h, &path("name_billing-1"), &good, &[b'x'; 4097]).await,
        413,
    );
    let get = h
        .send(
            Method::GET,
            &path("name_billing-1"),
            &[("authorization", &good)],
            b"",
        )
        .await;
    assert_plivo_error(&get, 405);
    assert_eq!(get.header("allow"), Some("DELETE"));
    assert_eq!(h.sim.request_count(), 0, "nothing forwarded");

    // Success, then the tenant limit (429 with Retry-After), then Plivo's 404.
    assert_eq!(
        sdk_delete(&h, &path("name_billing-1"), &good, b"{}")
            .await
            .status,
        204
    );
    let limited = sdk_delete(&h, &path("name_billing-2"), &good, b"").await;
    assert_plivo_error(&limited, 429);
    assert_eq!(limited.header("retry-after"), Some("1"));
    assert_eq!(
        limited.json()["retry_after"],
        1,
        "as in every Retry-After reply"
    );
    h.clock.advance(std::time::Duration::from_secs(1));
    let gone = sdk_delete(&h, &path("name_billing-1"), &good, b"").await;
    assert_plivo_error(&gone, 404);
    assert_eq!(
        gone.json().get("retry_after"),
        None,
        "only with Retry-After"
    );

    let reasons: Vec<String> = h
        .records()
        .iter()
        .filter(|r| r["event"] != "forward")
        .map(|r| r["reason"].as_str().unwrap_or("?").to_owned())
        .collect();
    assert_eq!(
        reasons,
        [
            "unauthenticated",
            "unauthenticated",
            "unauthenticated",
            "unauthenticated",
            "unauthenticated",
            "invalid-mpc-name",
            "invalid-mpc-name",
            "forbidden",
            "invalid-mpc-uuid",
            "payload-too-large",
            "method-not-allowed",
            "ended",
            "rate-limited",
            "mpc-not-found",
        ]
    );
    h.shutdown().await;
}

/// A second tenant with an `sdk_auth_id` of its own, so that a username can be a real
/// tenant's id and still be the wrong one.
const SALES_TOKEN: &str = "sales-token-for-tests";
const SALES_SDK_AUTH_ID: &str = "SASALES0000000000002";

/// The Basic username must be the `sdk_auth_id` of the tenant whose token is the password
/// *and* the `{auth_id}` of the path. Being some tenant's `sdk_auth_id` is not enough:
/// billing's token under sales' id (with sales' id or billing's in the path), or with its
/// own id under sales' path, is `401 unauthenticated`, recorded as `denied` with no tenant
/// but the presented token's fingerprint, and nothing reaches Plivo. Each tenant's own
/// credentials on its own path do work, so the refusals are about the pairing alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_basic_username_of_another_tenant_or_not_the_paths_auth_id_is_401() {
    let h = Harness::with(Options {
        extra_tenants_yaml: format!(
            "  sales:\n    tokens: [\"{}\"]\n    allow: [\"*\"]\n    sdk_auth_id: {SALES_SDK_AUTH_ID}\n",
            token_hash(SALES_TOKEN)
        ),
        ..Options::default()
    })
    .await;
    let refused = [
        // (username, password, auth id in the path)
        (SALES_SDK_AUTH_ID, BILLING_TOKEN, SALES_SDK_AUTH_ID),
        (SALES_SDK_AUTH_ID, BILLING_TOKEN, BILLING_SDK_AUTH_ID),
        (BILLING_SDK_AUTH_ID, BILLING_TOKEN, SALES_SDK_AUTH_ID),
        (BILLING_SDK_AUTH_ID, SALES_TOKEN, BILLING_SDK_AUTH_ID),
    ];
    for (n, (username, password, path_id)) in refused.iter().enumerate() {
        let path = sdk_path(path_id, &format!("name_billing-{n}"));
        let reply = sdk_delete(&h, &path, &basic(username, password), b"").await;
        assert_plivo_error(&reply, 401);
        assert_eq!(
            reply.header("www-authenticate"),
            Some("Basic realm=\"mpc-gateway\""),
            "{username}:{password} on {path}"
        );
    }
    assert_eq!(h.sim.request_count(), 0, "nothing forwarded");
    let records = h.records();
    assert_eq!(records.len(), refused.len(), "{records:?}");
    for (record, (_, password, _)) in records.iter().zip(refused) {
        assert_eq!(record["event"], "denied", "{record}");
        assert_eq!(record["reason"], "unauthenticated", "{record}");
        assert_eq!(record["status"], 401, "{record}");
        assert_eq!(record["tenant"], serde_json::Value::Null, "{record}");
        assert_eq!(record["mpc"], serde_json::Value::Null, "{record}");
        assert_eq!(record["token_fp"], &token_hash(password)[7..19], "{record}");
    }

    for (tenant, id, token) in [
        ("billing", BILLING_SDK_AUTH_ID, BILLING_TOKEN),
        ("sales", SALES_SDK_AUTH_ID, SALES_TOKEN),
    ] {
        let path = sdk_path(id, &format!("name_{tenant}-ok"));
        let reply = sdk_delete(&h, &path, &basic(id, token), b"").await;
        assert_eq!(reply.status, 204, "{tenant}'s own credentials: {reply:?}");
        let result = h.records().pop().expect("result");
        assert_eq!(result["tenant"], tenant, "{result}");
    }
    assert_eq!(h.sim.request_count(), 2, "only the two good calls");
    h.assert_chain();
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ending_by_uuid_reads_the_name_authorizes_it_then_deletes_by_uuid() {
    let h = Harness::with_explicit_liveness().await;
    let uuid = h.sim.add_mpc("billing-standup");
    let reply = h.end(&format!("by-uuid/{uuid}"), BILLING_TOKEN).await;
    assert_eq!(reply.status, 204, "{:?}", reply.body);
    assert!(!h.sim.is_live("billing-standup"));

    let sent = h.sim.requests();
    assert_eq!(sent.len(), 2);
    let expected = format!("/v1/Account/{AUTH_ID}/MultiPartyCall/uuid_{uuid}/");
    assert_eq!(
        (sent[0].method.as_str(), sent[0].target.as_str()),
        ("GET", expected.as_str())
    );
    assert_eq!(
        (sent[1].method.as_str(), sent[1].target.as_str()),
        ("DELETE", expected.as_str())
    );
    for request in &sent {
        assert_eq!(
            request.header("authorization"),
            Some(expected_basic().as_str())
        );
    }
    let result = h.records().pop().expect("result");
    assert_eq!(result["event"], "result");
    assert_eq!(result["path"], format!("/mpc/by-uuid/{uuid}/end"));
    assert_eq!(result["mpc"], "billing-standup");
    assert_eq!(result["attempts"], 2);
    assert_eq!(result["reason"], "ended");

    // The same through the Plivo-compatible route.
    let second = h.sim.add_mpc("billing-retro");
    let auth = basic(BILLING_SDK_AUTH_ID, BILLING_TOKEN);
    let path = sdk_path(BILLING_SDK_AUTH_ID, &format!("uuid_{second}"));
    assert_eq!(
        sdk_delete(&h, &path, &auth, br#"{"uuid":"x"}"#)
            .await
            .status,
        204
    );
    let result = h.records().pop().expect("result");
    assert_eq!(result["mpc"], "billing-retro");
    assert_eq!(result["path"], path.as_str());
    h.assert_chain();
    h.shutdown().await;
}

/// A query cuts an SDK-sent name short (`name_a?b/`), so it is refused, but only after
/// authentication and the body check, like every name check: an anonymous caller gets
/// `401`, an oversized body `413`, an authenticated one `400` (`invalid-mpc-uuid` for a
/// uuid). Nothing is forwarded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_on_the_sdk_route_is_refused_after_authentication() {
    let h = Harness::start().await;
    let good = basic(BILLING_SDK_AUTH_ID, BILLING_TOKEN);
    let base = format!("/v1/Account/{BILLING_SDK_AUTH_ID}/MultiPartyCall");
    let name = format!("{base}/name_billing-a?b/");
    let uuid = format!("{base}/uuid_12345678-90ab-cdef-1234-567890abcdef?x/");

    let anonymous = h.send(Method::DELETE, &name, &[], b"").await;
    assert_plivo_error(&anonymous, 401);
    let wrong_token = basic(BILLING_SDK_AUTH_ID, "nope");
    assert_plivo_error(&sdk_delete(&h, &name, &wrong_token, b"").await, 401);
    assert_plivo_error(&sdk_delete(&h, &name, &good, &[b'x'; 4097]).await, 413);
    let by_name = sdk_delete(&h, &name, &good, b"").await;
    assert_plivo_error(&by_name, 400);
    assert_eq!(
        by_name.json()["error"],
        "the MPC name contains one of / \\ ? # %"
    );
    let by_uuid = sdk_delete(&h, &uuid, &good, b"").await;
    assert_plivo_error(&by_uuid, 400);
    assert_eq!(
        by_uuid.json()["error"],
        "the MPC uuid is not of the form 8-4-4-4-12 hex digits"
    );

    assert_eq!(h.sim.request_count(), 0, "nothing forwarded");
    let records = h.records();
    let reasons: Vec<&str> = records
        .iter()
        .map(|r| r["reason"].as_str().unwrap_or("?"))
        .collect();
    assert_eq!(
        reasons,
        [
            "unauthenticated",
            "unauthenticated",
            "payload-too-large",
            "invalid-mpc-name",
            "invalid-mpc-uuid",
        ]
    );
    assert!(records
        .iter()
        .all(|r| r["event"] == "denied" && r["mpc"].is_null()));
    assert_eq!(records[0]["tenant"], serde_json::Value::Null);
    assert_eq!(records[3]["tenant"], "billing");
    h.assert_chain();
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn by_uuid_of_a_name_the_tenant_may_not_end_is_403_after_the_lookup_only() {
    let h = Harness::with_explicit_liveness().await;
    let uuid = h.sim.add_mpc("sales-weekly");
    let reply = h.end(&format!("by-uuid/{uuid}"), BILLING_TOKEN).await;
    reply.assert_problem(403, "forbidden");
    assert!(h.sim.is_live("sales-weekly"), "not ended");
    let sent = h.sim.requests();
    assert_eq!(sent.len(), 1, "only the lookup");
    assert_eq!(sent[0].method, "GET");
    let records = h.records();
    assert_eq!(records.len(), 2);
    assert_eq!(records[0]["event"], "forward");
    assert_eq!(records[1]["event"], "result");
    assert_eq!(records[1]["reason"], "forbidden");
    assert_eq!(records[1]["mpc"], "sales-weekly");
    assert_eq!(records[1]["upstream_status"], 200);
    h.shutdown().await;
}

/// `timeout` bounds the whole call: a by-uuid request's lookup and DELETE share it. The
/// lookup answers after 2 s of the 3 s `timeout`, the DELETE never: the call ends `504`
/// at 3 s, when the one deadline passes.
///
/// Why the numbers: a DELETE given a `timeout` of its own would end at 2 + 3 = 5 s, and
/// one with no deadline at all would hang until the test client gives up (15 s). The
/// bound of 4 s leaves a loaded machine 1 s past the deadline and is still 1 s short of
/// the wrong answer; the 1 s left of the budget after the lookup's 2 s covers its TLS
/// handshake however slow the machine is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn by_uuid_lookup_and_delete_share_one_timeout() {
    let timeout = std::time::Duration::from_secs(3);
    let h = Harness::with(Options {
        liveness: Liveness::Explicit,
        timeout: "3s",
        ..Options::default()
    })
    .await;
    let uuid = h.sim.add_mpc("billing-slow");
    h.sim
        .push_fault(Fault::Delay(std::time::Duration::from_secs(2)));
    h.sim.push_fault(Fault::Hang);
    let started = std::time::Instant::now();
    let reply = h.end(&format!("by-uuid/{uuid}"), BILLING_TOKEN).await;
    let took = started.elapsed();
    reply.assert_problem(504, "upstream-timeout");
    assert!(
        took >= timeout && took < timeout + std::time::Duration::from_secs(1),
        "answered after {took:?}; the one deadline was at {timeout:?}"
    );
    let methods: Vec<String> = h.sim.requests().into_iter().map(|r| r.method).collect();
    assert_eq!(methods, ["GET", "DELETE"], "the DELETE was sent, then cut");
    let result = h.records().pop().expect("result");
    assert_eq!(result["reason"], "upstream-timeout");
    assert_eq!(
        result["mpc"], "billing-slow",
        "the lookup had found the name"
    );
    h.shutdown().await;
}

/// The lookup's `200` head arrives and its body (the MPC, with its name) never ends:
/// the name is unknown, so nothing is deleted and the caller gets `504` at the deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn by_uuid_lookup_whose_body_never_ends_is_504() {
    let h = Harness::with(Options {
        liveness: Liveness::Explicit,
        timeout: "800ms",
        ..Options::default()
    })
    .await;
    let uuid = h.sim.add_mpc("billing-stalled");
    h.sim.push_fault(Fault::StalledBody(200));
    let started = std::time::Instant::now();
    let reply = h.end(&format!("by-uuid/{uuid}"), BILLING_TOKEN).await;
    let took = started.elapsed();
    reply.assert_problem(504, "upstream-timeout");
    assert!(
        took >= std::time::Duration::from_millis(750),
        "answered after {took:?}, before the deadline"
    );
    let methods: Vec<String> = h.sim.requests().into_iter().map(|r| r.method).collect();
    assert_eq!(methods, ["GET"], "no DELETE without the name");
    // The lookup was forwarded: its `forward` is followed by a `result`, not a `denied`.
    let result = last_result(&h);
    assert_eq!(h.records().len(), 2, "forward and result only");
    assert_eq!(result["reason"], "upstream-timeout", "{result}");
    assert_eq!(result["status"], 504);
    assert_eq!(result["path"], format!("/mpc/by-uuid/{uuid}/end"));
    assert_eq!(
        result["mpc"],
        serde_json::Value::Null,
        "the name never came"
    );
    assert_eq!(result["attempts"], 1);
    h.assert_chain();
    h.shutdown().await;
}

/// The last two records are the `forward` and `result` of the by-uuid request `reply`
/// answered: the uuid in `path`, no name (the lookup never gave one), `reason` and
/// `upstream_status` as given.
fn assert_by_uuid_result(
    h: &Harness,
    reply: &Reply,
    uuid: &str,
    reason: &str,
    upstream_status: u16,
) {
    let result = last_result(h);
    let records = h.records();
    let forward = &records[records.len() - 2];
    let request_id = reply.header("x-request-id").expect("request id");
    for record in [forward, &result] {
        assert_eq!(record["request_id"], request_id, "{record}");
        assert_eq!(
            record["path"],
            format!("/mpc/by-uuid/{uuid}/end"),
            "{record}"
        );
        assert_eq!(record["tenant"], "billing", "{record}");
        assert_eq!(record["account"], "default", "{record}");
        assert_eq!(record["mpc"], serde_json::Value::Null, "{record}");
    }
    assert_eq!(forward["status"], serde_json::Value::Null);
    assert_eq!(result["status"], reply.status, "{result}");
    assert_eq!(result["reason"], reason, "{result}");
    assert_eq!(result["upstream_status"], upstream_status, "{result}");
    assert_eq!(result["attempts"], 1, "{result}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn by_uuid_refusals_unknown_and_lookup_failures() {
    let h = Harness::with(Options {
        liveness: Liveness::Explicit,
        account_limit: (1, 3),
        ..Options::default()
    })
    .await;
    h.end("by-uuid/not-a-uuid", BILLING_TOKEN)
        .await
        .assert_problem(400, "invalid-mpc-uuid");
    h.end("by-uuid/12345678-90ab-cdef-1234-567890abcdef", "nope")
        .await
        .assert_problem(401, "unauthenticated");
    assert_eq!(h.sim.request_count(), 0);

    let unknown = h
        .end(
            "by-uuid/12345678-90ab-cdef-1234-567890abcdef",
            BILLING_TOKEN,
        )
        .await;
    unknown.assert_problem(404, "mpc-not-found");
    assert_eq!(h.sim.request_count(), 1, "a lookup, no DELETE");
    assert_eq!(h.sim.requests()[0].method, "GET");
    let uuid = "12345678-90ab-cdef-1234-567890abcdef";
    assert_by_uuid_result(&h, &unknown, uuid, "mpc-not-found", 404);

    // The account budget of 3 had 2 taken by that by-uuid request: the next by-uuid needs
    // 2 more and is refused by the account limit.
    let refused = h
        .end(
            "by-uuid/12345678-90ab-cdef-1234-567890abcdef",
            BILLING_TOKEN,
        )
        .await;
    refused.assert_problem(429, "rate-limited");
    assert_eq!(
        refused.header("ratelimit-policy"),
        Some("\"account\";q=3;w=3")
    );
    // One cell is left (the two it needs are there within the interval of 1 s).
    assert_eq!(refused.header("ratelimit"), Some("\"account\";r=1;t=1"));
    assert_eq!(h.sim.request_count(), 1, "refused before the lookup");
    let denied = h.records().pop().expect("denied record");
    assert_eq!(denied["event"], "denied", "{denied}");
    assert_eq!(denied["status"], 429);
    assert_eq!(denied["reason"], "rate-limited");
    assert_eq!(denied["tenant"], "billing");
    assert_eq!(denied["account"], "default");
    assert_eq!(denied["path"], format!("/mpc/by-uuid/{uuid}/end"));
    assert_eq!(denied["mpc"], serde_json::Value::Null);
    assert_eq!(
        denied["request_id"],
        refused.header("x-request-id").expect("id")
    );
    // The refusal took nothing: the one call left in the budget is still there.
    h.sim.add_mpc("billing-after");
    assert_eq!(h.end("billing-after", BILLING_TOKEN).await.status, 204);
    h.clock.advance(std::time::Duration::from_secs(3));

    h.sim.push_fault(Fault::status(500, ""));
    let failed = h
        .end(
            "by-uuid/12345678-90ab-cdef-1234-567890abcdef",
            BILLING_TOKEN,
        )
        .await;
    failed.assert_problem(502, "upstream-error");
    assert_eq!(
        h.sim.request_count(),
        3,
        "the failed lookup, not retried, and no DELETE"
    );
    assert_eq!(h.sim.requests()[2].method, "GET");
    assert_by_uuid_result(&h, &failed, uuid, "upstream-error", 500);
    h.assert_chain();
    h.shutdown().await;
}
