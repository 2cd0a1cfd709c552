//! The hash chain (DESIGN.md §3, contract): how a serialized body is sealed with its
//! `hash` member, and how a raw line is split back into the hashed bytes and the claimed
//! hash. Shared by the writer and `audit verify` so both agree byte for byte.

use hmac::{Hmac, Mac};
use secrecy::{ExposeSecret, SecretSlice};
use sha2::{Digest, Sha256};

/// `prev` of the very first record.
pub(crate) const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// What a sealed line ends with before its newline: `,"hash":"` + 64 hex + `"}`.
const HASH_OPEN: &[u8] = b",\"hash\":\"";
const HASH_CLOSE: &[u8] = b"\"}";
const HEX_LEN: usize = 64;
const SEAL_LEN: usize = HASH_OPEN.len() + HEX_LEN + HASH_CLOSE.len();

/// Computes chain hashes: SHA-256, or HMAC-SHA256 when the log is keyed.
pub(crate) enum ChainHasher {
    Plain,
    Keyed(SecretSlice<u8>),
}

impl ChainHasher {
    pub(crate) fn new(key: Option<SecretSlice<u8>>) -> Self {
        match key {
            Some(k) => ChainHasher::Keyed(k),
            None => ChainHasher::Plain,
        }
    }

    pub(crate) fn is_keyed(&self) -> bool {
        matches!(self, ChainHasher::Keyed(_))
    }

    /// Lower-hex digest of `body` (the line without its hash member).
    pub(crate) fn digest_hex(&self, body: &[u8]) -> String {
        match self {
            ChainHasher::Plain => hex::encode(Sha256::digest(body)),
            ChainHasher::Keyed(key) => hmac_hex(key.expose_secret(), body),
        }
    }
}

/// HMAC accepts keys of any length (longer ones are hashed first), so `new_from_slice`
/// cannot fail; the fallback only exists so that no panic path is compiled in.
fn hmac_hex(key: &[u8], body: &[u8]) -> String {
    match <Hmac<Sha256> as Mac>::new_from_slice(key) {
        Ok(mac) => hex::encode(mac.chain_update(body).finalize().into_bytes()),
        Err(_) => String::new(),
    }
}

/// Appends the sealed line for `body` (a compact JSON object) to `out`: the body without
/// its final `}`, then `,"hash":"<hex>"}` and a newline.
pub(crate) fn seal_into(body: &[u8], hash_hex: &str, out: &mut Vec<u8>) {
    let open = body.len().saturating_sub(1); // drop the closing brace
    out.extend_from_slice(&body[..open]);
    out.extend_from_slice(HASH_OPEN);
    out.extend_from_slice(hash_hex.as_bytes());
    out.extend_from_slice(HASH_CLOSE);
    out.push(b'\n');
}

/// Splits a line (without newline) into the hashed bytes and the claimed hash, exactly
/// as the contract says: the final `,"hash":"<64 hex>"}` is replaced by `}`. `None` when
/// the line does not end that way (lower-case hex only).
pub(crate) fn unseal(line: &[u8]) -> Option<(Vec<u8>, &str)> {
    let cut = line.len().checked_sub(SEAL_LEN)?;
    let tail = &line[cut..];
    let hex = &tail[HASH_OPEN.len()..HASH_OPEN.len() + HEX_LEN];
    let well_formed = tail.starts_with(HASH_OPEN)
        && tail.ends_with(HASH_CLOSE)
        && hex.iter().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    if !well_formed {
        return None;
    }
    let mut body = Vec::with_capacity(cut + 1);
    body.extend_from_slice(&line[..cut]);
    body.push(b'}');
    std::str::from_utf8(hex).ok().map(|h| (body, h))
}

/// True for 64 lower-case hex digits, the form of `prev` and `hash`.
pub(crate) fn is_hash_hex(s: &str) -> bool {
    s.len() == HEX_LEN && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_then_unseal_round_trips() {
        let body = br#"{"seq":1,"prev":"x"}"#;
        let h = ChainHasher::Plain.digest_hex(body);
        let mut line = Vec::new();
        seal_into(body, &h, &mut line);
        let text = String::from_utf8(line.clone()).unwrap_or_default();
        assert_eq!(
            text,
            format!("{{\"seq\":1,\"prev\":\"x\",\"hash\":\"{h}\"}}\n")
        );
        let (b, claimed) = unseal(&line[..line.len() - 1]).unwrap_or_default();
        assert_eq!(b, body);
        assert_eq!(claimed, h);
    }

    #[test]
    fn unseal_rejects_other_endings() {
        assert!(unseal(b"{}").is_none());
        assert!(unseal(b"").is_none());
        let upper = format!("{{\"a\":1,\"hash\":\"{}\"}}", "A".repeat(64));
        assert!(unseal(upper.as_bytes()).is_none());
        let spaced = format!("{{\"a\":1, \"hash\":\"{}\"}}", "a".repeat(64));
        assert!(unseal(spaced.as_bytes()).is_none());
    }

    #[test]
    fn hmac_differs_from_plain_and_matches_reference() {
        let keyed = ChainHasher::new(Some(SecretSlice::from(b"key".to_vec())));
        let body = b"The quick brown fox jumps over the lazy dog";
        // RFC-style reference value for HMAC-SHA256("key", ...).
        assert_eq!(
            keyed.digest_hex(body),
            "f7bc83f430538424b13298e6aa6fb143ef4d59a14946175997479dbc2d1a3cd8"
        );
        assert_ne!(keyed.digest_hex(body), ChainHasher::Plain.digest_hex(body));
        assert!(keyed.is_keyed());
        assert!(is_hash_hex(GENESIS));
    }
}
