//! Leader election through a Kubernetes Lease (`coordination.k8s.io/v1`),
//! the object kube-controller-manager and most operators elect with.
//!
//! The rules are the usual ones. A candidate reads the Lease; it may take it
//! when nobody holds it, when it holds it already, or when the Lease has not
//! changed for its `leaseDurationSeconds`, measured on the candidate's own
//! clock from when it first saw that `resourceVersion` (so clock skew
//! between pods does not matter). Every write carries the `resourceVersion`
//! it read, so of two candidates only one wins; the other gets 409 Conflict.
//! The leader renews in the background and considers itself leader only
//! while its last renewal is younger than two thirds of the duration, which
//! leaves a third of it between the moment a stalled leader stops and the
//! moment anyone else may start. On a clean stop it clears `holderIdentity`
//! so a successor need not wait.
//!
//! The service account token is read from its file for every request
//! (kubelet rotates projected tokens) and is never logged. It travels only
//! over https, or over plain http to a loopback address (`kubectl proxy`).
//!
//! Each candidate's identity is its consumer id with a random suffix, so
//! two processes never mistake each other's Lease for their own, even when
//! they share a consumer id.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls;

/// Where the service account's files are mounted in every pod.
pub const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

const TIMEOUT: Duration = Duration::from_secs(10);
/// How long a clean stop waits to hand the Lease back before leaving it to
/// expire by itself.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(2);
const MAX_BODY: usize = 1 << 20;

/// Why a Lease cannot be used or a request about it failed. Messages name
/// the API server, the Lease and the step; never the token.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    // The settings.
    #[error("{api_server}: give an https:// or http:// address")]
    NoScheme { api_server: String },
    #[error("{api_server}: put an IPv6 address in brackets (https://[fd00::1]:443)")]
    Ipv6Brackets { api_server: String },
    #[error(
        "{api_server}: a token is sent only over https, or over http to a loopback address (kubectl proxy)"
    )]
    TokenOverHttp { api_server: String },
    #[error("an https API server needs ca_file")]
    NoCaFile,
    #[error("cannot read {}: {reason}", path.display())]
    CaFile {
        path: PathBuf,
        reason: rustls::pki_types::pem::Error,
    },
    #[error("{}: {reason}", path.display())]
    CaCertificate { path: PathBuf, reason: CaProblem },
    #[error("{}: no certificate in it", path.display())]
    NoCertificate { path: PathBuf },
    #[error("{0}")]
    Tls(#[from] rustls::Error),
    #[error("{api_server}: {reason}")]
    ServerName {
        api_server: String,
        reason: rustls::pki_types::InvalidDnsNameError,
    },
    #[error("no randomness for the lease identity")]
    NoRandomness,

    // One request.
    /// `what` is `METHOD lease NAMESPACE/NAME`.
    #[error("{what}: no answer within {after:?}")]
    Timeout { what: String, after: Duration },
    /// A request that failed before an answer; `reason` says where.
    #[error("{what}: {reason}")]
    Request {
        what: String,
        reason: Box<LeaseError>,
    },
    #[error("cannot connect to {api_server}: {reason}")]
    Connect {
        api_server: String,
        reason: std::io::Error,
    },
    #[error("TLS with {api_server}: {reason}")]
    Handshake {
        api_server: String,
        reason: std::io::Error,
    },
    #[error("{0}")]
    Http(#[from] hyper::Error),
    #[error("{0}")]
    BuildRequest(#[from] hyper::http::Error),
    #[error("{0}")]
    Encode(#[from] serde_json::Error),
    #[error("cannot read the token file {}: {reason}", path.display())]
    TokenFile {
        path: PathBuf,
        reason: std::io::Error,
    },
    #[error("the token in {} is not a valid header", path.display())]
    TokenNotAHeader { path: PathBuf },
    #[error("reading the answer: {reason}")]
    ReadAnswer {
        reason: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("the Lease is not JSON: {0}")]
    NotJson(serde_json::Error),
    /// The API server answered with an error status; `message` is its own.
    #[error(
        "{method} lease {namespace}/{name}: HTTP {code} {message}{}",
        status_hint(*code)
    )]
    Status {
        method: String,
        namespace: String,
        name: String,
        code: u16,
        message: String,
    },
    #[error("the Lease kept changing")]
    KeptChanging,
}

/// What is wrong with a certificate in the CA file.
#[derive(Debug, thiserror::Error)]
pub enum CaProblem {
    #[error(transparent)]
    Pem(#[from] rustls::pki_types::pem::Error),
    #[error(transparent)]
    Rejected(#[from] rustls::Error),
}

/// What to check when the API server refuses.
fn status_hint(code: u16) -> &'static str {
    match code {
        401 => " (is the service account token valid?)",
        403 => " (grant the service account get, create and update on leases)",
        _ => "",
    }
}

/// Why a held Lease no longer makes this candidate the leader.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LeaseLost {
    #[error("the lease was not renewed in time")]
    NotRenewed,
    #[error("another candidate holds the lease now ({holder})")]
    TakenOver { holder: String },
    #[error("the Lease was deleted")]
    Deleted,
    /// Renewals failed until the lease ran out; `reason` is the last
    /// failure as it was logged.
    #[error("could not renew the lease in time: {reason}")]
    RenewFailed { reason: String },
}

/// How to reach the API server and which Lease to use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseConfig {
    /// `https://host:port` (in a pod: from `KUBERNETES_SERVICE_HOST` and
    /// `KUBERNETES_SERVICE_PORT`), or `http://` for `kubectl proxy`.
    pub api_server: String,
    pub namespace: String,
    pub name: String,
    /// How long a Lease nobody renews stays held (default 15s; whole
    /// seconds, as `leaseDurationSeconds` is).
    pub duration: Duration,
    /// The bearer token's file; none for `kubectl proxy`.
    pub token_file: Option<PathBuf>,
    /// The CA that signed the API server's certificate (https only).
    pub ca_file: Option<PathBuf>,
}

