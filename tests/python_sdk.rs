//! Contract test with the official Plivo Python SDK (`plivo` on PyPI, pinned in
//! `tests/python/requirements.txt`): the SDK, pointed at the gateway with virtual
//! credentials, ends MPCs by name and by uuid and raises its usual typed exceptions.
//!
//! The SDK runs in a virtualenv at `target/python-sdk-venv`, created on first use (one
//! creator at a time, across threads and processes) with `python3 -m venv` and
//! `pip install -r tests/python/requirements.txt`; it is rebuilt when the requirements
//! change. If that cannot be done (no `venv` module, PyPI unreachable) every test here
//! fails with the reason. `MPC_GATEWAY_TEST_PYTHON` picks another base interpreter.

use crate::common;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use base64::Engine as _;
use common::*;
use http::Method;
use mpc_gateway::simulator::{Fault, Liveness};

const REQUIREMENTS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/requirements.txt");
const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/stop_mpc.py");
/// Written into the venv once pip has succeeded: the requirements it was built from.
const MARKER: &str = "mpc-gateway-requirements.txt";
const VENV_STEP_TIMEOUT: Duration = Duration::from_secs(600);
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(60);

// ------------------------------------------------------------------ the virtualenv

/// The venv's interpreter, creating the venv on first use. Panics with the reason when it
/// cannot be made: a missing SDK must fail these tests, never skip them.
fn venv_python() -> PathBuf {
    static VENV: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    match VENV.get_or_init(prepare_venv) {
        Ok(python) => python.clone(),
        Err(reason) => panic!("the Python SDK virtualenv is unavailable: {reason}"),
    }
}

fn prepare_venv() -> Result<PathBuf, String> {
    // CARGO_TARGET_TMPDIR is `<target dir>/tmp`, so this honours CARGO_TARGET_DIR.
    let target = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .ok_or("CARGO_TARGET_TMPDIR has no parent")?;
    let venv = target.join("python-sdk-venv");
    let python = venv.join("bin").join("python");
    let requirements = std::fs::read_to_string(REQUIREMENTS)
        .map_err(|err| format!("cannot read {REQUIREMENTS}: {err}"))?;

    // Test binaries run in parallel processes too (e.g. nextest): one creator at a time.
    std::fs::create_dir_all(target).map_err(|err| format!("{}: {err}", target.display()))?;
    let lock_path = target.join("python-sdk-venv.lock");
    let lock = File::create(&lock_path).map_err(|err| format!("{}: {err}", lock_path.display()))?;
    // Released when `lock` is closed.
    lock.lock()
        .map_err(|err| format!("lock {}: {err}", lock_path.display()))?;

    let marker = venv.join(MARKER);
    if python.exists() && std::fs::read_to_string(&marker).ok().as_deref() == Some(&requirements) {
        return Ok(python);
    }
    if venv.exists() {
        std::fs::remove_dir_all(&venv)
            .map_err(|err| format!("cannot remove stale {}: {err}", venv.display()))?;
    }
    let base = std::env::var("MPC_GATEWAY_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    eprintln!("creating {} with {base} and pip", venv.display());
    let started = Instant::now();
    let mut create = Command::new(&base);
    create.arg("-m").arg("venv").arg(&venv);
    run_bounded(create, VENV_STEP_TIMEOUT).map_err(|err| {
        format!(
            "`{base} -m venv {}` failed (on Debian/Ubuntu: apt-get install python3-venv; \
             MPC_GATEWAY_TEST_PYTHON selects another interpreter): {err}",
            venv.display()
        )
    })?;
    let mut install = Command::new(&python);
    install
        .args([
            "-m",
            "pip",
            "install",
            "--no-input",
            "--disable-pip-version-check",
        ])
        .args(["-r", REQUIREMENTS]);
    run_bounded(install, VENV_STEP_TIMEOUT).map_err(|err| {
        format!("pip could not install {REQUIREMENTS} (is PyPI reachable?): {err}")
    })?;
    let mut check = Command::new(&python);
    check.args([
        "-c",
        "import plivo.version; print(plivo.version.__version__)",
    ]);
    let version = run_bounded(check, VENV_STEP_TIMEOUT)
        .map_err(|err| format!("the installed SDK does not import: {err}"))?;
    std::fs::write(&marker, &requirements).map_err(|err| format!("{}: {err}", marker.display()))?;
    eprintln!(
        "plivo {} installed in {:.1} s",
        version.stdout.trim(),
        started.elapsed().as_secs_f64()
    );
    Ok(python)
}

struct Finished {
    stdout: String,
    stderr: String,
}

/// Runs `command` to completion within `timeout` (killed past it). Output goes through
/// files, so a chatty child cannot block on a full pipe. Err unless it exits with 0.
fn run_bounded(mut command: Command, timeout: Duration) -> Result<Finished, String> {
    let dir = tempfile::tempdir().map_err(|err| format!("tempdir: {err}"))?;
    let out_path = dir.path().join("stdout");
    let err_path = dir.path().join("stderr");
    let file = |path: &Path| File::create(path).map_err(|err| format!("{err}"));
    let mut child = command
        .stdin(Stdio::null())
        .stdout(file(&out_path)?)
        .stderr(file(&err_path)?)
        .spawn()
        .map_err(|err| format!("cannot start {command:?}: {err}"))?;
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(err) => return Err(format!("waiting for {command:?}: {err}")),
        }
    };
    let read = |path: &Path| {
        String::from_utf8_lossy(&std::fs::read(path).unwrap_or_default()).into_owned()
    };
    let finished = Finished {
        stdout: read(&out_path),
        stderr: read(&err_path),
    };
    match status {
        Some(status) if status.success() => Ok(finished),
        Some(status) => Err(format!(
            "{command:?} exited with {status}\nstdout:\n{}\nstderr:\n{}",
            finished.stdout, finished.stderr
        )),
        None => Err(format!(
            "{command:?} did not finish within {timeout:?}\nstdout:\n{}\nstderr:\n{}",
            finished.stdout, finished.stderr
        )),
    }
}

