//! The request path, in contract order:
//!
//! ```text
//! drain ─▶ framing (400/414/431) ─▶ route (404/405) ─▶ body size (413)
//!   ─▶ authenticate (401) ─▶ name or uuid (400) ─▶ authorize (403) ─▶ tenant limit (429)
//!   ─▶ account limit (429) ─▶ audit "forward" (503) ─▶ upstream ─▶ audit "result"
//! ```
//!
//! By uuid the name is only known from Plivo, so authorization moves after the lookup:
//! `… uuid (400) ─▶ limits (the account counts twice) ─▶ forward ─▶ GET ─▶ authorize (403)
//! ─▶ DELETE ─▶ result`.
//!
//! The first check that fails decides the reply; every request ends with exactly one
//! terminal audit record (`denied` or `result`). `Gateway::admit` holds the checks,
//! [`Gateway::handle`] the audit and upstream steps around them.

mod forwarded;
mod identify;
mod runtime;
mod trail;

use std::borrow::Cow;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{CONTENT_LENGTH, TRANSFER_ENCODING};
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use crate::audit::{AuditError, AuditLog, EventKind};
use crate::config::{Config, OnStoreError, BY_UUID_CALLS};
use crate::millis::{CountingThrottle, Throttle};
use crate::mpc_name::{InvalidMpcName, InvalidMpcUuid, MpcName, MpcUuid};
use crate::problem::Problem;
use crate::rate_limit::redis::{Bucket, StoreError};
use crate::rate_limit::{
    Decision, LimitKind, Limiter, LimiterClock, PairDecision, RATELIMIT, RATELIMIT_POLICY,
};
use crate::request_id::X_REQUEST_ID;
use crate::routes::{route, Route, Target};
use crate::telemetry::{Metrics, ENDED};
use crate::tls::{ClientCertificate, ClientTrust};
use crate::upstream::{AccountCredentials, Lookup, MpcRef, UpstreamReport};
use forwarded::{Forwarded, Ticket};
pub use runtime::BuildError;
use runtime::{Runtime, SharedLimits, TenantPolicy};
use trail::Trail;

/// What a request costs a limiter: one cell, or [`BY_UUID_CALLS`] for a by-uuid request.
const ONE_CELL: NonZeroU32 = NonZeroU32::MIN;

/// Bodies are ignored, but a caller may not make the gateway buffer more than this.
pub const MAX_BODY_BYTES: usize = 4 * 1024;

/// How long a request's body may take to arrive once its head has: the header timeout's
/// counterpart, so a caller that declares a body and never sends it cannot hold a
/// connection (or, over HTTP/2, a stream) open before it is even authenticated.
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(10);

pub const MAX_REQUEST_LINE_BYTES: usize = 8 * 1024;
pub const MAX_HEADER_BLOCK_BYTES: usize = 32 * 1024;
/// Header fields a request may carry: more is `431`, as a block over
/// [`MAX_HEADER_BLOCK_BYTES`] is.
pub const MAX_HEADER_FIELDS: usize = 100;

/// What the server knows of the connection a request came on, made once per connection
/// and handed to [`Gateway::handle`] with each of its requests. The address's text (the
/// audit record's `client`) is made here once: formatting an address costs more than the
/// rest of the record's fields together.
#[derive(Debug)]
pub struct Peer {
    client: Arc<str>,
    certificate: Option<ClientCertificate>,
}

impl Peer {
    /// `certificate`: the client certificate the TLS handshake verified, if any.
    pub fn new(addr: SocketAddr, certificate: Option<ClientCertificate>) -> Peer {
        Peer {
            client: Arc::from(addr.to_string()),
            certificate,
        }
    }

    /// `ip:port`, as the audit record's `client`.
    pub fn client(&self) -> &Arc<str> {
        &self.client
    }

    pub fn certificate(&self) -> Option<&ClientCertificate> {
        self.certificate.as_ref()
    }
}

/// The gateway's shared state; cheap to clone into every connection.
#[derive(Clone)]
pub struct Gateway {
    inner: Arc<Inner>,
}

