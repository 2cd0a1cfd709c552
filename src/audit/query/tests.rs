//! `audit query` tests: filters, times, output formats, bad input.

use std::path::Path;

use time::macros::datetime;

use super::*;

const NOW: OffsetDateTime = datetime!(2026-11-26 12:00:00 UTC);

#[allow(clippy::too_many_arguments)]
fn rec(
    seq: u64,
    ts: &str,
    event: &str,
    tenant: Option<&str>,
    mpc: Option<&str>,
    status: u16,
    reason: &str,
) -> String {
    serde_json::json!({
        "seq": seq, "ts": ts, "event": event, "request_id": format!("req-{seq}"),
        "tenant": tenant, "token_fp": null, "client": null, "method": "POST",
        "path": "/mpc/x/end", "mpc": mpc, "account": null, "status": status,
        "reason": reason, "upstream_status": null, "plivo_api_id": null,
        "attempts": null, "duration_ms": 7, "prev": "0", "hash": "0"
    })
    .to_string()
}

fn sample(dir: &Path) -> Vec<String> {
    let lines = vec![
        rec(
            1,
            "2026-11-26T09:00:00.000Z",
            "denied",
            None,
            None,
            401,
            "unauthenticated",
        ),
        rec(
            2,
            "2026-11-26T10:00:00.000Z",
            "forward",
            Some("billing"),
            Some("billing-42"),
            204,
            "ended",
        ),
        rec(
            3,
            "2026-11-26T10:00:00.500Z",
            "result",
            Some("billing"),
            Some("billing-42"),
            204,
            "ended",
        ),
        rec(
            4,
            "2026-11-26T11:30:00.000Z",
            "denied",
            Some("billing"),
            Some("sales-1"),
            403,
            "forbidden",
        ),
        rec(
            5,
            "2026-11-26T11:45:00.000Z",
            "denied",
            Some("support"),
            Some("support-7"),
            429,
            "rate-limited",
        ),
    ];
    std::fs::write(dir.join("audit.jsonl"), lines.join("\n") + "\n").expect("write");
    lines
}

fn args(dir: &Path) -> QueryArgs {
    QueryArgs {
        paths: vec![dir.to_path_buf()],
        tenant: None,
        mpc: None,
        event: None,
        reason: None,
        status: None,
        since: None,
        until: None,
        format: OutputFormat::Json,
        summary: false,
    }
}

fn run(a: &QueryArgs) -> (String, String) {
    let (mut out, mut warn) = (Vec::new(), Vec::new());
    query(a, NOW, &mut out, &mut warn).expect("query");
    (
        String::from_utf8(out).expect("utf8"),
        String::from_utf8(warn).expect("utf8"),
    )
}

fn seqs(out: &str) -> Vec<u64> {
    out.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v.get("seq").and_then(|s| s.as_u64()))
        .collect()
}

#[test]
fn json_output_is_the_matching_lines_verbatim() {
    let dir = tempfile::tempdir().expect("tempdir");
    let lines = sample(dir.path());
    let (out, warn) = run(&args(dir.path()));
    assert_eq!(out, lines.join("\n") + "\n");
    assert!(warn.is_empty());
}

