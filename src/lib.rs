//! mpc-gateway: the only holder of the Plivo credentials. Internal services ask it to end
//! a multiparty call (MPC); it authenticates, authorizes, rate-limits and audits the
//! request before it sends the authenticated DELETE to Plivo.
//!
//! The request path, in order, lives in [`gateway`]; everything else is one concern per
//! module.
#![forbid(unsafe_code)]

pub mod admin;
pub mod audit;
pub mod auth;
mod causes;
pub mod cli;
pub mod config;
pub mod demo;
pub mod files;
pub mod gateway;
pub mod hardening;
mod millis;
pub mod mpc_name;
pub mod problem;
pub mod rate_limit;
pub mod request_id;
pub mod routes;
pub mod server;
pub mod simulator;
mod sync;
pub mod telemetry;
pub mod tls;
pub mod upstream;
