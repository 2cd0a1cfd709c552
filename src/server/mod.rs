//! The listeners: the data listener (plain HTTP/1.1 and h2c, or TLS with ALPN `h2` and
//! `http/1.1` and optional client certificates when `listen_tls` is set; hardened against
//! slow and oversized input) serving [`Gateway`], the admin listener, graceful drain, and
//! the `serve` command's signal handling (SIGHUP reload, SIGTERM/SIGINT drain).

mod drain;
mod idle;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http::header::AUTHORIZATION;
use http::Request;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use secrecy::ExposeSecret;
use sha2::{Digest, Sha256};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tower::ServiceBuilder;
use tower_http::sensitive_headers::SetSensitiveRequestHeadersLayer;

use crate::admin;
use crate::audit::{AuditError, AuditLog, AuditPath, Fsync};
use crate::config::{Config, ConfigError, LogSettings};
use crate::gateway::{BuildError, Gateway, Peer, MAX_HEADER_BLOCK_BYTES, MAX_REQUEST_LINE_BYTES};
use crate::problem::Problem;
use crate::rate_limit::LimiterClock;
use crate::request_id::{RequestId, X_REQUEST_ID};
use crate::routes::Flavor;
use crate::telemetry::Metrics;
use crate::tls::ClientCertificate;
use drain::{Drain, Superseded, Watcher};
use idle::{FirstHead, H2Activity};

