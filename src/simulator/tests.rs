//! Unit tests of the simulator over real loopback connections: routing, credentials,
//! faults, recording, TLS with the test PKI, and the standalone arguments.

use super::conn::invalid_input;
use super::handler::{ERR_AUTH, ERR_NOT_FOUND};
use super::*;
use http_body_util::{BodyExt as _, Full};
use hyper::header::{AUTHORIZATION, CONTENT_TYPE};
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::CertificateDer;
use std::future::Future;
use std::time::Instant;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use uuid::Uuid;

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

fn request(method: Method, url: &str, auth: Option<String>, body: &str) -> Request<Full<Bytes>> {
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
            let registry = lock_unpoisoned(&sim.shared.registry);
            assert!(
                registry.by_name.is_empty() && registry.by_uuid.is_empty(),
                "nothing kept"
            );
        }
        Ok(())
    })
    .await
}

fn tls_client_config(roots: rustls::RootCertStore) -> Result<rustls::ClientConfig, rustls::Error> {
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
        let answer = tls_send(&sim, pki.root_store()?, "localhost", tls_delete(&sim, "y")).await?;
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
