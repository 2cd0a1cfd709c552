//! `mpc-gateway audit verify PATH...` (DESIGN.md §4, issue 3): proves that nothing was
//! removed from or altered in an audit log, or names the first record where it was.
//!
//! Checks per record: valid UTF-8 JSON object, exactly the contract members in the
//! contract order with the right types, the hash recomputed from the raw line bytes (the
//! final `,"hash":"<64 hex>"}` replaced by `}`; nothing is re-serialized), `prev` equal
//! to the previous record's `hash`, and `seq` continuing by one. Per rotated file (named
//! `<live name>.<20 digits>`): it holds records, and the last one has the seq in its
//! name, which catches records cut from its end and renamed files. Files are read as a
//! stream in chain order: rotated files by the seq in their name, others by the seq of
//! their first record (see the `source` module for that and for how directories are
//! expanded).
//!
//! Exit codes: 0 chain intact; 1 tampering or a broken chain (file, line and what broke
//! go to stdout), also when no record's hash matches while every link holds, with a key
//! (the key may be wrong) or without one (the log may be keyed): a whole rewritten log
//! looks the same, so it must not pass as a usage error; 2 usage or I/O error; 3 intact
//! except a torn final line of the last file: a prefix of the next record, as a crash
//! mid-write leaves (see the `torn` module), or a whole record that lost only its
//! newline and still verifies. A set without any record is intact (a live file right
//! after start-up) with a warning on stderr.
//!
//! The set must start at seq 1 with a `prev` of 64 zeros: a set starting later has lost
//! its oldest records, which is tampering unless retention pruned them. For that case
//! `--from-seq N` says where the kept records start: the first record must then have seq
//! N exactly, its link to the pruned record before it is not checked, and the summary
//! says so.
//!
//! Two files holding records of the same seqs (a stray copy such as `audit.jsonl.bak`
//! beside the rotated file it copies) are reported naming the file that is not a rotated
//! file, with the other one, rather than as a seq gap in the untouched rotated file.

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use secrecy::SecretSlice;
use serde::de::{Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::Value;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use super::chain::{self, ChainHasher, GENESIS};
use super::record::MEMBERS;
use super::source::{self, AuditFile, Line, LineReader, SourceError};
use super::torn::{self, TornTail};
use crate::config::secret::ValueSource;

/// Arguments of `mpc-gateway audit verify`.
#[derive(clap::Args, Debug)]
pub struct VerifyArgs {
    /// Audit files, or directories whose files with `.jsonl` in their name are checked
    /// (the live file and its rotated siblings).
    #[arg(required = true, value_name = "PATH")]
    pub paths: Vec<PathBuf>,
    /// Environment variable holding the HMAC key of a keyed log (used as-is, like the
    /// `{env: NAME}` form of `audit.hmac_key`).
    #[arg(long, value_name = "NAME", conflicts_with = "hmac_key_file")]
    pub hmac_key_env: Option<String>,
    /// File holding the HMAC key of a keyed log (surrounding whitespace trimmed, like the
    /// `{file: PATH}` form of `audit.hmac_key`): keeps the key out of the environment.
    #[arg(long, value_name = "PATH")]
    pub hmac_key_file: Option<PathBuf>,
    /// The seq the set must start at. 1 (the default) checks the whole chain from its
    /// first record; after retention pruned the oldest files, pass the first kept seq
    /// (the seq in the name of the last pruned rotated file + 1): the first record must
    /// have exactly that seq, and its link to the pruned record before it is not checked.
    #[arg(
        long,
        value_name = "SEQ",
        default_value_t = 1,
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    pub from_seq: u64,
}

/// Runs `audit verify`, printing the verdict, and returns the process exit code.
pub fn run_verify(args: &VerifyArgs) -> ExitCode {
    let report = execute(args);
    // Output errors (a closed pipe) cannot change the verdict; the exit code carries it.
    if !report.stdout.is_empty() {
        let _ = crate::cli::write_stdout(&report.stdout);
    }
    if !report.stderr.is_empty() {
        crate::cli::write_stderr(&report.stderr);
    }
    ExitCode::from(report.code)
}

/// What `run_verify` prints and returns; separate so tests can look at it.
#[derive(Debug)]
pub(crate) struct Report {
    pub(crate) code: u8,
    pub(crate) stdout: String,
    pub(crate) stderr: String,
}

pub(crate) fn execute(args: &VerifyArgs) -> Report {
    let key = match (&args.hmac_key_env, &args.hmac_key_file) {
        (Some(name), _) => key_from_env(name),
        (None, Some(path)) => key_from_file(path),
        (None, None) => Ok(ChainHasher::Plain),
    };
    let hasher = match key {
        Ok(h) => h,
        Err(msg) => return usage(msg),
    };
    let files = match source::collect(&args.paths) {
        Ok(f) => f,
        Err(e) => return usage(e.to_string()),
    };
    match verify_files(&files, &hasher, args.from_seq) {
        Ok(verdict) => render(&verdict),
        Err(e) => usage(e.to_string()),
    }
}

fn usage(msg: String) -> Report {
    Report {
        code: 2,
        stdout: String::new(),
        stderr: format!("audit verify: {msg}\n"),
    }
}

/// Names the variable as the config loader does: not if it looks like a pasted secret.
fn key_from_env(name: &str) -> Result<ChainHasher, String> {
    let shown = crate::config::secret::shown_env_name(name);
    let value: OsString = std::env::var_os(name)
        .ok_or_else(|| format!("environment variable {shown} (--hmac-key-env) is not set"))?;
    let bytes = value.into_vec();
    if bytes.is_empty() {
        return Err(format!(
            "environment variable {shown} (--hmac-key-env) is empty"
        ));
    }
    ChainHasher::new(Some(SecretSlice::from(bytes)))
        .map_err(|err| format!("environment variable {shown} (--hmac-key-env): {err}"))
}

/// The path was typed on the command line, so errors name it (config errors do not).
fn key_from_file(path: &Path) -> Result<ChainHasher, String> {
    let named = |err: &dyn std::fmt::Display| format!("--hmac-key-file {}: {err}", path.display());
    let key = crate::config::resolve_key(&ValueSource::File(path.to_path_buf()))
        .map_err(|err| named(&err))?;
    ChainHasher::new(Some(key)).map_err(|err| named(&err))
}

/// A place in the set of files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Location {
    pub(crate) file: PathBuf,
    /// Counts from 1; 0 stands for the file as a whole.
    pub(crate) line: u64,
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Line 0 stands for the file as a whole (a file that holds no records).
        match self.line {
            0 => write!(f, "{}", self.file.display()),
            line => write!(f, "{}:{line}", self.file.display()),
        }
    }
}

