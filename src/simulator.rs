//! A Plivo MultiPartyCall simulator for the demo, the tests and the benchmark.
//!
//! This module owns a small, fast HTTP/1.1 server (optionally TLS) that answers like
//! Plivo's MultiPartyCall API on loopback, and a test PKI helper ([`generate_pki`])
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
//! Test hooks: a FIFO of one-shot [`Fault`]s consumed by the next requests, a constant
//! latency, and a recording of every request received. Per request the work is an atomic
//! counter and one short critical section (no lock is ever held across an `.await`); it
//! serves well over 50k req/s on two cores, so it is not the bottleneck of a benchmark.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderName, HeaderValue, ALLOW, AUTHORIZATION, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_rustls::TlsAcceptor;
use uuid::Uuid;

/// Largest request body the simulator reads (and records); a larger one fails the request.
const MAX_BODY: usize = 1 << 20;
/// How long a TLS handshake may take before the connection is dropped.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long in-flight requests may run on after a stop before their connections are cut.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);
/// Plivo's wording for a bad `Authorization` header or an account mismatch.
const ERR_AUTH: &str = "Authentication credentials invalid.";
/// Plivo's wording for an unknown resource.
const ERR_NOT_FOUND: &str = "not found";

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

/// Lock a mutex, ignoring poisoning: every critical section leaves the data consistent.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

enum NameState {
    Live(Uuid),
    /// Ended; `None` for a name that was ended in `AllNames` mode without ever getting a uuid.
    Ended(Option<Uuid>),
}

struct MpcRecord {
    name: String,
    live: bool,
}

/// A snapshot of one MPC, for the GET answer.
struct MpcInfo {
    name: String,
    uuid: Uuid,
    live: bool,
}

struct Registry {
    liveness: Liveness,
    by_name: HashMap<String, NameState>,
    by_uuid: HashMap<Uuid, MpcRecord>,
}

impl Registry {
    fn forget_ended(&self) -> bool {
        matches!(self.liveness, Liveness::AllNames { forget_ended: true })
    }

    fn add(&mut self, name: &str) -> Uuid {
        if let Some(NameState::Live(uuid)) = self.by_name.get(name) {
            return *uuid;
        }
        let uuid = Uuid::new_v4();
        self.by_name.insert(name.to_owned(), NameState::Live(uuid));
        self.by_uuid.insert(
            uuid,
            MpcRecord {
                name: name.to_owned(),
                live: true,
            },
        );
        uuid
    }

    fn is_live(&self, name: &str) -> bool {
        match self.by_name.get(name) {
            Some(NameState::Live(_)) => true,
            Some(NameState::Ended(_)) => false,
            None => matches!(self.liveness, Liveness::AllNames { .. }),
        }
    }

    /// Mark MPC `uuid` (named `name`) ended, or forget it in `forget_ended` mode.
    fn finish(&mut self, name: &str, uuid: Uuid) {
        if self.forget_ended() {
            self.by_uuid.remove(&uuid);
            if matches!(self.by_name.get(name), Some(NameState::Live(u)) if *u == uuid) {
                self.by_name.remove(name);
            }
            return;
        }
        if let Some(rec) = self.by_uuid.get_mut(&uuid) {
            rec.live = false;
        }
        if let Some(state) = self.by_name.get_mut(name) {
            if matches!(state, NameState::Live(u) if *u == uuid) {
                *state = NameState::Ended(Some(uuid));
            }
        }
    }

    fn end_by_name(&mut self, name: &str) -> bool {
        match self.by_name.get(name) {
            Some(NameState::Live(uuid)) => {
                let uuid = *uuid;
                self.finish(name, uuid);
                true
            }
            Some(NameState::Ended(_)) => false,
            None => match self.liveness {
                Liveness::AllNames { forget_ended: true } => true,
                Liveness::AllNames {
                    forget_ended: false,
                } => {
                    self.by_name.insert(name.to_owned(), NameState::Ended(None));
                    true
                }
                Liveness::Explicit => false,
            },
        }
    }

    fn end_by_uuid(&mut self, uuid: Uuid) -> bool {
        let name = match self.by_uuid.get(&uuid) {
            Some(rec) if rec.live => rec.name.clone(),
            _ => return false,
        };
        self.finish(&name, uuid);
        true
    }

    fn describe_uuid(&self, uuid: Uuid) -> Option<MpcInfo> {
        self.by_uuid.get(&uuid).map(|rec| MpcInfo {
            name: rec.name.clone(),
            uuid,
            live: rec.live,
        })
    }

    fn describe_name(&mut self, name: &str) -> Option<MpcInfo> {
        match self.by_name.get(name) {
            Some(NameState::Live(uuid)) => Some(MpcInfo {
                name: name.to_owned(),
                uuid: *uuid,
                live: true,
            }),
            Some(NameState::Ended(Some(uuid))) => Some(MpcInfo {
                name: name.to_owned(),
                uuid: *uuid,
                live: false,
            }),
            Some(NameState::Ended(None)) => {
                // Give the ended MPC a uuid now, so it can be described like any other.
                let uuid = Uuid::new_v4();
                self.by_name
                    .insert(name.to_owned(), NameState::Ended(Some(uuid)));
                self.by_uuid.insert(
                    uuid,
                    MpcRecord {
                        name: name.to_owned(),
                        live: false,
                    },
                );
                Some(MpcInfo {
                    name: name.to_owned(),
                    uuid,
                    live: false,
                })
            }
            None => match self.liveness {
                Liveness::AllNames { .. } => {
                    let uuid = self.add(name);
                    Some(MpcInfo {
                        name: name.to_owned(),
                        uuid,
                        live: true,
                    })
                }
                Liveness::Explicit => None,
            },
        }
    }
}

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
    requests: Mutex<Vec<RecordedRequest>>,
    request_count: AtomicU64,
    connection_count: AtomicU64,
    /// `true` once the simulator is told to stop.
    stop: watch::Sender<bool>,
}

impl Shared {
    fn next_fault(&self) -> Option<Fault> {
        if self.fault_len.load(Ordering::SeqCst) == 0 {
            return None;
        }
        let mut faults = lock(&self.faults);
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
        lock(&self.shared.registry).add(name).to_string()
    }

    /// Whether a DELETE for `name` would end a live MPC now.
    pub fn is_live(&self, name: &str) -> bool {
        lock(&self.shared.registry).is_live(name)
    }

    /// Queue a one-shot fault for a coming request (FIFO).
    pub fn push_fault(&self, fault: Fault) {
        let mut faults = lock(&self.shared.faults);
        faults.push_back(fault);
        self.shared.fault_len.fetch_add(1, Ordering::SeqCst);
    }

    /// Every request received since start (or the last [`Simulator::clear_requests`]),
    /// when recording is on.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        lock(&self.shared.requests).clone()
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
        lock(&self.shared.requests).clear();
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

// ---------------------------------------------------------------------------------------
// Serving
// ---------------------------------------------------------------------------------------

/// Resolves once the simulator is told to stop (the guard `wait_for` returns is not `Send`,
/// so it is dropped here).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|stopped| *stopped).await;
}

fn invalid_input(msg: impl fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg.to_string())
}

