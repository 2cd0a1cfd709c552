//! Per-tenant and per-account GCRA limits (governor), the `RateLimit`/`RateLimit-Policy`
//! header values of draft-ietf-httpapi-ratelimit-headers, and the limiter set that keeps
//! its state across config reloads. The clock is injectable so tests never sleep.
//!
//! A request is charged to its tenant's bucket and its account's bucket, or to neither:
//! a request either limit refuses is never forwarded, so it spends nothing
//! ([`Limiter::check_pair`], and the same rule in Redis).

use std::collections::HashMap;
use std::num::{NonZeroU32, NonZeroU64};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use governor::clock::{Clock, Reference};
use governor::middleware::{StateInformationMiddleware, StateSnapshot};
use governor::nanos::Nanos;
use governor::state::{NotKeyed, StateStore};
use governor::{NotUntil, Quota, RateLimiter};

use crate::millis::ceil_secs;
use http::{HeaderName, HeaderValue};

pub mod redis;

/// A configured limit: `per_second` sustained, `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    pub per_second: NonZeroU32,
    pub burst: NonZeroU32,
}

impl RateLimit {
    /// `None` when either number is zero.
    pub fn new(per_second: u32, burst: u32) -> Option<RateLimit> {
        Some(RateLimit {
            per_second: NonZeroU32::new(per_second)?,
            burst: NonZeroU32::new(burst)?,
        })
    }

    fn quota(&self) -> Quota {
        Quota::per_second(self.per_second).allow_burst(self.burst)
    }

    /// The refusal of a cost above the burst, which no wait can admit: the Retry-After of
    /// a whole refill. (Only a config change helps; the gateway warns of it when it loads
    /// the config, not on every refused request.)
    ///
    /// How many cells the bucket holds is not known without taking them, so `remaining`
    /// says none: nothing this request could use.
    pub(crate) fn never_fits(&self) -> Decision {
        Decision::Refused {
            remaining: 0,
            retry_after_secs: u64::from(self.window_secs()).max(1),
        }
    }

    /// The refusal of `cells` that would fit after `wait`: cells arrive one emission
    /// interval apart, so the bucket holds now as many as arrive in the interval-long
    /// steps still missing from `wait` fewer than `cells` (none for a single cell). A
    /// refused request takes nothing, so those are also what remains after it.
    pub(crate) fn refusal(&self, cells: NonZeroU32, wait: Duration) -> Decision {
        let interval = self.quota().replenish_interval().as_nanos().max(1);
        let missing = wait.as_nanos().div_ceil(interval).max(1);
        let remaining = u128::from(cells.get()).saturating_sub(missing);
        Decision::Refused {
            remaining: u32::try_from(remaining).unwrap_or(0),
            retry_after_secs: ceil_secs(wait).max(1),
        }
    }

    /// `w` of the policy header: the window in which the whole burst replenishes.
    fn window_secs(&self) -> u32 {
        self.burst.get().div_ceil(self.per_second.get())
    }
}

/// Which of the two limits a decision came from; also the policy name in the headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LimitKind {
    Tenant,
    Account,
}

impl LimitKind {
    pub fn as_str(self) -> &'static str {
        match self {
            LimitKind::Tenant => "tenant",
            LimitKind::Account => "account",
        }
    }
}

/// The clock the limiters read. Production uses the monotonic clock; tests use a manual
/// one they advance by hand.
#[derive(Debug, Clone)]
pub enum LimiterClock {
    Monotonic { origin: Instant },
    Manual(ManualClock),
}

impl LimiterClock {
    pub fn monotonic() -> LimiterClock {
        LimiterClock::Monotonic {
            origin: Instant::now(),
        }
    }
}

impl Clock for LimiterClock {
    type Instant = Nanos;

    fn now(&self) -> Nanos {
        match self {
            LimiterClock::Monotonic { origin } => Nanos::from(origin.elapsed()),
            LimiterClock::Manual(manual) => Nanos::from(manual.nanos.load(Ordering::Acquire)),
        }
    }
}

