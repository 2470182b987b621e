//! The rotation engine: one state machine for every kind.
//!
//! ```text
//! create ──► set ──► test ──► finish          (rotate)
//!   │         │        │
//!   └─────────┴────────┴──► failed: pending revoked, current untouched
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

use std::sync::Arc;
use std::time::{Duration, Instant};

use rekey_keyring::SecretValue;

use crate::audit::{self, NewEvent};
use crate::error::{Error, Result};
use crate::hub::Hub;
use crate::kinds::{Kind, Kinds, SecretCtx, ValueInput};
use crate::metrics::Metrics;
use crate::schedule;
use crate::store::{ACTIVE, REVOKED, RotationRow, SecretRow, Store, VersionRow};

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// Who asked, for the audit log.
#[derive(Debug, Clone)]
pub struct Actor {
    pub identity: String,
    pub request_id: String,
}

impl Actor {
    pub fn system(name: &str) -> Self {
        Self {
            identity: name.into(),
            request_id: new_request_id(),
        }
    }
}

/// A random request id for calls that did not bring one.
pub fn new_request_id() -> String {
    rekey_keyring::random_bytes(8)
        .map(|b| hex::encode(b.expose()))
        .unwrap_or_default()
}

/// Everything `create` needs.
#[derive(Debug, Default)]
pub struct CreateSpec {
    pub id: String,
    pub kind: String,
    /// Kind options, e.g. `{"random": {"length": 32, "encoding": "hex"}}`.
    pub options: serde_json::Value,
    pub schedule_spec: String,
    pub rotation_window_ms: i64,
    pub jitter_ms: i64,
    pub min_interval_ms: i64,
    pub next_override_ms: i64,
    pub validation_window_ms: i64,
    pub value: Option<SecretValue>,
}

/// The result of a call that returns one version.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub secret: SecretRow,
    pub version: VersionRow,
    pub replayed: bool,
}

/// Validation window when a CreateSecret call gives none (the runbook's 30
/// to 60 minutes).
pub const DEFAULT_VALIDATION_WINDOW_MS: i64 = 30 * 60 * 1000;
/// How long the scheduler waits before retrying a due rotation it claimed
/// but could not complete.
const SCHEDULE_RETRY_MS: i64 = 5 * 60 * 1000;
/// A rotation whose step failed every attempt.
pub const NEEDS_ATTENTION: &str = "needs-attention";
/// How often, at most, the scheduler recomputes the consumer gauges (a
/// quarter of the consumer TTL when that is shorter).
const CONSUMER_GAUGE_REFRESH_MS: i64 = 15_000;
/// Attempts at a compare-and-swap before giving up under contention.
const CAS_ATTEMPTS: usize = 20;

pub struct Engine {
    pub store: Arc<Store>,
    pub kinds: Kinds,
    pub hub: Arc<Hub>,
    pub metrics: Arc<Metrics>,
    /// Pause before each step (demonstrations and crash tests only).
    pub step_delay: Duration,
    /// Attempts per set / test step before the rotation is parked.
    pub step_attempts: u32,
    /// Pause before the second attempt; doubles each time.
    pub step_backoff: Duration,
    pub consumer_ttl: Duration,
    /// When the consumer gauges were last recomputed (Unix ms), so that
    /// consumers that stopped reporting drop out of them.
    pub consumers_refreshed_at: std::sync::atomic::AtomicI64,
    /// Secrets with new consumer reports since the last scheduler pass.
    /// Gauges are recomputed there, once per secret, not per report: a
    /// rotation makes every sidecar report at once.
    pub consumers_dirty: std::sync::Mutex<std::collections::BTreeSet<String>>,
}

