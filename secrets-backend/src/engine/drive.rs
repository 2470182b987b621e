//! The step driver: set, test and finish from the persisted step, with
//! retries; finish makes pending current at the provider and in the store.

use std::time::Instant;

use super::{Actor, CAS_ATTEMPTS, Engine, Outcome, location, step_error, stored, with_current};
use crate::clock::now_ms;
use crate::error::{Error, Result};
use crate::kinds::SecretCtx;
use crate::store::{RotationRow, RotationStep, SecretRow, VersionRow};

impl Engine {
    /// Advances a rotation from its persisted step to its end. Safe to call
    /// again after a crash, or concurrently: steps are idempotent and each
    /// advance is a compare-and-swap.
    pub(crate) async fn drive(&self, id: &str, target: i64) -> Result<Outcome> {
        loop {
            let (rot, s) = {
                let mut c = self.store.conn().await?;
                let rot = self
                    .store
                    .get_rotation(&mut c, id, target)
                    .await?
                    .ok_or_else(|| Error::NotFound(format!("rotation of {id} to v{target}")))?;
                (rot, self.store.require_secret(&mut c, id).await?)
            };
            let kind = self.kinds.get(&s.kind)?;
            let ctx = SecretCtx {
                id,
                options: &s.options,
            };
            let started = Instant::now();
            match rot.step {
                RotationStep::Created => {
                    self.pause().await;
                    let (_, new) = self.version_and_value(&s, target).await?;
                    let old = match s.current_version {
                        0 => None,
                        n => Some(self.version_and_value(&s, n).await?.1),
                    };
                    let nodes = match self
                        .retrying(id, "set", || kind.set(&ctx, &new, old.as_ref()))
                        .await
                    {
                        Ok(nodes) => nodes,
                        Err(e) => return Err(self.abort(&rot, step_error(id, "set", e)).await),
                    };
                    self.record_nodes(id, target, nodes).await?;
                    self.advance(id, target, RotationStep::Created, RotationStep::Set)
                        .await?;
                    self.metrics.step("set", started.elapsed().as_secs_f64());
                }
                RotationStep::Set => {
                    self.pause().await;
                    let (_, new) = self.version_and_value(&s, target).await?;
                    if let Err(e) = self.retrying(id, "test", || kind.test(&ctx, &new)).await {
                        return Err(self.abort(&rot, step_error(id, "test", e)).await);
                    }
                    self.advance(id, target, RotationStep::Set, RotationStep::Tested)
                        .await?;
                    self.metrics.step("test", started.elapsed().as_secs_f64());
                }
                RotationStep::Tested => {
                    self.pause().await;
                    let finished = self.finish(&rot).await?;
                    self.metrics.step("finish", started.elapsed().as_secs_f64());
                    if let Some((secret, version)) = finished {
                        // Read in finish's transaction: once watchers have
                        // the new version, a fleet's reports compete for
                        // the store, and the caller need not wait for them.
                        return Ok(Outcome {
                            secret,
                            version,
                            replayed: false,
                        });
                    }
                }
                RotationStep::Finished => {
                    let mut c = self.store.conn().await?;
                    let version = self.store.require_version(&mut c, id, target).await?;
                    return Ok(Outcome {
                        secret: s,
                        version,
                        replayed: false,
                    });
                }
                RotationStep::NeedsAttention | RotationStep::Cancelled => {
                    return Err(Error::FailedPrecondition(format!(
                        "the rotation of {id} to v{target} failed: {}",
                        if rot.error.is_empty() {
                            rot.step.as_str()
                        } else {
                            &rot.error
                        }
                    )));
                }
            }
        }
    }

