//! `rekey reencrypt`: the runbook's re-encryption script as a safe,
//! resumable command. Reads `ENCRYPTION_MASTER_KEY_OLD`,
//! `ENCRYPTION_MASTER_KEY_NEW` and `DATABASE_URL` (or the matching flags),
//! or with `--secret ID` takes the keys from the backend (previous and
//! current of an `encryption-key` secret, revealed and audited) and
//! reports its progress and completion there as the sidecar task does, so
//! that the old key can be decommissioned. It re-encrypts every configured
//! column and prints a summary per column. Keys, flags and columns are
//! checked before the database is contacted (usage errors); what the
//! database or the backend reports is a failure.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;

use rekey_keyring::MasterKey;
use rekey_reencrypt::{Codec, Column, Options};

use rekey_proto::v1 as pb;

use crate::args::BackendArgs;
use crate::client::Client;
use crate::commands::Ctx;
use crate::error::CliError;

#[derive(Debug, Clone, clap::Args)]
#[allow(
    clippy::doc_markdown,
    reason = "clap prints these doc comments verbatim as --help text"
)]
pub struct ReencryptArgs {
    /// Take the keys from this encryption-key secret of the backend
    /// (previous to current; needs reveal and report on it), and report
    /// progress and completion there.
    #[arg(long, conflicts_with_all = ["old_key_file", "new_key_file"])]
    pub secret: Option<String>,
    /// File holding the old master key (base64 of 32 bytes); default: the
    /// ENCRYPTION_MASTER_KEY_OLD environment variable.
    #[arg(long)]
    pub old_key_file: Option<PathBuf>,
    /// File holding the new master key; default: ENCRYPTION_MASTER_KEY_NEW.
    #[arg(long)]
    pub new_key_file: Option<PathBuf>,
    /// Postgres URL; default: DATABASE_URL.
    #[arg(long)]
    pub database_url: Option<String>,
    /// Count what would change; write nothing (works with a read-only role).
    #[arg(long)]
    pub dry_run: bool,
    /// Rows per batch (one UPDATE statement each).
    #[arg(long, default_value_t = 200)]
    pub batch_size: usize,
    /// hyvve: seal each batch under one fresh salt (one PBKDF2 derivation
    /// per batch, a fresh IV per row), or each row under its own salt, as
    /// the platform does.
    #[arg(long, value_parser = ["per-batch", "per-row"], default_value = "per-batch")]
    pub salt: String,
    /// Start at the first row even when an earlier run of the same keys
    /// stopped part way (it leaves a checkpoint in the database).
    #[arg(long)]
    pub restart: bool,
    /// `hyvve`: ai_provider_configs.api_key_encrypted and
    /// mcp_server_configs.api_key_encrypted (id column `id`, codec hyvve).
    #[arg(long, value_parser = ["hyvve"], required_unless_present = "column")]
    pub preset: Option<String>,
    /// TABLE.COLUMN to re-encrypt (repeatable).
    #[arg(long = "column", conflicts_with = "preset")]
    pub column: Vec<String>,
    /// The id column of --column tables.
    #[arg(long, default_value = "id")]
    pub id_column: String,
    /// The codec of --column values: hyvve or rekey.
    #[arg(long, default_value = "hyvve")]
    pub codec: String,
}

#[derive(Debug, Clone, clap::Args)]
#[allow(
    clippy::doc_markdown,
    reason = "clap prints these doc comments verbatim as --help text"
)]
pub struct SealArgs {
    /// The envelope: hyvve (the platform's) or rekey (rekey's own).
    #[arg(long, default_value = "hyvve")]
    pub codec: String,
    /// File holding the master key (base64 of 32 bytes); default: the
    /// ENCRYPTION_MASTER_KEY environment variable.
    #[arg(long)]
    pub key_file: Option<PathBuf>,
    /// File holding the plaintext; default: standard input.
    #[arg(long)]
    pub value_file: Option<PathBuf>,
}

