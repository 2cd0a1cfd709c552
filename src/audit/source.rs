//! Reading audit files for the operator tools (`audit verify`, `audit query`): expanding
//! PATH arguments, ordering files into chain order (see [`Position`]), and streaming
//! lines with a length cap so that an enormous line never has to fit in memory.
//!
//! The gateway may rotate (rename) the live file while a tool runs, and retention may
//! delete old rotated files. So a live file is opened once, while listing, and read
//! through that handle (it reads the whole file whatever its name becomes); directories
//! are then listed again, so that a live file renamed before it was opened is found
//! under its rotated name. Rotated files never change: they are opened when read (a tool
//! keeps one file open at a time, however many there are). One deleted before it is
//! listed is left out, as retention would have left it out a moment earlier; one deleted
//! after that fails the run with "run it again" (files before it may have been read).
//!
//! Directory rule: a directory argument stands for every regular, non-hidden file in it
//! whose name contains `.jsonl` — the live file `audit.jsonl` and its rotated siblings
//! `audit.jsonl.<20-digit seq>`. Logs with other names are passed as files (a shell glob
//! such as `audit.log*` does it).

use std::fmt;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::segment;

/// The longest line the tools accept; longer ones are reported and skipped.
pub(crate) const MAX_LINE: usize = 1 << 20;
const READ_BUFFER: usize = 64 * 1024;

/// A path the tools could not use, with the reason.
#[derive(Debug)]
pub(crate) struct SourceError {
    pub(crate) path: PathBuf,
    pub(crate) what: String,
}

impl fmt::Display for SourceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path.display(), self.what)
    }
}

impl SourceError {
    fn io(path: &Path, op: &str, e: &io::Error) -> Self {
        SourceError {
            path: path.to_path_buf(),
            what: format!("cannot {op}: {e}"),
        }
    }
}

/// One audit file as listed, with the path it had then (for messages).
#[derive(Debug)]
pub(crate) struct AuditFile {
    pub(crate) path: PathBuf,
    /// The seq in the name of a rotated file (`<live name>.<20 digits>`), which must be
    /// the seq of its last record.
    pub(crate) name_seq: Option<u64>,
    /// A live file's handle, opened while listing; a rotated file is opened when read.
    file: Option<File>,
}

impl AuditFile {
    /// A live file (not rotated) that holds no byte.
    pub(crate) fn is_empty_live_file(&self) -> bool {
        self.file
            .as_ref()
            .and_then(|file| file.metadata().ok())
            .is_some_and(|meta| meta.len() == 0)
    }

    /// `None` for a rotated file that is gone (retention deleted it since the listing).
    fn listed(path: &Path) -> Result<Option<Self>, SourceError> {
        let name_seq = rotated_seq(path);
        let file = match name_seq {
            Some(_) => None,
            None => Some(File::open(path).map_err(|e| SourceError::io(path, "open", &e))?),
        };
        let file = AuditFile {
            path: path.to_path_buf(),
            name_seq,
            file,
        };
        match file.identity() {
            Err(e) if file.name_seq.is_some() && e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(SourceError::io(path, "stat", &e)),
            Ok(_) => Ok(Some(file)),
        }
    }

    /// Device and inode: the identity of the file whatever name it was listed under.
    fn identity(&self) -> io::Result<(u64, u64)> {
        let meta = match &self.file {
            Some(file) => file.metadata()?,
            None => std::fs::metadata(&self.path)?,
        };
        Ok((meta.dev(), meta.ino()))
    }

    /// A reader from the file's start: a clone of the live file's handle, or the rotated
    /// file opened now.
    fn reopen(&self) -> Result<File, SourceError> {
        let mut file = match &self.file {
            Some(file) => file
                .try_clone()
                .map_err(|e| SourceError::io(&self.path, "open", &e))?,
            None => File::open(&self.path).map_err(|e| self.rotated_open_error(&e))?,
        };
        // A clone shares the offset, which listing moved past the first line.
        file.seek(SeekFrom::Start(0))
            .map_err(|e| SourceError::io(&self.path, "read", &e))?;
        Ok(file)
    }