const ALTERED: &str = "hash mismatch: the record was altered";

/// The outcome of a verification.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    Intact {
        records: u64,
        files: usize,
        first_seq: Option<u64>,
    },
    Torn {
        records: u64,
        files: usize,
        at: Location,
        why: String,
    },
    Broken {
        at: Location,
        what: String,
    },
    /// No key given, and no record's hash matches plain SHA-256 while every link holds:
    /// altered, or HMAC-keyed. Exit 1 like `Broken`.
    KeyProblem {
        at: Location,
        what: String,
    },
}

fn render(v: &Verdict) -> Report {
    let (code, stdout, stderr) = match v {
        Verdict::Intact {
            records,
            files,
            first_seq,
        } => {
            let mut out = format!("verified {records} records in {files} files, chain intact");
            // Only with `--from-seq`: a set starting after seq 1 is broken otherwise.
            if let Some(s) = first_seq.filter(|s| *s > 1) {
                out.push_str(&format!(
                    " from seq {s} (--from-seq {s}: its link to the pruned records before it was not checked)"
                ));
            }
            out.push('\n');
            // Right after start-up a live file is legitimately empty; anything else
            // with no records deserves a look, so say it rather than fail.
            let warn = if *records == 0 {
                "audit verify: warning: no records in the given files, nothing to verify\n".into()
            } else {
                String::new()
            };
            (0, out, warn)
        }
        Verdict::Torn {
            records,
            files,
            at,
            why,
        } => (
            3,
            format!("{at}: torn final line ({why}): an incomplete write, e.g. a crash mid-write, not tampering; the {records} records before it in {files} files verify, chain intact\n"),
            String::new(),
        ),
        Verdict::Broken { at, what } => (1, format!("{at}: {what}\nchain broken\n"), String::new()),
        // Altered or keyed: the verifier cannot tell, so it fails closed.
        Verdict::KeyProblem { at, what } => (1, format!("{at}: {what}\nchain broken\n"), String::new()),
    };
    Report {
        code,
        stdout,
        stderr,
    }
}

