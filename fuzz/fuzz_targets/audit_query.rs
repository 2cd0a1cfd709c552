//! `audit query` (the public `run_query`, as `mpc-gateway audit query` calls it) on
//! arbitrary audit files and filters. Must never panic, hang or allocate without bound.
//!
//! Input: one flag byte, then (when bit 0 is set) one line of tab-separated filter
//! values `mpc-glob \t since \t until \t tenant \t reason`, then up to two file bodies
//! separated by the byte 0x1e. Flag bits: 1 JSON output; 2 `--summary`; 3–4 `--event`
//! (none, denied, forward, result); 5 `--status 204`; 6 pass the directory.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mpc_gateway::audit::{run_query, OutputFormat, QueryArgs};
use mpc_gateway_fuzz::{scratch, split_files, write_set};

fuzz_target!(|data: &[u8]| {
    let Some((&flags, mut rest)) = data.split_first() else {
        return;
    };
    let mut filters: Vec<Option<String>> = vec![None; 5];
    if flags & 1 != 0 {
        let end = rest.iter().position(|&b| b == b'\n').unwrap_or(rest.len());
        let line = String::from_utf8_lossy(&rest[..end]).into_owned();
        for (slot, value) in filters.iter_mut().zip(line.split('\t')) {
            *slot = Some(value.to_string());
        }
        rest = &rest[(end + 1).min(rest.len())..];
    }
    let bodies = split_files(rest, 2);
    let paths = write_set(scratch(), &bodies, flags & 64 != 0);
    let mut f = filters.into_iter();
    let mut next = || f.next().flatten();
    let args = QueryArgs {
        paths,
        mpc: next(),
        since: next(),
        until: next(),
        tenant: next(),
        reason: next(),
        event: match (flags >> 3) & 3 {
            0 => None,
            1 => Some("denied".into()),
            2 => Some("forward".into()),
            _ => Some("result".into()),
        },
        status: (flags & 32 != 0).then_some(204),
        format: if flags & 2 != 0 {
            OutputFormat::Json
        } else {
            OutputFormat::Table
        },
        summary: flags & 4 != 0,
    };
    let _ = run_query(&args);
});
