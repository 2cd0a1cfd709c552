//! Helpers shared by the audit fuzz targets: turning one fuzz input into a small set of
//! audit files, optionally "resealed" so that hashes and `prev` links are right and the
//! fuzzer reaches the chain logic behind the hash check (it cannot compute SHA-256).

use std::path::{Path, PathBuf};

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

/// The HMAC key the targets put into `FUZZ_AUDIT_KEY` for `--hmac-key-env`.
pub const AUDIT_KEY: &[u8] = b"fuzz-audit-key";
pub const AUDIT_KEY_ENV: &str = "FUZZ_AUDIT_KEY";

const HASH_OPEN: &[u8] = b",\"hash\":\"";
const HASH_CLOSE: &[u8] = b"\"}";
const PREV_OPEN: &[u8] = b"\"prev\":\"";
const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// How the harness rewrites the input before the gateway reads it.
#[derive(Debug, Clone, Copy)]
pub struct Reseal {
    /// Recompute every well-formed `hash` member.
    pub hashes: bool,
    /// With the HMAC key instead of plain SHA-256.
    pub keyed: bool,
    /// Point every `prev` at the previous line's hash (64 zeros for the first).
    pub links: bool,
}

fn digest(keyed: bool, body: &[u8]) -> String {
    if keyed {
        let mac = <Hmac<Sha256> as Mac>::new_from_slice(AUDIT_KEY).expect("any key length");
        hex::encode(mac.chain_update(body).finalize().into_bytes())
    } else {
        hex::encode(Sha256::digest(body))
    }
}

fn is_hex64(b: &[u8]) -> bool {
    b.len() == 64 && b.iter().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'))
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Rewrites the lines of `files` (in order, one chain across them) as `how` says.
pub fn reseal(files: &mut [Vec<u8>], how: Reseal) {
    if !how.hashes && !how.links {
        return;
    }
    let mut prev = GENESIS.to_string();
    for file in files.iter_mut() {
        let mut out = Vec::with_capacity(file.len());
        let mut rest: &[u8] = file;
        while !rest.is_empty() {
            let (line, nl) = match rest.iter().position(|&b| b == b'\n') {
                Some(i) => (&rest[..i], true),
                None => (rest, false),
            };
            rest = &rest[line.len() + usize::from(nl)..];
            let mut line = line.to_vec();
            if how.links {
                if let Some(at) = find(&line, PREV_OPEN) {
                    let start = at + PREV_OPEN.len();
                    if line.len() >= start + 64 && is_hex64(&line[start..start + 64]) {
                        line[start..start + 64].copy_from_slice(prev.as_bytes());
                    }
                }
            }
            let seal = HASH_OPEN.len() + 64 + HASH_CLOSE.len();
            if line.len() >= seal {
                let cut = line.len() - seal;
                let hex_at = cut + HASH_OPEN.len();
                let sealed = line[cut..].starts_with(HASH_OPEN)
                    && line.ends_with(HASH_CLOSE)
                    && is_hex64(&line[hex_at..hex_at + 64]);
                if sealed {
                    if how.hashes {
                        let mut body = line[..cut].to_vec();
                        body.push(b'}');
                        let h = digest(how.keyed, &body);
                        line[hex_at..hex_at + 64].copy_from_slice(h.as_bytes());
                    }
                    prev = String::from_utf8_lossy(&line[hex_at..hex_at + 64]).into_owned();
                }
            }
            out.extend_from_slice(&line);
            if nl {
                out.push(b'\n');
            }
        }
        *file = out;
    }
}

/// Splits `data` into at most `max` file bodies at the byte 0x1e (ASCII record
/// separator); later separators stay in the last body.
pub fn split_files(data: &[u8], max: usize) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut rest = data;
    while out.len() + 1 < max {
        match rest.iter().position(|&b| b == 0x1e) {
            Some(i) => {
                out.push(rest[..i].to_vec());
                rest = &rest[i + 1..];
            }
            None => break,
        }
    }
    out.push(rest.to_vec());
    out
}

/// Names for up to three files: rotated siblings first, the live file last.
pub const FILE_NAMES: [&str; 3] = [
    "audit.jsonl.00000000000000000010",
    "audit.jsonl.00000000000000000020",
    "audit.jsonl",
];

/// Writes `bodies` into `dir` (removing the names not used this time) and returns the
/// paths to hand to the tool: the directory itself, or the files.
pub fn write_set(dir: &Path, bodies: &[Vec<u8>], as_dir: bool) -> Vec<PathBuf> {
    let first = FILE_NAMES.len() - bodies.len();
    let mut paths = Vec::new();
    for (i, name) in FILE_NAMES.iter().enumerate() {
        let path = dir.join(name);
        if i < first {
            let _ = std::fs::remove_file(&path);
        } else {
            std::fs::write(&path, &bodies[i - first]).expect("write audit file");
            paths.push(path);
        }
    }
    if as_dir {
        vec![dir.to_path_buf()]
    } else {
        paths
    }
}

/// The scratch directory of this fuzzing process, created once: in /dev/shm when there
/// is one, since creating and unlinking files on a disk file system costs more than the
/// code under test (about 400 instead of several thousand runs per second).
pub fn scratch() -> &'static Path {
    use std::sync::OnceLock;
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        std::env::set_var(
            AUDIT_KEY_ENV,
            std::str::from_utf8(AUDIT_KEY).expect("ascii"),
        );
        // scripts/fuzz points TMPDIR at a scratch directory on tmpfs and removes it.
        let shm = Path::new("/dev/shm");
        let dir = if std::env::var_os("TMPDIR").is_none() && shm.is_dir() {
            tempfile::Builder::new().prefix("mpc-fuzz").tempdir_in(shm)
        } else {
            tempfile::tempdir()
        };
        dir.expect("tempdir")
    })
    .path()
}
