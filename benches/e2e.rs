//! End-to-end benchmark: `cargo bench --bench e2e` (issue 5).
//!
//! Starts the Plivo simulator and the gateway as separate processes of the release binary
//! on 127.0.0.1, pinned with `taskset` (this load generator on CPU 0, gateway and simulator
//! on CPU 1), drives them with an in-process hyper client (one current-thread tokio
//! runtime) and prints one markdown table plus a machine description on stdout. Progress
//! and diagnostics go to stderr. See `benches/README.md` for what each column means.
//!
//! Environment knobs: `E2E_SECONDS` (closed-loop duration, default 10), `E2E_FIXED_SECONDS`
//! (each fixed-rate run, default 5), `E2E_ROWS` (comma-separated subset of row ids:
//! `sim-http,sim-tls,gw-http,gw-tls,gw-tls-fsync,gw-tls-h2,gw-tls-h2-fsync,gw-tls-redis,nginx-tls`;
//! by default every row whose program (redis-server, nginx) is installed), `E2E_QUIET_WAIT` (seconds each row waits
//! for a quiet machine, default 30), `E2E_NICE` (nice value for every benchmarked process,
//! e.g. -10 on a shared machine; needs root), `E2E_RETRIES` (how often a row disturbed by
//! other processes is measured again, default 2), `E2E_ROTATE_BYTES` (audit `rotate_bytes`,
//! default 104857600 as shipped), `E2E_BIN` (skip the build, use this binary),
//! `E2E_NGINX_TLS` (the TLS versions nginx offers upstream, default `TLSv1.2 TLSv1.3`).
//!
//! It runs only with `--bench` (as `cargo bench` passes it): under `cargo test
//! --all-targets` it says so and succeeds at once. Run a built copy as `e2e-… --bench`.
//!
//! Safety: every child process is registered and killed when its guard drops, at the end of
//! `main`, and from the panic hook. Cargo ignores the release profile's `panic = "abort"`
//! for bench targets, so a panic unwinds: on the main thread the guards' drops run too; in
//! a load task it becomes a `JoinError`, counted as an error that invalidates the row (the
//! hook has killed the children by then, so the row fails). Every child is also started
//! under `setpriv --pdeathsig KILL` (when util-linux's `setpriv` is there): the kernel
//! SIGKILLs it when the process that started it dies, even by SIGKILL, so no simulator,
//! gateway, nginx or redis-server is left behind, and the pinned run itself dies with the
//! unpinned parent that started it. All traffic goes to 127.0.0.1; every loop is bounded
//! by a count and a deadline.
#![forbid(unsafe_code)]

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream as StdTcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty};
use hyper::client::conn::http1::SendRequest;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use rand::RngCore as _;
use sha2::Digest as _;
use tokio::net::TcpStream;

#[path = "e2e/nginx.rs"]
mod nginx;

const AUTH_ID: &str = "MABENCHE2E0000000001";
const CONNECTIONS: usize = 64;
const FIXED_RATES: [u64; 2] = [2_000, 10_000];
const WARMUP: Duration = Duration::from_millis(1_000);
/// How long a fixed-rate run may take to drain after its last scheduled send.
const DRAIN_LIMIT: Duration = Duration::from_secs(20);
/// How long the load generator's connections may take to close after the last phase.
const CLOSE_LIMIT: Duration = Duration::from_secs(2);
/// How long the process under test idles, its callers gone, before the second idle RSS.
const SETTLE: Duration = Duration::from_secs(2);
/// How long the simulator may take to print its count after SIGTERM (its own shutdown
/// grace is 2 s, twice that at most).
const SIM_STOP_LIMIT: Duration = Duration::from_secs(10);
/// Upper bound on requests per connection in one closed-loop run (a count bound on top of
/// the deadline).
const MAX_PER_CONNECTION: u64 = 10_000_000;
const PINNED_ENV: &str = "E2E_PINNED_CHILD";
/// A CPU counts as disturbed when other processes use more than this share of it.
const NOISE_LIMIT_PCT: f64 = 10.0;
/// How long a row waits for a quiet machine before it measures anyway.
const QUIET_WAIT_LIMIT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------
// Child process registry: killed on drop, at exit and from the panic hook.
// ---------------------------------------------------------------------------------------

static CHILD_PIDS: Mutex<Vec<u32>> = Mutex::new(Vec::new());

fn register(pid: u32) {
    CHILD_PIDS
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .push(pid);
}

fn unregister(pid: u32) {
    CHILD_PIDS
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .retain(|p| *p != pid);
}

/// Last-resort cleanup (panic hook): SIGKILL every registered child by its pid.
fn kill_registered() {
    let pids: Vec<u32> = CHILD_PIDS
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .drain(..)
        .collect();
    for pid in pids {
        let _ = Command::new("kill")
            .arg("-KILL")
            .arg(pid.to_string())
            .stderr(Stdio::null())
            .status();
    }
}

/// A spawned gateway or simulator; SIGKILLed and reaped on drop.
struct Proc {
    name: &'static str,
    child: Child,
    /// Last lines of its stderr, for error reports.
    stderr_tail: Arc<Mutex<VecDeque<String>>>,
}

impl Proc {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn tail(&self) -> String {
        let tail = self
            .stderr_tail
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        tail.iter().cloned().collect::<Vec<_>>().join("\n")
    }

    fn ensure_alive(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "{} exited early ({status}); stderr:\n{}",
                self.name,
                self.tail()
            );
        }
        Ok(())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        unregister(self.child.id());
    }
}

/// `E2E_NICE`: an optional nice value (-20..=19) for every benchmarked process and the
/// load generator, to shield them from other work on a shared machine (lowering it needs
/// root). Unset: normal priority.
fn nice_value() -> Option<i32> {
    std::env::var("E2E_NICE")
        .ok()
        .and_then(|v| v.trim().parse::<i32>().ok())
        .filter(|v| (-20..=19).contains(v))
}

/// Whether util-linux's `setpriv --pdeathsig` works here (checked once).
fn have_pdeathsig() -> bool {
    static HAVE: OnceLock<bool> = OnceLock::new();
    *HAVE.get_or_init(|| {
        Command::new("setpriv")
            .args(["--pdeathsig", "KILL", "true"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    })
}

/// `[setpriv --pdeathsig KILL] [taskset -c CPU] [nice -n N] program`: each wrapper execs,
/// so the child's pid is the program's pid. `setpriv` sets the parent-death signal (what
/// `prctl(PR_SET_PDEATHSIG)` in a `pre_exec` hook would, without `unsafe`), which exec
/// keeps: if this process dies, even by SIGKILL, the kernel SIGKILLs the child. Every
/// child is spawned from the main thread, whose end is the process's.
fn launcher(cpu: Option<u32>, program: &Path) -> Command {
    let mut words: Vec<std::ffi::OsString> = Vec::new();
    if have_pdeathsig() {
        words.extend(["setpriv".into(), "--pdeathsig".into(), "KILL".into()]);
    }
    if let Some(cpu) = cpu {
        words.extend(["taskset".into(), "-c".into(), cpu.to_string().into()]);
    }
    if let Some(nice) = nice_value() {
        words.extend(["nice".into(), "-n".into(), nice.to_string().into()]);
    }
    words.push(program.as_os_str().to_owned());
    let mut command = Command::new(&words[0]);
    command.args(&words[1..]);
    command
}

/// Spawns `bin args` pinned to `cpu` (via taskset when available). Stdout and stderr are
/// read by threads: every stdout line and every stderr line matching `stderr_marker` are
/// sent on the returned channel; the rest is drained so pipes never fill (and once the
/// channel is dropped, stdout too).
fn spawn(
    name: &'static str,
    bin: &Path,
    args: &[String],
    envs: &[(&str, &str)],
    cpu: Option<u32>,
    stderr_marker: Option<&'static str>,
) -> anyhow::Result<(Proc, mpsc::Receiver<String>)> {
    let mut command = launcher(cpu, bin);
    command
        .args(args)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in envs {
        command.env(k, v);
    }
    let mut child = command
        .spawn()
        .with_context(|| format!("spawning {name}"))?;
    register(child.id());
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let stderr_tail = Arc::new(Mutex::new(VecDeque::new()));
    let proc = Proc {
        name,
        child,
        stderr_tail: Arc::clone(&stderr_tail),
    };
    let (tx, rx) = mpsc::channel();
    if let Some(stdout) = stdout {
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
    }
    if let Some(stderr) = stderr {
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if stderr_marker.is_some_and(|m| line.contains(m)) {
                    let _ = tx.send(line.clone());
                }
                let mut tail = stderr_tail.lock().unwrap_or_else(PoisonError::into_inner);
                if tail.len() >= 20 {
                    tail.pop_front();
                }
                tail.push_back(line);
            }
        });
    }
    Ok((proc, rx))
}

