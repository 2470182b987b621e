//! `[[providers]]`: the places a secret's values may live besides rekey's
//! embedded store. Each entry has a `name` secrets refer to it by, a
//! `type`, and that type's settings; every problem is listed with the
//! entry it is in.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

/// A validated `[[providers]]` entry.
#[derive(Debug, Clone)]
pub enum ProviderConfig {
    Vault(VaultConfig),
    Aws(AwsConfig),
}

impl ProviderConfig {
    /// The name secrets refer to it by.
    #[must_use]
    pub fn name(&self) -> &str {
        match self {
            ProviderConfig::Vault(v) => &v.name,
            ProviderConfig::Aws(a) => &a.name,
        }
    }
}

/// How rekey logs in to Vault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VaultAuth {
    /// A token read from a file, read again whenever the file changes
    /// (a Vault Agent sink, a mounted Kubernetes secret).
    Token { token_file: PathBuf },
    /// AppRole: a role id and a secret id, each from a file.
    AppRole {
        mount: String,
        role_id_file: PathBuf,
        secret_id_file: PathBuf,
    },
    /// Kubernetes auth: the pod's service account token as the JWT.
    Kubernetes {
        mount: String,
        role: String,
        jwt_file: PathBuf,
    },
}

/// What decommission does to a retired KV version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnRevoke {
    /// `kv destroy`: the data is gone for good.
    Destroy,
    /// `kv delete`: a soft delete, undone with `kv undelete`.
    Delete,
    /// Left as it is.
    Keep,
}

/// A `type = "vault"` provider: HashiCorp Vault or OpenBao, KV v2.
#[derive(Debug, Clone)]
pub struct VaultConfig {
    pub name: String,
    /// `http(s)://host:port`, without a path.
    pub address: String,
    /// The KV v2 mount, without slashes at either end.
    pub mount: String,
    /// Put before a secret's id to make its default path.
    pub path_prefix: String,
    pub auth: VaultAuth,
    /// Enterprise / OpenBao namespace.
    pub namespace: Option<String>,
    /// Extra CA certificates (PEM) to trust for `https://` addresses.
    pub ca_file: Option<PathBuf>,
    pub poll_interval: Duration,
    pub on_revoke: OnRevoke,
    /// How long one request to Vault may take.
    pub request_timeout: Duration,
}

