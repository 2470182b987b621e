//! The audit log: who did what to which secret and version, with what
//! outcome. Never a value.
//!
//! Events are numbered without gaps and chained by a MAC: each event's MAC
//! (HMAC-SHA256 under a key derived from the key-encryption key) covers
//! its fields and the previous event's MAC. Somebody who can write the
//! database but does not hold the KEK can neither edit an event nor forge
//! a consistent chain after removing one. What a chain cannot show by
//! itself is its newest events deleted; for that the head (sequence number
//! and MAC) is published in every audit log line, in `/metrics` and by
//! `rekey audit --verify`, which also checks a head recorded elsewhere
//! (`--expect-head SEQ:MAC`); and a running backend reports a store whose
//! head falls behind the one it last saw.
//!
//! The meta rows that verification depends on (`audit_chain`,
//! `audit_legacy_through`, and the KEK's canary) carry a MAC under a key
//! derived from the KEK too, so the chain cannot be downgraded: a store
//! cannot be made to look as if it came from before the chain was keyed.
//! Stores that did carried plain SHA-256 hashes; the first start of this
//! release on them (the canary proves that they are from an earlier
//! release) re-chains them under the MAC when their old chain is intact.
//! A broken old chain is left as it is and keeps being reported.

use ring::digest;
use serde::Serialize;
use sqlx::Row;

use crate::error::{Error, Result};
use crate::store::{self, Canary, Conn, Dialect, Sealed, Store};

/// `prev_hash` of the first event.
pub(crate) const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Meta key: which chain the store's events carry.
const CHAIN_META: &str = "audit_chain";
/// The keyed chain.
const KEYED: &str = "hmac-sha256";
/// Meta key: the last event of an old SHA-256 chain that was broken when
/// the store moved to the keyed chain, and so was left unchanged.
const LEGACY_META: &str = "audit_legacy_through";
/// Serializes appends (and the migration) across replicas on Postgres.
const APPEND_LOCK: i64 = 7_700_770_077;

/// An event to append; the log assigns `seq`, `time_ms` and the MACs.
#[derive(Debug, Clone, Default)]
pub(crate) struct NewEvent {
    pub(crate) actor: String,
    pub(crate) action: String,
    pub(crate) secret_id: String,
    pub(crate) version: i64,
    pub(crate) outcome: String,
    pub(crate) request_id: String,
    /// Ids, reasons and error messages; never a value.
    pub(crate) detail: String,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub(crate) struct Event {
    pub(crate) seq: i64,
    pub(crate) time_ms: i64,
    pub(crate) actor: String,
    pub(crate) action: String,
    pub(crate) secret_id: String,
    pub(crate) version: i64,
    pub(crate) outcome: String,
    pub(crate) request_id: String,
    pub(crate) detail: String,
    pub(crate) prev_hash: String,
    pub(crate) hash: String,
}

/// The newest event of a chain: what to publish and later expect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Head {
    pub(crate) seq: i64,
    pub(crate) mac: String,
}

impl std::fmt::Display for Head {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.seq, self.mac)
    }
}

