//! End to end: the sidecars' leader-elected re-encryption after an
//! `encryption-key` rotation, with the real backend, real sidecars and the
//! machine's Postgres. The chaos test kills the leader with SIGKILL again
//! and again while an app keeps writing.

use std::path::Path;
use std::time::{Duration, Instant};

use rekey_keyring::MasterKey;
use rekey_reencrypt::Codec;
use rekey_testkit::*;
use serde_json::Value;
use sqlx::Row;

const SECRET: &str = "prod/enc/master";

fn key(b: &Backend, stage: &str) -> MasterKey {
    let v = b.cli_json(&["get", SECRET, "--stage", stage, "--reveal"]);
    MasterKey::from_base64(v["value"].as_str().unwrap()).unwrap()
}

async fn schema(pool: &sqlx::PgPool) {
    sqlx::raw_sql(
        "CREATE TABLE ai_provider_configs (id text PRIMARY KEY, api_key_encrypted text NOT NULL);
         CREATE TABLE tokens (id bigint PRIMARY KEY, secret text);",
    )
    .execute(pool)
    .await
    .unwrap();
}

async fn seed(pool: &sqlx::PgPool, k: &MasterKey, hyvve_rows: usize, rekey_rows: i64) {
    for i in 0..hyvve_rows {
        sqlx::query("INSERT INTO ai_provider_configs VALUES ($1, $2)")
            .bind(format!("00000000-0000-0000-0000-{i:012}"))
            .bind(Codec::Hyvve.seal(k, format!("h{i}").as_bytes()).unwrap())
            .execute(pool)
            .await
            .unwrap();
    }
    let mut q = String::from("INSERT INTO tokens VALUES ");
    for i in 0..rekey_rows {
        if i > 0 {
            q.push(',');
        }
        let v = Codec::Rekey.seal(k, format!("t{i}").as_bytes()).unwrap();
        q.push_str(&format!("({i}, '{v}')"));
    }
    sqlx::raw_sql(&q).execute(pool).await.unwrap();
}

/// A backend with an `encryption-key` secret at v1 and a database whose
/// two tables hold `hyvve_rows` and `rekey_rows` rows under that key.
/// Fields drop in order: the backend stops before the database goes.
struct Setup {
    b: Backend,
    pool: sqlx::PgPool,
    old: MasterKey,
    db_url_file: std::path::PathBuf,
    _db: PgDb,
    dir: TempDir,
}

async fn setup(tag: &str, hyvve_rows: usize, rekey_rows: i64) -> Setup {
    let dir = TempDir::new(tag);
    let db = PgDb::create(tag).await;
    let db_url_file = dir.path().join("db-url");
    std::fs::write(&db_url_file, &db.url).unwrap();
    let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
    schema(&pool).await;
    let b = Backend::start(
        dir.path(),
        BackendOpts {
            extra_toml: "[scheduler]\ntick = \"100ms\"\n[consumers]\nttl = \"3s\"\n".into(),
            ..Default::default()
        },
    );
    b.cli_json(&[
        "create",
        SECRET,
        "--kind",
        "encryption-key",
        "--window",
        "0s",
    ]);
    let old = key(&b, "current");
    seed(&pool, &old, hyvve_rows, rekey_rows).await;
    Setup {
        b,
        pool,
        old,
        db_url_file,
        _db: db,
        dir,
    }
}

fn start_sidecar(dir: &Path, n: usize, b: &Backend, db_url_file: &Path) -> Sidecar {
    start_sidecar_with(dir, n, b, db_url_file, "")
}

fn start_sidecar_with(
    dir: &Path,
    n: usize,
    b: &Backend,
    db_url_file: &Path,
    election: &str,
) -> Sidecar {
    let cfg = reencrypt_sidecar_config(
        dir,
        &format!("worker-{n}"),
        b,
        SECRET,
        db_url_file,
        &format!(
            r#"batch_size = 100
poll = "100ms"
columns = [
  {{ table = "ai_provider_configs", column = "api_key_encrypted" }},
  {{ table = "tokens", column = "secret", codec = "rekey" }},
]
{election}"#
        ),
    );
    Sidecar::start(dir, &["--config", cfg.to_str().unwrap()], &[])
}

