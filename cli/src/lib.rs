//! `rekey`, the operator CLI: a gRPC client of `rekey-backend`.
//!
//! Human tables by default, `-o json` for scripts. Exit 0 on success;
//! otherwise one line on stderr, `error: <what>: <detail>`, and a non-zero
//! exit (1 for a refused or failed call, 2 for a usage error).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};
use rekey_proto::v1 as pb;
use rekey_proto::v1::rekey_client::RekeyClient;
use serde_json::{Value, json};
use tonic::Code;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;

use rekey_proto::format_time;

pub mod demo;
pub mod reencrypt;

#[derive(Debug, Parser)]
#[command(
    name = "rekey",
    version,
    about = "Rotate secrets with zero downtime: the rekey operator CLI"
)]
pub struct Cli {
    /// Backend address.
    #[arg(
        long,
        env = "REKEY_ADDR",
        default_value = "http://127.0.0.1:7700",
        global = true
    )]
    pub addr: String,
    /// Bearer token. Default: the file ./rekey-data/admin.token when present.
    #[arg(long, env = "REKEY_TOKEN", hide_env_values = true, global = true)]
    pub token: Option<String>,
    /// Read the bearer token from this file.
    #[arg(long, env = "REKEY_TOKEN_FILE", global = true)]
    pub token_file: Option<PathBuf>,
    /// CA certificate (PEM) that signed the backend's certificate, for
    /// https:// addresses.
    #[arg(long, env = "REKEY_CA_FILE", global = true)]
    pub ca_file: Option<PathBuf>,
    /// Client certificate (PEM) for mTLS; its common name is your identity.
    #[arg(long, env = "REKEY_CERT_FILE", global = true, requires = "key_file")]
    pub cert_file: Option<PathBuf>,
    /// Client private key (PEM) for mTLS.
    #[arg(long, env = "REKEY_KEY_FILE", global = true, requires = "cert_file")]
    pub key_file: Option<PathBuf>,
    /// Output format.
    #[arg(
        short = 'o',
        long = "output",
        value_enum,
        default_value = "table",
        global = true
    )]
    pub output: Output,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Start a backend, two sidecars and two apps, rotate under load and
    /// print a timeline. The first thing to run.
    Demo(crate::demo::DemoArgs),
    /// Re-encrypt database columns from the old master key to the new one
    /// (the runbook's script; resumable, safe beside a running app).
    Reencrypt(crate::reencrypt::ReencryptArgs),
    /// Create a secret and store version 1 as current.
    Create(Box<CreateArgs>),
    /// Rotate a secret: create, set, test and finish a new version.
    Rotate {
        secret: String,
        /// Makes retries safe: the same token returns the same version.
        #[arg(long)]
        request_token: Option<String>,
        /// The new value (static and encryption-key secrets); `-` for stdin.
        #[arg(long)]
        value_file: Option<PathBuf>,
        /// Clear a rotation parked as needs-attention (or abort one in
        /// flight) instead of rotating.
        #[arg(long, conflicts_with_all = ["request_token", "value_file", "wait"])]
        cancel: bool,
        /// If previous is not decommissioned yet, wait until it is, then
        /// rotate.
        #[arg(long)]
        wait: bool,
    },
    /// Show one version (current by default); its value only with --reveal.
    Get {
        secret: String,
        #[arg(long, value_enum, conflicts_with = "version")]
        stage: Option<StageArg>,
        #[arg(long)]
        version: Option<u64>,
        /// Print the value (audited).
        #[arg(long)]
        reveal: bool,
    },
    /// List every version of a secret, newest first.
    Versions { secret: String },
    /// List secrets, optionally under a prefix.
    List { prefix: Option<String> },
    /// Make the previous version current again.
    Rollback { secret: String },
    /// Revoke a version (not the current one).
    Revoke {
        secret: String,
        #[arg(long)]
        version: u64,
        /// Revoke previous before the decommission conditions hold.
        #[arg(long, requires = "reason")]
        force: bool,
        /// Why (recorded in the audit log); required with --force.
        #[arg(long)]
        reason: Option<String>,
    },
    /// Stages, rotation state, consumers and what holds decommission back.
    Status { secret: Option<String> },
    /// Show the audit log, or verify its hash chain.
    Audit {
        /// Only events of this secret.
        #[arg(long)]
        secret: Option<String>,
        /// Recompute the hash chain and report the first break.
        #[arg(long)]
        verify: bool,
        /// At most this many events.
        #[arg(long, default_value_t = 1000)]
        limit: u32,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StageArg {
    Current,
    Previous,
    Pending,
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    pub secret: String,
    #[arg(long, value_parser = ["random", "encryption-key", "static", "postgres", "redis", "exec"])]
    pub kind: String,
    /// random: bytes of entropy (characters for alnum). Default 32.
    #[arg(long)]
    pub length: Option<u32>,
    /// random: hex, base64, base64url (default) or alnum.
    #[arg(long)]
    pub encoding: Option<String>,
    /// Version 1's value (static, encryption-key); `-` for stdin.
    #[arg(long)]
    pub value_file: Option<PathBuf>,
    /// "manual", an interval ("30d", "every 12h") or cron ("0 3 * * 1", UTC).
    #[arg(long)]
    pub schedule: Option<String>,
    /// Validation window: how long previous stays valid after a rotation.
    #[arg(long, default_value = "30m")]
    pub window: String,
    /// Scheduled rotations happen at a random point within this window.
    #[arg(long)]
    pub rotation_window: Option<String>,
    /// Extra random delay for scheduled rotations.
    #[arg(long)]
    pub jitter: Option<String>,
    /// Never rotate on schedule sooner than this after the last rotation.
    #[arg(long)]
    pub min_interval: Option<String>,
    /// One-off time of the next scheduled rotation (RFC 3339).
    #[arg(long)]
    pub next_rotation_at: Option<String>,
    /// postgres, redis: a file holding the admin connection URL.
    #[arg(long)]
    pub admin_url_file: Option<PathBuf>,
    /// postgres: the role that owns the app's objects.
    #[arg(long)]
    pub group_role: Option<String>,
    /// postgres: login roles are BASE_a and BASE_b.
    #[arg(long)]
    pub role_base: Option<String>,
    /// postgres: the database apps connect to.
    #[arg(long)]
    pub database: Option<String>,
    /// postgres: host apps connect to (default: the admin URL's).
    #[arg(long)]
    pub host: Option<String>,
    /// postgres: port apps connect to (default: the admin URL's).
    #[arg(long)]
    pub port: Option<u16>,
    /// postgres: SQL the test step runs as the new role (default SELECT 1).
    #[arg(long)]
    pub probe: Option<String>,
    /// postgres: terminate the old role's sessions at decommission.
    #[arg(long)]
    pub terminate_sessions: bool,
    /// redis: the ACL user whose passwords rotate.
    #[arg(long)]
    pub username: Option<String>,
    /// redis: address apps connect to (default: the admin URL's).
    #[arg(long)]
    pub address: Option<String>,
    /// exec: hook that prints a new value.
    #[arg(long)]
    pub hook_create: Option<PathBuf>,
    /// exec: hook that makes the new value valid where it is used.
    #[arg(long)]
    pub hook_set: Option<PathBuf>,
    /// exec: hook that proves the new value works.
    #[arg(long)]
    pub hook_test: Option<PathBuf>,
    /// exec: hook that makes an old value stop working.
    #[arg(long)]
    pub hook_revoke: Option<PathBuf>,
    /// exec: time limit per hook run.
    #[arg(long)]
    pub hook_timeout: Option<String>,
}

/// A failure to report: `error: {what}: {detail}`.
#[derive(Debug)]
pub struct CliError(pub String);

impl From<tonic::Status> for CliError {
    fn from(s: tonic::Status) -> Self {
        let what = match s.code() {
            Code::NotFound => "not found",
            Code::InvalidArgument => "invalid argument",
            Code::FailedPrecondition => "failed precondition",
            Code::AlreadyExists => "already exists",
            Code::Unauthenticated => "unauthenticated",
            Code::PermissionDenied => "permission denied",
            Code::Unavailable => "unavailable",
            Code::DeadlineExceeded => "deadline exceeded",
            _ => "error",
        };
        CliError(format!("{what}: {}", s.message()))
    }
}

type CliResult<T> = Result<T, CliError>;

fn usage(msg: impl Into<String>) -> CliError {
    CliError(format!("invalid argument: {}", msg.into()))
}

fn duration_ms(flag: &str, v: Option<&str>) -> CliResult<i64> {
    match v {
        None => Ok(0),
        Some(s) => humantime::parse_duration(s.trim())
            .map(|d| d.as_millis() as i64)
            .map_err(|_| usage(format!("{flag} {s:?} is not a duration such as 30m or 1h"))),
    }
}

fn read_value(path: &Path) -> CliResult<pb::SecretValue> {
    let mut buf = Vec::new();
    let r = if path == Path::new("-") {
        std::io::stdin().read_to_end(&mut buf)
    } else {
        std::fs::File::open(path).and_then(|mut f| f.read_to_end(&mut buf))
    };
    r.map_err(|e| usage(format!("cannot read --value-file {}: {e}", path.display())))?;
    Ok(pb::SecretValue {
        value: Some(pb::secret_value::Value::Raw(buf)),
    })
}

fn path_str(p: Option<&Path>) -> String {
    p.map(|p| p.display().to_string()).unwrap_or_default()
}

/// Polls status until the secret has no previous version and no rotation
/// in flight (one rotation at a time for postgres, redis and exec).
async fn wait_for_decommission<T>(client: &mut RekeyClient<T>, secret: &str) -> CliResult<()>
where
    T: tonic::client::GrpcService<tonic::body::Body>,
    T::Error: Into<tonic::codegen::StdError>,
    T::ResponseBody: tonic::codegen::Body<Data = tonic::codegen::Bytes> + Send + 'static,
    <T::ResponseBody as tonic::codegen::Body>::Error: Into<tonic::codegen::StdError> + Send,
{
    let mut said = false;
    loop {
        let st = client
            .get_status(pb::GetStatusRequest {
                secret_id: secret.to_string(),
            })
            .await?
            .into_inner();
        let s = st.secrets.first().cloned().unwrap_or_default();
        let sec = s.secret.unwrap_or_default();
        if sec.previous_version == 0 && sec.pending_version == 0 {
            return Ok(());
        }
        if !said {
            eprintln!(
                "waiting: previous v{} of {secret} is not decommissioned yet ({})",
                sec.previous_version,
                s.decommission_blockers.join("; ")
            );
            said = true;
        }
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
}

fn stage_names(stages: &[i32]) -> Vec<&'static str> {
    stages
        .iter()
        .map(|s| {
            pb::Stage::try_from(*s)
                .unwrap_or(pb::Stage::Unspecified)
                .label()
        })
        .collect()
}

fn state_name(s: i32) -> &'static str {
    pb::VersionState::try_from(s)
        .unwrap_or(pb::VersionState::Unspecified)
        .label()
}

