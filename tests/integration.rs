//! The integration suite as one test binary: each module below was its own binary, and
//! linking fourteen copies of the gateway and its dependencies cost minutes of CI and
//! gigabytes of disk. Test names are `module::test`, e.g.
//! `cargo test --test integration gateway::`.

mod common;

mod cli;
mod crash;
mod faults;
mod fuzz_regressions;
mod gateway;
mod hostile;
mod mtls;
mod ops;
mod python_sdk;
mod redis_gateway;
mod redis_limits;
mod sdk_route;
mod upstream_h2;