/// A clock that moves only when told to.
#[derive(Debug, Clone, Default)]
pub struct ManualClock {
    nanos: Arc<AtomicU64>,
}

impl ManualClock {
    pub fn advance(&self, by: Duration) {
        let nanos = u64::try_from(by.as_nanos()).unwrap_or(u64::MAX);
        self.nanos.fetch_add(nanos, Ordering::AcqRel);
    }
}

/// The outcome of one check, with what the response headers need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Allowed {
        remaining: u32,
        reset_secs: u64,
    },
    /// `remaining`: the cells the bucket holds now, fewer than the request needed.
    Refused {
        remaining: u32,
        retry_after_secs: u64,
    },
}

/// What a check of two buckets in a row decided: a request's tenant and then its account.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PairDecision {
    /// The first bucket refused; the second was neither checked nor charged.
    FirstRefused(Decision),
    /// The first bucket admitted, and the second decided. When the second refused, the
    /// first was not charged either: `first` says what it would have left.
    Both { first: Decision, second: Decision },
}

/// A bucket's whole GCRA state, its theoretical arrival time (nanoseconds from the
/// limiter's start; 0 for a fresh bucket), as governor's own `InMemoryState` keeps it,
/// but shared: the [`Limiter`] holds a handle too, to put back a charge that must not
/// stand ([`Limiter::check_pair`]).
#[derive(Debug, Clone, Default)]
struct SharedTat(Arc<AtomicU64>);

impl SharedTat {
    fn load(&self) -> u64 {
        self.0.load(Ordering::Acquire)
    }

    /// Puts `before` back if the state is still `after`; a later write stands.
    fn restore(&self, after: u64, before: u64) {
        let _ = self
            .0
            .compare_exchange(after, before, Ordering::AcqRel, Ordering::Acquire);
    }
}

impl StateStore for SharedTat {
    type Key = NotKeyed;

    fn measure_and_replace<T, F, E>(&self, _key: &NotKeyed, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        let mut prev = self.load();
        loop {
            let tat = NonZeroU64::new(prev).map(|tat| Nanos::from(tat.get()));
            let (outcome, next) = f(tat)?;
            match self.0.compare_exchange_weak(
                prev,
                next.into(),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return Ok(outcome),
                Err(current) => prev = current,
            }
        }
    }
}

type GcraLimiter = RateLimiter<NotKeyed, SharedTat, LimiterClock, StateInformationMiddleware>;

/// One GCRA bucket (one tenant or one account).
#[derive(Debug)]
pub struct Limiter {
    kind: LimitKind,
    limit: RateLimit,
    clock: LimiterClock,
    gcra: GcraLimiter,
    tat: SharedTat,
    /// Held by [`Limiter::check_pair`] from its charge to its decision, so that putting
    /// the charge back cannot undo another request's.
    pairing: Mutex<()>,
    /// `RateLimit-Policy` never changes for a limiter: made once, cloned per response.
    policy: HeaderValue,
}

impl Limiter {
    pub fn new(kind: LimitKind, limit: RateLimit, clock: LimiterClock) -> Limiter {
        let tat = SharedTat::default();
        let gcra: GcraLimiter = RateLimiter::new(limit.quota(), tat.clone(), clock.clone());
        Limiter {
            kind,
            limit,
            clock,
            gcra,
            tat,
            pairing: Mutex::new(()),
            policy: policy_header(kind, limit),
        }
    }

    pub fn kind(&self) -> LimitKind {
        self.kind
    }

    pub fn limit(&self) -> RateLimit {
        self.limit
    }

    pub fn check(&self) -> Decision {
        match self.gcra.check() {
            Ok(snapshot) => self.allowed(&snapshot),
            Err(not_until) => self.refused(NonZeroU32::MIN, &not_until),
        }
    }

