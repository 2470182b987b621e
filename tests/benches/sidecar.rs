//! Benchmark of propagation from one real `rekey-backend` (SQLite store) to
//! N real `rekey-sidecar` processes on the same machine.
//!
//! For each N (100 and 250 by default):
//!
//! 1. A fresh backend and one `random` secret (32 bytes, hex) with a 30-minute
//!    validation window, so that nothing is decommissioned during the run.
//!    Then `REKEY_BENCH_ALONE` Rotate calls (after one warm-up) with no
//!    sidecar: the baseline of the ratio "Rotate with the fleet / alone".
//! 2. N sidecars started in parallel, each with its own directory and output
//!    file (`--backend`, `--token-file` (the admin token), `--secret
//!    ID:PATH`, `--listen 127.0.0.1:0`, `REKEY_CONSUMER_ID=sc-<i>`,
//!    `RUST_LOG=warn`); the program waits until every file holds version 1.
//! 3. Idle: after a short settle, the sidecars' CPU time over an idle window,
//!    then every sidecar's VmRSS and RssAnon (`/proc/<pid>/status`) and the
//!    backend's VmRSS. CPU time is read two ways: utime + stime from
//!    `/proc/<pid>/stat` (whole clock ticks per process, so a sidecar that
//!    runs less than a tick in the window counts 0) and the scheduler's run
//!    time from `/proc/<pid>/task/*/schedstat` (nanoseconds).
//! 4. Rotations (one warm-up that is not counted, then R measured): each
//!    Rotate is sent through the gRPC client; from the moment the call
//!    returns, one thread polls the output files that have not changed yet
//!    (a `stat` each, then a 1 ms sleep, until all have changed). A sidecar
//!    replaces its file by rename, so the path's inode number changes exactly
//!    when the new content becomes visible; the time of the sweep that first
//!    sees the new inode is the file's arrival time. After every file has
//!    changed, each file's content is compared with the new version's value
//!    (GetSecret with reveal), and before the next rotation every inode is
//!    checked again (an extra write would show up there). CPU time of the
//!    sidecars, the backend and this program is summed over the rotation
//!    window (the R measured rotations and the pauses between them).
//! 5. At the end: every sidecar's VmRSS again; each sidecar's `/metrics`
//!    (deliveries, its own `delivery_seconds` measured from the backend's
//!    publish time, reconnects); the backend's GetStatus must show N live
//!    consumers, all converged; then SIGTERM to every sidecar (each must exit
//!    0).
//!
//! Run (release build; the testkit builds `rekey-backend` and
//! `rekey-sidecar` in the same profile when they are missing or stale):
//! `cargo bench -p rekey-e2e --bench sidecar`
//!
//! Environment overrides (defaults in brackets):
//! `REKEY_BENCH_SIDECARS` (100,250) comma-separated fleet sizes,
//! `REKEY_BENCH_ROTATIONS` (20) measured rotations per fleet,
//! `REKEY_BENCH_IDLE_SECS` (30) idle window for the CPU figure (one report
//! interval of the sidecars),
//! `REKEY_BENCH_GAP_MS` (500) pause after each rotation has reached every
//! file, `REKEY_BENCH_ALONE` (50) Rotate calls before the sidecars start,
//! `REKEY_BENCH_FILES` (memory) where the secret files go: `memory`
//! (`/dev/shm`, as an `emptyDir` with `medium: Memory`) or `disk`.
//! A quick smoke run:
//! `REKEY_BENCH_SIDECARS=5 REKEY_BENCH_ROTATIONS=3 REKEY_BENCH_IDLE_SECS=2 cargo bench -p rekey-e2e --bench sidecar`
//!
//! The program prints a report and exits 0, or prints what failed and exits
//! non-zero. Every wait is bounded; sidecars still running when it fails are
//! killed.

use rekey_testkit::bench::{Stats, Table, env_usize, ms, stats};

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use rekey_proto::v1 as pb;
use rekey_testkit::{Backend, BackendOpts, Client, Sidecar, TempDir};
use tokio::time::timeout;

/// The secret every sidecar watches.
const SECRET_ID: &str = "bench/sidecar";
/// Previous stays valid for the whole run: no decommission, one Watch event
/// per rotation.
const VALIDATION_WINDOW_MS: i64 = 30 * 60 * 1000;
/// Rotations made before the measured ones (checked, not counted).
const WARMUP: usize = 1;
/// Bound on one unary call.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on every sidecar's file holding the first version.
const READY_TIMEOUT: Duration = Duration::from_secs(120);
/// Bound on one rotation reaching every file.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(60);
/// Bound on the backend showing every consumer converged.
const STATUS_TIMEOUT: Duration = Duration::from_secs(60);
/// Pause between polling sweeps.
const POLL_INTERVAL: Duration = Duration::from_millis(1);
/// Pause after start-up before the idle window.
const SETTLE: Duration = Duration::from_secs(2);
/// Bound on the whole program.
const OVERALL_TIMEOUT: Duration = Duration::from_secs(30 * 60);

