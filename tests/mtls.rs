//! TLS and mTLS on the data listener: tenants identified by client certificate SANs,
//! refused handshakes, Bearer alongside certificates, and server certificate rotation on
//! reload. Certificates are made here with rcgen (through the simulator's test PKI).

use crate::common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use common::{read_records, token_hash, BILLING_TOKEN, OPS_TOKEN};
use http::{Method, Request};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use mpc_gateway::config::Config;
use mpc_gateway::server::{RunningGateway, StartOptions};
use mpc_gateway::simulator::{generate_pki, IssuedCert, Simulator, SimulatorConfig, TestPki};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use sha2::{Digest, Sha256};

const BILLING_SAN: &str = "spiffe://prod/ns/billing/sa/api";
const BILLING_SDK_AUTH_ID: &str = "MABILLING0000000000X";
/// The SAN of a tenant that has no token at all: certificates are its only credential.
const ROBOT_SAN: &str = "spiffe://prod/ns/robot/sa/job";

struct MtlsGateway {
    dir: tempfile::TempDir,
    pki: TestPki,
    _sim: Simulator,
    gateway: RunningGateway,
    config_path: PathBuf,
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write");
    path
}

impl MtlsGateway {
    async fn start(require_client_cert: bool) -> MtlsGateway {
        let dir = tempfile::tempdir().expect("tempdir");
        let pki = generate_pki(&["localhost", "127.0.0.1"]).expect("pki");
        let sim = Simulator::start(SimulatorConfig::new("MAXXXXXXXXXXXXXXXXXX", "sim-token"))
            .await
            .expect("simulator");
        write(dir.path(), "plivo-token", "sim-token");
        write(dir.path(), "server.pem", &pki.server_cert_pem);
        write(dir.path(), "server-key.pem", &pki.server_key_pem);
        write(dir.path(), "clients-ca.pem", &pki.ca_cert_pem);
        let d = dir.path().display();
        let yaml = format!(
            r#"listen: 127.0.0.1:0
admin_listen: 127.0.0.1:0
listen_tls:
  cert_file: "{d}/server.pem"
  key_file: "{d}/server-key.pem"
  client_ca_file: "{d}/clients-ca.pem"
  require_client_cert: {require_client_cert}
accounts:
  default:
    auth_id: MAXXXXXXXXXXXXXXXXXX
    auth_token: {{file: "{d}/plivo-token"}}
upstream:
  base_url: {}
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
audit:
  path: "{d}/audit.jsonl"
  fsync: never
log:
  level: warn
"#,
            sim.base_url(),
            token_hash(BILLING_TOKEN),
            token_hash(OPS_TOKEN),
        );
        let config_path = write(dir.path(), "gateway.yaml", &yaml);
        let config = Config::load(&config_path).expect("valid config");
        let gateway = RunningGateway::start(&config, StartOptions::default())
            .await
            .expect("gateway");
        MtlsGateway {
            dir,
            pki,
            _sim: sim,
            gateway,
            config_path,
        }
    }

    fn audit(&self) -> Vec<serde_json::Value> {
        read_records(&self.dir.path().join("audit.jsonl"))
    }
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

struct Answer {
    status: u16,
    server_cert_fp: String,
}

/// Connects over TLS and ends `name`; `Err` when the handshake or the exchange fails.
async fn end_over_tls(
    gateway: &MtlsGateway,
    config: Arc<rustls::ClientConfig>,
    name: &str,
    bearer: Option<&str>,
) -> Result<Answer, String> {
    let authorization = bearer.map(|token| format!("Bearer {token}"));
    let path = format!("/mpc/{name}/end");
    send_over_tls(gateway, config, Method::POST, &path, authorization).await
}

/// Connects over TLS and sends one request without a body.
async fn send_over_tls(
    gateway: &MtlsGateway,
    config: Arc<rustls::ClientConfig>,
    method: Method,
    path: &str,
    authorization: Option<String>,
) -> Result<Answer, String> {
    let tcp = tokio::net::TcpStream::connect(gateway.gateway.local_addr())
        .await
        .map_err(|e| e.to_string())?;
    let connector = tokio_rustls::TlsConnector::from(config);
    let server_name = ServerName::try_from("localhost").expect("name");
    let tls = tokio::time::timeout(Duration::from_secs(5), connector.connect(server_name, tcp))
        .await
        .map_err(|_| "handshake timed out".to_owned())?
        .map_err(|e| format!("handshake: {e}"))?;
    let server_cert_fp = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .map(|cert| hex::encode(Sha256::digest(cert.as_ref())))
        .unwrap_or_default();
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(tls))
            .await
            .map_err(|e| format!("http handshake: {e}"))?;
    tokio::spawn(connection);
    let mut request = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "localhost");
    if let Some(authorization) = authorization {
        request = request.header("authorization", authorization);
    }
    let request = request.body(Empty::new()).expect("request");
    let response = tokio::time::timeout(Duration::from_secs(5), sender.send_request(request))
        .await
        .map_err(|_| "no answer".to_owned())?
        .map_err(|e| format!("request: {e}"))?;
    let status = response.status().as_u16();
    let _ = response.into_body().collect().await;
    Ok(Answer {
        status,
        server_cert_fp,
    })
}