/// Verifies `files` (already in chain order) as one chain starting at seq `from_seq`.
pub(crate) fn verify_files(
    files: &[AuditFile],
    hasher: &ChainHasher,
    from_seq: u64,
) -> Result<Verdict, SourceError> {
    let mut chain = Chain::new(hasher, from_seq);
    for (i, file) in files.iter().enumerate() {
        let may_be_torn = may_end_torn(&files[i..]);
        let records_before = chain.records;
        chain.begin_file(file);
        let mut last_line = 0;
        let mut lines = LineReader::open(file)?;
        while let Some(line) = lines.next_line()? {
            last_line = line.no;
            let at = Location {
                file: file.path.clone(),
                line: line.no,
            };
            let parsed = parse_line(&line);
            let terminated = line.terminated;
            // The last line of the file (at most 1 MiB), kept for `fragment`.
            let unterminated = (!terminated).then(|| Fragment {
                bytes: line.bytes.to_vec(),
                too_long: line.too_long,
            });
            let crash_tail = !terminated && may_be_torn && lines.at_eof()?;
            let verdict = match parsed {
                Ok(rec) if terminated => chain.push(at, rec),
                // A crash that lost only the newline leaves the whole record, which
                // recovery cuts too; its hash and link still hold, as a crash cannot
                // alter bytes it wrote.
                Ok(rec) if crash_tail => Some(chain.unterminated(at, rec, files.len())),
                Ok(_) => Some(Verdict::Broken {
                    at,
                    what: NO_NEWLINE.into(),
                }),
                // A crash mid-write leaves a final line without its newline (start-up
                // recovery cuts exactly that), if it is the beginning of the next
                // record; a complete line that is not a record is not a crash artefact.
                Err(Bad::Unreadable(_)) if crash_tail => {
                    unterminated.map(|tail| chain.fragment(at, &tail, files.len()))
                }
                Err(Bad::Unreadable(what) | Bad::Invalid(what)) => {
                    Some(Verdict::Broken { at, what })
                }
            };
            if let Some(v) = verdict {
                return Ok(v);
            }
        }
        let held_records = chain.records > records_before;
        if let Some(v) = chain.check_name(file, held_records, last_line) {
            return Ok(v);
        }
        chain.end_file();
    }
    Ok(chain.finish(files.len()))
}

/// Whether the first of `rest` (the files from it to the end, in chain order) may end
/// in a torn line: the live file may, when a crash cut its last write. A rotated file
/// was complete when it was renamed, so a torn line in it is tampering, except in the
/// newest one while the live file after it is still empty: with `fsync: never` a power
/// loss right after a rotation can take the renamed file's tail (README; `serve` cuts
/// it at start). A rotated file checked alone keeps its stricter reading.
fn may_end_torn(rest: &[AuditFile]) -> bool {
    match rest {
        [only] => only.name_seq.is_none(),
        [rotated, live] => rotated.name_seq.is_some() && live.is_empty_live_file(),
        _ => false,
    }
}

/// A final line without its newline.
struct Fragment {
    bytes: Vec<u8>,
    /// Longer than 1 MiB (`bytes` is then empty).
    too_long: bool,
}

/// What a final line without its newline is called: one a crash may leave, or (in a
/// rotated file, or followed by more bytes) one it may not.
const NO_NEWLINE: &str = "malformed: no newline at the end of the line";

/// Why a line is not a record.
enum Bad {
    /// Cannot be read as a record at all (what a torn write leaves behind).
    Unreadable(String),
    /// Reads as JSON but is not a well-formed record (never the result of a torn write).
    Invalid(String),
}

/// A line that is a well-formed record.
struct Parsed {
    seq: u64,
    prev: String,
    /// The hashed bytes: the line with its hash member replaced by `}`.
    body: Vec<u8>,
    claimed: String,
}

fn parse_line(line: &Line<'_>) -> Result<Parsed, Bad> {
    if line.too_long {
        return Err(Bad::Unreadable("malformed: line longer than 1 MiB".into()));
    }
    let text = std::str::from_utf8(line.bytes)
        .map_err(|_| Bad::Unreadable("malformed: not valid UTF-8".into()))?;
    let members = serde_json::from_str::<Members>(text)
        .map_err(|e| Bad::Unreadable(format!("malformed JSON: {e}")))?;
    let (seq, prev) = check_members(&members.0).map_err(Bad::Invalid)?;
    let (body, claimed) = chain::unseal(line.bytes).ok_or_else(|| {
        Bad::Invalid("the line does not end with the hash member in canonical form".into())
    })?;
    Ok(Parsed {
        seq,
        prev,
        body,
        claimed: claimed.to_string(),
    })
}

