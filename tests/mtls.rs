//! TLS and mTLS on the data listener: tenants identified by client certificate URI and
//! DNS SANs, refused handshakes (and plain HTTP), Bearer alongside certificates, what
//! reaches the TLS simulator, and rotation of the server certificate and the client CA on
//! reload, in process and through SIGHUP to `serve`. Certificates are made here with rcgen
//! (through the simulator's test PKI).

use crate::common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use common::served::Served;
use common::{
    assert_contract_upstream_request, raw_exchange, raw_send, read_records, token_hash, truncated,
    AUTH_ID, AUTH_TOKEN, BILLING_TOKEN, LEAKY_HEADERS, OPS_TOKEN,
};
use http::{Method, Request};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use mpc_gateway::config::Config;
use mpc_gateway::server::{RunningGateway, StartOptions};
use mpc_gateway::simulator::{
    generate_pki, IssuedCert, LeafSpec, Simulator, SimulatorConfig, TestPki,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::HandshakeKind;
use sha2::{Digest, Sha256};

const BILLING_SAN: &str = "spiffe://prod/ns/billing/sa/api";
const BILLING_SDK_AUTH_ID: &str = "MABILLING0000000000X";
/// The SAN of a tenant that has no token at all: certificates are its only credential.
const ROBOT_SAN: &str = "spiffe://prod/ns/robot/sa/job";
/// A tenant identified by a DNS SAN (and no token).
const REPORTS_DNS_SAN: &str = "reports.internal";

struct MtlsGateway {
    dir: tempfile::TempDir,
    pki: TestPki,
    sim: Simulator,
    gateway: RunningGateway,
    config_path: PathBuf,
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write");
    path
}

/// Writes the listener's certificate, key and client CA (all from `pki`), the Plivo token
/// and the upstream CA into `dir`.
fn write_tls_files(dir: &Path, pki: &TestPki) {
    write(dir, "plivo-token", AUTH_TOKEN);
    write(dir, "upstream-ca.pem", &pki.ca_cert_pem);
    write(dir, "server.pem", &pki.server_cert_pem);
    write(dir, "server-key.pem", &pki.server_key_pem);
    write(dir, "clients-ca.pem", &pki.ca_cert_pem);
}

/// The gateway config of these tests: `listen_tls` from the files of [`write_tls_files`],
/// the TLS simulator at `base_url` as upstream, tenants identified by URI SANs (billing,
/// robot), by a DNS SAN (reports) and by token (ops).
fn mtls_yaml(dir: &Path, base_url: &str, require_client_cert: bool, log: &str) -> String {
    let d = dir.display();
    format!(
        r#"listen: 127.0.0.1:0
admin_listen: 127.0.0.1:0
shutdown_grace: 2s
listen_tls:
  cert_file: "{d}/server.pem"
  key_file: "{d}/server-key.pem"
  client_ca_file: "{d}/clients-ca.pem"
  require_client_cert: {require_client_cert}
accounts:
  default:
    auth_id: {AUTH_ID}
    auth_token: {{file: "{d}/plivo-token"}}
upstream:
  base_url: {base_url}
  ca_file: "{d}/upstream-ca.pem"
tenants:
  billing:
    client_cert_sans: ["{BILLING_SAN}"]
    sdk_auth_id: {BILLING_SDK_AUTH_ID}
    tokens: ["{}"]
    allow: ["billing-*"]
  ops:
    tokens: ["{}"]
    allow: ["*"]
  robot:
    client_cert_sans: ["{ROBOT_SAN}"]
    allow: ["robot-*"]
  reports:
    client_cert_sans: ["{REPORTS_DNS_SAN}"]
    allow: ["reports-*"]
audit:
  path: "{d}/audit.jsonl"
  fsync: never
log:
{log}"#,
        token_hash(BILLING_TOKEN),
        token_hash(OPS_TOKEN),
    )
}

/// A Plivo simulator speaking TLS with `pki`'s server certificate.
async fn tls_simulator(pki: &TestPki) -> Simulator {
    let mut config = SimulatorConfig::new(AUTH_ID, AUTH_TOKEN);
    config.tls = Some(pki.server_tls());
    Simulator::start(config).await.expect("simulator")
}

/// A fresh PKI, the TLS simulator, and a directory holding the listener's TLS files and
/// the gateway's config (`gateway.yaml`, whose path is returned).
async fn mtls_setup(
    require_client_cert: bool,
    log: &str,
) -> (tempfile::TempDir, TestPki, Simulator, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = generate_pki(&["localhost", "127.0.0.1"]).expect("pki");
    let sim = tls_simulator(&pki).await;
    write_tls_files(dir.path(), &pki);
    let yaml = mtls_yaml(dir.path(), &sim.base_url(), require_client_cert, log);
    let config_path = write(dir.path(), "gateway.yaml", &yaml);
    (dir, pki, sim, config_path)
}

impl MtlsGateway {
    async fn start(require_client_cert: bool) -> MtlsGateway {
        let (dir, pki, sim, config_path) = mtls_setup(require_client_cert, "  level: warn\n").await;
        let config = Config::load(&config_path).expect("valid config");
        let gateway = RunningGateway::start(&config, StartOptions::default())
            .await
            .expect("gateway");
        MtlsGateway {
            dir,
            pki,
            sim,
            gateway,
            config_path,
        }
    }

    fn addr(&self) -> SocketAddr {
        self.gateway.local_addr()
    }

    fn audit(&self) -> Vec<serde_json::Value> {
        read_records(&self.dir.path().join("audit.jsonl"))
    }

    /// Writes a new certificate and key for the listener (not yet reloaded).
    fn write_server_pair(&self, cert: &IssuedCert) {
        write(self.dir.path(), "server.pem", &cert.cert_pem);
        write(self.dir.path(), "server-key.pem", &cert.key_pem);
    }

    fn write_client_ca(&self, pem: &str) {
        write(self.dir.path(), "clients-ca.pem", pem);
    }
}

/// The admin listener's `/metrics` text.
async fn admin_metrics(admin: SocketAddr) -> String {
    let text = raw_exchange(
        admin,
        b"GET /metrics HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(
        text.starts_with("HTTP/1.1 200"),
        "{}",
        truncated(&text, 200)
    );
    text
}

/// One series of the admin listener's `/metrics` (0 when absent).
async fn metric(admin: SocketAddr, series: &str) -> f64 {
    mpc_gateway::telemetry::sample(&admin_metrics(admin).await, series).unwrap_or(0.0)
}

/// When the (first) certificate in `pem` expires, in Unix seconds, as the metric has it.
fn not_after(pem: &str) -> f64 {
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).expect("PEM");
    let cert = pem.parse_x509().expect("certificate");
    cert.validity().not_after.timestamp() as f64
}

