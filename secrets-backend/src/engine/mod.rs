//! The rotation engine: one state machine for every kind, and the only door
//! to rekey's store.
//!
//! ```text
//! create ──► set ──► test ──► finish          (rotate)
//!   │         │        │
//!   └─────────┴────────┴──► needs-attention: pending revoked, current untouched
//! previous ──► revoked                        (decommission / revoke)
//! previous ◄─► current                        (rollback)
//! ```
//!
//! Each step's state is persisted in the `rotations` table before the next
//! one starts, so a backend that dies between two steps resumes the rotation
//! on restart ([`Engine::recover`]); a step that fails rolls the rotation
//! back. Stage pointers live on the secret row and change only in
//! compare-and-swap updates on its revision, which keeps AWS Secrets
//! Manager's invariants: pending is on no version outside a rotation, and
//! moving current moves previous.
//!
//! Values live with the secret's [`ValueProvider`]; the engine calls it
//! outside any store transaction and records the reference it returns. The
//! gRPC layer calls the engine and nothing else: reads, reveals, reports
//! and audit events all pass through here.
//!
//! The work is split by responsibility: [`create`], [`rotate`], the step
//! [`drive`]r, [`stop`] (parked and cancelled rotations, recovery),
//! [`rollback`], [`decommission`] (revoke and its conditions),
//! [`scheduler`] (due rotations, consumer gauges, the scheduler pass),
//! [`status`] (reads, reports, audit), [`watch`] (snapshots for Watch
//! streams) and [`outside`] (changes made where a provider keeps the
//! values).

mod create;
mod decommission;
mod drive;
mod group;
mod outside;
mod refusals;
mod reports;
mod rollback;
mod rotate;
mod scheduler;
mod status;
mod stop;
mod tokens;
mod watch;

#[cfg(test)]
mod tests;

use std::collections::{BTreeSet, HashSet};
use std::sync::atomic::AtomicI64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rekey_keyring::SecretValue;

use crate::audit::{self, NewEvent};
use crate::error::{Error, Result};
use crate::hub::Hub;
use crate::kinds::{Kind, KindOptions, Kinds, SecretCtx, ValueInput};
use crate::metrics::Metrics;
use crate::provider::{Location, Providers, Stored, ValueProvider, Which};
use crate::store::{SecretRow, Store, Tx, VersionRow};

pub(crate) use refusals::loggable;
pub(crate) use status::{AuditPage, ReencryptionReport, SecretStatus, Selector, ServedReport};
pub(crate) use tokens::TokenSpec;

/// Who asked, for the audit log.
#[derive(Debug, Clone)]
pub(crate) struct Actor {
    pub(crate) identity: String,
    pub(crate) request_id: String,
}

impl Actor {
    pub(crate) fn system(name: &str) -> Self {
        Self {
            identity: name.into(),
            request_id: new_request_id(),
        }
    }
}

/// A random request id for calls that did not bring one.
pub(crate) fn new_request_id() -> String {
    rekey_keyring::random_bytes(8)
        .map(|b| hex::encode(b.expose()))
        .unwrap_or_default()
}

/// Everything `create` needs.
#[derive(Debug, Default)]
pub(crate) struct CreateSpec {
    pub(crate) id: String,
    pub(crate) kind: String,
    /// The request's kind options, before the kind checks them.
    pub(crate) options: KindOptions,
    /// Where the values live: a configured provider's name, or empty for
    /// the embedded store.
    pub(crate) provider: String,
    /// The provider's address for the secret; empty: the secret id.
    pub(crate) provider_path: String,
    pub(crate) schedule_spec: String,
    pub(crate) rotation_window_ms: i64,
    pub(crate) jitter_ms: i64,
    pub(crate) min_interval_ms: i64,
    pub(crate) next_override_ms: i64,
    pub(crate) validation_window_ms: i64,
    pub(crate) value: Option<SecretValue>,
}

/// The result of a call that returns one version.
#[derive(Debug, Clone)]
pub(crate) struct Outcome {
    pub(crate) secret: SecretRow,
    pub(crate) version: VersionRow,
    pub(crate) replayed: bool,
}

/// Validation window when a `CreateSecret` call gives none (the runbook's
/// 30 to 60 minutes).
pub(crate) const DEFAULT_VALIDATION_WINDOW_MS: i64 = 30 * 60 * 1000;
/// Attempts at a compare-and-swap before giving up under contention.
const CAS_ATTEMPTS: usize = 20;

/// The engine's tunables, from `[engine]` and `[consumers]`.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    /// Pause before each step (demonstrations and crash tests only).
    pub(crate) step_delay: Duration,
    /// Attempts per set / test step before the rotation is parked.
    pub(crate) step_attempts: u32,
    /// Pause before the second attempt; doubles each time.
    pub(crate) step_backoff: Duration,
    /// A consumer that has not reported for this long is not live.
    pub(crate) consumer_ttl: Duration,
    /// The largest value, in bytes of its stored form.
    pub(crate) max_value_bytes: usize,
    /// How often, at most, refusals before authentication are audited as
    /// one summary.
    pub(crate) refusal_summary_interval: Duration,
    /// Scheduled rotations and decommissions running at once, each for
    /// a secret of its own.
    pub(crate) scheduler_concurrency: usize,
}

