//! A Plivo MultiPartyCall simulator for the demo, the tests and the benchmark.
//!
//! This module owns a small, fast HTTP server (HTTP/1.1; optionally TLS, which also
//! offers HTTP/2 by ALPN when asked to) that answers like Plivo's MultiPartyCall API on
//! loopback, and a test PKI helper ([`generate_pki`])
//! that makes a self-signed CA with server and client certificates. It is kept apart from
//! the production request path: nothing in the gateway's request handling depends on it.
//!
//! What it serves (`{auth_id}` must equal the configured auth id, and every request needs
//! `Authorization: Basic base64(auth_id:auth_token)`, else `401`):
//! - `DELETE /v1/Account/{auth_id}/MultiPartyCall/name_{name}/` — `{name}` is
//!   percent-decoded; a live MPC is ended and answered `204`, an unknown or ended one `404`.
//! - `DELETE .../MultiPartyCall/uuid_{uuid}/` — the same by uuid.
//! - `GET .../MultiPartyCall/uuid_{uuid}/` (and `name_{name}/`) — `200` with a JSON
//!   description (`api_id`, `friendly_name`, `mpc_uuid`, `status` `Active`/`Ended`, …).
//!
//! The trailing slash is optional; a query string is ignored. Errors are Plivo-like JSON:
//! `{"api_id": "<uuid>", "error": "<message>"}` with `Content-Type: application/json`.
//!
//! Test hooks: a FIFO of one-shot [`Fault`]s consumed by the next requests, faults bound
//! to MPC names (`simulator --fault`), a constant latency, and a recording of every
//! request received. Per request the work is an atomic
//! counter and one short critical section (no lock is ever held across an `.await`); it
//! serves well over 50k req/s on two cores, so it is not the bottleneck of a benchmark.
//!
//! Layout: this file holds the public configuration types, the shared state and the
//! [`Simulator`] handle; `registry.rs` which MPCs are live, `conn.rs` accepting and serving
//! connections, `stream.rs` the connection's stream with an injectable reset, `handler.rs`
//! answering one request, `named_faults.rs` the faults by name, `standalone.rs` the
//! `simulator` command, `pki.rs` the test PKI,
//! and `tests.rs` the unit tests.

mod conn;
mod handler;
mod named_faults;
mod pki;
mod registry;
mod standalone;
mod stream;

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use hyper::header::HeaderValue;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

use crate::sync::lock_unpoisoned;

use conn::{accept_loop, tls_acceptor};
use handler::MpcRef;
use named_faults::NamedFaults;
pub use named_faults::{NamedFaultSpec, SpecError};
pub use pki::{generate_pki, IssuedCert, LeafSpec, Pki, PkiError, TestPki};
use registry::Registry;
pub use standalone::{run_standalone, SimulatorArgs};

/// How long in-flight requests may run on after a stop before their connections are cut.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

// ---------------------------------------------------------------------------------------
// Public configuration types
// ---------------------------------------------------------------------------------------

/// Certificate chain and private key (PEM) the simulator serves TLS with.
#[derive(Clone)]
pub struct SimTls {
    /// Leaf certificate first, then any intermediates.
    pub cert_chain_pem: String,
    /// PKCS#8, PKCS#1 or SEC1 private key.
    pub key_pem: String,
}

impl fmt::Debug for SimTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimTls")
            .field(
                "cert_chain_pem",
                &format_args!("<{} bytes>", self.cert_chain_pem.len()),
            )
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

/// Which MPCs the simulator considers live.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Liveness {
    /// Every name is live until it has been ended once (demo, benchmark: callers use
    /// unique names). Names added with [`Simulator::add_mpc`] behave the same but also
    /// have a uuid. With `forget_ended: true` nothing about ended MPCs is kept, so ending
    /// the same name again answers `204` again and memory stays flat (benchmark mode).
    AllNames {
        /// Forget an MPC as soon as it is ended.
        forget_ended: bool,
    },
    /// Only names added with [`Simulator::add_mpc`] are live (tests).
    Explicit,
}

impl Default for Liveness {
    fn default() -> Self {
        Liveness::AllNames {
            forget_ended: false,
        }
    }
}

