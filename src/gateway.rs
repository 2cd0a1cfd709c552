//! The request path of `POST /mpc/{name}/end`, in contract order:
//!
//! ```text
//! drain ─▶ framing (400/414/431) ─▶ route (404/405) ─▶ body size (413)
//!   ─▶ authenticate (401) ─▶ name (400) ─▶ authorize (403) ─▶ tenant limit (429)
//!   ─▶ account limit (429) ─▶ audit "forward" (503) ─▶ upstream ─▶ audit "result"
//! ```
//!
//! The first check that fails decides the reply; every request ends with exactly one
//! terminal audit record (`denied` or `result`). [`Gateway::admit`] holds the checks,
//! [`Gateway::handle`] the audit and upstream steps around them.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_LENGTH, TRANSFER_ENCODING};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use tokio_rustls::TlsAcceptor;

use crate::audit::{AuditEvent, AuditLog, EventKind};
use crate::auth::{bearer_token, Identity, NamePattern, TokenDirectory};
use crate::config::{Config, UpstreamSettings};
use crate::mpc_name::MpcName;
use crate::problem::Problem;
use crate::rate_limit::{Decision, Limiter, LimiterClock, LimiterSet};
use crate::request_id::RequestId;
use crate::telemetry::Metrics;
use crate::tls::ClientCertificate;
use crate::upstream::{AccountCredentials, PlivoClient, UpstreamBuildError, UpstreamReport};

/// Bodies are ignored, but a caller may not make the gateway buffer more than this.
pub const MAX_BODY_BYTES: usize = 4 * 1024;
pub const MAX_REQUEST_LINE_BYTES: usize = 8 * 1024;
pub const MAX_HEADER_BLOCK_BYTES: usize = 32 * 1024;
/// The raw request target kept in an audit record.
const MAX_AUDIT_PATH_BYTES: usize = 256;

/// The peer of the connection a request came on, put in its extensions by the server.
#[derive(Debug, Clone, Copy)]
pub struct ClientAddr(pub SocketAddr);

/// Everything derived from one version of the config; swapped whole on reload.
struct Runtime {
    tokens: TokenDirectory,
    /// Client-certificate SAN → tenant (`client_cert_sans`).
    sans: HashMap<String, Arc<str>>,
    /// The data listener's TLS, when `listen_tls` is set; rebuilt from files on reload.
    tls: Option<TlsAcceptor>,
    tenants: HashMap<String, TenantPolicy>,
    accounts: HashMap<String, AccountCredentials>,
    limiters: LimiterSet,
    upstream: Arc<PlivoClient>,
    upstream_fingerprint: UpstreamFingerprint,
}

struct TenantPolicy {
    allow: Vec<NamePattern>,
    account: String,
}

impl TenantPolicy {
    fn may_end(&self, name: &MpcName) -> bool {
        self.allow
            .iter()
            .any(|pattern| pattern.matches(name.as_str()))
    }
}

/// What decides whether the upstream client (and its connection pool) can be kept.
#[derive(PartialEq, Eq)]
struct UpstreamFingerprint(String);

impl UpstreamFingerprint {
    fn of(settings: &UpstreamSettings) -> UpstreamFingerprint {
        let roots: Vec<&[u8]> = settings.extra_roots.iter().map(|c| c.as_ref()).collect();
        UpstreamFingerprint(format!(
            "{}|{:?}|{:?}|{}|{:?}",
            settings.base_url,
            settings.connect_timeout,
            settings.timeout,
            settings.max_attempts,
            roots
        ))
    }
}

