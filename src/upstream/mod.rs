//! The calls to Plivo: `DELETE /v1/Account/{auth_id}/MultiPartyCall/name_{name}/` (or
//! `uuid_{uuid}/`, after a `GET` of it that learns its name, for the by-uuid routes) over
//! rustls (one HTTP/2 connection when the upstream offers it by ALPN, else a keep-alive
//! HTTP/1.1 pool: `transport`), with a per-attempt connect timeout, one deadline over
//! all attempts, jittered exponential backoff on connect errors and 502/503/504 (which
//! failures count as connect errors: `failure`), and the mapping of Plivo's answer to
//! what the caller gets.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use bytes::Bytes;
use http::header::{ACCEPT, AUTHORIZATION, RETRY_AFTER, USER_AGENT};
use http::uri::PathAndQuery;
use http::{HeaderMap, HeaderValue, Method, Request, StatusCode, Uri};
use http_body_util::Empty;
use rand::Rng;
use secrecy::ExposeSecret;
use tokio::time::Instant;
use zeroize::Zeroizing;

use crate::causes;
use crate::config::{Account, BaseUrl, UpstreamSettings};
use crate::millis::{ceil_secs, millis, Throttle};
use crate::mpc_name::{MpcName, MpcUuid};
use crate::problem::Problem;
use crate::telemetry::Metrics;

/// Plivo's error bodies are small; anything bigger is not worth reading.
const MAX_ERROR_BODY: usize = 64 * 1024;
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// At most one log line per this interval about calls that got no answer: an upstream
/// that cannot be reached fails every request, and each would say the same.
const FAILURE_LOG_INTERVAL: Duration = Duration::from_secs(10);
/// Calls to Plivo in flight at once. Plivo allows 60 requests/s per account, so more
/// than this means Plivo is slow; callers then wait (within `timeout`) instead of piling
/// up sockets.
pub const MAX_IN_FLIGHT: usize = 256;

/// The credentials of one Plivo account, ready to put on the wire.
pub struct AccountCredentials {
    /// The account's name in the config, for log lines (never the auth_id: a config
    /// value).
    name: Arc<str>,
    auth_id: String,
    authorization: HeaderValue,
    /// Throttles the error that Plivo refused these credentials: per account, so that
    /// one account refused often cannot hide another.
    refused_log: Throttle,
}

impl AccountCredentials {
    pub fn new(name: Arc<str>, account: &Account) -> AccountCredentials {
        // The plain copies are wiped when dropped; only the (sensitive) header stays.
        let pair = Zeroizing::new(format!(
            "{}:{}",
            account.auth_id,
            account.auth_token.expose_secret()
        ));
        let encoded = Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(&*pair));
        let header = Zeroizing::new(format!("Basic {}", *encoded));
        // Base64 output is always a valid header value.
        let mut authorization =
            HeaderValue::from_str(&header).unwrap_or_else(|_| HeaderValue::from_static(""));
        authorization.set_sensitive(true);
        AccountCredentials {
            name,
            auth_id: account.auth_id.clone(),
            authorization,
            refused_log: Throttle::new(FAILURE_LOG_INTERVAL),
        }
    }

    pub fn auth_id(&self) -> &str {
        &self.auth_id
    }
}

impl fmt::Debug for AccountCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AccountCredentials")
            .field("name", &self.name)
            .field("auth_id", &self.auth_id)
            .field("authorization", &"<redacted>")
            .finish()
    }
}