/// `kill -SIGNAL pid` (the crate forbids the `unsafe` of calling `kill(2)` directly).
fn send_signal(pid: u32, signal: &str) -> anyhow::Result<()> {
    let status = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .context("running kill")?;
    if !status.success() {
        bail!("kill -{signal} {pid} failed ({status})");
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// /proc readings
// ---------------------------------------------------------------------------------------

/// utime + stime of a process (all threads), in clock ticks.
fn cpu_ticks(pid: &str) -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .ok_or_else(|| anyhow!("odd /proc/{pid}/stat"))?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // Field 3 (state) is fields[0]; utime is field 14, stime field 15.
    let utime: u64 = fields.get(11).ok_or_else(|| anyhow!("no utime"))?.parse()?;
    let stime: u64 = fields.get(12).ok_or_else(|| anyhow!("no stime"))?.parse()?;
    Ok(utime + stime)
}

/// Context switches (voluntary + involuntary) over every thread of a process, and the
/// number of threads.
fn context_switches(pid: &str) -> anyhow::Result<(u64, usize)> {
    let mut total = 0;
    let mut threads = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let Ok(status) = std::fs::read_to_string(task?.path().join("status")) else {
            continue; // the thread exited meanwhile
        };
        threads += 1;
        for line in status.lines() {
            if let Some(v) = line
                .strip_prefix("voluntary_ctxt_switches:")
                .or_else(|| line.strip_prefix("nonvoluntary_ctxt_switches:"))
            {
                total += v.trim().parse::<u64>().unwrap_or(0);
            }
        }
    }
    Ok((total, threads))
}

/// A `Vm*:` line of /proc/<pid>/status, in KiB.
fn status_kib(pid: &str, key: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix(key))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kb| kb.parse().ok())
        .ok_or_else(|| anyhow!("no {key} in /proc/{pid}/status"))
}

/// (busy, steal) ticks of one CPU from /proc/stat; busy excludes idle, iowait and steal.
fn cpu_busy(cpu: u32) -> anyhow::Result<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let prefix = format!("cpu{cpu} ");
    let line = stat
        .lines()
        .find(|l| l.starts_with(&prefix))
        .ok_or_else(|| anyhow!("no {prefix} in /proc/stat"))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal ...
    let get = |i: usize| v.get(i).copied().unwrap_or(0);
    let steal = get(7);
    let busy = get(0) + get(1) + get(2) + get(5) + get(6);
    Ok((busy, steal))
}

/// Waits (bounded) until both CPUs are at most [`NOISE_LIMIT_PCT`] busy over a 300 ms
/// window, so a row does not start while something else (a build) runs.
fn wait_for_quiet(limit: Duration) -> anyhow::Result<(Duration, bool)> {
    let started = Instant::now();
    let ticks = clock_ticks_per_second() as f64;
    let window = Duration::from_millis(300);
    loop {
        let before = (cpu_busy(0)?, cpu_busy(1)?);
        std::thread::sleep(window);
        let after = (cpu_busy(0)?, cpu_busy(1)?);
        let pct = |a: u64, b: u64| (b - a) as f64 / ticks / window.as_secs_f64() * 100.0;
        let busiest = pct(before.0 .0, after.0 .0).max(pct(before.1 .0, after.1 .0));
        if busiest <= NOISE_LIMIT_PCT {
            return Ok((started.elapsed(), true));
        }
        if started.elapsed() >= limit {
            return Ok((started.elapsed(), false));
        }
    }
}

fn clock_ticks_per_second() -> u64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100)
}

// ---------------------------------------------------------------------------------------
// Small blocking HTTP/1.1 client for the admin listener (readiness, metrics)
// ---------------------------------------------------------------------------------------

fn admin_get(addr: SocketAddr, path: &str, timeout: Duration) -> anyhow::Result<(u16, String)> {
    let mut stream = StdTcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    stream.take(64 << 20).read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("no status line from {addr}{path}"))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

// ---------------------------------------------------------------------------------------
// Load generation
// ---------------------------------------------------------------------------------------

type Conn = SendRequest<Empty<Bytes>>;

/// Unique MPC names across the whole benchmark.
static NEXT_NAME: AtomicU64 = AtomicU64::new(0);

#[derive(Clone)]
struct Target {
    addr: SocketAddr,
    /// `Host` header value.
    host: String,
    tls: Option<tokio_rustls::TlsConnector>,
    /// `Authorization` header value (Bearer for the gateway, Basic for the simulator).
    authorization: String,
    direct: bool,
}

impl Target {
    /// A proxy (the gateway or nginx) on `addr`, called as a tenant would.
    fn proxy(addr: SocketAddr, env: &Env) -> Target {
        Target {
            addr,
            host: addr.to_string(),
            tls: None,
            authorization: format!("Bearer {}", env.caller_token),
            direct: false,
        }
    }

    fn request(&self) -> anyhow::Result<Request<Empty<Bytes>>> {
        let n = NEXT_NAME.fetch_add(1, Ordering::Relaxed);
        let (method, uri) = if self.direct {
            (
                Method::DELETE,
                format!("/v1/Account/{AUTH_ID}/MultiPartyCall/name_bench-{n}/"),
            )
        } else {
            (Method::POST, format!("/mpc/bench-{n}/end"))
        };
        let mut builder = Request::builder()
            .method(method)
            .uri(uri)
            .header(hyper::header::HOST, &self.host)
            .header(hyper::header::AUTHORIZATION, &self.authorization);
        if !self.direct {
            builder = builder.header(hyper::header::CONTENT_LENGTH, "0");
        }
        Ok(builder.body(Empty::new())?)
    }

    async fn connect(&self) -> anyhow::Result<Conn> {
        let tcp = TcpStream::connect(self.addr).await?;
        tcp.set_nodelay(true)?;
        match &self.tls {
            None => {
                let (sender, conn) =
                    hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
                tokio::spawn(conn);
                Ok(sender)
            }
            Some(connector) => {
                let name = rustls::pki_types::ServerName::try_from("localhost")?.to_owned();
                let tls = connector.connect(name, tcp).await?;
                let (sender, conn) =
                    hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
                tokio::spawn(conn);
                Ok(sender)
            }
        }
    }
}

/// One request on one connection: the status, or an error.
async fn exchange(conn: &mut Conn, request: Request<Empty<Bytes>>) -> anyhow::Result<StatusCode> {
    conn.ready().await?;
    let response = conn.send_request(request).await?;
    let status = response.status();
    response.into_body().collect().await?;
    Ok(status)
}

#[derive(Default)]
struct PhaseResult {
    ok: u64,
    bad_status: u64,
    errors: u64,
    first_problem: Option<String>,
    /// Nanoseconds; for fixed-rate runs measured from the intended send time.
    latencies: Vec<u64>,
    elapsed: Duration,
    /// Fixed rate only: how long after the last scheduled send the last answer came (each
    /// task notes when its answer came, so joining and recording are not counted).
    drain: Duration,
    timed_out: bool,
}

impl PhaseResult {
    fn merge(&mut self, other: PhaseResult) {
        self.ok += other.ok;
        self.bad_status += other.bad_status;
        self.errors += other.errors;
        if self.first_problem.is_none() {
            self.first_problem = other.first_problem;
        }
        self.latencies.extend(other.latencies);
        self.timed_out |= other.timed_out;
    }

