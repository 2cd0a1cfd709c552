//! The Redis-backed limiter against a real `redis-server` each test starts on its own
//! loopback port: same decisions as the local limiter, one bucket shared by every
//! instance, keys that expire, script reload after `SCRIPT FLUSH`, bounded failure when
//! Redis is down, hung or silent, and recovery when it comes back.

use crate::common;

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::RedisServer;
use mpc_gateway::config::{OnStoreError, RedisStoreSettings};
use mpc_gateway::rate_limit::redis::{Bucket, RedisLimiter, StoreError};
use mpc_gateway::rate_limit::{
    Decision, LimitKind, Limiter, LimiterClock, PairDecision, RateLimit,
};

/// The cost of an ordinary request.
const ONE: NonZeroU32 = NonZeroU32::MIN;

/// Headroom over the configured timeout for scheduling on a busy CI machine (two loaded
/// cores): still far below what an unbounded wait (a TCP connect's retries, a hung
/// server) would take.
const SLACK: Duration = Duration::from_millis(500);

fn limit(per_second: u32, burst: u32) -> RateLimit {
    RateLimit::new(per_second, burst).expect("non-zero")
}

fn settings(url: &str, timeout: Duration) -> RedisStoreSettings {
    RedisStoreSettings {
        url: url.to_owned(),
        key_prefix: "test".to_owned(),
        timeout,
        on_error: OnStoreError::Local,
    }
}

fn limiter(server: &RedisServer) -> RedisLimiter {
    RedisLimiter::new(&settings(&server.url(), Duration::from_millis(200))).expect("limiter")
}

async fn check(limiter: &RedisLimiter, kind: LimitKind, name: &str, l: RateLimit) -> Decision {
    check_n(limiter, kind, name, l, ONE).await
}

async fn check_n(
    limiter: &RedisLimiter,
    kind: LimitKind,
    name: &str,
    l: RateLimit,
    cells: NonZeroU32,
) -> Decision {
    limiter
        .check(kind, name, l, cells)
        .await
        .unwrap_or_else(|err| panic!("check {kind:?} {name}: {err}"))
}

async fn admin(server: &RedisServer) -> redis::aio::MultiplexedConnection {
    redis::Client::open(server.url())
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("admin connection")
}

/// Retries `check` until it succeeds; panics after `within`.
async fn until_ok(limiter: &RedisLimiter, name: &str, l: RateLimit, within: Duration) -> Duration {
    let start = Instant::now();
    loop {
        match limiter.check(LimitKind::Tenant, name, l, ONE).await {
            Ok(_) => return start.elapsed(),
            Err(_) if start.elapsed() < within => {
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            Err(err) => panic!("still failing after {within:?}: {err}"),
        }
    }
}

/// Runs `compare` (which returns `Err(description)` on a mismatch) up to three times; a
/// mismatch counts only when every attempt has one. The Redis limiter (server clock) and
/// the local one (monotonic clock) start their buckets a few milliseconds apart, so a
/// check that falls on an emission boundary can, rarely, be decided on either side of it
/// by the two; three attempts in a row landing on one are not chance but a divergence.
async fn matches_in_one_of_three<F, Fut>(what: &str, mut compare: F)
where
    F: FnMut(usize) -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let mut mismatches = Vec::new();
    for attempt in 0..3 {
        match compare(attempt).await {
            Ok(()) => return,
            Err(mismatch) => mismatches.push(mismatch),
        }
    }
    panic!("{what}: every attempt differed: {mismatches:#?}");
}

