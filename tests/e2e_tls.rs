//! Postgres that takes connections only over TLS, as managed Postgres
//! does (RDS with `rds.force_ssl`, Azure): a private server with
//! `ssl = on`, a certificate from a CA the test makes, and `pg_hba.conf`
//! allowing `hostssl ... scram-sha-256` only (and `hostssl ... cert` for
//! one admin role). Every place rekey connects is tried against it: the
//! backend's own store, the `postgres` kind with a client-certificate
//! admin, the sidecar's validation, `rekey reencrypt` and the
//! re-encryption task; and a wrong CA, a wrong host name, `sslmode=disable`
//! and a server without TLS each fail with their own one-line message.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rekey_keyring::{MasterKey, hyvve};
use rekey_testkit::*;
use serde_json::Value;

/// A TLS-only server, the CA that signed its certificate, a client
/// certificate for `rekey_cert`, and a second CA of the same name that
/// signed nothing of it.
struct TlsPg {
    pg: PgServer,
    pki: PathBuf,
    other_ca: PathBuf,
    dir: TempDir,
}

impl TlsPg {
    fn start(tag: &str) -> TlsPg {
        let dir = TempDir::new(tag);
        let pki = dir.path().join("pki");
        std::fs::create_dir_all(&pki).unwrap();
        server_pki(&pki);
        issue_cert(
            &pki,
            "client",
            "/CN=rekey_cert",
            "extendedKeyUsage=clientAuth\n",
        );
        let other = dir.path().join("other");
        std::fs::create_dir_all(&other).unwrap();
        server_pki(&other);
        let pg = PgServer::start_tls(tag, &pki);
        TlsPg {
            pg,
            pki,
            other_ca: other.join("ca.pem"),
            dir,
        }
    }

    fn ca(&self) -> String {
        self.pki.join("ca.pem").display().to_string()
    }

    /// The superuser's URL with `query` for its TLS settings.
    fn url_with(&self, host: &str, db: &str, query: &str) -> String {
        format!(
            "postgres://postgres:{}@{host}:{}/{db}?{query}",
            self.pg.admin_password, self.pg.port
        )
    }

