//! Wall-clock time in the API's unit: milliseconds since the Unix epoch,
//! UTC. One place, so the engine, the hub and the store agree on it.

/// Milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}
