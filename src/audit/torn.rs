//! Whether the bytes after the last newline of an audit file could be what a crash
//! mid-write leaves (DESIGN.md §3, "a torn last line"): the beginning of the next record.
//!
//! The writer appends whole records, each serialized in one piece in the contract's
//! member order, so a crash can leave only a prefix of the record it was writing: one
//! that starts `{"seq":<the next seq>,"ts":"` and then follows the members of §3 in order,
//! with values shaped as the writer writes them, the last one possibly cut anywhere (in
//! a string, an escape, a number, `null`, even inside a UTF-8 character). Anything else
//! without a newline at the end of a file (junk, a record with another seq, a rewritten
//! record, more than a record can hold) was not left by a crash: `audit verify` reports
//! it as such rather than as torn, and start-up recovery should not cut it as a torn
//! write.
//!
//! The check is on bytes only: it cannot tell a real torn write from the same bytes
//! forged, and a whole record ending in `}` (one that lost only its newline) is
//! plausible here but must still verify (hash and link), which is the caller's part.
//! Besides the grammar it holds values to what the writer can write: a `ts` that is a
//! real date and time, a `token_fp` of 12 hex digits, no text longer than a record keeps
//! of it (`record::max_text_bytes`, so no tail of free text passes for a record's
//! beginning), and `reason` `ended` in a `result` record only (success is a forwarded
//! request's outcome). It does not hold `ts` to the previous record's: the writer keeps
//! `ts` from going back, except after a restart that found the last record's `ts` far in
//! the future, when it writes the host's time again (see `recover`).

use time::{util::days_in_month, Month};

use super::record::{max_text_bytes, MEMBERS, TOKEN_FP_BYTES};
use super::writer::PROBE_BYTES;

/// A quick bound on a record (its line without the newline); a longer tail is no record's
/// beginning. The same bound as the tools' line cap and recovery's. The members' own caps
/// bound a record far more tightly (to some 14 KiB with every character escaped), and
/// the grammar below holds each member to its cap.
pub const MAX_RECORD_BYTES: usize = 1 << 20;

/// What an unterminated final line is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TornTail {
    /// A prefix of the record with the expected seq, as a crash mid-write leaves (or the
    /// whole record without its newline, which must then still verify).
    Plausible,
    /// Blanks only, no more than the writer's disk write test appends (it writes them,
    /// syncs and cuts them off again; see `Writer::test_write`): what a crash during
    /// that test leaves.
    WriteTestBlanks,
    /// Not something a crash could leave; `why` says what gives it away (for messages).
    NotARecordPrefix { why: String },
}

/// Classifies `tail`, the bytes after the last newline of an audit file (not empty in
/// practice), given the seq the next record would have (the last complete record's
/// seq + 1, or the first seq expected when there is none).
pub fn classify_unterminated_tail(tail: &[u8], next_seq: u64) -> TornTail {
    if tail.len() > MAX_RECORD_BYTES {
        return not_a_prefix(format!(
            "{} bytes, more than the 1 MiB a record can take",
            tail.len()
        ));
    }
    if !tail.is_empty() && tail.len() <= PROBE_BYTES && tail.iter().all(|&b| b == b' ') {
        return TornTail::WriteTestBlanks;
    }
    if let Err(e) = std::str::from_utf8(tail) {
        // A crash can cut a character in two, but only at the very end.
        if e.error_len().is_some() {
            return not_a_prefix(format!("not valid UTF-8 at byte {}", e.valid_up_to()));
        }
    }
    let mut cursor = Cursor { tail, at: 0 };
    match record(&mut cursor, next_seq) {
        Ok(()) | Err(Stop::End) => TornTail::Plausible,
        Err(Stop::Bad(why)) => not_a_prefix(why),
    }
}

fn not_a_prefix(why: String) -> TornTail {
    TornTail::NotARecordPrefix { why }
}

/// Why reading stopped before the record's end: the bytes ran out consistently (a
/// plausible cut), or they went wrong (the reason, with the byte offset).
enum Stop {
    End,
    Bad(String),
}

type Step<T = ()> = Result<T, Stop>;

/// How a member's value is written (DESIGN.md §3 and the writer's `Body`).
#[derive(Clone, Copy)]
enum Shape {
    /// `YYYY-MM-DDTHH:MM:SS.mmmZ`.
    Ts,
    /// `denied`, `forward` or `result`.
    Event,
    /// A JSON string (`request_id`, `method`, `path`).
    Text,
    /// A JSON string or `null`.
    TextOrNull,
    /// A non-negative integer or `null`.
    NumberOrNull,
    /// This many lower-case hex digits (`prev`, `hash`).
    Hex(usize),
    /// This many lower-case hex digits, or `null` (`token_fp`).
    HexOrNull(usize),
}

