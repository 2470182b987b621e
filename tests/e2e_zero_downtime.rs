//! Zero downtime, proven: an app under load (a Postgres pool and a Redis
//! connection built from the credential files its sidecar writes, rebuilt
//! when a file changes) while rekey rotates both credentials twenty times.
//! The Postgres server takes only TLS, so the app's pool connects with the
//! TLS settings the credential's URL carries.
//! No query may fail; every rotation must converge and be decommissioned;
//! the app must have run queries with every one of the 21 credentials of
//! each kind (so it really moved from each old one to the new one); and
//! afterwards every old password must be refused. How many queries a second
//! the machine manages is not asserted here (it depends on the machine);
//! the benchmarks measure speed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rekey_testkit::*;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::Mutex;

const ROTATIONS: usize = 20;

/// A Redis connection for the app: AUTH, then commands, one reply line.
struct Redis(BufReader<tokio::net::TcpStream>);

impl Redis {
    async fn connect(addr: &str, user: &str, pass: &str) -> Result<Redis, String> {
        let s = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| e.to_string())?;
        let mut r = Redis(BufReader::new(s));
        let reply = r.cmd(&["AUTH", user, pass]).await?;
        if reply != "+OK" {
            return Err(format!("AUTH: {reply}"));
        }
        Ok(r)
    }

    async fn cmd(&mut self, args: &[&str]) -> Result<String, String> {
        let mut out = format!("*{}\r\n", args.len());
        for a in args {
            out.push_str(&format!("${}\r\n{a}\r\n", a.len()));
        }
        self.0
            .get_mut()
            .write_all(out.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut line = String::new();
        self.0
            .read_line(&mut line)
            .await
            .map_err(|e| e.to_string())?;
        Ok(line.trim_end().to_string())
    }
}

fn read_json(p: &Path) -> Option<Value> {
    serde_json::from_slice(&std::fs::read(p).ok()?).ok()
}

fn stamp(p: &Path) -> Option<(std::time::SystemTime, u64)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(p).ok()?;
    Some((m.modified().ok()?, m.ino()))
}

/// What the app used: successful queries per credential.
#[derive(Default)]
struct Seen {
    /// (user, password) -> queries that succeeded with it.
    pg: BTreeMap<(String, String), u64>,
    /// password -> Redis commands that succeeded with it.
    redis: BTreeMap<String, u64>,
}

struct App {
    ok: AtomicU64,
    failed: AtomicU64,
    errors: Mutex<Vec<String>>,
    stop: AtomicBool,
    seen: Mutex<Seen>,
}

