//! `mpc-gateway audit query PATH...` (DESIGN.md §4, issue 3): finds records by tenant,
//! MPC name glob, event, reason, status and time, and prints them as an aligned table,
//! as JSON Lines (the matching lines verbatim, for `jq`), or as counts of requests per
//! tenant and reason (`--summary`, by each request's terminal record).
//!
//! Files are streamed line by line with a 1 MiB cap per line; a malformed, non-UTF-8 or
//! over-long line is skipped with a warning naming file and line. `--since` and
//! `--until` are inclusive and take RFC 3339 or an age like `30m`, `1h`, `2d`
//! (s, m, h, d, w), meaning that long before now. Exit 0, or 2 on a usage or I/O error.
//!
//! Files whose records' seq ranges overlap (a stray copy such as `audit.jsonl.bak`
//! beside the rotated file it copies) get a warning naming them: their common records
//! are listed, and counted by `--summary`, twice. `audit verify` says which file is not
//! part of the chain.

use std::collections::BTreeMap;
use std::io::{self, BufWriter, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use serde::Deserialize;
use time::format_description::well_known::Rfc3339;
use time::{Duration, OffsetDateTime};

use super::source::{self, LineReader, SourceError};

/// Output of `audit query`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutputFormat {
    /// Aligned columns for a terminal.
    Table,
    /// The matching lines verbatim, as JSON Lines.
    Json,
}

/// Arguments of `mpc-gateway audit query`.
#[derive(clap::Args, Debug)]
pub struct QueryArgs {
    /// Audit files, or directories whose files with `.jsonl` in their name are read.
    #[arg(required = true, value_name = "PATH")]
    pub paths: Vec<PathBuf>,
    /// Only records of this tenant (exact).
    #[arg(long)]
    pub tenant: Option<String>,
    /// Only records whose MPC name matches this glob (`*` any run, `?` one character,
    /// case-sensitive).
    #[arg(long, value_name = "GLOB")]
    pub mpc: Option<String>,
    /// Only records of this event.
    #[arg(long, value_parser = ["denied", "forward", "result"])]
    pub event: Option<String>,
    /// Only records with this reason (a problem slug, or `ended`).
    #[arg(long)]
    pub reason: Option<String>,
    /// Only records with this status (what the caller got).
    #[arg(long)]
    pub status: Option<u16>,
    /// Only records at or after TIME: RFC 3339 or an age like 30m, 1h, 2d.
    #[arg(long, value_name = "TIME")]
    pub since: Option<String>,
    /// Only records at or before TIME: RFC 3339 or an age like 30m, 1h, 2d.
    #[arg(long, value_name = "TIME")]
    pub until: Option<String>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = OutputFormat::Table)]
    pub format: OutputFormat,
    /// Print counts per tenant and reason of the selected requests instead of the
    /// records: each request counts once, by its `denied` or `result` record (`forward`
    /// records only with `--event forward`).
    #[arg(long)]
    pub summary: bool,
}

/// Runs `audit query` and returns the process exit code.
pub fn run_query(args: &QueryArgs) -> ExitCode {
    let stdout = io::stdout();
    let mut out = BufWriter::new(stdout.lock());
    let mut warn = io::stderr();
    let result = query(args, OffsetDateTime::now_utc(), &mut out, &mut warn);
    let result = result.and_then(|()| out.flush().map_err(Failure::Output));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // A reader that went away (`| head`) is not an error of ours.
        Err(Failure::Output(e)) if e.kind() == io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(f) => {
            let _ = writeln!(warn, "audit query: {f}");
            ExitCode::from(2)
        }
    }
}

/// Why a query stopped.
#[derive(Debug)]
pub(crate) enum Failure {
    Usage(String),
    Source(SourceError),
    Output(io::Error),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Usage(m) => f.write_str(m),
            Failure::Source(e) => write!(f, "{e}"),
            Failure::Output(e) => write!(f, "cannot write output: {e}"),
        }
    }
}

impl From<SourceError> for Failure {
    fn from(e: SourceError) -> Self {
        Failure::Source(e)
    }
}

impl From<io::Error> for Failure {
    fn from(e: io::Error) -> Self {
        Failure::Output(e)
    }
}

