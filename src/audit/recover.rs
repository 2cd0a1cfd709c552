//! Start-up recovery of the chain (DESIGN.md §3, "Restarts"): find the last complete
//! record — in the live file, or, when the live file holds none, in the newest rotated
//! sibling or the head saved at the last rotation or clean shutdown (see `saved_head`) —
//! so that `seq` and `prev` continue from it, and cut a torn last line (a crash
//! mid-write) with a warning.
//!
//! Only what a crash can leave is cut: the start of the next record or the blanks of a
//! write test cut short (`torn::classify_unterminated_tail`, which `audit verify` uses
//! too). Any other bytes after the last newline make start-up refuse, naming the file and the offset: they are
//! evidence, not the gateway's to destroy. A rotated file is never torn by a crash with
//! `fsync: always` (its records were fsynced before the rename), so there it is refused
//! too.
//!
//! Recovery only reads the tail of files; it never loads a whole file.

use std::fs::{File, OpenOptions, Permissions};
use std::io;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::Deserialize;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use super::chain::{self, ChainHasher, GENESIS};
use super::path::AuditPath;
use super::record::format_ts;
use super::saved_head::{self, Durability, SavedHead};
use super::segment::{open_regular, rotated_siblings, sync_dir};
use super::torn::{classify_unterminated_tail, TornTail};
use super::writer::AuditError;
use super::Fsync;

/// A record longer than this is not one the writer produced.
const MAX_RECORD: u64 = 1 << 20;
const CHUNK: u64 = 64 * 1024;

/// Where the chain continues.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ChainHead {
    pub(crate) next_seq: u64,
    pub(crate) prev: String,
    pub(crate) last_ts: Option<OffsetDateTime>,
    /// The last record's hashed bytes (`None` for a new chain), to check `prev` against
    /// the configured key.
    pub(crate) last_body: Option<Vec<u8>>,
}

/// What recovery needs besides the files: how the chain is hashed (to tell the configured
/// key from the one a saved head was made with), and whether the previous run fsynced
/// records before a rotation renamed their file (assumed to be this run's setting).
pub(crate) struct StartUp<'a> {
    pub(crate) hasher: &'a ChainHasher,
    pub(crate) fsync: Fsync,
}

impl ChainHead {
    fn genesis() -> Self {
        ChainHead {
            next_seq: 1,
            prev: GENESIS.to_string(),
            last_ts: None,
            last_body: None,
        }
    }
}

/// How far ahead of this host's clock the last record's `ts` may be and still be carried
/// over: the writer keeps `ts` non-decreasing from it, which absorbs a restart on a clock
/// slightly behind (NTP not yet synced). A `ts` further ahead came from a wrong clock (a
/// bad boot clock) or an altered line, and carried over it would pin every later
/// record's `ts` to it, across restarts.
const MAX_TS_AHEAD: time::Duration = time::Duration::minutes(1);

/// Repairs the live file's tail and returns where the chain continues.
pub(crate) fn recover(live: &AuditPath, how: &StartUp<'_>) -> Result<ChainHead, AuditError> {
    let head = find_head(live, how)?;
    Ok(without_future_ts(
        head,
        OffsetDateTime::now_utc(),
        live.as_path(),
    ))
}

/// Drops the head's `ts` when it is more than [`MAX_TS_AHEAD`] ahead of `now`.
fn without_future_ts(mut head: ChainHead, now: OffsetDateTime, live: &Path) -> ChainHead {
    let too_far = |ts: &OffsetDateTime| {
        now.checked_add(MAX_TS_AHEAD)
            .is_some_and(|limit| *ts > limit)
    };
    if let Some(ts) = head.last_ts.filter(too_far) {
        tracing::warn!(
            path = %live.display(),
            seq = head.next_seq - 1,
            ts = format_ts(ts).as_str(),
            "the last audit record's ts is more than a minute ahead of this host's clock (a wrong clock when it was written, or an altered record); later records are not held to it"
        );
        head.last_ts = None;
    }
    head
}

/// Finds the last record the chain continues from and repairs the live file's tail. The
/// head comes first: whether a tail is the start of the next record depends on its seq.
fn find_head(live: &AuditPath, how: &StartUp<'_>) -> Result<ChainHead, AuditError> {
    let io_err = |op: &'static str| {
        move |source: io::Error| AuditError::Io {
            op,
            path: live.to_path_buf(),
            source,
        }
    };
    let file = match open_regular(&read_write(), live.as_path()) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return beyond_live_file(live, how, LiveFile::Missing)
        }
        Err(e) => return Err(io_err("open")(e)),
    };
    enforce_owner_only(&file, live.as_path()).map_err(io_err("set mode 0600 on"))?;
    let ending = Ending::of(&file).map_err(io_err("read"))?;
    let head = if ending.kept > 0 {
        head_from_line(&file, ending.kept, live.as_path())?
    } else {
        beyond_live_file(live, how, LiveFile::Empty)?
    };
    cut_torn_tail(&file, live.as_path(), &ending, head.next_seq)?;
    Ok(head)
}

fn read_write() -> OpenOptions {
    let mut opts = OpenOptions::new();
    opts.read(true).write(true);
    opts
}

