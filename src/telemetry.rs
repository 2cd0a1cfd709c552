//! Operational telemetry: the tracing subscriber (JSON or pretty, to stderr) and the
//! Prometheus metrics served on the admin listener. The audit log is not telemetry and
//! lives in [`crate::audit`].

use std::fmt::Write as _;
use std::sync::atomic::AtomicI64;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabelSet, EncodeLabelValue, EncodeMetric as _, LabelValueEncoder,
};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;
use tracing_subscriber::filter::{LevelFilter, ParseError, Targets};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

use crate::audit::RotationFailures;
use crate::config::raw::LogFormat;
use crate::config::LogSettings;
use crate::server::Rejection;

/// Parses `log.level` (or `RUST_LOG`): a level, or comma-separated `target=level`
/// directives with an optional default level (`warn,mpc_gateway::server=info`).
///
/// Filtering by target only, not by span or field, keeps regex compilation out of
/// start-up: `EnvFilter`'s directive parser compiled several, which cost idle memory.
/// Only ASCII is accepted (levels and targets are ASCII; tracing-subscriber 0.3.23's
/// parsers have panicked on multi-byte text).
pub fn parse_log_filter(filter: &str) -> Result<Targets, LogFilterError> {
    if !filter.is_ascii() {
        return Err(LogFilterError::NotAscii);
    }
    for directive in filter.split(',').map(str::trim) {
        check_directive(directive)?;
    }
    filter.parse().map_err(LogFilterError::Invalid)
}

/// Refuses what `Targets` would accept but not apply as written.
fn check_directive(directive: &str) -> Result<(), LogFilterError> {
    // `Targets` would take `[span]` or `{field}` for a target name that matches nothing;
    // say so instead of silently logging less than asked.
    let target = directive.split('=').next().unwrap_or_default().trim();
    if !target.chars().all(is_target_char) {
        return Err(LogFilterError::NotATarget(target.to_owned()));
    }
    // `Targets` reads a bare word as a target to enable at every level, so a misspelt
    // level (`warning`) would silently turn every other log line off.
    if !directive.is_empty() && !directive.contains('=') && !is_level(directive) {
        return Err(LogFilterError::NotALevel(directive.to_owned()));
    }
    Ok(())
}

/// The levels a directive without `=` may name.
fn is_level(word: &str) -> bool {
    ["trace", "debug", "info", "warn", "error", "off"]
        .iter()
        .any(|level| word.eq_ignore_ascii_case(level))
}

/// What a module path (`mpc_gateway::server`) or a custom target (`audit.verify`) holds.
fn is_target_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | ':' | '-' | '.')
}

/// Why a log filter was refused.
#[derive(Debug, thiserror::Error)]
pub enum LogFilterError {
    #[error("must be ASCII")]
    NotAscii,
    #[error("{0:?} is not a target: only levels and target=level directives are supported")]
    NotATarget(String),
    #[error("{0:?} is not a level (trace, debug, info, warn, error or off); a target takes one: target=level")]
    NotALevel(String),
    #[error("{0}")]
    Invalid(ParseError),
}

