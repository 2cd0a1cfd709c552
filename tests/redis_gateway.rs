//! Rate limits shared by replicas through Redis: several gateway instances on one Redis
//! admit what one limit allows, and each `on_error` policy behaves as specified when
//! Redis dies and comes back. Each test runs its own redis-server on loopback.

use crate::common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

fn store_yaml(redis: &RedisServer, on_error: &str) -> String {
    store_yaml_with_timeout(redis, on_error, "250ms")
}

fn store_yaml_with_timeout(redis: &RedisServer, on_error: &str, timeout: &str) -> String {
    format!(
        "rate_limit_store:\n  kind: redis\n  url: {}\n  key_prefix: test\n  timeout: {timeout}\n  on_error: {on_error}\n",
        redis.url()
    )
}

/// Sends requests from `workers` tasks per address until `duration` passes (and at most
/// `max` in all); returns (admitted, refused, seconds from the start to the last answer,
/// which came after the last limit check).
async fn hammer(
    h: &Arc<Harness>,
    addrs: &[SocketAddr],
    token: &'static str,
    duration: Duration,
    max: usize,
) -> (usize, usize, f64) {
    let started = Instant::now();
    let sent = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for (index, addr) in addrs.iter().enumerate() {
        for worker in 0..4 {
            let (h, sent, addr) = (Arc::clone(h), Arc::clone(&sent), *addr);
            tasks.push(tokio::spawn(async move {
                let (mut ok, mut refused) = (0, 0);
                let mut n = 0;
                while started.elapsed() < duration
                    && sent.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < max
                {
                    n += 1;
                    let name = format!("billing-{index}-{worker}-{n}");
                    match h.end_at(addr, &name, token).await.status {
                        204 => ok += 1,
                        429 => refused += 1,
                        other => panic!("unexpected status {other}"),
                    }
                }
                (ok, refused, started.elapsed())
            }));
        }
    }
    let (mut ok, mut refused, mut last) = (0, 0, Duration::ZERO);
    for task in tasks {
        let (o, r, l) = task.await.expect("worker");
        ok += o;
        refused += r;
        last = last.max(l);
    }
    (ok, refused, last.as_secs_f64())
}