/// The contract wants mode 0600 for the audit log; a file of it (or its lock file)
/// created by hand or by an older version with a wider mode is narrowed rather than
/// refused, with a warning.
pub(crate) fn enforce_owner_only(file: &File, path: &Path) -> io::Result<()> {
    let mode = file.metadata()?.permissions().mode() & 0o777;
    if mode != 0o600 {
        tracing::warn!(path = %path.display(), mode = format!("{mode:o}"), "audit file had a mode other than 0600; setting 0600");
        file.set_permissions(Permissions::from_mode(0o600))?;
    }
    Ok(())
}

/// Where a file's last complete line ends, and its length.
struct Ending {
    /// The length up to and including the last newline (0 when there is none).
    kept: u64,
    len: u64,
}

impl Ending {
    fn of(file: &File) -> io::Result<Ending> {
        let len = file.metadata()?.len();
        let kept = if len == 0 || last_byte(file, len)? == b'\n' {
            len
        } else {
            newline_before(file, len, 0)?.unwrap_or(0)
        };
        Ok(Ending { kept, len })
    }

    /// Bytes follow the last newline.
    fn is_torn(&self) -> bool {
        self.kept < self.len
    }

    /// The bytes after the last newline; `None` when they are more than a record can be.
    fn tail(&self, file: &File) -> io::Result<Option<Vec<u8>>> {
        let tail_len = self.len - self.kept;
        if tail_len > MAX_RECORD {
            return Ok(None);
        }
        // At most MAX_RECORD (1 MiB): fits in usize on every target.
        let mut tail = vec![0u8; usize::try_from(tail_len).unwrap_or(0)];
        file.read_exact_at(&mut tail, self.kept)?;
        Ok(Some(tail))
    }
}

/// Cuts what follows the last newline of `file` when a crash can have left it there (the
/// beginning of record `next_seq`, or the blanks of the writer's write test; see
/// [`classify_unterminated_tail`]), with a warning; refuses anything else: those bytes
/// were put there by someone, and they are evidence the gateway must not destroy.
fn cut_torn_tail(
    file: &File,
    path: &Path,
    ending: &Ending,
    next_seq: u64,
) -> Result<(), AuditError> {
    if !ending.is_torn() {
        return Ok(());
    }
    let io_err = |op| {
        move |source| AuditError::Io {
            op,
            path: path.to_path_buf(),
            source,
        }
    };
    let kind = match ending.tail(file).map_err(io_err("read"))? {
        Some(tail) => classify_unterminated_tail(&tail, next_seq),
        None => TornTail::NotARecordPrefix {
            why: "longer than any record (1 MiB)".to_owned(),
        },
    };
    let cut_bytes = ending.len - ending.kept;
    match kind {
        TornTail::NotARecordPrefix { why } => {
            return Err(unexpected_tail(path, ending, next_seq, &why))
        }
        TornTail::Plausible => tracing::warn!(
            path = %path.display(),
            cut_bytes,
            "audit log ended with a torn record (crash mid-write); cutting it off"
        ),
        TornTail::WriteTestBlanks => tracing::warn!(
            path = %path.display(),
            cut_bytes,
            "audit log ended with the blanks of a write test cut short (a crash while the writer tested the disk); cutting them off"
        ),
    }
    file.set_len(ending.kept).map_err(io_err("repair"))?;
    file.sync_all().map_err(io_err("repair"))
}

/// The refusal of a tail that no crash leaves, naming where it starts.
fn unexpected_tail(path: &Path, ending: &Ending, next_seq: u64, why: &str) -> AuditError {
    let (bytes, offset) = (ending.len - ending.kept, ending.kept);
    corrupt(
        path,
        &format!("its last {bytes} bytes, from byte offset {offset}, have no newline and are not the start of record seq {next_seq}, all that a crash mid-write leaves ({why}); inspect them"),
    )
}

fn last_byte(file: &File, len: u64) -> io::Result<u8> {
    let mut b = [0u8; 1];
    file.read_exact_at(&mut b, len - 1)?;
    Ok(b[0])
}

/// Position just after the last `\n` in `file[floor..end]`, scanning backwards.
fn newline_before(file: &File, end: u64, floor: u64) -> io::Result<Option<u64>> {
    let mut buf = vec![0u8; CHUNK as usize];
    let mut hi = end;
    while hi > floor {
        let lo = hi.saturating_sub(CHUNK).max(floor);
        let n = (hi - lo) as usize;
        file.read_exact_at(&mut buf[..n], lo)?;
        if let Some(i) = buf[..n].iter().rposition(|&b| b == b'\n') {
            return Ok(Some(lo + i as u64 + 1));
        }
        hi = lo;
    }
    Ok(None)
}

/// Parses the complete line that ends (with its newline) at `end`.
fn head_from_line(file: &File, end: u64, path: &Path) -> Result<ChainHead, AuditError> {
    let io_err = |source| AuditError::Io {
        op: "read",
        path: path.to_path_buf(),
        source,
    };
    let line_end = end - 1; // exclude the newline
    let floor = line_end.saturating_sub(MAX_RECORD);
    let start = match newline_before(file, line_end, floor).map_err(io_err)? {
        Some(s) => s,
        None if floor == 0 => 0,
        None => return Err(corrupt(path, "its last line is longer than 1 MiB")),
    };
    let mut line = vec![0u8; (line_end - start) as usize];
    file.read_exact_at(&mut line, start).map_err(io_err)?;
    parse_head(&line).map_err(|why| corrupt(path, why))
}

