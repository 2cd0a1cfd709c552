//! Test harness: a TLS Plivo simulator with a CA made for the test, the real gateway on
//! 127.0.0.1:0 configured to use it, a plain-HTTP client, and audit-log readers that
//! recompute the hash chain independently of the gateway's code.
#![allow(dead_code)]

pub mod served;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use hmac::{Hmac, Mac};
use http::{HeaderMap, Method, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use mpc_gateway::config::Config;
use mpc_gateway::rate_limit::{LimiterClock, ManualClock};
use mpc_gateway::server::{RunningGateway, StartOptions};
use mpc_gateway::simulator::{generate_pki, Liveness, Simulator, SimulatorConfig, TestPki};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub const AUTH_ID: &str = "MAXXXXXXXXXXXXXXXXXX";
pub const AUTH_TOKEN: &str = "test-plivo-token-not-real";
/// A second account whose credentials the simulator does not know: Plivo answers 401.
pub const SECOND_AUTH_ID: &str = "SAYYYYYYYYYYYYYYYYYY";
pub const SECOND_AUTH_TOKEN: &str = "stale-plivo-token-not-real";
pub const BILLING_TOKEN: &str = "billing-token-for-tests";
pub const OPS_TOKEN: &str = "ops-token-for-tests";
pub const STALE_TENANT_TOKEN: &str = "second-account-token-for-tests";
pub const HMAC_KEY: &str = "audit-hmac-key-for-tests";
/// The billing tenant's virtual auth id on the Plivo-compatible route.
pub const BILLING_SDK_AUTH_ID: &str = "MABILLING00000000001";

pub fn token_hash(token: &str) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(token.as_bytes())))
}

/// What a test may change about the gateway's config.
#[derive(Clone)]
pub struct Options {
    pub tenant_limit: (u32, u32),
    pub account_limit: (u32, u32),
    pub connect_timeout: &'static str,
    pub timeout: &'static str,
    pub max_attempts: u32,
    pub hmac: bool,
    pub fsync: &'static str,
    pub rotate_bytes: u64,
    /// Audit file location; default is inside the harness's temp dir.
    pub audit_path: Option<PathBuf>,
    /// Overrides the simulator's URL (e.g. a closed port).
    pub base_url: Option<String>,
    /// Trust the simulator's CA (false: the upstream certificate is untrusted).
    pub trust_simulator: bool,
    pub liveness: Liveness,
    /// Appended to the generated config (top-level keys such as `rate_limit_store`).
    pub extra_yaml: String,
    /// More tenants, appended under `tenants:` (each line indented by two spaces), e.g. a
    /// second tenant with an `sdk_auth_id` of its own.
    pub extra_tenants_yaml: String,
    /// The simulator offers HTTP/2 by ALPN (otherwise only HTTP/1.1).
    pub http2: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            tenant_limit: (100, 100),
            account_limit: (1000, 1000),
            connect_timeout: "500ms",
            timeout: "3s",
            max_attempts: 3,
            hmac: false,
            fsync: "always",
            rotate_bytes: 100 * 1024 * 1024,
            audit_path: None,
            base_url: None,
            trust_simulator: true,
            liveness: Liveness::AllNames {
                forget_ended: false,
            },
            extra_yaml: String::new(),
            extra_tenants_yaml: String::new(),
            http2: false,
        }
    }
}

pub struct Harness {
    pub dir: tempfile::TempDir,
    pub pki: TestPki,
    pub sim: Simulator,
    pub gateway: Option<RunningGateway>,
    pub clock: ManualClock,
    pub audit_path: PathBuf,
    pub config_path: PathBuf,
    pub options: Options,
    client: Client<HttpConnector, Full<Bytes>>,
}

