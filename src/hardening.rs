//! What the process does to itself before it reads a secret: no core dumps. A core of
//! this process would hold the Plivo credentials (as the ready-made `Authorization`
//! header) and the audit HMAC key, and crash collectors such as systemd-coredump keep
//! cores long after the secrets were rotated. With `panic = "abort"`, every panic would
//! otherwise write one where the host allows it.

use std::io;

use rustix::process::{set_dumpable_behavior, setrlimit, DumpableBehavior, Resource, Rlimit};

/// Turns core dumps off for good: the core size limit goes to 0 (soft and hard, so it
/// cannot be raised again without privilege) and the process is marked not dumpable,
/// which also stops `ptrace` by processes of the same user and covers `core_pattern`
/// pipes that ignore the size limit.
pub fn forbid_core_dumps() -> io::Result<()> {
    let none = Rlimit {
        current: Some(0),
        maximum: Some(0),
    };
    setrlimit(Resource::Core, none)?;
    set_dumpable_behavior(DumpableBehavior::NotDumpable)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn core_dumps_are_off_afterwards() {
        forbid_core_dumps().expect("allowed to lower its own limits");
        let limit = rustix::process::getrlimit(Resource::Core);
        assert_eq!((limit.current, limit.maximum), (Some(0), Some(0)));
        assert_eq!(
            rustix::process::dumpable_behavior().expect("prctl"),
            DumpableBehavior::NotDumpable
        );
    }
}
