//! Configuration: one YAML file, parsed into [`raw`] types (unknown keys rejected, every
//! error with its key path), then validated and resolved (secrets read) into [`Config`]
//! in one place. `check-config`, start-up and SIGHUP all go through [`Config::load`].

mod base_url;
pub mod raw;
pub mod secret;

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rustls::pki_types::CertificateDer;
use secrecy::{ExposeSecret, SecretSlice, SecretString};

use crate::audit::{AuditPath, AuditSettings, Fsync};
use crate::auth::{NamePattern, TokenHash};
use crate::files::{read_text_limited, CONFIG_LIMIT};
use crate::rate_limit::RateLimit;
use crate::tls::{load_listen_tls, read_certs, CertSan, ListenTls};
pub use base_url::{BaseUrl, InvalidBaseUrl};
pub use raw::OnStoreError;
use raw::{LogFormat, RawAccount, RawConfig, RawRateLimit, RawTenant, RawUpstream, StoreKind};
use secret::ValueSource;

/// Smallest `audit.rotate_bytes` accepted: below this, rotation would churn on every record.
const MIN_ROTATE_BYTES: u64 = 1024;
const MAX_MPC_PATTERN_CHARS: usize = 128;

/// A validated configuration with every secret resolved.
pub struct Config {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub shutdown_grace: Duration,
    pub worker_threads: usize,
    /// When set, `listen` speaks TLS only.
    pub listen_tls: Option<ListenTls>,
    pub rate_limit_store: RateLimitStoreSettings,
    pub accounts: BTreeMap<String, Account>,
    pub upstream: UpstreamSettings,
    pub tenants: BTreeMap<String, Tenant>,
    pub audit: AuditSettings,
    pub log: LogSettings,
    /// Secrets kept where others may read them (a file every user of the host may read,
    /// a password written into the config itself), by key path: warned about with
    /// [`Config::warnings`]. Found while the raw file, which says how each value was
    /// given, is at hand.
    pub(crate) exposed_secrets: Vec<ConfigWarning>,
}

/// A Plivo account or subaccount and the credentials only the gateway holds.
pub struct Account {
    pub auth_id: String,
    pub auth_token: SecretString,
    pub rate_limit: RateLimit,
}

/// Compared on reload: the upstream client and its connections are kept when equal.
#[derive(Clone, PartialEq, Eq)]
pub struct UpstreamSettings {
    pub base_url: BaseUrl,
    pub ca_file: Option<PathBuf>,
    /// Extra trust anchors read from `ca_file`, added to the webpki roots.
    pub extra_roots: Vec<CertificateDer<'static>>,
    pub connect_timeout: Duration,
    pub timeout: Duration,
    pub max_attempts: u32,
}

pub struct Tenant {
    pub tokens: Vec<TokenHash>,
    /// URI or DNS SANs of client certificates that authenticate this tenant (DNS names
    /// lower-cased, as certificates' are before they are looked up).
    pub client_cert_sans: Vec<CertSan>,
    /// The virtual auth id the official SDKs present as Basic username on the
    /// Plivo-compatible route.
    pub sdk_auth_id: Option<String>,
    pub allow: Vec<NamePattern>,
    pub rate_limit: RateLimit,
    pub account: String,
}

/// Where limiter state lives: this process, or Redis shared by every replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RateLimitStoreSettings {
    Local,
    Redis(RedisStoreSettings),
}

#[derive(Clone, PartialEq, Eq)]
pub struct RedisStoreSettings {
    /// `redis://host:port/db` (or `rediss://`); may carry a password, so never logged.
    pub url: String,
    pub key_prefix: String,
    pub timeout: Duration,
    pub on_error: OnStoreError,
}

impl std::fmt::Debug for RedisStoreSettings {
    // The URL may carry a password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStoreSettings")
            .field("url", &"<redacted>")
            .field("key_prefix", &self.key_prefix)
            .field("timeout", &self.timeout)
            .field("on_error", &self.on_error)
            .finish()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogSettings {
    pub format: LogFormat,
    pub level: String,
}

/// Everything that can be wrong with a config file, each with its key path.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Parse(String),
    #[error("{}", join_lines(.0))]
    Invalid(Vec<FieldError>),
}