fn tls_acceptor(tls: &SimTls, http2: bool) -> io::Result<TlsAcceptor> {
    let certs: Vec<CertificateDer<'static>> =
        rustls_pemfile::certs(&mut tls.cert_chain_pem.as_bytes()).collect::<Result<_, _>>()?;
    if certs.is_empty() {
        return Err(invalid_input(
            "simulator TLS: no certificate in cert_chain_pem",
        ));
    }
    let key: PrivateKeyDer<'static> = rustls_pemfile::private_key(&mut tls.key_pem.as_bytes())?
        .ok_or_else(|| invalid_input("simulator TLS: no private key in key_pem"))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(invalid_input)?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(invalid_input)?;
    config.alpn_protocols = if http2 {
        vec![b"h2".to_vec(), b"http/1.1".to_vec()]
    } else {
        vec![b"http/1.1".to_vec()]
    };
    Ok(TlsAcceptor::from(Arc::new(config)))
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: Option<TlsAcceptor>,
    shared: Arc<Shared>,
    done: mpsc::Sender<()>,
) {
    let mut stop = shared.stop.subscribe();
    loop {
        tokio::select! {
            _ = stopped(&mut stop) => break,
            accepted = listener.accept() => match accepted {
                Ok((tcp, _peer)) => {
                    shared.connection_count.fetch_add(1, Ordering::SeqCst);
                    let _ = tcp.set_nodelay(true);
                    tokio::spawn(serve_connection(
                        tcp,
                        acceptor.clone(),
                        Arc::clone(&shared),
                        done.clone(),
                    ));
                }
                Err(err) => {
                    // E.g. out of file descriptors: back off instead of spinning.
                    tracing::warn!(error = %err, "plivo simulator: accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
        }
    }
    tracing::debug!("plivo simulator stopped accepting");
}

async fn serve_connection(
    tcp: TcpStream,
    acceptor: Option<TlsAcceptor>,
    shared: Arc<Shared>,
    _done: mpsc::Sender<()>,
) {
    let mut stop = shared.stop.subscribe();
    let switch = Arc::new(ConnectionSwitch::default());
    let inner = match acceptor {
        None => IoInner::Plain(tcp),
        Some(acceptor) => {
            let handshake = tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp));
            tokio::select! {
                _ = stopped(&mut stop) => return,
                result = handshake => match result {
                    Ok(Ok(tls)) => IoInner::Tls(Box::new(tls)),
                    Ok(Err(err)) => {
                        tracing::debug!(error = %err, "plivo simulator: TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!("plivo simulator: TLS handshake timed out");
                        return;
                    }
                },
            }
        }
    };
    let http2 = match &inner {
        IoInner::Tls(tls) => tls.get_ref().1.alpn_protocol() == Some(b"h2"),
        IoInner::Plain(_) => false,
    };
    let io = TokioIo::new(SimIo {
        inner,
        reset: Arc::clone(&switch),
    });
    let svc_shared = Arc::clone(&shared);
    let svc_switch = Arc::clone(&switch);
    let service = hyper::service::service_fn(move |req| {
        handle(Arc::clone(&svc_shared), Arc::clone(&svc_switch), req)
    });
    let result = if http2 {
        let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .serve_connection(io, service);
        drive(conn, |c| c.graceful_shutdown(), &switch, &mut stop).await
    } else {
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .keep_alive(true)
            .serve_connection(io, service);
        drive(conn, |c| c.graceful_shutdown(), &switch, &mut stop).await
    };
    if let Err(err) = result {
        tracing::debug!(error = %err, "plivo simulator: connection ended with an error");
    }
}

/// Serves `conn` until it ends, a [`Fault::Reset`] drops it (every stream of an HTTP/2
/// connection with it), a [`Fault::GoAway`] closes it gracefully, or the simulator stops
/// (graceful, bounded by [`SHUTDOWN_GRACE`]).
async fn drive<C>(
    conn: C,
    graceful_shutdown: impl FnOnce(Pin<&mut C>),
    switch: &ConnectionSwitch,
    stop: &mut watch::Receiver<bool>,
) -> hyper::Result<()>
where
    C: Future<Output = hyper::Result<()>>,
{
    tokio::pin!(conn);
    tokio::select! {
        result = conn.as_mut() => result,
        () = switch.fired.notified() => Ok(()),
        () = switch.go_away.notified() => {
            graceful_shutdown(conn.as_mut());
            tokio::select! {
                result = conn.as_mut() => result,
                () = switch.fired.notified() => Ok(()),
                _ = stopped(stop) => Ok(()),
            }
        }
        _ = stopped(stop) => {
            graceful_shutdown(conn.as_mut());
            tokio::time::timeout(SHUTDOWN_GRACE, conn).await.unwrap_or(Ok(()))
        }
    }
}

/// Answer one request: count, record, apply a queued fault, wait the latency, route.
async fn handle(
    shared: Arc<Shared>,
    switch: Arc<ConnectionSwitch>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, io::Error> {
    shared.request_count.fetch_add(1, Ordering::SeqCst);
    let (parts, body) = req.into_parts();
    let body = Limited::new(body, MAX_BODY)
        .collect()
        .await
        .map_err(|err| io::Error::new(io::ErrorKind::InvalidData, err))?
        .to_bytes();
    if shared.record {
        let recorded = RecordedRequest {
            method: parts.method.as_str().to_owned(),
            version: format!("{:?}", parts.version),
            target: match parts.version {
                // hyper rebuilds an HTTP/2 URI from :scheme, :authority and :path.
                http::Version::HTTP_2 => parts
                    .uri
                    .path_and_query()
                    .map_or_else(String::new, |p| p.as_str().to_owned()),
                _ => parts.uri.to_string(),
            },
            authority: match parts.version {
                http::Version::HTTP_2 => parts.uri.authority().map(|a| a.as_str().to_owned()),
                _ => None,
            },
            headers: parts
                .headers
                .iter()
                .map(|(name, value)| {
                    (
                        name.as_str().to_owned(),
                        String::from_utf8_lossy(value.as_bytes()).into_owned(),
                    )
                })
                .collect(),
            body,
        };
        lock(&shared.requests).push(recorded);
    }

    match shared.next_fault() {
        None => {}
        Some(Fault::Reset) => {
            // The connection task drops the connection (SO_LINGER 0: an RST) without
            // answering. Not returning an error here matters for HTTP/2, where hyper would
            // first send an RST_STREAM for this stream alone.
            switch.fire();
            std::future::pending::<()>().await;
        }
        Some(Fault::ResetStream) => {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionReset,
                "injected fault: stream reset",
            ));
        }
        Some(Fault::Hang) => {
            stopped(&mut shared.stop.subscribe()).await;
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "injected fault: hang ended by shutdown",
            ));
        }
        Some(Fault::Status {
            status,
            headers,
            body,
        }) => {
            if !shared.latency.is_zero() {
                tokio::time::sleep(shared.latency).await;
            }
            return Ok(fault_response(status, headers, body));
        }
        Some(Fault::Delay(delay)) => tokio::time::sleep(delay).await,
        Some(Fault::GoAway) => switch.go_away(),
    }
    if !shared.latency.is_zero() {
        tokio::time::sleep(shared.latency).await;
    }
    Ok(route(
        &shared,
        &parts.method,
        parts.uri.path(),
        &parts.headers,
    ))
}

