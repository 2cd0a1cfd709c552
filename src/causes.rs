//! An error's chain of causes: walked (stepping into the errors an `io::Error` wraps),
//! and written as one line, `outer: inner: ...`, for log lines and the command line's
//! error messages.

use std::error::Error;
use std::io;

/// `err` and its causes, outermost first. `io::Error::source()` skips the error it wraps
/// (it answers with that error's own source), so an `io::Error`'s payload is stepped
/// into explicitly: hyper-rustls nests a TLS error two `io::Error`s deep.
pub(crate) fn chain<'a>(
    err: &'a (dyn Error + 'static),
) -> impl Iterator<Item = &'a (dyn Error + 'static)> {
    std::iter::successors(Some(err), |&current| cause_of(current))
}

fn cause_of<'a>(err: &'a (dyn Error + 'static)) -> Option<&'a (dyn Error + 'static)> {
    match err.downcast_ref::<io::Error>().and_then(io::Error::get_ref) {
        Some(payload) => Some(payload),
        None => err.source(),
    }
}

/// Joins the messages of `chain` (outermost first) with `: `, leaving out a message the
/// line already holds: many errors repeat their cause's message in their own (an I/O
/// error wrapping another shows the inner one's; `context: {source}` formats).
pub(crate) fn one_line<'a>(chain: impl IntoIterator<Item = &'a (dyn Error + 'static)>) -> String {
    let mut line = String::new();
    for cause in chain {
        let message = cause.to_string();
        if line.contains(&message) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&message);
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the upstream's "no answer" log line shows: each cause once, outermost first.
    #[test]
    fn causes_are_listed_once_each() {
        #[derive(Debug, thiserror::Error)]
        #[error("error trying to connect")]
        struct Outer(#[source] io::Error);
        // An I/O error wrapping another shows the inner one's message: listed once.
        let inner = io::Error::other(rustls::Error::General("bad certificate".into()));
        let text = one_line(chain(&Outer(inner)));
        assert_eq!(
            text,
            "error trying to connect: unexpected error: bad certificate"
        );
        let refused = io::Error::from(io::ErrorKind::ConnectionRefused);
        assert_eq!(one_line(chain(&refused)), refused.to_string());
    }

    #[test]
    fn the_error_an_io_error_wraps_is_part_of_the_chain() {
        let tls = rustls::Error::General("bad certificate".into());
        let nested = io::Error::other(io::Error::other(tls));
        assert_eq!(chain(&nested).count(), 3);
        assert!(chain(&nested).any(|e| e.is::<rustls::Error>()));
    }
}