    fn record(&mut self, outcome: anyhow::Result<StatusCode>, latency: Duration) {
        match outcome {
            Ok(StatusCode::NO_CONTENT) => {
                self.ok += 1;
                self.latencies.push(latency.as_nanos() as u64);
            }
            Ok(status) => {
                self.bad_status += 1;
                self.first_problem
                    .get_or_insert_with(|| format!("status {status}"));
            }
            Err(err) => {
                self.errors += 1;
                self.first_problem.get_or_insert_with(|| format!("{err:#}"));
            }
        }
    }

    /// A load task that panicked (or was cancelled): an error, so the run is invalid. Its
    /// requests are not in [`PhaseResult::total`].
    fn task_failed(&mut self, err: &tokio::task::JoinError) {
        self.errors += 1;
        self.first_problem
            .get_or_insert_with(|| format!("load task failed: {err}"));
    }

    fn total(&self) -> u64 {
        self.ok + self.bad_status + self.errors
    }

    fn clean(&self) -> bool {
        self.bad_status == 0 && self.errors == 0 && !self.timed_out
    }

    fn percentile_ms(&mut self, q: f64) -> Option<f64> {
        if self.latencies.is_empty() {
            return None;
        }
        self.latencies.sort_unstable();
        let n = self.latencies.len();
        let rank = ((q * n as f64).ceil() as usize).clamp(1, n);
        Some(self.latencies[rank - 1] as f64 / 1e6)
    }
}

/// Closed loop: each connection sends its next request as soon as the previous answer is
/// read, until `duration` has passed.
async fn closed_loop(
    conns: Vec<Conn>,
    target: &Target,
    duration: Duration,
) -> (Vec<Conn>, PhaseResult) {
    let started = Instant::now();
    let deadline = started + duration;
    let mut tasks = tokio::task::JoinSet::new();
    for mut conn in conns {
        let target = target.clone();
        tasks.spawn(async move {
            let mut result = PhaseResult::default();
            let mut sent = 0u64;
            while sent < MAX_PER_CONNECTION && Instant::now() < deadline {
                sent += 1;
                let begin = Instant::now();
                let outcome = match target.request() {
                    Ok(request) => exchange(&mut conn, request).await,
                    Err(err) => Err(err),
                };
                let failed = outcome.is_err();
                result.record(outcome, begin.elapsed());
                if failed {
                    break; // the connection is unusable; the run is already invalid
                }
            }
            (conn, result)
        });
    }
    let mut conns = Vec::new();
    let mut total = PhaseResult::default();
    let hard_limit = duration + Duration::from_secs(30);
    while let Ok(Some(joined)) = tokio::time::timeout(
        hard_limit.saturating_sub(started.elapsed()),
        tasks.join_next(),
    )
    .await
    {
        match joined {
            Ok((conn, result)) => {
                conns.push(conn);
                total.merge(result);
            }
            Err(err) => total.task_failed(&err),
        }
    }
    if !tasks.is_empty() {
        total.timed_out = true;
        tasks.abort_all();
    }
    total.elapsed = started.elapsed();
    (conns, total)
}

/// Fixed rate, coordinated-omission corrected: request `i` is due at `t0 + i/rate`; it
/// takes the next idle connection (FIFO), and its latency runs from the due time to the
/// end of the answer, so time spent queued behind a slow answer is counted. The
/// dispatcher spins (yielding to the runtime) rather than sleeping, because tokio's timer
/// has 1 ms granularity; CPU 0 belongs to the load generator anyway.
async fn fixed_rate(
    conns: Vec<Conn>,
    target: &Target,
    rate: u64,
    duration: Duration,
) -> (Vec<Conn>, PhaseResult) {
    let slots = conns.len();
    // FIFO: every connection takes its turn. A stack would leave most of them idle for
    // whole phases, and the gateway closes keep-alive connections idle for 10 s.
    let pool = Arc::new(Mutex::new(std::collections::VecDeque::from(conns)));
    let idle = Arc::new(tokio::sync::Semaphore::new(slots));
    let count = (rate as f64 * duration.as_secs_f64()).round() as u64;
    let interval_ns = 1e9 / rate as f64;
    let t0 = Instant::now() + Duration::from_millis(5);
    let spin_limit = t0 + duration + Duration::from_secs(5);
    let mut tasks = tokio::task::JoinSet::new();
    let mut result = PhaseResult::default();
    let mut last_due = t0;
    let mut i = 0u64;
    while i < count {
        let due = t0 + Duration::from_nanos((i as f64 * interval_ns) as u64);
        let now = Instant::now();
        if now > spin_limit {
            result.timed_out = true;
            break;
        }
        if now < due {
            tokio::task::yield_now().await;
            continue;
        }
        let pool = Arc::clone(&pool);
        let idle = Arc::clone(&idle);
        let target = target.clone();
        // Each task returns when its answer was read, for the drain time.
        tasks.spawn(async move {
            let Ok(_permit) = idle.acquire().await else {
                return (
                    Err(anyhow!("semaphore closed")),
                    Duration::ZERO,
                    Instant::now(),
                );
            };
            let taken = pool
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .pop_front();
            let Some(mut conn) = taken else {
                return (
                    Err(anyhow!("no idle connection")),
                    Duration::ZERO,
                    Instant::now(),
                );
            };
            let outcome = match target.request() {
                Ok(request) => exchange(&mut conn, request).await,
                Err(err) => Err(err),
            };
            let answered = Instant::now();
            pool.lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push_back(conn);
            (outcome, answered - due, answered)
        });
        last_due = due;
        i += 1;
    }
    let drain_deadline = Instant::now() + DRAIN_LIMIT;
    let mut last_answer = last_due;
    while let Ok(Some(joined)) = tokio::time::timeout(
        drain_deadline.saturating_duration_since(Instant::now()),
        tasks.join_next(),
    )
    .await
    {
        match joined {
            Ok((outcome, latency, answered)) => {
                result.record(outcome, latency);
                last_answer = last_answer.max(answered);
            }
            Err(err) => result.task_failed(&err),
        }
    }
    if !tasks.is_empty() {
        result.timed_out = true;
        result
            .first_problem
            .get_or_insert_with(|| format!("{} requests still open after the drain", tasks.len()));
        tasks.abort_all();
    }
    result.drain = last_answer - last_due;
    result.elapsed = t0.elapsed();
    let conns = std::mem::take(&mut *pool.lock().unwrap_or_else(PoisonError::into_inner));
    (conns.into(), result)
}

// ---------------------------------------------------------------------------------------
// Rows
// ---------------------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    SimHttp,
    SimTls,
    GwHttp,
    GwTls,
    GwTlsFsync,
    GwTlsH2,
    GwTlsH2Fsync,
    GwTlsRedis,
    NginxTls,
}

impl Kind {
    const ALL: [Kind; 9] = [
        Kind::SimHttp,
        Kind::SimTls,
        Kind::GwHttp,
        Kind::GwTls,
        Kind::GwTlsFsync,
        Kind::GwTlsH2,
        Kind::GwTlsH2Fsync,
        Kind::GwTlsRedis,
        Kind::NginxTls,
    ];

