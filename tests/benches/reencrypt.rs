//! Benchmark of re-encryption throughput: the real `rekey` binary's
//! `reencrypt` command (`rekey -o json reencrypt --column t.c --codec ...`,
//! with ENCRYPTION_MASTER_KEY_OLD, ENCRYPTION_MASTER_KEY_NEW and
//! DATABASE_URL in its environment) against a fresh database on the
//! machine's Postgres for every case.
//!
//! Every case uses one table `t (id bigint PRIMARY KEY, c text NOT NULL)`
//! with ids 1..=N; row i holds `sk-bench-<i, 10 digits>-<32 characters>`
//! (52 bytes) sealed under a random old key. The sealed values are made
//! once per codec in this program (`rekey_reencrypt::Codec::seal`, on one
//! thread per core) and written to each fresh database with multi-row
//! INSERTs, followed by `VACUUM (ANALYZE)` and `CHECKPOINT`, so every case of
//! a codec starts from the same rows and a quiet server.
//!
//! 1. PBKDF2: on the idle machine, the median of S single derivations
//!    (ring's PBKDF2-HMAC-SHA256, the envelope's 100,000 iterations, 64-byte
//!    salt, 32-byte key) after one warm-up, and S derivations on each of
//!    the cores at once. A hyvve row under the old key costs one derivation
//!    to open with the old key; sealing with the new one costs one per
//!    batch (`--salt per-batch`, the default), so this machine's limit is
//!    cores ÷ ((1 + 1/batch size) × the median). The row-at-a-time
//!    baseline seals each row under its own salt: two derivations a row.
//! 2. hyvve codec, N rows: `rekey reencrypt --codec hyvve` with the default
//!    batch size, timed from spawning the process until it exits. Then, on
//!    another fresh database with the same rows, a single-threaded,
//!    row-at-a-time baseline like the runbook's script, in this program
//!    with sqlx over one connection: read a batch of 200 rows (keyset), then
//!    for each row `hyvve::open` with the old key, `hyvve::seal` with the new
//!    key and `UPDATE t SET c = $1 WHERE id = $2`, one statement per row.
//!    Between the two, the same `rekey reencrypt` again on the first
//!    database, where every row is now under the new key (an interrupted
//!    run's re-run, or the sidecar's final sweep): it must report N already
//!    new.
//! 3. rekey codec, M rows: `rekey reencrypt --codec rekey` with the default
//!    batch size, `--batch-size 1000` and `--batch-size 5000`, each on a
//!    fresh database. Before each run, `EXPLAIN` (not executed) of the
//!    command's first batch write (the same UPDATE text as
//!    `rekey_reencrypt`'s) shows how Postgres plans it; during the run,
//!    `pg_stat_user_tables` counts the sequential scans of `t` and the rows
//!    they read.
//!
//! After every run the command's JSON must report N scanned, N rotated, 0
//! already new and 0 null, and every row must open with the new key to its
//! original plaintext (all rows are checked). CPU time: the re-encrypting
//! process's utime + stime (the `rekey` child's from this program's
//! cutime + cstime in `/proc/self/stat` once it has been waited for; the
//! baseline's from this program's own) and the whole machine's busy time
//! from `/proc/stat` over the same window (the rest is mostly Postgres).
//!
//! Run (release build): `cargo bench -p rekey-e2e --bench reencrypt`
//!
//! Environment overrides (defaults in brackets):
//! `REKEY_BENCH_HYVVE_ROWS` (2000) rows of the hyvve cases,
//! `REKEY_BENCH_REKEY_ROWS` (100000) rows of the rekey-codec cases,
//! `REKEY_BENCH_PBKDF2_SAMPLES` (9) derivations timed (and per core at once),
//! `REKEY_BENCH_BASELINE` (1) `0` skips the row-at-a-time baseline.
//! A quick smoke run:
//! `REKEY_BENCH_HYVVE_ROWS=40 REKEY_BENCH_REKEY_ROWS=2000 REKEY_BENCH_PBKDF2_SAMPLES=3 cargo bench -p rekey-e2e --bench reencrypt`
//!
//! Requirements: Postgres on 127.0.0.1:5432 that accepts user `postgres`
//! without a password (or `REKEY_TEST_PG_URL`), and `psql` on the `PATH`
//! (it drops each database). The program prints tables and exits 0, or
//! prints what failed and exits non-zero. Every wait is bounded; a `rekey`
//! process still running when a bound passes is killed.

use rekey_testkit::bench::{Table, env_usize};

use std::num::NonZeroU32;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use rekey_keyring::{MasterKey, hyvve};
use rekey_reencrypt::Codec;
use rekey_testkit::{CLI, PgDb};
use sqlx::Connection as _;
use tokio::time::timeout;

