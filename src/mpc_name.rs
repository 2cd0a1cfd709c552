//! MPC friendly names: decoding the caller's path segment, validating it, and encoding it
//! for Plivo's URL exactly as the official SDKs do.

use std::fmt;
use std::sync::Arc;

use percent_encoding::{
    percent_decode_str, utf8_percent_encode, AsciiSet, PercentEncode, NON_ALPHANUMERIC,
};

const MAX_NAME_CHARS: usize = 128;

/// Every byte outside `A-Z a-z 0-9 - . _ ~` is percent-encoded (RFC 3986 unreserved).
const UPSTREAM_ENCODE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// A name that passed validation: 1–128 characters of valid UTF-8, no control
/// characters and none of `/ \ ? # %`.
/// Shared, so the audit trail takes the name without copying it.
#[derive(Clone, PartialEq, Eq)]
pub struct MpcName(Arc<str>);

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum InvalidMpcName {
    #[error("the MPC name is empty")]
    Empty,
    #[error("the MPC name is longer than 128 characters")]
    TooLong,
    #[error("the MPC name is not valid UTF-8 once percent-decoded")]
    NotUtf8,
    #[error("the MPC name contains a control character")]
    ControlCharacter,
    #[error("the MPC name contains one of / \\ ? # %")]
    ReservedCharacter,
}

impl MpcName {
    /// Decodes a raw (still percent-encoded) path segment once and validates the result.
    pub fn from_path_segment(segment: &str) -> Result<MpcName, InvalidMpcName> {
        let decoded = percent_decode_str(segment)
            .decode_utf8()
            .map_err(|_| InvalidMpcName::NotUtf8)?;
        MpcName::new(&decoded)
    }

    pub fn new(name: &str) -> Result<MpcName, InvalidMpcName> {
        let chars = name.chars().count();
        if chars == 0 {
            return Err(InvalidMpcName::Empty);
        }
        if chars > MAX_NAME_CHARS {
            return Err(InvalidMpcName::TooLong);
        }
        if name.chars().any(char::is_control) {
            return Err(InvalidMpcName::ControlCharacter);
        }
        if name.contains(['/', '\\', '?', '#', '%']) {
            return Err(InvalidMpcName::ReservedCharacter);
        }
        Ok(MpcName(Arc::from(name)))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The name as shared text (the audit record's `mpc`).
    pub fn shared(&self) -> Arc<str> {
        Arc::clone(&self.0)
    }

    /// The name as it goes into Plivo's path after `name_`, in pieces (or `Display`).
    pub fn upstream_encoded(&self) -> PercentEncode<'_> {
        utf8_percent_encode(&self.0, UPSTREAM_ENCODE)
    }
}

/// An MPC uuid as Plivo writes it: 8-4-4-4-12 hex digits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MpcUuid(String);

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the MPC uuid is not of the form 8-4-4-4-12 hex digits")]
pub struct InvalidMpcUuid;

impl MpcUuid {
    pub fn parse(text: &str) -> Result<MpcUuid, InvalidMpcUuid> {
        let groups: Vec<&str> = text.split('-').collect();
        let lengths_ok = groups.iter().map(|g| g.len()).eq([8, 4, 4, 4, 12]);
        let hex_ok = groups
            .iter()
            .all(|g| g.bytes().all(|b| b.is_ascii_hexdigit()));
        if lengths_ok && hex_ok {
            Ok(MpcUuid(text.to_owned()))
        } else {
            Err(InvalidMpcUuid)
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for MpcName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MpcName({:?})", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encoded(segment: &str) -> String {
        MpcName::from_path_segment(segment)
            .expect("valid")
            .upstream_encoded()
            .to_string()
    }

    #[test]
    fn encodes_like_the_official_sdks() {
        assert_eq!(encoded("myconf"), "myconf");
        assert_eq!(encoded("a%20b"), "a%20b");
        assert_eq!(encoded("%C3%A4"), "%C3%A4");
        assert_eq!(encoded("ä"), "%C3%A4");
        assert_eq!(encoded("a+b"), "a%2Bb");
        assert_eq!(encoded("A-Z.a_z~09"), "A-Z.a_z~09");
        assert_eq!(encoded("a:b@c!"), "a%3Ab%40c%21");
    }

    #[test]
    fn refuses_what_the_contract_refuses() {
        use InvalidMpcName::*;
        let cases = [
            ("", Empty),
            ("a%2Fb", ReservedCharacter),
            ("a%2fb", ReservedCharacter),
            ("a%3Fb", ReservedCharacter),
            ("a%23b", ReservedCharacter),
            ("a%25b", ReservedCharacter),
            ("a%5Cb", ReservedCharacter),
            ("a%zzb", ReservedCharacter),
            ("a%00b", ControlCharacter),
            ("a%0Ab", ControlCharacter),
            ("a%7Fb", ControlCharacter),
            ("a%C2%85b", ControlCharacter),
            ("%FF", NotUtf8),
            ("%C0%AF", NotUtf8),
            ("%E2%82", NotUtf8),
        ];
        for (segment, expected) in cases {
            assert_eq!(
                MpcName::from_path_segment(segment),
                Err(expected),
                "{segment}"
            );
        }
    }

    #[test]
    fn length_counts_characters_not_bytes() {
        assert!(MpcName::new(&"a".repeat(128)).is_ok());
        assert_eq!(MpcName::new(&"a".repeat(129)), Err(InvalidMpcName::TooLong));
        assert!(MpcName::new(&"ä".repeat(128)).is_ok());
        assert_eq!(MpcName::new(&"ä".repeat(129)), Err(InvalidMpcName::TooLong));
    }

    #[test]
    fn uuids() {
        assert!(MpcUuid::parse("12345678-90ab-cdef-1234-567890abcdef").is_ok());
        assert!(MpcUuid::parse("12345678-90AB-CDEF-1234-567890ABCDEF").is_ok());
        for bad in [
            "",
            "12345678-90ab-cdef-1234-567890abcde",
            "12345678-90ab-cdef-1234-567890abcdeg",
            "1234567890abcdef1234567890abcdef",
            "12345678-90ab-cdef-1234-567890abcdef-",
            "../../x",
        ] {
            assert_eq!(MpcUuid::parse(bad), Err(InvalidMpcUuid), "{bad}");
        }
    }

    #[test]
    fn decodes_only_once() {
        let name = MpcName::from_path_segment("a%2520b");
        assert_eq!(name, Err(InvalidMpcName::ReservedCharacter));
    }
}