/// A response as the caller saw it.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|err| panic!("body is not JSON ({err}): {:?}", self.body))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Asserts status, problem type and the fields every problem body carries.
    pub fn assert_problem(&self, status: u16, slug: &str) {
        assert_eq!(self.status, status, "status; body {:?}", self.body);
        assert_eq!(
            self.header("content-type"),
            Some("application/problem+json")
        );
        let body = self.json();
        assert_eq!(body["type"], format!("urn:mpc-gateway:{slug}"), "{body}");
        assert_eq!(body["status"], status);
        assert!(body["title"].is_string() && body["detail"].is_string());
        // Both sides required: comparing two Options would let a body without
        // `request_id` pass when the header is missing too.
        let header = self
            .header("x-request-id")
            .expect("every response carries X-Request-Id");
        assert_eq!(
            body["request_id"].as_str(),
            Some(header),
            "request_id in body and header: {body}"
        );
        // DESIGN §1 "Error bodies": every response that carries `Retry-After` also has
        // `"retry_after": <same seconds>` in its body, and only those do.
        match self.header("retry-after") {
            Some(seconds) => {
                let seconds: u64 = seconds
                    .parse()
                    .unwrap_or_else(|_| panic!("Retry-After is whole seconds: {seconds:?}"));
                assert_eq!(
                    body["retry_after"].as_u64(),
                    Some(seconds),
                    "retry_after in the body equals Retry-After: {body}"
                );
            }
            None => assert!(
                body.get("retry_after").is_none(),
                "retry_after in a body without Retry-After: {body}"
            ),
        }
    }
}

impl Harness {
    pub async fn start() -> Harness {
        Harness::with(Options::default()).await
    }

    /// A harness whose simulator knows only the MPCs the test adds (`sim.add_mpc`), as
    /// the SDK route's lookups by uuid need.
    pub async fn with_explicit_liveness() -> Harness {
        Harness::with(Options {
            liveness: Liveness::Explicit,
            ..Options::default()
        })
        .await
    }

    pub async fn with(options: Options) -> Harness {
        let dir = tempfile::tempdir().expect("tempdir");
        let pki = generate_pki(&["localhost", "127.0.0.1"]).expect("pki");
        let mut sim_config = SimulatorConfig::new(AUTH_ID, AUTH_TOKEN);
        sim_config.tls = Some(pki.server_tls());
        sim_config.liveness = options.liveness;
        sim_config.http2 = options.http2;
        let sim = Simulator::start(sim_config).await.expect("simulator");
        let audit_path = options
            .audit_path
            .clone()
            .unwrap_or_else(|| dir.path().join("audit.jsonl"));
        let config_path = dir.path().join("gateway.yaml");
        let clock = ManualClock::default();
        let mut harness = Harness {
            dir,
            pki,
            sim,
            gateway: None,
            clock,
            audit_path,
            config_path,
            options,
            client: Client::builder(TokioExecutor::new()).build_http(),
        };
        harness.write_files();
        let config = Config::load(&harness.config_path).expect("test config is valid");
        let gateway = RunningGateway::start(
            &config,
            StartOptions {
                limiter_clock: LimiterClock::Manual(harness.clock.clone()),
            },
        )
        .await
        .expect("gateway starts");
        harness.gateway = Some(gateway);
        harness
    }

    fn write_files(&self) {
        let dir = self.dir.path();
        write_secret(&dir.join("plivo-token"), format!("{AUTH_TOKEN}\n"));
        write_secret(&dir.join("second-token"), SECOND_AUTH_TOKEN);
        write_secret(&dir.join("hmac-key"), HMAC_KEY);
        let ca_path = dir.join("ca.pem");
        let ca_pem = if self.options.trust_simulator {
            self.pki.ca_cert_pem.clone()
        } else {
            generate_pki(&["localhost"]).expect("other pki").ca_cert_pem
        };
        std::fs::write(&ca_path, ca_pem).expect("write");
        std::fs::write(&self.config_path, self.config_yaml()).expect("write");
    }

