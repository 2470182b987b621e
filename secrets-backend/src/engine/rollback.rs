//! Rollback: previous becomes current again, before decommission.

use std::time::Instant;

use super::{Actor, Engine, Outcome, event, location, step_error, stored};
use crate::error::{Error, Result};
use crate::kinds::SecretCtx;
use crate::store::VersionState;

impl Engine {
    /// Makes previous current again. The kind first restores the previous
    /// credential where it lives, so nothing moves to a value that no longer
    /// works.
    pub(crate) async fn rollback(&self, actor: &Actor, id: &str) -> Result<Outcome> {
        let started = Instant::now();
        let s = self.require_secret(id).await?;
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
        let (prev, cur) = {
            let mut c = self.store.conn().await?;
            (
                self.store
                    .require_version(&mut c, id, s.previous_version)
                    .await?,
                self.store
                    .require_version(&mut c, id, s.current_version)
                    .await?,
            )
        };
        if prev.state != VersionState::Active {
            return Err(Error::FailedPrecondition(format!(
                "previous v{} of {id} is revoked",
                prev.version
            )));
        }
        let value = self.value_of(&s, &prev).await?;
        let kind = self.kinds.get(&s.kind)?;
        let nodes = kind
            .restore(
                &SecretCtx {
                    id,
                    options: &s.options,
                },
                &value,
            )
            .await
            .map_err(|e| step_error(id, "restore", e))?;
        drop(value);
        self.record_nodes(id, prev.version, nodes).await?;
        let _writing = RollingBack::new(self, id);
        let value_ref = self
            .provider(&s)?
            .roll_back(location(&s), stored(&prev), stored(&cur))
            .await?;

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
        if value_ref != prev.value_ref {
            self.store
                .set_value_ref(&mut tx, id, prev.version, &value_ref)
                .await?;
        }
        let ev = self
            .record(
                &mut tx,
                event(
                    actor,
                    "rollback",
                    id,
                    next.current_version,
                    "ok",
                    format!("v{} is previous again", s.current_version),
                ),
            )
            .await?;
        tx.commit().await?;
        self.published(&ev);
        self.metrics
            .step("rollback", started.elapsed().as_secs_f64());
        tracing::info!(secret = id, version = next.current_version, "rolled back");
        self.refresh(id).await;
        let mut version = prev;
        version.value_ref = value_ref;
        Ok(Outcome {
            secret: next,
            version,
            replayed: false,
        })
    }
}

/// Marks a rollback that is writing to the secret's provider until it is
/// dropped, so that the poll does not take that write for an outside
/// change.
struct RollingBack<'a> {
    engine: &'a Engine,
    id: String,
}

impl<'a> RollingBack<'a> {
    fn new(engine: &'a Engine, id: &str) -> Self {
        engine
            .rolling_back
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(id.to_string());
        RollingBack {
            engine,
            id: id.to_string(),
        }
    }
}

impl Drop for RollingBack<'_> {
    fn drop(&mut self) {
        self.engine
            .rolling_back
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&self.id);
    }
}

impl Engine {
    /// Whether a rollback of `id` is writing to its provider.
    pub(super) fn rolling_back(&self, id: &str) -> bool {
        self.rolling_back
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .contains(id)
    }
}