fn der_certs(pem: &str) -> Vec<CertificateDer<'static>> {
    rustls_pemfile::certs(&mut pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .expect("certs")
}

fn der_key(pem: &str) -> PrivateKeyDer<'static> {
    rustls_pemfile::private_key(&mut pem.as_bytes())
        .expect("pem")
        .expect("key")
}

/// A TLS client trusting `ca_pem`, presenting `client` when given.
fn client_config(ca_pem: &str, client: Option<&IssuedCert>) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in der_certs(ca_pem) {
        roots.add(cert).expect("root");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots);
    let config = match client {
        Some(cert) => builder
            .with_client_auth_cert(der_certs(&cert.cert_pem), der_key(&cert.key_pem))
            .expect("client cert"),
        None => builder.with_no_client_auth(),
    };
    Arc::new(config)
}

/// A TLS client limited to `version`, presenting `client`, that keeps the sessions its
/// servers offer (in memory, as rustls does by default) and offers them again.
fn resuming_client_config(
    ca_pem: &str,
    client: &IssuedCert,
    version: &'static rustls::SupportedProtocolVersion,
) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in der_certs(ca_pem) {
        roots.add(cert).expect("root");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[version])
        .expect("version")
        .with_root_certificates(roots)
        .with_client_auth_cert(der_certs(&client.cert_pem), der_key(&client.key_pem))
        .expect("client cert");
    config.resumption = rustls::client::Resumption::in_memory_sessions(16);
    Arc::new(config)
}

struct Answer {
    status: u16,
    headers: http::HeaderMap,
    /// SHA-256 (hex) of the certificate the listener presented.
    server_cert_fp: String,
    /// Whether the TLS handshake was full or resumed a session.
    handshake: Option<HandshakeKind>,
}

/// Connects over TLS and ends `name`; `Err` when the handshake or the exchange fails.
async fn end_over_tls(
    gateway: &MtlsGateway,
    config: Arc<rustls::ClientConfig>,
    name: &str,
    bearer: Option<&str>,
) -> Result<Answer, String> {
    end_at(gateway.addr(), config, name, bearer).await
}

/// [`end_over_tls`] to any listener address.
async fn end_at(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    name: &str,
    bearer: Option<&str>,
) -> Result<Answer, String> {
    let authorization = bearer.map(|token| format!("Bearer {token}"));
    let headers: Vec<(&str, &str)> = authorization
        .iter()
        .map(|value| ("authorization", value.as_str()))
        .collect();
    let path = format!("/mpc/{name}/end");
    tls_request(addr, config, Method::POST, &path, &headers).await
}

/// Connects over TLS and sends one request without a body.
async fn send_over_tls(
    gateway: &MtlsGateway,
    config: Arc<rustls::ClientConfig>,
    method: Method,
    path: &str,
    authorization: Option<String>,
) -> Result<Answer, String> {
    let headers: Vec<(&str, &str)> = authorization
        .iter()
        .map(|value| ("authorization", value.as_str()))
        .collect();
    tls_request(gateway.addr(), config, method, path, &headers).await
}

/// Connects to `addr` over TLS (as `localhost`) and sends one request without a body,
/// with `headers` as given; every step is bounded in time.
async fn tls_request(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<Answer, String> {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let connector = tokio_rustls::TlsConnector::from(config);
    let server_name = ServerName::try_from("localhost").expect("name");
    let tls = tokio::time::timeout(Duration::from_secs(5), connector.connect(server_name, tcp))
        .await
        .map_err(|_| "handshake timed out".to_owned())?
        .map_err(|e| format!("handshake: {}", with_causes(&e)))?;
    let server_cert_fp = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .map(|cert| hex::encode(Sha256::digest(cert.as_ref())))
        .unwrap_or_default();
    let handshake = tls.get_ref().1.handshake_kind();
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(tls))
            .await
            .map_err(|e| format!("http handshake: {}", with_causes(&e)))?;
    let connection = tokio::spawn(connection);
    let mut request = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "localhost");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request.body(Empty::new()).expect("request");
    let response =
        match tokio::time::timeout(Duration::from_secs(5), sender.send_request(request)).await {
            Err(_) => return Err("no answer".to_owned()),
            Ok(Ok(response)) => response,
            Ok(Err(err)) => {
                // What ended the connection (e.g. the server's TLS alert) is the connection
                // task's error; the request may only see that it was cancelled.
                let ended = match tokio::time::timeout(Duration::from_secs(5), connection).await {
                    Ok(Ok(Err(cause))) => with_causes(&cause),
                    Ok(Ok(Ok(()))) => "closed".to_owned(),
                    Ok(Err(panicked)) => panicked.to_string(),
                    Err(_) => "still open".to_owned(),
                };
                return Err(format!(
                    "request: {}; connection: {ended}",
                    with_causes(&err)
                ));
            }
        };
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let _ = tokio::time::timeout(Duration::from_secs(5), response.into_body().collect()).await;
    Ok(Answer {
        status,
        headers,
        server_cert_fp,
        handshake,
    })
}

/// `err` and its sources as one line: hyper's own message ("connection error") leaves
/// out the TLS alert that caused it.
fn with_causes(err: &(dyn std::error::Error + 'static)) -> String {
    let mut line = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        line.push_str(": ");
        line.push_str(&cause.to_string());
        source = cause.source();
    }
    line
}

/// Asserts that the gateway refused the TLS handshake of `outcome` with the fatal
/// `alert` (rustls's name for it). With TLS 1.3 the client's side of the handshake is
/// done before the server has checked the client's certificate, so the alert can surface
/// on the request or its connection instead of in `connect`: any step's error may carry
/// it. The alert tells the refusals apart: `CertificateExpired`, `CertificateRequired`,
/// and `DecryptError` for another CA's certificate (every test CA has the same name, so
/// the chain is built to the trusted CA and its signature does not verify).
fn assert_handshake_refused(outcome: Result<Answer, String>, alert: &str, what: &str) {
    match outcome {
        Ok(answer) => panic!("{what}: served, status {}", answer.status),
        Err(err) => assert!(
            err.contains(&format!("received fatal alert: {alert}")),
            "{what}: not a TLS handshake refused with {alert}: {err}"
        ),
    }
}