    pub fn config_yaml(&self) -> String {
        let o = &self.options;
        let dir = self.dir.path().display();
        let base_url = o.base_url.clone().unwrap_or_else(|| self.sim.base_url());
        let hmac = if o.hmac {
            format!("  hmac_key: {{file: \"{dir}/hmac-key\"}}\n")
        } else {
            String::new()
        };
        format!(
            r#"listen: 127.0.0.1:0
admin_listen: 127.0.0.1:0
shutdown_grace: 2s
accounts:
  default:
    auth_id: {AUTH_ID}
    auth_token: {{file: "{dir}/plivo-token"}}
    rate_limit: {{per_second: {}, burst: {}}}
  second:
    auth_id: {SECOND_AUTH_ID}
    auth_token: {{file: "{dir}/second-token"}}
upstream:
  base_url: {base_url}
  ca_file: "{dir}/ca.pem"
  connect_timeout: {}
  timeout: {}
  max_attempts: {}
tenants:
  billing:
    tokens: ["{}"]
    allow: ["billing-*"]
    sdk_auth_id: {BILLING_SDK_AUTH_ID}
    rate_limit: {{per_second: {}, burst: {}}}
  ops:
    tokens: ["{}"]
    allow: ["*"]
  stale:
    tokens: ["{}"]
    allow: ["*"]
    account: second
{}audit:
  path: "{}"
  fsync: {}
  rotate_bytes: {}
{hmac}log:
  format: json
  level: warn
{}"#,
            o.account_limit.0,
            o.account_limit.1,
            o.connect_timeout,
            o.timeout,
            o.max_attempts,
            token_hash(BILLING_TOKEN),
            o.tenant_limit.0,
            o.tenant_limit.1,
            token_hash(OPS_TOKEN),
            token_hash(STALE_TENANT_TOKEN),
            o.extra_tenants_yaml,
            self.audit_path.display(),
            o.fsync,
            o.rotate_bytes,
            o.extra_yaml,
        )
    }

    /// Starts another gateway instance on the same config and simulator, with its own
    /// listeners and audit log (`audit-<suffix>.jsonl`), like another replica.
    pub async fn start_replica(&self, suffix: &str) -> RunningGateway {
        let audit = self.dir.path().join(format!("audit-{suffix}.jsonl"));
        let yaml = self.config_yaml().replace(
            &format!("path: \"{}\"", self.audit_path.display()),
            &format!("path: \"{}\"", audit.display()),
        );
        let path = self.dir.path().join(format!("gateway-{suffix}.yaml"));
        std::fs::write(&path, yaml).expect("write replica config");
        let config = Config::load(&path).expect("replica config is valid");
        RunningGateway::start(
            &config,
            StartOptions {
                limiter_clock: LimiterClock::Manual(self.clock.clone()),
            },
        )
        .await
        .expect("replica starts")
    }

    /// `POST /mpc/{segment}/end` with a Bearer token to any gateway address.
    pub async fn end_at(&self, addr: SocketAddr, segment: &str, token: &str) -> Reply {
        let request = Request::builder()
            .method(Method::POST)
            .uri(format!("http://{addr}/mpc/{segment}/end"))
            .header("authorization", format!("Bearer {token}"))
            .body(Full::new(Bytes::new()))
            .expect("request");
        let response = tokio::time::timeout(Duration::from_secs(15), self.client.request(request))
            .await
            .expect("gateway answered within 15 s")
            .expect("gateway answered");
        let (parts, body) = response.into_parts();
        Reply {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body: body.collect().await.expect("body").to_bytes(),
        }
    }

    pub fn running(&self) -> &RunningGateway {
        self.gateway.as_ref().expect("gateway running")
    }

    pub fn addr(&self) -> SocketAddr {
        self.running().local_addr()
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.running().admin_addr()
    }

