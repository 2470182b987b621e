//! rekey's backend: versioned secrets, the rotation engine, the `rekey.v1`
//! gRPC API, and the `rekey` operator CLI.
//!
//! The binaries are thin: `rekey-backend` loads a [`config::Config`] and
//! calls [`server::run`]; `rekey` calls [`cli::main`].

mod audit;
mod auth;
pub mod cli;
mod clock;
pub mod config;
mod convert;
pub mod demo;
mod engine;
mod error;
mod front;
mod hub;
mod kinds;
mod limits;
mod metrics;
mod provider;
pub mod reencrypt_cmd;
mod schedule;
pub mod server;
mod service;
mod store;
pub mod telemetry;
