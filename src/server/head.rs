//! Answers to `HEAD` requests carry no content (RFC 9110 §9.3.2). hyper drops it itself
//! only over HTTP/1.1; over HTTP/2 it would send it as DATA frames, which make the
//! response malformed (RFC 9113 §8.1.1) and the client reset the stream, so the caller
//! would see a protocol error instead of the `404` or `405` it was answered. Done once,
//! on the data listener's way out, for every answer the gateway builds.

use bytes::Bytes;
use http::header::CONTENT_LENGTH;
use http::{HeaderValue, Method, Response};
use http_body::Body as _;
use http_body_util::Full;

/// `response` as the answer to a request with `method`: for `HEAD` the same status and
/// headers, with the `Content-Length` a `GET` would get (RFC 9110 §8.6 allows it, and it
/// is what hyper sends over HTTP/1.1), and no content.
pub(super) fn fit_to_method(
    method: &Method,
    response: Response<Full<Bytes>>,
) -> Response<Full<Bytes>> {
    if method != Method::HEAD {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    if let Some(length) = body.size_hint().exact() {
        parts
            .headers
            .entry(CONTENT_LENGTH)
            .or_insert_with(|| HeaderValue::from(length));
    }
    Response::from_parts(parts, Full::new(Bytes::new()))
}

#[cfg(test)]
mod tests {
    use super::*;

    use http::StatusCode;
    use http_body_util::BodyExt as _;

    fn not_allowed() -> Response<Full<Bytes>> {
        Response::builder()
            .status(StatusCode::METHOD_NOT_ALLOWED)
            .header("allow", "POST")
            .body(Full::new(Bytes::from_static(b"{\"status\":405}")))
            .expect("response")
    }

    async fn content(response: Response<Full<Bytes>>) -> Bytes {
        response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes()
    }

    #[tokio::test]
    async fn a_head_answer_keeps_status_and_headers_and_loses_its_content() {
        let response = fit_to_method(&Method::HEAD, not_allowed());
        assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(response.headers()["allow"], "POST");
        assert_eq!(response.headers()[CONTENT_LENGTH], "14");
        assert!(content(response).await.is_empty());
    }

    #[tokio::test]
    async fn other_methods_keep_their_content() {
        for method in [Method::GET, Method::POST, Method::DELETE] {
            let response = fit_to_method(&method, not_allowed());
            assert!(response.headers().get(CONTENT_LENGTH).is_none(), "{method}");
            assert_eq!(
                &content(response).await[..],
                b"{\"status\":405}",
                "{method}"
            );
        }
    }
}
