//! Benchmarks of the real `rekey-backend` binary, measured from a gRPC
//! client (`rekey_proto::v1`) on the same machine:
//!
//! 1. Rotate latency: a `random` secret, then N sequential Rotate calls, each
//!    timed on the client (after a few warm-up calls that are not counted),
//!    on the embedded SQLite store and on Postgres (a fresh database on the
//!    server at 127.0.0.1:5432, or `REKEY_TEST_PG_URL`).
//! 2. Watch fan-out: one backend (SQLite store) with S Watch streams on one
//!    secret, spread over C HTTP/2 connections. For each of R rotations, the
//!    time from just before sending Rotate until the last stream has
//!    received the new version, and the same time for every stream. A stream
//!    that skips a version or receives one twice is counted.
//! 3. Backend memory per open Watch stream: the backend's VmRSS before the
//!    connections and streams are opened and once all streams are open and
//!    idle; (after - before) / S.
//!
//! Run (release build): `cargo bench -p rekey-e2e --bench backend`
//!
//! Environment overrides (defaults in brackets):
//! `REKEY_BENCH_ROTATES` (200) Rotate calls per store,
//! `REKEY_BENCH_STREAMS` (10000) Watch streams,
//! `REKEY_BENCH_CONNECTIONS` (20) HTTP/2 connections for the streams,
//! `REKEY_BENCH_ROTATIONS` (20) fan-out rotations,
//! `REKEY_BENCH_POSTGRES` (1; 0 skips the Postgres run),
//! `REKEY_BENCH_REPLICAS` (1) backends for the fan-out: with 2 or more,
//! replicas on one Postgres database sharing the KEK and admin token, the
//! connections (and so the streams) spread evenly over them, every
//! rotation made through the first; the report adds each replica's
//! last stream.
//! A quick smoke run:
//! `REKEY_BENCH_ROTATES=20 REKEY_BENCH_STREAMS=200 REKEY_BENCH_ROTATIONS=3 cargo bench -p rekey-e2e --bench backend`
//!
//! The program prints a table and exits 0, or prints what failed and exits
//! non-zero. Every wait is bounded.

use rekey_testkit::bench::{Stats, Table, env_usize, ms, stats};

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use rekey_proto::v1 as pb;
use rekey_testkit::{Backend, BackendOpts, Client, PgDb, TempDir};
use tokio::sync::mpsc;
use tokio::time::timeout;

/// Rotate calls made before the measured ones (not counted).
const ROTATE_WARMUP: usize = 5;
/// Fan-out rotations made before the measured ones (not counted in the
/// timings; their deliveries are still checked).
const FANOUT_WARMUP: usize = 1;
/// Bound on one unary call.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on opening every stream and receiving every initial snapshot.
const OPEN_TIMEOUT: Duration = Duration::from_secs(180);
/// Bound on one rotation reaching every stream.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(60);
/// Bound on the whole program.
const OVERALL_TIMEOUT: Duration = Duration::from_secs(45 * 60);
/// The secrets' validation window (the backend's default, 30 minutes).
const VALIDATION_WINDOW_MS: i64 = 30 * 60 * 1000;
/// Pause between fan-out rotations, so that each one starts from idle.
const ROTATION_GAP: Duration = Duration::from_millis(100);

struct Settings {
    rotates: usize,
    streams: usize,
    connections: usize,
    rotations: usize,
    postgres: bool,
    /// Backends serving the fan-out: 1 on SQLite, more on one Postgres
    /// database (the streams spread evenly over them).
    replicas: usize,
}