struct Inner {
    runtime: ArcSwap<Runtime>,
    audit: AuditLog,
    metrics: Arc<Metrics>,
    draining: AtomicBool,
    /// Forwarded requests whose `result` is still to come, for a drain cut short.
    forwarded: Forwarded,
    clock: LimiterClock,
    store_error_log: Throttle,
    /// Requests refused because their audit record failed: one line per
    /// [`AUDIT_REFUSAL_LOG_INTERVAL`], as on a full disk every request fails alike.
    audit_refusal_log: CountingThrottle,
    /// Which client certificates the data listener accepts (`None` without TLS),
    /// changed only by a reload that changes it: TLS connections opened before then
    /// close gracefully (see [`DataTls`]).
    client_trust: watch::Sender<Option<ClientTrust>>,
}

/// Which client certificates `config`'s data listener accepts; `None` without TLS.
fn client_trust_of(config: &Config) -> Option<ClientTrust> {
    config.listen_tls.as_ref().map(|tls| tls.client_trust)
}

/// The data listener's TLS as a new connection should use it.
pub struct DataTls {
    pub acceptor: TlsAcceptor,
    /// Changes when a reload changes which client certificates are accepted: the
    /// connection then finishes what it serves and closes, and its client reconnects
    /// under the new trust. Until then the handshake it made, under the old CAs, would
    /// authenticate it for as long as it stays open.
    pub trust_changed: watch::Receiver<Option<ClientTrust>>,
}

/// At most one log line about rate-limit store failures per this interval.
const STORE_ERROR_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// How often a request refused for a failed audit record is logged. A `result` record
/// that fails after forwarding is always logged: that request reached Plivo.
const AUDIT_REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// What a request that passed every check asks to end.
enum Mpc {
    Name(MpcName),
    /// Authorized only once Plivo has told us the name.
    Uuid {
        uuid: MpcUuid,
        tenant: Arc<str>,
    },
}

struct Admitted {
    /// The configuration the request was admitted under, used to its end.
    runtime: Arc<Runtime>,
    credentials: Arc<AccountCredentials>,
    mpc: Mpc,
}

impl Gateway {
    pub fn new(
        config: &Config,
        audit: AuditLog,
        metrics: Arc<Metrics>,
        clock: LimiterClock,
    ) -> Result<Gateway, BuildError> {
        let runtime = Runtime::build(config, None, &clock)?;
        declare_tenants(&metrics, config);
        export_listener_certificate(&metrics, config);
        metrics.count_audit_rotation_failures(audit.rotation_failures());
        Ok(Gateway {
            inner: Arc::new(Inner {
                runtime: ArcSwap::from_pointee(runtime),
                audit,
                metrics,
                draining: AtomicBool::new(false),
                forwarded: Forwarded::default(),
                clock,
                store_error_log: Throttle::new(STORE_ERROR_LOG_INTERVAL),
                audit_refusal_log: CountingThrottle::new(AUDIT_REFUSAL_LOG_INTERVAL),
                client_trust: watch::Sender::new(client_trust_of(config)),
            }),
        })
    }

    /// Swaps in a new config; limiter state of unchanged limits and the upstream
    /// connection pool (when upstream settings are unchanged) carry over.
    pub fn reload(&self, config: &Config) -> Result<(), BuildError> {
        let current = self.inner.runtime.load();
        let next = Runtime::build(config, Some(&current), &self.inner.clock)?;
        self.inner.runtime.store(Arc::new(next));
        // After the store: a connection that sees the change took the new acceptor.
        let trust = client_trust_of(config);
        let trust_changed = self.inner.client_trust.send_if_modified(|current| {
            let changed = *current != trust;
            *current = trust;
            changed
        });
        if trust_changed {
            tracing::info!("the client CAs changed: TLS connections opened before this reload finish what they serve and close");
        }
        declare_tenants(&self.inner.metrics, config);
        export_listener_certificate(&self.inner.metrics, config);
        Ok(())
    }

