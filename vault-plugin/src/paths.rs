//! The mount's paths: a front to the rekey backend over `rekey.v1`, and
//! their help text.

use rekey_proto::json::{secret_json, status_json, version_json};
use rekey_proto::v1 as rk;
use rekey_proto::v1::rekey_client::RekeyClient;
use serde_json::{Value, json};

use crate::config::{Backend, Config};
use crate::error::PluginError;
use crate::params::Params;

/// Who asked, as the host tells it: carried to the rekey backend so that
/// its audit log names the Vault request and caller.
#[derive(Clone, Debug, Default)]
pub struct Caller {
    /// The host's request id (its audit log's `request.id`).
    pub request_id: String,
    /// The identity entity of the token, if it has one.
    pub entity_id: String,
    /// The token's display name (`token`, `approle`, `userpass-alice`).
    pub display_name: String,
}

impl Caller {
    /// `vault:DISPLAY-NAME` with `/entity=ID` when there is one; anything
    /// outside `[A-Za-z0-9-_.:@=]` becomes `_`.
    pub fn on_behalf_of(&self) -> String {
        let clean = |s: &str| -> String {
            s.chars()
                .take(96)
                .map(|c| {
                    if c.is_ascii_alphanumeric() || "-_.:@=".contains(c) {
                        c
                    } else {
                        '_'
                    }
                })
                .collect()
        };
        let name = if self.display_name.is_empty() {
            "unknown".to_string()
        } else {
            clean(&self.display_name)
        };
        if self.entity_id.is_empty() {
            format!("vault:{name}")
        } else {
            format!("vault:{name}/entity={}", clean(&self.entity_id))
        }
    }
}

/// What a handler answers: data for the caller, or nothing (HTTP 204 for
/// a write, 404 for a read).
pub type Answer = Result<Option<Value>, PluginError>;

/// One kind of path.
pub struct Route {
    /// The path's first segment (`secrets`, `rotate`, ...), or the whole
    /// path when `id` is false.
    pub name: &'static str,
    /// Whether `name/<id>` (the id may contain slashes).
    pub id: bool,
    pub operations: &'static [&'static str],
    pub synopsis: &'static str,
    pub parameters: &'static [(&'static str, &'static str, &'static str)],
    pub description: &'static str,
}

const ID: (&str, &str, &str) = (
    "id",
    "string",
    "The secret's id, e.g. prod/api/database (in the path).",
);

