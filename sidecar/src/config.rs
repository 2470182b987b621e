//! Sidecar configuration: a TOML file and/or flags, `REKEY_*` overrides, and
//! one validation step that lists every problem before any port is bound.
//!
//! The config names files (tokens, outputs, pid files); it never holds a
//! secret itself.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::error::Error;
use crate::write::Dirs;

pub const DEFAULT_LISTEN: &str = "127.0.0.1:2773";
pub const DEFAULT_BACKEND: &str = "http://127.0.0.1:7700";
/// Default `max_event_bytes`. The backend's largest event is two values
/// at its `limits.max_value_bytes` ceiling (4 MiB each: current and
/// previous) plus metadata; this leaves room to spare.
pub const DEFAULT_MAX_EVENT_BYTES: usize = 16 << 20;
/// Smallest `max_event_bytes`: an event's metadata alone takes a few
/// hundred bytes.
const MIN_MAX_EVENT_BYTES: usize = 4 << 10;
/// Largest `max_event_bytes`: an event is held in memory whole while it is
/// decoded, so the limit is also how much a backend can make a pod hold.
const MAX_MAX_EVENT_BYTES: usize = 256 << 20;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawConfig {
    pub backend: Option<String>,
    pub token_file: Option<PathBuf>,
    pub listen: Option<String>,
    pub api_token_file: Option<PathBuf>,
    pub consumer_id: Option<String>,
    pub pod: Option<String>,
    pub namespace: Option<String>,
    pub report_interval: Option<String>,
    pub report_spread: Option<String>,
    pub debounce: Option<String>,
    pub backoff_max: Option<String>,
    /// A number of bytes, or text such as `"16MiB"` (as `REKEY_*`
    /// variables always are).
    pub max_event_bytes: Option<RawSize>,
    /// Follow symlinks on the way to output directories (default false).
    pub allow_symlinked_dirs: Option<bool>,
    pub secrets: Vec<RawSecret>,
    pub file_sources: Vec<RawFileSource>,
    pub reload: Vec<RawReload>,
    pub reencrypt: Vec<RawReencrypt>,
}

/// A size in bytes as TOML gives it: `16777216` or `"16MiB"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum RawSize {
    Bytes(u64),
    Text(String),
}

/// Re-encryption of database columns when an encryption key rotates.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawReencrypt {
    /// An `encryption-key` secret listed in `[[secrets]]`.
    pub secret: String,
    /// A file holding the Postgres URL of the data.
    pub database_url_file: PathBuf,
    /// `hyvve`: the platform's two credential columns.
    pub preset: Option<String>,
    #[serde(default)]
    pub columns: Vec<RawColumn>,
    pub batch_size: Option<usize>,
    /// How often to look for a new key version (default 1s).
    pub poll: Option<String>,
    /// `advisory-lock` (default: a Postgres session lock in the data's own
    /// database) or `kubernetes-lease`.
    pub leader_election: Option<String>,
    /// The Lease for `leader_election = "kubernetes-lease"`.
    pub lease: Option<RawLease>,
}

/// A `coordination.k8s.io/v1` Lease; in a pod every field has a default.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLease {
    /// Default: `rekey-reencrypt-<secret>-<hash>`.
    pub name: Option<String>,
    /// Default: the service account's namespace, then `namespace`.
    pub namespace: Option<String>,
    /// Default 15s.
    pub duration: Option<String>,
    /// Default: `https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT`.
    pub api_server: Option<String>,
    /// Default: the service account token, when mounted.
    pub token_file: Option<PathBuf>,
    /// Default: the service account's `ca.crt`.
    pub ca_file: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawColumn {
    pub table: String,
    pub column: String,
    pub id_column: Option<String>,
    /// hyvve or rekey (default hyvve).
    pub codec: Option<String>,
}

#[derive(Debug, Clone)]
pub struct ReencryptConfig {
    pub secret: String,
    pub database_url_file: PathBuf,
    pub columns: Vec<rekey_reencrypt::Column>,
    pub batch_size: usize,
    pub poll: Duration,
    pub election: Election,
}