/// The fields a query looks at; everything else in the line is ignored.
#[derive(Deserialize)]
struct Row {
    /// Only for spotting files that hold the same records; a line without a numeric
    /// `seq` is still selected.
    #[serde(default, deserialize_with = "any_seq")]
    seq: Option<u64>,
    ts: String,
    event: String,
    request_id: String,
    tenant: Option<String>,
    mpc: Option<String>,
    /// For the table: a by-uuid request's uuid is only in its path.
    path: Option<String>,
    status: Option<u16>,
    reason: Option<String>,
    upstream_status: Option<u16>,
    duration_ms: Option<u64>,
}

/// The selection, with times resolved.
struct Filter<'a> {
    args: &'a QueryArgs,
    since: Option<OffsetDateTime>,
    until: Option<OffsetDateTime>,
}

impl Filter<'_> {
    fn matches(&self, row: &Row, ts: OffsetDateTime) -> bool {
        let a = self.args;
        a.tenant
            .as_ref()
            .is_none_or(|t| row.tenant.as_ref() == Some(t))
            && a.mpc
                .as_ref()
                .is_none_or(|g| row.mpc.as_deref().is_some_and(|m| glob_match(g, m)))
            && a.event.as_ref().is_none_or(|e| row.event == *e)
            && a.reason
                .as_ref()
                .is_none_or(|r| row.reason.as_ref() == Some(r))
            && a.status.is_none_or(|s| row.status == Some(s))
            && self.since.is_none_or(|s| ts >= s)
            && self.until.is_none_or(|u| ts <= u)
    }
}

/// The whole query against explicit output streams and a fixed "now" (for tests).
pub(crate) fn query(
    args: &QueryArgs,
    now: OffsetDateTime,
    out: &mut dyn Write,
    warn: &mut dyn Write,
) -> Result<(), Failure> {
    let filter = Filter {
        args,
        since: resolve_time(args.since.as_deref(), now, "--since")?,
        until: resolve_time(args.until.as_deref(), now, "--until")?,
    };
    let files = source::collect(&args.paths)?;
    let count_forward = args.event.as_deref() == Some("forward");
    let mut sink = Sink::new(args.format, args.summary, count_forward);
    sink.start(out)?;
    let mut spans = Vec::with_capacity(files.len());
    for file in &files {
        let path = &file.path;
        let mut span: Option<(u64, u64)> = None;
        let mut lines = LineReader::open(file)?;
        while let Some(line) = lines.next_line()? {
            let skip = |why: &str| {
                format!(
                    "audit query: warning: {}:{}: skipped: {why}",
                    path.display(),
                    line.no
                )
            };
            let parsed = if line.too_long {
                Err("line longer than 1 MiB".to_string())
            } else {
                parse_row(line.bytes)
            };
            if let Ok((Row { seq: Some(seq), .. }, _)) = &parsed {
                span = Some(span.map_or((*seq, *seq), |(lo, hi)| (lo.min(*seq), hi.max(*seq))));
            }
            match parsed {
                Ok((row, ts)) if filter.matches(&row, ts) => sink.record(out, line.bytes, &row)?,
                Ok(_) => {}
                // A line that is only a torn tail is expected after a crash; still say so.
                Err(why) => writeln!(warn, "{}", skip(&why))?,
            }
        }
        if let Some((first, last)) = span {
            spans.push(SeqSpan { path, first, last });
        }
    }
    warn_overlaps(&mut spans, args.summary, warn)?;
    sink.finish(out)
}

/// The lowest and highest seq one file holds.
struct SeqSpan<'a> {
    path: &'a std::path::Path,
    first: u64,
    last: u64,
}

/// Warns, naming both files, for each file whose seqs overlap those of a file before
/// it (by first seq): their common records were selected twice.
fn warn_overlaps(spans: &mut [SeqSpan<'_>], summary: bool, warn: &mut dyn Write) -> io::Result<()> {
    spans.sort_by_key(|span| (span.first, span.last));
    let effect = if summary {
        "counts may include them twice"
    } else {
        "they may be listed twice"
    };
    let mut widest: Option<&SeqSpan<'_>> = None;
    for span in spans.iter() {
        if let Some(before) = widest.filter(|before| span.first <= before.last) {
            writeln!(
                warn,
                "audit query: warning: {} (seq {} to {}) and {} (seq {} to {}) hold records of the same seqs (a stray copy?): {effect}",
                before.path.display(),
                before.first,
                before.last,
                span.path.display(),
                span.first,
                span.last
            )?;
        }
        if widest.is_none_or(|before| span.last > before.last) {
            widest = Some(span);
        }
    }
    Ok(())
}

/// `seq` when it is a number; anything else there does not make the line unreadable.
fn any_seq<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    Ok(serde_json::Value::deserialize(d)?.as_u64())
}