pub(crate) struct Engine {
    store: Arc<Store>,
    kinds: Kinds,
    providers: Providers,
    hub: Hub,
    metrics: Arc<Metrics>,
    settings: Settings,
    /// When the consumer gauges were last recomputed (Unix ms), so that
    /// consumers that stopped reporting drop out of them.
    consumers_refreshed_at: AtomicI64,
    /// Secrets with new consumer reports since the last scheduler pass.
    /// Gauges are recomputed there, once per secret, not per report: a
    /// rotation makes every sidecar report at once.
    consumers_dirty: Mutex<BTreeSet<String>>,
    /// Consumer reports waiting to be committed together.
    reports: reports::ReportQueue,
    /// Audit events of Watch streams opened, waiting to be appended
    /// together.
    watch_opens: group::GroupCommit<Vec<NewEvent>>,
    /// Secrets whose rollback is writing to their provider right now (an
    /// outside change seen then is rekey's own write).
    rolling_back: Mutex<HashSet<String>>,
    /// The newest audit event this backend appended or saw in the store.
    audit_head: Mutex<Option<audit::Head>>,
    /// Calls refused before authentication, not yet summarized.
    refusals: Mutex<refusals::Refusals>,
    /// Secrets with scheduler work (a rotation, a decommission) running.
    scheduled: Mutex<HashSet<String>>,
    /// Slots for that work: `scheduler_concurrency`.
    slots: Arc<tokio::sync::Semaphore>,
}

/// Secret ids look like paths: `prod/api/database`.
pub(crate) fn validate_id(id: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id.len() <= 256
        && !id.starts_with('/')
        && !id.ends_with('/')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./".contains(&b))
        && id
            .split('/')
            .all(|seg| !seg.is_empty() && seg != "." && seg != "..");
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "secret id {id:?}: use 1 to 256 characters of letters, digits, - _ . and / between non-empty segments (e.g. prod/api/database)"
        )))
    }
}

/// Names the step a kind's failure happened in.
fn step_error(secret: &str, step: &'static str, e: Error) -> Error {
    match e {
        Error::Step { .. } => e,
        other => Error::Step {
            secret: secret.to_string(),
            step,
            message: other.to_string(),
        },
    }
}

/// Where `s` keeps its values.
fn location(s: &SecretRow) -> Location<'_> {
    Location {
        secret_id: &s.id,
        path: if s.provider_path.is_empty() {
            &s.id
        } else {
            &s.provider_path
        },
    }
}

fn stored(v: &VersionRow) -> Stored<'_> {
    Stored {
        version: v.version,
        value_ref: &v.value_ref,
    }
}

impl Engine {
    pub(crate) fn new(
        store: Arc<Store>,
        providers: Providers,
        metrics: Arc<Metrics>,
        settings: Settings,
    ) -> Self {
        Self::with_kinds(store, Kinds::default(), providers, metrics, settings)
    }

    fn with_kinds(
        store: Arc<Store>,
        kinds: Kinds,
        providers: Providers,
        metrics: Arc<Metrics>,
        settings: Settings,
    ) -> Self {
        let slots = Arc::new(tokio::sync::Semaphore::new(
            settings.scheduler_concurrency.max(1),
        ));
        Self {
            store,
            kinds,
            providers,
            hub: Hub::default(),
            metrics,
            settings,
            consumers_refreshed_at: AtomicI64::new(0),
            consumers_dirty: Mutex::default(),
            reports: reports::ReportQueue::default(),
            watch_opens: group::GroupCommit::default(),
            rolling_back: Mutex::default(),
            audit_head: Mutex::default(),
            refusals: Mutex::default(),
            scheduled: Mutex::default(),
            slots,
        }
    }

    pub(crate) fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    fn check_supplied(
        kind: &dyn Kind,
        ctx: &SecretCtx<'_>,
        value: Option<&SecretValue>,
    ) -> Result<()> {
        match (kind.value_input(), value) {
            (ValueInput::Never, Some(_)) => Err(Error::InvalidArgument(format!(
                "{} secrets generate their own values; do not supply one",
                kind.name()
            ))),
            (ValueInput::Required, None) => Err(Error::InvalidArgument(format!(
                "{} secrets need a supplied value (--value-file)",
                kind.name()
            ))),
            (_, Some(v)) => kind.check_value(ctx, v),
            _ => Ok(()),
        }
    }