/// How the sidecars configured for one key pick the one that re-encrypts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Election {
    AdvisoryLock,
    KubernetesLease(crate::kube_lease::LeaseConfig),
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawOutput {
    pub path: Option<PathBuf>,
    pub format: Option<String>,
    pub template: Option<String>,
    pub env_name: Option<String>,
    pub mode: Option<String>,
    pub owner: Option<String>,
    /// Write into this directory the way kubelet does (`..data` symlink
    /// swap); `path` is then the file name inside it.
    pub directory: Option<PathBuf>,
    pub keyring_path: Option<PathBuf>,
    pub validate: Option<RawValidate>,
    pub reload: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSecret {
    pub id: String,
    #[serde(flatten)]
    pub out: RawOutput,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFileSource {
    /// The name the read API, metrics and `/readyz` use.
    pub id: String,
    /// The file to watch (e.g. a key in a mounted Secret volume).
    pub source: PathBuf,
    #[serde(flatten)]
    pub out: RawOutput,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawValidate {
    /// none, postgres, redis or http.
    pub kind: String,
    /// For http: the URL that must answer 2xx with the new value as a
    /// bearer token.
    pub url: Option<String>,
    pub timeout: Option<String>,
    /// For redis with a `rediss://` URL: CA certificates (PEM; default:
    /// the public CAs), a client certificate and its key, and the name
    /// the server's certificate is checked against.
    pub tls_ca_file: Option<PathBuf>,
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
    pub tls_server_name: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawReload {
    pub name: String,
    pub signal: Option<String>,
    pub pid_file: Option<PathBuf>,
    pub process_name: Option<String>,
    pub http_post: Option<String>,
    pub command: Option<Vec<String>>,
    pub timeout: Option<String>,
}

/// How a value is written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Format {
    /// The bytes as they are (single-valued secrets).
    Raw,
    /// The fields as a JSON object, or `{"value": ...}`.
    Json,
    /// `NAME=value` lines.
    Env,
    /// `{{field}}` placeholders.
    Template(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Validate {
    None,
    Postgres,
    /// With the TLS files a `rediss://` URL is checked with.
    Redis(rekey_probe::tls::TlsFiles),
    Http(String),
}

#[derive(Debug, Clone)]
pub struct Output {
    /// The file written; for directory outputs, `directory/<name>`.
    pub path: PathBuf,
    /// For kubelet-style outputs: the directory holding `..data`.
    pub directory: Option<PathBuf>,
    pub format: Format,
    pub env_name: String,
    pub mode: u32,
    pub owner: Option<(u32, u32)>,
    pub keyring_path: Option<PathBuf>,
    pub validate: Validate,
    pub validate_timeout: Duration,
    pub reload: Vec<String>,
    /// Whether symlinks on the way to the output are followed.
    pub dirs: Dirs,
}

#[derive(Debug, Clone)]
pub struct SecretConfig {
    pub id: String,
    pub out: Output,
}

#[derive(Debug, Clone)]
pub struct FileSource {
    pub id: String,
    pub source: PathBuf,
    pub out: Output,
}

#[derive(Debug, Clone)]
pub enum ReloadKind {
    Signal {
        signal: rustix::process::Signal,
        name: String,
        pid_file: Option<PathBuf>,
        process_name: Option<String>,
    },
    HttpPost(String),
    Command(Vec<String>),
}

#[derive(Debug, Clone)]
pub struct Reload {
    pub name: String,
    pub kind: ReloadKind,
    pub timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub backend: String,
    pub token_file: Option<PathBuf>,
    pub listen: SocketAddr,
    pub api_token_file: Option<PathBuf>,
    pub consumer_id: String,
    pub pod: String,
    pub namespace: String,
    pub report_interval: Duration,
    /// A report after a delivery waits a random part of this, so that a
    /// fleet that received a rotation together does not report at once
    /// (while its members are still writing their files).
    pub report_spread: Duration,
    pub debounce: Duration,
    pub backoff_max: Duration,
    /// The largest Watch event the sidecar decodes (bytes). A larger one
    /// ends the stream with [`Error::EventTooLarge`].
    pub max_event_bytes: usize,
    pub secrets: Vec<SecretConfig>,
    pub file_sources: Vec<FileSource>,
    pub reloads: Vec<Reload>,
    pub reencrypt: Vec<ReencryptConfig>,
}

impl Config {
    /// One line on what this configuration runs, for `--check-config`: no
    /// token and no value.
    #[must_use]
    pub fn summary(&self) -> String {
        format!(
            "backend {}, listen {}, {} secret(s), {} file source(s), {} reload action(s), {} re-encryption task(s)",
            self.backend,
            self.listen,
            self.secrets.len(),
            self.file_sources.len(),
            self.reloads.len(),
            self.reencrypt.len(),
        )
    }
}

/// Every problem found, listed together.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration:\n  - {}", .0.join("\n  - "))]
pub struct ConfigErrors(pub Vec<String>);

/// An invalid configuration: its problems, and what could be made of it.
#[derive(Debug)]
pub struct Invalid {
    pub errors: ConfigErrors,
    /// Absent when the file could not be read or parsed. Settings in error
    /// hold placeholders: use it only to check what is not in error.
    pub partial: Option<Box<Config>>,
    /// Ids of the secrets whose output settings are free of errors.
    pub sound_outputs: BTreeSet<String>,
}

/// Settings given as flags; they add to or override the file.
#[derive(Debug, Default, Clone)]
pub struct Flags {
    pub backend: Option<String>,
    pub token_file: Option<PathBuf>,
    pub secrets: Vec<String>,
    pub api_token_file: Option<PathBuf>,
    pub listen: Option<String>,
}

const ENV: &[(&str, &str)] = &[
    ("REKEY_BACKEND", "backend"),
    ("REKEY_TOKEN_FILE", "token_file"),
    ("REKEY_LISTEN", "listen"),
    ("REKEY_API_TOKEN_FILE", "api_token_file"),
    ("REKEY_CONSUMER_ID", "consumer_id"),
    ("REKEY_POD", "pod"),
    ("REKEY_NAMESPACE", "namespace"),
    ("REKEY_REPORT_INTERVAL", "report_interval"),
    ("REKEY_REPORT_SPREAD", "report_spread"),
    ("REKEY_DEBOUNCE", "debounce"),
    ("REKEY_BACKOFF_MAX", "backoff_max"),
    ("REKEY_MAX_EVENT_BYTES", "max_event_bytes"),
];

/// Signals a reload action may send.
pub fn parse_signal(name: &str) -> Option<rustix::process::Signal> {
    use rustix::process::Signal;
    let n = name.trim().to_ascii_uppercase();
    let n = n.strip_prefix("SIG").unwrap_or(&n);
    Some(match n {
        "HUP" => Signal::HUP,
        "USR1" => Signal::USR1,
        "USR2" => Signal::USR2,
        "TERM" => Signal::TERM,
        "INT" => Signal::INT,
        "QUIT" => Signal::QUIT,
        "WINCH" => Signal::WINCH,
        _ => return None,
    })
}

/// One `--secret` flag: the secret id, the path, the format, and for
/// `env=NAME` the variable's name.
pub struct SecretFlag {
    pub id: String,
    pub path: PathBuf,
    pub format: Option<String>,
    pub env_name: Option<String>,
}

/// `ID:PATH[:FORMAT]`, where FORMAT may be `env=NAME` to name the variable.
pub fn parse_secret_flag(s: &str) -> Result<SecretFlag, String> {
    let mut parts = s.splitn(3, ':');
    let id = parts.next().unwrap_or_default();
    let path = parts.next().unwrap_or_default();
    let format = parts.next().map(str::to_string);
    if id.is_empty() || path.is_empty() {
        return Err(format!(
            "--secret {s:?}: expected ID:PATH[:FORMAT], e.g. prod/api/db:/etc/app/db.json:json or prod/api/db:/etc/app/db.env:env=DATABASE_URL"
        ));
    }
    let (format, env_name) = match format.as_deref().and_then(|f| f.strip_prefix("env=")) {
        Some(name) => {
            let ok = name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !ok {
                return Err(format!(
                    "--secret {s:?}: {name:?} is not an environment variable name (letters, digits and _, not starting with a digit)"
                ));
            }
            (Some("env".to_string()), Some(name.to_string()))
        }
        None => (format, None),
    };
    Ok(SecretFlag {
        id: id.to_string(),
        path: PathBuf::from(path),
        format,
        env_name,
    })
}

/// How long, at most, a report after a delivery waits (`report_spread`).
pub const DEFAULT_REPORT_SPREAD: Duration = Duration::from_secs(1);

fn parse_duration(
    setting: &str,
    v: Option<&str>,
    default: Duration,
    errors: &mut Vec<String>,
) -> Duration {
    match v {
        None => default,
        Some(s) => humantime::parse_duration(s.trim()).unwrap_or_else(|_| {
            errors.push(format!(
                "{setting}: {s:?} is not a duration such as 200ms or 30s"
            ));
            default
        }),
    }
}

/// `max_event_bytes`: bytes, or a number with `KiB`, `MiB` or `GiB`.
fn parse_event_size(v: Option<&RawSize>, errors: &mut Vec<String>) -> usize {
    let parsed = match v {
        None => return DEFAULT_MAX_EVENT_BYTES,
        Some(RawSize::Bytes(n)) => usize::try_from(*n).ok(),
        Some(RawSize::Text(t)) => {
            let t = t.trim();
            let (digits, unit) = t
                .find(|c: char| !c.is_ascii_digit())
                .map_or((t, ""), |i| t.split_at(i));
            let shift = match unit.trim() {
                "" => Some(0),
                "KiB" => Some(10),
                "MiB" => Some(20),
                "GiB" => Some(30),
                _ => None,
            };
            shift.and_then(|s| {
                digits
                    .parse::<usize>()
                    .ok()
                    .and_then(|n| n.checked_mul(1 << s))
            })
        }
    };
    match parsed {
        Some(n) if (MIN_MAX_EVENT_BYTES..=MAX_MAX_EVENT_BYTES).contains(&n) => n,
        Some(_) => {
            errors.push(format!(
                "max_event_bytes: between {MIN_MAX_EVENT_BYTES} (4KiB) and {MAX_MAX_EVENT_BYTES} (256MiB)"
            ));
            DEFAULT_MAX_EVENT_BYTES
        }
        None => {
            errors.push(
                "max_event_bytes: not a size such as 16777216 or \"16MiB\" (KiB, MiB, GiB)".into(),
            );
            DEFAULT_MAX_EVENT_BYTES
        }
    }
}

/// The Lease settings with their in-pod defaults filled in: the API server
/// from `KUBERNETES_SERVICE_HOST`/`_PORT`, the namespace, token and CA from
/// the mounted service account (`sa_dir`).
fn lease_config(
    setting: &str,
    raw: RawLease,
    secret: &str,
    namespace: Option<&str>,
    env: &dyn Fn(&str) -> Option<String>,
    sa_dir: &Path,
    errors: &mut Vec<String>,
) -> crate::kube_lease::LeaseConfig {
    let in_pod = |f: &str| Some(sa_dir.join(f)).filter(|p| p.exists());
    let api_server = raw.api_server.or_else(|| {
        let host = env("KUBERNETES_SERVICE_HOST")?;
        let port = env("KUBERNETES_SERVICE_PORT").unwrap_or_else(|| "443".into());
        Some(if host.contains(':') {
            format!("https://[{host}]:{port}")
        } else {
            format!("https://{host}:{port}")
        })
    });
    let api_server = api_server.unwrap_or_else(|| {
        errors.push(format!(
            "{setting}.lease.api_server: not in a pod (KUBERNETES_SERVICE_HOST is unset); give the API server's address"
        ));
        String::new()
    });
    let namespace = raw
        .namespace
        .or_else(|| {
            std::fs::read_to_string(in_pod("namespace")?)
                .ok()
                .map(|n| n.trim().to_string())
        })
        .or_else(|| namespace.map(str::to_string))
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| {
            errors.push(format!(
                "{setting}.lease.namespace: no service account namespace is mounted; give one"
            ));
            String::new()
        });
    let name = raw
        .name
        .unwrap_or_else(|| crate::kube_lease::default_name(secret));
    let duration = parse_duration(
        &format!("{setting}.lease.duration"),
        raw.duration.as_deref(),
        Duration::from_secs(15),
        errors,
    );
    if duration < Duration::from_secs(1) {
        errors.push(format!("{setting}.lease.duration: at least 1s"));
    } else if duration.subsec_nanos() != 0 {
        errors.push(format!(
            "{setting}.lease.duration: whole seconds (a Lease counts in seconds)"
        ));
    }
    // The pod's token goes only to an https API server; over http (kubectl
    // proxy) the proxy authenticates.
    let token_file = raw.token_file.or_else(|| {
        api_server
            .starts_with("https://")
            .then(|| in_pod("token"))
            .flatten()
    });
    if let Some(t) = &token_file
        && let Err(e) = std::fs::metadata(t)
    {
        errors.push(format!(
            "{setting}.lease.token_file: cannot read {}: {e}",
            t.display()
        ));
    }
    let lease = crate::kube_lease::LeaseConfig {
        api_server,
        namespace,
        name,
        duration,
        token_file,
        ca_file: raw.ca_file.or_else(|| in_pod("ca.crt")),
    };
    if !lease.api_server.is_empty()
        && let Err(e) = crate::kube_lease::check(&lease)
    {
        errors.push(format!("{setting}.lease: {e}"));
    }
    lease
}

/// Placeholders named in a template (`{{ name }}`). Used at start-up and
/// by every render.
///
/// # Errors
/// [`Error::TemplateUnclosed`] or [`Error::TemplateName`].
pub fn template_fields(t: &str) -> Result<Vec<String>, Error> {
    let mut out = Vec::new();
    let mut rest = t;
    while let Some(i) = rest.find("{{") {
        let after = &rest[i + 2..];
        let j = after.find("}}").ok_or(Error::TemplateUnclosed)?;
        let name = after[..j].trim();
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(Error::TemplateName {
                name: name.to_string(),
            });
        }
        out.push(name.to_string());
        rest = &after[j + 2..];
    }
    Ok(out)
}

fn env_name_for(id: &str) -> String {
    id.rsplit('/')
        .next()
        .unwrap_or(id)
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect()
}

/// Checks that a directory exists and that this process can create files
/// in it.
fn check_writable(dir: &Path) -> Result<(), String> {
    let probe = dir.join(format!(".rekey-probe-{}", std::process::id()));
    std::fs::write(&probe, b"")
        .and_then(|_| std::fs::remove_file(&probe))
        .map_err(|e| format!("cannot write in {}: {e}", dir.display()))
}

/// Refuses `dir` (where an output is created) when it or a directory on
/// the way to it is a symlink, unless `dirs` allows that. Returns whether
/// the directory may be used (and so probed for writing).
fn check_symlinks(setting: &str, dir: &Path, dirs: Dirs, errors: &mut Vec<String>) -> bool {
    if dirs == Dirs::FollowSymlinks {
        return true;
    }
    match crate::write::first_symlink(dir) {
        Ok(None) => true,
        Ok(Some(link)) => {
            let target = std::fs::read_link(&link)
                .map(|t| format!(" (to {})", t.display()))
                .unwrap_or_default();
            let real = std::fs::canonicalize(dir)
                .map(|r| format!("give the real directory, {}, or ", r.display()))
                .unwrap_or_default();
            errors.push(format!(
                "{setting}: {} is a symlink{target}; whoever can change it decides where the secret goes. {real}set allow_symlinked_dirs = true if only trusted parties can change it",
                link.display()
            ));
            false
        }
        Err(e) => {
            errors.push(format!("{setting}: cannot examine {}: {e}", dir.display()));
            false
        }
    }
}

/// Where an output goes: `(path, directory)` from the `path`, `directory`
/// and `keyring_path` settings, each directory checked for symlinks and
/// for being writable.
fn output_paths(
    setting: &str,
    id: &str,
    raw_path: Option<PathBuf>,
    raw_directory: Option<PathBuf>,
    keyring_path: Option<&Path>,
    dirs: Dirs,
    errors: &mut Vec<String>,
) -> (PathBuf, Option<PathBuf>) {
    let (path, directory) = match (raw_path, raw_directory) {
        (Some(p), Some(d)) => {
            if p.components().count() != 1 {
                errors.push(format!(
                    "{setting}.path: with directory, path is a file name"
                ));
            }
            (d.join(&p), Some(d))
        }
        (Some(p), None) => (p, None),
        (None, _) => {
            errors.push(format!("{setting}.path: where to write {id}"));
            (PathBuf::new(), None)
        }
    };
    let dir = directory
        .clone()
        .or_else(|| path.parent().map(Path::to_path_buf))
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or_else(|| PathBuf::from("."));
    // Symlinks first: the writability probe must not go through one.
    let dir_setting = if directory.is_some() {
        format!("{setting}.directory")
    } else {
        format!("{setting}.path")
    };
    if !path.as_os_str().is_empty()
        && check_symlinks(&dir_setting, &dir, dirs, errors)
        && let Err(e) = check_writable(&dir)
    {
        errors.push(format!("{setting}.path: {e}"));
    }
    if let Some(k) = keyring_path {
        let kd = k
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let setting = format!("{setting}.keyring_path");
        if check_symlinks(&setting, kd, dirs, errors)
            && let Err(e) = check_writable(kd)
        {
            errors.push(format!("{setting}: {e}"));
        }
    }
    (path, directory)
}

/// The `validate` setting of an output and its timeout (default 5s).
fn validation(
    setting: &str,
    raw: Option<RawValidate>,
    errors: &mut Vec<String>,
) -> (Validate, Duration) {
    match raw {
        None => (Validate::None, Duration::from_secs(5)),
        Some(v) => {
            let t = parse_duration(
                &format!("{setting}.validate.timeout"),
                v.timeout.as_deref(),
                Duration::from_secs(5),
                errors,
            );
            let tls = rekey_probe::tls::TlsFiles {
                ca_file: v.tls_ca_file,
                cert_file: v.tls_cert_file,
                key_file: v.tls_key_file,
                server_name: v.tls_server_name,
            };
            if v.kind != "redis" && tls != rekey_probe::tls::TlsFiles::default() {
                errors.push(format!(
                    "{setting}.validate.tls_*: TLS files are for kind = \"redis\" (a Postgres URL carries its own sslrootcert)"
                ));
            }
            let k = match (v.kind.as_str(), v.url) {
                ("none", _) => Validate::None,
                ("postgres", _) => Validate::Postgres,
                ("redis", _) => {
                    // Read once here so a missing file stops the start.
                    if tls != rekey_probe::tls::TlsFiles::default()
                        && let Err(e) =
                            rekey_probe::tls::Tls::new(rekey_probe::Service::Redis, &tls)
                    {
                        errors.push(format!("{setting}.validate: {e}"));
                    }
                    Validate::Redis(tls)
                }
                ("http", Some(u)) if u.starts_with("http://") => Validate::Http(u),
                ("http", _) => {
                    errors.push(format!(
                        "{setting}.validate.url: http validation needs an http:// URL"
                    ));
                    Validate::None
                }
                (other, _) => {
                    errors.push(format!(
                        "{setting}.validate.kind: unknown validation {other:?} (expected none, postgres, redis or http)"
                    ));
                    Validate::None
                }
            };
            (k, t)
        }
    }
}

fn output(
    setting: &str,
    id: &str,
    raw: RawOutput,
    reload_names: &BTreeSet<String>,
    dirs: Dirs,
    errors: &mut Vec<String>,
) -> Output {
    let format = match (raw.format.as_deref(), raw.template) {
        (Some("template") | None, Some(t)) => {
            if let Err(e) = template_fields(&t) {
                errors.push(format!("{setting}.template: {e}"));
            }
            Format::Template(t)
        }
        (Some("template"), None) => {
            errors.push(format!(
                "{setting}.template: format template needs a template"
            ));
            Format::Raw
        }
        (None | Some("raw"), None) => Format::Raw,
        (Some("json"), None) => Format::Json,
        (Some("env"), None) => Format::Env,
        (Some(f), _) => {
            errors.push(format!(
                "{setting}.format: unknown format {f:?} (expected raw, json, env or template)"
            ));
            Format::Raw
        }
    };
    let (path, directory) = output_paths(
        setting,
        id,
        raw.path,
        raw.directory,
        raw.keyring_path.as_deref(),
        dirs,
        errors,
    );
    let mode = match raw.mode.as_deref() {
        None => 0o400,
        Some(m) => u32::from_str_radix(m.trim_start_matches("0o"), 8)
            .ok()
            .filter(|m| *m <= 0o777)
            .unwrap_or_else(|| {
                errors.push(format!(
                    "{setting}.mode: {m:?} is not an octal mode such as 0400"
                ));
                0o400
            }),
    };
    let owner = raw.owner.as_deref().and_then(|o| {
        let parsed = o
            .split_once(':')
            .and_then(|(u, g)| Some((u.parse().ok()?, g.parse().ok()?)));
        if parsed.is_none() {
            errors.push(format!(
                "{setting}.owner: {o:?} is not numeric UID:GID such as 1000:1000"
            ));
        }
        parsed
    });
    let (validate, validate_timeout) = validation(setting, raw.validate, errors);
    for r in &raw.reload {
        if !reload_names.contains(r) {
            errors.push(format!(
                "{setting}.reload: no [[reload]] action is named {r:?}"
            ));
        }
    }
    Output {
        path,
        directory,
        format,
        env_name: raw.env_name.unwrap_or_else(|| env_name_for(id)),
        mode,
        owner,
        keyring_path: raw.keyring_path,
        validate,
        validate_timeout,
        reload: raw.reload,
        dirs,
    }
}

impl Config {
    /// Reads the file (if any), applies `REKEY_*` from `env`, then flags,
    /// and validates everything.
    ///
    /// # Errors
    /// Every problem found, listed together.
    pub fn load(
        path: Option<&Path>,
        flags: Flags,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigErrors> {
        match Self::load_all(path, flags, env) {
            Ok(cfg) => Ok(cfg),
            Err(invalid) => Err(invalid.errors),
        }
    }

    /// As [`Config::load`], but an invalid configuration that could still
    /// be read keeps what was made of it, so that the backend side can be
    /// checked as well and every problem reported at once.
    ///
    /// # Errors
    /// Every problem found, with the partial configuration when the file
    /// could be read and parsed.
    pub fn load_all(
        path: Option<&Path>,
        flags: Flags,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, Invalid> {
        let early = |errors: Vec<String>| Invalid {
            errors: ConfigErrors(errors),
            partial: None,
            sound_outputs: BTreeSet::new(),
        };
        let text = match path {
            Some(p) => std::fs::read_to_string(p).map_err(|e| {
                early(vec![format!(
                    "cannot read config file {}: {e}",
                    p.display()
                )])
            })?,
            None => String::new(),
        };
        let mut table: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| early(vec![format!("config file: {e}")]))?;
        let mut host = None;
        let mut kube = BTreeMap::new();
        for (k, v) in env {
            if k == "HOSTNAME" {
                host = Some(v.clone());
            }
            if k.starts_with("KUBERNETES_SERVICE_") {
                kube.insert(k.clone(), v.clone());
            }
            if let Some((_, key)) = ENV.iter().find(|(n, _)| *n == k) {
                table.insert(key.to_string(), toml::Value::String(v));
            }
        }
        let mut raw: RawConfig = toml::Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| early(vec![format!("config: {}", e.message())]))?;
        let mut errors = Vec::new();
        if flags.backend.is_some() {
            raw.backend = flags.backend;
        }
        if flags.token_file.is_some() {
            raw.token_file = flags.token_file;
        }
        if flags.api_token_file.is_some() {
            raw.api_token_file = flags.api_token_file;
        }
        if flags.listen.is_some() {
            raw.listen = flags.listen;
        }
        for s in &flags.secrets {
            match parse_secret_flag(s) {
                Ok(f) => raw.secrets.push(RawSecret {
                    id: f.id,
                    out: RawOutput {
                        path: Some(f.path),
                        format: f.format,
                        env_name: f.env_name,
                        ..Default::default()
                    },
                }),
                Err(e) => errors.push(e),
            }
        }
        let mut sound = BTreeSet::new();
        let cfg = validate(
            raw,
            host,
            &|k| kube.get(k).cloned(),
            &mut errors,
            &mut sound,
        );
        if errors.is_empty() {
            Ok(cfg)
        } else {
            Err(Invalid {
                errors: ConfigErrors(errors),
                partial: Some(Box::new(cfg)),
                sound_outputs: sound,
            })
        }
    }
}

fn read_token_file(setting: &str, p: &Path, errors: &mut Vec<String>) {
    match std::fs::read_to_string(p) {
        Ok(t) if t.trim().is_empty() => errors.push(format!("{setting}: {} is empty", p.display())),
        Ok(_) => {}
        Err(e) => errors.push(format!("{setting}: cannot read {}: {e}", p.display())),
    }
}

/// `kube_env` looks up `KUBERNETES_SERVICE_*` variables.
fn validate(
    raw: RawConfig,
    host: Option<String>,
    kube_env: &dyn Fn(&str) -> Option<String>,
    errors: &mut Vec<String>,
    sound_outputs: &mut BTreeSet<String>,
) -> Config {
    let backend = raw.backend.unwrap_or_else(|| DEFAULT_BACKEND.into());
    if !(backend.starts_with("http://") || backend.starts_with("https://")) {
        errors.push(format!(
            "backend: {backend:?} is not a URL such as http://rekey-backend:7700"
        ));
    }
    if let Some(p) = &raw.token_file {
        read_token_file("token_file", p, errors);
    }
    if let Some(p) = &raw.api_token_file {
        read_token_file("api_token_file", p, errors);
    }
    let listen_s = raw.listen.unwrap_or_else(|| DEFAULT_LISTEN.into());
    let listen = listen_s.parse().unwrap_or_else(|_| {
        errors.push(format!(
            "listen: {listen_s:?} is not an address such as 127.0.0.1:2773"
        ));
        ([127, 0, 0, 1], 2773).into()
    });

    let mut reload_names = BTreeSet::new();
    let mut reloads = Vec::new();
    for (i, r) in raw.reload.into_iter().enumerate() {
        let setting = format!("reload[{i}]");
        if !reload_names.insert(r.name.clone()) {
            errors.push(format!("{setting}.name: {:?} is used twice", r.name));
        }
        let timeout = parse_duration(
            &format!("{setting}.timeout"),
            r.timeout.as_deref(),
            Duration::from_secs(10),
            errors,
        );
        let kind = match (r.signal, r.http_post, r.command) {
            (Some(sig), None, None) => {
                let parsed = parse_signal(&sig);
                if parsed.is_none() {
                    errors.push(format!(
                        "{setting}.signal: unknown signal {sig:?} (expected HUP, USR1, USR2, TERM, INT, QUIT or WINCH)"
                    ));
                }
                if r.pid_file.is_none() == r.process_name.is_none() {
                    errors.push(format!(
                        "{setting}: a signal needs exactly one of pid_file or process_name"
                    ));
                }
                ReloadKind::Signal {
                    signal: parsed.unwrap_or(rustix::process::Signal::HUP),
                    name: sig,
                    pid_file: r.pid_file,
                    process_name: r.process_name,
                }
            }
            (None, Some(url), None) => {
                if !url.starts_with("http://") {
                    errors.push(format!(
                        "{setting}.http_post: {url:?} is not an http:// URL"
                    ));
                }
                ReloadKind::HttpPost(url)
            }
            (None, None, Some(cmd)) => {
                if cmd.is_empty() {
                    errors.push(format!("{setting}.command: name the program to run"));
                }
                ReloadKind::Command(cmd)
            }
            _ => {
                errors.push(format!(
                    "{setting}: give exactly one of signal, http_post or command"
                ));
                ReloadKind::Command(vec![])
            }
        };
        reloads.push(Reload {
            name: r.name,
            kind,
            timeout,
        });
    }

    let dirs = if raw.allow_symlinked_dirs.unwrap_or(false) {
        Dirs::FollowSymlinks
    } else {
        Dirs::NoSymlinks
    };
    let mut ids = BTreeSet::new();
    let mut secrets = Vec::new();
    for (i, s) in raw.secrets.into_iter().enumerate() {
        let setting = format!("secrets[{i}] ({})", s.id);
        if s.id.is_empty() {
            errors.push(format!("secrets[{i}].id: must not be empty"));
        }
        if !ids.insert(s.id.clone()) {
            errors.push(format!("{setting}: the secret is listed twice"));
        }
        let before = errors.len();
        let out = output(&setting, &s.id, s.out, &reload_names, dirs, errors);
        if errors.len() == before {
            sound_outputs.insert(s.id.clone());
        }
        secrets.push(SecretConfig { out, id: s.id });
    }
    let mut file_sources = Vec::new();
    for (i, f) in raw.file_sources.into_iter().enumerate() {
        let setting = format!("file_sources[{i}] ({})", f.id);
        if !ids.insert(f.id.clone()) {
            errors.push(format!("{setting}: the id is used twice"));
        }
        if f.source.parent().is_none_or(|p| !p.exists()) {
            errors.push(format!(
                "{setting}.source: the directory of {} does not exist",
                f.source.display()
            ));
        }
        file_sources.push(FileSource {
            out: output(&setting, &f.id, f.out, &reload_names, dirs, errors),
            id: f.id,
            source: f.source,
        });
    }
    let mut reencrypt = Vec::new();
    let mut lease_names = BTreeMap::new();
    for (i, r) in raw.reencrypt.into_iter().enumerate() {
        let setting = format!("reencrypt[{i}] ({})", r.secret);
        if !secrets.iter().any(|s| s.id == r.secret) {
            errors.push(format!(
                "{setting}.secret: list it in [[secrets]] too (the sidecar needs the keys)"
            ));
        }
        if let Err(e) = std::fs::read_to_string(&r.database_url_file) {
            errors.push(format!(
                "{setting}.database_url_file: cannot read {}: {e}",
                r.database_url_file.display()
            ));
        }
        let mut columns = match r.preset.as_deref() {
            Some("hyvve") => rekey_reencrypt::hyvve_preset(),
            Some(other) => {
                errors.push(format!(
                    "{setting}.preset: unknown preset {other:?} (expected hyvve)"
                ));
                vec![]
            }
            None => vec![],
        };
        for c in r.columns {
            let codec = match c.codec.as_deref().unwrap_or("hyvve").parse() {
                Ok(k) => k,
                Err(e) => {
                    errors.push(format!("{setting}.columns: {e}"));
                    rekey_reencrypt::Codec::Hyvve
                }
            };
            columns.push(rekey_reencrypt::Column {
                table: c.table,
                column: c.column,
                id_column: c.id_column.unwrap_or_else(|| "id".into()),
                codec,
            });
        }
        if columns.is_empty() {
            errors.push(format!("{setting}: give preset = \"hyvve\" or columns"));
        }
        let batch_size = r.batch_size.unwrap_or(200);
        if batch_size == 0 || batch_size > 10_000 {
            errors.push(format!("{setting}.batch_size: between 1 and 10000"));
        }
        let election = match r.leader_election.as_deref() {
            None | Some("advisory-lock") => {
                if r.lease.is_some() {
                    errors.push(format!(
                        "{setting}.lease: set leader_election = \"kubernetes-lease\" to use it"
                    ));
                }
                Election::AdvisoryLock
            }
            Some("kubernetes-lease") => Election::KubernetesLease(lease_config(
                &setting,
                r.lease.unwrap_or_default(),
                &r.secret,
                raw.namespace.as_deref(),
                kube_env,
                Path::new(crate::kube_lease::SERVICE_ACCOUNT_DIR),
                errors,
            )),
            Some(other) => {
                errors.push(format!(
                    "{setting}.leader_election: unknown {other:?} (expected advisory-lock or kubernetes-lease)"
                ));
                Election::AdvisoryLock
            }
        };
        if let Election::KubernetesLease(l) = &election
            && let Some(first) =
                lease_names.insert((l.namespace.clone(), l.name.clone()), setting.clone())
        {
            errors.push(format!(
                "{setting}.lease.name: {}/{} is already the Lease of {first}; one Lease elects one task",
                l.namespace, l.name
            ));
        }
        reencrypt.push(ReencryptConfig {
            election,
            poll: parse_duration(
                &format!("{setting}.poll"),
                r.poll.as_deref(),
                Duration::from_secs(1),
                errors,
            ),
            secret: r.secret,
            database_url_file: r.database_url_file,
            columns,
            batch_size,
        });
    }
    if secrets.is_empty() && file_sources.is_empty() {
        errors
            .push("no secrets: give --secret ID:PATH[:FORMAT] or [[secrets]] in the config".into());
    }
    if !secrets.is_empty() && raw.token_file.is_none() {
        errors.push(
            "token_file: the sidecar needs a token to read from the backend (--token-file)".into(),
        );
    }
    let consumer_id = raw
        .consumer_id
        .or(host)
        .unwrap_or_else(|| format!("sidecar-{}", std::process::id()));
    Config {
        backend,
        token_file: raw.token_file,
        listen,
        api_token_file: raw.api_token_file,
        pod: raw.pod.unwrap_or_else(|| consumer_id.clone()),
        namespace: raw.namespace.unwrap_or_default(),
        consumer_id,
        report_interval: parse_duration(
            "report_interval",
            raw.report_interval.as_deref(),
            Duration::from_secs(30),
            errors,
        ),
        report_spread: parse_duration(
            "report_spread",
            raw.report_spread.as_deref(),
            DEFAULT_REPORT_SPREAD,
            errors,
        ),
        debounce: parse_duration(
            "debounce",
            raw.debounce.as_deref(),
            Duration::from_millis(100),
            errors,
        ),
        backoff_max: parse_duration(
            "backoff_max",
            raw.backoff_max.as_deref(),
            Duration::from_secs(30),
            errors,
        ),
        max_event_bytes: parse_event_size(raw.max_event_bytes.as_ref(), errors),
        secrets,
        file_sources,
        reloads,
        reencrypt,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn tmp() -> PathBuf {
        let d =
            std::env::temp_dir().join(format!("rekey-sc-cfg-{}-{}", std::process::id(), rand()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }
    fn rand() -> u64 {
        let b = rekey_keyring::random_bytes(8).unwrap();
        u64::from_le_bytes(b.expose().try_into().unwrap())
    }

    #[test]
    fn flags_alone_make_a_config() {
        let d = tmp();
        let tok = d.join("token");
        std::fs::write(&tok, "t").unwrap();
        let out = d.join("db.json");
        let c = Config::load(
            None,
            Flags {
                backend: Some("http://b:7700".into()),
                token_file: Some(tok),
                secrets: vec![
                    format!("prod/db:{}:json", out.display()),
                    format!("prod/jwt:{}", d.join("jwt").display()),
                ],
                ..Default::default()
            },
            vec![("HOSTNAME".into(), "api-7d9f".into())],
        )
        .unwrap();
        assert_eq!(c.secrets.len(), 2);
        assert_eq!(c.secrets[0].out.format, Format::Json);
        assert_eq!(c.secrets[1].out.format, Format::Raw);
        assert_eq!(c.secrets[1].out.mode, 0o400);
        assert_eq!(c.consumer_id, "api-7d9f");
        assert_eq!(c.listen.to_string(), "127.0.0.1:2773");
        assert_eq!(c.report_spread, DEFAULT_REPORT_SPREAD);
    }

    #[test]
    fn report_spread_is_a_duration_from_the_environment_or_the_file() {
        let d = tmp();
        let tok = d.join("token");
        std::fs::write(&tok, "t").unwrap();
        let flags = || Flags {
            backend: Some("http://b:7700".into()),
            token_file: Some(tok.clone()),
            secrets: vec![format!("prod/jwt:{}", d.join("jwt").display())],
            ..Default::default()
        };
        let c = Config::load(
            None,
            flags(),
            vec![("REKEY_REPORT_SPREAD".into(), "0s".into())],
        )
        .unwrap();
        assert_eq!(c.report_spread, Duration::ZERO);
        let p = d.join("c.toml");
        std::fs::write(&p, "report_spread = \"250ms\"\n").unwrap();
        let c = Config::load(Some(&p), flags(), vec![]).unwrap();
        assert_eq!(c.report_spread, Duration::from_millis(250));
        let e = Config::load(
            None,
            flags(),
            vec![("REKEY_REPORT_SPREAD".into(), "soon".into())],
        )
        .unwrap_err();
        assert!(e.to_string().contains("report_spread: \"soon\""), "{e}");
    }

    #[test]
    fn every_problem_is_listed() {
        let d = tmp();
        let text = format!(
            r#"
token_file = "{missing}"
[[secrets]]
id = "prod/db"
path = "/nonexistent-dir/db"
template = "postgres://{{{{username}}:{{{{password}}}}@h"
reload = ["nope"]
[[reload]]
name = "app"
signal = "SIGFOO"
pid_file = "/run/app.pid"
"#,
            missing = d.join("missing-token").display()
        );
        let p = d.join("c.toml");
        std::fs::write(&p, text).unwrap();
        let e = Config::load(
            Some(&p),
            Flags {
                secrets: vec!["bad".into()],
                ..Default::default()
            },
            vec![],
        )
        .unwrap_err();
        let s = e.to_string();
        for needle in [
            "token_file: cannot read",
            "cannot write in /nonexistent-dir",
            "template",
            "SIGFOO",
            "\"nope\"",
            "--secret \"bad\"",
        ] {
            assert!(s.contains(needle), "missing {needle:?} in {s}");
        }
    }

    #[test]
    fn max_event_bytes_takes_bytes_or_units_and_is_bounded() {
        let size = |v: Option<RawSize>| {
            let mut errors = vec![];
            let n = parse_event_size(v.as_ref(), &mut errors);
            (n, errors)
        };
        assert_eq!(size(None), (16 << 20, vec![]));
        assert_eq!(size(Some(RawSize::Bytes(65_536))), (65_536, vec![]));
        assert_eq!(
            size(Some(RawSize::Text("32MiB".into()))),
            (32 << 20, vec![])
        );
        assert_eq!(
            size(Some(RawSize::Text(" 64 KiB".into()))),
            (64 << 10, vec![])
        );
        assert_eq!(size(Some(RawSize::Text("20000".into()))), (20_000, vec![]));
        for bad in ["16MB", "lots", "-1", ""] {
            let (_, e) = size(Some(RawSize::Text(bad.into())));
            assert!(
                e[0].starts_with("max_event_bytes: not a size"),
                "{bad}: {e:?}"
            );
        }
        for out_of_range in [RawSize::Bytes(1000), RawSize::Text("1GiB".into())] {
            let (_, e) = size(Some(out_of_range));
            assert!(e[0].starts_with("max_event_bytes: between 4096"), "{e:?}");
        }

        // From the environment, where every value is text.
        let d = tmp();
        let tok = d.join("token");
        std::fs::write(&tok, "t").unwrap();
        let c = Config::load(
            None,
            Flags {
                token_file: Some(tok),
                secrets: vec![format!("prod/a:{}", d.join("a").display())],
                ..Default::default()
            },
            vec![("REKEY_MAX_EVENT_BYTES".into(), "8MiB".into())],
        )
        .unwrap();
        assert_eq!(c.max_event_bytes, 8 << 20);
    }

    #[test]
    fn a_symlinked_output_directory_is_refused_unless_allowed() {
        let d = tmp();
        let tok = d.join("token");
        std::fs::write(&tok, "t").unwrap();
        let real = d.join("real");
        std::fs::create_dir_all(real.join("keys")).unwrap();
        std::os::unix::fs::symlink(&real, d.join("link")).unwrap();
        let load = |extra: &str| {
            let p = d.join("c.toml");
            std::fs::write(
                &p,
                format!(
                    "token_file = \"{tok}\"\n{extra}\n[[secrets]]\nid = \"a\"\npath = \"{link}/a\"\n\
                     [[secrets]]\nid = \"b\"\ndirectory = \"{link}/keys\"\npath = \"b\"\n\
                     [[secrets]]\nid = \"c\"\npath = \"{real}/c\"\nkeyring_path = \"{link}/keys/c.json\"\n",
                    tok = tok.display(),
                    link = d.join("link").display(),
                    real = real.display(),
                ),
            )
            .unwrap();
            Config::load(Some(&p), Flags::default(), vec![])
        };
        let e = load("").unwrap_err().to_string();
        let link = d.join("link");
        for setting in [
            "secrets[0] (a).path",
            "secrets[1] (b).directory",
            "secrets[2] (c).keyring_path",
        ] {
            assert!(
                e.contains(&format!(
                    "{setting}: {} is a symlink (to {}); whoever can change it decides where the secret goes. give the real directory, {}",
                    link.display(),
                    real.display(),
                    real.display()
                )),
                "{setting}: {e}"
            );
        }
        assert!(e.contains("set allow_symlinked_dirs = true"), "{e}");
        assert_eq!(e.matches("is a symlink").count(), 3, "{e}");
        // Nothing was written through the link while checking.
        assert_eq!(std::fs::read_dir(&real).unwrap().count(), 1, "only keys/");

        let c = load("allow_symlinked_dirs = true").unwrap();
        assert!(c.secrets.iter().all(|s| s.out.dirs == Dirs::FollowSymlinks));
    }

    #[test]
    fn template_placeholders() {
        assert_eq!(template_fields("a{{x}}b{{ y_1 }}").unwrap(), ["x", "y_1"]);
        assert!(template_fields("{{x").is_err());
        assert!(template_fields("{{a b}}").is_err());
        assert_eq!(env_name_for("prod/api/jwt-secret"), "JWT_SECRET");
        assert!(parse_signal("SIGHUP").is_some());
        assert!(parse_signal("usr1").is_some());
        assert!(parse_signal("SIGFOO").is_none());
    }

    #[test]
    fn a_secret_flag_can_name_its_environment_variable() {
        let f = parse_secret_flag("prod/api/database:/etc/app/db.env:env=DATABASE_URL").unwrap();
        assert_eq!(
            (f.format.as_deref(), f.env_name.as_deref()),
            (Some("env"), Some("DATABASE_URL"))
        );
        let f = parse_secret_flag("prod/api/database:/etc/app/db.env:env").unwrap();
        assert_eq!((f.format.as_deref(), f.env_name), (Some("env"), None));
        let e = parse_secret_flag("a:/b:env=1BAD").err().unwrap();
        assert!(e.contains("not an environment variable name"), "{e}");
    }

    fn lease(
        raw: RawLease,
        env: &[(&str, &str)],
        sa_dir: &Path,
    ) -> (crate::kube_lease::LeaseConfig, Vec<String>) {
        let mut errors = vec![];
        let env: BTreeMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let c = lease_config(
            "reencrypt[0] (k)",
            raw,
            "prod/enc/master",
            Some("from-config"),
            &|k| env.get(k).cloned(),
            sa_dir,
            &mut errors,
        );
        (c, errors)
    }

    #[test]
    fn a_lease_takes_its_defaults_from_the_pod() {
        let sa = tmp();
        std::fs::write(sa.join("namespace"), "payments\n").unwrap();
        std::fs::write(sa.join("token"), "t").unwrap();
        let (c, errors) = lease(
            RawLease::default(),
            &[
                ("KUBERNETES_SERVICE_HOST", "10.96.0.1"),
                ("KUBERNETES_SERVICE_PORT", "443"),
            ],
            &sa,
        );
        assert_eq!(c.api_server, "https://10.96.0.1:443");
        assert_eq!(c.namespace, "payments");
        assert_eq!(c.token_file, Some(sa.join("token")));
        assert_eq!(c.duration, Duration::from_secs(15));
        assert_eq!(c.name, crate::kube_lease::default_name("prod/enc/master"));
        // No ca.crt mounted: an https API server cannot be trusted.
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(errors[0].contains("ca_file"), "{errors:?}");

        let (c, _) = lease(
            RawLease::default(),
            &[("KUBERNETES_SERVICE_HOST", "fd00::1")],
            &sa,
        );
        assert_eq!(c.api_server, "https://[fd00::1]:443");

        // Over http (kubectl proxy) the pod's token is not sent.
        let (c, errors) = lease(
            RawLease {
                api_server: Some("http://127.0.0.1:8001".into()),
                ..Default::default()
            },
            &[],
            &sa,
        );
        assert_eq!(c.token_file, None);
        assert!(errors.is_empty(), "{errors:?}");
    }

    #[test]
    fn a_lease_outside_a_pod_names_what_is_missing() {
        let empty = tmp();
        let (c, errors) = lease(
            RawLease {
                api_server: Some("http://127.0.0.1:8001".into()),
                duration: Some("500ms".into()),
                token_file: Some(empty.join("missing")),
                ..Default::default()
            },
            &[],
            &empty,
        );
        assert_eq!(c.namespace, "from-config");
        let all = errors.join("\n");
        assert!(all.contains("lease.duration: at least 1s"), "{all}");
        let refused = |raw: RawLease, needle: &str| {
            let (_, errors) = lease(raw, &[], &empty);
            assert!(
                errors.iter().any(|e| e.contains(needle)),
                "{needle}: {errors:?}"
            );
        };
        refused(
            RawLease {
                api_server: Some("http://127.0.0.1:8001".into()),
                duration: Some("1500ms".into()),
                ..Default::default()
            },
            "lease.duration: whole seconds",
        );
        refused(
            RawLease {
                api_server: Some("https://fd00::1:443".into()),
                ..Default::default()
            },
            "IPv6 address in brackets",
        );
        refused(
            RawLease {
                api_server: Some("http://10.0.0.5:8001".into()),
                token_file: Some(empty.join("missing")),
                ..Default::default()
            },
            "a token is sent only over https",
        );
        assert!(all.contains("lease.token_file: cannot read"), "{all}");
        let (_, errors) = lease(RawLease::default(), &[], &empty);
        assert!(
            errors
                .iter()
                .any(|e| e.contains("lease.api_server: not in a pod")),
            "{errors:?}"
        );
    }

    #[test]
    fn leader_election_is_checked() {
        let d = tmp();
        let tok = d.join("token");
        std::fs::write(&tok, "t").unwrap();
        let url = d.join("db");
        std::fs::write(&url, "postgres://x/y").unwrap();
        let base = format!(
            r#"
token_file = "{}"
[[secrets]]
id = "k"
path = "{}"
[[reencrypt]]
secret = "k"
database_url_file = "{}"
preset = "hyvve"
"#,
            tok.display(),
            d.join("k").display(),
            url.display()
        );
        let load = |extra: &str| {
            let p = d.join("c.toml");
            std::fs::write(&p, format!("{base}{extra}")).unwrap();
            Config::load(Some(&p), Flags::default(), vec![])
        };
        assert_eq!(
            load("").unwrap().reencrypt[0].election,
            Election::AdvisoryLock
        );
        let e = load("leader_election = \"zookeeper\"\n").unwrap_err();
        assert!(e.to_string().contains("unknown \"zookeeper\""), "{e}");
        let e = load("[reencrypt.lease]\nname = \"x\"\n").unwrap_err();
        assert!(
            e.to_string()
                .contains("set leader_election = \"kubernetes-lease\""),
            "{e}"
        );
        let c = load(
            "leader_election = \"kubernetes-lease\"\n[reencrypt.lease]\napi_server = \"http://127.0.0.1:8001\"\nnamespace = \"ns\"\n",
        )
        .unwrap();
        let Election::KubernetesLease(l) = &c.reencrypt[0].election else {
            panic!("not a lease: {:?}", c.reencrypt[0].election);
        };
        assert_eq!(l.namespace, "ns");
        assert_eq!(l.api_server, "http://127.0.0.1:8001");

        // Two tasks on one Lease would elect one leader for both.
        let twice = format!(
            "leader_election = \"kubernetes-lease\"\n[reencrypt.lease]\napi_server = \"http://127.0.0.1:8001\"\nnamespace = \"ns\"\nname = \"one\"\n\
             [[reencrypt]]\nsecret = \"k\"\ndatabase_url_file = \"{}\"\npreset = \"hyvve\"\nleader_election = \"kubernetes-lease\"\n\
             [reencrypt.lease]\napi_server = \"http://127.0.0.1:8001\"\nnamespace = \"ns\"\nname = \"one\"\n",
            url.display()
        );
        let e = load(&twice).unwrap_err().to_string();
        assert!(
            e.contains(
                "reencrypt[1] (k).lease.name: ns/one is already the Lease of reencrypt[0] (k)"
            ),
            "{e}"
        );
    }
}
