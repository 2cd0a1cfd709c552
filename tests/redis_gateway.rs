//! Rate limits shared by replicas through Redis: several gateway instances on one Redis
//! admit what one limit allows, and each `on_error` policy behaves as specified when
//! Redis dies and comes back. Each test runs its own redis-server on loopback.

use crate::common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

fn store_yaml(redis: &RedisServer, on_error: &str) -> String {
    format!(
        "rate_limit_store:\n  kind: redis\n  url: {}\n  key_prefix: test\n  timeout: 250ms\n  on_error: {on_error}\n",
        redis.url()
    )
}

/// Sends requests from `workers` tasks per address until `duration` passes (and at most
/// `max` in all); returns (admitted, refused, elapsed seconds).
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
                (ok, refused)
            }));
        }
    }
    let (mut ok, mut refused) = (0, 0);
    for task in tasks {
        let (o, r) = task.await.expect("worker");
        ok += o;
        refused += r;
    }
    (ok, refused, started.elapsed().as_secs_f64())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_replicas_share_one_tenant_limit() {
    let redis = RedisServer::start();
    let h = Harness::with(Options {
        tenant_limit: (10, 10),
        extra_yaml: store_yaml(&redis, "deny"),
        ..Options::default()
    })
    .await;
    let b = h.start_replica("b").await;
    let c = h.start_replica("c").await;
    let addrs = [h.addr(), b.local_addr(), c.local_addr()];
    let h = Arc::new(h);
    let (admitted, refused, elapsed) =
        hammer(&h, &addrs, BILLING_TOKEN, Duration::from_secs(2), 3000).await;
    let allowed = 10.0 + 10.0 * elapsed;
    assert!(refused > 0, "the load exceeded the limit");
    assert!(
        (admitted as f64 - allowed).abs() <= 0.1 * allowed,
        "admitted {admitted}, the limit allows {allowed:.1} in {elapsed:.2}s"
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
        ..Options::default()
    })
    .await;
    let b = h.start_replica("b").await;
    let mut statuses = Vec::new();
    for i in 0..4 {
        statuses.push(h.end(&format!("billing-a{i}"), BILLING_TOKEN).await.status);
        statuses.push(
            h.end_at(b.local_addr(), &format!("billing-b{i}"), OPS_TOKEN)
                .await
                .status,
        );
    }
    let admitted = statuses.iter().filter(|s| **s == 204).count();
    // Burst 5 at 1/s: the eight requests take well under a second, so 5 (6 at most).
    assert!((5..=6).contains(&admitted), "{statuses:?}");
    let refused = h.end_at(b.local_addr(), "billing-x", OPS_TOKEN).await;
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
