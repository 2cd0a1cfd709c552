//! Operational telemetry: the tracing subscriber (JSON or pretty, to stderr) and the
//! Prometheus metrics served on the admin listener. The audit log is not telemetry and
//! lives in [`crate::audit`].

use std::fmt::Write as _;
use std::sync::atomic::AtomicI64;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tracing_subscriber::EnvFilter;

use crate::config::raw::LogFormat;
use crate::config::LogSettings;

/// Installs the global subscriber. `RUST_LOG`, when set, overrides `log.level`.
pub fn init_tracing(settings: &LogSettings) {
    // tracing-subscriber 0.3 can panic on non-ASCII filters; levels and targets are ASCII,
    // so anything else in RUST_LOG is ignored (log.level was already checked by config).
    let from_env = std::env::var("RUST_LOG")
        .ok()
        .filter(|filter| filter.is_ascii())
        .and_then(|filter| EnvFilter::try_new(filter).ok());
    let filter = from_env
        .or_else(|| EnvFilter::try_new(&settings.level).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // A second init (tests, demo) keeps the first subscriber; that is fine.
    let _ = match settings.format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Pretty => builder.try_init(),
    };
}

// Label values on the request path are shared or static, so counting a request allocates
// nothing once its series exists.

/// A tenant name shared with the config (prometheus-client encodes only sized `Arc`s).
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct Tenant(Arc<str>);

impl EncodeLabelValue for Tenant {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> std::fmt::Result {
        encoder.write_str(&self.0)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    tenant: Tenant,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpstreamLabels {
    status: UpstreamStatus,
}

/// Plivo's final status, or `error` when no answer came.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
struct UpstreamStatus(Option<u16>);

impl EncodeLabelValue for UpstreamStatus {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> std::fmt::Result {
        match self.0 {
            Some(status) => write!(encoder, "{status}"),
            None => encoder.write_str("error"),
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LimitLabels {
    tenant: Tenant,
    limit: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: String,
}

/// Every metric the gateway exports. Label values are bounded: tenants come from config
/// (empty before authentication), reasons are problem slugs.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    duration: Histogram,
    upstream: Family<UpstreamLabels, Counter>,
    rate_limited: Family<LimitLabels, Counter>,
    audit_failures: Counter,
    reloads: Family<ResultLabels, Counter>,
    http_rejected: Family<KindLabels, Counter>,
    open_connections: Gauge<i64, AtomicI64>,
    store_errors: Counter,
    /// The `tenant` label of requests refused before authentication.
    no_tenant: Arc<str>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        let duration = Histogram::new(exponential_buckets(0.000_25, 2.0, 16));
        let upstream = Family::<UpstreamLabels, Counter>::default();
        let rate_limited = Family::<LimitLabels, Counter>::default();
        let audit_failures = Counter::default();
        let reloads = Family::<ResultLabels, Counter>::default();
        let http_rejected = Family::<KindLabels, Counter>::default();
        let open_connections = Gauge::<i64, AtomicI64>::default();
        let store_errors = Counter::default();
        registry.register(
            "mpc_gateway_requests",
            "Requests answered, by tenant and reason (problem slug or ended)",
            requests.clone(),
        );
        registry.register(
            "mpc_gateway_request_duration_seconds",
            "Time from request to reply",
            duration.clone(),
        );
        registry.register(
            "mpc_gateway_upstream_requests",
            "Calls to Plivo, by Plivo's final status (error when no answer came)",
            upstream.clone(),
        );
        registry.register(
            "mpc_gateway_rate_limited",
            "Requests refused by a rate limit, by tenant and limit",
            rate_limited.clone(),
        );
        registry.register(
            "mpc_gateway_audit_failures",
            "Audit records that could not be written",
            audit_failures.clone(),
        );
        registry.register(
            "mpc_gateway_config_reloads",
            "Config reloads, by result",
            reloads.clone(),
        );
        registry.register(
            "mpc_gateway_http_rejected",
            "Connections the HTTP layer refused before a request was parsed, by kind",
            http_rejected.clone(),
        );
        registry.register(
            "mpc_gateway_open_connections",
            "Open data-listener connections",
            open_connections.clone(),
        );
        registry.register(
            "mpc_gateway_rate_limit_store_errors",
            "Shared rate-limit store calls that failed or were slower than their timeout",
            store_errors.clone(),
        );
        Metrics {
            store_errors,
            no_tenant: Arc::from(""),
            registry,
            requests,
            duration,
            upstream,
            rate_limited,
            audit_failures,
            reloads,
            http_rejected,
            open_connections,
        }
    }