    pub fn audit(&self) -> &AuditLog {
        &self.inner.audit
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.inner.metrics
    }

    pub fn start_draining(&self) {
        self.inner.draining.store(true, Ordering::SeqCst);
    }

    /// Ends the wait of every forwarded request still waiting on Plivo (the drain's
    /// `shutdown_grace` ran out): writes a `result` record for each, with no status (the
    /// caller gets no answer) and reason `shutting-down`. Returns how many.
    pub async fn cut_forwarded(&self) -> usize {
        let cut = self.inner.forwarded.cut();
        let count = cut.len();
        for result in &cut {
            tracing::warn!(request_id = %result.request_id, "shutdown_grace ran out while the request was with Plivo; its result is unknown");
        }
        // Polled together: one batch (one write, one fsync) carries them all; with
        // `fsync: always` its acknowledgement, handed to one of them, reaches the rest
        // (awaiting them one by one would wait for ever on the first).
        let appends = cut
            .into_iter()
            .map(|result| self.inner.audit.append(result));
        for written in futures_util::future::join_all(appends).await {
            if let Err(err) = written {
                tracing::error!(error = %err, "audit result record of a request cut short failed");
                self.inner.metrics.audit_failure();
            }
        }
        count
    }

    pub fn is_draining(&self) -> bool {
        self.inner.draining.load(Ordering::SeqCst)
    }

    /// The TLS new data connections use, if the listener speaks TLS.
    pub fn data_tls(&self) -> Option<DataTls> {
        // A reload cannot turn TLS on or off: a plain listener stays plain.
        self.inner.runtime.load().tls.as_ref()?;
        // Subscribed before the acceptor is read: a reload in between is then seen as a
        // change (a needless close at worst), never missed.
        let trust_changed = self.inner.client_trust.subscribe();
        let acceptor = self.inner.runtime.load().tls.clone()?;
        Some(DataTls {
            acceptor,
            trust_changed,
        })
    }

