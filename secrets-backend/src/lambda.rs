//! `rekey-lambda`: rekey's kinds as the rotation function AWS Secrets
//! Manager (ASM) calls on its own schedule.
//!
//! ASM invokes it four times per rotation with `{"Step", "SecretId",
//! "ClientRequestToken"}`, as its rotation function contract says:
//! - every step first checks that rotation is enabled on the secret, that
//!   the token is one of its versions, and that some version is
//!   `AWSCURRENT`; a token already `AWSCURRENT` returns at once, one not
//!   `AWSPENDING` fails;
//! - `createSecret` keeps a value already written for this token, or makes
//!   one with the kind and writes it with `PutSecretValue` as `AWSPENDING`;
//! - `setSecret` makes it real where it must exist (a Postgres role's
//!   password, a Redis ACL password) while the current one keeps working;
//! - `testSecret` proves it works;
//! - `finishSecret` moves `AWSCURRENT` to it (ASM moves `AWSPREVIOUS`), and
//!   does nothing when it is there already.
//!
//! Every step is safe to repeat: ASM retries a failed invocation. A failure
//! leaves `AWSCURRENT` where it was, so apps keep the credential that works.
//!
//! Configuration comes from the function's environment: `REKEY_KIND` and
//! the kind's `rekey create` options as `REKEY_<OPTION>`; the admin
//! credential of postgres and redis from the ASM secret named by
//! `REKEY_ADMIN_SECRET_ID`; optionally `REKEY_BACKEND` with a token, to tell
//! a rekey backend at once so its sidecars need not wait for the next poll.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use lambda_runtime::{Diagnostic, LambdaEvent, service_fn};
use rekey_keyring::SecretValue;
use serde::Deserialize;
use zeroize::Zeroizing;

use crate::error::innermost;
use crate::kinds::postgres::PgOptions;
use crate::kinds::redis::{RedisOptions, RedisTls};
use crate::kinds::{
    Encoding, InlineUrl, Kind, KindOptions, Kinds, RandomOptions, SecretCtx, field,
};
use crate::provider::aws::{AWSCURRENT, AWSPENDING, AWSPREVIOUS, Asm, AsmVersion, Described};

/// The event ASM sends.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct RotationEvent {
    pub step: String,
    pub secret_id: String,
    pub client_request_token: String,
}

/// A step's failure, as the runtime reports it to ASM: a type a user can
/// search the logs for, and a message that never holds a value.
#[derive(Debug)]
pub struct Failure {
    kind: &'static str,
    message: String,
}

impl Failure {
    fn new(kind: &'static str, message: impl Into<String>) -> Self {
        Failure {
            kind,
            message: message.into(),
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.kind, self.message)
    }
}

impl From<Failure> for Diagnostic {
    fn from(f: Failure) -> Self {
        Diagnostic {
            error_type: f.kind.to_string(),
            error_message: f.message,
        }
    }
}

fn asm_failure(e: crate::provider::aws::AsmError) -> Failure {
    Failure::new("SecretsManagerError", e.message)
}

/// The kinds the function rotates, and the options each takes.
const KINDS: [(&str, &[&str]); 3] = [
    ("random", &["LENGTH", "ENCODING"]),
    (
        "postgres",
        &[
            "GROUP_ROLE",
            "ROLE_BASE",
            "DATABASE",
            "HOST",
            "PORT",
            "PROBE",
            "TERMINATE_SESSIONS",
            "SSLMODE",
            "SSLROOTCERT",
        ],
    ),
    (
        "redis",
        &[
            "USERNAME",
            "ADDRESS",
            "TOPOLOGY",
            "NODES",
            "SENTINELS",
            "MASTER_NAME",
            "TLS",
            "TLS_CA_FILE",
            "TLS_CERT_FILE",
            "TLS_KEY_FILE",
            "TLS_SERVER_NAME",
        ],
    ),
];