struct Settings {
    sidecars: Vec<usize>,
    rotations: usize,
    idle: Duration,
    gap: Duration,
    /// Rotate calls timed before the sidecars start.
    alone: usize,
    /// Where the secret files go; `None`: the system temp dir.
    files: Option<PathBuf>,
}

impl Settings {
    fn from_env() -> Result<Self> {
        let sidecars = match std::env::var("REKEY_BENCH_SIDECARS") {
            Err(_) => vec![100, 250],
            Ok(s) => s
                .split(',')
                .map(|p| {
                    p.trim()
                        .parse::<usize>()
                        .ok()
                        .filter(|&n| n >= 1)
                        .ok_or_else(|| {
                            anyhow!("REKEY_BENCH_SIDECARS={s:?}: expected numbers >= 1 separated by commas")
                        })
                })
                .collect::<Result<Vec<_>>>()?,
        };
        Ok(Settings {
            sidecars,
            rotations: env_usize("REKEY_BENCH_ROTATIONS", 20, 1)?,
            idle: Duration::from_secs(env_usize("REKEY_BENCH_IDLE_SECS", 30, 1)? as u64),
            gap: Duration::from_millis(env_usize("REKEY_BENCH_GAP_MS", 500, 0)? as u64),
            alone: env_usize("REKEY_BENCH_ALONE", 50, 1)?,
            files: match std::env::var("REKEY_BENCH_FILES").as_deref() {
                // As the manifests mount them: an emptyDir in memory.
                Err(_) | Ok("memory") => Some(PathBuf::from("/dev/shm")),
                Ok("disk") => None,
                Ok(other) => bail!("REKEY_BENCH_FILES={other:?}: expected memory or disk"),
            },
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

fn mib(kib: f64) -> String {
    format!("{:.1} MiB", kib / 1024.0)
}

/// `(VmRSS, RssAnon)` of a process in KiB.
fn rss_kib(pid: u32) -> Result<(u64, u64)> {
    let path = format!("/proc/{pid}/status");
    let s = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    let field = |name: &str| {
        s.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().strip_suffix("kB"))
            .and_then(|v| v.trim().parse().ok())
            .with_context(|| format!("no {name} line in {path}"))
    };
    Ok((field("VmRSS:")?, field("RssAnon:")?))
}

/// utime + stime of a process (`"self"` or a pid), in clock ticks.
fn cpu_ticks(pid: &str) -> Result<u64> {
    let path = format!("/proc/{pid}/stat");
    let s = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    // The command name may hold spaces; the fields after it start with the
    // state (field 3), so utime (14) and stime (15) are the 12th and 13th.
    let rest = s
        .rsplit_once(')')
        .map(|(_, r)| r)
        .with_context(|| format!("unexpected {path}"))?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let n = |i: usize| -> Result<u64> {
        f.get(i)
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("unexpected {path}"))
    };
    Ok(n(11)? + n(12)?)
}

/// Time the threads a process has now have run on a CPU, in nanoseconds,
/// from `/proc/<pid>/task/*/schedstat` (the scheduler's own count, not
/// sampled per tick); `None` where the kernel does not provide it.
fn cpu_ns(pid: &str) -> Option<u64> {
    let mut total = 0;
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
        .ok()?
        .flatten()
    {
        let s = std::fs::read_to_string(t.path().join("schedstat")).ok()?;
        total += s.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(total)
}

/// Milliseconds per clock tick (`getconf CLK_TCK`, usually 100 per second).
fn ms_per_tick() -> f64 {
    let hz = std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|&h| h > 0.0)
        .unwrap_or(100.0);
    1000.0 / hz
}

/// Raises this process's soft limit on open files to its hard limit, for
/// this program and the processes it starts (they inherit it); the
/// machine's settings stay as they are.
fn raise_nofile() {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut l = getrlimit(Resource::Nofile);
    if l.current < l.maximum {
        l.current = l.maximum;
        if let Err(e) = setrlimit(Resource::Nofile, l) {
            progress(&format!("cannot raise the open-files limit: {e}"));
        }
    }
}

/// The soft limit on open files of this process (children inherit it).
fn nofile_limit() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/limits").ok()?;
    let l = s.lines().find(|l| l.starts_with("Max open files"))?;
    l.split_whitespace().nth(3)?.parse().ok()
}

async fn connect(b: &Backend) -> Result<Client> {
    timeout(Duration::from_secs(10), b.client())
        .await
        .with_context(|| format!("connecting to {} timed out", b.grpc))
}

async fn create_random(c: &mut Client) -> Result<u64> {
    let r = timeout(
        CALL_TIMEOUT,
        c.create_secret(pb::CreateSecretRequest {
            id: SECRET_ID.into(),
            kind: "random".into(),
            random: Some(pb::RandomOptions {
                length: 32,
                encoding: "hex".into(),
            }),
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

/// The bytes a `raw` output of `version` holds.
async fn reveal(c: &mut Client, version: u64) -> Result<Vec<u8>> {
    let r = timeout(
        CALL_TIMEOUT,
        c.get_secret(pb::GetSecretRequest {
            secret_id: SECRET_ID.into(),
            selector: Some(pb::get_secret_request::Selector::Version(version)),
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
        .with_context(|| format!("GetSecret returned no value for v{version}"))?
    {
        pb::secret_value::Value::Raw(b) => Ok(b),
        pb::secret_value::Value::Fields(_) => bail!("v{version} has fields, expected raw bytes"),
    }
}

/// One Rotate call; the new version, and when the call was sent and
/// returned.
async fn rotate(c: &mut Client) -> Result<(u64, Instant, Instant)> {
    let sent = Instant::now();
    let r = timeout(
        CALL_TIMEOUT,
        c.rotate(pb::RotateRequest {
            secret_id: SECRET_ID.into(),
            ..Default::default()
        }),
    )
    .await
    .context("Rotate timed out")?
    .context("Rotate failed")?
    .into_inner();
    let returned = Instant::now();
    let v = r.version.context("Rotate returned no version")?.version;
    Ok((v, sent, returned))
}

/// `(converged, live_consumers)` of the secret, as `rekey status` shows it.
async fn convergence(c: &mut Client) -> Result<(u32, u32)> {
    let r = timeout(
        CALL_TIMEOUT,
        c.get_status(pb::GetStatusRequest {
            secret_id: SECRET_ID.into(),
        }),
    )
    .await
    .context("GetStatus timed out")?
    .context("GetStatus failed")?
    .into_inner();
    let s = r
        .secrets
        .into_iter()
        .next()
        .context("GetStatus returned no secret")?;
    Ok((s.converged, s.live_consumers))
}

/// One HTTP GET with a bounded wait; the whole response.
async fn http_get(addr: &str, path: &str) -> Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    timeout(Duration::from_secs(10), async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
        let mut out = String::new();
        s.read_to_string(&mut out).await?;
        Ok::<_, std::io::Error>(out)
    })
    .await
    .with_context(|| format!("GET http://{addr}{path} timed out"))?
    .with_context(|| format!("GET http://{addr}{path} failed"))
}

/// The value of the first sample line whose name and labels start with
/// `prefix` and that contains every string in `having`.
fn sample(body: &str, prefix: &str, having: &[&str]) -> Option<f64> {
    body.lines()
        .filter(|l| l.starts_with(prefix) && having.iter().all(|h| l.contains(h)))
        .find_map(|l| l.rsplit(' ').next()?.trim().parse().ok())
}

// -------------------------------------------------------------------- fleet

struct Member {
    sidecar: Sidecar,
    path: PathBuf,
    pid: u32,
}

/// Starts `n` sidecars at once (one thread each); each has its own
/// directory under `root`, and its secret file in one of its own under
/// `files`.
fn start_fleet(
    root: &Path,
    files: &Path,
    n: usize,
    backend: &str,
    token: &Path,
) -> Result<Vec<Member>> {
    let handles: Vec<_> = (0..n)
        .map(|i| {
            let dir = root.join(format!("sc-{i}"));
            let path = files.join(format!("sc-{i}"));
            let backend = backend.to_string();
            let token = token.display().to_string();
            std::thread::Builder::new()
                .name(format!("start-sc-{i}"))
                .spawn(move || -> Result<Member> {
                    for d in [&dir, &path] {
                        std::fs::create_dir_all(d)
                            .with_context(|| format!("cannot create {}", d.display()))?;
                    }
                    let path = path.join("secret");
                    let secret = format!("{SECRET_ID}:{}", path.display());
                    let consumer = format!("sc-{i}");
                    // Panics (with the sidecar's log) if it does not print
                    // its listening line within 30 s.
                    let sidecar = Sidecar::start(
                        &dir,
                        &[
                            "--backend",
                            &backend,
                            "--token-file",
                            &token,
                            "--secret",
                            &secret,
                            "--listen",
                            "127.0.0.1:0",
                        ],
                        &[("REKEY_CONSUMER_ID", &consumer), ("RUST_LOG", "warn")],
                    );
                    let pid = sidecar.pid();
                    Ok(Member { sidecar, path, pid })
                })
                .context("cannot start a thread")
        })
        .collect::<Result<_>>()?;
    let mut fleet = Vec::with_capacity(n);
    let mut errors = Vec::new();
    for (i, h) in handles.into_iter().enumerate() {
        match h.join() {
            Ok(Ok(m)) => fleet.push(m),
            Ok(Err(e)) => errors.push(format!("sidecar {i}: {e:#}")),
            Err(p) => {
                let msg = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                errors.push(format!(
                    "sidecar {i}: {}",
                    msg.lines().next().unwrap_or("panicked")
                ));
            }
        }
    }
    if !errors.is_empty() {
        // `fleet` is dropped here: the started sidecars are killed.
        bail!(
            "{} of {n} sidecars did not start; first: {}",
            errors.len(),
            errors[0]
        );
    }
    Ok(fleet)
}

/// CPU time in ms: `(from utime + stime, from the scheduler)`.
type CpuMs = (f64, Option<f64>);

/// CPU time of a set of processes: utime + stime in clock ticks, and the
/// scheduler's run time in ns (when every process has it).
#[derive(Clone, Copy, Default)]
struct Cpu {
    ticks: u64,
    ns: Option<u64>,
}

impl Cpu {
    fn of(pids: &[String]) -> Result<Cpu> {
        let mut c = Cpu {
            ticks: 0,
            ns: Some(0),
        };
        for p in pids {
            c.ticks += cpu_ticks(p)?;
            c.ns = c.ns.zip(cpu_ns(p)).map(|(a, b)| a + b);
        }
        Ok(c)
    }

    /// The CPU time between `self` and `later`.
    fn ms_until(self, later: Cpu, tick_ms: f64) -> CpuMs {
        (
            later.ticks.saturating_sub(self.ticks) as f64 * tick_ms,
            self.ns
                .zip(later.ns)
                .map(|(a, b)| b.saturating_sub(a) as f64 / 1e6),
        )
    }
}

/// `(mean, min, max)` VmRSS and mean RssAnon over the fleet, in KiB, and
/// the VmRSS total.
struct FleetRss {
    mean: f64,
    min: u64,
    max: u64,
    anon_mean: f64,
    total: u64,
}

fn fleet_rss(fleet: &[Member]) -> Result<FleetRss> {
    let v: Vec<(u64, u64)> = fleet
        .iter()
        .map(|m| rss_kib(m.pid))
        .collect::<Result<_>>()?;
    let total: u64 = v.iter().map(|x| x.0).sum();
    Ok(FleetRss {
        mean: total as f64 / v.len() as f64,
        min: v.iter().map(|x| x.0).min().unwrap_or(0),
        max: v.iter().map(|x| x.0).max().unwrap_or(0),
        anon_mean: v.iter().map(|x| x.1).sum::<u64>() as f64 / v.len() as f64,
        total,
    })
}

fn inodes(paths: &[PathBuf]) -> Result<Vec<u64>> {
    paths
        .iter()
        .map(|p| {
            std::fs::metadata(p)
                .map(|m| m.ino())
                .with_context(|| format!("cannot stat {}", p.display()))
        })
        .collect()
}

/// What one poll of a rotation saw.
struct Arrivals {
    /// Per file: when its new inode was first seen, since `from`.
    times: Vec<Duration>,
    /// The new inode per file.
    inodes: Vec<u64>,
    sweeps: u64,
    /// Time spent inside sweeps (not sleeping).
    busy: Duration,
}

/// Polls until every path's inode differs from `old`, or fails at
/// `deadline`.
fn poll_arrivals(
    paths: &[PathBuf],
    old: &[u64],
    from: Instant,
    deadline: Instant,
) -> Result<Arrivals> {
    let n = paths.len();
    let mut times = vec![Duration::ZERO; n];
    let mut new = old.to_vec();
    let mut pending: Vec<usize> = (0..n).collect();
    let mut sweeps = 0u64;
    let mut busy = Duration::ZERO;
    loop {
        let started = Instant::now();
        sweeps += 1;
        let mut i = 0;
        while i < pending.len() {
            let k = pending[i];
            let ino = std::fs::metadata(&paths[k])
                .map(|m| m.ino())
                .with_context(|| format!("cannot stat {}", paths[k].display()))?;
            if ino != old[k] {
                times[k] = Instant::now().saturating_duration_since(from);
                new[k] = ino;
                pending.swap_remove(i);
            } else {
                i += 1;
            }
        }
        busy += started.elapsed();
        if pending.is_empty() {
            return Ok(Arrivals {
                times,
                inodes: new,
                sweeps,
                busy,
            });
        }
        if Instant::now() > deadline {
            bail!(
                "only {} of {n} files changed within {DELIVERY_TIMEOUT:?} (first unchanged: {})",
                n - pending.len(),
                paths[pending[0]].display()
            );
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

/// Every file holds `want`.
fn check_contents(paths: &[PathBuf], want: &[u8], version: u64) -> Result<()> {
    for p in paths {
        let got = std::fs::read(p).with_context(|| format!("cannot read {}", p.display()))?;
        ensure!(
            got == want,
            "{} does not hold v{version} ({} bytes, expected {})",
            p.display(),
            got.len(),
            want.len()
        );
    }
    Ok(())
}

// --------------------------------------------------------------------- run

struct FleetRun {
    n: usize,
    rotations: usize,
    start_time: Duration,
    /// Rotate returned -> the last file changed, per rotation.
    last: Stats,
    /// Rotate returned -> the first file changed, per rotation.
    first: Stats,
    /// Rotate returned -> each file changed (all rotations pooled).
    each: Stats,
    /// Rotate sent -> the last file changed, per rotation.
    last_from_send: Stats,
    /// The Rotate call, sent -> returned.
    rotate_rpc: Stats,
    rotate_alone: Stats,
    sweep_mean: Duration,
    sweeps_per_rotation: f64,
    /// The sidecars' own delivery_seconds (backend publish -> file
    /// written), mean over every measured and warm-up delivery.
    sidecar_delivery_mean_ms: f64,
    extra_writes: usize,
    deliveries_ok_min: f64,
    deliveries_ok_max: f64,
    reconnects: f64,
    converged: (u32, u32),
    exited_ok: usize,
    rss_idle: FleetRss,
    rss_after: FleetRss,
    backend_rss_before: u64,
    backend_rss_idle: u64,
    backend_rss_after: u64,
    idle_secs: f64,
    idle_cpu_ms: CpuMs,
    idle_backend_cpu_ms: CpuMs,
    rot_secs: f64,
    rot_cpu_ms: CpuMs,
    rot_backend_cpu_ms: CpuMs,
    rot_self_cpu_ms: CpuMs,
}

async fn fleet_run(s: &Settings, n: usize) -> Result<FleetRun> {
    let tick_ms = ms_per_tick();
    let dir = TempDir::new(&format!("bench-sidecars-{n}"));
    let b = Backend::start(
        dir.path(),
        BackendOpts {
            rust_log: Some("warn".into()),
            ..Default::default()
        },
    );
    let bpid = b.pid();
    let mut admin = connect(&b).await?;
    let v0 = create_random(&mut admin).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let backend_rss_before = rss_kib(bpid)?.0;

    // The same backend and secret with no sidecar yet: the baseline of
    // the ratio "Rotate with the fleet / Rotate alone".
    progress(&format!("{} Rotate calls before any sidecar", s.alone));
    let mut alone = Vec::with_capacity(s.alone);
    let mut version = v0;
    for r in 0..WARMUP + s.alone {
        let (v, sent, returned) = rotate(&mut admin)
            .await
            .with_context(|| format!("rotation {} without sidecars", r + 1))?;
        ensure!(
            v == version + 1,
            "Rotate returned v{v}, expected v{}",
            version + 1
        );
        version = v;
        if r >= WARMUP {
            alone.push(returned - sent);
        }
    }
    let v0 = version;
    let value0 = reveal(&mut admin, v0).await?;

    progress(&format!("starting {n} sidecars"));
    let started = Instant::now();
    let root = dir.path().to_path_buf();
    let files_dir = match &s.files {
        Some(base) => TempDir::new_in(base, &format!("bench-files-{n}")),
        None => TempDir::new(&format!("bench-files-{n}")),
    };
    let files = files_dir.path().to_path_buf();
    let grpc = b.grpc.clone();
    let token = b.token_path();
    // Each start is bounded (30 s) by the harness.
    let fleet = tokio::task::spawn_blocking(move || start_fleet(&root, &files, n, &grpc, &token))
        .await
        .context("the start-up thread failed")??;
    let paths: Vec<PathBuf> = fleet.iter().map(|m| m.path.clone()).collect();
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        let missing = paths
            .iter()
            .filter(|p| std::fs::read(p).map(|c| c != value0).unwrap_or(true))
            .count();
        if missing == 0 {
            break;
        }
        if Instant::now() > deadline {
            bail!("{missing} of {n} sidecars' files do not hold v{v0} after {READY_TIMEOUT:?}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let start_time = started.elapsed();
    progress(&format!(
        "{n} sidecars started, every file holds v{v0}, after {:.2} s; settling {} s, then idle for {} s",
        start_time.as_secs_f64(),
        SETTLE.as_secs(),
        s.idle.as_secs()
    ));
    tokio::time::sleep(SETTLE).await;

    let idle_t0 = Instant::now();
    let pids: Vec<String> = fleet.iter().map(|m| m.pid.to_string()).collect();
    let bpids = [bpid.to_string()];
    let me = ["self".to_string()];
    let idle_c0 = Cpu::of(&pids)?;
    let idle_b0 = Cpu::of(&bpids)?;
    tokio::time::sleep(s.idle).await;
    let idle_c1 = Cpu::of(&pids)?;
    let idle_b1 = Cpu::of(&bpids)?;
    let idle_secs = idle_t0.elapsed().as_secs_f64();
    let rss_idle = fleet_rss(&fleet)?;
    let backend_rss_idle = rss_kib(bpid)?.0;

    let mut last_s = Vec::new();
    let mut first_s = Vec::new();
    let mut each = Vec::new();
    let mut last_send = Vec::new();
    let mut rpc = Vec::new();
    let mut sweeps = 0u64;
    let mut busy = Duration::ZERO;
    let mut extra_writes = 0usize;
    let mut known = inodes(&paths)?;
    let mut rot_t0 = Instant::now();
    let (mut rot_c0, mut rot_b0, mut rot_s0) = (Cpu::default(), Cpu::default(), Cpu::default());
    for r in 0..WARMUP + s.rotations {
        if r == WARMUP {
            rot_t0 = Instant::now();
            rot_c0 = Cpu::of(&pids)?;
            rot_b0 = Cpu::of(&bpids)?;
            rot_s0 = Cpu::of(&me)?;
        }
        let target = version + 1;
        let old = inodes(&paths)?;
        extra_writes += old.iter().zip(&known).filter(|(a, b)| a != b).count();
        let (v, sent, returned) = rotate(&mut admin)
            .await
            .with_context(|| format!("rotation {}", r + 1))?;
        ensure!(v == target, "Rotate returned v{v}, expected v{target}");
        version = v;
        let deadline = returned + DELIVERY_TIMEOUT;
        let ps = paths.clone();
        let a = tokio::task::spawn_blocking(move || poll_arrivals(&ps, &old, returned, deadline))
            .await
            .context("the polling thread failed")?
            .with_context(|| format!("rotation to v{target}"))?;
        known = a.inodes;
        let want = reveal(&mut admin, v).await?;
        check_contents(&paths, &want, v)?;
        let slowest = a.times.iter().copied().max().unwrap_or_default();
        let fastest = a.times.iter().copied().min().unwrap_or_default();
        let took = returned - sent;
        progress(&format!(
            "rotation {}/{} to v{target}: Rotate {} ms; after it returned: first file {} ms, last file {} ms ({} sweeps){}",
            r + 1,
            WARMUP + s.rotations,
            ms(took),
            ms(fastest),
            ms(slowest),
            a.sweeps,
            if r < WARMUP { " (warm-up)" } else { "" }
        ));
        if r >= WARMUP {
            last_s.push(slowest);
            first_s.push(fastest);
            last_send.push(slowest + took);
            rpc.push(took);
            each.extend(a.times);
            sweeps += a.sweeps;
            busy += a.busy;
        }
        tokio::time::sleep(s.gap).await;
    }
    let rot_c1 = Cpu::of(&pids)?;
    let rot_b1 = Cpu::of(&bpids)?;
    let rot_s1 = Cpu::of(&me)?;
    let rot_secs = rot_t0.elapsed().as_secs_f64();
    extra_writes += inodes(&paths)?
        .iter()
        .zip(&known)
        .filter(|(a, b)| a != b)
        .count();
    let rss_after = fleet_rss(&fleet)?;
    let backend_rss_after = rss_kib(bpid)?.0;

    // The sidecars' own view.
    let mut ok_min = f64::MAX;
    let mut ok_max = 0f64;
    let mut reconnects = 0f64;
    let mut dsum = 0f64;
    let mut dcount = 0f64;
    for (i, m) in fleet.iter().enumerate() {
        let body = http_get(&m.sidecar.http, "/metrics")
            .await
            .with_context(|| format!("sidecar {i}"))?;
        let ok = sample(
            &body,
            "rekey_sidecar_deliveries_total{",
            &["outcome=\"ok\""],
        )
        .with_context(|| format!("sidecar {i}: no ok deliveries in /metrics"))?;
        ok_min = ok_min.min(ok);
        ok_max = ok_max.max(ok);
        reconnects += sample(&body, "rekey_sidecar_backend_reconnects_total ", &[]).unwrap_or(0.0);
        dsum += sample(&body, "rekey_sidecar_delivery_seconds_sum ", &[])
            .with_context(|| format!("sidecar {i}: no delivery_seconds_sum in /metrics"))?;
        dcount += sample(&body, "rekey_sidecar_delivery_seconds_count ", &[])
            .with_context(|| format!("sidecar {i}: no delivery_seconds_count in /metrics"))?;
    }

    // The backend's view (ReportStatus from every sidecar).
    let deadline = Instant::now() + STATUS_TIMEOUT;
    let converged = loop {
        let c = convergence(&mut admin).await?;
        if c == (n as u32, n as u32) {
            break c;
        }
        if Instant::now() > deadline {
            bail!(
                "after {STATUS_TIMEOUT:?} the backend shows {} of {} live consumers converged, expected {n} of {n}",
                c.0,
                c.1
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };

    progress(&format!("stopping {n} sidecars (SIGTERM)"));
    let exits = tokio::task::spawn_blocking(move || {
        let handles: Vec<_> = fleet
            .into_iter()
            .map(|mut m| std::thread::spawn(move || m.sidecar.stop()))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().ok().flatten())
            .collect::<Vec<_>>()
    })
    .await
    .context("the stopping thread failed")?;
    let exited_ok = exits.iter().filter(|c| **c == Some(0)).count();
    drop(b);

    let sweeps_n = sweeps.max(1);
    Ok(FleetRun {
        n,
        rotations: s.rotations,
        start_time,
        last: stats(last_s),
        first: stats(first_s),
        each: stats(each),
        last_from_send: stats(last_send),
        rotate_rpc: stats(rpc),
        rotate_alone: stats(alone),
        sweep_mean: busy / sweeps_n as u32,
        sweeps_per_rotation: sweeps as f64 / s.rotations as f64,
        sidecar_delivery_mean_ms: if dcount > 0.0 {
            dsum / dcount * 1e3
        } else {
            0.0
        },
        extra_writes,
        deliveries_ok_min: ok_min,
        deliveries_ok_max: ok_max,
        reconnects,
        converged,
        exited_ok,
        rss_idle,
        rss_after,
        backend_rss_before,
        backend_rss_idle,
        backend_rss_after,
        idle_secs,
        idle_cpu_ms: idle_c0.ms_until(idle_c1, tick_ms),
        idle_backend_cpu_ms: idle_b0.ms_until(idle_b1, tick_ms),
        rot_secs,
        rot_cpu_ms: rot_c0.ms_until(rot_c1, tick_ms),
        rot_backend_cpu_ms: rot_b0.ms_until(rot_b1, tick_ms),
        rot_self_cpu_ms: rot_s0.ms_until(rot_s1, tick_ms),
    })
}

fn report(f: &FleetRun) -> String {
    let n = f.n as f64;
    let r = f.rotations as f64;
    let mut out = String::new();
    out.push_str(&format!(
        "\n{} sidecars, one backend (SQLite store), {} rotations after {WARMUP} warm-up\n",
        f.n, f.rotations
    ));
    out.push_str(&format!(
        "start-up: all {} started in parallel; every file held v1 after {:.2} s\n",
        f.n,
        f.start_time.as_secs_f64()
    ));
    let mut t = Table::stats("from the Rotate call returning until");
    t.stats_row("  the last sidecar's file has the value", &f.last);
    t.stats_row("  the first sidecar's file has it", &f.first);
    t.stats_row("  each file has it (all rotations pooled)", &f.each);
    t.stats_row(
        "from just before Rotate is sent: last file",
        &f.last_from_send,
    );
    t.stats_row("the Rotate call itself", &f.rotate_rpc);
    t.stats_row(
        "the Rotate call, same backend before any sidecar",
        &f.rotate_alone,
    );
    out.push_str(&t.render());
    out.push_str(&format!(
        "Rotate p50 with the fleet / alone: {:.2}\n",
        f.rotate_rpc.p50.as_secs_f64() / f.rotate_alone.p50.as_secs_f64().max(1e-9)
    ));
    out.push_str(&format!(
        "polling: {:.1} sweeps per rotation, a sweep (stat of the files not yet changed) took {} ms on average, then 1 ms sleep\n",
        f.sweeps_per_rotation,
        ms(f.sweep_mean)
    ));
    out.push_str(&format!(
        "sidecars' own rekey_sidecar_delivery_seconds (backend publish -> file written), mean: {:.2} ms\n",
        f.sidecar_delivery_mean_ms
    ));
    out.push_str(&format!(
        "checks: every file held the revealed value after each rotation; extra writes: {}; ok deliveries per sidecar: {}..{} (expected {}); reconnects: {}; backend status: {}/{} live consumers converged; exited 0 on SIGTERM: {}/{}\n",
        f.extra_writes,
        f.deliveries_ok_min,
        f.deliveries_ok_max,
        f.rotations + WARMUP + 1,
        f.reconnects,
        f.converged.0,
        f.converged.1,
        f.exited_ok,
        f.n
    ));
    out.push_str("\nMemory (VmRSS)\n");
    let mut t = ["mean", "min", "max", "RssAnon mean", "all sidecars"]
        .iter()
        .fold(Table::new(""), |t, h| t.right(h));
    for (label, x) in [
        ("per sidecar, idle (before rotations)", &f.rss_idle),
        (
            &*format!("per sidecar, after {} rotations", f.rotations + WARMUP),
            &f.rss_after,
        ),
    ] {
        t.row([
            label.to_string(),
            mib(x.mean),
            mib(x.min as f64),
            mib(x.max as f64),
            mib(x.anon_mean),
            mib(x.total as f64),
        ]);
    }
    out.push_str(&t.render());
    out.push_str(&format!(
        "backend: {} before the sidecars, {} with {} idle sidecars, {} after the rotations\n",
        mib(f.backend_rss_before as f64),
        mib(f.backend_rss_idle as f64),
        f.n,
        mib(f.backend_rss_after as f64)
    ));
    out.push_str(&format!(
        "\nCPU time: utime + stime from /proc/<pid>/stat ({:.0} ms ticks), and the scheduler's run time from /proc/<pid>/task/*/schedstat\n",
        ms_per_tick()
    ));
    let mut t = ["window s", "stat ms", "stat per", "sched ms", "sched per"]
        .iter()
        .fold(Table::new(""), |t, h| t.right(h))
        .left("per");
    let rot_label = format!("rotations ({})", f.rotations);
    // (who, when, window s, CPU ms, divisor, per what)
    let rows: [(&str, &str, f64, CpuMs, f64, &str); 5] = [
        (
            "sidecars",
            "idle",
            f.idle_secs,
            f.idle_cpu_ms,
            n * f.idle_secs,
            "sidecar and second",
        ),
        (
            "sidecars",
            &rot_label,
            f.rot_secs,
            f.rot_cpu_ms,
            n * r,
            "sidecar and rotation",
        ),
        (
            "backend",
            "idle",
            f.idle_secs,
            f.idle_backend_cpu_ms,
            f.idle_secs,
            "second",
        ),
        (
            "backend",
            &rot_label,
            f.rot_secs,
            f.rot_backend_cpu_ms,
            r,
            "rotation",
        ),
        (
            "this program (polling)",
            &rot_label,
            f.rot_secs,
            f.rot_self_cpu_ms,
            r,
            "rotation",
        ),
    ];
    for (who, when, secs, (stat, sched), div, per) in rows {
        let sched_s =
            |v: Option<f64>, d: f64| v.map_or("-".to_string(), |x| format!("{:.3}", x / d));
        t.row([
            format!("{who}, {when}"),
            format!("{secs:.1}"),
            format!("{stat:.0}"),
            format!("{:.3}", stat / div),
            sched.map_or("-".to_string(), |x| format!("{x:.0}")),
            sched_s(sched, div),
            per.to_string(),
        ]);
    }
    out.push_str(&t.render());
    out
}

async fn run(s: &Settings) -> Result<String> {
    let max_n = s.sidecars.iter().copied().max().unwrap_or(0);
    raise_nofile();
    if let Some(limit) = nofile_limit() {
        // This program holds a pipe per sidecar; the backend (which inherits
        // the limit) a connection per sidecar and its store.
        ensure!(
            limit >= (max_n as u64) * 4 + 256,
            "the open-files limit is {limit} (hard limit included); raise it (ulimit -Hn) to at least {} for {max_n} sidecars",
            max_n * 4 + 256
        );
    }
    progress(&format!(
        "sidecar binary: {}",
        rekey_testkit::SIDECAR.path().display()
    ));
    let mut out = format!(
        "\nrekey-sidecar propagation benchmark: backend, sidecars and this program on one machine ({} CPUs)\n",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    out.push_str(&format!(
        "secret files in {}\n",
        s.files.as_ref().map_or_else(
            || format!(
                "{} (REKEY_BENCH_FILES=disk)",
                std::env::temp_dir().display()
            ),
            |p| format!(
                "{} (tmpfs, as an emptyDir with medium: Memory)",
                p.display()
            )
        )
    ));
    for &n in &s.sidecars {
        let f = fleet_run(s, n)
            .await
            .with_context(|| format!("{n} sidecars"))?;
        let part = report(&f);
        eprint!("{part}");
        out.push_str(&part);
        let bad = f.extra_writes > 0
            || f.reconnects > 0.0
            || f.exited_ok != f.n
            || f.deliveries_ok_min != f.deliveries_ok_max
            || f.deliveries_ok_min != (f.rotations + WARMUP + 1) as f64;
        if bad {
            print!("{out}");
            bail!("{n} sidecars: a check failed (see the checks line above)");
        }
    }
    out.push('\n');
    Ok(out)
}
