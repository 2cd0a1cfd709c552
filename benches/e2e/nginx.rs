//! The `nginx-tls` row: nginx doing the gateway's job on the same layout, so the targets
//! of issue 5 (stated against nginx 1.22) can be checked as ratios measured on the same
//! machine in the same run, not against figures from another day.
//!
//! The configuration mirrors what the issue names: a bearer-token map, `limit_req` per
//! tenant and per account, a buffered JSON access log, the Basic header, and a keep-alive
//! TLS upstream (HTTP/1.1, the certificate verified against the test CA, TLS 1.2 or 1.3
//! like the gateway's rustls client: nginx 1.22 leaves 1.3 out of its upstream protocols
//! unless told). nginx does less
//! than the gateway: its log is neither hash-chained nor keyed, and it compares tokens as
//! plain strings where the gateway compares SHA-256 hashes in constant time.
//!
//! nginx runs with `master_process off`: one process that is the worker, so its CPU time
//! and memory are read from the one pid the bench spawned, pinned like the gateway.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use base64::Engine as _;

use super::{send_signal, spawn, Env, Proc, AUTH_ID, CONNECTIONS};

pub struct Nginx {
    pub proc: Proc,
    pub addr: SocketAddr,
    pub ready: Duration,
    access_log: PathBuf,
}

/// Writes the configuration into `dir` and starts nginx pinned like the gateway; returns
/// once it accepts connections.
pub fn start(env: &Env, dir: &Path, sim_port: u16) -> anyhow::Result<Nginx> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let conf = dir.join("nginx.conf");
    let protocols = upstream_tls_protocols()?;
    std::fs::write(&conf, config(env, dir, port, sim_port, &protocols))?;
    let args: Vec<String> = [
        "-p",
        &dir.display().to_string(),
        "-c",
        &conf.display().to_string(),
        "-e",
        &dir.join("error.log").display().to_string(),
    ]
    .map(str::to_owned)
    .to_vec();
    let spawned_at = Instant::now();
    let (mut proc, _) = spawn(
        "nginx",
        Path::new("nginx"),
        &args,
        &[],
        env.pinned.then_some(1),
        None,
    )
    .context("starting nginx (apt-get install nginx-light)")?;
    let deadline = spawned_at + Duration::from_secs(5);
    while std::net::TcpStream::connect(addr).is_err() {
        proc.ensure_alive().with_context(|| error_log(dir))?;
        if Instant::now() > deadline {
            bail!(
                "nginx did not listen on {addr} within 5 s; {}",
                error_log(dir)
            );
        }
        std::thread::sleep(Duration::from_micros(500));
    }
    Ok(Nginx {
        proc,
        addr,
        ready: spawned_at.elapsed(),
        access_log: dir.join("access.log"),
    })
}

/// What the access log says, line by line.
pub struct LogCounts {
    pub lines: u64,
    /// Lines with `"status":204`: the caller got a 204.
    pub ok: u64,
    /// Lines whose `upstream_status` is exactly `"204"`: one upstream attempt, answered
    /// 204. nginx may retry an upstream request (on another or a fresh connection) and
    /// still answer 204; `$upstream_status` then lists every attempt (`"502, 204"`).
    pub one_upstream_204: u64,
}

