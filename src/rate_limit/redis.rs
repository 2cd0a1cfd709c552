//! Limiter state shared by every replica, in Redis (DESIGN §7 "Rate limits shared by all
//! replicas").
//!
//! Each check is one atomic Lua script that reads the Redis server's `TIME`, so replicas
//! whose clocks disagree still share one timeline. A request's tenant and account
//! buckets go in one call ([`RedisLimiter::check_pair`]): one round trip per request.
//! Both keys are then touched by one script, so the store must be one Redis server (a
//! cluster or a sharding proxy would split or refuse such a script). The script is
//! governor's GCRA transcribed (same tolerance, same fresh-bucket rule, the emission
//! interval in whole microseconds rounded up), so a bucket in Redis gives the same
//! [`Decision`]s as this replica's own [`super::Limiter`] for the same [`RateLimit`], or,
//! where the interval is not a whole number of microseconds, never looser ones.
//!
//! The connection is a [`ConnectionManager`], created lazily: start-up never waits for
//! Redis, a dropped connection is replaced in the background, and one that has left a
//! question unanswered for twice the `timeout` is replaced by the next check to time
//! out. Every check is bounded by the configured `timeout`; what to do when it fails is
//! the caller's `on_error`.

use std::fmt;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{RedisError, Script};

use super::{Decision, LimitKind, PairDecision, RateLimit};
use crate::config::RedisStoreSettings;
use crate::millis::{ceil_secs, millis};