async fn run_app(
    app: Arc<App>,
    db_file: PathBuf,
    redis_file: PathBuf,
    redis_addr: String,
    counter: String,
) {
    let mut db_stamp = None;
    let mut redis_stamp = None;
    // Each client with the credential it was built from.
    let mut pool: Option<(sqlx::PgPool, (String, String))> = None;
    let mut redis: Option<(Redis, String)> = None;
    let mut tick = tokio::time::interval(Duration::from_millis(2));
    let mut n = 0u64;
    while !app.stop.load(Ordering::Relaxed) {
        tick.tick().await;
        // A real app: when the credential file changes, build new clients
        // with it; the old ones keep serving until the new ones work.
        let s = stamp(&db_file);
        if s != db_stamp
            && let Some(j) = read_json(&db_file)
        {
            let url = j["url"].as_str().unwrap_or_default().to_string();
            let cred = (
                j["username"].as_str().unwrap_or_default().to_string(),
                j["password"].as_str().unwrap_or_default().to_string(),
            );
            match sqlx::postgres::PgPoolOptions::new()
                .max_connections(4)
                .connect(&url)
                .await
            {
                Ok(p) => {
                    if let Some((old, _)) = pool.replace((p, cred)) {
                        tokio::spawn(async move { old.close().await });
                    }
                    db_stamp = s;
                }
                Err(e) => app.errors.lock().await.push(format!("new pool: {e}")),
            }
        }
        let s = stamp(&redis_file);
        if s != redis_stamp
            && let Some(j) = read_json(&redis_file)
        {
            let (u, p) = (
                j["username"].as_str().unwrap_or_default(),
                j["password"].as_str().unwrap_or_default(),
            );
            match Redis::connect(&redis_addr, u, p).await {
                Ok(r) => {
                    redis = Some((r, p.to_string()));
                    redis_stamp = s;
                }
                Err(e) => app
                    .errors
                    .lock()
                    .await
                    .push(format!("new redis connection: {e}")),
            }
        }
        n += 1;
        let result = if n.is_multiple_of(2) {
            match &pool {
                Some((p, cred)) => {
                    match sqlx::query_scalar::<_, i64>("SELECT count(*) FROM items")
                        .fetch_one(p)
                        .await
                    {
                        Ok(_) => {
                            *app.seen.lock().await.pg.entry(cred.clone()).or_default() += 1;
                            Ok(())
                        }
                        Err(e) => Err(format!("postgres: {e}")),
                    }
                }
                None => continue,
            }
        } else {
            match &mut redis {
                Some((r, password)) => match r.cmd(&["INCR", &counter]).await {
                    Ok(l) if l.starts_with(':') => {
                        *app.seen
                            .lock()
                            .await
                            .redis
                            .entry(password.clone())
                            .or_default() += 1;
                        Ok(())
                    }
                    Ok(l) => Err(format!("redis: {l}")),
                    Err(e) => Err(format!("redis: {e}")),
                },
                None => continue,
            }
        };
        match result {
            Ok(()) => {
                app.ok.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                app.failed.fetch_add(1, Ordering::Relaxed);
                app.errors.lock().await.push(e);
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_under_load_sees_no_failed_query_across_twenty_rotations_of_each_credential() {
    let dir = TempDir::new("zero");
    // Postgres as managed services run it: TLS only (hostssl), and the
    // admin URL with sslmode=verify-full, which the credential's URL
    // carries to the app.
    let pki = dir.path().join("pki");
    std::fs::create_dir_all(&pki).unwrap();
    server_pki(&pki);
    let pg = PgServer::start_tls("zero", &pki);
    pg.sql("postgres", "CREATE ROLE app_owner NOLOGIN").await;
    pg.sql("postgres", "CREATE DATABASE appdb OWNER app_owner")
        .await;
    pg.sql(
        "appdb",
        "SET ROLE app_owner; CREATE TABLE items (id int); INSERT INTO items VALUES (1), (2)",
    )
    .await;
    let redis_user = format!("rk_zero_{}", std::process::id());
    let _cleanup = RedisUsers(vec![redis_user.clone()]);
    assert_eq!(
        redis_cli(&["ACL", "SETUSER", &redis_user, "on", "~rekey:*", "+@all"]),
        "OK"
    );
    let pg_admin = dir.path().join("pg-admin");
    std::fs::write(&pg_admin, pg.admin_url("appdb")).unwrap();
    let redis_admin = dir.path().join("redis-admin");
    std::fs::write(&redis_admin, "redis://127.0.0.1:6379").unwrap();

    let b = Backend::start(
        dir.path(),
        BackendOpts {
            extra_toml: "[scheduler]\ntick = \"100ms\"\n[consumers]\nttl = \"10s\"\n".into(),
            ..Default::default()
        },
    );
    b.cli_json(&[
        "create",
        "prod/app/database",
        "--kind",
        "postgres",
        "--admin-url-file",
        pg_admin.to_str().unwrap(),
        "--group-role",
        "app_owner",
        "--role-base",
        "app",
        "--database",
        "appdb",
        "--window",
        "1s",
    ]);
    b.cli_json(&[
        "create",
        "prod/app/redis",
        "--kind",
        "redis",
        "--admin-url-file",
        redis_admin.to_str().unwrap(),
        "--username",
        &redis_user,
        "--window",
        "1s",
    ]);
    let out = dir.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    let db_file = out.join("db.json");
    let redis_file = out.join("redis.json");
    let _sc = Sidecar::start(
        dir.path(),
        &[
            "--backend",
            &b.grpc,
            "--token-file",
            b.token_path().to_str().unwrap(),
            "--secret",
            &format!("prod/app/database:{}:json", db_file.display()),
            "--secret",
            &format!("prod/app/redis:{}:json", redis_file.display()),
            "--listen",
            "127.0.0.1:0",
        ],
        &[("REKEY_REPORT_INTERVAL", "2s")],
    );

    let app = Arc::new(App {
        ok: AtomicU64::new(0),
        failed: AtomicU64::new(0),
        errors: Mutex::new(vec![]),
        stop: AtomicBool::new(false),
        seen: Mutex::new(Seen::default()),
    });
    // A counter of its own: other test runs may share this Redis.
    let counter = format!("rekey:zero-downtime:{redis_user}");
    redis_cli(&["DEL", &counter]);
    let task = tokio::spawn(run_app(
        app.clone(),
        db_file.clone(),
        redis_file.clone(),
        "127.0.0.1:6379".into(),
        counter.clone(),
    ));
    tokio::time::sleep(Duration::from_millis(500)).await;

    let started = Instant::now();
    for round in 0..ROTATIONS {
        for id in ["prod/app/database", "prod/app/redis"] {
            // --wait: the previous credential is decommissioned (window
            // passed, the sidecar serves the new one) before the next
            // rotation touches the idle role or password.
            let o = b.cli(&["-o", "json", "rotate", id, "--wait"]);
            assert!(o.status.success(), "round {round} {id}: {}", stderr(&o));
        }
    }
    // Let the last decommissions happen under load too.
    for id in ["prod/app/database", "prod/app/redis"] {
        eventually(Duration::from_secs(20), "the last decommission", || {
            let st = b.cli_json(&["status", id]);
            async move { (st[0]["previous_version"] == Value::Null).then_some(()) }
        })
        .await;
    }
    let elapsed = started.elapsed();
    app.stop.store(true, Ordering::Relaxed);
    task.await.unwrap();

    let ok = app.ok.load(Ordering::Relaxed);
    let failed = app.failed.load(Ordering::Relaxed);
    let errors = app.errors.lock().await.clone();
    assert_eq!(failed, 0, "failed queries: {errors:?}");
    assert!(errors.is_empty(), "{errors:?}");
    let rate = ok as f64 / elapsed.as_secs_f64();

    // Every rotation converged and was decommissioned.
    for id in ["prod/app/database", "prod/app/redis"] {
        let versions = b.cli_json(&["versions", id]);
        let arr = versions.as_array().unwrap();
        assert_eq!(arr.len(), ROTATIONS + 1, "{id}: {versions}");
        assert_eq!(arr[0]["state"], "active");
        assert!(
            arr[1..].iter().all(|v| v["state"] == "revoked"),
            "{id}: {versions}"
        );
        let st = b.cli_json(&["status", id]);
        assert_eq!(st[0]["converged_consumers"], 1, "{id}: {st}");
        let audit = b.cli_json(&["audit", "--secret", id]);
        let decommissions = audit
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["action"] == "revoke" && e["outcome"] == "ok")
            .count();
        assert_eq!(decommissions, ROTATIONS, "{id}");
    }

    // Afterwards every old password is refused.
    let seen = app.seen.lock().await;
    let current_db = b.cli_json(&["get", "prod/app/database", "--reveal"])["value"].clone();
    let current_redis = b.cli_json(&["get", "prod/app/redis", "--reveal"])["value"].clone();
    let url = current_db["url"].as_str().unwrap();
    assert!(
        url.ends_with(&format!(
            "?sslmode=verify-full&sslrootcert={}",
            pki.join("ca.pem").display()
        )),
        "the app's pool verified the server: {url}"
    );
    // The app used every credential: v1 and each of the twenty new ones,
    // each for at least one successful query, so it moved from every old
    // credential to its successor without a failed query.
    assert_eq!(
        seen.pg.len(),
        ROTATIONS + 1,
        "Postgres credentials the app used: {:?}",
        seen.pg.values()
    );
    assert!(seen.pg.values().all(|&n| n > 0));
    assert_eq!(
        seen.redis.len(),
        ROTATIONS + 1,
        "Redis passwords the app used: {:?}",
        seen.redis.values()
    );
    assert!(seen.redis.values().all(|&n| n > 0));
    // Redis counted the same commands: they really ran, under those users.
    let incrs: u64 = seen.redis.values().sum();
    assert_eq!(redis_cli(&["GET", &counter]), incrs.to_string());
    for (user, pw) in seen.pg.keys() {
        if pw == current_db["password"].as_str().unwrap() {
            pg.login(user, pw, "appdb").await.unwrap();
        } else {
            assert!(
                pg.login(user, pw, "appdb").await.is_err(),
                "old password of {user} still works"
            );
        }
    }
    for pw in seen.redis.keys() {
        let who = redis_cli(&[
            "--user",
            &redis_user,
            "--pass",
            pw,
            "--no-auth-warning",
            "ACL",
            "WHOAMI",
        ]);
        if pw == current_redis["password"].as_str().unwrap() {
            assert_eq!(who, redis_user);
        } else {
            assert_ne!(who, redis_user, "an old Redis password still works");
        }
    }
    redis_cli(&["ACL", "DELUSER", &redis_user]);
    redis_cli(&["DEL", &counter]);
    eprintln!("{ok} queries in {elapsed:?} ({rate:.0}/s), 0 failed");
}
