//! Reaching the backend. [`Target::from_args`] checks everything the user
//! gave about the connection (address, token, TLS files) without touching
//! the network, so those mistakes are usage errors; [`Target::connect`]
//! then dials, and only that can fail as "unavailable".

use std::path::{Path, PathBuf};
use std::time::Duration;

use rekey_proto::v1::rekey_client::RekeyClient;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::args::BackendArgs;
use crate::error::CliError;

/// A client of `rekey.v1` that sends the bearer token, if any.
pub type Client = RekeyClient<InterceptedService<Channel, Bearer>>;

/// Adds `authorization: Bearer ...` to every call (marked sensitive so
/// that it is never logged).
#[derive(Clone)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(h) = &self.0 {
            req.metadata_mut().insert("authorization", h.clone());
        }
        Ok(req)
    }
}

/// A checked backend address with its credentials, not yet connected.
pub struct Target {
    addr: String,
    endpoint: Endpoint,
    bearer: Bearer,
}

/// Where the admin token of a backend started in this directory lives.
pub const LOCAL_ADMIN_TOKEN: &str = "./rekey-data/admin.token";

/// Whether a token was given or found.
pub fn token_given(a: &BackendArgs) -> bool {
    a.token.is_some() || a.token_file.is_some() || Path::new(LOCAL_ADMIN_TOKEN).exists()
}

impl Target {
    /// Reads the token and the TLS files and checks the address. Every
    /// error is the user's input: exit status 2.
    pub fn from_args(a: &BackendArgs) -> Result<Target, CliError> {
        let bearer = match resolve_token(a)? {
            Some(t) => {
                let mut v: MetadataValue<Ascii> = format!("Bearer {t}").parse().map_err(|_| {
                    CliError::usage("the token contains characters not allowed in a header")
                })?;
                v.set_sensitive(true);
                Bearer(Some(v))
            }
            None => Bearer(None),
        };
        if !a.addr.starts_with("http://") && !a.addr.starts_with("https://") {
            return Err(CliError::usage(format!(
                "--addr {:?} needs a scheme: http://{} (or https:// for TLS)",
                a.addr, a.addr
            )));
        }
        let mut endpoint = Endpoint::from_shared(a.addr.clone())
            .map_err(|_| {
                CliError::usage(format!(
                    "--addr {:?} is not a URL such as http://127.0.0.1:7700",
                    a.addr
                ))
            })?
            .connect_timeout(Duration::from_secs(5));
        if a.addr.starts_with("https://") {
            let mut tls = ClientTlsConfig::new();
            if let Some(ca) = &a.ca_file {
                tls = tls.ca_certificate(Certificate::from_pem(read_flag_file("--ca-file", ca)?));
            }
            if let (Some(c), Some(k)) = (&a.cert_file, &a.key_file) {
                tls = tls.identity(Identity::from_pem(
                    read_flag_file("--cert-file", c)?,
                    read_flag_file("--key-file", k)?,
                ));
            }
            endpoint = endpoint
                .tls_config(tls)
                .map_err(|e| CliError::usage(format!("TLS settings: {e}")))?;
        }
        Ok(Target {
            addr: a.addr.clone(),
            endpoint,
            bearer,
        })
    }

    /// Connects; a backend that cannot be reached is a failure (exit 1)
    /// whose message names the cause.
    pub async fn connect(&self) -> Result<Client, CliError> {
        let channel = self
            .endpoint
            .connect()
            .await
            .map_err(|e| CliError::failed(connect_error(&self.addr, &e)))?;
        Ok(RekeyClient::with_interceptor(channel, self.bearer.clone())
            .max_decoding_message_size(64 << 20))
    }
}

/// Every message in an error's chain, outermost first.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![e.to_string()];
    let mut cur = e.source();
    while let Some(s) = cur {
        parts.push(s.to_string());
        cur = s.source();
    }
    parts.join(": ")
}

/// Why connecting to `addr` failed, in words a user can act on.
fn connect_error(addr: &str, e: &tonic::transport::Error) -> String {
    let why = chain(e);
    let lower = why.to_ascii_lowercase();
    let hint = if lower.contains("connection refused") {
        "nothing listens there; is rekey-backend running? (it prints the address it listens on)"
            .to_string()
    } else if addr.starts_with("https://")
        && (lower.contains("corrupt message")
            || lower.contains("invalidcontenttype")
            || lower.contains("tls"))
    {
        "the server there does not speak TLS; use http://".to_string()
    } else if addr.starts_with("http://")
        && (lower.contains("protocol") || lower.contains("frame") || lower.contains("reset"))
    {
        "the server there does not speak plain HTTP/2; if it uses TLS, use https://".to_string()
    } else if lower.contains("dns") || lower.contains("resolve") || lower.contains("lookup") {
        "the host name does not resolve".to_string()
    } else {
        why.clone()
    };
    format!("unavailable: cannot reach rekey-backend at {addr}: {hint} ({why})")
}

/// A call's failure that says the address is not a gRPC port (an HTTP
/// server such as the metrics port answered).
pub fn not_grpc(addr: &str, message: &str) -> Option<String> {
    message.contains("grpc-status header missing").then(|| {
        format!(
            "unavailable: {addr} answered, but not as rekey-backend's gRPC port (is it the metrics port?): {message}"
        )
    })
}

fn read_flag_file(flag: &str, p: &Path) -> Result<Vec<u8>, CliError> {
    std::fs::read(p)
        .map_err(|e| CliError::usage(format!("cannot read {flag} {}: {e}", p.display())))
}

/// `--token`, else `--token-file`, else the admin token of a backend
/// started in this directory, else none.
fn resolve_token(a: &BackendArgs) -> Result<Option<String>, CliError> {
    if let Some(t) = &a.token {
        return Ok(Some(t.trim().to_string()));
    }
    let path = a
        .token_file
        .clone()
        .or_else(|| Some(PathBuf::from(LOCAL_ADMIN_TOKEN)).filter(|p| p.exists()));
    match path {
        Some(p) => std::fs::read_to_string(&p)
            .map(|t| Some(t.trim().to_string()))
            .map_err(|e| CliError::usage(format!("cannot read token file {}: {e}", p.display()))),
        None => Ok(None),
    }
}