    pub fn request_finished(
        &self,
        tenant: Option<&Arc<str>>,
        reason: &'static str,
        elapsed: Duration,
    ) {
        self.requests
            .get_or_create(&RequestLabels {
                tenant: Tenant(Arc::clone(tenant.unwrap_or(&self.no_tenant))),
                reason,
            })
            .inc();
        self.duration.observe(elapsed.as_secs_f64());
    }

    pub fn upstream_answer(&self, status: Option<u16>) {
        self.upstream
            .get_or_create(&UpstreamLabels {
                status: UpstreamStatus(status),
            })
            .inc();
    }

    pub fn rate_limited(&self, tenant: Option<&Arc<str>>, limit: &'static str) {
        self.rate_limited
            .get_or_create(&LimitLabels {
                tenant: Tenant(Arc::clone(tenant.unwrap_or(&self.no_tenant))),
                limit,
            })
            .inc();
    }

    pub fn rate_limit_store_error(&self) {
        self.store_errors.inc();
    }

    pub fn audit_failure(&self) {
        self.audit_failures.inc();
    }

    pub fn config_reload(&self, ok: bool) {
        let result = if ok { "ok" } else { "error" }.to_owned();
        self.reloads.get_or_create(&ResultLabels { result }).inc();
    }

    pub fn http_rejected(&self, kind: &str) {
        self.http_rejected
            .get_or_create(&KindLabels {
                kind: kind.to_owned(),
            })
            .inc();
    }

    pub fn connection_opened(&self) {
        self.open_connections.inc();
    }

    pub fn connection_closed(&self) {
        self.open_connections.dec();
    }

    /// The current value of `mpc_gateway_open_connections`.
    pub fn open_connections(&self) -> i64 {
        self.open_connections.get()
    }

    /// Prometheus text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Reads the current count of one labelled series from the exposition text; for tests
/// and the benchmark.
pub fn sample(exposition: &str, series: &str) -> Option<f64> {
    exposition.lines().find_map(|line| {
        let rest = line.strip_prefix(series)?;
        rest.strip_prefix(' ')?.trim().parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exports_the_contract_metric_names() {
        let metrics = Metrics::new();
        let billing = Arc::from("billing");
        metrics.request_finished(Some(&billing), "ended", Duration::from_millis(3));
        metrics.request_finished(None, "unauthenticated", Duration::from_millis(1));
        metrics.upstream_answer(Some(204));
        metrics.upstream_answer(None);
        metrics.rate_limited(Some(&billing), "tenant");
        metrics.audit_failure();
        metrics.config_reload(true);
        let text = metrics.encode();
        for name in [
            "mpc_gateway_requests_total{tenant=\"billing\",reason=\"ended\"} 1",
            "mpc_gateway_requests_total{tenant=\"\",reason=\"unauthenticated\"} 1",
            "mpc_gateway_request_duration_seconds_count 2",
            "mpc_gateway_upstream_requests_total{status=\"204\"} 1",
            "mpc_gateway_upstream_requests_total{status=\"error\"} 1",
            "mpc_gateway_rate_limited_total{tenant=\"billing\",limit=\"tenant\"} 1",
            "mpc_gateway_audit_failures_total 1",
            "mpc_gateway_config_reloads_total{result=\"ok\"} 1",
        ] {
            assert!(text.contains(name), "missing {name} in\n{text}");
        }
        assert_eq!(
            sample(
                &text,
                "mpc_gateway_requests_total{tenant=\"billing\",reason=\"ended\"}"
            ),
            Some(1.0)
        );
    }
}
