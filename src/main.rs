#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    mpc_gateway::cli::run()
}