impl Runtime {
    fn build(
        config: &Config,
        previous: Option<&Runtime>,
        clock: &LimiterClock,
    ) -> Result<Runtime, UpstreamBuildError> {
        let mut tokens = TokenDirectory::default();
        let mut sans = HashMap::new();
        let mut tenants = HashMap::new();
        for (name, tenant) in &config.tenants {
            let shared: Arc<str> = Arc::from(name.as_str());
            for hash in &tenant.tokens {
                tokens.insert(*hash, Arc::clone(&shared));
            }
            for san in &tenant.client_cert_sans {
                sans.insert(san.clone(), Arc::clone(&shared));
            }
            tenants.insert(
                name.clone(),
                TenantPolicy {
                    allow: tenant.allow.clone(),
                    account: tenant.account.clone(),
                },
            );
        }
        let accounts = config
            .accounts
            .iter()
            .map(|(name, account)| (name.clone(), AccountCredentials::new(account)))
            .collect();
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
        let upstream_fingerprint = UpstreamFingerprint::of(&config.upstream);
        let upstream = match previous {
            Some(old) if old.upstream_fingerprint == upstream_fingerprint => {
                Arc::clone(&old.upstream)
            }
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
            accounts,
            limiters,
            upstream,
            upstream_fingerprint,
        })
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
    clock: LimiterClock,
}

/// A request that passed every check and may be forwarded.
struct Admitted {
    account: AccountCredentials,
    name: MpcName,
}

impl Gateway {
    pub fn new(
        config: &Config,
        audit: AuditLog,
        metrics: Arc<Metrics>,
        clock: LimiterClock,
    ) -> Result<Gateway, UpstreamBuildError> {
        let runtime = Runtime::build(config, None, &clock)?;
        Ok(Gateway {
            inner: Arc::new(Inner {
                runtime: ArcSwap::from_pointee(runtime),
                audit,
                metrics,
                draining: AtomicBool::new(false),
                clock,
            }),
        })
    }

    /// Swaps in a new config; limiter state of unchanged limits and the upstream
    /// connection pool (when upstream settings are unchanged) carry over.
    pub fn reload(&self, config: &Config) -> Result<(), UpstreamBuildError> {
        let current = self.inner.runtime.load();
        let next = Runtime::build(config, Some(&current), &self.inner.clock)?;
        self.inner.runtime.store(Arc::new(next));
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

    pub fn is_draining(&self) -> bool {
        self.inner.draining.load(Ordering::SeqCst)
    }

    /// The TLS acceptor new data connections use, if the listener speaks TLS.
    pub fn tls_acceptor(&self) -> Option<TlsAcceptor> {
        self.inner.runtime.load().tls.clone()
    }

    /// Serves one request end to end. Never fails: every outcome is a response.
    pub async fn handle<B>(&self, request: Request<B>) -> Response<Full<Bytes>>
    where
        B: http_body::Body<Data = Bytes>,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let started = Instant::now();
        let runtime = self.inner.runtime.load_full();
        let mut trail = Trail::new(&request, started);
        let admitted = match self.admit(&runtime, request, &mut trail).await {
            Ok(admitted) => admitted,
            Err(problem) => return self.deny(trail, problem).await,
        };
        if let Err(err) = self
            .inner
            .audit
            .append(trail.event(EventKind::Forward))
            .await
        {
            tracing::error!(request_id = %trail.request_id, error = %err, "audit forward record failed; not forwarding");
            self.inner.metrics.audit_failure();
            return self.deny(trail, Problem::AuditUnavailable).await;
        }
        let report = runtime
            .upstream
            .end_mpc(&admitted.account, &admitted.name)
            .await;
        self.conclude(trail, report).await
    }

    /// The checks, in contract order; the first that fails decides the reply.
    async fn admit<B>(
        &self,
        runtime: &Runtime,
        request: Request<B>,
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
        check_framing(&parts.method, &parts.uri, &parts.headers)?;
        let segment = route(&parts.method, parts.uri.path())?;
        read_bounded_body(&parts.headers, body).await?;
        let certificate = parts.extensions.get::<ClientCertificate>();
        let tenant = authenticate(runtime, &parts.headers, certificate, trail)?;
        let name = MpcName::from_path_segment(segment).map_err(Problem::InvalidMpcName)?;
        trail.mpc = Some(name.as_str().to_owned());
        let policy = runtime
            .tenants
            .get(&*tenant)
            .ok_or(Problem::Unauthenticated)?;
        if !policy.may_end(&name) {
            return Err(Problem::Forbidden);
        }
        trail.account = Some(policy.account.clone());
        let account = runtime
            .accounts
            .get(&policy.account)
            .ok_or(Problem::Forbidden)?
            .clone();
        self.limit(runtime.limiters.tenant(&tenant), trail)?;
        self.limit(runtime.limiters.account(&policy.account), trail)?;
        Ok(Admitted { account, name })
    }