/// One invalid value: `tenants.billing.rate_limit.burst: expected a positive integer`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub path: String,
    pub message: String,
}

impl std::fmt::Display for FieldError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

fn join_lines(errors: &[FieldError]) -> String {
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

/// The Plivo calls a by-uuid request makes (a lookup, then the end), and so the cells it
/// takes from its account's limit, at once.
pub(crate) const BY_UUID_CALLS: NonZeroU32 = NonZeroU32::MIN.saturating_add(1);

/// A valid setting that is probably a mistake (see [`Config::warnings`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigWarning {
    /// The key path, as errors name it (`shutdown_grace`, `accounts.x.rate_limit.burst`).
    pub key: String,
    pub message: String,
}

impl std::fmt::Display for ConfigWarning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

impl Config {
    /// Reads, parses, validates and resolves the file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = read_text_limited(path, CONFIG_LIMIT).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Config::from_yaml(&text)
    }

    pub fn from_yaml(text: &str) -> Result<Config, ConfigError> {
        Config::try_from(parse_raw(text)?)
    }

    /// Settings that are valid but almost certainly not what the operator meant: said by
    /// `check-config`, and logged by `serve` at start.
    pub fn warnings(&self) -> Vec<ConfigWarning> {
        self.warnings_with_grace(self.shutdown_grace)
    }

    /// [`warnings`](Self::warnings) for a reload: `shutdown_grace` takes effect only at
    /// a restart, so the file's `upstream.timeout` is held to the running grace.
    pub fn warnings_with_grace(&self, shutdown_grace: Duration) -> Vec<ConfigWarning> {
        let mut warnings = Vec::new();
        for (name, account) in &self.accounts {
            let burst = account.rate_limit.burst;
            if burst < BY_UUID_CALLS {
                warnings.push(ConfigWarning {
                    key: format!("accounts.{name}.rate_limit.burst"),
                    message: format!(
                        "{burst} is below the two calls a by-uuid request costs: such requests are always refused (429); raise it to 2 or more"
                    ),
                });
            }
        }
        for (name, tenant) in &self.tenants {
            for (index, _) in tenant
                .tokens
                .iter()
                .enumerate()
                .filter(|(_, hash)| hash.is_placeholder())
            {
                warnings.push(ConfigWarning {
                    key: format!("tenants.{name}.tokens[{index}]"),
                    message: "the all-zero placeholder, which no token hashes to: mint a token with `mpc-gateway token new` and list the sha256: line it prints".into(),
                });
            }
        }
        warnings.extend(self.exposed_secrets.iter().cloned());
        warnings.extend(self.sdk_auth_ids_like_plivos());
        if self.upstream.connect_timeout > self.upstream.timeout {
            warnings.push(ConfigWarning {
                key: "upstream.connect_timeout".into(),
                message: format!(
                    "{} is longer than upstream.timeout ({}), which bounds the whole call: a connect is cut off at upstream.timeout",
                    humantime::format_duration(self.upstream.connect_timeout),
                    humantime::format_duration(self.upstream.timeout)
                ),
            });
        }
        if shutdown_grace <= self.upstream.timeout {
            warnings.push(ConfigWarning {
                key: "shutdown_grace".into(),
                message: format!(
                    "{} is not above upstream.timeout ({}): a drain can cut requests while Plivo is handling them, and whether their MPC ended is then unknown; make it longer than upstream.timeout",
                    humantime::format_duration(shutdown_grace),
                    humantime::format_duration(self.upstream.timeout)
                ),
            });
        }
        warnings
    }

    /// A tenant's `sdk_auth_id` that is also a real account's `auth_id`: the SDK
    /// configs of the services would then look like they hold Plivo's own id, and logs
    /// could not tell the two apart. (Not a leak: an auth id is not a secret.)
    fn sdk_auth_ids_like_plivos(&self) -> impl Iterator<Item = ConfigWarning> + '_ {
        self.tenants.iter().filter_map(|(name, tenant)| {
            let id = tenant.sdk_auth_id.as_deref()?;
            let (account, _) = self
                .accounts
                .iter()
                .find(|(_, account)| account.auth_id == id)?;
            Some(ConfigWarning {
                key: format!("tenants.{name}.sdk_auth_id"),
                message: format!(
                    "is also the auth_id of accounts.{account}, a real Plivo account: pick a made-up one (MA or SA and 18 upper-case letters or digits, as the SDKs require), so that SDK configs and logs tell the tenant's id from Plivo's"
                ),
            })
        })
    }

    /// A human summary for `check-config`: shapes and counts, never a secret or hash.
    pub fn summary(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "listen: {}{}",
            self.listen,
            match &self.listen_tls {
                None => String::new(),
                Some(tls) if tls.client_ca_file.is_some() => format!(
                    " (TLS, client certificates {})",
                    if tls.require_client_cert {
                        "required"
                    } else {
                        "optional"
                    }
                ),
                Some(_) => " (TLS)".to_owned(),
            }
        );
        let _ = writeln!(out, "admin_listen: {}", self.admin_listen);
        let _ = writeln!(out, "upstream: {}", self.upstream.base_url);
        let _ = writeln!(
            out,
            "rate limits: {}",
            match &self.rate_limit_store {
                RateLimitStoreSettings::Local => "this process's own (rate_limit_store: local)",
                RateLimitStoreSettings::Redis(_) => "shared by every replica in Redis",
            }
        );
        for (name, account) in &self.accounts {
            let _ = writeln!(
                out,
                "account {name}: rate limit {}/s burst {}",
                account.rate_limit.per_second, account.rate_limit.burst
            );
        }
        for (name, tenant) in &self.tenants {
            let allow: Vec<&str> = tenant.allow.iter().map(NamePattern::as_str).collect();
            let _ = writeln!(
                out,
                "tenant {name}: {} token(s), {} client-certificate SAN(s), account {}, allow {:?}, rate limit {}/s burst {}",
                tenant.tokens.len(),
                tenant.client_cert_sans.len(),
                tenant.account,
                allow,
                tenant.rate_limit.per_second,
                tenant.rate_limit.burst
            );
        }
        let _ = writeln!(
            out,
            "audit: {} (fsync {}, rotate at {} bytes, {})",
            self.audit.path.display(),
            self.audit.fsync,
            self.audit.rotate_bytes,
            if self.audit.hmac_key.is_some() {
                "HMAC-keyed chain"
            } else {
                "SHA-256 chain"
            }
        );
        out
    }
}

