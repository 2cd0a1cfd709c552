//! Crash safety (DESIGN.md §3 "Durability" and "Restarts", issue 3; issue 9's "SIGKILL
//! under load"): the real binary, `fsync: always`, under concurrent load, killed with
//! SIGKILL, then restarted on the same audit path.
//!
//! What must hold afterwards:
//! - every request whose caller got a reply has its terminal record (`denied`/`result`)
//!   with the status the caller saw — the record is acknowledged before the reply;
//! - every `forward` without a `result` belongs to a request that got no reply;
//! - no request has two terminal records or two `forward` records;
//! - the restarted gateway cuts a torn tail with a warning, serves, and continues `seq`
//!   and the hash chain from the last complete record, so `audit verify` exits 0 (3, a
//!   torn tail, is only acceptable before the restart);
//! - the same with a tiny `rotate_bytes`, verified across every rotated file.

use crate::common;

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::served::{BackgroundSim, Served, BIN};
use common::{assert_chain, token_hash};
use mpc_gateway::simulator::SimulatorConfig;

const AUTH_ID: &str = "MACRASHCRASHCRASH001";
const PLIVO_TOKEN: &str = "crash-test-plivo-token-not-real";
const CALLER_TOKEN: &str = "crash-test-caller-token";
/// Concurrent callers.
const CALLERS: usize = 16;
/// Upper bound of requests per caller.
const MAX_PER_CALLER: usize = 2_000;
/// The kill comes once this many callers got replies (or after [`LOAD_BEFORE_KILL`]).
const REPLIES_BEFORE_KILL: usize = 300;
const LOAD_BEFORE_KILL: Duration = Duration::from_secs(3);
/// Every child process and socket operation is bounded by this.
const PROCESS_TIMEOUT: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------------------
// The simulator and the gateway process
// ---------------------------------------------------------------------------------------

/// The simulator the crashed gateways forward to; it keeps no recording, as the load is
/// long.
fn start_sim() -> BackgroundSim {
    let mut config = SimulatorConfig::new(AUTH_ID, PLIVO_TOKEN);
    config.record = false;
    BackgroundSim::start(config, 2)
}

/// A directory with the secret file, the audit directory and the config.
struct Setup {
    dir: tempfile::TempDir,
}

impl Setup {
    fn new(base_url: &str, rotate_bytes: u64) -> Setup {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().display().to_string();
        std::fs::write(dir.path().join("plivo-token"), PLIVO_TOKEN).expect("write");
        std::fs::create_dir(dir.path().join("audit")).expect("mkdir");
        let yaml = format!(
            r#"listen: 127.0.0.1:0
admin_listen: 127.0.0.1:0
shutdown_grace: 2s
worker_threads: 2
accounts:
  default:
    auth_id: {AUTH_ID}
    auth_token: {{file: "{root}/plivo-token"}}
    rate_limit: {{per_second: 100000, burst: 100000}}
upstream:
  base_url: {base_url}
  connect_timeout: 1s
  timeout: 5s
  max_attempts: 2
tenants:
  load:
    tokens: ["{}"]
    allow: ["*"]
    rate_limit: {{per_second: 100000, burst: 100000}}
audit:
  path: "{root}/audit/audit.jsonl"
  fsync: always
  rotate_bytes: {rotate_bytes}
log:
  format: json
  level: info
"#,
            token_hash(CALLER_TOKEN)
        );
        std::fs::write(dir.path().join("gateway.yaml"), yaml).expect("write config");
        Setup { dir }
    }

    fn config_path(&self) -> PathBuf {
        self.dir.path().join("gateway.yaml")
    }

    fn audit_dir(&self) -> PathBuf {
        self.dir.path().join("audit")
    }

    fn live_file(&self) -> PathBuf {
        self.audit_dir().join("audit.jsonl")
    }

    /// Rotated files (by name, which sorts them by seq), then the live file.
    fn audit_files(&self) -> Vec<PathBuf> {
        let mut rotated: Vec<PathBuf> = std::fs::read_dir(self.audit_dir())
            .expect("read audit dir")
            .map(|entry| entry.expect("entry").path())
            .filter(|path| path != &self.live_file())
            // The writer's lock file (`.audit.jsonl.lock`) holds no record.
            .filter(|path| {
                path.file_name()
                    .is_some_and(|name| !name.to_string_lossy().starts_with('.'))
            })
            .collect();
        rotated.sort();
        if self.live_file().exists() {
            rotated.push(self.live_file());
        }
        rotated
    }
}