    fn id(self) -> &'static str {
        match self {
            Kind::SimHttp => "sim-http",
            Kind::SimTls => "sim-tls",
            Kind::GwHttp => "gw-http",
            Kind::GwTls => "gw-tls",
            Kind::GwTlsFsync => "gw-tls-fsync",
            Kind::GwTlsH2 => "gw-tls-h2",
            Kind::GwTlsH2Fsync => "gw-tls-h2-fsync",
            Kind::GwTlsRedis => "gw-tls-redis",
            Kind::NginxTls => "nginx-tls",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Kind::SimHttp => "simulator direct, HTTP (floor)",
            Kind::SimTls => "simulator direct, TLS",
            Kind::GwHttp => "gateway, HTTP upstream, audit fsync: never",
            Kind::GwTls => "gateway, TLS upstream (HTTP/1.1), audit fsync: never",
            Kind::GwTlsFsync => "gateway, TLS upstream (HTTP/1.1), audit fsync: always",
            Kind::GwTlsH2 => "gateway, TLS upstream (HTTP/2), audit fsync: never",
            Kind::GwTlsH2Fsync => "gateway, TLS upstream (HTTP/2), audit fsync: always",
            Kind::GwTlsRedis => "gateway, TLS upstream, fsync: never, limits in Redis",
            Kind::NginxTls => "nginx 1.22, same job: TLS upstream (HTTP/1.1), JSON access log",
        }
    }

    fn tls(self) -> bool {
        matches!(
            self,
            Kind::SimTls
                | Kind::GwTls
                | Kind::GwTlsFsync
                | Kind::GwTlsH2
                | Kind::GwTlsH2Fsync
                | Kind::GwTlsRedis
                | Kind::NginxTls
        )
    }

    /// Whether the simulator offers HTTP/2 (by ALPN) to the gateway.
    fn http2(self) -> bool {
        matches!(self, Kind::GwTlsH2 | Kind::GwTlsH2Fsync)
    }

    fn fsync_always(self) -> bool {
        matches!(self, Kind::GwTlsFsync | Kind::GwTlsH2Fsync)
    }

    fn gateway(self) -> bool {
        matches!(
            self,
            Kind::GwHttp
                | Kind::GwTls
                | Kind::GwTlsFsync
                | Kind::GwTlsH2
                | Kind::GwTlsH2Fsync
                | Kind::GwTlsRedis
        )
    }

    /// Whether a proxy (the gateway or nginx) stands between the load and the simulator.
    fn proxied(self) -> bool {
        self.gateway() || self == Kind::NginxTls
    }

    /// The external program the row needs besides this binary, if any.
    fn needs(self) -> Option<&'static str> {
        match self {
            Kind::GwTlsRedis => Some("redis-server"),
            Kind::NginxTls => Some("nginx"),
            _ => None,
        }
    }
}