/// Parses YAML into the raw types, naming the key path of the first error.
pub fn parse_raw(text: &str) -> Result<RawConfig, ConfigError> {
    let deserializer = serde_yaml::Deserializer::from_str(text);
    serde_path_to_error::deserialize(deserializer).map_err(|err| {
        let path = err.path().to_string();
        let message = err.into_inner().to_string();
        if path.is_empty() || path == "." {
            return ConfigError::Parse(with_top_level_duplicate_lines(message, text));
        }
        let message = strip_yaml_path(&message, &path);
        ConfigError::Parse(format!("{path}: {message}{}", hint_for(message)))
    })
}

/// serde's "duplicate field `x`" names no line when `x` is a top-level key (the parser
/// has left the mapping by then): the lines are found in the text, where a top-level
/// key starts a line.
fn with_top_level_duplicate_lines(message: String, text: &str) -> String {
    let Some(key) = message
        .strip_prefix("duplicate field `")
        .and_then(|rest| rest.strip_suffix('`'))
    else {
        return message;
    };
    let lines: Vec<usize> = text
        .lines()
        .enumerate()
        .filter(|(_, line)| {
            [
                format!("{key}:"),
                format!("\"{key}\":"),
                format!("'{key}':"),
            ]
            .iter()
            .any(|start| line.starts_with(start.as_str()))
        })
        .map(|(index, _)| index + 1)
        .collect();
    match lines.as_slice() {
        [first, second, ..] => {
            format!("{message} at line {second} (given first at line {first}; each key may appear once)")
        }
        _ => message,
    }
}

/// What to add to a parser's message that does not say what it wanted.
fn hint_for(message: &str) -> &'static str {
    if message.starts_with("invalid socket address syntax") {
        " (expected IP:port, such as 127.0.0.1:8080 or [::1]:8080; host names are not resolved)"
    } else {
        ""
    }
}

/// The most worker threads `worker_threads` may ask for. A sidecar is given one or two;
/// thousands would fail to start (tokio aborts when the OS refuses a thread) and are a
/// typo, not a plan.
const MAX_WORKER_THREADS: usize = 256;

