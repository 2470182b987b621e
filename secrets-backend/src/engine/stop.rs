//! How a rotation ends without finishing (parked after a failed step,
//! cancelled by an operator), and recovery of rotations a previous process
//! left between steps.

use super::{Actor, CAS_ATTEMPTS, Engine, Outcome, location, stored};
use crate::audit;
use crate::clock::now_ms;
use crate::error::{Error, Result};
use crate::kinds::SecretCtx;
use crate::store::{RotationRow, RotationStep, SecretRow, VersionRow, VersionState};

impl Engine {
    /// A step that failed every attempt: the rotation is parked as
    /// `needs-attention` with its error, the pending version is revoked and
    /// its stage cleared, and current stays as it was. Scheduled rotations
    /// of the secret wait until `rekey rotate --cancel` clears it. Returns
    /// the step's error for the caller.
    pub(super) async fn abort(&self, rot: &RotationRow, err: Error) -> Error {
        self.park(rot, RotationStep::NeedsAttention, "failed", err)
            .await
    }

    /// Ends a rotation that did not finish: pending revoked, cleared and
    /// dropped at its provider, the rotation row moved to `to`, an audit
    /// event with `outcome`.
    async fn park(&self, rot: &RotationRow, to: RotationStep, outcome: &str, err: Error) -> Error {
        let id = rot.secret_id.as_str();
        let target = rot.target_version;
        tracing::warn!(secret = id, version = target, state = %to, error = %err, "rotation stopped; current is unchanged");
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
                    .set_version_state(&mut tx, id, target, VersionState::Revoked, now)
                    .await?;
                self.store
                    .advance_rotation(&mut tx, id, target, rot.step, to, &err.to_string())
                    .await?;
                let by = Actor {
                    identity: rot.actor.clone(),
                    request_id: rot.request_id.clone(),
                };
                let ev = self
                    .record(&mut tx, super::event(&by, "rotate", id, target, outcome, err.to_string()))
                    .await?;
                let pending = self.store.require_version(&mut tx, id, target).await?;
                tx.commit().await?;
                self.published(&ev);
                self.withdraw(&s, &pending).await;
                if let Err(e) = self.provider(&s)?.discard(location(&s), stored(&pending)).await {
                    tracing::warn!(secret = id, version = target, error = %e, "the provider did not drop the pending value");
                }
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

    /// Takes a parked rotation's value back from the servers its set may
    /// have reached, for a kind whose set adds beside the older values (a
    /// Redis user's passwords): a revoked version must not keep working
    /// on some of them. Best effort; what is left is logged, and the next
    /// decommission of that secret does not touch it.
    async fn withdraw(&self, s: &SecretRow, pending: &VersionRow) {
        let Ok(kind) = self.kinds.get(&s.kind) else {
            return;
        };
        if !kind.set_keeps_older_values() {
            return;
        }
        let r = async {
            let value = self.value_of(s, pending).await?;
            let current = match s.current_version {
                0 => None,
                n => Some(self.version_and_value(s, n).await?.1),
            };
            let ctx = SecretCtx {
                id: &s.id,
                options: &s.options,
            };
            kind.revoke(&ctx, &value, current.as_ref()).await?;
            self.record_nodes(&s.id, pending.version, Some(Vec::new()))
                .await
        }
        .await;
        if let Err(e) = r {
            tracing::warn!(secret = %s.id, version = pending.version, error = %e, "the parked version may still work on some servers");
        }
    }

    /// `rekey rotate --cancel`: aborts a rotation in flight, or clears one
    /// parked as needs-attention so that scheduled rotations resume.
    pub(crate) async fn cancel(&self, actor: &Actor, id: &str) -> Result<Outcome> {
        let (s, last) = {
            let mut c = self.store.conn().await?;
            let s = self.store.require_secret(&mut c, id).await?;
            let last = self.store.last_rotation(&mut c, id).await?;
            (s, last)
        };
        let Some(rot) = last.filter(|r| {
            r.step == RotationStep::NeedsAttention
                || (s.pending_version == r.target_version && r.step != RotationStep::Finished)
        }) else {
            return Err(Error::FailedPrecondition(format!(
                "{id} has no rotation in flight or waiting for attention"
            )));
        };
        if rot.step == RotationStep::NeedsAttention {
            let mut tx = self.store.begin().await?;
            self.store
                .advance_rotation(
                    &mut tx,
                    id,
                    rot.target_version,
                    RotationStep::NeedsAttention,
                    RotationStep::Cancelled,
                    &rot.error,
                )
                .await?;
            let ev = audit::append_in(
                &self.store,
                &mut tx,
                super::event(
                    actor,
                    "cancel",
                    id,
                    rot.target_version,
                    "ok",
                    "parked rotation cleared".into(),
                ),
                now_ms(),
            )
            .await?;
            tx.commit().await?;
            self.published(&ev);
        } else {
            let mut by = rot.clone();
            by.actor.clone_from(&actor.identity);
            by.request_id.clone_from(&actor.request_id);
            let err = Error::FailedPrecondition(format!("cancelled by {}", actor.identity));
            self.park(&by, RotationStep::Cancelled, "cancelled", err)
                .await;
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
    pub(crate) async fn recover(&self) -> Result<usize> {
        let rots = {
            let mut c = self.store.conn().await?;
            self.store.unfinished_rotations(&mut c).await?
        };
        let n = rots.len();
        for r in rots {
            tracing::warn!(secret = %r.secret_id, version = r.target_version, step = %r.step, "resuming interrupted rotation");
            match self.drive(&r.secret_id, r.target_version).await {
                Ok(_) => {
                    tracing::info!(secret = %r.secret_id, version = r.target_version, "interrupted rotation finished");
                }
                Err(e) => {
                    tracing::warn!(secret = %r.secret_id, version = r.target_version, error = %e, "interrupted rotation rolled back");
                }
            }
        }
        Ok(n)
    }
}