    /// Serves one request that came from `peer`, end to end. Never fails: every outcome
    /// is a response.
    pub async fn handle<B>(&self, request: Request<B>, peer: &Peer) -> Response<Full<Bytes>>
    where
        B: http_body::Body<Data = Bytes>,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let mut trail = Trail::new(&request, peer, Instant::now(), &self.inner.audit);
        let admitted = match self.admit(request, peer, &mut trail).await {
            Ok(admitted) => admitted,
            Err(problem) => return self.deny(trail, problem).await,
        };
        let forward = trail.event(EventKind::Forward);
        let registered = self
            .inner
            .forwarded
            .register(forward.clone(), trail.started, || {
                self.inner.audit.submit(forward)
            });
        let Some((ticket, submitted)) = registered else {
            return self.deny(trail, Problem::ShuttingDown).await;
        };
        trail.recorded();
        if let Err(err) = acknowledged(submitted).await {
            return self.refuse_unforwarded(trail, ticket, &err).await;
        }
        let runtime = &admitted.runtime;
        let report = match &admitted.mpc {
            Mpc::Name(name) => {
                let call = runtime.upstream.end_mpc(
                    &admitted.credentials,
                    MpcRef::Name(name),
                    runtime.upstream.deadline(),
                    &self.inner.metrics,
                );
                call.await
            }
            Mpc::Uuid { uuid, tenant } => {
                let credentials = &admitted.credentials;
                self.end_by_uuid(runtime, credentials, uuid, tenant, &mut trail, &ticket)
                    .await
            }
        };
        self.conclude(trail, report, ticket).await
    }

    /// The checks, in contract order; the first that fails decides the reply.
    async fn admit<B>(
        &self,
        request: Request<B>,
        peer: &Peer,
        trail: &mut Trail,
    ) -> Result<Admitted, Problem>
    where
        B: http_body::Body<Data = Bytes>,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        if self.is_draining() {
            return Err(Problem::ShuttingDown);
        }
        let (parts, body) = request.into_parts();
        check_framing(&parts)?;
        let route = route(&parts.method, &parts.uri)?;
        read_bounded_body(&parts.headers, body).await?;
        // The configuration is taken only now that the body is in: a caller that holds
        // its body back must not keep a token that a reload has since revoked usable.
        let runtime = self.inner.runtime.load_full();
        let policy =
            identify::authenticate(&runtime, &parts.headers, peer.certificate(), &route, trail)?;
        let tenant = &policy.name;
        // Known once the tenant is: a `denied` record for a bad or forbidden name names
        // the account too, like one refused by a limit.
        let account = &policy.account;
        trail.account = Some(Arc::clone(&account.name));
        let (mpc, upstream_calls) = check_target(&route, &policy, tenant, trail)?;
        trail.ended_requests = Some(Arc::clone(&policy.ended_requests));
        // A by-uuid request makes two Plivo calls, so it costs the account two, taken
        // together or not at all.
        self.limit(&runtime, &policy, tenant, upstream_calls, trail)
            .await?;
        let credentials = Arc::clone(&account.credentials);
        Ok(Admitted {
            runtime,
            credentials,
            mpc,
        })
    }

    /// Reads the MPC to learn its name, authorizes that name, then ends it by uuid; both
    /// calls within one `timeout`, as the contract's "whole call".
    async fn end_by_uuid(
        &self,
        runtime: &Runtime,
        account: &AccountCredentials,
        uuid: &MpcUuid,
        tenant: &str,
        trail: &mut Trail,
        ticket: &Ticket,
    ) -> UpstreamReport {
        let deadline = runtime.upstream.deadline();
        let (name, lookup_attempts, lookup_status) = match runtime
            .upstream
            .lookup_name(account, uuid, deadline, &self.inner.metrics)
            .await
        {
            Lookup::Found {
                name,
                attempts,
                status,
            } => (name, attempts, status),
            Lookup::Failed(report) => return report,
        };
        let name_shared: Arc<str> = Arc::from(name.as_str());
        self.inner.forwarded.name_learned(ticket, &name_shared);
        trail.mpc = Some(name_shared);
        // The lookup can take up to `timeout`: the name is authorized by the allow list
        // in force now, so a reload during the lookup that narrows it is obeyed.
        let allowed = self
            .inner
            .runtime
            .load()
            .tenants
            .get(tenant)
            .is_some_and(|policy| policy.may_end(&name));
        if !allowed {
            return UpstreamReport {
                outcome: Err(Problem::Forbidden),
                status: lookup_status,
                attempts: lookup_attempts,
            };
        }
        let mut report = runtime
            .upstream
            .end_mpc(account, MpcRef::Uuid(uuid), deadline, &self.inner.metrics)
            .await;
        report.attempts += lookup_attempts;
        report
    }

    /// Applies the tenant's limit and then, if it admits, the account's: both from the
    /// shared store (one round trip) when there is one, else from this replica's own
    /// limiters. When the store fails, `on_error` decides for both at once (`local`:
    /// this replica's limiters).
    async fn limit(
        &self,
        runtime: &Runtime,
        policy: &TenantPolicy,
        tenant: &str,
        account_cells: NonZeroU32,
        trail: &mut Trail,
    ) -> Result<(), Problem> {
        let tenant_limiter = &policy.limiter;
        let account = &policy.account;
        if let Some(shared) = &runtime.shared_limits {
            let tenant_bucket = Bucket {
                kind: LimitKind::Tenant,
                name: tenant,
                limit: tenant_limiter.limit(),
                cells: ONE_CELL,
            };
            let account_bucket = Bucket {
                kind: LimitKind::Account,
                name: &account.name,
                limit: account.limiter.limit(),
                cells: account_cells,
            };
            match shared.store.check_pair(tenant_bucket, account_bucket).await {
                Ok(pair) => return self.enforce_pair(policy, pair, trail),
                Err(err) => match self.store_failed(shared, &err) {
                    OnStoreError::Local => {}
                    OnStoreError::Deny => return Err(Problem::RateLimitStoreUnavailable),
                    OnStoreError::Allow => {
                        // Admitted unchecked: no RateLimit headers would be true.
                        trail.rate_headers = None;
                        return Ok(());
                    }
                },
            }
        }
        let pair = tenant_limiter.check_pair(ONE_CELL, || account.limiter.check_n(account_cells));
        self.enforce_pair(policy, pair, trail)
    }

    /// Answers for the decisions on a request's tenant and account buckets.
    fn enforce_pair(
        &self,
        policy: &TenantPolicy,
        pair: PairDecision,
        trail: &mut Trail,
    ) -> Result<(), Problem> {
        match pair {
            PairDecision::FirstRefused(refused) => self.enforce(&policy.limiter, refused, trail),
            PairDecision::Both { first, second } => {
                self.enforce(&policy.limiter, first, trail)?;
                self.enforce(&policy.account.limiter, second, trail)
            }
        }
    }

    /// Counts a failure of the shared store, logs it at most once per
    /// [`STORE_ERROR_LOG_INTERVAL`] (a Redis outage must not flood the log), and says
    /// what to do instead.
    fn store_failed(&self, shared: &SharedLimits, err: &StoreError) -> OnStoreError {
        self.inner.metrics.rate_limit_store_error();
        if self.inner.store_error_log.ready() {
            tracing::warn!(error = %err, on_error = ?shared.on_error, "rate-limit store failed");
        }
        shared.on_error
    }

    /// Turns one limit's decision into the request's fate: admitted (the tenant's
    /// RateLimit headers kept for the reply) or `429`.
    fn enforce(
        &self,
        limiter: &Limiter,
        decision: Decision,
        trail: &mut Trail,
    ) -> Result<(), Problem> {
        match decision {
            Decision::Allowed { .. } => {
                if limiter.kind() == LimitKind::Tenant {
                    trail.rate_headers =
                        Some((limiter.policy_header(), limiter.state_header(decision)));
                }
                Ok(())
            }
            Decision::Refused {
                retry_after_secs, ..
            } => {
                let limit = limiter.kind().as_str();
                self.inner
                    .metrics
                    .rate_limited(trail.tenant.as_ref(), limit);
                trail.rate_headers = None;
                Err(Problem::RateLimited {
                    limit,
                    retry_after: retry_after_secs,
                    policy: limiter.policy_header(),
                    state: limiter.state_header(decision),
                })
            }
        }
    }

    /// Writes the `denied` record and answers. If even that record cannot be written,
    /// the caller is told the audit log is unavailable.
    async fn deny(&self, mut trail: Trail, problem: Problem) -> Response<Full<Bytes>> {
        trail.status = Some(problem.status().as_u16());
        trail.reason = Some(problem.slug());
        trail.recorded();
        let problem = match self
            .inner
            .audit
            .append(trail.event(EventKind::Denied))
            .await
        {
            Ok(_) => problem,
            Err(err) => {
                self.audit_refused(&trail, &err, EventKind::Denied);
                Problem::AuditUnavailable
            }
        };
        self.reply(trail, &problem)
    }

    /// The `forward` record failed, so the request is not forwarded: `503
    /// audit-unavailable`, with a `denied` record as its terminal record, not a `result`;
    /// unless a drain cut short has already written a `result` for it, which then is.
    async fn refuse_unforwarded(
        &self,
        trail: Trail,
        ticket: Ticket,
        err: &AuditError,
    ) -> Response<Full<Bytes>> {
        self.audit_refused(&trail, err, EventKind::Forward);
        let problem = Problem::AuditUnavailable;
        if self.inner.forwarded.settle(ticket, || ()).is_some() {
            return self.deny(trail, problem).await;
        }
        self.reply(trail, &problem)
    }

    /// Counts a request's `record` that the audit log refused (the request is answered
    /// `503 audit-unavailable`, never forwarded) and logs it, once per interval.
    fn audit_refused(&self, trail: &Trail, err: &AuditError, record: EventKind) {
        self.inner.metrics.audit_failure();
        if let Some(suppressed) = self.inner.audit_refusal_log.ready() {
            tracing::error!(request_id = %trail.request_id, record = record.as_str(), error = %err, suppressed, "audit record failed; request refused with 503 audit-unavailable, not forwarded (logged at most once per 10 s; `suppressed` failed records since the last such line were not logged: a request not forwarded has two, its forward and its denied)");
        }
    }

    fn reply(&self, trail: Trail, problem: &Problem) -> Response<Full<Bytes>> {
        let response = problem.to_response(&trail.request_id, trail.flavor);
        self.respond(trail, problem.slug(), response)
    }

    /// Writes the `result` record and answers with the real outcome, even when the
    /// record fails: the MPC may already be ended.
    async fn conclude(
        &self,
        mut trail: Trail,
        report: UpstreamReport,
        ticket: Ticket,
    ) -> Response<Full<Bytes>> {
        let response = match &report.outcome {
            Ok(()) => no_content(),
            Err(problem) => problem.to_response(&trail.request_id, trail.flavor),
        };
        let reason = report.outcome.as_ref().err().map_or(ENDED, Problem::slug);
        trail.status = Some(response.status().as_u16());
        trail.reason = Some(reason);
        trail.upstream_status = report.status;
        trail.plivo_api_id = report.api_id().map(Arc::from);
        trail.attempts = Some(report.attempts);
        let result = trail.event(EventKind::Result);
        let submitted = self
            .inner
            .forwarded
            .settle(ticket, || self.inner.audit.submit(result));
        let written = match submitted {
            Some(submitted) => acknowledged(submitted).await,
            // A drain cut short wrote this request's `result`; nobody waits for the reply.
            None => Ok(()),
        };
        if let Err(err) = written {
            tracing::error!(request_id = %trail.request_id, error = %err, "audit result record failed after forwarding");
            self.inner.metrics.audit_failure();
        }
        self.respond(trail, reason, response)
    }

    fn respond(
        &self,
        mut trail: Trail,
        reason: &'static str,
        mut response: Response<Full<Bytes>>,
    ) -> Response<Full<Bytes>> {
        // Moved, not cloned: cloning a freshly built header value allocates.
        let headers = response.headers_mut();
        let id = std::mem::replace(&mut trail.request_id_header, HeaderValue::from_static(""));
        headers.insert(X_REQUEST_ID.clone(), id);
        if let Some((policy, state)) = trail.rate_headers.take() {
            headers.insert(RATELIMIT_POLICY, policy);
            headers.insert(RATELIMIT, state);
        }
        let metrics = &self.inner.metrics;
        let elapsed = trail.started.elapsed();
        match (&trail.ended_requests, &trail.tenant) {
            (Some(series), Some(tenant)) if reason == ENDED => {
                metrics.request_ended(series, tenant, elapsed);
            }
            _ => metrics.request_finished(trail.tenant.as_ref(), reason, elapsed),
        }
        response
    }
}