/// `mpc-gateway audit verify PATH`: exit code and output.
fn audit_verify(path: &Path) -> (Option<i32>, String) {
    let mut child = Command::new(BIN)
        .args(["audit", "verify", path.to_str().expect("UTF-8 path")])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn verify");
    let mut stdout = child.stdout.take().expect("stdout");
    let mut stderr = child.stderr.take().expect("stderr");
    let out = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stdout.read_to_string(&mut text);
        text
    });
    let err = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let deadline = Instant::now() + PROCESS_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("audit verify did not finish within {PROCESS_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let text = format!(
        "{}{}",
        out.join().expect("stdout"),
        err.join().expect("stderr")
    );
    (status.code(), text)
}

// ---------------------------------------------------------------------------------------
// Load
// ---------------------------------------------------------------------------------------

/// One request as its caller saw it.
#[derive(Debug, Clone)]
struct Sent {
    id: String,
    /// The status of the reply, if one arrived.
    reply: Option<u16>,
}

/// `POST /mpc/{name}/end` on a fresh connection; the status and echoed request id.
fn end_once(addr: SocketAddr, name: &str, id: &str) -> std::io::Result<(u16, String)> {
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    exchange(stream, name, id)
}

/// Sends the request on a connected stream and reads the answer.
fn exchange(mut stream: TcpStream, name: &str, id: &str) -> std::io::Result<(u16, String)> {
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    write!(
        stream,
        "POST /mpc/{name}/end HTTP/1.1\r\nHost: gateway\r\nAuthorization: Bearer {CALLER_TOKEN}\r\nX-Request-Id: {id}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer)?;
    let answer = String::from_utf8_lossy(&answer);
    let status = answer
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP answer: {answer:?}")))?;
    let echoed = answer
        .lines()
        .find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case("x-request-id")
                .then(|| value.trim().to_owned())
        })
        .unwrap_or_default();
    Ok((status, echoed))
}

/// Runs [`CALLERS`] callers against `addr` until `stop` is set (each bounded by
/// [`MAX_PER_CALLER`]); `replies` counts answered requests as they come.
fn start_load(
    addr: SocketAddr,
    tag: &'static str,
    stop: Arc<AtomicBool>,
    replies: Arc<AtomicUsize>,
) -> Vec<std::thread::JoinHandle<Vec<Sent>>> {
    (0..CALLERS)
        .map(|caller| {
            let stop = Arc::clone(&stop);
            let replies = Arc::clone(&replies);
            std::thread::spawn(move || {
                let mut sent = Vec::new();
                for n in 0..MAX_PER_CALLER {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let id = format!("{tag}-{caller:02}-{n:05}");
                    let name = format!("load-{tag}-{caller}-{n}");
                    // A refused connection means the gateway is gone: nothing was sent.
                    let Ok(stream) = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
                    else {
                        break;
                    };
                    let reply = match exchange(stream, &name, &id) {
                        Ok((status, echoed)) => {
                            assert_eq!(echoed, id, "the reply carries the caller's id");
                            replies.fetch_add(1, Ordering::SeqCst);
                            Some(status)
                        }
                        Err(_) => None,
                    };
                    sent.push(Sent { id, reply });
                }
                sent
            })
        })
        .collect()
}

/// Drives load, SIGKILLs the gateway mid-load, and returns what every caller saw.
fn load_then_kill(served: &mut Served, tag: &'static str) -> Vec<Sent> {
    let stop = Arc::new(AtomicBool::new(false));
    let replies = Arc::new(AtomicUsize::new(0));
    let callers = start_load(served.local, tag, Arc::clone(&stop), Arc::clone(&replies));
    let started = Instant::now();
    while replies.load(Ordering::SeqCst) < REPLIES_BEFORE_KILL
        && started.elapsed() < LOAD_BEFORE_KILL
    {
        std::thread::sleep(Duration::from_millis(5));
    }
    let status = served.kill_hard();
    stop.store(true, Ordering::SeqCst);
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(9),
        "killed by SIGKILL, not exited on its own: {status:?}"
    );
    let mut sent = Vec::new();
    for caller in callers {
        sent.extend(caller.join().expect("caller thread"));
    }
    sent
}