/// Settings that are not a kind's options.
const GENERAL: [&str; 6] = [
    "KIND",
    "ADMIN_SECRET_ID",
    "BACKEND",
    "BACKEND_TOKEN",
    "BACKEND_TOKEN_SECRET_ID",
    "BACKEND_CA_FILE",
];

/// The function's settings, read once at start.
pub struct Settings {
    kind: Arc<dyn Kind>,
    options: KindOptions,
    admin_secret_id: Option<String>,
    backend: Option<BackendSettings>,
    /// A Redis admin secret of fields makes a `rediss://` URL.
    redis_tls: bool,
}

struct BackendSettings {
    addr: String,
    token: BackendToken,
    ca_file: Option<String>,
}

enum BackendToken {
    Plain(Zeroizing<String>),
    SecretId(String),
    None,
}

impl Settings {
    /// Reads `REKEY_*` from `vars`; every problem is listed.
    ///
    /// # Errors
    ///
    /// A message naming every setting that is missing, unknown or wrong.
    pub fn from_vars(vars: impl IntoIterator<Item = (String, String)>) -> Result<Self, String> {
        let env: BTreeMap<String, String> = vars
            .into_iter()
            .filter_map(|(k, v)| k.strip_prefix("REKEY_").map(|k| (k.to_string(), v)))
            .collect();
        let mut problems = Vec::new();
        let kind_name = env.get("KIND").map(String::as_str).unwrap_or_default();
        let known: Vec<&str> = KINDS.iter().map(|(k, _)| *k).collect();
        let Some((_, options)) = KINDS.iter().find(|(k, _)| *k == kind_name) else {
            return Err(if kind_name.is_empty() {
                format!("REKEY_KIND is not set (one of: {})", known.join(", "))
            } else {
                format!(
                    "REKEY_KIND={kind_name:?} is not a kind rekey-lambda rotates (one of: {})",
                    known.join(", ")
                )
            });
        };
        for k in env.keys() {
            if !GENERAL.contains(&k.as_str()) && !options.contains(&k.as_str()) {
                let hint = KINDS
                    .iter()
                    .find(|(_, o)| o.contains(&k.as_str()))
                    .map(|(other, _)| format!(" (an option of the {other} kind)"))
                    .unwrap_or_default();
                problems.push(format!(
                    "REKEY_{k} does not apply to REKEY_KIND={kind_name}{hint}"
                ));
            }
        }
        let get = |k: &str| env.get(k).map(|v| v.trim().to_string()).unwrap_or_default();
        let flag = |k: &str, problems: &mut Vec<String>| match get(k).as_str() {
            "" | "false" => false,
            "true" => true,
            other => {
                problems.push(format!("REKEY_{k}={other:?}: use true or false"));
                false
            }
        };
        let options = match kind_name {
            "random" => {
                let length = match get("LENGTH").as_str() {
                    "" => crate::kinds::DEFAULT_RANDOM_LENGTH,
                    l => l.parse().unwrap_or_else(|_| {
                        problems.push(format!("REKEY_LENGTH={l:?} is not a number"));
                        0
                    }),
                };
                let encoding = match get("ENCODING").as_str() {
                    "" => Encoding::Base64url,
                    e => e.parse().unwrap_or_else(|err| {
                        problems.push(format!("REKEY_ENCODING: {err}"));
                        Encoding::Base64url
                    }),
                };
                KindOptions::from(RandomOptions { length, encoding })
            }
            "postgres" => KindOptions::from(PgOptions {
                group_role: get("GROUP_ROLE"),
                role_base: get("ROLE_BASE"),
                database: get("DATABASE"),
                host: get("HOST"),
                port: match get("PORT").as_str() {
                    "" => 0,
                    p => p.parse().unwrap_or_else(|_| {
                        problems.push(format!("REKEY_PORT={p:?} is not a TCP port"));
                        0
                    }),
                },
                probe: get("PROBE"),
                terminate_sessions: flag("TERMINATE_SESSIONS", &mut problems),
                sslmode: get("SSLMODE"),
                sslrootcert: get("SSLROOTCERT"),
                ..PgOptions::default()
            }),
            _ => {
                let list = |k: &str| -> Vec<String> {
                    get(k)
                        .split(',')
                        .map(|a| a.trim().to_string())
                        .filter(|a| !a.is_empty())
                        .collect()
                };
                KindOptions::from(RedisOptions {
                    username: get("USERNAME"),
                    address: get("ADDRESS"),
                    topology: get("TOPOLOGY").parse().unwrap_or_else(|_| {
                        problems.push(format!(
                            "REKEY_TOPOLOGY={:?}: use single, nodes, sentinel or cluster",
                            get("TOPOLOGY")
                        ));
                        crate::kinds::redis::Topology::default()
                    }),
                    nodes: list("NODES"),
                    sentinels: list("SENTINELS"),
                    master_name: get("MASTER_NAME"),
                    tls: RedisTls {
                        ca_file: get("TLS_CA_FILE"),
                        cert_file: get("TLS_CERT_FILE"),
                        key_file: get("TLS_KEY_FILE"),
                        server_name: get("TLS_SERVER_NAME"),
                    },
                    ..RedisOptions::default()
                })
            }
        };
        // An admin secret of fields (AWS's templates) makes a rediss://
        // URL when TLS is asked for.
        let redis_tls = kind_name == "redis"
            && (flag("TLS", &mut problems)
                || [
                    "TLS_CA_FILE",
                    "TLS_CERT_FILE",
                    "TLS_KEY_FILE",
                    "TLS_SERVER_NAME",
                ]
                .iter()
                .any(|k| !get(k).is_empty()));
        let admin_secret_id = Some(get("ADMIN_SECRET_ID")).filter(|s| !s.is_empty());
        if kind_name != "random" && admin_secret_id.is_none() {
            problems.push(format!(
                "REKEY_ADMIN_SECRET_ID must name the Secrets Manager secret holding the {kind_name} admin credential"
            ));
        }
        if kind_name == "random" && admin_secret_id.is_some() {
            problems.push("REKEY_ADMIN_SECRET_ID does not apply to REKEY_KIND=random".into());
        }
        let backend = match get("BACKEND").as_str() {
            "" => {
                for k in [
                    "BACKEND_TOKEN",
                    "BACKEND_TOKEN_SECRET_ID",
                    "BACKEND_CA_FILE",
                ] {
                    if env.contains_key(k) {
                        problems.push(format!("REKEY_{k} needs REKEY_BACKEND"));
                    }
                }
                None
            }
            addr => {
                if !(addr.starts_with("http://") || addr.starts_with("https://")) {
                    problems.push(format!(
                        "REKEY_BACKEND={addr:?} needs a scheme: https://host:port (or http://)"
                    ));
                }
                let token = match (
                    Some(get("BACKEND_TOKEN")).filter(|t| !t.is_empty()),
                    Some(get("BACKEND_TOKEN_SECRET_ID")).filter(|t| !t.is_empty()),
                ) {
                    (Some(_), Some(_)) => {
                        problems.push(
                            "set one of REKEY_BACKEND_TOKEN and REKEY_BACKEND_TOKEN_SECRET_ID"
                                .into(),
                        );
                        BackendToken::None
                    }
                    (Some(t), None) => BackendToken::Plain(Zeroizing::new(t)),
                    (None, Some(id)) => BackendToken::SecretId(id),
                    (None, None) => BackendToken::None,
                };
                Some(BackendSettings {
                    addr: addr.to_string(),
                    token,
                    ca_file: Some(get("BACKEND_CA_FILE")).filter(|f| !f.is_empty()),
                })
            }
        };
        let kind = Kinds::default().get(kind_name).map_err(|e| e.to_string())?;
        // What can be checked without the admin credential.
        if kind_name == "random"
            && let Err(e) = kind.check_options(&options)
        {
            problems.push(e.to_string());
        }
        if !problems.is_empty() {
            return Err(problems.join("; "));
        }
        Ok(Settings {
            kind,
            options,
            admin_secret_id,
            backend,
            redis_tls,
        })
    }
}

