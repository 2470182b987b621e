//! Outside changes: a value edited where its provider keeps it (the Vault
//! UI, the AWS console), not through rekey. The scheduler asks each
//! external provider for changes since its cursor; each one becomes the
//! secret's new current version (the old current becomes previous), is
//! delivered to every watcher and is audited with the provider as actor.
//! A value the secret's kind refuses (an encryption key that is not 32
//! bytes of base64) is audited as refused and never delivered.

use std::time::{Duration, Instant};

use super::{Actor, CAS_ATTEMPTS, Engine, event, with_current};
use crate::clock::now_ms;
use crate::error::{Error, Result};
use crate::kinds::SecretCtx;
use crate::provider::{OutsideChange, ValueProvider};
use crate::store::{self};

/// How often each external provider is asked for outside changes.
const POLL_INTERVAL: Duration = Duration::from_secs(10);

fn cursor_key(provider: &str) -> String {
    format!("provider_cursor/{provider}")
}

impl Engine {
    /// Asks every external provider that is due for its outside changes.
    pub(super) async fn poll_providers(&self) {
        let due: Vec<_> = {
            let mut polled = self
                .polled_at
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            self.providers
                .external()
                .filter(|p| {
                    let last = polled.get(p.name());
                    let due = last.is_none_or(|t| t.elapsed() >= POLL_INTERVAL);
                    if due {
                        polled.insert(p.name().to_string(), Instant::now());
                    }
                    due
                })
                .cloned()
                .collect()
        };
        for p in due {
            if let Err(e) = self.take_outside_changes(p.as_ref()).await {
                tracing::warn!(provider = p.name(), error = %e, "cannot look for outside changes; trying again later");
            }
        }
    }

    /// Takes one provider's outside changes since its stored cursor, then
    /// stores the new cursor.
    pub(crate) async fn take_outside_changes(&self, p: &dyn ValueProvider) -> Result<usize> {
        let cursor = {
            let mut c = self.store.conn().await?;
            store::meta_get(&mut c, &cursor_key(p.name())).await?
        };
        let changes = p
            .changes_since(cursor.as_deref().unwrap_or_default())
            .await?;
        let mut taken = 0;
        for ch in &changes.changes {
            if self.take_outside_change(p.name(), ch).await? {
                taken += 1;
            }
        }
        let mut c = self.store.conn().await?;
        store::meta_set(&mut c, &cursor_key(p.name()), &changes.cursor).await?;
        Ok(taken)
    }

    /// Records one outside change as the new current version; `false` when
    /// it was already taken (by this or another replica) or is not a
    /// secret rekey manages.
    async fn take_outside_change(&self, provider: &str, ch: &OutsideChange) -> Result<bool> {
        let s = {
            let mut c = self.store.conn().await?;
            let Some(s) = self.store.secret_at(&mut c, provider, &ch.path).await? else {
                tracing::debug!(provider, path = %ch.path, "outside change to a secret rekey does not manage");
                return Ok(false);
            };
            if self
                .store
                .version_by_ref(&mut c, &s.id, &ch.value_ref)
                .await?
                .is_some()
            {
                return Ok(false);
            }
            s
        };
        let actor = Actor::system(&format!("provider:{provider}"));
        let kind = self.kinds.get(&s.kind)?;
        let ctx = SecretCtx {
            id: &s.id,
            options: &s.options,
        };
        if let Err(e) = self
            .check_size(&s.id, &ch.value)
            .and_then(|()| kind.check_value(&ctx, &ch.value))
        {
            tracing::warn!(secret = %s.id, provider, error = %e, "outside change refused");
            self.record_refusal(&actor, "outside-change", &s.id, 0, &e)
                .await;
            return Ok(false);
        }
        for _ in 0..CAS_ATTEMPTS {
            let mut tx = self.store.begin().await?;
            let cur = self.store.require_secret(&mut tx, &s.id).await?;
            if self
                .store
                .version_by_ref(&mut tx, &s.id, &ch.value_ref)
                .await?
                .is_some()
            {
                return Ok(false);
            }
            let now = now_ms();
            let n = cur.latest_version + 1;
            let (next, displaced) = with_current(&cur, n, now)?;
            let Some(detail) = self
                .store_promotion(&mut tx, &cur, &next, displaced, now)
                .await?
            else {
                continue;
            };
            self.store
                .insert_version(&mut tx, &s.id, n, now, &ch.value_ref)
                .await?;
            let detail = format!("{}; {detail}", ch.note);
            let ev = self
                .record(
                    &mut tx,
                    event(&actor, "outside-change", &s.id, n, "ok", detail),
                )
                .await?;
            tx.commit().await?;
            self.published(&ev);
            tracing::info!(secret = %s.id, provider, version = n, "outside change taken as the new current version");
            self.refresh(&s.id).await;
            return Ok(true);
        }
        Err(Error::FailedPrecondition(format!(
            "{} is changing too often to take an outside change",
            s.id
        )))
    }
}