/// A `type = "aws-secrets-manager"` provider. Credentials come from the
/// AWS SDK's default chain (environment, profile, web identity, instance
/// role); nothing here holds one.
#[derive(Debug, Clone)]
pub struct AwsConfig {
    pub name: String,
    /// The region; `None`: from the SDK's chain (`AWS_REGION`, profile).
    pub region: Option<String>,
    /// Another endpoint than AWS's own (a VPC endpoint, a test server).
    pub endpoint_url: Option<String>,
    /// Put before a secret's id to make its default secret name.
    pub name_prefix: String,
    pub poll_interval: Duration,
    /// How long one request to Secrets Manager may take.
    pub request_timeout: Duration,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAws {
    name: String,
    #[serde(rename = "type")]
    _type: String,
    region: Option<String>,
    endpoint_url: Option<String>,
    name_prefix: Option<String>,
    poll_interval: Option<String>,
    request_timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVault {
    name: String,
    #[serde(rename = "type")]
    _type: String,
    address: Option<String>,
    mount: Option<String>,
    path_prefix: Option<String>,
    auth: Option<String>,
    token_file: Option<PathBuf>,
    role_id_file: Option<PathBuf>,
    secret_id_file: Option<PathBuf>,
    role: Option<String>,
    jwt_file: Option<PathBuf>,
    auth_mount: Option<String>,
    namespace: Option<String>,
    ca_file: Option<PathBuf>,
    poll_interval: Option<String>,
    on_revoke: Option<String>,
    request_timeout: Option<String>,
}

/// The service account token every Kubernetes pod has.
const POD_JWT: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";

/// The provider types `[[providers]]` knows.
const TYPES: &str = "vault, aws-secrets-manager";

/// Validates every `[[providers]]` entry; problems go to `errors`.
pub(super) fn validate(raw: Vec<toml::Table>, errors: &mut Vec<String>) -> Vec<ProviderConfig> {
    let mut out = Vec::new();
    let mut names = BTreeSet::new();
    for (i, t) in raw.into_iter().enumerate() {
        let label = match t.get("name").and_then(toml::Value::as_str) {
            Some(n) => format!("providers[{i}] ({n})"),
            None => format!("providers[{i}]"),
        };
        let ty = t
            .get("type")
            .and_then(toml::Value::as_str)
            .unwrap_or_default()
            .to_string();
        let p = match ty.as_str() {
            "vault" => match toml::Value::Table(t).try_into::<RawVault>() {
                Ok(r) => vault(&label, r, errors).map(ProviderConfig::Vault),
                Err(e) => {
                    errors.push(format!("{label}: {}", e.message()));
                    None
                }
            },
            "aws-secrets-manager" => match toml::Value::Table(t).try_into::<RawAws>() {
                Ok(r) => aws(&label, r, errors).map(ProviderConfig::Aws),
                Err(e) => {
                    errors.push(format!("{label}: {}", e.message()));
                    None
                }
            },
            "" => {
                errors.push(format!("{label}: type is missing (one of: {TYPES})"));
                None
            }
            other => {
                errors.push(format!("{label}: unknown type {other:?} (one of: {TYPES})"));
                None
            }
        };
        if let Some(p) = p {
            if !names.insert(p.name().to_string()) {
                errors.push(format!("{label}: the name {:?} is used twice", p.name()));
                continue;
            }
            out.push(p);
        }
    }
    out
}

fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 64
        && n.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

fn readable(label: &str, setting: &str, f: &PathBuf, errors: &mut Vec<String>) {
    if let Err(e) = std::fs::metadata(f) {
        errors.push(format!(
            "{label}: {setting}: cannot read {}: {e}",
            f.display()
        ));
    }
}

fn required<T>(
    label: &str,
    setting: &str,
    auth: &str,
    v: Option<T>,
    errors: &mut Vec<String>,
) -> Option<T> {
    if v.is_none() {
        errors.push(format!("{label}: auth = {auth:?} needs {setting}"));
    }
    v
}

/// `poll_interval` and `request_timeout`, as every provider type has them.
fn timings(
    label: &str,
    poll_interval: Option<&str>,
    request_timeout: Option<&str>,
    errors: &mut Vec<String>,
) -> (Duration, Duration) {
    let poll = super::duration(
        &format!("{label}: poll_interval"),
        poll_interval,
        Duration::from_secs(10),
        errors,
    );
    if poll < Duration::from_millis(100) {
        errors.push(format!("{label}: poll_interval must be at least 100ms"));
    }
    let timeout = super::positive_duration(
        &format!("{label}: request_timeout"),
        request_timeout,
        Duration::from_secs(10),
        errors,
    );
    (poll, timeout)
}

fn check_name(label: &str, name: &str, errors: &mut Vec<String>) {
    if !valid_name(name) {
        errors.push(format!(
            "{label}: name must be 1 to 64 of a-z, 0-9, - and _"
        ));
    }
}

fn aws(label: &str, r: RawAws, errors: &mut Vec<String>) -> Option<AwsConfig> {
    let before = errors.len();
    check_name(label, &r.name, errors);
    let region = r.region.filter(|x| !x.is_empty());
    if let Some(x) = &region
        && !x
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        errors.push(format!(
            "{label}: region {x:?} is not a region name (e.g. eu-west-1)"
        ));
    }
    let endpoint_url = r
        .endpoint_url
        .map(|u| u.trim_end_matches('/').to_string())
        .filter(|u| !u.is_empty());
    if let Some(u) = &endpoint_url
        && !(u.starts_with("https://") || u.starts_with("http://"))
    {
        errors.push(format!(
            "{label}: endpoint_url must be http(s)://host[:port], not {u:?}"
        ));
    }
    let name_prefix = r.name_prefix.unwrap_or_else(|| "rekey/".into());
    if !name_prefix.bytes().all(asm_name_byte) {
        errors.push(format!(
            "{label}: name_prefix may hold letters, digits and /_+=.@- only"
        ));
    }
    let (poll_interval, request_timeout) = timings(
        label,
        r.poll_interval.as_deref(),
        r.request_timeout.as_deref(),
        errors,
    );
    if errors.len() > before {
        return None;
    }
    Some(AwsConfig {
        name: r.name,
        region,
        endpoint_url,
        name_prefix,
        poll_interval,
        request_timeout,
    })
}

/// A byte Secrets Manager allows in a secret's name.
pub(crate) fn asm_name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"/_+=.@-".contains(&b)
}

