//! `rekey demo`: the whole flow on one machine in a few seconds.
//!
//! It starts an embedded backend and two "pods", each a `rekey-sidecar`
//! plus a small HTTP app (`rekey demo-app`) that authenticates callers with
//! a rotated API key, and a load generator that calls both apps with the
//! key their pod holds. It rotates the key several times under load and
//! prints a timeline: each rotation, when each sidecar had the new version
//! on disk, which versions the apps accepted, how many requests failed and
//! how many pod containers restarted. Both should be zero: nothing restarts
//! and files are swapped atomically. The restarts are counted, not
//! assumed: the pods are supervised as kubelet would (a process that exits
//! is started again), and the demo fails if any request failed or any
//! process had to be started again.

mod app;
mod pods;

pub use app::{AppArgs, serve as serve_app};

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rekey_proto::v1 as pb;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::error::CliError;
use pods::{Container, Proc, Supervisor};

/// Options of `rekey demo`.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// How many rotations to run.
    #[arg(long, default_value_t = 5)]
    pub rotations: u32,
    /// Time between rotations.
    #[arg(long, default_value = "1s")]
    pub interval: String,
    /// Requests per second from the load generator (over both apps).
    #[arg(long, default_value_t = 200)]
    pub rate: u32,
    /// Keep the working directory (logs, files) instead of removing it.
    #[arg(long)]
    pub keep: bool,
}

/// The secret the demo rotates.
const SECRET: &str = "demo/api/key";
/// How long each pod may take to have a new version on disk.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(10);

fn failed(e: impl std::fmt::Display) -> CliError {
    CliError::failed(format!("demo: {e}"))
}

/// A binary installed next to this `rekey`.
fn sibling(name: &str) -> Result<PathBuf, CliError> {
    let me = std::env::current_exe().map_err(failed)?;
    let p = me.with_file_name(name);
    if p.exists() {
        Ok(p)
    } else {
        Err(failed(format!(
            "{name} not found next to {} (build the workspace: cargo build --release)",
            me.display()
        )))
    }
}

