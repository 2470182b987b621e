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
    sqlx::raw_sql(
        "CREATE TABLE ai_provider_configs (id text PRIMARY KEY, api_key_encrypted text NOT NULL);
         CREATE TABLE mcp_server_configs (id text PRIMARY KEY, api_key_encrypted text);",
    )
    .execute(&pool)
    .await
    .unwrap();
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
    assert!(!o.status.success());
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
    assert!(
        stderr(&o).contains("ENCRYPTION_MASTER_KEY_OLD: a key must be base64 of exactly 32 bytes"),
        "{}",
        stderr(&o)
    );
    assert!(!stderr(&o).contains("c2hvcnQ"));
    let o = reencrypt(&db, &keys(), &["--column", "no_such_table.secret"]);
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rekey_codec_with_integer_ids_and_a_concurrent_writer() {
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
    // An app keeps rewriting rows (under the old key, like a pod that has
    // not moved yet) while the command runs.
    let writer = {
        let pool = pool.clone();
        let old = MasterKey::from_base64(OLD).unwrap();
        tokio::spawn(async move {
            for round in 0..200i64 {
                let id = (round * 37) % 3000;
                let v = rekey_reencrypt::Codec::Rekey
                    .seal(&old, format!("w{id}").as_bytes())
                    .unwrap();
                sqlx::query("UPDATE tokens SET secret = $1 WHERE id = $2")
                    .bind(v)
                    .bind(id)
                    .execute(&pool)
                    .await
                    .unwrap();
                tokio::time::sleep(std::time::Duration::from_millis(2)).await;
            }
        })
    };
    let o = reencrypt(
        &db,
        &keys(),
        &[
            "--column",
            "tokens.secret",
            "--codec",
            "rekey",
            "--batch-size",
            "250",
        ],
    );
    writer.await.unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let j: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(j["columns"][0]["scanned"], 3000);
    // The writer's rows written after their batch passed are still under
    // the old key; a second run (the final sweep) moves them; nothing is
    // lost either way.
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
        assert!(
            text == format!("t{id}") || text == format!("w{id}"),
            "{id}: {text}"
        );
        assert!(codec.open(&old, &v).is_err());
    }
}
