//! `rekey demo`: the whole flow on one machine in a few seconds.
//!
//! It starts an embedded backend, two "pods" (each a `rekey-sidecar` plus a
//! small HTTP app that authenticates callers with a rotated API key), and a
//! load generator that calls both apps with the key their pod holds. It
//! rotates the key several times under load and prints a timeline: each
//! rotation, when each sidecar had the new version on disk, which versions
//! the apps accepted, and how many requests failed (zero: nothing restarts
//! and files are swapped atomically).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rekey_proto::v1 as pb;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

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

/// A child process, killed if it is still running when dropped.
struct Proc(Child);
impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// SIGTERM to every process (sidecars before the backend), then up to 5 s
/// for them to exit, without blocking the runtime.
async fn stop_all(mut procs: Vec<Proc>) {
    procs.reverse();
    for p in &procs {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(p.0.id().to_string())
            .status();
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if procs
            .iter_mut()
            .all(|p| matches!(p.0.try_wait(), Ok(Some(_))))
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Starts a binary and returns it with the first stdout line.
fn spawn(bin: &Path, args: &[String], log: &Path) -> Result<(Proc, String), String> {
    let logf = std::fs::File::create(log).map_err(|e| format!("{}: {e}", log.display()))?;
    let mut child = Command::new(bin)
        .args(args)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(logf)
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
    let out = child.stdout.take().ok_or("no stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(out).lines();
        if let Some(Ok(l)) = lines.next() {
            let _ = tx.send(l);
        }
        for _ in lines {}
    });
    let proc_ = Proc(child);
    match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(line) => Ok((proc_, line)),
        Err(_) => Err(format!(
            "{} did not start; see {}",
            bin.display(),
            log.display()
        )),
    }
}

fn sibling(name: &str) -> Result<PathBuf, String> {
    let me = std::env::current_exe().map_err(|e| e.to_string())?;
    let p = me.with_file_name(name);
    if p.exists() {
        Ok(p)
    } else {
        Err(format!(
            "{name} not found next to {} (build the workspace: cargo build --release)",
            me.display()
        ))
    }
}

/// (modified time, inode) of a loaded file.
type Stamp = (std::time::SystemTime, u64);
/// (version, key) pairs, current first.
type Keys = Vec<(u64, String)>;

/// The demo app's view of its keyring file, reloaded when the file changes.
struct Keyring {
    path: PathBuf,
    /// The loaded file's stamp, and its (version, key) pairs.
    loaded: Mutex<Option<(Stamp, Keys)>>,
}

impl Keyring {
    fn keys(&self) -> Keys {
        use std::os::unix::fs::MetadataExt;
        let Ok(meta) = std::fs::metadata(&self.path) else {
            return vec![];
        };
        let stamp = (meta.modified().unwrap_or(std::time::UNIX_EPOCH), meta.ino());
        let mut g = self.loaded.lock().unwrap_or_else(|p| p.into_inner());
        if g.as_ref().map(|(s, _)| *s) != Some(stamp) {
            let keys = std::fs::read(&self.path)
                .ok()
                .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                .map(|j| {
                    ["current", "previous"]
                        .iter()
                        .filter_map(|k| {
                            Some((
                                j[*k]["version"].as_u64()?,
                                j[*k]["value"].as_str()?.to_string(),
                            ))
                        })
                        .collect()
                })
                .unwrap_or_default();
            *g = Some((stamp, keys));
        }
        g.as_ref().map(|(_, k)| k.clone()).unwrap_or_default()
    }
}