/// The data listener's refused handshakes, as the admin listener counts them.
const TLS_REJECTED: &str = "mpc_gateway_http_rejected_total{kind=\"tls-handshake\"}";

/// Waits (at most 5 s) until `TLS_REJECTED` reaches `count`: the gateway counts a refusal
/// after sending its alert, so the client may see the alert first.
async fn assert_handshakes_refused(admin: SocketAddr, count: f64) {
    let reached = common::eventually_async(Duration::from_secs(5), || async {
        metric(admin, TLS_REJECTED).await == count
    })
    .await;
    assert!(
        reached,
        "{count} refused handshakes counted, not {}",
        metric(admin, TLS_REJECTED).await
    );
}

/// SHA-256 (hex) of the first certificate in `pem`, as [`Answer::server_cert_fp`].
fn full_fingerprint(pem: &str) -> String {
    hex::encode(Sha256::digest(der_certs(pem)[0].as_ref()))
}

fn fingerprint(cert: &IssuedCert) -> String {
    hex::encode(&Sha256::digest(der_certs(&cert.cert_pem)[0].as_ref())[..6])
}

/// The main mTLS path: the certificate authenticates billing, and what reaches Plivo is
/// the contract's DELETE with the account's Basic credentials and nothing of the caller's
/// (its headers, its request id, its certificate's identity).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_authenticates_its_tenant() {
    let g = MtlsGateway::start(false).await;
    let cert = g.pki.issue_client_cert(&[BILLING_SAN]).expect("cert");
    let config = client_config(&g.pki.ca_cert_pem, Some(&cert));
    let mut headers = vec![("x-request-id", "mtls-caller-req-1")];
    headers.extend(LEAKY_HEADERS);
    let answer = tls_request(
        g.addr(),
        Arc::clone(&config),
        Method::POST,
        "/mpc/billing-1/end",
        &headers,
    )
    .await
    .expect("served");
    assert_eq!(answer.status, 204);
    assert_eq!(
        answer
            .headers
            .get("x-request-id")
            .and_then(|v| v.to_str().ok()),
        Some("mtls-caller-req-1")
    );
    let records = g.audit();
    assert_eq!(records.len(), 2, "forward and result: {records:?}");
    assert_eq!(records[0]["event"], "forward");
    let record = &records[1];
    assert_eq!(record["event"], "result");
    assert_eq!(record["request_id"], "mtls-caller-req-1");
    assert_eq!(record["tenant"], "billing");
    assert_eq!(record["token_fp"], fingerprint(&cert));

    let upstream = g.sim.requests();
    assert_eq!(upstream.len(), 1, "{upstream:?}");
    assert_contract_upstream_request(&upstream[0], "billing-1");
    let all_headers = format!("{:?}", upstream[0].headers);
    let cert_fp = fingerprint(&cert);
    for private in [BILLING_SAN, cert_fp.as_str(), "mtls-caller-req-1"] {
        assert!(!all_headers.contains(private), "{private} leaked upstream");
    }

    // The same tenant's token alongside is fine; another tenant's token is not.
    let same = end_over_tls(&g, Arc::clone(&config), "billing-2", Some(BILLING_TOKEN)).await;
    assert_eq!(same.expect("served").status, 204);
    let upstream = g.sim.requests();
    assert_eq!(upstream.len(), 2, "{upstream:?}");
    assert_contract_upstream_request(&upstream[1], "billing-2");
    let mixed = end_over_tls(&g, Arc::clone(&config), "billing-3", Some(OPS_TOKEN)).await;
    assert_eq!(mixed.expect("served").status, 401);
    let record = g.audit().pop().expect("record");
    assert_eq!(record["tenant"], serde_json::Value::Null);
    assert_eq!(record["reason"], "unauthenticated");
    assert_eq!(g.sim.requests().len(), 2, "a 401 is not forwarded");
    // Two tokens, one of them not billing's, cannot be checked against the certificate.
    let two_tokens = [
        ("authorization", format!("Bearer {BILLING_TOKEN}")),
        ("authorization", format!("Bearer {OPS_TOKEN}")),
    ];
    let two_tokens: Vec<(&str, &str)> = two_tokens.iter().map(|(n, v)| (*n, v.as_str())).collect();
    let answer = tls_request(
        g.addr(),
        config,
        Method::POST,
        "/mpc/billing-4/end",
        &two_tokens,
    )
    .await
    .expect("served");
    assert_eq!(answer.status, 401);
    let record = g.audit().pop().expect("record");
    assert_eq!(record["reason"], "unauthenticated");
    assert_eq!(
        record["token_fp"],
        fingerprint(&cert),
        "known by its certificate"
    );
    assert_eq!(g.sim.requests().len(), 2, "a 401 is not forwarded");
    g.gateway.shutdown().await.expect("shutdown");
}