/// GCRA with governor's semantics, in integer microseconds of the Redis server's clock,
/// over one or more buckets checked in order: a tenant's and then its account's, in one
/// round trip.
///
/// `KEYS[i]`: bucket i. For each, three `ARGV`: emission interval T (µs, >= 1), tolerance
/// TAU = T * (burst - 1) (µs), and the weight beyond one cell, T * (cells - 1) (µs). The
/// stored value is the bucket's theoretical arrival time (TAT). Reply: a pair per bucket
/// checked, `1, remaining burst` when admitted, `0, wait in µs` when refused, and `0, -1`
/// when the cost is above the burst and no wait admits it. The first refusal ends the
/// check, and then no bucket is charged: a refused request is charged to neither its
/// tenant nor its account, as with the local limiters. Only when every bucket admits are
/// they all written. Within a bucket all cells or none are taken, as governor's
/// `check_n`.
///
/// Lua numbers are doubles: microsecond timestamps (~1.7e15) stay exact below 2^53, while
/// nanoseconds would not. Numbers are written with `%.0f` because Lua's default `%.14g`
/// formatting would round a 16-digit timestamp.
const GCRA_SCRIPT: &str = r"
-- Needed before a write that follows TIME on Redis 3.2 to 4; the default (and a no-op)
-- since Redis 5.
redis.replicate_commands()
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local reply = {}
local charged = {}
for i = 1, #KEYS do
  local t = tonumber(ARGV[3 * i - 2])
  local tau = tonumber(ARGV[3 * i - 1])
  local extra = tonumber(ARGV[3 * i])
  if extra > tau then
    reply[#reply + 1] = 0
    reply[#reply + 1] = -1
    return reply
  end
  local stored = redis.call('GET', KEYS[i])
  -- A missing (or unreadable) bucket is a full one: governor starts a fresh key at TAT = now.
  local tat = (stored and tonumber(stored)) or now
  -- No admitted request can leave TAT beyond now + TAU + T. A larger value means the
  -- server clock stepped back (e.g. a failover) or the limit was lowered; cap it so that
  -- a bucket is never locked for longer than one full refill.
  if tat > now + tau + t then
    tat = now + tau + t
  end
  local earliest = tat + extra - tau
  if now < earliest then
    reply[#reply + 1] = 0
    reply[#reply + 1] = earliest - now
    return reply
  end
  local new_tat = math.max(tat, now) + t + extra
  charged[i] = new_tat
  reply[#reply + 1] = 1
  reply[#reply + 1] = math.floor((now + tau + t - new_tat) / t)
end
for i = 1, #KEYS do
  -- Once TAT is in the past the bucket behaves exactly like a missing key, so it may
  -- vanish then: the expiry is the time until the bucket is full again.
  local ttl_ms = math.max(1, math.ceil((charged[i] - now) / 1000))
  redis.call('SET', KEYS[i], string.format('%.0f', charged[i]), 'PX', string.format('%.0f', ttl_ms))
end
return reply
";

/// Longest wait for a new connection (TCP, TLS, AUTH, SELECT). Longer than a check's
/// `timeout` on purpose: a reconnect runs in the background and may outlive many checks.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// After the connection is found broken, checks fail at once for this long instead of
/// each waiting on (and re-triggering) a connection attempt: a dead Redis then costs the
/// request path nothing, and is probed a few times a second rather than once per request.
const RECONNECT_PAUSE: Duration = Duration::from_millis(200);

/// How many `timeout`s a connection may leave a question unanswered before a check that
/// times out on it gives it up for a new one. A Redis that stops answering (stopped, cut
/// off without a reset) leaves its connection open, so no error ever says it broke;
/// without this, every check would wait out `timeout` on it. One stall a little over
/// `timeout` (a fork for a snapshot) is not enough, however long the quiet before it:
/// silence counts from the first question asked since the last answer.
const SILENT_TIMEOUTS_BEFORE_RECONNECT: u64 = 2;

/// `unanswered_since_ms` when every question asked has been answered.
const ANSWERED: u64 = u64::MAX;

/// Why a shared check gave no decision. Messages never contain the URL or its password.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("rate-limit store did not answer in time")]
    Timeout,
    #[error("rate-limit store is unreachable; reconnecting")]
    Unavailable,
    #[error("rate-limit store error: {0}")]
    Redis(String),
    #[error("rate-limit store reply not understood: {0}")]
    Reply(String),
    #[error("rate-limit store settings: {0}")]
    Config(String),
}

/// One bucket of a shared check: whose, under which limit, and at what cost.
#[derive(Debug, Clone, Copy)]
pub struct Bucket<'a> {
    pub kind: LimitKind,
    pub name: &'a str,
    pub limit: RateLimit,
    pub cells: NonZeroU32,
}

/// A bucket's script arguments, in microseconds (the resolution of Redis' `TIME`).
struct GcraArgs {
    t_us: u64,
    tau_us: u64,
    extra_us: u64,
}

impl GcraArgs {
    fn of(limit: RateLimit, cells: NonZeroU32) -> GcraArgs {
        let interval = limit.quota().replenish_interval();
        // Whole microseconds, rounded up: never a shorter interval (a looser limit) than
        // the local limiter's, whose interval governor keeps in nanoseconds.
        let t_us = u64::try_from(interval.as_nanos().div_ceil(1_000))
            .unwrap_or(u64::MAX)
            .max(1);
        GcraArgs {
            t_us,
            tau_us: t_us.saturating_mul(u64::from(limit.burst.get() - 1)),
            extra_us: t_us.saturating_mul(u64::from(cells.get() - 1)),
        }
    }
}

/// A GCRA limiter whose buckets live in Redis. Cheap to clone; clones share the
/// connection.
#[derive(Clone)]
pub struct RedisLimiter {
    inner: Arc<Inner>,
}

struct Inner {
    /// Swapped for a new one when Redis stops answering
    /// ([`SILENT_TIMEOUTS_BEFORE_RECONNECT`]).
    manager: ArcSwap<ConnectionManager>,
    /// What a new connection manager is made from.
    client: redis::Client,
    manager_config: ConnectionManagerConfig,
    script: Script,
    key_prefix: String,
    timeout: Duration,
    origin: Instant,
    /// Milliseconds since `origin` before which checks fail without trying Redis.
    paused_until_ms: AtomicU64,
    /// Milliseconds since `origin` of the first question asked since the last answer
    /// from Redis (or since the current connection's creation); [`ANSWERED`] when none.
    unanswered_since_ms: AtomicU64,
    /// Strings to scrub from error messages: the URL and the password inside it.
    secrets: Vec<String>,
}

// Hand-written: the connection manager's Debug would print the connection info.
impl fmt::Debug for RedisLimiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisLimiter")
            .field("key_prefix", &self.inner.key_prefix)
            .field("timeout", &self.inner.timeout)
            .finish_non_exhaustive()
    }
}

impl RedisLimiter {
    /// Prepares the shared limiter without waiting for Redis: the connection is made in
    /// the background (and on first use), and until it works `check` and `check_pair` return `Err`.
    /// Fails only on settings that can never work (an unparsable URL) or when called
    /// outside a Tokio runtime.
    pub fn new(settings: &RedisStoreSettings) -> Result<RedisLimiter, StoreError> {
        let secrets = secrets_of(&settings.url);
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
            StoreError::Config("the Redis limiter must be created inside the Tokio runtime".into())
        })?;
        let client = redis::Client::open(settings.url.as_str())
            .map_err(|err| StoreError::Config(redact(&err.to_string(), &secrets)))?;
        // No retries inside the manager: a failed connection attempt must surface at once
        // so checks fall back instead of waiting out a backoff; `RECONNECT_PAUSE` paces
        // the next attempt instead. No response timeout either: `check` bounds each call
        // itself, and the client's own timeout would report a merely slow answer as an
        // I/O error, indistinguishable from a broken connection.
        let config = ConnectionManagerConfig::new()
            .set_number_of_retries(0)
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(None);
        let manager = ConnectionManager::new_lazy_with_config(client.clone(), config.clone())
            .map_err(|err| StoreError::Config(redact(&err.to_string(), &secrets)))?;
        let script = Script::new(GCRA_SCRIPT);

        // Connect and load the script now, in the background, so the first request does
        // not pay for the handshake. A failure here is not an error: checks report it.
        let warm_manager = manager.clone();
        let warm_script = script.clone();
        runtime.spawn(async move {
            let mut connection = warm_manager;
            if let Err(err) = warm_script
                .prepare_invoke()
                .load_async(&mut connection)
                .await
            {
                tracing::debug!(kind = ?err.kind(), "rate-limit store not reachable at start");
            }
        });

        Ok(RedisLimiter {
            inner: Arc::new(Inner {
                manager: ArcSwap::from_pointee(manager),
                client,
                manager_config: config,
                script,
                key_prefix: settings.key_prefix.clone(),
                timeout: settings.timeout,
                origin: Instant::now(),
                paused_until_ms: AtomicU64::new(0),
                unanswered_since_ms: AtomicU64::new(ANSWERED),
                secrets,
            }),
        })
    }

    /// The Redis key of one bucket: `{key_prefix}:{kind}:{name}`.
    pub fn key(&self, kind: LimitKind, name: &str) -> String {
        format!("{}:{}:{}", self.inner.key_prefix, kind.as_str(), name)
    }

    /// One atomic check-and-update of the shared bucket, with the same meaning and the
    /// same `Decision` values as the local limiter. Slower than `timeout` is
    /// `Err(StoreError::Timeout)`; the request may still have been counted in Redis.
    pub async fn check(
        &self,
        kind: LimitKind,
        name: &str,
        limit: RateLimit,
        cells: NonZeroU32,
    ) -> Result<Decision, StoreError> {
        let bucket = Bucket {
            kind,
            name,
            limit,
            cells,
        };
        let decisions = self.run(&[bucket]).await?;
        decisions
            .first()
            .copied()
            .ok_or_else(|| StoreError::Reply("no decision".into()))
    }

    /// Checks `first` and, if it admits, `second`, in one atomic round trip, with the
    /// decisions of the local [`Limiter::check_pair`](super::Limiter::check_pair): a
    /// request is charged to both buckets or, when either refuses, to neither. Slower
    /// than `timeout` is `Err(StoreError::Timeout)`, and then both buckets may still have
    /// been charged in Redis.
    pub async fn check_pair(
        &self,
        first: Bucket<'_>,
        second: Bucket<'_>,
    ) -> Result<PairDecision, StoreError> {
        let decisions = self.run(&[first, second]).await?;
        match decisions.as_slice() {
            [refused @ Decision::Refused { .. }] => Ok(PairDecision::FirstRefused(*refused)),
            [admitted, decided] => Ok(PairDecision::Both {
                first: *admitted,
                second: *decided,
            }),
            _ => Err(StoreError::Reply(format!(
                "{} decisions for a pair",
                decisions.len()
            ))),
        }
    }

    /// Runs the script over `buckets`, bounded by `timeout`: one decision per bucket
    /// checked.
    async fn run(&self, buckets: &[Bucket<'_>]) -> Result<Vec<Decision>, StoreError> {
        let asked_ms = self.now_ms();
        if self.paused_at(asked_ms) {
            return Err(StoreError::Unavailable);
        }
        // Only the first question after an answer starts the silence.
        let _ = self.inner.unanswered_since_ms.compare_exchange(
            ANSWERED,
            asked_ms,
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
        let mut invocation = self.inner.script.prepare_invoke();
        for bucket in buckets {
            let args = GcraArgs::of(bucket.limit, bucket.cells);
            invocation
                .key(self.key(bucket.kind, bucket.name))
                .arg(args.t_us)
                .arg(args.tau_us)
                .arg(args.extra_us);
        }
        let manager = self.inner.manager.load_full();
        let mut connection = ConnectionManager::clone(&manager);
        let call = invocation.invoke_async::<Vec<i64>>(&mut connection);
        let answered = match tokio::time::timeout(self.inner.timeout, call).await {
            Err(_elapsed) => return Err(self.timed_out(&manager)),
            Ok(answered) => answered,
        };
        self.inner
            .unanswered_since_ms
            .store(ANSWERED, Ordering::Relaxed);
        let reply = answered.map_err(|err| self.failed(&err))?;
        decisions_from(&reply, buckets)
    }

    fn now_ms(&self) -> u64 {
        millis(self.inner.origin.elapsed())
    }

    fn paused_at(&self, now_ms: u64) -> bool {
        now_ms < self.inner.paused_until_ms.load(Ordering::Relaxed)
    }

    fn pause(&self) {
        let until = self.now_ms().saturating_add(millis(RECONNECT_PAUSE));
        self.inner.paused_until_ms.store(until, Ordering::Relaxed);
    }

    /// Turns a client error into a `StoreError`, pausing checks when the connection
    /// itself is broken (the manager is already reconnecting by then).
    fn failed(&self, err: &RedisError) -> StoreError {
        if err.is_io_error() || err.is_connection_dropped() || err.is_connection_refusal() {
            self.pause();
        }
        StoreError::Redis(redact(&err.to_string(), &self.inner.secrets))
    }

    /// A check on `used` ran out of time. When a question has gone unanswered for
    /// [`SILENT_TIMEOUTS_BEFORE_RECONNECT`] `timeout`s, the connection is treated as
    /// broken: replaced by a new (lazy) one and checks pause as after a break. The old one,
    /// and the calls queued on it, go when the last check still waiting on it ends. Of
    /// several checks timing out together, only the one that swaps pauses.
    fn timed_out(&self, used: &Arc<ConnectionManager>) -> StoreError {
        let now = self.now_ms();
        // An answer to another check since (`ANSWERED`) means the connection lives.
        let silent_for = now.saturating_sub(
            self.inner
                .unanswered_since_ms
                .load(Ordering::Relaxed)
                .min(now),
        );
        let limit = millis(self.inner.timeout).saturating_mul(SILENT_TIMEOUTS_BEFORE_RECONNECT);
        let still_current = Arc::ptr_eq(&self.inner.manager.load(), used);
        if silent_for < limit || !still_current {
            return StoreError::Timeout;
        }
        let fresh = ConnectionManager::new_lazy_with_config(
            self.inner.client.clone(),
            self.inner.manager_config.clone(),
        );
        match fresh {
            Ok(fresh) => {
                let before = self.inner.manager.compare_and_swap(used, Arc::new(fresh));
                if Arc::ptr_eq(&before, used) {
                    // The new connection gets its own allowance of silence.
                    self.inner
                        .unanswered_since_ms
                        .store(ANSWERED, Ordering::Relaxed);
                    self.pause();
                }
            }
            Err(err) => {
                tracing::debug!(kind = ?err.kind(), "rate-limit store: no new connection");
                self.pause();
            }
        }
        StoreError::Timeout
    }
}

/// Maps the script's reply to one `Decision` per bucket it checked: a pair per bucket,
/// up to and including the first refusal, or for every bucket when none refused.
fn decisions_from(reply: &[i64], buckets: &[Bucket<'_>]) -> Result<Vec<Decision>, StoreError> {
    let pairs = reply.chunks_exact(2);
    if !pairs.remainder().is_empty() || pairs.len() > buckets.len() || reply.is_empty() {
        return Err(StoreError::Reply(format!(
            "{} values for {} buckets",
            reply.len(),
            buckets.len()
        )));
    }
    let mut decisions = Vec::with_capacity(pairs.len());
    for (pair, bucket) in pairs.zip(buckets) {
        decisions.push(decision_from(pair, bucket.limit, bucket.cells)?);
    }
    let refused_at = decisions
        .iter()
        .position(|d| matches!(d, Decision::Refused { .. }));
    let complete = match refused_at {
        Some(at) => at + 1 == decisions.len(),
        None => decisions.len() == buckets.len(),
    };
    if !complete {
        return Err(StoreError::Reply(format!(
            "{} decisions for {} buckets",
            decisions.len(),
            buckets.len()
        )));
    }
    Ok(decisions)
}

/// Maps one bucket's pair of the reply to the local limiter's `Decision`.
fn decision_from(
    reply: &[i64],
    limit: RateLimit,
    cells: NonZeroU32,
) -> Result<Decision, StoreError> {
    match *reply {
        [1, remaining] => {
            let remaining = u32::try_from(remaining)
                .ok()
                .filter(|r| *r < limit.burst.get())
                .ok_or_else(|| StoreError::Reply(format!("remaining {remaining}")))?;
            // As the local limiter: with no burst left, the next request is admitted one
            // emission interval from now at the latest.
            let reset_secs = if remaining > 0 {
                0
            } else {
                ceil_secs(limit.quota().replenish_interval())
            };
            Ok(Decision::Allowed {
                remaining,
                reset_secs,
            })
        }
        // A cost above the burst: as the local limiter, the Retry-After of a whole refill.
        [0, -1] => Ok(limit.never_fits()),
        [0, wait_us] => {
            let wait_us =
                u64::try_from(wait_us).map_err(|_| StoreError::Reply(format!("wait {wait_us}")))?;
            Ok(limit.refusal(cells, Duration::from_micros(wait_us)))
        }
        _ => Err(StoreError::Reply(format!("{} values", reply.len()))),
    }
}

/// The URL and the password inside it (raw and percent-decoded), for scrubbing.
fn secrets_of(url: &str) -> Vec<String> {
    let mut secrets = vec![url.to_owned()];
    let authority = url
        .split_once("://")
        .map_or(url, |(_, rest)| rest)
        .split('/')
        .next()
        .unwrap_or_default();
    if let Some((userinfo, _host)) = authority.rsplit_once('@') {
        let password = userinfo.split_once(':').map_or(userinfo, |(_, p)| p);
        if !password.is_empty() {
            secrets.push(password.to_owned());
            let decoded = percent_encoding::percent_decode_str(password)
                .decode_utf8_lossy()
                .into_owned();
            if decoded != password {
                secrets.push(decoded);
            }
        }
    }
    secrets
}

/// Client messages are not known to quote the URL, but a leaked password would be costly:
/// scrub anyway.
fn redact(message: &str, secrets: &[String]) -> String {
    secrets
        .iter()
        .filter(|secret| !secret.is_empty())
        .fold(message.to_owned(), |text, secret| {
            text.replace(secret.as_str(), "[redacted]")
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shared_interval_is_never_shorter_than_the_local_one() {
        let one = NonZeroU32::MIN;
        for per_second in [1, 3, 7, 60, 300, 400_000, 1_500_000, u32::MAX] {
            let l = limit(per_second, 1);
            let local = l.quota().replenish_interval();
            let shared = Duration::from_micros(GcraArgs::of(l, one).t_us);
            assert!(shared >= local, "{per_second}/s: {shared:?} < {local:?}");
            assert!(
                shared - local <= Duration::from_micros(1),
                "{per_second}/s: rounded up by at most a microsecond"
            );
        }
    }

    fn limit(per_second: u32, burst: u32) -> RateLimit {
        RateLimit::new(per_second, burst).expect("non-zero")
    }

    #[test]
    fn replies_map_like_the_local_limiter() {
        let l = limit(2, 3);
        let one = NonZeroU32::MIN;
        let two = NonZeroU32::new(2).expect("two");
        assert_eq!(
            decision_from(&[1, 2], l, one).expect("ok"),
            Decision::Allowed {
                remaining: 2,
                reset_secs: 0
            }
        );
        assert_eq!(
            decision_from(&[1, 0], l, one).expect("ok"),
            Decision::Allowed {
                remaining: 0,
                reset_secs: 1
            }
        );
        assert_eq!(
            decision_from(&[0, 1], l, one).expect("ok"),
            Decision::Refused {
                remaining: 0,
                retry_after_secs: 1
            }
        );
        assert_eq!(
            decision_from(&[0, 1_000_001], l, one).expect("ok"),
            Decision::Refused {
                remaining: 0,
                retry_after_secs: 2
            }
        );
        // Two cells refused for a wait shorter than one interval (0.5 s): one is there.
        assert_eq!(
            decision_from(&[0, 200_000], l, two).expect("ok"),
            Decision::Refused {
                remaining: 1,
                retry_after_secs: 1
            }
        );
        assert_eq!(
            decision_from(&[0, 600_000], l, two).expect("ok"),
            Decision::Refused {
                remaining: 0,
                retry_after_secs: 1
            }
        );
        assert!(decision_from(&[1, 3], l, one).is_err());
        assert_eq!(
            decision_from(&[0, -1], l, one).expect("ok"),
            l.never_fits(),
            "the script's mark for a cost above the burst"
        );
        assert!(decision_from(&[0, -2], l, one).is_err());
        assert!(decision_from(&[7], l, one).is_err());
    }

    #[test]
    fn a_reply_must_hold_a_pair_per_bucket_up_to_the_first_refusal() {
        let one = NonZeroU32::MIN;
        let buckets = [
            Bucket {
                kind: LimitKind::Tenant,
                name: "t",
                limit: limit(2, 3),
                cells: one,
            },
            Bucket {
                kind: LimitKind::Account,
                name: "a",
                limit: limit(1, 2),
                cells: one,
            },
        ];
        let admitted = |remaining, reset_secs| Decision::Allowed {
            remaining,
            reset_secs,
        };
        let refused = Decision::Refused {
            remaining: 0,
            retry_after_secs: 1,
        };
        assert_eq!(
            decisions_from(&[1, 2, 1, 0], &buckets).expect("both"),
            [admitted(2, 0), admitted(0, 1)]
        );
        assert_eq!(
            decisions_from(&[1, 2, 0, 5], &buckets).expect("second refused"),
            [admitted(2, 0), refused]
        );
        assert_eq!(
            decisions_from(&[0, 5], &buckets).expect("first refused"),
            [refused]
        );
        for bad in [
            &[][..],
            &[1],
            &[1, 2],             // admitted, yet the second bucket went unchecked
            &[0, 5, 1, 1],       // checked on past a refusal
            &[1, 2, 1, 1, 1, 0], // more pairs than buckets
            &[1, 2, 1],
        ] {
            assert!(decisions_from(bad, &buckets).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn secrets_are_scrubbed() {
        let url = "redis://user:p%40ss@redis.internal:6379/0";
        let secrets = secrets_of(url);
        let text = redact(
            &format!("failed for {url}: p%40ss / p@ss rejected"),
            &secrets,
        );
        assert!(!text.contains("p%40ss") && !text.contains("p@ss"), "{text}");
        assert!(text.contains("rejected"));
        assert_eq!(secrets_of("redis://127.0.0.1:6379/0").len(), 1);
        let bare = secrets_of("redis://:only-password@127.0.0.1/");
        assert!(bare.iter().any(|s| s == "only-password"));
    }
}