/// The value as JSON: a string, or an object for structured kinds. Raw
/// bytes that are not UTF-8 are shown as `{"base64": "..."}`.
fn value_json(v: &pb::SecretValue) -> Value {
    use base64::Engine as _;
    match &v.value {
        Some(pb::secret_value::Value::Raw(b)) => match std::str::from_utf8(b) {
            Ok(s) => Value::String(s.to_string()),
            Err(_) => json!({ "base64": base64::engine::general_purpose::STANDARD.encode(b) }),
        },
        Some(pb::secret_value::Value::Fields(f)) => Value::Object(
            f.fields
                .iter()
                .map(|(k, v)| (k.clone(), Value::String(v.clone())))
                .collect(),
        ),
        None => Value::Null,
    }
}

/// A version as JSON (the shape scripts rely on).
pub fn version_json(secret: &str, v: &pb::Version) -> Value {
    let mut o = json!({
        "secret": secret,
        "version": v.version,
        "created_at": format_time(v.created_at_ms),
        "stages": stage_names(&v.stages),
        "state": state_name(v.state),
    });
    if v.revoked_at_ms > 0 {
        o["revoked_at"] = Value::String(format_time(v.revoked_at_ms));
    }
    if let Some(val) = &v.value {
        o["value"] = value_json(val);
    }
    o
}