#[tokio::test]
async fn decisions_match_the_local_limiter() {
    let server = RedisServer::start();
    let shared = limiter(&server);
    // Emission intervals of 200 ms to 1 s.
    let limits = [limit(1, 5), limit(2, 3), limit(4, 1), limit(5, 2)];
    for (index, l) in limits.iter().enumerate() {
        let shared = &shared;
        matches_in_one_of_three(&format!("limit {l:?}"), |attempt| async move {
            // A fresh bucket on both sides for each attempt.
            let local = Limiter::new(LimitKind::Tenant, *l, LimiterClock::monotonic());
            let name = format!("same-{index}-{attempt}");
            let mut pairs = Vec::new();
            for _ in 0..l.burst.get() + 2 {
                let expected = local.check();
                pairs.push((check(shared, LimitKind::Tenant, &name, *l).await, expected));
            }
            // Replenishment.
            tokio::time::sleep(Duration::from_millis(600)).await;
            let expected = local.check();
            pairs.push((check(shared, LimitKind::Tenant, &name, *l).await, expected));
            if pairs.iter().all(|(got, expected)| got == expected) {
                Ok(())
            } else {
                Err(format!("(redis, local) per request: {pairs:?}"))
            }
        })
        .await;
    }
    // Spelled out once, so a change in the local limiter cannot drag this along unseen.
    let l = limit(2, 3);
    let expected = [
        Decision::Allowed {
            remaining: 2,
            reset_secs: 0,
        },
        Decision::Allowed {
            remaining: 1,
            reset_secs: 0,
        },
        Decision::Allowed {
            remaining: 0,
            reset_secs: 1,
        },
        Decision::Refused {
            remaining: 0,
            retry_after_secs: 1,
        },
        Decision::Refused {
            remaining: 0,
            retry_after_secs: 1,
        },
    ];
    let shared = &shared;
    matches_in_one_of_three("spelled out", |attempt| async move {
        let name = format!("spelled-out-{attempt}");
        let mut seen = Vec::new();
        for _ in 0..5 {
            seen.push(check(shared, LimitKind::Tenant, &name, l).await);
        }
        if seen == expected {
            Ok(())
        } else {
            Err(format!("{seen:?}"))
        }
    })
    .await;
}

/// A by-uuid request costs the account two cells, taken together or not at all, in Redis
/// exactly as in the local limiter (governor's `check_n`); a cost above the burst never
/// fits and spends nothing.
#[tokio::test]
async fn two_cells_are_taken_together_or_not_at_all_as_locally() {
    let server = RedisServer::start();
    let shared = limiter(&server);
    let two = NonZeroU32::new(2).expect("two");
    let l = limit(1, 3);
    let local = Limiter::new(LimitKind::Account, l, LimiterClock::monotonic());
    // 3 cells: 2 taken, 1 left; 2 more do not fit and take nothing; the 1 left does.
    for (step, cells) in [two, two, ONE, ONE].into_iter().enumerate() {
        let expected = local.check_n(cells);
        let got = check_n(&shared, LimitKind::Account, "pair", l, cells).await;
        assert_eq!(got, expected, "step {step}, {cells} cells");
    }
    assert_eq!(
        check_n(&shared, LimitKind::Account, "fresh", l, two).await,
        Decision::Allowed {
            remaining: 1,
            reset_secs: 0
        }
    );
    // A burst of 1 can never hold 2: refused, and the one cell stays for a single call.
    let one = limit(1, 1);
    assert!(matches!(
        check_n(&shared, LimitKind::Account, "tiny", one, two).await,
        Decision::Refused { .. }
    ));
    assert!(matches!(
        check(&shared, LimitKind::Account, "tiny", one).await,
        Decision::Allowed { .. }
    ));
}

fn bucket(kind: LimitKind, name: &str, limit: RateLimit, cells: NonZeroU32) -> Bucket<'_> {
    Bucket {
        kind,
        name,
        limit,
        cells,
    }
}

async fn check_pair(limiter: &RedisLimiter, first: Bucket<'_>, second: Bucket<'_>) -> PairDecision {
    limiter
        .check_pair(first, second)
        .await
        .unwrap_or_else(|err| panic!("check_pair {}/{}: {err}", first.name, second.name))
}

/// What two local limiters decide when called one after the other, the second only if
/// the first admits: the meaning of a shared pair check.
fn local_pair(first: &Limiter, second: &Limiter, second_cells: NonZeroU32) -> PairDecision {
    first.check_pair(ONE, || second.check_n(second_cells))
}

