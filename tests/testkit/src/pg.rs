//! Postgres for the tests: a fresh database per test on the machine's
//! server (trust auth), or a private server with password authentication.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::process::{free_port, rand_u32, succeed};

/// The platform's two credential tables as the runbook's platform has
/// them: HYVVE envelopes in text columns, ids uuid text, the second
/// column nullable.
pub const HYVVE_TABLES: &str = "CREATE TABLE ai_provider_configs (id text PRIMARY KEY, api_key_encrypted text NOT NULL); \
     CREATE TABLE mcp_server_configs (id text PRIMARY KEY, api_key_encrypted text);";

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
///
/// [`PgServer::start_tls`] makes one that takes TCP connections only over
/// TLS (`hostssl`), as managed Postgres does.
pub struct PgServer {
    pub port: u16,
    pub admin_password: String,
    /// With TLS: the CA file its certificate chains to.
    pub ca: Option<PathBuf>,
    dir: PathBuf,
    bin: PathBuf,
}

impl PgServer {
    /// # Panics
    ///
    /// When the server binaries are missing or it does not start.
    #[must_use]
    pub fn start(tag: &str) -> PgServer {
        Self::start_with(tag, None)
    }

    /// A server with `ssl = on` and the certificate [`crate::server_pki`]
    /// made in `pki` (for localhost and 127.0.0.1), listening on 127.0.0.1
    /// and 127.0.0.2 (a name its certificate lacks). `pg_hba.conf` allows
    /// `hostssl ... scram-sha-256` only, and `hostssl ... cert` for the
    /// role `rekey_cert` (a client certificate with that common name, from
    /// the same CA).
    ///
    /// # Panics
    ///
    /// When the server binaries are missing or it does not start.
    #[must_use]
    pub fn start_tls(tag: &str, pki: &Path) -> PgServer {
        Self::start_with(tag, Some(pki))
    }

    fn start_with(tag: &str, pki: Option<&Path>) -> PgServer {
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
        let mut settings = format!(
            "-k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            dir.display()
        );
        if let Some(pki) = pki {
            // The server's key must be its own, mode 0600.
            for f in ["server.pem", "server.key", "ca.pem"] {
                std::fs::copy(pki.join(f), dir.join(f)).expect("copy the server's certificate");
            }
            std::fs::set_permissions(
                dir.join("server.key"),
                std::os::unix::fs::PermissionsExt::from_mode(0o600),
            )
            .expect("chmod the server's key");
            settings = format!(
                "-k {} -c listen_addresses=127.0.0.1,127.0.0.2 -c fsync=off -c ssl=on \
                 -c ssl_cert_file={d}/server.pem -c ssl_key_file={d}/server.key \
                 -c ssl_ca_file={d}/ca.pem -c hba_file={d}/pg_hba.conf",
                dir.display(),
                d = dir.display()
            );
            std::fs::write(
                dir.join("pg_hba.conf"),
                "local all all trust\n\
                 hostssl all rekey_cert 127.0.0.1/32 cert\n\
                 hostssl all all 127.0.0.1/32 scram-sha-256\n\
                 hostssl all all 127.0.0.2/32 scram-sha-256\n",
            )
            .expect("write pg_hba.conf");
        }
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
            format!("-p {port} {settings}"),
            "-w".into(),
            "start".into(),
        ]);
        PgServer {
            port,
            admin_password,
            ca: pki.map(|p| p.join("ca.pem")),
            dir,
            bin,
        }
    }

    /// A URL for `user` / `password` at 127.0.0.1; with TLS,
    /// `sslmode=verify-full` and the CA file.
    #[must_use]
    pub fn url(&self, user: &str, password: &str, db: &str) -> String {
        let base = format!("postgres://{user}:{password}@127.0.0.1:{}/{db}", self.port);
        match &self.ca {
            Some(ca) => format!("{base}?sslmode=verify-full&sslrootcert={}", ca.display()),
            None => base,
        }
    }

    /// The superuser's URL (password authentication; TLS as
    /// [`PgServer::url`]).
    #[must_use]
    pub fn admin_url(&self, db: &str) -> String {
        self.url("postgres", &self.admin_password, db)
    }

    /// The superuser over the server's Unix socket (trusted, no TLS): for
    /// the test's own setup.
    fn socket_url(&self, db: &str) -> String {
        format!(
            "postgres://postgres@localhost:{}/{db}?host={}",
            self.port,
            self.dir.display()
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
        let mut c = sqlx::PgConnection::connect(&self.socket_url(db))
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
        let url = self.url(user, password, db);
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