    /// Retention deleted a rotated file after the listing, while this run read the files
    /// before it. Leaving it out now would show a gap in a chain that was intact, so the
    /// run fails, saying why and what to do.
    fn rotated_open_error(&self, e: &io::Error) -> SourceError {
        if e.kind() != io::ErrorKind::NotFound {
            return SourceError::io(&self.path, "open", e);
        }
        SourceError {
            path: self.path.clone(),
            what: "deleted while this run was reading the log (retention?); run it again".into(),
        }
    }
}

fn rotated_seq(path: &Path) -> Option<u64> {
    path.file_name()
        .and_then(|n| n.to_str())
        .and_then(segment::any_rotated_seq)
}

/// Expands files and directories into the audit files to read, in chain order (see
/// [`Position`]).
pub(crate) fn collect(paths: &[PathBuf]) -> Result<Vec<AuditFile>, SourceError> {
    let mut files = Vec::new();
    let mut dirs = Vec::new();
    for path in paths {
        let meta = std::fs::metadata(path).map_err(|e| SourceError::io(path, "open", &e))?;
        if meta.is_dir() {
            dirs.push(path);
            let before = files.len();
            files.extend(files_in(path)?);
            if files.len() == before {
                return Err(SourceError {
                    path: path.clone(),
                    what: "directory holds no audit files (names containing .jsonl)".into(),
                });
            }
        } else if meta.is_file() {
            files.push(path.clone());
        } else {
            return Err(SourceError {
                path: path.clone(),
                what: "not a regular file or directory".into(),
            });
        }
    }
    let mut listed = Vec::with_capacity(files.len());
    for path in &files {
        listed.extend(AuditFile::listed(path)?);
    }
    // A live file rotated between the listing and its opening: its records are under a
    // rotated name now, which this second listing finds.
    for dir in dirs {
        for path in files_in(dir)? {
            if rotated_seq(&path).is_some() && !files.contains(&path) {
                listed.extend(AuditFile::listed(&path)?);
            }
        }
    }
    let mut seen = std::collections::HashSet::new();
    let mut keyed = Vec::with_capacity(listed.len());
    for file in listed {
        // The same file named twice (`dir` and `dir/audit.jsonl`, or a name it had
        // while the directory was listed and its new one) is read once.
        let identity = file
            .identity()
            .map_err(|e| SourceError::io(&file.path, "stat", &e))?;
        if !seen.insert(identity) {
            continue;
        }
        keyed.push((Position::of(&file)?, file));
    }
    keyed.sort_by(|a, b| (&a.0, &a.1.path).cmp(&(&b.0, &b.1.path)));
    Ok(keyed.into_iter().map(|(_, f)| f).collect())
}

/// Where a file goes in the chain; files sort by it (then by path).
///
/// A rotated file goes by the seq in its name (that of its last record), never by its
/// content: content is what `audit verify` checks, and a broken first line must be
/// reported in its place rather than move its file to the end, where the files after it
/// would be blamed for a seq gap (and the live file, no longer last, could not have a
/// torn tail). Any other file (the live file, or a log passed under another name) goes
/// by the seq of its first record: after the rotated files named lower, before those
/// named the same or higher; without a readable first record (empty, torn, broken) it
/// goes after every file that has a seq, as the live file right after a crash does.
/// Directories and file arguments are ordered alike: a rotated file keeps its name.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Position {
    /// `rotated` sorts a rotated file after another file starting at its name's seq.
    Seq {
        seq: u64,
        rotated: bool,
    },
    Unknown,
}

impl Position {
    fn of(file: &AuditFile) -> Result<Self, SourceError> {
        if let Some(seq) = file.name_seq {
            return Ok(Position::Seq { seq, rotated: true });
        }
        Ok(match first_seq(file)? {
            Some(seq) => Position::Seq {
                seq,
                rotated: false,
            },
            None => Position::Unknown,
        })
    }
}