#[derive(Deserialize)]
struct Tail {
    seq: u64,
    ts: String,
}

fn parse_head(line: &[u8]) -> Result<ChainHead, &'static str> {
    let (body, hash) =
        chain::unseal(line).ok_or("its last line does not end with a hash member")?;
    let tail: Tail =
        serde_json::from_slice(line).map_err(|_| "its last line is not a valid audit record")?;
    if tail.seq == 0 {
        return Err("its last record has seq 0");
    }
    // No seq can follow u64::MAX: refuse rather than repeat it or overflow.
    let next_seq = tail
        .seq
        .checked_add(1)
        .ok_or("its last record has the largest possible seq")?;
    Ok(ChainHead {
        next_seq,
        prev: hash.to_string(),
        last_ts: parse_ts(&tail.ts),
        last_body: Some(body),
    })
}

/// A record's `ts`, kept in UTC as the writer's clock floor; a valid RFC 3339 time that
/// UTC cannot represent (9999-12-31T23:59:59-01:00) is ignored rather than left to panic
/// in `format_ts`.
fn parse_ts(ts: &str) -> Option<OffsetDateTime> {
    OffsetDateTime::parse(ts, &Rfc3339)
        .ok()
        .and_then(|t| t.checked_to_offset(time::UtcOffset::UTC))
}

fn corrupt(path: &Path, why: &str) -> AuditError {
    AuditError::Corrupt {
        path: path.to_path_buf(),
        detail: why.to_string(),
    }
}

/// The live file holds no record: the chain continues after the newest rotated file's
/// last record or after the saved head, whichever is later. The saved head is what is
/// left when the newest files were moved off the host; it never wins over a record
/// actually in a file. With neither, this is a new log.
fn beyond_live_file(
    live: &AuditPath,
    how: &StartUp<'_>,
    live_file: LiveFile,
) -> Result<ChainHead, AuditError> {
    let siblings = rotated_siblings(live).map_err(|source| AuditError::Io {
        op: "list the directory of",
        path: live.to_path_buf(),
        source,
    })?;
    // The newest rotated file is named for its last record when it was rotated, the one
    // the saved head holds. A crash may have torn that record since (`fsync: never`):
    // then the cut files are still the truth and the chain continues before the lost
    // record, as for the live file; the saved head is for records whose file is gone.
    let newest_name = siblings.first().map(|(seq, _)| *seq).unwrap_or(0);
    let in_files = from_rotated(live, siblings, how)?;
    let saved = saved_head::load(live);
    match (in_files, saved) {
        (Some(files), Some(saved)) if saved.seq > newest_name.max(files.next_seq - 1) => {
            continue_from_saved(live, saved, Some(files.next_seq - 1), how, live_file)
        }
        (None, Some(saved)) => continue_from_saved(live, saved, None, how, live_file),
        (Some(files), saved) => {
            resave(live, &files, saved.as_ref(), how.hasher);
            Ok(files)
        }
        (None, None) => Ok(ChainHead::genesis()),
    }
}

/// Where the chain continues when only the saved head knows its last record. Operators
/// learn that the files on the host no longer hold it. When the head was made with
/// another key than the configured one, the old chain was archived for a key change (the
/// README's procedure): continued under the new key it would take seqs the archive
/// already holds, so a new chain starts at seq 1. A head of unknown key (saved by an
/// older version) is continued from, as before.
///
/// A head marked as followed by records, with the live file gone too, means every file
/// was moved away after a run that did not stop cleanly (a clean stop saves the exact
/// head): the records after the head are elsewhere, and continuing would give the next
/// records their seqs, a fork `audit verify` reports as broken. Start-up refuses that and
/// says how to go on. An empty live file instead is what a power loss leaves with
/// `fsync: never` (those records are lost, not moved): the chain continues, as before.
fn continue_from_saved(
    live: &AuditPath,
    saved: SavedHead,
    newest_in_files: Option<u64>,
    how: &StartUp<'_>,
    live_file: LiveFile,
) -> Result<ChainHead, AuditError> {
    let configured = saved_head::key_id(how.hasher);
    if saved
        .key_id
        .as_ref()
        .is_some_and(|made_with| *made_with != configured)
    {
        tracing::warn!(
            path = %live.saved_head().display(),
            old_chain_last_seq = saved.seq,
            newest_seq_in_files = newest_in_files,
            "the audit key (audit.hmac_key) changed and no audit file holds the old chain's last record (its files were moved away): starting a new chain at seq 1"
        );
        return Ok(ChainHead::genesis());
    }
    if saved.records_may_follow && live_file == LiveFile::Missing {
        return Err(corrupt(
            &live.saved_head(),
            &format!(
                "records were written after seq {} (the head saved there), and no audit file here holds them: the files were moved away after a run that did not stop cleanly. Put them back (the chain then continues after their last record), or move this head file away as well to start a new chain at seq 1",
                saved.seq
            ),
        ));
    }
    tracing::warn!(
        path = %live.saved_head().display(),
        seq = saved.seq,
        newest_seq_in_files = newest_in_files,
        "no audit file holds the chain's last record (files moved away?); continuing after it from the head saved at the last rotation or shutdown"
    );
    Ok(head_from_saved(saved))
}