/// The function: settings and a Secrets Manager client.
pub struct Function {
    settings: Settings,
    asm: Asm,
}

impl Function {
    /// A function with a client from the SDK's default chain (the
    /// function's role, `AWS_REGION`, `AWS_ENDPOINT_URL`).
    pub async fn new(settings: Settings) -> Self {
        let asm = Asm::new(None, None, Duration::from_secs(10)).await;
        Function { settings, asm }
    }

    /// Runs one step.
    ///
    /// # Errors
    ///
    /// A [`Failure`] naming what is wrong; `AWSCURRENT` has not moved.
    pub async fn handle(&self, ev: RotationEvent) -> Result<serde_json::Value, Failure> {
        let step = ev.step.as_str();
        if !matches!(
            step,
            "createSecret" | "setSecret" | "testSecret" | "finishSecret"
        ) {
            return Err(Failure::new(
                "UnknownStep",
                format!(
                    "unknown step {step:?} (ASM sends createSecret, setSecret, testSecret and finishSecret)"
                ),
            ));
        }
        let token = ev.client_request_token.as_str();
        let d = self
            .asm
            .describe(&ev.secret_id)
            .await
            .map_err(asm_failure)?
            .ok_or_else(|| {
                Failure::new(
                    "SecretNotFound",
                    format!("no secret {} in Secrets Manager", ev.secret_id),
                )
            })?;
        let name = d.name.clone();
        if !d.rotation_enabled {
            return Err(Failure::new(
                "RotationNotEnabled",
                format!("rotation is not enabled on {name}"),
            ));
        }
        if !d.stages.contains_key(token) {
            return Err(Failure::new(
                "UnknownToken",
                format!("{token} is not a version of {name}"),
            ));
        }
        if d.has(token, AWSCURRENT) {
            tracing::info!(secret = %name, step, version = token, "the version is AWSCURRENT already; nothing to do");
            return Ok(done(step, &name, token, "already AWSCURRENT"));
        }
        if !d.has(token, AWSPENDING) {
            return Err(Failure::new(
                "NotPending",
                format!(
                    "version {token} of {name} is not AWSPENDING (another rotation holds it, or it was retired)"
                ),
            ));
        }
        let Some(current_id) = crate::provider::aws::holder(&d.stages, AWSCURRENT, None) else {
            return Err(Failure::new(
                "NoCurrentVersion",
                format!("no version of {name} is AWSCURRENT"),
            ));
        };
        let current_id = current_id.to_string();
        let what = match step {
            "createSecret" => self.create(&d, token, &current_id).await?,
            "setSecret" => self.set(&d, token, &current_id).await?,
            "testSecret" => self.test(&d, token).await?,
            _ => self.finish(&d, token).await?,
        };
        tracing::info!(secret = %name, step, version = token, "{what}");
        Ok(done(step, &name, token, what))
    }

