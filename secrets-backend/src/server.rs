//! Wires the backend together and runs it until shutdown: KEK, store,
//! bootstrap admin token, engine, gRPC (with health and reflection),
//! metrics, scheduler and, on Postgres, the LISTEN loop that carries changes
//! from other replicas.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use rekey_keyring::MasterKey;
use rekey_proto::v1::rekey_server::RekeyServer;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::transport::{Certificate, Identity as TlsIdentity, Server, ServerTlsConfig};

use crate::auth::{self, Auth};
use crate::config::{self, Config, KekSource};
use crate::engine::{self, Engine};
use crate::front::Front;
use crate::limits::StreamLimits;
use crate::metrics::{self, Metrics};
use crate::provider::{Providers, aws::Aws, embedded::Embedded, vault::Vault};
use crate::service::RekeyService;
use crate::store::{self, Dialect, Store};

/// How often a replica looks for tokens issued or revoked on another.
const TOKEN_POLL: Duration = Duration::from_secs(2);

/// Health checks are a service name and nothing else.
const SMALL_REQUEST: usize = 4 << 10;

/// HTTP/2 streams one client connection may hold open at once.
pub(crate) const MAX_STREAMS_PER_CONNECTION: u32 = 1024;

/// A key-encryption key and, for a development key made just now, the
/// file it still has to be written to.
pub(crate) struct LoadedKek {
    pub(crate) key: MasterKey,
    pub(crate) unsaved: Option<std::path::PathBuf>,
}

/// Reads the KEK, or for the development default makes one; that one is
/// written to its file only once the store turns out to be new (see
/// [`open_store`]), never over a file somebody deleted beside an existing
/// store. Errors name the source, never the content.
pub(crate) fn load_kek(
    src: &KekSource,
    env: impl Fn(&str) -> Option<String>,
) -> anyhow::Result<LoadedKek> {
    let (text, what) = match src {
        KekSource::File(p) => (
            std::fs::read_to_string(p)
                .with_context(|| format!("cannot read kek.file {}", p.display()))?,
            format!("kek.file {}", p.display()),
        ),
        KekSource::Env(name) => (
            env(name)
                .with_context(|| format!("kek.env: environment variable {name} is not set"))?,
            format!("kek.env {name}"),
        ),
        KekSource::Generated(p) if !p.exists() => {
            return Ok(LoadedKek {
                key: MasterKey::generate()?,
                unsaved: Some(p.clone()),
            });
        }
        KekSource::Generated(p) => {
            tracing::warn!(path = %p.display(), "using the development key-encryption key file; in production set kek.file or kek.env");
            (
                std::fs::read_to_string(p)
                    .with_context(|| format!("cannot read {}", p.display()))?,
                format!("KEK file {}", p.display()),
            )
        }
    };
    let text = zeroize::Zeroizing::new(text);
    let key = MasterKey::from_base64(&text).map_err(|e| anyhow::anyhow!("{what}: {e}"))?;
    Ok(LoadedKek { key, unsaved: None })
}

/// Opens the store under `kek`. A development key made at this start is
/// saved to its file just before the store is first sealed under it; if
/// the store already holds data, its key file was lost, and nothing is
/// written: the error says so.
pub(crate) async fn open_store(
    url: &str,
    max_connections: u32,
    kek: LoadedKek,
) -> anyhow::Result<Store> {
    let LoadedKek { key, unsaved } = kek;
    let key = Arc::new(key);
    let save = unsaved.as_ref().map(|p| {
        let key = key.clone();
        let p = p.clone();
        move || -> crate::error::Result<()> {
            if let Some(dir) = p.parent() {
                std::fs::create_dir_all(dir).map_err(|e| {
                    crate::error::Error::Internal(format!("cannot create {}: {e}", dir.display()))
                })?;
            }
            write_private(&p, key.to_base64().expose())
                .map_err(|e| crate::error::Error::Internal(format!("{e:#}")))?;
            tracing::warn!(path = %p.display(), "created a key-encryption key file for development only; in production set kek.file or kek.env");
            Ok(())
        }
    });
    match Store::open(url, max_connections, key, save).await {
        Ok(s) => Ok(s),
        Err(crate::error::Error::FailedPrecondition(m)) if unsaved.is_some() => {
            let p = unsaved.unwrap_or_default();
            bail!(
                "the development key-encryption key file {} is missing, but the store already holds data sealed under a key ({m}); restore that file, or set kek.file or kek.env to the key the store was written with. No new key was written.",
                p.display()
            )
        }
        Err(e) => Err(e).context("cannot open the store"),
    }
}

