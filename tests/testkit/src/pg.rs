//! Postgres for the tests: a fresh database per test on the machine's
//! server (trust auth), or a private server with password authentication.

use std::path::PathBuf;
use std::process::{Command, Stdio};

use crate::process::{free_port, rand_u32, succeed};

/// The Postgres server the machine runs (trust auth); override with
/// `REKEY_TEST_PG_URL`.
#[must_use]
pub(crate) fn pg_admin_url() -> String {
    std::env::var("REKEY_TEST_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// A database created for one test on the machine's Postgres, dropped at
/// the end.
pub struct PgDb {
    pub name: String,
    pub url: String,
}

impl PgDb {
    /// # Panics
    ///
    /// When the machine's Postgres is not reachable (run scripts/test).
    pub async fn create(tag: &str) -> Self {
        use sqlx::Connection;
        let name = format!("rekey_{tag}_{}_{}", std::process::id(), rand_u32());
        let mut c = sqlx::PgConnection::connect(&pg_admin_url())
            .await
            .expect("connect to the test Postgres on 127.0.0.1:5432 (run scripts/test)");
        sqlx::Executor::execute(&mut c, format!("CREATE DATABASE {name}").as_str())
            .await
            .expect("create database");
        let base = pg_admin_url();
        let url = match base.rfind('/') {
            Some(i) => format!("{}/{name}", &base[..i]),
            None => base,
        };
        PgDb { name, url }
    }
}

impl Drop for PgDb {
    fn drop(&mut self) {
        // Best effort, in a separate process so Drop needs no runtime.
        let _ = Command::new("psql")
            .args([
                &pg_admin_url(),
                "-qc",
                &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// A private Postgres server with password authentication
/// (`scram-sha-256` for TCP), created with `initdb` for one test and
/// removed afterwards. The machine's own server trusts every local
/// connection, so it cannot show that an old password stops working.
pub struct PgServer {
    pub port: u16,
    pub admin_password: String,
    dir: PathBuf,
    bin: PathBuf,
}

impl PgServer {
    /// # Panics
    ///
    /// When the server binaries are missing or it does not start.
    #[must_use]
    pub fn start(tag: &str) -> PgServer {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .expect(
                "PostgreSQL server binaries in /usr/lib/postgresql (scripts/test installs them)",
            )
            .flatten()
            .map(|e| e.path().join("bin"))
            .filter(|p| p.join("initdb").exists())
            .max()
            .expect("initdb");
        let dir = std::env::temp_dir().join(format!(
            "rekey-pg-{tag}-{}-{}",
            std::process::id(),
            rand_u32()
        ));
        std::fs::create_dir_all(&dir).expect("create the server's directory");
        let admin_password = format!("admin-{}", rand_u32());
        std::fs::write(dir.join("pw"), &admin_password).expect("write the password file");
        let path = |p: PathBuf| p.display().to_string();
        let run = |args: &[String]| {
            succeed(
                Command::new("runuser")
                    .args(["-u", "postgres", "--"])
                    .args(args),
            );
        };
        succeed(
            Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&dir),
        );
        let data = path(dir.join("data"));
        run(&[
            path(bin.join("initdb")),
            "-D".into(),
            data.clone(),
            "-U".into(),
            "postgres".into(),
            "--pwfile".into(),
            path(dir.join("pw")),
            "--auth-host=scram-sha-256".into(),
            "--auth-local=trust".into(),
            "-E".into(),
            "UTF8".into(),
        ]);
        let port = free_port();
        run(&[
            path(bin.join("pg_ctl")),
            "-D".into(),
            data,
            "-l".into(),
            path(dir.join("log")),
            "-o".into(),
            format!(
                "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
                dir.display()
            ),
            "-w".into(),
            "start".into(),
        ]);
        PgServer {
            port,
            admin_password,
            dir,
            bin,
        }
    }

    /// The superuser's URL (password authentication).
    #[must_use]
    pub fn admin_url(&self, db: &str) -> String {
        format!(
            "postgres://postgres:{}@127.0.0.1:{}/{db}",
            self.admin_password, self.port
        )
    }

    /// An app's database as the credential kinds expect it: the group role
    /// `app_owner` (NOLOGIN) owns database `appdb` and its table `items`
    /// (one row); login roles are rekey's to create.
    ///
    /// # Panics
    ///
    /// When the SQL fails.
    pub async fn app_database(&self) {
        self.sql("postgres", "CREATE ROLE app_owner NOLOGIN").await;
        self.sql("postgres", "CREATE DATABASE appdb OWNER app_owner")
            .await;
        self.sql(
            "appdb",
            "SET ROLE app_owner; CREATE TABLE items (id int); INSERT INTO items VALUES (1)",
        )
        .await;
    }

    /// Runs SQL as the superuser.
    ///
    /// # Panics
    ///
    /// When the SQL fails.
    pub async fn sql(&self, db: &str, sql: &str) {
        use sqlx::Connection;
        let mut c = sqlx::PgConnection::connect(&self.admin_url(db))
            .await
            .expect("connect as admin");
        sqlx::raw_sql(sql).execute(&mut c).await.expect("admin SQL");
    }

    /// Whether `user` / `password` may log in and run SELECT 1.
    ///
    /// # Errors
    ///
    /// The server's refusal, as text.
    pub async fn login(&self, user: &str, password: &str, db: &str) -> Result<(), String> {
        use sqlx::Connection;
        let url = format!("postgres://{user}:{password}@127.0.0.1:{}/{db}", self.port);
        let mut c = sqlx::PgConnection::connect(&url)
            .await
            .map_err(|e| e.to_string())?;
        sqlx::query("SELECT 1")
            .execute(&mut c)
            .await
            .map(drop)
            .map_err(|e| e.to_string())
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        let _ = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["-m", "immediate", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Deletes Redis ACL users when dropped, so a failing test leaves none
/// behind on the machine's Redis.
pub struct RedisUsers(pub Vec<String>);

impl Drop for RedisUsers {
    fn drop(&mut self) {
        for u in &self.0 {
            let _ = Command::new("redis-cli")
                .args(["-h", "127.0.0.1", "-p", "6379", "ACL", "DELUSER", u])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// `redis-cli` against the machine's Redis (127.0.0.1:6379): its output,
/// trimmed.
///
/// # Panics
///
/// When `redis-cli` cannot run.
pub fn redis_cli(args: &[&str]) -> String {
    let o = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", "6379"])
        .args(args)
        .output()
        .expect("redis-cli");
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

/// True when `user` / `pass` authenticates at the machine's Redis
/// (redis-cli goes on as the default user after a failed AUTH, so it asks
/// who it is).
#[must_use]
pub fn redis_auth(user: &str, pass: &str) -> bool {
    redis_cli(&[
        "--user",
        user,
        "--pass",
        pass,
        "--no-auth-warning",
        "ACL",
        "WHOAMI",
    ]) == user
}
