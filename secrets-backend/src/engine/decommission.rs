//! Decommission: previous is revoked once the validation window has
//! passed, every live consumer serves current and, for an encryption key,
//! re-encryption to current has finished; `revoke` does it on request, and
//! with `force` and a reason before those conditions hold.

use std::time::Instant;

use super::{Actor, CAS_ATTEMPTS, Engine, Outcome, event, location, step_error, stored};
use crate::clock::now_ms;
use crate::error::{Error, Result};
use crate::kinds::SecretCtx;
use crate::store::{SecretRow, VersionState};

impl Engine {
    /// Why previous may not be decommissioned yet; empty when it may.
    pub(crate) async fn decommission_blockers(
        &self,
        s: &SecretRow,
        now: i64,
    ) -> Result<Vec<String>> {
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
        let ttl = self.consumer_ttl_ms();
        let mut c = self.store.conn().await?;
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
        if self.kinds.get(&s.kind)?.needs_reencryption() {
            match self
                .store
                .reencryption(&mut c, &s.id, s.current_version)
                .await?
            {
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
    pub(crate) async fn revoke(
        &self,
        actor: &Actor,
        id: &str,
        version: i64,
        force: bool,
        reason: &str,
    ) -> Result<Outcome> {
        let started = Instant::now();
        if version <= 0 {
            return Err(Error::InvalidArgument("name the version to revoke".into()));
        }
        let s = self.require_secret(id).await?;
        let v = {
            let mut c = self.store.conn().await?;
            self.store.require_version(&mut c, id, version).await?
        };
        if v.state == VersionState::Revoked {
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

    /// Revokes `version` of `s` at its target (the kind), at its provider,
    /// and in the store.
    pub(super) async fn revoke_unchecked(
        &self,
        actor: &Actor,
        s: &SecretRow,
        version: i64,
        forced_reason: Option<&str>,
        started: Instant,
    ) -> Result<Outcome> {
        let id = s.id.as_str();
        let kind = self.kinds.get(&s.kind)?;
        let (v, value) = self.version_and_value(s, version).await?;
        // A kind whose values pile up on several servers (Redis) gives
        // current to any that lacks it; the others need no second read
        // (one more round trip to a provider).
        let current = match s.current_version {
            n if n == 0 || n == version || !kind.set_keeps_older_values() => None,
            n => Some(self.version_and_value(s, n).await?.1),
        };
        let nodes = kind
            .revoke(
                &SecretCtx {
                    id,
                    options: &s.options,
                },
                &value,
                current.as_ref(),
            )
            .await
            .map_err(|e| step_error(id, "revoke", e))?;
        drop((value, current));
        if nodes.is_some() {
            self.record_nodes(id, version, Some(Vec::new())).await?;
            self.record_nodes(id, s.current_version, nodes).await?;
        }
        self.provider(s)?
            .revoke(location(s), stored(&v))
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
                .set_version_state(&mut tx, id, version, VersionState::Revoked, now)
                .await?;
            let detail = forced_reason.map_or_else(String::new, |r| format!("forced: {r}"));
            let ev = self
                .record(&mut tx, event(actor, "revoke", id, version, "ok", detail))
                .await?;
            let vrow = self.store.require_version(&mut tx, id, version).await?;
            tx.commit().await?;
            self.published(&ev);
            self.metrics.step("revoke", started.elapsed().as_secs_f64());
            tracing::info!(
                secret = id,
                version,
                forced = forced_reason.is_some(),
                "version revoked"
            );
            self.refresh(id).await;
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
}
