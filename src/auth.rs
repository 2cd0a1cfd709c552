//! Who is calling and what they may end: Bearer tokens checked against the configured
//! `sha256:` hashes in constant time, each tenant's `allow` list of name patterns, and
//! the [`Fingerprint`] by which the audit log names a token or client certificate.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// The SHA-256 of a caller token, as stored in config (`sha256:<64 lower-hex>`).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct TokenHash([u8; 32]);

impl TokenHash {
    pub fn of(token: &[u8]) -> TokenHash {
        TokenHash(Sha256::digest(token).into())
    }

    /// The 64 zeros that example configs list where a real hash goes: no token hashes
    /// to it, so a tenant that lists only this cannot authenticate by token.
    pub fn is_placeholder(&self) -> bool {
        self.0 == [0; 32]
    }

    /// What the audit log records for this token.
    pub fn fingerprint(&self) -> Fingerprint {
        Fingerprint::of_sha256(&self.0)
    }

    /// The `sha256:` line printed by `token new` / `token hash`.
    pub fn to_config_string(&self) -> String {
        format!("sha256:{}", hex::encode(self.0))
    }
}

impl fmt::Debug for TokenHash {
    // Token hashes are guessable offline for weak tokens: show only the fingerprint.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TokenHash({}…)", self.fingerprint())
    }
}

/// The first 12 hex digits of a credential's SHA-256 (a token's or a client
/// certificate's), the audit log's `token_fp`: enough for ops to find a client, useless to
/// an attacker. Made once per configured token or verified certificate; a clone shares
/// the text, so recording it on a request costs no allocation.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Fingerprint(Arc<str>);

/// Digest bytes shown: 6 bytes, 12 hex digits.
const FINGERPRINT_BYTES: usize = 6;

impl Fingerprint {
    /// The fingerprint of the credential whose SHA-256 is `digest`.
    pub fn of_sha256(digest: &[u8; 32]) -> Fingerprint {
        let mut hex = [0u8; 2 * FINGERPRINT_BYTES];
        // Always fits: the buffer is sized for exactly these bytes.
        let _ = hex::encode_to_slice(&digest[..FINGERPRINT_BYTES], &mut hex);
        // Hex digits are ASCII, so the text is always valid UTF-8.
        Fingerprint(Arc::from(std::str::from_utf8(&hex).unwrap_or_default()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The audit record's `token_fp`, without a copy.
impl From<Fingerprint> for Arc<str> {
    fn from(fingerprint: Fingerprint) -> Arc<str> {
        fingerprint.0
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("expected \"sha256:\" followed by 64 lower-case hex digits")]
pub struct InvalidTokenHash;

impl FromStr for TokenHash {
    type Err = InvalidTokenHash;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let hex_part = text.strip_prefix("sha256:").ok_or(InvalidTokenHash)?;
        let lower_hex = hex_part.len() == 64
            && hex_part
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if !lower_hex {
            return Err(InvalidTokenHash);
        }
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(hex_part, &mut bytes).map_err(|_| InvalidTokenHash)?;
        Ok(TokenHash(bytes))
    }
}

/// A name pattern from a tenant's `allow` list: `*` any run, `?` one character,
/// everything else literal and case-sensitive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamePattern {
    source: String,
    chars: Vec<char>,
}

impl NamePattern {
    pub fn new(source: &str) -> NamePattern {
        NamePattern {
            source: source.to_owned(),
            chars: source.chars().collect(),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.source
    }

    pub fn matches(&self, name: &str) -> bool {
        // Names and patterns are nearly always ASCII: then bytes are characters, and the
        // request path needs no allocation.
        if self.source.is_ascii() && name.is_ascii() {
            return glob_match(self.source.as_bytes(), name.as_bytes(), b'*', b'?');
        }
        let name: Vec<char> = name.chars().collect();
        glob_match(&self.chars, &name, '*', '?')
    }
}

/// Iterative wildcard match with single-star backtracking: linear in practice and never
/// exponential, whatever a caller sends.
/// `any_run` and `any_one` are the pattern's `*` and `?` in the symbol type.
pub fn glob_match<T: Copy + Eq>(pattern: &[T], text: &[T], any_run: T, any_one: T) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        match pattern.get(p) {
            Some(&c) if c == any_run => {
                star = Some((p, t));
                p += 1;
            }
            Some(&c) if c == any_one => {
                p += 1;
                t += 1;
            }
            Some(&c) if c == text[t] => {
                p += 1;
                t += 1;
            }
            _ => match star {
                Some((star_p, star_t)) => {
                    p = star_p + 1;
                    t = star_t + 1;
                    star = Some((star_p, star_t + 1));
                }
                None => return false,
            },
        }
    }
    pattern[p..].iter().all(|&c| c == any_run)
}

/// What the gateway learned from the caller's credentials; `T` is what a token names
/// (the gateway's directory maps each token straight to its tenant's policy).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity<T> {
    /// No usable credentials were presented.
    Anonymous,
    /// A token was presented but belongs to no tenant; `fingerprint` lets ops find the
    /// client that still uses it.
    Unknown {
        fingerprint: Fingerprint,
    },
    Tenant {
        tenant: T,
        fingerprint: Fingerprint,
    },
}

impl<T> Identity<T> {
    pub fn fingerprint(&self) -> Option<&Fingerprint> {
        match self {
            Identity::Anonymous => None,
            Identity::Unknown { fingerprint } | Identity::Tenant { fingerprint, .. } => {
                Some(fingerprint)
            }
        }
    }
}

/// Maps token hashes to what each names (a tenant).
#[derive(Debug)]
pub struct TokenDirectory<T> {
    entries: Vec<Entry<T>>,
}

/// A configured token: its hash, its tenant, and its fingerprint made once, since every
/// authenticated request records it.
#[derive(Debug)]
struct Entry<T> {
    hash: TokenHash,
    tenant: T,
    fingerprint: Fingerprint,
}

impl<T> Default for TokenDirectory<T> {
    fn default() -> Self {
        TokenDirectory {
            entries: Vec::new(),
        }
    }
}

impl<T: Clone> TokenDirectory<T> {
    pub fn insert(&mut self, hash: TokenHash, tenant: T) {
        let fingerprint = hash.fingerprint();
        self.entries.push(Entry {
            hash,
            tenant,
            fingerprint,
        });
    }