    /// Refuses a value larger than `limits.max_value_bytes`: every copy
    /// of it (store, Watch events with current and previous, sidecars,
    /// files) stays bounded.
    fn check_size(&self, id: &str, value: &SecretValue) -> Result<()> {
        // A single value's bytes; a structured value's names and values.
        let n = match value {
            SecretValue::Raw(b) => b.len(),
            SecretValue::Fields(m) => m.iter().map(|(k, v)| k.len() + v.expose().len()).sum(),
        };
        if n > self.settings.max_value_bytes {
            return Err(Error::InvalidArgument(format!(
                "the value of {id} is {n} bytes; values are limited to {} bytes (limits.max_value_bytes)",
                self.settings.max_value_bytes
            )));
        }
        Ok(())
    }

    async fn pause(&self) {
        if !self.settings.step_delay.is_zero() {
            tokio::time::sleep(self.settings.step_delay).await;
        }
    }

    fn provider(&self, s: &SecretRow) -> Result<Arc<dyn ValueProvider>> {
        self.providers.get(&s.provider)
    }

    /// One version's value, from the secret's provider.
    async fn value_of(&self, s: &SecretRow, v: &VersionRow) -> Result<SecretValue> {
        self.provider(s)?
            .read(location(s), Which::Version(stored(v)))
            .await
    }

    /// The metadata and value of version `n` of `s`.
    async fn version_and_value(&self, s: &SecretRow, n: i64) -> Result<(VersionRow, SecretValue)> {
        let v = {
            let mut c = self.store.conn().await?;
            self.store.require_version(&mut c, &s.id, n).await?
        };
        let value = self.value_of(s, &v).await?;
        Ok((v, value))
    }

    async fn require_secret(&self, id: &str) -> Result<SecretRow> {
        let mut c = self.store.conn().await?;
        self.store.require_secret(&mut c, id).await
    }

    /// Records the servers a kind's step left version `n`'s value on
    /// (nothing for a kind that does not say).
    async fn record_nodes(&self, id: &str, n: i64, nodes: crate::kinds::Nodes) -> Result<()> {
        if let Some(nodes) = nodes {
            let mut c = self.store.conn().await?;
            self.store.set_version_nodes(&mut c, id, n, &nodes).await?;
        }
        Ok(())
    }

    /// Logs an event that was committed and moves the published head.
    fn published(&self, ev: &audit::Event) {
        audit::log_event(ev);
        let mut head = self
            .audit_head
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if head.as_ref().is_none_or(|h| h.seq < ev.seq) {
            self.metrics.set_audit_head(ev.seq, &ev.hash);
            *head = Some(ev.head());
        }
    }

    /// Appends an audit event inside `tx` and tells other replicas that
    /// the secret changed; the caller commits and then logs the event.
    async fn record(&self, tx: &mut Tx, ev: NewEvent) -> Result<audit::Event> {
        let id = ev.secret_id.clone();
        let ev = audit::append_in(&self.store, tx, ev, crate::clock::now_ms()).await?;
        self.store.notify(tx, &id).await?;
        Ok(ev)
    }
}

/// `s` with version `n` current and the old current previous, and the
/// version that pushes out of previous (0 when none).
fn with_current(s: &SecretRow, n: i64, now: i64) -> Result<(SecretRow, i64)> {
    let mut next = s.clone();
    next.previous_version = s.current_version;
    next.current_version = n;
    if next.pending_version == n {
        next.pending_version = 0;
    }
    next.latest_version = next.latest_version.max(n);
    next.last_rotated_at_ms = now;
    if next.next_override_ms <= now {
        next.next_override_ms = 0;
    }
    next.next_rotation_at_ms = crate::schedule::next_rotation(&next, now)?;
    next.revision = s.revision + 1;
    Ok((next, s.previous_version))
}

impl Engine {
    /// Stores `next` in place of `s` (a compare-and-swap on its revision)
    /// and revokes the version displaced from previous, in `tx`. Returns
    /// the audit detail, or `None` when another writer changed the secret
    /// first.
    async fn store_promotion(
        &self,
        tx: &mut Tx,
        s: &SecretRow,
        next: &SecretRow,
        displaced: i64,
        now: i64,
    ) -> Result<Option<String>> {
        if !self.store.update_secret(tx, next, s.revision).await? {
            return Ok(None);
        }
        let mut detail = format!("v{} is now previous", s.current_version);
        if displaced > 0 {
            self.store
                .set_version_state(
                    tx,
                    &s.id,
                    displaced,
                    crate::store::VersionState::Revoked,
                    now,
                )
                .await?;
            detail.push_str("; v");
            detail.push_str(&displaced.to_string());
            detail.push_str(" revoked (displaced from previous)");
        }
        Ok(Some(detail))
    }
}

/// An audit event for a change `actor` made.
fn event(
    actor: &Actor,
    action: &str,
    secret: &str,
    version: i64,
    outcome: &str,
    detail: String,
) -> NewEvent {
    NewEvent {
        actor: actor.identity.clone(),
        action: action.into(),
        secret_id: secret.into(),
        version,
        outcome: outcome.into(),
        request_id: actor.request_id.clone(),
        detail,
    }
}
