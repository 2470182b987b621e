//! End to end: `rekey reencrypt`, the drop-in for the runbook's script,
//! against the platform's two tables on a fresh Postgres database.

use rekey_keyring::{MasterKey, hyvve};
use rekey_testkit::*;
use serde_json::Value;
use sqlx::Row;

const OLD: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
const NEW: &str = "ZGVmZ2hpamtsbW5vcHFyc3R1dnd4eXp7fH1+f4CBgoM=";
const OTHER: &str = "7u7u7u7u7u7u7u7u7u7u7u7u7u7u7u7u7u7u7u7u7u4=";

fn reencrypt(db: &PgDb, env: &[(&str, &str)], args: &[&str]) -> std::process::Output {
    let mut cmd = std::process::Command::new(CLI.path());
    cmd.arg("-o").arg("json").arg("reencrypt").args(args);
    cmd.env_remove("ENCRYPTION_MASTER_KEY_OLD")
        .env_remove("ENCRYPTION_MASTER_KEY_NEW")
        .env("DATABASE_URL", &db.url);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

fn keys() -> [(&'static str, &'static str); 2] {
    [
        ("ENCRYPTION_MASTER_KEY_OLD", OLD),
        ("ENCRYPTION_MASTER_KEY_NEW", NEW),
    ]
}

async fn seed(db: &PgDb) -> sqlx::PgPool {
    let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
    sqlx::raw_sql(HYVVE_TABLES).execute(&pool).await.unwrap();
    let old = MasterKey::from_base64(OLD).unwrap();
    let new = MasterKey::from_base64(NEW).unwrap();
    for i in 0..24 {
        let id = format!("00000000-0000-0000-0000-{i:012}");
        // A few rows are already under the new key (a re-run, or a pod
        // that already writes with it).
        let key = if i % 8 == 0 { &new } else { &old };
        let env = hyvve::seal(key, format!("sk-provider-{i}").as_bytes()).unwrap();
        sqlx::query("INSERT INTO ai_provider_configs VALUES ($1, $2)")
            .bind(&id)
            .bind(env)
            .execute(&pool)
            .await
            .unwrap();
        let mcp = (i % 3 != 0).then(|| hyvve::seal(&old, format!("mcp-{i}").as_bytes()).unwrap());
        sqlx::query("INSERT INTO mcp_server_configs VALUES ($1, $2)")
            .bind(&id)
            .bind(mcp)
            .execute(&pool)
            .await
            .unwrap();
    }
    pool
}

async fn all(pool: &sqlx::PgPool, table: &str) -> Vec<(String, Option<String>)> {
    sqlx::query(&format!(
        "SELECT id, api_key_encrypted FROM {table} ORDER BY id"
    ))
    .fetch_all(pool)
    .await
    .unwrap()
    .into_iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reencrypt_the_platform_columns_dry_run_then_for_real_then_again() {
    let db = PgDb::create("reenc").await;
    let pool = seed(&db).await;
    let before = all(&pool, "ai_provider_configs").await;

    let o = reencrypt(
        &db,
        &keys(),
        &["--preset", "hyvve", "--dry-run", "--batch-size", "5"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let j: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        j,
        serde_json::json!({"dry_run": true, "columns": [
            {"table": "ai_provider_configs", "column": "api_key_encrypted", "scanned": 24, "rotated": 21, "already_new": 3, "null": 0},
            {"table": "mcp_server_configs", "column": "api_key_encrypted", "scanned": 24, "rotated": 16, "already_new": 0, "null": 8},
        ]})
    );
    assert_eq!(
        all(&pool, "ai_provider_configs").await,
        before,
        "a dry run writes nothing"
    );

    let o = reencrypt(&db, &keys(), &["--preset", "hyvve", "--batch-size", "5"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let j: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(j["dry_run"], false);
    assert_eq!(j["columns"][0]["rotated"], 21);
    assert_eq!(j["columns"][1]["rotated"], 16);
    let (old, new) = (
        MasterKey::from_base64(OLD).unwrap(),
        MasterKey::from_base64(NEW).unwrap(),
    );
    for (table, prefix) in [
        ("ai_provider_configs", "sk-provider-"),
        ("mcp_server_configs", "mcp-"),
    ] {
        for (id, v) in all(&pool, table).await {
            let Some(v) = v else { continue };
            let i: u32 = id.rsplit('-').next().unwrap().parse().unwrap();
            assert_eq!(
                hyvve::open(&new, &v).unwrap().expose(),
                format!("{prefix}{i}").as_bytes()
            );
            assert!(hyvve::open(&old, &v).is_err(), "the old key opens nothing");
        }
    }
    // Each batch of 5 was sealed under one fresh salt (one derivation),
    // each row with its own IV; an independent implementation of the
    // platform's decrypt (Python's cryptography) opens every row.
    let rows: Vec<(String, String)> = all(&pool, "mcp_server_configs")
        .await
        .into_iter()
        .filter_map(|(id, v)| Some((id, v?)))
        .collect();
    let salts = salts_and_ivs(rows.iter().map(|(_, v)| v.as_str()));
    let distinct = |v: Vec<Vec<u8>>| {
        v.into_iter()
            .collect::<std::collections::BTreeSet<_>>()
            .len()
    };
    assert!(
        distinct(salts.0.clone()) <= 16usize.div_ceil(5) + 1,
        "about one salt per batch: {}",
        distinct(salts.0)
    );
    assert_eq!(distinct(salts.1), rows.len(), "a fresh IV per row");
    let envelopes: Vec<String> = rows.iter().map(|(_, v)| v.clone()).collect();
    let opened = hyvve_open_in_python(NEW, &envelopes);
    for ((id, _), plain) in rows.iter().zip(opened) {
        let i: u32 = id.rsplit('-').next().unwrap().parse().unwrap();
        assert_eq!(plain, Some(format!("mcp-{i}")), "row {id}");
    }
    assert!(
        hyvve_open_in_python(OLD, &envelopes)
            .iter()
            .all(Option::is_none)
    );

    // Again: nothing left to do.
    let o = reencrypt(&db, &keys(), &["--preset", "hyvve"]);
    let j: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(j["columns"][0]["rotated"], 0);
    assert_eq!(j["columns"][0]["already_new"], 24);

    // Human output: one row per column.
    let mut cmd = std::process::Command::new(CLI.path());
    let o = cmd
        .args([
            "reencrypt",
            "--preset",
            "hyvve",
            "--dry-run",
            "--database-url",
            &db.url,
        ])
        .env("ENCRYPTION_MASTER_KEY_OLD", OLD)
        .env("ENCRYPTION_MASTER_KEY_NEW", NEW)
        .output()
        .unwrap();
    assert!(stdout(&o).contains("ai_provider_configs"), "{}", stdout(&o));
    assert!(stdout(&o).contains("dry run: nothing was written"));
}

/// The salts and the IVs of HYVVE envelopes.
fn salts_and_ivs<'a>(envelopes: impl Iterator<Item = &'a str>) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
    envelopes
        .map(|e| {
            let raw = hyvve::parse(e).unwrap();
            (raw[..64].to_vec(), raw[64..80].to_vec())
        })
        .unzip()
}

/// A run stopped part way (here by a row under neither key) leaves a
/// checkpoint: the next run of the same keys resumes after the last batch
/// written, and a finished run leaves none behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_run_resumes_after_its_last_batch() {
    let db = PgDb::create("reencresume").await;
    let pool = seed(&db).await;
    // Row 12 is under a third key: batches of 5 stop at rows 10..=14.
    let bad = "00000000-0000-0000-0000-000000000012";
    let other = MasterKey::from_base64(OTHER).unwrap();
    sqlx::query("UPDATE ai_provider_configs SET api_key_encrypted = $1 WHERE id = $2")
        .bind(hyvve::seal(&other, b"sk-provider-12").unwrap())
        .bind(bad)
        .execute(&pool)
        .await
        .unwrap();
    let o = reencrypt(&db, &keys(), &["--preset", "hyvve", "--batch-size", "5"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains(bad), "{}", stderr(&o));
    // The row is put right; the run goes on from the checkpoint.
    let old = MasterKey::from_base64(OLD).unwrap();
    sqlx::query("UPDATE ai_provider_configs SET api_key_encrypted = $1 WHERE id = $2")
        .bind(hyvve::seal(&old, b"sk-provider-12").unwrap())
        .bind(bad)
        .execute(&pool)
        .await
        .unwrap();
    let o = reencrypt(&db, &keys(), &["--preset", "hyvve", "--batch-size", "5"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("ai_provider_configs.api_key_encrypted: an earlier run of these keys stopped; resuming after id 00000000-0000-0000-0000-000000000009"),
        "{}",
        stderr(&o)
    );
    let j: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(j["columns"][0]["scanned"], 14, "rows 10..=23 only: {j}");
    assert_eq!(j["columns"][1]["scanned"], 24, "{j}");
    let new = MasterKey::from_base64(NEW).unwrap();
    for (id, v) in all(&pool, "ai_provider_configs").await {
        assert!(hyvve::open(&new, &v.unwrap()).is_ok(), "row {id}");
    }
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM rekey_reencrypt_checkpoints")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(left, 0, "a finished run leaves no checkpoint");
    // Run again: from the first row, everything already new.
    let o = reencrypt(&db, &keys(), &["--preset", "hyvve"]);
    let j: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(j["columns"][0]["already_new"], 24, "{j}");
}

/// `--salt per-row` keeps the platform's own shape: every row its own salt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reencrypt_with_a_salt_per_row() {
    let db = PgDb::create("reencrow").await;
    let pool = seed(&db).await;
    let o = reencrypt(
        &db,
        &keys(),
        &[
            "--preset",
            "hyvve",
            "--batch-size",
            "5",
            "--salt",
            "per-row",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let rows: Vec<String> = all(&pool, "mcp_server_configs")
        .await
        .into_iter()
        .filter_map(|(_, v)| v)
        .collect();
    let (salts, _) = salts_and_ivs(rows.iter().map(String::as_str));
    let n = salts
        .iter()
        .collect::<std::collections::BTreeSet<_>>()
        .len();
    assert_eq!(n, rows.len(), "a salt per row");
    assert!(hyvve_open_in_python(NEW, &rows).iter().all(Option::is_some));
    let o = reencrypt(&db, &keys(), &["--preset", "hyvve", "--salt", "sometimes"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("per-batch"), "{}", stderr(&o));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_stops_with_a_clear_error_and_changes_nothing() {
    let db = PgDb::create("reencbad").await;
    let pool = seed(&db).await;
    // A row under a third key.
    let stranger = hyvve::seal(&MasterKey::from_base64(OTHER).unwrap(), b"x").unwrap();
    sqlx::query("UPDATE ai_provider_configs SET api_key_encrypted = $1 WHERE id = '00000000-0000-0000-0000-000000000013'")
        .bind(&stranger)
        .execute(&pool)
        .await
        .unwrap();
    let o = reencrypt(&db, &keys(), &["--preset", "hyvve", "--batch-size", "50"]);
    assert_eq!(o.status.code(), Some(1), "a row the database holds");
    let e = stderr(&o);
    assert!(
        e.contains("row 00000000-0000-0000-0000-000000000013 of ai_provider_configs.api_key_encrypted decrypts under neither"),
        "{e}"
    );
    // Every other row still opens with one of the keys.
    let (old, new) = (
        MasterKey::from_base64(OLD).unwrap(),
        MasterKey::from_base64(NEW).unwrap(),
    );
    for (id, v) in all(&pool, "ai_provider_configs").await {
        let v = v.unwrap();
        if v == stranger {
            continue;
        }
        assert!(
            hyvve::open(&old, &v).is_ok() || hyvve::open(&new, &v).is_ok(),
            "{id}"
        );
    }

    let same = [
        ("ENCRYPTION_MASTER_KEY_OLD", OLD),
        ("ENCRYPTION_MASTER_KEY_NEW", OLD),
    ];
    let o = reencrypt(&db, &same, &["--preset", "hyvve"]);
    assert_eq!(o.status.code(), Some(2), "the keys given are wrong");
    assert!(
        stderr(&o).contains("the old and new keys are identical"),
        "{}",
        stderr(&o)
    );
    let short = [
        ("ENCRYPTION_MASTER_KEY_OLD", "c2hvcnQ="),
        ("ENCRYPTION_MASTER_KEY_NEW", NEW),
    ];
    let o = reencrypt(&db, &short, &["--preset", "hyvve"]);
    assert_eq!(o.status.code(), Some(2), "the key given is wrong");
    assert!(
        stderr(&o).contains("ENCRYPTION_MASTER_KEY_OLD: a key must be base64 of exactly 32 bytes"),
        "{}",
        stderr(&o)
    );
    assert!(!stderr(&o).contains("c2hvcnQ"));
    let o = reencrypt(&db, &keys(), &["--column", "no_such_table.secret"]);
    assert_eq!(o.status.code(), Some(1), "the database says so");
    assert!(
        stderr(&o).contains("table no_such_table does not exist"),
        "{}",
        stderr(&o)
    );
    let o = reencrypt(&db, &keys(), &["--column", "ai_provider_configs.nope"]);
    assert!(
        stderr(&o).contains("column ai_provider_configs.nope does not exist"),
        "{}",
        stderr(&o)
    );
    sqlx::raw_sql("CREATE TABLE notes (id int PRIMARY KEY, body text); INSERT INTO notes VALUES (7, 'plain words here')")
        .execute(&pool)
        .await
        .unwrap();
    let o = reencrypt(&db, &keys(), &["--column", "notes.body"]);
    assert!(
        stderr(&o).contains("row 7 of notes.body holds something other than a hyvve envelope"),
        "{}",
        stderr(&o)
    );
    let o = reencrypt(
        &db,
        &keys(),
        &[
            "--preset",
            "hyvve",
            "--database-url",
            "postgres://postgres@127.0.0.1:1/x",
        ],
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("cannot connect to the database"),
        "{}",
        stderr(&o)
    );

    // A read-only role: the dry run works, the real run changes nothing.
    let ro = format!("rekey_ro_{}", std::process::id());
    sqlx::raw_sql(&format!(
        "DROP ROLE IF EXISTS {ro}; CREATE ROLE {ro} LOGIN; GRANT SELECT ON ALL TABLES IN SCHEMA public TO {ro}"
    ))
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query("UPDATE ai_provider_configs SET api_key_encrypted = $1 WHERE id = '00000000-0000-0000-0000-000000000013'")
        .bind(hyvve::seal(&old, b"back").unwrap())
        .execute(&pool)
        .await
        .unwrap();
    let ro_url = db.url.replacen("postgres@", &format!("{ro}@"), 1);
    let before = all(&pool, "ai_provider_configs").await;
    let o = reencrypt(
        &db,
        &keys(),
        &["--preset", "hyvve", "--dry-run", "--database-url", &ro_url],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let o = reencrypt(
        &db,
        &keys(),
        &["--preset", "hyvve", "--database-url", &ro_url],
    );
    assert!(!o.status.success());
    assert!(stderr(&o).contains("permission denied"), "{}", stderr(&o));
    assert_eq!(all(&pool, "ai_provider_configs").await, before);
    pool.close().await;
    let admin = sqlx::PgPool::connect(&db.url).await.unwrap();
    let _ = sqlx::raw_sql(&format!(
        "REASSIGN OWNED BY {ro} TO postgres; DROP OWNED BY {ro}; DROP ROLE {ro}"
    ))
    .execute(&admin)
    .await;
}

/// The row the test holds locked, so that the run waits in the batch that
/// holds it; and that batch's ids (batch size 250).
const LOCKED: i64 = 1600;
const WAITING_BATCH: std::ops::Range<i64> = 1500..1750;

/// An app rewrites rows while the command runs, and the test proves the two
/// overlapped: it holds one row locked, so the run certainly waits in the
/// middle of the table while the app writes. Rows the run had passed keep
/// the app's old-key value (the final sweep moves them); rows it had not
/// reached yet are re-encrypted with the app's value. Nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rekey_codec_with_integer_ids_and_a_concurrent_writer() {
    use std::sync::Arc;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};

    let db = PgDb::create("reencrk").await;
    let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
    sqlx::raw_sql("CREATE TABLE tokens (id bigint PRIMARY KEY, secret text)")
        .execute(&pool)
        .await
        .unwrap();
    let codec = rekey_reencrypt::Codec::Rekey;
    let (old, new) = (
        MasterKey::from_base64(OLD).unwrap(),
        MasterKey::from_base64(NEW).unwrap(),
    );
    for i in 0..3000i64 {
        sqlx::query("INSERT INTO tokens VALUES ($1, $2)")
            .bind(i)
            .bind(codec.seal(&old, format!("t{i}").as_bytes()).unwrap())
            .execute(&pool)
            .await
            .unwrap();
    }
    let mut lock = pool.begin().await.unwrap();
    sqlx::query("SELECT id FROM tokens WHERE id = $1 FOR UPDATE")
        .bind(LOCKED)
        .execute(&mut *lock)
        .await
        .unwrap();
    let holder: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut *lock)
        .await
        .unwrap();

    // The app: rewrites rows under the old key (a pod that has not moved
    // yet), each id once, skipping the batch the run waits in (its rows
    // are locked by the run's UPDATE). Each write is logged with whether
    // it was made while the run waited: phase 1 both before and after it
    // (the test sets phase 2 before it releases the lock).
    let phase = Arc::new(AtomicU8::new(0));
    let writes: Arc<Mutex<Vec<(i64, bool)>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (pool, phase, writes, stop) =
            (pool.clone(), phase.clone(), writes.clone(), stop.clone());
        let old = MasterKey::from_base64(OLD).unwrap();
        tokio::spawn(async move {
            for round in 0..3000i64 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let id = (round * 37) % 3000;
                if WAITING_BATCH.contains(&id) {
                    continue;
                }
                let v = rekey_reencrypt::Codec::Rekey
                    .seal(&old, format!("w{id}").as_bytes())
                    .unwrap();
                let before = phase.load(Ordering::SeqCst);
                sqlx::query("UPDATE tokens SET secret = $1 WHERE id = $2")
                    .bind(v)
                    .bind(id)
                    .execute(&pool)
                    .await
                    .unwrap();
                let during = before == 1 && phase.load(Ordering::SeqCst) == 1;
                writes.lock().unwrap().push((id, during));
                tokio::time::sleep(std::time::Duration::from_millis(2)).await;
            }
        })
    };
    let run = tokio::task::spawn_blocking({
        let url = db.url.clone();
        move || {
            std::process::Command::new(CLI.path())
                .args([
                    "-o",
                    "json",
                    "reencrypt",
                    "--column",
                    "tokens.secret",
                    "--codec",
                    "rekey",
                    "--batch-size",
                    "250",
                ])
                .env("DATABASE_URL", url)
                .env("ENCRYPTION_MASTER_KEY_OLD", OLD)
                .env("ENCRYPTION_MASTER_KEY_NEW", NEW)
                .output()
                .unwrap()
        }
    });
    // The run's UPDATE of the batch holding the locked row waits for it.
    eventually(
        std::time::Duration::from_secs(60),
        "the run to wait for the locked row",
        || {
            let pool = pool.clone();
            async move {
                let n: i64 = sqlx::query_scalar(
                    "SELECT count(*) FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))",
                )
                .bind(holder)
                .fetch_one(&pool)
                .await
                .ok()?;
                (n > 0).then_some(())
            }
        },
    )
    .await;
    phase.store(1, Ordering::SeqCst);
    // At least 30 writes while it waits, one of them in the next batch,
    // which the run has read ahead and will write with a compare-and-swap
    // that must fail for that row.
    let read_ahead = WAITING_BATCH.end..WAITING_BATCH.end + 250;
    eventually(
        std::time::Duration::from_secs(60),
        "30 writes while the run waits",
        || {
            let w = writes.lock().unwrap();
            let during: Vec<i64> = w.iter().filter(|(_, d)| *d).map(|(id, _)| *id).collect();
            let enough = during.len() >= 30 && during.iter().any(|id| read_ahead.contains(id));
            async move { enough.then_some(()) }
        },
    )
    .await;
    phase.store(2, Ordering::SeqCst);
    lock.rollback().await.unwrap();
    let o = run.await.unwrap();
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();
    let writes = writes.lock().unwrap().clone();
    let during: Vec<i64> = writes
        .iter()
        .filter(|(_, d)| *d)
        .map(|(id, _)| *id)
        .collect();
    assert!(o.status.success(), "{}", stderr(&o));
    let j: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(j["columns"][0]["scanned"], 3000);

    // What the app wrote while the run waited at row LOCKED: below that
    // batch the run had passed (the app's old-key value stays until the
    // sweep), above it the run had not arrived (the app's value was
    // re-encrypted).
    let value = |id: i64| {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, String>("SELECT secret FROM tokens WHERE id = $1")
                .bind(id)
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    let (passed, ahead): (Vec<i64>, Vec<i64>) = during
        .iter()
        .copied()
        .partition(|&id| id < WAITING_BATCH.start);
    assert!(
        !passed.is_empty() && !ahead.is_empty(),
        "writes on both sides of the run's position: {during:?}"
    );
    for id in passed {
        let p = codec.open(&old, &value(id).await).unwrap_or_else(|_| {
            panic!("row {id}, written after the run passed it, is under the old key")
        });
        assert_eq!(
            String::from_utf8_lossy(p.expose()),
            format!("w{id}"),
            "the app's write to row {id}"
        );
    }
    for id in ahead {
        let p = codec.open(&new, &value(id).await).unwrap_or_else(|_| {
            panic!("row {id}, written before the run reached it, is re-encrypted")
        });
        assert_eq!(
            String::from_utf8_lossy(p.expose()),
            format!("w{id}"),
            "the app's write to row {id}"
        );
    }

    // A second run (the final sweep) moves the rows written behind the
    // first. Nothing is lost: every row the app wrote holds the app's value,
    // every other row its original one, all under the new key.
    let app_wrote: std::collections::HashSet<i64> = writes.iter().map(|(id, _)| *id).collect();
    let o = reencrypt(
        &db,
        &keys(),
        &["--column", "tokens.secret", "--codec", "rekey"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    for r in sqlx::query("SELECT id, secret FROM tokens")
        .fetch_all(&pool)
        .await
        .unwrap()
    {
        let (id, v): (i64, String) = (r.get(0), r.get(1));
        let p = codec.open(&new, &v).unwrap();
        let text = String::from_utf8(p.expose().to_vec()).unwrap();
        let want = if app_wrote.contains(&id) { "w" } else { "t" };
        assert_eq!(text, format!("{want}{id}"));
        assert!(codec.open(&old, &v).is_err());
    }
}

/// `rekey reencrypt --secret ID` takes both keys from the backend and
/// reports completion there, so the old key is decommissioned without a
/// forced revoke.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reencrypt_with_keys_from_the_backend_lets_decommission_go_ahead() {
    let db = PgDb::create("reencsecret").await;
    let pool = seed(&db).await;
    let dir = TempDir::new("reenc-secret");
    let b = Backend::start(dir.path(), BackendOpts::default());
    let old_file = dir.path().join("old.key");
    let new_file = dir.path().join("new.key");
    std::fs::write(&old_file, OLD).unwrap();
    std::fs::write(&new_file, NEW).unwrap();
    b.cli_json(&[
        "create",
        "prod/enc/master",
        "--kind",
        "encryption-key",
        "--value-file",
        old_file.to_str().unwrap(),
        "--window",
        "0s",
    ]);
    b.cli_json(&[
        "rotate",
        "prod/enc/master",
        "--value-file",
        new_file.to_str().unwrap(),
    ]);
    let st = b.cli_json(&["status", "prod/enc/master"]);
    let blockers = st[0]["decommission_blockers"].to_string();
    assert!(
        blockers.contains("has not been reported finished"),
        "{blockers}"
    );

    let mut cmd = std::process::Command::new(CLI.path());
    cmd.args(["--addr", &b.grpc, "--token-file"])
        .arg(b.token_path())
        .args([
            "-o",
            "json",
            "reencrypt",
            "--secret",
            "prod/enc/master",
            "--preset",
            "hyvve",
        ])
        .env_remove("ENCRYPTION_MASTER_KEY_OLD")
        .env_remove("ENCRYPTION_MASTER_KEY_NEW")
        .env("DATABASE_URL", &db.url);
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let summary: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["columns"][0]["rotated"], 21);

    let new = MasterKey::from_base64(NEW).unwrap();
    for (_, v) in all(&pool, "ai_provider_configs").await {
        hyvve::open(&new, &v.unwrap()).expect("under the new key");
    }
    let st = eventually(
        std::time::Duration::from_secs(15),
        "v1 decommissioned",
        || async {
            let st = b.cli_json(&["status", "prod/enc/master"]);
            st[0]["previous_version"].is_null().then_some(st)
        },
    )
    .await;
    assert_eq!(st[0]["reencryption"]["finished"], true, "{st}");
    assert!(
        st[0]["reencryption"]["consumer_id"]
            .as_str()
            .unwrap()
            .starts_with("rekey-reencrypt@"),
        "{st}"
    );
    let audit = b.cli_json(&["audit", "--secret", "prod/enc/master"]);
    let actions: Vec<&str> = audit
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert!(
        actions.contains(&"reveal") && actions.contains(&"reencrypt"),
        "{actions:?}"
    );
}
