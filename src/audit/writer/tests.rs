//! Writer tests: exact line format, chain, HMAC, restart, torn tail, rotation under
//! concurrency, failure handling and close.

use std::future::Future;
use std::path::{Path, PathBuf};

use hmac::{Hmac, Mac};
use secrecy::SecretSlice;
use sha2::{Digest, Sha256};

use super::*;
use crate::audit::chain::GENESIS;
use crate::audit::record::EventKind;
use crate::audit::segment::fault::{self, Faults, FaultyOpener, Gate};
use crate::audit::verify::{verify_paths, Verdict};

fn audit_path(path: &Path) -> AuditPath {
    AuditPath::try_from(path).expect("a valid audit path")
}

fn settings(path: &Path, fsync: Fsync, rotate_bytes: u64) -> AuditSettings {
    AuditSettings {
        path: audit_path(path),
        fsync,
        rotate_bytes,
        hmac_key: None,
    }
}

fn event(i: usize) -> AuditEvent {
    AuditEvent {
        event: EventKind::Forward,
        request_id: format!("req-{i}").into(),
        tenant: Some("billing".into()),
        method: "POST".into(),
        path: format!("/mpc/billing-{i}/end").into(),
        mpc: Some(format!("billing-{i}").into()),
        ..AuditEvent::default()
    }
}

/// A log whose file fails on demand; also counts the file's writes, from after the write
/// test at open.
fn open_with_faults(path: &Path, fsync: Fsync) -> (AuditLog, Faults) {
    let faults = Faults::default();
    let log = AuditLog::open_with(
        settings(path, fsync, 1 << 20),
        Box::new(FaultyOpener(faults.clone())),
    )
    .expect("open");
    assert_eq!(faults.appends(), 1, "the write test at open");
    faults.reset_appends();
    (log, faults)
}

/// The same, with `fsync: always`, rotating once the file reaches `rotate_bytes`.
fn open_with_faults_rotating_at(path: &Path, rotate_bytes: u64) -> (AuditLog, Faults) {
    let faults = Faults::default();
    let log = AuditLog::open_with(
        settings(path, Fsync::Always, rotate_bytes),
        Box::new(FaultyOpener(faults.clone())),
    )
    .expect("open");
    (log, faults)
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .expect("read log")
        .lines()
        .map(String::from)
        .collect()
}

fn member(line: &str, name: &str) -> serde_json::Value {
    let v: serde_json::Value = serde_json::from_str(line).expect("json line");
    v.get(name).cloned().unwrap_or(serde_json::Value::Null)
}

fn intact(dir: &Path, key: Option<&[u8]>) -> u64 {
    match verify_paths(&[dir], key) {
        Verdict::Intact { records, .. } => records,
        other => panic!("chain not intact: {other:?}"),
    }
}

/// Expected line for `body` sealed with plain SHA-256.
fn sealed(body: &str) -> (String, String) {
    let hash = hex::encode(Sha256::digest(body.as_bytes()));
    let line = format!("{},\"hash\":\"{hash}\"}}", &body[..body.len() - 1]);
    (line, hash)
}

#[tokio::test(flavor = "multi_thread")]
async fn lines_have_contract_member_order_and_exact_format() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("audit.jsonl");
    let log = AuditLog::open(settings(&path, Fsync::Always, 1 << 20)).expect("open");
    let forward = AuditEvent {
        event: EventKind::Forward,
        request_id: "r1".into(),
        tenant: Some("billing".into()),
        token_fp: Some("abcdef012345".into()),
        client: Some("127.0.0.1:5555".into()),
        method: "POST".into(),
        path: "/mpc/a%20b/end".into(),
        mpc: Some("a b \"ä\"".into()),
        account: Some("default".into()),
        ..AuditEvent::default()
    };
    let result = AuditEvent {
        event: EventKind::Result,
        status: Some(204),
        reason: Some("ended".into()),
        upstream_status: Some(204),
        plivo_api_id: Some("api-1".into()),
        attempts: Some(1),
        duration_ms: Some(12),
        ..forward.clone()
    };
    assert_eq!(log.append(forward).await.expect("append"), 1);
    assert_eq!(log.append(result).await.expect("append"), 2);
    log.close().await.expect("close");

    let got = lines(&path);
    assert_eq!(got.len(), 2);
    let ts1 = member(&got[0], "ts");
    let ts1 = ts1.as_str().expect("ts");
    assert_eq!(ts1.len(), 24, "{ts1}");
    assert!(ts1.ends_with('Z') && ts1.as_bytes()[19] == b'.', "{ts1}");
    let body1 = format!(
        r#"{{"seq":1,"ts":"{ts1}","event":"forward","request_id":"r1","tenant":"billing","token_fp":"abcdef012345","client":"127.0.0.1:5555","method":"POST","path":"/mpc/a%20b/end","mpc":"a b \"ä\"","account":"default","status":null,"reason":null,"upstream_status":null,"plivo_api_id":null,"attempts":null,"duration_ms":null,"prev":"{GENESIS}"}}"#
    );
    let (line1, hash1) = sealed(&body1);
    assert_eq!(got[0], line1);

    let ts2 = member(&got[1], "ts");
    let ts2 = ts2.as_str().expect("ts");
    assert!(ts2 >= ts1, "ts must be monotonic with seq");
    let body2 = format!(
        r#"{{"seq":2,"ts":"{ts2}","event":"result","request_id":"r1","tenant":"billing","token_fp":"abcdef012345","client":"127.0.0.1:5555","method":"POST","path":"/mpc/a%20b/end","mpc":"a b \"ä\"","account":"default","status":204,"reason":"ended","upstream_status":204,"plivo_api_id":"api-1","attempts":1,"duration_ms":12,"prev":"{hash1}"}}"#
    );
    assert_eq!(got[1], sealed(&body2).0);

    let mode = std::fs::metadata(&path).expect("meta").permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
        0o600
    );
    assert_eq!(intact(dir.path(), None), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn path_is_cut_to_256_bytes_on_a_char_boundary() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("audit.jsonl");
    let log = AuditLog::open(settings(&path, Fsync::Never, 1 << 20)).expect("open");
    let ev = AuditEvent {
        path: format!("/{}", "ä".repeat(300)).into(),
        ..event(0)
    };
    log.append(ev).await.expect("append");
    log.close().await.expect("close");
    let p = member(&lines(&path)[0], "path");
    let p = p.as_str().expect("path");
    assert_eq!(p.len(), 255, "1 + 127 two-byte chars");
}

#[tokio::test(flavor = "multi_thread")]
async fn hmac_mode_keys_the_chain() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("audit.jsonl");
    let mut s = settings(&path, Fsync::Always, 1 << 20);
    s.hmac_key = Some(SecretSlice::from(b"s3cret".to_vec()));
    let log = AuditLog::open(s).expect("open");
    for i in 0..3 {
        log.append(event(i)).await.expect("append");
    }
    log.close().await.expect("close");

    let first = &lines(&path)[0];
    let (body, claimed) = crate::audit::chain::unseal(first.as_bytes()).expect("sealed");
    let mac = <Hmac<Sha256> as Mac>::new_from_slice(b"s3cret").expect("key");
    assert_eq!(
        claimed,
        hex::encode(mac.chain_update(&body).finalize().into_bytes())
    );
    assert_eq!(intact(dir.path(), Some(b"s3cret")), 3);
    assert!(matches!(
        verify_paths(&[dir.path()], None),
        Verdict::KeyProblem { .. }
    ));
}

#[tokio::test(flavor = "multi_thread")]
async fn seq_continues_across_reopen_and_torn_tail_is_cut() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("audit.jsonl");
    let log = AuditLog::open(settings(&path, Fsync::Always, 1 << 20)).expect("open");
    for i in 0..3 {
        log.append(event(i)).await.expect("append");
    }
    log.close().await.expect("close");
    let complete = std::fs::read(&path).expect("read");

    // A crash mid-write leaves part of a line.
    let mut torn = complete.clone();
    torn.extend_from_slice(br#"{"seq":4,"ts":"2026-"#);
    std::fs::write(&path, &torn).expect("write torn");

    let log = AuditLog::open(settings(&path, Fsync::Always, 1 << 20)).expect("reopen");
    assert_eq!(
        std::fs::read(&path).expect("read"),
        complete,
        "torn tail cut"
    );
    assert_eq!(log.append(event(3)).await.expect("append"), 4);
    assert_eq!(log.append(event(4)).await.expect("append"), 5);
    log.close().await.expect("close");
    assert_eq!(intact(dir.path(), None), 5);
}

