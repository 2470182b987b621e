//! The leader-elected re-encryption task.
//!
//! When an `encryption-key` secret this sidecar serves gets a new current
//! version (with the old one still previous), every sidecar configured for
//! it tries to become leader: by default through a Postgres session
//! advisory lock, which dies with its connection, so when the leader dies
//! another sidecar takes over at once; or through a Kubernetes Lease
//! (`kube_lease`), which a successor takes once it expires. The leader
//! moves each configured column from previous to current, saving a
//! checkpoint (the last id done) after every batch so a new leader resumes
//! there, and re-checks that it still leads before every batch. Once the fleet serves the new key it runs a final
//! sweep for rows that pods still on the old key wrote meanwhile, then
//! reports the re-encryption finished: that is what lets the backend
//! decommission the old key. Every write is a compare-and-swap, so a batch
//! repeated by a second leader changes nothing.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rekey_keyring::{MasterKey, SecretValue};
use rekey_proto::v1 as pb;
use rekey_reencrypt::{Column, Hook, Options, Report};
use sqlx::PgPool;
use tokio::sync::watch;

use crate::config::{Config, Election, ReencryptConfig};
use crate::kube_lease::{Elector, Held, LeaseError, LeaseLost};
use crate::state::State;

/// Why an attempt at leading re-encryption stopped. The message goes to
/// the log and, as `error: ...`, to the backend's status of the key; it
/// names files, tables and versions, never a key or the database URL.
#[derive(Debug, thiserror::Error)]
pub enum ReencryptError {
    #[error("cannot read {}: {reason}", path.display())]
    DatabaseUrlFile {
        path: std::path::PathBuf,
        reason: std::io::Error,
    },
    #[error("cannot connect to the database: {reason}")]
    Connect { reason: String },
    #[error("cannot create the checkpoint table: {reason}")]
    Schema { reason: String },
    /// A statement failed; the database's own message.
    #[error("{reason}")]
    Database { reason: String },
    #[error("lost the lock connection: {reason}")]
    LockConnection { reason: String },
    #[error("the secret is not an encryption key")]
    NotAKey,
    #[error("the secret is not an encryption key: {0}")]
    BadKey(#[from] rekey_keyring::KeyError),
    #[error(transparent)]
    Lease(#[from] LeaseError),
    /// Checking the columns, counting or moving rows.
    #[error(transparent)]
    Reencrypt(#[from] rekey_reencrypt::Error),
    /// Connecting to the backend.
    #[error(transparent)]
    Backend(#[from] crate::Error),
    #[error("cannot read the fleet's status: {message}")]
    FleetStatus { message: String },
    #[error("the key moved on to v{current}")]
    KeyMoved { current: u64 },
    #[error("shutting down")]
    ShuttingDown,
}

/// Why this sidecar stopped leading while it worked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
enum NotLeader {
    #[error("the advisory lock is gone")]
    AdvisoryLockGone,
    #[error(transparent)]
    Lease(#[from] LeaseLost),
}

/// Creates the checkpoint table unless it exists.
async fn ensure_schema(pool: &PgPool) -> Result<(), ReencryptError> {
    rekey_reencrypt::checkpoint::ensure_table(pool)
        .await
        .map_err(|e| ReencryptError::Schema {
            reason: rekey_probe::postgres::pg_error(&e),
        })
}

/// The advisory lock key for one secret.
fn lock_key(secret: &str) -> i64 {
    let d = ring::digest::digest(
        &ring::digest::SHA256,
        format!("rekey-reencrypt:{secret}").as_bytes(),
    );
    let mut b = [0u8; 8];
    b.copy_from_slice(&d.as_ref()[..8]);
    i64::from_be_bytes(b)
}

fn key_of(v: &SecretValue) -> Result<MasterKey, ReencryptError> {
    match v {
        SecretValue::Raw(b) => Ok(MasterKey::from_base64(
            std::str::from_utf8(b.expose()).unwrap_or_default(),
        )?),
        SecretValue::Fields(_) => Err(ReencryptError::NotAKey),
    }
}

/// The database's own message for a failed statement (no URL, no query
/// parameters).
#[allow(
    clippy::needless_pass_by_value,
    reason = "used as map_err(db_error), which passes the error by value"
)]
fn db_error(e: sqlx::Error) -> ReencryptError {
    ReencryptError::Database {
        reason: rekey_probe::postgres::pg_error(&e),
    }
}

/// Runs until shutdown: whenever the served key changes, try to lead.
pub async fn run(
    cfg: Arc<Config>,
    rc: ReencryptConfig,
    state: Arc<State>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut done: BTreeSet<u64> = BTreeSet::new();
    let mut elector = None;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(rc.poll) => {}
            _ = crate::stopped(&mut shutdown) => return,
        }
        let Some(served) = state.served(&rc.secret) else {
            continue;
        };
        let Some(prev) = served.previous.clone() else {
            continue;
        };
        let v = served.current.version;
        if done.contains(&v) {
            continue;
        }
        if let Election::KubernetesLease(lease) = &rc.election
            && elector.is_none()
        {
            match Elector::new(lease.clone(), &cfg.consumer_id) {
                Ok(e) => {
                    tracing::info!(secret = %rc.secret, lease = %lease.name, identity = e.identity(), "candidate for the re-encryption lease");
                    elector = Some(e);
                }
                Err(e) => {
                    tracing::warn!(secret = %rc.secret, error = %e, "cannot use the Kubernetes Lease");
                    continue;
                }
            }
        }
        match attempt(
            &cfg,
            &rc,
            &state,
            elector.as_mut(),
            &served.current.value,
            &prev.value,
            v,
            &mut shutdown,
        )
        .await
        {
            Ok(true) => {
                done.insert(v);
            }
            Ok(false) => {}
            Err(_) if *shutdown.borrow() => return,
            Err(e) => {
                state.metrics.reencrypt_leader.set(0);
                tracing::warn!(secret = %rc.secret, version = v, error = %e, "re-encryption stopped; another attempt follows");
                report(
                    &cfg,
                    &rc.secret,
                    v,
                    0,
                    0,
                    0.0,
                    false,
                    &format!("error: {e}"),
                )
                .await;
            }
        }
    }
}

#[allow(clippy::too_many_arguments, reason = "mirrors the message's fields")]
async fn report(
    cfg: &Config,
    secret: &str,
    version: u64,
    done: u64,
    total: u64,
    rate: f64,
    finished: bool,
    phase: &str,
) {
    let Ok(mut client) = crate::backend::connect(cfg).await else {
        return;
    };
    let r = client
        .report_reencryption(pb::ReportReencryptionRequest {
            secret_id: secret.into(),
            version,
            consumer_id: cfg.consumer_id.clone(),
            rows_done: done,
            rows_total: total,
            rate,
            finished,
            phase: phase.into(),
        })
        .await;
    if let Err(e) = r {
        tracing::warn!(code = ?e.code(), message = e.message(), "cannot report re-encryption progress");
    }
}

/// What makes this sidecar the leader, re-checked before every batch.
enum Leadership {
    /// A session advisory lock, held by this connection.
    Advisory {
        conn: sqlx::pool::PoolConnection<sqlx::Postgres>,
        key: i64,
    },
    Lease(Held),
}

impl Leadership {
    /// `Ok(None)` while this sidecar leads, `Ok(Some(why))` once another
    /// one may; `Err` when leadership cannot be checked.
    async fn check(&mut self) -> Result<Option<NotLeader>, ReencryptError> {
        match self {
            Leadership::Advisory { conn, key } => {
                let held: bool = sqlx::query_scalar(
                    "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid() \
                     AND granted AND objsubid = 1 AND classid::bigint = (($1 >> 32) & 4294967295) AND objid::bigint = ($1 & 4294967295))",
                )
                .bind(*key)
                .fetch_one(&mut **conn)
                .await
                .map_err(|e| ReencryptError::LockConnection { reason: rekey_probe::postgres::pg_error(&e) })?;
                Ok((!held).then_some(NotLeader::AdvisoryLockGone))
            }
            Leadership::Lease(h) => Ok(h.check().err().map(NotLeader::from)),
        }
    }

