//! The audit writer's start-up recovery (`AuditLog::open`: cut a torn tail, find the last
//! complete record in the live file or the newest rotated sibling, continue `seq`/`prev`
//! from it) on arbitrary existing files, followed by one append and a close. Must never
//! panic, in the caller or in the writer thread.
//!
//! Input: one flag byte, then up to three file bodies separated by the byte 0x1e (rotated
//! siblings first, the live file last). Flag bits: 1 recompute well-formed hashes;
//! 3 re-link `prev` members; 5 one file only. With one file whose chain `audit verify`
//! finds intact, the chain must still verify intact after the append.
#![no_main]

use std::process::ExitCode;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use mpc_gateway::audit::{
    run_verify, AuditError, AuditEvent, AuditLog, AuditPath, AuditSettings, EventKind, Fsync,
    VerifyArgs,
};
use mpc_gateway_fuzz::{reseal, scratch, split_files, write_set, Reseal};

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let dir = scratch();
    // Rotation may have left more files behind: start from an empty directory.
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let _ = std::fs::remove_file(e.path());
        }
    }
    let single = flags & 32 != 0;
    let mut bodies = split_files(rest, if single { 1 } else { 3 });
    reseal(
        &mut bodies,
        Reseal {
            hashes: flags & 2 != 0,
            keyed: false,
            links: flags & 8 != 0,
        },
    );
    write_set(dir, &bodies, false);
    let live = AuditPath::try_from(dir.join("audit.jsonl")).expect("a valid audit path");
    let verify = || {
        run_verify(&VerifyArgs {
            paths: vec![dir.to_path_buf()],
            hmac_key_env: None,
            hmac_key_file: None,
            from_seq: 1,
        })
    };
    let intact_before = single && verify() == ExitCode::SUCCESS;
    let settings = AuditSettings {
        path: live,
        fsync: Fsync::Never,
        rotate_bytes: 1024,
        hmac_key: None,
    };
    let log = match AuditLog::open(settings) {
        Ok(log) => log,
        // An intact chain is refused only when no seq can follow its last one.
        Err(AuditError::Corrupt { detail, .. }) if detail.contains("largest possible seq") => {
            return
        }
        Err(e) => {
            assert!(
                !intact_before,
                "open refused an intact single-file log: {e}"
            );
            return;
        }
    };
    let event = AuditEvent {
        event: EventKind::Denied,
        request_id: "fuzz".into(),
        method: "POST".into(),
        path: "/mpc/x/end".into(),
        status: Some(401),
        reason: Some("unauthenticated".into()),
        ..AuditEvent::default()
    };
    let appended = runtime().block_on(async {
        let r = log.append(event).await;
        let _ = log.close().await;
        r
    });
    if intact_before {
        // Refused only when the recovered seq leaves no room for one more record.
        let exhausted =
            matches!(&appended, Err(AuditError::Encode { detail }) if detail.contains("exhausted"));
        assert!(
            appended.is_ok() || exhausted,
            "append after recovery failed: {appended:?}"
        );
        assert!(
            verify() == ExitCode::SUCCESS,
            "the chain no longer verifies after recovery + append"
        );
    }
});
