//! Reading audit files for the operator tools (`audit verify`, `audit query`): expanding
//! PATH arguments, ordering files by the seq of their first record, and streaming lines
//! with a length cap so that an enormous line never has to fit in memory.
//!
//! Each file is opened once, while listing, and read through that handle: the gateway may
//! rotate (rename) the live file or retention may delete an old one while a tool runs,
//! and an open handle still reads the whole file, whatever its name has become.
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

/// One audit file as listed: the handle opened while listing, and the path it had then
/// (for messages).
#[derive(Debug)]
pub(crate) struct AuditFile {
    pub(crate) path: PathBuf,
    /// The seq in the name of a rotated file (`<live name>.<20 digits>`), which must be
    /// the seq of its last record.
    pub(crate) name_seq: Option<u64>,
    file: File,
}

impl AuditFile {
    fn open(path: &Path) -> Result<Self, SourceError> {
        let file = File::open(path).map_err(|e| SourceError::io(path, "open", &e))?;
        let name_seq = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(segment::any_rotated_seq);
        Ok(AuditFile {
            path: path.to_path_buf(),
            name_seq,
            file,
        })
    }

    /// Device and inode: the identity of the file whatever name it was listed under.
    fn identity(&self) -> Result<(u64, u64), SourceError> {
        let meta = self
            .file
            .metadata()
            .map_err(|e| SourceError::io(&self.path, "stat", &e))?;
        Ok((meta.dev(), meta.ino()))
    }
}

/// Expands files and directories into the audit files to read, ordered by the seq of
/// their first record; files without a readable first record (empty, torn) go last.
pub(crate) fn collect(paths: &[PathBuf]) -> Result<Vec<AuditFile>, SourceError> {
    let mut files = Vec::new();
    for path in paths {
        let meta = std::fs::metadata(path).map_err(|e| SourceError::io(path, "open", &e))?;
        if meta.is_dir() {
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
    let mut seen = std::collections::HashSet::new();
    let mut keyed = Vec::with_capacity(files.len());
    for path in files {
        let file = AuditFile::open(&path)?;
        // The same file named twice (`dir` and `dir/audit.jsonl`, or a name it had
        // while the directory was listed and its new one) is read once.
        if !seen.insert(file.identity()?) {
            continue;
        }
        let key = first_seq(&file)?;
        keyed.push((key.is_none(), key.unwrap_or(0), file));
    }
    keyed.sort_by(|a, b| (a.0, a.1, &a.2.path).cmp(&(b.0, b.1, &b.2.path)));
    Ok(keyed.into_iter().map(|(_, _, f)| f).collect())
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
fn first_seq(file: &AuditFile) -> Result<Option<u64>, SourceError> {
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
    /// Reads `file` from its start, through the handle opened while listing.
    pub(crate) fn open(file: &AuditFile) -> Result<Self, SourceError> {
        let path = &file.path;
        let mut file = file
            .file
            .try_clone()
            .map_err(|e| SourceError::io(path, "open", &e))?;
        // The clone shares the offset, which listing moved past the first line.
        file.seek(SeekFrom::Start(0))
            .map_err(|e| SourceError::io(path, "read", &e))?;
        Ok(LineReader {
            path: path.to_path_buf(),
            reader: BufReader::with_capacity(READ_BUFFER, file),
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
    fn directories_expand_to_jsonl_files_ordered_by_first_seq() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        std::fs::write(d.join("audit.jsonl"), "{\"seq\":5}\n").expect("w");
        std::fs::write(d.join("audit.jsonl.00000000000000000004"), "{\"seq\":1}\n").expect("w");
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
        assert_eq!(names, ["audit.jsonl.00000000000000000004", "audit.jsonl"]);
        let twice = collect(&[d.to_path_buf(), d.join("audit.jsonl")]).expect("collect");
        assert_eq!(twice.len(), 2, "a file named twice is read once");
        let err = collect(&[d.join("missing")]).expect_err("missing");
        assert!(err.to_string().contains("missing"), "{err}");
    }
}