/// The command's default `--batch-size`.
const DEFAULT_BATCH: usize = 200;
/// The rekey-codec cases: the default, then explicit batch sizes.
const REKEY_BATCHES: [Option<usize>; 3] = [None, Some(1000), Some(5000)];
/// Rows the baseline reads per SELECT.
const BASELINE_BATCH: i64 = 200;
/// Rows per INSERT when seeding.
const SEED_CHUNK: usize = 5000;
/// Filler of every plaintext (after `sk-bench-<id>-`).
const FILL: &str = "0123456789abcdef0123456789abcdef";
/// Bound on one SQL step (seeding a chunk, VACUUM, reading the table).
const SQL_TIMEOUT: Duration = Duration::from_secs(300);
/// Bound on the whole program.
const OVERALL_TIMEOUT: Duration = Duration::from_secs(3 * 60 * 60);

struct Settings {
    hyvve_rows: usize,
    rekey_rows: usize,
    pbkdf2_samples: usize,
    baseline: bool,
}

impl Settings {
    fn from_env() -> Result<Self> {
        let baseline = match std::env::var("REKEY_BENCH_BASELINE").as_deref() {
            Err(_) | Ok("1") => true,
            Ok("0") => false,
            Ok(s) => bail!("REKEY_BENCH_BASELINE={s:?}: expected 0 or 1"),
        };
        Ok(Settings {
            hyvve_rows: env_usize("REKEY_BENCH_HYVVE_ROWS", 2000, 1)?,
            rekey_rows: env_usize("REKEY_BENCH_REKEY_ROWS", 100_000, 1)?,
            pbkdf2_samples: env_usize("REKEY_BENCH_PBKDF2_SAMPLES", 9, 1)?,
            baseline,
        })
    }
}

fn main() {
    rekey_testkit::bench::main_with(Settings::from_env(), OVERALL_TIMEOUT, |s| async move {
        run(&s).await
    });
}

// ------------------------------------------------------------------ helpers

fn progress(msg: &str) {
    eprintln!("[bench] {msg}");
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Runs `f` with a bound; `what` names it in the error.
async fn bounded<T, E>(
    what: &str,
    limit: Duration,
    f: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T>
where
    E: Into<anyhow::Error>,
{
    match timeout(limit, f).await {
        Ok(r) => r.map_err(Into::into).with_context(|| what.to_string()),
        Err(_) => bail!("{what}: no answer within {limit:?}"),
    }
}

fn plaintext(id: i64) -> String {
    format!("sk-bench-{id:010}-{FILL}")
}

/// Seconds per clock tick (`getconf CLK_TCK`, usually 100 per second).
fn tick_secs() -> f64 {
    let hz = std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .trim()
                .parse::<f64>()
                .ok()
        })
        .filter(|h| *h > 0.0)
        .unwrap_or(100.0);
    1.0 / hz
}

/// This program's (utime + stime, cutime + cstime) in clock ticks, from
/// `/proc/self/stat`; the second counts children that have been waited for.
fn self_cpu_ticks() -> Result<(u64, u64)> {
    let s = std::fs::read_to_string("/proc/self/stat").context("cannot read /proc/self/stat")?;
    let rest = s
        .rfind(')')
        .map(|i| &s[i + 1..])
        .ok_or_else(|| anyhow!("unexpected /proc/self/stat"))?;
    // Fields after the command name start with field 3 (state).
    let f: Vec<u64> = rest
        .split_whitespace()
        .skip(1)
        .take(15)
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    ensure!(f.len() == 15, "unexpected /proc/self/stat");
    // utime 14, stime 15, cutime 16, cstime 17 (field n is f[n - 4]).
    Ok((f[10] + f[11], f[12] + f[13]))
}

/// The machine's (busy, iowait) clock ticks over all CPUs, from `/proc/stat`.
fn machine_ticks() -> Result<(u64, u64)> {
    let s = std::fs::read_to_string("/proc/stat").context("cannot read /proc/stat")?;
    let line = s
        .lines()
        .find(|l| l.starts_with("cpu "))
        .ok_or_else(|| anyhow!("no cpu line in /proc/stat"))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    ensure!(v.len() >= 8, "unexpected /proc/stat");
    // user nice system idle iowait irq softirq steal
    Ok((v[0] + v[1] + v[2] + v[5] + v[6] + v[7], v[4]))
}

