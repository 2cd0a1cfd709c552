//! The configuration file exactly as written: serde types with unknown keys rejected and
//! defaults filled in. Nothing here is trusted; [`super::Config`] validates it.

use std::collections::BTreeMap;
use std::fmt;
use std::marker::PhantomData;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;

use super::secret::{value_not_shown, ValueSource};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    #[serde(default = "default_admin_listen")]
    pub admin_listen: SocketAddr,
    #[serde(default = "default_shutdown_grace")]
    pub shutdown_grace: HumanDuration,
    #[serde(default)]
    pub worker_threads: usize,
    #[serde(default)]
    pub listen_tls: Option<RawListenTls>,
    #[serde(default)]
    pub rate_limit_store: RawRateLimitStore,
    #[serde(deserialize_with = "unique_keys")]
    pub accounts: BTreeMap<String, RawAccount>,
    #[serde(default)]
    pub upstream: RawUpstream,
    #[serde(deserialize_with = "unique_keys")]
    pub tenants: BTreeMap<String, RawTenant>,
    pub audit: RawAudit,
    #[serde(default)]
    pub log: RawLog,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawListenTls {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    #[serde(default)]
    pub client_ca_file: Option<PathBuf>,
    #[serde(default)]
    pub require_client_cert: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRateLimitStore {
    #[serde(default)]
    pub kind: StoreKind,
    /// A literal, or `{env: ..}`/`{file: ..}` when the URL carries a password.
    #[serde(default)]
    pub url: Option<ValueSource>,
    #[serde(default = "default_key_prefix")]
    pub key_prefix: String,
    #[serde(default = "default_store_timeout")]
    pub timeout: HumanDuration,
    #[serde(default)]
    pub on_error: OnStoreError,
}

impl Default for RawRateLimitStore {
    fn default() -> Self {
        RawRateLimitStore {
            kind: StoreKind::default(),
            url: None,
            key_prefix: default_key_prefix(),
            timeout: default_store_timeout(),
            on_error: OnStoreError::default(),
        }
    }
}

/// Where limiter state lives.
#[derive(Debug, Deserialize, Default, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    #[default]
    Local,
    Redis,
}

/// What a request gets when the shared store fails or is slower than its timeout.
#[derive(Debug, Deserialize, Default, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum OnStoreError {
    /// Fall back to this replica's own limiter.
    #[default]
    Local,
    /// Refuse with 503 rate-limit-store-unavailable.
    Deny,
    /// Admit without RateLimit headers.
    Allow,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAccount {
    pub auth_id: ValueSource,
    pub auth_token: ValueSource,
    #[serde(default = "default_account_rate_limit")]
    pub rate_limit: RawRateLimit,
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RawRateLimit {
    pub per_second: PositiveInt,
    pub burst: PositiveInt,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpstream {
    #[serde(default = "default_base_url")]
    pub base_url: String,
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout: HumanDuration,
    #[serde(default = "default_timeout")]
    pub timeout: HumanDuration,
    #[serde(default = "default_max_attempts")]
    pub max_attempts: PositiveInt,
}

impl Default for RawUpstream {
    fn default() -> Self {
        RawUpstream {
            base_url: default_base_url(),
            ca_file: None,
            connect_timeout: default_connect_timeout(),
            timeout: default_timeout(),
            max_attempts: default_max_attempts(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTenant {
    #[serde(default, deserialize_with = "token_hashes")]
    pub tokens: Vec<String>,
    pub allow: Vec<String>,
    #[serde(default = "default_tenant_rate_limit")]
    pub rate_limit: RawRateLimit,
    #[serde(default = "default_account_name")]
    pub account: String,
    #[serde(default)]
    pub client_cert_sans: Vec<String>,
    #[serde(default)]
    pub sdk_auth_id: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAudit {
    pub path: PathBuf,
    #[serde(default)]
    pub fsync: RawFsync,
    #[serde(default = "default_rotate_bytes")]
    pub rotate_bytes: u64,
    #[serde(default)]
    pub hmac_key: Option<ValueSource>,
}

#[derive(Debug, Deserialize, Default, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum RawFsync {
    #[default]
    Always,
    Never,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLog {
    #[serde(default)]
    pub format: LogFormat,
    #[serde(default = "default_log_level")]
    pub level: String,
}

impl Default for RawLog {
    fn default() -> Self {
        RawLog {
            format: LogFormat::default(),
            level: default_log_level(),
        }
    }
}

/// How operational log lines are written.
#[derive(Debug, Deserialize, Default, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Json,
    Pretty,
}

/// A map whose keys must each appear once. YAML lets a key repeat, and serde's map types
/// keep the last value: a second `billing:` block under `tenants` would silently replace
/// the first, its tokens and its allow list with it, and a second `default:` under
/// `accounts` the credentials. Both are refused instead.
fn unique_keys<'de, D, V>(deserializer: D) -> Result<BTreeMap<String, V>, D::Error>
where
    D: Deserializer<'de>,
    V: Deserialize<'de>,
{
    deserializer.deserialize_map(UniqueKeys(PhantomData))
}

struct UniqueKeys<V>(PhantomData<V>);

impl<'de, V: Deserialize<'de>> Visitor<'de> for UniqueKeys<V> {
    type Value = BTreeMap<String, V>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a map of names, each given once")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut entries = BTreeMap::new();
        while let Some(key) = map.next_key::<String>()? {
            if entries.contains_key(&key) {
                return Err(de::Error::custom(format_args!(
                    "`{key}` is given twice; each name may appear once"
                )));
            }
            let value = map.next_value()?;
            entries.insert(key, value);
        }
        Ok(entries)
    }
}

/// `tokens`: a list of strings (checked as `sha256:<hex>` hashes later). Pasting the
/// token itself where its hash belongs (`token new` prints both) is the likeliest slip
/// in the file, and serde's messages quote what they found, into `check-config`'s output
/// and the log of a reload: these say what kind of value was found, never the value.
fn token_hashes<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<String>, D::Error> {
    // `any`, not `seq`: asked for a sequence, serde_yaml quotes a scalar it finds
    // itself; asked for anything, it hands the scalar to the visitor.
    deserializer.deserialize_any(TokenList)
}

const TOKEN_LIST: &str = r#"a list of token hashes, ["sha256:<64 hex digits>", ...]"#;

struct TokenList;

impl<'de> Visitor<'de> for TokenList {
    type Value = Vec<String>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(TOKEN_LIST)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<String>, A::Error> {
        let mut hashes = Vec::new();
        // Entries are strings: serde_yaml hands any scalar over as one, and quotes
        // nothing in its message about a map or list in their place.
        while let Some(text) = seq.next_element::<String>()? {
            hashes.push(text);
        }
        Ok(hashes)
    }

    fn visit_str<E: de::Error>(self, _value: &str) -> Result<Vec<String>, E> {
        Err(value_not_shown("a single string", TOKEN_LIST))
    }

    fn visit_i64<E: de::Error>(self, _value: i64) -> Result<Vec<String>, E> {
        Err(value_not_shown("a number", TOKEN_LIST))
    }

    fn visit_u64<E: de::Error>(self, _value: u64) -> Result<Vec<String>, E> {
        Err(value_not_shown("a number", TOKEN_LIST))
    }

    fn visit_f64<E: de::Error>(self, _value: f64) -> Result<Vec<String>, E> {
        Err(value_not_shown("a number", TOKEN_LIST))
    }
}

/// A duration written the humantime way (`500ms`, `2s`, `1m`, also `1m 30s` or
/// `2 seconds`). A bare number is refused: its unit would be a guess.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        // Through a visitor, so that an error is raised while the parser is at the value
        // and names its line (an error after the value was taken names the mapping's).
        deserializer.deserialize_str(HumanDurationVisitor)
    }
}

struct HumanDurationVisitor;

impl Visitor<'_> for HumanDurationVisitor {
    type Value = HumanDuration;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a duration like 500ms, 2s or 1m")
    }

    fn visit_str<E: de::Error>(self, text: &str) -> Result<HumanDuration, E> {
        let number = text.trim();
        let is_number = number.bytes().any(|b| b.is_ascii_digit())
            && number.bytes().filter(|b| *b == b'.').count() <= 1
            && number.bytes().all(|b| b.is_ascii_digit() || b == b'.');
        if is_number {
            // humantime's own hint would suggest `15sec`, a form the docs never show.
            return Err(E::custom(format!(
                "expected a duration like 500ms, 2s or 1m, got {number}: a number needs a unit, for example {number}s or {number}ms"
            )));
        }
        humantime::parse_duration(text)
            .map(HumanDuration)
            .map_err(|err| {
                E::custom(format!(
                    "expected a duration like 500ms, 2s or 1m, got {text:?} ({err})"
                ))
            })
    }
}