/// Secret ids look like paths: `prod/api/database`.
pub fn validate_id(id: &str) -> Result<()> {
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

impl Engine {
    fn options(s: &SecretRow) -> Result<serde_json::Value> {
        serde_json::from_str(&s.options)
            .map_err(|e| Error::Internal(format!("options of {}: {e}", s.id)))
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

    async fn pause(&self) {
        if !self.step_delay.is_zero() {
            tokio::time::sleep(self.step_delay).await;
        }
    }

    /// Creates a secret and stores version 1 as current (after the kind's
    /// set and test steps, so that a credential exists before anybody is
    /// handed it).
    pub async fn create_secret(&self, actor: &Actor, spec: CreateSpec) -> Result<Outcome> {
        let started = Instant::now();
        validate_id(&spec.id)?;
        let kind = self.kinds.get(&spec.kind)?;
        let options = kind.check_options(&spec.options)?;
        schedule::parse(&spec.schedule_spec)?;
        for (name, v) in [
            ("validation window", spec.validation_window_ms),
            ("rotation window", spec.rotation_window_ms),
            ("jitter", spec.jitter_ms),
            ("minimum interval", spec.min_interval_ms),
        ] {
            if v < 0 {
                return Err(Error::InvalidArgument(format!(
                    "{name} must not be negative"
                )));
            }
        }
        {
            let mut c = self.store.conn().await?;
            if self.store.get_secret(&mut c, &spec.id).await?.is_some() {
                return Err(Error::AlreadyExists(format!("secret {}", spec.id)));
            }
        }
        let ctx = SecretCtx {
            id: &spec.id,
            options: &options,
        };
        Self::check_supplied(kind.as_ref(), &ctx, spec.value.as_ref())?;
        let value = kind.create(&ctx, None, spec.value).await?;
        kind.set(&ctx, &value, None)
            .await
            .map_err(|e| step_error(&spec.id, "set", e))?;
        kind.test(&ctx, &value)
            .await
            .map_err(|e| step_error(&spec.id, "test", e))?;

        let now = now_ms();
        let mut row = SecretRow {
            id: spec.id.clone(),
            kind: kind.name().into(),
            options: options.to_string(),
            schedule_spec: spec.schedule_spec.trim().to_string(),
            rotation_window_ms: spec.rotation_window_ms,
            jitter_ms: spec.jitter_ms,
            min_interval_ms: spec.min_interval_ms,
            next_override_ms: spec.next_override_ms,
            validation_window_ms: spec.validation_window_ms,
            created_at_ms: now,
            current_version: 1,
            latest_version: 1,
            revision: 1,
            ..Default::default()
        };
        row.next_rotation_at_ms = schedule::next_rotation(&row, now)?;
        let mut tx = self.store.begin().await?;
        self.store.insert_secret(&mut tx, &row).await?;
        let version = self
            .store
            .insert_version(&mut tx, &row.id, 1, now, &value)
            .await?;
        let ev = audit::append_in(
            &self.store,
            &mut tx,
            NewEvent {
                actor: actor.identity.clone(),
                action: "create".into(),
                secret_id: row.id.clone(),
                version: 1,
                outcome: "ok".into(),
                request_id: actor.request_id.clone(),
                detail: format!("kind {}", row.kind),
            },
            now,
        )
        .await?;
        self.store.notify(&mut tx, &row.id).await?;
        tx.commit().await?;
        audit::log_event(&ev);
        self.metrics.step("create", started.elapsed().as_secs_f64());
        tracing::info!(secret = %row.id, kind = %row.kind, version = 1, "secret created");
        self.hub.refresh(&row.id).await;
        Ok(Outcome {
            secret: row,
            version,
            replayed: false,
        })
    }

    /// Runs one rotation to its end (or its failure). With a request token,
    /// a retry returns the version the first call created.
    pub async fn rotate(
        &self,
        actor: &Actor,
        id: &str,
        request_token: Option<&str>,
        supplied: Option<SecretValue>,
    ) -> Result<Outcome> {
        let started = Instant::now();
        if let Some(t) = request_token
            && (t.is_empty() || t.len() > 128)
        {
            return Err(Error::InvalidArgument(
                "request token must be 1 to 128 characters".into(),
            ));
        }
        // A keyed fingerprint of the input, so that a replay can be told
        // from a reuse of the token with another value without storing
        // anything a value could be recovered from.
        let fp = {
            let mut input = id.as_bytes().to_vec();
            input.push(0);
            if let Some(v) = &supplied {
                input.extend_from_slice(v.to_storage_bytes().expose());
            }
            let fp = hex::encode(self.store.kek().fingerprint(b"rotate request", &input));
            zeroize::Zeroize::zeroize(&mut input);
            fp
        };

        let mut c = self.store.conn().await?;
        let s = self.store.require_secret(&mut c, id).await?;
        if let Some(tok) = request_token
            && let Some((seen_fp, version)) = self.store.get_request_token(&mut c, id, tok).await?
        {
            drop(c);
            if !rekey_keyring::ct_eq(seen_fp.as_bytes(), fp.as_bytes()) {
                return Err(Error::AlreadyExists(format!(
                    "request token {tok:?} was already used for a different rotation of {id}"
                )));
            }
            return self.replay(id, version).await;
        }
        drop(c);

        let kind = self.kinds.get(&s.kind)?;
        let options = Self::options(&s)?;
        let ctx = SecretCtx {
            id,
            options: &options,
        };
        self.check_rotatable(&s, kind.as_ref())?;
        Self::check_supplied(kind.as_ref(), &ctx, supplied.as_ref())?;
        let current = {
            let mut c = self.store.conn().await?;
            self.store
                .version_value(&mut c, id, s.current_version)
                .await?
        };
        let value = kind.create(&ctx, Some(&current), supplied).await?;
        drop(current);

        let mut attempt = 0;
        let target = loop {
            attempt += 1;
            let mut tx = self.store.begin().await?;
            let s = self.store.require_secret(&mut tx, id).await?;
            if let Some(tok) = request_token
                && let Some((seen_fp, version)) =
                    self.store.get_request_token(&mut tx, id, tok).await?
            {
                // A concurrent retry with the same token won the race.
                drop(tx);
                if !rekey_keyring::ct_eq(seen_fp.as_bytes(), fp.as_bytes()) {
                    return Err(Error::AlreadyExists(format!(
                        "request token {tok:?} was already used for a different rotation of {id}"
                    )));
                }
                return self.replay(id, version).await;
            }
            self.check_rotatable(&s, kind.as_ref())?;
            let n = s.latest_version + 1;
            let now = now_ms();
            self.store
                .insert_version(&mut tx, id, n, now, &value)
                .await?;
            let mut next = s.clone();
            next.pending_version = n;
            next.latest_version = n;
            next.revision = s.revision + 1;
            if !self.store.update_secret(&mut tx, &next, s.revision).await? {
                drop(tx);
                if attempt >= CAS_ATTEMPTS {
                    return Err(Error::FailedPrecondition(format!(
                        "{id} is changing too often to rotate; try again"
                    )));
                }
                continue;
            }
            self.store
                .insert_rotation(
                    &mut tx,
                    &RotationRow {
                        secret_id: id.into(),
                        target_version: n,
                        step: "created".into(),
                        error: String::new(),
                        actor: actor.identity.clone(),
                        request_id: actor.request_id.clone(),
                        started_at_ms: now,
                        updated_at_ms: now,
                    },
                )
                .await?;
            if let Some(tok) = request_token {
                self.store
                    .insert_request_token(&mut tx, id, tok, &fp, n, now)
                    .await?;
            }
            self.store.notify(&mut tx, id).await?;
            tx.commit().await?;
            break n;
        };
        self.metrics.step("create", started.elapsed().as_secs_f64());
        tracing::info!(secret = id, version = target, actor = %actor.identity, "rotation started");
        let result = self.drive(id, target).await;
        self.metrics
            .rotation(kind.name(), if result.is_ok() { "ok" } else { "failed" });
        result
    }

    /// The answer to a retried request: the version the first call created,
    /// once its rotation has ended.
    async fn replay(&self, id: &str, version: i64) -> Result<Outcome> {
        let mut out = self.drive(id, version).await?;
        out.replayed = true;
        Ok(out)
    }

    fn check_rotatable(&self, s: &SecretRow, kind: &dyn Kind) -> Result<()> {
        if s.pending_version != 0 {
            return Err(Error::FailedPrecondition(format!(
                "a rotation of {} to v{} is in progress",
                s.id, s.pending_version
            )));
        }
        if kind.one_rotation_at_a_time() && s.previous_version != 0 {
            return Err(Error::FailedPrecondition(format!(
                "previous v{} of {} is not decommissioned yet and may still be in use; see `rekey status {}`",
                s.previous_version, s.id, s.id
            )));
        }
        Ok(())
    }

    /// Advances a rotation from its persisted step to its end. Safe to call
    /// again after a crash, or concurrently: steps are idempotent and each
    /// advance is a compare-and-swap.
    pub async fn drive(&self, id: &str, target: i64) -> Result<Outcome> {
        loop {
            let mut c = self.store.conn().await?;
            let rot = self
                .store
                .get_rotation(&mut c, id, target)
                .await?
                .ok_or_else(|| Error::NotFound(format!("rotation of {id} to v{target}")))?;
            let s = self.store.require_secret(&mut c, id).await?;
            drop(c);
            let kind = self.kinds.get(&s.kind)?;
            let options = Self::options(&s)?;
            let ctx = SecretCtx {
                id,
                options: &options,
            };
            let started = Instant::now();
            match rot.step.as_str() {
                "created" => {
                    self.pause().await;
                    let (new, old) = self.values(id, target, s.current_version).await?;
                    if let Err(e) = self
                        .retrying(id, "set", || kind.set(&ctx, &new, old.as_ref()))
                        .await
                    {
                        return Err(self.abort(&rot, step_error(id, "set", e)).await);
                    }
                    self.advance(id, target, "created", "set").await?;
                    self.metrics.step("set", started.elapsed().as_secs_f64());
                }
                "set" => {
                    self.pause().await;
                    let (new, _) = self.values(id, target, 0).await?;
                    if let Err(e) = self.retrying(id, "test", || kind.test(&ctx, &new)).await {
                        return Err(self.abort(&rot, step_error(id, "test", e)).await);
                    }
                    self.advance(id, target, "set", "tested").await?;
                    self.metrics.step("test", started.elapsed().as_secs_f64());
                }
                "tested" => {
                    self.pause().await;
                    self.finish(&rot).await?;
                    self.metrics.step("finish", started.elapsed().as_secs_f64());
                }
                "finished" => {
                    let mut c = self.store.conn().await?;
                    let version = self.store.require_version(&mut c, id, target).await?;
                    return Ok(Outcome {
                        secret: s,
                        version,
                        replayed: false,
                    });
                }
                _ => {
                    return Err(Error::FailedPrecondition(format!(
                        "the rotation of {id} to v{target} failed: {}",
                        if rot.error.is_empty() {
                            &rot.step
                        } else {
                            &rot.error
                        }
                    )));
                }
            }
        }
    }

    /// Runs a step up to `step_attempts` times with doubling pauses.
    async fn retrying<F, Fut>(&self, id: &str, step: &str, f: F) -> Result<()>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<()>>,
    {
        let mut pause = self.step_backoff;
        let mut attempt = 1;
        loop {
            match f().await {
                Ok(()) => return Ok(()),
                Err(e) if attempt < self.step_attempts.max(1) => {
                    tracing::warn!(secret = id, step, attempt, error = %e, retry_in = ?pause, "rotation step failed; retrying");
                    tokio::time::sleep(pause).await;
                    pause = pause.saturating_mul(2);
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn values(
        &self,
        id: &str,
        target: i64,
        old: i64,
    ) -> Result<(SecretValue, Option<SecretValue>)> {
        let mut c = self.store.conn().await?;
        let new = self.store.version_value(&mut c, id, target).await?;
        let old = if old > 0 {
            Some(self.store.version_value(&mut c, id, old).await?)
        } else {
            None
        };
        Ok((new, old))
    }

    async fn advance(&self, id: &str, target: i64, from: &str, to: &str) -> Result<()> {
        let mut c = self.store.conn().await?;
        // `false` means a concurrent driver advanced it already; the loop
        // re-reads the step either way.
        self.store
            .advance_rotation(&mut c, id, target, from, to, "")
            .await?;
        Ok(())
    }

    /// finish: pending becomes current, current becomes previous. A version
    /// displaced from previous (back-to-back rotations of kinds that allow
    /// them) is revoked in the same transaction. Only kinds without a
    /// target to clean up allow back-to-back rotations (`random`, `static`),
    /// so `Kind::revoke` is not called for it; a kind with a real revoke
    /// must rotate one at a time.
    async fn finish(&self, rot: &RotationRow) -> Result<()> {
        let id = rot.secret_id.as_str();
        let target = rot.target_version;
        for _ in 0..CAS_ATTEMPTS {
            let mut tx = self.store.begin().await?;
            let s = self.store.require_secret(&mut tx, id).await?;
            if s.pending_version != target {
                // Another driver finished it; mark the step and stop.
                if s.current_version == target || s.previous_version == target {
                    self.store
                        .advance_rotation(&mut tx, id, target, "tested", "finished", "")
                        .await?;
                    tx.commit().await?;
                    return Ok(());
                }
                return Err(Error::Internal(format!(
                    "{id}: rotation to v{target} lost its pending stage"
                )));
            }
            let now = now_ms();
            let displaced = s.previous_version;
            let mut next = s.clone();
            next.previous_version = s.current_version;
            next.current_version = target;
            next.pending_version = 0;
            next.last_rotated_at_ms = now;
            if next.next_override_ms <= now {
                next.next_override_ms = 0;
            }
            next.next_rotation_at_ms = schedule::next_rotation(&next, now)?;
            next.revision = s.revision + 1;
            if !self.store.update_secret(&mut tx, &next, s.revision).await? {
                continue;
            }
            let mut detail = format!("v{} is now previous", s.current_version);
            if displaced > 0 {
                self.store
                    .set_version_state(&mut tx, id, displaced, REVOKED, now)
                    .await?;
                detail.push_str(&format!("; v{displaced} revoked (displaced from previous)"));
            }
            self.store
                .advance_rotation(&mut tx, id, target, "tested", "finished", "")
                .await?;
            let ev = audit::append_in(
                &self.store,
                &mut tx,
                NewEvent {
                    actor: rot.actor.clone(),
                    action: "rotate".into(),
                    secret_id: id.into(),
                    version: target,
                    outcome: "ok".into(),
                    request_id: rot.request_id.clone(),
                    detail,
                },
                now,
            )
            .await?;
            self.store.notify(&mut tx, id).await?;
            tx.commit().await?;
            audit::log_event(&ev);
            tracing::info!(
                secret = id,
                version = target,
                previous = s.current_version,
                "rotation finished"
            );
            self.hub.refresh(id).await;
            return Ok(());
        }
        Err(Error::FailedPrecondition(format!(
            "{id} is changing too often to finish its rotation"
        )))
    }

    /// A step that failed every attempt: the rotation is parked as
    /// `needs-attention` with its error, the pending version is revoked and
    /// its stage cleared, and current stays as it was. Scheduled rotations
    /// of the secret wait until `rekey rotate --cancel` clears it. Returns
    /// the step's error for the caller.
    async fn abort(&self, rot: &RotationRow, err: Error) -> Error {
        self.park(rot, NEEDS_ATTENTION, "failed", err).await
    }

    /// Ends a rotation that did not finish: pending revoked and cleared,
    /// the rotation row moved to `to`, an audit event with `outcome`.
    async fn park(&self, rot: &RotationRow, to: &str, outcome: &str, err: Error) -> Error {
        let id = rot.secret_id.as_str();
        let target = rot.target_version;
        tracing::warn!(secret = id, version = target, state = to, error = %err, "rotation stopped; current is unchanged");
        let r: Result<()> = async {
            for _ in 0..CAS_ATTEMPTS {
                let mut tx = self.store.begin().await?;
                let s = self.store.require_secret(&mut tx, id).await?;
                let now = now_ms();
                if s.pending_version == target {
                    let mut next = s.clone();
                    next.pending_version = 0;
                    next.revision = s.revision + 1;
                    if !self.store.update_secret(&mut tx, &next, s.revision).await? {
                        continue;
                    }
                }
                self.store
                    .set_version_state(&mut tx, id, target, REVOKED, now)
                    .await?;
                self.store
                    .advance_rotation(&mut tx, id, target, &rot.step, to, &err.to_string())
                    .await?;
                let ev = audit::append_in(
                    &self.store,
                    &mut tx,
                    NewEvent {
                        actor: rot.actor.clone(),
                        action: "rotate".into(),
                        secret_id: id.into(),
                        version: target,
                        outcome: outcome.into(),
                        request_id: rot.request_id.clone(),
                        detail: err.to_string(),
                    },
                    now,
                )
                .await?;
                self.store.notify(&mut tx, id).await?;
                tx.commit().await?;
                audit::log_event(&ev);
                return Ok(());
            }
            Err(Error::Internal(format!(
                "{id}: cannot record failed rotation"
            )))
        }
        .await;
        if let Err(e) = r {
            tracing::error!(secret = id, error = %e, "cannot roll back failed rotation; it will be retried at restart");
        }
        err
    }

    /// Makes previous current again. The kind first restores the previous
    /// credential where it lives, so nothing moves to a value that no longer
    /// works.
    pub async fn rollback(&self, actor: &Actor, id: &str) -> Result<Outcome> {
        let started = Instant::now();
        let mut c = self.store.conn().await?;
        let s = self.store.require_secret(&mut c, id).await?;
        if s.pending_version != 0 {
            return Err(Error::FailedPrecondition(format!(
                "a rotation of {id} to v{} is in progress",
                s.pending_version
            )));
        }
        if s.previous_version == 0 {
            return Err(Error::FailedPrecondition(format!(
                "{id} has no previous version to roll back to"
            )));
        }
        let prev = self
            .store
            .require_version(&mut c, id, s.previous_version)
            .await?;
        if prev.state != ACTIVE {
            return Err(Error::FailedPrecondition(format!(
                "previous v{} of {id} is revoked",
                prev.version
            )));
        }
        let value = self.store.version_value(&mut c, id, prev.version).await?;
        drop(c);
        let kind = self.kinds.get(&s.kind)?;
        let options = Self::options(&s)?;
        kind.restore(
            &SecretCtx {
                id,
                options: &options,
            },
            &value,
        )
        .await
        .map_err(|e| step_error(id, "restore", e))?;

        let mut tx = self.store.begin().await?;
        let mut next = s.clone();
        next.current_version = s.previous_version;
        next.previous_version = s.current_version;
        next.revision = s.revision + 1;
        if !self.store.update_secret(&mut tx, &next, s.revision).await? {
            return Err(Error::FailedPrecondition(format!(
                "{id} changed during the rollback; check `rekey status {id}` and retry"
            )));
        }
        let now = now_ms();
        let ev = audit::append_in(
            &self.store,
            &mut tx,
            NewEvent {
                actor: actor.identity.clone(),
                action: "rollback".into(),
                secret_id: id.into(),
                version: next.current_version,
                outcome: "ok".into(),
                request_id: actor.request_id.clone(),
                detail: format!("v{} is previous again", s.current_version),
            },
            now,
        )
        .await?;
        self.store.notify(&mut tx, id).await?;
        let mut version = prev;
        version.secret_id = id.into();
        tx.commit().await?;
        audit::log_event(&ev);
        self.metrics
            .step("rollback", started.elapsed().as_secs_f64());
        tracing::info!(secret = id, version = next.current_version, "rolled back");
        self.hub.refresh(id).await;
        Ok(Outcome {
            secret: next,
            version,
            replayed: false,
        })
    }

    /// Why previous may not be decommissioned yet; empty when it may.
    pub async fn decommission_blockers(&self, s: &SecretRow, now: i64) -> Result<Vec<String>> {
        let mut out = Vec::new();
        if s.previous_version == 0 {
            return Ok(out);
        }
        let window_end = s.last_rotated_at_ms + s.validation_window_ms;
        if window_end > now {
            out.push(format!(
                "validation window ends at {}",
                rekey_proto::format_time(window_end)
            ));
        }
        let mut c = self.store.conn().await?;
        let ttl = self.consumer_ttl.as_millis() as i64;
        let behind: Vec<String> = self
            .store
            .consumers(&mut c, &s.id)
            .await?
            .into_iter()
            .filter(|k| now - k.reported_at_ms <= ttl && k.version != s.current_version)
            .map(|k| format!("{} serves v{}", k.consumer_id, k.version))
            .collect();
        if !behind.is_empty() {
            out.push(format!(
                "{} live consumer(s) not on v{}: {}",
                behind.len(),
                s.current_version,
                behind.join(", ")
            ));
        }
        let kind = self.kinds.get(&s.kind)?;
        if kind.needs_reencryption() {
            let r = self
                .store
                .reencryption(&mut c, &s.id, s.current_version)
                .await?;
            match r {
                Some(r) if r.finished => {}
                Some(r) => out.push(format!(
                    "re-encryption to v{} is at {} of {} rows ({})",
                    s.current_version, r.rows_done, r.rows_total, r.phase
                )),
                None => out.push(format!(
                    "re-encryption to v{} has not been reported finished",
                    s.current_version
                )),
            }
        }
        Ok(out)
    }

    /// Revokes one version. The previous version is revoked only when the
    /// decommission conditions hold, or with `force` and a reason.
    pub async fn revoke(
        &self,
        actor: &Actor,
        id: &str,
        version: i64,
        force: bool,
        reason: &str,
    ) -> Result<Outcome> {
        let started = Instant::now();
        let mut c = self.store.conn().await?;
        let s = self.store.require_secret(&mut c, id).await?;
        let v = self.store.require_version(&mut c, id, version).await?;
        drop(c);
        if v.state == REVOKED {
            return Err(Error::FailedPrecondition(format!(
                "v{version} of {id} is already revoked"
            )));
        }
        if version == s.current_version {
            return Err(Error::FailedPrecondition(format!(
                "v{version} is the current version of {id}; rotate or roll back before revoking it"
            )));
        }
        if version == s.pending_version {
            return Err(Error::FailedPrecondition(format!(
                "v{version} of {id} is a rotation in progress"
            )));
        }
        if force && reason.trim().is_empty() {
            return Err(Error::InvalidArgument(
                "a forced revoke needs a reason (--reason) for the audit log".into(),
            ));
        }
        if version == s.previous_version && !force {
            let blockers = self.decommission_blockers(&s, now_ms()).await?;
            if !blockers.is_empty() {
                return Err(Error::FailedPrecondition(format!(
                    "previous v{version} of {id} cannot be decommissioned yet: {}; use --force with --reason to override",
                    blockers.join("; ")
                )));
            }
        }
        self.revoke_unchecked(actor, &s, version, force.then_some(reason), started)
            .await
    }

    async fn revoke_unchecked(
        &self,
        actor: &Actor,
        s: &SecretRow,
        version: i64,
        forced_reason: Option<&str>,
        started: Instant,
    ) -> Result<Outcome> {
        let id = s.id.as_str();
        let kind = self.kinds.get(&s.kind)?;
        let options = Self::options(s)?;
        let value = {
            let mut c = self.store.conn().await?;
            self.store.version_value(&mut c, id, version).await?
        };
        kind.revoke(
            &SecretCtx {
                id,
                options: &options,
            },
            &value,
        )
        .await
        .map_err(|e| step_error(id, "revoke", e))?;
        for _ in 0..CAS_ATTEMPTS {
            let mut tx = self.store.begin().await?;
            let cur = self.store.require_secret(&mut tx, id).await?;
            if cur.current_version == version || cur.pending_version == version {
                return Err(Error::FailedPrecondition(format!(
                    "v{version} of {id} became current or pending meanwhile; not revoked"
                )));
            }
            let mut next = cur.clone();
            if cur.previous_version == version {
                next.previous_version = 0;
            }
            next.revision = cur.revision + 1;
            if !self
                .store
                .update_secret(&mut tx, &next, cur.revision)
                .await?
            {
                continue;
            }
            let now = now_ms();
            self.store
                .set_version_state(&mut tx, id, version, REVOKED, now)
                .await?;
            let ev = audit::append_in(
                &self.store,
                &mut tx,
                NewEvent {
                    actor: actor.identity.clone(),
                    action: "revoke".into(),
                    secret_id: id.into(),
                    version,
                    outcome: "ok".into(),
                    request_id: actor.request_id.clone(),
                    detail: match forced_reason {
                        Some(r) => format!("forced: {r}"),
                        None => String::new(),
                    },
                },
                now,
            )
            .await?;
            self.store.notify(&mut tx, id).await?;
            let vrow = self.store.require_version(&mut tx, id, version).await?;
            tx.commit().await?;
            audit::log_event(&ev);
            self.metrics.step("revoke", started.elapsed().as_secs_f64());
            tracing::info!(
                secret = id,
                version,
                forced = forced_reason.is_some(),
                "version revoked"
            );
            self.hub.refresh(id).await;
            return Ok(Outcome {
                secret: next,
                version: vrow,
                replayed: false,
            });
        }
        Err(Error::FailedPrecondition(format!(
            "{id} is changing too often to revoke; try again"
        )))
    }

    /// `rekey rotate --cancel`: aborts a rotation in flight, or clears one
    /// parked as needs-attention so that scheduled rotations resume.
    pub async fn cancel(&self, actor: &Actor, id: &str) -> Result<Outcome> {
        let (s, last) = {
            let mut c = self.store.conn().await?;
            let s = self.store.require_secret(&mut c, id).await?;
            let last = self.store.last_rotation(&mut c, id).await?;
            (s, last)
        };
        let Some(rot) = last.filter(|r| {
            r.step == NEEDS_ATTENTION
                || (s.pending_version == r.target_version && r.step != "finished")
        }) else {
            return Err(Error::FailedPrecondition(format!(
                "{id} has no rotation in flight or waiting for attention"
            )));
        };
        let mut by = rot.clone();
        by.actor = actor.identity.clone();
        by.request_id = actor.request_id.clone();
        if rot.step == NEEDS_ATTENTION {
            let mut tx = self.store.begin().await?;
            self.store
                .advance_rotation(
                    &mut tx,
                    id,
                    rot.target_version,
                    NEEDS_ATTENTION,
                    "cancelled",
                    &rot.error,
                )
                .await?;
            let ev = audit::append_in(
                &self.store,
                &mut tx,
                NewEvent {
                    actor: actor.identity.clone(),
                    action: "cancel".into(),
                    secret_id: id.into(),
                    version: rot.target_version,
                    outcome: "ok".into(),
                    request_id: actor.request_id.clone(),
                    detail: "parked rotation cleared".into(),
                },
                now_ms(),
            )
            .await?;
            tx.commit().await?;
            audit::log_event(&ev);
        } else {
            let err = Error::FailedPrecondition(format!("cancelled by {}", actor.identity));
            self.park(&by, "cancelled", "cancelled", err).await;
        }
        let mut c = self.store.conn().await?;
        Ok(Outcome {
            secret: self.store.require_secret(&mut c, id).await?,
            version: self
                .store
                .require_version(&mut c, id, rot.target_version)
                .await?,
            replayed: false,
        })
    }

    /// Resumes every rotation that a previous process left between steps.
    pub async fn recover(&self) -> Result<usize> {
        let rots = {
            let mut c = self.store.conn().await?;
            self.store.unfinished_rotations(&mut c).await?
        };
        let n = rots.len();
        for r in rots {
            tracing::warn!(secret = %r.secret_id, version = r.target_version, step = %r.step, "resuming interrupted rotation");
            match self.drive(&r.secret_id, r.target_version).await {
                Ok(_) => {
                    tracing::info!(secret = %r.secret_id, version = r.target_version, "interrupted rotation finished")
                }
                Err(e) => {
                    tracing::warn!(secret = %r.secret_id, version = r.target_version, error = %e, "interrupted rotation rolled back")
                }
            }
        }
        Ok(n)
    }

    /// One scheduler pass: fire due rotations (exactly one replica wins
    /// each), then decommission previous versions whose conditions hold.
    pub async fn tick(&self) -> Result<()> {
        let now = now_ms();
        let due = {
            let mut c = self.store.conn().await?;
            self.store.due_secrets(&mut c, now).await?
        };
        for s in due {
            let parked = {
                let mut c = self.store.conn().await?;
                self.store
                    .last_rotation(&mut c, &s.id)
                    .await?
                    .is_some_and(|r| r.step == NEEDS_ATTENTION)
            };
            if parked {
                // Waits for an operator: `rekey rotate --cancel`.
                continue;
            }
            let claimed = {
                let mut c = self.store.conn().await?;
                self.store
                    .claim_schedule(
                        &mut c,
                        &s.id,
                        s.next_rotation_at_ms,
                        now + SCHEDULE_RETRY_MS,
                    )
                    .await?
            };
            if !claimed {
                continue;
            }
            let actor = Actor::system("scheduler");
            let token = format!("schedule-{}", s.next_rotation_at_ms);
            match self.rotate(&actor, &s.id, Some(&token), None).await {
                Ok(o) => {
                    tracing::info!(secret = %s.id, version = o.version.version, "scheduled rotation done")
                }
                Err(e) => {
                    tracing::warn!(secret = %s.id, error = %e, "scheduled rotation did not run; retrying later")
                }
            }
        }

        let last = self
            .consumers_refreshed_at
            .load(std::sync::atomic::Ordering::Relaxed);
        let every =
            (self.consumer_ttl.as_millis() as i64 / 4).clamp(1_000, CONSUMER_GAUGE_REFRESH_MS);
        let ids: Vec<String> = if now - last >= every {
            self.consumers_refreshed_at
                .store(now, std::sync::atomic::Ordering::Relaxed);
            self.consumers_dirty
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clear();
            let mut c = self.store.conn().await?;
            self.store.consumed_secret_ids(&mut c).await?
        } else {
            std::mem::take(
                &mut *self
                    .consumers_dirty
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()),
            )
            .into_iter()
            .collect()
        };
        for id in ids {
            self.refresh_consumer_metrics(&id).await;
        }

        let candidates = {
            let mut c = self.store.conn().await?;
            self.store.secrets_with_previous(&mut c).await?
        };
        for s in candidates {
            if s.pending_version != 0 {
                continue;
            }
            if self.decommission_blockers(&s, now).await?.is_empty() {
                let actor = Actor::system("decommission");
                if let Err(e) = self
                    .revoke_unchecked(&actor, &s, s.previous_version, None, Instant::now())
                    .await
                {
                    tracing::warn!(secret = %s.id, error = %e, "decommission failed; retrying later");
                }
            }
        }
        Ok(())
    }

    /// Updates the `rekey_consumers` gauges of one secret.
    pub async fn refresh_consumer_metrics(&self, id: &str) {
        let now = now_ms();
        let ttl = self.consumer_ttl.as_millis() as i64;
        let Ok(mut c) = self.store.conn().await else {
            return;
        };
        let Ok(consumers) = self.store.consumers(&mut c, id).await else {
            return;
        };
        let mut by_version = std::collections::BTreeMap::<i64, i64>::new();
        for k in consumers.iter().filter(|k| now - k.reported_at_ms <= ttl) {
            *by_version.entry(k.version).or_default() += 1;
        }
        let pairs: Vec<(i64, i64)> = by_version.into_iter().collect();
        self.metrics.set_consumers(id, &pairs);
    }

    /// Everything `rekey status` shows for one secret.
    pub async fn status(&self, id: &str) -> Result<rekey_proto::v1::SecretStatus> {
        use crate::convert;
        use rekey_proto::v1 as pb;
        let now = now_ms();
        let ttl = self.consumer_ttl.as_millis() as i64;
        let mut c = self.store.conn().await?;
        let s = self.store.require_secret(&mut c, id).await?;
        let versions = self.store.list_versions(&mut c, id).await?;
        let consumers = self.store.consumers(&mut c, id).await?;
        let rotation = self.store.last_rotation(&mut c, id).await?;
        drop(c);
        let blockers = self.decommission_blockers(&s, now).await?;
        let reencryption = {
            let mut c = self.store.conn().await?;
            self.store
                .reencryption(&mut c, id, s.current_version)
                .await?
        };
        let consumers: Vec<pb::Consumer> = consumers
            .into_iter()
            .map(|k| pb::Consumer {
                live: now - k.reported_at_ms <= ttl,
                consumer_id: k.consumer_id,
                pod: k.pod,
                namespace: k.namespace,
                identity: k.identity,
                version: k.version as u64,
                healthy: k.healthy,
                error: k.error,
                reported_at_ms: k.reported_at_ms,
            })
            .collect();
        let live = consumers.iter().filter(|k| k.live).count() as u32;
        let converged = consumers
            .iter()
            .filter(|k| k.live && k.version == s.current_version as u64)
            .count() as u32;
        Ok(pb::SecretStatus {
            secret: Some(convert::secret(&s)),
            versions: versions
                .iter()
                .map(|v| convert::version(&s, v, None))
                .collect(),
            consumers,
            rotation: rotation.map(|r| pb::RotationState {
                target_version: r.target_version as u64,
                step: r.step,
                error: r.error,
                started_at_ms: r.started_at_ms,
                updated_at_ms: r.updated_at_ms,
            }),
            converged,
            live_consumers: live,
            decommission_blockers: blockers,
            reencryption: reencryption.map(|r| pb::Reencryption {
                version: r.version as u64,
                consumer_id: r.consumer_id,
                rows_done: r.rows_done as u64,
                rows_total: r.rows_total as u64,
                rate: r.rate_milli as f64 / 1000.0,
                finished: r.finished,
                phase: r.phase,
                updated_at_ms: r.updated_at_ms,
            }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kinds::Kind;
    use async_trait::async_trait;
    use rekey_keyring::MasterKey;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// A kind whose target can be made to fail: stands in for the kinds
    /// that act on real systems (a database role, a provider's API key).
    struct Flaky {
        fail_set: AtomicBool,
        fail_restore: AtomicBool,
    }

    #[async_trait]
    impl Kind for Flaky {
        fn name(&self) -> &'static str {
            "flaky"
        }
        fn check_options(&self, _: &serde_json::Value) -> Result<serde_json::Value> {
            Ok(serde_json::json!({}))
        }
        fn value_input(&self) -> ValueInput {
            ValueInput::Never
        }
        async fn create(
            &self,
            _: &SecretCtx<'_>,
            _: Option<&SecretValue>,
            _: Option<SecretValue>,
        ) -> Result<SecretValue> {
            Ok(SecretValue::Raw(rekey_keyring::random_bytes(16)?))
        }
        async fn set(
            &self,
            ctx: &SecretCtx<'_>,
            _: &SecretValue,
            _: Option<&SecretValue>,
        ) -> Result<()> {
            if self.fail_set.load(Ordering::SeqCst) {
                return Err(Error::Step {
                    secret: ctx.id.into(),
                    step: "set",
                    message: "target refused the new password".into(),
                });
            }
            Ok(())
        }
        async fn restore(&self, _: &SecretCtx<'_>, _: &SecretValue) -> Result<()> {
            if self.fail_restore.load(Ordering::SeqCst) {
                return Err(Error::Internal("target unreachable".into()));
            }
            Ok(())
        }
        fn one_rotation_at_a_time(&self) -> bool {
            true
        }
    }

    async fn engine() -> (Engine, Arc<Flaky>) {
        let dir = crate::store::tests_support::tempdir();
        let url = format!("sqlite://{}?mode=rwc", dir.join("e.db").display());
        let store = Arc::new(
            Store::open(&url, 1, Arc::new(MasterKey::from_bytes(&[9; 32]).unwrap()))
                .await
                .unwrap(),
        );
        let flaky = Arc::new(Flaky {
            fail_set: AtomicBool::new(false),
            fail_restore: AtomicBool::new(false),
        });
        let mut kinds = Kinds::default();
        kinds.register(flaky.clone());
        let engine = Engine {
            hub: Arc::new(Hub::new(store.clone())),
            store,
            kinds,
            metrics: Arc::new(Metrics::default()),
            step_delay: Duration::ZERO,
            step_attempts: 2,
            step_backoff: Duration::from_millis(10),
            consumer_ttl: Duration::from_secs(60),
            consumers_refreshed_at: Default::default(),
            consumers_dirty: Default::default(),
        };
        (engine, flaky)
    }

    fn spec(id: &str, kind: &str) -> CreateSpec {
        CreateSpec {
            id: id.into(),
            kind: kind.into(),
            options: serde_json::json!({}),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn a_failed_step_rolls_the_rotation_back_and_keeps_current() {
        let (e, flaky) = engine().await;
        let actor = Actor::system("test");
        e.create_secret(&actor, spec("prod/db", "flaky"))
            .await
            .unwrap();
        flaky.fail_set.store(true, Ordering::SeqCst);
        let err = e
            .rotate(&actor, "prod/db", Some("tok"), None)
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Step { step: "set", .. }), "{err}");
        let mut c = e.store.conn().await.unwrap();
        let s = e.store.require_secret(&mut c, "prod/db").await.unwrap();
        assert_eq!(
            (s.current_version, s.previous_version, s.pending_version),
            (1, 0, 0)
        );
        let v2 = e.store.require_version(&mut c, "prod/db", 2).await.unwrap();
        assert_eq!(v2.state, REVOKED, "the failed version is never served");
        let rot = e
            .store
            .last_rotation(&mut c, "prod/db")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(rot.step, NEEDS_ATTENTION);
        assert!(rot.error.contains("refused the new password"));
        let events = audit::list(&mut c, "prod/db", 0, 100).await.unwrap();
        assert_eq!(events.last().unwrap().outcome, "failed");
        drop(c);
        // A retry with the same token reports the same failure, creates nothing.
        let again = e
            .rotate(&actor, "prod/db", Some("tok"), None)
            .await
            .unwrap_err();
        assert!(again.to_string().contains("failed"), "{again}");
        // Once the target works again, a new rotation succeeds with v3.
        flaky.fail_set.store(false, Ordering::SeqCst);
        let ok = e.rotate(&actor, "prod/db", None, None).await.unwrap();
        assert_eq!(ok.version.version, 3);
    }

    #[tokio::test]
    async fn one_rotation_at_a_time_until_previous_is_decommissioned() {
        let (e, _) = engine().await;
        let actor = Actor::system("test");
        e.create_secret(&actor, spec("prod/db", "flaky"))
            .await
            .unwrap();
        e.rotate(&actor, "prod/db", None, None).await.unwrap();
        let err = e.rotate(&actor, "prod/db", None, None).await.unwrap_err();
        assert!(matches!(err, Error::FailedPrecondition(_)), "{err}");
        assert!(err.to_string().contains("not decommissioned yet"), "{err}");
        // Validation window 0 and no consumers: decommission runs on tick.
        e.tick().await.unwrap();
        let mut c = e.store.conn().await.unwrap();
        let s = e.store.require_secret(&mut c, "prod/db").await.unwrap();
        assert_eq!(s.previous_version, 0);
        drop(c);
        assert_eq!(
            e.rotate(&actor, "prod/db", None, None)
                .await
                .unwrap()
                .version
                .version,
            3
        );
    }

    #[tokio::test]
    async fn rollback_restores_the_target_first_and_changes_nothing_when_that_fails() {
        let (e, flaky) = engine().await;
        let actor = Actor::system("test");
        e.create_secret(&actor, spec("prod/db", "flaky"))
            .await
            .unwrap();
        e.rotate(&actor, "prod/db", None, None).await.unwrap();
        flaky.fail_restore.store(true, Ordering::SeqCst);
        let err = e.rollback(&actor, "prod/db").await.unwrap_err();
        assert!(
            matches!(
                err,
                Error::Step {
                    step: "restore",
                    ..
                }
            ),
            "{err}"
        );
        let mut c = e.store.conn().await.unwrap();
        let s = e.store.require_secret(&mut c, "prod/db").await.unwrap();
        assert_eq!((s.current_version, s.previous_version), (2, 1));
        drop(c);
        flaky.fail_restore.store(false, Ordering::SeqCst);
        let o = e.rollback(&actor, "prod/db").await.unwrap();
        assert_eq!(
            (o.secret.current_version, o.secret.previous_version),
            (1, 2)
        );
    }

    #[tokio::test]
    async fn random_secrets_rotate_back_to_back_and_displace_previous() {
        let (e, _) = engine().await;
        let actor = Actor::system("test");
        let mut s = spec("prod/jwt", "random");
        s.validation_window_ms = 3_600_000;
        e.create_secret(&actor, s).await.unwrap();
        for _ in 0..3 {
            e.rotate(&actor, "prod/jwt", None, None).await.unwrap();
        }
        let mut c = e.store.conn().await.unwrap();
        let s = e.store.require_secret(&mut c, "prod/jwt").await.unwrap();
        assert_eq!((s.current_version, s.previous_version), (4, 3));
        let states: Vec<String> = e
            .store
            .list_versions(&mut c, "prod/jwt")
            .await
            .unwrap()
            .into_iter()
            .map(|v| v.state)
            .collect();
        assert_eq!(states, ["active", "active", "revoked", "revoked"]);
    }

    #[test]
    fn secret_ids_look_like_paths() {
        for ok in ["prod/api/database", "a", "x-1_2.3/y"] {
            validate_id(ok).unwrap();
        }
        for bad in [
            "",
            "/abs",
            "trailing/",
            "a//b",
            "../etc",
            "a/./b",
            "sp ace",
            "ü",
        ] {
            assert!(validate_id(bad).is_err(), "{bad:?}");
        }
    }
}
