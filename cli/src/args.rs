//! The command line: global options and one argument struct per
//! subcommand. Parsing only; what each subcommand does is in
//! `commands/`, `demo/` and `reencrypt.rs`.

use std::path::PathBuf;

use clap::builder::NonEmptyStringValueParser;
use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::demo::{AppArgs, DemoArgs};
use crate::reencrypt::{ReencryptArgs, SealArgs};

#[derive(Debug, Parser)]
#[command(
    name = "rekey",
    version,
    about = "Rotate secrets with zero downtime: the rekey operator CLI"
)]
pub struct Cli {
    #[command(flatten)]
    pub backend: BackendArgs,
    /// Output format.
    #[arg(
        short = 'o',
        long = "output",
        value_enum,
        default_value = "table",
        global = true,
        help_heading = "Global options"
    )]
    pub output: Output,
    #[command(subcommand)]
    pub command: Command,
}

/// The help heading of the options that reach the backend.
const BACKEND: &str = "Backend options (every command that calls the backend)";

/// How to reach and authenticate to `rekey-backend`.
#[derive(Debug, Args)]
pub struct BackendArgs {
    /// Backend address.
    #[arg(
        long,
        env = "REKEY_ADDR",
        default_value = "http://127.0.0.1:7700",
        global = true,
        help_heading = BACKEND
    )]
    pub addr: String,
    /// Bearer token. Default: the file ./rekey-data/admin.token when present.
    #[arg(long, env = "REKEY_TOKEN", hide_env_values = true, global = true,
        help_heading = BACKEND)]
    pub token: Option<String>,
    /// Read the bearer token from this file.
    #[arg(long, env = "REKEY_TOKEN_FILE", global = true,
        help_heading = BACKEND)]
    pub token_file: Option<PathBuf>,
    /// CA certificate (PEM) that signed the backend's certificate, for
    /// https:// addresses.
    #[arg(long, env = "REKEY_CA_FILE", global = true,
        help_heading = BACKEND)]
    pub ca_file: Option<PathBuf>,
    /// Client certificate (PEM) for mTLS; its common name is your identity.
    #[arg(long, env = "REKEY_CERT_FILE", global = true,
        help_heading = BACKEND, requires = "key_file")]
    pub cert_file: Option<PathBuf>,
    /// Client private key (PEM) for mTLS.
    #[arg(long, env = "REKEY_KEY_FILE", global = true,
        help_heading = BACKEND, requires = "cert_file")]
    pub key_file: Option<PathBuf>,
}

/// Subcommands that never call a backend of the user's: the backend
/// options are not offered there.
const NO_BACKEND: &[&str] = &["demo", "demo-app"];

impl Cli {
    /// The command line as parsed, with the backend options hidden where
    /// they do not apply.
    #[must_use]
    pub fn command_line() -> clap::Command {
        let mut cmd = <Cli as clap::CommandFactory>::command();
        let backend: Vec<clap::Arg> =
            <BackendArgs as clap::Args>::augment_args(clap::Command::new("backend"))
                .get_arguments()
                .cloned()
                .collect();
        for name in NO_BACKEND {
            // A subcommand's own argument of the same id takes the global
            // one's place: hidden, and not handed up to the top level.
            cmd = cmd.mut_subcommand(*name, |sub| {
                sub.args(backend.iter().map(|a| {
                    a.clone()
                        .global(false)
                        .hide(true)
                        .requires(clap::builder::Resettable::Reset)
                }))
            });
        }
        cmd
    }

