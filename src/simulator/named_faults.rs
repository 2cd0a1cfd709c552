//! Faults bound to an MPC name, for the `simulator` command's `--fault NAME=SPEC`: every
//! request for that name (or only its first N) gets the fault, so a caller's developer
//! can see what a Plivo 429, 5xx, reset or slow answer does through the gateway without
//! writing a fake of their own. The queued one-shot faults of the tests come first.
//!
//! SPEC is one of:
//! - `STATUS` (three digits): that status with a Plivo-like JSON error body;
//! - `429:SECS` (any status): the same with `Retry-After: SECS`;
//! - `delay:DURATION` (`delay:2s`): wait, then answer normally;
//! - `reset` (TCP reset), `reset-stream` (HTTP/2 stream reset), `hang` (never answer),
//!   `goaway` (answer, then close the connection gracefully), `stall:STATUS` (a head,
//!   the first body bytes, then nothing);
//!
//! each optionally followed by `*N`: only the first N requests for the name, then normal
//! answers (`503*2` fails two attempts and lets the third through).

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};

use super::Fault;

/// One `--fault NAME=SPEC` argument, parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NamedFaultSpec {
    pub name: String,
    pub fault: Fault,
    /// `Some(n)`: only the first `n` requests for the name.
    pub times: Option<u64>,
}

/// Why a `--fault` argument was refused.
#[derive(Debug, PartialEq, Eq)]
pub struct SpecError(String);

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}; expected NAME=SPEC, SPEC one of STATUS, STATUS:RETRY_AFTER_SECS, \
             delay:DURATION, reset, reset-stream, hang, goaway, stall:STATUS, optionally \
             followed by *N (e.g. busy-1=429:7, flaky-1=503*2, slow-1=delay:3s)",
            self.0
        )
    }
}

impl std::error::Error for SpecError {}

fn refuse(what: impl Into<String>) -> SpecError {
    SpecError(what.into())
}

impl FromStr for NamedFaultSpec {
    type Err = SpecError;

    fn from_str(arg: &str) -> Result<Self, SpecError> {
        let (name, spec) = arg
            .split_once('=')
            .ok_or_else(|| refuse(format!("{arg:?} has no `=`")))?;
        if name.is_empty() {
            return Err(refuse("the MPC name is empty"));
        }
        let (spec, times) = match spec.rsplit_once('*') {
            Some((spec, n)) => {
                let n = n.parse::<u64>().ok().filter(|n| *n > 0).ok_or_else(|| {
                    refuse(format!("{n:?} after `*` is not a count of 1 or more"))
                })?;
                (spec, Some(n))
            }
            None => (spec, None),
        };
        Ok(NamedFaultSpec {
            name: name.to_owned(),
            fault: parse_fault(spec)?,
            times,
        })
    }
}

fn parse_fault(spec: &str) -> Result<Fault, SpecError> {
    match spec {
        "reset" => return Ok(Fault::Reset),
        "reset-stream" => return Ok(Fault::ResetStream),
        "hang" => return Ok(Fault::Hang),
        "goaway" => return Ok(Fault::GoAway),
        _ => {}
    }
    if let Some(duration) = spec.strip_prefix("delay:") {
        let delay = humantime::parse_duration(duration)
            .map_err(|err| refuse(format!("delay {duration:?}: {err}")))?;
        return Ok(Fault::Delay(delay));
    }
    if let Some(status) = spec.strip_prefix("stall:") {
        return Ok(Fault::StalledBody(parse_status(status)?));
    }
    let (status, retry_after) = match spec.split_once(':') {
        Some((status, secs)) => {
            let secs = secs
                .parse::<u64>()
                .map_err(|_| refuse(format!("Retry-After {secs:?} is not whole seconds")))?;
            (status, Some(secs))
        }
        None => (spec, None),
    };
    let status = parse_status(status)?;
    Ok(Fault::Status {
        status,
        headers: retry_after
            .map(|secs| ("retry-after".to_owned(), secs.to_string()))
            .into_iter()
            .collect(),
        body: format!(
            r#"{{"api_id":"simulated-fault","error":"fault injected by the simulator: {status}"}}"#
        ),
    })
}

