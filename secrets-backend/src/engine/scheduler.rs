//! The scheduler pass: due rotations (exactly one replica fires each),
//! the consumer gauges, and decommission. (Outside changes at providers
//! are looked for by a loop per provider: [`Engine::poll_provider`].)

use std::sync::atomic::Ordering;

use super::{Actor, Engine};
use crate::clock::now_ms;
use crate::error::Result;
use crate::store::RotationStep;

/// How long the scheduler waits before retrying a due rotation it claimed
/// but could not complete.
const SCHEDULE_RETRY_MS: i64 = 5 * 60 * 1000;
/// How often, at most, the scheduler recomputes the consumer gauges (a
/// quarter of the consumer TTL when that is shorter).
const CONSUMER_GAUGE_REFRESH_MS: i64 = 15_000;

impl Engine {
    /// One scheduler pass: fire due rotations, refresh the consumer gauges,
    /// then decommission previous versions whose
    /// conditions hold.
    pub(crate) async fn tick(&self) -> Result<()> {
        let now = now_ms();
        self.rotate_due(now).await?;
        self.refresh_consumer_gauges(now).await?;
        self.check_audit_head().await;
        self.summarize_refusals(false).await;
        self.decommission_due(now).await
    }

    async fn rotate_due(&self, now: i64) -> Result<()> {
        let due = {
            let mut c = self.store.conn().await?;
            self.store.due_secrets(&mut c, now).await?
        };
        for s in due {
            let (parked, claimed) = {
                let mut c = self.store.conn().await?;
                let parked = self
                    .store
                    .last_rotation(&mut c, &s.id)
                    .await?
                    .is_some_and(|r| r.step == RotationStep::NeedsAttention);
                // A parked secret waits for an operator: `rekey rotate --cancel`.
                let claimed = !parked
                    && self
                        .store
                        .claim_schedule(
                            &mut c,
                            &s.id,
                            s.next_rotation_at_ms,
                            now + SCHEDULE_RETRY_MS,
                        )
                        .await?;
                (parked, claimed)
            };
            if parked || !claimed {
                continue;
            }
            let actor = Actor::system("scheduler");
            let token = format!("schedule-{}", s.next_rotation_at_ms);
            match self.rotate(&actor, &s.id, Some(&token), None).await {
                Ok(o) => {
                    tracing::info!(secret = %s.id, version = o.version.version, "scheduled rotation done");
                }
                Err(e) => {
                    tracing::warn!(secret = %s.id, error = %e, "scheduled rotation did not run; retrying later");
                }
            }
        }
        Ok(())
    }

    pub(super) fn consumer_ttl_ms(&self) -> i64 {
        i64::try_from(self.settings.consumer_ttl.as_millis()).unwrap_or(i64::MAX)
    }

    /// Recomputes the gauges of secrets with new reports, and of every
    /// consumed secret now and then, so that consumers that stopped
    /// reporting drop out.
    async fn refresh_consumer_gauges(&self, now: i64) -> Result<()> {
        let last = self.consumers_refreshed_at.load(Ordering::Relaxed);
        let every = (self.consumer_ttl_ms() / 4).clamp(1_000, CONSUMER_GAUGE_REFRESH_MS);
        let ids: Vec<String> = if now - last >= every {
            self.consumers_refreshed_at.store(now, Ordering::Relaxed);
            self.dirty().clear();
            let mut c = self.store.conn().await?;
            self.store.consumed_secret_ids(&mut c).await?
        } else {
            std::mem::take(&mut *self.dirty()).into_iter().collect()
        };
        for id in ids {
            self.refresh_consumer_gauge(&id).await;
        }
        Ok(())
    }

    pub(super) fn dirty(&self) -> std::sync::MutexGuard<'_, std::collections::BTreeSet<String>> {
        self.consumers_dirty
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Updates the `rekey_consumers` gauges of one secret.
    async fn refresh_consumer_gauge(&self, id: &str) {
        let now = now_ms();
        let ttl = self.consumer_ttl_ms();
        let consumers = async {
            let mut c = self.store.conn().await?;
            self.store.consumers(&mut c, id).await
        }
        .await;
        let Ok(consumers) = consumers else {
            return;
        };
        let mut by_version = std::collections::BTreeMap::<i64, i64>::new();
        for k in consumers.iter().filter(|k| now - k.reported_at_ms <= ttl) {
            *by_version.entry(k.version).or_default() += 1;
        }
        let pairs: Vec<(i64, i64)> = by_version.into_iter().collect();
        self.metrics.set_consumers(id, &pairs);
    }
}