/// CPU use over one timed run.
#[derive(Clone, Copy, Default)]
struct Cpu {
    /// The re-encrypting process (rekey, or this program for the baseline).
    process_s: f64,
    /// All CPUs of the machine, busy (not idle, not iowait).
    machine_s: f64,
    /// All CPUs of the machine, waiting for I/O.
    iowait_s: f64,
}

struct CpuMark {
    own: (u64, u64),
    machine: (u64, u64),
}

impl CpuMark {
    fn now() -> Result<Self> {
        Ok(CpuMark {
            own: self_cpu_ticks()?,
            machine: machine_ticks()?,
        })
    }

    /// CPU since `self`: of the waited-for children when `children`, of this
    /// program otherwise.
    fn since(&self, children: bool, tick: f64) -> Result<Cpu> {
        let now = CpuMark::now()?;
        let process = if children {
            now.own.1.saturating_sub(self.own.1)
        } else {
            now.own.0.saturating_sub(self.own.0)
        };
        Ok(Cpu {
            process_s: process as f64 * tick,
            machine_s: now.machine.0.saturating_sub(self.machine.0) as f64 * tick,
            iowait_s: now.machine.1.saturating_sub(self.machine.1) as f64 * tick,
        })
    }
}

// ------------------------------------------------------------------ PBKDF2

struct Pbkdf2 {
    samples: usize,
    median: Duration,
    min: Duration,
    max: Duration,
    /// Derivations per second with one thread per core at once.
    all_cores_per_s: f64,
}

fn one_derivation(secret: &[u8; 32], salt: &[u8; 64]) -> Duration {
    let mut out = [0u8; 32];
    let t = Instant::now();
    ring::pbkdf2::derive(
        ring::pbkdf2::PBKDF2_HMAC_SHA256,
        NonZeroU32::new(hyvve::ITERATIONS).unwrap_or(NonZeroU32::MIN),
        salt,
        secret,
        &mut out,
    );
    let d = t.elapsed();
    std::hint::black_box(&out);
    d
}

fn measure_pbkdf2(samples: usize, threads: usize) -> Pbkdf2 {
    let secret = [7u8; 32];
    let salt = [9u8; 64];
    one_derivation(&secret, &salt);
    let mut v: Vec<Duration> = (0..samples)
        .map(|_| one_derivation(&secret, &salt))
        .collect();
    v.sort_unstable();
    let t = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                for _ in 0..samples {
                    one_derivation(&secret, &salt);
                }
            });
        }
    });
    let wall = t.elapsed();
    Pbkdf2 {
        samples,
        median: v[(v.len() - 1) / 2],
        min: v[0],
        max: v[v.len() - 1],
        all_cores_per_s: (threads * samples) as f64 / wall.as_secs_f64(),
    }
}

// ------------------------------------------------------------------ values

/// Row i (id i + 1) sealed under `key`, on `threads` threads.
fn seal_all(codec: Codec, key: &MasterKey, n: usize, threads: usize) -> Result<Vec<String>> {
    let per = n.div_ceil(threads.max(1)).max(1);
    let mut out = vec![String::new(); n];
    std::thread::scope(|s| -> Result<()> {
        let handles: Vec<_> = out
            .chunks_mut(per)
            .enumerate()
            .map(|(k, chunk)| {
                s.spawn(move || -> Result<()> {
                    for (j, slot) in chunk.iter_mut().enumerate() {
                        let id = (k * per + j + 1) as i64;
                        *slot = codec
                            .seal(key, plaintext(id).as_bytes())
                            .map_err(|e| anyhow!("sealing row {id}: {e}"))?;
                    }
                    Ok(())
                })
            })
            .collect();
        for h in handles {
            h.join()
                .map_err(|_| anyhow!("a sealing thread panicked"))??;
        }
        Ok(())
    })?;
    Ok(out)
}

/// Every row must open with `key` to its plaintext (on `threads` threads).
fn check_all(codec: Codec, key: &MasterKey, rows: &[(i64, String)], threads: usize) -> Result<()> {
    let per = rows.len().div_ceil(threads.max(1)).max(1);
    std::thread::scope(|s| -> Result<()> {
        let handles: Vec<_> = rows
            .chunks(per)
            .map(|chunk| {
                s.spawn(move || -> Result<()> {
                    for (id, v) in chunk {
                        let p = codec
                            .open(key, v)
                            .map_err(|e| anyhow!("row {id} does not open with the new key: {e}"))?;
                        ensure!(
                            p.expose() == plaintext(*id).as_bytes(),
                            "row {id} opens with the new key to another plaintext"
                        );
                    }
                    Ok(())
                })
            })
            .collect();
        for h in handles {
            h.join()
                .map_err(|_| anyhow!("a checking thread panicked"))??;
        }
        Ok(())
    })
}

