//! Backend configuration: a raw TOML shape, `REKEY_*` overrides, and one
//! validation step that reports every problem at once before any port is
//! bound.
//!
//! The config never holds a secret: it names files and environment
//! variables, and the server reads them when it needs them.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::auth::Operation;

mod providers;

pub(crate) use providers::asm_name_byte;
pub use providers::{AwsConfig, OnRevoke, ProviderConfig, VaultAuth, VaultConfig};

/// Default gRPC address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7700";
/// Default Prometheus address.
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:7701";
/// Default data directory (SQLite store, development KEK, admin token).
pub const DEFAULT_DATA_DIR: &str = "./rekey-data";

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawConfig {
    listen: Option<String>,
    metrics_listen: Option<String>,
    data_dir: Option<PathBuf>,
    shutdown_grace: Option<String>,
    store: RawStore,
    kek: RawKek,
    auth: RawAuth,
    tls: Option<RawTls>,
    scheduler: RawScheduler,
    consumers: RawConsumers,
    engine: RawEngine,
    limits: RawLimits,
    audit: RawAudit,
    metrics: RawMetrics,
    providers: Vec<toml::Table>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawStore {
    url: Option<String>,
    max_connections: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawKek {
    file: Option<PathBuf>,
    env: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawAuth {
    admin_token_file: Option<PathBuf>,
    bootstrap_admin: Option<bool>,
    tokens: Vec<RawToken>,
    policies: Vec<RawPolicy>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawToken {
    identity: String,
    /// Hex SHA-256 of the token. The token itself is never configured here.
    sha256: String,
    expires_at: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    identity: String,
    prefixes: Vec<String>,
    operations: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(clippy::struct_field_names, reason = "the fields are the TOML keys")]
struct RawTls {
    cert_file: PathBuf,
    key_file: PathBuf,
    client_ca_file: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawScheduler {
    enabled: Option<bool>,
    tick: Option<String>,
    concurrency: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawConsumers {
    ttl: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
#[allow(clippy::struct_field_names, reason = "the fields are the TOML keys")]
struct RawEngine {
    step_delay: Option<String>,
    step_attempts: Option<u32>,
    step_backoff: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
#[allow(clippy::struct_field_names, reason = "the fields are the TOML keys")]
struct RawLimits {
    max_value_bytes: Option<u64>,
    max_watch_streams_per_identity: Option<u32>,
    max_watch_streams_per_connection: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawAudit {
    refusal_summary_interval: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawMetrics {
    bearer_token_file: Option<PathBuf>,
}

/// Largest `limits.max_value_bytes`: a Watch event carries current and
/// previous, and the sidecar decodes events of up to 16 MiB.
pub const MAX_VALUE_BYTES_LIMIT: u64 = 4 << 20;
/// Default `limits.max_value_bytes`: AWS Secrets Manager's limit.
pub const DEFAULT_MAX_VALUE_BYTES: u64 = 64 << 10;

/// Where the key-encryption key comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KekSource {
    /// A file holding base64 of 32 bytes.
    File(PathBuf),
    /// An environment variable holding base64 of 32 bytes.
    Env(String),
    /// Development default: a file in the data directory, created when
    /// missing.
    Generated(PathBuf),
}

#[derive(Debug, Clone)]
pub struct TokenConfig {
    pub identity: String,
    pub sha256: [u8; 32],
    /// Unix ms; `None` never expires.
    pub expires_at_ms: Option<i64>,
}

#[derive(Debug, Clone)]
pub struct PolicyConfig {
    pub identity: String,
    pub prefixes: Vec<String>,
    pub operations: BTreeSet<Operation>,
}

#[derive(Debug, Clone)]
pub struct TlsConfig {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// When set, clients must present a certificate signed by this CA; its
    /// subject common name is the caller's identity.
    pub client_ca_file: Option<PathBuf>,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    /// `None` when metrics are switched off (`metrics_listen = "off"`).
    pub metrics_listen: Option<SocketAddr>,
    pub data_dir: PathBuf,
    pub store_url: String,
    pub store_max_connections: u32,
    pub kek: KekSource,
    /// Where the bootstrap admin token lives; `None` disables it.
    pub admin_token_file: Option<PathBuf>,
    pub tokens: Vec<TokenConfig>,
    pub policies: Vec<PolicyConfig>,
    pub tls: Option<TlsConfig>,
    pub scheduler_enabled: bool,
    pub scheduler_tick: Duration,
    /// Scheduled rotations and decommissions running at once, each for a
    /// secret of its own.
    pub scheduler_concurrency: usize,
    /// A consumer that has not reported for this long is not live.
    pub consumer_ttl: Duration,
    /// Pause before each rotation step. For demonstrations and crash tests
    /// only; zero in production.
    pub step_delay: Duration,
    /// Attempts per set / test step before a rotation is parked as
    /// needs-attention.
    pub step_attempts: u32,
    /// Pause before a step's second attempt; doubles each time.
    pub step_backoff: Duration,
    /// After SIGTERM, how long calls in flight may take before the process
    /// exits anyway.
    pub shutdown_grace: Duration,
    /// The largest secret value, in bytes of its stored form.
    pub max_value_bytes: usize,
    /// Open Watch streams one identity may hold across connections.
    pub max_watch_streams_per_identity: u32,
    /// Open Watch streams one client connection may hold.
    pub max_watch_streams_per_connection: u32,
    /// How often, at most, calls refused before authentication are written
    /// to the audit log as one summary.
    pub refusal_summary_interval: Duration,
    /// When set, `/metrics` answers only with `Authorization: Bearer` and
    /// the token in this file (read at each request).
    pub metrics_token_file: Option<PathBuf>,
    /// `[[providers]]`: where secrets created with `--provider` keep their
    /// values.
    pub providers: Vec<ProviderConfig>,
}

/// Every problem found in a configuration, listed together.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration:\n  - {}", .0.join("\n  - "))]
pub struct ConfigErrors(pub Vec<String>);

/// `REKEY_*` overrides: variable, TOML path, value type.
const ENV_OVERRIDES: &[(&str, &str, EnvType)] = &[
    ("REKEY_LISTEN", "listen", EnvType::Str),
    ("REKEY_METRICS_LISTEN", "metrics_listen", EnvType::Str),
    ("REKEY_DATA_DIR", "data_dir", EnvType::Str),
    ("REKEY_SHUTDOWN_GRACE", "shutdown_grace", EnvType::Str),
    ("REKEY_STORE_URL", "store.url", EnvType::Str),
    (
        "REKEY_STORE_MAX_CONNECTIONS",
        "store.max_connections",
        EnvType::Int,
    ),
    ("REKEY_KEK_FILE", "kek.file", EnvType::Str),
    ("REKEY_KEK_ENV", "kek.env", EnvType::Str),
    (
        "REKEY_AUTH_ADMIN_TOKEN_FILE",
        "auth.admin_token_file",
        EnvType::Str,
    ),
    (
        "REKEY_AUTH_BOOTSTRAP_ADMIN",
        "auth.bootstrap_admin",
        EnvType::Bool,
    ),
    (
        "REKEY_SCHEDULER_ENABLED",
        "scheduler.enabled",
        EnvType::Bool,
    ),
    ("REKEY_SCHEDULER_TICK", "scheduler.tick", EnvType::Str),
    (
        "REKEY_SCHEDULER_CONCURRENCY",
        "scheduler.concurrency",
        EnvType::Int,
    ),
    ("REKEY_CONSUMERS_TTL", "consumers.ttl", EnvType::Str),
    ("REKEY_ENGINE_STEP_DELAY", "engine.step_delay", EnvType::Str),
    (
        "REKEY_ENGINE_STEP_ATTEMPTS",
        "engine.step_attempts",
        EnvType::Int,
    ),
    (
        "REKEY_ENGINE_STEP_BACKOFF",
        "engine.step_backoff",
        EnvType::Str,
    ),
    (
        "REKEY_LIMITS_MAX_VALUE_BYTES",
        "limits.max_value_bytes",
        EnvType::Int,
    ),
    (
        "REKEY_LIMITS_MAX_WATCH_STREAMS_PER_IDENTITY",
        "limits.max_watch_streams_per_identity",
        EnvType::Int,
    ),
    (
        "REKEY_LIMITS_MAX_WATCH_STREAMS_PER_CONNECTION",
        "limits.max_watch_streams_per_connection",
        EnvType::Int,
    ),
    (
        "REKEY_AUDIT_REFUSAL_SUMMARY_INTERVAL",
        "audit.refusal_summary_interval",
        EnvType::Str,
    ),
    (
        "REKEY_METRICS_BEARER_TOKEN_FILE",
        "metrics.bearer_token_file",
        EnvType::Str,
    ),
];

#[derive(Clone, Copy)]
enum EnvType {
    Str,
    Int,
    Bool,
}

/// The names of every `REKEY_*` variable the backend reads, for `--help`.
pub fn env_override_names() -> impl Iterator<Item = &'static str> {
    ENV_OVERRIDES.iter().map(|(n, _, _)| *n)
}

impl Config {
    /// Loads `path` (or defaults when `None`), applies overrides from `env`
    /// and validates. `env` is injected so that tests never touch the
    /// process environment.
    ///
    /// # Errors
    ///
    /// Every problem found: an unreadable file, TOML that does not parse,
    /// unknown settings, values out of range.
    pub fn load(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigErrors> {
        let text = match path {
            Some(p) => std::fs::read_to_string(p).map_err(|e| {
                ConfigErrors(vec![format!(
                    "cannot read config file {}: {e}",
                    p.display()
                )])
            })?,
            None => String::new(),
        };
        Self::from_toml(&text, env)
    }

    /// Parses TOML text, applies overrides and validates.
    ///
    /// # Errors
    ///
    /// Every problem found, as for [`Config::load`].
    pub fn from_toml(
        text: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigErrors> {
        let mut errors = Vec::new();
        let mut table: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| ConfigErrors(vec![format!("config file: {e}")]))?;
        for (name, value) in env {
            let Some((_, path, ty)) = ENV_OVERRIDES.iter().find(|(n, _, _)| *n == name) else {
                continue;
            };
            let v = match ty {
                EnvType::Str => Some(toml::Value::String(value)),
                EnvType::Int => value.parse::<i64>().ok().map(toml::Value::Integer),
                EnvType::Bool => match value.as_str() {
                    "true" | "1" => Some(toml::Value::Boolean(true)),
                    "false" | "0" => Some(toml::Value::Boolean(false)),
                    _ => None,
                },
            };
            match v {
                Some(v) => set_path(&mut table, path, v),
                None => errors.push(format!("{name}: not a valid {path} value")),
            }
        }
        let raw: RawConfig = match toml::Value::Table(table).try_into() {
            Ok(r) => r,
            Err(e) => {
                errors.push(format!("config: {}", e.message()));
                return Err(ConfigErrors(errors));
            }
        };
        let cfg = validate(raw, &mut errors);
        if errors.is_empty() {
            Ok(cfg)
        } else {
            Err(ConfigErrors(errors))
        }
    }
}

impl Config {
    /// Every file the configuration names that the backend reads at start
    /// (the KEK, tokens, TLS material, provider credentials), with the
    /// setting that names it. The generated development KEK and the
    /// default admin token in the data directory are left out: the backend
    /// creates them.
    #[must_use]
    pub fn named_files(&self) -> Vec<(String, &Path)> {
        let mut files: Vec<(String, &Path)> = Vec::new();
        if let KekSource::File(p) = &self.kek {
            files.push(("kek.file".into(), p));
        }
        if let Some(p) = &self.admin_token_file
            && *p != self.data_dir.join("admin.token")
        {
            files.push(("auth.admin_token_file".into(), p));
        }
        if let Some(t) = &self.tls {
            files.push(("tls.cert_file".into(), &t.cert_file));
            files.push(("tls.key_file".into(), &t.key_file));
            if let Some(ca) = &t.client_ca_file {
                files.push(("tls.client_ca_file".into(), ca));
            }
        }
        if let Some(p) = &self.metrics_token_file {
            files.push(("metrics.bearer_token_file".into(), p));
        }
        for p in &self.providers {
            let ProviderConfig::Vault(v) = p else {
                continue;
            };
            let at = |what: &str| format!("providers ({}).{what}", v.name);
            match &v.auth {
                VaultAuth::Token { token_file } => files.push((at("token_file"), token_file)),
                VaultAuth::AppRole {
                    role_id_file,
                    secret_id_file,
                    ..
                } => {
                    files.push((at("role_id_file"), role_id_file));
                    files.push((at("secret_id_file"), secret_id_file));
                }
                VaultAuth::Kubernetes { jwt_file, .. } => files.push((at("jwt_file"), jwt_file)),
            }
            if let Some(ca) = &v.ca_file {
                files.push((at("ca_file"), ca));
            }
        }
        files
    }

    /// What `--check-config` finds wrong beyond the settings themselves:
    /// each named file must be readable and not empty. Messages name the
    /// setting and the path, never the contents.
    #[must_use]
    pub fn file_problems(&self) -> Vec<String> {
        self.named_files()
            .into_iter()
            .filter_map(|(setting, p)| match std::fs::metadata(p) {
                Err(e) => Some(format!("{setting}: cannot read {}: {e}", p.display())),
                Ok(m) if m.is_dir() => Some(format!("{setting}: {} is a directory", p.display())),
                Ok(m) if m.len() == 0 => Some(format!("{setting}: {} is empty", p.display())),
                Ok(_) => std::fs::File::open(p)
                    .err()
                    .map(|e| format!("{setting}: cannot read {}: {e}", p.display())),
            })
            .collect()
    }

    /// One line on what this configuration runs, for `--check-config`: no
    /// secret, and the store URL without its password.
    #[must_use]
    pub fn summary(&self) -> String {
        let metrics = self
            .metrics_listen
            .map_or_else(|| "off".to_string(), |a| a.to_string());
        let store = redact_url(&self.store_url);
        format!(
            "listen {}{}, metrics {metrics}, store {store}, {} token(s), {} provider(s), scheduler {}",
            self.listen,
            if self.tls.is_some() { " (TLS)" } else { "" },
            self.tokens.len(),
            self.providers.len(),
            if self.scheduler_enabled { "on" } else { "off" },
        )
    }
}

fn set_path(table: &mut toml::Table, path: &str, v: toml::Value) {
    let mut parts: Vec<&str> = path.split('.').collect();
    let last = parts.pop().unwrap_or_default();
    let mut t = table;
    for p in parts {
        let entry = t
            .entry(p.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        if !entry.is_table() {
            *entry = toml::Value::Table(toml::Table::new());
        }
        let toml::Value::Table(inner) = entry else {
            return;
        };
        t = inner;
    }
    t.insert(last.to_string(), v);
}

fn parse_addr(setting: &str, v: &str, errors: &mut Vec<String>) -> Option<SocketAddr> {
    let a = v.parse().ok();
    if a.is_none() {
        errors.push(format!(
            "{setting}: {v:?} is not an address such as 127.0.0.1:7700"
        ));
    }
    a
}

/// Parses a duration such as `30m`, `1h 30m` or `500ms`.
pub fn parse_duration(setting: &str, v: &str, errors: &mut Vec<String>) -> Option<Duration> {
    let d = humantime::parse_duration(v.trim()).ok();
    if d.is_none() {
        errors.push(format!(
            "{setting}: {v:?} is not a duration such as 30s, 15m or 1h"
        ));
    }
    d
}

/// A duration setting, or its default when unset (or unparsable, which is
/// reported).
fn duration(
    setting: &str,
    v: Option<&str>,
    default: Duration,
    errors: &mut Vec<String>,
) -> Duration {
    v.and_then(|t| parse_duration(setting, t, errors))
        .unwrap_or(default)
}

/// A duration setting that must be greater than zero.
fn positive_duration(
    setting: &str,
    v: Option<&str>,
    default: Duration,
    errors: &mut Vec<String>,
) -> Duration {
    let d = duration(setting, v, default, errors);
    if d.is_zero() {
        errors.push(format!("{setting}: must be greater than zero"));
    }
    d
}

/// A count that must be at least 1.
fn at_least_one(setting: &str, v: Option<u32>, default: u32, errors: &mut Vec<String>) -> u32 {
    let v = v.unwrap_or(default);
    if v == 0 {
        errors.push(format!("{setting}: must be at least 1"));
    }
    v
}

#[allow(
    clippy::too_many_lines,
    reason = "one setting after another with its default; the sections with logic of their own are functions"
)]
fn validate(raw: RawConfig, errors: &mut Vec<String>) -> Config {
    let fallback: SocketAddr = ([127, 0, 0, 1], 7700).into();
    let listen = parse_addr(
        "listen",
        raw.listen.as_deref().unwrap_or(DEFAULT_LISTEN),
        errors,
    )
    .unwrap_or(fallback);
    let metrics_listen = match raw.metrics_listen.as_deref() {
        Some("off") => None,
        other => parse_addr(
            "metrics_listen",
            other.unwrap_or(DEFAULT_METRICS_LISTEN),
            errors,
        ),
    };
    let data_dir = raw
        .data_dir
        .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR));

    let (store_url, store_max_connections, kek) =
        validate_store(raw.store, raw.kek, &data_dir, errors);
    let (admin_token_file, tokens, policies) = validate_auth(raw.auth, &data_dir, errors);

    let tls = raw.tls.map(|t| {
        for (name, f) in [
            ("tls.cert_file", Some(&t.cert_file)),
            ("tls.key_file", Some(&t.key_file)),
            ("tls.client_ca_file", t.client_ca_file.as_ref()),
        ] {
            if let Some(f) = f
                && let Err(e) = std::fs::metadata(f)
            {
                errors.push(format!("{name}: cannot read {}: {e}", f.display()));
            }
        }
        TlsConfig {
            cert_file: t.cert_file,
            key_file: t.key_file,
            client_ca_file: t.client_ca_file,
        }
    });

    let scheduler_tick = positive_duration(
        "scheduler.tick",
        raw.scheduler.tick.as_deref(),
        Duration::from_secs(1),
        errors,
    );
    let consumer_ttl = duration(
        "consumers.ttl",
        raw.consumers.ttl.as_deref(),
        Duration::from_mins(2),
        errors,
    );
    let step_delay = duration(
        "engine.step_delay",
        raw.engine.step_delay.as_deref(),
        Duration::ZERO,
        errors,
    );
    let step_attempts = at_least_one("engine.step_attempts", raw.engine.step_attempts, 3, errors);
    let scheduler_concurrency = at_least_one(
        "scheduler.concurrency",
        raw.scheduler.concurrency,
        8,
        errors,
    );
    let step_backoff = duration(
        "engine.step_backoff",
        raw.engine.step_backoff.as_deref(),
        Duration::from_secs(1),
        errors,
    );
    let shutdown_grace = duration(
        "shutdown_grace",
        raw.shutdown_grace.as_deref(),
        Duration::from_secs(10),
        errors,
    );

    let max_value_bytes = raw
        .limits
        .max_value_bytes
        .unwrap_or(DEFAULT_MAX_VALUE_BYTES);
    if max_value_bytes == 0 || max_value_bytes > MAX_VALUE_BYTES_LIMIT {
        errors.push(format!(
            "limits.max_value_bytes: must be between 1 and {MAX_VALUE_BYTES_LIMIT} (4 MiB)"
        ));
    }
    let max_watch_streams_per_identity = at_least_one(
        "limits.max_watch_streams_per_identity",
        raw.limits.max_watch_streams_per_identity,
        10_000,
        errors,
    );
    let max_watch_streams_per_connection = at_least_one(
        "limits.max_watch_streams_per_connection",
        raw.limits.max_watch_streams_per_connection,
        100,
        errors,
    );
    let refusal_summary_interval = positive_duration(
        "audit.refusal_summary_interval",
        raw.audit.refusal_summary_interval.as_deref(),
        Duration::from_mins(1),
        errors,
    );
    if let Some(f) = &raw.metrics.bearer_token_file
        && let Err(e) = std::fs::metadata(f)
    {
        errors.push(format!(
            "metrics.bearer_token_file: cannot read {}: {e}",
            f.display()
        ));
    }

    let providers = providers::validate(raw.providers, errors);

    Config {
        providers,
        max_value_bytes: usize::try_from(max_value_bytes).unwrap_or(usize::MAX),
        max_watch_streams_per_identity,
        max_watch_streams_per_connection,
        refusal_summary_interval,
        metrics_token_file: raw.metrics.bearer_token_file,
        step_attempts,
        step_backoff,
        shutdown_grace,
        listen,
        metrics_listen,
        data_dir,
        store_url,
        store_max_connections,
        kek,
        admin_token_file,
        tokens,
        policies,
        tls,
        scheduler_enabled: raw.scheduler.enabled.unwrap_or(true),
        scheduler_tick,
        scheduler_concurrency: scheduler_concurrency as usize,
        consumer_ttl,
        step_delay,
    }
}

/// `[store]` and `[kek]`: where rekey keeps its data, under which key.
fn validate_store(
    store: RawStore,
    kek: RawKek,
    data_dir: &Path,
    errors: &mut Vec<String>,
) -> (String, u32, KekSource) {
    let store_url = match store.url {
        Some(u) if u.starts_with("postgres://") || u.starts_with("postgresql://") => {
            // sslmode, sslrootcert and the client certificate's files are
            // checked before anything starts.
            if let Err(e) = rekey_probe::postgres::PgUrl::parse(&u) {
                errors.push(format!("store.url: {e}"));
            }
            u
        }
        Some(u) if u.starts_with("sqlite:") => u,
        Some(u) => {
            errors.push(format!(
                "store.url: must start with sqlite: or postgres:// (got scheme {:?})",
                u.split(':').next().unwrap_or_default()
            ));
            String::new()
        }
        None => format!("sqlite://{}?mode=rwc", data_dir.join("rekey.db").display()),
    };
    let store_max_connections = store.max_connections.unwrap_or(10);
    if store_max_connections == 0 {
        errors.push("store.max_connections: must be at least 1".into());
    }

    let kek = match (kek.file, kek.env) {
        (Some(_), Some(_)) => {
            errors.push("kek: set either kek.file or kek.env, not both".into());
            KekSource::Generated(data_dir.join("kek"))
        }
        (Some(f), None) => KekSource::File(f),
        (None, Some(e)) => {
            if e.is_empty() {
                errors.push("kek.env: must name an environment variable".into());
            }
            KekSource::Env(e)
        }
        (None, None) => KekSource::Generated(data_dir.join("kek")),
    };
    (store_url, store_max_connections, kek)
}

/// `[auth]`: the bootstrap admin token's file, tokens and policies.
fn validate_auth(
    auth: RawAuth,
    data_dir: &Path,
    errors: &mut Vec<String>,
) -> (Option<PathBuf>, Vec<TokenConfig>, Vec<PolicyConfig>) {
    let admin_token_file = if auth.bootstrap_admin.unwrap_or(true) {
        Some(
            auth.admin_token_file
                .unwrap_or_else(|| data_dir.join("admin.token")),
        )
    } else {
        None
    };

    let mut tokens = Vec::new();
    for (i, t) in auth.tokens.into_iter().enumerate() {
        let setting = format!("auth.tokens[{i}]");
        if t.identity.trim().is_empty() {
            errors.push(format!("{setting}.identity: must not be empty"));
        }
        let mut sha = [0u8; 32];
        if hex::decode_to_slice(t.sha256.trim(), &mut sha).is_err() {
            // The value may be a token pasted by mistake: never echo it.
            errors.push(format!(
                "{setting}.sha256: must be 64 hex digits (the SHA-256 of the token, not the token)"
            ));
        }
        let expires_at_ms = t.expires_at.as_deref().and_then(|s| {
            let t = chrono::DateTime::parse_from_rfc3339(s).ok();
            if t.is_none() {
                errors.push(format!(
                    "{setting}.expires_at: {s:?} is not an RFC 3339 time such as 2027-01-01T00:00:00Z"
                ));
            }
            t.map(|d| d.timestamp_millis())
        });
        tokens.push(TokenConfig {
            identity: t.identity,
            sha256: sha,
            expires_at_ms,
        });
    }

    let mut policies = Vec::new();
    for (i, p) in auth.policies.into_iter().enumerate() {
        let setting = format!("auth.policies[{i}]");
        let mut ops = BTreeSet::new();
        for o in &p.operations {
            match o.parse::<Operation>() {
                Ok(op) => {
                    ops.insert(op);
                }
                Err(()) => errors.push(format!(
                    "{setting}.operations: unknown operation {o:?} (expected one of {})",
                    Operation::ALL_NAMES.join(", ")
                )),
            }
        }
        if p.prefixes.is_empty() {
            errors.push(format!(
                "{setting}.prefixes: list at least one secret-id prefix (\"\" means every secret)"
            ));
        }
        policies.push(PolicyConfig {
            identity: p.identity,
            prefixes: p.prefixes,
            operations: ops,
        });
    }
    (admin_token_file, tokens, policies)
}

/// The store URL with any password replaced, for logs.
#[must_use]
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let userinfo = &url[s + 3..at];
            let user = userinfo.split(':').next().unwrap_or_default();
            format!("{}://{}:[redacted]@{}", &url[..s], user, &url[at + 1..])
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn defaults_need_no_file() {
        let c = Config::from_toml("", env(&[])).unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:7700");
        assert_eq!(c.metrics_listen.unwrap().to_string(), "127.0.0.1:7701");
        assert!(c.store_url.starts_with("sqlite://./rekey-data/rekey.db"));
        assert_eq!(
            c.kek,
            KekSource::Generated(PathBuf::from("./rekey-data/kek"))
        );
        assert_eq!(
            c.admin_token_file,
            Some(PathBuf::from("./rekey-data/admin.token"))
        );
    }

    #[test]
    fn env_overrides_file() {
        let c = Config::from_toml(
            "listen = \"127.0.0.1:1\"\n[store]\nurl = \"sqlite://x.db\"\n",
            env(&[
                ("REKEY_LISTEN", "127.0.0.1:9"),
                ("REKEY_STORE_URL", "postgres://u@h/db"),
                ("REKEY_SCHEDULER_ENABLED", "false"),
                ("UNRELATED", "x"),
            ]),
        )
        .unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:9");
        assert_eq!(c.store_url, "postgres://u@h/db");
        assert!(!c.scheduler_enabled);
    }

    #[test]
    fn a_store_url_s_tls_settings_are_checked_before_start() {
        let e = Config::from_toml(
            "[store]\nurl = \"postgres://rekey:pw-in-url@db/rekey?sslmode=verify-full&sslrootcert=/nonexistent/rds-ca.pem\"\n",
            env(&[]),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("store.url: postgres: sslrootcert /nonexistent/rds-ca.pem: cannot read it"),
            "{e}"
        );
        assert!(!e.contains("pw-in-url"), "{e}");
        let e = Config::from_toml(
            "[store]\nurl = \"postgres://rekey@db/rekey?sslmode=strict\"\n",
            env(&[]),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("store.url: postgres: sslmode \"strict\""), "{e}");
    }

    #[test]
    fn unknown_setting_is_named() {
        let e = Config::from_toml("[store]\nurll = \"x\"\n", env(&[])).unwrap_err();
        assert!(e.to_string().contains("urll"), "{e}");
    }

    #[test]
    fn every_problem_is_listed_and_no_token_is_echoed() {
        let text = r#"
listen = "nowhere"
[kek]
file = "/a"
env = "B"
[[auth.tokens]]
identity = "ci"
sha256 = "my-plain-token-value"
[[auth.policies]]
identity = "ci"
prefixes = []
operations = ["rotate", "fly"]
[scheduler]
tick = "often"
concurrency = 0
"#;
        let e = Config::from_toml(text, env(&[])).unwrap_err();
        let s = e.to_string();
        for needle in [
            "listen",
            "kek",
            "auth.tokens[0].sha256",
            "\"fly\"",
            "prefixes",
            "scheduler.tick",
            "scheduler.concurrency: must be at least 1",
        ] {
            assert!(s.contains(needle), "missing {needle} in {s}");
        }
        assert!(!s.contains("my-plain-token-value"), "{s}");
        assert_eq!(e.0.len(), 7, "{s}");
    }

    #[test]
    fn bad_store_scheme_does_not_echo_the_url() {
        let e = Config::from_toml("[store]\nurl = \"mysql://u:pw@h/db\"\n", env(&[])).unwrap_err();
        assert!(!e.to_string().contains("pw"), "{e}");
    }

    #[test]
    fn redacts_url_passwords() {
        assert_eq!(
            redact_url("postgres://app:s3cret@db:5432/x"),
            "postgres://app:[redacted]@db:5432/x"
        );
        assert_eq!(redact_url("sqlite://a.db"), "sqlite://a.db");
    }
}
