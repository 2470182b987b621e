//! The `vault` provider: values in a HashiCorp Vault or OpenBao KV v2 mount,
//! where apps, Vault Agent and External Secrets already read them.
//!
//! What a user can check with `bao kv get` / `vault kv get`:
//! - the latest KV version is always rekey's current value. A pending
//!   value never goes where apps read: until *finish* it stays sealed in
//!   rekey's own store, and *promote* writes it as a new KV version;
//! - every write uses check-and-set on the KV version rekey last saw, so a
//!   write that raced an outside change fails instead of overwriting it;
//! - the secret's `custom_metadata` says that rekey manages it and which KV
//!   versions are current and previous (`rekey-current-version`,
//!   `rekey-previous-version`);
//! - rollback writes previous's data as a new latest version, as
//!   `kv rollback` does; decommission destroys, deletes or keeps the old
//!   KV version (`on_revoke`).
//!
//! KV data: a structured value's fields as they are; a single value as
//! `{"value": V}` (`{"value_base64": B}` when it is not UTF-8).
//!
//! A version's reference is `kv:N` (KV version N) once it is current, and
//! `pending:REF` (the sealed copy's reference) before. rekey keeps a copy
//! of each value it serves sealed in its own store (as it does for the
//! embedded store), so that reads do not wait for Vault and keep working
//! while it is sealed; only writes and the poll need Vault.
//!
//! Tokens from AppRole and Kubernetes auth are renewed once two thirds of
//! their lease have passed and obtained again when renewal fails or Vault
//! refuses them; a token file is read again whenever it changes. Errors
//! name the provider and the path, never a value or a token.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use base64::Engine as _;
use rekey_keyring::{SecretBytes, SecretString, SecretValue};
use serde::Deserialize;
use serde_json::{Map, Value};
use tokio::sync::{OnceCell, RwLock, RwLockReadGuard};
use vaultrs::client::{Client as _, VaultClient, VaultClientSettingsBuilder};
use vaultrs::error::ClientError;
use zeroize::Zeroizing;

use super::embedded::Embedded;
use super::{
    Location, Observed, OutsideChange, Stage, Stored, ValueProvider, Which, same_value, sealed_copy,
};
use crate::config::{OnRevoke, VaultAuth, VaultConfig};
use crate::error::{Error, Result, innermost};
use crate::store::Store;

/// Runs a vaultrs call with the session's client; when Vault refuses a
/// login token (403), logs in again and tries once more. Evaluates to the
/// call's own result.
macro_rules! call_raw {
    ($self:expr, |$c:ident| $body:expr) => {{
        let (first, used) = {
            let s = $self.session().await?;
            let $c = &s.client;
            ($body.await, s.generation)
        };
        match first {
            Err(ClientError::APIError { code: 403, .. }) if $self.relogin(used).await? => {
                let s = $self.session().await?;
                let $c = &s.client;
                $body.await
            }
            r => r,
        }
    }};
}

/// [`call_raw!`] with Vault's error in words.
macro_rules! call {
    ($self:expr, $what:expr, |$c:ident| $body:expr) => {{ call_raw!($self, |$c| $body).map_err(|e| $self.err($what, &e)) }};
}

/// `custom_metadata` keys rekey writes.
const MANAGED_BY: &str = "managed-by";
const META_SECRET: &str = "rekey-secret-id";
const META_CURRENT: &str = "rekey-current-version";
const META_PREVIOUS: &str = "rekey-previous-version";

/// Vault's own limits on `custom_metadata`.
const MAX_META_KEYS: usize = 64;
const MAX_META_KEY_BYTES: usize = 128;
const MAX_META_VALUE_BYTES: usize = 512;

pub(crate) struct Vault {
    cfg: VaultConfig,
    /// Sealed copies in rekey's store: pending values until they are
    /// promoted, and the values of KV versions rekey serves, so that
    /// reads (a rotation's start, a sidecar's reconnect) do not depend on
    /// Vault being unsealed and reachable.
    sealed: Embedded,
    session: RwLock<Session>,
    /// Set once the mount was seen to be KV v2.
    kv2: OnceCell<()>,
}