/// A JSON object's members in document order (serde_json's own map would sort them).
struct Members(Vec<(String, Value)>);

impl<'de> Deserialize<'de> for Members {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct InOrder;
        impl<'de> Visitor<'de> for InOrder {
            type Value = Members;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Members, A::Error> {
                let mut out = Vec::with_capacity(MEMBERS.len());
                while let Some(entry) = map.next_entry::<String, Value>()? {
                    out.push(entry);
                }
                Ok(Members(out))
            }
        }
        d.deserialize_map(InOrder)
    }
}

/// Checks member names, order and types; returns `seq` and `prev`.
fn check_members(members: &[(String, Value)]) -> Result<(u64, String), String> {
    check_names(members)?;
    let mut seq = 0;
    let mut prev = String::new();
    for (name, value) in members {
        check_type(name, value)?;
        match name.as_str() {
            "seq" => seq = value.as_u64().unwrap_or(0),
            "prev" => prev = value.as_str().unwrap_or_default().to_string(),
            _ => {}
        }
    }
    Ok((seq, prev))
}

fn check_names(members: &[(String, Value)]) -> Result<(), String> {
    let names = members.iter().map(|(n, _)| n.as_str());
    let Some((i, (found, expected))) = names
        .map(Some)
        .chain(std::iter::repeat(None))
        .zip(
            MEMBERS
                .iter()
                .copied()
                .map(Some)
                .chain(std::iter::repeat(None)),
        )
        .take(members.len().max(MEMBERS.len()))
        .enumerate()
        .find(|(_, (f, e))| f != e)
    else {
        return Ok(());
    };
    Err(match (found, expected) {
        (None, Some(e)) => format!("wrong members: missing member `{e}`"),
        (Some(f), None) => format!("wrong members: unexpected member `{f}` after `hash`"),
        (Some(f), Some(_)) if !MEMBERS.contains(&f) => {
            format!("wrong members: unexpected member `{f}`")
        }
        (Some(f), Some(e)) => format!(
            "wrong member order: member {} is `{f}`, expected `{e}`",
            i + 1
        ),
        (None, None) => String::from("wrong members"),
    })
}

fn check_type(name: &str, v: &Value) -> Result<(), String> {
    let ok = match name {
        "seq" => v.as_u64().is_some_and(|s| s >= 1),
        "ts" => v
            .as_str()
            .is_some_and(|s| OffsetDateTime::parse(s, &Rfc3339).is_ok()),
        "event" => matches!(v.as_str(), Some("denied" | "forward" | "result")),
        "request_id" | "method" | "path" => v.is_string(),
        "status" | "upstream_status" => v.is_null() || v.as_u64().is_some_and(|n| n <= 65_535),
        "attempts" => v.is_null() || v.as_u64().is_some_and(|n| n <= u64::from(u32::MAX)),
        "duration_ms" => v.is_null() || v.is_u64(),
        "prev" | "hash" => v.as_str().is_some_and(chain::is_hash_hex),
        _ => v.is_null() || v.is_string(),
    };
    if ok {
        Ok(())
    } else {
        Err(format!(
            "malformed record: member `{name}` has a wrong type or value"
        ))
    }
}

/// The seqs one file held, for naming both files when another file holds them too.
struct Span {
    path: PathBuf,
    rotated: bool,
    first: u64,
    last: u64,
}

/// The file being read: where it is and the seq of its first record, once read.
struct Current {
    path: PathBuf,
    rotated: bool,
    first: Option<u64>,
}

/// The running state of the chain across files.
struct Chain<'h> {
    hasher: &'h ChainHasher,
    /// The seq the set must start at (`--from-seq`).
    from_seq: u64,
    records: u64,
    first_seq: Option<u64>,
    last: Option<(u64, String)>,
    /// Files read so far that held records, and the one being read.
    spans: Vec<Span>,
    current: Option<Current>,
    /// The first record's hash did not match. Tampering, or a key problem? The rest of
    /// the set decides: one matching hash makes it tampering; a broken link is reported
    /// where it is, with the hint; see `unresolved_suspect` for when every hash fails
    /// while every link holds.
    suspect: Option<(Location, Vec<u8>, String)>,
}

