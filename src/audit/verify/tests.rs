//! `audit verify` tests: intact, tampered, deleted and torn logs, keys, bad input.

use std::path::{Path, PathBuf};

use super::*;
use crate::audit::record::{AuditEvent, EventKind};
use crate::audit::{AuditLog, AuditPath, AuditSettings, Fsync};

fn audit_path(path: &Path) -> AuditPath {
    AuditPath::try_from(path).expect("a valid audit path")
}

/// Writes `n` records with the real writer; returns the live file's path.
fn write_log(dir: &Path, n: usize, key: Option<&[u8]>, rotate_bytes: u64) -> PathBuf {
    let path = dir.join("audit.jsonl");
    let settings = AuditSettings {
        path: audit_path(&path),
        fsync: Fsync::Never,
        rotate_bytes,
        hmac_key: key.map(|k| SecretSlice::from(k.to_vec())),
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let log = AuditLog::open(settings).expect("open");
        for i in 0..n {
            let ev = AuditEvent {
                event: EventKind::Denied,
                request_id: format!("req-{i}").into(),
                method: "POST".into(),
                path: "/mpc/x/end".into(),
                status: Some(403),
                reason: Some("forbidden".into()),
                ..AuditEvent::default()
            };
            log.append(ev).await.expect("append");
        }
        log.close().await.expect("close");
    });
    path
}

fn edit_lines(path: &Path, f: impl FnOnce(&mut Vec<String>)) {
    let text = std::fs::read_to_string(path).expect("read");
    let mut lines: Vec<String> = text.lines().map(String::from).collect();
    f(&mut lines);
    let mut out = lines.join("\n");
    out.push('\n');
    std::fs::write(path, out).expect("write");
}

fn args(paths: &[&Path], key_env: Option<&str>) -> VerifyArgs {
    VerifyArgs {
        paths: paths.iter().map(|p| p.to_path_buf()).collect(),
        hmac_key_env: key_env.map(String::from),
        hmac_key_file: None,
    }
}

fn broken_at(v: &Verdict) -> (u64, &str) {
    match v {
        Verdict::Broken { at, what } => (at.line, what.as_str()),
        other => panic!("expected broken, got {other:?}"),
    }
}

#[test]
fn intact_log_exits_0_with_summary() {
    let dir = tempfile::tempdir().expect("tempdir");
    let live = write_log(dir.path(), 5, None, 1 << 20);
    let r = execute(&args(&[dir.path()], None));
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(r.stdout, "verified 5 records in 1 files, chain intact\n");
    assert_eq!(r.stderr, "", "no warning");
    assert_eq!(execute(&args(&[&live], None)).code, 0);
}

#[test]
fn tampered_byte_exits_1_naming_file_and_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let live = write_log(dir.path(), 5, None, 1 << 20);
    edit_lines(&live, |l| l[2] = l[2].replace("forbidden", "forbiddem"));
    let r = execute(&args(&[dir.path()], None));
    assert_eq!(r.code, 1, "{r:?}");
    assert!(
        r.stdout.contains("audit.jsonl:3: hash mismatch"),
        "{}",
        r.stdout
    );
}

#[test]
fn tampered_first_record_is_tampering_not_a_key_problem() {
    let dir = tempfile::tempdir().expect("tempdir");
    let live = write_log(dir.path(), 3, None, 1 << 20);
    edit_lines(&live, |l| l[0] = l[0].replace("req-0", "req-X"));
    let v = verify_paths(&[dir.path()], None);
    assert_eq!(broken_at(&v).0, 1);
    assert!(broken_at(&v).1.contains("hash mismatch"));
}

#[test]
fn first_two_records_altered_is_tampering_not_a_key_problem() {
    let dir = tempfile::tempdir().expect("tempdir");
    let live = write_log(dir.path(), 4, None, 1 << 20);
    edit_lines(&live, |l| {
        l[0] = l[0].replace("req-0", "req-X");
        l[1] = l[1].replace("req-1", "req-Y");
    });
    let v = verify_paths(&[dir.path()], None);
    assert_eq!(broken_at(&v), (1, "hash mismatch: the record was altered"));
}