struct Session {
    client: VaultClient,
    /// The token in use; empty before the first login.
    token: Zeroizing<String>,
    /// When a login token must be renewed; `None`: never (a token from a
    /// file, or one without a lease).
    renew_at: Option<Instant>,
    /// When a login token stops working.
    expires_at: Option<Instant>,
    renewable: bool,
    /// The lease of the last login or renewal, in seconds.
    lease_s: u64,
    /// Grows with every new token, so that a token Vault refused is
    /// replaced once however many calls saw the refusal.
    generation: u64,
}

/// `sys/internal/ui/mounts/:path`: what any token with access below a
/// mount may ask about it (the way the Vault CLI tells KV v1 from v2).
#[derive(Debug, rustify_derive::Endpoint)]
#[endpoint(path = "sys/internal/ui/mounts/{self.mount}", response = "UiMount")]
struct UiMountRequest {
    #[endpoint(skip)]
    mount: String,
}

#[derive(Debug, Deserialize)]
struct UiMount {
    #[serde(rename = "type", default)]
    kind: String,
    #[serde(default)]
    options: Option<HashMap<String, String>>,
}

impl Vault {
    /// A provider for `cfg`; nothing is asked of Vault until it is used.
    pub(crate) fn new(cfg: VaultConfig, store: Arc<Store>) -> Result<Self> {
        let client = client(&cfg, "")?;
        Ok(Vault {
            sealed: Embedded::new(store),
            session: RwLock::new(Session {
                client,
                token: Zeroizing::new(String::new()),
                renew_at: None,
                expires_at: None,
                renewable: false,
                lease_s: 0,
                generation: 0,
            }),
            kv2: OnceCell::new(),
            cfg,
        })
    }

    fn fail(&self, message: impl std::fmt::Display) -> Error {
        Error::Provider {
            provider: self.cfg.name.clone(),
            message: message.to_string(),
            unavailable: false,
        }
    }

    /// An error from Vault, in words: `what` says what was being done.
    fn err(&self, what: &str, e: &ClientError) -> Error {
        let name = self.cfg.name.clone();
        let addr = &self.cfg.address;
        let (message, unavailable) = match e {
            ClientError::APIError { code: 503, errors }
                if errors.iter().any(|m| m.contains("sealed")) =>
            {
                (
                    format!("Vault at {addr} is sealed; {what} can be retried once it is unsealed"),
                    true,
                )
            }
            ClientError::APIError { code: 403, .. } => (
                format!(
                    "{what}: permission denied (the token's policy does not allow it, or the token expired)"
                ),
                false,
            ),
            ClientError::APIError { code, errors } => {
                let said = if errors.is_empty() {
                    String::new()
                } else {
                    // Vault's "1 error occurred:\n\t* ..." on one line.
                    let joined = errors.join("; ");
                    format!(
                        ": {}",
                        joined.split_whitespace().collect::<Vec<_>>().join(" ")
                    )
                };
                (
                    format!("{what}: Vault answered {code}{said}"),
                    *code >= 500 || *code == 429 || *code == 412,
                )
            }
            ClientError::RestClientError {
                source:
                    rustify::errors::ClientError::RequestError { .. }
                    | rustify::errors::ClientError::ResponseError { .. },
            } => (
                format!("{what}: cannot reach Vault at {addr}: {}", innermost(e)),
                true,
            ),
            ClientError::RestClientError { .. } => (
                format!(
                    "{what}: an answer from {addr} that is not Vault's: {}",
                    innermost(e)
                ),
                true,
            ),
            other => (format!("{what}: {other}"), false),
        };
        Error::Provider {
            provider: name,
            message,
            unavailable,
        }
    }

