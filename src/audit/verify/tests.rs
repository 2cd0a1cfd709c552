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
        from_seq: 1,
    }
}

/// `args` with `--from-seq`.
fn args_from(paths: &[&Path], from_seq: u64) -> VerifyArgs {
    VerifyArgs {
        from_seq,
        ..args(paths, None)
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

/// Oldest files removed: records missing, exit 1, with the hint to pass `--from-seq`;
/// with `--from-seq` set to the first kept seq the rest verifies (exit 0) and the summary
/// says from where; any other `--from-seq` is exit 1.
#[test]
fn a_set_without_its_oldest_records_is_broken_unless_from_seq_says_where_it_starts() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_log(dir.path(), 60, None, 2048);
    let r = execute(&args(&[dir.path()], None));
    assert_eq!(r.code, 0, "{r:?}");
    assert!(
        r.stdout.starts_with("verified 60 records in ") && r.stdout.ends_with("chain intact\n"),
        "{}",
        r.stdout
    );
    assert_eq!(execute(&args_from(&[dir.path()], 1)).code, 0);
    assert_eq!(
        execute(&args_from(&[dir.path()], 2)).code,
        1,
        "starts before"
    );

    let mut files = source::collect(&[dir.path().to_path_buf()]).expect("collect");
    assert!(files.len() >= 3);
    let pruned = files.remove(0);
    let kept = pruned.name_seq.expect("rotated") + 1;
    std::fs::remove_file(&pruned.path).expect("retention");
    let first = files[0].path.display().to_string();
    let r = execute(&args(&[dir.path()], None));
    assert_eq!(r.code, 1, "{r:?}");
    assert_eq!(
        r.stdout,
        format!(
            "{first}:1: records missing: the chain starts at seq {kept}, not 1: records 1 to {} are not in the given files (if retention pruned them, pass --from-seq {kept})\nchain broken\n",
            kept - 1
        )
    );

    let r = execute(&args_from(&[dir.path()], kept));
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(
        r.stdout,
        format!(
            "verified {} records in {} files, chain intact from seq {kept} (--from-seq {kept}: its link to the pruned records before it was not checked)\n",
            61 - kept,
            files.len()
        )
    );
    let r = execute(&args_from(&[dir.path()], kept - 1));
    assert_eq!(r.code, 1, "{r:?}");
    assert!(
        r.stdout.contains(&format!(
            "{first}:1: records missing: the chain starts at seq {kept}, not at --from-seq {}: record {} is not in the given files\n",
            kept - 1,
            kept - 1
        )),
        "{}",
        r.stdout
    );
    let r = execute(&args_from(&[dir.path()], kept + 1));
    assert_eq!(r.code, 1, "{r:?}");
    assert!(
        r.stdout.contains(&format!(
            "{first}:1: the chain starts at seq {kept}, before --from-seq {}: pass --from-seq {kept} to verify it from there\n",
            kept + 1
        )),
        "{}",
        r.stdout
    );

    // A missing middle file breaks the chain, whatever --from-seq says.
    std::fs::remove_file(&files[1].path).expect("remove middle");
    let r = execute(&args_from(&[dir.path()], kept));
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stdout.contains("seq gap"), "{}", r.stdout);
}

