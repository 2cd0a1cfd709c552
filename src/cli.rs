//! The command line (contract §4): `serve`, `check-config`, `demo`, `token new|hash`,
//! `audit verify|query`, and the standalone `simulator` used by the benchmark.

use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use base64::Engine as _;
use clap::{Args, Parser, Subcommand};
use rand::RngCore;

use crate::audit::query::{run_query, QueryArgs};
use crate::audit::verify::{run_verify, VerifyArgs};
use crate::auth::TokenHash;
use crate::config::Config;
use crate::simulator::{run_standalone, SimulatorArgs};

const DEFAULT_CONFIG: &str = "config/gateway.yaml";

#[derive(Debug, Parser)]
#[command(
    name = "mpc-gateway",
    version,
    about = "Ends Plivo multiparty calls for internal services, holding the credentials so they don't have to"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the gateway until SIGTERM/SIGINT (SIGHUP reloads); exit 0 after a clean drain,
    /// 1 on a start-up error or a failed final audit flush.
    Serve(ConfigArg),
    /// Validate the config (secrets resolve, audit directory writable); exit 0 when valid,
    /// 1 when not.
    CheckConfig(ConfigArg),
    /// Run the gateway against the built-in Plivo simulator on loopback.
    Demo,
    /// Mint or hash caller tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Verify or query audit logs.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Run the Plivo simulator alone: for the benchmark, and to try a caller against
    /// Plivo's faults (`--fault`).
    Simulator(SimulatorArgs),
}

#[derive(Debug, Args)]
struct ConfigArg {
    /// Path of the YAML config file.
    #[arg(long, default_value = DEFAULT_CONFIG)]
    config: PathBuf,
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Print a fresh random token (line 1) and its sha256: line for the config (line 2).
    New,
    /// Read a token on stdin and print its sha256: line (exit 2 when stdin is empty).
    Hash,
}

#[derive(Debug, Subcommand)]
enum AuditCommand {
    /// Check every hash-chain link from seq 1 (or --from-seq). Exit 0: intact;
    /// 1: tampering or a broken chain; 2: usage or I/O error; 3: intact but for a torn
    /// final line.
    Verify(VerifyArgs),
    /// Select audit records (exit 2 on a usage or I/O error).
    Query(QueryArgs),
}

/// Parses the command line and runs it.
pub fn run() -> ExitCode {
    // Before any secret is read. Not fatal: a host that forbids these calls has not made
    // the process any less safe than it was.
    if let Err(err) = crate::hardening::forbid_core_dumps() {
        write_stderr(&format!("warning: cannot turn core dumps off: {err}\n"));
    }
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(arg) => report(crate::server::run_serve(arg.config)),
        Command::CheckConfig(arg) => check_config(&arg.config),
        Command::Demo => report(crate::demo::run()),
        Command::Token(TokenCommand::New) => token_new(),
        Command::Token(TokenCommand::Hash) => token_hash(),
        Command::Audit(AuditCommand::Verify(args)) => run_verify(&args),
        Command::Audit(AuditCommand::Query(args)) => run_query(&args),
        Command::Simulator(args) => report(
            crate::server::build_runtime(1)
                .map_err(anyhow::Error::from)
                .and_then(|runtime| runtime.block_on(run_standalone(args))),
        ),
    }
}

/// Writes `text` to stdout. `print!` would panic (and, with `panic = "abort"`, abort
/// with SIGABRT) when the reader has gone away (`| head`); this returns the error so
/// that each command decides what it means for its exit code.
pub(crate) fn write_stdout(text: &str) -> io::Result<()> {
    let mut out = io::stdout().lock();
    out.write_all(text.as_bytes())?;
    out.flush()
}

/// Writes `text` to stderr, ignoring errors: with stderr gone there is nowhere left to
/// report anything, and `eprint!` would panic instead.
pub(crate) fn write_stderr(text: &str) {
    let _ = io::stderr().lock().write_all(text.as_bytes());
}

fn report(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            write_stderr(&format!("error: {}\n", error_chain(&err)));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes, each said once: most of our errors already include their
/// source's message, which `{:#}` would repeat.
fn error_chain(err: &anyhow::Error) -> String {
    crate::causes::one_line(err.chain())
}

fn check_config(path: &Path) -> ExitCode {
    let config = match Config::load(path) {
        Ok(config) => config,
        Err(err) => {
            write_stderr(&format!(
                "{}: invalid configuration:\n{err}\n",
                path.display()
            ));
            return ExitCode::FAILURE;
        }
    };
    if let Err(err) = crate::audit::check_writable(&config.audit.path) {
        write_stderr(&format!("{}: audit.path: {err}\n", path.display()));
        return ExitCode::FAILURE;
    }
    if let Err(err) = crate::upstream::PlivoClient::new(&config.upstream) {
        write_stderr(&format!("{}: upstream: {err}\n", path.display()));
        return ExitCode::FAILURE;
    }
    for warning in config.warnings() {
        write_stderr(&format!("{}: warning: {warning}\n", path.display()));
    }
    let out = format!("{}{}: configuration OK\n", config.summary(), path.display());
    // The exit code is the verdict on the config; a reader that went away cannot
    // change it (like `audit verify`).
    let _ = write_stdout(&out);
    ExitCode::SUCCESS
}

fn token_new() -> ExitCode {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    let token = format!(
        "mpcgw_{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    );
    let hash = TokenHash::of(token.as_bytes()).to_config_string();
    print_product(&format!("{token}\n{hash}\n"))
}

/// Prints what the command exists to produce (a token, a hash line): when it cannot be
/// written, the command failed.
fn print_product(text: &str) -> ExitCode {
    match write_stdout(text) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            write_stderr(&format!("error: cannot write to stdout: {err}\n"));
            ExitCode::FAILURE
        }
    }
}

fn token_hash() -> ExitCode {
    let mut input = Vec::new();
    if let Err(err) = io::stdin().lock().read_to_end(&mut input) {
        write_stderr(&format!("error: cannot read the token from stdin: {err}\n"));
        return ExitCode::from(2);
    }
    let token = strip_one_newline(&input);
    if token.is_empty() {
        write_stderr("error: no token on stdin\n");
        return ExitCode::from(2);
    }
    print_product(&format!("{}\n", TokenHash::of(token).to_config_string()))
}

/// `echo token |` adds one newline (`\r\n` on some terminals); strip exactly that.
fn strip_one_newline(input: &[u8]) -> &[u8] {
    let input = input.strip_suffix(b"\n").unwrap_or(input);
    input.strip_suffix(b"\r").unwrap_or(input)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_exactly_one_trailing_newline() {
        assert_eq!(strip_one_newline(b"abc\n"), b"abc");
        assert_eq!(strip_one_newline(b"abc\r\n"), b"abc");
        assert_eq!(strip_one_newline(b"abc\n\n"), b"abc\n");
        assert_eq!(strip_one_newline(b"abc"), b"abc");
    }

    #[test]
    fn error_chain_says_each_cause_once() {
        let io = std::io::Error::new(std::io::ErrorKind::AddrInUse, "Address already in use");
        let err = anyhow::Error::new(crate::server::StartError::Bind {
            addr: ([127, 0, 0, 1], 8080).into(),
            source: io,
        })
        .context("starting the gateway");
        assert_eq!(
            error_chain(&err),
            "starting the gateway: cannot listen on 127.0.0.1:8080: Address already in use"
        );
    }

    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