pub static ROUTES: &[Route] = &[
    Route {
        name: "config",
        id: false,
        operations: &["read", "update", "delete"],
        synopsis: "Where the rekey backend is, and the token the plugin uses.",
        parameters: &[
            (
                "address",
                "string",
                "The backend's gRPC address: http://HOST:PORT, or https://HOST:PORT with ca_pem. Required on the first write.",
            ),
            (
                "token",
                "string",
                "A rekey API token (rekey token create) with the rights the mount's users need. Never returned by a read.",
            ),
            (
                "ca_pem",
                "string",
                "The PEM certificate of the CA that signed the backend's certificate, for https.",
            ),
            (
                "allow_plaintext",
                "bool",
                "With an http:// address where an https:// one was: send the token unencrypted anyway.",
            ),
        ],
        description: "Stored in the mount's storage, seal-wrapped where the seal supports it. A write changes only the fields it names, but one that changes address or ca_pem must give token too (the stored token goes only where it went before), and moving from https:// to http:// needs allow_plaintext=true. A read shows the address, the CA, and whether a token is set; the token itself is never returned.",
    },
    Route {
        name: "secrets/",
        id: false,
        operations: &["list"],
        synopsis: "Lists the ids of the secrets the plugin's token may read.",
        parameters: &[],
        description: "Each key is a secret id; read rekey/secrets/<id> for its stages and versions. rekey/secrets/<prefix>/ lists the ids under that prefix, without it (rekey/secrets/prod/ lists api/db for prod/api/db).",
    },
    Route {
        name: "secrets",
        id: true,
        operations: &["read", "update"],
        synopsis: "Creates a secret (write) or shows its metadata, stages and versions (read), never a value.",
        parameters: &[
            ID,
            (
                "kind",
                "string",
                "random, encryption-key, static, postgres, redis or exec. Required.",
            ),
            (
                "window",
                "duration",
                "The validation window: how long previous stays valid after a rotation (default 30m).",
            ),
            (
                "schedule",
                "string",
                "\"manual\" (default), an interval (\"30d\", \"every 12h\") or a cron expression (\"0 3 * * 1\", UTC).",
            ),
            (
                "rotation_window",
                "duration",
                "Scheduled rotations happen at a random point within this window.",
            ),
            (
                "jitter",
                "duration",
                "Extra random delay for scheduled rotations.",
            ),
            (
                "min_interval",
                "duration",
                "Never rotate on schedule sooner than this after the last rotation.",
            ),
            (
                "provider",
                "string",
                "Where the values live: a provider named in the backend's config (default: rekey's embedded store).",
            ),
            (
                "provider_path",
                "string",
                "Where the provider keeps the values (with provider).",
            ),
            (
                "length",
                "int",
                "random: bytes of entropy (characters for alnum); default 32.",
            ),
            (
                "encoding",
                "string",
                "random: hex, base64, base64url (default) or alnum.",
            ),
            (
                "value",
                "string",
                "static, encryption-key: version 1's value.",
            ),
            (
                "admin_url_file",
                "string",
                "postgres, redis: a file on the backend's host holding the admin URL.",
            ),
            (
                "group_role",
                "string",
                "postgres: the role that owns the app's objects.",
            ),
            (
                "role_base",
                "string",
                "postgres: login roles are BASE_a and BASE_b.",
            ),
            (
                "database",
                "string",
                "postgres: the database apps connect to.",
            ),
            (
                "host",
                "string",
                "postgres: the host apps connect to (default: the admin URL's).",
            ),
            (
                "port",
                "int",
                "postgres: the port apps connect to (default: the admin URL's).",
            ),
            (
                "probe",
                "string",
                "postgres: SQL the test step runs as the new role (default SELECT 1).",
            ),
            (
                "terminate_sessions",
                "bool",
                "postgres: end the old role's sessions at decommission.",
            ),
            (
                "sslmode",
                "string",
                "postgres: libpq's sslmode for apps' URLs (default: the admin URL's).",
            ),
            (
                "sslrootcert",
                "string",
                "postgres: libpq's sslrootcert for apps' URLs (default: the admin URL's).",
            ),
            (
                "username",
                "string",
                "redis: the ACL user whose passwords rotate.",
            ),
            (
                "redis_address",
                "string",
                "redis: the address apps connect to (default: the admin URL's).",
            ),
            (
                "topology",
                "string",
                "redis: single (default), nodes, sentinel or cluster; every step applies to every server.",
            ),
            (
                "nodes",
                "commaStringSlice",
                "redis: nodes, the servers (default: found with ROLE); cluster, seed nodes.",
            ),
            (
                "sentinels",
                "commaStringSlice",
                "redis: sentinel, the Sentinels (host:port).",
            ),
            (
                "master_name",
                "string",
                "redis: sentinel, the name the Sentinels monitor the primary by.",
            ),
            (
                "tls_ca_file",
                "string",
                "redis: rediss://, a CA file on the backend's host (default: the public CAs).",
            ),
            (
                "tls_cert_file",
                "string",
                "redis: rediss://, a client certificate on the backend's host.",
            ),
            (
                "tls_key_file",
                "string",
                "redis: rediss://, the client certificate's key.",
            ),
            (
                "tls_server_name",
                "string",
                "redis: rediss://, the name certificates are checked against.",
            ),
            (
                "hook_create",
                "string",
                "exec: the hook that prints a new value.",
            ),
            (
                "hook_set",
                "string",
                "exec: the hook that makes the new value valid where it is used.",
            ),
            (
                "hook_test",
                "string",
                "exec: the hook that proves the new value works.",
            ),
            (
                "hook_revoke",
                "string",
                "exec: the hook that makes an old value stop working.",
            ),
            (
                "hook_timeout",
                "duration",
                "exec: the time limit per hook run (default 30s).",
            ),
        ],
        description: "A write creates the secret in the rekey backend with version 1; writing an id that exists is refused (400). A read returns what `rekey get` and `rekey versions` show: the kind, schedule, validation window, where the values live, the current / previous / pending versions and every version's stages and state. Values are only returned by rekey/creds/<id>.",
    },
    Route {
        name: "rotate",
        id: true,
        operations: &["update"],
        synopsis: "Rotates a secret: a new current version; the old one stays valid as previous for the validation window.",
        parameters: &[
            ID,
            (
                "request_token",
                "string",
                "Makes a retry safe: the same token returns the same rotation instead of a second one.",
            ),
            (
                "value",
                "string",
                "static, encryption-key: the new value (other kinds make their own).",
            ),
            (
                "cancel",
                "bool",
                "Clear a rotation parked as needs-attention (or abort one in flight) instead of rotating.",
            ),
        ],
        description: "The new version reaches every rekey sidecar watching the secret at once, and each hot-reloads it without a restart. The answer names the new version and its stages.",
    },
    Route {
        name: "rollback",
        id: true,
        operations: &["update"],
        synopsis: "Makes previous current again (within the validation window).",
        parameters: &[ID],
        description: "The rolled-back version becomes previous; sidecars switch back at once. Refused (412) when there is no active previous version.",
    },
    Route {
        name: "revoke",
        id: true,
        operations: &["update"],
        synopsis: "Revokes a version: it stops working where it is used.",
        parameters: &[
            ID,
            ("version", "int", "The version to revoke. Required."),
            (
                "force",
                "bool",
                "Revoke although the decommission conditions do not hold yet (consumers still on it, window not over).",
            ),
            (
                "reason",
                "string",
                "Recorded in rekey's audit log; required with force.",
            ),
        ],
        description: "Without force, rekey refuses (412) while a consumer still serves the version or the validation window is running, and says which.",
    },
    Route {
        name: "creds",
        id: true,
        operations: &["read"],
        synopsis: "Returns a secret's value: the current version, or another stage or version.",
        parameters: &[
            ID,
            ("stage", "string", "current (default), previous or pending."),
            ("version", "int", "A version number instead of a stage."),
        ],
        description: "The value is under \"value\": a string, or an object for structured kinds (username, password, ...). Audit devices record it only as an HMAC. The read is recorded in rekey's audit log with the Vault request id and caller.",
    },
    Route {
        name: "status",
        id: true,
        operations: &["read"],
        synopsis: "A secret's rotation status: the step of the rotation, the consumers and what holds decommission back.",
        parameters: &[ID],
        description: "What `rekey status <id>` shows: the versions, each consumer (sidecar) with the version it serves and whether it is healthy, how many live consumers have converged on current, why previous may not be decommissioned yet, and re-encryption progress for encryption keys.",
    },
];