#[allow(
    clippy::too_many_lines,
    reason = "one setting after another with its default and its checks"
)]
fn vault(label: &str, r: RawVault, errors: &mut Vec<String>) -> Option<VaultConfig> {
    let before = errors.len();
    check_name(label, &r.name, errors);
    let address = r.address.unwrap_or_default();
    let address = address.trim_end_matches('/').to_string();
    if address.is_empty() {
        errors.push(format!(
            "{label}: address is missing (e.g. https://vault:8200)"
        ));
    } else if !(address.starts_with("https://") || address.starts_with("http://"))
        || address
            .split("://")
            .nth(1)
            .is_some_and(|h| h.is_empty() || h.contains('/'))
    {
        errors.push(format!(
            "{label}: address must be http(s)://host:port without a path, not {address:?}"
        ));
    }
    let mount = r.mount.unwrap_or_else(|| "secret".into());
    let mount = mount.trim_matches('/').to_string();
    if mount.is_empty() {
        errors.push(format!("{label}: mount must name a KV v2 mount"));
    }
    let path_prefix = r.path_prefix.unwrap_or_else(|| "rekey/".into());
    if path_prefix.starts_with('/') || path_prefix.contains("//") {
        errors.push(format!(
            "{label}: path_prefix must be relative to the mount, without empty segments"
        ));
    }
    let auth_name = r.auth.unwrap_or_else(|| "token".into());
    let unused = |setting: &str, set: bool, errors: &mut Vec<String>| {
        if set {
            errors.push(format!(
                "{label}: {setting} does not apply to auth = {auth_name:?}"
            ));
        }
    };
    let auth = match auth_name.as_str() {
        "token" => {
            unused("role_id_file", r.role_id_file.is_some(), errors);
            unused("secret_id_file", r.secret_id_file.is_some(), errors);
            unused("role", r.role.is_some(), errors);
            unused("jwt_file", r.jwt_file.is_some(), errors);
            unused("auth_mount", r.auth_mount.is_some(), errors);
            required(label, "token_file", "token", r.token_file, errors).map(|f| {
                readable(label, "token_file", &f, errors);
                VaultAuth::Token { token_file: f }
            })
        }
        "approle" => {
            unused("token_file", r.token_file.is_some(), errors);
            unused("role", r.role.is_some(), errors);
            unused("jwt_file", r.jwt_file.is_some(), errors);
            let role_id = required(label, "role_id_file", "approle", r.role_id_file, errors);
            let secret_id = required(label, "secret_id_file", "approle", r.secret_id_file, errors);
            match (role_id, secret_id) {
                (Some(role_id_file), Some(secret_id_file)) => {
                    readable(label, "role_id_file", &role_id_file, errors);
                    readable(label, "secret_id_file", &secret_id_file, errors);
                    Some(VaultAuth::AppRole {
                        mount: r.auth_mount.unwrap_or_else(|| "approle".into()),
                        role_id_file,
                        secret_id_file,
                    })
                }
                _ => None,
            }
        }
        "kubernetes" => {
            unused("token_file", r.token_file.is_some(), errors);
            unused("role_id_file", r.role_id_file.is_some(), errors);
            unused("secret_id_file", r.secret_id_file.is_some(), errors);
            let role = required(label, "role", "kubernetes", r.role, errors);
            let jwt_file = r.jwt_file.unwrap_or_else(|| POD_JWT.into());
            readable(label, "jwt_file", &jwt_file, errors);
            role.map(|role| VaultAuth::Kubernetes {
                mount: r.auth_mount.unwrap_or_else(|| "kubernetes".into()),
                role,
                jwt_file,
            })
        }
        other => {
            errors.push(format!(
                "{label}: auth must be token, approle or kubernetes, not {other:?}"
            ));
            None
        }
    };
    if let Some(f) = &r.ca_file {
        readable(label, "ca_file", f, errors);
    }
    let (poll_interval, request_timeout) = timings(
        label,
        r.poll_interval.as_deref(),
        r.request_timeout.as_deref(),
        errors,
    );
    let on_revoke = match r.on_revoke.as_deref().unwrap_or("destroy") {
        "destroy" => OnRevoke::Destroy,
        "delete" => OnRevoke::Delete,
        "keep" => OnRevoke::Keep,
        other => {
            errors.push(format!(
                "{label}: on_revoke must be destroy, delete or keep, not {other:?}"
            ));
            OnRevoke::Destroy
        }
    };
    let auth = auth?;
    if errors.len() > before {
        return None;
    }
    Some(VaultConfig {
        name: r.name,
        address,
        mount,
        path_prefix,
        auth,
        namespace: r.namespace.filter(|n| !n.is_empty()),
        ca_file: r.ca_file,
        poll_interval,
        on_revoke,
        request_timeout,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> (Vec<ProviderConfig>, Vec<String>) {
        #[derive(Deserialize)]
        struct Doc {
            providers: Vec<toml::Table>,
        }
        let d: Doc = toml::from_str(text).unwrap();
        let mut errors = Vec::new();
        let p = validate(d.providers, &mut errors);
        (p, errors)
    }

    #[test]
    fn a_vault_entry_with_defaults() {
        let dir = std::env::temp_dir();
        let f = dir.join(format!("rekey-provider-test-{}", std::process::id()));
        std::fs::write(&f, "t").unwrap();
        let (p, errors) = parse(&format!(
            "[[providers]]\nname = \"vault-main\"\ntype = \"vault\"\naddress = \"https://vault:8200/\"\ntoken_file = \"{}\"\n",
            f.display()
        ));
        assert!(errors.is_empty(), "{errors:?}");
        let ProviderConfig::Vault(v) = &p[0] else {
            panic!("{p:?}")
        };
        assert_eq!(v.address, "https://vault:8200");
        assert_eq!(
            (v.mount.as_str(), v.path_prefix.as_str()),
            ("secret", "rekey/")
        );
        assert_eq!(v.poll_interval, Duration::from_secs(10));
        assert_eq!(v.on_revoke, OnRevoke::Destroy);
        assert_eq!(
            v.auth,
            VaultAuth::Token {
                token_file: f.clone()
            }
        );
        std::fs::remove_file(f).unwrap();
    }

    #[test]
    fn an_aws_entry_with_defaults_and_its_problems() {
        let (p, errors) = parse(
            "[[providers]]\nname = \"aws-main\"\ntype = \"aws-secrets-manager\"\nregion = \"eu-west-1\"\nendpoint_url = \"http://127.0.0.1:4566/\"\n",
        );
        assert!(errors.is_empty(), "{errors:?}");
        let ProviderConfig::Aws(a) = &p[0] else {
            panic!("{p:?}")
        };
        assert_eq!(a.region.as_deref(), Some("eu-west-1"));
        assert_eq!(a.endpoint_url.as_deref(), Some("http://127.0.0.1:4566"));
        assert_eq!(a.name_prefix, "rekey/");
        assert_eq!(a.poll_interval, Duration::from_secs(10));

        let (p, errors) = parse(
            r#"
[[providers]]
name = "a"
type = "aws-secrets-manager"
region = "EU West"
endpoint_url = "127.0.0.1:4566"
name_prefix = "rekey prod/"
poll_interval = "10ms"
mount = "secret"
"#,
        );
        assert!(p.is_empty());
        assert_eq!(
            errors,
            [
                "providers[0] (a): unknown field `mount`, expected one of `name`, `type`, `region`, `endpoint_url`, `name_prefix`, `poll_interval`, `request_timeout`"
            ]
        );
        let (_, errors) = parse(
            r#"
[[providers]]
name = "a"
type = "aws-secrets-manager"
region = "EU West"
endpoint_url = "127.0.0.1:4566"
name_prefix = "rekey prod/"
poll_interval = "10ms"
"#,
        );
        let all = errors.join("\n");
        for want in [
            "region \"EU West\" is not a region name",
            "endpoint_url must be http(s)://host[:port]",
            "name_prefix may hold letters, digits and /_+=.@- only",
            "poll_interval must be at least 100ms",
        ] {
            assert!(all.contains(want), "missing {want:?} in\n{all}");
        }
    }

    #[test]
    fn every_problem_is_named_with_its_entry() {
        let (p, errors) = parse(
            r#"
[[providers]]
name = "Bad Name"
type = "vault"
address = "vault:8200"
auth = "approle"
on_revoke = "shred"
poll_interval = "soon"

[[providers]]
name = "x"
type = "consul"

[[providers]]
name = "k"
type = "vault"
address = "http://127.0.0.1:8200"
auth = "kubernetes"
token_file = "/t"
"#,
        );
        assert!(p.is_empty());
        let all = errors.join("\n");
        for want in [
            "providers[0] (Bad Name): name must be",
            "providers[0] (Bad Name): address must be http(s)://host:port",
            "providers[0] (Bad Name): auth = \"approle\" needs role_id_file",
            "providers[0] (Bad Name): auth = \"approle\" needs secret_id_file",
            "providers[0] (Bad Name): on_revoke must be destroy, delete or keep",
            "providers[0] (Bad Name): poll_interval: \"soon\" is not a duration",
            "providers[1] (x): unknown type \"consul\"",
            "providers[2] (k): token_file does not apply to auth = \"kubernetes\"",
            "providers[2] (k): auth = \"kubernetes\" needs role",
        ] {
            assert!(all.contains(want), "missing {want:?} in\n{all}");
        }
    }

    #[test]
    fn names_are_unique_and_settings_known() {
        let (_, errors) = parse(
            r#"
[[providers]]
name = "v"
type = "vault"
addres = "http://x"
"#,
        );
        assert!(errors[0].contains("unknown field `addres`"), "{errors:?}");
        let dir = std::env::temp_dir();
        let f = dir.join(format!("rekey-provider-twice-{}", std::process::id()));
        std::fs::write(&f, "t").unwrap();
        let entry = format!(
            "[[providers]]\nname = \"v\"\ntype = \"vault\"\naddress = \"http://x:1\"\ntoken_file = \"{}\"\n",
            f.display()
        );
        let (p, errors) = parse(&entry.repeat(2));
        std::fs::remove_file(f).unwrap();
        assert_eq!(p.len(), 1);
        assert_eq!(errors, ["providers[1] (v): the name \"v\" is used twice"]);
    }
}