/// Whether the two listeners would fight over one port: `serve` would then fail to bind
/// the second, so `check-config` says so first. A wildcard address takes the port on
/// every address (an IPv6 one, by default, on IPv4 too); port 0 is a fresh port each.
fn listeners_collide(listen: SocketAddr, admin: SocketAddr) -> bool {
    listen.port() != 0
        && listen.port() == admin.port()
        // `[::ffff:127.0.0.1]` is 127.0.0.1 to the kernel.
        && (listen.ip().to_canonical() == admin.ip().to_canonical()
            || listen.ip().is_unspecified()
            || admin.ip().is_unspecified())
}

/// serde_yaml prefixes its own (sometimes shorter) key path; keep only the message so
/// the exact path from serde_path_to_error leads.
fn strip_yaml_path<'a>(message: &'a str, path: &str) -> &'a str {
    match message.split_once(": ") {
        Some((prefix, rest)) if !prefix.contains(' ') && path.starts_with(prefix) => rest,
        _ => message,
    }
}

impl TryFrom<RawConfig> for Config {
    type Error = ConfigError;

    fn try_from(raw: RawConfig) -> Result<Config, ConfigError> {
        let mut errors = Errors::default();
        let accounts = validate_accounts(&raw.accounts, &mut errors);
        let upstream = validate_upstream(&raw.upstream, &mut errors);
        let tenants = validate_tenants(&raw.tenants, &raw.accounts, &mut errors);
        let audit = validate_audit(&raw.audit, &mut errors);
        let log = validate_log(&raw.log, &mut errors);
        let listen_tls = validate_listen_tls(raw.listen_tls.as_ref(), &mut errors);
        check_certificates_can_be_verified(&raw, &mut errors);
        let rate_limit_store = validate_store(&raw.rate_limit_store, &mut errors);
        if raw.shutdown_grace.0 > MAX_SHUTDOWN_GRACE {
            errors.push("shutdown_grace", "expected at most 1h");
        }
        if raw.worker_threads > MAX_WORKER_THREADS {
            errors.push(
                "worker_threads",
                format!("expected at most {MAX_WORKER_THREADS} (0 is one per CPU)"),
            );
        }
        if listeners_collide(raw.listen, raw.admin_listen) {
            errors.push(
                "admin_listen",
                format!(
                    "{} cannot be bound beside listen ({}): give the admin endpoints their own port",
                    raw.admin_listen, raw.listen
                ),
            );
        }
        match (upstream, audit, log, listen_tls, rate_limit_store) {
            (Some(upstream), Some(audit), Some(log), Some(listen_tls), Some(rate_limit_store))
                if errors.0.is_empty() =>
            {
                Ok(Config {
                    listen: raw.listen,
                    admin_listen: raw.admin_listen,
                    shutdown_grace: raw.shutdown_grace.0,
                    worker_threads: raw.worker_threads,
                    listen_tls,
                    rate_limit_store,
                    accounts,
                    upstream,
                    tenants,
                    audit,
                    log,
                    exposed_secrets: exposed_secrets(&raw),
                })
            }
            _ => Err(ConfigError::Invalid(errors.0)),
        }
    }
}

/// Whether `url` starts with `scheme://` (scheme names are case-insensitive).
fn has_scheme(url: &str, scheme: &str) -> bool {
    url.split_once("://")
        .is_some_and(|(found, _)| found.eq_ignore_ascii_case(scheme))
}