/// Installs the global subscriber. `RUST_LOG`, when set and valid, overrides `log.level`.
pub fn init_tracing(settings: &LogSettings) {
    let from_env = std::env::var("RUST_LOG")
        .ok()
        .map(|filter| parse_log_filter(&filter));
    let (from_env, env_error) = match from_env {
        Some(Ok(filter)) => (Some(filter), None),
        Some(Err(err)) => (None, Some(err)),
        None => (None, None),
    };
    let filter = from_env
        .or_else(|| parse_log_filter(&settings.level).ok())
        .unwrap_or_else(|| Targets::new().with_default(LevelFilter::INFO));
    // Colours only for a person at a terminal: a file or the journal would keep the
    // escape codes as text.
    let layer = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let registry = tracing_subscriber::registry().with(filter);
    // A second init (tests, demo) keeps the first subscriber; that is fine.
    let _ = match settings.format {
        LogFormat::Json => registry.with(layer.json().flatten_event(true)).try_init(),
        LogFormat::Pretty => registry.with(layer).try_init(),
    };
    if let Some(err) = env_error {
        tracing::warn!(error = %err, "RUST_LOG ignored, log.level applies");
    }
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
struct ListenerLabels {
    listener: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
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
    audit_rotation_failures: AuditRotationFailures,
    reloads: Family<ResultLabels, Counter>,
    /// 1 until a reload fails, 0 from then until one succeeds: "the process runs an
    /// older config than its file" as one series to alert on.
    last_reload_successful: Gauge<i64, AtomicI64>,
    /// 1 while the config last applied differs from the running one in settings that
    /// take effect only after a restart.
    restart_pending: Gauge<i64, AtomicI64>,
    http_rejected: Family<KindLabels, Counter>,
    open_connections: Gauge<i64, AtomicI64>,
    store_errors: Counter,
    /// A family rather than a gauge: without `listen_tls` there is no series at all, where
    /// a gauge would read 0, a certificate that expired in 1970.
    certificate_expiry: Family<ListenerLabels, Gauge<i64, AtomicI64>>,
    /// The `tenant` label of requests refused before authentication.
    no_tenant: Arc<str>,
    /// The series of Plivo's answer to every MPC ended.
    upstream_no_content: CachedSeries,
}

/// `mpc_gateway_audit_rotation_failures_total`, read at each scrape from the audit log's
/// own count (see [`Metrics::count_audit_rotation_failures`]); 0 until a log is given.
/// The writer counts on its own thread and knows nothing of metrics.
#[derive(Debug, Clone, Default)]
struct AuditRotationFailures(Arc<OnceLock<RotationFailures>>);

impl Collector for AuditRotationFailures {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let count = ConstCounter::new(self.0.get().map_or(0, RotationFailures::get));
        let metric = encoder.encode_descriptor(
            "mpc_gateway_audit_rotation_failures",
            "Audit log rotations that failed (retried after each write; records are still written, to the file that did not rotate)",
            None,
            count.metric_type(),
        )?;
        count.encode(metric)
    }
}

/// Plivo's status for an MPC ended.
const NO_CONTENT: u16 = 204;

/// The `reason` of a request whose MPC was ended (the others carry a problem slug).
pub const ENDED: &str = "ended";

/// A counter series of a `Family`, resolved on its first count and from then on counted
/// without the lookup `Family` makes on every call (a hash of the labels, under a lock):
/// for the outcomes of nearly every request. It still appears only once counted, like
/// every other series.
#[derive(Debug, Default)]
pub struct CachedSeries(OnceLock<Counter>);

