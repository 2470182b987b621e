//! Benchmark of rotation time per kind, measured against the real
//! `rekey-backend` binary (SQLite store) from a gRPC client on the same
//! machine.
//!
//! Kinds: `random` (32 bytes, hex), `encryption-key` (generated), `static`
//! (a new 32-byte hex value supplied with each Rotate), `postgres` (a private
//! PostgreSQL server with password authentication, created with `initdb` by
//! the harness: a group role `app_owner` owning database `appdb`), `redis`
//! (an ACL user created with `redis-cli` on the machine's Redis at
//! 127.0.0.1:6379 and deleted at the end) and `exec` (four hooks, each a
//! `/bin/sh` script that reads its input with the shell's `read` and prints
//! JSON: `create` prints a string, the others `{}`).
//!
//! 1. Rotation time: one backend (default settings), one secret per kind
//!    with a 30-minute validation window. Per kind, a few warm-up rotations
//!    that are not counted, then N rotations, each the client-side time of
//!    one Rotate call (create, set, test, finish). A kind the backend rotates
//!    one at a time until previous is decommissioned (`encryption-key`,
//!    `postgres`, `redis`, `exec`: it refuses the second Rotate, which the
//!    program notices during the warm-up) has previous revoked after each
//!    rotation with Revoke {force: true, reason}; that call is timed apart
//!    and not counted in the rotation time. The backend's own step times
//!    (`rekey_rotation_step_seconds`, read from `/metrics` before and after
//!    the measured rotations) give the mean of each step.
//! 2. Whole cycle through decommission: a second backend with
//!    `[scheduler] tick = "10ms"` (REKEY_BENCH_TICK_MS), one secret per kind
//!    with a validation window of 0. Per kind, one warm-up cycle, then M
//!    cycles, each from just before Rotate is sent until the previous
//!    version is revoked by the backend's own decommission (polled with
//!    GetSecret on that version every 1 ms); the next cycle starts only then.
//!    The audit log must show one `revoke` by `decommission` per cycle. An
//!    `encryption-key` is decommissioned only once re-encryption to current
//!    has been reported finished: as soon as Rotate returns, the program
//!    reports it (ReportReencryption, 0 rows, finished), as a re-encryption
//!    leader with no rows to move would; that call is part of the cycle. A
//!    kind whose decommission is still held back 2 s after Rotate returned
//!    by a re-encryption blocker is shown with that blocker.
//!
//! After each part, for `postgres` and `redis`: the current credential logs
//! in and the last revoked one is refused.
//!
//! Run (release build): `cargo bench -p rekey-e2e --bench kinds`
//!
//! Environment overrides (defaults in brackets):
//! `REKEY_BENCH_KIND_ROTATIONS` (50) measured rotations per kind,
//! `REKEY_BENCH_CYCLES` (20) measured decommission cycles per kind,
//! `REKEY_BENCH_KINDS` (random,encryption-key,static,postgres,redis,exec)
//! the kinds to run, comma-separated,
//! `REKEY_BENCH_TICK_MS` (10) the scheduler tick of the second backend.
//! A quick smoke run:
//! `REKEY_BENCH_KIND_ROTATIONS=5 REKEY_BENCH_CYCLES=3 cargo bench -p rekey-e2e --bench kinds`
//!
//! The program prints tables and exits 0, or prints what failed and exits
//! non-zero. Every wait is bounded; the backends, the private Postgres server
//! and the Redis users are removed when it ends.

use rekey_testkit::bench::{Stats, Table, env_usize, ms, stats, stats_cells};

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use rekey_proto::v1 as pb;
use rekey_testkit::{Backend, BackendOpts, Client, PgServer, TempDir};
use tokio::time::timeout;

const KINDS: [&str; 6] = [
    "random",
    "encryption-key",
    "static",
    "postgres",
    "redis",
    "exec",
];
/// Rotations per kind made before the measured ones (not counted).
const ROTATE_WARMUP: usize = 3;
/// Decommission cycles per kind made before the measured ones (checked,
/// not counted).
const CYCLE_WARMUP: usize = 1;
/// Bound on one unary call.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on one decommission after the Rotate call returned.
const DECOMMISSION_TIMEOUT: Duration = Duration::from_secs(20);
/// After this long without decommission, the blockers are read: one that no
/// time resolves (re-encryption) ends the kind's cycles.
const BLOCKED_AFTER: Duration = Duration::from_secs(2);
/// Pause between two polls of the previous version.
const POLL_INTERVAL: Duration = Duration::from_millis(1);
/// Bound on a login check and on each `redis-cli` run.
const CHECK_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on the whole program.
const OVERALL_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// Validation window of the rotation-time secrets: nothing is decommissioned
/// on its own during that part.
const VALIDATION_WINDOW_MS: i64 = 30 * 60 * 1000;
/// Where the machine's Redis listens (the default user may do everything).
const REDIS_ADDR: &str = "127.0.0.1:6379";
/// The group role and database of the private Postgres server.
const PG_GROUP: &str = "app_owner";
const PG_DB: &str = "appdb";

