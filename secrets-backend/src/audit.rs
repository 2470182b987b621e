//! The audit log: who did what to which secret and version, with what
//! outcome. Never a value.
//!
//! Events are numbered without gaps and hash-chained: each event's hash
//! covers its fields and the previous event's hash, so an edited event
//! breaks its own hash and a deleted one breaks the numbering and the chain.
//! Each event is also written to the log as one JSON line (target
//! `rekey::audit`).

use ring::digest;
use serde::Serialize;
use sqlx::{AnyConnection, Row};

use crate::error::Result;
use crate::store::{Dialect, Store};

pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// An event to append; the log assigns `seq`, `time_ms` and the hashes.
#[derive(Debug, Clone, Default)]
pub struct NewEvent {
    pub actor: String,
    pub action: String,
    pub secret_id: String,
    pub version: i64,
    pub outcome: String,
    pub request_id: String,
    /// Ids, reasons and error messages; never a value.
    pub detail: String,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Event {
    pub seq: i64,
    pub time_ms: i64,
    pub actor: String,
    pub action: String,
    pub secret_id: String,
    pub version: i64,
    pub outcome: String,
    pub request_id: String,
    pub detail: String,
    pub prev_hash: String,
    pub hash: String,
}

impl Event {
    fn compute_hash(&self) -> String {
        #[derive(Serialize)]
        struct Canon<'a> {
            seq: i64,
            time_ms: i64,
            actor: &'a str,
            action: &'a str,
            secret_id: &'a str,
            version: i64,
            outcome: &'a str,
            request_id: &'a str,
            detail: &'a str,
            prev_hash: &'a str,
        }
        let canon = serde_json::to_vec(&Canon {
            seq: self.seq,
            time_ms: self.time_ms,
            actor: &self.actor,
            action: &self.action,
            secret_id: &self.secret_id,
            version: self.version,
            outcome: &self.outcome,
            request_id: &self.request_id,
            detail: &self.detail,
            prev_hash: &self.prev_hash,
        })
        .unwrap_or_default();
        hex::encode(digest::digest(&digest::SHA256, &canon))
    }
}

const COLS: &str =
    "seq, time_ms, actor, action, secret_id, version, outcome, request_id, detail, prev_hash, hash";

fn from_row(r: &sqlx::any::AnyRow) -> Result<Event> {
    Ok(Event {
        seq: r.try_get(0)?,
        time_ms: r.try_get(1)?,
        actor: r.try_get(2)?,
        action: r.try_get(3)?,
        secret_id: r.try_get(4)?,
        version: r.try_get(5)?,
        outcome: r.try_get(6)?,
        request_id: r.try_get(7)?,
        detail: r.try_get(8)?,
        prev_hash: r.try_get(9)?,
        hash: r.try_get(10)?,
    })
}

/// Appends inside the caller's transaction, so a change and its event
/// commit together. On Postgres a transaction-scoped advisory lock orders
/// appends from several replicas.
pub async fn append_in(
    store: &Store,
    c: &mut AnyConnection,
    ev: NewEvent,
    now_ms: i64,
) -> Result<Event> {
    if store.dialect() == Dialect::Postgres {
        sqlx::query("SELECT pg_advisory_xact_lock(7700770077)")
            .execute(&mut *c)
            .await?;
    }
    let head = sqlx::query("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1")
        .fetch_optional(&mut *c)
        .await?;
    let (seq, prev_hash) = match head {
        Some(r) => (r.try_get::<i64, _>(0)? + 1, r.try_get::<String, _>(1)?),
        None => (1, GENESIS.to_string()),
    };
    let mut e = Event {
        seq,
        time_ms: now_ms,
        actor: ev.actor,
        action: ev.action,
        secret_id: ev.secret_id,
        version: ev.version,
        outcome: ev.outcome,
        request_id: ev.request_id,
        detail: ev.detail,
        prev_hash,
        hash: String::new(),
    };
    e.hash = e.compute_hash();
    sqlx::query(&format!(
        "INSERT INTO audit ({COLS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"
    ))
    .bind(e.seq)
    .bind(e.time_ms)
    .bind(&e.actor)
    .bind(&e.action)
    .bind(&e.secret_id)
    .bind(e.version)
    .bind(&e.outcome)
    .bind(&e.request_id)
    .bind(&e.detail)
    .bind(&e.prev_hash)
    .bind(&e.hash)
    .execute(&mut *c)
    .await?;
    Ok(e)
}