/// Whether `program -v` runs (both redis-server and nginx print their version).
fn installed(program: &str) -> bool {
    Command::new(program)
        .arg("-v")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

/// A redis-server for the Redis row, on CPU 1 beside the gateway; killed on drop.
struct Redis {
    proc: Proc,
    port: u16,
}

fn start_redis(env: &Env) -> anyhow::Result<Redis> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let args: Vec<String> = ["--port", &port.to_string(), "--bind", "127.0.0.1"]
        .iter()
        .map(|s| s.to_string())
        .chain(["--save", "", "--appendonly", "no"].map(str::to_owned))
        .collect();
    let (proc, _) = spawn(
        "redis-server",
        Path::new("redis-server"),
        &args,
        &[],
        env.pinned.then_some(1),
        None,
    )
    .context("starting redis-server (apt-get install redis-server)")?;
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            bail!("redis-server did not listen on {port} within 5 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(Redis { proc, port })
}

/// The `rate_limit_store` section for the Redis row: `deny` on errors, so a run that
/// did not really go through Redis is not counted (every answer must be 204).
fn redis_store_yaml(redis: Option<&Redis>) -> String {
    redis.map_or_else(String::new, |redis| {
        format!(
            "rate_limit_store:\n  kind: redis\n  url: redis://127.0.0.1:{}/0\n  key_prefix: e2e\n  timeout: 50ms\n  on_error: deny\n",
            redis.port
        )
    })
}

/// One fixed-rate run: rate, p50, p99, p99.9 (ms) and the drain time.
type FixedRun = (u64, Option<f64>, Option<f64>, Option<f64>, Duration);

struct RowResult {
    kind: Kind,
    closed_rps: f64,
    closed_p50: Option<f64>,
    closed_p99: Option<f64>,
    loadgen_cpu_pct: f64,
    /// How many times the row was measured (see `E2E_RETRIES`).
    attempts: u32,
    /// % of CPU 0 and CPU 1 used by other processes during the closed loop.
    foreign: (f64, f64),
    noisy: bool,
    /// How long the row waited for a quiet machine before starting (and whether it got one).
    quiet_wait: (Duration, bool),
    /// Context switches of the process under test per request (closed loop).
    switches_per_req: f64,
    /// Threads of the process under test at the end of the closed loop.
    threads: usize,
    /// CPU 1 during the closed loop: busy %, of which the processes under test, steal %.
    cpu1: (f64, f64, f64),
    fixed: Vec<FixedRun>,
    /// CPU µs/request of the process under test (gateway, or the simulator for direct rows).
    cpu_us: f64,
    /// Simulator CPU µs/request in gateway rows.
    sim_cpu_us: Option<f64>,
    /// redis-server CPU µs/request in the Redis row.
    redis_cpu_us: Option<f64>,
    /// CPU µs/request of the process under test during the 2,000/s run, and what one
    /// clock tick is worth there (its resolution).
    cpu_us_at_2k: (f64, f64),
    peak_rss_mib: f64,
    /// Right after the process became ready, before any load.
    idle_rss_mib: f64,
    /// After the last phase, the load generator's connections closed and [`SETTLE`].
    idle_rss_after_mib: f64,
    ready_ms: f64,
    sent: u64,
    checks: Vec<String>,
    valid: bool,
}

struct Env {
    bin: PathBuf,
    pinned: bool,
    ticks: u64,
    closed: Duration,
    fixed: Duration,
    pki_dir: PathBuf,
    pki: mpc_gateway::simulator::TestPki,
    sim_token: String,
    caller_token: String,
    audit_key: String,
}

fn random_token(prefix: &str) -> String {
    let mut bytes = [0u8; 24];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    format!("{prefix}{}", hex::encode(bytes))
}

fn client_tls(pki: &mpc_gateway::simulator::TestPki) -> anyhow::Result<tokio_rustls::TlsConnector> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(pki.root_store()?)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

/// The standalone simulator, and the rest of its stdout: the `requests N` line it prints
/// once stopped.
struct Sim {
    proc: Proc,
    lines: mpsc::Receiver<String>,
}

impl Sim {
    /// SIGTERM, then the number of requests it received, from the `requests N` line it
    /// prints once its shutdown is done (bounded by [`SIM_STOP_LIMIT`]).
    fn stop_and_count(self) -> anyhow::Result<u64> {
        send_signal(self.proc.pid(), "TERM")?;
        let deadline = Instant::now() + SIM_STOP_LIMIT;
        for _ in 0..100 {
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok(line) = self.lines.recv_timeout(left) else {
                break;
            };
            if let Some(n) = line.strip_prefix("requests ") {
                return n
                    .trim()
                    .parse()
                    .with_context(|| format!("simulator count {line:?}"));
            }
        }
        bail!(
            "the simulator printed no `requests N` line within {SIM_STOP_LIMIT:?} of SIGTERM; stderr:\n{}",
            self.proc.tail()
        )
    }
}

fn start_simulator(env: &Env, kind: Kind) -> anyhow::Result<(Sim, String, Duration)> {
    let mut args: Vec<String> = [
        "simulator",
        "--listen",
        "127.0.0.1:0",
        "--auth-id",
        AUTH_ID,
        "--auth-token-env",
        "E2E_SIM_TOKEN",
        "--forget-ended",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if kind.tls() {
        args.push("--tls-cert".into());
        args.push(env.pki_dir.join("server.pem").display().to_string());
        args.push("--tls-key".into());
        args.push(env.pki_dir.join("server-key.pem").display().to_string());
    }
    if kind.http2() {
        args.push("--http2".into());
    }
    let spawned_at = Instant::now();
    let (mut proc, lines) = spawn(
        "simulator",
        &env.bin,
        &args,
        &[("E2E_SIM_TOKEN", &env.sim_token)],
        env.pinned.then_some(1),
        None,
    )?;
    let line = lines
        .recv_timeout(Duration::from_secs(10))
        .map_err(|_| anyhow!("simulator did not start; stderr:\n{}", proc.tail()))?;
    let ready = spawned_at.elapsed();
    proc.ensure_alive()?;
    let base_url = line
        .strip_prefix("simulator listening on ")
        .ok_or_else(|| anyhow!("unexpected simulator output: {line:?}"))?
        .trim()
        .to_owned();
    Ok((Sim { proc, lines }, base_url, ready))
}

fn port_of(base_url: &str) -> anyhow::Result<u16> {
    base_url
        .rsplit_once(':')
        .and_then(|(_, p)| p.trim_end_matches('/').parse().ok())
        .ok_or_else(|| anyhow!("no port in {base_url}"))
}

/// `E2E_ROTATE_BYTES`: the audit `rotate_bytes` (default 104857600, the shipped default).
fn rotate_bytes() -> u64 {
    std::env::var("E2E_ROTATE_BYTES")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|v| *v >= 1024)
        .unwrap_or(104_857_600)
}

fn gateway_config(
    env: &Env,
    dir: &Path,
    base_url: &str,
    tls: bool,
    fsync: &str,
    extra: &str,
) -> String {
    let token_hash = hex::encode(sha2::Sha256::digest(env.caller_token.as_bytes()));
    let ca = if tls {
        format!("\"{}\"", env.pki_dir.join("ca.pem").display())
    } else {
        "null".to_owned()
    };
    format!(
        r#"# generated by benches/e2e.rs
listen: 127.0.0.1:0
admin_listen: 127.0.0.1:0
shutdown_grace: 11s
worker_threads: 1
accounts:
  default:
    auth_id: {AUTH_ID}
    auth_token: {{env: E2E_PLIVO_TOKEN}}
    rate_limit: {{per_second: 1000000, burst: 1000000}}
upstream:
  base_url: {base_url}
  ca_file: {ca}
  connect_timeout: 2s
  timeout: 10s
  max_attempts: 3
tenants:
  bench:
    tokens: ["sha256:{token_hash}"]
    allow: ["bench-*"]
    rate_limit: {{per_second: 1000000, burst: 1000000}}
audit:
  path: "{audit}"
  fsync: {fsync}
  rotate_bytes: {rotate_bytes}
  hmac_key: {{env: E2E_AUDIT_KEY}}
log:
  format: json
  # warn, plus the one info line that reports the bound addresses
  level: "warn,mpc_gateway::server=info"
{extra}"#,
        audit = dir.join("audit.jsonl").display(),
        rotate_bytes = rotate_bytes(),
    )
}

struct Gateway {
    proc: Proc,
    local: SocketAddr,
    admin: SocketAddr,
    ready: Duration,
}

fn start_gateway(env: &Env, config_path: &Path) -> anyhow::Result<Gateway> {
    let args = vec![
        "serve".to_owned(),
        "--config".to_owned(),
        config_path.display().to_string(),
    ];
    let spawned_at = Instant::now();
    let (mut proc, lines) = spawn(
        "gateway",
        &env.bin,
        &args,
        &[
            ("E2E_PLIVO_TOKEN", &env.sim_token),
            ("E2E_AUDIT_KEY", &env.audit_key),
        ],
        env.pinned.then_some(1),
        Some("mpc-gateway listening"),
    )?;
    let line = lines
        .recv_timeout(Duration::from_secs(10))
        .map_err(|_| anyhow!("gateway did not start; stderr:\n{}", proc.tail()))?;
    let json: serde_json::Value =
        serde_json::from_str(&line).with_context(|| format!("parsing {line:?}"))?;
    let field = |name: &str| -> anyhow::Result<SocketAddr> {
        let value = json
            .get(name)
            .or_else(|| json.get("fields").and_then(|f| f.get(name)))
            .and_then(|v| v.as_str())
            .ok_or_else(|| anyhow!("no {name} in {line:?}"))?;
        Ok(value.parse()?)
    };
    let local = field("local_addr")?;
    let admin = field("admin_addr")?;
    let poll_deadline = spawned_at + Duration::from_secs(10);
    loop {
        if let Ok((200, _)) = admin_get(admin, "/readyz", Duration::from_secs(1)) {
            break;
        }
        proc.ensure_alive()?;
        if Instant::now() > poll_deadline {
            bail!("gateway not ready within 10 s; stderr:\n{}", proc.tail());
        }
        std::thread::sleep(Duration::from_micros(500));
    }
    let ready = spawned_at.elapsed();
    Ok(Gateway {
        proc,
        local,
        admin,
        ready,
    })
}

/// Sums every `mpc_gateway_upstream_requests_total{status=...}` series.
fn upstream_counts(metrics: &str) -> (f64, f64) {
    let mut ok = 0.0;
    let mut all = 0.0;
    for line in metrics.lines() {
        if let Some(rest) = line.strip_prefix("mpc_gateway_upstream_requests_total{") {
            let value: f64 = rest
                .rsplit_once(' ')
                .and_then(|(_, v)| v.trim().parse().ok())
                .unwrap_or(0.0);
            all += value;
            if rest.starts_with("status=\"204\"}") {
                ok += value;
            }
        }
    }
    (ok, all)
}

/// Counts, over every audit file in `dir` (rotated ones included): result records,
/// result records with status 204, and records with `"attempts":1` (only result records
/// carry a number there).
fn audit_counts(dir: &Path) -> anyhow::Result<(u64, u64, u64, u64)> {
    let (mut lines, mut results, mut ok, mut single) = (0, 0, 0, 0);
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let is_audit = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("audit.jsonl"));
        if !is_audit {
            continue;
        }
        let text = std::fs::read_to_string(&path)?;
        for line in text.lines() {
            lines += 1;
            if line.contains("\"event\":\"result\"") {
                results += 1;
                if line.contains("\"status\":204,") {
                    ok += 1;
                }
                if line.contains("\"attempts\":1,") {
                    single += 1;
                }
            }
        }
    }
    Ok((lines, results, ok, single))
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn run_row(env: &Env, rt: &tokio::runtime::Runtime, kind: Kind) -> anyhow::Result<RowResult> {
    eprintln!("== {}", kind.label());
    let limit = env_secs("E2E_QUIET_WAIT", QUIET_WAIT_LIMIT.as_secs_f64())?;
    let quiet_wait = wait_for_quiet(limit)?;
    if !quiet_wait.1 {
        eprintln!(
            "   warning: the machine did not become quiet within {:.0} s; measuring anyway",
            limit.as_secs_f64()
        );
    }
    let dir = tempfile::Builder::new().prefix("mpc-e2e-").tempdir()?;
    let (sim, base_url, sim_ready) = start_simulator(env, kind)?;
    let sim_pid = sim.proc.pid().to_string();
    let sim_port = port_of(&base_url)?;
    let tls_connector = if kind.tls() {
        Some(client_tls(&env.pki)?)
    } else {
        None
    };

    let mut gateway = None;
    let mut nginx = None;
    let redis = if kind == Kind::GwTlsRedis {
        Some(start_redis(env)?)
    } else {
        None
    };
    let (target, pid, ready) = if kind.gateway() {
        let config = gateway_config(
            env,
            dir.path(),
            &base_url,
            kind.tls(),
            if kind.fsync_always() {
                "always"
            } else {
                "never"
            },
            &redis_store_yaml(redis.as_ref()),
        );
        let config_path = dir.path().join("gateway.yaml");
        std::fs::write(&config_path, config)?;
        let gw = start_gateway(env, &config_path)?;
        let target = Target::proxy(gw.local, env);
        let pid = gw.proc.pid().to_string();
        let ready = gw.ready;
        gateway = Some(gw);
        (target, pid, ready)
    } else if kind == Kind::NginxTls {
        let proxy = nginx::start(env, dir.path(), sim_port)?;
        let target = Target::proxy(proxy.addr, env);
        let pid = proxy.proc.pid().to_string();
        let ready = proxy.ready;
        nginx = Some(proxy);
        (target, pid, ready)
    } else {
        let basic = base64::engine::general_purpose::STANDARD
            .encode(format!("{AUTH_ID}:{}", env.sim_token));
        let target = Target {
            addr: SocketAddr::from(([127, 0, 0, 1], sim_port)),
            host: format!(
                "{}:{sim_port}",
                if kind.tls() { "localhost" } else { "127.0.0.1" }
            ),
            tls: tls_connector,
            authorization: format!("Basic {basic}"),
            direct: true,
        };
        // "Ready" for the simulator: its listening line, then a TCP connect succeeds.
        let deadline = Instant::now() + Duration::from_secs(5);
        while StdTcpStream::connect(target.addr).is_err() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_micros(500));
        }
        (target, sim_pid.clone(), sim_ready)
    };
    let idle_rss = status_kib(&pid, "VmRSS:")?;

    let mut sent = 0u64;
    let mut all_clean = true;
    let mut checks = Vec::new();
    let mut problems = Vec::new();

    // Connections (kept alive across every phase), then a warm-up that also fills the
    // gateway's upstream pool and TLS sessions.
    let conns = rt.block_on(async {
        let mut conns = Vec::with_capacity(CONNECTIONS);
        for _ in 0..CONNECTIONS {
            conns.push(target.connect().await?);
        }
        anyhow::Ok(conns)
    })?;
    let (conns, warm) = rt.block_on(closed_loop(conns, &target, WARMUP));
    sent += warm.total();
    all_clean &= warm.clean();
    if let Some(p) = &warm.first_problem {
        problems.push(format!("warm-up: {p}"));
    }

    // Closed loop.
    let self_pid = std::process::id().to_string();
    // redis-server is part of the Redis row: its CPU is the row's, not another process's.
    let redis_pid = redis.as_ref().map(|r| r.proc.pid().to_string());
    let redis_ticks = || redis_pid.as_deref().map_or(Ok(0), cpu_ticks);
    let (cpu0, sim0, me0, redis0) = (
        cpu_ticks(&pid)?,
        cpu_ticks(&sim_pid)?,
        cpu_ticks(&self_pid)?,
        redis_ticks()?,
    );
    let core0 = cpu_busy(1)?;
    let zero0 = cpu_busy(0)?;
    let switches0 = context_switches(&pid)?.0;
    let (conns, mut closed) = rt.block_on(closed_loop(conns, &target, env.closed));
    let (cpu1, sim1, me1, redis1) = (
        cpu_ticks(&pid)?,
        cpu_ticks(&sim_pid)?,
        cpu_ticks(&self_pid)?,
        redis_ticks()?,
    );
    let core1 = cpu_busy(1)?;
    let zero1 = cpu_busy(0)?;
    let (switches1, threads) = context_switches(&pid)?;
    let upstream_conns = established_to(sim_port)?;
    let wall_ticks = closed.elapsed.as_secs_f64() * env.ticks as f64;
    let server_pct = |busy: u64| busy as f64 / wall_ticks * 100.0;
    let cpu1_busy_pct = server_pct(core1.0 - core0.0);
    let cpu1_steal_pct = server_pct(core1.1 - core0.1);
    let cpu1_ours_pct = if kind.proxied() {
        server_pct((cpu1 - cpu0) + (sim1 - sim0) + (redis1 - redis0))
    } else {
        server_pct(cpu1 - cpu0)
    };
    sent += closed.total();
    all_clean &= closed.clean();
    if let Some(p) = &closed.first_problem {
        problems.push(format!("closed loop: {p}"));
    }
    let per_req_us = |ticks: u64, n: u64| -> f64 {
        if n == 0 {
            0.0
        } else {
            ticks as f64 * 1e6 / env.ticks as f64 / n as f64
        }
    };
    let closed_rps = closed.ok as f64 / closed.elapsed.as_secs_f64();
    let cpu_us = per_req_us(cpu1 - cpu0, closed.ok);
    let sim_cpu_us = kind.proxied().then(|| per_req_us(sim1 - sim0, closed.ok));
    let redis_cpu_us = redis_pid
        .is_some()
        .then(|| per_req_us(redis1 - redis0, closed.ok));
    let loadgen_cpu_pct =
        (me1 - me0) as f64 / env.ticks as f64 / closed.elapsed.as_secs_f64() * 100.0;
    // CPU time other processes took on our two cores (builds, other benchmarks...).
    let foreign = (
        (server_pct(zero1.0 - zero0.0) - loadgen_cpu_pct).max(0.0),
        (cpu1_busy_pct - cpu1_ours_pct).max(0.0),
    );
    let noisy = foreign.0 > NOISE_LIMIT_PCT || foreign.1 > NOISE_LIMIT_PCT;
    if noisy {
        eprintln!(
            "   warning: other processes used {:.0}% of CPU 0 and {:.0}% of CPU 1 during the closed loop",
            foreign.0, foreign.1
        );
    }
    eprintln!(
        "   closed loop: {:.0} req/s, {} ok, process CPU {cpu_us:.1} µs/req, load generator CPU {loadgen_cpu_pct:.0}%",
        closed_rps, closed.ok
    );

    // Fixed rates, after a short pause so the closed-loop backlog (if any) is gone.
    std::thread::sleep(Duration::from_millis(250));
    let mut fixed = Vec::new();
    let mut conns = conns;
    let mut cpu_us_at_2k = (0.0, 0.0);
    for rate in FIXED_RATES {
        let c0 = cpu_ticks(&pid)?;
        let (back, mut run) = rt.block_on(fixed_rate(conns, &target, rate, env.fixed));
        let c1 = cpu_ticks(&pid)?;
        conns = back;
        if rate == 2_000 {
            cpu_us_at_2k = (per_req_us(c1 - c0, run.ok), per_req_us(1, run.ok));
        }
        sent += run.total();
        all_clean &= run.clean();
        if let Some(p) = &run.first_problem {
            problems.push(format!("{rate}/s: {p}"));
        }
        let (p50, p99, p999) = (
            run.percentile_ms(0.50),
            run.percentile_ms(0.99),
            run.percentile_ms(0.999),
        );
        eprintln!(
            "   {rate}/s: {} ok in {:.2} s (drain {:.1} ms), p50 {:.3} ms, p99 {:.3} ms, p99.9 {:.3} ms",
            run.ok,
            run.elapsed.as_secs_f64(),
            run.drain.as_secs_f64() * 1e3,
            p50.unwrap_or(f64::NAN),
            p99.unwrap_or(f64::NAN),
            p999.unwrap_or(f64::NAN)
        );
        fixed.push((rate, p50, p99, p999, run.drain));
    }
    let peak_rss = status_kib(&pid, "VmHWM:")?;
    // Idle again: the load generator's connections closed, then a short settle.
    drop(conns);
    close_connections(rt, target.addr.port())?;
    std::thread::sleep(SETTLE);
    let idle_rss_after = status_kib(&pid, "VmRSS:")?;
    let closed_p50 = closed.percentile_ms(0.50);
    let closed_p99 = closed.percentile_ms(0.99);

    // Verification.
    let mut valid = all_clean;
    checks.push(format!(
        "load generator: {sent} requests sent, every answer 204: {all_clean}"
    ));
    if kind.proxied() {
        // Over HTTP/2 one connection carries every call; dozens mean HTTP/1.1 was used.
        let multiplexed = !kind.http2() || upstream_conns <= 2;
        checks.push(format!(
            "{} -> simulator: {upstream_conns} TCP connection(s) at the end of the closed loop{}",
            if kind.gateway() { "gateway" } else { "nginx" },
            match (kind.http2(), multiplexed) {
                (false, _) => "",
                (true, true) => " (HTTP/2, multiplexed): ok",
                (true, false) => " (expected HTTP/2 over 1 or 2): MISMATCH",
            }
        ));
        valid &= multiplexed;
    }
    if let Some(mut gw) = gateway.take() {
        gw.proc.ensure_alive()?;
        let (status, metrics) = admin_get(gw.admin, "/metrics", Duration::from_secs(5))?;
        let (ok, all) = upstream_counts(&metrics);
        let ok_matches = status == 200 && ok as u64 == sent && all as u64 == sent;
        checks.push(format!(
            "gateway /metrics: upstream_requests_total{{status=\"204\"}} = {ok}, all statuses = {all} (expected {sent}): {}",
            if ok_matches { "match" } else { "MISMATCH" }
        ));
        valid &= ok_matches;
        // Stop the gateway before reading its audit files (fsync: never is written, not
        // necessarily flushed to disk, but it is in the page cache either way).
        drop(gw);
        let (lines, results, results_204, single_attempt) = audit_counts(dir.path())?;
        let audit_ok = results == sent && results_204 == sent && single_attempt == sent;
        checks.push(format!(
            "audit log: {lines} records, {results} result records, {results_204} with status 204, {single_attempt} with attempts = 1 (expected {sent} each): {}",
            if audit_ok { "match" } else { "MISMATCH" }
        ));
        valid &= audit_ok;
    } else if let Some(proxy) = nginx.take() {
        let log = proxy.stop_and_count()?;
        let log_ok = log.lines == sent && log.ok == sent && log.one_upstream_204 == sent;
        checks.push(format!(
            "nginx access log: {} lines, {} with status 204, {} with upstream_status \"204\" (one upstream attempt) (expected {sent} each): {}",
            log.lines,
            log.ok,
            log.one_upstream_204,
            if log_ok { "match" } else { "MISMATCH" }
        ));
        valid &= log_ok;
    }
    // Last, with nothing left to send to it: the simulator's own count.
    let received = sim.stop_and_count()?;
    let received_ok = received == sent;
    checks.push(format!(
        "simulator: {received} requests received (expected {sent}): {}",
        if received_ok { "match" } else { "MISMATCH" }
    ));
    valid &= received_ok;
    for p in &problems {
        checks.push(format!("problem: {p}"));
    }
    Ok(RowResult {
        kind,
        closed_rps,
        closed_p50,
        closed_p99,
        loadgen_cpu_pct,
        cpu1: (cpu1_busy_pct, cpu1_ours_pct, cpu1_steal_pct),
        attempts: 1,
        foreign,
        noisy,
        quiet_wait,
        switches_per_req: (switches1 - switches0) as f64 / closed.ok.max(1) as f64,
        threads,
        fixed,
        cpu_us,
        sim_cpu_us,
        redis_cpu_us,
        cpu_us_at_2k,
        peak_rss_mib: mib(peak_rss),
        idle_rss_mib: mib(idle_rss),
        idle_rss_after_mib: mib(idle_rss_after),
        ready_ms: ready.as_secs_f64() * 1e3,
        sent,
        checks,
        valid,
    })
}