    /// The kind's options completed with the admin credential, if the kind
    /// needs one.
    async fn options(&self) -> Result<KindOptions, Failure> {
        let mut raw = self.settings.options.clone();
        if let Some(id) = &self.settings.admin_secret_id {
            let v = self
                .asm
                .read(id, AsmVersion::Label(AWSCURRENT))
                .await
                .map_err(|e| {
                    Failure::new(
                        "AdminSecret",
                        format!("the admin secret REKEY_ADMIN_SECRET_ID: {}", e.message),
                    )
                })?;
            let url = admin_url(self.settings.kind.name(), &v, &raw, self.settings.redis_tls)
                .map_err(|m| Failure::new("AdminSecret", format!("{id}: {m}")))?;
            let inline = InlineUrl::new(url);
            if let Some(p) = raw.postgres.as_mut() {
                p.admin_url = inline.clone();
            }
            if let Some(r) = raw.redis.as_mut() {
                r.admin_url = inline;
            }
        }
        self.settings
            .kind
            .check_options(&raw)
            .map_err(|e| Failure::new("Configuration", e.to_string()))
    }

    async fn read(&self, name: &str, which: AsmVersion<'_>) -> Result<SecretValue, Failure> {
        self.asm.read(name, which).await.map_err(asm_failure)
    }