    /// Sends one request; `headers` are added as given.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Reply {
        let mut builder = Request::builder()
            .method(method)
            .uri(format!("http://{}{path}", self.addr()));
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        let request = builder
            .body(Full::new(Bytes::copy_from_slice(body)))
            .expect("request");
        let response = tokio::time::timeout(Duration::from_secs(15), self.client.request(request))
            .await
            .expect("gateway answered within 15 s")
            .expect("gateway answered");
        let (parts, body) = response.into_parts();
        let body = body.collect().await.expect("body").to_bytes();
        Reply {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body,
        }
    }

    /// `POST /mpc/{segment}/end` with a Bearer token.
    pub async fn end(&self, segment: &str, token: &str) -> Reply {
        let auth = format!("Bearer {token}");
        self.send(
            Method::POST,
            &format!("/mpc/{segment}/end"),
            &[("authorization", &auth)],
            b"",
        )
        .await
    }

    pub async fn admin_get(&self, path: &str) -> Reply {
        let request = Request::builder()
            .uri(format!("http://{}{path}", self.admin_addr()))
            .body(Full::new(Bytes::new()))
            .expect("request");
        let response = tokio::time::timeout(Duration::from_secs(15), self.client.request(request))
            .await
            .expect("admin answered within 15 s")
            .expect("admin answered");
        let (parts, body) = response.into_parts();
        Reply {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body: body.collect().await.expect("body").to_bytes(),
        }
    }

    /// The audit records written so far, parsed.
    pub fn records(&self) -> Vec<serde_json::Value> {
        read_records(&self.audit_path)
    }

    /// Recomputes the chain of the audit file; panics on any broken link.
    pub fn assert_chain(&self) -> usize {
        let key = self.options.hmac.then_some(HMAC_KEY.as_bytes());
        assert_chain(std::slice::from_ref(&self.audit_path), key)
    }

    pub async fn shutdown(mut self) {
        self.stop_gateway().await;
    }

    /// Shuts the gateway down (drain, audit flush) but keeps the harness, so its audit
    /// log can still be read.
    pub async fn stop_gateway(&mut self) {
        if let Some(gateway) = self.gateway.take() {
            gateway.shutdown().await.expect("clean shutdown");
        }
    }
}

pub fn read_records(path: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .map(|line| serde_json::from_str(line).expect("audit line is JSON"))
        .collect()
}

pub const MEMBERS: [&str; 19] = [
    "seq",
    "ts",
    "event",
    "request_id",
    "tenant",
    "token_fp",
    "client",
    "method",
    "path",
    "mpc",
    "account",
    "status",
    "reason",
    "upstream_status",
    "plivo_api_id",
    "attempts",
    "duration_ms",
    "prev",
    "hash",
];

/// Checks member order, seq continuity, prev links and each hash (SHA-256, or
/// HMAC-SHA256 with `key`), across `files` in order. Returns the number of records.
pub fn assert_chain(files: &[PathBuf], key: Option<&[u8]>) -> usize {
    let mut prev = "0".repeat(64);
    let mut expected_seq = 1u64;
    let mut count = 0;
    for file in files {
        let text = std::fs::read_to_string(file).expect("read audit file");
        assert!(text.is_empty() || text.ends_with('\n'), "torn last line");
        for (index, line) in text.lines().enumerate() {
            let at = format!("{}:{}", file.display(), index + 1);
            let value: serde_json::Value = serde_json::from_str(line).expect("JSON");
            let members: Vec<&str> = value
                .as_object()
                .expect("object")
                .keys()
                .map(String::as_str)
                .collect();
            assert_eq!(members, MEMBERS, "member order at {at}");
            assert_eq!(value["seq"], expected_seq, "seq at {at}");
            assert_eq!(value["prev"], prev.as_str(), "prev link at {at}");
            let hash = value["hash"].as_str().expect("hash").to_owned();
            let suffix = format!(",\"hash\":\"{hash}\"}}");
            let unhashed = format!(
                "{}}}",
                line.strip_suffix(&suffix)
                    .expect("line ends with the hash member")
            );
            let computed = match key {
                Some(key) => {
                    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("key");
                    mac.update(unhashed.as_bytes());
                    hex::encode(mac.finalize().into_bytes())
                }
                None => hex::encode(Sha256::digest(unhashed.as_bytes())),
            };
            assert_eq!(computed, hash, "hash at {at}");
            prev = hash;
            expected_seq += 1;
            count += 1;
        }
    }
    count
}

/// The Basic header the gateway must send for the default account.
pub fn expected_basic() -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{AUTH_ID}:{AUTH_TOKEN}"))
    )
}