/// Refuses parameters the route `name` does not list (its help's
/// PARAMETERS, without the id in the path).
fn takes_only(p: &Params, name: &str) -> Result<(), PluginError> {
    let Some(r) = ROUTES.iter().find(|r| r.name == name) else {
        return Err(PluginError::internal(format!("no route {name:?}")));
    };
    let names: Vec<&str> = r
        .parameters
        .iter()
        .map(|(n, _, _)| *n)
        .filter(|n| *n != "id")
        .collect();
    let label = if r.id {
        format!("{name}/<id>")
    } else {
        name.to_string()
    };
    p.only(&label, &names)
}

/// The route a path falls under, and the id in it (for `secrets/P/`, a
/// list, the prefix `P/`).
pub fn route(path: &str) -> Option<(&'static Route, Option<&str>)> {
    if let Some(prefix) = path.strip_prefix("secrets/")
        && prefix.ends_with('/')
        && prefix.len() > 1
    {
        return ROUTES
            .iter()
            .find(|r| r.name == "secrets/")
            .map(|r| (r, Some(prefix)));
    }
    ROUTES.iter().find_map(|r| {
        if r.id {
            let id = path.strip_prefix(r.name)?.strip_prefix('/')?;
            (!id.is_empty() && !id.ends_with('/')).then_some((r, Some(id)))
        } else {
            (path == r.name).then_some((r, None))
        }
    })
}

/// The help text for a path (`bao path-help`), or the engine's overview.
pub fn help(path: &str) -> String {
    let Some((r, _)) = route(path) else {
        return overview();
    };
    let pattern = if r.id {
        format!("^{}/(?P<id>.+)$", r.name)
    } else {
        format!("^{}$", r.name)
    };
    let mut out = format!(
        "Request:        {path}\nMatching Route: {pattern}\n\n{}\n\n",
        r.synopsis
    );
    if !r.parameters.is_empty() {
        out.push_str("## PARAMETERS\n\n");
        for (name, ty, what) in r.parameters {
            out.push_str(&format!("{name} ({ty})\n\n    {what}\n\n"));
        }
    }
    out.push_str(&format!(
        "## OPERATIONS\n\n    {}\n\n## DESCRIPTION\n\n{}\n",
        r.operations.join(", "),
        r.description
    ));
    out
}