fn fault_response(
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
) -> Response<Full<Bytes>> {
    let has_body = !body.is_empty();
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = StatusCode::from_u16(status).unwrap_or_else(|_| {
        tracing::warn!(
            status,
            "plivo simulator: invalid fault status, answering 500"
        );
        StatusCode::INTERNAL_SERVER_ERROR
    });
    for (name, value) in headers {
        match (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(&value),
        ) {
            (Ok(name), Ok(value)) => {
                resp.headers_mut().append(name, value);
            }
            _ => tracing::warn!(header = %name, "plivo simulator: skipping invalid fault header"),
        }
    }
    if has_body && !resp.headers().contains_key(CONTENT_TYPE) {
        resp.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    }
    resp
}

fn json_response(status: StatusCode, value: &serde_json::Value) -> Response<Full<Bytes>> {
    let body = serde_json::to_vec(value).unwrap_or_default();
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

fn error_response(status: StatusCode, message: &str) -> Response<Full<Bytes>> {
    json_response(
        status,
        &serde_json::json!({ "api_id": Uuid::new_v4().to_string(), "error": message }),
    )
}

fn no_content() -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::new()));
    *resp.status_mut() = StatusCode::NO_CONTENT;
    resp
}

enum MpcRef {
    Name(String),
    Uuid(Uuid),
}

/// Parse the part after `MultiPartyCall/`: `name_{pct-encoded}` or `uuid_{uuid}`, with an
/// optional trailing slash. `None` for anything else (answered `404`).
fn parse_mpc_ref(rest: &str) -> Option<MpcRef> {
    let id = rest.strip_suffix('/').unwrap_or(rest);
    if id.contains('/') {
        return None;
    }
    if let Some(encoded) = id.strip_prefix("name_") {
        let name = percent_encoding::percent_decode_str(encoded)
            .decode_utf8()
            .ok()?;
        if name.is_empty() {
            return None;
        }
        Some(MpcRef::Name(name.into_owned()))
    } else if let Some(uuid) = id.strip_prefix("uuid_") {
        Uuid::try_parse(uuid).ok().map(MpcRef::Uuid)
    } else {
        None
    }
}

fn route(
    shared: &Shared,
    method: &Method,
    path: &str,
    headers: &hyper::HeaderMap,
) -> Response<Full<Bytes>> {
    let Some((path_auth_id, rest)) = path
        .strip_prefix("/v1/Account/")
        .and_then(|rest| rest.split_once('/'))
    else {
        return error_response(StatusCode::NOT_FOUND, ERR_NOT_FOUND);
    };
    if !shared.authorized(headers.get(AUTHORIZATION), path_auth_id) {
        return error_response(StatusCode::UNAUTHORIZED, ERR_AUTH);
    }
    let Some(mpc) = rest.strip_prefix("MultiPartyCall/").and_then(parse_mpc_ref) else {
        return error_response(StatusCode::NOT_FOUND, ERR_NOT_FOUND);
    };
    match *method {
        Method::DELETE => {
            let ended = {
                let mut registry = lock(&shared.registry);
                match &mpc {
                    MpcRef::Name(name) => registry.end_by_name(name),
                    MpcRef::Uuid(uuid) => registry.end_by_uuid(*uuid),
                }
            };
            if ended {
                no_content()
            } else {
                error_response(StatusCode::NOT_FOUND, ERR_NOT_FOUND)
            }
        }
        Method::GET => {
            let info = {
                let mut registry = lock(&shared.registry);
                match &mpc {
                    MpcRef::Name(name) => registry.describe_name(name),
                    MpcRef::Uuid(uuid) => registry.describe_uuid(*uuid),
                }
            };
            match info {
                Some(info) => json_response(StatusCode::OK, &describe(&shared.auth_id, &info)),
                None => error_response(StatusCode::NOT_FOUND, ERR_NOT_FOUND),
            }
        }
        _ => {
            let mut resp = error_response(StatusCode::METHOD_NOT_ALLOWED, "method not allowed");
            resp.headers_mut()
                .insert(ALLOW, HeaderValue::from_static("GET, DELETE"));
            resp
        }
    }
}

/// The body of `GET .../MultiPartyCall/uuid_{uuid}/`, shaped like Plivo's.
fn describe(auth_id: &str, info: &MpcInfo) -> serde_json::Value {
    let uuid = info.uuid.to_string();
    let (status, term_cause, term_cause_code) = if info.live {
        ("Active", serde_json::Value::Null, serde_json::Value::Null)
    } else {
        ("Ended", "API Request".into(), 4020.into())
    };
    serde_json::json!({
        "api_id": Uuid::new_v4().to_string(),
        "friendly_name": info.name,
        "mpc_uuid": uuid,
        "status": status,
        "term_cause": term_cause,
        "term_cause_code": term_cause_code,
        "sub_account": null,
        "participants": format!("/v1/Account/{auth_id}/MultiPartyCall/uuid_{uuid}/Participant/"),
        "resource_uri": format!("/v1/Account/{auth_id}/MultiPartyCall/uuid_{uuid}/"),
    })
}

// ---------------------------------------------------------------------------------------
// Connection IO with an injectable reset
// ---------------------------------------------------------------------------------------

enum IoInner {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

/// What a fault asks of its connection: [`Fault::Reset`] drops it at once, without a
/// shutdown; [`Fault::GoAway`] closes it gracefully.
#[derive(Default)]
struct ConnectionSwitch {
    set: AtomicBool,
    fired: tokio::sync::Notify,
    go_away: tokio::sync::Notify,
}

impl ConnectionSwitch {
    fn go_away(&self) {
        self.go_away.notify_one();
    }

    fn fire(&self) {
        self.set.store(true, Ordering::SeqCst);
        // `notify_one` keeps a permit, so the connection task cannot miss it.
        self.fired.notify_one();
    }