fn parse_row(bytes: &[u8]) -> Result<(Row, OffsetDateTime), String> {
    let text = std::str::from_utf8(bytes).map_err(|_| "not valid UTF-8".to_string())?;
    let row: Row = serde_json::from_str(text).map_err(|e| format!("not an audit record: {e}"))?;
    let ts = OffsetDateTime::parse(&row.ts, &Rfc3339)
        .map_err(|_| format!("ts {:?} is not RFC 3339", row.ts))?;
    Ok((row, ts))
}

/// `None` for no bound; RFC 3339 or an age before `now`.
fn resolve_time(
    arg: Option<&str>,
    now: OffsetDateTime,
    flag: &str,
) -> Result<Option<OffsetDateTime>, Failure> {
    let Some(s) = arg else {
        return Ok(None);
    };
    if let Ok(t) = OffsetDateTime::parse(s, &Rfc3339) {
        return Ok(Some(t));
    }
    parse_age(s)
        .and_then(|age| now.checked_sub(age))
        .map(Some)
        .ok_or_else(|| {
            Failure::Usage(format!(
                "{flag} {s:?}: expected RFC 3339 (e.g. 2026-11-26T09:03:32Z) or an age like 30m, 1h, 2d"
            ))
        })
}

/// `90s`, `30m`, `1h`, `2d`, `1w`.
fn parse_age(s: &str) -> Option<Duration> {
    let unit = s.chars().last()?;
    let number = &s[..s.len() - unit.len_utf8()];
    if number.is_empty() || !number.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: i64 = number.parse().ok()?;
    let seconds_per = match unit {
        's' => 1,
        'm' => 60,
        'h' => 3_600,
        'd' => 86_400,
        'w' => 604_800,
        _ => return None,
    };
    n.checked_mul(seconds_per).map(Duration::seconds)
}

/// `*` matches any run of characters (also none), `?` exactly one, anything else itself:
/// the same patterns as a tenant's `allow` list.
pub(crate) fn glob_match(pattern: &str, text: &str) -> bool {
    crate::auth::NamePattern::new(pattern).matches(text)
}

/// Where selected records go.
enum Sink {
    Json,
    Table,
    Summary {
        json: bool,
        counts: BTreeMap<(Option<String>, Option<String>), u64>,
        /// A forwarded request has a `forward` and a `result` record: counting both would
        /// count it twice, so `forward` records count only when `--event forward` asks.
        count_forward: bool,
    },
}

/// Table columns: header and width (the last column is not padded).
const COLUMNS: [(&str, usize); 9] = [
    ("TS", 24),
    ("EVENT", 7),
    ("REQUEST_ID", 36),
    ("TENANT", 16),
    ("MPC", 24),
    ("STATUS", 6),
    ("REASON", 29),
    ("UPSTREAM", 8),
    ("DURATION_MS", 0),
];

impl Sink {
    fn new(format: OutputFormat, summary: bool, count_forward: bool) -> Self {
        match (format, summary) {
            (f, true) => Sink::Summary {
                json: f == OutputFormat::Json,
                counts: BTreeMap::new(),
                count_forward,
            },
            (OutputFormat::Json, false) => Sink::Json,
            (OutputFormat::Table, false) => Sink::Table,
        }
    }

    fn start(&self, out: &mut dyn Write) -> io::Result<()> {
        if let Sink::Table = self {
            let headers: Vec<String> = COLUMNS.iter().map(|(h, _)| h.to_string()).collect();
            write_row(out, &headers)?;
        }
        Ok(())
    }

    fn record(&mut self, out: &mut dyn Write, raw: &[u8], row: &Row) -> io::Result<()> {
        match self {
            Sink::Json => {
                out.write_all(raw)?;
                out.write_all(b"\n")
            }
            Sink::Table => write_row(out, &table_cells(row)),
            Sink::Summary {
                count_forward: false,
                ..
            } if row.event == "forward" => Ok(()),
            Sink::Summary { counts, .. } => {
                *counts
                    .entry((row.tenant.clone(), row.reason.clone()))
                    .or_insert(0) += 1;
                Ok(())
            }
        }
    }