    /// A session with a usable token: read again from its file, renewed,
    /// or obtained by logging in, as the auth method needs.
    async fn session(&self) -> Result<RwLockReadGuard<'_, Session>> {
        {
            let s = self.session.read().await;
            if !self.needs_refresh(&s)? {
                return Ok(s);
            }
        }
        let mut s = self.session.write().await;
        if self.needs_refresh(&s)? {
            self.refresh(&mut s).await?;
        }
        Ok(s.downgrade())
    }

    fn needs_refresh(&self, s: &Session) -> Result<bool> {
        Ok(match &self.cfg.auth {
            VaultAuth::Token { token_file } => {
                let t = read_secret_file(token_file).map_err(|e| self.fail(e))?;
                *t != *s.token
            }
            _ => s.token.is_empty() || s.renew_at.is_some_and(|at| Instant::now() >= at),
        })
    }

    async fn refresh(&self, s: &mut Session) -> Result<()> {
        if let VaultAuth::Token { token_file } = &self.cfg.auth {
            let t = read_secret_file(token_file).map_err(|e| self.fail(e))?;
            if t.is_empty() {
                return Err(self.fail(format!("token_file {} is empty", token_file.display())));
            }
            s.client.set_token(&t);
            s.token = t;
            s.generation += 1;
            return Ok(());
        }
        let live = s.expires_at.is_some_and(|at| Instant::now() < at);
        if s.renewable && live && !s.token.is_empty() {
            match vaultrs::token::renew_self(&s.client, None).await {
                // A lease cut short (the token's maximum lifetime is near):
                // a new login instead of ever more frequent renewals.
                Ok(info) if info.lease_duration > 0 && info.lease_duration * 2 >= s.lease_s => {
                    s.set_lease(info.lease_duration, info.renewable);
                    tracing::debug!(provider = %self.cfg.name, ttl_s = info.lease_duration, "Vault token renewed");
                    return Ok(());
                }
                Ok(_) => {
                    tracing::info!(provider = %self.cfg.name, "the token nears its maximum lifetime; logging in again");
                }
                Err(e) => {
                    tracing::info!(provider = %self.cfg.name, error = %self.err("renewing the token", &e), "logging in again");
                }
            }
        }
        self.login(s).await
    }

    async fn login(&self, s: &mut Session) -> Result<()> {
        // Login requests go without a token; the old one stays in use
        // until a new one is issued.
        s.client.set_token("");
        let info = self.login_request(s).await;
        s.client.set_token(&s.token);
        let Some(info) = info? else {
            return Ok(());
        };
        s.client.set_token(&info.client_token);
        s.token = Zeroizing::new(info.client_token);
        s.generation += 1;
        s.set_lease(info.lease_duration, info.renewable);
        tracing::info!(provider = %self.cfg.name, ttl_s = info.lease_duration, "logged in to Vault");
        Ok(())
    }

    async fn login_request(&self, s: &Session) -> Result<Option<vaultrs::api::AuthInfo>> {
        let info = match &self.cfg.auth {
            VaultAuth::Token { .. } => return Ok(None),
            VaultAuth::AppRole {
                mount,
                role_id_file,
                secret_id_file,
            } => {
                let role_id = read_secret_file(role_id_file).map_err(|e| self.fail(e))?;
                let secret_id = read_secret_file(secret_id_file).map_err(|e| self.fail(e))?;
                vaultrs::auth::approle::login(&s.client, mount, &role_id, &secret_id)
                    .await
                    .map_err(|e| self.err(&format!("AppRole login at auth/{mount}"), &e))?
            }
            VaultAuth::Kubernetes {
                mount,
                role,
                jwt_file,
            } => {
                let jwt = read_secret_file(jwt_file).map_err(|e| self.fail(e))?;
                vaultrs::auth::kubernetes::login(&s.client, mount, role, &jwt)
                    .await
                    .map_err(|e| {
                        self.err(
                            &format!("Kubernetes login at auth/{mount} as role {role}"),
                            &e,
                        )
                    })?
            }
        };
        Ok(Some(info))
    }

    /// Logs in again after Vault refused the token of generation `used`
    /// (revoked, expired early), unless another call did already; `false`
    /// for a token file, which only its owner replaces.
    async fn relogin(&self, used: u64) -> Result<bool> {
        if matches!(self.cfg.auth, VaultAuth::Token { .. }) {
            return Ok(false);
        }
        let mut s = self.session.write().await;
        if s.generation == used {
            self.login(&mut s).await?;
        }
        Ok(true)
    }

    /// Checks once that the mount is KV v2: on KV v1 a write to
    /// `mount/data/path` would silently create another secret.
    async fn check_kv2(&self) -> Result<()> {
        self.kv2
            .get_or_try_init(|| async {
                let mount = self.cfg.mount.clone();
                let what = format!("checking the mount {mount}/");
                let m: UiMount = call!(self, &what, |c| vaultrs::api::exec_with_result(
                    c,
                    UiMountRequest {
                        mount: mount.clone()
                    }
                ))?;
                let version = m
                    .options
                    .as_ref()
                    .and_then(|o| o.get("version"))
                    .map_or("1", String::as_str);
                if m.kind != "kv" || version != "2" {
                    let is = if m.kind == "kv" {
                        format!("KV version {version}")
                    } else {
                        format!("type {:?}", m.kind)
                    };
                    return Err(self.fail(format!(
                        "the mount {mount}/ is not a KV v2 mount (it is {is}); enable one with `vault secrets enable -path={mount} kv-v2`"
                    )));
                }
                Ok(())
            })
            .await?;
        Ok(())
    }

    async fn metadata(
        &self,
        path: &str,
    ) -> Result<Option<vaultrs::api::kv2::responses::ReadSecretMetadataResponse>> {
        let mount = &self.cfg.mount;
        let what = format!("reading the metadata of {mount}/{path}");
        match call_raw!(self, |c| vaultrs::kv2::read_metadata(c, mount, path)) {
            Ok(m) => Ok(Some(m)),
            Err(ClientError::APIError { code: 404, .. }) => Ok(None),
            Err(e) => Err(self.err(&what, &e)),
        }
    }

    async fn read_kv(&self, path: &str, version: u64) -> Result<SecretValue> {
        let mount = &self.cfg.mount;
        let what = format!("reading KV version {version} of {mount}/{path}");
        let data: Map<String, Value> = match call_raw!(self, |c| vaultrs::kv2::read_version(
            c, mount, path, version
        )) {
            Ok(d) => d,
            Err(ClientError::APIError { code: 404, .. }) => {
                return Err(self.fail(format!("{what}: it was deleted or destroyed in Vault")));
            }
            Err(e) => return Err(self.err(&what, &e)),
        };
        decode(data).map_err(|m| self.fail(format!("{what}: {m}")))
    }

    /// Writes `value` as the next KV version, if the latest is still
    /// `cas` (0: the path must not exist yet). Returns the new version.
    async fn write_kv(&self, at: Location<'_>, value: &SecretValue, cas: u64) -> Result<u64> {
        let mount = &self.cfg.mount;
        let path = at.path;
        let data =
            KvData(encode(value).map_err(|m| self.fail(format!("writing {mount}/{path}: {m}")))?);
        let options = || vaultrs::api::kv2::requests::SetSecretRequestOptions {
            cas: u32::try_from(cas).unwrap_or(u32::MAX),
        };
        let what = format!("writing {mount}/{path}");
        match call_raw!(self, |c| vaultrs::kv2::set_with_options(
            c,
            mount,
            path,
            &data.0,
            options()
        )) {
            Ok(m) => Ok(m.version),
            Err(ClientError::APIError { code: 400, errors })
                if errors.iter().any(|m| m.contains("check-and-set")) =>
            {
                let latest = self.metadata(path).await?.map_or(0, |m| m.current_version);
                // A repeat of a write that went through before a crash.
                if latest == cas + 1
                    && self
                        .read_kv(path, latest)
                        .await
                        .is_ok_and(|v| same_value(&v, value))
                {
                    return Ok(latest);
                }
                Err(self.fail(if cas == 0 {
                    format!(
                        "{mount}/{path} already holds data (KV version {latest}); rekey writes only paths it manages: choose another --provider-path, or remove it with `vault kv metadata delete {mount}/{path}`"
                    )
                } else {
                    format!(
                        "check-and-set: {mount}/{path} changed outside rekey (KV version {latest}, rekey last wrote {cas}); nothing was written, the outside change is taken at the next poll"
                    )
                }))
            }
            Err(e) => Err(self.err(&what, &e)),
        }
    }

    /// The secret's `custom_metadata` with rekey's keys set, the others
    /// kept; checked against Vault's limits before anything is written.
    fn merged_metadata(
        &self,
        at: Location<'_>,
        existing: Option<&HashMap<String, String>>,
        current: u64,
        previous: Option<u64>,
    ) -> Result<HashMap<String, String>> {
        let mut m = existing.cloned().unwrap_or_default();
        m.insert(MANAGED_BY.into(), "rekey".into());
        m.insert(META_SECRET.into(), at.secret_id.into());
        m.insert(META_CURRENT.into(), current.to_string());
        match previous {
            Some(p) => m.insert(META_PREVIOUS.into(), p.to_string()),
            None => m.remove(META_PREVIOUS),
        };
        let where_ = self.full_path(at.path);
        if m.len() > MAX_META_KEYS {
            return Err(self.fail(format!(
                "custom_metadata of {where_} would have {} keys with rekey's; Vault allows {MAX_META_KEYS}: remove some",
                m.len()
            )));
        }
        if let Some((k, _)) = m
            .iter()
            .find(|(k, v)| k.len() > MAX_META_KEY_BYTES || v.len() > MAX_META_VALUE_BYTES)
        {
            return Err(self.fail(format!(
                "custom_metadata of {where_}: the key {k:?} or its value is over Vault's limit ({MAX_META_KEY_BYTES} bytes a key, {MAX_META_VALUE_BYTES} a value)"
            )));
        }
        Ok(m)
    }

    async fn write_metadata(&self, at: Location<'_>, m: HashMap<String, String>) -> Result<()> {
        let mount = &self.cfg.mount;
        let path = at.path;
        let what = format!("writing the custom_metadata of {mount}/{path}");
        let r = call_raw!(self, |c| {
            let mut opts = vaultrs::api::kv2::requests::SetSecretMetadataRequest::builder();
            opts.custom_metadata(m.clone());
            async move { vaultrs::kv2::set_metadata(c, mount, path, Some(&mut opts)).await }
        });
        r.map_err(|e| self.err(&what, &e))
    }

    /// Writes `value` as the new latest version over `cas` and records the
    /// stages in `custom_metadata`. A metadata write that fails after the
    /// data went through is repaired at the next poll; the data is what
    /// apps read.
    async fn make_latest(
        &self,
        at: Location<'_>,
        value: &SecretValue,
        cas: u64,
        previous: Option<u64>,
    ) -> Result<u64> {
        self.check_kv2().await?;
        let before = self.metadata(at.path).await?;
        // Made (and checked against Vault's limits) before the data is
        // written, so that a metadata problem leaves nothing half-done.
        let mut m = self.merged_metadata(
            at,
            before.as_ref().and_then(|m| m.custom_metadata.as_ref()),
            cas + 1,
            previous,
        )?;
        let n = self.write_kv(at, value, cas).await?;
        m.insert(META_CURRENT.into(), n.to_string());
        if let Err(e) = self.write_metadata(at, m).await {
            tracing::warn!(provider = %self.cfg.name, secret = at.secret_id, error = %e, "the value is written; its custom_metadata is repaired at the next poll");
        }
        Ok(n)
    }

    fn kv_version(&self, r: &str) -> Result<u64> {
        kv_ref(r).ok_or_else(|| self.fail(format!("{r:?} is not a KV version reference")))
    }
}