fn validate_store(
    raw: &raw::RawRateLimitStore,
    errors: &mut Errors,
) -> Option<RateLimitStoreSettings> {
    match raw.kind {
        // A url with `kind: local` most likely means `kind: redis` was forgotten: each
        // replica would then apply the limits alone.
        StoreKind::Local if raw.url.is_some() => {
            errors.push(
                "rate_limit_store.url",
                "only used with kind: redis; set kind: redis to share the limits between replicas, or remove the url",
            );
            None
        }
        StoreKind::Local => Some(RateLimitStoreSettings::Local),
        StoreKind::Redis => {
            let url = match raw.url.as_ref().map(ValueSource::resolve_plain) {
                Some(Ok(url)) => url,
                Some(Err(err)) => {
                    errors.push("rate_limit_store.url", err);
                    return None;
                }
                None => {
                    errors.push("rate_limit_store.url", "required when kind is redis");
                    return None;
                }
            };
            if has_scheme(&url, "rediss") {
                errors.push(
                    "rate_limit_store.url",
                    "rediss:// (TLS to Redis) is not supported by this build: use redis:// to a Redis on loopback or a private network",
                );
                return None;
            }
            if let Err(err) = redis::Client::open(url.as_str()) {
                // The URL may hold a password: report the problem, not the value.
                errors.push(
                    "rate_limit_store.url",
                    format!("not a valid Redis URL ({})", err.category()),
                );
                return None;
            }
            check_timeout("rate_limit_store.timeout", raw.timeout.0, errors);
            if raw.key_prefix.is_empty() {
                errors.push("rate_limit_store.key_prefix", "must not be empty");
            }
            Some(RateLimitStoreSettings::Redis(RedisStoreSettings {
                url,
                key_prefix: raw.key_prefix.clone(),
                timeout: raw.timeout.0,
                on_error: raw.on_error,
            }))
        }
    }
}

/// `Some(None)` when TLS is off, `None` when its settings are invalid.
fn validate_listen_tls(
    raw: Option<&raw::RawListenTls>,
    errors: &mut Errors,
) -> Option<Option<ListenTls>> {
    let Some(raw) = raw else {
        return Some(None);
    };
    load_listen_tls(
        &raw.cert_file,
        &raw.key_file,
        raw.client_ca_file.as_deref(),
        raw.require_client_cert,
    )
    .map(Some)
    .map_err(|err| errors.push(format!("listen_tls.{}", err.key), err.message))
    .ok()
}

#[derive(Default)]
struct Errors(Vec<FieldError>);

impl Errors {
    fn push(&mut self, path: impl Into<String>, message: impl std::fmt::Display) {
        self.0.push(FieldError {
            path: path.into(),
            message: message.to_string(),
        });
    }
}

/// Every secret kept where others may read it, as a warning: see [`exposed_secret_files`]
/// and [`literal_redis_password`].
fn exposed_secrets(raw: &RawConfig) -> Vec<ConfigWarning> {
    let mut warnings = exposed_secret_files(raw);
    warnings.extend(literal_redis_password(&raw.rate_limit_store));
    warnings
}

/// A Redis URL written into the config with its password in it. Allowed (a Redis on
/// loopback often has a throwaway password), but the config is then a secret too:
/// auth tokens and the audit key written so are refused outright.
fn literal_redis_password(store: &raw::RawRateLimitStore) -> Option<ConfigWarning> {
    let Some(ValueSource::Literal(url)) = &store.url else {
        return None;
    };
    let client = redis::Client::open(url.as_str()).ok()?;
    client
        .get_connection_info()
        .redis_settings()
        .password()
        .map(|_| ConfigWarning {
            key: "rate_limit_store.url".into(),
            message: "holds a password written into the config file (not shown): give the URL as {env: NAME} or {file: PATH} so the config itself is not a secret".into(),
        })
}

/// Every secret read from a file that every user of the host may read, as a warning:
/// Plivo auth tokens, the audit key, a Redis URL given by file, the TLS private key.
fn exposed_secret_files(raw: &RawConfig) -> Vec<ConfigWarning> {
    let accounts = raw.accounts.iter().filter_map(|(name, account)| {
        let file = account.auth_token.file()?;
        Some((format!("accounts.{name}.auth_token"), file))
    });
    let others = [
        (
            "audit.hmac_key",
            raw.audit.hmac_key.as_ref().and_then(ValueSource::file),
        ),
        (
            "rate_limit_store.url",
            raw.rate_limit_store
                .url
                .as_ref()
                .and_then(ValueSource::file),
        ),
        (
            "listen_tls.key_file",
            raw.listen_tls.as_ref().map(|tls| tls.key_file.as_path()),
        ),
    ]
    .into_iter()
    .filter_map(|(key, file)| Some((key.to_owned(), file?)));
    accounts
        .chain(others)
        .filter_map(|(key, file)| {
            secret::world_readable_warning(file).map(|message| ConfigWarning { key, message })
        })
        .collect()
}