/// The state of the live file when the chain's last record is not in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LiveFile {
    /// No file at `audit.path`: moved away or removed.
    Missing,
    /// A file with no complete record: a new file, or one a power loss emptied.
    Empty,
}

/// Where a saved head continues the chain. Its record is not at hand, so the key check
/// at open (`continues_under`) has nothing to check.
fn head_from_saved(saved: SavedHead) -> ChainHead {
    ChainHead {
        // `saved_head::load` refuses seq u64::MAX.
        next_seq: saved.seq.saturating_add(1),
        last_ts: parse_ts(&saved.ts),
        prev: saved.hash,
        last_body: None,
    }
}

/// Saves the head found in a rotated file when the saved one differs (missing, damaged,
/// older, written by a version without it or without a key id, restored from a backup),
/// so that it is there when the rotated files are moved away before the next rotation.
/// Its key id is the configured key's only when the record verifies under it. Best
/// effort: the chain is intact on disk either way.
fn resave(live: &AuditPath, head: &ChainHead, saved: Option<&SavedHead>, hasher: &ChainHasher) {
    let current = SavedHead {
        seq: head.next_seq - 1,
        ts: format_ts(head.last_ts.unwrap_or(OffsetDateTime::UNIX_EPOCH))
            .as_str()
            .to_owned(),
        hash: head.prev.clone(),
        key_id: continues_under(head, hasher).then(|| saved_head::key_id(hasher)),
        records_may_follow: false,
    };
    if saved == Some(&current) {
        return;
    }
    if let Err(e) = saved_head::save(live, &current, Durability::Synced) {
        tracing::warn!(path = %live.saved_head().display(), error = %e, "cannot save the audit chain head; the chain continues, but if the rotated files are moved away before the next rotation, a restart starts a new chain");
    }
}

/// Whether the record the chain continues from verifies under `hasher` (trivially, for a
/// new chain or a saved head, whose record is not at hand).
pub(crate) fn continues_under(head: &ChainHead, hasher: &ChainHasher) -> bool {
    head.last_body
        .as_ref()
        .is_none_or(|body| hasher.digest(body).as_str() == head.prev)
}

/// The head in the newest of `siblings` (newest first) that holds a complete record.
fn from_rotated(
    live: &AuditPath,
    siblings: Vec<(u64, PathBuf)>,
    how: &StartUp<'_>,
) -> Result<Option<ChainHead>, AuditError> {
    for (named, path) in siblings {
        if let Some(head) = last_of_rotated(live, named, &path, how.fsync)? {
            return Ok(Some(head));
        }
    }
    Ok(None)
}

/// The chain head in the rotated file `path` (named for seq `named`), `None` when it
/// holds no complete record. Read-only unless its tail is torn: ops may make rotated
/// files read-only (`chmod 0400`, `chattr +i`), and that must not stop start-up when
/// there is nothing to repair.
fn last_of_rotated(
    live: &AuditPath,
    named: u64,
    path: &Path,
    fsync: Fsync,
) -> Result<Option<ChainHead>, AuditError> {
    let io_err = |op| {
        move |source| AuditError::Io {
            op,
            path: path.to_path_buf(),
            source,
        }
    };
    let file = open_regular(OpenOptions::new().read(true), path).map_err(io_err("read"))?;
    let len = file.metadata().map_err(io_err("read"))?.len();
    if len == 0 {
        // With `fsync: never` a power loss soon after a rotation can keep the file's
        // name (the new live file's creation synced the directory) but none of its
        // data. It is passed over like a file torn down to nothing, and removed like
        // one: left, `audit verify` would report its records missing for ever, although
        // the chain continues right after the file before it.
        tracing::warn!(
            path = %path.display(),
            named_seq = named,
            "a rotated audit file is empty: its records never reached the disk (power loss after an `fsync: never` rotation?); removing it, the chain continues from the file before it"
        );
        std::fs::remove_file(path).map_err(io_err("remove"))?;
        return Ok(None);
    }
    let ending = Ending::of(&file).map_err(io_err("read"))?;
    if !ending.is_torn() {
        return head_from_line(&file, len, path).map(Some);
    }
    // With `fsync: always` every record of a rotated file was fsynced before the rename:
    // no crash tears it, so the tail is not the gateway's to cut.
    if fsync == Fsync::Always {
        return Err(AuditError::TornRotatedFile {
            path: path.to_path_buf(),
            offset: ending.kept,
        });
    }
    // With `fsync: never` a file is not synced before it is rotated, so a crash can
    // leave the newest rotated file with a torn tail: it is cut like the live file's,
    // or `audit verify` would find a torn line in the middle of the set. The torn record
    // follows the last complete one; in a file holding only it, it is the one the file
    // is named for.
    let head = match ending.kept {
        0 => None,
        kept => Some(head_from_line(&file, kept, path)?),
    };
    let torn_seq = head.as_ref().map_or(named, |head| head.next_seq);
    let file = open_for_repair(path).map_err(io_err("repair"))?;
    cut_torn_tail(&file, path, &ending, torn_seq)?;
    let Some(head) = head else {
        // It never held a record; left empty, its name could block a rotation.
        std::fs::remove_file(path).map_err(io_err("remove"))?;
        return Ok(None);
    };
    name_after_last_record(live, path, named, head.next_seq.saturating_sub(1))?;
    Ok(Some(head))
}

