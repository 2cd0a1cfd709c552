//! The one place where a refusal or failure becomes an HTTP status, a problem slug and an
//! RFC 9457 `application/problem+json` body.

use bytes::Bytes;
use http::header::{HeaderValue, ALLOW, CONNECTION, CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE};
use http::{Response, StatusCode};
use http_body_util::Full;
use serde::Serialize;

use crate::gateway::{
    MAX_BODY_BYTES, MAX_HEADER_BLOCK_BYTES, MAX_HEADER_FIELDS, MAX_REQUEST_LINE_BYTES,
};
use crate::mpc_name::{InvalidMpcName, InvalidMpcUuid};
use crate::rate_limit::{RATELIMIT, RATELIMIT_POLICY};
use crate::routes::Flavor;

/// Why a request was not answered with success. Each variant has exactly one status and
/// one slug.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    #[error("the request is malformed: {0}")]
    BadRequest(&'static str),
    #[error("the request line is longer than {REQUEST_LINE_KIB} KiB")]
    UriTooLong,
    #[error("the request headers are larger than {HEADER_BLOCK_KIB} KiB or have more than {MAX_HEADER_FIELDS} fields")]
    HeadersTooLarge,
    #[error("no such route")]
    NotFound,
    #[error("only {allow} is allowed here")]
    MethodNotAllowed { allow: &'static str },
    #[error("the request body is larger than {BODY_KIB} KiB")]
    PayloadTooLarge,
    #[error("the request body was not received in time")]
    BodyTimeout,
    #[error("valid credentials are required")]
    Unauthenticated,
    #[error("{0}")]
    InvalidMpcName(InvalidMpcName),
    #[error("{0}")]
    InvalidMpcUuid(InvalidMpcUuid),
    #[error("this tenant may not end that MPC")]
    Forbidden,
    #[error("the {limit} rate limit is exhausted")]
    RateLimited {
        limit: &'static str,
        retry_after: u64,
        policy: HeaderValue,
        state: HeaderValue,
    },
    #[error("the audit log cannot be written; the request was not forwarded")]
    AuditUnavailable,
    #[error("the shared rate-limit store is unavailable")]
    RateLimitStoreUnavailable,
    #[error("the gateway is shutting down")]
    ShuttingDown,
    #[error("{}", upstream_detail("Plivo has no such active MPC", .api_id, .error))]
    MpcNotFound {
        api_id: Option<String>,
        error: Option<String>,
    },
    #[error("{}", upstream_detail("Plivo rate-limited the account", .api_id, &None))]
    UpstreamRateLimited {
        retry_after: u64,
        api_id: Option<String>,
    },
    #[error("{}", upstream_detail("Plivo rejected the gateway's credentials", .api_id, &None))]
    UpstreamCredentialsRejected { api_id: Option<String> },
    #[error("{}", upstream_detail(&format!("Plivo answered {status}"), .api_id, .error))]
    UpstreamError {
        status: u16,
        api_id: Option<String>,
        error: Option<String>,
    },
    #[error("Plivo could not be reached")]
    UpstreamUnavailable,
    #[error("Plivo did not answer in time")]
    UpstreamTimeout,
    /// Plivo answered with a status worth retrying, and the wait before the next
    /// attempt would have passed `upstream.timeout`.
    #[error("Plivo answered {status}, and no further attempt fitted in upstream.timeout")]
    UpstreamOutOfTime { status: u16 },
}

// The size limits as the refusals state them, from the limits the gateway enforces, so
// the two cannot drift apart.
const REQUEST_LINE_KIB: usize = whole_kib(MAX_REQUEST_LINE_BYTES);
const HEADER_BLOCK_KIB: usize = whole_kib(MAX_HEADER_BLOCK_BYTES);
const BODY_KIB: usize = whole_kib(MAX_BODY_BYTES);

/// `bytes` in KiB; a limit that is not a whole number of KiB fails the build rather than
/// be stated rounded down.
const fn whole_kib(bytes: usize) -> usize {
    assert!(
        bytes.is_multiple_of(1024),
        "a size limit is not a whole number of KiB"
    );
    bytes / 1024
}

fn upstream_detail(what: &str, api_id: &Option<String>, error: &Option<String>) -> String {
    let mut detail = what.to_owned();
    if let Some(error) = error {
        detail.push_str(&format!(": {error}"));
    }
    if let Some(api_id) = api_id {
        detail.push_str(&format!(" (api_id {api_id})"));
    }
    detail
}

impl Problem {
    pub fn status(&self) -> StatusCode {
        match self {
            Problem::BadRequest(_) | Problem::InvalidMpcName(_) | Problem::InvalidMpcUuid(_) => {
                StatusCode::BAD_REQUEST
            }
            Problem::UriTooLong => StatusCode::URI_TOO_LONG,
            Problem::HeadersTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Problem::NotFound | Problem::MpcNotFound { .. } => StatusCode::NOT_FOUND,
            Problem::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            Problem::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Problem::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            Problem::Unauthenticated => StatusCode::UNAUTHORIZED,
            Problem::Forbidden => StatusCode::FORBIDDEN,
            Problem::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            Problem::AuditUnavailable
            | Problem::RateLimitStoreUnavailable
            | Problem::ShuttingDown
            | Problem::UpstreamRateLimited { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Problem::UpstreamCredentialsRejected { .. }
            | Problem::UpstreamError { .. }
            | Problem::UpstreamUnavailable => StatusCode::BAD_GATEWAY,
            Problem::UpstreamTimeout | Problem::UpstreamOutOfTime { .. } => {
                StatusCode::GATEWAY_TIMEOUT
            }
        }
    }

    /// The problem slug: `type` is `urn:mpc-gateway:<slug>`; also the audit `reason`.
    pub fn slug(&self) -> &'static str {
        match self {
            Problem::BadRequest(_) => "bad-request",
            Problem::UriTooLong => "uri-too-long",
            Problem::HeadersTooLarge => "request-header-fields-too-large",
            Problem::NotFound => "not-found",
            Problem::MethodNotAllowed { .. } => "method-not-allowed",
            Problem::PayloadTooLarge => "payload-too-large",
            Problem::BodyTimeout => "request-timeout",
            Problem::Unauthenticated => "unauthenticated",
            Problem::InvalidMpcName(_) => "invalid-mpc-name",
            Problem::InvalidMpcUuid(_) => "invalid-mpc-uuid",
            Problem::Forbidden => "forbidden",
            Problem::RateLimited { .. } => "rate-limited",
            Problem::AuditUnavailable => "audit-unavailable",
            Problem::RateLimitStoreUnavailable => "rate-limit-store-unavailable",
            Problem::ShuttingDown => "shutting-down",
            Problem::MpcNotFound { .. } => "mpc-not-found",
            Problem::UpstreamRateLimited { .. } => "upstream-rate-limited",
            Problem::UpstreamCredentialsRejected { .. } => "upstream-credentials-rejected",
            Problem::UpstreamError { .. } => "upstream-error",
            Problem::UpstreamUnavailable => "upstream-unavailable",
            Problem::UpstreamTimeout | Problem::UpstreamOutOfTime { .. } => "upstream-timeout",
        }
    }

    fn title(&self) -> &'static str {
        match self {
            Problem::BadRequest(_) => "Bad request",
            Problem::UriTooLong => "Request line too long",
            Problem::HeadersTooLarge => "Request headers too large",
            Problem::NotFound => "Not found",
            Problem::MethodNotAllowed { .. } => "Method not allowed",
            Problem::PayloadTooLarge => "Payload too large",
            Problem::BodyTimeout => "Request timeout",
            Problem::Unauthenticated => "Unauthenticated",
            Problem::InvalidMpcName(_) => "Invalid MPC name",
            Problem::InvalidMpcUuid(_) => "Invalid MPC uuid",
            Problem::Forbidden => "Forbidden",
            Problem::RateLimited { .. } => "Rate limited",
            Problem::AuditUnavailable => "Audit log unavailable",
            Problem::RateLimitStoreUnavailable => "Rate-limit store unavailable",
            Problem::ShuttingDown => "Shutting down",
            Problem::MpcNotFound { .. } => "MPC not found",
            Problem::UpstreamRateLimited { .. } => "Upstream rate limited",
            Problem::UpstreamCredentialsRejected { .. } => "Upstream rejected credentials",
            Problem::UpstreamError { .. } => "Upstream error",
            Problem::UpstreamUnavailable => "Upstream unavailable",
            Problem::UpstreamTimeout | Problem::UpstreamOutOfTime { .. } => "Upstream timeout",
        }
    }

    pub fn retry_after(&self) -> Option<u64> {
        match self {
            Problem::RateLimited { retry_after, .. }
            | Problem::UpstreamRateLimited { retry_after, .. } => Some(*retry_after),
            Problem::RateLimitStoreUnavailable => Some(1),
            _ => None,
        }
    }

    /// Plivo's `api_id`, when Plivo answered.
    pub fn plivo_api_id(&self) -> Option<&str> {
        match self {
            Problem::MpcNotFound { api_id, .. }
            | Problem::UpstreamRateLimited { api_id, .. }
            | Problem::UpstreamCredentialsRejected { api_id }
            | Problem::UpstreamError { api_id, .. } => api_id.as_deref(),
            _ => None,
        }
    }

    /// Whether the connection must not be reused after this answer.
    pub fn closes_connection(&self) -> bool {
        // After a body timeout the rest of the body may still arrive: the stream cannot
        // carry another request.
        matches!(
            self,
            Problem::BadRequest(_) | Problem::BodyTimeout | Problem::ShuttingDown
        )
    }

    /// Builds the full response: status, body in the route's style, and the headers this
    /// problem needs.
    pub fn to_response(&self, request_id: &str, flavor: Flavor) -> Response<Full<Bytes>> {
        let (content_type, body) = match flavor {
            Flavor::Native => ("application/problem+json", self.problem_body(request_id)),
            Flavor::Plivo => ("application/json", self.plivo_body(request_id)),
        };
        let mut response = Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() = self.status();
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
        if let Some(seconds) = self.retry_after() {
            headers.insert(RETRY_AFTER, HeaderValue::from(seconds));
        }
        match self {
            Problem::Unauthenticated => {
                let scheme = match flavor {
                    Flavor::Native => "Bearer",
                    Flavor::Plivo => "Basic realm=\"mpc-gateway\"",
                };
                headers.insert(WWW_AUTHENTICATE, HeaderValue::from_static(scheme));
            }
            Problem::MethodNotAllowed { allow } => {
                headers.insert(ALLOW, HeaderValue::from_static(allow));
            }
            Problem::RateLimited { policy, state, .. } => {
                headers.insert(RATELIMIT_POLICY, policy.clone());
                headers.insert(RATELIMIT, state.clone());
            }
            _ => {}
        }
        if self.closes_connection() {
            headers.insert(CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }

    /// RFC 9457 body. Serializing plain strings and integers cannot fail; an empty body
    /// would still be a valid refusal should it ever happen.
    fn problem_body(&self, request_id: &str) -> Vec<u8> {
        let body = ProblemBody {
            kind: format!("urn:mpc-gateway:{}", self.slug()),
            title: self.title(),
            status: self.status().as_u16(),
            detail: self.to_string(),
            request_id,
            retry_after: self.retry_after(),
        };
        serde_json::to_vec(&body).unwrap_or_default()
    }

    /// Plivo's error shape: the SDKs turn `error` into their exception message. With
    /// `Retry-After`, also `retry_after` (DESIGN §1: every such response has it); the
    /// SDKs ignore members they do not know.
    fn plivo_body(&self, request_id: &str) -> Vec<u8> {
        let body = PlivoErrorBody {
            api_id: request_id,
            error: self.to_string(),
            retry_after: self.retry_after(),
        };
        serde_json::to_vec(&body).unwrap_or_default()
    }
}

#[derive(Serialize)]
struct PlivoErrorBody<'a> {
    api_id: &'a str,
    error: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    retry_after: Option<u64>,
}

#[derive(Serialize)]
struct ProblemBody<'a> {
    #[serde(rename = "type")]
    kind: String,
    title: &'static str,
    status: u16,
    detail: String,
    request_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    retry_after: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    async fn body_json(response: Response<Full<Bytes>>) -> serde_json::Value {
        let bytes = response
            .into_body()
            .collect()
            .await
            .expect("full body")
            .to_bytes();
        serde_json::from_slice(&bytes).expect("json")
    }

    #[tokio::test]
    async fn unauthenticated_body_and_headers() {
        let response = Problem::Unauthenticated.to_response("req-1", Flavor::Native);
        assert_eq!(response.status(), 401);
        assert_eq!(response.headers()[WWW_AUTHENTICATE], "Bearer");
        assert_eq!(response.headers()[CONTENT_TYPE], "application/problem+json");
        let body = body_json(response).await;
        assert_eq!(body["type"], "urn:mpc-gateway:unauthenticated");
        assert_eq!(body["status"], 401);
        assert_eq!(body["request_id"], "req-1");
        assert!(body.get("retry_after").is_none());
    }

    #[tokio::test]
    async fn rate_limited_carries_retry_after_in_header_and_body() {
        let problem = Problem::RateLimited {
            limit: "tenant",
            retry_after: 2,
            policy: HeaderValue::from_static("\"tenant\";q=10;w=2"),
            state: HeaderValue::from_static("\"tenant\";r=0;t=2"),
        };
        let response = problem.to_response("r", Flavor::Native);
        assert_eq!(response.status(), 429);
        assert_eq!(response.headers()[RETRY_AFTER], "2");
        assert_eq!(
            response.headers()["ratelimit-policy"],
            "\"tenant\";q=10;w=2"
        );
        assert_eq!(response.headers()["ratelimit"], "\"tenant\";r=0;t=2");
        assert_eq!(body_json(response).await["retry_after"], 2);
    }

    #[test]
    fn upstream_detail_carries_plivo_ids_only() {
        let problem = Problem::MpcNotFound {
            api_id: Some("abc".into()),
            error: Some("not found".into()),
        };
        assert_eq!(
            problem.to_string(),
            "Plivo has no such active MPC: not found (api_id abc)"
        );
        assert_eq!(problem.status(), 404);
        assert_eq!(Problem::UpstreamTimeout.status(), 504);
        let out_of_time = Problem::UpstreamOutOfTime { status: 503 };
        assert_eq!(out_of_time.status(), 504);
        assert_eq!(out_of_time.slug(), "upstream-timeout");
        let not_allowed = Problem::MethodNotAllowed { allow: "POST" };
        assert_eq!(
            not_allowed.to_response("r", Flavor::Native).headers()[ALLOW],
            "POST"
        );
    }

    /// The texts are part of the contract; the numbers in them come from the limits.
    #[test]
    fn size_refusals_state_the_enforced_limits() {
        assert_eq!(
            Problem::UriTooLong.to_string(),
            "the request line is longer than 8 KiB"
        );
        assert_eq!(
            Problem::HeadersTooLarge.to_string(),
            "the request headers are larger than 32 KiB or have more than 100 fields"
        );
        assert_eq!(
            Problem::PayloadTooLarge.to_string(),
            "the request body is larger than 4 KiB"
        );
    }

    #[tokio::test]
    async fn plivo_flavour_has_api_id_and_error() {
        let response = Problem::Unauthenticated.to_response("req-9", Flavor::Plivo);
        assert_eq!(response.status(), 401);
        assert_eq!(response.headers()[CONTENT_TYPE], "application/json");
        assert_eq!(
            response.headers()[WWW_AUTHENTICATE],
            "Basic realm=\"mpc-gateway\""
        );
        let body = body_json(response).await;
        assert_eq!(body["api_id"], "req-9");
        assert_eq!(body["error"], "valid credentials are required");
    }
}