/// Sends raw bytes on a fresh connection and returns everything read until the server
/// closes it or `wait` passes.
pub async fn raw_exchange(addr: SocketAddr, request: &[u8], wait: Duration) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream.write_all(request).await.expect("write");
    let mut out = Vec::new();
    let _ = tokio::time::timeout(wait, stream.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// A `redis-server` of the test's own on a free loopback port, with nothing persisted;
/// killed when dropped. `kill` and `restart` (same port) simulate an outage.
///
/// A free port can only be probed, not reserved: another test (or another test's
/// `restart`) may bind it before this redis does. So "up" means that *this* child wrote
/// "Ready to accept connections" to its own log file, which redis does only after it
/// bound the port; a PING alone could be answered by someone else's server while ours is
/// still on its way to exiting with "Address already in use". When the port turns out
/// to be taken, `start` probes another one (bounded attempts).
pub struct RedisServer {
    port: u16,
    extra_args: Vec<String>,
    child: Option<std::process::Child>,
    /// Working directory, so a stray dump never lands in the source tree.
    dir: tempfile::TempDir,
}

/// Ports `RedisServer::start` tries before giving up.
const START_ATTEMPTS: usize = 8;

impl RedisServer {
    pub fn start() -> RedisServer {
        RedisServer::start_with(&[])
    }

    /// Starts with extra arguments, e.g. `["--requirepass", "secret"]`.
    pub fn start_with(extra_args: &[&str]) -> RedisServer {
        let mut dir = tempfile::tempdir().expect("tempdir");
        let extra_args: Vec<String> = extra_args.iter().map(|a| (*a).to_owned()).collect();
        let mut last_log = String::new();
        // The port is free when probed but may be taken before redis binds it: retry on
        // another one.
        for _ in 0..START_ATTEMPTS {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|listener| listener.local_addr())
                .expect("probe a free port")
                .port();
            let mut server = RedisServer {
                port,
                extra_args: extra_args.clone(),
                child: None,
                dir,
            };
            if server.spawn_and_wait(Duration::from_secs(5)) {
                return server;
            }
            last_log = std::fs::read_to_string(server.log_path()).unwrap_or_default();
            dir = server.into_dir();
        }
        panic!(
            "redis-server did not start on a free loopback port in {START_ATTEMPTS} attempts; \
             its last log:\n{last_log}"
        );
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:{port}/0`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(std::process::Child::id)
    }

    /// SIGKILL, as a crash would: clients see their connections reset.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts again on the same port with the same arguments (and an empty dataset).
    pub fn restart(&mut self) {
        self.kill();
        // The old socket may linger for a moment; keep trying within a bound.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while std::time::Instant::now() < deadline {
            if self.spawn_and_wait(Duration::from_secs(2)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("redis-server did not restart on port {}", self.port);
    }

    /// Sends a signal (e.g. "STOP", "CONT") to the server process.
    pub fn signal(&self, name: &str) {
        let pid = self.pid().expect("redis-server running");
        let status = std::process::Command::new("kill")
            .arg(format!("-{name}"))
            .arg(pid.to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{name} {pid}");
    }

    /// SIGSTOP, returning once the kernel reports the process stopped: from then on its
    /// open connections stay up and what clients send is accepted by the kernel and never
    /// answered, a Redis slower than any timeout. `signal("CONT")` resumes it.
    pub fn pause(&self) {
        self.signal("STOP");
        let pid = self.pid().expect("redis-server running");
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        loop {
            // The state follows the parenthesised command name in /proc/PID/stat.
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let state = stat
                .rsplit_once(") ")
                .and_then(|(_, rest)| rest.chars().next());
            if state == Some('T') {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "redis-server {pid} not stopped after SIGSTOP: {stat}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn into_dir(mut self) -> tempfile::TempDir {
        self.kill();
        let placeholder = tempfile::tempdir().expect("tempdir");
        std::mem::replace(&mut self.dir, placeholder)
    }

    /// This server's own log: only it writes there, so what the log says is about it.
    fn log_path(&self) -> PathBuf {
        self.dir.path().join("redis.log")
    }

    /// Whether this child logged that it is ready (it has bound its port by then).
    /// "Ready to accept connections" since Redis 3; Redis 2 said "The server is now
    /// ready to accept connections".
    fn logged_ready(&self) -> bool {
        std::fs::read_to_string(self.log_path()).is_ok_and(|log| {
            log.to_ascii_lowercase()
                .contains("ready to accept connections")
        })
    }

    /// Spawns the server and waits until it logged that it is ready and answers a PING;
    /// false when it exited (e.g. its port was taken) or stayed silent.
    fn spawn_and_wait(&mut self, within: Duration) -> bool {
        // A previous run's "ready" line must not count for this one.
        let _ = std::fs::remove_file(self.log_path());
        let binary = std::env::var("REDIS_SERVER").unwrap_or_else(|_| "redis-server".to_owned());
        let spawned = std::process::Command::new(&binary)
            .arg("--port")
            .arg(self.port.to_string())
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .arg("--logfile")
            .arg(self.log_path())
            .args(&self.extra_args)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn();
        let child = match spawned {
            Ok(child) => child,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => panic!(
                "`{binary}` not found on PATH: these tests need a real Redis \
                 (apt-get install -y redis-server; .ci/run installs it)"
            ),
            Err(err) => panic!("cannot start `{binary}`: {err}"),
        };
        self.child = Some(child);
        let deadline = std::time::Instant::now() + within;
        while std::time::Instant::now() < deadline {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(_exited)) = child.try_wait() {
                    self.child = None;
                    return false;
                }
            }
            if self.logged_ready() && redis_answers(self.port) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill();
        false
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The harness's own guard: a redis whose port another server already holds must not
/// be taken for up because that other server answers PING (the race `start` retries on).
#[test]
fn a_redis_whose_port_is_taken_is_not_taken_for_up() {
    let holder = RedisServer::start();
    let mut late = RedisServer {
        port: holder.port(),
        extra_args: Vec::new(),
        child: None,
        dir: tempfile::tempdir().expect("tempdir"),
    };
    assert!(
        !late.spawn_and_wait(Duration::from_secs(3)),
        "a second redis on port {} counted as started",
        holder.port()
    );
    assert!(redis_answers(holder.port()), "the holder is untouched");
}

/// True when something on the port answers a PING (`+PONG`, or an error such as NOAUTH:
/// either way the server is up).
fn redis_answers(port: u16) -> bool {
    use std::io::{Read, Write};
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let Ok(mut stream) = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200))
    else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    if stream.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut reply = [0u8; 64];
    matches!(stream.read(&mut reply), Ok(n) if n > 0 && (reply[0] == b'+' || reply[0] == b'-'))
}

// ---------------------------------------------------------------------------------------
// Raw HTTP/1 helpers for the hostile-input, fault and crash suites
// ---------------------------------------------------------------------------------------

/// One HTTP/1 response parsed from raw bytes.
#[derive(Debug, Clone)]
pub struct RawResponse {
    /// e.g. `HTTP/1.1`.
    pub version: String,
    pub status: u16,
    /// Names lower-cased, in arrival order.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawResponse {
    /// The first value of `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Whether the response announces that the connection closes after it.
    pub fn closes(&self) -> bool {
        self.header("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"))
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|err| {
            panic!(
                "body is not JSON ({err}): {:?}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }
}

/// Parses consecutive HTTP/1 responses (bodies framed by `Content-Length`, or none for
/// 1xx/204/304) from `bytes`. Returns the complete ones and the number of bytes after
/// them that did not form a complete response.
pub fn parse_responses(bytes: &[u8]) -> (Vec<RawResponse>, usize) {
    let mut responses = Vec::new();
    let mut rest = bytes;
    while let Some(head_end) = rest.windows(4).position(|w| w == b"\r\n\r\n") {
        let head = String::from_utf8_lossy(&rest[..head_end]).into_owned();
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let mut parts = status_line.splitn(3, ' ');
        let version = parts.next().unwrap_or_default().to_owned();
        let Some(status) = parts.next().and_then(|s| s.parse::<u16>().ok()) else {
            break;
        };
        let headers: Vec<(String, String)> = lines
            .filter_map(|line| line.split_once(':'))
            .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        let length = if (100..200).contains(&status) || status == 204 || status == 304 {
            0
        } else {
            headers
                .iter()
                .find(|(n, _)| n == "content-length")
                .and_then(|(_, v)| v.parse::<usize>().ok())
                .unwrap_or(0)
        };
        let body_start = head_end + 4;
        if rest.len() < body_start + length {
            break;
        }
        responses.push(RawResponse {
            version,
            status,
            headers,
            body: rest[body_start..body_start + length].to_vec(),
        });
        rest = &rest[body_start + length..];
    }
    (responses, rest.len())
}

/// What a raw exchange produced.
#[derive(Debug)]
pub struct RawOutcome {
    /// Every byte read.
    pub bytes: Vec<u8>,
    /// The server closed the connection (EOF or reset) within the wait.
    pub closed: bool,
    /// Writing the request failed (the server closed before reading all of it).
    pub write_error: Option<std::io::ErrorKind>,
    /// Reading ended with an error (typically a reset) rather than EOF.
    pub read_error: Option<std::io::ErrorKind>,
}

impl RawOutcome {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes).into_owned()
    }

    /// The complete responses read.
    pub fn responses(&self) -> Vec<RawResponse> {
        parse_responses(&self.bytes).0
    }

    /// The only response; panics when there is not exactly one.
    pub fn single(&self) -> RawResponse {
        let responses = self.responses();
        assert_eq!(
            responses.len(),
            1,
            "exactly one response expected: {:?}",
            truncated(&self.text(), 600)
        );
        responses.into_iter().next().expect("one response")
    }
}

/// The first `max` characters of `text`, for assertion messages.
pub fn truncated(text: &str, max: usize) -> String {
    text.chars().take(max).collect()
}

/// Like [`raw_exchange`], but tolerates a write that fails because the server already
/// answered and closed, and reports how the connection ended. Reads until the server
/// closes it or `wait` passes.
pub async fn raw_send(addr: SocketAddr, request: &[u8], wait: Duration) -> RawOutcome {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let write_error = stream.write_all(request).await.err().map(|e| e.kind());
    let mut bytes = Vec::new();
    let mut chunk = vec![0u8; 16 * 1024];
    let mut closed = false;
    let mut read_error = None;
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
            Err(_) => break,
            Ok(Ok(0)) => {
                closed = true;
                break;
            }
            Ok(Ok(n)) => bytes.extend_from_slice(&chunk[..n]),
            Ok(Err(err)) => {
                closed = true;
                read_error = Some(err.kind());
                break;
            }
        }
    }
    RawOutcome {
        bytes,
        closed,
        write_error,
        read_error,
    }
}