    fn finish(self, out: &mut dyn Write) -> Result<(), Failure> {
        if let Sink::Summary { json, counts, .. } = self {
            if json {
                summary_json(out, &counts)?;
            } else {
                summary_table(out, &counts)?;
            }
        }
        Ok(())
    }
}

fn table_cells(row: &Row) -> Vec<String> {
    let opt = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
    let num = |v: Option<u64>| v.map_or_else(|| "-".into(), |n| n.to_string());
    vec![
        row.ts.clone(),
        row.event.clone(),
        row.request_id.clone(),
        opt(&row.tenant),
        mpc_cell(row),
        num(row.status.map(u64::from)),
        opt(&row.reason),
        num(row.upstream_status.map(u64::from)),
        num(row.duration_ms),
    ]
}

/// The MPC's name; before a by-uuid request has learned it (or when it never did),
/// `uuid:` and the uuid of its path, so that such rows can be told apart: the native
/// route's `/mpc/by-uuid/<uuid>/end` or the SDK route's `.../MultiPartyCall/uuid_<uuid>/`.
fn mpc_cell(row: &Row) -> String {
    if let Some(name) = &row.mpc {
        return name.clone();
    }
    row.path
        .as_deref()
        .and_then(uuid_of_path)
        .map_or_else(|| "-".into(), |uuid| format!("uuid:{uuid}"))
}

fn uuid_of_path(path: &str) -> Option<&str> {
    let path = path.split('?').next().unwrap_or(path);
    let rest = path.strip_prefix("/mpc/by-uuid/").or_else(|| {
        path.split_once("/MultiPartyCall/uuid_")
            .map(|(_, rest)| rest)
    })?;
    rest.split('/').next().filter(|uuid| !uuid.is_empty())
}

fn write_row(out: &mut dyn Write, cells: &[String]) -> io::Result<()> {
    let mut line = String::new();
    for (i, (cell, (_, width))) in cells.iter().zip(COLUMNS).enumerate() {
        if i > 0 {
            line.push_str("  ");
        }
        let cell = printable(cell);
        if width == 0 {
            line.push_str(&cell);
        } else {
            line.push_str(&fit(&cell, width));
        }
    }
    writeln!(out, "{}", line.trim_end())
}

/// The characters the raw log writes as `\u` escapes (control characters, line
/// separators, the invisible format characters that reorder or hide text) are shown as
/// `?`: a tenant may put a right-to-left override in an MPC name (names are any text but
/// control characters), and its record's row would then read backwards from there.
fn printable(s: &str) -> String {
    s.chars()
        .map(|c| {
            if super::record::shown_escaped(c) {
                '?'
            } else {
                c
            }
        })
        .collect()
}

/// Pads to `width` characters, or cuts with `…` so that columns stay aligned.
fn fit(s: &str, width: usize) -> String {
    let len = s.chars().count();
    if len <= width {
        return format!("{s:<width$}");
    }
    let mut cut: String = s.chars().take(width.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

type Counts = BTreeMap<(Option<String>, Option<String>), u64>;

fn summary_table(out: &mut dyn Write, counts: &Counts) -> io::Result<()> {
    let show = |v: &Option<String>| printable(v.as_deref().unwrap_or("-"));
    let tw = counts
        .keys()
        .map(|(t, _)| show(t).chars().count())
        .fold(6, usize::max);
    let rw = counts
        .keys()
        .map(|(_, r)| show(r).chars().count())
        .fold(6, usize::max);
    writeln!(out, "{:<tw$}  {:<rw$}  COUNT", "TENANT", "REASON")?;
    for ((tenant, reason), n) in counts {
        writeln!(out, "{:<tw$}  {:<rw$}  {n}", show(tenant), show(reason))?;
    }
    writeln!(out, "total {}", counts.values().sum::<u64>())
}

/// One `--summary --format json` line; a struct so the member order does not depend on
/// serde_json's `preserve_order` feature.
#[derive(serde::Serialize)]
struct SummaryLine<'a> {
    tenant: Option<&'a str>,
    reason: Option<&'a str>,
    count: u64,
}

fn summary_json(out: &mut dyn Write, counts: &Counts) -> io::Result<()> {
    for ((tenant, reason), n) in counts {
        let line = SummaryLine {
            tenant: tenant.as_deref(),
            reason: reason.as_deref(),
            count: *n,
        };
        serde_json::to_writer(&mut *out, &line)?;
        out.write_all(b"\n")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests;
