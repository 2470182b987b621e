//! rekey's backend: versioned secrets, the rotation engine and the
//! `rekey.v1` gRPC API. The operator CLI is a client of that API and lives
//! in its own crate (`rekey-cli`).
//!
//! The binary is thin: `rekey-backend` loads a [`config::Config`] and calls
//! [`server::run`].

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
mod limits;
mod metrics;
mod provider;
mod schedule;
pub mod server;
mod service;
mod store;
pub mod telemetry;