/// Writes an appended event to the log as one JSON line.
pub fn log_event(e: &Event) {
    let line = serde_json::to_string(e).unwrap_or_default();
    tracing::info!(target: "rekey::audit", "{line}");
}

/// Appends in a transaction of its own (for refusals and reveals, which
/// change nothing else).
pub async fn append(store: &Store, ev: NewEvent, now_ms: i64) -> Result<Event> {
    let mut tx = store.begin().await?;
    let e = append_in(store, &mut tx, ev, now_ms).await?;
    tx.commit().await?;
    log_event(&e);
    Ok(e)
}

pub async fn list(
    c: &mut AnyConnection,
    secret_id: &str,
    after_seq: i64,
    limit: i64,
) -> Result<Vec<Event>> {
    let rows = if secret_id.is_empty() {
        sqlx::query(&format!(
            "SELECT {COLS} FROM audit WHERE seq > $1 ORDER BY seq LIMIT $2"
        ))
        .bind(after_seq)
        .bind(limit)
        .fetch_all(c)
        .await?
    } else {
        sqlx::query(&format!(
            "SELECT {COLS} FROM audit WHERE secret_id = $1 AND seq > $2 ORDER BY seq LIMIT $3"
        ))
        .bind(secret_id)
        .bind(after_seq)
        .bind(limit)
        .fetch_all(c)
        .await?
    };
    rows.iter().map(from_row).collect()
}

/// The result of walking the chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verification {
    pub checked: i64,
    /// The first event (by position) that does not fit, and why.
    pub first_bad: Option<(i64, String)>,
}

pub async fn verify(c: &mut AnyConnection) -> Result<Verification> {
    let mut expected_seq = 1;
    let mut prev = GENESIS.to_string();
    let mut checked = 0;
    loop {
        let page = list(c, "", expected_seq - 1, 1000).await?;
        if page.is_empty() {
            return Ok(Verification {
                checked,
                first_bad: None,
            });
        }
        for e in page {
            if e.seq != expected_seq {
                return Ok(Verification {
                    checked,
                    first_bad: Some((
                        expected_seq,
                        format!("event {expected_seq} is missing (next is {})", e.seq),
                    )),
                });
            }
            if e.prev_hash != prev {
                return Ok(Verification {
                    checked,
                    first_bad: Some((
                        e.seq,
                        format!("event {} does not follow its predecessor", e.seq),
                    )),
                });
            }
            if e.compute_hash() != e.hash {
                return Ok(Verification {
                    checked,
                    first_bad: Some((e.seq, format!("event {} was altered", e.seq))),
                });
            }
            prev = e.hash.clone();
            expected_seq += 1;
            checked += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    async fn store() -> Store {
        let dir = crate::store::tests_support::tempdir();
        let url = format!("sqlite://{}?mode=rwc", dir.join("a.db").display());
        Store::open(
            &url,
            1,
            Arc::new(rekey_keyring::MasterKey::from_bytes(&[1; 32]).unwrap()),
        )
        .await
        .unwrap()
    }

    fn ev(action: &str) -> NewEvent {
        NewEvent {
            actor: "admin".into(),
            action: action.into(),
            secret_id: "s".into(),
            version: 1,
            outcome: "ok".into(),
            request_id: "r".into(),
            detail: String::new(),
        }
    }

    #[tokio::test]
    async fn chain_detects_edits_and_deletions() {
        let s = store().await;
        for a in ["create", "rotate", "rotate", "revoke"] {
            append(&s, ev(a), 10).await.unwrap();
        }
        let mut c = s.conn().await.unwrap();
        let v = verify(&mut c).await.unwrap();
        assert_eq!(
            v,
            Verification {
                checked: 4,
                first_bad: None
            }
        );

        sqlx::query("UPDATE audit SET actor = 'mallory' WHERE seq = 2")
            .execute(&mut *c)
            .await
            .unwrap();
        let v = verify(&mut c).await.unwrap();
        assert_eq!(v.first_bad.unwrap().0, 2);
        sqlx::query("UPDATE audit SET actor = 'admin' WHERE seq = 2")
            .execute(&mut *c)
            .await
            .unwrap();

        sqlx::query("DELETE FROM audit WHERE seq = 3")
            .execute(&mut *c)
            .await
            .unwrap();
        let v = verify(&mut c).await.unwrap();
        assert_eq!(v.checked, 2);
        let (seq, why) = v.first_bad.unwrap();
        assert_eq!(seq, 3);
        assert!(why.contains("missing"), "{why}");
    }
}
