//! One audit record: the event callers hand to the writer ([`AuditEvent`]) and the exact
//! member order, formatting and size limits of a line (DESIGN.md §3, contract).
//!
//! The writer adds `seq`, `ts`, `prev` and `hash`; everything else comes from the caller.

use std::borrow::Cow;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use super::chain::HexDigest;

/// The raw request target is recorded with at most this many bytes.
pub const MAX_PATH_BYTES: usize = 256;

/// The most of `mpc` a record keeps: a name the gateway checked is at most 128 characters
/// (512 bytes), but one Plivo returned for a by-uuid request is as long as Plivo made it.
pub const MAX_MPC_BYTES: usize = 512;

/// The most bytes a record keeps of each of its other text members. What the gateway puts
/// there is within these already (request ids of at most 128 characters, names the config
/// checked, fingerprints, socket addresses, problem slugs, Plivo's `api_id` cut to 256
/// characters); the writer cuts to them anyway, so that a record's size is bounded by the
/// writer's own code and a crash's partial record can be told from more than a record
/// holds (the `torn` module). Bytes of the text, before JSON escaping.
pub(crate) const MAX_REQUEST_ID_BYTES: usize = crate::request_id::MAX_LEN;
/// Tenant and account names (the config allows 1–64 characters).
pub(crate) const MAX_NAME_BYTES: usize = 64;
/// `token_fp`: exactly this many lower-case hex digits.
pub(crate) const TOKEN_FP_BYTES: usize = 12;
/// `client`: the longest `ip:port`, `[v6%scope]:65535`, takes 58.
pub(crate) const MAX_CLIENT_BYTES: usize = 64;
/// HTTP puts no bound on a method token; without one an unauthenticated caller could make
/// every record of its requests as large as its head.
pub(crate) const MAX_METHOD_BYTES: usize = 32;
/// Problem slugs and `ended`.
pub(crate) const MAX_REASON_BYTES: usize = 64;
/// 256 characters of at most 4 bytes each.
pub(crate) const MAX_PLIVO_API_ID_BYTES: usize = 1024;

/// The most bytes of `member`'s text a record holds (see [`MAX_REQUEST_ID_BYTES`]), for
/// the members whose value is free text.
pub(crate) fn max_text_bytes(member: &str) -> Option<usize> {
    Some(match member {
        "request_id" => MAX_REQUEST_ID_BYTES,
        "tenant" | "account" => MAX_NAME_BYTES,
        "client" => MAX_CLIENT_BYTES,
        "method" => MAX_METHOD_BYTES,
        "path" => MAX_PATH_BYTES,
        "mpc" => MAX_MPC_BYTES,
        "reason" => MAX_REASON_BYTES,
        "plivo_api_id" => MAX_PLIVO_API_ID_BYTES,
        _ => return None,
    })
}

/// Every member of a line, in the contract order.
pub(crate) const MEMBERS: [&str; 19] = [
    "seq",
    "ts",
    "event",
    "request_id",
    "tenant",
    "token_fp",
    "client",
    "method",
    "path",
    "mpc",
    "account",
    "status",
    "reason",
    "upstream_status",
    "plivo_api_id",
    "attempts",
    "duration_ms",
    "prev",
    "hash",
];

/// What a record is about. `denied` and `result` are terminal; `forward` is written
/// before the upstream call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventKind {
    /// The request was not forwarded (whatever the status). The default, because it is
    /// the terminal record of every request that never reached the upstream.
    #[default]
    Denied,
    /// Written and acknowledged before the upstream call.
    Forward,
    /// The terminal record of a forwarded request.
    Result,
}

impl EventKind {
    /// The wire name (`denied` | `forward` | `result`).
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Denied => "denied",
            EventKind::Forward => "forward",
            EventKind::Result => "result",
        }
    }
}