/// A last record with a far-future `ts` (a bad boot clock, an altered line) is not
/// carried over: later records take the clock's time, not its.
#[tokio::test(flavor = "multi_thread")]
async fn a_far_future_ts_is_not_carried_over_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("audit.jsonl");
    let (line, _) = sealed(&format!(
        r#"{{"seq":1,"ts":"2999-01-01T00:00:00.000Z","prev":"{GENESIS}"}}"#
    ));
    std::fs::write(&path, format!("{line}\n")).expect("write");

    let log = AuditLog::open(settings(&path, Fsync::Never, 1 << 20)).expect("open");
    let before = record::format_ts(record::now_ms());
    assert_eq!(log.append(event(1)).await.expect("append"), 2);
    let after = record::format_ts(record::now_ms());
    log.close().await.expect("close");
    let ts = member(&lines(&path)[1], "ts");
    let ts = ts.as_str().expect("ts");
    assert!(before.as_str() <= ts && ts <= after.as_str(), "{ts}");
}

/// Runs `tasks` concurrent appenders of `per_task` records each; returns all seqs.
async fn hammer(log: &AuditLog, tasks: usize, per_task: usize) -> Vec<u64> {
    let mut handles = Vec::new();
    for t in 0..tasks {
        let log = log.clone();
        handles.push(tokio::spawn(async move {
            let mut seqs = Vec::with_capacity(per_task);
            for i in 0..per_task {
                seqs.push(log.append(event(t * per_task + i)).await.expect("append"));
            }
            seqs
        }));
    }
    let mut all = Vec::new();
    for h in handles {
        all.extend(h.await.expect("task"));
    }
    all.sort_unstable();
    all
}

fn rotated_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("list")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x != "jsonl"))
        // The lock file, `.audit.jsonl.lock`.
        .filter(|p| {
            !p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with('.'))
        })
        .collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread")]
async fn rotation_continues_the_chain_without_loss_under_concurrency() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("audit.jsonl");
    let log = AuditLog::open(settings(&path, Fsync::Never, 16 * 1024)).expect("open");
    let seqs = hammer(&log, 8, 250).await;
    log.close().await.expect("close");
    assert_eq!(
        seqs,
        (1..=2000).collect::<Vec<u64>>(),
        "every seq exactly once"
    );

    let rotated = rotated_files(dir.path());
    assert!(
        rotated.len() >= 10,
        "expected many rotations, got {}",
        rotated.len()
    );
    for file in &rotated {
        // The suffix names the last seq in the file.
        let name = file.file_name().and_then(|n| n.to_str()).expect("name");
        let suffix: u64 = name
            .rsplit('.')
            .next()
            .and_then(|s| s.parse().ok())
            .expect("seq");
        let last = lines(file).pop().expect("non-empty");
        assert_eq!(member(&last, "seq").as_u64(), Some(suffix));
        assert!(std::fs::metadata(file).expect("meta").len() >= 16 * 1024);
    }
    assert_eq!(intact(dir.path(), None), 2000);
}

#[tokio::test(flavor = "multi_thread")]
async fn group_commit_with_fsync_always_and_rotation() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("audit.jsonl");
    let log = AuditLog::open(settings(&path, Fsync::Always, 4096)).expect("open");
    let seqs = hammer(&log, 8, 25).await;
    assert_eq!(seqs, (1..=200).collect::<Vec<u64>>());
    log.close().await.expect("close");
    // Restart after rotation continues the same chain from the rotated files.
    let log = AuditLog::open(settings(&path, Fsync::Always, 4096)).expect("reopen");
    assert_eq!(log.append(event(0)).await.expect("append"), 201);
    log.close().await.expect("close");
    assert_eq!(intact(dir.path(), None), 201);
}

/// With `fsync: never`, the records appended in one turn of the runtime share one write.
#[tokio::test(flavor = "current_thread")]
async fn inline_appends_of_one_turn_share_one_write() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("audit.jsonl");
    let (log, faults) = open_with_faults(&path, Fsync::Never);
    let appends: Vec<_> = (0..20).map(|i| log.append(event(i))).collect();
    let seqs: Vec<u64> = tokio::time::timeout(
        Duration::from_secs(5),
        futures_util::future::join_all(appends),
    )
    .await
    .expect("every append is acknowledged")
    .into_iter()
    .map(|r| r.expect("append"))
    .collect();
    assert_eq!(seqs, (1..=20).collect::<Vec<u64>>(), "seq in append order");
    assert_eq!(faults.appends(), 1, "one write for the whole turn");
    // A lone append is written at once (after one yield).
    assert_eq!(log.append(event(20)).await.expect("append"), 21);
    assert_eq!(faults.appends(), 2);
    log.close().await.expect("close");
    assert_eq!(intact(dir.path(), None), 21);
}

/// An append dropped while parked in its yield (a caller that went away), with no other
/// append to come: dropping it writes its record.
#[tokio::test(flavor = "current_thread")]
async fn an_inline_append_dropped_in_its_yield_writes_its_record() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("audit.jsonl");
    let log = AuditLog::open(settings(&path, Fsync::Never, 1 << 20)).expect("open");
    let Mode::Inline(state) = &log.shared.mode else {
        panic!("fsync: never writes inline");
    };
    let mut append = Box::pin(log.append(event(0)));
    // One poll: the record is pending and the append is parked in its yield.
    let first_poll =
        std::future::poll_fn(|cx| std::task::Poll::Ready(append.as_mut().poll(cx))).await;
    assert!(first_poll.is_pending());
    assert!(lines(&path).is_empty(), "not written before the yield");
    drop(append);
    assert_eq!(lines(&path).len(), 1, "written on drop");
    assert!(
        lock_unpoisoned(state).settled.is_empty(),
        "its outcome collected"
    );
    assert_eq!(log.append(event(1)).await.expect("append"), 2);
    log.close().await.expect("close");
    assert_eq!(intact(dir.path(), None), 2);
}

/// An append dropped before it was ever polled (a request cancelled right after handing
/// its record over) writes its record at once: no other append may come to do it.
#[tokio::test(flavor = "current_thread")]
async fn an_inline_append_dropped_unpolled_writes_its_record_at_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("audit.jsonl");
    let log = AuditLog::open(settings(&path, Fsync::Never, 1 << 20)).expect("open");
    drop(log.submit(event(0)).expect("submitted"));
    assert_eq!(lines(&path).len(), 1, "written on drop");
    assert_eq!(log.append(event(1)).await.expect("append"), 2);
    log.close().await.expect("close");
    assert_eq!(intact(dir.path(), None), 2);
}

/// Inline appends do not depend on each other: awaited one after another, in any order,
/// each completes, the first awaited writing the records of both in one write.
#[tokio::test(flavor = "current_thread")]
async fn inline_appends_awaited_in_any_order_complete_in_one_write() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("audit.jsonl");
    let (log, faults) = open_with_faults(&path, Fsync::Never);
    let first = log.submit(event(0)).expect("submitted");
    let second = log.submit(event(1)).expect("submitted");
    let within = |append| tokio::time::timeout(Duration::from_secs(5), append);
    assert_eq!(within(second).await.expect("in time").expect("append"), 2);
    assert_eq!(within(first).await.expect("in time").expect("append"), 1);
    assert_eq!(faults.appends(), 1, "one write for both");
    log.close().await.expect("close");
    assert_eq!(intact(dir.path(), None), 2);
}

/// Outcomes collected out of order, or never (an append dropped unpolled), are each
/// collected once, and nothing is kept once every append is done with.
#[tokio::test(flavor = "current_thread")]
async fn inline_outcomes_are_kept_only_until_collected() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("audit.jsonl");
    let log = AuditLog::open(settings(&path, Fsync::Never, 1 << 20)).expect("open");
    let Mode::Inline(state) = &log.shared.mode else {
        panic!("fsync: never writes inline");
    };
    let appends: Vec<_> = (0..4)
        .map(|i| log.submit(event(i)).expect("submitted"))
        .collect();
    let mut appends = appends.into_iter();
    let (a, b, c, d) = (
        appends.next().expect("a"),
        appends.next().expect("b"),
        appends.next().expect("c"),
        appends.next().expect("d"),
    );
    assert_eq!(c.await.expect("append"), 3, "c flushed all four");
    assert_eq!(
        lock_unpoisoned(state).settled.len(),
        4,
        "a, b and d not collected yet"
    );
    drop(b);
    assert_eq!(d.await.expect("append"), 4);
    assert_eq!(
        lock_unpoisoned(state).settled.len(),
        4,
        "a is still to come"
    );
    assert_eq!(a.await.expect("append"), 1);
    {
        let state = lock_unpoisoned(state);
        assert!(state.settled.is_empty(), "every outcome collected");
        assert_eq!(state.first_uncollected, 4);
    }
    // A later record gets the next ticket and its own outcome.
    assert_eq!(log.append(event(4)).await.expect("append"), 5);
    assert!(lock_unpoisoned(state).settled.is_empty());
    log.close().await.expect("close");
    assert_eq!(intact(dir.path(), None), 5);
}

