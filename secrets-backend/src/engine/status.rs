//! Reads (versions, secrets, status), reveals, the reports sidecars send
//! (versions served, re-encryption progress), and the audit log.

use std::time::Duration;

use rekey_keyring::SecretValue;

use super::group::Turn;
use super::reports::Change;
use super::{Actor, Engine, event};
use crate::audit::{self, NewEvent};
use crate::clock::now_ms;
use crate::error::{Error, Result};
use crate::provider::Stage;
use crate::store::{
    ConsumerRow, ReencryptionRow, RotationRow, SecretRow, VersionRow, VersionState,
};

/// Everything `rekey status` shows for one secret.
pub(crate) struct SecretStatus {
    pub(crate) secret: SecretRow,
    /// Newest first.
    pub(crate) versions: Vec<VersionRow>,
    /// Each consumer with whether it reported within the consumer TTL.
    pub(crate) consumers: Vec<(ConsumerRow, bool)>,
    pub(crate) rotation: Option<RotationRow>,
    pub(crate) decommission_blockers: Vec<String>,
    /// Re-encryption towards the current version.
    pub(crate) reencryption: Option<ReencryptionRow>,
    /// What is wrong where the provider keeps the value (an outside change
    /// that was not delivered: a deleted latest version, data that does
    /// not fit the kind); `None` when nothing is.
    pub(crate) provider_problem: Option<String>,
}

/// One secret in a consumer's report.
pub(crate) struct ServedReport {
    pub(crate) secret_id: String,
    pub(crate) version: i64,
    pub(crate) healthy: bool,
    pub(crate) error: String,
}

/// The re-encryption leader's progress report.
pub(crate) struct ReencryptionReport {
    pub(crate) secret_id: String,
    pub(crate) version: i64,
    pub(crate) consumer_id: String,
    pub(crate) rows_done: i64,
    pub(crate) rows_total: i64,
    pub(crate) rate: f64,
    pub(crate) finished: bool,
    pub(crate) phase: String,
}

/// Where a page of the audit log starts.
#[derive(Debug, Clone, Copy)]
pub(crate) enum AuditPage {
    /// Oldest first, after this sequence number.
    After(i64),
    /// Newest first, before this sequence number (0: from the newest).
    NewestBefore(i64),
}

/// Which version a read names.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Selector {
    Version(i64),
    Stage(Stage),
}

impl Engine {
    /// One secret and one of its versions (current by default).
    pub(crate) async fn get_version(
        &self,
        id: &str,
        which: Selector,
    ) -> Result<(SecretRow, VersionRow)> {
        let mut c = self.store.conn().await?;
        let s = self.store.require_secret(&mut c, id).await?;
        let n = match which {
            Selector::Version(v) => v,
            Selector::Stage(stage) => {
                let (label, n) = match stage {
                    Stage::Current => ("current", s.current_version),
                    Stage::Previous => ("previous", s.previous_version),
                    Stage::Pending => ("pending", s.pending_version),
                };
                if n == 0 {
                    return Err(Error::NotFound(format!("{id} has no {label} version")));
                }
                n
            }
        };
        let v = self.store.require_version(&mut c, id, n).await?;
        Ok((s, v))
    }

    /// One version with its value; audited. A revoked version's value is
    /// never revealed.
    pub(crate) async fn reveal(
        &self,
        actor: &Actor,
        id: &str,
        which: Selector,
    ) -> Result<(SecretRow, VersionRow, SecretValue)> {
        let (s, v) = self.get_version(id, which).await?;
        if v.state != VersionState::Active {
            return Err(Error::FailedPrecondition(format!(
                "v{} of {id} is revoked; its value is not revealed",
                v.version
            )));
        }
        let value = self.value_of(&s, &v).await?;
        let ev = audit::append(
            &self.store,
            event(actor, "reveal", id, v.version, "ok", String::new()),
            now_ms(),
        )
        .await?;
        self.published(&ev);
        Ok((s, v, value))
    }