    async fn create(
        &self,
        d: &Described,
        token: &str,
        current_id: &str,
    ) -> Result<&'static str, Failure> {
        let name = d.name.as_str();
        // A value written for this token by an earlier try is kept.
        match self.asm.read(name, AsmVersion::Id(token)).await {
            Ok(_) => return Ok("createSecret: the pending value is there already"),
            Err(e) if e.is("ResourceNotFoundException") => {}
            Err(e) => return Err(asm_failure(e)),
        }
        let current = self.read(name, AsmVersion::Id(current_id)).await?;
        let options = self.options().await?;
        let ctx = SecretCtx {
            id: name,
            options: &options,
        };
        let new = self
            .settings
            .kind
            .create(&ctx, Some(&current), None)
            .await
            .map_err(|e| Failure::new("CreateFailed", e.to_string()))?;
        self.asm
            .put(name, token, &new, &[AWSPENDING])
            .await
            .map_err(asm_failure)?;
        Ok("createSecret: a new value is AWSPENDING")
    }

    async fn set(
        &self,
        d: &Described,
        token: &str,
        current_id: &str,
    ) -> Result<&'static str, Failure> {
        let name = d.name.as_str();
        let pending = self.read(name, AsmVersion::Id(token)).await?;
        let current = self.read(name, AsmVersion::Id(current_id)).await?;
        let options = self.options().await?;
        let ctx = SecretCtx {
            id: name,
            options: &options,
        };
        let kind = self.settings.kind.as_ref();
        // A kind whose set keeps every older value (a Redis user's
        // passwords) has the one two rotations back revoked, as
        // decommission does in rekey. (A postgres set gives the idle role
        // a new password, which retires that value by itself.)
        if kind.set_keeps_older_values()
            && let Some(prev_id) = crate::provider::aws::holder(&d.stages, AWSPREVIOUS, None)
            && prev_id != current_id
        {
            let previous = self.read(name, AsmVersion::Id(prev_id)).await?;
            let p = field(&previous, "password");
            if p.is_some() && p != field(&current, "password") && p != field(&pending, "password") {
                kind.revoke(&ctx, &previous, Some(&current))
                    .await
                    .map_err(|e| Failure::new("SetFailed", e.to_string()))?;
            }
        }
        kind.set(&ctx, &pending, Some(&current))
            .await
            .map_err(|e| Failure::new("SetFailed", e.to_string()))?;
        Ok("setSecret: the pending value works beside the current one")
    }

    async fn test(&self, d: &Described, token: &str) -> Result<&'static str, Failure> {
        let name = d.name.as_str();
        let pending = self.read(name, AsmVersion::Id(token)).await?;
        let options = self.options().await?;
        let ctx = SecretCtx {
            id: name,
            options: &options,
        };
        self.settings
            .kind
            .test(&ctx, &pending)
            .await
            .map_err(|e| Failure::new("TestFailed", e.to_string()))?;
        Ok("testSecret: the pending value works")
    }

    async fn finish(&self, d: &Described, token: &str) -> Result<&'static str, Failure> {
        self.asm
            .make_current(d, token, None)
            .await
            .map_err(asm_failure)?;
        if let Some(b) = &self.settings.backend {
            // The rotation is done in ASM either way; a backend that cannot
            // be told takes it at its next poll.
            match self.tell_backend(b, &d.name).await {
                Ok(()) => return Ok("finishSecret: AWSCURRENT moved; the rekey backend has it"),
                Err(m) => {
                    tracing::warn!(secret = %d.name, backend = %b.addr, error = %m, "the rekey backend takes the new version at its next poll");
                }
            }
        }
        Ok("finishSecret: AWSCURRENT moved")
    }

    /// Asks the backend to take the new `AWSCURRENT` now.
    async fn tell_backend(&self, b: &BackendSettings, name: &str) -> Result<(), String> {
        use rekey_proto::v1::rekey_client::RekeyClient;
        let token = match &b.token {
            BackendToken::Plain(t) => Some(t.clone()),
            BackendToken::SecretId(id) => {
                let v = self
                    .read(id, AsmVersion::Label(AWSCURRENT))
                    .await
                    .map_err(|f| format!("the token secret {id}: {}", f.message))?;
                match &v {
                    SecretValue::Raw(b) => Some(Zeroizing::new(
                        String::from_utf8_lossy(b.expose()).trim().to_string(),
                    )),
                    SecretValue::Fields(_) => {
                        field(&v, "token").map(|t| Zeroizing::new(t.to_string()))
                    }
                }
            }
            BackendToken::None => None,
        };
        let mut endpoint = tonic::transport::Endpoint::from_shared(b.addr.clone())
            .map_err(|_| format!("{:?} is not a URL", b.addr))?
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(10));
        if b.addr.starts_with("https://") {
            let mut tls = tonic::transport::ClientTlsConfig::new();
            if let Some(f) = &b.ca_file {
                let pem =
                    std::fs::read(f).map_err(|e| format!("REKEY_BACKEND_CA_FILE {f}: {e}"))?;
                tls = tls.ca_certificate(tonic::transport::Certificate::from_pem(pem));
            }
            endpoint = endpoint.tls_config(tls).map_err(|e| e.to_string())?;
        }
        let channel = endpoint
            .connect()
            .await
            .map_err(|e| format!("cannot reach {}: {}", b.addr, innermost(&e)))?;
        let mut req = tonic::Request::new(rekey_proto::v1::SyncRequest {
            secret_id: String::new(),
            provider_path: name.to_string(),
        });
        if let Some(t) = token {
            let mut v: tonic::metadata::MetadataValue<tonic::metadata::Ascii> =
                format!("Bearer {}", t.as_str())
                    .parse()
                    .map_err(|_| "the token holds characters a header cannot".to_string())?;
            v.set_sensitive(true);
            req.metadata_mut().insert("authorization", v);
        }
        let r = RekeyClient::new(channel)
            .sync(req)
            .await
            .map_err(|s| format!("Sync: {}", s.message()))?
            .into_inner();
        if !r.provider_problem.is_empty() {
            return Err(format!(
                "the backend did not deliver it: {}",
                r.provider_problem
            ));
        }
        Ok(())
    }
}