/// Inline appends from several worker threads, some dropped unpolled and some dropped
/// parked in their yield (callers that went away), the rest awaited: every record is
/// written exactly once, every awaited append gets its own seq, and no outcome is kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn inline_appends_dropped_at_any_point_under_concurrency_lose_nothing() {
    const TASKS: usize = 8;
    const PER_TASK: usize = 150;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("audit.jsonl");
    let log = AuditLog::open(settings(&path, Fsync::Never, 1 << 30)).expect("open");
    let mut handles = Vec::new();
    for t in 0..TASKS {
        let log = log.clone();
        handles.push(tokio::spawn(async move {
            let mut seqs = Vec::new();
            for i in 0..PER_TASK {
                let record = event(t * PER_TASK + i);
                match i % 3 {
                    // Handed over, then dropped unpolled (an `append` future dropped
                    // unpolled has handed nothing over).
                    0 => drop(log.submit(record).expect("submitted")),
                    1 => {
                        let mut append = Box::pin(log.append(record));
                        let polled = std::future::poll_fn(|cx| {
                            std::task::Poll::Ready(append.as_mut().poll(cx))
                        })
                        .await;
                        assert!(polled.is_pending(), "parked in its yield");
                        drop(append);
                    }
                    _ => seqs.push(log.append(record).await.expect("append")),
                }
                if i % 7 == 0 {
                    tokio::task::yield_now().await;
                }
            }
            seqs
        }));
    }
    let mut seqs = Vec::new();
    for handle in handles {
        seqs.extend(handle.await.expect("task"));
    }
    let Mode::Inline(state) = &log.shared.mode else {
        panic!("fsync: never writes inline");
    };
    assert!(
        lock_unpoisoned(state).settled.is_empty(),
        "every outcome collected"
    );
    log.close().await.expect("close");
    let total = (TASKS * PER_TASK) as u64;
    assert_eq!(
        lines(&path).len() as u64,
        total,
        "every record written once"
    );
    assert_eq!(intact(dir.path(), None), total);
    seqs.sort_unstable();
    let awaited = seqs.len();
    seqs.dedup();
    assert_eq!(seqs.len(), awaited, "no seq given to two appends");
    assert!(seqs.iter().all(|seq| (1..=total).contains(seq)));
}

/// A failed inline write fails every record of its batch, advances nothing, and keeps
/// no outcome once each is collected.
#[tokio::test(flavor = "current_thread")]
async fn a_failed_inline_write_fails_each_record_of_the_batch() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("audit.jsonl");
    let (log, faults) = open_with_faults(&path, Fsync::Never);
    let Mode::Inline(state) = &log.shared.mode else {
        panic!("fsync: never writes inline");
    };
    assert_eq!(log.append(event(0)).await.expect("append"), 1);
    let before = std::fs::read(&path).expect("read");
    faults.set(fault::PARTIAL_WRITE);
    let appends: Vec<_> = (1..4).map(|i| log.append(event(i))).collect();
    let mut causes = Vec::new();
    for outcome in futures_util::future::join_all(appends).await {
        let err = outcome.expect_err("the batch failed");
        assert!(err.to_string().contains("audit.jsonl"), "{err}");
        let AuditError::WriteFailed { source, .. } = err else {
            panic!("not a write failure: {err}");
        };
        causes.push(source);
    }
    assert!(
        causes.iter().all(|cause| Arc::ptr_eq(cause, &causes[0])),
        "the batch's records share its one error"
    );
    assert_eq!(causes[0].raw_os_error(), Some(libc::ENOSPC));
    assert_eq!(faults.appends(), 2, "one write for the failed batch");
    assert_eq!(
        std::fs::read(&path).expect("read"),
        before,
        "no partial line"
    );
    assert!(lock_unpoisoned(state).settled.is_empty());
    faults.set(fault::NONE);
    assert_eq!(
        log.append(event(4)).await.expect("append"),
        2,
        "seq not advanced"
    );
    log.close().await.expect("close");
    assert_eq!(intact(dir.path(), None), 2);
}

/// Appends handed over before `close` are written by it, and their futures still get
/// their seqs afterwards; appends after it are refused.
#[tokio::test(flavor = "current_thread")]
async fn inline_appends_outstanding_at_close_are_written_by_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("audit.jsonl");
    let log = AuditLog::open(settings(&path, Fsync::Never, 1 << 20)).expect("open");
    let first = log.submit(event(0)).expect("submitted");
    let second = log.submit(event(1)).expect("submitted");
    log.close().await.expect("close");
    assert_eq!(lines(&path).len(), 2, "written by close");
    assert_eq!(second.await.expect("append"), 2);
    assert_eq!(first.await.expect("append"), 1);
    assert!(matches!(
        log.append(event(2)).await,
        Err(AuditError::Closed)
    ));
    assert_eq!(intact(dir.path(), None), 2);
}

/// Appends until a rotation (at 1024 bytes) leaves the live file empty, closes; returns
/// the last seq.
async fn append_until_rotated(log: &AuditLog, path: &Path) -> u64 {
    let n = fill_until_rotated(log, path).await;
    log.close().await.expect("close");
    n
}

/// [`append_until_rotated`], leaving the log open.
async fn fill_until_rotated(log: &AuditLog, path: &Path) -> u64 {
    let mut n = 0;
    loop {
        n += 1;
        log.append(event(n)).await.expect("append");
        if live_len_once_rotated(path).await == 0 {
            break;
        }
        assert!(n < 100, "no rotation after {n} records");
    }
    n as u64
}