/// Checks that the address parses and the CA file holds certificates.
///
/// # Errors
/// What is wrong with the address, the token's transport or the CA file.
pub fn check(cfg: &LeaseConfig) -> Result<(), LeaseError> {
    Client::new(cfg.clone()).map(|_| ())
}

/// The Lease's default name for a secret: `rekey-reencrypt-`, the secret
/// id made into a DNS label, and a hash so that two ids never share one.
pub fn default_name(secret: &str) -> String {
    let mut slug = String::new();
    for c in secret.chars() {
        let c = c.to_ascii_lowercase();
        if c.is_ascii_alphanumeric() {
            slug.push(c);
        } else if !slug.ends_with('-') {
            slug.push('-');
        }
    }
    let slug: String = slug.trim_matches('-').chars().take(30).collect();
    let d = ring::digest::digest(&ring::digest::SHA256, secret.as_bytes());
    let h = hex::encode(&d.as_ref()[..4]);
    if slug.is_empty() {
        format!("rekey-reencrypt-{h}")
    } else {
        format!("rekey-reencrypt-{}-{h}", slug.trim_end_matches('-'))
    }
}

fn is_loopback(host: &str) -> bool {
    // A literal address only: a name could resolve anywhere.
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<std::net::IpAddr>()
        .is_ok_and(|ip| ip.is_loopback())
}

/// A Kubernetes `MicroTime`: RFC 3339 in UTC with microseconds.
fn micro_time(t: SystemTime) -> String {
    humantime::format_rfc3339_micros(t).to_string()
}

/// What a candidate does with the Lease it read.
#[derive(Debug, PartialEq, Eq)]
enum Decision {
    /// Write ourselves in; `transition` when the holder changes.
    Take { transition: bool },
    /// Someone else holds it and it has not expired.
    Wait,
}

/// `unchanged_for` is how long this candidate has seen the same
/// `resourceVersion`.
fn decide(
    holder: Option<&str>,
    me: &str,
    unchanged_for: Duration,
    lease_duration: Duration,
) -> Decision {
    match holder {
        None | Some("") => Decision::Take { transition: true },
        Some(h) if h == me => Decision::Take { transition: false },
        Some(_) if unchanged_for >= lease_duration => Decision::Take { transition: true },
        Some(_) => Decision::Wait,
    }
}

