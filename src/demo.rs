//! `mpc-gateway demo`: the real gateway in front of the built-in Plivo simulator, both on
//! loopback, so anyone can watch an MPC being ended without Plivo credentials.

use std::io;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use base64::Engine as _;
use rand::RngCore;

use crate::cli::write_stdout;
use crate::config::{BaseUrl, Config};
use crate::server::{build_runtime, RunningGateway, StartError, StartOptions};
use crate::simulator::{generate_pki, Liveness, SimTls, Simulator, SimulatorConfig};

/// `config/demo.yaml`, built in so that the demo runs from any directory. Its audit path
/// is relative, so the log lands under the current directory.
const DEMO_CONFIG: &str = include_str!("../config/demo.yaml");
/// The token whose hash is in config/demo.yaml. It opens nothing but the demo.
const DEMO_TOKEN: &str = "mpcgw_demo_token_for_the_simulator_only";
const DEMO_AUTH_ID: &str = "MADEMO0000SIMULATOR0";

pub fn run() -> anyhow::Result<()> {
    let auth_token = random_secret();
    // The config names these variables; set them before any thread exists.
    std::env::set_var("MPC_GATEWAY_DEMO_AUTH_ID", DEMO_AUTH_ID);
    std::env::set_var("MPC_GATEWAY_DEMO_AUTH_TOKEN", &auth_token);
    let mut config =
        Config::from_yaml(DEMO_CONFIG).context("loading the built-in config/demo.yaml")?;
    crate::telemetry::init_tracing(&config.log);
    let audit_dir = config.audit.path.dir();
    std::fs::create_dir_all(audit_dir)
        .with_context(|| format!("creating the audit directory {}", audit_dir.display()))?;
    let runtime = build_runtime(0)?;
    runtime.block_on(async move {
        let pki = generate_pki(&["localhost", "127.0.0.1"]).context("making the simulator's CA")?;
        let mut sim_config = SimulatorConfig::new(DEMO_AUTH_ID, auth_token);
        sim_config.tls = Some(SimTls {
            cert_chain_pem: pki.server_cert_pem.clone(),
            key_pem: pki.server_key_pem.clone(),
        });
        sim_config.liveness = Liveness::AllNames {
            forget_ended: false,
        };
        sim_config.record = false;
        let simulator = Simulator::start(sim_config)
            .await
            .context("starting the simulator")?;
        point_at_simulator(&mut config, &simulator, &pki.ca_cert_pem)?;
        let running = start_gateway(&mut config)
            .await
            .context("starting the gateway")?;
        print_instructions(&running, &simulator, &config);
        tokio::signal::ctrl_c()
            .await
            .context("waiting for Ctrl-C")?;
        running.shutdown().await?;
        simulator.shutdown().await;
        Ok(())
    })
}

/// Starts on the configured ports, or, when one is taken (a dev server on 8080, a demo run
/// from another directory), on free ones: the instructions print whichever were bound.
async fn start_gateway(config: &mut Config) -> Result<RunningGateway, StartError> {
    match RunningGateway::start(config, StartOptions::default()).await {
        Err(StartError::Bind { addr, source }) if source.kind() == io::ErrorKind::AddrInUse => {
            // Output errors (no reader) must not stop the demo; see `print_instructions`.
            let _ = write_stdout(&format!(
                "{addr} is in use; the demo listens on free ports instead\n"
            ));
            config.listen.set_port(0);
            config.admin_listen.set_port(0);
            RunningGateway::start(config, StartOptions::default()).await
        }
        started => started,
    }
}

fn random_secret() -> String {
    let mut bytes = [0u8; 24];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn point_at_simulator(
    config: &mut Config,
    simulator: &Simulator,
    ca_pem: &str,
) -> anyhow::Result<()> {
    config.upstream.base_url = BaseUrl::try_from(simulator.base_url().as_str())
        .context("the simulator's URL as upstream.base_url")?;
    config.upstream.extra_roots = rustls_pemfile::certs(&mut ca_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .context("reading the simulator's CA")?;
    Ok(())
}

/// Prints how to use the running demo. Ignores output errors: a closed stdout
/// (`demo | head`) must not abort the gateway, which keeps running until Ctrl-C.
fn print_instructions(running: &RunningGateway, simulator: &Simulator, config: &Config) {
    let addr = running.local_addr();
    let audit = config.audit.path.display();
    let verify = verify_command(config.audit.path.as_path());
    let text = format!(
        "
mpc-gateway demo is running (Ctrl-C to stop)
  gateway    http://{addr}   (admin: http://{admin}/metrics)
  simulator  {sim}   (stands in for api.plivo.com, over TLS)
  audit log  {audit}

End an MPC through the gateway (any name starting with demo-; a second call gives 404):
  curl -i -X POST -H 'Authorization: Bearer {DEMO_TOKEN}' http://{addr}/mpc/demo-standup/end

Then check the audit chain:
  {verify}

",
        admin = running.admin_addr(),
        sim = simulator.base_url(),
    );
    let _ = write_stdout(&text);
}

/// `audit verify` as a command that works from any directory: this binary and the audit
/// log by absolute paths (`cargo run` would need the repository as working directory).
fn verify_command(audit: &Path) -> String {
    let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("mpc-gateway"));
    let audit = std::path::absolute(audit).unwrap_or_else(|_| audit.to_path_buf());
    format!(
        "{} audit verify {}",
        shell_quoted(&exe),
        shell_quoted(&audit)
    )
}

/// A path as a shell word: as it is when it holds only characters no shell treats
/// specially, else in single quotes.
fn shell_quoted(path: &Path) -> String {
    let text = path.display().to_string();
    let plain = !text.is_empty()
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-+,:@%".contains(&b));
    if plain {
        text
    } else {
        format!("'{}'", text.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_quoted_only_when_a_shell_would_split_or_expand_them() {
        let quoted = |p: &str| shell_quoted(Path::new(p));
        assert_eq!(
            quoted("/work/target/demo/audit.jsonl"),
            "/work/target/demo/audit.jsonl"
        );
        assert_eq!(
            quoted("/home/me/my demo/a.jsonl"),
            "'/home/me/my demo/a.jsonl'"
        );
        assert_eq!(quoted("/tmp/$HOME"), "'/tmp/$HOME'");
        assert_eq!(quoted("/tmp/it's"), r"'/tmp/it'\''s'");
    }

    #[test]
    fn the_verify_command_names_the_log_by_its_absolute_path() {
        let command = verify_command(Path::new("target/demo/audit.jsonl"));
        let cwd = std::env::current_dir().expect("cwd");
        assert!(
            command.ends_with(&format!(
                " audit verify {}",
                shell_quoted(&cwd.join("target/demo/audit.jsonl"))
            )),
            "{command}"
        );
    }
}