    async fn release(self) {
        match self {
            Leadership::Advisory { mut conn, key } => {
                let _ = sqlx::query("SELECT pg_advisory_unlock($1)")
                    .bind(key)
                    .execute(&mut *conn)
                    .await;
            }
            Leadership::Lease(h) => h.release().await,
        }
    }
}

/// The leader's hook: re-check leadership before each batch, checkpoint
/// and report after it.
struct Leader<'a> {
    cfg: &'a Config,
    state: &'a State,
    checkpoints: &'a rekey_reencrypt::checkpoint::Checkpoints,
    leadership: &'a mut Leadership,
    shutdown: watch::Receiver<bool>,
    secret: &'a str,
    version: u64,
    pass: &'static str,
    col: Column,
    done_before: u64,
    total: u64,
    started: Instant,
    last_report: Instant,
    /// Why this sidecar stopped leading, once it has.
    lost: Option<NotLeader>,
}

impl Hook for Leader<'_> {
    async fn before_batch(&mut self) -> Result<(), rekey_reencrypt::Error> {
        use rekey_reencrypt::Error::Stopped;
        if *self.shutdown.borrow() {
            return Err(Stopped(ReencryptError::ShuttingDown.to_string()));
        }
        match self
            .leadership
            .check()
            .await
            .map_err(|e| Stopped(e.to_string()))?
        {
            None => Ok(()),
            Some(why) => {
                let e = Stopped(format!("no longer the leader: {why}"));
                self.lost = Some(why);
                Err(e)
            }
        }
    }

    async fn after_batch(
        &mut self,
        r: &Report,
        last_id: &str,
    ) -> Result<(), rekey_reencrypt::Error> {
        self.checkpoints.save(&self.col, self.pass, last_id).await?;
        let done = self.done_before + r.scanned;
        self.state.metrics.reencrypt_rows.set(done as i64);
        // Once stopping, the pod's last seconds go to handing over, not to
        // a report the next leader will replace.
        if !*self.shutdown.borrow() && self.last_report.elapsed() >= Duration::from_millis(500) {
            self.last_report = Instant::now();
            let rate = done as f64 / self.started.elapsed().as_secs_f64().max(0.001);
            report(
                self.cfg,
                self.secret,
                self.version,
                done,
                self.total,
                rate,
                false,
                self.pass,
            )
            .await;
        }
        Ok(())
    }
}

