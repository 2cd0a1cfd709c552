//! The gateway as a running service, and this module's public face: [`RunningGateway`]
//! opens the audit log, binds the data and admin listeners and serves them, reloads the
//! config (refusing what needs a restart), and shuts down with a drain; the limits every
//! data connection is held to. The parts live in submodules:
//!
//! - `connection`: the data listener's accept loop and drain, and serving one connection
//!   (TLS or version sniff, hyper, the gateway as the service, timeouts);
//! - `sniff`: telling HTTP/1.1 from h2c on a plain connection;
//! - `idle`: the first head's deadline and HTTP/2's idle timeout;
//! - `drain`: graceful shutdown of the data connections;
//! - `head`: answers to `HEAD` without content (HTTP/2 included);
//! - `accept`: accepting under a connection cap (the admin listener's too);
//! - `rejection`: what the HTTP layer ended itself, as counted in the metrics;
//! - `process`: the `serve` command's runtime and signals.

pub(crate) mod accept;
mod connection;
mod drain;
mod head;
mod idle;
mod linger;
mod notify;
mod process;
mod rejection;
mod sniff;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use secrecy::ExposeSecret;
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::admin;
use crate::audit::{AuditError, AuditLog, AuditPath, Fsync};
use crate::config::{Config, ConfigError, LogSettings};
use crate::gateway::{
    BuildError, Gateway, MAX_HEADER_BLOCK_BYTES, MAX_HEADER_FIELDS, MAX_REQUEST_LINE_BYTES,
};
use crate::rate_limit::LimiterClock;
use crate::telemetry::Metrics;
use connection::serve_data;

pub use process::{build_runtime, run_serve};
pub use rejection::Rejection;

/// A client must send its whole request head within this time (slowloris).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// An HTTP/2 connection with no request in flight for this long is closed. hyper's HTTP/2
/// server has no idle timeout, and a client that answers its pings would hold a
/// connection slot for ever; over HTTP/1.1 the header timeout does this job, as hyper
/// restarts it while waiting for the next request head.
pub const H2_IDLE_TIMEOUT: Duration = HEADER_READ_TIMEOUT;
/// Connections beyond this wait in the kernel's accept queue instead of costing memory.
pub const MAX_CONNECTIONS: usize = 4096;
/// Requests in progress at once on one HTTP/2 connection (SETTINGS_MAX_CONCURRENT_STREAMS,
/// nginx's default): an eighth of [`MAX_H2_STREAMS_IN_PROGRESS`], so one connection
/// cannot take the process's whole share.
pub const H2_MAX_CONCURRENT_STREAMS: u32 = 128;
/// HTTP/2 streams in progress at once on all connections together. Each costs about
/// 12 KiB until answered, and one whose body never comes is held for the body timeout
/// before anyone is authenticated: without this cap every connection slot could hold
/// `H2_MAX_CONCURRENT_STREAMS` of them (gigabytes). A stream beyond it is refused at
/// once (`REFUSED_STREAM`: not processed, safe to retry) and counted as
/// `streams-exhausted`. The trade-off: callers that hold this many streams (eight
/// connections' worth of stalled bodies, or a long Plivo outage under heavy HTTP/2
/// traffic) get other HTTP/2 callers' new streams refused until theirs end, where
/// without it they would exhaust memory. An HTTP/1.1 connection has one request at a
/// time and is bounded by [`MAX_CONNECTIONS`] instead, so HTTP/1.1 callers are not
/// affected.
pub const MAX_H2_STREAMS_IN_PROGRESS: usize = 1024;
/// Hyper's read buffer: room for a request line up to hyper's own URI limit (64 KiB, above
/// which hyper answers 414 itself) plus the largest header block the contract allows, so
/// the gateway decides between 414 and 431 for every head below this size. Only a head
/// larger than this gets hyper's 431. Hyper grows the buffer only as bytes arrive.
const MAX_HEAD_BYTES: usize = 64 * 1024 + MAX_HEADER_BLOCK_BYTES + 1024;
/// HTTP/2's SETTINGS_MAX_HEADER_LIST_SIZE, which counts 32 bytes per field besides its
/// name and value: the contract's largest request line and header block with a quarter
/// to spare, so the gateway, not the h2 library (whose default is 16 KiB), answers `414`
/// and `431` for heads somewhat over them; larger heads get h2's own refusal, as HTTP/1.1
/// heads over `MAX_HEAD_BYTES` get hyper's. Not more: an HTTP/2 connection may hold up
/// to `max_concurrent_streams` heads at once, each until its body arrives.
const H2_MAX_HEADER_LIST_BYTES: u32 = {
    let bytes =
        (MAX_REQUEST_LINE_BYTES + MAX_HEADER_BLOCK_BYTES) * 5 / 4 + (MAX_HEADER_FIELDS + 4) * 32;
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

    /// How long a drain lets in-flight requests run (`shutdown_grace` at start-up).
    pub fn shutdown_grace(&self) -> Duration {
        self.shutdown_grace
    }

    /// Re-reads the config file and its secrets; on any error the running config stays.
    pub fn reload_from(&self, path: &Path) -> Result<(), ReloadError> {
        self.apply_reload(Config::load(path))
    }

    /// Applies a config read for a reload ([`Config::load`], which `serve` runs on a
    /// blocking thread: files on a hung mount must not stop the runtime), or reports why
    /// it could not be read; on any error the running config stays.
    pub fn apply_reload(&self, loaded: Result<Config, ConfigError>) -> Result<(), ReloadError> {
        let result = loaded
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
        self.gateway
            .metrics()
            .config_restart_pending(!changed.is_empty());
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

/// Valid but risky settings of a config just put to use (see [`Config::warnings`]).
fn log_warnings(warnings: Vec<crate::config::ConfigWarning>) {
    for warning in warnings {
        tracing::warn!(key = %warning.key, "{}", warning.message);
    }
}

/// How long the drain waits for connections to go once `shutdown_grace` has run out.
const FORCED_CLOSE_WAIT: Duration = Duration::from_millis(500);

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
