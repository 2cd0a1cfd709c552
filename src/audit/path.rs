//! [`AuditPath`]: config's `audit.path`, known to name a file, and the names of the files
//! the writer keeps beside it. Every sibling's name is made here, from the live file's
//! name, so the writer, recovery and the operator tools agree on them; log shippers and
//! the tests find them by these names, so they never change:
//!
//! - `<name>.<last seq, 20 digits>`: a rotated file, named for its last record (so the
//!   rotated files start with the live file's name and sort by seq as plain strings);
//! - `.<name>.lock`: the lock one writer holds (see `writer`);
//! - `.<name>.head`, and `.<name>.head.tmp` while it is replaced: the chain head saved
//!   at the last rotation or clean shutdown (see `saved_head`).
//!
//! The dot files are skipped by `audit verify DIR` and `audit query DIR`.

use std::fmt;
use std::path::{Path, PathBuf};

/// Number of digits of the seq suffix of a rotated file.
pub(crate) const ROTATED_DIGITS: usize = 20;

/// The live audit file. Unlike a bare [`Path`] it always has a file name, which the
/// names of its siblings are made from; [`Path::file_name`] would also find a name in
/// `logs/` or `logs/.`, which name a directory.
#[derive(Clone, PartialEq, Eq)]
pub struct AuditPath {
    path: PathBuf,
    /// The last component of `path`: UTF-8, since the path comes from YAML.
    name: String,
    /// The directory holding the file (`.` for a bare file name).
    dir: PathBuf,
}

/// Why a path cannot be the audit log's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidAuditPath {
    #[error("must not be empty")]
    Empty,
    #[error("must name a file; {path:?} names a directory (it ends in '/', '.' or '..')")]
    NotAFile { path: PathBuf },
    #[error("must be valid UTF-8: {path:?}")]
    NotUtf8 { path: PathBuf },
}

impl TryFrom<PathBuf> for AuditPath {
    type Error = InvalidAuditPath;

    fn try_from(path: PathBuf) -> Result<AuditPath, InvalidAuditPath> {
        let Some(text) = path.to_str() else {
            return Err(InvalidAuditPath::NotUtf8 { path });
        };
        if text.is_empty() {
            return Err(InvalidAuditPath::Empty);
        }
        // The text after the last `/`, not `Path::file_name`, which looks through a
        // trailing `/` or `.` to the directory's own name.
        let name = text.rsplit_once('/').map_or(text, |(_, name)| name);
        if matches!(name, "" | "." | "..") {
            return Err(InvalidAuditPath::NotAFile { path });
        }
        let name = name.to_owned();
        let dir = match path.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
            _ => PathBuf::from("."),
        };
        Ok(AuditPath { path, name, dir })
    }
}

impl TryFrom<&Path> for AuditPath {
    type Error = InvalidAuditPath;

    fn try_from(path: &Path) -> Result<AuditPath, InvalidAuditPath> {
        AuditPath::try_from(path.to_path_buf())
    }
}

impl AuditPath {
    pub fn as_path(&self) -> &Path {
        &self.path
    }

    pub fn to_path_buf(&self) -> PathBuf {
        self.path.clone()
    }

    pub fn display(&self) -> std::path::Display<'_> {
        self.path.display()
    }

    /// The live file's name, which every sibling's name starts from.
    pub fn file_name(&self) -> &str {
        &self.name
    }

    /// The directory holding the live file and its siblings (`.` for a bare file name).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where the live file goes when it is rotated after the record `last_seq`.
    pub(crate) fn rotated(&self, last_seq: u64) -> PathBuf {
        self.sibling(&format!(
            "{}.{last_seq:0width$}",
            self.name,
            width = ROTATED_DIGITS
        ))
    }

    /// The lock file one writer holds.
    pub(crate) fn lock_file(&self) -> PathBuf {
        self.sibling(&format!(".{}.lock", self.name))
    }

    /// The chain head saved at the last rotation or clean shutdown.
    pub(crate) fn saved_head(&self) -> PathBuf {
        self.sibling(&format!(".{}.head", self.name))
    }

    /// The saved head's next version, before it is renamed over the old one.
    pub(crate) fn saved_head_temp(&self) -> PathBuf {
        self.sibling(&format!(".{}.head.tmp", self.name))
    }

    fn sibling(&self, name: &str) -> PathBuf {
        self.path.with_file_name(name)
    }
}

// Just the path: the name and directory are derived from it.
impl fmt::Debug for AuditPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("AuditPath").field(&self.path).finish()
    }
}

impl AsRef<Path> for AuditPath {
    fn as_ref(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn audit_path(text: &str) -> Result<AuditPath, InvalidAuditPath> {
        AuditPath::try_from(PathBuf::from(text))
    }

    /// External tooling and the tests find the siblings by these exact names.
    #[test]
    fn siblings_keep_their_names() {
        let live = audit_path("/x/audit.jsonl").expect("valid");
        assert_eq!(live.file_name(), "audit.jsonl");
        assert_eq!(live.dir(), Path::new("/x"));
        assert_eq!(
            live.rotated(9),
            Path::new("/x/audit.jsonl.00000000000000000009")
        );
        assert!(live.rotated(9) < live.rotated(10), "sorted by seq");
        assert_eq!(live.lock_file(), Path::new("/x/.audit.jsonl.lock"));
        assert_eq!(live.saved_head(), Path::new("/x/.audit.jsonl.head"));
        assert_eq!(
            live.saved_head_temp(),
            Path::new("/x/.audit.jsonl.head.tmp")
        );
    }

    #[test]
    fn a_bare_file_name_lives_in_the_current_directory() {
        let live = audit_path("audit.jsonl").expect("valid");
        assert_eq!(live.dir(), Path::new("."));
        assert_eq!(live.lock_file(), Path::new(".audit.jsonl.lock"));
    }

    #[test]
    fn a_path_that_names_no_file_is_refused() {
        assert_eq!(audit_path(""), Err(InvalidAuditPath::Empty));
        for text in [
            "/",
            "logs/",
            "/var/log/mpc/",
            ".",
            "logs/.",
            "..",
            "logs/..",
        ] {
            assert_eq!(
                audit_path(text),
                Err(InvalidAuditPath::NotAFile {
                    path: PathBuf::from(text)
                }),
                "{text}"
            );
        }
    }

    #[test]
    fn a_path_that_is_not_utf8_is_refused() {
        use std::os::unix::ffi::OsStrExt as _;
        let path = PathBuf::from(std::ffi::OsStr::from_bytes(b"/x/audit-\xff.jsonl"));
        assert_eq!(
            AuditPath::try_from(path.clone()),
            Err(InvalidAuditPath::NotUtf8 { path })
        );
    }
}