impl Session {
    fn set_lease(&mut self, lease_s: u64, renewable: bool) {
        self.renewable = renewable;
        self.lease_s = lease_s;
        if lease_s == 0 {
            self.renew_at = None;
            self.expires_at = None;
            return;
        }
        let now = Instant::now();
        let lease = Duration::from_secs(lease_s);
        self.expires_at = Some(now + lease);
        self.renew_at = Some(now + lease * 2 / 3);
    }
}

fn client(cfg: &VaultConfig, token: &str) -> Result<VaultClient> {
    let mut b = VaultClientSettingsBuilder::default();
    b.address(&cfg.address)
        .token(token)
        .verify(true)
        .timeout(Some(cfg.request_timeout))
        .namespace(cfg.namespace.clone())
        .ca_certs(
            cfg.ca_file
                .iter()
                .map(|p| p.display().to_string())
                .collect(),
        );
    let settings = b.build().map_err(|e| Error::Provider {
        provider: cfg.name.clone(),
        message: format!("settings: {e}"),
        unavailable: false,
    })?;
    VaultClient::new(settings).map_err(|e| Error::Provider {
        provider: cfg.name.clone(),
        message: format!("cannot set up a client for {}: {e}", cfg.address),
        unavailable: false,
    })
}

/// A file holding a token, an id or a JWT, trimmed.
fn read_secret_file(path: &std::path::Path) -> std::result::Result<Zeroizing<String>, String> {
    std::fs::read_to_string(path)
        .map(|s| Zeroizing::new(s.trim().to_string()))
        .map_err(|e| format!("cannot read {}: {e}", path.display()))
}