/// Writes a new file readable only by its owner.
fn write_private(path: &Path, content: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    f.write_all(content.as_bytes())?;
    f.write_all(b"\n")?;
    f.sync_all()?;
    Ok(())
}

/// Returns the digest of the bootstrap admin token, creating the token file
/// when it does not exist. Logs the path, never the token.
pub(crate) fn bootstrap_admin(path: &Path) -> anyhow::Result<[u8; 32]> {
    if path.exists() {
        tracing::info!(path = %path.display(), "admin token file in use");
    } else {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        let raw = rekey_keyring::random_bytes(32)?;
        let token = zeroize::Zeroizing::new(format!("rk_{}", hex::encode(raw.expose())));
        write_private(path, &token)?;
        tracing::info!(path = %path.display(), "wrote a new admin token");
    }
    let token = zeroize::Zeroizing::new(
        std::fs::read_to_string(path)
            .with_context(|| format!("cannot read admin token file {}", path.display()))?,
    );
    let token = token.trim();
    if token.is_empty() {
        bail!("admin token file {} is empty", path.display());
    }
    Ok(auth::token_digest(token))
}

/// Runs the backend until `shutdown` resolves. Prints one line to stdout
/// once both listeners are bound: `listening grpc=ADDR metrics=ADDR`.
///
/// # Errors
///
/// What stops it from serving: an unreadable key or token file, a store it
/// cannot open (or written under another key), a port it cannot bind, bad
/// TLS material.
#[allow(
    clippy::too_many_lines,
    reason = "the start-up and shutdown sequence in the order it happens; each step is one call or one value"
)]
pub async fn run(
    cfg: Config,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    // Bind first: a taken port fails before anything is written to the
    // data directory.
    let grpc_listener = TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("cannot listen on {} (listen)", cfg.listen))?;
    let metrics_listener = match cfg.metrics_listen {
        Some(a) => Some(
            TcpListener::bind(a)
                .await
                .with_context(|| format!("cannot listen on {a} (metrics_listen)"))?,
        ),
        None => None,
    };
    let kek = load_kek(&cfg.kek, |n| std::env::var(n).ok())?;
    tracing::info!(store = %config::redact_url(&cfg.store_url), kek_id = %kek.key.id_hex(), "opening store");
    let store = Arc::new(open_store(&cfg.store_url, cfg.store_max_connections, kek).await?);
    if let Some(path) = store::sqlite_path(&cfg.store_url) {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600));
    }
    let admin = match &cfg.admin_token_file {
        Some(p) => Some(bootstrap_admin(p)?),
        None => None,
    };
    let auth = Arc::new(Auth::new(cfg.tokens.clone(), cfg.policies.clone(), admin));
    let metrics = Arc::new(Metrics::default());
    // One TLS implementation for every client the backend opens (Vault's
    // among them): ring, as the gRPC server uses.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut providers = Providers::new(Arc::new(Embedded::new(store.clone())));
    for p in &cfg.providers {
        match p {
            config::ProviderConfig::Vault(v) => {
                tracing::info!(provider = %v.name, address = %v.address, mount = %v.mount, "Vault provider");
                providers.add(Arc::new(Vault::new(v.clone(), store.clone())?));
            }
            config::ProviderConfig::Aws(a) => {
                tracing::info!(provider = %a.name, region = a.region.as_deref().unwrap_or("(from the SDK's chain)"), endpoint = a.endpoint_url.as_deref().unwrap_or("(AWS)"), "AWS Secrets Manager provider");
                providers.add(Arc::new(Aws::new(a.clone(), store.clone())));
            }
        }
    }
    let engine = Arc::new(Engine::new(
        store.clone(),
        providers,
        metrics.clone(),
        engine::Settings {
            step_delay: cfg.step_delay,
            step_attempts: cfg.step_attempts,
            step_backoff: cfg.step_backoff,
            consumer_ttl: cfg.consumer_ttl,
            max_value_bytes: cfg.max_value_bytes,
            refusal_summary_interval: cfg.refusal_summary_interval,
            scheduler_concurrency: cfg.scheduler_concurrency,
        },
    ));

    // Before anything is served: a store whose audit meta rows were
    // altered is reported at once, not at the first scheduler pass.
    engine.check_audit_head().await;

    let grpc_addr = metrics::bound(&grpc_listener);
    let metrics_addr = metrics_listener.as_ref().map(metrics::bound);

    let (stop_tx, stop_rx) = watch::channel(false);
    let postgres = store.dialect() == Dialect::Postgres;
    let mut tasks = spawn_background(
        &cfg,
        &engine,
        &metrics,
        metrics_listener,
        postgres,
        &stop_rx,
    );

    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<RekeyServer<RekeyService>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(rekey_proto::v1::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("cannot build the reflection service")?;
    let service = Arc::new(RekeyService::new(
        engine.clone(),
        auth,
        stop_rx.clone(),
        StreamLimits::new(
            cfg.max_watch_streams_per_identity,
            cfg.max_watch_streams_per_connection,
        ),
    ));
    // Tokens issued through the API: in force before the first call, and
    // followed as other replicas issue and revoke them.
    service
        .reload_tokens()
        .await
        .context("cannot read the issued tokens")?;
    {
        let service = service.clone();
        let engine = engine.clone();
        let mut rx = stop_rx.clone();
        tasks.spawn(async move {
            let mut seen = engine.tokens_revision().await.unwrap_or_default();
            let mut every = tokio::time::interval(TOKEN_POLL);
            loop {
                tokio::select! {
                    _ = every.tick() => {}
                    () = stopped(&mut rx) => break,
                }
                match engine.tokens_revision().await {
                    Ok(r) if r != seen => match service.reload_tokens().await {
                        Ok(()) => seen = r,
                        Err(e) => tracing::warn!(error = %e, "cannot reload the issued tokens"),
                    },
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "cannot check the issued tokens"),
                }
            }
        });
    }

    let mut builder = server_builder(&cfg)?;

    let metrics_shown = metrics_addr.map_or_else(|| "off".to_string(), |a| a.to_string());
    println!("listening grpc={grpc_addr} metrics={metrics_shown}");
    tracing::info!(grpc = %grpc_addr, metrics = %metrics_shown, tls = cfg.tls.is_some(), "rekey-backend ready");

    let stop_tx2 = stop_tx.clone();
    let (fired_tx, fired_rx) = tokio::sync::oneshot::channel::<()>();
    let health_on_stop = health.clone();
    let shutdown = async move {
        shutdown.await;
        // Load balancers and probes stop sending new calls first.
        health_on_stop
            .set_not_serving::<RekeyServer<RekeyService>>()
            .await;
        tracing::info!(grace = ?cfg.shutdown_grace, "shutting down: draining calls in flight");
        let _ = stop_tx2.send(true);
        let _ = fired_tx.send(());
    };
    let grace = cfg.shutdown_grace;
    // A client that never closes its connection must not hold the process
    // past the grace period.
    let grace_over = async move {
        if fired_rx.await.is_ok() {
            tokio::time::sleep(grace).await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    let serve = builder
        .add_service(health_service.max_decoding_message_size(SMALL_REQUEST))
        .add_service(reflection)
        .add_service(Front::new(service, cfg.max_value_bytes))
        .serve_with_incoming_shutdown(nodelay(grpc_listener), shutdown);
    let served = tokio::select! {
        r = serve => r,
        () = grace_over => {
            tracing::warn!("grace period over; closing the connections still open");
            Ok(())
        }
    };
    let _ = stop_tx.send(true);
    engine.summarize_refusals(true).await;
    let drain = async { while tasks.join_next().await.is_some() {} };
    if tokio::time::timeout(Duration::from_secs(10), drain)
        .await
        .is_err()
    {
        tracing::warn!("background tasks did not stop within 10s");
    }
    store.close().await;
    served.context("gRPC server failed")?;
    tracing::info!("stopped");
    Ok(())
}

/// The gRPC server's transport: HTTP/2 limits and, when configured, TLS.
fn server_builder(cfg: &Config) -> anyhow::Result<Server> {
    // Watch streams are long-lived: allow many per connection (a sidecar
    // needs one; a client multiplexing many watchers more), but bounded.
    let mut builder = Server::builder().max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION));
    if let Some(tls) = &cfg.tls {
        let cert = std::fs::read(&tls.cert_file)
            .with_context(|| format!("cannot read tls.cert_file {}", tls.cert_file.display()))?;
        let key = std::fs::read(&tls.key_file)
            .with_context(|| format!("cannot read tls.key_file {}", tls.key_file.display()))?;
        let mut t = ServerTlsConfig::new().identity(TlsIdentity::from_pem(cert, key));
        if let Some(ca) = &tls.client_ca_file {
            let ca = std::fs::read(ca)
                .with_context(|| format!("cannot read tls.client_ca_file {}", ca.display()))?;
            t = t.client_ca_root(Certificate::from_pem(ca));
        }
        builder = builder.tls_config(t).context("invalid TLS configuration")?;
    }
    Ok(builder)
}