/// How the simulator is run.
#[derive(Clone)]
pub struct SimulatorConfig {
    /// Where to listen, usually `127.0.0.1:0`.
    pub listen: SocketAddr,
    /// The Plivo auth id callers must present (and put in the path).
    pub auth_id: String,
    /// The Plivo auth token callers must present.
    pub auth_token: String,
    /// Serve TLS instead of plain HTTP.
    pub tls: Option<SimTls>,
    /// With TLS, offer HTTP/2 by ALPN before HTTP/1.1 (otherwise only HTTP/1.1 is
    /// offered). Plain HTTP is always HTTP/1.1.
    pub http2: bool,
    /// Which MPCs are live.
    pub liveness: Liveness,
    /// Added to every answer (not to [`Fault::Reset`] / [`Fault::Hang`]).
    pub latency: Duration,
    /// Keep every request for [`Simulator::requests`]; counting happens regardless.
    pub record: bool,
    /// Faults for every request (or the first N) about an MPC name, after the queued
    /// one-shot faults (`simulator --fault`).
    pub named_faults: Vec<NamedFaultSpec>,
}

impl SimulatorConfig {
    /// `127.0.0.1:0`, no TLS, `AllNames { forget_ended: false }`, no latency, recording on.
    pub fn new(auth_id: impl Into<String>, auth_token: impl Into<String>) -> Self {
        SimulatorConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            auth_id: auth_id.into(),
            auth_token: auth_token.into(),
            tls: None,
            http2: false,
            liveness: Liveness::default(),
            latency: Duration::ZERO,
            record: true,
            named_faults: Vec::new(),
        }
    }
}

impl fmt::Debug for SimulatorConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimulatorConfig")
            .field("listen", &self.listen)
            .field("auth_id", &self.auth_id)
            .field("auth_token", &"<redacted>")
            .field("tls", &self.tls)
            .field("liveness", &self.liveness)
            .field("latency", &self.latency)
            .field("record", &self.record)
            .field("named_faults", &self.named_faults)
            .finish()
    }
}

/// A one-shot fault, consumed (FIFO) by the next request the simulator receives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Answer with this status, these headers and this body instead of the normal answer
    /// (the MPC is not touched). `Content-Type: application/json` is added when the body
    /// is not empty and no content type is given. The configured latency still applies.
    Status {
        /// HTTP status; an invalid one becomes `500`.
        status: u16,
        /// Extra response headers; invalid ones are skipped with a warning.
        headers: Vec<(String, String)>,
        /// Response body.
        body: String,
    },
    /// Wait this long, then answer normally.
    Delay(Duration),
    /// Close the TCP connection without answering (with `SO_LINGER` 0, so an RST).
    Reset,
    /// Fail this request alone: over HTTP/2 an `RST_STREAM` (`INTERNAL_ERROR`) for its
    /// stream, the connection stays; over HTTP/1.1 the connection is closed.
    ResetStream,
    /// Never answer; hold the connection until the simulator stops.
    Hang,
    /// Answer normally, then close the connection gracefully, as a server does after
    /// its maximum requests per connection: over HTTP/2 a `GOAWAY` (`NO_ERROR`) sent
    /// before this answer, over HTTP/1.1 `Connection: close`.
    GoAway,
    /// Answer with this status and a head that promises a JSON body, send the first
    /// bytes of it and then nothing more until the simulator stops (the MPC is not
    /// touched). The configured latency still applies.
    StalledBody(u16),
}

impl Fault {
    /// A [`Fault::Status`] with no extra headers.
    pub fn status(status: u16, body: impl Into<String>) -> Self {
        Fault::Status {
            status,
            headers: Vec::new(),
            body: body.into(),
        }
    }
}