fn shape(member: &str) -> Shape {
    match member {
        "ts" => Shape::Ts,
        "event" => Shape::Event,
        "request_id" | "method" | "path" => Shape::Text,
        "status" | "upstream_status" | "attempts" | "duration_ms" => Shape::NumberOrNull,
        "prev" | "hash" => Shape::Hex(HEX_LEN),
        "token_fp" => Shape::HexOrNull(TOKEN_FP_BYTES),
        _ => Shape::TextOrNull,
    }
}

const TS_TEMPLATE: &[u8] = b"dddd-dd-ddTdd:dd:dd.dddZ";
const EVENTS: [&str; 3] = ["denied", "forward", "result"];
const HEX_LEN: usize = 64;
/// u64::MAX has 20 digits.
const MAX_DIGITS: usize = 20;

/// The record's members in order; `Ok` once the closing `}` is read and nothing follows.
fn record(c: &mut Cursor<'_>, next_seq: u64) -> Step {
    let head = format!("{{\"seq\":{next_seq},");
    c.literal(head.as_bytes(), || {
        format!("it does not begin as record seq {next_seq} would (`{head}`)")
    })?;
    let mut event = None;
    for (i, name) in MEMBERS.iter().enumerate().skip(1) {
        if i > 1 {
            c.literal(b",", || format!("no `,` after member `{}`", MEMBERS[i - 1]))?;
        }
        let key = format!("\"{name}\":");
        c.literal(key.as_bytes(), || {
            format!("member {} is not `{name}` (the contract's order)", i + 1)
        })?;
        let value = c.value(name, shape(name))?;
        match *name {
            "event" => event = value,
            "reason" if value.as_deref() == Some("ended") && event.as_deref() != Some("result") => {
                return Err(c.bad(&format!(
                    "a `{}` record with reason `ended` (only a `result` has it)",
                    event.as_deref().unwrap_or("?")
                )));
            }
            _ => {}
        }
    }
    c.literal(b"}", || "no `}` after the hash".into())?;
    if c.at < c.tail.len() {
        return Err(c.bad("bytes after the end of the record"));
    }
    Ok(())
}

/// Reads `tail` from `at` on.
struct Cursor<'a> {
    tail: &'a [u8],
    at: usize,
}