fn holder(lease: &Value) -> Option<&str> {
    lease["spec"]["holderIdentity"].as_str()
}

fn resource_version(lease: &Value) -> String {
    lease["metadata"]["resourceVersion"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// The API server's own message for a failed request, if it sent one.
fn status_message(body: &[u8]) -> String {
    serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v["message"].as_str().map(str::to_string))
        .unwrap_or_default()
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// A small client for the few Lease calls, one connection per request.
struct Client {
    cfg: LeaseConfig,
    host: String,
    port: u16,
    tls: Option<(TlsConnector, rustls::pki_types::ServerName<'static>)>,
}

impl Client {
    fn new(cfg: LeaseConfig) -> Result<Self, LeaseError> {
        use rustls::pki_types::pem::PemObject;
        let api_server = || cfg.api_server.clone();
        let (tls, rest) = if let Some(r) = cfg.api_server.strip_prefix("https://") {
            (true, r)
        } else if let Some(r) = cfg.api_server.strip_prefix("http://") {
            (false, r)
        } else {
            return Err(LeaseError::NoScheme {
                api_server: api_server(),
            });
        };
        let authority = rest.trim_end_matches('/');
        if authority.matches(':').count() > 1 && !authority.starts_with('[') {
            return Err(LeaseError::Ipv6Brackets {
                api_server: api_server(),
            });
        }
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) if !h.is_empty() && p.parse::<u16>().is_ok() && !p.contains(']') => {
                (h.to_string(), p.parse().unwrap_or(443))
            }
            _ => (authority.to_string(), if tls { 443 } else { 80 }),
        };
        if !tls && cfg.token_file.is_some() && !is_loopback(&host) {
            return Err(LeaseError::TokenOverHttp {
                api_server: api_server(),
            });
        }
        let tls = if tls {
            let ca = cfg.ca_file.as_ref().ok_or(LeaseError::NoCaFile)?;
            let bad_cert = |reason: CaProblem| LeaseError::CaCertificate {
                path: ca.clone(),
                reason,
            };
            let mut roots = rustls::RootCertStore::empty();
            for c in rustls::pki_types::CertificateDer::pem_file_iter(ca).map_err(|reason| {
                LeaseError::CaFile {
                    path: ca.clone(),
                    reason,
                }
            })? {
                let c = c.map_err(|e| bad_cert(e.into()))?;
                roots.add(c).map_err(|e| bad_cert(e.into()))?;
            }
            if roots.is_empty() {
                return Err(LeaseError::NoCertificate { path: ca.clone() });
            }
            let config = rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
            let name = rustls::pki_types::ServerName::try_from(
                host.trim_start_matches('[')
                    .trim_end_matches(']')
                    .to_string(),
            )
            .map_err(|reason| LeaseError::ServerName {
                api_server: api_server(),
                reason,
            })?;
            Some((TlsConnector::from(Arc::new(config)), name))
        } else {
            None
        };
        Ok(Client {
            cfg,
            host,
            port,
            tls,
        })
    }

    /// The duration as written into the Lease, and used for every timing.
    fn duration_secs(&self) -> u64 {
        self.cfg.duration.as_secs().max(1)
    }

    fn collection(&self) -> String {
        format!(
            "/apis/coordination.k8s.io/v1/namespaces/{}/leases",
            self.cfg.namespace
        )
    }

    fn item(&self) -> String {
        format!("{}/{}", self.collection(), self.cfg.name)
    }

    /// One request; the status code and the body.
    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<(u16, Bytes), LeaseError> {
        let what = format!("{method} lease {}/{}", self.cfg.namespace, self.cfg.name);
        match tokio::time::timeout(TIMEOUT, self.send_inner(method, path, body)).await {
            Err(_) => Err(LeaseError::Timeout {
                what,
                after: TIMEOUT,
            }),
            Ok(r) => r.map_err(|e| LeaseError::Request {
                what,
                reason: Box::new(e),
            }),
        }
    }

    async fn send_inner(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<(u16, Bytes), LeaseError> {
        let tcp = TcpStream::connect((
            self.host.trim_start_matches('[').trim_end_matches(']'),
            self.port,
        ))
        .await
        .map_err(|reason| LeaseError::Connect {
            api_server: self.cfg.api_server.clone(),
            reason,
        })?;
        let _ = tcp.set_nodelay(true);
        let io: Box<dyn Io> = match &self.tls {
            Some((c, name)) => Box::new(c.connect(name.clone(), tcp).await.map_err(|reason| {
                LeaseError::Handshake {
                    api_server: self.cfg.api_server.clone(),
                    reason,
                }
            })?),
            None => Box::new(tcp),
        };
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let host = if (self.tls.is_some() && self.port == 443)
            || (self.tls.is_none() && self.port == 80)
        {
            self.host.clone()
        } else {
            format!("{}:{}", self.host, self.port)
        };
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", host)
            .header("accept", "application/json")
            .header("user-agent", "rekey-sidecar");
        if let Some(f) = &self.cfg.token_file {
            let token = zeroize::Zeroizing::new(std::fs::read_to_string(f).map_err(|reason| {
                LeaseError::TokenFile {
                    path: f.clone(),
                    reason,
                }
            })?);
            let mut v = hyper::header::HeaderValue::from_str(&format!("Bearer {}", token.trim()))
                .map_err(|_| LeaseError::TokenNotAHeader { path: f.clone() })?;
            v.set_sensitive(true);
            req = req.header("authorization", v);
        }
        let payload = match body {
            Some(b) => {
                req = req.header("content-type", "application/json");
                Bytes::from(serde_json::to_vec(b)?)
            }
            None => Bytes::new(),
        };
        let req = req.body(Full::new(payload))?;
        let resp = sender.send_request(req).await?;
        let status = resp.status().as_u16();
        let body = Limited::new(resp.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(|reason| LeaseError::ReadAnswer { reason })?
            .to_bytes();
        Ok((status, body))
    }

    /// The Lease, or `None` when it does not exist yet.
    async fn get(&self) -> Result<Option<Value>, LeaseError> {
        let (code, body) = self.send(Method::GET, &self.item(), None).await?;
        match code {
            200 => serde_json::from_slice(&body)
                .map(Some)
                .map_err(LeaseError::NotJson),
            404 => Ok(None),
            c => Err(self.failure("GET", c, &body)),
        }
    }

    /// Creates or replaces the Lease. `Ok(None)` on a conflict: someone
    /// else wrote it first.
    async fn write(&self, lease: &Value, create: bool) -> Result<Option<Value>, LeaseError> {
        let (method, path) = if create {
            (Method::POST, self.collection())
        } else {
            (Method::PUT, self.item())
        };
        let label = method.to_string();
        let (code, body) = self.send(method, &path, Some(lease)).await?;
        match code {
            200 | 201 => serde_json::from_slice(&body)
                .map(Some)
                .map_err(LeaseError::NotJson),
            409 => Ok(None),
            c => Err(self.failure(&label, c, &body)),
        }
    }

    fn failure(&self, method: &str, code: u16, body: &[u8]) -> LeaseError {
        LeaseError::Status {
            method: method.to_string(),
            namespace: self.cfg.namespace.clone(),
            name: self.cfg.name.clone(),
            code,
            message: status_message(body),
        }
    }
}

/// Candidate state kept between attempts: the `resourceVersion` last seen
/// and since when.
pub struct Elector {
    client: Arc<Client>,
    identity: String,
    seen: Option<(String, Instant)>,
}

impl Elector {
    /// `consumer_id` names the candidate; a random suffix makes the
    /// identity this process's own.
    ///
    /// # Errors
    /// The settings are unusable ([`check`]), or no randomness.
    pub fn new(cfg: LeaseConfig, consumer_id: &str) -> Result<Self, LeaseError> {
        use ring::rand::SecureRandom;
        let mut suffix = [0u8; 4];
        ring::rand::SystemRandom::new()
            .fill(&mut suffix)
            .map_err(|_| LeaseError::NoRandomness)?;
        Ok(Elector {
            client: Arc::new(Client::new(cfg)?),
            identity: format!("{consumer_id}_{}", hex::encode(suffix)),
            seen: None,
        })
    }

    /// This candidate's `holderIdentity`.
    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// One try: `Some` when this candidate now leads.
    ///
    /// # Errors
    /// The Lease cannot be read or written.
    pub async fn try_acquire(&mut self) -> Result<Option<Held>, LeaseError> {
        let sent = Instant::now();
        let now = micro_time(SystemTime::now());
        let written = match self.client.get().await? {
            None => {
                let lease = json!({
                    "apiVersion": "coordination.k8s.io/v1",
                    "kind": "Lease",
                    "metadata": {
                        "name": self.client.cfg.name,
                        "namespace": self.client.cfg.namespace,
                        "labels": {"app.kubernetes.io/managed-by": "rekey"},
                    },
                    "spec": {
                        "holderIdentity": self.identity,
                        "leaseDurationSeconds": self.client.duration_secs(),
                        "acquireTime": now,
                        "renewTime": now,
                        "leaseTransitions": 0,
                    },
                });
                self.client.write(&lease, true).await?
            }
            Some(mut lease) => {
                // A version first seen now has existed since at most now:
                // counting from the answer, not the request, never lets the
                // wait come out shorter than the holder's renewals.
                let rv = resource_version(&lease);
                let since = match &self.seen {
                    Some((seen, at)) if *seen == rv => *at,
                    _ => {
                        let at = Instant::now();
                        self.seen = Some((rv, at));
                        at
                    }
                };
                let their = lease["spec"]["leaseDurationSeconds"]
                    .as_u64()
                    .map_or(self.client.cfg.duration, Duration::from_secs);
                match decide(holder(&lease), &self.identity, since.elapsed(), their) {
                    Decision::Wait => return Ok(None),
                    Decision::Take { transition } => {
                        let spec = &mut lease["spec"];
                        if transition {
                            let n = spec["leaseTransitions"].as_u64().unwrap_or(0);
                            spec["leaseTransitions"] = json!(n + 1);
                            spec["acquireTime"] = json!(now);
                        }
                        spec["holderIdentity"] = json!(self.identity);
                        spec["leaseDurationSeconds"] = json!(self.client.duration_secs());
                        spec["renewTime"] = json!(now);
                        self.client.write(&lease, false).await?
                    }
                }
            }
        };
        let Some(lease) = written else {
            return Ok(None);
        };
        Ok(Some(Held::start(
            self.client.clone(),
            self.identity.clone(),
            lease,
            sent,
        )))
    }
}

struct Status {
    lease: Value,
    valid_until: Instant,
    lost: Option<LeaseLost>,
}

/// A Lease this candidate holds, renewed in the background until released
/// or dropped.
pub struct Held {
    status: Arc<Mutex<Status>>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
    client: Arc<Client>,
    identity: String,
}

impl Held {
    fn start(client: Arc<Client>, identity: String, lease: Value, sent: Instant) -> Held {
        let duration = Duration::from_secs(client.duration_secs());
        let deadline = duration * 2 / 3;
        let status = Arc::new(Mutex::new(Status {
            lease,
            valid_until: sent + deadline,
            lost: None,
        }));
        let (stop, mut stopped) = oneshot::channel();
        let task = {
            let (status, client, identity) = (status.clone(), client.clone(), identity.clone());
            let every = duration / 5;
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        _ = tokio::time::sleep(every) => {}
                        _ = &mut stopped => return,
                    }
                    if let Err(why) = renew(&client, &identity, &status, deadline).await {
                        tracing::warn!(lease = %client.cfg.name, error = %why, "lost the re-encryption lease");
                        status.lock().unwrap_or_else(|p| p.into_inner()).lost = Some(why);
                        return;
                    }
                }
            })
        };
        Held {
            status,
            stop: Some(stop),
            task: Some(task),
            client,
            identity,
        }
    }

    /// `Ok` while this candidate may act as leader.
    ///
    /// # Errors
    /// Why it may not any more.
    pub fn check(&self) -> Result<(), LeaseLost> {
        let s = self.status.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(why) = &s.lost {
            return Err(why.clone());
        }
        if Instant::now() >= s.valid_until {
            return Err(LeaseLost::NotRenewed);
        }
        Ok(())
    }

    /// Stops renewing and clears `holderIdentity` so that another candidate
    /// may lead at once. Gives up after a short while (the Lease then
    /// expires by itself), so a stopping pod is never held up.
    pub async fn release(mut self) {
        self.stop.take();
        if let Some(t) = self.task.take() {
            // A renewal in flight may still land; the 409 it causes below
            // is handled by reading the Lease again.
            t.abort();
            let _ = t.await;
        }
        // Even after a late renewal the Lease may still name us; give_back
        // leaves it alone if anyone else holds it.
        let lease = self
            .status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .lease
            .clone();
        let name = self.client.cfg.name.clone();
        match tokio::time::timeout(
            RELEASE_TIMEOUT,
            give_back(&self.client, &self.identity, lease),
        )
        .await
        {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(lease = %name, error = %e, "cannot release the re-encryption lease; it expires by itself");
            }
            Err(_) => {
                tracing::warn!(lease = %name, "no answer releasing the re-encryption lease; it expires by itself");
            }
        }
    }
}