/// Waits until a record handed over with [`AuditLog::submit`] is acknowledged.
async fn acknowledged<F>(submitted: Result<F, AuditError>) -> Result<(), AuditError>
where
    F: std::future::Future<Output = Result<u64, AuditError>>,
{
    submitted?.await.map(drop)
}

fn declare_tenants(metrics: &Metrics, config: &Config) {
    for tenant in config.tenants.keys() {
        metrics.declare_tenant(tenant);
    }
}

fn export_listener_certificate(metrics: &Metrics, config: &Config) {
    if let Some(tls) = &config.listen_tls {
        metrics.listener_certificate_expires_at(tls.expires_at);
    }
}

fn no_content() -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = StatusCode::NO_CONTENT;
    response
}

/// The name check and authorization (400, then 403), and what the request costs its
/// account. A uuid is authorized later, once Plivo has told its name.
fn check_target(
    route: &Route<'_>,
    policy: &TenantPolicy,
    tenant: &Arc<str>,
    trail: &mut Trail,
) -> Result<(Mpc, NonZeroU32), Problem> {
    match route.target {
        Target::Name(_) if route.target_cut_by_query => {
            Err(Problem::InvalidMpcName(InvalidMpcName::ReservedCharacter))
        }
        Target::Uuid(_) if route.target_cut_by_query => {
            Err(Problem::InvalidMpcUuid(InvalidMpcUuid))
        }
        Target::Name(segment) => {
            let name = MpcName::from_path_segment(segment).map_err(Problem::InvalidMpcName)?;
            trail.mpc = Some(name.shared());
            if !policy.may_end(name.as_str()) {
                return Err(Problem::Forbidden);
            }
            Ok((Mpc::Name(name), ONE_CELL))
        }
        Target::Uuid(text) => {
            let uuid = MpcUuid::parse(text).map_err(Problem::InvalidMpcUuid)?;
            let tenant = Arc::clone(tenant);
            Ok((Mpc::Uuid { uuid, tenant }, BY_UUID_CALLS))
        }
    }
}