    fn is_set(&self) -> bool {
        self.set.load(Ordering::SeqCst)
    }
}

/// The connection's stream. Once `reset` is set (by [`Fault::Reset`]), shutdown is skipped
/// and the socket gets `SO_LINGER` 0 before it is closed, so the peer sees an RST.
struct SimIo {
    inner: IoInner,
    reset: Arc<ConnectionSwitch>,
}

impl SimIo {
    fn tcp(&self) -> &TcpStream {
        match &self.inner {
            IoInner::Plain(tcp) => tcp,
            IoInner::Tls(tls) => tls.get_ref().0,
        }
    }
}

impl Drop for SimIo {
    fn drop(&mut self) {
        if self.reset.is_set() {
            let _ = self.tcp().set_zero_linger();
        }
    }
}

impl AsyncRead for SimIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match &mut self.get_mut().inner {
            IoInner::Plain(s) => Pin::new(s).poll_read(cx, buf),
            IoInner::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for SimIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().inner {
            IoInner::Plain(s) => Pin::new(s).poll_write(cx, buf),
            IoInner::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().inner {
            IoInner::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            IoInner::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.inner {
            IoInner::Plain(s) => s.is_write_vectored(),
            IoInner::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().inner {
            IoInner::Plain(s) => Pin::new(s).poll_flush(cx),
            IoInner::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.reset.is_set() {
            return Poll::Ready(Ok(()));
        }
        match &mut this.inner {
            IoInner::Plain(s) => Pin::new(s).poll_shutdown(cx),
            IoInner::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Standalone mode (benchmark script, manual runs)
// ---------------------------------------------------------------------------------------

/// Command-line arguments of the standalone simulator.
#[derive(Clone, Debug, clap::Args)]
pub struct SimulatorArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,
    /// The Plivo auth id the simulator accepts.
    #[arg(long)]
    pub auth_id: String,
    /// Name of the environment variable holding the auth token (never pass it directly).
    #[arg(long, value_name = "NAME")]
    pub auth_token_env: String,
    /// PEM certificate chain to serve TLS with (requires --tls-key).
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key to serve TLS with (requires --tls-cert).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Latency added to every answer, e.g. `5ms`.
    #[arg(long, default_value = "0s")]
    pub latency: humantime::Duration,
    /// Forget ended MPCs, so every DELETE answers 204 (benchmark mode).
    #[arg(long)]
    pub forget_ended: bool,
    /// With TLS, offer HTTP/2 by ALPN before HTTP/1.1.
    #[arg(long, requires = "tls_cert")]
    pub http2: bool,
}

/// Run the simulator in the foreground until SIGINT or SIGTERM. Prints exactly one line,
/// `simulator listening on <base_url>`, to stdout once it accepts connections.
/// Requests are counted but not recorded, so memory stays flat under load.
pub async fn run_standalone(args: SimulatorArgs) -> anyhow::Result<()> {
    use anyhow::Context as _;
    use std::io::Write as _;

    let auth_token = std::env::var(&args.auth_token_env).with_context(|| {
        format!(
            "environment variable {} (--auth-token-env) is not set or not UTF-8",
            args.auth_token_env
        )
    })?;
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(SimTls {
            cert_chain_pem: std::fs::read_to_string(cert)
                .with_context(|| format!("reading --tls-cert {}", cert.display()))?,
            key_pem: std::fs::read_to_string(key)
                .with_context(|| format!("reading --tls-key {}", key.display()))?,
        }),
        (None, None) => None,
        _ => anyhow::bail!("--tls-cert and --tls-key go together"),
    };
    if !args.listen.ip().is_loopback() {
        tracing::warn!(listen = %args.listen, "plivo simulator listening on a non-loopback address");
    }
    let config = SimulatorConfig {
        listen: args.listen,
        auth_id: args.auth_id,
        auth_token,
        tls,
        http2: args.http2,
        liveness: Liveness::AllNames {
            forget_ended: args.forget_ended,
        },
        latency: args.latency.into(),
        record: false,
    };
    let simulator = Simulator::start(config)
        .await
        .with_context(|| format!("starting the simulator on {}", args.listen))?;
    {
        let mut stdout = io::stdout().lock();
        writeln!(stdout, "simulator listening on {}", simulator.base_url())?;
        stdout.flush()?;
    }
    wait_for_stop_signal().await?;
    tracing::info!(
        requests = simulator.request_count(),
        "plivo simulator shutting down"
    );
    simulator.shutdown().await;
    Ok(())
}

async fn wait_for_stop_signal() -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    }
    #[cfg(not(unix))]
    tokio::signal::ctrl_c().await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Test PKI
// ---------------------------------------------------------------------------------------

/// Failure to make a test certificate.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// rcgen refused the parameters (e.g. a SAN that is not IA5) or failed to sign.
    #[error("test certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    /// The CA certificate could not be added to a root store.
    #[error("test CA certificate rejected: {0}")]
    Rustls(#[from] rustls::Error),
}

/// What a leaf certificate is for and how long it is valid.
#[derive(Clone, Debug)]
pub struct LeafSpec {
    /// Subject common name.
    pub common_name: String,
    /// Subject alternative names: `scheme://…` becomes a URI SAN, an IP address an IP SAN,
    /// anything else a DNS SAN.
    pub sans: Vec<String>,
    /// Add the `serverAuth` extended key usage.
    pub server_auth: bool,
    /// Add the `clientAuth` extended key usage.
    pub client_auth: bool,
    /// Start of validity.
    pub not_before: time::OffsetDateTime,
    /// End of validity.
    pub not_after: time::OffsetDateTime,
}

impl LeafSpec {
    /// Valid from a day ago for a year.
    fn current(common_name: &str, sans: &[&str], server_auth: bool, client_auth: bool) -> Self {
        let now = time::OffsetDateTime::now_utc();
        LeafSpec {
            common_name: common_name.to_owned(),
            sans: sans.iter().map(|s| (*s).to_owned()).collect(),
            server_auth,
            client_auth,
            not_before: now - time::Duration::days(1),
            not_after: now + time::Duration::days(365),
        }
    }

    /// A server certificate for `hosts`, valid now.
    pub fn server(hosts: &[&str]) -> Self {
        Self::current(
            hosts.first().copied().unwrap_or("server"),
            hosts,
            true,
            false,
        )
    }

    /// A client certificate with these SANs (e.g. `spiffe://prod/ns/billing/sa/api`).
    pub fn client(sans: &[&str]) -> Self {
        Self::current(sans.first().copied().unwrap_or("client"), sans, false, true)
    }

    /// Make it expired: valid from 30 days ago until yesterday.
    pub fn expired(mut self) -> Self {
        let now = time::OffsetDateTime::now_utc();
        self.not_before = now - time::Duration::days(30);
        self.not_after = now - time::Duration::days(1);
        self
    }
}

/// A certificate issued by a [`TestPki`] CA, with its private key.
#[derive(Clone)]
pub struct IssuedCert {
    /// The certificate (PEM).
    pub cert_pem: String,
    /// Its private key (PKCS#8 PEM).
    pub key_pem: String,
}

impl IssuedCert {
    /// The certificate and key as simulator TLS settings.
    pub fn sim_tls(&self) -> SimTls {
        SimTls {
            cert_chain_pem: self.cert_pem.clone(),
            key_pem: self.key_pem.clone(),
        }
    }
}

impl fmt::Debug for IssuedCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssuedCert")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

/// A self-signed test CA and a server certificate signed by it.
pub struct TestPki {
    /// The CA certificate (PEM): what clients trust.
    pub ca_cert_pem: String,
    /// The server certificate (PEM) for the hosts given to [`generate_pki`].
    pub server_cert_pem: String,
    /// The server certificate's private key (PKCS#8 PEM).
    pub server_key_pem: String,
    ca_cert: rcgen::Certificate,
    ca_key: rcgen::KeyPair,
}

/// Alias kept for callers that name the PKI type `Pki`.
pub type Pki = TestPki;

impl fmt::Debug for TestPki {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TestPki")
            .field("ca_cert_pem", &self.ca_cert_pem)
            .field("server_cert_pem", &self.server_cert_pem)
            .field("server_key_pem", &"<redacted>")
            .finish_non_exhaustive()
    }
}

/// Make a self-signed CA and a server certificate signed by it for `hosts` (DNS names or
/// IP addresses, e.g. `["localhost", "127.0.0.1"]`).
pub fn generate_pki(hosts: &[&str]) -> Result<TestPki, PkiError> {
    let now = time::OffsetDateTime::now_utc();
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "mpc-gateway test CA");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = now - time::Duration::days(1);
    params.not_after = now + time::Duration::days(3650);
    let ca_key = rcgen::KeyPair::generate()?;
    let ca_cert = params.self_signed(&ca_key)?;
    let mut pki = TestPki {
        ca_cert_pem: ca_cert.pem(),
        server_cert_pem: String::new(),
        server_key_pem: String::new(),
        ca_cert,
        ca_key,
    };
    let server = pki.issue(&LeafSpec::server(hosts))?;
    pki.server_cert_pem = server.cert_pem;
    pki.server_key_pem = server.key_pem;
    Ok(pki)
}

impl TestPki {
    /// Same as [`generate_pki`].
    pub fn generate(hosts: &[&str]) -> Result<TestPki, PkiError> {
        generate_pki(hosts)
    }