/// `rekey seal`: one envelope, printed on stdout.
pub fn seal(args: &SealArgs) -> Result<(), CliError> {
    use std::io::Read;
    let codec: Codec = args
        .codec
        .parse()
        .map_err(|e| CliError::usage(format!("--codec: {e}")))?;
    let key = key(
        "--key-file",
        "ENCRYPTION_MASTER_KEY",
        args.key_file.as_ref(),
    )?;
    let mut plain = zeroize::Zeroizing::new(Vec::new());
    match &args.value_file {
        Some(p) => std::fs::File::open(p).and_then(|mut f| f.read_to_end(&mut plain)),
        None => std::io::stdin().read_to_end(&mut plain),
    }
    .map_err(|e| CliError::usage(format!("cannot read the value: {e}")))?;
    let sealed = codec.seal(&key, &plain).map_err(failed)?;
    println!("{sealed}");
    Ok(())
}

/// A master key from `file`, else from the environment variable `env`.
fn key(flag: &str, env: &str, file: Option<&PathBuf>) -> Result<MasterKey, CliError> {
    let (text, from) = match file {
        Some(p) => (
            zeroize::Zeroizing::new(std::fs::read_to_string(p).map_err(|e| {
                CliError::usage(format!("cannot read {flag} {}: {e}", p.display()))
            })?),
            format!("{flag} {}", p.display()),
        ),
        None => (
            zeroize::Zeroizing::new(
                std::env::var(env).map_err(|_| CliError::usage(format!("set {env} or {flag}")))?,
            ),
            env.to_string(),
        ),
    };
    MasterKey::from_base64(&text).map_err(|e| CliError::usage(format!("{from}: {e}")))
}

/// A failure of the run itself (database, rows).
fn failed(e: impl std::fmt::Display) -> CliError {
    CliError::failed(format!("reencrypt: {e}"))
}

/// Runs the command and prints its summary (a table, or JSON). `backend`
/// is used with `--secret`.
pub async fn run(args: &ReencryptArgs, backend: &BackendArgs, json: bool) -> Result<(), CliError> {
    let summary = reencrypt(args, backend).await?;
    if json {
        println!("{summary}");
    } else {
        print_table(&summary);
    }
    Ok(())
}

/// The backend's record of this run: which secret and version it moves
/// data to, and the client to report with.
struct Reporter {
    client: Client,
    secret: String,
    version: u64,
    consumer_id: String,
    started: std::time::Instant,
}

impl Reporter {
    async fn report(&mut self, rows: u64, finished: bool, phase: &str) -> Result<(), CliError> {
        #[allow(clippy::cast_precision_loss, reason = "a rate, not a count")]
        let rate = rows as f64 / self.started.elapsed().as_secs_f64().max(0.001);
        self.client
            .report_reencryption(pb::ReportReencryptionRequest {
                secret_id: self.secret.clone(),
                version: self.version,
                consumer_id: self.consumer_id.clone(),
                rows_done: rows,
                rows_total: rows,
                rate,
                finished,
                phase: phase.into(),
            })
            .await?;
        Ok(())
    }
}

/// One stage of `secret`, revealed, as a master key.
async fn stage_key(
    client: &mut Client,
    secret: &str,
    stage: pb::Stage,
) -> Result<(u64, MasterKey), CliError> {
    let v = client
        .get_secret(pb::GetSecretRequest {
            secret_id: secret.into(),
            selector: Some(pb::get_secret_request::Selector::Stage(stage as i32)),
            reveal: true,
        })
        .await?
        .into_inner()
        .version
        .unwrap_or_default();
    let text = match v.value.and_then(|v| v.value) {
        Some(pb::secret_value::Value::Raw(b)) => zeroize::Zeroizing::new(b),
        _ => {
            return Err(failed(format!(
                "{secret} is not an encryption key (its value is not a single key)"
            )));
        }
    };
    let text = std::str::from_utf8(&text)
        .map_err(|_| failed(format!("v{} of {secret} is not base64 text", v.version)))?;
    let key = MasterKey::from_base64(text)
        .map_err(|e| failed(format!("v{} of {secret}: {e}", v.version)))?;
    Ok((v.version, key))
}