struct Settings {
    rotations: usize,
    cycles: usize,
    kinds: Vec<&'static str>,
    tick_ms: usize,
}

impl Settings {
    fn from_env() -> Result<Self> {
        let kinds = match std::env::var("REKEY_BENCH_KINDS") {
            Err(_) => KINDS.to_vec(),
            Ok(s) => {
                let mut out = Vec::new();
                for p in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                    let k = KINDS.iter().copied().find(|k| *k == p).ok_or_else(|| {
                        anyhow!(
                            "REKEY_BENCH_KINDS={s:?}: unknown kind {p:?} (expected some of {})",
                            KINDS.join(",")
                        )
                    })?;
                    if !out.contains(&k) {
                        out.push(k);
                    }
                }
                ensure!(!out.is_empty(), "REKEY_BENCH_KINDS={s:?}: no kind");
                out
            }
        };
        Ok(Settings {
            rotations: env_usize("REKEY_BENCH_KIND_ROTATIONS", 50, 1)?,
            cycles: env_usize("REKEY_BENCH_CYCLES", 20, 1)?,
            kinds,
            tick_ms: env_usize("REKEY_BENCH_TICK_MS", 10, 1)?,
        })
    }
}

fn main() {
    rekey_testkit::bench::main_with(Settings::from_env(), OVERALL_TIMEOUT, |s| async move {
        run(&s).await
    });
}

// ---------------------------------------------------------------- statistics

// ------------------------------------------------------------------ helpers

fn progress(msg: &str) {
    eprintln!("[bench] {msg}");
}

/// Whether a Rotate failed because previous is not decommissioned yet (a
/// kind the backend rotates one at a time).
fn refused_for_previous(e: &anyhow::Error) -> bool {
    e.downcast_ref::<tonic::Status>().is_some_and(|s| {
        s.code() == tonic::Code::FailedPrecondition
            && s.message().contains("not decommissioned yet")
    })
}

/// `n` random bytes as hex, from /dev/urandom.
fn random_hex(n: usize) -> Result<String> {
    use std::io::Read;
    let mut b = vec![0u8; n];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .context("cannot read /dev/urandom")?;
    Ok(hex::encode(b))
}

