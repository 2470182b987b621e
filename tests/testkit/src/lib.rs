//! Shared harness for the end-to-end tests and benchmarks: starts the real
//! `rekey-backend` binary on free ports with its own data directory, runs
//! the real `rekey` CLI against it, and makes fresh Postgres databases.
#![allow(
    dead_code,
    reason = "each test binary uses a different part of the harness"
)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use rekey_proto::v1::rekey_client::RekeyClient;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

pub const BACKEND: &str = env!("CARGO_BIN_EXE_rekey-backend");

/// `rekey-sidecar`, built beside the backend by `cargo test --workspace`
/// (scripts/test).
pub fn sidecar_bin() -> PathBuf {
    beside_backend("rekey-sidecar")
}

/// `rekey`, built beside the backend by `cargo test --workspace`.
pub fn cli_bin() -> PathBuf {
    beside_backend("rekey")
}

fn beside_backend(name: &str) -> PathBuf {
    let p = Path::new(BACKEND).with_file_name(name);
    assert!(
        p.exists(),
        "{} is missing: build the workspace first (scripts/test does)",
        p.display()
    );
    p
}

/// The Postgres server the machine runs (trust auth).
pub fn pg_admin_url() -> String {
    std::env::var("REKEY_TEST_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A fresh directory under the system temp dir, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!(
            "rekey-{tag}-{}-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed),
            Instant::now().elapsed().as_nanos() ^ rand_u32() as u128
        ));
        std::fs::create_dir_all(&p).expect("create temp dir");
        TempDir(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        // REKEY_TEST_KEEP=1 keeps the logs and data of a failed test.
        if std::thread::panicking() && std::env::var_os("REKEY_TEST_KEEP").is_some() {
            eprintln!("kept {}", self.0.display());
            return;
        }
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn rand_u32() -> u32 {
    let mut b = [0u8; 4];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        use std::io::Read;
        let _ = f.read_exact(&mut b);
    }
    u32::from_le_bytes(b)
}

/// A database created for one test on the machine's Postgres, dropped at
/// the end.
pub struct PgDb {
    pub name: String,
    pub url: String,
}

impl PgDb {
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

/// Options for one backend process.
#[derive(Clone, Default)]
pub struct BackendOpts {
    /// `postgres://...`; SQLite in the data dir when `None`.
    pub store_url: Option<String>,
    /// Extra TOML appended to the generated config.
    pub extra_toml: String,
    /// Extra environment variables.
    pub env: Vec<(String, String)>,
    /// `RUST_LOG` (default `info`).
    pub rust_log: Option<String>,
    /// Share this admin token file instead of the data dir's.
    pub admin_token_file: Option<PathBuf>,
    /// Share this KEK file instead of generating one in the data dir.
    pub kek_file: Option<PathBuf>,
    /// gRPC address (default 127.0.0.1:0, a free port).
    pub listen: Option<String>,
}

/// A running `rekey-backend`.
pub struct Backend {
    child: Option<Child>,
    pub dir: PathBuf,
    pub grpc: String,
    pub metrics: String,
    pub opts: BackendOpts,
    pub log_path: PathBuf,
    pub config_path: PathBuf,
}

impl Backend {
    /// Starts a backend with data under `dir` and waits until it listens.
    pub fn start(dir: &Path, opts: BackendOpts) -> Backend {
        let config_path = dir.join("rekey.toml");
        let mut toml = format!(
            "listen = {:?}\nmetrics_listen = \"127.0.0.1:0\"\n",
            opts.listen.as_deref().unwrap_or("127.0.0.1:0")
        );
        toml.push_str(&format!(
            "data_dir = {:?}\n",
            dir.join("data").display().to_string()
        ));
        if let Some(u) = &opts.store_url {
            toml.push_str(&format!("[store]\nurl = {u:?}\n"));
        }
        if let Some(k) = &opts.kek_file {
            toml.push_str(&format!("[kek]\nfile = {:?}\n", k.display().to_string()));
        }
        if let Some(t) = &opts.admin_token_file {
            toml.push_str(&format!(
                "[auth]\nadmin_token_file = {:?}\n",
                t.display().to_string()
            ));
        }
        toml.push_str(&opts.extra_toml);
        std::fs::write(&config_path, toml).expect("write config");
        Self::spawn(dir, opts, config_path)
    }

