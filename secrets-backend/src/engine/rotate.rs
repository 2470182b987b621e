//! Rotate: a new pending version, recorded with its request token, then
//! driven through the steps.

use std::time::Instant;

use rekey_keyring::SecretValue;

use super::{Actor, CAS_ATTEMPTS, Engine, Outcome, location};
use crate::clock::now_ms;
use crate::error::{Error, Result};
use crate::kinds::{Kind, SecretCtx};
use crate::provider::Stored;
use crate::store::{RotationRow, RotationStep, SecretRow};

impl Engine {
    /// Runs one rotation to its end (or its failure). With a request token,
    /// a retry returns the version the first call created.
    pub(crate) async fn rotate(
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

        let s = self.require_secret(id).await?;
        if let Some(replay) = self.replayed(id, request_token, &fp).await? {
            return self.replay(id, replay).await;
        }
        let kind = self.kinds.get(&s.kind)?;
        let ctx = SecretCtx {
            id,
            options: &s.options,
        };
        check_rotatable(&s, kind.as_ref())?;
        if let Some(v) = &supplied {
            self.check_size(id, v)?;
        }
        Self::check_supplied(kind.as_ref(), &ctx, supplied.as_ref())?;
        let (_, current) = self.version_and_value(&s, s.current_version).await?;
        let value = kind.create(&ctx, Some(&current), supplied).await?;
        self.check_size(id, &value)?;
        drop(current);

        let target = match self
            .record_pending(actor, s, kind.as_ref(), &value, request_token, &fp)
            .await?
        {
            Pending::Started(n) => n,
            Pending::Replay(n) => return self.replay(id, n).await,
        };
        self.metrics.step("create", started.elapsed().as_secs_f64());
        tracing::info!(secret = id, version = target, actor = %actor.identity, "rotation started");
        let result = self.drive(id, target).await;
        self.metrics
            .rotation(kind.name(), if result.is_ok() { "ok" } else { "failed" });
        result
    }

    /// Stores the new value as the next version, pending, and records the
    /// rotation at its first step with its request token. Another writer
    /// taking the number first means writing again under the next one.
    async fn record_pending(
        &self,
        actor: &Actor,
        mut s: SecretRow,
        kind: &dyn Kind,
        value: &SecretValue,
        request_token: Option<&str>,
        fp: &str,
    ) -> Result<Pending> {
        let id = s.id.clone();
        let id = id.as_str();
        let provider = self.provider(&s)?;
        let mut attempt = 0;
        loop {
            attempt += 1;
            if attempt > CAS_ATTEMPTS {
                return Err(Error::FailedPrecondition(format!(
                    "{id} is changing too often to rotate; try again"
                )));
            }
            let n = s.latest_version + 1;
            let value_ref = provider.write_pending(location(&s), n, value).await?;
            let mine = Stored {
                version: n,
                value_ref: &value_ref,
            };
            let mut tx = self.store.begin().await?;
            let now_s = self.store.require_secret(&mut tx, id).await?;
            if let Some(tok) = request_token
                && let Some((seen_fp, version)) =
                    self.store.get_request_token(&mut tx, id, tok).await?
            {
                // A concurrent retry with the same token won the race.
                drop(tx);
                let _ = provider.discard(location(&s), mine).await;
                check_fingerprint(id, tok, &seen_fp, fp)?;
                return Ok(Pending::Replay(version));
            }
            if let Err(e) = check_rotatable(&now_s, kind) {
                drop(tx);
                let _ = provider.discard(location(&s), mine).await;
                return Err(e);
            }
            let mut next = now_s.clone();
            next.pending_version = n;
            next.latest_version = n;
            next.revision = now_s.revision + 1;
            if now_s.latest_version + 1 != n
                || !self
                    .store
                    .update_secret(&mut tx, &next, now_s.revision)
                    .await?
            {
                // Another writer took the number: write again under the next.
                drop(tx);
                let _ = provider.discard(location(&s), mine).await;
                s = now_s;
                continue;
            }
            let now = now_ms();
            self.store
                .insert_version(&mut tx, id, n, now, &value_ref)
                .await?;
            self.store
                .insert_rotation(
                    &mut tx,
                    &RotationRow {
                        secret_id: id.into(),
                        target_version: n,
                        step: RotationStep::Created,
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
                    .insert_request_token(&mut tx, id, tok, fp, n, now)
                    .await?;
            }
            self.store.notify(&mut tx, id).await?;
            tx.commit().await?;
            return Ok(Pending::Started(n));
        }
    }

    /// The version an earlier call with this request token created, if
    /// there was one with the same input.
    async fn replayed(&self, id: &str, token: Option<&str>, fp: &str) -> Result<Option<i64>> {
        let Some(tok) = token else {
            return Ok(None);
        };
        let mut c = self.store.conn().await?;
        match self.store.get_request_token(&mut c, id, tok).await? {
            Some((seen_fp, version)) => {
                check_fingerprint(id, tok, &seen_fp, fp)?;
                Ok(Some(version))
            }
            None => Ok(None),
        }
    }

    /// The answer to a retried request: the version the first call created,
    /// once its rotation has ended.
    async fn replay(&self, id: &str, version: i64) -> Result<Outcome> {
        let mut out = self.drive(id, version).await?;
        out.replayed = true;
        Ok(out)
    }
}

/// What recording a new rotation led to.
enum Pending {
    /// The rotation to this version started.
    Started(i64),
    /// A concurrent call with the same request token started this one.
    Replay(i64),
}

/// A new rotation may start: none in flight, and for kinds whose old
/// credential may still be in use, previous is decommissioned.
fn check_rotatable(s: &SecretRow, kind: &dyn Kind) -> Result<()> {
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

/// A request token may be replayed only with the input it was first used
/// with.
fn check_fingerprint(id: &str, token: &str, seen: &str, now: &str) -> Result<()> {
    if rekey_keyring::ct_eq(seen.as_bytes(), now.as_bytes()) {
        Ok(())
    } else {
        Err(Error::AlreadyExists(format!(
            "request token {token:?} was already used for a different rotation of {id}"
        )))
    }
}