fn write_exec(path: &Path, body: &str) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, format!("#!/bin/sh\n{body}\n"))
        .with_context(|| format!("cannot write {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))
        .with_context(|| format!("cannot make {} executable", path.display()))
}

/// Runs `redis-cli` against the machine's Redis (bounded by `timeout`);
/// its trimmed stdout.
fn redis_cli(args: &[&str]) -> Result<String> {
    let (host, port) = REDIS_ADDR.split_once(':').unwrap_or((REDIS_ADDR, "6379"));
    let o = std::process::Command::new("timeout")
        .arg(CHECK_TIMEOUT.as_secs().to_string())
        .args(["redis-cli", "-h", host, "-p", port])
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .context("cannot run redis-cli")?;
    ensure!(
        o.status.success(),
        "redis-cli {:?} failed ({}): {}",
        args.first().copied().unwrap_or_default(),
        o.status,
        String::from_utf8_lossy(&o.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&o.stdout).trim().to_string())
}

/// ACL users created for the run; deleted when dropped.
struct RedisUsers(Vec<String>);

impl RedisUsers {
    fn create(&mut self, name: &str) -> Result<()> {
        // Permissions only; rekey manages the passwords.
        let out = redis_cli(&["ACL", "SETUSER", name, "on", "~*", "+@all"])?;
        ensure!(out == "OK", "ACL SETUSER {name} answered {out:?}");
        self.0.push(name.to_string());
        Ok(())
    }
}

impl Drop for RedisUsers {
    fn drop(&mut self) {
        if self.0.is_empty() {
            return;
        }
        let mut args = vec!["ACL", "DELUSER"];
        args.extend(self.0.iter().map(String::as_str));
        match redis_cli(&args) {
            Ok(n) => progress(&format!("deleted {n} Redis ACL user(s)")),
            Err(e) => eprintln!("[bench] cannot delete the Redis users {:?}: {e:#}", self.0),
        }
    }
}

/// What the secrets of each kind need: hook scripts, admin URL files, the
/// private Postgres server and the Redis users.
struct Fixtures {
    dir: TempDir,
    pg: Option<PgServer>,
    redis: RedisUsers,
}

impl Fixtures {
    async fn new(kinds: &[&str]) -> Result<Fixtures> {
        let dir = TempDir::new("bench-kinds-fixtures");
        let read_stdin = "while read -r _; do :; done";
        for (name, out) in [
            ("create", r#"printf '"bench-%s"\n' "$$""#),
            ("set", "echo '{}'"),
            ("test", "echo '{}'"),
            ("revoke", "echo '{}'"),
        ] {
            write_exec(&dir.path().join(name), &format!("{read_stdin}\n{out}"))?;
        }
        std::fs::write(
            dir.path().join("redis-admin-url"),
            format!("redis://{REDIS_ADDR}"),
        )
        .context("cannot write the Redis admin URL file")?;
        let pg = if kinds.contains(&"postgres") {
            progress("starting a private PostgreSQL server (initdb, password authentication)");
            // The harness panics (with the server's output) when a step
            // fails; the task turns that into an error.
            let pg = tokio::task::spawn_blocking(|| PgServer::start("bench-kinds"))
                .await
                .map_err(|_| anyhow!("the private PostgreSQL server did not start"))?;
            for (db, sql) in [
                ("postgres", format!("CREATE ROLE {PG_GROUP} NOLOGIN")),
                (
                    "postgres",
                    format!("CREATE DATABASE {PG_DB} OWNER {PG_GROUP}"),
                ),
                (
                    PG_DB,
                    format!(
                        "SET ROLE {PG_GROUP}; CREATE TABLE items (id int); INSERT INTO items VALUES (1)"
                    ),
                ),
            ] {
                pg_admin_sql(&pg, db, &sql)
                    .await
                    .with_context(|| format!("private Postgres: {sql}"))?;
            }
            std::fs::write(dir.path().join("pg-admin-url"), pg.admin_url(PG_DB))
                .context("cannot write the Postgres admin URL file")?;
            Some(pg)
        } else {
            None
        };
        Ok(Fixtures {
            dir,
            pg,
            redis: RedisUsers(Vec::new()),
        })
    }

    fn file(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }

    /// The CreateSecret request of `kind` for secret `part/kind`.
    fn create_request(
        &mut self,
        kind: &str,
        part: &str,
        window_ms: i64,
    ) -> Result<pb::CreateSecretRequest> {
        let mut r = pb::CreateSecretRequest {
            id: format!("bench/{part}/{kind}"),
            kind: kind.into(),
            validation_window_ms: Some(window_ms),
            ..Default::default()
        };
        match kind {
            "random" => {
                r.random = Some(pb::RandomOptions {
                    length: 32,
                    encoding: "hex".into(),
                })
            }
            "encryption-key" => {}
            "static" => r.value = Some(static_value()?),
            "postgres" => {
                r.postgres = Some(pb::PostgresOptions {
                    admin_url_file: self.file("pg-admin-url"),
                    group_role: PG_GROUP.into(),
                    role_base: format!("bench_{part}"),
                    database: PG_DB.into(),
                    ..Default::default()
                })
            }
            "redis" => {
                let user = format!("rk_bench_{}_{part}", std::process::id());
                self.redis.create(&user)?;
                r.redis = Some(pb::RedisOptions {
                    admin_url_file: self.file("redis-admin-url"),
                    username: user,
                    ..Default::default()
                })
            }
            "exec" => {
                r.exec = Some(pb::ExecOptions {
                    create: self.file("create"),
                    set: self.file("set"),
                    test: self.file("test"),
                    revoke: self.file("revoke"),
                    timeout_ms: 10_000,
                })
            }
            other => bail!("unknown kind {other}"),
        }
        Ok(r)
    }
}

/// Runs SQL as the private server's superuser (bounded).
async fn pg_admin_sql(pg: &PgServer, db: &str, sql: &str) -> Result<()> {
    use sqlx::Connection;
    timeout(CHECK_TIMEOUT, async {
        let mut c = sqlx::PgConnection::connect(&pg.admin_url(db)).await?;
        sqlx::raw_sql(sql).execute(&mut c).await?;
        c.close().await
    })
    .await
    .context("timed out")?
    .map_err(|e| anyhow!("{e}"))
}

/// A new value for the `static` kind.
fn static_value() -> Result<pb::SecretValue> {
    Ok(pb::SecretValue {
        value: Some(pb::secret_value::Value::Raw(random_hex(32)?.into_bytes())),
    })
}

async fn connect(b: &Backend) -> Result<Client> {
    timeout(Duration::from_secs(10), b.client())
        .await
        .with_context(|| format!("connecting to {} timed out", b.grpc))
}

async fn create(c: &mut Client, req: pb::CreateSecretRequest) -> Result<u64> {
    let id = req.id.clone();
    let r = timeout(CALL_TIMEOUT, c.create_secret(req))
        .await
        .with_context(|| format!("CreateSecret {id} timed out"))?
        .with_context(|| format!("CreateSecret {id} failed"))?
        .into_inner();
    Ok(r.version
        .context("CreateSecret returned no version")?
        .version)
}

struct Rotated {
    version: u64,
    previous: u64,
    /// The backend's finish time (last_rotated_at_ms).
    finished_at_ms: i64,
    took: Duration,
}

/// One Rotate call (with a supplied value for `static`), timed on the
/// client.
async fn rotate(c: &mut Client, kind: &str, id: &str) -> Result<Rotated> {
    let value = if kind == "static" {
        Some(static_value()?)
    } else {
        None
    };
    let started = Instant::now();
    let r = timeout(
        CALL_TIMEOUT,
        c.rotate(pb::RotateRequest {
            secret_id: id.into(),
            value,
            ..Default::default()
        }),
    )
    .await
    .context("Rotate timed out")?
    .context("Rotate failed")?
    .into_inner();
    let took = started.elapsed();
    let s = r.secret.context("Rotate returned no secret")?;
    Ok(Rotated {
        version: r.version.context("Rotate returned no version")?.version,
        previous: s.previous_version,
        finished_at_ms: s.last_rotated_at_ms,
        took,
    })
}

/// Revoke {force: true, reason}; the client-side time.
async fn force_revoke(c: &mut Client, id: &str, version: u64) -> Result<Duration> {
    let started = Instant::now();
    timeout(
        CALL_TIMEOUT,
        c.revoke(pb::RevokeRequest {
            secret_id: id.into(),
            version,
            force: true,
            reason: "benchmark: rotation time is measured one rotation at a time".into(),
        }),
    )
    .await
    .context("Revoke timed out")?
    .context("Revoke failed")?;
    Ok(started.elapsed())
}

/// One version's metadata, and the secret's.
async fn get_version(c: &mut Client, id: &str, version: u64) -> Result<(pb::Secret, pb::Version)> {
    let r = timeout(
        CALL_TIMEOUT,
        c.get_secret(pb::GetSecretRequest {
            secret_id: id.into(),
            selector: Some(pb::get_secret_request::Selector::Version(version)),
            reveal: false,
        }),
    )
    .await
    .context("GetSecret timed out")?
    .context("GetSecret failed")?
    .into_inner();
    Ok((
        r.secret.context("GetSecret returned no secret")?,
        r.version.context("GetSecret returned no version")?,
    ))
}

/// The fields of the current value (structured kinds).
async fn reveal_fields(c: &mut Client, id: &str) -> Result<BTreeMap<String, String>> {
    let r = timeout(
        CALL_TIMEOUT,
        c.get_secret(pb::GetSecretRequest {
            secret_id: id.into(),
            selector: Some(pb::get_secret_request::Selector::Stage(
                pb::Stage::Current as i32,
            )),
            reveal: true,
        }),
    )
    .await
    .context("GetSecret timed out")?
    .context("GetSecret failed")?
    .into_inner();
    match r
        .version
        .and_then(|v| v.value)
        .and_then(|v| v.value)
        .context("GetSecret returned no value")?
    {
        pb::secret_value::Value::Fields(f) => Ok(f.fields.into_iter().collect()),
        pb::secret_value::Value::Raw(_) => bail!("{id} holds raw bytes, expected fields"),
    }
}

/// Reports re-encryption to `version` finished, with no rows to move.
async fn report_reencrypted(c: &mut Client, id: &str, version: u64) -> Result<()> {
    timeout(
        CALL_TIMEOUT,
        c.report_reencryption(pb::ReportReencryptionRequest {
            secret_id: id.into(),
            version,
            consumer_id: "bench-kinds".into(),
            rows_done: 0,
            rows_total: 0,
            rate: 0.0,
            finished: true,
            phase: "finished".into(),
        }),
    )
    .await
    .context("ReportReencryption timed out")?
    .context("ReportReencryption failed")?;
    Ok(())
}

async fn blockers(c: &mut Client, id: &str) -> Result<Vec<String>> {
    let r = timeout(
        CALL_TIMEOUT,
        c.get_status(pb::GetStatusRequest {
            secret_id: id.into(),
        }),
    )
    .await
    .context("GetStatus timed out")?
    .context("GetStatus failed")?
    .into_inner();
    Ok(r.secrets
        .into_iter()
        .next()
        .context("GetStatus returned no secret")?
        .decommission_blockers)
}

/// Revoke events of `id` in the audit log by `actor`.
async fn revokes_by(c: &mut Client, id: &str, actor: &str) -> Result<usize> {
    let r = timeout(
        CALL_TIMEOUT,
        c.list_audit(pb::ListAuditRequest {
            secret_id: id.into(),
            limit: 10_000,
            ..Default::default()
        }),
    )
    .await
    .context("ListAudit timed out")?
    .context("ListAudit failed")?
    .into_inner();
    Ok(r.events
        .iter()
        .filter(|e| e.action == "revoke" && e.actor == actor && e.outcome == "ok")
        .count())
}

/// `rekey_rotation_step_seconds` per step: (sum s, count).
async fn step_totals(addr: &str) -> Result<BTreeMap<String, (f64, f64)>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let body = timeout(Duration::from_secs(10), async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(
            format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await?;
        let mut out = String::new();
        s.read_to_string(&mut out).await?;
        Ok::<_, std::io::Error>(out)
    })
    .await
    .context("metrics request timed out")?
    .with_context(|| format!("cannot read metrics from {addr}"))?;
    let mut out: BTreeMap<String, (f64, f64)> = BTreeMap::new();
    for l in body.lines() {
        for (suffix, sum) in [("_sum{step=\"", true), ("_count{step=\"", false)] {
            let Some(rest) = l.strip_prefix(&format!("rekey_rotation_step_seconds{suffix}")) else {
                continue;
            };
            let Some((step, v)) = rest.split_once("\"} ") else {
                continue;
            };
            let v: f64 = v
                .trim()
                .parse()
                .with_context(|| format!("unexpected metrics line {l:?}"))?;
            let e = out.entry(step.to_string()).or_default();
            if sum {
                e.0 = v;
            } else {
                e.1 = v;
            }
        }
    }
    Ok(out)
}

/// Mean ms of each step between two snapshots.
fn step_means(
    before: &BTreeMap<String, (f64, f64)>,
    after: &BTreeMap<String, (f64, f64)>,
) -> BTreeMap<String, f64> {
    after
        .iter()
        .filter_map(|(k, (s1, c1))| {
            let (s0, c0) = before.get(k).copied().unwrap_or_default();
            (c1 > &c0).then(|| (k.clone(), (s1 - s0) / (c1 - c0) * 1e3))
        })
        .collect()
}

/// Whether `user` / `password` authenticates at the machine's Redis.
async fn redis_auth(user: &str, password: &str) -> Result<bool> {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    timeout(CHECK_TIMEOUT, async {
        let mut s = tokio::net::TcpStream::connect(REDIS_ADDR).await?;
        let mut req = String::from("*3\r\n$4\r\nAUTH\r\n");
        for a in [user, password] {
            req.push_str(&format!("${}\r\n{a}\r\n", a.len()));
        }
        s.write_all(req.as_bytes()).await?;
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line).await?;
        Ok::<_, std::io::Error>(line.starts_with("+OK"))
    })
    .await
    .context("Redis AUTH timed out")?
    .with_context(|| format!("cannot talk to Redis at {REDIS_ADDR}"))
}

