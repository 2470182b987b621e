//! `rekey-vault-plugin`: rekey as an OpenBao / Vault secrets engine.
//!
//! The host (`bao server` / `vault server`) starts this binary when a
//! mount of it is used. It checks the magic cookie, agrees on backend
//! plugin protocol 5, makes its own certificate, listens on a private Unix
//! socket, prints go-plugin's handshake line and serves gRPC with mutual
//! TLS until the host shuts it down or goes away.

mod backend;
mod config;
mod error;
mod goplugin;
mod log;
mod params;
mod paths;
mod proto;
mod tls;

use std::io::Write as _;
use std::process::ExitCode;

use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

use crate::goplugin::{Broker, Controller, Stdio, Stop};
use crate::proto::logical::plugin_version_server::PluginVersionServer;
use crate::proto::pb::backend_server::BackendServer;
use crate::proto::plugin::{
    grpc_broker_server::GrpcBrokerServer, grpc_controller_server::GrpcControllerServer,
    grpc_stdio_server::GrpcStdioServer,
};

fn main() -> ExitCode {
    if std::env::var(goplugin::MAGIC_COOKIE_KEY).as_deref() != Ok(goplugin::MAGIC_COOKIE_VALUE) {
        eprintln!(
            "rekey-vault-plugin is a secrets-engine plugin for OpenBao and Vault; the server runs it.\n\
             Put it in the server's plugin_directory, then:\n  \
             bao plugin register -sha256=$(sha256sum rekey-vault-plugin | cut -d' ' -f1) secret rekey-vault-plugin\n  \
             bao secrets enable -path=rekey rekey-vault-plugin"
        );
        return ExitCode::from(1);
    }
    let result = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))
        .and_then(|rt| rt.block_on(serve()));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error(&e);
            ExitCode::from(1)
        }
    }
}

async fn serve() -> Result<(), String> {
    goplugin::negotiate(std::env::var("PLUGIN_PROTOCOL_VERSIONS").ok().as_deref())?;
    let host_pem = std::env::var("PLUGIN_CLIENT_CERT").map_err(|_| {
        "PLUGIN_CLIENT_CERT is not set: this plugin needs go-plugin's automatic mutual TLS, which OpenBao and Vault use for protocol 5".to_string()
    })?;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let me = tls::Identity::generate()?;
    let mtls = tls::Mtls::new(&me, tls::host_certificate(&host_pem)?)?;

    let dir = goplugin::socket_dir().map_err(|e| format!("cannot make a socket directory: {e}"))?;
    let socket = dir.join("plugin.sock");
    let listener = tokio::net::UnixListener::bind(&socket)
        .map_err(|e| format!("cannot listen on {}: {e}", socket.display()))?;

    // The host's Ctrl-C reaches the plugin too; the host decides when the
    // plugin stops.
    let mut interrupts = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .map_err(|e| format!("cannot handle SIGINT: {e}"))?;
    tokio::spawn(async move { while interrupts.recv().await.is_some() {} });

    // Each connection's TLS handshake runs on its own, so a slow or bad
    // one holds up no other.
    let (conns, incoming) = mpsc::channel(16);
    let acceptor = tokio_rustls::TlsAcceptor::from(mtls.server.clone());
    tokio::spawn(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors, say: wait, and go on.
                    log::warn(&format!("cannot accept a connection: {e}"));
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            let (acceptor, conns) = (acceptor.clone(), conns.clone());
            tokio::spawn(async move {
                match acceptor.accept(stream).await {
                    Ok(tls) => {
                        let _ = conns.send(Ok::<_, std::io::Error>(tls)).await;
                    }
                    Err(e) => log::warn(&format!("refused a connection: {e}")),
                }
            });
        }
    });

    let (stop_tx, mut stop_rx) = watch::channel(Stop::Running);
    let broker = Broker::new(&mtls, stop_tx.clone());
    let engine = backend::Engine::new(broker.clone());
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_service_status("plugin", tonic_health::ServingStatus::Serving)
        .await;

    let server = tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(
            BackendServer::new(engine)
                .max_decoding_message_size(usize::MAX)
                .max_encoding_message_size(usize::MAX),
        )
        .add_service(PluginVersionServer::new(backend::Version))
        .add_service(GrpcBrokerServer::new(broker))
        .add_service(GrpcControllerServer::new(Controller(stop_tx)))
        .add_service(GrpcStdioServer::new(Stdio));

    let line = goplugin::handshake_line(&socket, &me.cert);
    {
        let mut out = std::io::stdout().lock();
        out.write_all(line.as_bytes())
            .and_then(|()| out.flush())
            .map_err(|e| format!("cannot write the handshake: {e}"))?;
    }
    log::info(&format!(
        "serving {} on {}",
        backend::PLUGIN_VERSION,
        socket.display()
    ));

    let stopped = async move {
        let _ = stop_rx.wait_for(|s| *s != Stop::Running).await;
    };
    let result = server
        .serve_with_incoming_shutdown(ReceiverStream::new(incoming), stopped)
        .await;
    let _ = std::fs::remove_dir_all(&dir);
    result.map_err(|e| format!("serving failed: {e}"))
}
