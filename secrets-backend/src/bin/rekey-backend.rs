//! `rekey-backend`: serves versioned secrets and the rotation engine over
//! gRPC. With no config it uses the embedded SQLite store in ./rekey-data/
//! on 127.0.0.1:7700.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use rekey_backend::config::Config;
use rekey_backend::telemetry::{self, LogFormat};

#[derive(Debug, Parser)]
#[command(
    name = "rekey-backend",
    version,
    about = "The rekey backend: versioned secrets and zero-downtime rotation over gRPC"
)]
struct Args {
    /// TOML configuration file. Every setting can also be overridden by a
    /// REKEY_* environment variable (see the README).
    #[arg(long, env = "REKEY_CONFIG")]
    config: Option<PathBuf>,
    /// Log format on stderr.
    #[arg(long, value_enum, env = "REKEY_LOG_FORMAT", default_value = "human")]
    log_format: LogFormat,
    /// Check the configuration (the file, REKEY_* variables, and that the
    /// files it names can be read) and exit: 0 when it is valid, 2 with
    /// every problem when not. Starts nothing and connects nowhere.
    #[arg(long)]
    check_config: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    telemetry::init(args.log_format);
    let cfg = match Config::load(args.config.as_deref(), std::env::vars()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    if args.check_config {
        let problems = cfg.file_problems();
        if !problems.is_empty() {
            eprintln!("error: {}", rekey_backend::config::ConfigErrors(problems));
            return ExitCode::from(2);
        }
        println!("configuration valid: {}", cfg.summary());
        return ExitCode::SUCCESS;
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(rekey_backend::server::run(
        cfg,
        rekey_backend::server::shutdown_signal(),
    )) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