#[test]
fn deleted_line_is_a_seq_gap_and_broken_link() {
    let dir = tempfile::tempdir().expect("tempdir");
    let live = write_log(dir.path(), 5, None, 1 << 20);
    edit_lines(&live, |l| {
        l.remove(2);
    });
    let v = verify_paths(&[dir.path()], None);
    let (line, what) = broken_at(&v);
    assert_eq!(line, 3);
    assert!(what.contains("seq gap: expected seq 3, found 4"), "{what}");
    assert!(what.contains("broken link"), "{what}");
}

#[test]
fn reordered_members_are_reported() {
    let dir = tempfile::tempdir().expect("tempdir");
    let live = write_log(dir.path(), 2, None, 1 << 20);
    edit_lines(&live, |l| {
        l[1] = l[1].replacen("{\"seq\":2,\"ts\":", "{\"ts\":", 1);
        l[1] = l[1].replacen(",\"event\"", ",\"seq\":2,\"event\"", 1);
    });
    let v = verify_paths(&[dir.path()], None);
    let (line, what) = broken_at(&v);
    assert_eq!(line, 2);
    assert!(what.contains("wrong member order"), "{what}");
}

#[test]
fn torn_tail_exits_3_and_torn_line_elsewhere_is_broken() {
    let dir = tempfile::tempdir().expect("tempdir");
    let live = write_log(dir.path(), 4, None, 1 << 20);
    let mut bytes = std::fs::read(&live).expect("read");
    bytes.extend_from_slice(br#"{"seq":5,"ts":"2026-01"#);
    std::fs::write(&live, &bytes).expect("write");
    let r = execute(&args(&[dir.path()], None));
    assert_eq!(r.code, 3, "{r:?}");
    assert!(
        r.stdout.contains("audit.jsonl:5: torn final line"),
        "{}",
        r.stdout
    );
    assert!(r.stdout.contains("the 4 records before it"), "{}", r.stdout);

    // The same line completed by a newline is not a crash artefact either: a crash leaves
    // no newline after a partial record.
    let mut completed = bytes.clone();
    completed.push(b'\n');
    std::fs::write(&live, &completed).expect("write");
    let r = execute(&args(&[dir.path()], None));
    assert_eq!(r.code, 1, "{r:?}");
    assert!(
        r.stdout.contains("audit.jsonl:5: malformed JSON"),
        "{}",
        r.stdout
    );

    // The same torn line followed by more data is not a crash artefact.
    bytes.extend_from_slice(b"\n{}\n");
    std::fs::write(&live, &bytes).expect("write");
    assert_eq!(execute(&args(&[dir.path()], None)).code, 1);
}

#[test]
fn rotated_set_verifies_and_retention_gap_is_noted() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_log(dir.path(), 60, None, 2048);
    let r = execute(&args(&[dir.path()], None));
    assert_eq!(r.code, 0, "{r:?}");
    assert!(
        r.stdout.starts_with("verified 60 records in "),
        "{}",
        r.stdout
    );

    let mut files = source::collect(&[dir.path().to_path_buf()]).expect("collect");
    assert!(files.len() >= 3);
    std::fs::remove_file(files.remove(0).path).expect("retention");
    let r = execute(&args(&[dir.path()], None));
    assert_eq!(r.code, 0, "{r:?}");
    assert!(
        r.stdout.contains("note: the chain starts at seq"),
        "{}",
        r.stdout
    );

    // A missing middle file breaks the chain.
    std::fs::remove_file(&files[0].path).expect("remove middle");
    assert_eq!(
        execute(&args(&[dir.path()], None)).code,
        0,
        "still a suffix"
    );
    let dir2 = tempfile::tempdir().expect("tempdir");
    write_log(dir2.path(), 60, None, 2048);
    let files2 = source::collect(&[dir2.path().to_path_buf()]).expect("collect");
    std::fs::remove_file(&files2[1].path).expect("remove middle");
    let r = execute(&args(&[dir2.path()], None));
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stdout.contains("seq gap"), "{}", r.stdout);
}