fn rate_limit(raw: RawRateLimit) -> RateLimit {
    // PositiveInt already guarantees >= 1; the fallback can never be taken.
    RateLimit::new(raw.per_second.0, raw.burst.0).unwrap_or(RateLimit {
        per_second: NonZeroU32::MIN,
        burst: NonZeroU32::MIN,
    })
}

fn validate_accounts(
    raw: &BTreeMap<String, RawAccount>,
    errors: &mut Errors,
) -> BTreeMap<String, Account> {
    if raw.is_empty() {
        errors.push("accounts", "at least one account is required");
    }
    let mut accounts = BTreeMap::new();
    for (name, account) in raw {
        let path = format!("accounts.{name}");
        if !is_valid_name(name) {
            errors.push(
                &path,
                "account names are 1-64 characters of letters, digits, '-', '_' and '.'",
            );
        }
        let auth_id = match account.auth_id.resolve_plain() {
            Ok(id) if is_valid_auth_id(&id) => Some(id),
            Ok(_) => {
                errors.push(
                    format!("{path}.auth_id"),
                    "expected 1-64 ASCII letters and digits",
                );
                None
            }
            Err(err) => {
                errors.push(format!("{path}.auth_id"), err);
                None
            }
        };
        let auth_token = account
            .auth_token
            .resolve_secret()
            .map_err(|err| errors.push(format!("{path}.auth_token"), err))
            .ok();
        if let (Some(auth_id), Some(auth_token)) = (auth_id, auth_token) {
            accounts.insert(
                name.clone(),
                Account {
                    auth_id,
                    auth_token,
                    rate_limit: rate_limit(account.rate_limit),
                },
            );
        }
    }
    accounts
}

/// Auth ids go into the upstream URL path, so they must be plain alphanumerics.
fn is_valid_auth_id(id: &str) -> bool {
    (1..=64).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_alphanumeric())
}

/// Far above any sane Plivo or Redis call, and far below what a deadline computed from it
/// could overflow.
const MAX_TIMEOUT: Duration = Duration::from_secs(600);

fn check_timeout(key: &str, value: Duration, errors: &mut Errors) {
    if value.is_zero() {
        errors.push(key, "must be greater than zero");
    } else if value > MAX_TIMEOUT {
        errors.push(key, "expected at most 10m");
    }
}

/// Far above any supervisor's kill timeout, and far below what the drain's deadline,
/// computed from it, could overflow.
const MAX_SHUTDOWN_GRACE: Duration = Duration::from_secs(3600);

fn validate_upstream(raw: &RawUpstream, errors: &mut Errors) -> Option<UpstreamSettings> {
    let base_url = BaseUrl::try_from(raw.base_url.as_str())
        .map_err(|err| errors.push("upstream.base_url", err))
        .ok();
    let extra_roots = match &raw.ca_file {
        None => Some(Vec::new()),
        Some(path) => read_certs(path)
            .map_err(|msg| errors.push("upstream.ca_file", msg))
            .ok(),
    };
    check_timeout("upstream.connect_timeout", raw.connect_timeout.0, errors);
    check_timeout("upstream.timeout", raw.timeout.0, errors);
    if raw.max_attempts.0 > 10 {
        errors.push("upstream.max_attempts", "expected at most 10 attempts");
    }
    Some(UpstreamSettings {
        base_url: base_url?,
        ca_file: raw.ca_file.clone(),
        extra_roots: extra_roots?,
        connect_timeout: raw.connect_timeout.0,
        timeout: raw.timeout.0,
        max_attempts: raw.max_attempts.0,
    })
}