/// The live file's length once a rotation it is due for (at 1024 bytes) is done: with
/// `fsync: always` the rotation runs after the acknowledgement, and a length read before
/// it would send the next record into the file about to be rotated. 0 while the new
/// file is not created yet.
async fn live_len_once_rotated(path: &Path) -> u64 {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let len = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        if len < 1024 || std::time::Instant::now() > deadline {
            return len;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn empty_live_file_after_rotation_continues_from_rotated_sibling() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("audit.jsonl");
    let log = AuditLog::open(settings(&path, Fsync::Always, 1024)).expect("open");
    let n = append_until_rotated(&log, &path).await;
    assert_eq!(std::fs::metadata(&path).expect("live").len(), 0);
    std::fs::remove_file(&path).expect("remove live"); // also a missing live file works
    let log = AuditLog::open(settings(&path, Fsync::Always, 1024)).expect("reopen");
    assert_eq!(log.append(event(0)).await.expect("append"), n + 1);
    log.close().await.expect("close");
    assert_eq!(intact(dir.path(), None), n + 1);
}

/// Log shippers move rotated files off the host. When that leaves no record on it (the
/// live file is empty right after a rotation), the chain continues from the head saved
/// at the rotation, not from seq 1.
#[tokio::test(flavor = "multi_thread")]
async fn the_chain_continues_from_the_saved_head_when_the_rotated_files_are_moved_away() {
    let dir = tempfile::tempdir().expect("tempdir");
    let archive = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("audit.jsonl");
    let log = AuditLog::open(settings(&path, Fsync::Always, 1024)).expect("open");
    let n = append_until_rotated(&log, &path).await;
    let record_n = lines(&audit_path(&path).rotated(n))
        .pop()
        .expect("record n");
    for file in rotated_files(dir.path()) {
        let name = file.file_name().expect("name");
        std::fs::rename(&file, archive.path().join(name)).expect("ship");
    }

    let log = AuditLog::open(settings(&path, Fsync::Always, 1024)).expect("reopen");
    assert_eq!(log.append(event(0)).await.expect("append"), n + 1);
    log.close().await.expect("close");
    let first = lines(&path).remove(0);
    assert_eq!(member(&first, "prev"), member(&record_n, "hash"));
    assert!(member(&first, "ts").as_str() >= member(&record_n, "ts").as_str());
    match verify_paths(&[archive.path(), dir.path()], None) {
        Verdict::Intact { records, .. } => assert_eq!(records, n + 1),
        other => panic!("chain not intact: {other:?}"),
    }
}

/// A rotation saves the chain head in both modes, waiting for the disk only as the
/// records do: with `fsync: never` a rotation runs inside a request's append, where an
/// fsync could wait for the writeback of everything written before it. A clean shutdown
/// saves it again, synced in both modes, as everything else then is.
#[tokio::test(flavor = "multi_thread")]
async fn a_rotation_saves_the_head_synced_only_with_fsync_always() {
    for (fsync, synced) in [(Fsync::Always, true), (Fsync::Never, false)] {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("audit.jsonl");
        let log = AuditLog::open(settings(&path, fsync, 1024)).expect("open");
        let n = fill_until_rotated(&log, &path).await;
        let saved = saved_head::load(&audit_path(&path)).expect("saved at the rotation");
        assert_eq!(saved.seq, n, "{fsync:?}");
        assert_eq!(saved.key_id.as_deref(), Some("sha256"), "{fsync:?}");
        assert_eq!(saved_head::sync_count::of(&path) > 0, synced, "{fsync:?}");
        let synced_before_close = saved_head::sync_count::of(&path);
        log.close().await.expect("close");
        assert_eq!(
            saved_head::load(&audit_path(&path)),
            Some(saved),
            "{fsync:?}"
        );
        assert_eq!(
            saved_head::sync_count::of(&path),
            synced_before_close + 1,
            "{fsync:?}: saved, synced, at shutdown"
        );
    }
}

/// Review F2: every file of the log archived while the gateway is stopped (`mv
/// audit.jsonl* elsewhere/`, which leaves the dot files). The head saved at the clean
/// shutdown continues the chain at the true last seq, not at the last rotation's, so the
/// archive and the new files verify as one chain.
#[tokio::test(flavor = "multi_thread")]
async fn archiving_every_file_after_a_clean_shutdown_continues_the_chain_at_its_last_seq() {
    for fsync in [Fsync::Always, Fsync::Never] {
        let dir = tempfile::tempdir().expect("tempdir");
        let archive = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("audit.jsonl");
        let log = AuditLog::open(settings(&path, fsync, 1024)).expect("open");
        let rotated_at = fill_until_rotated(&log, &path).await;
        log.append(event(0)).await.expect("append");
        log.close().await.expect("close");
        let last = rotated_at + 1;
        assert!(
            !audit_path(&path).rotated(last).exists(),
            "{fsync:?}: the last record is in the live file"
        );
        for file in rotated_files(dir.path()).into_iter().chain([path.clone()]) {
            let name = file.file_name().expect("name");
            std::fs::rename(&file, archive.path().join(name)).expect("archive");
        }

        let log = AuditLog::open(settings(&path, fsync, 1024)).expect("reopen");
        assert_eq!(log.append(event(9)).await.expect("append"), last + 1);
        log.close().await.expect("close");
        let first = lines(&path).remove(0);
        let archived_last = std::fs::read_dir(archive.path())
            .expect("list")
            .flat_map(|entry| lines(&entry.expect("entry").path()))
            .find(|line| member(line, "seq") == last)
            .expect("the last record is archived");
        assert_eq!(member(&first, "prev"), member(&archived_last, "hash"));
        match verify_paths(&[archive.path(), dir.path()], None) {
            Verdict::Intact { records, .. } => assert_eq!(records, last + 1, "{fsync:?}"),
            other => panic!("{fsync:?}: chain not intact: {other:?}"),
        }
    }
}

/// The head saved at a rotation is marked as followed by records before the first
/// record after it is written (so a restart that finds neither those records nor a newer
/// head refuses, rather than reusing their seqs), and the head saved at a clean shutdown
/// is exact again.
#[tokio::test(flavor = "multi_thread")]
async fn the_saved_head_is_marked_before_records_follow_it_and_exact_after_a_clean_stop() {
    for fsync in [Fsync::Always, Fsync::Never] {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("audit.jsonl");
        let live = audit_path(&path);
        let log = AuditLog::open(settings(&path, fsync, 1024)).expect("open");
        let rotated_at = fill_until_rotated(&log, &path).await;
        let saved = saved_head::load(&live).expect("saved at the rotation");
        assert_eq!((saved.seq, saved.records_may_follow), (rotated_at, false));
        let next = log.append(event(0)).await.expect("append");
        let marked = saved_head::load(&live).expect("head");
        assert_eq!(
            (marked.seq, marked.records_may_follow),
            (rotated_at, true),
            "{fsync:?}: marked by the first write after the rotation"
        );
        log.close().await.expect("close");
        let exact = saved_head::load(&live).expect("head");
        assert_eq!(
            (exact.seq, exact.records_may_follow),
            (next, false),
            "{fsync:?}"
        );
    }
}

/// Review F2, the README's key rotation: stop, archive every file, start under a new
/// key. The saved head names the old key, so the new chain starts at seq 1 (prev 64
/// zeros) instead of continuing the old chain's seqs under the new key.
#[tokio::test(flavor = "multi_thread")]
async fn a_new_key_after_archiving_every_file_starts_a_new_chain_at_seq_1() {
    let dir = tempfile::tempdir().expect("tempdir");
    let archive = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("audit.jsonl");
    let keyed = |key: &[u8]| AuditSettings {
        hmac_key: Some(SecretSlice::from(key.to_vec())),
        ..settings(&path, Fsync::Always, 1024)
    };
    let log = AuditLog::open(keyed(b"old key")).expect("open");
    fill_until_rotated(&log, &path).await;
    log.append(event(0)).await.expect("append");
    log.close().await.expect("close");
    for file in rotated_files(dir.path()).into_iter().chain([path.clone()]) {
        let name = file.file_name().expect("name");
        std::fs::rename(&file, archive.path().join(name)).expect("archive");
    }

    let log = AuditLog::open(keyed(b"new key")).expect("open under the new key");
    assert_eq!(log.append(event(1)).await.expect("append"), 1);
    log.close().await.expect("close");
    let first = lines(&path).remove(0);
    assert_eq!(member(&first, "prev"), GENESIS);
    match verify_paths(&[dir.path()], Some(b"new key")) {
        Verdict::Intact { records: 1, .. } => {}
        other => panic!("the new chain does not verify from seq 1: {other:?}"),
    }
}

/// A damaged saved head does not stop start-up while the rotated files give the head;
/// it is saved again from them, for when they are moved away.
#[tokio::test(flavor = "multi_thread")]
async fn a_damaged_saved_head_is_replaced_from_the_rotated_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("audit.jsonl");
    let log = AuditLog::open(settings(&path, Fsync::Always, 1024)).expect("open");
    let n = append_until_rotated(&log, &path).await;
    std::fs::write(audit_path(&path).saved_head(), "{\"seq\":").expect("damage");

    let log = AuditLog::open(settings(&path, Fsync::Always, 1024)).expect("reopen");
    assert_eq!(
        saved_head::load(&audit_path(&path)).map(|head| head.seq),
        Some(n),
        "saved again at start-up"
    );
    assert_eq!(log.append(event(0)).await.expect("append"), n + 1);
    log.close().await.expect("close");
    assert_eq!(intact(dir.path(), None), n + 1);
}

/// `fsync: never` rotates without syncing: a crash can leave the newest rotated file
/// with its last record torn. Start-up cuts it and renames the file for its last
/// complete record, so that the set verifies once the chain continues from it.
#[tokio::test(flavor = "multi_thread")]
async fn a_torn_newest_rotated_file_is_renamed_and_the_set_verifies() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("audit.jsonl");
    let log = AuditLog::open(settings(&path, Fsync::Never, 1024)).expect("open");
    let n = append_until_rotated(&log, &path).await;
    let newest = audit_path(&path).rotated(n);
    // The crash: only part of record n reached the disk.
    let len = std::fs::metadata(&newest)
        .expect("newest rotated file")
        .len();
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&newest)
        .expect("open");
    file.set_len(len - 10).expect("tear");
    drop(file);

    let log = AuditLog::open(settings(&path, Fsync::Never, 1024)).expect("reopen");
    assert_eq!(
        log.append(event(0)).await.expect("append"),
        n,
        "record n was lost"
    );
    log.close().await.expect("close");
    assert!(!newest.exists(), "still named for the lost record");
    assert!(audit_path(&path).rotated(n - 1).exists());
    assert_eq!(intact(dir.path(), None), n);
}

#[tokio::test(flavor = "multi_thread")]
async fn failed_write_leaves_no_partial_line_and_does_not_advance_seq() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("audit.jsonl");
    let (log, faults) = open_with_faults(&path, Fsync::Always);
    log.append(event(0)).await.expect("append");
    log.append(event(1)).await.expect("append");
    let before = std::fs::read(&path).expect("read");

    for (mode, errno) in [
        (fault::PARTIAL_WRITE, libc::ENOSPC),
        (fault::SYNC, libc::EIO),
    ] {
        faults.set(mode);
        let err = log.append(event(2)).await.expect_err("must fail");
        assert!(err.to_string().contains("audit.jsonl"), "{err}");
        assert_eq!(os_error(&err), Some(errno), "{err}");
        assert!(!log.is_writable());
        assert_eq!(
            std::fs::read(&path).expect("read"),
            before,
            "no partial line"
        );
    }

    faults.set(fault::NONE);
    assert_eq!(
        log.append(event(2)).await.expect("append"),
        3,
        "seq not advanced"
    );
    assert!(
        log.is_writable(),
        "a successful append restores writability"
    );
    log.close().await.expect("close");
    assert_eq!(intact(dir.path(), None), 3);
}