/// Drives the runtime (the connections' tasks live on it) until none of the load
/// generator's connections to `port` is established any more, at most [`CLOSE_LIMIT`].
fn close_connections(rt: &tokio::runtime::Runtime, port: u16) -> anyhow::Result<()> {
    let deadline = Instant::now() + CLOSE_LIMIT;
    while established_to(port)? > 0 {
        if Instant::now() > deadline {
            bail!(
                "the load generator's connections to port {port} still open after {CLOSE_LIMIT:?}"
            );
        }
        rt.block_on(async { tokio::time::sleep(Duration::from_millis(5)).await });
    }
    Ok(())
}

/// Established IPv4 TCP connections to 127.0.0.1:`port` (from `/proc/net/tcp`): the
/// gateway's upstream connections to the simulator, or the load generator's to `port`.
fn established_to(port: u16) -> anyhow::Result<usize> {
    let table = std::fs::read_to_string("/proc/net/tcp").context("reading /proc/net/tcp")?;
    let wanted = format!(":{port:04X}");
    Ok(table
        .lines()
        .skip(1)
        .filter(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // sl, local_address, rem_address, st: 01 is ESTABLISHED.
            fields.len() > 3 && fields[2].ends_with(&wanted) && fields[3] == "01"
        })
        .count())
}