/// For `postgres` and `redis`: `new` logs in, `old` (a revoked version's
/// value) is refused.
async fn check_logins(
    f: &Fixtures,
    kind: &str,
    old: &BTreeMap<String, String>,
    new: &BTreeMap<String, String>,
) -> Result<()> {
    let get = |m: &BTreeMap<String, String>, k: &str| -> Result<String> {
        m.get(k)
            .cloned()
            .with_context(|| format!("the {kind} value lacks {k}"))
    };
    let (ou, op) = (get(old, "username")?, get(old, "password")?);
    let (nu, np) = (get(new, "username")?, get(new, "password")?);
    match kind {
        "postgres" => {
            let pg = f.pg.as_ref().context("no Postgres server")?;
            let login = |u: String, p: String| async move {
                timeout(CHECK_TIMEOUT, pg.login(&u, &p, PG_DB))
                    .await
                    .map_err(|_| "timed out".to_string())
                    .and_then(|r| r)
            };
            if let Err(e) = login(nu.clone(), np).await {
                bail!("the current credential ({nu}) cannot log in: {e}");
            }
            ensure!(
                login(ou.clone(), op).await.is_err(),
                "the revoked credential ({ou}) still logs in"
            );
        }
        "redis" => {
            ensure!(
                redis_auth(&nu, &np).await?,
                "the current password of {nu} is refused"
            );
            ensure!(
                !redis_auth(&ou, &op).await?,
                "a revoked password of {ou} is still accepted"
            );
        }
        _ => {}
    }
    Ok(())
}

