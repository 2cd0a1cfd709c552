//! `audit verify` (the public `run_verify`, as `mpc-gateway audit verify` calls it) on
//! arbitrary audit files. Must never panic, hang or allocate without bound, whatever the
//! files hold.
//!
//! Input: one flag byte, then up to three file bodies separated by the byte 0x1e.
//! Flag bits: 0 check with `--hmac-key-env`; 1 recompute well-formed hashes; 2 with the
//! HMAC key; 3 re-link `prev` members; 4 pass the directory instead of the files.
//! Bits 1–3 let the fuzzer past the hash check into the link, seq and key-problem logic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mpc_gateway::audit::{run_verify, VerifyArgs};
use mpc_gateway_fuzz::{reseal, scratch, split_files, write_set, Reseal, AUDIT_KEY_ENV};

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let dir = scratch();
    let mut bodies = split_files(rest, 3);
    reseal(
        &mut bodies,
        Reseal {
            hashes: flags & 2 != 0,
            keyed: flags & 4 != 0,
            links: flags & 8 != 0,
        },
    );
    let paths = write_set(dir, &bodies, flags & 16 != 0);
    let args = VerifyArgs {
        paths,
        hmac_key_env: (flags & 1 != 0).then(|| AUDIT_KEY_ENV.to_string()),
        hmac_key_file: None,
        from_seq: 1,
    };
    let _ = run_verify(&args);
});
