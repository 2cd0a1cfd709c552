//! The config loader on arbitrary text: `parse_raw` (YAML into the raw types) and
//! `Config::from_yaml` (parse, validate, resolve `{env: ..}`/`{file: ..}`, load TLS
//! material). Errors are fine; a panic, a hang or a runaway allocation is not.
//!
//! Also checked:
//! - `from_yaml` fails whenever `parse_raw` fails, and succeeds only where it succeeds;
//! - the secrets the config can reach (files `token`, `key`; variables `FUZZ_TOKEN`,
//!   `FUZZ_KEY`) never show up in an error message or in `summary()`.
//!
//! The process runs in a fresh temporary directory holding those files, plus a real
//! certificate and key (`cert.pem`, `key.pem`, `ca.pem`) so that relative `{file: ..}`
//! and `listen_tls` paths can succeed.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use mpc_gateway::config::{parse_raw, Config};

/// Every secret value below contains this; the input never does (checked per input).
const MARK: &str = "S3CRET-7f3a";

fn setup() -> &'static tempfile::TempDir {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        std::fs::write(d.join("token"), format!("{MARK}-file-token\n")).expect("write");
        std::fs::write(d.join("key"), format!("{MARK}-file-key")).expect("write");
        std::fs::write(d.join("id"), "MAXXXXXXXXXXXXXXXXXX\n").expect("write");
        std::fs::write(d.join("empty"), "").expect("write");
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).expect("cert");
        std::fs::write(d.join("cert.pem"), cert.cert.pem()).expect("write");
        std::fs::write(d.join("ca.pem"), cert.cert.pem()).expect("write");
        std::fs::write(d.join("key.pem"), cert.key_pair.serialize_pem()).expect("write");
        std::env::set_current_dir(d).expect("chdir");
        std::env::set_var("FUZZ_TOKEN", format!("{MARK}-env-token"));
        std::env::set_var("FUZZ_KEY", format!("{MARK}-env-key"));
        std::env::set_var("FUZZ_ID", "MAYYYYYYYYYYYYYYYYYY");
        dir
    })
}

fuzz_target!(|data: &[u8]| {
    setup();
    let text = String::from_utf8_lossy(data);
    let raw = parse_raw(&text);
    let full = Config::from_yaml(&text);
    match (&raw, &full) {
        (Err(_), Ok(_)) => panic!("from_yaml accepted what parse_raw refused"),
        (Err(a), Err(b)) => assert_eq!(a.to_string(), b.to_string()),
        _ => {}
    }
    // An input that spells the marker itself may get it echoed back: only judge others.
    if text.contains("7f3a") || text.contains('\\') {
        return;
    }
    let shown = match &full {
        Ok(config) => config.summary(),
        Err(e) => e.to_string(),
    };
    assert!(!shown.contains(MARK), "a secret leaked into: {shown}");
});
