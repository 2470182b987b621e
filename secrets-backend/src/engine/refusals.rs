//! Calls refused before authentication cost almost nothing: each is
//! counted in a metric at once, logged at most once per ten seconds (with
//! how many were not logged), and kept in the audit log only as a summary,
//! at most one per `audit.refusal_summary_interval`, of how many calls of
//! each method were refused. Nobody without a token can grow the audit
//! log or the log file, or slow down the calls of those with one.
//!
//! An identity's calls refused for lack of rights are bounded the same
//! way: the first [`DENIED_RECORDED`] of each interval are audit events
//! of their own (with their log lines), the rest of the interval are
//! counted per action and audited as one summary per identity. A token
//! with rights on nothing cannot grow the audit log, fill the log file or
//! hold up the store's writer by calling again and again.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use super::{Actor, Engine};
use crate::audit::{self, NewEvent};
use crate::clock::now_ms;
use crate::metrics::MethodLabels;

/// Lines about refused calls are at least this far apart.
const LOG_EVERY: Duration = Duration::from_secs(10);

/// Refusals for lack of rights audited one by one, per identity and
/// summary interval; the rest of the interval are summarized.
pub(super) const DENIED_RECORDED: u32 = 10;

/// One identity's refusals for lack of rights in the current interval.
#[derive(Default)]
struct Denied {
    /// When the interval started.
    since: Option<Instant>,
    /// Audited one by one in it.
    recorded: u32,
    /// Counted, per action, not audited yet.
    counted: BTreeMap<String, u64>,
    first_ms: i64,
    last_ms: i64,
}

/// Refusals not yet written to the audit log.
#[derive(Default)]
pub(super) struct Refusals {
    by_method: BTreeMap<&'static str, u64>,
    first_ms: i64,
    last_ms: i64,
    /// When the last summary was written.
    summarized: Option<Instant>,
    /// When the last line was logged, and how many refusals were not.
    logged: Option<Instant>,
    unlogged: u64,
    /// Refusals for lack of rights, per identity.
    denied: BTreeMap<String, Denied>,
}

/// A secret id as logs may show it: at most 64 characters, escaped.
pub(crate) fn loggable(id: &str) -> String {
    let mut out: String = id.chars().take(64).flat_map(char::escape_debug).collect();
    if id.chars().count() > 64 {
        out.push('…');
    }
    out
}

impl Engine {
    fn refusals(&self) -> std::sync::MutexGuard<'_, Refusals> {
        self.refusals
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Counts a call of `method` refused before authentication.
    pub(crate) fn refused_unauthenticated(&self, method: &'static str, secret: &str, why: &str) {
        self.metrics
            .unauthenticated
            .get_or_create(&MethodLabels {
                method: method.into(),
            })
            .inc();
        let now = now_ms();
        let mut r = self.refusals();
        *r.by_method.entry(method).or_default() += 1;
        if r.first_ms == 0 {
            r.first_ms = now;
        }
        r.last_ms = now;
        if r.logged.is_none_or(|t| t.elapsed() >= LOG_EVERY) {
            let unlogged = std::mem::take(&mut r.unlogged);
            r.logged = Some(Instant::now());
            drop(r);
            tracing::info!(
                method,
                secret = %loggable(secret),
                error = why,
                not_logged_since_last = unlogged,
                "call refused before authentication"
            );
        } else {
            r.unlogged += 1;
        }
    }

    /// Whether a call of `identity` refused for lack of rights is only
    /// counted (the identity had its [`DENIED_RECORDED`] audit events in
    /// this interval) rather than audited by itself.
    pub(super) fn count_denied(&self, identity: &str, action: &str) -> bool {
        let interval = self.settings.refusal_summary_interval;
        let now = now_ms();
        let mut r = self.refusals();
        let d = r.denied.entry(identity.to_string()).or_default();
        if d.since.is_none_or(|t| t.elapsed() >= interval) {
            d.since = Some(Instant::now());
            d.recorded = 0;
        }
        if d.recorded < DENIED_RECORDED {
            d.recorded += 1;
            return false;
        }
        *d.counted.entry(action.to_string()).or_default() += 1;
        if d.first_ms == 0 {
            d.first_ms = now;
        }
        d.last_ms = now;
        true
    }