fn kv_ref(r: &str) -> Option<u64> {
    r.strip_prefix("kv:")?.parse().ok()
}

/// KV data for a value. A structured value whose one field is `value` or
/// `value_base64` would read back as a single value: refused.
fn encode(v: &SecretValue) -> std::result::Result<Map<String, Value>, String> {
    if let SecretValue::Fields(f) = v
        && f.len() == 1
        && f.keys().any(|k| k == "value" || k == "value_base64")
    {
        return Err(
            "a structured value with one field named value or value_base64 cannot be told apart from a single value in KV; add a field".into(),
        );
    }
    let mut m = Map::new();
    match v {
        SecretValue::Raw(b) => match std::str::from_utf8(b.expose()) {
            Ok(s) => {
                m.insert("value".into(), Value::String(s.to_string()));
            }
            Err(_) => {
                m.insert(
                    "value_base64".into(),
                    Value::String(base64::engine::general_purpose::STANDARD.encode(b.expose())),
                );
            }
        },
        SecretValue::Fields(f) => {
            for (k, v) in f {
                m.insert(k.clone(), Value::String(v.expose().to_string()));
            }
        }
    }
    Ok(m)
}

/// A value from KV data; the message never quotes a value.
fn decode(mut data: Map<String, Value>) -> std::result::Result<SecretValue, String> {
    let out = if data.len() == 1 && data.contains_key("value") {
        match data.remove("value") {
            Some(Value::String(s)) => Ok(SecretValue::Raw(SecretBytes::new(s.into_bytes()))),
            _ => Err("the field \"value\" is not a string".to_string()),
        }
    } else if data.len() == 1 && data.contains_key("value_base64") {
        match data.remove("value_base64") {
            Some(Value::String(s)) => base64::engine::general_purpose::STANDARD
                .decode(s.as_bytes())
                .map(|b| SecretValue::Raw(SecretBytes::new(b)))
                .map_err(|_| "the field \"value_base64\" is not base64".to_string()),
            _ => Err("the field \"value_base64\" is not a string".to_string()),
        }
    } else if data.is_empty() {
        Err("it holds no fields".to_string())
    } else {
        let mut fields = BTreeMap::new();
        let mut bad = None;
        for (k, v) in std::mem::take(&mut data) {
            match v {
                Value::String(s) => {
                    fields.insert(k, SecretString::new(s));
                }
                _ => bad = Some(k),
            }
        }
        match bad {
            Some(k) => Err(format!("the field {k:?} is not a string")),
            None => Ok(SecretValue::Fields(fields)),
        }
    };
    drop(KvData(data));
    out
}

