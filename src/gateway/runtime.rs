//! Everything the request path derives from one version of the config: token and SAN
//! directories, tenant policies, account credentials, limiters, the upstream client and
//! the listener's TLS acceptor. Built on start and on every reload, then swapped whole.

use std::sync::Arc;

use foldhash::HashMap;

use tokio_rustls::TlsAcceptor;

use crate::auth::{NamePattern, TokenDirectory};
use crate::config::{
    Config, OnStoreError, RateLimitStoreSettings, RedisStoreSettings, UpstreamSettings,
};
use crate::rate_limit::redis::{RedisLimiter, StoreError};
use crate::rate_limit::{Limiter, LimiterClock, LimiterSet};
use crate::telemetry::CachedSeries;
use crate::tls::CertSan;
use crate::upstream::{AccountCredentials, PlivoClient, UpstreamBuildError};

/// Everything derived from one version of the config; swapped whole on reload.
pub(super) struct Runtime {
    /// Token hash → its tenant's policy, so authentication needs no further lookup.
    pub(super) tokens: TokenDirectory<Arc<TenantPolicy>>,
    /// Client-certificate SAN → its tenant's policy (`client_cert_sans`).
    pub(super) sans: HashMap<CertSan, Arc<TenantPolicy>>,
    /// The data listener's TLS, when `listen_tls` is set; rebuilt from files on reload.
    pub(super) tls: Option<TlsAcceptor>,
    /// By name: what a by-uuid request re-checks once Plivo has told it the MPC's name.
    pub(super) tenants: HashMap<String, Arc<TenantPolicy>>,
    /// Kept for the next reload, which carries over every limiter whose limit is the same.
    limiters: LimiterSet,
    /// Limiter state shared by every replica, when `rate_limit_store.kind` is redis.
    pub(super) shared_limits: Option<SharedLimits>,
    pub(super) upstream: Arc<PlivoClient>,
    /// What `upstream` was built from: a reload keeps it (and its connections) if equal.
    upstream_settings: UpstreamSettings,
}

/// One tenant, resolved at load: the request path needs no further lookup.
pub(super) struct TenantPolicy {
    pub(super) name: Arc<str>,
    pub(super) allow: Vec<NamePattern>,
    pub(super) limiter: Arc<Limiter>,
    pub(super) account: Arc<AccountRuntime>,
    /// Basic username of this tenant on the Plivo-compatible route.
    pub(super) sdk_auth_id: Option<String>,
    /// Where this tenant's ended MPCs are counted.
    pub(super) ended_requests: Arc<CachedSeries>,
}

/// A Plivo account as the tenants that use it share it.
pub(super) struct AccountRuntime {
    pub(super) name: Arc<str>,
    pub(super) credentials: Arc<AccountCredentials>,
    pub(super) limiter: Arc<Limiter>,
}

impl TenantPolicy {
    /// Whether any `allow` pattern matches the MPC's friendly name.
    pub(super) fn may_end(&self, name: &str) -> bool {
        self.allow.iter().any(|pattern| pattern.matches(name))
    }
}