    /// Parses the process's arguments; exits with clap's message and
    /// status 2 on a malformed command line.
    #[must_use]
    pub fn parse_args() -> Cli {
        let matches = Self::command_line().get_matches();
        <Cli as clap::FromArgMatches>::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
    }
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
    Demo(DemoArgs),
    /// The demo's app (started by `rekey demo`, one per pod).
    #[command(hide = true)]
    DemoApp(AppArgs),
    /// Re-encrypt database columns from the old master key to the new one
    /// (the runbook's script; resumable, safe beside a running app).
    Reencrypt(ReencryptArgs),
    /// Encrypt one value the way an app stores it (hyvve or rekey
    /// envelope), e.g. to make test rows for `reencrypt`.
    Seal(SealArgs),
    /// Create a secret and store version 1 as current.
    Create(Box<CreateArgs>),
    /// Rotate a secret: create, set, test and finish a new version.
    Rotate(RotateArgs),
    /// Show one version (current by default); its value only with --reveal.
    Get(GetArgs),
    /// List every version of a secret, newest first.
    Versions {
        /// The secret's id, e.g. prod/api/database.
        secret: String,
    },
    /// List secrets, optionally under a prefix.
    List { prefix: Option<String> },
    /// Make the previous version current again.
    Rollback {
        /// The secret's id, e.g. prod/api/database.
        secret: String,
    },
    /// Revoke a version (not the current one).
    Revoke(RevokeArgs),
    /// Take a change made where a provider keeps the secret (Vault, AWS
    /// Secrets Manager) now instead of at the provider's next poll.
    Sync {
        /// The secret's id, e.g. prod/api/database.
        secret: String,
    },
    /// Stages, rotation state, consumers and what holds decommission back.
    Status {
        /// One secret's id; every secret you may read when absent.
        secret: Option<String>,
    },
    /// Show the audit log, or verify its hash chain.
    Audit(AuditArgs),
    /// Issue, list and revoke tokens for identities (a sidecar's, a CI
    /// job's) without editing the backend's configuration.
    #[command(subcommand)]
    Token(TokenCommand),
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Issue a token; it is printed once and never stored.
    Create(TokenCreateArgs),
    /// Issued tokens (never the tokens themselves).
    List,
    /// Revoke an issued token, at once.
    Revoke {
        /// The token's id (tok_...), as `token create` and `token list` show it.
        id: String,
    },
}

#[derive(Debug, Args)]
pub struct TokenCreateArgs {
    /// The identity the token authenticates as (audit logs name it).
    pub identity: String,
    /// A secret-id prefix the token may act on (repeatable; "" means every
    /// secret).
    #[arg(long = "prefix", required = true)]
    pub prefixes: Vec<String>,
    /// Operations, comma separated: create rotate revoke rollback read
    /// reveal watch report audit tokens. A sidecar needs watch,report (and
    /// read for re-encryption).
    #[arg(long, value_delimiter = ',', required = true)]
    pub ops: Vec<String>,
    /// How long the token lasts (e.g. 90d); default: until revoked.
    #[arg(long)]
    pub expires: Option<String>,
}

#[derive(Debug, Args)]
pub struct RotateArgs {
    /// The secret's id, e.g. prod/api/database.
    pub secret: String,
    /// Makes retries safe: the same token returns the same version.
    #[arg(long)]
    pub request_token: Option<String>,
    /// The new value (static and encryption-key secrets); `-` for stdin.
    #[arg(long)]
    pub value_file: Option<PathBuf>,
    /// Clear a rotation parked as needs-attention (or abort one in
    /// flight) instead of rotating.
    #[arg(long, conflicts_with_all = ["request_token", "value_file", "wait"])]
    pub cancel: bool,
    /// If previous is not decommissioned yet, wait until it is, then
    /// rotate.
    #[arg(long)]
    pub wait: bool,
}

#[derive(Debug, Args)]
pub struct GetArgs {
    /// The secret's id, e.g. prod/api/database.
    pub secret: String,
    #[arg(long, value_enum, conflicts_with = "version")]
    pub stage: Option<StageArg>,
    #[arg(long)]
    pub version: Option<u64>,
    /// Print the value (audited).
    #[arg(long)]
    pub reveal: bool,
}

#[derive(Debug, Args)]
pub struct RevokeArgs {
    /// The secret's id, e.g. prod/api/database.
    pub secret: String,
    #[arg(long)]
    pub version: u64,
    /// Revoke previous before the decommission conditions hold.
    #[arg(long, requires = "reason")]
    pub force: bool,
    /// Why (recorded in the audit log); required with --force.
    #[arg(long)]
    pub reason: Option<String>,
}

