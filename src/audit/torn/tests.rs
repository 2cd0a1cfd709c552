//! The torn-tail classifier: every prefix of a real record is plausible; what the
//! review of `audit verify` appended or rewrote (junk, another seq, a rewritten record,
//! more than a record can hold) is not.

use time::macros::datetime;

use super::*;
use crate::audit::chain::{self, ChainHasher, HexDigest, GENESIS};
use crate::audit::record::max_text_bytes;
use crate::audit::record::{format_ts, AuditEvent, Body, EventKind};

/// A record line as the writer writes it, without its newline.
fn line(seq: u64, ev: &AuditEvent) -> Vec<u8> {
    let ts = format_ts(datetime!(2026-11-28 14:01:13.271 UTC));
    let prev = HexDigest::parse(GENESIS).expect("hex");
    let mut body = Vec::new();
    Body::new(seq, &ts, &prev, ev)
        .write_json(&mut body)
        .expect("serialize");
    let hash = ChainHasher::Plain.digest_hex(&body);
    let mut out = Vec::new();
    chain::seal_into(&body, &hash, &mut out);
    assert_eq!(out.pop(), Some(b'\n'));
    out
}

/// Records with every shape of value: nulls, numbers, plain and escaped strings,
/// multi-byte characters (cut in two by some prefixes), `\u` escapes.
fn records() -> Vec<(u64, Vec<u8>)> {
    let denied = AuditEvent {
        event: EventKind::Denied,
        request_id: "90a73fca-f232-4fcd-a20c-c03fc5b47db1".into(),
        method: "POST".into(),
        path: "/mpc/a-ok5/end".into(),
        status: Some(429),
        reason: Some("rate-limited".into()),
        duration_ms: Some(0),
        ..AuditEvent::default()
    };
    let hostile = "q\"b\\s/\u{0}\u{1f}\n\tä€😀\u{2028}\u{202e}\u{9b}";
    let result = AuditEvent {
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
        upstream_status: Some(204),
        plivo_api_id: Some(hostile.into()),
        attempts: Some(1),
        duration_ms: Some(u64::MAX),
    };
    let forward = AuditEvent {
        event: EventKind::Forward,
        status: None,
        reason: None,
        upstream_status: None,
        plivo_api_id: None,
        attempts: None,
        duration_ms: None,
        ..result.clone()
    };
    vec![
        (1, line(1, &denied)),
        (75, line(75, &result)),
        (u64::MAX, line(u64::MAX, &forward)),
        (10, line(10, &AuditEvent::default())),
    ]
}

fn why(class: TornTail) -> String {
    match class {
        TornTail::NotARecordPrefix { why } => why,
        other => panic!("expected not a record prefix, got {other:?}"),
    }
}

/// The writer's disk write test appends blanks and cuts them off again; a crash in
/// between leaves them, and nothing else made of blanks alone is a crash's.
#[test]
fn the_blanks_of_an_interrupted_write_test_are_left_by_a_crash() {
    for len in [1, 100, PROBE_BYTES] {
        assert_eq!(
            classify_unterminated_tail(&vec![b' '; len], 75),
            TornTail::WriteTestBlanks
        );
    }
    let more = vec![b' '; PROBE_BYTES + 1];
    assert!(matches!(
        classify_unterminated_tail(&more, 75),
        TornTail::NotARecordPrefix { .. }
    ));
    assert!(matches!(
        classify_unterminated_tail(b"  x", 75),
        TornTail::NotARecordPrefix { .. }
    ));
}

#[test]
fn every_prefix_of_a_real_record_is_plausible() {
    for (seq, record) in records() {
        for end in 0..=record.len() {
            assert_eq!(
                classify_unterminated_tail(&record[..end], seq),
                TornTail::Plausible,
                "seq {seq}, prefix {:?}",
                String::from_utf8_lossy(&record[..end])
            );
        }
    }
}

#[test]
fn a_prefix_of_another_seq_is_not() {
    for (seq, record) in records() {
        for other in [
            seq.wrapping_add(1),
            seq.wrapping_sub(1),
            seq.wrapping_mul(10),
        ] {
            let at = format!("{{\"seq\":{seq}").len();
            // Cut after the seq's digits: the other seq might still be its prefix.
            let tail = &record[..at + 1];
            assert!(
                why(classify_unterminated_tail(tail, other))
                    .contains("does not begin as record seq"),
                "{seq} given {other}"
            );
        }
    }
}