impl<'h> Chain<'h> {
    fn new(hasher: &'h ChainHasher, from_seq: u64) -> Self {
        Chain {
            hasher,
            from_seq,
            records: 0,
            first_seq: None,
            last: None,
            spans: Vec::new(),
            current: None,
            suspect: None,
        }
    }

    fn begin_file(&mut self, file: &AuditFile) {
        self.current = Some(Current {
            path: file.path.clone(),
            rotated: file.name_seq.is_some(),
            first: None,
        });
    }

    fn end_file(&mut self) {
        let Some(current) = self.current.take() else {
            return;
        };
        if let (Some(first), Some((last, _))) = (current.first, &self.last) {
            self.spans.push(Span {
                path: current.path,
                rotated: current.rotated,
                first,
                last: *last,
            });
        }
    }

    /// Adds one record; `Some` when the verification ends here.
    fn push(&mut self, at: Location, rec: Parsed) -> Option<Verdict> {
        if let Some(overlap) = self.overlap(&at, rec.seq) {
            return Some(overlap);
        }
        let hash_ok = self.hasher.digest_hex(&rec.body) == rec.claimed;
        let mut problems = self.link_problems(&rec);
        if let Some(suspect) = &self.suspect {
            // One matching hash shows that the hash mode is right: then the first
            // record's mismatch is an alteration.
            if hash_ok {
                return Some(Verdict::Broken {
                    at: suspect.0.clone(),
                    what: ALTERED.into(),
                });
            }
            // A broken link is a break wherever the hashes stand, and it is here: every
            // hash so far failed alike, as under a missing or wrong key, so the first
            // record is not known to be altered.
            if !problems.is_empty() {
                problems.push(self.no_hash_matches_since(&suspect.0));
            }
        } else if !hash_ok {
            if self.records == 0 && problems.is_empty() {
                self.suspect = Some((at.clone(), rec.body.clone(), rec.claimed.clone()));
            } else if self.records == 0 {
                // Nothing before it shows whether the hash mode is right.
                problems.push(format!(
                    "its hash does not match either: it was altered, or {}",
                    self.hash_mode_cause()
                ));
            } else {
                problems.insert(0, ALTERED.into());
            }
        }
        if !problems.is_empty() {
            return Some(Verdict::Broken {
                at,
                what: problems.join("; "),
            });
        }
        self.records += 1;
        self.first_seq.get_or_insert(rec.seq);
        if let Some(current) = &mut self.current {
            current.first.get_or_insert(rec.seq);
        }
        self.last = Some((rec.seq, rec.claimed));
        None
    }

    /// The first record of a file going back to a seq an earlier file held: two files
    /// hold records of the same seqs. A rotated file's name is the writer's, so when the
    /// other one is not a rotated file, that one is the stray (a copy such as
    /// `audit.jsonl.bak`, which sorts before the rotated file it copies): it is named
    /// at the record, and the rotated file beside it. Otherwise the report is here, and
    /// names the other file.
    fn overlap(&self, at: &Location, seq: u64) -> Option<Verdict> {
        let current = self.current.as_ref().filter(|c| c.first.is_none())?;
        let (last, _) = self.last.as_ref().filter(|(last, _)| seq <= *last)?;
        let held = self
            .spans
            .iter()
            .rev()
            .find(|span| span.first <= seq && seq <= span.last)?;
        let name = |path: &Path| {
            path.file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned()
        };
        let held_at = Location {
            file: held.path.clone(),
            line: seq - held.first + 1,
        };
        let stray_hint = "a stray copy? Move it out of the verified files";
        if current.rotated && !held.rotated {
            return Some(Verdict::Broken {
                at: held_at,
                what: format!(
                    "records {seq} to {} are also in rotated file {}: this file is not a rotated file and not part of the chain ({stray_hint})",
                    held.last,
                    name(&current.path)
                ),
            });
        }
        Some(Verdict::Broken {
            at: at.clone(),
            what: format!(
                "seq {seq} again after seq {last}: records from seq {seq} on are also in {held_at}; two files hold records of the same seqs ({stray_hint})"
            ),
        })
    }