impl Event {
    /// The fields the chain covers, in a fixed order.
    fn canonical(&self) -> Vec<u8> {
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
        serde_json::to_vec(&Canon {
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
        .unwrap_or_default()
    }

    fn mac(&self, store: &Store) -> String {
        hex::encode(
            store
                .kek()
                .fingerprint(b"rekey.v1/audit-chain", &self.canonical()),
        )
    }

    /// The plain SHA-256 of stores from before the keyed chain.
    fn legacy_hash(&self) -> String {
        hex::encode(digest::digest(&digest::SHA256, &self.canonical()))
    }

    pub(crate) fn head(&self) -> Head {
        Head {
            seq: self.seq,
            mac: self.hash.clone(),
        }
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

async fn lock_appends(store: &Store, c: &mut Conn) -> Result<()> {
    if store.dialect() == Dialect::Postgres {
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(APPEND_LOCK)
            .execute(&mut *c)
            .await?;
    }
    Ok(())
}

/// The newest event's number and MAC; `None` for an empty log.
pub(crate) async fn head(c: &mut Conn) -> Result<Option<Head>> {
    let row = sqlx::query("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1")
        .fetch_optional(&mut *c)
        .await?;
    Ok(match row {
        Some(r) => Some(Head {
            seq: r.try_get(0)?,
            mac: r.try_get(1)?,
        }),
        None => None,
    })
}

/// Appends inside the caller's transaction, so a change and its event
/// commit together. On Postgres a transaction-scoped advisory lock orders
/// appends from several replicas.
pub(crate) async fn append_in(
    store: &Store,
    c: &mut Conn,
    ev: NewEvent,
    now_ms: i64,
) -> Result<Event> {
    lock_appends(store, c).await?;
    let (seq, prev_hash) = match head(c).await? {
        Some(h) => (h.seq + 1, h.mac),
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
    e.hash = e.mac(store);
    insert(c, &e).await?;
    Ok(e)
}

/// Writes one event as it is.
async fn insert(c: &mut Conn, e: &Event) -> Result<()> {
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
    Ok(())
}

/// Appends in a transaction of its own (for refusals and reveals, which
/// change nothing else). The caller logs the event.
pub(crate) async fn append(store: &Store, ev: NewEvent, now_ms: i64) -> Result<Event> {
    let mut tx = store.begin().await?;
    let e = append_in(store, &mut tx, ev, now_ms).await?;
    tx.commit().await?;
    Ok(e)
}

/// Writes an appended event to the log as one JSON line, with the chain's
/// head after it (`"head": "SEQ:MAC"`) for an outside copy.
pub(crate) fn log_event(e: &Event) {
    let mut line = serde_json::to_value(e).unwrap_or_default();
    line["head"] = serde_json::Value::String(e.head().to_string());
    tracing::info!(target: "rekey::audit", "{line}");
}

/// Up to `limit` events before `before_seq` (0: from the newest), newest
/// first; every secret's when `secret_id` is empty.
pub(crate) async fn list_newest(
    c: &mut Conn,
    secret_id: &str,
    before_seq: i64,
    limit: i64,
) -> Result<Vec<Event>> {
    let before = if before_seq > 0 { before_seq } else { i64::MAX };
    let rows = sqlx::query(&format!(
        "SELECT {COLS} FROM audit WHERE ($1 = '' OR secret_id = $1) AND seq < $2 ORDER BY seq DESC LIMIT $3"
    ))
    .bind(secret_id)
    .bind(before)
    .bind(limit)
    .fetch_all(c)
    .await?;
    rows.iter().map(from_row).collect()
}

/// Up to `limit` events after `after_seq`, oldest first; every secret's
/// when `secret_id` is empty.
pub(crate) async fn list(
    c: &mut Conn,
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

/// Brings the chain and the meta rows it depends on to this release, once,
/// under the append lock:
/// - a new store: `audit_chain` is written sealed (with its MAC);
/// - a store whose meta rows are sealed: nothing; verification checks them;
/// - a store from a release before meta rows were sealed (its canary,
///   which nobody can make without the KEK, says so): its meta rows are
///   sealed as they are, and a plain SHA-256 chain from before the chain
///   was keyed (no `audit_chain` row: no release before wrote one) is
///   re-chained under the MAC when intact; a broken one is left as evidence
///   and recorded in `audit_legacy_through`. Then the canary says
///   "sealed", so no later start re-keys anything. An `audit_chain` that
///   no release writes is left as it is, and verification reports it.
pub(crate) async fn migrate(store: &Store, canary: Canary) -> Result<()> {
    let mut tx = store.begin().await?;
    lock_appends(store, &mut tx).await?;
    match canary {
        Canary::Sealed => return Ok(()),
        Canary::Fresh => store.sealed_set(&mut tx, CHAIN_META, KEYED).await?,
        Canary::Legacy => {
            // Another replica may have moved it on while this one waited.
            if store.canary(&mut tx).await? != Some(Canary::Legacy) {
                return Ok(());
            }
            match store::meta_get(&mut tx, CHAIN_META).await?.as_deref() {
                Some(KEYED) => store.sealed_set(&mut tx, CHAIN_META, KEYED).await?,
                None => {
                    rekey_legacy_chain(store, &mut tx).await?;
                    store.sealed_set(&mut tx, CHAIN_META, KEYED).await?;
                }
                Some(other) => tracing::error!(
                    audit_chain = other,
                    "meta.audit_chain holds a value no release writes: the store was altered; the chain is not re-keyed, and `rekey audit --verify` reports it"
                ),
            }
            if let Some(n) = store::meta_get(&mut tx, LEGACY_META).await? {
                store.sealed_set(&mut tx, LEGACY_META, &n).await?;
            }
            store.write_canary(&mut tx).await?;
        }
    }
    tx.commit().await?;
    Ok(())
}

/// Re-chains a plain SHA-256 chain under the MAC when it is intact; else
/// records in `audit_legacy_through` where the old chain ends.
async fn rekey_legacy_chain(store: &Store, tx: &mut Conn) -> Result<()> {
    let events = all_events(tx).await?;
    if walk(&events, None, Event::legacy_hash).is_none() {
        let mut prev = GENESIS.to_string();
        for e in events {
            let mut e = Event {
                prev_hash: prev,
                ..e
            };
            e.hash = e.mac(store);
            sqlx::query("UPDATE audit SET prev_hash = $1, hash = $2 WHERE seq = $3")
                .bind(&e.prev_hash)
                .bind(&e.hash)
                .bind(e.seq)
                .execute(&mut *tx)
                .await?;
            prev = e.hash;
        }
    } else if let Some(last) = events.last() {
        tracing::error!(
            through = last.seq,
            "the audit log was altered before it was keyed; it stays as it is and `rekey audit --verify` reports where"
        );
        store
            .sealed_set(tx, LEGACY_META, &last.seq.to_string())
            .await?;
    }
    Ok(())
}

/// What is wrong with the meta rows the chain's verification depends on:
/// an `audit_chain` that is gone, forged or not the keyed chain, an
/// `audit_legacy_through` that is forged, or one that marks an intact
/// plain chain (it is written only for an old chain that was broken, so
/// an intact one there was rebuilt). Also the first event of that range
/// that the problem concerns (0 for the log as a whole), and where the old
/// chain ends for the walk.
async fn meta_problem(store: &Store, c: &mut Conn) -> Result<(Option<(i64, String)>, i64)> {
    let chain = match store.sealed_get(c, CHAIN_META).await? {
        Sealed::Valid(v) if v == KEYED => None,
        Sealed::Absent => Some("meta.audit_chain is gone: the store was altered".to_string()),
        Sealed::Valid(v) | Sealed::Forged(v) if v != KEYED => Some(format!(
            "meta.audit_chain says {v:?}, which no release writes: the store was altered"
        )),
        // The keyed chain's name, without its MAC.
        Sealed::Valid(_) | Sealed::Forged(_) => Some("meta.audit_chain was altered".to_string()),
    };
    if let Some(why) = chain {
        return Ok((Some((0, why)), 0));
    }
    let legacy_through = match store.sealed_get(c, LEGACY_META).await? {
        Sealed::Absent => 0,
        Sealed::Valid(n) => n.parse().unwrap_or(0),
        Sealed::Forged(_) => {
            return Ok((
                Some((0, "meta.audit_legacy_through was altered".to_string())),
                0,
            ));
        }
    };
    if legacy_through > 0 {
        let old = list(c, "", 0, legacy_through).await?;
        if walk(&old, None, Event::legacy_hash).is_none() {
            return Ok((
                Some((
                    1,
                    format!(
                        "events 1 to {legacy_through} are marked as an old chain that was broken, \
                         yet they form an intact plain SHA-256 chain: they were rebuilt"
                    ),
                )),
                legacy_through,
            ));
        }
    }
    Ok((None, legacy_through))
}

/// Whether the meta rows the chain depends on hold (cheap: for every
/// scheduler pass); the problem when they do not.
pub(crate) async fn check_meta(store: &Store, c: &mut Conn) -> Result<Option<String>> {
    Ok(meta_problem(store, c).await?.0.map(|(_, why)| why))
}

async fn all_events(c: &mut Conn) -> Result<Vec<Event>> {
    let mut out = Vec::new();
    loop {
        let after = out.last().map_or(0, |e: &Event| e.seq);
        let page = list(c, "", after, 1000).await?;
        if page.is_empty() {
            return Ok(out);
        }
        out.extend(page);
    }
}

/// The first event of `events` that does not fit a chain that continues
/// `after` (the event before them; `None` at the start of the log) under
/// `hash`, and why.
fn walk(
    events: &[Event],
    after: Option<&Event>,
    hash: impl Fn(&Event) -> String,
) -> Option<(i64, String)> {
    let mut prev = after.map_or(GENESIS, |e| e.hash.as_str());
    for (expected, e) in (after.map_or(1, |e| e.seq + 1)..).zip(events) {
        if e.seq != expected {
            return Some((
                expected,
                format!("event {expected} is missing (next is {})", e.seq),
            ));
        }
        if e.prev_hash != prev {
            return Some((
                e.seq,
                format!("event {} does not follow its predecessor", e.seq),
            ));
        }
        if !rekey_keyring::ct_eq(hash(e).as_bytes(), e.hash.as_bytes()) {
            return Some((e.seq, format!("event {} was altered", e.seq)));
        }
        prev = &e.hash;
    }
    None
}

/// The result of walking the chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Verification {
    pub(crate) checked: i64,
    /// The first event (by position) that does not fit, and why; seq 0
    /// when the problem is a head that is missing.
    pub(crate) first_bad: Option<(i64, String)>,
    /// The newest event.
    pub(crate) head: Option<Head>,
}

/// Walks the whole chain, then checks that `expected` (a head recorded
/// elsewhere, or the newest this backend has seen) is still in it.
pub(crate) async fn verify(
    store: &Store,
    c: &mut Conn,
    expected: &[(&str, Head)],
) -> Result<Verification> {
    let events = all_events(c).await?;
    let (meta, legacy_through) = meta_problem(store, c).await?;
    let split = events.partition_point(|e| e.seq <= legacy_through);
    let (old, keyed) = events.split_at(split);
    let first_bad = meta.or_else(|| {
        walk(old, None, Event::legacy_hash).or_else(|| walk(keyed, old.last(), |e| e.mac(store)))
    });
    let checked = match &first_bad {
        Some((seq, _)) => seq - 1,
        None => i64::try_from(events.len()).unwrap_or(i64::MAX),
    }
    .max(0);
    let head = events.last().map(Event::head);
    let first_bad = first_bad.or_else(|| {
        expected.iter().find_map(|(whose, want)| {
            missing_head(&events, want).map(|why| (0, format!("{why} ({whose})")))
        })
    });
    Ok(Verification {
        checked,
        first_bad,
        head,
    })
}

/// Why `want` is not in `events`, if it is not.
fn missing_head(events: &[Event], want: &Head) -> Option<String> {
    let newest = events.last().map_or(0, |e| e.seq);
    match events.iter().find(|e| e.seq == want.seq) {
        None => Some(format!(
            "event {} is gone: the log ends at event {newest}, so its newest events were removed",
            want.seq
        )),
        Some(e) if !rekey_keyring::ct_eq(e.hash.as_bytes(), want.mac.as_bytes()) => Some(format!(
            "event {} does not carry the MAC expected for it",
            want.seq
        )),
        Some(_) => None,
    }
}

/// Parses `SEQ:MAC` as published.
pub(crate) fn parse_head(seq: i64, mac: &str) -> Result<Head> {
    if seq <= 0 || mac.len() != 64 || !mac.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(Error::InvalidArgument(
            "an expected head is SEQ:MAC, as `rekey audit --verify` prints it".into(),
        ));
    }
    Ok(Head {
        seq,
        mac: mac.to_ascii_lowercase(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::tests_support::{store_in, tempdir};

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

    async fn check(s: &Store, expected: &[(&str, Head)]) -> Verification {
        let mut c = s.conn().await.unwrap();
        verify(s, &mut c, expected).await.unwrap()
    }

    #[tokio::test]
    async fn the_keyed_chain_detects_edits_deletions_and_a_lost_head() {
        let dir = tempdir();
        let s = store_in(&dir, 1).await;
        for a in ["create", "rotate", "rotate", "revoke"] {
            append(&s, ev(a), 10).await.unwrap();
        }
        let v = check(&s, &[]).await;
        assert_eq!((v.checked, v.first_bad.clone()), (4, None));
        let head = v.head.unwrap();
        assert_eq!(head.seq, 4);

        let mut c = s.conn().await.unwrap();
        // An edit whose plain SHA-256 is recomputed does not pass: the MAC
        // needs the KEK.
        let e2 = list(&mut c, "", 1, 1).await.unwrap().remove(0);
        let forged = Event {
            actor: "mallory".into(),
            ..e2.clone()
        };
        sqlx::query("UPDATE audit SET actor = 'mallory', hash = $1 WHERE seq = 2")
            .bind(forged.legacy_hash())
            .execute(&mut *c)
            .await
            .unwrap();
        drop(c);
        let v = check(&s, &[]).await;
        assert_eq!(v.first_bad.unwrap(), (2, "event 2 was altered".to_string()));
        let mut c = s.conn().await.unwrap();
        sqlx::query("UPDATE audit SET actor = $1, hash = $2 WHERE seq = 2")
            .bind(&e2.actor)
            .bind(&e2.hash)
            .execute(&mut *c)
            .await
            .unwrap();

        // Removing the newest event leaves a consistent chain: only a head
        // recorded elsewhere shows it.
        sqlx::query("DELETE FROM audit WHERE seq = 4")
            .execute(&mut *c)
            .await
            .unwrap();
        drop(c);
        let v = check(&s, &[]).await;
        assert_eq!((v.checked, v.first_bad), (3, None));
        let v = check(&s, &[("expected", head.clone())]).await;
        let (seq, why) = v.first_bad.unwrap();
        assert_eq!(seq, 0);
        assert!(
            why.contains("event 4 is gone") && why.ends_with("(expected)"),
            "{why}"
        );
        let wrong = Head {
            seq: 3,
            mac: "0".repeat(64),
        };
        let v = check(&s, &[("expected", wrong)]).await;
        assert!(v.first_bad.unwrap().1.contains("does not carry the MAC"));
    }

    /// Writes `n` events chained by plain SHA-256 as the releases before
    /// the keyed chain did (or as somebody without the KEK can).
    async fn plain_chain(c: &mut Conn, n: i64, actor: &str) {
        sqlx::query("DELETE FROM audit")
            .execute(&mut *c)
            .await
            .unwrap();
        let mut prev = GENESIS.to_string();
        for seq in 1..=n {
            let mut e = Event {
                seq,
                time_ms: 5,
                actor: actor.into(),
                action: "rotate".into(),
                secret_id: "s".into(),
                version: seq,
                outcome: "ok".into(),
                request_id: "r".into(),
                detail: String::new(),
                prev_hash: prev.clone(),
                hash: String::new(),
            };
            e.hash = e.legacy_hash();
            insert(c, &e).await.unwrap();
            prev = e.hash;
        }
    }

    /// A store as a release before sealed meta rows left it: the old
    /// canary, no MACs on meta rows.
    async fn as_an_earlier_release_left_it(s: &Store, c: &mut Conn) {
        s.write_legacy_canary(c).await.unwrap();
        sqlx::query("UPDATE meta SET mac = ''")
            .execute(&mut *c)
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn an_old_sha256_chain_is_rekeyed_when_intact_and_kept_as_evidence_when_not() {
        for tampered in [false, true] {
            let dir = tempdir();
            let s = store_in(&dir, 1).await;
            let mut c = s.conn().await.unwrap();
            // A store from before the chain was keyed: no audit_chain row.
            plain_chain(&mut c, 3, "admin").await;
            if tampered {
                sqlx::query("UPDATE audit SET actor = 'mallory' WHERE seq = 2")
                    .execute(&mut *c)
                    .await
                    .unwrap();
            }
            sqlx::query("DELETE FROM meta WHERE key = 'audit_chain'")
                .execute(&mut *c)
                .await
                .unwrap();
            as_an_earlier_release_left_it(&s, &mut c).await;
            drop(c);
            migrate(&s, Canary::Legacy).await.unwrap();
            append(&s, ev("rotate"), 6).await.unwrap();
            let v = check(&s, &[]).await;
            if tampered {
                assert_eq!(v.first_bad.unwrap(), (2, "event 2 was altered".to_string()));
            } else {
                assert_eq!((v.checked, v.first_bad), (4, None));
                // Now keyed: a recomputed SHA-256 no longer passes.
                let mut c = s.conn().await.unwrap();
                let e1 = list(&mut c, "", 0, 1).await.unwrap().remove(0);
                assert_ne!(e1.hash, e1.legacy_hash());
            }
            // And the canary says so: no later start re-keys anything.
            let mut c = s.conn().await.unwrap();
            assert_eq!(s.canary(&mut c).await.unwrap(), Some(Canary::Sealed));
        }
    }

    /// Somebody with write access to a stopped store and no KEK rebuilds
    /// the chain with plain SHA-256 (after editing an event), then tries
    /// to make it pass: as an old chain (audit_legacy_through at the
    /// newest event), or as one to re-key (audit_chain = 'sha256', or the
    /// row deleted). None of it passes, and nothing is re-keyed.
    #[tokio::test]
    async fn a_rebuilt_plain_chain_cannot_pass_for_an_old_one() {
        for attack in ["legacy-through", "chain-sha256", "chain-deleted"] {
            let dir = tempdir();
            let s = store_in(&dir, 1).await;
            for a in ["create", "rotate", "rotate"] {
                append(&s, ev(a), 10).await.unwrap();
            }
            let mut c = s.conn().await.unwrap();
            plain_chain(&mut c, 3, "mallory").await;
            let meta = match attack {
                "legacy-through" => {
                    "INSERT INTO meta (key, value) VALUES ('audit_legacy_through', '3')"
                }
                "chain-sha256" => "UPDATE meta SET value = 'sha256' WHERE key = 'audit_chain'",
                _ => "DELETE FROM meta WHERE key = 'audit_chain'",
            };
            sqlx::query(meta).execute(&mut *c).await.unwrap();
            drop(c);
            // The next start: the store's canary says its meta is sealed.
            let mut c = s.conn().await.unwrap();
            let canary = s.canary(&mut c).await.unwrap().unwrap();
            assert_eq!(canary, Canary::Sealed, "{attack}");
            drop(c);
            migrate(&s, canary).await.unwrap();
            let v = check(&s, &[]).await;
            let (_, why) = v
                .first_bad
                .unwrap_or_else(|| panic!("{attack}: the forgery passed"));
            let want = match attack {
                "legacy-through" => "meta.audit_legacy_through was altered",
                "chain-sha256" => "meta.audit_chain says \"sha256\", which no release writes",
                _ => "meta.audit_chain is gone",
            };
            assert!(why.contains(want), "{attack}: {why}");
            let mut c = s.conn().await.unwrap();
            let e1 = list(&mut c, "", 0, 1).await.unwrap().remove(0);
            assert_eq!(
                e1.hash,
                e1.legacy_hash(),
                "{attack}: nothing re-keyed the forgery"
            );
            assert!(check_meta(&s, &mut c).await.unwrap().is_some(), "{attack}");
        }
    }

    /// A store an earlier release left with a broken old chain: its
    /// audit_legacy_through is sealed as found; one set over an intact
    /// plain chain was set for a rebuilt one, and is reported.
    #[tokio::test]
    async fn a_legacy_range_over_an_intact_plain_chain_is_reported() {
        let dir = tempdir();
        let s = store_in(&dir, 1).await;
        let mut c = s.conn().await.unwrap();
        plain_chain(&mut c, 3, "mallory").await;
        store::meta_set(&mut c, LEGACY_META, "3").await.unwrap();
        as_an_earlier_release_left_it(&s, &mut c).await;
        drop(c);
        migrate(&s, Canary::Legacy).await.unwrap();
        let (seq, why) = check(&s, &[]).await.first_bad.unwrap();
        assert_eq!(seq, 1);
        assert!(why.contains("they were rebuilt"), "{why}");
    }

    #[tokio::test]
    async fn a_store_with_data_and_no_kek_check_is_refused() {
        let dir = tempdir();
        let s = store_in(&dir, 1).await;
        append(&s, ev("create"), 10).await.unwrap();
        let mut c = s.conn().await.unwrap();
        sqlx::query("DELETE FROM meta WHERE key = 'kek_check'")
            .execute(&mut *c)
            .await
            .unwrap();
        drop(c);
        s.close().await;
        let url = format!("sqlite://{}?mode=rwc", dir.join("t.db").display());
        let made_a_key = std::sync::atomic::AtomicBool::new(false);
        let e = Store::open(
            &url,
            1,
            std::sync::Arc::new(rekey_keyring::MasterKey::from_bytes(&[1; 32]).unwrap()),
            Some(|| {
                made_a_key.store(true, std::sync::atomic::Ordering::SeqCst);
                Ok(())
            }),
        )
        .await
        .err()
        .expect("refused");
        assert!(e.to_string().contains("meta.kek_check) is gone"), "{e}");
        assert!(
            !made_a_key.load(std::sync::atomic::Ordering::SeqCst),
            "no new key"
        );
    }
}