/// A record as the gateway knows it; the writer assigns `seq`, `ts`, `prev` and `hash`.
///
/// Text is shared (`Arc<str>`) or static (`Cow`), because every request hands the same
/// values to two records: cloning an event allocates nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditEvent {
    pub event: EventKind,
    pub request_id: Arc<str>,
    pub tenant: Option<Arc<str>>,
    /// First 12 hex digits of the presented credential's SHA-256; never the credential.
    pub token_fp: Option<Arc<str>>,
    /// Peer `ip:port`.
    pub client: Option<Arc<str>>,
    pub method: Cow<'static, str>,
    /// Raw request target; the writer keeps at most [`MAX_PATH_BYTES`] bytes.
    pub path: Arc<str>,
    pub mpc: Option<Arc<str>>,
    pub account: Option<Arc<str>>,
    /// What the caller got.
    pub status: Option<u16>,
    /// The problem slug, or `ended` on success.
    pub reason: Option<Cow<'static, str>>,
    pub upstream_status: Option<u16>,
    pub plivo_api_id: Option<Arc<str>>,
    pub attempts: Option<u32>,
    pub duration_ms: Option<u64>,
}

/// A line without its `hash` member. Field order here IS the contract order, and the hash
/// covers these exact bytes. [`Body::write_json`] writes it; the serde derive (declaration
/// order) is the reference the tests hold it to.
#[cfg_attr(test, derive(Serialize))]
pub(crate) struct Body<'a> {
    seq: u64,
    #[cfg_attr(test, serde(serialize_with = "ts_text"))]
    ts: &'a TsText,
    event: EventKind,
    request_id: &'a str,
    tenant: Option<&'a str>,
    token_fp: Option<&'a str>,
    client: Option<&'a str>,
    method: &'a str,
    path: &'a str,
    mpc: Option<&'a str>,
    account: Option<&'a str>,
    status: Option<u16>,
    reason: Option<&'a str>,
    upstream_status: Option<u16>,
    plivo_api_id: Option<&'a str>,
    attempts: Option<u32>,
    duration_ms: Option<u64>,
    #[cfg_attr(test, serde(serialize_with = "hex_digest_text"))]
    prev: &'a HexDigest,
}

impl<'a> Body<'a> {
    pub(crate) fn new(seq: u64, ts: &'a TsText, prev: &'a HexDigest, ev: &'a AuditEvent) -> Self {
        let cut = |text: &'a str, max| truncate_on_char_boundary(text, max);
        Body {
            seq,
            ts,
            event: ev.event,
            request_id: cut(&ev.request_id, MAX_REQUEST_ID_BYTES),
            tenant: ev.tenant.as_deref().map(|t| cut(t, MAX_NAME_BYTES)),
            token_fp: ev.token_fp.as_deref().map(|fp| cut(fp, TOKEN_FP_BYTES)),
            client: ev.client.as_deref().map(|c| cut(c, MAX_CLIENT_BYTES)),
            method: cut(&ev.method, MAX_METHOD_BYTES),
            path: cut(&ev.path, MAX_PATH_BYTES),
            mpc: ev.mpc.as_deref().map(|mpc| cut(mpc, MAX_MPC_BYTES)),
            account: ev.account.as_deref().map(|a| cut(a, MAX_NAME_BYTES)),
            status: ev.status,
            reason: ev.reason.as_deref().map(|r| cut(r, MAX_REASON_BYTES)),
            upstream_status: ev.upstream_status,
            plivo_api_id: ev
                .plivo_api_id
                .as_deref()
                .map(|id| cut(id, MAX_PLIVO_API_ID_BYTES)),
            attempts: ev.attempts,
            duration_ms: ev.duration_ms,
            prev,
        }
    }

