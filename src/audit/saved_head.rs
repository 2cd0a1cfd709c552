//! The chain head saved beside the log at every rotation and at a clean shutdown, in
//! `.<file name>.head`: the last record's `seq`, `ts` and `hash`, an identifier of the
//! key the chain is hashed with, and whether records may have been written after it. Right after a rotation the live file is empty, and log
//! shippers move rotated files off the host (operators archive every file while the
//! gateway is stopped); without this file a restart then would start a new chain at seq 1
//! although DESIGN.md §3 says `seq` continues across restarts and rotations. The key
//! identifier tells a restart under a new key (the old chain archived) from one that
//! continues the old chain.
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

use super::chain::{ChainHasher, HexDigest};
use super::path::AuditPath;
use super::segment::{open_regular, sync_dir};

/// The last record written before a rotation or a clean shutdown.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SavedHead {
    pub(crate) seq: u64,
    pub(crate) ts: String,
    pub(crate) hash: String,
    /// The [`key_id`] of the key `hash` was made with; `None` when unknown (a head saved
    /// by a version without it, or a record that does not verify under the configured
    /// key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) key_id: Option<String>,
    /// Records may have been written after this one: set by the writer before the first
    /// write that follows a save ([`mark_records_may_follow`]), cleared by the next save
    /// (a rotation, a clean shutdown, start-up). A head with it set, and no file holding
    /// those records, means files were moved away after a run that did not stop cleanly:
    /// continuing from it would reuse their seqs.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub(crate) records_may_follow: bool,
}

/// The key id of an unkeyed (plain SHA-256) chain.
const UNKEYED: &str = "sha256";
/// What the key id of a keyed chain is the HMAC of.
const KEY_ID_MESSAGE: &[u8] = b"mpc-gateway head key id";
/// Hex digits of that HMAC kept: enough to tell keys apart, far too few to matter as
/// key material (and an HMAC output reveals nothing of the key anyway).
const KEY_ID_HEX: usize = 16;

/// Identifies the key a chain is hashed with, never the key itself: `sha256` for an
/// unkeyed chain, else the first 16 hex digits of HMAC-SHA256(key, "mpc-gateway head key
/// id").
pub(crate) fn key_id(hasher: &ChainHasher) -> String {
    if !hasher.is_keyed() {
        return UNKEYED.to_owned();
    }
    let digest = hasher.digest(KEY_ID_MESSAGE);
    // Always 64 hex digits; an empty id would fail `validate` rather than panic here.
    digest
        .as_str()
        .get(..KEY_ID_HEX)
        .unwrap_or_default()
        .to_owned()
}

fn is_key_id(text: &str) -> bool {
    text == UNKEYED
        || (text.len() == KEY_ID_HEX
            && text
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
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

/// Marks the saved head as followed by records (see
/// [`SavedHead::records_may_follow`]), before the writer's first write after it; no head
/// saved yet (a new log) is nothing to mark.
pub(crate) fn mark_records_may_follow(live: &AuditPath, durability: Durability) -> io::Result<()> {
    match read(&live.saved_head()) {
        Ok(Some(head)) if !head.records_may_follow => save(
            live,
            &SavedHead {
                records_may_follow: true,
                ..head
            },
            durability,
        ),
        Ok(_) => Ok(()),
        Err(why) => Err(io::Error::new(io::ErrorKind::InvalidData, why)),
    }
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
    if head.key_id.as_deref().is_some_and(|id| !is_key_id(id)) {
        return Err("its key_id is neither sha256 nor 16 lower-case hex digits");
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
            key_id: Some(UNKEYED.into()),
            records_may_follow: false,
        }
    }

    /// The mark survives a reload and changes nothing else; the next save clears it; a
    /// head of the old format (no member) reads as not followed.
    #[test]
    fn records_may_follow_is_marked_once_and_cleared_by_the_next_save() {
        let dir = tempfile::tempdir().expect("tempdir");
        let live = AuditPath::try_from(dir.path().join("audit.jsonl")).expect("valid");
        mark_records_may_follow(&live, Durability::Written).expect("no head: nothing to mark");
        assert_eq!(load(&live), None);
        save(&live, &head(7), Durability::Written).expect("save");
        mark_records_may_follow(&live, Durability::Written).expect("mark");
        let marked = load(&live).expect("head");
        assert_eq!(
            marked,
            SavedHead {
                records_may_follow: true,
                ..head(7)
            }
        );
        save(&live, &head(9), Durability::Written).expect("save");
        assert!(!load(&live).expect("head").records_may_follow);
        let text = std::fs::read_to_string(live.saved_head()).expect("read");
        assert!(!text.contains("records_may_follow"), "{text}");
    }

    /// The id is HMAC-SHA256(key, "mpc-gateway head key id") cut to 16 hex digits, as an
    /// independent HMAC computes it; `sha256` without a key.
    #[test]
    fn the_key_id_names_the_key_without_revealing_it() {
        use hmac::{Hmac, Mac};
        let key = b"a key for the key id test";
        let keyed = ChainHasher::new(Some(key.to_vec().into())).expect("key");
        let mut mac = <Hmac<sha2::Sha256> as Mac>::new_from_slice(key).expect("key");
        mac.update(b"mpc-gateway head key id");
        let expected = hex::encode(mac.finalize().into_bytes());
        assert_eq!(key_id(&keyed), expected[..16]);
        assert_eq!(key_id(&ChainHasher::Plain), "sha256");
        let other = ChainHasher::new(Some(b"another key".to_vec().into())).expect("key");
        assert_ne!(key_id(&other), key_id(&keyed));
    }

    /// A head saved by a version without `key_id` is still read: its key is unknown.
    #[test]
    fn a_head_of_the_old_format_is_read_with_an_unknown_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let live = AuditPath::try_from(dir.path().join("audit.jsonl")).expect("valid");
        let hash = "ab".repeat(32);
        let old = format!(r#"{{"seq":3,"ts":"2026-01-01T00:00:00.000Z","hash":"{hash}"}}"#);
        std::fs::write(live.saved_head(), old).expect("write");
        let loaded = load(&live).expect("read");
        assert_eq!((loaded.seq, loaded.key_id), (3, None));
        let keyed = SavedHead {
            key_id: Some("0123456789abcdef".into()),
            ..head(4)
        };
        save(&live, &keyed, Durability::Written).expect("save");
        assert_eq!(load(&live), Some(keyed));
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
            format!(
                r#"{{"seq":3,"ts":"2026-01-01T00:00:00.000Z","hash":"{hash}","key_id":"the key itself"}}"#
            ),
            " ".repeat(5000),
        ] {
            std::fs::write(&path, &text).expect("write");
            assert_eq!(load(&live), None, "{text}");
        }
    }
}