// ---------------------------------------------------------------------------------------
// Reading the audit files
// ---------------------------------------------------------------------------------------

/// The complete records of `files` (a torn last line of the last file is skipped) and
/// whether there was such a torn line.
fn complete_records(files: &[PathBuf]) -> (Vec<serde_json::Value>, bool) {
    let mut records = Vec::new();
    let mut torn = false;
    for (index, file) in files.iter().enumerate() {
        let bytes = std::fs::read(file).expect("read audit file");
        let text = String::from_utf8_lossy(&bytes);
        let mut lines: Vec<&str> = text.split_inclusive('\n').collect();
        if lines.last().is_some_and(|line| !line.ends_with('\n')) {
            assert_eq!(
                index,
                files.len() - 1,
                "only the live file may end torn: {}",
                file.display()
            );
            lines.pop();
            torn = true;
        }
        for line in lines {
            records.push(
                serde_json::from_str(line.trim_end_matches('\n'))
                    .unwrap_or_else(|err| panic!("{}: {err}: {line}", file.display())),
            );
        }
    }
    (records, torn)
}

/// Checks the promise: every answered request has the terminal record matching its
/// reply; every `forward` without a `result` belongs to an unanswered request; no
/// request has two terminal or two forward records; every record belongs to a request
/// that was sent.
fn assert_every_reply_is_recorded(sent: &[Sent], records: &[serde_json::Value], extra: &[&str]) {
    let mut by_id: HashMap<&str, Vec<&serde_json::Value>> = HashMap::new();
    for record in records {
        let id = record["request_id"].as_str().expect("request_id");
        by_id.entry(id).or_default().push(record);
    }
    let known: HashMap<&str, Option<u16>> = sent.iter().map(|s| (s.id.as_str(), s.reply)).collect();
    for (id, records) in &by_id {
        assert!(
            known.contains_key(id) || extra.contains(id),
            "a record for a request nobody sent: {id}"
        );
        let count = |event: &str| records.iter().filter(|r| r["event"] == event).count();
        assert!(count("forward") <= 1, "{id}: two forward records");
        assert!(
            count("result") + count("denied") <= 1,
            "{id}: two terminal records"
        );
        assert!(
            count("result") == 0 || count("forward") == 1,
            "{id}: a result without its forward"
        );
        if count("forward") == 1 && count("result") == 0 {
            assert_eq!(
                known.get(id).copied().flatten(),
                None,
                "{id}: a forward without a result, but the caller got a reply"
            );
        }
    }
    for s in sent {
        let Some(status) = s.reply else { continue };
        let terminal = by_id
            .get(s.id.as_str())
            .and_then(|records| {
                records
                    .iter()
                    .find(|r| r["event"] == "result" || r["event"] == "denied")
            })
            .unwrap_or_else(|| {
                panic!(
                    "{}: the caller got {status} but there is no terminal record",
                    s.id
                )
            });
        assert_eq!(
            terminal["status"], status,
            "{}: the record holds what the caller got",
            s.id
        );
    }
}

