//! `rekey-lambda`: the rotation function AWS Secrets Manager calls, as the
//! `bootstrap` of a Lambda custom runtime (`provided.al2023`). It is
//! configured by the function's environment (`REKEY_KIND`,
//! `REKEY_<OPTION>`, see the README) and logs JSON lines, which Lambda
//! sends to CloudWatch.

use std::process::ExitCode;

use rekey_backend::telemetry::{self, LogFormat};

fn main() -> ExitCode {
    if let Some(a) = std::env::args().nth(1) {
        return match a.as_str() {
            "--version" | "-V" => {
                println!("rekey-lambda {}", env!("CARGO_PKG_VERSION"));
                ExitCode::SUCCESS
            }
            "--check-config" => {
                match rekey_backend::lambda::Settings::from_vars(std::env::vars()) {
                    Ok(_) => {
                        println!("rekey-lambda: the REKEY_* settings are valid");
                        ExitCode::SUCCESS
                    }
                    Err(e) => {
                        eprintln!("error: {e}");
                        ExitCode::from(2)
                    }
                }
            }
            _ => {
                eprintln!(
                    "rekey-lambda runs as a Lambda function's bootstrap and takes no arguments but --check-config and --version; it is configured by REKEY_* variables"
                );
                ExitCode::from(2)
            }
        };
    }
    telemetry::init(LogFormat::Json);
    // One invocation at a time: a single thread starts fastest.
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
    match rt.block_on(rekey_backend::lambda::run()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