#[tokio::test(flavor = "multi_thread")]
async fn probe_restores_writability_without_leaving_bytes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("audit.jsonl");
    let (log, faults) = open_with_faults(&path, Fsync::Never);
    log.append(event(0)).await.expect("append");
    let before = std::fs::read(&path).expect("read");
    faults.set(fault::PARTIAL_WRITE);
    log.append(event(1)).await.expect_err("must fail");
    assert!(!log.is_writable());
    faults.set(fault::NONE);
    let deadline = std::time::Instant::now() + Duration::from_secs(4);
    while !log.is_writable() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(log.is_writable(), "probe should succeed");
    assert_eq!(std::fs::read(&path).expect("read"), before);
    log.close().await.expect("close");
}

/// The OS error a write or close failure carries, as the disk reported it.
fn os_error(err: &AuditError) -> Option<i32> {
    match err {
        AuditError::WriteFailed { source, .. } | AuditError::CloseFailed { source, .. } => {
            source.raw_os_error()
        }
        _ => None,
    }
}

/// A failed final fsync is reported with the OS error itself (EIO here, ENOSPC on a full
/// disk), and every later close reports the same one.
#[tokio::test(flavor = "multi_thread")]
async fn a_failed_final_flush_keeps_its_os_error() {
    for fsync in [Fsync::Always, Fsync::Never] {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("audit.jsonl");
        let (log, faults) = open_with_faults(&path, fsync);
        log.append(event(0)).await.expect("append");
        faults.set(fault::SYNC);
        let err = log.close().await.expect_err("the final fsync fails");
        assert!(matches!(err, AuditError::CloseFailed { .. }), "{err}");
        assert_eq!(os_error(&err), Some(libc::EIO), "{fsync:?}: {err}");
        assert!(err.to_string().contains("audit.jsonl"), "{err}");
        let again = log.close().await.expect_err("the same outcome");
        assert_eq!(os_error(&again), Some(libc::EIO), "{fsync:?}: {again}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn close_is_idempotent_and_later_appends_fail() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("audit.jsonl");
    let log = AuditLog::open(settings(&path, Fsync::Always, 1 << 20)).expect("open");
    let other = log.clone();
    log.append(event(0)).await.expect("append");
    log.close().await.expect("close");
    other.close().await.expect("second close");
    assert!(matches!(
        other.append(event(1)).await,
        Err(AuditError::Closed)
    ));
    assert!(!log.is_writable());
    assert_eq!(lines(&path).len(), 1);
}

/// What dropping the last handle without [`AuditLog::close`] guarantees (DESIGN makes
/// `close` the shutdown path: it alone waits for the final fsync). A record acknowledged
/// before the drop is already written (and, with `fsync: always`, fsynced), so the drop
/// can only lose records handed over but not yet acknowledged, whose futures were dropped
/// unawaited; it loses none of them:
/// - `fsync: never`: a record is written at the latest when its future is dropped, and
///   futures borrow a handle, so all are in the file (not fsynced) before the last
///   handle can go.
/// - `fsync: always`: dropping the last handle closes the writer's queue; the writer
///   thread writes and fsyncs what is queued, then lets go of the log's lock. The drop
///   does not wait for that, so the test waits for the lock.
///
/// Also: opening and handing records over need no tokio runtime.
#[test]
fn dropping_the_log_unclosed_loses_no_record_whose_future_was_dropped() {
    for fsync in [Fsync::Never, Fsync::Always] {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("audit.jsonl");
        let log = AuditLog::open(settings(&path, fsync, 1 << 20)).expect("open");
        assert!(format!("{log:?}").contains("audit.jsonl"));
        // Handed over and dropped unpolled.
        drop(log.submit(event(0)).expect("submit"));
        // Polled once (parked in its yield, or waiting for the writer), then dropped.
        let mut append = Box::pin(log.append(event(1)));
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        let _ = append.as_mut().poll(&mut cx);
        drop(append);
        drop(log);
        wait_until_unlocked(&path);
        assert_eq!(lines(&path).len(), 2, "{fsync:?}");
        assert_eq!(intact(dir.path(), None), 2, "{fsync:?}");
    }
}

/// Waits (a bounded time) until no writer holds the log at `path`.
fn wait_until_unlocked(path: &Path) {
    let lock = path.with_file_name(".audit.jsonl.lock");
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&lock)
        .expect("lock file");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match file.try_lock() {
            Ok(()) => return,
            Err(std::fs::TryLockError::WouldBlock) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("the dropped log still holds {}: {e}", lock.display()),
        }
    }
}

#[test]
fn missing_directory_is_an_error_and_check_writable_reports_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("nope").join("audit.jsonl");
    let err = AuditLog::open(settings(&path, Fsync::Always, 1024)).expect_err("missing dir");
    assert!(matches!(err, AuditError::MissingDirectory { .. }), "{err}");
    assert!(err.to_string().contains("nope"), "{err}");
    assert!(check_writable(&audit_path(&path)).is_err());
    let ok = audit_path(&dir.path().join("audit.jsonl"));
    check_writable(&ok).expect("writable");
    assert_eq!(
        std::fs::read_dir(dir.path()).expect("list").count(),
        0,
        "probe removed"
    );
}

/// A batch is acknowledged with one send; the caller that gets it wakes the others. If
/// that caller has gone away, nobody waits forever.
#[test]
fn the_relay_acknowledges_the_whole_batch_even_if_its_carrier_is_gone() {
    let mut receivers = Vec::new();
    let mut acks = Vec::new();
    for seq in 1..=3u64 {
        let (tx, rx) = oneshot::channel();
        acks.push((tx, Ok(seq)));
        receivers.push(rx);
    }
    // The last one carries the relay: its caller is gone.
    drop(receivers.pop());
    AckRelay::send_all(acks);
    for (expected, mut rx) in (1..=2u64).zip(receivers) {
        let (outcome, relay) = rx.try_recv().expect("acknowledged");
        assert_eq!(outcome.expect("written"), expected);
        assert!(relay.0.is_empty());
    }

    // The carrier alive: the others are woken only when it drops the relay.
    let (mut carrier, mut others) = (None, Vec::new());
    let mut acks = Vec::new();
    for seq in 1..=3u64 {
        let (tx, rx) = oneshot::channel();
        acks.push((tx, Ok(seq)));
        if seq == 3 {
            carrier = Some(rx);
        } else {
            others.push(rx);
        }
    }
    AckRelay::send_all(acks);
    assert!(others.iter_mut().all(|rx| rx.try_recv().is_err()));
    let (outcome, relay) = carrier.expect("carrier").try_recv().expect("acknowledged");
    assert_eq!(outcome.expect("written"), 3);
    drop(relay);
    for (expected, mut rx) in (1..=2u64).zip(others) {
        assert_eq!(
            rx.try_recv().expect("relayed").0.expect("written"),
            expected
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_writer_is_refused_until_the_first_closes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("audit.jsonl");
    for fsync in [Fsync::Always, Fsync::Never] {
        let first = AuditLog::open(settings(&path, fsync, 1 << 20)).expect("open");
        first.append(event(1)).await.expect("append");
        let started = std::time::Instant::now();
        match AuditLog::open(settings(&path, fsync, 1 << 20)) {
            Err(AuditError::InUse { lock, .. }) => {
                assert_eq!(lock, dir.path().join(".audit.jsonl.lock"));
            }
            other => panic!("{fsync:?}: a second writer opened: {other:?}"),
        }
        assert!(
            started.elapsed() >= LOCK_WAIT,
            "it waited for the holder first"
        );
        first.close().await.expect("close");
        // Closed, the log is free at once, and the chain continues.
        let second = AuditLog::open(settings(&path, fsync, 1 << 20)).expect("reopen");
        second.append(event(2)).await.expect("append");
        second.close().await.expect("close");
    }
    assert_eq!(intact(dir.path(), None), 4);
    let permissions = std::fs::metadata(dir.path().join(".audit.jsonl.lock"))
        .expect("lock file")
        .permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&permissions) & 0o777,
        0o600
    );
}

/// The new file of a rotation whose directory fsync fails is retried by the next write,
/// although the file already exists then (it was only created, not made durable).
#[tokio::test(flavor = "multi_thread")]
async fn a_failed_directory_fsync_after_a_rotation_is_retried() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("audit.jsonl");
    let (log, faults) = open_with_faults_rotating_at(&path, 1024);
    assert_eq!(faults.dir_syncs(), 1, "the live file was created");
    faults.set(fault::SYNC_DIR_ONCE);
    // Enough records to pass 1024 bytes: the write that does rotates.
    let mut appended = 0;
    while rotated_files(dir.path()).is_empty() {
        appended += 1;
        log.append(event(appended)).await.expect("append");
        assert!(appended < 20, "no rotation after {appended} records");
    }
    // The rotation runs after the acknowledgement: wait for its (failing) fsync.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while faults.dir_syncs() < 2 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    log.append(event(appended + 1)).await.expect("append");
    // Created once, failed once, retried once (by this write, or by one that raced the
    // check above): never skipped because the file exists by then.
    assert_eq!(faults.dir_syncs(), 3);
    log.close().await.expect("close");
    assert_eq!(intact(dir.path(), None), appended as u64 + 1);
}