    /// The server certificate and key as simulator TLS settings.
    pub fn server_tls(&self) -> SimTls {
        SimTls {
            cert_chain_pem: self.server_cert_pem.clone(),
            key_pem: self.server_key_pem.clone(),
        }
    }

    /// The CA certificate (DER).
    pub fn ca_cert_der(&self) -> CertificateDer<'static> {
        self.ca_cert.der().clone()
    }

    /// A root store that trusts only this CA.
    pub fn root_store(&self) -> Result<rustls::RootCertStore, PkiError> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca_cert_der())?;
        Ok(roots)
    }

    /// Issue a leaf certificate signed by this CA.
    pub fn issue(&self, spec: &LeafSpec) -> Result<IssuedCert, PkiError> {
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, spec.common_name.as_str());
        params.subject_alt_names = spec
            .sans
            .iter()
            .map(|san| san_type(san))
            .collect::<Result<_, _>>()?;
        params.is_ca = rcgen::IsCa::ExplicitNoCa;
        params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
        if spec.server_auth {
            params
                .extended_key_usages
                .push(rcgen::ExtendedKeyUsagePurpose::ServerAuth);
        }
        if spec.client_auth {
            params
                .extended_key_usages
                .push(rcgen::ExtendedKeyUsagePurpose::ClientAuth);
        }
        params.use_authority_key_identifier_extension = true;
        params.not_before = spec.not_before;
        params.not_after = spec.not_after;
        let key = rcgen::KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.ca_cert, &self.ca_key)?;
        Ok(IssuedCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// A server certificate for other hosts (e.g. the wrong one), valid now.
    pub fn issue_server_cert(&self, hosts: &[&str]) -> Result<IssuedCert, PkiError> {
        self.issue(&LeafSpec::server(hosts))
    }

    /// A client certificate with these SANs (`spiffe://…` URIs, DNS names), valid now.
    pub fn issue_client_cert(&self, sans: &[&str]) -> Result<IssuedCert, PkiError> {
        self.issue(&LeafSpec::client(sans))
    }

    /// A server certificate for `hosts` whose `not_after` is in the past.
    pub fn issue_expired_server_cert(&self, hosts: &[&str]) -> Result<IssuedCert, PkiError> {
        self.issue(&LeafSpec::server(hosts).expired())
    }

    /// A client certificate with these SANs whose `not_after` is in the past.
    pub fn issue_expired_client_cert(&self, sans: &[&str]) -> Result<IssuedCert, PkiError> {
        self.issue(&LeafSpec::client(sans).expired())
    }
}