/// GET / with a bearer key; returns (status, body).
async fn call(addr: &str, key: &str) -> Result<(u16, String), String> {
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let req = format!(
        "GET / HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {key}\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut out = String::new();
    s.read_to_string(&mut out)
        .await
        .map_err(|e| e.to_string())?;
    let code = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((code, body))
}

fn keyring_json(keyring: &Path) -> Option<serde_json::Value> {
    serde_json::from_slice(&std::fs::read(keyring).ok()?).ok()
}

fn current_version(keyring: &Path) -> u64 {
    keyring_json(keyring)
        .and_then(|j| j["current"]["version"].as_u64())
        .unwrap_or(0)
}

/// `[  1.108s]`: time since the demo started.
fn stamp(t0: Instant) -> String {
    format!("[{:>7.3}s]", t0.elapsed().as_secs_f64())
}

/// One pod as the load generator sees it: the app's address and the
/// keyring file the sidecar writes.
#[derive(Clone)]
struct Pod {
    app: String,
    keyring: PathBuf,
}

/// What the load generator counted.
#[derive(Default)]
struct Load {
    ok: AtomicU64,
    failed: AtomicU64,
    /// Requests per (pod, version the app accepted).
    seen: Mutex<BTreeMap<(usize, String), u64>>,
    stop: AtomicBool,
}

/// Calls the pods' apps in turn, `rate` times a second, each with the key
/// its own sidecar delivered, until stopped.
async fn generate_load(load: Arc<Load>, pods: Vec<Pod>, rate: u32) {
    let period = Duration::from_secs_f64(1.0 / f64::from(rate.max(1)));
    let mut tick = tokio::time::interval(period);
    let mut n = 0usize;
    while !load.stop.load(Ordering::Relaxed) {
        tick.tick().await;
        let i = n % pods.len();
        n += 1;
        let key = keyring_json(&pods[i].keyring)
            .and_then(|j| j["current"]["value"].as_str().map(str::to_string))
            .unwrap_or_default();
        match call(&pods[i].app, &key).await {
            Ok((200, body)) => {
                load.ok.fetch_add(1, Ordering::Relaxed);
                *load
                    .seen
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .entry((i, body))
                    .or_default() += 1;
            }
            _ => {
                load.failed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// The backend process and a client with the admin token.
struct Backend {
    proc_: Proc,
    addr: String,
    token_file: PathBuf,
    client: pb::rekey_client::RekeyClient<
        tonic::service::interceptor::InterceptedService<
            tonic::transport::Channel,
            crate::client::Bearer,
        >,
    >,
}

async fn start_backend(dir: &Path, t0: Instant) -> Result<Backend, CliError> {
    let cfg = dir.join("backend.toml");
    std::fs::write(
        &cfg,
        format!(
            "listen = \"127.0.0.1:0\"\nmetrics_listen = \"off\"\ndata_dir = {:?}\n",
            dir.join("data").display().to_string()
        ),
    )
    .map_err(failed)?;
    let (proc_, line) = pods::spawn(
        &sibling("rekey-backend")?,
        &["--config".into(), cfg.display().to_string()],
        &dir.join("backend.log"),
    )?;
    let grpc = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("grpc="))
        .ok_or_else(|| failed("unexpected backend output"))?
        .to_string();
    let addr = format!("http://{grpc}");
    println!(
        "{} backend listening on {grpc} (embedded SQLite in {})",
        stamp(t0),
        dir.join("data").display()
    );
    let token_file = dir.join("data").join("admin.token");
    let args = crate::args::BackendArgs {
        addr: addr.clone(),
        token: None,
        token_file: Some(token_file.clone()),
        ca_file: None,
        cert_file: None,
        key_file: None,
    };
    let client = crate::client::Target::from_args(&args)?.connect().await?;
    Ok(Backend {
        proc_,
        addr,
        token_file,
        client,
    })
}

/// Starts pod `i`: its sidecar (which writes the keyring before it prints
/// its first line) and its app.
fn start_pod(
    i: usize,
    dir: &Path,
    b: &Backend,
    t0: Instant,
) -> Result<(Pod, [Container; 2]), CliError> {
    let pod = dir.join(format!("pod-{i}"));
    std::fs::create_dir_all(&pod).map_err(failed)?;
    let keyring = pod.join("api-key.keyring.json");
    let sc_cfg = pod.join("sidecar.toml");
    std::fs::write(
        &sc_cfg,
        format!(
            "backend = {:?}\ntoken_file = {:?}\nlisten = \"127.0.0.1:0\"\nconsumer_id = \"pod-{i}\"\n[[secrets]]\nid = {SECRET:?}\npath = {:?}\nkeyring_path = {:?}\n",
            b.addr,
            b.token_file.display().to_string(),
            pod.join("api-key").display().to_string(),
            keyring.display().to_string(),
        ),
    )
    .map_err(failed)?;
    let (sidecar, _) = Container::start(
        format!("pod-{i} sidecar"),
        &sibling("rekey-sidecar")?,
        vec!["--config".into(), sc_cfg.display().to_string()],
        pod.join("sidecar.log"),
    )?;
    let me = std::env::current_exe().map_err(failed)?;
    let app_args = |listen: &str| {
        vec![
            "demo-app".to_string(),
            "--keyring".into(),
            keyring.display().to_string(),
            "--listen".into(),
            listen.to_string(),
        ]
    };
    let (mut app, line) = Container::start(
        format!("pod-{i} app"),
        &me,
        app_args("127.0.0.1:0"),
        pod.join("app.log"),
    )?;
    let app_addr = line
        .strip_prefix("listening ")
        .ok_or_else(|| failed(format!("unexpected app output {line:?}")))?
        .to_string();
    // A pod keeps its address across restarts.
    app.restart_with(app_args(&app_addr));
    println!(
        "{} pod-{i}: sidecar (pid {}) wrote v{} to {}; app (pid {}) serving on {app_addr}",
        stamp(t0),
        sidecar.pid(),
        current_version(&keyring),
        keyring.display(),
        app.pid()
    );
    Ok((
        Pod {
            app: app_addr,
            keyring,
        },
        [sidecar, app],
    ))
}

/// Runs the demo. It fails (after printing the whole timeline) if a request
/// failed or a pod container had to be started again.
pub async fn run(args: &DemoArgs) -> Result<(), CliError> {
    let interval = humantime::parse_duration(&args.interval).map_err(|_| {
        CliError::usage(format!(
            "--interval {:?} is not a duration such as 1s",
            args.interval
        ))
    })?;
    let dir = std::env::temp_dir().join(format!("rekey-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(failed)?;
    let result = run_in(args, interval, &dir).await;
    if args.keep {
        println!("logs and files kept in {}", dir.display());
    } else {
        let _ = std::fs::remove_dir_all(&dir);
    }
    result
}

async fn run_in(args: &DemoArgs, interval: Duration, dir: &Path) -> Result<(), CliError> {
    let t0 = Instant::now();
    println!(
        "rekey demo: 1 backend, 2 pods (sidecar + app), {} requests/s, {} rotations\n",
        args.rate, args.rotations
    );
    let mut b = start_backend(dir, t0).await?;
    b.client
        .create_secret(pb::CreateSecretRequest {
            id: SECRET.into(),
            kind: "random".into(),
            ..Default::default()
        })
        .await
        .map_err(|e| failed(format!("create: {}", e.message())))?;
    println!("{} created {SECRET} v1 (random, 32 bytes)", stamp(t0));

    let mut pods = Vec::new();
    let mut containers = Vec::new();
    for i in 0..2 {
        let (pod, cs) = start_pod(i, dir, &b, t0)?;
        pods.push(pod);
        containers.extend(cs);
    }
    let supervisor = Supervisor::watch(containers, t0);

    let load = Arc::new(Load::default());
    let generator = tokio::spawn(generate_load(load.clone(), pods.clone(), args.rate));
    tokio::time::sleep(interval).await;
    for r in 0..args.rotations {
        rotate_once(&mut b, &pods, r, t0).await?;
        tokio::time::sleep(interval).await;
    }
    load.stop.store(true, Ordering::Relaxed);
    let _ = generator.await;
    let (containers, restarts) = supervisor.finish(t0).await?;

    println!("\nwhat the apps accepted (requests per key version):");
    for ((pod, version), n) in load
        .seen
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .iter()
    {
        println!("  pod-{pod} {version}: {n}");
    }
    if !restarts.is_empty() {
        println!("\ncontainers that exited and were started again:");
        for r in &restarts {
            println!("  [{:>7.3}s] {}", r.at.as_secs_f64(), r.describe());
        }
    }
    let (ok, failures) = (
        load.ok.load(Ordering::Relaxed),
        load.failed.load(Ordering::Relaxed),
    );
    println!(
        "\nrequests: {} sent, {ok} succeeded, {failures} failed; pods restarted: {}",
        ok + failures,
        restarts.len()
    );
    let Backend { proc_, client, .. } = b;
    drop(client);
    let mut procs = vec![proc_];
    procs.extend(containers.into_iter().map(Container::into_proc));
    pods::stop_all(procs).await;
    if failures > 0 || !restarts.is_empty() {
        return Err(failed(format!(
            "{failures} failed requests and {} pod container restarts; zero downtime means none of either",
            restarts.len()
        )));
    }
    Ok(())
}

/// One rotation, then the moment each pod had the new version on disk.
async fn rotate_once(b: &mut Backend, pods: &[Pod], r: u32, t0: Instant) -> Result<(), CliError> {
    let sent = Instant::now();
    let resp = b
        .client
        .rotate(pb::RotateRequest {
            secret_id: SECRET.into(),
            request_token: format!("demo-{}-{r}", std::process::id()),
            value: None,
            cancel: false,
        })
        .await
        .map_err(|e| failed(format!("rotate: {}", e.message())))?
        .into_inner();
    let v = resp.version.map_or(0, |v| v.version);
    let returned = sent.elapsed();
    println!(
        "{} rotate -> v{v} (Rotate returned in {:.1} ms)",
        stamp(t0),
        returned.as_secs_f64() * 1e3
    );
    let mut pending: Vec<usize> = (0..pods.len()).collect();
    let deadline = Instant::now() + DELIVERY_TIMEOUT;
    while !pending.is_empty() && Instant::now() < deadline {
        pending.retain(|&i| {
            if current_version(&pods[i].keyring) < v {
                return true;
            }
            let e = sent.elapsed();
            println!(
                "{}   pod-{i}: v{v} on disk {:.1} ms after the rotate call ({:.1} ms after it returned); the app accepts it from its next request",
                stamp(t0),
                e.as_secs_f64() * 1e3,
                e.saturating_sub(returned).as_secs_f64() * 1e3
            );
            false
        });
        tokio::time::sleep(Duration::from_micros(500)).await;
    }
    for i in pending {
        println!(
            "{}   pod-{i}: did not get v{v} within {} s",
            stamp(t0),
            DELIVERY_TIMEOUT.as_secs()
        );
    }
    Ok(())
}