    /// A secret and every one of its versions, newest first.
    pub(crate) async fn list_versions(&self, id: &str) -> Result<(SecretRow, Vec<VersionRow>)> {
        let mut c = self.store.conn().await?;
        let s = self.store.require_secret(&mut c, id).await?;
        let versions = self.store.list_versions(&mut c, id).await?;
        Ok((s, versions))
    }

    /// Secrets whose id starts with `prefix`.
    pub(crate) async fn list_secrets(&self, prefix: &str) -> Result<Vec<SecretRow>> {
        let mut c = self.store.conn().await?;
        self.store.list_secrets(&mut c, prefix).await
    }

    /// Everything `rekey status` shows for one secret.
    pub(crate) async fn status(&self, id: &str) -> Result<SecretStatus> {
        let now = now_ms();
        let ttl = self.consumer_ttl_ms();
        let mut c = self.store.conn().await?;
        let secret = self.store.require_secret(&mut c, id).await?;
        let versions = self.store.list_versions(&mut c, id).await?;
        let consumers = self.store.consumers(&mut c, id).await?;
        let rotation = self.store.last_rotation(&mut c, id).await?;
        drop(c);
        let decommission_blockers = self.decommission_blockers(&secret, now).await?;
        let reencryption = {
            let mut c = self.store.conn().await?;
            self.store
                .reencryption(&mut c, id, secret.current_version)
                .await?
        };
        Ok(SecretStatus {
            versions,
            consumers: consumers
                .into_iter()
                .map(|k| {
                    let live = now - k.reported_at_ms <= ttl;
                    (k, live)
                })
                .collect(),
            rotation,
            decommission_blockers,
            reencryption,
            provider_problem: self.provider_problem(id).await?,
            secret,
        })
    }

    /// A consumer's report of the version of each secret it serves; with
    /// `leaving`, its goodbye: it no longer counts as a consumer of them.
    /// The gauges follow at the next scheduler pass.
    pub(crate) async fn report_served(
        &self,
        identity: &str,
        consumer_id: &str,
        pod: &str,
        namespace: &str,
        served: &[ServedReport],
        leaving: bool,
    ) -> Result<()> {
        if consumer_id.is_empty() || consumer_id.len() > 256 {
            return Err(Error::InvalidArgument(
                "consumer_id must be 1 to 256 characters".into(),
            ));
        }
        // A live consumer's rows belong to the identity that reports it:
        // another one may neither speak for it nor say it left (which would
        // let a version it still serves be revoked).
        let taken = {
            let mut c = self.store.conn().await?;
            self.store
                .consumers_owned_by_others(
                    &mut c,
                    consumer_id,
                    identity,
                    now_ms() - self.consumer_ttl_ms(),
                )
                .await?
        };
        if let Some(secret) = served
            .iter()
            .map(|s| &s.secret_id)
            .find(|id| taken.contains(id))
        {
            return Err(Error::PermissionDenied(format!(
                "consumer {consumer_id} of {secret} belongs to another identity; report under a consumer id of your own"
            )));
        }
        let now = now_ms();
        let changes = served
            .iter()
            .map(|s| {
                if leaving {
                    Change::Delete {
                        consumer_id: consumer_id.into(),
                        secret_id: s.secret_id.clone(),
                        identity: identity.into(),
                    }
                } else {
                    Change::Upsert(ConsumerRow {
                        consumer_id: consumer_id.into(),
                        secret_id: s.secret_id.clone(),
                        pod: pod.into(),
                        namespace: namespace.into(),
                        identity: identity.into(),
                        version: s.version,
                        healthy: s.healthy,
                        error: s.error.chars().take(1000).collect(),
                        reported_at_ms: now,
                    })
                }
            })
            .collect();
        self.commit_report(changes).await?;
        if leaving {
            tracing::info!(
                consumer = consumer_id,
                secrets = served.len(),
                "consumer left"
            );
        }
        self.dirty()
            .extend(served.iter().map(|s| s.secret_id.clone()));
        Ok(())
    }