fn has_credentials(kind: &str) -> bool {
    matches!(kind, "postgres" | "redis")
}

// ------------------------------------------------------- 1. rotation time

struct KindRotations {
    kind: &'static str,
    /// The backend refused a rotation while previous was active.
    serial: bool,
    rotate: Stats,
    /// Forced revokes between rotations (one-at-a-time kinds).
    revoke: Option<Stats>,
    /// Backend step means in ms (create, set, test, finish, revoke).
    steps: BTreeMap<String, f64>,
}

async fn rotation_time(
    b: &Backend,
    f: &mut Fixtures,
    kind: &'static str,
    n: usize,
) -> Result<KindRotations> {
    let mut c = connect(b).await?;
    let req = f.create_request(kind, "rotate", VALIDATION_WINDOW_MS)?;
    let id = req.id.clone();
    let mut version = create(&mut c, req).await?;
    let mut previous = 0;
    let mut serial = false;
    let mut old_value = None;
    let mut samples = Vec::with_capacity(n);
    let mut revokes = Vec::new();
    let mut before = BTreeMap::new();
    let total = ROTATE_WARMUP + n;
    for i in 0..total {
        if i == ROTATE_WARMUP {
            before = step_totals(&b.metrics).await?;
        }
        if i + 1 == total && has_credentials(kind) {
            old_value = Some(reveal_fields(&mut c, &id).await?);
        }
        let r = match rotate(&mut c, kind, &id).await {
            Ok(r) => r,
            Err(e) if !serial && refused_for_previous(&e) => {
                // The backend rotates this kind one at a time: revoke
                // previous (forced) after each rotation from now on.
                serial = true;
                progress(&format!(
                    "{kind}: rotates one at a time; previous is revoked (forced) between rotations"
                ));
                force_revoke(&mut c, &id, previous)
                    .await
                    .with_context(|| format!("forced revoke of v{previous} of {id}"))?;
                rotate(&mut c, kind, &id)
                    .await
                    .with_context(|| format!("rotation {} of {id}", i + 1))?
            }
            Err(e) => return Err(e.context(format!("rotation {} of {id}", i + 1))),
        };
        ensure!(
            r.version == version + 1 && r.previous == version,
            "rotation {} of {id}: v{} with previous v{}, expected v{} with previous v{version}",
            i + 1,
            r.version,
            r.previous,
            version + 1
        );
        previous = r.previous;
        if serial {
            let t = force_revoke(&mut c, &id, previous)
                .await
                .with_context(|| format!("forced revoke of v{previous} of {id}"))?;
            if i >= ROTATE_WARMUP {
                revokes.push(t);
            }
        }
        version = r.version;
        if i >= ROTATE_WARMUP {
            samples.push(r.took);
        }
        if (i + 1) % 10 == 0 || i + 1 == total {
            progress(&format!(
                "{kind}: rotation {}/{total} to v{version}: {} ms",
                i + 1,
                ms(r.took)
            ));
        }
    }
    let after = step_totals(&b.metrics).await?;
    if let Some(old) = old_value {
        let new = reveal_fields(&mut c, &id).await?;
        check_logins(f, kind, &old, &new)
            .await
            .with_context(|| format!("{id} after the rotations"))?;
    }
    Ok(KindRotations {
        kind,
        serial,
        rotate: stats(samples),
        revoke: (!revokes.is_empty()).then(|| stats(revokes)),
        steps: step_means(&before, &after),
    })
}