/// KV data on its way to Vault or out of it: its strings are wiped when it
/// is dropped.
struct KvData(Map<String, Value>);

impl Drop for KvData {
    fn drop(&mut self) {
        for v in self.0.values_mut() {
            if let Value::String(s) = v {
                zeroize::Zeroize::zeroize(s);
            }
        }
    }
}

#[async_trait]
impl ValueProvider for Vault {
    fn name(&self) -> &str {
        &self.cfg.name
    }

    fn default_path(&self, secret_id: &str) -> String {
        format!("{}{secret_id}", self.cfg.path_prefix)
    }

    fn full_path(&self, path: &str) -> String {
        format!("{}/{path}", self.cfg.mount)
    }

    fn poll_interval(&self) -> Duration {
        self.cfg.poll_interval
    }

    async fn write_pending(
        &self,
        at: Location<'_>,
        version: i64,
        value: &SecretValue,
    ) -> Result<String> {
        let r = self.sealed.write_pending(at, version, value).await?;
        Ok(format!("pending:{r}"))
    }

    async fn promote(
        &self,
        at: Location<'_>,
        new: Stored<'_>,
        old: Option<Stored<'_>>,
    ) -> Result<String> {
        let Some(copy) = sealed_copy(new) else {
            // Promoted before (a repeated step): already a KV version.
            return Ok(new.value_ref.to_string());
        };
        let value = self.sealed.read(at, Which::Version(copy)).await?;
        let cas = match old {
            Some(o) => self.kv_version(o.value_ref)?,
            None => 0,
        };
        let n = self
            .make_latest(at, &value, cas, (cas > 0).then_some(cas))
            .await?;
        self.sealed
            .keep(at.secret_id, new.version, &format!("kv:{n}"), &value)
            .await?;
        drop(value);
        // The pending copy stays until the version is revoked: a promote
        // repeated after a crash finds its value again.
        Ok(format!("kv:{n}"))
    }

