//! File-system plumbing of the writer: opening the live file (mode 0600, append-only),
//! the seam that lets tests inject write and fsync failures, directory fsyncs, and
//! finding rotated files by name.
//!
//! Rotated files are named `<live file name>.<last seq, 20 digits>` (made by
//! [`AuditPath::rotated`]), so they start with the live file's name and sort by seq as
//! plain strings.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::path::{AuditPath, ROTATED_DIGITS};

/// The live file as the writer uses it. A trait only so that tests can make writes and
/// fsyncs fail the way a full disk does.
pub(crate) trait LiveFile: Send {
    /// Appends all of `bytes` at the end of the file (the file is opened `O_APPEND`).
    fn append(&mut self, bytes: &[u8]) -> io::Result<()>;
    /// fsync of data and metadata.
    fn sync(&mut self) -> io::Result<()>;
    /// Cuts the file back to `len` bytes.
    fn truncate(&mut self, len: u64) -> io::Result<()>;
    /// `fstat`: which file the handle writes to, and whether it still has a name.
    fn metadata(&self) -> io::Result<std::fs::Metadata>;
}

/// A file's identity (device and inode), whatever its name: tells whether `audit.path`
/// still names the file the writer writes through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FileId {
    dev: u64,
    ino: u64,
}

impl FileId {
    pub(crate) fn of(meta: &std::fs::Metadata) -> Self {
        FileId {
            dev: meta.dev(),
            ino: meta.ino(),
        }
    }
}

/// Opens the live file for the writer; returns the handle, its current length and
/// whether the file was created by this call (then the directory needs an fsync).
pub(crate) trait Opener: Send + Sync {
    fn open(&self, path: &Path) -> io::Result<Opened>;

    /// Makes a file created in `dir` survive a crash.
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        sync_dir(dir)
    }
}

pub(crate) struct Opened {
    pub(crate) file: Box<dyn LiveFile>,
    pub(crate) len: u64,
    pub(crate) created: bool,
}

/// The production opener: a real file.
pub(crate) struct FsOpener;

impl Opener for FsOpener {
    fn open(&self, path: &Path) -> io::Result<Opened> {
        let (file, created) = open_append(path)?;
        let len = file.metadata()?.len();
        Ok(Opened {
            file: Box::new(FsFile(file)),
            len,
            created,
        })
    }
}

struct FsFile(File);

impl LiveFile for FsFile {
    fn append(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.0.write_all(bytes)
    }
    fn sync(&mut self) -> io::Result<()> {
        self.0.sync_all()
    }
    fn truncate(&mut self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }
    fn metadata(&self) -> io::Result<std::fs::Metadata> {
        self.0.metadata()
    }
}

/// Opens `path` for appending with mode 0600, creating it when missing. Tries
/// `create_new` first so that the caller knows whether a directory entry was added.
/// An existing file must be a regular file, not reached through a symbolic link (see
/// [`open_regular`]).
pub(crate) fn open_append(path: &Path) -> io::Result<(File, bool)> {
    let mut opts = OpenOptions::new();
    opts.append(true).mode(0o600);
    // `O_CREAT | O_EXCL` follows no link: a link at `path`, even a dangling one, is
    // "already there" and gets the checks below.
    match opts.clone().create_new(true).open(path) {
        Ok(f) => Ok((f, true)),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            Ok((open_regular(&opts, path)?, false))
        }
        Err(e) => Err(e),
    }
}

/// Opens an audit file (the live file, a rotated file, the lock file, the saved head)
/// with `opts`, only if it is a regular file at `path` itself: never through a symbolic
/// link, which would have the gateway narrow the mode of, cut the tail of, append to or
/// trust whatever file the link names (anyone who can add a name to the audit directory
/// could point one at a file only the gateway's user may write). Checked before the open
/// (for a clear message), by `O_NOFOLLOW` in it (a link swapped in meanwhile fails), and
/// on the opened file; `O_NONBLOCK` keeps a FIFO swapped in meanwhile from blocking the
/// open (on a regular file it changes nothing).
pub(crate) fn open_regular(opts: &OpenOptions, path: &Path) -> io::Result<File> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_file() => return Err(not_regular(&meta)),
        // A missing file is `opts`'s to create or to report.
        Ok(_) | Err(_) => {}
    }
    let mut opts = opts.clone();
    opts.custom_flags(NO_FOLLOW_NO_BLOCK);
    let file = opts.open(path).map_err(|e| {
        if e.raw_os_error() == Some(rustix::io::Errno::LOOP.raw_os_error()) {
            io::Error::new(e.kind(), A_LINK)
        } else {
            e
        }
    })?;
    let meta = file.metadata()?;
    if !meta.file_type().is_file() {
        return Err(not_regular(&meta));
    }
    Ok(file)
}