/// At start the record the chain continues from is checked under the configured key: a
/// key added, removed or changed since (or an altered record) is reported, not silently
/// continued.
#[tokio::test(flavor = "multi_thread")]
async fn the_record_the_chain_continues_from_is_checked_under_the_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("audit.jsonl");
    let plain = ChainHasher::new(None).expect("plain");
    let keyed = ChainHasher::new(Some(SecretSlice::from(b"k3y".to_vec()))).expect("keyed");
    let start_up = StartUp {
        hasher: &plain,
        fsync: Fsync::Never,
    };
    let fresh = recover(&audit_path(&path), &start_up).expect("recover");
    assert!(continues_under(&fresh, &plain) && continues_under(&fresh, &keyed));

    let log = AuditLog::open(settings(&path, Fsync::Never, 1 << 20)).expect("open");
    log.append(event(1)).await.expect("append");
    log.close().await.expect("close");
    let head = recover(&audit_path(&path), &start_up).expect("recover");
    assert!(continues_under(&head, &plain));
    assert!(!continues_under(&head, &keyed), "a key added since");
}

/// Renamed, but the new live file cannot be created: the log says it is not writable at
/// once (so `/readyz` turns 503 before a request fails), and the probe brings it back.
#[tokio::test(flavor = "multi_thread")]
async fn a_rotation_without_a_new_file_is_not_writable_until_the_probe_creates_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("audit.jsonl");
    let (log, faults) = open_with_faults_rotating_at(&path, 1024);
    faults.set(fault::OPEN);
    // Until the rotation: a write racing it may already find no live file (and fail).
    // Bounded by attempts, not successes, so that appends that all fail end the loop too.
    let mut appended = 0;
    for _ in 0..20 {
        if !rotated_files(dir.path()).is_empty() {
            break;
        }
        if log.append(event(appended + 1)).await.is_ok() {
            appended += 1;
        }
    }
    assert!(
        !rotated_files(dir.path()).is_empty(),
        "no rotation after 20 appends ({appended} of them written)"
    );
    assert!(
        writable_within(&log, false).await,
        "still reported writable without a live file"
    );
    faults.set(fault::NONE);
    assert!(
        writable_within(&log, true).await,
        "the probe did not create the new file"
    );
    log.append(event(appended + 1)).await.expect("append");
    log.close().await.expect("close");
    assert_eq!(intact(dir.path(), None), appended as u64 + 1);
}

/// Polls (at most 5 s) until the log's writability is `want`; whether it got there.
async fn writable_within(log: &AuditLog, want: bool) -> bool {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while log.is_writable() != want && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    log.is_writable() == want
}

/// An opener whose files report, per handle opened, whether it holds writes that no
/// fsync has covered yet.
#[derive(Clone, Default)]
struct Tracked {
    /// By handle, in the order opened: written since its last fsync.
    dirty: Arc<Mutex<Vec<bool>>>,
}

impl Tracked {
    /// How many handles were opened, and which of them hold unsynced writes.
    fn unsynced(&self) -> (usize, Vec<usize>) {
        let dirty = lock_unpoisoned(&self.dirty);
        let unsynced = (0..dirty.len()).filter(|&i| dirty[i]).collect();
        (dirty.len(), unsynced)
    }
}

impl Opener for Tracked {
    fn open(&self, path: &Path) -> io::Result<segment::Opened> {
        let (file, created) = segment::open_append(path)?;
        let len = file.metadata()?.len();
        let id = {
            let mut dirty = lock_unpoisoned(&self.dirty);
            dirty.push(false);
            dirty.len() - 1
        };
        let file = TrackedFile {
            file,
            id,
            tracked: self.clone(),
        };
        Ok(segment::Opened {
            file: Box::new(file),
            len,
            created,
        })
    }
}

struct TrackedFile {
    file: File,
    id: usize,
    tracked: Tracked,
}

impl TrackedFile {
    fn set_dirty(&self, dirty: bool) {
        lock_unpoisoned(&self.tracked.dirty)[self.id] = dirty;
    }
}

impl LiveFile for TrackedFile {
    fn append(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.set_dirty(true);
        std::io::Write::write_all(&mut self.file, bytes)
    }
    fn sync(&mut self) -> io::Result<()> {
        self.file.sync_all()?;
        self.set_dirty(false);
        Ok(())
    }
    fn truncate(&mut self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }
    fn metadata(&self) -> io::Result<std::fs::Metadata> {
        self.file.metadata()
    }
}

/// DESIGN §5: a clean close leaves the log "flushed and fsynced". With `fsync: never`
/// that covers the files rotated during the run too, not only the live one: every
/// handle the writer wrote through is fsynced after its last write by `close()`, the
/// rotated ones already in the background, off the request path.
#[tokio::test(flavor = "multi_thread")]
async fn close_fsyncs_the_files_rotated_during_the_run_with_fsync_never() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("audit.jsonl");
    let tracked = Tracked::default();
    let log = AuditLog::open_with(
        settings(&path, Fsync::Never, 1024),
        Box::new(tracked.clone()),
    )
    .expect("open");
    for i in 0..30 {
        log.append(event(i)).await.expect("append");
    }
    // In the background already: only the live file (the newest handle) is left.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let (opened, unsynced) = tracked.unsynced();
        if unsynced.iter().all(|&handle| handle + 1 == opened) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "rotated files not fsynced in the background: {unsynced:?} of {opened}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    log.close().await.expect("close");
    assert!(rotated_files(dir.path()).len() >= 2, "rotated a few times");
    let (opened, unsynced) = tracked.unsynced();
    assert!(opened >= 3, "one handle per file: {opened}");
    assert_eq!(unsynced, Vec::<usize>::new(), "handles never fsynced");
    assert_eq!(intact(dir.path(), None), 30);
}

/// `fsync: never` and a power loss soon after a rotation: the newest rotated file's name
/// reached the disk (the new live file's creation synced the directory) but not its
/// data, so it is empty. Start-up removes it like a rotated file torn down to nothing,
/// and the chain continues from the file before it, so the set verifies intact.
#[tokio::test(flavor = "multi_thread")]
async fn an_empty_newest_rotated_file_is_removed_and_the_set_verifies() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("audit.jsonl");
    let log = AuditLog::open(settings(&path, Fsync::Never, 1024)).expect("open");
    let mut last = 0;
    while rotated_files(dir.path()).len() < 2 {
        last = log.append(event(last as usize)).await.expect("append");
        assert!(last < 100, "no second rotation after {last} records");
    }
    log.close().await.expect("close");
    let rotated = rotated_files(dir.path());
    let (older, newest) = (&rotated[0], &rotated[1]);
    assert_eq!(newest, &audit_path(&path).rotated(last));
    let older_last = member(&lines(older).pop().expect("a record"), "seq");
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(newest)
        .expect("open");
    file.set_len(0).expect("the power loss");
    drop(file);

    let log = AuditLog::open(settings(&path, Fsync::Never, 1024)).expect("reopen");
    let next = log.append(event(0)).await.expect("append");
    log.close().await.expect("close");
    assert_eq!(
        Some(next - 1),
        older_last.as_u64(),
        "continues from the older file"
    );
    assert!(!newest.exists(), "the empty file is removed");
    assert_eq!(intact(dir.path(), None), next);
}

/// The seqs of the records in the file at `path` (none when there is no file).
fn seqs_in(path: &Path) -> Vec<u64> {
    if !path.exists() {
        return Vec::new();
    }
    lines(path)
        .iter()
        .filter_map(|line| member(line, "seq").as_u64())
        .collect()
}

/// A live file removed under the writer (by hand, a clean-up script) would take every
/// later record, acknowledged, into a file nobody can read. The write that finds it
/// removed fails instead, and the chain continues in a new file at `audit.path` from
/// the last record acknowledged.
#[tokio::test(flavor = "multi_thread")]
async fn a_removed_live_file_takes_no_acknowledged_record_and_a_new_file_continues_the_chain() {
    for fsync in [Fsync::Always, Fsync::Never] {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("audit.jsonl");
        let log = AuditLog::open(settings(&path, fsync, 1 << 20)).expect("open");
        log.append(event(0)).await.expect("append");
        let last_hash = member(&lines(&path)[0], "hash");
        std::fs::remove_file(&path).expect("remove");
        // Refused; unless the periodic check found the removal first and started the new
        // file, which then holds it.
        match log.append(event(1)).await {
            Ok(seq) => assert_eq!(seqs_in(&path), vec![seq], "{fsync:?}: acknowledged"),
            Err(err) => assert!(
                matches!(err, AuditError::WriteFailed { .. }),
                "{fsync:?}: {err}"
            ),
        }
        let next = log
            .append(event(2))
            .await
            .expect("the next append is written");
        log.close().await.expect("close");
        let seqs = seqs_in(&path);
        assert_eq!(seqs.last(), Some(&next), "{fsync:?}");
        assert_eq!(seqs, (2..=next).collect::<Vec<_>>(), "{fsync:?}");
        assert_eq!(member(&lines(&path)[0], "prev"), last_hash, "{fsync:?}");
        assert_eq!(intact(dir.path(), None), next - 1, "{fsync:?}");
    }
}