fn files_in(dir: &Path) -> Result<Vec<PathBuf>, SourceError> {
    let list_err = |e: io::Error| SourceError::io(dir, "list directory", &e);
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(list_err)? {
        let entry = entry.map_err(list_err)?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') || !name.contains(".jsonl") {
            continue;
        }
        // Follow symlinks like a file argument would.
        let path = entry.path();
        let meta = std::fs::metadata(&path).map_err(|e| SourceError::io(&path, "open", &e))?;
        if meta.is_file() {
            found.push(path);
        }
    }
    Ok(found)
}

#[derive(Deserialize)]
struct SeqOnly {
    seq: u64,
}

/// The seq of the first line, when that line is a readable record.
pub(crate) fn first_seq(file: &AuditFile) -> Result<Option<u64>, SourceError> {
    let mut lines = LineReader::open(file)?;
    Ok(match lines.next_line()? {
        Some(line) if !line.too_long => serde_json::from_slice::<SeqOnly>(line.bytes)
            .ok()
            .map(|s| s.seq),
        _ => None,
    })
}

/// One line as read: its bytes without the newline (empty when it was too long).
pub(crate) struct Line<'a> {
    /// Line number, counting from 1.
    pub(crate) no: u64,
    pub(crate) bytes: &'a [u8],
    /// False for a last line without newline.
    pub(crate) terminated: bool,
    /// The line exceeded [`MAX_LINE`]; its bytes were skipped.
    pub(crate) too_long: bool,
}

/// Streams the lines of one file.
pub(crate) struct LineReader {
    path: PathBuf,
    reader: BufReader<File>,
    buf: Vec<u8>,
    no: u64,
}

impl LineReader {
    /// Reads `file` from its start (a live file through the handle opened while
    /// listing).
    pub(crate) fn open(file: &AuditFile) -> Result<Self, SourceError> {
        Ok(LineReader {
            path: file.path.clone(),
            reader: BufReader::with_capacity(READ_BUFFER, file.reopen()?),
            buf: Vec::new(),
            no: 0,
        })
    }

    /// The next line, or `None` at the end of the file.
    pub(crate) fn next_line(&mut self) -> Result<Option<Line<'_>>, SourceError> {
        self.buf.clear();
        let read = read_capped(&mut self.reader, &mut self.buf, MAX_LINE)
            .map_err(|e| SourceError::io(&self.path, "read", &e))?;
        let Some((terminated, too_long)) = read else {
            return Ok(None);
        };
        self.no += 1;
        Ok(Some(Line {
            no: self.no,
            bytes: &self.buf,
            terminated,
            too_long,
        }))
    }

    /// True when nothing follows the line read last.
    pub(crate) fn at_eof(&mut self) -> Result<bool, SourceError> {
        loop {
            match self.reader.fill_buf() {
                Ok(rest) => return Ok(rest.is_empty()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(SourceError::io(&self.path, "read", &e)),
            }
        }
    }
}