    /// Takes `cells` at once, or none: a request that costs two (a by-uuid call makes two
    /// Plivo calls) must not spend one and then be refused for the other.
    pub fn check_n(&self, cells: NonZeroU32) -> Decision {
        match self.gcra.check_n(cells) {
            Ok(Ok(snapshot)) => self.allowed(&snapshot),
            Ok(Err(not_until)) => self.refused(cells, &not_until),
            Err(_insufficient) => self.limit.never_fits(),
        }
    }

    /// Takes `cells` from this bucket and then asks `second` (the account's check, which
    /// charges it only if it admits). If `second` refuses, the cells are put back: a
    /// refused request is charged to neither bucket.
    ///
    /// The charge is put back exactly while no other request has charged this bucket
    /// since; the lock makes that so for all requests that charge it through here, which
    /// for a tenant's bucket is every request.
    pub fn check_pair(&self, cells: NonZeroU32, second: impl FnOnce() -> Decision) -> PairDecision {
        let _pairing = self.pairing.lock().unwrap_or_else(PoisonError::into_inner);
        let before = self.tat.load();
        let first = self.check_n(cells);
        if matches!(first, Decision::Refused { .. }) {
            return PairDecision::FirstRefused(first);
        }
        let after = self.tat.load();
        let second = second();
        if matches!(second, Decision::Refused { .. }) {
            self.tat.restore(after, before);
        }
        PairDecision::Both { first, second }
    }

    fn allowed(&self, snapshot: &StateSnapshot) -> Decision {
        let remaining = snapshot.remaining_burst_capacity();
        // With no burst left, the next request is admitted once one more cell has
        // replenished, which is at most one emission interval away.
        let reset_secs = if remaining > 0 {
            0
        } else {
            ceil_secs(self.limit.quota().replenish_interval())
        };
        Decision::Allowed {
            remaining,
            reset_secs,
        }
    }

    fn refused(&self, cells: NonZeroU32, not_until: &NotUntil<Nanos>) -> Decision {
        let now = self.clock.now();
        let wait = not_until.earliest_possible().duration_since(now);
        self.limit.refusal(cells, Duration::from(wait))
    }

    /// `RateLimit-Policy: "<kind>";q=<burst>;w=<window>`.
    pub fn policy_header(&self) -> HeaderValue {
        self.policy.clone()
    }

    /// `RateLimit: "<kind>";r=<remaining>;t=<seconds>` for a decision of this limiter.
    pub fn state_header(&self, decision: Decision) -> HeaderValue {
        let (remaining, reset) = match decision {
            Decision::Allowed {
                remaining,
                reset_secs,
            } => (remaining, reset_secs),
            Decision::Refused {
                remaining,
                retry_after_secs,
            } => (remaining, retry_after_secs),
        };
        // Made on every admitted request: pieces and digits, not `write!`, which costs
        // more than the rest of the header's making.
        let mut text = HeaderText::default();
        text.push(b"\"");
        text.push(self.kind.as_str().as_bytes());
        text.push(b"\";r=");
        text.push_decimal(remaining.into());
        text.push(b";t=");
        text.push_decimal(reset);
        header_value(text.as_bytes())
    }
}

/// The two header names, as constants: nothing to parse per response.
pub const RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");
pub const RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");

fn policy_header(kind: LimitKind, limit: RateLimit) -> HeaderValue {
    let text = format!(
        "\"{}\";q={};w={}",
        kind.as_str(),
        limit.burst,
        limit.window_secs()
    );
    header_value(text.as_bytes())
}