/// The old and new keys: from the backend with `--secret`, else from
/// files or the environment.
async fn keys(
    args: &ReencryptArgs,
    backend: &BackendArgs,
) -> Result<(MasterKey, MasterKey, Option<Reporter>), CliError> {
    let Some(secret) = &args.secret else {
        let old = key(
            "--old-key-file",
            "ENCRYPTION_MASTER_KEY_OLD",
            args.old_key_file.as_ref(),
        )?;
        let new = key(
            "--new-key-file",
            "ENCRYPTION_MASTER_KEY_NEW",
            args.new_key_file.as_ref(),
        )?;
        return Ok((old, new, None));
    };
    let mut client = Ctx::new(backend, crate::args::Output::Table)?
        .connect()
        .await?;
    let (version, new) = stage_key(&mut client, secret, pb::Stage::Current).await?;
    let (_, old) = stage_key(&mut client, secret, pb::Stage::Previous)
        .await
        .map_err(|e| {
            failed(format!(
                "{secret} has no previous key to move data from ({e}); nothing to re-encrypt"
            ))
        })?;
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into());
    let reporter = Reporter {
        client,
        secret: secret.clone(),
        version,
        consumer_id: format!("rekey-reencrypt@{host}"),
        started: std::time::Instant::now(),
    };
    Ok((old, new, Some(reporter)))
}

/// Re-encrypts every column; the summary to print.
async fn reencrypt(
    args: &ReencryptArgs,
    backend: &BackendArgs,
) -> Result<serde_json::Value, CliError> {
    if args.batch_size == 0 || args.batch_size > 10_000 {
        return Err(CliError::usage("--batch-size must be between 1 and 10000"));
    }
    let (old, new, reporter) = keys(args, backend).await?;
    if old.id_hex() == new.id_hex() {
        return Err(CliError::usage(
            "the old and new keys are identical; nothing to re-encrypt",
        ));
    }
    let url = zeroize::Zeroizing::new(match &args.database_url {
        Some(u) => u.clone(),
        None => std::env::var("DATABASE_URL")
            .map_err(|_| CliError::usage("set DATABASE_URL or --database-url"))?,
    });
    let columns: Vec<Column> = if args.preset.is_some() {
        rekey_reencrypt::hyvve_preset()
    } else {
        let codec: Codec = args
            .codec
            .parse()
            .map_err(|e| CliError::usage(format!("--codec: {e}")))?;
        args.column
            .iter()
            .map(|tc| {
                let (t, c) = tc.split_once('.').ok_or_else(|| {
                    CliError::usage(format!("--column {tc:?}: expected TABLE.COLUMN"))
                })?;
                Ok(Column {
                    table: t.into(),
                    column: c.into(),
                    id_column: args.id_column.clone(),
                    codec,
                })
            })
            .collect::<Result<_, CliError>>()?
    };
    let db = rekey_probe::postgres::PgUrl::parse(&url)
        .map_err(|e| CliError::usage(format!("the database URL: {e}")))?;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(std::time::Duration::from_secs(10))
        .connect_with(db.options())
        .await
        .map_err(|e| {
            failed(format!(
                "cannot connect to the database {}: {}",
                db.target(),
                db.reason(&e)
            ))
        })?;
    let types = rekey_reencrypt::check_columns(&pool, &columns)
        .await
        .map_err(failed)?;
    let (old, new) = (Arc::new(old), Arc::new(new));
    let opts = Options {
        batch_size: args.batch_size,
        dry_run: args.dry_run,
        salt: args.salt.parse().map_err(CliError::usage)?,
        ..Options::default()
    };
    // A run that writes keeps a checkpoint per column in the database,
    // keyed by its pair of keys: run again, it resumes after the last
    // batch written. A dry run writes nothing, checkpoints included.
    let checkpoints = if opts.dry_run {
        None
    } else {
        rekey_reencrypt::checkpoint::ensure_table(&pool)
            .await
            .map_err(|e| failed(format!("cannot keep a checkpoint in the database: {e}")))?;
        let c = rekey_reencrypt::checkpoint::Checkpoints {
            pool: pool.clone(),
            run: format!("rekey reencrypt {} -> {}", old.id_hex(), new.id_hex()),
            version: 0,
        };
        if args.restart {
            c.clear().await.map_err(|e| failed(e.to_string()))?;
        }
        Some(c)
    };
    let mut progress = Progress {
        tty: std::io::stderr().is_terminal(),
        dry_run: opts.dry_run,
        // A dry run changes nothing, so it reports nothing.
        reporter: reporter.filter(|_| !opts.dry_run),
        earlier_columns: 0,
        checkpoint: None,
    };
    let mut reports = Vec::new();
    for (col, ty) in columns.iter().zip(types) {
        let start = match &checkpoints {
            Some(c) => c.load(col, PASS).await.map_err(|e| failed(e.to_string()))?,
            None => None,
        };
        if let Some((last, done)) = &start {
            let at = if *done {
                "done".to_string()
            } else {
                format!("after id {}", last.as_deref().unwrap_or("-"))
            };
            eprintln!(
                "{}.{}: an earlier run of these keys stopped; resuming {at} (--restart starts at the first row)",
                col.table, col.column
            );
        }
        if start.as_ref().is_some_and(|(_, done)| *done) {
            reports.push(rekey_reencrypt::Report {
                table: col.table.clone(),
                column: col.column.clone(),
                ..Default::default()
            });
            continue;
        }
        progress.checkpoint = checkpoints.clone().map(|c| (c, col.clone()));
        let r = rekey_reencrypt::run_column(
            &pool,
            col,
            &ty,
            old.clone(),
            new.clone(),
            opts,
            start.and_then(|(last, _)| last),
            &mut progress,
        )
        .await
        .map_err(failed);
        if progress.tty {
            eprintln!();
        }
        let r = r?;
        if let Some(c) = &checkpoints {
            c.done(col, PASS).await.map_err(|e| failed(e.to_string()))?;
        }
        progress.earlier_columns += r.scanned;
        reports.push(r);
    }
    // Done: the next run of these keys starts afresh (and finds every row
    // already new).
    if let Some(c) = &checkpoints {
        c.clear().await.map_err(|e| failed(e.to_string()))?;
    }
    pool.close().await;
    if let Some(rep) = &mut progress.reporter {
        let rows = progress.earlier_columns;
        rep.report(rows, true, "finished (rekey reencrypt)").await?;
    }
    Ok(serde_json::json!({ "dry_run": args.dry_run, "columns": reports }))
}