#[test]
fn filters_select_records() {
    let dir = tempfile::tempdir().expect("tempdir");
    sample(dir.path());
    type Case = (Box<dyn Fn(&mut QueryArgs)>, Vec<u64>);
    let cases: Vec<Case> = vec![
        (
            Box::new(|a| a.tenant = Some("billing".into())),
            vec![2, 3, 4],
        ),
        (Box::new(|a| a.mpc = Some("billing-*".into())), vec![2, 3]),
        (Box::new(|a| a.mpc = Some("*-?".into())), vec![4, 5]),
        (Box::new(|a| a.mpc = Some("Billing-*".into())), vec![]),
        (Box::new(|a| a.event = Some("denied".into())), vec![1, 4, 5]),
        (Box::new(|a| a.reason = Some("ended".into())), vec![2, 3]),
        (Box::new(|a| a.status = Some(403)), vec![4]),
        (
            Box::new(|a| a.since = Some("2026-11-26T10:00:00.500Z".into())),
            vec![3, 4, 5],
        ),
        (
            Box::new(|a| a.until = Some("2026-11-26T10:00:00Z".into())),
            vec![1, 2],
        ),
        (Box::new(|a| a.since = Some("1h".into())), vec![4, 5]),
        (Box::new(|a| a.since = Some("90m".into())), vec![4, 5]),
        (Box::new(|a| a.until = Some("2h".into())), vec![1, 2]),
        (
            Box::new(|a| a.since = Some("1d".into())),
            vec![1, 2, 3, 4, 5],
        ),
        (
            Box::new(|a| {
                a.tenant = Some("billing".into());
                a.event = Some("denied".into());
            }),
            vec![4],
        ),
    ];
    for (i, (set, want)) in cases.into_iter().enumerate() {
        let mut a = args(dir.path());
        set(&mut a);
        assert_eq!(seqs(&run(&a).0), want, "case {i}: {a:?}");
    }
}

#[test]
fn invalid_time_is_a_usage_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    sample(dir.path());
    for bad in ["yesterday", "1y", "h", "-1h", "99999999999999999999w"] {
        let mut a = args(dir.path());
        a.since = Some(bad.into());
        let (mut out, mut warn) = (Vec::new(), Vec::new());
        let err = query(&a, NOW, &mut out, &mut warn).expect_err(bad);
        assert!(matches!(err, Failure::Usage(_)), "{bad}");
        assert!(err.to_string().contains("--since"), "{err}");
    }
}

#[test]
fn table_is_aligned() {
    let dir = tempfile::tempdir().expect("tempdir");
    sample(dir.path());
    let mut a = args(dir.path());
    a.format = OutputFormat::Table;
    let (out, _) = run(&a);
    let rows: Vec<&str> = out.lines().collect();
    assert_eq!(rows.len(), 6, "{out}");
    assert!(
        rows[0].starts_with("TS  ") && rows[0].contains("DURATION_MS"),
        "{out}"
    );
    // Every column starts at the same character offset in every row.
    for header in [
        "EVENT",
        "REQUEST_ID",
        "TENANT",
        "MPC",
        "STATUS",
        "REASON",
        "UPSTREAM",
    ] {
        let col = rows[0].find(header).expect("header");
        for row in &rows[1..] {
            let before: String = row.chars().take(col).collect();
            assert!(before.ends_with("  "), "{header} misaligned in {row:?}");
            assert_ne!(row.chars().nth(col), Some(' '), "{header} in {row:?}");
        }
    }
    assert!(
        rows[1].contains("unauthenticated") && rows[1].contains(" - "),
        "{}",
        rows[1]
    );
    assert!(fit("abcdefgh", 4) == "abc…" && fit("ab", 4) == "ab  ");
    assert_eq!(printable("a\u{1b}[31m"), "a?[31m");
    // A right-to-left override, an isolate and a zero-width joiner in a name.
    assert_eq!(
        printable("conf\u{202E}dne\u{2066}x\u{200D}y"),
        "conf?dne?x?y"
    );
    assert_eq!(
        printable("Zürich-日本"),
        "Zürich-日本",
        "other text is shown as it is"
    );
}

#[test]
fn summary_counts_requests_per_tenant_and_reason() {
    let dir = tempfile::tempdir().expect("tempdir");
    sample(dir.path());
    let mut a = args(dir.path());
    a.summary = true;
    a.format = OutputFormat::Table;
    let (out, _) = run(&a);
    let expected = "\
TENANT   REASON           COUNT
-        unauthenticated  1
billing  ended            1
billing  forbidden        1
support  rate-limited     1
total 4
";
    assert_eq!(
        out, expected,
        "a forwarded request counts once, by its result"
    );

    a.event = Some("forward".into());
    let (out, _) = run(&a);
    assert_eq!(out, "TENANT   REASON  COUNT\nbilling  ended   1\ntotal 1\n");

    a.format = OutputFormat::Json;
    a.event = Some("result".into());
    let (out, _) = run(&a);
    assert_eq!(
        out,
        "{\"tenant\":\"billing\",\"reason\":\"ended\",\"count\":1}\n"
    );
}