impl Cursor<'_> {
    fn bad(&self, what: &str) -> Stop {
        Stop::Bad(format!("{what}, at byte {}", self.at))
    }

    fn next(&mut self) -> Step<u8> {
        let b = *self.tail.get(self.at).ok_or(Stop::End)?;
        self.at += 1;
        Ok(b)
    }

    fn peek(&self) -> Step<u8> {
        self.tail.get(self.at).copied().ok_or(Stop::End)
    }

    /// `lit`, or as much of it as there is before the end.
    fn literal(&mut self, lit: &[u8], what: impl FnOnce() -> String) -> Step {
        let rest = &self.tail[self.at..];
        let n = lit.len().min(rest.len());
        if rest[..n] != lit[..n] {
            return Err(self.bad(&what()));
        }
        self.at += n;
        if n < lit.len() {
            return Err(Stop::End);
        }
        Ok(())
    }

    /// One member's value; the text of a string (`None` for `null` or a number), for the
    /// rule on `reason`.
    fn value(&mut self, name: &str, shape: Shape) -> Step<Option<String>> {
        let first = self.peek()?;
        let null_allowed = matches!(
            shape,
            Shape::TextOrNull | Shape::NumberOrNull | Shape::HexOrNull(_)
        );
        if first == b'n' && null_allowed {
            self.literal(b"null", || format!("`{name}` is not `null`"))?;
            return Ok(None);
        }
        if let Shape::NumberOrNull = shape {
            self.number(name)?;
            return Ok(None);
        }
        if first != b'"' {
            let or_null = if null_allowed { " or null" } else { "" };
            return Err(self.bad(&format!("`{name}` is not a string{or_null}")));
        }
        self.at += 1;
        match shape {
            Shape::Ts => self.plain(name, is_ts),
            Shape::Event => self.plain(name, |s, closed| {
                EVENTS.iter().any(|e| {
                    if closed {
                        e.as_bytes() == s
                    } else {
                        e.as_bytes().starts_with(s)
                    }
                })
            }),
            Shape::Hex(digits) | Shape::HexOrNull(digits) => self.plain(name, |s, closed| {
                s.len() <= digits
                    && (!closed || s.len() == digits)
                    && s.iter().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
            }),
            _ => self.text(name),
        }
        .map(Some)
    }

    /// A non-negative integer as the writer writes it: digits, no leading zero.
    fn number(&mut self, name: &str) -> Step {
        let rest = &self.tail[self.at..];
        let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
        if digits == 0 {
            return Err(self.bad(&format!("`{name}` is not a number or null")));
        }
        if digits > 1 && rest[0] == b'0' {
            return Err(self.bad(&format!("`{name}` has a leading zero")));
        }
        if digits > MAX_DIGITS {
            return Err(self.bad(&format!("`{name}` is too large a number")));
        }
        self.at += digits;
        Ok(())
    }

    /// A string the writer writes without escapes (`ts`, `event`, hashes), after its
    /// opening quote: `fits(content, closed)` says whether its content so far (or, once
    /// closed, all of it) is as that member's is.
    fn plain(&mut self, name: &str, fits: impl Fn(&[u8], bool) -> bool) -> Step<String> {
        let rest = &self.tail[self.at..];
        let close = rest.iter().position(|&b| b == b'"');
        let content = &rest[..close.unwrap_or(rest.len())];
        if !fits(content, close.is_some()) {
            return Err(self.bad(&format!("`{name}` is not as the writer writes it")));
        }
        self.at += content.len();
        match close {
            Some(_) => {
                self.at += 1;
                Ok(String::from_utf8_lossy(content).into_owned())
            }
            None => Err(Stop::End),
        }
    }

    /// A JSON string after its opening quote, escapes and all, up to its closing quote;
    /// no longer, unescaped, than a record keeps of `name`.
    fn text(&mut self, name: &str) -> Step<String> {
        let start = self.at;
        let cap = max_text_bytes(name).unwrap_or(usize::MAX);
        let mut text_bytes = 0usize;
        loop {
            text_bytes += match self.next()? {
                b'"' => {
                    let content = &self.tail[start..self.at - 1];
                    return Ok(String::from_utf8_lossy(content).into_owned());
                }
                b'\\' => self.escape(name)?,
                b if b < 0x20 => {
                    return Err(self.bad(&format!(
                        "`{name}` holds a raw control character (the writer escapes them)"
                    )))
                }
                _ => 1,
            };
            if text_bytes > cap {
                return Err(self.bad(&format!(
                    "`{name}` is longer than the {cap} bytes a record keeps of it"
                )));
            }
        }
    }

    /// The rest of an escape after its backslash; the bytes of the text it stands for.
    fn escape(&mut self, name: &str) -> Step<usize> {
        match self.next()? {
            b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => Ok(1),
            b'u' => {
                let mut code = 0u32;
                for _ in 0..4 {
                    let digit = char::from(self.next()?).to_digit(16);
                    let Some(digit) = digit else {
                        return Err(self.bad(&format!("`{name}` has a bad \\u escape")));
                    };
                    code = code * 16 + digit;
                }
                // Half of a surrogate pair: the pair stands for a 4-byte character.
                Ok(char::from_u32(code).map_or(2, char::len_utf8))
            }
            _ => Err(self.bad(&format!("`{name}` has a bad escape"))),
        }
    }
}

/// Whether `s` is (a prefix of, while not `closed`) a `ts` as the writer writes it: the
/// template's shape, and a date and time that exist.
fn is_ts(s: &[u8], closed: bool) -> bool {
    matches_template(s, closed) && fields_in_range(s)
}

/// Whether the two-digit fields of a `ts` that `s` holds (all of them, or the first
/// digit of the last) are in range: a month, a day of that month, hours, minutes and
/// seconds. `s` matches the template.
fn fields_in_range(s: &[u8]) -> bool {
    let two_digits = |at: usize| -> Option<(u8, Option<u8>)> {
        let first = s.get(at)? - b'0';
        Some((first, s.get(at + 1).map(|b| b - b'0')))
    };
    let in_range = |at: usize, min: u8, max: u8| match two_digits(at) {
        None => true,
        Some((first, None)) => first * 10 <= max,
        Some((first, Some(second))) => (min..=max).contains(&(first * 10 + second)),
    };
    let month = match two_digits(5) {
        Some((first, Some(second))) => Month::try_from(first * 10 + second).ok(),
        _ => None,
    };
    let days = match (std::str::from_utf8(&s[..s.len().min(4)]), month) {
        (Ok(year), Some(month)) => year
            .parse::<i32>()
            .map_or(31, |year| days_in_month(month, year)),
        _ => 31,
    };
    in_range(5, 1, 12)
        && in_range(8, 1, days)
        && in_range(11, 0, 23)
        && in_range(14, 0, 59)
        && in_range(17, 0, 59)
}

/// Whether `s` has the shape of (a prefix of, while not `closed`) a `ts`.
fn matches_template(s: &[u8], closed: bool) -> bool {
    s.len() <= TS_TEMPLATE.len()
        && (!closed || s.len() == TS_TEMPLATE.len())
        && s.iter().zip(TS_TEMPLATE).all(|(&b, &t)| match t {
            b'd' => b.is_ascii_digit(),
            t => b == t,
        })
}

#[cfg(test)]
mod tests;
