//! `rekey reencrypt`: the runbook's re-encryption script as a safe,
//! resumable command. Reads `ENCRYPTION_MASTER_KEY_OLD`,
//! `ENCRYPTION_MASTER_KEY_NEW` and `DATABASE_URL` (or the matching flags),
//! re-encrypts every configured column, and prints a summary per column.
//! Keys, flags and columns are checked before the database is contacted
//! (usage errors); what the database reports is a failure.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;

use rekey_keyring::MasterKey;
use rekey_reencrypt::{Codec, Column, Options};

use crate::error::CliError;

#[derive(Debug, Clone, clap::Args)]
#[allow(
    clippy::doc_markdown,
    reason = "clap prints these doc comments verbatim as --help text"
)]
pub struct ReencryptArgs {
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

/// Runs the command and prints its summary (a table, or JSON).
pub async fn run(args: &ReencryptArgs, json: bool) -> Result<(), CliError> {
    let summary = reencrypt(args).await?;
    if json {
        println!("{summary}");
    } else {
        print_table(&summary);
    }
    Ok(())
}

/// Re-encrypts every column; the summary to print.
async fn reencrypt(args: &ReencryptArgs) -> Result<serde_json::Value, CliError> {
    if args.batch_size == 0 || args.batch_size > 10_000 {
        return Err(CliError::usage("--batch-size must be between 1 and 10000"));
    }
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
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(std::time::Duration::from_secs(10))
        .connect(&url)
        .await
        .map_err(|e| {
            failed(format!(
                "cannot connect to the database: {}",
                match e {
                    sqlx::Error::Database(d) => d.message().to_string(),
                    other => other.to_string(),
                }
            ))
        })?;
    let types = rekey_reencrypt::check_columns(&pool, &columns)
        .await
        .map_err(failed)?;
    let (old, new) = (Arc::new(old), Arc::new(new));
    let opts = Options {
        batch_size: args.batch_size,
        dry_run: args.dry_run,
        ..Options::default()
    };
    let mut progress = Progress {
        tty: std::io::stderr().is_terminal(),
        dry_run: opts.dry_run,
    };
    let mut reports = Vec::new();
    for (col, ty) in columns.iter().zip(types) {
        let r = rekey_reencrypt::run_column(
            &pool,
            col,
            &ty,
            old.clone(),
            new.clone(),
            opts,
            None,
            &mut progress,
        )
        .await
        .map_err(failed);
        if progress.tty {
            eprintln!();
        }
        reports.push(r?);
    }
    pool.close().await;
    Ok(serde_json::json!({ "dry_run": args.dry_run, "columns": reports }))
}

/// A progress line on a terminal.
struct Progress {
    tty: bool,
    dry_run: bool,
}

impl rekey_reencrypt::Hook for Progress {
    async fn before_batch(&mut self) -> Result<(), rekey_reencrypt::Error> {
        Ok(())
    }

    async fn after_batch(
        &mut self,
        r: &rekey_reencrypt::Report,
        _last: &str,
    ) -> Result<(), rekey_reencrypt::Error> {
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
        Ok(())
    }
}

/// Prints the summary as a table.
fn print_table(summary: &serde_json::Value) {
    let dry = summary["dry_run"].as_bool().unwrap_or(false);
    println!(
        "{:<24} {:<20} {:>8} {:>8} {:>11} {:>6}",
        "TABLE",
        "COLUMN",
        "SCANNED",
        if dry { "TO_ROTATE" } else { "ROTATED" },
        "ALREADY_NEW",
        "NULL"
    );
    for c in summary["columns"].as_array().into_iter().flatten() {
        println!(
            "{:<24} {:<20} {:>8} {:>8} {:>11} {:>6}",
            c["table"].as_str().unwrap_or_default(),
            c["column"].as_str().unwrap_or_default(),
            c["scanned"],
            c["rotated"],
            c["already_new"],
            c["null"]
        );
    }
    if dry {
        println!("dry run: nothing was written");
    }
}