/// `v7 (2026-11-26T12:28:15.123Z)`.
pub fn version_label(v: &pb::Version) -> String {
    format!("v{} ({})", v.version, format_time(v.created_at_ms))
}

fn secret_json(s: &pb::Secret) -> Value {
    let opt = |n: u64| if n == 0 { Value::Null } else { json!(n) };
    let t = |ms: i64| {
        if ms == 0 {
            Value::Null
        } else {
            json!(format_time(ms))
        }
    };
    let sched = s.schedule.clone().unwrap_or_default();
    json!({
        "id": s.id,
        "kind": s.kind,
        "current_version": opt(s.current_version),
        "previous_version": opt(s.previous_version),
        "pending_version": opt(s.pending_version),
        "created_at": t(s.created_at_ms),
        "last_rotated_at": t(s.last_rotated_at_ms),
        "next_rotation_at": t(s.next_rotation_at_ms),
        "schedule": if sched.spec.is_empty() { "manual".to_string() } else { sched.spec },
        "validation_window": humantime::format_duration(std::time::Duration::from_millis(s.validation_window_ms.max(0) as u64)).to_string(),
        "revision": s.revision,
    })
}

/// Prints rows as aligned columns.
fn table(headers: &[&str], rows: Vec<Vec<String>>) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let s: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect();
        println!("{}", s.join("  ").trim_end());
    };
    line(headers.iter().map(|h| h.to_string()).collect());
    for r in rows {
        line(r);
    }
}