/// The seq of the last record of `path`.
fn last_seq(path: &Path) -> u64 {
    let text = std::fs::read_to_string(path).expect("read");
    let last = text.lines().last().expect("a record");
    let v: serde_json::Value = serde_json::from_str(last).expect("json");
    v["seq"].as_u64().expect("seq")
}

#[test]
fn a_rotation_between_listing_and_reading_keeps_the_chain() {
    let dir = tempfile::tempdir().expect("tempdir");
    let live = write_log(dir.path(), 61, None, 2048);
    let files = source::collect(&[dir.path().to_path_buf()]).expect("collect");
    assert!(files.len() >= 2, "rotated files and the live file");
    let end = last_seq(&live);
    assert_eq!(end, 61, "the live file holds the newest records");
    assert!(
        files.iter().any(|f| f.path == live),
        "the listing holds the live file"
    );
    // The gateway rotates while `audit verify` runs: the listed live file gets its
    // rotated name, and a new live file continues the chain.
    std::fs::rename(&live, audit_path(&live).rotated(end)).expect("rotate");
    write_log(dir.path(), 3, None, 1 << 20);
    assert_eq!(last_seq(&live), 64, "the new live file continues the chain");
    let verdict = verify_files(&files, &ChainHasher::Plain).expect("verify");
    assert!(
        matches!(verdict, Verdict::Intact { records: 61, .. }),
        "{verdict:?}"
    );
    assert_eq!(
        verify_paths(&[dir.path()], None),
        Verdict::Intact {
            records: 64,
            files: files.len() + 1,
            first_seq: Some(1),
        }
    );
}

/// A rotated set of 60 records whose live file is then emptied (as right after a
/// rotation); returns the rotated files, oldest first.
fn rotated_set_with_empty_live(dir: &Path) -> Vec<PathBuf> {
    let live = write_log(dir, 60, None, 2048);
    std::fs::write(&live, b"").expect("empty the live file");
    let files = source::collect(&[dir.to_path_buf()]).expect("collect");
    let rotated: Vec<PathBuf> = files
        .into_iter()
        .filter(|f| f.name_seq.is_some())
        .map(|f| f.path)
        .collect();
    assert!(rotated.len() >= 3, "{rotated:?}");
    rotated
}

#[test]
fn records_cut_from_the_end_of_a_rotated_file_are_missing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rotated = rotated_set_with_empty_live(dir.path());
    let newest = rotated.last().expect("newest");
    let named = last_seq(newest);
    edit_lines(newest, |l| {
        l.pop();
    });
    let r = execute(&args(&[dir.path()], None));
    assert_eq!(r.code, 1, "{r:?}");
    let name = newest.file_name().expect("name").to_string_lossy();
    let expected = format!(
        "records missing at the end of {name}: its name says seq {named}, its last record is {}",
        named - 1
    );
    assert!(r.stdout.contains(&expected), "{}", r.stdout);
}

/// With `fsync: never` a power loss right after a rotation can leave the newest rotated
/// file without its tail and the new live file empty: a torn line there is a crash's
/// (exit 3), as in the live file. Checked alone, or with records after it, such a
/// rotated file is tampered with (exit 1).
#[test]
fn a_torn_tail_in_the_newest_rotated_file_before_an_empty_live_file_exits_3() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rotated = rotated_set_with_empty_live(dir.path());
    let newest = rotated.last().expect("newest");
    let mut bytes = std::fs::read(newest).expect("read");
    bytes.truncate(bytes.len() - 30);
    std::fs::write(newest, &bytes).expect("write");
    let name = newest
        .file_name()
        .expect("name")
        .to_string_lossy()
        .into_owned();
    let r = execute(&args(&[dir.path()], None));
    assert_eq!(r.code, 3, "{r:?}");
    assert!(r.stdout.contains(&format!("{name}:")), "{}", r.stdout);
    assert!(r.stdout.contains("torn final line"), "{}", r.stdout);

    // The newest rotated file checked alone: nothing says a crash came after it.
    let r = execute(&args(&[newest.as_path()], None));
    assert_eq!(r.code, 1, "{r:?}");

    // A live file that holds records after it: the rotated file was complete once.
    let live = dir.path().join("audit.jsonl");
    std::fs::write(&live, b"{}\n").expect("write");
    let r = execute(&args(&[dir.path()], None));
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stdout.contains(&format!("{name}:")), "{}", r.stdout);
}