/// The tasks beside the gRPC server: metrics, recovery of interrupted
/// rotations, the scheduler and, on Postgres, changes from other replicas.
/// Each ends when `stop` flips.
fn spawn_background(
    cfg: &Config,
    engine: &Arc<Engine>,
    metrics: &Arc<Metrics>,
    metrics_listener: Option<TcpListener>,
    postgres: bool,
    stop_rx: &watch::Receiver<bool>,
) -> tokio::task::JoinSet<()> {
    let mut tasks = tokio::task::JoinSet::new();

    if let Some(l) = metrics_listener {
        let m = metrics.clone();
        let token_file = cfg.metrics_token_file.clone();
        let mut rx = stop_rx.clone();
        tasks.spawn(async move {
            let stop = async move { stopped(&mut rx).await };
            if let Err(e) = metrics::serve(l, m, token_file, stop).await {
                tracing::error!(error = %e, "metrics server failed");
            }
        });
    }

    {
        let engine = engine.clone();
        tasks.spawn(async move {
            match engine.recover().await {
                Ok(0) => {}
                Ok(n) => tracing::info!(rotations = n, "interrupted rotations handled"),
                Err(e) => tracing::error!(error = %e, "cannot resume interrupted rotations"),
            }
        });
    }

    if cfg.scheduler_enabled {
        let engine = engine.clone();
        let tick = cfg.scheduler_tick;
        let mut rx = stop_rx.clone();
        tasks.spawn(async move {
            let mut every = tokio::time::interval(tick);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            // Per-secret rotations and decommissions the passes started.
            let mut work = tokio::task::JoinSet::new();
            loop {
                tokio::select! {
                    _ = every.tick() => {
                        if let Err(e) = engine.tick(&mut work).await {
                            tracing::warn!(error = %e, "scheduler pass failed");
                        }
                    }
                    () = stopped(&mut rx) => break,
                }
            }
            // Work in flight ends as it would have inside a pass; what a
            // hard stop cuts short is resumed at the next start.
            while work.join_next().await.is_some() {}
        });
    }

    for p in engine.external_providers() {
        let engine = engine.clone();
        let mut rx = stop_rx.clone();
        tasks.spawn(async move {
            engine
                .poll_provider(p, async move { stopped(&mut rx).await })
                .await;
        });
    }

    if postgres {
        let url = cfg.store_url.clone();
        let engine = engine.clone();
        let mut rx = stop_rx.clone();
        tasks.spawn(async move {
            tokio::select! {
                () = listen_changes(&url, &engine) => {}
                () = stopped(&mut rx) => {}
            }
        });
    }
    tasks
}

