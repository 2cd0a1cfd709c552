//! The trail of one request: what its audit record and metrics need, filled in as the
//! request moves along the path.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Instant;

use http::{HeaderValue, Method, Request};

use crate::audit::record::{truncate_on_char_boundary, MAX_METHOD_BYTES, MAX_PATH_BYTES};
use crate::audit::{AuditEvent, AuditLog, EventKind};
use crate::millis::millis;
use crate::request_id::{RequestId, X_REQUEST_ID};
use crate::routes::{flavor_of, Flavor};
use crate::telemetry::CachedSeries;

use super::Peer;

/// What the audit record and the metrics need to know about one request, filled in as
/// the request moves along the path. Text is kept as the audit event wants it, so each
/// record costs no copy.
pub(super) struct Trail {
    pub(super) started: Instant,
    /// How replies to this request are shaped.
    pub(super) flavor: Flavor,
    pub(super) request_id: Arc<str>,
    /// The reply's `X-Request-Id`.
    pub(super) request_id_header: HeaderValue,
    pub(super) client: Option<Arc<str>>,
    pub(super) method: Cow<'static, str>,
    pub(super) path: Arc<str>,
    pub(super) tenant: Option<Arc<str>>,
    pub(super) token_fp: Option<Arc<str>>,
    pub(super) mpc: Option<Arc<str>>,
    pub(super) account: Option<Arc<str>>,
    pub(super) status: Option<u16>,
    pub(super) reason: Option<&'static str>,
    pub(super) upstream_status: Option<u16>,
    pub(super) plivo_api_id: Option<Arc<str>>,
    pub(super) attempts: Option<u32>,
    pub(super) rate_headers: Option<(HeaderValue, HeaderValue)>,
    /// The authenticated tenant's series for an ended MPC.
    pub(super) ended_requests: Option<Arc<CachedSeries>>,
    /// Set until the request's terminal record is in hand: a `denied` record handed to
    /// the log, or (once forwarded) the table of forwarded requests. A trail dropped
    /// while set belongs to a request whose connection was closed when `shutdown_grace`
    /// ran out: it writes that request's `denied` record itself.
    unrecorded: Option<AuditLog>,
}

impl Trail {
    pub(super) fn new<B>(
        request: &Request<B>,
        peer: &Peer,
        started: Instant,
        audit: &AuditLog,
    ) -> Trail {
        let (request_id, request_id_header) =
            RequestId::from_header(request.headers().get(&X_REQUEST_ID)).into_parts();
        Trail {
            started,
            flavor: flavor_of(request.uri().path()),
            request_id,
            request_id_header,
            client: Some(Arc::clone(peer.client())),
            method: method_text(request.method()),
            // Cut here already, so a long target is not copied into both records.
            path: Arc::from(truncate_on_char_boundary(
                &super::request_target(request.version(), request.uri()),
                MAX_PATH_BYTES,
            )),
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
            ended_requests: None,
            unrecorded: Some(audit.clone()),
        }
    }

    /// The terminal record is someone's job now (see `unrecorded`).
    pub(super) fn recorded(&mut self) {
        self.unrecorded = None;
    }

    pub(super) fn event(&self, kind: EventKind) -> AuditEvent {
        let duration_ms = match kind {
            EventKind::Forward => None,
            _ => Some(millis(self.started.elapsed())),
        };
        AuditEvent {
            event: kind,
            request_id: Arc::clone(&self.request_id),
            tenant: self.tenant.clone(),
            token_fp: self.token_fp.clone(),
            client: self.client.clone(),
            method: self.method.clone(),
            path: Arc::clone(&self.path),
            mpc: self.mpc.clone(),
            account: self.account.clone(),
            status: self.status,
            reason: self.reason.map(Cow::Borrowed),
            upstream_status: self.upstream_status,
            plivo_api_id: self.plivo_api_id.clone(),
            attempts: self.attempts,
            duration_ms,
        }
    }
}

impl Drop for Trail {
    fn drop(&mut self) {
        if let Some(audit) = self.unrecorded.take() {
            // The caller got no answer: no status.
            self.status = None;
            self.reason = Some("shutting-down");
            // Handed over now; nobody is left to wait for the acknowledgement (a log
            // already closed refuses it, and there is no one to tell).
            drop(audit.submit(self.event(EventKind::Denied)));
        }
    }
}

/// The method's name, static for the methods callers actually use; any other cut to
/// [`MAX_METHOD_BYTES`] (a method is ASCII, so any cut is on a character boundary).
fn method_text(method: &Method) -> Cow<'static, str> {
    let name = match *method {
        Method::POST => "POST",
        Method::DELETE => "DELETE",
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::OPTIONS => "OPTIONS",
        _ => {
            let name = truncate_on_char_boundary(method.as_str(), MAX_METHOD_BYTES);
            return Cow::Owned(name.to_owned());
        }
    };
    Cow::Borrowed(name)
}