/// A rotated file is named for its last record, and `audit verify` checks that. Cutting
/// a torn tail removed that record, so the file is renamed for the last record kept:
/// otherwise verify would report records missing at its end for ever, although the
/// live file continues right after it. An existing file of that name is never replaced.
fn name_after_last_record(
    live: &AuditPath,
    path: &Path,
    named: u64,
    last: u64,
) -> Result<(), AuditError> {
    // A name below its last record was not made by the writer: not ours to hide.
    if last >= named {
        return Ok(());
    }
    let target = live.rotated(last);
    let io_err = |op| {
        move |source| AuditError::Io {
            op,
            path: path.to_path_buf(),
            source,
        }
    };
    match target.symlink_metadata() {
        Ok(_) => {
            tracing::warn!(
                path = %path.display(),
                target = %target.display(),
                records_lost = named - last,
                "a rotated audit file lost its last records (torn tail cut), but the name for its last complete record is taken; keeping its name, so `audit verify` reports records missing at its end"
            );
            return Ok(());
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err("inspect the new name of")(e)),
    }
    // The cut is already synced (`cut_torn_tail`); the directory makes the name durable.
    std::fs::rename(path, &target).map_err(io_err("rename"))?;
    sync_dir(live.dir()).map_err(io_err("sync the directory of"))?;
    tracing::warn!(
        path = %path.display(),
        renamed_to = %target.display(),
        records_lost = named - last,
        "a rotated audit file lost its last records in a crash (torn tail cut); renamed for its last complete record"
    );
    Ok(())
}