// ------------------------------------------------------------------ running the SDK

/// What `tests/python/stop_mpc.py` printed.
#[derive(Debug)]
struct Outcome {
    ok: bool,
    exception: Option<String>,
    message: Option<String>,
}

impl Outcome {
    fn assert_ok(&self) {
        assert!(self.ok, "the SDK call failed: {self:?}");
        assert_eq!((&self.exception, &self.message), (&None, &None));
    }

    /// Asserts the SDK raised `class` and returns its message.
    fn assert_raised(&self, class: &str) -> &str {
        assert!(!self.ok, "expected {class}, the SDK call succeeded");
        assert_eq!(self.exception.as_deref(), Some(class), "{self:?}");
        self.message.as_deref().expect("an exception has a message")
    }
}

/// Who the SDK says it is, and what it asks to stop.
struct Call<'a> {
    auth_id: &'a str,
    token: &'a str,
    /// A Basic username other than `auth_id` (which stays in the path).
    basic_user: Option<&'a str>,
    name: Option<&'a str>,
    uuid: Option<&'a str>,
}

impl<'a> Call<'a> {
    fn billing() -> Call<'a> {
        Call {
            auth_id: BILLING_SDK_AUTH_ID,
            token: BILLING_TOKEN,
            basic_user: None,
            name: None,
            uuid: None,
        }
    }

    fn name(self, name: &'a str) -> Call<'a> {
        Call {
            name: Some(name),
            ..self
        }
    }

    fn uuid(self, uuid: &'a str) -> Call<'a> {
        Call {
            uuid: Some(uuid),
            ..self
        }
    }
}

/// `client.multi_party_calls.stop(...)` in a fresh Python process against `h`'s gateway.
async fn sdk_stop(h: &Harness, call: Call<'_>) -> Outcome {
    let python = tokio::task::spawn_blocking(venv_python)
        .await
        .unwrap_or_else(|err| std::panic::resume_unwind(err.into_panic()));
    let mut command = Command::new(python);
    command
        .arg(SCRIPT)
        .args(["--port", &h.addr().port().to_string()])
        .args(["--auth-id", call.auth_id, "--token", call.token]);
    if let Some(user) = call.basic_user {
        command.args(["--basic-user", user]);
    }
    match (call.name, call.uuid) {
        (Some(name), None) => command.args(["--name", name]),
        (None, Some(uuid)) => command.args(["--uuid", uuid]),
        _ => panic!("a call stops by name or by uuid"),
    };
    // No proxy may divert a loopback request; the SDK's own config comes from arguments.
    for var in [
        "HTTP_PROXY",
        "http_proxy",
        "ALL_PROXY",
        "all_proxy",
        "PLIVO_AUTH_ID",
    ] {
        command.env_remove(var);
    }
    command
        .env("NO_PROXY", "127.0.0.1")
        .env("PYTHONDONTWRITEBYTECODE", "1");
    let finished = tokio::task::spawn_blocking(move || run_bounded(command, SCRIPT_TIMEOUT))
        .await
        .expect("join")
        .unwrap_or_else(|err| panic!("the SDK script failed: {err}"));
    let line = finished.stdout.lines().last().unwrap_or_else(|| {
        panic!(
            "the SDK script printed nothing; stderr:\n{}",
            finished.stderr
        )
    });
    let value: serde_json::Value = serde_json::from_str(line)
        .unwrap_or_else(|err| panic!("not JSON ({err}): {line:?}; stderr:\n{}", finished.stderr));
    let text = |key: &str| value[key].as_str().map(str::to_owned);
    Outcome {
        ok: value["ok"].as_bool().expect("ok is a bool"),
        exception: text("exception"),
        message: text("message"),
    }
}

fn basic(username: &str, password: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{username}:{password}"))
    )
}

