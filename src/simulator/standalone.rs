//! Standalone mode (benchmark script, manual runs): the arguments of the `simulator`
//! command and its foreground run until SIGINT or SIGTERM.

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;

use super::{Liveness, NamedFaultSpec, SimTls, Simulator, SimulatorConfig};

/// Command-line arguments of the standalone simulator.
#[derive(Clone, Debug, clap::Args)]
pub struct SimulatorArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,
    /// The Plivo auth id the simulator accepts.
    #[arg(long)]
    pub auth_id: String,
    /// Name of the environment variable holding the auth token (never pass it directly).
    #[arg(long, value_name = "NAME")]
    pub auth_token_env: String,
    /// PEM certificate chain to serve TLS with (requires --tls-key).
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key to serve TLS with (requires --tls-cert).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Latency added to every answer, e.g. `5ms`.
    #[arg(long, default_value = "0s")]
    pub latency: humantime::Duration,
    /// Forget ended MPCs, so every DELETE answers 204 (benchmark mode).
    #[arg(long)]
    pub forget_ended: bool,
    /// With TLS, offer HTTP/2 by ALPN before HTTP/1.1.
    #[arg(long, requires = "tls_cert")]
    pub http2: bool,
    /// Fail the requests for one MPC name, to see what a caller gets through the
    /// gateway: NAME=SPEC, SPEC one of STATUS (`503`), STATUS:RETRY_AFTER_SECS
    /// (`429:7`), delay:DURATION (`delay:3s`), reset, reset-stream, hang, goaway,
    /// stall:STATUS; `*N` after it fails only the first N (`503*2`). Repeatable.
    #[arg(long = "fault", value_name = "NAME=SPEC")]
    pub faults: Vec<NamedFaultSpec>,
}

/// Run the simulator in the foreground until SIGINT or SIGTERM. Prints exactly two lines
/// to stdout: `simulator listening on <base_url>` once it accepts connections, and
/// `requests <N>` (every request it received, answered or not) once it has stopped on
/// SIGINT or SIGTERM, so the benchmark can check that it saw exactly what was sent.
/// Requests are counted but not recorded, so memory stays flat under load.
pub async fn run_standalone(args: SimulatorArgs) -> anyhow::Result<()> {
    use anyhow::Context as _;
    use std::io::Write as _;

    let auth_token = std::env::var(&args.auth_token_env).with_context(|| {
        format!(
            "environment variable {} (--auth-token-env) is not set or not UTF-8",
            args.auth_token_env
        )
    })?;
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(SimTls {
            cert_chain_pem: std::fs::read_to_string(cert)
                .with_context(|| format!("reading --tls-cert {}", cert.display()))?,
            key_pem: std::fs::read_to_string(key)
                .with_context(|| format!("reading --tls-key {}", key.display()))?,
        }),
        (None, None) => None,
        _ => anyhow::bail!("--tls-cert and --tls-key go together"),
    };
    if !args.listen.ip().is_loopback() {
        tracing::warn!(listen = %args.listen, "plivo simulator listening on a non-loopback address");
    }
    let config = SimulatorConfig {
        listen: args.listen,
        auth_id: args.auth_id,
        auth_token,
        tls,
        http2: args.http2,
        liveness: Liveness::AllNames {
            forget_ended: args.forget_ended,
        },
        latency: args.latency.into(),
        record: false,
        named_faults: args.faults,
    };
    let simulator = Simulator::start(config)
        .await
        .with_context(|| format!("starting the simulator on {}", args.listen))?;
    {
        let mut stdout = io::stdout().lock();
        writeln!(stdout, "simulator listening on {}", simulator.base_url())?;
        stdout.flush()?;
    }
    wait_for_stop_signal().await?;
    // Read after the shutdown: a request that arrived on an open connection during the
    // grace period is counted too.
    let shared = std::sync::Arc::clone(&simulator.shared);
    simulator.shutdown().await;
    let mut stdout = io::stdout().lock();
    writeln!(
        stdout,
        "requests {}",
        shared
            .request_count
            .load(std::sync::atomic::Ordering::SeqCst)
    )?;
    stdout.flush()?;
    Ok(())
}

async fn wait_for_stop_signal() -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    }
    #[cfg(not(unix))]
    tokio::signal::ctrl_c().await?;
    Ok(())
}