/// Writes the Lease back with nobody holding it. On a conflict (a renewal
/// that landed meanwhile) reads it again and, if it is still ours, tries
/// once more.
async fn give_back(client: &Client, identity: &str, mut lease: Value) -> Result<(), LeaseError> {
    for _ in 0..2 {
        lease["spec"]["holderIdentity"] = json!("");
        lease["spec"]["leaseDurationSeconds"] = json!(1);
        lease["spec"]["renewTime"] = json!(micro_time(SystemTime::now()));
        if client.write(&lease, false).await?.is_some() {
            return Ok(());
        }
        match client.get().await? {
            Some(l) if holder(&l) == Some(identity) => lease = l,
            _ => return Ok(()),
        }
    }
    Err(LeaseError::KeptChanging)
}

impl Drop for Held {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

/// One renewal: write a fresh `renewTime` over the version we hold.
async fn renew(
    client: &Client,
    identity: &str,
    status: &Mutex<Status>,
    deadline: Duration,
) -> Result<(), LeaseLost> {
    let sent = Instant::now();
    let mut lease = status
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .lease
        .clone();
    lease["spec"]["renewTime"] = json!(micro_time(SystemTime::now()));
    let result = match client.write(&lease, false).await {
        Ok(Some(l)) => Ok(l),
        Ok(None) => {
            // Written by someone else since: ours only if we still hold it.
            match client.get().await {
                Ok(Some(l)) if holder(&l) == Some(identity) => {
                    status.lock().unwrap_or_else(|p| p.into_inner()).lease = l;
                    return Ok(());
                }
                Ok(Some(l)) => {
                    return Err(LeaseLost::TakenOver {
                        holder: holder(&l).unwrap_or("nobody").to_string(),
                    });
                }
                Ok(None) => return Err(LeaseLost::Deleted),
                Err(e) => Err(e),
            }
        }
        Err(e) => Err(e),
    };
    let mut s = status.lock().unwrap_or_else(|p| p.into_inner());
    match result {
        Ok(l) => {
            s.lease = l;
            s.valid_until = sent + deadline;
            Ok(())
        }
        Err(e) if Instant::now() >= s.valid_until => Err(LeaseLost::RenewFailed {
            reason: e.to_string(),
        }),
        Err(e) => {
            tracing::warn!(lease = %client.cfg.name, error = %e, "cannot renew the re-encryption lease; retrying");
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_dns_labels_and_distinct() {
        let a = default_name("prod/enc/Master_Key");
        assert!(a.starts_with("rekey-reencrypt-prod-enc-master-key-"), "{a}");
        assert!(a.len() <= 63);
        assert!(
            a.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        );
        assert_ne!(default_name("a/b"), default_name("a.b"));
        let long = default_name(&"x".repeat(300));
        assert!(long.len() <= 63, "{long}");
        assert!(!default_name("///").contains("--"));
    }

    #[test]
    fn messages_keep_their_documented_wording() {
        // The backend's status of a key shows these as `error: ...`, and
        // the end-to-end tests look for the hint.
        let refused = LeaseError::Status {
            method: "GET".into(),
            namespace: "ns".into(),
            name: "l".into(),
            code: 401,
            message: "Unauthorized".into(),
        };
        assert_eq!(
            refused.to_string(),
            "GET lease ns/l: HTTP 401 Unauthorized (is the service account token valid?)"
        );
        let wrapped = LeaseError::Request {
            what: "PUT lease ns/l".into(),
            reason: Box::new(LeaseError::TokenNotAHeader {
                path: "/var/run/token".into(),
            }),
        };
        assert_eq!(
            wrapped.to_string(),
            "PUT lease ns/l: the token in /var/run/token is not a valid header"
        );
        assert_eq!(
            LeaseLost::TakenOver {
                holder: "api-1_ab".into()
            }
            .to_string(),
            "another candidate holds the lease now (api-1_ab)"
        );
    }

    #[test]
    fn micro_time_has_six_fraction_digits() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_micros(1_700_000_000_123_456);
        assert_eq!(micro_time(t), "2023-11-14T22:13:20.123456Z");
    }

    #[test]
    fn who_may_take_the_lease() {
        let d = Duration::from_secs(15);
        let s = Duration::from_secs;
        assert_eq!(
            decide(None, "me", s(0), d),
            Decision::Take { transition: true }
        );
        assert_eq!(
            decide(Some(""), "me", s(0), d),
            Decision::Take { transition: true }
        );
        assert_eq!(
            decide(Some("me"), "me", s(0), d),
            Decision::Take { transition: false }
        );
        assert_eq!(decide(Some("other"), "me", s(14), d), Decision::Wait);
        assert_eq!(
            decide(Some("other"), "me", s(15), d),
            Decision::Take { transition: true }
        );
    }

    #[test]
    fn https_needs_a_ca_and_addresses_need_a_scheme() {
        let cfg = LeaseConfig {
            api_server: "https://10.96.0.1:443".into(),
            namespace: "ns".into(),
            name: "l".into(),
            duration: Duration::from_secs(15),
            token_file: None,
            ca_file: None,
        };
        assert!(matches!(
            Client::new(cfg.clone()).err().unwrap(),
            LeaseError::NoCaFile
        ));
        let bad = LeaseConfig {
            api_server: "10.96.0.1:443".into(),
            ..cfg.clone()
        };
        assert!(
            Client::new(bad)
                .err()
                .unwrap()
                .to_string()
                .contains("https://")
        );
        let proxy = Client::new(LeaseConfig {
            api_server: "http://127.0.0.1:8001".into(),
            ..cfg
        })
        .unwrap();
        assert_eq!((proxy.host.as_str(), proxy.port), ("127.0.0.1", 8001));
        assert_eq!(
            proxy.item(),
            "/apis/coordination.k8s.io/v1/namespaces/ns/leases/l"
        );
    }

    #[test]
    fn two_candidates_with_one_consumer_id_are_two_identities() {
        let cfg = LeaseConfig {
            api_server: "http://127.0.0.1:8001".into(),
            namespace: "ns".into(),
            name: "l".into(),
            duration: Duration::from_secs(15),
            token_file: None,
            ca_file: None,
        };
        let a = Elector::new(cfg.clone(), "api-7f9c").unwrap();
        let b = Elector::new(cfg, "api-7f9c").unwrap();
        assert!(a.identity().starts_with("api-7f9c_"), "{}", a.identity());
        assert_ne!(a.identity(), b.identity());
    }

    #[test]
    fn a_token_goes_only_over_https_or_to_loopback() {
        let cfg = |api: &str| LeaseConfig {
            api_server: api.into(),
            namespace: "ns".into(),
            name: "l".into(),
            duration: Duration::from_secs(15),
            token_file: Some("/dev/null".into()),
            ca_file: None,
        };
        for ok in ["http://127.0.0.1:8001", "http://[::1]:8001"] {
            assert!(Client::new(cfg(ok)).is_ok(), "{ok}");
        }
        for remote in ["http://10.0.0.5:8001", "http://localhost:8001"] {
            let e = Client::new(cfg(remote)).err().unwrap().to_string();
            assert!(e.contains("only over https"), "{remote}: {e}");
        }
        let e = Client::new(cfg("http://fd00::1:8001"))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("brackets"), "{e}");
    }
}