/// The gateway's `error` text for the same request, sent directly.
async fn gateway_error(h: &Harness, path: &str, auth: &str) -> (u16, String) {
    let reply = h
        .send(Method::DELETE, path, &[("authorization", auth)], b"{}")
        .await;
    let error = reply.json()["error"].as_str().expect("error").to_owned();
    (reply.status, error)
}

fn sdk_path(auth_id: &str, mpc: &str) -> String {
    format!("/v1/Account/{auth_id}/MultiPartyCall/{mpc}/")
}

fn upstream_path(mpc: &str) -> String {
    format!("/v1/Account/{AUTH_ID}/MultiPartyCall/{mpc}/")
}

// ------------------------------------------------------------------ tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_stop_by_name_sends_upstream_what_the_native_route_sends() {
    let h = Harness::start().await;
    sdk_stop(&h, Call::billing().name("billing-a b"))
        .await
        .assert_ok();
    assert_eq!(h.end("billing-c%20d", BILLING_TOKEN).await.status, 204);

    let sent = h.sim.requests();
    assert_eq!(sent.len(), 2, "{sent:?}");
    assert_eq!(sent[0].target, upstream_path("name_billing-a%20b"));
    assert_eq!(sent[1].target, upstream_path("name_billing-c%20d"));
    for request in &sent {
        assert_eq!(request.method, "DELETE");
        assert_eq!(
            request.header("authorization"),
            Some(expected_basic().as_str())
        );
        assert!(
            request.body.is_empty(),
            "the SDK's JSON body is not forwarded"
        );
    }
    let names =
        |i: usize| -> Vec<String> { sent[i].headers.iter().map(|(n, _)| n.clone()).collect() };
    assert_eq!(names(0), names(1), "same upstream headers on both routes");

    // What the SDK itself sent, as the audit saw it.
    let records = h.records();
    let path = sdk_path(BILLING_SDK_AUTH_ID, "name_billing-a%20b");
    assert_eq!(records[0]["event"], "forward");
    assert_eq!(records[1]["event"], "result");
    for record in &records[..2] {
        assert_eq!(record["method"], "DELETE");
        assert_eq!(record["path"], path.as_str());
        assert_eq!(record["tenant"], "billing");
        assert_eq!(record["mpc"], "billing-a b");
    }
    assert_eq!(records[1]["reason"], "ended");
    assert_eq!(records[1]["status"], 204);
    h.assert_chain();
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_stop_by_uuid_looks_up_the_name_then_deletes_by_uuid() {
    let h = Harness::with_explicit_liveness().await;
    let uuid = h.sim.add_mpc("billing-x");
    sdk_stop(&h, Call::billing().uuid(&uuid)).await.assert_ok();
    assert!(!h.sim.is_live("billing-x"));

    let sent = h.sim.requests();
    let expected = upstream_path(&format!("uuid_{uuid}"));
    let seen: Vec<(&str, &str)> = sent
        .iter()
        .map(|r| (r.method.as_str(), r.target.as_str()))
        .collect();
    assert_eq!(
        seen,
        [("GET", expected.as_str()), ("DELETE", expected.as_str())]
    );
    for request in &sent {
        assert_eq!(
            request.header("authorization"),
            Some(expected_basic().as_str())
        );
    }

    let records = h.records();
    assert_eq!(records.len(), 2, "{records:?}");
    let path = sdk_path(BILLING_SDK_AUTH_ID, &format!("uuid_{uuid}"));
    assert_eq!(records[0]["event"], "forward");
    assert_eq!(records[0]["path"], path.as_str());
    let result = &records[1];
    assert_eq!(result["event"], "result");
    assert_eq!(result["path"], path.as_str());
    assert_eq!(result["mpc"], "billing-x");
    assert_eq!(result["tenant"], "billing");
    assert_eq!(result["reason"], "ended");
    assert_eq!(result["attempts"], 2, "the lookup and the DELETE");
    h.assert_chain();
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_raises_its_typed_exceptions_for_401_404_and_429() {
    let h = Harness::with(Options {
        tenant_limit: (1, 1),
        liveness: Liveness::Explicit,
        ..Options::default()
    })
    .await;
    let path = |name: &str| sdk_path(BILLING_SDK_AUTH_ID, &format!("name_{name}"));

    // 401: a wrong token. The message is the gateway's `error`; nothing is spent.
    let outcome = sdk_stop(
        &h,
        Call {
            token: "not-the-billing-token",
            ..Call::billing().name("billing-1")
        },
    )
    .await;
    let message = outcome.assert_raised("AuthenticationError").to_owned();
    let wrong = basic(BILLING_SDK_AUTH_ID, "not-the-billing-token");
    assert_eq!(
        gateway_error(&h, &path("billing-1"), &wrong).await,
        (401, message)
    );
    assert_eq!(h.sim.request_count(), 0);

    // 404: Plivo has no such MPC. This spends the tenant's only token.
    let outcome = sdk_stop(&h, Call::billing().name("billing-nobody")).await;
    let message = outcome.assert_raised("ResourceNotFoundError");
    let result = h.records().pop().expect("result");
    assert_eq!(result["reason"], "mpc-not-found");
    let api_id = result["plivo_api_id"].as_str().expect("Plivo's api_id");
    assert!(
        message.starts_with("Plivo has no such active MPC") && message.contains(api_id),
        "{message:?}"
    );
    assert_eq!(h.sim.request_count(), 1);

    // 429: the tenant limit. plivo-python 4.63.0 maps no error member for 429 on DELETE:
    // it raises the base PlivoRestError with its own text, dropping the gateway's.
    h.sim.add_mpc("billing-1");
    let outcome = sdk_stop(&h, Call::billing().name("billing-1")).await;
    let message = outcome.assert_raised("PlivoRestError");
    assert_eq!(
        message,
        format!(
            "Resource at http://{}{} could not be deleted",
            h.addr(),
            path("billing-1")
        )
    );
    let result = h.records().pop().expect("result");
    assert_eq!(result["reason"], "rate-limited");
    assert_eq!(result["status"], 429);
    assert_eq!(
        h.sim.request_count(),
        1,
        "a limited request is not forwarded"
    );
    assert!(h.sim.is_live("billing-1"));
    let (status, _) = gateway_error(
        &h,
        &path("billing-1"),
        &basic(BILLING_SDK_AUTH_ID, BILLING_TOKEN),
    )
    .await;
    assert_eq!(
        status, 429,
        "still limited: the SDK did not retry and end it"
    );

    // Once the limit refills the same call succeeds.
    h.clock.advance(Duration::from_secs(1));
    sdk_stop(&h, Call::billing().name("billing-1"))
        .await
        .assert_ok();
    assert!(!h.sim.is_live("billing-1"));
    h.assert_chain();
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_basic_username_must_match_the_path_auth_id() {
    let h = Harness::with_explicit_liveness().await;
    h.sim.add_mpc("billing-1");

    // The SDK configured with another auth id and the billing token: username and path
    // both say MAOTHER…, which is no tenant's sdk_auth_id.
    let other = "MAOTHER0000000000000";
    let refused = [
        Call {
            auth_id: other,
            ..Call::billing().name("billing-1")
        },
        // Path of the billing tenant, another username with billing's token.
        Call {
            basic_user: Some(other),
            ..Call::billing().name("billing-1")
        },
        // Billing's full credentials, but another account in the path.
        Call {
            auth_id: other,
            basic_user: Some(BILLING_SDK_AUTH_ID),
            ..Call::billing().name("billing-1")
        },
    ];
    for call in refused {
        let described = format!("path {} user {:?}", call.auth_id, call.basic_user);
        let outcome = sdk_stop(&h, call).await;
        assert_eq!(
            outcome.exception.as_deref(),
            Some("AuthenticationError"),
            "{described}: {outcome:?}"
        );
    }
    assert_eq!(h.sim.request_count(), 0, "nothing forwarded");
    assert!(h.sim.is_live("billing-1"));
    let records = h.records();
    assert_eq!(records.len(), 3, "{records:?}");
    for record in &records {
        assert_eq!(record["event"], "denied");
        assert_eq!(record["reason"], "unauthenticated");
        assert_eq!(record["status"], 401);
    }

    // The same call with matching credentials goes through.
    sdk_stop(&h, Call::billing().name("billing-1"))
        .await
        .assert_ok();
    assert!(!h.sim.is_live("billing-1"));
    h.assert_chain();
    h.shutdown().await;
}

/// The Python SDK answers a 5xx by retrying on its two fallback base URLs. The test's
/// script points all three at the gateway (tests/python/stop_mpc.py), as a deployment
/// must, or the retries would carry the virtual credentials to api.plivo.com. What this
/// checks is the gateway's side of that: a `502` from it is one the SDK does retry, and
/// each of the SDK's three attempts arrives as a call of its own, forwarded once
/// (`max_attempts: 1`) and recorded with its `502` on the SDK route's path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_sdk_retry_of_a_gateway_502_is_a_call_of_its_own() {
    let h = Harness::with(Options {
        max_attempts: 1,
        ..Options::default()
    })
    .await;
    for _ in 0..3 {
        h.sim.push_fault(Fault::status(500, ""));
    }
    let outcome = sdk_stop(&h, Call::billing().name("billing-1")).await;
    outcome.assert_raised("PlivoRestError");
    assert_eq!(
        h.sim.request_count(),
        3,
        "three SDK attempts, all via the gateway"
    );
    let results: Vec<serde_json::Value> = h
        .records()
        .into_iter()
        .filter(|r| r["event"] == "result")
        .collect();
    assert_eq!(results.len(), 3);
    for result in &results {
        assert_eq!(result["status"], 502);
        assert_eq!(
            result["path"],
            sdk_path(BILLING_SDK_AUTH_ID, "name_billing-1")
        );
    }
    h.shutdown().await;
}