// ------------------------------------------------------------------ database

async fn connect(db: &PgDb) -> Result<sqlx::PgConnection> {
    bounded(
        "connect to the benchmark database",
        Duration::from_secs(30),
        sqlx::PgConnection::connect(&db.url),
    )
    .await
}

/// A fresh database holding `values` as rows 1..=N of `t`.
async fn seeded_db(values: &[String]) -> Result<PgDb> {
    let db = PgDb::create("bench_reenc").await;
    let mut c = connect(&db).await?;
    bounded(
        "create table t",
        SQL_TIMEOUT,
        sqlx::raw_sql("CREATE TABLE t (id bigint PRIMARY KEY, c text NOT NULL)").execute(&mut c),
    )
    .await?;
    for (k, chunk) in values.chunks(SEED_CHUNK).enumerate() {
        let ids: Vec<i64> = (0..chunk.len())
            .map(|j| (k * SEED_CHUNK + j + 1) as i64)
            .collect();
        bounded(
            "insert rows",
            SQL_TIMEOUT,
            sqlx::query("INSERT INTO t (id, c) SELECT * FROM unnest($1::int8[], $2::text[])")
                .bind(ids)
                .bind(chunk.to_vec())
                .execute(&mut c),
        )
        .await?;
    }
    for sql in ["VACUUM (ANALYZE) t", "CHECKPOINT"] {
        bounded(sql, SQL_TIMEOUT, sqlx::raw_sql(sql).execute(&mut c)).await?;
    }
    bounded("close", Duration::from_secs(30), c.close()).await?;
    Ok(db)
}

async fn all_rows(db: &PgDb) -> Result<Vec<(i64, String)>> {
    let mut c = connect(db).await?;
    let rows = bounded(
        "read table t",
        SQL_TIMEOUT,
        sqlx::query_as::<_, (i64, String)>("SELECT id, c FROM t ORDER BY id").fetch_all(&mut c),
    )
    .await?;
    bounded("close", Duration::from_secs(30), c.close()).await?;
    Ok(rows)
}

/// Reads the table back and checks every row on every core.
async fn verify(db: &PgDb, codec: Codec, new: &MasterKey, n: usize) -> Result<()> {
    let rows = all_rows(db).await?;
    ensure!(rows.len() == n, "{} rows in t, expected {n}", rows.len());
    tokio::task::block_in_place(|| check_all(codec, new, &rows, cores()))
}

// ------------------------------------------------------------------ runs

struct Keys {
    old: MasterKey,
    new: MasterKey,
    old_b64: String,
    new_b64: String,
}

impl Keys {
    fn generate() -> Result<Self> {
        let old = MasterKey::generate().map_err(|e| anyhow!("old key: {e}"))?;
        let new = MasterKey::generate().map_err(|e| anyhow!("new key: {e}"))?;
        Ok(Keys {
            old_b64: old.to_base64().expose().to_string(),
            new_b64: new.to_base64().expose().to_string(),
            old,
            new,
        })
    }
}

struct Timed {
    rows: usize,
    wall: Duration,
    cpu: Cpu,
}

impl Timed {
    fn rows_per_s(&self) -> f64 {
        self.rows as f64 / self.wall.as_secs_f64()
    }
}

/// What `rekey reencrypt` must report: all `rows` rotated, or (`moved`)
/// all already under the new key.
#[derive(Clone, Copy)]
struct Expect {
    rows: usize,
    moved: bool,
}

/// Runs `rekey -o json reencrypt --column t.c --codec CODEC` on `db` and
/// checks its summary.
async fn run_rekey(
    db: &PgDb,
    keys: &Keys,
    codec: Codec,
    batch: Option<usize>,
    expect: Expect,
    limit: Duration,
    tick: f64,
) -> Result<Timed> {
    let Expect { rows, moved } = expect;
    let mut cmd = tokio::process::Command::new(CLI.path());
    cmd.args(["-o", "json", "reencrypt", "--column", "t.c", "--codec"])
        .arg(codec.name());
    if let Some(b) = batch {
        cmd.arg("--batch-size").arg(b.to_string());
    }
    cmd.env("ENCRYPTION_MASTER_KEY_OLD", &keys.old_b64)
        .env("ENCRYPTION_MASTER_KEY_NEW", &keys.new_b64)
        .env("DATABASE_URL", &db.url)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let mark = CpuMark::now()?;
    let start = Instant::now();
    let child = cmd
        .spawn()
        .with_context(|| format!("cannot run {}", CLI.path().display()))?;
    let out = match timeout(limit, child.wait_with_output()).await {
        Ok(r) => r.context("waiting for rekey reencrypt")?,
        // Dropping the child killed it.
        Err(_) => bail!("rekey reencrypt did not finish within {limit:?}"),
    };
    let wall = start.elapsed();
    let cpu = mark.since(true, tick)?;
    ensure!(
        out.status.success(),
        "rekey reencrypt failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "rekey reencrypt printed no JSON: {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })?;
    let expected = serde_json::json!({"dry_run": false, "columns": [
        {"table": "t", "column": "c", "scanned": rows, "rotated": if moved { 0 } else { rows },
         "already_new": if moved { rows } else { 0 }, "null": 0}
    ]});
    ensure!(
        j == expected,
        "rekey reencrypt reported {j}, expected {expected}"
    );
    Ok(Timed { rows, wall, cpu })
}

