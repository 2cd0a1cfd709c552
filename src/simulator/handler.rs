//! Answering one request: count and record it, apply a queued fault and the latency, then
//! route by path and method to the registry, with Plivo-like JSON answers and errors.

use std::convert::Infallible;
use std::io;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use http_body_util::{BodyExt as _, Either, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderName, HeaderValue, ALLOW, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use uuid::Uuid;

use crate::sync::lock_unpoisoned;

use super::conn::stopped;
use super::registry::MpcInfo;
use super::stream::ConnectionSwitch;
use super::{Fault, RecordedRequest, Shared};

/// Largest request body the simulator reads (and records); a larger one fails the request.
const MAX_BODY: usize = 1 << 20;
/// Plivo's wording for a bad `Authorization` header or an account mismatch.
pub(super) const ERR_AUTH: &str = "Authentication credentials invalid.";
/// Plivo's wording for an unknown resource.
pub(super) const ERR_NOT_FOUND: &str = "not found";

/// An answer's body: whole, or (for [`Fault::StalledBody`]) one that never ends.
pub(super) type AnswerBody = Either<Full<Bytes>, StalledBody>;

/// Answer one request: count, record, apply a queued fault, wait the latency, route.
pub(super) async fn handle(
    shared: Arc<Shared>,
    switch: Arc<ConnectionSwitch>,
    req: Request<Incoming>,
) -> Result<Response<AnswerBody>, io::Error> {
    shared.request_count.fetch_add(1, Ordering::SeqCst);
    let (parts, body) = req.into_parts();
    let body = Limited::new(body, MAX_BODY)
        .collect()
        .await
        .map_err(|err| io::Error::new(io::ErrorKind::InvalidData, err))?
        .to_bytes();
    if shared.record {
        let recorded = RecordedRequest {
            method: parts.method.as_str().to_owned(),
            version: format!("{:?}", parts.version),
            target: match parts.version {
                // hyper rebuilds an HTTP/2 URI from :scheme, :authority and :path.
                http::Version::HTTP_2 => parts
                    .uri
                    .path_and_query()
                    .map_or_else(String::new, |p| p.as_str().to_owned()),
                _ => parts.uri.to_string(),
            },
            authority: match parts.version {
                http::Version::HTTP_2 => parts.uri.authority().map(|a| a.as_str().to_owned()),
                _ => None,
            },
            headers: parts
                .headers
                .iter()
                .map(|(name, value)| {
                    (
                        name.as_str().to_owned(),
                        String::from_utf8_lossy(value.as_bytes()).into_owned(),
                    )
                })
                .collect(),
            body,
        };
        lock_unpoisoned(&shared.requests).push(recorded);
    }

    match shared.next_fault(parts.uri.path()) {
        None => {}
        Some(Fault::Reset) => {
            // The connection task drops the connection (SO_LINGER 0: an RST) without
            // answering. Not returning an error here matters for HTTP/2, where hyper would
            // first send an RST_STREAM for this stream alone.
            switch.fire();
            std::future::pending::<()>().await;
        }
        Some(Fault::ResetStream) => {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionReset,
                "injected fault: stream reset",
            ));
        }
        Some(Fault::Hang) => {
            stopped(&mut shared.stop.subscribe()).await;
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "injected fault: hang ended by shutdown",
            ));
        }
        Some(Fault::Status {
            status,
            headers,
            body,
        }) => {
            if !shared.latency.is_zero() {
                tokio::time::sleep(shared.latency).await;
            }
            return Ok(fault_response(status, headers, body).map(Either::Left));
        }
        Some(Fault::StalledBody(status)) => {
            if !shared.latency.is_zero() {
                tokio::time::sleep(shared.latency).await;
            }
            return Ok(stalled_response(status));
        }
        Some(Fault::Delay(delay)) => tokio::time::sleep(delay).await,
        Some(Fault::GoAway) => switch.go_away(),
    }
    if !shared.latency.is_zero() {
        tokio::time::sleep(shared.latency).await;
    }
    Ok(route(&shared, &parts.method, parts.uri.path(), &parts.headers).map(Either::Left))
}

/// A body that sends its first bytes and then waits for ever: the connection's own
/// shutdown (the simulator stopping) is what ends it.
pub(super) struct StalledBody {
    first: Option<Bytes>,
    promised: u64,
}

impl http_body::Body for StalledBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut().first.take() {
            Some(first) => Poll::Ready(Some(Ok(Frame::data(first)))),
            // Nothing will ever wake this: the rest never comes.
            None => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        false
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.promised)
    }
}

fn stalled_response(status: u16) -> Response<AnswerBody> {
    const FIRST: &[u8] = br#"{"api_id": "#;
    const PROMISED: u64 = 64;
    let mut resp = Response::new(Either::Right(StalledBody {
        first: Some(Bytes::from_static(FIRST)),
        promised: PROMISED,
    }));
    *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp.headers_mut()
        .insert(CONTENT_LENGTH, HeaderValue::from(PROMISED));
    resp
}

