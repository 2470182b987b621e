//! rekey's backend: versioned secrets, the rotation engine and the
//! `rekey.v1` gRPC API. The operator CLI is a client of that API and lives
//! in its own crate (`rekey-cli`).
//!
//! The binary is thin: `rekey-backend` loads a [`config::Config`] and calls
//! [`server::run`].

pub mod audit;
pub mod auth;
pub mod config;
pub mod convert;
pub mod engine;
pub mod error;
pub mod hub;
pub mod kinds;
pub mod metrics;
pub mod schedule;
pub mod server;
pub mod service;
pub mod store;
pub mod telemetry;
