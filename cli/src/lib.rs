//! `rekey`, the operator CLI: a gRPC client of `rekey-backend`, plus
//! `rekey demo` (the whole flow on one machine) and `rekey reencrypt` (the
//! runbook's re-encryption of database columns).
//!
//! Human tables by default, `-o json` for scripts. Exit 0 on success;
//! otherwise one line on stderr, `error: <what>: <detail>`, and a non-zero
//! exit: 2 for a usage error (something typed on the command line is
//! wrong: a flag value that does not parse, a file it names that cannot be
//! read, a bad `--addr`; found before anything is sent), 1 for a refusal or
//! failure of the backend or the database. [`CliError`] carries the
//! difference.

mod args;
mod client;
mod commands;
mod demo;
mod error;
mod output;
mod reencrypt;

use std::process::ExitCode;

pub use args::Cli;
use args::Command;
use commands::Ctx;
pub use error::CliError;

/// Runs the CLI; returns the process exit status (the error, if any, is
/// printed on stderr).
pub async fn run(cli: Cli) -> ExitCode {
    match dispatch(&cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let e = explain(&cli, e);
            eprintln!("error: {}", output::safe(&e.to_string()));
            e.exit_code()
        }
    }
}

/// Adds what the user can do about a failure the backend cannot know the
/// cause of: no token sent, or an address that is not its gRPC port.
fn explain(cli: &Cli, e: CliError) -> CliError {
    let CliError::Failed(m) = &e else { return e };
    if let Some(better) = client::not_grpc(&cli.backend.addr, m) {
        return CliError::failed(better);
    }
    if m == "unauthenticated: no bearer token" && !client::token_given(&cli.backend) {
        return CliError::failed(format!(
            "{m}: none was found; give --token or --token-file (or REKEY_TOKEN / REKEY_TOKEN_FILE), or run where {} exists (a backend started in that directory writes it)",
            client::LOCAL_ADMIN_TOKEN
        ));
    }
    e
}

async fn dispatch(cli: &Cli) -> Result<(), CliError> {
    let cx = || Ctx::new(&cli.backend, cli.output);
    match &cli.command {
        Command::Demo(a) => demo::run(a).await,
        Command::DemoApp(a) => demo::serve_app(a).await,
        Command::Reencrypt(a) => {
            reencrypt::run(a, &cli.backend, cli.output == args::Output::Json).await
        }
        Command::Seal(a) => reencrypt::seal(a),
        Command::Create(a) => commands::create(&cx()?, a).await,
        Command::Rotate(a) => commands::rotate(&cx()?, a).await,
        Command::Get(a) => commands::get(&cx()?, a).await,
        Command::Versions { secret } => commands::versions(&cx()?, secret).await,
        Command::List { prefix } => commands::list(&cx()?, prefix.as_deref()).await,
        Command::Rollback { secret } => commands::rollback(&cx()?, secret).await,
        Command::Sync { secret } => commands::sync(&cx()?, secret).await,
        Command::Revoke(a) => commands::revoke(&cx()?, a).await,
        Command::Status { secret } => commands::status(&cx()?, secret.as_deref()).await,
        Command::Audit(a) => commands::audit(&cx()?, a).await,
        Command::Token(c) => commands::token(&cx()?, c).await,
    }
}