/// The live file moved away (logrotate without `copytruncate`, an operator), with or
/// without an empty file made in its place (logrotate's `create`): the records already
/// written stay where it was moved, and the chain continues in the file at
/// `audit.path`, so that the directory verifies intact.
#[tokio::test(flavor = "multi_thread")]
async fn a_live_file_moved_away_is_left_there_and_the_chain_continues_at_the_path() {
    for (fsync, create) in [
        (Fsync::Always, false),
        (Fsync::Never, false),
        (Fsync::Never, true),
    ] {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("audit.jsonl");
        let moved = dir.path().join("moved-away.jsonl");
        let log = AuditLog::open(settings(&path, fsync, 1 << 20)).expect("open");
        log.append(event(0)).await.expect("append");
        std::fs::rename(&path, &moved).expect("move");
        if create {
            std::fs::write(&path, "").expect("create");
        }
        // Records written before the writer notices go with the moved file.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let last = loop {
            let seq = log.append(event(1)).await.expect("append");
            if seqs_in(&path).contains(&seq) {
                break seq;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{fsync:?}: records still go to the moved file"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        log.close().await.expect("close");
        let in_moved = lines(&moved);
        let at_path = lines(&path);
        assert_eq!(member(&in_moved[0], "seq"), 1, "{fsync:?}");
        assert_eq!(
            member(&at_path[0], "prev"),
            member(in_moved.last().expect("a record"), "hash"),
            "{fsync:?}"
        );
        assert_eq!(intact(dir.path(), None), last, "{fsync:?}");
    }
}

/// The live file moved away and a file of someone else's put at `audit.path`: the writer
/// neither rotates (renames) that file nor appends to it; it reports not writable until
/// the path is free again, and then continues the chain in a new file.
#[tokio::test(flavor = "multi_thread")]
async fn a_foreign_file_at_the_path_is_neither_rotated_nor_written_into() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("audit.jsonl");
    let moved = dir.path().join("moved-away.jsonl");
    let log = AuditLog::open(settings(&path, Fsync::Never, 1024)).expect("open");
    log.append(event(0)).await.expect("append");
    std::fs::rename(&path, &moved).expect("move");
    std::fs::write(&path, "someone else's\n").expect("write");
    // Past `rotate_bytes`, so that a rotation is due, whether or not the periodic check
    // noticed the move first.
    for i in 1..10 {
        let _ = log.append(event(i)).await;
    }
    assert!(writable_within(&log, false).await, "still writable");
    assert!(log.append(event(10)).await.is_err(), "written somewhere");
    assert_eq!(
        std::fs::read_to_string(&path).expect("still there"),
        "someone else's\n"
    );
    for file in rotated_files(dir.path()) {
        assert!(
            lines(&file).iter().all(|l| member(l, "seq").is_u64()),
            "{} holds the foreign file",
            file.display()
        );
    }
    std::fs::remove_file(&path).expect("free the path");
    assert!(writable_within(&log, true).await, "not writable again");
    let last = log.append(event(11)).await.expect("append");
    log.close().await.expect("close");
    assert_eq!(intact(dir.path(), None), last);
}

/// A restart after the live file was moved away, before a record was written to the new
/// one: no file at hand holds the chain's last record, so it continues from the head
/// saved when the writer left the moved file, not from seq 1.
#[tokio::test(flavor = "multi_thread")]
async fn a_restart_after_the_live_file_was_moved_away_continues_the_chain() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("audit.jsonl");
    let moved = dir.path().join("moved-away.jsonl");
    let log = AuditLog::open(settings(&path, Fsync::Always, 1 << 20)).expect("open");
    log.append(event(0)).await.expect("append");
    log.append(event(1)).await.expect("append");
    std::fs::rename(&path, &moved).expect("move");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !path.exists() {
        assert!(std::time::Instant::now() < deadline, "no new live file");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    log.close().await.expect("close");

    let log = AuditLog::open(settings(&path, Fsync::Always, 1 << 20)).expect("reopen");
    assert_eq!(log.append(event(2)).await.expect("append"), 3);
    log.close().await.expect("close");
    assert_eq!(
        member(&lines(&path)[0], "prev"),
        member(&lines(&moved)[1], "hash")
    );
    assert_eq!(intact(dir.path(), None), 3);
}

/// A forward-like record and the `denied` record the gateway writes when it failed.
fn denied_after(forward: &AuditEvent) -> AuditEvent {
    AuditEvent {
        event: EventKind::Denied,
        status: Some(503),
        reason: Some("audit-unavailable".into()),
        ..forward.clone()
    }
}

/// `fsync: always` on a disk whose fsync stops returning: the log turns not writable
/// (so `/readyz` 503) once a batch has been in progress longer than the bound, and a
/// caller waiting for its record, in the stuck batch or queued behind it, gets a write
/// error instead of waiting for ever. The records are still written, in order, when the
/// disk answers again: a `forward` refused this way is followed by the `denied` record
/// the gateway then writes, as after any failed `forward` record.
#[tokio::test(flavor = "multi_thread")]
async fn a_stuck_fsync_turns_the_log_unready_and_fails_waiting_appends_in_time() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("audit.jsonl");
    let gate = Gate::default();
    let log = AuditLog::open_stuck(settings(&path, Fsync::Always, 1 << 20), &gate);
    log.append(event(0)).await.expect("append");
    let _closed = gate.close();
    let in_time = Duration::from_secs(3);

    let started = std::time::Instant::now();
    let forward = event(1);
    let refused = tokio::time::timeout(in_time, log.append(forward.clone())).await;
    let err = refused
        .expect("answered within the bound")
        .expect_err("not written");
    assert!(matches!(err, AuditError::WriteFailed { .. }), "{err}");
    assert!(!log.is_writable(), "still ready with a stuck disk");
    // Queued behind the stuck batch: answered too, and kept in order.
    let denied = tokio::time::timeout(in_time, log.append(denied_after(&forward))).await;
    denied
        .expect("answered within the bound")
        .expect_err("not written");
    assert!(started.elapsed() < in_time);

    gate.open();
    assert!(writable_within(&log, true).await, "not ready again");
    assert_eq!(log.append(event(2)).await.expect("append"), 4);
    log.close().await.expect("close");
    let events: Vec<_> = lines(&path)
        .iter()
        .map(|l| (member(l, "event"), member(l, "request_id")))
        .collect();
    assert_eq!(
        events,
        [
            ("forward", "req-0"),
            ("forward", "req-1"),
            ("denied", "req-1"),
            ("forward", "req-2"),
        ]
        .map(|(e, r)| (serde_json::json!(e), serde_json::json!(r)))
    );
    assert_eq!(intact(dir.path(), None), 4);
}

/// `fsync: never` writes on the caller's thread, so a write that stops returning holds
/// that caller (nothing bounds it), but readiness still tells: not writable once the
/// write has been in progress longer than the bound, writable again once it returns.
///
/// The stuck caller has a thread (and runtime) of its own: blocked inside a task of the
/// test's runtime, it would block one of its workers, and the timers the test's own
/// waits need could then stall with it (the test hung that way about once in a few
/// hundred runs).
#[tokio::test]
async fn a_stuck_inline_write_turns_the_log_unready() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("audit.jsonl");
    let gate = Gate::default();
    let log = AuditLog::open_stuck(settings(&path, Fsync::Never, 1 << 20), &gate);
    log.append(event(0)).await.expect("append");
    let _closed = gate.close();
    let (done, stuck) = tokio::sync::oneshot::channel();
    std::thread::spawn({
        let log = log.clone();
        move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .build()
                .expect("runtime");
            let _ = done.send(runtime.block_on(log.append(event(1))));
        }
    });
    let started = std::time::Instant::now();
    assert!(writable_within(&log, false).await, "still ready");
    assert!(started.elapsed() < Duration::from_secs(2));
    gate.open();
    let seq = tokio::time::timeout(Duration::from_secs(5), stuck)
        .await
        .expect("the write returned once the disk answered")
        .expect("the caller's thread answered")
        .expect("written once the disk answers");
    assert_eq!(seq, 2);
    assert!(writable_within(&log, true).await, "not ready again");
    log.close().await.expect("close");
    assert_eq!(intact(dir.path(), None), 2);
}