/// The last record is the `denied` 401 that `answer` got for `path`: no tenant, the
/// presented certificate's fingerprint (`token_fp`), its request id.
fn assert_refused_before_auth(g: &MtlsGateway, answer: &Answer, path: &str, token_fp: &str) {
    assert_eq!(
        answer
            .headers
            .get("www-authenticate")
            .and_then(|v| v.to_str().ok()),
        Some("Bearer")
    );
    let record = g.audit().pop().expect("record");
    assert_eq!(record["event"], "denied", "{record}");
    assert_eq!(record["status"], 401, "{record}");
    assert_eq!(record["reason"], "unauthenticated", "{record}");
    assert_eq!(record["tenant"], serde_json::Value::Null, "{record}");
    assert_eq!(record["mpc"], serde_json::Value::Null, "{record}");
    assert_eq!(record["path"], path, "{record}");
    assert_eq!(record["token_fp"], token_fp, "{record}");
    assert_eq!(
        record["request_id"].as_str(),
        answer
            .headers
            .get("x-request-id")
            .and_then(|v| v.to_str().ok()),
        "{record}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_without_tokens_is_served_by_its_certificate_alone() {
    let g = MtlsGateway::start(false).await;
    let cert = g.pki.issue_client_cert(&[ROBOT_SAN]).expect("cert");
    let config = client_config(&g.pki.ca_cert_pem, Some(&cert));
    let answer = end_over_tls(&g, Arc::clone(&config), "robot-1", None).await;
    assert_eq!(answer.expect("served").status, 204);
    let record = g.audit().pop().expect("record");
    assert_eq!(record["tenant"], "robot");
    assert_eq!(record["token_fp"], fingerprint(&cert));
    assert_eq!(g.sim.requests().len(), 1);
    // Another tenant's token alongside its certificate is refused.
    let mixed = end_over_tls(&g, config, "robot-2", Some(BILLING_TOKEN)).await;
    let mixed = mixed.expect("served");
    assert_eq!(mixed.status, 401);
    assert_refused_before_auth(&g, &mixed, "/mpc/robot-2/end", &fingerprint(&cert));
    assert_eq!(g.sim.requests().len(), 1, "a 401 is not forwarded");
    // Without the tenant's certificate it has no way in: a valid certificate from the
    // same CA whose SAN belongs to no tenant authenticates nobody, and this tenant has
    // no token to send instead.
    let stranger = g
        .pki
        .issue_client_cert(&["spiffe://prod/ns/nobody/sa/unknown"])
        .expect("cert");
    let as_stranger = client_config(&g.pki.ca_cert_pem, Some(&stranger));
    let refused = end_over_tls(&g, as_stranger, "robot-3", None).await;
    let refused = refused.expect("the handshake succeeds: the certificate is valid");
    assert_eq!(refused.status, 401);
    assert_refused_before_auth(&g, &refused, "/mpc/robot-3/end", &fingerprint(&stranger));
    // Nor with no certificate at all.
    let anonymous = client_config(&g.pki.ca_cert_pem, None);
    let refused = end_over_tls(&g, anonymous, "robot-4", None).await;
    let refused = refused.expect("served");
    assert_eq!(refused.status, 401);
    let record = g.audit().pop().expect("record");
    assert_eq!(record["event"], "denied");
    assert_eq!(record["path"], "/mpc/robot-4/end");
    assert_eq!(record["token_fp"], serde_json::Value::Null, "no credential");
    assert_eq!(g.sim.requests().len(), 1, "none of the 401s was forwarded");
    g.gateway.shutdown().await.expect("shutdown");
}

/// On the Plivo-compatible route the SDK always sends Basic credentials; with a client
/// certificate that names a tenant they must belong to that tenant, and the certificate's
/// fingerprint is what the audit records, as on the native route.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_the_sdk_route_a_certificate_must_name_the_tenant_of_the_basic_credentials() {
    let g = MtlsGateway::start(false).await;
    let path =
        |name: &str| format!("/v1/Account/{BILLING_SDK_AUTH_ID}/MultiPartyCall/name_{name}/");
    let basic = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD
            .encode(format!("{BILLING_SDK_AUTH_ID}:{BILLING_TOKEN}"))
    );
    let billing = g.pki.issue_client_cert(&[BILLING_SAN]).expect("cert");
    let as_billing = client_config(&g.pki.ca_cert_pem, Some(&billing));
    let same = send_over_tls(
        &g,
        as_billing,
        Method::DELETE,
        &path("billing-1"),
        Some(basic.clone()),
    )
    .await;
    assert_eq!(same.expect("served").status, 204);
    let record = g.audit().pop().expect("record");
    assert_eq!(record["tenant"], "billing");
    assert_eq!(record["token_fp"], fingerprint(&billing));

    let robot = g.pki.issue_client_cert(&[ROBOT_SAN]).expect("cert");
    let as_robot = client_config(&g.pki.ca_cert_pem, Some(&robot));
    let mixed = send_over_tls(
        &g,
        as_robot,
        Method::DELETE,
        &path("billing-2"),
        Some(basic.clone()),
    )
    .await;
    assert_eq!(mixed.expect("served").status, 401);
    let record = g.audit().pop().expect("record");
    assert_eq!(record["tenant"], serde_json::Value::Null);
    assert_eq!(record["token_fp"], fingerprint(&robot));

    // Without a certificate the Basic credentials decide, as before.
    let anonymous = client_config(&g.pki.ca_cert_pem, None);
    let plain = send_over_tls(
        &g,
        anonymous,
        Method::DELETE,
        &path("billing-3"),
        Some(basic),
    )
    .await;
    assert_eq!(plain.expect("served").status, 204);
    assert_eq!(
        g.audit().pop().expect("record")["token_fp"],
        &token_hash(BILLING_TOKEN)[7..19]
    );
    g.gateway.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_san_authenticates_nobody_but_a_token_still_can() {
    let g = MtlsGateway::start(false).await;
    let cert = g
        .pki
        .issue_client_cert(&["spiffe://prod/ns/other/sa/x"])
        .expect("cert");
    let config = client_config(&g.pki.ca_cert_pem, Some(&cert));
    let anonymous = end_over_tls(&g, Arc::clone(&config), "billing-1", None).await;
    assert_eq!(anonymous.expect("served").status, 401);
    // Known by its certificate all the same (DESIGN §7: with mTLS, `token_fp` is the
    // certificate's), so ops can find the client.
    let denied = g.audit().pop().expect("record");
    assert_eq!(denied["event"], "denied");
    assert_eq!(denied["tenant"], serde_json::Value::Null);
    assert_eq!(denied["token_fp"], fingerprint(&cert));
    let with_token = end_over_tls(&g, config, "billing-1", Some(OPS_TOKEN)).await;
    assert_eq!(with_token.expect("served").status, 204);
    let record = g.audit().pop().expect("record");
    assert_eq!(record["tenant"], "ops");
    assert_eq!(record["token_fp"], &token_hash(OPS_TOKEN)[7..19]);
    g.gateway.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_from_another_ca_or_expired_are_refused_at_the_handshake() {
    let g = MtlsGateway::start(false).await;
    let admin = g.gateway.admin_addr();
    let stranger = generate_pki(&["localhost"]).expect("other ca");
    let foreign = stranger.issue_client_cert(&[BILLING_SAN]).expect("cert");
    let refused = end_over_tls(
        &g,
        client_config(&g.pki.ca_cert_pem, Some(&foreign)),
        "billing-1",
        None,
    )
    .await;
    assert_handshake_refused(refused, "DecryptError", "a certificate from another CA");

    let expired = g
        .pki
        .issue_expired_client_cert(&[BILLING_SAN])
        .expect("cert");
    let refused = end_over_tls(
        &g,
        client_config(&g.pki.ca_cert_pem, Some(&expired)),
        "billing-1",
        None,
    )
    .await;
    assert_handshake_refused(refused, "CertificateExpired", "an expired certificate");
    assert!(g.audit().is_empty(), "nothing reached the request path");
    assert_handshakes_refused(admin, 2.0).await;

    // The listener still serves a valid certificate.
    let valid = g.pki.issue_client_cert(&[BILLING_SAN]).expect("cert");
    let served = end_over_tls(
        &g,
        client_config(&g.pki.ca_cert_pem, Some(&valid)),
        "billing-1",
        None,
    )
    .await;
    assert_eq!(served.expect("served").status, 204);
    g.gateway.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_client_certificate_bearer_works_unless_one_is_required() {
    let optional = MtlsGateway::start(false).await;
    let config = client_config(&optional.pki.ca_cert_pem, None);
    let answer = end_over_tls(&optional, config, "billing-1", Some(BILLING_TOKEN)).await;
    assert_eq!(answer.expect("served").status, 204);
    optional.gateway.shutdown().await.expect("shutdown");

    let required = MtlsGateway::start(true).await;
    let config = client_config(&required.pki.ca_cert_pem, None);
    let refused = end_over_tls(&required, config, "billing-1", Some(BILLING_TOKEN)).await;
    assert_handshake_refused(
        refused,
        "CertificateRequired",
        "no client certificate with require_client_cert",
    );
    assert!(required.audit().is_empty());
    assert_handshakes_refused(required.gateway.admin_addr(), 1.0).await;

    // A certificate is all it takes: the listener still serves.
    let cert = required
        .pki
        .issue_client_cert(&[BILLING_SAN])
        .expect("cert");
    let config = client_config(&required.pki.ca_cert_pem, Some(&cert));
    let served = end_over_tls(&required, config, "billing-1", Some(BILLING_TOKEN)).await;
    assert_eq!(served.expect("served with a certificate").status, 204);
    required.gateway.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_server_certificate_is_served_to_new_connections_after_reload() {
    let g = MtlsGateway::start(false).await;
    let admin = g.gateway.admin_addr();
    let expiry = "mpc_gateway_tls_certificate_expiry_timestamp_seconds{listener=\"data\"}";
    assert_eq!(
        metric(admin, expiry).await,
        not_after(&g.pki.server_cert_pem)
    );
    let config = client_config(&g.pki.ca_cert_pem, None);
    let before = end_over_tls(&g, Arc::clone(&config), "billing-1", Some(BILLING_TOKEN))
        .await
        .expect("served");
    assert_eq!(
        before.server_cert_fp,
        full_fingerprint(&g.pki.server_cert_pem)
    );
    // The new certificate expires in 30 days, the old one later: the metric follows.
    let mut spec = LeafSpec::server(&["localhost", "127.0.0.1"]);
    spec.not_after = time::OffsetDateTime::now_utc() + time::Duration::days(30);
    let rotated = g.pki.issue(&spec).expect("cert");
    assert!(not_after(&rotated.cert_pem) < not_after(&g.pki.server_cert_pem));
    g.write_server_pair(&rotated);
    g.gateway.reload_from(&g.config_path).expect("reload");
    let after = end_over_tls(&g, Arc::clone(&config), "billing-2", Some(BILLING_TOKEN))
        .await
        .expect("served");
    assert_eq!(after.status, 204);
    assert_ne!(before.server_cert_fp, after.server_cert_fp);
    assert_eq!(after.server_cert_fp, full_fingerprint(&rotated.cert_pem));
    assert_eq!(metric(admin, expiry).await, not_after(&rotated.cert_pem));

    // A key that does not match the certificate is refused and the old pair stays: a new
    // connection still gets the rotated certificate and is served.
    write(g.dir.path(), "server-key.pem", &g.pki.server_key_pem);
    assert!(g.gateway.reload_from(&g.config_path).is_err());
    assert_eq!(metric(admin, expiry).await, not_after(&rotated.cert_pem));
    let errors = "mpc_gateway_config_reloads_total{result=\"error\"}";
    assert_eq!(metric(admin, errors).await, 1.0);
    let kept = end_over_tls(&g, config, "billing-3", Some(BILLING_TOKEN))
        .await
        .expect("served with the pair that was running");
    assert_eq!(kept.status, 204);
    assert_eq!(kept.server_cert_fp, full_fingerprint(&rotated.cert_pem));
    assert_eq!(g.sim.requests().len(), 3);
    g.gateway.shutdown().await.expect("shutdown");
}

/// Client-CA rotation as an operator does it: first a bundle of the old and the new CA,
/// then the new CA alone. Each reload applies to new connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_client_ca_decides_which_certificates_new_connections_may_present() {
    let g = MtlsGateway::start(false).await;
    let next = generate_pki(&["localhost"]).expect("next ca");
    let old_cert = g.pki.issue_client_cert(&[BILLING_SAN]).expect("cert");
    let new_cert = next.issue_client_cert(&[BILLING_SAN]).expect("cert");
    let as_old = client_config(&g.pki.ca_cert_pem, Some(&old_cert));
    let as_new = client_config(&g.pki.ca_cert_pem, Some(&new_cert));

    // Before: only the old CA is trusted.
    let served = end_over_tls(&g, Arc::clone(&as_old), "billing-1", None).await;
    assert_eq!(served.expect("old CA trusted").status, 204);
    let refused = end_over_tls(&g, Arc::clone(&as_new), "billing-2", None).await;
    assert_handshake_refused(refused, "DecryptError", "the new CA, not trusted yet");
    let admin = g.gateway.admin_addr();
    assert_handshakes_refused(admin, 1.0).await;

    // Both CAs in the file: both certificates are accepted.
    g.write_client_ca(&format!("{}{}", g.pki.ca_cert_pem, next.ca_cert_pem));
    g.gateway.reload_from(&g.config_path).expect("reload");
    let served = end_over_tls(&g, Arc::clone(&as_old), "billing-3", None).await;
    assert_eq!(served.expect("old CA still trusted").status, 204);
    let served = end_over_tls(&g, Arc::clone(&as_new), "billing-4", None).await;
    assert_eq!(served.expect("new CA trusted").status, 204);
    let record = g.audit().pop().expect("record");
    assert_eq!(record["tenant"], "billing");
    assert_eq!(record["token_fp"], fingerprint(&new_cert));

    // The new CA alone: the old CA's certificate is refused at the handshake.
    g.write_client_ca(&next.ca_cert_pem);
    g.gateway.reload_from(&g.config_path).expect("reload");
    let audited = g.audit().len();
    let refused = end_over_tls(&g, Arc::clone(&as_old), "billing-5", None).await;
    assert_handshake_refused(refused, "DecryptError", "the old CA, no longer trusted");
    assert_eq!(
        g.audit().len(),
        audited,
        "a refused handshake is not audited"
    );
    assert_handshakes_refused(admin, 2.0).await;
    let served = end_over_tls(&g, as_new, "billing-6", None).await;
    assert_eq!(served.expect("new CA trusted").status, 204);
    let record = g.audit().pop().expect("record");
    assert_eq!(record["mpc"], "billing-6");
    assert_eq!(record["token_fp"], fingerprint(&new_cert));
    let ended: Vec<String> = g.sim.requests().into_iter().map(|r| r.target).collect();
    assert_eq!(ended.len(), 4, "billing-1, -3, -4 and -6 only: {ended:?}");
    assert!(ended[3].ends_with("/name_billing-6/"), "{ended:?}");
    g.gateway.shutdown().await.expect("shutdown");
}

/// A kept-alive TLS connection: `version` by ALPN, its sender, and the task that drives
/// it (which ends when the gateway closes the connection).
struct KeptConnection {
    send: KeptSender,
    driver: tokio::task::JoinHandle<()>,
}

enum KeptSender {
    Http1(hyper::client::conn::http1::SendRequest<Empty<Bytes>>),
    Http2(hyper::client::conn::http2::SendRequest<Empty<Bytes>>),
}

impl KeptConnection {
    async fn open(addr: SocketAddr, config: &rustls::ClientConfig, http2: bool) -> KeptConnection {
        let mut config = config.clone();
        config.alpn_protocols = vec![if http2 {
            b"h2".to_vec()
        } else {
            b"http/1.1".to_vec()
        }];
        let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let server_name = ServerName::try_from("localhost").expect("name");
        let tls = tokio::time::timeout(Duration::from_secs(5), connector.connect(server_name, tcp))
            .await
            .expect("handshake within 5 s")
            .expect("handshake");
        let io = TokioIo::new(tls);
        if http2 {
            let (sender, connection) =
                hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
                    .await
                    .expect("h2 handshake");
            KeptConnection {
                send: KeptSender::Http2(sender),
                driver: tokio::spawn(async move {
                    let _ = connection.await;
                }),
            }
        } else {
            let (sender, connection) = hyper::client::conn::http1::handshake(io)
                .await
                .expect("http/1.1 handshake");
            KeptConnection {
                send: KeptSender::Http1(sender),
                driver: tokio::spawn(async move {
                    let _ = connection.await;
                }),
            }
        }
    }

    /// Ends `name` on this connection (certificate only, no token); its status.
    async fn end(&mut self, name: &str) -> u16 {
        let request = Request::post(format!("/mpc/{name}/end"))
            .header("host", "localhost")
            .body(Empty::new())
            .expect("request");
        let sent = async {
            match &mut self.send {
                KeptSender::Http1(sender) => sender.send_request(request).await,
                KeptSender::Http2(sender) => sender.send_request(request).await,
            }
        };
        let response = tokio::time::timeout(Duration::from_secs(5), sent)
            .await
            .expect("answered within 5 s")
            .expect("answered");
        let status = response.status().as_u16();
        let _ = response.into_body().collect().await;
        status
    }

    /// Whether the gateway closed the connection within `within`.
    async fn closed_within(&mut self, within: Duration) -> bool {
        tokio::time::timeout(within, &mut self.driver).await.is_ok()
    }
}

/// A reload that changes the client CAs also ends the connections whose handshake the
/// old CAs accepted: each finishes what it serves and closes, over HTTP/1.1 and over
/// HTTP/2, so a revoked CA authenticates nothing more, however long its clients keep
/// their connections. A reload that leaves the CAs alone keeps every connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_replaces_the_client_ca_closes_the_connections_it_authenticated() {
    let g = MtlsGateway::start(false).await;
    let old_cert = g.pki.issue_client_cert(&[BILLING_SAN]).expect("cert");
    let as_old = client_config(&g.pki.ca_cert_pem, Some(&old_cert));
    let mut http1 = KeptConnection::open(g.addr(), &as_old, false).await;
    let mut http2 = KeptConnection::open(g.addr(), &as_old, true).await;
    assert_eq!(http1.end("billing-1").await, 204);
    assert_eq!(http2.end("billing-2").await, 204);

    // Another change (a tenant's allow list): the connections stay and keep serving.
    let yaml = std::fs::read_to_string(&g.config_path).expect("config");
    let widened = yaml.replace(r#"allow: ["billing-*"]"#, r#"allow: ["billing-*", "x-*"]"#);
    assert_ne!(widened, yaml, "the allow list is in the config");
    write(g.dir.path(), "gateway.yaml", &widened);
    g.gateway.reload_from(&g.config_path).expect("reload");
    assert!(
        !http1.closed_within(Duration::from_millis(300)).await,
        "kept"
    );
    assert_eq!(http1.end("billing-3").await, 204);
    assert_eq!(http2.end("billing-4").await, 204);

    // The old CA is replaced: both connections are closed.
    let next = generate_pki(&["localhost"]).expect("next ca");
    g.write_client_ca(&next.ca_cert_pem);
    g.gateway.reload_from(&g.config_path).expect("reload");
    assert!(
        http1.closed_within(Duration::from_secs(5)).await,
        "HTTP/1.1 closed"
    );
    assert!(
        http2.closed_within(Duration::from_secs(5)).await,
        "HTTP/2 closed"
    );
    let ended = g.sim.requests().len();
    assert_eq!(ended, 4, "billing-1 to -4");
    // A new connection with the old CA's certificate is refused at the handshake.
    let refused = end_over_tls(&g, as_old, "billing-5", None).await;
    assert_handshake_refused(refused, "DecryptError", "the old CA, no longer trusted");
    assert_eq!(g.sim.requests().len(), ended);
    g.gateway.shutdown().await.expect("shutdown");
}

/// A connection whose handshake the old CAs accepted but that has not sent its first
/// request yet when the CAs are replaced (its client sent it while the reload ran) gets
/// that request served and answered, then is closed: closing it at once dropped the
/// request unanswered, an empty reply its caller could not tell from a lost answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_superseded_before_its_first_request_still_answers_it() {
    let g = MtlsGateway::start(false).await;
    let cert = g.pki.issue_client_cert(&[BILLING_SAN]).expect("cert");
    let config = client_config(&g.pki.ca_cert_pem, Some(&cert));
    let mut http1 = KeptConnection::open(g.addr(), &config, false).await;
    let mut http2 = KeptConnection::open(g.addr(), &config, true).await;

    let next = generate_pki(&["localhost"]).expect("next ca");
    g.write_client_ca(&next.ca_cert_pem);
    g.gateway.reload_from(&g.config_path).expect("reload");
    tokio::time::sleep(Duration::from_millis(200)).await;

    assert_eq!(http1.end("billing-first-1").await, 204);
    assert_eq!(http2.end("billing-first-2").await, 204);
    assert!(
        http1.closed_within(Duration::from_secs(5)).await,
        "HTTP/1.1 closed after its first answer"
    );
    assert!(
        http2.closed_within(Duration::from_secs(5)).await,
        "HTTP/2 closed after its first answer"
    );
    assert_eq!(g.sim.requests().len(), 2);
    g.gateway.shutdown().await.expect("shutdown");
}

/// `client_cert_sans` matches URI and DNS SANs (section 7). A DNS SAN names its tenant;
/// an unlisted DNS name, an IP SAN (not a kind the contract matches; listing one is a
/// config error) and a certificate whose URI and DNS SANs name two tenants authenticate
/// nobody.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dns_san_authenticates_its_tenant_and_other_sans_do_not() {
    let g = MtlsGateway::start(false).await;
    let ca = &g.pki.ca_cert_pem;
    let dns = g.pki.issue_client_cert(&[REPORTS_DNS_SAN]).expect("cert");
    let answer = end_over_tls(&g, client_config(ca, Some(&dns)), "reports-1", None).await;
    assert_eq!(answer.expect("served").status, 204);
    let record = g.audit().pop().expect("record");
    assert_eq!(record["event"], "result");
    assert_eq!(record["tenant"], "reports");
    assert_eq!(record["token_fp"], fingerprint(&dns));
    let upstream = g.sim.requests();
    assert_eq!(upstream.len(), 1);
    assert_contract_upstream_request(&upstream[0], "reports-1");

    let refused_as = |sans: &[&str]| g.pki.issue_client_cert(sans).expect("cert");
    for (what, cert) in [
        ("an unlisted DNS SAN", refused_as(&["billing.internal"])),
        (
            "a URI SAN spelling the DNS name",
            refused_as(&["dns://reports.internal"]),
        ),
        ("an IP SAN", refused_as(&["10.9.8.7"])),
        (
            "SANs of two tenants",
            refused_as(&[BILLING_SAN, REPORTS_DNS_SAN]),
        ),
    ] {
        let answer = end_over_tls(&g, client_config(ca, Some(&cert)), "reports-2", None).await;
        assert_eq!(answer.expect("served").status, 401, "{what}");
        let record = g.audit().pop().expect("record");
        assert_eq!(record["event"], "denied", "{what}");
        assert_eq!(record["tenant"], serde_json::Value::Null, "{what}");
        assert_eq!(record["reason"], "unauthenticated", "{what}");
        assert_eq!(record["token_fp"], fingerprint(&cert), "{what}");
    }
    assert_eq!(g.sim.requests().len(), 1, "no refused request is forwarded");
    g.gateway.shutdown().await.expect("shutdown");
}