#[test]
fn empty_and_renamed_rotated_files_are_broken() {
    // Every file emptied.
    let dir = tempfile::tempdir().expect("tempdir");
    let rotated = rotated_set_with_empty_live(dir.path());
    for f in &rotated {
        std::fs::write(f, b"").expect("empty");
    }
    let r = execute(&args(&[dir.path()], None));
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stdout.contains("holds no records"), "{}", r.stdout);

    // One rotated file emptied, the others intact.
    let dir = tempfile::tempdir().expect("tempdir");
    let rotated = rotated_set_with_empty_live(dir.path());
    std::fs::write(&rotated[1], b"").expect("empty");
    assert_eq!(execute(&args(&[dir.path()], None)).code, 1);

    // Two rotated files' names swapped: read in the order of their names, the first
    // one's last record is not the seq its name says.
    let dir = tempfile::tempdir().expect("tempdir");
    let rotated = rotated_set_with_empty_live(dir.path());
    let swap = dir.path().join("swap");
    std::fs::rename(&rotated[0], &swap).expect("rename");
    std::fs::rename(&rotated[1], &rotated[0]).expect("rename");
    std::fs::rename(&swap, &rotated[1]).expect("rename");
    let r = execute(&args(&[dir.path()], None));
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stdout.contains("its name says seq"), "{}", r.stdout);

    // A rotated file was complete when renamed: a torn tail in it, even in the last
    // file given, is not a crash artefact (exit 1, not 3).
    let dir = tempfile::tempdir().expect("tempdir");
    let rotated = rotated_set_with_empty_live(dir.path());
    let newest = rotated.last().expect("newest");
    let mut bytes = std::fs::read(newest).expect("read");
    bytes.extend_from_slice(br#"{"seq":99,"ts":"2026-01"#);
    std::fs::write(newest, bytes).expect("write");
    let only_rotated: Vec<&Path> = rotated.iter().map(PathBuf::as_path).collect();
    let r = execute(&args(&only_rotated, None));
    assert_eq!(r.code, 1, "{r:?}");
}

#[test]
fn keyed_log_without_its_key_is_exit_2_and_with_a_wrong_key_exit_1() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_log(dir.path(), 3, Some(b"k3y"), 1 << 20);
    let env = "MPC_GATEWAY_TEST_VERIFY_KEY_A";
    std::env::set_var(env, "k3y");
    assert_eq!(execute(&args(&[dir.path()], Some(env))).code, 0);

    let r = execute(&args(&[dir.path()], None));
    assert_eq!(r.code, 2, "{r:?}");
    assert!(
        r.stderr
            .contains("appears to be HMAC-keyed; pass --hmac-key-env"),
        "{}",
        r.stderr
    );

    // A wrong key looks exactly like a log rewritten under another key: exit 1, with
    // the hint that the key may be wrong.
    let wrong = "MPC_GATEWAY_TEST_VERIFY_KEY_B";
    std::env::set_var(wrong, "other");
    let r = execute(&args(&[dir.path()], Some(wrong)));
    assert_eq!(r.code, 1, "{r:?}");
    assert!(
        r.stdout.contains("audit.jsonl:1: hash mismatch"),
        "{}",
        r.stdout
    );
    assert!(r.stdout.contains("the HMAC key is wrong"), "{}", r.stdout);
    assert!(r.stdout.ends_with("chain broken\n"), "{}", r.stdout);

    let r = execute(&args(&[dir.path()], Some("MPC_GATEWAY_TEST_VERIFY_UNSET")));
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("is not set"), "{}", r.stderr);
}