/// `O_NOFOLLOW | O_NONBLOCK`, as `custom_flags` takes them (both fit in 31 bits).
const NO_FOLLOW_NO_BLOCK: i32 = rustix::fs::OFlags::NOFOLLOW
    .union(rustix::fs::OFlags::NONBLOCK)
    .bits() as i32;

/// Why a symbolic link at an audit file's name is refused, whether found before the open
/// or by `O_NOFOLLOW` in it.
const A_LINK: &str = "it is a symbolic link; audit files are never opened through one";

fn not_regular(meta: &std::fs::Metadata) -> io::Error {
    let what = if meta.file_type().is_symlink() {
        A_LINK
    } else if meta.is_dir() {
        "it is a directory, not a regular file"
    } else {
        "it is not a regular file (a FIFO, socket or device)"
    };
    io::Error::new(io::ErrorKind::InvalidInput, what)
}

/// fsync of a directory, so that a rename or a new file in it survives a crash.
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// The seq in a rotated file's name, when `name` is `<live_name>.<20 digits>`.
pub(crate) fn rotated_seq(live_name: &str, name: &str) -> Option<u64> {
    let digits = name.strip_prefix(live_name)?.strip_prefix('.')?;
    if digits.len() != ROTATED_DIGITS || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The seq in a rotated file's name, whatever the live file is called: the name is
/// `<live name>.<20 digits>`.
pub(crate) fn any_rotated_seq(name: &str) -> Option<u64> {
    let (live_name, _) = name.rsplit_once('.')?;
    if live_name.is_empty() {
        return None;
    }
    rotated_seq(live_name, name)
}

/// Rotated siblings of the live file, newest (highest seq) first.
pub(crate) fn rotated_siblings(live: &AuditPath) -> io::Result<Vec<(u64, PathBuf)>> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(live.dir())? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(seq) = name.to_str().and_then(|n| rotated_seq(live.file_name(), n)) else {
            continue;
        };
        if entry.file_type()?.is_file() {
            found.push((seq, entry.path()));
        }
    }
    found.sort_by_key(|f| std::cmp::Reverse(f.0));
    Ok(found)
}

#[cfg(test)]
pub(crate) mod fault {
    //! Live files whose writes and fsyncs can be made to fail on demand, like a full disk,
    //! or to hang, like a disk that stopped answering.

    use super::*;
    use crate::sync::lock_unpoisoned;
    use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
    use std::sync::Arc;

    /// No fault.
    pub(crate) const NONE: u8 = 0;
    /// `append` writes half of the bytes, then fails with ENOSPC.
    pub(crate) const PARTIAL_WRITE: u8 = 1;
    /// `sync` fails with EIO.
    pub(crate) const SYNC: u8 = 2;
    /// The next fsync of the directory, after a file was created, fails with EIO once.
    pub(crate) const SYNC_DIR_ONCE: u8 = 3;
    /// Opening (or creating) the live file fails with EIO.
    pub(crate) const OPEN: u8 = 4;

    /// The fault to inject, and how many appends (write calls) the file has seen.
    #[derive(Clone, Default)]
    pub(crate) struct Faults {
        mode: Arc<AtomicU8>,
        appends: Arc<AtomicUsize>,
        dir_syncs: Arc<AtomicUsize>,
    }

    impl Faults {
        pub(crate) fn set(&self, mode: u8) {
            self.mode.store(mode, Ordering::SeqCst);
        }
        fn get(&self) -> u8 {
            self.mode.load(Ordering::SeqCst)
        }
        pub(crate) fn appends(&self) -> usize {
            self.appends.load(Ordering::SeqCst)
        }
        /// Starts the count of appends again (after the write test at open, say).
        pub(crate) fn reset_appends(&self) {
            self.appends.store(0, Ordering::SeqCst);
        }
        /// Directory fsyncs asked for after a file was created, failed ones included.
        pub(crate) fn dir_syncs(&self) -> usize {
            self.dir_syncs.load(Ordering::SeqCst)
        }
    }

    pub(crate) struct FaultyOpener(pub(crate) Faults);

    impl Opener for FaultyOpener {
        fn open(&self, path: &Path) -> io::Result<Opened> {
            if self.0.get() == OPEN {
                return Err(io::Error::from_raw_os_error(libc::EIO));
            }
            let (file, created) = open_append(path)?;
            let len = file.metadata()?.len();
            Ok(Opened {
                file: Box::new(FaultyFile(file, self.0.clone())),
                len,
                created,
            })
        }

