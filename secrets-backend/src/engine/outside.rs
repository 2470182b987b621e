//! Outside changes: a value edited where its provider keeps it (`vault kv
//! put`, the AWS console), not through rekey. The scheduler asks each
//! external provider, every `poll_interval` (a loop of its own), what apps read for each
//! secret it keeps. A new value becomes the secret's new current version
//! (the old current becomes previous), is delivered to every watcher and is
//! audited with the provider and path as actor. What cannot be delivered
//! (a deleted latest version, a value the secret's kind refuses) is
//! reported in `rekey status` and audited once; watchers keep the last
//! good version.

use std::sync::Arc;

use super::{Actor, CAS_ATTEMPTS, Engine, event, location, stored, with_current};
use crate::clock::now_ms;
use crate::error::{Error, Result};
use crate::kinds::SecretCtx;
use crate::provider::{Observed, OutsideChange, ValueProvider};
use crate::store::{self, SecretRow};

fn problem_key(secret_id: &str) -> String {
    format!("provider_problem/{secret_id}")
}

impl Engine {
    /// Looks for outside changes at `p` every `poll_interval` until
    /// `stop` resolves. Each provider has a loop of its own, apart from
    /// the scheduler's tick, so that a short interval is kept.
    pub(crate) async fn poll_provider(
        &self,
        p: Arc<dyn ValueProvider>,
        stop: impl std::future::Future<Output = ()>,
    ) {
        let mut every = tokio::time::interval(p.poll_interval());
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(stop);
        loop {
            tokio::select! {
                _ = every.tick() => {
                    if let Err(e) = self.take_outside_changes(p.as_ref()).await {
                        tracing::warn!(provider = p.name(), error = %e, "cannot look for outside changes; trying again at the next poll");
                    }
                }
                () = &mut stop => break,
            }
        }
    }

    /// The providers that can change outside rekey.
    pub(crate) fn external_providers(&self) -> Vec<Arc<dyn ValueProvider>> {
        self.providers.external().cloned().collect()
    }

    /// Looks at every secret one provider keeps; returns how many outside
    /// changes became current. Stops at the first error that is not about
    /// one secret (the provider unreachable, sealed, refusing the token).
    pub(crate) async fn take_outside_changes(&self, p: &dyn ValueProvider) -> Result<usize> {
        let secrets = {
            let mut c = self.store.conn().await?;
            self.store.secrets_of(&mut c, p.name()).await?
        };
        let mut taken = 0;
        for s in secrets {
            if s.current_version == 0 {
                continue;
            }
            if self.look_at(p, &s).await? {
                taken += 1;
            }
        }
        Ok(taken)
    }

    /// Looks at one secret where `p` keeps it; `true` when an outside
    /// change became current. Errs when the provider cannot be asked at all
    /// (unreachable, sealed, refusing the token).
    async fn look_at(&self, p: &dyn ValueProvider, s: &SecretRow) -> Result<bool> {
        let cur = {
            let mut c = self.store.conn().await?;
            self.store
                .require_version(&mut c, &s.id, s.current_version)
                .await?
        };
        let observed = match p.observe(location(s), stored(&cur)).await {
            Ok(o) => o,
            // Unreachable or sealed: no other secret fares better.
            Err(
                e @ Error::Provider {
                    unavailable: true, ..
                },
            ) => return Err(e),
            // A denied path is this secret's problem; the others are
            // still looked at.
            Err(e @ Error::Provider { .. }) => Observed::Problem(e.to_string()),
            Err(e) => return Err(e),
        };
        match observed {
            Observed::Unchanged => self.set_problem(s, p, None).await?,
            Observed::Problem(message) => {
                self.set_problem(s, p, Some(message)).await?;
            }
            Observed::Changed(ch) => return self.take_outside_change(p, s, &ch).await,
        }
        Ok(false)
    }

    /// [`Engine::look_at`] for one secret now rather than at the next
    /// poll. Returns the secret as it is afterwards, whether a change was
    /// taken, and the provider's problem, if any.
    pub(crate) async fn sync_secret(&self, id: &str) -> Result<(SecretRow, bool, Option<String>)> {
        let s = {
            let mut c = self.store.conn().await?;
            self.store.require_secret(&mut c, id).await?
        };
        if s.provider.is_empty() {
            return Err(Error::FailedPrecondition(format!(
                "{} lives in rekey's own store; only secrets kept by a provider change outside rekey",
                s.id
            )));
        }
        let p = self.providers.get(&s.provider)?;
        let changed = s.current_version != 0 && self.look_at(p.as_ref(), &s).await?;
        let problem = self.provider_problem(&s.id).await?;
        let mut c = self.store.conn().await?;
        let now = self.store.require_secret(&mut c, &s.id).await?;
        Ok((now, changed, problem))
    }