/// The review's cases (c27, c29, c31, and the 300 MB line), verbatim or in shape.
#[test]
fn the_reviewed_forgeries_are_not_plausible() {
    let c27 = classify_unterminated_tail(b"I was never here", 75);
    assert!(why(c27).contains("does not begin as record seq 75"));

    let c29 = classify_unterminated_tail(br#"{"seq":1,"ts":"1999-"#, 75);
    assert!(why(c29).contains("`{\"seq\":75,`"));

    // c31: the last record (seq 74, a `denied` 429) cut before `reason` and given the
    // reason of a success.
    let (_, record) = records().remove(0);
    let record = String::from_utf8(record).expect("utf-8");
    let cut = record.rfind("\"reason\"").expect("reason");
    let c31 = format!("{}\"reason\":\"ended\"", &record[..cut]);
    let c31 = classify_unterminated_tail(c31.as_bytes(), 1);
    assert!(why(c31).contains("`denied` record with reason `ended`"));

    // 300 MB of `{"seq":999999,"x":"AAAA…` in shape: over 1 MiB, and not a record.
    let mut huge = br#"{"seq":999999,"x":""#.to_vec();
    huge.resize(MAX_RECORD_BYTES + 1, b'A');
    assert!(why(classify_unterminated_tail(&huge, 999_999)).contains("more than the 1 MiB"));
    // Over 1 MiB even though every byte fits the grammar.
    let mut long =
        br#"{"seq":5,"ts":"2026-11-28T14:01:13.271Z","event":"denied","request_id":""#.to_vec();
    assert_eq!(
        classify_unterminated_tail(&long, 5),
        TornTail::Plausible,
        "the same, short"
    );
    long.resize(MAX_RECORD_BYTES + 1, b'A');
    assert!(why(classify_unterminated_tail(&long, 5)).contains("1 MiB"));
}

#[test]
fn prefixes_off_the_grammar_are_not_plausible() {
    let head = r#"{"seq":5,"ts":"2026-11-28T14:01:13.271Z","event":"denied","request_id":"r","#;
    let cases: [(&str, &str); 16] = [
        (r#"{"seq":5,"event":"#, "member 2 is not `ts`"),
        (r#"{"seq": 5,"#, "does not begin"),
        (
            r#"{"seq":5,"ts":"2026-11-28 14"#,
            "`ts` is not as the writer writes it",
        ),
        (r#"{"seq":5,"ts":"2026-11-28T14:01:13.271Z+"#, "`ts` is not"),
        (r#"{"seq":5,"ts":"2026-11-28T14:01:13Z""#, "`ts` is not"),
        (
            r#"{"seq":5,"ts":"2026-11-28T14:01:13.271Z","event":"ended""#,
            "`event` is not",
        ),
        (
            r#"{"seq":5,"ts":"2026-11-28T14:01:13.271Z","event":null"#,
            "`event` is not a string",
        ),
        (
            r#"{"seq":5,"ts":"2026-11-28T14:01:13.271Z","event":"denied","request_id":null"#,
            "`request_id` is not a string",
        ),
        (&format!("{head}\"tenant\":nul!"), "`tenant` is not `null`"),
        (&format!("{head}\"tenant\":5"), "`tenant` is not a string"),
        (&format!("{head}\"tenant\":\"a\\x"), "bad escape"),
        (&format!("{head}\"tenant\":\"a\\u12g"), "bad \\u escape"),
        (&format!("{head}\"tenant\":\"a\tb"), "raw control character"),
        (
            &format!("{head}\"tenant\":\"a\",\"client\""),
            "member 6 is not `token_fp`",
        ),
        (
            &format!("{head}\"tenant\":\"a\" "),
            "no `,` after member `tenant`",
        ),
        (
            &format!("{head}\"tenant\":null}}"),
            "no `,` after member `tenant`",
        ),
    ];
    for (tail, expected) in cases {
        let got = why(classify_unterminated_tail(tail.as_bytes(), 5));
        assert!(got.contains(expected), "{tail}: {got}");
        assert!(got.contains("at byte"), "{tail}: {got}");
    }

    // Numbers, hashes and what follows the record.
    let (seq, record) = records().remove(0);
    let record = String::from_utf8(record).expect("utf-8");
    let edits = [
        ("\"status\":429", "\"status\":0429", "leading zero"),
        (
            "\"status\":429",
            "\"status\":\"429\"",
            "`status` is not a number or null",
        ),
        (
            "\"status\":429",
            "\"status\":-1",
            "`status` is not a number",
        ),
        (
            "\"duration_ms\":0",
            "\"duration_ms\":123456789012345678901",
            "too large",
        ),
        ("\"prev\":\"0000", "\"prev\":\"000A", "`prev` is not"),
    ];
    for (from, to, expected) in edits {
        let edited = record.replacen(from, to, 1);
        let got = why(classify_unterminated_tail(edited.as_bytes(), seq));
        assert!(got.contains(expected), "{to}: {got}");
    }
    let short_hash = format!("{}\"}}", &record[..record.len() - 3]);
    assert!(why(classify_unterminated_tail(short_hash.as_bytes(), seq)).contains("`hash` is not"));
    let trailing = format!("{record} ");
    assert!(why(classify_unterminated_tail(trailing.as_bytes(), seq)).contains("after the end"));
    let hash_only = format!("{}}}", &record[..record.rfind(",\"hash\"").expect("hash")]);
    assert!(
        why(classify_unterminated_tail(hash_only.as_bytes(), seq))
            .contains("no `,` after member `prev`"),
        "a record without its hash member"
    );
}

#[test]
fn utf8_may_be_cut_only_at_the_very_end() {
    let head = r#"{"seq":5,"ts":"2026-11-28T14:01:13.271Z","event":"denied","request_id":""#;
    let euro = "€".as_bytes();
    let mut cut = head.as_bytes().to_vec();
    cut.extend_from_slice(&euro[..2]);
    assert_eq!(classify_unterminated_tail(&cut, 5), TornTail::Plausible);
    cut.push(b'x');
    assert!(why(classify_unterminated_tail(&cut, 5)).contains("not valid UTF-8"));
    // A cut character outside a string is off the grammar anyway.
    let mut outside = br#"{"seq":5,"#.to_vec();
    outside.extend_from_slice(&euro[..1]);
    assert!(why(classify_unterminated_tail(&outside, 5)).contains("member 2"));
}

/// `bytes` bytes of NULs, each of which the writer writes as six (`\u0000`): the most
/// room a text of that many bytes can take in a record.
fn escaped_text_of(bytes: usize) -> String {
    "\0".repeat(bytes)
}

/// A record with every text member at the most a record keeps of it, every character
/// escaped: the largest record the writer writes, and every prefix of it is plausible.
#[test]
fn every_prefix_of_the_largest_record_is_plausible() {
    let cap = |member| escaped_text_of(max_text_bytes(member).expect("a text member"));
    let largest = AuditEvent {
        event: EventKind::Result,
        request_id: cap("request_id").into(),
        tenant: Some(cap("tenant").into()),
        token_fp: Some("0123456789ab".into()),
        client: Some(cap("client").into()),
        method: cap("method").into(),
        path: cap("path").into(),
        mpc: Some(cap("mpc").into()),
        account: Some(cap("account").into()),
        status: Some(u16::MAX),
        reason: Some(cap("reason").into()),
        upstream_status: Some(u16::MAX),
        plivo_api_id: Some(cap("plivo_api_id").into()),
        attempts: Some(u32::MAX),
        duration_ms: Some(u64::MAX),
    };
    let record = line(u64::MAX, &largest);
    assert!(record.len() > 6 * 2200, "escaped: {} bytes", record.len());
    for end in 0..=record.len() {
        assert_eq!(
            classify_unterminated_tail(&record[..end], u64::MAX),
            TornTail::Plausible,
            "prefix of {end} bytes"
        );
    }
}

/// A record cut just after `"<member>":`, from a record with a value in every member.
fn head_before(member: &str) -> String {
    let (_, record) = records().swap_remove(1);
    let record = String::from_utf8(record).expect("utf-8");
    let key = format!("\"{member}\":");
    let at = record.find(&key).expect("member") + key.len();
    record[..at].to_owned()
}

/// A free-text tail (recheck N2: ~990 KB of text inside `request_id` passed for a torn
/// record): no member holds more than a record keeps of it, counted unescaped.
#[test]
fn no_text_member_holds_more_than_a_record_keeps() {
    for member in MEMBERS {
        let Some(cap) = max_text_bytes(member) else {
            continue;
        };
        let head = head_before(member);
        let fits = format!("{head}\"{}", "a".repeat(cap));
        assert_eq!(
            classify_unterminated_tail(fits.as_bytes(), 75),
            TornTail::Plausible,
            "{member} at its cap"
        );
        let closed = format!("{fits}\",");
        assert_eq!(
            classify_unterminated_tail(closed.as_bytes(), 75),
            TornTail::Plausible,
            "{member} at its cap, closed"
        );
        let over = format!("{head}\"{}", "a".repeat(cap + 1));
        let got = why(classify_unterminated_tail(over.as_bytes(), 75));
        assert!(
            got.contains(&format!("`{member}` is longer than the {cap} bytes")),
            "{member}: {got}"
        );
        // Escapes count as the bytes they stand for: `\u20ac` is three.
        let escaped = format!("{head}\"{}", "\\u20ac".repeat(cap / 3 + 1));
        let got = why(classify_unterminated_tail(escaped.as_bytes(), 75));
        assert!(got.contains("is longer than"), "{member} escaped: {got}");
        let escaped_fits = format!("{head}\"{}", "\\u20ac".repeat(cap / 3));
        assert_eq!(
            classify_unterminated_tail(escaped_fits.as_bytes(), 75),
            TornTail::Plausible,
            "{member} escaped at its cap"
        );
    }
    let mut request_id = head_before("request_id").into_bytes();
    request_id.push(b'"');
    request_id.resize(990_000, b'A');
    let got = why(classify_unterminated_tail(&request_id, 75));
    assert!(
        got.contains("`request_id` is longer than the 128 bytes"),
        "{got}"
    );
}

#[test]
fn a_token_fp_is_twelve_lower_case_hex_digits_or_null() {
    let head = head_before("token_fp");
    for plausible in ["null", "\"0123456789ab\"", "\"0123", "\"", "nu"] {
        let tail = format!("{head}{plausible}");
        assert_eq!(
            classify_unterminated_tail(tail.as_bytes(), 75),
            TornTail::Plausible,
            "{plausible}"
        );
    }
    for bad in [
        "\"0123456789abc",
        "\"0123456789aB\"",
        "\"012345\"",
        "\"token\"",
        "12",
    ] {
        let tail = format!("{head}{bad}");
        let got = why(classify_unterminated_tail(tail.as_bytes(), 75));
        assert!(got.contains("`token_fp` is not"), "{bad}: {got}");
    }
}

#[test]
fn a_ts_is_a_date_and_time_that_exist() {
    let head = r#"{"seq":5,"ts":""#;
    let plausible = [
        "2026-1",
        "2026-12-31T23:59:59.999Z",
        "2028-02-29T00:00:00.000Z",
        "2026-04-3",
        "2026-04-30T2",
        "2026-02-2",
        "2026-0",
    ];
    for ts in plausible {
        let tail = format!("{head}{ts}");
        assert_eq!(
            classify_unterminated_tail(tail.as_bytes(), 5),
            TornTail::Plausible,
            "{ts}"
        );
    }
    let impossible = [
        "2026-2",
        "2026-13",
        "2026-00",
        "2026-11-00",
        "2026-02-29",
        "2026-02-3",
        "2026-04-31",
        "2026-11-28T24",
        "2026-11-28T3",
        "2026-11-28T23:60",
        "2026-11-28T23:6",
        "2026-11-28T23:59:60.000Z",
        "2026-11-28T23:59:7",
    ];
    for ts in impossible {
        let tail = format!("{head}{ts}");
        let got = why(classify_unterminated_tail(tail.as_bytes(), 5));
        assert!(
            got.contains("`ts` is not as the writer writes it"),
            "{ts}: {got}"
        );
    }
}