/// The runbook's way, single-threaded: read a batch, then per row open,
/// seal and UPDATE that row alone.
async fn run_baseline(db: &PgDb, keys: &Keys, rows: usize, tick: f64) -> Result<Timed> {
    let mark = CpuMark::now()?;
    let start = Instant::now();
    let mut c = connect(db).await?;
    let mut after: i64 = 0;
    let mut done = 0usize;
    loop {
        let batch = bounded(
            "baseline: read a batch",
            SQL_TIMEOUT,
            sqlx::query_as::<_, (i64, String)>(
                "SELECT id, c FROM t WHERE id > $1 ORDER BY id LIMIT $2",
            )
            .bind(after)
            .bind(BASELINE_BATCH)
            .fetch_all(&mut c),
        )
        .await?;
        if batch.is_empty() {
            break;
        }
        for (id, v) in batch {
            // CPU-bound; this thread does nothing else meanwhile.
            let sealed = tokio::task::block_in_place(|| -> Result<String> {
                let p = hyvve::open(&keys.old, &v)
                    .map_err(|e| anyhow!("baseline: row {id} does not open: {e}"))?;
                hyvve::seal(&keys.new, p.expose())
                    .map_err(|e| anyhow!("baseline: sealing row {id}: {e}"))
            })?;
            let r = bounded(
                "baseline: update a row",
                SQL_TIMEOUT,
                sqlx::query("UPDATE t SET c = $1 WHERE id = $2")
                    .bind(sealed)
                    .bind(id)
                    .execute(&mut c),
            )
            .await?;
            ensure!(
                r.rows_affected() == 1,
                "baseline: UPDATE of row {id} changed {} rows",
                r.rows_affected()
            );
            after = id;
            done += 1;
        }
    }
    bounded("close", Duration::from_secs(30), c.close()).await?;
    let wall = start.elapsed();
    let cpu = mark.since(false, tick)?;
    ensure!(
        done == rows,
        "baseline rotated {done} rows, expected {rows}"
    );
    Ok(Timed { rows, wall, cpu })
}

/// How Postgres plans one of the command's batch writes on this table.
struct WritePlan {
    join: String,
    /// How `t` is read: "Seq Scan" or "Index Scan" (on the primary key).
    scan: String,
}

/// `EXPLAIN` (not executed) of the statement the command writes its first
/// batch with: the same text as `rekey_reencrypt`'s compare-and-swap
/// UPDATE, with rows 1..=size and their current values as old and new.
async fn explain_write(db: &PgDb, size: usize) -> Result<WritePlan> {
    let mut c = connect(db).await?;
    let rows = bounded(
        "read the first batch",
        SQL_TIMEOUT,
        sqlx::query_as::<_, (String, String)>("SELECT id::text, c FROM t ORDER BY id LIMIT $1")
            .bind(size as i64)
            .fetch_all(&mut c),
    )
    .await?;
    let sql = "EXPLAIN UPDATE \"t\" AS t SET \"c\" = v.new \
               FROM unnest($1::text[]::int8[], $2::text[], $3::text[]) AS v(id, old, new) \
               WHERE t.\"id\" = v.id AND t.\"c\" = v.old RETURNING t.\"id\"::text";
    let ids: Vec<&str> = rows.iter().map(|(i, _)| i.as_str()).collect();
    let values: Vec<&str> = rows.iter().map(|(_, v)| v.as_str()).collect();
    let q = sqlx::query_scalar::<_, String>(sql)
        .bind(&ids)
        .bind(&values)
        .bind(&values);
    let lines = bounded("EXPLAIN of a batch write", SQL_TIMEOUT, q.fetch_all(&mut c)).await?;
    bounded("close", Duration::from_secs(30), c.close()).await?;
    let join = ["Nested Loop", "Hash Join", "Merge Join"]
        .into_iter()
        .find(|j| lines.iter().any(|l| l.contains(j)))
        .unwrap_or("other")
        .to_string();
    let scan = if lines.iter().any(|l| l.contains("Seq Scan on t ")) {
        "Seq Scan"
    } else if lines.iter().any(|l| l.contains("Index Scan using t_pkey")) {
        "Index Scan"
    } else {
        "other"
    };
    Ok(WritePlan {
        join,
        scan: scan.to_string(),
    })
}