    /// Appends the compact JSON object to `out`, byte for byte what `serde_json` makes of
    /// the derive: the member names are written as constants (serde_json would escape
    /// each of them on every record), strings are escaped by `serde_json` itself. One
    /// statement per member, in contract order: each name's length is then a constant,
    /// and its copy a few moves instead of a call to `memcpy`.
    pub(crate) fn write_json(&self, out: &mut Vec<u8>) -> serde_json::Result<()> {
        out.extend_from_slice(b"{\"seq\":");
        serde_json::to_writer(&mut *out, &self.seq)?;
        member(out, b",\"ts\":", Value::Plain(self.ts.as_str().as_bytes()))?;
        member(
            out,
            b",\"event\":",
            Value::Plain(self.event.as_str().as_bytes()),
        )?;
        member(out, b",\"request_id\":", Value::Text(Some(self.request_id)))?;
        member(out, b",\"tenant\":", Value::Text(self.tenant))?;
        member(out, b",\"token_fp\":", Value::Text(self.token_fp))?;
        member(out, b",\"client\":", Value::Text(self.client))?;
        member(out, b",\"method\":", Value::Text(Some(self.method)))?;
        member(out, b",\"path\":", Value::Text(Some(self.path)))?;
        member(out, b",\"mpc\":", Value::Text(self.mpc))?;
        member(out, b",\"account\":", Value::Text(self.account))?;
        member(out, b",\"status\":", Value::number(self.status))?;
        member(out, b",\"reason\":", Value::Text(self.reason))?;
        member(
            out,
            b",\"upstream_status\":",
            Value::number(self.upstream_status),
        )?;
        member(out, b",\"plivo_api_id\":", Value::Text(self.plivo_api_id))?;
        member(out, b",\"attempts\":", Value::number(self.attempts))?;
        member(out, b",\"duration_ms\":", Value::Number(self.duration_ms))?;
        member(out, b",\"prev\":", Value::Plain(self.prev.as_bytes()))?;
        out.push(b'}');
        Ok(())
    }
}

/// `,"name":` and the value, appended to `out`. Inlined into each call, where the name's
/// length `N` is known.
#[inline(always)]
fn member<const N: usize>(
    out: &mut Vec<u8>,
    name: &[u8; N],
    value: Value<'_>,
) -> serde_json::Result<()> {
    out.extend_from_slice(name);
    match value {
        Value::Plain(text) => write_plain_string(out, text),
        Value::Text(Some(text)) => write_json_string(out, text),
        Value::Number(Some(number)) => serde_json::to_writer(&mut *out, &number)?,
        Value::Text(None) | Value::Number(None) => out.extend_from_slice(b"null"),
    }
    Ok(())
}

/// `text` as a JSON string. Almost every value is ASCII that needs no escape, and is
/// copied as is; the rest is escaped character by character. Inlined into each member's
/// writing (with the escaping kept out of line) as it was while the escaping was
/// serde_json's: about 440 instructions per request fewer.
#[inline(always)]
fn write_json_string(out: &mut Vec<u8>, text: &str) {
    if is_plain(text.as_bytes()) {
        write_plain_string(out, text.as_bytes());
    } else {
        write_escaped_string(out, text);
    }
}

/// `text`, known to need no escape, as a JSON string.
fn write_plain_string(out: &mut Vec<u8>, text: &[u8]) {
    out.reserve(text.len() + 2);
    out.push(b'"');
    out.extend_from_slice(text);
    out.push(b'"');
}

/// `text` as a JSON string with `"`, `\` and control characters escaped as JSON requires
/// (and as serde_json writes them), and also the characters [`shown_escaped`] names, so
/// that the raw file shows on a terminal exactly what was recorded.
#[cold]
#[inline(never)]
fn write_escaped_string(out: &mut Vec<u8>, text: &str) {
    out.reserve(text.len() + 2);
    out.push(b'"');
    for c in text.chars() {
        match c {
            '"' => out.extend_from_slice(b"\\\""),
            '\\' => out.extend_from_slice(b"\\\\"),
            '\n' => out.extend_from_slice(b"\\n"),
            '\r' => out.extend_from_slice(b"\\r"),
            '\t' => out.extend_from_slice(b"\\t"),
            '\u{8}' => out.extend_from_slice(b"\\b"),
            '\u{c}' => out.extend_from_slice(b"\\f"),
            c if shown_escaped(c) => write_unicode_escape(out, c),
            c => out.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes()),
        }
    }
    out.push(b'"');
}