    /// Runs a step up to `step_attempts` times with doubling pauses.
    async fn retrying<T, F, Fut>(&self, id: &str, step: &str, f: F) -> Result<T>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        self.retrying_if(id, step, f, |_| true).await
    }

    /// Runs a step up to `step_attempts` times with doubling pauses, while
    /// its error is one that `again` says is worth another try.
    async fn retrying_if<T, F, Fut>(
        &self,
        id: &str,
        step: &str,
        f: F,
        again: impl Fn(&Error) -> bool,
    ) -> Result<T>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        let mut pause = self.settings.step_backoff;
        let mut attempt = 1;
        loop {
            match f().await {
                Ok(v) => return Ok(v),
                Err(e) if attempt < self.settings.step_attempts.max(1) && again(&e) => {
                    tracing::warn!(secret = id, step, attempt, error = %e, retry_in = ?pause, "rotation step failed; retrying");
                    tokio::time::sleep(pause).await;
                    pause = pause.saturating_mul(2);
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn advance(
        &self,
        id: &str,
        target: i64,
        from: RotationStep,
        to: RotationStep,
    ) -> Result<()> {
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
    /// Returns the secret and the new version as committed, or `None` when
    /// another driver finished the rotation.
    async fn finish(&self, rot: &RotationRow) -> Result<Option<(SecretRow, VersionRow)>> {
        let id = rot.secret_id.as_str();
        let target = rot.target_version;
        let s = self.require_secret(id).await?;
        let provider = self.provider(&s)?;
        let (new, old) = {
            let mut c = self.store.conn().await?;
            let new = self.store.require_version(&mut c, id, target).await?;
            let old = match s.current_version {
                0 => None,
                n => Some(self.store.require_version(&mut c, id, n).await?),
            };
            (new, old)
        };
        let value_ref = if s.pending_version == target {
            // Unreachable or sealed: tried again like a step (promote is
            // safe to repeat).
            let promoted = self
                .retrying_if(
                    id,
                    "finish",
                    || provider.promote(location(&s), stored(&new), old.as_ref().map(stored)),
                    |e| {
                        matches!(
                            e,
                            Error::Provider {
                                unavailable: true,
                                ..
                            }
                        )
                    },
                )
                .await;
            match promoted {
                Ok(r) => r,
                // Still unavailable, a policy that denies the path, a write
                // that raced an outside change: parked like a failed step,
                // with current unchanged at the provider and in the store.
                Err(e @ Error::Provider { .. }) => return Err(self.abort(rot, e).await),
                Err(e) => return Err(e),
            }
        } else {
            new.value_ref.clone()
        };
        for _ in 0..CAS_ATTEMPTS {
            let mut tx = self.store.begin().await?;
            let s = self.store.require_secret(&mut tx, id).await?;
            if s.pending_version != target {
                // Another driver finished it; mark the step and stop.
                if s.current_version == target || s.previous_version == target {
                    self.store
                        .advance_rotation(
                            &mut tx,
                            id,
                            target,
                            RotationStep::Tested,
                            RotationStep::Finished,
                            "",
                        )
                        .await?;
                    tx.commit().await?;
                    return Ok(None);
                }
                return Err(Error::Internal(format!(
                    "{id}: rotation to v{target} lost its pending stage"
                )));
            }
            let now = now_ms();
            let (next, displaced) = with_current(&s, target, now)?;
            let Some(detail) = self
                .store_promotion(&mut tx, &s, &next, displaced, now)
                .await?
            else {
                continue;
            };
            if value_ref != new.value_ref {
                self.store
                    .set_value_ref(&mut tx, id, target, &value_ref)
                    .await?;
            }
            self.store.finish_rotation(&mut tx, id, target).await?;
            let by = Actor {
                identity: rot.actor.clone(),
                request_id: rot.request_id.clone(),
            };
            let ev = self
                .record(
                    &mut tx,
                    super::event(&by, "rotate", id, target, "ok", detail),
                )
                .await?;
            let done = (
                self.store.require_secret(&mut tx, id).await?,
                self.store.require_version(&mut tx, id, target).await?,
            );
            tx.commit().await?;
            self.published(&ev);
            tracing::info!(
                secret = id,
                version = target,
                previous = s.current_version,
                "rotation finished"
            );
            if displaced > 0 {
                self.retire_displaced(&next, displaced).await;
            }
            // The last store work of the call: after watchers have the new
            // version, a fleet's reports compete for the store.
            self.refresh(id).await;
            return Ok(Some(done));
        }
        Err(Error::FailedPrecondition(format!(
            "{id} is changing too often to finish its rotation"
        )))
    }

    /// Tells the provider that a version pushed out of previous is retired.
    pub(super) async fn retire_displaced(&self, s: &SecretRow, version: i64) {
        let r = async {
            let v = {
                let mut c = self.store.conn().await?;
                self.store.require_version(&mut c, &s.id, version).await?
            };
            self.provider(s)?.revoke(location(s), stored(&v)).await
        }
        .await;
        if let Err(e) = r {
            tracing::warn!(secret = %s.id, version, error = %e, "the provider did not retire a displaced version");
        }
    }
}