fn parse_status(text: &str) -> Result<u16, SpecError> {
    text.parse::<u16>()
        .ok()
        .filter(|status| (100..=599).contains(status))
        .ok_or_else(|| refuse(format!("{text:?} is not a fault spec or an HTTP status")))
}

/// The faults by name, fixed once the simulator starts; only the counts of the limited
/// ones change.
#[derive(Debug, Default)]
pub(super) struct NamedFaults(HashMap<String, NamedFault>);

#[derive(Debug)]
struct NamedFault {
    fault: Fault,
    /// Requests still to fail; `None` for all of them.
    remaining: Option<AtomicU64>,
}

impl NamedFaults {
    pub(super) fn new(specs: impl IntoIterator<Item = NamedFaultSpec>) -> NamedFaults {
        NamedFaults(
            specs
                .into_iter()
                .map(|spec| {
                    let fault = NamedFault {
                        fault: spec.fault,
                        remaining: spec.times.map(AtomicU64::new),
                    };
                    (spec.name, fault)
                })
                .collect(),
        )
    }

    pub(super) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The fault for a request about `name`, counting it when limited.
    pub(super) fn take(&self, name: &str) -> Option<Fault> {
        let named = self.0.get(name)?;
        if let Some(remaining) = &named.remaining {
            remaining
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
                .ok()?;
        }
        Some(named.fault.clone())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn spec(arg: &str) -> NamedFaultSpec {
        arg.parse().unwrap_or_else(|e| panic!("{arg}: {e}"))
    }

    #[test]
    fn specs_parse_to_faults() {
        let busy = spec("busy-1=429:7");
        assert_eq!(busy.name, "busy-1");
        assert_eq!(busy.times, None);
        let Fault::Status {
            status,
            headers,
            body,
        } = busy.fault
        else {
            panic!("a status fault");
        };
        assert_eq!(status, 429);
        assert_eq!(headers, [("retry-after".to_owned(), "7".to_owned())]);
        assert!(body.contains("\"api_id\""), "{body}");
        assert_eq!(spec("x=503*2").times, Some(2));
        assert!(matches!(
            spec("x=503").fault,
            Fault::Status { status: 503, .. }
        ));
        assert_eq!(
            spec("slow=delay:1500ms").fault,
            Fault::Delay(Duration::from_millis(1500))
        );
        assert_eq!(spec("x=reset").fault, Fault::Reset);
        assert_eq!(spec("x=reset-stream").fault, Fault::ResetStream);
        assert_eq!(spec("x=hang*1").fault, Fault::Hang);
        assert_eq!(spec("x=goaway").fault, Fault::GoAway);
        assert_eq!(spec("x=stall:200").fault, Fault::StalledBody(200));
        // A name may hold `=` and `*`: the first `=` and the last `*` split.
        assert_eq!(spec("a*b=500").name, "a*b");
    }

    #[test]
    fn bad_specs_say_what_is_wrong_and_what_is_expected() {
        for (arg, says) in [
            ("busy", "has no `=`"),
            ("=503", "name is empty"),
            ("x=teapot", "\"teapot\" is not a fault spec"),
            ("x=99", "\"99\" is not a fault spec"),
            ("x=429:soon", "Retry-After \"soon\""),
            ("x=delay:fast", "delay \"fast\""),
            ("x=503*0", "\"0\" after `*`"),
            ("x=503*", "\"\" after `*`"),
        ] {
            let err = arg.parse::<NamedFaultSpec>().expect_err(arg).to_string();
            assert!(err.contains(says), "{arg}: {err}");
            assert!(err.contains("expected NAME=SPEC"), "{arg}: {err}");
        }
    }

    #[test]
    fn a_limited_fault_runs_out_and_an_unlimited_one_does_not() {
        let faults = NamedFaults::new([spec("flaky=503*2"), spec("down=502")]);
        assert!(faults.take("flaky").is_some());
        assert!(faults.take("flaky").is_some());
        assert_eq!(faults.take("flaky"), None);
        for _ in 0..5 {
            assert!(faults.take("down").is_some());
        }
        assert_eq!(faults.take("other"), None);
    }
}
