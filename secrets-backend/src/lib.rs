//! rekey's backend: versioned secrets, the rotation engine and the
//! `rekey.v1` gRPC API. The operator CLI is a client of that API and lives
//! in its own crate (`rekey-cli`).
//!
//! The binaries are thin: `rekey-backend` loads a [`config::Config`] and
//! calls [`server::run`]; `rekey-lambda`, the rotation function AWS Secrets
//! Manager calls, runs [`lambda::run`].

mod audit;
mod auth;
mod clock;
pub mod config;
mod convert;
mod engine;
mod error;
mod front;
mod hub;
mod kinds;
pub mod lambda;
mod limits;
mod metrics;
mod provider;
mod schedule;
pub mod server;
mod service;
mod store;
pub mod telemetry;