/// Every row opens with `new` to its expected plaintext, `old` opens none.
async fn check_all(
    pool: &sqlx::PgPool,
    old: &MasterKey,
    new: &MasterKey,
    extra_ok: impl Fn(&str, &str) -> bool,
) {
    for (table, col, codec) in [
        ("ai_provider_configs", "api_key_encrypted", Codec::Hyvve),
        ("tokens", "secret", Codec::Rekey),
    ] {
        let rows = sqlx::query(&format!("SELECT id::text, {col} FROM {table}"))
            .fetch_all(pool)
            .await
            .unwrap();
        for r in rows {
            let (id, v): (String, Option<String>) = (r.get(0), r.get(1));
            let Some(v) = v else { continue };
            let p = codec
                .open(new, &v)
                .unwrap_or_else(|_| panic!("{table} row {id} does not open with the new key"));
            let text = String::from_utf8(p.expose().to_vec()).unwrap();
            let want = if table == "tokens" {
                format!("t{id}")
            } else {
                format!(
                    "h{}",
                    id.rsplit('-')
                        .next()
                        .unwrap()
                        .trim_start_matches('0')
                        .parse::<u64>()
                        .unwrap_or(0)
                )
            };
            assert!(
                text == want || extra_ok(&id, &text),
                "{table} row {id}: {text}"
            );
            assert!(
                codec.open(old, &v).is_err(),
                "{table} row {id} still opens with the old key"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_leader_moves_every_row_then_the_old_key_is_decommissioned() {
    // Bound in this order so that they drop in the reverse one.
    let Setup {
        dir,
        _db,
        db_url_file,
        old,
        pool,
        b,
    } = setup("retask", 30, 500).await;
    let sidecars: Vec<Sidecar> = (0..2)
        .map(|n| start_sidecar(dir.path(), n, &b, &db_url_file))
        .collect();

    b.cli_json(&["rotate", SECRET]);
    let new = key(&b, "current");
    // The old key must keep decrypting until the data has moved: no second
    // rotation until then.
    let o = b.cli(&["rotate", SECRET]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("not decommissioned yet"),
        "{}",
        stderr(&o)
    );

    let st = decommissioned(&b, 120).await;
    let r = &st[0]["reencryption"];
    assert_eq!(r["finished"], true, "{st}");
    assert_eq!(r["version"], 2);
    assert_eq!(r["rows_total"], 530);
    check_all(&pool, &old, &new, |_, _| false).await;
    let audit = b.cli_json(&["audit", "--secret", SECRET]);
    let actions: Vec<&str> = audit
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert!(actions.contains(&"reencrypt"), "{actions:?}");
    assert!(actions.contains(&"revoke"), "{actions:?}");
    // Exactly one sidecar did the work.
    let workers = sidecars
        .iter()
        .filter(|s| {
            s.get("/metrics")
                .1
                .lines()
                .any(|l| l.starts_with("rekey_sidecar_reencrypt_rows ") && !l.ends_with(" 0"))
        })
        .count();
    assert_eq!(workers, 1, "one leader");
    let o = b.cli(&["status", SECRET]);
    assert!(
        stdout(&o).contains("re-encryption to v2: 530 of 530 rows"),
        "{}",
        stdout(&o)
    );
    // Now the key may rotate again.
    b.cli_json(&["rotate", SECRET]);
}

/// Rows of `tokens` the chaos test holds locked, one per kill: the leader's
/// batch UPDATE (100 rows, ids aligned to hundreds) waits at each in turn.
const CHAOS_LOCKS: [i64; 5] = [350, 750, 1150, 1550, 1950];

/// Whether `id` is in a batch that waits for one of `CHAOS_LOCKS` (the app
/// leaves those rows alone, so that it never waits itself).
fn in_a_locked_batch(id: i64) -> bool {
    CHAOS_LOCKS.iter().any(|l| id / 100 == l / 100)
}

/// Kills the leader five times, each time in the middle of a batch: the
/// test holds a row of each of five batches locked, waits until the
/// leader's UPDATE of the next one waits for its lock (pg_stat_activity),
/// SIGKILLs the leader, starts a replacement and releases that lock. The
/// killed leader's statement may still commit once released: the writes
/// are compare-and-swap, so that is one more thing the run must survive.
/// However fast the machine, there are exactly five kills.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_the_leader_is_killed_again_and_again_while_an_app_writes() {
    // Bound in this order so that they drop in the reverse one.
    let Setup {
        dir,
        _db,
        db_url_file,
        old,
        pool,
        b,
    } = setup("chaos", 200, 2000).await;
    let mut locks = Vec::new();
    for id in CHAOS_LOCKS {
        let mut tx = pool.begin().await.unwrap();
        sqlx::query("SELECT id FROM tokens WHERE id = $1 FOR UPDATE")
            .bind(id)
            .execute(&mut *tx)
            .await
            .unwrap();
        let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
            .fetch_one(&mut *tx)
            .await
            .unwrap();
        locks.push((tx, pid));
    }
    let mut sidecars: Vec<Option<Sidecar>> = (0..3)
        .map(|n| Some(start_sidecar(dir.path(), n, &b, &db_url_file)))
        .collect();
    let mut next_n = 3;

    b.cli_json(&["rotate", SECRET]);
    let new = key(&b, "current");

    // The app: inserts and updates rows all along, under the key its pod
    // serves (the old one until its sidecar delivers the new one).
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (pool, stop) = (pool.clone(), stop.clone());
        let key_file = dir.path().join("worker-0.key");
        let (old_b64, new_b64) = (
            old.to_base64().expose().to_string(),
            new.to_base64().expose().to_string(),
        );
        tokio::spawn(async move {
            let mut i = 0i64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let served = std::fs::read_to_string(&key_file).unwrap_or_default();
                let k = MasterKey::from_base64(if served.trim() == new_b64 {
                    &new_b64
                } else {
                    &old_b64
                })
                .unwrap();
                // Insert a new row, and rewrite an existing one with the
                // same plaintext it had.
                let id = 100_000 + i;
                sqlx::query("INSERT INTO tokens VALUES ($1, $2)")
                    .bind(id)
                    .bind(Codec::Rekey.seal(&k, format!("t{id}").as_bytes()).unwrap())
                    .execute(&pool)
                    .await
                    .unwrap();
                let j = (i * 7919) % 2000;
                if !in_a_locked_batch(j) {
                    sqlx::query("UPDATE tokens SET secret = $1 WHERE id = $2")
                        .bind(Codec::Rekey.seal(&k, format!("t{j}").as_bytes()).unwrap())
                        .bind(j)
                        .execute(&pool)
                        .await
                        .unwrap();
                }
                i += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            i
        })
    };

    for (n, (tx, holder)) in locks.into_iter().enumerate() {
        eventually(
            Duration::from_secs(120),
            &format!("the leader's batch to wait for lock {}", n + 1),
            || {
                let pool = pool.clone();
                async move {
                    let waiting: i64 = sqlx::query_scalar(
                        "SELECT count(*) FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid)) AND query LIKE 'UPDATE \"tokens\"%'",
                    )
                    .bind(holder)
                    .fetch_one(&pool)
                    .await
                    .ok()?;
                    (waiting > 0).then_some(())
                }
            },
        )
        .await;
        // The waiting batch is the leader's.
        let i = eventually(Duration::from_secs(30), "the leader's gauge", || {
            let i = leader_of(&sidecars);
            async move { i }
        })
        .await;
        drop(sidecars[i].take()); // SIGKILL
        sidecars[i] = Some(start_sidecar(dir.path(), next_n, &b, &db_url_file));
        next_n += 1;
        tx.rollback().await.unwrap();
    }

    let st = decommissioned(&b, 180).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let written = writer.await.unwrap();
    assert!(written > 10, "the app kept writing: {written}");
    assert_eq!(st[0]["reencryption"]["finished"], true);
    // No row lost: the seeded ones and every insert are there.
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM tokens")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(n, 2000 + written);
    check_all(&pool, &old, &new, |_, _| false).await;
}

/// Waits until the old key is decommissioned; the secret's status.
async fn decommissioned(b: &Backend, secs: u64) -> Value {
    eventually(
        Duration::from_secs(secs),
        "re-encryption and decommission",
        || {
            let st = b.cli_json(&["status", SECRET]);
            async move { (st[0]["previous_version"] == Value::Null).then_some(st) }
        },
    )
    .await
}

/// Which of `sidecars` reports itself leader, if one does.
fn leader_of(sidecars: &[Option<Sidecar>]) -> Option<usize> {
    sidecars.iter().position(|s| {
        s.as_ref().is_some_and(|s| {
            s.get("/metrics")
                .1
                .lines()
                .any(|l| l == "rekey_sidecar_reencrypt_leader 1")
        })
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kubernetes_lease_elects_one_leader_and_hands_over() {
    // Bound in this order so that they drop in the reverse one.
    let Setup {
        dir,
        _db,
        db_url_file,
        old,
        pool,
        b,
    } = setup("lease", 200, 3000).await;
    let api = LeaseApiServer::start(dir.path());
    let election = api.election("name = \"reencrypt-master\"\nduration = \"2s\"\n");
    let first_token = std::fs::read_to_string(&api.token_file).unwrap();
    let mut sidecars: Vec<Option<Sidecar>> = (0..3)
        .map(|n| {
            Some(start_sidecar_with(
                dir.path(),
                n,
                &b,
                &db_url_file,
                &election,
            ))
        })
        .collect();

    b.cli_json(&["rotate", SECRET]);
    let new = key(&b, "current");

    let wait_leader = |sidecars: &[Option<Sidecar>]| {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(i) = leader_of(sidecars) {
                return i;
            }
            assert!(Instant::now() < deadline, "no leader within 60s");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let first = wait_leader(&sidecars);
    // kubelet rotates the projected token; from now on only the new one is
    // accepted, and the leader must keep renewing with it.
    let tmp = dir.path().join("sa-token.new");
    std::fs::write(&tmp, "sa-token-rotated").unwrap();
    std::fs::rename(&tmp, &api.token_file).unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(leader_of(&sidecars), Some(first), "kept the lease");

    // A clean stop hands the Lease over at once.
    let code = sidecars[first].take().unwrap().stop();
    assert_eq!(code, Some(0));
    let second = wait_leader(&sidecars);
    assert_ne!(second, first);
    tokio::time::sleep(Duration::from_millis(300)).await;
    // SIGKILL: the successor must wait until the Lease expires.
    drop(sidecars[second].take());
    let third = wait_leader(&sidecars);
    assert!(third != first && third != second);

    let st = decommissioned(&b, 180).await;
    assert_eq!(st[0]["reencryption"]["finished"], true, "{st}");
    check_all(&pool, &old, &new, |_, _| false).await;

    // The API server saw the candidates take turns by the Lease's rules.
    let h = api.history();
    // Each candidate is its consumer id plus a suffix of its own.
    let holder = |e: &Value| {
        let h = e["holder"].as_str().unwrap_or("");
        match h.rsplit_once('_') {
            Some((consumer, suffix)) => {
                assert!(
                    suffix.len() == 8 && suffix.chars().all(|c| c.is_ascii_hexdigit()),
                    "{h}"
                );
                consumer.to_string()
            }
            None => h.to_string(),
        }
    };
    let ids = [first, second, third].map(|i| format!("worker-{i}"));
    assert_eq!(holder(&h[0]), ids[0], "{h:?}");
    let released = h
        .iter()
        .position(|e| holder(e).is_empty())
        .expect("the stopped leader released the Lease");
    assert_eq!(holder(&h[released - 1]), ids[0]);
    assert_eq!(h[released]["duration"], 1);
    assert_eq!(holder(&h[released + 1]), ids[1]);
    let last_second = h.iter().rposition(|e| holder(e) == ids[1]).unwrap();
    let took_over = h.iter().position(|e| holder(e) == ids[2]).unwrap();
    assert_eq!(took_over, last_second + 1, "{h:?}");
    let waited = h[took_over]["t"].as_f64().unwrap() - h[last_second]["t"].as_f64().unwrap();
    assert!(
        waited >= 2.0 - 0.05,
        "took a live Lease after {waited:.2}s of its 2s"
    );
    assert!(h[took_over]["transitions"].as_u64().unwrap() >= 2);
    assert_eq!(holder(h.last().unwrap()), "", "released when finished");
    // Neither token reached a log.
    for f in std::fs::read_dir(dir.path()).unwrap() {
        let p = f.unwrap().path();
        if p.extension().is_some_and(|e| e == "log") {
            let log = std::fs::read_to_string(&p).unwrap();
            assert!(
                !log.contains(first_token.trim()) && !log.contains("sa-token-rotated"),
                "a token in {}",
                p.display()
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_the_sidecar_may_not_take_is_a_clear_error_and_changes_nothing() {
    // Bound in this order so that they drop in the reverse one.
    let Setup {
        dir,
        _db,
        db_url_file,
        old,
        pool,
        b,
    } = setup("leasedenied", 5, 20).await;
    let api = LeaseApiServer::start(dir.path());
    let wrong = dir.path().join("wrong-token");
    std::fs::write(&wrong, "not-the-service-account-token").unwrap();
    let election = api.election("").replace(
        &api.token_file.display().to_string(),
        &wrong.display().to_string(),
    );
    let s = start_sidecar_with(dir.path(), 0, &b, &db_url_file, &election);
    b.cli_json(&["rotate", SECRET]);
    let phase = eventually(Duration::from_secs(30), "the error in status", || {
        let st = b.cli_json(&["status", SECRET]);
        async move {
            let p = st[0]["reencryption"]["phase"].as_str()?.to_string();
            p.starts_with("error:").then_some(p)
        }
    })
    .await;
    assert!(phase.contains("HTTP 401"), "{phase}");
    assert!(phase.contains("service account token"), "{phase}");
    assert!(!s.log().contains("not-the-service-account-token"));
    // Nothing moved, and the old key stays until something does.
    check_all(&pool, &key(&b, "current"), &old, |_, _| false).await;
    assert_eq!(b.cli_json(&["status", SECRET])[0]["previous_version"], 1);
    assert!(api.history().is_empty());
}
