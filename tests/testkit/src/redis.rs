//! Private Redis deployments for one test, from Debian's `redis-server`:
//! a server (TLS only, if asked), a primary with replicas and Sentinels
//! (`redis-server --sentinel`, what Debian's `redis-sentinel` runs), and a
//! Redis Cluster. Each server has its own port and directory, an `admin`
//! user that may do everything, no usable `default` user, and is killed
//! when dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::process::{free_port, rand_u32, wait_for};

/// The admin user every private server has.
pub const REDIS_ADMIN: &str = "admin";

/// How one server is set up.
#[derive(Debug, Clone, Default)]
pub struct RedisOpts {
    /// TLS only on the port, with the certificates [`redis_pki`] made in
    /// this directory.
    pub tls: Option<PathBuf>,
    /// `tls-auth-clients`: whether clients must show a certificate
    /// (`yes`, `optional`; default `optional`).
    pub tls_auth_clients: Option<&'static str>,
    /// A replica of the server on this port.
    pub replica_of: Option<u16>,
    /// A Redis Cluster node.
    pub cluster: bool,
    /// More `redis.conf` lines (users, say).
    pub extra: String,
}

/// One `redis-server` of a test.
pub struct RedisServer {
    pub port: u16,
    pub admin_password: String,
    pub opts: RedisOpts,
    dir: PathBuf,
    config: PathBuf,
    child: Option<Child>,
    /// `--sentinel`.
    sentinel: bool,
}

impl RedisServer {
    /// # Panics
    ///
    /// When `redis-server` does not start or answer.
    #[must_use]
    pub fn start(tag: &str, opts: RedisOpts) -> RedisServer {
        Self::start_with_password(tag, opts, &format!("admin-{}", rand_u32()))
    }

    /// A replica of `primary`, with the primary's admin password (it
    /// replicates as that user, and one admin URL reaches both).
    ///
    /// # Panics
    ///
    /// When `redis-server` does not start or answer.
    #[must_use]
    pub fn replica_of(tag: &str, primary: &RedisServer, opts: RedisOpts) -> RedisServer {
        Self::start_with_password(
            tag,
            RedisOpts {
                replica_of: Some(primary.port),
                ..opts
            },
            &primary.admin_password,
        )
    }

