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
    /// Keyed once: each record then costs a clone of the keyed state, not the two
    /// extra SHA-256 blocks of deriving it from the key again.
    Keyed(Box<Hmac<Sha256>>),
}

/// A chain hash as lower-case hex, without allocating.
#[derive(Clone, Copy)]
pub(crate) struct HexDigest([u8; HEX_LEN]);

impl HexDigest {
    /// A hash as the chain writes it: 64 lower-case hex digits.
    pub(crate) fn parse(text: &str) -> Option<HexDigest> {
        let bytes: [u8; HEX_LEN] = text.as_bytes().try_into().ok()?;
        is_hash_hex(text).then_some(HexDigest(bytes))
    }

    pub(crate) fn as_str(&self) -> &str {
        // Only ever filled by `hex::encode_to_slice`: ASCII.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }

    /// The hex digits, for the writer (without `as_str`'s UTF-8 check).
    pub(crate) fn as_bytes(&self) -> &[u8; HEX_LEN] {
        &self.0
    }
}

impl ChainHasher {
    /// HMAC takes keys of any length (longer ones are hashed first), so keying cannot
    /// fail; the error exists only because the trait it comes from allows one.
    pub(crate) fn new(key: Option<SecretSlice<u8>>) -> Result<Self, hmac::digest::InvalidLength> {
        match key {
            Some(key) => Ok(ChainHasher::Keyed(Box::new(
                <Hmac<Sha256> as Mac>::new_from_slice(key.expose_secret())?,
            ))),
            None => Ok(ChainHasher::Plain),
        }
    }

    pub(crate) fn is_keyed(&self) -> bool {
        matches!(self, ChainHasher::Keyed(_))
    }

    /// Digest of `body` (the line without its hash member).
    pub(crate) fn digest(&self, body: &[u8]) -> HexDigest {
        let bytes: [u8; 32] = match self {
            ChainHasher::Plain => Sha256::digest(body).into(),
            ChainHasher::Keyed(mac) => {
                let mut mac = Hmac::clone(mac);
                mac.update(body);
                mac.finalize().into_bytes().into()
            }
        };
        let mut hex = [0u8; HEX_LEN];
        // 32 bytes always fill 64 hex digits exactly.
        let _ = hex::encode_to_slice(bytes, &mut hex);
        HexDigest(hex)
    }

    /// Lower-hex digest of `body` (the line without its hash member).
    pub(crate) fn digest_hex(&self, body: &[u8]) -> String {
        self.digest(body).as_str().to_owned()
    }
}

/// Appends the sealed line for `body` (a compact JSON object) to `out`: the body without
/// its final `}`, then `,"hash":"<hex>"}` and a newline. (Tests build lines with it.)
#[cfg(test)]
pub(crate) fn seal_into(body: &[u8], hash_hex: &str, out: &mut Vec<u8>) {
    let body_start = out.len();
    out.extend_from_slice(body);
    seal_in_place(out, body_start, hash_hex.as_bytes());
}

/// Seals the body written into `out` from `body_start` on, where it was hashed: its
/// final `}` becomes `,"hash":"<hex>"}` and a newline. The writer serializes each record
/// straight into its batch, so a record is never copied.
pub(crate) fn seal_in_place(out: &mut Vec<u8>, body_start: usize, hash_hex: &[u8]) {
    if out.len() > body_start {
        debug_assert_eq!(out.last(), Some(&b'}'), "a record body is a JSON object");
        out.pop(); // the closing brace
    }
    out.extend_from_slice(HASH_OPEN);
    out.extend_from_slice(hash_hex);
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
    fn a_body_sealed_in_place_after_another_line_is_the_same_line() {
        let first = br#"{"seq":1}"#;
        let second = br#"{"seq":2,"prev":"p"}"#;
        let mut expected = Vec::new();
        seal_into(first, "a", &mut expected);
        seal_into(second, "b", &mut expected);
        let mut batch = Vec::new();
        seal_into(first, "a", &mut batch);
        let start = batch.len();
        batch.extend_from_slice(second);
        assert_eq!(&batch[start..], second, "hashed where it was written");
        seal_in_place(&mut batch, start, b"b");
        assert_eq!(batch, expected);
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
        let keyed = ChainHasher::new(Some(SecretSlice::from(b"key".to_vec()))).expect("any key");
        let body = b"The quick brown fox jumps over the lazy dog";
        // RFC-style reference value for HMAC-SHA256("key", ...).
        assert_eq!(
            keyed.digest_hex(body),
            "f7bc83f430538424b13298e6aa6fb143ef4d59a14946175997479dbc2d1a3cd8"
        );
        // The keyed state is cloned per digest, never consumed or extended.
        assert_eq!(keyed.digest_hex(body), keyed.digest_hex(body));
        assert_ne!(keyed.digest_hex(body), ChainHasher::Plain.digest_hex(body));
        assert!(keyed.is_keyed());
        assert!(is_hash_hex(GENESIS));
    }
}