    /// Looks a presented token up. Every configured hash is compared, in constant time,
    /// so the time taken says nothing about which tenant (if any) came close.
    pub fn identify(&self, token: &[u8]) -> Identity<T> {
        let presented = TokenHash::of(token);
        let mut found: Option<&Entry<T>> = None;
        for entry in &self.entries {
            if bool::from(entry.hash.0.ct_eq(&presented.0)) {
                found = Some(entry);
            }
        }
        match found {
            Some(entry) => Identity::Tenant {
                tenant: entry.tenant.clone(),
                fingerprint: entry.fingerprint.clone(),
            },
            None => Identity::Unknown {
                fingerprint: presented.fingerprint(),
            },
        }
    }
}

/// Extracts the token of an `Authorization: Bearer <token>` header value.
/// The scheme is case-insensitive (RFC 9110); the token must be non-empty.
pub fn bearer_token(header: &[u8]) -> Option<&[u8]> {
    let (scheme, rest) = split_scheme(header)?;
    if !scheme.eq_ignore_ascii_case(b"bearer") {
        return None;
    }
    let token = trim_ascii(rest);
    (!token.is_empty()).then_some(token)
}

fn split_scheme(header: &[u8]) -> Option<(&[u8], &[u8])> {
    let space = header.iter().position(|&b| b == b' ')?;
    Some((&header[..space], &header[space + 1..]))
}

fn trim_ascii(bytes: &[u8]) -> &[u8] {
    let start = bytes
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(bytes.len());
    let end = bytes
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .map_or(start, |i| i + 1);
    &bytes[start..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_hash_parses_only_lower_hex_with_prefix() {
        let good = "sha256:2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae";
        let hash: TokenHash = good.parse().expect("valid");
        assert_eq!(hash, TokenHash::of(b"foo"));
        assert_eq!(hash.to_config_string(), good);
        assert!(good.to_uppercase().parse::<TokenHash>().is_err());
        assert!("sha256:abc".parse::<TokenHash>().is_err());
        assert!(good
            .trim_start_matches("sha256:")
            .parse::<TokenHash>()
            .is_err());
    }

    #[test]
    fn debug_shows_only_the_fingerprint() {
        let hash = TokenHash::of(b"foo");
        let shown = format!("{hash:?}");
        assert_eq!(shown, "TokenHash(2c26b46b68ff…)");
    }

    #[test]
    fn a_fingerprint_is_the_first_12_hex_digits_and_clones_share_them() {
        let fingerprint = TokenHash::of(b"foo").fingerprint();
        assert_eq!(fingerprint.as_str(), "2c26b46b68ff");
        assert_eq!(fingerprint.to_string(), "2c26b46b68ff");
        let recorded: Arc<str> = fingerprint.clone().into();
        assert!(std::ptr::eq(
            recorded.as_ptr(),
            fingerprint.as_str().as_ptr()
        ));
    }

    #[test]
    fn glob_patterns() {
        let cases = [
            ("billing-*", "billing-", true),
            ("billing-*", "billing-42", true),
            ("billing-*", "Billing-42", false),
            ("billing-*", "xbilling-42", false),
            ("a?c", "abc", true),
            ("a?c", "ac", false),
            ("a?c", "äbc", false),
            ("?", "ä", true),
            ("a?c", "aäc", true),
            ("ä-*", "ä-1", true),
            ("ä-*", "a-1", false),
            ("*", "", true),
            ("*x*y*", "aaxbbyc", true),
            ("*x*y*", "aaybbxc", false),
            ("exact", "exact", true),
            ("exact", "exact2", false),
            ("a*b*c*d*e*f*g", "abcdefghijklmnopqrstuvwxyzabcdefgh", false),
        ];
        for (pattern, name, expected) in cases {
            assert_eq!(
                NamePattern::new(pattern).matches(name),
                expected,
                "{pattern} vs {name}"
            );
        }
    }

    #[test]
    fn directory_identifies_tenants_and_fingerprints_unknown_tokens() {
        let mut dir = TokenDirectory::default();
        dir.insert(TokenHash::of(b"tok-a"), "a");
        dir.insert(TokenHash::of(b"tok-b"), "b");
        assert_eq!(
            dir.identify(b"tok-b"),
            Identity::Tenant {
                tenant: "b",
                fingerprint: TokenHash::of(b"tok-b").fingerprint()
            }
        );
        assert_eq!(
            dir.identify(b"stale"),
            Identity::Unknown {
                fingerprint: TokenHash::of(b"stale").fingerprint()
            }
        );
    }

    #[test]
    fn bearer_header_parsing() {
        assert_eq!(bearer_token(b"Bearer abc"), Some(&b"abc"[..]));
        assert_eq!(bearer_token(b"bearer  abc "), Some(&b"abc"[..]));
        assert_eq!(bearer_token(b"Basic abc"), None);
        assert_eq!(bearer_token(b"Bearer "), None);
        assert_eq!(bearer_token(b"Bearer"), None);
    }
}