fn fault_response(
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
) -> Response<Full<Bytes>> {
    let has_body = !body.is_empty();
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = StatusCode::from_u16(status).unwrap_or_else(|_| {
        tracing::warn!(
            status,
            "plivo simulator: invalid fault status, answering 500"
        );
        StatusCode::INTERNAL_SERVER_ERROR
    });
    for (name, value) in headers {
        match (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(&value),
        ) {
            (Ok(name), Ok(value)) => {
                resp.headers_mut().append(name, value);
            }
            _ => tracing::warn!(header = %name, "plivo simulator: skipping invalid fault header"),
        }
    }
    if has_body && !resp.headers().contains_key(CONTENT_TYPE) {
        resp.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    }
    resp
}

fn json_response(status: StatusCode, value: &serde_json::Value) -> Response<Full<Bytes>> {
    let body = serde_json::to_vec(value).unwrap_or_default();
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

fn error_response(status: StatusCode, message: &str) -> Response<Full<Bytes>> {
    json_response(
        status,
        &serde_json::json!({ "api_id": Uuid::new_v4().to_string(), "error": message }),
    )
}

fn no_content() -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::new()));
    *resp.status_mut() = StatusCode::NO_CONTENT;
    resp
}

pub(super) enum MpcRef {
    Name(String),
    Uuid(Uuid),
}

/// Parse the part after `MultiPartyCall/`: `name_{pct-encoded}` or `uuid_{uuid}`, with an
/// optional trailing slash. `None` for anything else (answered `404`).
pub(super) fn parse_mpc_ref(rest: &str) -> Option<MpcRef> {
    let id = rest.strip_suffix('/').unwrap_or(rest);
    if id.contains('/') {
        return None;
    }
    if let Some(encoded) = id.strip_prefix("name_") {
        let name = percent_encoding::percent_decode_str(encoded)
            .decode_utf8()
            .ok()?;
        if name.is_empty() {
            return None;
        }
        Some(MpcRef::Name(name.into_owned()))
    } else if let Some(uuid) = id.strip_prefix("uuid_") {
        Uuid::try_parse(uuid).ok().map(MpcRef::Uuid)
    } else {
        None
    }
}

fn route(
    shared: &Shared,
    method: &Method,
    path: &str,
    headers: &hyper::HeaderMap,
) -> Response<Full<Bytes>> {
    let Some((path_auth_id, rest)) = path
        .strip_prefix("/v1/Account/")
        .and_then(|rest| rest.split_once('/'))
    else {
        return error_response(StatusCode::NOT_FOUND, ERR_NOT_FOUND);
    };
    if !shared.authorized(headers.get(AUTHORIZATION), path_auth_id) {
        return error_response(StatusCode::UNAUTHORIZED, ERR_AUTH);
    }
    let Some(mpc) = rest.strip_prefix("MultiPartyCall/").and_then(parse_mpc_ref) else {
        return error_response(StatusCode::NOT_FOUND, ERR_NOT_FOUND);
    };
    match *method {
        Method::DELETE => {
            let ended = {
                let mut registry = lock_unpoisoned(&shared.registry);
                match &mpc {
                    MpcRef::Name(name) => registry.end_by_name(name),
                    MpcRef::Uuid(uuid) => registry.end_by_uuid(*uuid),
                }
            };
            if ended {
                no_content()
            } else {
                error_response(StatusCode::NOT_FOUND, ERR_NOT_FOUND)
            }
        }
        Method::GET => {
            let info = {
                let mut registry = lock_unpoisoned(&shared.registry);
                match &mpc {
                    MpcRef::Name(name) => registry.describe_name(name),
                    MpcRef::Uuid(uuid) => registry.describe_uuid(*uuid),
                }
            };
            match info {
                Some(info) => json_response(StatusCode::OK, &describe(&shared.auth_id, &info)),
                None => error_response(StatusCode::NOT_FOUND, ERR_NOT_FOUND),
            }
        }
        _ => {
            let mut resp = error_response(StatusCode::METHOD_NOT_ALLOWED, "method not allowed");
            resp.headers_mut()
                .insert(ALLOW, HeaderValue::from_static("GET, DELETE"));
            resp
        }
    }
}

/// The body of `GET .../MultiPartyCall/uuid_{uuid}/`, shaped like Plivo's.
fn describe(auth_id: &str, info: &MpcInfo) -> serde_json::Value {
    let uuid = info.uuid.to_string();
    let (status, term_cause, term_cause_code) = if info.live {
        ("Active", serde_json::Value::Null, serde_json::Value::Null)
    } else {
        ("Ended", "API Request".into(), 4020.into())
    };
    serde_json::json!({
        "api_id": Uuid::new_v4().to_string(),
        "friendly_name": info.name,
        "mpc_uuid": uuid,
        "status": status,
        "term_cause": term_cause,
        "term_cause_code": term_cause_code,
        "sub_account": null,
        "participants": format!("/v1/Account/{auth_id}/MultiPartyCall/uuid_{uuid}/Participant/"),
        "resource_uri": format!("/v1/Account/{auth_id}/MultiPartyCall/uuid_{uuid}/"),
    })
}