fn overview() -> String {
    let mut out = String::from(
        "The rekey secrets engine: zero-downtime rotation of secrets, managed from OpenBao / Vault.\n\n\
         Each path is a front to a rekey backend (configured at config): rotations, rollbacks and\n\
         revocations reach every rekey sidecar at once, and applications reload the new credential\n\
         without a restart. Vault policies decide who may call which path; Vault's audit devices\n\
         and rekey's own audit log both record each call.\n\n## PATHS\n\n",
    );
    for r in ROUTES {
        let p = if r.id {
            format!("{}/<id>", r.name)
        } else {
            r.name.to_string()
        };
        out.push_str(&format!("{p}\n    {}\n\n", r.synopsis));
    }
    out
}

/// A call to a path with a connection to the backend.
pub struct Call<'a> {
    pub backend: &'a Backend,
    pub caller: &'a Caller,
}

impl Call<'_> {
    fn client(&self) -> RekeyClient<tonic::transport::Channel> {
        RekeyClient::new(self.backend.channel.clone())
    }

    /// A request carrying the token, the Vault request id and the caller.
    fn request<T>(&self, msg: T) -> tonic::Request<T> {
        let mut req = tonic::Request::new(msg);
        let md = req.metadata_mut();
        if let Some(b) = &self.backend.bearer {
            md.insert("authorization", b.clone());
        }
        if let Ok(v) = self.caller.request_id.parse() {
            md.insert("x-request-id", v);
        }
        if let Ok(v) = self.caller.on_behalf_of().parse() {
            md.insert("x-rekey-on-behalf-of", v);
        }
        req
    }

    /// A `rekey.v1` call's answer, or its failure as the host shows it.
    async fn answer<T>(
        &self,
        call: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> Result<T, PluginError> {
        call.await
            .map(tonic::Response::into_inner)
            .map_err(|s| PluginError::from_status(&s, &self.backend.address))
    }

    /// The ids under `prefix` (empty: all), each without the prefix.
    pub async fn list(&self, prefix: &str) -> Answer {
        let r = self
            .answer(
                self.client()
                    .list_secrets(self.request(rk::ListSecretsRequest {
                        prefix: prefix.into(),
                    })),
            )
            .await?;
        let mut keys: Vec<String> = r
            .secrets
            .into_iter()
            .filter_map(|s| s.id.strip_prefix(prefix).map(str::to_string))
            .collect();
        keys.sort();
        Ok(Some(json!({ "keys": keys })))
    }

    pub async fn read_secret(&self, id: &str, p: &Params) -> Answer {
        p.only("secrets/<id>", &[])?;
        let r = self
            .answer(
                self.client()
                    .list_versions(self.request(rk::ListVersionsRequest {
                        secret_id: id.into(),
                    })),
            )
            .await?;
        let secret = r.secret.unwrap_or_default();
        let mut o = secret_json(&secret);
        o["versions"] = r
            .versions
            .iter()
            .map(|v| without_secret(version_json(&secret.id, v)))
            .collect();
        Ok(Some(o))
    }

    pub async fn create(&self, id: &str, mut p: Params) -> Answer {
        takes_only(&p, "secrets")?;
        let Some(kind) = p.text("kind")? else {
            return Err(PluginError::bad_request(
                "kind is required: random, encryption-key, static, postgres, redis or exec",
            ));
        };
        let value = take_value(&mut p)?;
        let ms = |k: &str| p.duration_ms(k).map(Option::unwrap_or_default);
        let schedule = rk::Schedule {
            spec: p.text("schedule")?.unwrap_or_default(),
            rotation_window_ms: ms("rotation_window")?,
            jitter_ms: ms("jitter")?,
            min_interval_ms: ms("min_interval")?,
            next_rotation_at_ms: 0,
        };
        let (length, encoding) = (p.unsigned("length")?, p.text("encoding")?);
        let random = if length.is_some() || encoding.is_some() {
            Some(rk::RandomOptions {
                length: u32::try_from(length.unwrap_or(0))
                    .map_err(|_| PluginError::bad_request("length is too large"))?,
                encoding: encoding.unwrap_or_default(),
            })
        } else {
            None
        };
        let s = |k: &str| p.text(k).map(Option::unwrap_or_default);
        let postgres = (kind == "postgres")
            .then(|| -> Result<rk::PostgresOptions, PluginError> {
                Ok(rk::PostgresOptions {
                    admin_url_file: s("admin_url_file")?,
                    group_role: s("group_role")?,
                    role_base: s("role_base")?,
                    database: s("database")?,
                    host: s("host")?,
                    port: u32::try_from(p.unsigned("port")?.unwrap_or(0))
                        .map_err(|_| PluginError::bad_request("port is too large"))?,
                    probe: s("probe")?,
                    terminate_sessions: p.boolean("terminate_sessions")?.unwrap_or(false),
                    sslmode: s("sslmode")?,
                    sslrootcert: s("sslrootcert")?,
                })
            })
            .transpose()?;
        let redis = (kind == "redis")
            .then(|| -> Result<rk::RedisOptions, PluginError> {
                Ok(rk::RedisOptions {
                    admin_url_file: s("admin_url_file")?,
                    username: s("username")?,
                    address: s("redis_address")?,
                    topology: s("topology")?,
                    nodes: p.list("nodes")?,
                    sentinels: p.list("sentinels")?,
                    master_name: s("master_name")?,
                    tls_ca_file: s("tls_ca_file")?,
                    tls_cert_file: s("tls_cert_file")?,
                    tls_key_file: s("tls_key_file")?,
                    tls_server_name: s("tls_server_name")?,
                })
            })
            .transpose()?;
        let exec = (kind == "exec")
            .then(|| -> Result<rk::ExecOptions, PluginError> {
                Ok(rk::ExecOptions {
                    create: s("hook_create")?,
                    set: s("hook_set")?,
                    test: s("hook_test")?,
                    revoke: s("hook_revoke")?,
                    timeout_ms: u64::try_from(ms("hook_timeout")?).unwrap_or(0),
                })
            })
            .transpose()?;
        let r = self
            .answer(
                self.client()
                    .create_secret(self.request(rk::CreateSecretRequest {
                        id: id.into(),
                        kind,
                        random,
                        schedule: Some(schedule),
                        validation_window_ms: p.duration_ms("window")?,
                        value,
                        postgres,
                        redis,
                        exec,
                        provider: s("provider")?,
                        provider_path: s("provider_path")?,
                    })),
            )
            .await?;
        Ok(Some(secret_and_version(r.secret, r.version)))
    }

    pub async fn rotate(&self, id: &str, mut p: Params) -> Answer {
        takes_only(&p, "rotate")?;
        let value = take_value(&mut p)?;
        let r = self
            .answer(self.client().rotate(self.request(rk::RotateRequest {
                secret_id: id.into(),
                request_token: p.text("request_token")?.unwrap_or_default(),
                value,
                cancel: p.boolean("cancel")?.unwrap_or(false),
            })))
            .await?;
        let mut o = secret_and_version(r.secret, r.version);
        o["replayed"] = json!(r.replayed);
        Ok(Some(o))
    }

    pub async fn rollback(&self, id: &str, p: &Params) -> Answer {
        takes_only(p, "rollback")?;
        let r = self
            .answer(self.client().rollback(self.request(rk::RollbackRequest {
                secret_id: id.into(),
            })))
            .await?;
        Ok(Some(secret_and_version(r.secret, r.version)))
    }

    pub async fn revoke(&self, id: &str, p: &Params) -> Answer {
        takes_only(p, "revoke")?;
        let Some(version) = p.unsigned("version")? else {
            return Err(PluginError::bad_request(
                "version is required: the version to revoke",
            ));
        };
        let r = self
            .answer(self.client().revoke(self.request(rk::RevokeRequest {
                secret_id: id.into(),
                version,
                force: p.boolean("force")?.unwrap_or(false),
                reason: p.text("reason")?.unwrap_or_default(),
            })))
            .await?;
        Ok(Some(secret_and_version(r.secret, r.version)))
    }

    pub async fn creds(&self, id: &str, p: &Params) -> Answer {
        takes_only(p, "creds")?;
        let selector = match (p.text("stage")?, p.unsigned("version")?) {
            (Some(_), Some(_)) => {
                return Err(PluginError::bad_request(
                    "give either stage or version, not both",
                ));
            }
            (None, Some(v)) => Some(rk::get_secret_request::Selector::Version(v)),
            (Some(stage), None) => {
                let Some(s) = [rk::Stage::Current, rk::Stage::Previous, rk::Stage::Pending]
                    .into_iter()
                    .find(|s| s.label() == stage)
                else {
                    return Err(PluginError::bad_request(format!(
                        "stage must be current, previous or pending, not {stage:?}"
                    )));
                };
                Some(rk::get_secret_request::Selector::Stage(s as i32))
            }
            (None, None) => None,
        };
        let r = self
            .answer(self.client().get_secret(self.request(rk::GetSecretRequest {
                secret_id: id.into(),
                selector,
                reveal: true,
            })))
            .await?;
        let mut o = version_json(id, &r.version.unwrap_or_default());
        if let Some(obj) = o.as_object_mut() {
            obj.remove("secret");
            obj.entry("value").or_insert(Value::Null);
        }
        Ok(Some(o))
    }

    pub async fn status(&self, id: &str, p: &Params) -> Answer {
        takes_only(p, "status")?;
        let r = self
            .answer(self.client().get_status(self.request(rk::GetStatusRequest {
                secret_id: id.into(),
            })))
            .await?;
        let Some(st) = r.secrets.first() else {
            return Err(PluginError::new(404, format!("secret {id:?} not found")));
        };
        let mut o = status_json(st);
        if let Some(vs) = o.get_mut("versions").and_then(Value::as_array_mut) {
            for v in vs.iter_mut() {
                *v = without_secret(std::mem::take(v));
            }
        }
        Ok(Some(o))
    }
}