/// The review's F5: a stray copy of a file beside it (`audit.jsonl.bak`) doubles the
/// counts of the records it repeats; the query says so, naming both files, and says
/// nothing when no two files share a seq.
#[test]
fn files_holding_the_same_seqs_are_named_in_a_warning() {
    let dir = tempfile::tempdir().expect("tempdir");
    let lines = sample(dir.path());
    std::fs::rename(
        dir.path().join("audit.jsonl"),
        dir.path().join("audit.jsonl.00000000000000000003"),
    )
    .expect("rotate");
    std::fs::write(
        dir.path().join("audit.jsonl.00000000000000000003"),
        lines[..3].join("\n") + "\n",
    )
    .expect("write");
    std::fs::write(dir.path().join("audit.jsonl"), lines[3..].join("\n") + "\n").expect("write");
    let mut a = args(dir.path());
    a.summary = true;
    a.format = OutputFormat::Table;
    let (out, warn) = run(&a);
    assert!(out.ends_with("total 4\n"), "{out}");
    assert_eq!(warn, "", "no two files share a seq");

    let copy = dir.path().join("audit.jsonl.bak");
    std::fs::write(&copy, lines[1..3].join("\n") + "\n").expect("write");
    let (out, warn) = run(&a);
    assert!(
        out.ends_with("total 5\n"),
        "the copy's result counts again: {out}"
    );
    assert_eq!(
        warn,
        format!(
            "audit query: warning: {} (seq 1 to 3) and {} (seq 2 to 3) hold records of the same seqs (a stray copy?): counts may include them twice\n",
            dir.path().join("audit.jsonl.00000000000000000003").display(),
            copy.display()
        )
    );
    // Listing the records: the same warning, for what it means there.
    a.summary = false;
    a.format = OutputFormat::Json;
    let (_, warn) = run(&a);
    assert!(warn.contains("they may be listed twice"), "{warn}");
}

#[test]
fn bad_lines_are_skipped_with_a_warning() {
    let dir = tempfile::tempdir().expect("tempdir");
    let good = rec(
        1,
        "2026-11-26T09:00:00.000Z",
        "denied",
        None,
        None,
        401,
        "unauthenticated",
    );
    let mut bytes = Vec::new();
    bytes.extend_from_slice(b"\xff\xfe not utf8\n");
    bytes.extend_from_slice(b"{\"seq\": 2, \"ts\": \"nope\"}\n");
    bytes.extend_from_slice(&vec![b'x'; (1 << 20) + 10]);
    bytes.extend_from_slice(b"\n");
    bytes.extend_from_slice(good.as_bytes());
    bytes.extend_from_slice(b"\n{\"seq\":3,\"ts\":\"2026");
    let file = dir.path().join("audit.jsonl");
    std::fs::write(&file, bytes).expect("write");
    let (out, warn) = run(&args(dir.path()));
    assert_eq!(seqs(&out), vec![1]);
    for line in [1, 2, 3, 5] {
        assert!(
            warn.contains(&format!("audit.jsonl:{line}: skipped")),
            "{line}: {warn}"
        );
    }
    assert!(
        warn.contains("not valid UTF-8") && warn.contains("longer than 1 MiB"),
        "{warn}"
    );

    std::fs::write(dir.path().join("empty.jsonl"), b"").expect("write");
    let (out, _) = run(&args(dir.path()));
    assert_eq!(seqs(&out), vec![1]);
}

#[test]
fn unreadable_path_is_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut a = args(dir.path());
    a.paths = vec![dir.path().join("gone.jsonl")];
    let (mut out, mut warn) = (Vec::new(), Vec::new());
    let err = query(&a, NOW, &mut out, &mut warn).expect_err("missing");
    assert!(err.to_string().contains("gone.jsonl"), "{err}");
}

