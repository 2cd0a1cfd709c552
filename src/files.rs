//! Reading the files an operator names: the config, the secrets it references, and the
//! certificates and keys of TLS. Only regular files, and only up to a size limit.
//!
//! Why: these are read at start, by `check-config`, and on every SIGHUP. A FIFO in their
//! place would block the read until something writes to it (and the reload with it); a
//! device such as `/dev/zero`, or a huge file, would be read whole into memory, which in
//! a small pod is an OOM kill instead of a refused reload. Following symbolic links is
//! fine here (Kubernetes mounts secrets through them): what is opened is checked.

use std::fs::{File, OpenOptions};
use std::io::{self, Read as _};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::Path;

/// The most a config file may hold.
pub const CONFIG_LIMIT: u64 = 1 << 20;
/// The most a secret file may hold (a token, an HMAC key, a Redis URL).
pub const SECRET_LIMIT: u64 = 64 << 10;
/// The most a PEM file may hold (certificate chains, CA bundles, private keys).
pub const PEM_LIMIT: u64 = 4 << 20;

/// The bytes of the regular file at `path`, if it holds at most `limit` of them.
pub fn read_limited(path: &Path, limit: u64) -> io::Result<Vec<u8>> {
    let (file, len) = open_regular(path)?;
    if len > limit {
        return Err(too_large(limit));
    }
    let mut bytes = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
    // The file may grow between the check and the read: read one byte past the limit.
    file.take(limit.saturating_add(1)).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > limit {
        return Err(too_large(limit));
    }
    Ok(bytes)
}

/// [`read_limited`], as UTF-8 text.
pub fn read_text_limited(path: &Path, limit: u64) -> io::Result<String> {
    String::from_utf8(read_limited(path, limit)?).map_err(|err| {
        // The bytes may be a secret: wipe them rather than hand them back.
        zeroize::Zeroize::zeroize(&mut err.into_bytes());
        io::Error::new(io::ErrorKind::InvalidData, "it is not valid UTF-8 text")
    })
}

/// Opens `path` for reading if it is a regular file, and says how long it is.
/// `O_NONBLOCK` keeps the open of a FIFO from waiting for a writer; on a regular file it
/// changes nothing.
fn open_regular(path: &Path) -> io::Result<(File, u64)> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(NON_BLOCKING)
        .open(path)?;
    let meta = file.metadata()?;
    let kind = meta.file_type();
    if kind.is_file() {
        Ok((file, meta.len()))
    } else if kind.is_dir() {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "it is a directory, not a regular file",
        ))
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "it is not a regular file (a FIFO, socket or device)",
        ))
    }
}

/// `O_NONBLOCK`, as `custom_flags` takes it.
const NON_BLOCKING: i32 = rustix::fs::OFlags::NONBLOCK.bits() as i32;

fn too_large(limit: u64) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("it is larger than {limit} bytes"),
    )
}

/// Makes a FIFO at `path`, for the tests of every reader of operator-named files.
#[cfg(test)]
pub(crate) fn make_fifo(path: &Path) {
    rustix::fs::mknodat(
        rustix::fs::CWD,
        path,
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o600),
        0,
    )
    .expect("mkfifo");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_regular_file_within_the_limit_is_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f");
        std::fs::write(&path, "abc").expect("write");
        assert_eq!(read_text_limited(&path, 3).expect("read"), "abc");
        let err = read_limited(&path, 2).expect_err("over the limit");
        assert_eq!(err.to_string(), "it is larger than 2 bytes");
    }

    #[test]
    fn a_fifo_a_device_or_a_directory_is_refused_without_blocking() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fifo = dir.path().join("fifo");
        make_fifo(&fifo);
        // No writer ever opens the FIFO: a blocking open would hang the test.
        let err = read_limited(&fifo, SECRET_LIMIT).expect_err("a FIFO");
        assert!(err.to_string().contains("not a regular file"), "{err}");
        let err = read_limited(Path::new("/dev/zero"), SECRET_LIMIT).expect_err("a device");
        assert!(err.to_string().contains("not a regular file"), "{err}");
        let err = read_limited(dir.path(), SECRET_LIMIT).expect_err("a directory");
        assert!(err.to_string().contains("directory"), "{err}");
    }

    #[test]
    fn text_that_is_not_utf8_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f");
        std::fs::write(&path, [0xff, 0xfe]).expect("write");
        let err = read_text_limited(&path, 10).expect_err("not UTF-8");
        assert_eq!(err.to_string(), "it is not valid UTF-8 text");
    }
}