    fn spawn(dir: &Path, opts: BackendOpts, config_path: PathBuf) -> Backend {
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        let log_path = dir.join(format!("backend-{n}.log"));
        let log = std::fs::File::create(&log_path).expect("log file");
        let mut cmd = Command::new(BACKEND);
        cmd.arg("--config")
            .arg(&config_path)
            .env(
                "RUST_LOG",
                opts.rust_log.clone().unwrap_or_else(|| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log);
        for (k, v) in &opts.env {
            cmd.env(k, v);
        }
        let (child, line) = spawn_until_first_line(cmd, &log_path, "rekey-backend", 60);
        // "listening grpc=ADDR metrics=ADDR"
        let field = |k: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(k))
                .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
                .to_string()
        };
        Backend {
            child: Some(child),
            dir: dir.to_path_buf(),
            grpc: format!("http://{}", field("grpc=")),
            metrics: field("metrics="),
            opts,
            log_path,
            config_path,
        }
    }

    /// Starts the same backend again (same config and data).
    pub fn restart(&mut self) {
        self.stop();
        let next = Self::spawn(&self.dir, self.opts.clone(), self.config_path.clone());
        *self = next;
    }

    pub fn token_path(&self) -> PathBuf {
        self.opts
            .admin_token_file
            .clone()
            .unwrap_or_else(|| self.dir.join("data").join("admin.token"))
    }

    pub fn token(&self) -> String {
        std::fs::read_to_string(self.token_path())
            .expect("admin token")
            .trim()
            .to_string()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// SIGKILL: no chance to clean up.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait; returns the exit status code.
    pub fn stop(&mut self) -> Option<i32> {
        let mut c = self.child.take()?;
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(c.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(st)) = c.try_wait() {
                return st.code();
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Every log this backend directory has produced (all restarts).
    pub fn all_logs(&self) -> String {
        let mut out = String::new();
        if let Ok(rd) = std::fs::read_dir(&self.dir) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().to_string();
                if name.starts_with("backend-") && name.ends_with(".log") {
                    out.push_str(&std::fs::read_to_string(e.path()).unwrap_or_default());
                }
            }
        }
        out
    }

    /// Runs the real `rekey` CLI against this backend with the admin token.
    pub fn cli(&self, args: &[&str]) -> Output {
        self.cli_with(args, Some(&self.token_path()))
    }

    /// Runs `rekey` with a given token file (or none).
    pub fn cli_with(&self, args: &[&str], token_file: Option<&Path>) -> Output {
        let mut cmd = Command::new(cli_bin());
        cmd.arg("--addr").arg(&self.grpc);
        if let Some(t) = token_file {
            cmd.arg("--token-file").arg(t);
        }
        cmd.args(args)
            .current_dir(&self.dir)
            .env_remove("REKEY_TOKEN")
            .env_remove("REKEY_ADDR")
            .stdin(Stdio::null());
        cmd.output().expect("run rekey")
    }

    /// Starts the CLI with the admin token without waiting for it (to kill
    /// the backend while a call is in flight).
    pub fn spawn_cli(&self, args: &[&str]) -> Child {
        Command::new(cli_bin())
            .arg("--addr")
            .arg(&self.grpc)
            .arg("--token-file")
            .arg(self.token_path())
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn rekey")
    }

    /// Runs the CLI with `-o json`, asserts success and parses stdout.
    pub fn cli_json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = vec!["-o", "json"];
        a.extend_from_slice(args);
        let out = self.cli(&a);
        assert!(
            out.status.success(),
            "rekey {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "rekey {args:?} printed no JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    /// A gRPC client that sends the admin token.
    pub async fn client(&self) -> Client {
        client(&self.grpc, &self.token()).await
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.kill9();
    }
}

pub type Client = RekeyClient<InterceptedService<Channel, TokenInterceptor>>;

#[derive(Clone)]
pub struct TokenInterceptor(tonic::metadata::MetadataValue<tonic::metadata::Ascii>);

impl tonic::service::Interceptor for TokenInterceptor {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        req.metadata_mut().insert("authorization", self.0.clone());
        Ok(req)
    }
}

pub async fn client(addr: &str, token: &str) -> Client {
    let ch = tonic::transport::Endpoint::from_shared(addr.to_string())
        .expect("endpoint")
        .connect()
        .await
        .expect("connect to backend");
    let v = format!("Bearer {token}").parse().expect("header");
    RekeyClient::with_interceptor(ch, TokenInterceptor(v))
}

/// A minimal HTTP/1.1 GET over a plain TCP socket; the whole response.
pub fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read");
    out
}

/// Text of a CLI run's stderr.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

/// Text of a CLI run's stdout.
pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).to_string()
}