/// `\uXXXX` (lower-case hex, as serde_json writes it) for a character of the Basic
/// Multilingual Plane, which every character [`shown_escaped`] names is.
fn write_unicode_escape(out: &mut Vec<u8>, c: char) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let code = c as u32;
    out.extend_from_slice(b"\\u");
    for shift in [12, 8, 4, 0] {
        out.push(HEX[((code >> shift) & 0xf) as usize]);
    }
}

/// Characters a record writes as `\u` escapes although JSON would take some of them raw:
/// control characters (C1 included: terminal escapes in a hostile value), the line and
/// paragraph separators, and the invisible format characters that reorder or hide text
/// (bidi overrides, zero-width characters). A tenant may put them in an MPC name, and
/// `cat`, `less` or `tail -f` of the log would otherwise show another text than the one
/// recorded.
pub(crate) fn shown_escaped(c: char) -> bool {
    c.is_control() || matches!(c, '\u{2028}' | '\u{2029}') || is_invisible_format(c)
}

/// Bidirectional embeddings, overrides, isolates and marks, zero-width characters and
/// the byte order mark (Unicode's format characters that change how a line shows).
fn is_invisible_format(c: char) -> bool {
    matches!(
        c,
        '\u{00AD}'
            | '\u{061C}'
            | '\u{180E}'
            | '\u{200B}'..='\u{200F}'
            | '\u{202A}'..='\u{202E}'
            | '\u{2060}'..='\u{2064}'
            | '\u{2066}'..='\u{206F}'
            | '\u{FEFF}'
            | '\u{FFF9}'..='\u{FFFB}'
    )
}

/// Whether `text` is its own JSON string and shows as itself: ASCII with no `"`, `\` or
/// control character. Most of a record's text is scanned here, so eight bytes at a time.
fn is_plain(text: &[u8]) -> bool {
    let (words, rest) = text.as_chunks::<8>();
    words
        .iter()
        .all(|word| !needs_escape(u64::from_le_bytes(*word)))
        && rest.iter().all(|&b| !byte_needs_escape(b))
}

fn byte_needs_escape(b: u8) -> bool {
    b < 0x20 || b == b'"' || b == b'\\' || b == 0x7f || !b.is_ascii()
}

const EVERY_BYTE: u64 = u64::from_le_bytes([1; 8]);
const TOP_BITS: u64 = EVERY_BYTE * 0x80;

/// Top bit of each byte of `word` below `n` (`n` ≤ 0x80): subtracting `n` from each
/// byte sets its top bit when it borrows, and bytes that had their top bit set already
/// (any byte ≥ 0x80) are masked out. A borrow only ever comes from a byte below `n`, so
/// whether any is flagged is exact, although which byte it flags may be off.
const fn below(word: u64, n: u8) -> u64 {
    word.wrapping_sub(EVERY_BYTE * n as u64) & !word & TOP_BITS
}

/// Top bit of each byte at or above 0x7f (DEL and every non-ASCII byte): adding one
/// sets it for 0x7f, and a byte at 0x80 or above has it already. Only a byte at 0xff
/// carries into the next, which is then flagged or not, but the word is flagged anyway.
const fn from_del(word: u64) -> u64 {
    (word.wrapping_add(EVERY_BYTE) | word) & TOP_BITS
}

/// [`byte_needs_escape`] for eight bytes at once.
const fn needs_escape(word: u64) -> bool {
    let flags = below(word, 0x20)
        | below(word ^ (EVERY_BYTE * b'"' as u64), 1)
        | below(word ^ (EVERY_BYTE * b'\\' as u64), 1)
        | from_del(word);
    // One branch for the four tests.
    flags != 0
}