/// An integer of at least 1, with an error message that says so.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PositiveInt(pub u32);

impl<'de> Deserialize<'de> for PositiveInt {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(PositiveIntVisitor)
    }
}

struct PositiveIntVisitor;

impl Visitor<'_> for PositiveIntVisitor {
    type Value = PositiveInt;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a positive integer")
    }

    fn visit_u64<E: de::Error>(self, value: u64) -> Result<PositiveInt, E> {
        match u32::try_from(value) {
            Ok(v) if v >= 1 => Ok(PositiveInt(v)),
            Ok(_) => Err(E::custom(format!(
                "expected a positive integer, got {value}"
            ))),
            Err(_) => Err(E::custom(format!(
                "expected a positive integer of at most {}, got {value}",
                u32::MAX
            ))),
        }
    }

    fn visit_i64<E: de::Error>(self, value: i64) -> Result<PositiveInt, E> {
        match u64::try_from(value) {
            Ok(v) => self.visit_u64(v),
            Err(_) => Err(E::custom(format!(
                "expected a positive integer, got {value}"
            ))),
        }
    }

    fn visit_f64<E: de::Error>(self, value: f64) -> Result<PositiveInt, E> {
        Err(E::custom(format!(
            "expected a positive integer, got {value}"
        )))
    }

    fn visit_str<E: de::Error>(self, value: &str) -> Result<PositiveInt, E> {
        Err(E::custom(format!(
            "expected a positive integer, got {value:?}"
        )))
    }
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8080))
}
fn default_admin_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9090))
}
fn default_shutdown_grace() -> HumanDuration {
    HumanDuration(Duration::from_secs(20))
}
fn default_account_rate_limit() -> RawRateLimit {
    RawRateLimit {
        per_second: PositiveInt(50),
        burst: PositiveInt(50),
    }
}
/// A tenant without its own `rate_limit` gets a limit of its own with the account
/// default's values (50/s, burst 50), whatever its account's limit is.
fn default_tenant_rate_limit() -> RawRateLimit {
    default_account_rate_limit()
}
fn default_base_url() -> String {
    "https://api.plivo.com".to_owned()
}
fn default_connect_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(2))
}
fn default_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(10))
}
fn default_max_attempts() -> PositiveInt {
    PositiveInt(3)
}
fn default_account_name() -> String {
    "default".to_owned()
}
fn default_rotate_bytes() -> u64 {
    100 * 1024 * 1024
}
fn default_key_prefix() -> String {
    "mpc-gateway".to_owned()
}
fn default_store_timeout() -> HumanDuration {
    HumanDuration(Duration::from_millis(50))
}
fn default_log_level() -> String {
    "info".to_owned()
}