    fn link_problems(&self, rec: &Parsed) -> Vec<String> {
        let mut problems = Vec::new();
        match &self.last {
            None => problems.extend(self.start_problem(rec)),
            Some((seq, hash)) => {
                let expected = seq.saturating_add(1);
                if rec.seq != expected {
                    problems.push(format!(
                        "seq gap: expected seq {expected}, found {}",
                        rec.seq
                    ));
                }
                if rec.prev != *hash {
                    problems
                        .push("broken link: prev is not the hash of the previous record".into());
                }
            }
        }
        problems
    }

    /// What is wrong with the first record of the set, if anything: it must have the
    /// seq the set starts at (`--from-seq`, 1 by default), and seq 1 links to 64 zeros.
    /// After `--from-seq N` above 1 its `prev` is not checked: it is the hash of a record
    /// retention pruned.
    fn start_problem(&self, rec: &Parsed) -> Option<String> {
        let (seq, from) = (rec.seq, self.from_seq);
        match seq.cmp(&from) {
            std::cmp::Ordering::Equal if from == 1 && rec.prev != GENESIS => Some(
                "broken link: the first record (seq 1) must have a prev of 64 zeros".into(),
            ),
            std::cmp::Ordering::Equal => None,
            std::cmp::Ordering::Greater => {
                let missing = if seq - 1 == from {
                    format!("record {from} is")
                } else {
                    format!("records {from} to {} are", seq - 1)
                };
                Some(if from == 1 {
                    format!("records missing: the chain starts at seq {seq}, not 1: {missing} not in the given files (if retention pruned them, pass --from-seq {seq})")
                } else {
                    format!("records missing: the chain starts at seq {seq}, not at --from-seq {from}: {missing} not in the given files")
                })
            }
            // seq is at least 1, so --from-seq was given.
            std::cmp::Ordering::Less => Some(format!(
                "the chain starts at seq {seq}, before --from-seq {from}: pass --from-seq {seq} to verify it from there"
            )),
        }
    }