/// A file outside the audit directory that a symbolic link in it points to: its mode and
/// content, to show that the gateway left it alone.
fn victim(dir: &Path) -> (PathBuf, impl Fn() -> (u32, String)) {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join("victim.txt");
    std::fs::write(&path, "important line 1\nimportant line 2 (no newline)").expect("write");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let seen = path.clone();
    let state = move || {
        let mode = std::fs::metadata(&seen)
            .expect("victim")
            .permissions()
            .mode()
            & 0o777;
        (mode, std::fs::read_to_string(&seen).expect("read victim"))
    };
    (path, state)
}

/// A symbolic link at `audit.path` is refused at start-up and by `check-config`, and the
/// file it names keeps its mode and its (torn-looking) tail: the gateway never narrows,
/// cuts or appends to a file through a link planted in its directory.
#[test]
fn a_symbolic_link_at_the_audit_path_is_refused_and_its_target_left_alone() {
    let outside = tempfile::tempdir().expect("tempdir");
    let (target, state) = victim(outside.path());
    let before = state();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("audit.jsonl");
    std::os::unix::fs::symlink(&target, &path).expect("symlink");

    let err = AuditLog::open(settings(&path, Fsync::Always, 1 << 20))
        .expect_err("a link is not an audit log");
    assert!(err.to_string().contains("symbolic link"), "{err}");
    let err = check_writable(&audit_path(&path)).expect_err("check-config refuses it too");
    assert!(err.to_string().contains("symbolic link"), "{err}");
    assert_eq!(state(), before, "the link's target was changed");
}

/// The lock file is not followed through a link either (a dangling one would otherwise
/// create its target), and one made by hand with a wider mode is narrowed to 0600.
#[test]
fn the_lock_file_follows_no_link_and_is_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    let outside = tempfile::tempdir().expect("tempdir");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("audit.jsonl");
    let lock = dir.path().join(".audit.jsonl.lock");
    let planted = outside.path().join("created-by-the-lock");
    std::os::unix::fs::symlink(&planted, &lock).expect("symlink");
    let err = AuditLog::open(settings(&path, Fsync::Always, 1 << 20))
        .expect_err("a linked lock file is refused");
    assert!(err.to_string().contains("symbolic link"), "{err}");
    let err = check_writable(&audit_path(&path)).expect_err("check-config refuses it too");
    assert!(err.to_string().contains("symbolic link"), "{err}");
    assert!(!planted.exists(), "the link's target was created");

    std::fs::remove_file(&lock).expect("remove the link");
    std::fs::write(&lock, "").expect("a lock file made by hand");
    std::fs::set_permissions(&lock, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let log = AuditLog::open(settings(&path, Fsync::Always, 1 << 20)).expect("open");
    let mode = std::fs::metadata(&lock).expect("lock").permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    drop(log);
}

/// A FIFO at `audit.path` is refused at once rather than blocking the open (a FIFO
/// opened for writing waits for a reader).
#[test]
fn a_fifo_at_the_audit_path_is_refused_without_blocking() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("audit.jsonl");
    let made = std::process::Command::new("mkfifo")
        .arg(&path)
        .status()
        .expect("mkfifo");
    assert!(made.success());
    // On a thread of its own, so that an open that blocks fails the test instead of
    // hanging it.
    let (done, opened) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = done.send(AuditLog::open(settings(&path, Fsync::Never, 1 << 20)).err());
    });
    let err = opened
        .recv_timeout(Duration::from_secs(5))
        .expect("the open returned instead of blocking")
        .expect("a FIFO is not an audit log");
    assert!(err.to_string().contains("not a regular file"), "{err}");
    let err = check_writable(&audit_path(&dir.path().join("audit.jsonl")))
        .expect_err("check-config refuses it too");
    assert!(err.to_string().contains("not a regular file"), "{err}");
}

/// The saved chain head (read when the live file is empty or missing) is not read through
/// a link nor from a FIFO, which would hang start-up: it is ignored with a warning, and
/// the chain starts from what the files hold (here nothing: seq 1), not from the seq 41
/// the linked file claims.
#[tokio::test]
async fn a_saved_head_that_is_a_fifo_or_a_link_is_ignored_without_blocking() {
    let outside = tempfile::tempdir().expect("tempdir");
    let forged = outside.path().join("forged-head");
    let hash = "ab".repeat(32);
    std::fs::write(
        &forged,
        format!(r#"{{"seq":41,"ts":"2026-11-28T00:00:00.000Z","hash":"{hash}"}}"#),
    )
    .expect("write");
    for planted in ["fifo", "link"] {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("audit.jsonl");
        let head = audit_path(&path).saved_head();
        if planted == "fifo" {
            let made = std::process::Command::new("mkfifo")
                .arg(&head)
                .status()
                .expect("mkfifo");
            assert!(made.success());
        } else {
            std::os::unix::fs::symlink(&forged, &head).expect("symlink");
        }
        let (done, opened) = std::sync::mpsc::channel();
        let settings = settings(&path, Fsync::Never, 1 << 20);
        std::thread::spawn(move || {
            let _ = done.send(AuditLog::open(settings));
        });
        let log = opened
            .recv_timeout(Duration::from_secs(5))
            .expect("the open returned instead of blocking")
            .expect("opens");
        assert_eq!(log.append(event(0)).await.expect("append"), 1, "{planted}");
        log.close().await.expect("close");
    }
}

/// Review F1 (ops): a disk that takes no data (full) is found by a write test when the
/// log opens: not writable from the start, so `/readyz` says so before any request is
/// refused. The periodic probe finds out when it takes data again; neither leaves bytes.
#[tokio::test(flavor = "multi_thread")]
async fn a_disk_that_takes_no_data_at_open_makes_the_log_not_writable_from_the_start() {
    for fsync in [Fsync::Always, Fsync::Never] {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("audit.jsonl");
        let faults = Faults::default();
        faults.set(fault::PARTIAL_WRITE);
        let log = AuditLog::open_with(
            settings(&path, fsync, 1 << 20),
            Box::new(FaultyOpener(faults.clone())),
        )
        .expect("opens all the same");
        assert!(!log.is_writable(), "{fsync:?}: not writable from the start");
        assert_eq!(faults.appends(), 1, "{fsync:?}: one test write");
        let len = || std::fs::metadata(&path).expect("live file").len();
        assert_eq!(len(), 0, "{fsync:?}: the failed test left nothing");
        faults.set(fault::NONE);
        assert!(
            writable_within(&log, true).await,
            "{fsync:?}: the probe finds the disk taking data again"
        );
        assert_eq!(len(), 0, "{fsync:?}: the probe left nothing");
        assert_eq!(log.append(event(0)).await.expect("append"), 1);
        log.close().await.expect("close");
        assert_eq!(intact(dir.path(), None), 1);
    }
}

/// Operational log lines, captured for a test.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl io::Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        lock_unpoisoned(&self.0).extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Captured {
    /// A subscriber writing into this capture, for `tracing::subscriber::set_default`.
    fn subscriber(&self) -> impl tracing::Subscriber + Send + Sync {
        let sink = self.clone();
        tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || sink.clone())
            .finish()
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&lock_unpoisoned(&self.0)).into_owned()
    }
}

/// Review F2 (ops): a rotation that keeps failing (here every name it would take is
/// taken) is retried after every write. Each failure is counted (the metrics read the
/// count), the error is logged at most once per 10 s instead of once per write, and the
/// log stays writable: the records still go to the file that did not rotate.
/// `fsync: never` rotates inside the append, on this thread, whose log lines are captured.
#[tokio::test(flavor = "current_thread")]
async fn a_failing_rotation_is_counted_logged_once_per_interval_and_stays_writable() {
    let captured = Captured::default();
    let _logging = tracing::subscriber::set_default(captured.subscriber());
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("audit.jsonl");
    let log = AuditLog::open(settings(&path, Fsync::Never, 1024)).expect("open");
    const RECORDS: usize = 40;
    for seq in 1..=RECORDS as u64 {
        std::fs::write(audit_path(&path).rotated(seq), "taken\n").expect("take the name");
    }
    let mut attempts = 0;
    for i in 0..RECORDS {
        log.append(event(i)).await.expect("append");
        if std::fs::metadata(&path).expect("live file").len() >= 1024 {
            attempts += 1;
        }
    }
    assert!(attempts >= 20, "only {attempts} rotations were due");
    assert_eq!(log.rotation_failures().get(), attempts);
    assert!(log.is_writable(), "records are still written");
    log.close().await.expect("close");
    let text = captured.text();
    let logged: Vec<&str> = text
        .lines()
        .filter(|line| line.contains("audit log rotation failed"))
        .collect();
    assert_eq!(logged.len(), 1, "{text}");
    assert!(logged[0].contains("suppressed=0"), "{}", logged[0]);
    assert_eq!(intact(&path, None), RECORDS as u64);
}
