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
            eprintln!("error: {}", output::safe(&e.to_string()));
            e.exit_code()
        }
    }
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
        Command::Revoke(a) => commands::revoke(&cx()?, a).await,
        Command::Status { secret } => commands::status(&cx()?, secret.as_deref()).await,
        Command::Audit(a) => commands::audit(&cx()?, a).await,
        Command::Token(c) => commands::token(&cx()?, c).await,
    }
}