impl CachedSeries {
    /// Counts one; `resolve` finds the series the first time.
    fn inc(&self, resolve: impl FnOnce() -> Counter) {
        self.0.get_or_init(resolve).inc();
    }
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
        let audit_rotation_failures = AuditRotationFailures::default();
        let reloads = Family::<ResultLabels, Counter>::default();
        let last_reload_successful = Gauge::<i64, AtomicI64>::default();
        last_reload_successful.set(1);
        let restart_pending = Gauge::<i64, AtomicI64>::default();
        let http_rejected = Family::<KindLabels, Counter>::default();
        let open_connections = Gauge::<i64, AtomicI64>::default();
        let store_errors = Counter::default();
        let certificate_expiry = Family::<ListenerLabels, Gauge<i64, AtomicI64>>::default();
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
            "Requests sent to Plivo, every attempt and by-uuid lookup included, by Plivo's status (error when no answer came)",
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
        registry.register_collector(Box::new(audit_rotation_failures.clone()));
        registry.register(
            "mpc_gateway_config_reloads",
            "Config reloads, by result",
            reloads.clone(),
        );
        registry.register(
            "mpc_gateway_config_last_reload_successful",
            "1 unless the last config reload failed (the process then runs the config it had before)",
            last_reload_successful.clone(),
        );
        registry.register(
            "mpc_gateway_config_restart_pending",
            "1 when the config last loaded changed settings that take effect only after a restart (listen, admin_listen, worker_threads, shutdown_grace, log.*, audit.*)",
            restart_pending.clone(),
        );
        registry.register(
            "mpc_gateway_http_rejected",
            "Data connections that ended in the HTTP layer on an error or a timeout, by kind: a request head refused (too-large, malformed) or not sent in time (header-timeout), a failed TLS handshake (tls-handshake), a kept-alive connection gone silent (idle-timeout), a failed connection (io, other); and HTTP/2 streams refused because the process had as many in progress as it takes (streams-exhausted)",
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
        // Which build runs where, for a fleet of sidecars: `mpc_gateway_build_info`.
        registry.register(
            "mpc_gateway_build",
            "The running build",
            Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]),
        );
        registry.register(
            "mpc_gateway_tls_certificate_expiry_timestamp_seconds",
            "When the data listener's TLS certificate chain expires (its earliest certificate), in Unix time (only with listen_tls)",
            certificate_expiry.clone(),
        );
        // Every result from the start: an alert on `increase(...{result="error"}[5m])`
        // sees the first failure only if the series existed, at 0, before it.
        for result in ["ok", "error"] {
            drop(reloads.get_or_create(&ResultLabels {
                result: result.to_owned(),
            }));
        }
        Metrics {
            store_errors,
            certificate_expiry,
            no_tenant: Arc::from(""),
            upstream_no_content: CachedSeries::default(),
            registry,
            requests,
            duration,
            upstream,
            rate_limited,
            audit_failures,
            audit_rotation_failures,
            reloads,
            last_reload_successful,
            restart_pending,
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

    /// [`request_finished`](Self::request_finished) for an MPC ended, through `series`,
    /// the tenant's own handle to it (one per tenant and config version).
    pub fn request_ended(&self, series: &CachedSeries, tenant: &Arc<str>, elapsed: Duration) {
        series.inc(|| {
            self.requests
                .get_or_create(&RequestLabels {
                    tenant: Tenant(Arc::clone(tenant)),
                    reason: ENDED,
                })
                .clone()
        });
        self.duration.observe(elapsed.as_secs_f64());
    }

    pub fn upstream_answer(&self, status: Option<u16>) {
        let series = || {
            self.upstream.get_or_create(&UpstreamLabels {
                status: UpstreamStatus(status),
            })
        };
        if status == Some(NO_CONTENT) {
            self.upstream_no_content.inc(|| series().clone());
        } else {
            series().inc();
        }
    }

    pub fn rate_limited(&self, tenant: Option<&Arc<str>>, limit: &'static str) {
        self.rate_limited
            .get_or_create(&LimitLabels {
                tenant: Tenant(Arc::clone(tenant.unwrap_or(&self.no_tenant))),
                limit,
            })
            .inc();
    }

    /// Creates a configured tenant's rate-limit series at 0 (see the reload series in
    /// [`Metrics::new`] for why); called at start and on every reload.
    pub fn declare_tenant(&self, tenant: &str) {
        for limit in ["tenant", "account"] {
            drop(self.rate_limited.get_or_create(&LimitLabels {
                tenant: Tenant(Arc::from(tenant)),
                limit,
            }));
        }
    }

    pub fn rate_limit_store_error(&self) {
        self.store_errors.inc();
    }

    /// The data listener's certificate (as loaded at start or by the last reload)
    /// expires at `unix_seconds`.
    pub fn listener_certificate_expires_at(&self, unix_seconds: i64) {
        self.certificate_expiry
            .get_or_create(&ListenerLabels { listener: "data" })
            .set(unix_seconds);
    }

    pub fn audit_failure(&self) {
        self.audit_failures.inc();
    }

    /// Exports `failures`, the audit log's count of failed rotations. One audit log per
    /// process: a second call keeps the first.
    pub fn count_audit_rotation_failures(&self, failures: RotationFailures) {
        let _ = self.audit_rotation_failures.0.set(failures);
    }

    pub fn config_reload(&self, ok: bool) {
        let result = if ok { "ok" } else { "error" }.to_owned();
        self.reloads.get_or_create(&ResultLabels { result }).inc();
        self.last_reload_successful.set(i64::from(ok));
    }

    /// Whether the config just applied leaves settings waiting for a restart.
    pub fn config_restart_pending(&self, pending: bool) {
        self.restart_pending.set(i64::from(pending));
    }

    /// A data connection the HTTP layer ended on an error or a timeout.
    pub fn http_rejected(&self, rejection: Rejection) {
        self.http_rejected
            .get_or_create(&KindLabels {
                kind: rejection.as_str(),
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

    /// OpenMetrics text, what Prometheus asks for first.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// The classic Prometheus text format (0.0.4), for scrapers and tools that ask for
    /// nothing else (curl, promtool, older agents).
    pub fn encode_prometheus_text(&self) -> String {
        openmetrics_to_prometheus_text(&self.encode())
    }
}

/// Rewrites OpenMetrics text as Prometheus text 0.0.4. The samples are the same; the
/// metadata differs: a counter family is named with its `_total` suffix, an info family
/// becomes a gauge named `<name>_info`, `unknown` is `untyped`, and there are no `# UNIT`
/// lines and no `# EOF`.
fn openmetrics_to_prometheus_text(openmetrics: &str) -> String {
    let renamed: std::collections::HashMap<&str, (String, &str)> = openmetrics
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.split_once(' '))
        .filter_map(|(family, kind)| match kind {
            "counter" => Some((family, (format!("{family}_total"), "counter"))),
            "info" => Some((family, (format!("{family}_info"), "gauge"))),
            "unknown" => Some((family, (family.to_owned(), "untyped"))),
            _ => None,
        })
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        match renamed_metadata(line, &renamed) {
            Some(rewritten) => out.push_str(&rewritten),
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

/// A `# HELP` or `# TYPE` line of a family that [`openmetrics_to_prometheus_text`]
/// renames, under its new name (and, for `# TYPE`, its new type).
fn renamed_metadata(
    line: &str,
    renamed: &std::collections::HashMap<&str, (String, &str)>,
) -> Option<String> {
    let (prefix, rest) = ["# HELP ", "# TYPE "]
        .into_iter()
        .find_map(|prefix| Some((prefix, line.strip_prefix(prefix)?)))?;
    let (family, tail) = rest.split_once(' ')?;
    let (name, kind) = renamed.get(family)?;
    let tail = if prefix == "# TYPE " { kind } else { tail };
    Some(format!("{prefix}{name} {tail}"))
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
    use tracing::Level;

    #[test]
    fn openmetrics_becomes_prometheus_text() {
        let openmetrics = "# HELP mpc_gateway_requests Requests answered.\n\
# TYPE mpc_gateway_requests counter\n\
mpc_gateway_requests_total{tenant=\"a\",reason=\"ended\"} 3\n\
# HELP mpc_gateway_open_connections Open connections.\n\
# TYPE mpc_gateway_open_connections gauge\n\
mpc_gateway_open_connections 2\n\
# HELP mpc_gateway_build The running build.\n\
# TYPE mpc_gateway_build info\n\
mpc_gateway_build_info{version=\"0.1.0\"} 1\n\
# HELP mpc_gateway_wait Seconds waited.\n\
# TYPE mpc_gateway_wait histogram\n\
# UNIT mpc_gateway_wait seconds\n\
mpc_gateway_wait_sum 0.5\n\
mpc_gateway_wait_count 1\n\
mpc_gateway_wait_bucket{le=\"+Inf\"} 1\n\
# EOF\n";
        let expected = "# HELP mpc_gateway_requests_total Requests answered.\n\
# TYPE mpc_gateway_requests_total counter\n\
mpc_gateway_requests_total{tenant=\"a\",reason=\"ended\"} 3\n\
# HELP mpc_gateway_open_connections Open connections.\n\
# TYPE mpc_gateway_open_connections gauge\n\
mpc_gateway_open_connections 2\n\
# HELP mpc_gateway_build_info The running build.\n\
# TYPE mpc_gateway_build_info gauge\n\
mpc_gateway_build_info{version=\"0.1.0\"} 1\n\
# HELP mpc_gateway_wait Seconds waited.\n\
# TYPE mpc_gateway_wait histogram\n\
mpc_gateway_wait_sum 0.5\n\
mpc_gateway_wait_count 1\n\
mpc_gateway_wait_bucket{le=\"+Inf\"} 1\n";
        assert_eq!(openmetrics_to_prometheus_text(openmetrics), expected);
    }

    #[test]
    fn log_filter_takes_a_level_or_target_directives() {
        let filter = parse_log_filter("warn,mpc_gateway::server=info").expect("valid");
        assert!(filter.would_enable("mpc_gateway::server", &Level::INFO));
        assert!(!filter.would_enable("mpc_gateway::server", &Level::DEBUG));
        assert!(!filter.would_enable("mpc_gateway::upstream", &Level::INFO));
        assert!(filter.would_enable("hyper", &Level::WARN));

        let debug = parse_log_filter("debug").expect("valid");
        assert!(debug.would_enable("anything", &Level::DEBUG));
        assert!(!debug.would_enable("anything", &Level::TRACE));

        parse_log_filter("INFO").expect("a level in capitals");
        let off = parse_log_filter("off").expect("valid");
        assert!(!off.would_enable("anything", &Level::ERROR));
    }

    #[test]
    fn log_filter_refuses_what_it_cannot_apply() {
        for bad in [
            "info,mpc_gateway=loud",
            "info,[span]=debug",
            "info,mpc_gateway[conn{peer}]=debug",
            "info, é=debug",
            "warning",
            "verbose",
            "info,mpc_gateway",
        ] {
            assert!(parse_log_filter(bad).is_err(), "{bad:?} accepted");
        }
        assert!(matches!(
            parse_log_filter("ünïcode"),
            Err(LogFilterError::NotAscii)
        ));
        assert!(matches!(
            parse_log_filter("info,[span]=debug"),
            Err(LogFilterError::NotATarget(target)) if target == "[span]"
        ));
    }

    #[test]
    fn alerting_series_exist_at_zero_before_their_first_event() {
        let metrics = Metrics::new();
        metrics.declare_tenant("billing");
        let text = metrics.encode();
        for series in [
            "mpc_gateway_config_reloads_total{result=\"ok\"}",
            "mpc_gateway_config_reloads_total{result=\"error\"}",
            "mpc_gateway_rate_limited_total{tenant=\"billing\",limit=\"tenant\"}",
            "mpc_gateway_rate_limited_total{tenant=\"billing\",limit=\"account\"}",
        ] {
            assert_eq!(sample(&text, series), Some(0.0), "{series} in\n{text}");
        }
        assert_eq!(
            sample(&text, "mpc_gateway_config_last_reload_successful"),
            Some(1.0),
            "no reload has failed"
        );
        assert_eq!(
            sample(&text, "mpc_gateway_config_restart_pending"),
            Some(0.0)
        );
        metrics.config_reload(false);
        let text = metrics.encode();
        assert_eq!(
            sample(&text, "mpc_gateway_config_reloads_total{result=\"error\"}"),
            Some(1.0)
        );
        assert_eq!(
            sample(&text, "mpc_gateway_config_last_reload_successful"),
            Some(0.0)
        );
        metrics.config_reload(true);
        assert_eq!(
            sample(
                &metrics.encode(),
                "mpc_gateway_config_last_reload_successful"
            ),
            Some(1.0)
        );
    }

    /// No series without `listen_tls`: a gauge at 0 would be a certificate expired in 1970.
    #[test]
    fn the_certificate_expiry_exists_only_once_a_certificate_is_loaded() {
        let series = "mpc_gateway_tls_certificate_expiry_timestamp_seconds{listener=\"data\"}";
        let metrics = Metrics::new();
        assert_eq!(sample(&metrics.encode(), series), None);
        metrics.listener_certificate_expires_at(1_900_000_000);
        assert_eq!(sample(&metrics.encode(), series), Some(1_900_000_000.0));
    }

    /// Plivo's 204 is counted through a cached handle: into the family's own series,
    /// which appears with the first call, as any other status's does.
    #[test]
    fn ended_calls_count_into_the_family_series() {
        let series = "mpc_gateway_upstream_requests_total{status=\"204\"}";
        let metrics = Metrics::new();
        assert_eq!(sample(&metrics.encode(), series), None);
        for _ in 0..3 {
            metrics.upstream_answer(Some(204));
        }
        metrics.upstream_answer(Some(404));
        let text = metrics.encode();
        assert_eq!(sample(&text, series), Some(3.0));
        assert_eq!(
            sample(&text, "mpc_gateway_upstream_requests_total{status=\"404\"}"),
            Some(1.0)
        );
    }

    /// A tenant's ended MPCs are counted through its handle into the family's own series,
    /// which appears with the first of them; a handle made anew (a reload) continues it,
    /// as does a count by label.
    #[test]
    fn ended_requests_count_into_the_tenants_series() {
        let series = "mpc_gateway_requests_total{tenant=\"billing\",reason=\"ended\"}";
        let metrics = Metrics::new();
        let billing: Arc<str> = Arc::from("billing");
        let before_reload = CachedSeries::default();
        assert_eq!(sample(&metrics.encode(), series), None);
        metrics.request_ended(&before_reload, &billing, Duration::from_millis(1));
        metrics.request_ended(&before_reload, &billing, Duration::from_millis(1));
        assert_eq!(sample(&metrics.encode(), series), Some(2.0));
        let after_reload = CachedSeries::default();
        metrics.request_ended(&after_reload, &billing, Duration::from_millis(1));
        metrics.request_finished(Some(&billing), ENDED, Duration::from_millis(1));
        let text = metrics.encode();
        assert_eq!(sample(&text, series), Some(4.0));
        assert_eq!(
            sample(&text, "mpc_gateway_request_duration_seconds_count"),
            Some(4.0)
        );
    }

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
        metrics.http_rejected(Rejection::IdleTimeout);
        let text = metrics.encode();
        for name in [
            "mpc_gateway_requests_total{tenant=\"billing\",reason=\"ended\"} 1",
            "mpc_gateway_requests_total{tenant=\"\",reason=\"unauthenticated\"} 1",
            "mpc_gateway_request_duration_seconds_count 2",
            "mpc_gateway_upstream_requests_total{status=\"204\"} 1",
            "mpc_gateway_upstream_requests_total{status=\"error\"} 1",
            "mpc_gateway_rate_limited_total{tenant=\"billing\",limit=\"tenant\"} 1",
            "mpc_gateway_audit_failures_total 1",
            "mpc_gateway_audit_rotation_failures_total 0",
            "mpc_gateway_config_reloads_total{result=\"ok\"} 1",
            "mpc_gateway_http_rejected_total{kind=\"idle-timeout\"} 1",
            concat!(
                "mpc_gateway_build_info{version=\"",
                env!("CARGO_PKG_VERSION"),
                "\"} 1"
            ),
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