fn fingerprint(cert: &IssuedCert) -> String {
    hex::encode(&Sha256::digest(der_certs(&cert.cert_pem)[0].as_ref())[..6])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_authenticates_its_tenant() {
    let g = MtlsGateway::start(false).await;
    let cert = g.pki.issue_client_cert(&[BILLING_SAN]).expect("cert");
    let config = client_config(&g.pki.ca_cert_pem, Some(&cert));
    let answer = end_over_tls(&g, Arc::clone(&config), "billing-1", None)
        .await
        .expect("served");
    assert_eq!(answer.status, 204);
    let record = g.audit().pop().expect("record");
    assert_eq!(record["tenant"], "billing");
    assert_eq!(record["token_fp"], fingerprint(&cert));

    // The same tenant's token alongside is fine; another tenant's token is not.
    let same = end_over_tls(&g, Arc::clone(&config), "billing-2", Some(BILLING_TOKEN)).await;
    assert_eq!(same.expect("served").status, 204);
    let mixed = end_over_tls(&g, config, "billing-3", Some(OPS_TOKEN)).await;
    assert_eq!(mixed.expect("served").status, 401);
    let record = g.audit().pop().expect("record");
    assert_eq!(record["tenant"], serde_json::Value::Null);
    assert_eq!(record["reason"], "unauthenticated");
    g.gateway.shutdown().await.expect("shutdown");
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
    // Another tenant's token alongside its certificate is refused.
    let mixed = end_over_tls(&g, config, "robot-2", Some(BILLING_TOKEN)).await;
    assert_eq!(mixed.expect("served").status, 401);
    // Without the certificate the tenant has no way in.
    let anonymous = client_config(&g.pki.ca_cert_pem, None);
    let refused = end_over_tls(&g, anonymous, "robot-3", None).await;
    assert_eq!(refused.expect("served").status, 401);
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
    let stranger = generate_pki(&["localhost"]).expect("other ca");
    let foreign = stranger.issue_client_cert(&[BILLING_SAN]).expect("cert");
    let refused = end_over_tls(
        &g,
        client_config(&g.pki.ca_cert_pem, Some(&foreign)),
        "billing-1",
        None,
    )
    .await;
    assert!(
        refused.is_err(),
        "a certificate from another CA must be refused"
    );

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
    assert!(refused.is_err(), "an expired certificate must be refused");
    assert!(g.audit().is_empty(), "nothing reached the request path");
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
    assert!(
        refused.is_err(),
        "no client certificate with require_client_cert"
    );
    assert!(required.audit().is_empty());
    required.gateway.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_server_certificate_is_served_to_new_connections_after_reload() {
    let g = MtlsGateway::start(false).await;
    let config = client_config(&g.pki.ca_cert_pem, None);
    let before = end_over_tls(&g, Arc::clone(&config), "billing-1", Some(BILLING_TOKEN))
        .await
        .expect("served");
    let rotated = g
        .pki
        .issue_server_cert(&["localhost", "127.0.0.1"])
        .expect("cert");
    write(g.dir.path(), "server.pem", &rotated.cert_pem);
    write(g.dir.path(), "server-key.pem", &rotated.key_pem);
    g.gateway.reload_from(&g.config_path).expect("reload");
    let after = end_over_tls(&g, config, "billing-2", Some(BILLING_TOKEN))
        .await
        .expect("served");
    assert_eq!(after.status, 204);
    assert_ne!(before.server_cert_fp, after.server_cert_fp);
    assert_eq!(
        after.server_cert_fp,
        hex::encode(Sha256::digest(der_certs(&rotated.cert_pem)[0].as_ref()))
    );

    // A key that does not match the certificate is refused and the old pair stays.
    write(g.dir.path(), "server-key.pem", &g.pki.server_key_pem);
    assert!(g.gateway.reload_from(&g.config_path).is_err());
    g.gateway.shutdown().await.expect("shutdown");
}