/// The most a GCRA of `rate` per second and `burst` admits within `elapsed` seconds of
/// its first request: the burst, plus one per emission interval begun.
fn gcra_ceiling(rate: f64, burst: f64, elapsed: f64) -> usize {
    (burst + (elapsed * rate).ceil()) as usize
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_replicas_share_one_tenant_limit() {
    let redis = RedisServer::start();
    let h = Harness::with(Options {
        tenant_limit: (10, 10),
        extra_yaml: store_yaml(&redis, "deny"),
        fsync: "never",
        ..Options::default()
    })
    .await;
    let b = h.start_replica("b").await;
    let c = h.start_replica("c").await;
    let addrs = [h.addr(), b.local_addr(), c.local_addr()];
    let h = Arc::new(h);
    let (admitted, refused, elapsed) =
        hammer(&h, &addrs, BILLING_TOKEN, Duration::from_secs(2), 3000).await;
    assert!(refused > 0, "the load exceeded the limit");
    // Upper: never more than one limit allows, whatever the machine's speed (`elapsed`
    // runs to the last answer, past the last check). Lower: the burst, and, with requests
    // refused all along, most of what the rate added meanwhile.
    let ceiling = gcra_ceiling(10.0, 10.0, elapsed);
    let floor = 10 + (10.0 * elapsed / 2.0) as usize;
    assert!(
        (floor..=ceiling).contains(&admitted),
        "admitted {admitted}; within {elapsed:.2}s the limit allows {floor}..={ceiling}"
    );
    assert_eq!(
        h.sim.request_count(),
        admitted as u64,
        "upstream saw every admitted request"
    );
    b.shutdown().await.expect("shutdown b");
    c.shutdown().await.expect("shutdown c");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_account_limit_holds_across_replicas() {
    let redis = RedisServer::start();
    let h = Harness::with(Options {
        account_limit: (1, 5),
        extra_yaml: store_yaml(&redis, "deny"),
        fsync: "never",
        ..Options::default()
    })
    .await;
    let b = h.start_replica("b").await;
    let started = Instant::now();
    let mut replies = Vec::new();
    for i in 0..4 {
        replies.push(h.end(&format!("billing-a{i}"), BILLING_TOKEN).await);
        replies.push(
            h.end_at(b.local_addr(), &format!("billing-b{i}"), OPS_TOKEN)
                .await,
        );
    }
    replies.push(h.end_at(b.local_addr(), "billing-x", OPS_TOKEN).await);
    let elapsed = started.elapsed().as_secs_f64();
    let statuses: Vec<u16> = replies.iter().map(|r| r.status).collect();
    let admitted = statuses.iter().filter(|s| **s == 204).count();
    // Burst 5 at 1/s, shared by both replicas: the burst, and at most one more per second
    // begun since the first request (however slow the machine was).
    let ceiling = gcra_ceiling(1.0, 5.0, elapsed);
    assert!(
        (5..=ceiling).contains(&admitted),
        "{statuses:?} in {elapsed:.2}s: 5..={ceiling} admitted"
    );
    assert!(
        ceiling < replies.len(),
        "the nine requests took {elapsed:.2}s: long enough for the limit to admit them all"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == 429).count(),
        replies.len() - admitted,
        "{statuses:?}"
    );
    let refused = replies
        .iter()
        .rev()
        .find(|r| r.status == 429)
        .expect("a refusal");
    refused.assert_problem(429, "rate-limited");
    assert_eq!(
        refused.header("ratelimit-policy"),
        Some("\"account\";q=5;w=5")
    );
    b.shutdown().await.expect("shutdown b");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn on_error_policies_when_redis_dies_and_comes_back() {
    let mut redis = RedisServer::start();
    let deny = Harness::with(Options {
        tenant_limit: (1, 2),
        extra_yaml: store_yaml(&redis, "deny"),
        ..Options::default()
    })
    .await;
    let allow = deny_variant(&deny, "allow").await;
    let local = deny_variant(&deny, "local").await;

    // Redis up: decisions come from the shared bucket (burst 2 across all three).
    assert_eq!(deny.end("billing-1", BILLING_TOKEN).await.status, 204);
    assert_eq!(
        deny.end_at(allow.local_addr(), "billing-2", BILLING_TOKEN)
            .await
            .status,
        204
    );
    assert_eq!(
        deny.end_at(local.local_addr(), "billing-3", BILLING_TOKEN)
            .await
            .status,
        429
    );

    redis.kill();
    let denied = deny.end("billing-4", BILLING_TOKEN).await;
    denied.assert_problem(503, "rate-limit-store-unavailable");
    assert_eq!(denied.header("retry-after"), Some("1"));
    assert_eq!(denied.json()["retry_after"], 1);

    let allowed = deny
        .end_at(allow.local_addr(), "billing-5", BILLING_TOKEN)
        .await;
    assert_eq!(allowed.status, 204);
    assert_eq!(
        allowed.header("ratelimit"),
        None,
        "unchecked: no RateLimit headers"
    );

    // `local` falls back to the replica's own limiter: its own burst of 2, then 429.
    let first = deny
        .end_at(local.local_addr(), "billing-6", BILLING_TOKEN)
        .await;
    assert_eq!(first.status, 204);
    assert_eq!(first.header("ratelimit-policy"), Some("\"tenant\";q=2;w=2"));
    assert_eq!(
        deny.end_at(local.local_addr(), "billing-7", BILLING_TOKEN)
            .await
            .status,
        204
    );
    assert_eq!(
        deny.end_at(local.local_addr(), "billing-8", BILLING_TOKEN)
            .await
            .status,
        429
    );

    let metrics = deny.admin_get("/metrics").await;
    let text = String::from_utf8_lossy(&metrics.body).into_owned();
    let errors = mpc_gateway::telemetry::sample(&text, "mpc_gateway_rate_limit_store_errors_total");
    assert!(errors.is_some_and(|n| n >= 1.0), "{text}");
    assert_eq!(
        deny.admin_get("/readyz").await.status,
        200,
        "readiness is not tied to Redis"
    );

    // Redis back: shared limiting resumes by itself (the restarted Redis is empty).
    redis.restart();
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut n = 0;
    loop {
        n += 1;
        let reply = deny.end(&format!("billing-r{n}"), BILLING_TOKEN).await;
        if reply.status == 204 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "Redis did not come back: {}",
            reply.status
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // One of the fresh burst of 2 is used; one more anywhere, then the shared 429.
    assert_eq!(
        deny.end_at(allow.local_addr(), "billing-s1", BILLING_TOKEN)
            .await
            .status,
        204
    );
    // The `local` replica finds Redis again at one of its next checks (its connection
    // is its own). Its fallback bucket is refilled before each call, so a 429 from it can
    // only come from the shared bucket, which is empty by now.
    let deadline = Instant::now() + Duration::from_secs(5);
    for n in 0.. {
        deny.clock.advance(Duration::from_secs(10));
        let reply = deny
            .end_at(
                local.local_addr(),
                &format!("billing-s{}", n + 2),
                BILLING_TOKEN,
            )
            .await;
        if reply.status == 429 {
            break;
        }
        assert_eq!(reply.status, 204);
        assert!(
            Instant::now() < deadline,
            "the local replica never used the shared bucket again"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    allow.shutdown().await.expect("shutdown");
    local.shutdown().await.expect("shutdown");
}

/// Another replica on the same simulator and Redis with a different `on_error`.
async fn deny_variant(h: &Harness, on_error: &str) -> mpc_gateway::server::RunningGateway {
    let yaml = h
        .config_yaml()
        .replace("on_error: deny", &format!("on_error: {on_error}"))
        .replace(
            &format!("path: \"{}\"", h.audit_path.display()),
            &format!(
                "path: \"{}\"",
                h.dir
                    .path()
                    .join(format!("audit-{on_error}.jsonl"))
                    .display()
            ),
        );
    let path = h.dir.path().join(format!("gateway-{on_error}.yaml"));
    std::fs::write(&path, yaml).expect("write");
    let config = mpc_gateway::config::Config::load(&path).expect("valid");
    // The harness's clock: a test can refill the local fallback buckets by advancing it.
    mpc_gateway::server::RunningGateway::start(
        &config,
        mpc_gateway::server::StartOptions {
            limiter_clock: mpc_gateway::rate_limit::LimiterClock::Manual(h.clock.clone()),
        },
    )
    .await
    .expect("start")
}

// ---------------------------------------------------------------------------------------
// A Redis slower than `timeout`
// ---------------------------------------------------------------------------------------

/// The store's `timeout` in the tests with a stopped Redis.
const STORE_TIMEOUT: Duration = Duration::from_millis(500);

/// How much longer than its waits on the store a request may take on a loaded two-core
/// machine (two audit fsyncs, the upstream call, scheduling). A request whose store call
/// had no bound at all would wait on the stopped Redis until the test client gives up
/// after 15 s, so this leaves a margin of several seconds on both sides.
const STORE_SLACK: Duration = Duration::from_millis(1500);

/// A gateway on a Redis of its own with `on_error`, whose connection to Redis was used
/// once (an admitted request decided by the shared bucket, with no store error), and
/// then Redis stopped with SIGSTOP: the connection stays open and every check is sent
/// and never answered, so it is the `timeout`, not a connection error, that ends it.
async fn gateway_with_a_stopped_redis(
    on_error: &str,
    tenant_limit: (u32, u32),
) -> (Harness, RedisServer) {
    let redis = RedisServer::start();
    let h = Harness::with(Options {
        tenant_limit,
        extra_yaml: store_yaml_with_timeout(
            &redis,
            on_error,
            &format!("{}ms", STORE_TIMEOUT.as_millis()),
        ),
        ..Options::default()
    })
    .await;
    let warm = h.end("billing-warm", BILLING_TOKEN).await;
    assert_eq!(warm.status, 204, "{:?}", warm.body);
    assert_eq!(store_errors(&h).await, 0.0, "Redis answered the warm-up");
    redis.pause();
    (h, redis)
}

/// `mpc_gateway_rate_limit_store_errors_total`.
async fn store_errors(h: &Harness) -> f64 {
    mpc_gateway::telemetry::sample(
        &metrics_text(h).await,
        "mpc_gateway_rate_limit_store_errors_total",
    )
    .unwrap_or(0.0)
}

/// The request waited for the store at least once (it did not skip Redis) and at most
/// `waits` times plus slack (each wait was cut at `timeout`).
fn assert_took_about_the_store_timeout(took: Duration, waits: u32) {
    assert!(
        took >= STORE_TIMEOUT && took <= STORE_TIMEOUT * waits + STORE_SLACK,
        "answered after {took:?}; the store timeout is {STORE_TIMEOUT:?}"
    );
}

/// `deny`: the limits cannot be checked, so the request is refused with `503
/// rate-limit-store-unavailable` and `Retry-After: 1` once the store's `timeout` passed,
/// without RateLimit headers (no limit was applied), nothing goes upstream, one `denied`
/// record, one store error (one store call per request, for both of its limits).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_slower_than_the_timeout_with_deny_is_503_after_the_timeout() {
    let (h, redis) = gateway_with_a_stopped_redis("deny", (100, 100)).await;
    let (reply, took) = timed_end(&h, "billing-1").await;
    redis.signal("CONT");

    reply.assert_problem(503, "rate-limit-store-unavailable");
    assert_eq!(reply.header("retry-after"), Some("1"));
    assert_eq!(reply.json()["retry_after"], 1);
    assert_eq!(reply.header("ratelimit"), None);
    assert_eq!(reply.header("ratelimit-policy"), None);
    assert_took_about_the_store_timeout(took, 1);
    assert_eq!(h.sim.request_count(), 1, "only the warm-up reached Plivo");

    let records = h.records();
    assert_eq!(records.len(), 3, "warm-up forward and result, one denied");
    let denied = &records[2];
    assert_eq!(denied["event"], "denied", "{denied}");
    assert_eq!(denied["reason"], "rate-limit-store-unavailable", "{denied}");
    assert_eq!(denied["status"], 503, "{denied}");
    assert_eq!(denied["tenant"], "billing", "{denied}");
    assert_eq!(denied["mpc"], "billing-1", "{denied}");
    assert_eq!(denied["upstream_status"], serde_json::Value::Null);
    assert_eq!(store_errors(&h).await, 1.0);
    h.assert_chain();
    h.shutdown().await;
}

/// `allow`: admitted unchecked once the store's `timeout` passed, so the answer carries no
/// RateLimit headers; the DELETE goes upstream and the audit has its `forward` and
/// `result`. Both limits go in one store call: the request waits out the timeout once,
/// and counts one store error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_slower_than_the_timeout_with_allow_admits_without_ratelimit_headers() {
    let (h, redis) = gateway_with_a_stopped_redis("allow", (100, 100)).await;
    let (reply, took) = timed_end(&h, "billing-1").await;
    redis.signal("CONT");

    assert_eq!(reply.status, 204, "{:?}", reply.body);
    assert_eq!(reply.header("ratelimit"), None, "unchecked: no RateLimit");
    assert_eq!(reply.header("ratelimit-policy"), None);
    assert_eq!(reply.header("retry-after"), None);
    assert_took_about_the_store_timeout(took, 1);
    let sent = h.sim.requests();
    assert_eq!(sent.len(), 2, "the warm-up and this DELETE");
    assert_contract_upstream_request(&sent[1], "billing-1");

    let result = last_result(&h);
    assert_eq!(result["reason"], "ended", "{result}");
    assert_eq!(result["status"], 204, "{result}");
    assert_eq!(result["mpc"], "billing-1", "{result}");
    assert_eq!(
        h.records().len(),
        4,
        "warm-up and this request, two records each"
    );
    assert_eq!(store_errors(&h).await, 1.0);
    h.assert_chain();
    h.shutdown().await;
}

/// `local`: once the store's `timeout` passed, this replica's own limiter decides, with
/// its headers. Its bucket (burst 2) is untouched by the warm-up, which the shared bucket
/// counted: `r=1` after the first request shows whose bucket it is (the shared one would
/// say `r=0`). It admits two, the DELETEs go upstream, and the third is `429` from it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_slower_than_the_timeout_with_local_falls_back_to_the_replicas_limiter() {
    let (h, redis) = gateway_with_a_stopped_redis("local", (1, 2)).await;
    let (first, took) = timed_end(&h, "billing-1").await;
    let second = h.end("billing-2", BILLING_TOKEN).await;
    let third = h.end("billing-3", BILLING_TOKEN).await;
    redis.signal("CONT");

    assert_eq!(first.status, 204, "{:?}", first.body);
    assert_eq!(first.header("ratelimit-policy"), Some("\"tenant\";q=2;w=2"));
    assert_eq!(first.header("ratelimit"), Some("\"tenant\";r=1;t=0"));
    assert_took_about_the_store_timeout(took, 1);
    assert_eq!(second.status, 204, "{:?}", second.body);
    assert_eq!(second.header("ratelimit"), Some("\"tenant\";r=0;t=1"));
    third.assert_problem(429, "rate-limited");
    assert_eq!(third.header("retry-after"), Some("1"));

    let targets: Vec<String> = h.sim.requests().into_iter().map(|r| r.target).collect();
    assert_eq!(targets.len(), 3, "the warm-up and two DELETEs: {targets:?}");
    assert!(targets[1].ends_with("/name_billing-1/") && targets[2].ends_with("/name_billing-2/"));
    let reasons: Vec<String> = h
        .records()
        .iter()
        .map(|r| format!("{} {}", r["event"].as_str().unwrap_or("?"), r["reason"]))
        .collect();
    assert_eq!(
        reasons,
        [
            "forward null",
            "result \"ended\"",
            "forward null",
            "result \"ended\"",
            "forward null",
            "result \"ended\"",
            "denied \"rate-limited\"",
        ]
    );
    // Every request found the store failing (the third one at once: after two timeouts
    // in a row the store is given up for a moment), one store call for both limits.
    assert_eq!(store_errors(&h).await, 3.0);
    h.assert_chain();
    h.shutdown().await;
}