    fn write(&self, name: &str, text: &str) -> String {
        write_file(self.dir.path(), name, text)
            .display()
            .to_string()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_and_a_postgres_secret_work_over_verify_full_tls() {
    let t = TlsPg::start("tls-store");
    t.pg.sql("postgres", "CREATE DATABASE rekey").await;
    t.pg.app_database().await;
    // An admin that signs in with its client certificate (pg_hba: cert).
    t.pg.sql("postgres", "CREATE ROLE rekey_cert LOGIN SUPERUSER")
        .await;
    let b = Backend::start(
        t.dir.path(),
        BackendOpts {
            store_url: Some(t.pg.admin_url("rekey")),
            extra_toml: "[scheduler]\ntick = \"100ms\"\n[consumers]\nttl = \"10s\"\n".into(),
            ..Default::default()
        },
    );

    let admin = t.write(
        "pg-admin",
        &format!(
            "postgres://rekey_cert@127.0.0.1:{}/appdb?sslmode=verify-full&sslrootcert={}&sslcert={}&sslkey={}",
            t.pg.port,
            t.ca(),
            t.pki.join("client.pem").display(),
            t.pki.join("client.key").display()
        ),
    );
    b.cli_json(&[
        "create",
        "prod/api/database",
        "--kind",
        "postgres",
        "--admin-url-file",
        &admin,
        "--group-role",
        "app_owner",
        "--role-base",
        "app",
        "--database",
        "appdb",
        "--window",
        "1s",
    ]);
    let value = b.cli_json(&["get", "prod/api/database", "--reveal"])["value"].clone();
    assert_eq!(value["sslmode"], "verify-full", "{value}");
    assert_eq!(value["sslrootcert"], t.ca().as_str(), "{value}");
    let url = value["url"].as_str().unwrap();
    assert!(
        url.ends_with(&format!("?sslmode=verify-full&sslrootcert={}", t.ca())),
        "apps connect with the admin's TLS settings: {url}"
    );
    // An app that connects with the URL as it is verifies the server.
    let app = sqlx::PgPool::connect(url).await.unwrap();
    sqlx::query("SELECT 1").execute(&app).await.unwrap();
    app.close().await;

    // The sidecar validates every version over TLS before it serves it.
    let out = t.dir.path().join("db.json");
    let cfg = sidecar_config(
        t.dir.path(),
        "sidecar.toml",
        &b,
        "prod/api/database",
        &out,
        "format = \"json\"\nvalidate = { kind = \"postgres\" }",
    );
    let sc = Sidecar::start(
        t.dir.path(),
        &["--config", cfg.to_str().unwrap()],
        &[("REKEY_REPORT_SPREAD", "100ms")],
    );
    wait_for("the sidecar ready", Duration::from_secs(10), || {
        sc.get("/readyz").0 == 200
    });
    let mut creds = vec![(
        value["username"].as_str().unwrap().to_string(),
        value["password"].as_str().unwrap().to_string(),
    )];
    for _ in 0..2 {
        let o = b.cli(&["rotate", "prod/api/database", "--wait"]);
        assert!(o.status.success(), "{}", stderr(&o));
        let v = b.cli_json(&["get", "prod/api/database", "--reveal"])["value"].clone();
        creds.push((
            v["username"].as_str().unwrap().to_string(),
            v["password"].as_str().unwrap().to_string(),
        ));
    }
    wait_for("the sidecar serves v3", Duration::from_secs(10), || {
        std::fs::read_to_string(&out).is_ok_and(|s| s.contains(&creds[2].1))
    });
    wait_for("the last decommission", Duration::from_secs(20), || {
        b.cli_json(&["status", "prod/api/database"])[0]["previous_version"] == Value::Null
    });
    let (last, old) = creds.split_last().unwrap();
    t.pg.login(&last.0, &last.1, "appdb")
        .await
        .expect("current logs in over TLS");
    for (u, p) in old {
        assert!(
            t.pg.login(u, p, "appdb").await.is_err(),
            "{u} still logs in"
        );
    }
    for log in [b.all_logs(), sc.log()] {
        for (_, p) in &creds {
            assert!(!log.contains(p.as_str()), "a password in a log");
        }
    }
}

/// The platform's credential table under `key`, in a new database.
async fn platform_db(t: &TlsPg, db: &str, key: &MasterKey) -> sqlx::PgPool {
    t.pg.sql("postgres", &format!("CREATE DATABASE {db}")).await;
    let pool = sqlx::PgPool::connect(&t.pg.admin_url(db)).await.unwrap();
    sqlx::raw_sql(HYVVE_TABLES).execute(&pool).await.unwrap();
    for i in 0..20 {
        sqlx::query("INSERT INTO ai_provider_configs VALUES ($1, $2)")
            .bind(format!("00000000-0000-0000-0000-{i:012}"))
            .bind(hyvve::seal(key, format!("sk-{i}").as_bytes()).unwrap())
            .execute(&pool)
            .await
            .unwrap();
    }
    pool
}

/// Every row opens with `key`.
async fn all_under(pool: &sqlx::PgPool, key: &MasterKey) {
    let rows: Vec<String> = sqlx::query_scalar("SELECT api_key_encrypted FROM ai_provider_configs")
        .fetch_all(pool)
        .await
        .unwrap();
    assert_eq!(rows.len(), 20);
    for r in rows {
        hyvve::open(key, &r).expect("under the new key");
    }
}

fn key_of(b: &Backend, id: &str, stage: &str) -> MasterKey {
    let v = b.cli_json(&["get", id, "--stage", stage, "--reveal"]);
    MasterKey::from_base64(v["value"].as_str().unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reencrypt_and_the_reencryption_task_run_over_tls() {
    let t = TlsPg::start("tls-reenc");
    let b = Backend::start(
        t.dir.path(),
        BackendOpts {
            extra_toml: "[scheduler]\ntick = \"100ms\"\n[consumers]\nttl = \"3s\"\n".into(),
            ..Default::default()
        },
    );
    for id in ["prod/enc/cli", "prod/enc/task"] {
        b.cli_json(&["create", id, "--kind", "encryption-key", "--window", "0s"]);
    }

    // `rekey reencrypt` with the database URL the runbook passes.
    let cli_pool = platform_db(&t, "plat_cli", &key_of(&b, "prod/enc/cli", "current")).await;
    b.cli_json(&["rotate", "prod/enc/cli"]);
    let out = std::process::Command::new(CLI.path())
        .args(["--addr", &b.grpc, "--token-file"])
        .arg(b.token_path())
        .args([
            "-o",
            "json",
            "reencrypt",
            "--secret",
            "prod/enc/cli",
            "--preset",
            "hyvve",
        ])
        .env("DATABASE_URL", t.pg.admin_url("plat_cli"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    all_under(&cli_pool, &key_of(&b, "prod/enc/cli", "current")).await;

    // The leader-elected task, its database URL in a file.
    let task_pool = platform_db(&t, "plat_task", &key_of(&b, "prod/enc/task", "current")).await;
    let url_file = PathBuf::from(t.write("task-db-url", &t.pg.admin_url("plat_task")));
    let cfg = reencrypt_sidecar_config(
        t.dir.path(),
        "worker-0",
        &b,
        "prod/enc/task",
        &url_file,
        "batch_size = 5\npoll = \"100ms\"\npreset = \"hyvve\"\n",
    );
    let _sc = Sidecar::start(t.dir.path(), &["--config", cfg.to_str().unwrap()], &[]);
    b.cli_json(&["rotate", "prod/enc/task"]);
    let st = eventually(Duration::from_secs(30), "the task finished", || async {
        let st = b.cli_json(&["status", "prod/enc/task"]);
        (st[0]["reencryption"]["finished"] == true).then_some(st)
    })
    .await;
    assert_eq!(st[0]["reencryption"]["rows_done"], 20, "{st}");
    all_under(&task_pool, &key_of(&b, "prod/enc/task", "current")).await;
}

/// Starts the backend on `store_url`; it must stop with one `error:` line.
/// What it printed: that line and, for a setting that is checked before
/// start (a file the URL names), the list of problems under it.
fn refused_store(dir: &Path, store_url: &str) -> String {
    let cfg = dir.join(format!("refused-{}.toml", rand_tag()));
    std::fs::write(
        &cfg,
        format!(
            "listen = \"127.0.0.1:0\"\nmetrics_listen = \"off\"\ndata_dir = {:?}\n[store]\nurl = {store_url:?}\n",
            dir.join("refused-data").display().to_string()
        ),
    )
    .unwrap();
    let o = std::process::Command::new(BACKEND.path())
        .arg("--config")
        .arg(&cfg)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(!o.status.success(), "the backend started on {store_url}");
    assert!(stdout(&o).is_empty(), "it must not listen");
    let err = stderr(&o);
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(lines.len(), 1, "{err}");
    err.lines()
        .skip_while(|l| !l.starts_with("error:"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn rand_tag() -> String {
    format!(
        "{:x}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_ca_a_wrong_host_and_no_tls_each_say_which() {
    let t = TlsPg::start("tls-errors");
    let ca = t.ca();
    let other = t.other_ca.display().to_string();

    let e = refused_store(
        t.dir.path(),
        &t.url_with(
            "127.0.0.1",
            "postgres",
            &format!("sslmode=verify-full&sslrootcert={other}"),
        ),
    );
    assert!(
        e.contains(&format!(
            "the server's certificate is not signed by the CA file {other}"
        )),
        "{e}"
    );
    let e = refused_store(
        t.dir.path(),
        &t.url_with(
            "127.0.0.2",
            "postgres",
            &format!("sslmode=verify-full&sslrootcert={ca}"),
        ),
    );
    assert!(
        e.contains("the server's certificate is not valid for the host name 127.0.0.2 (it names localhost, 127.0.0.1)"),
        "{e}"
    );
    let e = refused_store(
        t.dir.path(),
        &t.url_with("127.0.0.1", "postgres", "sslmode=disable"),
    );
    assert!(
        e.contains(
            "the server takes this connection only over TLS, and sslmode=disable does not use it"
        ),
        "{e}"
    );
    // Each says it once: the cause is not repeated down a chain.
    assert_eq!(e.matches("no pg_hba.conf entry").count(), 1, "{e}");
    let plain = PgServer::start("tls-plain");
    let e = refused_store(
        t.dir.path(),
        &format!(
            "postgres://postgres:{}@127.0.0.1:{}/postgres?sslmode=require",
            plain.admin_password, plain.port
        ),
    );
    assert!(
        e.contains("the server does not offer TLS, and sslmode=require requires it"),
        "{e}"
    );
    let e = refused_store(
        t.dir.path(),
        &t.url_with(
            "127.0.0.1",
            "postgres",
            "sslmode=verify-full&sslrootcert=/nonexistent/ca.pem",
        ),
    );
    assert!(
        e.contains("sslrootcert /nonexistent/ca.pem: cannot read it"),
        "{e}"
    );

    // libpq's defaults and weaker modes still connect to a TLS-only
    // server: prefer (the default) and require encrypt without checking;
    // require with a CA file and verify-ca check the CA.
    t.pg.app_database().await;
    let b = Backend::start(t.dir.path(), BackendOpts::default());
    for (i, query) in [
        String::new(),
        "sslmode=require".to_string(),
        format!("sslmode=verify-ca&sslrootcert={ca}"),
    ]
    .iter()
    .enumerate()
    {
        let admin = t.write(
            &format!("admin-{i}"),
            &t.url_with("127.0.0.1", "appdb", query),
        );
        let id = format!("prod/db{i}");
        let o = b.cli(&[
            "create",
            &id,
            "--kind",
            "postgres",
            "--admin-url-file",
            &admin,
            "--group-role",
            "app_owner",
            "--role-base",
            &format!("app{i}"),
            "--database",
            "appdb",
        ]);
        assert!(o.status.success(), "{query:?}: {}", stderr(&o));
    }
    // require with a CA file verifies the CA, as libpq's does.
    let admin = t.write(
        "admin-wrong",
        &t.url_with(
            "127.0.0.1",
            "appdb",
            &format!("sslmode=require&sslrootcert={other}"),
        ),
    );
    let o = b.cli(&[
        "create",
        "prod/dbx",
        "--kind",
        "postgres",
        "--admin-url-file",
        &admin,
        "--group-role",
        "app_owner",
        "--role-base",
        "appx",
        "--database",
        "appdb",
    ]);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(e.contains("not signed by the CA file"), "{e}");
    assert!(!e.contains(&t.pg.admin_password), "{e}");

    // The sidecar's validation names the same causes.
    let disabled = t.write(
        "disabled-url",
        &format!(
            "postgres://postgres:{}@127.0.0.1:{}/appdb?sslmode=disable",
            t.pg.admin_password, t.pg.port
        ),
    );
    b.cli_json(&[
        "create",
        "prod/url",
        "--kind",
        "static",
        "--value-file",
        &disabled,
    ]);
    let cfg = sidecar_config(
        t.dir.path(),
        "validating.toml",
        &b,
        "prod/url",
        &t.dir.path().join("url"),
        "validate = { kind = \"postgres\" }",
    );
    let sc = Sidecar::start(t.dir.path(), &["--config", cfg.to_str().unwrap()], &[]);
    wait_for("the rejection", Duration::from_secs(10), || {
        sc.get("/readyz").1.contains("only over TLS")
    });
    assert!(!sc.get("/readyz").1.contains(&t.pg.admin_password));
}