fn validate_tenants(
    raw: &BTreeMap<String, RawTenant>,
    accounts: &BTreeMap<String, RawAccount>,
    errors: &mut Errors,
) -> BTreeMap<String, Tenant> {
    if raw.is_empty() {
        errors.push("tenants", "at least one tenant is required");
    }
    let mut owner_of: HashMap<TokenHash, &str> = HashMap::new();
    let mut san_owner: HashMap<CertSan, &str> = HashMap::new();
    let mut sdk_owner: HashMap<&str, &str> = HashMap::new();
    let mut tenants = BTreeMap::new();
    for (name, tenant) in raw {
        let path = format!("tenants.{name}");
        if !is_valid_name(name) {
            errors.push(
                &path,
                "tenant names are 1-64 characters of letters, digits, '-', '_' and '.'",
            );
        }
        if tenant.tokens.is_empty() && tenant.client_cert_sans.is_empty() {
            errors.push(
                format!("{path}.tokens"),
                "at least one token hash (or client_cert_sans) is required",
            );
        }
        let tokens = validate_tokens(&path, name, &tenant.tokens, &mut owner_of, errors);
        let allow = validate_allow(&path, &tenant.allow, errors);
        if let Some(id) = &tenant.sdk_auth_id {
            let key = format!("{path}.sdk_auth_id");
            if !is_valid_sdk_auth_id(id) {
                errors.push(
                    key,
                    "expected 20 characters: MA or SA followed by 18 upper-case letters or digits (as the SDKs require)",
                );
            } else if let Some(other) = sdk_owner.insert(id, name) {
                errors.push(
                    key,
                    format!("the same sdk_auth_id is also used by tenant {other}"),
                );
            }
        }
        let client_cert_sans = validate_client_cert_sans(
            &path,
            name,
            &tenant.client_cert_sans,
            &mut san_owner,
            errors,
        );
        if !accounts.contains_key(&tenant.account) {
            errors.push(
                format!("{path}.account"),
                format!("no account named {:?} in accounts", tenant.account),
            );
        }
        tenants.insert(
            name.clone(),
            Tenant {
                tokens,
                client_cert_sans,
                sdk_auth_id: tenant.sdk_auth_id.clone(),
                allow,
                rate_limit: rate_limit(tenant.rate_limit),
                account: tenant.account.clone(),
            },
        );
    }
    tenants
}

/// A tenant's `client_cert_sans`, DNS names lower-cased. A SAN listed twice is refused
/// as it will be matched: `ops.internal` and `OPS.INTERNAL` are the same SAN.
fn validate_client_cert_sans<'a>(
    path: &str,
    tenant: &'a str,
    entries: &[String],
    san_owner: &mut HashMap<CertSan, &'a str>,
    errors: &mut Errors,
) -> Vec<CertSan> {
    let mut sans = Vec::with_capacity(entries.len());
    for (index, entry) in entries.iter().enumerate() {
        let key = format!("{path}.client_cert_sans[{index}]");
        if entry.is_empty() {
            errors.push(key, "must not be empty");
            continue;
        }
        if entry.parse::<std::net::IpAddr>().is_ok() {
            // It would be accepted and never match: only URI and DNS SANs are read.
            errors.push(key, "an IP address; only URI and DNS SANs are matched");
            continue;
        }
        let san = CertSan::from_config(entry);
        if let Some(other) = san_owner.insert(san.clone(), tenant) {
            errors.push(
                key,
                format!("the same SAN is also listed for tenant {other}"),
            );
        }
        sans.push(san);
    }
    sans
}

/// `client_cert_sans` only means something when client certificates are verified: without
/// `listen_tls.client_ca_file` such a tenant could never be authenticated by one, which
/// is a config mistake to report, not a tenant to keep silently unreachable.
fn check_certificates_can_be_verified(raw: &RawConfig, errors: &mut Errors) {
    let verifies = raw
        .listen_tls
        .as_ref()
        .is_some_and(|tls| tls.client_ca_file.is_some());
    if verifies {
        return;
    }
    for (name, tenant) in &raw.tenants {
        if !tenant.client_cert_sans.is_empty() {
            errors.push(
                format!("tenants.{name}.client_cert_sans"),
                "needs listen_tls.client_ca_file: without it no client certificate is verified",
            );
        }
    }
}

/// What Python, Java and Ruby SDKs accept as an auth id.
fn is_valid_sdk_auth_id(id: &str) -> bool {
    id.len() == 20
        && (id.starts_with("MA") || id.starts_with("SA"))
        && id
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit())
}

/// Tenant and account names appear in metrics labels and audit records (which keep at
/// most `record::MAX_NAME_BYTES` of them): keep them boring.
fn is_valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