    /// One audit event per identity whose refusals were counted and not
    /// audited one by one.
    async fn summarize_denied(&self) {
        let events: Vec<NewEvent> = {
            let mut r = self.refusals();
            r.denied.retain(|_, d| {
                !d.counted.is_empty()
                    || d.since
                        .is_some_and(|t| t.elapsed() < self.settings.refusal_summary_interval)
            });
            r.denied
                .iter_mut()
                .filter(|(_, d)| !d.counted.is_empty())
                .map(|(identity, d)| {
                    let counts = std::mem::take(&mut d.counted);
                    let total: u64 = counts.values().sum();
                    let per_action: Vec<String> =
                        counts.iter().map(|(a, n)| format!("{a} {n}")).collect();
                    let detail = format!(
                        "{total} more call(s) refused for lack of rights from {} to {}: {}",
                        rekey_proto::format_time(d.first_ms),
                        rekey_proto::format_time(d.last_ms),
                        per_action.join(", ")
                    );
                    d.first_ms = 0;
                    NewEvent {
                        actor: identity.clone(),
                        action: "refused-permission".into(),
                        secret_id: String::new(),
                        version: 0,
                        outcome: "permission_denied".into(),
                        request_id: super::new_request_id(),
                        detail,
                    }
                })
                .collect()
        };
        for ev in events {
            match audit::append(&self.store, ev, now_ms()).await {
                Ok(ev) => self.published(&ev),
                Err(e) => tracing::error!(error = %e, "cannot append a refusal summary"),
            }
        }
    }

    /// Writes the refusals counted since the last summary as one audit
    /// event, when the interval has passed (or `now` is set, at shutdown).
    pub(crate) async fn summarize_refusals(&self, now: bool) {
        let ev = {
            let mut r = self.refusals();
            let due = r
                .summarized
                .is_none_or(|t| t.elapsed() >= self.settings.refusal_summary_interval);
            let denied = r.denied.values().any(|d| !d.counted.is_empty());
            if !(due || now) || (r.by_method.is_empty() && !denied) {
                return;
            }
            r.summarized = Some(Instant::now());
            if r.by_method.is_empty() {
                None
            } else {
                let counts = std::mem::take(&mut r.by_method);
                let total: u64 = counts.values().sum();
                let per_method: Vec<String> =
                    counts.iter().map(|(m, n)| format!("{m} {n}")).collect();
                let detail = format!(
                    "{total} call(s) refused before authentication from {} to {}: {}",
                    rekey_proto::format_time(r.first_ms),
                    rekey_proto::format_time(r.last_ms),
                    per_method.join(", ")
                );
                r.first_ms = 0;
                let actor = Actor::system("anonymous");
                Some(NewEvent {
                    actor: actor.identity,
                    action: "refused-unauthenticated".into(),
                    secret_id: String::new(),
                    version: 0,
                    outcome: "unauthenticated".into(),
                    request_id: actor.request_id,
                    detail,
                })
            }
        };
        if let Some(ev) = ev {
            match audit::append(&self.store, ev, now_ms()).await {
                Ok(ev) => self.published(&ev),
                Err(e) => tracing::error!(error = %e, "cannot append the refusal summary"),
            }
        }
        self.summarize_denied().await;
    }
}

#[cfg(test)]
mod tests {
    use super::loggable;

    #[test]
    fn ids_in_logs_are_short_and_escaped() {
        assert_eq!(loggable("prod/db"), "prod/db");
        assert_eq!(loggable("a\nb\u{1b}[2K"), "a\\nb\\u{1b}[2K");
        let long = "x".repeat(5000);
        assert_eq!(loggable(&long).chars().count(), 65);
    }
}