#[test]
fn unkeyed_log_checked_with_a_key_is_broken_and_says_so() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_log(dir.path(), 1, None, 1 << 20);
    // A plain chain is also what a forger without the key would write: exit 1.
    let v = verify_paths(&[dir.path()], Some(b"k"));
    let (line, what) = broken_at(&v);
    assert_eq!(line, 1);
    assert!(what.contains("not HMAC-keyed"), "{what}");
    assert!(what.contains("that is tampering"), "{what}");
    // A whole log rewritten as a consistent plain chain, checked with the key.
    let forged = tempfile::tempdir().expect("tempdir");
    write_log(forged.path(), 3, None, 1 << 20);
    let env = "MPC_GATEWAY_TEST_VERIFY_KEY_C";
    std::env::set_var(env, "k");
    let r = execute(&args(&[forged.path()], Some(env)));
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stdout.contains("not HMAC-keyed"), "{}", r.stdout);
    // A single keyed record without the key cannot be told apart: hint, exit 1.
    let dir = tempfile::tempdir().expect("tempdir");
    write_log(dir.path(), 1, Some(b"k"), 1 << 20);
    let v = verify_paths(&[dir.path()], None);
    let (_, what) = broken_at(&v);
    assert!(what.contains("--hmac-key-env"), "{what}");
}

#[test]
fn bad_input_never_panics() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    // Empty file (a live file right after start-up): nothing to break, but said.
    let empty = d.join("empty.jsonl");
    std::fs::write(&empty, b"").expect("w");
    let r = execute(&args(&[&empty], None));
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(r.stdout, "verified 0 records in 1 files, chain intact\n");
    assert!(r.stderr.contains("warning: no records"), "{}", r.stderr);

    let live = write_log(d, 3, None, 1 << 20);
    let good = std::fs::read(&live).expect("read");
    let cases: [(&str, Vec<u8>, &str); 4] = [
        (
            "binary",
            b"\xff\xfe\x00garbage\n".to_vec(),
            "not valid UTF-8",
        ),
        ("json", b"{\"seq\":\n".to_vec(), "malformed JSON"),
        ("array", b"[1,2]\n".to_vec(), "malformed JSON"),
        (
            "huge",
            [vec![b'x'; 2 << 20], b"\n".to_vec()].concat(),
            "longer than 1 MiB",
        ),
    ];
    for (name, bad, expect) in cases {
        // Bad line in the middle: tampering (exit 1) naming the line.
        let mut bytes = bad.clone();
        bytes.extend_from_slice(&good);
        let f = d.join(format!("{name}.jsonl"));
        std::fs::write(&f, &bytes).expect("w");
        let r = execute(&args(&[&f], None));
        assert_eq!(r.code, 1, "{name}: {r:?}");
        assert!(
            r.stdout.contains(&format!("{name}.jsonl:1: ")),
            "{name}: {}",
            r.stdout
        );
        assert!(r.stdout.contains(expect), "{name}: {}", r.stdout);
        // The same as the very last line, complete with its newline: not something a
        // crash leaves, exit 1.
        let mut bytes = good.clone();
        bytes.extend_from_slice(&bad);
        std::fs::write(&f, &bytes).expect("w");
        assert_eq!(execute(&args(&[&f], None)).code, 1, "{name}");
        // Without its newline: what a crash mid-write can leave, exit 3.
        bytes.pop();
        std::fs::write(&f, &bytes).expect("w");
        assert_eq!(execute(&args(&[&f], None)).code, 3, "{name}");
    }

    let r = execute(&args(&[&d.join("missing.jsonl")], None));
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("missing.jsonl"), "{}", r.stderr);
    let nothing = tempfile::tempdir().expect("tempdir");
    let r = execute(&args(&[nothing.path()], None));
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("no audit files"), "{}", r.stderr);
}

#[test]
fn cli_arguments_parse() {
    use clap::{CommandFactory, Parser};
    #[derive(clap::Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        v: VerifyArgs,
    }
    Cli::command().debug_assert();
    let cli = Cli::try_parse_from(["verify", "d", "--hmac-key-env", "K"]).expect("parse");
    assert_eq!(cli.v.hmac_key_env.as_deref(), Some("K"));
    let cli = Cli::try_parse_from(["verify", "d", "--hmac-key-file", "/k"]).expect("parse");
    assert_eq!(cli.v.hmac_key_file, Some(PathBuf::from("/k")));
    assert!(
        Cli::try_parse_from([
            "verify",
            "d",
            "--hmac-key-env",
            "K",
            "--hmac-key-file",
            "/k"
        ])
        .is_err(),
        "one key source at a time"
    );
    assert!(
        Cli::try_parse_from(["verify"]).is_err(),
        "a PATH is required"
    );
}

