//! `rekey-sidecar`: delivers rotated secrets to the app next to it without
//! restarts. See the README for the configuration.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use rekey_sidecar::config::{Config, Flags};

#[derive(Debug, Parser)]
#[command(
    name = "rekey-sidecar",
    version,
    about = "The rekey sidecar: hot-reloads rotated secrets without restarts"
)]
struct Args {
    /// TOML configuration file; flags and REKEY_* variables override it.
    #[arg(long, env = "REKEY_CONFIG")]
    config: Option<PathBuf>,
    /// Backend address, e.g. http://rekey-backend:7700.
    #[arg(long)]
    backend: Option<String>,
    /// File holding this sidecar's token towards the backend.
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// ID:PATH[:FORMAT], FORMAT raw (default), json or env. Repeatable.
    #[arg(long = "secret")]
    secrets: Vec<String>,
    /// File holding the token the local read API requires.
    #[arg(long)]
    api_token_file: Option<PathBuf>,
    /// HTTP address (default 127.0.0.1:2773).
    #[arg(long)]
    listen: Option<String>,
    /// Log format on stderr.
    #[arg(long, value_enum, env = "REKEY_LOG_FORMAT", default_value = "human")]
    log_format: LogFormat,
    /// Check the configuration as a start would (the file, flags and
    /// REKEY_* variables; the token files, output directories and other
    /// files it names) and exit: 0 when it is valid, 2 with every problem
    /// when not. Connects nowhere.
    #[arg(long)]
    check_config: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match args.log_format {
        LogFormat::Json => b.json().flatten_event(true).init(),
        LogFormat::Human => b
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
    }
    let flags = Flags {
        backend: args.backend,
        token_file: args.token_file,
        secrets: args.secrets,
        api_token_file: args.api_token_file,
        listen: args.listen,
    };
    let loaded = Config::load_all(args.config.as_deref(), flags, std::env::vars());
    if args.check_config {
        return match loaded {
            Ok(c) => {
                println!("configuration valid: {}", c.summary());
                ExitCode::SUCCESS
            }
            Err(invalid) => {
                eprintln!("error: {}", invalid.errors);
                ExitCode::from(2)
            }
        };
    }
    // The sidecar idles almost always: one thread is plenty.
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
    let cfg = match loaded {
        Ok(c) => c,
        Err(mut invalid) => {
            // One list: what the backend says about the secrets joins the
            // local problems, so that fixing a path does not reveal the
            // next problem only on the next start.
            if let Some(partial) = &invalid.partial {
                let behind = rt.block_on(rekey_sidecar::backend::backend_problems(
                    partial,
                    &invalid.sound_outputs,
                ));
                invalid.errors.0.extend(behind);
            }
            eprintln!("error: {}", invalid.errors);
            return ExitCode::from(2);
        }
    };
    match rt.block_on(rekey_sidecar::run(cfg, rekey_sidecar::shutdown_signal())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