/// Header text is ASCII digits, letters, quotes, `;` and `=`: always a valid value.
fn header_value(text: &[u8]) -> HeaderValue {
    HeaderValue::from_bytes(text).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// A stack buffer for one `RateLimit` value: `"account";r=<u32>;t=<u64>` is at most 45
/// bytes.
struct HeaderText {
    bytes: [u8; 64],
    len: usize,
}

impl Default for HeaderText {
    fn default() -> Self {
        HeaderText {
            bytes: [0; 64],
            len: 0,
        }
    }
}

impl HeaderText {
    fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }

    /// Appends `bytes`; the longest value fits (see the type), so nothing is ever cut.
    fn push(&mut self, bytes: &[u8]) {
        let end = self.len + bytes.len();
        debug_assert!(
            end <= self.bytes.len(),
            "a RateLimit value is at most 45 bytes"
        );
        if let Some(slot) = self.bytes.get_mut(self.len..end) {
            slot.copy_from_slice(bytes);
            self.len = end;
        }
    }

    /// Appends `n` in decimal.
    fn push_decimal(&mut self, n: u64) {
        // u64::MAX has 20 digits.
        let mut digits = [0u8; 20];
        let mut start = digits.len();
        let mut rest = n;
        loop {
            start -= 1;
            digits[start] = b'0' + (rest % 10) as u8;
            rest /= 10;
            if rest == 0 {
                break;
            }
        }
        self.push(&digits[start..]);
    }
}

/// Every tenant's and every account's limiter, by name.
#[derive(Debug, Default)]
pub struct LimiterSet {
    tenants: HashMap<String, Arc<Limiter>>,
    accounts: HashMap<String, Arc<Limiter>>,
}