    async fn read(&self, at: Location<'_>, which: Which<'_>) -> Result<SecretValue> {
        match which {
            Which::Version(v) => match (sealed_copy(v), kv_ref(v.value_ref)) {
                (Some(copy), _) => self.sealed.read(at, Which::Version(copy)).await,
                (None, Some(n)) => {
                    self.sealed
                        .kept_or(at.secret_id, v.version, v.value_ref, || {
                            self.read_kv(at.path, n)
                        })
                        .await
                }
                (None, None) => Err(self.fail(format!(
                    "v{} of {} has an unknown reference",
                    v.version, at.secret_id
                ))),
            },
            Which::Stage(Stage::Current) => {
                let m = self.metadata(at.path).await?.ok_or_else(|| {
                    self.fail(format!("{} does not exist", self.full_path(at.path)))
                })?;
                self.read_kv(at.path, m.current_version).await
            }
            Which::Stage(Stage::Previous) => {
                let m = self.metadata(at.path).await?;
                let n = m
                    .as_ref()
                    .and_then(|m| m.custom_metadata.as_ref())
                    .and_then(|c| c.get(META_PREVIOUS))
                    .and_then(|v| v.parse().ok())
                    .ok_or_else(|| {
                        self.fail(format!(
                            "{} has no previous version",
                            self.full_path(at.path)
                        ))
                    })?;
                self.read_kv(at.path, n).await
            }
            Which::Stage(Stage::Pending) => {
                Err(self.fail("a pending value is kept by rekey, not in Vault; read it by version"))
            }
        }
    }

    async fn roll_back(
        &self,
        at: Location<'_>,
        to: Stored<'_>,
        from: Stored<'_>,
    ) -> Result<String> {
        let cas = self.kv_version(from.value_ref)?;
        let value = self.read(at, Which::Version(to)).await?;
        let n = self.make_latest(at, &value, cas, Some(cas)).await?;
        let r = format!("kv:{n}");
        self.sealed
            .keep(at.secret_id, to.version, &r, &value)
            .await?;
        Ok(r)
    }

    async fn revoke(&self, at: Location<'_>, old: Stored<'_>) -> Result<()> {
        if sealed_copy(old).is_some() {
            return self.discard(at, old).await;
        }
        let n = self.kv_version(old.value_ref)?;
        let mount = &self.cfg.mount;
        let path = at.path;
        match self.cfg.on_revoke {
            OnRevoke::Keep => {}
            OnRevoke::Destroy => {
                let what = format!("destroying KV version {n} of {mount}/{path}");
                call!(self, &what, |c| vaultrs::kv2::destroy_versions(
                    c,
                    mount,
                    path,
                    vec![n]
                ))?;
            }
            OnRevoke::Delete => {
                let what = format!("deleting KV version {n} of {mount}/{path}");
                call!(self, &what, |c| vaultrs::kv2::delete_versions(
                    c,
                    mount,
                    path,
                    vec![n]
                ))?;
            }
        }
        self.sealed
            .forget_version(at.secret_id, old.version)
            .await?;
        // The stages no longer name it.
        if let Some(m) = self.metadata(path).await?
            && let Some(c) = &m.custom_metadata
            && c.get(META_PREVIOUS).is_some_and(|p| *p == n.to_string())
        {
            let current = c
                .get(META_CURRENT)
                .and_then(|v| v.parse().ok())
                .unwrap_or(m.current_version);
            let merged = self.merged_metadata(at, Some(c), current, None)?;
            self.write_metadata(at, merged).await?;
        }
        Ok(())
    }

    async fn discard(&self, at: Location<'_>, pending: Stored<'_>) -> Result<()> {
        // Already a KV version: apps may read it, so it stays in Vault;
        // only rekey's copy goes.
        self.sealed
            .discard(at, sealed_copy(pending).unwrap_or(pending))
            .await
    }