/// One attempt at leading re-encryption to `version`. `Ok(true)` when it is
/// finished (by us or an earlier leader), `Ok(false)` when another sidecar
/// leads or took over from us. `elector` is the Lease candidate, or none for the advisory lock.
#[allow(clippy::too_many_arguments, reason = "one attempt's whole context")]
async fn attempt(
    cfg: &Config,
    rc: &ReencryptConfig,
    state: &State,
    elector: Option<&mut Elector>,
    current: &SecretValue,
    previous: &SecretValue,
    version: u64,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<bool, ReencryptError> {
    let url = zeroize::Zeroizing::new(
        std::fs::read_to_string(&rc.database_url_file)
            .map_err(|reason| ReencryptError::DatabaseUrlFile {
                path: rc.database_url_file.clone(),
                reason,
            })?
            .trim()
            .to_string(),
    );
    let target =
        rekey_probe::postgres::PgUrl::parse(&url).map_err(|e| ReencryptError::Connect {
            reason: e.to_string(),
        })?;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(3)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(target.options())
        .await
        .map_err(|e| ReencryptError::Connect {
            reason: target.reason(&e),
        })?;
    ensure_schema(&pool).await?;
    let finished = |pool: PgPool| async move {
        sqlx::query_scalar::<_, bool>(
            "SELECT EXISTS (SELECT 1 FROM rekey_reencrypt_checkpoints WHERE secret_id = $1 AND version = $2 AND pass = 'finished' AND done)",
        )
        .bind(&rc.secret)
        .bind(version as i64)
        .fetch_one(&pool)
        .await
        .map_err(db_error)
    };
    if finished(pool.clone()).await? {
        return Ok(true);
    }
    let mut leadership = match elector {
        None => {
            let key = lock_key(&rc.secret);
            let mut conn = pool.acquire().await.map_err(db_error)?;
            let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
                .bind(key)
                .fetch_one(&mut *conn)
                .await
                .map_err(db_error)?;
            if !got {
                return Ok(false);
            }
            Leadership::Advisory { conn, key }
        }
        Some(e) => match e.try_acquire().await? {
            Some(held) => Leadership::Lease(held),
            None => return Ok(false),
        },
    };
    // Leader. A previous leader may have finished just before we got here.
    let r = match finished(pool.clone()).await {
        Ok(true) => Ok(true),
        Ok(false) => {
            state.metrics.reencrypt_leader.set(1);
            lead(
                cfg,
                rc,
                state,
                &pool,
                &mut leadership,
                current,
                previous,
                version,
                shutdown,
            )
            .await
        }
        Err(e) => Err(e),
    };
    leadership.release().await;
    state.metrics.reencrypt_leader.set(0);
    pool.close().await;
    r
}

/// The leader's work: both passes over every column, then the report that
/// lets the backend decommission the old key.
#[allow(clippy::too_many_arguments, reason = "one attempt's whole context")]
async fn lead(
    cfg: &Config,
    rc: &ReencryptConfig,
    state: &State,
    pool: &PgPool,
    leadership: &mut Leadership,
    current: &SecretValue,
    previous: &SecretValue,
    version: u64,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<bool, ReencryptError> {
    let pool = pool.clone();
    tracing::info!(secret = %rc.secret, version, "leading re-encryption");
    let new = Arc::new(key_of(current)?);
    let old = Arc::new(key_of(previous)?);
    let types = rekey_reencrypt::check_columns(&pool, &rc.columns).await?;
    let checkpoints = rekey_reencrypt::checkpoint::Checkpoints {
        pool: pool.clone(),
        run: rc.secret.clone(),
        version: version as i64,
    };
    let mut total = 0;
    for c in &rc.columns {
        total += rekey_reencrypt::count_rows(&pool, c).await?;
    }
    let opts = Options {
        batch_size: rc.batch_size,
        ..Options::default()
    };
    let started = Instant::now();
    let mut done_rows = 0u64;
    for pass in ["pass", "sweep"] {
        if pass == "sweep" {
            // Wait until every live consumer serves the new key: from then
            // on nobody writes under the old one.
            report(
                cfg,
                &rc.secret,
                version,
                done_rows,
                total,
                0.0,
                false,
                "waiting-for-fleet",
            )
            .await;
            wait_for_fleet(cfg, &rc.secret, version, shutdown).await?;
            done_rows = 0;
        }
        for (col, ty) in rc.columns.iter().zip(&types) {
            let start = checkpoints.load(col, pass).await.map_err(db_error)?;
            if start.as_ref().is_some_and(|(_, d)| *d) {
                continue;
            }
            let mut hook = Leader {
                cfg,
                state,
                checkpoints: &checkpoints,
                leadership: &mut *leadership,
                shutdown: shutdown.clone(),
                secret: &rc.secret,
                version,
                pass,
                col: col.clone(),
                done_before: done_rows,
                total,
                started,
                last_report: Instant::now(),
                lost: None,
            };
            let r = rekey_reencrypt::run_column(
                &pool,
                col,
                ty,
                old.clone(),
                new.clone(),
                opts,
                start.and_then(|(l, _)| l),
                &mut hook,
            )
            .await;
            // Whoever leads now reports; an error from here would overwrite
            // its progress.
            if let Some(why) = hook.lost {
                tracing::info!(secret = %rc.secret, version, reason = %why, "stopped leading re-encryption");
                return Ok(false);
            }
            let r = r?;
            done_rows += r.scanned;
            checkpoints.done(col, pass).await.map_err(db_error)?;
            tracing::info!(secret = %rc.secret, version, pass, table = %col.table, column = %col.column, rotated = r.rotated, already_new = r.already_new, "column re-encrypted");
        }
    }
    sqlx::query(
        "INSERT INTO rekey_reencrypt_checkpoints (secret_id, version, table_name, column_name, pass, done) VALUES ($1, $2, '*', '*', 'finished', true) \
         ON CONFLICT (secret_id, version, table_name, column_name, pass) DO UPDATE SET done = true",
    )
    .bind(&rc.secret)
    .bind(version as i64)
    .execute(&pool)
    .await
    .map_err(db_error)?;
    let rate = done_rows as f64 / started.elapsed().as_secs_f64().max(0.001);
    report(
        cfg, &rc.secret, version, done_rows, total, rate, true, "finished",
    )
    .await;
    tracing::info!(secret = %rc.secret, version, "re-encryption finished");
    Ok(true)
}

async fn wait_for_fleet(
    cfg: &Config,
    secret: &str,
    version: u64,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<(), ReencryptError> {
    loop {
        let mut client = crate::backend::connect(cfg).await?;
        let st = client
            .get_status(pb::GetStatusRequest {
                secret_id: secret.into(),
            })
            .await
            .map_err(|e| ReencryptError::FleetStatus {
                message: e.message().to_string(),
            })?
            .into_inner();
        let s = st.secrets.first().cloned().unwrap_or_default();
        let current = s.secret.as_ref().map_or(0, |x| x.current_version);
        if current != version {
            return Err(ReencryptError::KeyMoved { current });
        }
        if s.converged == s.live_consumers {
            return Ok(());
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(500)) => {}
            () = crate::stopped(shutdown) => return Err(ReencryptError::ShuttingDown),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_keep_their_wording() {
        // `rekey status` shows these as the key's phase (`error: ...`).
        assert_eq!(
            ReencryptError::Connect {
                reason: "connection refused".into()
            }
            .to_string(),
            "cannot connect to the database: connection refused"
        );
        assert_eq!(
            ReencryptError::KeyMoved { current: 4 }.to_string(),
            "the key moved on to v4"
        );
        assert_eq!(
            ReencryptError::from(LeaseError::KeptChanging).to_string(),
            "the Lease kept changing"
        );
        assert_eq!(
            NotLeader::from(LeaseLost::Deleted).to_string(),
            "the Lease was deleted"
        );
        let fields = SecretValue::Fields(std::collections::BTreeMap::new());
        assert_eq!(
            key_of(&fields).err().map(|e| e.to_string()).as_deref(),
            Some("the secret is not an encryption key")
        );
    }

    #[test]
    fn lock_keys_differ_per_secret() {
        assert_ne!(super::lock_key("a"), super::lock_key("b"));
        assert_eq!(super::lock_key("a"), super::lock_key("a"));
    }
}