/// Reads one line into `buf` (without its newline), keeping at most `cap` bytes.
/// Returns `(terminated, too_long)`, or `None` at the end of input. A too-long line is
/// consumed to its end but not kept.
fn read_capped(
    r: &mut impl BufRead,
    buf: &mut Vec<u8>,
    cap: usize,
) -> io::Result<Option<(bool, bool)>> {
    let mut too_long = false;
    let mut seen_any = false;
    loop {
        let avail = match r.fill_buf() {
            Ok(a) => a,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if avail.is_empty() {
            return Ok(seen_any.then_some((false, too_long)));
        }
        seen_any = true;
        let newline = avail.iter().position(|&b| b == b'\n');
        let chunk = &avail[..newline.unwrap_or(avail.len())];
        if !too_long && buf.len() + chunk.len() > cap {
            too_long = true;
            buf.clear();
        }
        if !too_long {
            buf.extend_from_slice(chunk);
        }
        let used = chunk.len() + usize::from(newline.is_some());
        r.consume(used);
        if newline.is_some() {
            return Ok(Some((true, too_long)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines_of(input: &[u8], cap: usize) -> Vec<(Vec<u8>, bool, bool)> {
        let mut r = BufReader::with_capacity(4, input);
        let mut out = Vec::new();
        let mut buf = Vec::new();
        while let Ok(Some((t, long))) = read_capped(&mut r, &mut buf, cap) {
            out.push((buf.clone(), t, long));
            buf.clear();
        }
        out
    }

    #[test]
    fn capped_reader_splits_and_flags() {
        let got = lines_of(b"ab\n0123456789\nxyz", 5);
        assert_eq!(
            got,
            vec![
                (b"ab".to_vec(), true, false),
                (Vec::new(), true, true),
                (b"xyz".to_vec(), false, false),
            ]
        );
        assert!(lines_of(b"", 5).is_empty());
        assert_eq!(lines_of(b"\n", 5), vec![(Vec::new(), true, false)]);
    }

    #[test]
    fn directories_expand_to_jsonl_files_in_chain_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        std::fs::write(d.join("audit.jsonl"), "{\"seq\":5}\n").expect("w");
        std::fs::write(d.join("audit.jsonl.00000000000000000004"), "{\"seq\":3}\n").expect("w");
        // Unreadable, yet in its place by its name: verify reports it there.
        std::fs::write(d.join("audit.jsonl.00000000000000000002"), "x\n").expect("w");
        std::fs::write(d.join("notes.txt"), "x").expect("w");
        std::fs::write(d.join(".hidden.jsonl"), "x").expect("w");
        let got = collect(&[d.to_path_buf()]).expect("collect");
        let names: Vec<_> = got
            .iter()
            .filter_map(|f| {
                f.path
                    .file_name()
                    .and_then(|n| n.to_str())
                    .map(String::from)
            })
            .collect();
        assert_eq!(
            names,
            [
                "audit.jsonl.00000000000000000002",
                "audit.jsonl.00000000000000000004",
                "audit.jsonl"
            ]
        );
        let twice = collect(&[d.to_path_buf(), d.join("audit.jsonl")]).expect("collect");
        assert_eq!(twice.len(), 3, "a file named twice is read once");
        let err = collect(&[d.join("missing")]).expect_err("missing");
        assert!(err.to_string().contains("missing"), "{err}");
    }

    /// However many rotated files there are, only live files are held open (a set larger
    /// than the open-file limit must still verify), and a rotated file retention deleted
    /// after the listing is left out rather than failing the run.
    #[test]
    fn only_live_files_are_held_open_and_a_deleted_rotated_file_is_left_out() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        for seq in 1..=3u64 {
            std::fs::write(
                d.join(format!("audit.jsonl.{seq:020}")),
                format!("{{\"seq\":{seq}}}\n"),
            )
            .expect("write");
        }
        std::fs::write(d.join("audit.jsonl"), "{\"seq\":4}\n").expect("write");
        let files = collect(&[d.to_path_buf()]).expect("collect");
        assert_eq!(files.len(), 4);
        for file in &files {
            assert_eq!(
                file.file.is_some(),
                file.name_seq.is_none(),
                "{:?}",
                file.path
            );
        }
        let gone = d.join(format!("audit.jsonl.{:020}", 1));
        assert_eq!(
            AuditFile::listed(&d.join(format!("audit.jsonl.{:020}", 9)))
                .map(|f| f.is_none())
                .ok(),
            Some(true),
            "a rotated name that is gone is left out"
        );
        std::fs::remove_file(&gone).expect("remove");
        assert_eq!(collect(&[d.to_path_buf()]).expect("collect").len(), 3);

        // Deleted after the listing, when the run comes to read it: the run fails and
        // says why, rather than reading on past a gap that is not tampering.
        let listed = collect(&[d.to_path_buf()]).expect("collect");
        std::fs::remove_file(&listed[0].path).expect("remove");
        let err = LineReader::open(&listed[0]).err().expect("gone");
        assert!(err.what.contains("deleted while this run"), "{err}");
    }
}