fn san_type(san: &str) -> Result<rcgen::SanType, rcgen::Error> {
    if san.contains("://") {
        Ok(rcgen::SanType::URI(rcgen::Ia5String::try_from(san)?))
    } else if let Ok(ip) = san.parse::<IpAddr>() {
        Ok(rcgen::SanType::IpAddress(ip))
    } else {
        Ok(rcgen::SanType::DnsName(rcgen::Ia5String::try_from(san)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper_util::client::legacy::{connect::HttpConnector, Client};
    use hyper_util::rt::TokioExecutor;
    use std::future::Future;
    use std::time::Instant;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    const ID: &str = "MAXXXXXXXXXXXXXXXXXX";
    const TOKEN: &str = "test_token_123";

    type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

    /// Every test body runs under this bound.
    async fn bounded(fut: impl Future<Output = TestResult>) -> TestResult {
        tokio::time::timeout(Duration::from_secs(5), fut).await?
    }

    fn basic(id: &str, token: &str) -> String {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{id}:{token}"))
        )
    }

    fn client() -> Client<HttpConnector, Full<Bytes>> {
        Client::builder(TokioExecutor::new()).build_http()
    }

    fn request(
        method: Method,
        url: &str,
        auth: Option<String>,
        body: &str,
    ) -> Request<Full<Bytes>> {
        let mut req = Request::new(Full::new(Bytes::from(body.to_owned())));
        *req.method_mut() = method;
        *req.uri_mut() = url.parse().expect("test url");
        if let Some(auth) = auth {
            req.headers_mut()
                .insert(AUTHORIZATION, HeaderValue::from_str(&auth).expect("header"));
        }
        req
    }

    struct Answer {
        status: StatusCode,
        headers: hyper::HeaderMap,
        body: Bytes,
    }

    impl Answer {
        fn json(&self) -> serde_json::Value {
            serde_json::from_slice(&self.body).expect("json body")
        }
    }

    async fn send(
        client: &Client<HttpConnector, Full<Bytes>>,
        req: Request<Full<Bytes>>,
    ) -> Result<Answer, Box<dyn std::error::Error + Send + Sync>> {
        let resp = client.request(req).await?;
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = resp.into_body().collect().await?.to_bytes();
        Ok(Answer {
            status,
            headers,
            body,
        })
    }

    fn mpc_url(sim: &Simulator, account: &str, id: &str) -> String {
        format!(
            "{}/v1/Account/{account}/MultiPartyCall/{id}/",
            sim.base_url()
        )
    }

    async fn delete(
        sim: &Simulator,
        client: &Client<HttpConnector, Full<Bytes>>,
        id: &str,
    ) -> Result<Answer, Box<dyn std::error::Error + Send + Sync>> {
        let url = mpc_url(sim, ID, id);
        send(
            client,
            request(Method::DELETE, &url, Some(basic(ID, TOKEN)), ""),
        )
        .await
    }

    fn assert_plivo_error(answer: &Answer, status: StatusCode, message: &str) {
        assert_eq!(answer.status, status);
        assert_eq!(
            answer.headers.get(CONTENT_TYPE).map(|v| v.as_bytes()),
            Some(&b"application/json"[..])
        );
        let json = answer.json();
        assert_eq!(json["error"], message);
        let api_id = json["api_id"].as_str().expect("api_id");
        assert!(
            Uuid::try_parse(api_id).is_ok(),
            "api_id is a uuid: {api_id}"
        );
    }

    async fn explicit_sim() -> io::Result<Simulator> {
        let mut config = SimulatorConfig::new(ID, TOKEN);
        config.liveness = Liveness::Explicit;
        Simulator::start(config).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn name_is_ended_once() -> TestResult {
        bounded(async {
            let sim = Simulator::start(SimulatorConfig::new(ID, TOKEN)).await?;
            assert!(sim.base_url().starts_with("http://127.0.0.1:"));
            let client = client();
            assert!(sim.is_live("conf-1"));
            let first = delete(&sim, &client, "name_conf-1").await?;
            assert_eq!(first.status, StatusCode::NO_CONTENT);
            assert!(first.body.is_empty());
            assert!(!sim.is_live("conf-1"));
            let second = delete(&sim, &client, "name_conf-1").await?;
            assert_plivo_error(&second, StatusCode::NOT_FOUND, ERR_NOT_FOUND);
            // Another name is still live; the trailing slash is optional.
            let url = format!(
                "{}/v1/Account/{ID}/MultiPartyCall/name_conf-2",
                sim.base_url()
            );
            let other = send(
                &client,
                request(Method::DELETE, &url, Some(basic(ID, TOKEN)), ""),
            )
            .await?;
            assert_eq!(other.status, StatusCode::NO_CONTENT);
            assert_eq!(sim.request_count(), 3);
            sim.shutdown().await;
            Ok(())
        })
        .await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn wrong_credentials_are_401() -> TestResult {
        bounded(async {
            let sim = Simulator::start(SimulatorConfig::new(ID, TOKEN)).await?;
            let client = client();
            let url = mpc_url(&sim, ID, "name_conf");
            let cases = [
                (url.clone(), Some(basic(ID, "wrong"))),
                (url.clone(), Some(basic("MAYYYYYYYYYYYYYYYYYY", TOKEN))),
                (url.clone(), None),
                (url.clone(), Some(format!("Bearer {TOKEN}"))),
                (url.clone(), Some("Basic !!!".to_owned())),
                // Right credentials, but another account in the path.
                (
                    mpc_url(&sim, "MAYYYYYYYYYYYYYYYYYY", "name_conf"),
                    Some(basic(ID, TOKEN)),
                ),
            ];
            for (url, auth) in cases {
                let answer = send(&client, request(Method::DELETE, &url, auth, "")).await?;
                assert_plivo_error(&answer, StatusCode::UNAUTHORIZED, ERR_AUTH);
            }
            assert!(sim.is_live("conf"), "a refused request ends nothing");
            // Other spellings of a valid Basic header are accepted.
            let unpadded = format!(
                "basic   {}",
                base64::engine::general_purpose::STANDARD_NO_PAD.encode(format!("{ID}:{TOKEN}"))
            );
            let answer = send(&client, request(Method::DELETE, &url, Some(unpadded), "")).await?;
            assert_eq!(answer.status, StatusCode::NO_CONTENT);
            Ok(())
        })
        .await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn names_are_percent_decoded() -> TestResult {
        bounded(async {
            let sim = explicit_sim().await?;
            let client = client();
            sim.add_mpc("a b");
            sim.add_mpc("ä");
            sim.add_mpc("a+b");
            assert_eq!(
                delete(&sim, &client, "name_a%20b").await?.status,
                StatusCode::NO_CONTENT
            );
            assert!(!sim.is_live("a b"));
            assert_eq!(
                delete(&sim, &client, "name_%C3%A4").await?.status,
                StatusCode::NO_CONTENT
            );
            assert!(!sim.is_live("ä"));
            // `+` is not a space in a path.
            assert_eq!(
                delete(&sim, &client, "name_a+b").await?.status,
                StatusCode::NO_CONTENT
            );
            // Unknown in explicit mode, invalid UTF-8, slashes inside: 404.
            for id in ["name_unknown", "name_%FF", "name_a/b", "name_", "other_x"] {
                let answer = delete(&sim, &client, id).await?;
                assert_plivo_error(&answer, StatusCode::NOT_FOUND, ERR_NOT_FOUND);
            }
            Ok(())
        })
        .await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn by_uuid_get_and_delete() -> TestResult {
        bounded(async {
            let sim = explicit_sim().await?;
            let client = client();
            let uuid = sim.add_mpc("conf");
            assert_eq!(sim.add_mpc("conf"), uuid, "a live MPC keeps its uuid");
            let url = mpc_url(&sim, ID, &format!("uuid_{uuid}"));
            let get = || request(Method::GET, &url, Some(basic(ID, TOKEN)), "");

            let live = send(&client, get()).await?;
            assert_eq!(live.status, StatusCode::OK);
            let json = live.json();
            assert_eq!(json["friendly_name"], "conf");
            assert_eq!(json["mpc_uuid"], uuid.as_str());
            assert_eq!(json["status"], "Active");
            assert!(json["api_id"].is_string());

            let ended = send(
                &client,
                request(Method::DELETE, &url, Some(basic(ID, TOKEN)), ""),
            )
            .await?;
            assert_eq!(ended.status, StatusCode::NO_CONTENT);
            assert!(!sim.is_live("conf"));
            assert_eq!(send(&client, get()).await?.json()["status"], "Ended");
            let again = send(
                &client,
                request(Method::DELETE, &url, Some(basic(ID, TOKEN)), ""),
            )
            .await?;
            assert_plivo_error(&again, StatusCode::NOT_FOUND, ERR_NOT_FOUND);
            assert_eq!(
                delete(&sim, &client, "name_conf").await?.status,
                StatusCode::NOT_FOUND
            );

            // GET by name works too.
            let by_name = mpc_url(&sim, ID, "name_conf");
            let answer = send(
                &client,
                request(Method::GET, &by_name, Some(basic(ID, TOKEN)), ""),
            )
            .await?;
            assert_eq!(answer.json()["mpc_uuid"], uuid.as_str());

            // A new MPC with the same name gets a new uuid.
            let second = sim.add_mpc("conf");
            assert_ne!(second, uuid);
            assert_eq!(
                delete(&sim, &client, &format!("uuid_{second}"))
                    .await?
                    .status,
                StatusCode::NO_CONTENT
            );

            let unknown = mpc_url(&sim, ID, &format!("uuid_{}", Uuid::new_v4()));
            let answer = send(
                &client,
                request(Method::GET, &unknown, Some(basic(ID, TOKEN)), ""),
            )
            .await?;
            assert_plivo_error(&answer, StatusCode::NOT_FOUND, ERR_NOT_FOUND);
            let answer = delete(&sim, &client, "uuid_not-a-uuid").await?;
            assert_plivo_error(&answer, StatusCode::NOT_FOUND, ERR_NOT_FOUND);

            // Other methods and paths.
            let answer = send(
                &client,
                request(Method::POST, &url, Some(basic(ID, TOKEN)), ""),
            )
            .await?;
            assert_plivo_error(
                &answer,
                StatusCode::METHOD_NOT_ALLOWED,
                "method not allowed",
            );
            let elsewhere = format!("{}/v1/Call/", sim.base_url());
            let answer = send(
                &client,
                request(Method::GET, &elsewhere, Some(basic(ID, TOKEN)), ""),
            )
            .await?;
            assert_plivo_error(&answer, StatusCode::NOT_FOUND, ERR_NOT_FOUND);
            Ok(())
        })
        .await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn fault_status_then_normal() -> TestResult {
        bounded(async {
            let sim = Simulator::start(SimulatorConfig::new(ID, TOKEN)).await?;
            let client = client();
            sim.push_fault(Fault::Status {
                status: 503,
                headers: vec![("Retry-After".to_owned(), "7".to_owned())],
                body: r#"{"error":"busy"}"#.to_owned(),
            });
            sim.push_fault(Fault::status(429, ""));
            let first = delete(&sim, &client, "name_conf").await?;
            assert_eq!(first.status, StatusCode::SERVICE_UNAVAILABLE);
            assert_eq!(
                first.headers.get("retry-after").map(|v| v.as_bytes()),
                Some(&b"7"[..])
            );
            assert_eq!(first.json()["error"], "busy");
            let second = delete(&sim, &client, "name_conf").await?;
            assert_eq!(second.status, StatusCode::TOO_MANY_REQUESTS);
            assert!(second.body.is_empty());
            assert!(sim.is_live("conf"), "a faulted request ends nothing");
            assert_eq!(
                delete(&sim, &client, "name_conf").await?.status,
                StatusCode::NO_CONTENT
            );
            Ok(())
        })
        .await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn fault_delay_and_latency() -> TestResult {
        bounded(async {
            let mut config = SimulatorConfig::new(ID, TOKEN);
            config.latency = Duration::from_millis(50);
            let sim = Simulator::start(config).await?;
            let client = client();
            sim.push_fault(Fault::Delay(Duration::from_millis(300)));
            let started = Instant::now();
            assert_eq!(
                delete(&sim, &client, "name_a").await?.status,
                StatusCode::NO_CONTENT
            );
            assert!(
                started.elapsed() >= Duration::from_millis(350),
                "{:?}",
                started.elapsed()
            );
            let started = Instant::now();
            assert_eq!(
                delete(&sim, &client, "name_b").await?.status,
                StatusCode::NO_CONTENT
            );
            let elapsed = started.elapsed();
            assert!(elapsed >= Duration::from_millis(50), "{elapsed:?}");
            assert!(
                elapsed < Duration::from_millis(300),
                "delay is one-shot: {elapsed:?}"
            );
            Ok(())
        })
        .await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn fault_reset_closes_the_connection() -> TestResult {
        bounded(async {
            let sim = Simulator::start(SimulatorConfig::new(ID, TOKEN)).await?;
            let client = client();
            sim.push_fault(Fault::Reset);
            assert!(delete(&sim, &client, "name_a").await.is_err());
            assert!(sim.is_live("a"));
            assert_eq!(delete(&sim, &client, "name_a").await?.status, StatusCode::NO_CONTENT);

            // On the wire: an RST, not an answer.
            sim.push_fault(Fault::Reset);
            let mut tcp = TcpStream::connect(sim.local_addr()).await?;
            let raw = format!(
                "DELETE /v1/Account/{ID}/MultiPartyCall/name_b/ HTTP/1.1\r\nHost: x\r\nAuthorization: {}\r\n\r\n",
                basic(ID, TOKEN)
            );
            tcp.write_all(raw.as_bytes()).await?;
            let mut buf = Vec::new();
            let read = tcp.read_to_end(&mut buf).await;
            assert!(buf.is_empty(), "no answer bytes");
            match read {
                Err(err) => assert_eq!(err.kind(), io::ErrorKind::ConnectionReset),
                Ok(n) => panic!("expected a reset, got EOF after {n} bytes"),
            }
            assert_eq!(sim.request_count(), 3);
            Ok(())
        })
        .await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn fault_hang_holds_until_shutdown() -> TestResult {
        bounded(async {
            let sim = Simulator::start(SimulatorConfig::new(ID, TOKEN)).await?;
            let client = client();
            sim.push_fault(Fault::Hang);
            let hung = tokio::time::timeout(Duration::from_millis(300), delete(&sim, &client, "name_a")).await;
            assert!(hung.is_err(), "the client times out");
            assert!(sim.is_live("a"));

            // A raw connection is held open until the simulator stops, then closed.
            sim.push_fault(Fault::Hang);
            let mut tcp = TcpStream::connect(sim.local_addr()).await?;
            let raw = format!(
                "DELETE /v1/Account/{ID}/MultiPartyCall/name_b/ HTTP/1.1\r\nHost: x\r\nAuthorization: {}\r\n\r\n",
                basic(ID, TOKEN)
            );
            tcp.write_all(raw.as_bytes()).await?;
            let mut buf = [0u8; 64];
            let early = tokio::time::timeout(Duration::from_millis(200), tcp.read(&mut buf)).await;
            assert!(early.is_err(), "nothing comes back while hanging");
            let started = Instant::now();
            sim.shutdown().await;
            assert!(started.elapsed() < Duration::from_secs(1), "hung requests do not delay shutdown");
            let after = tokio::time::timeout(Duration::from_secs(1), tcp.read(&mut buf)).await?;
            assert!(matches!(after, Ok(0) | Err(_)), "closed without an answer: {after:?}");
            Ok(())
        })
        .await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn requests_are_recorded() -> TestResult {
        bounded(async {
            let sim = Simulator::start(SimulatorConfig::new(ID, TOKEN)).await?;
            let client = client();
            let url = mpc_url(&sim, ID, "name_a%20b");
            let mut req = request(
                Method::DELETE,
                &url,
                Some(basic(ID, TOKEN)),
                r#"{"friendly_name": "a b"}"#,
            );
            req.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            req.headers_mut()
                .insert("User-Agent", HeaderValue::from_static("mpc-gateway/test"));
            assert_eq!(send(&client, req).await?.status, StatusCode::NO_CONTENT);

            let recorded = sim.requests();
            assert_eq!(recorded.len(), 1);
            let r = &recorded[0];
            assert_eq!(r.method, "DELETE");
            assert_eq!(
                r.target,
                format!("/v1/Account/{ID}/MultiPartyCall/name_a%20b/")
            );
            assert_eq!(r.body, Bytes::from_static(br#"{"friendly_name": "a b"}"#));
            let auth = basic(ID, TOKEN);
            assert_eq!(r.header("authorization"), Some(auth.as_str()));
            assert_eq!(r.header("User-Agent"), Some("mpc-gateway/test"));
            assert_eq!(r.header("content-type"), Some("application/json"));
            assert!(r.headers.iter().all(|(n, _)| *n == n.to_ascii_lowercase()));
            let names: Vec<&str> = r.headers.iter().map(|(n, _)| n.as_str()).collect();
            let pos = |n: &str| names.iter().position(|x| *x == n);
            assert!(
                pos("authorization") < pos("user-agent"),
                "arrival order: {names:?}"
            );

            sim.clear_requests();
            assert!(sim.requests().is_empty());
            assert_eq!(sim.request_count(), 1);

            let mut config = SimulatorConfig::new(ID, TOKEN);
            config.record = false;
            let quiet = Simulator::start(config).await?;
            assert_eq!(
                delete(&quiet, &client, "name_x").await?.status,
                StatusCode::NO_CONTENT
            );
            assert_eq!(
                delete(&quiet, &client, "name_x").await?.status,
                StatusCode::NOT_FOUND
            );
            assert_eq!(quiet.request_count(), 2);
            assert!(quiet.requests().is_empty());
            Ok(())
        })
        .await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn forget_ended_answers_204_forever() -> TestResult {
        bounded(async {
            let mut config = SimulatorConfig::new(ID, TOKEN);
            config.liveness = Liveness::AllNames { forget_ended: true };
            config.record = false;
            let sim = Simulator::start(config).await?;
            let client = client();
            for _ in 0..3 {
                assert_eq!(
                    delete(&sim, &client, "name_bench").await?.status,
                    StatusCode::NO_CONTENT
                );
            }
            assert!(sim.is_live("bench"));
            // An added MPC ends once by uuid, then is forgotten.
            let uuid = sim.add_mpc("added");
            assert_eq!(
                delete(&sim, &client, &format!("uuid_{uuid}")).await?.status,
                StatusCode::NO_CONTENT
            );
            assert_eq!(
                delete(&sim, &client, &format!("uuid_{uuid}")).await?.status,
                StatusCode::NOT_FOUND
            );
            assert_eq!(
                delete(&sim, &client, "name_added").await?.status,
                StatusCode::NO_CONTENT
            );
            {
                let registry = lock(&sim.shared.registry);
                assert!(
                    registry.by_name.is_empty() && registry.by_uuid.is_empty(),
                    "nothing kept"
                );
            }
            Ok(())
        })
        .await
    }

    fn tls_client_config(
        roots: rustls::RootCertStore,
    ) -> Result<rustls::ClientConfig, rustls::Error> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(config)
    }

    /// One request over TLS to the simulator, verifying it as `server_name`.
    async fn tls_send(
        sim: &Simulator,
        roots: rustls::RootCertStore,
        server_name: &str,
        req: Request<Full<Bytes>>,
    ) -> Result<Answer, Box<dyn std::error::Error + Send + Sync>> {
        let connector = tokio_rustls::TlsConnector::from(Arc::new(tls_client_config(roots)?));
        let tcp = TcpStream::connect(sim.local_addr()).await?;
        let name = rustls::pki_types::ServerName::try_from(server_name.to_owned())?;
        let tls = connector.connect(name, tcp).await?;
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
        tokio::spawn(conn);
        let resp = sender.send_request(req).await?;
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = resp.into_body().collect().await?.to_bytes();
        Ok(Answer {
            status,
            headers,
            body,
        })
    }

    fn tls_delete(sim: &Simulator, name: &str) -> Request<Full<Bytes>> {
        let mut req = request(
            Method::DELETE,
            &format!("/v1/Account/{ID}/MultiPartyCall/name_{name}/"),
            Some(basic(ID, TOKEN)),
            "",
        );
        let host = format!("localhost:{}", sim.local_addr().port());
        req.headers_mut().insert(
            hyper::header::HOST,
            HeaderValue::from_str(&host).expect("host"),
        );
        req
    }

    async fn tls_sim(tls: SimTls) -> io::Result<Simulator> {
        let mut config = SimulatorConfig::new(ID, TOKEN);
        config.tls = Some(tls);
        Simulator::start(config).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tls_with_generated_ca() -> TestResult {
        bounded(async {
            let pki = generate_pki(&["localhost", "127.0.0.1"])?;
            let sim = tls_sim(pki.server_tls()).await?;
            assert_eq!(
                sim.base_url(),
                format!("https://localhost:{}", sim.local_addr().port())
            );
            let answer = tls_send(
                &sim,
                pki.root_store()?,
                "localhost",
                tls_delete(&sim, "conf"),
            )
            .await?;
            assert_eq!(answer.status, StatusCode::NO_CONTENT);
            let answer = tls_send(
                &sim,
                pki.root_store()?,
                "127.0.0.1",
                tls_delete(&sim, "conf"),
            )
            .await?;
            assert_plivo_error(&answer, StatusCode::NOT_FOUND, ERR_NOT_FOUND);

            // A client that trusts another CA fails the handshake.
            let other = generate_pki(&["localhost"])?;
            assert!(tls_send(
                &sim,
                other.root_store()?,
                "localhost",
                tls_delete(&sim, "x")
            )
            .await
            .is_err());
            // So does one that trusts nothing.
            let empty = rustls::RootCertStore::empty();
            assert!(tls_send(&sim, empty, "localhost", tls_delete(&sim, "x"))
                .await
                .is_err());
            // The simulator keeps serving afterwards.
            let answer =
                tls_send(&sim, pki.root_store()?, "localhost", tls_delete(&sim, "y")).await?;
            assert_eq!(answer.status, StatusCode::NO_CONTENT);
            assert_eq!(sim.request_count(), 3);

            // A garbage key is refused at start.
            let bad = SimTls {
                cert_chain_pem: pki.server_cert_pem.clone(),
                key_pem: "not a key".to_owned(),
            };
            assert!(tls_sim(bad).await.is_err());
            Ok(())
        })
        .await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tls_wrong_host_and_expired_certs_fail() -> TestResult {
        bounded(async {
            let pki = generate_pki(&["localhost"])?;
            let wrong = tls_sim(pki.issue_server_cert(&["other.example"])?.sim_tls()).await?;
            let err = tls_send(
                &wrong,
                pki.root_store()?,
                "localhost",
                tls_delete(&wrong, "x"),
            )
            .await
            .err()
            .ok_or("wrong host accepted")?;
            assert!(err.to_string().contains("not valid for name"), "{err}");

            let expired = tls_sim(pki.issue_expired_server_cert(&["localhost"])?.sim_tls()).await?;
            let err = tls_send(
                &expired,
                pki.root_store()?,
                "localhost",
                tls_delete(&expired, "x"),
            )
            .await
            .err()
            .ok_or("expired cert accepted")?;
            assert!(err.to_string().to_lowercase().contains("expired"), "{err}");
            Ok(())
        })
        .await
    }

    #[test]
    fn client_certs_verify_against_the_ca() -> TestResult {
        let pki = generate_pki(&["localhost"])?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(pki.root_store()?),
            provider,
        )
        .build()?;
        let der = |pem: &str| -> Result<CertificateDer<'static>, io::Error> {
            rustls_pemfile::certs(&mut pem.as_bytes())
                .next()
                .ok_or_else(|| invalid_input("no cert"))?
        };
        let now = rustls::pki_types::UnixTime::now();

        let client = pki.issue_client_cert(&["spiffe://prod/ns/billing/sa/api", "api.billing"])?;
        verifier.verify_client_cert(&der(&client.cert_pem)?, &[], now)?;
        assert!(client.key_pem.contains("PRIVATE KEY"));
        assert!(
            !format!("{client:?}").contains("PRIVATE KEY"),
            "Debug hides the key"
        );
        assert!(
            !format!("{pki:?}").contains("PRIVATE KEY"),
            "Debug hides the key"
        );

        let expired = pki.issue_expired_client_cert(&["spiffe://prod/ns/billing/sa/api"])?;
        let err = verifier
            .verify_client_cert(&der(&expired.cert_pem)?, &[], now)
            .err()
            .ok_or("expired client cert accepted")?;
        assert!(format!("{err:?}").contains("Expired"), "{err:?}");

        // A server certificate is not a client certificate, and another CA's is unknown.
        let server = der(&pki.server_cert_pem)?;
        assert!(verifier.verify_client_cert(&server, &[], now).is_err());
        let other = generate_pki(&["localhost"])?.issue_client_cert(&["spiffe://x"])?;
        assert!(verifier
            .verify_client_cert(&der(&other.cert_pem)?, &[], now)
            .is_err());
        Ok(())
    }

    #[test]
    fn standalone_args_parse() -> TestResult {
        use clap::Parser as _;
        #[derive(clap::Parser, Debug)]
        struct Cli {
            #[command(flatten)]
            args: SimulatorArgs,
        }
        let cli = Cli::try_parse_from(["sim", "--auth-id", ID, "--auth-token-env", "SIM_TOKEN"])?;
        assert_eq!(cli.args.listen, SocketAddr::from(([127, 0, 0, 1], 0)));
        assert_eq!(Duration::from(cli.args.latency), Duration::ZERO);
        assert!(!cli.args.forget_ended && cli.args.tls_cert.is_none());
        let cli = Cli::try_parse_from([
            "sim",
            "--auth-id",
            ID,
            "--auth-token-env",
            "T",
            "--latency",
            "5ms",
            "--forget-ended",
            "--listen",
            "127.0.0.1:9999",
            "--tls-cert",
            "c.pem",
            "--tls-key",
            "k.pem",
        ])?;
        assert_eq!(Duration::from(cli.args.latency), Duration::from_millis(5));
        assert!(cli.args.forget_ended);
        assert!(Cli::try_parse_from([
            "sim",
            "--auth-id",
            ID,
            "--auth-token-env",
            "T",
            "--tls-cert",
            "c.pem"
        ])
        .is_err());
        Ok(())
    }
}