/// One member's value in [`Body::write_json`].
enum Value<'a> {
    /// Text the writer made itself (`ts`, `event`, `prev`), which never needs an escape:
    /// not scanned for one. About a third of a record's text.
    Plain(&'a [u8]),
    Text(Option<&'a str>),
    Number(Option<u64>),
}

impl Value<'_> {
    fn number(number: Option<impl Into<u64>>) -> Self {
        Value::Number(number.map(Into::into))
    }
}

/// The serde reference of `ts` (tests only): its text.
#[cfg(test)]
fn ts_text<S: serde::Serializer>(ts: &&TsText, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(ts.as_str())
}

/// The serde reference of `prev` (tests only): the hash as its hex text.
#[cfg(test)]
fn hex_digest_text<S: serde::Serializer>(digest: &&HexDigest, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(digest.as_str())
}

/// The longest prefix of `s` that has at most `max` bytes and ends on a char boundary.
pub(crate) fn truncate_on_char_boundary(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// The current UTC time cut to whole milliseconds, the resolution of `ts`.
pub(crate) fn now_ms() -> OffsetDateTime {
    let now = OffsetDateTime::now_utc();
    let millis = now.nanosecond() / 1_000_000 * 1_000_000;
    now.replace_nanosecond(millis).unwrap_or(now)
}

/// A record's `ts` as the writer writes it: digits and separators only, so it is its
/// own JSON string. Made only by [`format_ts`].
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct TsText(String);

impl TsText {
    pub(crate) fn as_str(&self) -> &str {
        &self.0
    }
}

/// RFC 3339 UTC with milliseconds, e.g. `2026-11-26T09:03:32.123Z`. Written by hand
/// because it cannot fail, unlike a format description.
pub(crate) fn format_ts(t: OffsetDateTime) -> TsText {
    let t = t.to_offset(time::UtcOffset::UTC);
    TsText(format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.millisecond()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    /// The eight-at-a-time scan agrees with the byte-wise rule for every byte value at
    /// every position of a word and of the tail, and for every pair of adjacent bytes
    /// (a borrow from one byte must not flag or hide the next).
    #[test]
    fn the_word_scan_agrees_with_the_byte_rule() {
        let byte_rule = |bytes: &[u8]| bytes.iter().all(|&b| !byte_needs_escape(b));
        for len in [8, 11, 16] {
            for at in 0..len {
                for b in 0..=255u8 {
                    let mut bytes = vec![b'a'; len];
                    bytes[at] = b;
                    assert_eq!(
                        is_plain(&bytes),
                        byte_rule(&bytes),
                        "{b:#x} at {at} of {len}"
                    );
                }
            }
        }
        for at in 0..7 {
            for first in 0..=255u8 {
                for second in 0..=255u8 {
                    let mut bytes = [b'a'; 8];
                    bytes[at] = first;
                    bytes[at + 1] = second;
                    assert_eq!(
                        is_plain(&bytes),
                        byte_rule(&bytes),
                        "{first:#x} {second:#x} at {at}"
                    );
                }
            }
        }
        // And the text written is the reference's, for every ASCII character, in the
        // part scanned by words and in the tail.
        for c in (0..0x80u8).map(char::from) {
            for at in [0, 5, 9] {
                let mut text: Vec<char> = "abcdefghij".chars().collect();
                text[at] = c;
                let text: String = text.into_iter().collect();
                let mut ours = Vec::new();
                write_json_string(&mut ours, &text);
                assert_eq!(ours, reference_json(&text), "{c:?} at {at}");
            }
        }
        assert!(is_plain(b"conf-1 and a longer plain text"));
        // Non-ASCII text is looked at character by character.
        assert!(!is_plain("conf-ü-1 and a longer plain text".as_bytes()));
        assert!(!is_plain(b"a longer text with a \"quote\""));
        assert!(!is_plain(b"a longer text with a \\ backslash"));
        assert!(!is_plain(b"a longer text with a\ttab"));
    }

    #[test]
    fn ts_has_milliseconds_and_z() {
        let t = datetime!(2026-11-26 09:03:32.123456 UTC);
        assert_eq!(format_ts(t).as_str(), "2026-11-26T09:03:32.123Z");
        let t = datetime!(2026-01-02 03:04:05 +02:00);
        assert_eq!(format_ts(t).as_str(), "2026-01-02T01:04:05.000Z");
    }

    #[test]
    fn a_record_keeps_at_most_512_bytes_of_mpc() {
        let long = "ä".repeat(MAX_MPC_BYTES);
        let ev = AuditEvent {
            mpc: Some(long.as_str().into()),
            ..AuditEvent::default()
        };
        let prev = HexDigest::parse(&"0".repeat(64)).expect("hex");
        let ts = format_ts(datetime!(2026-11-26 09:03:32.123 UTC));
        let body = Body::new(1, &ts, &prev, &ev);
        assert_eq!(body.mpc, Some(&long[..MAX_MPC_BYTES]));
    }

    /// Whatever a caller hands over, no text member of a record is longer than
    /// `max_text_bytes` says (which `torn` holds partial records to), and `token_fp` no
    /// longer than a fingerprint.
    #[test]
    fn every_text_member_is_cut_to_what_a_record_keeps() {
        let long: Arc<str> = "x".repeat(4096).into();
        let ev = AuditEvent {
            request_id: Arc::clone(&long),
            tenant: Some(Arc::clone(&long)),
            token_fp: Some(Arc::clone(&long)),
            client: Some(Arc::clone(&long)),
            method: long.to_string().into(),
            path: Arc::clone(&long),
            mpc: Some(Arc::clone(&long)),
            account: Some(Arc::clone(&long)),
            reason: Some(long.to_string().into()),
            plivo_api_id: Some(Arc::clone(&long)),
            ..AuditEvent::default()
        };
        let prev = HexDigest::parse(&"0".repeat(64)).expect("hex");
        let ts = format_ts(datetime!(2026-11-26 09:03:32.123 UTC));
        let mut line = Vec::new();
        Body::new(1, &ts, &prev, &ev)
            .write_json(&mut line)
            .expect("serialize");
        let record: serde_json::Value = serde_json::from_slice(&line).expect("json");
        for member in MEMBERS {
            let Some(cap) = max_text_bytes(member) else {
                continue;
            };
            assert_eq!(record[member].as_str().map(str::len), Some(cap), "{member}");
        }
        assert_eq!(
            record["token_fp"].as_str().map(str::len),
            Some(TOKEN_FP_BYTES)
        );
    }

    #[test]
    fn truncation_respects_char_boundaries() {
        assert_eq!(truncate_on_char_boundary("abc", 5), "abc");
        assert_eq!(truncate_on_char_boundary("abcdef", 3), "abc");
        // "ä" is two bytes: cutting at 2 would split it.
        assert_eq!(truncate_on_char_boundary("aä", 2), "a");
        let long = "ä".repeat(200);
        let cut = truncate_on_char_boundary(&long, MAX_PATH_BYTES);
        assert_eq!(cut.len(), 256);
    }

    #[test]
    fn event_kind_wire_names() {
        for (k, s) in [
            (EventKind::Denied, "\"denied\""),
            (EventKind::Forward, "\"forward\""),
            (EventKind::Result, "\"result\""),
        ] {
            assert_eq!(serde_json::to_string(&k).ok().as_deref(), Some(s));
            assert_eq!(format!("\"{}\"", k.as_str()), s);
        }
    }

    /// What a record's JSON must be: serde_json's, with every character that
    /// [`shown_escaped`] names and serde_json leaves raw written as `\u` escape.
    fn reference_json<T: Serialize + ?Sized>(value: &T) -> Vec<u8> {
        let serde = serde_json::to_string(value).expect("serialize");
        let mut escaped = String::with_capacity(serde.len());
        for c in serde.chars() {
            if shown_escaped(c) {
                escaped.push_str(&format!("\\u{:04x}", c as u32));
            } else {
                escaped.push(c);
            }
        }
        escaped.into_bytes()
    }

    /// Strings are written as the reference says, on both paths, and read back as the
    /// text they came from.
    #[test]
    fn json_strings_match_the_reference_on_both_paths() {
        let cases = [
            "",
            "plain",
            " ",
            "~\u{7f}",
            "ä€😀\u{2028}\u{2029}",
            "\u{1f}",
            "\u{0}",
            "\u{85}\u{9b}31m",
            "billing-\u{202e}dne/x",
            "zero\u{200b}width\u{feff}",
            "\"",
            "\\",
            "a\"b",
            "/mpc/x/end",
            "tab\there",
            "line\n",
        ];
        for case in cases {
            let mut ours = Vec::new();
            write_json_string(&mut ours, case);
            assert_eq!(
                String::from_utf8_lossy(&ours),
                String::from_utf8_lossy(&reference_json(case)),
                "{case:?}"
            );
            let read: String = serde_json::from_slice(&ours).expect("valid JSON");
            assert_eq!(read, case);
            assert!(
                !String::from_utf8_lossy(&ours).chars().any(shown_escaped),
                "{case:?}: nothing shown raw that could hide or reorder text"
            );
        }
    }

    #[test]
    fn write_json_matches_the_serde_reference() {
        let hostile = "q\"b\\s/\u{0}\u{1f}\n\r\t\u{8}\u{c}\u{7f}ä€😀\u{2028}\u{202e}\u{9b}";
        let full = AuditEvent {
            event: EventKind::Result,
            request_id: hostile.into(),
            tenant: Some("billing".into()),
            token_fp: Some("0123456789ab".into()),
            client: Some("[::1]:65535".into()),
            method: "DELETE".into(),
            path: format!("/mpc/{hostile}/end").into(),
            mpc: Some(hostile.into()),
            account: Some("default".into()),
            status: Some(204),
            reason: Some("ended".into()),
            upstream_status: Some(u16::MAX),
            plivo_api_id: Some(hostile.into()),
            attempts: Some(u32::MAX),
            duration_ms: Some(u64::MAX),
        };
        let prev = HexDigest::parse(&"0123456789abcdef".repeat(4)).expect("hex");
        let ts = format_ts(datetime!(2026-11-26 09:03:32.123 UTC));
        for (seq, ev) in [(1, AuditEvent::default()), (u64::MAX, full)] {
            let body = Body::new(seq, &ts, &prev, &ev);
            let mut written = Vec::new();
            body.write_json(&mut written).expect("write");
            assert_eq!(
                String::from_utf8_lossy(&written),
                String::from_utf8_lossy(&reference_json(&body))
            );
        }
    }

    #[test]
    fn body_members_are_in_contract_order() {
        let ev = AuditEvent::default();
        let prev = HexDigest::parse(super::super::chain::GENESIS).expect("hex");
        let ts = format_ts(OffsetDateTime::UNIX_EPOCH);
        let body = Body::new(1, &ts, &prev, &ev);
        let mut written = Vec::new();
        body.write_json(&mut written).expect("write");
        let json = String::from_utf8(written).unwrap_or_default();
        let mut at = 0;
        for name in &MEMBERS[..MEMBERS.len() - 1] {
            let key = format!("\"{name}\":");
            let found = json[at..].find(&key).map(|i| i + at);
            assert!(found.is_some(), "{name} missing or out of order in {json}");
            at = found.unwrap_or(0);
        }
    }
}
