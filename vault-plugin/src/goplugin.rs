//! The plugin side of HashiCorp go-plugin over gRPC: the magic-cookie
//! check, protocol negotiation, the handshake line on stdout, and the
//! services every go-plugin server offers besides the plugin's own
//! (broker, controller, stdio; health is tonic-health's).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{Notify, mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt as _};
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::{Request, Response, Status, Streaming};

use crate::proto::plugin::{
    ConnInfo, Empty, StdioData, grpc_broker_server::GrpcBroker,
    grpc_controller_server::GrpcController, grpc_stdio_server::GrpcStdio,
};
use crate::tls::{Mtls, SERVER_NAME};

/// The environment variable and value OpenBao and Vault set for a backend
/// plugin. Not a security measure: it tells a person who runs the binary
/// by hand what it is.
pub const MAGIC_COOKIE_KEY: &str = "VAULT_BACKEND_PLUGIN";
pub const MAGIC_COOKIE_VALUE: &str = "6669da05-b1c8-4f49-97d9-c8e5bed98e20";

/// go-plugin's own protocol version.
pub const CORE_PROTOCOL_VERSION: u32 = 1;

/// The backend plugin protocol this plugin speaks: version 5, gRPC with
/// automatic mutual TLS.
pub const APP_PROTOCOL_VERSION: u32 = 5;

/// How long a dial waits for the host to announce a brokered service.
const BROKER_WAIT: Duration = Duration::from_secs(5);

/// Checks that the host offers protocol 5 in `PLUGIN_PROTOCOL_VERSIONS`
/// (a comma-separated list; absent means the host's default, which
/// go-plugin's hosts always send).
pub fn negotiate(offered: Option<&str>) -> Result<u32, String> {
    let Some(list) = offered else {
        return Err(format!(
            "the host sent no PLUGIN_PROTOCOL_VERSIONS; this plugin speaks version {APP_PROTOCOL_VERSION}"
        ));
    };
    if list
        .split(',')
        .any(|v| v.trim().parse::<u32>() == Ok(APP_PROTOCOL_VERSION))
    {
        Ok(APP_PROTOCOL_VERSION)
    } else {
        Err(format!(
            "the host offers plugin protocol versions {list:?}; this plugin speaks version {APP_PROTOCOL_VERSION} (OpenBao, or Vault 1.12 and later)"
        ))
    }
}

/// The line go-plugin's host reads from the plugin's stdout:
/// `CORE|APP|NETWORK|ADDRESS|PROTOCOL|SERVER-CERT`, the certificate as
/// unpadded standard base64 of its DER.
pub fn handshake_line(socket: &Path, cert_der: &[u8]) -> String {
    use base64::Engine as _;
    format!(
        "{CORE_PROTOCOL_VERSION}|{APP_PROTOCOL_VERSION}|unix|{}|grpc|{}\n",
        socket.display(),
        base64::engine::general_purpose::STANDARD_NO_PAD.encode(cert_der)
    )
}

/// A private directory for the plugin's socket: under
/// `PLUGIN_UNIX_SOCKET_DIR` when the host sets it, else the system's
/// temporary directory. Mode 0700.
pub fn socket_dir() -> std::io::Result<PathBuf> {
    use std::os::unix::fs::DirBuilderExt as _;
    let base =
        std::env::var_os("PLUGIN_UNIX_SOCKET_DIR").map_or_else(std::env::temp_dir, PathBuf::from);
    let mut n = 0u32;
    loop {
        let dir = base.join(format!("rekey-plugin-{}-{n}", std::process::id()));
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && n < 100 => n += 1,
            Err(e) => return Err(e),
        }
    }
}

/// Why the plugin stops serving.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    Running,
    /// The host called `GRPCController.Shutdown`.
    Shutdown,
    /// The host closed the broker stream: it is gone.
    HostGone,
}

/// The broker: the host announces, on a stream it opens at start, where
/// it serves each brokered service (the storage service of a mount, by
/// the id it passes to `Setup`); the plugin dials there with mutual TLS.
pub struct Broker {
    announced: Mutex<HashMap<u32, ConnInfo>>,
    arrived: Notify,
    tls: Arc<rustls::ClientConfig>,
    stop: watch::Sender<Stop>,
    /// Keeps the outgoing half of the stream open (the plugin announces
    /// nothing itself).
    outgoing: Mutex<Option<mpsc::Sender<Result<ConnInfo, Status>>>>,
}

impl Broker {
    pub fn new(mtls: &Mtls, stop: watch::Sender<Stop>) -> Arc<Broker> {
        Arc::new(Broker {
            announced: Mutex::new(HashMap::new()),
            arrived: Notify::new(),
            tls: mtls.client.clone(),
            stop,
            outgoing: Mutex::new(None),
        })
    }