fn validate_tokens<'a>(
    path: &str,
    tenant: &'a str,
    raw: &[String],
    owner_of: &mut HashMap<TokenHash, &'a str>,
    errors: &mut Errors,
) -> Vec<TokenHash> {
    let mut tokens = Vec::new();
    for (index, text) in raw.iter().enumerate() {
        let key = format!("{path}.tokens[{index}]");
        match text.parse::<TokenHash>() {
            Ok(hash) => {
                if let Some(other) = owner_of.insert(hash, tenant) {
                    let clash = if other == tenant {
                        "the same token hash is listed twice in this tenant's tokens".to_owned()
                    } else {
                        format!("the same token hash is also listed for tenant {other}")
                    };
                    errors.push(key, clash);
                } else {
                    tokens.push(hash);
                }
            }
            Err(err) => errors.push(key, err),
        }
    }
    tokens
}

fn validate_allow(path: &str, raw: &[String], errors: &mut Errors) -> Vec<NamePattern> {
    if raw.is_empty() {
        errors.push(
            format!("{path}.allow"),
            "at least one name pattern is required",
        );
    }
    let mut patterns = Vec::new();
    for (index, pattern) in raw.iter().enumerate() {
        let chars = pattern.chars().count();
        if chars == 0 || chars > MAX_MPC_PATTERN_CHARS {
            errors.push(
                format!("{path}.allow[{index}]"),
                "expected a pattern of 1-128 characters",
            );
        } else {
            patterns.push(NamePattern::new(pattern));
        }
    }
    patterns
}

fn validate_audit(raw: &raw::RawAudit, errors: &mut Errors) -> Option<AuditSettings> {
    let path = AuditPath::try_from(raw.path.clone())
        .map_err(|err| errors.push("audit.path", err))
        .ok();
    if raw.rotate_bytes < MIN_ROTATE_BYTES {
        errors.push(
            "audit.rotate_bytes",
            format!("expected at least {MIN_ROTATE_BYTES} bytes"),
        );
    }
    let hmac_key = match &raw.hmac_key {
        None => Some(None),
        Some(source) => resolve_key(source)
            .map(Some)
            .map_err(|err| errors.push("audit.hmac_key", err))
            .ok(),
    };
    Some(AuditSettings {
        path: path?,
        fsync: match raw.fsync {
            raw::RawFsync::Always => Fsync::Always,
            raw::RawFsync::Never => Fsync::Never,
        },
        rotate_bytes: raw.rotate_bytes,
        hmac_key: hmac_key?,
    })
}

/// The audit HMAC key's bytes, as the gateway uses them (also what `audit verify
/// --hmac-key-file` reads, so both agree on a file's trimming).
pub(crate) fn resolve_key(source: &ValueSource) -> Result<SecretSlice<u8>, secret::ResolveError> {
    let secret = source.resolve_secret()?;
    Ok(SecretSlice::from(
        secret.expose_secret().as_bytes().to_vec(),
    ))
}

fn validate_log(raw: &raw::RawLog, errors: &mut Errors) -> Option<LogSettings> {
    match crate::telemetry::parse_log_filter(&raw.level) {
        Ok(_) => Some(LogSettings {
            format: raw.format,
            level: raw.level.clone(),
        }),
        Err(err) => {
            errors.push("log.level", format!("not a valid level or filter: {err}"));
            None
        }
    }
}

/// A valid config for the unit tests of other modules: one account whose token is a file
/// in `dir`, tenant `billing` (the token `foo`) and the audit log `dir/audit.jsonl`, with
/// `audit_extra` (indented YAML lines) added to its `audit` block.
#[cfg(test)]
pub(crate) fn for_tests(dir: &Path, audit_extra: &str) -> Config {
    for_tests_with(dir, "", audit_extra)
}

/// [`for_tests`], with `top_extra` (YAML lines: other top-level keys) added.
#[cfg(test)]
pub(crate) fn for_tests_with(dir: &Path, top_extra: &str, audit_extra: &str) -> Config {
    std::fs::write(dir.join("token"), "plivo-secret").expect("write");
    let d = dir.display();
    Config::from_yaml(&format!(
        r#"
{top_extra}
accounts:
  default:
    auth_id: MAXXXXXXXXXXXXXXXXXX
    auth_token: {{file: "{d}/token"}}
tenants:
  billing:
    tokens: ["sha256:2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae"]
    allow: ["billing-*"]
audit:
  path: "{d}/audit.jsonl"
{audit_extra}"#
    ))
    .expect("valid config")
}

#[cfg(test)]
mod tests;
