//! Regression tests for what the fuzz targets in `fuzz/` found (issue 9). Each test names
//! the target and the input that crashed it; `scripts/fuzz` runs the targets.

use std::path::Path;
use std::process::ExitCode;

use mpc_gateway::audit::{
    run_verify, AuditError, AuditEvent, AuditLog, AuditPath, AuditSettings, EventKind, Fsync,
    VerifyArgs,
};
use sha2::{Digest, Sha256};

const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// One sealed audit line exactly as the contract writes it (members in order, compact,
/// hash = SHA-256 of the line with its hash member replaced by `}`), with its hash.
fn sealed(seq: u64, ts: &str, prev: &str) -> (String, String) {
    let body = serde_json::json!({
        "seq": seq, "ts": ts, "event": "denied", "request_id": "r", "tenant": null,
        "token_fp": null, "client": null, "method": "POST", "path": "/mpc/x/end",
        "mpc": null, "account": null, "status": 401, "reason": "unauthenticated",
        "upstream_status": null, "plivo_api_id": null, "attempts": null,
        "duration_ms": null, "prev": prev,
    })
    .to_string();
    let hash = hex::encode(Sha256::digest(body.as_bytes()));
    let line = format!("{},\"hash\":\"{hash}\"}}\n", &body[..body.len() - 1]);
    (line, hash)
}

fn settings(path: &Path) -> AuditSettings {
    AuditSettings {
        path: AuditPath::try_from(path).expect("a valid audit path"),
        fsync: Fsync::Always,
        rotate_bytes: 1 << 20,
        hmac_key: None,
    }
}

fn event() -> AuditEvent {
    AuditEvent {
        event: EventKind::Denied,
        request_id: "after-restart".into(),
        method: "POST".into(),
        path: "/mpc/x/end".into(),
        status: Some(401),
        reason: Some("unauthenticated".into()),
        ..AuditEvent::default()
    }
}

/// `audit verify DIR --from-seq FROM_SEQ` exits 0.
fn verifies(dir: &Path, from_seq: u64) -> bool {
    run_verify(&VerifyArgs {
        paths: vec![dir.to_path_buf()],
        hmac_key_env: None,
        hmac_key_file: None,
        from_seq,
    }) == ExitCode::SUCCESS
}

/// fuzz target `audit_recover`, input `fuzz/seeds/audit_recover/far_future_ts`: the last
/// record's `ts` is valid RFC 3339 but lies outside the years UTC can represent
/// (`9999-12-31T23:59:59.999-23:59` is 10000-01-01 in UTC). Recovery took it as the
/// clock floor, and the writer thread panicked in `to_offset(UTC)` on the first append
/// ("local datetime out of valid range"); with `panic = "abort"` in release builds that
/// took the whole gateway down at its first request after a restart.
#[tokio::test]
async fn unrepresentable_last_ts_does_not_kill_the_writer() {
    let dir = tempfile::tempdir().expect("tempdir");
    let live = dir.path().join("audit.jsonl");
    let (l1, h1) = sealed(1, "2026-11-26T09:03:01.123Z", GENESIS);
    let (l2, _) = sealed(2, "9999-12-31T23:59:59.999-23:59", &h1);
    std::fs::write(&live, format!("{l1}{l2}")).expect("write");
    assert!(
        verifies(dir.path(), 1),
        "the crafted log itself is an intact chain"
    );

    let log = AuditLog::open(settings(&live)).expect("open");
    let seq = log.append(event()).await.expect("append after recovery");
    assert_eq!(seq, 3);
    log.close().await.expect("close");

    let text = std::fs::read_to_string(&live).expect("read");
    let last: serde_json::Value =
        serde_json::from_str(text.lines().last().expect("a line")).expect("json");
    let ts = last["ts"].as_str().expect("ts");
    assert!(
        time::OffsetDateTime::parse(ts, &time::format_description::well_known::Rfc3339).is_ok()
            && ts.ends_with('Z'),
        "new ts {ts:?}"
    );
    assert!(verifies(dir.path(), 1), "the chain continues intact");
}