#[cfg(test)]
thread_local! {
    /// Rotated files opened for writing by this thread: lets tests running as root (whom
    /// mode bits do not stop) see that a file without a torn tail is only read.
    static REPAIR_OPENS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Opens a rotated file for cutting its torn tail.
fn open_for_repair(path: &Path) -> io::Result<File> {
    #[cfg(test)]
    REPAIR_OPENS.with(|n| n.set(n.get() + 1));
    open_regular(&read_write(), path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::writer::PROBE_BYTES;
    use std::cell::Cell;
    use std::io::Write;

    /// Recovery of an unkeyed log written with `fsync: never`.
    fn recover_never(live: &AuditPath) -> Result<ChainHead, AuditError> {
        recover_as(live, Fsync::Never, &ChainHasher::Plain)
    }

    fn recover_as(
        live: &AuditPath,
        fsync: Fsync,
        hasher: &ChainHasher,
    ) -> Result<ChainHead, AuditError> {
        recover(live, &StartUp { hasher, fsync })
    }

    /// `audit.jsonl` in `dir`.
    fn live_in(dir: &Path) -> AuditPath {
        AuditPath::try_from(dir.join("audit.jsonl")).expect("valid")
    }

    fn sealed(seq: u64, prev: &str) -> (String, String) {
        let body = format!(r#"{{"seq":{seq},"ts":"2026-01-01T00:00:00.000Z","prev":"{prev}"}}"#);
        let h = chain::ChainHasher::Plain.digest_hex(body.as_bytes());
        let mut out = Vec::new();
        chain::seal_into(body.as_bytes(), &h, &mut out);
        (String::from_utf8(out).unwrap_or_default(), h)
    }

    #[test]
    fn missing_file_and_no_siblings_is_genesis() {
        let dir = tempfile::tempdir().expect("tempdir");
        let head = recover_never(&live_in(dir.path())).expect("recover");
        assert_eq!(head, ChainHead::genesis());
    }

    #[test]
    fn torn_tail_is_cut_and_chain_continues_from_last_complete() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = live_in(dir.path());
        let (l1, _) = sealed(1, GENESIS);
        let (l2, h2) = sealed(2, "a");
        let mut f = std::fs::File::create(&path).expect("create");
        write!(f, "{l1}{l2}{{\"seq\":3,\"ts\":\"20").expect("write");
        drop(f);
        let head = recover_never(&path).expect("recover");
        assert_eq!(head.next_seq, 3);
        assert_eq!(head.prev, h2);
        assert!(head.last_ts.is_some());
        let text = std::fs::read_to_string(&path).expect("read");
        assert_eq!(text, format!("{l1}{l2}"));
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[test]
    fn empty_live_file_continues_from_newest_rotated_sibling() {
        let dir = tempfile::tempdir().expect("tempdir");
        let live = live_in(dir.path());
        let (l1, _) = sealed(1, GENESIS);
        let (l7, h7) = sealed(7, "b");
        std::fs::write(dir.path().join("audit.jsonl.00000000000000000001"), &l1).expect("w");
        std::fs::write(dir.path().join("audit.jsonl.00000000000000000007"), &l7).expect("w");
        std::fs::write(&live, r#"{"seq":8,"ts":"2026-01-01T"#).expect("w");
        let head = recover_never(&live).expect("recover");
        assert_eq!(head.next_seq, 8);
        assert_eq!(head.prev, h7);
        assert_eq!(std::fs::metadata(&live).expect("meta").len(), 0);
    }

    /// `fsync: never` does not sync a file before rotating it: after a crash the newest
    /// rotated files may end torn, each named (as the writer names them) for the seq of
    /// its torn last record. A tail is cut, the file renamed for its last complete record
    /// and the chain continues after it; a rotated file that holds only a torn line is
    /// removed and passed over.
    #[test]
    fn a_torn_newest_rotated_file_is_cut_and_continued_from() {
        let dir = tempfile::tempdir().expect("tempdir");
        let live = live_in(dir.path());
        let (l6, _) = sealed(6, "a");
        let (l7, h7) = sealed(7, "b");
        let older = dir.path().join("audit.jsonl.00000000000000000008");
        let newest = dir.path().join("audit.jsonl.00000000000000000009");
        std::fs::write(&older, format!("{l6}{l7}{{\"seq\":8,\"ts")).expect("w");
        std::fs::write(&newest, "{\"seq\":9,").expect("w");
        let head = recover_never(&live).expect("recover");
        assert_eq!(head.next_seq, 8);
        assert_eq!(head.prev, h7);
        let renamed = dir.path().join("audit.jsonl.00000000000000000007");
        assert_eq!(
            std::fs::read_to_string(&renamed).expect("renamed for seq 7"),
            format!("{l6}{l7}")
        );
        assert!(!older.exists(), "renamed, not copied");
        assert!(
            !newest.exists(),
            "a file that never held a record is removed"
        );
        assert!(REPAIR_OPENS.with(Cell::get) > 0, "the count sees repairs");
    }

    /// The newest rotated files were moved away (shipped), an older one is left: the
    /// chain continues after the saved head, whose record is in no file at hand.
    #[test]
    fn the_saved_head_wins_over_files_named_for_earlier_records() {
        let dir = tempfile::tempdir().expect("tempdir");
        let live = live_in(dir.path());
        let (l7, _) = sealed(7, "b");
        std::fs::write(dir.path().join("audit.jsonl.00000000000000000007"), l7).expect("w");
        let saved = SavedHead {
            seq: 9,
            ts: "2026-01-01T00:00:09.000Z".into(),
            hash: "c".repeat(64),
            key_id: Some("sha256".into()),
            records_may_follow: false,
        };
        saved_head::save(&live, &saved, Durability::Synced).expect("save");
        let head = recover_never(&live).expect("recover");
        assert_eq!(head.next_seq, 10);
        assert_eq!(head.prev, saved.hash);
        assert_eq!(head.last_ts, parse_ts(&saved.ts));
        assert_eq!(head.last_body, None);
    }

    /// A saved head older than the files (restored from a backup, say) never wins over a
    /// record in a file; it is replaced by the files' head.
    #[test]
    fn a_saved_head_older_than_the_files_is_replaced() {
        let dir = tempfile::tempdir().expect("tempdir");
        let live = live_in(dir.path());
        let (l7, h7) = sealed(7, "b");
        std::fs::write(dir.path().join("audit.jsonl.00000000000000000007"), l7).expect("w");
        let stale = SavedHead {
            seq: 5,
            ts: "2026-01-01T00:00:00.000Z".into(),
            hash: "c".repeat(64),
            key_id: None,
            records_may_follow: true,
        };
        saved_head::save(&live, &stale, Durability::Synced).expect("save");
        let head = recover_never(&live).expect("recover");
        assert_eq!(head.next_seq, 8);
        assert_eq!(head.prev, h7);
        let saved = saved_head::load(&live).expect("saved again");
        assert_eq!((saved.seq, saved.hash), (7, h7));
    }

    /// The name for the last complete record may be taken (by hand): it is not replaced,
    /// and the cut file keeps its name.
    #[test]
    fn a_cut_rotated_file_keeps_its_name_when_the_new_one_is_taken() {
        let dir = tempfile::tempdir().expect("tempdir");
        let live = live_in(dir.path());
        let (l7, h7) = sealed(7, "b");
        let cut = dir.path().join("audit.jsonl.00000000000000000008");
        let taken = dir.path().join("audit.jsonl.00000000000000000007");
        std::fs::write(&cut, format!("{l7}{{\"seq\":8,\"ts")).expect("w");
        std::fs::write(&taken, "someone else's\n").expect("w");
        let head = recover_never(&live).expect("recover");
        assert_eq!(head.next_seq, 8);
        assert_eq!(head.prev, h7);
        assert_eq!(std::fs::read_to_string(&cut).expect("kept"), l7);
        assert_eq!(
            std::fs::read_to_string(&taken).expect("untouched"),
            "someone else's\n"
        );
    }

    /// Ops may make rotated files read-only (`chmod 0400`, `chattr +i`): with an empty
    /// live file, start-up only reads the newest one when there is nothing to cut. Run
    /// as a user, opening it for writing fails with EACCES; run as root (whom mode bits
    /// do not stop), the count of write-opens shows it.
    #[test]
    fn a_read_only_rotated_file_is_continued_from_without_opening_it_for_writing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let live = live_in(dir.path());
        let (l6, _) = sealed(6, "a");
        let (l7, h7) = sealed(7, "b");
        let rotated = dir.path().join("audit.jsonl.00000000000000000007");
        std::fs::write(&rotated, format!("{l6}{l7}")).expect("w");
        std::fs::set_permissions(&rotated, Permissions::from_mode(0o400)).expect("chmod");
        std::fs::write(&live, "").expect("w");
        let head = recover_never(&live).expect("recover");
        assert_eq!(head.next_seq, 8);
        assert_eq!(head.prev, h7);
        assert_eq!(REPAIR_OPENS.with(Cell::get), 0, "opened for writing");
    }

    /// The writer keeps `ts` non-decreasing from the recovered one: within a minute of the
    /// clock that is kept, further ahead it would pin every later `ts`, so it is dropped.
    #[test]
    fn a_recovered_ts_far_ahead_of_the_clock_is_dropped() {
        let now = OffsetDateTime::now_utc();
        let head_at = |ts| ChainHead {
            last_ts: Some(ts),
            ..ChainHead::genesis()
        };
        let live = Path::new("audit.jsonl");
        let near = now + time::Duration::seconds(30);
        let far = now + time::Duration::minutes(2);
        assert_eq!(
            without_future_ts(head_at(near), now, live).last_ts,
            Some(near)
        );
        assert_eq!(without_future_ts(head_at(far), now, live).last_ts, None);
        let last = OffsetDateTime::new_utc(time::Date::MAX, time::Time::MIDNIGHT);
        assert_eq!(without_future_ts(head_at(last), now, live).last_ts, None);
    }

    /// Writes `complete` then `tail` to the live file; recovery must refuse, name the file
    /// and the offset where the tail starts, and leave the file as it was.
    fn assert_tail_refused(complete: &str, tail: &[u8], why: &str) {
        let dir = tempfile::tempdir().expect("tempdir");
        let live = live_in(dir.path());
        let content = [complete.as_bytes(), tail].concat();
        std::fs::write(&live, &content).expect("w");
        let err = recover_never(&live).expect_err("must refuse");
        let text = err.to_string();
        assert!(matches!(err, AuditError::Corrupt { .. }), "{text}");
        assert!(text.contains(&live.display().to_string()), "{text}");
        let offset = format!("from byte offset {}", complete.len());
        assert!(text.contains(&offset), "{text}");
        assert!(text.contains(why), "{text}");
        assert!(text.contains("move it aside"), "{text}");
        assert_eq!(std::fs::read(&live).expect("read"), content, "untouched");
    }

    /// Review F4: bytes after the last newline that no crash can leave (junk, a record
    /// start for another seq, a line longer than any record) are refused, not cut.
    #[test]
    fn a_tail_that_is_not_the_next_record_is_refused_and_kept() {
        let (l1, h1) = sealed(1, GENESIS);
        let (l2, _) = sealed(2, &h1);
        let both = format!("{l1}{l2}");
        assert_tail_refused(&both, b"I was never here", "not the start of record seq 3");
        assert_tail_refused(&both, b"{\"seq\":1,\"ts\":\"1999-", "seq 3");
        let huge = [&b"{\"seq\":3,\"ts\":\""[..], &vec![b'A'; 1 << 20]].concat();
        assert_tail_refused(&both, &huge, "longer than any record");
        // A complete record altered and its newline removed.
        assert_tail_refused(
            &l1,
            l2.trim_end().replace("\"seq\":2", "\"seq\":9").as_bytes(),
            "seq 2",
        );
        // With no complete line, the seq comes from the files before it: a new log.
        assert_tail_refused("", b"{\"seq\":5,", "seq 1");
    }

    /// A crash during the writer's disk test leaves some of its blanks: cut, with the
    /// chain continuing from the last record.
    #[test]
    fn the_blanks_of_an_interrupted_probe_are_cut() {
        let dir = tempfile::tempdir().expect("tempdir");
        let live = live_in(dir.path());
        let (l1, h1) = sealed(1, GENESIS);
        std::fs::write(&live, format!("{l1}{}", " ".repeat(PROBE_BYTES))).expect("w");
        let head = recover_never(&live).expect("recover");
        assert_eq!((head.next_seq, head.prev.as_str()), (2, h1.as_str()));
        assert_eq!(std::fs::read_to_string(&live).expect("read"), l1);
        // More blanks than the probe writes are not its.
        std::fs::write(&live, format!("{l1}{}", " ".repeat(PROBE_BYTES + 1))).expect("w");
        recover_never(&live).expect_err("not a probe's");
    }

    /// With `fsync: always` a rotated file's records were fsynced before the rename: a
    /// torn one is refused (and left as it is), whatever the tail.
    #[test]
    fn a_torn_rotated_file_is_refused_with_fsync_always() {
        let dir = tempfile::tempdir().expect("tempdir");
        let live = live_in(dir.path());
        let (l6, _) = sealed(6, "a");
        let (l7, _) = sealed(7, "b");
        let rotated = dir.path().join("audit.jsonl.00000000000000000008");
        let content = format!("{l6}{l7}{{\"seq\":8,\"ts");
        std::fs::write(&rotated, &content).expect("w");
        let err = recover_as(&live, Fsync::Always, &ChainHasher::Plain).expect_err("refused");
        let text = err.to_string();
        assert!(
            matches!(err, AuditError::TornRotatedFile { offset, .. } if offset == (l6.len() + l7.len()) as u64),
            "{text}"
        );
        assert!(text.contains("audit.jsonl.00000000000000000008"), "{text}");
        assert!(text.contains("start once with `fsync: never`"), "{text}");
        assert_eq!(std::fs::read_to_string(&rotated).expect("kept"), content);
        assert_eq!(REPAIR_OPENS.with(Cell::get), 0, "opened for writing");
    }

    /// With `fsync: never` a rotated file is cut only when its tail is the start of the
    /// record after its last complete one.
    #[test]
    fn a_rotated_file_with_a_foreign_tail_is_refused_with_fsync_never() {
        let dir = tempfile::tempdir().expect("tempdir");
        let live = live_in(dir.path());
        let (l7, _) = sealed(7, "b");
        let rotated = dir.path().join("audit.jsonl.00000000000000000008");
        let content = format!("{l7}{{\"seq\":1,\"ts");
        std::fs::write(&rotated, &content).expect("w");
        let err = recover_never(&live).expect_err("refused");
        assert!(err.to_string().contains("seq 8"), "{err}");
        assert_eq!(std::fs::read_to_string(&rotated).expect("kept"), content);
    }

    fn saved_with_key(key_id: Option<&str>) -> SavedHead {
        SavedHead {
            seq: 9,
            ts: "2026-01-01T00:00:09.000Z".into(),
            hash: "c".repeat(64),
            key_id: key_id.map(str::to_owned),
            records_may_follow: false,
        }
    }

    /// Every file moved away after a run that did not stop cleanly: the head saved at the
    /// last rotation was followed by records that are now elsewhere. Without a live file
    /// start-up refuses (continuing would reuse their seqs) and leaves the head in place;
    /// an empty live file (a power loss with `fsync: never`) or an unmarked head (a clean
    /// stop) continues after the head; moving the head away too starts a new chain.
    #[test]
    fn a_head_followed_by_records_that_are_gone_is_not_continued_from() {
        let followed = SavedHead {
            records_may_follow: true,
            ..saved_with_key(Some("sha256"))
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let live = live_in(dir.path());
        saved_head::save(&live, &followed, Durability::Synced).expect("save");
        let err = recover_never(&live).expect_err("refused");
        let text = err.to_string();
        assert!(text.contains(".audit.jsonl.head"), "{text}");
        assert!(text.contains("records were written after seq 9"), "{text}");
        assert!(text.contains("Put them back"), "{text}");
        assert_eq!(
            saved_head::load(&live),
            Some(followed.clone()),
            "left in place"
        );

        std::fs::write(live.as_path(), "").expect("an empty live file");
        assert_eq!(
            recover_never(&live).expect("continued"),
            head_from_saved(followed.clone())
        );

        std::fs::remove_file(live.as_path()).expect("rm");
        let clean = saved_with_key(Some("sha256"));
        saved_head::save(&live, &clean, Durability::Synced).expect("save");
        assert_eq!(
            recover_never(&live).expect("continued"),
            head_from_saved(clean)
        );

        std::fs::remove_file(live.saved_head()).expect("rm head");
        assert_eq!(
            recover_never(&live).expect("new chain"),
            ChainHead::genesis()
        );
    }

    /// Review F2: the old chain's files were moved away. Under the key the saved head
    /// was made with (or an unknown one: an older version's head) the chain continues
    /// after it; under another key a new chain starts at seq 1.
    #[test]
    fn a_saved_head_of_another_key_starts_a_new_chain() {
        let new_key = ChainHasher::new(Some(b"new key".to_vec().into())).expect("key");
        let old_key = ChainHasher::new(Some(b"old key".to_vec().into())).expect("key");
        let old_id = saved_head::key_id(&old_key);
        for (saved_key, hasher, continued) in [
            (Some(old_id.as_str()), &old_key, true),
            (None, &new_key, true),
            (Some(old_id.as_str()), &new_key, false),
            (Some("sha256"), &new_key, false),
            (Some(old_id.as_str()), &ChainHasher::Plain, false),
        ] {
            let dir = tempfile::tempdir().expect("tempdir");
            let live = live_in(dir.path());
            let saved = saved_with_key(saved_key);
            saved_head::save(&live, &saved, Durability::Synced).expect("save");
            let head = recover_as(&live, Fsync::Always, hasher).expect("recover");
            let expected = if continued {
                head_from_saved(saved)
            } else {
                ChainHead::genesis()
            };
            assert_eq!(head, expected, "{saved_key:?}");
        }
    }

    /// A head resaved from the files carries the configured key's id only when the last
    /// record verifies under it.
    #[test]
    fn a_resaved_head_names_the_key_only_when_the_record_verifies_under_it() {
        let keyed = ChainHasher::new(Some(b"k".to_vec().into())).expect("key");
        for (hasher, key_id) in [
            (&ChainHasher::Plain, Some("sha256".to_owned())),
            (&keyed, None),
        ] {
            let dir = tempfile::tempdir().expect("tempdir");
            let live = live_in(dir.path());
            let (l7, _) = sealed(7, "b");
            std::fs::write(dir.path().join("audit.jsonl.00000000000000000007"), l7).expect("w");
            recover_as(&live, Fsync::Always, hasher).expect("recover");
            let saved = saved_head::load(&live).expect("resaved");
            assert_eq!((saved.seq, saved.key_id), (7, key_id));
        }
    }

    #[test]
    fn corrupt_last_record_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let live = live_in(dir.path());
        std::fs::write(&live, "not json at all\n").expect("w");
        let err = recover_never(&live).expect_err("must refuse");
        assert!(err.to_string().contains("audit.jsonl"), "{err}");
    }
}