// ------------------------------------------ 2. cycle through decommission

struct CycleStats {
    /// Rotate sent -> previous revoked (seen by the client).
    whole: Stats,
    /// Rotate returned -> previous revoked (seen by the client).
    after_return: Stats,
    /// finish -> revoked on the backend's clock (whole ms).
    backend: Stats,
    polls_per_cycle: f64,
}

enum Cycles {
    Measured(Box<CycleStats>),
    /// Decommission waits for something no time brings.
    Blocked {
        blockers: Vec<String>,
    },
}

struct KindCycles {
    kind: &'static str,
    cycles: Cycles,
}

async fn decommission_cycles(
    b: &Backend,
    f: &mut Fixtures,
    kind: &'static str,
    m: usize,
) -> Result<KindCycles> {
    let mut c = connect(b).await?;
    let req = f.create_request(kind, "cycle", 0)?;
    let id = req.id.clone();
    let mut version = create(&mut c, req).await?;
    let mut whole = Vec::with_capacity(m);
    let mut after_return = Vec::with_capacity(m);
    let mut backend = Vec::with_capacity(m);
    let mut polls = 0u64;
    let mut old_value = None;
    let total = CYCLE_WARMUP + m;
    for i in 0..total {
        if i + 1 == total && has_credentials(kind) {
            old_value = Some(reveal_fields(&mut c, &id).await?);
        }
        let old = version;
        let t0 = Instant::now();
        let r = rotate(&mut c, kind, &id)
            .await
            .with_context(|| format!("cycle {} of {id}", i + 1))?;
        let returned = Instant::now();
        ensure!(
            r.version == old + 1,
            "cycle {} of {id}: Rotate returned v{}, expected v{}",
            i + 1,
            r.version,
            old + 1
        );
        version = r.version;
        if kind == "encryption-key" {
            report_reencrypted(&mut c, &id, version)
                .await
                .with_context(|| format!("cycle {} of {id}", i + 1))?;
        }
        let deadline = returned + DECOMMISSION_TIMEOUT;
        let mut checked_blockers = false;
        let mut n_polls = 0u64;
        let (revoked_at, revoked_at_ms) = loop {
            let (s, v) = get_version(&mut c, &id, old).await?;
            n_polls += 1;
            if v.state == pb::VersionState::Revoked as i32 {
                let at = Instant::now();
                ensure!(
                    s.previous_version == 0 && s.current_version == version,
                    "{id}: v{old} is revoked but the secret shows current v{} previous v{}",
                    s.current_version,
                    s.previous_version
                );
                break (at, v.revoked_at_ms);
            }
            let now = Instant::now();
            if !checked_blockers && now >= returned + BLOCKED_AFTER {
                checked_blockers = true;
                let bl = blockers(&mut c, &id).await?;
                if !bl.is_empty() && bl.iter().all(|b| b.contains("re-encryption")) {
                    progress(&format!(
                        "{kind}: v{old} is not decommissioned after {} s: {}",
                        BLOCKED_AFTER.as_secs(),
                        bl.join("; ")
                    ));
                    return Ok(KindCycles {
                        kind,
                        cycles: Cycles::Blocked { blockers: bl },
                    });
                }
            }
            if now > deadline {
                let bl = blockers(&mut c, &id).await.unwrap_or_default();
                bail!(
                    "cycle {} of {id}: v{old} was not decommissioned within {DECOMMISSION_TIMEOUT:?} after Rotate returned; blockers: {}",
                    i + 1,
                    if bl.is_empty() {
                        "none".to_string()
                    } else {
                        bl.join("; ")
                    }
                );
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        };
        let took = revoked_at - t0;
        if i >= CYCLE_WARMUP {
            whole.push(took);
            after_return.push(revoked_at - returned);
            backend.push(Duration::from_millis(
                (revoked_at_ms - r.finished_at_ms).max(0) as u64,
            ));
            polls += n_polls;
        }
        if (i + 1) % 5 == 0 || i + 1 == total {
            progress(&format!(
                "{kind}: cycle {}/{total} to v{version}: Rotate {} ms, previous revoked {} ms after Rotate was sent",
                i + 1,
                ms(r.took),
                ms(took)
            ));
        }
    }
    let by_backend = revokes_by(&mut c, &id, "decommission").await?;
    ensure!(
        by_backend == total,
        "{id}: the audit log shows {by_backend} revokes by decommission, expected {total}"
    );
    if let Some(old) = old_value {
        let new = reveal_fields(&mut c, &id).await?;
        check_logins(f, kind, &old, &new)
            .await
            .with_context(|| format!("{id} after the cycles"))?;
    }
    Ok(KindCycles {
        kind,
        cycles: Cycles::Measured(Box::new(CycleStats {
            whole: stats(whole),
            after_return: stats(after_return),
            backend: stats(backend),
            polls_per_cycle: polls as f64 / m as f64,
        })),
    })
}

// --------------------------------------------------------------------- run

async fn run(s: &Settings) -> Result<String> {
    let mut f = Fixtures::new(&s.kinds).await?;

    progress(&format!(
        "rotation time: {} rotations per kind after {ROTATE_WARMUP} warm-up",
        s.rotations
    ));
    let mut rot = Vec::new();
    {
        let dir = TempDir::new("bench-kinds-rotate");
        let b = Backend::start(dir.path(), BackendOpts::default());
        for &kind in &s.kinds {
            rot.push(
                rotation_time(&b, &mut f, kind, s.rotations)
                    .await
                    .with_context(|| format!("rotation time of {kind}"))?,
            );
        }
    }

    progress(&format!(
        "whole cycle through decommission: {} cycles per kind after {CYCLE_WARMUP} warm-up; scheduler tick {} ms",
        s.cycles, s.tick_ms
    ));
    let mut cyc = Vec::new();
    {
        let dir = TempDir::new("bench-kinds-cycle");
        let b = Backend::start(
            dir.path(),
            BackendOpts {
                extra_toml: format!("[scheduler]\ntick = \"{}ms\"\n", s.tick_ms),
                ..Default::default()
            },
        );
        for &kind in &s.kinds {
            cyc.push(
                decommission_cycles(&b, &mut f, kind, s.cycles)
                    .await
                    .with_context(|| format!("decommission cycles of {kind}"))?,
            );
        }
    }

    let mut out = String::new();
    out.push_str(&format!(
        "\nrekey rotation time per kind: client and backend (SQLite store) on one machine ({} CPUs)\n\n",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    ));
    out.push_str(&format!(
        "1. One Rotate call (create, set, test, finish), client side; {} rotations per kind after {ROTATE_WARMUP} warm-up; validation window 30 min\n",
        s.rotations
    ));
    let mut t = Table::stats("kind").right("one at a time");
    for k in &rot {
        t.row(
            std::iter::once(k.kind.to_string())
                .chain(stats_cells(&k.rotate))
                .chain([if k.serial { "yes" } else { "no" }.to_string()]),
        );
    }
    out.push_str(&t.render());
    out.push_str(
        "\nBackend step times during those rotations (rekey_rotation_step_seconds, mean ms), and the forced revoke between rotations (client side; not in the times above)\n",
    );
    let mut t = [
        "create",
        "set",
        "test",
        "finish",
        "revoke step",
        "Revoke p50 ms",
        "Revoke p99 ms",
    ]
    .iter()
    .fold(Table::new("kind"), |t, h| t.right(h));
    for k in &rot {
        let step = |name: &str| {
            k.steps
                .get(name)
                .map_or("-".to_string(), |v| format!("{v:.2}"))
        };
        let (p50, p99) = k
            .revoke
            .as_ref()
            .map_or(("-".to_string(), "-".to_string()), |r| {
                (ms(r.p50), ms(r.p99))
            });
        t.row([
            k.kind.to_string(),
            step("create"),
            step("set"),
            step("test"),
            step("finish"),
            step("revoke"),
            p50,
            p99,
        ]);
    }
    out.push_str(&t.render());
    out.push_str(&format!(
        "\n2. Rotate sent -> previous revoked by the backend's own decommission; validation window 0; scheduler tick {} ms; {} cycles per kind after {CYCLE_WARMUP} warm-up; GetSecret polled every {} ms\n",
        s.tick_ms,
        s.cycles,
        POLL_INTERVAL.as_millis()
    ));
    let mut t = ["ret p50", "ret p99", "be p50", "be p99", "polls"]
        .iter()
        .fold(Table::stats("kind"), |t, h| t.right(h));
    for k in &cyc {
        match &k.cycles {
            Cycles::Measured(c) => t.row(
                std::iter::once(k.kind.to_string())
                    .chain(stats_cells(&c.whole))
                    .chain([
                        ms(c.after_return.p50),
                        ms(c.after_return.p99),
                        c.backend.p50.as_millis().to_string(),
                        c.backend.p99.as_millis().to_string(),
                        format!("{:.1}", c.polls_per_cycle),
                    ]),
            ),
            Cycles::Blocked { blockers } => t.note(&format!(
                "{}: not decommissioned {} s after Rotate returned: {}",
                k.kind,
                BLOCKED_AFTER.as_secs(),
                blockers.join("; ")
            )),
        }
    }
    out.push_str(&t.render());
    out.push_str(
        "ret: Rotate returned -> previous revoked (client); be: finish -> revoked on the backend's clock (whole ms); polls: GetSecret calls per cycle\n",
    );
    out.push('\n');
    // `f` is dropped here: the Postgres server stops, the Redis users go.
    drop(f);
    Ok(out)
}