/// DNS names do not depend on case (RFC 4343): a certificate whose DNS SAN is spelt in
/// upper case authenticates the tenant that lists it in lower case. A URI SAN (a SPIFFE
/// ID) is matched exactly, case included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dns_san_matches_in_any_case_and_a_uri_san_only_exactly() {
    let g = MtlsGateway::start(false).await;
    let ca = &g.pki.ca_cert_pem;
    let upper = g
        .pki
        .issue_client_cert(&["REPORTS.Internal"])
        .expect("cert");
    let answer = end_over_tls(&g, client_config(ca, Some(&upper)), "reports-1", None).await;
    assert_eq!(answer.expect("served").status, 204);
    let record = g.audit().pop().expect("record");
    assert_eq!(record["event"], "result");
    assert_eq!(record["tenant"], "reports");
    assert_eq!(record["token_fp"], fingerprint(&upper));

    let uri = BILLING_SAN.replace("billing", "BILLING");
    let other_case = g.pki.issue_client_cert(&[&uri]).expect("cert");
    let answer = end_over_tls(&g, client_config(ca, Some(&other_case)), "billing-1", None).await;
    assert_eq!(answer.expect("served").status, 401);
    let record = g.audit().pop().expect("record");
    assert_eq!(record["event"], "denied");
    assert_eq!(record["tenant"], serde_json::Value::Null);
    assert_eq!(g.sim.requests().len(), 1, "reports-1 only");
    g.gateway.shutdown().await.expect("shutdown");
}

