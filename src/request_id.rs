//! `X-Request-Id`: keeps the caller's id when it is 1–128 visible ASCII characters,
//! otherwise makes a UUID v4; puts it in the request extensions for the handler and the
//! audit log, and on every response. Shaped like tower-http's middleware.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use http::{HeaderName, HeaderValue, Request, Response};
use pin_project_lite::pin_project;
use tower::{Layer, Service};

pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

const MAX_LEN: usize = 128;

/// The request id of the current request, in its extensions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestId(Arc<str>);

impl RequestId {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_shared(self) -> Arc<str> {
        self.0
    }

    /// The caller's id when acceptable, else a fresh one.
    pub fn from_header(value: Option<&HeaderValue>) -> RequestId {
        match value.and_then(acceptable) {
            Some(id) => RequestId(Arc::from(id)),
            None => RequestId::fresh(),
        }
    }

    /// A UUID v4 from the thread-local RNG: `Uuid::new_v4` would make a `getrandom`
    /// syscall per request.
    pub fn fresh() -> RequestId {
        let bytes: [u8; 16] = rand::random();
        let id = uuid::Builder::from_random_bytes(bytes).into_uuid();
        let mut text = uuid::Uuid::encode_buffer();
        RequestId(Arc::from(&*id.hyphenated().encode_lower(&mut text)))
    }
}

fn acceptable(value: &HeaderValue) -> Option<&str> {
    let bytes = value.as_bytes();
    let visible =
        (1..=MAX_LEN).contains(&bytes.len()) && bytes.iter().all(|b| (0x21..=0x7e).contains(b));
    if visible {
        value.to_str().ok()
    } else {
        None
    }
}

#[derive(Debug, Clone, Copy, Default)]
pub struct RequestIdLayer;

impl<S> Layer<S> for RequestIdLayer {
    type Service = SetRequestId<S>;

    fn layer(&self, inner: S) -> Self::Service {
        SetRequestId { inner }
    }
}

#[derive(Debug, Clone)]
pub struct SetRequestId<S> {
    inner: S,
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for SetRequestId<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<ReqBody>) -> Self::Future {
        let id = RequestId::from_header(request.headers().get(&X_REQUEST_ID));
        // Ids that passed `acceptable` or are UUIDs are always valid header values.
        let header = HeaderValue::from_str(id.as_str()).ok();
        request.extensions_mut().insert(id);
        ResponseFuture {
            inner: self.inner.call(request),
            header,
        }
    }
}

pin_project! {
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        header: Option<HeaderValue>,
    }
}

impl<F, ResBody, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<ResBody>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut response = ready!(this.inner.poll(cx))?;
        if let Some(header) = this.header.take() {
            response.headers_mut().insert(X_REQUEST_ID.clone(), header);
        }
        Poll::Ready(Ok(response))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::convert::Infallible;
    use tower::{service_fn, ServiceExt};

    async fn round_trip(incoming: Option<&'static str>) -> (String, String) {
        let service = RequestIdLayer.layer(service_fn(|req: Request<()>| async move {
            let id = req
                .extensions()
                .get::<RequestId>()
                .map(|id| id.as_str().to_owned())
                .unwrap_or_default();
            Ok::<_, Infallible>(Response::new(id))
        }));
        let mut request = Request::new(());
        if let Some(value) = incoming {
            request
                .headers_mut()
                .insert(&X_REQUEST_ID, HeaderValue::from_static(value));
        }
        let response = service.oneshot(request).await.expect("infallible");
        let header = response.headers()[&X_REQUEST_ID]
            .to_str()
            .expect("ascii")
            .to_owned();
        (header, response.into_body())
    }

    #[tokio::test]
    async fn keeps_a_valid_caller_id() {
        let (header, seen) = round_trip(Some("abc-123")).await;
        assert_eq!(header, "abc-123");
        assert_eq!(seen, "abc-123");
    }

    #[tokio::test]
    async fn replaces_invalid_ids_with_a_uuid() {
        let too_long: &'static str = Box::leak("x".repeat(129).into_boxed_str());
        for bad in [None, Some(""), Some("has space"), Some(too_long)] {
            let (header, seen) = round_trip(bad).await;
            assert_eq!(header, seen);
            assert!(uuid::Uuid::parse_str(&header).is_ok(), "{header}");
        }
        let (header, _) = round_trip(Some(Box::leak("y".repeat(128).into_boxed_str()))).await;
        assert_eq!(header.len(), 128);
    }
}
