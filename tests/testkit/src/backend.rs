//! A real `rekey-backend` process on free ports with its own data
//! directory, the real `rekey` CLI pointed at it, and gRPC clients.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use rekey_proto::v1::rekey_client::RekeyClient;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::bins::{BACKEND, CLI};
use crate::process::{next_seq, spawn_until_first_line, stderr, stdout, terminate};

/// Options for one backend process.
#[derive(Clone, Default)]
pub struct BackendOpts {
    /// `postgres://...`; `SQLite` in the data dir when `None`.
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

/// A running `rekey-backend`, killed on drop.
pub struct Backend {
    child: Option<Child>,
    pub dir: PathBuf,
    /// `http://ADDR` of the gRPC API.
    pub grpc: String,
    /// `ADDR` of the metrics server.
    pub metrics: String,
    pub opts: BackendOpts,
    pub log_path: PathBuf,
    pub config_path: PathBuf,
}

impl Backend {
    /// Starts `n` replicas on one Postgres database, sharing a KEK and an
    /// admin token (both written under `dir`), each with its own
    /// directory `dir/replica-<i>` and `extra_toml`.
    ///
    /// # Panics
    ///
    /// When a file cannot be written or a replica does not start.
    #[must_use]
    pub fn start_replicas(
        dir: &Path,
        db: &crate::PgDb,
        n: usize,
        extra_toml: &str,
    ) -> Vec<Backend> {
        let kek = dir.join("kek");
        // A fixed key: the database is made for one test and dropped after.
        std::fs::write(&kek, "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=\n")
            .expect("write the KEK");
        let token = dir.join("admin.token");
        std::fs::write(&token, "rk_replica_test_token_0123456789\n").expect("write the token");
        let opts = BackendOpts {
            store_url: Some(db.url.clone()),
            kek_file: Some(kek),
            admin_token_file: Some(token),
            extra_toml: extra_toml.to_string(),
            ..Default::default()
        };
        (0..n)
            .map(|i| {
                let d = dir.join(format!("replica-{i}"));
                std::fs::create_dir_all(&d).expect("create a replica's directory");
                Backend::start(&d, opts.clone())
            })
            .collect()
    }

    /// Starts a backend with data under `dir` and waits until it listens.
    ///
    /// # Panics
    ///
    /// When it does not start (with its log).
    #[must_use]
    pub fn start(dir: &Path, opts: BackendOpts) -> Backend {
        use std::fmt::Write as _;
        let config_path = dir.join("rekey.toml");
        let mut toml = format!(
            "listen = {:?}\nmetrics_listen = \"127.0.0.1:0\"\n",
            opts.listen.as_deref().unwrap_or("127.0.0.1:0")
        );
        let _ = writeln!(
            toml,
            "data_dir = {:?}",
            dir.join("data").display().to_string()
        );
        if let Some(u) = &opts.store_url {
            let _ = writeln!(toml, "[store]\nurl = {u:?}");
        }
        if let Some(k) = &opts.kek_file {
            let _ = writeln!(toml, "[kek]\nfile = {:?}", k.display().to_string());
        }
        if let Some(t) = &opts.admin_token_file {
            let _ = writeln!(
                toml,
                "[auth]\nadmin_token_file = {:?}",
                t.display().to_string()
            );
        }
        toml.push_str(&opts.extra_toml);
        std::fs::write(&config_path, toml).expect("write config");
        Self::spawn(dir, opts, config_path)
    }

    fn spawn(dir: &Path, opts: BackendOpts, config_path: PathBuf) -> Backend {
        let log_path = dir.join(format!("backend-{}.log", next_seq()));
        let log = std::fs::File::create(&log_path).expect("log file");
        let mut cmd = Command::new(BACKEND.path());
        cmd.arg("--config")
            .arg(&config_path)
            .env(
                "RUST_LOG",
                opts.rust_log.clone().unwrap_or_else(|| "info".into()),
            )
            .stdin(Stdio::null())
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

    #[must_use]
    pub fn token_path(&self) -> PathBuf {
        self.opts
            .admin_token_file
            .clone()
            .unwrap_or_else(|| self.dir.join("data").join("admin.token"))
    }

    /// # Panics
    ///
    /// When the admin token file cannot be read.
    #[must_use]
    pub fn token(&self) -> String {
        std::fs::read_to_string(self.token_path())
            .expect("admin token")
            .trim()
            .to_string()
    }

    /// The process id (0 once stopped).
    #[must_use]
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// SIGKILL: no chance to clean up.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait; the exit code.
    pub fn stop(&mut self) -> Option<i32> {
        terminate(self.child.take()?)
    }

    /// This process's log.
    #[must_use]
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Every log this backend directory has produced (all restarts).
    #[must_use]
    pub fn all_logs(&self) -> String {
        let mut out = String::new();
        if let Ok(rd) = std::fs::read_dir(&self.dir) {
            for e in rd.flatten() {
                let path = e.path();
                let name = e.file_name().to_string_lossy().to_string();
                if name.starts_with("backend-") && path.extension().is_some_and(|x| x == "log") {
                    out.push_str(&std::fs::read_to_string(&path).unwrap_or_default());
                }
            }
        }
        out
    }

    /// Runs the real `rekey` CLI against this backend with the admin token.
    #[must_use]
    pub fn cli(&self, args: &[&str]) -> Output {
        self.cli_with(args, Some(&self.token_path()))
    }

    /// Runs `rekey` with a given token file (or none).
    ///
    /// # Panics
    ///
    /// When `rekey` cannot run.
    #[must_use]
    pub fn cli_with(&self, args: &[&str], token_file: Option<&Path>) -> Output {
        let mut cmd = Command::new(CLI.path());
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
    ///
    /// # Panics
    ///
    /// When `rekey` cannot start.
    #[must_use]
    pub fn spawn_cli(&self, args: &[&str]) -> Child {
        Command::new(CLI.path())
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
    ///
    /// # Panics
    ///
    /// When the command fails or prints no JSON.
    #[allow(
        clippy::must_use_candidate,
        reason = "tests call it as often to assert that a command succeeds as for its output"
    )]
    pub fn cli_json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = vec!["-o", "json"];
        a.extend_from_slice(args);
        let out = self.cli(&a);
        assert!(
            out.status.success(),
            "rekey {args:?} failed: {}",
            stderr(&out)
        );
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("rekey {args:?} printed no JSON ({e}): {}", stdout(&out)))
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

/// A `rekey.v1` client that sends a bearer token.
pub type Client = RekeyClient<InterceptedService<Channel, TokenInterceptor>>;

/// Adds `authorization: Bearer <token>` to every call.
#[derive(Clone)]
pub struct TokenInterceptor(tonic::metadata::MetadataValue<tonic::metadata::Ascii>);

impl tonic::service::Interceptor for TokenInterceptor {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        req.metadata_mut().insert("authorization", self.0.clone());
        Ok(req)
    }
}

/// Connects to `addr` (`http://...`) with a bearer token.
///
/// # Panics
///
/// When the backend cannot be reached or the token is not a header value.
pub async fn client(addr: &str, token: &str) -> Client {
    let ch = tonic::transport::Endpoint::from_shared(addr.to_string())
        .expect("endpoint")
        .connect()
        .await
        .expect("connect to backend");
    let v = format!("Bearer {token}").parse().expect("header");
    RekeyClient::with_interceptor(ch, TokenInterceptor(v))
}