/// A torn record `seq`, as a crash in the middle of its write leaves it (start-up cuts
/// only the start of the record that comes next).
fn append_torn_tail(live: &Path, seq: u64) {
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(live)
        .expect("open live audit file");
    let torn = format!(r#"{{"seq":{seq},"ts":"2026-01-01T00:00:00.000Z","event":"forw"#);
    file.write_all(torn.as_bytes()).expect("append torn tail");
    file.sync_all().expect("fsync");
}

// ---------------------------------------------------------------------------------------
// The scenario
// ---------------------------------------------------------------------------------------

/// Load, SIGKILL, restart, serve, then check the log. `audit verify` is given the live
/// file, or with `verify_dir` the audit directory (every rotated file).
fn crash_and_recover(rotate_bytes: u64, tag: &'static str, verify_dir: bool) {
    let sim = start_sim();
    let setup = Setup::new(&sim.sim.base_url(), rotate_bytes);
    let verify_path = if verify_dir {
        setup.audit_dir()
    } else {
        setup.live_file()
    };

    let mut served = Served::start(&setup.config_path());
    let sent = load_then_kill(&mut served, tag);
    let replied: Vec<&Sent> = sent.iter().filter(|s| s.reply.is_some()).collect();
    let unanswered = sent.len() - replied.len();
    eprintln!(
        "{tag}: {} requests sent, {} answered, {unanswered} in flight without a reply at the kill",
        sent.len(),
        replied.len()
    );
    assert!(
        replied.len() >= 50,
        "enough load before the kill: {} replies",
        replied.len()
    );
    for s in &replied {
        assert_eq!(
            s.reply,
            Some(204),
            "{}: every request could be served",
            s.id
        );
    }

    // Straight after the kill: every acknowledged request is already on disk.
    let files = setup.audit_files();
    if verify_dir {
        assert!(
            files.len() > 3,
            "the load rotated the log several times: {files:?}"
        );
    }
    let (before, torn_by_kill) = complete_records(&files);
    assert_every_reply_is_recorded(&sent, &before, &[]);
    let (code, report) = audit_verify(&verify_path);
    let expected = if torn_by_kill { 3 } else { 0 };
    assert_eq!(
        code,
        Some(expected),
        "verify after the kill (torn tail: {torn_by_kill}): {report}"
    );
    let last_seq_before = before
        .last()
        .and_then(|r| r["seq"].as_u64())
        .expect("records were written before the kill");

    // Make sure the restart has a torn tail to cut, whether or not the kill left one.
    if !torn_by_kill {
        append_torn_tail(&setup.live_file(), last_seq_before + 1);
    }
    let (code, report) = audit_verify(&verify_path);
    assert_eq!(
        code,
        Some(3),
        "a torn final line is reported as such: {report}"
    );

    // Restart on the same audit path: it starts, cuts the tail with a warning, serves.
    let mut restarted = Served::start(&setup.config_path());
    let (status, echoed) =
        end_once(restarted.local, &format!("after-{tag}"), "after-restart").expect("served");
    assert_eq!(status, 204);
    assert_eq!(echoed, "after-restart");
    let log = restarted.log_text();
    let warned = log.lines().any(|line| {
        serde_json::from_str::<serde_json::Value>(line)
            .is_ok_and(|v| v["level"] == "WARN" && line.contains("torn") && line.contains("audit"))
    });
    assert!(warned, "a warning about the torn tail:\n{log}");

    // Stop it gracefully so the log is complete, then check everything.
    let status = Command::new("kill")
        .args(["-TERM", &restarted.child.id().to_string()])
        .status()
        .expect("run kill");
    assert!(status.success());
    let deadline = Instant::now() + PROCESS_TIMEOUT;
    let exit = loop {
        if let Some(exit) = restarted.child.try_wait().expect("try_wait") {
            break exit;
        }
        assert!(Instant::now() < deadline, "no exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(exit.code(), Some(0), "{}", restarted.log_text());

    let files = setup.audit_files();
    let (after, torn) = complete_records(&files);
    assert!(!torn, "no torn line remains after the restart");
    let (code, report) = audit_verify(&verify_path);
    assert_eq!(code, Some(0), "verify after the restart: {report}");
    // The chain, recomputed independently, across every file in seq order.
    assert_eq!(assert_chain(&files, None), after.len());
    assert_every_reply_is_recorded(&sent, &after, &["after-restart"]);

    // seq continues across the restart: the first record after it follows the last
    // complete record before it, and nothing written before the kill was lost.
    let first_new = after
        .iter()
        .position(|r| r["request_id"] == "after-restart")
        .expect("the request after the restart is recorded");
    assert_eq!(after[first_new]["seq"].as_u64(), Some(last_seq_before + 1));
    assert_eq!(first_new as u64, last_seq_before, "nothing lost or added");
    let new_events: Vec<&str> = after[first_new..]
        .iter()
        .map(|r| r["event"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(new_events, ["forward", "result"]);

    // Per-request summary of the pre-kill records, for the report.
    let mut events: BTreeMap<&str, usize> = BTreeMap::new();
    for record in &before {
        *events
            .entry(record["event"].as_str().unwrap_or_default())
            .or_default() += 1;
    }
    eprintln!(
        "{tag}: {} records before the kill ({events:?}), torn by the kill: {torn_by_kill}, {} files",
        before.len(),
        files.len()
    );
    drop(served);
}

#[test]
fn sigkill_under_load_loses_no_acknowledged_request_and_the_chain_continues() {
    crash_and_recover(100 * 1024 * 1024, "crash", false);
}

#[test]
fn sigkill_under_load_with_rotation_keeps_one_chain_across_all_files() {
    crash_and_recover(4096, "rotate", true);
}
