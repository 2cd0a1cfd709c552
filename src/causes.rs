//! An error and its causes as one line, `outer: inner: ...`, for log lines and the
//! command line's error messages.

use std::error::Error;

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