/// A tenant and its account in one round trip decide as the local limiters do: the
/// account is asked only when the tenant admits, and a request either refuses is charged
/// to neither.
#[tokio::test]
async fn a_pair_decides_as_two_checks_in_a_row() {
    let server = RedisServer::start();
    let shared = limiter(&server);
    let two = NonZeroU32::new(2).expect("two");
    let (tenant_limit, account_limit) = (limit(1, 3), limit(1, 4));
    let tenant = Limiter::new(LimitKind::Tenant, tenant_limit, LimiterClock::monotonic());
    let account = Limiter::new(LimitKind::Account, account_limit, LimiterClock::monotonic());
    // Tenant 3 cells, account 4: two by-uuid requests empty the account while the tenant
    // has one left, which the account's refusals of the next requests leave there.
    for step in 0..5 {
        let expected = local_pair(&tenant, &account, two);
        let got = check_pair(
            &shared,
            bucket(LimitKind::Tenant, "t", tenant_limit, ONE),
            bucket(LimitKind::Account, "a", account_limit, two),
        )
        .await;
        assert_eq!(got, expected, "request {step}");
    }
    // Spelled out, so a change in the local limiters cannot drag this along unseen.
    let fresh = |name| bucket(LimitKind::Tenant, name, limit(1, 1), ONE);
    let account_of_two = bucket(LimitKind::Account, "b", limit(1, 2), ONE);
    assert_eq!(
        check_pair(&shared, fresh("u"), account_of_two).await,
        PairDecision::Both {
            first: Decision::Allowed {
                remaining: 0,
                reset_secs: 1
            },
            second: Decision::Allowed {
                remaining: 1,
                reset_secs: 0
            },
        }
    );
    assert_eq!(
        check_pair(&shared, fresh("u"), account_of_two).await,
        PairDecision::FirstRefused(Decision::Refused {
            remaining: 0,
            retry_after_secs: 1
        }),
    );
    // The refused tenant did not charge the account: its last cell is still there.
    assert_eq!(
        check_pair(&shared, fresh("v"), account_of_two).await,
        PairDecision::Both {
            first: Decision::Allowed {
                remaining: 0,
                reset_secs: 1
            },
            second: Decision::Allowed {
                remaining: 0,
                reset_secs: 1
            },
        }
    );
}

/// An account cost above its burst never fits (as locally: the Retry-After of a whole
/// refill, not the script's one emission interval), and charges neither bucket: the
/// tenant keeps both its cells and the account's key is never written. (Cost 3 against
/// a burst of 2: a plain wait would have said 1 s, not the 2 s of a whole refill.)
#[tokio::test]
async fn a_pair_whose_account_cost_never_fits_charges_neither() {
    let server = RedisServer::start();
    let shared = limiter(&server);
    let three = NonZeroU32::new(3).expect("three");
    let account_of_two = limit(1, 2);
    let got = check_pair(
        &shared,
        bucket(LimitKind::Tenant, "t", limit(1, 2), ONE),
        bucket(LimitKind::Account, "a", account_of_two, three),
    )
    .await;
    let never_fits = Limiter::new(
        LimitKind::Account,
        account_of_two,
        LimiterClock::monotonic(),
    )
    .check_n(three);
    assert_eq!(
        never_fits,
        Decision::Refused {
            remaining: 0,
            retry_after_secs: 2
        }
    );
    assert_eq!(
        got,
        PairDecision::Both {
            first: Decision::Allowed {
                remaining: 1,
                reset_secs: 0
            },
            second: never_fits,
        }
    );
    let mut con = admin(&server).await;
    for (kind, name) in [(LimitKind::Tenant, "t"), (LimitKind::Account, "a")] {
        let exists: bool = redis::cmd("EXISTS")
            .arg(shared.key(kind, name))
            .query_async(&mut con)
            .await
            .expect("EXISTS");
        assert!(!exists, "the {kind:?} bucket was not written");
    }
    assert_eq!(
        check(&shared, LimitKind::Tenant, "t", limit(1, 2)).await,
        Decision::Allowed {
            remaining: 1,
            reset_secs: 0
        },
        "the tenant was not charged"
    );
}

/// The account's refusal puts nothing on the tenant in Redis either: a tenant with one
/// cell whose account is empty still holds that cell.
#[tokio::test]
async fn a_pair_the_account_refuses_leaves_the_tenant_uncharged() {
    let server = RedisServer::start();
    let shared = limiter(&server);
    let tenant = bucket(LimitKind::Tenant, "t", limit(1, 1), ONE);
    let account = bucket(LimitKind::Account, "a", limit(1, 1), ONE);
    assert!(matches!(
        check(&shared, LimitKind::Account, "a", limit(1, 1)).await,
        Decision::Allowed { .. }
    ));
    assert!(matches!(
        check_pair(&shared, tenant, account).await,
        PairDecision::Both {
            first: Decision::Allowed { .. },
            second: Decision::Refused { .. },
        }
    ));
    assert_eq!(
        check(&shared, LimitKind::Tenant, "t", limit(1, 1)).await,
        Decision::Allowed {
            remaining: 0,
            reset_secs: 1
        },
        "the tenant's only cell is still there"
    );
}