        fn sync_dir(&self, dir: &Path) -> io::Result<()> {
            self.0.dir_syncs.fetch_add(1, Ordering::SeqCst);
            let once = self.0.mode.compare_exchange(
                SYNC_DIR_ONCE,
                NONE,
                Ordering::SeqCst,
                Ordering::SeqCst,
            );
            if once.is_ok() {
                return Err(io::Error::from_raw_os_error(libc::EIO));
            }
            sync_dir(dir)
        }
    }

    /// A disk that stops answering, on demand: while the gate is closed, a [`Stuck`]
    /// file's `sync` (or `append`) waits.
    #[derive(Clone, Default)]
    pub(crate) struct Gate(Arc<(std::sync::Mutex<bool>, std::sync::Condvar)>);

    /// Opens its gate when dropped, so that a failing test lets go of the threads waiting
    /// at it (a runtime waits for its blocked worker threads when it shuts down).
    pub(crate) struct OpenOnDrop(Gate);

    impl Drop for OpenOnDrop {
        fn drop(&mut self) {
            self.0.open();
        }
    }

    impl Gate {
        /// Closes the gate until [`Gate::open`], or until the returned guard is dropped.
        pub(crate) fn close(&self) -> OpenOnDrop {
            *lock_unpoisoned(&self.0 .0) = true;
            OpenOnDrop(self.clone())
        }
        pub(crate) fn open(&self) {
            *lock_unpoisoned(&self.0 .0) = false;
            self.0 .1.notify_all();
        }
        fn pass(&self) {
            let mut closed = lock_unpoisoned(&self.0 .0);
            while *closed {
                closed = self.0 .1.wait(closed).unwrap_or_else(|e| e.into_inner());
            }
        }
    }

    /// An opener whose files' fsyncs (`on_sync`) or writes wait at `gate`.
    pub(crate) struct Stuck {
        pub(crate) gate: Gate,
        pub(crate) on_sync: bool,
    }

    struct StuckFile {
        file: File,
        gate: Gate,
        on_sync: bool,
    }

    impl Opener for Stuck {
        fn open(&self, path: &Path) -> io::Result<Opened> {
            let (file, created) = open_append(path)?;
            let len = file.metadata()?.len();
            let file = StuckFile {
                file,
                gate: self.gate.clone(),
                on_sync: self.on_sync,
            };
            Ok(Opened {
                file: Box::new(file),
                len,
                created,
            })
        }
    }

    impl LiveFile for StuckFile {
        fn append(&mut self, bytes: &[u8]) -> io::Result<()> {
            if !self.on_sync {
                self.gate.pass();
            }
            self.file.write_all(bytes)
        }
        fn sync(&mut self) -> io::Result<()> {
            if self.on_sync {
                self.gate.pass();
            }
            self.file.sync_all()
        }
        fn truncate(&mut self, len: u64) -> io::Result<()> {
            self.file.set_len(len)
        }
        fn metadata(&self) -> io::Result<std::fs::Metadata> {
            self.file.metadata()
        }
    }

    struct FaultyFile(File, Faults);

    impl LiveFile for FaultyFile {
        fn append(&mut self, bytes: &[u8]) -> io::Result<()> {
            self.1.appends.fetch_add(1, Ordering::SeqCst);
            if self.1.get() == PARTIAL_WRITE {
                self.0.write_all(&bytes[..bytes.len() / 2])?;
                return Err(io::Error::from_raw_os_error(libc::ENOSPC));
            }
            self.0.write_all(bytes)
        }
        fn sync(&mut self) -> io::Result<()> {
            if self.1.get() == SYNC {
                return Err(io::Error::from_raw_os_error(libc::EIO));
            }
            self.0.sync_all()
        }
        fn truncate(&mut self, len: u64) -> io::Result<()> {
            self.0.set_len(len)
        }
        fn metadata(&self) -> io::Result<std::fs::Metadata> {
            self.0.metadata()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotated_names_are_read_back() {
        let live = AuditPath::try_from(Path::new("/x/audit.jsonl")).expect("valid");
        let name = live.rotated(10);
        let name = name.file_name().and_then(|n| n.to_str()).expect("a name");
        assert_eq!(rotated_seq("audit.jsonl", name), Some(10));
        assert_eq!(any_rotated_seq(name), Some(10));
        assert_eq!(
            rotated_seq("audit.jsonl", "audit.jsonl.00000000000000000010"),
            Some(10)
        );
        assert_eq!(rotated_seq("audit.jsonl", "audit.jsonl.10"), None);
        assert_eq!(
            rotated_seq("audit.jsonl", "other.jsonl.00000000000000000010"),
            None
        );
        assert_eq!(any_rotated_seq("audit.log.00000000000000000010"), Some(10));
        assert_eq!(any_rotated_seq("audit.jsonl"), None);
        assert_eq!(any_rotated_seq(".00000000000000000010"), None);
    }
}