/// `value` for the kinds that take one: a string, or an object of
/// strings for structured values.
fn take_value(p: &mut Params) -> Result<Option<rk::SecretValue>, PluginError> {
    match p.take("value") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(mut s)) => {
            let v = rk::SecretValue {
                value: Some(rk::secret_value::Value::Raw(s.as_bytes().to_vec())),
            };
            zeroize::Zeroize::zeroize(&mut s);
            Ok(Some(v))
        }
        Some(Value::Object(m)) => {
            let mut fields = std::collections::HashMap::new();
            for (k, v) in m {
                match v {
                    Value::String(s) => {
                        fields.insert(k, s);
                    }
                    _ => {
                        return Err(PluginError::bad_request(format!(
                            "value.{k} must be a string"
                        )));
                    }
                }
            }
            Ok(Some(rk::SecretValue {
                value: Some(rk::secret_value::Value::Fields(rk::StructuredValue {
                    fields,
                })),
            }))
        }
        Some(_) => Err(PluginError::bad_request(
            "value must be a string, or an object of strings",
        )),
    }
}

/// A version's JSON without the `secret` field its mount path names.
fn without_secret(mut v: Value) -> Value {
    if let Some(o) = v.as_object_mut() {
        o.remove("secret");
        o.remove("value");
    }
    v
}

