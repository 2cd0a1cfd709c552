//! The trail of one request: what its audit record and metrics need, filled in as the
//! request moves along the path.

use std::time::Instant;

use http::Request;

use crate::audit::record::{truncate_on_char_boundary, MAX_PATH_BYTES};
use crate::audit::{AuditEvent, EventKind};
use crate::request_id::RequestId;
use crate::routes::{flavor_of, Flavor};

use super::ClientAddr;

/// What the audit record and the metrics need to know about one request, filled in as
/// the request moves along the path.
pub(super) struct Trail {
    pub(super) started: Instant,
    /// How replies to this request are shaped.
    pub(super) flavor: Flavor,
    pub(super) request_id: String,
    pub(super) client: Option<String>,
    pub(super) method: String,
    pub(super) path: String,
    pub(super) tenant: Option<String>,
    pub(super) token_fp: Option<String>,
    pub(super) mpc: Option<String>,
    pub(super) account: Option<String>,
    pub(super) status: Option<u16>,
    pub(super) reason: Option<&'static str>,
    pub(super) upstream_status: Option<u16>,
    pub(super) plivo_api_id: Option<String>,
    pub(super) attempts: Option<u32>,
    pub(super) rate_headers: Option<(String, String)>,
}

impl Trail {
    pub(super) fn new<B>(request: &Request<B>, started: Instant) -> Trail {
        let request_id = request
            .extensions()
            .get::<RequestId>()
            .cloned()
            .unwrap_or_else(RequestId::fresh);
        Trail {
            started,
            flavor: flavor_of(request.uri().path()),
            request_id: request_id.as_str().to_owned(),
            client: request
                .extensions()
                .get::<ClientAddr>()
                .map(|addr| addr.0.to_string()),
            method: request.method().as_str().to_owned(),
            // Cut here already, so a long target is not copied into both records.
            path: truncate_on_char_boundary(
                &super::request_target(request.version(), request.uri()),
                MAX_PATH_BYTES,
            )
            .to_owned(),
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

    pub(super) fn event(&self, kind: EventKind) -> AuditEvent {
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