/// While client certificates are verified no TLS session is resumed, with TLS 1.2
/// (session ids) or TLS 1.3 (tickets): a resumed session skips the certificate check and
/// carries the first handshake's identity on, past the certificate's expiry or to a
/// client that never held it. A client that keeps sessions makes a full handshake, and
/// presents its certificate, on every connection. The same client does resume with a
/// server that allows it (the TLS simulator), so the check is not vacuous.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_session_is_resumed_while_client_certificates_are_verified() {
    let g = MtlsGateway::start(false).await;
    let cert = g.pki.issue_client_cert(&[BILLING_SAN]).expect("cert");
    let versions = [
        ("tls12", &rustls::version::TLS12),
        ("tls13", &rustls::version::TLS13),
    ];
    for (label, version) in versions {
        let config = resuming_client_config(&g.pki.ca_cert_pem, &cert, version);
        for connection in 1..=3 {
            let name = format!("billing-{label}-{connection}");
            let answer = end_over_tls(&g, Arc::clone(&config), &name, None)
                .await
                .expect("served");
            assert_eq!(answer.status, 204, "{name}");
            assert_eq!(
                answer.handshake,
                Some(HandshakeKind::Full),
                "{label}: connection {connection} must not resume a session"
            );
            let record = g.audit().pop().expect("record");
            assert_eq!(record["tenant"], "billing", "{name}");
            assert_eq!(record["token_fp"], fingerprint(&cert), "{name}");
        }
        let to_simulator = || {
            let config = Arc::clone(&config);
            tls_request(g.sim.local_addr(), config, Method::GET, "/", &[])
        };
        let first = to_simulator().await.expect("the simulator answers");
        assert_eq!(first.handshake, Some(HandshakeKind::Full), "{label}");
        let second = to_simulator().await.expect("the simulator answers");
        assert_eq!(
            second.handshake,
            Some(HandshakeKind::Resumed),
            "{label}: this client resumes where the server allows it"
        );
    }
    g.gateway.shutdown().await.expect("shutdown");
}