    /// A channel to the service the host announced as `id`, once it has
    /// (within five seconds).
    pub async fn dial(&self, id: u32) -> Result<Channel, String> {
        let deadline = tokio::time::Instant::now() + BROKER_WAIT;
        let info = loop {
            let notified = self.arrived.notified();
            if let Some(info) = self.announced.lock().expect("broker lock").remove(&id) {
                break info;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(format!(
                    "the host did not announce brokered service {id} within {BROKER_WAIT:?}"
                ));
            }
        };
        let connector = Dialer {
            network: info.network.clone(),
            address: info.address.clone(),
            tls: tokio_rustls::TlsConnector::from(self.tls.clone()),
        };
        // The URI is only for HTTP/2's authority; the connector decides
        // where to connect.
        Endpoint::from_static("http://localhost")
            .connect_timeout(BROKER_WAIT)
            .connect_with_connector(connector)
            .await
            .map_err(|e| {
                format!(
                    "cannot reach the host's brokered service {id} at {} {}: {e}",
                    info.network, info.address
                )
            })
    }
}

#[tonic::async_trait]
impl GrpcBroker for Arc<Broker> {
    type StartStreamStream = ReceiverStream<Result<ConnInfo, Status>>;

    async fn start_stream(
        &self,
        request: Request<Streaming<ConnInfo>>,
    ) -> Result<Response<Self::StartStreamStream>, Status> {
        let mut incoming = request.into_inner();
        let (tx, rx) = mpsc::channel(1);
        *self.outgoing.lock().expect("broker lock") = Some(tx);
        let me = self.clone();
        tokio::spawn(async move {
            while let Some(Ok(info)) = incoming.next().await {
                if info.knock.is_some() {
                    // Multiplexing is not offered in the handshake, so a
                    // host never knocks.
                    continue;
                }
                me.announced
                    .lock()
                    .expect("broker lock")
                    .insert(info.service_id, info);
                me.arrived.notify_waiters();
            }
            // One host per plugin process: when its broker stream ends,
            // the host has let go of the plugin (or died).
            me.stop.send_if_modified(|s| {
                if *s == Stop::Running {
                    *s = Stop::HostGone;
                    true
                } else {
                    false
                }
            });
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// Either kind of socket go-plugin announces.
trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// Connects to an announced address and runs the TLS handshake.
#[derive(Clone)]
struct Dialer {
    network: String,
    address: String,
    tls: tokio_rustls::TlsConnector,
}

type Connected = TokioIo<tokio_rustls::client::TlsStream<Box<dyn Io>>>;

impl tower_service::Service<Uri> for Dialer {
    type Response = Connected;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Connected, std::io::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: Uri) -> Self::Future {
        let me = self.clone();
        Box::pin(async move {
            let io: Box<dyn Io> = match me.network.as_str() {
                "unix" => Box::new(tokio::net::UnixStream::connect(&me.address).await?),
                "tcp" => Box::new(tokio::net::TcpStream::connect(&me.address).await?),
                other => {
                    return Err(std::io::Error::other(format!(
                        "unknown network {other:?} announced by the host"
                    )));
                }
            };
            let name = rustls::pki_types::ServerName::try_from(SERVER_NAME)
                .map_err(std::io::Error::other)?;
            let tls = me.tls.connect(name, io).await?;
            Ok(TokioIo::new(tls))
        })
    }
}

/// `GRPCController`: the host's way to stop the plugin.
pub struct Controller(pub watch::Sender<Stop>);

#[tonic::async_trait]
impl GrpcController for Controller {
    async fn shutdown(&self, _request: Request<Empty>) -> Result<Response<Empty>, Status> {
        self.0.send_replace(Stop::Shutdown);
        Ok(Response::new(Empty {}))
    }
}

/// `GRPCStdio`: the host mirrors what the plugin prints through it. This
/// plugin prints nothing to stdout after the handshake and writes its log
/// to stderr directly, so the stream stays open and quiet.
pub struct Stdio;

#[tonic::async_trait]
impl GrpcStdio for Stdio {
    type StreamStdioStream = Pin<Box<dyn Stream<Item = Result<StdioData, Status>> + Send>>;

    async fn stream_stdio(
        &self,
        _request: Request<()>,
    ) -> Result<Response<Self::StreamStdioStream>, Status> {
        Ok(Response::new(Box::pin(tokio_stream::pending())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_5_is_chosen_when_offered() {
        assert_eq!(negotiate(Some("3,4,5")), Ok(5));
        assert_eq!(negotiate(Some("5")), Ok(5));
        let e = negotiate(Some("3,4")).unwrap_err();
        assert!(e.contains("\"3,4\"") && e.contains("version 5"), "{e}");
        assert!(negotiate(None).is_err());
    }

    #[test]
    fn the_handshake_line_has_six_fields_and_the_raw_certificate() {
        let line = handshake_line(Path::new("/tmp/x/plugin.sock"), &[0xde, 0xad, 0xbe, 0xef]);
        assert_eq!(line, "1|5|unix|/tmp/x/plugin.sock|grpc|3q2+7w\n");
    }
}