    /// Applies one limiter. A missing limiter (impossible after validation) refuses.
    fn limit(&self, limiter: Option<&Arc<Limiter>>, trail: &mut Trail) -> Result<(), Problem> {
        let Some(limiter) = limiter else {
            return Err(Problem::Forbidden);
        };
        match limiter.check() {
            decision @ Decision::Allowed { .. } => {
                if limiter.kind() == crate::rate_limit::LimitKind::Tenant {
                    trail.rate_headers =
                        Some((limiter.policy_header(), limiter.state_header(decision)));
                }
                Ok(())
            }
            decision @ Decision::Refused { retry_after_secs } => {
                let limit = limiter.kind().as_str();
                self.inner
                    .metrics
                    .rate_limited(trail.tenant.as_deref().unwrap_or(""), limit);
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
        let problem = match self
            .inner
            .audit
            .append(trail.event(EventKind::Denied))
            .await
        {
            Ok(_) => problem,
            Err(err) => {
                tracing::error!(request_id = %trail.request_id, error = %err, "audit denied record failed");
                self.inner.metrics.audit_failure();
                Problem::AuditUnavailable
            }
        };
        let response = problem.to_response(&trail.request_id);
        self.respond(&trail, problem.slug(), response)
    }

    /// Writes the `result` record and answers with the real outcome, even when the
    /// record fails: the MPC may already be ended.
    async fn conclude(&self, mut trail: Trail, report: UpstreamReport) -> Response<Full<Bytes>> {
        let response = match &report.outcome {
            Ok(()) => no_content(),
            Err(problem) => problem.to_response(&trail.request_id),
        };
        let reason = report.outcome.as_ref().err().map_or("ended", Problem::slug);
        trail.status = Some(response.status().as_u16());
        trail.reason = Some(reason);
        trail.upstream_status = report.status;
        trail.plivo_api_id = report.api_id().map(str::to_owned);
        trail.attempts = Some(report.attempts);
        self.inner.metrics.upstream_answer(report.status);
        if let Err(err) = self
            .inner
            .audit
            .append(trail.event(EventKind::Result))
            .await
        {
            tracing::error!(request_id = %trail.request_id, error = %err, "audit result record failed after forwarding");
            self.inner.metrics.audit_failure();
        }
        self.respond(&trail, reason, response)
    }

    fn respond(
        &self,
        trail: &Trail,
        reason: &'static str,
        mut response: Response<Full<Bytes>>,
    ) -> Response<Full<Bytes>> {
        if let Some((policy, state)) = &trail.rate_headers {
            let headers = response.headers_mut();
            for (name, value) in [("ratelimit-policy", policy), ("ratelimit", state)] {
                if let Ok(value) = HeaderValue::from_str(value) {
                    headers.insert(name, value);
                }
            }
        }
        self.inner.metrics.request_finished(
            trail.tenant.as_deref().unwrap_or(""),
            reason,
            trail.started.elapsed(),
        );
        response
    }
}

fn no_content() -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = StatusCode::NO_CONTENT;
    response
}

/// Refuses what the HTTP library lets through but the contract does not: any
/// `Transfer-Encoding` (hyper hides a `Content-Length` sent alongside it), an over-long
/// request line and an over-large header block.
fn check_framing(method: &Method, uri: &http::Uri, headers: &HeaderMap) -> Result<(), Problem> {
    if headers.contains_key(TRANSFER_ENCODING) {
        return Err(Problem::BadRequest("Transfer-Encoding is not accepted"));
    }
    let target_len = uri
        .path_and_query()
        .map_or(0, |pq| pq.as_str().len())
        .max(uri.to_string().len());
    // "METHOD SP target SP HTTP/1.1"
    if method.as_str().len() + 1 + target_len + 9 > MAX_REQUEST_LINE_BYTES {
        return Err(Problem::UriTooLong);
    }
    let header_bytes: usize = headers
        .iter()
        .map(|(name, value)| name.as_str().len() + 2 + value.len() + 2)
        .sum();
    if header_bytes > MAX_HEADER_BLOCK_BYTES {
        return Err(Problem::HeadersTooLarge);
    }
    Ok(())
}

/// `POST /mpc/{segment}/end`; the segment is returned still percent-encoded.
fn route<'a>(method: &Method, path: &'a str) -> Result<&'a str, Problem> {
    let segment = path
        .strip_prefix("/mpc/")
        .and_then(|rest| rest.strip_suffix("/end"))
        .filter(|segment| !segment.contains('/'))
        .ok_or(Problem::NotFound)?;
    if method != Method::POST {
        return Err(Problem::MethodNotAllowed);
    }
    Ok(segment)
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
    match Limited::new(body, MAX_BODY_BYTES).collect().await {
        Ok(_) => Ok(()),
        Err(err) if err.is::<http_body_util::LengthLimitError>() => Err(Problem::PayloadTooLarge),
        Err(_) => Err(Problem::BadRequest("the request body could not be read")),
    }
}