/// Refuses what the HTTP library lets through but the contract does not: any
/// `Transfer-Encoding` (hyper hides a `Content-Length` sent alongside it), an over-long
/// request line and an over-large header block.
fn check_framing(parts: &http::request::Parts) -> Result<(), Problem> {
    if parts.headers.contains_key(TRANSFER_ENCODING) {
        return Err(Problem::BadRequest("Transfer-Encoding is not accepted"));
    }
    let target = request_target(parts.version, &parts.uri);
    // The http crate lets raw UTF-8 through; a proxy in front may read such a target
    // differently, so only ASCII (percent-encoded) targets are served.
    if !target.is_ascii() {
        return Err(Problem::BadRequest("the request target must be ASCII"));
    }
    // "METHOD SP target SP HTTP/1.1"
    if parts.method.as_str().len() + 1 + target.len() + 9 > MAX_REQUEST_LINE_BYTES {
        return Err(Problem::UriTooLong);
    }
    // HTTP/1.1 heads are held to this count by hyper; HTTP/2 ones only here, where HPACK
    // lets a field indexed once cost one byte each time after.
    if parts.headers.len() > MAX_HEADER_FIELDS {
        return Err(Problem::HeadersTooLarge);
    }
    let header_bytes: usize = parts
        .headers
        .iter()
        .map(|(name, value)| name.as_str().len() + 2 + value.len() + 2)
        .sum();
    if header_bytes > MAX_HEADER_BLOCK_BYTES {
        return Err(Problem::HeadersTooLarge);
    }
    Ok(())
}