/// A progress line on a terminal, and progress reports to the backend
/// with `--secret`.
struct Progress {
    tty: bool,
    dry_run: bool,
    reporter: Option<Reporter>,
    /// Rows scanned in the columns already done.
    earlier_columns: u64,
    /// Where this column's progress is kept, when the run writes.
    checkpoint: Option<(rekey_reencrypt::checkpoint::Checkpoints, Column)>,
}

/// The one-shot command's pass over the columns, in its checkpoints.
const PASS: &str = "one-shot";

impl rekey_reencrypt::Hook for Progress {
    async fn before_batch(&mut self) -> Result<(), rekey_reencrypt::Error> {
        Ok(())
    }

    async fn after_batch(
        &mut self,
        r: &rekey_reencrypt::Report,
        last: &str,
    ) -> Result<(), rekey_reencrypt::Error> {
        if let Some((c, col)) = &self.checkpoint {
            c.save(col, PASS, last).await?;
        }
        if self.tty {
            eprint!(
                "\r{}.{}: {} scanned, {} {}, {} already new   ",
                r.table,
                r.column,
                r.scanned,
                r.rotated,
                if self.dry_run { "to rotate" } else { "rotated" },
                r.already_new
            );
        }
        if let Some(rep) = &mut self.reporter {
            let rows = self.earlier_columns + r.scanned;
            rep.report(rows, false, "pass (rekey reencrypt)")
                .await
                .map_err(|e| {
                    rekey_reencrypt::Error::Invalid(format!("cannot report progress: {e}"))
                })?;
        }
        Ok(())
    }
}

/// Prints the summary as a table.
fn print_table(summary: &serde_json::Value) {
    let dry = summary["dry_run"].as_bool().unwrap_or(false);
    let rows: Vec<Vec<String>> = summary["columns"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| {
            vec![
                c["table"].as_str().unwrap_or_default().to_string(),
                c["column"].as_str().unwrap_or_default().to_string(),
                c["scanned"].to_string(),
                c["rotated"].to_string(),
                c["already_new"].to_string(),
                c["null"].to_string(),
            ]
        })
        .collect();
    crate::output::table(
        &[
            "TABLE",
            "COLUMN",
            "SCANNED",
            if dry { "TO_ROTATE" } else { "ROTATED" },
            "ALREADY_NEW",
            "NULL",
        ],
        &rows,
    );
    if dry {
        println!("dry run: nothing was written");
    }
}