/// Client certificate and/or Bearer token → tenant. Records the tenant and fingerprint
/// (the certificate's when it authenticated the tenant, else the token's) on the trail.
fn authenticate(
    runtime: &Runtime,
    headers: &HeaderMap,
    certificate: Option<&ClientCertificate>,
    trail: &mut Trail,
) -> Result<Arc<str>, Problem> {
    let token = identify_bearer(runtime, headers);
    let by_certificate = certificate.and_then(|cert| tenant_of_certificate(runtime, cert));
    let (tenant, fingerprint) = match (by_certificate, &token) {
        // A certificate that names a tenant decides; a token sent as well must agree.
        (Some((tenant, cert_fp)), Identity::Anonymous) => (Some(tenant), Some(cert_fp)),
        (
            Some((tenant, cert_fp)),
            Identity::Tenant {
                tenant: token_tenant,
                ..
            },
        ) if *token_tenant == tenant => (Some(tenant), Some(cert_fp)),
        (Some((_, cert_fp)), _) => (None, Some(cert_fp)),
        (
            None,
            Identity::Tenant {
                tenant,
                fingerprint,
            },
        ) => (Some(Arc::clone(tenant)), Some(fingerprint.clone())),
        (None, identity) => (None, identity.fingerprint().map(str::to_owned)),
    };
    trail.token_fp = fingerprint;
    let tenant = tenant.ok_or(Problem::Unauthenticated)?;
    trail.tenant = Some(tenant.to_string());
    Ok(tenant)
}

fn identify_bearer(runtime: &Runtime, headers: &HeaderMap) -> Identity {
    let mut values = headers.get_all(AUTHORIZATION).iter();
    match (values.next(), values.next()) {
        (Some(value), None) => match bearer_token(value.as_bytes()) {
            Some(token) => runtime.tokens.identify(token),
            None => Identity::Anonymous,
        },
        // None, or several Authorization headers: ambiguous, so nobody.
        _ => Identity::Anonymous,
    }
}

/// The one tenant whose `client_cert_sans` lists a SAN of the certificate; a certificate
/// naming several tenants authenticates none.
fn tenant_of_certificate(
    runtime: &Runtime,
    certificate: &ClientCertificate,
) -> Option<(Arc<str>, String)> {
    let mut found: Option<&Arc<str>> = None;
    for san in &certificate.sans {
        match (runtime.sans.get(san), found) {
            (Some(tenant), Some(previous)) if tenant != previous => return None,
            (Some(tenant), _) => found = Some(tenant),
            (None, _) => {}
        }
    }
    found.map(|tenant| (Arc::clone(tenant), certificate.fingerprint.clone()))
}

/// What the audit record and the metrics need to know about one request, filled in as
/// the request moves along the path.
struct Trail {
    started: Instant,
    request_id: String,
    client: Option<String>,
    method: String,
    path: String,
    tenant: Option<String>,
    token_fp: Option<String>,
    mpc: Option<String>,
    account: Option<String>,
    status: Option<u16>,
    reason: Option<&'static str>,
    upstream_status: Option<u16>,
    plivo_api_id: Option<String>,
    attempts: Option<u32>,
    rate_headers: Option<(String, String)>,
}

