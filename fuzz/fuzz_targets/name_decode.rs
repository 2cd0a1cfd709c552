//! MPC name decoding, validation and upstream encoding, and MPC uuid parsing, checked
//! against an independent model of the contract (DESIGN.md §1 "MPC names"):
//! - an accepted name is exactly the once-percent-decoded segment, valid UTF-8, 1–128
//!   characters, without control characters or any of `/ \ ? # %`; a refused one breaks
//!   one of those rules;
//! - `upstream_encoded()` holds only `A-Z a-z 0-9 - . _ ~` and `%XX` (upper-case hex),
//!   decodes back to the name, and is accepted again as the same name;
//! - `MpcUuid::parse` accepts exactly 8-4-4-4-12 hex digits.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mpc_gateway::mpc_name::{MpcName, MpcUuid};

/// WHATWG-style percent-decoding: `%` + two hex digits is one byte, anything else stays.
fn model_decode(s: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        if s[i] == b'%' && i + 2 < s.len() {
            let (h, l) = (s[i + 1], s[i + 2]);
            if let (Some(h), Some(l)) = (hex_val(h), hex_val(l)) {
                out.push(h << 4 | l);
                i += 3;
                continue;
            }
        }
        out.push(s[i]);
        i += 1;
    }
    out
}

fn hex_val(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// The contract's rule for a decoded name.
fn model_valid(name: &str) -> bool {
    let n = name.chars().count();
    (1..=128).contains(&n)
        && !name.chars().any(char::is_control)
        && !name
            .chars()
            .any(|c| matches!(c, '/' | '\\' | '?' | '#' | '%'))
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn check_encoding(enc: &str) {
    let b = enc.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            assert!(i + 2 < b.len(), "truncated escape in {enc:?}");
            for &d in &b[i + 1..i + 3] {
                assert!(
                    d.is_ascii_digit() || (b'A'..=b'F').contains(&d),
                    "escape not upper-case hex in {enc:?}"
                );
            }
            i += 3;
        } else {
            assert!(
                is_unreserved(b[i]),
                "byte {:#04x} unencoded in {enc:?}",
                b[i]
            );
            i += 1;
        }
    }
}

fn check_segment(segment: &str) {
    let decoded = model_decode(segment.as_bytes());
    let model = std::str::from_utf8(&decoded)
        .ok()
        .filter(|s| model_valid(s));
    match (MpcName::from_path_segment(segment), model) {
        (Ok(name), Some(expected)) => {
            assert_eq!(
                name.as_str(),
                expected,
                "accepted name differs from the decoding"
            );
            let enc = name.upstream_encoded().to_string();
            check_encoding(&enc);
            assert_eq!(model_decode(enc.as_bytes()), name.as_str().as_bytes());
            assert_eq!(
                MpcName::from_path_segment(&enc).as_ref(),
                Ok(&name),
                "the encoding is not accepted as the same name"
            );
            assert_eq!(MpcName::new(name.as_str()).as_ref(), Ok(&name));
            // Only ASCII unreserved names travel unchanged.
            assert_eq!(
                enc == name.as_str(),
                name.as_str().bytes().all(is_unreserved)
            );
        }
        (Err(_), None) => {}
        (Ok(name), None) => panic!("accepted {segment:?} as {name:?}, the contract refuses it"),
        (Err(e), Some(_)) => panic!("refused {segment:?} ({e}), the contract accepts it"),
    }
}

fn model_uuid(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 36
        && b.iter().enumerate().all(|(i, &c)| {
            if matches!(i, 8 | 13 | 18 | 23) {
                c == b'-'
            } else {
                c.is_ascii_hexdigit()
            }
        })
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    check_segment(&text);
    // The raw text as a name (the decoded form of some segment).
    let as_name = MpcName::new(&text);
    assert_eq!(
        as_name.is_ok(),
        model_valid(&text),
        "MpcName::new({text:?})"
    );
    match MpcUuid::parse(&text) {
        Ok(u) => {
            assert!(model_uuid(&text), "accepted uuid {text:?}");
            assert_eq!(u.as_str(), text);
        }
        Err(_) => assert!(!model_uuid(&text), "refused uuid {text:?}"),
    }
});
