//! `X-Request-Id`: keeps the caller's id when it is 1–128 visible ASCII characters,
//! otherwise makes a UUID v4. The gateway reads it once per request (for the audit log
//! and error bodies) and puts it on every response it makes.

use std::sync::Arc;

use http::{HeaderName, HeaderValue};

pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

pub(crate) const MAX_LEN: usize = 128;

/// The id of one request: its text, and the header value that carries it on the reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestId {
    text: Arc<str>,
    header: HeaderValue,
}

impl RequestId {
    /// The text, for the audit log and error bodies, and the reply's header value.
    pub fn into_parts(self) -> (Arc<str>, HeaderValue) {
        (self.text, self.header)
    }

    /// The caller's id when acceptable (its header value reused as is), else a fresh one.
    pub fn from_header(value: Option<&HeaderValue>) -> RequestId {
        match value.and_then(|value| Some((acceptable(value)?, value))) {
            Some((text, value)) => RequestId {
                text: Arc::from(text),
                header: value.clone(),
            },
            None => RequestId::fresh(),
        }
    }

    /// A UUID v4 from the thread-local RNG: `Uuid::new_v4` would make a `getrandom`
    /// syscall per request.
    pub fn fresh() -> RequestId {
        let bytes: [u8; 16] = rand::random();
        let id = uuid::Builder::from_random_bytes(bytes).into_uuid();
        let mut buffer = uuid::Uuid::encode_buffer();
        let text: &str = id.hyphenated().encode_lower(&mut buffer);
        RequestId {
            text: Arc::from(text),
            // A hyphenated UUID is always a valid header value.
            header: HeaderValue::from_str(text).unwrap_or_else(|_| HeaderValue::from_static("")),
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The id's text and the reply's header value.
    fn id_for(incoming: Option<&str>) -> (Arc<str>, HeaderValue) {
        let value = incoming.map(|text| HeaderValue::from_str(text).expect("header value"));
        RequestId::from_header(value.as_ref()).into_parts()
    }

    #[test]
    fn keeps_a_valid_caller_id() {
        let (text, header) = id_for(Some("abc-123"));
        assert_eq!(&*text, "abc-123");
        assert_eq!(header, "abc-123");
        let longest = "y".repeat(128);
        assert_eq!(*id_for(Some(&longest)).0, *longest);
    }

    #[test]
    fn replaces_invalid_ids_with_a_uuid() {
        let too_long = "x".repeat(129);
        for bad in [None, Some(""), Some("has space"), Some(too_long.as_str())] {
            let (text, header) = id_for(bad);
            assert_eq!(header, &*text);
            assert!(uuid::Uuid::parse_str(&text).is_ok(), "{bad:?}");
        }
        assert_ne!(id_for(None), id_for(None), "fresh ids differ");
    }
}
