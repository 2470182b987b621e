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

/// Formats Unix milliseconds as RFC 3339 UTC with milliseconds, e.g.
/// `2026-11-26T12:28:15.123Z`.
pub fn format_time(ms: i64) -> String {
    use chrono::TimeZone;
    match chrono::Utc.timestamp_millis_opt(ms).single() {
        Some(t) => t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        None => String::from("-"),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn times_are_rfc3339_utc_with_millis() {
        assert_eq!(
            super::format_time(1_795_000_000_123),
            "2026-11-18T11:06:40.123Z"
        );
    }
}
