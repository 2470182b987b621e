//! `rekey-sidecar`: the per-pod agent. It watches the backend for its
//! secrets, validates each new version, writes it atomically where the app
//! reads it, tells the app (signal, HTTP POST or command) and reports the
//! version it serves, all without restarting anything. `/readyz` is honest:
//! ready once every secret is written and validated, and still ready while
//! failing static on the last good versions.

pub mod backend;
pub mod config;
mod error;
pub mod files;
pub mod http;
pub mod kube_lease;
pub mod metrics;
pub mod reencrypt_task;
pub mod reload;
pub mod render;
pub mod state;
pub mod validate;
pub mod write;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::Config;
pub use crate::error::Error;
use crate::metrics::Metrics;
use crate::reload::Reloader;
use crate::state::State;

/// Resolves once the stop flag is set.
pub(crate) async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

/// Runs the sidecar until `shutdown` resolves. Prints one line to stdout
/// once the HTTP port is bound: `listening http=ADDR`.
pub async fn run(
    cfg: Config,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let cfg = Arc::new(cfg);
    let metrics = Arc::new(Metrics::default());
    let ids = cfg
        .secrets
        .iter()
        .map(|s| s.id.clone())
        .chain(cfg.file_sources.iter().map(|f| f.id.clone()));
    let state = Arc::new(State::new(ids, metrics.clone()));
    let reloader = Reloader::spawn(cfg.reloads.clone(), cfg.debounce, metrics.clone());
    let outputs: Arc<BTreeMap<String, config::Output>> = Arc::new(
        cfg.secrets
            .iter()
            .map(|s| (s.id.clone(), s.out.clone()))
            .collect(),
    );

    // Before binding: may we read our secrets, and do they fit the outputs?
    match backend::probe(&cfg).await {
        Err(errors) => bail!("{}", config::ConfigErrors(errors)),
        Ok(backend::Probe::Unreachable(e)) => {
            tracing::warn!(error = %e, "cannot read the secrets from the backend at start; not ready until it delivers them");
        }
        Ok(backend::Probe::Snapshots(events)) => {
            for ev in events {
                if let Some((id, served, _)) = backend::offered(ev)
                    && let Some(out) = outputs.get(&id)
                {
                    state.deliver(&id, out, served, None, &reloader).await;
                }
            }
        }
    }

    let listener = TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("cannot listen on {} (listen)", cfg.listen))?;
    let addr = listener.local_addr()?;
    println!("listening http={addr}");
    tracing::info!(http = %addr, secrets = cfg.secrets.len(), file_sources = cfg.file_sources.len(), "rekey-sidecar ready");

    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(backend::run(
        cfg.clone(),
        state.clone(),
        outputs,
        reloader.clone(),
        stop_rx.clone(),
    ));
    tasks.spawn(files::run(
        cfg.file_sources.clone(),
        state.clone(),
        reloader.clone(),
        stop_rx.clone(),
    ));
    for rc in cfg.reencrypt.clone() {
        tasks.spawn(reencrypt_task::run(
            cfg.clone(),
            rc,
            state.clone(),
            stop_rx.clone(),
        ));
    }
    let app = http::router(http::Http {
        state: state.clone(),
        api_token_file: cfg.api_token_file.clone(),
        backend_needed: !cfg.secrets.is_empty(),
    });
    let mut http_stop = stop_rx.clone();
    tasks.spawn(async move {
        let r = axum::serve(listener, app)
            .with_graceful_shutdown(async move { stopped(&mut http_stop).await })
            .await;
        if let Err(e) = r {
            tracing::error!(error = %e, "HTTP server failed");
        }
    });

    shutdown.await;
    tracing::info!("shutting down");
    let _ = stop_tx.send(true);
    let drain = async { while tasks.join_next().await.is_some() {} };
    if tokio::time::timeout(Duration::from_secs(10), drain)
        .await
        .is_err()
    {
        tracing::warn!("tasks did not stop within 10s");
    }
    drop(reloader);
    tracing::info!("stopped");
    Ok(())
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