/// The answer of a change: the secret's metadata and the version it made
/// or touched (without a value).
fn secret_and_version(secret: Option<rk::Secret>, version: Option<rk::Version>) -> Value {
    let secret = secret.unwrap_or_default();
    let mut o = secret_json(&secret);
    if let Some(v) = version {
        o["version"] = without_secret(version_json(&secret.id, &v));
    }
    o
}

/// The configuration a write makes: the stored one (if any) with the
/// fields the write names changed, checked.
///
/// The stored token goes only where it went before: a write that changes
/// the address or the CA must bring the token too (a caller allowed to
/// write the config is not thereby allowed to send the token elsewhere),
/// and moving from `https://` to `http://` needs `allow_plaintext=true`.
pub fn merge_config(old: Option<Config>, p: &Params) -> Result<Config, PluginError> {
    takes_only(p, "config")?;
    let before = old.clone();
    let mut c = old.unwrap_or_default();
    if let Some(a) = p.text("address")? {
        c.address = a;
    }
    let token_given = p.string("token")?.is_some();
    if let Some(t) = p.string("token")? {
        c.token = t;
    }
    if let Some(ca) = p.string("ca_pem")? {
        c.ca_pem = (!ca.trim().is_empty()).then_some(ca);
    }
    if c.address.is_empty() {
        return Err(PluginError::bad_request(
            "address is required: the rekey backend's gRPC address, e.g. http://rekey-backend.rekey:7700",
        ));
    }
    if let Some(b) = &before {
        let moved = b.address != c.address || b.ca_pem != c.ca_pem;
        if moved && !b.token.is_empty() && !token_given {
            return Err(PluginError::bad_request(
                "a write that changes address or ca_pem must give token too: the stored token is sent only to the backend and CA it was written with",
            ));
        }
        let https = |a: &str| a.starts_with("https://");
        if https(&b.address)
            && !https(&c.address)
            && !p.boolean("allow_plaintext")?.unwrap_or(false)
        {
            return Err(PluginError::bad_request(
                "moving from https:// to http:// sends the token unencrypted: give allow_plaintext=true to do it anyway",
            ));
        }
    }
    c.check()?;
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_find_their_route_and_ids_keep_their_slashes() {
        let (r, id) = route("rotate/prod/api/db").unwrap();
        assert_eq!((r.name, id), ("rotate", Some("prod/api/db")));
        assert_eq!(route("secrets/").unwrap().0.operations, ["list"]);
        let (r, prefix) = route("secrets/prod/api/").unwrap();
        assert_eq!((r.name, prefix), ("secrets/", Some("prod/api/")));
        assert_eq!(route("secrets/x").unwrap().1, Some("x"));
        assert!(route("config").unwrap().1.is_none());
        assert!(route("rotate/").is_none());
        assert!(route("rotate").is_none());
        assert!(route("nope/x").is_none());
    }

    #[test]
    fn every_path_has_help_with_its_parameters() {
        let h = help("rotate/x");
        assert!(h.contains("request_token (string)"), "{h}");
        assert!(h.contains("## DESCRIPTION"), "{h}");
        assert!(help("revoke/x").contains("reason (string)"));
        for r in ROUTES {
            let p = if r.id {
                format!("{}/x", r.name)
            } else {
                r.name.to_string()
            };
            assert!(help(&p).contains(r.synopsis), "{p}");
        }
        assert!(help("").contains("rotate/<id>"));
    }

    #[test]
    fn the_caller_is_named_with_safe_characters() {
        let c = Caller {
            request_id: "r".into(),
            entity_id: "7a1b-2c".into(),
            display_name: "userpass-alice smith\n".into(),
        };
        assert_eq!(
            c.on_behalf_of(),
            "vault:userpass-alice_smith_/entity=7a1b-2c"
        );
        assert_eq!(Caller::default().on_behalf_of(), "vault:unknown");
    }

    const CA: &str = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";

    fn stored(address: &str, ca: Option<&str>) -> Option<Config> {
        Some(Config {
            address: address.into(),
            token: "t0".into(),
            ca_pem: ca.map(str::to_string),
        })
    }

    #[test]
    fn a_config_write_merges_and_keeps_the_token_where_it_went() {
        let merged = |old, p| merge_config(old, &Params::from_json(p));
        // A new token alone, or the same address again: kept or replaced.
        let c = merged(stored("http://a:1", None), json!({"token": "t1"})).unwrap();
        assert_eq!((c.address.as_str(), c.token.as_str()), ("http://a:1", "t1"));
        let c = merged(stored("http://a:1", None), json!({"address": "http://a:1"})).unwrap();
        assert_eq!(c.token, "t0");
        let e = merged(None, json!({"token": "t"})).unwrap_err();
        assert!(e.message.contains("address is required"), "{e}");

        // Another address or CA without the token: the stored token would
        // go to somebody else's listener. Refused.
        for p in [
            json!({"address": "http://attacker:7700"}),
            json!({"address": "https://attacker:7700", "ca_pem": CA}),
            json!({"ca_pem": CA.replace("MIIB", "MIIC")}),
        ] {
            let e = merged(stored("https://a:1", Some(CA)), p.clone()).unwrap_err();
            assert_eq!(e.status, 400, "{p}");
            assert!(e.message.contains("must give token too"), "{p}: {e}");
        }
        let c = merged(
            stored("http://a:1", None),
            json!({"address": "http://b:2", "token": "t2"}),
        )
        .unwrap();
        assert_eq!((c.address.as_str(), c.token.as_str()), ("http://b:2", "t2"));

        // https to http: only when asked for, token given or not.
        let e = merged(
            stored("https://a:1", Some(CA)),
            json!({"address": "http://a:1", "token": "t2", "ca_pem": ""}),
        )
        .unwrap_err();
        assert!(e.message.contains("allow_plaintext=true"), "{e}");
        let c = merged(
            stored("https://a:1", Some(CA)),
            json!({"address": "http://a:1", "token": "t2", "ca_pem": "", "allow_plaintext": true}),
        )
        .unwrap();
        assert_eq!(c.address, "http://a:1");
    }
}