    /// The secret an external provider keeps at `path`.
    pub(crate) async fn secret_at_path(&self, path: &str) -> Result<SecretRow> {
        if path.is_empty() {
            return Err(Error::InvalidArgument(
                "name the secret by id or by provider path".into(),
            ));
        }
        let names: Vec<String> = self
            .providers
            .external()
            .map(|p| p.name().to_string())
            .collect();
        let mut c = self.store.conn().await?;
        for name in names {
            if let Some(s) = self.store.secret_at(&mut c, &name, path).await? {
                return Ok(s);
            }
        }
        Err(Error::NotFound(format!("a secret kept at {path:?}")))
    }

    /// The actor of an outside change: the provider and where it keeps
    /// the secret.
    fn outside_actor(p: &dyn ValueProvider, s: &SecretRow) -> Actor {
        Actor::system(&format!(
            "external:{}:{}",
            p.name(),
            p.full_path(location(s).path)
        ))
    }

    /// Records what is wrong where the provider keeps `s` (audited once per
    /// distinct problem), or clears it.
    async fn set_problem(
        &self,
        s: &SecretRow,
        p: &dyn ValueProvider,
        problem: Option<String>,
    ) -> Result<()> {
        let key = problem_key(&s.id);
        let mut c = self.store.conn().await?;
        let was = store::meta_get(&mut c, &key).await?.unwrap_or_default();
        let now = problem.unwrap_or_default();
        if was == now {
            return Ok(());
        }
        store::meta_set(&mut c, &key, &now).await?;
        drop(c);
        if now.is_empty() {
            tracing::info!(secret = %s.id, provider = p.name(), "the provider's problem is gone");
            return Ok(());
        }
        tracing::warn!(secret = %s.id, provider = p.name(), problem = %now, "not delivered; sidecars keep the last good version");
        let actor = Self::outside_actor(p, s);
        self.record_refusal(
            &actor,
            "outside-change",
            &s.id,
            0,
            &Error::FailedPrecondition(format!("not delivered: {now}")),
        )
        .await;
        Ok(())
    }

    /// What is wrong where the provider keeps `id`, if anything.
    pub(super) async fn provider_problem(&self, id: &str) -> Result<Option<String>> {
        let mut c = self.store.conn().await?;
        Ok(store::meta_get(&mut c, &problem_key(id))
            .await?
            .filter(|p| !p.is_empty()))
    }

    /// Records one outside change as the new current version; `false` when
    /// it was already taken (by this or another replica) or the kind
    /// refuses it.
    async fn take_outside_change(
        &self,
        p: &dyn ValueProvider,
        s: &SecretRow,
        ch: &OutsideChange,
    ) -> Result<bool> {
        let now = {
            let mut c = self.store.conn().await?;
            if self
                .store
                .version_by_ref(&mut c, &s.id, &ch.value_ref)
                .await?
                .is_some()
            {
                return Ok(false);
            }
            self.store.require_secret(&mut c, &s.id).await?
        };
        let actor = Self::outside_actor(p, s);
        let kind = self.kinds.get(&s.kind)?;
        let ctx = SecretCtx {
            id: &s.id,
            options: &s.options,
        };
        if let Err(e) = self
            .check_size(&s.id, &ch.value)
            .and_then(|()| kind.check_value(&ctx, &ch.value))
        {
            let problem = format!("{} does not fit the {} kind: {e}", ch.note, s.kind);
            self.set_problem(s, p, Some(problem)).await?;
            return Ok(false);
        }
        // rekey's own write between the provider and the store: a rotation
        // finishing or a rollback in flight. The next poll finds it
        // recorded.
        if now.pending_version != 0 || self.rolling_back(&s.id) {
            return Ok(false);
        }
        if kind.one_rotation_at_a_time() && now.previous_version != 0 {
            let problem = format!(
                "{} is not taken while previous v{} of {} may still be in use (a {} secret changes one version at a time); it is taken at the first poll after `rekey revoke {} --version {}`",
                ch.note, now.previous_version, s.id, s.kind, s.id, now.previous_version
            );
            self.set_problem(s, p, Some(problem)).await?;
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
            tracing::info!(secret = %s.id, provider = p.name(), version = n, "outside change taken as the new current version");
            self.set_problem(s, p, None).await?;
            if displaced > 0 {
                self.retire_displaced(&next, displaced).await;
            }
            self.refresh(&s.id).await;
            return Ok(true);
        }
        Err(Error::FailedPrecondition(format!(
            "{} is changing too often to take an outside change",
            s.id
        )))
    }
}