    fn start_with_password(tag: &str, opts: RedisOpts, admin_password: &str) -> RedisServer {
        let port = free_port();
        let dir =
            std::env::temp_dir().join(format!("rekey-redis-{tag}-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create the server's directory");
        let mut conf = format!(
            "bind 127.0.0.1\ndir {}\nsave \"\"\nappendonly no\nlogfile {}\n\
             user default off\n\
             user {REDIS_ADMIN} on >{admin_password} ~* &* +@all\n\
             masteruser {REDIS_ADMIN}\nmasterauth {admin_password}\n",
            dir.display(),
            dir.join("log").display()
        );
        conf.push_str(&tls_lines(&opts, port));
        if let Some(p) = opts.replica_of {
            conf.push_str(&format!("replicaof 127.0.0.1 {p}\n"));
        }
        if opts.cluster {
            conf.push_str(
                "cluster-enabled yes\ncluster-config-file nodes.conf\ncluster-node-timeout 3000\n",
            );
        }
        conf.push_str(&opts.extra);
        let config = dir.join("redis.conf");
        std::fs::write(&config, conf).expect("write redis.conf");
        let mut s = RedisServer {
            port,
            admin_password: admin_password.to_string(),
            opts,
            dir,
            config,
            child: None,
            sentinel: false,
        };
        s.run();
        s
    }

    fn run(&mut self) {
        let mut cmd = Command::new("redis-server");
        cmd.arg(&self.config);
        if self.sentinel {
            cmd.arg("--sentinel");
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server (scripts/test installs it)");
        self.child = Some(child);
        wait_for(
            &format!(
                "redis-server on port {} ({})",
                self.port,
                self.log_path().display()
            ),
            Duration::from_secs(20),
            || {
                let pong = if self.sentinel {
                    self.sentinel_cli(&["PING"])
                } else {
                    self.cli(&["PING"])
                };
                pong == "PONG"
            },
        );
    }

    /// `127.0.0.1:PORT`.
    #[must_use]
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The admin URL (`rediss://` with TLS).
    #[must_use]
    pub fn admin_url(&self) -> String {
        let scheme = if self.opts.tls.is_some() {
            "rediss"
        } else {
            "redis"
        };
        format!(
            "{scheme}://{REDIS_ADMIN}:{}@{}",
            self.admin_password,
            self.addr()
        )
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("log")
    }

    /// `redis-cli` as the admin user (with TLS and the client certificate
    /// when the server has TLS): its output, trimmed.
    ///
    /// # Panics
    ///
    /// When `redis-cli` cannot run.
    #[must_use]
    pub fn cli(&self, args: &[&str]) -> String {
        self.cli_as(REDIS_ADMIN, &self.admin_password, args)
    }

    /// `redis-cli` as `user` / `password`.
    ///
    /// # Panics
    ///
    /// When `redis-cli` cannot run.
    #[must_use]
    pub fn cli_as(&self, user: &str, password: &str, args: &[&str]) -> String {
        let mut cmd = Command::new("redis-cli");
        cmd.args(["-h", "127.0.0.1", "-p", &self.port.to_string()]);
        if let Some(pki) = &self.opts.tls {
            cmd.arg("--tls")
                .arg("--cacert")
                .arg(pki.join("ca.pem"))
                .arg("--cert")
                .arg(pki.join("client.pem"))
                .arg("--key")
                .arg(pki.join("client.key"));
        }
        if !user.is_empty() {
            cmd.args(["--user", user, "--pass", password, "--no-auth-warning"]);
        }
        let o = cmd.args(args).output().expect("redis-cli");
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    }

    /// Whether `user` / `password` authenticates here (`redis-cli` goes on
    /// unauthenticated after a refused AUTH, so it asks who it is).
    #[must_use]
    pub fn auth(&self, user: &str, password: &str) -> bool {
        self.cli_as(user, password, &["ACL", "WHOAMI"]) == user
    }

    /// Stops the process (SIGKILL) and keeps its directory.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends `signal` (`STOP`, `CONT`) to the process.
    ///
    /// # Panics
    ///
    /// When the server is not running.
    pub fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().expect("running").id();
        let _ = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(pid.to_string())
            .status();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if self.child.is_some() {
            // A stopped process must run again to die of SIGKILL's cleanup.
            self.signal("CONT");
        }
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The `redis.conf` lines of a TLS-only server on `port`.
fn tls_lines(opts: &RedisOpts, port: u16) -> String {
    match &opts.tls {
        None => format!("port {port}\n"),
        Some(pki) => format!(
            "port 0\ntls-port {port}\ntls-cert-file {}\ntls-key-file {}\ntls-ca-cert-file {}\n\
             tls-auth-clients {}\ntls-replication yes\ntls-cluster yes\n",
            pki.join("node.pem").display(),
            pki.join("node.key").display(),
            pki.join("ca.pem").display(),
            opts.tls_auth_clients.unwrap_or("optional"),
        ),
    }
}

/// A primary, its replicas and three Sentinels watching it as
/// `mymaster` (quorum 2, one second to call a server down).
pub struct SentinelSet {
    pub primary: RedisServer,
    pub replicas: Vec<RedisServer>,
    pub sentinels: Vec<RedisServer>,
}

/// The name the Sentinels monitor the primary by.
pub const MASTER_NAME: &str = "mymaster";

impl SentinelSet {
    /// # Panics
    ///
    /// When a server does not start, or the Sentinels do not see every
    /// replica within 30 s.
    #[must_use]
    pub fn start(tag: &str, replicas: usize, opts: &RedisOpts) -> SentinelSet {
        let password = format!("admin-{}", rand_u32());
        let primary = RedisServer::start_with_password(tag, opts.clone(), &password);
        let replicas: Vec<RedisServer> = (0..replicas)
            .map(|_| RedisServer::replica_of(tag, &primary, opts.clone()))
            .collect();
        let sentinels = (0..3)
            .map(|_| {
                let port = free_port();
                let dir = std::env::temp_dir().join(format!(
                    "rekey-sentinel-{tag}-{}-{port}",
                    std::process::id()
                ));
                std::fs::create_dir_all(&dir).expect("create the Sentinel's directory");
                let conf = format!(
                    "bind 127.0.0.1\ndir {}\nlogfile {}\n{}\
                     sentinel monitor {MASTER_NAME} 127.0.0.1 {} 2\n\
                     sentinel auth-user {MASTER_NAME} {REDIS_ADMIN}\n\
                     sentinel auth-pass {MASTER_NAME} {password}\n\
                     sentinel down-after-milliseconds {MASTER_NAME} 1000\n\
                     sentinel failover-timeout {MASTER_NAME} 10000\n",
                    dir.display(),
                    dir.join("log").display(),
                    tls_lines(opts, port),
                    primary.port,
                );
                let config = dir.join("sentinel.conf");
                std::fs::write(&config, conf).expect("write sentinel.conf");
                let mut s = RedisServer {
                    port,
                    admin_password: String::new(),
                    opts: opts.clone(),
                    dir,
                    config,
                    child: None,
                    sentinel: true,
                };
                s.run();
                s
            })
            .collect();
        let set = SentinelSet {
            primary,
            replicas,
            sentinels,
        };
        let want = set.replicas.len();
        wait_for(
            "every Sentinel sees every replica",
            Duration::from_secs(30),
            || {
                set.sentinels.iter().all(|s| {
                    s.sentinel_cli(&["SENTINEL", "REPLICAS", MASTER_NAME])
                        .lines()
                        .filter(|l| *l == "flags")
                        .count()
                        == want
                })
            },
        );
        set
    }

    /// The Sentinels' addresses.
    #[must_use]
    pub fn sentinel_addrs(&self) -> Vec<String> {
        self.sentinels.iter().map(RedisServer::addr).collect()
    }

    /// The primary's port as the Sentinels see it now.
    #[must_use]
    pub fn primary_port(&self) -> u16 {
        let out =
            self.sentinels[0].sentinel_cli(&["SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER_NAME]);
        out.lines()
            .nth(1)
            .and_then(|p| p.parse().ok())
            .expect("the Sentinels name a primary")
    }

    /// Every data server: primary first, then the replicas.
    pub fn servers(&self) -> impl Iterator<Item = &RedisServer> {
        std::iter::once(&self.primary).chain(&self.replicas)
    }
}

impl RedisServer {
    /// `redis-cli` to a Sentinel (no user; TLS as its server has it).
    ///
    /// # Panics
    ///
    /// When `redis-cli` cannot run.
    #[must_use]
    pub fn sentinel_cli(&self, args: &[&str]) -> String {
        self.cli_as("", "", args)
    }
}

/// A Redis Cluster of `primaries` primaries with `replicas` replicas each,
/// made with `redis-cli --cluster create`.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// # Panics
    ///
    /// When a node does not start or the cluster does not become `ok`
    /// within 60 s.
    #[must_use]
    pub fn start(tag: &str, primaries: usize, replicas: usize, extra: &str) -> RedisCluster {
        let password = format!("admin-{}", rand_u32());
        let nodes: Vec<RedisServer> = (0..primaries * (1 + replicas))
            .map(|_| {
                RedisServer::start_with_password(
                    tag,
                    RedisOpts {
                        cluster: true,
                        extra: extra.to_string(),
                        ..RedisOpts::default()
                    },
                    &password,
                )
            })
            .collect();
        let addrs: Vec<String> = nodes.iter().map(RedisServer::addr).collect();
        let o = Command::new("redis-cli")
            .args([
                "--user",
                REDIS_ADMIN,
                "--pass",
                &password,
                "--no-auth-warning",
            ])
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .output()
            .expect("redis-cli --cluster create");
        assert!(
            o.status.success(),
            "redis-cli --cluster create: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        let c = RedisCluster { nodes };
        c.wait_ok();
        c
    }

    /// Waits until every node says `cluster_state:ok` and knows every
    /// other node.
    ///
    /// # Panics
    ///
    /// When that takes over 60 s.
    pub fn wait_ok(&self) {
        let n = self.nodes.len();
        wait_for("the cluster to be ok", Duration::from_secs(60), || {
            self.nodes.iter().all(|node| {
                let info = node.cli(&["CLUSTER", "INFO"]);
                info.contains("cluster_state:ok")
                    && info.contains(&format!("cluster_known_nodes:{n}"))
            })
        });
    }

    /// The nodes' addresses.
    #[must_use]
    pub fn addrs(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::addr).collect()
    }

    /// A node that is a replica now.
    ///
    /// # Panics
    ///
    /// When there is none.
    #[must_use]
    pub fn a_replica(&mut self) -> &mut RedisServer {
        self.nodes
            .iter_mut()
            .find(|n| n.cli(&["ROLE"]).starts_with("slave"))
            .expect("a replica")
    }
}

/// The directory of certificates for TLS Redis: [`crate::server_pki`]'s
/// CA, a node certificate `node.pem` / `node.key` for localhost and
/// 127.0.0.1 that serves and also shows itself as a client (replicas and
/// Sentinels connect to primaries with it), and a client certificate
/// `client.pem` / `client.key`.
///
/// # Panics
///
/// When `openssl` fails.
pub fn redis_pki(dir: &Path) {
    crate::server_pki(dir);
    crate::issue_cert(
        dir,
        "node",
        "/CN=localhost",
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n",
    );
    crate::issue_cert(
        dir,
        "client",
        "/CN=rekey-redis-client",
        "extendedKeyUsage=clientAuth\n",
    );
}

/// `redis_app.py` under load (the real redis-py client): writes through
/// the primary and reads from replicas with the credential a sidecar
/// writes, switching when it changes.
pub struct RedisApp {
    child: Child,
    lines: std::sync::mpsc::Receiver<String>,
    stop: PathBuf,
    stderr: PathBuf,
}

impl RedisApp {
    /// Starts the app with `config` (see `redis_app.py`; `stop` is set
    /// here) and waits until a write and a read succeeded.
    ///
    /// # Panics
    ///
    /// When it does not get that far within 60 s (with its stderr).
    #[must_use]
    pub fn start(dir: &Path, mut config: serde_json::Value) -> RedisApp {
        use std::io::BufRead as _;
        let stop = dir.join(format!("redis-app-stop-{}", rand_u32()));
        let stderr = dir.join(format!("redis-app-{}.log", rand_u32()));
        config["stop"] = serde_json::json!(stop.display().to_string());
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("redis_app.py");
        let mut child = Command::new(crate::tool_binary("python3", "REKEY_PYTHON"))
            .arg(script)
            .arg(config.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr).expect("the app's log"))
            .spawn()
            .expect("start redis_app.py");
        let out = child.stdout.take().expect("stdout");
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for l in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        let app = RedisApp {
            child,
            lines,
            stop,
            stderr,
        };
        match app.lines.recv_timeout(Duration::from_secs(60)) {
            Ok(l) if l == "started" => app,
            other => panic!(
                "redis_app.py did not start ({other:?}): {}",
                std::fs::read_to_string(&app.stderr).unwrap_or_default()
            ),
        }
    }

    /// Stops it; its summary: `ok`, `failed`, `errors`, `by_password`.
    ///
    /// # Panics
    ///
    /// When it prints no summary within 30 s.
    #[must_use]
    pub fn stop(mut self) -> serde_json::Value {
        std::fs::write(&self.stop, "").expect("write the stop file");
        let line = self
            .lines
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| {
                panic!(
                    "redis_app.py printed no summary: {}",
                    std::fs::read_to_string(&self.stderr).unwrap_or_default()
                )
            });
        let _ = self.child.wait();
        serde_json::from_str(&line).expect("the summary is JSON")
    }
}

impl Drop for RedisApp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