    /// Why a hash may fail other than by an alteration: the hash mode.
    fn hash_mode_cause(&self) -> &'static str {
        if self.hasher.is_keyed() {
            "this log is not keyed with the given key"
        } else {
            "this log is HMAC-keyed (pass --hmac-key-env NAME or --hmac-key-file PATH)"
        }
    }

    /// The hint for a broken link found while every hash, from the first record's on,
    /// has failed: the hash mode may be what is wrong, or all of those records were
    /// altered too.
    fn no_hash_matches_since(&self, first: &Location) -> String {
        format!(
            "hash mismatch, as for every record from {first} on: either {}, or all of them were altered too",
            self.hash_mode_cause()
        )
    }

    /// What to say when no record verifies under the given key while every link holds.
    fn keyed_hint(body: &[u8], claimed: &str) -> String {
        if ChainHasher::Plain.digest_hex(body) == claimed {
            // Also what a forger without the key would make: a consistent plain chain.
            return "no record verifies with the given key, but plain SHA-256 matches: this log is not HMAC-keyed: either it was written without audit.hmac_key (then run without a key), or it was rewritten by someone without the key; if the gateway had hmac_key set when it wrote these records, that is tampering".into();
        }
        "no record verifies with the given key while every link holds: every record was rewritten, or the HMAC key is wrong (the log may be keyed with another key)".into()
    }

    /// A rotated file's name says the seq of its last record: a mismatch means records
    /// were cut from its end (which the chain alone cannot see when nothing follows) or
    /// files were renamed. A rotated file is never empty: the writer renames it only
    /// after a record took it to `rotate_bytes`.
    fn check_name(&self, file: &AuditFile, held_records: bool, last_line: u64) -> Option<Verdict> {
        let named = file.name_seq?;
        let name = file.path.file_name().unwrap_or_default().to_string_lossy();
        let last = self
            .last
            .as_ref()
            .map(|(seq, _)| *seq)
            .filter(|_| held_records);
        let Some(last) = last else {
            return Some(Verdict::Broken {
                at: Location {
                    file: file.path.clone(),
                    line: 0,
                },
                what: format!("records missing: rotated file {name} holds no records, its name says seq {named}"),
            });
        };
        let what = match last.cmp(&named) {
            std::cmp::Ordering::Equal => return None,
            std::cmp::Ordering::Less => format!(
                "records missing at the end of {name}: its name says seq {named}, its last record is {last}"
            ),
            std::cmp::Ordering::Greater => format!(
                "rotated file {name} was renamed: its name says seq {named}, its last record is {last}"
            ),
        };
        Some(Verdict::Broken {
            at: Location {
                file: file.path.clone(),
                line: last_line,
            },
            what,
        })
    }

    /// A torn final line: exit 3 only if all before it holds.
    /// A whole record without its newline at the very end of the live file: torn (a
    /// crash can lose just the last byte of a write) if its hash and link hold, and
    /// start-up recovery cuts it, so the chain stops before it; altered if they do not,
    /// since a crash cannot change the bytes it did write.
    fn unterminated(&mut self, at: Location, rec: Parsed, files: usize) -> Verdict {
        let records = self.records;
        if let Some(broken) = self.push(at.clone(), rec) {
            return broken;
        }
        self.records = records;
        self.torn(at, "a whole record without its newline".into(), files)
    }

    /// A final line without its newline that is not a whole record: torn (exit 3, if
    /// all before it holds) only if it is the beginning of the next record, as a crash
    /// mid-write leaves; anything else there was not left by a crash (exit 1).
    fn fragment(&mut self, at: Location, line: &Fragment, files: usize) -> Verdict {
        let next = match &self.last {
            Some((seq, _)) => seq.checked_add(1),
            None => Some(self.from_seq),
        };
        let class = match next {
            _ if line.too_long => TornTail::NotARecordPrefix {
                why: "longer than 1 MiB, the most a record can take".into(),
            },
            None => TornTail::NotARecordPrefix {
                why: "no record can follow the largest possible seq".into(),
            },
            Some(next) => torn::classify_unterminated_tail(&line.bytes, next),
        };
        match class {
            TornTail::Plausible => self.torn(at, "a partial record".into(), files),
            TornTail::WriteTestBlanks => self.torn(
                at,
                "the blanks of the writer's disk write test, cut short by a crash".into(),
                files,
            ),
            TornTail::NotARecordPrefix { why } => Verdict::Broken {
                at,
                what: format!(
                    "the final line is not a partial record: {why}; it has no newline, but a crash mid-write leaves only the beginning of the next record there"
                ),
            },
        }
    }

    fn torn(&mut self, at: Location, why: String, files: usize) -> Verdict {
        if let Some(v) = self.unresolved_suspect() {
            return v;
        }
        Verdict::Torn {
            records: self.records,
            files,
            at,
            why,
        }
    }

    fn finish(mut self, files: usize) -> Verdict {
        if let Some(v) = self.unresolved_suspect() {
            return v;
        }
        Verdict::Intact {
            records: self.records,
            files,
            first_seq: self.first_seq,
        }
    }

    /// Every hash of the set failed while every link held. With a key given that is a
    /// broken chain (exit 1), with the hint that the key may be wrong: a forger who
    /// rewrote the whole log, with any key or none, must not get away with a usage
    /// error. Without a key it is a keyed log checked without its key, or a log whose
    /// every record was edited (links untouched): the verifier cannot tell them apart,
    /// so it fails closed (exit 1) and says both, however many records there are.
    fn unresolved_suspect(&mut self) -> Option<Verdict> {
        let (at, body, claimed) = self.suspect.take()?;
        if self.hasher.is_keyed() {
            return Some(Verdict::Broken {
                at,
                what: format!("hash mismatch: {}", Self::keyed_hint(&body, &claimed)),
            });
        }
        Some(Verdict::KeyProblem {
            at,
            what: "every record's hash fails under plain SHA-256 while every prev link holds: either the records were altered, or the log is HMAC-keyed and needs --hmac-key-env NAME or --hmac-key-file PATH".into(),
        })
    }
}

/// For tests elsewhere in the crate: verify one directory or file set from whatever seq
/// it starts at (as `--from-seq` with the first record's seq). The writer's tests check
/// that the chain continues, also after they removed records on purpose (a live file
/// removed under the writer); `audit verify` itself wants the start (`execute`).
#[cfg(test)]
pub(crate) fn verify_paths(paths: &[&std::path::Path], key: Option<&[u8]>) -> Verdict {
    let hasher = ChainHasher::new(key.map(|k| SecretSlice::from(k.to_vec()))).expect("any key");
    let owned: Vec<PathBuf> = paths.iter().map(|p| p.to_path_buf()).collect();
    let files = source::collect(&owned).expect("collect");
    let from_seq = match files.first() {
        Some(first) => source::first_seq(first).expect("read").unwrap_or(1),
        None => 1,
    };
    verify_files(&files, &hasher, from_seq).expect("verify")
}

#[cfg(test)]
mod tests;