impl Nginx {
    /// Stops nginx gracefully (SIGQUIT flushes the buffered access log), then counts the
    /// access log's lines, those with `"status":204` and those with one upstream attempt
    /// answered 204.
    pub fn stop_and_count(mut self) -> anyhow::Result<LogCounts> {
        send_signal(self.proc.pid(), "QUIT")?;
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.proc.child.try_wait()?.is_none() {
            if Instant::now() > deadline {
                bail!("nginx did not stop within 5 s of SIGQUIT");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let log = std::fs::read_to_string(&self.access_log)
            .with_context(|| format!("reading {}", self.access_log.display()))?;
        let count = |needle: &str| log.lines().filter(|line| line.contains(needle)).count() as u64;
        Ok(LogCounts {
            lines: log.lines().count() as u64,
            ok: count("\"status\":204,"),
            one_upstream_204: count("\"upstream_status\":\"204\","),
        })
    }
}

fn error_log(dir: &Path) -> String {
    let text = std::fs::read_to_string(dir.join("error.log")).unwrap_or_default();
    format!("nginx error.log:\n{text}")
}

/// `E2E_NGINX_TLS`: the TLS versions nginx offers the simulator. Default `TLSv1.2
/// TLSv1.3`, what the gateway's client offers; `TLSv1.2` is nginx 1.22's own default
/// (less TLSv1 and TLSv1.1), for comparing with runs made before it was set.
fn upstream_tls_protocols() -> anyhow::Result<String> {
    let Ok(protocols) = std::env::var("E2E_NGINX_TLS") else {
        return Ok("TLSv1.2 TLSv1.3".to_owned());
    };
    let known = |word: &str| matches!(word, "TLSv1.2" | "TLSv1.3");
    if protocols.split_whitespace().next().is_none() || !protocols.split_whitespace().all(known) {
        anyhow::bail!("E2E_NGINX_TLS: expected TLSv1.2 and/or TLSv1.3, got {protocols:?}");
    }
    Ok(protocols)
}

fn config(env: &Env, dir: &Path, port: u16, sim_port: u16, protocols: &str) -> String {
    let dir = dir.display();
    let basic =
        base64::engine::general_purpose::STANDARD.encode(format!("{AUTH_ID}:{}", env.sim_token));
    let ca = env.pki_dir.join("ca.pem");
    let ca = ca.display();
    let token = &env.caller_token;
    format!(
        r#"# generated by benches/e2e.rs (nginx-tls row)
daemon off;
master_process off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    server_tokens off;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;

    map_hash_bucket_size 128;
    map $http_authorization $tenant {{
        default "";
        "Bearer {token}" bench;
    }}
    map $tenant $account {{
        "" "";
        default default;
    }}
    limit_req_zone $tenant zone=tenant:1m rate=1000000r/s;
    limit_req_zone $account zone=account:1m rate=1000000r/s;
    limit_req_status 429;
    log_format audit escape=json '{{"ts":"$time_iso8601","request_id":"$request_id","tenant":"$tenant","mpc":"$mpc","status":$status,"upstream_status":"$upstream_status","upstream_time":"$upstream_response_time"}}';

    upstream plivo {{
        server 127.0.0.1:{sim_port};
        keepalive {CONNECTIONS};
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{port};
        keepalive_requests 1000000;
        location ~ ^/mpc/(?<mpc>bench-[A-Za-z0-9_.-]+)/end$ {{
            access_log {dir}/access.log audit buffer=64k flush=1s;
            if ($request_method != POST) {{ return 405; }}
            if ($tenant = "") {{ return 401; }}
            limit_req zone=tenant burst=1000000 nodelay;
            limit_req zone=account burst=1000000 nodelay;
            proxy_method DELETE;
            proxy_http_version 1.1;
            proxy_pass_request_headers off;
            proxy_pass_request_body off;
            proxy_set_header Host localhost:{sim_port};
            proxy_set_header Connection "";
            proxy_set_header Content-Length "";
            proxy_set_header Authorization "Basic {basic}";
            proxy_set_header X-Request-Id $request_id;
            proxy_ssl_trusted_certificate {ca};
            proxy_ssl_verify on;
            # nginx 1.22's default is TLSv1 TLSv1.1 TLSv1.2; the gateway's rustls client
            # offers 1.2 and 1.3 (and gets 1.3 from the simulator).
            proxy_ssl_protocols {protocols};
            proxy_ssl_name localhost;
            proxy_ssl_server_name on;
            proxy_ssl_session_reuse on;
            proxy_pass https://plivo/v1/Account/{AUTH_ID}/MultiPartyCall/name_$mpc/;
        }}
        location / {{ return 404; }}
    }}
}}
"#
    )
}