/// 25 records split as a rotating writer leaves them: `audit.jsonl.…10` (seqs 1–10),
/// `audit.jsonl.…20` (11–20) and the live `audit.jsonl` (21–25). Returns the rotated
/// files, oldest first, and the live file.
fn split_into_rotated_set(dir: &Path) -> (Vec<PathBuf>, PathBuf) {
    let live = write_log(dir, 25, None, 1 << 20);
    let text = std::fs::read_to_string(&live).expect("read");
    let lines: Vec<&str> = text.lines().collect();
    let mut rotated = Vec::new();
    for (part, last) in [(&lines[..10], 10), (&lines[10..20], 20)] {
        let path = audit_path(&live).rotated(last);
        std::fs::write(&path, part.join("\n") + "\n").expect("write rotated");
        rotated.push(path);
    }
    std::fs::write(&live, lines[20..].join("\n") + "\n").expect("write live");
    (rotated, live)
}

/// A rotated file whose first line is broken is still read in its place (by the seq in
/// its name): the report names that line, not the next file's first record as a seq
/// gap; a torn tail of the live file after it changes nothing.
#[test]
fn a_rotated_file_with_a_broken_first_line_is_reported_in_its_place() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (rotated, live) = split_into_rotated_set(dir.path());
    edit_lines(&rotated[1], |l| {
        l[0] = l[0].replacen("\"seq\":11,", "\"seq\":\"11\",", 1);
    });
    let name = rotated[1].file_name().expect("name").to_string_lossy();
    let expected = format!("{name}:1: malformed record: member `seq`");
    let r = execute(&args(&[dir.path()], None));
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stdout.contains(&expected), "{}", r.stdout);
    // The same files given one by one, in any order.
    let r = execute(&args(&[&live, &rotated[1], &rotated[0]], None));
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stdout.contains(&expected), "{}", r.stdout);

    let mut bytes = std::fs::read(&live).expect("read");
    bytes.extend_from_slice(br#"{"seq":26,"ts":"2026-01"#);
    std::fs::write(&live, bytes).expect("write");
    let r = execute(&args(&[dir.path()], None));
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stdout.contains(&expected), "{}", r.stdout);
}

/// Ordered by the seqs in the rotated files' names, the live file still comes last: its
/// torn tail is a crash artefact (exit 3) when everything else is intact, also when the
/// torn line is all it holds (a crash right after a rotation).
#[test]
fn a_torn_live_tail_after_rotated_files_exits_3() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (rotated, live) = split_into_rotated_set(dir.path());
    let torn = br#"{"seq":26,"ts":"2026-01"#;
    let mut bytes = std::fs::read(&live).expect("read");
    bytes.extend_from_slice(torn);
    std::fs::write(&live, bytes).expect("write");
    for paths in [vec![dir.path()], vec![&live, &rotated[1], &rotated[0]]] {
        let r = execute(&args(&paths, None));
        assert_eq!(r.code, 3, "{r:?}");
        assert!(
            r.stdout.contains("audit.jsonl:6: torn final line"),
            "{}",
            r.stdout
        );
    }

    std::fs::write(&live, torn).expect("write");
    std::fs::remove_file(&rotated[0]).expect("retention");
    let r = execute(&args(&[dir.path()], None));
    assert_eq!(r.code, 3, "{r:?}");
    assert!(
        r.stdout.contains("audit.jsonl:1: torn final line"),
        "{}",
        r.stdout
    );
}