/// One request as the simulator received it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordedRequest {
    /// e.g. `DELETE`.
    pub method: String,
    /// `HTTP/1.1` or `HTTP/2.0`.
    pub version: String,
    /// The raw request target, e.g. `/v1/Account/X/MultiPartyCall/name_a%20b/` (for
    /// HTTP/2 the `:path`).
    pub target: String,
    /// The HTTP/2 `:authority`; HTTP/1.1 carries it in the `host` header instead.
    pub authority: Option<String>,
    /// Headers as hyper gives them: lower-case names, in arrival order except that repeated
    /// values of one name are grouped; values decoded as lossy UTF-8.
    pub headers: Vec<(String, String)>,
    /// The request body.
    pub body: Bytes,
}

impl RecordedRequest {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

// ---------------------------------------------------------------------------------------
// Shared state
// ---------------------------------------------------------------------------------------

/// What the simulator's connections share. Its mutexes are taken with
/// [`lock_unpoisoned`]: every critical section leaves its data consistent.
struct Shared {
    auth_id: String,
    auth_token: String,
    /// `Basic base64(auth_id:auth_token)`, compared first as a fast path.
    expected_authorization: Vec<u8>,
    latency: Duration,
    record: bool,
    registry: Mutex<Registry>,
    faults: Mutex<VecDeque<Fault>>,
    /// Number of queued faults, read without the lock on the hot path.
    fault_len: AtomicUsize,
    named_faults: NamedFaults,
    requests: Mutex<Vec<RecordedRequest>>,
    request_count: AtomicU64,
    connection_count: AtomicU64,
    /// `true` once the simulator is told to stop.
    stop: watch::Sender<bool>,
}

impl Shared {
    /// The fault for a request to `path`: the next queued one, else the one bound to
    /// the MPC name in the path.
    fn next_fault(&self, path: &str) -> Option<Fault> {
        self.next_queued_fault().or_else(|| self.named_fault(path))
    }

    fn named_fault(&self, path: &str) -> Option<Fault> {
        if self.named_faults.is_empty() {
            return None;
        }
        let (_, mpc) = path.split_once("/MultiPartyCall/")?;
        match handler::parse_mpc_ref(mpc)? {
            MpcRef::Name(name) => self.named_faults.take(&name),
            MpcRef::Uuid(_) => None,
        }
    }

    fn next_queued_fault(&self) -> Option<Fault> {
        if self.fault_len.load(Ordering::SeqCst) == 0 {
            return None;
        }
        let mut faults = lock_unpoisoned(&self.faults);
        let fault = faults.pop_front();
        if fault.is_some() {
            self.fault_len.fetch_sub(1, Ordering::SeqCst);
        }
        fault
    }

    fn authorized(&self, header: Option<&HeaderValue>, path_auth_id: &str) -> bool {
        if path_auth_id != self.auth_id {
            return false;
        }
        let Some(value) = header else {
            return false;
        };
        let value = value.as_bytes();
        if value == self.expected_authorization.as_slice() {
            return true;
        }
        // Slow path: other spellings of the scheme, extra spaces, missing padding.
        let Ok(value) = std::str::from_utf8(value) else {
            return false;
        };
        let Some((scheme, credentials)) = value.trim().split_once(' ') else {
            return false;
        };
        if !scheme.eq_ignore_ascii_case("basic") {
            return false;
        }
        let credentials = credentials.trim();
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(credentials)
            .or_else(|_| base64::engine::general_purpose::STANDARD_NO_PAD.decode(credentials));
        let Ok(decoded) = decoded else {
            return false;
        };
        let Some(colon) = decoded.iter().position(|b| *b == b':') else {
            return false;
        };
        let (id, token) = (&decoded[..colon], &decoded[colon + 1..]);
        id == self.auth_id.as_bytes() && token == self.auth_token.as_bytes()
    }
}

// ---------------------------------------------------------------------------------------
// The simulator handle
// ---------------------------------------------------------------------------------------

/// A running simulator. Dropping it or calling [`Simulator::shutdown`] stops it.
pub struct Simulator {
    shared: Arc<Shared>,
    local_addr: SocketAddr,
    base_url: String,
    /// Closed (`recv` returns `None`) once the accept loop and every connection are gone.
    done: Option<mpsc::Receiver<()>>,
}

impl fmt::Debug for Simulator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Simulator")
            .field("local_addr", &self.local_addr)
            .field("base_url", &self.base_url)
            .finish_non_exhaustive()
    }
}