// ---------------------------------------------------------------------------------------
// Report
// ---------------------------------------------------------------------------------------

fn machine_description(pinned: bool) -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpus = cpuinfo
        .lines()
        .filter(|l| l.starts_with("processor"))
        .count();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, m)| m.trim().to_owned())
        .unwrap_or_else(|| "unknown".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .map(|v| v.trim().to_owned())
        })
        .unwrap_or_default();
    let rustc = Command::new("rustc")
        .arg("-V")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|| "unknown".into());
    let date = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    format!(
        "- date: {date}\n- nproc: {cpus}\n- CPU: {model}\n- kernel: {kernel}\n- memory: {mem}\n- {rustc}\n- pinning: {}\n- priority: {}\n- orphan guard: {}\n",
        if pinned {
            "taskset: load generator CPU 0; gateway + simulator CPU 1"
        } else {
            "NONE (taskset missing): all processes unpinned"
        },
        match nice_value() {
            Some(n) => format!("nice {n} for the load generator, gateway and simulator (E2E_NICE)"),
            None => "normal (nice 0)".to_owned(),
        },
        if have_pdeathsig() {
            "setpriv --pdeathsig KILL on every child"
        } else {
            "NONE (setpriv missing): children outlive a killed run"
        }
    )
}

/// How much of `scripts/symbol-order.txt` the measured binary still has: the listed
/// functions are placed together at link time (build.rs), which is most of the gateway's
/// resident code; a list gone stale (new compiler or crate versions) shows here first.
fn symbol_order_coverage(bin: &Path) -> String {
    let list_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/symbol-order.txt");
    let Ok(list) = std::fs::read_to_string(&list_path) else {
        return "no scripts/symbol-order.txt".to_owned();
    };
    let Some(symbols) = Command::new("nm")
        .arg("--defined-only")
        .arg(bin)
        .output()
        .ok()
        .filter(|o| o.status.success())
    else {
        return "unknown (nm failed)".to_owned();
    };
    let symbols = String::from_utf8_lossy(&symbols.stdout);
    let present: std::collections::HashSet<&str> = symbols
        .lines()
        .filter_map(|line| line.split_whitespace().nth(2))
        .collect();
    let listed: Vec<&str> = list.lines().filter(|l| !l.is_empty()).collect();
    let found = listed.iter().filter(|name| present.contains(*name)).count();
    format!(
        "{found} of the {} functions in scripts/symbol-order.txt are in the binary{}",
        listed.len(),
        if found * 10 < listed.len() * 9 {
            " (stale: run scripts/symbol-order)"
        } else {
            ""
        }
    )
}

fn fmt_ms(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.3}"))
}

fn report(rows: &[RowResult], env: &Env) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| setup | req/s closed-loop (64 conns, {}s) | p50 / p99 ms @2k/s | p50 / p99 ms @10k/s | CPU µs/req | peak RSS MiB | idle RSS MiB (start / after load) | ready ms | valid |",
        env.closed.as_secs_f64()
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|---:|:---:|");
    for row in rows {
        let fixed: Vec<String> = row
            .fixed
            .iter()
            .map(|(_, p50, p99, _, _)| format!("{} / {}", fmt_ms(*p50), fmt_ms(*p99)))
            .collect();
        let cpu = match (row.sim_cpu_us, row.redis_cpu_us) {
            (Some(sim), Some(redis)) => {
                format!("{:.1} (sim {sim:.1}, redis {redis:.1})", row.cpu_us)
            }
            (Some(sim), None) => format!("{:.1} (sim {sim:.1})", row.cpu_us),
            _ => format!("{:.1}", row.cpu_us),
        };
        let _ = writeln!(
            out,
            "| {} | {:.0} | {} | {} | {} | {:.1} | {:.1} / {:.1} | {:.1} | {} |",
            row.kind.label(),
            row.closed_rps,
            fixed.first().map_or("-", String::as_str),
            fixed.get(1).map_or("-", String::as_str),
            cpu,
            row.peak_rss_mib,
            row.idle_rss_mib,
            row.idle_rss_after_mib,
            row.ready_ms,
            match (row.valid, row.noisy) {
                (true, false) => "yes",
                (true, true) => "yes, noisy",
                (false, _) => "**NO**",
            }
        );
    }
    out
}