#[test]
fn glob_semantics() {
    assert!(glob_match("*", ""));
    assert!(glob_match("billing-*", "billing-"));
    assert!(glob_match("b?l*g", "bilxxg"));
    assert!(glob_match("*a*b*", "xxaxxbxx"));
    assert!(glob_match("ä?", "äö"));
    assert!(!glob_match("a?", "a"));
    assert!(!glob_match("billing-*", "Billing-1"));
    assert!(!glob_match("*a", "bab "));
    assert!(glob_match("a*b*c", "abxbc"));
}

#[test]
fn ages() {
    assert_eq!(parse_age("30m"), Some(Duration::minutes(30)));
    assert_eq!(parse_age("2d"), Some(Duration::days(2)));
    assert_eq!(parse_age("1w"), Some(Duration::weeks(1)));
    assert_eq!(parse_age("m"), None);
    assert_eq!(parse_age("1.5h"), None);
    assert_eq!(parse_age("5é"), None);
}

#[test]
fn cli_arguments_parse() {
    use clap::{CommandFactory, Parser};
    #[derive(clap::Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        q: QueryArgs,
    }
    Cli::command().debug_assert();
    let cli = Cli::try_parse_from([
        "query",
        "a",
        "b",
        "--mpc",
        "b*",
        "--event",
        "denied",
        "--status",
        "429",
        "--since",
        "1h",
        "--summary",
    ])
    .expect("parse");
    assert_eq!(cli.q.paths.len(), 2);
    assert_eq!(cli.q.format, OutputFormat::Table, "table is the default");
    assert!(cli.q.summary && cli.q.status == Some(429));
    assert!(Cli::try_parse_from(["query", "a", "--event", "nope"]).is_err());
    assert!(
        Cli::try_parse_from(["query"]).is_err(),
        "a PATH is required"
    );
    let cli = Cli::try_parse_from(["query", "a", "--format", "json"]).expect("parse");
    assert_eq!(cli.q.format, OutputFormat::Json);
}

/// A by-uuid request's rows show its uuid until the name is known, so two of them can
/// be told apart; a row with neither shows `-`.
#[test]
fn the_table_shows_a_by_uuid_requests_uuid_until_its_name_is_known() {
    let row = |mpc: Option<&str>, path: Option<&str>| Row {
        seq: Some(1),
        ts: "2026-11-26T09:00:00.000Z".into(),
        event: "forward".into(),
        request_id: "r".into(),
        tenant: Some("billing".into()),
        mpc: mpc.map(str::to_owned),
        path: path.map(str::to_owned),
        status: None,
        reason: None,
        upstream_status: None,
        duration_ms: None,
    };
    let uuid = "1b4e28ba-2fa1-11d2-883f-0016d3cca427";
    let by_uuid = format!("/mpc/by-uuid/{uuid}/end");
    assert_eq!(mpc_cell(&row(None, Some(&by_uuid))), format!("uuid:{uuid}"));
    assert_eq!(
        mpc_cell(&row(Some("standup"), Some(&by_uuid))),
        "standup",
        "the name once the lookup found it"
    );
    let sdk = format!("/v1/Account/MABILLING00000000001/MultiPartyCall/uuid_{uuid}/?x=1");
    assert_eq!(mpc_cell(&row(None, Some(&sdk))), format!("uuid:{uuid}"));
    let sdk_no_slash = format!("/v1/Account/MABILLING00000000001/MultiPartyCall/uuid_{uuid}");
    assert_eq!(
        mpc_cell(&row(None, Some(&sdk_no_slash))),
        format!("uuid:{uuid}")
    );
    assert_eq!(mpc_cell(&row(None, Some("/mpc//end"))), "-");
    assert_eq!(mpc_cell(&row(None, Some("/mpc/by-uuid//end"))), "-");
    assert_eq!(mpc_cell(&row(None, None)), "-");
}
