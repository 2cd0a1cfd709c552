//! Unit tests of the request path: framing checks, request targets, and a stuck audit
//! disk seen from the gateway.

use super::*;

fn parts(target: &str, headers: &[(&str, &str)]) -> http::request::Parts {
    let mut builder = Request::post(target);
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    builder.body(()).expect("request").into_parts().0
}

#[test]
fn framing_refusals() {
    assert!(check_framing(&parts("/mpc/a/end", &[])).is_ok());
    assert!(matches!(
        check_framing(&parts("/mpc/a/end", &[("transfer-encoding", "chunked")])),
        Err(Problem::BadRequest(_))
    ));
    let long = format!("/mpc/{}/end", "a".repeat(8200));
    assert_eq!(check_framing(&parts(&long, &[])), Err(Problem::UriTooLong));
    let value = "v".repeat(1000);
    let names: Vec<String> = (0..40).map(|i| format!("x-h{i}")).collect();
    let big: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), value.as_str())).collect();
    assert_eq!(
        check_framing(&parts("/mpc/a/end", &big)),
        Err(Problem::HeadersTooLarge)
    );
}

#[test]
fn http2_targets_are_the_path_only() {
    let uri: http::Uri = "http://evil.example/mpc/a/end?x".parse().expect("uri");
    assert_eq!(request_target(http::Version::HTTP_2, &uri), "/mpc/a/end?x");
    assert_eq!(
        request_target(http::Version::HTTP_11, &uri),
        "http://evil.example/mpc/a/end?x"
    );
}

/// `fsync: always` on a disk whose fsync stopped returning, seen from the gateway: the
/// caller whose `forward` record cannot be made durable gets `503 audit-unavailable`
/// once the batch has hung past the stall bound, nothing reaches Plivo, and readiness
/// fails until the disk answers again. Then the `forward` record and its `denied`
/// record are both in the log, in that order, on an intact chain.
#[tokio::test]
async fn a_stuck_audit_disk_refuses_callers_unforwarded_and_fails_readiness() {
    use crate::audit::verify::{verify_paths, Verdict};
    use crate::audit::{Gate, TEST_STALL_BOUND};

    let dir = tempfile::tempdir().expect("tempdir");
    // Where Plivo would be: the test checks that nothing connects to it.
    let plivo = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    plivo.set_nonblocking(true).expect("nonblocking");
    let port = plivo.local_addr().expect("address").port();
    let upstream = format!("upstream:\n  base_url: https://127.0.0.1:{port}\n");
    let config = crate::config::for_tests_with(dir.path(), &upstream, "  fsync: always\n");
    let gate = Gate::default();
    let audit = AuditLog::open_stuck(config.audit.clone(), &gate);
    let metrics = Arc::new(Metrics::new());
    let clock = LimiterClock::monotonic();
    let gateway = Gateway::new(&config, audit, Arc::clone(&metrics), clock).expect("gateway");
    assert_eq!(crate::admin::readiness(&gateway), Ok(()));

    let stuck = gate.close();
    let request = Request::post("/mpc/billing-1/end")
        .header("authorization", "Bearer foo")
        .header("x-request-id", "stuck-1")
        .body(http_body_util::Empty::<Bytes>::new())
        .expect("request");
    let peer = Peer::new(SocketAddr::from(([127, 0, 0, 1], 40000)), None);
    let started = Instant::now();
    let answered = tokio::time::timeout(Duration::from_secs(10), gateway.handle(request, &peer));
    let response = answered
        .await
        .expect("the caller is answered while the disk hangs");
    assert!(
        started.elapsed() >= TEST_STALL_BOUND,
        "answered before the batch counted as stuck"
    );
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    let problem: serde_json::Value = serde_json::from_slice(&body).expect("a problem body");
    assert_eq!(problem["type"], "urn:mpc-gateway:audit-unavailable");
    assert_eq!(problem["request_id"], "stuck-1");
    assert_eq!(
        crate::admin::readiness(&gateway),
        Err("audit log not writable")
    );
    // Both of its records were refused in time: the `forward` and then the `denied`,
    // queued behind the hung batch.
    let text = metrics.encode();
    let failures = text
        .lines()
        .find(|l| l.starts_with("mpc_gateway_audit_failures_total"));
    assert_eq!(
        failures,
        Some("mpc_gateway_audit_failures_total 2"),
        "{text}"
    );

    drop(stuck); // the disk answers again
    let deadline = Instant::now() + Duration::from_secs(10);
    while crate::admin::readiness(&gateway).is_err() {
        assert!(
            Instant::now() < deadline,
            "still not ready after the disk answered"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    gateway.audit().close().await.expect("close");
    let nothing = plivo.accept().map(|_| ()).map_err(|e| e.kind());
    assert_eq!(
        nothing,
        Err(std::io::ErrorKind::WouldBlock),
        "Plivo was contacted"
    );

    let path = dir.path().join("audit.jsonl");
    let text = std::fs::read_to_string(&path).expect("the audit log");
    let records: Vec<serde_json::Value> = text
        .lines()
        .map(|line| serde_json::from_str(line).expect("a JSON record"))
        .collect();
    let kinds: Vec<(&str, &str)> = records
        .iter()
        .map(|r| {
            (
                r["event"].as_str().unwrap_or("?"),
                r["request_id"].as_str().unwrap_or("?"),
            )
        })
        .collect();
    assert_eq!(kinds, [("forward", "stuck-1"), ("denied", "stuck-1")]);
    assert_eq!(records[1]["status"], 503);
    assert_eq!(records[1]["reason"], "audit-unavailable");
    match verify_paths(&[path.as_path()], None) {
        Verdict::Intact { records: 2, .. } => {}
        other => panic!("chain not intact: {other:?}"),
    }
}