fn details(rows: &[RowResult]) -> String {
    let mut out = String::new();
    for row in rows {
        let _ = writeln!(out, "- {} ({}):", row.kind.label(), row.kind.id());
        let _ = writeln!(
            out,
            "  - closed loop: latency p50 {} ms, p99 {} ms; load generator CPU {:.0}%; CPU µs/req at 2,000/s: ~{:.0} (one clock tick is {:.2} µs/req there)",
            fmt_ms(row.closed_p50),
            fmt_ms(row.closed_p99),
            row.loadgen_cpu_pct,
            row.cpu_us_at_2k.0,
            row.cpu_us_at_2k.1
        );
        let _ = writeln!(
            out,
            "  - CPU 1 during the closed loop: {:.0}% busy, {:.0}% by the processes under test, {:.0}% steal",
            row.cpu1.0, row.cpu1.1, row.cpu1.2
        );
        let _ = writeln!(
            out,
            "  - other processes during the closed loop: {:.0}% of CPU 0, {:.0}% of CPU 1{}; waited {:.1} s for a quiet machine{}; measured {} time(s), least disturbed kept",
            row.foreign.0,
            row.foreign.1,
            if row.noisy { " (NOISY: figures disturbed)" } else { "" },
            row.quiet_wait.0.as_secs_f64(),
            if row.quiet_wait.1 { "" } else { " (never got one)" },
            row.attempts
        );
        let _ = writeln!(
            out,
            "  - process under test: {:.2} context switches per request (closed loop), {} threads",
            row.switches_per_req, row.threads
        );
        for (rate, _, _, p999, drain) in &row.fixed {
            let _ = writeln!(
                out,
                "  - {rate}/s: p99.9 {} ms; last answer {:.1} ms after the last scheduled send",
                fmt_ms(*p999),
                drain.as_secs_f64() * 1e3
            );
        }
        for check in &row.checks {
            let _ = writeln!(out, "  - {check}");
        }
        let _ = writeln!(out, "  - requests counted: {}", row.sent);
    }
    out
}

// ---------------------------------------------------------------------------------------
// main
// ---------------------------------------------------------------------------------------

fn env_secs(name: &str, default: f64) -> anyhow::Result<Duration> {
    match std::env::var(name) {
        Ok(v) => {
            let secs: f64 = v.parse().with_context(|| format!("{name}={v:?}"))?;
            if !(0.0..=600.0).contains(&secs) {
                bail!("{name} must be between 0 and 600");
            }
            Ok(Duration::from_secs_f64(secs))
        }
        Err(_) => Ok(Duration::from_secs_f64(default)),
    }
}

fn have_taskset() -> bool {
    Command::new("taskset")
        .arg("-c")
        .arg("0")
        .arg("true")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `cargo build --release --bin mpc-gateway`, so the measured binary matches the sources.
fn build_release() -> anyhow::Result<PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    eprintln!("building: {cargo} build --release --bin mpc-gateway");
    let status = Command::new(cargo)
        .args(["build", "--release", "--bin", "mpc-gateway"])
        .current_dir(manifest_dir())
        .stdin(Stdio::null())
        .status()
        .context("running cargo build")?;
    if !status.success() {
        bail!("cargo build --release failed ({status})");
    }
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest_dir().join("target"));
    let bin = target_dir.join("release").join("mpc-gateway");
    if !bin.is_file() {
        bail!("{} missing after the build", bin.display());
    }
    Ok(bin)
}

fn run(pinned: bool) -> anyhow::Result<bool> {
    let bin = match std::env::var_os("E2E_BIN") {
        Some(bin) => PathBuf::from(bin),
        None => build_release()?,
    };
    let closed = env_secs("E2E_SECONDS", 10.0)?;
    let fixed = env_secs("E2E_FIXED_SECONDS", 5.0)?;
    if closed < Duration::from_millis(100) || fixed < Duration::from_millis(100) {
        bail!("E2E_SECONDS and E2E_FIXED_SECONDS must be at least 0.1");
    }
    let wanted: Vec<Kind> = match std::env::var("E2E_ROWS") {
        Ok(list) => {
            let ids: Vec<&str> = list.split(',').map(str::trim).collect();
            for id in &ids {
                if !Kind::ALL.iter().any(|k| k.id() == *id) {
                    bail!("E2E_ROWS: unknown row {id:?}");
                }
            }
            Kind::ALL
                .into_iter()
                .filter(|k| ids.contains(&k.id()))
                .collect()
        }
        // By default, a row whose program is missing is skipped (and said so); asked for
        // by name, it fails with the install hint.
        Err(_) => Kind::ALL
            .into_iter()
            .filter(|kind| match kind.needs() {
                Some(program) if !installed(program) => {
                    eprintln!("skipping {}: {program} not found", kind.id());
                    false
                }
                _ => true,
            })
            .collect(),
    };

    let pki_dir = tempfile::Builder::new().prefix("mpc-e2e-pki-").tempdir()?;
    let pki = mpc_gateway::simulator::generate_pki(&["localhost", "127.0.0.1"])?;
    std::fs::write(pki_dir.path().join("ca.pem"), &pki.ca_cert_pem)?;
    std::fs::write(pki_dir.path().join("server.pem"), &pki.server_cert_pem)?;
    std::fs::write(pki_dir.path().join("server-key.pem"), &pki.server_key_pem)?;

    let env = Env {
        bin,
        pinned,
        ticks: clock_ticks_per_second(),
        closed,
        fixed,
        pki_dir: pki_dir.path().to_owned(),
        pki,
        sim_token: random_token(""),
        caller_token: random_token("mpcgw_bench_"),
        audit_key: random_token(""),
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut rows = Vec::new();
    let retries = std::env::var("E2E_RETRIES")
        .ok()
        .and_then(|v| v.parse::<u32>().ok())
        .unwrap_or(2)
        .min(5);
    for kind in wanted {
        // A row disturbed by other processes is measured again (bounded); the least
        // disturbed attempt is kept and its attempt count reported.
        let mut best = run_row(&env, &rt, kind).with_context(|| kind.label())?;
        let mut attempt = 1;
        while best.noisy && attempt <= retries {
            attempt += 1;
            eprintln!("   row was disturbed; measuring it again (attempt {attempt})");
            let again = run_row(&env, &rt, kind).with_context(|| kind.label())?;
            if again.foreign.0.max(again.foreign.1) < best.foreign.0.max(best.foreign.1) {
                best = again;
            }
        }
        best.attempts = attempt;
        rows.push(best);
    }
    drop(rt);

    let mut out = String::new();
    let _ = writeln!(out, "## mpc-gateway end-to-end benchmark\n");
    out.push_str(&report(&rows, &env));
    let _ = writeln!(
        out,
        "\nMachine:\n\n{}- code layout: {}\n",
        machine_description(pinned),
        symbol_order_coverage(&env.bin)
    );
    let _ = writeln!(out, "Details and checks:\n\n{}", details(&rows));
    print!("{out}");
    std::io::stdout().flush()?;
    Ok(rows.iter().all(|r| r.valid))
}

fn main() -> ExitCode {
    // `cargo bench` passes `--bench`; `cargo test --all-targets` runs this target too,
    // without it, and a benchmark of a quarter of an hour is no test. The pinned re-exec
    // of itself carries the environment variable instead.
    if !std::env::args().any(|arg| arg == "--bench") && std::env::var_os(PINNED_ENV).is_none() {
        eprintln!("benches/e2e: not run by `cargo bench --bench e2e` (or with `--bench`): skipped");
        return ExitCode::SUCCESS;
    }
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        kill_registered();
        previous(info);
    }));

    let pinned_child = std::env::var_os(PINNED_ENV).is_some();
    if !pinned_child && std::env::var_os("E2E_BIN").is_none() {
        // Build once, unpinned (both cores), then re-exec pinned to CPU 0.
        match build_release() {
            Ok(bin) => std::env::set_var("E2E_BIN", bin),
            Err(err) => {
                eprintln!("error: {err:#}");
                return ExitCode::FAILURE;
            }
        }
    }
    let pinned = if pinned_child {
        true
    } else if have_taskset() {
        let exe = match std::env::current_exe() {
            Ok(exe) => exe,
            Err(err) => {
                eprintln!("error: cannot find my own executable: {err}");
                return ExitCode::FAILURE;
            }
        };
        let status = launcher(Some(0), &exe)
            .args(std::env::args_os().skip(1))
            .env(PINNED_ENV, "1")
            .status();
        return match status {
            Ok(s) if s.success() => ExitCode::SUCCESS,
            Ok(s) => {
                eprintln!("error: pinned benchmark run failed ({s})");
                ExitCode::FAILURE
            }
            Err(err) => {
                eprintln!("error: cannot re-exec under taskset: {err}");
                ExitCode::FAILURE
            }
        };
    } else {
        eprintln!("warning: taskset not found; running unpinned");
        false
    };

    let outcome = run(pinned);
    kill_registered();
    match outcome {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("error: at least one run did not validate (see the table)");
            ExitCode::FAILURE
        }
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