/// fuzz target `audit_recover`, input `fuzz/seeds/audit_recover/max_seq`: a last record
/// with seq 18446744073709551615 (u64::MAX). Recovery continued with the same seq
/// (saturating), so the next record repeated it and the writer's `seq += 1` overflowed:
/// a panic in the writer thread with overflow checks, a silently broken chain (seq 0)
/// without. Recovery now refuses such a file like any other one it cannot continue.
#[tokio::test]
async fn largest_seq_is_refused_at_open_not_overflowed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let live = dir.path().join("audit.jsonl");
    let (l1, _) = sealed(u64::MAX, "2026-11-26T09:03:01.123Z", GENESIS);
    std::fs::write(&live, &l1).expect("write");

    let err = match AuditLog::open(settings(&live)) {
        Err(e) => e,
        Ok(log) => {
            let appended = log.append(event()).await;
            let _ = log.close().await;
            panic!("open accepted a log that cannot be continued; append gave {appended:?}");
        }
    };
    assert!(matches!(err, AuditError::Corrupt { .. }), "{err}");
    assert!(err.to_string().contains("audit.jsonl"), "{err}");
    assert_eq!(
        std::fs::read_to_string(&live).expect("read"),
        l1,
        "file untouched"
    );
}

/// fuzz target `audit_recover`, found by the fuzzer itself (artifact
/// `crash-adffb8741ab9ff6efb6edc9d2624ecec80dda82c`: a one-record log with seq
/// 18446744073709551614). Recovery continued at seq u64::MAX, the writer wrote that
/// record and then overflowed computing the next seq ("attempt to add with overflow" in
/// the writer thread). The writer now refuses a record whose seq nothing could follow:
/// the append fails with an encode error and the log stays an intact chain.
#[tokio::test]
async fn seq_exhaustion_refuses_the_append_and_keeps_the_chain() {
    let dir = tempfile::tempdir().expect("tempdir");
    let live = dir.path().join("audit.jsonl");
    let (l1, _) = sealed(u64::MAX - 1, "2026-11-26T09:03:01.123Z", GENESIS);
    std::fs::write(&live, &l1).expect("write");

    let log = AuditLog::open(settings(&live)).expect("open");
    for _ in 0..2 {
        let err = log.append(event()).await.expect_err("no seq left");
        assert!(matches!(err, AuditError::Encode { .. }), "{err}");
        assert!(err.to_string().contains("exhausted"), "{err}");
    }
    log.close().await.expect("close");
    assert_eq!(
        std::fs::read_to_string(&live).expect("read"),
        l1,
        "nothing written"
    );
    // The chain starts at that seq: only with --from-seq does it verify.
    assert!(!verifies(dir.path(), 1));
    assert!(verifies(dir.path(), u64::MAX - 1));
}

/// fuzz target `config`, artifact `crash-dba70a3686731d44ba846ffdd1eb478a43e8e0ae`
/// (minimized by hand): `log.level: "info, é=debug"` panicked inside tracing-subscriber
/// 0.3.23's filter parser ("end byte index 2 is not a char boundary"), so `check-config`,
/// start-up and a SIGHUP reload of such a file crashed instead of reporting the key.
#[test]
fn non_ascii_log_filter_is_a_config_error_not_a_panic() {
    for level in ["info, é=debug", " é=info", "info,é=debug", "ünïcode"] {
        let yaml = format!(
            "accounts: {{}}\ntenants: {{}}\naudit: {{path: audit.jsonl}}\nlog: {{level: {level:?}}}\n"
        );
        let err = match mpc_gateway::config::Config::from_yaml(&yaml) {
            Ok(_) => panic!("{level:?} accepted"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains("log.level"), "{level:?}: {err}");
    }
}
