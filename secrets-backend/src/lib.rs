//! rekey's backend: versioned secrets, the rotation engine, the `rekey.v1`
//! gRPC API, and the `rekey` operator CLI.
//!
//! The binaries are thin: `rekey-backend` loads a [`config::Config`] and
//! calls [`server::run`]; `rekey` calls [`cli::main`].

pub mod audit;
pub mod auth;
pub mod cli;
pub mod config;
pub mod convert;
pub mod demo;
pub mod engine;
pub mod error;
pub mod hub;
pub mod kinds;
pub mod metrics;
pub mod reencrypt_cmd;
pub mod schedule;
pub mod server;
pub mod service;
pub mod store;
pub mod telemetry;