/// Plain HTTP to a `listen_tls` listener fails the TLS handshake: no HTTP answer, the
/// connection is closed, nothing is audited or forwarded (the HTTP layer never parsed a
/// request), and the refusal is counted as `mpc_gateway_http_rejected_total{kind="tls-handshake"}`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_to_the_tls_listener_is_refused_before_any_request() {
    let g = MtlsGateway::start(false).await;
    let admin = g.gateway.admin_addr();
    let rejected = TLS_REJECTED;
    assert_eq!(metric(admin, rejected).await, 0.0);
    let request = format!(
        "POST /mpc/billing-1/end HTTP/1.1\r\nhost: localhost\r\n\
         authorization: Bearer {BILLING_TOKEN}\r\ncontent-length: 0\r\n\r\n"
    );
    let outcome = raw_send(g.addr(), request.as_bytes(), Duration::from_secs(5)).await;
    assert!(
        outcome.closed,
        "the gateway closes the connection: {outcome:?}"
    );
    assert!(
        !outcome.text().contains("HTTP/"),
        "no HTTP answer: {:?}",
        outcome.text()
    );
    // All it gets is one TLS record: a fatal decode_error alert (21 = alert, TLS 1.2
    // record version, 2 bytes: level 2 = fatal, description 50 = decode_error).
    assert_eq!(
        outcome.bytes,
        [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 50],
        "a fatal TLS alert and nothing else"
    );
    assert!(
        g.audit().is_empty(),
        "no request was parsed, so none is audited"
    );
    assert_eq!(g.sim.request_count(), 0, "nothing forwarded");
    assert!(
        common::eventually_async(Duration::from_secs(5), || async {
            metric(admin, rejected).await == 1.0
        })
        .await,
        "the refused handshake is counted"
    );
    let text = admin_metrics(admin).await;
    assert!(
        !text
            .lines()
            .any(|line| line.starts_with("mpc_gateway_requests_total")),
        "no request counted: {text}"
    );

    // The listener still serves TLS.
    let config = client_config(&g.pki.ca_cert_pem, None);
    let answer = end_over_tls(&g, config, "billing-1", Some(BILLING_TOKEN)).await;
    assert_eq!(answer.expect("served").status, 204);
    g.gateway.shutdown().await.expect("shutdown");
}