fn version_row(v: &pb::Version) -> Vec<String> {
    vec![
        format!("v{}", v.version),
        format_time(v.created_at_ms),
        stage_names(&v.stages).join(","),
        state_name(v.state).to_string(),
    ]
}

fn print_json(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

fn resolve_token(cli: &Cli) -> CliResult<Option<String>> {
    if let Some(t) = &cli.token {
        return Ok(Some(t.trim().to_string()));
    }
    let path = cli
        .token_file
        .clone()
        .or_else(|| Some(PathBuf::from("./rekey-data/admin.token")).filter(|p| p.exists()));
    match path {
        Some(p) => std::fs::read_to_string(&p)
            .map(|t| Some(t.trim().to_string()))
            .map_err(|e| usage(format!("cannot read token file {}: {e}", p.display()))),
        None => Ok(None),
    }
}

async fn connect(
    cli: &Cli,
) -> CliResult<
    RekeyClient<
        tonic::service::interceptor::InterceptedService<Channel, impl tonic::service::Interceptor>,
    >,
> {
    let token = resolve_token(cli)?;
    let header: Option<MetadataValue<tonic::metadata::Ascii>> = match token {
        Some(t) => {
            let mut v: MetadataValue<_> = format!("Bearer {t}")
                .parse()
                .map_err(|_| usage("the token contains characters not allowed in a header"))?;
            v.set_sensitive(true);
            Some(v)
        }
        None => None,
    };
    let mut endpoint = tonic::transport::Endpoint::from_shared(cli.addr.clone())
        .map_err(|_| {
            usage(format!(
                "--addr {:?} is not a URL such as http://127.0.0.1:7700",
                cli.addr
            ))
        })?
        .connect_timeout(std::time::Duration::from_secs(5));
    if cli.addr.starts_with("https://") {
        let read = |flag: &str, p: &Path| {
            std::fs::read(p).map_err(|e| usage(format!("cannot read {flag} {}: {e}", p.display())))
        };
        let mut tls = tonic::transport::ClientTlsConfig::new();
        if let Some(ca) = &cli.ca_file {
            tls = tls.ca_certificate(tonic::transport::Certificate::from_pem(read(
                "--ca-file",
                ca,
            )?));
        }
        if let (Some(c), Some(k)) = (&cli.cert_file, &cli.key_file) {
            tls = tls.identity(tonic::transport::Identity::from_pem(
                read("--cert-file", c)?,
                read("--key-file", k)?,
            ));
        }
        endpoint = endpoint
            .tls_config(tls)
            .map_err(|e| usage(format!("TLS settings: {e}")))?;
    }
    let channel = endpoint.connect().await.map_err(|e| {
        CliError(format!(
            "unavailable: cannot reach rekey-backend at {} ({e}); is it running?",
            cli.addr
        ))
    })?;
    Ok(
        RekeyClient::with_interceptor(channel, move |mut req: tonic::Request<()>| {
            if let Some(h) = &header {
                req.metadata_mut().insert("authorization", h.clone());
            }
            Ok(req)
        })
        .max_decoding_message_size(64 << 20),
    )
}

/// Runs the CLI; returns the process exit code.
pub async fn run(cli: Cli) -> ExitCode {
    if let Command::Reencrypt(args) = &cli.command {
        return match crate::reencrypt::run(args).await {
            Ok(summary) => {
                if cli.output == Output::Json {
                    println!("{summary}");
                } else {
                    crate::reencrypt::print_table(&summary);
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: reencrypt: {e}");
                ExitCode::from(1)
            }
        };
    }
    if let Command::Demo(args) = &cli.command {
        return match crate::demo::run(args.clone()).await {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => ExitCode::from(1),
            Err(e) => {
                eprintln!("error: demo: {e}");
                ExitCode::from(1)
            }
        };
    }
    match execute(&cli).await {
        Ok(code) => code,
        Err(CliError(msg)) => {
            eprintln!("error: {msg}");
            ExitCode::from(1)
        }
    }
}

async fn execute(cli: &Cli) -> CliResult<ExitCode> {
    let json_out = cli.output == Output::Json;
    let mut client = connect(cli).await?;
    match &cli.command {
        Command::Demo(_) | Command::Reencrypt(_) => unreachable!("handled in run"),
        Command::Create(a) => {
            let next_override = match &a.next_rotation_at {
                None => 0,
                Some(s) => chrono::DateTime::parse_from_rfc3339(s)
                    .map_err(|_| {
                        usage(format!("--next-rotation-at {s:?} is not an RFC 3339 time"))
                    })?
                    .timestamp_millis(),
            };
            if a.length == Some(0) {
                return Err(usage("--length must be at least 1"));
            }
            let req = pb::CreateSecretRequest {
                id: a.secret.clone(),
                kind: a.kind.clone(),
                random: (a.length.is_some() || a.encoding.is_some()).then(|| pb::RandomOptions {
                    length: a.length.unwrap_or(0),
                    encoding: a.encoding.clone().unwrap_or_default(),
                }),
                schedule: Some(pb::Schedule {
                    spec: a.schedule.clone().unwrap_or_default(),
                    rotation_window_ms: duration_ms(
                        "--rotation-window",
                        a.rotation_window.as_deref(),
                    )?,
                    jitter_ms: duration_ms("--jitter", a.jitter.as_deref())?,
                    min_interval_ms: duration_ms("--min-interval", a.min_interval.as_deref())?,
                    next_rotation_at_ms: next_override,
                }),
                validation_window_ms: Some(duration_ms("--window", Some(&a.window))?),
                value: a.value_file.as_deref().map(read_value).transpose()?,
                postgres: (a.kind == "postgres").then(|| pb::PostgresOptions {
                    admin_url_file: path_str(a.admin_url_file.as_deref()),
                    group_role: a.group_role.clone().unwrap_or_default(),
                    role_base: a.role_base.clone().unwrap_or_default(),
                    database: a.database.clone().unwrap_or_default(),
                    host: a.host.clone().unwrap_or_default(),
                    port: a.port.map(u32::from).unwrap_or(0),
                    probe: a.probe.clone().unwrap_or_default(),
                    terminate_sessions: a.terminate_sessions,
                }),
                redis: (a.kind == "redis").then(|| pb::RedisOptions {
                    admin_url_file: path_str(a.admin_url_file.as_deref()),
                    username: a.username.clone().unwrap_or_default(),
                    address: a.address.clone().unwrap_or_default(),
                }),
                exec: if a.kind == "exec" {
                    Some(pb::ExecOptions {
                        create: path_str(a.hook_create.as_deref()),
                        set: path_str(a.hook_set.as_deref()),
                        test: path_str(a.hook_test.as_deref()),
                        revoke: path_str(a.hook_revoke.as_deref()),
                        timeout_ms: duration_ms("--hook-timeout", a.hook_timeout.as_deref())?
                            as u64,
                    })
                } else {
                    None
                },
            };
            let r = client.create_secret(req).await?.into_inner();
            let s = r.secret.unwrap_or_default();
            let v = r.version.unwrap_or_default();
            if json_out {
                let mut o = version_json(&s.id, &v);
                o["kind"] = json!(s.kind);
                print_json(&o);
            } else {
                println!("created {} ({}) at {}", s.id, s.kind, version_label(&v));
            }
        }
        Command::Rotate {
            secret,
            request_token,
            value_file,
            cancel,
            wait,
        } => {
            let req = pb::RotateRequest {
                secret_id: secret.clone(),
                request_token: request_token.clone().unwrap_or_default(),
                value: value_file.as_deref().map(read_value).transpose()?,
                cancel: *cancel,
            };
            if *wait {
                wait_for_decommission(&mut client, secret).await?;
            }
            let r = client.rotate(req).await?.into_inner();
            if *cancel {
                let s = r.secret.unwrap_or_default();
                if json_out {
                    print_json(&secret_json(&s));
                } else {
                    println!("cancelled: {} stays at v{}", s.id, s.current_version);
                }
                return Ok(ExitCode::SUCCESS);
            }
            let s = r.secret.unwrap_or_default();
            let v = r.version.unwrap_or_default();
            if json_out {
                let mut o = version_json(&s.id, &v);
                o["replayed"] = json!(r.replayed);
                print_json(&o);
            } else {
                let prev = if s.previous_version > 0 {
                    format!("; previous is v{}", s.previous_version)
                } else {
                    String::new()
                };
                let replay = if r.replayed {
                    " (repeated request)"
                } else {
                    ""
                };
                println!("rotated {} to {}{prev}{replay}", s.id, version_label(&v));
            }
        }
        Command::Get {
            secret,
            stage,
            version,
            reveal,
        } => {
            let selector = match (stage, version) {
                (_, Some(n)) => Some(pb::get_secret_request::Selector::Version(*n)),
                (Some(st), None) => Some(pb::get_secret_request::Selector::Stage(match st {
                    StageArg::Current => pb::Stage::Current,
                    StageArg::Previous => pb::Stage::Previous,
                    StageArg::Pending => pb::Stage::Pending,
                }
                    as i32)),
                (None, None) => None,
            };
            let r = client
                .get_secret(pb::GetSecretRequest {
                    secret_id: secret.clone(),
                    selector,
                    reveal: *reveal,
                })
                .await?
                .into_inner();
            let v = r.version.unwrap_or_default();
            if json_out {
                print_json(&version_json(secret, &v));
            } else if let Some(val) = &v.value {
                // Revealed: the value alone, so it can be piped.
                match &val.value {
                    Some(pb::secret_value::Value::Raw(b)) => {
                        use std::io::Write;
                        let mut out = std::io::stdout();
                        let _ = out.write_all(b);
                        if !b.ends_with(b"\n") {
                            let _ = out.write_all(b"\n");
                        }
                    }
                    Some(pb::secret_value::Value::Fields(f)) => {
                        for (k, v) in &f.fields {
                            println!("{k}={v}");
                        }
                    }
                    None => {}
                }
            } else {
                table(
                    &["VERSION", "CREATED", "STAGES", "STATE"],
                    vec![version_row(&v)],
                );
            }
        }
        Command::Versions { secret } => {
            let r = client
                .list_versions(pb::ListVersionsRequest {
                    secret_id: secret.clone(),
                })
                .await?
                .into_inner();
            if json_out {
                print_json(&Value::Array(
                    r.versions.iter().map(|v| version_json(secret, v)).collect(),
                ));
            } else {
                table(
                    &["VERSION", "CREATED", "STAGES", "STATE"],
                    r.versions.iter().map(version_row).collect(),
                );
            }
        }
        Command::List { prefix } => {
            let r = client
                .list_secrets(pb::ListSecretsRequest {
                    prefix: prefix.clone().unwrap_or_default(),
                })
                .await?
                .into_inner();
            if json_out {
                print_json(&Value::Array(r.secrets.iter().map(secret_json).collect()));
            } else {
                table(
                    &["SECRET", "KIND", "CURRENT", "PREVIOUS", "NEXT ROTATION"],
                    r.secrets
                        .iter()
                        .map(|s| {
                            vec![
                                s.id.clone(),
                                s.kind.clone(),
                                format!("v{}", s.current_version),
                                if s.previous_version > 0 {
                                    format!("v{}", s.previous_version)
                                } else {
                                    "-".into()
                                },
                                if s.next_rotation_at_ms > 0 {
                                    format_time(s.next_rotation_at_ms)
                                } else {
                                    "manual".into()
                                },
                            ]
                        })
                        .collect(),
                );
            }
        }
        Command::Rollback { secret } => {
            let r = client
                .rollback(pb::RollbackRequest {
                    secret_id: secret.clone(),
                })
                .await?
                .into_inner();
            let s = r.secret.unwrap_or_default();
            let v = r.version.unwrap_or_default();
            if json_out {
                print_json(&version_json(&s.id, &v));
            } else {
                println!(
                    "rolled back {} to {}; v{} is previous",
                    s.id,
                    version_label(&v),
                    s.previous_version
                );
            }
        }
        Command::Revoke {
            secret,
            version,
            force,
            reason,
        } => {
            let r = client
                .revoke(pb::RevokeRequest {
                    secret_id: secret.clone(),
                    version: *version,
                    force: *force,
                    reason: reason.clone().unwrap_or_default(),
                })
                .await?
                .into_inner();
            let v = r.version.unwrap_or_default();
            if json_out {
                print_json(&version_json(secret, &v));
            } else {
                println!("revoked {} {}", secret, version_label(&v));
            }
        }
        Command::Status { secret } => {
            let r = client
                .get_status(pb::GetStatusRequest {
                    secret_id: secret.clone().unwrap_or_default(),
                })
                .await?
                .into_inner();
            if json_out {
                print_json(&status_json(&r));
            } else {
                print_status(&r);
            }
        }
        Command::Audit {
            secret,
            verify,
            limit,
        } => {
            if *verify {
                let r = client
                    .verify_audit(pb::VerifyAuditRequest {})
                    .await?
                    .into_inner();
                if json_out {
                    print_json(&json!({
                        "ok": r.ok,
                        "checked": r.checked,
                        "first_bad_seq": if r.ok { Value::Null } else { json!(r.first_bad_seq) },
                        "problem": if r.ok { Value::Null } else { json!(r.problem) },
                    }));
                } else if r.ok {
                    println!("audit log intact: {} events verified", r.checked);
                }
                if !r.ok {
                    eprintln!(
                        "error: audit log broken at event {}: {} ({} events before it verified)",
                        r.first_bad_seq, r.problem, r.checked
                    );
                    return Ok(ExitCode::from(1));
                }
            } else {
                let r = client
                    .list_audit(pb::ListAuditRequest {
                        secret_id: secret.clone().unwrap_or_default(),
                        after_seq: 0,
                        limit: *limit,
                    })
                    .await?
                    .into_inner();
                if json_out {
                    print_json(&Value::Array(
                        r.events
                            .iter()
                            .map(|e| {
                                json!({
                                    "seq": e.seq,
                                    "time": format_time(e.time_ms),
                                    "actor": e.actor,
                                    "action": e.action,
                                    "secret": e.secret_id,
                                    "version": e.version,
                                    "outcome": e.outcome,
                                    "request_id": e.request_id,
                                    "detail": e.detail,
                                    "hash": e.hash,
                                })
                            })
                            .collect(),
                    ));
                } else {
                    table(
                        &[
                            "SEQ", "TIME", "ACTOR", "ACTION", "SECRET", "VERSION", "OUTCOME",
                            "DETAIL",
                        ],
                        r.events
                            .iter()
                            .map(|e| {
                                vec![
                                    e.seq.to_string(),
                                    format_time(e.time_ms),
                                    e.actor.clone(),
                                    e.action.clone(),
                                    e.secret_id.clone(),
                                    if e.version > 0 {
                                        format!("v{}", e.version)
                                    } else {
                                        "-".into()
                                    },
                                    e.outcome.clone(),
                                    e.detail.clone(),
                                ]
                            })
                            .collect(),
                    );
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn status_json(r: &pb::GetStatusResponse) -> Value {
    Value::Array(
        r.secrets
            .iter()
            .map(|st| {
                let s = st.secret.clone().unwrap_or_default();
                let mut o = secret_json(&s);
                o["versions"] =
                    Value::Array(st.versions.iter().map(|v| version_json(&s.id, v)).collect());
                o["consumers"] = Value::Array(
                    st.consumers
                        .iter()
                        .map(|k| {
                            json!({
                                "consumer_id": k.consumer_id,
                                "pod": k.pod,
                                "namespace": k.namespace,
                                "identity": k.identity,
                                "version": k.version,
                                "healthy": k.healthy,
                                "error": k.error,
                                "reported_at": format_time(k.reported_at_ms),
                                "live": k.live,
                            })
                        })
                        .collect(),
                );
                o["live_consumers"] = json!(st.live_consumers);
                o["converged_consumers"] = json!(st.converged);
                o["decommission_blockers"] = json!(st.decommission_blockers);
                o["reencryption"] = match &st.reencryption {
                    Some(r) => json!({
                        "version": r.version,
                        "consumer_id": r.consumer_id,
                        "rows_done": r.rows_done,
                        "rows_total": r.rows_total,
                        "rows_remaining": r.rows_total.saturating_sub(r.rows_done),
                        "rate": r.rate,
                        "eta_seconds": eta(r),
                        "finished": r.finished,
                        "phase": r.phase,
                        "updated_at": format_time(r.updated_at_ms),
                    }),
                    None => Value::Null,
                };
                o["rotation"] = match &st.rotation {
                    Some(r) => json!({
                        "target_version": r.target_version,
                        "step": r.step,
                        "error": r.error,
                        "started_at": format_time(r.started_at_ms),
                        "updated_at": format_time(r.updated_at_ms),
                    }),
                    None => Value::Null,
                };
                o
            })
            .collect(),
    )
}

/// Seconds left at the reported rate, while unfinished.
fn eta(r: &pb::Reencryption) -> Option<f64> {
    let left = r.rows_total.saturating_sub(r.rows_done) as f64;
    (!r.finished && r.rate > 0.0).then(|| left / r.rate)
}

fn print_status(r: &pb::GetStatusResponse) {
    for (i, st) in r.secrets.iter().enumerate() {
        if i > 0 {
            println!();
        }
        let s = st.secret.clone().unwrap_or_default();
        let label = |n: u64| {
            st.versions
                .iter()
                .find(|v| v.version == n)
                .map(version_label)
                .unwrap_or_else(|| "-".into())
        };
        println!("{} ({})", s.id, s.kind);
        println!("  current:   {}", label(s.current_version));
        println!("  previous:  {}", label(s.previous_version));
        if s.pending_version > 0 {
            println!("  pending:   {}", label(s.pending_version));
        }
        println!(
            "  schedule:  {}{}",
            s.schedule
                .as_ref()
                .map(|x| x.spec.as_str())
                .filter(|x| !x.is_empty())
                .unwrap_or("manual"),
            if s.next_rotation_at_ms > 0 {
                format!(", next at {}", format_time(s.next_rotation_at_ms))
            } else {
                String::new()
            }
        );
        if let Some(rot) = &st.rotation {
            println!(
                "  rotation:  v{} {}{}",
                rot.target_version,
                rot.step,
                if rot.error.is_empty() {
                    String::new()
                } else {
                    format!(": {}", rot.error)
                }
            );
        }
        println!(
            "  consumers: {}/{} live on current",
            st.converged, st.live_consumers
        );
        for k in &st.consumers {
            println!(
                "    {} {}/{} v{}{}{}",
                k.consumer_id,
                k.namespace,
                k.pod,
                k.version,
                if k.live { "" } else { " (not live)" },
                if k.error.is_empty() {
                    String::new()
                } else {
                    format!(" error: {}", k.error)
                }
            );
        }
        if let Some(r) = &st.reencryption {
            println!(
                "  re-encryption to v{}: {} of {} rows, {} remaining, {:.0} rows/s{}, {}{}",
                r.version,
                r.rows_done,
                r.rows_total,
                r.rows_total.saturating_sub(r.rows_done),
                r.rate,
                eta(r)
                    .map(|e| format!(", ETA {e:.0} s"))
                    .unwrap_or_default(),
                r.phase,
                if r.finished { " (finished)" } else { "" }
            );
        }
        if s.previous_version > 0 {
            if st.decommission_blockers.is_empty() {
                println!("  decommission: previous may be revoked now");
            } else {
                println!("  decommission held back by:");
                for b in &st.decommission_blockers {
                    println!("    - {b}");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_json_has_the_documented_fields() {
        let v = pb::Version {
            version: 7,
            created_at_ms: 1_795_000_000_123,
            stages: vec![pb::Stage::Current as i32, pb::Stage::Pending as i32],
            state: pb::VersionState::Active as i32,
            revoked_at_ms: 0,
            value: None,
        };
        let j = version_json("prod/x", &v);
        assert_eq!(j["version"], 7);
        assert_eq!(j["created_at"], "2026-11-18T11:06:40.123Z");
        assert_eq!(j["stages"], json!(["current", "pending"]));
        assert_eq!(j["state"], "active");
        assert!(j.get("value").is_none());
        assert_eq!(version_label(&v), "v7 (2026-11-18T11:06:40.123Z)");
    }

    #[test]
    fn values_are_strings_or_objects() {
        let raw = pb::SecretValue {
            value: Some(pb::secret_value::Value::Raw(b"abc".to_vec())),
        };
        assert_eq!(value_json(&raw), json!("abc"));
        let f = pb::SecretValue {
            value: Some(pb::secret_value::Value::Fields(pb::StructuredValue {
                fields: [("username".to_string(), "u".to_string())].into(),
            })),
        };
        assert_eq!(value_json(&f), json!({"username": "u"}));
        let bin = pb::SecretValue {
            value: Some(pb::secret_value::Value::Raw(vec![0xff, 0xfe])),
        };
        assert_eq!(value_json(&bin), json!({"base64": "//4="}));
    }

    #[test]
    fn status_codes_read_as_words() {
        let e = CliError::from(tonic::Status::not_found("secret prod/x"));
        assert_eq!(e.0, "not found: secret prod/x");
        let e = CliError::from(tonic::Status::unauthenticated("no bearer token"));
        assert_eq!(e.0, "unauthenticated: no bearer token");
    }
}