#[derive(Debug, Args)]
pub struct AuditArgs {
    /// Only events of this secret.
    #[arg(long)]
    pub secret: Option<String>,
    /// Recompute the chain's MACs and report the first break; prints the
    /// head (SEQ:MAC) to keep elsewhere.
    #[arg(long)]
    pub verify: bool,
    /// With --verify: a head recorded earlier (SEQ:MAC, from a log line,
    /// /metrics or an earlier --verify) that must still be in the log.
    #[arg(long, requires = "verify", value_name = "SEQ:MAC")]
    pub expect_head: Option<String>,
    /// The newest this many events (fetched a page at a time), shown
    /// oldest first.
    #[arg(long, default_value_t = 1000)]
    pub limit: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StageArg {
    Current,
    Previous,
    Pending,
}

#[derive(Debug, Args)]
#[allow(
    clippy::doc_markdown,
    reason = "clap prints these doc comments verbatim as --help text"
)]
pub struct CreateArgs {
    /// The secret's id, e.g. prod/api/database.
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
    /// Where the values live: a [[providers]] name from the backend's
    /// config (Vault / OpenBao KV v2, AWS Secrets Manager). Default: rekey's
    /// embedded store. An AWS secret that exists already is adopted: its
    /// AWSCURRENT value becomes version 1.
    #[arg(long, value_name = "NAME", value_parser = NonEmptyStringValueParser::new())]
    pub provider: Option<String>,
    /// Where the provider keeps the values (a KV path, an AWS secret name). Requires
    /// --provider; default: the provider's path_prefix followed by SECRET.
    #[arg(long, value_name = "PATH", requires = "provider",
        value_parser = NonEmptyStringValueParser::new())]
    pub provider_path: Option<String>,
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
    /// postgres: libpq's sslmode for apps' URLs (default: the admin URL's).
    #[arg(long, value_name = "MODE")]
    pub sslmode: Option<String>,
    /// postgres: libpq's sslrootcert for apps' URLs (default: the admin URL's).
    #[arg(long, value_name = "FILE")]
    pub sslrootcert: Option<String>,
    /// redis: the ACL user whose passwords rotate.
    #[arg(long)]
    pub username: Option<String>,
    /// redis: address apps connect to (default: the admin URL's).
    #[arg(long)]
    pub address: Option<String>,
    /// redis: single (the admin URL's server), nodes (a primary and its
    /// replicas), sentinel or cluster; every step applies to every server.
    #[arg(long, value_name = "T")]
    pub topology: Option<String>,
    /// redis: nodes, a server (repeat; default: found with ROLE); cluster,
    /// a seed node (default: the admin URL's server).
    #[arg(long = "node", value_name = "HOST:PORT", value_delimiter = ',')]
    pub nodes: Vec<String>,
    /// redis: sentinel, a Sentinel to ask (repeat).
    #[arg(long = "sentinel", value_name = "HOST:PORT", value_delimiter = ',')]
    pub sentinels: Vec<String>,
    /// redis: sentinel, the name the Sentinels monitor the primary by.
    #[arg(long)]
    pub master_name: Option<String>,
    /// redis (rediss://): CA certificates (PEM) on the backend's host;
    /// default: the public CAs.
    #[arg(long, value_name = "FILE")]
    pub tls_ca_file: Option<PathBuf>,
    /// redis (rediss://): a client certificate (PEM) on the backend's host.
    #[arg(long, value_name = "FILE", requires = "tls_key_file")]
    pub tls_cert_file: Option<PathBuf>,
    /// redis (rediss://): the client certificate's key (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_cert_file")]
    pub tls_key_file: Option<PathBuf>,
    /// redis (rediss://): the name servers' certificates are checked
    /// against, and sent as SNI (default: the host connected to).
    #[arg(long, value_name = "NAME")]
    pub tls_server_name: Option<String>,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        let matches = Cli::command_line().try_get_matches_from(args)?;
        <Cli as clap::FromArgMatches>::from_arg_matches(&matches)
    }

    fn create(args: &[&str]) -> Result<Box<CreateArgs>, clap::Error> {
        let all = [&["rekey", "create", "prod/db", "--kind", "static"], args].concat();
        match parse(&all)?.command {
            Command::Create(a) => Ok(a),
            c => panic!("parsed as {c:?}"),
        }
    }

    #[test]
    fn provider_flags_parse_and_the_path_needs_a_provider() {
        let a = create(&[]).unwrap();
        assert_eq!((a.provider, a.provider_path), (None, None));
        let a = create(&["--provider", "vault-main"]).unwrap();
        assert_eq!(a.provider.as_deref(), Some("vault-main"));
        assert_eq!(a.provider_path, None);
        let a = create(&["--provider", "vault-main", "--provider-path", "kv/db"]).unwrap();
        assert_eq!(a.provider_path.as_deref(), Some("kv/db"));

        let e = create(&["--provider-path", "kv/db"]).unwrap_err();
        assert_eq!(e.kind(), clap::error::ErrorKind::MissingRequiredArgument);
        assert!(e.to_string().contains("--provider <NAME>"), "{e}");
        for empty in [
            &["--provider", ""][..],
            &["--provider", "v", "--provider-path", ""],
        ] {
            let e = create(empty).unwrap_err();
            assert_eq!(e.kind(), clap::error::ErrorKind::InvalidValue, "{empty:?}");
        }
    }
}