/// The point of the pair: one script call per request, not one per limit.
#[tokio::test]
async fn a_pair_is_one_round_trip() {
    let server = RedisServer::start();
    let shared = limiter(&server);
    let tenant = bucket(LimitKind::Tenant, "t", limit(100, 100), ONE);
    let account = bucket(LimitKind::Account, "a", limit(100, 100), ONE);
    // The first call loads the script; count from the second on.
    check_pair(&shared, tenant, account).await;
    let calls = || async {
        let info: String = redis::cmd("INFO")
            .arg("commandstats")
            .query_async(&mut admin(&server).await)
            .await
            .expect("INFO");
        command_calls(&info, "evalsha")
    };
    let before = calls().await;
    for _ in 0..10 {
        check_pair(&shared, tenant, account).await;
    }
    assert_eq!(calls().await - before, 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn instances_on_one_redis_share_one_bucket() {
    let server = RedisServer::start();
    let a = limiter(&server);
    let b = limiter(&server);

    let l = limit(1, 3);
    for remaining in [2, 1, 0] {
        assert!(matches!(
            check(&a, LimitKind::Account, "shared", l).await,
            Decision::Allowed { remaining: r, .. } if r == remaining
        ));
    }
    assert_eq!(
        check(&b, LimitKind::Account, "shared", l).await,
        Decision::Refused {
            remaining: 0,
            retry_after_secs: 1
        },
        "b sees the bucket a drained"
    );

    // Concurrent load from both for about a second: the total admitted is what one
    // bucket allows, not twice that.
    let (per_second, burst) = (20u32, 10u32);
    let l = limit(per_second, burst);
    let run_for = Duration::from_millis(1000);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for instance in [a.clone(), b.clone(), a, b] {
        tasks.push(tokio::spawn(async move {
            let mut admitted = 0u32;
            while start.elapsed() < run_for {
                if let Decision::Allowed { .. } =
                    check(&instance, LimitKind::Tenant, "load", l).await
                {
                    admitted += 1;
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            admitted
        }));
    }
    let mut total = 0;
    for task in tasks {
        total += task.await.expect("task");
    }
    let elapsed = start.elapsed().as_secs_f64();
    let most = f64::from(burst) + (elapsed * f64::from(per_second)).ceil();
    let least = f64::from(burst) + (run_for.as_secs_f64() * f64::from(per_second) * 0.8).floor();
    let total = f64::from(total);
    assert!(
        total <= most,
        "admitted {total} > {most} in {elapsed:.3}s (burst {burst}, {per_second}/s)"
    );
    assert!(
        total >= least,
        "admitted only {total} < {least} in {elapsed:.3}s"
    );
}

#[tokio::test]
async fn tenant_account_and_prefix_keys_are_independent() {
    let server = RedisServer::start();
    let shared = limiter(&server);
    let l = limit(1, 1);
    let first = Decision::Allowed {
        remaining: 0,
        reset_secs: 1,
    };
    assert_eq!(check(&shared, LimitKind::Tenant, "x", l).await, first);
    assert!(matches!(
        check(&shared, LimitKind::Tenant, "x", l).await,
        Decision::Refused { .. }
    ));
    assert_eq!(check(&shared, LimitKind::Account, "x", l).await, first);
    assert_eq!(check(&shared, LimitKind::Tenant, "y", l).await, first);
    let mut other = settings(&server.url(), Duration::from_millis(200));
    other.key_prefix = "other".to_owned();
    let other = RedisLimiter::new(&other).expect("limiter");
    assert_eq!(check(&other, LimitKind::Tenant, "x", l).await, first);

    let mut con = admin(&server).await;
    let mut keys: Vec<String> = redis::cmd("KEYS")
        .arg("*")
        .query_async(&mut con)
        .await
        .expect("KEYS");
    keys.sort();
    assert_eq!(
        keys,
        [
            "other:tenant:x",
            "test:account:x",
            "test:tenant:x",
            "test:tenant:y"
        ]
    );
}

#[tokio::test]
async fn keys_expire_once_the_bucket_is_full_again() {
    let server = RedisServer::start();
    let shared = limiter(&server);
    let mut con = admin(&server).await;
    let l = limit(2, 3);
    let key = shared.key(LimitKind::Tenant, "expiring");
    assert_eq!(key, "test:tenant:expiring");
    let pttl = |mut con: redis::aio::MultiplexedConnection, key: String| async move {
        redis::cmd("PTTL")
            .arg(key)
            .query_async::<i64>(&mut con)
            .await
            .expect("PTTL")
    };

    check(&shared, LimitKind::Tenant, "expiring", l).await;
    let after_one = pttl(con.clone(), key.clone()).await;
    assert!(
        after_one > 0 && after_one <= 500,
        "one request: full again after one interval, PTTL {after_one}"
    );
    for _ in 0..3 {
        check(&shared, LimitKind::Tenant, "expiring", l).await;
    }
    let drained = pttl(con.clone(), key.clone()).await;
    assert!(
        drained > 1000 && drained <= 1500,
        "drained: full again after three intervals, PTTL {drained}"
    );

    // A bucket that refills within milliseconds disappears on its own.
    let fast = limit(1000, 1);
    check(&shared, LimitKind::Tenant, "fast", fast).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let exists: bool = redis::cmd("EXISTS")
        .arg(shared.key(LimitKind::Tenant, "fast"))
        .query_async(&mut con)
        .await
        .expect("EXISTS");
    assert!(!exists, "an expired bucket leaves no key behind");
}

fn command_calls(info: &str, command: &str) -> u64 {
    let prefix = format!("cmdstat_{command}:calls=");
    info.lines()
        .find_map(|line| line.strip_prefix(prefix.as_str()))
        .and_then(|rest| rest.split(',').next())
        .and_then(|calls| calls.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn script_runs_by_sha_and_is_reloaded_after_script_flush() {
    let server = RedisServer::start();
    let shared = limiter(&server);
    let mut con = admin(&server).await;
    let l = limit(1, 5);
    assert!(matches!(
        check(&shared, LimitKind::Tenant, "flush", l).await,
        Decision::Allowed { remaining: 4, .. }
    ));
    let info = |mut con: redis::aio::MultiplexedConnection| async move {
        redis::cmd("INFO")
            .arg("commandstats")
            .query_async::<String>(&mut con)
            .await
            .expect("INFO")
    };
    let before = info(con.clone()).await;

    let () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut con)
        .await
        .expect("SCRIPT FLUSH");
    assert!(
        matches!(
            check(&shared, LimitKind::Tenant, "flush", l).await,
            Decision::Allowed { remaining: 3, .. }
        ),
        "state survives the flush; the script is loaded again"
    );
    assert!(matches!(
        check(&shared, LimitKind::Tenant, "flush", l).await,
        Decision::Allowed { remaining: 2, .. }
    ));

    let after = info(con).await;
    assert_eq!(
        command_calls(&after, "eval"),
        0,
        "never sends the script body with EVAL"
    );
    assert!(command_calls(&after, "evalsha") >= 4, "{after}");
    assert_eq!(
        command_calls(&after, "script|load"),
        command_calls(&before, "script|load") + 1,
        "loaded once more after the flush"
    );
}

#[tokio::test]
async fn killed_redis_fails_within_timeout_and_restart_recovers() {
    let mut server = RedisServer::start();
    let timeout = Duration::from_millis(100);
    let shared = RedisLimiter::new(&settings(&server.url(), timeout)).expect("limiter");
    let l = limit(100, 100);
    check(&shared, LimitKind::Tenant, "outage", l).await;

    server.kill();
    for attempt in 0..5 {
        let start = Instant::now();
        let result = shared.check(LimitKind::Tenant, "outage", l, ONE).await;
        let elapsed = start.elapsed();
        assert!(result.is_err(), "attempt {attempt}: {result:?}");
        assert!(
            elapsed < timeout + SLACK,
            "attempt {attempt} took {elapsed:?}"
        );
        tokio::time::sleep(Duration::from_millis(60)).await;
    }

    server.restart();
    let recovered = until_ok(&shared, "outage", l, Duration::from_secs(3)).await;
    assert!(recovered < Duration::from_secs(3));
}

#[tokio::test]
async fn starts_while_redis_is_down_and_connects_when_it_comes_up() {
    let mut server = RedisServer::start();
    server.kill();
    let timeout = Duration::from_millis(100);

    let start = Instant::now();
    let shared = RedisLimiter::new(&settings(&server.url(), timeout)).expect("no need for Redis");
    assert!(
        start.elapsed() < SLACK,
        "new() does not wait: {:?}",
        start.elapsed()
    );

    let l = limit(10, 10);
    let start = Instant::now();
    let result = shared.check(LimitKind::Account, "later", l, ONE).await;
    assert!(result.is_err(), "{result:?}");
    assert!(start.elapsed() < timeout + SLACK);

    server.restart();
    until_ok(&shared, "later", l, Duration::from_secs(3)).await;
}

#[tokio::test]
async fn hung_redis_is_a_timeout_and_recovers_when_it_resumes() {
    let server = RedisServer::start();
    let timeout = Duration::from_millis(100);
    let shared = RedisLimiter::new(&settings(&server.url(), timeout)).expect("limiter");
    let l = limit(100, 100);
    check(&shared, LimitKind::Tenant, "hung", l).await;

    server.pause();
    let start = Instant::now();
    let result = shared.check(LimitKind::Tenant, "hung", l, ONE).await;
    let elapsed = start.elapsed();
    server.signal("CONT");
    assert!(matches!(result, Err(StoreError::Timeout)), "{result:?}");
    assert!(
        elapsed >= timeout && elapsed < timeout + SLACK,
        "{elapsed:?}"
    );

    until_ok(&shared, "hung", l, Duration::from_secs(3)).await;
}

/// A "Redis" that accepts connections and never answers (a stopped or cut-off server):
/// it counts the connections made to it.
async fn silent_redis() -> (String, Arc<AtomicUsize>, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("redis://{}", listener.local_addr().expect("addr"));
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&accepted);
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            held.push(stream);
        }
    });
    (url, accepted, task)
}

/// A connection on which Redis stopped answering never breaks, so only timeouts tell:
/// after two in a row the limiter pauses (checks fail at once) and then tries a new
/// connection, instead of waiting out `timeout` on the dead one for every request.
#[tokio::test]
async fn a_redis_that_stops_answering_is_given_up_after_two_timeouts() {
    let (url, accepted, silent) = silent_redis().await;
    let timeout = Duration::from_millis(100);
    let shared = RedisLimiter::new(&settings(&url, timeout)).expect("limiter");
    let l = limit(100, 100);
    for attempt in 0..2 {
        let start = Instant::now();
        let result = shared.check(LimitKind::Tenant, "silent", l, ONE).await;
        assert!(
            matches!(result, Err(StoreError::Timeout)),
            "{attempt}: {result:?}"
        );
        assert!(start.elapsed() >= timeout, "{attempt}: waited the timeout");
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 1, "one connection so far");

    let start = Instant::now();
    let result = shared.check(LimitKind::Tenant, "silent", l, ONE).await;
    assert!(matches!(result, Err(StoreError::Unavailable)), "{result:?}");
    assert!(
        start.elapsed() < timeout,
        "paused: failed at once, not after {:?}",
        start.elapsed()
    );

    tokio::time::sleep(Duration::from_millis(250)).await;
    let result = shared.check(LimitKind::Tenant, "silent", l, ONE).await;
    assert!(matches!(result, Err(StoreError::Timeout)), "{result:?}");
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        2,
        "after the pause, a new connection"
    );
    silent.abort();
}