/// A keyed log checked without its key, with a line deleted: every hash fails, as
/// without the key they must, so the first line is not known to be altered; the deleted
/// line is a real break, reported where it is, with the hint that the log may be keyed.
#[test]
fn a_keyed_log_without_its_key_reports_a_deleted_line_where_it_is() {
    let dir = tempfile::tempdir().expect("tempdir");
    let live = write_log(dir.path(), 8, Some(b"k3y"), 1 << 20);
    edit_lines(&live, |l| {
        l.remove(4);
    });
    let r = execute(&args(&[dir.path()], None));
    assert_eq!(r.code, 1, "{r:?}");
    assert!(
        r.stdout
            .contains("audit.jsonl:5: seq gap: expected seq 5, found 6; broken link"),
        "{}",
        r.stdout
    );
    assert!(r.stdout.contains("--hmac-key-env"), "{}", r.stdout);
    assert!(!r.stdout.contains("audit.jsonl:1:"), "{}", r.stdout);
}

/// A crash can lose just the newline of the last write, so a whole record without it
/// at the end of the live file is torn (exit 3) when its hash and link hold; a crash
/// cannot alter the bytes it wrote, so one whose hash fails is tampering (exit 1), not
/// a torn line.
#[test]
fn a_whole_last_record_without_its_newline_is_torn_only_if_it_verifies() {
    let dir = tempfile::tempdir().expect("tempdir");
    let live = write_log(dir.path(), 4, Some(b"k3y"), 1 << 20);
    let intact = std::fs::read(&live).expect("read");
    let unterminated = &intact[..intact.len() - 1];

    std::fs::write(&live, unterminated).expect("write");
    match verify_paths(&[dir.path()], Some(b"k3y")) {
        Verdict::Torn {
            records, at, why, ..
        } => {
            assert_eq!((records, at.line), (3, 4));
            assert!(why.contains("whole record without its newline"), "{why}");
        }
        other => panic!("expected torn, got {other:?}"),
    }

    let altered = String::from_utf8(unterminated.to_vec())
        .expect("utf-8")
        .replacen("\"status\":403", "\"status\":204", 4);
    assert!(altered.ends_with("}") && altered.matches("\"status\":204").count() == 4);
    let last_line_start = altered.rfind('\n').expect("several lines") + 1;
    let mut bytes = unterminated[..last_line_start].to_vec();
    bytes.extend_from_slice(&altered.as_bytes()[last_line_start..]);
    std::fs::write(&live, &bytes).expect("write");
    let v = verify_paths(&[dir.path()], Some(b"k3y"));
    let (line, what) = broken_at(&v);
    assert_eq!(line, 4);
    assert!(what.contains("altered"), "{what}");
}

/// `--hmac-key-file` reads a key as the gateway reads `audit.hmac_key: {file: PATH}`:
/// surrounding whitespace (an editor's newline) trimmed; an unreadable or empty file is
/// a usage error (exit 2) that names the flag.
#[test]
fn a_key_file_is_read_as_the_gateway_reads_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let logs = dir.path().join("logs");
    std::fs::create_dir(&logs).expect("mkdir");
    write_log(&logs, 3, Some(b"k3y"), 1 << 20);
    let key = dir.path().join("hmac-key");
    let with_file = |path: &Path| VerifyArgs {
        paths: vec![logs.clone()],
        hmac_key_env: None,
        hmac_key_file: Some(path.to_path_buf()),
    };

    std::fs::write(&key, "  k3y\n").expect("write");
    let r = execute(&with_file(&key));
    assert_eq!(r.code, 0, "{r:?}");

    std::fs::write(&key, "other\n").expect("write");
    assert_eq!(execute(&with_file(&key)).code, 1, "a wrong key");

    std::fs::write(&key, "\n").expect("write");
    let r = execute(&with_file(&key));
    assert_eq!(r.code, 2, "{r:?}");
    assert!(
        r.stderr
            .contains(&format!("--hmac-key-file {}: is empty", key.display())),
        "{}",
        r.stderr
    );

    let r = execute(&with_file(&dir.path().join("missing")));
    assert_eq!(r.code, 2, "{r:?}");
    assert!(
        r.stderr.contains(&format!(
            "--hmac-key-file {}: cannot read",
            dir.path().join("missing").display()
        )),
        "{}",
        r.stderr
    );
}