impl Simulator {
    /// Bind, then serve in the background on the current tokio runtime.
    pub async fn start(config: SimulatorConfig) -> io::Result<Simulator> {
        let acceptor = config
            .tls
            .as_ref()
            .map(|tls| tls_acceptor(tls, config.http2))
            .transpose()?;
        let listener = TcpListener::bind(config.listen).await?;
        let local_addr = listener.local_addr()?;
        let base_url = if acceptor.is_some() {
            format!("https://localhost:{}", local_addr.port())
        } else {
            format!("http://{local_addr}")
        };
        let expected_authorization = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD
                .encode(format!("{}:{}", config.auth_id, config.auth_token))
        )
        .into_bytes();
        let (stop, _) = watch::channel(false);
        let shared = Arc::new(Shared {
            auth_id: config.auth_id,
            auth_token: config.auth_token,
            expected_authorization,
            latency: config.latency,
            record: config.record,
            registry: Mutex::new(Registry {
                liveness: config.liveness,
                by_name: HashMap::new(),
                by_uuid: HashMap::new(),
            }),
            faults: Mutex::new(VecDeque::new()),
            fault_len: AtomicUsize::new(0),
            named_faults: NamedFaults::new(config.named_faults),
            requests: Mutex::new(Vec::new()),
            request_count: AtomicU64::new(0),
            connection_count: AtomicU64::new(0),
            stop,
        });
        let (done_tx, done_rx) = mpsc::channel(1);
        tokio::spawn(accept_loop(
            listener,
            acceptor,
            Arc::clone(&shared),
            done_tx,
        ));
        tracing::debug!(%local_addr, "plivo simulator started");
        Ok(Simulator {
            shared,
            local_addr,
            base_url,
            done: Some(done_rx),
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// `https://localhost:PORT` with TLS, `http://127.0.0.1:PORT` without.
    pub fn base_url(&self) -> String {
        self.base_url.clone()
    }

    /// Start an MPC called `name` and return its uuid (hyphenated, lower case). If an MPC
    /// of that name is already live, its uuid is returned; if one was ended, a new one
    /// starts.
    pub fn add_mpc(&self, name: &str) -> String {
        lock_unpoisoned(&self.shared.registry).add(name).to_string()
    }

    /// Whether a DELETE for `name` would end a live MPC now.
    pub fn is_live(&self, name: &str) -> bool {
        lock_unpoisoned(&self.shared.registry).is_live(name)
    }

    /// Queue a one-shot fault for a coming request (FIFO).
    pub fn push_fault(&self, fault: Fault) {
        let mut faults = lock_unpoisoned(&self.shared.faults);
        faults.push_back(fault);
        self.shared.fault_len.fetch_add(1, Ordering::SeqCst);
    }

    /// Every request received since start (or the last [`Simulator::clear_requests`]),
    /// when recording is on.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        lock_unpoisoned(&self.shared.requests).clone()
    }

    /// Number of requests received (counted even when recording is off; not reset by
    /// [`Simulator::clear_requests`]).
    pub fn request_count(&self) -> u64 {
        self.shared.request_count.load(Ordering::SeqCst)
    }

    /// Number of TCP connections accepted so far.
    pub fn connection_count(&self) -> u64 {
        self.shared.connection_count.load(Ordering::SeqCst)
    }

    /// Forget the recorded requests.
    pub fn clear_requests(&self) {
        lock_unpoisoned(&self.shared.requests).clear();
    }

    /// Stop accepting, let in-flight requests finish (at most a short grace period; hung
    /// ones are cut at once) and wait until every connection is closed.
    pub async fn shutdown(mut self) {
        self.shared.stop.send_replace(true);
        if let Some(mut done) = self.done.take() {
            // Every task holds a sender; `None` means they are all gone.
            let _ = tokio::time::timeout(SHUTDOWN_GRACE * 2, done.recv()).await;
        }
    }
}

impl Drop for Simulator {
    fn drop(&mut self) {
        self.shared.stop.send_replace(true);
    }
}

#[cfg(test)]
mod tests;