/// A relay to the Redis on `port` that holds back Redis' next answer for `stall` once
/// `stall_next` is set: a Redis that pauses once (a fork for a snapshot, a slow command).
async fn stalling_relay(port: u16, stall: Duration) -> (String, Arc<AtomicUsize>, Arc<AtomicBool>) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("redis://{}", listener.local_addr().expect("addr"));
    let accepted = Arc::new(AtomicUsize::new(0));
    let stall_next = Arc::new(AtomicBool::new(false));
    let (counter, switch) = (Arc::clone(&accepted), Arc::clone(&stall_next));
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            let Ok(redis) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
                return;
            };
            let (mut client_read, mut client_write) = client.into_split();
            let (mut redis_read, mut redis_write) = redis.into_split();
            tokio::spawn(async move {
                let _ = tokio::io::copy(&mut client_read, &mut redis_write).await;
            });
            let switch = Arc::clone(&switch);
            tokio::spawn(async move {
                let mut buf = vec![0u8; 16 * 1024];
                while let Ok(n @ 1..) = redis_read.read(&mut buf).await {
                    if switch.swap(false, Ordering::SeqCst) {
                        tokio::time::sleep(stall).await;
                    }
                    if client_write.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (url, accepted, stall_next)
}

/// One stall a little over `timeout` is a timeout for the check it hits and nothing
/// more: the connection is kept (no pause, no reconnect) and the next check is answered
/// on it. Only silence for twice `timeout` gives a connection up (the test above).
#[tokio::test]
async fn a_single_stall_keeps_the_connection() {
    a_stall_keeps_the_connection(Duration::ZERO).await;
}

/// Silence counts from the question, not from the last answer: after a quiet spell
/// longer than twice `timeout` (normal for a sidecar at night), one stall is still only a
/// timeout for the check it hits, not a dropped connection and a pause of every check.
#[tokio::test]
async fn a_stall_after_a_quiet_spell_keeps_the_connection() {
    a_stall_keeps_the_connection(Duration::from_millis(450)).await;
}

/// A check answered, `quiet` with none, a check that stalls past `timeout`, then one
/// answered on the same connection within what would be the pause after a reconnect.
async fn a_stall_keeps_the_connection(quiet: Duration) {
    let server = RedisServer::start();
    let timeout = Duration::from_millis(150);
    let (url, accepted, stall_next) =
        stalling_relay(server.port(), timeout + Duration::from_millis(60)).await;
    let shared = RedisLimiter::new(&settings(&url, timeout)).expect("limiter");
    let l = limit(100, 100);
    // Connects and loads the script: answered.
    let first = shared.check(LimitKind::Tenant, "stall", l, ONE).await;
    assert!(matches!(first, Ok(Decision::Allowed { .. })), "{first:?}");

    tokio::time::sleep(quiet).await;
    stall_next.store(true, Ordering::SeqCst);
    let stalled = shared.check(LimitKind::Tenant, "stall", l, ONE).await;
    assert!(matches!(stalled, Err(StoreError::Timeout)), "{stalled:?}");

    // The held answer has gone by; the next check is answered on the same connection.
    tokio::time::sleep(Duration::from_millis(120)).await;
    let start = Instant::now();
    let after = shared.check(LimitKind::Tenant, "stall", l, ONE).await;
    assert!(matches!(after, Ok(Decision::Allowed { .. })), "{after:?}");
    assert!(start.elapsed() < timeout, "answered, not waited out");
    assert_eq!(accepted.load(Ordering::SeqCst), 1, "the same connection");
}

#[tokio::test]
async fn errors_and_debug_never_show_the_password() {
    let server = RedisServer::start_with(&["--requirepass", "right-pass-5b1e"]);
    let port = server.port();
    let l = limit(10, 10);

    let wrong = format!("redis://:wrong-pass-9c2f@127.0.0.1:{port}/0");
    let shared = RedisLimiter::new(&settings(&wrong, Duration::from_millis(200))).expect("limiter");
    let err = shared
        .check(LimitKind::Tenant, "auth", l, ONE)
        .await
        .expect_err("wrong password is refused");
    let shown = format!("{err} {err:?} {shared:?}");
    assert!(!shown.contains("wrong-pass-9c2f"), "{shown}");
    assert!(!shown.contains(&wrong), "{shown}");

    let right = format!("redis://:right-pass-5b1e@127.0.0.1:{port}/0");
    let shared = RedisLimiter::new(&settings(&right, Duration::from_millis(200))).expect("limiter");
    assert!(!format!("{shared:?}").contains("right-pass-5b1e"));
    check(&shared, LimitKind::Tenant, "auth", l).await;

    // Nothing listening, a password in the URL: still not in the message.
    drop(server);
    let down = RedisLimiter::new(&settings(&right, Duration::from_millis(100))).expect("limiter");
    let err = down
        .check(LimitKind::Tenant, "auth", l, ONE)
        .await
        .expect_err("down");
    let shown = format!("{err} {err:?}");
    assert!(!shown.contains("right-pass-5b1e"), "{shown}");
}