/// Postgres's counters for table `t` (`pg_stat_user_tables`).
#[derive(Clone, Copy, Default)]
struct TableStats {
    seq_scan: i64,
    seq_tup_read: i64,
    n_tup_upd: i64,
}

async fn table_stats(db: &PgDb) -> Result<TableStats> {
    let mut c = connect(db).await?;
    let (seq_scan, seq_tup_read, n_tup_upd) = bounded(
        "read pg_stat_user_tables",
        SQL_TIMEOUT,
        sqlx::query_as::<_, (i64, i64, i64)>(
            "SELECT seq_scan, seq_tup_read, n_tup_upd FROM pg_stat_user_tables WHERE relname = 't'",
        )
        .fetch_one(&mut c),
    )
    .await?;
    bounded("close", Duration::from_secs(30), c.close()).await?;
    Ok(TableStats {
        seq_scan,
        seq_tup_read,
        n_tup_upd,
    })
}

/// The counters' change since `before`, once the `updates` rows written
/// meanwhile are counted (a server process reports its counters when it
/// ends, shortly after the client has gone).
async fn table_stats_since(db: &PgDb, before: TableStats, updates: usize) -> Result<TableStats> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let now = table_stats(db).await?;
        if now.n_tup_upd - before.n_tup_upd >= updates as i64 {
            return Ok(TableStats {
                seq_scan: now.seq_scan - before.seq_scan,
                seq_tup_read: now.seq_tup_read - before.seq_tup_read,
                n_tup_upd: now.n_tup_upd - before.n_tup_upd,
            });
        }
        ensure!(
            Instant::now() < deadline,
            "pg_stat_user_tables counted {} updates of t, expected {updates}",
            now.n_tup_upd - before.n_tup_upd
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

// ------------------------------------------------------------------ report

struct Server {
    version: String,
    settings: String,
}

async fn server_info() -> Result<Server> {
    let db = PgDb::create("bench_reenc").await;
    let mut c = connect(&db).await?;
    let version: String = bounded(
        "SHOW server_version",
        SQL_TIMEOUT,
        sqlx::query_scalar("SHOW server_version").fetch_one(&mut c),
    )
    .await?;
    let mut settings = Vec::new();
    for name in [
        "fsync",
        "synchronous_commit",
        "shared_buffers",
        "plan_cache_mode",
    ] {
        let v: String = bounded(
            name,
            SQL_TIMEOUT,
            sqlx::query_scalar(&format!("SHOW {name}")).fetch_one(&mut c),
        )
        .await?;
        settings.push(format!("{name}={v}"));
    }
    bounded("close", Duration::from_secs(30), c.close()).await?;
    Ok(Server {
        version,
        settings: settings.join(" "),
    })
}

/// A table of timed runs; `extra` headers follow the common columns.
fn run_table(first: &str, extra: &[&str]) -> Table {
    [
        "rows",
        "wall s",
        "rows/s",
        "proc CPU s",
        "machine CPU",
        "iowait s",
    ]
    .iter()
    .chain(extra)
    .fold(Table::new(first), |t, h| t.right(h))
}

/// The common cells of a timed run (after its label).
fn run_cells(t: &Timed) -> [String; 6] {
    [
        t.rows.to_string(),
        format!("{:.2}", t.wall.as_secs_f64()),
        format!("{:.1}", t.rows_per_s()),
        format!("{:.2}", t.cpu.process_s),
        format!("{:.2}", t.cpu.machine_s),
        format!("{:.2}", t.cpu.iowait_s),
    ]
}

fn run_row(t: &mut Table, label: &str, timed: &Timed) {
    t.row(std::iter::once(label.to_string()).chain(run_cells(timed)));
}

// --------------------------------------------------------------------- run

async fn run(s: &Settings) -> Result<String> {
    let n_cores = cores();
    let tick = tick_secs();
    let server = server_info().await?;

    progress(&format!(
        "PBKDF2-HMAC-SHA256 ({} iterations): {} single derivations, then {} per core on {n_cores} cores at once",
        hyvve::ITERATIONS,
        s.pbkdf2_samples,
        s.pbkdf2_samples
    ));
    let samples = s.pbkdf2_samples;
    let kdf = tokio::task::spawn_blocking(move || measure_pbkdf2(samples, n_cores))
        .await
        .map_err(|_| anyhow!("the PBKDF2 measurement panicked"))?;
    // Derivations per row: one to open, one per batch to seal.
    let per_row = 1.0 + 1.0 / DEFAULT_BATCH as f64;
    let limit = n_cores as f64 / (per_row * kdf.median.as_secs_f64());
    // Bound for a hyvve run: four times what one core would need, plus
    // start-up.
    let hyvve_bound = Duration::from_secs(120) + kdf.median * (8 * s.hyvve_rows) as u32;

    // ---- hyvve
    let keys = Keys::generate()?;
    progress(&format!(
        "hyvve: sealing {} rows under the old key on {n_cores} threads",
        s.hyvve_rows
    ));
    let hyvve_values =
        tokio::task::block_in_place(|| seal_all(Codec::Hyvve, &keys.old, s.hyvve_rows, n_cores))?;

    progress(&format!(
        "hyvve: rekey reencrypt on {} rows (default batch size {DEFAULT_BATCH})",
        s.hyvve_rows
    ));
    let (hyvve_run, hyvve_rerun) = {
        let db = seeded_db(&hyvve_values).await?;
        let mut expect = Expect {
            rows: s.hyvve_rows,
            moved: false,
        };
        let r = run_rekey(&db, &keys, Codec::Hyvve, None, expect, hyvve_bound, tick)
            .await
            .context("hyvve: rekey reencrypt")?;
        progress(&format!(
            "hyvve: {:.1} rows/s; checking every row with the new key",
            r.rows_per_s()
        ));
        verify(&db, Codec::Hyvve, &keys.new, s.hyvve_rows)
            .await
            .context("hyvve: after rekey reencrypt")?;
        // The same command again, as after an interruption or in the
        // sidecar's final sweep: every row is under the new key already.
        progress("hyvve: rekey reencrypt again over the moved rows");
        expect.moved = true;
        let again = run_rekey(&db, &keys, Codec::Hyvve, None, expect, hyvve_bound, tick)
            .await
            .context("hyvve: rekey reencrypt again")?;
        (r, again)
    };

    let baseline = if s.baseline {
        progress(&format!(
            "hyvve: single-threaded row-at-a-time baseline on {} rows",
            s.hyvve_rows
        ));
        let db = seeded_db(&hyvve_values).await?;
        let r = match timeout(hyvve_bound, run_baseline(&db, &keys, s.hyvve_rows, tick)).await {
            Ok(r) => r.context("hyvve: baseline")?,
            Err(_) => bail!("hyvve: the baseline did not finish within {hyvve_bound:?}"),
        };
        progress(&format!(
            "baseline: {:.1} rows/s; checking every row with the new key",
            r.rows_per_s()
        ));
        verify(&db, Codec::Hyvve, &keys.new, s.hyvve_rows)
            .await
            .context("hyvve: after the baseline")?;
        Some(r)
    } else {
        None
    };
    drop(hyvve_values);

    // ---- rekey codec
    progress(&format!(
        "rekey codec: sealing {} rows under the old key",
        s.rekey_rows
    ));
    let rekey_values =
        tokio::task::block_in_place(|| seal_all(Codec::Rekey, &keys.old, s.rekey_rows, n_cores))?;
    let rekey_bound = Duration::from_secs(300) + Duration::from_millis(2) * s.rekey_rows as u32;
    let mut rekey_runs = Vec::new();
    for batch in REKEY_BATCHES {
        let size = batch.unwrap_or(DEFAULT_BATCH);
        progress(&format!(
            "rekey codec: rekey reencrypt on {} rows, batch size {size}",
            s.rekey_rows
        ));
        let db = seeded_db(&rekey_values).await?;
        let plan = explain_write(&db, size)
            .await
            .with_context(|| format!("rekey codec, batch size {size}: EXPLAIN"))?;
        let before = table_stats(&db).await?;
        let r = run_rekey(
            &db,
            &keys,
            Codec::Rekey,
            batch,
            Expect {
                rows: s.rekey_rows,
                moved: false,
            },
            rekey_bound,
            tick,
        )
        .await
        .with_context(|| format!("rekey codec, batch size {size}"))?;
        let scans = table_stats_since(&db, before, s.rekey_rows).await?;
        progress(&format!(
            "rekey codec, batch size {size}: {:.0} rows/s; checking every row with the new key",
            r.rows_per_s()
        ));
        verify(&db, Codec::Rekey, &keys.new, s.rekey_rows)
            .await
            .with_context(|| format!("rekey codec, batch size {size}"))?;
        rekey_runs.push((batch, r, plan, scans));
    }

    // ---- report
    let mut out = String::new();
    out.push_str(&format!(
        "\nrekey reencrypt benchmark: the real `rekey` binary and Postgres {} on one machine ({n_cores} CPUs); {}\n",
        server.version, server.settings
    ));
    out.push_str(&format!(
        "\nPBKDF2-HMAC-SHA256, {} iterations, in this program (ring, release build)\n",
        hyvve::ITERATIONS
    ));
    out.push_str(&format!(
        "one derivation: median {:.2} ms, min {:.2} ms, max {:.2} ms ({} samples after one warm-up)\n",
        kdf.median.as_secs_f64() * 1e3,
        kdf.min.as_secs_f64() * 1e3,
        kdf.max.as_secs_f64() * 1e3,
        kdf.samples
    ));
    out.push_str(&format!(
        "{n_cores} threads at once: {:.1} derivations/s (single-thread median: {:.1}/s per core)\n",
        kdf.all_cores_per_s,
        1.0 / kdf.median.as_secs_f64()
    ));
    out.push_str(&format!(
        "limit for hyvve rows (1 derivation each to open, 1 per batch of {DEFAULT_BATCH} to seal): {n_cores} cores / ({per_row:.3} x {:.2} ms) = {limit:.1} rows/s\n",
        kdf.median.as_secs_f64() * 1e3
    ));

    out.push_str(&format!(
        "\nhyvve codec, {} rows (proc CPU: the re-encrypting process; machine CPU: all CPUs busy)\n",
        s.hyvve_rows
    ));
    let mut t = run_table("run", &[]);
    run_row(
        &mut t,
        &format!("rekey reencrypt (batch {DEFAULT_BATCH}, {n_cores} workers)"),
        &hyvve_run,
    );
    run_row(
        &mut t,
        "again, every row already under the new key",
        &hyvve_rerun,
    );
    if let Some(b) = &baseline {
        run_row(&mut t, "baseline: one thread, one UPDATE per row", b);
    }
    out.push_str(&t.render());
    out.push_str(&format!(
        "rekey reencrypt / limit: {:.3}\n",
        hyvve_run.rows_per_s() / limit
    ));
    out.push_str(&format!(
        "rekey reencrypt / {n_cores}-thread PBKDF2 throughput ({:.1} rows/s): {:.3}\n",
        kdf.all_cores_per_s / per_row,
        hyvve_run.rows_per_s() / (kdf.all_cores_per_s / per_row)
    ));
    if let Some(b) = &baseline {
        out.push_str(&format!(
            "rekey reencrypt / baseline: {:.2}\n",
            hyvve_run.rows_per_s() / b.rows_per_s()
        ));
        out.push_str(&format!(
            "baseline / single-core limit ({:.1} rows/s): {:.3}\n",
            1.0 / (2.0 * kdf.median.as_secs_f64()),
            b.rows_per_s() * 2.0 * kdf.median.as_secs_f64()
        ));
    }
    out.push_str("every row opened with the new key to its plaintext after each run\n");

    out.push_str(&format!("\nrekey codec, {} rows\n", s.rekey_rows));
    let mut t = run_table("batch size", &["ms/batch"]);
    for (batch, r, _, _) in &rekey_runs {
        let size = batch.unwrap_or(DEFAULT_BATCH);
        let label = match batch {
            None => format!("{size} (default)"),
            Some(_) => format!("{size} (--batch-size {size})"),
        };
        let batches = s.rekey_rows.div_ceil(size);
        t.row(std::iter::once(label).chain(run_cells(r)).chain([format!(
            "{:.2}",
            r.wall.as_secs_f64() * 1e3 / batches as f64
        )]));
    }
    out.push_str(&t.render());
    out.push_str("every row opened with the new key to its plaintext after each run\n");
    out.push_str(
        "\nthe batch writes on table t: plan of the first one (EXPLAIN before the run), and sequential scans of t during the run (pg_stat_user_tables)\n",
    );
    let mut t = Table::new("batch size")
        .left("first write's plan")
        .right("seq scans")
        .right("rows seq-read")
        .right("rows updated");
    for (batch, _, p, st) in &rekey_runs {
        t.row([
            batch.unwrap_or(DEFAULT_BATCH).to_string(),
            format!("{}, {} on t", p.join, p.scan),
            st.seq_scan.to_string(),
            st.seq_tup_read.to_string(),
            st.n_tup_upd.to_string(),
        ]);
    }
    out.push_str(&t.render());
    out.push('\n');
    Ok(out)
}