impl Settings {
    fn from_env() -> Result<Self> {
        let s = Settings {
            rotates: env_usize("REKEY_BENCH_ROTATES", 200, 1)?,
            streams: env_usize("REKEY_BENCH_STREAMS", 10_000, 1)?,
            connections: env_usize("REKEY_BENCH_CONNECTIONS", 20, 1)?,
            rotations: env_usize("REKEY_BENCH_ROTATIONS", 20, 1)?,
            postgres: env_usize("REKEY_BENCH_POSTGRES", 1, 0)? != 0,
            replicas: env_usize("REKEY_BENCH_REPLICAS", 1, 1)?,
        };
        ensure!(
            s.connections <= s.streams,
            "REKEY_BENCH_CONNECTIONS ({}) must not exceed REKEY_BENCH_STREAMS ({})",
            s.connections,
            s.streams
        );
        Ok(s)
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

/// The backend's resident set size in KiB.
fn rss_kib(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let s = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("no VmRSS line in {path}"))
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

/// A new HTTP/2 connection to the backend, with the admin token.
async fn connect(b: &Backend, token: &str) -> Result<Client> {
    timeout(
        Duration::from_secs(10),
        rekey_testkit::client(&b.grpc, token),
    )
    .await
    .with_context(|| format!("connecting to {} timed out", b.grpc))
}

async fn create_random(c: &mut Client, id: &str) -> Result<u64> {
    let r = timeout(
        CALL_TIMEOUT,
        c.create_secret(pb::CreateSecretRequest {
            id: id.into(),
            kind: "random".into(),
            random: Some(pb::RandomOptions {
                length: 32,
                encoding: "hex".into(),
            }),
            // Previous stays valid (and in every Watch event) for the whole
            // run, as in production; with 0 the backend would decommission
            // it in the background and send an extra event per rotation.
            validation_window_ms: Some(VALIDATION_WINDOW_MS),
            ..Default::default()
        }),
    )
    .await
    .context("CreateSecret timed out")?
    .context("CreateSecret failed")?
    .into_inner();
    Ok(r.version
        .context("CreateSecret returned no version")?
        .version)
}

/// One Rotate call; returns the new version and the client-side latency.
async fn rotate(c: &mut Client, id: &str) -> Result<(u64, Duration)> {
    let started = Instant::now();
    let r = timeout(
        CALL_TIMEOUT,
        c.rotate(pb::RotateRequest {
            secret_id: id.into(),
            ..Default::default()
        }),
    )
    .await
    .context("Rotate timed out")?
    .context("Rotate failed")?
    .into_inner();
    let took = started.elapsed();
    let v = r.version.context("Rotate returned no version")?.version;
    Ok((v, took))
}

/// One value of the backend's Prometheus endpoint.
async fn metric(addr: &str, name: &str) -> Result<f64> {
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
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("metric {name} not found at {addr}"))
}

// ------------------------------------------------------------ rotate latency

async fn rotate_latency(b: &Backend, n: usize) -> Result<Stats> {
    let id = "bench/rotate";
    let mut c = b.client().await;
    let mut version = create_random(&mut c, id).await?;
    let mut samples = Vec::with_capacity(n);
    for i in 0..ROTATE_WARMUP + n {
        let (v, took) = rotate(&mut c, id)
            .await
            .with_context(|| format!("Rotate call {}", i + 1))?;
        ensure!(
            v == version + 1,
            "Rotate call {} returned v{v}, expected v{}",
            i + 1,
            version + 1
        );
        version = v;
        if i >= ROTATE_WARMUP {
            samples.push(took);
        }
    }
    Ok(stats(samples))
}

// ------------------------------------------------------------------ fan-out

enum Ev {
    /// The initial snapshot arrived.
    Ready,
    /// A newer version arrived at `at`.
    Got {
        idx: usize,
        version: u64,
        at: Instant,
    },
    /// The stream failed or ended.
    Failed { idx: usize, msg: String },
}

#[derive(Default)]
struct Counters {
    /// Versions a stream never received (it jumped past them).
    missed: AtomicU64,
    /// Events repeating a version the stream already had.
    duplicates: AtomicU64,
}

async fn watch_task(
    idx: usize,
    mut c: Client,
    id: String,
    v0: u64,
    tx: mpsc::UnboundedSender<Ev>,
    counters: Arc<Counters>,
) {
    let r: std::result::Result<(), String> = async {
        let mut s = timeout(
            OPEN_TIMEOUT,
            c.watch(pb::WatchRequest {
                secret_ids: vec![id],
            }),
        )
        .await
        .map_err(|_| "Watch call timed out".to_string())?
        .map_err(|e| format!("Watch call failed: {e}"))?
        .into_inner();
        let first = timeout(OPEN_TIMEOUT, s.message())
            .await
            .map_err(|_| "no initial snapshot in time".to_string())?
            .map_err(|e| format!("stream failed before the snapshot: {e}"))?
            .ok_or("stream ended before the snapshot")?;
        let v = first.current.as_ref().map_or(0, |c| c.version);
        if !first.snapshot || v != v0 {
            return Err(format!(
                "first event: snapshot={} v{v}, expected a snapshot of v{v0}",
                first.snapshot
            ));
        }
        let _ = tx.send(Ev::Ready);
        let mut last = v0;
        loop {
            // No timeout: an idle stream waits for as long as the benchmark
            // runs; the collector bounds every wait and aborts this task.
            match s.message().await {
                Ok(Some(ev)) => {
                    let at = Instant::now();
                    let cur = ev.current.ok_or("event without current")?;
                    if cur.value.is_none() {
                        return Err(format!("v{} arrived without its value", cur.version));
                    }
                    let v = cur.version;
                    if v <= last {
                        counters.duplicates.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    if v > last + 1 {
                        counters.missed.fetch_add(v - last - 1, Ordering::Relaxed);
                    }
                    last = v;
                    if tx
                        .send(Ev::Got {
                            idx,
                            version: v,
                            at,
                        })
                        .is_err()
                    {
                        return Ok(());
                    }
                }
                Ok(None) => return Err("the backend ended the stream".into()),
                Err(e) => return Err(format!("stream failed: {e}")),
            }
        }
    }
    .await;
    if let Err(msg) = r {
        let _ = tx.send(Ev::Failed { idx, msg });
    }
}

struct Fanout {
    replicas: usize,
    /// Rotate sent -> the last stream of each replica has the version.
    last_per_replica: Vec<Stats>,
    streams: usize,
    connections: usize,
    rotations: usize,
    open_time: Duration,
    /// Rotate sent -> the last stream has the new version, per rotation.
    last: Stats,
    /// Rotate sent -> each stream has the new version (all rotations).
    each: Stats,
    /// Rotate sent -> the first stream has the new version, per rotation.
    first: Stats,
    /// Client-side latency of the Rotate calls themselves.
    rotate_rpc: Stats,
    missed: u64,
    duplicates: u64,
    gauge: f64,
    rss_before: u64,
    rss_connected: u64,
    rss_open: u64,
    rss_after: u64,
}

/// The backends of the fan-out, with the database they share (if any).
struct Fleet {
    backends: Vec<Backend>,
    _db: Option<PgDb>,
    _dir: TempDir,
}

async fn fanout_backends(replicas: usize) -> Fleet {
    let dir = TempDir::new("bench-fanout");
    // Many streams per connection and per identity, as a multiplexing
    // client would hold; the defaults bound a pod's share.
    let extra_toml = "[limits]\nmax_watch_streams_per_connection = 1000000\nmax_watch_streams_per_identity = 1000000\n".to_string();
    if replicas == 1 {
        let b = Backend::start(
            dir.path(),
            BackendOpts {
                extra_toml,
                ..Default::default()
            },
        );
        return Fleet {
            backends: vec![b],
            _db: None,
            _dir: dir,
        };
    }
    let db = PgDb::create("bench_fanout").await;
    let backends = Backend::start_replicas(dir.path(), &db, replicas, &extra_toml);
    Fleet {
        backends,
        _db: Some(db),
        _dir: dir,
    }
}

fn rss_sum(pids: &[u32]) -> Result<u64> {
    pids.iter().map(|&p| rss_kib(p)).sum()
}

async fn fanout(s: &Settings) -> Result<Fanout> {
    let fleet = fanout_backends(s.replicas).await;
    let bs = &fleet.backends;
    let pids: Vec<u32> = bs.iter().map(Backend::pid).collect();
    let token = bs[0].token();
    let id = "bench/fanout";
    let mut admin = connect(&bs[0], &token).await?;
    let v0 = create_random(&mut admin, id).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_before = rss_sum(&pids)?;

    let mut clients = Vec::with_capacity(s.connections);
    for i in 0..s.connections {
        clients.push(
            connect(&bs[i % bs.len()], &token)
                .await
                .with_context(|| format!("connection {}", i + 1))?,
        );
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_connected = rss_sum(&pids)?;

    progress(&format!(
        "opening {} Watch streams on {} connections",
        s.streams, s.connections
    ));
    let counters = Arc::new(Counters::default());
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut tasks = tokio::task::JoinSet::new();
    let opened = Instant::now();
    for idx in 0..s.streams {
        tasks.spawn(watch_task(
            idx,
            clients[idx % s.connections].clone(),
            id.to_string(),
            v0,
            tx.clone(),
            counters.clone(),
        ));
    }
    drop(tx);
    let deadline = tokio::time::Instant::now() + OPEN_TIMEOUT;
    let mut ready = 0;
    while ready < s.streams {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Err(_) => bail!(
                "only {ready} of {} Watch streams had their initial snapshot after {OPEN_TIMEOUT:?}",
                s.streams
            ),
            Ok(None) => bail!("every Watch stream ended"),
            Ok(Some(Ev::Ready)) => ready += 1,
            Ok(Some(Ev::Failed { idx, msg })) => bail!(
                "Watch stream {idx} failed after {ready} of {} were ready: {msg}",
                s.streams
            ),
            Ok(Some(Ev::Got { idx, version, .. })) => {
                bail!("stream {idx} received v{version} before any rotation")
            }
        }
    }
    let open_time = opened.elapsed();
    progress(&format!(
        "{} streams have their snapshot after {:.2} s; idling 2 s",
        s.streams,
        open_time.as_secs_f64()
    ));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_open = rss_sum(&pids)?;
    let mut gauge = 0.0;
    for b in bs {
        gauge += metric(&b.metrics, "rekey_watch_streams").await?;
    }
    ensure!(
        gauge as usize == s.streams,
        "the backend reports rekey_watch_streams {gauge}, expected {}",
        s.streams
    );

    let mut last_s = Vec::new();
    let mut first_s = Vec::new();
    let mut each = Vec::new();
    let mut rpc = Vec::new();
    let mut per_replica: Vec<Vec<Duration>> = vec![Vec::new(); bs.len()];
    // Stream idx uses connection idx % connections, which is on replica
    // (idx % connections) % replicas.
    let replica_of = |idx: usize| (idx % s.connections) % bs.len();
    let mut version = v0;
    for r in 0..FANOUT_WARMUP + s.rotations {
        let target = version + 1;
        let t0 = Instant::now();
        let (v, took) = rotate(&mut admin, id)
            .await
            .with_context(|| format!("fan-out rotation {}", r + 1))?;
        ensure!(v == target, "Rotate returned v{v}, expected v{target}");
        version = v;
        let deadline = tokio::time::Instant::now() + DELIVERY_TIMEOUT;
        let mut got = 0;
        let mut times = Vec::with_capacity(s.streams);
        let mut slowest_on = vec![Duration::ZERO; bs.len()];
        while got < s.streams {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Err(_) => bail!(
                    "rotation to v{target}: only {got} of {} streams received it within {DELIVERY_TIMEOUT:?}",
                    s.streams
                ),
                Ok(None) => bail!("every Watch stream ended"),
                Ok(Some(Ev::Got { idx, version, at })) => {
                    ensure!(
                        version == target,
                        "stream {idx} received v{version} while v{target} was being delivered"
                    );
                    got += 1;
                    let t = at.saturating_duration_since(t0);
                    let on = &mut slowest_on[replica_of(idx)];
                    *on = (*on).max(t);
                    times.push(t);
                }
                Ok(Some(Ev::Failed { idx, msg })) => {
                    bail!("Watch stream {idx} failed during rotation to v{target}: {msg}")
                }
                Ok(Some(Ev::Ready)) => bail!("a late initial snapshot"),
            }
        }
        let slowest = times.iter().copied().max().unwrap_or_default();
        let fastest = times.iter().copied().min().unwrap_or_default();
        progress(&format!(
            "rotation {}/{} to v{target}: Rotate {} ms, first stream {} ms, last stream {} ms{}",
            r + 1,
            FANOUT_WARMUP + s.rotations,
            ms(took),
            ms(fastest),
            ms(slowest),
            if r < FANOUT_WARMUP { " (warm-up)" } else { "" }
        ));
        if r >= FANOUT_WARMUP {
            last_s.push(slowest);
            first_s.push(fastest);
            rpc.push(took);
            each.extend(times);
            for (all, t) in per_replica.iter_mut().zip(slowest_on) {
                all.push(t);
            }
        }
        tokio::time::sleep(ROTATION_GAP).await;
    }
    // Late duplicates would show up here.
    tokio::time::sleep(Duration::from_millis(500)).await;
    while let Ok(ev) = rx.try_recv() {
        match ev {
            Ev::Failed { idx, msg } => bail!("Watch stream {idx} failed: {msg}"),
            Ev::Got { idx, version, .. } => {
                bail!("stream {idx} received v{version} after the last rotation")
            }
            Ev::Ready => {}
        }
    }
    let rss_after = rss_sum(&pids)?;
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
    drop(clients);
    drop(fleet);
    Ok(Fanout {
        replicas: s.replicas,
        last_per_replica: per_replica.into_iter().map(stats).collect(),
        streams: s.streams,
        connections: s.connections,
        rotations: s.rotations,
        open_time,
        last: stats(last_s),
        each: stats(each),
        first: stats(first_s),
        rotate_rpc: stats(rpc),
        missed: counters.missed.load(Ordering::Relaxed),
        duplicates: counters.duplicates.load(Ordering::Relaxed),
        gauge,
        rss_before,
        rss_connected,
        rss_open,
        rss_after,
    })
}

// --------------------------------------------------------------------- run

async fn run(s: &Settings) -> Result<String> {
    progress(&format!(
        "Rotate latency on SQLite: {} calls after {ROTATE_WARMUP} warm-up calls",
        s.rotates
    ));
    let sqlite = {
        let dir = TempDir::new("bench-sqlite");
        let b = Backend::start(dir.path(), BackendOpts::default());
        rotate_latency(&b, s.rotates)
            .await
            .context("Rotate latency on SQLite")?
    };
    let postgres = if s.postgres {
        progress(&format!(
            "Rotate latency on Postgres: {} calls after {ROTATE_WARMUP} warm-up calls",
            s.rotates
        ));
        let db = PgDb::create("bench").await;
        let dir = TempDir::new("bench-pg");
        let b = Backend::start(
            dir.path(),
            BackendOpts {
                store_url: Some(db.url.clone()),
                ..Default::default()
            },
        );
        let r = rotate_latency(&b, s.rotates)
            .await
            .context("Rotate latency on Postgres")?;
        drop(b);
        drop(db);
        Some(r)
    } else {
        None
    };
    let f = fanout(s).await.context("Watch fan-out")?;

    let mut out = String::new();
    out.push_str(&format!(
        "\nrekey-backend benchmark: client and backend on one machine ({} CPUs)\n\n",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    ));
    out.push_str(&format!(
        "Rotate latency, client side ({} sequential calls per store after {ROTATE_WARMUP} warm-up calls; random kind, 32 bytes hex)\n",
        s.rotates
    ));
    let mut t = Table::stats("store");
    t.stats_row("sqlite", &sqlite);
    match &postgres {
        Some(p) => t.stats_row("postgres", p),
        None => t.note("postgres: skipped (REKEY_BENCH_POSTGRES=0)"),
    }
    out.push_str(&t.render());
    let replicas = if f.replicas == 1 {
        "one backend, SQLite store".to_string()
    } else {
        format!(
            "{} backend replicas on one Postgres database, {} streams each, every Rotate through the first",
            f.replicas,
            f.streams / f.replicas
        )
    };
    out.push_str(&format!(
        "\nWatch fan-out: {} streams on one secret over {} HTTP/2 connections, {replicas}, {} rotations after {FANOUT_WARMUP} warm-up\n",
        f.streams, f.connections, f.rotations
    ));
    let mut t = Table::stats("from just before Rotate is sent until");
    t.stats_row("  the last stream has the version", &f.last);
    if f.replicas > 1 {
        for (i, st) in f.last_per_replica.iter().enumerate() {
            t.stats_row(
                &format!("  the last stream on replica {} has it", i + 1),
                st,
            );
        }
    }
    t.stats_row("  the first stream has the version", &f.first);
    t.stats_row("  each stream has it (all rotations pooled)", &f.each);
    t.stats_row("  the Rotate call returns", &f.rotate_rpc);
    out.push_str(&t.render());
    out.push_str(&format!(
        "opening all streams and receiving every initial snapshot: {:.2} s\n",
        f.open_time.as_secs_f64()
    ));
    out.push_str(&format!(
        "missed versions: {}; duplicate events: {}; rekey_watch_streams over the backends: {}\n",
        f.missed, f.duplicates, f.gauge
    ));
    out.push_str(if f.replicas == 1 {
        "\nBackend memory (VmRSS)\n"
    } else {
        "\nBackend memory (VmRSS, all replicas together)\n"
    });
    let mut t = Table::new("when").right("VmRSS");
    t.row([
        "before connections and streams".to_string(),
        mib(f.rss_before),
    ]);
    t.row([
        format!("after {} connections", f.connections),
        mib(f.rss_connected),
    ]);
    t.row([
        format!("after {} streams open and idle", f.streams),
        mib(f.rss_open),
    ]);
    t.row([
        format!("after {} rotations", FANOUT_WARMUP + f.rotations),
        mib(f.rss_after),
    ]);
    let per = f.rss_open.saturating_sub(f.rss_before) as f64 / f.streams as f64;
    t.row([
        format!("per stream: (open - before) / {}", f.streams),
        format!("{per:.2} KiB"),
    ]);
    out.push_str(&t.render());
    out.push('\n');
    if f.missed > 0 || f.duplicates > 0 {
        print!("{out}");
        bail!(
            "{} missed versions and {} duplicate events",
            f.missed,
            f.duplicates
        );
    }
    Ok(out)
}