impl Trail {
    fn new<B>(request: &Request<B>, started: Instant) -> Trail {
        let request_id = request
            .extensions()
            .get::<RequestId>()
            .cloned()
            .unwrap_or_else(RequestId::fresh);
        Trail {
            started,
            request_id: request_id.as_str().to_owned(),
            client: request
                .extensions()
                .get::<ClientAddr>()
                .map(|addr| addr.0.to_string()),
            method: request.method().as_str().to_owned(),
            path: truncate_on_char(&request.uri().to_string(), MAX_AUDIT_PATH_BYTES),
            tenant: None,
            token_fp: None,
            mpc: None,
            account: None,
            status: None,
            reason: None,
            upstream_status: None,
            plivo_api_id: None,
            attempts: None,
            rate_headers: None,
        }
    }

    fn event(&self, kind: EventKind) -> AuditEvent {
        let duration_ms = match kind {
            EventKind::Forward => None,
            _ => Some(u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)),
        };
        AuditEvent {
            event: kind,
            request_id: self.request_id.clone(),
            tenant: self.tenant.clone(),
            token_fp: self.token_fp.clone(),
            client: self.client.clone(),
            method: self.method.clone(),
            path: self.path.clone(),
            mpc: self.mpc.clone(),
            account: self.account.clone(),
            status: self.status,
            reason: self.reason.map(str::to_owned),
            upstream_status: self.upstream_status,
            plivo_api_id: self.plivo_api_id.clone(),
            attempts: self.attempts,
            duration_ms,
        }
    }
}

fn truncate_on_char(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        assert_eq!(route(&Method::POST, "/mpc/abc/end"), Ok("abc"));
        assert_eq!(route(&Method::POST, "/mpc//end"), Ok(""));
        assert_eq!(route(&Method::POST, "/mpc/a%2Fb/end"), Ok("a%2Fb"));
        assert_eq!(
            route(&Method::GET, "/mpc/abc/end"),
            Err(Problem::MethodNotAllowed)
        );
        assert_eq!(route(&Method::POST, "/mpc/a/b/end"), Err(Problem::NotFound));
        assert_eq!(
            route(&Method::POST, "/mpc/abc/end/"),
            Err(Problem::NotFound)
        );
        assert_eq!(route(&Method::POST, "/mpc/abc"), Err(Problem::NotFound));
        assert_eq!(route(&Method::DELETE, "/"), Err(Problem::NotFound));
    }

    #[test]
    fn framing_refusals() {
        let uri: http::Uri = "/mpc/a/end".parse().expect("uri");
        let mut headers = HeaderMap::new();
        assert!(check_framing(&Method::POST, &uri, &headers).is_ok());
        headers.insert(TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        assert!(matches!(
            check_framing(&Method::POST, &uri, &headers),
            Err(Problem::BadRequest(_))
        ));
        let long: http::Uri = format!("/mpc/{}/end", "a".repeat(8200))
            .parse()
            .expect("uri");
        assert_eq!(
            check_framing(&Method::POST, &long, &HeaderMap::new()),
            Err(Problem::UriTooLong)
        );
        let mut big = HeaderMap::new();
        let value = HeaderValue::from_str(&"v".repeat(1000)).expect("value");
        for i in 0..40 {
            big.append(
                http::HeaderName::from_bytes(format!("x-h{i}").as_bytes()).expect("name"),
                value.clone(),
            );
        }
        assert_eq!(
            check_framing(&Method::POST, &uri, &big),
            Err(Problem::HeadersTooLarge)
        );
    }

    #[test]
    fn audit_path_is_cut_on_a_char_boundary() {
        assert_eq!(truncate_on_char("abc", 256), "abc");
        let long = format!("{}ä", "a".repeat(255));
        assert_eq!(truncate_on_char(&long, 256).len(), 255);
    }
}