    /// The re-encryption leader's progress; `finished` lets previous be
    /// decommissioned, and is audited.
    pub(crate) async fn report_reencryption(
        &self,
        actor: &Actor,
        r: ReencryptionReport,
    ) -> Result<()> {
        let row = ReencryptionRow {
            secret_id: r.secret_id.clone(),
            version: r.version,
            consumer_id: r.consumer_id.chars().take(256).collect(),
            rows_done: r.rows_done,
            rows_total: r.rows_total,
            // Rows per second kept to three decimals as an integer.
            #[allow(
                clippy::cast_possible_truncation,
                reason = "a rate far below i64::MAX / 1000"
            )]
            rate_milli: (r.rate.max(0.0) * 1000.0) as i64,
            finished: r.finished,
            phase: r.phase.chars().take(500).collect(),
            updated_at_ms: now_ms(),
        };
        let mut c = self.store.conn().await?;
        self.store.require_secret(&mut c, &r.secret_id).await?;
        self.store
            .require_version(&mut c, &r.secret_id, r.version)
            .await?;
        self.store.upsert_reencryption(&mut c, &row).await?;
        drop(c);
        if r.finished {
            let ev = audit::append(
                &self.store,
                event(
                    actor,
                    "reencrypt",
                    &r.secret_id,
                    r.version,
                    "ok",
                    format!("{} rows checked by {}", r.rows_done, row.consumer_id),
                ),
                now_ms(),
            )
            .await?;
            self.published(&ev);
            tracing::info!(secret = %r.secret_id, version = r.version, "re-encryption finished");
        }
        Ok(())
    }

    /// Records that a Watch stream opened: one event per secret, naming
    /// the versions whose values it was sent. Streams opened together (a
    /// fleet starting, or reconnecting after a restart) are recorded in
    /// one transaction.
    pub(crate) async fn record_watch(
        &self,
        actor: &Actor,
        sent: &[(String, (u64, u64))],
    ) -> Result<()> {
        let events: Vec<NewEvent> = sent
            .iter()
            .map(|(id, (current, previous))| {
                let mut detail = format!("stream opened; values sent: current v{current}");
                if *previous > 0 {
                    detail.push_str(", previous v");
                    detail.push_str(&previous.to_string());
                }
                let version = i64::try_from(*current).unwrap_or(0);
                event(actor, "watch", id, version, "ok", detail)
            })
            .collect();
        match self.watch_opens.join(events, 1, Duration::ZERO).await {
            Turn::Done(r) => r,
            Turn::Write(group) => {
                // Boxed: only the writer runs it, and every waiter's
                // future would otherwise be as large as the writer's.
                let r = Box::pin(self.append_all(group.items().flatten())).await;
                group.finish(r)
            }
        }
    }

    /// Appends `events` in one transaction, in order.
    async fn append_all(&self, events: impl Iterator<Item = &NewEvent>) -> Result<()> {
        let mut tx = self.store.begin().await?;
        let mut appended = Vec::new();
        for ev in events {
            appended.push(audit::append_in(&self.store, &mut tx, ev.clone(), now_ms()).await?);
        }
        tx.commit().await?;
        for ev in &appended {
            self.published(ev);
        }
        Ok(())
    }

    /// Records a refused or failed call that would have changed or revealed
    /// something. Events carry the error message, which never holds a value.
    pub(crate) async fn record_refusal(
        &self,
        actor: &Actor,
        action: &str,
        secret: &str,
        version: i64,
        e: &Error,
    ) {
        // Bounded per identity: the rest of an interval is summarized.
        if matches!(e, Error::PermissionDenied(_)) && self.count_denied(&actor.identity, action) {
            return;
        }
        let ev = NewEvent {
            actor: actor.identity.clone(),
            action: action.into(),
            secret_id: secret.into(),
            version,
            outcome: e.outcome().into(),
            request_id: actor.request_id.clone(),
            detail: e.to_string(),
        };
        match audit::append(&self.store, ev, now_ms()).await {
            Ok(ev) => self.published(&ev),
            Err(err) => tracing::error!(error = %err, "cannot append audit event"),
        }
    }

    /// Audit events after `after_seq`, oldest first, or with `newest` the
    /// newest before `before_seq`, newest first; every secret's when
    /// `secret_id` is empty.
    pub(crate) async fn list_audit(
        &self,
        secret_id: &str,
        page: AuditPage,
        limit: i64,
    ) -> Result<Vec<audit::Event>> {
        let mut c = self.store.conn().await?;
        match page {
            AuditPage::After(seq) => audit::list(&mut c, secret_id, seq, limit).await,
            AuditPage::NewestBefore(seq) => audit::list_newest(&mut c, secret_id, seq, limit).await,
        }
    }

    /// Walks the audit chain, and checks that it still holds `expected`
    /// (a head recorded elsewhere) and the newest event this backend saw.
    pub(crate) async fn verify_audit(
        &self,
        expected: Option<audit::Head>,
    ) -> Result<audit::Verification> {
        let mut heads: Vec<(&str, audit::Head)> = Vec::new();
        if let Some(h) = expected {
            heads.push(("the expected head", h));
        }
        if let Some(h) = self.seen_audit_head() {
            heads.push(("the newest event this backend saw", h));
        }
        let mut c = self.store.conn().await?;
        let v = audit::verify(&self.store, &mut c, &heads).await?;
        drop(c);
        if v.first_bad.as_ref().is_some_and(|(seq, _)| *seq == 0)
            && heads.iter().any(|(who, _)| who.starts_with("the newest"))
        {
            self.check_audit_head().await;
        }
        Ok(v)
    }

    fn seen_audit_head(&self) -> Option<audit::Head> {
        self.audit_head
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Compares the store's audit log with the newest event this backend
    /// saw, and checks the meta rows its verification depends on: once
    /// that event is gone or changed, or a meta row does not hold, the
    /// store was tampered with (`rekey_audit_tampered` turns 1 and stays). A newer head written by
    /// another replica moves the seen head on.
    pub(crate) async fn check_audit_head(&self) {
        let r: Result<()> = async {
            let mut c = self.store.conn().await?;
            if let Some(why) = audit::check_meta(&self.store, &mut c).await? {
                if self.metrics.audit_tampered.get() == 0 {
                    tracing::error!(problem = %why, "the audit log's meta rows do not hold: the store was tampered with");
                }
                self.metrics.audit_tampered.set(1);
            }
            let store_head = audit::head(&mut c).await?;
            let Some(seen) = self.seen_audit_head() else {
                if let Some(h) = store_head {
                    self.adopt_head(h);
                }
                return Ok(());
            };
            let at_seen = audit::list(&mut c, "", seen.seq - 1, 1).await?;
            let kept = at_seen.first().is_some_and(|e| {
                e.seq == seen.seq && rekey_keyring::ct_eq(e.hash.as_bytes(), seen.mac.as_bytes())
            });
            if !kept {
                if self.metrics.audit_tampered.get() == 0 {
                    tracing::error!(
                        seen = seen.seq,
                        store_head = store_head.as_ref().map_or(0, |h| h.seq),
                        "the audit log lost an event this backend saw: the store was tampered with"
                    );
                }
                self.metrics.audit_tampered.set(1);
            } else if let Some(h) = store_head {
                self.adopt_head(h);
            }
            Ok(())
        }
        .await;
        if let Err(e) = r {
            tracing::warn!(error = %e, "cannot check the audit head");
        }
    }

    fn adopt_head(&self, h: audit::Head) {
        let mut head = self
            .audit_head
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if head.as_ref().is_none_or(|cur| cur.seq < h.seq) {
            self.metrics.set_audit_head(h.seq, &h.mac);
            *head = Some(h);
        }
    }
}