/// One app pod: accepts `Authorization: Bearer <key>` for the current or
/// previous key and answers with the version that matched.
async fn serve_app(listener: tokio::net::TcpListener, ring: Arc<Keyring>) {
    use axum::http::{HeaderMap, StatusCode};
    let app = axum::Router::new().route(
        "/",
        axum::routing::get(move |headers: HeaderMap| {
            let ring = ring.clone();
            async move {
                let given = headers
                    .get("authorization")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.strip_prefix("Bearer "))
                    .unwrap_or_default()
                    .to_string();
                for (v, key) in ring.keys() {
                    if rekey_keyring::ct_eq(key.as_bytes(), given.as_bytes()) {
                        return (StatusCode::OK, format!("v{v}"));
                    }
                }
                (StatusCode::UNAUTHORIZED, "unauthorized".to_string())
            }
        }),
    );
    let _ = axum::serve(listener, app).await;
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

fn current_version(keyring: &Path) -> u64 {
    std::fs::read(keyring)
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|j| j["current"]["version"].as_u64())
        .unwrap_or(0)
}

/// Runs the demo; returns the process exit status.
pub async fn run(args: DemoArgs) -> Result<bool, String> {
    let interval = humantime::parse_duration(&args.interval).map_err(|_| {
        format!(
            "--interval {:?} is not a duration such as 1s",
            args.interval
        )
    })?;
    let backend_bin = sibling("rekey-backend")?;
    let sidecar_bin = sibling("rekey-sidecar")?;
    let dir = std::env::temp_dir().join(format!("rekey-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let t0 = Instant::now();
    let at = move || format!("[{:>7.3}s]", t0.elapsed().as_secs_f64());

    println!(
        "rekey demo: 1 backend, 2 pods (sidecar + app), {} requests/s, {} rotations\n",
        args.rate, args.rotations
    );
    let cfg = dir.join("backend.toml");
    std::fs::write(
        &cfg,
        format!(
            "listen = \"127.0.0.1:0\"\nmetrics_listen = \"off\"\ndata_dir = {:?}\n",
            dir.join("data").display().to_string()
        ),
    )
    .map_err(|e| e.to_string())?;
    let (backend, line) = spawn(
        &backend_bin,
        &["--config".into(), cfg.display().to_string()],
        &dir.join("backend.log"),
    )?;
    let grpc = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("grpc="))
        .ok_or("unexpected backend output")?
        .to_string();
    let addr = format!("http://{grpc}");
    println!(
        "{} backend listening on {grpc} (embedded SQLite in {})",
        at(),
        dir.join("data").display()
    );
    let token_file = dir.join("data").join("admin.token");
    let token = std::fs::read_to_string(&token_file).map_err(|e| e.to_string())?;
    let ch = tonic::transport::Endpoint::from_shared(addr.clone())
        .map_err(|e| e.to_string())?
        .connect()
        .await
        .map_err(|e| e.to_string())?;
    let bearer: tonic::metadata::MetadataValue<_> = format!("Bearer {}", token.trim())
        .parse()
        .map_err(|_| "bad token")?;
    let mut client =
        pb::rekey_client::RekeyClient::with_interceptor(ch, move |mut r: tonic::Request<()>| {
            r.metadata_mut().insert("authorization", bearer.clone());
            Ok(r)
        });
    let secret = "demo/api/key";
    client
        .create_secret(pb::CreateSecretRequest {
            id: secret.into(),
            kind: "random".into(),
            ..Default::default()
        })
        .await
        .map_err(|e| format!("create: {}", e.message()))?;
    println!("{} created {secret} v1 (random, 32 bytes)", at());

    // Two pods.
    let mut pods = Vec::new();
    let mut procs = vec![backend];
    for i in 0..2 {
        let pod = dir.join(format!("pod-{i}"));
        std::fs::create_dir_all(&pod).map_err(|e| e.to_string())?;
        let keyring = pod.join("api-key.keyring.json");
        let sc_cfg = pod.join("sidecar.toml");
        std::fs::write(
            &sc_cfg,
            format!(
                "backend = {addr:?}\ntoken_file = {:?}\nlisten = \"127.0.0.1:0\"\nconsumer_id = \"pod-{i}\"\n[[secrets]]\nid = {secret:?}\npath = {:?}\nkeyring_path = {:?}\n",
                token_file.display().to_string(),
                pod.join("api-key").display().to_string(),
                keyring.display().to_string(),
            ),
        )
        .map_err(|e| e.to_string())?;
        let (p, _) = spawn(
            &sidecar_bin,
            &["--config".into(), sc_cfg.display().to_string()],
            &pod.join("sidecar.log"),
        )?;
        procs.push(p);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| e.to_string())?;
        let app_addr = listener
            .local_addr()
            .map_err(|e| e.to_string())?
            .to_string();
        let ring = Arc::new(Keyring {
            path: keyring.clone(),
            loaded: Mutex::new(None),
        });
        tokio::spawn(serve_app(listener, ring));
        println!(
            "{} pod-{i}: sidecar wrote v{} to {}, app serving on {app_addr}",
            at(),
            current_version(&keyring),
            keyring.display()
        );
        pods.push((app_addr, keyring));
    }

    // Load: each request uses the key its pod's sidecar delivered.
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let seen: Arc<Mutex<BTreeMap<(usize, String), u64>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let period = Duration::from_secs_f64(1.0 / args.rate.max(1) as f64);
    let load = {
        let (ok, failed, seen, stop, pods) = (
            ok.clone(),
            failed.clone(),
            seen.clone(),
            stop.clone(),
            pods.clone(),
        );
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            let mut n = 0usize;
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                let i = n % pods.len();
                n += 1;
                let (app, keyring) = &pods[i];
                let key = std::fs::read(keyring)
                    .ok()
                    .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                    .and_then(|j| j["current"]["value"].as_str().map(str::to_string))
                    .unwrap_or_default();
                match call(app, &key).await {
                    Ok((200, body)) => {
                        ok.fetch_add(1, Ordering::Relaxed);
                        *seen
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .entry((i, body))
                            .or_default() += 1;
                    }
                    _ => {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        })
    };

    tokio::time::sleep(interval).await;
    for r in 0..args.rotations {
        let sent = Instant::now();
        let resp = client
            .rotate(pb::RotateRequest {
                secret_id: secret.into(),
                request_token: format!("demo-{}-{r}", std::process::id()),
                value: None,
                cancel: false,
            })
            .await
            .map_err(|e| format!("rotate: {}", e.message()))?
            .into_inner();
        let v = resp.version.map(|v| v.version).unwrap_or(0);
        let returned = sent.elapsed();
        println!(
            "{} rotate -> v{v} (Rotate returned in {:.1} ms)",
            at(),
            returned.as_secs_f64() * 1e3
        );
        let mut pending: Vec<usize> = (0..pods.len()).collect();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !pending.is_empty() && Instant::now() < deadline {
            pending.retain(|&i| {
                if current_version(&pods[i].1) >= v {
                    let e = sent.elapsed();
                    println!(
                        "{}   pod-{i}: v{v} on disk {:.1} ms after the rotate call ({:.1} ms after it returned); the app accepts it from its next request",
                        at(),
                        e.as_secs_f64() * 1e3,
                        e.saturating_sub(returned).as_secs_f64() * 1e3
                    );
                    false
                } else {
                    true
                }
            });
            tokio::time::sleep(Duration::from_micros(500)).await;
        }
        for i in pending {
            println!("{}   pod-{i}: did not get v{v} within 10 s", at());
        }
        tokio::time::sleep(interval).await;
    }
    stop.store(true, Ordering::Relaxed);
    let _ = load.await;

    println!("\nwhat the apps accepted (requests per key version):");
    for ((pod, version), n) in seen.lock().unwrap_or_else(|p| p.into_inner()).iter() {
        println!("  pod-{pod} {version}: {n}");
    }
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    println!(
        "\nrequests: {} sent, {ok} succeeded, {failed} failed; pods restarted: 0",
        ok + failed
    );
    drop(client);
    stop_all(procs).await;
    if args.keep {
        println!("logs and files kept in {}", dir.display());
    } else {
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(failed == 0)
}
