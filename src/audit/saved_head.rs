//! The chain head saved beside the log at every rotation, in `.<file name>.head`: the
//! last record's `seq`, `ts` and `hash`. Right after a rotation the live file is empty,
//! and log shippers move rotated files off the host; without this file a restart then
//! would start a new chain at seq 1 although DESIGN.md §3 says `seq` continues across
//! restarts and rotations.
//!
//! It is a file of its own rather than the lock file: it is replaced by a rename, so a
//! crash leaves the old head or the new one and never half of each, and a rename over
//! the lock file would swap the inode that another gateway's `flock` waits on. Its name
//! starts with a dot, so `audit verify DIR` and `audit query DIR` skip it.

use std::fs::OpenOptions;
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use serde::{Deserialize, Serialize};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use super::chain::HexDigest;
use super::path::AuditPath;
use super::segment::{open_regular, sync_dir};

/// The last record written before a rotation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SavedHead {
    pub(crate) seq: u64,
    pub(crate) ts: String,
    pub(crate) hash: String,
}

/// Far more than a saved head takes; a larger file is not one.
const MAX_LEN: u64 = 4096;

/// Whether a saved head waits for the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Durability {
    /// File and directory fsynced: with `fsync: always`, and at start-up.
    Synced,
    /// Written and renamed, not synced: with `fsync: never` a rotation runs inside a
    /// request's append, and an fsync there can wait for the writeback of everything
    /// the log wrote before it (tens of ms on a busy disk), which that setting exists to
    /// avoid. The head is then as durable as the records themselves.
    Written,
}

/// Replaces the saved head atomically: a fresh file (mode 0600) written, renamed over
/// the old one; fsynced, with its directory, when `durability` says so.
pub(crate) fn save(live: &AuditPath, head: &SavedHead, durability: Durability) -> io::Result<()> {
    let mut text = serde_json::to_vec(head).map_err(io::Error::other)?;
    text.push(b'\n');
    let temp = live.saved_head_temp();
    // A leftover of a crash mid-save: removed so that `create_new` makes a fresh 0600
    // file and follows no symlink planted there.
    match std::fs::remove_file(&temp) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&temp)?;
    file.write_all(&text)?;
    if durability == Durability::Synced {
        file.sync_all()?;
        #[cfg(test)]
        sync_count::add(live.as_path());
    }
    std::fs::rename(&temp, live.saved_head())?;
    if durability == Durability::Synced {
        sync_dir(live.dir())?;
    }
    Ok(())
}

/// The saved head, `None` when there is none. One that cannot be read or is not valid is
/// reported and ignored: the files themselves may still hold the head, and a damaged
/// side file must not stop the gateway.
pub(crate) fn load(live: &AuditPath) -> Option<SavedHead> {
    let path = live.saved_head();
    match read(&path) {
        Ok(head) => head,
        Err(why) => {
            tracing::warn!(path = %path.display(), error = %why, "ignoring the saved audit chain head: it cannot be read or is not valid");
            None
        }
    }
}

fn read(path: &Path) -> Result<Option<SavedHead>, String> {
    // Not through a link, and never blocking on a FIFO: see `open_regular`.
    let file = match open_regular(OpenOptions::new().read(true), path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.to_string()),
    };
    let mut text = Vec::new();
    file.take(MAX_LEN + 1)
        .read_to_end(&mut text)
        .map_err(|e| e.to_string())?;
    if text.len() as u64 > MAX_LEN {
        return Err(format!("larger than {MAX_LEN} bytes"));
    }
    let head: SavedHead = serde_json::from_slice(&text).map_err(|e| e.to_string())?;
    validate(&head)?;
    Ok(Some(head))
}

/// What the writer saves: a seq that another can follow, a chain hash, an RFC 3339 time.
fn validate(head: &SavedHead) -> Result<(), &'static str> {
    if head.seq == 0 || head.seq == u64::MAX {
        return Err("its seq is 0 or the largest possible");
    }
    if HexDigest::parse(&head.hash).is_none() {
        return Err("its hash is not 64 lower-case hex digits");
    }
    if OffsetDateTime::parse(&head.ts, &Rfc3339).is_err() {
        return Err("its ts is not an RFC 3339 time");
    }
    Ok(())
}

/// Synced saves per log, for tests: the writer's thread (`fsync: always`) is not the
/// test's, so the count is kept by path rather than per thread.
#[cfg(test)]
pub(crate) mod sync_count {
    use std::collections::HashMap;
    use std::path::{Path, PathBuf};
    use std::sync::Mutex;

    use crate::sync::lock_unpoisoned;

    static SYNCED: Mutex<Option<HashMap<PathBuf, usize>>> = Mutex::new(None);

    pub(crate) fn add(live: &Path) {
        let mut counts = lock_unpoisoned(&SYNCED);
        *counts
            .get_or_insert_with(HashMap::new)
            .entry(live.to_path_buf())
            .or_default() += 1;
    }

    pub(crate) fn of(live: &Path) -> usize {
        let counts = lock_unpoisoned(&SYNCED);
        counts
            .as_ref()
            .and_then(|counts| counts.get(live).copied())
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn head(seq: u64) -> SavedHead {
        SavedHead {
            seq,
            ts: "2026-01-01T00:00:00.000Z".into(),
            hash: "ab".repeat(32),
        }
    }

    #[test]
    fn a_saved_head_is_loaded_back_from_a_0600_dot_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let live = AuditPath::try_from(dir.path().join("audit.jsonl")).expect("valid");
        assert_eq!(load(&live), None, "none saved yet");
        save(&live, &head(7), Durability::Synced).expect("save");
        save(&live, &head(9), Durability::Written).expect("replace");
        assert_eq!(load(&live), Some(head(9)));
        let path = dir.path().join(".audit.jsonl.head");
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .expect("list")
            .filter_map(|e| e.ok().map(|e| e.file_name()))
            .collect();
        assert_eq!(
            names,
            vec![std::ffi::OsString::from(".audit.jsonl.head")],
            "no temp left"
        );
    }

    #[test]
    fn a_damaged_saved_head_is_ignored() {
        let dir = tempfile::tempdir().expect("tempdir");
        let live = AuditPath::try_from(dir.path().join("audit.jsonl")).expect("valid");
        let path = live.saved_head();
        let hash = "ab".repeat(32);
        for text in [
            "garbage".to_string(),
            format!(r#"{{"seq":0,"ts":"2026-01-01T00:00:00.000Z","hash":"{hash}"}}"#),
            format!(
                r#"{{"seq":18446744073709551615,"ts":"2026-01-01T00:00:00.000Z","hash":"{hash}"}}"#
            ),
            r#"{"seq":3,"ts":"2026-01-01T00:00:00.000Z","hash":"AB"}"#.to_string(),
            format!(r#"{{"seq":3,"ts":"yesterday","hash":"{hash}"}}"#),
            " ".repeat(5000),
        ] {
            std::fs::write(&path, &text).expect("write");
            assert_eq!(load(&live), None, "{text}");
        }
    }
}
