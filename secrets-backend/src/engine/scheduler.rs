//! The scheduler pass: due rotations (exactly one replica fires each),
//! the consumer gauges, and decommission. (Outside changes at providers
//! are looked for by a loop per provider: [`Engine::poll_provider`].)
//!
//! Rotations and decommissions run per secret, as tasks of their own, at
//! most `scheduler.concurrency` at a time: a slow hook or target holds up
//! its own secret only. A secret with work still running is skipped by the
//! passes that come meanwhile.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use tokio::task::JoinSet;

use super::{Actor, Engine};
use crate::clock::now_ms;
use crate::error::Result;
use crate::store::{RotationStep, SecretRow};

/// How long the scheduler waits before retrying a due rotation it claimed
/// but could not complete.
const SCHEDULE_RETRY_MS: i64 = 5 * 60 * 1000;
/// How often, at most, the scheduler recomputes the consumer gauges (a
/// quarter of the consumer TTL when that is shorter).
const CONSUMER_GAUGE_REFRESH_MS: i64 = 15_000;

/// Takes a secret off the busy list when its task ends, however it ends.
struct Busy {
    engine: Arc<Engine>,
    id: String,
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.engine.scheduled().remove(&self.id);
    }
}

impl Engine {
    /// One scheduler pass: start due rotations, refresh the consumer
    /// gauges, then start the decommission of previous versions whose
    /// conditions hold. Per-secret work goes to `tasks` and is not waited
    /// for.
    pub(crate) async fn tick(self: &Arc<Self>, tasks: &mut JoinSet<()>) -> Result<()> {
        while tasks.try_join_next().is_some() {}
        let now = now_ms();
        self.rotate_due(now, tasks).await?;
        self.refresh_consumer_gauges(now).await?;
        self.check_audit_head().await;
        self.summarize_refusals(false).await;
        self.decommission_due(now, tasks).await
    }

    /// A pass and then the per-secret work it started, to the end.
    #[cfg(test)]
    pub(crate) async fn tick_and_wait(self: &Arc<Self>) -> Result<()> {
        let mut tasks = JoinSet::new();
        self.tick(&mut tasks).await?;
        while tasks.join_next().await.is_some() {}
        Ok(())
    }

    pub(super) fn scheduled(&self) -> std::sync::MutexGuard<'_, std::collections::HashSet<String>> {
        self.scheduled
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Runs `work` for secret `id` as a task of its own once a slot is
    /// free, unless work for `id` is still running.
    fn start_for<F, Fut>(self: &Arc<Self>, tasks: &mut JoinSet<()>, id: &str, work: F)
    where
        F: FnOnce(Arc<Engine>) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        if !self.scheduled().insert(id.to_string()) {
            return;
        }
        let busy = Busy {
            engine: self.clone(),
            id: id.to_string(),
        };
        let engine = self.clone();
        tasks.spawn(async move {
            let _busy = busy;
            let Ok(_slot) = engine.slots.clone().acquire_owned().await else {
                return;
            };
            work(engine).await;
        });
    }

    async fn rotate_due(self: &Arc<Self>, now: i64, tasks: &mut JoinSet<()>) -> Result<()> {
        let due = {
            let mut c = self.store.conn().await?;
            self.store.due_secrets(&mut c, now).await?
        };
        for s in due {
            self.start_for(tasks, &s.id.clone(), move |e| async move {
                if let Err(err) = e.rotate_scheduled(&s, now).await {
                    tracing::warn!(secret = %s.id, error = %err, "scheduled rotation did not run; retrying later");
                }
            });
        }
        Ok(())
    }

    /// Claims one due rotation (exactly one replica does) and runs it.
    async fn rotate_scheduled(&self, s: &SecretRow, now: i64) -> Result<()> {
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
            return Ok(());
        }
        let actor = Actor::system("scheduler");
        let token = format!("schedule-{}", s.next_rotation_at_ms);
        let o = self.rotate(&actor, &s.id, Some(&token), None).await?;
        tracing::info!(secret = %s.id, version = o.version.version, "scheduled rotation done");
        Ok(())
    }

    async fn decommission_due(self: &Arc<Self>, now: i64, tasks: &mut JoinSet<()>) -> Result<()> {
        let candidates = {
            let mut c = self.store.conn().await?;
            self.store.secrets_with_previous(&mut c).await?
        };
        for s in candidates {
            if s.pending_version != 0 {
                continue;
            }
            self.start_for(tasks, &s.id.clone(), move |e| async move {
                if let Err(err) = e.decommission_if_due(&s, now).await {
                    tracing::warn!(secret = %s.id, error = %err, "decommission failed; retrying later");
                }
            });
        }
        Ok(())
    }

    /// Revokes previous of `s` when nothing holds it back any more.
    async fn decommission_if_due(&self, s: &SecretRow, now: i64) -> Result<()> {
        if self.decommission_blockers(s, now).await?.is_empty() {
            let actor = Actor::system("decommission");
            self.revoke_unchecked(&actor, s, s.previous_version, None, Instant::now())
                .await?;
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