/// `serve` as a process re-reads the listener's certificate, key and client CA on a real
/// SIGHUP: new connections get the new server certificate and are verified against the
/// new client CA, and the process keeps serving until SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_rereads_the_listener_certificate_and_client_ca_on_sighup() {
    let (dir, pki, sim, config_path) = mtls_setup(true, "  format: json\n  level: info\n").await;
    let mut served = tokio::task::spawn_blocking(move || Served::start(&config_path))
        .await
        .expect("serve started");
    let reloads = |result: &str| format!("mpc_gateway_config_reloads_total{{result=\"{result}\"}}");

    let old_cert = pki.issue_client_cert(&[BILLING_SAN]).expect("cert");
    let as_old = client_config(&pki.ca_cert_pem, Some(&old_cert));
    let before = end_at(served.local, Arc::clone(&as_old), "billing-1", None)
        .await
        .expect("served");
    assert_eq!(before.status, 204);
    assert_eq!(
        before.server_cert_fp,
        full_fingerprint(&pki.server_cert_pem)
    );

    // Rotate the server pair and the client CA on disk, then SIGHUP.
    let rotated = pki
        .issue_server_cert(&["localhost", "127.0.0.1"])
        .expect("cert");
    let next = generate_pki(&["localhost"]).expect("next ca");
    write(dir.path(), "server.pem", &rotated.cert_pem);
    write(dir.path(), "server-key.pem", &rotated.key_pem);
    write(dir.path(), "clients-ca.pem", &next.ca_cert_pem);
    served.signal("HUP");
    let admin = served.admin;
    assert!(
        common::eventually_async(Duration::from_secs(10), || async {
            metric(admin, &reloads("ok")).await >= 1.0
        })
        .await,
        "reload counted; log:\n{}",
        served.log_text()
    );
    assert_eq!(metric(admin, &reloads("error")).await, 0.0);
    assert!(served.is_running(), "SIGHUP does not stop the process");

    let new_cert = next.issue_client_cert(&[BILLING_SAN]).expect("cert");
    let as_new = client_config(&pki.ca_cert_pem, Some(&new_cert));
    let after = end_at(served.local, Arc::clone(&as_new), "billing-2", None)
        .await
        .expect("served with the new client CA");
    assert_eq!(after.status, 204);
    assert_eq!(after.server_cert_fp, full_fingerprint(&rotated.cert_pem));
    let refused = end_at(served.local, as_old, "billing-3", None).await;
    assert_handshake_refused(
        refused,
        "DecryptError",
        "the old client CA, no longer trusted",
    );
    assert_handshakes_refused(admin, 1.0).await;
    // Still serving the new CA's certificate after the refusal.
    let again = end_at(served.local, as_new, "billing-4", None)
        .await
        .expect("served after a refused handshake");
    assert_eq!(again.status, 204);
    assert!(served.is_running());

    served.signal("TERM");
    let status = tokio::task::spawn_blocking(move || {
        let status = served.wait_exit(Duration::from_secs(15));
        (status, served.log_text())
    })
    .await
    .expect("waited");
    assert_eq!(status.0.code(), Some(0), "log:\n{}", status.1);
    let records = read_records(&dir.path().join("audit.jsonl"));
    let results: Vec<_> = records.iter().filter(|r| r["event"] == "result").collect();
    assert_eq!(
        results.len(),
        3,
        "billing-1, billing-2 and billing-4 only: {records:?}"
    );
    assert_eq!(results[0]["token_fp"], fingerprint(&old_cert));
    assert_eq!(results[1]["token_fp"], fingerprint(&new_cert));
    assert_eq!(results[2]["token_fp"], fingerprint(&new_cert));
    assert_eq!(sim.request_count(), 3);
}