/// The review's reproduction: the first records deleted from a log that never rotated
/// (nothing retention could explain) is not intact; `--from-seq` does not excuse a
/// first record whose seq is 1 but whose prev is not 64 zeros either.
#[test]
fn records_deleted_from_the_head_of_a_single_file_are_missing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let live = write_log(dir.path(), 8, Some(b"k3y"), 1 << 20);
    let env = "MPC_GATEWAY_TEST_VERIFY_KEY_HEAD";
    std::env::set_var(env, "k3y");
    edit_lines(&live, |l| {
        l.drain(..5);
    });
    let r = execute(&args(&[dir.path()], Some(env)));
    assert_eq!(r.code, 1, "{r:?}");
    assert!(
        r.stdout
            .contains("audit.jsonl:1: records missing: the chain starts at seq 6, not 1"),
        "{}",
        r.stdout
    );
    assert!(r.stdout.contains("pass --from-seq 6"), "{}", r.stdout);
    let r = execute(&VerifyArgs {
        from_seq: 6,
        ..args(&[dir.path()], Some(env))
    });
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.stdout.contains("chain intact from seq 6"), "{}", r.stdout);
    // Without the key as well: the start is reported, with both explanations of the hash.
    let r = execute(&args(&[dir.path()], None));
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stdout.contains("starts at seq 6, not 1"), "{}", r.stdout);
    assert!(
        r.stdout
            .contains("it was altered, or this log is HMAC-keyed"),
        "{}",
        r.stdout
    );

    // seq 1 whose prev is not 64 zeros.
    let dir = tempfile::tempdir().expect("tempdir");
    let live = write_log(dir.path(), 2, None, 1 << 20);
    edit_lines(&live, |l| l[0] = l[0].replacen(GENESIS, &"1".repeat(64), 1));
    let r = execute(&args(&[dir.path()], None));
    assert_eq!(r.code, 1, "{r:?}");
    assert!(
        r.stdout.contains("must have a prev of 64 zeros"),
        "{}",
        r.stdout
    );
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
    let verdict = verify_files(&files, &ChainHasher::Plain, 1).expect("verify");
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

    // Two rotated files' names swapped: read in the order of their names, the chain
    // breaks where the first of them begins.
    let dir = tempfile::tempdir().expect("tempdir");
    let rotated = rotated_set_with_empty_live(dir.path());
    let swap = dir.path().join("swap");
    std::fs::rename(&rotated[1], &swap).expect("rename");
    std::fs::rename(&rotated[2], &rotated[1]).expect("rename");
    std::fs::rename(&swap, &rotated[2]).expect("rename");
    let r = execute(&args(&[dir.path()], None));
    assert_eq!(r.code, 1, "{r:?}");
    let name = rotated[1].file_name().expect("name").to_string_lossy();
    assert!(
        r.stdout.contains(&format!("{name}:1: seq gap")),
        "{}",
        r.stdout
    );

    // A rotated file renamed for a seq below its last record's, still in its place:
    // its last record is not the seq its name says.
    let dir = tempfile::tempdir().expect("tempdir");
    let rotated = rotated_set_with_empty_live(dir.path());
    let named = last_seq(&rotated[1]);
    let renamed = audit_path(&dir.path().join("audit.jsonl")).rotated(named - 1);
    std::fs::rename(&rotated[1], &renamed).expect("rename");
    let r = execute(&args(&[dir.path()], None));
    assert_eq!(r.code, 1, "{r:?}");
    assert!(
        r.stdout.contains(&format!(
            "its name says seq {}, its last record is {named}",
            named - 1
        )),
        "{}",
        r.stdout
    );

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
fn keyed_log_without_its_key_and_with_a_wrong_key_are_exit_1() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_log(dir.path(), 3, Some(b"k3y"), 1 << 20);
    let env = "MPC_GATEWAY_TEST_VERIFY_KEY_A";
    std::env::set_var(env, "k3y");
    assert_eq!(execute(&args(&[dir.path()], Some(env))).code, 0);

    // Without the key every hash fails while every link holds: altered, or keyed; the
    // verifier cannot tell, so it fails closed (exit 1) and says both.
    let r = execute(&args(&[dir.path()], None));
    assert_eq!(r.code, 1, "{r:?}");
    assert_eq!(
        r.stdout,
        format!(
            "{}:1: every record's hash fails under plain SHA-256 while every prev link holds: either the records were altered, or the log is HMAC-keyed and needs --hmac-key-env NAME or --hmac-key-file PATH\nchain broken\n",
            dir.path().join("audit.jsonl").display()
        )
    );
    assert_eq!(r.stderr, "");

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
    // A single keyed record without the key: the same as two or more, exit 1.
    let dir = tempfile::tempdir().expect("tempdir");
    write_log(dir.path(), 1, Some(b"k"), 1 << 20);
    let r = execute(&args(&[dir.path()], None));
    assert_eq!(r.code, 1, "{r:?}");
    assert!(
        r.stdout.contains(
            "either the records were altered, or the log is HMAC-keyed and needs --hmac-key-env"
        ),
        "{}",
        r.stdout
    );
}