    async fn observe(&self, at: Location<'_>, current: Stored<'_>) -> Result<Observed> {
        let Some(known) = kv_ref(current.value_ref) else {
            return Ok(Observed::Unchanged);
        };
        self.check_kv2().await?;
        let where_ = self.full_path(at.path);
        let Some(m) = self.metadata(at.path).await? else {
            return Ok(Observed::Problem(format!(
                "{where_} no longer exists in Vault (its metadata was deleted); apps reading it get nothing"
            )));
        };
        let latest = m.current_version;
        let gone = |n: u64| {
            m.versions.get(&n.to_string()).and_then(|v| {
                if v.destroyed {
                    Some("destroyed")
                } else if !v.deletion_time.is_empty() {
                    Some("deleted")
                } else {
                    None
                }
            })
        };
        if let Some(how) = gone(latest) {
            return Ok(Observed::Problem(format!(
                "the latest KV version {latest} of {where_} was {how} outside rekey; apps reading it get nothing, sidecars keep v{}",
                current.version
            )));
        }
        if latest < known {
            return Ok(Observed::Problem(format!(
                "{where_} was deleted and written again outside rekey (its latest KV version {latest} is older than rekey's current, {known}); take it over with `rekey rotate` once it holds what apps should read"
            )));
        }
        if latest == known {
            // Repair stages a failed metadata write left behind.
            let c = m.custom_metadata.as_ref();
            if c.and_then(|c| c.get(META_CURRENT)) != Some(&known.to_string()) {
                let previous = c
                    .and_then(|c| c.get(META_PREVIOUS))
                    .and_then(|v| v.parse().ok());
                if let Ok(merged) = self.merged_metadata(at, c, known, previous) {
                    let _ = self.write_metadata(at, merged).await;
                }
            }
            return Ok(Observed::Unchanged);
        }
        let value = match self.read_kv(at.path, latest).await {
            Ok(v) => v,
            Err(Error::Provider {
                message,
                unavailable: false,
                ..
            }) => return Ok(Observed::Problem(message)),
            Err(e) => return Err(e),
        };
        // The stages follow the outside change.
        if let Ok(merged) =
            self.merged_metadata(at, m.custom_metadata.as_ref(), latest, Some(known))
            && let Err(e) = self.write_metadata(at, merged).await
        {
            tracing::warn!(provider = %self.cfg.name, secret = at.secret_id, error = %e, "custom_metadata not updated after an outside change");
        }
        Ok(Observed::Changed(OutsideChange {
            value,
            value_ref: format!("kv:{latest}"),
            note: format!("KV version {latest} of {where_} written outside rekey"),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_map_to_kv_data_and_back() {
        let raw = SecretValue::Raw(SecretBytes::new(b"s3cret".to_vec()));
        let d = encode(&raw).unwrap();
        assert_eq!(
            Value::Object(d.clone()),
            serde_json::json!({"value": "s3cret"})
        );
        assert!(same_value(&decode(d).unwrap(), &raw));

        let bin = SecretValue::Raw(SecretBytes::new(vec![0xff, 0, 1]));
        let d = encode(&bin).unwrap();
        assert_eq!(
            Value::Object(d.clone()),
            serde_json::json!({"value_base64": "/wAB"})
        );
        assert!(same_value(&decode(d).unwrap(), &bin));

        let fields = SecretValue::Fields(BTreeMap::from([
            ("username".to_string(), SecretString::new("app".into())),
            ("password".to_string(), SecretString::new("pw".into())),
        ]));
        let d = encode(&fields).unwrap();
        assert_eq!(
            Value::Object(d.clone()),
            serde_json::json!({"username": "app", "password": "pw"})
        );
        assert!(same_value(&decode(d).unwrap(), &fields));
    }

    #[test]
    fn a_structured_value_that_would_read_back_as_a_single_one_is_refused() {
        let v = SecretValue::Fields(BTreeMap::from([(
            "value".to_string(),
            SecretString::new("x".into()),
        )]));
        assert!(encode(&v).unwrap_err().contains("add a field"));
    }

    #[test]
    fn data_that_is_not_strings_is_named_without_its_value() {
        let d = serde_json::json!({"password": 12345, "user": "x"});
        let Value::Object(d) = d else { unreachable!() };
        let e = decode(d).unwrap_err();
        assert_eq!(e, "the field \"password\" is not a string");
        assert!(decode(Map::new()).is_err());
    }

    #[test]
    fn references() {
        assert_eq!(kv_ref("kv:12"), Some(12));
        assert_eq!(kv_ref("pending:v2.ab"), None);
        let stored = |value_ref| Stored {
            version: 2,
            value_ref,
        };
        let copy = sealed_copy(stored("pending:v2.ab")).unwrap();
        assert_eq!((copy.version, copy.value_ref), (2, "v2.ab"));
        assert!(sealed_copy(stored("kv:12")).is_none());
    }
}