fn done(step: &str, name: &str, token: &str, what: &str) -> serde_json::Value {
    serde_json::json!({"Step": step, "SecretId": name, "ClientRequestToken": token, "Result": what})
}

/// The admin URL from an admin secret: its `url` field or a URL as the
/// whole value, or the fields AWS's own rotation templates use
/// (`username`, `password`, `host`, `port`, `dbname`).
///
/// Built from fields, a Postgres URL takes the TLS settings of `options`
/// (`REKEY_SSLMODE`, `REKEY_SSLROOTCERT`), and a Redis URL is
/// `rediss://` when `redis_tls`.
fn admin_url(
    kind: &str,
    v: &SecretValue,
    options: &KindOptions,
    redis_tls: bool,
) -> Result<Zeroizing<String>, String> {
    let scheme = if kind == "postgres" {
        "postgres"
    } else {
        "redis"
    };
    if let SecretValue::Raw(b) = v {
        let s = std::str::from_utf8(b.expose()).unwrap_or_default().trim();
        if s.starts_with(&format!("{scheme}://"))
            || (kind == "postgres" && s.starts_with("postgresql://"))
        {
            return Ok(Zeroizing::new(s.to_string()));
        }
        return Err(format!(
            "holds neither a {scheme}:// URL nor JSON with url or username, password and host"
        ));
    }
    if let Some(u) = field(v, "url") {
        return Ok(Zeroizing::new(u.to_string()));
    }
    let (Some(user), Some(pw), Some(host)) =
        (field(v, "username"), field(v, "password"), field(v, "host"))
    else {
        return Err("has no url, or lacks username, password or host".into());
    };
    let default_port = if kind == "postgres" { "5432" } else { "6379" };
    let port = field(v, "port").unwrap_or(default_port);
    Ok(Zeroizing::new(if kind == "postgres" {
        let db = field(v, "dbname").unwrap_or("postgres");
        let mut url = format!(
            "postgres://{}:{}@{host}:{port}/{}",
            pct(user),
            pct(pw),
            pct(db)
        );
        let p = options.postgres.clone().unwrap_or_default();
        let mut sep = '?';
        for (k, val) in [("sslmode", &p.sslmode), ("sslrootcert", &p.sslrootcert)] {
            if !val.is_empty() {
                url.push_str(&format!("{sep}{k}={}", pct(val)));
                sep = '&';
            }
        }
        url
    } else {
        let scheme = if redis_tls { "rediss" } else { "redis" };
        format!("{scheme}://{user}:{pw}@{host}:{port}")
    }))
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
fn pct(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Runs the function against the Lambda Runtime API until the runtime
/// stops it. A configuration problem fails every invocation with its
/// message, so that it shows in ASM's rotation status and the logs.
///
/// # Errors
///
/// When the Runtime API cannot be reached.
pub async fn run() -> Result<(), lambda_runtime::Error> {
    let settings = Settings::from_vars(std::env::vars());
    let function = match settings {
        Ok(s) => Ok(Function::new(s).await),
        Err(m) => {
            tracing::error!(problem = %m, "rekey-lambda is not configured");
            Err(m)
        }
    };
    let function = &function;
    lambda_runtime::run(service_fn(
        move |ev: LambdaEvent<RotationEvent>| async move {
            match function {
                Ok(f) => f.handle(ev.payload).await,
                Err(m) => Err(Failure::new("Configuration", m.clone())),
            }
        },
    ))
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
            .collect()
    }

    #[test]
    fn settings_name_every_problem() {
        let e = Settings::from_vars(vars(&[])).err().unwrap();
        assert!(e.contains("REKEY_KIND is not set"), "{e}");
        let e = Settings::from_vars(vars(&[("REKEY_KIND", "exec")]))
            .err()
            .unwrap();
        assert!(e.contains("not a kind rekey-lambda rotates"), "{e}");
        let e = Settings::from_vars(vars(&[
            ("REKEY_KIND", "random"),
            ("REKEY_LENGTH", "0"),
            ("REKEY_GROUP_ROLE", "app"),
            ("REKEY_LENGHT", "3"),
        ]))
        .err()
        .unwrap();
        for want in [
            "length must be between 1",
            "REKEY_GROUP_ROLE does not apply to REKEY_KIND=random (an option of the postgres kind)",
            "REKEY_LENGHT does not apply",
        ] {
            assert!(e.contains(want), "missing {want:?} in {e}");
        }
        let e = Settings::from_vars(vars(&[("REKEY_KIND", "postgres"), ("REKEY_PORT", "x")]))
            .err()
            .unwrap();
        assert!(e.contains("REKEY_ADMIN_SECRET_ID must name"), "{e}");
        assert!(e.contains("REKEY_PORT=\"x\""), "{e}");
        let e = Settings::from_vars(vars(&[
            ("REKEY_KIND", "random"),
            ("REKEY_BACKEND_TOKEN", "t0ps3cret"),
        ]))
        .err()
        .unwrap();
        assert!(e.contains("REKEY_BACKEND_TOKEN needs REKEY_BACKEND"), "{e}");
        assert!(!e.contains("t0ps3cret"));
        let ok = Settings::from_vars(vars(&[
            ("REKEY_KIND", "random"),
            ("REKEY_LENGTH", "24"),
            ("REKEY_ENCODING", "hex"),
            ("PATH", "/bin"),
        ]))
        .unwrap();
        assert_eq!(ok.options.random.unwrap().length, 24);
    }

    #[test]
    fn admin_urls_from_aws_template_fields() {
        let fields = crate::kinds::fields_of;
        let none = KindOptions::default();
        let v = fields(&[
            ("engine", "postgres"),
            ("username", "admin"),
            ("password", "p@ss/word"),
            ("host", "db"),
            ("dbname", "app"),
        ]);
        assert_eq!(
            admin_url("postgres", &v, &none, false).unwrap().as_str(),
            "postgres://admin:p%40ss%2Fword@db:5432/app"
        );
        // An RDS admin secret, verified against the CA bundle in the image.
        let tls = KindOptions::from(PgOptions {
            sslmode: "verify-full".into(),
            sslrootcert: "/opt/rds/global-bundle.pem".into(),
            ..PgOptions::default()
        });
        assert_eq!(
            admin_url("postgres", &v, &tls, false).unwrap().as_str(),
            "postgres://admin:p%40ss%2Fword@db:5432/app?sslmode=verify-full&sslrootcert=%2Fopt%2Frds%2Fglobal-bundle.pem"
        );
        let v = fields(&[("url", "redis://a:b@r:6380")]);
        assert_eq!(
            admin_url("redis", &v, &none, false).unwrap().as_str(),
            "redis://a:b@r:6380"
        );
        let v = fields(&[("username", "a"), ("password", "b"), ("host", "cache")]);
        assert_eq!(
            admin_url("redis", &v, &none, true).unwrap().as_str(),
            "rediss://a:b@cache:6379"
        );
        let raw = SecretValue::Raw(rekey_keyring::SecretBytes::new(b"hunter2".to_vec()));
        let e = admin_url("postgres", &raw, &none, false).unwrap_err();
        assert!(!e.contains("hunter2"), "{e}");
        assert!(admin_url("redis", &fields(&[("password", "x")]), &none, false).is_err());
    }

    #[test]
    fn redis_topology_and_tls_settings() {
        let s = Settings::from_vars(vars(&[
            ("REKEY_KIND", "redis"),
            ("REKEY_ADMIN_SECRET_ID", "prod/redis-admin"),
            ("REKEY_USERNAME", "app"),
            ("REKEY_TOPOLOGY", "sentinel"),
            ("REKEY_SENTINELS", "10.0.0.1:26379, 10.0.0.2:26379"),
            ("REKEY_MASTER_NAME", "mymaster"),
            ("REKEY_TLS", "true"),
        ]))
        .unwrap();
        assert!(s.redis_tls);
        let r = s.options.redis.unwrap();
        assert_eq!(r.topology, crate::kinds::redis::Topology::Sentinel);
        assert_eq!(r.sentinels, ["10.0.0.1:26379", "10.0.0.2:26379"]);
        let e = Settings::from_vars(vars(&[
            ("REKEY_KIND", "redis"),
            ("REKEY_ADMIN_SECRET_ID", "x"),
            ("REKEY_USERNAME", "app"),
            ("REKEY_TOPOLOGY", "mesh"),
            ("REKEY_TLS", "maybe"),
        ]))
        .err()
        .unwrap();
        assert!(e.contains("REKEY_TOPOLOGY=\"mesh\": use single"), "{e}");
        assert!(e.contains("REKEY_TLS=\"maybe\": use true or false"), "{e}");
    }
}