/// Which MPC a call addresses: by friendly name or by uuid.
#[derive(Debug, Clone, Copy)]
pub enum MpcRef<'a> {
    Name(&'a MpcName),
    Uuid(&'a MpcUuid),
}

/// The outcome of reading an MPC by uuid.
#[derive(Debug)]
pub enum Lookup {
    Found {
        name: String,
        attempts: u32,
        status: Option<u16>,
    },
    Failed(UpstreamReport),
}

/// What happened upstream, for the reply, the audit record and the metrics.
#[derive(Debug)]
pub struct UpstreamReport {
    pub outcome: Result<(), Problem>,
    /// Plivo's status of the last attempt, `None` when no answer came.
    pub status: Option<u16>,
    pub attempts: u32,
}

impl UpstreamReport {
    pub fn api_id(&self) -> Option<&str> {
        self.outcome.as_ref().err().and_then(Problem::plivo_api_id)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum UpstreamBuildError {
    #[error("cannot build the TLS client: {0}")]
    Tls(#[from] rustls::Error),
    #[error("cannot use the trust anchor in upstream.ca_file: {0}")]
    CaFile(String),
}

mod failure;
mod transport;

use transport::{BodyBounds, BodyCutByDeadline, Transport};

pub struct PlivoClient {
    transport: Transport,
    /// `upstream.base_url`: the scheme and authority of every request's URI.
    base: BaseUrl,
    /// The same as text, for log lines.
    origin: String,
    user_agent: HeaderValue,
    timeout: Duration,
    max_attempts: u32,
    in_flight: tokio::sync::Semaphore,
    /// Each throttles one kind of log line about failing calls: attempts that got no
    /// answer, calls that ran out of `timeout`, Plivo's 5xx answers.
    unanswered_log: Throttle,
    timeout_log: Throttle,
    server_error_log: Throttle,
}

/// One attempt's result, before the retry decision.
enum Attempt {
    Answered {
        status: StatusCode,
        headers: HeaderMap,
        body: Bytes,
        /// The deadline passed while the body was still coming.
        body_cut: bool,
    },
    /// Refused, reset or timed out while connecting: worth another attempt.
    Retriable,
    /// TLS failure or anything else: another attempt would fail the same way.
    Fatal,
}

impl Attempt {
    /// Plivo's status, `None` when no answer came.
    fn status(&self) -> Option<u16> {
        match self {
            Attempt::Answered { status, .. } => Some(status.as_u16()),
            Attempt::Retriable | Attempt::Fatal => None,
        }
    }
}

impl PlivoClient {
    pub fn new(settings: &UpstreamSettings) -> Result<PlivoClient, UpstreamBuildError> {
        let tls = client_tls_config(settings)?;
        Ok(PlivoClient {
            transport: Transport::new(settings, tls),
            base: settings.base_url.clone(),
            origin: settings.base_url.to_string(),
            user_agent: HeaderValue::from_static(concat!(
                "mpc-gateway/",
                env!("CARGO_PKG_VERSION")
            )),
            timeout: settings.timeout,
            max_attempts: settings.max_attempts,
            in_flight: tokio::sync::Semaphore::new(MAX_IN_FLIGHT),
            unanswered_log: Throttle::new(FAILURE_LOG_INTERVAL),
            timeout_log: Throttle::new(FAILURE_LOG_INTERVAL),
            server_error_log: Throttle::new(FAILURE_LOG_INTERVAL),
        })
    }

    /// The exact upstream path of an MPC on an account, built with plain appends (this
    /// is on every request's path).
    fn mpc_path(auth_id: &str, mpc: MpcRef<'_>) -> String {
        const ACCOUNT: &str = "/v1/Account/";
        const MPC: &str = "/MultiPartyCall/";
        let mut path = String::with_capacity(ACCOUNT.len() + auth_id.len() + MPC.len() + 64);
        path.push_str(ACCOUNT);
        path.push_str(auth_id);
        path.push_str(MPC);
        match mpc {
            MpcRef::Name(name) => {
                path.push_str("name_");
                path.extend(name.upstream_encoded());
            }
            MpcRef::Uuid(uuid) => {
                path.push_str("uuid_");
                path.push_str(uuid.as_str());
            }
        }
        path.push('/');
        path
    }

    /// The URI of `path` on Plivo, once for all attempts. The scheme and authority were
    /// parsed from the config at start-up, so only the path is checked here; and the
    /// path keeps its own buffer, which a whole URL parsed from one string would first
    /// have to turn into a shared one (an allocation) to hand out its three parts.
    ///
    /// `http` has no infallible way to build a URI, but this cannot fail for a path from
    /// [`PlivoClient::mpc_path`]: the auth id is ASCII alphanumerics (config), the name is
    /// percent-encoded and the uuid is hex digits. An error is a broken check.
    fn uri_of(&self, path: String) -> Result<Uri, http::Error> {
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(self.base.scheme().clone());
        parts.authority = Some(self.base.authority().clone());
        parts.path_and_query = Some(PathAndQuery::from_maybe_shared(Bytes::from(path))?);
        Ok(Uri::from_parts(parts)?)
    }

    /// When a call starting now must be over: `timeout` covers the whole call, every
    /// attempt and backoff, and both Plivo calls of a by-uuid request.
    pub fn deadline(&self) -> Instant {
        Instant::now() + self.timeout
    }

    /// Ends the MPC, retrying as the contract allows, never past `deadline`. Each
    /// attempt is counted in `metrics` by Plivo's status.
    pub async fn end_mpc(
        &self,
        account: &AccountCredentials,
        mpc: MpcRef<'_>,
        deadline: Instant,
        metrics: &Metrics,
    ) -> UpstreamReport {
        let path = PlivoClient::mpc_path(&account.auth_id, mpc);
        match self
            .call(Method::DELETE, path, account, deadline, metrics)
            .await
        {
            Ok((attempt, attempts)) => self.conclude_logged(account, attempt, attempts),
            Err(timed_out) => timed_out,
        }
    }

    /// Reads an MPC by uuid to learn its friendly name (for authorization), never past
    /// `deadline`. Each attempt is counted in `metrics` by Plivo's status.
    pub async fn lookup_name(
        &self,
        account: &AccountCredentials,
        uuid: &MpcUuid,
        deadline: Instant,
        metrics: &Metrics,
    ) -> Lookup {
        let path = PlivoClient::mpc_path(&account.auth_id, MpcRef::Uuid(uuid));
        let called = self
            .call(Method::GET, path, account, deadline, metrics)
            .await;
        let (attempt, attempts) = match called {
            Ok(done) => done,
            Err(timed_out) => return Lookup::Failed(timed_out),
        };
        let (name, body_cut) = match &attempt {
            Attempt::Answered {
                status,
                body,
                body_cut,
                ..
            } if status.is_success() => (friendly_name(body), *body_cut),
            _ => (None, false),
        };
        // The answer's head came in time and its body (the name) did not: what Plivo
        // said is unknown, as when nothing came back at all.
        if body_cut {
            return Lookup::Failed(self.timed_out(attempts));
        }
        let answer = self.conclude_logged(account, attempt, attempts);
        match (name, answer.outcome.is_ok()) {
            (Some(name), true) => Lookup::Found {
                name,
                attempts,
                status: answer.status,
            },
            (None, true) => Lookup::Failed(UpstreamReport {
                outcome: Err(Problem::UpstreamError {
                    status: answer.status.unwrap_or(200),
                    api_id: None,
                    error: Some("the MPC has no friendly_name".to_owned()),
                }),
                ..answer
            }),
            (_, false) => Lookup::Failed(answer),
        }
    }

    /// Sends `method path` with retries until `deadline`, counting every attempt sent
    /// in `metrics` (Plivo's status, or `error` when no answer came). `Err` is the
    /// report of a call that ended with no attempt to conclude: it ran out of time, or
    /// was never sent.
    async fn call(
        &self,
        method: Method,
        path: String,
        account: &AccountCredentials,
        deadline: Instant,
        metrics: &Metrics,
    ) -> Result<(Attempt, u32), UpstreamReport> {
        let uri = match self.uri_of(path) {
            Ok(uri) => uri,
            Err(err) => return Err(self.not_sent(&err)),
        };
        // A free slot is the usual case: take it without arming a timer. Waiting for one
        // counts against the same deadline as the call itself.
        let _slot = match self.in_flight.try_acquire() {
            Ok(slot) => slot,
            Err(_) => match tokio::time::timeout_at(deadline, self.in_flight.acquire()).await {
                Ok(Ok(slot)) => slot,
                _ => return Err(self.timed_out(0)),
            },
        };
        let mut attempts = 0;
        loop {
            attempts += 1;
            let attempt = self.attempt(method.clone(), uri.clone(), account, deadline, attempts);
            let Ok(attempt) = tokio::time::timeout_at(deadline, attempt).await else {
                metrics.upstream_answer(None);
                return Err(self.timed_out(attempts));
            };
            metrics.upstream_answer(attempt.status());
            if attempts >= self.max_attempts || !is_retriable(&attempt) {
                return Ok((attempt, attempts));
            }
            let backoff = backoff_delay(attempts);
            if Instant::now() + backoff >= deadline {
                // The contract's 504 at the deadline; but Plivo did answer, and the
                // record and the detail say what.
                tokio::time::sleep_until(deadline).await;
                return Err(match attempt.status() {
                    Some(status) => self.out_of_time(status, attempts),
                    None => self.timed_out(attempts),
                });
            }
            tokio::time::sleep(backoff).await;
        }
    }

    /// One attempt (`number`, from 1) of a call.
    async fn attempt(
        &self,
        method: Method,
        uri: Uri,
        account: &AccountCredentials,
        deadline: Instant,
        number: u32,
    ) -> Attempt {
        // Built from its parts: everything is already typed, so nothing can fail, and the
        // builder's checks and re-conversions are not paid on every call.
        // Room for the `Host` an HTTP/1.1 connection adds: a fourth header would grow (and
        // rehash) a map made for three.
        let mut headers = HeaderMap::with_capacity(4);
        headers.insert(AUTHORIZATION, account.authorization.clone());
        headers.insert(USER_AGENT, self.user_agent.clone());
        headers.insert(ACCEPT, HeaderValue::from_static("application/json"));
        let mut request = Request::new(Empty::new());
        *request.method_mut() = method;
        *request.uri_mut() = uri;
        *request.headers_mut() = headers;
        let body = BodyBounds {
            limit: MAX_ERROR_BODY,
            deadline,
        };
        match self.transport.send(request, body).await {
            Ok(response) => {
                let (parts, body) = response.into_parts();
                Attempt::Answered {
                    status: parts.status,
                    body_cut: parts.extensions.get::<BodyCutByDeadline>().is_some(),
                    headers: parts.headers,
                    body,
                }
            }
            Err(err) => {
                let attempt = err.retry_class();
                if self.unanswered_log.ready() {
                    tracing::warn!(
                        origin = %self.origin,
                        error = %causes::one_line(causes::chain(err.as_std())),
                        attempt = number,
                        retriable = is_retriable(&attempt),
                        "an attempt to call Plivo got no answer"
                    );
                }
                attempt
            }
        }
    }

    /// [`conclude`], and a log line when Plivo refused the account's credentials (an
    /// error: no call on that account can succeed) or failed with a 5xx; each at most
    /// once per [`FAILURE_LOG_INTERVAL`] (per account for the credentials), as every
    /// call would say the same.
    fn conclude_logged(
        &self,
        account: &AccountCredentials,
        attempt: Attempt,
        attempts: u32,
    ) -> UpstreamReport {
        let report = conclude(attempt, attempts);
        let status = report.status.unwrap_or_default();
        match &report.outcome {
            Err(Problem::UpstreamCredentialsRejected { .. }) if account.refused_log.ready() => {
                tracing::error!(
                    status,
                    account = %account.name,
                    "Plivo rejected the gateway's credentials; check the account's auth_id and auth_token"
                );
            }
            Err(Problem::UpstreamError { .. })
                if status >= 500 && self.server_error_log.ready() =>
            {
                tracing::warn!(
                    origin = %self.origin,
                    status,
                    attempts,
                    "Plivo answered with a server error"
                );
            }
            _ => {}
        }
        report
    }

    /// The report of a call whose URI could not be built ([`PlivoClient::uri_of`]): no
    /// attempt was made, and the error log says why.
    fn not_sent(&self, err: &http::Error) -> UpstreamReport {
        tracing::error!(
            origin = %self.origin,
            error = %err,
            "bug: the URI of an upstream call could not be built from its validated parts; the call was not sent"
        );
        report(Err(Problem::UpstreamUnavailable), None, 0)
    }

    /// The report of a call that ran out of `timeout` (`504`), logged at most once per
    /// [`FAILURE_LOG_INTERVAL`].
    fn timed_out(&self, attempts: u32) -> UpstreamReport {
        if self.timeout_log.ready() {
            tracing::warn!(
                origin = %self.origin,
                timeout = ?self.timeout,
                attempts,
                "an upstream call got no (complete) answer within the timeout"
            );
        }
        report(Err(Problem::UpstreamTimeout), None, attempts)
    }

    /// The report of a call whose last attempt Plivo answered with `status` (worth
    /// retrying), when the next attempt would have started past the deadline.
    fn out_of_time(&self, status: u16, attempts: u32) -> UpstreamReport {
        if self.timeout_log.ready() {
            tracing::warn!(
                origin = %self.origin,
                timeout = ?self.timeout,
                attempts,
                status,
                "Plivo kept answering with a status worth retrying until the timeout"
            );
        }
        report(
            Err(Problem::UpstreamOutOfTime { status }),
            Some(status),
            attempts,
        )
    }
}

fn client_tls_config(
    settings: &UpstreamSettings,
) -> Result<rustls::ClientConfig, UpstreamBuildError> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    for cert in &settings.extra_roots {
        roots
            .add(cert.clone())
            .map_err(|err| UpstreamBuildError::CaFile(err.to_string()))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    // ALPN is left to hyper-rustls, which sets it from the enabled HTTP versions.
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

fn is_retriable(attempt: &Attempt) -> bool {
    match attempt {
        Attempt::Answered { status, .. } => matches!(status.as_u16(), 502..=504),
        Attempt::Retriable => true,
        Attempt::Fatal => false,
    }
}

/// "Equal jitter": a random delay between half and all of an exponentially growing one.
fn backoff_delay(attempts_so_far: u32) -> Duration {
    let exponent = attempts_so_far.saturating_sub(1).min(16);
    let ceiling = FIRST_BACKOFF.saturating_mul(1 << exponent).min(MAX_BACKOFF);
    let ceiling_ms = millis(ceiling);
    Duration::from_millis(rand::thread_rng().gen_range(ceiling_ms / 2..=ceiling_ms))
}

fn report(outcome: Result<(), Problem>, status: Option<u16>, attempts: u32) -> UpstreamReport {
    UpstreamReport {
        outcome,
        status,
        attempts,
    }
}

/// Maps the last attempt to the caller's outcome (contract: "Mapping to the caller").
fn conclude(attempt: Attempt, attempts: u32) -> UpstreamReport {
    let (status, headers, body) = match attempt {
        Attempt::Answered {
            status,
            headers,
            body,
            ..
        } => (status, headers, body),
        Attempt::Retriable | Attempt::Fatal => {
            return report(Err(Problem::UpstreamUnavailable), None, attempts)
        }
    };
    let PlivoBody { api_id, error } = PlivoBody::parse(&body);
    let code = status.as_u16();
    let outcome = match code {
        200..=299 => Ok(()),
        404 => Err(Problem::MpcNotFound { api_id, error }),
        429 => Err(Problem::UpstreamRateLimited {
            retry_after: retry_after_secs(&headers, SystemTime::now()),
            api_id,
        }),
        401 | 403 => Err(Problem::UpstreamCredentialsRejected { api_id }),
        _ => Err(Problem::UpstreamError {
            status: code,
            api_id,
            error,
        }),
    };
    report(outcome, Some(code), attempts)
}

/// The longest `Retry-After` passed on: Plivo's limits refill in seconds, so a longer
/// wait is a fault on its side, and a caller told to wait days would stop for days.
const MAX_RETRY_AFTER_SECS: u64 = 3600;

/// Plivo's `Retry-After` in whole seconds, from 1 to [`MAX_RETRY_AFTER_SECS`]:
/// delay-seconds, or an HTTP-date (RFC 9110 §10.2.3) counted from `now` and rounded up.
/// Anything else, or a date already past, is 1.
fn retry_after_secs(headers: &HeaderMap, now: SystemTime) -> u64 {
    let Some(text) = headers.get(RETRY_AFTER).and_then(|v| v.to_str().ok()) else {
        return 1;
    };
    let text = text.trim();
    let secs = if text.bytes().all(|b| b.is_ascii_digit()) && !text.is_empty() {
        // Digits beyond u64 are a wait beyond the cap too.
        text.parse::<u64>().unwrap_or(u64::MAX)
    } else {
        httpdate::parse_http_date(text)
            .ok()
            .and_then(|at| at.duration_since(now).ok())
            .map_or(1, ceil_secs)
    };
    secs.clamp(1, MAX_RETRY_AFTER_SECS)
}

/// `friendly_name` of Plivo's MPC object (also accepted under `objects[0]`, the list form).
fn friendly_name(body: &[u8]) -> Option<String> {
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    let object = value
        .get("objects")
        .and_then(|objects| objects.get(0))
        .unwrap_or(&value);
    object
        .get("friendly_name")
        .and_then(|name| name.as_str())
        .map(str::to_owned)
}

/// The two members of a Plivo error body worth passing on.
#[derive(Debug, Default, PartialEq, Eq)]
struct PlivoBody {
    api_id: Option<String>,
    error: Option<String>,
}

impl PlivoBody {
    const MAX_FIELD: usize = 256;

    fn parse(body: &[u8]) -> PlivoBody {
        // Plivo's 204 has no body; parsing one would only allocate serde_json's error.
        if body.is_empty() {
            return PlivoBody::default();
        }
        let Ok(serde_json::Value::Object(map)) = serde_json::from_slice(body) else {
            return PlivoBody::default();
        };
        let field = |key: &str| {
            map.get(key)
                .and_then(|v| v.as_str())
                .map(|s| s.chars().take(Self::MAX_FIELD).collect::<String>())
        };
        PlivoBody {
            api_id: field("api_id"),
            error: field("error"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn mpc_urls_are_built_exactly_as_the_sdks_send_them() {
        let settings = UpstreamSettings {
            base_url: BaseUrl::try_from("https://api.example.test:8443").expect("base URL"),
            ca_file: None,
            extra_roots: Vec::new(),
            connect_timeout: Duration::from_secs(2),
            timeout: Duration::from_secs(5),
            max_attempts: 1,
        };
        let client = PlivoClient::new(&settings).expect("client");
        let name = MpcName::from_path_segment("conf%20%C3%BC+1").expect("valid name");
        let uri = |mpc| {
            let path = PlivoClient::mpc_path("MAXXXXXXXXXXXXXXXXXX", mpc);
            client
                .uri_of(path)
                .expect("every path built this way is a valid URI")
        };
        assert_eq!(
            uri(MpcRef::Name(&name)).to_string(),
            "https://api.example.test:8443/v1/Account/MAXXXXXXXXXXXXXXXXXX/MultiPartyCall/name_conf%20%C3%BC%2B1/"
        );
        let uuid = MpcUuid::parse("0c4a4a3e-5a8e-4c1e-9a55-2f6f8b1d2c3e").expect("uuid");
        assert_eq!(
            uri(MpcRef::Uuid(&uuid)).to_string(),
            "https://api.example.test:8443/v1/Account/MAXXXXXXXXXXXXXXXXXX/MultiPartyCall/uuid_0c4a4a3e-5a8e-4c1e-9a55-2f6f8b1d2c3e/"
        );
    }

    fn answered(status: u16, headers: &[(&'static str, &'static str)], body: &str) -> Attempt {
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            map.insert(*name, HeaderValue::from_static(value));
        }
        Attempt::Answered {
            status: StatusCode::from_u16(status).expect("status"),
            headers: map,
            body: Bytes::from(body.to_owned()),
            body_cut: false,
        }
    }

    #[test]
    fn retry_after_is_seconds_or_an_http_date_rounded_up() {
        let now = httpdate::parse_http_date("Fri, 27 Nov 2026 04:00:00 GMT").expect("date");
        let after = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(RETRY_AFTER, HeaderValue::from_str(value).expect("value"));
            retry_after_secs(&headers, now)
        };
        assert_eq!(after("7"), 7);
        assert_eq!(after(" 0 "), 1);
        assert_eq!(after("Fri, 27 Nov 2026 04:00:30 GMT"), 30);
        assert_eq!(
            retry_after_secs(
                &HeaderMap::from_iter([(
                    RETRY_AFTER,
                    HeaderValue::from_static("Fri, 27 Nov 2026 04:00:30 GMT")
                )]),
                now + Duration::from_millis(500),
            ),
            30,
            "29.5 s rounds up"
        );
        assert_eq!(
            after("Fri, 27 Nov 2026 03:59:00 GMT"),
            1,
            "a date already past"
        );
        assert_eq!(after("soon"), 1);
        assert_eq!(after("-5"), 1);
        assert_eq!(retry_after_secs(&HeaderMap::new(), now), 1);
        // A wait of days (or more than u64 holds) is passed on as an hour.
        assert_eq!(after("3600"), 3600);
        assert_eq!(after("3601"), MAX_RETRY_AFTER_SECS);
        assert_eq!(after("999999999999"), MAX_RETRY_AFTER_SECS);
        assert_eq!(after("99999999999999999999999"), MAX_RETRY_AFTER_SECS);
        assert_eq!(
            after("Sat, 28 Nov 2026 04:00:00 GMT"),
            MAX_RETRY_AFTER_SECS,
            "a date a day away"
        );
    }

    #[test]
    fn maps_plivo_answers() {
        assert!(conclude(answered(204, &[], ""), 1).outcome.is_ok());
        let not_found = conclude(
            answered(404, &[], r#"{"api_id":"a1","error":"not found"}"#),
            1,
        );
        assert_eq!(
            not_found.outcome,
            Err(Problem::MpcNotFound {
                api_id: Some("a1".into()),
                error: Some("not found".into())
            })
        );
        assert_eq!(not_found.api_id(), Some("a1"));
        let limited = conclude(answered(429, &[("retry-after", "7")], ""), 1);
        assert_eq!(limited.outcome.err().and_then(|p| p.retry_after()), Some(7));
        let limited = conclude(answered(429, &[], ""), 1);
        assert_eq!(limited.outcome.err().and_then(|p| p.retry_after()), Some(1));
        for status in [401, 403] {
            let rejected = conclude(answered(status, &[], ""), 1);
            assert_eq!(
                rejected.outcome.err().map(|p| p.slug()),
                Some("upstream-credentials-rejected")
            );
        }
        for status in [400, 500, 503] {
            let failed = conclude(answered(status, &[], "not json"), 3);
            assert_eq!(
                failed.outcome.err().map(|p| p.slug()),
                Some("upstream-error")
            );
        }
        let gone = conclude(Attempt::Retriable, 3);
        assert_eq!(
            gone.outcome.err().map(|p| p.slug()),
            Some("upstream-unavailable")
        );
        assert_eq!(gone.status, None);
    }

    #[test]
    fn only_connect_errors_and_gateway_statuses_retry() {
        assert!(is_retriable(&Attempt::Retriable));
        assert!(!is_retriable(&Attempt::Fatal));
        for status in [502, 503, 504] {
            assert!(is_retriable(&answered(status, &[], "")));
        }
        for status in [204, 404, 429, 500, 401] {
            assert!(!is_retriable(&answered(status, &[], "")));
        }
    }

    #[test]
    fn backoff_grows_with_jitter_and_is_capped() {
        for _ in 0..100 {
            let first = backoff_delay(1);
            assert!(first >= Duration::from_millis(50) && first <= Duration::from_millis(100));
            let third = backoff_delay(3);
            assert!(third >= Duration::from_millis(200) && third <= Duration::from_millis(400));
            assert!(backoff_delay(30) <= MAX_BACKOFF);
        }
    }

    #[test]
    fn plivo_body_fields_are_bounded() {
        let long = "x".repeat(1000);
        let body = format!(r#"{{"api_id":"{long}","error":5}}"#);
        let parsed = PlivoBody::parse(body.as_bytes());
        assert_eq!(parsed.api_id.map(|s| s.len()), Some(256));
        assert_eq!(parsed.error, None);
        assert_eq!(PlivoBody::parse(b"\xff"), PlivoBody::default());
    }
}