/// Writes a secret file owner-only (0600), as an operator should: a file every user may
/// read is a config warning.
pub fn write_secret(path: &Path, text: impl AsRef<[u8]>) {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut file| file.write_all(text.as_ref()))
        .expect("write a secret file");
}

/// The admin listener's `/metrics` text.
pub async fn metrics_text(h: &Harness) -> String {
    let reply = h.admin_get("/metrics").await;
    assert_eq!(reply.status, 200);
    String::from_utf8(reply.body.to_vec()).expect("metrics are UTF-8")
}

/// Polls `condition` every 20 ms until it holds or `within` passes.
pub async fn eventually_async<F, Fut>(within: Duration, mut condition: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = std::time::Instant::now() + within;
    loop {
        if condition().await {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Ends `name` as billing and returns the reply and how long it took (bounded by the
/// harness client's 15 s).
pub async fn timed_end(h: &Harness, name: &str) -> (Reply, std::time::Duration) {
    let started = std::time::Instant::now();
    let reply = h.end(name, BILLING_TOKEN).await;
    (reply, started.elapsed())
}

/// The last record, asserting it is the `result` that follows its `forward`.
pub fn last_result(h: &Harness) -> serde_json::Value {
    let records = h.records();
    let n = records.len();
    assert!(n >= 2, "forward and result: {records:?}");
    assert_eq!(records[n - 2]["event"], "forward", "{records:?}");
    assert_eq!(records[n - 1]["event"], "result", "{records:?}");
    assert_eq!(records[n - 2]["request_id"], records[n - 1]["request_id"]);
    records[n - 1].clone()
}

/// Headers a caller may send that must never reach Plivo.
pub const LEAKY_HEADERS: [(&str, &str); 6] = [
    ("cookie", "session=secret-cookie"),
    ("x-forwarded-for", "10.1.2.3"),
    ("content-type", "application/json"),
    ("x-anything", "caller-custom-header"),
    ("forwarded", "for=10.1.2.3;proto=https"),
    ("origin", "https://caller.example"),
];

/// Every header name the upstream may receive from the gateway.
pub const UPSTREAM_HEADERS: [&str; 4] = ["host", "authorization", "user-agent", "accept"];

/// Asserts the contract's upstream request for ending `name` on the default account:
/// `DELETE` to its path, Basic auth, our User-Agent, `Accept: application/json`, no body,
/// nothing of the caller's (its headers, its request id, its token).
pub fn assert_contract_upstream_request(
    sent: &mpc_gateway::simulator::RecordedRequest,
    name: &str,
) {
    assert_eq!(sent.method, "DELETE");
    assert_eq!(
        sent.target,
        format!("/v1/Account/{AUTH_ID}/MultiPartyCall/name_{name}/")
    );
    assert_eq!(
        sent.header("authorization"),
        Some(expected_basic().as_str())
    );
    assert_eq!(
        sent.header("user-agent"),
        Some(concat!("mpc-gateway/", env!("CARGO_PKG_VERSION")))
    );
    assert_eq!(sent.header("accept"), Some("application/json"));
    assert!(sent.body.is_empty(), "{:?}", sent.body);
    // An allow-list, not a deny-list: a header the test did not think of must not pass
    // either. `host` is what HTTP/1.1 carries the authority in (HTTP/2 has `:authority`,
    // not a header); the other three are the ones the gateway sets (src/upstream/mod.rs).
    for (name, value) in &sent.headers {
        assert!(
            UPSTREAM_HEADERS.contains(&name.as_str()),
            "header {name}: {value:?} reached the upstream; all: {:?}",
            sent.headers
        );
    }
    for (leaked, _) in LEAKY_HEADERS.iter().chain(&[("x-request-id", "")]) {
        assert_eq!(sent.header(leaked), None, "{leaked} leaked upstream");
    }
    let all_headers = format!("{:?}", sent.headers);
    assert!(!all_headers.contains(BILLING_TOKEN), "{all_headers}");
    assert!(!all_headers.contains("Bearer"), "{all_headers}");
}

// ---------------------------------------------------------------------------------------
// A full disk for the audit log (the ops and cli suites)
// ---------------------------------------------------------------------------------------

/// A tiny tmpfs, unmounted on drop (also when the test panics).
pub struct TmpfsMount {
    pub path: PathBuf,
}

impl TmpfsMount {
    /// [`TmpfsMount::mount`] for tests that can only run where mounting works: `None`,
    /// with the reason printed, when it does not (not root, no `mount`, a sandbox).
    pub fn try_mount(path: &Path, size: &str) -> Option<TmpfsMount> {
        let output = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .output();
        match output {
            Ok(output) if output.status.success() => Some(TmpfsMount {
                path: path.to_path_buf(),
            }),
            Ok(output) => {
                eprintln!(
                    "skipped: cannot mount a tmpfs at {} (needs root): {}",
                    path.display(),
                    String::from_utf8_lossy(&output.stderr).trim()
                );
                None
            }
            Err(err) => {
                eprintln!("skipped: cannot run mount: {err}");
                None
            }
        }
    }

    pub fn mount(path: &Path, size: &str) -> TmpfsMount {
        let output = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .output()
            .unwrap_or_else(|err| panic!("cannot run mount: {err}"));
        assert!(
            output.status.success(),
            "mounting a tmpfs at {} failed (this test needs root, as in CI): {}",
            path.display(),
            String::from_utf8_lossy(&output.stderr)
        );
        TmpfsMount {
            path: path.to_path_buf(),
        }
    }
}

impl Drop for TmpfsMount {
    fn drop(&mut self) {
        let unmounted = std::process::Command::new("umount")
            .arg(&self.path)
            .status()
            .is_ok_and(|s| s.success());
        if !unmounted {
            // Still busy (a writer thread closing its file): detach it lazily.
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.path)
                .status();
        }
    }
}

/// Writes `path` until the filesystem is full; asserts it really ended with ENOSPC.
pub fn fill_filesystem(path: &Path) {
    use std::io::Write as _;
    let mut file = std::fs::File::create(path).expect("create filler");
    let chunk = vec![0x5au8; 16 * 1024];
    let err = loop {
        if let Err(err) = file.write_all(&chunk) {
            break err;
        }
    };
    assert_eq!(err.raw_os_error(), Some(28), "expected ENOSPC, got {err}");
    // Top up whatever page is left, byte by byte.
    while file.write_all(&[0x5a]).is_ok() {}
}