/// The request target as the caller sent it: the whole URI of an HTTP/1 request line
/// (absolute-form included), or `:path` for HTTP/2, whose URI hyper rebuilds from
/// `:scheme` and `:authority` as well.
pub(crate) fn request_target(version: http::Version, uri: &http::Uri) -> Cow<'_, str> {
    match (version, uri.path_and_query()) {
        (http::Version::HTTP_2, Some(path)) => Cow::Borrowed(path.as_str()),
        // Origin-form, the usual case: the URI is exactly its path and query.
        (_, Some(path)) if uri.scheme().is_none() => Cow::Borrowed(path.as_str()),
        _ => Cow::Owned(uri.to_string()),
    }
}

/// Reads and discards the body, refusing one over [`MAX_BODY_BYTES`].
async fn read_bounded_body<B>(headers: &HeaderMap, body: B) -> Result<(), Problem>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let declared = headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > MAX_BODY_BYTES as u64) {
        return Err(Problem::PayloadTooLarge);
    }
    // The usual case, no body at all: no timer to arm.
    if body.is_end_stream() {
        return Ok(());
    }
    let collected = tokio::time::timeout(
        BODY_READ_TIMEOUT,
        Limited::new(body, MAX_BODY_BYTES).collect(),
    );
    match collected.await {
        Err(_elapsed) => Err(Problem::BodyTimeout),
        Ok(Ok(_)) => Ok(()),
        Ok(Err(err)) if err.is::<http_body_util::LengthLimitError>() => {
            Err(Problem::PayloadTooLarge)
        }
        Ok(Err(_)) => Err(Problem::BadRequest("the request body could not be read")),
    }
}

#[cfg(test)]
mod tests;