impl LimiterSet {
    /// Builds the limiters for a (re)loaded config. A limiter whose limit did not change
    /// is carried over from `previous`, so a reload neither resets nor refills anyone.
    pub fn rebuild<'a>(
        previous: Option<&LimiterSet>,
        tenants: impl IntoIterator<Item = (&'a str, RateLimit)>,
        accounts: impl IntoIterator<Item = (&'a str, RateLimit)>,
        clock: &LimiterClock,
    ) -> LimiterSet {
        let carry = |kind: LimitKind, name: &str, limit: RateLimit| {
            let old = previous.and_then(|set| set.map(kind).get(name));
            match old {
                Some(limiter) if limiter.limit == limit => Arc::clone(limiter),
                _ => Arc::new(Limiter::new(kind, limit, clock.clone())),
            }
        };
        LimiterSet {
            tenants: tenants
                .into_iter()
                .map(|(name, limit)| (name.to_owned(), carry(LimitKind::Tenant, name, limit)))
                .collect(),
            accounts: accounts
                .into_iter()
                .map(|(name, limit)| (name.to_owned(), carry(LimitKind::Account, name, limit)))
                .collect(),
        }
    }

    fn map(&self, kind: LimitKind) -> &HashMap<String, Arc<Limiter>> {
        match kind {
            LimitKind::Tenant => &self.tenants,
            LimitKind::Account => &self.accounts,
        }
    }

    pub fn tenant(&self, name: &str) -> Option<&Arc<Limiter>> {
        self.tenants.get(name)
    }

    pub fn account(&self, name: &str) -> Option<&Arc<Limiter>> {
        self.accounts.get(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit(per_second: u32, burst: u32) -> RateLimit {
        RateLimit::new(per_second, burst).expect("non-zero")
    }

    fn manual() -> (ManualClock, LimiterClock) {
        let manual = ManualClock::default();
        (manual.clone(), LimiterClock::Manual(manual))
    }

    #[test]
    fn burst_then_refusal_then_replenish() {
        let (time, clock) = manual();
        let limiter = Limiter::new(LimitKind::Tenant, limit(5, 3), clock);
        assert_eq!(
            limiter.check(),
            Decision::Allowed {
                remaining: 2,
                reset_secs: 0
            }
        );
        assert_eq!(
            limiter.check(),
            Decision::Allowed {
                remaining: 1,
                reset_secs: 0
            }
        );
        assert_eq!(
            limiter.check(),
            Decision::Allowed {
                remaining: 0,
                reset_secs: 1
            }
        );
        assert_eq!(
            limiter.check(),
            Decision::Refused {
                remaining: 0,
                retry_after_secs: 1
            }
        );
        time.advance(Duration::from_millis(200));
        assert!(matches!(limiter.check(), Decision::Allowed { .. }));
        assert!(matches!(limiter.check(), Decision::Refused { .. }));
    }

    /// A by-uuid request's two cells: both or neither. With one cell left, two are
    /// refused and the one stays; a burst of one never holds two.
    #[test]
    fn two_cells_are_taken_together_or_not_at_all() {
        let two = NonZeroU32::new(2).expect("two");
        let (time, clock) = manual();
        let limiter = Limiter::new(LimitKind::Account, limit(1, 3), clock.clone());
        assert_eq!(
            limiter.check_n(two),
            Decision::Allowed {
                remaining: 1,
                reset_secs: 0
            }
        );
        assert_eq!(
            limiter.check_n(two),
            Decision::Refused {
                remaining: 1,
                retry_after_secs: 1
            }
        );
        assert_eq!(
            limiter.check(),
            Decision::Allowed {
                remaining: 0,
                reset_secs: 1
            }
        );
        time.advance(Duration::from_secs(2));
        assert!(matches!(limiter.check_n(two), Decision::Allowed { .. }));

        let tiny = Limiter::new(LimitKind::Account, limit(1, 1), clock);
        assert_eq!(
            tiny.check_n(two),
            Decision::Refused {
                remaining: 0,
                retry_after_secs: 1
            }
        );
        assert!(matches!(tiny.check(), Decision::Allowed { .. }));
    }

    fn refused(retry_after_secs: u64) -> Decision {
        Decision::Refused {
            remaining: 0,
            retry_after_secs,
        }
    }

    /// The tenant's cell comes back when the account refuses: the tenant's second request
    /// is still admitted (with one cell, a kept charge would refuse it).
    #[test]
    fn a_pair_the_second_refuses_charges_neither() {
        let (_, clock) = manual();
        let tenant = Limiter::new(LimitKind::Tenant, limit(1, 1), clock.clone());
        let account = Limiter::new(LimitKind::Account, limit(1, 1), clock);
        assert!(matches!(account.check(), Decision::Allowed { .. }));
        let refused_by_account = tenant.check_pair(NonZeroU32::MIN, || account.check());
        assert_eq!(
            refused_by_account,
            PairDecision::Both {
                first: Decision::Allowed {
                    remaining: 0,
                    reset_secs: 1
                },
                second: refused(1),
            }
        );
        assert_eq!(
            tenant.check(),
            Decision::Allowed {
                remaining: 0,
                reset_secs: 1
            },
            "the tenant's only cell was put back"
        );
    }

    /// A refusal of the first bucket never asks the second; an admitted pair charges both.
    #[test]
    fn a_pair_the_first_refuses_never_asks_the_second() {
        let (time, clock) = manual();
        let tenant = Limiter::new(LimitKind::Tenant, limit(1, 1), clock.clone());
        let account = Limiter::new(LimitKind::Account, limit(1, 2), clock);
        let both = tenant.check_pair(NonZeroU32::MIN, || account.check());
        assert!(matches!(
            both,
            PairDecision::Both {
                first: Decision::Allowed { .. },
                second: Decision::Allowed { remaining: 1, .. }
            }
        ));
        let first_refused = tenant.check_pair(NonZeroU32::MIN, || {
            panic!("the second bucket was asked after the first refused")
        });
        assert_eq!(first_refused, PairDecision::FirstRefused(refused(1)));
        time.advance(Duration::from_secs(1));
        assert!(matches!(
            tenant.check_pair(NonZeroU32::MIN, || account.check()),
            PairDecision::Both {
                second: Decision::Allowed { .. },
                ..
            }
        ));
        assert!(
            matches!(tenant.check(), Decision::Refused { .. }),
            "an admitted pair keeps its charge"
        );
    }

    /// A cost the account can never hold (a by-uuid request against a burst of one)
    /// leaves the tenant uncharged, also from a bucket that was already part used.
    #[test]
    fn a_pair_whose_second_never_fits_charges_neither() {
        let two = NonZeroU32::new(2).expect("two");
        let (_, clock) = manual();
        let tenant = Limiter::new(LimitKind::Tenant, limit(1, 2), clock.clone());
        let account = Limiter::new(LimitKind::Account, limit(1, 1), clock);
        assert!(matches!(tenant.check(), Decision::Allowed { .. }));
        let pair = tenant.check_pair(NonZeroU32::MIN, || account.check_n(two));
        assert!(matches!(
            pair,
            PairDecision::Both {
                second: Decision::Refused { .. },
                ..
            }
        ));
        assert!(
            matches!(tenant.check(), Decision::Allowed { remaining: 0, .. }),
            "the tenant's second cell is still there"
        );
        assert!(matches!(account.check(), Decision::Allowed { .. }));
    }

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        let (time, clock) = manual();
        // One request per second, burst 1: after using it, the wait is a full second.
        let limiter = Limiter::new(LimitKind::Account, limit(1, 1), clock);
        assert!(matches!(limiter.check(), Decision::Allowed { .. }));
        time.advance(Duration::from_millis(100));
        assert_eq!(
            limiter.check(),
            Decision::Refused {
                remaining: 0,
                retry_after_secs: 1
            }
        );
        time.advance(Duration::from_millis(900));
        assert!(matches!(limiter.check(), Decision::Allowed { .. }));
    }

    #[test]
    fn header_values() {
        let (_, clock) = manual();
        let limiter = Limiter::new(LimitKind::Tenant, limit(5, 10), clock);
        assert_eq!(limiter.policy_header(), "\"tenant\";q=10;w=2");
        // `w` rounds up: a burst of 3 at 2 per second refills in 1.5 s.
        let uneven = Limiter::new(LimitKind::Tenant, limit(2, 3), manual().1);
        assert_eq!(uneven.policy_header(), "\"tenant\";q=3;w=2");
        let decision = limiter.check();
        assert_eq!(limiter.state_header(decision), "\"tenant\";r=9;t=0");
        assert_eq!(
            limiter.state_header(Decision::Refused {
                remaining: 0,
                retry_after_secs: 3
            }),
            "\"tenant\";r=0;t=3"
        );
        assert_eq!(
            limiter.state_header(Decision::Refused {
                remaining: 1,
                retry_after_secs: 1
            }),
            "\"tenant\";r=1;t=1"
        );
        // The longest value still fits the stack buffer.
        let account = Limiter::new(LimitKind::Account, limit(5, 10), manual().1);
        let longest = account.state_header(Decision::Allowed {
            remaining: u32::MAX,
            reset_secs: u64::MAX,
        });
        assert_eq!(longest, "\"account\";r=4294967295;t=18446744073709551615");
    }

    #[test]
    fn rebuild_keeps_state_of_unchanged_limits_only() {
        let (_, clock) = manual();
        let first = LimiterSet::rebuild(
            None,
            [("a", limit(1, 1)), ("b", limit(1, 1))],
            [("default", limit(50, 50))],
            &clock,
        );
        assert!(matches!(
            first.tenant("a").expect("a").check(),
            Decision::Allowed { .. }
        ));
        assert!(matches!(
            first.tenant("b").expect("b").check(),
            Decision::Allowed { .. }
        ));
        let second = LimiterSet::rebuild(
            Some(&first),
            [("a", limit(1, 1)), ("b", limit(2, 2))],
            [("default", limit(50, 50))],
            &clock,
        );
        // a kept its exhausted bucket; b changed and starts fresh.
        assert!(matches!(
            second.tenant("a").expect("a").check(),
            Decision::Refused { .. }
        ));
        assert!(matches!(
            second.tenant("b").expect("b").check(),
            Decision::Allowed { .. }
        ));
        assert!(Arc::ptr_eq(
            first.account("default").expect("acct"),
            second.account("default").expect("acct")
        ));
    }
}
