//! `rekey`: the operator CLI (create, rotate, get, versions, rollback,
//! revoke, status, audit, demo, reencrypt). Parses the command line
//! (clap exits 2 on a malformed one) and hands it to the library.

use std::process::ExitCode;

use anyhow::Context;

fn main() -> ExitCode {
    let cli = rekey_cli::Cli::parse_args();
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")
    {
        Ok(rt) => rt.block_on(rekey_cli::run(cli)),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
