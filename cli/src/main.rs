//! `rekey`: the operator CLI (create, rotate, get, versions, rollback,
//! revoke, status, audit).

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = rekey_cli::Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(rekey_cli::run(cli))
}