/// The review's F3: every record of an unkeyed log edited, no `prev` or `hash` touched.
/// That is tampering as much as a keyed log without its key: exit 1, not a usage error.
#[test]
fn an_unkeyed_log_with_every_record_edited_is_exit_1() {
    let dir = tempfile::tempdir().expect("tempdir");
    let live = write_log(dir.path(), 5, None, 1 << 20);
    edit_lines(&live, |l| {
        for line in l.iter_mut() {
            *line = line.replacen("\"method\":\"POST\"", "\"method\":\"PUT\"", 1);
        }
    });
    let r = execute(&args(&[dir.path()], None));
    assert_eq!(r.code, 1, "{r:?}");
    assert!(
        r.stdout
            .contains("audit.jsonl:1: every record's hash fails"),
        "{}",
        r.stdout
    );
    assert!(r.stdout.ends_with("chain broken\n"), "{}", r.stdout);
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
    // The exit code each gets as the final line without its newline: 3 only for the
    // beginning of the next record (seq 4), as a crash mid-write leaves.
    let cases: [(&str, Vec<u8>, &str, u8); 4] = [
        (
            "binary",
            b"\xff\xfe\x00garbage\n".to_vec(),
            "not valid UTF-8",
            1,
        ),
        ("json", b"{\"seq\":\n".to_vec(), "malformed JSON", 3),
        ("array", b"[1,2]\n".to_vec(), "malformed JSON", 1),
        (
            "huge",
            [vec![b'x'; 2 << 20], b"\n".to_vec()].concat(),
            "longer than 1 MiB",
            1,
        ),
    ];
    for (name, bad, expect, torn_code) in cases {
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
        // Without its newline: what a crash mid-write can leave (exit 3) if it begins
        // as the next record does; anything else is not a torn write (exit 1).
        bytes.pop();
        std::fs::write(&f, &bytes).expect("w");
        let r = execute(&args(&[&f], None));
        assert_eq!(r.code, torn_code, "{name}: {r:?}");
        if torn_code == 1 {
            assert!(
                r.stdout.contains(&format!(
                    "{name}.jsonl:4: the final line is not a partial record: "
                )),
                "{name}: {}",
                r.stdout
            );
        }
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
    assert_eq!(cli.v.from_seq, 1, "from seq 1 by default");
    let cli = Cli::try_parse_from(["verify", "d", "--from-seq", "7"]).expect("parse");
    assert_eq!(cli.v.from_seq, 7);
    for bad in ["0", "-1", "x", ""] {
        assert!(
            Cli::try_parse_from(["verify", "d", "--from-seq", bad]).is_err(),
            "--from-seq {bad}"
        );
    }
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

    // The torn line is all the live file holds, after retention pruned the oldest file.
    std::fs::write(&live, br#"{"seq":21,"ts":"2026-01"#).expect("write");
    std::fs::remove_file(&rotated[0]).expect("retention");
    let r = execute(&args_from(&[dir.path()], 11));
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
        from_seq: 1,
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

/// The review's F4: bytes without a newline at the end of the live file are a torn
/// write (exit 3) only if they are the beginning of the next record; junk, a record of
/// another seq, a rewritten last record and more than a record can hold are exit 1.
#[test]
fn only_the_beginning_of_the_next_record_is_a_torn_final_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let live = write_log(dir.path(), 4, None, 1 << 20);
    let intact = std::fs::read(&live).expect("read");
    let with_tail = |tail: &[u8]| {
        let mut bytes = intact.clone();
        bytes.extend_from_slice(tail);
        std::fs::write(&live, bytes).expect("write");
        execute(&args(&[dir.path()], None))
    };

    let r = with_tail(br#"{"seq":5,"ts":"2026-"#);
    assert_eq!(r.code, 3, "{r:?}");
    assert!(
        r.stdout
            .contains("audit.jsonl:5: torn final line (a partial record)"),
        "{}",
        r.stdout
    );

    let not_torn: [(&str, Vec<u8>, &str); 4] = [
        (
            "c27 junk",
            b"I was never here".to_vec(),
            "does not begin as record seq 5 would",
        ),
        (
            "c29 another seq",
            br#"{"seq":1,"ts":"1999-"#.to_vec(),
            "does not begin as record seq 5 would",
        ),
        (
            "a record's beginning, over 1 MiB",
            [
                br#"{"seq":5,"ts":"2026-11-28T14:01:13.271Z","event":"denied","request_id":""#
                    .to_vec(),
                vec![b'A'; 1 << 20],
            ]
            .concat(),
            "longer than 1 MiB",
        ),
        (
            "not a record's member order",
            br#"{"seq":5,"ts":"2026-11-28T14:01:13.271Z","tenant":"#.to_vec(),
            "member 3 is not `event`",
        ),
    ];
    for (case, tail, why) in not_torn {
        let r = with_tail(&tail);
        assert_eq!(r.code, 1, "{case}: {r:?}");
        assert!(
            r.stdout
                .contains("audit.jsonl:5: the final line is not a partial record: ")
                && r.stdout.contains(why)
                && r.stdout.ends_with("chain broken\n"),
            "{case}: {}",
            r.stdout
        );
    }

    // c31: the last record (a denied 403) rewritten to claim success and left without
    // the rest and its newline.
    let text = String::from_utf8(intact.clone()).expect("utf-8");
    let last_start = text[..text.len() - 1].rfind('\n').expect("lines") + 1;
    let reason = text.rfind("\"reason\"").expect("reason");
    assert!(last_start < reason, "in the last record");
    let c31 = format!("{}\"reason\":\"ended\"", &text[..reason]);
    std::fs::write(&live, c31).expect("write");
    let r = execute(&args(&[dir.path()], None));
    assert_eq!(r.code, 1, "{r:?}");
    assert!(
        r.stdout.contains("audit.jsonl:4: the final line is not a partial record: a `denied` record with reason `ended`"),
        "{}",
        r.stdout
    );
    // The same record only cut there is what a crash leaves.
    std::fs::write(&live, &text.as_bytes()[..reason + 12]).expect("write");
    let r = execute(&args(&[dir.path()], None));
    assert_eq!(r.code, 3, "{r:?}");
}

/// Junk after the newest rotated file while the live file is empty: not what a power
/// loss after a rotation leaves either.
#[test]
fn junk_at_the_end_of_the_newest_rotated_file_is_not_torn() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rotated = rotated_set_with_empty_live(dir.path());
    let newest = rotated.last().expect("newest");
    let mut bytes = std::fs::read(newest).expect("read");
    bytes.extend_from_slice(b"I was never here");
    std::fs::write(newest, &bytes).expect("write");
    let r = execute(&args(&[dir.path()], None));
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stdout.contains("not a partial record"), "{}", r.stdout);
}

/// The review's F5: a stray copy of a rotated file under a name that is not a rotated
/// name sorts before the file it copies; the report names the copy (and the rotated
/// file), not the untouched rotated file as a seq gap. A copy of the live file is named
/// where it repeats the seqs.
#[test]
fn a_stray_copy_is_named_not_the_file_it_copies() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (rotated, live) = split_into_rotated_set(dir.path());
    let copy = dir.path().join("audit.jsonl.bak");
    std::fs::copy(&rotated[1], &copy).expect("copy");
    let r = execute(&args(&[dir.path()], None));
    assert_eq!(r.code, 1, "{r:?}");
    let rotated_name = rotated[1].file_name().expect("name").to_string_lossy();
    assert_eq!(
        r.stdout,
        format!(
            "{}:1: records 11 to 20 are also in rotated file {rotated_name}: this file is not a rotated file and not part of the chain (a stray copy? Move it out of the verified files)\nchain broken\n",
            copy.display()
        )
    );
    std::fs::remove_file(&copy).expect("remove");

    let copy = dir.path().join("audit.jsonl.old");
    std::fs::copy(&live, &copy).expect("copy");
    let r = execute(&args(&[dir.path()], None));
    assert_eq!(r.code, 1, "{r:?}");
    assert_eq!(
        r.stdout,
        format!(
            "{}:1: seq 21 again after seq 25: records from seq 21 on are also in {}:1; two files hold records of the same seqs (a stray copy? Move it out of the verified files)\nchain broken\n",
            copy.display(),
            live.display()
        )
    );
}