/// Why a config could not be turned into a runtime (a config that passed validation can
/// still fail here, e.g. a TLS library refusal).
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// Validation makes this impossible; the check keeps a runtime from ever lacking it.
    #[error("{0}: names an account or has a limit that was not built")]
    Unresolved(String),
    #[error("{0}")]
    Upstream(#[from] UpstreamBuildError),
    #[error("rate_limit_store: {0}")]
    RateLimitStore(#[from] StoreError),
}

/// The Redis store and what to do when it fails.
#[derive(Clone)]
pub(super) struct SharedLimits {
    pub(super) store: RedisLimiter,
    pub(super) on_error: OnStoreError,
    settings: RedisStoreSettings,
}

impl SharedLimits {
    /// Keeps the previous store (and its connection) when its settings did not change.
    fn build(
        settings: &RateLimitStoreSettings,
        previous: Option<&SharedLimits>,
    ) -> Result<Option<SharedLimits>, BuildError> {
        let RateLimitStoreSettings::Redis(settings) = settings else {
            return Ok(None);
        };
        if let Some(old) = previous.filter(|old| old.settings == *settings) {
            return Ok(Some(old.clone()));
        }
        let store = RedisLimiter::new(settings)?;
        Ok(Some(SharedLimits {
            store,
            on_error: settings.on_error,
            settings: settings.clone(),
        }))
    }
}

impl Runtime {
    pub(super) fn build(
        config: &Config,
        previous: Option<&Runtime>,
        clock: &LimiterClock,
    ) -> Result<Runtime, BuildError> {
        let limiters = LimiterSet::rebuild(
            previous.map(|runtime| &runtime.limiters),
            config
                .tenants
                .iter()
                .map(|(n, t)| (n.as_str(), t.rate_limit)),
            config
                .accounts
                .iter()
                .map(|(n, a)| (n.as_str(), a.rate_limit)),
            clock,
        );
        let mut accounts = HashMap::default();
        for (name, account) in &config.accounts {
            let unresolved = || BuildError::Unresolved(format!("accounts.{name}"));
            let shared: Arc<str> = Arc::from(name.as_str());
            let runtime = AccountRuntime {
                credentials: Arc::new(AccountCredentials::new(Arc::clone(&shared), account)),
                name: shared,
                limiter: Arc::clone(limiters.account(name).ok_or_else(unresolved)?),
            };
            accounts.insert(name.as_str(), Arc::new(runtime));
        }
        let mut tokens = TokenDirectory::default();
        let mut sans = HashMap::default();
        let mut tenants = HashMap::default();
        for (name, tenant) in &config.tenants {
            let unresolved = || BuildError::Unresolved(format!("tenants.{name}"));
            let policy = Arc::new(TenantPolicy {
                name: Arc::from(name.as_str()),
                allow: tenant.allow.clone(),
                limiter: Arc::clone(limiters.tenant(name).ok_or_else(unresolved)?),
                account: Arc::clone(
                    accounts
                        .get(tenant.account.as_str())
                        .ok_or_else(unresolved)?,
                ),
                sdk_auth_id: tenant.sdk_auth_id.clone(),
                ended_requests: Arc::default(),
            });
            for hash in &tenant.tokens {
                tokens.insert(*hash, Arc::clone(&policy));
            }
            for san in &tenant.client_cert_sans {
                sans.insert(san.clone(), Arc::clone(&policy));
            }
            tenants.insert(name.clone(), policy);
        }
        let shared_limits = SharedLimits::build(
            &config.rate_limit_store,
            previous.and_then(|runtime| runtime.shared_limits.as_ref()),
        )?;
        let upstream = match previous {
            Some(old) if old.upstream_settings == config.upstream => Arc::clone(&old.upstream),
            _ => Arc::new(PlivoClient::new(&config.upstream)?),
        };
        Ok(Runtime {
            tokens,
            sans,
            tls: config
                .listen_tls
                .as_ref()
                .map(|tls| TlsAcceptor::from(Arc::clone(&tls.server_config))),
            tenants,
            limiters,
            upstream,
            upstream_settings: config.upstream.clone(),
            shared_limits,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn every_tenant_is_resolved_at_load_or_the_load_fails() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = crate::config::for_tests(dir.path(), "");
        let clock = LimiterClock::monotonic();
        let runtime = Runtime::build(&config, None, &clock).expect("a valid config builds");
        let billing = runtime.tenants.get("billing").expect("billing");
        assert_eq!(&*billing.account.name, "default");
        assert!(Arc::ptr_eq(
            &billing.limiter,
            runtime.limiters.tenant("billing").expect("limiter")
        ));

        // Only a config that skipped validation can name a missing account.
        let tenant = config.tenants.get_mut("billing").expect("billing");
        tenant.account = "missing".into();
        let refused = Runtime::build(&config, Some(&runtime), &clock).err();
        assert!(
            matches!(&refused, Some(BuildError::Unresolved(key)) if key == "tenants.billing"),
            "{refused:?}"
        );
    }
}
