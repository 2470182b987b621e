//! The demo's app (`rekey demo-app`, one process per pod): an HTTP server
//! that accepts `Authorization: Bearer <key>` for the current or previous
//! key of the keyring file its sidecar writes, and answers with the version
//! that matched. It rereads the file when it changes; it never restarts.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use crate::error::CliError;

/// Options of the hidden `rekey demo-app`.
#[derive(Debug, Clone, clap::Args)]
pub struct AppArgs {
    /// The keyring file (JSON) the pod's sidecar writes.
    #[arg(long)]
    pub keyring: PathBuf,
    /// Address to serve on; the first line on stdout names the one bound.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,
}

/// (modified time, inode) of a loaded file.
type Stamp = (std::time::SystemTime, u64);
/// (version, key) pairs, current first.
type Keys = Vec<(u64, String)>;

/// The app's view of its keyring file, reloaded when the file changes.
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
        let mut g = self
            .loaded
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
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

/// Binds, prints `listening ADDR`, and serves until the process is killed.
pub async fn serve(args: &AppArgs) -> Result<(), CliError> {
    use axum::http::{HeaderMap, StatusCode};
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| {
            CliError::failed(format!("demo-app: cannot listen on {}: {e}", args.listen))
        })?;
    let addr = listener
        .local_addr()
        .map_err(|e| CliError::failed(format!("demo-app: {e}")))?;
    println!("listening {addr}");
    let ring = Arc::new(Keyring {
        path: args.keyring.clone(),
        loaded: Mutex::new(None),
    });
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
    axum::serve(listener, app)
        .await
        .map_err(|e| CliError::failed(format!("demo-app: {e}")))
}