/// A client must send its whole request head within this time (slowloris).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// An HTTP/2 connection with no request in flight for this long is closed. hyper's HTTP/2
/// server has no idle timeout, and a client that answers its pings would hold a
/// connection slot for ever; over HTTP/1.1 the header timeout does this job, as hyper
/// restarts it while waiting for the next request head.
pub const H2_IDLE_TIMEOUT: Duration = HEADER_READ_TIMEOUT;
/// Connections beyond this wait in the kernel's accept queue instead of costing memory.
pub const MAX_CONNECTIONS: usize = 4096;
/// Hyper's read buffer: room for a request line up to hyper's own URI limit (64 KiB, above
/// which hyper answers 414 itself) plus the largest header block the contract allows, so
/// the gateway decides between 414 and 431 for every head below this size. Only a head
/// larger than this gets hyper's 431. Hyper grows the buffer only as bytes arrive.
const MAX_HEAD_BYTES: usize = 64 * 1024 + MAX_HEADER_BLOCK_BYTES + 1024;
/// Header fields per request; more is `431` from the HTTP layer.
pub const MAX_HEADERS: usize = 100;
/// HTTP/2's SETTINGS_MAX_HEADER_LIST_SIZE, which counts 32 bytes per field besides its
/// name and value: the contract's largest request line and header block with a quarter
/// to spare, so the gateway, not the h2 library (whose default is 16 KiB), answers `414`
/// and `431` for heads somewhat over them; larger heads get h2's own refusal, as HTTP/1.1
/// heads over `MAX_HEAD_BYTES` get hyper's. Not more: an HTTP/2 connection may hold up
/// to `max_concurrent_streams` heads at once, each until its body arrives.
const H2_MAX_HEADER_LIST_BYTES: u32 = {
    let bytes = (MAX_REQUEST_LINE_BYTES + MAX_HEADER_BLOCK_BYTES) * 5 / 4 + (MAX_HEADERS + 4) * 32;
    assert!(bytes <= u32::MAX as usize);
    bytes as u32
};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot open the audit log: {0}")]
    Audit(#[from] AuditError),
    #[error("{0}")]
    Build(#[from] BuildError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("{0}")]
    Config(#[from] ConfigError),
    #[error("{0}")]
    Build(#[from] BuildError),
    #[error("listen_tls cannot be turned on or off by a reload; restart the gateway")]
    TlsModeChanged,
}

/// Knobs tests turn; production uses the defaults.
#[derive(Debug, Clone)]
pub struct StartOptions {
    pub limiter_clock: LimiterClock,
}

impl Default for StartOptions {
    fn default() -> Self {
        StartOptions {
            limiter_clock: LimiterClock::monotonic(),
        }
    }
}

/// A started gateway: both listeners bound and serving.
pub struct RunningGateway {
    gateway: Gateway,
    local_addr: SocketAddr,
    admin_addr: SocketAddr,
    stop_accepting: watch::Sender<bool>,
    data_task: JoinHandle<()>,
    admin_task: JoinHandle<()>,
    shutdown_grace: Duration,
    settings_at_start: RestartOnlySettings,
}

/// Settings a reload cannot change (they need a restart); compared to warn about it.
struct RestartOnlySettings {
    listen: SocketAddr,
    admin_listen: SocketAddr,
    worker_threads: usize,
    /// Read once, by the drain that `start` arms.
    shutdown_grace: Duration,
    /// The subscriber is installed once per process.
    log: LogSettings,
    tls: bool,
    audit_path: AuditPath,
    audit_fsync: Fsync,
    audit_rotate_bytes: u64,
    /// SHA-256 of the key, so a key changed in its file is noticed without keeping a copy.
    audit_key_digest: Option<[u8; 32]>,
}

impl RestartOnlySettings {
    fn of(config: &Config) -> RestartOnlySettings {
        RestartOnlySettings {
            listen: config.listen,
            admin_listen: config.admin_listen,
            worker_threads: config.worker_threads,
            shutdown_grace: config.shutdown_grace,
            log: config.log.clone(),
            tls: config.listen_tls.is_some(),
            audit_path: config.audit.path.clone(),
            audit_fsync: config.audit.fsync,
            audit_rotate_bytes: config.audit.rotate_bytes,
            audit_key_digest: config
                .audit
                .hmac_key
                .as_ref()
                .map(|key| Sha256::digest(key.expose_secret()).into()),
        }
    }

    /// The config keys that differ from `other`, for the reload warning.
    fn changed_from(&self, other: &RestartOnlySettings) -> Vec<&'static str> {
        [
            ("listen", self.listen != other.listen),
            ("admin_listen", self.admin_listen != other.admin_listen),
            (
                "worker_threads",
                self.worker_threads != other.worker_threads,
            ),
            (
                "shutdown_grace",
                self.shutdown_grace != other.shutdown_grace,
            ),
            ("log.format", self.log.format != other.log.format),
            ("log.level", self.log.level != other.log.level),
            ("audit.path", self.audit_path != other.audit_path),
            ("audit.fsync", self.audit_fsync != other.audit_fsync),
            (
                "audit.rotate_bytes",
                self.audit_rotate_bytes != other.audit_rotate_bytes,
            ),
            (
                "audit.hmac_key",
                self.audit_key_digest != other.audit_key_digest,
            ),
        ]
        .into_iter()
        .filter_map(|(key, changed)| changed.then_some(key))
        .collect()
    }
}

impl RunningGateway {
    /// Opens the audit log, binds both listeners and starts serving.
    pub async fn start(
        config: &Config,
        options: StartOptions,
    ) -> Result<RunningGateway, StartError> {
        let audit = AuditLog::open(config.audit.clone())?;
        let metrics = Arc::new(Metrics::new());
        let gateway = Gateway::new(config, audit, metrics, options.limiter_clock)?;
        log_warnings(config.warnings());
        let data = bind(config.listen).await?;
        let admin = bind(config.admin_listen).await?;
        let local_addr = local_addr_of(&data, config.listen)?;
        let admin_addr = local_addr_of(&admin, config.admin_listen)?;
        let (stop_accepting, stopped) = watch::channel(false);
        let data_task = tokio::spawn(serve_data(
            data,
            gateway.clone(),
            stopped,
            config.shutdown_grace,
        ));
        let admin_task = tokio::spawn(admin::serve(admin, gateway.clone()));
        tracing::info!(
            %local_addr,
            %admin_addr,
            version = env!("CARGO_PKG_VERSION"),
            "mpc-gateway listening"
        );
        Ok(RunningGateway {
            gateway,
            local_addr,
            admin_addr,
            stop_accepting,
            data_task,
            admin_task,
            shutdown_grace: config.shutdown_grace,
            settings_at_start: RestartOnlySettings::of(config),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    pub fn gateway(&self) -> &Gateway {
        &self.gateway
    }

    /// Re-reads the config file and its secrets; on any error the running config stays.
    pub fn reload_from(&self, path: &Path) -> Result<(), ReloadError> {
        let result = Config::load(path)
            .map_err(ReloadError::from)
            .and_then(|config| self.reload(&config));
        self.gateway.metrics().config_reload(result.is_ok());
        match &result {
            Ok(()) => tracing::info!("configuration reloaded"),
            Err(err) => {
                tracing::error!(error = %err, "configuration reload failed; keeping the running configuration")
            }
        }
        result
    }

    fn reload(&self, config: &Config) -> Result<(), ReloadError> {
        if config.listen_tls.is_some() != self.settings_at_start.tls {
            return Err(ReloadError::TlsModeChanged);
        }
        let changed = RestartOnlySettings::of(config).changed_from(&self.settings_at_start);
        if !changed.is_empty() {
            tracing::warn!(
                settings = %changed.join(", "),
                "changed settings that take effect only after a restart; the running values stay until then"
            );
        }
        self.gateway.reload(config)?;
        log_warnings(config.warnings_with_grace(self.shutdown_grace));
        Ok(())
    }

    /// Drains: readiness fails at once, the listener stops accepting, in-flight requests
    /// get up to `shutdown_grace`, then the audit log is flushed and fsynced.
    pub async fn shutdown(self) -> Result<(), AuditError> {
        self.gateway.start_draining();
        let _ = self.stop_accepting.send(true);
        let grace = self.shutdown_grace;
        let drained_by = grace
            .saturating_add(FORCED_CLOSE_WAIT)
            .saturating_add(Duration::from_secs(1));
        if tokio::time::timeout(drained_by, self.data_task)
            .await
            .is_err()
        {
            tracing::warn!("connections still open after shutdown_grace; closing them");
        }
        // Requests still with Plivo are dropped with the process: their `result` records
        // are written now, before the log closes.
        let cut = self.gateway.cut_forwarded().await;
        if cut > 0 {
            tracing::warn!(
                requests = cut,
                "shutdown_grace ran out with requests forwarded to Plivo; their result records say shutting-down"
            );
        }
        let closed = self.gateway.audit().close().await;
        self.admin_task.abort();
        closed
    }
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { addr, source })
}

fn local_addr_of(listener: &TcpListener, addr: SocketAddr) -> Result<SocketAddr, StartError> {
    listener
        .local_addr()
        .map_err(|source| StartError::Bind { addr, source })
}

/// The HTTP/1.1 and HTTP/2 connection builders. Each speaks one version only: the
/// version is chosen before hyper sees the connection (see [`sniff_version`]), so a
/// client that sends nothing meets a timeout instead of hyper-util's untimed sniffing.
struct Builders {
    http1: auto::Builder<TokioExecutor>,
    http2: auto::Builder<TokioExecutor>,
}

impl Builders {
    fn new() -> Builders {
        Builders {
            http1: http_builder().http1_only(),
            http2: http_builder().http2_only(),
        }
    }

    fn for_version(&self, version: HttpVersion) -> &auto::Builder<TokioExecutor> {
        match version {
            HttpVersion::Http1 => &self.http1,
            HttpVersion::Http2 => &self.http2,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HttpVersion {
    Http1,
    Http2,
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Why a connection has no HTTP version.
enum NoVersion {
    /// Not enough bytes by the head deadline.
    TimedOut,
    /// The client closed (or reset) the connection before sending a byte.
    Closed,
}

/// Tells HTTP/1 from prior-knowledge HTTP/2 (h2c) by peeking at the first bytes, before
/// the connection's head deadline.
async fn sniff_version(stream: &TcpStream, deadline: Instant) -> Result<HttpVersion, NoVersion> {
    let mut buf = [0u8; 24];
    let mut pause = SNIFF_FIRST_PAUSE;
    loop {
        // `timeout_at` polls the peek first, and a partial preface is always ready:
        // check the deadline explicitly.
        if Instant::now() >= deadline {
            return Err(NoVersion::TimedOut);
        }
        let peeked = tokio::time::timeout_at(deadline, stream.peek(&mut buf)).await;
        let n = match peeked {
            // (A client that closes after part of a preface still has those bytes
            // peeked, so it waits out the deadline above.)
            Ok(Ok(0)) | Ok(Err(_)) => return Err(NoVersion::Closed),
            Ok(Ok(n)) => n,
            Err(_) => return Err(NoVersion::TimedOut),
        };
        if buf[..n] != H2_PREFACE[..n] {
            return Ok(HttpVersion::Http1);
        }
        if n == H2_PREFACE.len() {
            return Ok(HttpVersion::Http2);
        }
        // A partial preface: peek would return the same bytes at once, so wait for the
        // rest. Honest h2c clients rarely split their preface; a client that sends one
        // byte and stops must not cost a peek every few milliseconds until the deadline.
        tokio::time::sleep(pause).await;
        pause = next_sniff_pause(pause);
    }
}

const SNIFF_FIRST_PAUSE: Duration = Duration::from_millis(5);
const SNIFF_LONGEST_PAUSE: Duration = Duration::from_millis(250);

/// Doubling pauses between peeks at a partial preface, capped: about 45 peeks in the
/// 10 s a head may take, where a fixed 5 ms pause made 2,000.
fn next_sniff_pause(pause: Duration) -> Duration {
    (pause * 2).min(SNIFF_LONGEST_PAUSE)
}

/// Valid but risky settings of a config just put to use (see [`Config::warnings`]).
fn log_warnings(warnings: Vec<crate::config::ConfigWarning>) {
    for warning in warnings {
        tracing::warn!(key = %warning.key, "{}", warning.message);
    }
}

fn http_builder() -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_HEAD_BYTES)
        // Envoy's default too; up to 100, hyper parses a head without allocating.
        .max_headers(MAX_HEADERS)
        // A caller that closes its side mid-request must not cancel the request: once
        // the forward record is written, the upstream call and its result record must
        // finish. (Without this hyper reads mid-request to notice the close, and drops the
        // request when it does; that read also cost an 8 KiB buffer per request.)
        .half_close(true)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(256)
        .max_header_list_size(H2_MAX_HEADER_LIST_BYTES)
        .keep_alive_interval(Some(Duration::from_secs(30)));
    builder
}

async fn serve_data(
    listener: TcpListener,
    gateway: Gateway,
    mut stop: watch::Receiver<bool>,
    grace: Duration,
) {
    let builders = Arc::new(Builders::new());
    let drain = Drain::new();
    let connections = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let accepted = tokio::select! {
            accepted = accept_within(&listener, &connections, "data") => accepted,
            _ = stop.changed() => break,
        };
        let Some((permit, stream, peer)) = accepted else {
            break;
        };
        let _ = stream.set_nodelay(true);
        let connection = Connection {
            gateway: gateway.clone(),
            builders: Arc::clone(&builders),
            watcher: drain.watcher(),
            requests_watcher: drain.watcher(),
            peer,
        };
        // When `shutdown_grace` runs out, every connection still open is dropped, here
        // and now, as the process exit would drop it.
        let closing = drain.watcher();
        tokio::spawn(async move {
            let metrics = Arc::clone(connection.gateway.metrics());
            metrics.connection_opened();
            if !closing.until_closed(connection.serve(stream)).await {
                tracing::debug!(%peer, "connection closed at the end of shutdown_grace");
            }
            metrics.connection_closed();
            drop(permit);
        });
    }
    drop(listener);
    let drained = drain.finish();
    tokio::pin!(drained);
    tokio::select! {
        () = &mut drained => {}
        () = tokio::time::sleep(grace) => {
            tracing::warn!("shutdown_grace elapsed with requests still in flight; closing their connections");
            drain.close();
            // Each connection sees that at its next turn; what its requests write on the
            // way out must reach the log before it closes. Detached HTTP/2 requests may
            // still be with Plivo: not waited for, their results are the drain's.
            let _ = tokio::time::timeout(FORCED_CLOSE_WAIT, drained).await;
        }
    }
}

/// Waits for one of the `slots`, then for a connection on `listener`; the permit goes with
/// the connection. An accept error (EMFILE and friends) is logged and retried after a
/// short pause instead of spinning. `None` once the slots are closed.
pub(crate) async fn accept_within(
    listener: &TcpListener,
    slots: &Arc<Semaphore>,
    listener_name: &str,
) -> Option<(OwnedSemaphorePermit, TcpStream, SocketAddr)> {
    let permit = Arc::clone(slots).acquire_owned().await.ok()?;
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => return Some((permit, stream, peer)),
            Err(err) => {
                tracing::warn!(listener = listener_name, error = %err, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// How long the drain waits for connections to go once `shutdown_grace` has run out.
const FORCED_CLOSE_WAIT: Duration = Duration::from_millis(500);

/// One accepted data connection.
struct Connection {
    gateway: Gateway,
    builders: Arc<Builders>,
    /// Keeps the drain waiting for this connection.
    watcher: Watcher,
    /// Keeps the drain waiting for the connection's detached HTTP/2 requests.
    requests_watcher: Watcher,
    peer: SocketAddr,
}

impl Connection {
    /// Plain HTTP, or TLS first when `listen_tls` is set; the acceptor is read per
    /// connection so certificates re-read on SIGHUP apply to new connections only.
    async fn serve(self, stream: TcpStream) {
        let metrics = Arc::clone(self.gateway.metrics());
        // The version sniff or the TLS handshake, and the first request head, all within
        // the header timeout of the accept.
        let head_deadline = Instant::now() + HEADER_READ_TIMEOUT;
        let Some(tls) = self.gateway.data_tls() else {
            let version = match sniff_version(&stream, head_deadline).await {
                Ok(version) => version,
                Err(NoVersion::TimedOut) => return metrics.http_rejected("header-timeout"),
                // A TCP probe (load balancer, kubelet): nothing was refused.
                Err(NoVersion::Closed) => return,
            };
            let io = TokioIo::new(stream);
            let result = self
                .serve_http(io, version, None, head_deadline, None)
                .await;
            return record_result(&metrics, result);
        };
        let handshake = tokio::time::timeout_at(head_deadline, tls.acceptor.accept(stream));
        let stream = match handshake.await {
            Ok(Ok(stream)) => stream,
            Ok(Err(err)) => {
                tracing::debug!(peer = %self.peer, error = %err, "TLS handshake failed");
                metrics.http_rejected("tls-handshake");
                return;
            }
            Err(_) => {
                metrics.http_rejected("tls-handshake");
                return;
            }
        };
        let session = stream.get_ref().1;
        let version = match session.alpn_protocol() {
            Some(b"h2") => HttpVersion::Http2,
            _ => HttpVersion::Http1,
        };
        let certificate = ClientCertificate::from_peer(session.peer_certificates());
        let io = TokioIo::new(stream);
        let superseded = trust_replaced(tls.trust_changed);
        let result = self
            .serve_http(io, version, certificate, head_deadline, Some(superseded))
            .await;
        record_result(&metrics, result);
    }

    /// Serves requests until the connection ends; closes it at `head_deadline` if no
    /// request head has arrived by then, and gracefully once `superseded` completes.
    async fn serve_http<I>(
        self,
        io: I,
        version: HttpVersion,
        certificate: Option<ClientCertificate>,
        head_deadline: Instant,
        superseded: Option<Superseded>,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>>
    where
        I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    {
        let detach = match version {
            HttpVersion::Http1 => None,
            HttpVersion::Http2 => Some(H2Requests {
                watcher: Arc::new(self.requests_watcher),
                activity: Arc::new(H2Activity::new()),
            }),
        };
        let activity = detach.as_ref().map(|h2| Arc::clone(&h2.activity));
        let first_head = Arc::new(FirstHead::default());
        let service = data_service(
            &self.gateway,
            self.peer,
            certificate,
            detach,
            Arc::clone(&first_head),
        );
        let builder = self.builders.for_version(version);
        let connection = builder.serve_connection(io, service).into_owned();
        let mut served = std::pin::pin!(self.watcher.graceful(connection, superseded));
        tokio::select! {
            // hyper's own header timer, started a little later, can be due in the same
            // tick: the first head's deadline is this one, and decides how it is counted.
            biased;
            arrived = first_head.arrives_before(head_deadline) => {
                if !arrived {
                    // Dropping the connection closes it.
                    self.gateway.metrics().http_rejected("header-timeout");
                    return Ok(());
                }
            }
            result = &mut served => return result,
        }
        let Some(activity) = activity else {
            return served.await;
        };
        tokio::select! {
            result = &mut served => result,
            () = activity.idle_for(H2_IDLE_TIMEOUT) => {
                // No request in flight, and the last answer went out long ago: dropping
                // the connection loses nothing.
                tracing::debug!(peer = %self.peer, "closing an idle HTTP/2 connection");
                Ok(())
            }
        }
    }
}

/// Completes at the first reload after `trust_changed` was taken that changes which
/// client certificates are accepted.
fn trust_replaced(mut trust_changed: watch::Receiver<u64>) -> Superseded {
    Box::pin(async move {
        if trust_changed.changed().await.is_err() {
            // The gateway is gone; the drain closes the connection.
            std::future::pending::<()>().await;
        }
    })
}

/// What each HTTP/2 request's task holds: the drain waits for it, and the idle timer
/// counts it as activity.
#[derive(Clone)]
struct H2Requests {
    watcher: Arc<Watcher>,
    activity: Arc<H2Activity>,
}

fn record_result(metrics: &Metrics, result: Result<(), Box<dyn std::error::Error + Send + Sync>>) {
    if let Err(err) = result {
        record_connection_error(metrics, err.as_ref());
    }
}

/// The data listener's per-connection service, in request order.
///
/// With `detach` (HTTP/2), each request runs as its own task: a caller can cancel an
/// HTTP/2 stream, and hyper then drops the stream's service future, but a request must
/// finish (its upstream call and its audit record) whatever the caller does. The task
/// holds the watcher, so the drain waits for it as for a connection. HTTP/1.1 needs no
/// task: with `half_close`, hyper never drops a request mid-flight.
fn data_service(
    gateway: &Gateway,
    addr: SocketAddr,
    certificate: Option<ClientCertificate>,
    detach: Option<H2Requests>,
    first_head: Arc<FirstHead>,
) -> TowerToHyperService<
    impl tower::Service<
            Request<Incoming>,
            Response = http::Response<http_body_util::Full<bytes::Bytes>>,
            Error = Infallible,
            Future = impl Send,
        > + Clone,
> {
    let gateway = gateway.clone();
    let peer = Arc::new(Peer::new(addr, certificate));
    // The request id is read by the gateway itself (`Trail::new`) and put on every reply
    // it builds (`Gateway::respond`).
    let stack = ServiceBuilder::new()
        .layer(SetSensitiveRequestHeadersLayer::new([AUTHORIZATION]))
        .service_fn(move |request: Request<Incoming>| {
            first_head.arrive();
            let peer = Arc::clone(&peer);
            let gateway = gateway.clone();
            let detach = detach.clone();
            // Counted from here, before the task exists, so the idle timer never sees a
            // gap between the head's arrival and the request.
            let in_flight = detach.as_ref().map(|h2| h2.activity.begin());
            async move {
                let Some(H2Requests { watcher, .. }) = detach else {
                    return Ok::<_, Infallible>(gateway.handle(request, &peer).await);
                };
                // For the reply if the task is cancelled (the request goes with it).
                let caller_id = request.headers().get(&X_REQUEST_ID).cloned();
                let detached = tokio::spawn(async move {
                    let _drain_waits = watcher;
                    let _busy = in_flight;
                    gateway.handle(request, &peer).await
                });
                match detached.await {
                    Ok(response) => Ok(response),
                    // A panic: pass it on as if the request had run inline.
                    Err(err) if err.is_panic() => std::panic::resume_unwind(err.into_panic()),
                    // Cancelled: only by the runtime shutting down, when no one reads this.
                    Err(_) => Ok(shutting_down(caller_id.as_ref())),
                }
            }
        });
    TowerToHyperService::new(stack)
}

/// The reply to a request whose task the runtime cancelled while shutting down: the
/// caller's id when it sent a valid one, else a fresh one.
fn shutting_down(
    caller_id: Option<&http::HeaderValue>,
) -> http::Response<http_body_util::Full<bytes::Bytes>> {
    let (id, header) = RequestId::from_header(caller_id).into_parts();
    let mut response = Problem::ShuttingDown.to_response(&id, Flavor::Native);
    response.headers_mut().insert(X_REQUEST_ID.clone(), header);
    response
}

/// Counts what the HTTP layer refused before a request reached the gateway.
fn record_connection_error(metrics: &Metrics, err: &(dyn std::error::Error + 'static)) {
    let kind = match err.downcast_ref::<hyper::Error>() {
        Some(e) if e.is_parse_too_large() => "too-large",
        Some(e) if e.is_parse() => "malformed",
        // The first head is timed from the accept (above), before hyper's own header timer
        // can fire; so this is a kept-alive HTTP/1.1 connection whose next head did not
        // come in time (mostly an idle client), or an HTTP/2 client that stopped answering
        // pings: not a refusal.
        Some(e) if e.is_timeout() => "idle-timeout",
        Some(_) => "io",
        None => "other",
    };
    metrics.http_rejected(kind);
    tracing::debug!(kind, error = %err, "connection ended with an error");
}

/// `mpc-gateway serve`: runs until SIGTERM/SIGINT; SIGHUP reloads.
pub fn run_serve(config_path: PathBuf) -> anyhow::Result<()> {
    let config = Config::load(&config_path)?;
    crate::telemetry::init_tracing(&config.log);
    raise_malloc_trim_threshold();
    let runtime = gateway_runtime(config.worker_threads)?;
    let served = runtime.block_on(serve_until_signalled(config, config_path));
    // The audit log is flushed and synced by now. What may still run is a blocking
    // thread inside `getaddrinfo` (an upstream or Redis name lookup), which cannot be
    // cancelled: dropping the runtime would wait for the resolver's own timeouts, past
    // `shutdown_grace`, into the supervisor's SIGKILL.
    runtime.shutdown_timeout(EXIT_WAIT_FOR_BLOCKING);
    served
}

/// How long an exiting gateway waits for blocking threads still at work.
const EXIT_WAIT_FOR_BLOCKING: Duration = Duration::from_millis(250);

/// Stops glibc's malloc from shrinking and regrowing the heap on every upstream answer.
///
/// hyper frees each HTTP/1.1 answer's read buffer (8 KiB) when the answer is dropped,
/// often at the top of the heap; with glibc's initial trim threshold (128 KiB) that
/// returned the top to the kernel and the next read buffer took it back: 0.25 `brk`
/// calls and 0.22 page faults per request, about 5% of the gateway's CPU over an
/// HTTP/1.1 upstream (benches/RESULTS.md, session 4). glibc raises its thresholds by
/// itself once a block it served with `mmap` is freed (mallopt(3), `M_MMAP_THRESHOLD`):
/// to that block's size for `mmap`, twice it for trimming. Freeing one 256 KiB block
/// now sets them to 256 and 512 KiB, so at most 512 KiB freed at the top stay resident.
/// The block is never touched, so it costs no memory; other allocators ignore this.
fn raise_malloc_trim_threshold() {
    drop(std::hint::black_box(Vec::<u8>::with_capacity(256 << 10)));
}

/// How many tasks the gateway's current-thread runtime polls between two looks at its
/// sockets and timers (tokio's default is 61). Under load each look is an `epoll_wait`
/// that lets newly ready callers in between the requests of the turn under way; with
/// 256, more of the requests ready at once go through each stage together, so their
/// upstream frames and audit records share fewer writes. Interleaved benchmark rounds
/// (benches/RESULTS.md, session 11, the simulator unchanged): HTTP/2 upstream 16.5 → 16.0
/// µs of CPU per request and 47.1k → 49.6k requests/s; HTTP/1.1 upstream within the
/// noise; latency at 2,000/s unchanged, since a turn that runs out of ready tasks looks
/// at the sockets at once anyway. A turn of 256 polls takes about a millisecond at
/// saturation (more if it holds TLS handshakes), which is how late a timer or a signal
/// can then be noticed.
const GATEWAY_EVENT_INTERVAL: u32 = 256;

/// The gateway's runtime: [`build_runtime`]'s, with [`GATEWAY_EVENT_INTERVAL`] when it
/// is a current-thread runtime (the only layout it was measured on).
fn gateway_runtime(worker_threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = runtime_builder(worker_threads);
    if worker_threads == 1 {
        builder.event_interval(GATEWAY_EVENT_INTERVAL);
    }
    builder.build()
}

/// A runtime with `worker_threads` workers (0 = one per CPU), tokio's defaults otherwise
/// (the demo, and the benchmark's simulator). One worker is the calling thread itself (a
/// current-thread runtime): no work-stealing machinery, no extra thread, and tasks woken
/// in one turn run in order, so their upstream frames and audit records leave together.
pub fn build_runtime(worker_threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    runtime_builder(worker_threads).build()
}

fn runtime_builder(worker_threads: usize) -> tokio::runtime::Builder {
    let mut builder = if worker_threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    if worker_threads > 1 {
        builder.worker_threads(worker_threads);
    }
    // Blocking threads serve DNS lookups for new upstream connections. With an HTTP/2
    // upstream one connection carries every call, and even over HTTP/1.1 a burst of
    // lookups for the one Plivo host gains nothing from dozens of threads, each of which
    // would stay around (with its memory) for a while after the burst.
    builder.max_blocking_threads(4).enable_all();
    builder
}

async fn serve_until_signalled(config: Config, config_path: PathBuf) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    // Handlers first: a signal that arrives while the audit log is opened and the
    // listeners bound is then handled once serving (SIGHUP's default action would
    // otherwise kill the process mid-start).
    let mut hangup = signal(SignalKind::hangup())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let running = RunningGateway::start(&config, StartOptions::default()).await?;
    drop(config);
    loop {
        tokio::select! {
            _ = hangup.recv() => {
                let _ = running.reload_from(&config_path);
            }
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
        }
    }
    tracing::info!("draining");
    running.shutdown().await?;
    tracing::info!("stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::raw::LogFormat;

    /// A config whose HMAC key `key` is read from a file, with `fsync` as given.
    fn config(dir: &Path, key: &str, fsync: &str) -> Config {
        std::fs::write(dir.join("key"), key).expect("write");
        let key_file = dir.join("key");
        let audit = format!(
            "  fsync: {fsync}\n  hmac_key: {{file: \"{}\"}}\n",
            key_file.display()
        );
        crate::config::for_tests(dir, &audit)
    }

    /// The reply to a request cancelled by shutdown names the caller's id when it sent a
    /// valid one, else a fresh one; the header and the body agree.
    #[tokio::test]
    async fn a_request_cancelled_by_shutdown_is_answered_with_its_id() {
        use http_body_util::BodyExt as _;
        let caller = http::HeaderValue::from_static("caller-7");
        for (sent, expect_caller) in [(Some(&caller), true), (None, false)] {
            let reply = shutting_down(sent);
            assert_eq!(reply.status(), http::StatusCode::SERVICE_UNAVAILABLE);
            let header = reply.headers()[&X_REQUEST_ID]
                .to_str()
                .expect("ascii")
                .to_owned();
            let body = reply.into_body().collect().await.expect("body").to_bytes();
            let body: serde_json::Value = serde_json::from_slice(&body).expect("json");
            assert_eq!(body["request_id"], header.as_str());
            if expect_caller {
                assert_eq!(header, "caller-7");
            } else {
                assert!(uuid::Uuid::parse_str(&header).is_ok(), "{header}");
            }
        }
    }

    #[test]
    fn a_partial_preface_is_peeked_at_a_few_dozen_times_until_the_head_deadline() {
        let mut pause = SNIFF_FIRST_PAUSE;
        let mut waited = Duration::ZERO;
        let mut peeks = 1;
        while waited < HEADER_READ_TIMEOUT {
            waited += pause;
            pause = next_sniff_pause(pause);
            peeks += 1;
        }
        assert!(peeks <= 50, "{peeks} peeks");
        assert_eq!(pause, SNIFF_LONGEST_PAUSE);
    }

    #[tokio::test]
    async fn a_preface_split_by_a_pause_is_still_http2() {
        use tokio::io::AsyncWriteExt;
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let mut client = TcpStream::connect(listener.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        client.write_all(&H2_PREFACE[..1]).await.expect("write");
        let rest = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            client.write_all(&H2_PREFACE[1..]).await.expect("write");
            client
        });
        let deadline = Instant::now() + Duration::from_secs(5);
        let version = sniff_version(&server, deadline).await;
        assert!(matches!(version, Ok(HttpVersion::Http2)));
        drop(rest.await.expect("writer"));
    }

    #[test]
    fn a_reload_names_each_restart_only_setting_it_cannot_apply() {
        let dir = tempfile::tempdir().expect("tempdir");
        let running = RestartOnlySettings::of(&config(dir.path(), "key-1", "always"));
        let same = RestartOnlySettings::of(&config(dir.path(), "key-1", "always"));
        assert!(same.changed_from(&running).is_empty());
        // A key changed inside its file is noticed, not only a key added or removed.
        let new_key = RestartOnlySettings::of(&config(dir.path(), "key-2", "always"));
        assert_eq!(new_key.changed_from(&running), ["audit.hmac_key"]);
        let both = RestartOnlySettings::of(&config(dir.path(), "key-2", "never"));
        assert_eq!(
            both.changed_from(&running),
            ["audit.fsync", "audit.hmac_key"]
        );
        let mut drain_and_logs = config(dir.path(), "key-1", "always");
        drain_and_logs.shutdown_grace += Duration::from_secs(1);
        drain_and_logs.log.level = "debug".to_owned();
        drain_and_logs.log.format = match drain_and_logs.log.format {
            LogFormat::Json => LogFormat::Pretty,
            LogFormat::Pretty => LogFormat::Json,
        };
        assert_eq!(
            RestartOnlySettings::of(&drain_and_logs).changed_from(&running),
            ["shutdown_grace", "log.format", "log.level"]
        );
    }
}
