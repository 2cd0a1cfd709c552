//! The audit log (DESIGN.md §3 and §4, contract): a durable, hash-chained JSON Lines file
//! written in batches by one writer (a thread of its own with `fsync: always`, its callers
//! in turn with `fsync: never`), plus the `audit verify` and `audit query` tools.
//!
//! This module owns everything about the audit log and nothing else:
//! - [`record`]: what callers hand in ([`AuditEvent`]) and the exact member order of a line;
//! - [`writer`]: [`AuditLog`], the group-committing writer with recovery and rotation;
//! - [`AuditPath`]: where the live file is, and the names of the files beside it;
//! - [`verify`] and [`query`]: the operator tools behind `mpc-gateway audit ...`.
//!
//! The audit log is deliberately not a tracing layer: a tracing layer may drop records,
//! this writer acknowledges a record only once it is on disk.

mod chain;
mod path;
mod recover;
mod saved_head;
mod segment;
mod source;
mod torn;

pub mod query;
pub mod record;
pub mod verify;
pub mod writer;

use std::fmt;

pub use path::{AuditPath, InvalidAuditPath};
pub use query::{run_query, OutputFormat, QueryArgs};
pub use record::{AuditEvent, EventKind};
pub use verify::{run_verify, VerifyArgs};
pub use writer::{check_writable, AuditError, AuditLog, RotationFailures};
#[cfg(test)]
pub(crate) use {segment::fault::Gate, writer::TEST_STALL_BOUND};

/// Whether the writer fsyncs before acknowledging (config `audit.fsync`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fsync {
    /// Acknowledge only after an fsync that covers the record (group commit).
    Always,
    /// Acknowledge once the record is handed to the operating system.
    Never,
}

impl std::fmt::Display for Fsync {
    /// The config's spelling (`always`, `never`).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Fsync::Always => "always",
            Fsync::Never => "never",
        })
    }
}

/// Everything [`AuditLog::open`] needs, resolved from the `audit` config section.
pub struct AuditSettings {
    /// The live file; rotated files are renamed beside it.
    pub path: AuditPath,
    /// When records are fsynced.
    pub fsync: Fsync,
    /// Rotate once a write leaves the live file at this size or more (>= 1024, checked by
    /// config).
    pub rotate_bytes: u64,
    /// When set, chain hashes are HMAC-SHA256 with these key bytes instead of SHA-256.
    pub hmac_key: Option<secrecy::SecretSlice<u8>>,
}

// Hand-written: `SecretSlice` is not `Clone`; the key is copied into a new secret box.
impl Clone for AuditSettings {
    fn clone(&self) -> Self {
        use secrecy::ExposeSecret;
        AuditSettings {
            path: self.path.clone(),
            fsync: self.fsync,
            rotate_bytes: self.rotate_bytes,
            hmac_key: self
                .hmac_key
                .as_ref()
                .map(|key| secrecy::SecretSlice::from(key.expose_secret().to_vec())),
        }
    }
}

// Hand-written so that the key can never end up in a log line, not even redacted by
// accident of a future secrecy version.
impl fmt::Debug for AuditSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuditSettings")
            .field("path", &self.path)
            .field("fsync", &self.fsync)
            .field("rotate_bytes", &self.rotate_bytes)
            .field("hmac_key", &self.hmac_key.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}