/// Polls `f` until it returns `Some`, or panics after `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Spawns `cmd` (stdout piped, stderr to `log`) and waits for the first
/// line it prints; the rest of stdout is drained so the child never blocks.
fn spawn_until_first_line(mut cmd: Command, log: &Path, what: &str, secs: u64) -> (Child, String) {
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {what}: {e}"));
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        if let Some(Ok(l)) = lines.next() {
            let _ = tx.send(l);
        }
        for _ in lines {}
    });
    match rx.recv_timeout(Duration::from_secs(secs)) {
        Ok(l) => (child, l),
        Err(_) => {
            let _ = child.kill();
            panic!(
                "{what} did not start; log:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
    }
}

/// Hex SHA-256 of a token, as `[[auth.tokens]]` wants it.
pub fn sha256_hex(s: &str) -> String {
    let out = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().expect("stdin").write_all(s.as_bytes())?;
            c.wait_with_output()
        })
        .expect("sha256sum");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .expect("digest")
        .to_string()
}

/// A free TCP port on 127.0.0.1 (bound, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// A running `rekey-sidecar`.
pub struct Sidecar {
    child: Option<Child>,
    pub http: String,
    pub log_path: PathBuf,
}

impl Sidecar {
    /// Starts the sidecar with `args` and waits for its listening line.
    pub fn start(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Sidecar {
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        let log_path = dir.join(format!("sidecar-{n}.log"));
        let log = std::fs::File::create(&log_path).expect("log file");
        let mut cmd = Command::new(sidecar_bin());
        cmd.args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let (child, line) = spawn_until_first_line(cmd, &log_path, "rekey-sidecar", 30);
        let http = line
            .strip_prefix("listening http=")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_string();
        Sidecar {
            child: Some(child),
            http,
            log_path,
        }
    }

    /// Runs the sidecar expecting it to refuse to start: (exit code,
    /// stdout, stderr).
    pub fn refuse(args: &[&str]) -> (Option<i32>, String, String) {
        let o = Command::new(sidecar_bin())
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run rekey-sidecar");
        (o.status.code(), stdout(&o), stderr(&o))
    }

    pub fn get(&self, path: &str) -> (u16, String) {
        http_request(&self.http, path, &[])
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// SIGTERM and wait; the exit code.
    pub fn stop(&mut self) -> Option<i32> {
        let mut c = self.child.take()?;
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(c.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(st)) = c.try_wait() {
                return st.code();
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// GET with extra headers: (status, body).
pub fn http_request(addr: &str, path: &str, headers: &[(&str, &str)]) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    let mut req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read");
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// A private PostgreSQL server with password authentication
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
        std::fs::create_dir_all(&dir).unwrap();
        let admin_password = format!("admin-{}", rand_u32());
        std::fs::write(dir.join("pw"), &admin_password).unwrap();
        let run = |args: &[&str]| {
            succeed(
                Command::new("runuser")
                    .args(["-u", "postgres", "--"])
                    .args(args),
            );
        };
        let status = Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(&dir)
            .status()
            .unwrap();
        assert!(status.success());
        let data = dir.join("data");
        run(&[
            bin.join("initdb").to_str().unwrap(),
            "-D",
            data.to_str().unwrap(),
            "-U",
            "postgres",
            "--pwfile",
            dir.join("pw").to_str().unwrap(),
            "--auth-host=scram-sha-256",
            "--auth-local=trust",
            "-E",
            "UTF8",
        ]);
        let port = free_port();
        run(&[
            bin.join("pg_ctl").to_str().unwrap(),
            "-D",
            data.to_str().unwrap(),
            "-l",
            dir.join("log").to_str().unwrap(),
            "-o",
            &format!(
                "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
                dir.display()
            ),
            "-w",
            "start",
        ]);
        PgServer {
            port,
            admin_password,
            dir,
            bin,
        }
    }

    /// The superuser's URL (password authentication).
    pub fn admin_url(&self, db: &str) -> String {
        format!(
            "postgres://postgres:{}@127.0.0.1:{}/{db}",
            self.admin_password, self.port
        )
    }

    /// Runs SQL as the superuser.
    pub async fn sql(&self, db: &str, sql: &str) {
        use sqlx::Connection;
        let mut c = sqlx::PgConnection::connect(&self.admin_url(db))
            .await
            .expect("connect as admin");
        sqlx::raw_sql(sql).execute(&mut c).await.expect("admin SQL");
    }

    /// Whether `user` / `password` may log in and run SELECT 1.
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

/// Runs a command to its end; panics with its output when it fails.
pub fn succeed(cmd: &mut Command) -> Output {
    let o = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        o.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

/// Runs `openssl` in `dir`; panics with its output when it fails.
pub fn openssl(dir: &Path, args: &[&str]) {
    succeed(Command::new("openssl").args(args).current_dir(dir));
}

/// A test CA (`ca.pem`, `ca.key`) and a server certificate it signed for
/// localhost and 127.0.0.1 (`server.pem`, `server.key`), in `dir`.
pub fn server_pki(dir: &Path) {
    let ca = [
        &["req", "-x509"],
        NEW_EC_KEY,
        &["-keyout", "ca.key", "-out", "ca.pem"],
    ]
    .concat();
    openssl(
        dir,
        &[&ca[..], &["-days", "2", "-subj", "/CN=rekey-test-ca"]].concat(),
    );
    issue_cert(
        dir,
        "server",
        "/CN=localhost",
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
    );
}

/// `openssl req` arguments for a new P-256 key without a passphrase.
const NEW_EC_KEY: &[&str] = &[
    "-newkey",
    "ec",
    "-pkeyopt",
    "ec_paramgen_curve:P-256",
    "-nodes",
];

/// A P-256 key `NAME.key` and a certificate `NAME.pem` for `subject`,
/// signed by the CA that `server_pki` made in `dir`, with the X.509
/// extensions `ext` (openssl's extfile syntax).
pub fn issue_cert(dir: &Path, name: &str, subject: &str, ext: &str) {
    let (key, csr, pem, extfile) = (
        format!("{name}.key"),
        format!("{name}.csr"),
        format!("{name}.pem"),
        format!("{name}.ext"),
    );
    std::fs::write(dir.join(&extfile), ext).unwrap();
    let req = [&["req"], NEW_EC_KEY].concat();
    openssl(
        dir,
        &[&req[..], &["-keyout", &key, "-out", &csr, "-subj", subject]].concat(),
    );
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            &pem,
            "-days",
            "2",
            "-extfile",
            &extfile,
        ],
    );
}

/// The stand-in for the Kubernetes API server's Lease endpoints
/// (`lease_apiserver.py`), over HTTPS with a test CA, with a service
/// account token file and a history of every write.
pub struct LeaseApiServer {
    child: Child,
    pub url: String,
    pub ca: PathBuf,
    pub token_file: PathBuf,
    pub history: PathBuf,
}

impl LeaseApiServer {
    pub fn start(dir: &Path) -> LeaseApiServer {
        let pki = dir.join("kube-pki");
        std::fs::create_dir_all(&pki).unwrap();
        server_pki(&pki);
        let token_file = dir.join("sa-token");
        std::fs::write(&token_file, format!("sa-token-{}", std::process::id())).unwrap();
        let history = dir.join("lease-history.jsonl");
        let log = dir.join("lease-apiserver.log");
        let script =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/support/lease_apiserver.py");
        let mut cmd = Command::new("python3");
        cmd.arg(script)
            .arg("--cert")
            .arg(pki.join("server.pem"))
            .arg("--key")
            .arg(pki.join("server.key"))
            .arg("--token-file")
            .arg(&token_file)
            .arg("--history")
            .arg(&history)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap());
        let (child, line) = spawn_until_first_line(cmd, &log, "lease_apiserver.py", 30);
        let port = line
            .strip_prefix("listening ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"));
        LeaseApiServer {
            child,
            url: format!("https://localhost:{port}"),
            ca: pki.join("ca.pem"),
            token_file,
            history,
        }
    }

    /// The `[[reencrypt]]` lines that elect through this server, with
    /// `lease` added to `[reencrypt.lease]` (name, duration).
    pub fn election(&self, lease: &str) -> String {
        format!(
            "leader_election = \"kubernetes-lease\"\n[reencrypt.lease]\napi_server = \"{}\"\nca_file = \"{}\"\ntoken_file = \"{}\"\nnamespace = \"rekey-test\"\n{lease}",
            self.url,
            self.ca.display(),
            self.token_file.display()
        )
    }

    /// Every successful write, oldest first.
    pub fn history(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.history)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

impl Drop for LeaseApiServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A sidecar config (`CONSUMER.toml` in `dir`) that serves `secret` from
/// `b` and re-encrypts the database named in `db_url_file`; `reencrypt`
/// holds the rest of the `[[reencrypt]]` table (columns, batch size, poll,
/// election).
pub fn reencrypt_sidecar_config(
    dir: &Path,
    consumer: &str,
    b: &Backend,
    secret: &str,
    db_url_file: &Path,
    reencrypt: &str,
) -> PathBuf {
    let p = dir.join(format!("{consumer}.toml"));
    std::fs::write(
        &p,
        format!(
            r#"
backend = "{backend}"
token_file = "{token}"
listen = "127.0.0.1:0"
consumer_id = "{consumer}"
report_interval = "1s"
backoff_max = "500ms"
[[secrets]]
id = "{secret}"
path = "{out}"
[[reencrypt]]
secret = "{secret}"
database_url_file = "{db}"
{reencrypt}
"#,
            backend = b.grpc,
            token = b.token_path().display(),
            out = dir.join(format!("{consumer}.key")).display(),
            db = db_url_file.display(),
        ),
    )
    .unwrap();
    p
}