/// Follows NOTIFYs from other replicas and refreshes the watched secrets
/// they name. After a reconnect every watched secret is reloaded, since
/// notifications sent meanwhile are lost.
async fn listen_changes(url: &str, engine: &Engine) {
    let mut backoff = Duration::from_millis(200);
    loop {
        let connected = match rekey_probe::postgres::PgUrl::parse(url) {
            Ok(u) => sqlx::postgres::PgListener::connect_with(
                // As PgListener::connect makes it: one connection, kept.
                &sqlx::postgres::PgPoolOptions::new()
                    .max_connections(1)
                    .max_lifetime(None)
                    .idle_timeout(None)
                    .connect_lazy_with(u.options()),
            )
            .await
            .map_err(|e| u.reason(&e)),
            Err(e) => Err(e.to_string()),
        };
        match connected {
            Ok(mut l) => {
                if let Err(e) = l.listen(store::NOTIFY_CHANNEL).await {
                    tracing::warn!(error = %e, "cannot LISTEN for changes");
                } else {
                    backoff = Duration::from_millis(200);
                    engine.refresh_all().await;
                    loop {
                        match l.try_recv().await {
                            Ok(Some(n)) => engine.refresh(n.payload()).await,
                            Ok(None) => {
                                tracing::warn!(
                                    "change notifications reconnected; reloading watched secrets"
                                );
                                engine.refresh_all().await;
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, "change notifications lost");
                                break;
                            }
                        }
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot connect for change notifications"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}

/// Accepted connections with Nagle's algorithm off: small gRPC frames
/// (a Rotate answer, a Watch event) must not wait for a delayed ACK.
fn nodelay(
    l: TcpListener,
) -> impl tokio_stream::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    use tokio_stream::StreamExt;
    tokio_stream::wrappers::TcpListenerStream::new(l).map(|r| {
        r.inspect(|s| {
            if let Err(e) = s.set_nodelay(true) {
                tracing::debug!(error = %e, "cannot set TCP_NODELAY");
            }
        })
    })
}

/// Resolves once the stop flag is set.
async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let Ok(mut term) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        else {
            let _ = ctrl_c.await;
            return;
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kek_errors_name_the_source_not_the_content() {
        let dir = crate::store::tests_support::tempdir();
        let p = dir.join("kek");
        std::fs::write(&p, "c2VjcmV0LXRvby1zaG9ydA==\n").unwrap();
        let e = load_kek(&KekSource::File(p.clone()), |_| None)
            .err()
            .unwrap();
        let s = format!("{e:#}");
        assert!(s.contains("kek.file"), "{s}");
        assert!(s.contains("32 bytes"), "{s}");
        assert!(!s.contains("c2VjcmV0"), "{s}");
        let e = load_kek(&KekSource::File(dir.join("missing")), |_| None)
            .err()
            .unwrap();
        assert!(format!("{e:#}").contains("cannot read kek.file"));
        let e = load_kek(&KekSource::Env("NOPE".into()), |_| None)
            .err()
            .unwrap();
        assert!(format!("{e:#}").contains("NOPE is not set"));
    }

    #[tokio::test]
    async fn a_development_kek_is_saved_for_a_new_store_and_never_over_a_lost_one() {
        use std::os::unix::fs::PermissionsExt;
        let dir = crate::store::tests_support::tempdir();
        let p = dir.join("d").join("kek");
        let url = format!(
            "sqlite://{}?mode=rwc",
            dir.join("d").join("rekey.db").display()
        );
        let a = load_kek(&KekSource::Generated(p.clone()), |_| None).unwrap();
        assert!(
            !p.exists(),
            "not written before the store is known to be new"
        );
        let id = a.key.id_hex();
        open_store(&url, 1, a).await.unwrap().close().await;
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let b = load_kek(&KekSource::Generated(p.clone()), |_| None).unwrap();
        assert_eq!((b.key.id_hex(), b.unsaved), (id, None));

        std::fs::remove_file(&p).unwrap();
        let c = load_kek(&KekSource::Generated(p.clone()), |_| None).unwrap();
        let e = open_store(&url, 1, c).await.err().unwrap();
        let msg = format!("{e:#}");
        assert!(
            msg.contains("is missing, but the store already holds data"),
            "{msg}"
        );
        assert!(!p.exists(), "no new key over the lost one");
    }

    #[test]
    fn the_admin_token_is_private_and_stable() {
        use std::os::unix::fs::PermissionsExt;
        let dir = crate::store::tests_support::tempdir();
        let t = dir.join("admin.token");
        let d1 = bootstrap_admin(&t).unwrap();
        let d2 = bootstrap_admin(&t).unwrap();
        assert_eq!(d1, d2);
        assert_eq!(
            std::fs::metadata(&t).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let token = std::fs::read_to_string(&t).unwrap();
        assert_eq!(auth::token_digest(token.trim()), d1);
    }
}
